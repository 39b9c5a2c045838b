"""ONNX export of the visual trunk: contract, cache behaviour, fp16 variant."""
import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from runa_ood_node.backends import onnx_export  # noqa: E402
from runa_ood_node.backends.base import describe_model  # noqa: E402
from runa_ood_node.backends.onnx_export import EXPORT_STATS, check_onnx, export_onnx, onnx_cache_path  # noqa: E402


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("onnx_cache")


@pytest.fixture(scope="module")
def fp32_path(tiny_encoder, cache):
    return export_onnx(tiny_encoder, cache_dir=cache)


def _cos(a, b):
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


def test_graph_contract(fp32_path, tiny_encoder, cache):
    assert fp32_path == onnx_cache_path(tiny_encoder.model_id, 17, "fp32", cache)
    assert fp32_path.name == f"{tiny_encoder.model_id}-17-fp32.onnx"
    check_onnx(fp32_path)  # onnx.checker + names + dynamic batch
    m = onnx.load(str(fp32_path))
    assert max(o.version for o in m.opset_import if o.domain in ("", "ai.onnx")) >= 17
    assert [i.name for i in m.graph.input] == ["views"]
    assert [o.name for o in m.graph.output] == ["features"]
    dims = m.graph.input[0].type.tensor_type.shape.dim
    assert dims[0].dim_param and [d.dim_value for d in dims[1:]] == [3, 64, 64]
    # the projection stays outside: output width is the pre-projection width, not embed_dim
    assert m.graph.output[0].type.tensor_type.shape.dim[1].dim_value == tiny_encoder.width != tiny_encoder.embed_dim
    assert any(n.op_type == "LayerNormalization" for n in m.graph.node)


def test_matches_torch_for_several_batch_sizes(fp32_path, tiny_encoder):
    sess = ort.InferenceSession(str(fp32_path), providers=["CPUExecutionProvider"])
    gen = torch.Generator().manual_seed(1)
    for b in (1, 3, 17):
        x = torch.randn((b, 3, 64, 64), generator=gen)
        with torch.no_grad():
            ref = tiny_encoder.visual_trunk(x).numpy()
        (out,) = sess.run(None, {"views": x.numpy()})
        assert out.shape == (b, tiny_encoder.width)
        assert np.abs(out - ref).max() < 1e-4
        assert _cos(out, ref).min() > 0.99999


def test_second_call_is_a_cache_hit(tiny_encoder, cache, fp32_path):
    before = dict(EXPORT_STATS)
    mtime = fp32_path.stat().st_mtime_ns
    again = export_onnx(tiny_encoder, cache_dir=cache)
    assert again == fp32_path
    assert EXPORT_STATS == before
    assert fp32_path.stat().st_mtime_ns == mtime
    side = json.loads(fp32_path.with_suffix(".json").read_text())
    assert side["key"]["model_id"] == tiny_encoder.model_id and side["key"]["opset"] == 17


def test_stale_sidecar_forces_reexport(tiny_encoder, cache, fp32_path):
    side = fp32_path.with_suffix(".json")
    meta = json.loads(side.read_text())
    meta["key"]["width"] = -1  # as if written for another model/version
    side.write_text(json.dumps(meta))
    n = EXPORT_STATS["exports"]
    export_onnx(tiny_encoder, cache_dir=cache)
    assert EXPORT_STATS["exports"] == n + 1
    assert json.loads(side.read_text())["key"]["width"] == tiny_encoder.width


def test_different_model_gets_a_different_file(tiny_encoder, cache, fp32_path):
    from runa_ood_node.core.encoder import DualEncoder

    other = DualEncoder.load("runa-tiny-vit", pretrained=None, allow_random=True, random_seed=123)
    assert other.model_id != tiny_encoder.model_id
    p = export_onnx(other, cache_dir=cache)
    assert p != fp32_path and p.is_file() and fp32_path.is_file()


def test_bare_trunk_is_accepted(tiny_encoder, tmp_path):
    info = describe_model(tiny_encoder.visual_trunk)
    assert (info.input_size, info.width) == (tiny_encoder.input_size, tiny_encoder.width)
    p = export_onnx(tiny_encoder.visual_trunk, cache_dir=tmp_path)
    check_onnx(p)


def _typed(model):
    """Element type of every tensor of ``model`` after strict onnx shape inference."""
    m = onnx.shape_inference.infer_shapes(model, strict_mode=True)
    types = {v.name: v.type.tensor_type.elem_type
             for v in list(m.graph.value_info) + list(m.graph.input) + list(m.graph.output)}
    types.update({i.name: i.data_type for i in m.graph.initializer})
    return m, types


def _ort_extended(path):
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module")
def odd_ln_encoder():
    """Tiny encoder whose LayerNorm scale/bias are not representable in fp16 (random init has 1/0)."""
    from runa_ood_node.core.encoder import DualEncoder

    enc = DualEncoder.load("runa-tiny-vit", pretrained=None, allow_random=True, random_seed=7)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for mod in enc.visual_trunk.modules():
            if isinstance(mod, torch.nn.LayerNorm):
                mod.weight.copy_(1 + 0.3 * torch.randn(mod.weight.shape, generator=g))
                mod.bias.copy_(0.1 * torch.randn(mod.bias.shape, generator=g))
    return enc


def test_fp32_export_has_fused_layernorm_only(fp32_path):
    """The fp16 recipe relies on the exporter emitting fused LayerNormalization (opset 17), not a
    ReduceMean/Pow/Sqrt decomposition; the only Sqrt nodes are the attention's scalar scale."""
    m = onnx.load(str(fp32_path))
    ops = [n.op_type for n in m.graph.node]
    assert ops.count("LayerNormalization") == 6  # ln_pre, 2 x (ln_1, ln_2), ln_post
    assert ops.count("Softmax") == 2
    assert "ReduceMean" not in ops and "Pow" not in ops


def test_fp16_export_keeps_layernorm_and_softmax_in_fp32(odd_ln_encoder, tmp_path):
    p16 = export_onnx(odd_ln_encoder, precision="fp16", cache_dir=tmp_path)
    assert p16.name.endswith("-17-fp16.onnx")
    onnx.checker.check_model(str(p16), full_check=True)
    model = onnx.load(str(p16))
    m, types = _typed(model)
    F32, F16 = onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16
    assert m.graph.input[0].type.tensor_type.elem_type == F32
    assert m.graph.output[0].type.tensor_type.elem_type == F32
    producer = {o: n for n in m.graph.node for o in n.output}
    consumers = {}
    for n in m.graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    islands = [n for n in m.graph.node if n.op_type in ("LayerNormalization", "Softmax")]
    assert sorted(n.op_type for n in islands) == ["LayerNormalization"] * 6 + ["Softmax"] * 2
    inits = {i.name: i for i in m.graph.initializer}
    for n in islands:
        assert all(types[i] == F32 for i in n.input if i), (n.name, [types[i] for i in n.input])
        assert types[n.output[0]] == F32, n.name
        # the activation comes through Cast(to=FLOAT) from the fp16 graph and goes back to fp16
        cast_in = producer[n.input[0]]
        assert cast_in.op_type == "Cast" and types[cast_in.input[0]] == F16
        (back,) = consumers[n.output[0]]
        assert back.op_type == "Cast" and types[back.output[0]] == F16
    # the LayerNorm weights are the original fp32 values, not fp16-rounded ones
    trunk_lns = [mod for mod in odd_ln_encoder.visual_trunk.modules() if isinstance(mod, torch.nn.LayerNorm)]
    want = {tuple(np.round(mod.weight.detach().numpy(), 7)) for mod in trunk_lns}
    got = set()
    for n in islands:
        if n.op_type == "LayerNormalization":
            w = onnx.numpy_helper.to_array(inits[n.input[1]])
            assert w.dtype == np.float32
            assert not np.array_equal(w, w.astype(np.float16).astype(np.float32))  # not fp16-representable
            got.add(tuple(np.round(w, 7)))
    assert got == want
    # everything else that is heavy is fp16: matmul / conv weights
    heavy = [i for i in m.graph.initializer if len(i.dims) >= 2]
    assert heavy and all(i.data_type == F16 for i in heavy)

    x = torch.randn((4, 3, 64, 64), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = odd_ln_encoder.visual_trunk(x).numpy()
    (out,) = _ort_extended(p16).run(None, {"views": x.numpy()})
    assert out.dtype == np.float32
    cos = _cos(out, ref)
    print(f"\nfp16 ONNX (fp32 LayerNorm/Softmax islands) vs torch fp32: cos min {cos.min():.7f}")
    assert cos.min() >= 0.999


def test_fp16_export_cached_and_old_recipe_reconverted(tiny_encoder, cache, fp32_path):
    p16 = export_onnx(tiny_encoder, precision="fp16", cache_dir=cache)
    n = EXPORT_STATS["fp16_conversions"]
    assert export_onnx(tiny_encoder, precision="fp16", cache_dir=cache) == p16
    assert EXPORT_STATS["fp16_conversions"] == n
    # an fp16 file from the old all-fp16 recipe (sidecar without fp16_recipe) is converted again
    side = p16.with_suffix(".json")
    meta = json.loads(side.read_text())
    assert meta["key"]["fp16_recipe"] == onnx_export.FP16_RECIPE
    del meta["key"]["fp16_recipe"]
    side.write_text(json.dumps(meta))
    assert onnx_export.find_cached_onnx(tiny_encoder, precision="fp16", cache_dir=cache) is None
    export_onnx(tiny_encoder, precision="fp16", cache_dir=cache)
    assert EXPORT_STATS["fp16_conversions"] == n + 1
    assert onnx_export.find_cached_onnx(tiny_encoder, precision="fp16", cache_dir=cache) == p16


def test_keep_ops_fp32_on_a_decomposed_layer_norm(tmp_path):
    """ReduceMean/Pow of a hand-written decomposed layer norm become fp32 islands, exponent included;
    int64/other inputs and untouched ops are left alone; the graph stays valid and accurate."""
    from onnx import TensorProto, helper, numpy_helper

    D = 16
    nodes = [
        helper.make_node("ReduceMean", ["x"], ["mu"], axes=[-1], keepdims=1, name="mean"),
        helper.make_node("Sub", ["x", "mu"], ["xc"], name="sub"),
        helper.make_node("Pow", ["xc", "two"], ["sq"], name="pow"),
        helper.make_node("ReduceMean", ["sq"], ["var"], axes=[-1], keepdims=1, name="var"),
        helper.make_node("Add", ["var", "eps"], ["ve"], name="add_eps"),
        helper.make_node("Sqrt", ["ve"], ["sd"], name="sqrt"),
        helper.make_node("Div", ["xc", "sd"], ["y"], name="div"),
    ]
    graph = helper.make_graph(
        nodes, "decomposed_ln",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", D])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", D])],
        [numpy_helper.from_array(np.array(2.0, np.float32), "two"),
         numpy_helper.from_array(np.array(1e-5, np.float32), "eps")])
    src = tmp_path / "ln32.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(src))
    out = tmp_path / "ln16.onnx"
    onnx_export._convert_fp16(src, out)
    onnx.checker.check_model(str(out), full_check=True)
    m, types = _typed(onnx.load(str(out)))
    by_name = {n.name: n for n in m.graph.node}
    for name in ("mean", "pow", "var"):
        assert all(types[i] == TensorProto.FLOAT for i in by_name[name].input), name
        assert types[by_name[name].output[0]] == TensorProto.FLOAT, name
    assert types[by_name["sub"].output[0]] == TensorProto.FLOAT16  # not an fp32 op
    x = np.random.default_rng(0).normal(0, 30, (5, D)).astype(np.float32)
    ref = (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + 1e-5)
    (y,) = _ort_extended(out).run(None, {"x": x})
    assert np.abs(y - ref).max() < 5e-3


def test_bad_arguments(tiny_encoder, tmp_path):
    with pytest.raises(ValueError, match="opset"):
        export_onnx(tiny_encoder, opset=16, cache_dir=tmp_path)
    with pytest.raises(ValueError, match="precision"):
        export_onnx(tiny_encoder, precision="int8", cache_dir=tmp_path)


def test_cache_dir_defaults_to_env(tiny_encoder, monkeypatch, tmp_path):
    monkeypatch.setenv("RUNA_OOD_CACHE_DIR", str(tmp_path / "envcache"))
    p = onnx_export.onnx_cache_path(tiny_encoder.model_id)
    assert p.parent == tmp_path / "envcache" / "onnx"


# ---------------------------------------------------------------------- fused graph (ORT transformer fusions)
def test_fusable_trunk_equals_the_trunk(tiny_encoder):
    from runa_ood_node.backends.onnx_export import FusableTrunk

    x = torch.randn(3, 3, tiny_encoder.input_size, tiny_encoder.input_size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = tiny_encoder.visual_trunk(x)
        out = FusableTrunk(tiny_encoder.visual_trunk).eval()(x)
    assert float((ref - out).abs().max()) < 1e-5


def test_fused_export_has_one_attention_per_block_matches_torch_and_is_cached(tiny_encoder, cache):
    from runa_ood_node.backends.onnx_export import export_fused_onnx, find_cached_fused, fused_stats

    assert find_cached_fused(tiny_encoder, cache_dir=cache) is None
    path = export_fused_onnx(tiny_encoder, cache_dir=cache)
    blocks = len(tiny_encoder.model.visual.transformer.resblocks)
    ops = [n.op_type for n in onnx.load(str(path)).graph.node]
    # what ONNX Runtime's optimizer fused: attention, residual add + LayerNorm, MLP bias + GELU
    assert ops.count("Attention") == blocks and "Softmax" not in ops
    assert ops.count("SkipLayerNormalization") == 2 * blocks
    assert ops.count("BiasGelu") == blocks
    assert fused_stats(path)["fused_ops"]["Attention"] == blocks
    x = torch.randn(5, 3, tiny_encoder.input_size, tiny_encoder.input_size, generator=torch.Generator().manual_seed(2))
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (out,) = sess.run(["features"], {"views": x.numpy()})
    with torch.no_grad():
        ref = tiny_encoder.visual_trunk(x).numpy()
    assert np.abs(out - ref).max() < 1e-4 and _cos(out, ref).min() > 0.99999
    n = EXPORT_STATS.get("fused", 0)
    assert find_cached_fused(tiny_encoder, cache_dir=cache) == path
    assert export_fused_onnx(tiny_encoder, cache_dir=cache) == path
    assert EXPORT_STATS.get("fused", 0) == n  # cache hit


def test_the_plain_export_does_not_fuse_attention(fp32_path, tiny_encoder, tmp_path):
    """Why the fusable export exists: ORT's optimizer finds no Attention in the legacy export of
    open_clip's nn.MultiheadAttention (fails before the fusable export is dropped by mistake)."""
    import logging

    from onnxruntime.transformers.optimizer import optimize_model

    logging.getLogger("fusion_skiplayernorm").setLevel(logging.ERROR)
    opt = optimize_model(str(fp32_path), model_type="clip", num_heads=2, hidden_size=tiny_encoder.width,
                         opt_level=0, use_gpu=False)
    assert opt.get_fused_operator_statistics().get("Attention", 0) == 0
