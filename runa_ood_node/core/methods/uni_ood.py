"""UNI-OOD (paper 002, CVPR 2026): cross-context attentive vision-language OOD scoring, the method class.

Per box two views through the same frozen CLIP tower, in the frame's ONE backend call: the crop
(``regional``) and the background. ``background="masked"`` (default): the frame with the box filled with
the mean colour (``core.views``: the paper does not say how the object is removed; the mean colour is what
the tower sees as "no signal"), one view per box; ``background="full"``: the whole frame, one view per
image shared by its boxes (cheaper: N + 1 trunk passes instead of 2N). Backbone outputs: ``tokens``,
``attn_cls`` and ``xattn`` (the crop's CLS query against the background's keys, per layer and head,
averaged). With ``P`` the visual projection, ``t_c`` the ID text embeddings (``uni_ood_ops``):

* target weights ``w = beta * mu``: ``beta`` the crop's CLS attention, ``mu = max(cos(P z_i, t_c), 0)``;
* background weights: ``beta`` the inter-image attention, ``mu`` against the background text ``t~_c`` (all ID
  prompts aggregated by the text tower's inter-[EOT] attention; computed once per label set, :meth:`prepare`);
* two combiners (three-layer CNN over the weighted patch grid + MLP with the weighted CLS), one per branch;
* ``Omega[m, c] = cos(P (z_x(c) + z_bg(c)), t_c)`` for every candidate class c (K combiner passes per box):
  the per-box class similarities ``[M, K]``; uncertainty = ``-max_c Omega`` (the shared ``runa`` scorer).

Head (``fit``): the two combiners only, trained with the two-way CLIP contrastive loss, backbone frozen
(``uni_ood_ops.fit_uni_ood``; its docstring states the choices where the paper is silent). No pretrained
CLIP weights exist on the development machine: nothing here is a claim about detection quality.
"""
from __future__ import annotations

from typing import Dict, Mapping, Optional, Tuple

import numpy as np
import torch

from .base import Method, feature_key, grid_size
from .uni_ood_ops import (Combiner, background_text, background_weights, fit_uni_ood, target_weights,
                          text_eot_attention, uni_ood_similarities)

#: the background view: the frame with the box masked (one view per box) or the whole frame (one per image)
BACKGROUNDS = ("masked", "full")


class UniOodMethod(Method):
    """UNI-OOD (see the module docstring). ``background``: ``masked`` (default) or ``full``."""

    name = "uni-ood"
    paper = "UNI-OOD (paper 002): crop + background views, attention-weighted token combiners, per-class cosine"
    outputs = ("tokens", "attn_cls", "xattn")
    needs_head = True
    fit_defaults = {"epochs": 100, "batch_size": 256, "lr": 1e-3, "weight_decay": 0.01, "temperature": 0.01,
                    "pairing": "candidate", "seed": 0}

    def __init__(self, encoder, head=None, background: str = "masked"):
        self.grid = grid_size(encoder)
        self._set_background(background)
        self._modules = None
        self._text: Dict[str, torch.Tensor] = {}
        super().__init__(encoder, head)

    def _set_background(self, background: str) -> None:
        if background not in BACKGROUNDS:
            raise ValueError(f"UNI-OOD background must be one of {BACKGROUNDS}, got {background!r}")
        self.background = background
        self.bg_view = "background" if background == "masked" else "frame"
        self.views = ("regional", self.bg_view)
        self.fit_views = self.views

    def pairs(self, views) -> Tuple[Tuple[str, str], ...]:
        return (("regional", self.bg_view),)

    @property
    def _keys(self):
        return (feature_key("regional", "tokens"), feature_key("regional", "attn_cls"),
                feature_key("regional", "xattn"), feature_key(self.bg_view, "tokens"))

    # ------------------------------------------------------------------ features
    def feature_shapes(self, views) -> Dict[str, torch.Tensor]:
        T, W = 1 + self.grid * self.grid, int(self.encoder.width)
        tok, att, xat, bg = self._keys
        return {tok: torch.zeros((0, T, W)), att: torch.zeros((0, T)), xat: torch.zeros((0, T)),
                bg: torch.zeros((0, T, W))}

    def box_features(self, out, boxes_xyxy: np.ndarray, image_wh) -> Dict[str, torch.Tensor]:
        tok, att, xat, bg = self._keys
        M = int(out["regional"]["tokens"].shape[0])
        bg_tokens = out[self.bg_view]["tokens"]
        if self.bg_view == "frame":  # one shared whole-frame pass per image
            bg_tokens = bg_tokens.expand(M, -1, -1)
        return {tok: out["regional"]["tokens"], att: out["regional"]["attn_cls"],
                xat: out["xattn"][("regional", self.bg_view)], bg: bg_tokens}

    def missing(self, keys, ablation: str, lam: float = 0.5) -> Optional[str]:
        lost = [k for k in self._keys if k not in keys]
        return None if not lost else f"method 'uni-ood' ({self.background} background) needs {lost}"

    # ------------------------------------------------------------------ text side
    def prepare(self, label_set, text_emb: torch.Tensor) -> None:
        """The background text ``t~`` of the label set (inter-text [EOT] attention), once per label set."""
        key = label_set.content_hash()
        if key in self._text:
            self.bg_text = self._text[key]
            return
        prompts = label_set.prompts()  # per class, its prompts (templates)
        n = {len(p) for p in prompts}
        tok = self.encoder.tokenizer
        if len(n) == 1:  # [K, P, ctx]: the attention among the K prompts of each template, averaged
            ids = torch.stack([tok(list(p)) for p in prompts])
        else:
            ids = tok([p[0] for p in prompts])
        with torch.no_grad():
            w = text_eot_attention(self.encoder.model, ids.to(self.encoder.device)).float().cpu()
        self.bg_text = self._text[key] = background_text(text_emb, w)

    # ------------------------------------------------------------------ head
    def set_head(self, head) -> None:
        super().set_head(head)
        if head is not None:
            self._set_background(str(head.hyper.get("background", "masked")))
        self._modules = None if head is None else self._build(head)

    def _build(self, head):
        kwargs = dict(head.hyper.get("combiner") or {})
        try:
            out = []
            for prefix in ("target.", "background."):
                c = Combiner(int(self.encoder.width), self.grid, **kwargs)
                c.load_state_dict({k[len(prefix):]: v for k, v in head.state.items() if k.startswith(prefix)})
                out.append(c.eval())
        except (KeyError, RuntimeError, ValueError, TypeError) as exc:
            raise ValueError(f"head {head.source} does not fit UNI-OOD on {self.encoder.model_name!r} "
                             f"(width {self.encoder.width}, grid {self.grid}): {str(exc).splitlines()[0]}") from None
        return tuple(out)

    def similarities(self, feats: Mapping[str, torch.Tensor], text_emb: torch.Tensor, ablation: str = "dual",
                     lam: float = 0.5, head=None) -> torch.Tensor:
        """``Omega [M, K]`` (module docstring), K combiner passes per box per branch."""
        tc, bc = self.trained_modules(head)
        tok, att, xat, bg = (feats[k] for k in self._keys)
        P = self.encoder.proj_global
        with torch.no_grad():
            wt = target_weights(att, tok, P, text_emb)
            wb = background_weights(xat, bg, P, self.bg_text)
            return uni_ood_similarities(tc(tok, wt), bc(bg, wb), P, text_emb)

    def fit(self, feats: Mapping[str, torch.Tensor], labels: torch.Tensor, text_emb: torch.Tensor,
            progress: bool = False, combiner: Optional[dict] = None, **hyper):
        """Train the two combiners on the shots (``uni_ood_ops.fit_uni_ood``). Returns ``(state, curve, hyper)``."""
        hp = {**self.fit_defaults, **{k: v for k, v in hyper.items() if v is not None},
              "background": self.background, "combiner": dict(combiner or {})}
        tok, att, xat, bg = (feats[k] for k in self._keys)
        tc, bc, curve = fit_uni_ood(tok, att, bg, xat, labels, self.encoder.proj_global, text_emb, self.bg_text,
                                    self.grid, epochs=int(hp["epochs"]), batch=int(hp["batch_size"]), lr=float(hp["lr"]),
                                    weight_decay=float(hp["weight_decay"]), temperature=float(hp["temperature"]),
                                    pairing=str(hp["pairing"]), seed=int(hp["seed"]), progress=progress,
                                    combiner_kwargs=hp["combiner"])
        state = {f"target.{k}": v for k, v in tc.state_dict().items()}
        state.update({f"background.{k}": v for k, v in bc.state_dict().items()})
        return state, [float(v) for v in curve], hp


__all__ = ["UniOodMethod", "BACKGROUNDS"]
