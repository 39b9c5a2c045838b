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

:func:`backends.select.make_backend` picks and builds a backend. ``kind="auto"`` tries TensorRT (needs the
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
