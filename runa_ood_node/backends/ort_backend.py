"""ONNX Runtime visual backend (CPU, or the CUDA execution provider when present).

* fp32: the exported trunk (:mod:`onnx_export`), full graph optimisation.
* fp16: the fp16 export (float32 I/O), opened with ``ORT_ENABLE_EXTENDED`` (ORT 1.32 crashed
  loading such graphs with ``ORT_ENABLE_ALL``). Meant for the CUDA EP; on CPU it is slower.
* int8 (CPU): weights dynamically quantised per channel to QInt8
  (``onnxruntime.quantization.quantize_dynamic``), cached next to the fp32 export as
  ``<stem>-int8dyn.onnx``. Activations are quantised on the fly, so no calibration data is
  needed. :func:`embedding_fidelity` measures how close it stays to fp32 (cosine per embedding).

CUDA tensors given to a CUDA-EP backend are bound in place with IO binding (no host copy) and the
result is returned as a CUDA tensor; CPU tensors go through numpy.
"""
from __future__ import annotations

import json
import logging
import os
import pathlib
import time
from typing import Dict, Optional, Union

import numpy as np
import torch

from .base import BackendUnavailableError, ModelInfo, VisualBackend, default_cache_dir, describe_model
from .engine_cache import INPUT_NAME, OUTPUT_NAME

LOG = logging.getLogger(__name__)

QUANT_STATS: Dict[str, int] = {"quantizations": 0}


def int8_path_for(fp32_path: Union[str, os.PathLike]) -> pathlib.Path:
    p = pathlib.Path(fp32_path)
    return p.with_name(p.stem + "-int8dyn.onnx")


def _int8_key(src: pathlib.Path) -> Dict[str, object]:
    from .engine_cache import file_sha256

    return {"source_sha256": file_sha256(src), "per_channel": True, "weight_type": "QInt8",
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


def quantize_int8(fp32_path: Union[str, os.PathLike], out_path: Optional[Union[str, os.PathLike]] = None,
                  force: bool = False) -> pathlib.Path:
    """Dynamic int8 quantisation (per channel, QInt8 weights) of an fp32 ONNX, cached.

    The output is reused when its sidecar records the sha256 of the current fp32 file.
    """
    from onnxruntime.quantization import QuantType, quantize_dynamic

    src = pathlib.Path(fp32_path)
    out = pathlib.Path(out_path) if out_path is not None else int8_path_for(src)
    side = out.with_suffix(".json")
    if not force and int8_cached(src, out):
        return out
    key = _int8_key(src)
    tmp = out.with_name(out.stem + f".tmp{os.getpid()}.onnx")
    try:
        quantize_dynamic(str(src), str(tmp), per_channel=True, weight_type=QuantType.QInt8)
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


class OrtBackend(VisualBackend):
    """ONNX Runtime session over an exported trunk.

    Args:
        onnx_path: the ONNX graph (input ``views``, output ``features``).
        input_size, width: S and the feature size (checked against the graph's output).
        device: ``"cpu"`` or ``"cuda[:N]"`` (needs ``CUDAExecutionProvider``).
        precision: label of the graph's precision (``fp32``, ``fp16``, ``int8``); fp16 graphs are
            opened with ``ORT_ENABLE_EXTENDED``.
        threads: intra-op threads (None = ORT default = all physical cores).
        max_batch: optional cap per ``run`` call.
        spin: let ORT's worker threads busy-wait between runs (ORT's default). Off by default here:
            on a vehicle computer shared with other nodes (and with the torch text tower / other
            sessions in this process) spinning threads steal whole cores for a few ms after every
            call, for a small latency gain.
    """

    def __init__(self, onnx_path: Union[str, os.PathLike], input_size: int, width: int, device: str = "cpu",
                 precision: str = "fp32", threads: Optional[int] = None, max_batch: Optional[int] = None,
                 spin: bool = False):
        import onnxruntime as ort

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
        if threads is not None:
            if int(threads) < 1:
                raise ValueError(f"ort_threads must be >= 1, got {threads}")
            so.intra_op_num_threads = int(threads)
            so.inter_op_num_threads = 1
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
        if ins != [INPUT_NAME] or outs != [OUTPUT_NAME]:
            raise BackendUnavailableError(f"{self.onnx_path} has inputs {ins} / outputs {outs}; expected "
                                          f"[{INPUT_NAME!r}] / [{OUTPUT_NAME!r}] (re-export it)")
        out_shape = self.session.get_outputs()[0].shape
        if isinstance(out_shape[-1], int) and out_shape[-1] != self.width:
            raise BackendUnavailableError(f"{self.onnx_path} outputs width {out_shape[-1]}, model has {self.width}")
        self.name = f"onnxruntime-{'cuda' if self._cuda else 'cpu'}-{precision}"

    @classmethod
    def from_model(cls, model, *, device: str = "cpu", precision: str = "fp32",
                   onnx_path: Optional[Union[str, os.PathLike]] = None, cache_dir=None,
                   threads: Optional[int] = None, int8: bool = False, max_batch: Optional[int] = None,
                   allow_export: bool = True, logger: Optional[logging.Logger] = None) -> "OrtBackend":
        """Open a session for ``model``, exporting / quantising into the cache when allowed.

        Args:
            model: a ``DualEncoder``, its ``visual_trunk`` or a :class:`base.ModelInfo`.
            onnx_path: an existing graph to run as is (no export, no cache look-up).
            allow_export: when no valid cached export (and, with ``int8``, quantised graph) exists:
                True exports it now, logging a WARNING first (30-60 s for a ViT-B on a small CPU);
                False raises :class:`BackendUnavailableError` naming the command that pre-exports it
                (``backend: auto`` passes False: a vehicle must not stall at start-up).
            logger: where the export warning goes (default this module's logger).
        """
        log = logger or LOG
        info = model if isinstance(model, ModelInfo) else describe_model(model)
        if int8 and precision != "fp32":
            raise BackendUnavailableError("int8 quantisation starts from the fp32 graph; use precision='fp32' with int8")
        if int8 and device.startswith("cuda"):
            raise BackendUnavailableError("dynamic int8 ONNX graphs run on the CPU provider only; use TensorRT fp16 on GPU")
        label = precision
        if onnx_path is None:
            from .onnx_export import export_onnx, find_cached_onnx

            hint = (f"`runa-ood build-engine --model {info.model_name} --onnx-only{' --int8' if int8 else ''}` "
                    f"(with the node's --pretrained weights and cache dir)")
            cached = find_cached_onnx(info, precision=precision, cache_dir=cache_dir)
            if cached is None:
                where = default_cache_dir(cache_dir) / "onnx"
                if not allow_export:
                    raise BackendUnavailableError(
                        f"no exported ONNX for model {info.model_name} (model_id {info.model_id}, {precision}) in "
                        f"{where}; run {hint} beforehand")
                log.warning("no exported %s ONNX for model %s (model_id %s) in %s: exporting it now, which takes "
                            "30-60 s for a ViT-B on a small CPU; run %s beforehand to start without this delay",
                            precision, info.model_name, info.model_id, where, hint)
                t0 = time.perf_counter()
                cached = export_onnx(info, precision=precision, cache_dir=cache_dir)
                log.warning("exported %s in %.1f s", cached.name, time.perf_counter() - t0)
            onnx_path = cached
            if int8 and not int8_cached(onnx_path):
                if not allow_export:
                    raise BackendUnavailableError(
                        f"no int8-quantised ONNX for model {info.model_name} (model_id {info.model_id}) next to "
                        f"{pathlib.Path(onnx_path).name}; run {hint} beforehand")
                log.warning("quantising %s to int8 now (seconds to a minute); run %s beforehand to skip this",
                            pathlib.Path(onnx_path).name, hint)
        if int8:
            onnx_path = quantize_int8(onnx_path)
            label = "int8"
        return cls(onnx_path, info.input_size, info.width, device=device, precision=label, threads=threads,
                   max_batch=max_batch)

    def _run(self, views: torch.Tensor) -> torch.Tensor:
        if self._cuda and views.is_cuda:
            return self._run_iobinding(views)
        x = views.detach().to("cpu", torch.float32).contiguous().numpy()
        (out,) = self.session.run([OUTPUT_NAME], {INPUT_NAME: x})
        return torch.from_numpy(np.asarray(out, dtype=np.float32))

    def _run_iobinding(self, views: torch.Tensor) -> torch.Tensor:
        x = views.to(torch.float32).contiguous()
        out = torch.empty((x.shape[0], self.width), dtype=torch.float32, device=x.device)
        binding = self.session.io_binding()
        dev_id = x.device.index or 0
        binding.bind_input(INPUT_NAME, "cuda", dev_id, np.float32, tuple(x.shape), x.data_ptr())
        binding.bind_output(OUTPUT_NAME, "cuda", dev_id, np.float32, tuple(out.shape), out.data_ptr())
        torch.cuda.current_stream(x.device).synchronize()  # ORT runs on its own stream
        self.session.run_with_iobinding(binding)
        return out

    def describe(self) -> dict:
        d = super().describe()
        d.update({"onnx": str(self.onnx_path), "threads": self.threads, "providers": self.session.get_providers()})
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
