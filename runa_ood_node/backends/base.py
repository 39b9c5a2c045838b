"""Visual backends: a batch of preprocessed views -> pre-projection visual features.

A backend replaces the torch visual trunk of :class:`runa_ood_node.core.encoder.DualEncoder`
(``encoder.set_backend(backend)``). The projection ``P_r`` / ``P_g`` stays outside every backend,
so one exported ONNX graph / TensorRT engine serves any fine-tuned projection.

Contract of :class:`VisualBackend`:

* input: ``views`` float32 ``[B,3,S,S]`` normalised as in :mod:`runa_ood_node.core.views`
  (CPU tensor, or a CUDA tensor for GPU backends); B may be 0.
* output: float32 ``[B, width]`` **on the input's device** (CPU in -> CPU out; a CUDA tensor in
  -> CUDA tensor out, so a GPU pipeline needs no host round trip). ``DualEncoder.visual_features``
  moves it to the CPU.
* ``max_batch``: largest batch one engine call takes (None = unlimited); larger inputs are split
  internally, so callers never have to.
* ``outputs(views, names, pairs=None) -> {name: tensor}``: the named backbone outputs of
  :mod:`runa_ood_node.core.backbone` (``cls``, ``tokens``, ``attn_cls``, ``xattn``) from one
  pass, float32 on the input's device; ``backend(views) == backend.outputs(views, ("cls",))["cls"]``.
  Every backend serves every output set (ONNX Runtime and TensorRT from one graph / engine per
  output set, keyed by it); batches over ``max_batch`` are split keeping each pair in one call.

:func:`make_backend` picks and builds a backend. ``kind="auto"`` tries TensorRT (needs the
``tensorrt`` module, CUDA and an engine already built by ``runa-ood build-engine``: never built at
start-up), then ONNX Runtime, then PyTorch, and logs every fallback with its reason. On a CPU, ONNX
Runtime runs the variant measured fastest on this CPU among those holding fidelity to torch
(:func:`ort_backend.ensure_auto_choice`): the recorded measurement of this model and output set,
else one made at start-up on the method's own views (when no variant is cached, they are exported
first within a time budget, ``auto_budget_s``; all of it logged with its time), then recorded for
the next start. The backend's ``variant`` / ``variant_reason`` (``measured``, ``recorded``,
``fallback``, ``explicit``) say which variant runs and why. An explicit kind never falls back: it raises
:class:`BackendUnavailableError` with a message saying what is missing; explicit ``onnxruntime``
exports into the cache when needed (logged as a WARNING: 30-60 s for a ViT-B on a small CPU).
"""
from __future__ import annotations

import abc
import dataclasses
import logging
import os
import pathlib
import threading
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch

from ..core.backbone import grid_size, output_set, serve_outputs
from ..core.encoder import state_dict_sha256
from ..core.registry import BACKENDS as KINDS, RESOLVED_PRECISIONS as PRECISIONS  # one definition of each

LOG = logging.getLogger(__name__)


class BackendUnavailableError(RuntimeError):
    """The requested backend cannot run here (missing runtime, no GPU, no engine, bad option)."""


_OTHERS_LOCK = threading.Lock()


class VisualBackend(abc.ABC):
    """Callable ``views [B,3,S,S] f32 -> features [B,width] f32`` (see module docstring).

    Attributes:
        name: short label used in logs, messages and benchmarks, e.g. ``"onnxruntime-cpu-int8"``.
        device: ``"cpu"`` or ``"cuda"`` / ``"cuda:N"`` where the computation runs.
        precision: ``"fp32"``, ``"fp16"`` or ``"int8"`` (weights of a dynamically quantised graph).
        max_batch: largest batch per engine call, None = unlimited.
        input_size: S; ``width``: feature size.
    """

    name: str = "backend"
    device: str = "cpu"
    precision: str = "fp32"
    max_batch: Optional[int] = None
    input_size: int = 0
    width: int = 0

    num_tokens: int = 0
    #: which variant this is (``plain``, ``fused``, ``int8``, ``fused-int8``, ``int8-static``, ``torch``, ...)
    #: and why it runs: ``explicit`` (the configuration named it), ``measured`` / ``recorded`` (``backend:
    #: auto`` chose it by measuring now / from an earlier measurement on this CPU) or ``fallback``;
    #: ``variant_detail`` says more (timings, what was skipped). Logged, and in :meth:`describe`.
    variant: str = ""
    variant_reason: str = "explicit"
    variant_detail: str = ""

    def __call__(self, views: torch.Tensor) -> torch.Tensor:
        return self.outputs(views, ("cls",))["cls"]

    def outputs(self, views: torch.Tensor, names: Sequence[str],
                pairs: Optional[torch.Tensor] = None) -> Dict[str, torch.Tensor]:
        """Named backbone outputs of ``views`` (see the module docstring), float32 on the views' device."""
        if not isinstance(views, torch.Tensor):
            raise TypeError(f"views must be a torch.Tensor, got {type(views).__name__}")
        S = self.input_size
        if views.ndim != 4 or views.shape[1] != 3 or (S and tuple(views.shape[2:]) != (S, S)):
            raise ValueError(f"views must be [B,3,{S},{S}], got {tuple(views.shape)}")

        def run(chunk, chunk_names, chunk_pairs):
            return self._run_outputs(chunk.contiguous(), chunk_names, chunk_pairs)

        out = serve_outputs(run, views, names, pairs, self.max_batch, self.num_tokens, self.width)
        return {n: t.to(device=views.device, dtype=torch.float32) for n, t in out.items()}

    def _run_outputs(self, views: torch.Tensor, names: Tuple[str, ...],
                     pairs: Optional[torch.Tensor]) -> Dict[str, torch.Tensor]:
        """Run one chunk (``1 <= B <= max_batch``; ``pairs`` int64 CPU ``[P>=1, 2]`` with ``xattn``):
        ``{name: tensor}`` on any device, any float dtype. The default serves ``("cls",)`` via
        :meth:`_run`; a subclass overrides this one or :meth:`_run` (or both)."""
        if names != ("cls",):
            raise BackendUnavailableError(f"{self.name} gives only the 'cls' output, not {names}")
        return {"cls": self._run(views)}

    def _run(self, views: torch.Tensor) -> torch.Tensor:
        """Run one chunk (``B <= max_batch``); return ``[B, width]`` on any device, any float dtype."""
        return self._run_outputs(views, ("cls",), None)["cls"]

    #: the output set of the graph / engine this backend runs (torch: every set)
    graph_outputs: Tuple[str, ...] = ("cls",)
    #: ``names -> backend`` of another output set (ONNX Runtime / TensorRT install one), else None
    _opener = None

    def _for_outputs(self, names: Tuple[str, ...]) -> "VisualBackend":
        """The backend that serves ``names``: this one when its graph / engine holds them, else the
        one of that output set, opened once through ``_opener`` and kept."""
        if set(names) <= set(self.graph_outputs):
            return self
        with _OTHERS_LOCK:
            others = self.__dict__.setdefault("_others", {})
            other = others.get(names)
            if other is None:
                if self._opener is None:
                    raise BackendUnavailableError(f"{self.name} gives the outputs {self.graph_outputs}, not {names}, "
                                                  "and cannot open another output set (opened from an explicit file)")
                other = others[names] = self._opener(names)
        return other

    def describe(self) -> dict:
        """Plain dict for logs / diagnostics / benchmark JSON."""
        return {"name": self.name, "device": str(self.device), "precision": self.precision,
                "max_batch": self.max_batch, "variant": self.variant or self.name,
                "variant_reason": self.variant_reason, "variant_detail": self.variant_detail}

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, device={self.device!r}, precision={self.precision!r})"


# ---------------------------------------------------------------------- model description
@dataclasses.dataclass
class ModelInfo:
    """What every backend needs to know about the model: the torch trunk and its shapes."""

    trunk: torch.nn.Module
    input_size: int
    width: int
    model_id: str
    model_name: str
    _weights_hash: Optional[str] = None
    num_tokens: int = 0   # T = 1 + G*G

    def __post_init__(self) -> None:
        if not self.num_tokens:
            visual = getattr(self.trunk, "visual", self.trunk)
            try:
                self.num_tokens = 1 + grid_size(visual) ** 2
            except ValueError:  # a tower without a patch grid: only "cls" can be served
                self.num_tokens = 0

    def weights_hash(self) -> str:
        """16-hex hash of the trunk's weights (computed once; a pass over the parameters).

        Engines record it so a backend built from the bare ``visual_trunk`` (whose ``model_id``
        *is* this hash) finds engines built from the encoder (whose ``model_id`` is the
        encoder's), and vice versa.
        """
        if self._weights_hash is None:
            self._weights_hash = trunk_weights_hash(self.trunk)
        return self._weights_hash


def trunk_weights_hash(module: torch.nn.Module) -> str:
    """The first 16 hex of ``core.encoder.state_dict_sha256`` (names, shapes, float32 values)."""
    return state_dict_sha256(module)[:16]


def describe_model(model: Any) -> ModelInfo:
    """Accept a ``DualEncoder`` (preferred) or its bare ``visual_trunk`` module.

    For a bare trunk (an nn.Module wrapping an open_clip ``VisionTransformer`` as ``.visual``),
    ``input_size`` and ``width`` are read from the tower and ``model_id`` is a hash of its weights
    (costs a pass over the parameters; pass the encoder to avoid it).
    """
    trunk = getattr(model, "visual_trunk", None)
    if trunk is not None:
        return ModelInfo(trunk=trunk, input_size=int(model.input_size), width=int(model.width),
                         model_id=str(model.model_id), model_name=str(getattr(model, "model_name", "model")))
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"make_backend needs a DualEncoder or its visual_trunk nn.Module, got {type(model).__name__}")
    visual = getattr(model, "visual", model)
    size = getattr(visual, "image_size", None)
    if isinstance(size, (tuple, list)):
        size = size[0]
    width = getattr(getattr(visual, "transformer", None), "width", None)
    if size is None or width is None:
        raise TypeError("cannot infer input_size/width from this module; pass the DualEncoder instead")
    wh = trunk_weights_hash(model)
    return ModelInfo(trunk=model, input_size=int(size), width=int(width), model_id=wh,
                     model_name=type(visual).__name__, _weights_hash=wh)


def default_cache_dir(cache_dir: Optional[Union[str, os.PathLike]] = None) -> pathlib.Path:
    """``cache_dir`` if given, else ``core.paths.cache_dir()`` ($RUNA_OOD_CACHE_DIR or ~/.cache/runa_ood_node)."""
    if cache_dir is not None:
        p = pathlib.Path(cache_dir).expanduser()
        p.mkdir(parents=True, exist_ok=True)
        return p
    try:
        from ..core.paths import cache_dir as core_cache_dir

        return core_cache_dir()
    except ImportError:  # pragma: no cover
        env = os.environ.get("RUNA_OOD_CACHE_DIR")
        p = pathlib.Path(env).expanduser() if env else pathlib.Path.home() / ".cache" / "runa_ood_node"
        p.mkdir(parents=True, exist_ok=True)
        return p


def cuda_available() -> bool:
    try:
        return bool(torch.cuda.is_available())
    except Exception:  # broken driver installs raise here
        return False


# ---------------------------------------------------------------------- factory
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
    from .torch_backend import TorchBackend

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
    from .samples import Sample, calibration_views

    views, where = calibration_views(encoder, max_images=4)
    return Sample.of_views(views, outputs, source=where)


def _make_ort(info: ModelInfo, *, device, precision, cache_dir, max_batch, onnx_path, threads, int8,
              allow_export, logger, fused=False, calibration_views=None,
              execution_mode="sequential", outputs=("cls",), auto_sample=None, auto_budget_s=None,
              auto_projection=None) -> VisualBackend:
    try:
        import onnxruntime  # noqa: F401
    except ImportError as exc:
        raise BackendUnavailableError(f"onnxruntime is not installed ({exc})") from exc
    from .ort_backend import AUTO_EXPORT_BUDGET_S, OrtBackend, ensure_auto_choice

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
    from .tensorrt_backend import TensorRTBackend, tensorrt_available

    ok, why = tensorrt_available()
    if not ok:
        raise BackendUnavailableError(why)
    if int8:
        raise BackendUnavailableError("int8 TensorRT engines need calibration and are not supported; use fp16")
    if not device.startswith("cuda"):
        raise BackendUnavailableError(f"TensorRT runs on CUDA only, device is {device!r}")
    return TensorRTBackend.from_cache(info, device=device, precision=precision, engine_path=engine_path,
                                      cache_dir=cache_dir, max_batch=max_batch, outputs=outputs)
