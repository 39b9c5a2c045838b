"""Messages lost between a publisher and the node: the Fast DDS side.

Plain Python (no rclpy): the Fast DDS profile helpers the launch file and ``runa-ood bench-node``
share, and the node's advice when messages are lost (``tests/ros/test_transport_loss.py``).

The counting (``StreamLoss``) and the announcing (``LossWatch``) are ROS-free policy in
:mod:`runa_ood_node.core.loss` (tests/unit/test_loss.py); :func:`loss_advice` names the likely cause
(Fast DDS's default transports cut a large image into fragments through a 512 KiB shared-memory
segment and lose them in bursts; the shipped profile ``config/fastdds_one_host.xml`` carries an
image in one piece).
"""
from __future__ import annotations

import os
import pathlib
from typing import Optional

__all__ = ["loss_advice", "ONE_HOST_PROFILE", "one_host_profile", "fastdds_profile", "PROFILE_ENV_VARS",
           "active_profile"]

#: Fast DDS 3 reads the first, Fast DDS 2 (ROS 2 Humble / Jazzy) the second
PROFILE_ENV_VARS = ("FASTDDS_DEFAULT_PROFILES_FILE", "FASTRTPS_DEFAULT_PROFILES_FILE")


# ---------------------------------------------------------------------------------- Fast DDS profile
def one_host_profile() -> pathlib.Path:
    """The shipped Fast DDS profile ``config/fastdds_one_host.xml``: the source checkout's, else
    the installed ``share/runa_ood_node/config`` one (the checkout's path when neither exists)."""
    here = pathlib.Path(__file__).resolve().parents[2] / "config" / "fastdds_one_host.xml"
    if here.is_file():
        return here
    try:
        from ament_index_python.packages import get_package_share_directory

        installed = pathlib.Path(get_package_share_directory("runa_ood_node")) / "config" / "fastdds_one_host.xml"
        if installed.is_file():
            return installed
    except Exception:  # no ament index / package not installed
        pass
    return here


#: the shipped Fast DDS profile for a pipeline on one computer (see the file's comment)
ONE_HOST_PROFILE = one_host_profile()


def fastdds_profile(choice: str) -> Optional[str]:
    """The profile file a ``one-host | env | none | PATH`` choice names: ``one-host`` = the shipped
    one; ``env`` = the environment's FASTDDS_DEFAULT_PROFILES_FILE (FASTRTPS_DEFAULT_PROFILES_FILE),
    None when unset = Fast DDS's defaults; ``none`` or empty = None (no profile applied); else a path.

    Raises:
        FileNotFoundError: the file does not exist.
    """
    choice = (choice or "").strip()
    if choice.lower() in ("", "none"):
        return None
    path = {"one-host": str(ONE_HOST_PROFILE), "env": active_profile()}.get(choice, choice)
    if path and not pathlib.Path(os.path.expanduser(path)).is_file():
        raise FileNotFoundError(f"Fast DDS profile {path!r} ({choice}) does not exist")
    return os.path.expanduser(path) if path else None


def active_profile(env=None) -> Optional[str]:
    """The Fast DDS profile file this process's environment points at (None: Fast DDS's defaults)."""
    env = os.environ if env is None else env
    for var in PROFILE_ENV_VARS:
        if env.get(var, "").strip():
            return env[var].strip()
    return None


def loss_advice(env=None) -> str:
    """The likely cause of heavy losses in transport and what to do, for this process's environment."""
    env = os.environ if env is None else env
    rmw = env.get("RMW_IMPLEMENTATION", "") or "rmw_fastrtps_cpp (default)"
    profile = active_profile(env)
    shipped = str(ONE_HOST_PROFILE)
    if "fastrtps" not in rmw and "fastdds" not in rmw:
        return (f"likely cause: the middleware ({rmw}) drops samples (queue depth, large messages over UDP); "
                "check its shared-memory / buffer settings and the subscription's queue size (image_queue_size)")
    if not profile:
        return ("likely cause: Fast DDS's default transports (this process has no FASTDDS_DEFAULT_PROFILES_FILE): "
                "an image larger than its 512 KiB shared-memory segment is cut into fragments that are lost in "
                "bursts. Point EVERY process of the pipeline (camera driver, detector, this node) at the shipped "
                f"profile: export FASTDDS_DEFAULT_PROFILES_FILE={shipped} (runa_ood.launch.py applies it to the "
                "node by default: launch argument fastdds_profile)")
    return (f"this process uses the Fast DDS profile {profile}; if the publishers do not use it too, images are "
            f"still cut into fragments on their side (export FASTDDS_DEFAULT_PROFILES_FILE={shipped} for every "
            "process of the pipeline); otherwise the subscription's queue overflows: the node (or the CPU) "
            "cannot keep up, or image_queue_size is too small")
