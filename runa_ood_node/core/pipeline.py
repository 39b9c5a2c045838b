"""``OodScorer``: one RGB frame + N detector boxes -> per-box OOD results of one method (``core.methods``).

This is the single implementation of the method that the ROS node, the evaluation tool and the
benchmark all call; they build it with ``runa_ood_node.factory.build_scorer`` (outside core: it
needs the optional backends). :meth:`OodScorer.score` is ``score_features(encode(...))``, two public steps:

:meth:`OodScorer.encode` (image -> :class:`BoxFeatures`, the expensive part):

1. validate the image (``HxWx3 uint8 RGB``; anything else raises ``ValueError``: converting
   messages is the caller's job);
2. :func:`boxes.sanitize_boxes` -> per-box :class:`BoxStatus` (invalid boxes are never encoded);
3. cap the valid boxes at ``max_boxes``, keeping the highest detector scores (the rest get
   ``NOT_SCORED``);
4. build the views of the valid boxes (:class:`views.ViewMaker`, one resize + one blur per frame);
5. **one** batched ``encoder.visual_features`` call over the regional + global views (by default
   only the views the ablation needs; ``views=("regional", "global")`` computes both so several
   ablations can be scored from one encoding).

:meth:`OodScorer.score_features` (features -> :class:`FrameResult`, cheap, row-wise per box):

6. the method's per-box class similarities (``Method.similarities``; RUNA: fuse with ``lam``, regional
   ablation lam=1, global ablation lam=0, cosine to the ID text embeddings), scorer (:mod:`scoring`);
   scorer / ablation / the method's settings / temperature default to the OodScorer's and may be
   overridden per call;
7. threshold of the nearest ID label (:class:`thresholds.Thresholds`) -> ``is_ood``.

Because steps 6-7 are per box, the :class:`BoxFeatures` of many frames may be joined with
:meth:`BoxFeatures.concat` and scored in one call (the offline tools do this).

Failure handling (a robot must keep running): boxes whose fused embeddings come back NaN/inf get
``BACKEND_ERROR``; if the backend (or the view maker) raises, every box that was going to be
scored gets ``BACKEND_ERROR`` and :attr:`FrameResult.error` holds the message. ``score`` does not
raise for per-box or backend problems.

``is_ood`` semantics: True only for ``OK`` boxes whose uncertainty is strictly greater than a
finite threshold. Without thresholds (``thresholds=None``) the threshold is NaN and ``is_ood`` is
False for every box: the scorer still ranks boxes, but nothing is declared OOD until calibrated.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import numbers
import time
from typing import Any, Dict, List, NamedTuple, Optional, Sequence, Tuple

import numpy as np
import torch

from . import scoring
from .boxes import BoxStatus, sanitize_boxes, status_text
from .encoder import DualEncoder
from .labels import LabelSet, load_label_set
from .methods import get_method, make_method
from .parameters import default, defaults
from .views import ViewMaker, make_views

LOG = logging.getLogger(__name__)

from .registry import (ABLATIONS, PER_IMAGE_VIEWS, SCORERS, VIEWS, VIEWS_FOR_ABLATION,  # noqa: E402,F401 (re-exported)
                       canonical_scorer)

#: the views :meth:`BoxFeatures.unscored` gives ``cls`` rows for when none are named (the default method's)
_DEFAULT_VIEWS = VIEWS_FOR_ABLATION["dual"]
#: ``BoxFeatures.data`` key of the token centres inside each box (``core.methods.tagood``), -> FrameResult
TOKENS_IN_BOX = "frame.tokens_in_box"


def _nan_like(t: torch.Tensor, n: int) -> torch.Tensor:
    """``n`` rows of "not encoded" shaped like ``t``'s rows: NaN (floats) or True (bool masks: all padding)."""
    shape = (int(n),) + tuple(t.shape[1:])
    if t.dtype == torch.bool:
        return torch.ones(shape, dtype=torch.bool)
    return torch.full(shape, float("nan"), dtype=t.dtype)


@dataclasses.dataclass
class FrameResult:
    """Per-box results for one frame; every array has length N (the number of input boxes).

    Attributes:
        boxes_xyxy: float32 ``[N,4]`` sanitised boxes, xyxy in original image pixels, clipped.
        status: uint8 ``[N]`` :class:`BoxStatus` codes; only ``OK`` boxes carry scores.
        uncertainty: float32 ``[N]``, higher = more OOD; NaN unless status is OK.
        label_idx: int64 ``[N]`` index of the nearest ID label; -1 unless OK.
        label: list of N str, the nearest ID label name ("" unless OK).
        similarity: float32 ``[N]`` cosine similarity to that label; NaN unless OK.
        threshold: float32 ``[N]`` threshold used for that box (NaN if none / not OK).
        is_ood: bool ``[N]``: OK and uncertainty > finite threshold.
        timings: milliseconds for ``views``, ``encode``, ``score`` and ``total`` (from
            :meth:`OodScorer.score`: the whole call, bookkeeping included).
        error: None, or the message of a backend failure that affected this frame.
        detector_scores: float32 ``[N]`` detector confidences if given (NaN otherwise).
        detector_labels: the detector's N class names if given (carried through for tables,
            logs and consumers comparing them with ``label``; RUNA itself does not use them).
        tokens_in_box: float32 ``[N]`` for methods that read a box's patch tokens from one frame pass
            (TagOOD): how many token centres lie inside the box; 0 = the box is smaller than a token and
            was given its nearest token (shared with its neighbours); NaN when not encoded; None for
            the other methods. :attr:`boxes_below_token` counts the scored boxes with 0.
    """

    boxes_xyxy: np.ndarray
    status: np.ndarray
    uncertainty: np.ndarray
    label_idx: np.ndarray
    label: List[str]
    similarity: np.ndarray
    threshold: np.ndarray
    is_ood: np.ndarray
    timings: Dict[str, float]
    error: Optional[str] = None
    detector_scores: Optional[np.ndarray] = None
    detector_labels: Optional[List[str]] = None
    tokens_in_box: Optional[np.ndarray] = None

    def __len__(self) -> int:
        return int(self.status.shape[0])

    @property
    def boxes_below_token(self) -> int:
        """Scored (``OK``) boxes covering no patch-token centre (``tokens_in_box`` < 1); 0 when not applicable."""
        if self.tokens_in_box is None:
            return 0
        return int(np.count_nonzero(self.ok & (np.nan_to_num(self.tokens_in_box, nan=1.0) < 1)))

    @property
    def ok(self) -> np.ndarray:
        """bool ``[N]``: boxes that were scored."""
        return self.status == BoxStatus.OK

    def status_counts(self) -> Dict[str, int]:
        """Number of boxes per status name (only statuses that occur)."""
        names, counts = np.unique(self.status, return_counts=True)
        return {BoxStatus(int(s)).name: int(c) for s, c in zip(names, counts)}

    def to_records(self) -> List[Dict[str, Any]]:
        """One JSON-friendly dict per box (NaN becomes None), for tables, logs and JSON files."""

        def f(v) -> Optional[float]:
            v = float(v)
            return v if math.isfinite(v) else None

        recs = []
        for i in range(len(self)):
            st = int(self.status[i])
            recs.append({
                "index": i,
                "x1": f(self.boxes_xyxy[i, 0]), "y1": f(self.boxes_xyxy[i, 1]),
                "x2": f(self.boxes_xyxy[i, 2]), "y2": f(self.boxes_xyxy[i, 3]),
                "status": BoxStatus(st).name if st in BoxStatus._value2member_map_ else str(st),
                "status_text": status_text(st),
                "uncertainty": f(self.uncertainty[i]),
                "label_idx": int(self.label_idx[i]),
                "label": self.label[i],
                "similarity": f(self.similarity[i]),
                "threshold": f(self.threshold[i]),
                "is_ood": bool(self.is_ood[i]),
                "detector_score": None if self.detector_scores is None else f(self.detector_scores[i]),
                "detector_label": None if self.detector_labels is None else self.detector_labels[i],
                "tokens_in_box": None if self.tokens_in_box is None else f(self.tokens_in_box[i]),
            })
        return recs


def _default(value, name: str):
    """``value``, or the parameter table's default of ``name`` when it is None."""
    return default(name) if value is None else value


def _add_error(res: FrameResult, msg: str) -> None:
    """Append ``msg`` to ``res.error`` (``"; "`` between messages)."""
    res.error = msg if not res.error else f"{res.error}; {msg}"


def _empty_result(xyxy: np.ndarray, status: np.ndarray, det: Optional[np.ndarray]) -> FrameResult:
    n = status.shape[0]
    return FrameResult(
        boxes_xyxy=xyxy, status=status,
        uncertainty=np.full(n, np.nan, np.float32), label_idx=np.full(n, -1, np.int64), label=[""] * n,
        similarity=np.full(n, np.nan, np.float32), threshold=np.full(n, np.nan, np.float32),
        is_ood=np.zeros(n, bool), timings={}, error=None, detector_scores=det)


def _to_numpy(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    return np.asarray(x)


@dataclasses.dataclass
class BoxFeatures:
    """Output of :meth:`OodScorer.encode`: one frame's (or several joined frames') boxes and their features.

    Everything :meth:`OodScorer.score_features` needs to score the boxes with any scorer,
    ablation, lam or temperature, without touching the image or the visual trunk again.

    Attributes:
        boxes_xyxy: float32 ``[N,4]`` sanitised boxes, xyxy in original image pixels, clipped.
        status: uint8 ``[N]`` :class:`BoxStatus` after sanitising, the ``max_boxes`` cap and the
            encoding (``BACKEND_ERROR`` when the view maker or backend raised). Boxes still ``OK``
            may have non-finite features; scoring flags those.
        data: the method's per-box tensors (``Method.box_features``), float32 CPU (bool for masks),
            leading dimension N, keyed ``"<view>.<name>"`` (RUNA: ``"regional.cls"``, ``"global.cls"``
            ``[N, width]``, the pre-projection features after ``ln_post``). Rows of boxes that were not
            encoded are NaN (masks: all True).
        timings: milliseconds for ``views`` (view making), ``encode`` (visual trunk) and
            ``total`` (the whole :meth:`OodScorer.encode` call).
        error: None, or the message of a view-maker / backend failure.
        detector_scores: float32 ``[N]`` detector confidences if given, else None.
        image_wh: int32 ``[N,2]`` width and height (px) of each box's image (-1 when unknown).
        views: the view kinds that were encoded (``core.registry.VIEWS`` order).
    """

    boxes_xyxy: np.ndarray
    status: np.ndarray
    data: Dict[str, torch.Tensor]
    timings: Dict[str, float]
    error: Optional[str] = None
    detector_scores: Optional[np.ndarray] = None
    image_wh: Optional[np.ndarray] = None
    views: Tuple[str, ...] = ()

    def __post_init__(self):
        n = int(self.status.shape[0])
        if self.image_wh is None:
            self.image_wh = np.full((n, 2), -1, np.int32)
        if not self.views:
            self.views = tuple(v for v in VIEWS if any(k.startswith(v + ".") for k in self.data))

    def __len__(self) -> int:
        return int(self.status.shape[0])

    def rows(self, idx) -> Dict[str, torch.Tensor]:
        """The per-box tensors of boxes ``idx`` (int array / tensor)."""
        rows = torch.as_tensor(np.asarray(idx), dtype=torch.long)
        return {k: t[rows] for k, t in self.data.items()}

    @classmethod
    def unscored(cls, n: int, width: int, views: Sequence[str] = _DEFAULT_VIEWS, status: int = BoxStatus.NOT_SCORED,
                 error: Optional[str] = None) -> "BoxFeatures":
        """``n`` boxes that could not be encoded (e.g. their image could not be read): NaN boxes
        and ``cls`` features per view, every status ``status``; :meth:`concat` gives them any
        other tensor the encoded frames have (NaN rows)."""
        n = int(n)
        views = tuple(v for v in VIEWS if v in tuple(views))
        data = {f"{v}.cls": torch.full((n, int(width)), float("nan"), dtype=torch.float32) for v in views}
        return cls(boxes_xyxy=np.full((n, 4), np.nan, np.float32), status=np.full(n, int(status), np.uint8),
                   data=data, timings={"views": 0.0, "encode": 0.0, "total": 0.0}, error=error,
                   detector_scores=None, views=views)

    @classmethod
    def concat(cls, items: Sequence["BoxFeatures"]) -> "BoxFeatures":
        """Join the boxes of several frames (in order), e.g. to score a whole dataset in one
        :meth:`OodScorer.score_features` call; valid because scoring is per box.

        Only the views present in every item are kept (and their tensors; an item lacking one of
        them, e.g. :meth:`unscored`, contributes NaN rows); timings are summed; errors are joined
        with ``"; "``; ``detector_scores`` is kept only when every item has it.

        Raises:
            ValueError: ``items`` is empty or the feature shapes differ.
        """
        items = list(items)
        if not items:
            raise ValueError("BoxFeatures.concat needs at least one item")
        common = tuple(v for v in VIEWS if all(v in it.views for it in items))
        keys: Dict[str, torch.Tensor] = {}
        for it in items:
            for k, t in it.data.items():
                if k.split(".", 1)[0] in common and k not in keys:
                    keys[k] = t
        data = {}
        for k, like in keys.items():
            parts = [it.data[k] if k in it.data else _nan_like(like, len(it)) for it in items]
            try:
                data[k] = torch.cat(parts, 0)
            except RuntimeError as exc:
                raise ValueError(f"BoxFeatures.concat: {k} has different shapes across items ({exc})") from exc
        timings: Dict[str, float] = {}
        for it in items:
            for k, v in it.timings.items():
                timings[k] = timings.get(k, 0.0) + float(v)
        errors = [it.error for it in items if it.error]
        det = None
        if all(it.detector_scores is not None for it in items):
            det = np.concatenate([it.detector_scores for it in items]).astype(np.float32)
        return cls(boxes_xyxy=np.concatenate([it.boxes_xyxy for it in items]).astype(np.float32).reshape(-1, 4),
                   status=np.concatenate([it.status for it in items]).astype(np.uint8), data=data,
                   timings=timings, error="; ".join(errors) if errors else None, detector_scores=det,
                   image_wh=np.concatenate([it.image_wh for it in items]).astype(np.int32).reshape(-1, 2),
                   views=common)


class FrameInput(NamedTuple):
    """One frame for :meth:`OodScorer.encode_frames` / :meth:`OodScorer.score_frames`."""

    image_rgb: np.ndarray
    boxes: Any
    box_format: str = "xyxy"
    detector_scores: Any = None
    detector_labels: Optional[Sequence[str]] = None


@dataclasses.dataclass
class _Prepared:
    """One frame of :meth:`OodScorer.encode_frames` between its views and the backend call."""

    xyxy: np.ndarray
    status: np.ndarray
    det: Optional[np.ndarray]
    idx: np.ndarray
    wh: Tuple[int, int]
    error: Optional[str] = None
    rows: Dict[str, int] = dataclasses.field(default_factory=dict)   # view -> first row in the batch
    pair_rows: Dict[Tuple[str, str], int] = dataclasses.field(default_factory=dict)  # (q, k) -> first xattn row
    n_views: int = 0
    views_ms: float = 0.0
    own_ms: float = 0.0


class _Batch:
    """The views (and ``xattn`` pairs) of every frame of one :meth:`OodScorer.encode_frames` call."""

    def __init__(self, views: Tuple[str, ...], pairs_kinds, frame_vm: Optional[ViewMaker]):
        self.views, self.pairs_kinds, self.frame_vm = views, tuple(pairs_kinds), frame_vm
        #: the kinds the scorer's view maker makes (the frame apart when it has its own size)
        self.kinds = views if frame_vm is None else tuple(v for v in views if v != "frame")
        self.parts: List[torch.Tensor] = []
        self.pairs: List[torch.Tensor] = []
        self.n_rows = self.n_pairs = 0
        self._mark = (0, 0, 0, 0)

    def mark(self, p: _Prepared) -> None:
        """Remember where frame ``p``'s views start (:meth:`drop` takes them back)."""
        self._mark = (len(self.parts), len(self.pairs), self.n_rows, self.n_pairs)

    def drop(self, p: _Prepared) -> None:
        """Take frame ``p``'s views and pairs back out (its view maker failed half-way)."""
        if p.n_views or p.rows:
            parts, pairs, self.n_rows, self.n_pairs = self._mark
            del self.parts[parts:], self.pairs[pairs:]
        p.n_views, p.rows, p.pair_rows = 0, {}, {}


class OodScorer:
    """OOD scoring of detector boxes with one of the methods of ``core.methods`` (see module docstring).

    Args:
        encoder: a loaded :class:`DualEncoder`.
        label_set: :class:`LabelSet`, or a built-in name / YAML path for :func:`load_label_set`.
        scorer: one of ``core.registry.SCORERS`` (``"max_cosine"`` = -max cosine, paper Eq. 6; old names
            of ``SCORER_ALIASES`` such as ``"runa"`` are accepted and stored under the new name).
            ``scorer``, ``min_box_size``, ``temperature``, ``method``, ``settings``: None = the
            parameter table's default (``core.parameters.default``).
        ablation: ``"dual"`` (RUNA), ``"regional"`` (crop only, lam=1) or ``"global"`` (blurred
            global view only, lam=0). Single-view ablations encode only the views they use.
        thresholds: optional ``thresholds.Thresholds`` (``for_label(label) -> float``), applied as
            given: check them with ``core.thresholds.check_fit`` before (the node and tools do).
        max_boxes: score at most this many valid boxes per frame (highest detector score first;
            input order when no detector scores); None or 0 = no cap (the node parameter's meaning).
        min_box_size: minimum box width/height in px after clipping (smaller -> TOO_SMALL).
        temperature: temperature of the ``mcm`` / ``energy`` scorers.
        max_batch: optional cap on views per backend call (memory bound); None = one call.
        view_maker: optional object with ``make(image_rgb, boxes_xyxy) -> (regional, global)`` and
            ``blur_radius`` replacing the CPU :class:`views.ViewMaker` (e.g.
            ``backends.gpu_preprocess.GpuViewMaker``); it must have been built with this
            encoder's input size / mean / std. ``blur_radius`` is then ignored. Methods that need the
            ``background`` / ``frame`` views call its ``make_views(image, boxes, kinds)``.
        method: one of ``core.registry.METHODS`` (``"runa"``, the default; ``"uni-ood"``, ``"tagood"``).
        head: a trained head (``core.methods.heads.Head``) of that method, or None. RUNA without a head
            uses the model's projection as its regional one (off the shelf).
        settings: that method's ``Settings`` (``get_method(method).make_settings(...)``, or a
            ``core.config.ScorerConfig``'s ``method_settings``; RUNA's: ``lam``, the fusion weight of the
            regional view in [0, 1], paper 0.5, used by ``"dual"``, and ``blur_radius``, the Gaussian sigma
            of the global view in px at the encoder input size, paper 1); None = the table's defaults.
    """

    def __init__(self, encoder: DualEncoder, label_set, scorer: Optional[str] = None, ablation: str = ABLATIONS[0],
                 thresholds=None, max_boxes: Optional[int] = None, min_box_size: Optional[float] = None,
                 temperature: Optional[float] = None, max_batch: Optional[int] = None, view_maker=None,
                 method: Optional[str] = None, head=None, settings=None):
        # None: the parameter table's default (core.parameters, the one place defaults are written)
        scorer, method = canonical_scorer(_default(scorer, "scorer")), _default(method, "method")
        min_box_size, temperature = _default(min_box_size, "min_box_size"), _default(temperature, "temperature")
        if scorer not in SCORERS:
            raise ValueError(f"unknown scorer {scorer!r}; expected one of {SCORERS}")
        if ablation not in ABLATIONS:
            raise ValueError(f"unknown ablation {ablation!r}; expected one of {ABLATIONS}")
        if max_boxes is not None and (int(max_boxes) != max_boxes or max_boxes < 0):
            raise ValueError(f"max_boxes must be None or an integer >= 0, got {max_boxes!r}")
        if not (math.isfinite(temperature) and temperature > 0):
            raise ValueError(f"temperature must be > 0, got {temperature!r}")
        if not (math.isfinite(min_box_size) and min_box_size >= 0):
            raise ValueError(f"min_box_size must be >= 0 px, got {min_box_size!r}")
        if settings is None:  # the table's (RUNA's lam and blur radius; others have none)
            settings = get_method(method).make_settings(defaults())
        if view_maker is not None:  # the given view maker's blur is the global view's
            settings = get_method(method).replace_settings(settings, blur_radius=view_maker.blur_radius)
        self.encoder = encoder
        self.method = make_method(method, encoder, head=head, settings=settings)
        self.method.check_ablation(ablation)
        self.label_set: LabelSet = load_label_set(label_set)
        self.scorer = scorer
        self.ablation = ablation
        self.thresholds = thresholds
        self.max_boxes = None if not max_boxes else int(max_boxes)  # 0 = no cap, as the node parameter
        self.min_box_size = float(min_box_size)
        self.temperature = float(temperature)
        self.max_batch = max_batch
        self.view_maker = view_maker if view_maker is not None else ViewMaker(  # blur None: the table's
            encoder.input_size, encoder.mean, encoder.std, self.method.view_blur_radius())
        self.text_emb = encoder.text_embeddings(self.label_set)  # [K, D], computed/cached once
        self.method.prepare(self.label_set, self.text_emb)  # per label set work of a method (e.g. text attention)
        self._label_thresholds = self._resolve_thresholds()
        self._other_thresholds: Dict[str, np.ndarray] = {}  # per-label thresholds of overridden scorers
        self._frame_vm: Optional[ViewMaker] = None  # the frame view maker at the method's frame_size (made once)

    @property
    def settings(self):
        """The method's settings in use (``Method.Settings``)."""
        return self.method.settings

    @property
    def lam(self) -> Optional[float]:
        """RUNA's fusion weight (``settings.lam``); None for a method without one."""
        return self.method.settings_dict().get("lam")

    # ------------------------------------------------------------------ configuration
    @property
    def blur_radius(self) -> float:
        return self.view_maker.blur_radius

    def _resolve_thresholds(self, scorer: Optional[str] = None) -> np.ndarray:
        """float32 ``[K]`` per-label thresholds for ``scorer`` (default: this scorer's).

        Raises ValueError when ``scorer`` is not this scorer's and the thresholds do not record
        being fitted for it (another score's units). Whether they fit this scorer's configuration is
        checked where they are loaded (``core.thresholds.check_fit``: node and tools)."""
        K = len(self.label_set)
        if self.thresholds is None:
            return np.full(K, np.nan, np.float32)
        check = getattr(self.thresholds, "check_compatible", None)
        if scorer not in (None, self.scorer) and callable(check):
            wrong = check({"scorer": scorer})
            if wrong:
                raise ValueError("; ".join(wrong))
        out = np.empty(K, np.float32)
        for k, lab in enumerate(self.label_set.labels):
            try:
                v = float(self.thresholds.for_label(lab))
            except Exception as exc:  # a thresholds file without this label and without a global value
                LOG.warning("no threshold for label %r (%s); boxes nearest to it will not be flagged OOD", lab, exc)
                v = float("nan")
            out[k] = v
        return out

    def _thresholds_for(self, scorer: str) -> np.ndarray:
        """Per-label thresholds used when scoring with ``scorer``: this scorer's own for its own
        method; for another method the thresholds only if their metadata does not name a
        different scorer (else NaN: thresholds in another score's units flag nothing)."""
        if scorer == self.scorer:
            return self._label_thresholds
        if scorer not in self._other_thresholds:
            try:
                self._other_thresholds[scorer] = self._resolve_thresholds(scorer)
            except ValueError as exc:
                LOG.info("thresholds not applied to scorer %r (%s); is_ood stays False for it", scorer, exc)
                self._other_thresholds[scorer] = np.full(len(self.label_set), np.nan, np.float32)
        return self._other_thresholds[scorer]

    # ------------------------------------------------------------------ scoring
    def _cap(self, status: np.ndarray, det: Optional[np.ndarray]) -> None:
        if self.max_boxes is None:
            return
        valid = np.flatnonzero(status == BoxStatus.OK)
        if valid.size <= self.max_boxes:
            return
        if det is None:
            keep = valid[: self.max_boxes]
        else:
            key = np.where(np.isfinite(det[valid]), det[valid], -np.inf)
            order = np.argsort(-key, kind="stable")  # highest score first, ties keep input order
            keep = valid[order[: self.max_boxes]]
        drop = np.setdiff1d(valid, keep)
        status[drop] = BoxStatus.NOT_SCORED

    def resolve_views(self, views=None) -> Tuple[str, ...]:
        """``views`` argument of :meth:`encode` -> canonical tuple (``core.registry.VIEWS`` order); None =
        the views this scorer's method and ablation need. Raises ValueError for anything but a
        non-empty subset of the method's views (RUNA: ``("regional", "global")``)."""
        if views is None:
            return self.method.views_for(self.ablation)
        if isinstance(views, str):
            views = (views,)
        views = tuple(views)
        accepted = self.method.accepted_views()
        unknown = set(views) - set(accepted)
        if unknown or not views:
            raise ValueError(f"views must be a non-empty subset of {accepted} for method {self.method.name!r}, "
                             f"got {views!r}")
        return tuple(v for v in VIEWS if v in views)

    def encode(self, image_rgb: np.ndarray, boxes, box_format: str = "xyxy", detector_scores=None,
               views: Optional[Sequence[str]] = None) -> BoxFeatures:
        """Sanitise, cap and encode every box of one frame (steps 1-5 of the module docstring).

        Args:
            image_rgb: ``HxWx3`` uint8 RGB image.
            boxes: ``[N,4]`` boxes in ``box_format`` (original image pixels); list/array/tensor.
            box_format: ``"xyxy"``, ``"xywh"`` or ``"cxcywh"``.
            detector_scores: optional ``[N]`` detector confidences, used by the ``max_boxes`` cap.
            views: which view kinds to encode, a subset of the method's (RUNA: ``("regional", "global")``);
                None = the ones this scorer's method and ablation need. Pass both of RUNA's to score
                several ablations from this one encoding with :meth:`score_features`. All requested
                views of the frame go through the visual trunk in **one** backend call.

        Returns:
            :class:`BoxFeatures` with N entries, in input order.

        Raises:
            ValueError: the image is not HxWx3 uint8, boxes are not ``[N,4]``-shaped,
                ``detector_scores`` has the wrong length, or ``views`` is invalid. View-maker and
                backend failures do not raise: the boxes get ``BACKEND_ERROR`` and ``error`` is set.
        """
        return self.encode_frames([FrameInput(image_rgb, boxes, box_format, detector_scores)], views=views)[0]

    def encode_frames(self, frames: Sequence["FrameInput"], views: Optional[Sequence[str]] = None) -> List[BoxFeatures]:
        """:meth:`encode` for several frames with **one** backend call for all their views (batch
        tools such as ``runa-ood fleet``; a GPU is used best with large batches). Each frame's
        features equal what :meth:`encode` gives for it alone. A view-maker failure marks only its
        frame; a backend failure marks every frame's boxes ``BACKEND_ERROR``. Timings: ``views`` is
        the frame's own, ``encode`` the shared backend call, ``total`` the frame's own work plus
        the shared call; ``batch_frames`` is the number of frames in the call.

        Raises:
            ValueError: as :meth:`encode`, for the first malformed frame.
        """
        views = self.resolve_views(views)
        batch = _Batch(views, self.method.pairs(views), self._frame_view_maker(views))
        prepared = [self._prepare_frame(fr, batch) for fr in frames]
        encode_ms, out = 0.0, None
        if batch.parts:
            t1 = time.perf_counter()
            try:
                out = self._backbone(batch.parts[0] if len(batch.parts) == 1 else torch.cat(batch.parts, 0),
                                     torch.cat(batch.pairs, 0) if batch.pairs else None)
            except Exception as exc:  # backend failure: keep the frames, flag their boxes
                msg = f"{type(exc).__name__}: {exc}"
                who = f"backend {self.encoder.backend_name!r}"
                LOG.error("%s failed on %d views of %d frames: %s", who, sum(p.n_views for p in prepared),
                          len(prepared), msg)
                for p in prepared:
                    if p.n_views:
                        p.status[p.idx] = BoxStatus.BACKEND_ERROR
                        p.error = f"{who} failed: {msg}"
            encode_ms = (time.perf_counter() - t1) * 1e3
        shapes = self.method.feature_shapes(views)
        return [self._frame_features(p, out, shapes, encode_ms, len(prepared), views) for p in prepared]

    def _prepare_frame(self, fr: "FrameInput", batch: "_Batch") -> "_Prepared":
        """One frame of :meth:`encode_frames`: image check, sanitised and capped boxes, its views appended to
        ``batch`` (a view-maker failure marks only this frame's boxes ``BACKEND_ERROR``)."""
        t0 = time.perf_counter()
        ViewMaker.check_image(fr.image_rgb)
        H, W = fr.image_rgb.shape[:2]
        xyxy, status = sanitize_boxes(fr.boxes, W, H, fmt=fr.box_format, min_size=self.min_box_size)
        n = status.shape[0]
        det = None
        if fr.detector_scores is not None:
            det = np.asarray(_to_numpy(fr.detector_scores), dtype=np.float32).reshape(-1)
            if det.shape[0] != n:
                raise ValueError(f"detector_scores has {det.shape[0]} values for {n} boxes")
        self._cap(status, det)
        p = _Prepared(xyxy=xyxy, status=status, det=det, idx=np.flatnonzero(status == BoxStatus.OK), wh=(W, H))
        if p.idx.size:
            tv = time.perf_counter()
            try:  # a GPU view maker can fail like a backend: only this frame's boxes are lost
                self._add_views(fr.image_rgb, p, batch)
            except Exception as exc:
                msg = f"{type(exc).__name__}: {exc}"
                who = f"view maker {type(self.view_maker).__name__}"
                LOG.error("%s failed on %d boxes: %s", who, p.idx.size, msg)
                p.error = f"{who} failed: {msg}"
                status[p.idx] = BoxStatus.BACKEND_ERROR
                batch.drop(p)
            p.views_ms = (time.perf_counter() - tv) * 1e3
        p.own_ms = (time.perf_counter() - t0) * 1e3
        return p

    def _add_views(self, image_rgb: np.ndarray, p: "_Prepared", batch: "_Batch") -> None:
        """Make frame ``p``'s views of its valid boxes and append them (and its ``xattn`` pairs) to ``batch``."""
        xyxy = p.xyxy[p.idx]
        made = make_views(self.view_maker, image_rgb, xyxy, batch.kinds) if batch.kinds else {}
        if batch.frame_vm is not None:
            made["frame"] = batch.frame_vm.make_views(image_rgb, xyxy[:0], ("frame",))["frame"]
        batch.mark(p)
        for v in batch.views:  # VIEWS order, as the outputs are read back
            p.rows[v] = batch.n_rows
            batch.parts.append(made[v])
            batch.n_rows += int(made[v].shape[0])
            p.n_views += int(made[v].shape[0])
        for q, k in batch.pairs_kinds:  # inter-image attention rows: box i's q view against its k view
            box = torch.arange(p.idx.size)
            key = p.rows[k] + (torch.zeros_like(box) if k in PER_IMAGE_VIEWS else box)
            p.pair_rows[(q, k)] = batch.n_pairs
            batch.pairs.append(torch.stack([p.rows[q] + box, key], 1))
            batch.n_pairs += p.idx.size

    def _frame_features(self, p: "_Prepared", out: Optional[Dict[str, torch.Tensor]], shapes, encode_ms: float,
                        n_frames: int, views: Tuple[str, ...]) -> BoxFeatures:
        """Frame ``p``'s :class:`BoxFeatures` from the batch's backbone outputs ``out`` (``Method.box_features``
        of its rows; NaN rows for boxes that were not encoded)."""
        n = p.status.shape[0]
        data = {k: _nan_like(like, n) for k, like in shapes.items()}
        if out is not None and p.n_views:
            M = p.idx.size
            per_view = {}
            for v, start in p.rows.items():
                m = 1 if v in PER_IMAGE_VIEWS else M
                per_view[v] = {o: t[start:start + m] for o, t in out.items() if o != "xattn"}
            if p.pair_rows:
                per_view["xattn"] = {qk: out["xattn"][s0:s0 + M] for qk, s0 in p.pair_rows.items()}
            rows = torch.from_numpy(p.idx)
            for k, t in self.method.box_features(per_view, p.xyxy[p.idx], p.wh).items():
                if k not in data:
                    data[k] = _nan_like(t, n)
                data[k][rows] = t.to(data[k].dtype)
        timings = {"views": p.views_ms, "encode": encode_ms if p.n_views else 0.0,
                   "total": p.own_ms + (encode_ms if p.n_views else 0.0)}
        if n_frames > 1:
            timings["batch_frames"] = float(n_frames)
        return BoxFeatures(boxes_xyxy=p.xyxy, status=p.status, data=data, timings=timings, error=p.error,
                           detector_scores=p.det, image_wh=np.tile(np.asarray(p.wh, np.int32), (n, 1)), views=views)

    def _frame_view_maker(self, views) -> Optional[ViewMaker]:
        """A CPU ``ViewMaker`` at the method's ``frame_size`` when it differs from the view maker's input size
        (TagOOD's higher-resolution frame pass), else None. Only for frame-only methods (one batch holds
        views of one size)."""
        size = self.method.frame_size
        own = int(getattr(self.view_maker, "input_size", self.encoder.input_size))
        if "frame" not in views or size is None or int(size) == own:
            return None
        if tuple(views) != ("frame",):
            raise ValueError(f"a frame_size ({size}) other than the input size needs a frame-only method, got {views}")
        vm = self._frame_vm
        if vm is None or vm.input_size != int(size):
            vm = self._frame_vm = ViewMaker(int(size), self.encoder.mean, self.encoder.std, 0.0)
        return vm

    def _backbone(self, batch: torch.Tensor, pairs: Optional[torch.Tensor]) -> Dict[str, torch.Tensor]:
        """THE backend call: the method's named outputs of every view of the batch. RUNA's ``cls``
        alone goes through ``visual_features`` (every backend serves it); other output sets through
        ``visual_outputs``."""
        outputs = tuple(self.method.outputs)
        if outputs == ("cls",):
            return {"cls": self.encoder.visual_features(batch, max_batch=self.max_batch)}
        return self.encoder.visual_outputs(batch, outputs, pairs=pairs, max_batch=self.max_batch)

    def score_features(self, features: BoxFeatures, scorer: Optional[str] = None, ablation: Optional[str] = None,
                       lam: Optional[float] = None, temperature: Optional[float] = None, head=None,
                       settings=None) -> FrameResult:
        """Score encoded boxes (steps 6-7 of the module docstring); no image, no visual trunk.

        Args:
            features: from :meth:`encode` of this scorer (or :meth:`BoxFeatures.concat` of several).
            scorer, ablation, temperature: override this OodScorer's settings for this call
                (None = its own). The result equals what a fresh ``OodScorer`` built with those
                settings returns from :meth:`score` on the same frame.
            settings: the method's ``Settings`` for this call (None = the method's own); ``lam``: RUNA's
                fusion weight over them (``Method.with_settings``; a method without one ignores it).
            head: another head of this scorer's method for this call only (RUNA: a Head or a
                ``[width, D]`` regional projection), e.g. a before / after comparison; nothing shared
                (encoder, method) is changed.

        Thresholds: this scorer's per-label thresholds, as in :meth:`score`. With another
        ``scorer`` they apply only when their metadata does not name a different scorer (NaN
        otherwise, so ``is_ood`` stays False); ``ablation`` / ``lam`` overrides are not checked
        against the thresholds (as for the constructor).

        Returns:
            :class:`FrameResult` with ``len(features)`` entries. ``timings`` holds the encoding's
            ``views`` / ``encode`` plus this call's ``score``; ``total`` is their sum with the rest
            of the encoding time.

        Raises:
            ValueError: an invalid setting, or ``features`` lacks a view the method / ablation needs
                (encode with ``views=("regional", "global")`` to score every RUNA ablation).
        """
        t0 = time.perf_counter()
        scorer, ablation, temperature = self._call_options(scorer, ablation, temperature)
        settings = self.method.with_settings(settings, lam=lam)
        missing = self.method.missing(tuple(features.data), ablation, settings)
        if missing:
            raise ValueError(f"{missing}, but these features hold only the views {features.views}; encode with "
                             f"views={self.method.accepted_views()!r}")
        status = features.status.copy()
        det = None if features.detector_scores is None else features.detector_scores.copy()
        res = _empty_result(features.boxes_xyxy.copy(), status, det)
        res.error = features.error
        if TOKENS_IN_BOX in features.data:  # one-pass methods (TagOOD): token centres per box
            res.tokens_in_box = features.data[TOKENS_IN_BOX].numpy().astype(np.float32).reshape(-1)
        idx = np.flatnonzero(status == BoxStatus.OK)
        if idx.size:
            sims = None
            try:
                sims = self.method.similarities(features.rows(idx), self.text_emb, ablation, settings, head)
            except Exception as exc:  # wrong feature width for this encoder: flag, never crash a frame
                msg = f"{self.method.name} similarities failed: {type(exc).__name__}: {exc}"
                LOG.error("%s (%d boxes)", msg, idx.size)
                _add_error(res, msg)
                status[idx] = BoxStatus.BACKEND_ERROR
            if sims is not None:
                self._fill_scores(res, idx, sims, scorer, temperature)
        t_score = (time.perf_counter() - t0) * 1e3
        ft = features.timings
        res.timings = {"views": float(ft.get("views", 0.0)), "encode": float(ft.get("encode", 0.0)),
                       "score": t_score, "total": float(ft.get("total", 0.0)) + t_score}
        return res

    def _call_options(self, scorer: Optional[str], ablation: Optional[str],
                      temperature: Optional[float]) -> Tuple[str, str, float]:
        """One call's scorer (its name now: ``core.registry.canonical_scorer``), ablation and temperature
        (None = this scorer's), checked (ValueError)."""
        scorer = canonical_scorer(self.scorer if scorer is None else scorer)
        ablation = self.ablation if ablation is None else ablation
        temperature = self.temperature if temperature is None else temperature
        if scorer not in SCORERS:
            raise ValueError(f"unknown scorer {scorer!r}; expected one of {SCORERS}")
        if not (isinstance(temperature, numbers.Real) and math.isfinite(temperature) and temperature > 0):
            raise ValueError(f"temperature must be > 0, got {temperature!r}")
        if ablation not in ABLATIONS:
            raise ValueError(f"unknown ablation {ablation!r}; expected one of {ABLATIONS}")
        self.method.check_ablation(ablation)
        return scorer, ablation, float(temperature)

    def _fill_scores(self, res: FrameResult, idx: np.ndarray, sims, scorer: str, temperature: float) -> None:
        """The boxes ``idx``'s similarities ``[M, K]`` -> uncertainty, label, threshold and ``is_ood`` in ``res``;
        rows with non-finite similarities (or that the scorer cannot score) become ``BACKEND_ERROR``."""
        status = res.status
        finite = torch.isfinite(torch.as_tensor(sims)).all(dim=1).numpy()
        if not finite.all():
            status[idx[~finite]] = BoxStatus.BACKEND_ERROR
            msg = (f"backend {self.encoder.backend_name!r} returned non-finite features for "
                   f"{int((~finite).sum())} of {idx.size} boxes")
            LOG.warning(msg)
            _add_error(res, msg)
        good = idx[finite]
        if not good.size:
            return
        out = scoring.score(sims[torch.from_numpy(finite)], method=scorer, temperature=temperature)
        unc = np.asarray(_to_numpy(out.uncertainty), np.float32).reshape(-1)
        lab = np.asarray(_to_numpy(out.label_idx), np.int64).reshape(-1)
        sim = np.asarray(_to_numpy(out.similarity), np.float32).reshape(-1)
        bad = ~np.isfinite(unc) | (lab < 0)
        if bad.any():  # scorer could not score a row (should not happen with finite features)
            status[good[bad]] = BoxStatus.BACKEND_ERROR
        ok = ~bad
        g = good[ok]
        res.uncertainty[g] = unc[ok]
        res.label_idx[g] = lab[ok]
        res.similarity[g] = sim[ok]
        thr = self._thresholds_for(scorer)[lab[ok]]
        res.threshold[g] = thr
        res.is_ood[g] = np.isfinite(thr) & (unc[ok] > thr)
        names = self.label_set.labels
        for i, k in zip(g, lab[ok]):
            res.label[i] = names[int(k)]

    def score(self, image_rgb: np.ndarray, boxes, box_format: str = "xyxy", detector_scores=None,
              detector_labels: Optional[Sequence[str]] = None) -> FrameResult:
        """Score every box of one frame: ``score_features(encode(...))`` with this scorer's settings.

        Args:
            image_rgb: ``HxWx3`` uint8 RGB image.
            boxes: ``[N,4]`` boxes in ``box_format`` (original image pixels); list/array/tensor.
            box_format: ``"xyxy"``, ``"xywh"`` or ``"cxcywh"``.
            detector_scores: optional ``[N]`` detector confidences, used by the ``max_boxes`` cap.
            detector_labels: optional N detector class names, carried into the result.

        Returns:
            :class:`FrameResult` with N entries, in input order.

        Raises:
            ValueError: the image is not HxWx3 uint8, boxes are not ``[N,4]``-shaped, or
                ``detector_scores`` / ``detector_labels`` have the wrong length. Per-box and backend
                problems do not raise.
        """
        return self.score_frames([FrameInput(image_rgb, boxes, box_format, detector_scores, detector_labels)])[0]

    def score_frames(self, frames: Sequence[FrameInput]) -> List[FrameResult]:
        """:meth:`score` for several frames, encoded with one backend call (:meth:`encode_frames`).

        ``timings["total"]`` of each frame: its own work, the shared backend call and an equal
        share of the bookkeeping around them, so a single frame's total is this call's wall time.

        Raises:
            ValueError: as :meth:`score`, for the first malformed frame.
        """
        t0 = time.perf_counter()
        results = []
        for fr, feats in zip(frames, self.encode_frames(frames)):
            res = self.score_features(feats)
            if fr.detector_labels is not None:
                labels = [str(x) for x in fr.detector_labels]
                if len(labels) != len(res):
                    raise ValueError(f"detector_labels has {len(labels)} names for {len(res)} boxes")
                res.detector_labels = labels
            results.append(res)
        # "total" is the frame's whole core time: the bookkeeping around the timed steps (assembling
        # the features, the labels) is shared equally, so one frame's total is this call's wall time
        wall = (time.perf_counter() - t0) * 1e3
        if results:  # what the totals count, the shared backend call once (frames without views: 0)
            counted = sum(r.timings["total"] - r.timings["encode"] for r in results) + \
                max(r.timings["encode"] for r in results)
            extra = max(wall - counted, 0.0) / len(results)
            for r in results:
                r.timings["total"] += extra
        return results

    def warmup(self, width: int = 640, height: int = 480, num_boxes: int = 2) -> FrameResult:
        """Score one synthetic grey frame so lazy initialisation (allocators, kernels, engines)
        happens before the first real frame. Returns that frame's result (check ``error``)."""
        image = np.full((int(height), int(width), 3), 114, np.uint8)
        n = max(int(num_boxes), 1)
        w, h = width / (n + 1), height / 2
        boxes = [[i * w, h / 2, (i + 1) * w, 1.5 * h] for i in range(n)]
        return self.score(image, boxes)
