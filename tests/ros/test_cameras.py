"""One node, one model, every camera (parameter ``cameras``), over real DDS on loopback.

Three cameras (front, left, right) feed one ``RunaOodNode`` (tiny random model, ``default_threshold =
-10``: every scored box is OOD, so a frame with boxes is an "OOD frame" and one without is "clear";
the alert sequence is scripted with message stamps). A tester node publishes each camera's images and
detections on ``<C>/image`` and ``<C>/detections`` with real rclpy publishers and records every output.
Asserted: each camera is answered on its own topics with its own header (nothing crosses), one
backend call scores the frames of several cameras, a flooding camera is throttled by its own queue
and delays no other camera by more than one batch, /diagnostics has one balanced status per camera,
the single vehicle alert names the camera(s), health names the silent camera with figures that stay
current, and unknown parameter overrides are reported naming the closest parameter. Nothing is timed.
"""
from __future__ import annotations

import re
import threading
import time

import numpy as np
import pytest

rclpy = pytest.importorskip("rclpy")
pytest.importorskip("runa_ood_msgs.msg", reason="interface packages not built (bash scripts/setup.sh)")
pytest.importorskip("vision_msgs.msg", reason="interface packages not built (bash scripts/setup.sh)")

from rclpy.executors import SingleThreadedExecutor  # noqa: E402
from rclpy.parameter import Parameter  # noqa: E402
from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy  # noqa: E402

from conftest import RIG_NODE_PARAMS, NodeRig, wait_until  # noqa: E402
from runa_ood_node.ros import convert  # noqa: E402

TIMEOUT = 60.0
W, H = 320, 240
BOX = [100.0, 60.0, 140.0, 100.0]  # small, high in the image: CAUTION only
CAMS = ("front", "left", "right")
PARAMS = dict(RIG_NODE_PARAMS, **{"alert.hold_s": 0.0, "alert.clear_s": 0.25, "health.frame_timeout_s": 0.5},
              cameras=list(CAMS))


def wait_for(pred, timeout=TIMEOUT, what="condition"):
    wait_until(pred, timeout, what, interval=0.02)


class CamRig(NodeRig):
    """The node under test with three cameras + a tester publishing every camera's inputs and
    recording every output (per camera and vehicle level)."""

    def __init__(self, ctx, params=None, cams=CAMS, ns=""):
        from diagnostic_msgs.msg import DiagnosticArray
        from rclpy.node import Node
        from runa_ood_msgs.msg import DriverAlert, OodDetectionArray
        from sensor_msgs.msg import Image
        from vision_msgs.msg import Detection2DArray

        from runa_ood_node.ros.node import RunaOodNode

        self.cams = cams
        p = dict(PARAMS, **(params or {}), cameras=list(cams))
        self.node = RunaOodNode(context=ctx, namespace=ns or None,
                                parameter_overrides=[Parameter(k, value=v) for k, v in p.items()])
        assert self.node.autostart(), self.node.last_error
        self.records = []  # FrameRecords (worker thread)
        self.node.frame_observer = self._observe
        self.t = Node("runa_ood_cam_tester", context=ctx, namespace=ns or None)
        self.lock = threading.Lock()
        self.got = {"alert": [], "health": [], "diag": []}
        reliable = QoSProfile(depth=500, reliability=ReliabilityPolicy.RELIABLE)
        latched = QoSProfile(depth=1, reliability=ReliabilityPolicy.RELIABLE, durability=DurabilityPolicy.TRANSIENT_LOCAL)
        self.pub_img, self.pub_det = {}, {}
        for c in cams:
            self.pub_img[c] = self.t.create_publisher(Image, f"{c}/image", reliable)
            self.pub_det[c] = self.t.create_publisher(Detection2DArray, f"{c}/detections", reliable)
            self.got[c] = []
            self.t.create_subscription(OodDetectionArray, f"{c}/ood/detections", self._rec(c), reliable)
        self.got["plain"] = []  # the single-stream topic must stay silent
        self.t.create_subscription(OodDetectionArray, "ood/detections", self._rec("plain"), reliable)
        self.t.create_subscription(DriverAlert, "ood/driver_alert", self._rec("alert"), latched)
        self.t.create_subscription(DriverAlert, "ood/monitor_health", self._rec("health"), latched)
        self.t.create_subscription(DiagnosticArray, "/diagnostics", self._rec("diag"), reliable)
        self.ex = SingleThreadedExecutor(context=ctx)
        self.ex.add_node(self.node)
        self.ex.add_node(self.t)
        self.thread = threading.Thread(target=self.ex.spin, daemon=True)
        self.thread.start()
        self.stamp_s = 2000.0
        wait_for(lambda: all(self.pub_img[c].get_subscription_count() > 0 and self.pub_det[c].get_subscription_count() > 0
                             for c in cams), what="the node's subscriptions")
        wait_for(lambda: all(self.node._cam(c).pubs["detections"].get_subscription_count() > 0 for c in cams)
                 and self.node._pubs["alert"].get_subscription_count() > 0, what="the tester's subscriptions")

    def _observe(self, rec):
        rec.thread = threading.current_thread().name  # which scoring thread (parameter scoring_threads)
        with self.lock:
            self.records.append(rec)

    def _rec(self, key):
        def cb(msg):
            with self.lock:
                self.got[key].append(msg)
        return cb

    def since(self, key, start=0):
        with self.lock:
            return list(self.got[key][start:])

    def n(self, key):
        with self.lock:
            return len(self.got[key])

    def next_stamp(self, step=0.1):
        self.stamp_s = round(self.stamp_s + step, 3)
        return int(round(self.stamp_s * 1e9))

    def publish(self, cam, stamp_ns, boxes=(), frame_id=None, value=127):
        h = convert.copy_header(None)
        h.stamp = convert.ns_to_stamp(stamp_ns)
        h.frame_id = frame_id or f"{cam}_optical"
        img = convert.rgb_to_image(np.full((H, W, 3), value, np.uint8), h)
        b = np.asarray(boxes, np.float64).reshape(-1, 4)
        det = convert.boxes_to_detections(h, b, scores=[0.9] * len(b))
        self.pub_img[cam].publish(img)
        self.pub_det[cam].publish(det)

    timeout = TIMEOUT

    def idle(self):
        def done():
            acc = self.node.accounting()
            return all(a["queued"] == 0 and a["in_flight"] == 0 and not a["worker_busy"] for a in acc["cameras"].values())
        return self._idle(done, "the node to finish its queues")


@pytest.fixture(scope="module")
def ctx():
    c = rclpy.Context()
    rclpy.init(context=c)
    yield c
    rclpy.shutdown(context=c)


@pytest.fixture(scope="module")
def rig(ctx):
    r = CamRig(ctx)
    yield r
    r.close()


def _stamp(m):
    return convert.stamp_to_ns(m.header.stamp)


def _diag(rig, start=0):
    """The last /diagnostics message since ``start``: {status name: {key: value}}."""
    msgs = [m for m in rig.since("diag", start) if any(st.name.startswith("/runa_ood:") for st in m.status)]
    assert msgs
    return {st.name: {kv.key: kv.value for kv in st.values} for st in msgs[-1].status}


def test_each_camera_is_answered_on_its_own_topics_with_its_own_header(rig):
    starts = {c: rig.n(c) for c in CAMS}
    sent = {c: [] for c in CAMS}
    for _ in range(4):
        for j, c in enumerate(CAMS):
            st = rig.next_stamp(0.01)
            boxes = [BOX] * (j + 1)  # a different number of boxes per camera
            rig.publish(c, st, boxes)
            sent[c].append((st, len(boxes)))
    wait_for(lambda: all(rig.n(c) - starts[c] >= 4 for c in CAMS), what="every camera's answers")
    rig.idle()
    for c in CAMS:
        got = rig.since(c, starts[c])
        assert [(_stamp(m), len(m.detections)) for m in got] == sent[c]  # its own frames, in order
        assert {m.header.frame_id for m in got} == {f"{c}_optical"}  # its own header
    assert rig.n("plain") == 0  # nothing on the single-stream topic
    acc = rig.node.accounting()
    assert acc["balanced"] and set(acc["cameras"]) == set(CAMS)
    for c in CAMS:
        assert acc["cameras"][c]["frames_scored"] >= 4


def test_frames_of_several_cameras_share_one_backend_call(rig):
    """Queue frames of all three cameras while the worker is busy: later batches hold several."""
    with rig.lock:
        rig.records.clear()
    for _ in range(6):
        for c in CAMS:
            rig.publish(c, rig.next_stamp(0.01), [BOX, BOX])
    rig.idle()
    with rig.lock:
        recs = list(rig.records)
    assert len(recs) == 18
    assert max(r.batch_frames for r in recs) >= 2  # some backend call scored frames of several cameras
    assert all(r.batch_frames <= len(CAMS) for r in recs)  # never two frames of one camera in a call
    by_batch = {}
    for r in recs:
        by_batch.setdefault(r.t_pair + r.stages_ms["wait"] / 1e3, []).append(r.camera)
    for cams in by_batch.values():
        assert len(cams) == len(set(cams))
    acc = rig.node.accounting()
    assert acc["frames_per_backend_call"] > 1.0


def test_a_flooding_camera_is_throttled_by_its_own_queue(ctx):
    """'left' floods (a frame every 10 ms with 150 boxes each, processing queue of 2) while front and
    right send a frame now and then (each after the previous one was answered): only left drops
    frames (processing_overload), and every front/right frame is scored in the first batch taken
    after it was paired (it waits for the batch in flight at most: one batch of delay)."""
    r = CamRig(ctx, params={"processing_queue_size": 2, "max_boxes": 200}, ns="/flood")
    try:
        many = [[10.0 + (i % 15) * 20, 10.0 + (i // 15) * 20, 25.0 + (i % 15) * 20, 25.0 + (i // 15) * 20]
                for i in range(150)]
        quiet = {"front": [], "right": []}
        stop = threading.Event()
        stamp_lock = threading.Lock()

        def stamp():
            with stamp_lock:
                return r.next_stamp(0.001)

        def flood():
            while not stop.is_set():
                r.publish("left", stamp(), many)
                time.sleep(0.01)

        flooder = threading.Thread(target=flood, daemon=True)
        flooder.start()
        try:
            time.sleep(1.0)  # the flood is on
            for _ in range(5):
                for c in quiet:
                    st = stamp()
                    r.publish(c, st, [BOX])
                    quiet[c].append(st)
                wait_for(lambda: all(r.n(c) >= len(quiet[c]) for c in quiet), what="the quiet cameras' answers")
        finally:
            stop.set()
            flooder.join(timeout=10)
        acc = r.idle()
        left = acc["cameras"]["left"]
        assert left["frame_drops"].get("processing_overload", 0) > 0  # the flood is throttled ...
        assert left["balanced"]
        for c in quiet:  # ... by its own queue: nothing of the others is dropped
            a = acc["cameras"][c]
            assert a["frame_drops"].get("processing_overload", 0) == 0 and a["frames_scored"] == len(quiet[c])
            assert a["balanced"]
            assert [_stamp(m) for m in r.since(c)] == quiet[c]
        with r.lock:
            recs = list(r.records)
        taken = sorted({rec.t_pair + rec.stages_ms["wait"] / 1e3 for rec in recs})  # when each batch was taken
        checked = 0
        for rec in recs:
            if rec.camera == "left":
                continue
            mine = rec.t_pair + rec.stages_ms["wait"] / 1e3
            between = [t for t in taken if rec.t_pair < t < mine - 1e-9]
            assert between == [], f"{rec.camera} frame waited {len(between)} extra batch(es)"
            checked += 1
        assert checked == 10
        assert any(rec.batch_frames > 1 for rec in recs if rec.camera != "left")  # scored with the flood's frames
    finally:
        r.close()


def test_scoring_threads_share_out_the_cameras_and_gather_their_frames(ctx):
    """scoring_threads=2 with three cameras: front and right on one thread, left on the other (camera
    i to thread i mod 2); each camera answered on its own topic, in stamp order, every frame scored
    and balanced; with a gather window the thread serving two cameras scores their frames together."""
    r = CamRig(ctx, params={"scoring_threads": 2, "gather_window_ms": 50.0}, ns="/threads")
    try:
        sent = {c: [] for c in CAMS}
        for _ in range(6):
            for c in CAMS:
                st = r.next_stamp(0.01)
                r.publish(c, st, [BOX])
                sent[c].append(st)
            time.sleep(0.05)
        wait_for(lambda: all(r.n(c) >= len(sent[c]) for c in CAMS), what="every camera's answers")
        acc = r.idle()
        assert acc["balanced"]
        for c in CAMS:
            assert [_stamp(m) for m in r.since(c)] == sent[c]  # its own frames, in stamp order
            assert acc["cameras"][c]["frames_scored"] == len(sent[c])
        with r.lock:
            recs = list(r.records)
        threads = {c: {rec.thread for rec in recs if rec.camera == c} for c in CAMS}
        assert all(len(t) == 1 for t in threads.values()), threads  # a camera stays on its thread
        assert threads["front"] == threads["right"] != threads["left"], threads
        assert all(rec.batch_frames == 1 for rec in recs if rec.camera == "left")
        assert max(rec.batch_frames for rec in recs if rec.camera == "front") == 2  # gathered with right's
        assert len(r.node._workers) == 2
    finally:
        r.close()


def test_diagnostics_one_balanced_status_per_camera(rig):
    start = rig.n("diag")
    rig.publish("front", rig.next_stamp(), [BOX])
    rig.publish("left", rig.next_stamp(), [])
    rig.idle()
    wait_for(lambda: rig.n("diag") > start + 1, what="/diagnostics")
    statuses = _diag(rig, start)
    assert len(statuses) == len(CAMS)
    acc = rig.node.accounting()
    for c in CAMS:
        name = next(n for n in statuses if f"({c})" in n)
        kv = statuses[name]
        assert kv["camera"] == c and kv["accounting_balanced"] == "true"
        assert int(kv["frames_scored"]) <= acc["cameras"][c]["frames_scored"]
        assert int(kv["frames_paired"]) == int(kv["frames_scored"]) + sum(
            int(v) for k, v in kv.items() if k.startswith("drops.") and k[6:] in (
                "bad_detections", "processing_overload", "deactivated", "internal_error")) + int(kv["frames_queued"])
        assert float(kv["frames_per_backend_call"]) >= 1.0


def test_vehicle_alert_names_the_camera_and_tracks_per_camera(rig):
    from runa_ood_msgs.msg import DriverAlert

    def step(boxes_by_cam):
        for c in CAMS:
            rig.publish(c, rig.next_stamp(0.05), boxes_by_cam.get(c, []))
        rig.idle()

    for _ in range(4):  # everything clear first
        step({})
    wait_for(lambda: rig.since("alert") and rig.since("alert")[-1].level == DriverAlert.LEVEL_CLEAR, what="CLEAR")
    start = rig.n("alert")
    # the same box seen by left, then by right: one frame each is 1 of 3 per camera (one track for
    # both cameras would make it 2 of 3 and raise the level)
    step({"left": [BOX]})
    step({"right": [BOX]})
    assert all(m.level == DriverAlert.LEVEL_CLEAR for m in rig.since("alert", start))
    step({"left": [BOX]})  # 2 of 3 on left: CAUTION, named
    wait_for(lambda: any(m.level == DriverAlert.LEVEL_CAUTION for m in rig.since("alert", start)), what="CAUTION")
    caution = [m for m in rig.since("alert", start) if m.level == DriverAlert.LEVEL_CAUTION][0]
    assert caution.source == DriverAlert.SOURCE_OOD_OBJECT
    assert "(left)" in caution.reason and "front" not in caution.reason and "right" not in caution.reason
    assert len(caution.objects) == 1  # left's OOD box embedded
    n = rig.n("alert")
    step({"left": [BOX], "right": [BOX]})  # right reaches 2 of 3 too: the reason names both
    wait_for(lambda: any("left, right" in m.reason for m in rig.since("alert", n)), what="both cameras named")
    assert rig.n("alert") - start <= 4  # published on changes only
    for _ in range(8):
        step({})
    wait_for(lambda: rig.since("alert")[-1].level == DriverAlert.LEVEL_CLEAR, what="CLEAR again")
    assert "any camera" in rig.since("alert")[-1].reason


def test_health_names_the_silent_camera_with_current_figures(rig):
    from runa_ood_msgs.msg import DriverAlert

    for _ in range(3):
        for c in CAMS:
            rig.publish(c, rig.next_stamp(0.01), [])
        rig.idle()
    wait_for(lambda: rig.since("health") and rig.since("health")[-1].level == DriverAlert.LEVEL_CLEAR
             and "healthy" in rig.since("health")[-1].reason, timeout=TIMEOUT, what="healthy")
    start = rig.n("health")
    end = time.monotonic() + 2.5
    while time.monotonic() < end:  # front and left keep going, right falls silent
        for c in ("front", "left"):
            rig.publish(c, rig.next_stamp(0.01), [])
        time.sleep(0.1)
    msgs = [m for m in rig.since("health", start) if m.level == DriverAlert.LEVEL_CAUTION]
    assert msgs, "no CAUTION on ood/monitor_health"
    assert all("(right)" in m.reason and "front" not in m.reason and "left" not in m.reason for m in msgs)
    # the heartbeat carries current figures: the silence it reports grows
    silences = [float(re.search(r"for ([0-9.]+) s", m.reason).group(1)) for m in msgs]
    assert silences[-1] > silences[0] + 1.0, silences
    for c in CAMS:  # recovers
        rig.publish(c, rig.next_stamp(0.01), [])
    wait_for(lambda: rig.since("health")[-1].level == DriverAlert.LEVEL_CLEAR, what="healthy again")


def test_unknown_parameter_overrides_are_reported_with_the_closest_name(ctx, tmp_path):
    """A -p override and a YAML key the node does not declare: a warning each, naming the closest."""
    from runa_ood_node.ros.node import RunaOodNode

    yaml_file = tmp_path / "params.yaml"
    yaml_file.write_text("/**:\n  ros__parameters:\n    alert.kk: 3\n    camera.front.image_qos: reliable\n")
    c2 = rclpy.Context()
    rclpy.init(context=c2, args=["--ros-args", "-p", "camers:=['front']", "-p", "lam:=0.4",
                                 "--params-file", str(yaml_file)])
    try:
        node = RunaOodNode(context=c2, parameter_overrides=[Parameter(k, value=v) for k, v in PARAMS.items()
                                                              if k != "cameras"])
        try:
            assert node.unknown_overrides == ["alert.kk", "camera.front.image_qos", "camers"]
            assert node.get_parameter("lam").value == 0.4  # a declared one is taken
        finally:
            node.destroy_node()
    finally:
        rclpy.shutdown(context=c2)


def test_unknown_override_warning_text(ctx, capfd):
    from rclpy.parameter import Parameter as P

    from runa_ood_node.ros.node import RunaOodNode

    node = RunaOodNode(context=ctx, node_name="runa_ood_warn",
                       parameter_overrides=[P("camers", value=["front"]), P("health.frame_timeout", value=2.0)])
    try:
        assert node.unknown_overrides == ["camers", "health.frame_timeout"]
    finally:
        node.destroy_node()
    err = capfd.readouterr().err
    assert "'camers' is not a parameter of this node and is IGNORED; did you mean 'cameras'?" in err
    assert "did you mean 'health.frame_timeout_s'?" in err


def test_per_camera_override_applies_to_that_camera_only(ctx):
    """camera.left.image_transport=compressed: left subscribes left/image/compressed, the others raw."""
    from rclpy.parameter import Parameter as P

    from runa_ood_node.ros.node import RunaOodNode

    p = dict(PARAMS, **{"camera.left.image_transport": "compressed", "camera.right.detections_qos": "sensor_data"})
    node = RunaOodNode(context=ctx, node_name="runa_ood_over", namespace="/over",
                       parameter_overrides=[P(k, value=v) for k, v in p.items()])
    try:
        assert node.autostart(), node.last_error
        topics = {c: [s.topic_name for s in node._cam(c).subs] for c in CAMS}
        assert topics["left"] == ["/over/left/image/compressed", "/over/left/detections"]
        assert topics["front"] == ["/over/front/image", "/over/front/detections"]
        assert node._cam("right").inputs.detections_qos == "sensor_data"
        assert node._cam("front").inputs.detections_qos == "reliable"
        assert node.get_parameter("camera.front.image_transport").value == "raw"  # declared with the node-wide value
    finally:
        node.trigger_shutdown()
        node.destroy_node()
