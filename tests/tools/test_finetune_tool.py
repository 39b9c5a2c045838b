"""`runa-ood finetune` on real crops with the tiny random model: the Eq. 7 loss goes down, every
shot moves towards its own class text embedding (checked independently of the tool's report), and
the saved projection reloads and changes the pipeline's scores (regional view only)."""
import argparse
import json

import numpy as np
import pytest
import torch

from runa_ood_node.tools.cli import main

ARGS = ["--model", "runa-tiny-vit", "--pretrained", "none", "--allow-random-weights", "--no-progress",
        "--id-set", "voc", "--max-images", "40", "--shots", "2", "--seed", "3", "--lr", "1e-3", "--epochs", "25",
        "--tau", "0.01"]


@pytest.fixture(scope="module")
def finetuned(ood_pack, tmp_path_factory):
    out = tmp_path_factory.mktemp("ft") / "voc_fewshot"
    rc = main(["finetune", *ARGS, "--annotations", str(ood_pack / "annotations.json"), "--eval-images", "4",
               "--out", str(out)])
    assert rc == 0
    return out


def _tool_encoder(projection=None):
    """The encoder the tools build (same seeded random weights)."""
    return _tool_scorer(projection).encoder


def _tool_scorer(projection=None):
    """The scorer the tools build (same seeded random weights), optionally with a projection (RUNA's head)."""
    from runa_ood_node.tools.common import scorer_from_args

    ns = argparse.Namespace(model="runa-tiny-vit", pretrained="none", device="cpu", backend="torch",
                            allow_random_weights=True, projection=projection)
    return scorer_from_args(ns, apply_thresholds=False).scorer


def test_outputs_and_report(finetuned):
    for name in ("projection.pt", "projection.yaml", "loss_curve.png", "finetune_report.json"):
        assert (finetuned / name).is_file(), name
    rep = json.loads((finetuned / "finetune_report.json").read_text())
    assert rep["random_weights"] is True and "RANDOM WEIGHTS" in rep["warning"]
    assert rep["loss_after"] < rep["loss_before"]
    assert rep["shots_with_higher_own_class_cosine"] == rep["n_shots_used"] > 0
    ho = rep["held_out"]
    assert ho["images"] == 4 and set(ho) >= {"before", "after"}
    from runa_ood_node.core.finetune import load_projection

    proj, meta = load_projection(finetuned)
    assert meta["random_weights"] is True and meta["shots"] == 2 and meta["epochs"] == 25
    assert len(meta["loss_curve"]) == 25 and meta["loss_curve"][-1] < meta["loss_curve"][0]
    assert len(meta["shot_list"]) == rep["n_shots_used"]


def test_training_improves_the_shots_independently(finetuned, ood_pack):
    """Recompute the shots' features and check loss and per-shot cosines with both projections."""
    from runa_ood_node.core.dataset import load_dataset
    from runa_ood_node.core.finetune import eq7_loss, load_projection, own_class_cosine
    from runa_ood_node.core.pipeline import OodScorer
    from runa_ood_node.tools.finetune import shot_features

    enc = _tool_encoder()
    proj, meta = load_projection(finetuned)
    assert meta["model_id"] == enc.model_id  # the tools' random model is reproducible across runs
    ds = load_dataset(ood_pack / "annotations.json", "voc").subset(40)
    shots = ds.sample_shots(2, seed=3)
    assert [s["ann_id"] for s in meta["shot_list"]] == [ds.frames[f].ann_ids[b] for f, b in
                                                        zip(shots.frame_idx, shots.box_idx)]
    feats, keep = shot_features(OodScorer(enc, ds.label_set), ds, shots, use_cache=False, progress=False)
    assert keep.all()
    y = torch.from_numpy(shots.label_idx)
    txt = enc.text_embeddings(ds.label_set)
    p0 = enc.proj_global
    assert float(eq7_loss(feats, y, txt, proj)) < float(eq7_loss(feats, y, txt, p0))
    before, after = own_class_cosine(feats, y, txt, p0), own_class_cosine(feats, y, txt, proj)
    assert bool((after > before).all()), (before, after)


def test_held_out_before_after_matches_independent_scoring(finetuned, ood_pack):
    """The report's held-out metrics equal a separate ``score_dataset`` run of the plain and of the
    fine-tuned model (``--projection``) on the same images: the tool encodes once and scores with
    P_r swapped, which must give what a tool run with each projection gives."""
    import warnings

    from runa_ood_node.core import metrics
    from runa_ood_node.core.dataset import load_dataset
    from runa_ood_node.core.pipeline import OodScorer
    from runa_ood_node.tools.common import score_dataset

    rep = json.loads((finetuned / "finetune_report.json").read_text())
    ds = load_dataset(ood_pack / "annotations.json", "voc").subset(40)
    shots = ds.sample_shots(2, seed=3)
    held = ds.without_frames(set(shots.frame_idx.tolist())).subset(4)
    assert held.n_images == rep["held_out"]["images"] == 4
    unc = {}
    for name, projection in (("before", None), ("after", str(finetuned))):
        tool = _tool_scorer(projection)
        recs = score_dataset(OodScorer(tool.encoder, held.label_set, head=tool.method.head), held, progress=False)
        is_id, u, _ = recs.arrays()
        ok = np.isfinite(u)
        unc[name] = u
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", metrics.MetricsWarning)
            want = metrics.summary(u[ok & is_id], u[ok & ~is_id])
        got = rep["held_out"][name]
        assert got["n_id"] == want["n_id"] > 0 and got["n_ood"] == want["n_ood"] > 0
        for key in ("fpr95", "auroc", "aupr_in", "aupr_out"):
            assert got[key] == pytest.approx(want[key], abs=1e-6), (name, key)
    # the fine-tuned P_r really changed the held-out scores (dual ablation uses P_r)
    assert np.nanmax(np.abs(unc["after"] - unc["before"])) > 1e-4


def test_projection_reloads_and_changes_pipeline_scores(finetuned, real_photo):
    from runa_ood_node.core.pipeline import OodScorer

    img, boxes = real_photo
    plain = _tool_scorer()
    tuned = _tool_scorer(projection=str(finetuned))  # --projection path of every tool (RUNA's head)
    assert not torch.equal(tuned.method.proj_regional, plain.method.proj_regional)
    assert torch.equal(tuned.encoder.proj_global, plain.encoder.proj_global)  # P_g stays off-the-shelf
    res = {}
    for name, sc in (("plain", plain), ("tuned", tuned)):
        for ab in ("dual", "global"):
            res[name, ab] = OodScorer(sc.encoder, "voc", ablation=ab, head=sc.method.head).score(
                img, boxes, box_format="xywh")
    ok = res["plain", "dual"].ok
    assert ok.any()
    d = np.abs(res["plain", "dual"].uncertainty[ok] - res["tuned", "dual"].uncertainty[ok])
    assert d.max() > 1e-3
    # the global-only ablation does not use P_r: identical scores
    np.testing.assert_allclose(res["plain", "global"].uncertainty, res["tuned", "global"].uncertainty, rtol=0, atol=1e-6)


def test_requires_output_location(ood_pack, capsys):
    rc = main(["finetune", *ARGS, "--annotations", str(ood_pack / "annotations.json")])
    assert rc == 2
    assert "--domain" in capsys.readouterr().err
