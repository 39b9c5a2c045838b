"""`runa-ood params`: the files generated from the node's parameter table.

``runa_ood_node.core.parameters.PARAMETERS`` is the one declaration of the node's parameters. From it
this command renders, byte for byte reproducibly:

* ``config/runa_ood.yaml``: every parameter at its default, ``/**: ros__parameters:`` form (any
  node name), each preceded by its description as a comment;
* ``config/runa_ood.schema.json``: a JSON Schema (draft-07) of that file (types, ranges, choices,
  descriptions, defaults; unknown names refused), as Autoware ships one beside each param.yaml;
* the parameter table of ``docs/parameters.md``, between ``<!-- params:begin -->`` and ``<!-- params:end -->``
  (the text around it is written by hand).

``runa-ood params --write`` regenerates all three (run it after changing the table); ``--check``
(the default) exits 1 and names every stale file. ``tests/unit/test_params.py`` runs the check.
Also runnable as ``python -m runa_ood_node.tools.params --write``.
"""
from __future__ import annotations

import argparse
import json
import pathlib
import sys
import textwrap
from typing import Dict, List

import yaml

from ..core.parameters import CAMERA_OVERRIDES, PARAMETERS, ParamSpec

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]
YAML_PATH = pathlib.Path("config/runa_ood.yaml")
SCHEMA_PATH = pathlib.Path("config/runa_ood.schema.json")
DOCS_PATH = pathlib.Path("docs/parameters.md")
BEGIN, END = "<!-- params:begin -->", "<!-- params:end -->"
_GENERATED = "GENERATED from runa_ood_node/core/parameters.py (PARAMETERS) by `runa-ood params --write`: edit the table."
_WIDTH = 100

_HEADER = f"""\
# Parameters of runa_ood_node, every one at its default. {_GENERATED}
# Descriptions, ranges and read-only flags are also declared on the node:
# `ros2 param describe /runa_ood <name>`. Units: s, ms, px; fractions in [0, 1].
# Read-only parameters need a restart; the others are read at every lifecycle configure
# (publish_annotated and lazy also apply at once). Schema: runa_ood.schema.json.
"""


def _scalar(value) -> str:
    if isinstance(value, (list, tuple)):
        value = [v if isinstance(v, str) else float(v) for v in value]
    return yaml.safe_dump(value, default_flow_style=True, width=1000).strip().removesuffix("...").strip()


def _groups(specs=None) -> List[str]:
    """Prefixes (``alert``, ``health``) in order; raises if one is split by other parameters (the
    YAML would get the same key twice)."""
    specs = PARAMETERS if specs is None else specs
    seen: List[str] = []
    last = None
    for s in specs:
        prefix = s.name.rpartition(".")[0]
        if prefix != last and prefix in seen:
            raise ValueError(f"parameter {s.name}: the {prefix}.* parameters must be contiguous in PARAMETERS")
        if prefix and prefix not in seen:
            seen.append(prefix)
        last = prefix
    return seen


def render_yaml(specs=None) -> str:
    specs = PARAMETERS if specs is None else specs
    _groups(specs)
    out = [_HEADER.rstrip("\n"), "/**:", "  ros__parameters:"]
    section = prefix = None
    for s in specs:
        if s.section != section:
            section = s.section
            out.append(f"    # {'-' * 16} {section}")
        p, _, key = s.name.rpartition(".")
        if p != prefix:
            if p:
                out.append(f"    {p}:")
            prefix = p
        indent = "      " if p else "    "
        out.extend(textwrap.wrap(s.describe(), _WIDTH, initial_indent=indent + "# ",
                                 subsequent_indent=indent + "# "))
        out.append(f"{indent}{key}: {_scalar(s.default)}")
    return "\n".join(out) + "\n"


def _schema_of(s: ParamSpec) -> dict:
    kind = s.kind
    d: Dict = {"type": {"bool": "boolean", "int": "integer", "float": "number", "str": "string",
                        "double_array": "array", "string_array": "array"}[kind],
               "description": s.describe(), "default": list(s.default) if kind.endswith("_array") else s.default}
    if kind == "double_array":
        d["items"] = {"type": "number"}
    if kind == "string_array":
        d["items"] = {"type": "string", "pattern": "^[A-Za-z_][A-Za-z0-9_]*$"}
        d["uniqueItems"] = True
    if kind in ("int", "float") and s.lo is not None:
        d["minimum"], d["maximum"] = s.lo, s.hi
    if s.choices:
        d["enum"] = list(s.choices)
    if s.nonempty:
        d["minLength"] = 1
    return d


def render_schema(specs=None) -> str:
    specs = PARAMETERS if specs is None else specs
    params: Dict = {"type": "object", "properties": {}, "additionalProperties": False}
    for s in specs:
        p, _, key = s.name.rpartition(".")
        target = params
        if p:
            target = params["properties"].setdefault(
                p, {"type": "object", "properties": {}, "additionalProperties": False})
        target["properties"][key] = _schema_of(s)
    by_name = {s.name: s for s in specs}
    if "cameras" in by_name:  # camera.<C>.<name>: per-camera overrides of the input parameters
        one = {"type": "object", "additionalProperties": False,
               "properties": {n: _schema_of(by_name[n]) for n in CAMERA_OVERRIDES if n in by_name}}
        params["properties"]["camera"] = {
            "type": "object", "description": "Per-camera overrides camera.<C>.<name> for a camera C of cameras.",
            "patternProperties": {"^[A-Za-z_][A-Za-z0-9_]*$": one}, "additionalProperties": False}
    schema = {
        "$schema": "http://json-schema.org/draft-07/schema#",
        "title": "Parameters of runa_ood_node",
        "description": _GENERATED,
        "type": "object",
        "definitions": {"runa_ood": params},
        "properties": {"/**": {"type": "object",
                               "properties": {"ros__parameters": {"$ref": "#/definitions/runa_ood"}},
                               "required": ["ros__parameters"], "additionalProperties": False}},
        "required": ["/**"],
        "additionalProperties": False,
    }
    return json.dumps(schema, indent=2, ensure_ascii=False) + "\n"


def render_table(specs=None) -> str:
    def cell(text) -> str:
        return str(text).replace("|", "\\|").replace("\n", " ")

    specs = PARAMETERS if specs is None else specs
    lines = [BEGIN, f"<!-- {_GENERATED} -->", "",
             "| parameter | type | default | range / choices | read-only | description |",
             "|---|---|---|---|---|---|"]
    for s in specs:
        rng = ", ".join(s.choices) if s.choices else (f"[{s.lo:g}, {s.hi:g}]" if s.lo is not None else "")
        default = _scalar(s.default)
        lines.append(f"| `{s.name}` | {s.kind} | `{cell(default)}` | {cell(rng)} | {'yes' if s.read_only else ''} "
                     f"| {cell(s.description)} |")
    lines += ["", END]
    return "\n".join(lines)


def _docs_with_table(text: str) -> str:
    if text.count(BEGIN) != 1 or text.count(END) != 1 or text.index(BEGIN) > text.index(END):
        raise ValueError(f"{DOCS_PATH} needs exactly one {BEGIN} ... {END} block")
    a, b = text.index(BEGIN), text.index(END) + len(END)
    return text[:a] + render_table() + text[b:]


def generated(root: pathlib.Path = REPO_ROOT) -> Dict[pathlib.Path, str]:
    """Path -> the text it must have (docs/parameters.md with its table replaced)."""
    root = pathlib.Path(root)
    return {root / YAML_PATH: render_yaml(), root / SCHEMA_PATH: render_schema(),
            root / DOCS_PATH: _docs_with_table((root / DOCS_PATH).read_text(encoding="utf-8"))}


def stale(root: pathlib.Path = REPO_ROOT) -> List[pathlib.Path]:
    """The generated files whose content differs from the table (missing ones included)."""
    out = []
    for path, text in generated(root).items():
        if not path.is_file() or path.read_text(encoding="utf-8") != text:
            out.append(path)
    return out


def write(root: pathlib.Path = REPO_ROOT) -> List[pathlib.Path]:
    """Regenerate every file that is out of date; returns those written."""
    changed = stale(root)
    for path, text in generated(root).items():
        if path in changed:
            path.write_text(text, encoding="utf-8")
    return changed


def add_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_mutually_exclusive_group()
    g.add_argument("--write", action="store_true", help="regenerate the YAML, the schema and the table of docs/parameters.md")
    g.add_argument("--check", action="store_true", help="exit 1 when a generated file is out of date (default)")
    parser.add_argument("--root", default=str(REPO_ROOT), help="repository root (default %(default)s)")


def run(args) -> int:
    root = pathlib.Path(args.root)
    if args.write:
        changed = write(root)
        print("\n".join(f"wrote {p}" for p in changed) or "all generated files are up to date")
        return 0
    bad = stale(root)
    for p in bad:
        print(f"out of date: {p} (run `runa-ood params --write`)", file=sys.stderr)
    if not bad:
        print("config/runa_ood.yaml, config/runa_ood.schema.json and docs/parameters.md match PARAMETERS")
    return 1 if bad else 0


if __name__ == "__main__":  # pragma: no cover
    p = argparse.ArgumentParser(prog="python -m runa_ood_node.tools.params", description=__doc__.split("\n")[0])
    add_arguments(p)
    sys.exit(run(p.parse_args()))
