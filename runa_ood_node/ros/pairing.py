"""Pair camera images with detector outputs by header stamp (pure Python, no rclpy).

A detector publishes ``Detection2DArray`` messages stamped with the stamp of the image it ran on,
usually later than the image and for a subset of the frames. :class:`StampPairer` buffers both
streams and emits ``(image, detections)`` pairs:

* **exact** match of the stamps (``slop_ns == 0``, the default), or the **nearest** stamp of the
  other stream within ``slop_ns`` (for detectors that re-stamp their output slightly);
* output pairs are **monotonic** in time on both streams: once a pair at image stamp ``T`` has been
  emitted, nothing older than ``T`` is emitted any more (downstream alert logic relies on it);
* both streams are assumed to be **in order** (each stream's stamps increase), which is what a
  camera and a detector produce. A message of stream A still waiting when stream B has moved more
  than ``slop_ns`` past its stamp can never be paired and leaves at once;
* buffers are **bounded**: ``max_buffer`` messages per stream and ``max_age_ns`` of stamp time
  relative to the newest stamp seen on the same stream.

Every message that leaves without being paired is counted with a reason (``REASONS``):

``image_without_detections``
    an image whose detections never came (the detector skipped the frame, or dropped it), or that
    waited longer than ``max_age_ns``, or was passed over by a newer pair.
``detections_without_image``
    detections whose image never came (image dropped by the transport, or already expired).
``buffer_overflow``
    the oldest message of a stream whose buffer held ``max_buffer`` messages.
``out_of_order``
    a message stamped before the last pair emitted on its stream (it can no longer be paired
    without going back in time), e.g. a bag looped or a clock jumped back.
``time_jump_back``
    a message still waiting when a stamp more than ``max_age_ns`` older than its stream's newest
    arrived: the bag was looped or restarted, or the clock jumped back. The pairer then starts
    afresh (both buffers emptied, ``restarts`` counted) instead of rejecting everything from then on.
``duplicate_stamp``
    a second message with the stamp of a message already buffered or already paired on the same
    stream (the first one wins).

Accounting: for each stream, ``received == paired + dropped + pending`` holds at all times
(:meth:`StampPairer.check_accounting`). Stamps are integer nanoseconds (``stamp_to_ns``).
Not thread-safe: call it from one thread, or hold a lock (the node does).
"""
from __future__ import annotations

import bisect
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

__all__ = ["StampPairer", "Pair", "Drop", "PairerOutput", "REASONS", "IMAGE", "DETECTIONS"]

IMAGE = "image"
DETECTIONS = "detections"

IMAGE_WITHOUT_DETECTIONS = "image_without_detections"
DETECTIONS_WITHOUT_IMAGE = "detections_without_image"
BUFFER_OVERFLOW = "buffer_overflow"
OUT_OF_ORDER = "out_of_order"
DUPLICATE_STAMP = "duplicate_stamp"
TIME_JUMP_BACK = "time_jump_back"
#: Every reason a message can leave the pairer unpaired.
REASONS: Tuple[str, ...] = (IMAGE_WITHOUT_DETECTIONS, DETECTIONS_WITHOUT_IMAGE, BUFFER_OVERFLOW, OUT_OF_ORDER,
                            DUPLICATE_STAMP, TIME_JUMP_BACK)

_NOT_PAIRED = {IMAGE: IMAGE_WITHOUT_DETECTIONS, DETECTIONS: DETECTIONS_WITHOUT_IMAGE}
_OTHER = {IMAGE: DETECTIONS, DETECTIONS: IMAGE}


@dataclass
class Pair:
    """An image and the detections that belong to it (stamps in ns)."""

    image_stamp_ns: int
    image: Any
    detections_stamp_ns: int
    detections: Any


@dataclass
class Drop:
    """A message that left the pairer unpaired."""

    kind: str  # IMAGE or DETECTIONS
    stamp_ns: int
    reason: str  # one of REASONS
    message: Any = None


@dataclass
class PairerOutput:
    """What one :meth:`StampPairer.add_image` / :meth:`StampPairer.add_detections` call produced."""

    pairs: List[Pair] = field(default_factory=list)
    drops: List[Drop] = field(default_factory=list)
    restarted: bool = False  # this message's stamp jumped back by > max_age_ns: the pairer started afresh


class _Stream:
    """One side's buffer: stamps kept sorted, payloads alongside."""

    def __init__(self, kind: str):
        self.kind = kind
        self.stamps: List[int] = []
        self.msgs: List[Any] = []
        self.newest: Optional[int] = None  # newest stamp ever accepted on this stream
        self.last_paired: Optional[int] = None  # stamp of the last message of this stream in a pair
        self.received = 0
        self.paired = 0
        self.dropped: Dict[str, int] = {r: 0 for r in REASONS}

    def insert(self, stamp: int, msg: Any) -> None:
        i = bisect.bisect_left(self.stamps, stamp)
        self.stamps.insert(i, stamp)
        self.msgs.insert(i, msg)

    def pop(self, i: int) -> Tuple[int, Any]:
        return self.stamps.pop(i), self.msgs.pop(i)

    def __len__(self) -> int:
        return len(self.stamps)


class StampPairer:
    """Pairs images and detections by header stamp (see the module docstring for the rules).

    Args:
        slop_ns: maximum ``|image stamp - detections stamp|`` (ns) of a pair; 0 = exact stamps.
        max_buffer: messages kept per stream while waiting for their partner (>= 1).
        max_age_ns: a waiting message older than the newest stamp of its own stream by more than
            this (ns) is given up (default 2 s of stamp time; must be >= ``slop_ns``).
    """

    def __init__(self, slop_ns: int = 0, max_buffer: int = 30, max_age_ns: int = 2_000_000_000):
        slop_ns, max_buffer, max_age_ns = int(slop_ns), int(max_buffer), int(max_age_ns)
        if slop_ns < 0:
            raise ValueError(f"slop_ns must be >= 0, got {slop_ns}")
        if max_buffer < 1:
            raise ValueError(f"max_buffer must be >= 1, got {max_buffer}")
        if max_age_ns < slop_ns:
            raise ValueError(f"max_age_ns ({max_age_ns}) must be >= slop_ns ({slop_ns})")
        self.slop_ns = slop_ns
        self.max_buffer = max_buffer
        self.max_age_ns = max_age_ns
        self.restarts = 0  # times a stamp jumped back by more than max_age_ns (looped bag, clock jump)
        self._streams = {IMAGE: _Stream(IMAGE), DETECTIONS: _Stream(DETECTIONS)}

    # ------------------------------------------------------------------ public API
    def add_image(self, stamp_ns: int, image: Any) -> PairerOutput:
        """Offer an image stamped ``stamp_ns``; returns the pairs completed and messages dropped."""
        return self._add(IMAGE, int(stamp_ns), image)

    def add_detections(self, stamp_ns: int, detections: Any) -> PairerOutput:
        """Offer a detections message stamped ``stamp_ns`` (the stamp of the image it ran on)."""
        return self._add(DETECTIONS, int(stamp_ns), detections)

    def flush(self) -> List[Drop]:
        """Give up every waiting message (e.g. at deactivation); they count as not paired."""
        out = PairerOutput()
        for kind, s in self._streams.items():
            while len(s):
                self._drop(s, 0, _NOT_PAIRED[kind], out)
        return out.drops

    @property
    def counters(self) -> Dict[str, int]:
        """Flat counters: ``pairs``, ``images_received``, ``detections_received``,
        ``images_pending``, ``detections_pending`` and one entry per reason in :data:`REASONS`
        (summed over both streams)."""
        im, de = self._streams[IMAGE], self._streams[DETECTIONS]
        c = {
            "pairs": im.paired,
            "restarts": self.restarts,
            "images_received": im.received,
            "detections_received": de.received,
            "images_pending": len(im),
            "detections_pending": len(de),
        }
        for r in REASONS:
            c[r] = im.dropped[r] + de.dropped[r]
        return c

    def dropped_by_stream(self) -> Dict[str, Dict[str, int]]:
        """``{"image": {reason: n}, "detections": {reason: n}}``."""
        return {k: dict(s.dropped) for k, s in self._streams.items()}

    def pending(self) -> Dict[str, int]:
        return {k: len(s) for k, s in self._streams.items()}

    def check_accounting(self) -> bool:
        """True when, for both streams, received == paired + dropped + pending."""
        return all(s.received == s.paired + sum(s.dropped.values()) + len(s) for s in self._streams.values())

    # ------------------------------------------------------------------ internals
    def _drop(self, s: _Stream, i: int, reason: str, out: PairerOutput) -> None:
        stamp, msg = s.pop(i)
        s.dropped[reason] += 1
        out.drops.append(Drop(s.kind, stamp, reason, msg))

    def _reject(self, s: _Stream, stamp: int, msg: Any, reason: str, out: PairerOutput) -> PairerOutput:
        s.dropped[reason] += 1
        out.drops.append(Drop(s.kind, stamp, reason, msg))
        return out

    def _add(self, kind: str, stamp: int, msg: Any) -> PairerOutput:
        out = PairerOutput()
        me, other = self._streams[kind], self._streams[_OTHER[kind]]
        me.received += 1

        # 0. a stamp far behind this stream's newest: looped bag / restarted source / clock jump.
        #    Start afresh rather than reject every later message as out of order.
        if me.newest is not None and stamp < me.newest - self.max_age_ns:
            for s in (me, other):
                while len(s):
                    self._drop(s, 0, TIME_JUMP_BACK, out)
                s.newest = s.last_paired = None
            self.restarts += 1
            out.restarted = True

        # 1. can this message still be emitted without going back in time?
        if me.last_paired is not None:
            if stamp == me.last_paired:
                return self._reject(me, stamp, msg, DUPLICATE_STAMP, out)
            if stamp < me.last_paired:
                return self._reject(me, stamp, msg, OUT_OF_ORDER, out)
        i = bisect.bisect_left(me.stamps, stamp)
        if i < len(me) and me.stamps[i] == stamp:
            return self._reject(me, stamp, msg, DUPLICATE_STAMP, out)
        me.newest = stamp if me.newest is None else max(me.newest, stamp)

        # 2. partner waiting? nearest stamp within the slop (ties: the older one)
        j = self._nearest(other, stamp)
        if j is not None:
            o_stamp, o_msg = other.pop(j)
            if kind == IMAGE:
                pair = Pair(stamp, msg, o_stamp, o_msg)
            else:
                pair = Pair(o_stamp, o_msg, stamp, msg)
            out.pairs.append(pair)
            me.paired += 1
            other.paired += 1
            me.last_paired, other.last_paired = stamp, o_stamp
            # everything older than the pair can no longer be emitted (outputs are monotonic)
            for s, t in ((me, stamp), (other, o_stamp)):
                while len(s) and s.stamps[0] < t:
                    self._drop(s, 0, _NOT_PAIRED[s.kind], out)
        elif other.newest is not None and other.newest > stamp + self.slop_ns:
            # the other (in-order) stream has already moved past this stamp: its partner never comes
            self._reject(me, stamp, msg, _NOT_PAIRED[kind], out)
        else:
            me.insert(stamp, msg)

        # 3. waiting messages of the other stream that this stream has now moved past
        while len(other) and other.stamps[0] + self.slop_ns < me.newest:
            self._drop(other, 0, _NOT_PAIRED[other.kind], out)
        # 4. age and size limits of both buffers
        for s in (me, other):
            while len(s) and s.newest - s.stamps[0] > self.max_age_ns:
                self._drop(s, 0, _NOT_PAIRED[s.kind], out)
            while len(s) > self.max_buffer:
                self._drop(s, 0, BUFFER_OVERFLOW, out)
        return out

    def _nearest(self, s: _Stream, stamp: int) -> Optional[int]:
        if not len(s):
            return None
        i = bisect.bisect_left(s.stamps, stamp)
        if self.slop_ns == 0:
            return i if i < len(s) and s.stamps[i] == stamp else None
        best, best_d = None, None
        for j in (i - 1, i):
            if 0 <= j < len(s):
                d = abs(s.stamps[j] - stamp)
                if d <= self.slop_ns and (best_d is None or d < best_d):
                    best, best_d = j, d
        return best
