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
