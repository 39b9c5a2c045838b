"""`runa-ood bench` end to end with two tiny models, one round of one frame (no timing assertions)."""
import argparse
import json

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
        assert sec["variants"][0] == "naive"
        assert {"torch", "onnxruntime", "onnxruntime-int8"} <= set(sec["variants"])
        for v in sec["variants"]:
            for n in ("1", "10"):
                r = sec["results"][v][n]
                assert r["n"] == 1
                assert 0 < r["p50_ms"] <= r["p95_ms"] * (1 + 1e-9)
                assert r["boxes_per_s"] == pytest.approx(int(n) / (r["p50_ms"] / 1e3))
                assert r["speedup_vs_naive_p50"] > 0
        assert sec["results"]["naive"]["1"]["speedup_vs_naive_p50"] == pytest.approx(1.0)
        assert set(sec["ratio_vs_naive"]) == set(sec["variants"]) - {"naive"}
        for v, ratio in sec["ratio_vs_naive"].items():
            assert ratio == pytest.approx(sec["results"]["naive"]["10"]["p50_ms"] / sec["results"][v]["10"]["p50_ms"])
        fid = sec["fidelity"]["onnxruntime-int8_vs_onnxruntime_fp32"]
        assert 0.99 <= fid["embedding_cos_min"] <= 1.0 and fid["n"] >= 8
        assert sec["fidelity"]["onnxruntime_vs_torch_fp32"]["embedding_cos_min"] >= 0.9999
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
    assert "at 10 boxes" in summary and "onnxruntime-int8" in summary
    assert all(m in summary for m in models)


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
