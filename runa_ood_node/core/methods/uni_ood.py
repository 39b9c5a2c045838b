"""UNI-OOD (paper 002, CVPR 2026): cross-context attentive vision-language OOD scoring, the method class.

Per box two views through the same frozen CLIP tower, in the frame's ONE backend call: the crop
(``regional``) and the background. ``background="masked"`` (default): the frame with the box filled with
the mean colour (``core.views``: the paper does not say how the object is removed; the mean colour is what
the tower sees as "no signal"), one view per box; ``background="full"``: the whole frame, one view per
image shared by its boxes (cheaper: N + 1 trunk passes instead of 2N). Backbone outputs: ``tokens``,
``attn_cls`` and ``xattn`` (the crop's CLS query against the background's keys, per layer and head,
averaged). With ``P`` the visual projection, ``t_c`` the ID text embeddings (``uni_ood_ops``):

* target weights ``w = beta * mu``: ``beta`` the crop's CLS attention, ``mu = max(cos(P z_i, t_c), 0)``;
* background weights: ``beta`` the inter-image attention, ``mu`` against the background text ``t~_c`` (at
  inference all ID prompts aggregated by the text tower's inter-[EOT] attention to candidate c, without c's
  own prompt if the head says ``exclude_self``; the attention logits computed once per label set,
  :meth:`prepare`; at training each box's image's other ID objects, :meth:`training_background_text`);
* two combiners (three-layer CNN over the weighted patch grid + MLP with the weighted CLS), one per branch;
* ``Omega[m, c] = cos(P (z_x(c) + z_bg(c)), t_c)`` for every candidate class c (K combiner passes per box):
  the per-box class similarities ``[M, K]``; uncertainty = ``-max_c Omega`` (the shared ``runa`` scorer).

Head (``fit``): the two combiners only, trained with the two-way CLIP contrastive loss, backbone frozen
(``uni_ood_ops.fit_uni_ood``; its docstring states the choices where the paper is silent). The head records
its background-text settings (``exclude_self``, ``train_background_text``, :class:`UniOodMethod`); they are
applied at inference from the head. No pretrained
CLIP weights exist on the development machine: nothing here is a claim about detection quality.
"""
from __future__ import annotations

import logging
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch

from .base import FitOutput, Method, feature_key, grid_size
from .uni_ood_ops import (TRAIN_BACKGROUND_TEXTS, Combiner, background_text, background_weights, context_counts,
                          exclusion_counts, fit_uni_ood, inter_text_weights, target_weights, text_eot_logits,
                          uni_ood_similarities)

LOG = logging.getLogger(__name__)

#: the background view: the frame with the box masked (one view per box) or the whole frame (one per image)
BACKGROUNDS = ("masked", "full")
#: the head settings of the background text (recorded in a head's ``hyper``; a head without them was made
#: before they existed, with exactly these values)
BG_TEXT_SETTINGS = {"exclude_self": False, "train_background_text": "aggregate"}


class UniOodMethod(Method):
    """UNI-OOD (see the module docstring). ``background``: ``masked`` (default) or ``full``.

    Background-text settings (head settings: ``fit`` records them in the head, :meth:`set_head` applies the
    head's, and refuses a head whose value differs from one asked for here; None = whatever the head says,
    and for a new fit the default):

    * ``exclude_self``: the inference background text of candidate class c aggregates all ID prompts but
      c's own (default False: all ID prompts, the target's own included, as the paper's approximation);
    * ``train_background_text``: ``others`` (default: each training box's image's other ID objects, as the
      paper's training; a box alone in its image falls back to the aggregate of all ID prompts but the
      candidate's own) or ``aggregate`` (the inference aggregate, ``exclude_self`` applied: the first
      version of this package).
    """

    name = "uni-ood"
    paper = "UNI-OOD (paper 002): crop + background views, attention-weighted token combiners, per-class cosine"
    outputs = ("tokens", "attn_cls", "xattn")
    needs_head = True
    uses_context = True
    fit_defaults = {"epochs": 100, "batch_size": 256, "lr": 1e-3, "weight_decay": 0.01, "temperature": 0.01,
                    "pairing": "candidate", "seed": 0}

    def __init__(self, encoder, head=None, settings=None, background: str = "masked",
                 exclude_self: Optional[bool] = None, train_background_text: Optional[str] = None):
        self.grid = grid_size(encoder)
        self._set_background(background)
        self._modules = None
        self._logits: Dict[str, torch.Tensor] = {}   # label set hash -> inter-text logits [L*H*P, K, K]
        self._label_key: Optional[str] = None
        self._text_emb: Optional[torch.Tensor] = None
        if exclude_self is not None and not isinstance(exclude_self, bool):
            raise ValueError(f"UNI-OOD exclude_self must be True or False, got {exclude_self!r}")
        if train_background_text is not None and train_background_text not in TRAIN_BACKGROUND_TEXTS:
            raise ValueError(f"UNI-OOD train_background_text must be one of {TRAIN_BACKGROUND_TEXTS}, "
                             f"got {train_background_text!r}")
        #: what the caller asked for (None = not asked): a head recording another value is refused
        self._asked = {"exclude_self": exclude_self, "train_background_text": train_background_text}
        self.exclude_self = bool(exclude_self) if exclude_self is not None else False
        self.train_background_text = train_background_text or "others"
        super().__init__(encoder, head, settings)

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

    def missing(self, keys, ablation: str, settings=None) -> Optional[str]:
        lost = [k for k in self._keys if k not in keys]
        return None if not lost else f"method 'uni-ood' ({self.background} background) needs {lost}"

    # ------------------------------------------------------------------ text side
    def prepare(self, label_set, text_emb: torch.Tensor) -> None:
        """The inter-text [EOT] attention logits of the label set's prompts (``text_eot_logits``), once per label
        set; the background texts are made from them (:meth:`background_text_for`)."""
        key = label_set.content_hash()
        self._label_key, self._text_emb = key, text_emb.detach().float().cpu()
        if key in self._logits:
            return
        prompts = label_set.prompts()  # per class, its prompts (templates)
        n = {len(p) for p in prompts}
        tok = self.encoder.tokenizer
        if len(n) == 1:  # [K, P, ctx]: the attention among the K prompts of each template, averaged
            ids = torch.stack([tok(list(p)) for p in prompts])
        else:
            ids = tok([p[0] for p in prompts])
        with torch.no_grad():
            self._logits[key] = text_eot_logits(self.encoder.model, ids.to(self.encoder.device))

    def _prepared_logits(self) -> torch.Tensor:
        if self._label_key is None:
            raise ValueError("UNI-OOD needs prepare(label_set, text_emb) first (OodScorer does it)")
        return self._logits[self._label_key]

    def background_text_for(self, exclude_self: Optional[bool] = None) -> torch.Tensor:
        """``[K, D]`` inference background text of the prepared label set: all ID prompts aggregated by
        inter-text attention to each candidate class (``exclude_self``: without the candidate's own prompt;
        None = this method's setting, i.e. the head's)."""
        es = self.exclude_self if exclude_self is None else bool(exclude_self)
        lg = self._prepared_logits()
        return background_text(self._text_emb, inter_text_weights(lg, exclusion_counts(lg.shape[1], es)))

    @property
    def bg_text(self) -> torch.Tensor:
        """The inference background text with the settings in use (:meth:`background_text_for`)."""
        return self.background_text_for()

    # ------------------------------------------------------------------ head
    def configure(self, **options) -> None:
        """Set the background-text head settings before fitting a head (``runa-ood finetune --method-option
        KEY=VALUE``): ``exclude_self`` (a bool, or true / false / 1 / 0 / yes / no) and ``train_background_text``
        (``others`` / ``aggregate``). Like the constructor's arguments: recorded by :meth:`fit`, and a head
        recording another value is refused. Raises ValueError for an unknown key or a bad value."""
        unknown = sorted(set(options) - set(BG_TEXT_SETTINGS))
        if unknown:
            raise ValueError(f"method 'uni-ood' has no option {unknown}; settings {sorted(BG_TEXT_SETTINGS)}")
        if "exclude_self" in options:
            v = options["exclude_self"]
            if not isinstance(v, bool):
                words = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}
                if str(v).strip().lower() not in words:
                    raise ValueError(f"UNI-OOD exclude_self must be true or false, got {v!r}")
                v = words[str(v).strip().lower()]
            self._asked["exclude_self"] = self.exclude_self = v
        if "train_background_text" in options:
            v = str(options["train_background_text"])
            if v not in TRAIN_BACKGROUND_TEXTS:
                raise ValueError(f"UNI-OOD train_background_text must be one of {TRAIN_BACKGROUND_TEXTS}, got {v!r}")
            self._asked["train_background_text"] = self.train_background_text = v

    @staticmethod
    def head_settings(head) -> Dict[str, object]:
        """The background-text settings a head records (``BG_TEXT_SETTINGS`` for heads made before them)."""
        hp = head.hyper
        return {k: hp.get(k, default) for k, default in BG_TEXT_SETTINGS.items()}

    def _check_settings(self, settings: Mapping[str, object], source: str) -> None:
        for k, v in settings.items():
            asked = self._asked.get(k)
            if asked is not None and asked != v:
                raise ValueError(f"head {source} was trained with UNI-OOD {k}={v!r}, but this scorer asks for "
                                 f"{k}={asked!r}: the background text the head was trained against would not be the "
                                 f"one it is scored with. Use a head fitted with {k}={asked!r}, or leave {k} unset "
                                 "to take the head's")

    def set_head(self, head) -> None:
        super().set_head(head)
        if head is not None:
            settings = self.head_settings(head)
            self._check_settings(settings, head.source)
            self._set_background(str(head.hyper.get("background", "masked")))
            self.exclude_self = bool(settings["exclude_self"])
            self.train_background_text = str(settings["train_background_text"])
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
                     settings=None, head=None) -> torch.Tensor:
        """``Omega [M, K]`` (module docstring), K combiner passes per box per branch."""
        tc, bc = self.trained_modules(head)
        tok, att, xat, bg = (feats[k] for k in self._keys)
        P = self.encoder.proj_global
        # a head for this call only: scored with the background text IT was trained for
        es = None if head is None else bool(self.head_settings(head)["exclude_self"])
        bg_text = self.background_text_for(es)
        with torch.no_grad():
            wt = target_weights(att, tok, P, text_emb)
            wb = background_weights(xat, bg, P, bg_text)
            return uni_ood_similarities(tc(tok, wt), bc(bg, wb), P, text_emb)

    def training_background_text(self, n: int, context: Optional[Sequence[Sequence[int]]] = None,
                                 train_background_text: Optional[str] = None,
                                 exclude_self: Optional[bool] = None) -> Tuple[torch.Tensor, int]:
        """``(bg_text, alone)``: the background text the ``n`` training boxes are trained against.

        ``others``: ``[n, K, D]``, each box's image's other ID objects (``context[i]``: their label-set
        indices) aggregated with each candidate's [EOT] query; a box alone in its image (empty context, or
        no context given at all) falls back to all ID prompts but the candidate's own; ``alone`` counts those.
        ``aggregate``: ``[K, D]``, the inference background text (``exclude_self`` applied), ``alone`` 0.
        """
        mode = train_background_text or self.train_background_text
        if mode == "aggregate":
            return self.background_text_for(exclude_self), 0
        lg = self._prepared_logits()
        k = int(lg.shape[1])
        if context is None:
            context = [()] * int(n)
        if len(context) != int(n):
            raise ValueError(f"context must hold one entry per training box ({n}), got {len(context)}")
        counts, alone = context_counts(context, k)
        # one softmax per distinct background (boxes of one image share most of theirs)
        uniq, inv = torch.unique(counts.reshape(int(n), -1), dim=0, return_inverse=True)
        w = inter_text_weights(lg, uniq.reshape(-1, k, k))[inv] if int(n) else torch.zeros(0, k, k)
        return background_text(self._text_emb, w), alone

    def fit(self, feats: Mapping[str, torch.Tensor], labels: torch.Tensor, text_emb: torch.Tensor, *,
            progress: bool = False, context: Optional[Sequence[Sequence[int]]] = None,
            combiner: Optional[dict] = None, **hyper: Any) -> FitOutput:
        """Train the two combiners on the shots (``uni_ood_ops.fit_uni_ood``). Returns ``(state, curve, hyper)``.

        ``context``: per shot, the label-set indices of the other ID objects of its image (the training
        background text, ``train_background_text="others"``; ``core.finetune.shot_context``). ``hyper`` may
        set ``exclude_self`` and ``train_background_text`` (refused when they differ from what this method was
        asked for); the head records both."""
        settings = {"exclude_self": self.exclude_self, "train_background_text": self.train_background_text}
        for k in settings:
            v = hyper.pop(k, None)
            if v is not None:
                if self._asked.get(k) is not None and self._asked[k] != v:
                    raise ValueError(f"UNI-OOD fit with {k}={v!r}, but this method was built with {k}={self._asked[k]!r}")
                settings[k] = v
        if settings["train_background_text"] not in TRAIN_BACKGROUND_TEXTS:
            raise ValueError(f"train_background_text must be one of {TRAIN_BACKGROUND_TEXTS}, "
                             f"got {settings['train_background_text']!r}")
        settings["exclude_self"] = bool(settings["exclude_self"])
        exclusion_counts(int(text_emb.shape[0]), settings["exclude_self"])  # refuses exclude_self with one class
        if self._text_emb is not None and self._text_emb.shape != text_emb.shape:
            raise ValueError(f"text_emb {tuple(text_emb.shape)} is not the prepared label set's "
                             f"{tuple(self._text_emb.shape)}")
        hp = {**self.fit_defaults, **{k: v for k, v in hyper.items() if v is not None},
              "background": self.background, "combiner": dict(combiner or {}), **settings}
        tok, att, xat, bg = (feats[k] for k in self._keys)
        bg_text, alone = self.training_background_text(int(tok.shape[0]), context,
                                                       settings["train_background_text"], settings["exclude_self"])
        if settings["train_background_text"] == "others":
            hp["train_boxes_alone"] = int(alone)  # boxes whose background text fell back to the aggregate
            if context is None and int(hp["epochs"]) > 0:
                LOG.warning("UNI-OOD fit without per-box context (the other objects of each box's image): every "
                            "box's training background text is the aggregate of all ID prompts but its own")
        tc, bc, curve = fit_uni_ood(tok, att, bg, xat, labels, self.encoder.proj_global, text_emb, bg_text,
                                    self.grid, epochs=int(hp["epochs"]), batch=int(hp["batch_size"]), lr=float(hp["lr"]),
                                    weight_decay=float(hp["weight_decay"]), temperature=float(hp["temperature"]),
                                    pairing=str(hp["pairing"]), seed=int(hp["seed"]), progress=progress,
                                    combiner_kwargs=hp["combiner"])
        state = {f"target.{k}": v for k, v in tc.state_dict().items()}
        state.update({f"background.{k}": v for k, v in bc.state_dict().items()})
        return state, [float(v) for v in curve], hp


__all__ = ["UniOodMethod", "BACKGROUNDS"]
