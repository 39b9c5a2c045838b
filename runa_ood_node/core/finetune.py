"""Few-shot fine-tuning of the regional projection ``P_r`` (RUNA paper, Eq. 7).

Only the visual projection (open_clip's ``visual.proj``, ``[width, D]``) is trained; the backbone
is frozen, so its **pre-projection** features (``DualEncoder.visual_features`` of the regional
views, ``[N, width]``) are computed once and cached, and every epoch is a few small matmuls.

Loss (Eq. 7), for a batch B with labels ``y`` and the K L2-normalised ID text embeddings ``T``::

    e_b   = normalize(f_b @ P)                      # [D], fused space of the regional view
    l_b   = cos(e_b, T_j) / tau,  j = 1..K           # logits
    L     = mean_b  -log softmax(l_b)[y_b]           # cross-entropy

The paper writes a **sum** over the batch; we use the **mean**, which only rescales the gradient
by 1/|B| (Adam-type optimisers are invariant to that scale up to epsilon) and keeps the loss
comparable between batch sizes and shot counts. Paper settings: AdamW, lr 5e-6, batch 256,
100 epochs, 10 shots per class, prompt "a photo of a {label}". The paper does not state tau or
the weight decay; defaults here are tau = 0.01 (CLIP's learned logit scale is 100 = 1/0.01) and
``weight_decay = 0.01``, PyTorch's AdamW default, i.e. what "AdamW" means without further
specification. Decay only shrinks ``P``'s norm (the cosine is scale invariant); at lr 5e-6 over
100 epochs its effect is below 1e-5 relative.

Artefacts: a directory with ``projection.pt`` (a float32 CPU tensor ``[width, D]``, loadable with
``torch.load(weights_only=True)``) and ``projection.yaml`` (provenance: model, label set, prompts,
shots, seed, lr, epochs, tau, loss curve, created). ``load_projection`` accepts that directory, the
``.pt`` file, or a domain name resolved under ``core.paths.calibration_dir()/<name>/``.
"""
from __future__ import annotations

import datetime as _dt
import math
import os
import pathlib
import warnings
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
import yaml

from .methods.fitting import run_epochs
from .plain import to_plain

__all__ = [
    "eq7_loss",
    "own_class_cosine",
    "train_projection",
    "sample_shots",
    "shot_context",
    "save_projection",
    "load_projection",
    "PROJECTION_FILE",
    "META_FILE",
]

PROJECTION_FILE = "projection.pt"
META_FILE = "projection.yaml"
_META_KEYS = ("model_name", "model_id", "pretrained", "label_set", "prompts", "shots", "seed", "lr",
              "epochs", "tau", "loss_curve", "created")


def _as_labels(labels, n: int, k: int) -> torch.Tensor:
    y = torch.as_tensor(np.asarray(labels) if not isinstance(labels, torch.Tensor) else labels)
    if y.ndim != 1 or y.shape[0] != n:
        raise ValueError(f"labels must be [N]={n} class indices, got shape {tuple(y.shape)}")
    if y.dtype.is_floating_point or y.dtype == torch.bool:
        raise ValueError(f"labels must be integer class indices, got dtype {y.dtype}")
    y = y.long()
    if n and (int(y.min()) < 0 or int(y.max()) >= k):
        raise ValueError(f"labels must be in [0, K={k}), got range [{int(y.min())}, {int(y.max())}]")
    return y


def _check_shapes(features: torch.Tensor, text_emb: torch.Tensor, proj: torch.Tensor) -> None:
    if features.ndim != 2:
        raise ValueError(f"features must be [N, width] pre-projection features, got shape {tuple(features.shape)}")
    if text_emb.ndim != 2 or text_emb.shape[0] == 0:
        raise ValueError(f"text_emb must be [K, D] with K >= 1, got shape {tuple(text_emb.shape)}")
    if proj.ndim != 2:
        raise ValueError(f"projection must be [width, D], got shape {tuple(proj.shape)}")
    if proj.shape[0] != features.shape[1]:
        raise ValueError(
            f"projection is [{proj.shape[0]}, {proj.shape[1]}] but features have width {features.shape[1]}: "
            "use the pre-projection features of the same backbone (DualEncoder.visual_features)"
        )
    if proj.shape[1] != text_emb.shape[1]:
        raise ValueError(
            f"projection maps to D={proj.shape[1]} but text embeddings have D={text_emb.shape[1]} "
            "(text and visual towers of different models?)"
        )


def _check_tau(tau: float) -> float:
    t = float(tau)
    if not (math.isfinite(t) and t > 0):
        raise ValueError(f"tau must be a finite number > 0, got {tau!r}")
    return t


def eq7_loss(features: torch.Tensor, labels, text_emb: torch.Tensor, proj: torch.Tensor,
             tau: float = 0.01) -> torch.Tensor:
    """Eq. 7 cross-entropy, **mean** over the batch (see module docstring).

    Args:
        features: ``[N, width]`` pre-projection visual features (N >= 1).
        labels: ``[N]`` int class indices into ``text_emb``.
        text_emb: ``[K, D]`` ID text embeddings (normalised here again; harmless if already).
        proj: ``[width, D]`` projection (gradients flow into it when it requires grad).
        tau: temperature > 0 dividing the cosines (0.01 <-> CLIP's logit scale 100).

    Returns:
        scalar loss tensor (nats).
    """
    _check_shapes(features, text_emb, proj)
    tau = _check_tau(tau)
    if features.shape[0] == 0:
        raise ValueError("eq7_loss needs at least one sample")
    y = _as_labels(labels, features.shape[0], text_emb.shape[0]).to(features.device)
    emb = F.normalize(features.to(proj.dtype) @ proj, dim=1)
    txt = F.normalize(text_emb.to(device=proj.device, dtype=proj.dtype), dim=1)
    return F.cross_entropy(emb @ txt.T / tau, y)


def own_class_cosine(features: torch.Tensor, labels, text_emb: torch.Tensor, proj: torch.Tensor) -> torch.Tensor:
    """``[N]`` cosine of each sample's projected feature to its own class text embedding (diagnostics)."""
    _check_shapes(features, text_emb, proj)
    y = _as_labels(labels, features.shape[0], text_emb.shape[0])
    with torch.no_grad():
        emb = F.normalize(features.float() @ proj.float(), dim=1)
        txt = F.normalize(text_emb.float(), dim=1)
        return (emb * txt[y]).sum(dim=1)


def train_projection(
    features: torch.Tensor,
    labels,
    text_emb: torch.Tensor,
    init_proj: torch.Tensor,
    tau: float = 0.01,
    lr: float = 5e-6,
    batch_size: int = 256,
    epochs: int = 100,
    weight_decay: float = 0.01,
    seed: int = 0,
    progress: bool = True,
    *,
    batch: Optional[int] = None,
) -> Tuple[torch.Tensor, List[float]]:
    """Fine-tune a copy of ``init_proj`` on cached features with the Eq. 7 loss and AdamW.

    Args:
        features: ``[N, width]`` cached pre-projection features of the frozen regional encoder.
        labels: ``[N]`` int class indices in ``[0, K)``.
        text_emb: ``[K, D]`` ID text embeddings (frozen).
        init_proj: ``[width, D]`` starting projection (normally the off-the-shelf ``visual.proj``);
            not modified.
        tau: temperature of Eq. 7.
        lr: AdamW learning rate (paper: 5e-6).
        batch_size: samples per step (paper: 256); the last batch of an epoch may be smaller.
        epochs: passes over the data (paper: 100); 0 returns a copy of ``init_proj``.
        weight_decay: AdamW decoupled weight decay (default 0.01 = PyTorch's AdamW default).
        seed: seeds the per-epoch shuffling (a private generator: global RNG state is untouched),
            so equal inputs and seed give bit-identical results on the same device.
        progress: show a tqdm bar over epochs (if tqdm is installed).
        batch: alias of ``batch_size`` (kept for callers of the old name); keyword only.

    Returns:
        ``(proj, loss_curve)``: the trained float32 CPU ``[width, D]`` tensor (detached) and the
        sample-weighted mean training loss of each epoch (``len == epochs``).
    """
    feats, y, txt, p0, batch_size = _checked_training_inputs(features, labels, text_emb, init_proj, tau, lr,
                                                             batch_size, epochs, batch)
    device = feats.device
    feats = feats.float()
    y = y.to(device)
    txt = F.normalize(txt.to(device=device, dtype=torch.float32), dim=1)
    proj = p0.to(device=device, dtype=torch.float32).clone().requires_grad_(True)
    opt = torch.optim.AdamW([proj], lr=float(lr), weight_decay=float(weight_decay))

    def step(idx: torch.Tensor) -> torch.Tensor:
        idx = idx.to(device)
        return eq7_loss(feats[idx], y[idx], txt, proj, tau)

    curve = run_epochs(feats.shape[0], int(batch_size), int(epochs), int(seed), step, opt, progress=progress,
                       desc="fine-tune P_r")
    return proj.detach().to("cpu", torch.float32).contiguous(), curve


def _checked_training_inputs(features, labels, text_emb, init_proj, tau, lr, batch_size, epochs, batch):
    """:func:`train_projection`'s inputs as tensors, checked (ValueError naming what is wrong):
    ``(features, labels, text_emb, init_proj, batch_size)`` (``batch``: the alias, resolved)."""
    feats = features.detach() if isinstance(features, torch.Tensor) else torch.as_tensor(np.asarray(features))
    txt = text_emb.detach() if isinstance(text_emb, torch.Tensor) else torch.as_tensor(np.asarray(text_emb))
    p0 = init_proj.detach() if isinstance(init_proj, torch.Tensor) else torch.as_tensor(np.asarray(init_proj))
    _check_shapes(feats, txt, p0)
    _check_tau(tau)
    if batch is not None:
        if batch_size not in (256, batch):  # 256: batch_size left at its default
            raise ValueError(f"batch={batch} and batch_size={batch_size} disagree; pass one of them")
        batch_size = batch
    if not (float(lr) > 0 and math.isfinite(float(lr))):
        raise ValueError(f"lr must be > 0, got {lr!r}")
    if int(batch_size) < 1 or int(epochs) < 0:
        raise ValueError(f"batch_size must be >= 1 and epochs >= 0, got {batch_size!r}, {epochs!r}")
    n = feats.shape[0]
    if n == 0:
        raise ValueError("train_projection needs at least one sample")
    y = _as_labels(labels, n, txt.shape[0])
    if not torch.isfinite(feats).all():
        raise ValueError("features contain NaN or inf (a failed backend pass?)")
    return feats, y, txt, p0, batch_size


def sample_shots(labels: Sequence[int], shots: int, seed: int = 0) -> np.ndarray:
    """Indices of ``shots`` randomly drawn samples per class (all of a class if it has fewer).

    Returns sorted int64 indices into ``labels``; deterministic for a given seed. Classes with
    fewer than ``shots`` samples are used whole (with a ``RuntimeWarning`` listing them).
    """
    if int(shots) < 1:
        raise ValueError(f"shots must be >= 1, got {shots!r}")
    lab = np.asarray(labels)
    rng = np.random.default_rng(int(seed))
    chosen, short = [], []
    for cls in np.unique(lab):
        idx = np.flatnonzero(lab == cls)
        if idx.size < shots:
            short.append(f"{cls} ({idx.size})")
            chosen.append(idx)
        else:
            chosen.append(rng.choice(idx, size=int(shots), replace=False))
    if short:
        warnings.warn(f"fewer than {shots} samples for class(es): {', '.join(short)}; using all of them",
                      RuntimeWarning, stacklevel=2)
    return np.sort(np.concatenate(chosen)) if chosen else np.zeros(0, np.int64)


def shot_context(dataset, shots) -> List[List[int]]:
    """Per shot, the label-set indices of the OTHER ID objects of its image (UNI-OOD's training background
    text is built from them: the paper's ``X^I \\ {x}``, each object by its ID label's prompt).

    Every ID ground-truth box of the shot's frame but the shot itself counts (shot or not, any size); OOD
    boxes are left out (they have no ID prompt; the paper trains on ID data only). Duplicates stay: two other
    cars are two cars. An empty list = the shot is alone in its image (``Method.fit_shots`` passes this to
    the methods that read it).
    """
    from .dataset import label_lookup, normalize_name

    lookup = label_lookup(dataset.label_set)
    out: List[List[int]] = []
    for fi, bi in zip(shots.frame_idx, shots.box_idx):
        fr = dataset.frames[int(fi)]
        ids = (lookup.get(normalize_name(fr.categories[j])) for j in np.flatnonzero(fr.is_id) if j != int(bi))
        out.append([int(k) for k in ids if k is not None])
    return out


def save_projection(out_dir: Union[str, os.PathLike], proj: torch.Tensor, meta: Optional[Dict] = None) -> pathlib.Path:
    """Write ``out_dir/projection.pt`` and ``out_dir/projection.yaml``; return the ``.pt`` path.

    ``meta`` should carry the keys listed in the module docstring; missing ones are written as
    null (``created`` defaults to now, UTC), and ``shape`` is added. Files are written to a
    temporary name and renamed, so a crash never leaves a half-written projection.
    """
    t = proj.detach() if isinstance(proj, torch.Tensor) else torch.as_tensor(np.asarray(proj))
    if t.ndim != 2:
        raise ValueError(f"projection must be [width, D], got shape {tuple(t.shape)}")
    if not torch.isfinite(t).all():
        raise ValueError("projection contains NaN or inf; refusing to save it")
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    m = dict(meta or {})
    for key in _META_KEYS:
        m.setdefault(key, None)
    if m["created"] is None:
        m["created"] = _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat()
    m["shape"] = [int(s) for s in t.shape]
    pt = out / PROJECTION_FILE
    tmp = out / (PROJECTION_FILE + ".tmp")
    torch.save(t.to("cpu", torch.float32).contiguous().clone(), tmp)
    tmp.replace(pt)
    ymeta = out / META_FILE
    tmp = out / (META_FILE + ".tmp")
    tmp.write_text(yaml.safe_dump(to_plain(m), sort_keys=False))
    tmp.replace(ymeta)
    return pt


def _resolve(name_or_path) -> Tuple[pathlib.Path, List[str]]:
    """The projection.pt to load, or (None-like missing path, places tried)."""
    raw = pathlib.Path(os.fspath(name_or_path)).expanduser()
    candidates = [raw]
    if not raw.is_absolute():
        try:
            from .paths import calibration_dir

            candidates.append(calibration_dir() / raw)
        except ImportError:  # paths.py absent (partial install): only explicit paths work
            pass
    tried = []
    for cand in candidates:
        for c in (cand, cand / PROJECTION_FILE) if cand.suffix != ".pt" else (cand,):
            tried.append(str(c))
            if c.is_file():
                return c, tried
    return raw, tried


def load_projection(name_or_path: Union[str, os.PathLike]) -> Tuple[torch.Tensor, Dict]:
    """Load a fine-tuned projection.

    Args:
        name_or_path: a directory holding ``projection.pt``, the ``.pt`` file itself, or a domain
            name (e.g. ``"bdd"``) resolved as ``calibration_dir()/<name>/projection.pt``.

    Returns:
        ``(proj, meta)``: float32 CPU ``[width, D]`` tensor and the YAML metadata (``{}`` with a
        warning when ``projection.yaml`` is missing).

    Raises:
        FileNotFoundError: listing every place tried.
        ValueError: the file does not hold a finite 2-D tensor, or disagrees with its metadata.
    """
    pt, tried = _resolve(name_or_path)
    if not pt.is_file():
        raise FileNotFoundError(
            f"projection {os.fspath(name_or_path)!r} not found; tried: {', '.join(tried)} "
            "(pass a directory with projection.pt, a .pt file, or a domain name under the calibration directory)"
        )
    try:
        t = torch.load(pt, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle/zip errors: report the file
        raise ValueError(f"cannot read projection file {pt}: {exc}") from exc
    if isinstance(t, dict) and "proj" in t:  # tolerate {"proj": tensor} checkpoints
        t = t["proj"]
    if not isinstance(t, torch.Tensor) or t.ndim != 2:
        shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
        raise ValueError(f"{pt} must hold a [width, D] tensor, got {shape}")
    t = t.to(torch.float32).contiguous()
    if not torch.isfinite(t).all():
        raise ValueError(f"{pt} contains NaN or inf")
    meta: Dict = {}
    ymeta = pt.with_name(META_FILE) if pt.name == PROJECTION_FILE else pt.with_suffix(".yaml")
    if ymeta.is_file():
        try:
            meta = yaml.safe_load(ymeta.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ValueError(f"invalid projection metadata {ymeta}: {exc}") from exc
        if not isinstance(meta, dict):
            raise ValueError(f"invalid projection metadata {ymeta}: expected a mapping")
        shape = meta.get("shape")
        if shape is not None and list(shape) != list(t.shape):
            raise ValueError(f"{pt} holds a {list(t.shape)} tensor but {ymeta} says shape {shape}")
    else:
        warnings.warn(f"no metadata next to {pt} ({ymeta.name} missing): provenance unknown", RuntimeWarning,
                      stacklevel=2)
    return t, meta
