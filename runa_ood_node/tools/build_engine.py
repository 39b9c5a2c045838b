"""`runa-ood build-engine`: export the visual trunk to ONNX and build its TensorRT engine.

Run this once per model, precision, TensorRT version and GPU (engines are not portable), before
starting the node: the node loads the cached engine (``backend: auto`` / ``tensorrt``) and never
builds one at start-up. Files land in the cache (``$RUNA_OOD_CACHE_DIR``, default
``~/.cache/runa_ood_node``)::

    onnx/<model_id>-<opset>-<precision>.onnx (+ .json)     engines/<...>.engine (+ .json)

``--onnx-only`` exports (and checks) the ONNX graphs without TensorRT: on machines without
TensorRT this is the step that lets ``backend: auto`` start on ONNX Runtime without exporting (with no
cached export, auto's first start exports the CPU variants itself within a time budget, logged), and the fp16 graph (LayerNorm and
Softmax kept in fp32) can be built with ``trtexec --stronglyTyped`` elsewhere. ``--int8`` also
writes the dynamically quantised graph for ONNX Runtime's ``int8`` option (``--int8 static``: the
calibrated QDQ graph), ``--fused`` the graph with ONNX Runtime's transformer fusions (``fused`` option).
``--outputs`` picks the backbone output set (``cls`` by default, today's files; a method that needs
tokens or attention asks for e.g. ``--outputs tokens,attn_cls``): one graph and engine per set.
``--method M`` takes M's output set and calibrates / measures on M's own views (its scorer's calls on
real photographs). ``--auto`` (``--auto-choice``) measures the CPU variants in the cache now and records
the fastest that holds fidelity, what ``backend: auto`` would otherwise measure on its first start.

Exit status: 0 ok, 2 bad arguments or weights, 3 TensorRT/CUDA unavailable, 1 build failure.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys

LOG = logging.getLogger("runa_ood_node.tools.build_engine")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from .common import DEFAULT_MODEL, DEFAULT_PRETRAINED

    parser.add_argument("--model", default=DEFAULT_MODEL, help="open_clip ViT architecture (default %(default)s)")
    parser.add_argument("--pretrained", default=DEFAULT_PRETRAINED,
                        help="open_clip tag or checkpoint path; 'none' with --allow-random-weights for a random "
                             "model (default %(default)s)")
    parser.add_argument("--allow-random-weights", action="store_true",
                        help="use a seeded RANDOM model when the weights cannot be loaded (plumbing tests only)")
    parser.add_argument("--precision", default="fp16", choices=("fp32", "fp16"), help="engine precision (default %(default)s)")
    parser.add_argument("--fp16-mode", default="strongly-typed", choices=("strongly-typed", "builder-flag"),
                        help="strongly-typed: from the fp16 ONNX (TensorRT 10 and 11); builder-flag: fp32 ONNX + "
                             "BuilderFlag.FP16 with LayerNorm/softmax pinned to fp32 (TensorRT 10 only) "
                             "(default %(default)s)")
    parser.add_argument("--profile", default="1,16,64",
                        help="min,opt,max views per engine call (a frame with N boxes sends 2N views) "
                             "(default %(default)s)")
    parser.add_argument("--workspace-mib", type=int, default=4096, help="builder workspace in MiB (default %(default)s)")
    parser.add_argument("--opset", type=int, default=17, help="ONNX opset, >= 17 (default %(default)s)")
    parser.add_argument("--device", default="cuda", help="CUDA device to build for (default %(default)s)")
    parser.add_argument("--cache-dir", default=None, help="cache root (default $RUNA_OOD_CACHE_DIR or ~/.cache/runa_ood_node)")
    parser.add_argument("--engine-path", default=None, help="write the engine here instead of the cache")
    parser.add_argument("--onnx-only", action="store_true",
                        help="export and check the ONNX graph(s) only: fp32, plus fp16 with the default "
                             "--precision fp16 (what `backend: auto` / onnxruntime load without exporting)")
    parser.add_argument("--int8", nargs="?", const="dynamic", default=None, choices=("dynamic", "static"),
                        help="also quantise the fp32 graph (the fused one with --fused) to int8 for ONNX Runtime on "
                             "CPU: dynamic (default; backend_options int8: true) or static (QDQ, calibrated on real "
                             "crops of the data pack, else the demo's sample photographs; int8: static)")
    parser.add_argument("--fused", action="store_true",
                        help="also write the fused fp32 graph (ONNX Runtime transformer fusions: Attention, "
                             "SkipLayerNormalization, BiasGelu; backend_options fused: true)")
    parser.add_argument("--outputs", default="cls",
                        help="comma-separated backbone output set of the graphs / engine (cls, tokens, attn_cls, "
                             "xattn; one graph / engine per set, what a method asks the backend for) "
                             "(default %(default)s)")
    parser.add_argument("--auto-choice", "--auto", dest="auto_choice", action="store_true",
                        help="after exporting, time every CPU variant in the cache (plain, int8, static int8, fused, "
                             "fused int8) on real views in one interleaved run and record the fastest whose "
                             "embeddings keep cosine >= 0.999 to torch fp32: what `backend: auto` then uses on a CPU "
                             "(without this, the node measures once on its first start, bounded, and records it)")
    parser.add_argument("--method", default=None,
                        help="the OOD method the graphs are for: its backbone output set (instead of --outputs) and "
                             "its own views of real photographs for --int8 static calibration and --auto-choice "
                             "(default: --outputs, with RUNA's views)")
    parser.add_argument("--force", action="store_true", help="re-export / rebuild even when cached")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")


def _parse_profile(text: str):
    from ..backends.engine_cache import Profile

    try:
        parts = [int(p) for p in str(text).split(",")]
        return Profile.coerce(parts)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"--profile must be 'min,opt,max' integers with 1 <= min <= opt <= max, got {text!r} ({exc})")


def run(args) -> int:
    from .common import fail, load_encoder_or_exit, setup_logging

    setup_logging(args)
    try:
        profile = _parse_profile(args.profile)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.opset < 17:
        print("error: --opset must be >= 17", file=sys.stderr)
        return 2
    from ..core.backbone import output_set

    try:
        outputs = output_set([n.strip() for n in str(args.outputs).split(",") if n.strip()])
        if args.method is not None:
            from ..core.methods import get_method

            outputs = output_set(get_method(args.method).outputs)
    except ValueError as exc:
        print(f"error: --outputs / --method: {exc}", file=sys.stderr)
        return 2

    enc_args = argparse.Namespace(model=args.model, pretrained=args.pretrained, device="cpu", backend="torch",
                                  allow_random_weights=args.allow_random_weights, projection=None)
    try:
        encoder = load_encoder_or_exit(enc_args)
    except SystemExit as exc:
        return int(exc.code or 2)

    from ..backends.onnx_export import export_onnx

    def real_views():
        """The calibration / measurement sample: the method's own backend calls, else RUNA's views."""
        if "sample" not in memo:
            from ..backends.samples import Sample, calibration_views, method_sample

            if args.method is not None:
                from ..core.pipeline import OodScorer

                memo["sample"] = method_sample(OodScorer(encoder, "voc", method=args.method))
            else:
                views, where = calibration_views(encoder)
                memo["sample"] = Sample.of_views(views, outputs, source=where)
        return memo["sample"]

    memo = {}

    strongly = args.precision == "fp16" and args.fp16_mode == "strongly-typed"
    onnx_precisions = ["fp32"] + (["fp16"] if strongly else [])
    summary = {"model": encoder.model_name, "model_id": encoder.model_id, "random_weights": encoder.random_weights,
               "outputs": list(outputs), "onnx": {}}
    for prec in onnx_precisions:
        path = export_onnx(encoder, opset=args.opset, precision=prec, cache_dir=args.cache_dir, force=args.force,
                           outputs=outputs)
        summary["onnx"][prec] = str(path)
        print(f"ONNX ({prec}): {path}")
    src = summary["onnx"]["fp32"]
    if args.fused:
        from ..backends.onnx_export import export_fused_onnx, fused_stats

        src = export_fused_onnx(encoder, opset=args.opset, cache_dir=args.cache_dir, force=args.force,
                                outputs=outputs)
        summary["onnx"]["fused"] = str(src)
        print(f"ONNX (fp32, fused: {fused_stats(src).get('fused_ops')}): {src}")
    if args.int8 == "dynamic":
        from ..backends.ort_backend import quantize_int8

        path = quantize_int8(src, force=args.force)
        summary["onnx"]["int8"] = str(path)
        print(f"ONNX (int8, dynamic): {path}")
    elif args.int8 == "static":
        from ..backends.ort_backend import quantize_int8_static

        sample = real_views()
        path = quantize_int8_static(src, sample.views, force=args.force)
        summary["onnx"]["int8-static"] = str(path)
        print(f"ONNX (int8, static QDQ, calibrated on {sample.source}): {path}")
    if args.auto_choice:
        from ..backends.ort_backend import auto_record_path, choose_auto_variant

        sample = real_views()
        rec = choose_auto_variant(encoder, sample, projection=encoder.proj_global, cache_dir=args.cache_dir,
                                  outputs=outputs)
        summary["auto_choice"] = {"chosen": rec["chosen"], "record": str(auto_record_path(
            encoder.model_id, args.cache_dir, outputs)), "views": sample.source, "variants": rec["variants"]}
        print(f"backend auto on this CPU: {rec['chosen']} (measured on {sample.source})")
    if args.onnx_only:
        print(json.dumps(summary, indent=2))
        return 0

    from ..backends.base import BackendUnavailableError
    from ..backends.tensorrt_backend import build_engine

    try:
        engine, meta = build_engine(encoder, precision=args.precision, profile=profile, fp16_mode=args.fp16_mode,
                                    cache_dir=args.cache_dir, engine_path=args.engine_path,
                                    onnx_path=summary["onnx"]["fp16" if strongly else "fp32"],
                                    workspace_mib=args.workspace_mib, force=args.force, device=args.device,
                                    outputs=outputs)
    except BackendUnavailableError as exc:
        lines = [f"cannot build a TensorRT engine: {exc}",
                     "The ONNX graph above is ready; build it where TensorRT exists, e.g.",
                     f"  runa-ood build-engine --model {args.model} --precision {args.precision}",
                     "or use --onnx-only here. The node falls back to ONNX Runtime / PyTorch without an engine."]
        fail(lines)
        return 3
    except RuntimeError as exc:
        fail([f"TensorRT build failed: {exc}"])
        return 1
    summary["engine"] = str(engine)
    summary["meta"] = meta.to_dict()
    print(json.dumps(summary, indent=2))
    return 0
