"""`runa-ood bench` end to end with the tiny model, one round of one frame (no timing assertions)."""
import argparse
import json

import pytest

pytest.importorskip("torch")
pytest.importorskip("onnxruntime")


def test_bench_writes_complete_json(tmp_path, ood_pack, capsys):
    from runa_ood_node.tools import bench

    p = argparse.ArgumentParser()
    bench.add_arguments(p)
    out = tmp_path / "bench.json"
    args = p.parse_args(["--model", "runa-tiny-vit", "--boxes", "1,3", "--rounds", "1", "--repeats", "1",
                         "--warmup", "0", "--ort-threads", "1", "--cache-dir", str(tmp_path / "cache"),
                         "--no-progress", "--json", str(out)])
    assert bench.run(args) == 0
    report = json.loads(out.read_text())
    printed = capsys.readouterr().out
    assert "RANDOM WEIGHTS" in printed and "naive" in printed

    assert report["model"] == "runa-tiny-vit" and report["random_weights"] is True
    assert "speed only" in report["note"]
    assert report["photo"]["width"] == 640 and report["photo"]["height"] == 480
    assert report["photo"]["boxes_from"] == "annotations"
    assert report["box_counts"] == [1, 3]
    assert report["variants"][0] == "naive"
    assert {"torch", "onnxruntime", "onnxruntime-int8"} <= set(report["variants"])
    for v in report["variants"]:
        for n in ("1", "3"):
            r = report["results"][v][n]
            assert r["n"] == 1
            assert 0 < r["p50_ms"] <= r["p95_ms"] * (1 + 1e-9)
            assert r["boxes_per_s"] == pytest.approx(int(n) / (r["p50_ms"] / 1e3))
            assert r["speedup_vs_naive_p50"] > 0
        assert report["results"]["naive"]["1"]["speedup_vs_naive_p50"] == pytest.approx(1.0)
    fid = report["fidelity"]["onnxruntime-int8_vs_onnxruntime_fp32"]
    assert 0.99 <= fid["embedding_cos_min"] <= 1.0 and fid["n"] >= 8
    assert report["fidelity"]["onnxruntime_vs_torch_fp32"]["embedding_cos_min"] >= 0.9999
    assert report["best"]["variant"] in report["variants"]
    assert report["goals"]["int8_embedding_cos_min_ge_0.99"] is True
    assert report["machine"]["cpu_count"] >= 1


def test_bench_rejects_bad_arguments(tmp_path):
    from runa_ood_node.tools import bench

    p = argparse.ArgumentParser()
    bench.add_arguments(p)
    assert bench.run(p.parse_args(["--boxes", "0"])) == 2
    assert bench.run(p.parse_args(["--variants", "nope"])) == 2
    assert bench.run(p.parse_args(["--rounds", "0"])) == 2


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
