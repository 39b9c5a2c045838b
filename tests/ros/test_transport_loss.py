"""Messages lost in transport: counted right (64-bit, per publisher, bounded, reordering tolerated),
untrue figures shown as errors, heavy losses announced (runa_ood_node/ros/transport.py and the node).

The counting and the announcing are plain Python (core/loss.py), tested without DDS in
tests/unit/test_loss.py; the live tests here run the
node over real DDS (loopback, one process) with its subscription queue overflowing while the
executor is held busy: the publisher's sequence numbers then skip the overwritten messages.
"""
from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from runa_ood_node.ros.transport import ONE_HOST_PROFILE, active_profile, fastdds_profile, loss_advice

A, B = b"publisher-A", b"publisher-B"
HI = 2 ** 32


def test_loss_advice_names_the_default_transports_and_the_shipped_profile():
    text = loss_advice({"RMW_IMPLEMENTATION": "rmw_fastrtps_cpp"})
    assert "default transports" in text and str(ONE_HOST_PROFILE) in text and "FASTDDS_DEFAULT_PROFILES_FILE" in text
    text = loss_advice({"FASTDDS_DEFAULT_PROFILES_FILE": "/x/p.xml"})
    assert "/x/p.xml" in text and "queue" in text
    assert "rmw_cyclonedds_cpp" in loss_advice({"RMW_IMPLEMENTATION": "rmw_cyclonedds_cpp"})
    assert active_profile({"FASTRTPS_DEFAULT_PROFILES_FILE": "/y.xml"}) == "/y.xml"
    assert active_profile({"FASTDDS_DEFAULT_PROFILES_FILE": " "}) is None


def test_profile_choice_none_and_empty_apply_nothing():
    assert fastdds_profile("none") is None and fastdds_profile("") is None and fastdds_profile("NONE") is None
    assert fastdds_profile("one-host") == str(ONE_HOST_PROFILE) and ONE_HOST_PROFILE.is_file()


def test_launch_argument_applies_the_profile_to_the_node_process_unless_none(tmp_path):
    from runa_ood_node.ros.launch_actions import LaunchFailure, fastdds_profile_env

    env = fastdds_profile_env(str(ONE_HOST_PROFILE))
    assert env == {"FASTDDS_DEFAULT_PROFILES_FILE": str(ONE_HOST_PROFILE),
                   "FASTRTPS_DEFAULT_PROFILES_FILE": str(ONE_HOST_PROFILE)}
    assert fastdds_profile_env("one-host") == env
    assert fastdds_profile_env("none") == {} and fastdds_profile_env("") == {} and fastdds_profile_env(" None ") == {}
    with pytest.raises(LaunchFailure, match="missing.xml"):
        fastdds_profile_env(str(tmp_path / "missing.xml"))


# ------------------------------------------------------------------ the node over real DDS
rclpy = pytest.importorskip("rclpy")
pytest.importorskip("runa_ood_msgs.msg", reason="interface packages not built (bash scripts/setup.sh)")

from rclpy.executors import SingleThreadedExecutor  # noqa: E402
from rclpy.parameter import Parameter  # noqa: E402
from rclpy.qos import QoSProfile, ReliabilityPolicy  # noqa: E402

from conftest import RIG_NODE_PARAMS, NodeRig, wait_until  # noqa: E402
from runa_ood_node.ros import convert  # noqa: E402

NODE_PARAMS = dict(RIG_NODE_PARAMS, **{"image_queue_size": 2, "transport.loss_warn_fraction": 0.2,
                                       "transport.loss_window_s": 3.0, "health.frame_timeout_s": 60.0})


class _Recorder:
    """The node's logger, every warning / error kept instead of printed (rclpy's logger tells its
    call sites apart by the caller's line: one forwarding line with different throttles is refused)."""

    def __init__(self, logger):
        self._logger = logger
        self.lines = []

    def __getattr__(self, name):
        return getattr(self._logger, name)

    def warning(self, msg, **kw):
        self.lines.append(("warning", msg))

    def error(self, msg, **kw):
        self.lines.append(("error", msg))


class LossRig(NodeRig):
    def __init__(self, ctx):
        from diagnostic_msgs.msg import DiagnosticArray
        from rclpy.node import Node
        from sensor_msgs.msg import Image

        from runa_ood_node.ros.node import RunaOodNode

        self.node = RunaOodNode(context=ctx, parameter_overrides=[Parameter(k, value=v) for k, v in NODE_PARAMS.items()])
        self.log = _Recorder(self.node.get_logger())
        self.node.get_logger = lambda: self.log
        assert self.node.autostart(), self.node.last_error
        self.t = Node("runa_ood_loss_tester", context=ctx)
        self.diag = []
        self.lock = threading.Lock()
        self.pub_img = self.t.create_publisher(Image, "image", QoSProfile(depth=300, reliability=ReliabilityPolicy.RELIABLE))
        self.t.create_subscription(DiagnosticArray, "/diagnostics", self._on_diag,
                                   QoSProfile(depth=100, reliability=ReliabilityPolicy.RELIABLE))
        self.ex = SingleThreadedExecutor(context=ctx)
        self.ex.add_node(self.node)
        self.ex.add_node(self.t)
        threading.Thread(target=self.ex.spin, daemon=True).start()
        wait_until(lambda: self.pub_img.get_subscription_count() > 0, self.timeout, "the node's image subscription")
        self.stamp_s = 2000.0

    def _on_diag(self, msg):
        with self.lock:
            self.diag.extend(msg.status)

    def statuses(self, start=0):
        with self.lock:
            return list(self.diag[start:])

    def image(self):
        self.stamp_s = round(self.stamp_s + 0.01, 3)
        h = convert.copy_header(None)
        h.stamp = convert.ns_to_stamp(int(round(self.stamp_s * 1e9)))
        h.frame_id = "camera"
        return convert.rgb_to_image(np.full((48, 64, 3), 100, np.uint8), h)

    def hold_executor(self, seconds):
        """Keep the executor busy for ``seconds`` (nothing is taken from the subscription queues)."""
        blocked = threading.Event()

        def block():
            timer.cancel()
            blocked.set()
            time.sleep(seconds)

        timer = self.t.create_timer(0.01, block)
        wait_until(blocked.is_set, self.timeout, "the executor to be busy")
        return timer


@pytest.fixture(scope="module")
def loss_rig():
    ctx = rclpy.Context()
    rclpy.init(context=ctx)
    rig = LossRig(ctx)
    try:
        yield rig
    finally:
        rig.close()
        rclpy.shutdown(context=ctx)


def _kv(status):
    return {v.key: v.value for v in status.values}


def test_queue_overflow_is_counted_from_sequence_gaps_and_announced_once(loss_rig):
    """40 images into a 2-deep queue while the executor is held: the publisher's sequence numbers
    skip the overwritten ones, the node counts them (published = received + lost), says so ONCE in
    its log naming the likely cause and the shipped profile, and /diagnostics shows a WARN."""
    from diagnostic_msgs.msg import DiagnosticStatus

    rig = loss_rig
    rig.pub_img.publish(rig.image())  # the node learns this publisher
    wait_until(lambda: rig.node.accounting()["received"]["image"] >= 1, rig.timeout, "the first image")
    a0 = rig.node.accounting()
    n = 40
    timer = rig.hold_executor(1.5)
    for _ in range(n):
        rig.pub_img.publish(rig.image())
    rig.pub_img.publish(rig.image())  # after the hold: reveals any loss at the tail
    n += 1

    def seen():
        a = rig.node.accounting()
        return (a["received"]["image"] - a0["received"]["image"]) + (a["lost"]["image"] - a0["lost"]["image"]) == n

    wait_until(seen, rig.timeout, "every published image received or counted as lost")
    rig.t.destroy_timer(timer)
    a = rig.node.accounting()
    lost = a["lost"]["image"] - a0["lost"]["image"]
    assert n // 2 < lost < n  # most overwritten in the 2-deep queue, not all
    assert a["lost_detail"]["image"]["sequence_gaps"] == a["lost"]["image"]
    assert a["transport_problems"] == [] and a["balanced"]
    start = len(rig.statuses())
    wait_until(lambda: any(_kv(st).get("transport_warning", "none") != "none" for st in rig.statuses(start)),
               rig.timeout, "the transport warning in /diagnostics")
    st = next(st for st in rig.statuses(start) if _kv(st)["transport_warning"] != "none")
    kv = _kv(st)
    assert st.level == DiagnosticStatus.WARN and "lost in transport" in st.message
    assert "fastdds_one_host.xml" in kv["transport_warning"] and kv["transport_error"] == "none"
    assert int(kv["messages_lost.image"]) >= lost and int(kv["transport.sequence_gaps.image"]) >= lost
    assert kv["accounting_balanced"] == "true"
    n_diag = len(rig.statuses())
    wait_until(lambda: len(rig.statuses()) >= n_diag + 2, rig.timeout, "two more /diagnostics")
    said = [m for lvl, m in rig.log.lines if lvl == "warning" and m.startswith("messages lost in transport")]
    assert len(said) == 1, said  # once, not at every diagnostics tick
    assert "default transports" in said[0] or "profile" in said[0]
    assert "fastdds_one_host.xml" in said[0]


def test_an_impossible_middleware_loss_report_is_an_error_not_a_balance(loss_rig):
    """The message-lost event with a count that cannot be true (Fast DDS's sign-extended negative
    count): not added to lost_in_transport; the accounting is not balanced and /diagnostics says
    ERROR naming it."""
    from diagnostic_msgs.msg import DiagnosticStatus

    rig = loss_rig
    before = rig.node.accounting()["lost"]["image"]
    cam = rig.node._cams[0]
    cam.note_lost_report(rig.node, "image", 2 ** 64 - 2 ** 31, "image")
    a = rig.node.accounting()
    assert a["lost"]["image"] == before and not a["balanced"]
    assert any("impossible" in p and "-2147483648" in p for p in a["transport_problems"])
    start = len(rig.statuses())
    wait_until(lambda: len(rig.statuses()) > start, rig.timeout, "/diagnostics")
    st = rig.statuses(start)[-1]
    kv = _kv(st)
    assert st.level == DiagnosticStatus.ERROR and "untrue" in st.message
    assert kv["accounting_balanced"] == "false" and "impossible" in kv["transport_error"]
    assert kv["transport.rejected_reports.image"] == "1"
    assert any(lvl == "error" and "impossible" in m for lvl, m in rig.log.lines)
