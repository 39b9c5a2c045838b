"""ONNX Runtime visual backend (CPU, or the CUDA execution provider when present).

* fp32: the exported trunk (:mod:`onnx_export`), full graph optimisation.
* fp16: the fp16 export (float32 I/O), opened with ``ORT_ENABLE_EXTENDED`` (ORT 1.32 crashed
  loading such graphs with ``ORT_ENABLE_ALL``). Meant for the CUDA EP; on CPU it is slower.
* int8 (CPU), ``int8="dynamic"`` (or True): weights dynamically quantised per channel to QInt8 with
  ``reduce_range`` (7-bit: exact on AVX2 CPUs without VNNI, where 8-bit weights saturate ORT's int16
  accumulation) (``onnxruntime.quantization.quantize_dynamic``), cached next to the fp32 export as
  ``<stem>-int8dyn.onnx``. Activations are quantised on the fly, so no calibration data is
  needed. :func:`embedding_fidelity` measures how close it stays to fp32 (cosine per embedding).
* int8 (CPU), ``int8="static"``: QDQ graph (``quantize_static``, per-channel QInt8 weights, QUInt8
  activations of the MatMul/Gemm inputs, MinMax calibration on real views), cached as
  ``<stem>-int8qdq.onnx`` keyed by the fp32 file's and the calibration views' sha256. Needs
  ``calibration_views`` (real crops: ``runa-ood bench`` / ``build-engine --int8 static`` use the
  data pack's photographs, else the demo's sample photographs).
* ``graph="fused"``: the trunk exported in fusable form and run through ONNX Runtime's transformer
  optimizer (Attention, SkipLayerNormalization, BiasGelu fusions; :func:`onnx_export.export_fused_onnx`);
  int8 variants then start from the fused graph (dynamic int8 turns ``Attention`` into ``QAttention``).

CUDA tensors given to a CUDA-EP backend are bound in place with IO binding (no host copy) and the
result is returned as a CUDA tensor; CPU tensors go through numpy.
"""
from __future__ import annotations

import json
import logging
import os
import pathlib
import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from ..core.backbone import output_set
from .base import BackendUnavailableError, ModelInfo, VisualBackend, default_cache_dir, describe_model
from .engine_cache import INPUT_NAME, PAIRS_NAME, graph_input_names, graph_output_names

LOG = logging.getLogger(__name__)

QUANT_STATS: Dict[str, int] = {"quantizations": 0}


def int8_path_for(fp32_path: Union[str, os.PathLike], mode: str = "dynamic") -> pathlib.Path:
    p = pathlib.Path(fp32_path)
    return p.with_name(p.stem + ("-int8qdq.onnx" if mode == "static" else "-int8dyn.onnx"))


def int8_mode(int8: Union[bool, str, None]) -> Optional[str]:
    """``False/None/"" -> None``, ``True/"dynamic" -> "dynamic"``, ``"static" -> "static"``."""
    if int8 is None or int8 is False or int8 == "" or int8 == "none":
        return None
    if int8 is True or int8 == "dynamic":
        return "dynamic"
    if int8 == "static":
        return "static"
    raise ValueError(f"int8 must be false, true/'dynamic' or 'static', got {int8!r}")


def _int8_key(src: pathlib.Path) -> Dict[str, object]:
    from .engine_cache import file_sha256

    return {"source_sha256": file_sha256(src), "per_channel": True, "weight_type": "QInt8", "reduce_range": True,
            "method": "quantize_dynamic"}


def int8_cached(fp32_path: Union[str, os.PathLike], out_path: Optional[Union[str, os.PathLike]] = None) -> bool:
    """True when the int8 graph of ``fp32_path`` exists and was quantised from the current fp32 file
    (its sidecar records the fp32 file's sha256; hashing a ViT-B export takes about a second)."""
    src = pathlib.Path(fp32_path)
    out = pathlib.Path(out_path) if out_path is not None else int8_path_for(src)
    if not out.is_file() or not src.is_file():
        return False
    try:
        return json.loads(out.with_suffix(".json").read_text()).get("key") == _int8_key(src)
    except (OSError, ValueError):
        return False


def quantize_dynamic_file(src: Union[str, os.PathLike], dst: Union[str, os.PathLike]) -> None:
    """The dynamic int8 quantisation of the int8 variants (no cache, no counters): per channel QInt8
    weights, 7-bit (``reduce_range``), float32 as the default tensor type. ``runa-ood bench``'s
    int8 GEMM peak quantises its probe graph with it too."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    # DefaultTensorType: the fused graph's contrib ops (Attention, SkipLayerNormalization) have no
    # ONNX shape inference; their outputs are float32
    # reduce_range (7-bit weights): on CPUs without VNNI (AVX2) ORT's u8s8 kernels add products in
    # saturating int16; full-range weights overflow there and ViT-B embeddings drop to cosine ~0.988
    # to fp32 (measured, ViT-B-32/B-16 on real crops); 7-bit weights keep >= 0.9998 at the same speed
    quantize_dynamic(str(src), str(dst), per_channel=True, weight_type=QuantType.QInt8, reduce_range=True,
                     extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT})


def quantize_int8(fp32_path: Union[str, os.PathLike], out_path: Optional[Union[str, os.PathLike]] = None,
                  force: bool = False) -> pathlib.Path:
    """Dynamic int8 quantisation (per channel, QInt8 weights) of an fp32 ONNX, cached.

    The output is reused when its sidecar records the sha256 of the current fp32 file.
    """
    src = pathlib.Path(fp32_path)
    out = pathlib.Path(out_path) if out_path is not None else int8_path_for(src)
    side = out.with_suffix(".json")
    if not force and int8_cached(src, out):
        return out
    key = _int8_key(src)
    tmp = out.with_name(out.stem + f".tmp{os.getpid()}.onnx")
    try:
        quantize_dynamic_file(src, tmp)
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            tmp.unlink()
    side_tmp = side.with_name(side.name + f".tmp{os.getpid()}")
    side_tmp.write_text(json.dumps({"key": key}, indent=2, sort_keys=True))
    os.replace(side_tmp, side)
    QUANT_STATS["quantizations"] += 1
    LOG.info("quantised %s -> %s (dynamic int8, per channel)", src.name, out)
    return out


STATIC_OPS = ("MatMul", "Gemm")


def _static_key(src: pathlib.Path, views_sha: str) -> Dict[str, object]:
    from .engine_cache import file_sha256

    return {"source_sha256": file_sha256(src), "calibration_sha256": views_sha, "format": "QDQ",
            "per_channel": True, "weight_type": "QInt8", "activation_type": "QUInt8", "calibrate": "MinMax",
            "reduce_range": True,
            "ops": list(STATIC_OPS), "method": "quantize_static"}


def _views_sha(views: torch.Tensor) -> str:
    import hashlib

    a = np.ascontiguousarray(views.detach().to("cpu", torch.float32).numpy())
    return hashlib.sha256(str(a.shape).encode() + a.tobytes()).hexdigest()[:16]


def int8_static_cached(fp32_path: Union[str, os.PathLike]) -> bool:
    """True when a static int8 graph of ``fp32_path`` exists and was made from the current fp32 file
    (whatever calibration set it used: the sidecar records it)."""
    from .engine_cache import file_sha256

    src = pathlib.Path(fp32_path)
    out = int8_path_for(src, "static")
    if not out.is_file() or not src.is_file():
        return False
    try:
        key = json.loads(out.with_suffix(".json").read_text()).get("key", {})
    except (OSError, ValueError):
        return False
    return key.get("method") == "quantize_static" and key.get("source_sha256") == file_sha256(src)


def quantize_int8_static(fp32_path: Union[str, os.PathLike], calibration_views: torch.Tensor,
                         out_path: Optional[Union[str, os.PathLike]] = None, force: bool = False,
                         batch: int = 8) -> pathlib.Path:
    """Static (calibrated) int8 quantisation of an fp32 ONNX into a QDQ graph, cached.

    Weights per channel QInt8; activations feeding MatMul/Gemm QUInt8 with MinMax ranges from
    ``calibration_views`` (``[B,3,S,S]`` normalised real views); LayerNorm, softmax, GELU stay fp32.
    Reused when its sidecar records the sha256 of the current fp32 file and of these views.
    """
    from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType,
                                          quantize_static)

    if not isinstance(calibration_views, torch.Tensor) or calibration_views.ndim != 4 or not len(calibration_views):
        raise ValueError("static int8 needs calibration_views: a non-empty [B,3,S,S] tensor of real views")
    src = pathlib.Path(fp32_path)
    out = pathlib.Path(out_path) if out_path is not None else int8_path_for(src, "static")
    side = out.with_suffix(".json")
    key = _static_key(src, _views_sha(calibration_views))
    if not force and out.is_file():
        try:
            if json.loads(side.read_text()).get("key") == key:
                return out
        except (OSError, ValueError):
            pass
    arr = calibration_views.detach().to("cpu", torch.float32).numpy()
    import onnx

    with_pairs = PAIRS_NAME in [i.name for i in onnx.load(str(src), load_external_data=False).graph.input]

    def feed(chunk: np.ndarray) -> Dict[str, np.ndarray]:
        d = {INPUT_NAME: np.ascontiguousarray(chunk)}
        if with_pairs:  # graphs with xattn: each view's CLS query against its neighbour's keys
            b = len(chunk)
            d[PAIRS_NAME] = np.stack([np.arange(b), (np.arange(b) + 1) % b], 1).astype(np.int32)
        return d

    class Reader(CalibrationDataReader):
        def __init__(self):
            self._it = iter([feed(arr[i:i + batch]) for i in range(0, len(arr), batch)])

        def get_next(self):
            return next(self._it, None)

    tmp = out.with_name(out.stem + f".tmp{os.getpid()}.onnx")
    t0 = time.perf_counter()
    try:
        quantize_static(str(src), str(tmp), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                        weight_type=QuantType.QInt8, activation_type=QuantType.QUInt8, reduce_range=True,
                        calibrate_method=CalibrationMethod.MinMax, op_types_to_quantize=list(STATIC_OPS),
                        extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT})
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            tmp.unlink()
        for junk in out.parent.glob("augmented_model*.onnx"):  # older ORT versions leave the calibration graph
            junk.unlink(missing_ok=True)
    side_tmp = side.with_name(side.name + f".tmp{os.getpid()}")
    side_tmp.write_text(json.dumps({"key": key, "calibration_views": int(arr.shape[0])}, indent=2, sort_keys=True))
    os.replace(side_tmp, side)
    QUANT_STATS["static_quantizations"] = QUANT_STATS.get("static_quantizations", 0) + 1
    LOG.info("quantised %s -> %s (static int8 QDQ, %d calibration views, %.1f s)", src.name, out, arr.shape[0],
             time.perf_counter() - t0)
    return out


class OrtBackend(VisualBackend):
    """ONNX Runtime session over an exported trunk.

    Every backbone output set is served: the graph of ``outputs`` (see
    :func:`onnx_export.export_onnx`) serves any subset of it in one run; a request outside it opens
    (once, on first use) the session of that output set through the opener :meth:`from_model`
    installs, made from the same variant (plain / fused / int8) and cache.

    Args:
        onnx_path: the ONNX graph (input ``views``, output ``features``; other output sets: the
            inputs / outputs of :func:`engine_cache.graph_input_names` / ``graph_output_names``).
        input_size, width: S and the feature size (checked against the graph's output).
        outputs: the backbone output set the graph emits (default today's ``("cls",)``).
        num_tokens: T (1 + G*G) of the model, for the shapes of empty outputs.
        device: ``"cpu"`` or ``"cuda[:N]"`` (needs ``CUDAExecutionProvider``).
        precision: label of the graph's precision (``fp32``, ``fp16``, ``int8``); fp16 graphs are
            opened with ``ORT_ENABLE_EXTENDED``.
        threads: intra-op threads (None = ORT default = all physical cores).
        max_batch: optional cap per ``run`` call.
        spin: let ORT's worker threads busy-wait between runs (ORT's default). Off by default here:
            on a vehicle computer shared with other nodes (and with the torch text tower / other
            sessions in this process) spinning threads steal whole cores for a few ms after every
            call, for a small latency gain.
        execution_mode: ``"sequential"`` (ORT's default: one node after the other, each using the
            intra-op threads) or ``"parallel"`` (independent nodes concurrently on inter-op threads;
            ``threads`` then also sets the inter-op pool). ``runa-ood bench`` measures both.
    """

    def __init__(self, onnx_path: Union[str, os.PathLike], input_size: int, width: int, device: str = "cpu",
                 precision: str = "fp32", threads: Optional[int] = None, max_batch: Optional[int] = None,
                 spin: bool = False, execution_mode: str = "sequential", outputs: Sequence[str] = ("cls",),
                 num_tokens: int = 0):
        import onnxruntime as ort

        self.graph_outputs = output_set(outputs)
        self.num_tokens = int(num_tokens)
        self._opener: Optional[Callable[[Tuple[str, ...]], "OrtBackend"]] = None
        self.onnx_path = pathlib.Path(onnx_path)
        if not self.onnx_path.is_file():
            raise BackendUnavailableError(f"ONNX file {self.onnx_path} does not exist")
        self.device = device
        self.precision = precision
        self.max_batch = max_batch
        self.input_size = int(input_size)
        self.width = int(width)
        self.threads = threads
        so = ort.SessionOptions()
        so.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED if precision == "fp16"
                                       else ort.GraphOptimizationLevel.ORT_ENABLE_ALL)
        if execution_mode not in ("sequential", "parallel"):
            raise ValueError(f"execution_mode must be 'sequential' or 'parallel', got {execution_mode!r}")
        self.execution_mode = execution_mode
        if execution_mode == "parallel":
            so.execution_mode = ort.ExecutionMode.ORT_PARALLEL
        if threads is not None:
            if int(threads) < 1:
                raise ValueError(f"ort_threads must be >= 1, got {threads}")
            so.intra_op_num_threads = int(threads)
            so.inter_op_num_threads = int(threads) if execution_mode == "parallel" else 1
        so.log_severity_level = 3
        if not spin:
            so.add_session_config_entry("session.intra_op.allow_spinning", "0")
            so.add_session_config_entry("session.inter_op.allow_spinning", "0")
        available = ort.get_available_providers()
        self._cuda = device.startswith("cuda")
        if self._cuda:
            if "CUDAExecutionProvider" not in available:
                raise BackendUnavailableError(
                    f"device {device!r} requested but ONNX Runtime has no CUDAExecutionProvider (providers: {available}); "
                    "install onnxruntime-gpu or use device='cpu'")
            self._device_id = int(device.split(":")[1]) if ":" in device else 0
            providers = [("CUDAExecutionProvider", {"device_id": self._device_id}), "CPUExecutionProvider"]
        else:
            providers = ["CPUExecutionProvider"]
        self.session = ort.InferenceSession(str(self.onnx_path), so, providers=providers)
        if self._cuda and "CUDAExecutionProvider" not in self.session.get_providers():
            raise BackendUnavailableError(f"ONNX Runtime could not start the CUDA provider for {self.onnx_path.name}")
        ins = [i.name for i in self.session.get_inputs()]
        outs = [o.name for o in self.session.get_outputs()]
        want_in, want_out = graph_input_names(self.graph_outputs), graph_output_names(self.graph_outputs)
        if ins != want_in or outs != want_out:
            raise BackendUnavailableError(f"{self.onnx_path} has inputs {ins} / outputs {outs}; expected "
                                          f"{want_in} / {want_out} for outputs {self.graph_outputs} (re-export it)")
        self._tensor_names = dict(zip(self.graph_outputs, want_out))
        out_shape = self.session.get_outputs()[0].shape
        if "cls" in self.graph_outputs and isinstance(out_shape[-1], int) and out_shape[-1] != self.width:
            raise BackendUnavailableError(f"{self.onnx_path} outputs width {out_shape[-1]}, model has {self.width}")
        self.name = f"onnxruntime-{'cuda' if self._cuda else 'cpu'}-{precision}"

    @classmethod
    def from_model(cls, model, *, device: str = "cpu", precision: str = "fp32",
                   onnx_path: Optional[Union[str, os.PathLike]] = None, cache_dir=None,
                   threads: Optional[int] = None, int8: Union[bool, str] = False, max_batch: Optional[int] = None,
                   allow_export: bool = True, logger: Optional[logging.Logger] = None, fused: bool = False,
                   calibration_views: Optional[torch.Tensor] = None,
                   execution_mode: str = "sequential", outputs: Sequence[str] = ("cls",)) -> "OrtBackend":
        """Open a session for ``model``, exporting / quantising into the cache when allowed.

        Args:
            model: a ``DualEncoder``, its ``visual_trunk`` or a :class:`base.ModelInfo`.
            onnx_path: an existing graph to run as is (no export, no cache look-up).
            allow_export: when no valid cached export (and, with ``int8``, quantised graph) exists:
                True exports it now, logging a WARNING first (30-60 s for a ViT-B on a small CPU);
                False raises :class:`BackendUnavailableError` naming the command that pre-exports it
                (``backend: auto`` passes False: a vehicle must not stall at start-up).
            logger: where the export warning goes (default this module's logger).
            int8: False, True/``"dynamic"`` or ``"static"`` (see the module docstring).
            fused: start from the fused graph (ONNX Runtime transformer fusions) instead of the plain export.
            calibration_views: real views for ``int8="static"`` when the static graph must be made.
            execution_mode: ``"sequential"`` or ``"parallel"`` (see the class).
            outputs: the backbone output set of the graph opened first (requests outside it open
                the graph of their own set on first use, with the same options). Attention outputs
                in a fused graph come from a separate, unfused branch per block (the fused
                ``Attention`` op has no probabilities); the blocks stay fused.
        """
        log = logger or LOG
        names = output_set(outputs)
        given_path = onnx_path
        info = model if isinstance(model, ModelInfo) else describe_model(model)
        mode = int8_mode(int8)
        int8 = mode is not None
        if int8 and precision != "fp32":
            raise BackendUnavailableError("int8 quantisation starts from the fp32 graph; use precision='fp32' with int8")
        if int8 and device.startswith("cuda"):
            raise BackendUnavailableError("dynamic int8 ONNX graphs run on the CPU provider only; use TensorRT fp16 on GPU")
        label = precision
        if onnx_path is None:
            from .onnx_export import export_fused_onnx, export_onnx, find_cached_fused, find_cached_onnx

            hint = (f"`runa-ood build-engine --model {info.model_name} --onnx-only{' --fused' if fused else ''}"
                    f"{f' --int8 {mode}' if int8 else ''}"
                    f"{'' if names == ('cls',) else ' --outputs ' + ','.join(names)}` "
                    "(with the node's --pretrained weights and cache dir)")
            if fused and precision != "fp32":
                raise BackendUnavailableError("the fused ONNX Runtime graph is fp32 (optionally int8); use precision='fp32'")
            if fused:
                cached = find_cached_fused(info, cache_dir=cache_dir, outputs=names)
                if cached is None:
                    if not allow_export:
                        raise BackendUnavailableError(f"no fused ONNX graph for model {info.model_name} (model_id "
                                                      f"{info.model_id}) in the cache; run {hint} beforehand")
                    log.warning("no fused ONNX graph for %s: exporting and fusing it now (about a minute for a ViT-B)",
                                info.model_name)
                    cached = export_fused_onnx(info, cache_dir=cache_dir, outputs=names)
            else:
                cached = find_cached_onnx(info, precision=precision, cache_dir=cache_dir, outputs=names)
            if cached is None:
                where = default_cache_dir(cache_dir) / "onnx"
                if not allow_export:
                    raise BackendUnavailableError(
                        f"no exported ONNX for model {info.model_name} (model_id {info.model_id}, {precision}, "
                        f"outputs {names}) in "
                        f"{where}; run {hint} beforehand")
                log.warning("no exported %s ONNX for model %s (model_id %s) in %s: exporting it now, which takes "
                            "30-60 s for a ViT-B on a small CPU; run %s beforehand to start without this delay",
                            precision, info.model_name, info.model_id, where, hint)
                t0 = time.perf_counter()
                cached = export_onnx(info, precision=precision, cache_dir=cache_dir, outputs=names)
                log.warning("exported %s in %.1f s", cached.name, time.perf_counter() - t0)
            onnx_path = cached
            if mode == "static" and calibration_views is None and not int8_static_cached(onnx_path):
                raise BackendUnavailableError(
                    f"no static int8 graph next to {pathlib.Path(onnx_path).name} and no calibration views to make "
                    f"one; run {hint} beforehand")
            if mode == "dynamic" and not int8_cached(onnx_path):
                if not allow_export:
                    raise BackendUnavailableError(
                        f"no int8-quantised ONNX for model {info.model_name} (model_id {info.model_id}) next to "
                        f"{pathlib.Path(onnx_path).name}; run {hint} beforehand")
                log.warning("quantising %s to int8 now (seconds to a minute); run %s beforehand to skip this",
                            pathlib.Path(onnx_path).name, hint)
        if mode == "dynamic":
            onnx_path = quantize_int8(onnx_path)
            label = "int8"
        elif mode == "static":
            if calibration_views is not None:
                onnx_path = quantize_int8_static(onnx_path, calibration_views)
            else:
                onnx_path = int8_path_for(onnx_path, "static")
            label = "int8-static"
        be = cls(onnx_path, info.input_size, info.width, device=device, precision=label, threads=threads,
                 max_batch=max_batch, execution_mode=execution_mode, outputs=names, num_tokens=info.num_tokens)
        if fused:
            be.name += "-fused"
        if given_path is None:  # an explicit onnx_path is one graph: no other output set can be derived
            def opener(other: Tuple[str, ...]) -> "OrtBackend":
                return cls.from_model(info, device=device, precision=precision, cache_dir=cache_dir, threads=threads,
                                      int8=int8 and mode, max_batch=max_batch, allow_export=allow_export,
                                      logger=logger, fused=fused, calibration_views=calibration_views,
                                      execution_mode=execution_mode, outputs=other)

            be._opener = opener
        return be

    def _feed_pairs(self, pairs: Optional[torch.Tensor]) -> np.ndarray:
        # a graph with xattn always takes pairs: one dummy pair when the request has none
        p = np.zeros((1, 2), np.int32) if pairs is None else pairs.detach().to("cpu", torch.int32).numpy()
        return np.ascontiguousarray(p)

    def _run_outputs(self, views, names, pairs):
        be = self._for_outputs(names)
        if be is not self:
            return be._run_outputs(views, names, pairs)
        if self._cuda and views.is_cuda:
            return self._run_iobinding(views, names, pairs)
        feed = {INPUT_NAME: views.detach().to("cpu", torch.float32).contiguous().numpy()}
        if PAIRS_NAME in [i.name for i in self.session.get_inputs()]:
            feed[PAIRS_NAME] = self._feed_pairs(pairs)
        outs = self.session.run([self._tensor_names[n] for n in names], feed)
        return {n: torch.from_numpy(np.asarray(o, dtype=np.float32)) for n, o in zip(names, outs)}

    def _run_iobinding(self, views: torch.Tensor, names, pairs) -> Dict[str, torch.Tensor]:
        x = views.to(torch.float32).contiguous()
        B, T, P = int(x.shape[0]), self.num_tokens, 0 if pairs is None else int(pairs.shape[0])
        shapes = {"cls": (B, self.width), "tokens": (B, T, self.width), "attn_cls": (B, T), "xattn": (P, T)}
        outs = {n: torch.empty(shapes[n], dtype=torch.float32, device=x.device) for n in names}
        binding = self.session.io_binding()
        dev_id = x.device.index or 0
        binding.bind_input(INPUT_NAME, "cuda", dev_id, np.float32, tuple(x.shape), x.data_ptr())
        if "xattn" in self.graph_outputs:
            binding.bind_cpu_input(PAIRS_NAME, self._feed_pairs(pairs))
        for n, t in outs.items():
            binding.bind_output(self._tensor_names[n], "cuda", dev_id, np.float32, tuple(t.shape), t.data_ptr())
        for n in self.graph_outputs:  # outputs not asked for still need a home: ORT allocates them
            if n not in outs:
                binding.bind_output(self._tensor_names[n], "cuda", dev_id)
        torch.cuda.current_stream(x.device).synchronize()  # ORT runs on its own stream
        self.session.run_with_iobinding(binding)
        return outs

    def describe(self) -> dict:
        d = super().describe()
        d.update({"onnx": str(self.onnx_path), "threads": self.threads, "execution_mode": self.execution_mode,
                  "providers": self.session.get_providers(), "outputs": list(self.graph_outputs)})
        return d


def cosine_rows(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Row-wise cosine similarity of two ``[N, D]`` tensors (float64 for a precise figure)."""
    a = a.detach().to("cpu", torch.float64)
    b = b.detach().to("cpu", torch.float64)
    return (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1)).clamp_min(1e-300)


def embedding_fidelity(reference, candidate, views: torch.Tensor,
                       projection: Optional[torch.Tensor] = None) -> Dict[str, float]:
    """How close ``candidate``'s features stay to ``reference``'s on ``views``.

    Args:
        reference, candidate: backends (callables views -> features), e.g. ORT fp32 and ORT int8.
        views: ``[B,3,S,S]`` real views (crops of real photographs give realistic figures).
        projection: optional ``[width, D]``; when given, cosines are also reported for the
            projected joint-space embeddings (what the scores use).

    Returns:
        ``{"n", "feature_cos_min", "feature_cos_mean", "embedding_cos_min", "embedding_cos_mean"}``
        (embedding_* only with ``projection``).
    """
    ref = reference(views)
    cand = candidate(views)
    c = cosine_rows(ref, cand)
    res = {"n": int(views.shape[0]), "feature_cos_min": float(c.min()), "feature_cos_mean": float(c.mean())}
    if projection is not None:
        P = projection.to("cpu", torch.float64)
        e = cosine_rows(ref.to("cpu", torch.float64) @ P, cand.to("cpu", torch.float64) @ P)
        res.update({"embedding_cos_min": float(e.min()), "embedding_cos_mean": float(e.mean())})
    return res


# ---------------------------------------------------------------------- backend: auto on a CPU
#: the CPU variants ``backend: auto`` chooses between, fastest first as usually measured (each only when
#: in the cache; :func:`export_variants` makes them in this order when none is)
AUTO_VARIANTS: Dict[str, Dict[str, object]] = {"fused-int8": {"fused": True, "int8": "dynamic"},
                                               "int8": {"int8": "dynamic"}, "int8-static": {"int8": "static"},
                                               "fused": {"fused": True}, "plain": {}}
#: the embedding cosine to torch fp32 (min over real views) a variant must hold to be chosen
AUTO_FIDELITY_MIN = 0.999
#: and the attention averages' max |delta| to torch fp32 (outputs attn_cls / xattn; the int8 bound of
#: tests/test_backbone_backends.py: ViT-B-32 int8 stays near 1e-4)
AUTO_ATTN_MAX = 5e-3
#: seconds ``backend: auto`` may spend exporting CPU variants when none is cached (steps are not
#: started past it; a ViT-B-32 on 2 cores: plain ~40 s, int8 ~10 s, static ~30 s, fused ~60 s)
AUTO_EXPORT_BUDGET_S = 240.0
#: timed rounds of every variant when auto measures at start-up (each round: every sample call once)
AUTO_REPEATS = 3
#: calls of the sample auto times (one per photograph, as the node's one call per frame)
AUTO_TIMED_CALLS = 4


def cpu_identity() -> Dict[str, object]:
    """What makes a CPU measurement valid elsewhere: model name, logical CPUs, the SIMD flags the
    int8 / fp32 kernels dispatch on, ONNX Runtime's version. A record made on another CPU is re-measured."""
    import platform

    name, flags = platform.processor() or platform.machine(), set()
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            key, _, val = line.partition(":")
            if key.strip() == "model name" and val.strip():
                name = val.strip()
            elif key.strip() == "flags":
                flags = set(val.split())
                break
    except OSError:
        pass
    import onnxruntime

    simd = sorted(f for f in flags if f.startswith(("avx", "amx")) or f in ("fma", "f16c", "vnni", "sse4_2"))
    return {"model": name, "logical_cpus": os.cpu_count(), "simd": simd, "onnxruntime": onnxruntime.__version__}


def auto_record_path(model_id: str, cache_dir=None, outputs: Sequence[str] = ("cls",)) -> pathlib.Path:
    """``<cache>/onnx/<model_id>-auto-cpu[-o<outputs>].json``: what :func:`choose_auto_variant` measured."""
    from .engine_cache import outputs_file_tag

    return default_cache_dir(cache_dir) / "onnx" / f"{model_id}-auto-cpu{outputs_file_tag(outputs)}.json"


def output_fidelity(ref: Dict[str, torch.Tensor], cand: Dict[str, torch.Tensor],
                    projection: Optional[torch.Tensor] = None) -> Dict[str, float]:
    """``cos_min``: min cosine of the embeddings (``cls`` and every ``tokens`` row, projected by
    ``projection`` when given) of ``cand`` to ``ref``; ``attn_max_abs``: max |delta| of the attention
    averages (``attn_cls``, ``xattn``; None when the set has none)."""
    cos = []
    for n in ("cls", "tokens"):
        if n in ref:
            a, b = ref[n].reshape(-1, ref[n].shape[-1]), cand[n].reshape(-1, cand[n].shape[-1])
            if projection is not None:
                P = projection.to("cpu", torch.float64)
                a, b = a.to("cpu", torch.float64) @ P, b.to("cpu", torch.float64) @ P
            cos.append(float(cosine_rows(a, b).min()))
    attn = [float((ref[n].double() - cand[n].double()).abs().max()) for n in ("attn_cls", "xattn")
            if n in ref and ref[n].numel()]
    return {"cos_min": min(cos) if cos else 1.0, "attn_max_abs": max(attn) if attn else None}


def _as_sample(views, outputs, pairs=None):
    from .samples import Sample

    if isinstance(views, Sample):
        return views
    if pairs is None:
        return Sample.of_views(views, outputs)
    return Sample(views=views, pairs=pairs, calls=[(views, pairs)], source="views")


def choose_auto_variant(model, views, *, projection: Optional[torch.Tensor] = None, cache_dir=None,
                        outputs: Sequence[str] = ("cls",), threads: Optional[int] = None, repeats: int = 5,
                        fidelity_min: float = AUTO_FIDELITY_MIN, attn_max: float = AUTO_ATTN_MAX,
                        timed_calls: Optional[int] = None) -> Dict[str, object]:
    """Time every CPU variant already in the cache on real views, check its fidelity to torch fp32,
    and record the fastest one that holds it for ``backend: auto`` (never exports). The one
    implementation behind ``runa-ood build-engine --auto-choice`` and ``backend: auto``'s measurement
    at start-up (:func:`ensure_auto_choice`).

    ``views``: a ``[B,3,S,S]`` tensor (one call; with ``xattn`` each view against its neighbour) or a
    :class:`samples.Sample` (a method's own calls: fidelity on all its views and pairs, timing on
    its first ``timed_calls`` calls, one after the other as the node makes them). Each variant serves
    the output set, alternating with the others (``repeats`` rounds, median ms per round); fidelity:
    :func:`output_fidelity` to the torch trunk (embedding cosine >= ``fidelity_min``, attention
    max |delta| <= ``attn_max``). The torch trunk's own time (first round only) is recorded as
    ``torch_ms_median`` (a reference, not a candidate). The record (JSON next to the graphs, :func:`auto_record_path`) names
    each graph with its sha256 (a re-exported graph invalidates the choice) and this CPU
    (:func:`cpu_identity`: a record made on another CPU is measured again). Returns the record.
    """
    from .engine_cache import file_sha256
    from .torch_backend import TorchBackend

    info = model if isinstance(model, ModelInfo) else describe_model(model)
    names = output_set(outputs)
    sample = _as_sample(views, names)
    timed = sample.calls if timed_calls is None else sample.calls[:max(1, int(timed_calls))]
    pairs = sample.pairs if "xattn" in names else None
    call_pairs = [(v, p if "xattn" in names else None) for v, p in timed]
    ref = TorchBackend(info)
    t0 = time.perf_counter()
    ref_out = ref.outputs(sample.views, names, pairs)
    record: Dict[str, object] = {"model_id": info.model_id, "outputs": list(names), "fidelity_min": fidelity_min,
                                 "attn_max": attn_max, "views": int(sample.views.shape[0]),
                                 "timed_calls": len(call_pairs), "timed_views": sum(int(v.shape[0]) for v, _ in timed),
                                 "sample": sample.source, "repeats": int(repeats), "threads": threads,
                                 "cpu": cpu_identity(), "variants": {}, "chosen": None}
    opened: Dict[str, object] = {"torch": ref}
    for name, kw in AUTO_VARIANTS.items():
        try:
            be = OrtBackend.from_model(info, cache_dir=cache_dir, threads=threads, allow_export=False, outputs=names,
                                       **kw)
        except BackendUnavailableError as exc:
            record["variants"][name] = {"error": str(exc)}
            continue
        fid = output_fidelity(ref_out, be.outputs(sample.views, names, pairs), projection)
        record["variants"][name] = {"onnx": str(be.onnx_path), "sha256": file_sha256(be.onnx_path, memo=True),
                                    "cos_min": fid["cos_min"], "attn_max_abs": fid["attn_max_abs"], "ms": []}
        opened[name] = be
    ms: Dict[str, List[float]] = {n: [] for n in opened}
    for r in range(max(1, int(repeats))):  # interleaved rounds: every variant sees the same machine load
        order = list(opened) if r == 0 else [n for n in opened if n != "torch"]  # torch: a reference, timed once
        for name in order[r % len(order):] + order[:r % len(order)]:
            be = opened[name]
            t1 = time.perf_counter()
            for v, p in call_pairs:
                be.outputs(v, names, p)
            ms[name].append((time.perf_counter() - t1) * 1e3)
    record["torch_ms_median"] = float(np.median(ms.pop("torch")))
    ok = []
    for name in ms:
        v = record["variants"][name]
        v.pop("ms")
        v["ms_median"] = float(np.median(ms[name]))
        v["holds_fidelity"] = bool(v["cos_min"] >= fidelity_min and (v["attn_max_abs"] or 0.0) <= attn_max)
        if v["holds_fidelity"]:
            ok.append((v["ms_median"], name))
    record["chosen"] = min(ok)[1] if ok else None
    record["measured_s"] = round(time.perf_counter() - t0, 2)
    path = auto_record_path(info.model_id, cache_dir, names)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(record, indent=2, sort_keys=True))
    os.replace(tmp, path)
    LOG.info("backend auto on CPU (%s, outputs %s) will use %s; measured in %.1f s on %s: %s; torch %.1f ms",
             info.model_name, ",".join(names), record["chosen"], record["measured_s"], sample.source,
             ", ".join(f"{n}: {v['ms_median']:.1f} ms, cos {v['cos_min']:.5f}" + ("" if v["holds_fidelity"] else
                                                                                   " (below fidelity)")
                       for n, v in record["variants"].items() if "ms_median" in v), record["torch_ms_median"])
    return record


def auto_choice_status(info: ModelInfo, cache_dir=None, outputs: Sequence[str] = ("cls",)
                       ) -> Tuple[Optional[Dict[str, object]], str]:
    """``(choice, why)``: the recorded choice of :func:`choose_auto_variant` for this model and output
    set (``{"name", "options", "sha256", "ms_median", "cos_min", ...}``) when it holds here, else
    ``(None, why not)``: no record, unreadable, made on another CPU, no variant held the fidelity."""
    path = auto_record_path(info.model_id, cache_dir, outputs)
    if not path.is_file():
        return None, "no recorded measurement"
    try:
        rec = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        return None, f"unreadable record {path.name} ({exc})"
    cpu = rec.get("cpu")
    if cpu is not None and cpu != cpu_identity():
        return None, f"recorded on another CPU ({cpu.get('model')}, {cpu.get('logical_cpus')} CPUs)"
    chosen = rec.get("chosen")
    if chosen not in AUTO_VARIANTS or not rec.get("variants", {}).get(chosen, {}).get("holds_fidelity"):
        return None, "no recorded variant held the fidelity"
    from .engine_cache import file_sha256

    graph = pathlib.Path(str(rec["variants"][chosen].get("onnx", "")))
    if not graph.is_file() or file_sha256(graph, memo=True) != rec["variants"][chosen].get("sha256"):
        return None, f"the recorded {chosen} graph changed or is gone since it was measured"
    return {"name": chosen, "options": AUTO_VARIANTS[chosen], "record": str(path), **rec["variants"][chosen]}, \
        "recorded"


def auto_choice(info: ModelInfo, cache_dir=None, outputs: Sequence[str] = ("cls",)) -> Optional[Dict[str, object]]:
    """The recorded choice of :func:`choose_auto_variant` for this model and output set, or None
    (see :func:`auto_choice_status`)."""
    return auto_choice_status(info, cache_dir, outputs)[0]


def cached_variants(info: ModelInfo, cache_dir=None, outputs: Sequence[str] = ("cls",)) -> List[str]:
    """The :data:`AUTO_VARIANTS` whose graph is in the cache for this model and output set (never exports)."""
    from .onnx_export import find_cached_fused, find_cached_onnx

    names = output_set(outputs)
    plain = find_cached_onnx(info, cache_dir=cache_dir, outputs=names)
    fused = find_cached_fused(info, cache_dir=cache_dir, outputs=names)
    have = {"plain": plain is not None, "fused": fused is not None,
            "int8": plain is not None and int8_cached(plain), "fused-int8": fused is not None and int8_cached(fused),
            "int8-static": plain is not None and int8_static_cached(plain)}
    return [n for n in AUTO_VARIANTS if have[n]]


def export_variants(info: ModelInfo, sample, *, cache_dir=None, outputs: Sequence[str] = ("cls",),
                    budget_s: float = AUTO_EXPORT_BUDGET_S, logger: Optional[logging.Logger] = None
                    ) -> Dict[str, object]:
    """Export the CPU variants of this output set into the cache, in the order plain, int8 (dynamic),
    int8-static (calibrated on ``sample``'s views: the method's own), fused, fused-int8, starting no
    step once ``budget_s`` seconds have passed (a step under way finishes). Returns
    ``{"made": {variant: seconds}, "skipped": [variant, ...], "seconds": total}``, logged."""
    from .onnx_export import export_fused_onnx, export_onnx

    log = logger or LOG
    names = output_set(outputs)
    t0 = time.perf_counter()
    made: Dict[str, float] = {}
    skipped: List[str] = []
    paths: Dict[str, pathlib.Path] = {}
    steps = [("plain", lambda: export_onnx(info, cache_dir=cache_dir, outputs=names)),
             ("int8", lambda: quantize_int8(paths["plain"])),
             ("int8-static", lambda: quantize_int8_static(paths["plain"], sample.views)),
             ("fused", lambda: export_fused_onnx(info, cache_dir=cache_dir, outputs=names)),
             ("fused-int8", lambda: quantize_int8(paths["fused"]))]
    for name, step in steps:
        base = "fused" if name.startswith("fused") else "plain"
        if time.perf_counter() - t0 >= budget_s or (name != base and base not in paths):
            skipped.append(name)
            continue
        t1 = time.perf_counter()
        try:
            paths[name] = step()
        except Exception as exc:  # one variant failing to export must not stop the others
            log.warning("backend auto: exporting the %s variant failed (%s: %s)", name, type(exc).__name__, exc)
            skipped.append(name)
            continue
        made[name] = round(time.perf_counter() - t1, 1)
    total = round(time.perf_counter() - t0, 1)
    log.warning("backend auto: no CPU variant of %s (outputs %s) was cached: exported %s in %.1f s (budget %.0f s)%s",
                info.model_name, ",".join(names), ", ".join(f"{n} {s} s" for n, s in made.items()) or "nothing",
                total, budget_s, f"; not made: {', '.join(skipped)}" if skipped else "")
    return {"made": made, "skipped": skipped, "seconds": total}


def ensure_auto_choice(model, sample_fn: Callable[[], object], *, projection: Optional[torch.Tensor] = None,
                       cache_dir=None, outputs: Sequence[str] = ("cls",), threads: Optional[int] = None,
                       budget_s: float = AUTO_EXPORT_BUDGET_S, logger: Optional[logging.Logger] = None
                       ) -> Tuple[Optional[Dict[str, object]], str, str]:
    """``backend: auto`` on a CPU: the variant to open, and why. Returns ``(choice or None, reason, detail)``:

    * ``"recorded"``: a measurement of this model, output set and CPU is on record
      (:func:`auto_choice_status`; made by ``runa-ood build-engine --auto-choice`` or an earlier start);
    * ``"measured"``: no valid record, so the variants in the cache are measured now on ``sample_fn()``
      (a :class:`samples.Sample` of the method's own calls, or a views tensor) by
      :func:`choose_auto_variant`, which records the choice; when none is cached, they are exported
      first within ``budget_s`` (:func:`export_variants`);
    * ``"fallback"`` (choice None): nothing could be measured or nothing held the fidelity; ``detail`` says why.
    """
    log = logger or LOG
    info = model if isinstance(model, ModelInfo) else describe_model(model)
    names = output_set(outputs)
    choice, why = auto_choice_status(info, cache_dir, names)
    if choice is not None:
        return choice, "recorded", f"measured earlier ({choice['record']})"
    t0 = time.perf_counter()
    try:
        sample = _as_sample(sample_fn(), names)
        cached = cached_variants(info, cache_dir, names)
        exported = None
        if not cached and budget_s > 0:
            exported = export_variants(info, sample, cache_dir=cache_dir, outputs=names, budget_s=budget_s,
                                       logger=log)
        rec = choose_auto_variant(info, sample.head(AUTO_TIMED_CALLS), projection=projection, cache_dir=cache_dir,
                                  outputs=names, threads=threads, repeats=AUTO_REPEATS)
    except Exception as exc:
        return None, "fallback", f"{why}; measuring failed ({type(exc).__name__}: {exc})"
    seconds = time.perf_counter() - t0
    if rec["chosen"] is None:
        return None, "fallback", f"{why}; measured in {seconds:.1f} s but no cached variant held the fidelity"
    choice = auto_choice(info, cache_dir, names)
    if choice is None:  # pragma: no cover - the record was just written
        return None, "fallback", "the record just written could not be read back"
    v = rec["variants"]
    detail = (f"{why}: measured {len([n for n in v if 'ms_median' in v[n]])} cached variants in {seconds:.1f} s"
              + (f" after exporting {', '.join(exported['made'])} in {exported['seconds']} s" if exported else "")
              + f" on {rec['sample']}: " + ", ".join(f"{n} {v[n]['ms_median']:.1f} ms" for n in v if "ms_median" in v[n])
              + f" (torch {rec['torch_ms_median']:.1f} ms)")
    return choice, "measured", detail
