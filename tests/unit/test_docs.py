"""The documentation holds: README.md is a front door (at most 300 lines, opening with the two
commands), every relative link in README.md and docs/*.md reaches an existing file (and, with
``#anchor``, a heading of it), every repository path they cite in backticks exists, and every code
name docs/ARCHITECTURE.md cites exists in the code.

Code names are resolved statically (``ast``; nothing is imported): a module path
(`core/pipeline.py`, `runa_ood_node/ros/`), a path with attributes (`tools/bagio.iter_frames`,
`ros/camera.Camera`), a dotted name (`core.alerts.AlertMonitor`, `factory.build_scorer`,
`bagio.read_bag`), a class or function and its attributes (`OodScorer.score_frames`,
`DualEncoder.grid_size`), a private name (`Worker._process`), and in the fenced API blocks every
``module:`` line's module, every ``name(`` of that module and every ``.method(`` of it.
"""
from __future__ import annotations

import ast
import functools
import pathlib
import re
from typing import Dict, List, Optional, Set, Tuple

import pytest

REPO = pathlib.Path(__file__).resolve().parents[2]
PKG = REPO / "runa_ood_node"
README = REPO / "README.md"
ARCHITECTURE = REPO / "docs" / "ARCHITECTURE.md"
MAX_README_LINES = 300
TWO_COMMANDS = (
    "```bash\n"
    "bash scripts/demo.sh    # set up everything (.venv, ROS 2 wheels, interfaces) and run the end-to-end demo\n"
    "bash scripts/test.sh    # set up everything and run the test suite\n"
    "```\n"
)
#: roots of dotted names that belong to other packages (cited, never resolved here)
EXTERNAL = {"torch", "nn", "np", "numpy", "open_clip", "cv2", "rclpy", "ray", "yaml", "onnx", "onnxruntime",
            "tensorrt", "dataclasses", "pytest", "rosbags", "json", "os", "sys", "logging", "warnings"}
#: first folders of a cited path that is code or a repository file (others are topics: `ood/driver_alert`)
PATH_ROOTS = {"runa_ood_node", "core", "ros", "tools", "backends", "proving_ground", "config", "launch", "scripts",
              "docs", "tests", "calibration", "ros2_ws", "requirements", ".ci"}
#: file extensions that make a cited path a file (not a module attribute)
FILE_EXT = (".py", ".yaml", ".yml", ".json", ".xml", ".md", ".png", ".csv", ".rviz", ".sh", ".txt", ".cfg", ".pt")


# ---------------------------------------------------------------------------------------------- the code index
class _Module:
    def __init__(self, path: pathlib.Path):
        self.path = path
        self.tree = ast.parse(path.read_text(encoding="utf-8"))
        self.names: Set[str] = set()  # top-level: defs, classes, assignments, imports
        self.star: List[Tuple[str, int]] = []  # from X import * (module, level)
        self.classes: Dict[str, ast.ClassDef] = {}
        for node in self.tree.body:
            self._top(node)

    def _top(self, node) -> None:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            self.names.add(node.name)
            if isinstance(node, ast.ClassDef):
                self.classes[node.name] = node
        elif isinstance(node, ast.Assign):
            for t in node.targets:
                self.names.update(_target_names(t))
        elif isinstance(node, (ast.AnnAssign, ast.AugAssign)):
            self.names.update(_target_names(node.target))
        elif isinstance(node, ast.ImportFrom):
            for a in node.names:
                if a.name == "*":
                    self.star.append((node.module or "", node.level))
                else:
                    self.names.add(a.asname or a.name)
        elif isinstance(node, ast.Import):
            for a in node.names:
                self.names.add((a.asname or a.name).split(".")[0])
        elif isinstance(node, (ast.If, ast.Try)):  # guarded definitions (optional imports)
            for child in ast.iter_child_nodes(node):
                if isinstance(child, ast.stmt):
                    self._top(child)
            for h in getattr(node, "handlers", []):
                for child in h.body:
                    self._top(child)


def _target_names(t) -> Set[str]:
    if isinstance(t, ast.Name):
        return {t.id}
    if isinstance(t, (ast.Tuple, ast.List)):
        return set().union(*(_target_names(e) for e in t.elts)) if t.elts else set()
    return set()


def _class_members(cls: ast.ClassDef) -> Set[str]:
    """Names a class defines: methods, class attributes, dataclass fields, ``self.x = ...`` anywhere."""
    out: Set[str] = set()
    for node in cls.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            out.add(node.name)
        elif isinstance(node, ast.Assign):
            for t in node.targets:
                out.update(_target_names(t))
        elif isinstance(node, ast.AnnAssign):
            out.update(_target_names(node.target))
    for node in ast.walk(cls):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "self" \
                and isinstance(node.ctx, ast.Store):
            out.add(node.attr)
    return out


@functools.lru_cache(maxsize=None)
def _modules() -> Dict[str, _Module]:
    """Dotted module name relative to the package (``core.pipeline``, ``factory``) -> its index."""
    out = {}
    for path in sorted(PKG.rglob("*.py")):
        rel = path.relative_to(PKG).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = _Module(path)
    return out


@functools.lru_cache(maxsize=None)
def _parameter_names() -> Set[str]:
    """The node's parameter names: the string first argument of every row of core/parameters.py's table."""
    tree = _modules()["core.parameters"].tree
    return {n.args[0].value for n in ast.walk(tree) if isinstance(n, ast.Call) and n.args
            and isinstance(n.args[0], ast.Constant) and isinstance(n.args[0].value, str)
            and getattr(n.func, "id", "") in ("_P", "ParamSpec")}


@functools.lru_cache(maxsize=None)
def _message_names() -> Set[str]:
    """The message types built in ros2_ws (runa_ood_msgs, vision_msgs, foxglove_msgs)."""
    return {p.stem for p in (REPO / "ros2_ws" / "src").rglob("*.msg")}


@functools.lru_cache(maxsize=None)
def _everywhere() -> Tuple[Set[str], Dict[str, List[ast.ClassDef]]]:
    """Every function or class name defined anywhere in the package (methods and nested ones too),
    and every class by name."""
    defs: Set[str] = set()
    classes: Dict[str, List[ast.ClassDef]] = {}
    for mod in _modules().values():
        for node in ast.walk(mod.tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                defs.add(node.name)
                if isinstance(node, ast.ClassDef):
                    classes.setdefault(node.name, []).append(node)
    return defs, classes


def _module_names(name: str, seen=None) -> Set[str]:
    """A module's top-level names, star imports followed (``ros.params`` re-exports ``core.parameters``)."""
    seen = set() if seen is None else seen
    if name in seen or name not in _modules():
        return set()
    seen.add(name)
    mod = _modules()[name]
    out = set(mod.names)
    is_pkg = mod.path.name == "__init__.py"
    for target, level in mod.star:
        if level:  # relative: from the module's package, up level - 1 packages
            package = (name.split(".") if is_pkg else name.split(".")[:-1]) if name else []
            package = package[: len(package) - (level - 1)]
            full = ".".join([*package, *([target] if target else [])])
        else:
            full = target.removeprefix("runa_ood_node.")
        out |= _module_names(full, seen)
    out |= {k.split(".")[len(name.split(".")) if name else 0] for k in _modules()
            if name and k.startswith(name + ".")}  # submodules are attributes of a package
    return out


def _class_has(cls_name: str, attr: str, depth: int = 0) -> bool:
    """``attr`` is defined by a class of that name (or one of its bases found in the package)."""
    for cls in _everywhere()[1].get(cls_name, []):
        if attr in _class_members(cls):
            return True
        if depth < 5:
            for base in cls.bases:
                b = base.attr if isinstance(base, ast.Attribute) else getattr(base, "id", None)
                if b and _class_has(b, attr, depth + 1):
                    return True
    return False


def _resolve_attrs(module: str, attrs: List[str]) -> Optional[str]:
    """None when ``module`` has ``attrs[0]`` and each further attribute is a member of the class before it."""
    if not attrs:
        return None
    if attrs[0] not in _module_names(module):
        return f"{module or 'runa_ood_node'} has no {attrs[0]!r}"
    if f"{module}.{attrs[0]}".strip(".") in _modules():  # a submodule: go on inside it
        return _resolve_attrs(f"{module}.{attrs[0]}".strip("."), attrs[1:])
    return _resolve_members(attrs[0], attrs[1:])


def _resolve_members(owner: str, attrs: List[str]) -> Optional[str]:
    """Attributes after a class (or function) name: each must be a member of the class before it;
    a member that is not itself a class ends what can be checked statically."""
    for a in attrs:
        if owner not in _everywhere()[1]:
            return None  # a function's or a value's attribute: not followed
        if not _class_has(owner, a):
            return f"class {owner} has no member {a!r}"
        owner = a
    return None


def _module_of_short(name: str) -> List[str]:
    """Modules whose last part is ``name`` (``bagio`` -> ``tools.bagio``)."""
    return [m for m in _modules() if m.split(".")[-1] == name]


def resolve(name: str) -> Optional[str]:
    """None when the cited code name exists; else why not. Raises ValueError for a span that is
    not a code name (prose, a command, a formula)."""
    span = re.sub(r"\(.*\)$", "", name.strip())  # drop a trailing call: `f(a, b)` -> `f`
    if "/" in span:
        if not re.fullmatch(r"[\w./-]+", span) or span.split("/")[0] not in PATH_ROOTS:
            raise ValueError(f"not a code path: {name!r}")  # a topic (`ood/driver_alert`), a pattern
        return _resolve_path(span)
    if not re.fullmatch(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*", span) or span.endswith(FILE_EXT):
        raise ValueError(f"not a code name: {name!r}")  # prose, or a file name without a folder (`summary.json`)
    if span in _parameter_names() or span.startswith("camera.") or span in _message_names():
        return None  # a node parameter (`alert.k`), a per-camera override, a message type of ros2_ws
    parts = span.split(".")
    if parts[0] in EXTERNAL:
        return None
    if parts[0] == "runa_ood_node":
        parts = parts[1:]
        if not parts:
            return None
    # the longest prefix that is a module (full, or by its last part)
    for i in range(len(parts), 0, -1):
        head = ".".join(parts[:i])
        if head in _modules():
            return _resolve_attrs(head, parts[i:])
    shorts = _module_of_short(parts[0])
    if shorts:
        errors = [_resolve_attrs(m, parts[1:]) for m in shorts]
        return None if any(e is None for e in errors) else errors[0]
    defs, classes = _everywhere()
    if parts[0] in classes:
        return _resolve_members(parts[0], parts[1:])
    if len(parts) == 1 and (parts[0] in defs or any(parts[0] in m.names for m in _modules().values())):
        return None  # a function, class or module-level value (`NodeSettings = make_dataclass(...)`)
    if len(parts) == 1 and not re.fullmatch(r"_[a-z]\w*|[A-Z][a-z0-9]+[A-Za-z0-9]*", parts[0]):
        raise ValueError(f"not a code name: {name!r}")  # a word or a formula (`cls`, `lam`, `P_r`)
    return f"no module, class or function {parts[0]!r} in runa_ood_node"


def _resolve_path(span: str) -> Optional[str]:
    span = span.rstrip("/")
    rel = span.removeprefix("runa_ood_node/")
    bases = [PKG, REPO] if rel == span else [PKG]
    last = rel.rsplit("/", 1)[-1]
    if last.endswith(FILE_EXT) or "." not in last:
        for base in bases:
            p = base / rel
            if p.exists() or (not last.endswith(FILE_EXT) and p.with_suffix(".py").exists()):
                return None
        return f"no file or folder {span!r}"
    folder, _, dotted = rel.rpartition("/")
    mod_name, *attrs = dotted.split(".")
    path = PKG / folder / f"{mod_name}.py"
    if not path.exists():
        return f"no module {folder}/{mod_name}.py"
    module = ".".join([*folder.split("/"), mod_name])
    return _resolve_attrs(module, attrs)


# ---------------------------------------------------------------------------------------------- citations
def _strip_fences(text: str) -> Tuple[str, List[str]]:
    """The text without fenced blocks, and the python fenced blocks."""
    blocks = re.findall(r"^```python\n(.*?)^```", text, flags=re.S | re.M)
    return re.sub(r"^```.*?^```", "", text, flags=re.S | re.M), blocks


def cited_names(text: str) -> List[str]:
    """The code names a document cites: inline backtick spans that are code names, and from its
    fenced python blocks each ``module:`` line's module, its ``name(`` calls and ``.method(`` calls."""
    prose, blocks = _strip_fences(text)
    out = []
    for span in re.findall(r"`([^`\n]+)`", prose):
        for piece in re.split(r"\s*(?:/|,)\s+|\s+(?:→|->)\s+", span):  # `a` / `b`, lists
            try:
                resolve(piece)
            except ValueError:
                continue
            out.append(piece)
    for block in blocks:
        module = None
        for line in block.splitlines():
            m = re.match(r"^([a-z_][\w.]*):\s+(.*)$", line)
            rest = line
            if m:
                module, rest = m.group(1), m.group(2)
                out.append(module)
            if module is None:
                continue
            for call in re.findall(r"(?<![\w])([A-Za-z_]\w*)\(", rest):  # `f(`, `.method(`, `Class(`
                out.append(f"@{module}.{call}")
    return out


def _check(name: str) -> Optional[str]:
    """``resolve``, and for a name called in an API block (``@module.name``): the module (a package:
    any of its modules) defines a function, class or method of that name, or has it at top level."""
    if name.startswith("@"):
        module, _, called = name[1:].rpartition(".")
        if module not in _modules():
            return resolve(module)
        if called in _module_names(module):
            return None
        for m, mod in _modules().items():
            if m == module or m.startswith(module + "."):
                for n in ast.walk(mod.tree):
                    if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and n.name == called:
                        return None
                if any(_class_has(c, called) for c in mod.classes):
                    return None
        return f"{module} defines no {called!r}"
    return resolve(name)


# ---------------------------------------------------------------------------------------------- links
def _slug(heading: str) -> str:
    """GitHub's anchor of a heading."""
    s = heading.strip().lower()
    s = re.sub(r"[^\w\- ]", "", s)
    return s.replace(" ", "-")


def _anchors(path: pathlib.Path) -> Set[str]:
    prose, _ = _strip_fences(path.read_text(encoding="utf-8"))
    out, seen = set(), {}
    for h in re.findall(r"^#{1,6}\s+(.*?)\s*#*$", prose, flags=re.M):
        slug = _slug(h)
        n = seen.get(slug, 0)
        out.add(slug if n == 0 else f"{slug}-{n}")
        seen[slug] = n + 1
    return out


def broken_links(path: pathlib.Path) -> List[str]:
    prose, _ = _strip_fences(path.read_text(encoding="utf-8"))
    prose = re.sub(r"`[^`\n]*`", "", prose)
    out = []
    for target in re.findall(r"\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)", prose):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
            continue
        file_part, _, anchor = target.partition("#")
        dest = (path.parent / file_part).resolve() if file_part else path
        if not dest.exists():
            out.append(f"{path.relative_to(REPO)}: {target} (no such file)")
        elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
            out.append(f"{path.relative_to(REPO)}: {target} (no such heading in {dest.name})")
    return out


def _docs() -> List[pathlib.Path]:
    return [README, *sorted((REPO / "docs").glob("*.md"))]


# ---------------------------------------------------------------------------------------------- tests
def test_readme_is_a_front_door_that_opens_with_the_two_commands():
    text = README.read_text(encoding="utf-8")
    assert len(text.splitlines()) <= MAX_README_LINES, "README.md is the front door: move details to docs/"
    assert text.startswith(TWO_COMMANDS), "the two commands open the README, unchanged (CI and tests run them)"


def test_every_relative_link_reaches_a_file_and_heading():
    bad = [b for p in _docs() for b in broken_links(p)]
    assert not bad, "\n".join(bad)


def test_every_code_name_architecture_cites_exists():
    names = cited_names(ARCHITECTURE.read_text(encoding="utf-8"))
    assert len(names) > 50, "the citation finder found too few names: it is broken"
    bad = sorted({f"`{n.lstrip('@')}`: {why}" for n in names if (why := _check(n)) is not None})
    assert not bad, "docs/ARCHITECTURE.md cites what the code does not have:\n" + "\n".join(bad)


def cited_paths(text: str) -> List[str]:
    """The repository paths a document cites in backticks (`tests/unit/test_loss.py`, `config/runa_ood.yaml`,
    `core/methods/runa.py`): spans with a folder whose first part is a room or a repository folder."""
    prose, _ = _strip_fences(text)
    out = []
    for span in re.findall(r"`([^`\n]+)`", prose):
        for piece in re.split(r"\s*(?:/|,)\s+|\s+(?:→|->)\s+", span):
            p = re.sub(r"\(.*\)$", "", piece.strip())
            if "/" in p and re.fullmatch(r"[\w./-]+", p) and p.split("/")[0] in PATH_ROOTS:
                out.append(p)
    return out


def test_every_path_the_docs_cite_exists():
    bad = [f"{p.relative_to(REPO)}: `{c}`: {why}" for p in _docs() for c in cited_paths(p.read_text(encoding="utf-8"))
           if (why := _resolve_path(c)) is not None]
    assert not bad, "the docs cite paths that do not exist (moved? renamed?):\n" + "\n".join(bad)
    assert cited_paths("`tests/ros/no_such_test.py` and `out/demo/` and `ood/driver_alert`") == ["tests/ros/no_such_test.py"]
    assert _resolve_path("tests/ros/no_such_test.py") is not None


@pytest.mark.parametrize("name", [
    "core/pipeline.py", "runa_ood_node/core/", "tools/bagio.iter_frames", "core.alerts.AlertMonitor",
    "factory.build_scorer", "bagio.read_bag", "NodeSettings", "OodScorer.score_frames", "core.registry.BACKBONE_OUTPUTS",
    "ros.params.PARAMETERS", "config/runa_ood.yaml", "DualEncoder.visual_outputs(views, outputs, pairs)",
])
def test_the_resolver_finds_what_exists(name):
    assert resolve(name) is None


@pytest.mark.parametrize("name", [
    "core/no_such_module.py", "tools/bagio.no_such_reader", "core.alerts.NoSuchMonitor", "core.nosuch.thing",
    "OodScorer.no_such_method", "factory.build_no_scorer", "NoSuchClassAnywhere", "_no_such_private_helper",
    "ros/no_such.py", "config/no_such.yaml", "runa_ood_node/core/no_such_room/",
])
def test_the_resolver_refuses_made_up_names(name):
    assert resolve(name) is not None


def test_citations_are_found_in_prose_and_api_blocks_and_made_up_ones_fail():
    doc = ("The reader is `tools/bagio.iter_frames`; `core.pipeline.NoSuchScorer` drifted.\n"
           "```python\ncore.alerts:     AlertMonitor.update(stamp) ; NoSuchThing(x) ; .no_such_method(y)\n```\n")
    names = cited_names(doc)
    assert "tools/bagio.iter_frames" in names and "core.alerts" in names
    bad = {n for n in names if _check(n) is not None}
    assert bad == {"core.pipeline.NoSuchScorer", "@core.alerts.NoSuchThing", "@core.alerts.no_such_method"}
    assert _check("@core.alerts.update") is None and _check("@core.alerts.AlertMonitor") is None


def test_the_link_checker_catches_a_missing_file_and_a_missing_heading(tmp_path, monkeypatch):
    monkeypatch.setitem(globals(), "REPO", tmp_path)
    (tmp_path / "a.md").write_text("# Top\n\n## The node: topics\n\n[ok](b.md) [ok](#the-node-topics) "
                                   "[bad](missing.md) [bad](b.md#nowhere) [web](https://example.com) `[no](x.md)`\n")
    (tmp_path / "b.md").write_text("# B\n")
    got = broken_links(tmp_path / "a.md")
    assert got == ["a.md: missing.md (no such file)", "a.md: b.md#nowhere (no such heading in b.md)"]
