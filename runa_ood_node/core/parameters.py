"""The node's parameters, ROS-free: the ONE table, its defaults and the validation of values.

Every parameter is one row of :data:`PARAMETERS` (a :class:`ParamSpec`: name, type = the type of
its default, range, choices, description, read-only flag, section). The table is the only place a
parameter's name, type, default, range, choices and description are written:
``ros.params.declare_parameters`` declares them on the node (descriptors), :func:`check` checks raw
values against it (type, range, choices, the rules between parameters), ``core.config.validate`` turns
them into a frozen :class:`NodeSettings` holding the scorer's typed configuration (``ScorerConfig``,
its files loaded once) or raises :class:`ParameterValidationError` listing *every* problem at once,
and ``config/runa_ood.yaml``, ``config/runa_ood.schema.json`` and the parameter table of the docs are
generated from it by ``runa-ood params --write`` (a test fails while they are stale). Adding a
parameter = one ``_P(...)`` row in its section, then ``runa-ood params --write``; read it in the node as
``settings.<name with dots as underscores>``. Cross-parameter rules live in :func:`check` (and the
rules a running node adds, in ``core.config.validate``).

Plain Python (no rclpy), so core, the tools and the unit tests use it without ROS;
``runa_ood_node.ros.params`` re-exports every name for the node.

When parameters take effect:

* ``read_only`` parameters (topics, QoS, transport, model, weights, allow_download, backend, device,
  precision, engine) can only be set at start-up (launch / YAML / ``--ros-args -p``): changing them
  needs a new process.
* the others are read at every lifecycle **configure**: set them, then ``cleanup`` + ``configure``
  (a lifecycle manager does this). New values are validated when set; bad values are refused.
* ``publish_annotated`` and ``lazy`` also apply immediately while active.

Units: seconds (``*_s``), milliseconds (``*_ms``), pixels (``blur_radius`` at the encoder input
resolution, ``min_box_size`` in original image pixels), fractions in [0, 1] (``alert.*_frac``,
``alert.roi`` in normalised image coordinates). Uncertainty thresholds are in the units of the
chosen scorer (RUNA's ``max_cosine``, old name ``runa``: ``-max cosine``, higher = more OOD; a box is
OOD when ``uncertainty > threshold``). ``default_threshold`` is in its units only: any other scorer
needs a ``thresholds_file`` calibrated for it (``runa-ood calibrate --scorer <name>``), else
validation fails.

Vehicle start-up never downloads: with ``allow_download=false`` (default) an open_clip tag in
``pretrained`` must already be in the local open_clip / Hugging Face cache (or be a local file),
otherwise configure fails at once with a message saying how to provide the weights.
"""
from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from .alerts import AlertConfig
from .registry import (BACKENDS, DEFAULT_METHOD, DEVICES, METHODS, PRECISIONS, SCORER_ALIASES, SCORERS, canonical_scorer,
                       resolve_precision)
from .roi import parse_roi

__all__ = [
    "ParamSpec", "PARAMETERS", "NodeSettings", "AlertSettings", "ParameterValidationError", "check", "Checked",
    "canonical_scorer", "DEFAULT_SCORER", "SCORER_CHOICES", "ALERT_PREFIX",
    "defaults", "default", "LIVE_PARAMETERS", "UNCALIBRATED_DEFAULT_THRESHOLD", "QOS_CHOICES", "TRANSPORTS",
    "CAMERA_OVERRIDES", "CameraInputs", "camera_parameter", "closest_parameter",
]

#: the scorer parameter's choices: the registry's scorers and their old names (``core.registry.SCORER_ALIASES``:
#: parameter files written with an old name keep working; validation maps it to the new one)
SCORER_CHOICES: Tuple[str, ...] = tuple(SCORERS) + tuple(a for a in SCORER_ALIASES if a not in SCORERS)
#: RUNA's max-cosine scorer (the only one ``default_threshold`` is meaningful for)
DEFAULT_SCORER = "max_cosine"
QOS_CHOICES = ("sensor_data", "reliable")
TRANSPORTS = ("raw", "compressed")
#: parameters applied immediately while the node is active (the rest at the next configure)
LIVE_PARAMETERS = ("publish_annotated", "lazy")

#: Used as ``default_threshold``: an *uncalibrated* guess in RUNA's ``max_cosine`` units (-max cosine) for
#: ViT-B/16 OpenAI weights, where ID boxes typically reach cosine 0.26-0.33 to their prompt.
#: Calibrate (``runa-ood calibrate``) and set ``thresholds_file`` for real use.
UNCALIBRATED_DEFAULT_THRESHOLD = -0.24

#: the single source of the driver-alert defaults (``core.alerts.AlertConfig``)
_ALERT_DEFAULTS = AlertConfig()


def _neg_if_none(v: Optional[float]) -> float:
    """A take-over fraction as a ROS parameter: None (rule disabled) -> -1.0."""
    return -1.0 if v is None else float(v)


class ParameterValidationError(ValueError):
    """One or more parameters are invalid; ``problems`` lists them (``name: message``)."""

    def __init__(self, problems: Sequence[str]):
        self.problems = list(problems)
        super().__init__("invalid parameters:\n  - " + "\n  - ".join(self.problems))


@dataclass(frozen=True)
class ParamSpec:
    """One declared parameter; its type is the type of ``default`` (a list = array of doubles).

    ``lo``/``hi``: closed range (numbers); ``choices``: allowed strings (matched case-insensitively);
    ``nonempty``: a string that must not be empty; ``section``: heading in the generated YAML / README.
    """

    name: str
    default: Any
    description: str
    lo: Optional[float] = None
    hi: Optional[float] = None
    read_only: bool = False
    choices: Tuple[str, ...] = ()
    nonempty: bool = False
    section: str = ""
    string_items: bool = False  # a list default is an array of strings (else of doubles)

    @property
    def kind(self) -> str:
        """``bool``, ``int``, ``float``, ``str``, ``double_array`` or ``string_array``."""
        d = self.default
        if isinstance(d, bool):
            return "bool"
        if isinstance(d, int):
            return "int"
        if isinstance(d, float):
            return "float"
        if isinstance(d, str):
            return "str"
        if isinstance(d, (list, tuple)):
            return "string_array" if self.string_items else "double_array"
        raise TypeError(f"parameter {self.name}: unsupported default {d!r}")

    @property
    def attr(self) -> str:
        """The :class:`NodeSettings` attribute (``health.frame_timeout_s`` -> ``health_frame_timeout_s``)."""
        return self.name.replace(".", "_")

    def describe(self) -> str:
        text = self.description
        if self.choices:
            text += f" One of: {', '.join(self.choices)}."
        if self.read_only:
            text += " Read-only: set at start-up."
        return text


def _section(title: str, *specs: ParamSpec) -> Tuple[ParamSpec, ...]:
    return tuple(dataclasses.replace(s, section=title) for s in specs)


_P = ParamSpec
#: Every parameter of the node: the ONE table. ``config/runa_ood.yaml``, ``config/runa_ood.schema.json``
#: and the README's parameter table are generated from it (``runa-ood params --write``); adding a
#: parameter is one row here (it becomes a ``NodeSettings`` attribute by itself).
PARAMETERS: Tuple[ParamSpec, ...] = (
    *_section(
        "inputs",
        _P("cameras", [], "Camera names: empty = one stream (the topics below). With ['front', 'left'] ONE node "
           "and ONE model serve every camera: per camera C it subscribes to C/<image_topic> and "
           "C/<detections_topic> and publishes C/ood/detections, C/ood/ood_only, C/ood/annotated_image, "
           "C/ood/markers, C/ood/image_annotations; the frames of several cameras are scored in one backend "
           "call; ood/driver_alert and ood/monitor_health stay single (vehicle level, naming the cameras); "
           "/diagnostics has one status per camera. Per-camera overrides: camera.<C>.image_transport, "
           "camera.<C>.image_qos, camera.<C>.detections_qos, camera.<C>.image_queue_size, "
           "camera.<C>.detections_queue_size (default: the value above). Names: letters, digits, '_'.",
           read_only=True, string_items=True),
        _P("image_topic", "image", "Input image topic (relative names follow the node's namespace). With "
           "image_transport=compressed the node subscribes to '<image_topic>/compressed'.", read_only=True,
           nonempty=True),
        _P("detections_topic", "detections", "Input vision_msgs/Detection2DArray topic, stamped with the "
           "stamp of the image the detector ran on.", read_only=True, nonempty=True),
        _P("image_transport", "raw", "raw = sensor_msgs/Image, compressed = sensor_msgs/CompressedImage "
           "(JPEG/PNG).", read_only=True, choices=TRANSPORTS),
        _P("image_qos", "sensor_data", "QoS of the image subscription: sensor_data = best effort (matches "
           "best-effort and reliable publishers), reliable = reliable (matches reliable publishers only).",
           read_only=True, choices=QOS_CHOICES),
        _P("detections_qos", "reliable", "QoS of the detections subscription (see image_qos). Use "
           "sensor_data if your detector publishes best effort.", read_only=True, choices=QOS_CHOICES),
        _P("image_queue_size", 5, "Depth of the image subscription queue (messages).", 1, 1000, read_only=True),
        _P("detections_queue_size", 10, "Depth of the detections subscription queue (messages).", 1, 1000,
           read_only=True),
        _P("pairing_slop_s", 0.0, "Image/detections pairing: 0 = exact header stamps; > 0 = nearest stamp "
           "within this many seconds.", 0.0, 1.0),
        _P("pairing_max_age_s", 2.0, "Give up an image (or detections) still waiting for its partner after "
           "this much stamp time (s); must be >= pairing_slop_s.", 0.01, 60.0),
        _P("pairing_max_future_s", 1.0, "A message stamped more than this (s) after the newest accepted stamp of "
           "either stream is dropped (stamp_in_future) without moving a clock; 3 such messages in a row are a real "
           "clock jump and restart the pairing. Must exceed the camera's frame period.", 0.01, 3600.0),
        _P("pairing_buffer", 30, "Messages buffered per stream while waiting for their partner.", 1, 1000),
        _P("processing_queue_size", 2, "Paired frames waiting to be scored; when full the oldest is dropped "
           "(counted as processing_overload) so the output stays fresh.", 1, 100),
        _P("gather_window_ms", 0.0, "With cameras: once a frame waits, its scoring thread waits up to this long (ms) "
           "for the next frames of its other cameras, to score them in the same backend call (fewer, larger calls; "
           "adds up to this much latency, and a camera that stopped sending costs every batch this wait). 0 = score "
           "what is waiting at once.", 0.0, 100.0),
        _P("scoring_threads", 1, "With cameras: threads scoring frames. The cameras are shared out among them "
           "(camera i to thread i mod n: each camera's frames stay in stamp order on one thread), each thread scores "
           "its cameras' frames in one backend call, and while one thread's backend call runs without Python's "
           "GIL (torch, ONNX Runtime) another prepares its views (OpenCV, numpy) or publishes. 1 = one thread for "
           "every camera. One model either way.", 1, 16),
        _P("max_image_pixels", 16_777_216, "Images with more pixels (raw: declared height x width; compressed: "
           "the JPEG/PNG header) are refused before any allocation or decoding, counted as image_too_large. "
           "Default 4096 x 4096.", 1, 1_073_741_824),
    ),
    *_section(
        "model",
        _P("model", "ViT-B-16", "open_clip ViT architecture (ViT-B-16, ViT-B-32, ViT-L-14, ...).", read_only=True,
           nonempty=True),
        _P("pretrained", "openai", "open_clip pretrained tag (e.g. openai) or a local checkpoint path. "
           "The weights must already be on this machine; start-up fails if they cannot be loaded.",
           read_only=True),
        _P("allow_download", False, "Let open_clip download the weights of a pretrained tag that is not in the "
           "local cache. false (vehicles): the tag must already be cached on this machine (or pretrained is a "
           "local file), else configure fails at once with a message saying how to provide the weights.",
           read_only=True),
        _P("allow_random_weights", False, "Demos/tests only: build random weights when pretrained is empty. "
           "Every output is then marked random_weights=true and the scores are meaningless.", read_only=True),
        _P("projection", "", "Fine-tuned regional projection (name in calibration/ or path); empty = "
           "off-the-shelf projection.", read_only=True),
        _P("backend", "auto", "Visual backend. auto tries tensorrt, then onnxruntime, then torch (logged).",
           read_only=True, choices=BACKENDS),
        _P("device", "cpu", "Torch device for the model.", read_only=True, choices=DEVICES),
        _P("precision", "auto", "Numeric precision of the visual backend (and of the torch model): auto = fp16 "
           "on a CUDA device (the default of `runa-ood build-engine`), fp32 on the CPU. fp16 needs "
           "device=cuda. An engine_path must have been built with the same precision.", read_only=True,
           choices=PRECISIONS),
        _P("engine_path", "", "TensorRT engine file (built beforehand with `runa-ood build-engine`); empty = "
           "the engine cache.", read_only=True),
    ),
    *_section(
        "method",
        _P("method", DEFAULT_METHOD, "OOD method (core/methods/): runa (paper 001, crop + blurred global view per box), "
           "uni-ood (paper 002, crop + masked background per box, needs a trained head), tagood (paper 003 "
           "adapted to detector boxes: one pass of the whole frame, needs a trained head).", read_only=True,
           choices=METHODS),
        _P("head", "", "Trained head of the method (`runa-ood finetune --method M --out DIR`; folder, or name in "
           "calibration/); refused when made for another method, model or label set, or damaged. Empty = none "
           "(runa: the projection parameter, its alias).", read_only=True),
        _P("lam", 0.5, "Fusion weight of the regional view: I = lam*regional + (1-lam)*global (paper: 0.5).",
           0.0, 1.0),
        _P("blur_radius", 1.0, "Gaussian sigma (px at the encoder input size) of the global view's blur "
           "(paper: 1).", 0.0, 50.0),
        _P("scorer", DEFAULT_SCORER, f"Uncertainty score ({DEFAULT_SCORER}: RUNA's -max cosine"
           + "".join(f"; {old} = {new}, its old name" for old, new in SCORER_ALIASES.items()) + ").",
           choices=SCORER_CHOICES),
        _P("temperature", 1.0, "Temperature of the mcm and energy scorers.", 1e-4, 1000.0),
        _P("label_set", "voc", "In-distribution label set: built-in voc, bdd, coco, or a YAML file (path or "
           "name in calibration/)."),
        _P("thresholds_file", "", "Calibrated thresholds YAML (`runa-ood calibrate`), path or name in "
           "calibration/. It records what it was fitted for (model, weights, scorer, ablation, lam, blur, "
           "label set, projection); configure fails when that differs from this node's configuration. Empty = "
           f"use default_threshold for every label (scorer {DEFAULT_SCORER} only: the other scorers need a thresholds "
           "file calibrated for them)."),
        _P("thresholds_allow_mismatch", False, "Use a thresholds_file although it was fitted for another "
           "configuration (or records none): configure then only warns, and /diagnostics reports "
           "thresholds_mismatch. For experiments; re-calibrate for real use."),
        _P("default_threshold", UNCALIBRATED_DEFAULT_THRESHOLD, f"Uncertainty threshold in {DEFAULT_SCORER} units "
           "(-max cosine) used for every label when thresholds_file is empty; a box is OOD when "
           f"uncertainty > threshold. Only valid with scorer={DEFAULT_SCORER}. The default -0.24 is an uncalibrated guess "
           "for ViT-B/16 OpenAI weights: calibrate for real use.", -1e6, 1e6),
        _P("max_boxes", 100, "Score at most this many boxes per frame, highest detector score first; the rest "
           "get status NOT_SCORED. 0 = no cap.", 0, 100000),
        _P("min_box_size", 2.0, "Boxes narrower or shorter than this (original image px, after clipping) get "
           "status TOO_SMALL.", 0.0, 10000.0),
    ),
    *_section(
        "driver alert (message stamp time)",
        _P("alert.k", _ALERT_DEFAULTS.k, "CAUTION when an OOD box is present in >= k of the last n frames.",
           1, 1000),
        _P("alert.n", _ALERT_DEFAULTS.n, "Window (frames) of the k-of-n rule.", 1, 1000),
        _P("alert.takeover_k", _ALERT_DEFAULTS.takeover_k or 0, "TAKE_OVER when the take-over rule holds in >= "
           "takeover_k of the last n frames; 0 = same as alert.k.", 0, 1000),
        _P("alert.hold_s", float(_ALERT_DEFAULTS.hold_s), "Minimum time (s of stamp time) a raised alert level "
           "is kept.", 0.0, 3600.0),
        _P("alert.clear_s", float(_ALERT_DEFAULTS.clear_s), "Time (s) the condition must be absent before the "
           "level is lowered.", 0.0, 3600.0),
        _P("alert.takeover_min_area_frac", _neg_if_none(_ALERT_DEFAULTS.takeover_min_area_frac), "TAKE_OVER "
           "when an OOD box covers at least this fraction of the image area; negative disables.", -1.0, 1.0),
        _P("alert.takeover_min_bottom_frac", _neg_if_none(_ALERT_DEFAULTS.takeover_min_bottom_frac),
           "TAKE_OVER when an OOD box's bottom edge is at or below this fraction of the image height (close "
           "to the vehicle); negative disables.", -1.0, 1.0),
        _P("alert.match_iou", float(_ALERT_DEFAULTS.match_iou), "Boxes of consecutive frames with IoU >= this "
           "are the same object for the k-of-n persistence rule.", 0.01, 1.0),
        _P("alert.use_detection_ids", False, "Associate objects across frames by Detection2D.id instead of "
           "IoU. Only for detectors that publish stable tracking ids; ids that merely number the boxes of a "
           "frame would merge different objects."),
        _P("alert.roi", [], "TAKE_OVER when an OOD box's centre lies in this region, normalised image "
           "coordinates: [x1, y1, x2, y2] rectangle or [x1, y1, x2, y2, x3, y3, ...] polygon (>= 3 points). "
           "Empty = no ROI."),
    ),
    *_section(
        "pipeline health (wall time)",
        _P("health.frame_timeout_s", 1.0, "ood/monitor_health goes to CAUTION when no frame was scored for "
           "this long (s, wall time).", 0.01, 3600.0),
        _P("health.latency_budget_ms", 200.0, "ood/monitor_health goes to CAUTION when the p95 of the "
           "per-frame processing time (ms) exceeds this.", 0.1, 1e6),
        _P("health.liveliness_lease_s", 1.0, "Liveliness lease (s) of ood/driver_alert and ood/monitor_health "
           "(AUTOMATIC liveliness; ood/monitor_health also offers this deadline): subscribers asking for the "
           "same lease / deadline learn within it that the node died, was stopped or hangs. Set at configure.",
           0.05, 3600.0),
        _P("health.heartbeat_period_s", 0.25, "ood/monitor_health is re-published (current level, fresh stamp) "
           "at least this often (s, wall time); must be < health.liveliness_lease_s.", 0.01, 600.0),
    ),
    *_section(
        "transport (messages lost between the publishers and the node)",
        _P("transport.loss_warn_fraction", 0.2, "When at least this share of a stream's messages (image or "
           "detections, per camera) is lost in transport over transport.loss_window_s, the node says so once in "
           "its log and shows a WARN in /diagnostics naming the likely cause (Fast DDS's default transports cut "
           "images into fragments: use config/fastdds_one_host.xml for every process). 0 disables.", 0.0, 1.0),
        _P("transport.loss_window_s", 10.0, "Sliding window (s, wall time) of transport.loss_warn_fraction.",
           1.0, 3600.0),
        _P("transport.max_sequence_gap", 10000, "Largest believable gap between the sequence numbers of two "
           "messages of one publisher (and largest message-lost count accepted from the middleware): a larger "
           "jump is counted as transport.sequence_jumps (a new epoch of that publisher), not as lost messages; "
           "a larger or negative middleware count is rejected and shown as an ERROR.", 1, 1_000_000_000),
    ),
    *_section(
        "outputs",
        _P("publish_annotated", True, "Publish ood/annotated_image, ood/markers and ood/image_annotations "
           "(foxglove_msgs/ImageAnnotations; per camera under C/ with cameras)."),
        _P("lazy", True, "Only draw the annotated image / markers / image annotations while someone subscribes "
           "to them."),
        _P("autostart", True, "Configure and activate at start-up (standalone use without a lifecycle "
           "manager). false = wait for lifecycle transitions.", read_only=True),
    ),
)

_BY_NAME: Dict[str, ParamSpec] = {p.name: p for p in PARAMETERS}
_ALERT_PREFIX = ALERT_PREFIX = "alert."  # the rows that form NodeSettings.alert


def defaults() -> Dict[str, Any]:
    """Parameter name -> default value (arrays as new lists)."""
    return {p.name: list(p.default) if p.kind.endswith("_array") else p.default for p in PARAMETERS}


def default(name: str) -> Any:
    """The default of parameter ``name`` (arrays as tuples): the one place defaults are written."""
    spec = _BY_NAME[name]
    return tuple(spec.default) if spec.kind.endswith("_array") else spec.default


@dataclass(frozen=True)
class AlertSettings:
    """The ``alert.*`` parameters in ``core.alerts.AlertConfig``'s terms (built by :func:`check`).

    ``None`` disables a take-over rule (a negative fraction parameter); ``takeover_k`` None means
    "same as k" (parameter 0); ``roi`` is a polygon of normalised (x, y) points or None (empty)."""

    k: int
    n: int
    hold_s: float
    clear_s: float
    takeover_min_area_frac: Optional[float]
    takeover_min_bottom_frac: Optional[float]
    roi: Optional[Tuple[Tuple[float, float], ...]]
    takeover_k: Optional[int]
    match_iou: float
    use_detection_ids: bool  # node-side: pass Detection2D.id as tracking ids

    def to_alert_config(self) -> AlertConfig:
        return AlertConfig(k=self.k, n=self.n, hold_s=self.hold_s, clear_s=self.clear_s,
                           takeover_min_area_frac=self.takeover_min_area_frac,
                           takeover_min_bottom_frac=self.takeover_min_bottom_frac,
                           roi=None if self.roi is None else [list(p) for p in self.roi],
                           takeover_k=self.takeover_k, match_iou=self.match_iou)


class _SettingsBase:
    """Methods of :class:`NodeSettings` (whose fields are generated from :data:`PARAMETERS`)."""

    @property
    def resolved_precision(self) -> str:
        """``precision`` with ``auto`` resolved for ``device`` (fp16 on CUDA, fp32 on the CPU)."""
        return resolve_precision(self.precision, self.device)

    @property
    def image_topic_resolved(self) -> str:
        """The topic actually subscribed (``<image_topic>/compressed`` for compressed transport)."""
        return self.image_topic + "/compressed" if self.image_transport == "compressed" else self.image_topic

    def check_thresholds(self, scorer) -> List[str]:
        """The thresholds-file check (``core.config.ScorerConfig.check_thresholds`` of :attr:`config`):
        the mismatches (empty: compatible, or no ``thresholds_file``); raises ``ThresholdsMismatchError``
        unless ``thresholds_allow_mismatch``."""
        return self.config.check_thresholds(scorer)


#: input parameters a camera of ``cameras`` may override (``camera.<C>.<name>``); the model is one for all
CAMERA_OVERRIDES = ("image_transport", "image_qos", "detections_qos", "image_queue_size", "detections_queue_size")
_CAMERA_PREFIX = "camera."
_NAME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_")


def camera_parameter(camera: str, name: str) -> str:
    """The ROS name of camera ``camera``'s override of input parameter ``name`` (``camera.front.image_qos``)."""
    return f"{_CAMERA_PREFIX}{camera}.{name}"


@dataclass(frozen=True)
class CameraInputs:
    """One input stream of the node (built by :func:`check`): ``name`` "" = the single stream
    (``cameras`` empty: today's topics); else camera ``name``, whose topics are ``<name>/<topic>``
    and whose outputs are ``<name>/ood/...``."""

    name: str
    image_topic: str
    detections_topic: str
    image_transport: str
    image_qos: str
    detections_qos: str
    image_queue_size: int
    detections_queue_size: int

    @property
    def prefix(self) -> str:
        """``""`` or ``"<name>/"``: prepended to the node's relative topic names."""
        return f"{self.name}/" if self.name else ""

    @property
    def image_topic_resolved(self) -> str:
        """The image topic actually subscribed (``<image_topic>/compressed`` for compressed transport)."""
        return self.image_topic + "/compressed" if self.image_transport == "compressed" else self.image_topic


def _camera_inputs(v: Mapping[str, Any], overrides: Mapping[str, Any], problems: List[str]) -> Tuple[CameraInputs, ...]:
    """The node's input streams from the checked values ``v`` and the ``camera.<C>.<name>`` overrides."""
    cams = list(v["cameras"])
    for key in sorted(overrides):
        cam, _, name = key[len(_CAMERA_PREFIX):].rpartition(".")
        if cam not in cams:
            problems.append(f"{key}: {cam!r} is not in cameras {cams}")
        elif name not in CAMERA_OVERRIDES:
            problems.append(f"{key}: only {', '.join(CAMERA_OVERRIDES)} can be set per camera"
                            + (f" (did you mean {camera_parameter(cam, closest_parameter(name, CAMERA_OVERRIDES))}?)"
                               if closest_parameter(name, CAMERA_OVERRIDES) else ""))
    out = []
    for cam in cams or [""]:
        vals = {}
        for name in CAMERA_OVERRIDES:
            key = camera_parameter(cam, name)
            vals[name] = v[name]
            if cam and key in overrides:
                vals[name] = _check_value(dataclasses.replace(_BY_NAME[name], name=key), overrides[key], problems)
        prefix = f"{cam}/" if cam else ""
        out.append(CameraInputs(name=cam, image_topic=prefix + v["image_topic"],
                                detections_topic=prefix + v["detections_topic"], **vals))
    return tuple(out)


def closest_parameter(name: str, names: Sequence[str]) -> Optional[str]:
    """The name in ``names`` closest to ``name`` (difflib), or None when none is close; a name whose
    prefix is wrong (``alrt.k``, ``k``) is matched on its last component too."""
    import difflib

    names = list(names)
    hit = difflib.get_close_matches(name, names, n=1, cutoff=0.6)
    if hit:
        return hit[0]
    shorts: Dict[str, str] = {}
    for n in names:
        shorts.setdefault(n.rpartition(".")[2], n)
    hit = difflib.get_close_matches(name.rpartition(".")[2], list(shorts), n=1, cutoff=0.6)
    return shorts[hit[0]] if hit else None


def _settings_default(spec: ParamSpec):
    if spec.kind.endswith("_array"):
        return field(default_factory=lambda: tuple(spec.default))
    return field(default=spec.default)


#: Validated node settings: one attribute per :data:`PARAMETERS` row (``spec.attr``) except the
#: ``alert.*`` rows, which form ``alert`` (:class:`AlertSettings`); ``inputs`` the camera streams;
#: ``config`` the scorer's typed configuration (``core.config.ScorerConfig``, its files loaded; None
#: when validated without files). Defaults are the table's. Built by ``core.config.validate``.
NodeSettings = dataclasses.make_dataclass(
    "NodeSettings",
    [(p.attr, Any, _settings_default(p)) for p in PARAMETERS if not p.name.startswith(_ALERT_PREFIX)]
    + [("alert", AlertSettings, field(default_factory=lambda: check({}).alert)),
       ("inputs", Tuple[CameraInputs, ...], field(default_factory=lambda: check({}).inputs)),
       ("config", Any, field(default=None, compare=False))],
    bases=(_SettingsBase,), frozen=True)
NodeSettings.__module__ = __name__
NodeSettings.__doc__ = """Validated node settings (see :data:`PARAMETERS` for meanings and units)."""


# ------------------------------------------------------------------------------------ validation
@dataclass
class Checked:
    """What :func:`check` made of raw values: ``values`` (name -> checked value, a bad one replaced by
    its default), ``alert``, ``inputs`` and every ``problems`` found (``name: message``)."""

    values: Dict[str, Any]
    alert: AlertSettings
    inputs: Tuple[CameraInputs, ...]
    problems: List[str]


def check(values: Optional[Mapping[str, Any]] = None) -> Checked:
    """Check raw parameter values against the table (missing names take their defaults): each value's
    type, range and choices, and the rules between parameters that hold for every user (pairing,
    health, weights, precision, alert, cameras). Files are not read and the rules a running node adds
    (a method's head, a scorer's thresholds) are ``core.config.validate``'s; nothing is raised here.

    Args:
        values: parameter name -> value (ROS names, e.g. ``"alert.k"``; per-camera overrides
            ``camera.<C>.<name>`` for the :data:`CAMERA_OVERRIDES` of a camera in ``cameras``).
    """
    raw = defaults()
    values = dict(values or {})
    overrides = {k: values.pop(k) for k in list(values) if k.startswith(_CAMERA_PREFIX)}
    unknown = sorted(set(values) - set(raw))
    raw.update(values)
    problems: List[str] = [f"{n}: unknown parameter" for n in unknown]
    v: Dict[str, Any] = {spec.name: _check_value(spec, raw[spec.name], problems) for spec in PARAMETERS}
    v["scorer"] = canonical_scorer(v["scorer"])

    if v["pairing_max_age_s"] < v["pairing_slop_s"]:
        problems.append(f"pairing_max_age_s: {v['pairing_max_age_s']} must be >= pairing_slop_s ({v['pairing_slop_s']})")
    if v["health.heartbeat_period_s"] >= v["health.liveliness_lease_s"]:
        problems.append(f"health.heartbeat_period_s: {v['health.heartbeat_period_s']} must be < "
                        f"health.liveliness_lease_s ({v['health.liveliness_lease_s']})")
    if not v["pretrained"] and not v["allow_random_weights"]:
        problems.append("pretrained: empty (no weights) requires allow_random_weights=true, which is for "
                        "demos and tests only; give an open_clip tag or a local checkpoint path")
    try:
        resolve_precision(v["precision"], v["device"])
    except ValueError as exc:
        problems.append(f"precision: {exc}")
    alert = _alert_settings(v, problems)
    inputs = _camera_inputs(v, overrides, problems)
    if v["engine_path"] and not os.path.isfile(os.path.expanduser(v["engine_path"])):
        problems.append(f"engine_path: file not found: {v['engine_path']} (build it with `runa-ood build-engine`)")
    return Checked(v, alert, inputs, problems)


def _alert_settings(v: Mapping[str, Any], problems: List[str]) -> AlertSettings:
    """The ``alert.*`` values as :class:`AlertSettings` (their rules reported in ``problems``)."""
    k, n, tk = v["alert.k"], v["alert.n"], v["alert.takeover_k"]
    if k > n:
        problems.append(f"alert.k: {k} must be <= alert.n ({n})")
    if tk > n:
        problems.append(f"alert.takeover_k: {tk} must be <= alert.n ({n}) (0 = same as alert.k)")
    try:
        roi = parse_roi(v["alert.roi"])
    except ValueError as exc:
        problems.append(f"alert.roi: {exc}")
        roi = None
    area, bottom = v["alert.takeover_min_area_frac"], v["alert.takeover_min_bottom_frac"]
    return AlertSettings(
        k=k, n=n, hold_s=v["alert.hold_s"], clear_s=v["alert.clear_s"],
        takeover_min_area_frac=None if area < 0 else area, takeover_min_bottom_frac=None if bottom < 0 else bottom,
        roi=None if roi is None else tuple(roi), takeover_k=tk or None, match_iou=v["alert.match_iou"],
        use_detection_ids=v["alert.use_detection_ids"])


def _check_value(spec: ParamSpec, value: Any, problems: List[str]) -> Any:
    """``value`` checked against ``spec`` (type, range, choices); a bad value is reported in
    ``problems`` and replaced by the default so that later rules still run."""
    name, kind = spec.name, spec.kind

    def bad(msg):
        problems.append(f"{name}: {msg}")
        return tuple(spec.default) if kind.endswith("_array") else spec.default

    if kind == "bool":
        return value if isinstance(value, bool) else bad(f"must be true or false, got {value!r}")
    if kind in ("int", "float"):
        integer = kind == "int"
        if isinstance(value, bool) or not isinstance(value, (int, float)) or (
                integer and math.isfinite(value) and float(value) != int(value)):
            return bad(f"must be {'an integer' if integer else 'a number'}, got {value!r}")
        if not math.isfinite(value):
            return bad(f"must be finite, got {value!r}")
        value = int(value) if integer else float(value)
        if (spec.lo is not None and value < spec.lo) or (spec.hi is not None and value > spec.hi):
            return bad(f"{value!r} is outside [{spec.lo:g}, {spec.hi:g}]")
        return value
    if kind == "string_array":  # camera names: ROS name tokens, unique
        if value is None:
            return ()
        if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
            return bad(f"must be a list of names, got {value!r}")
        vals = [x.strip() if isinstance(x, str) else x for x in value]
        wrong = [x for x in vals if not isinstance(x, str) or not x or x[0].isdigit() or set(x) - _NAME_CHARS]
        if wrong:
            return bad(f"{wrong!r}: each name must be letters, digits and '_' (not starting with a digit)")
        if len(set(vals)) != len(vals):
            return bad(f"duplicate names in {vals!r}")
        return tuple(vals)
    if kind == "double_array":
        if value is None:
            return ()
        if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
            return bad(f"must be a list of numbers, got {value!r}")
        vals = list(value)
        if not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in vals):
            return bad(f"must be a list of numbers, got {value!r}")
        return tuple(float(x) for x in vals)
    # strings
    if value is None:
        value = ""
    if not isinstance(value, str):
        return bad(f"must be a string, got {value!r}")
    value = value.strip()
    if spec.choices:
        if value.lower() not in spec.choices:
            return bad(f"{value!r} is not one of {list(spec.choices)}")
        return value.lower()
    if spec.nonempty and not value:
        return bad("must not be empty")
    return value
