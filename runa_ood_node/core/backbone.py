"""The visual backbone's named outputs (:data:`registry.BACKBONE_OUTPUTS`), for every backend.

One forward pass of the open_clip ViT tower gives, on request:

* ``"cls"``      ``[B, W]``    the pooled token after ``ln_post`` (pre-projection; ``DualEncoder.visual_features``):
  the [CLS] token of an OpenAI-style ViT, the mean of the patch tokens of a ``pool_type: avg`` tower
  (:func:`token_pool`);
* ``"tokens"``   ``[B, T, W]`` every final-layer token after ``ln_post`` (token 0 = the pooled token
  ``cls``, i.e. the CLS token, or for a ``pool_type: avg`` tower the patches' mean; then the G x G
  patches row-major), not projected;
* ``"attn_cls"`` ``[B, T]``    the CLS -> token attention probabilities (softmax over all T keys, CLS
  included), averaged over all L layers and all H heads;
* ``"xattn"``    ``[P, T]``    inter-image attention for ``pairs`` ``[P, 2]`` = (query view q, key view
  k) of the same batch: per layer and head, softmax over view k's T keys of
  ``q_cls(view q) . K(view k)^T / sqrt(d_head)``, averaged over layers and heads. Computed on
  the device inside the backbone call: no per-layer keys leave it.

open_clip runs attention with ``need_weights=False`` (fused / SDPA kernels), so no probabilities
exist in its forward. :func:`backbone_forward` therefore re-runs, per residual block, the part of
that block's own attention that the probabilities need, from the block's own weights: ``ln_1(x)``,
the CLS query and all keys from the packed ``in_proj`` (value and output projections are not
needed), the ``1/sqrt(d_head)`` scaling and a softmax in float32. The block itself still runs
exactly as open_clip runs it, so ``cls`` and ``tokens`` are bit-identical to the tower's own forward
(tested). The extra cost is one ``W x W`` key projection per token and layer (about 1/12 of a
block) and only when an attention output is asked for.

:func:`run_chunked` is the one place that splits a batch into engine-sized chunks while keeping the
pairs of ``xattn`` inside one call (the encoder's ``max_batch`` and every backend's use it).
Nothing here imports a runtime or ``backends``; :class:`BackboneGraph` is what the ONNX exports
trace (one graph per output set).
"""
from __future__ import annotations

from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from .registry import BACKBONE_OUTPUTS

__all__ = ["BACKBONE_OUTPUTS", "ATTENTION_OUTPUTS", "PER_VIEW_OUTPUTS", "output_set", "output_set_tag",
           "check_pairs", "empty_outputs", "attention_weights", "cls_attention", "backbone_forward",
           "BackboneGraph", "run_chunked", "serve_outputs", "grid_size", "embed_views",
           "interpolated_pos_embed"]

#: outputs that need the attention probabilities (not available from fused attention kernels)
ATTENTION_OUTPUTS: Tuple[str, ...] = ("attn_cls", "xattn")
#: outputs with one row per view (``xattn`` has one row per pair)
PER_VIEW_OUTPUTS: Tuple[str, ...] = ("cls", "tokens", "attn_cls")

OutputsFn = Callable[[torch.Tensor, Tuple[str, ...], Optional[torch.Tensor]], Dict[str, torch.Tensor]]


def output_set(outputs: Union[str, Iterable[str]]) -> Tuple[str, ...]:
    """Validated output names in the canonical order of :data:`BACKBONE_OUTPUTS` (duplicates merged).

    Raises:
        ValueError: empty, or an unknown name.
    """
    names = (outputs,) if isinstance(outputs, str) else tuple(outputs)
    unknown = [n for n in names if n not in BACKBONE_OUTPUTS]
    if unknown:
        raise ValueError(f"unknown backbone output(s) {unknown}; expected a subset of {BACKBONE_OUTPUTS}")
    if not names:
        raise ValueError(f"at least one backbone output is needed, from {BACKBONE_OUTPUTS}")
    return tuple(n for n in BACKBONE_OUTPUTS if n in names)


def output_set_tag(outputs: Union[str, Iterable[str]]) -> str:
    """File-name tag of an output set: ``""`` for ``("cls",)`` (today's files keep their names),
    else the names joined by ``+`` (``"cls+tokens+attn_cls"``)."""
    names = output_set(outputs)
    return "" if names == ("cls",) else "+".join(names)


def check_pairs(pairs, batch: int, names: Sequence[str]) -> Optional[torch.Tensor]:
    """``pairs`` as a CPU int64 ``[P, 2]`` tensor of view indices in ``[0, batch)``; None when
    ``xattn`` is not asked for (pairs are then ignored).

    Raises:
        ValueError: ``xattn`` asked without pairs, wrong shape / dtype, or an index out of range.
    """
    if "xattn" not in names:
        return None
    if pairs is None:
        raise ValueError("backbone output 'xattn' needs pairs: a [P, 2] integer tensor of (query view, key view)")
    t = pairs if isinstance(pairs, torch.Tensor) else torch.as_tensor(pairs)
    if t.numel() == 0 and (t.ndim == 1 or (t.ndim == 2 and t.shape[1] == 2)):
        return torch.zeros((0, 2), dtype=torch.int64)
    if t.ndim != 2 or t.shape[1] != 2:
        raise ValueError(f"pairs must be [P, 2], got {tuple(t.shape)}")
    if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
        raise ValueError(f"pairs must be integer view indices, got {t.dtype}")
    t = t.detach().to("cpu", torch.int64)
    if t.numel() and (int(t.min()) < 0 or int(t.max()) >= batch):
        raise ValueError(f"pairs index views 0..{batch - 1}, got values in {int(t.min())}..{int(t.max())}")
    return t


def empty_outputs(names: Sequence[str], batch: int, pairs: int, tokens: int, width: int,
                  device: Union[str, torch.device] = "cpu") -> Dict[str, torch.Tensor]:
    """Zero-row float32 outputs of the right shapes (a batch of 0 views, or 0 pairs for ``xattn``)."""
    shapes = {"cls": (batch, width), "tokens": (batch, tokens, width), "attn_cls": (batch, tokens),
              "xattn": (pairs, tokens)}
    return {n: torch.zeros(shapes[n], dtype=torch.float32, device=device) for n in names}


def grid_size(visual: nn.Module) -> int:
    """G, the patch grid side of an open_clip ``VisionTransformer`` (T = 1 + G*G tokens)."""
    g = getattr(visual, "grid_size", None)
    if isinstance(g, (tuple, list)):
        if g[0] != g[1]:
            raise ValueError(f"only square patch grids are supported, got {tuple(g)}")
        g = g[0]
    if g is None:
        raise ValueError(f"{type(visual).__name__} has no grid_size")
    return int(g)


# ---------------------------------------------------------------------- attention from the block's own weights
def attention_weights(blk: nn.Module) -> Tuple[torch.Tensor, Optional[torch.Tensor], torch.Tensor,
                                                Optional[torch.Tensor], int]:
    """``(W_q, b_q, W_k, b_k, heads)`` of a residual block's self-attention, as its forward uses them.

    Accepts open_clip's ``ResidualAttentionBlock`` (packed ``nn.MultiheadAttention.in_proj``) and
    blocks whose ``attn`` has separate ``q_proj`` / ``k_proj`` linears (the fusable export form).

    Raises:
        ValueError: another block type (layer scale is fine: it acts after attention; cross
            attention, custom attention and unpacked q/k/v projections are not supported).
    """
    attn = getattr(blk, "attn", None)
    if hasattr(blk, "ln_1_kv") or not hasattr(blk, "ln_1"):
        raise ValueError(f"{type(blk).__name__}: only self-attention blocks with ln_1 give attention outputs")
    if hasattr(attn, "q_proj") and hasattr(attn, "k_proj") and hasattr(attn, "h"):
        return attn.q_proj.weight, attn.q_proj.bias, attn.k_proj.weight, attn.k_proj.bias, int(attn.h)
    if isinstance(attn, nn.MultiheadAttention) and getattr(attn, "_qkv_same_embed_dim", False) \
            and attn.in_proj_weight is not None:
        E = int(attn.embed_dim)
        W, b = attn.in_proj_weight, attn.in_proj_bias
        return (W[:E], None if b is None else b[:E], W[E:2 * E], None if b is None else b[E:2 * E],
                int(attn.num_heads))
    raise ValueError(f"{type(blk).__name__} with {type(attn).__name__}: attention outputs need open_clip's "
                     "ResidualAttentionBlock (packed nn.MultiheadAttention)")


def cls_attention(h: torch.Tensor, wq: torch.Tensor, bq: Optional[torch.Tensor], wk: torch.Tensor,
                  bk: Optional[torch.Tensor], heads: int, want_self: bool = True,
                  pairs: Optional[torch.Tensor] = None) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """One layer's CLS attention, averaged over heads, from the block's normalised input ``h`` [B,T,E].

    Returns ``(self [B,T] or None, cross [P,T] or None)`` in float32: ``self[b]`` the softmax of
    view b's CLS query against view b's keys, ``cross[p]`` that of view ``pairs[p,0]``'s CLS query
    against view ``pairs[p,1]``'s keys.
    """
    T, E = int(h.shape[1]), int(h.shape[2])
    d = E // heads
    q = F.linear(h[:, 0], wq, bq).reshape(-1, heads, 1, d) * (float(d) ** -0.5)    # [B,H,1,d]
    k = F.linear(h, wk, bk).reshape(-1, T, heads, d).permute(0, 2, 3, 1)            # [B,H,d,T]
    own = cross = None
    if want_self:
        own = torch.softmax(torch.matmul(q, k).float(), dim=-1).mean(dim=1)[:, 0]   # [B,T]
    if pairs is not None:
        qp = torch.index_select(q, 0, pairs[:, 0])
        kp = torch.index_select(k, 0, pairs[:, 1])
        cross = torch.softmax(torch.matmul(qp, kp).float(), dim=-1).mean(dim=1)[:, 0]  # [P,T]
    return own, cross


def token_pool(visual: nn.Module) -> str:
    """How the tower pools its final tokens into ``cls`` when ``tokens`` are asked for too: ``"tok"`` (the
    CLS token, OpenAI-style ViTs), ``"avg"`` (the mean of the patch tokens, the CLS token still present in
    the sequence: open_clip ``pool_type: avg``, e.g. the proving-ground CLIP), or ``""`` when the tower has
    no such token layout (attention pooling, ``final_ln_after_pool``): no ``tokens`` / attention outputs."""
    if getattr(visual, "attn_pool", None) is not None or getattr(visual, "final_ln_after_pool", False):
        return ""
    pool = getattr(visual, "pool_type", "tok")
    return pool if pool in ("tok", "avg") else ""


def interpolated_pos_embed(visual: nn.Module, grid: int) -> torch.Tensor:
    """The tower's positional embedding ``[1 + g*g, W]`` for a ``grid x grid`` patch grid: the CLS row as it
    is, the patch rows resized bicubically (antialias, ``align_corners=False``: open_clip's
    ``resize_pos_embed``). ``grid`` = the tower's own: the embedding itself."""
    pos = visual.positional_embedding
    g0 = grid_size(visual)
    if int(grid) == g0:
        return pos
    img = pos[1:].reshape(1, g0, g0, -1).permute(0, 3, 1, 2).float()
    img = F.interpolate(img, size=(int(grid), int(grid)), mode="bicubic", antialias=True, align_corners=False)
    img = img.permute(0, 2, 3, 1).reshape(int(grid) * int(grid), -1).to(pos.dtype)
    return torch.cat([pos[:1], img], dim=0)


def embed_views(visual: nn.Module, views: torch.Tensor) -> torch.Tensor:
    """The tower's ``_embeds`` (patchify, CLS, positions, ``ln_pre``). At the tower's own image size exactly
    open_clip's; at another square size (a multiple of the patch size; TagOOD's ``frame_size``) the same
    steps with :func:`interpolated_pos_embed`."""
    size = getattr(visual, "image_size", None)
    size = tuple(size) if isinstance(size, (tuple, list)) else (size, size)
    if tuple(views.shape[-2:]) == size:
        return visual._embeds(views)
    if views.shape[-1] != views.shape[-2]:
        raise ValueError(f"only square views are supported, got {tuple(views.shape[-2:])}")
    x = visual.conv1(views)                                  # [B, W, g, g]
    g = int(x.shape[-1])
    x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)
    cls = visual.class_embedding.reshape(1, 1, -1).expand(x.shape[0], -1, -1).to(x.dtype)
    x = torch.cat([cls, x], dim=1) + interpolated_pos_embed(visual, g).to(x.dtype)
    x = visual.patch_dropout(x)
    return visual.ln_pre(x)


def backbone_forward(visual: nn.Module, views: torch.Tensor, names: Sequence[str],
                     pairs: Optional[torch.Tensor] = None, blocks: Optional[Sequence[nn.Module]] = None
                     ) -> Dict[str, torch.Tensor]:
    """The named outputs ``names`` (canonical, see :func:`output_set`) of an open_clip
    ``VisionTransformer`` ``visual`` on ``views`` [B,3,S,S], in the tower's dtype / device.

    ``blocks`` replaces the tower's residual blocks (the fusable export form); None = the tower's
    own, run exactly as ``visual.transformer`` runs them. ``pairs``: [P,2] integer view indices (any
    integer dtype, on the views' device) for ``xattn``.

    Raises:
        ValueError: ``tokens`` / attention outputs on a tower that is not a CLS-token ViT.
    """
    v = visual
    want_self, want_x = "attn_cls" in names, "xattn" in names
    want_trunk = "cls" in names or "tokens" in names
    pool = token_pool(v)
    if ("tokens" in names or want_self or want_x) and not pool:
        raise ValueError("tokens and attention outputs need a ViT with a CLS token and pool_type 'tok' or 'avg' "
                         "(no attention pooling, no final_ln_after_pool)")
    if want_x and pairs is None:
        raise ValueError("backbone output 'xattn' needs pairs")
    tr = v.transformer
    blocks = list(tr.resblocks if blocks is None else blocks)
    batch_first = getattr(tr, "batch_first", True)
    x = embed_views(v, views)
    if not batch_first:
        x = x.transpose(0, 1).contiguous()
    acc_self = acc_x = None
    for i, blk in enumerate(blocks):
        if want_self or want_x:
            h = blk.ln_1(x if batch_first else x.transpose(0, 1))
            wq, bq, wk, bk, heads = attention_weights(blk)
            own, cross = cls_attention(h, wq, bq, wk, bk, heads, want_self, pairs if want_x else None)
            acc_self = own if acc_self is None else acc_self + own
            if want_x:
                acc_x = cross if acc_x is None else acc_x + cross
        if want_trunk or i < len(blocks) - 1:  # the last block's output only feeds cls / tokens
            x = blk(x)
    if not batch_first:
        x = x.transpose(0, 1)
    out: Dict[str, torch.Tensor] = {}
    if "tokens" in names:
        xp = v.ln_post(x)            # what _pool does: ln_post, then token 0 ("tok") or the patches' mean ("avg")
        if pool == "avg":            # token 0 is the pooled token for every tower (the methods read it as such)
            xp = torch.cat([xp[:, 1:].mean(dim=1, keepdim=True), xp[:, 1:]], dim=1)
        out["cls"] = xp[:, 0]
        out["tokens"] = xp
    elif "cls" in names:
        out["cls"] = v._pool(x)[0]
    L = float(len(blocks))
    if want_self:
        out["attn_cls"] = acc_self / L
    if want_x:
        out["xattn"] = acc_x / L
    return {n: out[n] for n in names}


class BackboneGraph(nn.Module):
    """``forward(views[, pairs]) -> tuple`` of the outputs ``names`` in canonical order: what the
    ONNX exports trace (``pairs`` an int32 ``[P,2]`` input only when ``xattn`` is asked for).

    Args:
        trunk: the ``VisualTrunk`` (or anything with ``.visual``) or the tower itself.
        names: the output set.
        blocks: replacement residual blocks (the fusable form), None = the tower's own.
    """

    def __init__(self, trunk: nn.Module, names: Sequence[str], blocks: Optional[Sequence[nn.Module]] = None):
        super().__init__()
        self.visual = getattr(trunk, "visual", trunk)
        self.names = output_set(names)
        self.blocks = None if blocks is None else nn.ModuleList(blocks)

    def forward(self, views: torch.Tensor, pairs: Optional[torch.Tensor] = None):
        out = backbone_forward(self.visual, views, self.names, pairs, blocks=self.blocks)
        return tuple(out[n] for n in self.names)


# ---------------------------------------------------------------------- chunking that keeps pairs together
def run_chunked(run: OutputsFn, views: torch.Tensor, names: Tuple[str, ...], pairs: Optional[torch.Tensor],
                max_batch: Optional[int]) -> Dict[str, torch.Tensor]:
    """Call ``run(chunk, names, chunk_pairs)`` on chunks of at most ``max_batch`` views and assemble.

    Per-view outputs come from consecutive view chunks. A pair whose two views fall in the same
    chunk is computed in that chunk's call; the other pairs go to extra ``("xattn",)`` calls over
    just the views they reference (at most ``max(max_batch, 2)`` views each). With no cap, or a
    batch within it, this is one ``run`` call. ``views`` has ``B >= 1`` rows; ``pairs`` is None
    or int64 ``[P,2]`` (CPU) with ``P >= 1`` when ``xattn`` is asked for.
    """
    B = int(views.shape[0])
    if not max_batch or max_batch <= 0 or B <= max_batch:
        return run(views, names, pairs)
    step = int(max_batch)
    per_view = tuple(n for n in names if n != "xattn")
    want_x = "xattn" in names and pairs is not None and len(pairs) > 0
    parts: Dict[str, List[torch.Tensor]] = {n: [] for n in per_view}
    x_rows: List[Tuple[torch.Tensor, torch.Tensor]] = []   # (pair indices, xattn rows)
    done = torch.zeros(len(pairs) if want_x else 0, dtype=torch.bool)
    for start in range(0, B, step):
        stop = min(start + step, B)
        local_names = per_view
        local_pairs = idx = None
        if want_x:
            inside = (pairs[:, 0] >= start) & (pairs[:, 0] < stop) & (pairs[:, 1] >= start) & (pairs[:, 1] < stop)
            if bool(inside.any()):
                idx = torch.nonzero(inside, as_tuple=False)[:, 0]
                local_pairs = pairs[idx] - start
                local_names = output_set(per_view + ("xattn",))
                done[idx] = True
        if not local_names:
            continue
        res = run(views[start:stop], local_names, local_pairs)
        for n in per_view:
            parts[n].append(res[n])
        if idx is not None:
            x_rows.append((idx, res["xattn"]))
    if want_x and not bool(done.all()):
        cap = max(step, 2)
        rest = torch.nonzero(~done, as_tuple=False)[:, 0].tolist()
        group: List[int] = []
        group_views: Dict[int, int] = {}

        def flush():
            if not group:
                return
            order = sorted(group_views, key=group_views.get)
            sub = views[torch.tensor(order, dtype=torch.long, device=views.device)]
            gp = pairs[group]
            local = torch.tensor([[group_views[int(a)], group_views[int(b)]] for a, b in gp.tolist()],
                                 dtype=torch.int64)
            res = run(sub, ("xattn",), local)
            x_rows.append((torch.tensor(group, dtype=torch.long), res["xattn"]))

        for p in rest:
            a, b = (int(v) for v in pairs[p].tolist())
            new = {a, b} - set(group_views)
            if len(group_views) + len(new) > cap:
                flush()
                group, group_views = [], {}
                new = {a, b}
            for vi in sorted(new):
                group_views[vi] = len(group_views)
            group.append(p)
        flush()
    out: Dict[str, torch.Tensor] = {}
    for n in per_view:
        out[n] = torch.cat(parts[n], 0) if len(parts[n]) > 1 else parts[n][0]
    if "xattn" in names:
        if x_rows:
            first = x_rows[0][1]
            full = first.new_zeros((len(pairs),) + tuple(first.shape[1:]))
            for idx, rows in x_rows:
                full[idx.to(full.device)] = rows.to(full.dtype)
            out["xattn"] = full
        else:
            out["xattn"] = views.new_zeros((0, 0))
    return {n: out[n] for n in names}


def serve_outputs(run: OutputsFn, views: torch.Tensor, outputs: Union[str, Iterable[str]], pairs,
                  max_batch: Optional[int], tokens: int, width: int) -> Dict[str, torch.Tensor]:
    """Validate, handle the empty cases, chunk (:func:`run_chunked`) and return ``run``'s outputs.

    The one front door of every implementation (the encoder's torch path and every backend):
    ``outputs`` validated into canonical order, ``pairs`` checked against the batch, a batch of 0
    views or 0 pairs answered with zero-row tensors without calling ``run``. ``run`` only ever sees
    ``B >= 1`` views and, with ``xattn``, ``P >= 1`` int64 CPU pairs. Outputs stay where ``run``
    put them (device, dtype).
    """
    names = output_set(outputs)
    B = int(views.shape[0])
    pairs = check_pairs(pairs, B, names)
    P = 0 if pairs is None else int(pairs.shape[0])
    if B == 0 or (names == ("xattn",) and P == 0):
        return empty_outputs(names, B, P, tokens, width, views.device)
    if "xattn" in names and P == 0:
        rest = tuple(n for n in names if n != "xattn")
        out = run_chunked(run, views, rest, None, max_batch)
        ref = next(iter(out.values()))
        out["xattn"] = ref.new_zeros((0, tokens), dtype=torch.float32)
        return {n: out[n] for n in names}
    return run_chunked(run, views, names, pairs, max_batch)
