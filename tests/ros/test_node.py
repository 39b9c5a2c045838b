"""The runa_ood lifecycle node over real DDS (loopback, one process, one shared node).

The node runs the tiny random model ("runa-tiny-vit", allow_random_weights) with
``default_threshold = -10``: every scored box is OOD (runa uncertainties lie in [-1, 1]), so frames
with boxes are "OOD frames" and frames with empty detections are "clear frames". That scripts the
driver-alert sequence frame by frame, deterministically, with message stamps (never wall time).
The real-photograph test reconfigures a threshold between the boxes' uncertainties, so that some
boxes are flagged and others not. Only behaviour is asserted; nothing here is timed (waits are
generous timeouts).
"""
from __future__ import annotations

import array
import json
import math
import os
import re
import subprocess
import sys
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

TIMEOUT = 30.0  # s; generous: the machine is shared and slow
W, H = 640, 480
SMALL = [300.0, 100.0, 340.0, 140.0]  # 0.5 % of the image, bottom at 29 %: CAUTION only
BIG = [100.0, 200.0, 500.0, 470.0]  # 35 % of the image, bottom at 98 %: TAKE_OVER

NODE_PARAMS = dict(RIG_NODE_PARAMS, **{"alert.hold_s": 0.25, "alert.clear_s": 0.45, "health.frame_timeout_s": 0.6})


def wait_for(pred, timeout=TIMEOUT, what="condition"):
    wait_until(pred, timeout, what, interval=0.02)


class Rig(NodeRig):
    """The node under test + a tester node publishing inputs and recording every output."""

    def __init__(self, ctx, photos):
        from diagnostic_msgs.msg import DiagnosticArray
        from rclpy.node import Node
        from runa_ood_msgs.msg import DriverAlert, OodDetectionArray
        from sensor_msgs.msg import Image
        from vision_msgs.msg import Detection2DArray, LabelInfo
        from visualization_msgs.msg import MarkerArray

        from runa_ood_node.ros.node import RunaOodNode

        self.ctx = ctx
        self.photos = photos
        self.node = RunaOodNode(context=ctx, parameter_overrides=[Parameter(k, value=v) for k, v in NODE_PARAMS.items()])
        assert self.node.autostart(), self.node.last_error
        self.t = Node("runa_ood_tester", context=ctx)
        self.lock = threading.Lock()
        self.got = {k: [] for k in ("det", "ood_only", "alert", "health", "diag", "annotated", "markers", "label")}
        reliable = QoSProfile(depth=200, reliability=ReliabilityPolicy.RELIABLE)
        latched = QoSProfile(depth=1, reliability=ReliabilityPolicy.RELIABLE, durability=DurabilityPolicy.TRANSIENT_LOCAL)
        self.pub_img = self.t.create_publisher(Image, "image", reliable)
        self.pub_det = self.t.create_publisher(Detection2DArray, "detections", reliable)
        for key, typ, topic, qos in (("det", OodDetectionArray, "ood/detections", reliable),
                                     ("ood_only", Detection2DArray, "ood/ood_only", reliable),
                                     ("alert", DriverAlert, "ood/driver_alert", latched),
                                     ("health", DriverAlert, "ood/monitor_health", latched),
                                     ("diag", DiagnosticArray, "/diagnostics", reliable),
                                     ("annotated", Image, "ood/annotated_image", reliable),
                                     ("markers", MarkerArray, "ood/markers", reliable),
                                     ("label", LabelInfo, "ood/label_info", latched)):
            self.t.create_subscription(typ, topic, self._recorder(key), qos)
        self.ex = SingleThreadedExecutor(context=ctx)
        self.ex.add_node(self.node)
        self.ex.add_node(self.t)
        self.thread = threading.Thread(target=self.ex.spin, daemon=True)
        self.thread.start()
        self.stamp_s = 1000.0  # stamps only increase across the whole module
        self.wait_connected()

    def wait_connected(self):
        wait_for(lambda: self.pub_img.get_subscription_count() > 0 and self.pub_det.get_subscription_count() > 0,
                 what="the node's subscriptions")
        wait_for(lambda: all(self.node._pubs[k].get_subscription_count() > 0 for k in ("detections", "ood_only", "alert", "health")),
                 what="the tester's subscriptions")

    def _recorder(self, key):
        def cb(msg):
            with self.lock:
                self.got[key].append(msg)
        return cb

    def n(self, key):
        with self.lock:
            return len(self.got[key])

    def since(self, key, start):
        with self.lock:
            return list(self.got[key][start:])

    def next_stamp(self, step=0.1):
        self.stamp_s = round(self.stamp_s + step, 3)
        return int(round(self.stamp_s * 1e9))

    @staticmethod
    def header(stamp_ns, frame_id="camera"):
        h = convert.copy_header(None)
        h.stamp = convert.ns_to_stamp(stamp_ns)
        h.frame_id = frame_id
        return h

    def publish(self, stamp_ns, image=None, boxes=None, dets=None, rgb=None, frame_id="camera"):
        """Publish an image (msg, or rgb array) and detections (msg, or xyxy boxes) with one stamp."""
        h = self.header(stamp_ns, frame_id)
        if image is None and rgb is not None:
            image = convert.rgb_to_image(rgb, h)
        if dets is None and boxes is not None:
            dets = convert.boxes_to_detections(h, np.asarray(boxes, np.float64).reshape(-1, 4),
                                               scores=[0.9] * len(boxes))
        if image is not None:
            self.pub_img.publish(image)
        if dets is not None:
            self.pub_det.publish(dets)
        return h

    def gray(self):
        return np.full((H, W, 3), 127, np.uint8)

    timeout = TIMEOUT

    def idle(self):
        """Wait until every message sent so far has been received and processed."""
        def done():
            a = self.node.accounting()
            return a["queued"] == 0 and a["in_flight"] == 0 and not a["worker_busy"]
        return self._idle(done, "the node to finish its queue")

    def wait_received(self, n_images, n_dets):
        wait_for(lambda: self.node.accounting()["received"]["image"] >= n_images
                 and self.node.accounting()["received"]["detections"] >= n_dets, what="inputs to arrive")
        return self.idle()


@pytest.fixture(scope="module")
def rig(ood_pack, ood_pack_annotations):
    import cv2

    photos = []  # (rgb, boxes_xyxy) of real photographs of several sizes
    for img in ood_pack_annotations["images"]:
        boxes = [a["bbox"] for a in ood_pack_annotations["annotations"] if a["image_id"] == img["id"]]
        if 2 <= len(boxes) <= 12 and (not photos or img["width"] != photos[-1][0].shape[1]):
            bgr = cv2.imread(str(ood_pack / img["file_name"]), cv2.IMREAD_COLOR)
            xywh = np.asarray(boxes, np.float64)
            photos.append((bgr[:, :, ::-1].copy(), np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], 1)))
        if len(photos) == 3:
            break
    assert len(photos) == 3
    ctx = rclpy.Context()
    rclpy.init(context=ctx)
    r = Rig(ctx, photos)
    yield r
    r.close()
    rclpy.shutdown(context=ctx)


def _by_stamp(msgs):
    return {convert.stamp_to_ns(m.header.stamp): m for m in msgs}


def reconfigure(rig, **params):
    """deactivate -> cleanup -> set parameters -> configure -> activate (reloads the model)."""
    from rclpy.lifecycle import TransitionCallbackReturn as R

    node = rig.node
    assert node.trigger_deactivate() == R.SUCCESS and node.trigger_cleanup() == R.SUCCESS
    assert node.scorer is None
    res = node.set_parameters([Parameter(k, value=v) for k, v in params.items()])
    assert all(r.successful for r in res), [r.reason for r in res]
    assert node.trigger_configure() == R.SUCCESS, node.last_error
    assert node.trigger_activate() == R.SUCCESS
    rig.wait_connected()


def send_photos(rig):
    """Publish the three photographs (the second as padded bgr8) and return {stamp: (frame_id, rgb,
    boxes)} once each has its ood/detections, ood/ood_only and annotated image, with those outputs."""
    start = {k: rig.n(k) for k in rig.got}
    sent = {}
    for i, (rgb, boxes) in enumerate(rig.photos):
        stamp = rig.next_stamp()
        if i == 1:  # a camera with padded rows in bgr8: the node must honour step and channel order
            h = rig.header(stamp, f"cam{i}")
            image = convert.array_to_image(rgb[:, :, ::-1].copy(), "bgr8", h, step=rgb.shape[1] * 3 + 64)
            rig.publish(stamp, image=image, boxes=boxes, frame_id=f"cam{i}")
        else:
            rig.publish(stamp, rgb=rgb, boxes=boxes, frame_id=f"cam{i}")
        sent[stamp] = (f"cam{i}", rgb, boxes)
    wait_for(lambda: rig.n("det") >= start["det"] + 3 and rig.n("ood_only") >= start["ood_only"] + 3
             and rig.n("annotated") >= start["annotated"] + 3, what="3 scored frames")
    return sent, tuple(_by_stamp(rig.since(k, start[k])) for k in ("det", "ood_only", "annotated"))


# ---------------------------------------------------------------------------------------- tests
def test_real_photographs_every_box_scored_headers_copied(rig):
    a0 = rig.idle()
    # pass 1 (threshold -10: every box OOD) gives the uncertainties of the real boxes; pass 2 puts
    # the threshold between two of them, so some boxes are flagged and others not, and ood_only
    # must carry exactly the flagged ones (a filtering bug cannot hide behind "all" or "none")
    sent, (dets, _, _) = send_photos(rig)
    unc = sorted(d.uncertainty for st in sent for d in dets[st].detections)
    assert len(unc) >= 4 and all(math.isfinite(u) and -1.0 <= u <= 1.0 for u in unc)
    mid = len(unc) // 2
    assert unc[mid] - unc[mid - 1] > 1e-5, "need two distinct uncertainties around the median"
    thr = float((unc[mid - 1] + unc[mid]) / 2)
    reconfigure(rig, default_threshold=thr)
    try:
        a1 = rig.idle()
        sent, (dets, only, ann) = send_photos(rig)
        n_ood = n_id = 0
        for stamp, (frame_id, rgb, boxes) in sent.items():
            out = dets[stamp]
            assert out.header.frame_id == frame_id and convert.stamp_to_ns(out.header.stamp) == stamp
            assert len(out.detections) == len(boxes)
            assert out.model == "runa-tiny-vit" and out.backend == "torch" and out.scorer == "max_cosine"
            assert out.random_weights is True
            for d, b in zip(out.detections, boxes):
                assert d.status == 0, d.status_text  # every real box inside the photo is scored
                assert math.isfinite(d.uncertainty) and -1.0 <= d.uncertainty <= 1.0
                assert d.threshold == pytest.approx(thr, abs=1e-6)
                assert d.is_ood == (d.uncertainty > d.threshold)
                assert d.nearest_label and math.isfinite(d.similarity)
                assert d.detection.bbox.center.position.x == pytest.approx((b[0] + b[2]) / 2)
                n_ood, n_id = n_ood + d.is_ood, n_id + (not d.is_ood)
            flagged = [d.detection.id for d in out.detections if d.is_ood]
            flagged_x = [d.detection.bbox.center.position.x for d in out.detections if d.is_ood]
            assert [d.id for d in only[stamp].detections] == flagged  # same boxes, same order
            assert [d.bbox.center.position.x for d in only[stamp].detections] == flagged_x
            assert only[stamp].header.frame_id == frame_id
            assert ann[stamp].header.frame_id == frame_id
            assert (ann[stamp].width, ann[stamp].height) == (rgb.shape[1], rgb.shape[0])
            assert ann[stamp].encoding == "rgb8"
        # the same deterministic random model scores the same boxes again: half on each side
        assert n_ood == len(unc) - mid and n_id == mid
        label = rig.since("label", 0)
        assert label and [c.class_name for c in label[-1].class_map][:3] == ["airplane", "bicycle", "bird"]
        assert label[-1].threshold == pytest.approx(thr, abs=1e-6)
        a2 = rig.idle()
        assert a2["frames_scored"] - a1["frames_scored"] == 3 and a2["balanced"]
        assert "internal_error" not in a2["frame_drops"] and not a2["counters"].get("secondary_output_errors")
    finally:
        reconfigure(rig, default_threshold=NODE_PARAMS["default_threshold"])
    assert a0["balanced"]


def test_alert_raise_hold_clear_and_take_over(rig):
    from runa_ood_msgs.msg import DriverAlert

    # bring the (stamp-driven) alert monitor to CLEAR whatever earlier tests left: 3 clear frames 1 s apart
    for _ in range(3):
        rig.publish(rig.next_stamp(1.0), rgb=rig.gray(), boxes=[])
    rig.idle()
    wait_for(lambda: rig.n("alert") and rig.since("alert", 0)[-1].level == DriverAlert.LEVEL_CLEAR, what="CLEAR")
    start = rig.n("alert")
    script = [SMALL, SMALL, None, None, None, None, None, None, BIG, BIG]  # None = no boxes
    stamps = []
    for boxes in script:
        stamps.append(rig.next_stamp(0.1))
        rig.publish(stamps[-1], rgb=rig.gray(), boxes=[] if boxes is None else [boxes])
    rig.idle()
    wait_for(lambda: rig.n("alert") >= start + 3, what="3 alert changes")
    time.sleep(0.2)
    alerts = rig.since("alert", start)
    got = [(a.level, convert.stamp_to_ns(a.header.stamp)) for a in alerts]
    # f1: OOD in 2 of 3 -> CAUTION. f3 held (raised 0.2 s < hold 0.25 s), f4-f6 held (condition
    # absent < clear 0.45 s), f7 clears. f9: big box near the bottom in 2 of 3 -> TAKE_OVER.
    assert got == [(DriverAlert.LEVEL_CAUTION, stamps[1]), (DriverAlert.LEVEL_CLEAR, stamps[7]),
                   (DriverAlert.LEVEL_TAKE_OVER, stamps[9])]
    assert all(a.source == DriverAlert.SOURCE_OOD_OBJECT and a.header.frame_id == "camera" for a in alerts)
    caution, clear, take = alerts
    assert len(caution.objects) == 1 and caution.objects[0].is_ood
    assert caution.objects[0].detection.bbox.size_x == pytest.approx(40.0)
    assert clear.objects == [] and "CLEAR" in clear.reason
    assert len(take.objects) == 1 and take.objects[0].detection.bbox.size_x == pytest.approx(400.0)
    assert "TAKE_OVER" in take.reason


def test_monitor_health_when_frames_stop_and_when_backend_fails(rig):
    from runa_ood_msgs.msg import DriverAlert

    def health_after(start, level, needle):
        def ok():
            return any(m.level == level and needle in m.reason for m in rig.since("health", start))
        return ok

    # frames flowing -> healthy; then no frames for > 0.6 s -> CAUTION "no frame processed"
    start = rig.n("health")
    for _ in range(3):
        rig.publish(rig.next_stamp(), rgb=rig.gray(), boxes=[SMALL])
        time.sleep(0.05)
    rig.idle()
    wait_for(lambda: any(m.level == DriverAlert.LEVEL_CAUTION and "no frame processed" in m.reason
                         for m in rig.since("health", start)), what="health CAUTION after frames stop")
    msgs = rig.since("health", start)
    assert all(m.source == DriverAlert.SOURCE_MONITOR_HEALTH for m in msgs)
    # the heartbeat (0.25 s) re-publishes the CAUTION with CURRENT figures: the silence it reports
    # grows with the silence (it used to repeat the text of the transition, "... for 0.61 s", forever)
    time.sleep(1.5)
    silences = [float(re.search(r"no frame processed for ([0-9.]+) s", m.reason).group(1))
                for m in rig.since("health", start) if m.level == DriverAlert.LEVEL_CAUTION]
    assert len(silences) >= 3 and silences == sorted(silences) and silences[-1] > silences[0] + 1.0, silences
    # recovery: frames flowing again clear it. Keep publishing until CLEAR arrives (on a loaded
    # machine one frame may take longer than frame_timeout_s to be scored, re-raising the timeout)
    start = rig.n("health")
    recovered = health_after(start, DriverAlert.LEVEL_CLEAR, "healthy")
    end = time.monotonic() + 15.0
    while not recovered() and time.monotonic() < end:
        rig.publish(rig.next_stamp(), rgb=rig.gray(), boxes=[SMALL])
        time.sleep(0.1)
    wait_for(recovered, timeout=1.0, what="health CLEAR while frames flow again")

    # a failing backend: boxes come back BACKEND_ERROR and health reports it
    enc = rig.node.scorer.encoder

    def broken(views):
        raise RuntimeError("simulated GPU failure")

    enc.set_backend(broken, "broken")
    try:
        start_h, start_d = rig.n("health"), rig.n("det")
        stamp = rig.next_stamp()
        rig.publish(stamp, rgb=rig.gray(), boxes=[SMALL, BIG])
        wait_for(lambda: stamp in _by_stamp(rig.since("det", start_d)), what="the frame with a broken backend")
        out = _by_stamp(rig.since("det", start_d))[stamp]
        assert [d.status for d in out.detections] == [7, 7] and not any(d.is_ood for d in out.detections)
        assert "simulated GPU failure" in out.detections[0].status_text
        wait_for(health_after(start_h, DriverAlert.LEVEL_CAUTION, "backend failing"), what="backend health alert")
    finally:
        enc.set_backend(None)
    assert rig.idle()["counters"].get("backend_error_frames", 0) >= 1


def test_backend_failure_does_not_clear_a_raised_caution(rig):
    """A failing backend scores nothing (every box BACKEND_ERROR, none OOD); those frames must hold
    the driver alert where it is instead of stepping it down to CLEAR."""
    from runa_ood_msgs.msg import DriverAlert

    for _ in range(3):  # start from CLEAR (stamps 1 s apart: past hold and clear times)
        rig.publish(rig.next_stamp(1.0), rgb=rig.gray(), boxes=[])
    rig.idle()
    wait_for(lambda: rig.n("alert") and rig.since("alert", 0)[-1].level == DriverAlert.LEVEL_CLEAR, what="CLEAR")
    start = rig.n("alert")
    for _ in range(2):  # OOD in 2 of 3 -> CAUTION
        rig.publish(rig.next_stamp(0.1), rgb=rig.gray(), boxes=[SMALL])
    wait_for(lambda: rig.n("alert") > start, what="CAUTION")
    assert [a.level for a in rig.since("alert", start)] == [DriverAlert.LEVEL_CAUTION]

    enc = rig.node.scorer.encoder

    def broken(views):
        raise RuntimeError("simulated GPU failure")

    enc.set_backend(broken, "broken")
    try:
        start_d = rig.n("det")
        stamps = [rig.next_stamp(1.0) for _ in range(3)]  # each 1 s later: a healthy CLEAR would come
        for st in stamps:
            rig.publish(st, rgb=rig.gray(), boxes=[SMALL])
        wait_for(lambda: set(stamps) <= set(_by_stamp(rig.since("det", start_d))), what="the failed frames")
        for st in stamps:
            out = _by_stamp(rig.since("det", start_d))[st]
            assert [d.status for d in out.detections] == [7] and not out.detections[0].is_ood
        rig.idle()
    finally:
        enc.set_backend(None)
    # nothing published after the CAUTION: the level is held through the failure
    assert [a.level for a in rig.since("alert", start)] == [DriverAlert.LEVEL_CAUTION]
    assert int(rig.node._alerts.level) == DriverAlert.LEVEL_CAUTION
    # with the backend back, clear frames do lower it
    end = time.monotonic() + TIMEOUT
    while rig.since("alert", start)[-1].level != DriverAlert.LEVEL_CLEAR and time.monotonic() < end:
        rig.publish(rig.next_stamp(1.0), rgb=rig.gray(), boxes=[])
        rig.idle()
    assert rig.since("alert", start)[-1].level == DriverAlert.LEVEL_CLEAR
    assert rig.node._alerts.n_bad_object_ids == 0  # the detections' ids were passed, one per box


def _raw_image(stamp_ns, encoding="rgb8", width=W, height=H, step=None, nbytes=None):
    from sensor_msgs.msg import Image

    m = Image()
    m.header = Rig.header(stamp_ns)
    m.width, m.height, m.encoding = width, height, encoding
    m.step = width * 3 if step is None else step
    n = m.step * height if nbytes is None else nbytes
    m.data = array.array("B", bytes(n))
    return m


def test_bad_input_is_counted_and_never_kills_the_node(rig):
    a0 = rig.idle()
    start_det = rig.n("det")
    n_img = a0["received"]["image"]
    n_det = a0["received"]["detections"]
    s = [rig.next_stamp() for _ in range(9)]
    rig.publish(s[0], image=_raw_image(s[0], encoding="yuv_weird"), boxes=[SMALL])  # unknown encoding
    rig.publish(s[1], image=_raw_image(s[1], step=W * 3 - 3), boxes=[SMALL])  # step < width * 3
    rig.publish(s[2], image=_raw_image(s[2], nbytes=1000), boxes=[SMALL])  # truncated data
    rig.publish(s[3], rgb=rig.gray(), boxes=[])  # empty detections: scored, nothing to flag
    # NaN box, box outside the image, one good box
    h = rig.header(s[4])
    dets = convert.boxes_to_detections(h, np.array([SMALL, [700, 500, 800, 600], SMALL], np.float64))
    dets.detections[0].bbox.center.position.x = float("nan")
    rig.publish(s[4], rgb=rig.gray(), dets=dets)
    rig.publish(s[5], dets=convert.boxes_to_detections(rig.header(s[5]), np.array([SMALL])))  # detections, no image
    rig.publish(s[6], rgb=rig.gray(), boxes=[SMALL])  # a good frame (drops s[5]'s detections)
    rig.publish(s[6], rgb=rig.gray())  # the same image stamp again: duplicate
    # 1 s back in time (within pairing_max_age_s = 2 s): out of order (x2). A jump of more than
    # pairing_max_age_s restarts the pairer instead (looped bag; tests/unit/test_pairing.py)
    rig.publish(s[6] - 1 * 10**9, rgb=rig.gray(), boxes=[SMALL])
    rng = np.random.default_rng(0)  # 1,000 boxes in one frame; max_boxes = 50
    xy = rng.uniform((0, 0), (W - 40, H - 40), (1000, 2))
    many = np.concatenate([xy, xy + rng.uniform(10, 40, (1000, 2))], 1).clip(0, [W, H, W, H])
    big_dets = convert.boxes_to_detections(rig.header(s[7]), many, scores=list(rng.uniform(0, 1, 1000)))
    rig.publish(s[7], rgb=rig.gray(), dets=big_dets)
    rig.publish(s[8], rgb=rig.gray(), boxes=[SMALL])  # the node is still alive and scoring

    start_mk = rig.n("markers")
    wait_for(lambda: s[8] in _by_stamp(rig.since("det", start_det)), what="the last good frame")
    a1 = rig.wait_received(n_img + 10, n_det + 10)
    out = _by_stamp(rig.since("det", start_det))
    d = lambda key: a1["frame_drops"].get(key, 0) - a0["frame_drops"].get(key, 0)  # noqa: E731
    p = lambda key: a1["pairer"][key] - a0["pairer"][key]  # noqa: E731
    assert d("image_unsupported_encoding") == 1 and d("image_bad_step") == 1 and d("image_truncated") == 1
    assert set(out) == {s[3], s[4], s[6], s[7], s[8]}  # bad images published nothing
    assert out[s[3]].detections == []
    assert [x.status for x in out[s[4]].detections] == [1, 5, 0]  # NAN, OUTSIDE_IMAGE, OK
    assert math.isnan(out[s[4]].detections[0].uncertainty) and not out[s[4]].detections[0].is_ood
    assert p("detections_without_image") == 1 and p("duplicate_stamp") == 1 and p("out_of_order") == 2
    st = [x.status for x in out[s[7]].detections]
    assert len(st) == 1000 and st.count(0) == 50 and st.count(6) == 950
    kept = [x.detection.results[0].hypothesis.score for x in out[s[7]].detections if x.status == 0]
    cut = [x.detection.results[0].hypothesis.score for x in out[s[7]].detections if x.status == 6]
    assert min(kept) >= max(cut)  # highest detector scores first
    assert a1["frames_scored"] - a0["frames_scored"] == 5
    assert a1["balanced"], json.dumps(a1, indent=1)
    assert "internal_error" not in a1["frame_drops"] and not a1["input_drops"]
    assert not a1["counters"].get("secondary_output_errors")
    assert a1["received"]["image"] - n_img == 10 and a1["received"]["detections"] - n_det == 10
    # the 1,000-box frame: markers only for what means something (50 scored + a few not scored; it
    # used to be 2,001), the rest counted; the alert tracker saw only the 50 scored boxes
    from runa_ood_node.ros import draw

    def markers_of(stamp):
        return [m for m in rig.since("markers", start_mk) if convert.stamp_to_ns(m.markers[0].header.stamp) == stamp]

    wait_for(lambda: markers_of(s[7]), what="the heavy frame's markers")
    heavy_markers = markers_of(s[7])[0].markers
    assert len(heavy_markers) == 1 + 2 * (50 + draw.MAX_DRAWN_NOT_SCORED)
    assert a1["counters"]["boxes_not_drawn"] - a0["counters"].get("boxes_not_drawn", 0) == 950 - draw.MAX_DRAWN_NOT_SCORED

    # /diagnostics reports each case
    start = rig.n("diag")
    wait_for(lambda: rig.n("diag") > start + 1, what="/diagnostics")
    status = [st for m in rig.since("diag", start) for st in m.status if "runa_ood" in st.name][-1]
    kv = {v.key: v.value for v in status.values}
    for key in ("drops.image_unsupported_encoding", "drops.image_bad_step", "drops.image_truncated",
                "drops.detections_without_image", "drops.out_of_order", "drops.duplicate_stamp"):
        assert int(kv[key]) >= 1, key
    assert int(kv["boxes.NOT_SCORED"]) >= 950 and int(kv["boxes.NAN"]) >= 1 and int(kv["boxes.OUTSIDE_IMAGE"]) >= 1
    assert kv["random_weights"] == "true" and kv["backend"] == "torch" and kv["model"] == "runa-tiny-vit"
    assert (kv["backend_variant"], kv["backend_variant_reason"]) == ("torch", "explicit")  # which variant, and why
    assert kv["accounting_balanced"] == "true"
    assert math.isfinite(float(kv["latency_p95_ms"])) and float(kv["latency_p50_ms"]) > 0
    assert float(kv["frame_time_p95_ms"]) >= float(kv["latency_p50_ms"]) > 0
    assert status.level == b"\x01"  # WARN: random weights
    assert int(kv["frames_scored"]) == rig.node.accounting()["frames_scored"]


def test_undecodable_cdr_inputs_are_counted_and_never_kill_the_node(rig):
    """Both inputs are taken raw and decoded by the node (ros.msgdefs): bytes too short to hold a
    header stamp are input drops, a valid stamp over a broken body is a frame drop of its own
    reason, and the node goes on scoring. Published raw over DDS, as a broken driver would."""
    from rclpy.serialization import serialize_message

    a0 = rig.idle()
    n_img, n_det = a0["received"]["image"], a0["received"]["detections"]
    start_det = rig.n("det")
    s = [rig.next_stamp() for _ in range(3)]
    rig.pub_img.publish(b"\x00\x01\x00\x00\x07")  # CDR header, no stamp
    rig.pub_det.publish(b"\x05\x05\x05\x05\x05\x05\x05\x05\x05\x05\x05\x05\x05")  # not CDR
    good_image = serialize_message(convert.rgb_to_image(rig.gray(), rig.header(s[0])))
    rig.pub_img.publish(good_image[:30])  # stamp s[0], body cut inside the image's fields
    rig.publish(s[0], boxes=[SMALL])
    good_dets = serialize_message(convert.boxes_to_detections(rig.header(s[1]), np.array([SMALL], np.float64)))
    rig.publish(s[1], rgb=rig.gray())
    rig.pub_det.publish(good_dets[:12] + b"\xff\xff\xff\x7f" + good_dets[16:])  # frame_id of 2^31 bytes
    rig.publish(s[2], rgb=rig.gray(), boxes=[SMALL])  # a good frame: still answered
    a1 = rig.wait_received(n_img + 4, n_det + 4)
    wait_for(lambda: s[2] in _by_stamp(rig.since("det", start_det)), what="the good frame's answer")
    d = lambda key: a1["frame_drops"].get(key, 0) - a0["frame_drops"].get(key, 0)  # noqa: E731
    i = lambda key: a1["input_drops"].get(key, 0) - a0["input_drops"].get(key, 0)  # noqa: E731
    assert i("undecodable_image") == 1 and i("undecodable_detections") == 1
    assert d("image_undecodable") == 1 and d("bad_detections") == 1
    assert set(_by_stamp(rig.since("det", start_det))) == {s[2]}
    assert a1["balanced"], json.dumps(a1, indent=1)
    assert "internal_error" not in a1["frame_drops"] and not a1["counters"].get("secondary_output_errors")


def test_parameters_validated_at_run_time(rig):
    res = rig.node.set_parameters([Parameter("lam", value=1.5)])
    assert not res[0].successful and "lam" in res[0].reason
    res = rig.node.set_parameters([Parameter("scorer", value="maxlogit")])
    assert not res[0].successful and "scorer" in res[0].reason
    res = rig.node.set_parameters([Parameter("model", value="ViT-L-14")])  # read-only
    assert not res[0].successful
    assert rig.node.set_parameters([Parameter("use_sim_time", value=False)])[0].successful  # not ours
    d = rig.node.describe_parameter("lam")
    assert d.description and d.floating_point_range[0].to_value == 1.0 and not d.read_only
    assert rig.node.describe_parameter("backend").read_only
    res = rig.node.set_parameters([Parameter("publish_annotated", value=False)])  # live
    assert res[0].successful and rig.node.settings.publish_annotated is False
    rig.node.set_parameters([Parameter("publish_annotated", value=True)])


def test_a_live_change_reads_no_file_and_a_file_change_is_checked(rig, monkeypatch):
    """Toggling a live parameter on the active node reads nothing from disk (the label set, thresholds and
    head were loaded at configure); a change naming a file is still checked at once (a bad one refused)."""
    from runa_ood_node.core import config

    loads = []
    orig = config.load_label_set
    monkeypatch.setattr(config, "load_label_set", lambda *a, **k: loads.append(a) or orig(*a, **k))
    for value in (False, True):
        res = rig.node.set_parameters([Parameter("publish_annotated", value=value)])
        assert res[0].successful and rig.node.settings.publish_annotated is value
    assert loads == []
    res = rig.node.set_parameters([Parameter("label_set", value="/nonexistent/labels.yaml")])
    assert not res[0].successful and "label_set" in res[0].reason and len(loads) == 1


def test_incompatible_qos_publisher_is_reported(rig):
    """A best-effort detector on the reliable detections subscription delivers nothing: the node
    must say so (counted + warned) rather than stay silent."""
    from vision_msgs.msg import Detection2DArray

    before = rig.node.accounting()["counters"].get("qos_incompatible", 0)
    pub = rig.t.create_publisher(Detection2DArray, "detections",
                                 QoSProfile(depth=1, reliability=ReliabilityPolicy.BEST_EFFORT))
    try:
        wait_for(lambda: rig.node.accounting()["counters"].get("qos_incompatible", 0) > before,
                 what="the incompatible-QoS event")
    finally:
        rig.t.destroy_publisher(pub)


def test_reconfigure_with_high_threshold_flags_nothing(rig):
    """deactivate -> cleanup -> new default_threshold -> configure -> activate (model reloaded)."""
    reconfigure(rig, default_threshold=10.0)
    start = rig.n("det"), rig.n("ood_only")
    rgb, boxes = rig.photos[0]
    stamp = rig.next_stamp()
    rig.publish(stamp, rgb=rgb, boxes=boxes)
    wait_for(lambda: rig.n("det") > start[0] and rig.n("ood_only") > start[1], what="a frame after reconfigure")
    out = _by_stamp(rig.since("det", start[0]))[stamp]
    assert len(out.detections) == len(boxes) and not any(d.is_ood for d in out.detections)
    assert all(d.threshold == pytest.approx(10.0) for d in out.detections)
    assert _by_stamp(rig.since("ood_only", start[1]))[stamp].detections == []


def test_startup_fails_loudly_without_weights(rig):
    from rclpy.lifecycle import TransitionCallbackReturn as R

    from runa_ood_node.ros.node import RunaOodNode

    bad = RunaOodNode("runa_ood_bad", context=rig.ctx, parameter_overrides=[
        Parameter("model", value="runa-tiny-vit"), Parameter("pretrained", value="/nonexistent.pt"),
        Parameter("allow_random_weights", value=False)])
    try:
        assert bad.trigger_configure() == R.FAILURE
        assert "/nonexistent.pt" in bad.last_error and "weights" in bad.last_error
        assert bad.scorer is None
    finally:
        bad.destroy_node()


def test_main_exits_nonzero_when_start_up_fails(tmp_path):
    env = dict(os.environ, ROS_LOG_DIR=str(tmp_path))
    proc = subprocess.run(
        [sys.executable, "-m", "runa_ood_node.ros.node", "--ros-args", "-p", "model:=runa-tiny-vit",
         "-p", "pretrained:=/nonexistent.pt", "-r", "__node:=runa_ood_main_test"],
        env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "/nonexistent.pt" in proc.stderr and "start-up failed" in proc.stderr


def test_compressed_transport_in_a_namespace_and_lazy_drawing(rig):
    """A second node: namespace 'cmp', image_transport=compressed (subscribes 'cmp/image/compressed').
    Nobody listens to its annotated image or markers, so with lazy=true it never draws them."""
    from rclpy.node import Node
    from runa_ood_msgs.msg import OodDetectionArray
    from sensor_msgs.msg import CompressedImage
    from vision_msgs.msg import Detection2DArray

    from runa_ood_node.ros.node import RunaOodNode

    params = dict(NODE_PARAMS, image_transport="compressed", image_qos="sensor_data", lazy=True)
    node = RunaOodNode(namespace="cmp", context=rig.ctx, parameter_overrides=[Parameter(k, value=v) for k, v in params.items()])
    client = Node("cmp_client", namespace="cmp", context=rig.ctx)
    got = []
    try:
        assert node.autostart(), node.last_error
        qos = QoSProfile(depth=10, reliability=ReliabilityPolicy.RELIABLE)
        pub_img = client.create_publisher(CompressedImage, "image/compressed", qos)
        pub_det = client.create_publisher(Detection2DArray, "detections", qos)
        client.create_subscription(OodDetectionArray, "ood/detections", got.append, qos)
        # an executor of their own: removing nodes from the shared, spinning one and destroying them
        # at once killed its thread (InvalidHandle), silencing every later test of this module
        ex2 = SingleThreadedExecutor(context=rig.ctx)
        ex2.add_node(node)
        ex2.add_node(client)
        spin2 = threading.Thread(target=ex2.spin, daemon=True)
        spin2.start()
        wait_for(lambda: pub_img.get_subscription_count() > 0 and pub_det.get_subscription_count() > 0
                 and node._pubs["detections"].get_subscription_count() > 0, what="discovery in namespace cmp")
        rgb, boxes = rig.photos[0]
        h = Rig.header(rig.next_stamp(), "cam_cmp")
        pub_img.publish(convert.rgb_to_compressed(rgb, h, fmt="jpeg"))
        pub_det.publish(convert.boxes_to_detections(h, boxes))
        wait_for(lambda: len(got) == 1, what="a result from the compressed-image node")
        out = got[0]
        assert out.header.frame_id == "cam_cmp" and out.header.stamp == h.stamp
        assert len(out.detections) == len(boxes) and all(d.status == 0 for d in out.detections)
        acc = node.accounting()
        assert acc["frames_scored"] == 1 and acc["balanced"]
        assert acc["counters"].get("annotated_frames", 0) == 0 and acc["counters"].get("marker_frames", 0) == 0
    finally:
        if "ex2" in locals():
            ex2.shutdown(timeout_sec=2.0)
            spin2.join(timeout=5.0)
        node.trigger_shutdown()
        node.destroy_node()
        client.destroy_node()


def test_bench_node_tool_runs_and_reports(tmp_path, ood_pack):
    """`runa-ood bench-node` on 3 frames: the report has every figure (no speed asserted)."""
    import argparse

    from runa_ood_node.tools import bench_node

    parser = argparse.ArgumentParser()
    bench_node.add_arguments(parser)
    from runa_ood_node.ros import node as node_mod

    out = tmp_path / "bench.json"
    saved = (node_mod.HANDOFF_WAIT_S, node_mod.ZERO_COPY_RGB8)
    # --ab 1: one run with the latency optimisations off, one with them on (both through _run_once)
    args = parser.parse_args(["--frames", "3", "--warmup", "1", "--boxes", "4", "--ab", "1", "--json", str(out)])
    assert bench_node.run(args) == 0
    assert (node_mod.HANDOFF_WAIT_S, node_mod.ZERO_COPY_RGB8) == saved  # restored
    rows = json.loads(out.read_text())
    assert len(rows["off"]) == len(rows["on"]) == 1
    for res in rows["off"] + rows["on"]:
        assert res["frames"] == 3 and res["lost"] == 0 and res["random_weights"] is True
        assert res["accounting_balanced"]
        for key in ("e2e_ms", "pipeline_ms", "overhead_ms", "node_processing_ms", "transport_floor_ms",
                    "inputs_floor_ms", "paired_gap_ms", "paired_gap_inputs_floor_ms"):
            assert res[key]["n"] == 3 and math.isfinite(res[key]["p50"]), key
        assert res["e2e_ms"]["p50"] >= res["pipeline_ms"]["p50"] > 0


def test_every_accounting_snapshot_balances_while_frames_are_in_flight(rig):
    """A frame used to be counted as scored while still in flight (alerts, drawing), so snapshots
    taken then - and 9 of 115 /diagnostics messages of the hostile campaign - did not balance."""
    snapshots, stop = [], threading.Event()

    def sample():
        while not stop.is_set():
            snapshots.append(rig.node.accounting()["balanced"])
            time.sleep(0.0005)

    start_diag = rig.n("diag")
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        rgb, boxes = rig.photos[0]
        for _ in range(8):
            rig.publish(rig.next_stamp(), rgb=rgb, boxes=boxes)  # drawn: annotated + markers subscribed
            time.sleep(0.05)
        rig.idle()
        wait_for(lambda: rig.n("diag") > start_diag + 1, what="/diagnostics")
    finally:
        stop.set()
        sampler.join()
    assert len(snapshots) > 100 and all(snapshots), f"{snapshots.count(False)} of {len(snapshots)} unbalanced"
    for m in rig.since("diag", 0):
        kv = {v.key: v.value for st in m.status for v in st.values}
        assert kv["accounting_balanced"] == "true"


def test_far_future_stamp_does_not_silence_the_node(rig):
    """One detections message stamped 1.5 s ahead (within pairing_max_age_s) used to become the
    detections clock, and every later good pair was dropped. It is now one counted drop."""
    a0 = rig.idle()
    start = rig.n("det")
    base = rig.next_stamp()
    rig.publish(base + 1_500_000_000, boxes=[SMALL])  # detections only, far in the future
    stamps = [rig.next_stamp(0.05) for _ in range(12)]
    for st in stamps:
        rig.publish(st, rgb=rig.gray(), boxes=[SMALL])
    wait_for(lambda: set(stamps) <= set(_by_stamp(rig.since("det", start))), what="every good frame")
    a1 = rig.idle()
    assert a1["pairer"]["stamp_in_future"] - a0["pairer"]["stamp_in_future"] == 1
    assert a1["frames_scored"] - a0["frames_scored"] == len(stamps) and a1["balanced"]
    assert a1["pairer"]["restarts"] == a0["pairer"]["restarts"]
    rig.stamp_s = max(rig.stamp_s, (base + 1_500_000_000) * 1e-9)  # later tests stay in order


def test_messages_lost_in_the_dds_queue_are_counted(rig):
    """The executor is held busy while 150 detections are published into a 50-deep subscription
    queue: the ones the queue overwrote never reach a callback, and are counted as lost."""
    from vision_msgs.msg import Detection2DArray

    pub = rig.t.create_publisher(Detection2DArray, "detections", QoSProfile(depth=300, reliability=ReliabilityPolicy.RELIABLE))
    try:
        wait_for(lambda: pub.get_subscription_count() > 0, what="the node's detections subscription")
        before = rig.node.accounting()["received"]["detections"]
        # a first message lets the node know this publisher (losses before it cannot be told apart
        # from messages published before the subscription matched)
        pub.publish(convert.boxes_to_detections(rig.header(rig.next_stamp(0.01)), np.array([SMALL])))
        wait_for(lambda: rig.node.accounting()["received"]["detections"] > before, what="the first message")
        a0 = rig.idle()
        blocked = threading.Event()

        def block():
            timer.cancel()
            blocked.set()
            time.sleep(1.5)

        timer = rig.t.create_timer(0.01, block)
        wait_for(blocked.is_set, what="the executor to be busy")
        n = 150
        for _ in range(n):
            pub.publish(convert.boxes_to_detections(rig.header(rig.next_stamp(0.01)), np.array([SMALL])))
        last = rig.next_stamp(0.01)
        pub.publish(convert.boxes_to_detections(rig.header(last), np.array([SMALL])))  # reveals any tail loss
        n += 1

        def all_seen():
            a = rig.node.accounting()
            got = a["received"]["detections"] - a0["received"]["detections"]
            lost = a["lost"]["detections"] - a0["lost"]["detections"]
            return got + lost == n

        try:
            wait_for(all_seen, what="every published message received or counted as lost")
        except AssertionError:
            a = rig.node.accounting()
            raise AssertionError(f"published {n}, received {a['received']['detections'] - a0['received']['detections']}, "
                                 f"lost {a['lost_detail']} (before {a0['lost_detail']})")
        a1 = rig.idle()
        lost = a1["lost"]["detections"] - a0["lost"]["detections"]
        assert 0 < lost < n and a1["balanced"]
        rig.t.destroy_timer(timer)
        start = rig.n("diag")
        wait_for(lambda: rig.n("diag") > start + 1, what="/diagnostics")
        kv = {v.key: v.value for m in rig.since("diag", start)[-1:] for st in m.status for v in st.values}
        assert int(kv["messages_lost.detections"]) >= lost and int(kv["drops.lost_in_transport"]) >= lost
    finally:
        rig.t.destroy_publisher(pub)


def test_health_latency_covers_drawing_trips_and_recovers(rig, monkeypatch):
    """The health budget is on the whole per-frame time: slow drawing (markers) alone must trip it
    (the old measurement stopped at ood/detections and never saw it); fast frames recover it."""
    from runa_ood_msgs.msg import DriverAlert

    from runa_ood_node.ros import draw

    reconfigure(rig, **{"health.latency_budget_ms": 1000.0, "health.frame_timeout_s": 30.0})
    try:
        slow_markers = draw.make_markers

        def slow(*args, **kwargs):
            time.sleep(1.5)
            return slow_markers(*args, **kwargs)

        monkeypatch.setattr(draw, "make_markers", slow)
        start = rig.n("health")
        for _ in range(6):  # min_latency_samples = 5
            rig.publish(rig.next_stamp(), rgb=rig.gray(), boxes=[SMALL])
        wait_for(lambda: any(m.level == DriverAlert.LEVEL_CAUTION and "latency p95" in m.reason
                             for m in rig.since("health", start)), what="a latency CAUTION")
        rig.idle()
        monkeypatch.setattr(draw, "make_markers", slow_markers)
        start = rig.n("health")
        end = time.monotonic() + 120.0
        # one frame at a time (no queue wait): the 6 slow frames leave the 50-frame window
        while not any(m.level == DriverAlert.LEVEL_CLEAR for m in rig.since("health", start)) and time.monotonic() < end:
            rig.publish(rig.next_stamp(), rgb=rig.gray(), boxes=[SMALL])
            rig.idle()
        assert any(m.level == DriverAlert.LEVEL_CLEAR and "healthy" in m.reason for m in rig.since("health", start))
    finally:
        monkeypatch.undo()
        reconfigure(rig, **{"health.latency_budget_ms": NODE_PARAMS["health.latency_budget_ms"],
                            "health.frame_timeout_s": NODE_PARAMS["health.frame_timeout_s"]})
