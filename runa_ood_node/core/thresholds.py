"""OOD decision thresholds: fitting on ID boxes, per-class thresholds, YAML files, TPR intervals.

Conventions: scores are uncertainties (higher = more OOD, ``core.scoring``); a box is OOD when
``uncertainty > threshold`` and accepted as ID when ``uncertainty <= threshold``. A threshold is
fitted on ID boxes only, for a target true-positive rate ``tpr`` (fraction of ID boxes accepted,
0.95 in the paper): ``fit_threshold`` returns the smallest gamma with
``fraction(id <= gamma) >= tpr``, the same rule that ``metrics.fpr_at_tpr`` evaluates, so the
FPR95 of a benchmark is the FPR the vehicle sees with a threshold fitted on the same ID data.

Thresholds file (YAML, written by :meth:`Thresholds.save`)::

    format_version: 1
    tpr: 0.95
    global: -0.2413           # uncertainty units of the scorer (e.g. -max cosine for "max_cosine")
    per_class: {car: -0.25, person: -0.23}
    meta: {n: 1200, n_per_class: {...}, model_id: ..., scorer: max_cosine, label_set: bdd,
           created: 2026-01-01T00:00:00+00:00, ...,
           fitted_for: {model: ViT-B-16, weights: "tag:openai|quickgelu", scorer: max_cosine,
                        ablation: dual, lam: 0.5, blur_radius: 1.0, temperature: null,
                        label_set: bdd, label_set_hash: 3f..., projection: off-the-shelf}}

A threshold is in the units of the scores it was fitted on, so it only means something for the same
model and weights, scorer, ablation, fusion weight, blur, label set (and prompts) and regional
projection. ``calibrate`` records them (:func:`fit_identity` of the ``OodScorer`` it used) under
``meta.fitted_for``; :meth:`Thresholds.check_compatible` lists every difference from the scorer that
is about to apply them, and :func:`check_fit` is the one check the node and every tool run (refuse,
or with an explicit override warn and report). Files without ``fitted_for`` (older ones) are refused
unless overridden: re-calibrate them. Files written before a key or a name changed still check: a scorer is
compared by its name now (``scorer: runa`` is ``max_cosine``, ``core.registry.SCORER_ALIASES``), and a file
without ``method`` / ``head`` was RUNA's with its projection as head.
"""
from __future__ import annotations

import datetime as _dt
import math
import pathlib
import statistics
import warnings
from dataclasses import dataclass, field
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import yaml

from .metrics import threshold_at_tpr
from .plain import to_plain
from .registry import TEMPERATURE_SCORERS, canonical_scorer

__all__ = [
    "Thresholds",
    "ThresholdsMismatchError",
    "fit_identity",
    "IDENTITY_KEYS",
    "OFF_THE_SHELF",
    "check_fit",
    "ThresholdsFileError",
    "fit_threshold",
    "min_samples_for_tpr",
    "calibrate",
    "tpr_with_ci",
]

FORMAT_VERSION = 1
_META_KEYS = ("n", "n_per_class", "model_id", "scorer", "label_set", "created")


class ThresholdsFileError(ValueError):
    """A thresholds YAML file is missing keys, has wrong types or invalid values."""


class ThresholdsMismatchError(ValueError):
    """Thresholds fitted for another configuration than the one applying them; ``mismatches`` lists
    each difference."""

    def __init__(self, source: str, mismatches: Sequence[str]):
        self.mismatches = list(mismatches)
        super().__init__(
            f"thresholds {source or '(in memory)'} do not fit this configuration:\n  - "
            + "\n  - ".join(self.mismatches)
            + "\nRe-calibrate for it (`runa-ood calibrate` with the same --model, --pretrained, --projection, "
              "--id-set, --scorer, --ablation, --lam, --blur-radius, --temperature), or override with "
              "thresholds_allow_mismatch:=true / --allow-threshold-mismatch (outputs are then marked).")


#: what a threshold's units depend on (``meta.fitted_for`` keys, :func:`fit_identity`)
IDENTITY_KEYS = ("model", "weights", "scorer", "ablation", "lam", "blur_radius", "temperature", "label_set",
                 "label_set_hash", "projection", "method", "head")
#: RUNA's regional projection left as the model's (``P_r == P_g``); the other methods record it too
OFF_THE_SHELF = "off-the-shelf"
#: what a file written before a key existed was fitted for (every such file is RUNA's; its head is its
#: projection). A callable reads the default from the file's other keys.
_LEGACY_DEFAULTS = {"method": lambda fitted: "runa", "head": lambda fitted: fitted.get("projection")}


def fit_identity(scorer, scorer_name: Optional[str] = None, ablation: Optional[str] = None) -> dict:
    """What thresholds fitted on (or applied to) the scores of ``scorer`` (a ``core.pipeline.OodScorer``)
    depend on, in :data:`IDENTITY_KEYS` order: model name, weights identity (``DualEncoder.weights_id``: the
    pretrained tag, the checkpoint's sha256, or the seeded random model's hash), scorer (its canonical name,
    ``core.registry.SCORER_ALIASES``), ablation, temperature (mcm / energy only, else None), label set name
    and content hash, and what the method says of itself (``Method.identity``: its settings and head;
    RUNA's fusion weight actually used (1 for regional, 0 for global), blur radius (None for the regional
    ablation) and regional projection, ``off-the-shelf`` or the sha256 of the fine-tuned one).

    ``scorer_name`` / ``ablation``: the identity of ``scorer.score_features(scorer=..., ablation=...)``
    (tools that score several configurations from one encoding). Reads the scorer's attributes only: this
    module imports neither the pipeline nor the methods."""
    enc = scorer.encoder
    name = canonical_scorer(scorer_name or scorer.scorer)
    ablation = ablation or scorer.ablation
    own = {
        "model": str(enc.model_name),
        "weights": str(enc.weights_id),
        "scorer": name,
        "ablation": str(ablation),
        "temperature": float(scorer.temperature) if name in TEMPERATURE_SCORERS else None,
        "label_set": str(scorer.label_set.name),
        "label_set_hash": scorer.label_set.content_hash(),
    }
    ident = {**own, **scorer.method.identity(ablation)}
    return {k: ident[k] for k in IDENTITY_KEYS if k in ident} | {k: v for k, v in ident.items() if k not in IDENTITY_KEYS}


def _same(key: str, a, b) -> bool:
    if key == "scorer" and isinstance(a, str) and isinstance(b, str):  # renamed scorers (runa -> max_cosine)
        return canonical_scorer(a) == canonical_scorer(b)
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        return math.isclose(float(a), float(b), rel_tol=1e-9, abs_tol=1e-12)
    return a == b


def _as_clean_scores(id_scores, what: str = "id_scores") -> np.ndarray:
    a = np.asarray(id_scores, dtype=np.float64).ravel()
    nan = np.isnan(a)
    if nan.any():
        warnings.warn(f"{what}: ignoring {int(nan.sum())} NaN score(s) of {a.size}", RuntimeWarning, stacklevel=3)
        a = a[~nan]
    return a


def fit_threshold(id_scores, tpr: float = 0.95) -> float:
    """Smallest gamma with ``fraction(id_scores <= gamma) >= tpr``.

    Args:
        id_scores: uncertainties of ID boxes (any shape, flattened). NaN are ignored with a
            ``RuntimeWarning``.
        tpr: target fraction of ID boxes accepted, in (0, 1].

    Returns:
        gamma, one of the scores (ties are exact: every box tied at gamma is accepted, so the
        achieved rate on these scores is >= tpr, and any smaller gamma gives < tpr).
        With fewer than :func:`min_samples_for_tpr` scores gamma is simply the maximum score
        (use :func:`calibrate` to refuse such sets).

    Raises:
        ValueError: no (non-NaN) scores, or tpr outside (0, 1].
    """
    return threshold_at_tpr(_as_clean_scores(id_scores), tpr)


def min_samples_for_tpr(tpr: float) -> int:
    """Fewest ID boxes for which a ``tpr`` quantile is more than the sample maximum: ``ceil(1/(1-tpr))``.

    With n boxes the fitted threshold is the ``ceil(tpr*n)``-th smallest; below this size that is
    the largest one, i.e. the rate asked for is not estimated at all (20 for tpr=0.95, 100 for 0.99).
    """
    t = float(tpr)
    if not (0.0 < t < 1.0):
        raise ValueError(f"tpr must be in (0, 1) to calibrate, got {tpr!r}")
    return int(math.ceil(1.0 / (1.0 - t) - 1e-9))


def _utc_now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat()


@dataclass
class Thresholds:
    """Fitted OOD thresholds (uncertainty units of the scorer they were fitted with).

    Attributes:
        global_threshold: used for every label without its own threshold.
        per_class: label -> threshold, for classes with enough calibration boxes.
        tpr: the ID true-positive rate the thresholds were fitted for, in (0, 1].
        meta: provenance (``n``, ``n_per_class``, ``model_id``, ``scorer``, ``label_set``,
            ``created`` and anything else YAML-serialisable).
    """

    global_threshold: float
    per_class: Dict[str, float] = field(default_factory=dict)
    tpr: float = 0.95
    meta: dict = field(default_factory=dict)

    def __post_init__(self):
        self.global_threshold = float(self.global_threshold)
        if math.isnan(self.global_threshold):
            raise ValueError("global_threshold is NaN")
        self.tpr = float(self.tpr)
        if not (0.0 < self.tpr <= 1.0):
            raise ValueError(f"tpr must be in (0, 1], got {self.tpr}")
        clean = {}
        for k, v in dict(self.per_class).items():
            v = float(v)
            if math.isnan(v):
                raise ValueError(f"per-class threshold for {k!r} is NaN")
            clean[str(k)] = v
        self.per_class = clean
        self.meta = dict(self.meta or {})

    def for_label(self, label: Optional[str]) -> float:
        """Threshold for ``label`` (its per-class value, else the global one; None -> global)."""
        if label is None:
            return self.global_threshold
        return self.per_class.get(str(label), self.global_threshold)

    def for_labels(self, labels: Sequence[Optional[str]]) -> np.ndarray:
        """Vectorised :meth:`for_label`: float32 ``[N]``."""
        return np.asarray([self.for_label(lbl) for lbl in labels], dtype=np.float32).reshape(-1)

    @property
    def fitted_for(self) -> Optional[dict]:
        """``meta.fitted_for`` (:func:`fit_identity` of the scorer they were fitted with), None in older files."""
        f = self.meta.get("fitted_for")
        return dict(f) if isinstance(f, dict) else None

    def check_compatible(self, expected: Mapping) -> List[str]:
        """Every difference between what these thresholds were fitted for and ``expected`` (a
        :func:`fit_identity` dict, or any subset of its keys), one readable line each; empty = compatible.

        A file that records no ``fitted_for`` (written before it existed) yields one line saying so:
        nothing vouches for its units."""
        fitted = self.fitted_for
        if fitted is None:
            return ["the file records no fit identity (written by an older `runa-ood calibrate`): nothing says "
                    "which model, scorer, lam, blur, label set or projection its thresholds belong to"]
        wrong = []
        for key, want in expected.items():
            if key not in fitted and key in _LEGACY_DEFAULTS:  # written before the key existed
                fitted = {**fitted, key: _LEGACY_DEFAULTS[key](fitted)}
            if key not in fitted:
                wrong.append(f"{key}: not recorded in the file, in use is {want!r}")
            elif not _same(key, fitted[key], want):
                wrong.append(f"{key}: fitted for {fitted[key]!r}, in use is {want!r}")
        return wrong

    def to_dict(self) -> dict:
        meta = dict(self.meta)
        for key in _META_KEYS:
            meta.setdefault(key, None)
        if meta["created"] is None:
            meta["created"] = _utc_now()
        return to_plain(
            {
                "format_version": FORMAT_VERSION,
                "tpr": self.tpr,
                "global": self.global_threshold,
                "per_class": dict(self.per_class),
                "meta": meta,
            }
        )

    def save(self, path) -> pathlib.Path:
        """Write the YAML file (parents created; written to a temporary file, then renamed)."""
        path = pathlib.Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))
        tmp.replace(path)
        return path

    @classmethod
    def from_dict(cls, data, source: str = "<dict>") -> "Thresholds":
        def bad(msg):
            return ThresholdsFileError(f"invalid thresholds file {source}: {msg}")

        if not isinstance(data, dict):
            raise bad(f"expected a mapping at top level, got {type(data).__name__}")
        missing = [k for k in ("tpr", "global") if k not in data]
        if missing:
            raise bad(f"missing key(s) {missing}; expected keys: tpr, global, per_class, meta")
        version = data.get("format_version", FORMAT_VERSION)
        if version != FORMAT_VERSION:
            raise bad(f"format_version {version!r} is not supported (this code reads {FORMAT_VERSION})")

        def number(value, what):
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise bad(f"{what} must be a number, got {value!r}")
            if math.isnan(value):
                raise bad(f"{what} is NaN")
            return float(value)

        tpr = number(data["tpr"], "tpr")
        if not (0.0 < tpr <= 1.0):
            raise bad(f"tpr must be in (0, 1], got {tpr}")
        glob = number(data["global"], "global")
        per_class = data.get("per_class") or {}
        if not isinstance(per_class, dict):
            raise bad(f"per_class must be a mapping label -> threshold, got {type(per_class).__name__}")
        per_class = {str(k): number(v, f"per_class[{k!r}]") for k, v in per_class.items()}
        meta = data.get("meta") or {}
        if not isinstance(meta, dict):
            raise bad(f"meta must be a mapping, got {type(meta).__name__}")
        return cls(global_threshold=glob, per_class=per_class, tpr=tpr, meta=meta)

    @classmethod
    def load(cls, path) -> "Thresholds":
        """Read and validate a thresholds YAML file.

        Raises:
            FileNotFoundError: no such file.
            ThresholdsFileError (a ValueError): not YAML, or missing/invalid keys.
        """
        path = pathlib.Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"thresholds file not found: {path}")
        try:
            data = yaml.safe_load(path.read_text())
        except yaml.YAMLError as exc:
            raise ThresholdsFileError(f"invalid thresholds file {path}: not valid YAML ({exc})") from exc
        return cls.from_dict(data, source=str(path))


def check_fit(thresholds, scorer, allow_mismatch: bool = False, source: str = "") -> List[str]:
    """THE check before ``thresholds`` are applied to the scores of ``scorer`` (node and tools).

    Returns the mismatches (``Thresholds.check_compatible(fit_identity(scorer))``): empty when they
    fit; non-empty only with ``allow_mismatch``, for the caller to log and to mark its outputs with.

    Raises:
        ThresholdsMismatchError: a mismatch (or a file without fit identity) and no ``allow_mismatch``;
            the message names each difference and how to re-calibrate.
    """
    wrong = thresholds.check_compatible(fit_identity(scorer))
    if wrong and not allow_mismatch:
        raise ThresholdsMismatchError(source, wrong)
    return wrong


def calibrate(
    id_scores,
    id_labels: Sequence[str],
    tpr: float = 0.95,
    min_per_class: int = 20,
    meta: Optional[dict] = None,
) -> Tuple[Thresholds, dict]:
    """Fit a global threshold and per-class thresholds on ID boxes.

    Args:
        id_scores: uncertainties of ID boxes ``[N]``; NaN entries (unscored boxes) are dropped
            together with their labels and counted in the report.
        id_labels: the ID label of each box ``[N]`` (ground truth or the scorer's nearest label;
            the node looks thresholds up by the label it predicts, so the latter matches use).
        tpr: target ID acceptance rate in (0, 1).
        min_per_class: classes with fewer boxes than ``max(min_per_class, min_samples_for_tpr(tpr))``
            get no own threshold and fall back to the global one.
        meta: extra provenance stored in ``Thresholds.meta`` (e.g. model_id, scorer, label_set).

    Returns:
        ``(thresholds, report)``; ``report`` has ``n``, ``n_dropped_nan``, ``tpr``,
        ``min_required``, ``global_threshold``, ``global_tpr`` (achieved on the data),
        ``per_class`` (label -> dict(n, threshold, tpr, fallback)) and ``fallback_classes``
        (sorted labels that use the global threshold).

    Raises:
        ValueError: lengths differ, tpr not in (0, 1), or fewer than
            ``min_samples_for_tpr(tpr)`` usable boxes (e.g. 20 for 0.95).
    """
    n_min = min_samples_for_tpr(tpr)
    if int(min_per_class) < 1:
        raise ValueError(f"min_per_class must be >= 1, got {min_per_class}")
    scores = np.asarray(id_scores, dtype=np.float64).ravel()
    labels = np.asarray([str(lbl) for lbl in id_labels], dtype=object)
    if labels.size != scores.size:
        raise ValueError(f"id_scores has {scores.size} entries but id_labels has {labels.size}")
    keep = ~np.isnan(scores)
    n_dropped = int(scores.size - keep.sum())
    scores, labels = scores[keep], labels[keep]
    n = int(scores.size)
    if n < n_min:
        raise ValueError(
            f"too few ID boxes to calibrate for tpr={tpr}: got {n} usable box(es)"
            + (f" ({n_dropped} NaN dropped)" if n_dropped else "")
            + f", need at least ceil(1/(1-tpr)) = {n_min}; with fewer, the threshold would just be the "
            "largest score and the rate would not be estimated"
        )
    need = max(int(min_per_class), n_min)
    glob = threshold_at_tpr(scores, tpr)
    per_class, rows, fallback = {}, {}, []
    for lbl in sorted(set(labels.tolist())):
        s = scores[labels == lbl]
        if s.size >= need:
            thr = threshold_at_tpr(s, tpr)
            per_class[lbl] = thr
            rows[lbl] = dict(n=int(s.size), threshold=thr, tpr=float(np.mean(s <= thr)), fallback=False)
        else:
            fallback.append(lbl)
            rows[lbl] = dict(n=int(s.size), threshold=glob, tpr=float(np.mean(s <= glob)), fallback=True)
    full_meta = dict(meta or {})
    full_meta.update(
        n=n,
        n_per_class={lbl: r["n"] for lbl, r in rows.items()},
        min_per_class=need,
        fallback_classes=list(fallback),
    )
    full_meta.setdefault("created", _utc_now())
    report = dict(
        n=n,
        n_dropped_nan=n_dropped,
        tpr=float(tpr),
        min_required=need,
        global_threshold=glob,
        global_tpr=float(np.mean(scores <= glob)),
        per_class=rows,
        fallback_classes=fallback,
    )
    return Thresholds(glob, per_class, float(tpr), full_meta), report


# ---------------------------------------------------------------------------------------------
# confidence interval of a rate


def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the regularised incomplete beta function (modified Lentz)."""
    tiny = 1e-300
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 10000):
        m2 = 2 * m
        aa = m * (b - m) * x / ((qam + m2) * (a + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        h *= d * c
        aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        delta = d * c
        h *= delta
        if abs(delta - 1.0) < 1e-15:
            break
    return h


def _betainc(a: float, b: float, x: float) -> float:
    """Regularised incomplete beta I_x(a, b) for a, b > 0, x in [0, 1]."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    ln_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    front = math.exp(ln_front)
    if x < (a + 1.0) / (a + b + 2.0):
        return front * _betacf(a, b, x) / a
    return 1.0 - front * _betacf(b, a, 1.0 - x) / b


def _beta_ppf(q: float, a: float, b: float) -> float:
    """Quantile of Beta(a, b) by bisection on I_x(a, b) (monotone in x)."""
    lo, hi = 0.0, 1.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if _betainc(a, b, mid) < q:
            lo = mid
        else:
            hi = mid
        if hi - lo < 1e-15:
            break
    return 0.5 * (lo + hi)


def _wilson(k: int, n: int, confidence: float) -> Tuple[float, float]:
    z = statistics.NormalDist().inv_cdf(0.5 + confidence / 2.0)
    p = k / n
    denom = 1.0 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    lo = 0.0 if k == 0 else max(0.0, centre - half)
    hi = 1.0 if k == n else min(1.0, centre + half)
    return lo, hi


def _clopper_pearson(k: int, n: int, confidence: float) -> Tuple[float, float]:
    alpha = 1.0 - confidence
    lo = 0.0 if k == 0 else _beta_ppf(alpha / 2.0, k, n - k + 1)
    hi = 1.0 if k == n else _beta_ppf(1.0 - alpha / 2.0, k + 1, n - k)
    return lo, hi


def tpr_with_ci(id_scores, threshold: float, confidence: float = 0.95, method: str = "wilson"):
    """Fraction of ID boxes accepted at ``threshold`` and its two-sided confidence interval.

    Args:
        id_scores: uncertainties of ID boxes **not used to fit the threshold** (on the fitting
            data the rate is >= tpr by construction and the interval is optimistic). NaN ignored.
        threshold: boxes with ``uncertainty <= threshold`` count as accepted.
        confidence: interval level in (0, 1), e.g. 0.95.
        method: ``"wilson"`` (score interval; close to nominal on average) or
            ``"clopper-pearson"`` (exact, conservative: coverage >= confidence).

    Returns:
        ``(tpr, lo, hi)``, fractions in [0, 1].

    Raises:
        ValueError: no usable scores, confidence outside (0, 1) or unknown method.
    """
    if not (0.0 < float(confidence) < 1.0):
        raise ValueError(f"confidence must be in (0, 1), got {confidence!r}")
    s = _as_clean_scores(id_scores)
    if s.size == 0:
        raise ValueError("tpr_with_ci needs at least one (non-NaN) ID score")
    n = int(s.size)
    k = int(np.count_nonzero(s <= float(threshold)))
    if method == "wilson":
        lo, hi = _wilson(k, n, float(confidence))
    elif method in ("clopper-pearson", "exact"):
        lo, hi = _clopper_pearson(k, n, float(confidence))
    else:
        raise ValueError(f"unknown interval method {method!r}; valid: 'wilson', 'clopper-pearson'")
    return k / n, lo, hi

