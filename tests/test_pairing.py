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


def test_looped_bag_restarts_the_pairer_instead_of_rejecting_everything():
    p = StampPairer(slop_ns=0, max_buffer=10, max_age_ns=2_000_000_000)
    sec = 1_000_000_000
    for t in (1, 2, 3):
        p.add_image(t * sec, f"i{t}")
        assert len(p.add_detections(t * sec, f"d{t}").pairs) == 1
    p.add_image(4 * sec, "i4")  # waits for its detections when the bag loops
    out = p.add_image(1 * sec, "i1-again")  # 3 s behind the newest image (> max_age): a new pass
    assert out.restarted and p.counters["restarts"] == 1
    assert [d.reason for d in out.drops] == ["time_jump_back"]  # i4 could never be paired any more
    pairs = [p.add_detections(t * sec, f"d{t}-again").pairs for t in (1,)]
    assert len(pairs[0]) == 1 and pairs[0][0].image == "i1-again"
    for t in (2, 3):
        p.add_image(t * sec, "i")
        assert len(p.add_detections(t * sec, "d").pairs) == 1
    assert p.check_accounting()
    # a small step back (within max_age) is still an ordinary out-of-order message
    assert not p.add_image(int(2.5 * sec), "late").restarted
