"""The node's two vehicle-level alert topics: ``ood/driver_alert`` and ``ood/monitor_health``.

What they say is decided in core (``core.vehicle``: the highest camera level and the cameras at it;
health degraded when any camera is); :class:`DriverAlerts` publishes it: the driver alert written
as bytes with the OOD objects of the frame embedded (``ros.wire.write_alert``, as in
ood/detections), the monitor health as an rclpy message that the heartbeat re-stamps and
re-publishes with current figures (the topic's deadline).
"""
from __future__ import annotations

import time
from typing import Any, Optional, Sequence

from ..core.health import _get  # a dict's key or an object's attribute (alerts come as either)
from ..core.registry import AlertLevel
from ..core.vehicle import VehicleAlert, VehicleHealth
from . import convert, wire


class DriverAlerts:
    """Publishes the vehicle's driver alert and monitor health for ``node`` (its clock and logger)
    on ``alert_pub`` / ``health_pub``, over ``cameras`` (each with ``name``, ``alerts``, ``health``)."""

    def __init__(self, node, alert_pub, health_pub, cameras: Sequence[Any], multi: bool):
        self.node, self.alert_pub, self.health_pub = node, alert_pub, health_pub
        self.cameras = list(cameras)
        self.vehicle = VehicleAlert({c.name: c.alerts for c in self.cameras}, multi=multi)
        self.health = VehicleHealth(multi=multi)
        self.last_health_msg = None

    @property
    def level(self) -> int:
        """The vehicle level last published on ood/driver_alert."""
        return self.vehicle.level

    def activated(self) -> None:
        """Both CLEAR (latched): the monitors were just reset."""
        self.vehicle.reset()
        self.health.reset()
        self.publish({"level": 0, "reason": "CLEAR: node activated, no OOD object seen yet"})
        self.publish({"level": 0, "reason": "CLEAR: node activated, waiting for frames"}, health=True)

    def publish(self, alert, header=None, dets=None, res=None, health: bool = False) -> None:
        """Publish a driver alert (anything with ``level``, ``reason``, ``object_indices``, or such a
        dict): on ood/monitor_health (``health``) or ood/driver_alert with the OOD objects
        ``dets[object_indices]`` embedded as their bytes, as in ood/detections."""
        from runa_ood_msgs.msg import DriverAlert

        if header is None:
            header = convert.copy_header(None)
            header.stamp = self.node.get_clock().now().to_msg()
        level, reason = int(_get(alert, "level", 0)), str(_get(alert, "reason", "") or "")
        if health:  # no detections in it: an rclpy message, re-stamped and re-published by the heartbeat
            self.last_health_msg = convert.to_health_alert(header, level, reason)
            self.health_pub.publish(self.last_health_msg)
        else:
            self.alert_pub.publish(wire.write_alert(header, level, DriverAlert.SOURCE_OOD_OBJECT, reason, dets, res,
                                                    _get(alert, "object_indices", None) or ()))

    def camera_alert(self, camera: str, alert, header, dets, res) -> None:
        """Camera ``camera``'s alert monitor saw a frame (``alert``): publish the vehicle's alert when
        it changes (called by the scoring threads: decided and published in order)."""
        log = self.node.get_logger()
        with self.vehicle.lock:
            change = self.vehicle.update(camera, alert)
            if change is None:
                return
            if change.of_frame:
                self.publish(change, header, dets, res)
            else:  # this camera went down while others hold the level: no objects of this frame in it
                self.publish(change)
            text = f"driver alert -> {AlertLevel(change.level).name}: {change.reason}"
            if change.level:  # (rclpy: one severity per call site)
                log.warning(text)
            else:
                log.info(text)

    def check_health(self, lock) -> bool:
        """Check every camera's health (under ``lock``); publish ood/monitor_health when the kind of
        problem changes, else refresh the reason the heartbeat re-publishes. True when published."""
        if not self.cameras or self.cameras[0].health is None:
            return False
        now = time.monotonic()
        with lock:
            change = self.health.check([(cam.name, cam.health.check(now)) for cam in self.cameras])
        if change.refresh is not None and self.last_health_msg is not None:
            self.last_health_msg.reason = change.refresh  # current figures: a 40 s silence reads 40 s
        if not change.publish:
            return False
        log = self.node.get_logger()
        if change.level:  # (rclpy: one severity per call site)
            log.warning(change.log)
        else:
            log.info(change.log)
        self.publish(change, health=True)
        return True

    def heartbeat(self, lock) -> None:
        """Re-publish the current ood/monitor_health message with a fresh stamp (the topic's
        deadline) and current figures (its reason re-read from the health monitors now)."""
        if self.check_health(lock):  # a transition was just published
            return
        msg: Optional[Any] = self.last_health_msg
        if msg is not None:
            msg.header.stamp = self.node.get_clock().now().to_msg()
            self.health_pub.publish(msg)


__all__ = ["DriverAlerts"]
