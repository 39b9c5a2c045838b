"""Offline == live: a bag read by the offline tools (``bagio.iter_frames``) gives exactly the arrays
the node's conversion gives for the same messages, and the running node scores what
``evaluate --bag`` scores offline.

The bags are real (written by the project's ``bagio.BagWriter`` from rclpy-serialized messages)
and hold what used to make the two paths drift: a box rotated by 90 degrees (40x20 at 100,100),
a detection without hypotheses (NaN score), one with hypotheses (NaN, 0.8), an infinite coordinate,
and images in bgr8 / mono8 / mono16 / yuv422 / padded rgb8 / JPEG / PNG, plus an image declaring
100000 x 100000 pixels (refused by the pixel cap on both paths).
"""
import math
import types

import numpy as np
import pytest

pytest.importorskip("rclpy")
pytest.importorskip("vision_msgs.msg")
pytest.importorskip("runa_ood_msgs.msg")

from rclpy.serialization import deserialize_message, serialize_message  # noqa: E402
from sensor_msgs.msg import CompressedImage, Image  # noqa: E402
from vision_msgs.msg import Detection2DArray, ObjectHypothesisWithPose  # noqa: E402

from runa_ood_node.ros import convert  # noqa: E402
from runa_ood_node.ros.node import ZERO_COPY_RGB8  # noqa: E402
from runa_ood_node.tools import bag_eval, bagio, common  # noqa: E402

TINY = "runa-tiny-vit"
STAMP0 = 1_700_000_000_000_000_000
PERIOD = 200_000_000
H, W = 160, 192


def _header(i):
    from std_msgs.msg import Header

    h = Header()
    h.stamp = convert.ns_to_stamp(STAMP0 + i * PERIOD)
    h.frame_id = "camera"
    return h


def _raw_images():
    """rclpy Image messages, one per encoding the node accepts (and one it must refuse)."""
    rng = np.random.default_rng(7)
    rgb = rng.integers(0, 256, (H, W, 3), dtype=np.uint8)
    out = [
        ("bgr8", convert.rgb_to_image(rgb, encoding="bgr8")),
        ("mono8", convert.rgb_to_image(rgb, encoding="mono8")),
        ("mono16", convert.array_to_image(rng.integers(0, 4096, (H, W), dtype=np.uint16), "mono16")),
        ("mono16_be", convert.array_to_image(rng.integers(0, 65536, (H, W), dtype=np.uint16), "16UC1",
                                             bigendian=True)),
        ("yuv422", convert.array_to_image(rng.integers(0, 256, (H, W, 2), dtype=np.uint8), "yuv422")),
        ("yuv422_yuy2", convert.array_to_image(rng.integers(0, 256, (H, W, 2), dtype=np.uint8), "yuv422_yuy2")),
        ("rgb8_padded", convert.rgb_to_image(rgb, encoding="rgb8", step=W * 3 + 8)),
    ]
    huge = Image(height=100000, width=100000, encoding="rgb8", step=300000)
    huge.data = bytes(64)
    out.append(("huge", huge))
    return out


def _compressed_images():
    rgb = np.random.default_rng(8).integers(0, 256, (H, W, 3), dtype=np.uint8)
    return [("jpeg", convert.rgb_to_compressed(rgb, fmt="jpeg")), ("png", convert.rgb_to_compressed(rgb, fmt="png"))]


def _detections(header):
    """Boxes that made offline and live disagree, in xyxy unless said otherwise:
    0 rotated 90 deg: 40x20 at (100, 100) -> node envelope 20x40 = [90, 80, 110, 120]
    1 hypotheses (NaN, 0.8) -> the node picks 0.8 / 'c1'
    2 plain, score 0.5; 3 without hypotheses (NaN score); 4 an infinite coordinate."""
    arr = convert.boxes_to_detections(header, [[80, 90, 120, 110], [10, 10, 70, 60], [100, 20, 180, 90],
                                               [20, 80, 60, 150], [0, 0, 10, 10]],
                                      class_ids=["r", "c0", "p", "x", "inf"], scores=[0.3, float("nan"), 0.5, 1, 1])
    arr.detections[0].bbox.center.theta = math.pi / 2
    extra = ObjectHypothesisWithPose()
    extra.hypothesis.class_id, extra.hypothesis.score = "c1", 0.8
    arr.detections[1].results.append(extra)
    arr.detections[3].results = []
    arr.detections[4].bbox.center.position.x = float("inf")
    return arr


def _write_bag(path, images, topic, msgtype):
    with bagio.BagWriter(path) as w:
        for i, (_name, img) in enumerate(images):
            hdr = _header(i)
            img.header = convert.copy_header(hdr)
            st = STAMP0 + i * PERIOD
            w.write_raw(topic, msgtype, st, serialize_message(img))
            w.write_raw(bagio.DETECTIONS_TOPIC, bagio.DETECTIONS_TYPE, st, serialize_message(_detections(hdr)))
    return path


def _node_conversion(raw_image: bytes, raw_dets: bytes, compressed: bool, max_pixels):
    """What the node does with the same bytes: rclpy message -> its conversion calls."""
    if compressed:
        img = deserialize_message(raw_image, CompressedImage)
        rgb = convert.compressed_to_rgb(img, max_pixels=max_pixels)
    else:
        img = deserialize_message(raw_image, Image)
        rgb = convert.image_to_rgb(img, copy=not ZERO_COPY_RGB8, max_pixels=max_pixels)
    return rgb, convert.detections_to_arrays(deserialize_message(raw_dets, Detection2DArray))


@pytest.mark.parametrize("compressed", [False, True], ids=["raw", "compressed"])
def test_offline_arrays_equal_the_node_conversion(tmp_path, compressed):
    topic, msgtype = ((bagio.COMPRESSED_TOPIC, bagio.COMPRESSED_TYPE) if compressed
                      else (bagio.IMAGE_TOPIC, bagio.IMAGE_TYPE))
    images = _compressed_images() if compressed else _raw_images()
    bag = _write_bag(tmp_path / "bag", images, topic, msgtype)
    raw = {}
    for m in bagio.read_bag(bag):
        raw.setdefault(m.stamp_ns, {})[m.topic] = m.rawdata
    frames = list(bagio.iter_frames(bag))
    assert [f.kind for f in frames] == ["pair"] * len(images)  # every image paired, by the node's rules
    for (name, _), f in zip(images, frames):
        node_reason = None
        try:
            rgb, (boxes, scores, class_ids, ids) = _node_conversion(
                raw[f.stamp_ns][topic], raw[f.stamp_ns][bagio.DETECTIONS_TOPIC], compressed,
                convert.DEFAULT_MAX_IMAGE_PIXELS)
        except convert.ImageConversionError as exc:
            node_reason = f"image_{exc.reason}"
        assert f.reason == node_reason, name
        if name == "huge":
            assert f.reason == "image_too_large" and f.rgb is None
            continue
        assert f.rgb is not None and f.rgb.shape == (H, W, 3), name
        np.testing.assert_array_equal(f.rgb, rgb, err_msg=name)
        np.testing.assert_array_equal(f.boxes_cxcywh, boxes, err_msg=name)
        np.testing.assert_array_equal(f.scores, scores, err_msg=name)
        assert (f.class_ids, f.ids) == (class_ids, ids)
        # the drifts that used to exist, pinned to the node's answers
        env = f.boxes_cxcywh[0]
        np.testing.assert_allclose([env[0] - env[2] / 2, env[1] - env[3] / 2, env[0] + env[2] / 2,
                                    env[1] + env[3] / 2], [90, 80, 110, 120], atol=1e-4)
        assert f.scores[1] == pytest.approx(0.8) and f.class_ids[1] == "c1"
        assert math.isnan(f.scores[3]) and f.class_ids[3] == ""
        assert f.frame_id == "camera"


def test_running_node_scores_what_offline_evaluation_scores(tmp_path, tiny_encoder):
    """The node (subprocess) and ``evaluate --bag`` offline on the same bag: the same frames are
    scored, the same one is refused (image_too_large, counted by both), and every box has the same
    status and score. max_boxes 2 makes the hypothesis choice matter: the node keeps the 0.8 box
    (and the 0.5 one) and leaves the rotated 0.3 box NOT_SCORED."""
    images = [im for im in _raw_images() if im[0] in ("bgr8", "mono16", "yuv422", "huge")]
    bag = _write_bag(tmp_path / "bag", images, bagio.IMAGE_TOPIC, bagio.IMAGE_TYPE)
    ns = types.SimpleNamespace(lam=0.5, blur_radius=1.0, scorer="runa", temperature=1.0, id_set="voc",
                               thresholds=None, min_box_size=2.0, pretrained="none", projection=None,
                               backend="torch", device="cpu", node_params=["max_boxes:=2"])
    params = common.node_parameters_from_args(ns, {"model": TINY}, random_weights=True, image_topic=bagio.IMAGE_TOPIC,
                                              n_frames=len(images))
    off = bag_eval.evaluate_offline(bag, common.scorer_from_parameters(params, encoder=tiny_encoder)[0],
                                    progress=False, params=params)
    assert off["skipped"] == {"image_too_large": 1} and len(off["frames"]) == 3
    # one frame is refused, so the drain ends on silence: 5 s of it are plenty for a scored frame
    live = bag_eval.run_live(bag, params, tmp_path, progress=False, drain_timeout_s=5.0)
    a = assert_live_equals_offline(off, live, n_boxes=3 * 5)
    by_id = {}
    for (_, i), r in a.items():
        by_id.setdefault(i, set()).add(r["status"])
    assert by_id == {"0": {"NOT_SCORED"}, "1": {"OK"}, "2": {"OK"}, "3": {"NOT_SCORED"}, "4": {"INFINITE"}}
    diag = bag_eval.diagnostics_summary(live["diagnostics"])
    values = next(iter(diag.values()))
    assert values.get("drops.image_too_large") == "1"


def assert_live_equals_offline(off, live, n_boxes: int):
    """Every box of the offline report (``evaluate_offline``) answered live (``run_live``) with the same
    status and uncertainty (1e-5), keyed by (stamp, detection id); returns the offline records by key."""
    a = {(r["stamp_ns"], r["id"]): r for r in off["records"]}
    b = {(r["stamp_ns"], r["id"]): r for r in bag_eval.live_records(live, {})}
    assert set(a) == set(b) and len(a) == n_boxes
    for k in a:
        assert b[k]["status"] == a[k]["status"], k
        if a[k]["uncertainty"] is None:
            assert b[k]["uncertainty"] is None, k
        else:
            assert b[k]["uncertainty"] == pytest.approx(a[k]["uncertainty"], abs=1e-5), k
    return a
