"""``/diagnostics`` of the node: one ``diagnostic_msgs/DiagnosticStatus`` per camera, built from
snapshots (pure functions; the message types are imported when called).

Each status (``<node>: OOD monitor``; camera C: ``<node>: OOD monitor (C)``) carries the model and
backend, the camera's books (``core.accounting``: messages received and lost, drops by reason,
frames scored, queued and in flight, boxes by status, counters, ``accounting_balanced``), latency
percentiles and the alert monitor's figures. Its level: ERROR when a loss figure cannot be true;
WARN while the camera's health is degraded, a stream's share lost in transport is over
``transport.loss_warn_fraction`` or the weights are random; else OK.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Sequence

from ..core.accounting import FRAME_REASONS, STREAMS
from ..core.metrics import percentile
from ..core.registry import AlertLevel, BoxStatus
from .pairing import REASONS as PAIRER_REASONS
from .params import closest_parameter


@dataclass(frozen=True)
class NodeFacts:
    """What every status of the node says about the node itself (fixed once configured)."""

    name: str  # the node's fully qualified name
    settings: Any  # the validated NodeSettings
    backend: str
    backend_choice: Mapping[str, Any] = field(default_factory=dict)
    random_weights: bool = False
    thresholds_mismatch: Sequence[str] = ()
    unknown_overrides: Sequence[str] = ()
    multi: bool = False  # several cameras


@dataclass(frozen=True)
class CameraFacts:
    """One camera's figures at one moment (taken together under the node's lock)."""

    name: str
    accounting: Dict[str, Any]  # ``Accounting.camera_snapshot``
    latencies: Sequence[List[float]]  # node, pipeline, frame (ms)
    health: Sequence[str]  # the camera's health problems, as text
    alert_level: int
    alerts_untracked: int
    alert_jump_resets: int
    backend_calls: int = 0
    frames_per_call: float = 0.0
    vehicle_level: int = 0


def diagnostic_array(stamp, node: NodeFacts, cameras: Sequence[CameraFacts]):
    """The ``DiagnosticArray`` stamped ``stamp``, one status per camera."""
    from diagnostic_msgs.msg import DiagnosticArray

    arr = DiagnosticArray()
    arr.header.stamp = stamp
    arr.status = [camera_status(node, cam) for cam in cameras]
    return arr


def camera_status(node: NodeFacts, cam: CameraFacts):
    """Camera ``cam``'s ``DiagnosticStatus``."""
    from diagnostic_msgs.msg import DiagnosticStatus, KeyValue

    acc, s = cam.accounting, node.settings
    kv: Dict[str, Any] = {"camera": cam.name} if node.multi else {}
    kv.update(_identity(node))
    kv.update(_figures(node, cam))
    if node.multi:  # the shared model: how many frames (cameras) each backend call scored
        kv["vehicle_alert_level"] = AlertLevel(int(cam.vehicle_level)).name
        kv["backend_calls"] = cam.backend_calls
        kv["frames_per_backend_call"] = cam.frames_per_call
    if node.unknown_overrides:
        kv["unknown_parameters"] = ", ".join(node.unknown_overrides)
    kv.update(_drops(acc))
    for b in BoxStatus:
        kv[f"boxes.{b.name}"] = acc["boxes_by_status"].get(b.name, 0)
    kv.update(acc["counters"])
    st = DiagnosticStatus()
    st.name = f"{node.name}: OOD monitor" + (f" ({cam.name})" if cam.name else "")
    st.hardware_id = f"{node.backend}@{s.device}"
    st.level, st.message = _level(DiagnosticStatus, node, cam)
    st.values = [KeyValue(key=k, value=_text(v)) for k, v in kv.items()]
    return st


def _text(v: Any) -> str:
    return f"{v:.2f}" if isinstance(v, float) else str(v).lower() if isinstance(v, bool) else str(v)


def _identity(node: NodeFacts) -> Dict[str, Any]:
    s, choice = node.settings, node.backend_choice
    return {
        "model": s.model,
        "pretrained": s.pretrained or "(none)",
        "random_weights": node.random_weights,
        "backend": node.backend,
        "backend_variant": choice.get("variant", node.backend),
        "backend_variant_reason": choice.get("reason", "explicit"),
        "device": s.device,
        "scorer": s.scorer,
        "label_set": s.label_set,
        "thresholds": s.thresholds_file or f"default_threshold {s.default_threshold} (uncalibrated)",
    }


def _figures(node: NodeFacts, cam: CameraFacts) -> Dict[str, Any]:
    acc, pc = cam.accounting, cam.accounting["pairer"]
    lat_node, lat_pipe, lat_frame = cam.latencies
    return {
        "frames_scored": acc["frames_scored"],
        "messages_received.image": acc["received"].get("image", 0),
        "messages_received.detections": acc["received"].get("detections", 0),
        "messages_lost.image": acc["lost"]["image"],
        "messages_lost.detections": acc["lost"]["detections"],
        "images_received": pc.get("images_received", 0),
        "detections_received": pc.get("detections_received", 0),
        "frames_paired": pc.get("pairs", 0),
        "images_pending": pc.get("images_pending", 0),
        "detections_pending": pc.get("detections_pending", 0),
        "frames_queued": acc["queued"] + acc["in_flight"],
        "frames_in_flight": acc["in_flight"],
        "latency_p50_ms": percentile(lat_node, 50),
        "latency_p95_ms": percentile(lat_node, 95),
        "pipeline_p50_ms": percentile(lat_pipe, 50),
        "pipeline_p95_ms": percentile(lat_pipe, 95),
        "frame_time_p50_ms": percentile(lat_frame, 50),  # everything per frame: what health budgets
        "frame_time_p95_ms": percentile(lat_frame, 95),
        "boxes_total": acc["boxes_total"],
        "boxes_ood": acc["boxes_ood"],
        "alert_level": AlertLevel(int(cam.alert_level)).name,
        "thresholds_mismatch": "; ".join(node.thresholds_mismatch) or "none",
        "alert_boxes_untracked": cam.alerts_untracked,
        "alert_jump_resets": cam.alert_jump_resets,
        "accounting_balanced": acc["balanced"],
    }


def _drops(acc: Mapping[str, Any]) -> Dict[str, Any]:
    """Drops by reason (pairer, frame, input), lost in transport and how those figures were made."""
    kv: Dict[str, Any] = {}
    for r in PAIRER_REASONS:
        kv[f"drops.{r}"] = acc["pairer"].get(r, 0)
    for r in FRAME_REASONS:
        kv[f"drops.{r}"] = acc["frame_drops"].get(r, 0)
    for r, n in acc["frame_drops"].items():
        kv.setdefault(f"drops.{r}", n)
    for r, n in acc["input_drops"].items():
        kv[f"drops.input_{r}"] = n
    kv["drops.lost_in_transport"] = acc["lost"]["image"] + acc["lost"]["detections"]
    for k in STREAMS:  # how the loss figures were made (core.loss.StreamLoss)
        d = acc["lost_detail"][k]
        for name in ("sequence_gaps", "middleware_reports", "rejected_reports", "sequence_jumps", "late"):
            kv[f"transport.{name}.{k}"] = d[name]
    kv["transport_warning"] = acc["transport_warning"] or "none"
    kv["transport_error"] = "; ".join(acc["transport_problems"]) or "none"
    return kv


def _level(DiagnosticStatus, node: NodeFacts, cam: CameraFacts):
    """(level, message) of a camera's status."""
    acc = cam.accounting
    warn = (["degraded: " + "; ".join(cam.health)] if cam.health else []) + (
        ["messages lost in transport: " + acc["transport_warning"]] if acc["transport_warning"] else [])
    if acc["transport_problems"]:  # a loss figure that cannot be true: never a balance
        return DiagnosticStatus.ERROR, " | ".join(
            ["transport accounting untrue: " + "; ".join(acc["transport_problems"])] + warn)
    if warn:
        return DiagnosticStatus.WARN, " | ".join(warn)
    if node.random_weights:
        return DiagnosticStatus.WARN, "RANDOM WEIGHTS: scores are meaningless (demo/test)"
    return DiagnosticStatus.OK, f"{acc['frames_scored']} frames scored"


def configured_line(settings, backend: str, choice: Mapping[str, Any], scorer, load_s: float, warmup_s: float,
                    transport: str) -> str:
    """The node's log line once configured: what it loaded, on what, and how long that took."""
    thr = "thresholds " + (settings.thresholds_file if settings.thresholds_file else
                           f"default_threshold={settings.default_threshold} (UNCALIBRATED)")
    variant = (f"; variant {choice.get('variant')}, {choice.get('reason')}"
               + (f": {choice['detail']}" if choice.get("detail") else "")) if choice else ""
    cams = settings.cameras
    return (f"configured in {load_s:.2f} s + warm-up {warmup_s:.2f} s: model {settings.model} "
            f"({settings.pretrained or 'no weights'}), backend {backend} on {settings.device} "
            f"({settings.resolved_precision}{variant}), "
            f"label set {scorer.label_set.name} ({len(scorer.label_set)} labels), scorer {settings.scorer}, "
            f"lam {settings.lam}, blur {settings.blur_radius} px, {thr}"
            + (f"; one model for {len(cams)} cameras: {', '.join(cams)}" if cams else "")
            + f"; transport: {transport}")



def warn_unknown_overrides(node, foreign: Sequence[str]) -> List[str]:
    """Warn about every parameter override of ``node`` (``-p``, YAML, launch) that is not one of its
    parameters (nor one of ``foreign``, every rclpy node's), naming the closest one: rclpy ignores
    them silently, so a typo would go unnoticed. Returns them (/diagnostics shows them)."""
    declared, unknown = sorted(node._parameters), []
    for name in sorted(getattr(node, "_parameter_overrides", {}) or {}):
        if name in node._parameters or name in foreign or name.startswith("qos_overrides."):
            continue
        unknown.append(name)
        near = closest_parameter(name, declared)
        node.get_logger().warning(
            f"parameter override '{name}' is not a parameter of this node and is IGNORED"
            + (f"; did you mean '{near}'?" if near else "")
            + (" (per-camera overrides need the camera in 'cameras')" if name.startswith("camera.") else ""))
    return unknown


__all__ = ["NodeFacts", "CameraFacts", "diagnostic_array", "camera_status", "configured_line", "warn_unknown_overrides"]
