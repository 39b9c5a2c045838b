"""TagOOD on CLIP (paper 003, Li et al., ACM MM 2024), **adapted to detector boxes**: the method class.

TagOOD decouples object features from the whole image with a tagging model; here the detector's boxes
take the tagging model's place (see ``tagood_ops``). Per image ONE pass of the whole frame (view ``frame``,
backbone outputs ``tokens`` and ``attn_cls``); per box:

1. the final-layer patch tokens whose centre lies inside the box, kept where their CLS attention,
   min-max normalised within the box, exceeds ``thr`` = 0.5 (else all of the box's tokens; a box covering
   no token centre gets its nearest token) - ``tagood_ops.select_box_tokens``;
2. TagOOD's projection model (Linear W->512, a learned CLS token, learned positions, 2 pre-norm Transformer
   blocks of 8 heads, MLP 2048) -> feature ``f`` (512) - ``tagood_ops.TagOODProjector``;
3. class similarities ``S[m, c] = mean_p cos(f_{m,p}, C_{c,p})`` over 4 patterns x 128 against the learned
   class centres ``C`` ``[K, 4, 128]`` - ``tagood_ops.tagood_similarities``; uncertainty = ``-max_c S``
   (the shared ``runa`` scorer).

Head (``fit``): the projector and the centres, trained on the few-shot ID boxes' token sets with
CE + 0.1 * MSE(f, C_y), centres by EMA 0.999, AdamW lr 0.01 with cosine annealing, 100 epochs, batch 256
(``tagood_ops.fit_tagood``). Trunk passes per frame: ONE, whatever the number of boxes. No pretrained CLIP
weights exist on the development machine: nothing here is a claim about detection quality.
"""
from __future__ import annotations

from typing import Dict, Mapping, Optional, Tuple

import numpy as np
import torch

from .base import Method, feature_key, grid_size
from .tagood_ops import TagOODProjector, fit_tagood, select_box_tokens, tagood_similarities

TOKENS = feature_key("frame", "box_tokens")
MASK = feature_key("frame", "box_mask")
#: the projector's construction arguments a head records (``hyper``)
_ARCH = ("dim", "heads", "mlp", "blocks", "patterns")


class TagOodMethod(Method):
    """TagOOD on CLIP (see the module docstring). ``thr``: the token selection threshold (paper: 0.5)."""

    name = "tagood"
    paper = "TagOOD (paper 003), adapted: detector boxes replace the tagging model; one whole-frame pass"
    views = ("frame",)
    outputs = ("tokens", "attn_cls")
    needs_head = True
    fit_views = ("frame",)
    fit_defaults = {"epochs": 100, "batch_size": 256, "lr": 0.01, "weight_decay": 5e-4, "lr_min": 1e-5, "seed": 0,
                    "dim": 512, "heads": 8, "mlp": 2048, "blocks": 2, "patterns": 4, "dropout": 0.1,
                    "momentum": 0.999, "mse_weight": 0.1}

    def __init__(self, encoder, head=None, thr: float = 0.5):
        self.thr = float(thr)
        self.grid = grid_size(encoder)
        self._modules = None
        super().__init__(encoder, head)

    # ------------------------------------------------------------------ features
    def feature_shapes(self, views) -> Dict[str, torch.Tensor]:
        n, w = self.grid * self.grid, int(self.encoder.width)
        return {TOKENS: torch.zeros((0, n, w), dtype=torch.float32), MASK: torch.zeros((0, n), dtype=torch.bool)}

    def box_features(self, out, boxes_xyxy: np.ndarray, image_wh: Tuple[int, int]) -> Dict[str, torch.Tensor]:
        """The box's selected tokens, packed first (row-major order), padded to ``G*G`` (mask True = padding)."""
        tokens = out["frame"]["tokens"][0]  # [T, W], token 0 = CLS
        attn = out["frame"]["attn_cls"][0]  # [T]
        sel = select_box_tokens(attn, torch.as_tensor(np.asarray(boxes_xyxy, np.float64)), image_wh, self.grid,
                                thr=self.thr)
        M, n = len(sel), self.grid * self.grid
        packed = torch.zeros((M, n, tokens.shape[-1]), dtype=torch.float32)
        mask = torch.ones((M, n), dtype=torch.bool)
        for i, ix in enumerate(sel):
            packed[i, : ix.numel()] = tokens[ix].float()
            mask[i, : ix.numel()] = False
        return {TOKENS: packed, MASK: mask}

    def missing(self, keys, ablation: str, lam: float = 0.5) -> Optional[str]:
        lost = [k for k in (TOKENS, MASK) if k not in keys]
        return None if not lost else f"method 'tagood' needs {lost} (the frame view)"

    # ------------------------------------------------------------------ head
    def set_head(self, head) -> None:
        super().set_head(head)
        self._modules = None if head is None else self._build(head)
        if head is not None and "thr" in head.hyper:
            self.thr = float(head.hyper["thr"])

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
                     lam: float = 0.5, head=None) -> torch.Tensor:
        """``[M, K]`` mean pattern cosine of the boxes' projected features to the class centres."""
        proj, centres = self.trained_modules(head)
        if centres.shape[0] != text_emb.shape[0]:
            raise ValueError(f"the TagOOD head has {centres.shape[0]} class centres, the label set {text_emb.shape[0]}")
        tokens, mask = feats[TOKENS], feats[MASK]
        width = max(1, int((~mask).sum(1).max())) if mask.numel() else 1
        with torch.no_grad():
            f, _ = proj(tokens[:, :width], mask[:, :width])
        return tagood_similarities(f, centres)

    def fit(self, feats: Mapping[str, torch.Tensor], labels: torch.Tensor, text_emb: torch.Tensor,
            progress: bool = False, **hyper):
        """Train the projector and centres on the shots' token sets. Returns ``(state, loss_curve, hyper)``."""
        hp = {**self.fit_defaults, **{k: v for k, v in hyper.items() if v is not None}, "thr": self.thr,
              "max_tokens": self.grid * self.grid}
        tokens, mask = feats[TOKENS], feats[MASK]
        sets = [tokens[i][~mask[i]] for i in range(tokens.shape[0])]
        proj, centres, curve = fit_tagood(
            sets, labels, int(text_emb.shape[0]), epochs=int(hp["epochs"]), batch=int(hp["batch_size"]),
            lr=float(hp["lr"]), weight_decay=float(hp["weight_decay"]), lr_min=float(hp["lr_min"]), seed=int(hp["seed"]),
            progress=progress, dim=int(hp["dim"]), heads=int(hp["heads"]), mlp=int(hp["mlp"]), blocks=int(hp["blocks"]),
            dropout=float(hp["dropout"]), patterns=int(hp["patterns"]), momentum=float(hp["momentum"]),
            mse_weight=float(hp["mse_weight"]), max_tokens=int(hp["max_tokens"]))
        state = {f"projector.{k}": v for k, v in proj.state_dict().items()}
        state["centres"] = centres.centres.detach().clone()
        return state, [float(v) for v in curve], hp


__all__ = ["TagOodMethod"]
