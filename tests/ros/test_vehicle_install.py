"""The vehicle install carries only what the node needs: the node is built and scores a frame in a
process where every module of the workshop's extras ([tools], [export], [fleet]: Ray, pyarrow,
pandas, matplotlib, scikit-image, scipy, rosbags, onnx, ...) is unimportable.

The blocked names are the top-level imports of every distribution outside the vehicle closure
(scripts/install_size.py resolves both from the installed packages' metadata), so a new workshop
dependency that the node starts importing fails here. The node is a real process (tiny random model:
plumbing, not quality); this test publishes one image and its detections over loopback DDS and
receives the verdicts on ood/detections.
"""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

pytest.importorskip("rclpy")
pytest.importorskip("runa_ood_msgs.msg")

from conftest import REPO, wait_until  # noqa: E402

START_TIMEOUT = 180.0

LAUNCHER = textwrap.dedent('''
    import importlib.machinery, json, sys, traceback
    BLOCKED = set(json.loads(open(sys.argv[1]).read()))
    TRIED = sys.argv[2]

    class NotInstalled:
        """The path finder of site-packages, minus the workshop's extras: for the import system and for
        importlib.util.find_spec alike, those modules are simply not there (as on a vehicle)."""
        def __init__(self, inner):
            self.inner = inner

        def find_spec(self, name, target=None):
            if name.split(".")[0] in BLOCKED:
                with open(TRIED, "a") as f:
                    f.write(name + "\\n" + "".join("    " + ln for ln in traceback.format_stack(limit=10)
                                                     if "importlib._bootstrap" not in ln))
                return None
            return self.inner.find_spec(name, target)

        def invalidate_caches(self):
            self.inner.invalidate_caches()

    for entry in list(sys.path):
        if entry.endswith("site-packages"):
            finder = importlib.machinery.PathFinder._path_importer_cache(entry)
            if finder is not None:
                sys.path_importer_cache[entry] = NotInstalled(finder)
    for m in list(sys.modules):
        if m.split(".")[0] in BLOCKED:
            raise SystemExit(f"{m} was imported before the blocker (interpreter start-up)")
''')
NODE = "from runa_ood_node.ros.node import main\nsys.exit(main(sys.argv[3:]))\n"



def _outside_vehicle_imports():
    spec = importlib.util.spec_from_file_location("install_size", REPO / "scripts" / "install_size.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.outside_vehicle_imports()


def test_node_scores_a_frame_without_the_workshop(tmp_path):
    import rclpy
    from rclpy.qos import QoSProfile, ReliabilityPolicy, qos_profile_sensor_data
    from runa_ood_msgs.msg import OodDetectionArray
    from sensor_msgs.msg import Image
    from vision_msgs.msg import Detection2DArray

    from runa_ood_node.ros import convert
    from runa_ood_node.ros.spin import spinning_node

    blocked = _outside_vehicle_imports()
    # the extras' big modules are in the list (the metadata walk found them)
    for name in ("ray", "pyarrow", "matplotlib", "skimage", "onnx", "rosbags"):
        assert name in blocked, (name, blocked)
    (tmp_path / "blocked.json").write_text(json.dumps(blocked))
    (tmp_path / "launcher.py").write_text(LAUNCHER + NODE)
    tried = tmp_path / "tried.txt"
    log = open(tmp_path / "node.log", "w")
    proc = subprocess.Popen(
        [sys.executable, str(tmp_path / "launcher.py"), str(tmp_path / "blocked.json"), str(tried),
         "--ros-args", "-r", "__ns:=/vehicle", "-p", "model:=runa-tiny-vit", "-p", "pretrained:=''",
         "-p", "allow_random_weights:=true", "-p", "backend:=torch", "-p", "max_boxes:=0",
         "-p", "default_threshold:=-10.0"],
        stdout=log, stderr=subprocess.STDOUT, env=dict(os.environ), start_new_session=True)
    got = []
    try:
        with spinning_node("vehicle_install_tester") as node:
            node.create_subscription(OodDetectionArray, "/vehicle/ood/detections", got.append,
                                     QoSProfile(depth=10, reliability=ReliabilityPolicy.RELIABLE))
            pub_img = node.create_publisher(Image, "/vehicle/image", qos_profile_sensor_data)
            pub_det = node.create_publisher(Detection2DArray, "/vehicle/detections",
                                            QoSProfile(depth=10, reliability=ReliabilityPolicy.RELIABLE))
            rgb = np.random.default_rng(0).integers(0, 255, (120, 160, 3), dtype=np.uint8)
            boxes = np.array([[10, 10, 60, 70], [80, 20, 150, 110]], np.float64)
            t_end = time.monotonic() + START_TIMEOUT
            stamp = 1_000_000_000
            while not got and time.monotonic() < t_end and proc.poll() is None:
                stamp += 100_000_000
                h = convert.copy_header(None)
                h.stamp = convert.ns_to_stamp(stamp)
                h.frame_id = "camera"
                pub_img.publish(convert.rgb_to_image(rgb, h))
                pub_det.publish(convert.boxes_to_detections(h, boxes, scores=[0.9, 0.8]))
                time.sleep(0.25)
            wait_until(lambda: bool(got) or proc.poll() is not None, 10, "ood/detections from the vehicle node")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, 15)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            proc.wait(timeout=10)
        log.close()
    out = (tmp_path / "node.log").read_text()
    assert got, f"no verdicts (node exit {proc.returncode}):\n{out[-3000:]}\nblocked imports tried:\n" + (
        tried.read_text()[-4000:] if tried.exists() else "none")
    msg = got[0]
    assert len(msg.detections) == 2 and msg.random_weights
    assert all(d.status == 0 and np.isfinite(d.uncertainty) for d in msg.detections)
    tried_text = tried.read_text() if tried.exists() else ""
    tried_names = sorted({ln for ln in tried_text.splitlines() if ln and not ln.startswith(" ")})
    print(f"blocked {len(blocked)} workshop modules; the node tried (and did without): {tried_names}")
    assert "Traceback" not in out, out[-4000:]


def test_the_blocker_hides_the_workshop(tmp_path):
    """The same preamble makes an extra's module missing for `import` and for find_spec alike."""
    (tmp_path / "blocked.json").write_text(json.dumps(["matplotlib"]))
    probe = "import importlib.util\nassert importlib.util.find_spec('matplotlib') is None\nimport matplotlib\n"
    (tmp_path / "probe.py").write_text(LAUNCHER + probe)
    r = subprocess.run([sys.executable, str(tmp_path / "probe.py"), str(tmp_path / "blocked.json"),
                        str(tmp_path / "tried.txt")], capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "No module named 'matplotlib'" in r.stderr, r.stderr[-2000:]
    assert "matplotlib" in (tmp_path / "tried.txt").read_text()
