"""The one way to build an ``OodScorer``: from a :class:`~runa_ood_node.core.config.ScorerConfig`.

:func:`build_scorer` takes the typed, validated configuration (``core.config``: built from node
parameters, command-line arguments or a parameters file, its label set, thresholds, head and
projection already loaded) and loads or takes the encoder, checks the head / projection against the
loaded model, picks the view maker, constructs the ``core.pipeline.OodScorer`` (the method with its
settings and head: for RUNA the fine-tuned projection ``P_r``) and builds the visual
backend. It lives outside ``core`` because it needs ``backends`` (optional runtimes, GPU views);
``core`` never imports ``backends``. The node's ``on_configure`` (``build_scorer(settings.config)``)
and every tool (``tools.common.scorer_from_args``) call it, so an offline run scores exactly what the
node would. Nothing here has a default of its own: they are the parameter table's.

``max_boxes``: 0 means **no cap** (the node parameter's documented meaning), as in ``OodScorer``.
"""
from __future__ import annotations

import logging
from typing import Optional

from .core.config import ScorerConfig
from .core.encoder import DualEncoder
from .core.methods import get_method
from .core.methods.heads import check_head
from .core.parameters import default
from .core.pipeline import OodScorer
from .core.registry import resolve_precision

LOG = logging.getLogger(__name__)


def build_scorer(config: ScorerConfig, encoder: Optional[DualEncoder] = None, view_maker=None) -> OodScorer:
    """The ``OodScorer`` of ``config`` (a :class:`ScorerConfig`; nothing in it is loaded again).

    Args:
        config: the configuration. ``views`` None: ``gpu`` on a CUDA device (``backends.gpu_preprocess
            .GpuViewMaker``; the CPU views with a warning when it cannot be built), else ``cpu``;
            ``backend`` other than torch: ``backends.select.make_backend(kind, encoder, device=,
            precision=, outputs=, **config.backend_kwargs())`` (``auto`` falls back TensorRT -> ONNX
            Runtime -> torch, logged there), built once the scorer exists (it serves the method's outputs).
        encoder: an already loaded :class:`DualEncoder` to build around (a tool that has one saves a
            second model load); the loading settings (weights, device, precision, backend) are then
            not used, and ``config.model`` must name the encoder's model (nothing of the encoder is changed:
            RUNA's ``P_r`` is its head's).
        view_maker: a view maker to use instead of the one ``views`` / ``device`` would build.

    Raises:
        ValueError: a ``model`` that differs from ``encoder``'s, a head or projection made for another
            model (``HeadError``), bad values (from ``OodScorer``).
        core.encoder.WeightsUnavailableError: the weights cannot be loaded.
    """
    if not isinstance(config, ScorerConfig):
        raise TypeError(f"build_scorer takes a core.config.ScorerConfig, not {type(config).__name__}")
    loaded_here = encoder is None
    # ``auto`` resolved for the device (the node's rule); an explicit precision goes to the encoder as given
    # (the node's table refuses fp16 on a CPU; tools such as gpu-check measure CPU fp16 / bf16 on purpose)
    precision = resolve_precision(config.precision, config.device) if config.precision == "auto" else config.precision
    if loaded_here:
        encoder = DualEncoder.load(config.model, pretrained=config.pretrained or None, device=config.device,
                                   allow_random=config.allow_random, precision=precision,
                                   allow_download=config.allow_download)
    elif config.model.replace("/", "-") != str(encoder.model_name).replace("/", "-"):
        raise ValueError(f"config names model {config.model!r} but the encoder passed in is {encoder.model_name!r}")
    device = str(encoder.device if not loaded_here else config.device)
    if config.head is not None:
        check_head(config.head, encoder=encoder)  # method and label set were checked when it was loaded
    if view_maker is None:
        views = config.views or ("gpu" if device.startswith("cuda") else "cpu")
        view_maker = _view_maker(encoder, views, device, _blur_radius(config))
    scorer = OodScorer(encoder, config.label_set, scorer=config.scorer, method=config.method, head=config.head,
                       settings=config.method_settings, ablation=config.ablation,
                       thresholds=config.thresholds, max_boxes=config.max_boxes, min_box_size=config.min_box_size,
                       temperature=config.temperature, max_batch=config.max_batch, view_maker=view_maker)
    backend = _build_backend(scorer, config, precision) if loaded_here and config.backend != "torch" else None
    scorer.backend_choice = backend_choice(backend if backend is not None else getattr(encoder, "_backend", None))
    return scorer


def _blur_radius(config: ScorerConfig) -> float:
    """The blurred global view's sigma: what the method's settings give it (RUNA's ``blur_radius``), else the
    table's (a view maker needs one)."""
    r = get_method(config.method).settings_blur_radius(config.method_settings)
    return float(default("blur_radius") if r is None else r)


def _build_backend(scorer: OodScorer, config: ScorerConfig, precision: str):
    """The visual backend of ``config``, built once the scorer exists: it serves the method's output
    set, and backend ``auto`` measures its CPU variants on this method's own views
    (``samples.method_sample``), bounded and logged; set on the scorer's encoder."""
    from .backends.samples import method_sample
    from .backends.select import make_backend  # optional runtimes

    scorer.method.check_backend(config.backend)  # a method setting this backend cannot serve (TagOOD's frame_size)
    options = {"precision": precision, "outputs": tuple(scorer.method.outputs),
               "auto_sample": lambda: method_sample(scorer), **config.backend_kwargs()}
    backend = make_backend(config.backend, scorer.encoder, **options)
    scorer.encoder.set_backend(backend, getattr(backend, "name", config.backend))
    return backend


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


__all__ = ["build_scorer", "backend_choice"]
