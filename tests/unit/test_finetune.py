"""core.finetune on constructed features (no model, no data: fast)."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml

from runa_ood_node.core import finetune as ft

K, D, WIDTH, SHOTS = 3, 8, 16, 10


@pytest.fixture()
def problem():
    """K classes of features around random centres; orthonormal text embeddings; random P."""
    g = torch.Generator().manual_seed(123)
    centres = torch.randn(K, WIDTH, generator=g)
    labels = torch.arange(K).repeat_interleave(SHOTS)
    feats = centres[labels] + 0.3 * torch.randn(K * SHOTS, WIDTH, generator=g)
    text = torch.eye(D)[:K]
    proj = torch.randn(WIDTH, D, generator=g) / math.sqrt(WIDTH)
    return feats, labels, text, proj


def test_eq7_loss_known_value():
    # width == D, identity projection: features map onto the text axes
    text = torch.eye(2)
    feats = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    labels = torch.tensor([0, 1])
    tau = 0.5
    loss = ft.eq7_loss(feats, labels, text, torch.eye(2), tau)
    # sample 0: cos = (1, 0); sample 1: cos = (r, r), r = 1/sqrt2
    l0 = -math.log(math.exp(1 / tau) / (math.exp(1 / tau) + math.exp(0)))
    l1 = math.log(2.0)
    assert float(loss) == pytest.approx((l0 + l1) / 2, rel=1e-6)  # mean, not sum, over the batch


def test_eq7_loss_matches_direct_formula(problem):
    feats, labels, text, proj = problem
    tau = 0.07
    emb = F.normalize(feats @ proj, dim=1)
    logits = emb @ text.T / tau
    ref = -(logits.log_softmax(dim=1)[torch.arange(len(labels)), labels]).mean()
    assert float(ft.eq7_loss(feats, labels, text, proj, tau)) == pytest.approx(float(ref), rel=1e-6)


def test_training_lowers_loss_and_separates_classes(problem):
    feats, labels, text, proj = problem
    before_loss = float(ft.eq7_loss(feats, labels, text, proj, 0.01))
    before_cos = ft.own_class_cosine(feats, labels, text, proj)
    new, curve = ft.train_projection(feats, labels, text, proj, tau=0.01, lr=1e-2, batch_size=8, epochs=60,
                                     seed=0, progress=False)
    assert len(curve) == 60 and new.shape == proj.shape and new.dtype == torch.float32
    after_loss = float(ft.eq7_loss(feats, labels, text, new, 0.01))
    assert after_loss < 1e-3 * before_loss
    assert curve[-1] < curve[0]
    assert ft.own_class_cosine(feats, labels, text, new).mean() > before_cos.mean()
    # every sample is now nearest to its own class text embedding
    sims = F.normalize(feats @ new, dim=1) @ text.T
    assert torch.equal(sims.argmax(dim=1), labels)


def test_training_raises_every_samples_own_class_cosine(problem):
    """With a softer tau (0.1) the loss is not satisfied by the margin alone, and every sample's
    cosine to its own class text embedding rises (at tau=0.01 a few may drop while the margin grows)."""
    feats, labels, text, proj = problem
    before = ft.own_class_cosine(feats, labels, text, proj)
    new, curve = ft.train_projection(feats, labels, text, proj, tau=0.1, lr=1e-2, batch_size=8, epochs=60,
                                     seed=0, progress=False)
    after = ft.own_class_cosine(feats, labels, text, new)
    assert torch.all(after > before + 0.05), (before, after)
    assert curve[-1] < 0.01 * curve[0]


def test_init_projection_not_modified(problem):
    feats, labels, text, proj = problem
    keep = proj.clone()
    ft.train_projection(feats, labels, text, proj, lr=1e-2, epochs=3, progress=False)
    assert torch.equal(proj, keep)


def test_deterministic_with_seed(problem):
    feats, labels, text, proj = problem
    kw = dict(lr=1e-2, batch_size=7, epochs=5, progress=False)
    a, ca = ft.train_projection(feats, labels, text, proj, seed=3, **kw)
    b, cb = ft.train_projection(feats, labels, text, proj, seed=3, **kw)
    c, _ = ft.train_projection(feats, labels, text, proj, seed=4, **kw)
    assert torch.equal(a, b) and ca == cb
    assert not torch.equal(a, c)  # a different shuffling gives different batches


def test_batch_alias(problem):
    feats, labels, text, proj = problem
    kw = dict(lr=1e-2, epochs=3, progress=False)
    a, _ = ft.train_projection(feats, labels, text, proj, batch_size=7, **kw)
    b, _ = ft.train_projection(feats, labels, text, proj, batch=7, **kw)
    c, _ = ft.train_projection(feats, labels, text, proj, **kw)  # 256: one batch per epoch
    assert torch.equal(a, b) and not torch.equal(a, c)
    with pytest.raises(ValueError, match="disagree"):
        ft.train_projection(feats, labels, text, proj, batch_size=8, batch=7, **kw)


def test_zero_epochs_returns_copy(problem):
    feats, labels, text, proj = problem
    new, curve = ft.train_projection(feats, labels, text, proj, epochs=0, progress=False)
    assert curve == [] and torch.equal(new, proj)


def test_paper_lr_changes_little(problem):
    """lr 5e-6 for a few epochs barely moves P (sanity of the defaults' scale)."""
    feats, labels, text, proj = problem
    new, _ = ft.train_projection(feats, labels, text, proj, epochs=5, progress=False)
    rel = float((new - proj).norm() / proj.norm())
    assert 0 < rel < 1e-3


@pytest.mark.parametrize(
    "bad, match",
    [
        (dict(init_proj=torch.zeros(WIDTH + 1, D)), "width 16"),
        (dict(init_proj=torch.zeros(WIDTH, D + 2)), "D=10 but text embeddings have D=8"),
        (dict(features=torch.zeros(K * SHOTS)), r"\[N, width\]"),
        (dict(labels=torch.zeros(5, dtype=torch.long)), r"\[N\]=30"),
        (dict(labels=torch.full((K * SHOTS,), K)), r"\[0, K=3\)"),
        (dict(labels=torch.zeros(K * SHOTS)), "integer"),
        (dict(tau=0.0), "tau"),
        (dict(text_emb=torch.zeros(0, D)), "K >= 1"),
    ],
)
def test_shape_and_argument_errors(problem, bad, match):
    feats, labels, text, proj = problem
    args = dict(features=feats, labels=labels, text_emb=text, init_proj=proj)
    tau = bad.pop("tau", 0.01)
    args.update(bad)
    with pytest.raises(ValueError, match=match):
        ft.train_projection(**args, tau=tau, epochs=1, progress=False)


def test_nan_features_rejected(problem):
    feats, labels, text, proj = problem
    feats = feats.clone()
    feats[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        ft.train_projection(feats, labels, text, proj, epochs=1, progress=False)


def test_save_load_round_trip(tmp_path, problem):
    feats, labels, text, proj = problem
    new, curve = ft.train_projection(feats, labels, text, proj, lr=1e-2, epochs=2, progress=False)
    meta = dict(model_name="ViT-B-16", model_id="abc123", pretrained="openai", label_set="bdd",
                prompts=[["a photo of a car"]], shots=10, seed=0, lr=1e-2, epochs=2, tau=0.01,
                loss_curve=curve)
    pt = ft.save_projection(tmp_path / "bdd", new, meta)
    assert pt == tmp_path / "bdd" / "projection.pt" and (tmp_path / "bdd" / "projection.yaml").is_file()
    raw = yaml.safe_load((tmp_path / "bdd" / "projection.yaml").read_text())
    assert raw["created"] and raw["shape"] == [WIDTH, D] and raw["loss_curve"] == pytest.approx(curve)
    for arg in (tmp_path / "bdd", pt, str(pt)):
        got, m = ft.load_projection(arg)
        assert torch.equal(got, new)
        assert m["model_id"] == "abc123" and m["shots"] == 10 and m["label_set"] == "bdd"
    assert torch.load(pt, weights_only=True).shape == (WIDTH, D)


def test_load_by_domain_name(tmp_path, monkeypatch):
    paths = pytest.importorskip("runa_ood_node.core.paths")
    monkeypatch.setenv("RUNA_OOD_CALIBRATION_DIR", str(tmp_path))
    assert paths.calibration_dir() == tmp_path
    proj = torch.randn(WIDTH, D)
    ft.save_projection(tmp_path / "mydomain", proj, {"label_set": "voc"})
    monkeypatch.chdir(tmp_path / "mydomain")  # "mydomain" is not a path relative to here
    got, meta = ft.load_projection("mydomain")
    assert torch.equal(got, proj) and meta["label_set"] == "voc"


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        ft.load_projection(tmp_path / "nowhere")
    bad = tmp_path / "bad"
    bad.mkdir()
    torch.save(torch.zeros(3), bad / "projection.pt")
    with pytest.raises(ValueError, match=r"\[width, D\]"):
        ft.load_projection(bad)
    (bad / "projection.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="cannot read"):
        ft.load_projection(bad)
    ok = tmp_path / "ok"
    ft.save_projection(ok, torch.ones(2, 2), {})
    (ok / "projection.yaml").write_text("shape: [3, 3]\n")
    with pytest.raises(ValueError, match="shape"):
        ft.load_projection(ok)
    (ok / "projection.yaml").unlink()
    with pytest.warns(RuntimeWarning, match="provenance"):
        got, meta = ft.load_projection(ok)
    assert meta == {} and got.shape == (2, 2)


def test_save_rejects_bad_tensor(tmp_path):
    with pytest.raises(ValueError):
        ft.save_projection(tmp_path, torch.zeros(3), {})
    with pytest.raises(ValueError, match="NaN"):
        ft.save_projection(tmp_path, torch.full((2, 2), float("nan")), {})


def test_sample_shots():
    labels = np.array([0] * 30 + [1] * 5 + [2] * 12)
    with pytest.warns(RuntimeWarning, match="1 \\(5\\)"):
        idx = ft.sample_shots(labels, 10, seed=1)
    counts = np.bincount(labels[idx])
    assert counts.tolist() == [10, 5, 10] and len(set(idx.tolist())) == idx.size
    with pytest.warns(RuntimeWarning):
        assert np.array_equal(idx, ft.sample_shots(labels, 10, seed=1))


def test_progress_bar_runs(problem, capsys):
    pytest.importorskip("tqdm")
    feats, labels, text, proj = problem
    _, curve = ft.train_projection(feats, labels, text, proj, epochs=2, progress=True)
    assert len(curve) == 2
    assert "fine-tune" in capsys.readouterr().err
