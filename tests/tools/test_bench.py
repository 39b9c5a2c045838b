"""`runa-ood bench` end to end with two tiny models, one round of one frame (no timing assertions)."""
import argparse
import json
import math

import pytest

pytest.importorskip("torch")
pytest.importorskip("onnxruntime")


@pytest.fixture
def second_tiny_model(tmp_path):
    """A second tiny open_clip config, "runa-tiny-vit-p8": patch 8 instead of 16, so 4x the tokens
    (the ViT-B-32 / ViT-B-16 relation in miniature). Registered with open_clip for this session."""
    import open_clip

    from runa_ood_node.core.encoder import MODEL_CONFIG_DIR, register_model_configs

    register_model_configs()
    cfg = json.loads((MODEL_CONFIG_DIR / "runa-tiny-vit.json").read_text())
    cfg["vision_cfg"]["patch_size"] = 8
    d = tmp_path / "configs"
    d.mkdir()
    (d / "runa-tiny-vit-p8.json").write_text(json.dumps(cfg))
    open_clip.add_model_config(d)
    return "runa-tiny-vit-p8"


def test_bench_two_models_write_one_json_with_a_section_each(tmp_path, ood_pack, capsys, second_tiny_model):
    from runa_ood_node.tools import bench

    p = argparse.ArgumentParser()
    bench.add_arguments(p)
    out = tmp_path / "bench.json"
    models = ["runa-tiny-vit", second_tiny_model]
    args = p.parse_args(["--model", ",".join(models), "--boxes", "1,10", "--rounds", "1", "--repeats", "1",
                         "--warmup", "0", "--ort-threads", "1", "--cache-dir", str(tmp_path / "cache"),
                         "--calibration-images", "4", "--annotations", str(ood_pack / "annotations.json"),
                         "--no-progress", "--json", str(out)])
    assert bench.run(args) == 0
    report = json.loads(out.read_text())
    printed = capsys.readouterr().out

    assert report["models"] == models and report["random_weights"] is True
    assert "speed only" in report["note"]
    assert report["photo"]["width"] == 640 and report["photo"]["height"] == 480
    assert report["photo"]["boxes_from"] == "annotations"
    assert report["box_counts"] == [1, 10] and report["ratio_box_count"] == 10
    assert report["machine"]["cpu_count"] >= 1
    assert set(report["per_model"]) == set(models)
    onnx_files = set()
    for m in models:
        sec = report["per_model"][m]
        assert sec["model"] == m and sec["random_weights"] is True
        assert sec["variants"][:2] == ["naive", "naive-b2"]
        assert {"torch", "onnxruntime", "onnxruntime-int8", "onnxruntime-fused", "onnxruntime-fused-int8",
                "onnxruntime-int8-static"} <= set(sec["variants"]), sec["skipped"]
        for v in sec["variants"]:
            for n in ("1", "10"):
                r = sec["results"][v][n]
                assert r["n"] == 1
                assert 0 < r["p50_ms"] <= r["p95_ms"] * (1 + 1e-9)
                assert r["boxes_per_s"] == pytest.approx(int(n) / (r["p50_ms"] / 1e3))
                assert r["speedup_vs_naive_p50"] > 0 and r["speedup_vs_naive_b2_p50"] > 0
        assert sec["results"]["naive"]["1"]["speedup_vs_naive_p50"] == pytest.approx(1.0)
        assert sec["results"]["naive-b2"]["1"]["speedup_vs_naive_b2_p50"] == pytest.approx(1.0)
        assert set(sec["ratio_vs_naive"]) == set(sec["variants"]) - {"naive", "naive-b2"}
        for v, ratio in sec["ratio_vs_naive"].items():
            assert ratio == pytest.approx(sec["results"]["naive"]["10"]["p50_ms"] / sec["results"][v]["10"]["p50_ms"])
            assert sec["ratio_vs_naive_b2"][v] == pytest.approx(
                sec["results"]["naive-b2"]["10"]["p50_ms"] / sec["results"][v]["10"]["p50_ms"])
        fid = sec["fidelity"]["onnxruntime-int8_vs_onnxruntime_fp32"]
        assert 0.99 <= fid["embedding_cos_min"] <= 1.0 and fid["n"] >= 8
        assert sec["fidelity"]["onnxruntime_vs_torch_fp32"]["embedding_cos_min"] >= 0.9999
        assert sec["fidelity"]["onnxruntime-fused_vs_torch_fp32"]["embedding_cos_min"] >= 0.9999
        for v in ("onnxruntime-int8", "onnxruntime-fused-int8", "onnxruntime-int8-static"):
            # the tiny random model (width 64) quantises worse than a ViT-B; >= 0.999 is checked for
            # ViT-B-32 in tests/test_backends.py (RUNA_OOD_SLOW_TESTS=1)
            assert 0.99 <= sec["fidelity"][f"{v}_vs_torch_fp32"]["embedding_cos_min"] < 1.0
        assert set(sec["goals"]["embedding_cos_min_ge_0.999"]) == set(sec["variants"]) - {"naive", "naive-b2", "torch"}
        assert "views from" in sec["calibration"]
        sw = sec["thread_sweep"]
        assert sw["box_count"] == 10 and sw["variant"].startswith("onnxruntime")
        assert {(r["threads"], r["execution_mode"]) for r in sw["rows"]} == {
            (1, "sequential"), (2, "sequential"), (1, "parallel"), (2, "parallel")}
        assert all(r["n"] == 1 and r["p50_ms"] > 0 for r in sw["rows"]) and sw["best"] in sw["rows"]
        assert sec["best_cpu"]["variant"] in sec["variants"]
        assert isinstance(sec["goals"]["best_cpu_ge_4x_naive_at_10_boxes"], bool)
        assert isinstance(sec["goals"]["best_cpu_ge_3x_naive_b2_at_10_boxes"], bool)
        assert sec["best"]["variant"] in sec["variants"] and sec["best"]["box_count"] == 10
        assert sec["goals"]["int8_embedding_cos_min_ge_0.99"] is True
        assert isinstance(sec["goals"]["best_speedup_at_10_boxes_ge_3x"], bool)
        onnx_files.add(sec["backends"]["onnxruntime"]["onnx"])
    assert len(onnx_files) == 2  # each model ran its own export, not the first model's
    # one table per model, then the side-by-side ratios at 10 boxes
    assert printed.count("[RANDOM WEIGHTS: speed only]") == 2
    for m in models:
        assert f"model {m}" in printed
    summary = printed[printed.index("speed-up of the batched pipeline"):]
    assert "at 10 boxes" in summary and "onnxruntime-int8" in summary and "naive-b2 p50 ms" in summary
    assert all(m in summary for m in models)
    assert printed.count("ONNX Runtime thread settings") == 2 and "intra-op threads 2, parallel" in printed
    assert "[ok goal >= 0.999]" in printed
    # the roofline: peaks once per run, a section per model, all of it in the JSON
    peaks = report["roofline"]["peaks"]
    for key in ("fp32", "int8", "fp32_ort_matmul"):
        assert math.isfinite(peaks[key]["gflops"]) and peaks[key]["gflops"] > 0, peaks[key]
        assert peaks[key]["ms_per_call"] > 0 and len(peaks[key]["shape"]) == 3
    assert peaks["int8"]["threads"] == 1 and peaks["torch_threads"] >= 1  # --ort-threads 1, as the variants
    assert "MatMulInteger" in peaks["int8_ops"]
    for m in models:
        rf = report["per_model"][m]["roofline"]
        assert rf["flops_per_view"] == pytest.approx(vit_trunk_flops(_vision_cfg(m)), rel=0.02)
        assert rf["gflop_per_view"] == pytest.approx(rf["flops_per_view"] / 1e9)
        assert rf["multiply_add_flops"] == 2 and rf["views_per_box"] == 2
        assert rf["peaks_gflops"] == {"fp32": peaks["fp32"]["gflops"], "int8": peaks["int8"]["gflops"]}
        assert set(rf["variants"]) == set(report["per_model"][m]["variants"])
        for v, cells in rf["variants"].items():
            for n in ("1", "10"):
                c = cells[n]
                p50 = report["per_model"][m]["results"][v][n]["p50_ms"]
                assert c["peak"] == ("int8" if "int8" in v else "fp32")
                assert c["achieved_gflops"] == pytest.approx(2 * int(n) * rf["gflop_per_view"] / (p50 / 1e3))
                assert c["fraction_of_peak"] == pytest.approx(c["achieved_gflops"] / rf["peaks_gflops"][c["peak"]])
        for key in ("ceiling", "fp32_ceiling"):
            assert set(rf[key]) == {"1", "10"}
            assert all(c["ms"] > 0 and c["speedup_vs_naive_p50"] > 0 and c["speedup_vs_naive_b2_p50"] > 0
                       for c in rf[key].values())
        assert set(rf["goal_reachable"]) == {"ge_4x_naive_at_10_boxes", "ge_3x_naive_b2_at_10_boxes"}
        assert all(isinstance(b, bool) for b in rf["goal_reachable"].values())
        assert rf["best_cpu_fraction_of_ceiling"] > 0
    roof = printed[printed.index("roofline: FLOPs counted by"):]
    assert "fp32 GEMM peak" in roof and "int8 GEMM peak" in roof and "a multiply-add = 2 FLOPs" in roof
    assert roof.count("GFLOP per view") == 2 and roof.count("ceiling, every FLOP at the int8 GEMM peak") == 2
    assert roof.count("goal at 10 boxes >= 4x naive: ceiling") == 2


def _vision_cfg(model):
    """vision_cfg of a registered open_clip config (the two tiny models' JSON)."""
    import open_clip

    return open_clip.get_model_config(model)["vision_cfg"]


def vit_trunk_flops(vc, batch=1):
    """Hand count of an open_clip ViT trunk's FLOPs for ``batch`` views (multiply-add = 2): patch
    embedding conv, then per layer QKV / out projections, QK^T and AV, and the MLP; T = patches + [CLS]."""
    S, p, w, layers = vc["image_size"], vc["patch_size"], vc["width"], vc["layers"]
    hidden = int(w * vc.get("mlp_ratio", 4.0))
    patches = (S // p) ** 2
    T = patches + 1
    conv = patches * w * 3 * p * p
    per_layer = T * w * (3 * w) + T * w * w + 2 * T * T * w + 2 * T * w * hidden
    return 2 * batch * (conv + layers * per_layer)


def test_vit_trunk_hand_count_is_the_known_vit_b_32_figure():
    # ViT-B-32 at 224: 4.41 GMAC = 8.82 GFLOP (the usual "4.4 GFLOPs" counts multiply-adds)
    vc = {"image_size": 224, "patch_size": 32, "width": 768, "layers": 12}
    assert vit_trunk_flops(vc) == 2 * 4_408_418_304


def test_count_view_flops_matches_the_hand_count_and_scales_with_batch(tiny_encoder):
    from runa_ood_node.tools.bench import count_view_flops

    one = count_view_flops(tiny_encoder)
    hand = vit_trunk_flops(_vision_cfg("runa-tiny-vit"))
    # exact with torch 2.14; the attention's QK^T / AV (bmm) and its projections must be in it
    assert one["flops"] == pytest.approx(hand, rel=0.02), one["by_op"]
    assert any("bmm" in k for k in one["by_op"]) and any("conv" in k for k in one["by_op"])
    three = count_view_flops(tiny_encoder, batch=3)
    assert three["batch"] == 3 and three["flops"] == pytest.approx(3 * one["flops"], rel=1e-6)
    assert one["projection_flops"] == 2 * tiny_encoder.width * tiny_encoder.embed_dim
    assert not tiny_encoder.visual_trunk.training  # counting leaves the model as it was


def test_measure_peaks_small_shapes_and_the_int8_graph_is_the_int8_variants(tmp_path):
    import onnx

    from runa_ood_node.backends.ort_backend import quantize_int8
    from runa_ood_node.tools import bench

    peaks = bench.measure_peaks(ort_threads=1, fp32_size=96, int8_shape=(64, 64, 128), seconds=0.01, repeats=2)
    for key in ("fp32", "int8", "fp32_ort_matmul"):
        assert math.isfinite(peaks[key]["gflops"]) and peaks[key]["gflops"] > 0, peaks[key]
        assert peaks[key]["repeats"] == 2 and peaks[key]["calls_per_repeat"] >= 1
    assert peaks["fp32"]["shape"] == [96, 96, 96] and peaks["int8"]["shape"] == [64, 64, 128]
    assert peaks["int8"]["threads"] == 1 and peaks["fp32_ort_matmul"]["threads"] == 1
    assert {"DynamicQuantizeLinear", "MatMulInteger"} <= set(peaks["int8_ops"])
    # the peak's graph is quantised exactly as the repo's int8 variants are (ort_backend.quantize_int8)
    src = tmp_path / "mm.onnx"
    onnx.save(bench._matmul_onnx(64, 128), str(src))
    ref = quantize_int8(src, tmp_path / "mm-ref.onnx")
    bench._quantize_like_the_int8_variants(src, tmp_path / "mm-ours.onnx")
    ours, theirs = onnx.load(str(tmp_path / "mm-ours.onnx")), onnx.load(str(ref))
    assert [n.op_type for n in ours.graph.node] == [n.op_type for n in theirs.graph.node] == peaks["int8_ops"]
    assert ({i.name: (i.data_type, list(i.dims)) for i in ours.graph.initializer}
            == {i.name: (i.data_type, list(i.dims)) for i in theirs.graph.initializer})


def test_roofline_section_arithmetic():
    from runa_ood_node.tools.bench import roofline_section

    p50 = {"naive": 400.0, "naive-b2": 300.0, "torch": 200.0, "onnxruntime-int8": 100.0, "torch-cuda": 10.0}
    sec = {"variants": list(p50), "results": {v: {"10": {"p50_ms": ms}} for v, ms in p50.items()},
           "best_cpu": {"box_count": 10, "variant": "onnxruntime-int8"}}
    work = {"flops": 2 * 4e9, "batch": 2, "by_op": {}, "projection_flops": 2000}
    peaks = {"fp32": {"gflops": 100.0}, "int8": {"gflops": 400.0}}
    r = roofline_section(sec, work, peaks, [10])
    assert r["gflop_per_view"] == pytest.approx(4.0) and r["projection_flops_per_view"] == 1000
    c = r["variants"]["torch"]["10"]  # 20 views x 4 GFLOP = 80 GFLOP in 0.2 s
    assert c["gflop_per_frame"] == pytest.approx(80.0) and c["achieved_gflops"] == pytest.approx(400.0)
    assert c["peak"] == "fp32" and c["fraction_of_peak"] == pytest.approx(4.0)
    c = r["variants"]["onnxruntime-int8"]["10"]
    assert c["peak"] == "int8" and c["fraction_of_peak"] == pytest.approx(800.0 / 400.0)
    assert r["variants"]["naive"]["10"]["peak"] == "fp32"
    gpu = r["variants"]["torch-cuda"]["10"]
    assert gpu["peak"] is None and gpu["fraction_of_peak"] is None
    ceil = r["ceiling"]["10"]  # 80 GFLOP at 400 GFLOP/s
    assert ceil["ms"] == pytest.approx(200.0)
    assert ceil["speedup_vs_naive_p50"] == pytest.approx(2.0) and ceil["speedup_vs_naive_b2_p50"] == pytest.approx(1.5)
    assert r["fp32_ceiling"]["10"]["ms"] == pytest.approx(800.0)
    assert r["goal_reachable"] == {"ge_4x_naive_at_10_boxes": False, "ge_3x_naive_b2_at_10_boxes": False}
    assert r["best_cpu_fraction_of_ceiling"] == pytest.approx(2.0)
    # no int8 peak: no ceiling, no verdict
    r = roofline_section(sec, work, {"fp32": {"gflops": 100.0}, "int8": {"error": "x"}}, [10])
    assert r["ceiling"] is None and r["goal_reachable"] is None and r["best_cpu_fraction_of_ceiling"] is None
    assert r["variants"]["onnxruntime-int8"]["10"]["fraction_of_peak"] is None


def test_bench_no_roofline(tmp_path, ood_pack, capsys):
    from runa_ood_node.tools import bench

    p = argparse.ArgumentParser()
    bench.add_arguments(p)
    out = tmp_path / "bench.json"
    args = p.parse_args(["--model", "runa-tiny-vit", "--boxes", "1", "--rounds", "1", "--repeats", "1",
                         "--warmup", "0", "--variants", "torch", "--no-thread-sweep", "--no-roofline",
                         "--annotations", str(ood_pack / "annotations.json"), "--no-progress", "--json", str(out)])
    assert bench.run(args) == 0
    report = json.loads(out.read_text())
    assert report["roofline"] is None and report["per_model"]["runa-tiny-vit"]["roofline"] is None
    assert "roofline:" not in capsys.readouterr().out


def test_bench_methods_every_method_on_every_backend_in_one_table(tmp_path, ood_pack, capsys):
    """--method all: every (method, CPU backend) row is timed at every box count in one interleaved run,
    with its fidelity to torch, its roofline share, each method's best backend, auto over that best and
    the goals; trunk passes per frame are the method's views (RUNA 2 per box, TagOOD 1 per frame)."""
    from runa_ood_node.tools import bench

    p = argparse.ArgumentParser()
    bench.add_arguments(p)
    out = tmp_path / "bench.json"
    args = p.parse_args(["--model", "runa-tiny-vit", "--boxes", "1,10", "--rounds", "1", "--repeats", "1",
                         "--warmup", "0", "--variants", "torch", "--no-thread-sweep", "--ort-threads", "1",
                         "--method", "all", "--annotations", str(ood_pack / "annotations.json"), "--no-progress",
                         "--calibration-images", "3", "--cache-dir", str(tmp_path / "cache"), "--json", str(out)])
    assert bench.run(args) == 0
    report = json.loads(out.read_text())
    sec = report["per_model"]["runa-tiny-vit"]
    ms = sec["methods"]
    methods = ["runa", "uni-ood", "tagood"]
    assert ms["methods"] == methods and ms["backends"] == bench.METHOD_BACKENDS and not ms["skipped"]
    assert ms["untrained_heads"] == ["uni-ood", "tagood"]
    for m in methods:
        assert list(ms["results"][m]) == bench.METHOD_BACKENDS     # every row, in order
        assert set(ms["fidelity"][m]) == set(bench.METHOD_BACKENDS)
        assert "views of 3 photographs" in ms["sample"][m] and m in ms["sample"][m]
        for b in bench.METHOD_BACKENDS:
            for n in ("1", "10"):
                r = ms["results"][m][b][n]
                assert r["n"] == 1 and r["p50_ms"] > 0
                assert r["vs_runa_best"] == pytest.approx(r["p50_ms"] / ms["best"]["runa"][n]["p50_ms"])
                assert r["speedup_vs_naive_p50"] == pytest.approx(sec["results"]["naive"][n]["p50_ms"] / r["p50_ms"])
                c = ms["roofline"]["rows"][f"{m}|{b}"][n]
                assert c["achieved_gflops"] == pytest.approx(r["gflop_per_frame"] / (r["p50_ms"] / 1e3))
                assert c["fraction_of_peak"] == pytest.approx(c["achieved_gflops"] / ms["roofline"]["peaks_gflops"][c["peak"]])
            f = ms["fidelity"][m][b]
            assert f["cos_min"] >= 0.99 and (f["attn_max_abs"] is None) == (m == "runa")
        assert ms["roofline"]["rows"][f"{m}|onnxruntime-int8-static"]["1"]["peak"] == "int8"
        assert ms["roofline"]["rows"][f"{m}|onnxruntime-fused"]["1"]["peak"] == "fp32"
        a = ms["auto"][m]
        assert a["reason"] == "measured" and a["variant"] in ("plain", "int8", "int8-static", "fused", "fused-int8")
        assert a["vs_best"]["10"] == pytest.approx(ms["results"][m]["auto"]["10"]["p50_ms"] / ms["best"][m]["10"]["p50_ms"])
        hand = {b: ms["results"][m][b]["10"]["p50_ms"] for b in bench.METHOD_BACKENDS if b != "auto"}
        assert ms["best"][m]["10"]["backend"] == min(hand, key=hand.get)
    assert [ms["results"]["runa"]["torch"][n]["trunk_passes"] for n in ("1", "10")] == [2, 20]
    assert [ms["results"]["tagood"]["torch"][n]["trunk_passes"] for n in ("1", "10")] == [1, 1]
    assert [ms["results"]["uni-ood"]["torch"][n]["pairs"] for n in ("1", "10")] == [1, 10]
    assert ms["results"]["tagood"]["torch"]["10"]["gflop_per_frame"] == ms["results"]["tagood"]["torch"]["1"]["gflop_per_frame"]
    # static int8 graphs: one per output set, calibrated on that method's own views
    from runa_ood_node.backends.ort_backend import _views_sha  # noqa: F401  (key of the calibration)

    keys = {json.loads(pth.read_text())["key"]["calibration_sha256"]
            for pth in (tmp_path / "cache" / "onnx").glob("*-int8qdq.json")}
    assert len(keys) == 3
    assert set(ms["goals"]) == {"tagood_best_le_1/10_of_runa_best_at_10_boxes",
                                "uni-ood_best_le_1.5x_runa_best_at_10_boxes", "runa_auto_within_10%_of_best",
                                "uni-ood_auto_within_10%_of_best", "tagood_auto_within_10%_of_best"}
    printed = capsys.readouterr().out
    assert "every method on every CPU backend, one interleaved run" in printed
    table = printed[printed.index("every method on every CPU backend"):]
    assert sum(1 for line in table.splitlines() if line.split()[:1] in (["runa"], ["uni-ood"], ["tagood"])) == 21
    assert "untrained heads (speed only): uni-ood, tagood" in printed and "auto tagood:" in printed
    assert bench.run(p.parse_args(["--method", "lenet"])) == 2


@pytest.mark.parametrize("outputs", [("cls",), ("tokens",), ("tokens", "attn_cls"), ("tokens", "attn_cls", "xattn"),
                                     ("attn_cls",)])
def test_trunk_flops_from_the_model_config_equal_the_counted_ones(tiny_encoder, outputs):
    """The FLOPs per call the methods' roofline uses (from the model config) equal FlopCounterMode's count
    of the backbone forward that serves the output set (attention branch and pairs included), and the
    cls set is the hand count of a ViT (and ViT-B-32's known 8.82 GFLOP)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from runa_ood_node.core.backbone import backbone_forward
    from runa_ood_node.tools.bench import model_config, trunk_flops_per_call

    cfg = model_config(tiny_encoder)
    assert cfg["tokens"] == tiny_encoder.num_tokens and cfg["width"] == tiny_encoder.width
    B, P = 3, 2
    x = torch.zeros((B, 3, tiny_encoder.input_size, tiny_encoder.input_size))
    pairs = torch.tensor([[0, 1], [2, 0]]) if "xattn" in outputs else None
    from torch.nn.attention import SDPBackend, sdpa_kernel

    counter = FlopCounterMode(display=False)
    # as bench.count_view_flops: grad on and SDPA's math kernel, or the fused paths hide QK^T and AV
    with torch.enable_grad(), sdpa_kernel([SDPBackend.MATH]), counter:
        backbone_forward(tiny_encoder.model.visual, x, outputs, pairs)
    assert trunk_flops_per_call(cfg, outputs, B, P if pairs is not None else 0) == pytest.approx(
        counter.get_total_flops(), rel=1e-6)
    if outputs == ("cls",):
        assert trunk_flops_per_call(cfg, outputs, 1) == vit_trunk_flops(_vision_cfg("runa-tiny-vit"))
        b32 = {"image_size": 224, "patch_size": 32, "width": 768, "layers": 12, "mlp_width": 3072, "grid": 7,
               "tokens": 50}
        assert trunk_flops_per_call(b32, ("cls",), 1) == 2 * 4_408_418_304


def test_parse_models():
    from runa_ood_node.tools.bench import parse_models

    assert parse_models("ViT-B-32, ViT-B-16", "none") == [("ViT-B-32", None), ("ViT-B-16", None)]
    assert parse_models("ViT-B-32,ViT-B-32", "none") == [("ViT-B-32", None)]
    assert parse_models("A,B", "/w/a.pt,/w/b.pt") == [("A", "/w/a.pt"), ("B", "/w/b.pt")]
    with pytest.raises(ValueError, match="one per model"):
        parse_models("A,B,C", "x,y")
    with pytest.raises(ValueError, match="at least one"):
        parse_models(" , ", "none")


def test_bench_rejects_bad_arguments(tmp_path):
    from runa_ood_node.tools import bench

    p = argparse.ArgumentParser()
    bench.add_arguments(p)
    assert bench.run(p.parse_args(["--boxes", "0"])) == 2
    assert bench.run(p.parse_args(["--variants", "nope"])) == 2
    assert bench.run(p.parse_args(["--rounds", "0"])) == 2
    assert bench.run(p.parse_args(["--model", ","])) == 2
    assert bench.run(p.parse_args(["--model", "runa-tiny-vit,no-such-model", "--boxes", "1",
                                   "--cache-dir", str(tmp_path)])) == 2


def test_cycle_boxes_and_percentiles():
    import numpy as np

    from runa_ood_node.tools.bench import cycle_boxes, percentiles

    base = np.array([[0, 0, 10, 10], [5, 5, 20, 20]], np.float32)
    c = cycle_boxes(base, 5)
    assert c.shape == (5, 4)
    assert np.array_equal(c[0], base[0]) and np.array_equal(c[1], base[1])
    assert not np.array_equal(c[2], base[0])  # cycled copies are nudged, not identical
    s = percentiles([1.0, 2.0, 3.0, 4.0, 100.0])
    assert s["p50_ms"] == 3.0 and s["p95_ms"] > 4.0 and s["n"] == 5


# ---------------------------------------------------------------------- the batch-2 baseline's correctness
def _b2_and_batched(encoder, image, boxes, blur_radius):
    from runa_ood_node.core.config import method_settings
    from runa_ood_node.core.pipeline import OodScorer
    from runa_ood_node.tools.bench import naive_b2_frame, open_clip_preprocess

    scorer = OodScorer(encoder, "voc", settings=method_settings("runa", {"blur_radius": blur_radius}))
    b2 = naive_b2_frame(encoder, open_clip_preprocess(encoder), scorer.text_emb, image, boxes,
                        blur_radius=blur_radius)
    return b2, scorer.score(image, boxes).uncertainty


def test_batch2_baseline_equals_the_pipeline_where_preprocessing_coincides(tiny_encoder, real_photo):
    """An S x S frame, the whole-frame box, no blur: PIL and cv2 resampling are both the identity,
    so the per-box batch-2 loop (open_clip transform, encode_image, fuse after projection) must give
    the batched pipeline's uncertainty (fails on any fusion, projection or scoring mismatch)."""
    import cv2
    import numpy as np

    S = tiny_encoder.input_size
    image = cv2.resize(real_photo[0], (S, S), interpolation=cv2.INTER_AREA)
    b2, batched = _b2_and_batched(tiny_encoder, image, np.array([[0, 0, S, S]], np.float32), 0.0)
    assert np.isfinite(b2).all()
    np.testing.assert_allclose(b2, batched, atol=1e-5)


def test_batch2_baseline_close_to_the_pipeline_on_a_real_photo(tiny_encoder, real_photo):
    """Same geometry, different resampling (PIL bicubic + PIL's box-approximated Gaussian vs cv2 area
    resize + true Gaussian): scores differ by a fraction of their spread, and the box ranking holds.
    Measured with the tiny model: max |diff| 0.0024 against a spread of 0.045 (8 boxes)."""
    import numpy as np

    from runa_ood_node.tools.bench import cycle_boxes

    image, boxes_xywh = real_photo
    b = np.asarray(boxes_xywh, np.float32)
    b[:, 2:] += b[:, :2]
    boxes = cycle_boxes(b, 8)
    b2, batched = _b2_and_batched(tiny_encoder, image, boxes, 1.0)
    assert np.isfinite(b2).all() and np.isfinite(batched).all()
    spread = float(batched.max() - batched.min())
    diff = float(np.abs(b2 - batched).max())
    print(f"\nbatch-2 baseline vs batched pipeline: max |diff| {diff:.5f}, score spread {spread:.5f}")
    assert diff <= max(0.15 * spread, 1e-4)
    rank = lambda x: np.argsort(np.argsort(x))  # noqa: E731
    rho = np.corrcoef(rank(b2), rank(batched))[0, 1]
    assert rho >= 0.9
    assert diff > 0  # really a different preprocessing (PIL), not the pipeline's views


def test_bench_node_stats_report_the_worst_frame():
    from runa_ood_node.tools.bench_node import _stats

    s = _stats([1.0, 2.0, float("nan"), 3.0, 40.0])
    assert s["n"] == 4 and s["max"] == 40.0 and s["p50"] == 2.5 and s["p95"] > 3.0
    assert _stats([])["n"] == 0


def test_bench_node_cameras_figures_from_send_and_answer_times(capsys):
    """bench-node --cameras: frames/s, per-camera p50/p95 and unanswered frames from the send and
    answer times; the table and the goal lines from the rows; bad --cameras refused."""
    import argparse

    from runa_ood_node.tools.bench_node import _parse_counts, _print_cameras_table, summarize_cameras_run

    sent = {"a": {1: 0.0, 2: 0.1, 3: 0.2}, "b": {1: 0.0, 2: 0.1}}
    answered = {"a": {1: 0.010, 2: 0.130, 3: 0.250}, "b": {1: 0.100}}  # b's stamp 2 never answered
    out = summarize_cameras_run(sent, answered, duration_s=2.0)
    assert out["frames_sent"] == 5 and out["frames_answered"] == 4 and out["fps"] == pytest.approx(2.0)
    assert out["per_camera"]["a"]["p50_ms"] == pytest.approx(30.0)
    assert out["per_camera"]["b"] == {"sent": 2, "answered": 1, "p50_ms": pytest.approx(100.0),
                                      "p95_ms": pytest.approx(100.0)}
    assert out["p95_ms_worst_camera"] == pytest.approx(100.0)
    assert out["p50_ms_mean_over_cameras"] == pytest.approx(65.0)
    assert _parse_counts("1, 3,6") == [1, 3, 6]
    for bad in ("0", "x", "", "40"):
        with pytest.raises(SystemExit):
            _parse_counts(bad)
    rows = [dict(out, cameras=2, setup="one node", processes=1, rss_mb_total=900.0, offered_fps=4.0,
                 frames_per_backend_call=1.5),
            dict(out, cameras=2, setup="2 nodes", processes=2, rss_mb_total=1600.0, offered_fps=4.0,
                 frames_per_backend_call=1.0, fps=1.0)]
    args = argparse.Namespace(model="m", pretrained="", backend="torch", device="cpu", boxes=5, rate=2.0, duration=2.0)
    _print_cameras_table(args, rows)
    text = capsys.readouterr().out
    assert "| 2 | one node | 1 | 900 | 2.0 (4) |" in text
    assert "N=2: one node's RSS = 1.12x one single-camera node's (meets <= 1.3x); its throughput = 2.00x" in text


def test_bench_node_cameras_node_counts_are_the_change_over_the_window():
    """bench-node --cameras: what the node(s) received, scored and dropped over the measured window
    is the change of their /diagnostics counters between two snapshots, summed over the statuses
    (one per camera or per node); counters that did not move are left out, except the ones that
    reconcile the run (received, paired, scored); values that are not counts are skipped."""
    from runa_ood_node.tools.bench_node import _diag_delta

    start = {"/ns/a/runa_ood: OOD monitor": {"frames_scored": "10", "frames_paired": "12", "messages_received.image": "12",
                                             "messages_lost.image": "0", "drops.processing_overload": "2",
                                             "drops.bad_detections": "1", "model": "m", "latency_p50_ms": "3.50"}}
    end = {"/ns/a/runa_ood: OOD monitor": {"frames_scored": "40", "frames_paired": "50", "messages_received.image": "51",
                                           "messages_lost.image": "0", "drops.processing_overload": "10",
                                           "drops.bad_detections": "1", "model": "m", "latency_p50_ms": "4.00"},
           "/ns/b/runa_ood: OOD monitor": {"frames_scored": "5", "frames_paired": "5", "messages_received.image": "6",
                                           "drops.image_without_detections": "1"}}  # no snapshot at the start
    d = _diag_delta(start, end)
    assert d == {"drops.image_without_detections": 1, "drops.processing_overload": 8, "frames_paired": 43,
                 "frames_scored": 35, "messages_lost.image": 0, "messages_received.image": 45}
