#!/usr/bin/env python3
"""Follow a command's arguments through the code to the scorer, and count the rooms it passes.

    python scripts/arg_paths.py [--verbose] [--json out.json]

For ``finetune``, ``evaluate --bag`` and ``fleet`` (the driver's node parameters, then one score
actor's construction, in this process: no Ray) it runs the real command on a tiny random model and
records every call into ``runa_ood_node`` that RECEIVES THE CONFIGURATION in any of its shapes (the
argument namespace, a parameter / config mapping with a ``model`` key, a settings or config object
with ``model`` and ``method`` attributes) from the command's entry until the scorer
(``core.pipeline.OodScorer``) is constructed: the hops the arguments take, not every helper the
hops use. Figures:

* ``modules``: distinct modules on the path; ``visits``: the path as a sequence of modules with
  repeats collapsed (A -> B -> A is three visits);
* ``climbs``: calls from a lower room into a higher one (core < backends, proving_ground <
  factory < ros < tools): a lower floor that has to call back up.

Run it from the checkout to measure (``PYTHONPATH=<checkout>``); the figures go in the closing note.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
import tempfile

LAYER = {"core": 0, "backends": 1, "proving_ground": 1, "factory": 2, "ros": 3, "tools": 4}


class _Built(BaseException):
    """Raised once the scorer exists (BaseException: tools' ``except Exception`` do not catch it)."""


def _module(frame) -> str:
    name = frame.f_globals.get("__name__", "")
    return name if name.startswith("runa_ood_node.") else ""


def _layer(mod: str) -> int:
    return LAYER.get(mod.split(".")[1], -1)


def trace(fn):
    """Run ``fn`` until an OodScorer is constructed; the calls into the package that receive the configuration."""
    from runa_ood_node.core import pipeline

    calls = []
    orig = pipeline.OodScorer.__init__

    def init(self, *a, **k):
        orig(self, *a, **k)
        raise _Built()

    def carries_config(frame) -> bool:
        code = frame.f_code
        n = code.co_argcount + code.co_kwonlyargcount + bool(code.co_flags & 0x04) + bool(code.co_flags & 0x08)
        for name in code.co_varnames[:n]:
            v = frame.f_locals.get(name)
            if isinstance(v, argparse.Namespace):
                return True
            if isinstance(v, dict) and "model" in v and ("method" in v or "pretrained" in v):
                return True
            if hasattr(v, "model") and hasattr(v, "method") and not isinstance(v, type) \
                    and type(v).__name__ not in ("OodScorer", "DualEncoder"):
                return True
        return False

    def prof(frame, event, arg):
        if event != "call":
            return
        mod = _module(frame)
        if not mod:
            return
        if not carries_config(frame):
            return
        d = 0
        caller = frame.f_back
        while caller is not None and not _module(caller):
            caller = caller.f_back
        calls.append((mod, frame.f_code.co_name, _module(caller) if caller is not None else "", d))

    pipeline.OodScorer.__init__ = init
    sys.setprofile(prof)
    try:
        rc = fn()
        raise SystemExit(f"the command ended (rc {rc}) without building a scorer")
    except _Built:
        pass
    finally:
        sys.setprofile(None)
        pipeline.OodScorer.__init__ = orig
    return calls


def figures(calls) -> dict:
    seq = []
    for mod, _, _, _ in calls:
        if not seq or seq[-1] != mod:
            seq.append(mod)
    climbs = [f"{c} -> {m}.{fn}" for m, fn, c, _ in calls if c and _layer(m) > _layer(c)]
    short = [m.replace("runa_ood_node.", "") for m in seq]
    return {"modules": len(set(seq)), "visits": len(seq), "climbs": len(climbs), "path": short,
            "climb_calls": climbs}


def _tiny_args(extra):
    return ["--model", "runa-tiny-vit", "--pretrained", "none", "--allow-random-weights", *extra]


def run_finetune(tmp: pathlib.Path, ann: str):
    from runa_ood_node.tools import cli

    return lambda: cli.main(["finetune", *_tiny_args(["--annotations", ann, "--shots", "1", "--epochs", "1",
                                                      "--out", str(tmp / "ft"), "--max-images", "4"])])


def _bag(tmp: pathlib.Path) -> str:
    from runa_ood_node.tools import make_bag

    out = tmp / "bag"
    if not out.exists():
        make_bag.write_bag(make_bag.skimage_frames("voc", names=["astronaut", "coffee"]), out, progress=False)
    return str(out)


def run_evaluate_bag(tmp: pathlib.Path, ann: str):
    from runa_ood_node.tools import cli

    bag = _bag(tmp)
    return lambda: cli.main(["evaluate", *_tiny_args(["--bag", bag, "--out", str(tmp / "ev")])])


def run_fleet(tmp: pathlib.Path, ann: str):
    """The real ``runa-ood fleet`` command up to its first scorer (built on the driver before any Ray
    work). No Ray can start here: ``ray`` is replaced by a module that refuses every use, and the
    loopback-only guard is answered with "only loopback" so that the command gets that far."""
    import types

    from runa_ood_node.tools import cli, fleet

    class _NoRay(types.ModuleType):
        def __getattr__(self, name):
            raise SystemExit(f"arg_paths: the fleet command reached ray.{name} before building a scorer")

    sys.modules["ray"] = _NoRay("ray")
    fleet.non_loopback_interfaces = lambda: []
    bag = _bag(tmp)
    return lambda: cli.main(["fleet", bag, "--out", str(tmp / "fl"), "--no-progress", *_tiny_args([])])


COMMANDS = {"finetune": run_finetune, "evaluate --bag": run_evaluate_bag, "fleet": run_fleet}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json")
    ap.add_argument("--annotations", default=os.environ.get("RUNA_OOD_DATA_PACK", ""))
    ap.add_argument("--verbose", action="store_true")
    args = ap.parse_args(argv)
    os.environ.setdefault("ROS_AUTOMATIC_DISCOVERY_RANGE", "LOCALHOST")
    import logging
    logging.disable(logging.WARNING)
    out = {}
    with tempfile.TemporaryDirectory() as t:
        tmp = pathlib.Path(t)
        for name, make in COMMANDS.items():
            fn = make(tmp, args.annotations)
            out[name] = figures(trace(fn))
            f = out[name]
            print(f"{name}: {f['modules']} modules, {f['visits']} visits, {f['climbs']} climbs")
            if args.verbose:
                print("    " + " -> ".join(f["path"]))
                for c in f["climb_calls"]:
                    print(f"    climb: {c}")
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
