"""`runa-ood replay`: every message of a bag reaches live subscribers, byte for byte (real DDS).

conftest sets ROS_AUTOMATIC_DISCOVERY_RANGE=LOCALHOST, a random ROS_DOMAIN_ID and ROS_LOG_DIR.
"""
import os
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from runa_ood_node.tools import bagio, replay

rclpy = pytest.importorskip("rclpy")
pytest.importorskip("vision_msgs.msg")
pytest.importorskip("runa_ood_msgs.msg")

from runa_ood_node.ros.spin import spinning_node  # noqa: E402

N_FRAMES = 6


@pytest.fixture(scope="module")
def small_bag(tmp_path_factory):
    path = tmp_path_factory.mktemp("replay") / "bag"
    rng = np.random.default_rng(0)
    with bagio.BagWriter(path, storage="mcap") as w:
        for i in range(N_FRAMES):
            st = 1_700_000_000_000_000_000 + i * 20_000_000  # 50 Hz: the replay takes 0.1 s
            hdr = bagio.header(st)
            w.write(bagio.IMAGE_TOPIC, bagio.IMAGE_TYPE, st,
                    bagio.image_msg(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8), hdr))
            w.write(bagio.DETECTIONS_TOPIC, bagio.DETECTIONS_TYPE, st,
                    bagio.detections_msg(hdr, [[1, 2, 3, 4]] * (i + 1), ["cat"] * (i + 1),
                                         [f"{i}-{k}" for k in range(i + 1)]))
            w.write(bagio.GROUND_TRUTH_TOPIC, bagio.GROUND_TRUTH_TYPE, st,
                    bagio.ground_truth_msg(hdr, [f"{i}-0"], [True], ["cat"]))
    return path


def _subscribe_all(node, topics, reliability=None):
    """Raw subscriptions on ``topics`` (name -> type); reliable unless ``reliability`` maps a
    topic to another ``ReliabilityPolicy``. Returns ``(got: name -> [bytes], lock, subs)``."""
    from rclpy.qos import QoSProfile, ReliabilityPolicy

    got = {t: [] for t in topics}
    lock = threading.Lock()
    subs = []
    for t, msgtype in topics.items():
        rel = (reliability or {}).get(t, ReliabilityPolicy.RELIABLE)
        qos = QoSProfile(depth=100, reliability=rel)

        def cb(raw, t=t):
            with lock:
                got[t].append(bytes(raw))
        subs.append(node.create_subscription(replay.message_class(msgtype), t, cb, qos, raw=True))
    return got, lock, subs


def _is_subsequence(part, whole) -> bool:
    it = iter(whole)
    return all(any(x == y for y in it) for x in part)


@pytest.fixture
def ros_node():
    """A node spun by a background executor in its own context; torn down after the test."""
    with spinning_node("test_replay_sink") as node:
        yield node


def _expected(bag):
    out = {t: [] for t in bagio.bag_info(bag).topics}
    for m in bagio.read_bag(bag):
        out[m.topic].append(m.rawdata)
    return out


def _wait_for(lock, got, expected, timeout_s=10.0):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with lock:
            if all(len(got[t]) >= len(v) for t, v in expected.items()):
                return
        time.sleep(0.05)


def test_replay_cli_delivers_every_message(small_bag, ros_node):
    """The CLI in a child process (child env as the tools build it) -> reliable subscribers here.

    ``--wait-subscribers 1`` waits for a subscriber on every topic it publishes (ground truth
    included), and the replay waits for every message to be acknowledged, so each reliable
    subscription gets every message, in order and byte-identical."""
    from runa_ood_node.tools.bag_eval import child_env

    expected = _expected(small_bag)
    got, lock, _subs = _subscribe_all(ros_node, bagio.bag_info(small_bag).topics)
    proc = subprocess.run([sys.executable, "-m", "runa_ood_node.tools.cli", "replay", str(small_bag),
                           "--wait-subscribers", "1", "--wait-timeout", "30", "--rate", "1"],
                          env=child_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "subscriber(s) after" not in proc.stderr, proc.stderr  # every topic had its subscriber
    assert f"published {3 * N_FRAMES} messages" in proc.stdout and "all acknowledged: True" in proc.stdout
    _wait_for(lock, got, expected)
    with lock:
        for t, v in expected.items():
            assert got[t] == v, f"{t}: {len(got[t])} of {len(v)} messages, in order and byte-identical"


def test_wait_for_subscribers_covers_every_topic_and_warns_per_topic(small_bag, ros_node, caplog):
    """Ground truth is waited for like any topic: without a subscriber there the wait fails and
    the warning names that topic (and only it)."""
    import logging

    player = replay.BagPlayer(ros_node, small_bag)
    assert set(player.topics) == {bagio.IMAGE_TOPIC, bagio.DETECTIONS_TOPIC, bagio.GROUND_TRUTH_TOPIC}
    _subscribe_all(ros_node, {bagio.IMAGE_TOPIC: bagio.IMAGE_TYPE, bagio.DETECTIONS_TOPIC: bagio.DETECTIONS_TYPE})
    assert player.wait_for_subscribers(1, 15.0, topics=[bagio.IMAGE_TOPIC, bagio.DETECTIONS_TOPIC])
    with caplog.at_level(logging.WARNING, logger=replay.LOG.name):
        assert not player.wait_for_subscribers(1, 0.5)
    warned = [r.getMessage() for r in caplog.records if r.name == replay.LOG.name]
    assert len(warned) == 1 and bagio.GROUND_TRUTH_TOPIC in warned[0] and "0 of the 1" in warned[0]
    counts = player.subscription_counts()
    assert counts[bagio.GROUND_TRUTH_TOPIC] == 0 and counts[bagio.IMAGE_TOPIC] >= 1
    with pytest.raises(ValueError, match="not published"):
        player.wait_for_subscribers(1, 1.0, topics=["/nope"])


def test_reliable_replay_matches_best_effort_subscribers(small_bag, ros_node):
    """A reliable publisher matches sensor-data (best-effort) subscriptions too: both kinds are
    counted before the replay starts. Only the reliable one is asserted lossless; best effort may
    drop, so it must receive an in-order, byte-identical subsequence."""
    from rclpy.qos import ReliabilityPolicy

    expected = _expected(small_bag)[bagio.IMAGE_TOPIC]
    player = replay.BagPlayer(ros_node, small_bag, topics=[bagio.IMAGE_TOPIC],
                              remap={bagio.IMAGE_TOPIC: "/be/image"})
    rel, rlock, _a = _subscribe_all(ros_node, {"/be/image": bagio.IMAGE_TYPE})
    be, block, _b = _subscribe_all(ros_node, {"/be/image": bagio.IMAGE_TYPE},
                                   reliability={"/be/image": ReliabilityPolicy.BEST_EFFORT})
    assert player.wait_for_subscribers(2, 15.0)  # the best-effort subscription matched as well
    player.play(rate=0.0, progress=False)
    assert player.wait_acked(10.0)
    _wait_for(rlock, rel, {"/be/image": expected})
    with rlock:
        assert rel["/be/image"] == expected
    with block:
        assert _is_subsequence(be["/be/image"], expected)


def test_player_in_process_counts_remaps_and_offsets(small_bag):
    with spinning_node("test_player") as node:
        player = replay.BagPlayer(node, small_bag, topics=[bagio.DETECTIONS_TOPIC],
                                  remap={bagio.DETECTIONS_TOPIC: "/remapped/detections"})
        got, lock, _ = _subscribe_all(node, {"/remapped/detections": bagio.DETECTIONS_TYPE})
        assert player.wait_for_subscribers(1, 15.0)
        # skip the first 3 frames (0.06 s of bag time at 50 Hz), play twice as fast, twice
        counts = player.play(rate=2.0, start_offset_s=0.05, loop=2, progress=False)
        assert counts == {bagio.DETECTIONS_TOPIC: 2 * (N_FRAMES - 3)}
        assert player.wait_acked(10.0)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and len(got["/remapped/detections"]) < counts[bagio.DETECTIONS_TOPIC]:
            time.sleep(0.05)
        with lock:
            sizes = [len(bagio.deserialize(r, bagio.DETECTIONS_TYPE).detections) for r in got["/remapped/detections"]]
        assert sizes == [4, 5, 6, 4, 5, 6]
        with lock:  # the second pass is restamped so the node answers it (every header, nested ones too)
            msgs = [bagio.deserialize(r, bagio.DETECTIONS_TYPE) for r in got["/remapped/detections"]]
        ns = [bagio.stamp_ns_of(m.header) for m in msgs]
        shift = player.loop_offset_ns()
        assert shift > ns[2] - ns[0] and [b - a for a, b in zip(ns[:3], ns[3:])] == [shift] * 3
        assert all(bagio.stamp_ns_of(d.header) == bagio.stamp_ns_of(m.header) for m in msgs for d in m.detections)
        assert [t for t, _, _ in player.publish_log] == [bagio.DETECTIONS_TOPIC] * 6
        with pytest.raises(ValueError, match="no topic"):
            replay.BagPlayer(node, small_bag, topics=["/nope"])


def test_message_class_and_remap_parsing():
    from sensor_msgs.msg import Image

    assert replay.message_class("sensor_msgs/msg/Image") is Image
    with pytest.raises(ImportError, match="setup.sh"):
        replay.message_class("no_such_pkg/msg/Thing")
    with pytest.raises(ValueError):
        replay.message_class("Image")
    assert replay.parse_remaps(["/a:=/b", "c:=d"]) == {"/a": "/b", "c": "d"}
    with pytest.raises(ValueError):
        replay.parse_remaps(["/a=/b"])


def test_child_env_strips_the_bootstrap_marker():
    """A child that inherits _ROS_WHEELS_BOOTSTRAP_COMPLETE without the wheels' library path
    cannot import rclpy; child_env() removes the marker so the child bootstraps itself."""
    from runa_ood_node.tools.bag_eval import child_env

    code = "import rclpy; print('rclpy ok')"
    env = child_env()
    assert "_ROS_WHEELS_BOOTSTRAP_COMPLETE" not in env and env["ROS_AUTOMATIC_DISCOVERY_RANGE"] == "LOCALHOST"
    env["LD_LIBRARY_PATH"] = ""
    ok = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0 and "rclpy ok" in ok.stdout, ok.stderr[-500:]
    if os.environ.get("_ROS_WHEELS_BOOTSTRAP_COMPLETE"):
        bad = dict(os.environ, LD_LIBRARY_PATH="")
        broken = subprocess.run([sys.executable, "-c", code], env=bad, capture_output=True, text=True, timeout=60)
        assert broken.returncode != 0  # the hazard child_env exists for
