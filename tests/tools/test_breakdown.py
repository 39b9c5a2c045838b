"""Metrics per OOD group and per box size (``core.metrics.breakdown``) and `evaluate --baselines`."""
import json

import cv2
import numpy as np
import pytest

from runa_ood_node.core import metrics
from runa_ood_node.tools.cli import main


def test_breakdown_separates_groups_and_size_bins():
    rng = np.random.default_rng(0)
    n = 200
    # ID around 0, near-OOD overlapping ID, far-OOD far away
    u = np.concatenate([rng.normal(0, 1, n), rng.normal(0.5, 1, n), rng.normal(6, 1, n)])
    is_id = np.r_[np.ones(n, bool), np.zeros(2 * n, bool)]
    groups = ["id"] * n + ["near"] * n + ["far"] * n
    sizes = np.tile(np.array([10.0, 50.0, 200.0, 20.0]), 3 * n // 4)
    bd = metrics.breakdown(u, is_id, groups, sizes)
    assert set(bd["by_group"]) == {"near", "far"}  # "id" names ID boxes: no OOD group
    near, far = bd["by_group"]["near"], bd["by_group"]["far"]
    assert near["n_id"] == n and near["n_ood"] == n and far["n_ood"] == n
    assert far["auroc"] > 0.99 and 0.55 < near["auroc"] < 0.8
    assert far["fpr95"] < near["fpr95"]
    assert set(bd["by_size"]) == {"<32", "32-96", ">96"}
    # every box lands in exactly one bin: the bins' counts add up to the total
    assert sum(r["all"]["n_id"] + r["all"]["n_ood"] for r in bd["by_size"].values()) == 3 * n
    assert bd["by_size"]["<32"]["all"]["n_id"] == int((sizes[:n] < 32).sum())
    # the size mask keeps only the boxes it names
    mask = np.zeros(3 * n, bool)
    mask[:10] = True
    mask[n:n + 10] = True
    bd2 = metrics.breakdown(u, is_id, groups, sizes, size_mask=mask)
    assert sum(r["all"]["n_id"] + r["all"]["n_ood"] for r in bd2["by_size"].values()) == 20
    # NaN (unscored) boxes are dropped and counted, not scored
    u[0] = np.nan
    assert metrics.breakdown(u, is_id, groups, sizes)["by_group"]["far"]["n_id_dropped"] == 1


def _synthetic_coco(tmp_path):
    """Four frames at two resolutions; ID labels 'car', OOD groups near/far; boxes of every size bin."""
    rng = np.random.default_rng(1)
    images, anns = [], []
    for i, (w, h) in enumerate([(1280, 720), (1280, 720), (800, 800), (1280, 720)]):
        img = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
        name = f"f{i}.png"
        cv2.imwrite(str(tmp_path / name), img)
        images.append({"id": i, "file_name": name, "width": w, "height": h})
        for j, (cat, group, s) in enumerate([("car", "id", 20), ("car", "id", 60), ("car", "id", 150),
                                               ("moose", "near", 20), ("moose", "near", 60),
                                               ("tire", "far", 150)]):
            anns.append({"id": len(anns), "image_id": i, "category_id": 1 if cat == "car" else 2 if cat == "moose"
                         else 3, "bbox": [10 + 3 * j, 10 + 2 * j, s, s], "area": s * s, "iscrowd": 0,
                         "group": group})
    cats = [{"id": 1, "name": "car"}, {"id": 2, "name": "moose"}, {"id": 3, "name": "tire"}]
    (tmp_path / "ann.json").write_text(json.dumps({"images": images, "annotations": anns, "categories": cats}))
    (tmp_path / "labels.yaml").write_text("name: synth\nlabels: [car, truck]\n")
    return tmp_path / "ann.json", tmp_path / "labels.yaml"


def test_evaluate_baselines_and_breakdown(tmp_path, capsys):
    ann, labels = _synthetic_coco(tmp_path)
    out = tmp_path / "eval"
    rc = main(["evaluate", "--model", "runa-tiny-vit", "--no-progress", "--pretrained", "none",
               "--allow-random-weights", "--annotations", str(ann), "--id-set", str(labels), "--baselines",
               "--out", str(out)])
    assert rc == 0
    text = capsys.readouterr().out
    assert "AUROC/FPR95 by OOD group and by box size" in text
    rep = json.loads((out / "report.json").read_text())
    assert rep["runs_compared"] == ["runa", "mcm-crop", "runa-0shot"]
    runs = {r["run"]: r for r in rep["runs"]}
    assert (runs["mcm-crop"]["scorer"], runs["mcm-crop"]["ablation"], runs["mcm-crop"]["head"]) == \
        ("mcm", "regional", None)
    assert (runs["runa-0shot"]["scorer"], runs["runa-0shot"]["ablation"]) == ("max_cosine", "dual")  # RUNA's scorer
    # with no head given, RUNA and its zero-shot baseline are the same configuration: same scores
    assert runs["runa"]["metrics"]["auroc"] == runs["runa-0shot"]["metrics"]["auroc"]
    bd = runs["runa"]["breakdown"]
    assert set(bd["by_group"]) == {"near", "far"}
    assert bd["by_group"]["near"]["n_id"] == 12 and bd["by_group"]["near"]["n_ood"] == 8
    assert bd["by_group"]["far"]["n_ood"] == 4
    # the size bins count only the 1280x720 frames' boxes (3 frames x 6 boxes), each box once
    assert rep["size_frame"].startswith("1280x720")
    assert sum(c["all"]["n_id"] + c["all"]["n_ood"] for c in bd["by_size"].values()) == 18
    assert bd["by_size"]["<32"]["near"]["n_ood"] == 3 and bd["by_size"]["<32"]["near"]["n_id"] == 3


def test_evaluate_baselines_refuse_thresholds(tmp_path, capsys):
    ann, labels = _synthetic_coco(tmp_path)
    (tmp_path / "thr.yaml").write_text("global_threshold: 0.0\n")
    rc = main(["evaluate", "--model", "runa-tiny-vit", "--no-progress", "--pretrained", "none",
               "--allow-random-weights", "--annotations", str(ann), "--id-set", str(labels), "--baselines",
               "--thresholds", str(tmp_path / "thr.yaml"), "--out", str(tmp_path / "o")])
    assert rc == 2
    assert "--baselines compares without them" in capsys.readouterr().err


@pytest.mark.parametrize("bad", ["12x", "axb"])
def test_size_frame_must_be_wxh(tmp_path, bad, capsys):
    ann, labels = _synthetic_coco(tmp_path)
    rc = main(["evaluate", "--model", "runa-tiny-vit", "--no-progress", "--pretrained", "none",
               "--allow-random-weights", "--annotations", str(ann), "--id-set", str(labels), "--size-frame", bad,
               "--out", str(tmp_path / "o")])
    assert rc == 2
