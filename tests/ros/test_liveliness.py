"""A monitor whose silence is an alarm: liveliness + deadline QoS on ood/monitor_health and
ood/driver_alert, and the heartbeat on ood/monitor_health, seen by a consumer using the QoS the
README documents. The node is a real process (`ros2 run`, tiny random model) that the test stops
(SIGSTOP: a hung process) and kills (SIGKILL). The detection delays are printed; the bound asserted
is generous (the machine is shared), the README's contract is "within the lease".

The same node shows that its ``main`` bridges Python ``logging`` to ``/rosout``: the encoder's
random-weights warning (``logging.getLogger("runa_ood_node.core.encoder")``) arrives there.
"""
from __future__ import annotations

import os
import signal
import subprocess
import threading
import time

import pytest

pytest.importorskip("rclpy")
pytest.importorskip("runa_ood_msgs.msg")

from conftest import wait_until  # noqa: E402

LEASE_S = 1.0
START_TIMEOUT = 180.0


def consumer_qos(deadline: bool):
    """The QoS a consumer should use (README, "The node"): reliable, transient local, depth 1,
    AUTOMATIC liveliness with the node's lease (health.liveliness_lease_s) and, on
    ood/monitor_health, that deadline too."""
    from rclpy.duration import Duration
    from rclpy.qos import DurabilityPolicy, LivelinessPolicy, QoSProfile, ReliabilityPolicy

    q = QoSProfile(depth=1, reliability=ReliabilityPolicy.RELIABLE, durability=DurabilityPolicy.TRANSIENT_LOCAL,
                   liveliness=LivelinessPolicy.AUTOMATIC, liveliness_lease_duration=Duration(seconds=LEASE_S))
    if deadline:
        q.deadline = Duration(seconds=LEASE_S)
    return q


class Watch:
    def __init__(self):
        self.lock = threading.Lock()
        self.msgs = 0
        self.alive = None
        self.events = []  # (monotonic time, alive_count)
        self.deadlines = []  # monotonic times of requested-deadline-missed events
        self.incompatible = 0

    def on_msg(self, _):
        with self.lock:
            self.msgs += 1

    def on_live(self, ev):
        with self.lock:
            self.alive = ev.alive_count
            self.events.append((time.monotonic(), ev.alive_count))

    def on_deadline(self, ev):
        with self.lock:
            self.deadlines.append(time.monotonic())

    def on_incompatible(self, ev):
        with self.lock:
            self.incompatible += 1


def test_stopped_or_killed_node_is_detected_within_the_lease(ros2_cli, tmp_path):
    from rcl_interfaces.msg import Log
    from rclpy.event_handler import SubscriptionEventCallbacks
    from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy
    from runa_ood_msgs.msg import DriverAlert

    from runa_ood_node.ros.spin import spinning_node

    log_path = tmp_path / "node.log"
    proc = ros2_cli.popen("run", "runa_ood_node", "runa_ood_node", "--ros-args", "--params-file",
                          str(ros2_cli.tiny_params), "-p", f"health.liveliness_lease_s:={LEASE_S}",
                          "-p", "health.heartbeat_period_s:=0.25", "-r", "__ns:=/live", log_path=log_path)
    health, alert = Watch(), Watch()
    rosout, rosout_lock = [], threading.Lock()
    try:
        with spinning_node("test_liveliness_consumer") as node:
            subs = []
            for w, topic, deadline in ((health, "/live/ood/monitor_health", True), (alert, "/live/ood/driver_alert", False)):
                cbs = SubscriptionEventCallbacks(liveliness=w.on_live, incompatible_qos=w.on_incompatible,
                                                 deadline=w.on_deadline if deadline else None)
                subs.append(node.create_subscription(DriverAlert, topic, w.on_msg, consumer_qos(deadline),
                                                     event_callbacks=cbs))

            def on_log(m):
                with rosout_lock:
                    rosout.append(m)
            subs.append(node.create_subscription(Log, "/rosout", on_log, QoSProfile(
                depth=1000, reliability=ReliabilityPolicy.RELIABLE, durability=DurabilityPolicy.TRANSIENT_LOCAL)))

            wait_until(lambda: health.msgs >= 4 and health.alive == 1 and alert.alive == 1 or proc.poll() is not None,
                       START_TIMEOUT, "heartbeats on ood/monitor_health and both publishers alive")
            assert proc.poll() is None, log_path.read_text()[-3000:]
            assert health.incompatible == 0 and alert.incompatible == 0  # the documented QoS matches

            # Python logging from the package reached /rosout through main's bridge
            wait_until(lambda: any(m.name.endswith("runa_ood_node.core.encoder") and "RANDOM weights" in m.msg
                                   and m.level == Log.WARN for m in list(rosout)), 30, "the encoder warning on /rosout")

            results = {}
            for sig, cont in ((signal.SIGSTOP, True), (signal.SIGKILL, False)):
                n_dead = len(health.deadlines)
                t0 = time.monotonic()
                os.killpg(proc.pid, sig)  # `ros2 run` and the node it started
                wait_until(lambda: health.alive == 0 and alert.alive == 0, 30,
                           f"liveliness lost after {sig.name}")
                lost = max(t for t, a in health.events if a == 0) - t0
                wait_until(lambda: len(health.deadlines) > n_dead, 30, f"a missed deadline after {sig.name}")
                missed = health.deadlines[n_dead] - t0
                results[sig.name] = (lost, missed)
                print(f"{sig.name}: liveliness lost after {lost:.2f} s, deadline missed after {missed:.2f} s "
                      f"(lease {LEASE_S} s)")
                assert lost < 5 * LEASE_S + 2 and missed < 5 * LEASE_S + 2, results
                if cont:  # a node that resumes is alive again
                    os.killpg(proc.pid, signal.SIGCONT)
                    wait_until(lambda: health.alive == 1 and alert.alive == 1, 30, "liveliness regained after SIGCONT")
            for s in subs:
                node.destroy_subscription(s)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
