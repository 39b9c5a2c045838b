"""The bounded hostile-input campaign (`runa-ood fuzz`), in the suite.

Two node processes (raw and compressed transport, tiny random model) receive thousands of generated
messages over real DDS in every category of ``runa_ood_node.tools.fuzz.CATEGORIES``. Asserted for
each: the node is alive; every published message was received or counted as lost in transport;
received = 2 x (scored + frame drops + queued) + pairer drops + pending + input drops; every
/diagnostics message balanced; no stamp answered twice; a known-good pair answered afterwards with
its source header; peak RSS bounded. About 25 s of fuzzing plus the nodes' start-up.
"""
import argparse
import json

import pytest

pytest.importorskip("rclpy")
pytest.importorskip("runa_ood_msgs.msg", reason="interface packages not built (bash scripts/setup.sh)")
pytest.importorskip("vision_msgs.msg", reason="interface packages not built (bash scripts/setup.sh)")

from runa_ood_node.tools import fuzz  # noqa: E402

DURATION_S = 25


def test_bounded_fuzz_campaign(tmp_path, capsys):
    parser = argparse.ArgumentParser()
    fuzz.add_arguments(parser)
    args = parser.parse_args(["--duration", str(DURATION_S), "--out", str(tmp_path), "--seed", "1"])
    code = fuzz.run(args)
    report = json.loads((tmp_path / "report.json").read_text())
    print(capsys.readouterr().out)  # the figures, for the log
    assert code == 0 and not report["problems"], report["problems"]
    assert [ph["transport"] for ph in report["phases"]] == ["raw", "compressed"]
    total = 0
    for ph in report["phases"]:
        cats = fuzz.CATEGORIES_COMPRESSED if ph["transport"] == "compressed" else fuzz.CATEGORIES_RAW
        expected = {c for c in cats if c != "decompression_bomb" or ph["bombs_included"]}
        assert set(ph["messages_by_category"]) == expected, ph["messages_by_category"]
        total += sum(ph["messages_by_category"].values())
        assert ph["node_alive"] and ph["known_good_answered"] and ph["stamps_answered_twice"] == 0
        for s in ("image", "detections"):
            assert ph["published"][s] == ph["received"][s] + ph["lost_in_transport"][s]
        assert ph["books"]["received"] == ph["books"]["accounted"] == sum(ph["received"].values())
        assert ph["diagnostics_messages"] >= 5 and ph["diagnostics_unbalanced"] == 0
        drops = ph["drops_by_reason"]
        assert drops.get("stamp_in_future", 0) > 0  # the far stamps were sent and refused
        assert ph["frames_scored"] > 0
        # memory: bounded, and no growth beyond noise over the run
        assert ph["rss_mb"]["peak"] < ph["rss_mb"]["start"] + 400.0, ph["rss_mb"]
    assert total >= 1000


def test_malformed_cdr_payloads_are_never_empty():
    """Issue 9 (seed 1 failed in the compressed phase): the generator published a zero-length
    detections payload, which wedged its own reliable writer (no reader, not even an independent
    one, got another detections message from it), so the node looked silenced. Every malformed
    payload keeps at least one byte; the truncation, bit-flip, random-body and huge-length
    variants are all still generated, down to a 1-byte payload."""
    import random

    from rclpy.serialization import serialize_message
    from vision_msgs.msg import Detection2DArray

    raw = serialize_message(Detection2DArray())  # short (24 bytes): a truncation to 0 would be frequent
    rng = random.Random(1)
    payloads = [fuzz.malformed_payload(raw, rng) for _ in range(5000)]
    assert min(len(p) for p in payloads) >= 1
    assert min(len(p) for p in payloads) < 4  # truncated headers are still covered
    assert any(p[8:12] == b"\xff\xff\xff\x7f" for p in payloads)
    assert any(len(p) > len(raw) for p in payloads)  # random bodies
