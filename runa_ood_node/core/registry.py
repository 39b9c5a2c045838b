"""The names the rooms share, each defined once (ROS-free, no torch).

Everything that lists scorers, ablations, backends, precisions, box statuses or alert levels
(node parameters, tool arguments, the alert monitor, message conversion, drawing, reports) imports
them from here instead of writing its own copy:

* :data:`SCORERS` (``core.scoring`` implements them), :data:`ABLATIONS` and
  :data:`VIEWS_FOR_ABLATION` (``core.pipeline``), :data:`BACKENDS`, :data:`PRECISIONS`,
  :data:`DEVICES`;
* :class:`BoxStatus` (defined in ``core.boxes``) and :class:`AlertLevel` (``core.alerts``), re-exported
  with their names as tuples (:data:`BOX_STATUSES`, :data:`ALERT_LEVELS`). The message constants
  (``OodDetection.STATUS_*``, ``DriverAlert.LEVEL_*``) mirror these codes;
* :func:`resolve_device` and :func:`resolve_precision`: how ``auto`` becomes a concrete device /
  precision, for the node and the tools alike.
"""
from __future__ import annotations

from typing import Dict, Optional, Tuple

from .alerts import AlertLevel
from .boxes import STATUS_TEXT, BoxStatus

__all__ = ["METHODS", "DEFAULT_METHOD", "SCORERS", "TEMPERATURE_SCORERS", "ABLATIONS", "VIEWS", "PER_IMAGE_VIEWS",
           "BACKBONE_OUTPUTS", "VIEWS_FOR_ABLATION", "SCORER_ALIASES", "canonical_scorer", "BACKENDS", "PRECISIONS", "DEVICES",
           "BoxStatus", "STATUS_TEXT", "BOX_STATUSES", "AlertLevel", "ALERT_LEVELS", "resolve_device",
           "resolve_precision"]

#: uncertainty scores (``core.scoring.score(method=...)``); ``max_cosine`` (-max cosine) is RUNA's paper's (Eq. 6)
SCORERS: Tuple[str, ...] = ("max_cosine", "mcm", "energy", "sum")
#: old scorer names -> their names now (parameter and thresholds files written with the old name keep working):
#: ``runa`` was both a method and this scorer's name
SCORER_ALIASES: Dict[str, str] = {"runa": "max_cosine"}
#: the scorers that use ``temperature`` (``max_cosine`` and ``sum`` ignore it)
TEMPERATURE_SCORERS: Tuple[str, ...] = ("mcm", "energy")
#: which views a box embedding fuses: dual (RUNA, lam), regional (crop only), global (blurred frame only)
ABLATIONS: Tuple[str, ...] = ("dual", "regional", "global")
#: OOD methods (``core.methods``: one file each, ``core.methods.get_method(name)``); ``runa`` is the default
METHODS: Tuple[str, ...] = ("runa", "uni-ood", "tagood")
DEFAULT_METHOD = "runa"
#: view kinds a method may ask for (``core.views.ViewMaker.make_views``), in batch order: the box's crop
#: (``regional``), the blurred frame with the box sharp (``global``), the frame with the box masked out
#: (``background``), and the whole frame, made once per image (``frame``)
VIEWS: Tuple[str, ...] = ("regional", "global", "background", "frame")
#: view kinds made once per image, not once per box
PER_IMAGE_VIEWS: Tuple[str, ...] = ("frame",)
#: views (pre-projection features) each RUNA ablation needs
VIEWS_FOR_ABLATION: Dict[str, Tuple[str, ...]] = {"dual": ("regional", "global"), "regional": ("regional",),
                                                  "global": ("global",)}
#: visual backends; ``auto`` tries tensorrt, then onnxruntime, then torch
BACKENDS: Tuple[str, ...] = ("auto", "tensorrt", "onnxruntime", "torch")
#: named outputs of the visual backbone (``DualEncoder.visual_outputs``, every backend), in their canonical order
BACKBONE_OUTPUTS: Tuple[str, ...] = ("cls", "tokens", "attn_cls", "xattn")
#: numeric precision of the visual trunk; ``auto`` = fp16 on CUDA, fp32 on the CPU
PRECISIONS: Tuple[str, ...] = ("auto", "fp32", "fp16")
#: what ``auto`` resolves to: the precisions a backend, an ONNX file or an engine actually has
RESOLVED_PRECISIONS: Tuple[str, ...] = ("fp32", "fp16")
#: device kinds (tools also accept ``cuda:N`` and ``auto``)
DEVICES: Tuple[str, ...] = ("cpu", "cuda")
BOX_STATUSES: Tuple[str, ...] = tuple(s.name for s in BoxStatus)
ALERT_LEVELS: Tuple[str, ...] = tuple(level.name for level in AlertLevel)


def canonical_scorer(name: str) -> str:
    """A scorer's name now (:data:`SCORER_ALIASES` maps an old one); any other name unchanged."""
    return SCORER_ALIASES.get(str(name), str(name))


def resolve_device(device: Optional[str]) -> str:
    """``auto`` -> ``cuda`` when CUDA is available, else ``cpu``; other values unchanged (None -> cpu)."""
    device = str(device or "cpu").strip()
    if device == "auto":
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def resolve_precision(precision: Optional[str], device: str) -> str:
    """``precision`` for ``device``: ``auto`` -> ``fp16`` on CUDA (``cuda``, ``cuda:N``), ``fp32`` otherwise.

    Raises:
        ValueError: unknown precision, or ``fp16`` on a non-CUDA device (CPU inference runs in fp32:
            the backends have no CPU fp16 path and PyTorch is slower in it).
    """
    p = str(precision or "auto").strip().lower()
    cuda = str(device).startswith("cuda")
    if p == "auto":
        return "fp16" if cuda else "fp32"
    if p not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; expected one of {list(PRECISIONS)}")
    if p == "fp16" and not cuda:
        raise ValueError(f"precision fp16 needs a CUDA device (device cuda), got device {device}; "
                         "CPU inference runs in fp32: use precision auto or fp32")
    return p
