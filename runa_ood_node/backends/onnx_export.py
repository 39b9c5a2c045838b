"""Export the visual trunk to ONNX, once, into the cache.

Graph: input ``"views"`` float32 ``[batch,3,S,S]`` -> output ``"features"`` float32
``[batch,width]`` (pre-projection, after ``ln_post``; the projection stays outside the graph).
The batch axis is dynamic. Exported with the legacy TorchScript exporter (``dynamo=False``) at
opset 17, the first opset with a fused ``LayerNormalization`` op (TensorRT maps it to its
normalization layer, which matters for fp16 accuracy), then checked with ``onnx.checker``.

Cache layout (``root`` = ``core.paths.cache_dir()`` unless ``cache_dir`` is given)::

    <root>/onnx/<model_id>-<opset>-<precision>.onnx
    <root>/onnx/<model_id>-<opset>-<precision>.json   # sidecar: the key the file was made for

A file is reused when its sidecar holds the same key (model_id, opset, precision, input size,
width, format version); otherwise it is exported again. Writes go to a temporary file and are
renamed into place, so a crash never leaves a half-written model behind.

fp16 (for strongly typed TensorRT builds): the fp32 export converted with onnxconverter-common,
``keep_io_types=True`` (inputs/outputs stay float32). ONNX
Runtime must open it with ``ORT_ENABLE_EXTENDED`` (``ORT_ENABLE_ALL`` crashed on such graphs).
"""
from __future__ import annotations

import copy
import json
import logging
import os
import pathlib
import warnings
from typing import Any, Dict, Optional, Union

import torch

from .base import ModelInfo, default_cache_dir, describe_model
from .engine_cache import INPUT_NAME, OUTPUT_NAME

LOG = logging.getLogger(__name__)

DEFAULT_OPSET = 17
FORMAT_VERSION = 1
#: counts real exports/conversions in this process (tests check that cache hits do not export)
EXPORT_STATS: Dict[str, int] = {"exports": 0, "fp16_conversions": 0}


def onnx_cache_path(model_id: str, opset: int = DEFAULT_OPSET, precision: str = "fp32",
                    cache_dir: Optional[Union[str, os.PathLike]] = None) -> pathlib.Path:
    """``<cache root>/onnx/<model_id>-<opset>-<precision>.onnx`` (directory created)."""
    d = default_cache_dir(cache_dir) / "onnx"
    d.mkdir(parents=True, exist_ok=True)
    return d / f"{model_id}-{int(opset)}-{precision}.onnx"


def _sidecar(path: pathlib.Path) -> pathlib.Path:
    return path.with_suffix(".json")


def _key(info: ModelInfo, opset: int, precision: str) -> Dict[str, Any]:
    return {"model_id": info.model_id, "opset": int(opset), "precision": precision, "input_size": info.input_size,
            "width": info.width, "input": INPUT_NAME, "output": OUTPUT_NAME, "format": FORMAT_VERSION}


def cached_onnx_valid(path: Union[str, os.PathLike], key: Dict[str, Any]) -> bool:
    """True when ``path`` exists and its sidecar JSON records exactly ``key``."""
    path = pathlib.Path(path)
    if not path.is_file():
        return False
    try:
        meta = json.loads(_sidecar(path).read_text())
    except (OSError, ValueError):
        return False
    return meta.get("key") == key


def _write_sidecar(path: pathlib.Path, key: Dict[str, Any], extra: Dict[str, Any]) -> None:
    tmp = _sidecar(path).with_name(_sidecar(path).name + f".tmp{os.getpid()}")
    tmp.write_text(json.dumps({"key": key, **extra}, indent=2, sort_keys=True))
    os.replace(tmp, _sidecar(path))


def check_onnx(path: Union[str, os.PathLike]) -> None:
    """``onnx.checker`` plus the contract: one input ``views`` with a dynamic batch axis, one output ``features``.

    Raises:
        ValueError: the graph does not meet the contract (onnx.checker errors propagate as is).
    """
    import onnx

    onnx.checker.check_model(str(path))
    model = onnx.load(str(path), load_external_data=False)
    ins = [i for i in model.graph.input if i.name not in {t.name for t in model.graph.initializer}]
    outs = list(model.graph.output)
    if [i.name for i in ins] != [INPUT_NAME] or [o.name for o in outs] != [OUTPUT_NAME]:
        raise ValueError(f"{path}: expected input [{INPUT_NAME!r}] and output [{OUTPUT_NAME!r}], got "
                         f"{[i.name for i in ins]} -> {[o.name for o in outs]}")
    d0 = ins[0].type.tensor_type.shape.dim[0]
    if not d0.dim_param:
        raise ValueError(f"{path}: batch axis of {INPUT_NAME!r} is not dynamic ({d0})")


def export_onnx(model: Any, *, opset: int = DEFAULT_OPSET, precision: str = "fp32",
                cache_dir: Optional[Union[str, os.PathLike]] = None, path: Optional[Union[str, os.PathLike]] = None,
                force: bool = False) -> pathlib.Path:
    """Export (or reuse) the ONNX graph of the visual trunk.

    Args:
        model: a ``DualEncoder`` (preferred), its ``visual_trunk``, or a :class:`base.ModelInfo`.
        opset: ONNX opset, >= 17.
        precision: ``"fp32"`` or ``"fp16"`` (fp16 weights/activations, float32 I/O).
        cache_dir: cache root; ``path``: explicit output file instead of the cache layout.
        force: export even when a valid cached file exists.

    Returns:
        Path of the checked ONNX file.
    """
    if opset < 17:
        raise ValueError(f"opset must be >= 17 (fused LayerNormalization), got {opset}")
    if precision not in ("fp32", "fp16"):
        raise ValueError(f"ONNX precision must be fp32 or fp16, got {precision!r}")
    info = model if isinstance(model, ModelInfo) else describe_model(model)
    out = pathlib.Path(path) if path is not None else onnx_cache_path(info.model_id, opset, precision, cache_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    key = _key(info, opset, precision)
    if not force and cached_onnx_valid(out, key):
        LOG.debug("ONNX cache hit: %s", out)
        return out
    if precision == "fp16":
        src = export_onnx(info, opset=opset, precision="fp32", cache_dir=cache_dir, force=force)
        _convert_fp16(src, out)
        EXPORT_STATS["fp16_conversions"] += 1
    else:
        _export_fp32(info, out, opset)
        EXPORT_STATS["exports"] += 1
    check_onnx(out)
    _write_sidecar(out, key, {"torch": torch.__version__, "exporter": "torch.onnx legacy (dynamo=False)",
                              "model_name": info.model_name})
    LOG.info("exported visual trunk of %s (%s) to %s", info.model_name, precision, out)
    return out


def _export_fp32(info: ModelInfo, out: pathlib.Path, opset: int) -> None:
    trunk = info.trunk
    p0 = next(iter(trunk.parameters()), None)
    if p0 is not None and (p0.device.type != "cpu" or p0.dtype != torch.float32):
        trunk = copy.deepcopy(trunk).to("cpu", torch.float32)
    trunk = trunk.eval()
    S = info.input_size
    dummy = torch.zeros((2, 3, S, S), dtype=torch.float32)
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    try:
        # Grad mode stays ON on purpose: under no_grad/inference_mode nn.MultiheadAttention takes its
        # fused fast path (aten::_native_multi_head_attention), which has no ONNX symbolic.
        with torch.enable_grad(), warnings.catch_warnings():
            # tracing open_clip's attention emits TracerWarnings about shape checks that are
            # constant for a given model; the batch axis itself is declared dynamic below.
            warnings.simplefilter("ignore", category=torch.jit.TracerWarning)
            # the legacy exporter is chosen on purpose (stable single-file opset-17 graphs)
            warnings.simplefilter("ignore", category=DeprecationWarning)
            torch.onnx.export(trunk, (dummy,), str(tmp), input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                              dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
                              opset_version=int(opset), do_constant_folding=True, dynamo=False)
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            tmp.unlink()


def _convert_fp16(src: pathlib.Path, out: pathlib.Path) -> None:
    import onnx
    from onnxconverter_common import float16

    model = onnx.load(str(src))
    # Blocking LayerNormalization (op_block_list) crashes onnxconverter-common 1.16 in
    # remove_unnecessary_cast_node; the fused fp16 LayerNormalization is accurate enough (cosine to
    # fp32 >= 0.9999 in tests) because TensorRT and ORT accumulate its statistics in fp32.
    model16 = float16.convert_float_to_float16(model, keep_io_types=True)
    fixed = _fix_cast_targets(model16)
    LOG.debug("fp16 conversion: retargeted %d Cast nodes to FLOAT16", fixed)
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    try:
        onnx.save(model16, str(tmp))
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            tmp.unlink()



def _fix_cast_targets(model) -> int:
    """Make ``Cast(to=FLOAT)`` nodes whose output the converter retyped to fp16 cast to FLOAT16.

    onnxconverter-common retypes tensors but leaves ``Cast.to`` alone, so the TorchScript export's
    casts (``x.to(orig_type)`` after LayerNorm, the int->float head-dim scale of attention) would
    produce float32 where float16 is declared, an invalid graph. Returns the number fixed.
    """
    from onnx import TensorProto

    vi = {v.name: v.type.tensor_type.elem_type for v in model.graph.value_info}
    graph_outputs = {o.name for o in model.graph.output}
    fixed = 0
    for node in model.graph.node:
        if node.op_type != "Cast" or node.output[0] in graph_outputs:
            continue
        if vi.get(node.output[0]) == TensorProto.FLOAT16:
            for a in node.attribute:
                if a.name == "to" and a.i == TensorProto.FLOAT:
                    a.i = TensorProto.FLOAT16
                    fixed += 1
    return fixed
