"""Is the OOD monitor delivering? One definition of "this frame is evidence", and pipeline health.

No ROS, numpy only. Two pieces of policy live here so that the node only converts, queues and
publishes:

* :func:`unscored_reason` — **the** definition of a frame that is *no evidence* about OOD objects:
  nothing in it was scored although there was something to score (the backend failed, or every
  valid box was ``BACKEND_ERROR`` / ``NOT_SCORED``). ``AlertMonitor`` holds the alert level on such
  a frame (it must never look like "no OOD object"), and ``HealthMonitor`` reports it as a
  backend failure. A frame in which *some* boxes were scored is evidence, and so is a frame
  without boxes ("nothing there").
* :class:`HealthMonitor` — wall-clock health of the pipeline, reported as coded problems
  (:class:`HealthCode`): no frame for ``frame_timeout_s``, frames not scored (backend failing),
  and the p95 of the whole per-frame processing time over ``latency_budget_ms``. Callers compare
  codes, never the text (the text carries changing numbers).
"""
from __future__ import annotations

import enum
import math
from collections import deque
from dataclasses import dataclass
from typing import List, Optional

from .boxes import BoxStatus
from .metrics import percentile

__all__ = ["HealthCode", "HealthProblem", "HealthMonitor", "unscored_reason", "UNSCORED_STATUSES"]

#: valid boxes the backend did not score (over the ``max_boxes`` cap, or the backend failed)
UNSCORED_STATUSES = (int(BoxStatus.NOT_SCORED), int(BoxStatus.BACKEND_ERROR))
_MAX_ERROR_CHARS = 160  # backend error text quoted in a reason


def _get(frame, name, default=None):
    if frame is None:
        return default
    if isinstance(frame, dict):
        return frame.get(name, default)
    return getattr(frame, name, default)


def _finite_number(value, name: str, lo: float = 0.0, hi: float = math.inf) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number, got {value!r}") from None
    if not (math.isfinite(v) and lo <= v <= hi):
        raise ValueError(f"{name} must be in [{lo}, {hi}], got {value!r}")
    return v


def unscored_reason(frame_result) -> Optional[str]:
    """Why this frame is **no evidence** about OOD objects; ``None`` when it is evidence.

    ``frame_result`` is duck-typed (``core.pipeline.FrameResult``, any object or mapping with
    ``status`` [N] BoxStatus codes and optionally ``error``; ``None`` = a frame without boxes).

    * some box ``OK`` (scored)                          -> evidence (``None``), even if ``error`` is set
      for other boxes: the scored boxes may be the OOD object the driver must hear about;
    * no box scored and ``error`` set                   -> ``"backend error: <error>"``;
    * boxes present, all ``NOT_SCORED``/``BACKEND_ERROR`` -> ``"none of the N boxes was scored ..."``;
    * otherwise (no boxes, or only invalid boxes such as NaN / outside the image) -> evidence.
    """
    status = _get(frame_result, "status")
    status = [] if status is None else [int(s) for s in status]
    if any(s == BoxStatus.OK for s in status):
        return None
    err = _get(frame_result, "error")
    if err:
        err = str(err)
        msg = err if len(err) <= _MAX_ERROR_CHARS else err[: _MAX_ERROR_CHARS - 3] + "..."
        return f"backend error: {msg}"
    if status and all(s in UNSCORED_STATUSES for s in status):
        return f"none of the {len(status)} boxes was scored (BACKEND_ERROR / NOT_SCORED)"
    return None


class HealthCode(enum.Enum):
    """The kind of a health problem (what the node keys its messages on)."""

    NO_FRAMES = "no_frames"  # no frame processed for frame_timeout_s (or none yet)
    NOT_SCORING = "not_scoring"  # the last frame was no evidence: backend failing / nothing scored
    LATENCY = "latency"  # p95 of the per-frame processing time over budget


@dataclass(frozen=True)
class HealthProblem:
    """One problem reported by :meth:`HealthMonitor.check`: a code and a human-readable text."""

    code: HealthCode
    text: str

    def __str__(self) -> str:
        return self.text


class HealthMonitor:
    """Is the OOD pipeline delivering? Wall-clock based (a stalled pipeline has no stamps).

    Args:
        frame_timeout_s: report ``NO_FRAMES`` when no frame was processed for this long (s).
        latency_budget_ms: report ``LATENCY`` when the p95 of the last ``latency_window`` per-frame
            processing times (ms: everything the node does for a frame, from the pair being formed
            to its last output) exceeds this.
        latency_window: number of recent frames in the latency percentile.
        min_latency_samples: no latency verdict before this many frames (avoid a verdict on one
            slow first frame, e.g. a warm-up).

    Call :meth:`frame` for every processed frame (with its result: a frame that is no evidence,
    see :func:`unscored_reason`, is reported as ``NOT_SCORING`` until a frame is scored again) and
    :meth:`check` periodically.
    """

    def __init__(self, frame_timeout_s: float = 1.0, latency_budget_ms: float = 200.0,
                 latency_window: int = 50, min_latency_samples: int = 5):
        self.frame_timeout_s = _finite_number(frame_timeout_s, "frame_timeout_s")
        self.latency_budget_ms = _finite_number(latency_budget_ms, "latency_budget_ms")
        if int(latency_window) < 1:
            raise ValueError(f"latency_window must be >= 1, got {latency_window!r}")
        self.min_latency_samples = max(1, int(min_latency_samples))
        self._lat: deque = deque(maxlen=int(latency_window))
        self._last_frame_s: Optional[float] = None
        self._first_check_s: Optional[float] = None
        self._not_scoring: Optional[str] = None
        self.n_frames = 0
        self.n_unscored_frames = 0
        self._problems: List[HealthProblem] = []

    def frame(self, stamp_wall_s: float, latency_ms: float, frame_result=None) -> None:
        """Record a processed frame at wall time ``stamp_wall_s`` (s) that took ``latency_ms``.

        ``frame_result`` (optional, duck-typed as in :func:`unscored_reason`): a frame that is no
        evidence keeps ``NOT_SCORING`` raised; a scored (or empty) frame clears it."""
        self._last_frame_s = float(stamp_wall_s)
        lat = float(latency_ms)
        if math.isfinite(lat):
            self._lat.append(lat)
        self.n_frames += 1
        why = unscored_reason(frame_result)
        if why is None:
            self._not_scoring = None
        else:
            self._not_scoring = why
            self.n_unscored_frames += 1

    def latency_p95_ms(self) -> float:
        """p95 of the recent per-frame processing times (ms), NaN without samples."""
        return percentile(self._lat, 95.0)

    def check(self, now_wall_s: float) -> List[HealthProblem]:
        """Problems at wall time ``now_wall_s`` (s); empty when healthy."""
        now = float(now_wall_s)
        if self._first_check_s is None:
            self._first_check_s = now
        problems = []
        ref = self._last_frame_s if self._last_frame_s is not None else self._first_check_s
        silent = now - ref
        if silent > self.frame_timeout_s:
            what = "no frame processed" if self._last_frame_s is not None else "no frame processed yet"
            problems.append(HealthProblem(HealthCode.NO_FRAMES,
                                          f"{what} for {silent:.2f} s (timeout {self.frame_timeout_s:.2f} s)"))
        if self._not_scoring is not None:
            problems.append(HealthProblem(HealthCode.NOT_SCORING, f"backend failing: {self._not_scoring}"))
        if len(self._lat) >= self.min_latency_samples:
            p95 = self.latency_p95_ms()
            if p95 > self.latency_budget_ms:
                problems.append(HealthProblem(
                    HealthCode.LATENCY, f"latency p95 {p95:.1f} ms over budget {self.latency_budget_ms:.1f} ms "
                                        f"(last {len(self._lat)} frames)"))
        self._problems = problems
        return list(problems)

    @property
    def degraded(self) -> bool:
        """True when the last :meth:`check` found problems."""
        return bool(self._problems)

    @property
    def problems(self) -> List[HealthProblem]:
        """The problems found by the last :meth:`check`."""
        return list(self._problems)

    @property
    def codes(self) -> frozenset:
        """The codes of the last :meth:`check` (what changes when the *kind* of problem changes)."""
        return frozenset(p.code for p in self._problems)
