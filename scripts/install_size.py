#!/usr/bin/env python3
"""The size of the vehicle install (`pip install .`) beside the extras and the full workshop.

    python scripts/install_size.py [--json out.json]

Resolves each install's dependency closure from the metadata of the packages installed in this
environment (scripts/setup.sh installs everything, with the same pins), and adds up the files each
distribution installed (its RECORD). The same wheels as a fresh `pip install`, measured without
downloading them again. Also prints the top-level import names of every distribution outside the
vehicle closure (tests/ros/test_vehicle_install.py makes those unimportable).
"""
from __future__ import annotations

import argparse
import importlib.metadata as md
import json
import pathlib
import re
import sys
from typing import Dict, Iterable, Optional, Set

from packaging.markers import default_environment
from packaging.requirements import Requirement

ROOT = pathlib.Path(__file__).resolve().parents[1]
INSTALLS = {  # name -> requirement files
    "vehicle": ["vehicle"],
    "vehicle + ros-wheels": ["vehicle", "ros-wheels"],
    "+ tools": ["vehicle", "ros-wheels", "tools"],
    "+ export": ["vehicle", "ros-wheels", "export"],
    "+ fleet": ["vehicle", "ros-wheels", "fleet", "tools"],
    "full workshop (scripts/setup.sh)": ["vehicle", "ros-wheels", "tools", "export", "fleet", "build", "test"],
}


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _dists() -> Dict[str, md.Distribution]:
    return {_norm(d.metadata["Name"]): d for d in md.distributions()}


def requirement_lines(name: str):
    text = (ROOT / "requirements" / f"{name}.txt").read_text()
    return [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.startswith(("#", "-"))]


def closure(reqs: Iterable[str], dists: Dict[str, md.Distribution]) -> Set[str]:
    env = default_environment()
    seen: Set[str] = set()
    todo = [(Requirement(r), ()) for r in reqs]
    while todo:
        req, extras = todo.pop()
        key = _norm(req.name)
        if key not in dists:
            continue
        new_extras = tuple(req.extras)
        if key in seen and not new_extras:
            continue
        seen.add(key)
        for r in dists[key].requires or []:
            rr = Requirement(r)
            if rr.marker is not None:
                ok = any(rr.marker.evaluate(dict(env, extra=e)) for e in (new_extras or ("",)))
                if not ok:
                    continue
            todo.append((rr, ()))
    return seen


def size_of(dist: md.Distribution) -> int:
    total = 0
    for f in dist.files or []:
        try:
            total += (f.size or pathlib.Path(dist.locate_file(f)).stat().st_size)
        except OSError:
            pass
    return total


def import_names(dist: md.Distribution) -> Set[str]:
    top = dist.read_text("top_level.txt")
    if top:
        return {t.strip() for t in top.split() if t.strip() and not t.startswith("_")}
    names = set()
    for f in dist.files or []:
        parts = f.parts
        if len(parts) >= 1 and not parts[0].endswith((".dist-info", ".data")) and parts[0] not in ("..", "bin"):
            n = parts[0][:-3] if parts[0].endswith(".py") else parts[0]
            if n.isidentifier() and not n.startswith("_"):
                names.add(n)
    return names


def outside_vehicle(dists: Dict[str, md.Distribution]) -> Set[str]:
    """The distributions the extras ([tools], [export], [fleet]) bring that the vehicle install (with the
    ROS wheels) does not have."""
    vehicle = closure(requirement_lines("vehicle") + requirement_lines("ros-wheels"), dists)
    return closure([r for f in ("tools", "export", "fleet") for r in requirement_lines(f)], dists) - vehicle


def outside_vehicle_imports(dists: Optional[Dict[str, md.Distribution]] = None) -> list:
    """Top-level import names of :func:`outside_vehicle`'s distributions (what a vehicle cannot import)."""
    dists = _dists() if dists is None else dists
    return sorted({n for k in outside_vehicle(dists) for n in import_names(dists[k])})


def measure() -> dict:
    dists = _dists()
    out = {}
    for name, files in INSTALLS.items():
        reqs = [r for f in files for r in requirement_lines(f)]
        keys = closure(reqs, dists)
        out[name] = {"packages": len(keys), "bytes": sum(size_of(dists[k]) for k in keys)}
    rest = outside_vehicle(dists)
    out["outside_vehicle_imports"] = outside_vehicle_imports(dists)
    out["outside_vehicle_biggest"] = [f"{k} {size_of(dists[k]) / 1e6:.0f} MB" for k in
                                      sorted(rest, key=lambda k: -size_of(dists[k]))[:10]]
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    m = measure()
    for name in INSTALLS:
        print(f"{name:38s} {m[name]['packages']:4d} packages {m[name]['bytes'] / 1e9:6.2f} GB")
    print("biggest outside the vehicle install:", ", ".join(m["outside_vehicle_biggest"]))
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(m, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
