"""The node's QoS profiles and the middleware transport it runs on (for its start-up log line)."""
from __future__ import annotations

import os

from rclpy.duration import Duration
from rclpy.qos import (DurabilityPolicy, HistoryPolicy, LivelinessPolicy, QoSProfile, ReliabilityPolicy,
                       qos_profile_sensor_data)

from .transport import active_profile


def reliable(depth: int, latched: bool = False) -> QoSProfile:
    """Reliable, keep last ``depth``; transient local when ``latched`` (late subscribers get the last)."""
    return QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=depth, reliability=ReliabilityPolicy.RELIABLE,
                      durability=DurabilityPolicy.TRANSIENT_LOCAL if latched else DurabilityPolicy.VOLATILE)


def monitored(qos: QoSProfile, lease_s: float, deadline: bool = False) -> QoSProfile:
    """``qos`` with AUTOMATIC liveliness and a lease of ``lease_s`` (and that deadline when
    ``deadline``): a subscriber asking for the same learns within ``lease_s`` that the node is gone."""
    qos.liveliness = LivelinessPolicy.AUTOMATIC
    qos.liveliness_lease_duration = Duration(seconds=lease_s)
    if deadline:
        qos.deadline = Duration(seconds=lease_s)
    return qos


def input_qos(name: str, depth: int) -> QoSProfile:
    """An input's QoS by its parameter value: ``sensor_data`` (best effort) or ``reliable``."""
    if name == "sensor_data":
        return QoSProfile(**{k: getattr(qos_profile_sensor_data, k) for k in ("history", "reliability", "durability")},
                          depth=depth)
    return reliable(depth)


def transport_name() -> str:
    """This process's middleware transport setting, for the start-up log line."""
    rmw = os.environ.get("RMW_IMPLEMENTATION", "") or "rmw_fastrtps_cpp"
    if "fastrtps" not in rmw and "fastdds" not in rmw:
        return rmw
    profile = active_profile()
    return f"Fast DDS profile {profile}" if profile else "Fast DDS default transports (no FASTDDS_DEFAULT_PROFILES_FILE)"


__all__ = ["reliable", "monitored", "input_qos", "transport_name"]
