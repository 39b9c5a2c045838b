"""RUNA: regional uncertainty for OOD object detection (paper 001 in ``shared/papers``), the default method.

Each box is encoded twice by the frozen CLIP image tower: its **crop** (``regional`` view) and a
**blurred copy of the whole frame with the box kept sharp** (``global`` view). With ``f_r``, ``f_g`` the
tower's pre-projection features (after ``ln_post``, backbone output ``cls``), ``P_g`` the off-the-shelf
projection ``visual.proj`` and ``P_r`` the regional projection (a copy of ``P_g``, or the few-shot
fine-tuned head of Eq. 7)::

    I_t   = L2norm( lam * f_r @ P_r + (1 - lam) * f_g @ P_g )          (Eq. 3, lam = 0.5)
    s_k   = cos(I_t, T(t_k))                                           per ID class k -> [M, K]

and the shared scorers turn ``s`` into an uncertainty (``runa`` = ``-max_k s_k``, Eq. 6). With
``P_r == P_g == P`` the fusion equals the paper's ``P(lam f_r + (1-lam) f_g)`` since ``P`` is linear.
Ablations: ``regional`` (crop only, lam = 1) and ``global`` (blurred frame only, lam = 0).

Settings (:class:`RunaSettings`): ``lam`` (the fusion weight, :func:`check_lam`) and ``blur_radius`` (the
global view's Gaussian sigma, px at the encoder's input size); their defaults live in the parameter table.

Head: the regional projection ``P_r`` ``[width, D]`` (``core.finetune.train_projection``: only ``P_r``
is trained, cross-entropy over the cosine logits / tau, AdamW), RUNA's own state: the shared encoder holds
only the model's projection ``P_g``; without a head ``P_r = P_g`` (``off-the-shelf``). A projection file
(``core.finetune.save_projection``, the ``projection`` parameter) loads as a RUNA head
(``core.methods.heads``). Trunk passes per frame: 2 per box.
No pretrained CLIP weights exist on the development machine, so no quality figure is claimed here.
"""
from __future__ import annotations

import dataclasses
import hashlib
import numbers
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from ..finetune import train_projection
from ..registry import ABLATIONS, VIEWS_FOR_ABLATION
from ..scoring import cosine_similarities
from ..thresholds import OFF_THE_SHELF
from .base import FitOutput, Method, feature_key

PROJECTION_KEY = "proj_regional"


def check_lam(lam) -> float:
    """THE rule for the fusion weight: a real number (not a bool) in [0, 1]; raises ValueError."""
    if isinstance(lam, bool) or not isinstance(lam, numbers.Real) or not 0.0 <= float(lam) <= 1.0:
        raise ValueError(f"lam must be a number in [0, 1], got {lam!r}")
    return float(lam)


@dataclasses.dataclass(frozen=True)
class RunaSettings:
    """RUNA's settings (no defaults here: ``core.parameters``): ``lam`` the fusion weight of the regional view
    in [0, 1] (:func:`check_lam`), ``blur_radius`` the Gaussian sigma of the global view (px at the encoder's
    input size)."""

    lam: float
    blur_radius: float

    def __post_init__(self):
        object.__setattr__(self, "lam", check_lam(self.lam))
        object.__setattr__(self, "blur_radius", float(self.blur_radius))


def effective_lam(ablation: str, lam: float) -> float:
    """The fusion weight an ablation uses: ``lam`` for dual, 1 for regional, 0 for global."""
    if ablation not in ABLATIONS:
        raise ValueError(f"unknown ablation {ablation!r}; expected one of {ABLATIONS}")
    return {"dual": float(lam), "regional": 1.0, "global": 0.0}[ablation]


def checked_projection(proj: Union[torch.Tensor, np.ndarray], width: int, embed_dim: int,
                       model_name: str = "") -> torch.Tensor:
    """A regional projection as float32 CPU ``[width, D]``; ValueError for a wrong shape or non-finite values."""
    t = torch.as_tensor(np.asarray(proj) if not isinstance(proj, torch.Tensor) else proj)
    t = t.detach().to("cpu", torch.float32).clone()
    if tuple(t.shape) != (int(width), int(embed_dim)):
        raise ValueError(f"regional projection must be [{width}, {embed_dim}] for {model_name!r}, "
                         f"got {tuple(t.shape)} (was it trained for another model?)")
    if not torch.isfinite(t).all():
        raise ValueError("regional projection contains NaN or inf")
    return t


def projection_identity(proj_regional, proj_global) -> str:
    """``off-the-shelf`` when ``P_r == P_g``, else ``sha256:<16 hex>`` of ``P_r`` (RUNA's head identity, the
    thresholds' ``projection``)."""
    same = tuple(proj_regional.shape) == tuple(proj_global.shape) and bool((proj_regional == proj_global).all())
    if same:
        return OFF_THE_SHELF
    a = proj_regional.detach().to("cpu").float().contiguous().numpy()
    return "sha256:" + hashlib.sha256(np.ascontiguousarray(a, np.float32).tobytes()).hexdigest()[:16]


def fuse(f_r: Optional[torch.Tensor], f_g: Optional[torch.Tensor], lam: float, proj_regional: torch.Tensor,
         proj_global: torch.Tensor) -> torch.Tensor:
    """Fused, L2-normalised box embeddings ``L2norm(lam*f_r@P_r + (1-lam)*f_g@P_g)`` (Eq. 3).

    ``f_g`` may be None when ``lam == 1`` and ``f_r`` None when ``lam == 0``. Float32 CPU ``[M, D]``;
    rows with non-finite inputs stay non-finite; an all-zero row normalises to zeros.
    """
    lam = check_lam(lam)
    parts = []
    if lam > 0.0:
        if f_r is None:
            raise ValueError("f_r is required when lam > 0")
        parts.append(lam * (f_r.to("cpu", torch.float32) @ proj_regional))
    if lam < 1.0:
        if f_g is None:
            raise ValueError("f_g is required when lam < 1")
        parts.append((1.0 - lam) * (f_g.to("cpu", torch.float32) @ proj_global))
    emb = parts[0] if len(parts) == 1 else parts[0] + parts[1]
    return emb / emb.norm(dim=-1, keepdim=True).clamp_min(1e-12)


class RunaMethod(Method):
    """RUNA (see the module docstring). ``P_r``: the head's projection when a head is set, else the model's
    ``P_g`` (the encoder's ``proj_global``, off the shelf)."""

    name = "runa"
    paper = "RUNA (paper 001): regional + blurred global CLIP views, fused projections, -max cosine"
    Settings = RunaSettings
    views = ("regional", "global")
    outputs = ("cls",)
    ablations = ABLATIONS
    head_is_projection = True
    #: what fitting reads: the shots' crops only (P_g and the global view stay off the shelf)
    fit_views = ("regional",)
    #: paper defaults of the fine-tuning (Eq. 7; tau and weight decay: see core.finetune)
    fit_defaults = {"lr": 5e-6, "epochs": 100, "batch_size": 256, "tau": 0.01, "weight_decay": 0.01, "seed": 0}

    def views_for(self, ablation: str = "dual") -> Tuple[str, ...]:
        self.check_ablation(ablation)
        return VIEWS_FOR_ABLATION[ablation]

    @classmethod
    def settings_blur_radius(cls, settings) -> Optional[float]:
        return settings.blur_radius

    @property
    def proj_regional(self) -> torch.Tensor:
        """``P_r`` in use: the head's, else the model's ``P_g``."""
        if self.head is not None:
            return self.head.state[PROJECTION_KEY]
        return self.encoder.proj_global

    def set_head(self, head) -> None:
        super().set_head(head)
        if head is not None:
            enc = self.encoder
            if PROJECTION_KEY not in head.state:
                raise ValueError(f"head {head.source} holds no {PROJECTION_KEY!r} (RUNA's regional projection)")
            try:
                head.state[PROJECTION_KEY] = checked_projection(head.state[PROJECTION_KEY], enc.width, enc.embed_dim,
                                                                enc.model_name)
            except ValueError as exc:
                raise ValueError(f"head {head.source}: {exc}") from None

    def head_identity(self) -> str:
        """RUNA's head is its regional projection: ``off-the-shelf`` or the projection's hash
        (the same identity as the thresholds' ``projection``, however the projection was loaded)."""
        return projection_identity(self.proj_regional, self.encoder.proj_global)

    def identity(self, ablation: str = "dual", settings=None) -> Dict[str, Any]:
        """The fusion weight actually used (1 for regional, 0 for global), the blur radius (None for the
        regional ablation, which has no global view), the regional projection (= the head)."""
        s = self.settings if settings is None else self.check_settings(settings)
        head = self.head_identity()
        return {"lam": effective_lam(ablation, s.lam),
                "blur_radius": None if ablation == "regional" else float(s.blur_radius),
                "projection": head, "method": self.name, "head": head}

    def missing(self, keys, ablation: str, settings=None) -> Optional[str]:
        s = self.settings if settings is None else self.check_settings(settings)
        lam_e = effective_lam(ablation, s.lam)
        for need, view in ((lam_e > 0, "regional"), (lam_e < 1, "global")):
            if need and feature_key(view, "cls") not in keys:
                return f"ablation {ablation!r} (lam={lam_e:g}) needs the {view} view"
        return None

    def _projection(self, head) -> torch.Tensor:
        """``P_r`` for one call: ``head`` (a Head or a ``[width, D]`` tensor) or the one in use."""
        if head is None:
            return self.proj_regional
        enc = self.encoder
        proj = head.state.get(PROJECTION_KEY) if hasattr(head, "state") else head
        return checked_projection(proj, enc.width, enc.embed_dim, enc.model_name)

    def embed(self, feats: Mapping[str, torch.Tensor], ablation: str = "dual", settings=None,
              head=None) -> torch.Tensor:
        """Fused box embeddings ``I_t`` ``[M, D]`` (Eq. 3) of the boxes' features (``settings``, ``head``:
        see :meth:`similarities`)."""
        s = self.settings if settings is None else self.check_settings(settings)
        lam_e = effective_lam(ablation, s.lam)
        return fuse(feats.get(feature_key("regional", "cls")) if lam_e > 0 else None,
                    feats.get(feature_key("global", "cls")) if lam_e < 1 else None, lam_e,
                    self._projection(head), self.encoder.proj_global)

    def similarities(self, feats, text_emb, ablation: str = "dual", settings=None, head=None) -> torch.Tensor:
        """``[M, K]`` cosines of the fused embeddings to the ID text embeddings. ``settings``: a
        :class:`RunaSettings` for this call (None = the ones in use); ``head``: another ``P_r`` for this call
        only (a Head or a ``[width, D]`` tensor; nothing shared is changed)."""
        return cosine_similarities(self.embed(feats, ablation, settings, head), text_emb)

    def fit(self, feats: Mapping[str, torch.Tensor], labels: torch.Tensor, text_emb: torch.Tensor, *,
            progress: bool = False, context: Optional[Sequence[Sequence[int]]] = None, **hyper: Any) -> FitOutput:
        """Few-shot fine-tuning of ``P_r`` (Eq. 7, ``core.finetune.train_projection``) from the shots'
        ``regional.cls`` features, starting at the projection in use (``context`` is not read).

        Returns ``(state, loss_curve, hyper)``: ``state = {"proj_regional": P_r}`` (a RUNA head's weights)."""
        hp = {**self.fit_defaults, **{k: v for k, v in hyper.items() if v is not None}}
        proj, curve = train_projection(feats[feature_key("regional", "cls")], labels, text_emb,
                                       self.proj_regional.clone(), tau=hp["tau"], lr=hp["lr"],
                                       batch_size=hp["batch_size"], epochs=hp["epochs"],
                                       weight_decay=hp["weight_decay"], seed=hp["seed"], progress=progress)
        return {PROJECTION_KEY: proj}, [float(v) for v in curve], hp
