"""Pair camera images with detector outputs by header stamp (pure Python, no rclpy).

A detector publishes ``Detection2DArray`` messages stamped with the stamp of the image it ran on,
usually later than the image and for a subset of the frames. :class:`StampPairer` buffers both
streams and emits ``(image, detections)`` pairs:

* **exact** match of the stamps (``slop_ns == 0``, the default), or the **nearest** stamp of the
  other stream within ``slop_ns`` (for detectors that re-stamp their output slightly);
* output pairs are **monotonic** in time on both streams: once a pair at image stamp ``T`` has been
  emitted, nothing older than ``T`` is emitted any more (downstream alert logic relies on it);
* **no stamp is answered twice**: a stamp paired once is never paired again, also after a restart
  (below): the spans of stamps answered before each restart are remembered (the last 1024 spans);
* both streams are assumed to be **in order** (each stream's stamps increase), which is what a
  camera and a detector produce. A message of stream A still waiting when stream B has moved more
  than ``slop_ns`` past its stamp can never be paired and leaves at once;
* buffers are **bounded**: ``max_buffer`` messages per stream and ``max_age_ns`` of stamp time
  relative to the newest stamp seen on the same stream.

**The stamp rule (far stamps).** Each stream has a clock: the newest stamp *accepted* on it (the
very first message sets it). A message stamped more than ``max_future_ns`` (default 1 s) after the
newer of the two clocks is dropped as ``stamp_in_future`` (the newer clock, so that a slow
detector, whose detections lag the images and arrive seconds apart, is never "in the future"); one
stamped more than ``max_age_ns`` (default 2 s) before its own stream's clock (the other stream's
while its own has none, e.g. just after a restart) as ``stamp_too_old``. Neither moves any clock,
so a single glitched stamp - a camera clock hiccup, a corrupted header - costs that one message
and nothing else. ``max_future_ns`` must therefore exceed the camera's frame period. A *real* clock
jump (a looped or restarted bag, a camera clock step, a source restarted after a pause) shows up as
``jump_confirm`` (default 3) consecutive far messages on one stream in the same direction that
continue one another (increasing, each within ``max_age_ns`` of the previous): the last of them
restarts the pairer (messages still waiting leave as ``time_jump_back``, both clocks are reset,
``restarts`` is counted) and is accepted, so a jump costs ``jump_confirm - 1`` messages of the
jumping stream. A stream gap longer than ``max_future_ns`` (camera paused) counts as such a jump.

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
    without going back in time), up to ``max_age_ns`` back.
``duplicate_stamp``
    a second message with the stamp of a message already buffered or already paired on the same
    stream (the first one wins).
``answered_before``
    a message stamped within a span of stamps already answered before a restart (e.g. a looped
    bag replaying the same stamps): answering it would give a stamp a second answer.
``stamp_in_future`` / ``stamp_too_old``
    a far stamp (the stamp rule above); a message that confirms a jump is not dropped.
``time_jump_back``
    a message still waiting when a clock jump was confirmed (either direction: the name is kept
    for the common case, a looped bag); the pairer then starts afresh.

Accounting: for each stream, ``received == paired + dropped + pending`` holds at all times
(:meth:`StampPairer.check_accounting`). Stamps are integer nanoseconds (``stamp_to_ns``).
Not thread-safe: call it from one thread, or hold a lock (the node does).
"""
from __future__ import annotations

import bisect
import collections
from dataclasses import dataclass, field
from typing import Any, Deque, Dict, List, Optional, Tuple

__all__ = ["StampPairer", "Pair", "Drop", "PairerOutput", "REASONS", "IMAGE", "DETECTIONS", "STAMP_IN_FUTURE",
           "STAMP_TOO_OLD", "ANSWERED_BEFORE", "TIME_JUMP_BACK"]

IMAGE = "image"
DETECTIONS = "detections"

IMAGE_WITHOUT_DETECTIONS = "image_without_detections"
DETECTIONS_WITHOUT_IMAGE = "detections_without_image"
BUFFER_OVERFLOW = "buffer_overflow"
OUT_OF_ORDER = "out_of_order"
DUPLICATE_STAMP = "duplicate_stamp"
TIME_JUMP_BACK = "time_jump_back"
STAMP_IN_FUTURE = "stamp_in_future"
STAMP_TOO_OLD = "stamp_too_old"
ANSWERED_BEFORE = "answered_before"
#: Every reason a message can leave the pairer unpaired.
REASONS: Tuple[str, ...] = (IMAGE_WITHOUT_DETECTIONS, DETECTIONS_WITHOUT_IMAGE, BUFFER_OVERFLOW, OUT_OF_ORDER,
                            DUPLICATE_STAMP, ANSWERED_BEFORE, STAMP_IN_FUTURE, STAMP_TOO_OLD, TIME_JUMP_BACK)
#: spans of answered stamps remembered across restarts (per stream)
ANSWERED_SPANS = 1024

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
    restarted: bool = False  # this message confirmed a clock jump: the pairer started afresh


class _Stream:
    """One side's buffer: stamps kept sorted, payloads alongside."""

    def __init__(self, kind: str):
        self.kind = kind
        self.stamps: List[int] = []
        self.msgs: List[Any] = []
        self.newest: Optional[int] = None  # newest stamp accepted on this stream (its clock)
        self.last_paired: Optional[int] = None  # stamp of the last message of this stream in a pair
        self.first_paired: Optional[int] = None  # first paired stamp since the last restart
        self.answered: Deque[Tuple[int, int]] = collections.deque(maxlen=ANSWERED_SPANS)  # before restarts
        self.jump: Optional[List[int]] = None  # far messages in a row: [direction, last stamp, count]
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
            this (ns) is given up, and a message stamped more than this before its stream's clock
            is ``stamp_too_old`` (default 2 s of stamp time; must be >= ``slop_ns``).
        max_future_ns: a message stamped more than this (ns) after its stream's clock is
            ``stamp_in_future`` (default 1 s; > 0).
        jump_confirm: consecutive far messages on one stream that make a real clock jump (>= 1;
            1 = every far message restarts the pairer at once).
    """

    def __init__(self, slop_ns: int = 0, max_buffer: int = 30, max_age_ns: int = 2_000_000_000,
                 max_future_ns: int = 1_000_000_000, jump_confirm: int = 3):
        slop_ns, max_buffer, max_age_ns = int(slop_ns), int(max_buffer), int(max_age_ns)
        max_future_ns, jump_confirm = int(max_future_ns), int(jump_confirm)
        if max_future_ns <= 0:
            raise ValueError(f"max_future_ns must be > 0, got {max_future_ns}")
        if jump_confirm < 1:
            raise ValueError(f"jump_confirm must be >= 1, got {jump_confirm}")
        if slop_ns < 0:
            raise ValueError(f"slop_ns must be >= 0, got {slop_ns}")
        if max_buffer < 1:
            raise ValueError(f"max_buffer must be >= 1, got {max_buffer}")
        if max_age_ns < slop_ns:
            raise ValueError(f"max_age_ns ({max_age_ns}) must be >= slop_ns ({slop_ns})")
        self.slop_ns = slop_ns
        self.max_buffer = max_buffer
        self.max_age_ns = max_age_ns
        self.max_future_ns = max_future_ns
        self.jump_confirm = jump_confirm
        self.restarts = 0  # confirmed clock jumps (looped bag, restarted source, clock step)
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

        # 0. the stamp rule: a far stamp is dropped without moving any clock, unless it is the
        #    jump_confirm-th far message in a row of a real clock jump (then start afresh)
        clocks = [t for t in (me.newest, other.newest) if t is not None]
        past_ref = me.newest if me.newest is not None else other.newest
        direction = 0
        if clocks:
            if stamp > max(clocks) + self.max_future_ns:  # ahead of both streams (detections lag)
                direction = 1
            elif stamp < past_ref - self.max_age_ns:
                direction = -1
        if direction == 0:
            me.jump = None
        else:
            j = me.jump
            if j is not None and j[0] == direction and j[1] < stamp <= j[1] + self.max_age_ns:
                j[1], j[2] = stamp, j[2] + 1
            else:
                me.jump = j = [direction, stamp, 1]
            if j[2] < self.jump_confirm:
                return self._reject(me, stamp, msg, STAMP_IN_FUTURE if direction > 0 else STAMP_TOO_OLD, out)
            self._restart(out)

        # 1. can this message still be emitted without going back in time, or a second time?
        if any(lo <= stamp <= hi for lo, hi in me.answered):
            return self._reject(me, stamp, msg, ANSWERED_BEFORE, out)
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
            for s_, t_ in ((me, stamp), (other, o_stamp)):
                if s_.first_paired is None:
                    s_.first_paired = t_
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

    def _restart(self, out: PairerOutput) -> None:
        """A confirmed clock jump: give up every waiting message, reset both clocks, and remember
        the span of stamps answered so far (they are never answered again)."""
        for s in self._streams.values():
            while len(s):
                self._drop(s, 0, TIME_JUMP_BACK, out)
            if s.first_paired is not None:
                s.answered.append((s.first_paired, s.last_paired))
            s.newest = s.last_paired = s.first_paired = None
            s.jump = None
        self.restarts += 1
        out.restarted = True

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
