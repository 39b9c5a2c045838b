"""core.vehicle: one driver alert and one monitor health over the cameras (no rclpy)."""
import enum
from types import SimpleNamespace

import pytest

from runa_ood_node.core.vehicle import VehicleAlert, VehicleHealth

pytestmark = pytest.mark.unit


class Monitor:
    def __init__(self):
        self.level = 0


def _alert(level, reason="", objects=(), changed=True):
    return SimpleNamespace(level=level, reason=reason, object_indices=list(objects), changed=changed)


def _rig(names=("front", "left", "right")):
    mons = {n: Monitor() for n in names}
    return mons, VehicleAlert(mons, multi=True)


def _see(mons, va, cam, level, reason, objects=()):
    mons[cam].level = level
    return va.update(cam, _alert(level, reason, objects))


def test_single_stream_passes_its_alert_through_when_it_changes():
    va = VehicleAlert({"": Monitor()}, multi=False)
    assert va.update("", _alert(1, "CAUTION: x", [3], changed=False)) is None
    ch = va.update("", _alert(2, "WARNING: x", [0, 2]))
    assert (ch.level, ch.reason, list(ch.object_indices), ch.of_frame) == (2, "WARNING: x", [0, 2], True)


def test_highest_camera_level_named_with_the_cameras_reasons():
    mons, va = _rig()
    ch = _see(mons, va, "left", 1, "CAUTION: thing", [4])
    assert ch.level == 1 and ch.of_frame and ch.object_indices == [4]
    assert ch.reason == "CAUTION: OOD object ahead (left): left: CAUTION: thing"
    assert va.level == 1
    assert _see(mons, va, "left", 1, "CAUTION: thing again", [4]) is None  # same level, same cameras
    ch = _see(mons, va, "front", 1, "CAUTION: other", [0])
    assert ch.reason == "CAUTION: OOD object ahead (front, left): front: CAUTION: other; left: CAUTION: thing again"
    ch = _see(mons, va, "right", 2, "WARNING: big", [1, 2])
    assert ch.level == 2 and ch.reason == "TAKE_OVER: OOD object ahead (right): right: WARNING: big"
    assert ch.object_indices == [1, 2]


def test_a_camera_going_down_while_others_hold_the_level_carries_no_objects():
    mons, va = _rig()
    _see(mons, va, "left", 2, "WARNING: a", [0])
    _see(mons, va, "front", 2, "WARNING: b", [1])
    ch = _see(mons, va, "front", 0, "CLEAR", [])
    assert ch.level == 2 and not ch.of_frame and ch.object_indices == []  # left still holds it
    assert ch.reason == "TAKE_OVER: OOD object ahead (left): left: WARNING: a"
    ch = _see(mons, va, "left", 0, "CLEAR: gone")
    assert ch.level == 0 and ch.of_frame and ch.object_indices == []
    assert ch.reason == "CLEAR: no OOD object on any camera (left: CLEAR: gone)"
    va.reset()
    assert va.level == 0 and va.key == (0, ())


class Code(enum.Enum):
    NO_FRAMES = "no_frames"
    SLOW = "slow"


def _p(code, text):
    return SimpleNamespace(code=code, text=text)


def test_health_publishes_when_the_kind_of_problem_changes():
    vh = VehicleHealth(multi=True)
    ch = vh.check([("front", []), ("left", [])])
    assert not ch.publish and ch.refresh is None  # healthy from the start: nothing to say
    ch = vh.check([("front", [_p(Code.NO_FRAMES, "no frame for 1.0 s")]), ("left", [])])
    assert ch.publish and ch.level == 1 and ch.log == ch.reason
    assert ch.reason == "CAUTION: OOD monitor degraded (front): front: no frame for 1.0 s"
    ch = vh.check([("front", [_p(Code.NO_FRAMES, "no frame for 40.0 s")]), ("left", [])])
    assert not ch.publish and ch.refresh == "CAUTION: OOD monitor degraded (front): front: no frame for 40.0 s"
    ch = vh.check([("front", [_p(Code.NO_FRAMES, "x")]), ("left", [_p(Code.SLOW, "p95 300 ms")])])
    assert ch.publish and "(front, left)" in ch.reason and "left: p95 300 ms" in ch.reason
    ch = vh.check([("front", []), ("left", [])])
    assert ch.publish and ch.level == 0 and ch.reason == "CLEAR: OOD monitor healthy"
    assert ch.log == "OOD monitor healthy again"
    assert not vh.check([("front", []), ("left", [])]).publish
    vh.reset()
    assert vh.key is None


def test_health_of_one_stream_does_not_name_it():
    vh = VehicleHealth(multi=False)
    ch = vh.check([("", [_p(Code.SLOW, "p95 300 ms"), _p(Code.NO_FRAMES, "no frame")])])
    assert ch.reason == "CAUTION: OOD monitor degraded: p95 300 ms; no frame"
