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
  :meth:`Method.fit_shots`, the one fitting path (the label-set check, the per-box image context).

Nothing here imports ``backends`` or ROS.
"""
from __future__ import annotations

import dataclasses
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch

from ..registry import VIEWS
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
    """

    name: str = ""
    paper: str = ""
    views: Tuple[str, ...] = ()
    outputs: Tuple[str, ...] = ("cls",)
    ablations: Tuple[str, ...] = ("dual",)
    needs_head: bool = False
    #: whether :meth:`fit` reads ``context`` (per box, the label-set indices of the other ID objects of its image)
    uses_context: bool = False

    def __init__(self, encoder, head=None):
        self.encoder = encoder
        self.head = None
        if head is not None:
            self.set_head(head)

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

    # ------------------------------------------------------------------ features
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

    def missing(self, keys: Sequence[str], ablation: str, lam: float = 0.5) -> Optional[str]:
        """None when ``keys`` (``BoxFeatures.data`` keys) hold what scoring ``ablation`` (at ``lam``) needs,
        else a message naming what is missing."""
        want = [feature_key(v, "cls") for v in self.views_for(ablation)]
        lost = [k for k in want if k not in keys]
        return None if not lost else f"method {self.name!r} needs {lost}"

    def similarities(self, feats: Mapping[str, torch.Tensor], text_emb: torch.Tensor, ablation: str = "dual",
                     lam: float = 0.5, head=None) -> torch.Tensor:
        """Per-box class similarities ``[M, K]`` from the boxes' features (rows of ``feats``).
        Rows whose features are non-finite must come back non-finite (the pipeline flags them).
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
        modules = getattr(self, "_modules", None) if head is None else self._build(head)
        if modules is None:
            raise ValueError(f"method {self.name!r} needs a trained head: `runa-ood finetune --method {self.name} "
                             "--out DIR`, then head DIR")
        return modules

    def head_identity(self) -> str:
        """What the thresholds record as ``head``: ``none`` or ``sha256:<weights file sha256>``."""
        return "none" if self.head is None else f"sha256:{self.head.sha256}"

    def fit(self, *args, **kwargs):
        """The method's own training: ``fit(feats, labels, text_emb, progress=False, [context=...,] **hyper)``
        -> ``(state, loss_curve, hyper)``. Call :meth:`fit_shots`, which checks what every method shares."""
        raise NotImplementedError(f"method {self.name!r} cannot be fitted yet")

    def fit_shots(self, feats: Mapping[str, torch.Tensor], labels: torch.Tensor, text_emb: torch.Tensor,
                  context: Optional[Sequence[Sequence[int]]] = None, progress: bool = False, **hyper) -> FitResult:
        """THE fitting path of every method (the finetune tool's): the label-set check
        (``fitting.label_set_warnings``: a one-class label set is warned about, logged and returned), then
        :meth:`fit` with ``context`` (per box, the label-set indices of the other ID objects of its image;
        ``core.finetune.shot_context``) for the methods that read it (:attr:`uses_context`)."""
        warnings = label_set_warnings(self.name, int(text_emb.shape[0]))
        if self.uses_context:
            hyper["context"] = context
        state, curve, hp = self.fit(feats, labels, text_emb, progress=progress, **hyper)
        return FitResult(state, [float(v) for v in curve], dict(hp), warnings)

    def describe(self) -> dict:
        return {"method": self.name, "views": list(self.views), "outputs": list(self.outputs),
                "head": self.head_identity()}
