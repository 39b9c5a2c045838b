"""Parameters of the runa_ood node: declarations, validation, and the settings they produce.

Every parameter is declared with a ``ParameterDescriptor`` (description, range, read-only flag)
from the single table :data:`PARAMETERS`; :func:`validate` turns the raw values into a frozen
:class:`NodeSettings` or raises :class:`ParameterValidationError` listing *every* problem at once.
The validation is plain Python (no rclpy), so it is unit-tested without DDS and shared with tools.

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
chosen scorer (``runa``: ``-max cosine``, higher = more OOD; a box is OOD when
``uncertainty > threshold``). ``default_threshold`` is in ``runa`` units only: any other scorer
needs a ``thresholds_file`` calibrated for it (``runa-ood calibrate --scorer <name>``), else
validation fails.

Vehicle start-up never downloads: with ``allow_download=false`` (default) an open_clip tag in
``pretrained`` must already be in the local open_clip / Hugging Face cache (or be a local file),
otherwise configure fails at once with a message saying how to provide the weights.
"""
from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from ..core.alerts import AlertConfig

__all__ = [
    "ParamSpec", "PARAMETERS", "NodeSettings", "AlertSettings", "ParameterValidationError", "validate",
    "defaults", "declare_parameters", "read_parameters", "SCORERS", "BACKENDS", "DEVICES", "QOS_CHOICES",
    "TRANSPORTS", "LIVE_PARAMETERS", "PRECISIONS", "resolve_precision",
]

SCORERS = ("runa", "mcm", "energy", "sum")
BACKENDS = ("auto", "tensorrt", "onnxruntime", "torch")
DEVICES = ("cpu", "cuda")
QOS_CHOICES = ("sensor_data", "reliable")
TRANSPORTS = ("raw", "compressed")
PRECISIONS = ("auto", "fp32", "fp16")
#: parameters applied immediately while the node is active (the rest at the next configure)
LIVE_PARAMETERS = ("publish_annotated", "lazy")

#: Used as ``default_threshold``: an *uncalibrated* guess in ``runa`` units (-max cosine) for
#: ViT-B/16 OpenAI weights, where ID boxes typically reach cosine 0.26-0.33 to their prompt.
#: Calibrate (``runa-ood calibrate``) and set ``thresholds_file`` for real use.
UNCALIBRATED_DEFAULT_THRESHOLD = -0.24

#: the single source of the driver-alert defaults (``core.alerts.AlertConfig``)
_ALERT_DEFAULTS = AlertConfig()


def _neg_if_none(v: Optional[float]) -> float:
    """A take-over fraction as a ROS parameter: None (rule disabled) -> -1.0."""
    return -1.0 if v is None else float(v)


def resolve_precision(precision: str, device: str) -> str:
    """``auto`` -> ``fp16`` on a CUDA device, ``fp32`` on the CPU; other values unchanged."""
    if precision == "auto":
        return "fp16" if device == "cuda" else "fp32"
    return precision


class ParameterValidationError(ValueError):
    """One or more parameters are invalid; ``problems`` lists them (``name: message``)."""

    def __init__(self, problems: Sequence[str]):
        self.problems = list(problems)
        super().__init__("invalid parameters:\n  - " + "\n  - ".join(self.problems))


@dataclass(frozen=True)
class ParamSpec:
    """One declared parameter. ``lo``/``hi`` give a closed range (numbers only)."""

    name: str
    default: Any
    description: str
    lo: Optional[float] = None
    hi: Optional[float] = None
    read_only: bool = False
    choices: Tuple[str, ...] = ()
    type_name: str = ""  # "double_array" for array parameters without a default

    def describe(self) -> str:
        text = self.description
        if self.choices:
            text += f" One of: {', '.join(self.choices)}."
        if self.read_only:
            text += " Read-only: set at start-up."
        return text


_P = ParamSpec
#: Every parameter of the node, in the order of config/runa_ood.yaml.
PARAMETERS: Tuple[ParamSpec, ...] = (
    # ---- inputs
    _P("image_topic", "image", "Input image topic (relative names follow the node's namespace). With "
       "image_transport=compressed the node subscribes to '<image_topic>/compressed'.", read_only=True),
    _P("detections_topic", "detections", "Input vision_msgs/Detection2DArray topic, stamped with the "
       "stamp of the image the detector ran on.", read_only=True),
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
    # ---- model
    _P("model", "ViT-B-16", "open_clip ViT architecture (ViT-B-16, ViT-B-32, ViT-L-14, ...).", read_only=True),
    _P("pretrained", "openai", "open_clip pretrained tag (e.g. openai) or a local checkpoint path. "
       "The weights must already be on this machine; start-up fails if they cannot be loaded.",
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
    _P("allow_download", False, "Let open_clip download the weights of a pretrained tag that is not in the "
       "local cache. false (vehicles): the tag must already be cached on this machine (or pretrained is a "
       "local file), else configure fails at once with a message saying how to provide the weights.",
       read_only=True),
    # ---- method
    _P("lam", 0.5, "Fusion weight of the regional view: I = lam*regional + (1-lam)*global (paper: 0.5).",
       0.0, 1.0),
    _P("blur_radius", 1.0, "Gaussian sigma (px at the encoder input size) of the global view's blur "
       "(paper: 1).", 0.0, 50.0),
    _P("scorer", "runa", "Uncertainty score.", choices=SCORERS),
    _P("temperature", 1.0, "Temperature of the mcm and energy scorers.", 1e-4, 1000.0),
    _P("label_set", "voc", "In-distribution label set: built-in voc, bdd, coco, or a YAML file (path or "
       "name in calibration/)."),
    _P("thresholds_file", "", "Calibrated thresholds YAML (`runa-ood calibrate`), path or name in "
       "calibration/. Empty = use default_threshold for every label (scorer runa only: the other "
       "scorers need a thresholds file calibrated for them)."),
    _P("default_threshold", UNCALIBRATED_DEFAULT_THRESHOLD, "Uncertainty threshold in runa units (-max "
       "cosine) used for every label when thresholds_file is empty; a box is OOD when "
       "uncertainty > threshold. Only valid with scorer=runa. The default -0.24 is an uncalibrated guess "
       "for ViT-B/16 OpenAI weights: calibrate for real use.", -1e6, 1e6),
    _P("max_boxes", 100, "Score at most this many boxes per frame, highest detector score first; the rest "
       "get status NOT_SCORED. 0 = no cap.", 0, 100000),
    _P("min_box_size", 2.0, "Boxes narrower or shorter than this (original image px, after clipping) get "
       "status TOO_SMALL.", 0.0, 10000.0),
    # ---- alerts (message stamps, not wall time)
    _P("alert.k", _ALERT_DEFAULTS.k, "CAUTION when an OOD box is present in >= k of the last n frames.", 1, 1000),
    _P("alert.n", _ALERT_DEFAULTS.n, "Window (frames) of the k-of-n rule.", 1, 1000),
    _P("alert.takeover_k", _ALERT_DEFAULTS.takeover_k or 0, "TAKE_OVER when the take-over rule holds in >= "
       "takeover_k of the last n frames; 0 = same as alert.k.", 0, 1000),
    _P("alert.hold_s", float(_ALERT_DEFAULTS.hold_s), "Minimum time (s of stamp time) a raised alert level is "
       "kept.", 0.0, 3600.0),
    _P("alert.clear_s", float(_ALERT_DEFAULTS.clear_s), "Time (s) the condition must be absent before the "
       "level is lowered.", 0.0, 3600.0),
    _P("alert.takeover_min_area_frac", _neg_if_none(_ALERT_DEFAULTS.takeover_min_area_frac), "TAKE_OVER when "
       "an OOD box covers at least this fraction of the image area; negative disables.", -1.0, 1.0),
    _P("alert.takeover_min_bottom_frac", _neg_if_none(_ALERT_DEFAULTS.takeover_min_bottom_frac), "TAKE_OVER "
       "when an OOD box's bottom edge is at or below this fraction of the image height (close to the "
       "vehicle); negative disables.", -1.0, 1.0),
    _P("alert.match_iou", float(_ALERT_DEFAULTS.match_iou), "Boxes of consecutive frames with IoU >= this "
       "are the same object for the k-of-n persistence rule.", 0.01, 1.0),
    _P("alert.use_detection_ids", False, "Associate objects across frames by Detection2D.id instead of IoU. "
       "Only for detectors that publish stable tracking ids; ids that merely number the boxes of a frame "
       "would merge different objects."),
    _P("alert.roi", None, "TAKE_OVER when an OOD box's centre lies in this region, normalised image "
       "coordinates: [x1, y1, x2, y2] rectangle or [x1, y1, x2, y2, x3, y3, ...] polygon (>= 3 points). "
       "Unset = no ROI.", type_name="double_array"),
    # ---- health (wall time)
    _P("health.frame_timeout_s", 1.0, "ood/monitor_health goes to CAUTION when no frame was scored for "
       "this long (s, wall time).", 0.01, 3600.0),
    _P("health.latency_budget_ms", 200.0, "ood/monitor_health goes to CAUTION when the p95 of the "
       "per-frame processing time (ms) exceeds this.", 0.1, 1e6),
    # ---- outputs
    _P("publish_annotated", True, "Publish ood/annotated_image and ood/markers."),
    _P("lazy", True, "Only draw the annotated image / markers while someone subscribes to them."),
    _P("autostart", True, "Configure and activate at start-up (standalone use without a lifecycle "
       "manager). false = wait for lifecycle transitions.", read_only=True),
)

_BY_NAME: Dict[str, ParamSpec] = {p.name: p for p in PARAMETERS}


def defaults() -> Dict[str, Any]:
    """Parameter name -> default value."""
    return {p.name: p.default for p in PARAMETERS}


@dataclass(frozen=True)
class AlertSettings:
    """Arguments of ``core.alerts.AlertConfig``, whose defaults they take (single source).

    ``None`` disables a take-over rule; ``takeover_k`` None means "same as k"; ``roi`` is a polygon
    of normalised (x, y) points or None."""

    k: int = _ALERT_DEFAULTS.k
    n: int = _ALERT_DEFAULTS.n
    hold_s: float = _ALERT_DEFAULTS.hold_s
    clear_s: float = _ALERT_DEFAULTS.clear_s
    takeover_min_area_frac: Optional[float] = _ALERT_DEFAULTS.takeover_min_area_frac
    takeover_min_bottom_frac: Optional[float] = _ALERT_DEFAULTS.takeover_min_bottom_frac
    roi: Optional[Tuple[Tuple[float, float], ...]] = None  # polygon, or None
    takeover_k: Optional[int] = _ALERT_DEFAULTS.takeover_k
    match_iou: float = _ALERT_DEFAULTS.match_iou
    use_detection_ids: bool = False  # node-side: pass Detection2D.id as tracking ids

    def to_alert_config(self) -> AlertConfig:
        return AlertConfig(k=self.k, n=self.n, hold_s=self.hold_s, clear_s=self.clear_s,
                           takeover_min_area_frac=self.takeover_min_area_frac,
                           takeover_min_bottom_frac=self.takeover_min_bottom_frac,
                           roi=None if self.roi is None else [list(p) for p in self.roi],
                           takeover_k=self.takeover_k, match_iou=self.match_iou)


@dataclass(frozen=True)
class NodeSettings:
    """Validated node settings (see :data:`PARAMETERS` for meanings and units)."""

    image_topic: str = "image"
    detections_topic: str = "detections"
    image_transport: str = "raw"
    image_qos: str = "sensor_data"
    detections_qos: str = "reliable"
    image_queue_size: int = 5
    detections_queue_size: int = 10
    pairing_slop_s: float = 0.0
    pairing_max_age_s: float = 2.0
    pairing_max_future_s: float = 1.0
    pairing_buffer: int = 30
    processing_queue_size: int = 2
    model: str = "ViT-B-16"
    pretrained: str = "openai"
    allow_random_weights: bool = False
    projection: str = ""
    backend: str = "auto"
    device: str = "cpu"
    precision: str = "auto"
    engine_path: str = ""
    allow_download: bool = False
    lam: float = 0.5
    blur_radius: float = 1.0
    scorer: str = "runa"
    temperature: float = 1.0
    label_set: str = "voc"
    thresholds_file: str = ""
    default_threshold: float = UNCALIBRATED_DEFAULT_THRESHOLD
    max_boxes: int = 100
    min_box_size: float = 2.0
    alert: AlertSettings = field(default_factory=AlertSettings)
    health_frame_timeout_s: float = 1.0
    health_latency_budget_ms: float = 200.0
    publish_annotated: bool = True
    lazy: bool = True
    autostart: bool = True

    @property
    def resolved_precision(self) -> str:
        """``precision`` with ``auto`` resolved for ``device`` (fp16 on CUDA, fp32 on the CPU)."""
        return resolve_precision(self.precision, self.device)

    @property
    def image_topic_resolved(self) -> str:
        """The topic actually subscribed (``<image_topic>/compressed`` for compressed transport)."""
        return self.image_topic + "/compressed" if self.image_transport == "compressed" else self.image_topic

    def scorer_config(self) -> Dict[str, Any]:
        """The dict for ``core.pipeline.OodScorer.from_config`` (thresholds excluded: see
        :meth:`thresholds`)."""
        cfg: Dict[str, Any] = {
            "model": self.model,
            "pretrained": self.pretrained or None,
            "device": self.device,
            "precision": self.resolved_precision,
            "allow_random": self.allow_random_weights,
            "allow_download": self.allow_download,
            "label_set": self.label_set,
            "projection": self.projection or None,
            "scorer": self.scorer,
            "lam": self.lam,
            "blur_radius": self.blur_radius,
            "max_boxes": self.max_boxes,
            "min_box_size": self.min_box_size,
            "temperature": self.temperature,
            "backend": self.backend,
        }
        if self.backend != "torch":  # keyword arguments of backends.base.make_backend
            cfg["backend_options"] = {"device": self.device}
            if self.engine_path:
                cfg["backend_options"]["engine_path"] = self.engine_path
        return cfg

    def thresholds(self):
        """``core.thresholds.Thresholds`` from ``thresholds_file``, or a global
        ``default_threshold`` when the file parameter is empty.

        Raises FileNotFoundError / ThresholdsFileError (ValueError) for a missing or bad file."""
        from ..core.thresholds import Thresholds

        if self.thresholds_file:
            from ..core.paths import resolve_calibration_file

            return Thresholds.load(resolve_calibration_file(self.thresholds_file, (".yaml", ".yml", ".json")))
        return Thresholds(global_threshold=self.default_threshold,
                          meta={"source": "default_threshold parameter (uncalibrated)"})

    def as_dict(self) -> Dict[str, Any]:
        return asdict(self)


# ------------------------------------------------------------------------------------ validation
def _parse_roi(values, problems: List[str]):
    if values is None:
        return None
    vals = [float(v) for v in values]
    if not vals:
        return None
    if len(vals) == 4:
        x1, y1, x2, y2 = vals
        if not (x2 > x1 and y2 > y1):
            problems.append(f"alert.roi: rectangle [x1, y1, x2, y2] needs x2 > x1 and y2 > y1, got {vals}")
            return None
        pts = ((x1, y1), (x2, y1), (x2, y2), (x1, y2))
    elif len(vals) >= 6 and len(vals) % 2 == 0:
        pts = tuple((vals[i], vals[i + 1]) for i in range(0, len(vals), 2))
    else:
        problems.append(f"alert.roi: expected 4 values (rectangle) or an even number >= 6 (polygon), got {len(vals)}")
        return None
    if not all(math.isfinite(c) and 0.0 <= c <= 1.0 for p in pts for c in p):
        problems.append(f"alert.roi: coordinates are normalised to the image and must be in [0, 1], got {vals}")
        return None
    return pts


def validate(values: Optional[Mapping[str, Any]] = None, check_files: bool = True) -> NodeSettings:
    """Validate raw parameter values (missing names take their defaults) into :class:`NodeSettings`.

    Args:
        values: parameter name -> value (ROS names, e.g. ``"alert.k"``).
        check_files: also check that ``label_set`` / ``thresholds_file`` / ``projection`` /
            ``engine_path`` exist and parse (label sets and thresholds are read; cheap).

    Raises:
        ParameterValidationError: listing every invalid parameter with the reason.
    """
    raw = defaults()
    unknown = sorted(set(values or {}) - set(raw))
    raw.update(values or {})
    problems: List[str] = [f"{n}: unknown parameter" for n in unknown]

    def text(name) -> str:
        v = raw[name]
        if v is None:
            return ""
        if not isinstance(v, str):
            problems.append(f"{name}: must be a string, got {v!r}")
            return str(_BY_NAME[name].default)
        return v.strip()

    def number(name, integer=False):
        spec = _BY_NAME[name]
        v = raw[name]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or (integer and float(v) != int(v)):
            problems.append(f"{name}: must be {'an integer' if integer else 'a number'}, got {v!r}")
            return spec.default
        v = int(v) if integer else float(v)
        if not math.isfinite(v):
            problems.append(f"{name}: must be finite, got {v!r}")
            return spec.default
        if (spec.lo is not None and v < spec.lo) or (spec.hi is not None and v > spec.hi):
            problems.append(f"{name}: {v!r} is outside [{spec.lo:g}, {spec.hi:g}]")
        return v

    def flag(name) -> bool:
        v = raw[name]
        if not isinstance(v, bool):
            problems.append(f"{name}: must be true or false, got {v!r}")
            return bool(_BY_NAME[name].default)
        return v

    def choice(name) -> str:
        v = text(name).lower()
        choices = _BY_NAME[name].choices
        if v not in choices:
            problems.append(f"{name}: {raw[name]!r} is not one of {list(choices)}")
            return _BY_NAME[name].default
        return v

    for name in ("image_topic", "detections_topic", "model"):
        if not text(name):
            problems.append(f"{name}: must not be empty")

    s: Dict[str, Any] = dict(
        image_topic=text("image_topic"), detections_topic=text("detections_topic"),
        image_transport=choice("image_transport"), image_qos=choice("image_qos"),
        detections_qos=choice("detections_qos"), image_queue_size=number("image_queue_size", True),
        detections_queue_size=number("detections_queue_size", True), pairing_slop_s=number("pairing_slop_s"),
        pairing_max_age_s=number("pairing_max_age_s"), pairing_max_future_s=number("pairing_max_future_s"),
        pairing_buffer=number("pairing_buffer", True),
        processing_queue_size=number("processing_queue_size", True), model=text("model"),
        pretrained=text("pretrained"), allow_random_weights=flag("allow_random_weights"),
        projection=text("projection"), backend=choice("backend"), device=choice("device"),
        precision=choice("precision"), engine_path=text("engine_path"), allow_download=flag("allow_download"),
        lam=number("lam"), blur_radius=number("blur_radius"),
        scorer=choice("scorer"), temperature=number("temperature"), label_set=text("label_set"),
        thresholds_file=text("thresholds_file"), default_threshold=number("default_threshold"),
        max_boxes=number("max_boxes", True), min_box_size=number("min_box_size"),
        health_frame_timeout_s=number("health.frame_timeout_s"),
        health_latency_budget_ms=number("health.latency_budget_ms"),
        publish_annotated=flag("publish_annotated"), lazy=flag("lazy"), autostart=flag("autostart"),
    )
    if s["pairing_max_age_s"] < s["pairing_slop_s"]:
        problems.append(f"pairing_max_age_s: {s['pairing_max_age_s']} must be >= pairing_slop_s ({s['pairing_slop_s']})")
    if not s["pretrained"] and not s["allow_random_weights"]:
        problems.append("pretrained: empty (no weights) requires allow_random_weights=true, which is for "
                        "demos and tests only; give an open_clip tag or a local checkpoint path")

    if s["precision"] == "fp16" and s["device"] != "cuda":
        problems.append("precision: fp16 needs device=cuda (CPU inference runs in fp32); use precision auto or fp32")
    if s["scorer"] != "runa" and not s["thresholds_file"]:
        problems.append(f"thresholds_file: scorer {s['scorer']!r} needs a thresholds file calibrated for it "
                        f"(`runa-ood calibrate --scorer {s['scorer']}`); default_threshold is in runa units "
                        "(-max cosine) and means nothing for other scorers")

    k, n = number("alert.k", True), number("alert.n", True)
    tk = number("alert.takeover_k", True)
    if isinstance(k, int) and isinstance(n, int) and k > n:
        problems.append(f"alert.k: {k} must be <= alert.n ({n})")
    if isinstance(tk, int) and isinstance(n, int) and tk > n:
        problems.append(f"alert.takeover_k: {tk} must be <= alert.n ({n}) (0 = same as alert.k)")
    area, bottom = number("alert.takeover_min_area_frac"), number("alert.takeover_min_bottom_frac")
    s["alert"] = AlertSettings(
        k=k, n=n, hold_s=number("alert.hold_s"), clear_s=number("alert.clear_s"),
        takeover_min_area_frac=None if area < 0 else area, takeover_min_bottom_frac=None if bottom < 0 else bottom,
        roi=_parse_roi(raw["alert.roi"], problems) if raw["alert.roi"] is not None else None,
        takeover_k=tk if tk else None, match_iou=number("alert.match_iou"),
        use_detection_ids=flag("alert.use_detection_ids"))

    if check_files:
        _check_files(s, problems)
    if problems:
        raise ParameterValidationError(problems)
    return NodeSettings(**s)


def _check_files(s: Dict[str, Any], problems: List[str]) -> None:
    from ..core.labels import load_label_set

    try:
        load_label_set(s["label_set"])
    except (ValueError, OSError) as exc:
        problems.append(f"label_set: {exc}")
    if s["thresholds_file"]:
        from ..core.paths import resolve_calibration_file
        from ..core.thresholds import Thresholds

        try:
            Thresholds.load(resolve_calibration_file(s["thresholds_file"], (".yaml", ".yml", ".json")))
        except FileNotFoundError as exc:
            problems.append(f"thresholds_file: {exc}")
        except (ValueError, OSError) as exc:
            problems.append(f"thresholds_file: {exc}")
    if s["engine_path"] and not os.path.isfile(os.path.expanduser(s["engine_path"])):
        problems.append(f"engine_path: file not found: {s['engine_path']} (build it with `runa-ood build-engine`)")


# ------------------------------------------------------------------------------------ rclpy glue
def _descriptor(spec: ParamSpec):
    from rcl_interfaces.msg import FloatingPointRange, IntegerRange, ParameterDescriptor, ParameterType

    d = ParameterDescriptor(name=spec.name, description=spec.describe(), read_only=spec.read_only)
    if spec.choices:
        d.additional_constraints = f"one of: {', '.join(spec.choices)}"
    if isinstance(spec.default, bool):
        d.type = ParameterType.PARAMETER_BOOL
    elif isinstance(spec.default, int):
        d.type = ParameterType.PARAMETER_INTEGER
        if spec.lo is not None:
            d.integer_range = [IntegerRange(from_value=int(spec.lo), to_value=int(spec.hi), step=0)]
    elif isinstance(spec.default, float):
        d.type = ParameterType.PARAMETER_DOUBLE
        if spec.lo is not None:
            d.floating_point_range = [FloatingPointRange(from_value=float(spec.lo), to_value=float(spec.hi), step=0.0)]
    elif isinstance(spec.default, str):
        d.type = ParameterType.PARAMETER_STRING
    elif spec.type_name == "double_array":
        d.type = ParameterType.PARAMETER_DOUBLE_ARRAY
    return d


def declare_parameters(node) -> None:
    """Declare every parameter of :data:`PARAMETERS` on ``node`` (an rclpy Node)."""
    from rclpy.parameter import Parameter

    for spec in PARAMETERS:
        if node.has_parameter(spec.name):
            continue
        default = spec.default
        if default is None and spec.type_name == "double_array":
            default = Parameter.Type.DOUBLE_ARRAY  # declared without value: "unset"
        node.declare_parameter(spec.name, default, _descriptor(spec))


def read_parameters(node) -> Dict[str, Any]:
    """Current values of every declared parameter (unset arrays -> None)."""
    out = {}
    for spec in PARAMETERS:
        try:
            v = node.get_parameter(spec.name).value
        except Exception:  # ParameterUninitializedException: an array declared without value
            v = None
        if spec.type_name == "double_array" and v is not None:
            v = list(v)
        out[spec.name] = v
    return out
