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
``tensorrt`` module, CUDA and an engine already built by ``runa-ood build-engine``), then ONNX
Runtime (needs the ONNX export already in the cache, made by ``runa-ood build-engine --onnx-only``,
or ``onnx_path``), then PyTorch, and logs every fallback with its reason: ``auto`` never spends
start-up time building an engine or exporting a graph. An explicit kind never falls back: it raises
:class:`BackendUnavailableError` with a message saying what is missing; explicit ``onnxruntime``
exports into the cache when needed (logged as a WARNING: 30-60 s for a ViT-B on a small CPU).
"""
from __future__ import annotations

import abc
import dataclasses
import logging
import os
import pathlib
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch

from ..core.backbone import grid_size, serve_outputs
from ..core.encoder import state_dict_sha256
from ..core.registry import BACKENDS as KINDS, RESOLVED_PRECISIONS as PRECISIONS  # one definition of each

LOG = logging.getLogger(__name__)


class BackendUnavailableError(RuntimeError):
    """The requested backend cannot run here (missing runtime, no GPU, no engine, bad option)."""


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
        ``{name: tensor}`` on any device, any float dtype. The default serves ``("cls",)`` via :meth:`_run`."""
        if names != ("cls",):
            raise BackendUnavailableError(f"{self.name} gives only the 'cls' output, not {names}")
        return {"cls": self._run(views)}

    @abc.abstractmethod
    def _run(self, views: torch.Tensor) -> torch.Tensor:
        """Run one chunk (``B <= max_batch``); return ``[B, width]`` on any device, any float dtype."""

    def describe(self) -> dict:
        """Plain dict for logs / diagnostics / benchmark JSON."""
        return {"name": self.name, "device": str(self.device), "precision": self.precision,
                "max_batch": self.max_batch}

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
                 ort_execution_mode: str = "sequential") -> VisualBackend:
    """Build a visual backend for ``encoder`` (a ``DualEncoder`` or its ``visual_trunk``).

    Args:
        kind: ``"auto"`` (TensorRT with a cached engine -> ONNX Runtime with a cached export ->
            PyTorch, each fallback logged with its reason), ``"tensorrt"``, ``"onnxruntime"`` or
            ``"torch"`` (no fallback: raise if unavailable).
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
    common = dict(device=device, precision=precision, cache_dir=cache_dir, max_batch=max_batch)

    auto = kind == "auto"
    builders = {
        "tensorrt": lambda: _make_tensorrt(info, engine_path=engine_path, int8=int8, **common),
        # auto never exports at start-up (30-60 s for a ViT-B): it uses ONNX Runtime only when the
        # export is already cached (or onnx_path is given) and otherwise falls back to torch
        "onnxruntime": lambda: _make_ort(info, onnx_path=onnx_path, threads=ort_threads, int8=int8,
                                         allow_export=not auto, logger=log, fused=fused,
                                         calibration_views=calibration_views,
                                         execution_mode=ort_execution_mode, **common),
        # int8 is an ONNX Runtime option: auto's last resort runs the torch trunk in fp32 instead
        "torch": lambda: _make_torch(info, int8=bool(int8) and not auto, **common),
    }
    if not auto:
        backend = builders[kind]()
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
        log.info("backend auto: using %s%s", backend.name,
                 "" if not reasons else " (skipped: " + "; ".join(f"{k}: {r}" for k, r in reasons) + ")")
        return backend
    raise BackendUnavailableError("no visual backend could be built: "
                                  + "; ".join(f"{k}: {r}" for k, r in reasons))


def _make_torch(info: ModelInfo, *, device, precision, cache_dir, max_batch, int8) -> VisualBackend:
    if int8:
        raise BackendUnavailableError("int8 is only offered by the onnxruntime backend (dynamic quantisation)")
    from .torch_backend import TorchBackend

    return TorchBackend(info, device=device, precision=precision, max_batch=max_batch)


def _make_ort(info: ModelInfo, *, device, precision, cache_dir, max_batch, onnx_path, threads, int8,
              allow_export, logger, fused=False, calibration_views=None,
              execution_mode="sequential") -> VisualBackend:
    try:
        import onnxruntime  # noqa: F401
    except ImportError as exc:
        raise BackendUnavailableError(f"onnxruntime is not installed ({exc})") from exc
    from .ort_backend import OrtBackend

    return OrtBackend.from_model(info, device=device, precision=precision, onnx_path=onnx_path,
                                 cache_dir=cache_dir, threads=threads, int8=int8, max_batch=max_batch,
                                 allow_export=allow_export, logger=logger, fused=fused,
                                 calibration_views=calibration_views, execution_mode=execution_mode)


def _make_tensorrt(info: ModelInfo, *, device, precision, cache_dir, max_batch, engine_path, int8) -> VisualBackend:
    from .tensorrt_backend import TensorRTBackend, tensorrt_available

    ok, why = tensorrt_available()
    if not ok:
        raise BackendUnavailableError(why)
    if int8:
        raise BackendUnavailableError("int8 TensorRT engines need calibration and are not supported; use fp16")
    if not device.startswith("cuda"):
        raise BackendUnavailableError(f"TensorRT runs on CUDA only, device is {device!r}")
    return TensorRTBackend.from_cache(info, device=device, precision=precision, engine_path=engine_path,
                                      cache_dir=cache_dir, max_batch=max_batch)
