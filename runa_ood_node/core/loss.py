"""Messages lost between a publisher and the node: counted right and checked (the policy; ROS-free).

The node applies it to every subscription (``ros.node``; the Fast DDS profile helpers and the advice
it gives are in ``ros.transport``), unit-tested without DDS.

**Counting** (:class:`StreamLoss`, one per subscription). A DDS writer numbers its samples 1, 2, 3,
... (64-bit; rclpy hands the number over as ``publication_sequence_number`` with the writer's
``publisher_gid``). Per publisher, a message whose number jumps past the highest one seen reveals
the messages in between as lost; a message that arrives late into such a gap (reordering) takes its
loss back. Two figures are *not* losses:

* a jump larger than ``max_gap`` (forwards or backwards) is implausible for one publisher: it is
  counted as a ``sequence_jump`` (a new epoch of that publisher: a restarted writer whose GID was
  reused, a corrupted number) and counting restarts from it. A sequence number's high word read as
  a count (13 x 2^32 = 55,834,574,848 "lost" after 560 images) can no longer happen;
* the middleware's own message-lost reports (``message_lost`` event) are taken only when they are
  plausible (0 < n <= ``max_gap``). Fast DDS 3.2 under its default transports reports counts such
  as 2^64 - 2^31 (a negative 32-bit count sign-extended) when fragmented images are lost: these are
  *rejected* (``rejected_reports``), never added, and make :meth:`StreamLoss.problems` non-empty
  (the node shows an ERROR and an unbalanced accounting: a loss figure that cannot be true must not
  look like a balance).

``lost`` is the larger of the two sound figures: sequence gaps (sees losses between two received
messages of a publisher) and accepted middleware reports (also see losses after the last received
message and of publishers never heard from). Published = received + lost.

**Announcing** (:class:`LossWatch`). Over a sliding window (``transport.loss_window_s``), when the
share of a stream's messages lost in transport reaches ``transport.loss_warn_fraction``, the node
says so once in its log and keeps a WARN in /diagnostics while it lasts (``ros.transport.loss_advice`` names
the likely cause: Fast DDS's default transports cut a large image into fragments through a 512 KiB
shared-memory segment and lose them in bursts; the shipped profile ``config/fastdds_one_host.xml``
carries an image in one piece).
"""
from __future__ import annotations

import collections
from typing import Deque, Dict, List, Optional, Tuple

__all__ = ["StreamLoss", "LossWatch", "SEQ_UNKNOWN"]

#: ``publication_sequence_number`` values that mean "not provided" (rmw: 0 or UINT64_MAX)
SEQ_UNKNOWN = (0, 2 ** 64 - 1)


class _Publisher:
    __slots__ = ("first", "high", "missing")

    def __init__(self, seq: int):
        self.first = seq  # first number of the current epoch
        self.high = seq  # highest number seen in it
        self.missing: set = set()  # numbers counted as lost that may still arrive late (bounded window)

    @property
    def span(self) -> int:
        return self.high - self.first + 1


class StreamLoss:
    """Messages of one subscription lost before reaching the node (see the module docstring).

    Args:
        max_gap: the largest believable gap between two messages of one publisher (a larger jump
            is a new epoch, counted in ``sequence_jumps``, not as losses); also the largest
            middleware report accepted.
        reorder_window: a message up to this many numbers behind its publisher's highest one can
            still take back its loss (arrived late); older ones are counted as ``too_late``.
        max_publishers: publishers remembered at once (the least recently heard is forgotten;
            its losses stay counted).
    """

    def __init__(self, max_gap: int = 10_000, reorder_window: int = 1024, max_publishers: int = 64):
        if max_gap < 1 or reorder_window < 0 or max_publishers < 1:
            raise ValueError("max_gap and max_publishers must be >= 1, reorder_window >= 0")
        self.max_gap = int(max_gap)
        self.reorder_window = int(reorder_window)
        self.max_publishers = int(max_publishers)
        self._pubs: "collections.OrderedDict[bytes, _Publisher]" = collections.OrderedDict()
        self.gap_lost = 0  # from sequence numbers (gaps, minus late arrivals into them)
        self.reported_lost = 0  # accepted middleware reports
        self.received = 0  # messages with a sequence number
        self.no_sequence = 0  # messages without one (middleware without the feature)
        self.late = 0  # arrived late into a gap (reordered): their loss was taken back
        self.duplicates = 0  # a number seen before (or too old to tell)
        self.sequence_jumps = 0  # implausible jumps: new epochs, not losses
        self.publishers = 0  # publishers (epochs not counted) heard from
        self.rejected_reports = 0  # middleware reports that cannot be true (negative, > max_gap)
        self.last_rejected: Optional[int] = None
        self.last_jump: Optional[Tuple[int, int]] = None  # (highest before, number after)
        self._retired_span = 0  # spans of forgotten publishers and ended epochs

    # ------------------------------------------------------------------ sequence numbers
    def note(self, gid: bytes, seq) -> int:
        """A message from publisher ``gid`` numbered ``seq`` reached the node. Returns the change in
        ``gap_lost`` it caused (> 0: a gap revealed, -1: a late arrival took its loss back)."""
        try:
            seq = int(seq)
        except (TypeError, ValueError):
            seq = 0
        if seq in SEQ_UNKNOWN or seq < 0 or seq > SEQ_UNKNOWN[1]:
            self.no_sequence += 1
            return 0
        self.received += 1
        p = self._pubs.get(gid)
        if p is None:  # a new publisher: messages before its first one may predate our subscription
            if len(self._pubs) >= self.max_publishers:
                _, old = self._pubs.popitem(last=False)
                self._retired_span += old.span
            self._pubs[gid] = _Publisher(seq)
            self.publishers += 1
            return 0
        self._pubs.move_to_end(gid)
        if seq > p.high:
            gap = seq - p.high - 1
            if gap > self.max_gap:
                return self._new_epoch(p, seq)
            if gap:
                self.gap_lost += gap
                if self.reorder_window:
                    p.missing.update(range(max(p.high + 1, seq - self.reorder_window), seq))
            p.high = seq
            if p.missing:
                floor = seq - self.reorder_window
                p.missing = {m for m in p.missing if m >= floor} if min(p.missing) < floor else p.missing
            return gap
        if seq in p.missing:
            p.missing.discard(seq)
            self.gap_lost -= 1
            self.late += 1
            return -1
        if p.high - seq > self.max_gap:
            return self._new_epoch(p, seq)
        if seq < p.first:  # published before the first one we heard of, arrived late: not counted lost
            p.first = seq
            self.late += 1
            return 0
        self.duplicates += 1
        return 0

    def _new_epoch(self, p: _Publisher, seq: int) -> int:
        self.sequence_jumps += 1
        self.last_jump = (p.high, seq)
        self._retired_span += p.span
        p.first = p.high = seq
        p.missing = set()
        return 0

    # ------------------------------------------------------------------ middleware reports
    def report(self, n) -> bool:
        """The middleware says ``n`` more messages were lost (message-lost event). Taken when
        0 <= n <= max_gap; anything else cannot be true: rejected and remembered. True when taken."""
        try:
            n = int(n)
        except (TypeError, ValueError):
            n = -1
        if n < 0 or n > self.max_gap:
            self.rejected_reports += 1
            self.last_rejected = n
            return False
        self.reported_lost += n
        return True

    # ------------------------------------------------------------------ figures
    @property
    def lost(self) -> int:
        """Messages lost in transport: the larger of the two sound figures."""
        return max(self.gap_lost, self.reported_lost)

    @property
    def span(self) -> int:
        """Messages the heard-from publishers numbered in the epochs seen: an upper bound of what
        they published while heard from (losses counted from gaps can never exceed it)."""
        return self._retired_span + sum(p.span for p in self._pubs.values())

    def problems(self) -> List[str]:
        """What makes this stream's loss figures untrue (empty = sound)."""
        out = []
        if self.gap_lost < 0 or self.reported_lost < 0:
            out.append(f"negative loss count (sequence gaps {self.gap_lost}, middleware {self.reported_lost})")
        if self.gap_lost > self.span:
            out.append(f"{self.gap_lost} lost from sequence gaps exceeds the {self.span} messages the publishers "
                       "numbered")
        if self.rejected_reports:
            out.append(f"the middleware reported {self.rejected_reports} impossible loss count(s) (last "
                       f"{self.last_rejected}{_as_int32(self.last_rejected)}); not counted, so lost_in_transport "
                       "comes from sequence numbers only")
        return out

    def detail(self) -> Dict[str, int]:
        return {"sequence_gaps": self.gap_lost, "middleware_reports": self.reported_lost,
                "rejected_reports": self.rejected_reports, "sequence_jumps": self.sequence_jumps,
                "late": self.late, "duplicates": self.duplicates, "publishers": self.publishers,
                "no_sequence": self.no_sequence}


def _as_int32(n: Optional[int]) -> str:
    """`` = -2147483648 as a 32-bit count`` for a value that is a negative 32-bit count widened."""
    if n is None or n < 2 ** 31:
        return ""
    for bits in (64, 32):
        v = n - 2 ** bits
        if -2 ** 31 <= v < 0:
            return f" = {v} as a signed count"
    return ""


class LossWatch:
    """Share of a stream's messages lost in transport over the last ``window_s`` seconds, against
    ``fraction``: :meth:`update` (call it periodically with the cumulative figures) answers
    ``"raised"`` once when the share reaches the threshold, ``"cleared"`` once when it falls below
    it again (hysteresis: half the threshold), else None. ``over`` / ``share`` / ``counts`` hold the
    current state. Needs at least ``min_messages`` in the window to judge."""

    def __init__(self, fraction: float = 0.2, window_s: float = 10.0, min_messages: int = 20):
        self.fraction = float(fraction)
        self.window_s = float(window_s)
        self.min_messages = int(min_messages)
        self._hist: Deque[Tuple[float, int, int]] = collections.deque()
        self.over = False
        self.share = 0.0
        self.counts = (0, 0)  # (lost, published) in the window

    def update(self, now: float, received: int, lost: int) -> Optional[str]:
        if self.fraction <= 0:  # disabled
            return None
        self._hist.append((now, int(received), int(lost)))
        while len(self._hist) > 2 and self._hist[1][0] <= now - self.window_s:
            self._hist.popleft()
        t0, r0, l0 = self._hist[0]
        d_lost, d_recv = max(0, lost - l0), max(0, received - r0)
        total = d_lost + d_recv
        self.counts = (d_lost, total)
        self.share = d_lost / total if total else 0.0
        if not self.over and total >= self.min_messages and self.share >= self.fraction:
            self.over = True
            return "raised"
        if self.over and (self.share < self.fraction / 2 or total == 0):
            self.over = False
            return "cleared"
        return None
