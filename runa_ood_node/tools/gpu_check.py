"""`runa-ood gpu-check`: every method's scorer on a GPU against the CPU, in one prepared call.

Run through ``scripts/gpu_check.sh [--dry-run] OUTDIR`` (it installs the wheels the GPU image lacks,
puts this checkout on ``PYTHONPATH`` and calls this module). Made for a machine whose image has CUDA
PyTorch but neither ROS nor this project's other wheels, for about 6 minutes of run time on an H100.
Everything is built through the package's own path: ``factory.build_scorer`` (and, for the node's
defaults, ``tools.common.scorer_from_parameters``, the node's construction), ``core.pipeline.OodScorer``
and ``backends.gpu_preprocess.GpuViewMaker``; nothing here re-implements a method.

Sections, in order (each rewrites the report, so a run cut short still leaves one):

1. **agreement** - for every method (``core.registry.METHODS``), the scorer on the device in fp32,
   fp16 (``precision: auto`` resolved by ``core.registry.resolve_precision``: fp16 on CUDA) and bf16,
   with CPU views to isolate the numerics, plus the node's defaults (``precision: auto``, ``backend:
   auto``, the device's default views), each against the CPU fp32 scorer on the same photograph and
   boxes: per feature tensor the method stores (``BoxFeatures.data``) the minimum cosine of its
   vectors (embeddings, tokens) or the maximum |difference| (attention ``attn_cls`` / ``xattn``),
   the agreement of boolean masks (TagOOD's token selection), RUNA's fused embedding cosine, the
   uncertainty and similarity maximum |difference| and the nearest-label agreement; checked against
   the tolerances of :data:`TOLERANCES`. Methods that need a trained head share one small head fitted on
   the fly with the method's own ``fit`` (:func:`fitted_head`, 5 epochs on the frame's boxes) across all
   variants; the timings use untrained heads (``tools.bench._untrained_head``: the same cost).
2. **preprocessing** - ``GpuViewMaker`` on the device against the CPU ``ViewMaker``: every view kind,
   grey-level differences and the embeddings of both view sets through the CPU fp32 trunk; the view
   making time of both at 1 / 10 / 50 boxes.
3. **timings** - every method at 1 / 10 / 50 boxes with ``OodScorer.score`` (the whole frame: views,
   trunk, head, scoring) for each model (ViT-B-32, ViT-B-16; random weights: speed only) and
   precision, timed with CUDA events (``perf_counter`` on the CPU), with the scorer's own split
   (views / encode / score). A time budget (``--budget-s``) skips the remaining cells with a note
   instead of overrunning.
4. **tensorrt** - where ``import tensorrt`` works (``backends.tensorrt_backend.tensorrt_available``),
   an fp16 engine per method's output set (``build_engine``), scored against CPU fp32 and timed;
   otherwise the report says plainly that TensorRT could not run and why.

``--dry-run`` runs the same steps on the CPU (fp32 / fp16 / bf16 where torch has them on the CPU,
``perf_counter`` timings, the tiny test model ``runa-tiny-vit`` by default) so CI keeps the check alive.

ROS: before anything of the package is imported, a meta path finder refuses ``rclpy``, the ROS
message packages and the rest of ROS 2's Python (:class:`RosBlocker`); every attempt is recorded in
the report, and an attempt other than ``ament_index_python`` (which ``core.paths`` tries and does
without) fails the check. Output: ``OUTDIR/gpu_check.json`` and ``OUTDIR/gpu_check.md``. Exit status:
0 every check within tolerance, 1 a failure or a figure out of tolerance (the report says which),
2 bad arguments, 3 no CUDA device without ``--dry-run``.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime as _dt
import importlib.abc
import json
import math
import os
import pathlib
import platform
import sys
import time
import traceback
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from ..core.registry import DEFAULT_METHOD, DEVICES

SCHEMA = "runa-ood gpu-check/1"
JSON_NAME = "gpu_check.json"
MD_NAME = "gpu_check.md"
GPU_MODELS = ("ViT-B-32", "ViT-B-16")
DRY_MODELS = ("runa-tiny-vit",)
BOX_COUNTS = (1, 10, 50)
#: boxes of the agreement and preprocessing frames (the photograph's boxes, cycled)
AGREEMENT_BOXES = 8
#: seconds kept for the last sections and the report when the timings decide to skip
RESERVE_S = 20.0

#: tolerances of each precision against CPU fp32 (random weights; an untrained head for UNI-OOD / TagOOD):
#: ``cos`` minimum cosine of every feature vector (embeddings, tokens), ``attn`` maximum |difference|
#: of attention weights (each a softmax share), ``unc`` maximum |difference| of the uncertainty and the
#: nearest-label similarity (cosine units), ``mask`` minimum share of boxes whose boolean masks (TagOOD's
#: token selection) are equal
TOLERANCES: Dict[str, Dict[str, float]] = {
    "fp32": {"cos": 0.9999, "attn": 1e-3, "unc": 2e-3, "mask": 1.0},
    "fp16": {"cos": 0.999, "attn": 5e-3, "unc": 2e-2, "mask": 0.75},
    "bf16": {"cos": 0.99, "attn": 3e-2, "unc": 6e-2, "mask": 0.5},
}
#: GPU views against CPU views: mean |difference| in grey levels (0..255) per view kind and minimum cosine
#: of their CPU fp32 embeddings (tests/test_backends.py measured 2.8 / 0.2 grey levels on photographs)
PREPROCESS_TOLERANCES = {"mean_grey": {"regional": 4.0, "global": 1.5, "background": 1.5, "frame": 1.5},
                         "cos": 0.99}

#: ROS 2's Python (top-level module names) and its interface packages (suffixes) that the check must
#: not import; ``ament_index_python`` is tried (and done without) by ``core.paths``
ROS_MODULES = frozenset({"rclpy", "rosidl_runtime_py", "rosidl_parser", "rosidl_adapter", "rosidl_generator_py",
                         "rpyutils", "rosbag2_py", "launch", "launch_ros", "launch_testing", "ros2cli",
                         "ament_index_python", "rmw_implementation"})
ROS_SUFFIXES = ("_msgs", "_srvs", "_interfaces", "_actions")
ROS_TOLERATED = frozenset({"ament_index_python"})


def _is_ros(name: str) -> bool:
    top = name.split(".", 1)[0]
    return top in ROS_MODULES or top.endswith(ROS_SUFFIXES)


class RosBlocker(importlib.abc.MetaPathFinder):
    """Refuses every ROS module (:data:`ROS_MODULES`, names ending in :data:`ROS_SUFFIXES`) with
    ``ModuleNotFoundError``, as on a machine without ROS, and records each attempt."""

    def __init__(self):
        self.attempts: List[str] = []

    def find_spec(self, fullname, path=None, target=None):
        if _is_ros(fullname):
            if fullname not in self.attempts:
                self.attempts.append(fullname)
            raise ModuleNotFoundError(f"No module named {fullname!r} (blocked by gpu-check: the check runs without ROS)",
                                      name=fullname)
        return None

    @classmethod
    def install(cls) -> "RosBlocker":
        for f in sys.meta_path:
            if isinstance(f, cls):
                return f
        blocker = cls()
        sys.meta_path.insert(0, blocker)
        return blocker

    def report(self) -> Dict[str, Any]:
        loaded = sorted(m for m in sys.modules if _is_ros(m))
        bad = [a for a in self.attempts if a.split(".", 1)[0] not in ROS_TOLERATED]
        return {"blocked": True, "import_attempts": list(self.attempts), "modules_loaded": loaded,
                "ok": not loaded and not bad,
                "note": "ROS imports refused by a meta path finder; ament_index_python is tried by core.paths "
                        "and done without"}


# ---------------------------------------------------------------------------------------------- arguments
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, help="folder for gpu_check.json and gpu_check.md")
    parser.add_argument("--dry-run", action="store_true",
                        help="run every step on the CPU (fp32/fp16/bf16 on the CPU, perf_counter timings, the tiny "
                             "model): what CI runs so the check cannot rot")
    parser.add_argument("--device", default=None, choices=DEVICES,
                        help="device under test, as the node's `device` parameter takes it (default cuda; cpu with "
                             "--dry-run; pick a GPU with CUDA_VISIBLE_DEVICES)")
    parser.add_argument("--models", default=None,
                        help=f"comma list of models to time (default {','.join(GPU_MODELS)}; "
                             f"{','.join(DRY_MODELS)} with --dry-run)")
    parser.add_argument("--agreement-model", default=None,
                        help=f"model of the agreement and preprocessing checks (default {GPU_MODELS[0]}; "
                             f"{DRY_MODELS[0]} with --dry-run)")
    parser.add_argument("--boxes", default=",".join(str(n) for n in BOX_COUNTS), help="box counts to time (default %(default)s)")
    parser.add_argument("--methods", default="all", help="comma list of methods or 'all' (default %(default)s)")
    parser.add_argument("--repeats", type=int, default=None, help="timed frames per cell (default 10; 2 with --dry-run)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed frames per cell first (default 3; 1 with --dry-run)")
    parser.add_argument("--budget-s", type=float, default=None,
                        help="run-time budget in seconds: remaining timings are skipped with a note rather than "
                             "overrunning (default 330; 120 with --dry-run)")
    parser.add_argument("--labels", default="voc", help="label set (default %(default)s)")
    parser.add_argument("--timing-variants", default=None,
                        help="variants timed: 'all' or a comma list of names (fp32, 'auto (fp16)' / fp16, bf16, "
                             "'node defaults') (default all; 'fp32,node defaults' with --dry-run: CPU fp16 / bf16 "
                             "timings say nothing)")
    parser.add_argument("--node-defaults", default=None,
                        help="methods also checked with the node's defaults (precision auto, backend auto): a comma "
                             "list, 'all' or 'none' (default all; runa with --dry-run, where backend auto exports and "
                             "measures the ONNX Runtime variants of each output set first)")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")


@dataclasses.dataclass
class Plan:
    out: pathlib.Path
    dry_run: bool
    device: str
    models: List[str]
    agreement_model: str
    boxes: List[int]
    methods: List[str]
    repeats: int
    warmup: int
    budget_s: float
    labels: str
    node_methods: List[str]
    timing_variants: Optional[List[str]] = None  # None = every variant

    @classmethod
    def from_args(cls, args) -> "Plan":
        from ..core.registry import METHODS

        dry = bool(args.dry_run)
        methods = list(METHODS) if str(args.methods).strip() == "all" else \
            [m.strip() for m in str(args.methods).split(",") if m.strip()]
        unknown = [m for m in methods if m not in METHODS]
        if unknown or not methods:
            raise ValueError(f"unknown --methods {unknown or args.methods!r}; choose among {list(METHODS)} or 'all'")
        boxes = [int(b) for b in str(args.boxes).split(",") if b.strip()]
        if not boxes or min(boxes) < 1:
            raise ValueError(f"--boxes must be positive integers, got {args.boxes!r}")
        models = [m.strip() for m in str(args.models or ",".join(DRY_MODELS if dry else GPU_MODELS)).split(",")
                  if m.strip()]
        node = str(args.node_defaults if args.node_defaults is not None else (DEFAULT_METHOD if dry else "all")).strip()
        node_methods = list(methods) if node == "all" else [] if node == "none" else \
            [m.strip() for m in node.split(",") if m.strip()]
        if [m for m in node_methods if m not in METHODS]:
            raise ValueError(f"unknown --node-defaults {node!r}; a comma list of {list(METHODS)}, 'all' or 'none'")
        return cls(out=pathlib.Path(args.out), dry_run=dry, device=str(args.device or ("cpu" if dry else "cuda")),
                   models=models, agreement_model=str(args.agreement_model or (DRY_MODELS[0] if dry else GPU_MODELS[0])),
                   boxes=boxes, methods=[DEFAULT_METHOD] + [m for m in dict.fromkeys(methods) if m != DEFAULT_METHOD]
                   if DEFAULT_METHOD in methods else list(dict.fromkeys(methods)),
                   repeats=int(args.repeats if args.repeats is not None else (2 if dry else 10)),
                   warmup=int(args.warmup if args.warmup is not None else (1 if dry else 3)),
                   budget_s=float(args.budget_s if args.budget_s is not None else (120.0 if dry else 330.0)),
                   labels=str(args.labels), node_methods=node_methods,
                   timing_variants=None if (args.timing_variants or ("" if dry else "all")) == "all" else
                   [t.strip() for t in str(args.timing_variants or "fp32,node defaults").split(",") if t.strip()])


class Budget:
    """Seconds since the start against ``limit_s``."""

    def __init__(self, limit_s: float):
        self.limit_s = float(limit_s)
        self.t0 = time.perf_counter()

    def used(self) -> float:
        return time.perf_counter() - self.t0

    def left(self) -> float:
        return self.limit_s - self.used()


# ---------------------------------------------------------------------------------------------- helpers
def _cuda(device: str) -> bool:
    return str(device).startswith("cuda")


def _sync(device: str) -> None:
    if _cuda(device):
        import torch

        torch.cuda.synchronize()


def timed(fn: Callable[[], Any], device: str) -> Tuple[Any, float, float]:
    """``(fn(), device ms, wall ms)``: CUDA events around the call on a CUDA device (the call's host
    work included: the events are recorded on the current stream before and after it), perf_counter
    on the CPU (device ms = wall ms)."""
    import torch

    if _cuda(device):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        start.record()
        out = fn()
        end.record()
        end.synchronize()
        wall = (time.perf_counter() - t0) * 1e3
        return out, float(start.elapsed_time(end)), wall
    t0 = time.perf_counter()
    out = fn()
    wall = (time.perf_counter() - t0) * 1e3
    return out, wall, wall


def _err(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"


def _finite_max(values) -> Optional[float]:
    import numpy as np

    a = np.asarray(values, np.float64).reshape(-1)
    a = a[np.isfinite(a)]
    return float(a.max()) if a.size else None


def _round(v, nd: int = 6):
    if isinstance(v, float):
        return v if not math.isfinite(v) else float(f"{v:.{nd}g}")
    return v


def load_frame(n_boxes: int = AGREEMENT_BOXES):
    """The photograph of ``tools.bench.load_photo`` (the data pack's first 640x480 photograph with its
    boxes, else scikit-image's astronaut with hand-placed boxes) and ``n_boxes`` of its boxes (cycled,
    ``bench.cycle_boxes``), sanitised (``core.boxes.sanitize_boxes``) as the pipeline does."""
    import numpy as np

    from ..core.boxes import BoxStatus, sanitize_boxes
    from .bench import cycle_boxes, load_photo

    image, boxes, source = load_photo()
    H, W = image.shape[:2]
    xyxy, status = sanitize_boxes(cycle_boxes(boxes, n_boxes), W, H)
    return image, xyxy[status == BoxStatus.OK].astype(np.float32), source


# ---------------------------------------------------------------------------------------------- scorers
@dataclasses.dataclass
class Variant:
    """One way of building the scorer under test."""

    name: str
    device: str
    precision: str  # what is passed on (resolved: fp32 / fp16 / bf16)
    requested: str  # what the user writes (``auto`` for the fp16 of ``precision: auto``)
    backend: str = "torch"
    views: Optional[str] = "cpu"  # None = the device's default (the node's)
    node_defaults: bool = False

    @property
    def tolerance_key(self) -> str:
        return self.precision


def agreement_variants(device: str) -> List[Variant]:
    """fp32, the fp16 of ``precision: auto`` (explicit fp16 on the CPU, where auto is fp32), bf16 (all with
    CPU views and the torch backend: the numerics alone) and the node's defaults on ``device``."""
    from ..core.registry import resolve_precision

    auto = resolve_precision("auto", device)
    half = [Variant("auto (fp16)", device, auto, "auto")] if auto == "fp16" else [Variant("fp16", device, "fp16", "fp16")]
    return ([Variant("fp32", device, "fp32", "fp32")] + half + [Variant("bf16", device, "bf16", "bf16"),
            Variant("node defaults", device, auto, "auto", backend="auto", views=None, node_defaults=True)])


class ScorerCache:
    """Scorers of one model through the package's factory, one encoder per (variant, model) shared by
    the methods (``build_scorer(config, encoder=...)``)."""

    def __init__(self, model: str, labels: str):
        self.model = model
        self.labels = labels
        self.encoders: Dict[Tuple[str, str], Any] = {}

    def config(self, v: Variant, method: str):
        """The ``core.config.ScorerConfig`` of variant ``v`` (written out: no head, no thresholds)."""
        from ..core.config import ScorerConfig

        return ScorerConfig(model=self.model, pretrained="", allow_random=True, allow_download=False,
                            device=v.device, precision=v.precision, backend=v.backend, method=method,
                            label_set=self.labels, max_boxes=0, views=v.views)

    def node_parameters(self, v: Variant, method: str) -> Dict[str, Any]:
        return {"model": self.model, "pretrained": "", "allow_random_weights": True, "allow_download": False,
                "device": "cuda" if _cuda(v.device) else "cpu", "precision": v.requested, "backend": v.backend,
                "method": method, "label_set": self.labels, "max_boxes": 0}

    def build(self, v: Variant, method: str, head=None):
        """The scorer of ``method`` for variant ``v`` (``head`` set on its method when given)."""
        key = (v.name, v.device)
        if v.node_defaults:  # the node's construction, one model load per method as one node per method:
            # its backend (auto) is made for the method's output set and is not shared
            from .common import scorer_from_parameters

            sc, _ = scorer_from_parameters(self.node_parameters(v, method), apply_thresholds=False, fit_head=True)
        else:
            from ..factory import build_scorer

            sc = build_scorer(self.config(v, method), encoder=self.encoders.get(key))
            self.encoders.setdefault(key, sc.encoder)
        if head is not None and sc.method.needs_head:
            sc.method.set_head(head)
        return sc

    def close(self) -> None:
        self.encoders.clear()
        _free()


def _free() -> None:
    import gc

    gc.collect()
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except Exception:  # noqa: BLE001 - freeing memory is best effort
        pass


#: epochs of the small heads fitted on the fly for the agreement check (an untrained UNI-OOD head scores every
#: box 0: its combiners start at zero, so nothing would be compared)
HEAD_EPOCHS = 5


def fitted_head(scorer, image, boxes, epochs: int = HEAD_EPOCHS):
    """A head of the scorer's method fitted for ``epochs`` on the frame's boxes (cycled to 24 shots, labels
    cycling over the label set) with the method's own ``fit`` and defaults, or None (RUNA). Meaningless as a
    detector; its scores vary from box to box, which is what the agreement check needs."""
    if not scorer.method.needs_head:
        return None
    import numpy as np
    import torch

    from ..core.methods.heads import Head
    from .bench import cycle_boxes

    feats = scorer.encode(image, cycle_boxes(boxes, 24), views=scorer.method.fit_views)
    ok = np.flatnonzero(feats.status == 0)
    y = torch.arange(ok.size) % len(scorer.label_set)
    state, curve, hyper = scorer.method.fit(feats.rows(ok), y, scorer.text_emb, epochs=int(epochs))
    return Head(scorer.method.name, state, {"hyper": hyper, "loss_curve": curve},
                f"{scorer.method.name} head fitted {epochs} epochs on the check's frame (gpu-check)")


def untrained_head(scorer, image, boxes):
    """An untrained head of the scorer's method (``tools.bench._untrained_head``), or None (RUNA)."""
    if not scorer.method.needs_head:
        return None
    from .bench import _untrained_head, cycle_boxes

    return _untrained_head(scorer, image, cycle_boxes(boxes, 4))


# ---------------------------------------------------------------------------------------------- comparisons
def _is_attention(key: str) -> bool:
    name = key.split(".", 1)[-1]
    return name == "attn_cls" or name.startswith("xattn")


def compare_features(ref, var, method: str, ref_method=None, var_method=None) -> Dict[str, Any]:
    """Figures of one variant's ``BoxFeatures`` / ``FrameResult`` against the reference's (module docstring);
    with both scorers' method objects also their per-box embeddings (``Method.embed``: RUNA's fused ``I_t``)."""
    import numpy as np
    import torch
    import torch.nn.functional as F

    (ref_feats, ref_res), (var_feats, var_res) = ref, var
    ok = np.flatnonzero((ref_res.status == 0) & (var_res.status == 0))
    out: Dict[str, Any] = {"boxes": int(len(ref_res)), "boxes_compared": int(ok.size), "features": {}}
    if ok.size == 0:
        return out
    rows = torch.as_tensor(ok, dtype=torch.long)
    # rows whose boolean masks agree (TagOOD's token selection): float tensors are compared there only
    same = torch.ones(ok.size, dtype=torch.bool)
    for key, a in ref_feats.data.items():
        if a.dtype == torch.bool and key in var_feats.data:
            eq = (a[rows] == var_feats.data[key][rows]).reshape(ok.size, -1).all(1)
            same &= eq
            out["features"][key] = {"kind": "mask", "equal_share": float(eq.float().mean())}
    cos_all, attn_all = [], []
    for key, a in ref_feats.data.items():
        if a.dtype == torch.bool or key not in var_feats.data:
            continue
        b = var_feats.data[key]
        a, b = a[rows][same].double(), b[rows][same].double()
        if a.numel() == 0:
            continue
        if _is_attention(key):
            d = (a - b).abs()
            rec = {"kind": "attention", "max_abs_diff": float(d.max()), "mean_abs_diff": float(d.mean()),
                   "ref_max": float(a.abs().max())}
            attn_all.append(rec["max_abs_diff"])
        else:
            va, vb = a.reshape(-1, a.shape[-1]), b.reshape(-1, b.shape[-1])
            used = (va.norm(dim=1) > 0) | (vb.norm(dim=1) > 0)  # padding rows are zero in both
            cos = F.cosine_similarity(va[used], vb[used], dim=1)
            rec = {"kind": "embedding", "cos_min": float(cos.min()), "cos_mean": float(cos.mean()),
                   "vectors": int(used.sum())}
            cos_all.append(rec["cos_min"])
        out["features"][key] = rec
    fr = fv = None
    if ref_method is not None and var_method is not None:
        fr = ref_method.embed({k: v[rows] for k, v in ref_feats.data.items()})
        fv = var_method.embed({k: v[rows] for k, v in var_feats.data.items()})
    if fr is not None and fv is not None:
        cos = F.cosine_similarity(fr.double(), fv.double(), dim=1)
        out["features"]["fused_embedding"] = {"kind": "embedding", "cos_min": float(cos.min()),
                                              "cos_mean": float(cos.mean()), "vectors": int(cos.numel())}
        cos_all.append(float(cos.min()))
    masks = [r["equal_share"] for r in out["features"].values() if r["kind"] == "mask"]
    out.update(
        embedding_cos_min=min(cos_all) if cos_all else None,
        attention_max_abs_diff=max(attn_all) if attn_all else None,
        mask_equal_share=min(masks) if masks else None,
        uncertainty_max_abs_diff=_finite_max(np.abs(ref_res.uncertainty[ok] - var_res.uncertainty[ok])),
        similarity_max_abs_diff=_finite_max(np.abs(ref_res.similarity[ok] - var_res.similarity[ok])),
        label_agreement=float(np.mean(ref_res.label_idx[ok] == var_res.label_idx[ok])))
    return out


def within(rec: Dict[str, Any], tol: Dict[str, float]) -> List[str]:
    """The figures of ``rec`` outside ``tol`` (empty = within tolerance)."""
    bad = []
    if rec.get("boxes_compared", 0) < rec.get("boxes", 0):
        bad.append(f"{rec['boxes'] - rec.get('boxes_compared', 0)} boxes not scored")
    checks = (("embedding_cos_min", "cos", lambda v, t: v >= t, ">="),
              ("attention_max_abs_diff", "attn", lambda v, t: v <= t, "<="),
              ("uncertainty_max_abs_diff", "unc", lambda v, t: v <= t, "<="),
              ("similarity_max_abs_diff", "unc", lambda v, t: v <= t, "<="),
              ("mask_equal_share", "mask", lambda v, t: v >= t, ">="))
    for field, key, good, op in checks:
        v = rec.get(field)
        if v is not None and not good(v, tol[key]):
            bad.append(f"{field} {v:.3g} (want {op} {tol[key]:g})")
    return bad


def _encode_score(scorer, image, boxes):
    feats = scorer.encode(image, boxes)
    return feats, scorer.score_features(feats)


# ---------------------------------------------------------------------------------------------- sections
REFERENCE = Variant("cpu fp32 (reference)", "cpu", "fp32", "fp32")


def reference(refs: ScorerCache, method: str, image, boxes):
    """``(scorer, head, (features, result))`` of the CPU fp32 reference of ``method`` (with a small head fitted
    on the fly, :func:`fitted_head`, for the methods that need one). Raises when it cannot score the frame."""
    ref = refs.build(REFERENCE, method)
    head = fitted_head(ref, image, boxes)
    if head is not None:
        ref.method.set_head(head)
    out = _encode_score(ref, image, boxes)
    if out[1].error:
        raise RuntimeError(out[1].error)
    return ref, head, out


def _variants_for(plan: Plan, method: str) -> List[Variant]:
    return [v for v in agreement_variants(plan.device) if not v.node_defaults or method in plan.node_methods]


def section_agreement(plan: Plan, image, boxes, log, refs: ScorerCache) -> Dict[str, Any]:
    """Every method x variant against CPU fp32 (section 1)."""
    import numpy as np

    rows = []
    dev = ScorerCache(plan.agreement_model, plan.labels)
    for method in plan.methods:
        variants = _variants_for(plan, method)
        try:
            ref, head, ref_out = reference(refs, method, image, boxes)
        except Exception as exc:  # noqa: BLE001 - the reference itself failed: every variant of the method fails
            log(f"agreement {method}: the CPU fp32 reference failed: {_err(exc)}")
            for v in variants:
                rows.append(_variant_row(v, method, status="failed", error=f"CPU fp32 reference failed: {_err(exc)}"))
            continue
        unc = ref_out[1].uncertainty
        spread = float(np.nanmax(unc) - np.nanmin(unc)) if np.isfinite(unc).any() else None
        for v in variants:
            row = _variant_row(v, method, reference_uncertainty_range=spread)
            try:
                sc = dev.build(v, method, head)
                row.update(backend=sc.encoder.backend_name, view_maker=type(sc.view_maker).__name__,
                           encoder_precision=sc.encoder.precision,
                           backend_choice=getattr(sc, "backend_choice", None))
                out = _encode_score(sc, image, boxes)
                if out[1].error:
                    raise RuntimeError(f"scoring reported: {out[1].error}")
                row.update(compare_features(ref_out, out, method, ref.method, sc.method))
                bad = within(row, TOLERANCES[v.tolerance_key])
                row["status"] = "ok" if not bad else "out_of_tolerance"
                row["outside"] = bad
            except Exception as exc:  # noqa: BLE001 - a failing variant is a finding, recorded
                row.update(status="failed", error=_err(exc), traceback=traceback.format_exc(limit=4)[-1500:])
            log(f"agreement {method:8s} {v.name:14s} {row['status']}"
                + (f": {row.get('error')}" if row.get("error") else
                   f" cos {row.get('embedding_cos_min')} attn {row.get('attention_max_abs_diff')} "
                   f"unc {row.get('uncertainty_max_abs_diff')}"))
            rows.append(row)
    dev.close()
    return {"model": plan.agreement_model, "reference": "cpu fp32, CPU views, torch backend", "device": plan.device,
            "boxes": int(len(boxes)), "tolerances": TOLERANCES, "results": rows,
            "note": "precision variants use CPU views (numerics alone); 'node defaults' is the node's construction "
                    "(precision auto, backend auto, the device's default views). UNI-OOD and TagOOD share one "
                    f"head fitted {HEAD_EPOCHS} epochs on the frame's boxes across variants: random weights, "
                    "agreement only."}


def _variant_row(v: Variant, method: str, **kw) -> Dict[str, Any]:
    row = {"method": method, "variant": v.name, "device": v.device, "precision_requested": v.requested,
           "precision": v.precision, "backend_requested": v.backend, "views_requested": v.views or "default",
           "status": None}
    row.update(kw)
    return row


def section_preprocessing(plan: Plan, image, boxes, log, refs: ScorerCache) -> Dict[str, Any]:
    """GpuViewMaker on the device against the CPU ViewMaker (section 2)."""
    import numpy as np
    import torch
    import torch.nn.functional as F

    from ..backends.gpu_preprocess import GpuViewMaker
    from ..core.registry import VIEWS
    from ..core.views import ViewMaker
    from .bench import cycle_boxes, percentiles

    enc = refs.build(REFERENCE, DEFAULT_METHOD).encoder
    S, blur = enc.input_size, 1.0
    cpu_vm = ViewMaker(S, enc.mean, enc.std, blur)
    dev_vm = GpuViewMaker(S, enc.mean, enc.std, blur, device=plan.device)
    grey = torch.tensor(enc.std, dtype=torch.float64).view(1, 3, 1, 1) * 255.0
    a = cpu_vm.make_views(image, boxes, VIEWS)
    b = {k: t.detach().cpu() for k, t in dev_vm.make_views(image, boxes, VIEWS).items()}
    twin = None
    if _cuda(plan.device):  # the same GpuViewMaker on the CPU: the device's own arithmetic
        twin = GpuViewMaker(S, enc.mean, enc.std, blur, device="cpu").make_views(image, boxes, VIEWS)
    kinds, bad = {}, []
    for k in VIEWS:
        d = (b[k].double() - a[k].double()).abs() * grey
        with torch.no_grad():
            ea, eb = enc.visual_features(a[k]), enc.visual_features(b[k].float())
        cos = F.cosine_similarity(ea.double(), eb.double(), dim=1)
        rec = {"views": int(a[k].shape[0]), "mean_abs_diff_grey": float(d.mean()), "max_abs_diff_grey": float(d.max()),
               "embedding_cos_min": float(cos.min())}
        if twin is not None:
            rec["device_vs_cpu_same_code_max_abs_diff_grey"] = float(((b[k].double() - twin[k].double()).abs() * grey).max())
        want = PREPROCESS_TOLERANCES["mean_grey"][k]
        if rec["mean_abs_diff_grey"] > want:
            bad.append(f"{k}: mean |diff| {rec['mean_abs_diff_grey']:.3g} grey levels (want <= {want:g})")
        if rec["embedding_cos_min"] < PREPROCESS_TOLERANCES["cos"]:
            bad.append(f"{k}: embedding cos {rec['embedding_cos_min']:.5f} (want >= {PREPROCESS_TOLERANCES['cos']:g})")
        kinds[k] = rec
        log(f"preprocessing {k:10s} mean |diff| {rec['mean_abs_diff_grey']:.3f} grey, max {rec['max_abs_diff_grey']:.1f}, "
            f"embedding cos min {rec['embedding_cos_min']:.6f}")
    timing = {}
    for n in plan.boxes:
        bx = cycle_boxes(boxes, n)
        H, W = image.shape[:2]
        bx[:, [0, 2]] = np.clip(bx[:, [0, 2]], 0, W)
        bx[:, [1, 3]] = np.clip(bx[:, [1, 3]], 0, H)
        row = {}
        for name, vm, dev in (("cpu_view_maker", cpu_vm, "cpu"), ("device_view_maker", dev_vm, plan.device)):
            for _ in range(max(plan.warmup, 1)):
                vm.make(image, bx)
            _sync(dev)
            ms = [timed(lambda: vm.make(image, bx), dev)[1] for _ in range(max(plan.repeats, 3))]
            row[name] = percentiles(ms)
        timing[str(n)] = row
    return {"model": plan.agreement_model, "device": plan.device, "input_size": S, "views": kinds,
            "tolerances": PREPROCESS_TOLERANCES, "status": "ok" if not bad else "out_of_tolerance", "outside": bad,
            "make_ms": timing,
            "note": "GPU views vs CPU views: roi_align sampling vs cv2 INTER_AREA / INTER_LINEAR differ by a few grey "
                    "levels (single pixels more on sharp edges), so equivalence is judged on the embeddings "
                    "(CPU fp32 trunk of the agreement model)"}


def section_timings(plan: Plan, image, boxes, budget: Budget, log) -> Dict[str, Any]:
    """Every model x precision x method x box count, whole frames (section 3)."""
    from .bench import cycle_boxes, percentiles, trunk_passes

    rows, skipped = [], []
    variants = [v for v in agreement_variants(plan.device)
                if plan.timing_variants is None or v.name in plan.timing_variants]
    # the node's path first (what a user gets), then the precisions: fp32 last but one, bf16 last
    order = {"node defaults": 0, "auto (fp16)": 1, "fp16": 1, "fp32": 2, "bf16": 3}
    variants.sort(key=lambda v: order.get(v.name, 9))
    for v in variants:
        if not v.node_defaults:
            v.views = None  # timings: the device's default views (GPU views on CUDA), as the node
    frames = {n: cycle_boxes(boxes, n) for n in plan.boxes}
    per_frame: Dict[Tuple[str, str, str], float] = {}  # last ms per frame at the largest count timed
    timer = "cuda events (host work included)" if _cuda(plan.device) else "perf_counter"
    for model in plan.models:
        for v in variants:
            if budget.left() < RESERVE_S:
                skipped.append(f"{model} {v.name}: every method skipped (budget: {budget.left():.0f} s left)")
                continue
            cache = ScorerCache(model, plan.labels)
            for method in plan.methods:
                if v.node_defaults and method not in plan.node_methods:
                    continue
                try:
                    t0 = time.perf_counter()
                    sc = cache.build(v, method)
                    if sc.method.needs_head:
                        sc.method.set_head(untrained_head(sc, image, boxes))
                    build_s = time.perf_counter() - t0
                except Exception as exc:  # noqa: BLE001
                    rows.append({"model": model, "variant": v.name, "method": method, "status": "failed",
                                 "error": _err(exc)})
                    log(f"timings {model} {v.name} {method}: failed: {_err(exc)}")
                    continue
                for n in plan.boxes:
                    est = per_frame.get((model, v.name, method))
                    est_s = None if est is None else est * (plan.warmup + plan.repeats) * max(1.0, n / 10.0) / 1e3
                    if budget.left() - RESERVE_S < (est_s or 0.0) or budget.left() < RESERVE_S:
                        skipped.append(f"{model} {v.name} {method} {n} boxes (budget: {budget.left():.0f} s left"
                                       + (f", about {est_s:.0f} s needed)" if est_s else ")"))
                        continue
                    bx = frames[n]
                    try:
                        for _ in range(plan.warmup):
                            res = sc.score(image, bx)
                        dev_ms, wall_ms, split = [], [], {"views": [], "encode": [], "score": []}
                        for _ in range(plan.repeats):
                            res, d, w = timed(lambda: sc.score(image, bx), plan.device)
                            if res.error:
                                raise RuntimeError(res.error)
                            dev_ms.append(d)
                            wall_ms.append(w)
                            for k in split:
                                split[k].append(float(res.timings.get(k, float("nan"))))
                    except Exception as exc:  # noqa: BLE001
                        rows.append({"model": model, "variant": v.name, "method": method, "boxes": n,
                                     "status": "failed", "error": _err(exc)})
                        log(f"timings {model} {v.name} {method} {n}: failed: {_err(exc)}")
                        break
                    st = percentiles(dev_ms)
                    per_frame[(model, v.name, method)] = st["mean_ms"] * 10.0 / max(n, 1) if n > 10 else st["mean_ms"]
                    choice = getattr(sc, "backend_choice", None) or {}
                    rows.append({"model": model, "variant": v.name, "precision": v.precision,
                                 "backend": sc.encoder.backend_name, "backend_variant": choice.get("variant"),
                                 "view_maker": type(sc.view_maker).__name__,
                                 "method": method, "boxes": n, "status": "ok", "trunk_passes": trunk_passes(sc.method, n),
                                 "p50_ms": st["p50_ms"], "p95_ms": st["p95_ms"], "mean_ms": st["mean_ms"],
                                 "min_ms": st["min_ms"], "n": st["n"], "wall_p50_ms": percentiles(wall_ms)["p50_ms"],
                                 **{f"{k}_p50_ms": percentiles(x)["p50_ms"] for k, x in split.items()},
                                 "build_s": build_s})
                    log(f"timings {model:9s} {v.name:14s} {method:8s} {n:3d} boxes p50 {st['p50_ms']:8.2f} ms "
                        f"(encode {rows[-1]['encode_p50_ms']:.2f}, views {rows[-1]['views_p50_ms']:.2f}, "
                        f"score {rows[-1]['score_p50_ms']:.2f})")
                del sc
            cache.close()
    return {"timer": timer, "device": plan.device, "models": plan.models, "boxes": plan.boxes,
            "variants": [v.name for v in variants],
            "warmup": plan.warmup, "repeats": plan.repeats, "rows": rows, "skipped": skipped,
            "note": "random weights (speed only); one frame = OodScorer.score on a 640x480 photograph: views, trunk, "
                    "head (CPU), scoring; untrained heads for UNI-OOD / TagOOD cost what trained ones do"}


def section_tensorrt(plan: Plan, image, boxes, budget: Budget, log, refs: ScorerCache) -> Dict[str, Any]:
    """TensorRT where it imports (section 4)."""
    from ..backends.tensorrt_backend import tensorrt_available

    ok, why = tensorrt_available()
    if not ok:
        log(f"tensorrt: not run: {why}")
        return {"available": False, "status": "not_run",
                "reason": why, "note": "TensorRT could not run on this machine (`import tensorrt` failed or found no "
                                       "usable TensorRT / CUDA): nothing about TensorRT was checked here"}
    from ..backends.tensorrt_backend import build_engine
    from ..core.methods import get_method
    from .bench import cycle_boxes, percentiles

    import tensorrt  # noqa: F401 - version for the report

    out = {"available": True, "version": getattr(sys.modules.get("tensorrt"), "__version__", "?"), "results": []}
    for method in plan.methods:
        if budget.left() < 120:
            out["results"].append({"method": method, "status": "skipped",
                                   "error": f"budget: {budget.left():.0f} s left (an engine build needs about 2 min)"})
            continue
        row: Dict[str, Any] = {"method": method, "precision": "fp16"}
        try:
            ref, head, ref_out = reference(refs, method, image, boxes)
            outputs = tuple(get_method(method)(ref.encoder).outputs)
            t0 = time.perf_counter()
            path, _meta = build_engine(ref.encoder, precision="fp16", profile=(1, 16, 128), device=plan.device,
                                       outputs=outputs)
            row["build_s"] = time.perf_counter() - t0
            v = Variant("tensorrt fp16", plan.device, "fp16", "fp16", backend="tensorrt", views=None)
            cache = ScorerCache(plan.agreement_model, plan.labels)
            cfg = cache.config(v, method).replace(engine_path=str(path), backend_options={"outputs": outputs})
            from ..factory import build_scorer

            sc = build_scorer(cfg)
            if head is not None:
                sc.method.set_head(head)
            row.update(compare_features(ref_out, _encode_score(sc, image, boxes), method, ref.method, sc.method))
            bad = within(row, TOLERANCES["fp16"])
            row["status"], row["outside"] = ("ok" if not bad else "out_of_tolerance"), bad
            row["timings"] = {}
            for n in plan.boxes:
                bx = cycle_boxes(boxes, n)
                for _ in range(plan.warmup):
                    sc.score(image, bx)
                ms = [timed(lambda: sc.score(image, bx), plan.device)[1] for _ in range(plan.repeats)]
                row["timings"][str(n)] = percentiles(ms)
            cache.close()
        except Exception as exc:  # noqa: BLE001
            row.update(status="failed", error=_err(exc))
        log(f"tensorrt {method}: {row['status']}" + (f": {row.get('error')}" if row.get("error") else ""))
        out["results"].append(row)
    return out


# ---------------------------------------------------------------------------------------------- report
def environment(plan: Plan) -> Dict[str, Any]:
    import torch

    env: Dict[str, Any] = {"python": sys.version.split()[0], "platform": platform.platform(),
                           "machine": platform.machine(), "cpu_count": os.cpu_count(),
                           "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
                           "cuda_available": bool(torch.cuda.is_available()), "device": plan.device}
    for mod in ("torchvision", "open_clip", "numpy", "cv2", "onnxruntime", "timm", "ftfy"):
        try:
            m = __import__(mod)
            env[mod] = getattr(m, "__version__", "?")
            env[f"{mod}_from"] = str(pathlib.Path(getattr(m, "__file__", "") or "").parent)
        except Exception as exc:  # noqa: BLE001
            env[mod] = f"missing ({_err(exc)})"
    if _cuda(plan.device) and torch.cuda.is_available():
        p = torch.cuda.get_device_properties(torch.device(plan.device))
        env.update(gpu=p.name, gpu_memory_gib=round(p.total_memory / 2 ** 30, 1),
                   gpu_capability=f"{p.major}.{p.minor}", cuda=torch.version.cuda,
                   cudnn=torch.backends.cudnn.version(),
                   matmul_allow_tf32=bool(torch.backends.cuda.matmul.allow_tf32),
                   cudnn_allow_tf32=bool(torch.backends.cudnn.allow_tf32))
    return env


def summarise(report: Dict[str, Any]) -> Dict[str, Any]:
    failures, notes = [], []
    ros = report["environment"].get("ros", {})
    if ros and not ros.get("ok", True):
        failures.append(f"ROS imported or attempted: {ros.get('modules_loaded') or ros.get('import_attempts')}")
    for row in report.get("agreement", {}).get("results", []):
        if row["status"] != "ok":
            why = row.get("error") or "; ".join(row.get("outside", []))
            failures.append(f"agreement {row['method']} {row['variant']}: {row['status']}: {why}")
    pre = report.get("preprocessing", {})
    if pre.get("status") not in (None, "ok"):
        failures.append(f"preprocessing: {pre.get('status')}: {'; '.join(pre.get('outside', [])) or pre.get('error')}")
    tim = report.get("timings", {})
    for row in tim.get("rows", []):
        if row.get("status") != "ok":
            failures.append(f"timings {row['model']} {row['variant']} {row['method']}"
                            f"{' ' + str(row['boxes']) + ' boxes' if 'boxes' in row else ''}: {row.get('error')}")
    if tim.get("error"):
        failures.append(f"timings: {tim['error']}")
    if tim.get("skipped"):
        notes.append(f"{len(tim['skipped'])} timing cells skipped by the time budget (listed in timings.skipped)")
    trt = report.get("tensorrt", {})
    if trt and not trt.get("available"):
        notes.append(f"TensorRT did not run: {trt.get('reason')}")
    for row in trt.get("results", []) if trt else []:
        if row.get("status") not in ("ok", "skipped"):
            failures.append(f"tensorrt {row['method']}: {row.get('status')}: {row.get('error') or row.get('outside')}")
    for sec in ("agreement", "preprocessing", "tensorrt"):
        if report.get(sec, {}).get("error"):
            failures.append(f"{sec}: {report[sec]['error']}")
    return {"ok": not failures, "failures": failures, "notes": notes}


def _fmt(v, spec: str = ".4g") -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return format(v, spec) if math.isfinite(v) else str(v)
    return str(v)


def markdown(report: Dict[str, Any]) -> str:
    env, lines = report["environment"], []
    mode = "DRY RUN on the CPU" if report["dry_run"] else f"on {env.get('gpu', report['device'])}"
    lines += [f"# GPU check ({mode})", "",
              f"{report['created']} · `{report['command']}` · {report['random_weights']}", "",
              f"- result: **{'every check within tolerance' if report['summary']['ok'] else 'FAILURES (below)'}**",
              f"- run time {report['budget']['used_s']:.1f} s of a {report['budget']['limit_s']:.0f} s budget",
              f"- python {env['python']}, torch {env['torch']}, open_clip {env.get('open_clip')}, "
              f"device {report['device']}" + (f" ({env['gpu']}, CUDA {env.get('cuda')}, TF32 matmul "
                                               f"{env.get('matmul_allow_tf32')} / cuDNN {env.get('cudnn_allow_tf32')})"
                                               if env.get("gpu") else ""),
              f"- ROS: {'not imported' if env['ros']['ok'] else 'IMPORTED'} (attempts refused: "
              f"{', '.join(env['ros']['import_attempts']) or 'none'})"]
    for f in report["summary"]["failures"]:
        lines.append(f"- FAILURE: {f}")
    for n in report["summary"]["notes"]:
        lines.append(f"- note: {n}")
    ag = report.get("agreement")
    if ag and "results" in ag:
        lines += ["", f"## 1. Agreement with CPU fp32 ({ag['model']}, {ag['boxes']} boxes)", "", ag["note"], "",
                  "| method | variant | backend | views | status | embedding cos min | attention max abs diff | "
                  "uncertainty max abs diff | similarity max abs diff | same label | masks equal |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in ag["results"]:
            status = r["status"] if r["status"] != "failed" else f"FAILED: {r.get('error', '')}"
            if r["status"] == "out_of_tolerance":
                status = "OUT OF TOLERANCE: " + "; ".join(r.get("outside", []))
            lines.append(f"| {r['method']} | {r['variant']} | {r.get('backend', '-')} | {r.get('view_maker', '-')} | "
                         f"{status} | {_fmt(r.get('embedding_cos_min'), '.6f')} | {_fmt(r.get('attention_max_abs_diff'), '.3g')} | "
                         f"{_fmt(r.get('uncertainty_max_abs_diff'), '.3g')} | {_fmt(r.get('similarity_max_abs_diff'), '.3g')} | "
                         f"{_fmt(r.get('label_agreement'), '.2f')} | {_fmt(r.get('mask_equal_share'), '.2f')} |")
        lines += ["", "Tolerances: " + "; ".join(f"{p}: cos >= {t['cos']}, attention <= {t['attn']}, uncertainty <= "
                                                  f"{t['unc']}, masks >= {t['mask']}" for p, t in ag["tolerances"].items())]
    elif ag:
        lines += ["", f"## 1. Agreement: FAILED ({ag.get('error')})"]
    pre = report.get("preprocessing")
    if pre and "views" in pre:
        lines += ["", f"## 2. Preprocessing: GpuViewMaker on {pre['device']} vs CPU ViewMaker ({pre['model']}, "
                      f"{pre['input_size']} px)", "", pre["note"], "",
                  "| view | views | mean abs diff (grey) | max abs diff (grey) | embedding cos min |", "|---|---|---|---|---|"]
        for k, r in pre["views"].items():
            lines.append(f"| {k} | {r['views']} | {r['mean_abs_diff_grey']:.3f} | {r['max_abs_diff_grey']:.1f} | "
                         f"{r['embedding_cos_min']:.6f} |")
        lines += ["", "View making (regional + global), p50 ms: " + ", ".join(
            f"{n} boxes CPU {r['cpu_view_maker']['p50_ms']:.2f} / device {r['device_view_maker']['p50_ms']:.2f}"
            for n, r in pre["make_ms"].items())]
        if pre["outside"]:
            lines.append("Outside tolerance: " + "; ".join(pre["outside"]))
    elif pre:
        lines += ["", f"## 2. Preprocessing: FAILED ({pre.get('error')})"]
    tim = report.get("timings")
    if tim and "error" in tim:
        lines += ["", f"## 3. Timings: FAILED ({tim['error']})"]
    elif tim:
        lines += ["", f"## 3. Timings ({tim['timer']}; {tim['warmup']} warm-up + {tim['repeats']} timed frames per cell)",
                  "", tim["note"], ""]
        ok = [r for r in tim["rows"] if r.get("status") == "ok"]
        keys = list(dict.fromkeys((r["model"], r["variant"]) for r in tim["rows"]))
        counts = [n for n in tim["boxes"]]
        lines += ["| model | variant | method | backend | " + " | ".join(f"{n} boxes p50 ms (encode)" for n in counts) + " |",
                  "|---|---|---|---|" + "---|" * len(counts)]
        for model, var in keys:
            for method in dict.fromkeys(r["method"] for r in tim["rows"] if (r["model"], r["variant"]) == (model, var)):
                cells, backend = [], "-"
                for n in counts:
                    r = next((x for x in ok if (x["model"], x["variant"], x["method"], x["boxes"]) ==
                              (model, var, method, n)), None)
                    f = next((x for x in tim["rows"] if (x["model"], x["variant"], x["method"]) == (model, var, method)
                              and x.get("status") == "failed" and x.get("boxes", n) == n), None)
                    if r is not None:
                        backend = r["backend"]
                        cells.append(f"{_fmt(r['p50_ms'], '.2f')} ({_fmt(r.get('encode_p50_ms'), '.2f')})")
                    else:
                        cells.append("FAILED" if f is not None else "skipped")
                lines.append(f"| {model} | {var} | {method} | {backend} | " + " | ".join(cells) + " |")
        for r in tim["rows"]:
            if r.get("status") == "failed":
                lines.append(f"- failed: {r['model']} {r['variant']} {r['method']}: {r.get('error')}")
        for s in tim["skipped"]:
            lines.append(f"- skipped: {s}")
    trt = report.get("tensorrt")
    if trt:
        lines += ["", "## 4. TensorRT", ""]
        if "error" in trt:
            lines.append(f"FAILED: {trt['error']}")
        elif not trt.get("available"):
            lines.append(f"**TensorRT did not run here.** {trt.get('note')}. Reason: {trt.get('reason')}")
        else:
            lines.append(f"TensorRT {trt.get('version')}, fp16 engines:")
            for r in trt["results"]:
                t = ", ".join(f"{n} boxes {v['p50_ms']:.2f} ms" for n, v in (r.get("timings") or {}).items())
                lines.append(f"- {r['method']}: {r['status']}" + (f" ({r.get('error')})" if r.get("error") else
                             f", cos min {_fmt(r.get('embedding_cos_min'), '.6f')}, uncertainty max abs diff "
                             f"{_fmt(r.get('uncertainty_max_abs_diff'), '.3g')}; {t}"))
    lines.append("")
    return "\n".join(lines)


def write_report(report: Dict[str, Any], out: pathlib.Path, budget: Budget) -> None:
    report["budget"].update(used_s=budget.used(), left_s=budget.left())
    report["environment"]["ros"] = report["_ros"].report()
    report.pop("summary", None)
    report["summary"] = summarise(report)
    out.mkdir(parents=True, exist_ok=True)
    body = {k: v for k, v in report.items() if not k.startswith("_")}
    tmp = out / (JSON_NAME + ".tmp")
    tmp.write_text(json.dumps(body, indent=1, default=_json_default, allow_nan=False))
    tmp.replace(out / JSON_NAME)
    (out / MD_NAME).write_text(markdown(body))


def _json_default(o):
    try:
        import numpy as np

        if isinstance(o, np.generic):
            return o.item()
    except ImportError:  # pragma: no cover
        pass
    return str(o)


def _clean(obj):
    """NaN / inf -> None (strict JSON)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    return obj


# ---------------------------------------------------------------------------------------------- main
def run(args) -> int:
    blocker = RosBlocker.install()  # before the package's modules load: the check must not need ROS
    try:
        plan = Plan.from_args(args)
    except ValueError as exc:
        print(f"gpu-check: {exc}", file=sys.stderr)
        return 2
    import logging

    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    budget = Budget(plan.budget_s)

    def log(msg: str) -> None:
        print(f"[gpu-check {budget.used():6.1f} s] {msg}", flush=True)

    import torch

    from .common import RANDOM_LABEL

    report: Dict[str, Any] = {
        "schema": SCHEMA, "dry_run": plan.dry_run, "device": plan.device,
        "created": _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat(),
        "command": "scripts/gpu_check.sh" + (" --dry-run" if plan.dry_run else "") + " OUTDIR",
        "random_weights": RANDOM_LABEL, "methods": plan.methods,
        "budget": {"limit_s": plan.budget_s}, "environment": environment(plan), "_ros": blocker}
    cuda_missing = _cuda(plan.device) and not torch.cuda.is_available()
    if cuda_missing:
        report["error"] = (f"device {plan.device} requested but torch {torch.__version__} sees no CUDA device; run "
                           "with --dry-run on a CPU machine")
        report["summary"] = {"ok": False, "failures": [report["error"]], "notes": []}
        log(report["error"])
        write_report(report, plan.out, budget)
        return 3
    if not plan.dry_run and not _cuda(plan.device):
        log(f"device {plan.device} without --dry-run: the CPU is checked against itself")
    torch.manual_seed(0)
    log(f"{'dry run' if plan.dry_run else 'GPU check'} on {report['environment'].get('gpu', plan.device)}: methods "
        f"{plan.methods}, agreement model {plan.agreement_model}, timed models {plan.models}, budget {plan.budget_s:.0f} s")
    image, boxes, source = load_frame()
    report["frame"] = {"source": source, "size": [int(image.shape[1]), int(image.shape[0])], "boxes": int(len(boxes))}
    refs = ScorerCache(plan.agreement_model, plan.labels)  # the CPU fp32 reference, shared by the sections
    steps = (("agreement", lambda: section_agreement(plan, image, boxes, log, refs)),
             ("preprocessing", lambda: section_preprocessing(plan, image, boxes, log, refs)),
             ("timings", lambda: section_timings(plan, image, boxes, budget, log)),
             ("tensorrt", lambda: section_tensorrt(plan, image, boxes, budget, log, refs)))
    for name, fn in steps:
        try:
            report[name] = _clean(fn())
        except Exception as exc:  # noqa: BLE001 - a section that breaks is reported, the others still run
            log(f"{name}: FAILED: {_err(exc)}")
            report[name] = {"error": _err(exc), "traceback": traceback.format_exc(limit=6)[-3000:]}
        _free()
        write_report(report, plan.out, budget)
    log(f"report: {plan.out / JSON_NAME}, {plan.out / MD_NAME}")
    summary = report["summary"]
    for f in summary["failures"]:
        log(f"FAILURE: {f}")
    log("every check within tolerance" if summary["ok"] else f"{len(summary['failures'])} failure(s)")
    return 0 if summary["ok"] else 1


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m runa_ood_node.tools.gpu_check", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
