"""``runa_ood_node``: RUNA out-of-distribution scoring of detector boxes, as a ROS 2 lifecycle node.

Inputs (relative names: they follow the namespace and remappings)
    ``image`` (sensor_msgs/Image; ``image/compressed`` CompressedImage with
    ``image_transport=compressed``) and ``detections`` (vision_msgs/Detection2DArray stamped with the
    stamp of the image the detector ran on), paired by header stamp (:mod:`.pairing`).

Outputs (every header is a copy of the **source image's header**: stamp and frame_id)
    ``ood/detections``      runa_ood_msgs/OodDetectionArray, one per scored frame, every input box in
                            input order with uncertainty, threshold, is_ood, nearest ID label, status
    ``ood/ood_only``        vision_msgs/Detection2DArray with the input detections flagged OOD (built
                            and published only while someone subscribes)
    ``ood/driver_alert``    runa_ood_msgs/DriverAlert (source OOD_OBJECT), published when the level
                            changes; transient local depth 1, so late subscribers get the current level.
                            A frame the backend failed to score holds the level (it is no evidence of
                            "no OOD object"); the detections' ``id`` fields go to the alert monitor as
                            object identities
    ``ood/monitor_health``  DriverAlert (source MONITOR_HEALTH): CAUTION with the reasons when the
                            pipeline is degraded (no frame for ``health.frame_timeout_s`` of wall time,
                            backend failing, p95 processing time over budget), CLEAR when recovered;
                            transient local depth 1
    ``ood/annotated_image`` sensor_msgs/Image rgb8, ``ood/markers`` (MarkerArray) and
                            ``ood/image_annotations`` (foxglove_msgs/ImageAnnotations, every annotation
                            stamped like the image: Foxglove / Lichtblick draw them on the image); with
                            ``lazy`` only drawn while someone subscribes
    ``ood/label_info``      vision_msgs/LabelInfo (transient local) at activation: the ID label set;
                            ``threshold`` carries the global OOD threshold in uncertainty units (not a
                            [0, 1] confidence)
    ``/diagnostics``        diagnostic_msgs/DiagnosticArray at 1 Hz: latency p50/p95, frames scored,
                            drops by reason, boxes by status, backend, model, random_weights

Cameras (parameter ``cameras``; empty = the one stream above, topics unchanged)
    With ``cameras:=['front','left','right']`` ONE node and ONE model serve every camera. Per camera C
    the inputs are ``C/image`` (``C/image/compressed``) and ``C/detections`` (``<image_topic>``,
    ``<detections_topic>`` under ``C/``; transport, QoS and queue sizes overridable per camera as
    ``camera.C.<name>``), and the outputs ``C/ood/detections``, ``C/ood/ood_only``,
    ``C/ood/annotated_image``, ``C/ood/markers``, ``C/ood/image_annotations``, each with that camera's
    image header. Each camera has its own pairer, bounded processing queue (its own
    ``processing_overload``), counters, alert tracks and health; ``/diagnostics`` carries one status
    per camera (``<node>: OOD monitor (C)``), each balanced on its own. The worker takes the frame at
    the head of every camera's queue (at most one per camera: a flooding camera delays the others by
    at most one batch) and scores them in ONE backend call (``OodScorer.score_frames``), then
    publishes each camera's answer. ``gather_window_ms`` lets it wait (bounded) for the cameras whose
    next frame has not arrived yet, so that one call scores every camera's frame;
    ``scoring_threads`` shares the cameras out among several workers (camera i to worker i mod n,
    so each camera's frames stay in stamp order), whose backend calls and image preparation
    overlap where they release the GIL. ``ood/driver_alert`` and ``ood/monitor_health`` stay single,
    vehicle-level: the level is the highest over the cameras and the reason names the camera(s);
    health is degraded when any camera is, and says which. ``ood/label_info`` is shared.

Lifecycle
    configure: validate parameters, load model / projection / thresholds (``factory.build_scorer(settings.config)``,
    with ``precision`` resolved for the device and ``allow_download``: by default a pretrained tag
    must already be in the local cache), create publishers. A load failure is logged as an error
    and configure returns FAILURE (``main`` exits with status 1). activate: subscriptions, timers,
    latched LabelInfo and initial alerts. deactivate: subscriptions and timers go; waiting messages
    are counted as dropped. cleanup / shutdown: release the model. Parameter ``autostart`` (default
    true) makes ``main`` configure and activate by itself, so the node runs without a lifecycle
    manager.

Accounting (diagnostics and :meth:`RunaOodNode.accounting`)
    every received message is scored (as part of a pair), counted as dropped with a reason, or still
    pending. Pairer reasons count messages (``image_without_detections``, ``detections_without_image``,
    ``buffer_overflow``, ``out_of_order``, ``duplicate_stamp``, ``answered_before``,
    ``stamp_in_future``, ``stamp_too_old``, ``time_jump_back``: see :mod:`.pairing` for the stamp
    rule); frame reasons count pairs (``image_<conversion reason>`` such as
    ``image_unsupported_encoding``, ``image_truncated``; ``image_undecodable`` (CDR bytes that are not
    a valid message; inputs are taken raw, see Latency); ``bad_detections``, ``processing_overload``,
    ``deactivated``, ``internal_error``). A frame is counted (scored or dropped) in the same locked
    step that ends its flight, so every /diagnostics message balances. Messages that never reached
    the node (DDS queue overflow, network loss) are counted per stream as
    ``lost_in_transport`` (:mod:`.transport`): from gaps in each publisher's 64-bit sequence numbers
    (reordering tolerated; a jump beyond ``transport.max_sequence_gap`` is a ``sequence_jump``, not
    losses) and the subscription's message-lost event where plausible (published = received + lost).
    A loss figure that cannot be true (the middleware reporting a negative count, gaps beyond what
    the publishers numbered) makes the camera's status ERROR and ``accounting_balanced`` false. When
    ``transport.loss_warn_fraction`` of a stream is lost over ``transport.loss_window_s``, the node
    says so once in its log and with a WARN in /diagnostics, naming the likely cause (Fast DDS's
    default transports; the shipped profile config/fastdds_one_host.xml). A callback never raises:
    unexpected errors are logged and counted as ``internal_error``.

Threading (why not a MultiThreadedExecutor)
    ROS callbacks (subscriptions, timers) run in a SingleThreadedExecutor and only do cheap work:
    pairing and queueing. Conversion, scoring and publishing run in one dedicated worker thread fed
    by a bounded queue (``processing_queue_size``; when full the *oldest* frame is dropped and
    counted, so outputs stay fresh). This keeps the health and diagnostics timers running while the
    model is busy or stuck - exactly when health must be reported - gives a per-reason account of
    overload instead of silent DDS queue drops, and processes frames strictly in stamp order (the
    alert logic needs it), which a multi-threaded executor would not guarantee. Torch releases the
    GIL while it computes, so the executor thread keeps up.

Latency (``runa-ood bench-node``; ``--ab`` compares with the optimisations below switched off)
    an unpadded ``rgb8`` image is scored through a read-only view of the message buffer (no copy);
    both inputs are taken raw: the executor thread reads only their header stamps (for the
    pairing), the worker reads them straight from the CDR bytes (``ros.wire``, the readers offline
    bag evaluation uses too; several times cheaper than rclpy's or rosbags' generic
    deserialization), and the outputs that embed detections are written as bytes by ``ros.wire``,
    each input detection copied in as its bytes; ood/ood_only goes out after ood/detections; after
    handing a frame to an idle worker the executor thread waits (``HANDOFF_WAIT_S``, at most 2 ms)
    until the worker has read its inputs and entered the model, so the two threads do not fight
    over the GIL in the Python-heavy part (the executor's per-spin bookkeeping then overlaps the
    model, which releases the GIL); ood/ood_only, the annotated image and the markers are only
    built while someone subscribes; alerts, drawing and accounting run after ood/detections is
    out. What remains of the per-frame overhead is Python work on the critical path and rclpy's
    executor (see the README's "node against the rclpy floor").
"""
from __future__ import annotations

import collections
import math
import sys
import threading
import time
import traceback
from dataclasses import dataclass
from typing import Any, Callable, Deque, Dict, List, Optional

import numpy as np
import rclpy
from rclpy.clock import Clock, ClockType
from rclpy.lifecycle import LifecycleState, Node as LifecycleNode, TransitionCallbackReturn
from rclpy.qos import (DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy,
                       qos_profile_sensor_data)
from rcl_interfaces.msg import SetParametersResult

from ..core.health import _get  # a dict's key or an object's attribute (alerts come as either)
from ..core.metrics import percentile as _percentile
from ..core.registry import AlertLevel, BoxStatus
from . import convert, wire
from .pairing import REASONS as PAIRER_REASONS, StampPairer
from .transport import LossWatch, StreamLoss, loss_advice
from .params import (LIVE_PARAMETERS, CameraInputs, NodeSettings, ParameterValidationError, closest_parameter,
                     declare_camera_parameters, declare_parameters, read_parameters, validate)

NODE_NAME = "runa_ood"
#: frame-level drop reasons (besides ``image_<ImageConversionError.reason>``)
FRAME_REASONS = ("bad_detections", "processing_overload", "deactivated", "internal_error")

#: After handing a pair to an idle worker, the executor thread waits up to this long (s) until the
#: worker has converted the frame's inputs and entered the model, instead of running its own
#: per-spin bookkeeping (Python, O(entities)) against the worker's conversion for the GIL. The
#: bookkeeping then runs while the model computes with the GIL released. None = no wait
#: (`runa-ood bench-node --ab` compares).
HANDOFF_WAIT_S: Optional[float] = 2e-3
#: Score unpadded rgb8 images through a read-only view of the message buffer (no copy).
ZERO_COPY_RGB8 = True

_SUCCESS = TransitionCallbackReturn.SUCCESS
_FAILURE = TransitionCallbackReturn.FAILURE


@dataclass
class FrameRecord:
    """What the node did with one frame (for benchmarks and tests; see ``RunaOodNode.frame_observer``)."""

    stamp_ns: int
    n_boxes: int
    pipeline_ms: float  # FrameResult.timings["total"]: the core pipeline alone
    node_ms: float  # pair formed -> ood/detections published (queue wait + conversion + scoring + publishing)
    error: Optional[str]
    stages_ms: Optional[Dict[str, float]] = None  # wait, convert, score, publish, secondary
    t_pair: float = math.nan  # time.perf_counter() when the pair was formed (s)
    t_published: float = math.nan  # time.perf_counter() after ood/detections was published (s)
    frame_ms: float = math.nan  # pair formed -> everything done for the frame (alerts, drawing too): health's latency
    camera: str = ""  # "" = the single stream
    batch_frames: int = 1  # frames scored in the same backend call (one per camera at most)


#: parameters every rclpy node may be given that are not this node's to declare
_FOREIGN_PARAMETERS = ("use_sim_time", "start_type_description_service")


class _Camera:
    """One input stream and everything the node keeps per stream (see "Cameras" above): its
    inputs' settings, pairer, processing queue, counters, alert and health monitors, publishers and
    subscriptions. Touched under the node's lock, except ``pubs`` (worker) and ``subs``."""

    def __init__(self, inputs: CameraInputs, settings: Optional[NodeSettings] = None):
        self.inputs = inputs
        self.settings = settings  # transport.* for the loss counters (None: the table's defaults)
        self.name = inputs.name
        self.prefix = inputs.prefix
        self.queue: Deque = collections.deque()
        self.in_flight = 0
        self.pairer: Optional[StampPairer] = None
        self.alerts = None
        self.alert_reason = ""
        self.health = None
        self.pubs: Dict[str, Any] = {}
        self.subs: List[Any] = []
        self.reset_stats()

    @property
    def tag(self) -> str:
        """`` (front)`` for log lines; empty for the single stream."""
        return f" ({self.name})" if self.name else ""

    def reset_stats(self) -> None:
        self.frames_scored = 0
        self.boxes_total = 0
        self.boxes_ood = 0
        self.box_status: Dict[int, int] = collections.Counter()
        self.frame_drops: Dict[str, int] = collections.Counter()
        self.counters: Dict[str, int] = collections.Counter()
        self.received: Dict[str, int] = collections.Counter({"image": 0, "detections": 0})
        self.input_drops: Dict[str, int] = collections.Counter()
        self.lat_node: Deque[float] = collections.deque(maxlen=200)
        self.lat_pipeline: Deque[float] = collections.deque(maxlen=200)
        self.lat_frame: Deque[float] = collections.deque(maxlen=200)
        s = self.settings if self.settings is not None else validate({}, check_files=False)
        # messages lost before reaching the node, per stream (.transport), and the watch on their share
        self.loss: Dict[str, StreamLoss] = {k: StreamLoss(max_gap=s.transport_max_sequence_gap)
                                            for k in ("image", "detections")}
        self.loss_watch: Dict[str, LossWatch] = {k: LossWatch(s.transport_loss_warn_fraction, s.transport_loss_window_s)
                                                 for k in ("image", "detections")}
        self.transport_warning = ""  # set while a stream's share lost in transport is over the threshold


def _transport_name() -> str:
    """This process's middleware transport setting, for the start-up log line."""
    import os

    from .transport import active_profile

    rmw = os.environ.get("RMW_IMPLEMENTATION", "") or "rmw_fastrtps_cpp"
    if "fastrtps" not in rmw and "fastdds" not in rmw:
        return rmw
    profile = active_profile()
    return f"Fast DDS profile {profile}" if profile else "Fast DDS default transports (no FASTDDS_DEFAULT_PROFILES_FILE)"


def _reliable(depth: int, latched: bool = False) -> QoSProfile:
    return QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=depth, reliability=ReliabilityPolicy.RELIABLE,
                      durability=DurabilityPolicy.TRANSIENT_LOCAL if latched else DurabilityPolicy.VOLATILE)


def _monitored(qos: QoSProfile, lease_s: float, deadline: bool = False) -> QoSProfile:
    """``qos`` with AUTOMATIC liveliness and a lease of ``lease_s`` (and that deadline when
    ``deadline``): a subscriber asking for the same learns within ``lease_s`` that the node is gone."""
    from rclpy.duration import Duration
    from rclpy.qos import LivelinessPolicy

    qos.liveliness = LivelinessPolicy.AUTOMATIC
    qos.liveliness_lease_duration = Duration(seconds=lease_s)
    if deadline:
        qos.deadline = Duration(seconds=lease_s)
    return qos


def _input_qos(name: str, depth: int) -> QoSProfile:
    if name == "sensor_data":
        q = QoSProfile(**{k: getattr(qos_profile_sensor_data, k) for k in ("history", "reliability", "durability")},
                       depth=depth)
        return q
    return _reliable(depth)


class RunaOodNode(LifecycleNode):
    """The OOD lifecycle node (see the module docstring). Construct, then configure + activate
    (``autostart()`` does both)."""

    def __init__(self, node_name: str = NODE_NAME, **kwargs):
        super().__init__(node_name, **kwargs)
        declare_parameters(self)
        declare_camera_parameters(self)
        self.unknown_overrides = self._warn_unknown_overrides()
        self.add_on_set_parameters_callback(self._on_set_parameters)
        self.settings: Optional[NodeSettings] = None
        self.scorer = None
        self.last_error: Optional[str] = None  # last configure failure (also logged)
        #: optional callable(FrameRecord) called from the worker thread after each scored frame
        self.frame_observer: Optional[Callable[[FrameRecord], None]] = None
        self._lock = threading.RLock()  # pairers, counters, queues
        self._cv = threading.Condition(self._lock)
        self._alert_lock = threading.Lock()  # ood/driver_alert's vehicle level (scoring threads)
        self._cams: List[_Camera] = []
        self._handoff = threading.Event()  # set by the worker once it has entered the model (HANDOFF_WAIT_S)
        self._active = False
        self._workers: List[threading.Thread] = []  # scoring threads (parameter scoring_threads)
        self._score_lock: Optional[threading.Lock] = None  # backend calls one at a time (see on_configure)
        self._stop_worker = False
        self._pubs: Dict[str, Any] = {}  # vehicle-level publishers (+ the single stream's, same objects)
        self._timers: List[Any] = []
        self._steady = Clock(clock_type=ClockType.STEADY_TIME)
        self._log_next: Dict[Any, float] = {}  # _log_every: next time each hot-path warning may be logged
        self._reset_stats()

    def _warn_unknown_overrides(self) -> List[str]:
        """Warn about every parameter override (``-p``, YAML, launch) that is not a parameter of
        this node, naming the closest one: rclpy ignores them silently, so a typo would go unnoticed."""
        declared = sorted(self._parameters)
        unknown = []
        for name in sorted(getattr(self, "_parameter_overrides", {}) or {}):
            if name in self._parameters or name in _FOREIGN_PARAMETERS or name.startswith("qos_overrides."):
                continue
            unknown.append(name)
            near = closest_parameter(name, declared)
            self.get_logger().warning(
                f"parameter override '{name}' is not a parameter of this node and is IGNORED"
                + (f"; did you mean '{near}'?" if near else "")
                + (" (per-camera overrides need the camera in 'cameras')" if name.startswith("camera.") else ""))
        return unknown

    # ------------------------------------------------------------------ compatibility with one stream
    @property
    def _alerts(self):
        """The single stream's (first camera's) alert monitor."""
        return self._cams[0].alerts

    def camera_names(self) -> List[str]:
        """The configured cameras (``[""]`` for the single stream)."""
        return [c.name for c in self._cams]

    def _cam(self, name: Optional[str]) -> _Camera:
        if name is None:
            return self._cams[0]
        for c in self._cams:
            if c.name == name:
                return c
        raise KeyError(f"no camera {name!r} (cameras: {self.camera_names()})")

    @property
    def _multi(self) -> bool:
        return bool(self.settings is not None and self.settings.cameras)

    # ================================================================== lifecycle
    def autostart(self) -> bool:
        """configure + activate; False (errors logged) when either fails."""
        if self.trigger_configure() != _SUCCESS:
            return False
        return self.trigger_activate() == _SUCCESS

    def on_configure(self, state: LifecycleState) -> TransitionCallbackReturn:
        log = self.get_logger()
        try:
            settings = validate(read_parameters(self))
        except ParameterValidationError as exc:
            return self._fail(f"configure failed: {exc}")
        try:
            from ..core.encoder import WeightsUnavailableError
            from ..factory import build_scorer

            t0 = time.perf_counter()
            scorer = build_scorer(settings.config)  # the typed config validate() built, files loaded once
            load_s = time.perf_counter() - t0
            warm = scorer.warmup()  # lazy start-up (allocators, kernels, engines) now, not on the first frame
            warmup_s = time.perf_counter() - t0 - load_s
            if warm.error:
                return self._fail(f"configure failed: the model cannot score a frame: {warm.error}")
        except WeightsUnavailableError as exc:  # with allow_download=false: at once, no network retries
            return self._fail(f"configure failed: model weights unavailable for model={settings.model!r} "
                              f"pretrained={settings.pretrained!r} (allow_download={settings.allow_download}): {exc}")
        except Exception as exc:  # any load failure must fail start-up loudly, not crash the process
            return self._fail(f"configure failed: cannot build the OOD scorer ({type(exc).__name__}: {exc})")
        try:  # thresholds fitted for another model / scorer / lam / label set / ... are meaningless here
            self.thresholds_mismatch = settings.check_thresholds(scorer)
        except ValueError as exc:
            return self._fail(f"configure failed: {exc}")
        if self.thresholds_mismatch:
            log.warning("thresholds_allow_mismatch=true: using thresholds fitted for another configuration: "
                        + "; ".join(self.thresholds_mismatch))

        self.settings, self.scorer = settings, scorer
        enc = scorer.encoder
        self.model_name = settings.model
        self.backend_name = str(getattr(enc, "backend_name", settings.backend))
        # which variant of the backend runs, and why (explicit / measured / recorded / fallback: factory)
        self.backend_choice = dict(getattr(scorer, "backend_choice", None) or {})
        self.random_weights = bool(getattr(enc, "random_weights", False))
        import dataclasses

        from ..core.alerts import AlertMonitor
        from ..core.health import HealthMonitor

        cams = [_Camera(ci, settings) for ci in settings.inputs]
        for cam in cams:  # per camera: its own pairing, alert tracks (an object seen by two cameras
            #               is two tracks) and health
            cam.pairer = StampPairer(slop_ns=int(round(settings.pairing_slop_s * 1e9)),
                                     max_buffer=settings.pairing_buffer,
                                     max_age_ns=int(round(settings.pairing_max_age_s * 1e9)),
                                     max_future_ns=int(round(settings.pairing_max_future_s * 1e9)))
            # a stamp jump back larger than the pairer's window resets the alert history (AlertMonitor)
            cam.alerts = AlertMonitor(dataclasses.replace(settings.alert.to_alert_config(),
                                                          jump_back_reset_s=settings.pairing_max_age_s))
            cam.health = HealthMonitor(settings.health_frame_timeout_s, settings.health_latency_budget_ms)
        with self._lock:
            self._cams = cams
        self._alert_use_ids = bool(settings.alert.use_detection_ids)
        self._reset_stats()
        self._create_publishers()
        self._stop_worker = False
        # scoring threads: camera i to thread i mod n (each camera's frames in stamp order on one thread)
        n_threads = max(1, min(settings.scoring_threads, len(cams)))
        # torch and ONNX Runtime run concurrent calls; anything else (a TensorRT execution context) one at a time
        thread_safe = self.backend_name.split("-")[0].split("_")[0] in ("torch", "onnxruntime", "ort")
        self._score_lock = threading.Lock() if n_threads > 1 and not thread_safe else None
        self._workers = [threading.Thread(target=self._worker_loop, args=(cams[k::n_threads],),
                                          name=f"runa_ood_worker{k if k else ''}", daemon=True) for k in range(n_threads)]
        for w in self._workers:
            w.start()
        thr = "thresholds " + (settings.thresholds_file if settings.thresholds_file else
                               f"default_threshold={settings.default_threshold} (UNCALIBRATED)")
        log.info(f"configured in {load_s:.2f} s + warm-up {warmup_s:.2f} s: model {settings.model} ({settings.pretrained or 'no weights'}), "
                 f"backend {self.backend_name} on {settings.device} ({settings.resolved_precision}"
                 + (f"; variant {self.backend_choice.get('variant')}, {self.backend_choice.get('reason')}"
                    + (f": {self.backend_choice['detail']}" if self.backend_choice.get("detail") else "")
                    if self.backend_choice else "") + "), "
                 f"label set {scorer.label_set.name} ({len(scorer.label_set)} labels), scorer {settings.scorer}, "
                 f"lam {settings.lam}, blur {settings.blur_radius} px, {thr}"
                 + (f"; one model for {len(cams)} cameras: {', '.join(c.name for c in cams)}" if settings.cameras else "")
                 + f"; transport: {_transport_name()}")
        if not settings.thresholds_file:
            log.warning("no thresholds_file: every label uses default_threshold="
                        f"{settings.default_threshold}; calibrate with `runa-ood calibrate` for real use")
        if self.random_weights:
            log.warning("RANDOM WEIGHTS (allow_random_weights=true): scores are meaningless; every output is "
                        "marked random_weights=true. Demos and tests only.")
        return _SUCCESS

    def on_activate(self, state: LifecycleState) -> TransitionCallbackReturn:
        try:
            s = self.settings
            ret = super().on_activate(state)  # enables the lifecycle publishers
            if ret != _SUCCESS:
                return ret
            self._create_subscriptions()
            for cam in self._cams:
                cam.health = type(cam.health)(s.health_frame_timeout_s, s.health_latency_budget_ms)
            period = min(0.25, max(0.02, s.health_frame_timeout_s / 4.0))
            self._timers.append(self.create_timer(period, self._safe(self._on_health_timer), clock=self._steady))
            self._timers.append(self.create_timer(1.0, self._safe(self._publish_diagnostics), clock=self._steady))
            self._timers.append(self.create_timer(s.health_heartbeat_period_s, self._safe(self._on_heartbeat),
                                                  clock=self._steady))
            self._publish_label_info()
            for cam in self._cams:
                cam.alerts.reset()  # the latched CLEAR below must match the monitors' state
                cam.alert_reason = ""
            self._vehicle_alert = (0, ())
            self._publish_alert({"level": 0, "reason": "CLEAR: node activated, no OOD object seen yet",
                                 "object_indices": []}, None, None, None, health=False)
            self._health_key = None
            self._publish_alert({"level": 0, "reason": "CLEAR: node activated, waiting for frames",
                                 "object_indices": []}, None, None, None, health=True)
            with self._lock:
                self._active = True
            for cam in self._cams:
                ci = cam.inputs
                self.get_logger().info(
                    f"active{cam.tag}: image '{self.resolve_topic_name(ci.image_topic_resolved)}' ({ci.image_transport}, "
                    f"{ci.image_qos} QoS) + detections '{self.resolve_topic_name(ci.detections_topic)}' "
                    f"({ci.detections_qos} QoS), pairing {'exact' if s.pairing_slop_s == 0 else f'slop {s.pairing_slop_s} s'}")
            return _SUCCESS
        except Exception as exc:
            self._destroy_inputs()
            return self._fail(f"activate failed: {type(exc).__name__}: {exc}")

    def on_deactivate(self, state: LifecycleState) -> TransitionCallbackReturn:
        self._destroy_inputs()
        with self._lock:
            self._active = False
            for cam in self._cams:
                self._account_pairer(cam, cam.pairer.flush())
                while cam.queue:
                    cam.queue.popleft()
                    cam.frame_drops["deactivated"] += 1
        self._publish_diagnostics()
        return super().on_deactivate(state)

    def on_cleanup(self, state: LifecycleState) -> TransitionCallbackReturn:
        self._release()
        return _SUCCESS

    def on_shutdown(self, state: LifecycleState) -> TransitionCallbackReturn:
        self._destroy_inputs()
        self._release()
        return _SUCCESS

    def on_error(self, state: LifecycleState) -> TransitionCallbackReturn:
        self.get_logger().error(f"lifecycle error from state {state.label}; releasing resources")
        self._destroy_inputs()
        self._release()
        return _SUCCESS

    def _log_every(self, key, period_s: float, msg: Callable[[], str], level: str = "warning") -> None:
        """Log ``msg()`` at most once per ``period_s`` per ``key`` (a hot-path warning: a dropped or
        lost message at saturation). The time is checked here, before the message is built and
        before rclpy's logger, which inspects the caller's source file on EVERY call, throttled or
        not: at saturation that cost the executor thread a sixth of its time."""
        now = time.monotonic()
        if now < self._log_next.get(key, 0.0):
            return
        self._log_next[key] = now + period_s
        getattr(self.get_logger(), level)(msg())

    def _fail(self, msg: str) -> TransitionCallbackReturn:
        self.last_error = msg
        self.get_logger().error(msg)
        return _FAILURE

    def _release(self) -> None:
        with self._cv:
            self._active = False
            self._stop_worker = True
            for cam in self._cams:
                cam.queue.clear()
            self._cv.notify_all()
        for w in self._workers:
            if w is not threading.current_thread():
                w.join(timeout=30.0)
        self._workers = []
        pubs = {id(p): p for p in list(self._pubs.values()) + [p for c in self._cams for p in c.pubs.values()]}
        for pub in pubs.values():
            try:
                self.destroy_lifecycle_publisher(pub)
            except Exception:  # already destroyed with the node
                pass
        self._pubs = {}
        for cam in self._cams:
            cam.pubs = {}
        self.scorer = None

    def _destroy_inputs(self) -> None:
        for cam in self._cams:
            for sub in cam.subs:
                self.destroy_subscription(sub)
            cam.subs = []
        for t in self._timers:
            self.destroy_timer(t)
        self._timers = []

    # ================================================================== entities
    def _create_publishers(self) -> None:
        from diagnostic_msgs.msg import DiagnosticArray
        from foxglove_msgs.msg import ImageAnnotations
        from runa_ood_msgs.msg import DriverAlert, OodDetectionArray
        from sensor_msgs.msg import Image
        from vision_msgs.msg import Detection2DArray, LabelInfo
        from visualization_msgs.msg import MarkerArray

        p = self.create_lifecycle_publisher
        lease = self.settings.health_liveliness_lease_s
        self._pubs = {  # vehicle level: one of each whatever the number of cameras
            # silence is an alarm: liveliness lease on both, deadline + heartbeat on monitor_health
            "alert": p(DriverAlert, "ood/driver_alert", _monitored(_reliable(1, latched=True), lease)),
            "health": p(DriverAlert, "ood/monitor_health", _monitored(_reliable(1, latched=True), lease, True)),
            "label_info": p(LabelInfo, "ood/label_info", _reliable(1, latched=True)),
            "diagnostics": p(DiagnosticArray, "/diagnostics", _reliable(10)),
        }
        for cam in self._cams:  # per camera: "<C>/ood/..." (the single stream: "ood/...")
            c = cam.prefix
            cam.pubs = {
                "detections": p(OodDetectionArray, c + "ood/detections", _reliable(10)),
                "ood_only": p(Detection2DArray, c + "ood/ood_only", _reliable(10)),
                "annotated": p(Image, c + "ood/annotated_image", _reliable(2)),
                "markers": p(MarkerArray, c + "ood/markers", _reliable(5)),
                "annotations": p(ImageAnnotations, c + "ood/image_annotations", _reliable(5)),
            }
        if not self._multi:  # one stream: its publishers under their old keys too
            self._pubs.update(self._cams[0].pubs)

    def _create_subscriptions(self) -> None:
        for cam in self._cams:
            cam.subs = self._camera_subscriptions(cam)

    def _camera_subscriptions(self, cam: _Camera) -> List[Any]:
        from rclpy.event_handler import SubscriptionEventCallbacks
        from sensor_msgs.msg import CompressedImage, Image
        from vision_msgs.msg import Detection2DArray

        ci = cam.inputs
        img_type = CompressedImage if ci.image_transport == "compressed" else Image

        def incompatible(topic, param):
            name = f"camera.{cam.name}.{param}" if cam.name else param

            def cb(event):
                with self._lock:
                    cam.counters["qos_incompatible"] += 1
                self.get_logger().warning(
                    f"a publisher on '{topic}' offers QoS incompatible with ours ({name}="
                    f"{getattr(ci, param)}; policy {getattr(event, 'last_policy_kind', '?')}): its messages are "
                    f"NOT delivered. Set {name} to match the publisher (sensor_data accepts best effort).",
                    throttle_duration_sec=10.0)

            stream = "detections" if param == "detections_qos" else "image"

            def lost(event):  # the middleware's own count of samples it lost for this subscription
                self._note_lost_report(cam, stream, getattr(event, "total_count_change", 0), topic)
            return SubscriptionEventCallbacks(incompatible_qos=cb, message_lost=lost)

        # both inputs are taken raw (the CDR bytes): the executor thread reads only their stamps for
        # the pairing, the worker reads them with ros.wire (see _process_batch)
        return [
            self.create_subscription(img_type, ci.image_topic_resolved,
                                     self._safe(lambda m: self._on_input(cam, m, True), "image", cam),
                                     _input_qos(ci.image_qos, ci.image_queue_size),
                                     event_callbacks=incompatible(ci.image_topic_resolved, "image_qos"), raw=True),
            self.create_subscription(Detection2DArray, ci.detections_topic,
                                     self._safe(lambda m: self._on_input(cam, m, False), "detections", cam),
                                     _input_qos(ci.detections_qos, ci.detections_queue_size),
                                     event_callbacks=incompatible(ci.detections_topic, "detections_qos"), raw=True),
        ]

    def _on_set_parameters(self, params) -> SetParametersResult:
        """Validate new values (refuse bad ones); apply the live ones (publish_annotated, lazy)."""
        current = read_parameters(self)
        ours = [prm for prm in params if prm.name in current]  # e.g. use_sim_time is not ours to judge
        if not ours:
            return SetParametersResult(successful=True)
        for prm in ours:
            current[prm.name] = list(prm.value) if prm.name == "alert.roi" and prm.value is not None else prm.value
        try:
            new = validate(current)
        except ParameterValidationError as exc:
            return SetParametersResult(successful=False, reason=str(exc))
        if self.settings is not None:
            import dataclasses

            live = {k: getattr(new, k) for k in LIVE_PARAMETERS}
            self.settings = dataclasses.replace(self.settings, **live)
        return SetParametersResult(successful=True)

    # ================================================================== callbacks (executor thread)
    def _safe(self, fn: Callable, stream: Optional[str] = None, cam: Optional[_Camera] = None) -> Callable:
        """Wrap a callback: an unexpected exception is logged and counted, never raised.

        ``stream`` ("image" / "detections") marks subscription callbacks of camera ``cam``: the
        message is counted as received first (and the publisher's sequence number checked for
        messages lost on the way), and as an ``internal_error`` input drop if the callback fails."""
        what = f"the {stream} callback{cam.tag}" if stream is not None else getattr(fn, "__name__", "callback")

        def wrapped(*args):
            try:
                fn(*args)
            except Exception as exc:
                with self._lock:
                    if stream is not None:
                        cam.input_drops["internal_error"] += 1
                    else:
                        self._node_counters["timer_internal_error"] += 1
                self.get_logger().error(f"internal error in {what}: {type(exc).__name__}: {exc}\n"
                                        f"{traceback.format_exc(limit=4)}", throttle_duration_sec=5.0)

        wrapped.__name__ = getattr(fn, "__name__", "callback")
        if stream is None:
            return wrapped

        def wrapped_input(msg, info):  # two arguments: rclpy passes the MessageInfo
            with self._lock:  # lost on the way and received, counted in one step
                self._note_sequence(cam, stream, info)
                cam.received[stream] += 1
            wrapped(msg)

        return wrapped_input

    def _note_sequence(self, cam: _Camera, stream: str, info) -> None:  # holds the lock
        """Count messages lost between the publisher and this callback (DDS history / queue
        overflow, undecodable payloads, network loss): gaps in each publisher's sequence numbers
        (:class:`.transport.StreamLoss`: 64-bit, per publisher GID, reordering tolerated, a jump
        beyond ``transport.max_sequence_gap`` counted as a sequence jump, not as losses)."""
        try:
            seq = info["publication_sequence_number"]
            gid = bytes(info["publisher_gid"]["data"])
        except (KeyError, TypeError, ValueError):
            return
        loss = cam.loss[stream]
        jumps = loss.sequence_jumps
        gap = loss.note(gid, seq)
        if gap > 0:
            self._log_every(("gap", cam.name, stream), 5.0,
                            lambda: f"{gap} {stream} message(s){cam.tag} lost before reaching the node "
                                    "(DDS queue overflow / undecodable data)")
        elif loss.sequence_jumps != jumps:
            before, after = loss.last_jump
            self._log_every(("jump", cam.name, stream), 5.0, lambda: (
                f"{stream} sequence numbers{cam.tag} of one publisher jumped from {before} to {after} (more than "
                f"transport.max_sequence_gap={loss.max_gap}): counted as a new epoch of that publisher, not as "
                "lost messages"))

    def _note_lost_report(self, cam: _Camera, stream: str, n, topic: str = "") -> None:
        """The middleware's message-lost event: ``n`` more messages lost on ``stream``; taken when
        plausible, else rejected and shown as an error (:meth:`.transport.StreamLoss.report`)."""
        with self._lock:
            ok = cam.loss[stream].report(n)
        if not ok:
            self.get_logger().error(
                f"the middleware reported an impossible number of lost {stream} messages{cam.tag} ({n}): not "
                "counted (losses are counted from sequence numbers); /diagnostics shows transport_error. "
                + loss_advice(), throttle_duration_sec=30.0)
        elif int(n) > 0:
            self._log_every(("lost", cam.name, stream), 5.0,
                            lambda: f"{int(n)} message(s) on '{topic or stream}'{cam.tag} lost before reaching the "
                                    "node (DDS queue / network)")

    def _on_input(self, cam: _Camera, msg, image: bool) -> None:
        handoff = None
        with self._cv:
            if not self._active:
                cam.input_drops["inactive"] += 1
                return
            try:  # raw CDR bytes: only the stamp is read here, the worker decodes the rest
                stamp = wire.header_stamp_ns(msg)
            except wire.CdrError as exc:
                stream = "image" if image else "detections"
                cam.input_drops[f"undecodable_{stream}"] += 1
                self._log_every(("undecodable", cam.name, stream), 5.0,
                                lambda: f"dropped an {stream} message{cam.tag}: {exc}")
                return
            out = (cam.pairer.add_image if image else cam.pairer.add_detections)(stamp, msg)
            idle = not self._busy and not any(c.queue for c in self._cams)
            self._handle_pairer_output(cam, out)
            if out.pairs and idle and HANDOFF_WAIT_S is not None:
                handoff = self._handoff
                handoff.clear()
        if handoff is not None:  # outside the lock: let the worker read its inputs (see HANDOFF_WAIT_S)
            handoff.wait(HANDOFF_WAIT_S)

    def _handle_pairer_output(self, cam: _Camera, out) -> None:  # holds the lock
        self._account_pairer(cam, out.drops)
        now = time.perf_counter()
        for pair in out.pairs:  # each camera's own bounded queue: a flooding camera drops its own frames
            if len(cam.queue) >= self.settings.processing_queue_size:
                old = cam.queue.popleft()
                cam.frame_drops["processing_overload"] += 1
                self._log_every(("overload", cam.name), 5.0, lambda: (
                    f"scoring is slower than the input{cam.tag}: dropped the frame stamped {old[0].image_stamp_ns * 1e-9:.3f} "
                    f"s (processing_queue_size={self.settings.processing_queue_size})"))
            cam.queue.append((pair, now))
        if out.pairs:
            self._cv.notify_all()  # every scoring thread: the one serving this camera may be any of them

    def _account_pairer(self, cam: _Camera, drops) -> None:  # holds the lock
        for d in drops:
            if d.reason in ("out_of_order", "duplicate_stamp", "buffer_overflow"):
                self._log_every(("pairer", cam.name, d.reason), 5.0,
                                lambda: f"dropped {d.kind}{cam.tag} stamped {d.stamp_ns * 1e-9:.3f} s: {d.reason}")

    # ================================================================== worker thread
    def _worker_loop(self, cams: Optional[List[_Camera]] = None) -> None:
        """A scoring thread: the frames of ``cams`` (default every camera), one batch at a time."""
        cams = list(self._cams) if cams is None else cams
        window = self.settings.gather_window_ms * 1e-3 if len(cams) > 1 else 0.0
        while True:
            with self._cv:
                while not any(c.queue for c in cams) and not self._stop_worker:
                    self._cv.wait(timeout=0.5)
                if self._stop_worker:
                    return
                if window > 0:  # gather: wait (bounded) for the other cameras' next frames, one call for all
                    end = time.monotonic() + window
                    while not all(c.queue for c in cams) and not self._stop_worker:
                        left = end - time.monotonic()
                        if left <= 0:
                            break
                        self._cv.wait(timeout=left)
                # the frame at the head of every camera's queue (stamp order within a camera; at most
                # one per camera, so a flooding camera delays the others by at most one batch)
                batch = []
                t_take = time.perf_counter()  # under the lock: every frame paired before it is in this batch
                for cam in cams:
                    if cam.queue:
                        pair, t_pair = cam.queue.popleft()
                        cam.in_flight = 1  # taken from the queue, not yet accounted for
                        batch.append((cam, pair, t_pair))
                self._busy += 1
            try:
                self._process_batch(batch, t_take)
            except Exception as exc:  # never let the worker die
                with self._lock:
                    for cam, _, _ in batch:
                        if cam.in_flight:
                            self._frame_done(cam, "internal_error")
                        else:  # already accounted (scored): the failure came after its results were out
                            cam.counters["secondary_output_errors"] += 1
                if not self.context.ok():  # ROS is shutting down (Ctrl-C) under the worker
                    continue
                self.get_logger().error(f"internal error while scoring the frames stamped "
                                        f"{', '.join(f'{p.image_stamp_ns * 1e-9:.3f} s{c.tag}' for c, p, _ in batch)}: "
                                        f"{type(exc).__name__}: {exc}\n{traceback.format_exc(limit=6)}",
                                        throttle_duration_sec=5.0)
            finally:
                self._handoff.set()  # also when the frames were dropped before the model
                with self._lock:
                    for cam, _, _ in batch:
                        if cam.in_flight:  # left without a verdict (no scorer any more: deactivated)
                            self._frame_done(cam, "deactivated")
                    self._busy -= 1

    def _frame_done(self, cam: _Camera, drop_reason: Optional[str] = None) -> None:  # holds the lock
        """Account for camera ``cam``'s frame in flight, in the same step that ends its flight (so
        every snapshot balances): scored (``drop_reason`` None) or dropped with that reason."""
        if drop_reason is None:
            cam.frames_scored += 1
        else:
            cam.frame_drops[drop_reason] += 1
        cam.in_flight = 0

    def _read_inputs(self, cam: _Camera, pair):
        """A frame's inputs read from their CDR bytes: (header, rgb, Detections, boxes, scores,
        class_ids, ids), or None when the frame was dropped (accounted and logged here)."""
        ci, s, log = cam.inputs, self.settings, self.get_logger()
        compressed = ci.image_transport == "compressed"
        # ros.wire reads the bytes (as offline evaluation does; the image data stays a view of the
        # received bytes), then the one pixel reader
        try:
            img_msg = (wire.read_compressed if compressed else wire.read_image)(pair.image)
        except wire.CdrError as exc:
            with self._lock:
                self._frame_done(cam, "image_undecodable")
            log.warning(f"dropped frame{cam.tag} stamped {pair.image_stamp_ns * 1e-9:.3f} s: {exc}",
                        throttle_duration_sec=5.0)
            return None
        header = img_msg.header
        try:
            if compressed:
                rgb = convert.compressed_to_rgb(img_msg, max_pixels=s.max_image_pixels)
            else:
                # unpadded rgb8: a read-only view of the message buffer; anything else: one copy
                rgb = convert.image_to_rgb(img_msg, copy=not ZERO_COPY_RGB8, max_pixels=s.max_image_pixels)
        except convert.ImageConversionError as exc:
            with self._lock:
                self._frame_done(cam, f"image_{exc.reason}")
            log.warning(f"dropped frame{cam.tag} stamped {pair.image_stamp_ns * 1e-9:.3f} s: cannot convert image "
                        f"({'format' if img_msg.format else 'encoding'} {img_msg.format or img_msg.encoding!r}): {exc}",
                        throttle_duration_sec=5.0)
            return None
        try:
            dets = wire.read_detections(pair.detections)
            boxes, scores, class_ids, ids = dets.arrays()
        except Exception as exc:
            with self._lock:
                self._frame_done(cam, "bad_detections")
            log.warning(f"dropped frame{cam.tag} stamped {pair.image_stamp_ns * 1e-9:.3f} s: unreadable detections: "
                        f"{type(exc).__name__}: {exc}", throttle_duration_sec=5.0)
            return None
        if dets.header.frame_id != header.frame_id:
            with self._lock:
                cam.counters["frame_id_mismatch"] += 1
            log.warning(f"detections frame_id{cam.tag} {dets.header.frame_id!r} differs from the image's "
                        f"{header.frame_id!r}; outputs use the image's", throttle_duration_sec=10.0)
        return header, rgb, dets, boxes, scores, class_ids, ids

    def _score(self, scorer, frames: List) -> List:
        """FrameResults of ``frames`` ((cam, pair, ..., inputs) rows) in ONE backend call; when the
        batch is refused (a malformed frame: ValueError), each frame alone, so that only the
        malformed one fails (its slot then holds the exception)."""
        if len(frames) == 1:  # the single stream's path, as before: OodScorer.score
            _, _, _, _, (_, rgb, _, boxes, scores, class_ids, _) = frames[0]
            return [scorer.score(rgb, boxes, box_format="cxcywh", detector_scores=scores, detector_labels=class_ids)]
        from ..core.pipeline import FrameInput

        inputs = [FrameInput(rgb, boxes, "cxcywh", scores, class_ids)
                  for _, _, _, _, (_, rgb, _, boxes, scores, class_ids, _) in frames]
        try:
            return scorer.score_frames(inputs)
        except ValueError:
            out = []
            for fr in inputs:
                try:
                    out.append(scorer.score(fr.image_rgb, fr.boxes, box_format=fr.box_format,
                                            detector_scores=fr.detector_scores, detector_labels=fr.detector_labels))
                except Exception as exc:  # noqa: BLE001 - this frame only
                    out.append(exc)
            return out

    def _process_batch(self, batch: List, t_start: float) -> None:
        """Score the frames of ``batch`` ([(camera, pair, t_pair)], one per camera, taken from the
        queues at ``t_start``) in one backend call, then publish each camera's answer, alerts,
        drawings and health."""
        s, scorer = self.settings, self.scorer
        if scorer is None:
            return
        log = self.get_logger()
        frames = []
        for cam, pair, t_pair in batch:
            got = self._read_inputs(cam, pair)
            if got is not None:
                frames.append((cam, pair, t_pair, t_start, got))
        if not frames:
            return
        # ---- score
        self._handoff.set()  # the executor thread may go on (HANDOFF_WAIT_S)
        t_conv = time.perf_counter()
        if self._score_lock is not None:  # a backend that must not run twice at once (TensorRT contexts)
            with self._score_lock:
                results = self._score(scorer, frames)
        else:
            results = self._score(scorer, frames)
        t_score = time.perf_counter()
        n_batch = len(frames)
        with self._lock:
            self._backend_calls += 1
            self._batched_frames += n_batch
        # ---- publish every camera's ood/detections first (every header is the source image's):
        # written as CDR bytes (ros.wire), each detection copied in as the bytes it came as
        done = []
        for (cam, pair, t_pair, _, (header, rgb, dets, *_rest)), res in zip(frames, results):
            if isinstance(res, Exception):
                with self._lock:
                    self._frame_done(cam, "internal_error")
                log.error(f"internal error while scoring the frame{cam.tag} stamped {pair.image_stamp_ns * 1e-9:.3f} s: "
                          f"{type(res).__name__}: {res}", throttle_duration_sec=5.0)
                continue
            cam.pubs["detections"].publish(wire.write_ood_array(header, dets, res, s.model, self.backend_name,
                                                                s.scorer, self.random_weights))
            t_pub = time.perf_counter()
            node_ms = (t_pub - t_pair) * 1e3
            pipeline_ms = float(res.timings.get("total", math.nan))
            with self._lock:  # the frame is scored and its results are out: account for it now
                self._frame_done(cam)
                cam.boxes_total += len(res)
                if len(res):
                    for code, n in enumerate(np.bincount(np.asarray(res.status, np.intp)).tolist()):
                        if n:
                            cam.box_status[code] += n
                cam.boxes_ood += int(np.count_nonzero(res.is_ood))
                if res.tokens_in_box is not None:  # one-pass methods: boxes smaller than a token, counted
                    cam.counters["boxes_below_token"] += res.boxes_below_token
                cam.lat_node.append(node_ms)
                cam.lat_pipeline.append(pipeline_ms)
                if res.error:
                    cam.counters["backend_error_frames"] += 1
            done.append((cam, pair, t_pair, header, rgb, dets, _rest[-1], res, t_pub, node_ms, pipeline_ms))
        # ---- secondary outputs, per camera: a failure is logged and counted, the frame stays scored
        for cam, pair, t_pair, header, rgb, dets, ids, res, t_pub, node_ms, pipeline_ms in done:
            try:
                self._secondary_outputs(cam, pair, header, rgb, dets, ids, res)
            except Exception as exc:
                with self._lock:
                    cam.counters["secondary_output_errors"] += 1
                if not self.context.ok():  # ROS is shutting down (Ctrl-C) under the worker: nothing to report
                    return
                log.error(f"internal error in alerts/drawing for the frame{cam.tag} stamped "
                          f"{pair.image_stamp_ns * 1e-9:.3f} s (scores were published): {type(exc).__name__}: {exc}\n"
                          f"{traceback.format_exc(limit=6)}", throttle_duration_sec=5.0)
            # ---- health: the whole per-frame time (queue wait, conversion, scoring, alerts, drawing,
            #      publishing) and whether the frame was evidence (core.health decides both)
            t_end = time.perf_counter()
            frame_ms = (t_end - t_pair) * 1e3
            with self._lock:
                cam.lat_frame.append(frame_ms)
                cam.health.frame(time.monotonic(), frame_ms, res)
            if self.frame_observer is not None:
                stages = {"wait": (t_start - t_pair) * 1e3, "convert": (t_conv - t_start) * 1e3,
                          "score": (t_score - t_conv) * 1e3, "publish": (t_pub - t_score) * 1e3,
                          "secondary": (t_end - t_pub) * 1e3}
                self.frame_observer(FrameRecord(pair.image_stamp_ns, len(res), pipeline_ms, node_ms, res.error, stages,
                                                t_pair, t_pub, frame_ms, cam.name, n_batch))

    def _secondary_outputs(self, cam: _Camera, pair, header, rgb, dets, ids, res) -> None:
        """ood/ood_only, the alert update and the drawings of one scored frame of camera ``cam``."""
        s, pubs, log = self.settings, cam.pubs, self.get_logger()
        h, w = rgb.shape[:2]
        if pubs["ood_only"].get_subscription_count() > 0:  # volatile: nobody listening = nobody misses it
            pubs["ood_only"].publish(wire.write_ood_only(header, dets, res))
        # a frame that is no evidence (core.health.unscored_reason) holds the current level
        # (AlertMonitor): a failing model must never look like "no OOD object" to the driver;
        # a stamp jump back resets the alert history (AlertMonitor.config.jump_back_reset_s)
        alerts = cam.alerts
        resets = alerts.n_jump_resets
        alert = alerts.update(pair.image_stamp_ns * 1e-9, res, w, h, object_ids=ids if self._alert_use_ids else None)
        if alerts.n_jump_resets != resets:
            log.warning(f"image stamps{cam.tag} jumped back to {pair.image_stamp_ns * 1e-9:.3f} s; alert history reset")
        with self._alert_lock:  # the vehicle level spans the cameras of every scoring thread
            self._vehicle_alert_update(cam, alert, header, dets, res)
        if s.publish_annotated:
            want_img = not s.lazy or pubs["annotated"].get_subscription_count() > 0
            want_mk = not s.lazy or pubs["markers"].get_subscription_count() > 0
            want_ann = not s.lazy or pubs["annotations"].get_subscription_count() > 0
            if want_img or want_mk or want_ann:
                from . import draw

                drawn, not_drawn = draw.select_boxes(res)  # bounded: OOD, then ID, few not scored
                if want_img:
                    pubs["annotated"].publish(convert.rgb_to_image(
                        draw.annotate(rgb, res, self.random_weights, indices=drawn), header))
                if want_mk:
                    pubs["markers"].publish(draw.make_markers(header, res, w, h, indices=drawn))
                if want_ann:  # Foxglove: the same boxes drawn on the client, stamped like the image (as bytes)
                    pubs["annotations"].publish(wire.write_image_annotations(header, res, drawn, self.random_weights))
                with self._lock:
                    cam.counters["annotated_frames"] += int(want_img)
                    cam.counters["marker_frames"] += int(want_mk)
                    cam.counters["annotation_frames"] += int(want_ann)
                    cam.counters["boxes_not_drawn"] += not_drawn

    # ================================================================== alerts, health, diagnostics
    def _publish_alert(self, alert, header, dets, res, health: bool) -> None:
        """Publish a driver alert (a core ``Alert`` or a dict with ``level``, ``reason``,
        ``object_indices``): on ood/monitor_health (``health``) or ood/driver_alert with the OOD
        objects ``dets[object_indices]`` embedded as their bytes, as in ood/detections."""
        from runa_ood_msgs.msg import DriverAlert

        if header is None:
            header = convert.copy_header(None)
            header.stamp = self.get_clock().now().to_msg()
        if health:  # no detections in it: an rclpy message, re-stamped and re-published by the heartbeat
            msg = convert.to_health_alert(header, int(_get(alert, "level", 0)), _get(alert, "reason", ""))
            self._last_health_msg = msg
            self._pubs["health"].publish(msg)
        else:
            self._pubs["alert"].publish(wire.write_alert(
                header, int(_get(alert, "level", 0)), DriverAlert.SOURCE_OOD_OBJECT,
                str(_get(alert, "reason", "") or ""), dets, res, _get(alert, "object_indices", None) or ()))

    def _vehicle_alert_update(self, cam: _Camera, alert, header, dets, res) -> None:
        """ood/driver_alert after camera ``cam``'s alert monitor saw a frame. One stream: published
        when its level changes. Cameras: the vehicle level is the highest camera level; published
        when it or the set of cameras at it changes, the reason naming them (the OOD objects of this
        frame embedded when this camera is one of them)."""
        if not self._multi:
            if alert.changed:
                self._publish_alert(alert, header, dets, res, health=False)
                self._log_alert(int(alert.level), alert.reason)
            return
        cam.alert_reason = str(alert.reason or "")
        top = max(int(c.alerts.level) for c in self._cams)
        named = [c for c in self._cams if top and int(c.alerts.level) == top]
        key = (top, tuple(c.name for c in named))
        if key == self._vehicle_alert:
            return
        self._vehicle_alert = key
        lvl = AlertLevel(top).name
        if top:
            reason = (f"{lvl}: OOD object ahead ({', '.join(c.name for c in named)}): "
                      + "; ".join(f"{c.name}: {c.alert_reason}" for c in named))
        else:
            reason = f"CLEAR: no OOD object on any camera ({cam.name}: {cam.alert_reason})"
        if cam in named or not top:
            self._publish_alert({"level": top, "reason": reason,
                                 "object_indices": list(alert.object_indices) if cam in named else []},
                                header, dets, res, health=False)
        else:  # this camera went down while others hold the level: no objects of this frame in it
            self._publish_alert({"level": top, "reason": reason, "object_indices": []}, None, None, None, health=False)
        self._log_alert(top, reason)

    def _log_alert(self, level: int, reason: str) -> None:
        text = f"driver alert -> {AlertLevel(level).name}: {reason}"
        if level:  # (rclpy: one severity per call site)
            self.get_logger().warning(text)
        else:
            self.get_logger().info(text)

    def _on_heartbeat(self) -> None:
        """Re-publish the current ood/monitor_health message with a fresh stamp (the topic's
        deadline) and current figures (its reason re-read from the health monitors now)."""
        if self._on_health_timer():  # a transition was just published
            return
        msg = getattr(self, "_last_health_msg", None)
        if msg is not None and "health" in self._pubs:
            msg.header.stamp = self.get_clock().now().to_msg()
            self._pubs["health"].publish(msg)

    def _on_health_timer(self) -> bool:
        """Check every camera's health; publish ood/monitor_health when the *kind* of problem
        changes (the cameras and their codes), else only refresh the figures in the reason that the
        heartbeat re-publishes. True when a message was published."""
        if not self._cams or self._cams[0].health is None:
            return False
        now = time.monotonic()
        with self._lock:
            per = [(cam, cam.health.check(now)) for cam in self._cams]
        per = [(cam, probs) for cam, probs in per if probs]
        key = tuple((cam.name, tuple(sorted(p.code.value for p in probs))) for cam, probs in per)
        if per:
            if self._multi:
                text = (f"CAUTION: OOD monitor degraded ({', '.join(cam.name for cam, _ in per)}): "
                        + "; ".join(f"{cam.name}: " + "; ".join(p.text for p in probs) for cam, probs in per))
            else:
                text = "CAUTION: OOD monitor degraded: " + "; ".join(p.text for _, probs in per for p in probs)
        if key == self._health_key:
            msg = getattr(self, "_last_health_msg", None)
            if per and msg is not None:
                msg.reason = text  # current figures: a 40 s silence reads 40 s, not the 1.02 s of the transition
            return False
        first = self._health_key is None
        self._health_key = key
        if per:
            self.get_logger().warning(text)
            self._publish_alert({"level": 1, "reason": text, "object_indices": []}, None, None, None, health=True)
            return True
        if not first:
            self.get_logger().info("OOD monitor healthy again")
            self._publish_alert({"level": 0, "reason": "CLEAR: OOD monitor healthy", "object_indices": []},
                                None, None, None, health=True)
            return True
        return False

    def _publish_label_info(self) -> None:
        header = convert.copy_header(None)
        header.stamp = self.get_clock().now().to_msg()
        thr = getattr(self.scorer.thresholds, "global_threshold", float("nan")) if self.scorer.thresholds else math.nan
        self._pubs["label_info"].publish(convert.to_label_info(header, list(self.scorer.label_set.labels), thr))

    def _reset_stats(self) -> None:
        for cam in self._cams:
            cam.reset_stats()
        self._node_counters: Dict[str, int] = collections.Counter()  # e.g. timer_internal_error
        self._backend_calls = 0
        self._batched_frames = 0
        self._vehicle_alert = (0, ())
        self._busy = 0  # scoring threads working on a batch
        self._health_key = None

    def _camera_accounting(self, cam: _Camera) -> Dict[str, Any]:  # holds the lock
        pc = dict(cam.pairer.counters) if cam.pairer is not None else {}
        frame_drops, input_drops = dict(cam.frame_drops), dict(cam.input_drops)
        queued, in_flight = len(cam.queue), cam.in_flight
        lost = {k: cam.loss[k].lost for k in ("image", "detections")}
        transport_problems = [f"{k}: {p}" for k in ("image", "detections") for p in cam.loss[k].problems()]
        inputs_ok = (cam.received["image"] + cam.received["detections"]
                     == pc.get("images_received", 0) + pc.get("detections_received", 0) + sum(input_drops.values()))
        pairer_ok = cam.pairer.check_accounting() if cam.pairer is not None else True
        frames_ok = pc.get("pairs", 0) == cam.frames_scored + sum(frame_drops.values()) + queued + in_flight
        return {
            "received": dict(cam.received),
            "lost": lost,
            "lost_detail": {k: cam.loss[k].detail() for k in ("image", "detections")},
            "transport_problems": transport_problems,
            "transport_warning": cam.transport_warning,
            "input_drops": input_drops,
            "pairer": pc,
            "pairer_by_stream": cam.pairer.dropped_by_stream() if cam.pairer is not None else {},
            "frames_scored": cam.frames_scored,
            "frame_drops": frame_drops,
            "queued": queued,
            "in_flight": in_flight,
            "worker_busy": bool(self._busy),
            "boxes_total": cam.boxes_total,
            "boxes_by_status": {BoxStatus(c).name if c in BoxStatus._value2member_map_ else str(c): n
                                for c, n in sorted(cam.box_status.items())},
            "boxes_ood": cam.boxes_ood,
            "counters": {**self._node_counters, **cam.counters},
            "balanced": bool(inputs_ok and pairer_ok and frames_ok and not transport_problems),
        }

    def accounting(self, camera: Optional[str] = None) -> Dict[str, Any]:
        """Snapshot of what happened to every message (thread-safe).

        Keys: ``received`` {stream: n}, ``lost`` {stream: n} (messages that never reached the node:
        the larger of the gaps in the publishers' sequence numbers and the middleware's plausible
        message-lost counts; published = received + lost), ``lost_detail`` {stream: figures of
        :class:`.transport.StreamLoss`}, ``transport_problems`` (loss figures that cannot be true:
        non-empty = not balanced), ``transport_warning`` (set while a stream's share lost in
        transport is over ``transport.loss_warn_fraction``), ``pairer`` (StampPairer counters),
        ``frames_scored``, ``frame_drops`` {reason: n}, ``queued``, ``in_flight`` (taken by the
        worker, not yet accounted for), ``worker_busy`` (still publishing secondary outputs),
        ``boxes_by_status`` {name: n}, ``boxes_ood``, ``counters`` (``qos_incompatible``,
        ``frame_id_mismatch``, ``backend_error_frames``, ...), and ``balanced``: True when images
        received == paired + image-side drops + pending (same for detections), pairs == frames
        scored + frame drops + queued + in flight, and no loss figure is untrue. A frame is counted
        as scored (or dropped) in the same locked step that ends its flight, so every snapshot
        balances.

        With ``cameras``: ``accounting("front")`` is camera front's (the keys above, balanced on its
        own); ``accounting()`` is ``{"cameras": {name: that}, "balanced": all balanced,
        "backend_calls": n, "frames_per_backend_call": mean}``. One stream: ``accounting()`` is the
        stream's.
        """
        with self._lock:
            if not self._cams:  # not configured yet: nothing happened (the single stream's keys, all zero)
                return self._camera_accounting(_Camera(validate({}, check_files=False).inputs[0]))
            if camera is not None or not self._multi:
                return self._camera_accounting(self._cam(camera))
            cams = {c.name: self._camera_accounting(c) for c in self._cams}
            return {"cameras": cams, "balanced": all(a["balanced"] for a in cams.values()),
                    "backend_calls": self._backend_calls,
                    "frames_per_backend_call": self._batched_frames / self._backend_calls if self._backend_calls else 0.0}

    def _publish_diagnostics(self) -> None:
        from diagnostic_msgs.msg import DiagnosticArray

        if not self._pubs or self.settings is None:
            return
        self._watch_transport()
        arr = DiagnosticArray()
        arr.header.stamp = self.get_clock().now().to_msg()
        arr.status = [self._camera_status(cam) for cam in self._cams]
        self._pubs["diagnostics"].publish(arr)

    def _watch_transport(self) -> None:
        """Each stream's share of messages lost in transport over ``transport.loss_window_s``
        (:class:`.transport.LossWatch`, run with the diagnostics): past
        ``transport.loss_warn_fraction`` the node says so once in the log (with the likely cause
        and the shipped profile) and keeps a WARN in /diagnostics while it lasts."""
        now = time.monotonic()
        log = self.get_logger()
        for cam in self._cams:
            with self._lock:
                events = {k: cam.loss_watch[k].update(now, cam.received[k], cam.loss[k].lost)
                          for k in ("image", "detections")}
                over = [(k, w) for k, w in cam.loss_watch.items() if w.over]
                was = cam.transport_warning
                cam.transport_warning = (
                    "; ".join(f"{w.share:.0%} of {k} messages lost in transport over the last "
                              f"{w.window_s:g} s ({w.counts[0]} of {w.counts[1]})" for k, w in over)
                    + f": {loss_advice()}") if over else ""
            if any(e == "raised" for e in events.values()) and cam.transport_warning:
                log.warning(f"messages lost in transport{cam.tag}: {cam.transport_warning}")
            elif was and not cam.transport_warning:
                log.info(f"messages lost in transport{cam.tag}: back under "
                         f"transport.loss_warn_fraction={self.settings.transport_loss_warn_fraction:g}")

    def _camera_status(self, cam: _Camera):
        """Camera ``cam``'s DiagnosticStatus (the single stream: ``<node>: OOD monitor``; camera C:
        ``<node>: OOD monitor (C)``)."""
        from diagnostic_msgs.msg import DiagnosticStatus, KeyValue

        with self._lock:
            acc = self._camera_accounting(cam)
            lat_node, lat_pipe, lat_frame = list(cam.lat_node), list(cam.lat_pipeline), list(cam.lat_frame)
            health = [p.text for p in cam.health.problems]
            calls, batched = self._backend_calls, self._batched_frames
        s = self.settings
        kv: Dict[str, Any] = {"camera": cam.name} if self._multi else {}
        kv.update({
            "model": s.model,
            "pretrained": s.pretrained or "(none)",
            "random_weights": self.random_weights,
            "backend": self.backend_name,
            "backend_variant": self.backend_choice.get("variant", self.backend_name),
            "backend_variant_reason": self.backend_choice.get("reason", "explicit"),
            "device": s.device,
            "scorer": s.scorer,
            "label_set": s.label_set,
            "thresholds": s.thresholds_file or f"default_threshold {s.default_threshold} (uncalibrated)",
            "frames_scored": acc["frames_scored"],
            "messages_received.image": acc["received"].get("image", 0),
            "messages_received.detections": acc["received"].get("detections", 0),
            "messages_lost.image": acc["lost"]["image"],
            "messages_lost.detections": acc["lost"]["detections"],
            "images_received": acc["pairer"].get("images_received", 0),
            "detections_received": acc["pairer"].get("detections_received", 0),
            "frames_paired": acc["pairer"].get("pairs", 0),
            "images_pending": acc["pairer"].get("images_pending", 0),
            "detections_pending": acc["pairer"].get("detections_pending", 0),
            "frames_queued": acc["queued"] + acc["in_flight"],
            "frames_in_flight": acc["in_flight"],
            "latency_p50_ms": _percentile(lat_node, 50),
            "latency_p95_ms": _percentile(lat_node, 95),
            "pipeline_p50_ms": _percentile(lat_pipe, 50),
            "pipeline_p95_ms": _percentile(lat_pipe, 95),
            "frame_time_p50_ms": _percentile(lat_frame, 50),  # everything per frame: what health budgets
            "frame_time_p95_ms": _percentile(lat_frame, 95),
            "boxes_total": acc["boxes_total"],
            "boxes_ood": acc["boxes_ood"],
            "alert_level": AlertLevel(int(cam.alerts.level)).name,
            "thresholds_mismatch": "; ".join(getattr(self, "thresholds_mismatch", [])) or "none",
            "alert_boxes_untracked": cam.alerts.n_boxes_untracked,
            "alert_jump_resets": cam.alerts.n_jump_resets,
            "accounting_balanced": acc["balanced"],
        })
        if self._multi:  # the shared model: how many frames (cameras) each backend call scored
            kv["vehicle_alert_level"] = AlertLevel(int(self._vehicle_alert[0])).name
            kv["backend_calls"] = calls
            kv["frames_per_backend_call"] = batched / calls if calls else 0.0
        if self.unknown_overrides:
            kv["unknown_parameters"] = ", ".join(self.unknown_overrides)
        for r in PAIRER_REASONS:
            kv[f"drops.{r}"] = acc["pairer"].get(r, 0)
        for r in FRAME_REASONS:
            kv[f"drops.{r}"] = acc["frame_drops"].get(r, 0)
        for r, n in acc["frame_drops"].items():
            kv.setdefault(f"drops.{r}", n)
        for r, n in acc["input_drops"].items():
            kv[f"drops.input_{r}"] = n
        kv["drops.lost_in_transport"] = acc["lost"]["image"] + acc["lost"]["detections"]
        for k in ("image", "detections"):  # how the loss figures were made (.transport.StreamLoss)
            d = acc["lost_detail"][k]
            for name in ("sequence_gaps", "middleware_reports", "rejected_reports", "sequence_jumps", "late"):
                kv[f"transport.{name}.{k}"] = d[name]
        kv["transport_warning"] = acc["transport_warning"] or "none"
        kv["transport_error"] = "; ".join(acc["transport_problems"]) or "none"
        for b in BoxStatus:
            kv[f"boxes.{b.name}"] = acc["boxes_by_status"].get(b.name, 0)
        for k, n in acc["counters"].items():
            kv[k] = n
        st = DiagnosticStatus()
        st.name = f"{self.get_fully_qualified_name()}: OOD monitor" + (f" ({cam.name})" if cam.name else "")
        st.hardware_id = f"{self.backend_name}@{s.device}"
        warn = (["degraded: " + "; ".join(health)] if health else []) + (
            ["messages lost in transport: " + acc["transport_warning"]] if acc["transport_warning"] else [])
        if acc["transport_problems"]:  # a loss figure that cannot be true: never a balance
            st.level = DiagnosticStatus.ERROR
            st.message = " | ".join(["transport accounting untrue: " + "; ".join(acc["transport_problems"])] + warn)
        elif warn:
            st.level, st.message = DiagnosticStatus.WARN, " | ".join(warn)
        elif self.random_weights:
            st.level, st.message = DiagnosticStatus.WARN, "RANDOM WEIGHTS: scores are meaningless (demo/test)"
        else:
            st.level, st.message = DiagnosticStatus.OK, f"{acc['frames_scored']} frames scored"
        st.values = [KeyValue(key=k, value=(f"{v:.2f}" if isinstance(v, float) else str(v).lower()
                                             if isinstance(v, bool) else str(v))) for k, v in kv.items()]
        return st


# ====================================================================== entry point
def main(args: Optional[List[str]] = None, exit_process: bool = True) -> int:
    """Console script ``runa_ood_node``: run the node until Ctrl-C.

    With ``autostart:=true`` (default) the node configures and activates itself; if that fails (e.g.
    the model weights are missing) the error is logged and the process exits with status 1 (under
    ``ros2 launch`` the package's launch files then end the launch with an error and a non-zero
    exit). With ``autostart:=false`` it waits, unconfigured, for a lifecycle manager.

    Python ``logging`` (this package, open_clip, the backends, ...) goes to the node's ROS logger
    and ``/rosout`` at the node's log level (:mod:`.rosout_logging`). Ctrl-C / SIGINT or SIGTERM end
    it with status 0; a second SIGINT during the clean-up (a terminal signals the whole process
    group and ``ros2 launch`` forwards SIGINT again) is ignored instead of killing the process.

    With ``exit_process`` (the console script) the process ends with ``os._exit(status)`` once the
    node, its threads and the ROS context are shut down: the interpreter's own teardown of torch and
    open_clip takes 2-7 s on a busy CPU, longer than ``ros2 launch`` waits after SIGINT before it
    escalates to SIGTERM (5 s) and logs an error.
    """
    import signal

    from rclpy.executors import ExternalShutdownException, SingleThreadedExecutor

    from . import rosout_logging

    try:
        rclpy.init(args=args)
    except Exception as exc:  # e.g. a malformed --ros-args rule: say so without a traceback
        print(f"runa_ood_node: cannot initialise ROS 2: {exc}", file=sys.stderr)
        return 2
    node = None
    code = 0
    try:
        node = RunaOodNode()
        rosout_logging.install(node.get_logger())
        if node.get_parameter("autostart").value and not node.autostart():
            node.get_logger().fatal("start-up failed (see the error above); exiting")
            code = 1
        else:
            executor = SingleThreadedExecutor()
            executor.add_node(node)
            executor.spin()
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # the clean-up runs to its end
        if node is not None:
            if rclpy.ok():  # after Ctrl-C the context is already shut down: no lifecycle transition then
                try:
                    node.trigger_shutdown()
                except Exception:
                    pass
            try:
                node._destroy_inputs()
                node._release()  # idempotent: stops the worker thread, releases the model
            except Exception:
                pass
            rosout_logging.uninstall()
            node.destroy_node()
        rclpy.try_shutdown()
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # rclpy restored the handler it had replaced
    if exit_process:
        import logging
        import os

        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
