"""`runa-ood evaluate` end to end on a slice of the real photographs (tiny random model), the
weights policy (exit 2 with instructions), and the shared scoring loop vs ``OodScorer.score``."""
import json

import numpy as np
import pytest

from runa_ood_node.tools.cli import main
from runa_ood_node.tools.common import RANDOM_LABEL

TINY = ["--model", "runa-tiny-vit", "--no-progress"]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_evaluate_slice_writes_labelled_report_and_plots(ood_pack, tmp_path, capsys):  # noqa: C901
    from runa_ood_node.core.thresholds import Thresholds

    out = tmp_path / "eval"
    from runa_ood_node.core.thresholds import fit_identity
    from runa_ood_node.core.config import ScorerConfig
    from runa_ood_node.factory import build_scorer

    # fitted for runa/dual on the seeded random tiny model the tool builds too
    ident = fit_identity(build_scorer(ScorerConfig(model="runa-tiny-vit", pretrained="", allow_random=True,
                                                   label_set="voc", backend="torch")))
    thr_file = Thresholds(0.0, {}, 0.95, {"fitted_for": ident}).save(tmp_path / "thr.yaml")
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
    assert (rep["config"]["device"], rep["config"]["precision"], rep["config"]["backend"]) == ("cpu", "fp32", "torch")
    assert rep["dataset"]["images"] == 6
    n_id, n_ood = rep["dataset"]["id_boxes"], rep["dataset"]["ood_boxes"]
    assert n_id > 0 and n_ood > 0
    runs = {(r["scorer"], r["ablation"]): r for r in rep["runs"]}
    assert set(runs) == {(s, a) for s in ("max_cosine", "mcm", "energy", "sum") for a in ("dual", "regional", "global")}
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
    assert runs[("max_cosine", "regional")]["lam"] == 1.0 and runs[("max_cosine", "global")]["lam"] == 0.0
    # different views give different scores (the ablation is not a no-op)
    assert runs[("max_cosine", "regional")]["metrics"]["auroc"] != runs[("max_cosine", "global")]["metrics"]["auroc"]
    assert (out / "roc.png").read_bytes()[:8] == PNG_MAGIC

    # the thresholds apply only to the configuration they were fitted for; recount from the scores
    assert "at_thresholds" not in runs[("mcm", "dual")] and "at_thresholds" not in runs[("max_cosine", "global")]
    op = runs[("max_cosine", "dual")]["at_thresholds"]
    recs = json.loads((out / "scores.json").read_text())["max_cosine/dual"]
    ok = [r for r in recs if r["status"] == "OK"]
    assert len(ok) == runs[("max_cosine", "dual")]["status_counts"]["OK"]
    id_acc = [r["uncertainty"] <= 0.0 for r in ok if r["is_id"]]
    ood_acc = [r["uncertainty"] <= 0.0 for r in ok if not r["is_id"]]
    assert op["tpr"] == pytest.approx(np.mean(id_acc)) and op["fpr"] == pytest.approx(np.mean(ood_acc))
    # metrics recomputed from the per-box scores
    from runa_ood_node.core import metrics

    m = metrics.summary([r["uncertainty"] for r in ok if r["is_id"]], [r["uncertainty"] for r in ok if not r["is_id"]])
    assert m["auroc"] == pytest.approx(runs[("max_cosine", "dual")]["metrics"]["auroc"])


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


def _model_ns(**kw):
    import argparse

    base = dict(model="runa-tiny-vit", pretrained="none", device="cpu", precision="auto", backend="torch",
                allow_random_weights=True, projection=None, offline=False)
    base.update(kw)
    return argparse.Namespace(**base)


def test_precision_argument_resolves_per_device():
    import argparse

    from runa_ood_node.tools import common

    assert common.resolve_precision("auto", "cpu") == "fp32"
    assert common.resolve_precision("auto", "cuda") == "fp16" and common.resolve_precision("auto", "cuda:1") == "fp16"
    assert common.resolve_precision("fp32", "cuda") == "fp32"
    with pytest.raises(ValueError, match="needs a CUDA device"):
        common.resolve_precision("fp16", "cpu")
    with pytest.raises(ValueError, match="unknown precision"):
        common.resolve_precision("int4", "cuda")
    parser = argparse.ArgumentParser()
    common.add_model_arguments(parser)
    a = parser.parse_args([])
    assert a.precision == "auto" and a.offline is False
    assert parser.parse_args(["--precision", "fp16", "--offline"]).offline is True
    # the CUDA configuration the node would get: device and precision reach build_scorer
    params = common.node_parameters_from_args(_model_ns(device="cuda:0", backend="tensorrt"), random_weights=True)
    cfg = common.settings_from_parameters(params).config
    assert (cfg.device, cfg.resolved_precision, cfg.backend) == ("cuda", "fp16", "tensorrt")


def test_fp16_on_cpu_exits_2(ood_pack, tmp_path, capsys):
    rc = main(["evaluate", *TINY, "--pretrained", "none", "--allow-random-weights", "--precision", "fp16",
               "--annotations", str(ood_pack / "annotations.json"), "--max-images", "1", "--out", str(tmp_path)])
    assert rc == 2 and "needs a CUDA device" in capsys.readouterr().err


def test_tools_build_the_backend_the_node_builds():
    """--backend onnxruntime in a tool and backend:=onnxruntime on the node give the same ONNX Runtime
    trunk (exported once, cached) and the same scores, which match the torch trunk's."""
    pytest.importorskip("onnxruntime")
    from runa_ood_node.factory import build_scorer
    from runa_ood_node.ros.params import validate
    from runa_ood_node.tools import common

    tool = common.scorer_from_args(_model_ns(backend="onnxruntime")).scorer
    settings = validate({"model": "runa-tiny-vit", "pretrained": "", "allow_random_weights": True,
                         "backend": "onnxruntime"})
    node = build_scorer(settings.config)
    torch_pipe = common.scorer_from_args(_model_ns(backend="torch")).scorer
    assert tool.encoder.backend_name == node.encoder.backend_name == "onnxruntime-cpu-fp32"
    assert torch_pipe.encoder.backend_name == "torch"
    assert tool.encoder.precision == node.encoder.precision == "fp32"
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (60, 80, 3), dtype=np.uint8)
    boxes = [[5, 5, 40, 30], [20, 10, 70, 55]]
    u_tool, u_node = tool.score(img, boxes).uncertainty, node.score(img, boxes).uncertainty
    np.testing.assert_allclose(u_tool, u_node, atol=1e-6)
    np.testing.assert_allclose(u_tool, torch_pipe.score(img, boxes).uncertainty, atol=1e-4)


def test_cuda_requested_without_cuda_exits_2(capsys):
    import torch

    from runa_ood_node.tools import common

    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    with pytest.raises(SystemExit) as exc:
        common.scorer_from_args(_model_ns(device="cuda"))
    assert exc.value.code == 2 and "CUDA is not available" in capsys.readouterr().err


def test_offline_flag_fails_fast_on_an_uncached_tag(ood_pack, tmp_path, monkeypatch, capsys):
    """--offline: an uncached tag fails at once (exit 2, no download attempt) instead of retrying."""
    import runa_ood_node.core.encoder as encoder_mod
    from runa_ood_node.tools import common

    for var in ("RUNA_OOD_OFFLINE", "HF_HUB_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(encoder_mod, "find_cached_tag_weights", lambda arch, tag: None)  # nothing cached

    def no_create(*a, **k):
        raise AssertionError("open_clip.create_model must not be reached (it would try to download)")

    import open_clip

    monkeypatch.setattr(open_clip, "create_model", no_create)
    assert common.allow_download(_model_ns()) is True
    assert common.allow_download(_model_ns(offline=True)) is False
    monkeypatch.setenv("RUNA_OOD_OFFLINE", "1")
    assert common.allow_download(_model_ns()) is False
    monkeypatch.delenv("RUNA_OOD_OFFLINE")

    rc = main(["evaluate", "--model", "ViT-B-32", "--pretrained", "openai", "--offline", "--no-progress",
               "--annotations", str(ood_pack / "annotations.json"), "--max-images", "1", "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert rc == 2 and "cannot load weights" in err and "downloading is disabled" in err


def test_write_json_makes_plain_json(tmp_path):
    """Reports: numpy / torch / paths become JSON values, NaN and inf become null (valid JSON)."""
    import pathlib

    import torch

    from runa_ood_node.tools.common import write_json

    obj = {"a": np.float32(np.nan), "b": [np.int64(3), float("inf"), -float("inf")], 4: np.arange(2),
           "p": pathlib.Path("/x/y"), "t": torch.tensor([0.5, float("nan")]), "ok": np.bool_(True), "s": "NaN"}
    text = write_json(tmp_path / "r" / "x.json", obj).read_text()
    assert "NaN" not in text.replace('"NaN"', "") and "Infinity" not in text
    assert json.loads(text) == {"a": None, "b": [3, None, None], "4": [0, 1], "p": "/x/y", "t": [0.5, None],
                                "ok": True, "s": "NaN"}
