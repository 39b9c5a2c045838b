"""What happened to every message a camera sent the node: counted, reconciled, snapshotted (ROS-free).

The node (``ros.node``) keeps one :class:`CameraLedger` per camera in one :class:`Accounting`;
every count goes through them, under the one lock they share (:attr:`Accounting.lock`, re-entrant:
the node holds it around its pairing and queueing too). ``/diagnostics`` and
``RunaOodNode.accounting()`` show their snapshots.

The rule (what /diagnostics balances)
    every received message is scored (as part of a pair), counted as dropped with a reason, or still
    pending. Pairer reasons count messages (``image_without_detections``,
    ``detections_without_image``, ``buffer_overflow``, ``out_of_order``, ``duplicate_stamp``,
    ``answered_before``, ``stamp_in_future``, ``stamp_too_old``, ``time_jump_back``: see
    ``ros.pairing`` for the stamp rule); input drops count messages refused before the pairer
    (``inactive``, ``undecodable_image``, ``internal_error``, ...); frame reasons count pairs
    (``image_<conversion reason>`` such as ``image_unsupported_encoding``, ``image_truncated``;
    ``image_undecodable``; :data:`FRAME_REASONS`). A frame is counted (scored or dropped) in the
    same locked step that ends its flight (:meth:`CameraLedger.frame_done`,
    :meth:`CameraLedger.scored`), so every snapshot balances:

    * messages received == messages the pairer took + input drops (per camera, both streams);
    * the pairer's own books balance (received == paired + dropped + pending, per stream);
    * pairs == frames scored + frame drops + queued + in flight;
    * no loss figure is untrue (:meth:`.loss.StreamLoss.problems`).

    Messages that never reached the node (DDS queue overflow, network loss) are counted per stream
    as ``lost_in_transport`` (:mod:`.loss`: gaps in each publisher's sequence numbers and the
    middleware's plausible message-lost reports; published = received + lost). A loss figure that
    cannot be true makes the camera's snapshot unbalanced (its /diagnostics status ERROR). When
    ``transport.loss_warn_fraction`` of a stream is lost over ``transport.loss_window_s``
    (:meth:`CameraLedger.watch_transport`), the ledger holds a warning the node logs once and shows
    as a WARN while it lasts.
"""
from __future__ import annotations

import collections
import threading
from typing import Any, Deque, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from .loss import LossWatch, StreamLoss
from .registry import BoxStatus

#: the two input streams of a camera
STREAMS = ("image", "detections")
#: frame-level drop reasons (besides ``image_<ImageConversionError.reason>``)
FRAME_REASONS = ("bad_detections", "processing_overload", "deactivated", "internal_error")
#: latencies kept per camera for the percentiles /diagnostics shows
LATENCY_WINDOW = 200


class CameraLedger:
    """The books of one camera: messages received and lost per stream, input drops, the frames
    waiting to be scored (:attr:`queue`) and in flight, frames scored or dropped by reason, boxes by
    status, counters and latencies.

    Every method takes :attr:`lock` (the :class:`Accounting`'s when made by it). :attr:`pairer` is
    the camera's stamp pairer (anything with ``counters``, ``check_accounting()`` and
    ``dropped_by_stream()``; None: none yet): its books are part of the balance.

    Args:
        name: the camera ("" = the single stream).
        max_sequence_gap, loss_warn_fraction, loss_window_s: the ``transport.*`` parameters for
            :class:`.loss.StreamLoss` and :class:`.loss.LossWatch`.
        lock: the lock to share (default a new re-entrant one).
    """

    def __init__(self, name: str = "", max_sequence_gap: int = 10_000, loss_warn_fraction: float = 0.2,
                 loss_window_s: float = 10.0, lock: Optional[threading.RLock] = None):
        self.name = name
        self.lock = lock if lock is not None else threading.RLock()
        self._loss_args = (int(max_sequence_gap), float(loss_warn_fraction), float(loss_window_s))
        self.queue: Deque[Any] = collections.deque()  # frames paired, waiting for a scoring thread
        self.in_flight = 0  # taken from the queue, not yet accounted for
        self.pairer: Any = None
        self.reset()

    def reset(self) -> None:
        """Every count back to zero (the queue and the frame in flight stay: they are not counts)."""
        with self.lock:
            max_gap, fraction, window_s = self._loss_args
            self.frames_scored = 0
            self.boxes_total = 0
            self.boxes_ood = 0
            self.box_status: Dict[int, int] = collections.Counter()
            self.frame_drops: Dict[str, int] = collections.Counter()
            self.counters: Dict[str, int] = collections.Counter()
            self.received: Dict[str, int] = collections.Counter({k: 0 for k in STREAMS})
            self.input_drops: Dict[str, int] = collections.Counter()
            self.lat_node: Deque[float] = collections.deque(maxlen=LATENCY_WINDOW)
            self.lat_pipeline: Deque[float] = collections.deque(maxlen=LATENCY_WINDOW)
            self.lat_frame: Deque[float] = collections.deque(maxlen=LATENCY_WINDOW)
            # messages lost before reaching the node, per stream, and the watch on their share
            self.loss: Dict[str, StreamLoss] = {k: StreamLoss(max_gap=max_gap) for k in STREAMS}
            self.loss_watch: Dict[str, LossWatch] = {k: LossWatch(fraction, window_s) for k in STREAMS}
            self.transport_warning = ""  # set while a stream's share lost in transport is over the threshold

    # ------------------------------------------------------------------ inputs
    def received_message(self, stream: str, publisher: Optional[bytes] = None,
                         sequence: Optional[int] = None) -> Tuple[int, Optional[Tuple[int, int]]]:
        """One ``stream`` message reached the node, numbered ``sequence`` by ``publisher`` (None: not
        known): lost-in-transport and received counted in one step. Returns ``(gap, jump)``: the
        messages this one revealed as lost (> 0) and, when its number jumped beyond
        ``max_sequence_gap`` (a new epoch of that publisher, not losses), ``(before, after)``."""
        with self.lock:
            gap, jump = 0, None
            if publisher is not None and sequence is not None:
                loss = self.loss[stream]
                jumps = loss.sequence_jumps
                gap = loss.note(publisher, sequence)
                if gap <= 0 and loss.sequence_jumps != jumps:
                    jump = loss.last_jump
            self.received[stream] += 1
            return gap, jump

    def lost_report(self, stream: str, n) -> bool:
        """The middleware says ``n`` more ``stream`` messages were lost; False when that cannot be
        true (not counted; the snapshot then shows a transport problem)."""
        with self.lock:
            return self.loss[stream].report(n)

    def drop_input(self, reason: str) -> None:
        """A received message refused before the pairer (``inactive``, ``undecodable_image``, ...)."""
        with self.lock:
            self.input_drops[reason] += 1

    def count(self, key: str, n: int = 1) -> None:
        """A counter shown as it is (``qos_incompatible``, ``frame_id_mismatch``, ...)."""
        with self.lock:
            self.counters[key] += n

    def add_counts(self, counts: Mapping[str, int]) -> None:
        with self.lock:
            for key, n in counts.items():
                self.counters[key] += n

    # ------------------------------------------------------------------ frames
    def enqueue(self, frame: Any, max_queued: int) -> Optional[Any]:
        """Queue a paired ``frame``; when ``max_queued`` are already waiting the OLDEST is dropped
        (``processing_overload``: outputs stay fresh) and returned."""
        with self.lock:
            old = None
            if len(self.queue) >= max_queued:
                old = self.queue.popleft()
                self.frame_drops["processing_overload"] += 1
            self.queue.append(frame)
            return old

    def take(self) -> Optional[Any]:
        """The frame at the head of the queue, now in flight (None when none waits)."""
        with self.lock:
            if not self.queue:
                return None
            self.in_flight = 1
            return self.queue.popleft()

    def drop_queued(self, reason: str) -> int:
        """Drop every queued frame with ``reason`` (``deactivated``); how many."""
        with self.lock:
            n = len(self.queue)
            self.queue.clear()
            if n:  # no key for nothing (snapshots list only the reasons that happened)
                self.frame_drops[reason] += n
            return n

    def frame_done(self, drop_reason: Optional[str] = None) -> None:
        """End the flight of the frame in flight: scored (``drop_reason`` None) or dropped with that
        reason, in one step (so every snapshot balances)."""
        with self.lock:
            if drop_reason is None:
                self.frames_scored += 1
            else:
                self.frame_drops[drop_reason] += 1
            self.in_flight = 0

    def scored(self, status: Sequence[int], is_ood: Sequence[bool], node_ms: float, pipeline_ms: float,
               error: bool = False, boxes_below_token: Optional[int] = None) -> None:
        """The frame in flight was scored and its results are out: count it with its boxes
        (``status`` per box: :class:`.registry.BoxStatus` codes), its latencies and whether the
        backend failed on it; ``boxes_below_token`` for the one-pass methods."""
        with self.lock:
            self.frame_done()
            status = np.asarray(status, np.intp).reshape(-1)
            self.boxes_total += int(status.size)
            if status.size:
                for code, n in enumerate(np.bincount(status).tolist()):
                    if n:
                        self.box_status[code] += n
            self.boxes_ood += int(np.count_nonzero(np.asarray(is_ood)))
            if boxes_below_token is not None:
                self.counters["boxes_below_token"] += boxes_below_token
            self.lat_node.append(node_ms)
            self.lat_pipeline.append(pipeline_ms)
            if error:
                self.counters["backend_error_frames"] += 1

    def frame_time(self, frame_ms: float) -> None:
        """Everything done for a frame (alerts and drawing too) took ``frame_ms``."""
        with self.lock:
            self.lat_frame.append(frame_ms)

    def latencies(self) -> Tuple[List[float], List[float], List[float]]:
        """(node, pipeline, frame) latencies of the last :data:`LATENCY_WINDOW` frames, ms."""
        with self.lock:
            return list(self.lat_node), list(self.lat_pipeline), list(self.lat_frame)

    # ------------------------------------------------------------------ transport
    def watch_transport(self, now: float, advice: str = "") -> Tuple[bool, str, str]:
        """Update each stream's share lost in transport at time ``now`` (s): ``(raised, was, now)``,
        ``raised`` when a stream just went over ``loss_warn_fraction``, ``was`` / ``now`` the warning
        before and after (empty: none; ``advice``, the likely cause, ends it)."""
        with self.lock:
            events = {k: self.loss_watch[k].update(now, self.received[k], self.loss[k].lost) for k in STREAMS}
            over = [(k, w) for k, w in self.loss_watch.items() if w.over]
            was = self.transport_warning
            self.transport_warning = (
                "; ".join(f"{w.share:.0%} of {k} messages lost in transport over the last "
                          f"{w.window_s:g} s ({w.counts[0]} of {w.counts[1]})" for k, w in over)
                + f": {advice}") if over else ""
            return any(e == "raised" for e in events.values()), was, self.transport_warning

    # ------------------------------------------------------------------ snapshot
    def snapshot(self, worker_busy: bool = False, node_counters: Optional[Mapping[str, int]] = None) -> Dict[str, Any]:
        """The books now: ``received`` {stream: n}, ``lost`` {stream: n} (messages that never reached
        the node: the larger of the gaps in the publishers' sequence numbers and the middleware's
        plausible message-lost counts; published = received + lost), ``lost_detail`` {stream: figures
        of :class:`.loss.StreamLoss`}, ``transport_problems`` (loss figures that cannot be true:
        non-empty = not balanced), ``transport_warning`` (set while a stream's share lost in transport
        is over ``loss_warn_fraction``), ``input_drops`` {reason: n}, ``pairer`` (the pairer's
        counters), ``pairer_by_stream``, ``frames_scored``, ``frame_drops`` {reason: n}, ``queued``,
        ``in_flight`` (taken by a worker, not yet accounted for), ``worker_busy`` (a scoring thread
        still on a batch: ``worker_busy`` given), ``boxes_total``, ``boxes_by_status`` {name: n},
        ``boxes_ood``, ``counters`` (``node_counters`` and this camera's: ``qos_incompatible``,
        ``frame_id_mismatch``, ``backend_error_frames``, ...), and ``balanced`` by the rule above."""
        with self.lock:
            pc = dict(self.pairer.counters) if self.pairer is not None else {}
            frame_drops, input_drops = dict(self.frame_drops), dict(self.input_drops)
            queued, in_flight = len(self.queue), self.in_flight
            transport_problems = [f"{k}: {p}" for k in STREAMS for p in self.loss[k].problems()]
            inputs_ok = (self.received["image"] + self.received["detections"]
                         == pc.get("images_received", 0) + pc.get("detections_received", 0) + sum(input_drops.values()))
            pairer_ok = self.pairer.check_accounting() if self.pairer is not None else True
            frames_ok = pc.get("pairs", 0) == self.frames_scored + sum(frame_drops.values()) + queued + in_flight
            return {
                "received": dict(self.received),
                "lost": {k: self.loss[k].lost for k in STREAMS},
                "lost_detail": {k: self.loss[k].detail() for k in STREAMS},
                "transport_problems": transport_problems,
                "transport_warning": self.transport_warning,
                "input_drops": input_drops,
                "pairer": pc,
                "pairer_by_stream": self.pairer.dropped_by_stream() if self.pairer is not None else {},
                "frames_scored": self.frames_scored,
                "frame_drops": frame_drops,
                "queued": queued,
                "in_flight": in_flight,
                "worker_busy": bool(worker_busy),
                "boxes_total": self.boxes_total,
                "boxes_by_status": {BoxStatus(c).name if c in BoxStatus._value2member_map_ else str(c): n
                                    for c, n in sorted(self.box_status.items())},
                "boxes_ood": self.boxes_ood,
                "counters": {**(node_counters or {}), **self.counters},
                "balanced": bool(inputs_ok and pairer_ok and frames_ok and not transport_problems),
            }


class Accounting:
    """The node's books: one :class:`CameraLedger` per camera (:attr:`cameras`, in order), the
    node's own counters (``timer_internal_error``), the backend calls and the frames they scored,
    and how many scoring threads are busy with a batch. One re-entrant :attr:`lock` guards all of
    it (the ledgers made by :meth:`ledger` share it)."""

    def __init__(self):
        self.lock = threading.RLock()
        self.cameras: List[CameraLedger] = []
        self.reset()

    def ledger(self, name: str = "", **loss: Any) -> CameraLedger:
        """A new ledger sharing :attr:`lock` (not yet one of :attr:`cameras`: :meth:`set_cameras`)."""
        return CameraLedger(name, lock=self.lock, **loss)

    def set_cameras(self, ledgers: Sequence[CameraLedger]) -> None:
        with self.lock:
            self.cameras = list(ledgers)

    def reset(self) -> None:
        """Every count back to zero (each camera's too)."""
        with self.lock:
            for led in self.cameras:
                led.reset()
            self.node_counters: Dict[str, int] = collections.Counter()
            self.backend_calls = 0
            self.batched_frames = 0
            self.busy = 0  # scoring threads working on a batch

    def count_node(self, key: str) -> None:
        with self.lock:
            self.node_counters[key] += 1

    def backend_call(self, n_frames: int) -> None:
        """One backend call scored ``n_frames`` frames (one per camera at most)."""
        with self.lock:
            self.backend_calls += 1
            self.batched_frames += n_frames

    def frames_per_call(self) -> float:
        with self.lock:
            return self.batched_frames / self.backend_calls if self.backend_calls else 0.0

    def batch(self, delta: int) -> None:
        """A scoring thread starts (+1) or ends (-1) a batch."""
        with self.lock:
            self.busy += delta

    def camera(self, name: str) -> CameraLedger:
        for led in self.cameras:
            if led.name == name:
                return led
        raise KeyError(f"no camera {name!r} (cameras: {[c.name for c in self.cameras]})")

    def camera_snapshot(self, ledger: CameraLedger) -> Dict[str, Any]:
        with self.lock:
            return ledger.snapshot(bool(self.busy), self.node_counters)

    def snapshot(self, camera: Optional[str] = None, per_camera: bool = False) -> Dict[str, Any]:
        """One camera's snapshot (``camera``; the first when None and not ``per_camera``), or with
        ``per_camera`` ``{"cameras": {name: snapshot}, "balanced": all balanced, "backend_calls": n,
        "frames_per_backend_call": mean}``. No cameras yet: a fresh ledger's (all zero)."""
        with self.lock:
            if not self.cameras:
                return self.camera_snapshot(CameraLedger())
            if camera is not None or not per_camera:
                return self.camera_snapshot(self.cameras[0] if camera is None else self.camera(camera))
            cams = {c.name: self.camera_snapshot(c) for c in self.cameras}
            return {"cameras": cams, "balanced": all(a["balanced"] for a in cams.values()),
                    "backend_calls": self.backend_calls, "frames_per_backend_call": self.frames_per_call()}


__all__ = ["STREAMS", "FRAME_REASONS", "LATENCY_WINDOW", "CameraLedger", "Accounting"]
