"""TagOOD on CLIP (paper 003, Li et al., ACM MM 2024), **adapted to detector boxes**: the method class.

TagOOD decouples object features from the whole image with a tagging model; here the detector's boxes
take the tagging model's place (see ``tagood_ops``). Per image ONE pass of the whole frame (view ``frame``
at ``frame_size`` px, backbone outputs ``tokens`` and, for ``selection="attn"``, ``attn_cls``); per box:

1. the final-layer patch tokens whose centre lies inside the box, kept by ``selection``
   (``tagood_ops.SELECTIONS``: ``attn`` = CLS attention min-max normalised within the box > ``thr`` = 0.5,
   the default; ``all`` = every one; ``mu`` = alignment with the ID texts normalised > ``thr``); a box
   covering no token centre gets its nearest token and is counted (``frame.tokens_in_box`` = 0 ->
   ``FrameResult.tokens_in_box``) - ``tagood_ops.select_box_tokens``;
2. TagOOD's projection model (Linear W->512, a learned CLS token, learned positions, 2 pre-norm Transformer
   blocks of 8 heads, MLP 2048) -> feature ``f`` (512) - ``tagood_ops.TagOODProjector``;
3. class similarities ``S[m, c] = mean_p cos(f_{m,p}, C_{c,p})`` over 4 patterns x 128 against the learned
   class centres ``C`` ``[K, 4, 128]`` - ``tagood_ops.tagood_similarities``; uncertainty = ``-max_c S``
   (the shared ``runa`` scorer).

Head (``fit``): the projector and the centres, trained on the few-shot ID boxes' token sets with
CE + 0.1 * MSE(f, C_y), centres started at the class means and moved by an EMA whose rate is capped by the
number of updates (``tagood_ops`` docstring, item 3), AdamW lr 0.01 with cosine annealing, 100 epochs,
batch 256 (``tagood_ops.fit_tagood``). Trunk passes per frame: ONE, whatever the number of boxes.

Settings (:data:`SETTINGS`: ``thr``, ``selection``, ``frame_size``) shape the features the head is trained
on, so they are **head settings**: chosen when the head is fitted (``runa-ood finetune --method tagood
--method-option frame_size=448``, i.e. :meth:`TagOodMethod.configure`), recorded in its hyper-parameters and
read back by :meth:`TagOodMethod.set_head` (a head without them: the defaults it was made with, 0.5 /
``attn`` / the encoder's input size). A setting given explicitly to the constructor that differs from the
head's is refused (ValueError naming both).

``frame_size`` (default: the encoder's input size S, e.g. 224): the frame pass at a higher resolution
(448, 672: a multiple of the patch size) with the tower's positional embeddings interpolated bicubically
(as open_clip's ``resize_pos_embed``; ``core.backbone.backbone_forward``). A ViT-B/32 token covers 183 x 103 px
of a 1280 x 720 frame at 224, 91 x 51 at 448, 61 x 34 at 672. Chosen over tiles: one pass keeps every token's
context the whole frame (a tile's tokens see only their tile) and the CLS attention one frame-wide
distribution; the cost is attention over 4x / 9x the tokens. Only the torch backend serves it: the
exported ONNX Runtime / TensorRT graphs are traced at S, so another ``frame_size`` on them is refused when
the method is built (the node's configure), never run silently at S.

No pretrained CLIP weights exist on the development machine: nothing here is a claim about detection quality.
"""
from __future__ import annotations

from typing import Any, Dict, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch

from .base import FitOutput, Method, feature_key, grid_size
from .tagood_ops import (SELECTIONS, TagOODProjector, fit_tagood, select_box_tokens, token_alignment_score,
                         tagood_similarities, tokens_in_boxes)

TOKENS = feature_key("frame", "box_tokens")
MASK = feature_key("frame", "box_mask")
#: float32 ``[M]``: token centres inside each box (0 = smaller than a token; ``core.pipeline`` reads this key)
TOKENS_IN_BOX = feature_key("frame", "tokens_in_box")
#: the head settings (see the module docstring) and their defaults (``frame_size`` None = the encoder's S)
SETTINGS = {"thr": 0.5, "selection": "attn", "frame_size": None}
#: the projector's construction arguments a head records (``hyper``)
_ARCH = ("dim", "heads", "mlp", "blocks", "patterns")


class TagOodMethod(Method):
    """TagOOD on CLIP (see the module docstring). ``thr``: the token selection threshold (paper: 0.5);
    ``selection``: ``tagood_ops.SELECTIONS``; ``frame_size``: the frame pass's side in px (None = S)."""

    name = "tagood"
    paper = "TagOOD (paper 003), adapted: detector boxes replace the tagging model; one whole-frame pass"
    views = ("frame",)
    outputs = ("tokens", "attn_cls")
    needs_head = True
    fit_views = ("frame",)
    fit_defaults = {"epochs": 100, "batch_size": 256, "lr": 0.01, "weight_decay": 5e-4, "lr_min": 1e-5, "seed": 0,
                    "dim": 512, "heads": 8, "mlp": 2048, "blocks": 2, "patterns": 4, "dropout": 0.1,
                    "momentum": 0.999, "mse_weight": 0.1, "centre_init": "class_means", "ema_span": 0.1}

    def __init__(self, encoder, head=None, settings=None, thr: Optional[float] = None,
                 selection: Optional[str] = None, frame_size: Optional[int] = None):
        self.encoder = encoder
        self._explicit = {k: v for k, v in (("thr", thr), ("selection", selection), ("frame_size", frame_size))
                          if v is not None}
        self._fit_hyper: Dict = {}
        self._text = None
        self._modules = None
        self.configure(**SETTINGS)
        self.configure(**self._explicit)
        super().__init__(encoder, head, settings)

    # ------------------------------------------------------------------ settings
    def configure(self, **options) -> None:
        """Set head settings (:data:`SETTINGS`) and fit hyper-parameters (:attr:`fit_defaults` keys, used by
        :meth:`fit`) before fitting a head (``runa-ood finetune --method-option KEY=VALUE``). Raises ValueError
        for an unknown key or a bad value (a ``frame_size`` that is not a multiple of the patch size, or one
        other than the encoder's input size on a backend other than torch)."""
        unknown = sorted(set(options) - set(SETTINGS) - set(self.fit_defaults))
        if unknown:
            raise ValueError(f"method 'tagood' has no option {unknown}; settings {sorted(SETTINGS)}, fit "
                             f"hyper-parameters {sorted(self.fit_defaults)}")
        for k, v in options.items():
            if k in self.fit_defaults:
                self._fit_hyper[k] = type(self.fit_defaults[k])(v)
        if "thr" in options:
            self.thr = float(options["thr"])
        if "selection" in options:
            sel = str(options["selection"])
            if sel not in SELECTIONS:
                raise ValueError(f"unknown TagOOD token selection {sel!r}; expected one of {list(SELECTIONS)}")
            self.selection = sel
            # the CLS attention costs a key projection per layer: only asked for when it selects
            self.outputs = ("tokens", "attn_cls") if sel == "attn" else ("tokens",)
        if "frame_size" in options:
            self._set_frame_size(options["frame_size"])

    def _set_frame_size(self, size) -> None:
        S, g0 = int(self.encoder.input_size), grid_size(self.encoder)
        patch = S // g0
        size = S if size in (None, "", 0) else int(size)
        if size < patch or size % patch:
            raise ValueError(f"TagOOD frame_size must be a multiple of the patch size {patch} px "
                             f"(the encoder's input {S} px), got {size}")
        self._refuse_backend(size, str(getattr(self.encoder, "backend_name", "torch")))
        self.frame_size = size
        self.grid = size // patch

    def _refuse_backend(self, size: int, backend: str) -> None:
        S = int(self.encoder.input_size)
        if size != S and backend != "torch":
            raise ValueError(f"TagOOD frame_size {size} needs the torch backend: the {backend!r} graph is exported "
                             f"at the encoder's {S} px, so it cannot run a {size} px frame; use backend torch, or a "
                             f"head fitted at frame_size {S}")

    def check_backend(self, kind: str) -> None:
        """Raise ValueError when the visual backend ``kind`` (``torch``, ``onnxruntime``, ``tensorrt``, ``auto``)
        cannot serve these settings: a ``frame_size`` other than the encoder's input size needs torch (the
        exported graphs are traced at S). ``factory.build_scorer`` calls it before building the backend."""
        self._refuse_backend(self.frame_size, str(kind))

    def head_settings_in_use(self) -> Dict:
        """The head settings in use (recorded in a fitted head's hyper-parameters)."""
        return {"thr": self.thr, "selection": self.selection, "frame_size": self.frame_size}

    def prepare(self, label_set, text_emb: torch.Tensor) -> None:
        """Keep the ID text embeddings: ``selection="mu"`` scores the tokens against them."""
        self._text = torch.as_tensor(text_emb).detach().float().cpu()

    # ------------------------------------------------------------------ features
    def feature_shapes(self, views) -> Dict[str, torch.Tensor]:
        n, w = self.grid * self.grid, int(self.encoder.width)
        return {TOKENS: torch.zeros((0, n, w), dtype=torch.float32), MASK: torch.zeros((0, n), dtype=torch.bool),
                TOKENS_IN_BOX: torch.zeros((0,), dtype=torch.float32)}

    def selection_score(self, out) -> Optional[torch.Tensor]:
        """``[T]`` the score ``select_box_tokens`` normalises in each box (None for ``all``)."""
        if self.selection == "attn":
            return out["frame"]["attn_cls"][0]
        if self.selection == "mu":
            if self._text is None:
                raise ValueError("TagOOD selection 'mu' needs the ID text embeddings (OodScorer calls prepare)")
            return token_alignment_score(out["frame"]["tokens"][0], self.encoder.proj_global, self._text)
        return None

    def box_features(self, out, boxes_xyxy: np.ndarray, image_wh: Tuple[int, int]) -> Dict[str, torch.Tensor]:
        """The box's selected tokens, packed first (row-major order), padded to ``G*G`` (mask True = padding),
        and the number of token centres in the box (``TOKENS_IN_BOX``)."""
        tokens = out["frame"]["tokens"][0]  # [T, W], token 0 = CLS
        boxes = torch.as_tensor(np.asarray(boxes_xyxy, np.float64))
        sel = select_box_tokens(self.selection_score(out), boxes, image_wh, self.grid, thr=self.thr,
                                selection=self.selection)
        M, n = len(sel), self.grid * self.grid
        packed = torch.zeros((M, n, tokens.shape[-1]), dtype=torch.float32)
        mask = torch.ones((M, n), dtype=torch.bool)
        for i, ix in enumerate(sel):
            packed[i, : ix.numel()] = tokens[ix].float()
            mask[i, : ix.numel()] = False
        return {TOKENS: packed, MASK: mask, TOKENS_IN_BOX: tokens_in_boxes(boxes, image_wh, self.grid).float()}

    def missing(self, keys, ablation: str, settings=None) -> Optional[str]:
        lost = [k for k in (TOKENS, MASK) if k not in keys]
        return None if not lost else f"method 'tagood' needs {lost} (the frame view)"

    # ------------------------------------------------------------------ head
    def head_settings(self, head) -> Dict:
        """The settings ``head`` was fitted with (a head that records none: the defaults of its time, i.e.
        ``thr`` 0.5, ``attn``, the encoder's input size)."""
        hp = head.hyper
        return {"thr": float(hp.get("thr", SETTINGS["thr"])), "selection": str(hp.get("selection", "attn")),
                "frame_size": int(hp.get("frame_size") or self.encoder.input_size)}

    def set_head(self, head) -> None:
        """Use ``head`` with the settings it was fitted with; refuses a head whose settings differ from ones
        given explicitly to the constructor (e.g. fitted at frame_size 448, asked for 224)."""
        if head is not None:
            if head.method != self.name:
                super().set_head(head)  # the base class's refusal
            want = self.head_settings(head)
            mine = dict(self._explicit)
            if "frame_size" in mine:
                mine["frame_size"] = int(mine["frame_size"] or self.encoder.input_size)
            clash = {k: (v, want[k]) for k, v in mine.items() if v != want[k]}
            if clash:
                raise ValueError(f"head {head.source} was fitted with " + ", ".join(
                    f"{k} {h!r}" for k, (_, h) in clash.items()) + "; this TagOOD was asked for " + ", ".join(
                    f"{k} {v!r}" for k, (v, _) in clash.items()) + ": fit a head with those settings "
                    "(`runa-ood finetune --method tagood --method-option KEY=VALUE`) or use this head's")
            self.configure(**want)
        super().set_head(head)
        self._modules = None if head is None else self._build(head)

    def _build(self, head):
        hp = {**self.fit_defaults, **head.hyper}
        state = head.state
        try:
            cen = state["centres"]
            proj = TagOODProjector(int(self.encoder.width), int(cen.shape[0]), dim=int(hp["dim"]), heads=int(hp["heads"]),
                                   mlp=int(hp["mlp"]), blocks=int(hp["blocks"]), dropout=float(hp["dropout"]),
                                   max_tokens=int(hp.get("max_tokens") or self.grid * self.grid))
            proj.load_state_dict({k[len("projector."):]: v for k, v in state.items() if k.startswith("projector.")})
        except (KeyError, RuntimeError, ValueError) as exc:
            raise ValueError(f"head {head.source} does not fit TagOOD on {self.encoder.model_name!r} "
                             f"(width {self.encoder.width}): {str(exc).splitlines()[0]}") from None
        return proj.eval(), cen.float()

    def similarities(self, feats: Mapping[str, torch.Tensor], text_emb: torch.Tensor, ablation: str = "dual",
                     settings=None, head=None) -> torch.Tensor:
        """``[M, K]`` mean pattern cosine of the boxes' projected features to the class centres."""
        proj, centres = self.trained_modules(head)
        if centres.shape[0] != text_emb.shape[0]:
            raise ValueError(f"the TagOOD head has {centres.shape[0]} class centres, the label set {text_emb.shape[0]}")
        tokens, mask = feats[TOKENS], feats[MASK]
        width = max(1, int((~mask).sum(1).max())) if mask.numel() else 1
        with torch.no_grad():
            f, _ = proj(tokens[:, :width], mask[:, :width])
        return tagood_similarities(f, centres)

    def fit(self, feats: Mapping[str, torch.Tensor], labels: torch.Tensor, text_emb: torch.Tensor, *,
            progress: bool = False, context: Optional[Sequence[Sequence[int]]] = None, **hyper: Any) -> FitOutput:
        """Train the projector and centres on the shots' token sets (``context`` is not read). Returns
        ``(state, loss_curve, hyper)``."""
        hp = {**self.fit_defaults, **self._fit_hyper, **{k: v for k, v in hyper.items() if v is not None},
              **self.head_settings_in_use(), "max_tokens": self.grid * self.grid}
        tokens, mask = feats[TOKENS], feats[MASK]
        sets = [tokens[i][~mask[i]] for i in range(tokens.shape[0])]
        proj, centres, curve = fit_tagood(
            sets, labels, int(text_emb.shape[0]), epochs=int(hp["epochs"]), batch=int(hp["batch_size"]),
            lr=float(hp["lr"]), weight_decay=float(hp["weight_decay"]), lr_min=float(hp["lr_min"]), seed=int(hp["seed"]),
            progress=progress, dim=int(hp["dim"]), heads=int(hp["heads"]), mlp=int(hp["mlp"]), blocks=int(hp["blocks"]),
            dropout=float(hp["dropout"]), patterns=int(hp["patterns"]), momentum=float(hp["momentum"]),
            mse_weight=float(hp["mse_weight"]), max_tokens=int(hp["max_tokens"]),
            centre_init=str(hp["centre_init"]), ema_span=float(hp["ema_span"]))
        hp["momentum_used"] = float(centres.momentum_used)
        state = {f"projector.{k}": v for k, v in proj.state_dict().items()}
        state["centres"] = centres.centres.detach().clone()
        return state, [float(v) for v in curve], hp


__all__ = ["TagOodMethod"]
