"""The vehicle's view over its cameras (ROS-free): one driver alert and one monitor health.

With several cameras the node keeps an :class:`.alerts.AlertMonitor` and a
:class:`.health.HealthMonitor` per camera, but ``ood/driver_alert`` and ``ood/monitor_health`` stay
single, vehicle-level:

* :class:`VehicleAlert`: the level is the highest camera level; the alert changes when that level
  or the set of cameras at it changes, and its reason names them (with each one's own reason). The
  OOD objects of the frame that caused the change are embedded when its camera is one of them.
  With one stream the camera's own alert goes out whenever its level changes.
* :class:`VehicleHealth`: degraded when any camera is, saying which and why; a message goes out
  when the *kind* of problem changes (the cameras and their problem codes), while in between only
  the figures in its reason are refreshed (the heartbeat re-publishes them).
"""
from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple

from .registry import AlertLevel


@dataclass(frozen=True)
class AlertChange:
    """A new vehicle-level driver alert: ``level``, ``reason``, the indices of this frame's boxes
    behind it (``object_indices``), and ``of_frame``: whether it is about the frame just seen (its
    header and detections go into the message) or about another camera's state (no objects)."""

    level: int
    reason: str
    object_indices: Any = ()
    of_frame: bool = True


class VehicleAlert:
    """``ood/driver_alert`` over the cameras' alert monitors (see the module docstring).

    Args:
        monitors: camera name -> its alert monitor (anything with a ``level``), in camera order.
        multi: several cameras (False: the single stream's alert passes through when it changes).

    :meth:`update` is thread-safe; hold :attr:`lock` (re-entrant) around it and the publishing of
    its answer so that the alerts go out in the order they were decided."""

    def __init__(self, monitors: Mapping[str, Any], multi: bool = True):
        self.monitors = dict(monitors)
        self.multi = bool(multi)
        self.lock = threading.RLock()
        self.reset()

    def reset(self) -> None:
        """CLEAR, no camera named (what the node publishes at activation)."""
        with self.lock:
            self.key: Tuple[int, Tuple[str, ...]] = (0, ())
            self.reasons: Dict[str, str] = {name: "" for name in self.monitors}

    @property
    def level(self) -> int:
        """The vehicle level last decided."""
        return self.key[0]

    def update(self, camera: str, alert) -> Optional[AlertChange]:
        """Camera ``camera``'s monitor just gave ``alert`` (a core ``Alert``: ``level``, ``reason``,
        ``object_indices``, ``changed``) for a frame: the vehicle's new alert, or None when it
        stays as it was."""
        if not self.multi:
            if not alert.changed:
                return None
            return AlertChange(int(alert.level), alert.reason, alert.object_indices, True)
        with self.lock:
            self.reasons[camera] = str(alert.reason or "")
            levels = {name: int(m.level) for name, m in self.monitors.items()}
            top = max(levels.values())
            named = [name for name, lvl in levels.items() if top and lvl == top]
            key = (top, tuple(named))
            if key == self.key:
                return None
            self.key = key
            lvl = AlertLevel(top).name
            if top:
                reason = (f"{lvl}: OOD object ahead ({', '.join(named)}): "
                          + "; ".join(f"{name}: {self.reasons[name]}" for name in named))
            else:
                reason = f"CLEAR: no OOD object on any camera ({camera}: {self.reasons[camera]})"
            if camera in named or not top:
                return AlertChange(top, reason, list(alert.object_indices) if camera in named else [], True)
            # this camera went down while others hold the level: no objects of this frame in it
            return AlertChange(top, reason, [], False)


@dataclass(frozen=True)
class HealthChange:
    """What :meth:`VehicleHealth.check` decided: ``publish`` a new ``level`` (1 = CAUTION, 0 =
    CLEAR) with ``reason`` (``log`` says it in the node's log), or only ``refresh`` the reason of
    the message last published (its figures now; None: leave it)."""

    publish: bool = False
    level: int = 0
    reason: str = ""
    log: str = ""
    refresh: Optional[str] = None


class VehicleHealth:
    """``ood/monitor_health`` over the cameras' health monitors (see the module docstring).

    Args:
        multi: several cameras (the reason then names each degraded camera)."""

    def __init__(self, multi: bool = False):
        self.multi = bool(multi)
        self.reset()

    def reset(self) -> None:
        """Nothing published yet since activation (a first healthy check publishes nothing)."""
        self.key: Optional[Tuple] = None

    def check(self, problems: Sequence[Tuple[str, Sequence[Any]]]) -> HealthChange:
        """``problems``: per camera ``(name, its health problems now)`` (``code`` and ``text`` each)."""
        per = [(name, probs) for name, probs in problems if probs]
        key = tuple((name, tuple(sorted(p.code.value for p in probs))) for name, probs in per)
        text = ""
        if per:
            if self.multi:
                text = (f"CAUTION: OOD monitor degraded ({', '.join(name for name, _ in per)}): "
                        + "; ".join(f"{name}: " + "; ".join(p.text for p in probs) for name, probs in per))
            else:
                text = "CAUTION: OOD monitor degraded: " + "; ".join(p.text for _, probs in per for p in probs)
        if key == self.key:  # current figures: a 40 s silence reads 40 s, not the 1.02 s of the transition
            return HealthChange(refresh=text if per else None)
        first = self.key is None
        self.key = key
        if per:
            return HealthChange(True, 1, text, text)
        if not first:
            return HealthChange(True, 0, "CLEAR: OOD monitor healthy", "OOD monitor healthy again")
        return HealthChange()


__all__ = ["AlertChange", "VehicleAlert", "HealthChange", "VehicleHealth"]
