"""The proving-ground CLIP (issue 22, item 2): the ``runa-pg-vit`` config, its contrastive training
loop (``proving_ground.clip_train``), the registered weights name ``pretrained: proving-ground`` and
the committed checkpoint (sha256, size, loading by path and by name, ONNX Runtime == torch).

Training here is a smoke run on the tiny model (plumbing); the checkpoint's quality figures are in
calibration/proving_ground/CLIP.md (synthetic world, model trained here)."""
import hashlib
import pathlib

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("open_clip")

from runa_ood_node.core.encoder import (REGISTERED_WEIGHTS, DualEncoder, WeightsUnavailableError,  # noqa: E402
                                        register_model_configs)
from runa_ood_node.proving_ground import clip_train as ct  # noqa: E402
from runa_ood_node.proving_ground import world  # noqa: E402
from runa_ood_node.tools import proving_ground as pg  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[2]
CKPT = REPO / "calibration" / ct.CHECKPOINT
MAX_MB = 40.0
needs_ckpt = pytest.mark.skipif(not CKPT.is_file(), reason=f"{CKPT} not committed yet (remake it with "
                                                           "`runa-ood proving-ground train`)")


def _tiny_pool(n=3):
    """A few 'clip' scenes at a quarter of the frame size (fast)."""
    return ct.build_pool(n, frame_scale=0.25, size_range=(8, 80), progress=False)


# ------------------------------------------------------------------ the config
def test_config_registers_and_builds_a_vit_the_package_accepts():
    import open_clip

    register_model_configs()
    assert ct.MODEL_NAME in open_clip.list_models()
    enc = DualEncoder.load(ct.MODEL_NAME, pretrained=None, allow_random=True)
    assert enc.random_weights and enc.input_size == 224
    assert enc.grid_size == 224 // enc.model.visual.patch_size[0]
    assert (enc.width, enc.embed_dim) == (192, 128)
    assert enc.tokenizer(["a photo of a moose"]).shape == (1, 32)  # the shortened context


def test_registered_name_is_for_its_model_and_says_where_it_looked(tmp_path, monkeypatch):
    from runa_ood_node.core import paths

    assert REGISTERED_WEIGHTS["proving-ground"] == {ct.MODEL_NAME: ct.CHECKPOINT}
    with pytest.raises(WeightsUnavailableError, match="runa-pg-vit"):
        DualEncoder.load("runa-tiny-vit", pretrained="proving-ground")
    monkeypatch.setenv(paths.CALIBRATION_ENV, str(tmp_path))
    monkeypatch.setattr(paths, "_repo_calibration_dir", lambda: tmp_path / "repo")
    monkeypatch.setattr(paths, "_installed_calibration_dir", lambda: None)
    with pytest.raises(WeightsUnavailableError, match="missing; tried .*proving_ground/runa-pg-vit.pt"):
        DualEncoder.load(ct.MODEL_NAME, pretrained="proving-ground")


# ------------------------------------------------------------------ data and loss
def test_pool_names_every_class_and_augmentation_keeps_hue():
    import cv2

    pool = _tiny_pool(12)
    sampler = ct.Sampler(pool, size=64, seed=0)
    _, caps, keys = sampler.batch(200, augment=False)
    named = {pool.class_names[k] for key in keys for k in key if k >= 0}
    present = {pool.class_names[k] for k in sampler.present}
    assert named >= present and any(world.CLASS_BY_NAME[n].group != "id" for n in named)  # OOD classes named too
    assert all(len(c.split()) <= 30 for c in caps)
    # a pure class colour keeps its hue under every augmentation draw
    for name, rgb in world.COLOURS.items():
        if name == "white":
            continue
        img = np.full((64, 64, 3), rgb, np.uint8)
        h0 = cv2.cvtColor(img[:1, :1], cv2.COLOR_RGB2HSV_FULL)[0, 0, 0].astype(int)
        for _ in range(10):
            out = sampler.augment(img)
            h = cv2.cvtColor(np.median(out, axis=(0, 1)).astype(np.uint8)[None, None], cv2.COLOR_RGB2HSV_FULL)[0, 0, 0]
            assert min(abs(int(h) - h0), 256 - abs(int(h) - h0)) <= 8, (name, h0, h)


def test_scene_regions_follow_their_settings():
    """Scene pairs: ``whole_scene`` = 1 shows only whole frames, 0 with small regions never does; the
    defaults are the committed checkpoint's run; settings outside their range are refused."""
    pool = _tiny_pool(4)
    whole = [ct.Sampler(pool, size=64)._resize(sc) for sc in pool.scenes]
    assert (ct.WHOLE_SCENE_P, ct.SCENE_REGION) == (0.4, (0.35, 0.85))  # the committed run (CLIP.md)

    def is_whole(img):
        return any(np.array_equal(img, w) for w in whole)
    for law in ct.REGION_LAWS:
        s1 = ct.Sampler(pool, size=64, seed=0, whole_scene=1.0, region_law=law)
        assert all(is_whole(s1.scene_sample()[0]) for _ in range(10))
        s0 = ct.Sampler(pool, size=64, seed=0, whole_scene=0.0, scene_region=(0.15, 0.3), region_law=law)
        assert not any(is_whole(s0.scene_sample()[0]) for _ in range(10))
    for bad in (dict(scene_region=(0.0, 0.5)), dict(scene_region=(0.6, 0.5)), dict(region_law="cubic"),
                dict(whole_scene=1.5)):
        with pytest.raises(ValueError):
            ct.Sampler(pool, size=64, **bad)


def test_object_tiles_show_a_named_object_in_its_scene():
    """Object tiles (``tile_fraction``): a region of the scene around an object drawn class-balanced; the
    object is named (a crop's caption when it is the only one named) and the batch holds the asked share."""
    pool = _tiny_pool(6)
    s = ct.Sampler(pool, size=64, seed=0, scene_fraction=0.25, tile_fraction=0.5)
    crop_caps = {t.format(n) for t in ct.CROP_TEMPLATES for n in pool.class_names}
    named = 0
    for _ in range(60):
        img, cap, key = s.tile_sample()
        assert img.shape == (64, 64, 3)
        named += bool(key)
        if len(key) == 1:
            assert cap in crop_caps
    assert named >= 50
    imgs, caps, keys = s.batch(20, augment=False)
    assert len(caps) == 20
    assert ct.Sampler(pool, size=64).tile_fraction == 0.0   # the committed run has none
    with pytest.raises(ValueError):
        ct.Sampler(pool, size=64, scene_fraction=0.6, tile_fraction=0.5)


def test_loss_counts_same_caption_pairs_as_positives():
    emb = torch.nn.functional.normalize(torch.randn(4, 8, generator=torch.Generator().manual_seed(0)), dim=-1)
    scale = torch.tensor(50.0)
    swapped = emb[[1, 0, 2, 3]]  # images 0 and 1 paired with each other's caption
    distinct, same = [(0,), (1,), (2,), (3,)], [(0,), (0,), (2,), (3,)]
    assert float(ct.contrastive_loss(emb, emb, scale, distinct)) < 0.1
    # captions naming different classes: the swap is a mistake; the same class: it is not one
    assert float(ct.contrastive_loss(emb, swapped, scale, distinct)) > 5.0
    assert float(ct.contrastive_loss(emb, swapped, scale, same)) == pytest.approx(
        float(ct.contrastive_loss(emb, emb, scale, same)), abs=1e-5)


def test_training_smoke_run_lowers_the_loss(one_thread):
    model, tok = ct.build_model("runa-tiny-vit", seed=0)
    sampler = ct.Sampler(_tiny_pool(), size=64, seed=0)
    hist = ct.train(model, tok, sampler, steps=12, batch_size=16, lr=2e-3, warmup=1, progress=False, fixed_batch=True)
    assert len(hist["loss"]) == 12 and all(np.isfinite(hist["loss"]))
    assert np.mean(hist["loss"][-3:]) < hist["loss"][0] - 0.1, hist["loss"]


def test_training_is_seeded():
    """Same seed, same pool: the same losses step by step (the checkpoint is remade by its command)."""
    pool = _tiny_pool()
    runs = []
    for _ in range(2):
        model, tok = ct.build_model("runa-tiny-vit", seed=3)
        runs.append(ct.train(model, tok, ct.Sampler(pool, size=64, seed=3), steps=3, batch_size=8, progress=False)["loss"])
    assert runs[0] == runs[1]


def test_train_command_writes_a_loadable_checkpoint_and_its_report(tmp_path, one_thread):
    import argparse
    import json

    p = argparse.ArgumentParser()
    pg.add_train_arguments(p)
    out = tmp_path / "m.pt"
    args = p.parse_args(["--out", str(out), "--model", "runa-tiny-vit", "--scenes", "3", "--steps", "2",
                         "--batch-size", "8", "--eval-scenes", "2", "--frame-scale", "0.25", "--threads", "1",
                         "--no-progress"])
    assert pg.run_train(args) == 0
    digest = hashlib.sha256(out.read_bytes()).hexdigest()
    assert (tmp_path / "m.pt.sha256").read_text().split()[0] == digest
    assert (tmp_path / "m_loss.png").stat().st_size > 0
    rep = json.loads((tmp_path / "m_train.json").read_text())
    assert rep["sha256"] == digest and set(rep["zero_shot"]) == {"label", "trained", "random_weights_same_architecture"}
    enc = DualEncoder.load("runa-tiny-vit", pretrained=str(out))
    assert not enc.random_weights and enc.weights_id == f"file:{digest}"
    # the fp16 file holds the trained weights: fp32 model == its fp16 rounding
    assert all(v.dtype == torch.float16 for v in torch.load(out, weights_only=True).values() if v.is_floating_point())


# ------------------------------------------------------------------ the committed checkpoint
@needs_ckpt
def test_committed_checkpoint_matches_its_sha256_and_size():
    digest = hashlib.sha256(CKPT.read_bytes()).hexdigest()
    assert CKPT.with_name(CKPT.name + ".sha256").read_text().split()[0] == digest
    assert CKPT.stat().st_size <= MAX_MB * 1e6


@pytest.fixture(scope="module")
def pg_encoder():
    if not CKPT.is_file():
        pytest.skip(f"{CKPT} not committed yet")
    return DualEncoder.load(ct.MODEL_NAME, pretrained="proving-ground")


@needs_ckpt
def test_committed_checkpoint_loads_by_path_and_by_registered_name(pg_encoder):
    digest = hashlib.sha256(CKPT.read_bytes()).hexdigest()
    by_path = DualEncoder.load(ct.MODEL_NAME, pretrained=str(CKPT))
    for enc in (by_path, pg_encoder):
        assert not enc.random_weights and enc.weights_id == f"file:{digest}"
    assert by_path.model_id == pg_encoder.model_id
    assert torch.equal(by_path.proj_global, pg_encoder.proj_global)


#: ONNX Runtime variants: (make_backend options, embedding cosine min, attention max |delta|), the
#: tolerances of tests/test_backbone_backends.py (measured here: fp32 / fused 1.0 and 2e-7, fp16 graph
#: 1.0 and 5e-5, dynamic int8 0.9997 and 1.6e-3)
ORT_VARIANTS = {"plain": ({}, 0.9999, 1e-3), "fused": ({"fused": True}, 0.9999, 1e-3),
                "fp16": ({"precision": "fp16"}, 0.999, 1e-3), "int8": ({"int8": "dynamic"}, 0.99, 5e-3)}


@needs_ckpt
@pytest.mark.parametrize("variant", list(ORT_VARIANTS))
def test_committed_checkpoint_through_onnx_runtime_equals_torch(variant, pg_encoder, tmp_path):
    pytest.importorskip("onnxruntime")
    from runa_ood_node.backends import make_backend
    from runa_ood_node.backends.ort_backend import cosine_rows
    from runa_ood_node.core.views import ViewMaker

    kw, cos_min, attn_max = ORT_VARIANTS[variant]
    sc = world.render_scene(world.SPLIT_SEEDS["gate"] + 7)
    b = sc.boxes.copy()
    b[:, 2:] += b[:, :2]
    vm = ViewMaker(pg_encoder.input_size, pg_encoder.mean, pg_encoder.std)
    views = torch.cat(list(vm.make(sc.image, b[:4])), 0)
    n = views.shape[0] // 2
    pairs = torch.tensor([[i, i + n] for i in range(n)])
    names = ("cls", "tokens", "attn_cls", "xattn")
    ref = pg_encoder.visual_outputs(views, names, pairs=pairs)
    be = make_backend("onnxruntime", pg_encoder, cache_dir=tmp_path, ort_threads=2, outputs=names, **kw)
    out = be.outputs(views, names, pairs=pairs)
    P = pg_encoder.proj_global
    D = P.shape[1]
    assert float(cosine_rows(ref["cls"] @ P, out["cls"] @ P).min()) >= cos_min
    assert float(cosine_rows((ref["tokens"] @ P).reshape(-1, D), (out["tokens"] @ P).reshape(-1, D)).min()) >= cos_min
    assert float((ref["attn_cls"] - out["attn_cls"]).abs().max()) <= attn_max
    assert float((ref["xattn"] - out["xattn"]).abs().max()) <= attn_max
