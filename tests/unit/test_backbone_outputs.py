"""The backbone's named outputs (``cls``, ``tokens``, ``attn_cls``, ``xattn``) on the torch path,
checked against an INDEPENDENT plain re-implementation of the open_clip ViT forward written here
(patchify by reshaping, class + positional embedding, ln_pre, per block ln_1 / q,k,v by hand /
softmax / out projection / ln_2 / MLP, ln_post) in float64 from the state dict, not the project's
code. Random weights: these tests check arithmetic and plumbing, never detection quality."""
import math
import os

import pytest

torch = pytest.importorskip("torch")

from runa_ood_node.core.backbone import output_set, output_set_tag, run_chunked  # noqa: E402
from runa_ood_node.core.registry import BACKBONE_OUTPUTS  # noqa: E402

ALL = ("cls", "tokens", "attn_cls", "xattn")


# ---------------------------------------------------------------------- the independent reference
def _ln(x, w, b, eps=1e-5):
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + eps) * w + b


def plain_vit(model, views, pairs):
    """open_clip ViT forward by hand, float64: returns cls [B,W], tokens [B,T,W], attn_cls [B,T], xattn [P,T]."""
    visual = model.visual
    sd = {k: v.detach().to(torch.float64) for k, v in visual.state_dict().items()}
    heads = visual.transformer.resblocks[0].attn.num_heads
    quick = type(visual.transformer.resblocks[0].mlp.gelu).__name__ == "QuickGELU"
    L = len(visual.transformer.resblocks)
    wconv = sd["conv1.weight"]                     # [W, 3, p, p], no bias
    W, p = wconv.shape[0], wconv.shape[-1]
    x = views.to(torch.float64)
    B, S = x.shape[0], x.shape[-1]
    G = S // p
    patches = x.reshape(B, 3, G, p, G, p).permute(0, 2, 4, 1, 3, 5).reshape(B, G * G, 3 * p * p)
    z = patches @ wconv.reshape(W, -1).T                                  # [B, G*G, W]
    z = torch.cat([sd["class_embedding"].expand(B, 1, W), z], 1) + sd["positional_embedding"]
    z = _ln(z, sd["ln_pre.weight"], sd["ln_pre.bias"])
    T, d = z.shape[1], W // heads
    attn_cls = torch.zeros(B, T, dtype=torch.float64)
    xattn = torch.zeros(len(pairs), T, dtype=torch.float64)
    for layer in range(L):
        g = lambda n: sd[f"transformer.resblocks.{layer}.{n}"]  # noqa: E731
        h = _ln(z, g("ln_1.weight"), g("ln_1.bias"))
        qkv = h @ g("attn.in_proj_weight").T + g("attn.in_proj_bias")
        q, k, v = (t.reshape(B, T, heads, d).transpose(1, 2) for t in qkv.split(W, dim=-1))  # [B,H,T,d]
        a = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d), dim=-1)                    # [B,H,T,T]
        attn_cls += a[:, :, 0, :].mean(1)
        for i, (qi, ki) in enumerate(pairs):
            xa = torch.softmax(q[qi, :, :1, :] @ k[ki].transpose(-1, -2) / math.sqrt(d), dim=-1)  # [H,1,T]
            xattn[i] += xa[:, 0, :].mean(0)
        o = (a @ v).transpose(1, 2).reshape(B, T, W)
        z = z + o @ g("attn.out_proj.weight").T + g("attn.out_proj.bias")
        h2 = _ln(z, g("ln_2.weight"), g("ln_2.bias"))
        m = h2 @ g("mlp.c_fc.weight").T + g("mlp.c_fc.bias")
        m = m * torch.sigmoid(1.702 * m) if quick else 0.5 * m * (1 + torch.erf(m / math.sqrt(2)))
        z = z + m @ g("mlp.c_proj.weight").T + g("mlp.c_proj.bias")
    z = _ln(z, sd["ln_post.weight"], sd["ln_post.bias"])
    return {"cls": z[:, 0], "tokens": z, "attn_cls": attn_cls / L, "xattn": xattn / L}


def cos_min(a, b):
    a, b = a.reshape(a.shape[0], -1).double(), b.reshape(b.shape[0], -1).double()
    return float(((a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1))).min())


PAIRS = [[0, 1], [1, 0], [2, 2], [4, 3], [0, 4]]


@pytest.fixture(scope="module")
def views():
    g = torch.Generator().manual_seed(3)
    return torch.randn(5, 3, 64, 64, generator=g)


# ---------------------------------------------------------------------- names
def test_output_set_is_canonical_and_validated():
    assert BACKBONE_OUTPUTS == ALL
    assert output_set(["xattn", "cls", "cls"]) == ("cls", "xattn")
    assert output_set("tokens") == ("tokens",)
    assert output_set_tag(["cls"]) == "" and output_set_tag(["attn_cls", "tokens"]) == "tokens+attn_cls"
    for bad in ([], ["cls", "patches"]):
        with pytest.raises(ValueError):
            output_set(bad)


# ---------------------------------------------------------------------- torch path vs the plain forward
def test_torch_outputs_equal_the_plain_reimplementation(tiny_encoder, views):
    e = tiny_encoder
    out = e.visual_outputs(views, ALL, pairs=torch.tensor(PAIRS))
    ref = plain_vit(e.model, views, PAIRS)
    G = e.grid_size
    T = 1 + G * G
    assert G == 4 and e.num_tokens == T
    assert {n: tuple(t.shape) for n, t in out.items()} == {"cls": (5, e.width), "tokens": (5, T, e.width),
                                                           "attn_cls": (5, T), "xattn": (len(PAIRS), T)}
    assert all(t.dtype == torch.float32 and t.device.type == "cpu" for t in out.values())
    assert cos_min(out["cls"], ref["cls"]) >= 0.9999
    assert cos_min(out["tokens"].reshape(-1, e.width), ref["tokens"].reshape(-1, e.width)) >= 0.9999
    assert float((out["attn_cls"].double() - ref["attn_cls"]).abs().max()) <= 1e-5
    assert float((out["xattn"].double() - ref["xattn"]).abs().max()) <= 1e-5
    # probabilities: every row sums to one; a view paired with itself is its own CLS attention
    assert torch.allclose(out["attn_cls"].sum(1), torch.ones(5), atol=1e-5)
    assert torch.allclose(out["xattn"][2], out["attn_cls"][2], atol=1e-6)
    # the pair's direction matters (query view vs key view)
    assert not torch.allclose(out["xattn"][0], out["xattn"][1], atol=1e-4)


def test_the_reference_is_sensitive(tiny_encoder, views):
    """The plain forward is not trivially equal to anything: a different head count breaks it."""
    e = tiny_encoder
    out = e.visual_outputs(views, ("attn_cls",))
    ref = plain_vit(e.model, views, [])
    blk = e.model.visual.transformer.resblocks[0].attn
    heads = blk.num_heads
    try:
        blk.num_heads = 1
        wrong = plain_vit(e.model, views, [])
    finally:
        blk.num_heads = heads
    assert float((out["attn_cls"].double() - ref["attn_cls"]).abs().max()) <= 1e-5
    assert float((out["attn_cls"].double() - wrong["attn_cls"]).abs().max()) > 1e-3


def test_cls_and_tokens_are_bit_identical_to_the_towers_own_forward(tiny_encoder, views):
    e = tiny_encoder
    v = e.model.visual
    with torch.no_grad():
        ref_cls = e.visual_trunk(views)
        ref_tokens = v.ln_post(v.transformer(v._embeds(views)))
        ref_emb = v(views)
    out = e.visual_outputs(views, ALL, pairs=PAIRS)
    assert torch.equal(out["cls"], ref_cls) and torch.equal(out["tokens"], ref_tokens)
    assert torch.equal(e.visual_features(views), ref_cls)
    assert torch.allclose(out["cls"] @ v.proj, ref_emb, atol=1e-6)
    # asking for fewer outputs changes none of them
    for names in (("cls",), ("tokens",), ("attn_cls",), ("cls", "attn_cls"), ("xattn",)):
        sub = e.visual_outputs(views, names, pairs=PAIRS)
        assert tuple(sub) == names
        for n in names:
            assert torch.equal(sub[n], out[n]), (names, n)


def test_chunking_keeps_pairs_and_equals_one_call(tiny_encoder, views):
    e = tiny_encoder
    one = e.visual_outputs(views, ALL, pairs=PAIRS)
    for mb in (1, 2, 3, 4):
        many = e.visual_outputs(views, ALL, pairs=PAIRS, max_batch=mb)
        for n in ALL:
            assert torch.allclose(many[n], one[n], atol=1e-6), (mb, n)


def test_run_chunked_call_plan():
    """Each call sees at most max_batch views (2 for a cross-chunk pair), pairs stay in one call."""
    calls = []

    def run(v, names, pairs):
        calls.append((int(v.shape[0]), names, None if pairs is None else pairs.tolist()))
        out = {"cls": v[:, :1, 0, 0]}
        if "xattn" in names:
            # xattn row = (query view id, key view id) read from the views themselves
            out["xattn"] = torch.stack([torch.stack([v[a, 0, 0, 0], v[b, 0, 0, 0]]) for a, b in pairs.tolist()])
        return {n: out[n] for n in names}

    views = torch.arange(5, dtype=torch.float32).reshape(5, 1, 1, 1).expand(5, 3, 2, 2).contiguous()
    pairs = torch.tensor([[0, 1], [3, 0], [4, 4], [2, 3]])
    out = run_chunked(run, views, ("cls", "xattn"), pairs, 2)
    assert out["xattn"].tolist() == [[0, 1], [3, 0], [4, 4], [2, 3]]
    assert out["cls"][:, 0].tolist() == [0, 1, 2, 3, 4]
    assert all(n <= 2 for n, _, _ in calls)
    assert sum(1 for _, names, _ in calls if "cls" in names) == 3
    assert sum(len(p) for _, names, p in calls if p) == 4


def test_empty_and_bad_inputs(tiny_encoder, views):
    e = tiny_encoder
    T = e.num_tokens
    empty = e.visual_outputs(views[:0], ALL, pairs=torch.zeros(0, 2, dtype=torch.long))
    assert {n: tuple(t.shape) for n, t in empty.items()} == {"cls": (0, e.width), "tokens": (0, T, e.width),
                                                             "attn_cls": (0, T), "xattn": (0, T)}
    nopairs = e.visual_outputs(views, ("cls", "xattn"), pairs=[])
    assert nopairs["xattn"].shape == (0, T) and nopairs["cls"].shape == (5, e.width)
    with pytest.raises(ValueError, match="needs pairs"):
        e.visual_outputs(views, ("xattn",))
    with pytest.raises(ValueError, match="pairs index views"):
        e.visual_outputs(views, ("xattn",), pairs=[[0, 5]])
    with pytest.raises(ValueError, match=r"\[P, 2\]"):
        e.visual_outputs(views, ("xattn",), pairs=[[0, 1, 2]])
    with pytest.raises(ValueError, match="integer"):
        e.visual_outputs(views, ("xattn",), pairs=[[0.0, 1.0]])
    with pytest.raises(ValueError, match="unknown backbone output"):
        e.visual_outputs(views, ("patches",))
    with pytest.raises(ValueError, match="views must be"):
        e.visual_outputs(torch.zeros(2, 3, 32, 32), ("cls",))


def test_plain_callable_backend_serves_cls_only(tiny_encoder, views):
    e = tiny_encoder
    ref = e.visual_features(views)
    def plain(v):
        with torch.no_grad():
            return e.visual_trunk(v)

    try:
        e.set_backend(plain, "plain")
        assert torch.equal(e.visual_outputs(views, ("cls",))["cls"], ref)
        with pytest.raises(RuntimeError, match="plain callable"):
            e.visual_outputs(views, ("tokens",))
    finally:
        e.set_backend(None)


def test_torch_backend_serves_every_output_set(tiny_encoder, views):
    from runa_ood_node.backends import make_backend

    e = tiny_encoder
    ref = e.visual_outputs(views, ALL, pairs=PAIRS)
    be = make_backend("torch", e, max_batch=2)
    out = be.outputs(views, ALL, pairs=torch.tensor(PAIRS))
    for n in ALL:
        assert torch.allclose(out[n], ref[n], atol=1e-6), n
    assert torch.allclose(be(views), out["cls"], atol=1e-6) and be(views).shape == ref["cls"].shape
    try:
        e.set_backend(be)
        via = e.visual_outputs(views, ("tokens", "xattn"), pairs=PAIRS)
        assert torch.allclose(via["xattn"], ref["xattn"], atol=1e-6)
    finally:
        e.set_backend(None)


@pytest.mark.skipif(not os.environ.get("RUNA_OOD_SLOW_TESTS"),
                    reason="ViT-B-32 (random weights) plain forward in float64: set RUNA_OOD_SLOW_TESTS=1")
def test_vit_b32_torch_outputs_equal_the_plain_reimplementation():
    from runa_ood_node.core.encoder import DualEncoder

    e = DualEncoder.load("ViT-B-32", pretrained=None, allow_random=True)
    x = torch.randn(3, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    pairs = [[0, 1], [2, 0]]
    out = e.visual_outputs(x, ALL, pairs=pairs)
    ref = plain_vit(e.model, x, pairs)
    assert e.grid_size == 7
    assert cos_min(out["cls"], ref["cls"]) >= 0.9999
    assert float((out["attn_cls"].double() - ref["attn_cls"]).abs().max()) <= 1e-4
    assert float((out["xattn"].double() - ref["xattn"]).abs().max()) <= 1e-4


def test_an_avg_pool_tower_gives_its_own_pooled_token_first(tiny_encoder, views):
    """A ``pool_type: avg`` tower (the proving ground's ``runa-pg-vit-avg``): ``cls`` is the patches' mean, as the
    tower's own forward pools it, and token 0 of ``tokens`` is that pooled token (the methods read token 0 as
    the image's pooled feature); the patches are unchanged. A CLS-pooled reading would differ."""
    from runa_ood_node.core.backbone import backbone_forward, token_pool

    v = tiny_encoder.model.visual
    tok = backbone_forward(v, views, ("cls", "tokens"))
    assert token_pool(v) == "tok"
    v.pool_type = "avg"
    try:
        assert token_pool(v) == "avg"
        with torch.no_grad():
            ref_cls = tiny_encoder.visual_trunk(views)     # the tower's own _pool: mean of ln_post(patches)
            ref_emb = v(views)
        out = backbone_forward(v, views, ("cls", "tokens", "attn_cls"))
        cls_only = backbone_forward(v, views, ("cls",))
    finally:
        v.pool_type = "tok"
    assert torch.allclose(out["cls"], ref_cls, atol=1e-6) and torch.allclose(cls_only["cls"], ref_cls, atol=1e-6)
    assert torch.allclose(out["cls"] @ v.proj, ref_emb, atol=1e-5)
    assert torch.equal(out["tokens"][:, 0], out["cls"])
    assert torch.equal(out["tokens"][:, 1:], tok["tokens"][:, 1:])
    assert float((out["cls"] - tok["cls"]).abs().max()) > 1e-3
    v.attn_pool = torch.nn.Identity()
    try:
        assert token_pool(v) == ""
        with pytest.raises(ValueError, match="pool_type 'tok' or 'avg'"):
            backbone_forward(v, views, ("tokens",))
    finally:
        v.attn_pool = None
