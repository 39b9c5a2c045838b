"""TensorRT engine builder and runtime for the visual trunk (TensorRT 10.x and 11.x).

TensorRT is imported lazily: importing this module never needs it. Engines are built offline with
``runa-ood build-engine`` (minutes), never at node start-up; the node loads a cached engine and
falls back to another backend when none fits (see :func:`select.make_backend`).

Precision
    * ``fp32``: built from the fp32 ONNX; TF32 disabled so results match PyTorch fp32.
    * ``fp16``, mode ``"strongly-typed"`` (default; the only mode on TensorRT 11, which removed
      ``BuilderFlag.FP16``): built from the fp16 ONNX export (float32 I/O) as a strongly typed
      network, so every tensor keeps the type the graph declares. That export keeps every
      LayerNormalization and Softmax in fp32 (Cast islands with fp32 scale/bias, see
      :func:`onnx_export.keep_ops_fp32`), so those layers run in fp32 and matmuls/convolutions in
      fp16.
    * ``fp16``, mode ``"builder-flag"`` (TensorRT 10.x only): fp32 ONNX + ``BuilderFlag.FP16``
      with normalisation, softmax, reduce and pow/sqrt layers pinned to fp32
      (``OBEY_PRECISION_CONSTRAINTS``). A naive FP16 flag without pinning lets LayerNorm run in
      fp16 and CLIP embeddings collapse.

Runtime
    ``set_input_shape`` per call, ``set_tensor_address`` with torch CUDA tensors, and
    ``execute_async_v3`` on torch's current CUDA stream, so no extra synchronisation or host copy
    is needed; batches larger than the profile's max are split (:func:`engine_cache.split_batches`).
    CPU inputs are copied to the GPU and the output returned on the CPU; CUDA inputs stay on the GPU.

Output sets
    One engine per backbone output set (:mod:`runa_ood_node.core.backbone`), built from that set's
    ONNX graph (:func:`onnx_export.export_onnx` with ``outputs``) and keyed by it
    (:func:`engine_cache.engine_cache_key`, ``EngineMeta.outputs``); ``("cls",)`` engines keep
    today's keys and files. With ``xattn`` the engine has a second input ``pairs`` (int32 ``[P, 2]``)
    whose optimisation profile is ``(1, opt, max)`` pairs like the views'; more pairs than the
    profile's max are run in several calls. An engine serves any subset of its set; another set
    is loaded from the cache on first use (never built at run time).
"""
from __future__ import annotations

import logging
import os
import pathlib
import threading
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch

from ..core.backbone import output_set
from .base import BackendUnavailableError, ModelInfo, VisualBackend, cuda_available, default_cache_dir, describe_model
from .engine_cache import (INPUT_NAME, PAIRS_NAME, EngineMeta, EngineMismatchError, Profile, check_engine_compat,
                           engine_cache_key, engine_io_dtypes, engine_path_for, file_sha256, graph_input_names,
                           graph_output_names, normalize_compute_capability)

LOG = logging.getLogger(__name__)

FP16_MODES = ("strongly-typed", "builder-flag")
DEFAULT_PROFILE = Profile(1, 16, 64)


def _import_trt():
    try:
        import tensorrt as trt  # type: ignore
    except Exception as exc:  # ImportError, or the PyPI stub failing to find libnvinfer
        raise BackendUnavailableError(
            f"TensorRT not installed ({type(exc).__name__}: {exc}); install NVIDIA's tensorrt wheel "
            "(JetPack ships it) or use the onnxruntime/torch backend") from exc
    if not hasattr(trt, "Builder") or not hasattr(trt, "Runtime"):
        raise BackendUnavailableError("TensorRT not installed: the 'tensorrt' module found is only a stub "
                                      "without the TensorRT libraries")
    return trt


def tensorrt_available() -> Tuple[bool, str]:
    """``(True, "")`` when TensorRT and a CUDA GPU are usable, else ``(False, reason)``."""
    try:
        trt = _import_trt()
    except BackendUnavailableError as exc:
        return False, str(exc)
    if not cuda_available():
        return False, f"TensorRT {trt.__version__} found but no CUDA device is available to torch"
    return True, ""


def trt_major(version: str) -> int:
    try:
        return int(str(version).split(".")[0])
    except ValueError:
        return 0


def gpu_compute_capability(device: Union[str, torch.device] = "cuda") -> str:
    """``"major.minor"`` of the CUDA device."""
    return normalize_compute_capability(torch.cuda.get_device_capability(torch.device(device)))


class _TrtLogger:
    """Route TensorRT's log into Python logging (created lazily: needs tensorrt)."""

    _instance = None

    @classmethod
    def get(cls, trt):
        if cls._instance is None:
            class Logger(trt.ILogger):
                def __init__(self):
                    trt.ILogger.__init__(self)

                def log(self, severity, msg):
                    level = {trt.ILogger.Severity.INTERNAL_ERROR: logging.CRITICAL,
                             trt.ILogger.Severity.ERROR: logging.ERROR,
                             trt.ILogger.Severity.WARNING: logging.WARNING,
                             trt.ILogger.Severity.INFO: logging.DEBUG}.get(severity, logging.DEBUG)
                    LOG.log(level, "TensorRT: %s", msg)

            cls._instance = Logger()
        return cls._instance


# ---------------------------------------------------------------------- builder
def _pin_fp32_layers(trt, network) -> int:
    """Force precision-sensitive layers to fp32 for ``builder-flag`` fp16 builds; returns the count."""
    sensitive = {getattr(trt.LayerType, n) for n in ("NORMALIZATION", "SOFTMAX", "REDUCE") if hasattr(trt.LayerType, n)}
    pow_ops = {getattr(trt.ElementWiseOperation, n) for n in ("POW",) if hasattr(trt.ElementWiseOperation, n)}
    unary_ops = {getattr(trt.UnaryOperation, n) for n in ("SQRT", "EXP") if hasattr(trt.UnaryOperation, n)}
    pinned = 0
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        pin = layer.type in sensitive
        if not pin and layer.type == trt.LayerType.ELEMENTWISE:
            try:
                layer.__class__ = trt.IElementWiseLayer
                pin = layer.op in pow_ops
            except Exception:
                pin = False
        if not pin and layer.type == trt.LayerType.UNARY:
            try:
                layer.__class__ = trt.IUnaryLayer
                pin = layer.op in unary_ops
            except Exception:
                pin = False
        if pin:
            layer.precision = trt.float32
            for j in range(layer.num_outputs):
                if layer.get_output(j).dtype in (trt.float32, trt.float16):
                    layer.set_output_type(j, trt.float32)
            pinned += 1
    return pinned


def build_engine(model: Any, *, precision: str = "fp16", profile: Union[Profile, Sequence[int]] = DEFAULT_PROFILE,
                 fp16_mode: str = "strongly-typed", cache_dir=None, engine_path=None, onnx_path=None,
                 workspace_mib: int = 4096, force: bool = False, device: str = "cuda",
                 outputs: Sequence[str] = ("cls",)) -> Tuple[pathlib.Path, EngineMeta]:
    """Export the ONNX (cached) and build (or reuse) the TensorRT engine for ``model``.

    Args:
        model: a ``DualEncoder``, its ``visual_trunk`` or a :class:`base.ModelInfo`.
        precision: ``"fp32"`` or ``"fp16"``; fp16_mode: see the module docstring.
        profile: ``(min, opt, max)`` views per call; ``max`` bounds the runtime batch.
        engine_path: explicit output (default: the cache path from :func:`engine_cache.engine_path_for`).
        onnx_path: use this ONNX instead of exporting (must match ``precision``/``fp16_mode``).
        force: rebuild even when a matching engine exists.
        outputs: the backbone output set (one engine per set; ``("cls",)`` = today's engine).

    Returns:
        ``(engine_path, meta)``; the metadata sidecar is written next to the engine.

    Raises:
        BackendUnavailableError: TensorRT or CUDA missing, or fp16 builder-flag mode on TensorRT >= 11.
        RuntimeError: the ONNX parser or the builder failed (their messages are included).
    """
    trt = _import_trt()
    if not cuda_available():
        raise BackendUnavailableError("building a TensorRT engine needs a CUDA GPU")
    if precision not in ("fp32", "fp16"):
        raise ValueError(f"TensorRT precision must be fp32 or fp16, got {precision!r}")
    if fp16_mode not in FP16_MODES:
        raise ValueError(f"fp16_mode must be one of {FP16_MODES}, got {fp16_mode!r}")
    major = trt_major(trt.__version__)
    if precision == "fp16" and fp16_mode == "builder-flag" and not hasattr(trt.BuilderFlag, "FP16"):
        raise BackendUnavailableError(f"TensorRT {trt.__version__} has no BuilderFlag.FP16 (removed in 11); "
                                      "use fp16_mode='strongly-typed'")
    info = model if isinstance(model, ModelInfo) else describe_model(model)
    names = output_set(outputs)
    prof = Profile.coerce(profile)
    strongly_typed = precision == "fp16" and fp16_mode == "strongly-typed"
    if onnx_path is None:
        from .onnx_export import export_onnx

        onnx_path = export_onnx(info, precision="fp16" if strongly_typed else "fp32", cache_dir=cache_dir,
                                outputs=names)
    onnx_path = pathlib.Path(onnx_path)
    cc = gpu_compute_capability(device)
    model_hash = file_sha256(onnx_path)
    key = engine_cache_key(model_hash, trt.__version__, cc, precision, prof, outputs=names)
    out = pathlib.Path(engine_path) if engine_path else engine_path_for(info.model_id, precision, prof, key,
                                                                        default_cache_dir(cache_dir), outputs=names)
    out.parent.mkdir(parents=True, exist_ok=True)
    side = out.with_suffix(".json")
    if not force and out.is_file() and side.is_file():
        try:
            meta = EngineMeta.load(side)
            if meta.key == key:
                LOG.info("TensorRT engine cache hit: %s", out)
                return out, meta
        except EngineMismatchError:
            pass

    logger = _TrtLogger.get(trt)
    builder = trt.Builder(logger)
    flags = 0
    if hasattr(trt.NetworkDefinitionCreationFlag, "EXPLICIT_BATCH") and major < 10:
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
    if strongly_typed and hasattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED"):
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise RuntimeError(f"TensorRT could not parse {onnx_path}: " + "; ".join(errors))
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_mib) << 20)
    S = info.input_size
    opt_profile = builder.create_optimization_profile()
    opt_profile.set_shape(INPUT_NAME, (prof.min, 3, S, S), (prof.opt, 3, S, S), (prof.max, 3, S, S))
    if "xattn" in names:  # the pairs of one call: at least one (a dummy when none is asked for)
        opt_profile.set_shape(PAIRS_NAME, (1, 2), (prof.opt, 2), (prof.max, 2))
    config.add_optimization_profile(opt_profile)
    if precision == "fp32" and hasattr(trt.BuilderFlag, "TF32"):
        config.clear_flag(trt.BuilderFlag.TF32)
    build_mode = "fp32"
    if precision == "fp16":
        if strongly_typed:
            build_mode = "strongly-typed"
        else:
            build_mode = "builder-flag"
            config.set_flag(trt.BuilderFlag.FP16)
            config.set_flag(trt.BuilderFlag.OBEY_PRECISION_CONSTRAINTS)
            pinned = _pin_fp32_layers(trt, network)
            LOG.info("fp16 builder-flag build: %d precision-sensitive layers pinned to fp32", pinned)
    t0 = time.perf_counter()
    LOG.info("building TensorRT %s engine (%s) for %s, profile %s; this takes minutes", precision, build_mode,
             info.model_name, prof.as_tuple())
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RuntimeError("TensorRT build_serialized_network failed (see the TensorRT log above)")
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(bytes(serialized))
    os.replace(tmp, out)
    meta = EngineMeta(key=key, model_id=info.model_id, model_hash=model_hash, trt_version=trt.__version__,
                      compute_capability=cc, precision=precision, profile=prof.as_tuple(), input_size=S,
                      width=info.width, build_mode=build_mode, onnx_path=str(onnx_path),
                      weights_hash=info.weights_hash(), outputs=names)
    meta.save(side)
    LOG.info("TensorRT engine written to %s in %.1f s", out, time.perf_counter() - t0)
    return out, meta


def find_cached_engines(model_id: str, precision: str, cache_dir=None,
                        weights_hash: Optional[str] = None,
                        outputs: Sequence[str] = ("cls",)) -> List[Tuple[pathlib.Path, EngineMeta]]:
    """Engines in the cache for this model (by ``model_id`` or trunk ``weights_hash``), precision and
    output set, newest first, compatible with this machine or not."""
    names = output_set(outputs)
    d = default_cache_dir(cache_dir) / "engines"
    found = []
    ids = {model_id} | ({weights_hash} if weights_hash else set())
    for side in sorted(d.glob(f"*-{precision}-*.json"), key=lambda p: p.stat().st_mtime, reverse=True):
        eng = side.with_suffix(".engine")
        if not eng.is_file():
            continue
        try:
            meta = EngineMeta.load(side)
        except EngineMismatchError:
            continue
        if meta.precision == precision and meta.outputs == names and ids & {meta.model_id, meta.weights_hash}:
            found.append((eng, meta))
    return found


# ---------------------------------------------------------------------- runtime
class TensorRTBackend(VisualBackend):
    """Run a serialized TensorRT engine of the visual trunk.

    Args:
        engine_path: ``.engine`` file with its ``.json`` sidecar (:class:`engine_cache.EngineMeta`).
        device: ``"cuda[:N]"``.
        max_batch: optional cap, at most the profile's max batch (default: that max).
        expect_model_id, expect_precision: checked against the sidecar when given.

    Raises:
        BackendUnavailableError: TensorRT/CUDA missing.
        EngineMismatchError: the engine was built for another TensorRT version, GPU, model or precision.
    """

    def __init__(self, engine_path: Union[str, os.PathLike], device: str = "cuda", max_batch: Optional[int] = None,
                 expect_model_id: Optional[str] = None, expect_precision: Optional[str] = None,
                 expect_outputs: Optional[Sequence[str]] = None, num_tokens: int = 0):
        trt = _import_trt()
        if not cuda_available():
            raise BackendUnavailableError("TensorRT backend needs a CUDA device")
        self.engine_path = pathlib.Path(engine_path)
        if not self.engine_path.is_file():
            raise BackendUnavailableError(f"TensorRT engine {self.engine_path} does not exist; build it with "
                                          "`runa-ood build-engine`")
        self.meta = EngineMeta.load(self.engine_path.with_suffix(".json"))
        self._device = torch.device(device)
        if self._device.index is None:
            self._device = torch.device("cuda", torch.cuda.current_device())
        check_engine_compat(self.meta, trt.__version__, gpu_compute_capability(self._device),
                            model_id=expect_model_id, precision=expect_precision, outputs=expect_outputs)
        with torch.cuda.device(self._device):
            runtime = trt.Runtime(_TrtLogger.get(trt))
            self.engine = runtime.deserialize_cuda_engine(self.engine_path.read_bytes())
            if self.engine is None:
                raise EngineMismatchError(f"TensorRT could not deserialize {self.engine_path} (corrupt, or built by "
                                          "another TensorRT); rebuild it with `runa-ood build-engine`")
            self.context = self.engine.create_execution_context()
        self._runtime = runtime
        self.graph_outputs = self.meta.outputs
        self._tensor_names = dict(zip(self.graph_outputs, graph_output_names(self.graph_outputs)))
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        expected = graph_input_names(self.graph_outputs) + graph_output_names(self.graph_outputs)
        if sorted(names) != sorted(expected):
            raise EngineMismatchError(f"engine I/O tensors are {names}, expected {expected}")
        self._out_dtypes = {}
        for n, tensor in self._tensor_names.items():
            self._in_dtype, self._out_dtypes[n] = engine_io_dtypes(self.engine.get_tensor_dtype(INPUT_NAME),
                                                                   self.engine.get_tensor_dtype(tensor))
        self._max_pairs = 0
        if "xattn" in self.graph_outputs:
            if "INT32" not in str(self.engine.get_tensor_dtype(PAIRS_NAME)).upper():
                raise EngineMismatchError(f"engine input {PAIRS_NAME!r} is not int32; rebuild it")
            _, _, qmax = self.engine.get_tensor_profile_shape(PAIRS_NAME, 0)
            self._max_pairs = int(qmax[0])
        pmin, _, pmax = self.engine.get_tensor_profile_shape(INPUT_NAME, 0)
        self._min_batch, profile_max = int(pmin[0]), int(pmax[0])
        self.max_batch = profile_max if not max_batch else min(int(max_batch), profile_max)
        self.input_size = int(self.meta.input_size)
        self.width = int(self.meta.width)
        self.num_tokens = int(num_tokens)
        self._opener: Optional[Callable[[Tuple[str, ...]], "TensorRTBackend"]] = None
        self.device = str(self._device)
        self.precision = self.meta.precision
        self.name = f"tensorrt-{self.meta.precision}"
        self._lock = threading.Lock()  # one execution context: one inference at a time
        if self.graph_outputs != ("cls",) and not self.num_tokens:
            raise ValueError("an engine with token / attention outputs needs num_tokens (T = 1 + G*G)")

    @classmethod
    def from_cache(cls, model: Any, *, device: str = "cuda", precision: str = "fp16", engine_path=None,
                   cache_dir=None, max_batch: Optional[int] = None,
                   outputs: Sequence[str] = ("cls",)) -> "TensorRTBackend":
        """Load ``engine_path`` or the newest compatible cached engine for ``model``/``precision``/``outputs``.

        Cached engines are found by the encoder's ``model_id`` or by the trunk's weights hash, so an
        engine built from the bare ``visual_trunk`` serves the encoder and vice versa.
        """
        info = model if isinstance(model, ModelInfo) else describe_model(model)
        names = output_set(outputs)
        kw = dict(device=device, max_batch=max_batch, expect_model_id=info.model_id, expect_precision=precision,
                  expect_outputs=names, num_tokens=info.num_tokens)
        if engine_path is not None:
            return cls(engine_path, **kw)
        candidates = find_cached_engines(info.model_id, precision, cache_dir, weights_hash=info.weights_hash(),
                                         outputs=names)
        if not candidates:
            more = "" if names == ("cls",) else f" --outputs {','.join(names)}"
            raise BackendUnavailableError(
                f"no TensorRT {precision} engine cached for model {info.model_name} (model_id {info.model_id}, "
                f"outputs {names}) in {default_cache_dir(cache_dir) / 'engines'}; build one with `runa-ood "
                f"build-engine --model {info.model_name} --precision {precision}{more}` (engines are never built "
                "at start-up)")
        problems = []
        for path, _meta in candidates:
            try:
                be = cls(path, **kw)
            except EngineMismatchError as exc:
                problems.append(f"{path.name}: {exc}")
                continue

            def opener(other: Tuple[str, ...]) -> "TensorRTBackend":
                return cls.from_cache(info, device=device, precision=precision, cache_dir=cache_dir,
                                      max_batch=max_batch, outputs=other)

            be._opener = opener
            return be
        raise BackendUnavailableError("no cached TensorRT engine fits this machine: " + " | ".join(problems))

    def _run_outputs(self, views, names, pairs):
        be = self._for_outputs(names)
        if be is not self:
            return be._run_outputs(views, names, pairs)
        x = views.to(self._device, self._in_dtype, non_blocking=True).contiguous()
        b = int(x.shape[0])
        pad = max(0, self._min_batch - b)
        if pad:  # profiles with min > 1: pad with zeros, drop the padded rows afterwards
            x = torch.cat([x, x.new_zeros((pad,) + tuple(x.shape[1:]))], 0)
        if "xattn" not in self.graph_outputs:
            groups: List[Optional[torch.Tensor]] = [None]
        elif pairs is None or "xattn" not in names:
            groups = [torch.zeros((1, 2), dtype=torch.int32)]   # the engine always takes >= 1 pair
        else:
            p32 = pairs.to(torch.int32)
            groups = [p32[i:i + self._max_pairs] for i in range(0, int(p32.shape[0]), self._max_pairs)]
        results: Dict[str, List[torch.Tensor]] = {n: [] for n in names}
        for gi, grp in enumerate(groups):
            out = self._execute(x, grp)
            for n in names:
                if n == "xattn":
                    results[n].append(out[n].float())
                elif gi == 0:
                    results[n].append(out[n][:b].float())
        return {n: torch.cat(v, 0) if len(v) > 1 else v[0] for n, v in results.items()}

    def _execute(self, x: torch.Tensor, pairs: Optional[torch.Tensor]) -> Dict[str, torch.Tensor]:
        """One engine run: every output of the engine bound (TensorRT needs them all)."""
        B, T, W = int(x.shape[0]), self.num_tokens, self.width
        P = 0 if pairs is None else int(pairs.shape[0])
        shapes = {"cls": (B, W), "tokens": (B, T, W), "attn_cls": (B, T), "xattn": (P, T)}
        out = {n: torch.empty(shapes[n], dtype=self._out_dtypes[n], device=self._device) for n in self.graph_outputs}
        with self._lock, torch.cuda.device(self._device):
            if not self.context.set_input_shape(INPUT_NAME, tuple(x.shape)):
                raise RuntimeError(f"TensorRT rejected input shape {tuple(x.shape)} (profile batch "
                                   f"{self._min_batch}..{self.max_batch})")
            self.context.set_tensor_address(INPUT_NAME, x.data_ptr())
            if pairs is not None:
                p = pairs.to(self._device, torch.int32).contiguous()
                if not self.context.set_input_shape(PAIRS_NAME, tuple(p.shape)):
                    raise RuntimeError(f"TensorRT rejected {P} pairs (profile max {self._max_pairs})")
                self.context.set_tensor_address(PAIRS_NAME, p.data_ptr())
            for n, t in out.items():
                self.context.set_tensor_address(self._tensor_names[n], t.data_ptr())
            stream = torch.cuda.current_stream(self._device)
            if not self.context.execute_async_v3(stream.cuda_stream):
                raise RuntimeError("TensorRT execute_async_v3 failed (see the TensorRT log)")
        return out

    def describe(self) -> dict:
        d = super().describe()
        d.update({"engine": str(self.engine_path), "trt_version": self.meta.trt_version,
                  "compute_capability": self.meta.compute_capability, "profile": list(self.meta.profile),
                  "build_mode": self.meta.build_mode, "outputs": list(self.graph_outputs)})
        return d
