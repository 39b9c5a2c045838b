"""A destroyed node leaves the ROS graph, and leaves nothing running, at once.

rclpy's ``LifecycleNode.destroy_node`` leaves the lifecycle state machine, which holds a share of the
rcl node: a destroyed ``RunaOodNode`` stayed in every other node's graph (with its lifecycle
services) until the Python object was garbage-collected, i.e. for good while a test or a manager
still held it; a stale ``/runa_ood`` then answered a later launch test's lifecycle requests. A
node destroyed while active without ``trigger_shutdown`` also kept its scoring threads, which kept
the node alive even after a collection. And the console script, which ends with ``os._exit``, left
its node in the others' graph for the DDS lease (about 20 s) after the process had gone.

Each test watches from a plain rclpy node in another context (what any other process sees) and
waits a bounded time: DDS discovery on loopback takes well under a second.
"""
from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time

import pytest
import yaml

rclpy = pytest.importorskip("rclpy")
pytest.importorskip("runa_ood_msgs.msg", reason="interface packages not built (bash scripts/setup.sh)")

from rclpy.executors import SingleThreadedExecutor  # noqa: E402
from rclpy.parameter import Parameter  # noqa: E402

from conftest import RIG_NODE_PARAMS, TINY_NODE_PARAMS, wait_until  # noqa: E402
from runa_ood_node.ros.node import RunaOodNode  # noqa: E402

APPEAR_S = 30.0  # discovery of a new node (a loaded machine)
LEAVE_S = 5.0  # a destroyed node must be gone from the others' graph by then (the DDS lease is ~20 s)


@pytest.fixture
def observer():
    """A plain node in a context of its own: the graph as another process sees it."""
    ctx = rclpy.Context()
    rclpy.init(context=ctx)
    node = rclpy.create_node("teardown_observer", context=ctx)
    yield node
    node.destroy_node()
    rclpy.shutdown(context=ctx)


@pytest.fixture
def node_ctx():
    ctx = rclpy.Context()
    rclpy.init(context=ctx)
    yield ctx
    rclpy.try_shutdown(context=ctx)


def _in_graph(observer, name: str, ns: str) -> bool:
    return (name, ns) in observer.get_node_names_and_namespaces()


def _services(observer, ns: str):
    return sorted(s for s, _ in observer.get_service_names_and_types() if s.startswith(ns + "/"))


@pytest.mark.parametrize("state", ["unconfigured", "shut_down", "active"])
def test_a_destroyed_node_leaves_the_graph_and_its_threads_end(observer, node_ctx, state):
    """Built, spun (as the rigs do), then destroyed: after ``trigger_shutdown`` (the rigs), straight
    from active (no shutdown), or never configured. Gone from the observer's graph with its lifecycle
    services within LEAVE_S; no scoring thread left; a transition asked afterwards raises."""
    ns = f"/teardown_{state}"
    params = dict(RIG_NODE_PARAMS, autostart=state != "unconfigured")
    node = RunaOodNode(context=node_ctx, namespace=ns, parameter_overrides=[Parameter(k, value=v) for k, v in params.items()])
    if state != "unconfigured":
        assert node.autostart(), node.last_error
    workers = list(node._workers)
    assert len(workers) == (0 if state == "unconfigured" else 1) and all(w.is_alive() for w in workers)
    ex = SingleThreadedExecutor(context=node_ctx)
    ex.add_node(node)
    spin = threading.Thread(target=ex.spin, daemon=True)
    spin.start()
    wait_until(lambda: _in_graph(observer, "runa_ood", ns) and f"{ns}/runa_ood/change_state" in _services(observer, ns),
               APPEAR_S, "the node and its lifecycle services in the observer's graph")
    ex.shutdown(timeout_sec=5.0)
    spin.join(timeout=5.0)
    if state == "shut_down":
        node.trigger_shutdown()
    t0 = time.monotonic()
    node.destroy_node()  # the test still holds `node`: nothing may depend on it being collected
    wait_until(lambda: not _in_graph(observer, "runa_ood", ns), LEAVE_S, f"the destroyed node {ns}/runa_ood to leave the graph")
    left_s = time.monotonic() - t0
    wait_until(lambda: _services(observer, ns) == [], LEAVE_S, "the destroyed node's services to leave the graph")
    assert not any(w.is_alive() for w in workers), [w.name for w in workers if w.is_alive()]
    assert not set(workers) & set(threading.enumerate())
    assert node.scorer is None  # the model released
    with pytest.raises(Exception, match="destroyed"):  # not a crash of the process
        node.trigger_shutdown()
    node.destroy_node()  # twice: harmless
    assert left_s < LEAVE_S


def test_the_console_script_leaves_the_graph_when_it_ends(observer, tmp_path):
    """``runa_ood_node`` (autostart, active) ended by SIGINT: exit status 0 and gone from the others'
    graph within LEAVE_S of its exit, not after the DDS lease."""
    params = tmp_path / "tiny.yaml"
    params.write_text(yaml.safe_dump({"/**": {"ros__parameters": TINY_NODE_PARAMS}}))
    ns = "/teardown_exit"
    proc = subprocess.Popen([sys.executable, "-m", "runa_ood_node.ros.node", "--ros-args", "--params-file", str(params),
                             "-r", f"__ns:={ns}"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        # active: the node subscribes to its inputs once activated
        wait_until(lambda: proc.poll() is None and observer.count_subscribers(f"{ns}/image") > 0
                   and _in_graph(observer, "runa_ood", ns), 90.0, "the node process to come up")
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    wait_until(lambda: not _in_graph(observer, "runa_ood", ns), LEAVE_S,
               f"{ns}/runa_ood to leave the graph after its process ended\n{proc.stdout.read()}")
