"""Interface packages: vision_msgs must be wire-identical to upstream, runa_ood_msgs must round-trip,
and rosbags (offline bag tools) must agree with rosidl/rclpy byte for byte.

Needs the interface packages built (``bash scripts/setup.sh``) and ``source scripts/env.sh``.
"""
import json
import math
import pathlib
import time

import numpy as np
import pytest

vision_msg = pytest.importorskip("vision_msgs.msg", reason="build ros2_ws (scripts/setup.sh) and source scripts/env.sh")
runa_msg = pytest.importorskip("runa_ood_msgs.msg", reason="build ros2_ws (scripts/setup.sh) and source scripts/env.sh")

from runa_ood_node.core.boxes import BoxStatus  # noqa: E402
from runa_ood_node.ros import msgdefs  # noqa: E402

UPSTREAM_DETECTION2DARRAY = "RIHS01_214274120007f4a683866481336b70310268cfa107aebe9d594a6acf75bda968"


@pytest.fixture(scope="module")
def store():
    return msgdefs.typestore()


def _installed_hashes(package):
    """``{type: RIHS01}`` from rosidl_generator_type_description's JSON files in share/<pkg>/msg."""
    from ament_index_python.packages import get_package_share_directory

    out = {}
    for f in sorted((pathlib.Path(get_package_share_directory(package)) / "msg").glob("*.json")):
        for entry in json.loads(f.read_text())["type_hashes"]:
            out[entry["type_name"]] = entry["hash_string"]
    return out


def test_rosidl_hashes_equal_upstream():
    for name, want in msgdefs.UPSTREAM_TYPE_HASHES.items():
        assert _installed_hashes(name.split("/")[0])[name] == want, name


def test_rclpy_reports_upstream_hash_on_the_wire():
    """The hash a running publisher advertises (what a real detector's or Foxglove consumer's
    subscriber compares), for every type with a known upstream hash."""
    import importlib

    import rclpy

    ctx = rclpy.Context()
    rclpy.init(context=ctx)
    try:
        node = rclpy.create_node("hash_probe", context=ctx)
        for i, (name, want) in enumerate(sorted(msgdefs.UPSTREAM_TYPE_HASHES.items())):
            package, _, typ = name.split("/")
            topic = f"/hash_probe_{i}"
            node.create_publisher(getattr(importlib.import_module(package + ".msg"), typ), topic, 1)
            infos, deadline = [], time.monotonic() + 10.0
            while not infos and time.monotonic() < deadline:
                infos = node.get_publishers_info_by_topic(topic)
                if not infos:
                    time.sleep(0.05)
            assert infos, f"own {name} publisher never appeared in the graph"
            assert infos[0].topic_type == name
            assert str(infos[0].topic_type_hash) == want, name
        assert msgdefs.UPSTREAM_TYPE_HASHES["vision_msgs/msg/Detection2DArray"] == UPSTREAM_DETECTION2DARRAY
        node.destroy_node()
    finally:
        rclpy.shutdown(context=ctx)


def test_rosbags_hashes_equal_rosidl_for_every_type(store):
    for package in msgdefs.PACKAGES:
        installed = _installed_hashes(package)
        own = {n: h for n, h in installed.items() if n.startswith(package + "/")}
        assert len(own) == len(list(msgdefs.msg_dir(package).glob("*.msg")))
        for name, want in own.items():
            assert store.hash_rihs01(name) == want, name
    assert store.hash_rihs01("vision_msgs/msg/Detection2DArray") == UPSTREAM_DETECTION2DARRAY


def _constant_names(msg_type, prefix):
    return {getattr(msg_type, n): n[len(prefix):] for n in dir(msg_type) if n.startswith(prefix)}


def test_a_consumer_decodes_the_core_verdict_from_the_message(tiny_encoder):
    """Real boxes through the real pipeline and converter, serialised and read back: a consumer that
    decodes ``status`` with the message's STATUS_* constants gets core's status for every box, and
    one decoding ``level`` with LEVEL_* gets core's alert level."""
    from rclpy.serialization import deserialize_message, serialize_message

    from runa_ood_node.core.alerts import AlertLevel
    from runa_ood_node.core.pipeline import OodScorer
    from runa_ood_node.ros import wire

    scorer = OodScorer(tiny_encoder, "voc", max_boxes=1, thresholds=None)
    boxes = [[10, 10, 60, 50], [20, 20, 70, 60], [np.nan, 1, 5, 5], [0, 0, np.inf, 5], [40, 40, 30, 50],
             [5, 5, 6, 6], [200, 200, 220, 220]]
    want = ["OK", "NOT_SCORED", "NAN", "INFINITE", "ZERO_AREA", "TOO_SMALL", "OUTSIDE_IMAGE"]
    res = scorer.score(np.full((80, 100, 3), 128, np.uint8), boxes)
    assert [BoxStatus(int(s)).name for s in res.status] == want
    det_msg = vision_msg.Detection2DArray(detections=[_detection(did=str(i)) for i in range(len(boxes))])
    dets = wire.read_detections(serialize_message(det_msg))
    back = deserialize_message(wire.write_ood_array(det_msg.header, dets, res, "m", "torch", "runa", True),
                               runa_msg.OodDetectionArray)
    names = _constant_names(runa_msg.OodDetection, "STATUS_")
    assert set(names.values()) == {s.name for s in BoxStatus}
    assert [names[d.status] for d in back.detections] == want
    for d, st in zip(back.detections, res.status):
        assert d.status_text == BoxStatus(int(st)).text
        if d.status != runa_msg.OodDetection.STATUS_OK:
            assert not d.is_ood and d.nearest_label == "" and math.isnan(d.uncertainty)

    levels = _constant_names(runa_msg.DriverAlert, "LEVEL_")
    for level in AlertLevel:
        raw = wire.write_alert(det_msg.header, level, runa_msg.DriverAlert.SOURCE_OOD_OBJECT, level.name, dets, res)
        assert levels[deserialize_message(raw, runa_msg.DriverAlert).level] == level.name


def _detection(cx=10.5, cy=20.25, w=30.0, h=40.0, cls="car", score=0.875, did="7"):
    d = vision_msg.Detection2D()
    d.header.frame_id = "cam"
    d.header.stamp.sec, d.header.stamp.nanosec = 12, 345
    d.bbox.center.position.x, d.bbox.center.position.y = cx, cy
    d.bbox.center.theta = 0.125
    d.bbox.size_x, d.bbox.size_y = w, h
    hyp = vision_msg.ObjectHypothesisWithPose()
    hyp.hypothesis.class_id, hyp.hypothesis.score = cls, score
    hyp.pose.pose.position.x = 1.5
    hyp.pose.covariance[0] = 0.25
    d.results.append(hyp)
    d.id = did
    return d


def test_runa_messages_roundtrip_through_rclpy_serialization():
    from rclpy.serialization import deserialize_message, serialize_message

    det = _detection()
    ood = runa_msg.OodDetection(detection=det, uncertainty=float("nan"), threshold=-0.25, is_ood=False,
                                nearest_label="", similarity=float("nan"),
                                status=runa_msg.OodDetection.STATUS_TOO_SMALL, status_text="too small")
    ood2 = runa_msg.OodDetection(detection=_detection(cls="dog", did="8"), uncertainty=-0.125, threshold=-0.25,
                                 is_ood=True, nearest_label="dog", similarity=0.125, status=0, status_text="ok")
    arr = runa_msg.OodDetectionArray(detections=[ood, ood2], model="ViT-B-16", backend="onnxruntime",
                                     scorer="runa", random_weights=True)
    arr.header.frame_id, arr.header.stamp.sec = "cam", 99
    back = deserialize_message(serialize_message(arr), runa_msg.OodDetectionArray)
    assert back.header.frame_id == "cam" and back.header.stamp.sec == 99
    assert (back.model, back.backend, back.scorer, back.random_weights) == ("ViT-B-16", "onnxruntime", "runa", True)
    assert math.isnan(back.detections[0].uncertainty) and math.isnan(back.detections[0].similarity)
    assert back.detections[0].status == runa_msg.OodDetection.STATUS_TOO_SMALL
    assert back.detections[1].is_ood and back.detections[1].nearest_label == "dog"
    assert back.detections[1].uncertainty == -0.125
    assert back.detections[1].detection == ood2.detection  # nested message equality, all fields

    alert = runa_msg.DriverAlert(level=runa_msg.DriverAlert.LEVEL_TAKE_OVER,
                                 source=runa_msg.DriverAlert.SOURCE_OOD_OBJECT, reason="unknown object ahead",
                                 objects=[ood2])
    alert.header.frame_id = "cam"
    assert deserialize_message(serialize_message(alert), runa_msg.DriverAlert) == alert

    gt = runa_msg.GroundTruth(detection_ids=["1", "2"], is_ood=[False, True], category=["car", "moose"])
    gt.header.stamp.nanosec = 5
    assert deserialize_message(serialize_message(gt), runa_msg.GroundTruth) == gt


def _rosbags_detection_array(store):
    T = store.types
    hdr = T["std_msgs/msg/Header"](stamp=T["builtin_interfaces/msg/Time"](sec=12, nanosec=345), frame_id="cam")
    cov = np.zeros(36, np.float64)
    cov[0] = 0.25
    pose = T["geometry_msgs/msg/PoseWithCovariance"](
        pose=T["geometry_msgs/msg/Pose"](position=T["geometry_msgs/msg/Point"](x=1.5, y=0.0, z=0.0),
                                         orientation=T["geometry_msgs/msg/Quaternion"](x=0.0, y=0.0, z=0.0, w=1.0)),
        covariance=cov)
    dets = []
    for cls, did in (("car", "7"), ("a-much-longer-class-name", "")):
        hyp = T["vision_msgs/msg/ObjectHypothesisWithPose"](
            hypothesis=T["vision_msgs/msg/ObjectHypothesis"](class_id=cls, score=0.875), pose=pose)
        center = T["vision_msgs/msg/Pose2D"](position=T["vision_msgs/msg/Point2D"](x=10.5, y=20.25), theta=0.125)
        bbox = T["vision_msgs/msg/BoundingBox2D"](center=center, size_x=30.0, size_y=40.0)
        dets.append(T["vision_msgs/msg/Detection2D"](header=hdr, results=[hyp], bbox=bbox, id=did))
    return T["vision_msgs/msg/Detection2DArray"](header=hdr, detections=dets)


def test_rosbags_cdr_equals_rclpy_serialize(store):
    from rclpy.serialization import deserialize_message, serialize_message

    arr = vision_msg.Detection2DArray()
    arr.header.frame_id, arr.header.stamp.sec, arr.header.stamp.nanosec = "cam", 12, 345
    d1 = _detection()
    d2 = _detection(cls="a-much-longer-class-name", did="")
    for d in (d1, d2):
        d.header.frame_id, d.header.stamp.sec, d.header.stamp.nanosec = "cam", 12, 345
        d.results[0].pose.pose.orientation.w = 1.0
    arr.detections = [d1, d2]
    typ = "vision_msgs/msg/Detection2DArray"
    rclpy_bytes = bytes(serialize_message(arr))
    rosbags_bytes = bytes(store.serialize_cdr(_rosbags_detection_array(store), typ))
    # Same layout and values. rclpy may leave CDR alignment padding uninitialised (observed: a
    # few bytes of stale memory on the first call), rosbags writes zeros: compare modulo padding.
    assert len(rosbags_bytes) == len(rclpy_bytes)
    diff = [i for i, (a, b) in enumerate(zip(rosbags_bytes, rclpy_bytes)) if a != b]
    assert all(rosbags_bytes[i] == 0 for i in diff), "differences outside zero padding"
    assert len(diff) <= 16
    # rosbags parses rclpy's bytes into the message that rosbags serialises identically ...
    rb = store.deserialize_cdr(rclpy_bytes, typ)
    assert rb.detections[1].results[0].hypothesis.class_id == "a-much-longer-class-name"
    assert bytes(store.serialize_cdr(rb, typ)) == rosbags_bytes
    # ... and rclpy parses rosbags' bytes into the original message
    assert deserialize_message(rosbags_bytes, vision_msg.Detection2DArray) == arr


def test_rosbags_cdr_equals_rclpy_for_runa_types(store):
    from rclpy.serialization import serialize_message

    T = store.types
    gt = T["runa_ood_msgs/msg/GroundTruth"](
        header=T["std_msgs/msg/Header"](stamp=T["builtin_interfaces/msg/Time"](sec=3, nanosec=4), frame_id="f"),
        detection_ids=["a", "bb"], is_ood=np.array([True, False]), category=["moose", "car"])
    ref = runa_msg.GroundTruth(detection_ids=["a", "bb"], is_ood=[True, False], category=["moose", "car"])
    ref.header.stamp.sec, ref.header.stamp.nanosec, ref.header.frame_id = 3, 4, "f"
    ours = bytes(store.serialize_cdr(gt, "runa_ood_msgs/msg/GroundTruth"))
    theirs = bytes(serialize_message(ref))
    assert len(ours) == len(theirs)
    assert all(a == b or a == 0 for a, b in zip(ours, theirs))  # modulo padding (see above)
    assert bytes(store.serialize_cdr(store.deserialize_cdr(theirs, "runa_ood_msgs/msg/GroundTruth"),
                                     "runa_ood_msgs/msg/GroundTruth")) == ours


def test_message_texts_are_in_dependency_order():
    names = list(msgdefs.message_texts("vision_msgs"))
    pos = {n: i for i, n in enumerate(names)}
    short = {n.rsplit("/", 1)[1]: i for n, i in pos.items()}
    assert short["Point2D"] < short["Pose2D"] < short["BoundingBox2D"] < short["Detection2D"] < short["Detection2DArray"]
    assert short["ObjectHypothesis"] < short["ObjectHypothesisWithPose"] < short["Detection2D"]
    assert short["VisionClass"] < short["LabelInfo"]
    for needed in ("BoundingBox2D", "BoundingBox2DArray", "Point2D", "Pose2D", "Detection2D", "Detection2DArray",
                   "ObjectHypothesis", "ObjectHypothesisWithPose", "LabelInfo", "VisionClass", "VisionInfo"):
        assert needed in short


def test_msg_dir_env_override_and_missing_package(tmp_path, monkeypatch):
    (tmp_path / "fake_msgs" / "msg").mkdir(parents=True)
    (tmp_path / "fake_msgs" / "msg" / "Thing.msg").write_text("fake_msgs/Other other\n")
    (tmp_path / "fake_msgs" / "msg" / "Other.msg").write_text("# comment with Capital/Word\nint32 x\n")
    monkeypatch.setenv(msgdefs.MSG_PATH_ENV, str(tmp_path))
    assert msgdefs.msg_dir("fake_msgs") == tmp_path / "fake_msgs" / "msg"
    assert list(msgdefs.message_texts("fake_msgs")) == ["fake_msgs/msg/Other", "fake_msgs/msg/Thing"]
    with pytest.raises(msgdefs.MsgDefinitionError, match="no .msg files"):
        msgdefs.msg_dir("no_such_msgs_package")


def test_source_tree_definitions_equal_installed_ones():
    """A stale build (src changed, setup.sh not re-run) would make bags and the node disagree."""
    repo_src = pathlib.Path(msgdefs.__file__).resolve().parents[2] / "ros2_ws" / "src"
    for package in msgdefs.PACKAGES:
        installed = msgdefs.msg_dir(package)
        if repo_src.parent / "install" not in installed.parents:
            continue  # a system package (e.g. the distribution's vision_msgs) is in use
        for f in sorted((repo_src / package / "msg").glob("*.msg")):
            assert (installed / f.name).read_text() == f.read_text(), f"{package}/{f.name}: re-run scripts/setup.sh"
