"""core.accounting: the per-camera books the node's /diagnostics balances (no rclpy)."""
import collections
import threading

import numpy as np
import pytest

from runa_ood_node.core.accounting import FRAME_REASONS, Accounting, CameraLedger
from runa_ood_node.core.registry import BoxStatus

pytestmark = pytest.mark.unit


class FakePairer:
    """Just the books of a stamp pairer: every image and every detections message taken, a pair
    for each image that has its detections (what ``ros.pairing.StampPairer`` counts)."""

    def __init__(self):
        self.counters = collections.Counter(images_received=0, detections_received=0, pairs=0)
        self.ok = True

    def take(self, image: bool, pair: bool = False):
        self.counters["images_received" if image else "detections_received"] += 1
        self.counters["pairs"] += int(pair)

    def check_accounting(self):
        return self.ok

    def dropped_by_stream(self):
        return {}


def _ledger(**kw):
    led = CameraLedger("front", **kw)
    led.pairer = FakePairer()
    return led


def _frame(led, t=0.0):
    """An image and its detections received, paired and queued."""
    led.received_message("image")
    led.pairer.take(True)
    led.received_message("detections")
    led.pairer.take(False, pair=True)
    return led.enqueue(("pair", t), max_queued=4)


def test_counts_reconcile_through_a_frame_s_life():
    led = _ledger()
    assert led.snapshot()["balanced"]
    _frame(led)
    a = led.snapshot()
    assert a["received"] == {"image": 1, "detections": 1} and a["queued"] == 1 and a["balanced"]
    assert led.take() == ("pair", 0.0)
    a = led.snapshot()
    assert a["queued"] == 0 and a["in_flight"] == 1 and a["balanced"]  # in flight counts in the balance
    led.scored([BoxStatus.OK, BoxStatus.OK, BoxStatus.TOO_SMALL], [True, False, False], node_ms=5.0,
               pipeline_ms=3.0, boxes_below_token=2)
    a = led.snapshot()
    assert a["frames_scored"] == 1 and a["in_flight"] == 0 and a["balanced"]
    assert a["boxes_total"] == 3 and a["boxes_ood"] == 1
    assert a["boxes_by_status"] == {"OK": 2, "TOO_SMALL": 1}
    assert a["counters"] == {"boxes_below_token": 2}
    assert led.latencies() == ([5.0], [3.0], [])


def test_a_frame_not_ended_or_a_count_missed_unbalances():
    led = _ledger()
    _frame(led)
    led.take()
    led.in_flight = 0  # the frame left without a verdict: not accounted for
    assert not led.snapshot()["balanced"]
    led = _ledger()
    led.received_message("image")  # received but neither taken by the pairer nor dropped
    assert not led.snapshot()["balanced"]
    led.drop_input("inactive")
    assert led.snapshot()["balanced"] and led.snapshot()["input_drops"] == {"inactive": 1}
    led.pairer.ok = False  # the pairer's own books
    assert not led.snapshot()["balanced"]


def test_drop_reasons():
    led = _ledger()
    for t in range(6):  # a queue of 4: the two OLDEST frames are dropped (outputs stay fresh)
        old = _frame(led, float(t))
        assert old == (None if t < 4 else ("pair", float(t - 4)))
    assert led.frame_drops == {"processing_overload": 2} and len(led.queue) == 4
    led.take()
    led.frame_done("image_truncated")
    led.take()
    led.frame_done("bad_detections")
    assert led.drop_queued("deactivated") == 2
    assert led.drop_queued("internal_error") == 0  # nothing waiting: no key for nothing
    a = led.snapshot()
    assert a["frame_drops"] == {"processing_overload": 2, "image_truncated": 1, "bad_detections": 1, "deactivated": 2}
    assert a["frames_scored"] == 0 and a["queued"] == 0 and a["balanced"]
    assert set(FRAME_REASONS) >= {"processing_overload", "deactivated", "bad_detections", "internal_error"}


def test_losses_in_transport_counted_and_untrue_figures_unbalance():
    led = _ledger(max_sequence_gap=100)
    assert led.received_message("image", b"pub", 1) == (0, None)
    led.pairer.take(True)
    assert led.received_message("image", b"pub", 5) == (3, None)  # 2, 3, 4 lost
    led.pairer.take(True)
    gap, jump = led.received_message("image", b"pub", 5000)  # beyond max_sequence_gap: a new epoch, no loss
    led.pairer.take(True)
    assert gap == 0 and jump == (5, 5000)
    a = led.snapshot()
    assert a["received"]["image"] == 3 and a["lost"]["image"] == 3 and a["balanced"]
    assert a["lost_detail"]["image"]["sequence_jumps"] == 1
    assert led.lost_report("detections", 2) and led.snapshot()["lost"]["detections"] == 2
    assert not led.lost_report("detections", 2 ** 64 - 2 ** 31)  # impossible: rejected, never added
    a = led.snapshot()
    assert a["lost"]["detections"] == 2 and not a["balanced"]
    assert any("impossible" in p for p in a["transport_problems"])


def test_transport_warning_raised_once_and_cleared():
    led = _ledger(loss_warn_fraction=0.2, loss_window_s=10.0)
    led.received_message("image", b"p", 1)
    raised, was, now = led.watch_transport(0.0, "advice")
    assert not raised and now == ""
    for seq in range(2, 42, 2):  # every other message lost: 50 %
        led.received_message("image", b"p", seq)
    raised, was, now = led.watch_transport(1.0, "advice")
    assert raised and was == "" and "of image messages lost in transport" in now and now.endswith(": advice")
    assert led.snapshot()["transport_warning"] == now
    raised, was, again = led.watch_transport(2.0, "advice")
    assert not raised and was == now  # said once
    for seq in range(42, 200):
        led.received_message("image", b"p", seq)
    raised, was, now = led.watch_transport(30.0, "advice")  # the window moved on: no loss in it
    assert not raised and was and now == ""


def test_reset_zeroes_counts_but_keeps_the_queue_and_flight():
    acc = Accounting()
    led = acc.ledger("front")
    led.pairer = FakePairer()
    acc.set_cameras([led])
    _frame(led)
    _frame(led)
    led.take()
    led.count("qos_incompatible")
    acc.count_node("timer_internal_error")
    acc.backend_call(2)
    acc.reset()
    assert led.received == {"image": 0, "detections": 0} and not led.counters and not led.frame_drops
    assert len(led.queue) == 1 and led.in_flight == 1  # not counts: what is still on its way
    assert acc.backend_calls == 0 and not acc.node_counters and acc.frames_per_call() == 0.0


def test_accounting_snapshots_one_or_every_camera():
    acc = Accounting()
    assert acc.snapshot()["balanced"] and acc.snapshot()["frames_scored"] == 0  # no cameras yet: all zero
    cams = [acc.ledger(n) for n in ("front", "left")]
    for c in cams:
        c.pairer = FakePairer()
        assert c.lock is acc.lock
    acc.set_cameras(cams)
    _frame(cams[0])
    cams[0].take()
    acc.backend_call(2)
    acc.backend_call(1)
    acc.count_node("timer_internal_error")
    cams[1].count("frame_id_mismatch")
    one = acc.snapshot("left")
    assert one["counters"] == {"timer_internal_error": 1, "frame_id_mismatch": 1}
    assert acc.snapshot()["in_flight"] == 1  # the first camera's
    every = acc.snapshot(per_camera=True)
    assert set(every["cameras"]) == {"front", "left"} and every["balanced"]
    assert every["backend_calls"] == 2 and every["frames_per_backend_call"] == 1.5
    acc.batch(+1)
    assert acc.snapshot("front")["worker_busy"]
    with pytest.raises(KeyError, match="no camera 'rear'"):
        acc.snapshot("rear")


def test_every_snapshot_balances_while_threads_count():
    """The executor thread queues, scoring threads take and end frames, a timer takes snapshots:
    with the shared lock every snapshot balances (a frame is counted in the step that ends its flight)."""
    acc = Accounting()
    led = acc.ledger("")
    led.pairer = FakePairer()
    acc.set_cameras([led])
    stop = threading.Event()
    n_frames, seen = 3000, []

    def produce():
        for i in range(n_frames):
            with acc.lock:  # the node holds the lock around pairing and queueing
                _frame(led, float(i))

    def consume():
        while not stop.is_set():
            if led.take() is None:
                continue
            led.scored(np.zeros(2, np.intp), [False, True], 1.0, 1.0)

    def sample():
        while not stop.is_set():
            seen.append(acc.snapshot()["balanced"])

    threads = [threading.Thread(target=f) for f in (consume, sample)]
    for t in threads:
        t.start()
    produce()
    while led.queue or led.in_flight:
        pass
    stop.set()
    for t in threads:
        t.join()
    a = acc.snapshot()
    assert a["balanced"] and a["frames_scored"] + a["frame_drops"].get("processing_overload", 0) == n_frames
    assert seen and all(seen)
