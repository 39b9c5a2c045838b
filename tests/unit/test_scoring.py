"""Known-answer tests of core.scoring on constructed embeddings."""
import math

import numpy as np
import pytest
import torch

from runa_ood_node.core.scoring import SCORERS as METHODS, ScoreOutput, cosine_similarities, score


def _basis(k, d):
    """K orthonormal text embeddings e_0..e_{K-1} in R^D."""
    return np.eye(d)[:k]


def test_every_registered_scorer_is_implemented_distinct_and_offered_by_the_tools():
    """The registry's names are what score() implements (each a different function of the
    similarities) and exactly what the tools' --scorer accepts."""
    import argparse

    from runa_ood_node.core import scoring
    from runa_ood_node.core.registry import SCORERS
    from runa_ood_node.tools.common import add_scoring_arguments

    outs = {m: tuple(np.round(score(SIMS, m, temperature=0.5).uncertainty, 6)) for m in SCORERS}
    assert len(set(outs.values())) == len(SCORERS) == len(METHODS)
    assert not hasattr(scoring, "METHODS")  # the OOD methods' registry name (core.registry.METHODS) is not reused
    parser = argparse.ArgumentParser()
    add_scoring_arguments(parser)
    assert [parser.parse_args(["--scorer", m]).scorer for m in SCORERS] == list(SCORERS)
    with pytest.raises(SystemExit):
        parser.parse_args(["--scorer", "maxlogit"])


def test_the_old_scorer_name_runa_is_max_cosine():
    from runa_ood_node.core.registry import SCORER_ALIASES, canonical_scorer

    assert SCORER_ALIASES == {"runa": "max_cosine"} and "runa" not in METHODS
    assert canonical_scorer("runa") == "max_cosine" and canonical_scorer("mcm") == "mcm"
    np.testing.assert_array_equal(score(SIMS, "runa").uncertainty, score(SIMS, "max_cosine").uncertainty)
    np.testing.assert_allclose(score(SIMS).uncertainty, -np.asarray(SIMS).max(1), rtol=1e-6)  # -max cosine


def test_cosine_orthonormal_known_values_numpy():
    txt = _basis(3, 4)
    # unnormalised on purpose: 2*e0 -> cos 1 with e0; (e0+e1) -> 1/sqrt2 with e0 and e1; e3 -> 0
    img = np.array([[2.0, 0, 0, 0], [1.0, 1.0, 0, 0], [0, 0, 0, 5.0], [-1.0, 0, 0, 0]])
    sims = cosine_similarities(img, txt)
    assert isinstance(sims, np.ndarray)
    r = 1 / math.sqrt(2)
    expected = np.array([[1, 0, 0], [r, r, 0], [0, 0, 0], [-1, 0, 0]])
    np.testing.assert_allclose(sims, expected, atol=1e-12)


def test_cosine_torch_in_torch_out_matches_numpy():
    rng = np.random.default_rng(0)
    img = rng.normal(size=(5, 8)).astype(np.float32)
    txt = rng.normal(size=(3, 8)).astype(np.float32)
    s_np = cosine_similarities(img, txt)
    s_t = cosine_similarities(torch.from_numpy(img), torch.from_numpy(txt))
    assert isinstance(s_t, torch.Tensor) and s_t.shape == (5, 3) and s_t.dtype == torch.float32
    assert s_np.dtype == np.float32
    np.testing.assert_allclose(s_t.numpy(), s_np, atol=1e-6)
    # scale invariance: normalisation happens inside
    np.testing.assert_allclose(cosine_similarities(img * 7.0, txt * 0.1), s_np, atol=1e-6)


def test_cosine_zero_vector_gives_zero_not_nan():
    sims = cosine_similarities(np.zeros((1, 4)), _basis(2, 4))
    np.testing.assert_array_equal(sims, np.zeros((1, 2)))


def test_cosine_empty_boxes():
    sims = cosine_similarities(np.zeros((0, 4), np.float32), _basis(3, 4).astype(np.float32))
    assert sims.shape == (0, 3)
    st = cosine_similarities(torch.zeros(0, 4), torch.eye(4)[:3])
    assert st.shape == (0, 3)


@pytest.mark.parametrize(
    "img, txt, match",
    [
        (np.zeros((2, 4)), np.zeros((3, 5)), "D=4.*D=5"),
        (np.zeros(4), np.zeros((3, 4)), r"\[M, D\]"),
        (np.zeros((2, 4)), np.zeros((0, 4)), "K >= 1"),
    ],
)
def test_cosine_bad_shapes(img, txt, match):
    with pytest.raises(ValueError, match=match):
        cosine_similarities(img, txt)


def test_cosine_mixed_types_rejected():
    with pytest.raises(TypeError):
        cosine_similarities(torch.zeros(1, 3), np.zeros((1, 3)))


# sims rows for the known-answer tests
SIMS = np.array([[0.3, 0.1, -0.2], [0.0, 0.5, 0.5]])


def test_runa_is_negative_max_similarity():
    out = score(SIMS, "runa")
    assert isinstance(out, ScoreOutput)
    np.testing.assert_allclose(out.uncertainty, [-0.3, -0.5], atol=1e-7)
    np.testing.assert_array_equal(out.label_idx, [0, 1])  # first of tied maxima
    np.testing.assert_allclose(out.similarity, [0.3, 0.5], atol=1e-7)
    assert out.uncertainty.dtype == np.float32 and out.label_idx.dtype == np.int64


def test_sum_is_negative_sum():
    out = score(SIMS, "sum")
    np.testing.assert_allclose(out.uncertainty, [-0.2, -1.0], atol=1e-7)
    np.testing.assert_array_equal(out.label_idx, [0, 1])


@pytest.mark.parametrize("t", [1.0, 0.01, 100.0])
def test_mcm_is_negative_max_softmax(t):
    out = score(SIMS, "mcm", temperature=t)
    for row, u in zip(SIMS, out.uncertainty):
        e = np.exp(row / t)
        assert u == pytest.approx(-(e.max() / e.sum()), rel=1e-6, abs=1e-7)


def test_mcm_hand_value_and_uniform_limit():
    # two equal similarities at T=1 -> softmax 1/2 for each -> uncertainty -0.5
    out = score(np.array([[0.2, 0.2]]), "mcm", temperature=1.0)
    assert out.uncertainty[0] == pytest.approx(-0.5)
    # huge T flattens the softmax to 1/K for any row
    out = score(SIMS, "mcm", temperature=1e9)
    np.testing.assert_allclose(out.uncertainty, [-1 / 3, -1 / 3], atol=1e-6)


@pytest.mark.parametrize("t", [1.0, 0.05])
def test_energy_is_negative_t_logsumexp(t):
    out = score(SIMS, "energy", temperature=t)
    for row, u in zip(SIMS, out.uncertainty):
        assert u == pytest.approx(-t * math.log(np.exp(row / t).sum()), rel=1e-6)


def test_energy_tends_to_runa_for_small_t():
    out = score(SIMS, "energy", temperature=1e-4)
    np.testing.assert_allclose(out.uncertainty, score(SIMS, "runa").uncertainty, atol=1e-3)


def test_energy_stable_for_tiny_temperature():
    out = score(np.array([[0.9, -0.9]]), "energy", temperature=1e-6)
    assert np.isfinite(out.uncertainty).all()
    assert out.uncertainty[0] == pytest.approx(-0.9, abs=1e-5)


def test_id_box_less_uncertain_than_ood_box_for_every_method():
    txt = _basis(3, 6)
    id_box = np.array([[0.9, 0.1, 0.0, 0.3, 0.0, 0.0]])  # close to class 0
    ood_box = np.array([[0.1, 0.1, 0.1, 0.0, 0.9, 0.9]])  # far from all classes
    sims = cosine_similarities(np.vstack([id_box, ood_box]), txt)
    for m in METHODS:
        u = score(sims, m).uncertainty
        assert u[0] < u[1], m


def test_torch_input_gives_numpy_output():
    out = score(torch.tensor(SIMS, dtype=torch.float32), "runa")
    assert isinstance(out.uncertainty, np.ndarray)
    np.testing.assert_allclose(out.uncertainty, [-0.3, -0.5], atol=1e-6)


@pytest.mark.parametrize("method", METHODS)
def test_zero_boxes(method):
    out = score(np.zeros((0, 4)), method)
    assert out.uncertainty.shape == (0,) and out.label_idx.shape == (0,) and out.similarity.shape == (0,)


def test_nonfinite_row_is_nan_with_label_minus_one():
    sims = np.array([[0.2, np.nan], [0.4, 0.1], [np.inf, 0.0]])
    out = score(sims, "runa")
    assert np.isnan(out.uncertainty[0]) and np.isnan(out.uncertainty[2])
    assert out.uncertainty[1] == pytest.approx(-0.4)
    np.testing.assert_array_equal(out.label_idx, [-1, 0, -1])


def test_unknown_method_lists_valid_ones():
    with pytest.raises(ValueError) as exc:
        score(SIMS, "maxlogit")
    for m in METHODS:
        assert m in str(exc.value)


@pytest.mark.parametrize("t", [0.0, -1.0, float("nan"), float("inf")])
def test_bad_temperature(t):
    with pytest.raises(ValueError, match="temperature"):
        score(SIMS, "mcm", temperature=t)


def test_bad_sims_shape():
    with pytest.raises(ValueError):
        score(np.zeros(3), "runa")
    with pytest.raises(ValueError, match="K=0"):
        score(np.zeros((2, 0)), "runa")
