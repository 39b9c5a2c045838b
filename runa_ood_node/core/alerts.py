"""Driver alerts from per-frame OOD results (no ROS; numpy only).

``AlertMonitor`` turns the stream of per-frame results into a debounced alert level **per object**:

* **Tracks.** The *scored* boxes (status ``OK``) of each frame are associated with the tracks of
  recent frames: by the detector's tracking ids (``object_ids``, one string per box, ``""`` = none)
  where given, otherwise by greedy IoU matching (best pairs first, IoU >= ``match_iou``) of the box
  to the last box of a track not yet matched in this frame. The matching is vectorised (rounds of
  mutually best box/track pairs over the IoU matrix: the same result as taking the pairs in order
  of IoU, with no Python loop over pairs). A box that matches nothing starts a new track. Boxes that
  were not scored (``NOT_SCORED`` over the ``max_boxes`` cap, ``BACKEND_ERROR``, invalid) are
  never tracked: they carry no OOD verdict.
* **Bounded work per frame.** At most ``max_tracked_boxes`` boxes of a frame are tracked (OOD
  boxes first, then the others, each in input order); the rest are counted
  (``n_boxes_untracked``, ``n_track_cap_frames``). The track table holds at most 1024 tracks. So one
  frame costs at most ``max_tracked_boxes`` x 1024 IoU entries (``last_work`` says what the last
  frame cost), and a heavy frame cannot delay the next one through the tracker.
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
* **Frames that were not scored are not evidence of "no OOD"** (the one definition is
  :func:`core.health.unscored_reason`, shared with ``HealthMonitor``). Such a frame does not enter
  any k-of-n window, the level is held (never lowered on it), and the stamp interval ending at it
  does not count towards ``clear_s`` (``hold_s`` is plain stamp time). The returned alert has
  ``changed=False`` and its reason ends with "(frame not scored: ... — level held)". In a
  *partially* scored frame (some valid boxes ``NOT_SCORED`` / ``BACKEND_ERROR``, or boxes over
  ``max_tracked_boxes``) the scored boxes are evidence, and a track none of them matches gets no
  entry for that frame (it may be among the unscored boxes: unknown, neither OOD nor ID) and does
  not age towards expiry. A frame with no boxes at all is evidence (nothing there).

Times are **message stamps in seconds** (``header.stamp`` of the image), never wall-clock time, so
a bag replay gives the same alerts at any speed. A frame stamped not later than the last one is
ignored and counted (``n_out_of_order``), unless it is more than ``jump_back_reset_s`` earlier:
then the stamps jumped back (looped bag, restarted source, clock step), the alert history belongs to
another time and is reset (``n_jump_resets``; level back to CLEAR, reported with ``changed=True``
when it was raised) before the frame is used. Durations are compared with a 1 us tolerance
(stamps are floats built from sec + nanosec). The k-of-n windows count frames, not seconds: if
frames stop arriving the alert stays where it is, which is what ``core.health.HealthMonitor``
reports.

The frame result is duck-typed (``core.pipeline.FrameResult`` or anything with the same fields,
attributes or mapping keys): ``is_ood`` [N] bool, ``status`` [N] (``core.boxes.BoxStatus``, only
``OK`` boxes are scored; optional, default all OK), ``boxes_xyxy`` [N, 4] pixels,
``error`` (str or None; optional), and optionally ``uncertainty`` and ``label`` used in the reason
text. ``None`` means a frame without boxes.
"""
from __future__ import annotations

import enum
import math
from collections import deque
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from .boxes import BoxStatus
from .health import UNSCORED_STATUSES, _finite_number, _get, unscored_reason
from .roi import parse_roi as _parse_roi

__all__ = ["AlertLevel", "AlertConfig", "Alert", "AlertMonitor"]

_STATUS_OK = int(BoxStatus.OK)
_TIME_TOL_S = 1e-6  # stamps are sec + nanosec * 1e-9 floats: compare durations to within 1 us
_MAX_TRACKS = 1024  # bound on the track table (tracks also expire after n frames unseen)


class AlertLevel(enum.IntEnum):
    """Driver alert level; ordered, higher is more severe."""

    CLEAR = 0
    CAUTION = 1
    TAKE_OVER = 2


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
    """IoU of every box in ``a`` [A, 4] with every box in ``b`` [B, 4] (xyxy pixels) -> [A, B] float32."""
    a = np.asarray(a, np.float32)
    b = np.asarray(b, np.float32)
    iw = np.minimum(a[:, None, 2], b[None, :, 2])
    iw -= np.maximum(a[:, None, 0], b[None, :, 0])
    np.maximum(iw, 0.0, out=iw)
    ih = np.minimum(a[:, None, 3], b[None, :, 3])
    ih -= np.maximum(a[:, None, 1], b[None, :, 1])
    np.maximum(ih, 0.0, out=ih)
    iw *= ih  # intersection
    area_a = np.maximum(a[:, 2] - a[:, 0], 0.0) * np.maximum(a[:, 3] - a[:, 1], 0.0)
    area_b = np.maximum(b[:, 2] - b[:, 0], 0.0) * np.maximum(b[:, 3] - b[:, 1], 0.0)
    union = area_a[:, None] + area_b[None, :]
    union -= iw
    with np.errstate(divide="ignore", invalid="ignore"):
        np.divide(iw, union, out=iw, where=union > 0.0)
    iw[~(union > 0.0)] = 0.0
    return iw


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
        max_tracked_boxes: at most this many scored boxes of one frame are tracked (OOD boxes
            first); bounds the tracker's work per frame (>= 1).
        jump_back_reset_s: a frame stamped more than this (s) before the last one resets the alert
            history (stamps jumped back: looped bag, restarted source); None = never (such frames
            are ignored as out of order). The node uses ``pairing_max_age_s``.
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
    max_tracked_boxes: int = 128
    jump_back_reset_s: Optional[float] = None
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
        if int(self.max_tracked_boxes) != self.max_tracked_boxes or int(self.max_tracked_boxes) < 1:
            raise ValueError(f"max_tracked_boxes must be an integer >= 1, got {self.max_tracked_boxes!r}")
        self.max_tracked_boxes = int(self.max_tracked_boxes)
        if self.jump_back_reset_s is not None:
            self.jump_back_reset_s = _finite_number(self.jump_back_reset_s, "jump_back_reset_s")
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


@dataclass
class _Track:
    """One object followed across frames (internal)."""

    name: str  # for reasons: "object 'id'" (tracking id) or "track #n" (IoU-associated)
    box: Tuple[float, float, float, float]  # last box, xyxy pixels
    ood: deque  # per scored frame since creation (last n): OOD in that frame
    take: deque  # per scored frame since creation (last n): take-over rule held in that frame
    last_seen: int  # index of the last scored frame with a box of this track
    missed: int = 0  # complete frames since it was last seen (expires at n)
    now: List[int] = field(default_factory=list)  # box indices in the latest scored frame
    now_box: Optional[int] = None  # the representative box among ``now`` (first OOD, else first)
    now_why: str = ""  # why the take-over rule held in the latest scored frame ("" = it did not)


@dataclass
class _Frame:
    """Parsed frame result (internal)."""

    n: int
    is_ood: np.ndarray  # [n] bool
    status: np.ndarray  # [n] int64 BoxStatus codes
    boxes: Optional[np.ndarray]  # [n, 4] float64, or None when n == 0
    error: Optional[str]


def _greedy_match(iou: np.ndarray, thr: float) -> Tuple[np.ndarray, np.ndarray, int]:
    """One-to-one greedy matching of rows (boxes) to columns (tracks) with ``iou >= thr``.

    The result equals taking the candidate pairs in the order (-IoU, row, column) and keeping each
    pair whose row and column are still free, but is computed in rounds of *mutually best* pairs
    (a row's best column whose best row is that row; ``argmax`` breaks ties by the lower index,
    which is the same order): the best remaining pair is always mutually best, and a mutually best
    pair is never blocked in the sorted order. No Python loop over pairs.

    Returns (rows, columns, rounds).
    """
    w = np.where(iou >= thr, iou, -1.0)
    rows_i, cols_i = np.arange(w.shape[0]), np.arange(w.shape[1])
    out_r: List[np.ndarray] = []
    out_c: List[np.ndarray] = []
    rounds = 0
    while w.size and w.max() >= 0.0:
        rounds += 1
        best_c = w.argmax(axis=1)
        best_r = w.argmax(axis=0)
        r = np.arange(w.shape[0])
        mutual = (best_r[best_c] == r) & (w[r, best_c] >= 0.0)
        mr, mc = r[mutual], best_c[mutual]
        out_r.append(rows_i[mr])
        out_c.append(cols_i[mc])
        keep_r = np.ones(w.shape[0], bool)
        keep_r[mr] = False
        keep_c = np.ones(w.shape[1], bool)
        keep_c[mc] = False
        w = w[keep_r][:, keep_c]
        rows_i, cols_i = rows_i[keep_r], cols_i[keep_c]
    if not out_r:
        return np.zeros(0, np.intp), np.zeros(0, np.intp), rounds
    return np.concatenate(out_r), np.concatenate(out_c), rounds


class AlertMonitor:
    """Debounced, per-object CAUTION / TAKE_OVER alerts from a stream of frame results.

    See the module docstring for the rules. Counters (read-only attributes): ``n_frames`` (frames
    accepted, in stamp order), ``n_out_of_order``, ``n_unscored_frames`` (skipped, level held),
    ``n_bad_object_ids`` (``object_ids`` of the wrong length: ignored, IoU used), ``n_tracks_dropped``
    (tracks evicted because the table was full), ``n_boxes_untracked`` / ``n_track_cap_frames``
    (scored boxes over ``max_tracked_boxes``), ``n_jump_resets`` (history resets on a stamp jump
    back); ``n_tracks`` is the current table size and ``last_work`` what the last frame cost the
    tracker (``boxes_tracked``, ``boxes_untracked``, ``iou_pairs``, ``match_rounds``).
    """

    def __init__(self, config: Optional[AlertConfig] = None):
        self.config = config if config is not None else AlertConfig()
        self.reset()

    def reset(self) -> None:
        """Forget all history (level back to CLEAR, no tracks, counters zeroed)."""
        self._reset_history()
        self.n_frames = 0
        self.n_out_of_order = 0
        self.n_unscored_frames = 0
        self.n_bad_object_ids = 0
        self.n_tracks_dropped = 0
        self.n_boxes_untracked = 0
        self.n_track_cap_frames = 0
        self.n_jump_resets = 0

    def _reset_history(self) -> None:
        self._tracks: Dict[str, _Track] = {}
        self._next_track = 1
        self._frame_idx = 0  # scored frames so far
        self._level = AlertLevel.CLEAR
        self._raised_s: Optional[float] = None
        self._last_seen = {AlertLevel.CAUTION: -math.inf, AlertLevel.TAKE_OVER: -math.inf}
        self._last_stamp: Optional[float] = None
        self.last_work: Dict[str, int] = {"boxes_tracked": 0, "boxes_untracked": 0, "iou_pairs": 0,
                                          "match_rounds": 0}

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
        is_ood = np.zeros(0, bool) if is_ood is None else np.asarray(is_ood).astype(bool).reshape(-1)
        n = int(is_ood.size)
        if status is None:
            status = np.full(n, _STATUS_OK, np.int64)
        else:
            status = np.asarray(status).astype(np.int64).reshape(-1)
            if status.size != n:
                raise ValueError(f"frame result has {n} is_ood flags but {status.size} status codes")
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

    def _tracked_boxes(self, f: _Frame) -> Tuple[np.ndarray, bool]:
        """Indices of the boxes to track (scored, finite, at most ``max_tracked_boxes``: OOD first,
        then the others, each in input order), and whether the frame is *partial* (valid boxes that
        carry no verdict: not scored, or over the cap)."""
        if not f.n:
            return np.zeros(0, np.intp), False
        scored = (f.status == _STATUS_OK) & np.isfinite(f.boxes).all(axis=1)
        idx = np.flatnonzero(scored)
        partial = bool(np.isin(f.status, UNSCORED_STATUSES).any())
        cap = self.config.max_tracked_boxes
        untracked = 0
        if idx.size > cap:
            ood = f.is_ood[idx]
            idx = np.sort(np.concatenate([idx[ood], idx[~ood]])[:cap])
            untracked = int(scored.sum()) - cap
            self.n_boxes_untracked += untracked
            self.n_track_cap_frames += 1
            partial = True
        self.last_work = {"boxes_tracked": int(idx.size), "boxes_untracked": untracked, "iou_pairs": 0,
                          "match_rounds": 0}
        return idx, partial

    def _associate(self, f: _Frame, idx: np.ndarray, ids: Optional[List[str]]) -> Dict[str, List[int]]:
        """Box indices (of ``idx``) of this frame per track key (creating tracks for new objects)."""
        matched: Dict[str, List[int]] = {}
        pending: List[int] = []
        for i in idx.tolist():
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
        taken = np.zeros(len(pending), bool)
        if cands:
            iou = _iou_matrix(f.boxes[pending], np.asarray([self._tracks[k].box for k in cands], np.float64))
            rows, cols, rounds = _greedy_match(iou, self.config.match_iou - 1e-12)
            self.last_work["iou_pairs"] = int(iou.size)
            self.last_work["match_rounds"] = rounds
            for a, b in zip(rows.tolist(), cols.tolist()):
                matched[cands[b]] = [pending[a]]
            taken[rows] = True
        for a, i in enumerate(pending):
            if not taken[a]:
                key = f"#{self._next_track}"
                self._next_track += 1
                self._new_track(key, f"track {key}", f.boxes[i])
                matched[key] = [i]
        return matched

    def _update_tracks(self, f: _Frame, matched: Dict[str, List[int]], partial: bool,
                       width: float, height: float) -> None:
        cfg = self.config
        for key, t in self._tracks.items():
            idx = sorted(matched.get(key, []))
            t.now, t.now_box, t.now_why = idx, None, ""
            if not idx:
                if not partial:  # in a partial frame it may be among the unscored boxes: unknown
                    t.ood.append(False)
                    t.take.append(False)
                    t.missed += 1
                continue
            t.last_seen = self._frame_idx
            t.missed = 0
            ood = [i for i in idx if f.is_ood[i]]
            t.now_box = ood[0] if ood else idx[0]
            t.box = tuple(float(v) for v in f.boxes[t.now_box])
            for i in ood:
                why = self._takeover_why(f.boxes[i], width, height)
                if why:
                    t.now_box, t.now_why = i, why
                    break
            t.ood.append(bool(ood))
            t.take.append(bool(t.now_why))
        # expire tracks missed in n complete frames, then bound the table (least recently seen first)
        for key in [k for k, t in self._tracks.items() if t.missed >= cfg.n]:
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

    def _jump_back(self, stamp: float) -> str:
        """Reset the history when ``stamp`` jumped back more than ``jump_back_reset_s`` (looped bag,
        restarted source, clock step back: the history belongs to another time); the reason's note."""
        jb = self.config.jump_back_reset_s
        if self._last_stamp is None or jb is None or not stamp < self._last_stamp - jb:
            return ""
        note = f" [alert history reset: stamps jumped back from {self._last_stamp:.3f} s to {stamp:.3f} s]"
        self._reset_history()
        self.n_jump_resets += 1
        return note

    def _object_ids(self, object_ids: Optional[Sequence[str]], n: int) -> Optional[List[str]]:
        """The boxes' ids as strings, or None (no ids, none set, or the wrong number: counted)."""
        if object_ids is None:
            return None
        ids = ["" if v is None else str(v) for v in object_ids]
        if len(ids) != n:
            self.n_bad_object_ids += 1
            return None
        return ids if any(ids) else None

    def _move_level(self, target: AlertLevel, stamp: float) -> str:
        """Move the level towards ``target``: up at once; down only after the minimum hold and once
        the condition has been absent for ``clear_s`` (TAKE_OVER to CLEAR through CAUTION while
        caution is recent). Returns why the level was held ("" when it was not)."""
        cfg, before = self.config, self._level  # before == the level before the frame unless just reset
        if target > before:
            self._level = target
            self._raised_s = stamp
            return ""
        if target == before:
            return ""
        since_raise = stamp - self._raised_s if self._raised_s is not None else math.inf
        absent = stamp - self._last_seen[before]
        if since_raise < cfg.hold_s - _TIME_TOL_S:
            return f"held: raised {since_raise:.2f} s ago (minimum hold {cfg.hold_s:.2f} s)"
        if absent < cfg.clear_s - _TIME_TOL_S:
            return f"held: condition absent for {absent:.2f} s (clears after {cfg.clear_s:.2f} s)"
        new = target
        if before == AlertLevel.TAKE_OVER and target == AlertLevel.CLEAR:
            if stamp - self._last_seen[AlertLevel.CAUTION] < cfg.clear_s - _TIME_TOL_S:
                new = AlertLevel.CAUTION  # caution still recent: step down one level
        self._level = new
        return ""

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
        level_before = self._level  # before a possible history reset (the change must be reported)
        jump_note = self._jump_back(stamp)
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
        ids = self._object_ids(object_ids, f.n)
        prev_stamp, self._last_stamp = self._last_stamp, stamp
        self.n_frames += 1
        skip = unscored_reason(frame_result)
        if skip is not None:
            # no evidence: windows untouched, level held, and the interval ending here does not
            # count as "condition absent" (shift the last-seen times by it)
            self.n_unscored_frames += 1
            if prev_stamp is not None:
                for lvl in self._last_seen:
                    self._last_seen[lvl] += stamp - prev_stamp
            pers, take = self._persistent()
            reason = self._reason(self._level, None, pers, take, current=False)
            return Alert(self._level, f"{reason} (frame not scored: {skip} — level held){jump_note}", [],
                         self._level != level_before)

        self._frame_idx += 1
        idx, partial = self._tracked_boxes(f)
        self._update_tracks(f, self._associate(f, idx, ids), partial, float(width), float(height))
        pers, take = self._persistent()
        target = AlertLevel.TAKE_OVER if take else AlertLevel.CAUTION if pers else AlertLevel.CLEAR
        for lvl in (AlertLevel.CAUTION, AlertLevel.TAKE_OVER):
            if target >= lvl:
                self._last_seen[lvl] = stamp

        held_note = self._move_level(target, stamp)
        level = self._level
        behind = (take or pers) if level == AlertLevel.TAKE_OVER else pers if level == AlertLevel.CAUTION else []
        indices = sorted({i for t in behind for i in t.now})
        n_ood_now = int(np.count_nonzero(f.is_ood & (f.status == _STATUS_OK))) if f.n else 0
        reason = self._reason(level, frame_result, pers, take, current=True, n_ood_now=n_ood_now)
        if held_note:
            reason += f" [{held_note}]"
        return Alert(level, reason + jump_note, indices, level != level_before)
