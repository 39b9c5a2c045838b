"""scripts/gpu_check.sh: the GPU check's dry run on the CPU (so the one-call GPU check cannot rot), its
reports' structure and agreement figures, the check's ability to fail, and that it runs without ROS."""
import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
import torch

from runa_ood_node.core.registry import METHODS
from runa_ood_node.core.registry import VIEWS as VIEW_KINDS
from runa_ood_node.tools import gpu_check

REPO = pathlib.Path(__file__).resolve().parents[2]


def test_ros_blocker_refuses_ros_and_the_scorer_path_imports_without_it():
    """In a fresh interpreter with ROS refused: rclpy and message packages do not import, the scorer's whole
    path (factory, pipeline, every method, GPU views, the tools the check uses) does, and none of it tried ROS."""
    code = """
import json, sys
from runa_ood_node.tools.gpu_check import RosBlocker
b = RosBlocker.install()
refused = []
for name in ("rclpy", "vision_msgs.msg", "runa_ood_msgs", "rosidl_runtime_py"):
    try:
        __import__(name)
    except ModuleNotFoundError:
        refused.append(name)
tried = list(b.attempts)
import runa_ood_node.factory, runa_ood_node.core.pipeline, runa_ood_node.backends.gpu_preprocess
import runa_ood_node.core.methods.uni_ood, runa_ood_node.core.methods.tagood, runa_ood_node.core.methods.runa
import runa_ood_node.tools.common, runa_ood_node.tools.bench, runa_ood_node.backends.base
print(json.dumps({"refused": refused, "tried_before": tried, "report": b.report()}))
"""
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["refused"] == ["rclpy", "vision_msgs.msg", "runa_ood_msgs", "rosidl_runtime_py"]
    rep = out["report"]
    assert rep["modules_loaded"] == []
    later = [a for a in rep["import_attempts"] if a not in out["tried_before"]]
    assert all(a.split(".")[0] in gpu_check.ROS_TOLERATED for a in later), later
    assert rep["ok"] is False  # the deliberate rclpy attempt above is what the check fails on


def test_compare_features_sees_a_disagreement(tiny_scorer):
    """The agreement figures can fail: features perturbed like a broken backend are out of every tolerance."""
    img = np.random.default_rng(0).integers(0, 255, (96, 128, 3), dtype=np.uint8)
    boxes = [[10, 10, 60, 60], [40, 20, 120, 90], [0, 0, 127, 95]]
    ref = tiny_scorer.encode(img, boxes)
    ref_res = tiny_scorer.score_features(ref)
    same = gpu_check.compare_features((ref, ref_res), (ref, ref_res), "runa", tiny_scorer.method, tiny_scorer.method)
    assert same["embedding_cos_min"] > 0.999999 and same["uncertainty_max_abs_diff"] == 0
    assert gpu_check.within(same, gpu_check.TOLERANCES["fp32"]) == []
    g = torch.Generator().manual_seed(0)
    from runa_ood_node.core.pipeline import BoxFeatures

    data = {k: t + 0.5 * t.std() * torch.randn(t.shape, generator=g) for k, t in ref.data.items()}
    bad = BoxFeatures(boxes_xyxy=ref.boxes_xyxy, status=ref.status.copy(), data=data, timings=ref.timings,
                      views=ref.views, image_wh=ref.image_wh)
    bad_res = tiny_scorer.score_features(bad)
    rec = gpu_check.compare_features((ref, ref_res), (bad, bad_res), "runa", tiny_scorer.method, tiny_scorer.method)
    outside = gpu_check.within(rec, gpu_check.TOLERANCES["bf16"])
    assert any(o.startswith("embedding_cos_min") for o in outside), rec
    assert any(o.startswith("uncertainty_max_abs_diff") for o in gpu_check.within(rec, gpu_check.TOLERANCES["fp32"]))
    assert "fused_embedding" in rec["features"] and rec["features"]["regional.cls"]["kind"] == "embedding"


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    """``scripts/gpu_check.sh --dry-run OUTDIR`` as CI and a developer run it (this interpreter; a budget large
    enough that every step runs on a loaded machine: the test checks what runs, not how fast)."""
    out = tmp_path_factory.mktemp("gpu_check")
    env = dict(os.environ, PYTHON=sys.executable, RUNA_GPU_CHECK_TIMEOUT="900",
               RUNA_OOD_CACHE_DIR=str(tmp_path_factory.mktemp("gpu_check_cache")))
    proc = subprocess.run(["bash", str(REPO / "scripts" / "gpu_check.sh"), "--dry-run", str(out), "--budget-s", "600"],
                          capture_output=True, text=True, timeout=960, env=env, cwd=REPO)
    return proc, out


def test_dry_run_writes_both_reports_and_every_figure_is_within_tolerance(dry_run):
    proc, out = dry_run
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    rep = json.loads((out / gpu_check.JSON_NAME).read_text())
    md = (out / gpu_check.MD_NAME).read_text()
    assert (out / "gpu_check.log").stat().st_size > 0
    assert rep["schema"] == gpu_check.SCHEMA and rep["dry_run"] is True and rep["device"] == "cpu"
    assert rep["summary"] == {"ok": True, "failures": [], "notes": rep["summary"]["notes"]}
    ros = rep["environment"]["ros"]
    assert ros["ok"] and ros["modules_loaded"] == [] and "rclpy" not in ros["import_attempts"]

    # 1. agreement: every method in fp32 / fp16 / bf16 (+ the node's defaults for RUNA), within tolerance
    ag = rep["agreement"]
    rows = {(r["method"], r["variant"]): r for r in ag["results"]}
    want = {(m, v) for m in METHODS for v in ("fp32", "fp16", "bf16")} | {("runa", "node defaults")}
    assert set(rows) == want
    for (method, variant), r in rows.items():
        assert r["status"] == "ok", r
        tol = gpu_check.TOLERANCES[r["precision"]]
        assert r["boxes_compared"] == r["boxes"] == ag["boxes"] > 0
        assert r["embedding_cos_min"] >= tol["cos"]
        assert r["uncertainty_max_abs_diff"] <= tol["unc"] and r["similarity_max_abs_diff"] <= tol["unc"]
        assert r["reference_uncertainty_range"] > 0, f"{method}: the reference scores every box alike"
        if method == "uni-ood":
            assert r["attention_max_abs_diff"] <= tol["attn"]
            assert {"regional.attn_cls", "regional.xattn", "regional.tokens"} <= set(r["features"])
        if method == "tagood":
            assert r["mask_equal_share"] >= tol["mask"]
        if method == "runa":
            assert r["features"]["fused_embedding"]["cos_min"] >= tol["cos"]
    assert rows[("runa", "fp32")]["uncertainty_max_abs_diff"] < 1e-5  # the same model on the same device
    assert rows[("runa", "bf16")]["encoder_precision"] == "bf16"

    # 2. preprocessing: every view kind, GpuViewMaker (on the CPU here) against the CPU views
    pre = rep["preprocessing"]
    assert pre["status"] == "ok" and set(pre["views"]) == set(VIEW_KINDS)
    for k, r in pre["views"].items():
        assert r["mean_abs_diff_grey"] <= gpu_check.PREPROCESS_TOLERANCES["mean_grey"][k]
        assert r["embedding_cos_min"] >= gpu_check.PREPROCESS_TOLERANCES["cos"]
    assert set(pre["make_ms"]) == {"1", "10", "50"}

    # 3. timings: every method at 1 / 10 / 50 boxes, perf_counter on the CPU
    tim = rep["timings"]
    assert tim["timer"] == "perf_counter" and tim["skipped"] == []
    got = {(r["variant"], r["method"], r["boxes"]) for r in tim["rows"] if r["status"] == "ok"}
    assert {("fp32", m, n) for m in METHODS for n in (1, 10, 50)} <= got
    assert {("node defaults", "runa", n) for n in (1, 10, 50)} <= got
    for r in tim["rows"]:
        assert r["p50_ms"] > 0 and r["n"] == tim["repeats"] and r["trunk_passes"] >= 1

    # 4. TensorRT: said plainly where it cannot run
    trt = rep["tensorrt"]
    try:
        import tensorrt  # noqa: F401
        has_trt = True
    except Exception:
        has_trt = False
    if not has_trt:
        assert trt["available"] is False and "tensorrt" in trt["reason"].lower()
        assert "**TensorRT did not run here.**" in md

    for heading in ("# GPU check (DRY RUN on the CPU)", "## 1. Agreement with CPU fp32", "## 2. Preprocessing",
                    "## 3. Timings", "## 4. TensorRT"):
        assert heading in md
    assert md.count("| ok |") == len(rows)


def test_script_refuses_a_missing_outdir_and_missing_wheels(tmp_path):
    script = str(REPO / "scripts" / "gpu_check.sh")
    proc = subprocess.run(["bash", script], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "usage" in proc.stderr
    # a Python without open_clip and an empty wheel folder: exit 4 with what to do
    env = dict(os.environ, PYTHON=sys.executable, PYTHONNOUSERSITE="1")
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "python3").write_text(f"#!/bin/sh\nexec {sys.executable} -S \"$@\"\n")
    (fake / "python3").chmod(0o755)
    env["PYTHON"] = str(fake / "python3")  # -S: no site-packages, so no open_clip
    proc = subprocess.run(["bash", script, "--wheels", str(tmp_path / "none"), str(tmp_path / "out")],
                          capture_output=True, text=True, timeout=60, env=env)
    assert proc.returncode == 4 and "gpu_wheels.sh" in proc.stderr
