"""Scripted frame-by-frame tests of core.alerts (message stamps, no wall time, no sleeping)."""
from types import SimpleNamespace

import numpy as np
import pytest

from runa_ood_node.core.alerts import Alert, AlertConfig, AlertLevel, AlertMonitor
from runa_ood_node.core.health import HealthCode, HealthMonitor

W, H = 640, 480
DT = 0.25  # 4 Hz: stamps are exact binary fractions, so interval arithmetic is exact
SMALL = [300, 200, 320, 220]  # 400 px^2 = 0.13% of the image, bottom at 46%, centre (0.48, 0.44)
BIG = [100, 100, 300, 300]  # 40000 px^2 = 13% of the image
LOW = [10, 400, 30, 420]  # bottom at 87.5% of the height, tiny, centre (0.03, 0.85)

CLEAR, CAUTION, TAKE_OVER = AlertLevel.CLEAR, AlertLevel.CAUTION, AlertLevel.TAKE_OVER


def frame(*boxes, ood=None, status=None):
    """A duck-typed frame result; every box is OOD unless ``ood`` says otherwise."""
    n = len(boxes)
    return SimpleNamespace(
        boxes_xyxy=np.asarray(boxes, dtype=np.float32).reshape(n, 4),
        is_ood=np.ones(n, bool) if ood is None else np.asarray(ood, bool),
        status=np.zeros(n, np.uint8) if status is None else np.asarray(status, np.uint8),
        uncertainty=np.full(n, -0.1, np.float32),
        label=["car"] * n,
    )


NONE = frame()
OOD = frame(SMALL)


def run(monitor, frames, t0=0.0, ids=None):
    """Feed frames at DT spacing (``ids``: object_ids for every frame); return the list of alerts."""
    return [monitor.update(t0 + i * DT, f, W, H, object_ids=ids) for i, f in enumerate(frames)]


def levels(alerts):
    return [a.level for a in alerts]


def test_take_over_outranks_caution_when_both_objects_persist():
    """A small persistent OOD object and a big one: the level is the more severe one, and the alert
    names the object behind it (not the small one)."""
    m = AlertMonitor(AlertConfig(k=2, n=3, takeover_min_area_frac=0.05, takeover_min_bottom_frac=None))
    alerts = run(m, [frame(SMALL, BIG)] * 2)
    assert levels(alerts) == [CLEAR, TAKE_OVER] and alerts[-1].object_indices == [1]
    alerts = run(AlertMonitor(AlertConfig(k=2, n=3, takeover_min_area_frac=0.05, takeover_min_bottom_frac=None)),
                 [frame(SMALL)] * 2)
    assert levels(alerts) == [CLEAR, CAUTION] and alerts[-1].object_indices == [0]


def test_caution_needs_k_of_last_n_frames():
    m = AlertMonitor(AlertConfig(k=3, n=5))
    alerts = run(m, [OOD, NONE, OOD, NONE, OOD])
    assert levels(alerts) == [CLEAR] * 4 + [CAUTION]
    assert [a.changed for a in alerts] == [False] * 4 + [True]
    assert alerts[-1].object_indices == [0]
    assert "3 of last 5" in alerts[-1].reason


def test_isolated_detections_never_raise():
    m = AlertMonitor(AlertConfig(k=3, n=5))
    # at most 2 OOD frames in any 5 consecutive frames
    pattern = [OOD, NONE, NONE, OOD, NONE, NONE] * 5
    assert set(levels(run(m, pattern))) == {CLEAR}


def test_small_ood_box_is_caution_not_takeover():
    m = AlertMonitor(AlertConfig(k=2, n=3))
    assert levels(run(m, [OOD] * 10))[-1] == CAUTION


def test_hold_then_clear_after_clear_s():
    cfg = AlertConfig(k=3, n=5, hold_s=1.0, clear_s=2.0)
    m = AlertMonitor(cfg)
    run(m, [OOD, OOD, OOD])  # raised at t=0.5
    assert m.level == CAUTION
    # OOD gone from t=0.75; the 3-of-5 rule still holds at 0.75 and 1.0 (window has 3 OOD)
    t, out = 0.75, []
    while t <= 4.0:
        out.append((t, m.update(t, NONE, W, H)))
        t += DT
    # condition last held at t=1.0 -> the level drops at the first frame with t - 1.0 >= 2.0
    for stamp, a in out:
        expected = CAUTION if stamp < 3.0 else CLEAR
        assert a.level == expected, stamp
        assert a.changed == (stamp == 3.0)
    held = dict(out)[2.75]
    assert "held" in held.reason and held.object_indices == []


def test_min_hold_keeps_level_even_with_zero_clear_time():
    m = AlertMonitor(AlertConfig(k=1, n=1, hold_s=1.0, clear_s=0.0))
    assert m.update(0.0, OOD, W, H).level == CAUTION
    assert m.update(0.5, NONE, W, H).level == CAUTION  # within the 1 s hold
    a = m.update(1.0, NONE, W, H)
    assert a.level == CLEAR and a.changed


def test_returning_condition_restarts_clear_timer():
    m = AlertMonitor(AlertConfig(k=1, n=1, hold_s=0.0, clear_s=1.0))
    m.update(0.0, OOD, W, H)
    m.update(0.75, NONE, W, H)
    m.update(0.9, OOD, W, H)  # back before clear_s elapsed
    assert m.update(1.5, NONE, W, H).level == CAUTION  # 0.6 s since 0.9
    assert m.update(1.9, NONE, W, H).level == CLEAR


def test_flicker_suppressed():
    """Detections that come and go around the k-of-n boundary give one raise, one clear."""
    m = AlertMonitor(AlertConfig(k=3, n=5, hold_s=1.0, clear_s=2.0))
    pattern = [OOD, OOD, OOD, NONE, NONE, OOD, NONE, NONE, OOD, OOD, NONE, NONE, NONE] * 3 + [NONE] * 20
    alerts = run(m, pattern)
    assert sum(a.changed for a in alerts) == 2
    assert alerts[-1].level == CLEAR
    # without debouncing the raw k-of-n rule would toggle many times
    raw = AlertMonitor(AlertConfig(k=3, n=5, hold_s=0.0, clear_s=0.0))
    assert sum(a.changed for a in run(raw, pattern)) > 4


def test_takeover_by_area():
    cfg = AlertConfig(k=2, n=3, takeover_min_area_frac=0.05, takeover_min_bottom_frac=None)
    m = AlertMonitor(cfg)
    big = frame(SMALL, BIG)
    alerts = run(m, [big, big])
    assert levels(alerts) == [CLEAR, TAKE_OVER]
    assert alerts[-1].object_indices == [1]
    assert "area 13.0% >= 5.0%" in alerts[-1].reason
    # the same box below the area limit is only a caution
    m2 = AlertMonitor(AlertConfig(k=2, n=3, takeover_min_area_frac=0.2, takeover_min_bottom_frac=None))
    assert levels(run(m2, [big, big])) == [CLEAR, CAUTION]


def test_takeover_by_bottom_edge():
    m = AlertMonitor(AlertConfig(k=2, n=3, takeover_min_area_frac=None, takeover_min_bottom_frac=0.8))
    alerts = run(m, [frame(LOW), frame(LOW)])
    assert levels(alerts) == [CLEAR, TAKE_OVER] and "bottom" in alerts[-1].reason
    m2 = AlertMonitor(AlertConfig(k=2, n=3, takeover_min_area_frac=None, takeover_min_bottom_frac=0.9))
    assert levels(run(m2, [frame(LOW), frame(LOW)])) == [CLEAR, CAUTION]


@pytest.mark.parametrize(
    "roi, expected",
    [
        ([0.4, 0.3, 0.6, 0.6], TAKE_OVER),  # rectangle around SMALL's centre (0.48, 0.44)
        ([[0.3, 1.0], [0.45, 0.3], [0.55, 0.3], [0.7, 1.0]], TAKE_OVER),  # ego-lane trapezoid
        ([[0.0, 1.0], [0.1, 0.5], [0.2, 1.0]], CAUTION),  # polygon elsewhere
        ([0.0, 0.0, 0.2, 0.2], CAUTION),  # rectangle elsewhere
    ],
)
def test_takeover_by_roi(roi, expected):
    cfg = AlertConfig(k=2, n=3, takeover_min_area_frac=None, takeover_min_bottom_frac=None, roi=roi)
    m = AlertMonitor(cfg)
    a = run(m, [OOD, OOD])[-1]
    assert a.level == expected
    if expected == TAKE_OVER:
        assert "ROI" in a.reason and a.object_indices == [0]


def test_takeover_k_of_n_and_step_down_to_caution():
    """One object (same tracking id) that is sometimes large: take-over needs the rule in 2 of its last 4."""
    cfg = AlertConfig(k=2, n=4, hold_s=0.0, clear_s=1.0, takeover_min_area_frac=0.05, takeover_min_bottom_frac=None)
    m = AlertMonitor(cfg)
    big = frame(BIG)
    ids = ["a"]
    # one big frame among small ones is a caution only (take-over rule needs 2 of 4)
    assert levels(run(m, [OOD, big, OOD, OOD], ids=ids)) == [CLEAR, CAUTION, CAUTION, CAUTION]
    a = m.update(1.0, big, W, H, object_ids=ids)
    assert a.level == TAKE_OVER and a.changed  # 2 big frames in the last 4
    assert "object 'a'" in a.reason and a.object_indices == [0]
    # big box leaves, small OOD stays: take-over condition last held at 1.0 ... 1.5 (window)
    out = [(t, m.update(t, OOD, W, H, object_ids=ids)) for t in np.arange(1.25, 4.0, DT)]
    drops = [(t, a.level) for t, a in out if a.changed]
    assert len(drops) == 1 and drops[0][1] == CAUTION
    assert all(a.level == CAUTION for t, a in out if t >= drops[0][0])


def test_takeover_straight_to_clear_when_nothing_left():
    cfg = AlertConfig(k=1, n=1, hold_s=0.0, clear_s=1.0)
    m = AlertMonitor(cfg)
    assert m.update(0.0, frame(BIG), W, H).level == TAKE_OVER
    assert m.update(0.5, NONE, W, H).level == TAKE_OVER
    a = m.update(1.0, NONE, W, H)
    assert a.level == CLEAR and a.changed


def test_out_of_order_and_duplicate_stamps_ignored():
    m = AlertMonitor(AlertConfig(k=2, n=2))
    m.update(1.0, OOD, W, H)
    a = m.update(0.5, OOD, W, H)  # late message: must not count towards k
    assert a.level == CLEAR and not a.changed and "ignored" in a.reason
    m.update(1.0, OOD, W, H)  # duplicate stamp
    assert m.n_out_of_order == 2 and m.n_frames == 1
    assert m.update(1.25, NONE, W, H).level == CLEAR  # window: [OOD, NONE]


def test_only_ok_boxes_count_and_none_frame():
    m = AlertMonitor(AlertConfig(k=1, n=1))
    bad = frame(SMALL, ood=[True], status=[7])  # BACKEND_ERROR box flagged OOD: ignored
    assert m.update(0.0, bad, W, H).level == CLEAR
    assert m.update(0.25, None, W, H).level == CLEAR
    notood = frame(BIG, ood=[False])
    assert m.update(0.5, notood, W, H).level == CLEAR
    assert m.update(0.75, {"is_ood": [True], "boxes_xyxy": [SMALL]}, W, H).level == CAUTION  # mapping works


def test_deterministic_replay():
    pattern = [OOD, frame(BIG), NONE, OOD, OOD, frame(LOW), NONE] * 6
    a1 = [(a.level, a.reason) for a in run(AlertMonitor(), pattern)]
    a2 = [(a.level, a.reason) for a in run(AlertMonitor(), pattern)]
    assert a1 == a2
    assert isinstance(run(AlertMonitor(), [OOD])[0], Alert)


def test_reset():
    m = AlertMonitor(AlertConfig(k=1, n=1))
    m.update(5.0, OOD, W, H)
    m.reset()
    assert m.level == CLEAR and m.update(0.0, NONE, W, H).level == CLEAR  # earlier stamp accepted


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(k=0),
        dict(k=6, n=5),
        dict(n=0),
        dict(hold_s=-1.0),
        dict(clear_s=float("nan")),
        dict(takeover_min_area_frac=1.5),
        dict(takeover_min_bottom_frac=-0.1),
        dict(roi=[0.5, 0.5, 0.4, 0.9]),
        dict(roi=[0.0, 0.0, 1.2, 1.0]),
        dict(roi=[[0.0, 0.0], [1.0, 1.0]]),
        dict(roi="lane"),
        dict(takeover_k=9),
    ],
)
def test_config_validation(kwargs):
    with pytest.raises(ValueError):
        AlertConfig(**kwargs)


def test_update_argument_validation():
    m = AlertMonitor()
    with pytest.raises(ValueError, match="image size"):
        m.update(0.0, OOD, 0, H)
    with pytest.raises(ValueError, match="stamp"):
        m.update(float("nan"), OOD, W, H)


# ------------------------------------------------------------------------ per-object persistence


def shifted(box, dx=0.0, dy=0.0):
    return [box[0] + dx, box[1] + dy, box[2] + dx, box[3] + dy]


def iou(a, b):
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    area = lambda r: (r[2] - r[0]) * (r[3] - r[1])  # noqa: E731
    return inter / (area(a) + area(b) - inter)


MID = [200, 150, 260, 210]  # 60x60 px = 1.2 % of the image, bottom at 44 %: CAUTION only


def test_k_distinct_one_frame_boxes_do_not_raise():
    """The review's false-positive case: an OOD box in every frame, but never the same object."""
    m = AlertMonitor(AlertConfig(k=3, n=5))
    places = [[40 + 100 * i, 60, 80 + 100 * i, 100] for i in range(6)]  # disjoint 40x40 boxes
    alerts = run(m, [frame(b) for b in places] * 3)
    assert set(levels(alerts)) == {CLEAR}
    assert "not persistent yet" in alerts[-1].reason
    assert m.n_tracks <= 5  # one-frame tracks expire after n frames unseen


def test_same_object_moving_slightly_raises():
    boxes = [shifted(MID, dx=8 * i, dy=2 * i) for i in range(3)]
    assert all(iou(boxes[i], boxes[i + 1]) >= 0.3 for i in range(2))
    m = AlertMonitor(AlertConfig(k=3, n=5))
    alerts = run(m, [frame(b) for b in boxes])
    assert levels(alerts) == [CLEAR, CLEAR, CAUTION]
    assert "track #1 (box 0, nearest ID label 'car', uncertainty -0.100)" in alerts[-1].reason
    assert alerts[-1].object_indices == [0]


def test_iou_below_match_threshold_is_a_new_object():
    jump = shifted(MID, dx=40)  # 20 px overlap of 60: IoU 0.2
    assert iou(MID, jump) < 0.3
    m = AlertMonitor(AlertConfig(k=2, n=3))
    assert levels(run(m, [frame(MID), frame(jump), frame(MID)])) == [CLEAR, CLEAR, CAUTION]  # #1 twice
    m2 = AlertMonitor(AlertConfig(k=2, n=3))
    assert levels(run(m2, [frame(MID), frame(jump)])) == [CLEAR, CLEAR]
    m3 = AlertMonitor(AlertConfig(k=2, n=3, match_iou=0.15))  # looser matching: the same object
    assert levels(run(m3, [frame(MID), frame(jump)])) == [CLEAR, CAUTION]


def test_object_among_id_boxes_keeps_its_index():
    """Only the persistent object's box is reported, at its index in the current frame."""
    m = AlertMonitor(AlertConfig(k=2, n=3))
    f1 = frame([10, 10, 30, 30], MID)
    f2 = frame(shifted(MID, dx=4), [500, 10, 520, 30], ood=[True, False])
    f3 = frame([400, 300, 420, 320], [10, 10, 30, 30], shifted(MID, dx=6), ood=[False, False, True])
    alerts = run(m, [f1, f2, f3])
    assert levels(alerts) == [CLEAR, CAUTION, CAUTION]
    assert alerts[1].object_indices == [0] and alerts[2].object_indices == [2]
    assert "box 2" in alerts[2].reason


def test_object_ids_override_iou():
    m = AlertMonitor(AlertConfig(k=2, n=3))
    # same place, a different tracking id every frame: three different objects -> no caution
    assert levels(run(m, [OOD] * 3))[-1] == CAUTION  # without ids, IoU makes it one object
    m = AlertMonitor(AlertConfig(k=2, n=3))
    alerts = [m.update(i * DT, OOD, W, H, object_ids=[f"obj{i}"]) for i in range(3)]
    assert set(levels(alerts)) == {CLEAR}
    # the same id far apart (IoU 0): one object -> caution, named by its id
    m = AlertMonitor(AlertConfig(k=2, n=3))
    alerts = [m.update(i * DT, frame(b), W, H, object_ids=["ped-7"])
              for i, b in enumerate([[10, 10, 40, 40], [500, 150, 530, 180]])]
    assert levels(alerts) == [CLEAR, CAUTION] and "object 'ped-7'" in alerts[-1].reason
    # "" means no id: that box falls back to IoU matching; wrong-length ids are ignored and counted
    m = AlertMonitor(AlertConfig(k=2, n=3))
    assert m.update(0.0, OOD, W, H, object_ids=[""]).level == CLEAR
    assert m.update(0.25, OOD, W, H, object_ids=["x", "y"]).level == CAUTION and m.n_bad_object_ids == 1


def test_vanished_track_expires():
    m = AlertMonitor(AlertConfig(k=2, n=3))
    run(m, [frame(MID)])
    assert m.n_tracks == 1
    # absent for n=3 frames: the track is gone, so MID coming back starts afresh (no raise on 1 frame)
    alerts = run(m, [NONE, NONE, NONE, frame(MID)], t0=0.25)
    assert m.n_tracks == 1 and levels(alerts) == [CLEAR] * 4
    assert "track #2" in m.update(1.5, frame(MID), W, H).reason  # a new track, raised now
    # absent for only n-1 = 2 frames: still the same track, and its old OOD frame still counts
    m = AlertMonitor(AlertConfig(k=2, n=3))
    alerts = run(m, [frame(MID), NONE, frame(MID)])
    assert levels(alerts) == [CLEAR, CLEAR, CAUTION] and "track #1" in alerts[-1].reason


def test_backend_error_frames_hold_caution_and_do_not_advance_clearing():
    cfg = AlertConfig(k=1, n=1, hold_s=0.0, clear_s=1.0)
    m = AlertMonitor(cfg)
    assert m.update(0.0, OOD, W, H).level == CAUTION
    failed = frame(SMALL, BIG, ood=[False, False], status=[7, 7])
    failed.error = "encoder failed: simulated GPU failure"
    for t in np.arange(0.25, 2.01, DT):  # 2 s of failing backend: no evidence of "no OOD"
        a = m.update(t, failed, W, H)
        assert a.level == CAUTION and not a.changed and a.object_indices == []
        assert a.reason.endswith("(frame not scored: backend error: encoder failed: simulated GPU failure "
                                 "— level held)")
    assert m.n_unscored_frames == 8
    # scored again, nothing there: clear_s counts from the last scored frame, not from t=0
    got = [(t, m.update(t, NONE, W, H).level) for t in (2.25, 2.5, 2.75, 3.0)]
    assert got == [(2.25, CAUTION), (2.5, CAUTION), (2.75, CAUTION), (3.0, CLEAR)]


def test_unscored_frames_are_skipped_in_the_k_of_n_window():
    m = AlertMonitor(AlertConfig(k=2, n=2))
    notscored = frame(SMALL, status=[6])  # over the max_boxes cap: NOT_SCORED
    errored = frame(SMALL, ood=[False], status=[7])  # the pipeline marks every box of a failed batch
    errored.error = "fusion failed"
    alerts = run(m, [OOD, notscored, errored, OOD])
    assert levels(alerts) == [CLEAR, CLEAR, CLEAR, CAUTION]  # window of the object: [OOD, OOD]
    assert "none of the 1 boxes was scored" in alerts[1].reason and "level held" in alerts[2].reason
    # a frame without any box is evidence (nothing there), unlike a failed one
    m = AlertMonitor(AlertConfig(k=2, n=2))
    assert levels(run(m, [OOD, NONE, OOD])) == [CLEAR, CLEAR, CLEAR]


def test_partially_scored_frame_keeps_the_unscored_track():
    """A persistent object whose box falls over the max_boxes cap is not tracked in that frame (no
    verdict), but its track and caution stand: in a partial frame an unmatched track is unknown,
    neither OOD nor gone, and it does not age."""
    m = AlertMonitor(AlertConfig(k=2, n=2, hold_s=0.0, clear_s=0.0))
    run(m, [OOD, OOD])
    assert m.level == CAUTION
    partial = frame(SMALL, BIG, ood=[False, False], status=[6, 0])  # the OOD object is not scored
    for t in (0.5, 0.75, 1.0):  # longer than n frames: a complete frame would have expired it
        a = m.update(t, partial, W, H)
        assert a.level == CAUTION and a.object_indices == []  # its window is still [OOD, OOD]
        assert "track #1 (not in this frame)" in a.reason
    assert m.n_tracks == 2  # the OOD object and the scored BIG box, none for the unscored box
    assert m.update(1.25, NONE, W, H).level == CLEAR  # a complete frame, object gone: [OOD, not seen]


def test_takeover_only_from_a_persistent_object():
    cfg = AlertConfig(k=2, n=3, takeover_min_area_frac=0.05, takeover_min_bottom_frac=None)
    # a big OOD box appearing once, while a small object persists: CAUTION, never TAKE_OVER
    m = AlertMonitor(cfg)
    alerts = run(m, [OOD, frame(SMALL, BIG), OOD, OOD])
    assert levels(alerts) == [CLEAR, CAUTION, CAUTION, CAUTION]
    assert alerts[1].object_indices == [0]
    # big OOD boxes every frame at different places (never the same object): no alert at all
    m = AlertMonitor(cfg)
    bigs = [[0, 0, 200, 200], [220, 0, 420, 200], [440, 0, 640, 200], [0, 250, 200, 450]]
    assert set(levels(run(m, [frame(b) for b in bigs]))) == {CLEAR}
    # the same big object twice: TAKE_OVER naming it
    m = AlertMonitor(cfg)
    alerts = run(m, [frame(BIG), frame(shifted(BIG, dx=10))])
    assert levels(alerts) == [CLEAR, TAKE_OVER] and "track #1 (box 0" in alerts[-1].reason
    assert "area 13.0% >= 5.0%" in alerts[-1].reason


def test_takeover_rule_must_hold_for_the_persistent_object_itself():
    """Object A persists (small), object B is big but seen once per position: CAUTION only."""
    cfg = AlertConfig(k=2, n=3, takeover_min_area_frac=0.05, takeover_min_bottom_frac=None)
    m = AlertMonitor(cfg)
    frames = [frame(SMALL, [0, 250, 200, 450]), frame(SMALL, [420, 250, 620, 450])]
    assert levels(run(m, frames)) == [CLEAR, CAUTION]


def test_match_iou_validation():
    for bad in (0.0, -0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match="match_iou"):
            AlertConfig(match_iou=bad)


def test_box_count_mismatch_rejected():
    m = AlertMonitor()
    with pytest.raises(ValueError, match="boxes_xyxy"):
        m.update(0.0, {"is_ood": [True, False], "boxes_xyxy": [SMALL]}, W, H)
    with pytest.raises(ValueError, match="no boxes_xyxy"):
        m.update(0.25, {"is_ood": [True]}, W, H)


# --------------------------------------------------------------------------------- health


def test_health_frame_timeout_and_recovery():
    h = HealthMonitor(frame_timeout_s=1.0, latency_budget_ms=200.0)
    assert h.check(100.0) == [] and not h.degraded  # first check starts the clock
    r = h.check(101.5)
    assert [p.code for p in r] == [HealthCode.NO_FRAMES] and "no frame processed yet" in r[0].text and h.degraded
    h.frame(101.6, 50.0)
    assert h.check(102.0) == [] and not h.degraded
    assert h.check(102.6) == []  # exactly 1.0 s: not yet over the timeout
    r = h.check(102.7)
    assert h.codes == {HealthCode.NO_FRAMES} and "no frame processed for 1.10 s" in str(r[0])
    h.frame(102.8, 50.0)
    assert h.check(102.9) == []


def _result(status, error=None):
    return SimpleNamespace(status=np.asarray(status, np.uint8), error=error)


def test_health_not_scoring_until_a_frame_is_scored_again():
    h = HealthMonitor()
    h.frame(0.0, 10.0, _result([0, 0]))
    assert h.check(0.05) == []
    h.frame(0.1, 10.0, _result([7, 7], error="TensorRT engine failed to load"))
    r = h.check(0.15)
    assert [p.code for p in r] == [HealthCode.NOT_SCORING] and h.degraded
    assert r[0].text == "backend failing: backend error: TensorRT engine failed to load"
    h.frame(0.2, 10.0, _result([6, 6, 6]))  # every box over the cap, no error: still nothing scored
    assert [p.code for p in h.check(0.25)] == [HealthCode.NOT_SCORING]
    h.frame(0.3, 10.0, _result([0, 7], error="non-finite features for 1 of 2 boxes"))  # partly scored
    assert h.check(0.35) == [] and h.n_unscored_frames == 2
    h.frame(0.4, 10.0, _result([]))  # nothing to score: evidence, healthy
    h.frame(0.5, 10.0, None)
    assert h.check(0.55) == []


def test_one_definition_of_evidence_for_alerts_and_health():
    """The alert monitor holds its level exactly on the frames the health monitor calls not
    scoring, and on no other frame."""
    cases = [_result([0]), _result([7], "boom"), _result([6, 6]), _result([0, 7], "partial"), _result([]),
             _result([1, 5]), _result([6, 0]), None]
    for case in cases:
        h = HealthMonitor()
        h.frame(0.0, 1.0, case)
        unhealthy = HealthCode.NOT_SCORING in {p.code for p in h.check(0.0)}
        m = AlertMonitor(AlertConfig(k=1, n=1))
        fr = None if case is None else SimpleNamespace(
            status=case.status, error=case.error, is_ood=np.ones(len(case.status), bool),
            boxes_xyxy=np.tile(np.asarray(SMALL, np.float32), (len(case.status), 1)))
        m.update(0.0, fr, W, H)
        assert (m.n_unscored_frames == 1) == unhealthy, case


def test_health_latency_budget_trips_and_recovers():
    h = HealthMonitor(frame_timeout_s=10.0, latency_budget_ms=200.0, latency_window=20, min_latency_samples=5)
    t = 0.0
    for _ in range(4):  # too few samples for a verdict, even if slow
        t += 0.1
        h.frame(t, 500.0)
    assert h.check(t) == []
    for _ in range(16):
        t += 0.1
        h.frame(t, 100.0)
    # 20 samples: 4 x 500 ms, 16 x 100 ms -> p95 interpolates between 500 and 500 -> over budget
    assert h.latency_p95_ms() == pytest.approx(np.percentile([500.0] * 4 + [100.0] * 16, 95))
    r = h.check(t)
    assert [p.code for p in r] == [HealthCode.LATENCY] and "latency p95 500.0 ms over budget 200.0" in r[0].text
    for _ in range(20):  # slow frames leave the window
        t += 0.1
        h.frame(t, 100.0)
    assert h.check(t) == [] and h.latency_p95_ms() == pytest.approx(100.0)


def test_health_one_slow_frame_in_window_is_tolerated():
    h = HealthMonitor(frame_timeout_s=10.0, latency_budget_ms=200.0, latency_window=50)
    for i in range(50):
        h.frame(i * 0.1, 1000.0 if i == 10 else 80.0)
    assert h.check(5.0) == []


def test_partly_failed_frames_are_still_evidence_for_their_scored_boxes():
    """One crop with NaN features (error set, that box BACKEND_ERROR) must not hide the OOD object
    scored beside it: the alert still rises."""
    from types import SimpleNamespace

    mon = AlertMonitor(AlertConfig(k=2, n=3, takeover_min_area_frac=None, takeover_min_bottom_frac=None))
    levels = []
    for t in range(4):
        fr = SimpleNamespace(is_ood=np.array([True, False]), status=np.array([0, 7], np.uint8),
                             boxes_xyxy=np.array([[10, 10, 50, 50], [100, 100, 140, 140]], np.float32),
                             uncertainty=np.array([0.3, np.nan], np.float32), label=["car", ""],
                             error="non-finite features for 1 of 2 boxes")
        levels.append(int(mon.update(float(t), fr, 640, 480).level))
    assert levels[-1] == int(AlertLevel.CAUTION) and mon.n_unscored_frames == 0


# ------------------------------------------------------------------- stamp jumps, heavy frames


def test_stamps_jumping_back_reset_the_history_and_report_the_drop():
    """A looped bag: the alert history of the first pass must not decide the second one. The reset
    lives in the monitor (it holds the stamp); a raised level going back to CLEAR is a change."""
    m = AlertMonitor(AlertConfig(k=2, n=3, hold_s=0.0, clear_s=0.0, jump_back_reset_s=2.0))
    assert levels(run(m, [OOD, OOD], t0=100.0)) == [CLEAR, CAUTION]
    small_step = m.update(99.0, OOD, W, H)  # 1.25 s back: an ordinary late frame, ignored
    assert small_step.level == CAUTION and "ignored" in small_step.reason and m.n_out_of_order == 1
    a = m.update(10.0, NONE, W, H)  # 90 s back: another pass of the bag
    assert a.level == CLEAR and a.changed and "alert history reset" in a.reason and m.n_jump_resets == 1
    assert m.n_tracks == 0 and m.n_out_of_order == 1  # counters survive the reset
    assert levels(run(m, [OOD, OOD], t0=10.25)) == [CLEAR, CAUTION]  # the new pass raises on its own
    # without jump_back_reset_s such frames are only ignored (the level stays)
    m = AlertMonitor(AlertConfig(k=2, n=3))
    run(m, [OOD, OOD], t0=100.0)
    assert m.update(10.0, NONE, W, H).level == CAUTION and m.n_out_of_order == 1 and m.n_jump_resets == 0


def test_not_scored_boxes_are_never_tracked():
    """1,000 boxes of which 50 were scored (the node's max_boxes cap): only the 50 are tracked."""
    rng = np.random.default_rng(0)
    xy = rng.uniform((0, 0), (W - 40, H - 40), (1000, 2))
    boxes = np.concatenate([xy, xy + 30.0], 1)
    status = np.full(1000, 6, np.uint8)
    status[:50] = 0
    m = AlertMonitor(AlertConfig(k=2, n=3))
    m.update(0.0, frame(*boxes, status=status), W, H)
    assert m.n_tracks <= 50 and m.last_work["boxes_tracked"] == 50


def test_heavy_frame_work_is_bounded_and_does_not_burden_the_next_frame():
    """A 1,000-box frame (all scored, e.g. max_boxes=0) then a normal 3-box frame: the tracker
    tracks at most max_tracked_boxes boxes of the heavy frame (OOD ones first; the rest counted), so
    the IoU work of both frames is bounded by the cap, not by the box count."""
    rng = np.random.default_rng(1)
    xy = rng.uniform((0, 0), (W - 40, H - 40), (1000, 2))
    heavy = np.concatenate([xy, xy + rng.uniform(5, 40, (1000, 2))], 1)
    ood = np.zeros(1000, bool)
    ood[[3, 500, 999]] = True
    cap = 64
    m = AlertMonitor(AlertConfig(k=2, n=3, max_tracked_boxes=cap, takeover_min_area_frac=None,
                                 takeover_min_bottom_frac=None))
    m.update(0.0, frame(*heavy, ood=ood), W, H)
    m.update(0.25, frame(*heavy, ood=ood), W, H)  # the same boxes again: matched against <= cap tracks
    w = m.last_work
    assert w["boxes_tracked"] == cap and w["boxes_untracked"] == 1000 - cap
    assert w["iou_pairs"] <= cap * cap and m.n_tracks <= cap
    assert m.n_track_cap_frames == 2 and m.n_boxes_untracked == 2 * (1000 - cap)
    assert m.level == CAUTION  # the three OOD boxes were tracked first: persistent, raised
    a = m.update(0.5, frame(heavy[3], heavy[500], heavy[999]), W, H)
    assert m.last_work["boxes_tracked"] == 3 and m.last_work["iou_pairs"] <= 3 * cap
    assert a.level == CAUTION and a.object_indices == [0, 1, 2]


def _greedy_reference(iou, thr):
    """The specification: pairs in order (-IoU, row, column), each taken when both are free."""
    order = sorted((-iou[a, b], a, b) for a, b in np.argwhere(iou >= thr))
    rows, cols, pairs = set(), set(), set()
    for _, a, b in order:
        if a not in rows and b not in cols:
            rows.add(a)
            cols.add(b)
            pairs.add((int(a), int(b)))
    return pairs


def test_vectorised_matching_equals_sorted_greedy():
    from runa_ood_node.core.alerts import _greedy_match

    rng = np.random.default_rng(2)
    for trial in range(300):
        p, c = rng.integers(0, 12, 2)
        iou = rng.choice([0.0, 0.2, 0.3, 0.5, 0.7, 1.0], size=(p, c)) if trial % 2 else rng.uniform(0, 1, (p, c))
        rows, cols, _ = _greedy_match(iou, 0.3)
        assert set(zip(rows.tolist(), cols.tolist())) == _greedy_reference(iou, 0.3), (trial, iou)
