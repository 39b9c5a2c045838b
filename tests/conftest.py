"""Shared test fixtures.

Every process that starts DDS must keep discovery on this machine; a distinct ROS_DOMAIN_ID per
run keeps parallel runs apart. Nothing here downloads anything: models are tiny and random.
"""
import json
import os
import pathlib
import random
import tempfile

import pytest

os.environ["ROS_AUTOMATIC_DISCOVERY_RANGE"] = "LOCALHOST"


def _claim_domain_id() -> int:
    """A ROS_DOMAIN_ID no other test run on this machine holds: an exclusive lock per id, kept for
    the whole session (two runs at once - a developer's and CI's - never see each other's nodes)."""
    import fcntl

    ids = list(range(1, 101))
    random.SystemRandom().shuffle(ids)
    for domain in ids:
        fd = os.open(os.path.join(tempfile.gettempdir(), f"runa_ood_domain_{domain}.lock"), os.O_CREAT | os.O_RDWR)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            continue
        _DOMAIN_LOCKS.append(fd)  # held until the process exits
        return domain
    raise RuntimeError("no free ROS_DOMAIN_ID in 1..100 for this test run")


_DOMAIN_LOCKS: list = []
if "ROS_DOMAIN_ID" not in os.environ:
    os.environ["ROS_DOMAIN_ID"] = str(_claim_domain_id())
_TMP = pathlib.Path(tempfile.mkdtemp(prefix="runa_ood_tests_"))
os.environ.setdefault("ROS_LOG_DIR", str(_TMP / "ros_log"))
os.environ.setdefault("RUNA_OOD_CACHE_DIR", str(_TMP / "cache"))

REPO = pathlib.Path(__file__).resolve().parents[1]
OOD_PACK = (REPO.parent / "shared" / "data" / "ood_pack").resolve()
TINY_MODEL = "runa-tiny-vit"
if (OOD_PACK / "annotations.json").exists():  # the tools' default --annotations (core.paths.data_pack_annotations)
    os.environ.setdefault("RUNA_OOD_DATA_PACK", str(OOD_PACK / "annotations.json"))


#: The rooms of the suite (a folder each, a marker each): ``pytest -m unit`` or ``pytest tests/unit``
#: runs the unit tests alone (no rclpy, no subprocess; tests/unit/test_architecture.py keeps them so).
ROOMS = {
    "unit": "core, methods, backends, factory: no rclpy, no subprocess, no DDS",
    "ros": "the node, its messages, parameters and launch files over real rclpy / ros2 launch",
    "tools": "the runa-ood commands, bags, fleet, demo, benchmarks and the proving-ground gate",
}


def pytest_configure(config):
    for room, what in ROOMS.items():
        config.addinivalue_line("markers", f"{room}: {what}")


def pytest_collection_modifyitems(config, items):
    for item in items:
        room = pathlib.Path(str(item.fspath)).parent.name
        if room in ROOMS:
            item.add_marker(getattr(pytest.mark, room))


def pytest_sessionstart(session):
    """Under scripts/test.sh (and so in CI) the ROS parts must be there: a missing interface build
    fails the run instead of silently skipping the node, bag and type-hash tests."""
    if os.environ.get("RUNA_OOD_REQUIRE_ROS"):
        try:
            import rclpy  # noqa: F401
            import runa_ood_msgs.msg  # noqa: F401
            import vision_msgs.msg  # noqa: F401
        except ImportError as exc:
            pytest.exit(f"RUNA_OOD_REQUIRE_ROS is set but the ROS interfaces do not import ({exc}); "
                        "run scripts/setup.sh and source scripts/env.sh", returncode=3)


@pytest.fixture(autouse=True)
def _package_loggers_propagate():
    """``import launch`` (the ros2_cli fixture checks launch_ros) makes every logger created afterwards a
    ``launch.logging.LaunchLogger`` with ``propagate = False``; a package module first imported after it
    would then log past caplog. Tests see the package's loggers as a process without launch has them."""
    import logging

    for name, lg in list(logging.Logger.manager.loggerDict.items()):
        if name.startswith("runa_ood_node") and isinstance(lg, logging.Logger) and not lg.propagate:
            lg.propagate = True
    cls = logging.getLoggerClass()
    logging.setLoggerClass(logging.Logger)  # loggers made during the test (caplog.at_level's) propagate too
    yield
    logging.setLoggerClass(cls)


@pytest.fixture(scope="session")
def ood_pack():
    """The shared data pack of real photographs; tests that need it skip when it is absent."""
    if not (OOD_PACK / "annotations.json").exists():
        pytest.skip(f"shared data pack not found at {OOD_PACK}")
    return OOD_PACK


@pytest.fixture(scope="session")
def ood_pack_annotations(ood_pack):
    return json.loads((ood_pack / "annotations.json").read_text())


@pytest.fixture(scope="session")
def real_photo(ood_pack_annotations, ood_pack):
    """A real 640x480 RGB photograph (uint8 HxWx3) with its annotation boxes (xywh)."""
    import cv2

    for img in ood_pack_annotations["images"]:
        if img["width"] == 640 and img["height"] == 480:
            boxes = [a["bbox"] for a in ood_pack_annotations["annotations"] if a["image_id"] == img["id"]]
            if len(boxes) >= 3:
                bgr = cv2.imread(str(ood_pack / img["file_name"]), cv2.IMREAD_COLOR)
                return bgr[:, :, ::-1].copy(), boxes
    pytest.skip("no 640x480 photograph with >= 3 boxes in the data pack")


@pytest.fixture(scope="session")
def tiny_encoder():
    """A tiny randomly initialised open_clip ViT (see core/model_configs/runa-tiny-vit.json)."""
    from runa_ood_node.core.encoder import DualEncoder

    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    return DualEncoder.load(TINY_MODEL, pretrained=None, device="cpu", allow_random=True)


@pytest.fixture(scope="session")
def tiny_scorer(tiny_encoder):
    """An ``OodScorer`` over the tiny random encoder with the built-in VOC label set (no thresholds)."""
    from runa_ood_node.core.pipeline import OodScorer

    return OodScorer(tiny_encoder, "voc")


@pytest.fixture
def one_thread():
    """torch on one thread for the test: tiny training loops on the loaded 2-core machine ran 30x slower
    with two threads spinning against each other (the few-shot head fits of core/methods)."""
    torch = pytest.importorskip("torch")
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ------------------------------------------------------------------ the real ROS 2 tools (ros2 CLI)
TINY_NODE_PARAMS = {"model": TINY_MODEL, "pretrained": "", "allow_random_weights": True, "backend": "torch",
                    "max_boxes": 0}
#: the live node rigs' parameters (test_node.Rig, test_cameras.CamRig; each adds its alert and health
#: timings): the tiny model, every box scored, queues deep enough that nothing is dropped while a slow
#: machine catches up, reliable images
RIG_NODE_PARAMS = dict(TINY_NODE_PARAMS, **{
    "default_threshold": -10.0, "max_boxes": 50, "image_qos": "reliable", "image_queue_size": 50,
    "detections_queue_size": 50, "processing_queue_size": 50, "pairing_buffer": 50,
    "alert.k": 2, "alert.n": 3, "health.latency_budget_ms": 1e5})


class Ros2Cli:
    """The ``ros2`` command (a ROS installation's, or the one scripts/ros2_tools.sh built from
    ../shared/ros2-src) with this checkout registered in a scratch ament prefix by
    scripts/ament_register.py (the set-up's own step), so ``ros2 launch runa_ood_node ...`` starts
    THIS checkout's launch files and node. ``env``: the environment for child processes."""

    def __init__(self, exe: str, prefix: pathlib.Path, tmp: pathlib.Path):
        import sys

        self.exe = exe
        self.prefix = prefix
        env = dict(os.environ)
        env.pop("_ROS_WHEELS_BOOTSTRAP_COMPLETE", None)  # children bootstrap the wheels' library path
        env["ROS_AUTOMATIC_DISCOVERY_RANGE"] = "LOCALHOST"
        env["PYTHONUNBUFFERED"] = "1"
        env["AMENT_PREFIX_PATH"] = os.pathsep.join([str(prefix), env.get("AMENT_PREFIX_PATH", "")]).rstrip(os.pathsep)
        env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
        env["RCUTILS_COLORIZED_OUTPUT"] = "0"
        self.env = env
        self.python = sys.executable
        self.tiny_params = tmp / "tiny_params.yaml"
        import yaml

        self.tiny_params.write_text(yaml.safe_dump({"/**": {"ros__parameters": TINY_NODE_PARAMS}}))

    def run(self, *args: str, timeout: float = 60.0, check: bool = False):
        """``ros2 ARGS`` -> CompletedProcess (text; stdout and stderr separate)."""
        import subprocess

        proc = subprocess.run([self.exe, *args], env=self.env, capture_output=True, text=True, timeout=timeout)
        if check and proc.returncode != 0:
            raise AssertionError(f"ros2 {' '.join(args)} -> {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
        return proc

    def popen(self, *args: str, log_path: pathlib.Path, env=None):
        """``ros2 ARGS`` in its own process group (so a test can signal all of it, like a terminal's
        Ctrl-C), stdout+stderr into ``log_path``."""
        import subprocess

        log = open(log_path, "w")
        return subprocess.Popen([self.exe, *args], env=env or self.env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True, text=True)


@pytest.fixture(scope="session")
def ros2_cli(tmp_path_factory):
    """:class:`Ros2Cli`; skips without the tools, fails under RUNA_OOD_REQUIRE_ROS=1 (scripts/test.sh)."""
    import shutil
    import subprocess
    import sys

    exe = shutil.which("ros2")
    problem = None
    if exe is None:
        problem = ("the `ros2` command is not on PATH (no ROS installation, and scripts/ros2_tools.sh did not build "
                   "the tools: ../shared/ros2-src missing?); source scripts/env.sh")
    else:
        try:
            import launch_ros  # noqa: F401
        except ImportError as exc:
            problem = f"launch_ros does not import ({exc}); source scripts/env.sh"
    if problem:
        if os.environ.get("RUNA_OOD_REQUIRE_ROS"):
            pytest.fail(f"RUNA_OOD_REQUIRE_ROS is set: {problem}")
        pytest.skip(problem)
    tmp = tmp_path_factory.mktemp("ros2_cli")
    prefix = tmp / "prefix"
    subprocess.run([sys.executable, str(REPO / "scripts" / "ament_register.py"), "--prefix", str(prefix)],
                   check=True, capture_output=True, text=True, timeout=120)
    cli = Ros2Cli(exe, prefix, tmp)
    yield cli
    cli.run("daemon", "stop", timeout=30)  # every call uses --no-daemon; stop one if anything spawned it


def wait_until(pred, timeout: float, what: str, interval: float = 0.05):
    """Poll ``pred`` until true; AssertionError naming ``what`` after ``timeout`` seconds."""
    import time

    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


class NodeRig:
    """What the node test rigs (``test_node.Rig``, ``test_cameras.CamRig``) share: ``node`` (the
    RunaOodNode under test), ``t`` (the tester node) and ``ex`` (the executor spinning both)."""

    timeout = 30.0

    def _idle(self, queues_done, what: str):
        """Wait until ``queues_done()`` (every frame sent so far received and processed); the accounting."""
        import time

        time.sleep(0.05)  # the last publish reaches the node
        wait_until(queues_done, self.timeout, what, interval=0.02)
        return self.node.accounting()

    def close(self):
        self.ex.shutdown()
        self.node.trigger_shutdown()
        self.node.destroy_node()
        self.t.destroy_node()


def flatten_params(d: dict, prefix: str = ""):
    """``(dotted.name, value)`` pairs of a nested ``ros__parameters`` dict (YAML file or ``ros2 param dump``)."""
    for k, v in d.items():
        if isinstance(v, dict):
            yield from flatten_params(v, f"{prefix}{k}.")
        else:
            yield f"{prefix}{k}", v
