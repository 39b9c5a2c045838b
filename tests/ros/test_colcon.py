"""The colcon route: the repository inside a workspace, built as a vehicle builds it.

`colcon build` of the package (an ament_python package: package.xml, setup.py, setup.cfg,
resource/) into a scratch workspace, then `ros2 pkg executables` and `ros2 launch` from that
install alone (the checkout is not on the path). About a minute: opt-in with RUNA_OOD_SLOW_TESTS=1,
which .ci/run sets.
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys

import pytest

pytest.importorskip("rclpy")

from conftest import REPO, wait_until  # noqa: E402

pytestmark = pytest.mark.skipif(not os.environ.get("RUNA_OOD_SLOW_TESTS"),
                                reason="colcon build + launch take about a minute; set RUNA_OOD_SLOW_TESTS=1 "
                                       "(.ci/run does)")

PACKAGE_FILES = ("package.xml", "setup.py", "setup.cfg", "MANIFEST.in", "requirements", "resource", "runa_ood_node",
                 "launch", "config", "calibration")


def test_colcon_build_then_ros2_pkg_and_launch_from_the_install(ros2_cli, tmp_path):
    colcon = shutil.which("colcon")
    assert colcon, "colcon is not on PATH (source scripts/env.sh)"
    src = tmp_path / "ws" / "src" / "runa_ood_node"
    src.mkdir(parents=True)
    for name in PACKAGE_FILES:
        p = REPO / name
        if p.is_dir():
            shutil.copytree(p, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        else:
            shutil.copy2(p, src / name)
    env = dict(ros2_cli.env)
    # neither the checkout nor its ament registration: only what colcon installs
    env["PYTHONPATH"] = os.pathsep.join(p for p in env.get("PYTHONPATH", "").split(os.pathsep)
                                        if p and os.path.realpath(p) != os.path.realpath(REPO))
    env["AMENT_PREFIX_PATH"] = os.pathsep.join(p for p in env["AMENT_PREFIX_PATH"].split(os.pathsep)
                                               if p != str(ros2_cli.prefix))
    build = subprocess.run([colcon, "--log-base", "log", "build", "--packages-select", "runa_ood_node"],
                           cwd=tmp_path / "ws", env=env, capture_output=True, text=True, timeout=600)
    assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-3000:]
    install = tmp_path / "ws" / "install" / "runa_ood_node"
    site = install / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}" / "site-packages"
    assert (install / "lib" / "runa_ood_node" / "runa_ood_node").is_file()
    assert (install / "share" / "runa_ood_node" / "launch" / "runa_ood.launch.py").is_file()
    env["AMENT_PREFIX_PATH"] = os.pathsep.join([str(install), env["AMENT_PREFIX_PATH"]])
    env["PYTHONPATH"] = os.pathsep.join([str(site), env["PYTHONPATH"]])

    def ros2(*args):
        return subprocess.run([ros2_cli.exe, *args], env=env, capture_output=True, text=True, timeout=120)

    assert ros2("pkg", "prefix", "runa_ood_node").stdout.strip() == str(install)
    exes = ros2("pkg", "executables", "runa_ood_node").stdout.split("\n")
    assert "runa_ood_node runa_ood_node" in exes and "runa_ood_node runa-ood" in exes, exes
    log_path = tmp_path / "launch.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen([ros2_cli.exe, "launch", "runa_ood_node", "runa_ood.launch.py", "namespace:=colcon",
                                 f"params_file:={ros2_cli.tiny_params}"], env=env, cwd=tmp_path, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_until(lambda: "active: image" in log_path.read_text() or proc.poll() is not None, 180,
                   "the node launched from the colcon install to become active")
        assert proc.poll() is None, log_path.read_text()[-3000:]
        # the node's code is the installed copy, not the checkout
        probe = subprocess.run([sys.executable, "-c", "import runa_ood_node; print(runa_ood_node.__file__)"],
                               env=env, cwd=tmp_path, capture_output=True, text=True, timeout=60)
        assert probe.stdout.strip().startswith(str(install)), probe.stdout + probe.stderr
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGINT)
        rc = proc.wait(timeout=60)
    text = log_path.read_text()
    assert rc == 0 and "[ERROR]" not in text, text[-3000:]
