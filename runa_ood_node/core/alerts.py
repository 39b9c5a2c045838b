"""Driver alerts from per-frame OOD results, and pipeline health (no ROS; numpy only).

``AlertMonitor`` turns the stream of per-frame results into a debounced alert level **per object**:

* **Tracks.** The scored boxes of each frame are associated with the tracks of recent frames: by
  the detector's tracking ids (``object_ids``, one string per box, ``""`` = none) where given,
  otherwise by greedy IoU matching (best pairs first, IoU >= ``match_iou``) of the box to the last
  box of a track not yet matched in this frame. A box that matches nothing starts a new track.
  Tracks not seen for ``n`` frames expire.
* **CAUTION** when a *persistent-OOD* track exists: one that was OOD in >= ``k`` of the last ``n``
  frames the monitor scored (frames before a track existed, or in which it was not seen, count as
  "not OOD"). One-frame false positives at different places are different tracks, so they never
  add up to a caution.
* **TAKE_OVER** when a persistent-OOD track also satisfied the *take-over rule* in >=
  ``takeover_k`` (default ``k``) of its last ``n`` frames. The rule holds for a track in a frame
  when one of its OOD boxes
  - covers at least ``takeover_min_area_frac`` of the image area, or
  - has its bottom edge at or below ``takeover_min_bottom_frac`` of the image height
    (image y grows downwards, so a low bottom edge means close to the ego vehicle), or
  - has its centre inside ``roi`` (normalised image coordinates, 0..1: a rectangle
    ``[x1, y1, x2, y2]`` or a polygon ``[[x, y], ...]``, e.g. the ego lane).
* **Hold and clear.** A raised level is held for at least ``hold_s`` seconds after the raise, and a
  level is only left after its condition (the per-track k-of-n rule above, not a single frame) has
  been absent for ``clear_s`` seconds; from TAKE_OVER it steps down to CAUTION if CAUTION's
  condition was seen within ``clear_s``. Raising is immediate. Together this suppresses flicker.
* **Frames that were not scored are not evidence of "no OOD".** A frame whose ``error`` is set
  (backend failure) or whose boxes are all ``BACKEND_ERROR`` / ``NOT_SCORED`` is skipped: it does
  not enter any k-of-n window, the level is held (never lowered on it), and the stamp interval
  ending at it does not count towards ``clear_s`` (``hold_s`` is plain stamp time). The returned
  alert has ``changed=False`` and its reason ends with "(frame not scored: ... — level held)".
  Reporting the failure itself is ``HealthMonitor``'s job. In a partially scored frame (some boxes
  ``NOT_SCORED`` over the ``max_boxes`` cap) the scored boxes are evidence; a track whose box in
  that frame was not scored keeps its identity and position but gets no entry for that frame.
  A frame with no boxes at all is evidence (nothing there).

Times are **message stamps in seconds** (``header.stamp`` of the image), never wall-clock time, so
a bag replay gives the same alerts at any speed. Frames with a stamp not later than the last one
are ignored and counted (``n_out_of_order``). Durations are compared with a 1 us tolerance
(stamps are floats built from sec + nanosec). The k-of-n windows count frames, not seconds: if
frames stop arriving the alert stays where it is, which is what ``HealthMonitor`` reports.

The frame result is duck-typed (``core.pipeline.FrameResult`` or anything with the same fields,
attributes or mapping keys): ``is_ood`` [N] bool, ``status`` [N] (``core.boxes.BoxStatus``, only
``OK == 0`` boxes are scored; optional, default all OK), ``boxes_xyxy`` [N, 4] pixels,
``error`` (str or None; optional), and optionally ``uncertainty`` and ``label`` used in the reason
text. ``None`` means a frame without boxes.

``HealthMonitor`` reports a degraded pipeline: no frame for ``frame_timeout_s`` (wall time), a
failing backend, or the p95 of recent end-to-end latencies over ``latency_budget_ms``.
"""
from __future__ import annotations

import enum
import math
from collections import deque
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from .boxes import BoxStatus  # numpy only: this module stays free of the model stack
from .metrics import percentile as _percentile
from .roi import parse_roi as _parse_roi

__all__ = ["AlertLevel", "AlertConfig", "Alert", "AlertMonitor", "HealthMonitor"]

_STATUS_OK = BoxStatus.OK
_STATUS_NOT_SCORED = BoxStatus.NOT_SCORED
_STATUS_BACKEND_ERROR = BoxStatus.BACKEND_ERROR
_UNSCORED = (_STATUS_NOT_SCORED, _STATUS_BACKEND_ERROR)  # valid boxes the backend did not score
_TIME_TOL_S = 1e-6  # stamps are sec + nanosec * 1e-9 floats: compare durations to within 1 us
_MAX_TRACKS = 1024  # bound on the track table (tracks also expire after n frames unseen)
_MAX_ERROR_CHARS = 160  # backend error text quoted in a reason


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


def _iou_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of every box in ``a`` [A, 4] with every box in ``b`` [B, 4] (xyxy pixels) -> [A, B]."""
    ix1 = np.maximum(a[:, None, 0], b[None, :, 0])
    iy1 = np.maximum(a[:, None, 1], b[None, :, 1])
    ix2 = np.minimum(a[:, None, 2], b[None, :, 2])
    iy2 = np.minimum(a[:, None, 3], b[None, :, 3])
    inter = np.clip(ix2 - ix1, 0.0, None) * np.clip(iy2 - iy1, 0.0, None)
    area_a = np.clip(a[:, 2] - a[:, 0], 0.0, None) * np.clip(a[:, 3] - a[:, 1], 0.0, None)
    area_b = np.clip(b[:, 2] - b[:, 0], 0.0, None) * np.clip(b[:, 3] - b[:, 1], 0.0, None)
    union = area_a[:, None] + area_b[None, :] - inter
    with np.errstate(divide="ignore", invalid="ignore"):
        iou = np.where(union > 0.0, inter / union, 0.0)
    return iou


@dataclass
class AlertConfig:
    """Parameters of :class:`AlertMonitor` (see the module docstring for the rules).

    Attributes:
        k, n: CAUTION when one tracked object was OOD in >= k of the last n scored frames
            (1 <= k <= n). Tracks not seen for n frames expire.
        hold_s: minimum time (s, message stamps) a raised level is kept.
        clear_s: time (s) the condition of the current level must be absent before lowering it.
        takeover_min_area_frac: box area / image area that triggers take-over (0..1; None disables).
        takeover_min_bottom_frac: box bottom edge y2 / image height that triggers take-over
            (0..1; None disables).
        roi: None, rectangle ``[x1, y1, x2, y2]`` or polygon ``[[x, y], ...]``, normalised 0..1;
            an OOD box whose centre is inside triggers take-over.
        takeover_k: frames (of a track's last n) in which the take-over rule must hold; None -> k.
        match_iou: minimum IoU (0 < match_iou <= 1) between a box and a track's last box for the
            box to continue that track when no tracking id is given.
    """

    k: int = 3
    n: int = 5
    hold_s: float = 1.0
    clear_s: float = 2.0
    takeover_min_area_frac: Optional[float] = 0.05
    takeover_min_bottom_frac: Optional[float] = 0.8
    roi: Optional[Sequence] = None
    takeover_k: Optional[int] = None
    match_iou: float = 0.3
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
        self.match_iou = _finite_number(self.match_iou, "match_iou", 0.0, 1.0)
        if self.match_iou <= 0.0:
            raise ValueError(f"match_iou must be in (0, 1], got {self.match_iou!r}")
        self._roi_poly = _parse_roi(self.roi)

    @property
    def effective_takeover_k(self) -> int:
        return self.k if self.takeover_k is None else self.takeover_k


@dataclass
class Alert:
    """Output of :meth:`AlertMonitor.update`.

    Attributes:
        level: the (debounced) alert level after this frame.
        reason: human-readable explanation (for logs, diagnostics and the HMI); names the
            object(s) behind the level (track, box index, nearest ID label, uncertainty).
        object_indices: indices into this frame's boxes of the tracks behind the level (the
            take-over tracks for TAKE_OVER, the persistent-OOD tracks for CAUTION), ascending;
            empty while a level is only held, or when those tracks have no box in this frame.
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


@dataclass
class _Track:
    """One object followed across frames (internal)."""

    name: str  # for reasons: "object 'id'" (tracking id) or "track #n" (IoU-associated)
    box: Tuple[float, float, float, float]  # last box, xyxy pixels
    ood: deque  # per scored frame since creation (last n): OOD in that frame
    take: deque  # per scored frame since creation (last n): take-over rule held in that frame
    last_seen: int  # index of the last scored frame with a box of this track
    now: List[int] = field(default_factory=list)  # box indices in the latest scored frame
    now_box: Optional[int] = None  # the representative box among ``now`` (first OOD, else first)
    now_why: str = ""  # why the take-over rule held in the latest scored frame ("" = it did not)


@dataclass
class _Frame:
    """Parsed frame result (internal)."""

    n: int
    is_ood: List[bool]
    status: List[int]
    boxes: Optional[np.ndarray]  # [n, 4] float64, or None when n == 0
    error: Optional[str]


class AlertMonitor:
    """Debounced, per-object CAUTION / TAKE_OVER alerts from a stream of frame results.

    See the module docstring for the rules. Counters (read-only attributes): ``n_frames`` (frames
    accepted, in stamp order), ``n_out_of_order``, ``n_unscored_frames`` (skipped, level held),
    ``n_bad_object_ids`` (``object_ids`` of the wrong length: ignored, IoU used), ``n_tracks_dropped``
    (tracks evicted because the table was full); ``n_tracks`` is the current table size.
    """

    def __init__(self, config: Optional[AlertConfig] = None):
        self.config = config if config is not None else AlertConfig()
        self.reset()

    def reset(self) -> None:
        """Forget all history (level back to CLEAR, no tracks, counters zeroed)."""
        self._tracks: Dict[str, _Track] = {}
        self._next_track = 1
        self._frame_idx = 0  # scored frames so far
        self._level = AlertLevel.CLEAR
        self._raised_s: Optional[float] = None
        self._last_seen = {AlertLevel.CAUTION: -math.inf, AlertLevel.TAKE_OVER: -math.inf}
        self._last_stamp: Optional[float] = None
        self.n_frames = 0
        self.n_out_of_order = 0
        self.n_unscored_frames = 0
        self.n_bad_object_ids = 0
        self.n_tracks_dropped = 0

    @property
    def level(self) -> AlertLevel:
        return self._level

    @property
    def n_tracks(self) -> int:
        """Number of tracks currently followed."""
        return len(self._tracks)

    # -------------------------------------------------------------------------------- parsing
    @staticmethod
    def _parse(frame) -> _Frame:
        is_ood = _get(frame, "is_ood")
        status = _get(frame, "status")
        is_ood = [] if is_ood is None else [bool(f) for f in is_ood]
        if status is None:
            status = [_STATUS_OK] * len(is_ood)
        else:
            status = [int(s) for s in status]
            if len(status) != len(is_ood):
                raise ValueError(f"frame result has {len(is_ood)} is_ood flags but {len(status)} status codes")
        n = len(is_ood)
        boxes = None
        if n:
            raw = _get(frame, "boxes_xyxy")
            if raw is None:
                raise ValueError(f"frame result has {n} boxes but no boxes_xyxy")
            boxes = np.asarray(raw, dtype=np.float64)
            if boxes.shape != (n, 4):
                raise ValueError(f"frame result has {n} is_ood flags but boxes_xyxy of shape {boxes.shape}")
        err = _get(frame, "error")
        return _Frame(n, is_ood, status, boxes, str(err) if err else None)

    @staticmethod
    def _unscored_reason(f: _Frame) -> Optional[str]:
        """Why this frame is no evidence at all (None: it is evidence). A frame in which some boxes
        were scored is evidence, even if the backend failed on others (e.g. NaN features for one
        crop): its scored boxes may be the OOD object the driver must hear about."""
        if any(s == _STATUS_OK for s in f.status):
            return None
        if f.error:
            msg = f.error if len(f.error) <= _MAX_ERROR_CHARS else f.error[: _MAX_ERROR_CHARS - 3] + "..."
            return f"backend error: {msg}"
        if f.n and all(s in _UNSCORED for s in f.status):
            return f"none of the {f.n} boxes was scored (BACKEND_ERROR / NOT_SCORED)"
        return None

    def _takeover_why(self, box, width: float, height: float) -> str:
        """Why the take-over rule holds for this (OOD) box; "" when it does not."""
        cfg = self.config
        x1, y1, x2, y2 = (float(v) for v in box)
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
        return ", ".join(why)

    # -------------------------------------------------------------------------------- tracking
    def _new_track(self, key: str, name: str, box) -> _Track:
        n = self.config.n
        t = _Track(name=name, box=tuple(float(v) for v in box), ood=deque(maxlen=n), take=deque(maxlen=n),
                   last_seen=self._frame_idx)
        self._tracks[key] = t
        return t

    def _associate(self, f: _Frame, ids: Optional[List[str]]) -> Dict[str, List[int]]:
        """Box indices of this frame per track key (creating tracks for new objects)."""
        trackable = [i for i in range(f.n)
                     if (f.status[i] == _STATUS_OK or f.status[i] in _UNSCORED) and np.isfinite(f.boxes[i]).all()]
        matched: Dict[str, List[int]] = {}
        pending: List[int] = []
        for i in trackable:
            tid = ids[i] if ids is not None else ""
            if tid:
                key = "id:" + tid
                if key not in self._tracks:
                    self._new_track(key, f"object {tid!r}", f.boxes[i])
                matched.setdefault(key, []).append(i)
            else:
                pending.append(i)
        if not pending:
            return matched
        cands = [k for k in self._tracks if k not in matched]
        taken_boxes, taken_tracks = set(), set()
        if cands:
            iou = _iou_matrix(f.boxes[pending], np.asarray([self._tracks[k].box for k in cands], np.float64))
            pairs = np.argwhere(iou >= self.config.match_iou - 1e-12)
            # greedy: best IoU first; ties by box, then track age (deterministic)
            order = sorted(((-iou[a, b], a, b) for a, b in pairs))
            for _, a, b in order:
                if a in taken_boxes or b in taken_tracks:
                    continue
                taken_boxes.add(a)
                taken_tracks.add(b)
                matched[cands[b]] = [pending[a]]
        for a, i in enumerate(pending):
            if a not in taken_boxes:
                key = f"#{self._next_track}"
                self._next_track += 1
                self._new_track(key, f"track {key}", f.boxes[i])
                matched[key] = [i]
        return matched

    def _update_tracks(self, f: _Frame, matched: Dict[str, List[int]], width: float, height: float) -> None:
        cfg = self.config
        for key, t in self._tracks.items():
            idx = matched.get(key, [])
            t.now, t.now_box, t.now_why = list(idx), None, ""
            if not idx:
                t.ood.append(False)
                t.take.append(False)
                continue
            t.last_seen = self._frame_idx
            scored = [i for i in idx if f.status[i] == _STATUS_OK]
            ood = [i for i in scored if f.is_ood[i]]
            t.now_box = ood[0] if ood else scored[0] if scored else idx[0]
            t.box = tuple(float(v) for v in f.boxes[t.now_box])
            if not scored:
                continue  # seen, but not scored in this frame: no entry (neither OOD nor ID)
            for i in ood:
                why = self._takeover_why(f.boxes[i], width, height)
                if why:
                    t.now_box, t.now_why = i, why
                    break
            t.ood.append(bool(ood))
            t.take.append(bool(t.now_why))
        # expire tracks not seen for n frames, then bound the table (least recently seen first)
        for key in [k for k, t in self._tracks.items() if self._frame_idx - t.last_seen >= cfg.n]:
            del self._tracks[key]
        if len(self._tracks) > _MAX_TRACKS:
            excess = sorted(self._tracks, key=lambda k: self._tracks[k].last_seen)[: len(self._tracks) - _MAX_TRACKS]
            for key in excess:
                del self._tracks[key]
            self.n_tracks_dropped += len(excess)

    def _persistent(self) -> Tuple[List[_Track], List[_Track]]:
        """(persistent-OOD tracks, those that also meet the take-over rule), in creation order."""
        cfg = self.config
        pers = [t for t in self._tracks.values() if sum(t.ood) >= cfg.k]
        take = [t for t in pers if sum(t.take) >= cfg.effective_takeover_k]
        return pers, take

    # -------------------------------------------------------------------------------- reasons
    @staticmethod
    def _describe(frame, t: _Track, current: bool) -> str:
        """"track #3 (box 0, nearest ID label 'car', uncertainty 0.123)"."""
        if not current:
            return t.name
        i = t.now_box
        if i is None:
            return f"{t.name} (not in this frame)"
        parts = [f"box {i}"]
        try:
            labels = _get(frame, "label")
            if labels is not None and labels[i]:
                parts.append(f"nearest ID label {labels[i]!r}")
            unc = _get(frame, "uncertainty")
            if unc is not None and math.isfinite(float(unc[i])):
                parts.append(f"uncertainty {float(unc[i]):.3f}")
        except (IndexError, TypeError, ValueError):
            pass
        return f"{t.name} ({', '.join(parts)})"

    def _reason(self, level: AlertLevel, frame, pers: List[_Track], take: List[_Track], current: bool,
                n_ood_now: int = 0) -> str:
        cfg = self.config
        if level == AlertLevel.TAKE_OVER and take:
            items = []
            for t in take:
                s = (f"{self._describe(frame, t, current)} OOD in {sum(t.ood)} of last {len(t.ood)} frames, "
                     f"take-over rule in {sum(t.take)} (takeover_k={cfg.effective_takeover_k})")
                if current:
                    s += f"; now {t.now_why}" if t.now_why else "; rule not met in this frame"
                items.append(s)
            return "TAKE_OVER: OOD object in the driving zone: " + " | ".join(items)
        if level == AlertLevel.TAKE_OVER:
            head = "TAKE_OVER: take-over rule no longer met by any persistent OOD object"
            return head + ("; " + self._list_persistent(frame, pers, current) if pers else "")
        if level == AlertLevel.CAUTION:
            if pers:
                return "CAUTION: " + self._list_persistent(frame, pers, current)
            return f"CAUTION: no OOD object persists now (k={cfg.k} of n={cfg.n} frames)"
        reason = f"CLEAR: no object OOD in >= k={cfg.k} of the last n={cfg.n} frames"
        if n_ood_now:
            reason += f" ({n_ood_now} OOD box(es) in this frame, not persistent yet)"
        return reason

    def _list_persistent(self, frame, pers: List[_Track], current: bool) -> str:
        k = self.config.k
        return "; ".join(f"{self._describe(frame, t, current)} OOD in {sum(t.ood)} of last {len(t.ood)} frames "
                         f"(k={k})" for t in pers)

    # -------------------------------------------------------------------------------- per frame
    def update(self, stamp_s: float, frame_result, width: int, height: int,
               object_ids: Optional[Sequence[str]] = None) -> Alert:
        """Feed one frame; returns the alert after it.

        Args:
            stamp_s: the frame's message stamp in seconds (monotonic within a stream).
            frame_result: duck-typed frame result (see module docstring), or None for no boxes.
            width, height: image size in pixels (> 0), to normalise boxes.
            object_ids: optional tracking id per box (e.g. ``vision_msgs/Detection2D.id``), same
                order and length as the frame's boxes; ``""`` (or None) = no id for that box, which
                is then associated by IoU. Ids must identify the same object across frames (a
                tracker's ids), not merely number the boxes of one frame. A list of the wrong
                length is ignored (IoU used) and counted in ``n_bad_object_ids``.

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
        f = self._parse(frame_result)
        ids = None
        if object_ids is not None:
            ids = ["" if v is None else str(v) for v in object_ids]
            if len(ids) != f.n:
                self.n_bad_object_ids += 1
                ids = None
            elif not any(ids):
                ids = None
        prev_stamp, self._last_stamp = self._last_stamp, stamp
        self.n_frames += 1
        cfg = self.config

        skip = self._unscored_reason(f)
        if skip is not None:
            # no evidence: windows untouched, level held, and the interval ending here does not
            # count as "condition absent" (shift the last-seen times by it)
            self.n_unscored_frames += 1
            if prev_stamp is not None:
                for lvl in self._last_seen:
                    self._last_seen[lvl] += stamp - prev_stamp
            pers, take = self._persistent()
            reason = self._reason(self._level, None, pers, take, current=False)
            return Alert(self._level, f"{reason} (frame not scored: {skip} — level held)", [], False)

        self._frame_idx += 1
        self._update_tracks(f, self._associate(f, ids), float(width), float(height))
        pers, take = self._persistent()
        target = AlertLevel.TAKE_OVER if take else AlertLevel.CAUTION if pers else AlertLevel.CLEAR
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
        behind = (take or pers) if level == AlertLevel.TAKE_OVER else pers if level == AlertLevel.CAUTION else []
        indices = sorted({i for t in behind for i in t.now})
        n_ood_now = sum(1 for i in range(f.n) if f.is_ood[i] and f.status[i] == _STATUS_OK)
        reason = self._reason(level, frame_result, pers, take, current=True, n_ood_now=n_ood_now)
        if held_note:
            reason += f" [{held_note}]"
        return Alert(level, reason, indices, level != before)


# ---------------------------------------------------------------------------------------------
# health


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
