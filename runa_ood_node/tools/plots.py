"""Figures of the offline tools (matplotlib, Agg backend: no display needed).

* :func:`roc_plot`: ROC curves, ID positive (x = FPR on OOD boxes, y = TPR on ID boxes), one line
  per scorer/ablation, AUROC and FPR95 in the legend.
* :func:`hist_plot`: ID vs OOD uncertainty histograms, like Fig. 4 of the RUNA paper.
* :func:`loss_plot`: the fine-tuning loss curve (Eq. 7, nats per box, per epoch).

Every function takes ``random_weights``; when True the title carries
:data:`common.RANDOM_LABEL` and a red watermark is drawn, so a figure can never be mistaken for
a quality result. Functions return the written path and close their figure.
"""
from __future__ import annotations

import math
import pathlib
from typing import Dict, Optional, Sequence, Tuple

import numpy as np

from .common import RANDOM_LABEL


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _finish(fig, ax, path, title: str, random_weights: bool) -> pathlib.Path:
    ax.set_title(f"{title}\n[{RANDOM_LABEL}]" if random_weights else title, fontsize=10,
                 color="firebrick" if random_weights else "black")
    if random_weights:
        fig.text(0.5, 0.5, "RANDOM WEIGHTS", fontsize=36, color="red", alpha=0.15, ha="center", va="center",
                 rotation=30, transform=fig.transFigure)
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.subplots_adjust(left=0.12, right=0.97, bottom=0.12, top=0.86)  # fixed margins: tight_layout is slow
    fig.savefig(path, dpi=100)
    _plt().close(fig)
    return path


def roc_plot(curves: Dict[str, Tuple[np.ndarray, np.ndarray, dict]], path, title: str = "ROC (ID positive)",
             random_weights: bool = False) -> pathlib.Path:
    """ROC curves.

    Args:
        curves: name -> ``(fpr, tpr, summary)`` with ``summary`` from ``metrics.summary``
            (``auroc``, ``fpr95`` used in the legend). Empty curves (a side without boxes) are
            listed in the legend as "n/a".
        path: PNG to write.
    """
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 5.2))
    ax.plot([0, 1], [0, 1], ls=":", color="grey", lw=1, label="chance")
    styles = ("-", "--", "-.", ":")
    for i, (name, (fpr, tpr, summ)) in enumerate(curves.items()):
        au, f95 = summ.get("auroc", float("nan")), summ.get("fpr95", float("nan"))
        if len(fpr) == 0 or not math.isfinite(au):
            ax.plot([], [], label=f"{name}: n/a (no ID or no OOD boxes)")
            continue
        ax.plot(fpr, tpr, lw=1.5, ls=styles[(i // 10) % len(styles)], label=f"{name}: AUROC {au:.3f}, FPR95 {f95:.3f}")
    ax.axhline(0.95, ls="--", color="grey", lw=0.8)
    ax.set_xlabel("FPR (OOD boxes accepted as ID)")
    ax.set_ylabel("TPR (ID boxes accepted)")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.01)
    ax.legend(fontsize=7, loc="lower right")
    ax.grid(alpha=0.3)
    return _finish(fig, ax, path, title, random_weights)


def hist_plot(id_scores, ood_scores, path, title: str = "uncertainty", threshold: Optional[float] = None,
              random_weights: bool = False, bins: int = 40) -> pathlib.Path:
    """Overlaid density histograms of ID and OOD uncertainties (NaN dropped), optional threshold line."""
    plt = _plt()
    ids = np.asarray(id_scores, np.float64)
    oods = np.asarray(ood_scores, np.float64)
    ids, oods = ids[np.isfinite(ids)], oods[np.isfinite(oods)]
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    both = np.concatenate([ids, oods])
    if both.size:
        lo, hi = float(both.min()), float(both.max())
        if hi <= lo:
            lo, hi = lo - 0.5, hi + 0.5
        edges = np.linspace(lo, hi, bins + 1)
        if ids.size:
            ax.hist(ids, bins=edges, density=True, alpha=0.55, color="tab:green", label=f"ID boxes (n={ids.size})")
        if oods.size:
            ax.hist(oods, bins=edges, density=True, alpha=0.55, color="tab:red", label=f"OOD boxes (n={oods.size})")
    else:
        ax.text(0.5, 0.5, "no scored boxes", ha="center", va="center", transform=ax.transAxes)
    if threshold is not None and math.isfinite(threshold):
        ax.axvline(threshold, color="black", ls="--", lw=1, label=f"threshold {threshold:.4f}")
    ax.set_xlabel("uncertainty (higher = more OOD)")
    ax.set_ylabel("density")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return _finish(fig, ax, path, title, random_weights)


def loss_plot(curve: Sequence[float], path, title: str = "fine-tuning loss (Eq. 7)",
              random_weights: bool = False) -> pathlib.Path:
    """Training loss per epoch."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    y = np.asarray(list(curve), np.float64)
    if y.size:
        ax.plot(np.arange(1, y.size + 1), y, lw=1.5, marker="." if y.size <= 50 else None)
    ax.set_xlabel("epoch")
    ax.set_ylabel("mean cross-entropy (nats / box)")
    ax.grid(alpha=0.3)
    return _finish(fig, ax, path, title, random_weights)


def loss_curve_png(hist: Dict[str, list], path, title: str) -> pathlib.Path:
    """The per-step loss (and its 25-step running mean) and the logit scale, one PNG."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7.0, 4.0))
    y = np.asarray(hist["loss"], np.float64)
    x = np.arange(1, y.size + 1)
    ax.plot(x, y, lw=0.6, alpha=0.4, color="tab:blue", label="loss per step")
    k = min(25, max(1, y.size // 10))
    if y.size >= k:
        ax.plot(x[k - 1:], np.convolve(y, np.ones(k) / k, mode="valid"), lw=1.6, color="tab:blue",
                label=f"running mean ({k} steps)")
    ax.set_xlabel("step")
    ax.set_ylabel("symmetric InfoNCE (nats)")
    ax.grid(alpha=0.3)
    ax2 = ax.twinx()
    ax2.plot(x, hist["logit_scale"], lw=1.0, color="tab:orange", label="logit scale")
    ax2.set_ylabel("logit scale", color="tab:orange")
    ax.legend(loc="upper right", fontsize=8)
    ax.set_title(title, fontsize=10)
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.subplots_adjust(left=0.1, right=0.88, bottom=0.12, top=0.88)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
