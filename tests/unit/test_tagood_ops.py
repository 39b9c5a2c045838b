"""TagOOD's math (core/methods/tagood_ops.py) on constructed tensors: token selection, centre EMA, loss,
score, projector masking, and that training lowers the loss and separates separable synthetic objects."""
import math

import pytest

torch = pytest.importorskip("torch")

from runa_ood_node.core.methods.tagood_ops import (ClassCentres, TagOODProjector, fit_tagood,  # noqa: E402
                                                   select_box_tokens, tagood_loss, tagood_similarities,
                                                   token_centres)
from runa_ood_node.core.scoring import score  # noqa: E402

G = 4
FRAME = (400, 200)  # cells of 100 x 50 px; token centres at x = 50, 150, 250, 350 and y = 25, 75, 125, 175


def _attn(values: dict) -> torch.Tensor:
    a = torch.full((1 + G * G,), 0.01)
    a[0] = 0.5  # CLS->CLS: never selectable
    for k, v in values.items():
        a[k] = v
    return a


# ------------------------------------------------------------------ selection
def test_token_centres_row_major():
    c = token_centres(FRAME, G)
    assert c.shape == (16, 2)
    assert c[0].tolist() == [50.0, 25.0] and c[1].tolist() == [150.0, 25.0] and c[4].tolist() == [50.0, 75.0]


def test_select_thresholds_min_max_normalised_attention_within_the_box():
    # box over cells (r0,c0) (r0,c1) (r1,c0) (r1,c1): tokens 1, 2, 5, 6
    attn = _attn({1: 0.1, 2: 0.4, 5: 0.3, 6: 0.2, 3: 9.0})  # token 3 lies outside the box: must not count
    box = torch.tensor([[0.0, 0.0, 200.0, 100.0]])
    # normalised: 1 -> 0, 2 -> 1, 5 -> 2/3, 6 -> 1/3
    assert select_box_tokens(attn, box, FRAME, G)[0].tolist() == [2, 5]
    assert select_box_tokens(attn, box, FRAME, G, thr=0.7)[0].tolist() == [2]
    assert select_box_tokens(attn, box, FRAME, G, thr=0.2)[0].tolist() == [2, 5, 6]
    # nothing above thr (thr >= 1): all of the box's tokens
    assert select_box_tokens(attn, box, FRAME, G, thr=1.0)[0].tolist() == [1, 2, 5, 6]


def test_select_falls_back_to_all_tokens_when_attention_is_flat():
    attn = _attn({1: 0.2, 2: 0.2, 5: 0.2, 6: 0.2})
    out = select_box_tokens(attn, torch.tensor([[0.0, 0.0, 200.0, 100.0]]), FRAME, G)
    assert out[0].tolist() == [1, 2, 5, 6]


def test_tiny_box_gets_its_nearest_token():
    centres = token_centres(FRAME, G)
    attn = _attn({})
    boxes = torch.tensor([[310.0, 160.0, 320.0, 170.0],    # between centres -> nearest is (350, 175)
                          [0.0, 0.0, 3.0, 3.0],            # top-left corner -> (50, 25)
                          [395.0, 10.0, 399.0, 12.0],      # right edge -> (350, 25)
                          [120.0, 60.0, 118.0, 58.0]])     # degenerate (x2 < x1) -> its centre's cell
    out = select_box_tokens(attn, boxes, FRAME, G)
    for box, idx in zip(boxes, out):
        centre = torch.stack([(box[0] + box[2]) / 2, (box[1] + box[3]) / 2]).double()
        nearest = int(torch.argmin(((centres - centre) ** 2).sum(1))) + 1
        assert idx.tolist() == [nearest]
    assert [o.item() for o in out] == [16, 1, 4, 6]


def test_single_point_box_on_a_centre_is_inclusive():
    out = select_box_tokens(_attn({}), torch.tensor([[150.0, 75.0, 150.0, 75.0]]), FRAME, G)
    assert out[0].tolist() == [6]


def test_select_rejects_wrong_token_count():
    with pytest.raises(ValueError, match="grid"):
        select_box_tokens(torch.zeros(10), torch.zeros(1, 4), FRAME, G)


# ------------------------------------------------------------------ centres, loss, score
def test_centre_ema_update_exact_numbers():
    cc = ClassCentres(3, patterns=2, dim=4, seed=0)
    cc.centres.copy_(torch.tensor([[[1.0, 2.0], [3.0, 4.0]],
                                   [[5.0, 6.0], [7.0, 8.0]],
                                   [[0.0, 0.0], [0.0, 10.0]]]))
    feat = torch.tensor([[10.0, 0.0, 0.0, 0.0],      # class 0
                         [0.0, 10.0, 20.0, 0.0],     # class 0
                         [1.0, 1.0, 1.0, 1.0]], requires_grad=True)  # class 2
    cc.update(feat, torch.tensor([0, 0, 2]), momentum=0.9)
    # class 0: 0.9 * C0 + 0.1 * mean([10,0,0,0], [0,10,20,0]) = 0.9 * C0 + 0.1 * [5,5,10,0]
    assert torch.allclose(cc.centres[0], torch.tensor([[1.4, 2.3], [3.7, 3.6]]))
    assert torch.equal(cc.centres[1], torch.tensor([[5.0, 6.0], [7.0, 8.0]]))      # not in the batch
    assert torch.allclose(cc.centres[2], torch.tensor([[0.1, 0.1], [0.1, 9.1]]))
    assert not cc.centres.requires_grad


def test_centres_default_shape_is_k_by_4_by_128_and_gaussian():
    cc = ClassCentres(5)
    assert cc.centres.shape == (5, 4, 128)
    assert abs(float(cc.centres.mean())) < 0.1 and abs(float(cc.centres.std()) - 1.0) < 0.1
    assert torch.equal(ClassCentres(5, seed=3).centres, ClassCentres(5, seed=3).centres)


def test_tagood_loss_hand_computed():
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    labels = torch.tensor([0, 0])
    centres = torch.tensor([[[1.0, 1.0], [0.0, 0.0]], [[9.0, 9.0], [9.0, 9.0]]])  # [K=2, 2, 2]
    feat = torch.tensor([[1.0, 3.0, 2.0, 0.0], [1.0, 1.0, 0.0, 0.0]])
    ce = ((-2.0 + math.log(math.exp(2.0) + 1.0)) + (-0.0 + math.log(1.0 + math.exp(1.0)))) / 2
    # sample 0: pattern 0 mean((0, 2)^2) = 2, pattern 1 mean((2, 0)^2) = 2 -> 4; sample 1: 0 -> batch mean 2
    mse = (4.0 + 0.0) / 2
    got = tagood_loss(logits, feat, labels, centres, mse_weight=0.1)
    assert got.item() == pytest.approx(ce + 0.1 * mse, rel=1e-6)
    assert tagood_loss(logits, feat, labels, centres, mse_weight=0.0).item() == pytest.approx(ce, rel=1e-6)


def test_similarities_mean_over_patterns_of_cosine_and_runa_uncertainty():
    centres = torch.tensor([[[1.0, 0.0], [0.0, 1.0]],
                            [[0.0, 1.0], [1.0, 0.0]]])
    feat = torch.tensor([[1.0, 0.0, 0.0, 2.0],      # C0: cos 1, 1 -> 1 ; C1: 0, 0 -> 0
                         [1.0, 1.0, 0.0, -1.0]])    # C0: 1/sqrt2, -1 ; C1: 1/sqrt2, 0
    s = tagood_similarities(feat, centres)
    r = 1 / math.sqrt(2)
    assert torch.allclose(s, torch.tensor([[1.0, 0.0], [(r - 1) / 2, r / 2]]), atol=1e-6)
    out = score(s, "runa")
    assert out.uncertainty.tolist() == pytest.approx([-1.0, -r / 2], abs=1e-6)
    assert out.label_idx.tolist() == [0, 1]
    # ClassCentres' own forward is the same function; the scale of f does not matter
    cc = ClassCentres(2, patterns=2, dim=4)
    cc.centres.copy_(centres)
    assert torch.allclose(cc(3.0 * feat), s, atol=1e-6)


# ------------------------------------------------------------------ projector
def test_projector_shapes_and_padding_is_ignored():
    torch.manual_seed(0)
    p = TagOODProjector(16, 3, dim=32, heads=4, mlp=64, max_tokens=8).eval()
    tokens = torch.randn(2, 5, 16)
    mask = torch.tensor([[False, False, True, True, True], [False] * 5])
    feat, logits = p(tokens, mask)
    assert feat.shape == (2, 32) and logits.shape == (2, 3)
    other = tokens.clone()
    other[0, 2:] = 1e3 * torch.randn(3, 16)           # change only the padded tokens of object 0
    feat2, _ = p(other, mask)
    assert torch.allclose(feat2[0], feat[0], atol=1e-5)
    assert torch.allclose(feat2[1], feat[1], atol=1e-5)
    # the unpadded tokens do matter
    other[0, 0] += 1.0
    assert not torch.allclose(p(other, mask)[0][0], feat[0], atol=1e-4)
    with pytest.raises(ValueError, match="max_tokens"):
        p(torch.randn(1, 9, 16))


def test_projector_default_architecture():
    p = TagOODProjector(768, 20)
    assert p.image_proj.out_features == 512 and len(p.blocks) == 2
    blk = p.blocks[0]
    assert blk.self_attn.num_heads == 8 and blk.linear1.out_features == 2048 and blk.norm_first
    assert p.classifier.out_features == 20


# ------------------------------------------------------------------ training
def _synthetic(k: int, per_class: int, width: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    means = 3.0 * torch.randn(k + 1, width, generator=torch.Generator().manual_seed(99))  # last = OOD
    sets, labels = [], []
    for c in range(k + 1):
        for _ in range(per_class):
            n = int(torch.randint(1, 7, (1,), generator=g))
            sets.append(means[c] + torch.randn(n, width, generator=g))
            labels.append(c)
    return sets, torch.tensor(labels)


def test_fit_lowers_loss_and_separates_synthetic_classes(one_thread):
    k, width = 3, 16
    sets, labels = _synthetic(k, 12, width, seed=1)
    id_sets = [s for s, y in zip(sets, labels) if y < k]
    id_labels = labels[labels < k]
    # TagOOD's default momentum (0.999; was 0.9 here, which hid centres that stayed ~90 % random):
    # the EMA rate is capped by the number of updates, the centres start at the class means
    kw = dict(epochs=40, batch=16, lr=1e-3, dim=32, heads=4, mlp=64, dropout=0.0, seed=0)
    proj, centres, curve = fit_tagood(id_sets, id_labels, k, **kw)
    assert len(curve) == 40 and all(math.isfinite(v) for v in curve)
    assert curve[-1] < 0.5 * curve[0]
    assert not proj.training
    assert proj.max_tokens >= 1024       # a box larger than any training box still fits (G*G <= 1024)

    test_sets, test_labels = _synthetic(k, 6, width, seed=2)   # fresh samples of the same clusters
    from runa_ood_node.core.methods.tagood_ops import pad_token_sets

    tokens, mask = pad_token_sets(test_sets)
    with torch.no_grad():
        feat, _ = proj(tokens, mask)
    sims = tagood_similarities(feat, centres)
    unc = torch.as_tensor(score(sims, "runa").uncertainty)
    # the centres end at the ID class means of the trained features (each class, each pattern)
    with torch.no_grad():
        ftr = proj(*pad_token_sets(id_sets))[0].reshape(len(id_sets), 4, 8)
    means = torch.stack([ftr[id_labels == c].mean(0) for c in range(k)])
    assert float(torch.nn.functional.cosine_similarity(centres.centres, means, dim=-1).min()) > 0.95
    is_id = test_labels < k
    acc = (sims[is_id].argmax(1) == test_labels[is_id]).float().mean().item()
    assert acc >= 0.9
    # the unseen cluster is further from every centre than the ID objects are from theirs
    assert unc[~is_id].mean() > unc[is_id].mean()

    # same seed, same inputs -> the same head; the global RNG is untouched
    state = torch.get_rng_state()
    runs = [fit_tagood(id_sets, id_labels, k, **dict(kw, epochs=2)) for _ in range(2)]
    assert torch.equal(torch.get_rng_state(), state)
    assert runs[0][2] == runs[1][2] and torch.equal(runs[0][1].centres, runs[1][1].centres)


def test_fit_rejects_bad_labels():
    with pytest.raises(ValueError, match="labels"):
        fit_tagood([torch.zeros(2, 4)], torch.tensor([3]), 2, epochs=1)
    with pytest.raises(ValueError, match="token sets"):
        fit_tagood([torch.zeros(2, 4)], torch.tensor([0, 1]), 2, epochs=1)
