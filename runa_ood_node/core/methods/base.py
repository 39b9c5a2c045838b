"""The method seam: what an OOD method tells ``OodScorer`` (in the spirit of pytorch-ood's ``Detector``).

``core.pipeline.OodScorer`` keeps everything every method shares: image and box sanitising, the
``max_boxes`` cap, **one** backend call per frame (or per batch of frames), the scorers of
``core.scoring`` and the thresholds. A :class:`Method` says only what is its own:

* :meth:`Method.views_for` - which view kinds (``core.registry.VIEWS``: ``regional`` crop, ``global``
  blurred frame with the box sharp, ``background`` frame with the box masked, ``frame`` the whole
  frame once per image) a box needs;
* :attr:`Method.outputs` - which named backbone outputs (``core.registry.BACKBONE_OUTPUTS``) it reads,
  and :meth:`Method.pairs` - the (query view, key view) pairs of the inter-image attention ``xattn``;
* :meth:`Method.box_features` - one frame's backbone outputs -> per-box tensors (stored in
  ``BoxFeatures.data`` under ``"<view>.<name>"``, leading dimension = boxes);
* :meth:`Method.similarities` - per-box features -> class similarities ``[M, K]`` (higher = closer
  to the ID class); the shared scorers turn them into uncertainties;
* :meth:`Method.fit` - few-shot ID boxes -> a trained head (``core.methods.heads.Head``); callers go through
  :meth:`Method.fit_shots`, the one fitting path (the label-set check, the per-box image context);
* :meth:`Method.identity` - what thresholds fitted on its scores are fitted for (its settings and head).

Every hook ``OodScorer`` and the tools call is declared here with its default (:meth:`prepare`,
:meth:`feature_shapes`, :attr:`fit_views`, :attr:`fit_defaults`, :attr:`frame_size`, :meth:`configure`,
:meth:`check_backend`, :meth:`missing`, :meth:`similarities`, :meth:`fit`, :meth:`identity`); callers never
probe with ``getattr`` nor branch on a method's name.

Settings: each method declares its own frozen dataclass :attr:`Method.Settings` (RUNA: ``lam``,
``blur_radius``; UNI-OOD and TagOOD: none, their choices are head settings recorded in the head). The
dataclasses hold **no defaults**: the defaults live in the one parameter table (``core.parameters``);
:meth:`Method.make_settings` builds a method's settings from a mapping of values (the table's defaults
with the caller's values over them).

Nothing here imports ``backends`` or ROS.
"""
from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Dict, List, Mapping, Optional, Sequence, Tuple, Type

import numpy as np
import torch

from ..registry import VIEWS
from ..thresholds import OFF_THE_SHELF
from .fitting import label_set_warnings

#: backbone outputs that are per view (``xattn`` is per (query, key) pair of views)
PER_VIEW_OUTPUTS = ("cls", "tokens", "attn_cls")


def grid_size(encoder) -> int:
    """G, the side of the encoder's patch grid (``T = 1 + G*G`` tokens)."""
    g = getattr(encoder, "grid_size", None)
    return int(g if g is not None else encoder.model.visual.grid_size[0])


@dataclasses.dataclass
class FitResult:
    """What :meth:`Method.fit_shots` returns: the head's weights, the per-epoch loss, the hyper-parameters and
    settings to record, and the warnings about the fit (also logged; the finetune tool prints and records them)."""

    state: Dict[str, torch.Tensor]
    loss_curve: List[float]
    hyper: Dict
    warnings: List[str]


#: what :meth:`Method.fit` returns: ``(state, loss_curve, hyper)`` (the head's weights, the per-epoch loss, the
#: hyper-parameters and settings the head records)
FitOutput = Tuple[Dict[str, torch.Tensor], List[float], Dict[str, Any]]


@dataclasses.dataclass(frozen=True)
class NoSettings:
    """The settings of a method that has none of its own (every choice it has is a head setting)."""


def feature_key(view: str, name: str) -> str:
    """The ``BoxFeatures.data`` key of a per-box tensor: ``"<view>.<name>"``."""
    return f"{view}.{name}"


class Method:
    """Base class of an OOD method (see the module docstring). Subclasses set the class attributes
    and implement :meth:`similarities` (and :meth:`box_features` when ``cls`` per view is not enough).

    Attributes:
        name: the registry name (``core.registry.METHODS``).
        paper: the reference.
        views: the view kinds a box needs (default ablation).
        outputs: the backbone outputs it reads.
        ablations: the ablations it accepts (RUNA's views ablation; the others only ``dual``).
        head: the trained head in use (``core.methods.heads.Head``) or None (untrained / off-the-shelf).
        Settings: the method's frozen settings dataclass (no defaults; :meth:`make_settings`).
        settings: the settings in use (an instance of :attr:`Settings`).
        fit_views: the view kinds :meth:`fit` reads (None = those of the scorer's ablation).
        fit_defaults: the default hyper-parameters of :meth:`fit`.
        frame_size: the side (px) of the ``frame`` view's pass; None = the encoder's input size.
    """

    name: ClassVar[str] = ""
    paper: ClassVar[str] = ""
    Settings: ClassVar[Type] = NoSettings
    views: Tuple[str, ...] = ()
    outputs: Tuple[str, ...] = ("cls",)
    ablations: Tuple[str, ...] = ("dual",)
    needs_head: ClassVar[bool] = False
    #: whether :meth:`fit` reads ``context`` (per box, the label-set indices of the other ID objects of its image)
    uses_context: ClassVar[bool] = False
    fit_views: Optional[Tuple[str, ...]] = None
    fit_defaults: ClassVar[Dict[str, Any]] = {}
    frame_size: Optional[int] = None
    #: whether the finetune tool writes this method's head as a projection file too (RUNA's ``P_r``)
    head_is_projection: ClassVar[bool] = False
    #: the head in use built into modules (``_build``), None without a head (:meth:`trained_modules`)
    _modules: Any = None

    def __init__(self, encoder, head=None, settings=None):
        self.encoder = encoder
        self.settings = self.check_settings(self.make_settings() if settings is None else settings)
        self.head = None
        if head is not None:
            self.set_head(head)

    # ------------------------------------------------------------------ settings
    @classmethod
    def make_settings(cls, values: Optional[Mapping[str, Any]] = None, **more: Any):
        """This method's :attr:`Settings` from ``values`` (and keyword ``more`` over them): the keys it has a
        field for are taken, the others ignored (one mapping of every method's values, e.g. the parameter
        table's, serves each). Raises TypeError when a field has no value (the dataclass has no defaults) and
        ValueError for a bad value (the settings' own check)."""
        given = {**dict(values or {}), **more}
        names = [f.name for f in dataclasses.fields(cls.Settings)]
        lost = [n for n in names if n not in given]
        if lost:
            raise TypeError(f"method {cls.name!r} settings need {lost} (defaults: core.parameters)")
        return cls.Settings(**{n: given[n] for n in names})

    def check_settings(self, settings):
        """``settings`` when they are this method's :attr:`Settings`, else TypeError."""
        if not isinstance(settings, self.Settings):
            raise TypeError(f"method {self.name!r} takes {self.Settings.__name__} settings, got "
                            f"{type(settings).__name__}")
        return settings

    @classmethod
    def replace_settings(cls, settings, **changes: Any):
        """``settings`` with ``changes`` applied to the fields this method's :attr:`Settings` has (other keys,
        and None values, are ignored; the dataclass checks the new values)."""
        names = {f.name for f in dataclasses.fields(cls.Settings)}
        keep = {k: v for k, v in changes.items() if k in names and v is not None}
        return dataclasses.replace(settings, **keep) if keep else settings

    def with_settings(self, settings=None, **changes: Any):
        """``settings`` (None = the ones in use) with ``changes`` (:meth:`replace_settings`): a per-call
        override (``OodScorer.score_features(lam=...)``)."""
        return self.replace_settings(self.settings if settings is None else self.check_settings(settings), **changes)

    def settings_dict(self, settings=None) -> Dict[str, Any]:
        """The settings (None = the ones in use) as a plain dict (for logs, reports, ``describe``)."""
        return dataclasses.asdict(self.settings if settings is None else settings)

    @classmethod
    def settings_blur_radius(cls, settings) -> Optional[float]:
        """The Gaussian sigma (px at the encoder's input size) ``settings`` give the blurred ``global`` view;
        None = the method's settings have none (the view maker keeps the one it was built with)."""
        return None

    def view_blur_radius(self) -> Optional[float]:
        """:meth:`settings_blur_radius` of the settings in use."""
        return self.settings_blur_radius(self.settings)

    def configure(self, **options: Any) -> None:
        """Set head settings / fit hyper-parameters before fitting a head (``runa-ood finetune
        --method-option KEY=VALUE``). Default: the method has no options (ValueError for any)."""
        if options:
            raise ValueError(f"method {self.name!r} has no options")

    # ------------------------------------------------------------------ what it needs
    def check_ablation(self, ablation: str) -> str:
        if ablation not in self.ablations:
            raise ValueError(f"method {self.name!r} has no ablation {ablation!r}; it accepts {list(self.ablations)}")
        return ablation

    def check_backend(self, kind: str) -> None:
        """Raise ValueError when the visual backend ``kind`` (``torch``, ``onnxruntime``, ``tensorrt``,
        ``auto``) cannot serve this method's settings; ``factory.build_scorer`` calls it before building
        the backend. Default: every backend serves every setting."""

    def views_for(self, ablation: str = "dual") -> Tuple[str, ...]:
        """View kinds a box needs for ``ablation``, in ``core.registry.VIEWS`` order."""
        self.check_ablation(ablation)
        return tuple(v for v in VIEWS if v in self.views)

    def accepted_views(self) -> Tuple[str, ...]:
        """Every view kind this method can encode (``OodScorer.encode(views=...)`` accepts a subset)."""
        return tuple(v for v in VIEWS if v in self.views)

    def pairs(self, views: Sequence[str]) -> Tuple[Tuple[str, str], ...]:
        """(query view, key view) of the inter-image attention ``xattn`` (row per box); () = none."""
        return ()

    def prepare(self, label_set, text_emb: torch.Tensor) -> None:
        """Per label set work, once when a scorer is built (``OodScorer`` calls it). Default: nothing."""

    # ------------------------------------------------------------------ features
    def feature_shapes(self, views: Sequence[str]) -> Dict[str, torch.Tensor]:
        """One empty row per tensor the method stores for ``views`` (frames whose boxes were not encoded carry
        the same keys as the others). Default: ``cls`` per view, ``[0, width]``."""
        return {feature_key(v, "cls"): torch.zeros((0, int(self.encoder.width)), dtype=torch.float32) for v in views}

    def box_features(self, out: Mapping[str, Mapping[str, torch.Tensor]], boxes_xyxy: np.ndarray,
                     image_wh: Tuple[int, int]) -> Dict[str, torch.Tensor]:
        """One frame's backbone outputs -> per-box tensors ``{"<view>.<name>": [M, ...]}``.

        ``out[view][name]``: ``[M, ...]`` rows of the frame's M boxes (per-image views: ``[1, ...]``);
        ``out["xattn"][(q, k)]``: ``[M, T]``. Default: every per-view output as it is.
        """
        feats = {}
        for view, named in out.items():
            if view == "xattn":
                for (q, k), t in named.items():
                    feats[feature_key(q, f"xattn_{k}")] = t
                continue
            for name, t in named.items():
                feats[feature_key(view, name)] = t
        return feats

    def missing(self, keys: Sequence[str], ablation: str, settings=None) -> Optional[str]:
        """None when ``keys`` (``BoxFeatures.data`` keys) hold what scoring ``ablation`` with ``settings``
        (None = the ones in use) needs, else a message naming what is missing."""
        want = [feature_key(v, "cls") for v in self.views_for(ablation)]
        lost = [k for k in want if k not in keys]
        return None if not lost else f"method {self.name!r} needs {lost}"

    def embed(self, feats: Mapping[str, torch.Tensor], ablation: str = "dual", settings=None,
              head=None) -> Optional[torch.Tensor]:
        """The per-box image embedding ``[M, D]`` the method compares with the ID text, when it has a single one
        (RUNA: the fused ``I_t``, Eq. 3); None (the default) for methods whose similarities come out of their head."""
        return None

    def similarities(self, feats: Mapping[str, torch.Tensor], text_emb: torch.Tensor, ablation: str = "dual",
                     settings=None, head=None) -> torch.Tensor:
        """Per-box class similarities ``[M, K]`` from the boxes' features (rows of ``feats``).
        Rows whose features are non-finite must come back non-finite (the pipeline flags them).
        ``settings``: this method's :attr:`Settings` for this call (None = the ones in use).
        ``head``: another head of this method for this call only (None = the one in use)."""
        raise NotImplementedError

    # ------------------------------------------------------------------ head
    def set_head(self, head) -> None:
        """Use a trained head (``core.methods.heads.Head``); refuses one made for another method."""
        if head is not None and head.method != self.name:
            raise ValueError(f"head {head.source} was trained for method {head.method!r}, not {self.name!r}")
        self.head = head

    def trained_modules(self, head=None):
        """The trained modules of ``head`` for one call (the subclass's ``_build``), else those of the head in
        use (``_modules``). A method without a head raises ValueError saying how to train one."""
        modules = self._modules if head is None else self._build(head)
        if modules is None:
            raise ValueError(f"method {self.name!r} needs a trained head: `runa-ood finetune --method {self.name} "
                             "--out DIR`, then head DIR")
        return modules

    def _build(self, head):
        """``head``'s trained modules (a method with a head of modules overrides it)."""
        raise ValueError(f"method {self.name!r} has no trained modules")

    def head_identity(self) -> str:
        """What the thresholds record as ``head``: ``none`` or ``sha256:<weights file sha256>``."""
        return "none" if self.head is None else f"sha256:{self.head.sha256}"

    def identity(self, ablation: str = "dual", settings=None) -> Dict[str, Any]:
        """What thresholds fitted on this method's scores depend on, beyond the model, scorer and label set
        (``core.thresholds.fit_identity`` adds those): ``lam``, ``blur_radius``, ``projection`` (the keys
        every thresholds file records; a method without a fusion weight, blur or regional projection: None,
        None, ``off-the-shelf``), ``method`` and ``head`` (:meth:`head_identity`)."""
        return {"lam": None, "blur_radius": None, "projection": OFF_THE_SHELF, "method": self.name,
                "head": self.head_identity()}

    def fit(self, feats: Mapping[str, torch.Tensor], labels: torch.Tensor, text_emb: torch.Tensor, *,
            progress: bool = False, context: Optional[Sequence[Sequence[int]]] = None, **hyper: Any) -> FitOutput:
        """The method's own training on the shots' features ``feats`` (``BoxFeatures.data`` rows), labels
        ``[N]`` (label-set indices) and the ID text ``text_emb`` ``[K, D]``; ``context``: per shot, the
        label-set indices of the other ID objects of its image (read by the methods with
        :attr:`uses_context`); ``hyper`` over :attr:`fit_defaults`. Returns ``(state, loss_curve, hyper)``.
        Call :meth:`fit_shots`, which checks what every method shares."""
        raise NotImplementedError(f"method {self.name!r} cannot be fitted yet")

    def fit_shots(self, feats: Mapping[str, torch.Tensor], labels: torch.Tensor, text_emb: torch.Tensor,
                  context: Optional[Sequence[Sequence[int]]] = None, progress: bool = False, **hyper: Any) -> FitResult:
        """THE fitting path of every method (the finetune tool's): the label-set check
        (``fitting.label_set_warnings``: a one-class label set is warned about, logged and returned), then
        :meth:`fit` with ``context`` (per box, the label-set indices of the other ID objects of its image;
        ``core.finetune.shot_context``)."""
        warnings = label_set_warnings(self.name, int(text_emb.shape[0]))
        state, curve, hp = self.fit(feats, labels, text_emb, progress=progress, context=context, **hyper)
        return FitResult(state, [float(v) for v in curve], dict(hp), warnings)

    def describe(self) -> dict:
        return {"method": self.name, "views": list(self.views), "outputs": list(self.outputs),
                "head": self.head_identity(), "settings": self.settings_dict()}
