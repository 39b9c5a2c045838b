"""bench-node --cameras --rig-variants: more one-node setups in the same run (parsing, the summary)."""
from __future__ import annotations

import argparse

import pytest

from runa_ood_node.tools.bench_node import _parse_variants, _print_cameras_table, _variant_name


def test_variants_are_read_as_the_parameter_table_types():
    got = _parse_variants("gather_window_ms=5; scoring_threads=2, gather_window_ms=2.5;")
    assert got == [{"gather_window_ms": 5.0}, {"scoring_threads": 2, "gather_window_ms": 2.5}]
    assert isinstance(got[0]["gather_window_ms"], float)  # ROS refuses an integer for a double parameter
    assert _variant_name(got[1]) == "scoring_threads=2,gather_window_ms=2.5"
    assert _parse_variants("") == []
    for bad in ("gather_window=5", "scoring_threads", "=3"):
        with pytest.raises(ValueError):
            _parse_variants(bad)


def test_every_rig_setup_is_compared_with_the_n_nodes(capsys):
    base = {"p50_ms_mean_over_cameras": 40.0, "p95_ms_worst_camera": 100.0, "offered_fps": 180.0,
            "frames_per_backend_call": 3.0, "cameras": 6}
    rows = [dict(base, setup="one node", rig=True, processes=1, rss_mb_total=1000.0, fps=120.0),
            dict(base, setup="one node [gather_window_ms=5.0]", rig=True, processes=1, rss_mb_total=1000.0, fps=90.0,
                 p95_ms_worst_camera=130.0),
            dict(base, setup="6 nodes", rig=False, processes=6, rss_mb_total=5400.0, fps=100.0, frames_per_backend_call=1.0)]
    args = argparse.Namespace(model="m", pretrained="", backend="torch", device="cpu", boxes=5, rate=30.0, duration=10.0)
    _print_cameras_table(args, rows)
    text = capsys.readouterr().out
    assert "N=6: one node's RSS = 1.11x one single-camera node's (meets <= 1.3x); its throughput = 1.20x" in text
    assert ("N=6: one node [gather_window_ms=5.0]'s RSS = 1.11x one single-camera node's (meets <= 1.3x); its "
            "throughput = 0.90x the 6 nodes' (MISSES >= 1x); p50 40 / p95 130 ms") in text
