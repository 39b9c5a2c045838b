"""Object-level OOD evaluation metrics: FPR@95%TPR, AUROC, AUPR-In, AUPR-Out (numpy only).

Inputs are **uncertainties** (higher = more OOD, as produced by ``core.scoring``) of ID boxes and
of OOD boxes. Convention, as in MCM, VOS and OpenOOD (pytorch-ood uses the opposite one):

* **ID is the positive class.** The ID "confidence" is ``-uncertainty``; a box is accepted as ID
  when ``uncertainty <= threshold``.
* TPR = fraction of ID boxes accepted, FPR = fraction of OOD boxes accepted (false positives).
* ``fpr_at_tpr(tpr=0.95)`` (FPR95): the threshold is the smallest ``gamma`` with
  ``fraction(id <= gamma) >= tpr`` (``threshold_at_tpr``, which is also what
  ``thresholds.fit_threshold`` fits), and FPR = ``fraction(ood <= gamma)``. Tied scores are
  accepted together. This equals OpenOOD's ``fpr[argmax(tpr >= 0.95)]`` on the full (not
  thinned) sklearn ROC curve.
* AUROC: area under the full ROC curve (trapezoids; ties count one half, as sklearn).
* AUPR-In: average precision with ID positive, score ``-uncertainty``; AUPR-Out: average precision
  with OOD positive, score ``uncertainty`` (both as sklearn's ``average_precision_score``).

All metrics are fractions in [0, 1] (not percent). NaN uncertainties (boxes that were not scored)
are dropped and counted (``summary`` reports the counts, a ``MetricsWarning`` is issued); when a
side is empty after dropping, metrics are NaN and a ``MetricsWarning`` says why (no exception).
+-inf are valid, extreme scores.
"""
from __future__ import annotations

import math
import warnings
from typing import Tuple

import numpy as np

__all__ = [
    "MetricsWarning",
    "threshold_at_tpr",
    "min_count_for_rate",
    "roc_curve",
    "auroc",
    "aupr_in",
    "aupr_out",
    "fpr_at_tpr",
    "summary",
    "percentile",
    "latency_summary",
    "LATENCY_PERCENTILES",
]


class MetricsWarning(UserWarning):
    """Issued when scores are dropped (NaN) or a metric is undefined (an empty side)."""


def min_count_for_rate(n: int, rate: float) -> int:
    """Smallest integer ``c`` in ``[0, n]`` with ``c / n >= rate`` (exact float comparison).

    ``math.ceil(rate * n)`` alone is wrong for e.g. ``rate=0.7, n=10`` (``0.7*10`` is
    ``7.000000000000001`` in floating point), so the candidate is corrected downwards.
    """
    if n <= 0:
        raise ValueError(f"n must be >= 1, got {n}")
    c = min(n, max(0, math.ceil(rate * n)))
    while c > 0 and (c - 1) / n >= rate:
        c -= 1
    while c < n and c / n < rate:
        c += 1
    return c


def _check_rate(tpr: float) -> float:
    t = float(tpr)
    if not (0.0 < t <= 1.0):
        raise ValueError(f"tpr must be in (0, 1], got {tpr!r}")
    return t


def threshold_at_tpr(id_scores, tpr: float = 0.95) -> float:
    """Smallest ``gamma`` with ``fraction(id_scores <= gamma) >= tpr``.

    ``id_scores`` are ID uncertainties without NaN (NaN raises: drop them first). The answer is
    always one of the scores, so ties are exact: all boxes tied at ``gamma`` are accepted.

    Raises:
        ValueError: empty input, NaN in input, or tpr outside (0, 1].
    """
    t = _check_rate(tpr)
    s = np.sort(np.asarray(id_scores, dtype=np.float64).ravel())
    if s.size == 0:
        raise ValueError("cannot fit a threshold on zero ID scores")
    if np.isnan(s).any():
        raise ValueError("ID scores contain NaN; drop unscored boxes first")
    c = min_count_for_rate(s.size, t)
    return float(s[max(c, 1) - 1])


def _clean(scores, name: str) -> Tuple[np.ndarray, int]:
    a = np.asarray(scores, dtype=np.float64).ravel()
    nan = np.isnan(a)
    n_nan = int(nan.sum())
    if n_nan:
        warnings.warn(f"{name}: dropped {n_nan} NaN score(s) of {a.size}", MetricsWarning, stacklevel=3)
        a = a[~nan]
    return a, n_nan


def _prepare(id_scores, ood_scores):
    """Cleaned (id, ood) arrays, or None with a warning when a side is empty."""
    id_s, _ = _clean(id_scores, "id_scores")
    ood_s, _ = _clean(ood_scores, "ood_scores")
    if id_s.size == 0 or ood_s.size == 0:
        empty = [n for n, a in (("ID", id_s), ("OOD", ood_s)) if a.size == 0]
        warnings.warn(
            f"no {' and no '.join(empty)} scores (after dropping NaN): metric is undefined, returning NaN",
            MetricsWarning,
            stacklevel=3,
        )
        return None
    return id_s, ood_s


def _binary_clf_curve(pos: np.ndarray, neg: np.ndarray):
    """Cumulative (tps, fps, thresholds) over distinct score values, score descending.

    ``pos``/``neg`` are *scores* where higher means "positive". Mirrors sklearn's
    ``_binary_clf_curve``: one point per distinct score, ties included together.
    """
    y = np.concatenate([np.ones(pos.size, dtype=np.int64), np.zeros(neg.size, dtype=np.int64)])
    s = np.concatenate([pos, neg])
    order = np.argsort(-s, kind="mergesort")
    s = s[order]
    y = y[order]
    # last index of each run of equal scores (a threshold accepts all tied scores at once)
    distinct = np.where(np.diff(s) != 0)[0]
    ends = np.r_[distinct, s.size - 1]
    tps = np.cumsum(y)[ends]
    fps = (ends + 1) - tps
    return tps, fps, s[ends]


def roc_curve(id_scores, ood_scores):
    """Full ROC curve with ID positive (no points dropped).

    Returns:
        ``(fpr, tpr, thresholds)``: float arrays of equal length. Point ``i`` accepts as ID every
        box with ``uncertainty <= thresholds[i]``; ``thresholds`` increase, the first is ``-inf``
        (nothing accepted, ``fpr = tpr = 0``). Equivalent to
        ``sklearn.metrics.roc_curve(y, -u, drop_intermediate=False)`` with ``thresholds = -sklearn's``.
        Empty arrays (with a ``MetricsWarning``) when a side is empty.
    """
    prep = _prepare(id_scores, ood_scores)
    if prep is None:
        return np.array([]), np.array([]), np.array([])
    id_s, ood_s = prep
    tps, fps, conf = _binary_clf_curve(-id_s, -ood_s)
    fpr = np.r_[0.0, fps / ood_s.size]
    tpr = np.r_[0.0, tps / id_s.size]
    thresholds = np.r_[-np.inf, -conf]
    return fpr, tpr, thresholds


def auroc(id_scores, ood_scores) -> float:
    """Area under the ROC curve, ID positive (0.5 = chance, 1 = perfect separation). NaN if a side is empty."""
    fpr, tpr, _ = roc_curve(id_scores, ood_scores)
    if fpr.size == 0:
        return float("nan")
    return float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2.0))


def _average_precision(pos: np.ndarray, neg: np.ndarray) -> float:
    tps, fps, _ = _binary_clf_curve(pos, neg)
    precision = tps / (tps + fps)
    recall = tps / pos.size
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def aupr_in(id_scores, ood_scores) -> float:
    """Average precision with ID as positive class and ``-uncertainty`` as score. NaN if a side is empty."""
    prep = _prepare(id_scores, ood_scores)
    if prep is None:
        return float("nan")
    id_s, ood_s = prep
    return _average_precision(-id_s, -ood_s)


def aupr_out(id_scores, ood_scores) -> float:
    """Average precision with OOD as positive class and ``uncertainty`` as score. NaN if a side is empty."""
    prep = _prepare(id_scores, ood_scores)
    if prep is None:
        return float("nan")
    id_s, ood_s = prep
    return _average_precision(ood_s, id_s)


def fpr_at_tpr(id_scores, ood_scores, tpr: float = 0.95) -> float:
    """Fraction of OOD boxes accepted as ID at the threshold that accepts >= ``tpr`` of ID boxes.

    ``gamma = threshold_at_tpr(id_scores, tpr)`` (smallest gamma with
    ``fraction(id <= gamma) >= tpr``), FPR = ``fraction(ood <= gamma)``; OOD boxes tied with
    ``gamma`` are accepted (false positives). NaN (with a warning) when a side is empty.
    """
    _check_rate(tpr)
    prep = _prepare(id_scores, ood_scores)
    if prep is None:
        return float("nan")
    id_s, ood_s = prep
    gamma = threshold_at_tpr(id_s, tpr)
    return float(np.count_nonzero(ood_s <= gamma) / ood_s.size)


def summary(id_scores, ood_scores, tpr: float = 0.95) -> dict:
    """All metrics at once.

    Returns:
        dict with ``fpr95`` (FPR at ``tpr``, 0.95 by default), ``auroc``, ``aupr_in``,
        ``aupr_out`` (fractions, NaN when undefined), ``n_id``, ``n_ood`` (boxes used, after
        dropping NaN), ``n_id_dropped``, ``n_ood_dropped`` (NaN scores dropped) and ``tpr``.
    """
    id_s, n_id_nan = _clean(id_scores, "id_scores")
    ood_s, n_ood_nan = _clean(ood_scores, "ood_scores")
    with warnings.catch_warnings():
        # the per-metric "empty side" warnings would repeat 4 times: issue one below instead
        warnings.simplefilter("ignore", MetricsWarning)
        out = {
            "fpr95": fpr_at_tpr(id_s, ood_s, tpr),
            "auroc": auroc(id_s, ood_s),
            "aupr_in": aupr_in(id_s, ood_s),
            "aupr_out": aupr_out(id_s, ood_s),
        }
    if id_s.size == 0 or ood_s.size == 0:
        warnings.warn(
            f"summary: n_id={id_s.size}, n_ood={ood_s.size}: metrics are NaN", MetricsWarning, stacklevel=2
        )
    out.update(
        n_id=int(id_s.size),
        n_ood=int(ood_s.size),
        n_id_dropped=n_id_nan,
        n_ood_dropped=n_ood_nan,
        tpr=float(tpr),
    )
    return out


#: box size bins of :func:`breakdown` (``sqrt(w * h)`` in pixels; COCO's small / medium / large areas)
SIZE_BINS = (("<32", 0.0, 32.0), ("32-96", 32.0, 96.0), (">96", 96.0, float("inf")))


def size_bin_names(sizes) -> np.ndarray:
    """The :data:`SIZE_BINS` name of each box size ``sqrt(w * h)`` (``""`` for NaN)."""
    sizes = np.asarray(sizes, dtype=np.float64)
    out = np.full(sizes.shape, "", dtype=object)
    for name, lo, hi in SIZE_BINS:
        out[(sizes >= lo) & (sizes < hi)] = name
    return out


def breakdown(uncertainty, is_id, groups=None, sizes=None, size_mask=None, tpr: float = 0.95) -> dict:
    """Metrics per OOD group and per box size: which OOD is found, and how small it may be.

    Args:
        uncertainty: ``[B]`` scores (higher = more OOD); NaN = not scored (dropped and counted by
            :func:`summary`).
        is_id: bool ``[B]``; ID is the positive class, as everywhere here.
        groups: ``[B]`` OOD group names of the boxes (``""`` unknown; ID boxes' group is ignored).
        sizes: ``[B]`` box sizes ``sqrt(w * h)`` in pixels, for the size bins :data:`SIZE_BINS`.
        size_mask: bool ``[B]``: the boxes the size bins are computed on (e.g. the frames of one
            resolution, since a pixel size means something else at another); None = all.

    Returns:
        ``{"by_group": {group: summary(ID boxes, OOD boxes of that group)},
        "by_size": {bin: {"all": summary(ID in bin, OOD in bin), group: summary(ID in bin, that
        group's OOD in bin), ...}}}``: each a :func:`summary` dict with its counts, so every figure
        says how many boxes it stands on. Groups named only on ID boxes (``"id"``) are not OOD groups.
    """
    u = np.asarray(uncertainty, dtype=np.float64)
    is_id = np.asarray(is_id, dtype=bool)
    g = np.asarray(groups if groups is not None else [""] * len(u), dtype=object)
    ood_groups = sorted({str(x) for x in g[~is_id] if x})
    out: dict = {"by_group": {}, "by_size": {}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", MetricsWarning)
        for name in ood_groups:
            out["by_group"][name] = summary(u[is_id], u[~is_id & (g == name)], tpr)
        if sizes is not None:
            bins = size_bin_names(sizes)
            keep = np.ones(len(u), bool) if size_mask is None else np.asarray(size_mask, dtype=bool)
            for name, _, _ in SIZE_BINS:
                inb = keep & (bins == name)
                row = {"all": summary(u[is_id & inb], u[~is_id & inb], tpr)}
                for gname in ood_groups:
                    row[gname] = summary(u[is_id & inb], u[~is_id & inb & (g == gname)], tpr)
                out["by_size"][name] = row
    return out


# ---------------------------------------------------------------------------------------------
# percentiles of timings (the one implementation: node diagnostics, health, bag evaluation, benches)

#: the percentiles :func:`latency_summary` reports
LATENCY_PERCENTILES = (50, 90, 95, 99)


def _finite(values) -> np.ndarray:
    a = np.asarray([v for v in values if v is not None], np.float64).ravel()
    return a[np.isfinite(a)]


def percentile(values, q: float) -> float:
    """The ``q``-th percentile (0..100, linear interpolation, numpy's default method) of the finite
    ``values`` (None / NaN / inf dropped); NaN when none is left."""
    a = _finite(values)
    return float(np.percentile(a, float(q))) if a.size else math.nan


def latency_summary(values_ms, percentiles=LATENCY_PERCENTILES, ndigits: int = 3) -> dict:
    """``{"n", "mean", "p50", "p90", "p95", "p99", "max"}`` of the finite ``values_ms``, rounded to
    ``ndigits``; every statistic None (JSON null) when there is no value."""
    a = _finite(values_ms)
    keys = ["mean", *(f"p{p:g}" for p in percentiles), "max"]
    if a.size == 0:
        return {"n": 0, **{k: None for k in keys}}
    vals = [a.mean(), *(np.percentile(a, float(p)) for p in percentiles), a.max()]
    return {"n": int(a.size), **{k: round(float(v), ndigits) for k, v in zip(keys, vals)}}
