"""UNI-OOD's math (core/methods/uni_ood_ops.py) on constructed tensors: beta * mu weights, inter-text
aggregation (and the text tower re-run on the tiny open_clip model), the combiner's shape and commutation,
the score, the contrastive loss, and that training lowers the loss and separates separable synthetic objects."""
import math

import pytest

torch = pytest.importorskip("torch")

from runa_ood_node.core.methods.uni_ood_ops import (Combiner, background_text, background_weights,  # noqa: E402
                                                    clip_contrastive_loss, context_counts, exclusion_counts,
                                                    fit_uni_ood, inter_text_weights, target_weights,
                                                    text_eot_attention, uni_ood_similarities)
from runa_ood_node.core.scoring import score  # noqa: E402

R2 = 1 / math.sqrt(2)


# ------------------------------------------------------------------ beta * mu
def _small():
    tokens = torch.tensor([[[1.0, 0.0], [1.0, 1.0], [-1.0, 0.5]]])     # [M=1, T=3, W=2]
    attn = torch.tensor([[0.5, 0.3, 0.2]])
    text = torch.tensor([[2.0, 0.0], [0.0, 1.0]])                       # not normalised on purpose
    return tokens, attn, text


def test_target_weights_beta_times_mu_hand_computed():
    tokens, attn, text = _small()
    w = target_weights(attn, tokens, torch.eye(2), text)
    assert w.shape == (1, 2, 3)
    c = 0.5 / math.sqrt(1.25)
    # class 0: mu = (1, 1/sqrt2, max(-1/sqrt1.25, 0) = 0); class 1: mu = (0, 1/sqrt2, 0.5/sqrt1.25)
    assert torch.allclose(w[0, 0], torch.tensor([0.5, 0.3 * R2, 0.0]), atol=1e-6)
    assert torch.allclose(w[0, 1], torch.tensor([0.0, 0.3 * R2, 0.2 * c]), atol=1e-6)


def test_weights_use_the_projection():
    tokens, attn, text = _small()
    swap = torch.tensor([[0.0, 1.0], [1.0, 0.0]])                       # P swaps the two axes
    w = target_weights(attn, tokens, swap, text)
    c = 0.5 / math.sqrt(1.25)
    # projected tokens (0,1), (1,1), (0.5,-1): class 0 mu = (0, 1/sqrt2, 0.5/sqrt1.25), class 1 (1, 1/sqrt2, 0)
    assert torch.allclose(w[0, 0], torch.tensor([0.0, 0.3 * R2, 0.2 * c]), atol=1e-6)
    assert torch.allclose(w[0, 1], torch.tensor([0.5, 0.3 * R2, 0.0]), atol=1e-6)


def test_background_weights_use_inter_image_attention_and_background_text():
    tokens, _, text = _small()
    xattn = torch.tensor([[0.1, 0.1, 0.8]])
    bg_text = text.flip(0)                                             # row k is class k's background text
    w = background_weights(xattn, tokens, torch.eye(2), bg_text)
    c = 0.5 / math.sqrt(1.25)
    assert torch.allclose(w[0, 0], torch.tensor([0.0, 0.1 * R2, 0.8 * c]), atol=1e-6)
    assert torch.allclose(w[0, 1], torch.tensor([0.1, 0.1 * R2, 0.0]), atol=1e-6)
    with pytest.raises(ValueError):
        background_weights(xattn[:, :2], tokens, torch.eye(2), bg_text)


# ------------------------------------------------------------------ inter-text aggregation
def test_background_text_one_hot_picks_the_prompt_and_weights_mix():
    text = torch.tensor([[3.0, 0.0, 0.0], [0.0, 2.0, 0.0], [0.0, 0.0, 1.0]])
    perm = torch.tensor([[0.0, 0.0, 1.0], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    assert torch.allclose(background_text(text, perm), torch.eye(3)[[2, 0, 1]])
    w = torch.tensor([[0.5, 0.25, 0.25], [0.2, 0.6, 0.2], [1 / 3, 1 / 3, 1 / 3]])
    bg = background_text(text, w)
    # normalised texts are the unit axes: row k = normalize(w[k])
    assert torch.allclose(bg, torch.nn.functional.normalize(w, dim=1), atol=1e-6)
    assert torch.allclose(bg.norm(dim=1), torch.ones(3))
    # per-object weights [N, K, K] give per-object texts [N, K, D]; a zero row gives a zero text
    wn = torch.stack([w, torch.zeros(3, 3)])
    bn = background_text(text, wn)
    assert bn.shape == (2, 3, 3) and torch.allclose(bn[0], bg) and torch.equal(bn[1], torch.zeros(3, 3))


def test_inter_text_weights_softmax_over_the_members_of_each_term_then_mean():
    """Exclusion and subsets are exact: the softmax of every layer/head term runs over the background's members
    only (counts weigh duplicates), THEN the terms are averaged (not the renormalised average over all)."""
    lg = torch.tensor([[[0.0, 1.0, 2.0], [1.0, 0.0, 0.0], [3.0, 0.0, 1.0]],
                       [[2.0, 0.0, 0.0], [0.0, 2.0, 1.0], [0.0, 1.0, 0.0]]])          # [T=2, K=3, K=3]
    sm = lambda v: torch.softmax(torch.tensor(v), 0)  # noqa: E731
    full = inter_text_weights(lg)
    assert torch.allclose(full, lg.softmax(-1).mean(0))
    ex = inter_text_weights(lg, exclusion_counts(3, True))
    # row 0 without prompt 0: terms (1, 2) and (0, 0)
    row0 = 0.5 * (sm([1.0, 2.0]) + sm([0.0, 0.0]))
    assert torch.allclose(ex[0], torch.cat([torch.zeros(1), row0]), atol=1e-6)
    renorm = full[0, 1:] / full[0, 1:].sum()
    assert not torch.allclose(row0, renorm, atol=1e-3)   # the old renormalisation was an approximation
    assert torch.allclose(ex.diagonal(), torch.zeros(3)) and torch.allclose(ex.sum(1), torch.ones(3))
    # one image's other objects: two of class 2, none of class 1 -> only prompts 0 and 2, class 2 counted twice
    sub = inter_text_weights(lg, torch.tensor([1.0, 0.0, 2.0]))
    r = 0.5 * (sm([0.0, 2.0 + math.log(2)]) + sm([2.0, math.log(2)]))
    assert torch.allclose(sub[0], torch.tensor([r[0], 0.0, r[1]]), atol=1e-6)
    # per-object counts [N, K, K]; an empty background row is zeros
    per = inter_text_weights(lg, torch.stack([torch.ones(3, 3), torch.zeros(3, 3)]))
    assert torch.allclose(per[0], full) and torch.equal(per[1], torch.zeros(3, 3))
    assert exclusion_counts(3, False) is None
    with pytest.raises(ValueError, match="two prompts"):
        exclusion_counts(1, True)


def test_context_counts_from_the_other_objects_and_the_alone_fallback():
    counts, alone = context_counts([[2, 2, 0], [], [1]], 3)
    assert alone == 1 and counts.shape == (3, 3, 3)
    assert torch.equal(counts[0], torch.tensor([1.0, 0.0, 2.0]).expand(3, 3))
    assert torch.equal(counts[1], 1.0 - torch.eye(3))      # alone: every prompt but the candidate's own
    assert torch.equal(counts[2], torch.tensor([0.0, 1.0, 0.0]).expand(3, 3))
    with pytest.raises(ValueError, match="outside"):
        context_counts([[3]], 3)


@pytest.fixture(scope="module")
def tiny_clip(tiny_encoder):
    return tiny_encoder.model, tiny_encoder.tokenizer


def test_text_eot_attention_reproduces_the_towers_features(tiny_clip):
    model, tok = tiny_clip
    ids = tok(["a photo of a car", "a photo of a dog", "a photo of a person", "a photo of a car"])
    w, feats = text_eot_attention(model, ids, return_features=True)
    with torch.no_grad():
        ref = model.encode_text(ids).float()
    assert torch.allclose(feats, ref, atol=1e-5, rtol=1e-4)
    assert w.shape == (4, 4)
    assert (w >= 0).all() and torch.allclose(w.sum(1), torch.ones(4), atol=1e-6)
    # prompts 0 and 3 are the same text: the same query row and the same key column
    assert torch.allclose(w[0], w[3], atol=1e-6)
    assert torch.allclose(w[:, 0], w[:, 3], atol=1e-6)
    assert not torch.allclose(w[0], w[1], atol=1e-4)
    # a DualEncoder works as well (its .model), and rows of the per-template form average the templates
    w2 = text_eot_attention(type("Holder", (), {"model": model})(), ids)
    assert torch.allclose(w2, w)
    ids2 = tok(["a car", "a dog", "a person", "a car"])
    wp = text_eot_attention(model, torch.stack([ids, ids2], dim=1))
    assert torch.allclose(wp, 0.5 * (w + text_eot_attention(model, ids2)), atol=1e-6)


def test_text_eot_attention_picks_the_eot_positions(tiny_clip):
    """Changing a token AFTER the [EOT] (padding) changes nothing; changing one before it changes W."""
    model, tok = tiny_clip
    ids = tok(["a photo of a car", "a red bus"])
    w = text_eot_attention(model, ids)
    eot = ids.argmax(-1)
    padded = ids.clone()
    padded[0, eot[0] + 1] = 500                                        # causal mask: invisible to the EOT
    assert torch.allclose(text_eot_attention(model, padded), w, atol=1e-6)
    changed = ids.clone()
    changed[0, 1] = 500
    assert not torch.allclose(text_eot_attention(model, changed), w, atol=1e-5)


# ------------------------------------------------------------------ combiner
def _naive_combiner(c: Combiner, tokens, weights):
    """Weight first, per class, then every layer in the paper's order (no once-per-box reduction)."""
    m, t, wd = tokens.shape
    k = weights.shape[1]
    w = weights * c.weight_scale
    weighted = w[..., None] * tokens[:, None]                            # [M, K, T, W]
    patches = c.reduce(weighted[:, :, 1:]).reshape(m * k, c.grid, c.grid, -1).permute(0, 3, 1, 2)
    pooled = c.cnn(patches).mean(dim=(2, 3)).reshape(m, k, -1)
    z = c.mlp_out(torch.nn.functional.gelu(c.mlp_cls(weighted[:, :, 0]) + c.mlp_grid(pooled)))
    return z + weighted[:, :, 0] if c.residual else z


@pytest.mark.parametrize("residual", [False, True])
def test_combiner_shape_and_reduction_commutes_with_the_weighting(residual):
    torch.manual_seed(0)
    g, width, m, k = 3, 12, 2, 5
    c = Combiner(width, g, channels=(6, 7, 8), reduce_to=5, mlp_hidden=9, residual=residual).eval()
    if residual:  # the zero-initialised last layer would hide the MLP: give it weights
        torch.nn.init.normal_(c.mlp_out.weight)
        torch.nn.init.normal_(c.mlp_out.bias)
    tokens = torch.randn(m, 1 + g * g, width)
    weights = torch.rand(m, k, 1 + g * g)
    with torch.no_grad():
        z = c(tokens, weights)
        ref = _naive_combiner(c, tokens, weights)
        assert z.shape == (m, k, width)
        assert torch.allclose(z, ref, atol=1e-5)
        # each class's output depends only on its own weights
        assert torch.allclose(c(tokens, weights[:, 3:4])[:, 0], z[:, 3], atol=1e-6)
        # the weights matter (a real check: zero weights on the patches change the output)
        w2 = weights.clone()
        w2[:, :, 1:] = 0
        assert not torch.allclose(c(tokens, w2), z, atol=1e-4)
    with pytest.raises(ValueError, match="tokens"):
        c(torch.randn(m, 5, width), weights)


def test_untrained_residual_combiner_returns_the_weighted_cls():
    c = Combiner(8, 2)
    tokens = torch.randn(3, 5, 8)
    weights = torch.rand(3, 4, 5)
    with torch.no_grad():
        z = c(tokens, weights)
    assert torch.allclose(z, 5.0 * weights[:, :, :1] * tokens[:, None, 0], atol=1e-6)


# ------------------------------------------------------------------ score, loss
def test_similarities_cosine_of_the_summed_projection_per_candidate_class():
    text = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    zt = torch.zeros(2, 3, 2)
    zb = torch.zeros(2, 3, 2)
    zt[0, 0] = torch.tensor([1.0, 1.0]); zb[0, 0] = torch.tensor([1.0, -1.0])   # sum (2, 0) vs t0: 1
    zt[0, 1] = torch.tensor([1.0, 0.0])                                         # vs t1: 0
    zt[0, 2] = torch.tensor([0.0, -3.0])                                        # vs t2: -1/sqrt2
    zt[1] = torch.tensor([0.0, 1.0]); zb[1] = torch.tensor([0.0, 1.0])          # (0, 2) for every class
    om = uni_ood_similarities(zt, zb, torch.eye(2), text)
    assert torch.allclose(om, torch.tensor([[1.0, 0.0, -R2], [0.0, 1.0, R2]]), atol=1e-6)
    out = score(om, "runa")
    assert out.uncertainty.tolist() == pytest.approx([-1.0, -1.0], abs=1e-6)
    # P applies to the sum: a P that swaps the axes swaps the answers
    swap = torch.tensor([[0.0, 1.0], [1.0, 0.0]])
    assert torch.allclose(uni_ood_similarities(zt, zb, swap, text)[0, :2], torch.tensor([0.0, 1.0]), atol=1e-6)


def test_clip_contrastive_loss_hand_computed():
    img = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    txt = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    t = 0.5
    # cos: [[1, 1/sqrt2], [0, 1/sqrt2]] / t
    s = [[1 / t, R2 / t], [0.0, R2 / t]]
    lse = lambda a, b: math.log(math.exp(a) + math.exp(b))  # noqa: E731
    l_img = ((lse(*s[0]) - s[0][0]) + (lse(*s[1]) - s[1][1])) / 2
    l_txt = ((lse(s[0][0], s[1][0]) - s[0][0]) + (lse(s[0][1], s[1][1]) - s[1][1])) / 2
    assert clip_contrastive_loss(img, txt, t).item() == pytest.approx((l_img + l_txt) / 2, rel=1e-6)


def test_clip_contrastive_loss_duplicate_texts_equal_uniform_same_class_targets():
    """Objects of one class share their text: the one-hot loss then equals uniform targets over the
    same-class pairs (so no de-duplication is needed), in value and in gradient."""
    img = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]], requires_grad=True)
    txt = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])      # objects 0 and 1 share class 0's text
    t = 0.5
    cos = torch.nn.functional.normalize(img, dim=1) @ torch.nn.functional.normalize(txt, dim=1).T / t
    tgt = torch.tensor([[0.5, 0.5, 0.0], [0.5, 0.5, 0.0], [0.0, 0.0, 1.0]])
    expect = 0.5 * (-(tgt * cos.log_softmax(1)).sum(1).mean() - (tgt * cos.T.log_softmax(1)).sum(1).mean())
    got = clip_contrastive_loss(img, txt, t)
    assert got.item() == pytest.approx(expect.item(), rel=1e-6)
    g_got, = torch.autograd.grad(got, img, retain_graph=True)
    g_exp, = torch.autograd.grad(expect, img)
    assert torch.allclose(g_got, g_exp, atol=1e-6)
    with pytest.raises(ValueError, match="temperature"):
        clip_contrastive_loss(img, txt, 0.0)
    with pytest.raises(ValueError):
        clip_contrastive_loss(img, txt[:2], t)


# ------------------------------------------------------------------ training
K, G, WIDTH, D = 3, 3, 16, 8


def _problem():
    gen = torch.Generator().manual_seed(3)
    proj = torch.randn(WIDTH, D, generator=gen)
    text = torch.nn.functional.normalize(torch.randn(K, D, generator=gen), dim=1)
    return proj, text, background_text(text, torch.full((K, K), 1.0 / K))


def _synthetic(proj, text, per_class, seed):
    """Objects of K ID classes and one unseen class (label K): every crop token is its class's mean plus
    noise; the means project onto their class text (as CLIP's tokens align with their class's prompt) plus
    a larger random part; the background is one scene for all (it carries no class, and ten-shot random
    backgrounds would only give the background combiner noise to memorise)."""
    gen = torch.Generator().manual_seed(seed)
    fixed = torch.Generator().manual_seed(7)
    dirs = torch.cat([text, torch.nn.functional.normalize(torch.randn(1, D, generator=fixed), dim=1)])
    means = dirs @ torch.linalg.pinv(proj)
    means = 3.0 * means / means.norm(dim=1, keepdim=True) + 2.0 * torch.randn(K + 1, WIDTH, generator=fixed)
    t = 1 + G * G
    y = torch.arange(K + 1).repeat_interleave(per_class)
    tok = means[y][:, None] + torch.randn(len(y), t, WIDTH, generator=gen)
    bg = torch.randn(1, t, WIDTH, generator=fixed) + 0.1 * torch.randn(len(y), t, WIDTH, generator=gen)
    attn = torch.softmax(torch.randn(len(y), t, generator=gen), dim=1)
    xattn = torch.softmax(torch.randn(len(y), t, generator=gen), dim=1)
    return tok, attn, bg, xattn, y


FIT = dict(epochs=30, batch=12, lr=1e-2, temperature=0.1, seed=0,
           combiner_kwargs=dict(channels=(8, 8, 8), reduce_to=8, mlp_hidden=32))


def test_fit_lowers_loss_and_separates_synthetic_classes(one_thread):
    proj, text, bg_text = _problem()
    tok, attn, bg, xattn, y = _synthetic(proj, text, 12, seed=1)
    idm = y < K
    tc, bc, curve = fit_uni_ood(tok[idm], attn[idm], bg[idm], xattn[idm], y[idm], proj, text, bg_text, G, **FIT)
    assert len(curve) == 30 and all(math.isfinite(v) for v in curve)
    assert curve[-1] < 0.6 * curve[0]
    assert not tc.training and not bc.training

    # inference: every candidate class, K combiner passes per box, on fresh objects of the same clusters
    tok2, attn2, bg2, xattn2, y2 = _synthetic(proj, text, 8, seed=2)
    with torch.no_grad():
        zt = tc(tok2, target_weights(attn2, tok2, proj, text))
        zb = bc(bg2, background_weights(xattn2, bg2, proj, bg_text))
    om = uni_ood_similarities(zt, zb, proj, text)
    assert om.shape == (len(y2), K)
    idm2 = y2 < K
    acc = (om[idm2].argmax(1) == y2[idm2]).float().mean().item()
    assert acc >= 0.9
    # ... which the untrained combiners (the weighted CLS alone) do not reach
    tc0, bc0, _ = fit_uni_ood(tok[idm], attn[idm], bg[idm], xattn[idm], y[idm], proj, text, bg_text, G,
                              **dict(FIT, epochs=0))
    with torch.no_grad():
        om0 = uni_ood_similarities(tc0(tok2, target_weights(attn2, tok2, proj, text)),
                                   bc0(bg2, background_weights(xattn2, bg2, proj, bg_text)), proj, text)
    assert (om0[idm2].argmax(1) == y2[idm2]).float().mean().item() < acc - 0.2
    unc = torch.as_tensor(score(om, "runa").uncertainty)
    assert unc[~idm2].mean() > unc[idm2].mean() + 0.1     # the unseen class is less certain

    # same seed, same inputs -> the same curve; the global RNG is untouched
    short = dict(FIT, epochs=2)
    state = torch.get_rng_state()
    runs = [fit_uni_ood(tok[idm], attn[idm], bg[idm], xattn[idm], y[idm], proj, text, bg_text, G, **short)[2]
            for _ in range(2)]
    assert torch.equal(torch.get_rng_state(), state) and runs[0] == runs[1]


def test_fit_own_pairing_trains_the_own_class_embedding(one_thread):
    """``pairing="own"`` (each object embedded once, for its own class) also lowers its loss."""
    proj, text, bg_text = _problem()
    tok, attn, bg, xattn, y = _synthetic(proj, text, 12, seed=1)
    idm = y < K
    _, _, curve = fit_uni_ood(tok[idm], attn[idm], bg[idm], xattn[idm], y[idm], proj, text, bg_text, G,
                              **dict(FIT, epochs=8, pairing="own"))
    assert curve[-1] < curve[0]
    with pytest.raises(ValueError, match="pairing"):
        fit_uni_ood(tok[idm], attn[idm], bg[idm], xattn[idm], y[idm], proj, text, bg_text, G,
                    **dict(FIT, epochs=1, pairing="mine"))


def test_fit_rejects_bad_input():
    t = torch.zeros(2, 5, 4)
    a = torch.full((2, 5), 0.2)
    with pytest.raises(ValueError, match="labels"):
        fit_uni_ood(t, a, t, a, torch.tensor([0, 5]), torch.eye(4), torch.eye(4)[:2], torch.eye(4)[:2], 2, epochs=1)
    bad = t.clone()
    bad[0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        fit_uni_ood(bad, a, t, a, torch.tensor([0, 1]), torch.eye(4), torch.eye(4)[:2], torch.eye(4)[:2], 2, epochs=1)
