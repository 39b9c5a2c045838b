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

fp16 (the graph strongly typed TensorRT builds are made from): the fp32 export converted with
onnxconverter-common (``keep_io_types=True``: input and output stay float32), then every
``LayerNormalization`` and ``Softmax`` node (and ``ReduceMean``/``Pow``, the pieces of a decomposed
layer norm, should an exporter emit one) is turned back into an fp32 island: ``Cast(to=FLOAT)`` on
its fp16 inputs, its scale/bias initializers restored to their original fp32 values, and
``Cast(to=FLOAT16)`` on its outputs (:func:`keep_ops_fp32`). In a strongly typed TensorRT network
those layers therefore run in fp32 (a naive all-fp16 CLIP engine loses LayerNorm precision and the
embeddings collapse); matmuls, convolutions and GELU run in fp16. ONNX Runtime must open the file
with ``ORT_ENABLE_EXTENDED`` (``ORT_ENABLE_ALL`` crashed on fp16 graphs with ORT 1.32).
"""
from __future__ import annotations

import copy
import json
import logging
import os
import pathlib
import warnings
from typing import Any, Dict, Optional, Sequence, Union

import torch

from ..core.backbone import BackboneGraph, output_set
from .base import ModelInfo, default_cache_dir, describe_model
from .engine_cache import INPUT_NAME, OUTPUT_NAME, PAIRS_NAME, graph_input_names, graph_output_names, outputs_file_tag

LOG = logging.getLogger(__name__)

DEFAULT_OPSET = 17
FORMAT_VERSION = 1
#: identifies how fp16 graphs are made (bump when :func:`_convert_fp16` changes)
FP16_RECIPE = "onnxconverter-common keep_io_types + fp32 LayerNormalization/Softmax islands v1"
#: identifies how graphs of other output sets are made (bump when core.backbone's forward changes)
OUTPUTS_RECIPE = "core.backbone.BackboneGraph v1"
#: counts real exports/conversions in this process (tests check that cache hits do not export)
EXPORT_STATS: Dict[str, int] = {"exports": 0, "fp16_conversions": 0}


def onnx_cache_path(model_id: str, opset: int = DEFAULT_OPSET, precision: str = "fp32",
                    cache_dir: Optional[Union[str, os.PathLike]] = None,
                    outputs: Sequence[str] = ("cls",)) -> pathlib.Path:
    """``<cache root>/onnx/<model_id>-<opset>-<precision>[-o<outputs>].onnx`` (directory created)."""
    d = default_cache_dir(cache_dir) / "onnx"
    d.mkdir(parents=True, exist_ok=True)
    return d / f"{model_id}-{int(opset)}-{precision}{outputs_file_tag(outputs)}.onnx"


def _sidecar(path: pathlib.Path) -> pathlib.Path:
    return path.with_suffix(".json")


def _key(info: ModelInfo, opset: int, precision: str, outputs: Sequence[str] = ("cls",)) -> Dict[str, Any]:
    key = {"model_id": info.model_id, "opset": int(opset), "precision": precision, "input_size": info.input_size,
           "width": info.width, "input": INPUT_NAME, "output": OUTPUT_NAME, "format": FORMAT_VERSION}
    names = output_set(outputs)
    if names != ("cls",):  # today's ("cls",) files keep their key
        key.update({"outputs": list(names), "inputs": graph_input_names(names),
                    "output_names": graph_output_names(names), "outputs_recipe": OUTPUTS_RECIPE})
    if precision == "fp16":  # fp16 files made by an older recipe (everything fp16) are re-converted
        key["fp16_recipe"] = FP16_RECIPE
    return key


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


def find_cached_onnx(model: Any, *, opset: int = DEFAULT_OPSET, precision: str = "fp32",
                     cache_dir: Optional[Union[str, os.PathLike]] = None,
                     outputs: Sequence[str] = ("cls",)) -> Optional[pathlib.Path]:
    """The cached export of ``model`` at ``opset``/``precision`` when a valid one exists, else None.

    Never exports (cheap: reads one small JSON sidecar). ``backend: auto`` uses it so that a
    vehicle never spends its start-up exporting a graph (30-60 s for a ViT-B on a small CPU).
    """
    info = model if isinstance(model, ModelInfo) else describe_model(model)
    path = onnx_cache_path(info.model_id, opset, precision, cache_dir, outputs)
    return path if cached_onnx_valid(path, _key(info, opset, precision, outputs)) else None


def _write_sidecar(path: pathlib.Path, key: Dict[str, Any], extra: Dict[str, Any]) -> None:
    tmp = _sidecar(path).with_name(_sidecar(path).name + f".tmp{os.getpid()}")
    tmp.write_text(json.dumps({"key": key, **extra}, indent=2, sort_keys=True))
    os.replace(tmp, _sidecar(path))


def check_onnx(path: Union[str, os.PathLike], outputs: Sequence[str] = ("cls",)) -> None:
    """``onnx.checker`` plus the contract: input ``views`` with a dynamic batch axis (and ``pairs``
    when the output set has ``xattn``), one output per name (:func:`engine_cache.graph_output_names`;
    ``("cls",)``: the one output ``features``).

    Raises:
        ValueError: the graph does not meet the contract (onnx.checker errors propagate as is).
    """
    import onnx

    onnx.checker.check_model(str(path))
    model = onnx.load(str(path), load_external_data=False)
    ins = [i for i in model.graph.input if i.name not in {t.name for t in model.graph.initializer}]
    outs = list(model.graph.output)
    want_in, want_out = graph_input_names(outputs), graph_output_names(outputs)
    if [i.name for i in ins] != want_in or [o.name for o in outs] != want_out:
        raise ValueError(f"{path}: expected inputs {want_in} and outputs {want_out}, got "
                         f"{[i.name for i in ins]} -> {[o.name for o in outs]}")
    d0 = ins[0].type.tensor_type.shape.dim[0]
    if not d0.dim_param:
        raise ValueError(f"{path}: batch axis of {INPUT_NAME!r} is not dynamic ({d0})")


def export_onnx(model: Any, *, opset: int = DEFAULT_OPSET, precision: str = "fp32",
                cache_dir: Optional[Union[str, os.PathLike]] = None, path: Optional[Union[str, os.PathLike]] = None,
                force: bool = False, outputs: Sequence[str] = ("cls",)) -> pathlib.Path:
    """Export (or reuse) the ONNX graph of the visual trunk for one backbone output set.

    Args:
        model: a ``DualEncoder`` (preferred), its ``visual_trunk``, or a :class:`base.ModelInfo`.
        opset: ONNX opset, >= 17.
        precision: ``"fp32"`` or ``"fp16"`` (fp16 weights/activations, float32 I/O).
        cache_dir: cache root; ``path``: explicit output file instead of the cache layout.
        force: export even when a valid cached file exists.
        outputs: the backbone output set (:mod:`runa_ood_node.core.backbone`); one file per set,
            ``("cls",)`` is today's graph (``views`` -> ``features``) under today's name and key.

    Returns:
        Path of the checked ONNX file.
    """
    if opset < 17:
        raise ValueError(f"opset must be >= 17 (fused LayerNormalization), got {opset}")
    if precision not in ("fp32", "fp16"):
        raise ValueError(f"ONNX precision must be fp32 or fp16, got {precision!r}")
    names = output_set(outputs)
    info = model if isinstance(model, ModelInfo) else describe_model(model)
    out = pathlib.Path(path) if path is not None else onnx_cache_path(info.model_id, opset, precision, cache_dir,
                                                                      names)
    out.parent.mkdir(parents=True, exist_ok=True)
    key = _key(info, opset, precision, names)
    if not force and cached_onnx_valid(out, key):
        LOG.debug("ONNX cache hit: %s", out)
        return out
    if precision == "fp16":
        src = export_onnx(info, opset=opset, precision="fp32", cache_dir=cache_dir, force=force, outputs=names)
        _convert_fp16(src, out)
        EXPORT_STATS["fp16_conversions"] += 1
    else:
        trunk = _cpu_fp32(info.trunk)
        module = trunk if names == ("cls",) else BackboneGraph(trunk, names)
        # Grad mode stays ON on purpose: under no_grad/inference_mode nn.MultiheadAttention takes its
        # fused fast path (aten::_native_multi_head_attention), which has no ONNX symbolic.
        _torch_export(module, info.input_size, names, out, opset, grad=True)
        EXPORT_STATS["exports"] += 1
    check_onnx(out, names)
    _write_sidecar(out, key, {"torch": torch.__version__, "exporter": "torch.onnx legacy (dynamo=False)",
                              "model_name": info.model_name})
    LOG.info("exported visual trunk of %s (%s) to %s", info.model_name, precision, out)
    return out


def _cpu_fp32(trunk: torch.nn.Module) -> torch.nn.Module:
    """The trunk itself when it is CPU float32, else a CPU float32 copy (the encoder is never moved)."""
    p0 = next(iter(trunk.parameters()), None)
    if p0 is not None and (p0.device.type != "cpu" or p0.dtype != torch.float32):
        trunk = copy.deepcopy(trunk).to("cpu", torch.float32)
    return trunk.eval()


def _torch_export(module: torch.nn.Module, input_size: int, outputs: Sequence[str], out: pathlib.Path,
                  opset: int, grad: bool) -> None:
    """The one ``torch.onnx.export`` of the package: legacy exporter, dynamic batch (and pair) axes,
    the I/O names of :func:`engine_cache.graph_input_names` / ``graph_output_names``, written to a
    temporary file renamed into place. ``grad``: trace with grad mode on (needed for open_clip's
    ``nn.MultiheadAttention``, whose no-grad fast path has no ONNX symbolic)."""
    names = output_set(outputs)
    S = int(input_size)
    args = (torch.zeros((2, 3, S, S), dtype=torch.float32),)
    if "xattn" in names:
        args += (torch.tensor([[0, 1], [1, 0], [1, 1]], dtype=torch.int32),)
    in_names, out_names = graph_input_names(names), graph_output_names(names)
    axes = {INPUT_NAME: {0: "batch"}}
    if "xattn" in names:
        axes[PAIRS_NAME] = {0: "npairs"}
    for n, g in zip(names, out_names):
        axes[g] = {0: "npairs" if n == "xattn" else "batch"}
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    try:
        with (torch.enable_grad() if grad else torch.no_grad()), warnings.catch_warnings():
            # tracing open_clip's attention emits TracerWarnings about shape checks that are
            # constant for a given model; the batch axis itself is declared dynamic.
            warnings.simplefilter("ignore", category=torch.jit.TracerWarning)
            # the legacy exporter is chosen on purpose (stable single-file opset-17 graphs)
            warnings.simplefilter("ignore", category=DeprecationWarning)
            torch.onnx.export(module, args, str(tmp), input_names=in_names, output_names=out_names,
                              dynamic_axes=axes, opset_version=int(opset), do_constant_folding=True, dynamo=False)
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            tmp.unlink()


def _convert_fp16(src: pathlib.Path, out: pathlib.Path) -> None:
    """fp32 ONNX ``src`` -> fp16 ONNX ``out`` with float32 I/O and fp32 islands (see :func:`keep_ops_fp32`)."""
    import onnx
    from onnxconverter_common import float16

    model = onnx.load(str(src))
    fp32_weights = {i.name: copy.deepcopy(i) for i in model.graph.initializer if i.data_type == onnx.TensorProto.FLOAT}
    _detach_consumed_outputs(model)
    # The converter's own op_block_list would be the natural way to keep LayerNormalization/Softmax
    # in fp32, but onnxconverter-common 1.16 crashes with it (AttributeError in
    # remove_unnecessary_cast_node), so everything is converted and the islands are cut afterwards.
    model16 = float16.convert_float_to_float16(model, keep_io_types=True)
    fixed = _fix_cast_targets(model16)
    LOG.debug("fp16 conversion: retargeted %d Cast nodes to FLOAT16", fixed)
    counts = keep_ops_fp32(model16, fp32_weights=fp32_weights)
    LOG.info("fp16 conversion: kept in fp32 %s", ", ".join(f"{n} {k}" for k, n in sorted(counts.items())) or "nothing")
    if "LayerNormalization" not in counts:
        LOG.warning("fp16 conversion of %s: no fused LayerNormalization found; a decomposed layer norm "
                    "(ReduceMean/Pow/Sqrt) is only partly protected in fp16", src.name)
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    try:
        onnx.save(model16, str(tmp))
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            tmp.unlink()


def _detach_consumed_outputs(model) -> int:
    """Give every graph output that other nodes also read (``tokens``, whose row 0 is ``features``)
    its own ``Identity`` node, in place. onnxconverter-common's ``keep_io_types`` casts a graph
    output back to float32 under its own name, so a node that read it would get float32 where the
    converted graph declares float16 (an invalid graph). Returns the number of outputs detached."""
    from onnx import helper

    graph = model.graph
    consumed = {i for n in graph.node for i in n.input}
    count = 0
    for out in graph.output:
        if out.name not in consumed:
            continue
        inner = f"{out.name}__inner"
        for node in graph.node:
            node.output[:] = [inner if o == out.name else o for o in node.output]
            node.input[:] = [inner if i == out.name else i for i in node.input]
        graph.node.append(helper.make_node("Identity", [inner], [out.name], name=f"{out.name}__output"))
        count += 1
    return count


#: ops computed in fp32 inside the fp16 graph. LayerNormalization and Softmax are what CLIP's
#: accuracy hinges on (an fp16 LayerNorm overflows/loses its variance on CLIP's large residual
#: activations and the embeddings collapse in TensorRT). ReduceMean and Pow are the statistics of a
#: decomposed layer norm, should an exporter ever emit one instead of the fused op (the legacy
#: exporter at opset >= 17 does not: see tests/test_onnx_export.py).
FP32_OPS = ("LayerNormalization", "Softmax", "ReduceMean", "Pow")


def keep_ops_fp32(model, op_types=FP32_OPS, fp32_weights: Optional[Dict[str, Any]] = None) -> Dict[str, int]:
    """Make the ``op_types`` nodes of an fp16 ONNX model compute in fp32, in place.

    For each such node: every FLOAT16 activation input is fed through a new ``Cast(to=FLOAT)``;
    every FLOAT16 initializer input (LayerNorm scale/bias, a Pow exponent) is replaced by a float32
    initializer ``<name>_fp32`` (shared by all wrapped nodes) holding the original fp32 values from
    ``fp32_weights`` (``{name: TensorProto}`` of the model before conversion; the converter keeps
    initializer names), else the fp16 values widened; the node writes
    float32 outputs (``<out>_fp32``) and a new ``Cast(to=FLOAT16)`` writes the original output name,
    so every consumer still sees fp16 tensors. Nodes whose inputs are not fp16 are left alone.
    A strongly typed TensorRT build then runs exactly these layers in fp32.

    Returns:
        ``{op_type: number of nodes wrapped}``.
    """
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    graph = model.graph
    inferred = onnx.shape_inference.infer_shapes(model)
    types: Dict[str, int] = {}
    shapes: Dict[str, Any] = {}
    for v in list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output):
        types[v.name] = v.type.tensor_type.elem_type
        shapes[v.name] = v.type.tensor_type.shape
    inits = {i.name: i for i in graph.initializer}
    for name, init in inits.items():
        types[name] = init.data_type
    const_fp16 = {n.output[0]: n for n in graph.node if n.op_type == "Constant"
                  and any(a.name == "value" and a.t.data_type == TensorProto.FLOAT16 for a in n.attribute)}

    identity_of = {n.output[0]: n.input[0] for n in graph.node if n.op_type == "Identity"}

    def weight_source(name: str):
        """(initializer name, TensorProto) behind ``name``, following Identity chains (the
        exporter shares equal weights through Identity nodes); (name, None) for an activation."""
        seen = set()
        while name not in seen:
            seen.add(name)
            if name in inits:
                return name, inits[name]
            if name in const_fp16:
                return name, next(a.t for a in const_fp16[name].attribute if a.name == "value")
            if name not in identity_of:
                break
            name = identity_of[name]
        return name, None

    used = {o for n in graph.node for o in n.output} | set(inits) | {i.name for i in graph.input}

    def fresh(base: str) -> str:
        name, k = base, 1
        while name in used:
            name, k = f"{base}_{k}", k + 1
        used.add(name)
        return name

    fp32_copies: Dict[str, str] = {}
    new_inits = []
    new_vi = []
    out_nodes = []
    counts: Dict[str, int] = {}
    for node in graph.node:
        if node.op_type not in op_types or not any(types.get(i) == TensorProto.FLOAT16 for i in node.input if i):
            out_nodes.append(node)
            continue
        prefix = node.name or f"{node.op_type}_{len(out_nodes)}"
        for j, name in enumerate(node.input):
            if not name or types.get(name) != TensorProto.FLOAT16:
                continue
            src_name, src = weight_source(name)
            if src is not None:  # a weight: restore its fp32 values
                if src_name not in fp32_copies:
                    orig = (fp32_weights or {}).get(src_name)
                    arr = numpy_helper.to_array(src).astype(np.float32)
                    if orig is not None and tuple(orig.dims) == arr.shape:
                        arr = numpy_helper.to_array(orig).astype(np.float32)
                    fp32_copies[src_name] = fresh(f"{src_name}_fp32")
                    new_inits.append(numpy_helper.from_array(arr, fp32_copies[src_name]))
                node.input[j] = fp32_copies[src_name]
            else:
                cast_out = fresh(f"{name}_fp32")
                out_nodes.append(helper.make_node("Cast", [name], [cast_out], name=fresh(f"{prefix}/cast_in{j}_fp32"),
                                                  to=TensorProto.FLOAT))
                if name in shapes:
                    new_vi.append(helper.make_tensor_value_info(cast_out, TensorProto.FLOAT, None))
                    new_vi[-1].type.tensor_type.shape.CopyFrom(shapes[name])
                node.input[j] = cast_out
        casts_back = []
        for j, name in enumerate(node.output):
            if not name or types.get(name) != TensorProto.FLOAT16:
                continue
            inner = fresh(f"{name}_fp32")
            node.output[j] = inner
            if name in shapes:
                new_vi.append(helper.make_tensor_value_info(inner, TensorProto.FLOAT, None))
                new_vi[-1].type.tensor_type.shape.CopyFrom(shapes[name])
            casts_back.append(helper.make_node("Cast", [inner], [name], name=fresh(f"{prefix}/cast_out{j}_fp16"),
                                               to=TensorProto.FLOAT16))
        out_nodes.append(node)
        out_nodes.extend(casts_back)
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    if not counts:
        return counts
    del graph.node[:]
    graph.node.extend(out_nodes)
    graph.initializer.extend(new_inits)
    graph.value_info.extend(new_vi)
    _prune_dead(graph)
    return counts


def _prune_dead(graph) -> None:
    """Drop nodes and initializers no graph output depends on (the fp16 copies of weights that
    only the fp32 islands used, and the Identity nodes that shared them)."""
    needed = {o.name for o in graph.output}
    keep = []
    for node in reversed(list(graph.node)):
        if any(o in needed for o in node.output):
            keep.append(node)
            needed.update(i for i in node.input if i)
    if len(keep) != len(graph.node):
        keep.reverse()
        del graph.node[:]
        graph.node.extend(keep)
    dead = [i for i in graph.initializer if i.name not in needed]
    for i in dead:
        graph.initializer.remove(i)


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


# ---------------------------------------------------------------------- fused graph (ONNX Runtime CPU)
#: identifies how fused graphs are made (bump when the export module or the optimizer call changes)
FUSED_RECIPE = "hf-style attention export + onnxruntime.transformers optimize_model(model_type=clip, opt_level=0) v1"


class _FusableAttention(torch.nn.Module):
    """``nn.MultiheadAttention`` (self-attention, batch first, no mask) re-expressed op for op as
    Hugging Face's ``CLIPAttention``: separate q/k/v projections (the packed ``in_proj`` weights
    split, values unchanged), ``bmm`` over ``[B*heads, L, head_dim]``, softmax, ``bmm``, out
    projection. Same arithmetic as open_clip's path; the point is the ONNX pattern: ONNX Runtime's
    transformer optimizer recognises this one (its CLIP attention fusion) and not the legacy
    export of ``F.multi_head_attention_forward`` (packed in-proj + Slice, shape arithmetic)."""

    def __init__(self, mha: torch.nn.MultiheadAttention):
        super().__init__()
        E, h = int(mha.embed_dim), int(mha.num_heads)
        if not getattr(mha, "_qkv_same_embed_dim", True) or mha.in_proj_weight is None:
            raise ValueError("only packed self-attention (q, k, v of the same size) can be re-expressed")
        self.h, self.d, self.E = h, E // h, E
        self.scale = float(self.d) ** -0.5
        W, b = mha.in_proj_weight.detach(), mha.in_proj_bias
        self.q_proj, self.k_proj, self.v_proj = (torch.nn.Linear(E, E, bias=b is not None) for _ in range(3))
        with torch.no_grad():
            for i, lin in enumerate((self.q_proj, self.k_proj, self.v_proj)):
                lin.weight.copy_(W[i * E:(i + 1) * E])
                if b is not None:
                    lin.bias.copy_(b.detach()[i * E:(i + 1) * E])
        self.out_proj = mha.out_proj

    def _heads(self, t: torch.Tensor, L: int, B: int) -> torch.Tensor:
        return t.view(B, L, self.h, self.d).transpose(1, 2).contiguous()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, L, E = x.size()
        q = self.q_proj(x) * self.scale
        k = self._heads(self.k_proj(x), -1, B)
        v = self._heads(self.v_proj(x), -1, B)
        shape = (B * self.h, -1, self.d)
        q = self._heads(q, L, B).view(*shape)
        k, v = k.view(*shape), v.view(*shape)
        a = torch.softmax(torch.bmm(q, k.transpose(1, 2)), dim=-1)
        o = torch.bmm(a, v).view(B, self.h, L, self.d).transpose(1, 2).reshape(B, L, E)
        return self.out_proj(o)


class _FusableBlock(torch.nn.Module):
    def __init__(self, blk):
        super().__init__()
        for name in ("ls_1", "ls_2"):
            if not isinstance(getattr(blk, name, torch.nn.Identity()), torch.nn.Identity):
                raise ValueError("layer-scale blocks are not supported by the fusable export")
        if hasattr(blk, "ln_1_kv") or not isinstance(getattr(blk, "attn", None), torch.nn.MultiheadAttention):
            raise ValueError("only open_clip ResidualAttentionBlock with nn.MultiheadAttention is supported")
        self.ln_1, self.ln_2, self.mlp = blk.ln_1, blk.ln_2, blk.mlp
        self.attn = _FusableAttention(blk.attn)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class FusableTrunk(torch.nn.Module):
    """The visual trunk (``VisualTrunk``: ``_embeds -> blocks -> _pool``, pre-projection) with every
    attention block in the fusable form of :class:`_FusableAttention`. Equal outputs (tested)."""

    def __init__(self, trunk: torch.nn.Module):
        super().__init__()
        visual = getattr(trunk, "visual", trunk)
        tr = getattr(visual, "transformer", None)
        if tr is None or not getattr(tr, "batch_first", True):
            raise ValueError("the fusable export needs an open_clip VisionTransformer with a batch-first transformer")
        self.visual = visual
        self.blocks = torch.nn.ModuleList(_FusableBlock(b) for b in tr.resblocks)
        self.num_heads = int(tr.resblocks[0].attn.num_heads)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        v = self.visual
        x = v._embeds(x)
        for blk in self.blocks:
            x = blk(x)
        pooled, _ = v._pool(x)
        return pooled


def fused_cache_path(model_id: str, opset: int = DEFAULT_OPSET,
                     cache_dir: Optional[Union[str, os.PathLike]] = None,
                     outputs: Sequence[str] = ("cls",)) -> pathlib.Path:
    return onnx_cache_path(model_id, opset, "fp32", cache_dir).with_name(
        f"{model_id}-{int(opset)}-fp32{outputs_file_tag(outputs)}-fused.onnx")


def _fused_key(info: ModelInfo, opset: int, outputs: Sequence[str] = ("cls",)) -> Dict[str, Any]:
    import onnxruntime

    key = _key(info, opset, "fp32", outputs)
    key.update({"fused_recipe": FUSED_RECIPE, "onnxruntime": onnxruntime.__version__})
    return key


def find_cached_fused(model: Any, *, opset: int = DEFAULT_OPSET,
                      cache_dir: Optional[Union[str, os.PathLike]] = None,
                      outputs: Sequence[str] = ("cls",)) -> Optional[pathlib.Path]:
    """The cached fused graph of ``model`` for ``outputs`` when a valid one exists (never builds), else None."""
    info = model if isinstance(model, ModelInfo) else describe_model(model)
    path = fused_cache_path(info.model_id, opset, cache_dir, outputs)
    return path if cached_onnx_valid(path, _fused_key(info, opset, outputs)) else None


def fused_stats(path: Union[str, os.PathLike]) -> Dict[str, Any]:
    """What the fused graph's sidecar recorded: ``{"fused_ops": {op: count}, "blocks": n}``."""
    try:
        meta = json.loads(_sidecar(pathlib.Path(path)).read_text())
    except (OSError, ValueError):
        return {}
    return {"fused_ops": meta.get("fused_ops", {}), "blocks": meta.get("blocks")}


def export_fused_onnx(model: Any, *, opset: int = DEFAULT_OPSET, cache_dir: Optional[Union[str, os.PathLike]] = None,
                      force: bool = False, outputs: Sequence[str] = ("cls",)) -> pathlib.Path:
    """Export the trunk in fusable form and apply ONNX Runtime's transformer fusions, cached.

    Fusions (``onnxruntime.transformers.optimizer.optimize_model``, ``model_type="clip"``,
    ``opt_level=0`` so that the file stays portable and ORT applies its own level-2/3 graph
    optimisations when the session opens): per block one ``Attention`` (q/k/v projections,
    scaled dot product, softmax and context in one contrib op), ``SkipLayerNormalization``
    (residual add + LayerNorm) and ``BiasGelu`` (MLP bias + GELU). On the legacy export of
    open_clip's ``nn.MultiheadAttention`` none of the attention fusions match (only LayerNorm, which
    is already native at opset 17, and BiasGelu), hence the export of :class:`FusableTrunk`. The
    counts are logged and stored in the sidecar (``fused_ops``); fewer ``Attention`` ops than
    blocks is logged as a warning (the graph is still exact, only slower).

    Output sets other than ``("cls",)`` (``outputs``): the same fusable blocks inside
    :class:`core.backbone.BackboneGraph`. The fused ``Attention`` op has no probabilities, so the
    attention outputs come from a separate branch per block (``ln_1`` output -> CLS query and key
    projections -> softmax), the same arithmetic as the torch path; the blocks themselves stay fused.
    """
    if opset < 17:
        raise ValueError(f"opset must be >= 17, got {opset}")
    names = output_set(outputs)
    info = model if isinstance(model, ModelInfo) else describe_model(model)
    out = fused_cache_path(info.model_id, opset, cache_dir, names)
    key = _fused_key(info, opset, names)
    if not force and cached_onnx_valid(out, key):
        return out
    from onnxruntime.transformers.optimizer import optimize_model

    fusable = FusableTrunk(_cpu_fp32(info.trunk)).eval()
    module = fusable if names == ("cls",) else BackboneGraph(fusable.visual, names, blocks=list(fusable.blocks))
    raw = out.with_name(out.stem + f".raw{os.getpid()}.onnx")
    tmp = out.with_name(out.stem + f".tmp{os.getpid()}.onnx")
    try:
        _torch_export(module.eval(), info.input_size, names, raw, opset, grad=False)
        # the optimizer logs at WARNING that symbolic shape inference is off; it is not needed here
        quiet = [logging.getLogger(n) for n in ("onnxruntime.transformers", "fusion_skiplayernorm", "onnx_model",
                                                "fusion_base", "fusion_attention")]
        levels = [lg.level for lg in quiet]
        for lg in quiet:
            lg.setLevel(logging.ERROR)
        try:
            opt = optimize_model(str(raw), model_type="clip", num_heads=fusable.num_heads, hidden_size=info.width,
                                 opt_level=0, use_gpu=False)
        finally:
            for lg, lv in zip(quiet, levels):
                lg.setLevel(lv)
        stats = {k: int(v) for k, v in opt.get_fused_operator_statistics().items() if v}
        opt.save_model_to_file(str(tmp))
        os.replace(tmp, out)
    finally:
        for p in (raw, tmp):
            if p.exists():
                p.unlink()
    blocks = len(fusable.blocks)
    _write_sidecar(out, key, {"fused_ops": stats, "blocks": blocks, "model_name": info.model_name,
                              "torch": torch.__version__, "outputs": list(names)})
    # an attention-only output set does not run the last block (only its attention branch)
    expected = blocks if ("cls" in names or "tokens" in names) else blocks - 1
    (LOG.info if stats.get("Attention", 0) == expected else LOG.warning)(
        "fused graph of %s: %s (%d transformer blocks) -> %s", info.model_name,
        ", ".join(f"{n} {k}" for k, n in sorted(stats.items())) or "no fusion", blocks, out)
    EXPORT_STATS["fused"] = EXPORT_STATS.get("fused", 0) + 1
    return out
