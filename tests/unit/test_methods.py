"""The method seam (core.methods): the registry, RUNA as a method, views and backbone outputs asked by
the method, one backend call per batch of frames whatever the views, the one lam rule."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from runa_ood_node.core.boxes import BoxStatus
from runa_ood_node.core.config import method_settings
from runa_ood_node.core.methods import get_method
from runa_ood_node.core.methods.base import Method
from runa_ood_node.core.pipeline import BoxFeatures, FrameInput, OodScorer
from runa_ood_node.core.registry import METHODS
from runa_ood_node.core.views import ViewMaker


def _runa(**values):
    """RUNA's settings with ``values`` over the table's defaults (``core.config.method_settings``)."""
    return method_settings("runa", values)


def _image(h=96, w=128):
    rng = np.random.default_rng(3)
    img = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
    img[20:60, 30:90] = (220, 40, 40)
    return img


BOXES = [[30, 20, 90, 60], [5, 5, 40, 50], [70, 40, 120, 90]]


@pytest.fixture
def backbone_calls(tiny_encoder, monkeypatch):
    """Every ``visual_outputs`` call as ``(views, outputs, pairs as a list or None)``, served by the real one."""
    calls = []
    real = tiny_encoder.visual_outputs

    def visual_outputs(views, outputs, pairs=None, max_batch=None):
        calls.append((int(views.shape[0]), tuple(outputs), None if pairs is None else pairs.tolist()))
        return real(views, outputs, pairs=pairs, max_batch=max_batch)

    monkeypatch.setattr(tiny_encoder, "visual_outputs", visual_outputs)
    return calls


def test_registry_names_every_method_and_refuses_others():
    assert METHODS[0] == "runa" and set(METHODS) == {"runa", "uni-ood", "tagood"}
    runa = get_method("runa")
    assert runa.name == "runa" and runa.views == ("regional", "global") and runa.outputs == ("cls",)
    with pytest.raises(ValueError, match="unknown method 'lenet'.*runa"):
        get_method("lenet")
    from runa_ood_node.core import scoring

    assert not hasattr(scoring, "METHODS")


def test_runa_similarities_are_eq3_fusion_then_cosine(tiny_encoder):
    """On constructed features: the method's [M,K] equals cos(L2norm(lam f_r P_r + (1-lam) f_g P_g), T)."""
    sc = OodScorer(tiny_encoder, "voc")
    g = torch.Generator().manual_seed(1)
    f_r, f_g = torch.randn(4, tiny_encoder.width, generator=g), torch.randn(4, tiny_encoder.width, generator=g)
    P = tiny_encoder.proj_global
    text = sc.text_emb
    for ablation, lam, want_lam in (("dual", 0.3, 0.3), ("regional", 0.3, 1.0), ("global", 0.3, 0.0)):
        emb = F.normalize(want_lam * f_r @ P + (1 - want_lam) * f_g @ P, dim=-1)
        want = emb @ F.normalize(text, dim=-1).T
        got = sc.method.similarities({"regional.cls": f_r, "global.cls": f_g}, text, ablation=ablation,
                                     settings=sc.method.with_settings(lam=lam))
        assert got.shape == (4, len(sc.label_set))
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    # RUNA's fuse is the same formula (methods.runa.fuse; P_r = P_g without a head)
    from runa_ood_node.core.methods.runa import fuse

    torch.testing.assert_close(fuse(f_r, f_g, 0.3, sc.method.proj_regional, P),
                               F.normalize(0.3 * f_r @ P + 0.7 * f_g @ P, dim=-1))


def test_each_method_declares_its_settings_without_defaults_and_its_identity(tiny_encoder):
    """Settings: a frozen dataclass per method (RUNA: lam, blur_radius; the others none), no defaults (the table
    has them); OodScorer takes them whole or from its keywords; identity() is what thresholds are fitted for."""
    import dataclasses

    from runa_ood_node.core.methods.runa import RunaSettings
    from runa_ood_node.core.parameters import defaults

    runa = get_method("runa")
    assert runa.Settings is RunaSettings and [f.name for f in dataclasses.fields(RunaSettings)] == ["lam", "blur_radius"]
    assert all(f.default is dataclasses.MISSING for f in dataclasses.fields(RunaSettings))
    with pytest.raises(TypeError, match="need \\['blur_radius'\\]"):
        runa.make_settings(lam=0.5)
    table = runa.make_settings(defaults())  # the table's values; other keys ignored
    assert table == RunaSettings(lam=0.5, blur_radius=1.0)
    with pytest.raises(dataclasses.FrozenInstanceError):
        table.lam = 0.1
    with pytest.raises(ValueError, match="lam must be a number"):
        RunaSettings(lam=2.0, blur_radius=1.0)
    for name in ("uni-ood", "tagood"):
        assert dataclasses.fields(get_method(name).Settings) == () and get_method(name).make_settings(defaults())
    sc = OodScorer(tiny_encoder, "voc", settings=RunaSettings(lam=0.3, blur_radius=2.0))
    assert sc.lam == 0.3 and sc.blur_radius == 2.0 and sc.settings == OodScorer(
        tiny_encoder, "voc", settings=get_method("runa").make_settings(lam=0.3, blur_radius=2.0)).settings
    with pytest.raises(TypeError, match="takes RunaSettings"):
        OodScorer(tiny_encoder, "voc", method="runa", settings=get_method("tagood").make_settings())
    assert sc.method.identity("regional") == {"lam": 1.0, "blur_radius": None, "projection": "off-the-shelf",
                                              "method": "runa", "head": "off-the-shelf"}
    assert sc.method.with_settings(lam=0.7, frame_size=3) == RunaSettings(lam=0.7, blur_radius=2.0)


def test_box_features_carry_image_size_views_and_no_runa_aliases(tiny_encoder):
    sc = OodScorer(tiny_encoder, "voc")
    img = _image()
    feats = sc.encode(img, BOXES + [[0, 0, 0, 0]])
    assert feats.views == ("regional", "global") and set(feats.data) == {"regional.cls", "global.cls"}
    assert not hasattr(feats, "f_r") and not hasattr(feats, "f_g")  # RUNA's features: read by their keys
    assert feats.image_wh.tolist() == [[128, 96]] * 4
    assert torch.isnan(feats.data["regional.cls"][3]).all() and feats.status[3] == BoxStatus.ZERO_AREA
    other = sc.encode(_image(48, 64), [[1, 1, 30, 30]])
    joined = BoxFeatures.concat([feats, other, BoxFeatures.unscored(2, tiny_encoder.width)])
    assert joined.image_wh.tolist() == [[128, 96]] * 4 + [[64, 48]] + [[-1, -1]] * 2
    with pytest.raises(ValueError, match="views must be a non-empty subset of \\('regional', 'global'\\)"):
        sc.encode(img, BOXES, views=("background",))


def test_view_maker_makes_every_kind_from_one_frame():
    S = 32
    vm = ViewMaker(S, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), blur_radius=1.0)
    img = _image()
    views = vm.make_views(img, np.asarray(BOXES, np.float32), ("regional", "global", "background", "frame"))
    r, g = vm.make(img, np.asarray(BOXES, np.float32))
    assert torch.equal(views["regional"], r) and torch.equal(views["global"], g)
    frame = views["frame"]
    assert frame.shape == (1, 3, S, S)
    bg = views["background"]
    assert bg.shape == (3, 3, S, S)
    for i, b in enumerate(BOXES):
        x0, y0, x1, y1 = vm.scaled_bounds(b, 128, 96)
        inside = torch.zeros(S, S, dtype=torch.bool)
        inside[y0:y1, x0:x1] = True
        assert (bg[i][:, inside] == 0).all()  # the box is the mean colour (0 after normalisation)
        assert torch.equal(bg[i][:, ~inside], frame[0][:, ~inside])  # the rest is the sharp frame
    with pytest.raises(ValueError, match="unknown view kinds"):
        vm.make_views(img, BOXES, ("depth",))


def test_gpu_view_maker_background_and_frame_on_cpu_match_the_cpu_maker():
    pytest.importorskip("torchvision")
    from runa_ood_node.backends.gpu_preprocess import GpuViewMaker

    S = 32
    args = (S, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), 1.0)
    img = _image()
    a = ViewMaker(*args).make_views(img, BOXES, ("background", "frame"))
    b = GpuViewMaker(*args, device="cpu").make_views(img, BOXES, ("background", "frame"))
    assert b["frame"].shape == a["frame"].shape and b["background"].shape == a["background"].shape
    assert ((a["background"] == 0) == (b["background"] == 0)).float().mean() > 0.99  # same masked blocks
    assert (a["frame"] - b["frame"]).abs().mean() < 0.1  # resize filters differ by a few grey levels


class _PairMethod(Method):
    """A method needing the crop, the masked background, the whole frame and the crop->background
    inter-image attention: checks the rows the pipeline hands it."""

    name = "runa"  # the seam needs no registration to be exercised
    views = ("regional", "background", "frame")
    outputs = ("cls", "xattn")

    def pairs(self, views):
        return (("regional", "background"),)

    def box_features(self, out, boxes_xyxy, image_wh):
        M = boxes_xyxy.shape[0]
        assert out["regional"]["cls"].shape[0] == M and out["background"]["cls"].shape[0] == M
        assert out["frame"]["cls"].shape[0] == 1
        return {"regional.cls": out["regional"]["cls"], "background.cls": out["background"]["cls"],
                "frame.cls": out["frame"]["cls"].expand(M, -1), "regional.xattn": out["xattn"][("regional", "background")]}

    def missing(self, keys, ablation, settings=None):
        return None

    def similarities(self, feats, text_emb, ablation="dual", settings=None, head=None):
        return feats["regional.cls"][:, : text_emb.shape[0]]


def test_seam_one_backend_call_for_all_views_and_pairs_of_several_frames(tiny_encoder, backbone_calls):
    sc = OodScorer(tiny_encoder, "voc")
    sc.method = _PairMethod(tiny_encoder)
    calls = backbone_calls
    img = _image()
    frames = [FrameInput(img, BOXES), FrameInput(img, [[0, 0, 0, 0]]), FrameInput(_image(48, 64), [[1, 1, 30, 30]])]
    out = sc.encode_frames(frames)
    assert len(calls) == 1
    n, outputs, pairs = calls[0]
    # frame 1: 3 crops, 3 backgrounds, 1 frame; frame 2: nothing valid; frame 3: 1 + 1 + 1
    assert n == 7 + 3 and outputs == ("cls", "xattn")
    assert pairs == [[0, 3], [1, 4], [2, 5], [7, 8]]
    assert out[1].status.tolist() == [BoxStatus.ZERO_AREA] and torch.isnan(out[1].data["regional.cls"]).all()
    # each frame's features, the inter-image attention included, equal the frame encoded alone
    for i in (0, 2):
        alone = sc.encode(frames[i].image_rgb, frames[i].boxes)
        m = len(frames[i].boxes)
        assert calls[-1][2] == [[j, m + j] for j in range(m)]
        for key in ("regional.cls", "background.cls", "frame.cls", "regional.xattn"):
            torch.testing.assert_close(out[i].data[key], alone.data[key], atol=1e-5, rtol=1e-4)
    assert out[0].data["regional.xattn"].shape == (3, 1 + tiny_encoder.grid_size ** 2)
    torch.testing.assert_close(out[0].data["regional.xattn"].sum(1), torch.ones(3))  # a softmax over keys
    res = sc.score_features(out[0])
    assert (res.status == BoxStatus.OK).all()


def test_lam_has_one_rule_in_the_constructor_and_per_call(tiny_encoder):
    sc = OodScorer(tiny_encoder, "voc", settings=_runa(lam=np.float32(0.25)))
    assert sc.lam == 0.25
    feats = sc.encode(_image(), BOXES)
    sc.score_features(feats, lam=np.float32(0.25))  # numpy numbers are numbers in both places
    for bad in (True, float("nan"), 1.5, "0.5"):
        with pytest.raises(ValueError, match="lam must be a number in \\[0, 1\\]"):
            OodScorer(tiny_encoder, "voc", settings=_runa(lam=bad))
        with pytest.raises(ValueError, match="lam must be a number in \\[0, 1\\]"):
            sc.score_features(feats, lam=bad)


# ---------------------------------------------------------------------------------------------- TagOOD
SMALL_TAGOOD = {"dim": 32, "heads": 4, "mlp": 64, "epochs": 3, "batch_size": 8}


def test_tagood_reads_one_frame_pass_and_the_boxes_selected_tokens(tiny_encoder, backbone_calls):
    from runa_ood_node.core.methods.tagood_ops import select_box_tokens

    sc = OodScorer(tiny_encoder, "voc", method="tagood")
    img = _image()
    feats = sc.encode(img, BOXES)
    assert backbone_calls == [(1, ("tokens", "attn_cls"), None)]  # ONE view for 3 boxes
    assert feats.views == ("frame",)
    frame = ViewMaker(tiny_encoder.input_size, tiny_encoder.mean, tiny_encoder.std).make_views(img, [], ("frame",))
    out = tiny_encoder.visual_outputs(frame["frame"], ("tokens", "attn_cls"))
    sel = select_box_tokens(out["attn_cls"][0], torch.tensor(BOXES, dtype=torch.float64), (128, 96),
                            tiny_encoder.grid_size)
    for i, ix in enumerate(sel):
        n = ix.numel()
        assert (~feats.data["frame.box_mask"][i]).sum() == n and feats.data["frame.box_mask"][i, n:].all()
        torch.testing.assert_close(feats.data["frame.box_tokens"][i, :n], out["tokens"][0][ix], atol=1e-5, rtol=1e-4)
    # scoring without a head is refused per frame with a message saying what to do, never a crash
    res = sc.score_features(feats)
    assert (res.status == BoxStatus.BACKEND_ERROR).all() and "needs a trained head" in res.error


def test_tagood_head_fit_round_trip_and_scores_are_minus_max_centre_cosine(tmp_path, tiny_encoder):
    from runa_ood_node.core.labels import load_label_set
    from runa_ood_node.core.methods.heads import head_meta, load_head, save_head
    from runa_ood_node.core.methods.tagood_ops import tagood_similarities

    sc = OodScorer(tiny_encoder, "voc", method="tagood")
    img = _image()
    feats = sc.encode(img, BOXES * 3)
    y = torch.tensor([0, 1, 2] * 3)
    state, curve, hyper = sc.method.fit(feats.data, y, sc.text_emb, **SMALL_TAGOOD)
    assert len(curve) == 3 and state["centres"].shape == (len(sc.label_set), 4, 8)
    folder = save_head(tmp_path / "tag", "tagood", state, head_meta(tiny_encoder, load_label_set("voc"), hyper, curve))
    head = load_head(folder, method="tagood", encoder=tiny_encoder, label_set=load_label_set("voc"))
    tuned = OodScorer(tiny_encoder, "voc", method="tagood", head=head)
    res = tuned.score(img, BOXES)
    assert (res.status == BoxStatus.OK).all()
    proj, centres = tuned.method._modules
    with torch.no_grad():
        f, _ = proj(feats.data["frame.box_tokens"][:3], feats.data["frame.box_mask"][:3])
    want = tagood_similarities(f, centres).max(1)
    np.testing.assert_allclose(res.uncertainty, -want.values.numpy(), atol=1e-5)
    assert res.label_idx.tolist() == want.indices.tolist()
    from runa_ood_node.core.thresholds import fit_identity

    ident = fit_identity(tuned)
    assert ident["method"] == "tagood" and ident["head"] == f"sha256:{head.sha256}" and ident["lam"] is None
    with pytest.raises(ValueError, match="trained for method 'tagood', not 'runa'"):
        OodScorer(tiny_encoder, "voc", head=head)


# ---------------------------------------------------------------------------------------------- UNI-OOD
SMALL_COMBINER = {"channels": [8, 8, 8], "mlp_hidden": 16, "reduce_to": 8}


def test_uni_ood_reads_crop_and_background_in_one_call_with_their_pairs(tiny_encoder, backbone_calls):
    calls = backbone_calls
    sc = OodScorer(tiny_encoder, "voc", method="uni-ood")
    feats = sc.encode(_image(), BOXES)
    assert calls == [(6, ("tokens", "attn_cls", "xattn"), [[0, 3], [1, 4], [2, 5]])]
    T, W = 1 + tiny_encoder.grid_size ** 2, tiny_encoder.width
    assert feats.views == ("regional", "background")
    assert feats.data["regional.tokens"].shape == (3, T, W) and feats.data["background.tokens"].shape == (3, T, W)
    assert feats.data["regional.xattn"].shape == (3, T) and feats.data["regional.attn_cls"].shape == (3, T)
    # background "full": one whole-frame pass per image, shared by the boxes (N + 1 views)
    from runa_ood_node.core.methods.uni_ood import UniOodMethod

    sc.method = UniOodMethod(tiny_encoder, background="full")
    sc.method.prepare(sc.label_set, sc.text_emb)
    full = sc.encode(_image(), BOXES)
    assert calls[-1] == (4, ("tokens", "attn_cls", "xattn"), [[0, 3], [1, 3], [2, 3]])
    assert torch.equal(full.data["frame.tokens"][0], full.data["frame.tokens"][2])


def test_uni_ood_similarities_are_the_papers_omega_and_the_head_round_trips(tmp_path, tiny_encoder):
    from runa_ood_node.core.labels import load_label_set
    from runa_ood_node.core.methods.heads import head_meta, load_head, save_head
    from runa_ood_node.core.methods.uni_ood_ops import (background_text, background_weights, target_weights,
                                                        text_eot_attention, uni_ood_similarities)

    sc = OodScorer(tiny_encoder, "voc", method="uni-ood")
    img = _image()
    feats = sc.encode(img, BOXES * 2)
    state, curve, hyper = sc.method.fit(feats.data, torch.tensor([0, 1, 2] * 2), sc.text_emb, epochs=2,
                                        batch_size=4, combiner=SMALL_COMBINER)
    assert len(curve) == 2 and hyper["background"] == "masked" and hyper["combiner"] == SMALL_COMBINER
    voc = load_label_set("voc")
    folder = save_head(tmp_path / "uni", "uni-ood", state, head_meta(tiny_encoder, voc, hyper, curve))
    head = load_head(folder, method="uni-ood", encoder=tiny_encoder, label_set=voc)
    tuned = OodScorer(tiny_encoder, voc, method="uni-ood", head=head)
    res = tuned.score(img, BOXES)
    assert (res.status == BoxStatus.OK).all()
    # independently: inter-text background prompts from the text tower, beta * mu weights, combiners, Omega
    ids = torch.stack([tiny_encoder.tokenizer(list(p)) for p in voc.prompts()])
    bg_text = background_text(sc.text_emb, text_eot_attention(tiny_encoder.model, ids))
    tc, bc = tuned.method._modules
    P, t = tiny_encoder.proj_global, sc.text_emb
    d = {k: v[:3] for k, v in feats.data.items()}
    with torch.no_grad():
        omega = uni_ood_similarities(
            tc(d["regional.tokens"], target_weights(d["regional.attn_cls"], d["regional.tokens"], P, t)),
            bc(d["background.tokens"], background_weights(d["regional.xattn"], d["background.tokens"], P, bg_text)),
            P, t)
    np.testing.assert_allclose(res.uncertainty, -omega.max(1).values.numpy(), atol=1e-5)
    from runa_ood_node.core.thresholds import fit_identity

    assert fit_identity(tuned)["method"] == "uni-ood" and fit_identity(tuned)["head"] == f"sha256:{head.sha256}"
