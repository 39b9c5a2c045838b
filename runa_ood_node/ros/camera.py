"""One camera of the node: its ROS entities and its executor-thread side (count, pair, queue).

A :class:`Camera` holds one input stream's settings (``params.CameraInputs``), its books
(``core.accounting.CameraLedger``: counters, the processing queue, the stamp pairer), its alert and
health monitors, publishers ``<C>/ood/...`` and subscriptions. Its input callbacks run in the
executor thread and only do cheap work: count the message received (and the messages its
publisher's sequence number shows lost on the way), read the header stamp from the raw CDR bytes,
pair (``ros.pairing``) and queue the pairs for the scoring threads (``ros.worker``); a full queue
drops its OLDEST frame (``processing_overload``).
"""
from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable, Dict, List, Optional

from ..core.accounting import Accounting, CameraLedger
from ..core.alerts import AlertMonitor
from ..core.health import HealthMonitor
from . import diagnostics, wire
from .pairing import StampPairer
from .params import CameraInputs
from .qos import input_qos, reliable
from .transport import loss_advice


class HotLog:
    """Hot-path warnings (a dropped or lost message at saturation), at most once per period per key.
    The time is checked before the message is built and before rclpy's logger, which inspects the
    caller's source file on EVERY call, throttled or not (a sixth of the executor thread's time)."""

    def __init__(self, logger):
        self.logger = logger
        self._next: Dict[Any, float] = {}

    def __call__(self, key, period_s: float, msg: Callable[[], str]) -> None:
        now = time.monotonic()
        if now >= self._next.get(key, 0.0):
            self._next[key] = now + period_s
            self.logger.warning(msg())


class Camera:
    """One input stream (see the module docstring); ``node``: the ``RunaOodNode`` it belongs to."""

    def __init__(self, inputs: CameraInputs, ledger: CameraLedger):
        self.inputs, self.name, self.prefix = inputs, inputs.name, inputs.prefix
        self.ledger = ledger
        self.alerts: Optional[AlertMonitor] = None
        self.health: Optional[HealthMonitor] = None
        self.pubs: Dict[str, Any] = {}
        self.subs: List[Any] = []

    @classmethod
    def make(cls, ci: CameraInputs, s, accounts: Accounting) -> "Camera":
        """A camera with its own books, pairing, alert tracks (an object seen by two cameras is two
        tracks) and health; a stamp jump back beyond the pairer's window resets its alert history."""
        cam = cls(ci, accounts.ledger(ci.name, max_sequence_gap=s.transport_max_sequence_gap,
                                      loss_warn_fraction=s.transport_loss_warn_fraction,
                                      loss_window_s=s.transport_loss_window_s))
        cam.ledger.pairer = StampPairer(slop_ns=int(round(s.pairing_slop_s * 1e9)), max_buffer=s.pairing_buffer,
                                        max_age_ns=int(round(s.pairing_max_age_s * 1e9)),
                                        max_future_ns=int(round(s.pairing_max_future_s * 1e9)))
        cam.alerts = AlertMonitor(dataclasses.replace(s.alert.to_alert_config(), jump_back_reset_s=s.pairing_max_age_s))
        cam.health = HealthMonitor(s.health_frame_timeout_s, s.health_latency_budget_ms)
        return cam

    @property
    def tag(self) -> str:
        """`` (front)`` for log lines; empty for the single stream."""
        return f" ({self.name})" if self.name else ""

    @property
    def pairer(self) -> Optional[StampPairer]:
        return self.ledger.pairer

    # ------------------------------------------------------------------ entities
    def create_publishers(self, create: Callable) -> None:
        """``<C>/ood/...`` (the single stream: ``ood/...``) with ``create`` (the node's
        ``create_lifecycle_publisher``)."""
        from foxglove_msgs.msg import ImageAnnotations
        from runa_ood_msgs.msg import OodDetectionArray
        from sensor_msgs.msg import Image
        from vision_msgs.msg import Detection2DArray
        from visualization_msgs.msg import MarkerArray

        c = self.prefix
        self.pubs = {
            "detections": create(OodDetectionArray, c + "ood/detections", reliable(10)),
            "ood_only": create(Detection2DArray, c + "ood/ood_only", reliable(10)),
            "annotated": create(Image, c + "ood/annotated_image", reliable(2)),
            "markers": create(MarkerArray, c + "ood/markers", reliable(5)),
            "annotations": create(ImageAnnotations, c + "ood/image_annotations", reliable(5)),
        }

    def subscribe(self, node) -> None:
        """The two inputs, taken raw (the CDR bytes), with the QoS and message-lost events watched;
        every callback wrapped by ``node._safe`` (counted received first, never raising)."""
        from sensor_msgs.msg import CompressedImage, Image
        from vision_msgs.msg import Detection2DArray

        ci = self.inputs

        def sub(msg_type, topic: str, image: bool, qos: str, depth: int):
            stream = "image" if image else "detections"
            return node.create_subscription(msg_type, topic, node._safe(lambda m: self.on_input(node, m, image), stream, self),
                                            input_qos(qos, depth), event_callbacks=self._events(node, topic, stream), raw=True)
        self.subs = [sub(CompressedImage if ci.image_transport == "compressed" else Image, ci.image_topic_resolved,
                         True, ci.image_qos, ci.image_queue_size),
                     sub(Detection2DArray, ci.detections_topic, False, ci.detections_qos, ci.detections_queue_size)]

    def _events(self, node, topic: str, stream: str):
        from rclpy.event_handler import SubscriptionEventCallbacks

        param = stream + "_qos"
        name = f"camera.{self.name}.{param}" if self.name else param

        def incompatible(event):
            self.ledger.count("qos_incompatible")
            node.get_logger().warning(
                f"a publisher on '{topic}' offers QoS incompatible with ours ({name}={getattr(self.inputs, param)}; "
                f"policy {getattr(event, 'last_policy_kind', '?')}): its messages are NOT delivered. Set "
                f"{name} to match the publisher (sensor_data accepts best effort).", throttle_duration_sec=10.0)

        def lost(event):  # the middleware's own count of samples it lost for this subscription
            self.note_lost_report(node, stream, getattr(event, "total_count_change", 0), topic)
        return SubscriptionEventCallbacks(incompatible_qos=incompatible, message_lost=lost)

    def describe(self, node, slop_s: float) -> str:
        ci = self.inputs
        return (f"active{self.tag}: image '{node.resolve_topic_name(ci.image_topic_resolved)}' ({ci.image_transport}, "
                f"{ci.image_qos} QoS) + detections '{node.resolve_topic_name(ci.detections_topic)}' "
                f"({ci.detections_qos} QoS), pairing {'exact' if slop_s == 0 else f'slop {slop_s} s'}")

    # ------------------------------------------------------------------ executor thread
    def note_received(self, node, stream: str, info) -> None:
        """Count the message received and the messages its publisher's sequence number shows lost
        on the way (DDS queue overflow, undecodable payloads, network loss: ``core.loss``)."""
        try:
            seq, gid = info["publication_sequence_number"], bytes(info["publisher_gid"]["data"])
        except (KeyError, TypeError, ValueError):
            seq = gid = None
        gap, jump = self.ledger.received_message(stream, gid, seq)
        if gap > 0:
            node.hot_log(("gap", self.name, stream), 5.0, lambda: f"{gap} {stream} message(s){self.tag} lost before "
                                                                  "reaching the node (DDS queue overflow / undecodable data)")
        elif jump is not None:
            node.hot_log(("jump", self.name, stream), 5.0, lambda: (
                f"{stream} sequence numbers{self.tag} of one publisher jumped from {jump[0]} to {jump[1]} (more than "
                f"transport.max_sequence_gap={self.ledger.loss[stream].max_gap}): counted as a new epoch of that "
                "publisher, not as lost messages"))

    def note_lost_report(self, node, stream: str, n, topic: str = "") -> None:
        """The middleware's message-lost event: ``n`` more messages lost on ``stream``; taken when
        plausible, else rejected and shown as an error (:meth:`.core.loss.StreamLoss.report`)."""
        if not self.ledger.lost_report(stream, n):
            node.get_logger().error(
                f"the middleware reported an impossible number of lost {stream} messages{self.tag} ({n}): not "
                "counted (losses are counted from sequence numbers); /diagnostics shows transport_error. "
                + loss_advice(), throttle_duration_sec=30.0)
        elif int(n) > 0:
            node.hot_log(("lost", self.name, stream), 5.0, lambda: f"{int(n)} message(s) on '{topic or stream}'"
                                                                   f"{self.tag} lost before reaching the node (DDS queue / network)")

    def on_input(self, node, msg, image: bool) -> None:
        """One raw input message: its stamp read, paired, the pairs queued for the scoring threads;
        after handing a pair to an idle worker, wait (``node.HANDOFF_WAIT_S``) until it has entered
        the model."""
        handoff, stream = None, "image" if image else "detections"
        with node.cv:
            if not node.active:
                self.ledger.drop_input("inactive")
                return
            try:  # raw CDR bytes: only the stamp is read here, a worker decodes the rest
                stamp = wire.header_stamp_ns(msg)
            except wire.CdrError as exc:
                self.ledger.drop_input(f"undecodable_{stream}")
                why = str(exc)
                node.hot_log(("undecodable", self.name, stream), 5.0, lambda: f"dropped an {stream} message{self.tag}: {why}")
                return
            out = (self.pairer.add_image if image else self.pairer.add_detections)(stamp, msg)
            idle = node.idle()
            self.log_pairer_drops(node, out.drops)
            now, limit = time.perf_counter(), node.settings.processing_queue_size
            for pair in out.pairs:  # each camera's own bounded queue: a flooding camera drops its own frames
                old = self.ledger.enqueue((pair, now), limit)
                if old is not None:
                    node.hot_log(("overload", self.name), 5.0, lambda: (
                        f"scoring is slower than the input{self.tag}: dropped the frame stamped "
                        f"{old[0].image_stamp_ns * 1e-9:.3f} s (processing_queue_size={limit})"))
            if out.pairs:
                node.cv.notify_all()  # every scoring thread: the one serving this camera may be any of them
                if idle:
                    handoff = node.handoff_wait()
        if handoff is not None:  # outside the lock: let the worker read its inputs
            handoff()

    def watch_transport(self, node, now: float, advice: str) -> None:
        """This camera's share of messages lost in transport (``CameraLedger.watch_transport``): said
        once in the log when it goes over ``transport.loss_warn_fraction`` and when it is back under."""
        raised, was, warning = self.ledger.watch_transport(now, advice)
        if raised and warning:
            node.get_logger().warning(f"messages lost in transport{self.tag}: {warning}")
        elif was and not warning:
            node.get_logger().info(f"messages lost in transport{self.tag}: back under "
                                   f"transport.loss_warn_fraction={node.settings.transport_loss_warn_fraction:g}")

    def facts(self, accounts: Accounting, vehicle_level: int) -> diagnostics.CameraFacts:
        """This camera's figures for /diagnostics, taken together under the books' lock."""
        with accounts.lock:
            return diagnostics.CameraFacts(
                self.name, accounts.camera_snapshot(self.ledger), self.ledger.latencies(),
                [p.text for p in self.health.problems], int(self.alerts.level), self.alerts.n_boxes_untracked,
                self.alerts.n_jump_resets, accounts.backend_calls, accounts.frames_per_call(), vehicle_level)

    def log_pairer_drops(self, node, drops) -> None:
        for d in drops:
            if d.reason in ("out_of_order", "duplicate_stamp", "buffer_overflow"):
                node.hot_log(("pairer", self.name, d.reason), 5.0,
                             lambda: f"dropped {d.kind}{self.tag} stamped {d.stamp_ns * 1e-9:.3f} s: {d.reason}")


__all__ = ["Camera", "HotLog"]
