"""Messages lost in transport, counted right without DDS (core/loss.py): 64-bit sequence numbers per
publisher, bounded reordering, plausible and impossible middleware reports, the once-only announcement.
The live checks with the node over real DDS are in tests/ros/test_transport_loss.py.
"""
from __future__ import annotations

from runa_ood_node.core.loss import LossWatch, StreamLoss

A, B = b"publisher-A", b"publisher-B"
HI = 2 ** 32


# ------------------------------------------------------------------ sequence numbers (no DDS)
def test_in_order_messages_lose_nothing():
    s = StreamLoss()
    for seq in range(1, 101):
        assert s.note(A, seq) == 0
    assert (s.lost, s.received, s.problems()) == (0, 100, [])


def test_a_gap_is_lost_and_a_late_arrival_takes_it_back():
    s = StreamLoss()
    for seq in (1, 2, 3, 7, 8):
        s.note(A, seq)
    assert s.gap_lost == 3 and s.lost == 3
    assert s.note(A, 5) == -1  # reordered, not lost
    assert (s.lost, s.late) == (2, 1)
    assert s.note(A, 5) == 0 and s.duplicates == 1 and s.lost == 2  # a duplicate takes nothing back twice
    assert s.note(A, 8) == 0 and s.duplicates == 2
    assert s.problems() == []


def test_sequence_numbers_across_the_32_bit_boundary_are_64_bit():
    s = StreamLoss()
    for seq in (HI - 2, HI - 1, HI, HI + 1, HI + 4):  # the high word ticks over: no jump, 2 lost
        s.note(A, seq)
    assert (s.lost, s.sequence_jumps) == (2, 0)
    s2 = StreamLoss()
    for seq in (13 * HI + 5, 13 * HI + 6, 13 * HI + 9):  # a publisher met far into its numbering
        s2.note(A, seq)
    assert (s2.lost, s2.sequence_jumps, s2.problems()) == (2, 0, [])


def test_a_high_word_jump_is_an_epoch_not_billions_of_losses():
    """The field report: 13 x 2^32 'lost' after 560 images. A jump beyond max_gap is counted as a
    sequence jump (a new epoch of the publisher), never as losses; counting goes on from there."""
    s = StreamLoss(max_gap=10_000)
    for seq in range(1, 11):
        s.note(A, seq)
    s.note(A, 13 * HI + 11)  # the high word set: 55,834,574,848 numbers ahead
    assert (s.lost, s.sequence_jumps, s.last_jump) == (0, 1, (10, 13 * HI + 11))
    s.note(A, 13 * HI + 14)
    assert s.lost == 2
    s.note(A, 12)  # and back: a jump again, not a late arrival
    assert (s.lost, s.sequence_jumps) == (2, 2)
    assert s.problems() == []
    s.note(A, 10_012)  # a gap of exactly max_gap - 1 ... still believable
    assert s.lost == 2 + 9_999 and s.sequence_jumps == 2


def test_publishers_are_counted_apart_and_interleaving_is_no_loss():
    s = StreamLoss()
    for a, b in zip(range(1, 51), range(1000, 1050)):
        s.note(A, a)
        s.note(B, b)
    assert (s.lost, s.publishers) == (0, 2)
    s.note(A, 53)  # A skips 2; B's numbers are its own
    s.note(B, 1050)
    assert s.lost == 2


def test_forgotten_publishers_keep_their_losses():
    s = StreamLoss(max_publishers=2)
    s.note(A, 1)
    s.note(A, 5)  # 3 lost
    for i in range(5):  # A is forgotten among new publishers
        s.note(bytes([i]), 1)
    assert s.lost == 3 and s.span >= 5 and s.problems() == []
    s.note(A, 6)  # A again: a new publisher as far as the counter knows, nothing lost
    assert s.lost == 3


def test_messages_without_a_sequence_number_are_not_counted():
    s = StreamLoss()
    for seq in (0, 2 ** 64 - 1, None, "x", -5):
        assert s.note(A, seq) == 0
    assert (s.no_sequence, s.received, s.lost) == (5, 0, 0)


def test_reorder_window_is_bounded():
    s = StreamLoss(reorder_window=10)
    s.note(A, 1)
    s.note(A, 500)  # 498 lost, only the last 10 numbers kept for late arrivals
    assert s.lost == 498
    assert s.note(A, 495) == -1 and s.lost == 497
    assert s.note(A, 100) == 0 and s.lost == 497 and s.duplicates == 1  # too late to tell: counted lost


# ------------------------------------------------------------------ the middleware's reports
def test_plausible_middleware_reports_count_and_the_larger_figure_wins():
    s = StreamLoss()
    s.note(A, 1)
    s.note(A, 4)  # 2 from the gap
    assert s.report(5) and s.report(0)
    assert (s.gap_lost, s.reported_lost, s.lost) == (2, 5, 5)
    assert s.problems() == []


def test_an_impossible_middleware_report_is_rejected_and_is_an_error():
    """Fast DDS 3.2 under its default transports reported total_count_change 2^64 - 2^31 (a negative
    32-bit count, sign-extended) when fragmented images were lost: never added, always an error."""
    s = StreamLoss(max_gap=10_000)
    s.note(A, 1)
    s.note(A, 3)
    for bad in (2 ** 64 - 2 ** 31, 2 ** 31 - 1, -1, 10_001):
        assert not s.report(bad)
    assert (s.lost, s.rejected_reports) == (1, 4)
    problems = s.problems()
    assert len(problems) == 1 and "impossible" in problems[0] and "4" in problems[0]
    s2 = StreamLoss()
    s2.report(2 ** 64 - 2 ** 31)
    assert "-2147483648" in s2.problems()[0]


def test_untrue_gap_figures_are_problems():
    s = StreamLoss()
    s.note(A, 1)
    s.note(A, 3)
    s.gap_lost = -1  # what a counting bug would leave
    assert any("negative" in p for p in s.problems())
    s.gap_lost = 10 ** 6
    assert any("exceeds" in p for p in s.problems())


# ------------------------------------------------------------------ the announcement
def test_loss_watch_raises_once_and_clears():
    w = LossWatch(fraction=0.2, window_s=5.0, min_messages=20)
    assert w.update(0.0, 0, 0) is None
    assert w.update(1.0, 10, 1) is None  # too few to judge
    assert w.update(2.0, 20, 2) is None and not w.over  # 2 of 22 lost: 9 %
    assert w.update(3.0, 22, 40) == "raised" and w.over  # since t=0: 40 lost of 62 published
    assert round(w.share, 2) == 0.65 and w.counts == (40, 62)
    assert w.update(4.0, 24, 60) is None and w.over  # still over: said once
    for t in range(5, 12):
        out = w.update(float(t), 24 + 30 * (t - 4), 60)  # 30 received a second, none lost
        if out is not None:
            break
    assert out == "cleared" and not w.over
    assert LossWatch(fraction=0.0).update(0.0, 0, 10 ** 6) is None  # 0 disables
