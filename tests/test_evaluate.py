"""`runa-ood evaluate` end to end on a slice of the real photographs (tiny random model), the
weights policy (exit 2 with instructions), and the shared scoring loop vs ``OodScorer.score``."""
import json

import numpy as np
import pytest

from runa_ood_node.tools.cli import main
from runa_ood_node.tools.common import RANDOM_LABEL

TINY = ["--model", "runa-tiny-vit", "--no-progress"]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_evaluate_slice_writes_labelled_report_and_plots(ood_pack, tmp_path, capsys):
    from runa_ood_node.core.thresholds import Thresholds

    out = tmp_path / "eval"
    thr_file = Thresholds(0.0, {}, 0.95, {"scorer": "runa", "ablation": "dual", "label_set": "voc"}).save(
        tmp_path / "thr.yaml")
    rc = main(["evaluate", *TINY, "--pretrained", "none", "--allow-random-weights",
               "--annotations", str(ood_pack / "annotations.json"), "--id-set", "voc", "--max-images", "6",
               "--scorer", "all", "--ablation", "all", "--out", str(out), "--thresholds", str(thr_file),
               "--save-scores"])
    assert rc == 0
    cap = capsys.readouterr()
    assert RANDOM_LABEL in cap.out and RANDOM_LABEL in cap.err  # table and banner
    for s in ("FPR95", "AUROC", "AUPR-In", "AUPR-Out", "boxes/s"):
        assert s in cap.out

    rep = json.loads((out / "report.json").read_text())
    assert rep["random_weights"] is True and rep["warning"] == RANDOM_LABEL
    assert rep["config"]["model"]["model_name"] == "runa-tiny-vit"
    assert rep["dataset"]["images"] == 6
    n_id, n_ood = rep["dataset"]["id_boxes"], rep["dataset"]["ood_boxes"]
    assert n_id > 0 and n_ood > 0
    runs = {(r["scorer"], r["ablation"]): r for r in rep["runs"]}
    assert set(runs) == {(s, a) for s in ("runa", "mcm", "energy", "sum") for a in ("dual", "regional", "global")}
    for (s, a), r in runs.items():
        m = r["metrics"]
        scored = r["status_counts"].get("OK", 0)
        assert m["n_id"] + m["n_ood"] == scored <= n_id + n_ood
        assert m["n_id"] <= n_id and m["n_ood"] <= n_ood
        for k in ("fpr95", "auroc", "aupr_in", "aupr_out"):
            assert 0.0 <= m[k] <= 1.0
        assert r["boxes_per_s"] > 0
        assert (out / f"hist_{s}_{a}.png").read_bytes()[:8] == PNG_MAGIC
    # single-view ablations use the fusion weight they claim
    assert runs[("runa", "regional")]["lam"] == 1.0 and runs[("runa", "global")]["lam"] == 0.0
    # different views give different scores (the ablation is not a no-op)
    assert runs[("runa", "regional")]["metrics"]["auroc"] != runs[("runa", "global")]["metrics"]["auroc"]
    assert (out / "roc.png").read_bytes()[:8] == PNG_MAGIC

    # the thresholds apply only to the configuration they were fitted for; recount from the scores
    assert "at_thresholds" not in runs[("mcm", "dual")] and "at_thresholds" not in runs[("runa", "global")]
    op = runs[("runa", "dual")]["at_thresholds"]
    recs = json.loads((out / "scores.json").read_text())["runa/dual"]
    ok = [r for r in recs if r["status"] == "OK"]
    assert len(ok) == runs[("runa", "dual")]["status_counts"]["OK"]
    id_acc = [r["uncertainty"] <= 0.0 for r in ok if r["is_id"]]
    ood_acc = [r["uncertainty"] <= 0.0 for r in ok if not r["is_id"]]
    assert op["tpr"] == pytest.approx(np.mean(id_acc)) and op["fpr"] == pytest.approx(np.mean(ood_acc))
    # metrics recomputed from the per-box scores
    from runa_ood_node.core import metrics

    m = metrics.summary([r["uncertainty"] for r in ok if r["is_id"]], [r["uncertainty"] for r in ok if not r["is_id"]])
    assert m["auroc"] == pytest.approx(runs[("runa", "dual")]["metrics"]["auroc"])


def test_unloadable_checkpoint_exits_2_with_instructions(ood_pack, tmp_path, capsys):
    out = tmp_path / "eval"
    rc = main(["evaluate", *TINY, "--pretrained", str(tmp_path / "missing_checkpoint.pt"),
               "--annotations", str(ood_pack / "annotations.json"), "--max-images", "2", "--out", str(out)])
    assert rc == 2
    err = capsys.readouterr().err
    assert "cannot load weights" in err and "missing_checkpoint.pt" in err
    assert "--pretrained /path/to/checkpoint.pt" in err and "--allow-random-weights" in err
    assert not (out / "report.json").exists()


def test_missing_annotations_exit_2(tmp_path, capsys):
    rc = main(["evaluate", *TINY, "--annotations", str(tmp_path / "none.json"), "--out", str(tmp_path / "o")])
    assert rc == 2
    assert "annotation file not found" in capsys.readouterr().err


@pytest.mark.parametrize("ablation", ["dual", "global"])
def test_shared_scoring_loop_matches_pipeline(ood_pack, tiny_encoder, ablation):
    """score_dataset (features once, fused per ablation) == OodScorer.score frame by frame."""
    from runa_ood_node.core.boxes import BoxStatus
    from runa_ood_node.core.dataset import load_dataset
    from runa_ood_node.core.pipeline import OodScorer
    from runa_ood_node.tools.common import score_dataset

    ds = load_dataset(ood_pack / "annotations.json", "voc").subset(3)
    scorer = OodScorer(tiny_encoder, ds.label_set, scorer="mcm", ablation=ablation)
    recs = score_dataset(scorer, ds, progress=False)
    assert len(recs) == ds.n_boxes and recs.boxes_per_s > 0
    pos = 0
    for fr in ds.frames:
        res = scorer.score(ds.load_image(fr), fr.boxes, box_format="xywh")
        for i in range(len(fr)):
            r = recs[pos + i]
            assert r["image_id"] == fr.image_id and r["category"] == fr.categories[i]
            assert r["is_id"] == bool(fr.is_id[i])
            assert r["status"] == BoxStatus(int(res.status[i])).name
            if r["status"] == "OK":
                assert r["label"] == res.label[i]
                np.testing.assert_allclose(r["uncertainty"], res.uncertainty[i], rtol=1e-5, atol=1e-6)
                np.testing.assert_allclose(r["similarity"], res.similarity[i], rtol=1e-5, atol=1e-6)
        pos += len(fr)


def test_allow_random_weights_falls_back_loudly_and_reproducibly(tmp_path, capsys):
    import argparse

    from runa_ood_node.tools.common import load_encoder_or_exit

    ns = argparse.Namespace(model="runa-tiny-vit", pretrained=str(tmp_path / "gone.pt"), device="cpu",
                            backend="torch", allow_random_weights=True, projection=None)
    a = load_encoder_or_exit(ns)
    err = capsys.readouterr().err
    assert a.random_weights and RANDOM_LABEL in err and "gone.pt" in err  # says why it is random
    b = load_encoder_or_exit(ns)
    assert b.model_id == a.model_id  # seeded: separate tool runs share one random model


def test_one_encoding_scores_every_configuration_like_score_dataset(ood_pack, tiny_encoder, tmp_path):
    """encode_boxes once (both views) + score_boxes per configuration == score_dataset of a fresh
    OodScorer; an unreadable image only marks its own boxes NOT_SCORED."""
    import dataclasses

    from runa_ood_node.core.boxes import BoxStatus
    from runa_ood_node.core.dataset import load_dataset
    from runa_ood_node.core.pipeline import OodScorer
    from runa_ood_node.tools import common

    ds = load_dataset(ood_pack / "annotations.json", "voc").subset(3)
    broken = dataclasses.replace(ds.frames[1], path=tmp_path / "missing.jpg")
    ds = dataclasses.replace(ds, frames=[ds.frames[0], broken, ds.frames[2]])
    n0, n1 = len(ds.frames[0]), len(broken)
    assert n1 > 0
    ref = OodScorer(tiny_encoder, ds.label_set)
    enc = common.encode_boxes(ref, ds, views=("regional", "global"), progress=False)
    assert len(enc) == ds.n_boxes and enc.views == ("regional", "global")
    assert (enc.status[n0:n0 + n1] == BoxStatus.NOT_SCORED).all()
    assert any("missing.jpg" in p for p, _ in enc.image_errors)
    assert enc.seconds_for("regional") < enc.seconds_for("dual")
    for sc, ab in (("runa", "regional"), ("energy", "global"), ("mcm", "dual")):
        got = common.make_records(enc, common.score_boxes(enc, scorer=sc, ablation=ab), 1.0)
        want = common.score_dataset(OodScorer(tiny_encoder, ds.label_set, scorer=sc, ablation=ab), ds, progress=False)
        assert [r["status"] for r in got] == [r["status"] for r in want]
        np.testing.assert_allclose(got.arrays()[1], want.arrays()[1], rtol=1e-5, atol=1e-6, equal_nan=True)
        assert got.arrays()[2] == want.arrays()[2]
