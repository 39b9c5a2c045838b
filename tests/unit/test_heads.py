"""Trained heads (core.methods.heads): round trip, legacy projections as RUNA heads, every refusal,
and what the thresholds record about the head."""
import numpy as np
import pytest
import torch

from runa_ood_node.core.labels import load_label_set
from runa_ood_node.core.methods.heads import HEAD_FILE, HEAD_META, HeadError, load_head, save_head


def _scorer(enc, **params):
    """``factory.build_scorer`` around ``enc`` of the node parameters ``params`` (``core.config.from_parameters``)."""
    from runa_ood_node.core.config import from_parameters
    from runa_ood_node.factory import build_scorer

    return build_scorer(from_parameters({"model": enc.model_name, "pretrained": "", "allow_random_weights": True,
                                         "backend": "torch", "label_set": "voc", **params}), encoder=enc)


def _runa_head(tmp_path, enc, proj=None, label_set="voc", name="head"):
    ls = load_label_set(label_set)
    proj = enc.proj_global + 0.01 * torch.ones_like(enc.proj_global) if proj is None else proj
    meta = {"model_name": enc.model_name, "model_id": enc.model_id, "weights_id": enc.weights_id,
            "label_set": ls.name, "label_set_hash": ls.content_hash(), "hyper": {"lr": 1e-3}, "loss_curve": [2.0, 1.0]}
    return save_head(tmp_path / name, "runa", {"proj_regional": proj}, meta), proj


def test_head_round_trip_with_weights_only_and_provenance(tmp_path, tiny_encoder):
    folder, proj = _runa_head(tmp_path, tiny_encoder)
    assert torch.equal(torch.load(folder / HEAD_FILE, weights_only=True)["proj_regional"], proj)
    head = load_head(folder, method="runa", encoder=tiny_encoder, label_set=load_label_set("voc"))
    assert head.method == "runa" and torch.equal(head.state["proj_regional"], proj)
    assert head.meta["loss_curve"] == [2.0, 1.0] and head.hyper == {"lr": 1e-3} and len(head.sha256) == 64
    assert head.meta["shapes"] == {"proj_regional": list(proj.shape)}
    assert load_head(folder / HEAD_FILE).sha256 == head.sha256  # the .pt names its folder too


def test_refusals_name_the_head_and_the_reason(tmp_path, tiny_encoder):
    folder, _ = _runa_head(tmp_path, tiny_encoder)
    with pytest.raises(HeadError, match=f"head {folder}.*method 'runa', not 'tagood'"):
        load_head(folder, method="tagood")
    other = type("Enc", (), {"model_id": "0123456789abcdef", "model_name": "ViT-B-32"})()
    with pytest.raises(HeadError, match="another model"):
        load_head(folder, encoder=other)
    with pytest.raises(HeadError, match="label set 'voc'.*not for 'coco'"):
        load_head(folder, label_set=load_label_set("coco"))
    # truncated weights: the sha256 recorded in head.yaml no longer matches
    data = (folder / HEAD_FILE).read_bytes()
    (folder / HEAD_FILE).write_bytes(data[: len(data) // 2])
    with pytest.raises(HeadError, match="truncated or corrupt"):
        load_head(folder)
    # corrupt weights without a recorded sha256: torch cannot read them, still a HeadError naming the file
    meta = (folder / HEAD_META).read_text().replace("sha256:", "old_sha256:")
    (folder / HEAD_META).write_text(meta)
    with pytest.raises(HeadError, match=f"{HEAD_FILE} cannot be read"):
        load_head(folder)
    (folder / HEAD_META).write_text("method: [unclosed")
    with pytest.raises(HeadError, match="not valid YAML"):
        load_head(folder)
    (folder / HEAD_META).write_text("method: lenet\n")
    with pytest.raises(HeadError, match="does not name a method"):
        load_head(folder)
    with pytest.raises(FileNotFoundError, match="not found"):
        load_head(tmp_path / "nothing-here")
    with pytest.raises(ValueError, match="NaN"):
        save_head(tmp_path / "bad", "runa", {"proj_regional": torch.full((2, 2), float("nan"))})
    with pytest.raises(ValueError, match="unknown method"):
        save_head(tmp_path / "bad", "lenet", {})


def test_weights_that_disagree_with_their_yaml_are_refused(tmp_path, tiny_encoder):
    folder, _ = _runa_head(tmp_path, tiny_encoder)
    torch.save({"proj_regional": torch.zeros(3, 3)}, folder / HEAD_FILE)
    meta = (folder / HEAD_META).read_text()
    import yaml

    m = yaml.safe_load(meta)
    m.pop("sha256")
    (folder / HEAD_META).write_text(yaml.safe_dump(m))
    with pytest.raises(HeadError, match=r"should be \[64, 32\]"):
        load_head(folder)


def test_projection_files_load_as_runa_heads_and_a_foreign_one_is_refused(tmp_path, tiny_encoder):
    from runa_ood_node.core.finetune import save_projection
    from runa_ood_node.factory import build_scorer

    proj = tiny_encoder.proj_global * 1.5
    save_projection(tmp_path / "mine", proj, {"model_id": tiny_encoder.model_id})
    head = load_head(tmp_path / "mine", method="runa", encoder=tiny_encoder)
    assert head.method == "runa" and torch.equal(head.state["proj_regional"], proj)
    with pytest.raises(HeadError, match="method 'runa', not 'uni-ood'"):
        load_head(tmp_path / "mine", method="uni-ood")
    # right shape, other model: refused (it used to be only a warning in the factory)
    save_projection(tmp_path / "foreign", proj, {"model_id": "feedfacefeedface", "model_name": "ViT-B-16"})
    with pytest.raises(HeadError, match="another model"):
        _scorer(tiny_encoder, projection=str(tmp_path / "foreign"))
    # a head given as the factory's `head` and the same matrix as `projection` score alike (RUNA's head: the
    # projection parameter is its alias); the shared encoder holds no P_r of its own
    a = _scorer(tiny_encoder, projection=str(tmp_path / "mine"))
    img = np.full((48, 64, 3), 90, np.uint8)
    img[10:30, 10:40] = 200
    ra = a.score(img, [[5, 5, 40, 30], [20, 10, 60, 45]])
    from runa_ood_node.core.thresholds import fit_identity

    ident_a = fit_identity(a)
    assert not hasattr(tiny_encoder, "proj_regional")
    b = _scorer(tiny_encoder, head=str(tmp_path / "mine"), method="runa")
    rb = b.score(img, [[5, 5, 40, 30], [20, 10, 60, 45]])
    np.testing.assert_allclose(ra.uncertainty, rb.uncertainty, atol=1e-6)
    assert ident_a["head"] == fit_identity(b)["head"] == ident_a["projection"] != "off-the-shelf"


def test_thresholds_record_method_and_head_and_refuse_another(tmp_path, tiny_encoder):
    from runa_ood_node.core.pipeline import OodScorer
    from runa_ood_node.core.thresholds import (Thresholds, ThresholdsMismatchError, calibrate, check_fit,
                                               fit_identity)

    plain = OodScorer(tiny_encoder, "voc")
    ident = fit_identity(plain)
    assert ident["method"] == "runa" and ident["head"] == "off-the-shelf"
    thr, _ = calibrate(np.random.default_rng(0).normal(-0.3, 0.02, 40), ["car"] * 40, meta={"fitted_for": ident})
    thr = Thresholds.load(thr.save(tmp_path / "thr.yaml"))
    assert check_fit(thr, plain) == []
    folder, _ = _runa_head(tmp_path, tiny_encoder)
    tuned = OodScorer(tiny_encoder, "voc", head=load_head(folder))
    with pytest.raises(ThresholdsMismatchError, match="head: fitted for 'off-the-shelf'"):
        check_fit(thr, tuned)
    # a file written before method / head were recorded: RUNA, its head its projection
    legacy = dict(ident)
    legacy.pop("method"), legacy.pop("head")
    old = Thresholds(0.0, {}, 0.95, {"fitted_for": legacy})
    assert check_fit(old, plain) == []
    assert any(w.startswith("head:") for w in check_fit(old, tuned, allow_mismatch=True))


@pytest.mark.parametrize("method", ["tagood", "uni-ood"])
def test_finetune_method_writes_a_head_the_factory_loads(tmp_path, ood_pack, tiny_encoder, method):
    """`runa-ood finetune --method M --out DIR` -> head.pt + head.yaml; build_scorer(method, head) scores."""
    import json

    from runa_ood_node.tools.cli import main

    out = tmp_path / "head"
    rc = main(["finetune", "--method", method, "--model", "runa-tiny-vit", "--pretrained", "none",
               "--allow-random-weights", "--no-progress", "--id-set", "voc", "--max-images", "20", "--shots", "1",
               "--epochs", "2", "--annotations", str(ood_pack / "annotations.json"), "--out", str(out)])
    assert rc == 0
    for name in (HEAD_FILE, HEAD_META, "loss_curve.png", "finetune_report.json"):
        assert (out / name).is_file(), name
    rep = json.loads((out / "finetune_report.json").read_text())
    assert rep["method"] == method and rep["random_weights"] is True and rep["n_shots_used"] > 0
    head = load_head(out)
    assert head.method == method and len(head.meta["loss_curve"]) == 2 and head.hyper["epochs"] == 2
    sc = _scorer(tiny_encoder, method=method, head=str(out))
    img = np.full((96, 128, 3), 80, np.uint8)
    img[20:60, 30:90] = 200
    res = sc.score(img, [[30, 20, 90, 60], [0, 0, 50, 50]])
    assert res.ok.all() and np.isfinite(res.uncertainty).all()
    # refused when the configuration is validated (core.config loads the head once): HeadError's message
    with pytest.raises(ValueError, match=f"method '{method}', not 'runa'"):
        _scorer(tiny_encoder, head=str(out))
    with pytest.raises(ValueError, match="label set 'voc'.*not for 'coco'"):
        _scorer(tiny_encoder, label_set="coco", method=method, head=str(out))


def test_node_parameters_select_method_and_head_and_refuse_what_does_not_fit(tmp_path, tiny_encoder):
    from runa_ood_node.ros.params import ParameterValidationError, validate

    base = {"model": "runa-tiny-vit", "pretrained": "", "allow_random_weights": True, "backend": "torch"}
    settings = validate(base)
    assert settings.method == "runa" and settings.config.method == "runa"
    assert settings.config.head is None
    with pytest.raises(ParameterValidationError, match="method 'tagood' needs a trained head"):
        validate({**base, "method": "tagood"})
    with pytest.raises(ParameterValidationError, match="method"):
        validate({**base, "method": "lenet"})
    folder, _ = _runa_head(tmp_path, tiny_encoder)
    with pytest.raises(ParameterValidationError, match="head: head .*method 'runa', not 'uni-ood'"):
        validate({**base, "method": "uni-ood", "head": str(folder)})
    with pytest.raises(ParameterValidationError, match="head: head .*not for 'coco'"):
        validate({**base, "head": str(folder), "label_set": "coco"})
    ok = validate({**base, "head": str(folder)})
    assert ok.config.head.source == str(folder)  # loaded once, at validation
