"""`runa-ood`: the offline commands of runa_ood_node.

Each subcommand lives in its own module under ``runa_ood_node.tools`` exposing
``add_arguments(parser)`` and ``run(args) -> int``; modules are imported lazily so that
``runa-ood --help`` stays fast and a tool's heavy imports (torch, rclpy) load only when used.
"""
from __future__ import annotations

import argparse
import importlib
import sys

#: subcommand -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("demo", "end-to-end demo: bag from real photographs -> node -> tables, alerts, annotated PNGs"),
    "evaluate": ("evaluate", "FPR95 / AUROC / AUPR on a COCO-style dataset or a bag (--bag)"),
    "finetune": ("finetune", "few-shot fine-tuning of the regional projection (Eq. 7)"),
    "calibrate": ("calibrate", "set OOD thresholds at a target ID true-positive rate"),
    "make-bag": ("make_bag", "write a ROS 2 bag (MCAP/sqlite3) from an image dataset"),
    "replay": ("replay", "play a bag into live ROS 2 topics"),
    "bench": ("bench", "latency of every available backend vs the naive per-box loop"),
    "bench-node": ("bench_node", "end-to-end latency through the running node vs the core pipeline"),
    "build-engine": ("build_engine", "export ONNX and build the TensorRT engine (never at start-up)"),
    "params": ("params", "regenerate / check config/runa_ood.yaml, its schema and docs/parameters.md from the parameter table"),
    "fleet": ("fleet", "score, mine and evaluate many bags on Ray Data (Parquet, summary, top-K OOD, metrics)"),
    "fuzz": ("fuzz", "hostile input against the node over DDS, every message accounted for (--soak: RSS curve)"),
    "proving-ground": ("proving_ground", "the synthetic proving ground: its world's COCO splits and bag (world), its CLIP (train)"),
    "gpu-check": ("gpu_check", "every method's scorer on a GPU vs CPU fp32, GPU views, timings, TensorRT where it imports "
                               "(one call: scripts/gpu_check.sh [--dry-run] OUTDIR)"),
    "foxglove-layout": ("foxglove_layout", "a Foxglove / Lichtblick layout: every camera's image with its OOD annotations, alert, health"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="runa-ood",
        description="runa_ood_node offline tools (object-level OOD detection, RUNA).",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(_module=module)
        if len(sys.argv) > 1 and sys.argv[1] == name or "--help-all" in sys.argv:
            # only import the chosen tool (heavy imports stay lazy)
            importlib.import_module(f"runa_ood_node.tools.{module}").add_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    parser = build_parser()
    args = parser.parse_args()
    if not getattr(args, "command", None):
        parser.print_help()
        return 2
    tool = importlib.import_module(f"runa_ood_node.tools.{args._module}")
    return int(tool.run(args) or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
