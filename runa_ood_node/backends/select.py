"""Picking and building a visual backend: :func:`make_backend` (``auto``: TensorRT -> ONNX Runtime ->
PyTorch, each fallback logged with its reason; an explicit kind never falls back). See
:mod:`runa_ood_node.backends.base` for the backend contract. This module sits above the base and
the implementations (it imports them; they import only the base), so the package has no import cycle.
"""
from __future__ import annotations

import logging
import os
from typing import Any, List, Optional, Sequence, Tuple, Union

import torch

from ..core.backbone import output_set
from ..core.registry import BACKENDS as KINDS, RESOLVED_PRECISIONS as PRECISIONS
from .base import BackendUnavailableError, ModelInfo, VisualBackend, describe_model
from .ort_backend import AUTO_EXPORT_BUDGET_S, OrtBackend, ensure_auto_choice
from . import samples
from .tensorrt_backend import TensorRTBackend, tensorrt_available
from .torch_backend import TorchBackend

LOG = logging.getLogger(__name__)


def make_backend(kind: str, encoder: Any, *, device: str = "cpu", precision: str = "fp32",
                 engine_path: Optional[Union[str, os.PathLike]] = None,
                 onnx_path: Optional[Union[str, os.PathLike]] = None,
                 cache_dir: Optional[Union[str, os.PathLike]] = None, ort_threads: Optional[int] = None,
                 int8: Union[bool, str] = False, logger: Optional[logging.Logger] = None,
                 max_batch: Optional[int] = None, fused: bool = False,
                 calibration_views: Optional[torch.Tensor] = None,
                 ort_execution_mode: str = "sequential", outputs: Sequence[str] = ("cls",),
                 auto_sample=None, auto_budget_s: Optional[float] = None) -> VisualBackend:
    """Build a visual backend for ``encoder`` (a ``DualEncoder`` or its ``visual_trunk``).

    Args:
        kind: ``"auto"`` (TensorRT with a cached engine -> ONNX Runtime -> PyTorch, each fallback
            logged with its reason; on a CPU in fp32 without ``int8`` / ``fused`` / ``onnx_path``,
            ONNX Runtime opens the variant measured fastest on this CPU among those holding
            embedding cosine >= 0.999 to torch: the recorded measurement of this model and output
            set (``runa-ood build-engine --auto-choice`` or an earlier start), else one made now on
            ``auto_sample`` (exporting the variants first, within ``auto_budget_s``, when none is
            cached) and recorded; :func:`ort_backend.ensure_auto_choice`), ``"tensorrt"``,
            ``"onnxruntime"`` or ``"torch"`` (no fallback: raise if unavailable). The backend's
            ``variant`` / ``variant_reason`` / ``variant_detail`` say which variant runs and why.
        device: ``"cpu"`` or ``"cuda"``/``"cuda:N"``.
        precision: ``"fp32"`` or ``"fp16"`` (torch: autocast, needs CUDA; ONNX Runtime: the fp16
            ONNX; TensorRT: an fp16 engine).
        engine_path: a TensorRT engine file (its ``.json`` sidecar must sit next to it); default:
            the cached engine for this model/precision/GPU/TensorRT version, built beforehand with
            ``runa-ood build-engine``. Engines are never built here (minutes of start-up).
        onnx_path: an existing ONNX export of the trunk; default: the cached export (explicit
            ``onnxruntime`` exports it when missing, ``auto`` skips ONNX Runtime instead).
        cache_dir: cache root (default ``core.paths.cache_dir()``).
        ort_threads: ONNX Runtime intra-op threads (None = ORT's default, all cores).
        int8: ONNX Runtime only, CPU only: False, True/``"dynamic"`` (dynamically quantised int8
            weights, per channel) or ``"static"`` (calibrated QDQ graph; made beforehand with
            ``runa-ood build-engine --onnx-only --int8 static``, or from ``calibration_views``).
        fused: ONNX Runtime only: the graph with ONNX Runtime's transformer fusions (Attention,
            SkipLayerNormalization, BiasGelu), see ``onnx_export.export_fused_onnx``.
        calibration_views: real ``[B,3,S,S]`` views for making a static int8 graph.
        ort_execution_mode: ONNX Runtime ``"sequential"`` (default) or ``"parallel"``.
        logger: where fallbacks are logged (default this module's logger).
        max_batch: cap on views per engine call (TensorRT: defaults to the profile's max).
        outputs: the backbone output set the node will ask for (``core.backbone``; default ``("cls",)``):
            ONNX Runtime opens that set's graph and TensorRT loads that set's engine (``auto`` needs
            them cached, as for ``("cls",)``). Every backend still serves every set: ONNX Runtime
            opens another set's graph on first use; torch computes any set directly.
        auto_sample: ``auto`` on a CPU, when it must measure: a callable returning the real views to
            measure on (a ``samples.Sample`` of the method's own calls, or a views tensor); default:
            RUNA's views of the sample photographs (``samples.calibration_views``).
        auto_budget_s: ``auto`` on a CPU with no variant cached: seconds it may spend exporting them
            (default ``ort_backend.AUTO_EXPORT_BUDGET_S``; 0: export nothing, measure what is cached).

    Raises:
        BackendUnavailableError: an explicit kind cannot run here (message says why and what to do).
        ValueError: unknown kind / precision / device.
    """
    log = logger or LOG
    if kind not in KINDS:
        raise ValueError(f"unknown backend kind {kind!r}; expected one of {KINDS}")
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; expected one of {PRECISIONS}")
    device = str(device)
    if not (device == "cpu" or device.startswith("cuda")):
        raise ValueError(f"device must be 'cpu' or 'cuda[:N]', got {device!r}")
    info = describe_model(encoder)
    outputs = output_set(outputs)
    common = dict(device=device, precision=precision, cache_dir=cache_dir, max_batch=max_batch)

    auto = kind == "auto"
    builders = {
        "tensorrt": lambda: _make_tensorrt(info, engine_path=engine_path, int8=int8, outputs=outputs, **common),
        # auto never exports at start-up (30-60 s for a ViT-B): it uses ONNX Runtime only when the
        # export is already cached (or onnx_path is given) and otherwise falls back to torch
        "onnxruntime": lambda: _make_ort(info, onnx_path=onnx_path, threads=ort_threads, int8=int8,
                                         allow_export=not auto, logger=log, fused=fused,
                                         calibration_views=calibration_views,
                                         execution_mode=ort_execution_mode, outputs=outputs,
                                         auto_sample=lambda: _auto_sample(encoder, auto_sample, outputs),
                                         auto_budget_s=auto_budget_s,
                                         auto_projection=getattr(encoder, "proj_global", None), **common),
        # int8 is an ONNX Runtime option: auto's last resort runs the torch trunk in fp32 instead
        "torch": lambda: _make_torch(info, int8=bool(int8) and not auto, **common),
    }
    if not auto:
        backend = builders[kind]()
        backend.variant = backend.variant or _variant_name(kind, fused, int8)
        log.info("visual backend: %s (%s)", backend.name, backend.describe())
        return backend

    reasons: List[Tuple[str, str]] = []
    for k in ("tensorrt", "onnxruntime", "torch"):
        try:
            backend = builders[k]()
        except BackendUnavailableError as exc:
            reasons.append((k, str(exc)))
            log.warning("backend auto: %s unavailable, falling back: %s", k, exc)
            continue
        except Exception as exc:  # a runtime that is present but broken must not stop the node
            reasons.append((k, f"{type(exc).__name__}: {exc}"))
            log.warning("backend auto: %s failed (%s: %s), falling back", k, type(exc).__name__, exc)
            continue
        backend.fallback_reasons = reasons  # type: ignore[attr-defined]
        if not backend.variant:
            backend.variant = _variant_name(k, fused, int8)
            if reasons:
                backend.variant_reason = "fallback"
                backend.variant_detail = "; ".join(f"{k2}: {r}" for k2, r in reasons)
            else:
                backend.variant_reason = "explicit"
        log.info("backend auto: using %s (variant %s, %s%s)%s", backend.name, backend.variant, backend.variant_reason,
                 f": {backend.variant_detail}" if backend.variant_detail and backend.variant_reason != "fallback"
                 else "", "" if not reasons else " (skipped: " + "; ".join(f"{k}: {r}" for k, r in reasons) + ")")
        return backend
    raise BackendUnavailableError("no visual backend could be built: "
                                  + "; ".join(f"{k}: {r}" for k, r in reasons))


def _make_torch(info: ModelInfo, *, device, precision, cache_dir, max_batch, int8) -> VisualBackend:
    if int8:
        raise BackendUnavailableError("int8 is only offered by the onnxruntime backend (dynamic quantisation)")
    return TorchBackend(info, device=device, precision=precision, max_batch=max_batch)


def _variant_name(kind: str, fused: bool, int8) -> str:
    """The variant label of an explicitly configured backend (``plain``, ``fused-int8``, ``torch``, ...)."""
    if kind != "onnxruntime":
        return kind
    mode = "int8-static" if int8 == "static" else ("int8" if int8 else "")
    return "-".join(p for p in ("fused" if fused else "", mode) if p) or "plain"


def _auto_sample(encoder: Any, given, outputs: Sequence[str]):
    """What ``auto`` measures on: ``given()`` / ``given`` when set, else RUNA's views of the sample
    photographs (``samples.calibration_views``; needs a ``DualEncoder``, not a bare trunk)."""
    if given is not None:
        return given() if callable(given) else given
    views, where = samples.calibration_views(encoder, max_images=4)
    return samples.Sample.of_views(views, outputs, source=where)


def _make_ort(info: ModelInfo, *, device, precision, cache_dir, max_batch, onnx_path, threads, int8,
              allow_export, logger, fused=False, calibration_views=None,
              execution_mode="sequential", outputs=("cls",), auto_sample=None, auto_budget_s=None,
              auto_projection=None) -> VisualBackend:
    try:
        import onnxruntime  # noqa: F401
    except ImportError as exc:
        raise BackendUnavailableError(f"onnxruntime is not installed ({exc})") from exc
    log = logger or LOG
    opts = dict(device=device, precision=precision, cache_dir=cache_dir, threads=threads, max_batch=max_batch,
                logger=logger, execution_mode=execution_mode, outputs=outputs)
    if (not allow_export and not int8 and not fused and onnx_path is None and device == "cpu"
            and precision == "fp32"):
        # backend: auto on a CPU without options: the fastest variant that holds fidelity, measured on
        # this CPU (recorded earlier, or now: ort_backend.ensure_auto_choice)
        budget = AUTO_EXPORT_BUDGET_S if auto_budget_s is None else float(auto_budget_s)
        choice, reason, detail = ensure_auto_choice(info, auto_sample, cache_dir=cache_dir, outputs=outputs,
                                                    threads=threads, budget_s=budget, logger=log,
                                                    projection=auto_projection)
        if choice is not None:
            try:
                be = OrtBackend.from_model(info, allow_export=False, **opts, **choice["options"])
                be.variant, be.variant_reason, be.variant_detail = choice["name"], reason, detail
                log.info("backend auto: variant %s (%s), %s: %.1f ms per sample round on this CPU, embedding cos "
                         "%.5f to torch fp32", choice["name"], be.name, reason, choice["ms_median"], choice["cos_min"])
                return be
            except BackendUnavailableError as exc:
                detail = f"the chosen variant {choice['name']} cannot be opened ({exc})"
        log.warning("backend auto: no measured CPU variant (%s); trying the plain ONNX graph", detail)
        be = OrtBackend.from_model(info, allow_export=False, **opts)
        be.variant, be.variant_reason, be.variant_detail = "plain", "fallback", detail
        return be

    return OrtBackend.from_model(info, onnx_path=onnx_path, int8=int8, allow_export=allow_export, fused=fused,
                                 calibration_views=calibration_views, **opts)


def _make_tensorrt(info: ModelInfo, *, device, precision, cache_dir, max_batch, engine_path, int8,
                   outputs=("cls",)) -> VisualBackend:
    ok, why = tensorrt_available()
    if not ok:
        raise BackendUnavailableError(why)
    if int8:
        raise BackendUnavailableError("int8 TensorRT engines need calibration and are not supported; use fp16")
    if not device.startswith("cuda"):
        raise BackendUnavailableError(f"TensorRT runs on CUDA only, device is {device!r}")
    return TensorRTBackend.from_cache(info, device=device, precision=precision, engine_path=engine_path,
                                      cache_dir=cache_dir, max_batch=max_batch, outputs=outputs)
