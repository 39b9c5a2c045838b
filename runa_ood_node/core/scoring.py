"""Per-box OOD scorers on image/text cosine similarities (RUNA Eq. 6 and the paper's variants).

Every scorer turns the ``[M, K]`` matrix of cosine similarities between M fused box embeddings
``I_t`` and the K in-distribution (ID) text embeddings ``T(t_i)`` into one **uncertainty** per box.

Conventions (shared with ``thresholds`` and ``metrics``):

* uncertainty is dimensionless and **higher means more out-of-distribution**; a box is OOD when
  ``uncertainty > threshold``;
* ``label_idx`` is the index of the nearest ID text embedding (``argmax_i sim``; identical to the
  argmax of the softmax for MCM and energy), ``similarity`` is that maximum cosine, in [-1, 1];
* a row containing NaN or +-inf (a box that could not be embedded) yields ``uncertainty = NaN``,
  ``label_idx = -1``, ``similarity = NaN`` instead of a misleading number.

Scorers (``SCORERS``), with ``s_i = cos(I_t, T(t_i))`` and temperature ``T > 0``:

========== ==================================== ===================================================
method     uncertainty                          notes
========== ==================================== ===================================================
``max_cosine`` ``-max_i s_i``                   paper Eq. 6 (max similarity). Range [-1, 1].
                                                Old name ``runa`` (``core.registry.SCORER_ALIASES``).
``mcm``    ``-max_i softmax(s / T)_i``          paper Eq. 2 (Ming et al. 2022). Range [-1, -1/K].
                                                T = 1 is the MCM paper's default; the RUNA paper
                                                shows T = 1 and T = 100 (Fig. 4). Note: the
                                                paper's ``e^{Sim/tau}`` is applied to raw
                                                cosines here, so larger T makes MCM flatter.
``energy`` ``-T * logsumexp_i(s_i / T)``        the free energy of the logits ``s / T`` (Liu et al.
                                                2020); lower energy = more ID, so the energy
                                                itself is the uncertainty. As T -> 0 it tends
                                                to ``max_cosine``.
``sum``    ``-sum_i s_i``                       paper Eq. 5 (direct sum), shown to work poorly.
========== ==================================== ===================================================

``max_cosine`` and ``sum`` ignore ``temperature``. All computation is done in float64 and returned as
float32 numpy arrays, whatever the input type (``torch.Tensor`` or ``np.ndarray``), because the
per-frame results (``FrameResult``) are numpy.
"""
from __future__ import annotations

from typing import NamedTuple, Optional, Union

import numpy as np

try:  # torch is optional for this module: numpy-only callers (metrics, tools) need not import it
    import torch
except ImportError:  # pragma: no cover - torch is a hard dependency of the package
    torch = None

__all__ = ["SCORERS", "SCORER_ALIASES", "ScoreOutput", "cosine_similarities", "score"]

#: Valid values of ``score(..., method=...)`` (``core.registry.SCORERS``; the old names of
#: ``SCORER_ALIASES`` are accepted too); ``max_cosine`` is the paper's (Eq. 6).
#: (Named SCORERS, not METHODS: the OOD methods are ``core.registry.METHODS``, ``core.methods``.)
from .parameters import default  # noqa: E402
from .registry import SCORER_ALIASES, SCORERS, TEMPERATURE_SCORERS, canonical_scorer  # noqa: E402

ArrayLike = Union[np.ndarray, "torch.Tensor"]

_EPS = 1e-12  # guards the division for all-zero embeddings (their cosine is then 0, not NaN)


class ScoreOutput(NamedTuple):
    """Result of :func:`score` for M boxes (all numpy, length M).

    Attributes:
        uncertainty: float32 ``[M]``, higher = more OOD; NaN for rows with non-finite similarities.
        label_idx: int64 ``[M]``, index of the most similar ID text embedding, -1 for invalid rows.
        similarity: float32 ``[M]``, the maximum cosine similarity (in [-1, 1]), NaN if invalid.
    """

    uncertainty: np.ndarray
    label_idx: np.ndarray
    similarity: np.ndarray


def _is_torch(x) -> bool:
    return torch is not None and isinstance(x, torch.Tensor)


def cosine_similarities(img: ArrayLike, txt: ArrayLike) -> ArrayLike:
    """Cosine similarity between every image embedding and every text embedding.

    Both inputs are L2-normalised along the last axis here, so callers may pass raw embeddings.
    An all-zero row has cosine 0 with everything (not NaN).

    Args:
        img: ``[M, D]`` image (box) embeddings; M may be 0.
        txt: ``[K, D]`` text embeddings, K >= 1.

    Returns:
        ``[M, K]`` cosines in [-1, 1], same container type as the inputs: a ``torch.Tensor``
        (on ``img``'s device, in the promoted floating dtype) when both are tensors, else a
        ``np.ndarray`` (floating dtype of the inputs, float64 for integer input).

    Raises:
        TypeError: one input is a tensor and the other is not.
        ValueError: inputs are not 2-D, K == 0, or the embedding sizes D differ.
    """
    if _is_torch(img) != _is_torch(txt):
        raise TypeError(
            "cosine_similarities: pass both embeddings as torch.Tensor or both as np.ndarray, got "
            f"{type(img).__name__} and {type(txt).__name__}"
        )
    if img.ndim != 2 or txt.ndim != 2:
        raise ValueError(
            f"cosine_similarities expects img [M, D] and txt [K, D], got shapes "
            f"{tuple(img.shape)} and {tuple(txt.shape)}"
        )
    if img.shape[1] != txt.shape[1]:
        raise ValueError(
            f"embedding sizes differ: img has D={img.shape[1]}, txt has D={txt.shape[1]} "
            "(text and image embeddings must come from the same CLIP model)"
        )
    if txt.shape[0] == 0:
        raise ValueError("cosine_similarities needs at least one text embedding (K >= 1)")

    if _is_torch(img):
        dtype = torch.promote_types(img.dtype, txt.dtype)
        if not dtype.is_floating_point:
            dtype = torch.float32
        a = img.to(dtype)
        b = txt.to(device=img.device, dtype=dtype)
        a = a / a.norm(dim=1, keepdim=True).clamp_min(_EPS)
        b = b / b.norm(dim=1, keepdim=True).clamp_min(_EPS)
        return a @ b.T

    a = np.asarray(img)
    b = np.asarray(txt)
    dtype = np.result_type(a.dtype, b.dtype)
    if not np.issubdtype(dtype, np.floating):
        dtype = np.float64
    a = a.astype(dtype, copy=False)
    b = b.astype(dtype, copy=False)
    a = a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), _EPS)
    b = b / np.maximum(np.linalg.norm(b, axis=1, keepdims=True), _EPS)
    return a @ b.T


def _to_numpy64(sims: ArrayLike) -> np.ndarray:
    if _is_torch(sims):
        sims = sims.detach().to("cpu", dtype=torch.float64).numpy()
    return np.asarray(sims, dtype=np.float64)


def score(sims: ArrayLike, method: Optional[str] = None, temperature: Optional[float] = None) -> ScoreOutput:
    """Uncertainty of each box from its cosine similarities to the K ID prompts.

    Args:
        sims: ``[M, K]`` cosine similarities (``cosine_similarities`` output), torch or numpy.
            M may be 0; K must be >= 1.
        method: one of :data:`SCORERS` or an old name of :data:`SCORER_ALIASES` (see the module
            docstring for the formulas); None: the parameter table's ``scorer``.
        temperature: T > 0 for ``mcm`` and ``energy`` (dimensionless, divides the cosines);
            ignored by ``max_cosine`` and ``sum``; None: the table's ``temperature``.

    Returns:
        :class:`ScoreOutput` of numpy arrays of length M.

    Raises:
        ValueError: unknown method (the message lists the valid ones), bad temperature, or
            ``sims`` not 2-D with K >= 1.
    """
    method = canonical_scorer(default("scorer") if method is None else method)
    temperature = default("temperature") if temperature is None else temperature
    if method not in SCORERS:
        raise ValueError(f"unknown scoring method {method!r}; valid methods: {', '.join(SCORERS)} "
                         f"(old names: {', '.join(SCORER_ALIASES)})")
    t = float(temperature)
    if method in TEMPERATURE_SCORERS and not (np.isfinite(t) and t > 0.0):
        raise ValueError(f"temperature must be a finite number > 0 for {method!r}, got {temperature!r}")

    s = _to_numpy64(sims)
    if s.ndim != 2:
        raise ValueError(f"sims must be [M, K], got shape {s.shape}")
    m, k = s.shape
    if k == 0:
        raise ValueError("sims has K=0 columns: the ID label set is empty")

    uncertainty = np.full(m, np.nan, dtype=np.float64)
    label_idx = np.full(m, -1, dtype=np.int64)
    similarity = np.full(m, np.nan, dtype=np.float64)
    valid = np.isfinite(s).all(axis=1)
    if valid.any():
        v = s[valid]
        idx = np.argmax(v, axis=1)
        smax = v[np.arange(v.shape[0]), idx]
        if method == "max_cosine":
            u = -smax
        elif method == "sum":
            u = -v.sum(axis=1)
        elif method == "mcm":
            # max softmax = exp(smax/T) / sum_j exp(s_j/T) = 1 / sum_j exp((s_j - smax)/T), stable
            u = -1.0 / np.exp((v - smax[:, None]) / t).sum(axis=1)
        else:  # energy: -T * logsumexp(s/T), computed stably around the max
            u = -(smax + t * np.log(np.exp((v - smax[:, None]) / t).sum(axis=1)))
        uncertainty[valid] = u
        label_idx[valid] = idx
        similarity[valid] = smax
    return ScoreOutput(uncertainty.astype(np.float32), label_idx, similarity.astype(np.float32))
