"""``runa_ood_node``: out-of-distribution scoring of detector boxes, as a ROS 2 lifecycle node.

Only the ROS side lives here: lifecycle, publishers, subscriptions, timers. Per camera
(:mod:`.camera`): inputs, pairing and queueing in the executor thread, books in
``core.accounting``; scoring and publishing the answers in the scoring threads (:mod:`.worker`);
vehicle-level alerts decided in ``core.vehicle``, published by :mod:`.alerting`; ``/diagnostics``
built by :mod:`.diagnostics`; drawings by :func:`.draw.publish_drawings`.

Inputs (relative names) ``image`` (sensor_msgs/Image; CompressedImage on ``image/compressed`` with
``image_transport=compressed``) and ``detections`` (vision_msgs/Detection2DArray stamped like the
image the detector ran on), taken raw and paired by header stamp (:mod:`.pairing`).

Outputs (every header a copy of the source image's): ``ood/detections`` (OodDetectionArray: every
input box in input order with uncertainty, threshold, is_ood, nearest ID label, status),
``ood/ood_only`` (the boxes flagged OOD, while someone subscribes), ``ood/driver_alert`` (DriverAlert
when the level changes; latched; a frame the backend failed to score holds the level),
``ood/monitor_health`` (CAUTION with the reasons while the pipeline is degraded, CLEAR when
recovered; latched, heartbeat), ``ood/annotated_image``, ``ood/markers``, ``ood/image_annotations``
(with ``lazy`` only while someone subscribes), ``ood/label_info`` (latched: the ID labels and the
global threshold) and ``/diagnostics`` (one status per camera at 1 Hz).

Cameras (``cameras:=['front', 'left']``): ONE node and ONE model; camera C's inputs and outputs are
under ``C/``; ``ood/driver_alert``, ``ood/monitor_health`` and ``ood/label_info`` stay single.

Lifecycle: configure validates the parameters, builds the scorer (the factory), creates publishers
and starts the scoring threads (a failure: logged, FAILURE, ``main`` exits 1); activate creates
subscriptions and timers and publishes LabelInfo and the initial alerts; deactivate removes them
and counts waiting messages as dropped; cleanup / shutdown release the model; ``destroy_node`` (from
any state) does too, and the node leaves the ROS graph at once. ``autostart``
(default true) makes ``main`` configure and activate. A callback never raises: errors are logged
and counted ``internal_error``.
"""
from __future__ import annotations

import dataclasses
import sys
import threading
import time
import traceback
from typing import Any, Callable, Dict, List, Optional

from rclpy.clock import Clock, ClockType
from rclpy.impl.implementation_singleton import rclpy_implementation as _rclpy
from rclpy.lifecycle import LifecycleState, Node as LifecycleNode, TransitionCallbackReturn
from rcl_interfaces.msg import SetParametersResult

from ..core.accounting import Accounting
from ..core.alerts import AlertMonitor
from ..core.health import HealthMonitor
from . import convert, diagnostics
from .alerting import DriverAlerts
from .camera import Camera, HotLog
from .params import (LIVE_PARAMETERS, ParameterValidationError, declare_camera_parameters, declare_parameters,
                     read_parameters, validate)
from .qos import monitored, reliable, transport_name
from .run import run_node
from .transport import loss_advice
from .worker import FrameRecord, Worker

NODE_NAME = "runa_ood"
#: After handing a pair to an idle worker, the executor thread waits up to this long (s) until the
#: worker has converted the frame's inputs and entered the model (see :mod:`.worker`). None = no wait.
HANDOFF_WAIT_S: Optional[float] = 2e-3
#: Score unpadded rgb8 images through a read-only view of the message buffer (no copy).
ZERO_COPY_RGB8 = True
_SUCCESS, _FAILURE = TransitionCallbackReturn.SUCCESS, TransitionCallbackReturn.FAILURE
#: parameters every rclpy node may be given that are not this node's to declare
_FOREIGN_PARAMETERS = ("use_sim_time", "start_type_description_service")


class _DestroyedStateMachine:
    """Stands for a destroyed node's lifecycle state machine: a transition asked after
    ``destroy_node`` raises ``InvalidHandle`` (the destroyed rclpy object would crash the process)."""

    def __getattr__(self, name: str):
        raise _rclpy.InvalidHandle(f"the node was destroyed: no lifecycle state machine ({name})")


class RunaOodNode(LifecycleNode):
    """The OOD lifecycle node (see the module docstring). Construct, then configure + activate
    (``autostart()`` does both)."""

    def __init__(self, node_name: str = NODE_NAME, **kwargs):
        super().__init__(node_name, **kwargs)
        declare_parameters(self)
        declare_camera_parameters(self)
        self.unknown_overrides = diagnostics.warn_unknown_overrides(self, _FOREIGN_PARAMETERS)
        self.add_on_set_parameters_callback(self._on_set_parameters)
        self.settings = self.scorer = self.last_error = None  # last_error: the last configure failure
        #: optional callable(FrameRecord) called from a scoring thread after each scored frame
        self.frame_observer: Optional[Callable[[FrameRecord], None]] = None
        self.accounts = Accounting()  # every camera's books
        self._lock = self.accounts.lock  # pairers, books, queues
        self.cv = threading.Condition(self._lock)
        self._cams: List[Camera] = []
        self.handoff = threading.Event()  # set by a worker once it has entered the model (HANDOFF_WAIT_S)
        self.active = self.stopping = False
        self._workers: List[threading.Thread] = []  # scoring threads (parameter scoring_threads)
        self.score_lock: Optional[threading.Lock] = None  # backend calls one at a time (see _start_workers)
        self._pubs: Dict[str, Any] = {}  # vehicle-level publishers (+ the single stream's, same objects)
        self._timers: List[Any] = []
        self._steady = Clock(clock_type=ClockType.STEADY_TIME)
        self.hot_log = HotLog(self.get_logger())  # hot-path warnings, at most once per period each
        self.alerts_out: Optional[DriverAlerts] = None  # ood/driver_alert, ood/monitor_health (once configured)

    @property
    def _alerts(self) -> AlertMonitor:
        """The single stream's (first camera's) alert monitor."""
        return self._cams[0].alerts

    def camera_names(self) -> List[str]:
        """The configured cameras (``[""]`` for the single stream)."""
        return [c.name for c in self._cams]

    def _cam(self, name: Optional[str]) -> Camera:
        for c in self._cams:
            if name is None or c.name == name:
                return c
        raise KeyError(f"no camera {name!r} (cameras: {self.camera_names()})")

    @property
    def _multi(self) -> bool:
        return bool(self.settings is not None and self.settings.cameras)

    # ================================================================== lifecycle
    def autostart(self) -> bool:
        """configure + activate; False (errors logged) when either fails."""
        return self.trigger_configure() == _SUCCESS and self.trigger_activate() == _SUCCESS

    def on_configure(self, state: LifecycleState) -> TransitionCallbackReturn:
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
        self._configured(settings, scorer, load_s, warmup_s)
        return _SUCCESS

    def _configured(self, settings, scorer, load_s: float, warmup_s: float) -> None:
        """Take the built scorer: cameras, publishers, scoring threads; say what runs."""
        log = self.get_logger()
        if self.thresholds_mismatch:
            log.warning("thresholds_allow_mismatch=true: using thresholds fitted for another configuration: "
                        + "; ".join(self.thresholds_mismatch))
        self.settings, self.scorer = settings, scorer
        enc = scorer.encoder
        self.backend_name = str(getattr(enc, "backend_name", settings.backend))
        # which variant of the backend runs, and why (explicit / measured / recorded / fallback: factory)
        self.backend_choice = dict(getattr(scorer, "backend_choice", None) or {})
        self.random_weights = bool(getattr(enc, "random_weights", False))
        cams = [Camera.make(ci, settings, self.accounts) for ci in settings.inputs]
        with self._lock:
            self._cams = cams
            self.accounts.set_cameras([c.ledger for c in cams])
        self.alert_use_ids = bool(settings.alert.use_detection_ids)
        self.accounts.reset()
        self._create_publishers()
        self.alerts_out = DriverAlerts(self, self._pubs["alert"], self._pubs["health"], cams, self._multi)
        self._start_workers(settings, cams)
        log.info(diagnostics.configured_line(settings, self.backend_name, self.backend_choice, scorer,
                                             load_s, warmup_s, transport_name()))
        if not settings.thresholds_file:
            log.warning("no thresholds_file: every label uses default_threshold="
                        f"{settings.default_threshold}; calibrate with `runa-ood calibrate` for real use")
        if self.random_weights:
            log.warning("RANDOM WEIGHTS (allow_random_weights=true): scores are meaningless; every output is "
                        "marked random_weights=true. Demos and tests only.")

    def _start_workers(self, s, cams: List[Camera]) -> None:
        """Scoring threads: camera i to thread i mod n (each camera's frames in stamp order on one
        thread); torch and ONNX Runtime run concurrent calls, anything else (a TensorRT execution
        context) one at a time."""
        self.stopping = False
        n_threads = max(1, min(s.scoring_threads, len(cams)))
        thread_safe = self.backend_name.split("-")[0].split("_")[0] in ("torch", "onnxruntime", "ort")
        self.score_lock = threading.Lock() if n_threads > 1 and not thread_safe else None
        self._workers = [threading.Thread(target=Worker(self, cams[k::n_threads], ZERO_COPY_RGB8).run,
                                          name=f"runa_ood_worker{k if k else ''}", daemon=True) for k in range(n_threads)]
        for w in self._workers:
            w.start()

    def on_activate(self, state: LifecycleState) -> TransitionCallbackReturn:
        try:
            s = self.settings
            ret = super().on_activate(state)  # enables the lifecycle publishers
            if ret != _SUCCESS:
                return ret
            for cam in self._cams:
                cam.subscribe(self)
                cam.health = HealthMonitor(s.health_frame_timeout_s, s.health_latency_budget_ms)
                cam.alerts.reset()  # the latched CLEAR below must match the monitors' state
            period = min(0.25, max(0.02, s.health_frame_timeout_s / 4.0))
            for p, fn in ((period, self._on_health_timer), (1.0, self._publish_diagnostics),
                          (s.health_heartbeat_period_s, self._on_heartbeat)):
                self._timers.append(self.create_timer(p, self._safe(fn), clock=self._steady))
            self._publish_label_info()
            self.alerts_out.activated()
            with self._lock:
                self.active = True
            for cam in self._cams:
                self.get_logger().info(cam.describe(self, s.pairing_slop_s))
            return _SUCCESS
        except Exception as exc:
            self._destroy_inputs()
            return self._fail(f"activate failed: {type(exc).__name__}: {exc}")

    def on_deactivate(self, state: LifecycleState) -> TransitionCallbackReturn:
        self._destroy_inputs()
        with self._lock:
            self.active = False
            for cam in self._cams:
                cam.log_pairer_drops(self, cam.pairer.flush())
                cam.ledger.drop_queued("deactivated")
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
        return self.on_shutdown(state)

    def destroy_node(self) -> None:
        """Stop the scoring threads, release the model, destroy the node and its lifecycle state
        machine: the node leaves the ROS graph now, whatever state it was in.

        rclpy's ``LifecycleNode.destroy_node`` leaves the state machine, which holds a share of the
        rcl node (and owns the lifecycle services and ``transition_event``): the node stayed in the
        graph until the Python object was garbage-collected (reference cycles: a cyclic collection)
        or, with the process ended by ``os._exit``, for the DDS lease (~20 s) after the process
        had gone. A node destroyed active without ``trigger_shutdown`` kept its scoring threads, which
        kept the node alive for good. Idempotent."""
        try:
            self._destroy_inputs()
            self._release()
        except Exception as exc:  # the node is destroyed all the same
            self.get_logger().error(f"releasing the node's resources failed: {type(exc).__name__}: {exc}")
        super().destroy_node()
        machine, self._state_machine = self._state_machine, _DestroyedStateMachine()
        if not isinstance(machine, _DestroyedStateMachine):
            machine.destroy_when_not_in_use()

    def _fail(self, msg: str) -> TransitionCallbackReturn:
        self.last_error = msg
        self.get_logger().error(msg)
        return _FAILURE

    def _release(self) -> None:
        with self.cv:
            self.active = False
            self.stopping = True
            for cam in self._cams:
                cam.ledger.queue.clear()
            self.cv.notify_all()
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
        from runa_ood_msgs.msg import DriverAlert
        from vision_msgs.msg import LabelInfo

        p, lease = self.create_lifecycle_publisher, self.settings.health_liveliness_lease_s
        self._pubs = {  # vehicle level: one of each whatever the number of cameras
            # silence is an alarm: liveliness lease on both, deadline + heartbeat on monitor_health
            "alert": p(DriverAlert, "ood/driver_alert", monitored(reliable(1, latched=True), lease)),
            "health": p(DriverAlert, "ood/monitor_health", monitored(reliable(1, latched=True), lease, True)),
            "label_info": p(LabelInfo, "ood/label_info", reliable(1, latched=True)),
            "diagnostics": p(DiagnosticArray, "/diagnostics", reliable(10)),
        }
        for cam in self._cams:  # per camera: "<C>/ood/..." (the single stream: "ood/...")
            cam.create_publishers(p)
        if not self._multi:  # one stream: its publishers under their old keys too
            self._pubs.update(self._cams[0].pubs)

    def _on_set_parameters(self, params) -> SetParametersResult:
        """Validate new values (refuse bad ones); apply the live ones (publish_annotated, lazy)."""
        current = read_parameters(self)
        ours = [prm for prm in params if prm.name in current]  # e.g. use_sim_time is not ours to judge
        if not ours:
            return SetParametersResult(successful=True)
        for prm in ours:
            current[prm.name] = list(prm.value) if prm.name == "alert.roi" and prm.value is not None else prm.value
        # files (label set, thresholds, head) are read only when a change can touch them: toggling a live
        # parameter on an active node (e.g. publish_annotated from RViz) reads nothing from disk
        files = not all(prm.name in LIVE_PARAMETERS for prm in ours)
        try:
            new = validate(current, check_files=files)
        except ParameterValidationError as exc:
            return SetParametersResult(successful=False, reason=str(exc))
        if self.settings is not None:
            self.settings = dataclasses.replace(self.settings, **{k: getattr(new, k) for k in LIVE_PARAMETERS})
        return SetParametersResult(successful=True)

    # ================================================================== callbacks (executor thread)
    def _safe(self, fn: Callable, stream: Optional[str] = None, cam: Optional[Camera] = None) -> Callable:
        """Wrap a callback: an unexpected exception is logged and counted, never raised.

        ``stream`` ("image" / "detections") marks subscription callbacks of camera ``cam``: the
        message is counted as received first (and the publisher's sequence number checked for
        messages lost on the way), and as an ``internal_error`` input drop if the callback fails."""
        what = f"the {stream} callback{cam.tag}" if stream is not None else getattr(fn, "__name__", "callback")

        def wrapped(*args):
            try:
                fn(*args)
            except Exception as exc:
                if stream is not None:
                    cam.ledger.drop_input("internal_error")
                else:
                    self.accounts.count_node("timer_internal_error")
                self.get_logger().error(f"internal error in {what}: {type(exc).__name__}: {exc}\n"
                                        f"{traceback.format_exc(limit=4)}", throttle_duration_sec=5.0)

        wrapped.__name__ = getattr(fn, "__name__", "callback")
        if stream is None:
            return wrapped

        def wrapped_input(msg, info):  # two arguments: rclpy passes the MessageInfo
            cam.note_received(self, stream, info)
            wrapped(msg)
        return wrapped_input

    def idle(self) -> bool:  # holds the lock
        """No scoring thread busy and no frame waiting."""
        return not self.accounts.busy and not any(c.ledger.queue for c in self._cams)

    def handoff_wait(self) -> Optional[Callable[[], Any]]:  # holds the lock
        """After handing a pair to an idle worker: what waits (outside the lock) until it has
        entered the model (:data:`HANDOFF_WAIT_S`; None: no wait)."""
        if HANDOFF_WAIT_S is None:
            return None
        self.handoff.clear()
        return lambda: self.handoff.wait(HANDOFF_WAIT_S)

    # ================================================================== alerts, health, diagnostics
    def vehicle_alert(self, cam: Camera, alert, header, dets, res) -> None:
        """ood/driver_alert after camera ``cam``'s alert monitor saw a frame (scoring threads)."""
        self.alerts_out.camera_alert(cam.name, alert, header, dets, res)

    def _on_heartbeat(self) -> None:
        if self.alerts_out is not None:
            self.alerts_out.heartbeat(self._lock)

    def _on_health_timer(self) -> bool:
        return self.alerts_out is not None and self.alerts_out.check_health(self._lock)

    def _publish_label_info(self) -> None:
        header = convert.copy_header(None)
        header.stamp = self.get_clock().now().to_msg()
        thr = getattr(self.scorer.thresholds, "global_threshold", float("nan")) if self.scorer.thresholds else float("nan")
        self._pubs["label_info"].publish(convert.to_label_info(header, list(self.scorer.label_set.labels), thr))

    def accounting(self, camera: Optional[str] = None) -> Dict[str, Any]:
        """Snapshot of what happened to every message (thread-safe; keys and the balance:
        :meth:`.core.accounting.CameraLedger.snapshot`). With ``cameras``: ``accounting("front")`` is
        camera front's; ``accounting()`` is ``{"cameras": {name: that}, "balanced": all balanced,
        "backend_calls": n, "frames_per_backend_call": mean}``. One stream: the stream's."""
        return self.accounts.snapshot(camera, per_camera=self._multi)

    def _publish_diagnostics(self) -> None:
        if not self._pubs or self.settings is None:
            return
        self._watch_transport()
        node = diagnostics.NodeFacts(self.get_fully_qualified_name(), self.settings, self.backend_name,
                                     self.backend_choice, self.random_weights, getattr(self, "thresholds_mismatch", []),
                                     self.unknown_overrides, self._multi)
        cams = [cam.facts(self.accounts, self.alerts_out.level) for cam in self._cams]
        self._pubs["diagnostics"].publish(diagnostics.diagnostic_array(self.get_clock().now().to_msg(), node, cams))

    def _watch_transport(self) -> None:
        """Each stream's share lost in transport, run with the diagnostics (``Camera.watch_transport``)."""
        now, advice = time.monotonic(), loss_advice()
        for cam in self._cams:
            cam.watch_transport(self, now, advice)


def main(args: Optional[List[str]] = None, exit_process: bool = True) -> int:
    """Console script ``runa_ood_node``: run the node until Ctrl-C (:func:`.run.run_node`)."""
    return run_node(RunaOodNode, args, exit_process)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
