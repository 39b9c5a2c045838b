"""`runa-ood calibrate` on a slice of the real photographs (tiny random model): writes a loadable
thresholds file whose held-out TPR matches an independent recount, and refuses too-small sets."""
import argparse
import json

import numpy as np
import pytest

from runa_ood_node.tools.cli import main

BASE = ["--model", "runa-tiny-vit", "--pretrained", "none", "--allow-random-weights", "--no-progress",
        "--id-set", "voc", "--tpr", "0.95", "--seed", "1"]


@pytest.fixture(scope="module")
def calibrated(ood_pack, tmp_path_factory):
    out = tmp_path_factory.mktemp("cal") / "road" / "thresholds.yaml"
    rc = main(["calibrate", *BASE, "--annotations", str(ood_pack / "annotations.json"), "--max-images", "16",
               "--split", "0.75", "--min-per-class", "10", "--out", str(out)])
    assert rc == 0
    return out


def test_thresholds_file_loads_with_provenance(calibrated):
    from runa_ood_node.core.thresholds import Thresholds

    thr = Thresholds.load(calibrated)
    assert thr.tpr == 0.95 and np.isfinite(thr.global_threshold)
    assert thr.meta["scorer"] == "max_cosine" and thr.meta["label_set"] == "voc" and thr.meta["random_weights"] is True
    assert thr.meta["n"] >= 20
    fitted = thr.fitted_for
    assert (fitted["model"], fitted["scorer"], fitted["ablation"], fitted["lam"], fitted["blur_radius"]) == \
        ("runa-tiny-vit", "max_cosine", "dual", 0.5, 1.0)
    assert fitted["weights"].startswith("random-seed:") and fitted["projection"] == "off-the-shelf"
    assert fitted["label_set"] == "voc" and len(fitted["label_set_hash"]) == 16
    # every fitted ID box is counted under one predicted label, and exactly the labels with at least
    # max(--min-per-class 10, ceil(1/(1-tpr)) = 20) boxes get their own threshold (the rest use the global)
    n_per = thr.meta["n_per_class"]
    assert n_per and sum(n_per.values()) == thr.meta["n"]
    assert set(thr.per_class) == {lab for lab, n in n_per.items() if n >= 20}
    assert thr.per_class and all(np.isfinite(v) for v in thr.per_class.values())  # not an empty loop
    assert "lam" not in thr.meta  # one lam only: the effective fusion weight in fitted_for
    rep = json.loads((calibrated.parent / "calibration_report.json").read_text())
    assert rep["random_weights"] is True
    assert rep["fit"]["global_tpr"] >= 0.95
    ho = rep["held_out"]["per_class"]
    assert 0.0 <= ho["lo"] <= ho["rate"] <= ho["hi"] <= 1.0 and ho["n"] > 0
    assert rep["ood"]["fpr_per_class"]["n"] > 0


def test_held_out_tpr_matches_independent_recount(calibrated, ood_pack):
    """Re-score the held-out images with the same (seeded) model and count accepted ID boxes."""
    from runa_ood_node.core.dataset import load_dataset
    from runa_ood_node.core.pipeline import OodScorer
    from runa_ood_node.core.thresholds import Thresholds
    from runa_ood_node.tools.common import load_encoder_or_exit

    thr = Thresholds.load(calibrated)
    enc = load_encoder_or_exit(argparse.Namespace(model="runa-tiny-vit", pretrained="none", device="cpu",
                                                  backend="torch", allow_random_weights=True, projection=None))
    assert enc.model_id == thr.meta["model_id"]
    ds = load_dataset(ood_pack / "annotations.json", "voc").subset(16)
    _, held = ds.split(0.75, seed=1)
    scorer = OodScorer(enc, ds.label_set, thresholds=thr)
    from runa_ood_node.core.thresholds import check_fit

    assert check_fit(thr, scorer) == []  # the same configuration accepts its own thresholds
    accepted = total = 0
    for fr in held.frames:
        res = scorer.score(held.load_image(fr), fr.boxes, box_format="xywh")
        m = res.ok & fr.is_id
        total += int(m.sum())
        accepted += int((~res.is_ood[m]).sum())  # the node's decision: uncertainty <= threshold
    rep = json.loads((calibrated.parent / "calibration_report.json").read_text())
    assert total == rep["held_out"]["per_class"]["n"]
    assert accepted / total == pytest.approx(rep["held_out"]["per_class"]["rate"])


def test_refuses_too_small_set(ood_pack, tmp_path, capsys):
    out = tmp_path / "thr.yaml"
    rc = main(["calibrate", *BASE, "--annotations", str(ood_pack / "annotations.json"), "--max-images", "3",
               "--out", str(out)])
    assert rc == 2
    assert "too few ID boxes" in capsys.readouterr().err
    assert not out.exists()


EVAL = ["evaluate", "--model", "runa-tiny-vit", "--pretrained", "none", "--allow-random-weights", "--no-progress",
        "--id-set", "voc", "--max-images", "4"]


def test_evaluate_applies_the_file_at_its_lam_refuses_it_at_another_and_marks_the_override(
        calibrated, ood_pack, tmp_path, capsys):
    ann = ["--annotations", str(ood_pack / "annotations.json"), "--thresholds", str(calibrated)]
    assert main([*EVAL, *ann, "--lam", "0.5", "--out", str(tmp_path / "same")]) == 0
    rep = json.loads((tmp_path / "same" / "report.json").read_text())
    assert rep["runs"][0]["at_thresholds"]["mismatch"] == [] and rep["thresholds"]["applied_to"] == ["max_cosine/dual"]
    capsys.readouterr()

    assert main([*EVAL, *ann, "--lam", "0.7", "--out", str(tmp_path / "other")]) == 2
    err = capsys.readouterr().err
    assert "lam: fitted for 0.5, in use is 0.7" in err and "--allow-threshold-mismatch" in err
    assert not (tmp_path / "other" / "report.json").exists()

    assert main([*EVAL, *ann, "--lam", "0.7", "--allow-threshold-mismatch", "--out", str(tmp_path / "forced")]) == 0
    out = capsys.readouterr().out
    rep = json.loads((tmp_path / "forced" / "report.json").read_text())
    assert rep["thresholds"]["mismatch"] == {"max_cosine/dual": ["lam: fitted for 0.5, in use is 0.7"]}
    assert rep["runs"][0]["at_thresholds"]["mismatch"] == ["lam: fitted for 0.5, in use is 0.7"]
    assert "MISMATCHED thresholds" in out
