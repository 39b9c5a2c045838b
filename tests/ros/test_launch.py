"""The package as a ROS 2 user runs it: real `ros2 launch`, `ros2 pkg/param/lifecycle`, the launch files.

The `ros2` command is a ROS installation's, or the launch / CLI stack scripts/ros2_tools.sh builds
from ../shared/ros2-src (fixture ``ros2_cli`` in conftest: skips without it, fails under
RUNA_OOD_REQUIRE_ROS=1). The package is registered in a scratch ament prefix by
scripts/ament_register.py, the very step scripts/setup.sh runs for the venv. Nodes run the tiny
random model; nothing here is timed (waits are generous timeouts).

One vehicle launch (namespace, params_file, image and detections remaps) serves the CLI tests in
file order and is ended by the SIGINT test.
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import yaml

pytest.importorskip("rclpy")
pytest.importorskip("runa_ood_msgs.msg")
pytest.importorskip("vision_msgs.msg")

from conftest import REPO, TINY_NODE_PARAMS, flatten_params, wait_until  # noqa: E402

START_TIMEOUT = 180.0  # s: torch + open_clip import and a model build on a busy 2-core machine
NS, NODE = "veh", "/veh/runa_ood"
IMAGE_TOPIC, DET_TOPIC = "/cam/front/image", "/det/front"
PARAM_ARGS = ("--no-daemon", "--timeout", "30")  # wait up to 30 s for the node to be discovered
LIFECYCLE_ARGS = ("--no-daemon", "--spin-time", "3")  # discovery time of the CLI's own node


def _log(path) -> str:
    try:
        return path.read_text(errors="replace")
    except FileNotFoundError:
        return ""


def _end(proc, timeout: float = 30.0) -> int:
    """SIGINT to the process group (a terminal's Ctrl-C); SIGKILL if it does not end."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGINT)
            return proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
    return proc.returncode


class Launched:
    def __init__(self, proc, log_path):
        self.proc, self.log_path = proc, log_path

    @property
    def log(self) -> str:
        return _log(self.log_path)


@pytest.fixture(scope="module")
def vehicle(ros2_cli, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("vehicle")
    params = dict(TINY_NODE_PARAMS, **{"alert.n": 4, "alert.k": 2, "health.frame_timeout_s": 30.0,
                                       "publish_annotated": True})
    params_file = tmp / "vehicle.yaml"
    params_file.write_text(yaml.safe_dump({"/**": {"ros__parameters": params}}))
    proc = ros2_cli.popen("launch", "runa_ood_node", "runa_ood.launch.py", f"namespace:={NS}",
                          f"params_file:={params_file}", f"image_topic:={IMAGE_TOPIC}",
                          f"detections_topic:={DET_TOPIC}", log_path=tmp / "launch.log")
    launched = Launched(proc, tmp / "launch.log")
    try:
        wait_until(lambda: "active: image" in launched.log or proc.poll() is not None, START_TIMEOUT,
                   "the launched node to become active")
        assert proc.poll() is None, launched.log[-3000:]
        yield launched
    finally:
        _end(proc)


def _wait_discovered(node):
    wait_until(lambda: ("runa_ood", f"/{NS}") in node.get_node_names_and_namespaces(), 30,
               "the launched node in the ROS graph")
    time.sleep(0.5)  # its endpoints follow the participant


def _send_until_answered(pub_img, pub_det, got, lock, stamp_ns: int, frame_id: str):
    """Publish an image and its detections (one box) until an answer with their stamp arrives in
    ``got`` (the image subscription is best effort: a sample can be lost); the answers with it."""
    from runa_ood_node.ros import convert

    rgb = np.random.default_rng(0).integers(0, 256, (48, 64, 3), dtype=np.uint8)
    for attempt in range(5):
        h = convert.copy_header(None)
        h.stamp = convert.ns_to_stamp(stamp_ns + attempt * 100_000_000)
        h.frame_id = frame_id
        pub_img.publish(convert.rgb_to_image(rgb, h))
        pub_det.publish(convert.boxes_to_detections(h, np.array([[4.0, 4.0, 40.0, 30.0]]), class_ids=["dog"],
                                                    scores=[0.9]))
        try:
            wait_until(lambda: any(m.header.stamp == h.stamp for m in list(got)), 10, "an answer")
            break
        except AssertionError:
            continue
    with lock:
        return [m for m in got if m.header.stamp == h.stamp]


@pytest.fixture(scope="module")
def probe():
    from runa_ood_node.ros.spin import spinning_node

    with spinning_node("test_launch_probe") as node:
        yield node


def test_pkg_executables_and_share_folder(ros2_cli):
    out = ros2_cli.run("pkg", "executables", "runa_ood_node", check=True).stdout.split("\n")
    assert "runa_ood_node runa_ood_node" in out and "runa_ood_node runa-ood" in out, out
    assert ros2_cli.run("pkg", "prefix", "runa_ood_node", check=True).stdout.strip() == str(ros2_cli.prefix)
    share = ros2_cli.prefix / "share" / "runa_ood_node"
    found = {f for _, _, files in os.walk(share) for f in files}  # what ros2launch's os.walk sees
    assert {"runa_ood.launch.py", "runa_ood_replay.launch.py", "runa_ood.yaml", "runa_ood.rviz",
            "package.xml"} <= found
    args = ros2_cli.run("launch", "runa_ood_node", "runa_ood_replay.launch.py", "--show-args", check=True).stdout
    # every argument of both launch files is described
    for launch_file in ("runa_ood.launch.py", "runa_ood_replay.launch.py"):
        text = ros2_cli.run("launch", "runa_ood_node", launch_file, "--show-args", check=True).stdout
        names = re.findall(r"^    '([a-z_]+)':", text, re.M)
        assert names, text
        for name in names:
            block = text.split(f"'{name}':", 1)[1].split("\n")[1]
            assert block.strip() and "no description given" not in block, (launch_file, name)
    assert "/camera/image_raw" in args and "/detections" in args  # defaults = what `runa-ood make-bag` records


def test_vehicle_launch_remaps_loads_yaml_and_answers_with_the_source_header(vehicle, probe, ros2_cli):
    from rclpy.qos import QoSProfile, ReliabilityPolicy
    from runa_ood_msgs.msg import OodDetectionArray
    from sensor_msgs.msg import Image
    from vision_msgs.msg import Detection2DArray

    assert f"image '{IMAGE_TOPIC}'" in vehicle.log and f"detections '{DET_TOPIC}'" in vehicle.log, vehicle.log[-2000:]
    # the launch file applies the shipped Fast DDS profile to the node's process by default
    assert re.search(r"transport: Fast DDS profile \S*share/runa_ood_node/config/fastdds_one_host\.xml", vehicle.log), \
        vehicle.log[-2000:]
    _wait_discovered(probe)
    subs = dict(probe.get_subscriber_names_and_types_by_node("runa_ood", f"/{NS}"))
    assert subs.get(IMAGE_TOPIC) == ["sensor_msgs/msg/Image"] and subs.get(DET_TOPIC) == ["vision_msgs/msg/Detection2DArray"]
    got, lock = [], threading.Lock()
    qos = QoSProfile(depth=50, reliability=ReliabilityPolicy.RELIABLE)
    sub = probe.create_subscription(OodDetectionArray, f"/{NS}/ood/detections",
                                    lambda m: (lock.acquire(), got.append(m), lock.release()), qos)
    pub_img = probe.create_publisher(Image, IMAGE_TOPIC, qos)
    pub_det = probe.create_publisher(Detection2DArray, DET_TOPIC, qos)
    try:
        wait_until(lambda: pub_img.get_subscription_count() and pub_det.get_subscription_count()
                   and sub.get_publisher_count(), 30, "the node's inputs and output to match")
        out = _send_until_answered(pub_img, pub_det, got, lock, 1_700_000_000_000_000_000, "front_camera")
        assert out, vehicle.log[-2000:]
        assert out[0].header.frame_id == "front_camera" and len(out[0].detections) == 1
    finally:
        probe.destroy_subscription(sub)
        probe.destroy_publisher(pub_img)
        probe.destroy_publisher(pub_det)
    # YAML parameters in effect
    got_n = ros2_cli.run("param", "get", NODE, "alert.n", *PARAM_ARGS, check=True).stdout
    assert "Integer value is: 4" in got_n, got_n


def test_param_dump_lists_every_parameter(vehicle, ros2_cli):
    from runa_ood_node.ros.params import PARAMETERS

    out = ros2_cli.run("param", "dump", NODE, *PARAM_ARGS, check=True).stdout
    dumped = yaml.safe_load(out)[NODE]["ros__parameters"]

    flat = dict(flatten_params(dumped))
    missing = {p.name for p in PARAMETERS} - set(flat)
    assert not missing, f"`ros2 param dump` misses {sorted(missing)}:\n{out[:2000]}"
    assert flat["alert.n"] == 4 and flat["model"] == TINY_NODE_PARAMS["model"]


def test_param_set_live_and_read_only(vehicle, ros2_cli):
    ok = ros2_cli.run("param", "set", NODE, "publish_annotated", "false", *PARAM_ARGS)
    assert "Set parameter successful" in ok.stdout, ok.stdout + ok.stderr
    assert "Boolean value is: False" in ros2_cli.run("param", "get", NODE, "publish_annotated", *PARAM_ARGS).stdout
    refused = ros2_cli.run("param", "set", NODE, "model", "ViT-B-32", *PARAM_ARGS)
    text = refused.stdout + refused.stderr
    assert "Set parameter successful" not in text and "read-only" in text.lower(), text
    bad = ros2_cli.run("param", "set", NODE, "lam", "7.0", *PARAM_ARGS)  # out of its declared range
    assert "Set parameter successful" not in bad.stdout + bad.stderr


def test_lifecycle_set_round_trip(vehicle, ros2_cli):
    def state():
        for _ in range(3):
            res = ros2_cli.run("lifecycle", "get", NODE, *LIFECYCLE_ARGS)
            if res.returncode == 0:
                return res.stdout.split()[0]
        raise AssertionError(res.stderr)

    for transition in ("deactivate", "cleanup", "configure", "activate"):
        for _ in range(3):  # `ros2 lifecycle` waits a fixed --spin-time for discovery: retry if that was short
            res = ros2_cli.run("lifecycle", "set", NODE, transition, *LIFECYCLE_ARGS, timeout=START_TIMEOUT)
            if "Node not found" not in res.stderr:
                break
        assert "Transitioning successful" in res.stdout, (transition, res.stdout, res.stderr, vehicle.log[-2000:])
    assert state() == "active"
    assert vehicle.proc.poll() is None
    log = vehicle.log
    assert log.count("active: image") == 2 and log.count("configured in") == 2, log[-3000:]


def test_rviz_config_names_only_published_topics_with_the_expected_types(vehicle, probe):
    """config/runa_ood.rviz (parsed; rviz2 has no wheel): every display's topic is one the node
    publishes (the config is written for the root namespace), with the message type of the display."""
    display_types = {"rviz_default_plugins/Image": "sensor_msgs/msg/Image",
                     "rviz_default_plugins/MarkerArray": "visualization_msgs/msg/MarkerArray",
                     "rviz_default_plugins/Marker": "visualization_msgs/msg/Marker"}
    cfg = yaml.safe_load((REPO / "config" / "runa_ood.rviz").read_text())
    displays = [d for d in cfg["Visualization Manager"]["Displays"] if isinstance(d.get("Topic"), dict)]
    assert displays
    _wait_discovered(probe)
    wait_until(lambda: "/veh/ood/markers" in dict(probe.get_publisher_names_and_types_by_node("runa_ood", f"/{NS}")),
               30, "the node's publishers in the graph")
    published = dict(probe.get_publisher_names_and_types_by_node("runa_ood", f"/{NS}"))
    for d in displays:
        topic = d["Topic"]["Value"]
        assert topic.startswith("/"), topic
        assert d["Class"] in display_types, d["Class"]
        assert published.get(f"/{NS}{topic}") == [display_types[d["Class"]]], (topic, sorted(published))
        assert d["Topic"]["Reliability Policy"] in ("Reliable", "Best Effort")
        assert d["Topic"]["Durability Policy"] == "Volatile"  # matches the node's volatile publishers


def test_sigint_to_the_process_group_ends_everything_cleanly(vehicle):
    """A terminal's Ctrl-C: SIGINT to the launch AND the node; launch forwards SIGINT again."""
    os.killpg(vehicle.proc.pid, signal.SIGINT)
    rc = vehicle.proc.wait(timeout=60)
    log = vehicle.log
    assert rc == 0, log[-3000:]
    assert "process has finished cleanly" in log, log[-3000:]
    assert "[ERROR]" not in log and "exit code -2" not in log and "Traceback" not in log, log[-3000:]


def test_startup_failure_ends_the_launch_with_an_error(ros2_cli, tmp_path):
    """Default parameters (ViT-B-16 / openai) on a machine without those weights."""
    res = subprocess.run([ros2_cli.exe, "launch", "runa_ood_node", "runa_ood.launch.py", "namespace:=nowts"],
                         env=dict(ros2_cli.env, RUNA_OOD_OFFLINE="1", HF_HUB_OFFLINE="1"),
                         capture_output=True, text=True, timeout=START_TIMEOUT, start_new_session=True)
    out = res.stdout + res.stderr
    if "active: image" in out:
        pytest.skip("the default weights (ViT-B-16 openai) are in this machine's cache: start-up succeeds")
    assert res.returncode != 0, out[-3000:]
    assert "configure failed" in out and "weights" in out, out[-3000:]
    assert "exited with status 1" in out, out[-3000:]


def test_replay_launch_matches_offline_evaluation(ros2_cli, probe, tmp_path):
    """`runa-ood make-bag` -> replay launch with its default topics; playback starts when the node
    is active (launch-driven lifecycle); every box equals `runa-ood evaluate --bag` offline."""
    from rclpy.qos import QoSProfile, ReliabilityPolicy
    from runa_ood_msgs.msg import OodDetectionArray

    env = ros2_cli.env
    bag = tmp_path / "bag"
    subprocess.run([sys.executable, "-m", "runa_ood_node.tools.cli", "make-bag", "--skimage", "--max-images", "5",
                    "--out", str(bag)], env=env, check=True, capture_output=True, text=True, timeout=300)
    from runa_ood_node.tools import bagio

    n_frames = bagio.bag_info(bag).counts[bagio.IMAGE_TOPIC]
    out = tmp_path / "offline"  # the offline evaluation runs meanwhile
    offline_proc = subprocess.Popen(
        [sys.executable, "-m", "runa_ood_node.tools.cli", "evaluate", "--bag", str(bag), "--model",
         TINY_NODE_PARAMS["model"], "--pretrained", "none", "--allow-random-weights", "--no-progress", "--out", str(out)],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    got, lock = {}, threading.Lock()

    def on_msg(m):
        with lock:
            got[m.header.stamp.sec * 10**9 + m.header.stamp.nanosec] = m

    # its own namespace: kept apart from the nodes other tests of this process create (a destroyed
    # RunaOodNode used to stay in the DDS graph and a stale /runa_ood answered this launch's lifecycle
    # requests; fixed in RunaOodNode.destroy_node, see test_node_teardown: this test passes without the
    # namespace after test_cameras); the inputs keep the launch's default (absolute) topics
    sub = probe.create_subscription(OodDetectionArray, "/replay/ood/detections", on_msg,
                                    QoSProfile(depth=100, reliability=ReliabilityPolicy.RELIABLE))
    log_path = tmp_path / "replay.log"
    proc = ros2_cli.popen("launch", "runa_ood_node", "runa_ood_replay.launch.py", f"bag:={bag}",
                          f"params_file:={ros2_cli.tiny_params}", "player:=runa_ood", "namespace:=replay",
                          log_path=log_path)
    try:
        try:
            wait_until(lambda: len(got) >= n_frames or proc.poll() is not None, START_TIMEOUT,
                       f"{n_frames} frames on ood/detections")
        except AssertionError as exc:
            raise AssertionError(f"{exc}; got {len(got)}; the launch's log:\n{_log(log_path)[-4000:]}") from None
        # the player ends by itself; the node keeps running until Ctrl-C
        wait_until(lambda: "bag_player-2]: process has finished cleanly" in _log(log_path) or proc.poll() is not None,
                   120, "the bag player to finish")
        log = _log(log_path)
        assert len(got) == n_frames, log[-3000:]
        # playback began after (and because) the node reported "active"
        assert log.index("active: image") < log.index("bag_player"), log[-3000:]
    except BaseException:
        offline_proc.kill()
        offline_proc.wait(timeout=30)
        raise
    finally:
        rc = _end(proc)
        probe.destroy_subscription(sub)
    log = _log(log_path)
    assert rc == 0 and "[ERROR]" not in log, log[-3000:]

    _, err = offline_proc.communicate(timeout=300)
    assert offline_proc.returncode == 0, err[-3000:]
    records = json.loads((out / "bag_report_offline.json").read_text())["records"]
    offline = {(r["stamp_ns"], r["id"]): r for r in records}
    live = {(st, str(d.detection.id)): d for st, m in got.items() for d in m.detections}
    assert set(live) == set(offline) and offline
    for key, d in live.items():
        r = offline[key]
        assert d.is_ood == r["is_ood"] and str(d.nearest_label) == r["label"], key
        if r["uncertainty"] is None:
            assert r["status"] != "OK"
        else:
            assert float(d.uncertainty) == pytest.approx(r["uncertainty"], abs=1e-5), key


def test_rig_launch_one_node_three_cameras_with_remaps_overrides_and_typo_warning(ros2_cli, probe, tmp_path):
    """The shipped example rig under real `ros2 launch`: one node, one model, three cameras; each
    camera's topics remapped, left on compressed transport, right's detections best effort; an answer
    on front's output with front's header; a params-file key the node does not declare is warned about
    naming the closest parameter."""
    from rclpy.qos import QoSProfile, ReliabilityPolicy
    from runa_ood_msgs.msg import OodDetectionArray
    from sensor_msgs.msg import Image
    from vision_msgs.msg import Detection2DArray

    rig_file = ros2_cli.prefix / "share" / "runa_ood_node" / "config" / "camera_rig.example.yaml"
    assert rig_file.is_file()
    params_file = tmp_path / "rig_params.yaml"
    params_file.write_text(yaml.safe_dump({"/**": {"ros__parameters": dict(
        TINY_NODE_PARAMS, **{"health.frame_timeout_s": 30.0, "alert.kk": 3})}}))
    log_path = tmp_path / "rig.log"
    env = {k: v for k, v in ros2_cli.env.items() if k not in ("FASTDDS_DEFAULT_PROFILES_FILE", "FASTRTPS_DEFAULT_PROFILES_FILE")}
    proc = ros2_cli.popen("launch", "runa_ood_node", "runa_ood.launch.py", "namespace:=rig",
                          f"params_file:={params_file}", f"rig_file:={rig_file}", "fastdds_profile:=none",
                          log_path=log_path, env=env)
    try:
        wait_until(lambda: _log(log_path).count("active (") >= 3 or proc.poll() is not None, START_TIMEOUT,
                   "the three cameras to become active")
        log = _log(log_path)
        assert proc.poll() is None, log[-3000:]
        assert log.count("configured in") == 1 and "one model for 3 cameras: front, left, right" in log, log[-3000:]
        assert "'alert.kk' is not a parameter of this node and is IGNORED; did you mean 'alert.k'?" in log, log[-3000:]
        assert "transport: Fast DDS default transports" in log, log[-3000:]  # fastdds_profile:=none applies none
        wait_until(lambda: ("runa_ood", "/rig") in probe.get_node_names_and_namespaces(), 30, "the node in the graph")
        wait_until(lambda: len(dict(probe.get_subscriber_names_and_types_by_node("runa_ood", "/rig"))) >= 6, 30,
                   "the node's subscriptions in the graph")
        subs = dict(probe.get_subscriber_names_and_types_by_node("runa_ood", "/rig"))
        assert subs.get("/sensing/camera/front/image_raw") == ["sensor_msgs/msg/Image"], sorted(subs)
        assert subs.get("/sensing/camera/left/image_raw/compressed") == ["sensor_msgs/msg/CompressedImage"], sorted(subs)
        assert subs.get("/perception/right/detections") == ["vision_msgs/msg/Detection2DArray"], sorted(subs)
        pubs = dict(probe.get_publisher_names_and_types_by_node("runa_ood", "/rig"))
        for c in ("front", "left", "right"):
            assert pubs.get(f"/rig/{c}/ood/detections") == ["runa_ood_msgs/msg/OodDetectionArray"], sorted(pubs)
        assert "/rig/ood/driver_alert" in pubs and "/rig/ood/detections" not in pubs

        got, lock = [], threading.Lock()
        qos = QoSProfile(depth=50, reliability=ReliabilityPolicy.RELIABLE)
        sub = probe.create_subscription(OodDetectionArray, "/rig/front/ood/detections",
                                        lambda m: (lock.acquire(), got.append(m), lock.release()), qos)
        pub_img = probe.create_publisher(Image, "/sensing/camera/front/image_raw", qos)
        pub_det = probe.create_publisher(Detection2DArray, "/perception/front/detections", qos)
        try:
            wait_until(lambda: pub_img.get_subscription_count() and pub_det.get_subscription_count()
                       and sub.get_publisher_count(), 30, "front's inputs and output to match")
            out = _send_until_answered(pub_img, pub_det, got, lock, 1_800_000_000_000_000_000, "front_optical")
            assert out and out[0].header.frame_id == "front_optical", _log(log_path)[-2000:]
        finally:
            probe.destroy_subscription(sub)
            probe.destroy_publisher(pub_img)
            probe.destroy_publisher(pub_det)
    finally:
        rc = _end(proc)
    log = _log(log_path)
    assert rc == 0 and "Traceback" not in log, log[-3000:]


def test_a_bad_rig_file_ends_the_launch_with_an_error_naming_the_key(ros2_cli, tmp_path):
    rig = tmp_path / "rig.yaml"
    rig.write_text(yaml.safe_dump({"cameras": [{"name": "front", "image_topc": "/cam/front"}]}))
    res = subprocess.run([ros2_cli.exe, "launch", "runa_ood_node", "runa_ood.launch.py", "namespace:=badrig",
                          f"rig_file:={rig}"], env=ros2_cli.env, capture_output=True, text=True, timeout=START_TIMEOUT,
                         start_new_session=True)
    out = res.stdout + res.stderr
    assert res.returncode != 0, out[-3000:]
    assert "unknown key 'image_topc' (did you mean 'image_topic'?)" in out, out[-3000:]
