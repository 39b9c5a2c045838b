"""UNI-OOD's math on a frozen CLIP: attention weights, inter-text background prompts, the combiner, the score.

Paper: "UNI-OOD: Unified Object- and Image-level Out-of-Distribution Detection via Cross-Context Attentive
Vision-Language Modeling" (CVPR 2026; ``../shared/papers/002_*``, a summary; no code was published and the
PDF was not reachable: what else is known is in ``../shared/docs/METHODS.md``). No pretrained CLIP weights
exist where this was written: nothing here says anything about detection quality.

Per box ``x`` two views go through the same frozen visual tower: the crop ``I_x`` (target) and the background
``I_(x)``. With ``z_i`` the final-layer tokens after ``ln_post`` (``i = 0`` the CLS token, ``i >= 1`` the
patches on their ``G x G`` grid), ``P`` the visual projection and ``t_c`` the (normalised) text embedding of
ID class ``c``:

* target weights (:func:`target_weights`): ``w_i = beta_i * mu_i``, ``beta_i`` the crop's CLS->token
  attention (softmax over tokens, averaged over all layers and heads), ``mu_i = max(cos(P z_i, t_c), 0)``;
* background weights (:func:`background_weights`): ``beta_i`` from inter-image attention (the crop's CLS
  query at layer l, head h against the background's keys at the same layer and head, softmax over the
  background's tokens, averaged), ``mu_i = max(cos(P z_i^bg, t~_c), 0)`` against the background text
  ``t~_c`` (:func:`background_text`): the background objects' prompts aggregated with inter-text attention
  weights (:func:`text_eot_logits`, :func:`inter_text_weights`: the target prompt's [EOT] query against each
  background prompt's [EOT] key in the text tower, softmax over the background's prompts, averaged over
  layers and heads). At training the background is the image's other objects (their ID labels, as the
  paper's training; :func:`context_counts`); at inference the background objects are unknown, so all ID
  prompts are aggregated, weighted by their relevance to the candidate class (the paper's approximation;
  ``exclude_self`` drops the candidate's own prompt, :func:`exclusion_counts`);
* combiner (:class:`Combiner`): ``z = MLP([w_0 z_0 ; CNN({w_i z_i}_{i>=1})])``: the weighted patch tokens on
  their grid through a three-layer CNN, concatenated with the weighted CLS, an MLP; one combiner for the
  target, one (same structure, own weights) for the background;
* score (:func:`uni_ood_similarities`): ``Omega[m, c] = cos(P (z_x(c) + z_(x)(c)), t_c)`` for every
  candidate ID class c (the weights depend on c, so K combiner passes per box); predicted class
  ``argmax_c Omega``, uncertainty ``-max_c Omega`` (the shared ``runa`` scorer);
* training (:func:`fit_uni_ood`): only the combiners, with the two-way CLIP contrastive loss
  (:func:`clip_contrastive_loss`), backbone and text frozen.

Where the paper is silent, the choices are parameters and each is stated where it is made: the CNN's
channels and kernels, pooling, MLP width, initialisation, the weights' scale, learning rate, epochs,
temperature. The background view itself (masked frame or full frame,
mask fill) is made outside these functions: they take the background pass's tokens and inter-image
attention whichever view produced them (``background: full`` passes one shared whole-frame pass per image,
expanded per box).
"""
from __future__ import annotations

import math
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .fitting import run_epochs, seeded

__all__ = [
    "token_text_alignment",
    "target_weights",
    "background_weights",
    "text_eot_logits",
    "text_eot_attention",
    "inter_text_weights",
    "background_text",
    "exclusion_counts",
    "context_counts",
    "TRAIN_BACKGROUND_TEXTS",
    "Combiner",
    "uni_ood_similarities",
    "clip_contrastive_loss",
    "fit_uni_ood",
]


# ---------------------------------------------------------------------------------------------- weights
def token_text_alignment(tokens: torch.Tensor, proj: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """``mu [M, K, T] = max(cos(tokens @ proj, text_k), 0)``: image-text alignment of every token (CLS and
    patches) with every class text, as the paper's ``mu_i = max(cos(P z_i^L, M_text(t)), 0)``.
    ``text``: ``[K, D]`` (the same texts for every object) or ``[M, K, D]`` (per object, e.g. the training
    background text of each object's image)."""
    per_obj = text.ndim == 3
    if tokens.ndim != 3 or proj.ndim != 2 or text.ndim not in (2, 3) or (per_obj and text.shape[0] != tokens.shape[0]):
        raise ValueError(f"need tokens [M,T,W], proj [W,D], text [K,D] or [M,K,D]; got {tuple(tokens.shape)}, "
                         f"{tuple(proj.shape)}, {tuple(text.shape)}")
    if tokens.shape[-1] != proj.shape[0] or proj.shape[1] != text.shape[-1]:
        raise ValueError(f"tokens width {tokens.shape[-1]}, proj {tuple(proj.shape)} and text dim {text.shape[-1]} "
                         "do not chain")
    emb = F.normalize(tokens.float() @ proj.float(), dim=-1)          # [M, T, D]
    txt = F.normalize(text.float(), dim=-1)                            # [K, D] or [M, K, D]
    return torch.einsum("mtd,mkd->mkt" if per_obj else "mtd,kd->mkt", emb, txt).clamp_min(0.0)


def _attention_times_alignment(attn: torch.Tensor, tokens: torch.Tensor, proj: torch.Tensor,
                               text: torch.Tensor) -> torch.Tensor:
    if attn.ndim != 2 or attn.shape != tokens.shape[:2]:
        raise ValueError(f"attention must be [M, T] = {tuple(tokens.shape[:2])}, got {tuple(attn.shape)}")
    return attn.float()[:, None, :] * token_text_alignment(tokens, proj, text)


def target_weights(attn_cls: torch.Tensor, tokens: torch.Tensor, proj: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """``[M, K, T]`` target-branch token weights ``beta_i * mu_i`` per candidate class k.

    Args:
        attn_cls: ``[M, T]`` the crop pass's CLS->token attention (softmax over all T tokens, CLS included,
            averaged over layers and heads: the backbone's ``attn_cls``) = ``beta``.
        tokens: ``[M, T, W]`` the crop pass's final-layer tokens after ``ln_post`` (the backbone's ``tokens``).
        proj: ``[W, D]`` the visual projection P.
        text: ``[K, D]`` the ID class text embeddings ``t_c``.
    """
    return _attention_times_alignment(attn_cls, tokens, proj, text)


def background_weights(xattn: torch.Tensor, bg_tokens: torch.Tensor, proj: torch.Tensor,
                       bg_text: torch.Tensor) -> torch.Tensor:
    """``[M, K, T]`` background-branch token weights: inter-image ``beta`` (``xattn [M, T]``: the crop's CLS
    query against the background's keys, per layer and head, softmax over the background's tokens,
    averaged) times ``mu`` of the background tokens against the background text ``bg_text [K, D]``
    (:func:`background_text`, row k for candidate class k; ``[M, K, D]``: one per object, at training)."""
    return _attention_times_alignment(xattn, bg_tokens, proj, bg_text)


# ---------------------------------------------------------------------------------------------- inter-text
def _text_model(model):
    """The open_clip CLIP inside ``model`` (a CLIP, or anything holding one as ``.model``, e.g. DualEncoder)."""
    m = model if hasattr(model, "token_embedding") else getattr(model, "model", None)
    needed = ("token_embedding", "positional_embedding", "transformer", "ln_final", "text_projection")
    if m is None or not all(hasattr(m, a) for a in needed):
        raise TypeError("text_eot_attention needs an open_clip CLIP model with a built-in text tower "
                        f"(token_embedding, transformer, ln_final, text_projection); got {type(model).__name__}")
    return m


def _block_parts(block):
    attn = getattr(block, "attn", None)
    if not isinstance(attn, nn.MultiheadAttention) or not hasattr(block, "ln_1") or not hasattr(block, "mlp"):
        raise TypeError(f"text block {type(block).__name__} is not open_clip's ResidualAttentionBlock "
                        "(ln_1, nn.MultiheadAttention attn, ln_2, mlp); its attention cannot be re-run here")
    if getattr(attn, "in_proj_weight", None) is None:
        raise TypeError("separate q/k/v projection weights are not supported")
    for name in ("ln_attn", "ln_inner"):  # scale_attn / scale_fc variants change the block's maths
        if isinstance(getattr(block, name, None), nn.LayerNorm):
            raise TypeError(f"text block with {name} is not supported")
    ident = nn.Identity()
    return attn, getattr(block, "ls_1", ident), getattr(block, "ls_2", ident)


def _eot_index(model, token_ids: torch.Tensor) -> torch.Tensor:
    pool = getattr(model, "text_pool_type", "argmax")
    if pool == "eos":
        eos = getattr(model, "text_eos_id", None)
        if eos is None:
            raise TypeError("text_pool_type 'eos' without text_eos_id")
        return (token_ids == eos).int().argmax(dim=-1)
    if pool == "last":
        return torch.full((token_ids.shape[0],), token_ids.shape[1] - 1, dtype=torch.long, device=token_ids.device)
    if pool != "argmax":
        raise TypeError(f"text_pool_type {pool!r} has no single [EOT] token")
    return token_ids.argmax(dim=-1)  # CLIP's tokenizer: the EOT id is the largest in the vocabulary


def _text_dtype(model) -> torch.dtype:
    """The dtype the text tower computes in: open_clip's ``encode_text`` casts its activations to the
    transformer's weight dtype (``get_cast_dtype``: fp16 / bf16 Linear weights for ``precision`` fp16 / bf16,
    while its LayerNorms and token embedding stay fp32)."""
    get = getattr(model.transformer, "get_cast_dtype", None)
    if callable(get):
        return get()
    return model.transformer.resblocks[0].attn.in_proj_weight.dtype


@torch.no_grad()
def _text_eot_logits_2d(model, token_ids: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(logits [L*H, K, K], features [K, D])`` of K prompts, float32 CPU (see :func:`text_eot_logits`)."""
    k, ctx = token_ids.shape
    dev = model.token_embedding.weight.device
    ids = token_ids.to(dev).long()
    eot = _eot_index(model, ids)
    rows = torch.arange(k, device=dev)
    dtype = _text_dtype(model)  # activations follow the tower's weights, as encode_text does
    x = model.token_embedding(ids).to(dtype) + model.positional_embedding[:ctx].to(dtype)
    mask = getattr(model, "attn_mask", None)
    if mask is not None:
        mask = mask[:ctx, :ctx].to(dev, torch.float32)
    terms = []
    for block in model.transformer.resblocks:
        attn, ls_1, ls_2 = _block_parts(block)
        heads, width = attn.num_heads, attn.embed_dim
        dh = width // heads
        y = block.ln_1(x)
        q, kk, v = F.linear(y, attn.in_proj_weight, attn.in_proj_bias).chunk(3, dim=-1)
        q, kk, v = (t.reshape(k, ctx, heads, dh).transpose(1, 2) for t in (q, kk, v))    # [K, H, ctx, dh]
        # scores and softmax in fp32 (as the fused attention kernels accumulate), the rest in the tower's dtype
        logits = q.float() @ kk.float().transpose(-1, -2) / math.sqrt(dh)
        if mask is not None:
            logits = logits + mask
        out = (logits.softmax(-1).to(dtype) @ v).transpose(1, 2).reshape(k, ctx, width)
        x = (x + ls_1(attn.out_proj(out))).to(dtype)
        x = (x + ls_2(block.mlp(block.ln_2(x)))).to(dtype)
        # inter-text attention: prompt a's [EOT] query against prompt b's [EOT] key, same layer and head
        q_eot = q[rows, :, eot].float()                             # [K, H, dh]
        k_eot = kk[rows, :, eot].float()                            # [K, H, dh]
        terms.append(torch.einsum("ahd,bhd->hab", q_eot, k_eot) / math.sqrt(dh))
    feats = model.ln_final(x)[rows, eot]
    tp = model.text_projection
    feats = tp(feats) if isinstance(tp, nn.Linear) else feats @ tp.to(feats.dtype)
    return torch.cat(terms, 0).float().cpu(), feats.float().cpu()


def text_eot_logits(encoder_model, token_ids: torch.Tensor, return_features: bool = False):
    """``[L*H*P, K, K]`` inter-text attention logits between K prompts in the text tower, one ``[K, K]`` per
    layer l, head h (and template p): ``q_eot(a) . k_eot(b) / sqrt(d_head)``, prompt a's [EOT] query against
    prompt b's [EOT] key (UNI-OOD's inter-text attention before its softmax).

    open_clip runs attention with ``need_weights=False``, so the tower is re-run here layer by layer from the
    layers' own weights (``ln_1``, ``attn.in_proj``, ``attn.out_proj``, ``ln_2``, ``mlp``, causal mask); each
    prompt runs on its own, as in the tower. Activations follow the tower's weight dtype as ``encode_text``
    does (open_clip's ``precision`` fp16 / bf16 turns the Linear weights to fp16 / bf16 and keeps LayerNorms
    fp32); the attention scores and the returned logits and features are float32 CPU.

    The logits are kept per layer and head so that the softmax can run over any subset of the prompts (the
    other objects of an image at training, all ID prompts at inference, :func:`inter_text_weights`): the
    mean over layers and heads of a softmax over a subset is not the renormalised mean over all prompts.

    Args:
        encoder_model: an open_clip ``CLIP`` (or an object holding it as ``.model``, e.g. ``DualEncoder``).
        token_ids: ``[K, ctx]`` tokenised prompts (one per class), or ``[K, P, ctx]`` with P templates per
            class: then the logits of each template are computed among the K prompts of that template and the
            templates' terms are concatenated (so a mean over terms averages the templates).
        return_features: also return the re-run tower's text features ``[K, D]`` (``[K, P, D]``), unnormalised,
            which equal ``encode_text`` (the check that the re-run is the tower).
    """
    model = _text_model(encoder_model)
    ids = torch.as_tensor(token_ids)
    if ids.ndim == 2:
        lg, f = _text_eot_logits_2d(model, ids)
    elif ids.ndim == 3:
        per = [_text_eot_logits_2d(model, ids[:, p]) for p in range(ids.shape[1])]
        lg = torch.cat([p[0] for p in per], 0)
        f = torch.stack([p[1] for p in per], dim=1)
    else:
        raise ValueError(f"token_ids must be [K, ctx] or [K, P, ctx], got {tuple(ids.shape)}")
    return (lg, f) if return_features else lg


def text_eot_attention(encoder_model, token_ids: torch.Tensor, return_features: bool = False):
    """``W [K, K]``: inter-text attention among all K prompts, ``W[a, b]`` = the mean over layers and heads
    (and templates) of ``softmax_b(q_eot(a) . k_eot(b) / sqrt(d_head))`` (rows sum to 1); it depends only on
    the prompts. ``inter_text_weights(text_eot_logits(...))``; arguments as :func:`text_eot_logits`."""
    out = text_eot_logits(encoder_model, token_ids, return_features)
    lg = out[0] if return_features else out
    w = inter_text_weights(lg)
    return (w, out[1]) if return_features else w


def inter_text_weights(logits: torch.Tensor, counts=None) -> torch.Tensor:
    """Inter-text attention weights over a set of background prompts, from :func:`text_eot_logits`.

    ``w[c, j] = mean_t softmax_j(logits[t, c, j] + log counts[c, j])``: candidate (target) prompt c's [EOT]
    query against the background prompts' keys, the softmax over the background's members only, averaged
    over the terms (layers, heads, templates). ``counts[c, j]`` is how often prompt j appears in the
    background of target c (0 = absent; an image with two cars holds the car prompt twice, the paper's sum
    over the objects ``x'``); a row with no member is all zeros.

    Args:
        logits: ``[T, K, K]``.
        counts: None (every prompt once: the inference aggregate over all ID prompts), ``[K]`` (the same
            background for every target c), ``[K, K]`` (per target; ``1 - eye`` = all ID prompts but the
            target's own, ``exclude_self``) or ``[N, K, K]`` (one background per object) -> ``[N, K, K]``.
    Returns:
        ``[K, K]`` (``[N, K, K]`` for per-object counts), float32; rows sum to 1 or are 0.
    """
    lg = torch.as_tensor(logits).float()
    if lg.ndim != 3 or lg.shape[1] != lg.shape[2]:
        raise ValueError(f"logits must be [T, K, K], got {tuple(lg.shape)}")
    if counts is None:
        return lg.softmax(-1).mean(0)
    k = lg.shape[1]
    c = torch.as_tensor(counts, dtype=torch.float32)
    if c.ndim == 1:
        c = c[None].expand(k, k)
    if c.ndim == 3:
        return torch.stack([inter_text_weights(lg, ci) for ci in c]) if c.shape[0] else torch.zeros(0, k, k)
    if c.shape != (k, k) or bool((c < 0).any()):
        raise ValueError(f"counts must be non-negative [K], [K, K] or [N, K, K] with K = {k}, got {tuple(c.shape)}")
    log_c = torch.where(c > 0, c.clamp_min(1e-30).log(), torch.full_like(c, float("-inf")))
    w = (lg + log_c[None]).softmax(-1)
    return torch.nan_to_num(w, nan=0.0).mean(0)  # an empty row: softmax of all -inf is NaN -> 0


def background_text(text: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``t~[..., k] = normalize(sum_j w[..., k, j] * t_j)`` with the text embeddings ``t_j`` normalised first.

    ``text [K, D]``; ``w [K, K]`` (-> ``[K, D]``) or ``[N, K, K]`` (one background per object -> ``[N, K, D]``),
    the weights of :func:`inter_text_weights`: all ID prompts at inference (the paper's approximation, the
    target's own prompt included unless ``exclude_self``), the image's other objects at training.
    A row of zero weights gives a zero vector (its ``mu`` is then 0).
    """
    if text.ndim != 2 or w.ndim not in (2, 3) or w.shape[-2:] != (text.shape[0], text.shape[0]):
        raise ValueError(f"need text [K, D] and w [K, K] or [N, K, K]; got {tuple(text.shape)}, {tuple(w.shape)}")
    return F.normalize(w.float() @ F.normalize(text.float(), dim=-1), dim=-1)


#: the training background text of a box (``fit``): the image's other objects (``others``, the paper's
#: training) or the inference aggregate over all ID prompts (``aggregate``, this package's first version)
TRAIN_BACKGROUND_TEXTS = ("others", "aggregate")


def exclusion_counts(k: int, exclude_self: bool) -> Optional[torch.Tensor]:
    """The ``counts`` of the inference aggregate: None (all K prompts) or ``1 - eye(K)`` (``exclude_self``:
    every prompt but the candidate's own). Raises ValueError for ``exclude_self`` with one prompt."""
    if not exclude_self:
        return None
    if int(k) < 2:
        raise ValueError("exclude_self needs at least two prompts (a one-class label set has no other prompt)")
    return 1.0 - torch.eye(int(k))


def context_counts(context: Sequence[Sequence[int]], k: int) -> Tuple[torch.Tensor, int]:
    """``([N, K, K] counts, alone)`` of the training background text from each object's image context.

    ``context[n]``: the label-set indices of the OTHER ID objects of object n's image (duplicates count:
    two other cars weigh the car prompt twice). An object alone in its image (empty context) falls back to
    the inference aggregate without the candidate's own prompt (``1 - eye``; with one class: nothing, a zero
    background text); ``alone`` counts them.
    """
    k = int(k)
    out = torch.zeros(len(context), k, k)
    alone = 0
    fallback = 1.0 - torch.eye(k)
    for n, others in enumerate(context):
        idx = torch.as_tensor([int(v) for v in others], dtype=torch.long)
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= k):
            raise ValueError(f"context[{n}] holds a class index outside [0, K={k}): {idx.tolist()}")
        if idx.numel():
            out[n] = torch.bincount(idx, minlength=k).float()[None].expand(k, k)
        else:
            out[n] = fallback
            alone += 1
    return out, alone


# ---------------------------------------------------------------------------------------------- combiner
class Combiner(nn.Module):
    """UNI-OOD's combiner: ``z = MLP([w_0 z_0 ; CNN({w_i z_i}_{i>=1})])`` per candidate class, ``[M, K, W]``.

    The paper gives "a three-layer CNN" over the weighted patch tokens on their 2-D grid and an MLP fusing
    its output with the weighted CLS; no channels, kernels, pooling, activations or widths. Chosen here:

    * the CNN's first layer is factorised: a bias-free 1x1 reduction ``W -> reduce_to`` (a linear map of each
      token) followed by a ``kernel x kernel`` convolution; then two more ``kernel x kernel`` convolutions;
      ``channels`` are the three convolutions' outputs; GELU after each (CLIP's activation); no normalisation
      layers (batch statistics over K class passes of ten-shot data would be meaningless); "same" padding;
    * the grid's features are mean-pooled (independent of the grid size, so one design for B-32 and B-16);
    * the MLP takes the concatenation ``[w_0 z_0 ; pooled]`` -> ``mlp_hidden`` -> GELU -> ``W`` (the
      pre-projection space, so ``P`` applies to ``z_x + z_(x)`` as the paper's ``P (z_x + z_(x))``);
    * ``residual=True`` (default) adds ``w_0 z_0`` to the MLP's output and zero-initialises the MLP's last
      layer: an untrained combiner returns the weighted CLS, so training starts from CLIP's own embedding
      of the (weighted) views instead of from noise (few-shot data);
    * the weights are multiplied by ``weight_scale`` (default T, the token count): attention averages are
      about ``1/T`` per token, so uniform attention becomes 1 and the CNN sees tokens at their own scale.
      A constant factor is absorbed exactly by the bias-free reduction; it only sets where training starts.

    Cost: the token weights depend on the candidate class, so the CNN runs K times per box. A per-token
    scalar weight commutes with the bias-free 1x1 reduction (``R(w z) = w R(z)``) and with the MLP's
    bias-free input map of the CLS part, so both are applied once per box *before* the per-class weighting:
    the K passes run on ``reduce_to`` channels instead of W. Widths: 32 channels (default) against 64, one
    combiner, 10 boxes x 20 classes, W = 768, one thread of the loaded 2-core CPU this was written on:
    G = 7 (ViT-B-32) 36 ms against 104 ms, G = 14 (ViT-B-16) 107 ms against 267 ms; and two combiners
    (target, background) run per frame. The narrower default keeps UNI-OOD's head small next to its 2M
    trunk passes per frame; quality at either width is unmeasured here (no pretrained weights).
    """

    def __init__(self, width: int, grid: int, channels: Sequence[int] = (32, 32, 32), kernel: int = 3,
                 mlp_hidden: int = 512, reduce_to: int = 32, residual: bool = True,
                 weight_scale: Optional[float] = None):
        super().__init__()
        channels = tuple(int(c) for c in channels)
        if len(channels) != 3 or min(channels) < 1:
            raise ValueError(f"channels must be three positive ints (a three-layer CNN), got {channels}")
        if int(kernel) < 1 or int(kernel) % 2 == 0:
            raise ValueError(f"kernel must be odd and >= 1 (same padding), got {kernel}")
        self.width, self.grid = int(width), int(grid)
        self.tokens = 1 + self.grid * self.grid
        self.residual = bool(residual)
        self.weight_scale = float(weight_scale) if weight_scale is not None else float(self.tokens)
        self.reduce = nn.Linear(self.width, int(reduce_to), bias=False)
        convs: List[nn.Module] = []
        c_in = int(reduce_to)
        for c_out in channels:
            convs += [nn.Conv2d(c_in, c_out, int(kernel), padding=int(kernel) // 2), nn.GELU()]
            c_in = c_out
        self.cnn = nn.Sequential(*convs)
        self.mlp_cls = nn.Linear(self.width, int(mlp_hidden), bias=False)   # the MLP's first layer, CLS part
        self.mlp_grid = nn.Linear(channels[-1], int(mlp_hidden))           # ... its CNN part (carries the bias)
        self.mlp_out = nn.Linear(int(mlp_hidden), self.width)
        if self.residual:
            nn.init.zeros_(self.mlp_out.weight)
            nn.init.zeros_(self.mlp_out.bias)

    def forward(self, tokens: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """``tokens [M, T, W]`` (CLS first, then the patches row-major), ``weights [M, K, T]`` -> ``[M, K, W]``."""
        if tokens.ndim != 3 or tokens.shape[1] != self.tokens or tokens.shape[2] != self.width:
            raise ValueError(f"tokens must be [M, {self.tokens}, {self.width}], got {tuple(tokens.shape)}")
        if weights.ndim != 3 or weights.shape[0] != tokens.shape[0] or weights.shape[2] != self.tokens:
            raise ValueError(f"weights must be [M, K, {self.tokens}] with M = {tokens.shape[0]}, "
                             f"got {tuple(weights.shape)}")
        m, k = weights.shape[:2]
        g = self.grid
        dtype = self.reduce.weight.dtype
        x = tokens.to(dtype)
        w = weights.to(dtype) * self.weight_scale
        reduced = self.reduce(x[:, 1:])                                       # [M, G*G, C0], once per box
        grid = (w[:, :, 1:, None] * reduced[:, None]).reshape(m * k, g, g, -1).permute(0, 3, 1, 2)
        pooled = self.cnn(grid).mean(dim=(2, 3)).reshape(m, k, -1)           # [M, K, C3]
        w0 = w[:, :, :1]                                                      # [M, K, 1]
        hidden = w0 * self.mlp_cls(x[:, 0])[:, None] + self.mlp_grid(pooled)  # once per box, then scaled
        z = self.mlp_out(F.gelu(hidden))
        if self.residual:
            z = z + w0 * x[:, None, 0]
        return z


# ---------------------------------------------------------------------------------------------- score, loss
def uni_ood_similarities(z_target: torch.Tensor, z_background: torch.Tensor, proj: torch.Tensor,
                         text: torch.Tensor) -> torch.Tensor:
    """``Omega [M, K]``: ``Omega[m, c] = cos(P (z_target[m, c] + z_background[m, c]), t_c)``.

    ``z_*`` are the combiners' outputs ``[M, K, W]`` computed with candidate class c's weights; ``proj
    [W, D]``; ``text [K, D]``. Uncertainty = ``-max_c Omega`` (the shared ``runa`` scorer).
    """
    if z_target.shape != z_background.shape or z_target.ndim != 3:
        raise ValueError(f"z_target and z_background must both be [M, K, W]; got {tuple(z_target.shape)}, "
                         f"{tuple(z_background.shape)}")
    if text.ndim != 2 or z_target.shape[1] != text.shape[0]:
        raise ValueError(f"text must be [K={z_target.shape[1]}, D], got {tuple(text.shape)}")
    emb = F.normalize((z_target + z_background).float() @ proj.float(), dim=-1)    # [M, K, D]
    return (emb * F.normalize(text.float(), dim=-1)[None]).sum(-1)


def clip_contrastive_loss(img_emb: torch.Tensor, text_emb_of_label: torch.Tensor,
                          temperature: float = 0.01) -> torch.Tensor:
    """The two-way CLIP loss ``(L_image + L_text) / 2`` over a batch of M objects (each object an instance).

    ``logits[a, b] = cos(img_a, text_b) / temperature``; ``L_image`` the cross-entropy of each image over the
    batch's texts, ``L_text`` of each text over the batch's images, the matching pair ``a = b`` the target.
    ``temperature`` defaults to 0.01 (CLIP's learned logit scale 100), as the RUNA fine-tuning here; the paper
    gives none.

    ``img_emb`` is ``[M, D]``, or ``[M, M, D]`` when an image's embedding depends on the text it is paired
    with (UNI-OOD's: ``mu`` is computed against that text): ``img_emb[a, b]`` is image a's embedding for
    text b, and ``logits[a, b] = cos(img_emb[a, b], text_b) / temperature``.

    Objects of one class carry the same text, so a batch of few-shot objects holds duplicate texts. No
    de-duplication is needed: identical texts give identical logit columns (and rows of the text side), so
    the one-hot loss equals the loss with targets spread uniformly over all same-class pairs, value and
    gradient alike.
    """
    m = text_emb_of_label.shape[0]
    if text_emb_of_label.ndim != 2 or img_emb.shape[:-1] not in ((m,), (m, m)) or \
            img_emb.shape[-1] != text_emb_of_label.shape[1]:
        raise ValueError(f"img_emb must be [M, D] or [M, M, D] and text_emb_of_label [M, D]; got "
                         f"{tuple(img_emb.shape)}, {tuple(text_emb_of_label.shape)}")
    t = float(temperature)
    if not (math.isfinite(t) and t > 0):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
    img = F.normalize(img_emb.float(), dim=-1)
    txt = F.normalize(text_emb_of_label.float(), dim=-1)
    cos = img @ txt.T if img.ndim == 2 else (img * txt[None]).sum(-1)
    logits = cos / t
    target = torch.arange(m, device=logits.device)
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))


# ---------------------------------------------------------------------------------------------- training
def fit_uni_ood(target_tokens: torch.Tensor, target_attn: torch.Tensor, bg_tokens: torch.Tensor,
                bg_xattn: torch.Tensor, labels, proj: torch.Tensor, text: torch.Tensor, bg_text: torch.Tensor,
                grid: int, epochs: int = 100, batch: int = 256, lr: float = 1e-3, weight_decay: float = 0.01,
                temperature: float = 0.01, pairing: str = "candidate", seed: int = 0,
                progress: bool = False, combiner_kwargs: Optional[dict] = None
                ) -> Tuple[Combiner, Combiner, List[float]]:
    """Train the target and background combiners on few-shot ID objects; backbone, P and texts frozen.

    Loss: :func:`clip_contrastive_loss` over each batch, every object an instance, its class's text its pair.
    The frozen backbone's outputs are inputs here (computed once), so every epoch is the combiners only.

    ``pairing`` (the paper is silent on what an image is embedded with when paired with another object's
    text; ``mu`` needs a text):

    * ``"candidate"`` (default): image a paired with text b is embedded with text b's weights, exactly the
      ``Omega(I_a, t_b)`` that inference computes for candidate class b (all K classes per box, as at
      inference). Training thus sees the wrong-class embeddings it must score low at inference.
    * ``"own"``: each image embedded once, with its own class's weights (``M_img(I_x, I_(x))`` with ``mu``
      against ``t_x``), then paired with every text. Cheaper (one pass per box), but an embedding made with a
      wrong candidate class's weights is never trained, and the class-dependent weights leave the combiners
      free to encode "the class the weights were made for" rather than the image. On the synthetic objects
      of tests/test_uni_ood_ops.py both pairings separate the classes; on an earlier variant (tokens not
      aligned with their text, random backgrounds) neither reached 0.9 accuracy, so the choice is a
      reasoned default, not a measured one.

    Background text: the paper trains with the background text of the *other objects in the image*
    (inter-text attention over their prompts): pass ``bg_text [N, K, D]``, one per object (row c: its
    image's other objects aggregated with candidate c's [EOT] query; ``UniOodMethod.fit`` builds it with
    :func:`context_counts`). ``bg_text [K, D]`` gives every object the same background text (the inference
    aggregate over all ID prompts: the ``aggregate`` training choice).

    Args:
        target_tokens: ``[N, T, W]`` crop-pass tokens; target_attn: ``[N, T]`` its CLS->token attention.
        bg_tokens: ``[N, T, W]`` background-pass tokens; bg_xattn: ``[N, T]`` crop CLS vs background keys.
        labels: ``[N]`` class indices into ``text``.
        proj: ``[W, D]`` the (frozen) visual projection; text: ``[K, D]``; bg_text: ``[K, D]`` or ``[N, K, D]``.
        grid: G, with ``T = 1 + G*G``.
        epochs, batch, lr, weight_decay: AdamW on the combiners' parameters, constant lr (the paper gives
            none; 1e-3 is Adam's usual rate for small freshly initialised networks, 0.01 PyTorch's AdamW decay;
            100 epochs and batch 256 as RUNA's fine-tuning, the protocol UNI-OOD compares against).
        temperature: of :func:`clip_contrastive_loss` (0.01: CLIP's logit scale 100; the paper gives none).
        pairing: ``"candidate"`` or ``"own"`` (above).
        seed: seeds init and shuffling inside a forked RNG (global RNG untouched; equal inputs, equal heads).
        combiner_kwargs: extra :class:`Combiner` arguments (both combiners).

    Returns:
        ``(target_combiner, background_combiner, loss_curve)``, eval mode, CPU; ``loss_curve[e]`` is epoch
        ``e``'s sample-weighted mean loss.
    """
    y = _checked_fit_inputs(target_tokens, target_attn, bg_tokens, bg_xattn, labels, text, bg_text, epochs, batch,
                            lr, pairing)
    p = proj.detach().float()
    tt, bt = target_tokens.detach().float(), bg_tokens.detach().float()
    with torch.no_grad():  # frozen backbone: every object's weights for every class, once
        wt = target_weights(target_attn.detach(), tt, p, text.detach())            # [N, K, T]
        wb = background_weights(bg_xattn.detach(), bt, p, bg_text.detach())        # [N, K, T]
    txt = F.normalize(text.detach().float(), dim=-1)
    kwargs = dict(combiner_kwargs or {})
    with seeded(seed):
        tc = Combiner(tt.shape[-1], grid, **kwargs)
        bc = Combiner(tt.shape[-1], grid, **kwargs)
        opt = torch.optim.AdamW(list(tc.parameters()) + list(bc.parameters()), lr=float(lr),
                                weight_decay=float(weight_decay))
        step = _contrastive_step(tc, bc, (tt, wt), (bt, wb), p, txt, y, pairing, temperature)
        tc.train()
        bc.train()
        curve = run_epochs(int(y.shape[0]), int(batch), int(epochs), seed, step, opt, progress=progress,
                           desc="fit UNI-OOD")
    tc.eval()
    bc.eval()
    return tc, bc, curve


def _contrastive_step(tc: "Combiner", bc: "Combiner", target, background, p: torch.Tensor, txt: torch.Tensor,
                      y: torch.Tensor, pairing: str, temperature: float):
    """``step(idx) -> loss`` of :func:`fit_uni_ood` over a batch of objects: ``target`` / ``background`` the
    ``(tokens [N, T, W], weights [N, K, T])`` of each branch, ``p`` the projection, ``txt`` the normalised
    ID text, ``y`` the labels; ``pairing`` as there."""
    tt, wt = target
    bt, wb = background

    def step(idx: torch.Tensor) -> torch.Tensor:
        yb = y[idx]
        if pairing == "candidate":   # the classes present in the batch: [B, C] passes, C <= K
            present, col = torch.unique(yb, return_inverse=True)
            z = tc(tt[idx], wt[idx][:, present]) + bc(bt[idx], wb[idx][:, present])   # [B, C, W]
            emb = (z @ p)[:, col]                                                    # [B, B, D]
        else:
            z = tc(tt[idx], wt[idx, yb][:, None]) + bc(bt[idx], wb[idx, yb][:, None])  # [B, 1, W]
            emb = z[:, 0] @ p
        return clip_contrastive_loss(emb, txt[yb], temperature)

    return step


def _checked_fit_inputs(target_tokens, target_attn, bg_tokens, bg_xattn, labels, text, bg_text, epochs, batch, lr,
                        pairing) -> torch.Tensor:
    """:func:`fit_uni_ood`'s checks (ValueError naming what is wrong); returns the labels as int64 ``[N]``."""
    n = target_tokens.shape[0]
    y = torch.as_tensor(labels).long().reshape(-1)
    if y.shape[0] != n or bg_tokens.shape[0] != n or target_attn.shape[0] != n or bg_xattn.shape[0] != n:
        raise ValueError("target_tokens, target_attn, bg_tokens, bg_xattn and labels must have one row per object")
    if n == 0:
        raise ValueError("fit_uni_ood needs at least one object")
    if int(y.min()) < 0 or int(y.max()) >= text.shape[0]:
        raise ValueError(f"labels must be in [0, K={text.shape[0]})")
    if int(epochs) < 0 or int(batch) < 1 or not (float(lr) > 0):
        raise ValueError(f"need epochs >= 0, batch >= 1, lr > 0; got {epochs}, {batch}, {lr}")
    for name, t in (("target_tokens", target_tokens), ("bg_tokens", bg_tokens), ("target_attn", target_attn),
                    ("bg_xattn", bg_xattn)):
        if not torch.isfinite(t).all():
            raise ValueError(f"{name} contains NaN or inf")
    if bg_text.shape[-2:] != text.shape or (bg_text.ndim == 3 and bg_text.shape[0] != n) or bg_text.ndim not in (2, 3):
        raise ValueError(f"bg_text must be [K, D] = {tuple(text.shape)} or [N={n}, K, D], got {tuple(bg_text.shape)}")
    if pairing not in ("candidate", "own"):
        raise ValueError(f"pairing must be 'candidate' or 'own', got {pairing!r}")
    return y
