"""Python ``logging`` reaches ``/rosout`` through ``ros.rosout_logging`` at the node's log level.

Two real processes with ``--log-level info`` and ``--log-level error`` install the bridge as the
node's ``main`` does and log through ``logging.getLogger("runa_ood_node.backends")`` and a
third-party logger; a subscriber reads ``/rosout``. (That ``main`` installs it is shown by
tests/test_liveliness.py with the real node.)
"""
from __future__ import annotations

import subprocess
import sys
import threading

import pytest

pytest.importorskip("rclpy")

from conftest import REPO, wait_until  # noqa: E402

PROBE = r"""
import logging, sys, time
import rclpy
from runa_ood_node.ros import rosout_logging
rclpy.init(args=sys.argv)
node = rclpy.create_node("log_probe_" + sys.argv[1])
rosout_logging.install(node.get_logger())
logging.getLogger("runa_ood_node.backends").warning("probe warning")
logging.getLogger("runa_ood_node.backends").info("probe info")
logging.getLogger("some_library").info("library info")
logging.getLogger("some_library").warning("library warning")
node.get_logger().error("sentinel")
time.sleep(120)
"""


def test_python_logging_reaches_rosout_at_the_node_level(ros2_cli, tmp_path):
    from rcl_interfaces.msg import Log
    from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy

    from runa_ood_node.ros.spin import spinning_node

    script = tmp_path / "probe.py"
    script.write_text(PROBE)
    got, lock = [], threading.Lock()
    procs = {}
    with spinning_node("test_rosout_reader") as node:
        def on_log(m):
            with lock:
                got.append((m.name, m.level, m.msg))
        sub = node.create_subscription(Log, "/rosout", on_log, QoSProfile(
            depth=1000, reliability=ReliabilityPolicy.RELIABLE, durability=DurabilityPolicy.TRANSIENT_LOCAL))
        try:
            for level in ("info", "error"):
                procs[level] = subprocess.Popen([sys.executable, str(script), level, "--ros-args", "--log-level", level],
                                                env=ros2_cli.env, cwd=REPO, stdout=subprocess.DEVNULL,
                                                stderr=subprocess.DEVNULL)
            wait_until(lambda: {n for n, _, m in list(got) if m == "sentinel"} >= {"log_probe_info", "log_probe_error"},
                       120, "both probes' sentinel on /rosout")
        finally:
            for p in procs.values():
                p.kill()
                p.wait(timeout=30)
            node.destroy_subscription(sub)
    with lock:
        seen = {(n, lvl, m) for n, lvl, m in got}
    # --log-level info: the package's warning and info, a library's warning (its info is chatter)
    assert ("log_probe_info.runa_ood_node.backends", Log.WARN, "probe warning") in seen, seen
    assert ("log_probe_info.runa_ood_node.backends", Log.INFO, "probe info") in seen, seen
    assert ("log_probe_info.some_library", Log.WARN, "library warning") in seen, seen
    assert not any(m == "library info" for _, _, m in seen)
    # --log-level error: filtered like the node's own lines
    assert not any(n.startswith("log_probe_error.") for n, _, _ in seen), seen
