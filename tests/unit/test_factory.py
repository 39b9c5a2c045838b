"""``runa_ood_node.factory``: the one way the node and every tool build an ``OodScorer``.

Behaviour on the tiny random ViT (no downloads): what a configuration (a ``core.config.ScorerConfig``,
the only thing the factory takes) builds scores the way the configuration says (projection,
thresholds, cap, views, backend), an encoder passed in is reused with the same result as a fresh
load, and nothing is downloaded when told not to.
"""
import numpy as np
import pytest
import torch

from runa_ood_node.core.boxes import BoxStatus
from runa_ood_node.core.encoder import DualEncoder, WeightsUnavailableError
from runa_ood_node.core.config import TOOL_FIELDS, ScorerConfig, from_parameters
from runa_ood_node.factory import build_scorer

TINY = "runa-tiny-vit"
BOXES = [[10, 10, 60, 60], [50, 20, 150, 100], [0, 0, 160, 120], [30, 40, 90, 110]]


@pytest.fixture(scope="module")
def image():
    return np.random.default_rng(0).integers(0, 256, (120, 160, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def projection_dir(tmp_path_factory):
    """A fine-tuned projection file as `runa-ood finetune` writes it (random values)."""
    from runa_ood_node.core.finetune import save_projection

    enc = DualEncoder.load(TINY, pretrained=None, allow_random=True)
    proj = torch.randn(enc.width, enc.embed_dim, generator=torch.Generator().manual_seed(3))
    out = tmp_path_factory.mktemp("proj") / "tuned"
    save_projection(out, proj, {"model_id": enc.model_id})
    return out, proj


def _cfg(**kw):
    """The ScorerConfig of node parameters ``kw`` (tool fields such as ``views`` passed as such)."""
    tool = {k: kw.pop(k) for k in list(kw) if k in TOOL_FIELDS}
    return from_parameters({"model": TINY, "pretrained": "", "allow_random_weights": True, "label_set": "voc",
                            "backend": "torch", **kw}, **tool)


def test_builds_what_the_config_says(image, tmp_path):
    from runa_ood_node.core.thresholds import Thresholds

    th = Thresholds(global_threshold=-2.0, per_class={"cat": 5.0}).save(tmp_path / "th.yaml")
    s = build_scorer(_cfg(label_set="bdd", max_boxes=0, thresholds_file=str(th), scorer="runa", lam=0.25))
    assert s.label_set.name == "bdd" and s.max_boxes is None and s.lam == 0.25 and s.encoder.random_weights
    r = s.score(image, BOXES)
    assert (r.status == BoxStatus.OK).all()  # max_boxes 0 = no cap
    assert (r.threshold == -2.0).all() and r.is_ood.all()  # every runa uncertainty (-cos) is > -2
    assert build_scorer(_cfg(max_boxes=2)).score(image, BOXES).status.tolist().count(BoxStatus.NOT_SCORED) == 2
    with pytest.raises(ValueError, match="lamda: unknown parameter"):
        build_scorer(_cfg(lamda=0.3))
    with pytest.raises(TypeError, match="ScorerConfig"):
        build_scorer({"model": TINY, "allow_random": True})  # an untyped mapping is refused
    with pytest.raises(ValueError, match="views"):
        build_scorer(_cfg(views="tpu"))
    with pytest.raises(WeightsUnavailableError):
        build_scorer(ScorerConfig(model=TINY, pretrained="", backend="torch"))  # no weights, random ones not allowed


def test_projection_becomes_the_regional_projection(image, projection_dir):
    path, proj = projection_dir
    tuned = build_scorer(_cfg(projection=str(path)))
    plain = build_scorer(_cfg())
    assert torch.equal(tuned.method.proj_regional, proj)  # RUNA's head: the projection parameter is its alias
    assert torch.equal(tuned.encoder.proj_global, plain.encoder.proj_global)  # P_g stays off the shelf
    a, b = tuned.score(image, BOXES).uncertainty, plain.score(image, BOXES).uncertainty
    assert np.abs(a - b).max() > 1e-4  # the dual score uses P_r
    g_t = build_scorer(_cfg(projection=str(path), ablation="global")).score(image, BOXES).uncertainty
    g_p = build_scorer(_cfg(ablation="global")).score(image, BOXES).uncertainty
    np.testing.assert_allclose(g_t, g_p, atol=1e-6)  # the global ablation does not


def test_reused_encoder_scores_like_a_fresh_load(image, projection_dir):
    """A tool that already holds the model passes it in: same scores as the node's own load; the
    config's ``projection`` becomes the encoder's P_r (none restores P_g)."""
    path, proj = projection_dir
    enc = DualEncoder.load(TINY, pretrained=None, allow_random=True)
    reused = build_scorer(_cfg(projection=str(path)), encoder=enc)
    assert reused.encoder is enc and torch.equal(reused.method.proj_regional, proj)
    fresh = build_scorer(_cfg(projection=str(path)))
    np.testing.assert_allclose(reused.score(image, BOXES).uncertainty, fresh.score(image, BOXES).uncertainty,
                               atol=1e-6)
    again = build_scorer(_cfg(projection=str(path)), encoder=enc)  # the same config again: the same P_r
    assert torch.equal(again.method.proj_regional, proj) and torch.equal(reused.method.proj_regional, proj)
    plain = build_scorer(_cfg(projection=""), encoder=enc)  # the node's empty parameter: off the shelf
    assert torch.equal(plain.method.proj_regional, enc.proj_global)
    assert torch.equal(reused.method.proj_regional, proj)  # a scorer built before keeps its own P_r
    with pytest.raises(ValueError, match="model"):
        build_scorer(ScorerConfig(model="ViT-B-32"), encoder=enc)


def test_node_settings_path_matches_a_plain_config(image):
    """The node's settings.config (node on_configure, evaluate --bag) = a tool's config with the same values;
    the node's default_threshold applies to every label and max_boxes 0 is no cap."""
    from runa_ood_node.ros.params import validate

    settings = validate({"model": TINY, "pretrained": "", "allow_random_weights": True, "backend": "torch",
                         "max_boxes": 0, "default_threshold": -0.5, "lam": 0.3})
    node = build_scorer(settings.config)
    r = node.score(image, BOXES)
    assert (r.status == BoxStatus.OK).all() and (r.threshold == -0.5).all()
    plain = build_scorer(_cfg(lam=0.3)).score(image, BOXES)
    np.testing.assert_allclose(r.uncertainty, plain.uncertainty, atol=1e-6)


def test_gpu_views_work_or_fall_back(image):
    """views='gpu' builds GpuViewMaker when it can, else the CPU views; either way frames score."""
    s = build_scorer(_cfg(views="gpu"))
    assert type(s.view_maker).__name__ in ("GpuViewMaker", "ViewMaker")
    r = s.score(image, BOXES)
    assert (r.status == BoxStatus.OK).all() and np.isfinite(r.uncertainty).all()
    assert type(build_scorer(_cfg()).view_maker).__name__ == "ViewMaker"  # CPU device: CPU views by default


def test_auto_backend_without_exports_runs_torch_and_scores_alike(image, tmp_path, monkeypatch):
    """backend auto on a machine without an engine or an ONNX export, told not to export (export
    budget 0; by default it exports and measures, tests/test_backbone_backends.py), falls back to
    torch and scores exactly like the torch backend."""
    monkeypatch.setenv("RUNA_OOD_CACHE_DIR", str(tmp_path / "empty_cache"))
    auto = build_scorer(_cfg(backend="auto", precision="fp32", backend_options={"auto_budget_s": 0}))
    assert auto.backend_choice["variant"] == "torch" and auto.backend_choice["reason"] == "fallback"
    assert auto.encoder.backend_name.startswith("torch")
    assert not any((tmp_path / "empty_cache").rglob("*.onnx"))
    np.testing.assert_allclose(auto.score(image, BOXES).uncertainty,
                               build_scorer(_cfg()).score(image, BOXES).uncertainty, atol=1e-6)


def test_never_downloads_when_told_not_to(monkeypatch):
    """A vehicle passes allow_download=False: an uncached tag fails at once, without network."""
    import open_clip

    def no_network(*args, **kwargs):
        raise AssertionError("must not try to download")

    monkeypatch.setattr(open_clip, "create_model", no_network)
    tag = open_clip.list_pretrained_tags_by_model("ViT-B-32")[0]
    with pytest.raises(WeightsUnavailableError, match="not in the local cache"):
        build_scorer(ScorerConfig(model="ViT-B-32", pretrained=tag, allow_download=False, backend="torch"))


def test_core_pipeline_does_not_import_backends():
    """core/ stays free of the optional runtimes: the factory, not the pipeline, imports backends."""
    import ast
    import pathlib

    import runa_ood_node.core as core

    def imports_backends(tree) -> list:
        """Every import of ``backends`` in ``tree``: ``import x.backends``, ``from ..backends import y``,
        ``from .. import backends`` and ``from runa_ood_node import backends``."""
        found = []
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                mod = (node.module or "").split(".")
                if "backends" in mod or any(a.name.split(".")[0] == "backends" for a in node.names):
                    found.append(f"from {'.' * node.level}{node.module or ''} import "
                                 f"{', '.join(a.name for a in node.names)}")
            elif isinstance(node, ast.Import):
                found += [a.name for a in node.names if "backends" in a.name.split(".")]
        return found

    # the guard sees each spelling (it would have passed `from .. import backends` before)
    for text in ("from .. import backends", "from ..backends import base", "import runa_ood_node.backends.base",
                 "from runa_ood_node import backends as b", "from ..backends.base import make_backend"):
        assert imports_backends(ast.parse(text)), text
    assert not imports_backends(ast.parse("from .. import registry\nimport numpy"))
    files = list(pathlib.Path(core.__file__).parent.rglob("*.py"))
    assert len(files) > 10
    for f in files:
        assert not imports_backends(ast.parse(f.read_text())), f.name
