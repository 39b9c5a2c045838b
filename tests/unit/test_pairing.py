"""StampPairer: exact and slop pairing, every drop reason, bounded buffers, accounting."""
import random

import pytest

from runa_ood_node.ros.pairing import REASONS, StampPairer

MS = 1_000_000


def _pairs(out):
    return [(p.image_stamp_ns, p.detections_stamp_ns) for p in out.pairs]


def _drops(out):
    return [(d.kind, d.stamp_ns, d.reason) for d in out.drops]


def test_exact_pairing_detector_lagging_and_skipping_frames():
    p = StampPairer()
    for t in (1, 2, 3, 4):
        assert not p.add_image(t * 100 * MS, f"img{t}").pairs
    out = p.add_detections(100 * MS, "det1")
    assert _pairs(out) == [(100 * MS, 100 * MS)]
    assert out.pairs[0].image == "img1" and out.pairs[0].detections == "det1"
    # the detector skipped frame 2: when frame 3's detections arrive, image 2 leaves unpaired
    out = p.add_detections(300 * MS, "det3")
    assert _pairs(out) == [(300 * MS, 300 * MS)]
    assert _drops(out) == [("image", 200 * MS, "image_without_detections")]
    c = p.counters
    assert c["pairs"] == 2 and c["image_without_detections"] == 1 and c["images_pending"] == 1
    assert p.check_accounting()


def test_detections_before_image_wait_for_it():
    p = StampPairer()
    assert not p.add_detections(5 * MS, "d").pairs
    out = p.add_image(5 * MS, "i")
    assert _pairs(out) == [(5 * MS, 5 * MS)]
    assert p.counters["detections_pending"] == 0


def test_exact_mode_does_not_pair_nearby_stamps():
    p = StampPairer(slop_ns=0)
    p.add_image(100 * MS, "i")
    out = p.add_detections(101 * MS, "d")
    assert not out.pairs
    # detections at 101 ms moved the detector stream past the image at 100 ms
    assert _drops(out) == [("image", 100 * MS, "image_without_detections")]


def test_slop_pairs_nearest_within_slop():
    p = StampPairer(slop_ns=10 * MS)
    p.add_image(100 * MS, "a")
    p.add_image(108 * MS, "b")
    out = p.add_detections(106 * MS, "d")  # 6 ms from a, 2 ms from b -> b; a is passed over
    assert _pairs(out) == [(108 * MS, 106 * MS)]
    assert _drops(out) == [("image", 100 * MS, "image_without_detections")]
    # outside the slop: no pair; the detections wait (images may still come)
    out = p.add_detections(150 * MS, "far")
    assert not out.pairs and p.counters["detections_pending"] == 1
    out = p.add_image(165 * MS, "late")  # 15 ms > slop: images moved past 150 -> detections dropped
    assert _drops(out) == [("detections", 150 * MS, "detections_without_image")]
    assert p.check_accounting()


def test_slop_tie_takes_the_older_stamp():
    p = StampPairer(slop_ns=5 * MS)
    p.add_image(95 * MS, "old")
    p.add_image(105 * MS, "new")
    out = p.add_detections(100 * MS, "d")
    assert out.pairs[0].image == "old"


def test_detections_without_image():
    p = StampPairer()
    p.add_image(200 * MS, "i2")
    out = p.add_detections(100 * MS, "d1")  # image 1 was lost by the transport
    assert _drops(out) == [("detections", 100 * MS, "detections_without_image")]
    # detections waiting for an image that the image stream has passed
    p2 = StampPairer()
    p2.add_detections(100 * MS, "d1")
    out = p2.add_image(200 * MS, "i2")
    assert ("detections", 100 * MS, "detections_without_image") in _drops(out)


def test_out_of_order_after_a_pair():
    p = StampPairer()
    p.add_image(500 * MS, "i")
    p.add_detections(500 * MS, "d")
    out = p.add_image(400 * MS, "old image")
    assert _drops(out) == [("image", 400 * MS, "out_of_order")]
    out = p.add_detections(300 * MS, "old dets")
    assert _drops(out) == [("detections", 300 * MS, "out_of_order")]
    assert p.counters["out_of_order"] == 2 and p.check_accounting()


def test_duplicate_stamps():
    p = StampPairer()
    p.add_image(100 * MS, "first")
    out = p.add_image(100 * MS, "second")  # duplicate of a buffered image
    assert _drops(out) == [("image", 100 * MS, "duplicate_stamp")]
    assert p.add_detections(100 * MS, "d").pairs[0].image == "first"
    out = p.add_detections(100 * MS, "d again")  # duplicate of an already paired stamp
    assert _drops(out) == [("detections", 100 * MS, "duplicate_stamp")]
    assert p.counters["duplicate_stamp"] == 2


def test_buffer_overflow_drops_oldest():
    p = StampPairer(max_buffer=3, max_age_ns=10**12)
    drops = []
    for t in range(1, 6):
        drops += _drops(p.add_image(t * MS, t))
    assert drops == [("image", 1 * MS, "buffer_overflow"), ("image", 2 * MS, "buffer_overflow")]
    assert p.pending() == {"image": 3, "detections": 0}
    assert p.add_detections(3 * MS, "d").pairs[0].image == 3


def test_max_age_expires_waiting_messages():
    p = StampPairer(max_age_ns=100 * MS)
    p.add_image(0, "i0")
    out = p.add_image(150 * MS, "i1")
    assert _drops(out) == [("image", 0, "image_without_detections")]


def test_flush_and_validation():
    p = StampPairer()
    p.add_image(1, "i")
    p.add_detections(5, "d")  # image 1 dropped (passed), detections 5 waiting
    drops = p.flush()
    assert [(d.kind, d.reason) for d in drops] == [("detections", "detections_without_image")]
    assert p.pending() == {"image": 0, "detections": 0} and p.check_accounting()
    with pytest.raises(ValueError):
        StampPairer(slop_ns=-1)
    with pytest.raises(ValueError):
        StampPairer(max_buffer=0)
    with pytest.raises(ValueError):
        StampPairer(slop_ns=10, max_age_ns=5)


@pytest.mark.parametrize("slop_ms", [0, 3])
def test_random_streams_account_for_every_message(slop_ms):
    """Jittered, lossy, occasionally reordered streams: nothing is lost from the books and the
    emitted pairs are monotonic on both streams and within the slop."""
    rng = random.Random(slop_ms)
    p = StampPairer(slop_ns=slop_ms * MS, max_buffer=8, max_age_ns=500 * MS)
    events = []
    for k in range(400):
        t = k * 33 * MS
        if rng.random() > 0.05:
            events.append((k * 33 + rng.random() * 2, "image", t))
        if rng.random() > 0.3:
            jitter = rng.randint(-slop_ms, slop_ms) * MS
            events.append((k * 33 + 40 + rng.random() * 60, "detections", t + jitter))
        if rng.random() < 0.02:
            events.append((k * 33 + 1, "image", t))  # duplicate
    events.sort()
    pairs, reasons = [], set()
    for _, kind, t in events:
        out = p.add_image(t, t) if kind == "image" else p.add_detections(t, t)
        pairs += _pairs(out)
        reasons |= {d.reason for d in out.drops}
        assert p.check_accounting()
    assert len(pairs) > 150
    assert all(abs(a - b) <= slop_ms * MS for a, b in pairs)
    assert all(x[0] < y[0] and x[1] < y[1] for x, y in zip(pairs, pairs[1:]))
    c = p.counters
    assert c["images_received"] + c["detections_received"] == len(events)
    assert set(reasons) <= set(REASONS)
    assert c["pairs"] * 2 + sum(c[r] for r in REASONS) + c["images_pending"] + c["detections_pending"] == len(events)


SEC = 1_000_000_000
FRAME = 33 * MS


def _good_stream(p, stamps, dets_first=False):
    """Feed one good (image, detections) pair per stamp; returns the pairs formed."""
    pairs = []
    for t in stamps:
        for add in ((p.add_detections, p.add_image) if dets_first else (p.add_image, p.add_detections)):
            pairs += _pairs(add(t, t))
    return pairs


@pytest.mark.parametrize("stream", ["image", "detections"])
@pytest.mark.parametrize("dets_first", [False, True])
@pytest.mark.parametrize("offset_s", [1.5, -30.0])
def test_one_far_stamp_costs_one_message_not_the_stream(stream, dets_first, offset_s):
    """The hostile-input finding: one message stamped 1.5 s in the future (within max_age) became
    its stream's clock and every following good pair was dropped (151 of 151). A far stamp is now
    dropped with its own reason and moves no clock."""
    p = StampPairer()
    start = 100 * SEC
    assert len(_good_stream(p, [start + k * FRAME for k in range(10)], dets_first)) == 10
    glitch = start + 10 * FRAME + int(offset_s * SEC)
    out = p.add_image(glitch, "glitch") if stream == "image" else p.add_detections(glitch, "glitch")
    reason = "stamp_in_future" if offset_s > 0 else "stamp_too_old"
    assert _drops(out) == [(stream, glitch, reason)] and not out.restarted
    good = [start + k * FRAME for k in range(11, 162)]
    assert _pairs_of(_good_stream(p, good, dets_first)) == good  # all 151 good pairs
    c = p.counters
    assert c[reason] == 1 and c["restarts"] == 0 and c["time_jump_back"] == 0 and p.check_accounting()


def _pairs_of(pairs):
    assert all(a == b for a, b in pairs)
    return [a for a, _ in pairs]


@pytest.mark.parametrize("jump_s", [3600.0, -50.0])
def test_real_clock_jump_recovers_after_jump_confirm_messages(jump_s):
    """A camera clock step (every later stamp shifted) or a looped / restarted source: the first
    jump_confirm - 1 messages of the jumping stream are dropped as far stamps, the next one restarts
    the pairer, and pairs flow again on the new time base."""
    p = StampPairer(jump_confirm=3)
    start = 100 * SEC
    _good_stream(p, [start + k * FRAME for k in range(5)])
    base = start + 5 * FRAME + int(jump_s * SEC)
    new = [base + k * FRAME for k in range(20)]
    pairs = _pairs_of(_good_stream(p, new))
    reason = "stamp_in_future" if jump_s > 0 else "stamp_too_old"
    c = p.counters
    assert c["restarts"] == 1 and c[reason] == 2 + 2  # two images and two detections before the restart
    assert pairs == new[2:]  # from the third frame of the new time base on, every pair
    assert p.check_accounting()


def test_looped_bag_never_answers_a_stamp_twice():
    """A bag looped with the same stamps: the pairer restarts (it does not reject everything as out
    of order), but a stamp answered in the first pass is never answered again; new stamps are."""
    p = StampPairer(max_buffer=10, max_age_ns=2 * SEC)
    first = [10 * SEC + k * 100 * MS for k in range(40)]  # 10.0 .. 13.9 s
    assert _pairs_of(_good_stream(p, first)) == first
    second = [10 * SEC + k * 100 * MS for k in range(60)]  # the bag again, 2 s longer
    again = _pairs_of(_good_stream(p, second))
    c = p.counters
    assert c["restarts"] == 1
    assert not set(again) & set(first)  # nothing answered twice
    assert again == second[40:]  # and everything new is answered
    assert c["answered_before"] > 0 and c["stamp_too_old"] == 2 + 2 and p.check_accounting()


def test_restart_drops_waiting_messages_and_a_small_step_back_is_out_of_order():
    p = StampPairer(slop_ns=0, max_buffer=10, max_age_ns=2 * SEC, jump_confirm=1)
    for t in (1, 2, 3):
        p.add_image(t * SEC, f"i{t}")
        assert len(p.add_detections(t * SEC, f"d{t}").pairs) == 1
    p.add_image(4 * SEC, "i4")  # waits for its detections when the source restarts
    out = p.add_image(-10 * SEC, "restarted")  # jump_confirm=1: the first far message restarts
    assert out.restarted and p.counters["restarts"] == 1
    assert [d.reason for d in out.drops] == ["time_jump_back"]  # i4 could never be paired any more
    assert p.add_detections(-10 * SEC, "d").pairs[0].image == "restarted"
    # a small step back (within max_age) is an ordinary out-of-order message
    out = p.add_image(-11 * SEC, "late")
    assert not out.restarted and _drops(out) == [("image", -11 * SEC, "out_of_order")]
    with pytest.raises(ValueError):
        StampPairer(max_future_ns=0)
    with pytest.raises(ValueError):
        StampPairer(jump_confirm=0)


def test_hostile_stamps_random_no_stamp_answered_twice_and_good_pairs_survive():
    """Good 30 Hz pairs with hostile messages between them (future, past, duplicates, replays of
    old stamps, NaN-like extremes): every stamp is answered at most once, the books balance after
    every message, and a good pair whose stamp is not preceded by a burst of jump_confirm far
    messages is answered."""
    rng = random.Random(7)
    p = StampPairer(slop_ns=0, max_buffer=30, max_age_ns=2 * SEC, max_future_ns=SEC, jump_confirm=3)
    t = 1000 * SEC
    good_sent = [t + k * FRAME for k in range(10)]  # the clocks start on good stamps
    answered = _pairs_of(_good_stream(p, good_sent))
    good_answered = set(answered)
    t = good_sent[-1]
    for k in range(3000):
        t += FRAME
        for _ in range(rng.choice([0, 0, 1, 2])):  # at most 2 hostile messages in a row
            kind = rng.choice(["image", "detections"])
            bad = rng.choice([t + rng.randint(2, 10**6) * SEC // 1000 + SEC, t - rng.randint(3, 10**6) * SEC,
                              t - FRAME, t - rng.randint(1, 50) * FRAME, 0, 2**62, -2**62])
            out = p.add_image(bad, "bad") if kind == "image" else p.add_detections(bad, "bad")
            answered += [a for a, _ in _pairs(out)]
            assert p.check_accounting()
        good_sent.append(t)
        for add in (p.add_image, p.add_detections):
            out = add(t, "good")
            answered += [a for a, _ in _pairs(out)]
            good_answered |= {a for a, b in _pairs(out) if a == t}
            assert p.check_accounting()
    assert len(answered) == len(set(answered))  # no stamp answered twice
    assert p.counters["restarts"] == 0
    assert good_answered == set(good_sent)  # no hostile message cost a good pair


def test_slow_detector_is_never_in_the_future():
    """A detector that runs on one frame in 45 (1.5 s apart, 1.2 s late): its detections are far
    ahead of their own stream's previous stamp but never ahead of the images, so every one pairs."""
    p = StampPairer(max_buffer=100)
    events = []
    for k in range(300):
        t = 100 * SEC + k * FRAME
        events.append((t, "image", t))
        if k % 45 == 0:
            events.append((t + int(1.2 * SEC), "detections", t))
    events.sort()
    pairs = []
    for _, kind, t in events:
        pairs += _pairs(p.add_image(t, t) if kind == "image" else p.add_detections(t, t))
    assert len(pairs) == len([e for e in events if e[1] == "detections"])
    c = p.counters
    assert c["restarts"] == 0 and c["stamp_in_future"] == 0 and p.check_accounting()
