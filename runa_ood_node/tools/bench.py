"""`runa-ood bench`: per-frame latency of every available visual backend vs the naive per-box loop.

What is timed (one "frame" = one real 640x480 photograph with N boxes, N in ``--boxes``):

* ``naive``: the obvious implementation, per box: :meth:`ViewMaker.make_naive` (resize + blur the
  frame again for this box), two separate batch-1 forward passes of the PyTorch trunk (crop, then
  global view), fuse, cosine to the text embeddings, score.
* ``naive-b2``: what a researcher writes from the paper (:func:`naive_b2_frame`): per box, open_clip's
  own PIL preprocessing transform (bicubic squash to S x S, ToTensor, Normalize) of the crop and of the
  blurred global view (PIL GaussianBlur of the S x S frame, sharp box pasted back), stacked into ONE
  batch-2 ``model.encode_image`` call, fused, scored. The stronger of the two baselines; every
  variant's speed-up is reported over both.
* ``batched/<backend>``: :meth:`OodScorer.score` (views for all boxes made with one frame resize and
  one blur, ONE backend call over the 2N views, vectorised scoring) with the encoder's trunk
  replaced through ``encoder.set_backend`` by each available backend: torch fp32, ONNX Runtime
  fp32, ONNX Runtime int8 (dynamic), ONNX Runtime fused (transformer fusions: Attention,
  SkipLayerNormalization, BiasGelu) fp32 and dynamic int8, ONNX Runtime static int8 (QDQ, calibrated on
  real crops of the data pack, else of the demo's sample photographs), and on a CUDA machine torch
  CUDA fp32/fp16, ONNX Runtime CUDA and TensorRT (when an engine was built with ``runa-ood build-engine``).

Thread settings are measured, not guessed: after the main table the fastest ONNX Runtime variant is
timed again at the ratio box count with intra-op threads 1 and 2, sequential and parallel execution
(``--no-thread-sweep`` skips it). Fidelity: every variant's embeddings (after the projection) against
torch fp32 on real crops, cosine min printed with the goal (>= 0.999).

Roofline (``--no-roofline`` skips it, about 2 s): the trunk's FLOPs per view (``FlopCounterMode``,
a multiply-add = 2 FLOPs), this CPU's fp32 GEMM peak (``torch.mm``) and int8 GEMM peak (ONNX
Runtime running a MatMul quantised exactly like the int8 variants, same session options), measured
after the timed variants in the same run; then every variant's achieved GFLOP/s (frame FLOPs /
frame p50) as a share of its peak, and the ceiling: the fastest frame if every FLOP ran at the int8
peak, with its speed-ups over both baselines next to the goals (:func:`roofline_section`).

Methods (``--method all`` or a list, :func:`bench_methods`): every OOD method of ``core.methods`` scores the
same frames through :meth:`OodScorer.score` on every CPU backend (torch, ONNX Runtime plain, int8, fused,
fused int8, static int8 calibrated on the method's own views, and ``auto`` as the node would pick it),
all (method, backend) rows interleaved in one run, at every box count: p50 / p95, the frame time over
RUNA's best backend, each backend's fidelity to torch (embedding cosine, attention max |delta|), the
roofline share (trunk FLOPs per frame from the model config, :func:`trunk_flops_per_call`, over the
frame p50, as a share of the measured GEMM peak of its class), each method's best backend, auto over
that best, and the goals (TagOOD <= 1/10 of RUNA's best at 10 boxes and <= 1/30 at 50, UNI-OOD <=
1.5x, auto within 10 %). Methods that need a trained head get an untrained one (``fit`` with 0
epochs): the same cost as a trained head, meaningless scores.

Variants run interleaved (round robin over variants inside every round, ``--rounds`` rounds of
``--repeats`` frames each) so the machine's slow bursts hit every variant alike; p50/p95 are over
all frames of a variant. Weights are random by default: latency does not depend on the weight
values, and the output says so. Embedding fidelity of int8 (and ORT fp32) against torch fp32 is
measured on the same photograph's real box crops.
"""
from __future__ import annotations

import argparse
import logging
import os
import pathlib
import platform
import sys
import time
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from ..core.parameters import default
from ..core.registry import DEFAULT_METHOD, METHODS, PER_IMAGE_VIEWS, VIEWS_FOR_ABLATION

LOG = logging.getLogger("runa_ood_node.tools.bench")
DEFAULT_BENCH_MODEL = "ViT-B-32"
BASELINES = ["naive", "naive-b2"]
CPU_VARIANTS = BASELINES + ["torch", "onnxruntime", "onnxruntime-int8", "onnxruntime-fused", "onnxruntime-fused-int8",
                            "onnxruntime-int8-static"]
#: the backends every method is timed on with ``--method`` (CPU; ``auto`` = what ``backend: auto`` picks)
METHOD_BACKENDS = ["torch", "onnxruntime", "onnxruntime-int8", "onnxruntime-fused", "onnxruntime-fused-int8",
                   "onnxruntime-int8-static", "auto"]
GPU_VARIANTS = ["torch-cuda", "torch-cuda-fp16", "onnxruntime-cuda", "tensorrt"]
FIDELITY_GOAL = 0.999


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=DEFAULT_BENCH_MODEL,
                        help="open_clip ViT, or a comma list run one after the other in this process with one "
                             "JSON section and one table each, e.g. ViT-B-32,ViT-B-16 (default %(default)s)")
    parser.add_argument("--pretrained", default="none",
                        help="weights tag/path for every model, or a comma list with one per model; default 'none' "
                             "= seeded RANDOM weights (latency is the same)")
    parser.add_argument("--boxes", default="1,10,50", help="box counts per frame (default %(default)s)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default %(default)s)")
    parser.add_argument("--repeats", type=int, default=3, help="frames per variant per box count per round "
                                                                "(default %(default)s)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed frames per variant first (default %(default)s)")
    parser.add_argument("--variants", default="all",
                        help="comma list among " + ",".join(CPU_VARIANTS + GPU_VARIANTS) + ", or 'all' = every one "
                             "available here; both naive baselines always run (default %(default)s)")
    parser.add_argument("--no-thread-sweep", dest="thread_sweep", action="store_false",
                        help="skip the ONNX Runtime thread-setting table (intra-op 1/2 x sequential/parallel)")
    parser.add_argument("--no-roofline", dest="roofline", action="store_false",
                        help="skip the roofline: the trunk's FLOPs per view, this CPU's fp32 / int8 GEMM peaks "
                             "measured in this run (about 1-2 s) and each variant's share of them")
    parser.add_argument("--calibration-images", type=int, default=16,
                        help="photographs whose box crops calibrate the static int8 graph (default %(default)s)")
    parser.add_argument("--ort-threads", type=int, default=None, help="ONNX Runtime intra-op threads (default: all cores)")
    parser.add_argument("--image", default=None, help="photograph to use (default: a 640x480 one from the ood pack)")
    parser.add_argument("--annotations", default=None, help="ood pack annotations.json (default: the shared pack)")
    parser.add_argument("--labels", default="voc", help="ID label set (default %(default)s)")
    parser.add_argument("--cache-dir", default=None, help="cache root for ONNX exports (default $RUNA_OOD_CACHE_DIR)")
    parser.add_argument("--json", dest="json_path", default=None, help="write all figures to this JSON file")
    parser.add_argument("--method", default=DEFAULT_METHOD,
                        help="OOD methods to time side by side, each on every CPU backend (--method-backends), in "
                             f"one interleaved run: 'all' or a comma list of {', '.join(METHODS)} (default "
                             "%(default)s: RUNA's variants only)")
    parser.add_argument("--method-backends", default="all",
                        help="with --method: comma list among " + ",".join(METHOD_BACKENDS) + " or 'all' "
                             "(default %(default)s; 'auto' = what backend: auto picks, measured in this run)")
    parser.add_argument("--auto-recorded", action="store_true",
                        help="with --method: let the auto row use a choice recorded earlier on this CPU instead of "
                             "measuring again (default: its record is removed first, so auto measures now)")
    parser.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")


# ---------------------------------------------------------------------- inputs
def load_photo(image: Optional[str] = None, annotations: Optional[str] = None
               ) -> Tuple[np.ndarray, np.ndarray, Dict[str, Any]]:
    """A real RGB photograph (640x480 preferred) and its annotated boxes as xyxy float32 ``[K,4]``.

    Order: ``image`` if given (boxes: a fixed grid); else the first 640x480 image with >= 3 boxes in
    the ood pack; else ``skimage.data.astronaut()`` resized to 640x480 with hand-placed boxes.
    """
    import cv2

    if image:
        bgr = cv2.imread(str(image), cv2.IMREAD_COLOR)
        if bgr is None:
            raise ValueError(f"cannot read image {image}")
        rgb = bgr[:, :, ::-1].copy()
        return rgb, _grid_boxes(rgb.shape[1], rgb.shape[0]), {"source": str(image), "boxes_from": "grid"}
    from .common import DEFAULT_ANNOTATIONS

    ann_path = pathlib.Path(annotations) if annotations else DEFAULT_ANNOTATIONS
    if ann_path is not None and ann_path.is_file():
        import json

        ann = json.loads(ann_path.read_text())
        for img in ann["images"]:
            if img["width"] == 640 and img["height"] == 480:
                boxes = [a["bbox"] for a in ann["annotations"] if a["image_id"] == img["id"]]
                if len(boxes) >= 3:
                    bgr = cv2.imread(str(ann_path.parent / img["file_name"]), cv2.IMREAD_COLOR)
                    if bgr is None:
                        continue
                    b = np.asarray(boxes, np.float32)
                    b[:, 2:] += b[:, :2]
                    return bgr[:, :, ::-1].copy(), b, {"source": str(ann_path.parent / img["file_name"]),
                                                       "boxes_from": "annotations", "annotated_boxes": len(boxes)}
    from skimage import data

    rgb = cv2.resize(data.astronaut(), (640, 480), interpolation=cv2.INTER_AREA)
    b = np.array([[150, 20, 470, 300], [60, 250, 330, 480], [400, 300, 600, 470], [10, 10, 120, 150]], np.float32)
    return rgb, b, {"source": "skimage.data.astronaut (resized 640x480)", "boxes_from": "hand-placed"}


def _grid_boxes(W: int, H: int) -> np.ndarray:
    xs = np.linspace(0, W, 5)
    ys = np.linspace(0, H, 4)
    return np.array([[xs[i], ys[j], xs[i + 1], ys[j + 1]] for j in range(3) for i in range(4)], np.float32)


def cycle_boxes(boxes: np.ndarray, n: int) -> np.ndarray:
    """``n`` boxes taken from ``boxes`` in order, cycling; the c-th cycle is shifted by c px (x and y)
    so repeated boxes are distinct (the pipeline clips any overflow to the image)."""
    k = boxes.shape[0]
    out = np.stack([boxes[i % k] + float(i // k) for i in range(n)])
    return out.astype(np.float32)


def percentiles(ms: Sequence[float]) -> Dict[str, float]:
    from ..core.metrics import percentile

    a = np.asarray(ms, np.float64)
    return {"p50_ms": percentile(a, 50), "p95_ms": percentile(a, 95), "mean_ms": float(a.mean()),
            "min_ms": float(a.min()), "n": int(a.size)}


# ---------------------------------------------------------------------- variants
def naive_frame(encoder, view_maker, text_emb, image: np.ndarray, boxes: np.ndarray, lam: Optional[float] = None):
    """The naive per-box loop (see module docstring); returns the uncertainties ``[N]`` (``lam`` None: the table's)."""
    from ..core import scoring
    from ..core.boxes import sanitize_boxes
    from ..core.methods.runa import fuse

    lam = default("lam") if lam is None else lam
    H, W = image.shape[:2]
    xyxy, status = sanitize_boxes(boxes, W, H)
    unc = np.full(len(xyxy), np.nan, np.float32)
    for i in np.flatnonzero(status == 0):
        r, g = view_maker.make_naive(image, xyxy[i])
        f_r = encoder.visual_features(r)
        f_g = encoder.visual_features(g)
        emb = fuse(f_r, f_g, lam, encoder.proj_global, encoder.proj_global)  # RUNA's Eq. 3, off the shelf
        out = scoring.score(scoring.cosine_similarities(emb, text_emb), method="max_cosine")
        unc[i] = float(np.asarray(out.uncertainty).reshape(-1)[0])
    return unc


def naive_b2_frame(encoder, preprocess, text_emb, image: np.ndarray, boxes: np.ndarray, lam: Optional[float] = None,
                   blur_radius: Optional[float] = None):
    """The paper-faithful per-box implementation (module docstring, ``naive-b2``); uncertainties ``[N]``.

    ``preprocess`` is open_clip's own eval transform (:func:`open_clip_preprocess`). Same geometry as
    the pipeline (the box's pixel block; squash; blur sigma in px at S x S), different resampling:
    PIL bicubic and PIL's box-filter approximation of a Gaussian instead of cv2's area resize and true
    Gaussian, so its scores equal the pipeline's only up to that (tests/test_bench.py).
    """
    import torch
    from PIL import Image, ImageFilter

    from ..core import scoring
    from ..core.boxes import pixel_bounds, sanitize_boxes

    lam = default("lam") if lam is None else lam
    blur_radius = default("blur_radius") if blur_radius is None else blur_radius
    H, W = image.shape[:2]
    S = encoder.input_size
    xyxy, status = sanitize_boxes(boxes, W, H)
    unc = np.full(len(xyxy), np.nan, np.float32)
    pil = Image.fromarray(image)
    model = encoder.model
    for i in np.flatnonzero(status == 0):
        x0, y0, x1, y1 = pixel_bounds(xyxy[i], W, H)
        crop = pil.crop((x0, y0, x1, y1))
        frame = pil.resize((S, S), Image.BICUBIC)
        glob = frame.filter(ImageFilter.GaussianBlur(blur_radius)) if blur_radius > 0 else frame.copy()
        b = xyxy[i]
        gx0, gy0, gx1, gy1 = pixel_bounds((b[0] * S / W, b[1] * S / H, b[2] * S / W, b[3] * S / H), S, S)
        glob.paste(frame.crop((gx0, gy0, gx1, gy1)), (gx0, gy0))
        views = torch.stack([preprocess(crop), preprocess(glob)])
        with torch.no_grad():
            e = model.encode_image(views).float()  # one batch-2 pass, projection included
        emb = lam * e[0:1] + (1.0 - lam) * e[1:2]
        emb = emb / emb.norm(dim=-1, keepdim=True)
        out = scoring.score(scoring.cosine_similarities(emb, text_emb), method="max_cosine")
        unc[i] = float(np.asarray(out.uncertainty).reshape(-1)[0])
    return unc


def open_clip_preprocess(encoder):
    """open_clip's own eval transform for this encoder, in squash mode (the views' geometry)."""
    from open_clip.transform import image_transform

    return image_transform(encoder.input_size, is_train=False, mean=encoder.mean, std=encoder.std,
                           resize_mode="squash", interpolation="bicubic")


def calibration_views(encoder, max_images: int = 16, annotations=None):
    """``backends.samples.calibration_views`` (the one implementation; imported when called, so that
    building the CLI's parser does not import torch)."""
    from ..backends.samples import calibration_views as views

    return views(encoder, max_images, annotations)


def available_variants(requested: str, cuda: bool) -> List[str]:
    if requested == "all":
        return CPU_VARIANTS + (GPU_VARIANTS if cuda else [])
    names = [v.strip() for v in requested.split(",") if v.strip()]
    unknown = set(names) - set(CPU_VARIANTS + GPU_VARIANTS)
    if unknown:
        raise ValueError(f"unknown variants {sorted(unknown)}; choose among {CPU_VARIANTS + GPU_VARIANTS}")
    return BASELINES + [n for n in names if n not in BASELINES]  # ratios are relative to both


VARIANT_SPECS = {  # kind, device, precision, int8, fused
    "torch": ("torch", "cpu", "fp32", False, False),
    "onnxruntime": ("onnxruntime", "cpu", "fp32", False, False),
    "onnxruntime-int8": ("onnxruntime", "cpu", "fp32", "dynamic", False),
    "onnxruntime-fused": ("onnxruntime", "cpu", "fp32", False, True),
    "onnxruntime-fused-int8": ("onnxruntime", "cpu", "fp32", "dynamic", True),
    "onnxruntime-int8-static": ("onnxruntime", "cpu", "fp32", "static", False),
    "torch-cuda": ("torch", "cuda", "fp32", False, False),
    "torch-cuda-fp16": ("torch", "cuda", "fp16", False, False),
    "onnxruntime-cuda": ("onnxruntime", "cuda", "fp32", False, False),
    "tensorrt": ("tensorrt", "cuda", "fp16", False, False),
}


def build_backend(variant: str, encoder, args, calib=None, threads=None, execution_mode: str = "sequential",
                  outputs: Sequence[str] = ("cls",)):
    """The VisualBackend of a batched variant serving ``outputs`` first (``calib``: the static int8
    calibration views, or a callable giving them)."""
    from ..backends.select import make_backend

    kind, device, precision, int8, fused = VARIANT_SPECS[variant]
    extra = {"outputs": tuple(outputs)}
    if kind == "onnxruntime":
        extra.update({"fused": fused, "ort_execution_mode": execution_mode})
        if int8 == "static":
            extra["calibration_views"] = calib() if callable(calib) else calib
    return make_backend(kind, encoder, device=device, precision=precision, int8=int8, cache_dir=args.cache_dir,
                        ort_threads=threads if threads is not None else args.ort_threads, **extra)


# ---------------------------------------------------------------------- roofline
# How close every variant is to what this CPU can do: the trunk's FLOPs per view (counted), this
# machine's fp32 and int8 GEMM peaks (measured in the same run, same thread settings as the
# variants), each variant's achieved GFLOP/s and the fastest a frame could be at the int8 peak.
VIEWS_PER_BOX = len(VIEWS_FOR_ABLATION["dual"])  # RUNA: crop + blurred global view (the variants bench RUNA)
PEAK_FP32_SIZE = 1536  # torch.mm on [n,n] x [n,n] float32 (about 50 ms a call on 2 Zen3 cores)
# int8 GEMM shape: ViT-B-32's MLP up-projection over a 10-box frame (20 views x 50 tokens, 768 -> 3072)
PEAK_INT8_SHAPE = (1000, 768, 3072)
# per peak: best of PEAK_REPEATS repeats of about PEAK_SECONDS / PEAK_REPEATS each; many short repeats
# so that one of them falls in a quiet moment of a shared machine
PEAK_SECONDS = 0.4
PEAK_REPEATS = 5
FLOP_COUNTER_NOTE = ("torch.utils.flop_counter.FlopCounterMode, a multiply-add = 2 FLOPs; matrix products only "
                     "(convolution, linear layers, attention's QK^T and AV), not layer norm / softmax / GELU / adds")


def count_view_flops(encoder, batch: int = 1) -> Dict[str, Any]:
    """FLOPs of ``encoder.visual_trunk`` (the tower without its projection: what every backend runs)
    for ``batch`` views at S x S, counted by ``FlopCounterMode`` (multiply-add = 2 FLOPs).

    Counted with autograd on and SDPA's math kernel: in inference mode PyTorch takes fused paths the
    counter has no formula for (``_native_multi_head_attention`` hides the attention's in/out
    projections, ``_scaled_dot_product_flash_attention_for_cpu`` its QK^T and AV products) and
    would undercount. Returns ``{"flops", "batch", "by_op", "projection_flops"}`` (the projection,
    ``width x embed_dim`` per view, is applied outside the trunk and not included in ``flops``).
    """
    import contextlib

    import torch
    from torch.utils.flop_counter import FlopCounterMode

    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        math_sdpa = sdpa_kernel([SDPBackend.MATH])
    except ImportError:  # pragma: no cover - torch < 2.3
        math_sdpa = contextlib.nullcontext()
    trunk = encoder.visual_trunk
    p = next(trunk.parameters())
    x = torch.zeros((batch, 3, encoder.input_size, encoder.input_size), dtype=p.dtype, device=p.device)
    counter = FlopCounterMode(display=False)
    with torch.enable_grad(), math_sdpa, counter:
        trunk(x)
    by_op = {str(k): int(v) for k, v in counter.get_flop_counts().get("Global", {}).items()}
    return {"flops": int(counter.get_total_flops()), "batch": int(batch), "by_op": by_op,
            "projection_flops": 2 * int(encoder.width) * int(encoder.embed_dim) * int(batch)}


def _best_rate(fn, flops: float, seconds: float = PEAK_SECONDS, repeats: int = PEAK_REPEATS) -> Dict[str, Any]:
    """Call ``fn`` (one warm-up call), then ``repeats`` timed repeats of k calls each (k sized so a
    repeat lasts about ``seconds / repeats``); the best repeat's time per call -> GFLOP/s."""
    t0 = time.perf_counter()
    fn()
    first = max(time.perf_counter() - t0, 1e-6)
    k = max(1, int(round(seconds / repeats / first)))
    best = float("inf")
    for _ in range(max(1, repeats)):
        t0 = time.perf_counter()
        for _ in range(k):
            fn()
        best = min(best, (time.perf_counter() - t0) / k)
    return {"gflops": flops / best / 1e9, "ms_per_call": best * 1e3, "calls_per_repeat": k,
            "repeats": int(repeats)}


def _matmul_onnx(K: int, N: int, seed: int = 0):
    """In-memory fp32 ONNX graph ``features = views [M,K] @ W [K,N] + b`` (M dynamic), built with
    ``onnx.helper``; input / output named as the trunk's so :class:`OrtBackend` opens it."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from ..backends.engine_cache import INPUT_NAME, OUTPUT_NAME

    rng = np.random.default_rng(seed)
    w = numpy_helper.from_array((rng.standard_normal((K, N)) * K ** -0.5).astype(np.float32), "W")
    b = numpy_helper.from_array((rng.standard_normal(N) * 0.01).astype(np.float32), "b")
    graph = helper.make_graph(
        [helper.make_node("MatMul", [INPUT_NAME, "W"], ["mm"]), helper.make_node("Add", ["mm", "b"], [OUTPUT_NAME])],
        "roofline_matmul", [helper.make_tensor_value_info(INPUT_NAME, TensorProto.FLOAT, ["M", K])],
        [helper.make_tensor_value_info(OUTPUT_NAME, TensorProto.FLOAT, ["M", N])], [w, b])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = min(model.ir_version, 9)
    onnx.checker.check_model(model)
    return model


def _quantize_like_the_int8_variants(src: pathlib.Path, dst: pathlib.Path) -> None:
    """Dynamic int8 by the int8 variants' own quantisation (:func:`ort_backend.quantize_dynamic_file`,
    without :func:`ort_backend.quantize_int8`'s cache sidecar and counters). A MatMul becomes
    DynamicQuantizeLinear (uint8 activations) -> MatMulInteger (uint8 x int8) -> Cast -> Mul, which
    ORT's optimiser fuses into DynamicQuantizeMatMul."""
    from ..backends.ort_backend import quantize_dynamic_file

    root = logging.getLogger()
    level = root.level
    root.setLevel(max(level, logging.ERROR))  # quantize_dynamic's "consider pre-processing" advice
    try:
        quantize_dynamic_file(src, dst)
    finally:
        root.setLevel(level)


def measure_peaks(ort_threads: Optional[int] = None, fp32_size: int = PEAK_FP32_SIZE,
                  int8_shape: Tuple[int, int, int] = PEAK_INT8_SHAPE, seconds: float = PEAK_SECONDS,
                  repeats: int = PEAK_REPEATS) -> Dict[str, Any]:
    """This machine's GEMM peaks, measured now with the variants' thread settings.

    * ``fp32``: ``torch.mm`` on ``[n,n] x [n,n]`` float32 (torch's own thread count, as the torch
      variants run), 2 n^3 / time.
    * ``int8``: ONNX Runtime running a MatMul ``[M,K] x [K,N]`` dynamically quantised like the int8
      variants (:func:`_quantize_like_the_int8_variants`), in an :class:`OrtBackend` session (the
      variants' session options: ``ort_threads``, sequential, no spinning), on random float32
      activations; effective 2 M N K / time, the activations' on-the-fly quantisation included.
    * ``fp32_ort_matmul``: the same graph unquantised, for reference (ONNX Runtime's fp32 MatMul).

    Each: ``{"gflops", "ms_per_call", "calls_per_repeat", "repeats", "shape", "threads", "what"}``,
    or ``{"error": ...}`` when it could not run. Plus ``"int8_ops"``: the quantised graph's ops.
    """
    import tempfile

    import torch

    out: Dict[str, Any] = {}
    threads = torch.get_num_threads()
    try:
        a = torch.randn(fp32_size, fp32_size)
        b = torch.randn(fp32_size, fp32_size)
        c = torch.empty(fp32_size, fp32_size)
        with torch.no_grad():
            r = _best_rate(lambda: torch.mm(a, b, out=c), 2.0 * fp32_size ** 3, seconds, repeats)
        out["fp32"] = {**r, "shape": [fp32_size, fp32_size, fp32_size], "threads": threads,
                       "what": f"torch.mm float32 {fp32_size}x{fp32_size} @ {fp32_size}x{fp32_size}"}
    except Exception as exc:  # pragma: no cover - a torch without BLAS
        out["fp32"] = {"error": f"{type(exc).__name__}: {exc}"}

    M, K, N = (int(d) for d in int8_shape)
    x = np.random.default_rng(1).standard_normal((M, K)).astype(np.float32)
    try:
        import onnx

        from ..backends.engine_cache import INPUT_NAME, OUTPUT_NAME
        from ..backends.ort_backend import OrtBackend

        with tempfile.TemporaryDirectory(prefix="runa_roofline_") as d:
            fp32_path = pathlib.Path(d) / "matmul.onnx"
            int8_path = pathlib.Path(d) / "matmul-int8dyn.onnx"
            onnx.save(_matmul_onnx(K, N), str(fp32_path))
            _quantize_like_the_int8_variants(fp32_path, int8_path)
            out["int8_ops"] = [n.op_type for n in onnx.load(str(int8_path)).graph.node]
            for key, path, what in (("int8", int8_path, "ONNX Runtime dynamic int8 MatMul (quantize_dynamic as the "
                                                       "int8 variants: u8 activations x s8 weights, per channel)"),
                                    ("fp32_ort_matmul", fp32_path, "ONNX Runtime fp32 MatMul")):
                be = OrtBackend(path, input_size=0, width=N, threads=ort_threads)
                sess = be.session
                r = _best_rate(lambda: sess.run([OUTPUT_NAME], {INPUT_NAME: x}), 2.0 * M * N * K, seconds, repeats)
                out[key] = {**r, "shape": [M, K, N], "threads": ort_threads, "what": f"{what} {M}x{K} @ {K}x{N}"}
                del be, sess
    except Exception as exc:
        LOG.warning("roofline: ONNX Runtime GEMM peaks not measured: %s: %s", type(exc).__name__, exc)
        for key in ("int8", "fp32_ort_matmul"):
            out.setdefault(key, {"error": f"{type(exc).__name__}: {exc}"})
    out["torch_threads"] = threads
    out["ort_threads"] = ort_threads
    out["ort_threads_note"] = "None = ONNX Runtime's default (all physical cores), as the variants"
    return out


def _peak_class(variant: str) -> Optional[str]:
    """Which peak bounds a variant: ``"int8"`` for the int8 graphs, ``"fp32"`` for the other CPU
    variants and both baselines (torch fp32), None for GPU variants (no GPU peak measured)."""
    if variant in BASELINES:
        return "fp32"
    kind, device, precision, int8, fused = VARIANT_SPECS[variant]
    if device != "cpu":
        return None
    return "int8" if int8 else "fp32"


def roofline_section(sec: Dict[str, Any], work: Dict[str, Any], peaks: Dict[str, Any],
                     box_counts: Sequence[int]) -> Dict[str, Any]:
    """A model's roofline from its results, its trunk FLOPs (:func:`count_view_flops`) and the
    machine's peaks (:func:`measure_peaks`).

    Keys: ``gflop_per_view`` (batch-1 trunk FLOPs / 1e9), ``flops_per_view``, ``multiply_add_flops``
    (2), ``views_per_box``, ``flop_counter``, ``by_op``, ``peaks_gflops`` ({fp32, int8}), ``variants``
    ({variant: {box count: {peak, gflop_per_frame, achieved_gflops, peak_gflops, fraction_of_peak}}}:
    frame FLOPs / frame p50, preprocessing and scoring included in the time), ``ceiling`` and
    ``fp32_ceiling`` ({box count: {ms, speedup_vs_naive_p50, speedup_vs_naive_b2_p50}}: every FLOP
    of the frame at the int8 / fp32 GEMM peak), ``best_cpu_fraction_of_ceiling`` (ceiling ms /
    best CPU variant's p50 at the ratio box count) and ``goal_reachable`` (the ceiling's speed-ups
    at 10 boxes against the goals, None without 10 boxes or an int8 peak).
    """
    gflop_view = work["flops"] / work["batch"] / 1e9
    pk = {c: (peaks.get(c) or {}).get("gflops") for c in ("fp32", "int8")}
    res = sec["results"]
    variants: Dict[str, Dict[str, Any]] = {}
    for v in sec["variants"]:
        cls = _peak_class(v)
        variants[v] = {}
        for n in box_counts:
            g = VIEWS_PER_BOX * n * gflop_view
            achieved = g / (res[v][str(n)]["p50_ms"] / 1e3)
            peak = pk.get(cls) if cls else None
            variants[v][str(n)] = {"peak": cls, "gflop_per_frame": g, "achieved_gflops": achieved,
                                   "peak_gflops": peak, "fraction_of_peak": achieved / peak if peak else None}

    def ceiling(peak):
        if not peak:
            return None
        out = {}
        for n in box_counts:
            ms = VIEWS_PER_BOX * n * gflop_view / peak * 1e3
            out[str(n)] = {"ms": ms, "speedup_vs_naive_p50": res["naive"][str(n)]["p50_ms"] / ms,
                           "speedup_vs_naive_b2_p50": res["naive-b2"][str(n)]["p50_ms"] / ms}
        return out

    ceil = ceiling(pk["int8"])
    ref = sec["best_cpu"]
    frac = None
    if ceil and ref.get("variant"):
        frac = ceil[str(ref["box_count"])]["ms"] / res[ref["variant"]][str(ref["box_count"])]["p50_ms"]
    reach = None
    if ceil and "10" in ceil:
        reach = {"ge_4x_naive_at_10_boxes": ceil["10"]["speedup_vs_naive_p50"] >= 4.0,
                 "ge_3x_naive_b2_at_10_boxes": ceil["10"]["speedup_vs_naive_b2_p50"] >= 3.0}
    return {"gflop_per_view": gflop_view, "flops_per_view": work["flops"] / work["batch"], "multiply_add_flops": 2,
            "views_per_box": VIEWS_PER_BOX, "flop_counter": FLOP_COUNTER_NOTE, "by_op": work["by_op"],
            "projection_flops_per_view": work["projection_flops"] / work["batch"],
            "peaks_gflops": pk, "variants": variants, "ceiling": ceil, "fp32_ceiling": ceiling(pk["fp32"]),
            "best_cpu_fraction_of_ceiling": frac, "goal_reachable": reach}


# ---------------------------------------------------------------------- main
def parse_models(model_arg: str, pretrained_arg: str) -> List[Tuple[str, Optional[str]]]:
    """``--model A,B`` and ``--pretrained`` (one value for every model, or one per model) ->
    ``[(model, pretrained or None), ...]`` in order, duplicates removed. ValueError on bad lists."""
    from .common import _pretrained_arg

    models: List[str] = []
    for m in str(model_arg).split(","):
        m = m.strip()
        if m and m not in models:
            models.append(m)
    if not models:
        raise ValueError(f"--model needs at least one model name, got {model_arg!r}")
    tags = [t.strip() for t in str(pretrained_arg).split(",")]
    if len(tags) == 1:
        tags = tags * len(models)
    if len(tags) != len(models):
        raise ValueError(f"--pretrained has {len(tags)} values for {len(models)} models; give one, or one per model")
    return [(m, _pretrained_arg(t)) for m, t in zip(models, tags)]


def run(args) -> int:
    from .common import banner, setup_logging, write_json

    setup_logging(args)
    import torch

    from ..backends.base import cuda_available
    from ..core.encoder import DualEncoder, WeightsUnavailableError

    try:
        box_counts = [int(b) for b in str(args.boxes).split(",") if b.strip()]
        if not box_counts or min(box_counts) < 1:
            raise ValueError
    except ValueError:
        print(f"error: --boxes must be positive integers, got {args.boxes!r}", file=sys.stderr)
        return 2
    if args.rounds < 1 or args.repeats < 1 or args.warmup < 0:
        print("error: --rounds and --repeats must be >= 1, --warmup >= 0", file=sys.stderr)
        return 2
    cuda = cuda_available()
    try:
        variants = available_variants(args.variants, cuda)
        models = parse_models(args.model, args.pretrained)
        methods = parse_methods(getattr(args, "method", DEFAULT_METHOD))
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    # load every model first: a typo in the second name must not cost the first model's run
    encoders = {}
    for name, pretrained in models:
        try:
            encoders[name] = DualEncoder.load(name, pretrained=pretrained, device="cpu",
                                              allow_random=pretrained is None)  # random = seeded
        except (WeightsUnavailableError, ValueError, RuntimeError) as exc:
            print(f"error: cannot load {name!r}: {exc}", file=sys.stderr)
            return 2
    random_models = [n for n, e in encoders.items() if e.random_weights]
    if random_models:
        banner([f"{', '.join(random_models)}: RANDOM weights. Latency and throughput do not depend on weight "
                "values; scores and embeddings' meaning do: this run measures speed only."])

    image, ann_boxes, photo = load_photo(args.image, args.annotations)
    H, W = image.shape[:2]
    sections: Dict[str, Dict[str, Any]] = {}
    roofline = getattr(args, "roofline", True)
    work: Dict[str, Optional[Dict[str, Any]]] = {}
    for name, _ in models:
        encoder = encoders.pop(name)
        work[name] = None
        if roofline:
            try:
                work[name] = count_view_flops(encoder)
            except Exception as exc:  # the roofline must not cost the benchmark
                LOG.warning("%s: FLOPs not counted, no roofline: %s: %s", name, type(exc).__name__, exc)
        sections[name] = bench_model(encoder, variants, box_counts, image, ann_boxes, args, cuda)
        if methods != [DEFAULT_METHOD]:
            sections[name]["methods"] = bench_methods(encoder, methods, box_counts, image, ann_boxes, args, cuda,
                                                      sections[name]["results"])
        del encoder
    peaks = None
    if roofline:  # after the timed variants: the peaks' bursts do not precede any variant's frames
        t0 = time.perf_counter()
        peaks = measure_peaks(args.ort_threads)
        LOG.info("roofline: peaks measured in %.1f s", time.perf_counter() - t0)
    for name, sec in sections.items():
        sec["roofline"] = roofline_section(sec, work[name], peaks, box_counts) if peaks and work[name] else None
        if sec.get("methods"):
            sec["methods"]["roofline"] = methods_roofline(sec["methods"], peaks) if peaks else None
    ref_n = 10 if 10 in box_counts else box_counts[len(box_counts) // 2]
    report = {
        "models": [m for m, _ in models],
        "random_weights": bool(random_models),
        "note": ("RANDOM weights: speed only, the same cost as real weights" if random_models else ""),
        "photo": {**photo, "width": W, "height": H},
        "box_counts": box_counts, "rounds": args.rounds, "repeats": args.repeats, "warmup": args.warmup,
        "ratio_box_count": ref_n,
        "per_model": sections,
        "roofline": None if peaks is None else {"peaks": peaks, "flop_counter": FLOP_COUNTER_NOTE,
                                                "views_per_box": VIEWS_PER_BOX},
        "machine": {"cpu_count": os.cpu_count(), "cpu": _cpu(), "torch_threads": torch.get_num_threads(), "cuda": cuda,
                    "gpu": torch.cuda.get_device_name(0) if cuda else None, "python": platform.python_version(),
                    "torch": torch.__version__},
    }
    cpu = report["machine"]["cpu"] or {}
    print(f"CPU: {cpu.get('model', platform.processor())}, {report['machine']['cpu_count']} logical CPUs, "
          f"SIMD {' '.join(cpu.get('simd', []))}")
    for name in report["models"]:
        _print_table(report, name)
        if report["per_model"][name].get("methods"):
            _print_methods(report["per_model"][name]["methods"], name)
    _print_summary(report)
    if report["roofline"]:
        _print_roofline(report)
    if args.json_path:
        path = write_json(args.json_path, report)
        print(f"wrote {path}")
    return 0


def _cpu() -> Optional[Dict[str, Any]]:
    """This CPU as ``backend: auto`` records it (model name, SIMD flags, ONNX Runtime version)."""
    try:
        from ..backends.ort_backend import cpu_identity

        return cpu_identity()
    except ImportError:  # pragma: no cover - without onnxruntime
        return None


def bench_model(encoder, variants: Sequence[str], box_counts: Sequence[int], image: np.ndarray,
                ann_boxes: np.ndarray, args, cuda: bool) -> Dict[str, Any]:
    """Benchmark one model's variants on one photograph; returns its report section.

    Section keys: ``model``, ``random_weights``, ``variants`` (those that ran, the two baselines
    ``naive`` and ``naive-b2`` first), ``backends`` (describe() of each), ``skipped`` ({variant:
    reason}), ``results`` ({variant: {box count: percentiles, boxes_per_s, speedup_vs_naive_p50,
    speedup_vs_naive_b2_p50}}), ``fidelity`` (``<variant>_vs_torch_fp32``: cosines on real crops),
    ``ratio_vs_naive`` / ``ratio_vs_naive_b2`` ({variant: baseline p50 / variant p50} at
    ``ratio_box_count``), ``best``, ``thread_sweep`` and ``goals``.
    """
    import torch

    from ..backends.base import describe_model
    from ..backends.ort_backend import embedding_fidelity
    from ..backends.torch_backend import TorchBackend
    from ..core.config import ScorerConfig
    from ..core.views import ViewMaker
    from ..factory import build_scorer

    model = encoder.model_name
    scorer = build_scorer(ScorerConfig(model=model, label_set=args.labels, views="cpu", backend="torch"),
                          encoder=encoder)
    view_maker = ViewMaker(encoder.input_size, encoder.mean, encoder.std, 1.0)
    preprocess = open_clip_preprocess(encoder)
    calib_cache: Dict[str, Any] = {}

    def calib():
        if "views" not in calib_cache:
            calib_cache["views"], calib_cache["source"] = calibration_views(encoder, args.calibration_images,
                                                                            args.annotations)
            LOG.info("%s: static int8 calibration on %s", model, calib_cache["source"])
        return calib_cache["views"]

    backends: Dict[str, Any] = {}
    skipped: Dict[str, str] = {}
    for v in variants:
        if v in BASELINES:
            continue
        try:
            t0 = time.perf_counter()
            backends[v] = build_backend(v, encoder, args, calib)
            LOG.info("%s: variant %s ready in %.1f s (%s)", model, v, time.perf_counter() - t0, backends[v].describe())
        except Exception as exc:
            skipped[v] = f"{type(exc).__name__}: {exc}"
            LOG.warning("%s: variant %s skipped: %s", model, v, skipped[v])
    variants = [v for v in variants if v in BASELINES or v in backends]

    def run_frame(v: str, boxes: np.ndarray, backend=None) -> float:
        t0 = time.perf_counter()
        if v == "naive":
            encoder.set_backend(None)
            naive_frame(encoder, view_maker, scorer.text_emb, image, boxes)
        elif v == "naive-b2":
            encoder.set_backend(None)
            naive_b2_frame(encoder, preprocess, scorer.text_emb, image, boxes)
        else:
            encoder.set_backend(backend or backends[v], v)
            res = scorer.score(image, boxes)
            if res.error:
                raise RuntimeError(res.error)
        if cuda:
            torch.cuda.synchronize()
        return (time.perf_counter() - t0) * 1e3

    # fidelity on real crops of this photograph (before timing, also a correctness check)
    fid_boxes = cycle_boxes(ann_boxes, max(len(ann_boxes), 8))
    reg, glo = view_maker.make(image, fid_boxes)
    fid_views = torch.cat([reg, glo], 0)
    encoder.set_backend(None)
    torch_ref = TorchBackend(describe_model(encoder))
    fidelity = {}
    for v, be in backends.items():
        if v == "torch":
            continue
        try:
            fidelity[f"{v}_vs_torch_fp32"] = embedding_fidelity(torch_ref, be, fid_views, encoder.proj_global)
        except Exception as exc:
            fidelity[f"{v}_vs_torch_fp32"] = {"error": f"{type(exc).__name__}: {exc}"}
    if "onnxruntime" in backends and "onnxruntime-int8" in backends:
        fidelity["onnxruntime-int8_vs_onnxruntime_fp32"] = embedding_fidelity(
            backends["onnxruntime"], backends["onnxruntime-int8"], fid_views, encoder.proj_global)

    frames = {n: cycle_boxes(ann_boxes, n) for n in box_counts}
    samples = interleaved(run_frame, variants, frames, args, f"bench {model}")
    encoder.set_backend(None)

    results: Dict[str, Dict[str, Any]] = {}
    for v in variants:
        results[v] = {}
        for n in box_counts:
            st = percentiles(samples[v][n])
            st["boxes_per_s"] = n / (st["p50_ms"] / 1e3)
            results[v][str(n)] = st
    for v in variants:
        for n in box_counts:
            r = results[v][str(n)]
            r["speedup_vs_naive_p50"] = results["naive"][str(n)]["p50_ms"] / r["p50_ms"]
            r["speedup_vs_naive_b2_p50"] = results["naive-b2"][str(n)]["p50_ms"] / r["p50_ms"]
    ref_n = 10 if 10 in box_counts else box_counts[len(box_counts) // 2]
    batched = [v for v in variants if v not in BASELINES]
    cpu_batched = [v for v in batched if VARIANT_SPECS[v][1] == "cpu"]
    best = min(batched, key=lambda v: results[v][str(ref_n)]["p50_ms"]) if batched else None
    best_cpu = min(cpu_batched, key=lambda v: results[v][str(ref_n)]["p50_ms"]) if cpu_batched else None

    sweep = None
    ort_vs = [v for v in cpu_batched if VARIANT_SPECS[v][0] == "onnxruntime"]
    if getattr(args, "thread_sweep", True) and ort_vs:
        sweep_v = min(ort_vs, key=lambda v: results[v][str(ref_n)]["p50_ms"])
        sweep = thread_sweep(sweep_v, encoder, args, calib, run_frame, frames[ref_n], ref_n)

    int8_cos = fidelity.get("onnxruntime-int8_vs_onnxruntime_fp32", {}).get("embedding_cos_min")
    fid_ok = {k.replace("_vs_torch_fp32", ""): (f.get("embedding_cos_min", -1.0) >= FIDELITY_GOAL)
              for k, f in fidelity.items() if k.endswith("_vs_torch_fp32") and "error" not in f}

    def ratio(v, base):
        return results[v][str(ref_n)][f"speedup_vs_{base.replace('-', '_')}_p50"] if v else None

    return {
        "model": model,
        "random_weights": bool(encoder.random_weights),
        "variants": variants,
        "backends": {v: be.describe() for v, be in backends.items()},
        "skipped": skipped,
        "results": results,
        "fidelity": fidelity,
        "fidelity_goal": FIDELITY_GOAL,
        "calibration": calib_cache.get("source"),
        "ratio_vs_naive": {v: ratio(v, "naive") for v in batched},
        "ratio_vs_naive_b2": {v: ratio(v, "naive-b2") for v in batched},
        "best": {"box_count": ref_n, "variant": best, "speedup_vs_naive_p50": ratio(best, "naive"),
                 "speedup_vs_naive_b2_p50": ratio(best, "naive-b2")},
        "best_cpu": {"box_count": ref_n, "variant": best_cpu, "speedup_vs_naive_p50": ratio(best_cpu, "naive"),
                     "speedup_vs_naive_b2_p50": ratio(best_cpu, "naive-b2")},
        "thread_sweep": sweep,
        "goals": {"best_speedup_at_10_boxes_ge_3x": (None if best is None or ref_n != 10
                                                     else results[best]["10"]["speedup_vs_naive_p50"] >= 3.0),
                  "best_cpu_ge_4x_naive_at_10_boxes": (None if best_cpu is None or ref_n != 10
                                                       else ratio(best_cpu, "naive") >= 4.0),
                  "best_cpu_ge_3x_naive_b2_at_10_boxes": (None if best_cpu is None or ref_n != 10
                                                          else ratio(best_cpu, "naive-b2") >= 3.0),
                  "embedding_cos_min_ge_0.999": fid_ok,
                  "int8_embedding_cos_min_ge_0.99": None if int8_cos is None else int8_cos >= 0.99},
    }


def parse_methods(arg: str) -> List[str]:
    """``--method``: ``all`` or a comma list of ``core.registry.METHODS`` -> the list, RUNA first (the
    reference). ValueError for an unknown name."""
    names = list(METHODS) if str(arg).strip() == "all" else [m.strip() for m in str(arg).split(",") if m.strip()]
    unknown = [m for m in names if m not in METHODS]
    if unknown or not names:
        raise ValueError(f"unknown --method {unknown or arg!r}; choose among {list(METHODS)} or 'all'")
    return [DEFAULT_METHOD] + [m for m in dict.fromkeys(names) if m != DEFAULT_METHOD]


def trunk_passes(method, n_boxes: int) -> int:
    """Views through the trunk per frame of ``n_boxes`` boxes: per-box views once per box, per-image once."""
    return sum(1 if v in PER_IMAGE_VIEWS else int(n_boxes) for v in method.views_for("dual"))


def _untrained_head(scorer, image: np.ndarray, boxes: np.ndarray):
    """A head of the scorer's method with 0 training epochs (its initial weights): the cost of a trained
    head, meaningless scores (benchmarks only)."""
    import torch

    from ..core.methods.heads import Head

    feats = scorer.encode(image, boxes, views=scorer.method.fit_views)
    ok = np.flatnonzero(feats.status == 0)
    y = torch.arange(ok.size) % len(scorer.label_set)
    state, _, hyper = scorer.method.fit(feats.rows(ok), y, scorer.text_emb, epochs=0)
    return Head(scorer.method.name, state, {"hyper": hyper}, f"untrained {scorer.method.name} head (bench)")


#: the issue's goals of the methods table (frame p50 of each method's best CPU backend)
METHOD_GOALS = {"tagood_best_le_1/10_of_runa_best_at_10_boxes": ("tagood", 10, 1 / 10),
                "tagood_best_le_1/30_of_runa_best_at_50_boxes": ("tagood", 50, 1 / 30),
                "uni-ood_best_le_1.5x_runa_best_at_10_boxes": ("uni-ood", 10, 1.5),
                "uni-ood_best_le_1.5x_runa_best_at_50_boxes": ("uni-ood", 50, 1.5)}
AUTO_WITHIN = 1.10  # auto's frame p50 within 10 % of the hand-picked best of the same method


def model_config(encoder) -> Dict[str, Any]:
    """The trunk's shape from the model config (open_clip's ``vision_cfg`` of the model name, the
    built tower's attributes where the config is silent): image size S, patch p, width W, layers L,
    MLP width, grid G and tokens T = 1 + G^2."""
    visual = encoder.model.visual
    try:
        import open_clip

        vc = dict((open_clip.get_model_config(encoder.model_name) or {}).get("vision_cfg") or {})
    except Exception:  # pragma: no cover - a model open_clip does not list
        vc = {}
    S = int(vc.get("image_size", encoder.input_size))
    p = int(vc.get("patch_size", visual.conv1.kernel_size[0]))
    W = int(vc.get("width", visual.transformer.width))
    L = int(vc.get("layers", len(visual.transformer.resblocks)))
    mlp = int(W * float(vc.get("mlp_ratio", 4.0)))
    G = S // p
    return {"image_size": S, "patch_size": p, "width": W, "layers": L, "mlp_width": mlp, "grid": G, "tokens": 1 + G * G}


def trunk_flops_per_call(cfg: Dict[str, Any], outputs: Sequence[str], views: int, pairs: int = 0) -> int:
    """FLOPs (multiply-add = 2, matrix products only, as :data:`FLOP_COUNTER_NOTE`) of one backbone call
    of ``views`` views and ``pairs`` xattn pairs for the output set ``outputs``, from :func:`model_config`.

    Per view: the patch embedding ``2 G^2 (3 p^2) W``; per block ``2T W 3W`` (q, k, v) + ``2T W W``
    (out) + ``2 * 2 T^2 W`` (QK^T, AV) + ``2 * 2 T W M`` (MLP), all L blocks when ``cls`` / ``tokens``
    are asked for, L-1 otherwise (the last block only feeds them). Attention outputs
    (``core.backbone``) add per block and view the CLS query ``2 W^2`` and the keys ``2 T W^2``,
    ``attn_cls`` its scores ``2 T W``, and ``xattn`` ``2 T W`` per pair and block."""
    S, p, W, L, M, G, T = (cfg[k] for k in ("image_size", "patch_size", "width", "layers", "mlp_width", "grid",
                                            "tokens"))
    names = set(outputs)
    block = 2 * T * W * 3 * W + 2 * T * W * W + 4 * T * T * W + 4 * T * W * M
    blocks = L if names & {"cls", "tokens"} else L - 1
    per_view = 2 * G * G * 3 * p * p * W + blocks * block
    if names & {"attn_cls", "xattn"}:
        per_view += L * (2 * W * W + 2 * T * W * W)
    if "attn_cls" in names:
        per_view += L * 2 * T * W
    per_pair = L * 2 * T * W if "xattn" in names else 0
    return int(views) * per_view + int(pairs) * per_pair


def frame_calls(method, n_boxes: int) -> Tuple[int, int]:
    """``(views, pairs)`` of one frame's backbone call with ``n_boxes`` boxes (every box kept)."""
    views = method.views_for("dual")
    return trunk_passes(method, n_boxes), len(method.pairs(views)) * int(n_boxes)


def bench_methods(encoder, methods: Sequence[str], box_counts: Sequence[int], image: np.ndarray,
                  ann_boxes: np.ndarray, args, cuda: bool, baselines: Dict[str, Any]) -> Dict[str, Any]:
    """Every method on every CPU backend (:data:`METHOD_BACKENDS`, ``--method-backends``), one
    interleaved run over all (method, backend) rows and box counts (see the module docstring).

    Each method's ONNX Runtime variants serve its own output set (one graph per set); its static
    int8 graph is calibrated on its own views (``samples.method_sample``: the calls its scorer makes
    on real photographs), and the same sample gives each backend's fidelity to torch fp32
    (``ort_backend.output_fidelity``: embedding cosine of cls / tokens, attention max |delta|).
    ``auto`` is ``backend: auto`` as the node builds it: its record of this model and output set is
    removed first (``--auto-recorded`` keeps it), so it measures the cached variants now and picks.

    Returns ``{"backends", "methods", "results": {method: {backend: {box count: percentiles,
    trunk_passes, pairs, gflop_per_frame}}}, "fidelity", "best", "auto", "goals", "untrained_heads",
    "skipped", "sample"}``; ``baselines`` are :func:`bench_model`'s results (the naive loops)."""
    import torch

    from ..backends.select import make_backend
    from ..backends.ort_backend import auto_record_path, output_fidelity
    from ..backends.samples import method_sample
    from ..core.pipeline import OodScorer

    encoder.set_backend(None)
    wanted = METHOD_BACKENDS if getattr(args, "method_backends", "all") == "all" else \
        [b.strip() for b in str(args.method_backends).split(",") if b.strip()]
    scorers, untrained, samples = {}, [], {}
    for m in methods:
        sc = OodScorer(encoder, args.labels, method=m)
        if sc.method.needs_head:
            sc.method.set_head(_untrained_head(sc, image, cycle_boxes(ann_boxes, 4)))
            untrained.append(m)
        scorers[m] = sc
        samples[m] = method_sample(sc, max_images=args.calibration_images, annotations=args.annotations)
    cfg = model_config(encoder)
    backends: Dict[Tuple[str, str], Any] = {}
    skipped: Dict[str, str] = {}
    fidelity: Dict[str, Dict[str, Any]] = {m: {} for m in methods}
    auto_info: Dict[str, Dict[str, Any]] = {}
    for m in methods:
        outs = tuple(scorers[m].method.outputs)
        check = samples[m].head(4)
        ref = None
        for b in wanted:
            t0 = time.perf_counter()
            try:
                if b == "torch":
                    be = None
                elif b == "auto":
                    rec = auto_record_path(encoder.model_id, args.cache_dir, outs)
                    if not getattr(args, "auto_recorded", False) and rec.is_file():
                        rec.unlink()
                    be = make_backend("auto", encoder, cache_dir=args.cache_dir, ort_threads=args.ort_threads,
                                      outputs=outs, auto_sample=lambda m=m: samples[m])
                    auto_info[m] = {"variant": be.variant, "reason": be.variant_reason, "detail": be.variant_detail,
                                    "backend": be.name}
                else:
                    be = build_backend(b, encoder, args, samples[m].views, outputs=outs)
            except Exception as exc:
                skipped[f"{m}/{b}"] = f"{type(exc).__name__}: {exc}"
                LOG.warning("%s: %s on %s skipped: %s", encoder.model_name, m, b, skipped[f"{m}/{b}"])
                continue
            backends[(m, b)] = be
            LOG.info("%s: %s on %s ready in %.1f s", encoder.model_name, m, b, time.perf_counter() - t0)
            with torch.no_grad():
                out = (be.outputs if be is not None else encoder.visual_outputs)(check.views, outs,
                                                                                  check.pairs)
            if ref is None and b == "torch":
                ref = out
            if ref is not None:
                fidelity[m][b] = output_fidelity(ref, out, encoder.proj_global)
    encoder.set_backend(None)
    rows = [(m, b) for m in methods for b in wanted if (m, b) in backends]
    frames = {n: cycle_boxes(ann_boxes, n) for n in box_counts}

    def run_frame(key: str, boxes: np.ndarray) -> float:
        m, b = key.split("|")
        be = backends[(m, b)]
        encoder.set_backend(be, None if be is None else be.name)
        t0 = time.perf_counter()
        res = scorers[m].score(image, boxes)
        if res.error:
            raise RuntimeError(f"{m} on {b}: {res.error}")
        if cuda:
            torch.cuda.synchronize()
        return (time.perf_counter() - t0) * 1e3

    samples_ms = interleaved(run_frame, [f"{m}|{b}" for m, b in rows], frames, args,
                             f"methods x backends {encoder.model_name}")
    encoder.set_backend(None)
    results: Dict[str, Dict[str, Any]] = {m: {} for m in methods}
    for m, b in rows:
        results[m][b] = {}
        for n in box_counts:
            st = percentiles(samples_ms[f"{m}|{b}"][n])
            views, pairs = frame_calls(scorers[m].method, n)
            st.update({"trunk_passes": views, "pairs": pairs,
                       "gflop_per_frame": trunk_flops_per_call(cfg, scorers[m].method.outputs, views, pairs) / 1e9})
            for base in BASELINES:
                st[f"speedup_vs_{base.replace('-', '_')}_p50"] = baselines[base][str(n)]["p50_ms"] / st["p50_ms"]
            results[m][b][str(n)] = st
    best: Dict[str, Dict[str, Any]] = {}
    for m in methods:
        best[m] = {}
        for n in box_counts:
            hand = [b for b in results[m] if b != "auto"]
            if hand:
                bb = min(hand, key=lambda b: results[m][b][str(n)]["p50_ms"])
                best[m][str(n)] = {"backend": bb, "p50_ms": results[m][bb][str(n)]["p50_ms"]}
    for m in methods:
        for b in results[m]:
            for n in box_counts:
                r = results[m][b][str(n)]
                ref = best.get(DEFAULT_METHOD, {}).get(str(n))
                r["vs_runa_best"] = r["p50_ms"] / ref["p50_ms"] if ref else None
        if m in auto_info and "auto" in results[m]:
            auto_info[m]["vs_best"] = {str(n): results[m]["auto"][str(n)]["p50_ms"] / best[m][str(n)]["p50_ms"]
                                       for n in box_counts if str(n) in best[m]}
    goals: Dict[str, Optional[bool]] = {}
    for goal, (m, n, bound) in METHOD_GOALS.items():
        if m in best and DEFAULT_METHOD in best and str(n) in best[m] and str(n) in best[DEFAULT_METHOD]:
            goals[goal] = best[m][str(n)]["p50_ms"] <= bound * best[DEFAULT_METHOD][str(n)]["p50_ms"]
    for m, a in auto_info.items():
        if a.get("vs_best"):
            goals[f"{m}_auto_within_10%_of_best"] = all(r <= AUTO_WITHIN for r in a["vs_best"].values())
    return {"backends": wanted, "methods": list(methods), "results": results, "fidelity": fidelity, "best": best,
            "auto": auto_info, "goals": goals, "untrained_heads": untrained, "skipped": skipped,
            "model_config": cfg, "sample": {m: samples[m].source for m in methods},
            "variant_of": {f"{m}|{b}": (be.variant if be is not None else "torch") for (m, b), be in backends.items()}}


def methods_roofline(sec: Dict[str, Any], peaks: Dict[str, Any]) -> Dict[str, Any]:
    """Each (method, backend, box count): the trunk's achieved GFLOP/s (frame FLOPs from the model
    config, :func:`trunk_flops_per_call`, over the frame p50) and its share of the measured peak
    of its class (int8 variants: the int8 GEMM peak, the others: the higher fp32 GEMM peak of torch.mm
    and ONNX Runtime's MatMul)."""
    pk = {c: (peaks.get(c) or {}).get("gflops") for c in ("fp32", "int8")}
    # the fp32 peak is the machine's: the higher of torch.mm and ONNX Runtime's fp32 MatMul (measured alike)
    ort32 = (peaks.get("fp32_ort_matmul") or {}).get("gflops")
    if ort32 and (not pk["fp32"] or ort32 > pk["fp32"]):
        pk["fp32"] = ort32
    out: Dict[str, Any] = {"peaks_gflops": pk, "rows": {}}
    for m, per_b in sec["results"].items():
        for b, cells in per_b.items():
            variant = sec["variant_of"].get(f"{m}|{b}", b)
            cls = "int8" if "int8" in variant else "fp32"
            row = {}
            for n, r in cells.items():
                achieved = r["gflop_per_frame"] / (r["p50_ms"] / 1e3)
                row[n] = {"peak": cls, "achieved_gflops": achieved,
                          "fraction_of_peak": achieved / pk[cls] if pk.get(cls) else None}
            out["rows"][f"{m}|{b}"] = row
    return out


def _print_methods(sec: Dict[str, Any], model: str) -> None:
    counts = list(next(iter(next(iter(sec["results"].values())).values())))
    rf = sec.get("roofline")
    print(f"\n{model}: every method on every CPU backend, one interleaved run (p50 ms per frame; x = frame time over "
          f"RUNA's best at that box count; % = trunk GFLOP/s over the measured GEMM peak of its class)")
    head = f"{'method':<9}{'backend':<25}" + "".join(f"| {n + ' boxes':>10} {'x RUNA':>7} {'% peak':>7} " for n in counts)
    print(head + f"| {'cos min':>8} {'attn |d|':>8}")
    print("-" * (len(head) + 20))
    for m, per_b in sec["results"].items():
        for b, cells in per_b.items():
            label = b if b != "auto" else f"auto->{sec['auto'].get(m, {}).get('variant', '?')}"
            row = f"{m:<9}{label:<25}"
            for n in counts:
                c = cells[n]
                share = None if not rf else rf["rows"][f"{m}|{b}"][n]["fraction_of_peak"]
                row += (f"| {c['p50_ms']:>10.1f} {c['vs_runa_best'] or float('nan'):>7.3f} "
                        f"{'-' if share is None else f'{100 * share:.1f}%':>7} ")
            f = sec["fidelity"].get(m, {}).get(b)
            attn = "-" if f is None or f["attn_max_abs"] is None else f"{f['attn_max_abs']:.1e}"
            row += "|" + ("" if f is None else f" {f['cos_min']:>8.5f} {attn:>8}")
            print(row)
    print("trunk GFLOP per frame (from the model config): " + "; ".join(
        f"{m} " + "/".join(f"{next(iter(per_b.values()))[n]['gflop_per_frame']:.3g}" for n in counts)
        for m, per_b in sec["results"].items()) + f" at {'/'.join(counts)} boxes")
    for m, bst in sec["best"].items():
        print(f"best {m}: " + ", ".join(f"{n} boxes {v['backend']} {v['p50_ms']:.1f} ms" for n, v in bst.items()))
    for m, a in sec["auto"].items():
        vs = ", ".join(f"{n} boxes {r:.3f}x" for n, r in (a.get("vs_best") or {}).items())
        print(f"auto {m}: {a['variant']} ({a['reason']}); auto / best: {vs}")
    if sec["untrained_heads"]:
        print(f"  untrained heads (speed only): {', '.join(sec['untrained_heads'])}")
    for k, why in sec["skipped"].items():
        print(f"  skipped {k}: {why}")
    for goal, met in sec["goals"].items():
        print(f"  goal {goal}: {'met' if met else 'NOT met'}")


def interleaved(run_frame, names: List[str], frames: Dict[int, np.ndarray], args, desc: str
                ) -> Dict[str, Dict[int, List[float]]]:
    """``{name: {box count: [ms, ...]}}``: ``args.warmup`` untimed frames per name first (first-call
    allocations, lazy runtime init), then ``args.rounds`` rounds, each over every box count and every name
    (who goes first rotates per round), ``args.repeats`` frames each, so slow bursts hit all names alike."""
    counts = list(frames)
    for name in names:
        for _ in range(args.warmup):
            run_frame(name, frames[min(counts)])
    samples: Dict[str, Dict[int, List[float]]] = {v: {n: [] for n in counts} for v in names}
    bar = _bar(args.rounds * len(counts) * len(names) * args.repeats, desc, args)
    for r in range(args.rounds):
        for n in counts:
            for name in names[r % len(names):] + names[:r % len(names)]:
                for _ in range(args.repeats):
                    samples[name][n].append(run_frame(name, frames[n]))
                    if bar is not None:
                        bar.update(1)
    if bar is not None:
        bar.close()
    return samples


def _bar(total: int, desc: str, args):
    try:
        from tqdm import tqdm

        return tqdm(total=total, desc=desc, disable=args.no_progress, file=sys.stderr)
    except ImportError:  # pragma: no cover
        return None


def thread_sweep(variant: str, encoder, args, calib, run_frame, boxes: np.ndarray, n: int) -> Dict[str, Any]:
    """Time ``variant`` with ONNX Runtime intra-op threads 1/2 x sequential/parallel execution at ``n``
    boxes, interleaved over ``args.rounds`` rounds of ``args.repeats`` frames (after one warm-up
    frame each). Returns ``{"variant", "box_count", "rows": [{threads, execution_mode, p50_ms,
    p95_ms, n}], "best"}``."""
    configs = [(t, m) for m in ("sequential", "parallel") for t in (1, 2)]
    bes = {}
    for t, m in configs:
        try:
            bes[(t, m)] = build_backend(variant, encoder, args, calib, threads=t, execution_mode=m)
        except Exception as exc:  # pragma: no cover - a setting this ORT build refuses
            LOG.warning("thread sweep: %s threads=%d %s skipped: %s", variant, t, m, exc)
    samples: Dict[Any, List[float]] = {c: [] for c in bes}
    for c, be in bes.items():
        run_frame(variant, boxes, be)
    bar = _bar(args.rounds * args.repeats * len(bes), f"threads {variant}", args)
    keys = list(bes)
    for r in range(args.rounds):
        for c in keys[r % len(keys):] + keys[:r % len(keys)]:
            for _ in range(args.repeats):
                samples[c].append(run_frame(variant, boxes, bes[c]))
                if bar is not None:
                    bar.update(1)
    if bar is not None:
        bar.close()
    encoder.set_backend(None)
    rows = []
    for (t, m), ms in samples.items():
        st = percentiles(ms)
        rows.append({"threads": t, "execution_mode": m, "p50_ms": st["p50_ms"], "p95_ms": st["p95_ms"], "n": st["n"]})
    best = min(rows, key=lambda r: r["p50_ms"]) if rows else None
    return {"variant": variant, "box_count": n, "rows": rows, "best": best}


def _print_table(report: Dict[str, Any], model: str) -> None:
    sec = report["per_model"][model]
    res = sec["results"]
    ns = report["box_counts"]
    head = f"{'variant':<24}" + "".join(f"| {n:>3} boxes: p50 / p95 ms  box/s  x naive x b2   " for n in ns)
    print()
    print(f"model {model}{'  [RANDOM WEIGHTS: speed only]' if sec['random_weights'] else ''}; "
          f"photo {report['photo']['source']} ({report['photo']['width']}x{report['photo']['height']}); "
          f"{report['rounds']} rounds x {report['repeats']} frames, interleaved; x naive = speed-up over the "
          "batch-1 per-box loop, x b2 = over the batch-2 per-box baseline (open_clip preprocessing)")
    print(head)
    print("-" * len(head))
    for v in sec["variants"]:
        row = f"{v:<24}"
        for n in ns:
            r = res[v][str(n)]
            row += (f"| {r['p50_ms']:>9.1f} / {r['p95_ms']:>8.1f} {r['boxes_per_s']:>6.1f} "
                    f"{r['speedup_vs_naive_p50']:>6.2f}x {r['speedup_vs_naive_b2_p50']:>5.2f}x ")
        print(row)
    for k, f in sec["fidelity"].items():
        if "error" in f:
            print(f"fidelity {k}: {f['error']}")
        else:
            emb = f.get("embedding_cos_min", float("nan"))
            goal = ""
            if k.endswith("_vs_torch_fp32"):
                goal = f"  [{'ok' if emb >= sec['fidelity_goal'] else 'BELOW'} goal >= {sec['fidelity_goal']}]"
            print(f"fidelity {k}: feature cos min {f['feature_cos_min']:.6f}, embedding cos min "
                  f"{emb:.6f} (n={f['n']} real crops){goal}")
    if sec.get("calibration"):
        print(f"static int8 calibrated on {sec['calibration']}")
    sw = sec.get("thread_sweep")
    if sw:
        print(f"ONNX Runtime thread settings, {sw['variant']} at {sw['box_count']} boxes (p50 / p95 ms, "
              f"{sw['rows'][0]['n'] if sw['rows'] else 0} frames each, interleaved):")
        for r in sw["rows"]:
            mark = "  <- best" if r is sw["best"] or r == sw["best"] else ""
            print(f"  intra-op threads {r['threads']}, {r['execution_mode']:<10} {r['p50_ms']:9.1f} / {r['p95_ms']:8.1f}{mark}")
    for k, why in sec["skipped"].items():
        print(f"skipped {k}: {why}")


def _print_summary(report: Dict[str, Any]) -> None:
    """Side by side: both baselines' p50 and every variant's speed-up over each, every model."""
    n = report["ratio_box_count"]
    models = report["models"]
    variants: List[str] = []
    for m in models:
        variants += [v for v in report["per_model"][m]["variants"] if v not in BASELINES and v not in variants]
    print()
    print(f"speed-up of the batched pipeline at {n} boxes over the naive batch-1 loop / the batch-2 baseline "
          "(baseline p50 / variant p50):")
    w = {m: max(18, len(m)) for m in models}
    print(f"{'variant':<24}" + "".join(f"| {m:>{w[m]}} " for m in models))
    for b in BASELINES:
        print(f"{b + ' p50 ms':<24}" + "".join(
            f"| {report['per_model'][m]['results'][b][str(n)]['p50_ms']:>{w[m]}.1f} " for m in models))
    for v in variants:
        cells = []
        for m in models:
            r1 = report["per_model"][m]["ratio_vs_naive"].get(v)
            r2 = report["per_model"][m]["ratio_vs_naive_b2"].get(v)
            cell = "-" if r1 is None else f"{r1:.2f}x / {r2:.2f}x"
            cells.append(f"| {cell:>{w[m]}} ")
        print(f"{v:<24}" + "".join(cells))
    for m in models:
        sec = report["per_model"][m]
        b = sec["best_cpu"]
        if b["variant"]:
            g1 = sec["goals"]["best_cpu_ge_4x_naive_at_10_boxes"]
            g2 = sec["goals"]["best_cpu_ge_3x_naive_b2_at_10_boxes"]
            goal = "" if g1 is None else (f"; goal >= 4x naive: {'met' if g1 else 'MISSED'}, "
                                          f">= 3x batch-2: {'met' if g2 else 'MISSED'}")
            print(f"{m}: best CPU variant at {b['box_count']} boxes: {b['variant']} = "
                  f"{b['speedup_vs_naive_p50']:.2f}x naive, {b['speedup_vs_naive_b2_p50']:.2f}x batch-2 (p50){goal}")
        low = [v for v, ok in sec["goals"]["embedding_cos_min_ge_0.999"].items() if not ok]
        if low:
            print(f"{m}: embedding cosine to torch fp32 below {sec['fidelity_goal']} on real crops: {', '.join(low)}")


def _print_roofline(report: Dict[str, Any]) -> None:
    """The peaks, then per model: FLOPs per view, each variant's achieved GFLOP/s and share of its
    peak at every box count, and the int8-peak ceiling next to the goals."""
    rf = report["roofline"]
    pk = rf["peaks"]
    ns = report["box_counts"]

    def peak_line(key, label):
        p = pk.get(key) or {}
        if "gflops" not in p:
            return f"  {label:<22} not measured ({p.get('error', 'no result')})"
        thr = p["threads"] if p["threads"] is not None else "ORT default"
        return (f"  {label:<22} {p['gflops']:8.1f} GFLOP/s  {p['what']}, threads {thr}, best of "
                f"{p['repeats']} x {p['calls_per_repeat']} calls ({p['ms_per_call']:.1f} ms per call)")

    print()
    print(f"roofline: FLOPs counted by {rf['flop_counter']}; peaks measured in this run:")
    print(peak_line("fp32", "fp32 GEMM peak"))
    print(peak_line("int8", "int8 GEMM peak"))
    print(peak_line("fp32_ort_matmul", "(ref) ORT fp32 MatMul"))
    if pk.get("int8_ops"):
        print(f"  int8 graph as quantize_dynamic emits it: {' -> '.join(pk['int8_ops'])} "
              "(ORT's optimiser fuses it into DynamicQuantizeMatMul at load)")
    for m in report["models"]:
        r = report["per_model"][m].get("roofline")
        if not r:
            print(f"{m}: no roofline (FLOPs not counted)")
            continue
        print(f"{m}: {r['gflop_per_view']:.4g} GFLOP per view (visual trunk, batch 1; the projection, "
              f"{r['projection_flops_per_view'] / 1e6:.3g} MFLOP more, runs outside it), "
              f"{r['views_per_box']} views per box; achieved = frame FLOPs / frame p50 (whole frame: views, "
              "scoring and Python included), % = of the variant's peak")
        head = f"  {'variant':<24}{'peak':<6}" + "".join(f"| {n:>3} boxes: GFLOP/s  % peak " for n in ns)
        print(head)
        for v, cells in r["variants"].items():
            row = f"  {v:<24}{cells[str(ns[0])]['peak'] or '-':<6}"
            for n in ns:
                c = cells[str(n)]
                frac = "-" if c["fraction_of_peak"] is None else f"{100 * c['fraction_of_peak']:.1f}%"
                row += f"| {c['achieved_gflops']:>16.1f} {frac:>7} "
            print(row)
        for key, label in (("fp32_ceiling", "fp32 GEMM peak"), ("ceiling", "int8 GEMM peak")):
            c = r.get(key)
            if not c:
                continue
            parts = [f"{n} box{'es' if n != 1 else ''} {c[str(n)]['ms']:.4g} ms = "
                     f"{c[str(n)]['speedup_vs_naive_p50']:.2f}x naive, {c[str(n)]['speedup_vs_naive_b2_p50']:.2f}x batch-2"
                     for n in ns]
            print(f"  ceiling, every FLOP at the {label}: " + "; ".join(parts))
        g = r.get("goal_reachable")
        if g is not None:
            c10 = r["ceiling"]["10"]
            print(f"  goal at 10 boxes >= 4x naive: ceiling {c10['speedup_vs_naive_p50']:.2f}x -> "
                  f"{'within the ceiling' if g['ge_4x_naive_at_10_boxes'] else 'NOT reachable on this CPU'}; "
                  f">= 3x batch-2: ceiling {c10['speedup_vs_naive_b2_p50']:.2f}x -> "
                  f"{'within the ceiling' if g['ge_3x_naive_b2_at_10_boxes'] else 'NOT reachable on this CPU'} "
                  "(same FLOPs; the ceiling ignores all non-GEMM work, so it is an upper bound)")
        b = report["per_model"][m]["best_cpu"]
        if r.get("best_cpu_fraction_of_ceiling") is not None:
            print(f"  best CPU variant at {b['box_count']} boxes, {b['variant']}, runs at "
                  f"{100 * r['best_cpu_fraction_of_ceiling']:.1f}% of the int8 ceiling's speed")
