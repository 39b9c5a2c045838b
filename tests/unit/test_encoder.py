"""DualEncoder on the tiny random ViT: loading rules, trunk, fusion (Eq. 3), text cache, backends."""
import pytest
import torch
import torch.nn.functional as F

from runa_ood_node.core.encoder import DualEncoder, WeightsUnavailableError
from runa_ood_node.core.labels import LabelSet, load_label_set

TINY = "runa-tiny-vit"


def _load_seeded(seed=0, **kw):
    return DualEncoder.load(TINY, pretrained=None, device="cpu", allow_random=True, random_seed=seed, **kw)


def test_random_weights_do_not_depend_on_the_callers_rng(tiny_encoder):
    torch.manual_seed(1234)
    before = torch.random.get_rng_state()
    e = DualEncoder.load(TINY, pretrained=None, device="cpu", allow_random=True)
    assert e.model_id == tiny_encoder.model_id  # default seed, whatever the caller's RNG
    assert torch.equal(torch.random.get_rng_state(), before)  # caller's RNG untouched


def test_attributes(tiny_encoder):
    e = tiny_encoder
    assert e.random_weights is True and e.pretrained is None and e.model_name == TINY
    assert e.input_size == 64 and e.width == 64 and e.embed_dim == 32
    assert e.proj_global.shape == (64, 32) and not hasattr(e, "proj_regional")  # P_r is RUNA's head's
    assert e.proj_global.dtype == torch.float32
    assert len(e.mean) == len(e.std) == 3
    assert isinstance(e.model_id, str) and len(e.model_id) >= 8


def test_missing_checkpoint_and_no_weights_raise(tmp_path):
    with pytest.raises(WeightsUnavailableError, match="local open_clip checkpoint"):
        DualEncoder.load(TINY, pretrained=str(tmp_path / "missing.pt"))
    with pytest.raises(WeightsUnavailableError, match="allow_random"):
        DualEncoder.load(TINY, pretrained=None, allow_random=False)
    with pytest.raises(WeightsUnavailableError, match="not .*known open_clip tag"):
        DualEncoder.load(TINY, pretrained="openai")  # the tiny config has no published weights
    # random weights are never a silent fallback for a failed load
    with pytest.raises(WeightsUnavailableError):
        DualEncoder.load(TINY, pretrained=str(tmp_path / "missing.pt"), allow_random=True)


def test_corrupt_checkpoint_raises_weights_unavailable(tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(WeightsUnavailableError, match="failed"):
        DualEncoder.load(TINY, pretrained=str(bad))


def test_unknown_model_name():
    with pytest.raises(ValueError, match="unknown open_clip model"):
        DualEncoder.load("no-such-model", allow_random=True)


def test_non_vit_tower_is_rejected():
    class Fake(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.visual = torch.nn.Linear(3, 3)

    with pytest.raises(ValueError, match="VisionTransformer"):
        DualEncoder(Fake(), None, "fake", None, "cpu", True, "x")


def test_local_checkpoint_loads_same_weights_and_hashes_file(tiny_encoder, tmp_path):
    ckpt = tmp_path / "tiny.pt"
    torch.save(tiny_encoder.model.state_dict(), ckpt)
    e = DualEncoder.load(TINY, pretrained=str(ckpt))
    assert e.random_weights is False and e.pretrained == str(ckpt)
    assert torch.equal(e.proj_global, tiny_encoder.proj_global)
    assert e.model_id != tiny_encoder.model_id  # weights identity is "file:<sha256>", not "random"
    assert e.weights_id.startswith("file:")
    x = torch.randn(2, 3, 64, 64)
    assert torch.allclose(e.visual_features(x), tiny_encoder.visual_features(x), atol=1e-6)


def test_model_id_is_stable_and_weight_sensitive(tiny_encoder):
    assert _load_seeded(0).model_id == tiny_encoder.model_id
    assert _load_seeded(1).model_id != tiny_encoder.model_id


def test_trunk_matches_open_clip_and_text_tower_untouched(tiny_encoder):
    e = tiny_encoder
    x = torch.randn(3, 3, 64, 64)
    feats = e.visual_features(x)
    assert feats.shape == (3, e.width) and feats.dtype == torch.float32
    with torch.no_grad():
        ref = e.model.encode_image(x)
        assert torch.allclose(feats @ e.proj_global, ref, atol=1e-5)
        # the shared CLIP model keeps its own projection, unchanged, and still encodes text
        assert torch.equal(e.model.visual.proj.detach().to("cpu", torch.float32), e.proj_global)
        txt = e.model.encode_text(e.tokenizer(["a photo of a car"]))
    assert txt.shape == (1, e.embed_dim)


def test_chunked_features_equal_single_call(tiny_encoder):
    x = torch.randn(7, 3, 64, 64)
    a = tiny_encoder.visual_features(x)
    b = tiny_encoder.visual_features(x, max_batch=3)
    assert torch.allclose(a, b, atol=1e-5)
    assert tiny_encoder.visual_features(torch.zeros(0, 3, 64, 64)).shape == (0, 64)
    with pytest.raises(ValueError, match="views must be"):
        tiny_encoder.visual_features(torch.zeros(2, 3, 32, 32))


def test_fusion_is_paper_eq3_when_projections_are_equal(tiny_encoder):
    from runa_ood_node.core.methods.runa import fuse

    e = tiny_encoder
    P = e.proj_global
    a, b = torch.randn(5, e.width), torch.randn(5, e.width)
    for lam in (0.0, 0.3, 0.5, 1.0):
        got = fuse(a, b, lam, P, P)
        want = F.normalize((lam * a + (1 - lam) * b) @ e.proj_global, dim=-1)
        assert torch.allclose(got, want, atol=1e-5)
        assert torch.allclose(got.norm(dim=-1), torch.ones(5), atol=1e-5)
    assert torch.allclose(fuse(a, None, 1.0, P, P), F.normalize(a @ e.proj_global, dim=-1), atol=1e-6)
    assert torch.allclose(fuse(None, b, 0.0, P, P), F.normalize(b @ e.proj_global, dim=-1), atol=1e-6)
    with pytest.raises(ValueError):
        fuse(a, None, 0.5, P, P)
    with pytest.raises(ValueError):
        fuse(a, b, 1.5, P, P)


def test_regional_projection_is_runas_head_not_the_encoders():
    """P_r lives in RUNA's head (a projection file loads as one); the shared encoder keeps only P_g."""
    from runa_ood_node.core.methods.heads import Head
    from runa_ood_node.core.methods.runa import RunaMethod, RunaSettings

    e = _load_seeded(0)
    a, b = torch.randn(4, e.width), torch.randn(4, e.width)
    p = torch.randn(e.width, e.embed_dim)
    settings = RunaSettings(lam=0.5, blur_radius=1.0)
    runa = RunaMethod(e, head=Head("runa", {"proj_regional": p}, {}, "p"), settings=settings)
    want = F.normalize(0.5 * a @ p + 0.5 * b @ e.proj_global, dim=-1)
    assert torch.allclose(runa.embed({"regional.cls": a, "global.cls": b}), want, atol=1e-5)
    assert runa.describe()["head"].startswith("sha256:")
    with pytest.raises(ValueError, match=r"\[64, 32\]"):
        RunaMethod(e, head=Head("runa", {"proj_regional": torch.zeros(32, 64)}, {}, "p"), settings=settings)
    with pytest.raises(ValueError, match="NaN"):
        RunaMethod(e, head=Head("runa", {"proj_regional": torch.full((64, 32), float("nan"))}, {}, "p"),
                   settings=settings)
    plain = RunaMethod(e, settings=settings)
    assert torch.equal(plain.proj_regional, e.proj_global)


def test_text_embeddings_normalised_and_prompt_ensembles(tiny_encoder):
    e = tiny_encoder
    voc = load_label_set("voc")
    t = e.text_embeddings(voc)
    assert t.shape == (20, e.embed_dim)
    assert torch.allclose(t.norm(dim=1), torch.ones(20), atol=1e-5)
    # an ensemble is the renormalised mean of the single-prompt embeddings
    s = LabelSet("ens", ["car"], ["a photo of a {label}", "a blurry photo of a {label}"])
    with torch.no_grad():
        single = F.normalize(e.model.encode_text(e.tokenizer(s.prompts()[0])), dim=-1)
    want = F.normalize(single.mean(0), dim=0)
    assert torch.allclose(e.text_embeddings(s)[0], want, atol=1e-5)


def test_text_cache_memory_and_disk(tmp_path, monkeypatch):
    monkeypatch.setenv("RUNA_OOD_CACHE_DIR", str(tmp_path))
    s = LabelSet("cache-test", ["car", "dog", "tree"])
    a = _load_seeded(0)
    t1 = a.text_embeddings(s)
    assert a.text_encode_calls == 1
    assert a.text_cache_path(s).is_file() and a.text_cache_path(s).parent == tmp_path / "text"
    t2 = a.text_embeddings(s)  # memory
    assert a.text_encode_calls == 1 and torch.equal(t1, t2)

    b = _load_seeded(0)  # same weights -> same model_id -> disk cache hit
    assert b.model_id == a.model_id

    def boom(*args, **kwargs):
        raise AssertionError("text tower must not run on a cache hit")

    monkeypatch.setattr(b.model, "encode_text", boom)
    assert torch.equal(b.text_embeddings(s), t1)
    assert b.text_encode_calls == 0

    c = _load_seeded(1)  # other weights -> other cache entry
    assert c.text_cache_path(s) != a.text_cache_path(s)
    # different prompts -> different entry
    assert a.text_cache_path(LabelSet("x", ["car", "dog"])) != a.text_cache_path(s)


def test_corrupt_text_cache_is_recomputed(tmp_path, monkeypatch):
    monkeypatch.setenv("RUNA_OOD_CACHE_DIR", str(tmp_path))
    s = LabelSet("corrupt", ["car", "dog"])
    e = _load_seeded(0)
    path = e.text_cache_path(s)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"garbage")
    t = e.text_embeddings(s)
    assert e.text_encode_calls == 1 and t.shape == (2, e.embed_dim)
    assert torch.load(path, weights_only=True)["embeddings"].shape == (2, e.embed_dim)


def test_custom_backend_is_used_and_checked():
    e = _load_seeded(0)
    calls = []

    def backend(views):
        calls.append(views.shape[0])
        return e.visual_trunk(views).detach() + 1.0

    e.set_backend(backend, name="shifted")
    x = torch.randn(2, 3, 64, 64)
    out = e.visual_features(x)
    e.set_backend(None)
    assert calls == [2] and e.backend_name == "torch"
    assert torch.allclose(out, e.visual_features(x) + 1.0, atol=1e-5)
    e.set_backend(lambda v: torch.zeros(v.shape[0], 5))
    with pytest.raises(RuntimeError, match="shape"):
        e.visual_features(x)


def _fake_tag(monkeypatch, tmp_path, with_file, state_dict=None):
    """Register a pretrained tag 'fake' for the tiny model whose weights live in a fake HF cache."""
    import huggingface_hub.constants as hf_constants
    import open_clip.pretrained as oc_pretrained

    monkeypatch.setitem(oc_pretrained._PRETRAINED, TINY, {"fake": {
        "hf_hub": "runa-test/tiny-fake/", "quick_gelu": False,
        "mean": (0.5, 0.5, 0.5), "std": (0.25, 0.25, 0.25)}})
    hub = tmp_path / "hub"
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(hub))
    if with_file:
        rev = "0" * 40
        repo = hub / "models--runa-test--tiny-fake"
        (repo / "refs").mkdir(parents=True)
        (repo / "refs" / "main").write_text(rev)
        (repo / "snapshots" / rev).mkdir(parents=True)
        torch.save(state_dict, repo / "snapshots" / rev / "open_clip_pytorch_model.bin")


def test_cached_tag_loads_offline_without_network(tiny_encoder, tmp_path, monkeypatch):
    _fake_tag(monkeypatch, tmp_path, True, tiny_encoder.model.state_dict())
    import open_clip.pretrained as oc_pretrained

    def no_network(*a, **k):
        raise AssertionError("must not try to download cached weights")

    monkeypatch.setattr(oc_pretrained, "download_pretrained", no_network)
    e = DualEncoder.load(TINY, pretrained="fake", allow_download=False)
    assert e.random_weights is False and e.weights_id == "tag:fake"
    assert torch.equal(e.proj_global, tiny_encoder.proj_global)
    assert e.mean == (0.5, 0.5, 0.5) and e.std == (0.25, 0.25, 0.25)  # the tag's preprocessing


def test_uncached_tag_fails_fast_when_downloads_are_off(tmp_path, monkeypatch):
    _fake_tag(monkeypatch, tmp_path, False)
    with pytest.raises(WeightsUnavailableError, match="not in the local cache"):
        DualEncoder.load(TINY, pretrained="fake", allow_download=False)
    monkeypatch.setenv("RUNA_OOD_OFFLINE", "1")
    with pytest.raises(WeightsUnavailableError, match="not in the local cache"):
        DualEncoder.load(TINY, pretrained="fake")


def test_hf_hub_models_are_refused_without_downloads(monkeypatch):
    import open_clip

    def no_network(*args, **kwargs):
        raise AssertionError("must not touch the network")

    monkeypatch.setattr(open_clip, "create_model", no_network)
    with pytest.raises(WeightsUnavailableError, match="local-dir"):
        DualEncoder.load("hf-hub:laion/CLIP-ViT-B-16-laion2B-s34B-b88K", allow_download=False)
