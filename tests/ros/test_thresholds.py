"""Tests of core.thresholds: fitting, ties, per-class fallback, YAML round trip, TPR intervals."""
import math

import numpy as np
import pytest
import yaml

from runa_ood_node.core.config import method_settings
from runa_ood_node.core.thresholds import (
    Thresholds,
    ThresholdsFileError,
    calibrate,
    fit_threshold,
    min_samples_for_tpr,
    tpr_with_ci,
)


def _runa(**values):
    """RUNA's settings with ``values`` over the table's defaults (``core.config.method_settings``)."""
    return method_settings("runa", values)


def _rate(scores, thr):
    return float(np.mean(np.asarray(scores) <= thr))


def test_fit_threshold_known_answer():
    s = np.arange(1, 21, dtype=float)  # 1..20
    # 19/20 = 0.95 accepted at 19; 18/20 < 0.95
    assert fit_threshold(s, 0.95) == 19.0
    assert fit_threshold(s, 1.0) == 20.0
    assert fit_threshold(s, 0.5) == 10.0
    # 0.7 * 10 is 7.000000000000001 in floating point: must still give the 7th value
    assert fit_threshold(np.arange(10.0), 0.7) == 6.0


def test_fit_threshold_is_smallest_that_hits_rate():
    rng = np.random.default_rng(1)
    for _ in range(200):
        n = int(rng.integers(1, 300))
        tpr = float(rng.uniform(0.05, 1.0))
        s = rng.normal(size=n)
        thr = fit_threshold(s, tpr)
        assert _rate(s, thr) >= tpr
        below = s[s < thr]
        if below.size:
            assert _rate(s, below.max()) < tpr


def test_fit_threshold_ties_accepted_together():
    s = np.array([0.0] * 10 + [1.0] * 10)
    thr = fit_threshold(s, 0.3)
    assert thr == 0.0 and _rate(s, thr) == 0.5  # all ten tied boxes accepted
    thr = fit_threshold(s, 0.51)
    assert thr == 1.0 and _rate(s, thr) == 1.0
    rng = np.random.default_rng(2)
    for _ in range(100):  # heavily tied integer scores
        s = rng.integers(0, 4, size=int(rng.integers(1, 60))).astype(float)
        tpr = float(rng.uniform(0.1, 1.0))
        thr = fit_threshold(s, tpr)
        assert _rate(s, thr) >= tpr
        assert thr in s
        if (s < thr).any():
            assert _rate(s, s[s < thr].max()) < tpr


def test_fit_threshold_ignores_nan_with_warning():
    s = np.r_[np.arange(1.0, 21.0), np.nan, np.nan]
    with pytest.warns(RuntimeWarning, match="2 NaN"):
        assert fit_threshold(s, 0.95) == 19.0


def test_fit_threshold_errors():
    with pytest.raises(ValueError):
        fit_threshold([], 0.95)
    with pytest.raises(ValueError, match="tpr"):
        fit_threshold([1.0, 2.0], 0.0)
    with pytest.raises(ValueError, match="tpr"):
        fit_threshold([1.0, 2.0], 1.5)


def test_min_samples_for_tpr():
    assert min_samples_for_tpr(0.95) == 20
    assert min_samples_for_tpr(0.99) == 100
    assert min_samples_for_tpr(0.9) == 10
    with pytest.raises(ValueError):
        min_samples_for_tpr(1.0)


def _id_set(rng, counts):
    scores, labels = [], []
    for i, (lbl, n) in enumerate(counts.items()):
        scores.append(rng.normal(loc=-0.3 + 0.02 * i, scale=0.02, size=n))
        labels += [lbl] * n
    return np.concatenate(scores), labels


def test_calibrate_per_class_hits_rate_and_small_classes_fall_back():
    rng = np.random.default_rng(3)
    scores, labels = _id_set(rng, {"car": 200, "person": 60, "bicycle": 5, "train": 19})
    thr, report = calibrate(scores, labels, tpr=0.95, min_per_class=20, meta={"scorer": "runa"})
    assert set(thr.per_class) == {"car", "person"}
    assert report["fallback_classes"] == ["bicycle", "train"]
    assert report["per_class"]["bicycle"]["fallback"] and report["per_class"]["bicycle"]["n"] == 5
    assert thr.for_label("bicycle") == thr.global_threshold == report["global_threshold"]
    assert thr.for_label("never-seen") == thr.global_threshold
    assert thr.for_label(None) == thr.global_threshold
    lab = np.asarray(labels)
    for cls in ("car", "person"):
        assert thr.for_label(cls) == fit_threshold(scores[lab == cls], 0.95)
        assert _rate(scores[lab == cls], thr.for_label(cls)) >= 0.95
    assert _rate(scores, thr.global_threshold) >= 0.95
    assert thr.meta["n"] == 284 and thr.meta["n_per_class"]["train"] == 19 and thr.meta["scorer"] == "runa"
    np.testing.assert_allclose(thr.for_labels(["car", "bicycle"]), [thr.per_class["car"], thr.global_threshold], rtol=1e-6)


def test_calibrate_refuses_too_small_set():
    with pytest.raises(ValueError, match="at least .* 20"):
        calibrate(np.zeros(19), ["a"] * 19, tpr=0.95)
    # NaN boxes do not count
    s = np.r_[np.zeros(19), np.nan]
    with pytest.raises(ValueError, match="1 NaN dropped"):
        calibrate(s, ["a"] * 20, tpr=0.95)
    thr, report = calibrate(np.arange(20.0), ["a"] * 20, tpr=0.95, min_per_class=1)
    # min_per_class below the statistical minimum is raised to it
    assert report["min_required"] == 20 and thr.per_class == {"a": 18.0}


def test_calibrate_errors():
    with pytest.raises(ValueError, match="entries"):
        calibrate(np.zeros(30), ["a"] * 29)
    with pytest.raises(ValueError, match="tpr"):
        calibrate(np.zeros(30), ["a"] * 30, tpr=1.0)


def test_save_load_round_trip(tmp_path):
    rng = np.random.default_rng(4)
    scores, labels = _id_set(rng, {"car": 100, "bus": 3})
    thr, _ = calibrate(scores, labels, meta={"model_id": "ViT-B-16/openai", "scorer": "runa", "label_set": "bdd"})
    path = thr.save(tmp_path / "sub" / "thresholds.yaml")
    raw = yaml.safe_load(path.read_text())
    assert set(raw) >= {"tpr", "global", "per_class", "meta"}
    assert set(raw["meta"]) >= {"n_per_class", "model_id", "scorer", "label_set", "created"}
    back = Thresholds.load(path)
    assert back.global_threshold == thr.global_threshold
    assert back.per_class == thr.per_class and back.tpr == thr.tpr
    assert back.meta["n_per_class"] == {"bus": 3, "car": 100}
    # an old-style file (no fit identity): every check reports that nothing vouches for its units
    wrong = back.check_compatible({"scorer": "runa"})
    assert len(wrong) == 1 and "no fit identity" in wrong[0]


def test_save_fills_missing_meta_keys(tmp_path):
    path = Thresholds(-0.25, {}, 0.95, {}).save(tmp_path / "t.yaml")
    raw = yaml.safe_load(path.read_text())
    assert raw["meta"]["model_id"] is None and raw["meta"]["created"]


@pytest.mark.parametrize(
    "content, match",
    [
        ("- 1\n- 2\n", "mapping"),
        ("tpr: 0.95\n", r"missing key\(s\) \['global'\]"),
        ("tpr: 0.95\nglobal: abc\n", "global must be a number"),
        ("tpr: 1.5\nglobal: 0.1\n", "tpr must be in"),
        ("tpr: 0.95\nglobal: 0.1\nper_class: [1, 2]\n", "per_class must be a mapping"),
        ("tpr: 0.95\nglobal: 0.1\nper_class: {car: null}\n", r"per_class\['car'\]"),
        ("tpr: 0.95\nglobal: .nan\n", "NaN"),
        ("tpr: [0.95\n", "not valid YAML"),
        ("format_version: 7\ntpr: 0.95\nglobal: 0.1\n", "format_version"),
    ],
)
def test_load_validation(tmp_path, content, match):
    p = tmp_path / "bad.yaml"
    p.write_text(content)
    with pytest.raises(ThresholdsFileError, match=match) as exc:
        Thresholds.load(p)
    assert str(p) in str(exc.value)


def test_load_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.yaml"):
        Thresholds.load(tmp_path / "nope.yaml")


def test_tpr_with_ci_known_values():
    s = np.arange(100.0)
    tpr, lo, hi = tpr_with_ci(s, 94.0)  # 95 of 100 accepted
    assert tpr == 0.95
    # Wilson 95% interval for 95/100: (0.8883, 0.9785)
    assert lo == pytest.approx(0.8883, abs=5e-4) and hi == pytest.approx(0.9785, abs=5e-4)
    tpr, lo, hi = tpr_with_ci(s, 94.0, method="clopper-pearson")
    # exact interval for 95/100: (0.8872, 0.9836)
    assert lo == pytest.approx(0.8872, abs=5e-4) and hi == pytest.approx(0.9836, abs=5e-4)
    # all accepted: upper bound 1
    tpr, lo, hi = tpr_with_ci(s, 1e9)
    assert tpr == 1.0 and hi == 1.0 and lo < 1.0


def test_clopper_pearson_matches_scipy():
    stats = pytest.importorskip("scipy.stats")
    for k, n, conf in [(95, 100, 0.95), (3, 40, 0.9), (199, 200, 0.99), (1, 1, 0.95), (0, 7, 0.95)]:
        s = np.r_[np.zeros(k), np.ones(n - k)]
        _, lo, hi = tpr_with_ci(s, 0.5, confidence=conf, method="clopper-pearson")
        a = 1 - conf
        ref_lo = 0.0 if k == 0 else stats.beta.ppf(a / 2, k, n - k + 1)
        ref_hi = 1.0 if k == n else stats.beta.ppf(1 - a / 2, k + 1, n - k)
        assert lo == pytest.approx(ref_lo, abs=1e-9) and hi == pytest.approx(ref_hi, abs=1e-9)


@pytest.mark.parametrize("method", ["wilson", "clopper-pearson"])
def test_heldout_true_tpr_falls_in_ci(method):
    """Fit on one ID sample; the true TPR of that threshold lies in the CI from a held-out sample."""
    rng = np.random.default_rng(5)
    trials, hits = 300, 0
    for _ in range(trials):
        fit = rng.uniform(0.0, 1.0, size=200)  # U(0,1): true TPR at gamma is gamma itself
        gamma = fit_threshold(fit, 0.95)
        held = rng.uniform(0.0, 1.0, size=150)
        _, lo, hi = tpr_with_ci(held, gamma, 0.95, method=method)
        hits += lo <= min(max(gamma, 0.0), 1.0) <= hi
    assert hits / trials >= 0.9


def test_tpr_with_ci_errors():
    with pytest.raises(ValueError):
        tpr_with_ci([], 0.0)
    with pytest.raises(ValueError, match="confidence"):
        tpr_with_ci([1.0], 0.0, confidence=1.0)
    with pytest.raises(ValueError, match="wilson"):
        tpr_with_ci([1.0], 0.0, method="bayes")


def test_thresholds_validation():
    with pytest.raises(ValueError):
        Thresholds(float("nan"))
    with pytest.raises(ValueError):
        Thresholds(0.1, {"car": float("nan")})
    with pytest.raises(ValueError):
        Thresholds(0.1, tpr=0.0)
    assert math.isinf(Thresholds(float("inf")).global_threshold)


# ------------------------------------------------------------------ what the thresholds were fitted for
def _fitted_file(tmp_path, tiny_encoder, **scorer_kw):
    """A thresholds file fitted (calibrate) on the scores of an OodScorer built with ``scorer_kw``."""
    from runa_ood_node.core.pipeline import OodScorer
    from runa_ood_node.core.thresholds import fit_identity

    sc = OodScorer(tiny_encoder, "voc", **scorer_kw)
    rng = np.random.default_rng(0)
    thr, _ = calibrate(rng.normal(-0.3, 0.02, 40), ["car"] * 40, meta={"fitted_for": fit_identity(sc)})
    return thr.save(tmp_path / "thr.yaml")


def test_identity_names_every_setting_the_units_depend_on(tiny_encoder):
    from runa_ood_node.core.pipeline import OodScorer
    from runa_ood_node.core.thresholds import IDENTITY_KEYS, fit_identity

    base = fit_identity(OodScorer(tiny_encoder, "voc"))
    assert tuple(base) == IDENTITY_KEYS
    assert base["weights"] == tiny_encoder.weights_id and base["projection"] == "off-the-shelf"
    changed = {
        "lam": fit_identity(OodScorer(tiny_encoder, "voc", settings=_runa(lam=0.7))),
        "blur_radius": fit_identity(OodScorer(tiny_encoder, "voc", settings=_runa(blur_radius=2.0))),
        "scorer": fit_identity(OodScorer(tiny_encoder, "voc", scorer="energy")),
        "label_set": fit_identity(OodScorer(tiny_encoder, "coco")),
    }
    for key, ident in changed.items():
        assert ident[key] != base[key], key
    # same names, other prompts: the label set's content hash differs
    from runa_ood_node.core.labels import LabelSet, load_label_set

    voc = load_label_set("voc")
    other = LabelSet("voc", voc.labels, templates=("a picture of a {label}",))
    assert fit_identity(OodScorer(tiny_encoder, other))["label_set_hash"] != base["label_set_hash"]
    # single-view ablations: lam is what they use (1 / 0), blur does not matter for the crop alone
    reg = fit_identity(OodScorer(tiny_encoder, "voc", ablation="regional", settings=_runa(lam=0.3, blur_radius=5.0)))
    assert reg["lam"] == 1.0 and reg["blur_radius"] is None
    assert reg == fit_identity(OodScorer(tiny_encoder, "voc", ablation="regional"))


def test_fine_tuned_projection_changes_the_identity(tiny_encoder):
    import torch

    from runa_ood_node.core.pipeline import OodScorer
    from runa_ood_node.core.thresholds import fit_identity

    from runa_ood_node.core.methods.heads import Head

    P = tiny_encoder.proj_global
    head = Head("runa", {"proj_regional": P + 0.01 * torch.ones_like(P)}, {}, "tuned")  # RUNA's P_r is its head
    ident = fit_identity(OodScorer(tiny_encoder, "voc", head=head))
    assert ident["projection"].startswith("sha256:")


def test_file_fitted_at_lam_05_is_refused_at_07_and_the_override_reports_it(tmp_path, tiny_encoder):
    from runa_ood_node.core.pipeline import OodScorer
    from runa_ood_node.core.thresholds import ThresholdsMismatchError, check_fit, fit_identity

    thr = Thresholds.load(_fitted_file(tmp_path, tiny_encoder, settings=_runa(lam=0.5)))
    assert check_fit(thr, OodScorer(tiny_encoder, "voc", settings=_runa(lam=0.5))) == []
    at07 = OodScorer(tiny_encoder, "voc", settings=_runa(lam=0.7))
    with pytest.raises(ThresholdsMismatchError) as err:
        check_fit(thr, at07, source="thr.yaml")
    assert err.value.mismatches == ["lam: fitted for 0.5, in use is 0.7"]
    assert "thr.yaml" in str(err.value) and "runa-ood calibrate" in str(err.value)
    assert check_fit(thr, at07, allow_mismatch=True) == ["lam: fitted for 0.5, in use is 0.7"]
    # several differences are all named
    other = OodScorer(tiny_encoder, "coco", settings=_runa(lam=0.7), scorer="mcm")
    keys = {w.split(":")[0] for w in thr.check_compatible(fit_identity(other))}
    assert keys == {"lam", "scorer", "temperature", "label_set", "label_set_hash"}


def test_a_file_fitted_for_the_runa_scorer_checks_against_max_cosine(tmp_path, tiny_encoder):
    """The scorer was renamed (runa -> max_cosine, core.registry.SCORER_ALIASES): a file recording the old name
    fits a scorer built with either name, and not another scorer."""
    from runa_ood_node.core.pipeline import OodScorer
    from runa_ood_node.core.thresholds import check_fit, fit_identity

    ident = fit_identity(OodScorer(tiny_encoder, "voc"))
    assert ident["scorer"] == "max_cosine"
    old = Thresholds(-0.3, {}, 0.95, {"fitted_for": {**ident, "scorer": "runa"}}).save(tmp_path / "old.yaml")
    thr = Thresholds.load(old)
    assert check_fit(thr, OodScorer(tiny_encoder, "voc")) == []
    assert check_fit(thr, OodScorer(tiny_encoder, "voc", scorer="runa")) == []
    assert [w.split(":")[0] for w in thr.check_compatible({"scorer": "sum"})] == ["scorer"]


def test_old_file_without_identity_is_refused_unless_overridden(tmp_path, tiny_encoder):
    from runa_ood_node.core.pipeline import OodScorer
    from runa_ood_node.core.thresholds import ThresholdsMismatchError, check_fit

    old = Thresholds(-0.3, {}, 0.95, {"scorer": "runa", "label_set": "voc"})
    sc = OodScorer(tiny_encoder, "voc")
    with pytest.raises(ThresholdsMismatchError, match="Re-calibrate"):
        check_fit(old, sc)
    assert check_fit(old, sc, allow_mismatch=True)


def test_node_configure_refuses_a_mismatch_and_the_override_marks_it(tmp_path, tiny_encoder):
    rclpy = pytest.importorskip("rclpy")
    pytest.importorskip("runa_ood_msgs.msg")
    from rclpy.lifecycle import TransitionCallbackReturn as R
    from rclpy.parameter import Parameter

    from runa_ood_node.ros.node import RunaOodNode

    path = _fitted_file(tmp_path, tiny_encoder, settings=_runa(lam=0.5))
    base = {"model": "runa-tiny-vit", "pretrained": "", "allow_random_weights": True, "backend": "torch",
            "thresholds_file": str(path), "autostart": False}
    ctx = rclpy.Context()
    rclpy.init(context=ctx)
    nodes = []
    try:
        def node(name, **kw):
            n = RunaOodNode(name, context=ctx, parameter_overrides=[
                Parameter(k, value=v) for k, v in {**base, **kw}.items()])
            nodes.append(n)
            return n

        ok = node("thr_ok", lam=0.5)
        assert ok.trigger_configure() == R.SUCCESS, ok.last_error
        assert ok.thresholds_mismatch == []
        bad = node("thr_bad", lam=0.7)
        assert bad.trigger_configure() == R.FAILURE
        assert "lam: fitted for 0.5, in use is 0.7" in bad.last_error and bad.scorer is None
        forced = node("thr_forced", lam=0.7, thresholds_allow_mismatch=True)
        assert forced.trigger_configure() == R.SUCCESS, forced.last_error
        assert forced.thresholds_mismatch == ["lam: fitted for 0.5, in use is 0.7"]
        assert forced.scorer.thresholds.for_label("car") == pytest.approx(Thresholds.load(path).for_label("car"))
    finally:
        for n in nodes:
            n.destroy_node()
        rclpy.shutdown(context=ctx)
