"""Bag writing/reading (tools.bagio) and `runa-ood make-bag` (no DDS, no model)."""
import json

import numpy as np
import pytest

from runa_ood_node.ros import convert
from runa_ood_node.tools import bagio, make_bag

STAMP0 = 1_700_000_000_123_456_789


def _xywh(cxcywh):
    """``BagFrame.boxes_cxcywh`` -> xywh, to compare with what was written."""
    c = np.asarray(cxcywh, np.float64).reshape(-1, 4)
    return np.concatenate([c[:, :2] - c[:, 2:] / 2, c[:, 2:]], axis=1)


def _pairs(path, **kw):
    frames = list(bagio.iter_frames(path, **kw))
    assert all(f.ok for f in frames), [(f.kind, f.reason) for f in frames]
    return frames


def _frame_msgs(i, rgb, encoding="rgb8"):
    hdr = bagio.header(STAMP0 + i * 200_000_000)
    return hdr, [
        (bagio.IMAGE_TOPIC, bagio.IMAGE_TYPE, bagio.image_msg(rgb, hdr, encoding)),
        (bagio.COMPRESSED_TOPIC, bagio.COMPRESSED_TYPE, bagio.compressed_msg(rgb, hdr)),
        (bagio.DETECTIONS_TOPIC, bagio.DETECTIONS_TYPE,
         bagio.detections_msg(hdr, [[1.5, 2.0, 10.0, 20.25], [0, 0, 64, 48]], ["cat", "cup"], [f"{i}a", f"{i}b"],
                              [0.9, 0.25])),
        (bagio.GROUND_TRUTH_TOPIC, bagio.GROUND_TRUTH_TYPE,
         bagio.ground_truth_msg(hdr, [f"{i}a", f"{i}b"], [False, True], ["cat", "cup"])),
    ]


@pytest.mark.parametrize("storage", bagio.STORAGES)
def test_round_trip_contents_and_cdr(tmp_path, storage):
    rng = np.random.default_rng(0)
    rgbs = [rng.integers(0, 256, (48, 64, 3), dtype=np.uint8) for _ in range(3)]
    written = []
    with bagio.BagWriter(tmp_path / "bag", storage=storage) as w:
        for i, rgb in enumerate(rgbs):
            hdr, msgs = _frame_msgs(i, rgb, "bgr8" if i == 1 else "rgb8")
            for topic, msgtype, msg in msgs:
                w.write(topic, msgtype, bagio.stamp_ns_of(hdr), msg)
                written.append((topic, msgtype, bagio.stamp_ns_of(hdr), bagio.serialize(msg, msgtype)))
    info = bagio.bag_info(tmp_path / "bag")
    assert info.storage == storage
    assert info.counts == {t: 3 for t in (bagio.IMAGE_TOPIC, bagio.COMPRESSED_TOPIC, bagio.DETECTIONS_TOPIC,
                                          bagio.GROUND_TRUTH_TOPIC)}
    read = list(bagio.read_bag(tmp_path / "bag"))
    # same messages, same CDR bytes, log time = header stamp
    assert sorted((m.topic, m.stamp_ns, m.rawdata) for m in read) == sorted((t, s, r) for t, _, s, r in written)
    for m in read:
        assert bagio.serialize(bagio.deserialize(m.rawdata, m.msgtype), m.msgtype) == m.rawdata
    frames = _pairs(tmp_path / "bag")
    assert [f.stamp_ns for f in frames] == [STAMP0 + i * 200_000_000 for i in range(3)]
    for f, rgb in zip(frames, rgbs):
        np.testing.assert_array_equal(f.rgb, rgb)
        np.testing.assert_allclose(_xywh(f.boxes_cxcywh), [[1.5, 2.0, 10.0, 20.25], [0, 0, 64, 48]])
        assert f.class_ids == ["cat", "cup"] and f.ids[0].endswith("a")
        np.testing.assert_allclose(f.scores, [0.9, 0.25])
        assert f.ground_truth == {f.ids[0]: (False, "cat"), f.ids[1]: (True, "cup")}
        assert f.frame_id == "camera" and f.detections_msg.header.frame_id == "camera"
    # the compressed topic decodes to (almost) the same picture: JPEG
    comp = _pairs(tmp_path / "bag", image_topic=bagio.COMPRESSED_TOPIC)
    assert comp[0].rgb.shape == rgbs[0].shape and comp[0].rgb.dtype == np.uint8


def _same_cdr(rclpy_msg, ours: bytes, msgtype: str) -> None:
    """rclpy's serialize_message and ours agree: same length, rclpy reads ours back as an equal
    message, and ours is exactly what rosbags re-serializes rclpy's bytes to. (Byte equality does
    not hold: Fast CDR leaves the alignment padding bytes uninitialised, rosbags writes zeros.)"""
    from rclpy.serialization import deserialize_message, serialize_message

    theirs = serialize_message(rclpy_msg)
    assert len(theirs) == len(ours)
    assert deserialize_message(ours, type(rclpy_msg)) == rclpy_msg
    assert bagio.serialize(bagio.deserialize(theirs, msgtype), msgtype) == ours


def test_cdr_equals_rclpy_serialize_message():
    """rosbags' CDR (what the bags hold) is what rclpy's serialize_message produces."""
    pytest.importorskip("rclpy")
    vision_msgs = pytest.importorskip("vision_msgs.msg")
    runa_msgs = pytest.importorskip("runa_ood_msgs.msg")
    from sensor_msgs.msg import Image

    rgb = np.arange(4 * 5 * 3, dtype=np.uint8).reshape(4, 5, 3)
    hdr, msgs = _frame_msgs(0, rgb)
    ours = {t: bagio.serialize(m, ty) for t, ty, m in msgs}

    img = Image()
    img.header.stamp.sec, img.header.stamp.nanosec = divmod(STAMP0, 1_000_000_000)
    img.header.frame_id = "camera"
    img.height, img.width, img.encoding, img.step = 4, 5, "rgb8", 15
    img.data = rgb.tobytes()
    _same_cdr(img, ours[bagio.IMAGE_TOPIC], bagio.IMAGE_TYPE)

    arr = vision_msgs.Detection2DArray()
    arr.header = img.header
    for (x, y, w, h), cls, did, sc in zip([[1.5, 2.0, 10.0, 20.25], [0, 0, 64, 48]], ["cat", "cup"], ["0a", "0b"],
                                          [0.9, 0.25]):
        d = vision_msgs.Detection2D()
        d.header = img.header
        d.id = did
        d.bbox.center.position.x, d.bbox.center.position.y = x + w / 2, y + h / 2
        d.bbox.size_x, d.bbox.size_y = float(w), float(h)
        hyp = vision_msgs.ObjectHypothesisWithPose()
        hyp.hypothesis.class_id, hyp.hypothesis.score = cls, sc
        d.results = [hyp]
        arr.detections.append(d)
    _same_cdr(arr, ours[bagio.DETECTIONS_TOPIC], bagio.DETECTIONS_TYPE)

    gt = runa_msgs.GroundTruth()
    gt.header = img.header
    gt.detection_ids, gt.is_ood, gt.category = ["0a", "0b"], [False, True], ["cat", "cup"]
    _same_cdr(gt, ours[bagio.GROUND_TRUTH_TOPIC], bagio.GROUND_TRUTH_TYPE)


def test_node_reader_reads_rosbags_messages_padded_step_and_bad_encoding():
    """The node's reader (ros.convert) works on rosbags' deserialized messages (data: ndarray)."""
    rgb = np.random.default_rng(1).integers(0, 256, (3, 5, 3), dtype=np.uint8)
    padded = np.zeros((3, 20), np.uint8)
    padded[:, :15] = rgb[:, :, ::-1].reshape(3, 15)
    msg = bagio.msg_class(bagio.IMAGE_TYPE)(header=bagio.header(0), height=3, width=5, encoding="bgr8",
                                             is_bigendian=0, step=20, data=padded.reshape(-1))
    np.testing.assert_array_equal(convert.image_to_rgb(msg), rgb)
    msg.encoding = "32FC1"
    with pytest.raises(convert.ImageConversionError) as e:
        convert.image_to_rgb(msg)
    assert e.value.reason == "unsupported_encoding"
    msg.encoding, msg.step = "bgr8", 10  # step shorter than a row
    with pytest.raises(convert.ImageConversionError) as e:
        convert.image_to_rgb(msg)
    assert e.value.reason == "bad_step"


def test_writer_refuses_to_overwrite_and_reader_rejects_non_bags(tmp_path):
    (tmp_path / "exists").mkdir()
    with pytest.raises(bagio.BagError, match="exists"):
        bagio.BagWriter(tmp_path / "exists")
    with pytest.raises(bagio.BagError, match="metadata.yaml"):
        bagio.bag_info(tmp_path / "exists")
    with pytest.raises(bagio.BagError, match="deserialize"):
        bagio.deserialize(b"\x00\x01\x00\x00\xff", bagio.DETECTIONS_TYPE)


def test_skimage_boxes_are_inside_their_photographs():
    frames = make_bag.skimage_frames("voc", mirrored=True)
    assert len(frames) == 2 * len(make_bag.SKIMAGE_BOXES)
    for fr in frames:
        rgb = fr.load()
        h, w = rgb.shape[:2]
        assert w == make_bag.SKIMAGE_WIDTH and rgb.dtype == np.uint8
        b = fr.boxes
        assert (b[:, 0] >= -0.5).all() and (b[:, 1] >= -0.5).all()
        assert (b[:, 0] + b[:, 2] <= w + 0.5).all() and (b[:, 1] + b[:, 3] <= h + 0.5).all()
    flags = {c: o for fr in frames for c, o in zip(fr.categories, fr.is_ood)}
    assert flags["cat"] == False and flags["person"] == False and flags["motorcycle"] == False  # noqa: E712
    assert flags["cup"] and flags["rocket"] and flags["flag"]
    bdd = {c: o for fr in make_bag.skimage_frames("bdd") for c, o in zip(fr.categories, fr.is_ood)}
    assert bdd["cat"] and not bdd["person"]  # a cat is OOD for a driving label set
    ids = [i for fr in frames for i in fr.ids]
    assert len(ids) == len(set(ids))


def test_make_bag_cli_skimage_compressed_sqlite(tmp_path, capsys):
    from runa_ood_node.tools import cli

    out = tmp_path / "b"
    rc = cli.main(["make-bag", "--skimage", "--out", str(out), "--compressed", "--storage", "sqlite3", "--fps", "10",
                   "--max-images", "3", "--start-stamp", "1700000000"])
    assert rc == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["frames"] == 3 and summary["storage"] == "sqlite3" and summary["fps"] == 10
    info = bagio.bag_info(out)
    assert info.storage == "sqlite3"
    assert info.counts == {bagio.COMPRESSED_TOPIC: 3, bagio.DETECTIONS_TOPIC: 3, bagio.GROUND_TRUTH_TOPIC: 3}
    frames = _pairs(out)
    assert [f.stamp_ns for f in frames] == [1_700_000_000_000_000_000 + k * 100_000_000 for k in range(3)]
    expect = make_bag.skimage_frames("voc", mirrored=True)[:3]
    for f, e in zip(frames, expect):
        np.testing.assert_allclose(_xywh(f.boxes_cxcywh), e.boxes, atol=1e-3)
        assert f.class_ids == e.categories and f.ids == e.ids and np.all(f.scores == 1.0)
        assert f.ground_truth == {i: (bool(o), c) for i, o, c in zip(e.ids, e.is_ood, e.categories)}


def test_make_bag_boxes_file_replaces_detections(tmp_path):
    frames = make_bag.skimage_frames("voc", names=["chelsea", "coffee"])
    boxes = {"chelsea": [{"bbox": [10, 10, 50, 40], "category": "dog", "score": 0.7, "id": "d1"},
                         {"bbox": [100, 10, 50, 40], "category": "teapot", "is_ood": False}]}
    p = tmp_path / "boxes.json"
    p.write_text(json.dumps(boxes))
    frames = make_bag.apply_boxes_file(frames, p, "voc")
    s = make_bag.write_bag(frames, tmp_path / "bag", fps=5, start_ns=STAMP0, progress=False)
    assert s["frames"] == 2 and s["boxes"] == 2
    fr = _pairs(tmp_path / "bag")
    assert fr[0].class_ids == ["dog", "teapot"] and fr[0].ids == ["d1", "chelsea#1"]
    np.testing.assert_allclose(fr[0].scores, [0.7, 1.0])
    assert [g[0] for g in fr[0].ground_truth.values()] == [False, False]  # dog is VOC; teapot forced ID
    assert len(fr[1].ids) == 0  # coffee has no entry


def test_make_bag_from_pack_keeps_ids_and_flags(tmp_path, ood_pack, ood_pack_annotations):
    frames = make_bag.pack_frames(ood_pack / "annotations.json", "voc", images_per_source=1)
    srcs = {f.source for f in frames}
    assert srcs == {im["source"] for im in ood_pack_annotations["images"]}
    s = make_bag.write_bag(frames, tmp_path / "bag", storage="mcap", start_ns=STAMP0, progress=False)
    assert s["frames"] == len(frames)
    anns = {str(a["id"]): a for a in ood_pack_annotations["annotations"]}
    n = 0
    for f in _pairs(tmp_path / "bag"):
        for b, c, i in zip(_xywh(f.boxes_cxcywh), f.class_ids, f.ids):
            ood = f.ground_truth[i][0]
            a = anns[i]
            np.testing.assert_allclose(b, a["bbox"], atol=1e-2)
            assert c == a["category"] and a["voc_id"] is not None and bool(ood) == (not a["voc_id"])
            n += 1
    assert n == s["boxes"] > 0
