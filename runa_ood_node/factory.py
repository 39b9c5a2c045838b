"""The one way to build an ``OodScorer`` from a configuration (node, tools, benchmarks).

:func:`build_scorer` loads (or takes) the encoder, builds the visual backend, applies the
fine-tuned projection, loads the thresholds, picks the view maker and constructs the
``core.pipeline.OodScorer``. It lives outside ``core`` because it needs ``backends`` (optional
runtimes, GPU views); ``core`` never imports ``backends``.

:func:`build_node_scorer` is the node's path: validated node settings (``ros.params.NodeSettings``)
-> ``scorer_config()`` + ``thresholds()`` -> :func:`build_scorer`. The node's ``on_configure`` and
offline bag evaluation (``tools.bag_eval``) both call it, so an offline run scores exactly what
the node would.

``max_boxes``: None or 0 means **no cap** everywhere (the node parameter's documented meaning);
``OodScorer`` itself treats 0 the same way.
"""
from __future__ import annotations

import logging
from typing import Any, Mapping, Optional

from .core.encoder import DualEncoder
from .core.pipeline import OodScorer

LOG = logging.getLogger(__name__)

#: Keys :func:`build_scorer` accepts (anything else raises ValueError: typos must not pass silently).
CONFIG_KEYS = frozenset({
    "model", "pretrained", "device", "precision", "allow_random", "allow_download", "labels", "label_set",
    "projection", "thresholds", "scorer", "lam", "blur_radius", "ablation", "max_boxes", "min_box_size",
    "temperature", "max_batch", "backend", "backend_options", "views", "method", "head"})
#: Keys that only matter when the encoder is loaded here (ignored when an encoder is passed in).
_LOAD_KEYS = ("pretrained", "device", "precision", "allow_random", "allow_download", "backend", "backend_options")


def build_scorer(config: Mapping[str, Any], encoder: Optional[DualEncoder] = None, view_maker=None) -> OodScorer:
    """Build encoder, backend, projection, thresholds, view maker and scorer from a flat dict.

    Keys (all optional except ``model`` when no ``encoder`` is given; defaults in brackets):
        ``model`` open_clip model name; ``pretrained`` [None] tag or checkpoint path;
        ``device`` ["cpu"]; ``precision`` ["fp32"] (torch trunk and backend); ``allow_random`` [False];
        ``allow_download`` [None: allowed unless RUNA_OOD_OFFLINE / HF_HUB_OFFLINE] may an open_clip
        tag missing from the local cache be downloaded (a vehicle passes False);
        ``labels`` / ``label_set`` ["voc"] built-in name or YAML path/name;
        ``projection`` [None] fine-tuned regional projection (name in calibration/ or path, via
        ``core.finetune.load_projection``); None/"" = the off-the-shelf projection (``P_r = P_g``);
        ``thresholds`` [None] a ``Thresholds`` object or a thresholds file (name or path);
        ``scorer`` ["runa"]; ``lam`` [0.5]; ``blur_radius`` [1.0]; ``ablation`` ["dual"];
        ``max_boxes`` [None] (None or 0 = no cap); ``min_box_size`` [2.0]; ``temperature`` [1.0];
        ``max_batch`` [None]; ``views`` ["gpu" when ``device`` is CUDA, else "cpu"]: "gpu" builds
        ``backends.gpu_preprocess.GpuViewMaker`` on ``device`` (falls back to the CPU views with a
        warning when it cannot be built);
        ``backend`` ["torch"]: other kinds go through ``backends.base.make_backend(kind, encoder,
        device=, precision=, **backend_options)`` (``"auto"`` falls back TensorRT -> ONNX Runtime ->
        torch, logged there); ``backend_options`` [{}];
        ``method`` ["runa"] one of ``core.registry.METHODS``; ``head`` [None] a trained head of that method
        (folder / name, ``core.methods.heads.load_head``: refused when made for another method, model or
        label set, or damaged); for RUNA a head is its regional projection (``projection`` stays its alias).

    Args:
        config: the dict above.
        encoder: an already loaded :class:`DualEncoder` to build around (a tool that has one saves
            a second model load). The loading keys (``pretrained``, ``device``, ``precision``,
            ``allow_random``, ``allow_download``, ``backend``, ``backend_options``) are then not
            used; ``model``, when given, must name the encoder's model. A ``projection`` key, when
            present, is still applied: **the encoder's regional projection is replaced** (None or ""
            restores P_g, as the node's empty ``projection`` parameter); without the key the encoder
            keeps the projection it has.
        view_maker: a view maker to use instead of the one ``views`` / ``device`` would build.

    Raises:
        ValueError: unknown keys, missing ``model``, a ``model`` that differs from ``encoder``'s,
            bad values (from ``OodScorer``), unreadable projection / thresholds.
        core.encoder.WeightsUnavailableError: the weights cannot be loaded.
        FileNotFoundError: projection or thresholds file missing.
    """
    cfg = dict(config)
    unknown = set(cfg) - CONFIG_KEYS
    if unknown:
        raise ValueError(f"unknown scorer config keys {sorted(unknown)}; allowed: {sorted(CONFIG_KEYS)}")

    def opt(key, default=None):
        v = cfg.get(key, default)
        return default if v in ("", None) else v

    device = str(opt("device", "cpu"))
    loaded_here = encoder is None
    if loaded_here:
        if not cfg.get("model"):
            raise ValueError("scorer config needs 'model' (an open_clip model name, e.g. 'ViT-B-16')")
        encoder = DualEncoder.load(cfg["model"], pretrained=opt("pretrained"), device=device,
                                   allow_random=bool(cfg.get("allow_random", False)),
                                   precision=opt("precision", "fp32"), allow_download=cfg.get("allow_download"))
    else:
        model = opt("model")
        if model is not None and str(model).replace("/", "-") != str(encoder.model_name).replace("/", "-"):
            raise ValueError(f"config names model {model!r} but the encoder passed in is {encoder.model_name!r}")
        device = str(getattr(encoder, "device", device))
    if loaded_here or "projection" in cfg:  # a passed-in encoder keeps its projection unless the config names one
        _apply_projection(encoder, opt("projection"))
    method = str(opt("method", "runa"))
    labels = opt("labels", None) or opt("label_set", "voc")
    head = None
    if opt("head") is not None:
        from .core.labels import load_label_set
        from .core.methods.heads import load_head

        labels = load_label_set(labels)
        head = load_head(opt("head"), method=method, encoder=encoder, label_set=labels)
    thresholds = opt("thresholds")
    if thresholds is not None and not hasattr(thresholds, "for_label"):
        from .core.paths import resolve_calibration_file
        from .core.thresholds import Thresholds

        thresholds = Thresholds.load(resolve_calibration_file(thresholds, (".json", ".yaml", ".yml")))
    blur_radius = float(opt("blur_radius", 1.0))
    if view_maker is None:
        view_maker = _view_maker(encoder, opt("views", "gpu" if device.startswith("cuda") else "cpu"), device,
                                 blur_radius)
    scorer = OodScorer(encoder, labels, scorer=opt("scorer", "runa"), method=method, head=head,
                       lam=float(opt("lam", 0.5)), blur_radius=blur_radius, ablation=opt("ablation", "dual"),
                       thresholds=thresholds, max_boxes=opt("max_boxes"),
                       min_box_size=float(opt("min_box_size", 2.0)), temperature=float(opt("temperature", 1.0)),
                       max_batch=opt("max_batch"), view_maker=view_maker)
    backend = None
    if loaded_here and opt("backend", "torch") != "torch":
        # built once the scorer exists: the backend serves the method's output set, and backend: auto
        # measures its CPU variants on this method's own views (samples.method_sample), bounded and logged
        from .backends.base import make_backend  # optional runtimes
        from .backends.samples import method_sample

        # a method setting this backend cannot serve (TagOOD's frame_size) fails here
        scorer.method.check_backend(str(opt("backend")))
        options = {"device": device, "precision": opt("precision", "fp32"), "outputs": tuple(scorer.method.outputs),
                   "auto_sample": lambda: method_sample(scorer), **dict(cfg.get("backend_options") or {})}
        backend = make_backend(opt("backend"), encoder, **options)
        encoder.set_backend(backend, getattr(backend, "name", opt("backend")))
    scorer.backend_choice = backend_choice(backend if backend is not None else getattr(encoder, "_backend", None))
    return scorer


def backend_choice(backend) -> dict:
    """``{"backend", "variant", "reason", "detail"}`` of a scorer's visual backend (None = the encoder's
    torch trunk): which variant runs and why (``explicit``, ``measured``, ``recorded``, ``fallback``; see
    ``backends.base.VisualBackend.variant``). :func:`build_scorer` stores it as ``scorer.backend_choice``
    for the node's log and /diagnostics."""
    if backend is None:
        return {"backend": "torch", "variant": "torch", "reason": "explicit", "detail": "backend: torch"}
    return {"backend": str(getattr(backend, "name", type(backend).__name__)),
            "variant": str(getattr(backend, "variant", "") or getattr(backend, "name", "")),
            "reason": str(getattr(backend, "variant_reason", "explicit")),
            "detail": str(getattr(backend, "variant_detail", ""))}


def build_node_scorer(settings, encoder: Optional[DualEncoder] = None, view_maker=None,
                      ablation: Optional[str] = None, apply_thresholds: bool = True) -> OodScorer:
    """The node's scorer from validated node settings (``ros.params.NodeSettings``):
    ``settings.scorer_config()`` with ``settings.thresholds()`` (``thresholds_file``, else
    ``default_threshold`` for every label) -> :func:`build_scorer`. ``encoder`` / ``view_maker``: as
    there (offline tools that already hold the node's model).

    Offline tools only (the node passes neither): ``ablation`` (None = dual, the node's two views)
    scores with one view; ``apply_thresholds=False`` builds without thresholds (tools that fit
    thresholds or apply ``--thresholds`` per run themselves)."""
    cfg = dict(settings.scorer_config())
    cfg["thresholds"] = settings.thresholds() if apply_thresholds else None
    if ablation is not None:
        cfg["ablation"] = ablation
    return build_scorer(cfg, encoder=encoder, view_maker=view_maker)


def _apply_projection(encoder: DualEncoder, projection: Optional[str]) -> None:
    """Set the encoder's regional projection: a name / path -> a RUNA head (``core.methods.heads.load_head``:
    refused when it records another ``model_id``); None -> ``P_r = P_g``."""
    if projection is None:
        encoder.set_regional_projection(None)
        return
    from .core.methods.heads import load_head
    from .core.methods.runa import PROJECTION_KEY

    encoder.set_regional_projection(load_head(projection, method="runa", encoder=encoder).state[PROJECTION_KEY])


def _view_maker(encoder: DualEncoder, views: str, device: str, blur_radius: float):
    """None (the scorer's CPU ``core.views.ViewMaker``) or, for ``views="gpu"``, a ``GpuViewMaker``
    on ``device`` (the CPU views when it cannot be built: they always work)."""
    if views not in ("cpu", "gpu"):
        raise ValueError(f"views must be 'cpu' or 'gpu', got {views!r}")
    if views == "cpu":
        return None
    try:
        from .backends.gpu_preprocess import GpuViewMaker  # needs torchvision ops

        return GpuViewMaker(encoder.input_size, encoder.mean, encoder.std, blur_radius, device=device)
    except Exception as exc:  # missing torchvision ops / CUDA
        LOG.warning("GPU view maker unavailable (%s: %s); using CPU views", type(exc).__name__, exc)
        return None


__all__ = ["build_scorer", "build_node_scorer", "backend_choice", "CONFIG_KEYS"]
