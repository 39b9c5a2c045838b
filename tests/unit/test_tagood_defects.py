"""TagOOD's review defects (issue 22, items 1-3) and the small-box count, each with a test that fails on the
code before the fix: centres that stayed ~90 % random, one 224 px frame pass with no other resolution, one
token selection rule, and boxes smaller than a token that nothing counted. Tiny random models only."""
import pytest

torch = pytest.importorskip("torch")
F = torch.nn.functional

from runa_ood_node.core.boxes import BoxStatus  # noqa: E402
from runa_ood_node.core.methods.tagood import TOKENS_IN_BOX, TagOodMethod  # noqa: E402
from runa_ood_node.core.methods.tagood_ops import (ClassCentres, ema_momentum, fit_tagood,  # noqa: E402
                                                   pad_token_sets, select_box_tokens, token_alignment_score,
                                                   tokens_in_boxes)
from runa_ood_node.core.pipeline import OodScorer  # noqa: E402

from test_methods import BOXES, _image  # noqa: E402  (the methods' test frame and boxes, one copy)

SMALL = {"dim": 32, "heads": 4, "mlp": 64, "epochs": 3, "batch_size": 8}

TINY_BOX = [100, 70, 108, 78]  # 8 x 8 px of a 128 x 96 frame: between the 4 x 4 grid's centres (32 x 24 px cells)


# ---------------------------------------------------------------------------------------------- 1. centres
def _ten_shots(k=5, width=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    means = torch.randn(k, width, generator=g) * 3
    sets, labels = [], []
    for c in range(k):
        for _ in range(10):
            n = int(torch.randint(1, 7, (1,), generator=g))
            sets.append(means[c] + torch.randn(n, width, generator=g))
            labels.append(c)
    return sets, torch.tensor(labels)


def _centre_fit(**kw):
    """10 shots of 5 classes (one batch: 100 epochs = 100 EMA updates), TagOOD's default momentum 0.999."""
    k = 5
    sets, y = _ten_shots(k)
    proj, centres, _ = fit_tagood(sets, y, k, dim=32, heads=4, mlp=64, seed=0, **kw)
    tokens, mask = pad_token_sets(sets)
    with torch.no_grad():
        f = proj(tokens, mask)[0].reshape(len(sets), 4, 8)
    means = torch.stack([f[y == c].mean(0) for c in range(k)])
    start = ClassCentres(k, patterns=4, dim=32, seed=0).centres      # the Gaussian start of the same seed
    return (F.cosine_similarity(centres.centres, means, dim=-1), F.cosine_similarity(centres.centres, start, dim=-1),
            centres)


def test_centres_end_at_the_class_means_with_the_default_momentum(one_thread):
    to_means, to_start, centres = _centre_fit()
    assert centres.momentum_used == pytest.approx(0.9)           # 100 updates: time constant 10 updates
    assert float(to_means.min()) > 0.98                          # every class, every pattern
    assert float(to_start.abs().mean()) < 0.5                    # nothing of the random start is left


def test_old_rule_keeps_most_of_the_random_start(one_thread):
    """The defect itself (TagOOD's randn start, EMA 0.999 over 100 updates): the centres stay near their
    random start, so the assertions above fail on the code before the fix."""
    to_means, to_start, centres = _centre_fit(centre_init="randn", ema_span=0)
    assert centres.momentum_used == 0.999
    assert float(to_start.mean()) > 0.8
    assert float(to_means.min()) < 0.98


def test_ema_rate_from_the_number_of_updates():
    assert ema_momentum(0.999, 100, 0.1) == pytest.approx(0.9)
    assert ema_momentum(0.999, 500_000, 0.1) == 0.999             # TagOOD's ImageNet run: the paper's rate
    assert ema_momentum(0.999, 100, 0.0) == 0.999                 # ema_span 0: the rate as given
    assert ema_momentum(0.999, 5, 0.1) == 0.0                     # fewer updates than one time constant
    with pytest.raises(ValueError, match="momentum"):
        ema_momentum(1.5, 10, 0.1)
    with pytest.raises(ValueError, match="centre_init"):
        fit_tagood([torch.zeros(2, 4)], torch.tensor([0]), 1, epochs=1, centre_init="zeros")


def test_class_means_init_sets_seen_classes_only():
    cc = ClassCentres(3, patterns=2, dim=4, seed=0)
    before = cc.centres.clone()
    cc.init_from(torch.tensor([[1.0, 2, 3, 4], [3.0, 4, 5, 6]]), torch.tensor([2, 2]))
    assert cc.centres[2].tolist() == [[2.0, 3.0], [4.0, 5.0]]
    assert torch.equal(cc.centres[:2], before[:2])


def test_head_records_the_centre_rule(tiny_encoder, one_thread):
    sc = OodScorer(tiny_encoder, "voc", method="tagood")
    feats = sc.encode(_image(), BOXES * 3)
    _, _, hyper = sc.method.fit(feats.data, torch.tensor([0, 1, 2] * 3), sc.text_emb, **SMALL)
    assert hyper["centre_init"] == "class_means" and hyper["ema_span"] == 0.1 and hyper["momentum"] == 0.999
    assert hyper["momentum_used"] == pytest.approx(0.0)           # 3 updates: follow the batch
    assert hyper["selection"] == "attn" and hyper["frame_size"] == tiny_encoder.input_size and hyper["thr"] == 0.5


# ---------------------------------------------------------------------------------------------- 2. resolution
def test_embed_views_at_the_own_size_is_open_clips(tiny_encoder):
    from runa_ood_node.core.backbone import embed_views, interpolated_pos_embed

    v = tiny_encoder.model.visual
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(embed_views(v, x), v._embeds(x))
    assert interpolated_pos_embed(v, 4) is v.positional_embedding


def test_higher_resolution_equals_open_clip_built_at_that_size(tiny_encoder):
    """The frame pass at 128 px (grid 8) = open_clip's own model at 128 px with the 64 px weights loaded
    through its ``resize_pos_embed`` (bicubic): same tokens, CLS and attention."""
    import open_clip
    from open_clip.model import resize_pos_embed

    from runa_ood_node.core.backbone import backbone_forward

    big = open_clip.create_model("runa-tiny-vit", force_image_size=128).visual
    sd = {f"visual.{k}": t.clone() for k, t in tiny_encoder.model.visual.state_dict().items()}
    resize_pos_embed(sd, open_clip.create_model("runa-tiny-vit", force_image_size=128))
    big.load_state_dict({k[len("visual."):]: t for k, t in sd.items()})
    big.eval()
    x = torch.randn(1, 3, 128, 128, generator=torch.Generator().manual_seed(1))
    out = tiny_encoder.visual_outputs(x, ("cls", "tokens", "attn_cls"))
    assert out["tokens"].shape == (1, 65, tiny_encoder.width) and out["attn_cls"].shape == (1, 65)
    with torch.no_grad():
        ref = backbone_forward(big, x, ("cls", "tokens", "attn_cls"))
    for k in ("cls", "tokens", "attn_cls"):
        torch.testing.assert_close(out[k], ref[k].float(), atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="multiples of 16"):
        tiny_encoder.visual_outputs(torch.zeros(1, 3, 72, 72), ("tokens",))


def test_tagood_frame_size_one_pass_at_that_resolution(tiny_encoder, monkeypatch):
    calls = []
    real = tiny_encoder.visual_outputs
    monkeypatch.setattr(tiny_encoder, "visual_outputs",
                        lambda v, o, pairs=None, max_batch=None: calls.append(tuple(v.shape)) or real(v, o, pairs, max_batch))
    sc = OodScorer(tiny_encoder, "voc", method="tagood")
    sc.method.configure(frame_size=128)
    feats = sc.encode(_image(), BOXES + [TINY_BOX])
    assert calls == [(1, 3, 128, 128)]                           # ONE pass, at 128 px
    assert feats.data["frame.box_tokens"].shape == (4, 64, tiny_encoder.width)
    # the tiny box covers no token centre at 64 px (grid 4) but one at 128 px (grid 8, 16 x 12 px cells)
    assert feats.data[TOKENS_IN_BOX][3].item() == 1
    with pytest.raises(ValueError, match="multiple of the patch size 16"):
        sc.method.configure(frame_size=100)


def test_head_records_frame_size_and_refuses_another(tiny_encoder, tmp_path, one_thread):
    from runa_ood_node.core.labels import load_label_set
    from runa_ood_node.core.methods.heads import head_meta, load_head, save_head

    voc = load_label_set("voc")
    sc = OodScorer(tiny_encoder, "voc", method="tagood")
    sc.method.configure(frame_size=128)
    feats = sc.encode(_image(), BOXES * 3)
    state, curve, hyper = sc.method.fit(feats.data, torch.tensor([0, 1, 2] * 3), sc.text_emb, **SMALL)
    assert hyper["frame_size"] == 128 and hyper["max_tokens"] == 64
    head = load_head(save_head(tmp_path / "h", "tagood", state, head_meta(tiny_encoder, voc, hyper, curve)),
                     method="tagood", encoder=tiny_encoder, label_set=voc)
    tuned = OodScorer(tiny_encoder, "voc", method="tagood", head=head)   # the head's resolution is used
    assert tuned.method.frame_size == 128 and tuned.method.grid == 8
    res = tuned.score(_image(), BOXES + [TINY_BOX])
    assert (res.status == BoxStatus.OK).all() and res.tokens_in_box.tolist()[3] == 1 and res.boxes_below_token == 0
    with pytest.raises(ValueError, match="fitted with frame_size 128.*asked for frame_size 64"):
        TagOodMethod(tiny_encoder, head=head, frame_size=64)


def test_other_frame_size_refused_on_an_exported_backend(tiny_encoder):
    tiny_encoder.set_backend(lambda v: tiny_encoder.visual_features(v), "onnxruntime")
    try:
        with pytest.raises(ValueError, match="frame_size 128 needs the torch backend.*'onnxruntime'"):
            TagOodMethod(tiny_encoder, frame_size=128)
        assert TagOodMethod(tiny_encoder).frame_size == 64            # the default resolution still builds
        with pytest.raises(ValueError, match="torch backend only"):
            tiny_encoder.visual_outputs(torch.zeros(1, 3, 128, 128), ("tokens",))
    finally:
        tiny_encoder.set_backend(None)


# ---------------------------------------------------------------------------------------------- small boxes
def test_boxes_below_a_token_are_counted_per_frame(tiny_encoder):
    assert tokens_in_boxes(torch.tensor([TINY_BOX, BOXES[0]], dtype=torch.float64), (128, 96), 4).tolist() == [0, 4]
    sc = OodScorer(tiny_encoder, "voc", method="tagood")
    feats = sc.encode(_image(), BOXES + [TINY_BOX, [0, 0, 500, 500]])   # the last one is clipped, still fine
    res = sc.score_features(feats)                                      # no head: every box BACKEND_ERROR
    assert res.tokens_in_box.tolist()[:4] == [4.0, 2.0, 4.0, 0.0]
    assert res.boxes_below_token == 0                                   # only scored boxes count
    res.status[:] = BoxStatus.OK
    assert res.boxes_below_token == 1
    assert res.to_records()[3]["tokens_in_box"] == 0.0
    # RUNA reads no token grid: nothing to count
    assert OodScorer(tiny_encoder, "voc").score(_image(), BOXES).tokens_in_box is None


# ---------------------------------------------------------------------------------------------- 3. selection
G, FRAME = 4, (400, 200)


def test_selection_all_keeps_every_token_of_the_box():
    attn = torch.full((17,), 0.01)
    attn[2] = 5.0
    box = torch.tensor([[0.0, 0.0, 200.0, 100.0]])
    assert select_box_tokens(attn, box, FRAME, G)[0].tolist() == [2]
    assert select_box_tokens(attn, box, FRAME, G, selection="all")[0].tolist() == [1, 2, 5, 6]
    assert select_box_tokens(None, box, FRAME, G, selection="all")[0].tolist() == [1, 2, 5, 6]
    with pytest.raises(ValueError, match="unknown token selection"):
        select_box_tokens(attn, box, FRAME, G, selection="best")


def test_selection_mu_keeps_the_tokens_aligned_with_an_id_text():
    from runa_ood_node.core.methods.uni_ood_ops import token_text_alignment

    W, D = 6, 3
    proj = torch.eye(W)[:, :D]
    text = torch.tensor([[1.0, 0, 0], [0, 1.0, 0]])
    tokens = torch.zeros(17, W)
    tokens[:, 2] = 1.0                                   # aligned with no class text
    tokens[5] = torch.tensor([0.0, 1, 0.2, 0, 0, 0])     # class 1
    tokens[6] = torch.tensor([1.0, 0, 0.1, 0, 0, 0])     # class 0
    mu = token_alignment_score(tokens, proj, text)
    torch.testing.assert_close(mu, token_text_alignment(tokens[None], proj, text)[0].max(0).values)
    box = torch.tensor([[0.0, 0.0, 200.0, 100.0]])       # tokens 1, 2, 5, 6
    assert select_box_tokens(mu, box, FRAME, G, selection="mu")[0].tolist() == [5, 6]


def test_method_selection_settings_outputs_and_head(tiny_encoder, tmp_path, backbone_calls_tag, one_thread):
    from runa_ood_node.core.labels import load_label_set
    from runa_ood_node.core.methods.heads import head_meta, load_head, save_head

    voc = load_label_set("voc")
    assert TagOodMethod(tiny_encoder).selection == "attn"          # the default until measured otherwise
    for sel, outputs in (("all", ("tokens",)), ("mu", ("tokens",)), ("attn", ("tokens", "attn_cls"))):
        sc = OodScorer(tiny_encoder, "voc", method="tagood")
        sc.method.configure(selection=sel)
        backbone_calls_tag.clear()
        feats = sc.encode(_image(), BOXES * 3)
        assert backbone_calls_tag == [outputs]                    # no attention computed when nothing reads it
        n = (~feats.data["frame.box_mask"]).sum(1)
        if sel == "all":
            assert n.tolist()[:3] == feats.data[TOKENS_IN_BOX].long().tolist()[:3]
        state, curve, hyper = sc.method.fit(feats.data, torch.tensor([0, 1, 2] * 3), sc.text_emb, **SMALL)
        assert hyper["selection"] == sel
        head = load_head(save_head(tmp_path / sel, "tagood", state, head_meta(tiny_encoder, voc, hyper, curve)),
                         method="tagood", encoder=tiny_encoder, label_set=voc)
        tuned = OodScorer(tiny_encoder, "voc", method="tagood", head=head)
        assert tuned.method.selection == sel and (tuned.score(_image(), BOXES).status == BoxStatus.OK).all()
        with pytest.raises(ValueError, match="asked for selection"):
            TagOodMethod(tiny_encoder, head=head, selection="all" if sel != "all" else "attn")
    with pytest.raises(ValueError, match="no option"):
        sc.method.configure(frame_sise=128)


@pytest.fixture
def backbone_calls_tag(tiny_encoder, monkeypatch):
    calls = []
    real = tiny_encoder.visual_outputs

    def visual_outputs(views, outputs, pairs=None, max_batch=None):
        calls.append(tuple(outputs))
        return real(views, outputs, pairs=pairs, max_batch=max_batch)

    monkeypatch.setattr(tiny_encoder, "visual_outputs", visual_outputs)
    return calls


# ---------------------------------------------------------------------------------------------- the tool
def test_finetune_method_options_reach_the_head(ood_pack, tmp_path, one_thread):
    """`runa-ood finetune --method tagood --method-option frame_size=128 --method-option selection=all`: the
    head records them and a scorer built from it runs at that resolution; bad options end the run."""
    import yaml

    from runa_ood_node.tools.cli import main

    args = ["finetune", "--model", "runa-tiny-vit", "--pretrained", "none", "--allow-random-weights", "--no-progress",
            "--id-set", "voc", "--max-images", "12", "--shots", "1", "--epochs", "2", "--method", "tagood",
            "--annotations", str(ood_pack / "annotations.json")]
    out = tmp_path / "tag"
    assert main(args + ["--out", str(out), "--method-option", "frame_size=128", "--method-option", "selection=all",
                        "--method-option", "ema_span=0"]) == 0
    hyper = yaml.safe_load((out / "head.yaml").read_text())["hyper"]
    assert hyper["frame_size"] == 128 and hyper["selection"] == "all" and hyper["ema_span"] == 0.0
    assert hyper["momentum_used"] == 0.999
    assert main(args + ["--out", str(tmp_path / "bad"), "--method-option", "frame_size=100"]) != 0
    assert main(args + ["--out", str(tmp_path / "bad"), "--method-option", "colour=red"]) != 0
    # evaluate with that head: the report counts the scored boxes smaller than a token
    import json

    ev = tmp_path / "ev"
    assert main(["evaluate", "--model", "runa-tiny-vit", "--pretrained", "none", "--allow-random-weights",
                 "--no-progress", "--id-set", "voc", "--annotations", str(ood_pack / "annotations.json"),
                 "--max-images", "3", "--method", "tagood", "--head", str(out), "--out", str(ev)]) == 0
    row = json.loads((ev / "report.json").read_text())["runs"][0]
    assert row["boxes_below_token"] == sum(row["boxes_below_token_id_ood"]) >= 0
    assert row["boxes_below_token"] <= row["status_counts"].get("OK", 0)


def test_factory_refuses_frame_size_on_an_exported_backend_at_build(tiny_encoder, tmp_path, one_thread):
    """The node's path (factory.build_scorer, the backend built after the scorer): a head fitted at another
    frame_size is refused before any ONNX export, with the reason, for every backend but torch."""
    from runa_ood_node.core.labels import load_label_set
    from runa_ood_node.core.config import from_parameters
    from runa_ood_node.core.methods.heads import head_meta, save_head
    from runa_ood_node.factory import build_scorer

    voc = load_label_set("voc")
    sc = OodScorer(tiny_encoder, "voc", method="tagood")
    sc.method.configure(frame_size=128)
    feats = sc.encode(_image(), BOXES * 3)
    state, curve, hyper = sc.method.fit(feats.data, torch.tensor([0, 1, 2] * 3), sc.text_emb, **SMALL)
    folder = save_head(tmp_path / "h128", "tagood", state, head_meta(tiny_encoder, voc, hyper, curve))
    cfg = {"model": "runa-tiny-vit", "pretrained": "", "allow_random_weights": True, "method": "tagood",
           "head": str(folder), "label_set": "voc"}
    for kind in ("onnxruntime", "tensorrt", "auto"):
        with pytest.raises(ValueError, match=f"frame_size 128 needs the torch backend: the '{kind}' graph"):
            build_scorer(from_parameters({**cfg, "backend": kind}, backend_options={"cache_dir": str(tmp_path / "c")}))
    assert not (tmp_path / "c").exists()                           # refused before any export
    built = build_scorer(from_parameters({**cfg, "backend": "torch"}))
    assert built.method.frame_size == 128
