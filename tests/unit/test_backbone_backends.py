"""Every backend serves every backbone output set (``cls``, ``tokens``, ``attn_cls``, ``xattn``) and
equals the torch reference on the same real views: ONNX Runtime plain, fused, fp16 (the graph a
strongly typed TensorRT engine is built from, run here with ORT), dynamic and static int8; one
graph per output set, keyed by it, with today's ``("cls",)`` files keeping their names and keys.
Random weights (tiny model): the figures are fidelity of arithmetic, never detection quality."""
import json
import pathlib

import numpy as np
import pytest

torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from runa_ood_node.backends import BackendUnavailableError, make_backend  # noqa: E402
from runa_ood_node.backends.onnx_export import (EXPORT_STATS, check_onnx, export_fused_onnx, export_onnx,  # noqa: E402
                                                 find_cached_onnx, fused_stats, onnx_cache_path)

ALL = ("cls", "tokens", "attn_cls", "xattn")
#: the tolerances of the issue: embeddings cosine >= 0.999, attention averages max |delta| <= 1e-3
COS_MIN, ATTN_MAX = 0.999, 1e-3
#: dynamic / static int8 (7-bit weights, activations quantised): the attention probabilities move
#: more than fp32/fp16 do (fp16: about 1e-4). Measured on the tiny random model and these real views:
#: max |delta| 0.94e-3 (dynamic, plain and fused) and 2.5e-3 (static), i.e. at or above the 1e-3 of the
#: issue; 5e-3 is the bound asserted for int8. Embeddings: cosine >= 0.9996 measured,
#: 0.99 asserted (as the existing int8 tests do).
INT8_COS_MIN, INT8_ATTN_MAX = 0.99, 5e-3


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("backbone_cache")


@pytest.fixture(scope="module")
def real_views(tiny_encoder):
    """Regional views of real photographs, then their global views (bench's calibration views: the
    data pack's photographs, else scikit-image's sample photographs)."""
    from runa_ood_node.tools.bench import calibration_views

    views, _ = calibration_views(tiny_encoder, max_images=4)
    return views


@pytest.fixture(scope="module")
def pairs(real_views):
    n = real_views.shape[0] // 2
    # each crop's CLS query against its own global view's keys (UNI-OOD's use), and a few others
    own = [[i, i + n] for i in range(n)]
    return torch.tensor(own + [[n, 0], [3, 3], [2 * n - 1, 0]])


@pytest.fixture(scope="module")
def reference(tiny_encoder, real_views, pairs):
    return tiny_encoder.visual_outputs(real_views, ALL, pairs=pairs)


def _cos_min(a, b):
    a, b = a.reshape(-1, a.shape[-1]).double(), b.reshape(-1, b.shape[-1]).double()
    return float(((a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1))).min())


def _fidelity(out, ref, proj):
    """cos min of the projected cls and tokens embeddings, max |delta| of the attention averages."""
    return {"cls": _cos_min(out["cls"] @ proj, ref["cls"] @ proj),
            "tokens": _cos_min(out["tokens"] @ proj, ref["tokens"] @ proj),
            "attn_cls": float((out["attn_cls"] - ref["attn_cls"]).abs().max()),
            "xattn": float((out["xattn"] - ref["xattn"]).abs().max())}


VARIANTS = {
    "plain": (dict(), COS_MIN, ATTN_MAX),
    "fused": (dict(fused=True), COS_MIN, ATTN_MAX),
    # the strongly typed TensorRT engine's source graph (LayerNorm / Softmax in fp32 islands)
    "fp16": (dict(precision="fp16"), COS_MIN, ATTN_MAX),
    "int8": (dict(int8="dynamic"), INT8_COS_MIN, INT8_ATTN_MAX),
    "fused-int8": (dict(fused=True, int8="dynamic"), INT8_COS_MIN, INT8_ATTN_MAX),
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_every_ort_variant_serves_every_output_set_like_torch(variant, tiny_encoder, cache, real_views, pairs,
                                                              reference):
    kw, cos_min, attn_max = VARIANTS[variant]
    be = make_backend("onnxruntime", tiny_encoder, cache_dir=cache, ort_threads=1, outputs=ALL, **kw)
    assert be.graph_outputs == ALL
    out = be.outputs(real_views, ALL, pairs=pairs)
    assert {n: tuple(t.shape) for n, t in out.items()} == {n: tuple(t.shape) for n, t in reference.items()}
    fid = _fidelity(out, reference, tiny_encoder.proj_global)
    print(f"\n{be.name} vs torch, tiny model, {len(real_views)} real views: {json.dumps(fid)}")
    assert fid["cls"] >= cos_min and fid["tokens"] >= cos_min, fid
    assert fid["attn_cls"] <= attn_max and fid["xattn"] <= attn_max, fid
    # a subset is served by the same graph, equal to the full call; the plain call is its cls
    sub = be.outputs(real_views, ("attn_cls",))
    assert torch.allclose(sub["attn_cls"], out["attn_cls"], atol=1e-6)
    assert torch.allclose(be(real_views), out["cls"], atol=1e-6)


def test_fused_graph_keeps_every_attention_fused_with_attention_outputs(tiny_encoder, cache):
    blocks = len(tiny_encoder.model.visual.transformer.resblocks)
    path = export_fused_onnx(tiny_encoder, cache_dir=cache, outputs=ALL)
    assert path.name == f"{tiny_encoder.model_id}-17-fp32-ocls_tokens_attn_cls_xattn-fused.onnx"
    assert fused_stats(path)["fused_ops"]["Attention"] == blocks
    # an attention-only set skips the last block's body (only its attention branch is needed)
    only = export_fused_onnx(tiny_encoder, cache_dir=cache, outputs=("attn_cls",))
    assert fused_stats(only)["fused_ops"]["Attention"] == blocks - 1


def test_one_graph_per_output_set_and_cls_keeps_todays_file_and_key(tiny_encoder, cache):
    import onnxruntime as ort

    cls_path = export_onnx(tiny_encoder, cache_dir=cache)
    assert cls_path == onnx_cache_path(tiny_encoder.model_id, 17, "fp32", cache)
    assert cls_path.name == f"{tiny_encoder.model_id}-17-fp32.onnx"
    # today's key, field for field: caches written before output sets existed stay valid
    key = json.loads(cls_path.with_suffix(".json").read_text())["key"]
    assert set(key) == {"model_id", "opset", "precision", "input_size", "width", "input", "output", "format"}
    paths = {}
    for names in (("tokens",), ("attn_cls",), ("cls", "xattn"), ALL):
        p = export_onnx(tiny_encoder, cache_dir=cache, outputs=names)
        check_onnx(p, names)
        m = onnx.load(str(p))
        ins = {i.name: i.type.tensor_type.elem_type for i in m.graph.input}
        assert list(ins) == (["views", "pairs"] if "xattn" in names else ["views"])
        if "xattn" in names:
            assert ins["pairs"] == onnx.TensorProto.INT32     # TensorRT-friendly index type
        assert [o.name for o in m.graph.output] == ["features" if n == "cls" else n for n in names]
        assert json.loads(p.with_suffix(".json").read_text())["key"]["outputs"] == list(names)
        with pytest.raises(ValueError, match="expected inputs"):
            check_onnx(p)  # not today's contract
        paths[names] = p
    assert len(set(paths.values()) | {cls_path}) == 5
    # the cache answers the second call without exporting
    n = EXPORT_STATS["exports"]
    assert export_onnx(tiny_encoder, cache_dir=cache, outputs=("tokens",)) == paths[("tokens",)]
    assert find_cached_onnx(tiny_encoder, cache_dir=cache, outputs=("attn_cls",)) == paths[("attn_cls",)]
    assert find_cached_onnx(tiny_encoder, cache_dir=cache, outputs=("tokens", "attn_cls")) is None
    assert EXPORT_STATS["exports"] == n
    # dynamic batch and pair axes
    sess = ort.InferenceSession(str(paths[ALL]), providers=["CPUExecutionProvider"])
    for b, p in ((1, 1), (3, 5)):
        x = np.random.default_rng(b).standard_normal((b, 3, 64, 64)).astype(np.float32)
        pr = np.stack([np.arange(p) % b, (np.arange(p) + 1) % b], 1).astype(np.int32)
        outs = sess.run(None, {"views": x, "pairs": pr})
        assert [o.shape[0] for o in outs] == [b, b, b, p]


def test_a_backend_opens_another_output_set_on_first_use(tiny_encoder, cache, real_views, pairs, reference):
    be = make_backend("onnxruntime", tiny_encoder, cache_dir=cache, ort_threads=1)   # today's ("cls",) graph
    assert be.graph_outputs == ("cls",)
    out = be.outputs(real_views, ("tokens", "xattn"), pairs=pairs)
    assert tuple(be.__dict__['_others']) == (("tokens", "xattn"),)
    assert float((out["xattn"] - reference["xattn"]).abs().max()) <= ATTN_MAX
    be.outputs(real_views, ("tokens", "xattn"), pairs=pairs)
    assert len(be.__dict__['_others']) == 1  # opened once
    # auto never exports at start-up: without a cached graph for the set, it says which command makes it
    with pytest.raises(BackendUnavailableError, match="--outputs attn_cls"):
        from runa_ood_node.backends.ort_backend import OrtBackend

        OrtBackend.from_model(tiny_encoder, cache_dir=cache / "empty", allow_export=False, outputs=("attn_cls",))
    # a graph opened from an explicit path is that graph only
    fixed = make_backend("onnxruntime", tiny_encoder, onnx_path=export_onnx(tiny_encoder, cache_dir=cache))
    with pytest.raises(BackendUnavailableError, match="explicit file"):
        fixed.outputs(real_views, ("tokens",))


def test_ort_chunks_keep_pairs_together(tiny_encoder, cache, real_views, pairs, reference):
    be = make_backend("onnxruntime", tiny_encoder, cache_dir=cache, ort_threads=1, outputs=ALL, max_batch=3)
    out = be.outputs(real_views, ALL, pairs=pairs)
    for n in ALL:
        assert torch.allclose(out[n], reference[n], atol=1e-4), n
    empty = be.outputs(real_views, ("cls", "xattn"), pairs=torch.zeros((0, 2), dtype=torch.long))
    assert empty["xattn"].shape == (0, tiny_encoder.num_tokens)


def test_encoder_with_an_ort_backend_gives_every_output(tiny_encoder, cache, real_views, pairs, reference):
    be = make_backend("onnxruntime", tiny_encoder, cache_dir=cache, ort_threads=1, outputs=ALL)
    try:
        tiny_encoder.set_backend(be)
        out = tiny_encoder.visual_outputs(real_views, ALL, pairs=pairs, max_batch=4)
    finally:
        tiny_encoder.set_backend(None)
    fid = _fidelity(out, reference, tiny_encoder.proj_global)
    assert fid["cls"] >= COS_MIN and fid["attn_cls"] <= ATTN_MAX and fid["xattn"] <= ATTN_MAX


def test_static_int8_serves_the_attention_outputs(tiny_encoder, cache, real_views, pairs, reference):
    calib = real_views[::2]
    be = make_backend("onnxruntime", tiny_encoder, cache_dir=cache, ort_threads=1, outputs=ALL, int8="static",
                      calibration_views=calib)
    out = be.outputs(real_views, ALL, pairs=pairs)
    fid = _fidelity(out, reference, tiny_encoder.proj_global)
    print(f"\n{be.name} vs torch, tiny model: {json.dumps(fid)}")
    assert fid["cls"] >= INT8_COS_MIN and fid["attn_cls"] <= INT8_ATTN_MAX and fid["xattn"] <= INT8_ATTN_MAX


def test_fp16_graph_for_tensorrt_keeps_softmax_and_layernorm_in_fp32(tiny_encoder, cache):
    """The graph a strongly typed TensorRT engine of the full output set is built from: float32 I/O,
    int32 pairs, every Softmax (the attention branch's too) and LayerNormalization an fp32 island."""
    p = export_onnx(tiny_encoder, cache_dir=cache, precision="fp16", outputs=ALL)
    check_onnx(p, ALL)
    m = onnx.load(str(p))
    types = {i.name: i.type.tensor_type.elem_type for i in list(m.graph.input) + list(m.graph.output)}
    assert types == {"views": 1, "pairs": onnx.TensorProto.INT32, "features": 1, "tokens": 1, "attn_cls": 1,
                     "xattn": 1}
    inferred = onnx.shape_inference.infer_shapes(m)
    vt = {v.name: v.type.tensor_type.elem_type for v in inferred.graph.value_info}
    softmax = [n for n in m.graph.node if n.op_type == "Softmax"]
    blocks = len(tiny_encoder.model.visual.transformer.resblocks)
    assert len(softmax) >= 3 * blocks  # open_clip's attention + the CLS and pair branches per block
    assert all(vt.get(n.input[0]) == onnx.TensorProto.FLOAT for n in softmax)


def test_auto_on_cpu_uses_the_measured_fastest_variant_that_holds_fidelity(tiny_encoder, tmp_path, real_views,
                                                                             caplog):
    import logging

    from runa_ood_node.backends.ort_backend import auto_choice, auto_record_path, choose_auto_variant

    cache = tmp_path / "auto"
    export_onnx(tiny_encoder, cache_dir=cache)
    make_backend("onnxruntime", tiny_encoder, cache_dir=cache, int8="dynamic")   # quantised graph cached
    path = auto_record_path(tiny_encoder.model_id, cache)
    # no record yet: auto measures the cached variants now (never the uncached ones) and records the choice
    be = make_backend("auto", tiny_encoder, cache_dir=cache, auto_sample=real_views)
    rec = json.loads(path.read_text())
    assert be.variant_reason == "measured" and be.variant == rec["chosen"] in ("plain", "int8")
    assert "error" in rec["variants"]["fused"] and "error" in rec["variants"]["int8-static"]
    assert rec["cpu"]["logical_cpus"] >= 1 and rec["torch_ms_median"] > 0
    rec = choose_auto_variant(tiny_encoder, real_views, projection=tiny_encoder.proj_global, cache_dir=cache,
                              repeats=2)
    v = rec["variants"]
    assert "error" in v["fused"] and "error" in v["fused-int8"]           # not cached: never exported here
    assert v["plain"]["holds_fidelity"] and v["plain"]["cos_min"] > 0.99999 and v["plain"]["attn_max_abs"] is None
    assert rec["chosen"] == min((v[n]["ms_median"], n) for n in ("plain", "int8") if v[n]["holds_fidelity"])[1]
    # pin the choice to int8 (timings on a shared CI machine decide nothing): auto opens it, from the record
    rec["chosen"] = "int8"
    rec["variants"]["int8"]["holds_fidelity"] = True
    path.write_text(json.dumps(rec))
    with caplog.at_level(logging.INFO):
        be = make_backend("auto", tiny_encoder, cache_dir=cache)
    assert be.name == "onnxruntime-cpu-int8" and be.variant == "int8" and be.variant_reason == "recorded"
    assert "variant int8" in caplog.text and "recorded" in caplog.text
    assert json.loads(path.read_text())["chosen"] == "int8"   # a recorded choice is not measured again
    # explicit options still win; a variant below the fidelity bar is never chosen
    assert make_backend("auto", tiny_encoder, cache_dir=cache, int8=False, fused=False).name == be.name
    strict = choose_auto_variant(tiny_encoder, real_views, cache_dir=cache, repeats=1, fidelity_min=1.01)
    assert strict["chosen"] is None and auto_choice(describe(tiny_encoder), cache) is None
    # ... and then auto measures again at its own bar
    again = make_backend("auto", tiny_encoder, cache_dir=cache, auto_sample=real_views)
    assert again.variant_reason == "measured" and json.loads(path.read_text())["chosen"] == again.variant
    # a re-exported graph, or a record made on another CPU, is measured again
    for field, value in (("sha256", "0" * 64), ("cpu", {"model": "another CPU", "logical_cpus": 64})):
        rec = json.loads(path.read_text())
        if field == "cpu":
            rec["cpu"] = value
        else:
            rec["variants"][rec["chosen"]]["sha256"] = value
        path.write_text(json.dumps(rec))
        assert auto_choice(describe(tiny_encoder), cache) is None
        assert make_backend("auto", tiny_encoder, cache_dir=cache, auto_sample=real_views).variant_reason == "measured"
        assert auto_choice(describe(tiny_encoder), cache) is not None


def test_auto_static_int8_is_calibrated_on_the_methods_own_views(tiny_encoder, tmp_path, ood_pack, monkeypatch):
    """backend: auto through the factory with nothing cached: every CPU variant of the method's own
    output set is exported (static int8 calibrated on the views the method's scorer sends), measured on
    those views, and the choice recorded; the next build reuses the record without measuring."""
    from runa_ood_node.backends.ort_backend import AUTO_VARIANTS, auto_record_path
    from runa_ood_node.backends.samples import method_sample
    from runa_ood_node.core.pipeline import OodScorer
    from runa_ood_node.factory import build_scorer

    cache = tmp_path / "cache"
    outs = ("tokens", "attn_cls")
    sample = method_sample(OodScorer(tiny_encoder, "voc", method="tagood"), max_images=3,
                           annotations=ood_pack / "annotations.json")
    # TagOOD's calls: one whole-frame view per photograph, no pairs
    assert len(sample.calls) == 3 and all(v.shape[0] == 1 for v, _ in sample.calls) and sample.pairs is None
    assert "tagood's views of 3 photographs" in sample.source
    be = make_backend("auto", tiny_encoder, cache_dir=cache, outputs=outs, auto_sample=lambda: sample)
    rec = json.loads(auto_record_path(tiny_encoder.model_id, cache, outs).read_text())
    assert be.variant_reason == "measured" and "exporting" in be.variant_detail
    assert set(rec["variants"]) == set(AUTO_VARIANTS) and all("ms_median" in v for v in rec["variants"].values())
    assert rec["sample"] == sample.source and rec["outputs"] == list(outs)
    static = json.loads(pathlib.Path(rec["variants"]["int8-static"]["onnx"]).with_suffix(".json").read_text())
    from runa_ood_node.backends.ort_backend import _views_sha

    assert static["key"]["calibration_sha256"] == _views_sha(sample.views)   # calibrated on TagOOD's own views
    for v in rec["variants"].values():
        assert v["cos_min"] > 0.99 and v["attn_max_abs"] < 5e-3
    # the factory's way: the node's scorer measures on its method's views once, then reads the record
    monkeypatch.setenv("RUNA_OOD_CACHE_DIR", str(cache))
    from runa_ood_node.core.config import ScorerConfig

    cfg = ScorerConfig(model=tiny_encoder.model_name, pretrained="", allow_random=True, backend="auto",
                       method="uni-ood")
    first, second = build_scorer(cfg), build_scorer(cfg)
    assert first.backend_choice["reason"] == "measured" and "uni-ood's views" in first.backend_choice["detail"]
    assert second.backend_choice["reason"] == "recorded"
    assert second.backend_choice["variant"] == first.backend_choice["variant"]
    assert second.encoder._backend.graph_outputs == ("tokens", "attn_cls", "xattn")   # the method's own set


def describe(encoder):
    from runa_ood_node.backends.base import describe_model

    return describe_model(encoder)
