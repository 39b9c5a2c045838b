"""The house's structure: no import cycle at any level (imports inside functions included), each
room imports only the rooms below it, and the unit room stays free of ROS and subprocesses.

The graph comes from scripts/house_metrics.py (AST only), the same walk that gives the closing
note's figures.
"""
import ast
import importlib.util
import pathlib

import pytest

REPO = pathlib.Path(__file__).resolve().parents[2]


def _metrics():
    spec = importlib.util.spec_from_file_location("house_metrics", REPO / "scripts" / "house_metrics.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


HM = _metrics()
#: room -> the rooms it may import (tools may import everything)
ALLOWED = {
    "core": set(),
    "backends": {"core"},
    "proving_ground": {"core"},
    "factory": {"core", "backends"},
    "ros": {"core", "backends", "factory"},
    "tools": {"core", "backends", "factory", "ros", "proving_ground"},
}


@pytest.fixture(scope="module")
def graph():
    return HM.import_graph(REPO)


def test_the_walk_sees_every_spelling(tmp_path):
    pkg = tmp_path / "runa_ood_node"
    (pkg / "core").mkdir(parents=True)
    (pkg / "ros").mkdir()
    for f in ("__init__.py", "core/__init__.py", "ros/__init__.py", "ros/b.py", "ros/c.py"):
        (pkg / f).write_text("")
    (pkg / "core" / "a.py").write_text("def f():\n    from ..ros import b\n")
    (pkg / "ros" / "b.py").write_text("import runa_ood_node.core.a\n")
    (pkg / "ros" / "c.py").write_text("from . import b\nfrom runa_ood_node.core.a import f\n")
    g = HM.import_graph(tmp_path)
    assert g["runa_ood_node.core.a"] == {"runa_ood_node.ros.b"}
    assert g["runa_ood_node.ros.c"] == {"runa_ood_node.ros.b", "runa_ood_node.core.a"}
    assert HM.cycles(g) == [["runa_ood_node.core.a", "runa_ood_node.ros.b"]]


def test_no_module_import_cycle(graph):
    assert HM.cycles(graph) == []


def test_no_room_import_cycle_and_rooms_import_only_downwards(graph):
    rooms = HM.package_graph(graph)
    assert HM.cycles(rooms) == []
    wrong = []
    for room, deps in rooms.items():
        name = room.split(".")[-1]
        for d in deps:
            if d.split(".")[-1] not in ALLOWED.get(name, set()):
                wrong.append(f"{name} imports {d.split('.')[-1]}")
    assert not wrong, wrong


def test_thresholds_sit_low_in_core(graph):
    """The thresholds' lookup policy imports only what is below the scorer (no pipeline, encoder or methods)."""
    low = {"runa_ood_node.core.metrics", "runa_ood_node.core.plain", "runa_ood_node.core.registry"}
    assert graph["runa_ood_node.core.thresholds"] <= low, graph["runa_ood_node.core.thresholds"] - low


def test_unit_room_has_no_ros_and_no_subprocess():
    banned = {"rclpy", "subprocess", "launch", "launch_ros", "launch_testing"}
    found = []
    for f in sorted((REPO / "tests" / "unit").glob("test_*.py")):
        for node in ast.walk(ast.parse(f.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and not node.level:
                names = [node.module or ""]
            found += [f"{f.name}: {n}" for n in names if n.split(".")[0] in banned]
    assert not found, found
