"""Driver alerts from per-frame OOD results, and pipeline health (pure Python, no ROS).

``AlertMonitor`` turns the stream of per-frame results into a debounced alert level:

* **CAUTION** when an OOD box is present in at least ``k`` of the last ``n`` frames;
* **TAKE_OVER** when, in addition, the *take-over rule* holds in at least ``takeover_k``
  (default ``k``) of the last ``n`` frames. The rule holds in a frame when any OOD box
  - covers at least ``takeover_min_area_frac`` of the image area, or
  - has its bottom edge at or below ``takeover_min_bottom_frac`` of the image height
    (image y grows downwards, so a low bottom edge means close to the ego vehicle), or
  - has its centre inside ``roi`` (normalised image coordinates, 0..1: a rectangle
    ``[x1, y1, x2, y2]`` or a polygon ``[[x, y], ...]``, e.g. the ego lane).
* A raised level is **held** for at least ``hold_s`` seconds after the raise, and a level is only
  left after its condition (the k-of-n rule above, not a single frame) has been absent for
  ``clear_s`` seconds; from TAKE_OVER it steps down to CAUTION if CAUTION's condition was seen
  within ``clear_s``. Raising is immediate. Together this suppresses flicker.

Times are **message stamps in seconds** (``header.stamp`` of the image), never wall-clock time, so
a bag replay gives the same alerts at any speed. Frames with a stamp not later than the last one
are ignored and counted (``n_out_of_order``). Durations are compared with a 1 us tolerance
(stamps are floats built from sec + nanosec). The k-of-n window counts frames, not seconds: if
frames stop arriving the alert stays where it is, which is what ``HealthMonitor`` reports.

The frame result is duck-typed (``core.pipeline.FrameResult`` or anything with the same fields,
attributes or mapping keys): ``is_ood`` [N] bool, ``status`` [N] (``core.boxes.BoxStatus``, only
``OK == 0`` boxes count; optional), ``boxes_xyxy`` [N, 4] pixels, and optionally ``uncertainty``
and ``label`` used in the reason text. ``None`` means a frame without boxes.

``HealthMonitor`` reports a degraded pipeline: no frame for ``frame_timeout_s`` (wall time), a
failing backend, or the p95 of recent end-to-end latencies over ``latency_budget_ms``.
"""
from __future__ import annotations

import enum
import math
from collections import deque
from dataclasses import dataclass, field
from typing import List, Optional, Sequence, Tuple

__all__ = ["AlertLevel", "AlertConfig", "Alert", "AlertMonitor", "HealthMonitor"]

_STATUS_OK = 0  # core.boxes.BoxStatus.OK (not imported: this module stays dependency-free)
_TIME_TOL_S = 1e-6  # stamps are sec + nanosec * 1e-9 floats: compare durations to within 1 us


class AlertLevel(enum.IntEnum):
    """Driver alert level; ordered, higher is more severe."""

    CLEAR = 0
    CAUTION = 1
    TAKE_OVER = 2


def _finite_number(value, name: str, lo: float = 0.0, hi: float = math.inf) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number, got {value!r}") from None
    if not (math.isfinite(v) and lo <= v <= hi):
        raise ValueError(f"{name} must be in [{lo}, {hi}], got {value!r}")
    return v


def _parse_roi(roi) -> Optional[List[Tuple[float, float]]]:
    """ROI as a polygon (list of (x, y) in 0..1); a rectangle becomes its four corners."""
    if roi is None:
        return None
    pts = list(roi)
    if len(pts) == 4 and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in pts):
        x1, y1, x2, y2 = (float(v) for v in pts)
        if not (x2 > x1 and y2 > y1):
            raise ValueError(f"roi rectangle must be [x1, y1, x2, y2] with x2 > x1 and y2 > y1, got {roi!r}")
        pts = [(x1, y1), (x2, y1), (x2, y2), (x1, y2)]
    else:
        try:
            ok = all(len(p) == 2 for p in pts)
            pts = [(float(p[0]), float(p[1])) for p in pts] if ok else []
        except (TypeError, ValueError):
            pts = []
        if len(pts) < 3:
            raise ValueError(
                "roi must be None, a rectangle [x1, y1, x2, y2] or a polygon [[x, y], ...] with >= 3 points, "
                f"got {roi!r}"
            )
    for x, y in pts:
        if not (0.0 <= x <= 1.0 and 0.0 <= y <= 1.0):
            raise ValueError(f"roi coordinates are normalised to the image and must be in [0, 1], got {roi!r}")
    return pts


def _point_in_polygon(x: float, y: float, poly: Sequence[Tuple[float, float]]) -> bool:
    """Even-odd rule; points on an edge count as inside."""
    inside = False
    n = len(poly)
    for i in range(n):
        x1, y1 = poly[i]
        x2, y2 = poly[(i + 1) % n]
        # on the edge?
        cross = (x2 - x1) * (y - y1) - (y2 - y1) * (x - x1)
        on_segment = min(x1, x2) - 1e-12 <= x <= max(x1, x2) + 1e-12 and min(y1, y2) - 1e-12 <= y <= max(y1, y2) + 1e-12
        if abs(cross) < 1e-12 and on_segment:
            return True
        if (y1 > y) != (y2 > y):
            x_at = x1 + (y - y1) * (x2 - x1) / (y2 - y1)
            if x < x_at:
                inside = not inside
    return inside


@dataclass
class AlertConfig:
    """Parameters of :class:`AlertMonitor` (see the module docstring for the rules).

    Attributes:
        k, n: CAUTION when OOD is present in >= k of the last n frames (1 <= k <= n).
        hold_s: minimum time (s, message stamps) a raised level is kept.
        clear_s: time (s) the condition of the current level must be absent before lowering it.
        takeover_min_area_frac: box area / image area that triggers take-over (0..1; None disables).
        takeover_min_bottom_frac: box bottom edge y2 / image height that triggers take-over
            (0..1; None disables).
        roi: None, rectangle ``[x1, y1, x2, y2]`` or polygon ``[[x, y], ...]``, normalised 0..1;
            an OOD box whose centre is inside triggers take-over.
        takeover_k: frames (of the last n) in which the take-over rule must hold; None -> k.
    """

    k: int = 3
    n: int = 5
    hold_s: float = 1.0
    clear_s: float = 2.0
    takeover_min_area_frac: Optional[float] = 0.05
    takeover_min_bottom_frac: Optional[float] = 0.8
    roi: Optional[Sequence] = None
    takeover_k: Optional[int] = None
    _roi_poly: Optional[List[Tuple[float, float]]] = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self):
        if int(self.n) != self.n or int(self.n) < 1:
            raise ValueError(f"n must be an integer >= 1, got {self.n!r}")
        self.n = int(self.n)
        if int(self.k) != self.k or not 1 <= int(self.k) <= self.n:
            raise ValueError(f"k must be an integer with 1 <= k <= n={self.n}, got {self.k!r}")
        self.k = int(self.k)
        if self.takeover_k is not None:
            if int(self.takeover_k) != self.takeover_k or not 1 <= int(self.takeover_k) <= self.n:
                raise ValueError(
                    f"takeover_k must be None or an integer with 1 <= takeover_k <= n={self.n}, got {self.takeover_k!r}"
                )
            self.takeover_k = int(self.takeover_k)
        self.hold_s = _finite_number(self.hold_s, "hold_s")
        self.clear_s = _finite_number(self.clear_s, "clear_s")
        if self.takeover_min_area_frac is not None:
            self.takeover_min_area_frac = _finite_number(
                self.takeover_min_area_frac, "takeover_min_area_frac", 0.0, 1.0)
        if self.takeover_min_bottom_frac is not None:
            self.takeover_min_bottom_frac = _finite_number(
                self.takeover_min_bottom_frac, "takeover_min_bottom_frac", 0.0, 1.0)
        self._roi_poly = _parse_roi(self.roi)

    @property
    def effective_takeover_k(self) -> int:
        return self.k if self.takeover_k is None else self.takeover_k


@dataclass
class Alert:
    """Output of :meth:`AlertMonitor.update`.

    Attributes:
        level: the (debounced) alert level after this frame.
        reason: human-readable explanation (for logs, diagnostics and the HMI).
        object_indices: indices into this frame's boxes that justify the level (the take-over
            boxes for TAKE_OVER, the OOD boxes for CAUTION); may be empty while a level is held.
        changed: True when ``level`` differs from the level before this frame.
    """

    level: AlertLevel
    reason: str
    object_indices: List[int] = field(default_factory=list)
    changed: bool = False


def _get(frame, name, default=None):
    if frame is None:
        return default
    if isinstance(frame, dict):
        return frame.get(name, default)
    return getattr(frame, name, default)


class AlertMonitor:
    """Debounced CAUTION / TAKE_OVER alerts from a stream of frame results (see module docstring)."""

    def __init__(self, config: Optional[AlertConfig] = None):
        self.config = config if config is not None else AlertConfig()
        self.reset()

    def reset(self) -> None:
        """Forget all history (level back to CLEAR)."""
        self._hist: deque = deque(maxlen=self.config.n)  # (ood_present, takeover_present) per frame
        self._level = AlertLevel.CLEAR
        self._raised_s: Optional[float] = None
        self._last_seen = {AlertLevel.CAUTION: -math.inf, AlertLevel.TAKE_OVER: -math.inf}
        self._last_stamp: Optional[float] = None
        self.n_frames = 0
        self.n_out_of_order = 0

    @property
    def level(self) -> AlertLevel:
        return self._level

    # -------------------------------------------------------------------------------- per frame
    def _ood_indices(self, frame) -> List[int]:
        is_ood = _get(frame, "is_ood")
        if is_ood is None:
            return []
        status = _get(frame, "status")
        is_ood = list(is_ood)
        if status is not None:
            status = list(status)
            if len(status) != len(is_ood):
                raise ValueError(f"frame result has {len(is_ood)} is_ood flags but {len(status)} status codes")
        return [i for i, f in enumerate(is_ood) if bool(f) and (status is None or int(status[i]) == _STATUS_OK)]

    def _takeover_boxes(self, frame, ood_idx, width, height) -> List[Tuple[int, str]]:
        """(index, why) of OOD boxes that satisfy the take-over rule in this frame."""
        if not ood_idx:
            return []
        boxes = _get(frame, "boxes_xyxy")
        if boxes is None:
            raise ValueError("frame result has OOD boxes but no boxes_xyxy")
        cfg = self.config
        out = []
        for i in ood_idx:
            x1, y1, x2, y2 = (float(v) for v in boxes[i])
            if not all(math.isfinite(v) for v in (x1, y1, x2, y2)):
                continue
            why = []
            area = max(0.0, x2 - x1) * max(0.0, y2 - y1) / (width * height)
            if cfg.takeover_min_area_frac is not None and area >= cfg.takeover_min_area_frac:
                why.append(f"area {100 * area:.1f}% >= {100 * cfg.takeover_min_area_frac:.1f}%")
            bottom = y2 / height
            if cfg.takeover_min_bottom_frac is not None and bottom >= cfg.takeover_min_bottom_frac:
                why.append(f"bottom at {100 * bottom:.0f}% of height >= {100 * cfg.takeover_min_bottom_frac:.0f}%")
            if cfg._roi_poly is not None:
                cx, cy = (x1 + x2) / 2.0 / width, (y1 + y2) / 2.0 / height
                if _point_in_polygon(cx, cy, cfg._roi_poly):
                    why.append("centre in ROI")
            if why:
                out.append((i, ", ".join(why)))
        return out

    @staticmethod
    def _describe(frame, i) -> str:
        labels = _get(frame, "label")
        unc = _get(frame, "uncertainty")
        parts = [f"box {i}"]
        try:
            if labels is not None and labels[i]:
                parts.append(f"(nearest ID label {labels[i]!r}")
                if unc is not None:
                    parts[-1] += f", uncertainty {float(unc[i]):.3f}"
                parts[-1] += ")"
        except (IndexError, TypeError, ValueError):
            pass
        return " ".join(parts)

    def update(self, stamp_s: float, frame_result, width: int, height: int) -> Alert:
        """Feed one frame; returns the alert after it.

        Args:
            stamp_s: the frame's message stamp in seconds (monotonic within a stream).
            frame_result: duck-typed frame result (see module docstring), or None for no boxes.
            width, height: image size in pixels (> 0), to normalise boxes.

        Raises:
            ValueError: non-finite stamp, non-positive image size, or inconsistent frame arrays.
        """
        stamp = float(stamp_s)
        if not math.isfinite(stamp):
            raise ValueError(f"stamp_s must be finite, got {stamp_s!r}")
        if not (width > 0 and height > 0):
            raise ValueError(f"image size must be positive, got {width}x{height}")
        if self._last_stamp is not None and stamp <= self._last_stamp:
            self.n_out_of_order += 1
            return Alert(
                self._level,
                f"ignored frame stamped {stamp:.3f} s, not after the last one ({self._last_stamp:.3f} s); "
                f"{self.n_out_of_order} ignored so far; level unchanged",
                [],
                False,
            )
        self._last_stamp = stamp
        self.n_frames += 1
        cfg = self.config

        ood_idx = self._ood_indices(frame_result)
        take = self._takeover_boxes(frame_result, ood_idx, float(width), float(height))
        self._hist.append((bool(ood_idx), bool(take)))
        n_win = len(self._hist)
        n_ood = sum(1 for o, _ in self._hist if o)
        n_take = sum(1 for _, t in self._hist if t)
        caution = n_ood >= cfg.k
        takeover = caution and n_take >= cfg.effective_takeover_k
        target = AlertLevel.TAKE_OVER if takeover else AlertLevel.CAUTION if caution else AlertLevel.CLEAR
        for lvl in (AlertLevel.CAUTION, AlertLevel.TAKE_OVER):
            if target >= lvl:
                self._last_seen[lvl] = stamp

        before = self._level
        held_note = ""
        if target > before:
            self._level = target
            self._raised_s = stamp
        elif target < before:
            since_raise = stamp - self._raised_s if self._raised_s is not None else math.inf
            absent = stamp - self._last_seen[before]
            if since_raise < cfg.hold_s - _TIME_TOL_S:
                held_note = f"held: raised {since_raise:.2f} s ago (minimum hold {cfg.hold_s:.2f} s)"
            elif absent < cfg.clear_s - _TIME_TOL_S:
                held_note = f"held: condition absent for {absent:.2f} s (clears after {cfg.clear_s:.2f} s)"
            else:
                new = target
                if before == AlertLevel.TAKE_OVER and target == AlertLevel.CLEAR:
                    if stamp - self._last_seen[AlertLevel.CAUTION] < cfg.clear_s - _TIME_TOL_S:
                        new = AlertLevel.CAUTION  # caution still recent: step down one level
                self._level = new

        level = self._level
        if level == AlertLevel.TAKE_OVER:
            indices = [i for i, _ in take] or list(ood_idx)
            if take:
                details = "; ".join(f"{self._describe(frame_result, i)}: {why}" for i, why in take)
                reason = (f"TAKE_OVER: OOD object in the driving zone in {n_take} of last {n_win} frames; "
                          f"now {details}")
            else:
                reason = f"TAKE_OVER: take-over rule held in {n_take} of last {n_win} frames"
        elif level == AlertLevel.CAUTION:
            indices = list(ood_idx)
            reason = f"CAUTION: OOD object in {n_ood} of last {n_win} frames (k={cfg.k})"
            if ood_idx:
                reason += "; now " + ", ".join(self._describe(frame_result, i) for i in ood_idx)
        else:
            indices = []
            reason = f"CLEAR: OOD object in {n_ood} of last {n_win} frames (< k={cfg.k})"
        if held_note:
            reason += f" [{held_note}]"
        return Alert(level, reason, indices, level != before)


# ---------------------------------------------------------------------------------------------
# health


def _percentile(values: Sequence[float], q: float) -> float:
    """Linear-interpolation percentile (numpy's default method), q in [0, 100]."""
    s = sorted(values)
    if not s:
        return math.nan
    pos = (len(s) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


class HealthMonitor:
    """Is the OOD pipeline delivering? Wall-clock based (a stalled pipeline has no stamps).

    Args:
        frame_timeout_s: report when no frame was processed for this long (s).
        latency_budget_ms: report when the p95 of the last ``latency_window`` frame latencies
            (ms, image stamp to result, or processing time) exceeds this.
        latency_window: number of recent frames in the latency percentile.
        min_latency_samples: no latency verdict before this many frames (avoid a verdict on one
            slow first frame, e.g. a warm-up).

    Call :meth:`frame` for every processed frame, :meth:`backend_error` when the backend fails,
    and :meth:`check` periodically (e.g. with the diagnostics timer). A processed frame clears a
    previous backend error (the backend recovered).
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
        self._backend_error: Optional[str] = None
        self.n_frames = 0
        self.n_backend_errors = 0
        self._reasons: List[str] = []

    def frame(self, stamp_wall_s: float, latency_ms: float) -> None:
        """Record a successfully processed frame at wall time ``stamp_wall_s`` (s) taking ``latency_ms``."""
        self._last_frame_s = float(stamp_wall_s)
        lat = float(latency_ms)
        if math.isfinite(lat):
            self._lat.append(lat)
        self.n_frames += 1
        self._backend_error = None

    def backend_error(self, reason: str) -> None:
        """Record a backend failure; reported by :meth:`check` until the next processed frame."""
        self._backend_error = str(reason)
        self.n_backend_errors += 1

    def latency_p95_ms(self) -> float:
        """p95 of the recent latencies (ms), NaN without samples."""
        return _percentile(list(self._lat), 95.0)

    def check(self, now_wall_s: float) -> List[str]:
        """Reasons the pipeline is degraded at wall time ``now_wall_s`` (s); empty when healthy."""
        now = float(now_wall_s)
        if self._first_check_s is None:
            self._first_check_s = now
        reasons = []
        ref = self._last_frame_s if self._last_frame_s is not None else self._first_check_s
        silent = now - ref
        if silent > self.frame_timeout_s:
            what = "no frame processed" if self._last_frame_s is not None else "no frame processed yet"
            reasons.append(f"{what} for {silent:.2f} s (timeout {self.frame_timeout_s:.2f} s)")
        if self._backend_error is not None:
            reasons.append(f"backend failing: {self._backend_error}")
        if len(self._lat) >= self.min_latency_samples:
            p95 = self.latency_p95_ms()
            if p95 > self.latency_budget_ms:
                reasons.append(
                    f"latency p95 {p95:.1f} ms over budget {self.latency_budget_ms:.1f} ms "
                    f"(last {len(self._lat)} frames)"
                )
        self._reasons = reasons
        return list(reasons)

    @property
    def degraded(self) -> bool:
        """True when the last :meth:`check` returned reasons."""
        return bool(self._reasons)

    @property
    def reasons(self) -> List[str]:
        """The reasons of the last :meth:`check`."""
        return list(self._reasons)
