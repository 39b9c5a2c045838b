"""TagOOD's math on CLIP tokens: token selection per box, the projection model, class centres, loss, score.

Paper: Li et al., "TagOOD: A Novel Approach to Out-of-Distribution Detection via Vision-Language
Representations and Class Center Learning" (ACM MM 2024; ``../shared/papers/003_*``), with the details of
its code (github.com/Jarvisgivemeasuit/tagood: ``models/classifier.py``, ``classifier_training_ema.py``)
as gathered in ``../shared/docs/METHODS.md``.

**This is an adaptation.** TagOOD decouples object features from an image with a tagging model (RAM,
Swin-L): the tags' cross-attention picks the tokens of the tagged objects. Here the detector's boxes take the
tagging model's place and the final-layer tokens of CLIP's visual tower (one pass over the whole frame)
take RAM's. There is no tag probability, so the score is the centre cosine alone. No pretrained CLIP
weights exist where this was written: nothing here says anything about detection quality.

Pieces (plain torch, no I/O, no pipeline; ``core/methods/tagood.py`` wires them into a method):

1. :func:`select_box_tokens`: per box, the patch tokens whose centre lies inside the box; of those
   (``selection``, see :data:`SELECTIONS`) the ones whose selection score - CLS attention (``attn``, the
   default) or text alignment ``mu`` (``mu``) - min-max normalised within the box, exceeds ``thr`` (0.5, the
   paper's best, Fig. 3), or every one of them (``all``); all of the box's tokens when the normalisation is
   undefined (one token, or equal scores); a box that covers no token centre gets its nearest token
   (:func:`tokens_in_boxes` counts the centres, so such boxes can be counted: ``tokens_in_box < 1``).
2. :class:`TagOODProjector`: ``Linear(W -> 512)``, a learned CLS token prepended, a learned positional
   embedding, 2 pre-norm Transformer blocks (8 heads, MLP 2048, GELU, dropout 0.1), final LayerNorm;
   the CLS output is the feature ``f`` (512), ``Linear(512 -> K)`` the classifier.
3. :class:`ClassCentres`: a buffer ``C`` ``[K, 4, 128]``; ``f`` viewed as 4 patterns x 128; after each batch
   ``C_y <- m * C_y + (1 - m) * f``, no gradient. TagOOD initialises ``C`` with ``randn`` and uses
   ``m = 0.999`` over ~500k updates (ImageNet, 100 epochs). **Changed here** (few shots: 10 per class fit one
   batch, so 100 epochs are 100 updates and ``0.999^100 = 90 %`` of a random start would survive):
   ``C`` starts at the class means of the untrained projector's features (``centre_init="class_means"``)
   and ``m`` is capped so the EMA's time constant ``1 / (1 - m)`` is at most ``ema_span`` (10 %) of the
   updates: ``m_used = min(m, 1 - 1 / (ema_span * updates))`` (0.9 for 100 updates; the paper's 0.999 from
   10 000 updates on). ``centre_init="randn", ema_span=0`` is TagOOD's original (kept for ablation).
4. :func:`tagood_loss`: ``CE(logits, y) + 0.1 * MSE(f, C_y)`` (MSE: mean over the 128 dims, summed over
   the 4 patterns, mean over the batch).
5. :func:`tagood_similarities`: ``S[m, c] = mean_p cos(f_{m,p}, C_{c,p})``; uncertainty = ``-max_c S``
   (the shared ``runa`` scorer applied to ``S``).
6. :func:`fit_tagood`: AdamW lr 0.01, weight decay 5e-4, cosine annealing (per step) to 1e-5, 100 epochs,
   batch 256 (the code's values; the paper says Adam); centres as in 3.
"""
from __future__ import annotations

import math
from typing import List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from .fitting import run_epochs, seeded

__all__ = [
    "SELECTIONS",
    "CENTRE_INITS",
    "select_box_tokens",
    "tokens_in_boxes",
    "token_alignment_score",
    "token_centres",
    "ema_momentum",
    "TagOODProjector",
    "ClassCentres",
    "tagood_loss",
    "tagood_similarities",
    "pad_token_sets",
    "fit_tagood",
]


#: token selection rules of :func:`select_box_tokens` (an ablation; ``attn`` is TagOOD's and the default):
#: ``attn`` the frame's CLS attention (averaged over layers and heads) min-max normalised in the box > thr;
#: ``all`` every token whose centre lies in the box; ``mu`` the tokens' alignment with the ID texts
#: (:func:`token_alignment_score`, UNI-OOD's ``mu`` maxed over the classes) min-max normalised in the box > thr.
SELECTIONS: Tuple[str, ...] = ("attn", "all", "mu")
#: how :func:`fit_tagood` starts the class centres
CENTRE_INITS: Tuple[str, ...] = ("class_means", "randn")


# ---------------------------------------------------------------------------------------------- selection
def token_centres(frame_wh: Tuple[float, float], grid: int) -> torch.Tensor:
    """``[G*G, 2]`` (x, y) frame-pixel centres of the patch tokens, row-major (token ``1 + r*G + c``).

    The frame is squashed to the encoder's ``S x S`` input (``core/views``: no centre crop), so patch
    ``(r, c)`` covers ``x in [c*W/G, (c+1)*W/G)``, ``y in [r*H/G, (r+1)*H/G)`` of the frame.
    """
    w, h = float(frame_wh[0]), float(frame_wh[1])
    g = int(grid)
    cx = (torch.arange(g, dtype=torch.float64) + 0.5) * (w / g)
    cy = (torch.arange(g, dtype=torch.float64) + 0.5) * (h / g)
    yy, xx = torch.meshgrid(cy, cx, indexing="ij")
    return torch.stack([xx.reshape(-1), yy.reshape(-1)], dim=1)


def _inside(centres: torch.Tensor, box) -> torch.Tensor:
    x1, y1, x2, y2 = box
    return (centres[:, 0] >= x1) & (centres[:, 0] <= x2) & (centres[:, 1] >= y1) & (centres[:, 1] <= y2)


def _frame_boxes(boxes_xyxy, frame_wh) -> Tuple[torch.Tensor, float, float]:
    boxes = torch.as_tensor(boxes_xyxy).detach().to(torch.float64).cpu().reshape(-1, 4)
    w, h = float(frame_wh[0]), float(frame_wh[1])
    if not (w > 0 and h > 0):
        raise ValueError(f"frame_wh must be positive, got {frame_wh!r}")
    return boxes, w, h


def tokens_in_boxes(boxes_xyxy: torch.Tensor, frame_wh: Tuple[float, float], grid: int) -> torch.Tensor:
    """int64 ``[M]``: how many patch-token centres lie inside each box (edges inclusive). 0 = the box is
    smaller than a token (or falls between centres): :func:`select_box_tokens` gives it its nearest token,
    shared with its neighbours; the pipeline reports these boxes (``FrameResult.tokens_in_box``)."""
    boxes, w, h = _frame_boxes(boxes_xyxy, frame_wh)
    centres = token_centres((w, h), int(grid))
    return torch.tensor([int(_inside(centres, b).sum()) for b in boxes.tolist()], dtype=torch.long)


def token_alignment_score(tokens: torch.Tensor, proj: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """``[T]``: per token of one frame, ``max_k mu_k`` with ``mu_k = max(cos(token @ proj, text_k), 0)``
    (UNI-OOD's ``mu``, ``uni_ood_ops.token_text_alignment``) over the ID class texts: how much the token looks
    like any ID class. The selection score of ``selection="mu"``; class-specific, unlike the CLS attention."""
    from .uni_ood_ops import token_text_alignment

    mu = token_text_alignment(torch.as_tensor(tokens).reshape(1, -1, proj.shape[0]), proj, text)  # [1, K, T]
    return mu[0].max(dim=0).values


def select_box_tokens(attn_cls: Optional[torch.Tensor], boxes_xyxy: torch.Tensor, frame_wh: Tuple[float, float],
                      grid: int, thr: float = 0.5, selection: str = "attn") -> List[torch.Tensor]:
    """Per box, the indices (into the ``T = 1 + G*G`` tokens, so in ``1..T-1``) of its object tokens.

    TagOOD keeps the tokens whose tag attention, min-max normalised, exceeds 0.5. Here (adaptation) the
    candidates are the patch tokens whose centre lies inside the box (edges inclusive) and the score is
    ``attn_cls`` ``[T]``: CLIP's CLS->token attention of the whole-frame pass (averaged over layers and
    heads) for ``selection="attn"``, :func:`token_alignment_score` for ``"mu"``; ``"all"`` keeps every
    candidate (``attn_cls`` may then be None).

    * min-max normalised *within the box*: ``a' = (a - min) / (max - min)``; kept: ``a' > thr``;
    * ``max == min`` (a single token, or equal scores: the normalisation is undefined) or nothing above
      ``thr`` (only possible with ``thr >= 1``): all of the box's tokens;
    * a box covering no token centre (smaller than a patch, or degenerate): the token nearest to the box
      centre, i.e. the patch containing it (on a regular grid the nearest centre's cell is the one the
      point lies in), clamped to the grid.

    Args:
        attn_cls: ``[T]`` the selection score of the frame's tokens (token 0 = CLS, ignored here).
        boxes_xyxy: ``[M, 4]`` boxes in frame pixels (sanitised: finite).
        frame_wh: ``(W, H)`` of the frame in pixels.
        grid: G, the patch grid side.
        thr: the threshold on the normalised score (paper: 0.5).
        selection: one of :data:`SELECTIONS`.

    Returns:
        ``M`` int64 tensors of ascending token indices, each non-empty.
    """
    g = int(grid)
    if selection not in SELECTIONS:
        raise ValueError(f"unknown token selection {selection!r}; expected one of {list(SELECTIONS)}")
    if g < 1:
        raise ValueError(f"grid must be >= 1, got {grid}")
    attn = None
    if selection != "all" or attn_cls is not None:
        attn = torch.as_tensor(attn_cls).detach().reshape(-1).to(torch.float64).cpu()
        if attn.numel() != 1 + g * g:
            raise ValueError(f"attn_cls has {attn.numel()} tokens; grid {grid} needs 1 + {g}*{g} = {1 + g * g}")
    boxes, w, h = _frame_boxes(boxes_xyxy, frame_wh)
    centres = token_centres((w, h), g)                                      # [G*G, 2]
    out: List[torch.Tensor] = []
    for x1, y1, x2, y2 in boxes.tolist():
        idx = torch.nonzero(_inside(centres, (x1, y1, x2, y2)), as_tuple=False).reshape(-1)
        if idx.numel() == 0:
            cx, cy = 0.5 * (x1 + x2), 0.5 * (y1 + y2)
            col = min(max(int(math.floor(cx * g / w)), 0), g - 1)
            row = min(max(int(math.floor(cy * g / h)), 0), g - 1)
            out.append(torch.tensor([1 + row * g + col], dtype=torch.long))
            continue
        if selection != "all":
            a = attn[1:][idx]
            lo, hi = a.min(), a.max()
            if float(hi - lo) > 0:
                keep = (a - lo) / (hi - lo) > float(thr)
                if bool(keep.any()):
                    idx = idx[keep]
        out.append(idx.to(torch.long) + 1)
    return out


# ---------------------------------------------------------------------------------------------- model
class TagOODProjector(nn.Module):
    """TagOOD's projection model (its code's ``Classifier``): tokens of one object -> feature and logits.

    ``Linear(in_dim -> dim)`` on every token, a learned CLS token prepended, a learned positional embedding
    over the sequence order (TagOOD's ``pos_embedding[:, :N+1]``; the order here is the row-major order of
    the selected tokens), dropout, ``blocks`` pre-norm Transformer blocks (``heads`` heads, MLP ``mlp`` with
    GELU, dropout), a final LayerNorm (eps 1e-6, as the code); the CLS output is the feature, a
    ``Linear(dim -> num_classes)`` gives the logits. Padded tokens (``mask`` True) are never attended to.

    Init as the code: CLS token zeros, positional embedding N(0, 0.02).
    """

    def __init__(self, in_dim: int, num_classes: int, dim: int = 512, heads: int = 8, mlp: int = 2048,
                 blocks: int = 2, dropout: float = 0.1, max_tokens: int = 1024):
        super().__init__()
        if int(in_dim) < 1 or int(num_classes) < 1 or int(dim) < 1 or int(max_tokens) < 1:
            raise ValueError("in_dim, num_classes, dim and max_tokens must be >= 1")
        if int(dim) % int(heads):
            raise ValueError(f"dim {dim} is not divisible by heads {heads}")
        self.in_dim, self.num_classes, self.dim, self.max_tokens = int(in_dim), int(num_classes), int(dim), int(max_tokens)
        self.image_proj = nn.Linear(self.in_dim, self.dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, self.dim))
        self.pos_embedding = nn.Parameter(torch.empty(1, self.max_tokens + 1, self.dim).normal_(std=0.02))
        self.dropout = nn.Dropout(float(dropout))
        self.blocks = nn.ModuleList(
            nn.TransformerEncoderLayer(self.dim, int(heads), dim_feedforward=int(mlp), dropout=float(dropout),
                                       activation="gelu", layer_norm_eps=1e-6, batch_first=True, norm_first=True)
            for _ in range(int(blocks)))
        self.ln = nn.LayerNorm(self.dim, eps=1e-6)
        self.classifier = nn.Linear(self.dim, self.num_classes)

    def forward(self, tokens: torch.Tensor, mask: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        """``tokens [M, N, in_dim]``, ``mask [M, N]`` (True = padding) -> ``(feat [M, dim], logits [M, K])``."""
        if tokens.ndim != 3 or tokens.shape[-1] != self.in_dim:
            raise ValueError(f"tokens must be [M, N, {self.in_dim}], got {tuple(tokens.shape)}")
        m, n, _ = tokens.shape
        if n > self.max_tokens:
            raise ValueError(f"{n} tokens per object exceed max_tokens={self.max_tokens}")
        if mask is None:
            mask = torch.zeros(m, n, dtype=torch.bool, device=tokens.device)
        if tuple(mask.shape) != (m, n):
            raise ValueError(f"mask must be [M, N] = [{m}, {n}], got {tuple(mask.shape)}")
        x = self.image_proj(tokens.to(self.image_proj.weight.dtype))
        x = torch.cat([self.cls_token.expand(m, -1, -1), x], dim=1) + self.pos_embedding[:, :n + 1]
        x = self.dropout(x)
        pad = torch.cat([torch.zeros(m, 1, dtype=torch.bool, device=mask.device), mask.bool()], dim=1)
        for block in self.blocks:
            x = block(x, src_key_padding_mask=pad)
        feat = self.ln(x)[:, 0]
        return feat, self.classifier(feat)


class ClassCentres(nn.Module):
    """TagOOD's class centres: a buffer ``centres [K, patterns, dim // patterns]`` (default ``[K, 4, 128]``).

    Gaussian init (``randn``, TagOOD's ``EMALoss``; ``seed`` makes it reproducible). :meth:`update` is the
    EMA ``C_y <- m * C_y + (1 - m) * f`` after each batch, without gradient.

    :meth:`init_from` sets the centres of the classes present to their class means (:func:`fit_tagood`'s
    ``centre_init="class_means"``, see the module docstring).

    Choice: several samples of one class in a batch update their centre once with their **mean**. TagOOD's
    code writes ``centers[labels] = ...`` with repeated labels, which keeps one arbitrary sample's update (the
    last write; on a GPU not even a defined one); the two agree when a class appears once per batch.
    """

    def __init__(self, num_classes: int, patterns: int = 4, dim: int = 512, seed: Optional[int] = 0):
        super().__init__()
        if int(dim) % int(patterns):
            raise ValueError(f"feature dim {dim} is not divisible by {patterns} patterns")
        gen = torch.Generator().manual_seed(int(seed)) if seed is not None else None
        self.patterns = int(patterns)
        self.register_buffer("centres", torch.randn(int(num_classes), self.patterns, int(dim) // self.patterns,
                                                    generator=gen))

    def _class_means(self, feat: torch.Tensor, labels: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        k, p, d = self.centres.shape
        f = feat.detach().to(self.centres).reshape(-1, p, d)
        y = torch.as_tensor(labels, device=f.device).long().reshape(-1)
        if y.shape[0] != f.shape[0]:
            raise ValueError(f"{f.shape[0]} features but {y.shape[0]} labels")
        sums = torch.zeros_like(self.centres).index_add_(0, y, f)
        counts = torch.bincount(y, minlength=k).to(f.dtype)
        seen = counts > 0
        return seen, sums[seen] / counts[seen].reshape(-1, 1, 1)

    @torch.no_grad()
    def update(self, feat: torch.Tensor, labels: torch.Tensor, momentum: float = 0.999) -> None:
        """EMA update of the labelled classes' centres with (the per-class mean of) ``feat [M, dim]``."""
        seen, mean = self._class_means(feat, labels)
        m = float(momentum)
        self.centres[seen] = m * self.centres[seen] + (1.0 - m) * mean

    @torch.no_grad()
    def init_from(self, feat: torch.Tensor, labels: torch.Tensor) -> None:
        """Centres of the classes in ``labels`` := their class means of ``feat [M, dim]`` (others unchanged)."""
        seen, mean = self._class_means(feat, labels)
        self.centres[seen] = mean

    def forward(self, feat: torch.Tensor) -> torch.Tensor:
        """:func:`tagood_similarities` of ``feat`` to these centres."""
        return tagood_similarities(feat, self.centres)


def _centre_tensor(centres: Union[torch.Tensor, ClassCentres]) -> torch.Tensor:
    c = centres.centres if isinstance(centres, ClassCentres) else centres
    if c.ndim != 3:
        raise ValueError(f"centres must be [K, patterns, d], got {tuple(c.shape)}")
    return c


def tagood_loss(logits: torch.Tensor, feat: torch.Tensor, labels: torch.Tensor,
                centres: Union[torch.Tensor, ClassCentres], mse_weight: float = 0.1) -> torch.Tensor:
    """``CE(logits, y) + mse_weight * MSE(f, C_y)``, TagOOD's loss (its code's weights 1.0 and 0.1).

    ``MSE(f, C_y)``: ``f`` viewed as ``[patterns, d]``; squared error averaged over the ``d`` dims, summed
    over the patterns, averaged over the batch. The centres are a constant here (no gradient). TagOOD's code
    also clamps the total to ``[1e-5, 1e3]``, which only stops the gradient of a diverged batch; left out.
    """
    c = _centre_tensor(centres).detach()
    k, p, d = c.shape
    y = torch.as_tensor(labels, device=logits.device).long().reshape(-1)
    f = feat.reshape(feat.shape[0], p, d)
    mse = F.mse_loss(f, c[y].to(f), reduction="none").mean(-1).sum(-1).mean()
    return F.cross_entropy(logits, y) + float(mse_weight) * mse


def tagood_similarities(feat: torch.Tensor, centres: Union[torch.Tensor, ClassCentres]) -> torch.Tensor:
    """``S [M, K]``: the mean over the patterns of ``cos(f_{m,p}, C_{c,p})`` (TagOOD's score before the tag
    probability, which does not exist here). Uncertainty = ``-max_c S[m, c]`` (the ``runa`` scorer)."""
    c = _centre_tensor(centres)
    k, p, d = c.shape
    f = F.normalize(feat.reshape(feat.shape[0], p, d).float(), dim=-1)
    cn = F.normalize(c.to(f), dim=-1)
    return torch.einsum("mpd,kpd->mkp", f, cn).mean(-1)


# ---------------------------------------------------------------------------------------------- training
def ema_momentum(momentum: float, updates: int, ema_span: float) -> float:
    """The EMA rate :func:`fit_tagood` uses: ``min(momentum, 1 - 1 / (ema_span * updates))`` so the EMA's time
    constant ``1 / (1 - m)`` is at most ``ema_span`` of the ``updates`` (a start's weight after them is then at
    most ``exp(-1 / ema_span)``, 4.5e-5 for 0.1); ``ema_span <= 0``: ``momentum`` as given (TagOOD's rule).
    Never below 0."""
    m = float(momentum)
    if not (0.0 <= m <= 1.0):
        raise ValueError(f"momentum must be in [0, 1], got {momentum!r}")
    if float(ema_span) > 0 and int(updates) > 0:
        m = min(m, max(0.0, 1.0 - 1.0 / (float(ema_span) * int(updates))))
    return m


def pad_token_sets(token_sets: Sequence[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
    """``n_i x W`` token sets -> ``(tokens [M, N_max, W], mask [M, N_max])`` zero-padded, mask True = padding.
    ``N_max >= 1`` (an empty set is all padding: the projector then sees its CLS token only)."""
    if len(token_sets) == 0:
        raise ValueError("no token sets")
    widths = {int(t.shape[-1]) for t in token_sets}
    if len(widths) != 1 or any(t.ndim != 2 for t in token_sets):
        raise ValueError("every token set must be [n_i, W] with one W")
    w = widths.pop()
    n_max = max(1, max(int(t.shape[0]) for t in token_sets))
    tokens = torch.zeros(len(token_sets), n_max, w, dtype=torch.float32)
    mask = torch.ones(len(token_sets), n_max, dtype=torch.bool)
    for i, t in enumerate(token_sets):
        n = int(t.shape[0])
        tokens[i, :n] = t.detach().float().cpu()
        mask[i, :n] = False
    return tokens, mask


def fit_tagood(token_sets: List[torch.Tensor], labels, num_classes: int, epochs: int = 100, batch: int = 256,
               lr: float = 0.01, weight_decay: float = 5e-4, lr_min: float = 1e-5, seed: int = 0,
               progress: bool = False, *, dim: int = 512, heads: int = 8, mlp: int = 2048, blocks: int = 2,
               dropout: float = 0.1, patterns: int = 4, momentum: float = 0.999, mse_weight: float = 0.1,
               max_tokens: Optional[int] = None, centre_init: str = "class_means", ema_span: float = 0.1
               ) -> Tuple[TagOODProjector, ClassCentres, List[float]]:
    """Train TagOOD's projector and centres on few-shot ID objects (their selected tokens).

    Per batch, as TagOOD's ``classifier_training_ema.py``: feature and logits of the batch, loss
    :func:`tagood_loss` against the centres *before* this batch's update, the EMA centre update with the
    batch's (detached) features, backward, AdamW step, cosine annealing step (``T_max = epochs * batches per
    epoch``, to ``lr_min``). Everything random (init, centres, shuffling, dropout) is seeded by ``seed``
    inside a forked RNG: the global RNG state is untouched and equal inputs give equal heads on one device.

    Centres (see the module docstring): ``centre_init="class_means"`` starts them at the class means of the
    untrained projector's features (eval mode, before the first step), ``"randn"`` at TagOOD's Gaussian;
    the EMA rate is :func:`ema_momentum` ``(momentum, epochs * batches per epoch, ema_span)``, stored as
    ``centres.momentum_used`` (``ema_span=0``: ``momentum`` itself, TagOOD's rule).

    Args:
        token_sets: ``M`` tensors ``[n_i, W]``: the selected tokens of each training object
            (``select_box_tokens`` indices into the frame's ``tokens``).
        labels: ``[M]`` class indices in ``[0, num_classes)``.
        epochs, batch, lr, weight_decay, lr_min: TagOOD's by default (lr 0.01 as its paper; AdamW, decay 5e-4,
            cosine annealing to 1e-5, 100 epochs, batch 256 as its code).
        max_tokens: positional embedding length, the most tokens one object may have at inference (default
            ``max(1024, longest set)``: every box of a CLIP grid up to 32 x 32; positions beyond the longest
            training set stay at their initialisation).

    Returns:
        ``(projector, centres, loss_curve)``: both in eval mode on the CPU; ``loss_curve[e]`` is epoch ``e``'s
        sample-weighted mean loss.
    """
    y = torch.as_tensor(labels).long().reshape(-1)
    if y.shape[0] != len(token_sets):
        raise ValueError(f"{len(token_sets)} token sets but {y.shape[0]} labels")
    if y.numel() and (int(y.min()) < 0 or int(y.max()) >= int(num_classes)):
        raise ValueError(f"labels must be in [0, {num_classes})")
    if int(epochs) < 0 or int(batch) < 1 or not (float(lr) > 0):
        raise ValueError(f"need epochs >= 0, batch >= 1, lr > 0; got {epochs}, {batch}, {lr}")
    if centre_init not in CENTRE_INITS:
        raise ValueError(f"unknown centre_init {centre_init!r}; expected one of {list(CENTRE_INITS)}")
    tokens, mask = pad_token_sets(token_sets)
    if not torch.isfinite(tokens).all():
        raise ValueError("token sets contain NaN or inf")
    lengths = (~mask).sum(1)
    n = tokens.shape[0]
    steps_per_epoch = max(1, math.ceil(n / int(batch)))
    with seeded(seed):
        proj = TagOODProjector(tokens.shape[-1], int(num_classes), dim=dim, heads=heads, mlp=mlp, blocks=blocks,
                               dropout=dropout, max_tokens=int(max_tokens or max(1024, tokens.shape[1])))
        centres = ClassCentres(int(num_classes), patterns=patterns, dim=dim, seed=seed)
        m_used = ema_momentum(momentum, int(epochs) * steps_per_epoch, ema_span)
        centres.momentum_used = m_used
        if centre_init == "class_means" and n:
            proj.eval()
            with torch.no_grad():
                feats0 = torch.cat([proj(tokens[i:i + int(batch), :max(1, int(lengths[i:i + int(batch)].max()))],
                                         mask[i:i + int(batch), :max(1, int(lengths[i:i + int(batch)].max()))])[0]
                                    for i in range(0, n, int(batch))])
            centres.init_from(feats0, y)
        opt = torch.optim.AdamW(proj.parameters(), lr=float(lr), weight_decay=float(weight_decay))
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, int(epochs) * steps_per_epoch),
                                                           eta_min=float(lr_min))

        def step(idx: torch.Tensor) -> torch.Tensor:
            width = max(1, int(lengths[idx].max()))
            feat, logits = proj(tokens[idx, :width], mask[idx, :width])
            loss = tagood_loss(logits, feat, y[idx], centres, mse_weight=mse_weight)
            # as TagOOD's EMALoss: the loss has read the centres; update them with this batch (no gradient)
            centres.update(feat.detach(), y[idx], momentum=m_used)
            return loss

        proj.train()
        curve = run_epochs(n, int(batch), int(epochs), seed, step, opt, sched, progress=progress, desc="fit TagOOD")
    proj.eval()
    centres.eval()
    return proj, centres, curve
