"""Visual backends: ONNX Runtime vs PyTorch on real photographs, int8 fidelity, the auto fallback
chain, explicit-kind errors, the backend contract, and GPU-style preprocessing (run on CPU)."""
import logging
import os
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("onnxruntime")

from runa_ood_node.backends import BackendUnavailableError, make_backend  # noqa: E402
from runa_ood_node.backends.onnx_export import EXPORT_STATS, export_onnx  # noqa: E402
from runa_ood_node.backends.ort_backend import QUANT_STATS, cosine_rows, embedding_fidelity  # noqa: E402
from runa_ood_node.backends.tensorrt_backend import tensorrt_available  # noqa: E402

N_PHOTOS = 6


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("backend_cache")


@pytest.fixture(scope="module")
def photos(ood_pack, ood_pack_annotations):
    """A few real photographs (RGB uint8) with their annotated boxes as xyxy."""
    import cv2

    anns = ood_pack_annotations
    out = []
    for img in anns["images"]:
        boxes = np.array([a["bbox"] for a in anns["annotations"] if a["image_id"] == img["id"]], np.float32)
        if len(boxes) < 2:
            continue
        boxes[:, 2:] += boxes[:, :2]
        bgr = cv2.imread(str(ood_pack / img["file_name"]), cv2.IMREAD_COLOR)
        if bgr is None:
            continue
        out.append((bgr[:, :, ::-1].copy(), boxes))
        if len(out) == N_PHOTOS:
            break
    assert out, "no photographs with boxes in the pack"
    return out


@pytest.fixture(scope="module")
def real_views(photos, tiny_encoder):
    from runa_ood_node.core.views import ViewMaker

    vm = ViewMaker(tiny_encoder.input_size, tiny_encoder.mean, tiny_encoder.std, 1.0)
    views = []
    for rgb, boxes in photos:
        r, g = vm.make(rgb, boxes)
        views += [r, g]
    return torch.cat(views, 0)


@pytest.fixture(scope="module")
def torch_be(tiny_encoder):
    return make_backend("torch", tiny_encoder)


@pytest.fixture(scope="module")
def ort_be(tiny_encoder, cache):
    return make_backend("onnxruntime", tiny_encoder, cache_dir=cache, ort_threads=1)


@pytest.fixture
def restore_backend(tiny_encoder):
    yield tiny_encoder
    tiny_encoder.set_backend(None)


def test_ort_matches_torch_on_real_crops(torch_be, ort_be, real_views, tiny_encoder):
    assert ort_be.name == "onnxruntime-cpu-fp32" and torch_be.name == "torch-cpu-fp32"
    ref = torch_be(real_views)
    out = ort_be(real_views)
    assert out.dtype == torch.float32 and out.device.type == "cpu"
    assert out.shape == (real_views.shape[0], tiny_encoder.width)
    feat_cos = cosine_rows(ref, out)
    P = tiny_encoder.proj_global
    emb_cos = cosine_rows(ref @ P, out @ P)
    print(f"\nORT fp32 vs torch fp32 on {real_views.shape[0]} real views: feature cos min {feat_cos.min():.8f}, "
          f"embedding cos min {emb_cos.min():.8f}")
    assert float(feat_cos.min()) >= 0.9999
    assert float(emb_cos.min()) >= 0.9999


def test_score_ordering_identical_through_pipeline(photos, ort_be, restore_backend):
    from runa_ood_node.core.pipeline import OodScorer

    enc = restore_backend
    scorer = OodScorer(enc, "voc")
    for rgb, boxes in photos:
        enc.set_backend(None)
        a = scorer.score(rgb, boxes)
        enc.set_backend(ort_be)
        b = scorer.score(rgb, boxes)
        assert a.error is None and b.error is None
        ok = a.status == 0
        assert np.array_equal(a.status, b.status) and ok.sum() >= 2
        assert np.allclose(a.uncertainty[ok], b.uncertainty[ok], atol=1e-5)
        assert np.array_equal(np.argsort(a.uncertainty[ok], kind="stable"), np.argsort(b.uncertainty[ok], kind="stable"))
        assert list(a.label) == list(b.label)
    assert enc.backend_name == "onnxruntime-cpu-fp32"


def test_int8_fidelity_reported_and_cached(tiny_encoder, cache, ort_be, real_views):
    int8 = make_backend("onnxruntime", tiny_encoder, cache_dir=cache, int8=True)
    assert int8.name == "onnxruntime-cpu-int8" and int8.precision == "int8"
    fid = embedding_fidelity(ort_be, int8, real_views, tiny_encoder.proj_global)
    print(f"\nint8 (dynamic, per-channel) vs fp32 on {fid['n']} real views: feature cos min "
          f"{fid['feature_cos_min']:.6f} mean {fid['feature_cos_mean']:.6f}; embedding cos min "
          f"{fid['embedding_cos_min']:.6f} mean {fid['embedding_cos_mean']:.6f}")
    assert fid["n"] == real_views.shape[0]
    assert fid["embedding_cos_min"] >= 0.99
    assert fid["embedding_cos_min"] < 1.0  # it really is a different (quantised) graph
    n = QUANT_STATS["quantizations"]
    make_backend("onnxruntime", tiny_encoder, cache_dir=cache, int8=True)
    assert QUANT_STATS["quantizations"] == n  # cached


no_trt = pytest.mark.skipif(tensorrt_available()[0], reason="TensorRT + CUDA present: auto would pick TensorRT")


@no_trt
def test_auto_falls_back_from_tensorrt_to_ort_and_logs_why(tiny_encoder, cache, caplog):
    export_onnx(tiny_encoder, cache_dir=cache)  # pre-exported, as `runa-ood build-engine --onnx-only` does
    with caplog.at_level(logging.INFO, logger="runa_ood_node.backends"):
        be = make_backend("auto", tiny_encoder, cache_dir=cache)
    assert be.name.startswith("onnxruntime-cpu")
    reasons = dict(be.fallback_reasons)
    assert set(reasons) == {"tensorrt"}
    assert "TensorRT not installed" in reasons["tensorrt"] or "CUDA" in reasons["tensorrt"]
    warn = [r for r in caplog.records if r.levelno == logging.WARNING and "tensorrt unavailable" in r.getMessage()]
    assert warn, "the TensorRT fallback must be logged with its reason"
    assert any("using onnxruntime-cpu-fp32" in r.getMessage() for r in caplog.records)


@no_trt
def test_auto_with_nothing_cached_exports_within_its_budget_measures_and_records(tiny_encoder, tmp_path, caplog,
                                                                                  capsys):
    """A first start without TensorRT and without a cached export: with a budget of 0 it starts at once
    on the torch trunk, saying why and how to pre-export (the fallback); with the default budget it
    exports the CPU variants (logged with their times), measures them, records the fastest that holds
    fidelity and opens it; the next start reads the record (no export, no measurement); after
    `runa-ood build-engine --onnx-only --auto-choice` the record is the tool's."""
    import argparse
    import json

    from runa_ood_node.backends.ort_backend import auto_record_path
    from runa_ood_node.tools import build_engine as tool

    cache = tmp_path / "cache"
    before, q0 = dict(EXPORT_STATS), QUANT_STATS["quantizations"]
    with caplog.at_level(logging.WARNING, logger="runa_ood_node.backends"):
        be = make_backend("auto", tiny_encoder, cache_dir=cache, auto_budget_s=0)
    assert be.name == "torch-cpu-fp32" and be.variant == "torch" and be.variant_reason == "fallback"
    assert EXPORT_STATS == before and not list(cache.rglob("*.onnx"))   # budget 0: nothing exported
    why = dict(be.fallback_reasons)["onnxruntime"]
    assert f"no exported ONNX for model {tiny_encoder.model_name}" in why
    assert "runa-ood build-engine" in why and "--onnx-only" in why and "--onnx-only" in be.variant_detail
    # int8 in auto: an explicit option, no quantised graph cached -> torch fp32, not an error, no export
    be8 = make_backend("auto", tiny_encoder, cache_dir=cache, int8=True)
    assert be8.name == "torch-cpu-fp32" and "--int8" in dict(be8.fallback_reasons)["onnxruntime"]
    assert EXPORT_STATS == before and QUANT_STATS["quantizations"] == q0

    caplog.clear()
    with caplog.at_level(logging.INFO, logger="runa_ood_node.backends"):
        be = make_backend("auto", tiny_encoder, cache_dir=cache)
    rec = json.loads(auto_record_path(tiny_encoder.model_id, cache).read_text())
    assert be.name.startswith("onnxruntime-cpu") and be.variant == rec["chosen"] and be.variant_reason == "measured"
    assert EXPORT_STATS["exports"] == before["exports"] + 1 and EXPORT_STATS.get("fused", 0) == before.get("fused", 0) + 1
    assert all("ms_median" in v and v["holds_fidelity"] for v in rec["variants"].values())  # all five made
    exported = [r.getMessage() for r in caplog.records if "was cached: exported plain" in r.getMessage()]
    assert exported and "budget 240 s" in exported[0]
    assert any(f"using {be.name} (variant {be.variant}, measured" in r.getMessage() for r in caplog.records)
    n = dict(EXPORT_STATS), QUANT_STATS["quantizations"]
    again = make_backend("auto", tiny_encoder, cache_dir=cache)
    assert again.variant == be.variant and again.variant_reason == "recorded"
    assert (dict(EXPORT_STATS), QUANT_STATS["quantizations"]) == n   # loaded, not re-exported
    assert json.loads(auto_record_path(tiny_encoder.model_id, cache).read_text()) == rec   # not measured again

    p = argparse.ArgumentParser()
    tool.add_arguments(p)
    args = p.parse_args(["--model", tiny_encoder.model_name, "--pretrained", "none", "--allow-random-weights",
                         "--cache-dir", str(cache), "--onnx-only", "--int8", "--auto"])
    assert tool.run(args) == 0
    capsys.readouterr()
    tool_rec = json.loads(auto_record_path(tiny_encoder.model_id, cache).read_text())
    assert tool_rec != rec and make_backend("auto", tiny_encoder, cache_dir=cache).variant == tool_rec["chosen"]
    assert make_backend("auto", tiny_encoder, cache_dir=cache, int8=True).name == "onnxruntime-cpu-int8"


@no_trt
def test_auto_uses_an_explicit_onnx_path(tiny_encoder, cache, tmp_path):
    path = export_onnx(tiny_encoder, path=tmp_path / "given.onnx")
    be = make_backend("auto", tiny_encoder, cache_dir=tmp_path / "empty_cache", onnx_path=path)
    assert be.name == "onnxruntime-cpu-fp32" and be.onnx_path == path


def test_explicit_onnxruntime_exports_with_a_warning(tiny_encoder, tmp_path, caplog):
    n = EXPORT_STATS["exports"]
    with caplog.at_level(logging.WARNING, logger="runa_ood_node.backends"):
        be = make_backend("onnxruntime", tiny_encoder, cache_dir=tmp_path)
    assert be.name == "onnxruntime-cpu-fp32"
    assert EXPORT_STATS["exports"] == n + 1
    warn = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("exporting it now" in w and "30-60 s" in w and "--onnx-only" in w for w in warn), warn
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="runa_ood_node.backends"):
        make_backend("onnxruntime", tiny_encoder, cache_dir=tmp_path)
    assert EXPORT_STATS["exports"] == n + 1
    assert not [r for r in caplog.records if "exporting it now" in r.getMessage()]  # cached: silent


def test_auto_falls_back_to_torch_without_onnxruntime(tiny_encoder, cache, caplog, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import onnxruntime -> ImportError
    with caplog.at_level(logging.WARNING, logger="runa_ood_node.backends"):
        be = make_backend("auto", tiny_encoder, cache_dir=cache)
    assert be.name == "torch-cpu-fp32"
    reasons = dict(be.fallback_reasons)
    assert "onnxruntime is not installed" in reasons["onnxruntime"]
    assert any("onnxruntime unavailable" in r.getMessage() for r in caplog.records)


def test_explicit_kinds_fail_clearly(tiny_encoder, cache, monkeypatch):
    if not tensorrt_available()[0]:
        with pytest.raises(BackendUnavailableError, match="TensorRT not installed|CUDA"):
            make_backend("tensorrt", tiny_encoder, device="cuda", cache_dir=cache)
    if not torch.cuda.is_available():
        with pytest.raises(BackendUnavailableError, match="CUDA"):
            make_backend("torch", tiny_encoder, device="cuda")
    with pytest.raises(BackendUnavailableError, match="fp16"):
        make_backend("torch", tiny_encoder, device="cpu", precision="fp16")
    with pytest.raises(BackendUnavailableError, match="int8"):
        make_backend("torch", tiny_encoder, int8=True)
    with pytest.raises(BackendUnavailableError, match="CPU provider"):
        make_backend("onnxruntime", tiny_encoder, device="cuda", int8=True, cache_dir=cache)
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        with pytest.raises(BackendUnavailableError, match="CUDAExecutionProvider"):
            make_backend("onnxruntime", tiny_encoder, device="cuda", cache_dir=cache)
    with pytest.raises(ValueError, match="unknown backend kind"):
        make_backend("openvino", tiny_encoder)
    with pytest.raises(ValueError, match="precision"):
        make_backend("torch", tiny_encoder, precision="fp8")
    with pytest.raises(ValueError, match="device"):
        make_backend("torch", tiny_encoder, device="tpu")
    with pytest.raises(TypeError):
        make_backend("torch", object())


@pytest.mark.parametrize("kind", ["torch", "onnxruntime"])
def test_backend_contract(kind, tiny_encoder, cache, real_views):
    be = make_backend(kind, tiny_encoder, cache_dir=cache)
    S, W = tiny_encoder.input_size, tiny_encoder.width
    empty = be(torch.zeros((0, 3, S, S)))
    assert empty.shape == (0, W) and empty.dtype == torch.float32
    with pytest.raises(ValueError):
        be(torch.zeros((2, 3, S + 1, S)))
    with pytest.raises(ValueError):
        be(torch.zeros((3, S, S)))
    with pytest.raises(TypeError):
        be(np.zeros((1, 3, S, S), np.float32))
    full = be(real_views)
    split = make_backend(kind, tiny_encoder, cache_dir=cache, max_batch=3)
    assert split.max_batch == 3
    assert torch.allclose(split(real_views), full, atol=1e-5)


def test_bare_trunk_and_encoder_set_backend(tiny_encoder, cache, real_views, restore_backend):
    be = make_backend("onnxruntime", tiny_encoder.visual_trunk, cache_dir=cache)  # as factory.build_scorer passes it
    enc = restore_backend
    ref = enc.visual_features(real_views)
    enc.set_backend(be)
    assert enc.backend_name == be.name
    out = enc.visual_features(real_views, max_batch=5)
    assert float(cosine_rows(ref, out).min()) >= 0.9999


def test_fp16_onnx_on_ort_cpu(tiny_encoder, cache, real_views, torch_be):
    be = make_backend("onnxruntime", tiny_encoder, precision="fp16", cache_dir=cache)
    assert be.name == "onnxruntime-cpu-fp16"
    c = cosine_rows(torch_be(real_views) @ tiny_encoder.proj_global, be(real_views) @ tiny_encoder.proj_global)
    print(f"\nORT fp16 graph vs torch fp32: embedding cos min {c.min():.6f}")
    assert float(c.min()) >= 0.999


# ---------------------------------------------------------------------- GPU-style preprocessing
def _gpu_maker(enc, device="cpu"):
    from runa_ood_node.backends.gpu_preprocess import GpuViewMaker

    return GpuViewMaker(enc.input_size, enc.mean, enc.std, 1.0, device=device)


def test_gpu_blur_and_composite_equal_cpu_on_frame_of_input_size(tiny_encoder):
    """With a frame already S x S no resizing happens, so blur + composite must match exactly."""
    from runa_ood_node.core.views import ViewMaker

    S = tiny_encoder.input_size
    rgb = np.random.default_rng(0).integers(0, 256, (S, S, 3), dtype=np.uint8)
    boxes = np.array([[3.2, 4.7, 30.1, 41.0], [0, 0, S, S], [50, 10, 63.5, 20.2]], np.float32)
    r1, g1 = ViewMaker(S, tiny_encoder.mean, tiny_encoder.std, 1.0).make(rgb, boxes)
    r2, g2 = _gpu_maker(tiny_encoder).make(rgb, boxes)
    assert g2.shape == g1.shape == (3, 3, S, S)
    assert float((g1 - g2).abs().max()) < 1e-3  # normalised units (~0.07 grey levels)


def test_gpu_views_close_to_cpu_views_on_real_photos(photos, tiny_encoder, torch_be):
    """roi_align vs cv2 resizing differ by a few grey levels; embeddings agree closely.

    Measured on the first 6 photos of the pack with the 64 px tiny model: worst per-photo mean
    |diff| 2.8 grey levels for regional crops (boxes shrunk on one axis and enlarged on the other:
    cv2 then uses INTER_LINEAR without anti-aliasing, roi_align still averages) and 0.18 for global
    views; single pixels differ by up to ~30 on sharp edges; fused embedding cosine min 0.99992.
    Tolerances below leave ~1.5x headroom.
    """
    from runa_ood_node.core.methods.runa import fuse
    from runa_ood_node.core.views import ViewMaker

    enc = tiny_encoder
    vm = ViewMaker(enc.input_size, enc.mean, enc.std, 1.0)
    gm = _gpu_maker(enc)
    grey = 255.0 * torch.tensor(enc.std).view(1, 3, 1, 1)
    worst_mean_r = worst_mean_g = 0.0
    emb_cos = []
    for rgb, boxes in photos:
        r1, g1 = vm.make(rgb, boxes)
        r2, g2 = gm.make(rgb, boxes)
        assert r2.shape == r1.shape and g2.shape == g1.shape and r2.dtype == torch.float32
        worst_mean_r = max(worst_mean_r, float(((r1 - r2).abs() * grey).mean()))
        worst_mean_g = max(worst_mean_g, float(((g1 - g2).abs() * grey).mean()))
        P = enc.proj_global  # RUNA's Eq. 3 off the shelf (methods.runa.fuse)
        f1 = fuse(torch_be(r1), torch_be(g1), 0.5, P, P)
        f2 = fuse(torch_be(r2), torch_be(g2), 0.5, P, P)
        emb_cos.append(cosine_rows(f1, f2))
    emb_cos = torch.cat(emb_cos)
    print(f"\nGPU-style vs CPU views: worst per-photo mean |diff| regional {worst_mean_r:.3f}, global "
          f"{worst_mean_g:.3f} grey levels; fused embedding cos min {emb_cos.min():.6f} mean {emb_cos.mean():.6f}")
    assert worst_mean_r < 4.0
    assert worst_mean_g < 0.5
    assert float(emb_cos.min()) > 0.999


def test_gpu_maker_edge_cases(tiny_encoder):
    gm = _gpu_maker(tiny_encoder)
    S = tiny_encoder.input_size
    rgb = np.zeros((48, 80, 3), np.uint8)
    r, g = gm.make(rgb, np.zeros((0, 4), np.float32))
    assert r.shape == g.shape == (0, 3, S, S)
    r, g = gm.make(rgb, np.array([[79.5, 47.5, 80, 48]], np.float32))  # sub-pixel box at the corner
    assert torch.isfinite(r).all() and torch.isfinite(g).all()
    with pytest.raises(ValueError):
        gm.make(rgb[:, :, 0], np.zeros((1, 4)))
    with pytest.raises(ValueError):
        gm.make(rgb.astype(np.float32), np.zeros((1, 4)))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none on CI machines)")
def test_gpu_maker_on_cuda_matches_cpu(photos, tiny_encoder):
    cpu = _gpu_maker(tiny_encoder, "cpu")
    gpu = _gpu_maker(tiny_encoder, "cuda")
    rgb, boxes = photos[0]
    r1, g1 = cpu.make(rgb, boxes)
    r2, g2 = gpu.make(rgb, boxes)
    assert r2.is_cuda
    assert float((r1 - r2.cpu()).abs().max()) < 1e-3 and float((g1 - g2.cpu()).abs().max()) < 1e-3


@pytest.fixture(scope="module")
def vit_b32(tmp_path_factory):
    """ViT-B-32 with random weights (seed 0), its view maker and one ONNX cache, loaded once for the
    slow ViT-B-32 tests (the int8 variants quantise the fp32 export the first test makes)."""
    from runa_ood_node.core.encoder import DualEncoder
    from runa_ood_node.core.views import ViewMaker

    torch.manual_seed(0)
    enc = DualEncoder.load("ViT-B-32", pretrained=None, allow_random=True)
    return enc, ViewMaker(enc.input_size, enc.mean, enc.std, 1.0), tmp_path_factory.mktemp("vit_b32_onnx")


@pytest.mark.skipif(not os.environ.get("RUNA_OOD_SLOW_TESTS"),
                    reason="ViT-B-32 export takes ~30-60 s on the 2-core CI machine; set RUNA_OOD_SLOW_TESTS=1 "
                           "(the bench checks ViT-B-32 fidelity on every run)")
def test_vit_b32_ort_matches_torch(photos, vit_b32):
    enc, vm, onnx_cache = vit_b32
    rgb, boxes = photos[0]
    r, g = vm.make(rgb, boxes[:4])
    views = torch.cat([r, g])
    ref = make_backend("torch", enc)(views)
    out = make_backend("onnxruntime", enc, cache_dir=onnx_cache)(views)
    assert float(cosine_rows(ref @ enc.proj_global, out @ enc.proj_global).min()) >= 0.9999
    # the fp16 graph TensorRT's strongly typed build uses: LayerNorm/Softmax islands in fp32
    import onnx

    be16 = make_backend("onnxruntime", enc, precision="fp16", cache_dir=onnx_cache)
    ops = [n.op_type for n in onnx.load(str(be16.onnx_path), load_external_data=False).graph.node]
    assert ops.count("LayerNormalization") == 2 * 12 + 2 and ops.count("Softmax") == 12
    c16 = cosine_rows(ref @ enc.proj_global, be16(views) @ enc.proj_global)
    print(f"\nViT-B-32 fp16 ONNX (fp32 islands) on ORT CPU vs torch fp32: embedding cos min {c16.min():.6f}")
    assert float(c16.min()) >= 0.999


# ---------------------------------------------------------------------- fused, static int8, thread settings
def test_int8_mode_parsing():
    from runa_ood_node.backends.ort_backend import int8_mode

    assert int8_mode(False) is None and int8_mode(None) is None and int8_mode("") is None
    assert int8_mode(True) == "dynamic" and int8_mode("dynamic") == "dynamic"
    assert int8_mode("static") == "static"
    with pytest.raises(ValueError):
        int8_mode("int4")


def test_fused_backends_match_torch_on_real_crops(tiny_encoder, cache, torch_be, real_views):
    fused = make_backend("onnxruntime", tiny_encoder, cache_dir=cache, fused=True, ort_threads=1)
    assert fused.name == "onnxruntime-cpu-fp32-fused" and fused.onnx_path.name.endswith("-fused.onnx")
    fid = embedding_fidelity(torch_be, fused, real_views, tiny_encoder.proj_global)
    assert fid["embedding_cos_min"] >= 0.99999
    q = make_backend("onnxruntime", tiny_encoder, cache_dir=cache, fused=True, int8="dynamic", ort_threads=1)
    assert q.name == "onnxruntime-cpu-int8-fused" and q.onnx_path.name.endswith("-fused-int8dyn.onnx")
    import onnx

    ops = {n.op_type for n in onnx.load(str(q.onnx_path)).graph.node}
    assert "QAttention" in ops  # the fused attention is quantised as one op
    fid8 = embedding_fidelity(torch_be, q, real_views, tiny_encoder.proj_global)
    print(f"\nfused int8 (dynamic) vs torch fp32, tiny model: embedding cos min {fid8['embedding_cos_min']:.6f}")
    assert 0.99 <= fid8["embedding_cos_min"] < 1.0


def test_static_int8_is_calibrated_qdq_cached_and_faithful(tiny_encoder, cache, torch_be, real_views):
    import onnx

    calib, held_out = real_views[::2], real_views[1::2]
    # no calibration views and nothing cached: a clear error naming the command
    with pytest.raises(BackendUnavailableError, match="build-engine"):
        make_backend("onnxruntime", tiny_encoder, cache_dir=cache, int8="static")
    n = QUANT_STATS.get("static_quantizations", 0)
    be = make_backend("onnxruntime", tiny_encoder, cache_dir=cache, int8="static", calibration_views=calib)
    assert be.precision == "int8-static" and be.onnx_path.name.endswith("-int8qdq.onnx")
    assert QUANT_STATS.get("static_quantizations", 0) == n + 1
    ops = [nd.op_type for nd in onnx.load(str(be.onnx_path)).graph.node]
    assert "QuantizeLinear" in ops and "DequantizeLinear" in ops  # QDQ format
    assert "DynamicQuantizeLinear" not in ops  # activation ranges are fixed by calibration
    fid = embedding_fidelity(torch_be, be, held_out, tiny_encoder.proj_global)  # views not used to calibrate
    print(f"\nstatic int8 (QDQ) vs torch fp32, tiny model, held-out real views: embedding cos min "
          f"{fid['embedding_cos_min']:.6f}")
    assert 0.99 <= fid["embedding_cos_min"] < 1.0
    # cached: the same calibration reuses the file, and without views the cached graph is used
    make_backend("onnxruntime", tiny_encoder, cache_dir=cache, int8="static", calibration_views=calib)
    again = make_backend("onnxruntime", tiny_encoder, cache_dir=cache, int8="static")
    assert again.onnx_path == be.onnx_path
    assert QUANT_STATS.get("static_quantizations", 0) == n + 1


@pytest.mark.parametrize("mode", ["sequential", "parallel"])
@pytest.mark.parametrize("threads", [1, 2])
def test_thread_settings_give_identical_features(mode, threads, tiny_encoder, cache, ort_be, real_views):
    be = make_backend("onnxruntime", tiny_encoder, cache_dir=cache, ort_threads=threads, ort_execution_mode=mode)
    assert be.describe()["execution_mode"] == mode and be.describe()["threads"] == threads
    assert float((be(real_views) - ort_be(real_views)).abs().max()) < 1e-4
    with pytest.raises(ValueError, match="execution_mode"):
        make_backend("onnxruntime", tiny_encoder, cache_dir=cache, ort_execution_mode="random")


@pytest.mark.skipif(not os.environ.get("RUNA_OOD_SLOW_TESTS"),
                    reason="ViT-B-32 export, fusion and quantisation take minutes on the 2-core CI machine; set "
                           "RUNA_OOD_SLOW_TESTS=1 (the bench prints ViT-B-32 fidelity on every run)")
def test_vit_b32_every_cpu_variant_within_0999_of_torch_on_real_crops(photos, vit_b32):
    enc, vm, onnx_cache = vit_b32
    views = []
    for rgb, boxes in photos:
        r, g = vm.make(rgb, boxes[:4])
        views += [r, g]
    views = torch.cat(views)
    calib, held_out = views[::2], views[1::2]
    ref = make_backend("torch", enc)
    variants = {"fused": dict(fused=True), "int8": dict(int8="dynamic"),
                "fused-int8": dict(fused=True, int8="dynamic"),
                "int8-static": dict(int8="static", calibration_views=calib)}
    for name, kw in variants.items():
        be = make_backend("onnxruntime", enc, cache_dir=onnx_cache, **kw)
        fid = embedding_fidelity(ref, be, held_out, enc.proj_global)
        print(f"\nViT-B-32 {name} vs torch fp32 on {fid['n']} held-out real views: embedding cos min "
              f"{fid['embedding_cos_min']:.6f}")
        assert fid["embedding_cos_min"] >= 0.999, name


def test_build_engine_method_calibrates_and_measures_on_the_methods_own_views(tiny_encoder, tmp_path, capsys):
    """`runa-ood build-engine --method tagood --int8 static --auto`: TagOOD's output set, its static
    int8 graph calibrated on TagOOD's own views (one whole frame per photograph) and the auto record
    measured on them, ahead of the node's first start (which then reads the record)."""
    import argparse
    import json

    from runa_ood_node.backends.ort_backend import _views_sha
    from runa_ood_node.backends.samples import method_sample
    from runa_ood_node.core.pipeline import OodScorer
    from runa_ood_node.tools import build_engine as tool

    cache = tmp_path / "cache"
    p = argparse.ArgumentParser()
    tool.add_arguments(p)
    args = p.parse_args(["--model", tiny_encoder.model_name, "--pretrained", "none", "--allow-random-weights",
                         "--cache-dir", str(cache), "--onnx-only", "--precision", "fp32", "--method", "tagood",
                         "--int8", "static", "--auto"])
    assert tool.run(args) == 0
    out = capsys.readouterr().out
    summary = json.loads(out[out.index("\n{") + 1:])
    assert summary["outputs"] == ["tokens", "attn_cls"] and "tagood's views" in summary["auto_choice"]["views"]
    assert set(summary["auto_choice"]["variants"]["int8-static"]) >= {"ms_median", "cos_min", "attn_max_abs"}
    key = json.loads(open(summary["onnx"]["int8-static"].replace(".onnx", ".json")).read())["key"]
    views = method_sample(OodScorer(tiny_encoder, "voc", method="tagood")).views
    assert key["calibration_sha256"] == _views_sha(views)
    be = make_backend("auto", tiny_encoder, cache_dir=cache, outputs=("tokens", "attn_cls"))
    assert be.variant_reason == "recorded" and be.variant == summary["auto_choice"]["chosen"]
    assert p.parse_args(["--method", "lenet"]) and tool.run(p.parse_args(["--method", "lenet", "--onnx-only"])) == 2
