"""core.metrics against sklearn.metrics (a test-only reference) and hand-computed cases."""
import math
import warnings

import numpy as np
import pytest

from runa_ood_node.core import metrics as M
from runa_ood_node.core.thresholds import fit_threshold

skm = pytest.importorskip("sklearn.metrics")


def _sk_inputs(id_u, ood_u):
    """sklearn convention: ID positive (label 1), score = -uncertainty."""
    y = np.r_[np.ones(len(id_u)), np.zeros(len(ood_u))]
    return y, -np.r_[id_u, ood_u]


def _openood_fpr(id_u, ood_u, tpr=0.95):
    """OpenOOD's definition on the full sklearn ROC curve."""
    y, conf = _sk_inputs(id_u, ood_u)
    fpr, tprs, _ = skm.roc_curve(y, conf, drop_intermediate=False)
    return fpr[np.argmax(tprs >= tpr)]


def _random_cases(seed, n_cases):
    rng = np.random.default_rng(seed)
    for i in range(n_cases):
        n_id, n_ood = int(rng.integers(1, 80)), int(rng.integers(1, 80))
        if i % 2:  # heavily tied integer scores
            hi = int(rng.integers(1, 5))
            yield rng.integers(0, hi + 1, n_id).astype(float), rng.integers(0, hi + 1, n_ood).astype(float)
        else:
            shift = rng.uniform(-1, 2)
            yield rng.normal(size=n_id), rng.normal(loc=shift, size=n_ood)


def test_hand_computed_case():
    id_u = np.array([0.1, 0.2, 0.3, 0.4])
    ood_u = np.array([0.35, 0.5])
    # pairs (id < ood): 0.35 beats 3 of 4 ID, 0.5 beats all 4 -> 7/8
    assert M.auroc(id_u, ood_u) == pytest.approx(7 / 8)
    # 95% of 4 -> all 4 accepted -> gamma 0.4 -> OOD 0.35 accepted -> FPR 1/2
    assert M.fpr_at_tpr(id_u, ood_u) == pytest.approx(0.5)
    assert M.fpr_at_tpr(id_u, ood_u, tpr=0.75) == pytest.approx(0.0)
    # perfect separation
    assert M.auroc([0, 1], [2, 3]) == 1.0 and M.fpr_at_tpr([0, 1], [2, 3]) == 0.0
    assert M.auroc([2, 3], [0, 1]) == 0.0 and M.fpr_at_tpr([2, 3], [0, 1]) == 1.0


def test_ties_accepted_together_in_fpr():
    # gamma = 1.0 (need all ID); OOD tied at 1.0 are accepted too
    assert M.fpr_at_tpr([0.0, 1.0], [1.0, 1.0, 2.0]) == pytest.approx(2 / 3)
    # all tied: chance level
    assert M.auroc([1.0] * 5, [1.0] * 7) == pytest.approx(0.5)
    assert M.fpr_at_tpr([1.0] * 5, [1.0] * 7) == 1.0


def test_against_sklearn_random_and_tied():
    for id_u, ood_u in _random_cases(0, 300):
        y, conf = _sk_inputs(id_u, ood_u)
        assert M.auroc(id_u, ood_u) == pytest.approx(skm.roc_auc_score(y, conf), abs=1e-12)
        assert M.aupr_in(id_u, ood_u) == pytest.approx(skm.average_precision_score(y, conf), abs=1e-12)
        assert M.aupr_out(id_u, ood_u) == pytest.approx(
            skm.average_precision_score(1 - y, -conf), abs=1e-12
        )
        assert M.fpr_at_tpr(id_u, ood_u) == pytest.approx(_openood_fpr(id_u, ood_u), abs=1e-12)
        assert M.fpr_at_tpr(id_u, ood_u, 0.8) == pytest.approx(_openood_fpr(id_u, ood_u, 0.8), abs=1e-12)


def test_roc_curve_matches_sklearn_full_curve():
    for id_u, ood_u in _random_cases(1, 100):
        y, conf = _sk_inputs(id_u, ood_u)
        fpr, tpr, thr = M.roc_curve(id_u, ood_u)
        sk_fpr, sk_tpr, sk_thr = skm.roc_curve(y, conf, drop_intermediate=False)
        np.testing.assert_allclose(fpr, sk_fpr)
        np.testing.assert_allclose(tpr, sk_tpr)
        assert thr[0] == -np.inf
        np.testing.assert_allclose(thr[1:], -sk_thr[1:])
        assert np.all(np.diff(thr) > 0)


def test_fpr_uses_the_fitted_threshold_rule():
    rng = np.random.default_rng(7)
    for _ in range(50):
        id_u, ood_u = rng.normal(size=97), rng.normal(0.5, size=61)
        gamma = fit_threshold(id_u, 0.95)
        assert M.fpr_at_tpr(id_u, ood_u) == pytest.approx(np.mean(ood_u <= gamma))


def test_nan_dropped_with_count_and_warning():
    id_u = np.array([0.1, np.nan, 0.2, 0.3])
    ood_u = np.array([0.5, np.nan, np.nan, 0.0])
    with pytest.warns(M.MetricsWarning, match="dropped"):
        s = M.summary(id_u, ood_u)
    assert s["n_id"] == 3 and s["n_ood"] == 2 and s["n_id_dropped"] == 1 and s["n_ood_dropped"] == 2
    clean = M.summary(id_u[~np.isnan(id_u)], ood_u[~np.isnan(ood_u)])
    for key in ("fpr95", "auroc", "aupr_in", "aupr_out"):
        assert s[key] == clean[key]


@pytest.mark.parametrize("id_u, ood_u", [([], [1.0, 2.0]), ([1.0], []), ([np.nan], [1.0]), ([], [])])
def test_empty_side_gives_nan_and_warning(id_u, ood_u):
    with pytest.warns(M.MetricsWarning):
        s = M.summary(id_u, ood_u)
    for key in ("fpr95", "auroc", "aupr_in", "aupr_out"):
        assert np.isnan(s[key]), key
    for fn in (M.auroc, M.aupr_in, M.aupr_out, M.fpr_at_tpr):
        with pytest.warns(M.MetricsWarning) as rec:
            assert np.isnan(fn(id_u, ood_u))
        assert any("undefined" in str(w.message) for w in rec)
    with pytest.warns(M.MetricsWarning):
        fpr, tpr, thr = M.roc_curve(id_u, ood_u)
    assert fpr.size == tpr.size == thr.size == 0


def test_summary_keys_and_no_warning_when_clean():
    rng = np.random.default_rng(3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        s = M.summary(rng.normal(size=50), rng.normal(1.0, size=40))
    assert {"fpr95", "auroc", "aupr_in", "aupr_out", "n_id", "n_ood"} <= set(s)
    assert s["n_id"] == 50 and s["n_ood"] == 40
    assert 0.0 <= s["fpr95"] <= 1.0 and 0.5 < s["auroc"] <= 1.0


def test_infinite_scores_are_valid_extremes():
    assert M.auroc([-np.inf, 0.0], [np.inf, 1.0]) == 1.0
    assert M.fpr_at_tpr([0.0, np.inf], [1.0]) == 1.0


def test_min_count_for_rate_exact():
    assert M.min_count_for_rate(10, 0.7) == 7
    assert M.min_count_for_rate(20, 0.95) == 19
    assert M.min_count_for_rate(3, 1.0) == 3
    for n in range(1, 200):
        for rate in (0.05, 0.1, 0.3, 0.5, 0.7, 0.9, 0.95, 0.99):
            c = M.min_count_for_rate(n, rate)
            assert c / n >= rate and (c == 0 or (c - 1) / n < rate)


def test_bad_tpr():
    with pytest.raises(ValueError, match="tpr"):
        M.fpr_at_tpr([1.0], [2.0], tpr=0.0)


def test_percentile_and_latency_summary_drop_non_finite_values():
    from runa_ood_node.core.metrics import latency_summary, percentile

    vals = [3.0, 1.0, float("nan"), 2.0, None, float("inf"), 10.0]
    clean = np.array([3.0, 1.0, 2.0, 10.0])
    for q in (0, 50, 95, 100):
        assert percentile(vals, q) == pytest.approx(np.percentile(clean, q))
    assert math.isnan(percentile([], 50)) and math.isnan(percentile([float("nan")], 50))
    s = latency_summary(vals)
    assert s["n"] == 4 and s["max"] == 10.0 and s["mean"] == 4.0 and s["p50"] == pytest.approx(2.5)
    assert latency_summary([]) == {"n": 0, "mean": None, "p50": None, "p90": None, "p95": None, "p99": None,
                                   "max": None}
