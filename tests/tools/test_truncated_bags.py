"""Bags cut short or unreadable (issue 17, item 4): never a traceback, never a silent loss.

An MCAP whose recorder lost power has no footer; ``bagio`` reads it up to its last complete
message and reports how much it recovered. A bag that cannot be read at all (empty, not a bag, a
corrupt sqlite3 file) gives one line (``BagError``) and a non-zero exit in every offline tool.
"""
import json
import pathlib
import sqlite3

import numpy as np
import pytest

from runa_ood_node.tools import bagio, cli, make_bag

TINY = ["--model", "runa-tiny-vit", "--pretrained", "none", "--allow-random-weights"]
S0 = 1_700_000_000_000_000_000


@pytest.fixture(scope="module")
def full_bag(tmp_path_factory):
    root = tmp_path_factory.mktemp("trunc")
    make_bag.write_bag(make_bag.skimage_frames("voc", mirrored=True)[:6], root / "full", start_ns=S0, progress=False)
    return root / "full"


def _cut(src: pathlib.Path, dst: pathlib.Path, frac: float) -> pathlib.Path:
    """A copy of the bag ``src`` whose MCAP file keeps only the first ``frac`` of its bytes."""
    dst.mkdir(parents=True)
    for f in src.iterdir():
        data = f.read_bytes()
        (dst / f.name).write_bytes(data[: int(len(data) * frac)] if f.suffix == ".mcap" else data)
    return dst


@pytest.mark.parametrize("frac", [0.35, 0.7, 0.999])
def test_cut_mcap_reads_every_complete_message_up_to_the_cut(full_bag, tmp_path, frac):
    whole = list(bagio.read_bag(full_bag))
    bag = _cut(full_bag, tmp_path / "cut", frac)
    got = list(bagio.read_bag(bag))
    info = bagio.bag_info(bag)
    assert info.recovered and bagio.bag_info(full_bag).recovery is None
    rec = info.recovery
    assert 0 < len(got) < len(whole)
    assert got == whole[: len(got)]  # a prefix, byte for byte
    assert rec.messages == len(got) and rec.last_stamp_ns == got[-1].stamp_ns and not rec.complete
    size = next(bag.glob("*.mcap")).stat().st_size
    assert rec.bytes_unread > 0 and rec.bytes_read + rec.bytes_unread == size
    assert sum(info.counts.values()) == len(got)
    assert "File end magic" in rec.reason and "recovered" in rec.describe()
    # what the cut loses is at most the message being written plus the pairs it breaks
    frames = [f for f in bagio.iter_frames(bag) if f.ok]
    whole_frames = [f for f in bagio.iter_frames(full_bag) if f.ok]
    assert [f.stamp_ns for f in frames] == [f.stamp_ns for f in whole_frames[: len(frames)]]


def test_bare_mcap_without_metadata_is_read_whole(full_bag, tmp_path):
    src = next(full_bag.glob("*.mcap"))
    bare = tmp_path / "bare.mcap"
    bare.write_bytes(src.read_bytes())
    info = bagio.bag_info(bare)
    assert info.recovery.complete and info.recovery.bytes_unread == 0
    assert list(bagio.read_bag(bare)) == list(bagio.read_bag(full_bag))


def _bad_bags(full_bag, root: pathlib.Path):
    bad = {}
    root.mkdir(parents=True, exist_ok=True)
    bad["empty folder"] = root / "empty"
    bad["empty folder"].mkdir()
    e = _cut(full_bag, root / "empty_mcap", 0.0)
    bad["empty mcap"] = e
    g = _cut(full_bag, root / "garbage", 1.0)
    next(g.glob("*.mcap")).write_bytes(b"this is not an mcap file at all" * 10)
    bad["not mcap"] = g
    sq = root / "sq"
    make_bag.write_bag(make_bag.skimage_frames("voc")[:2], sq, storage="sqlite3", start_ns=S0, progress=False)
    db = next(sq.glob("*.db3"))
    db.write_bytes(db.read_bytes()[:2048] + b"\xde\xad" * 4096)
    bad["corrupt sqlite3"] = sq
    return bad


def test_unreadable_bags_raise_one_line_bag_errors(full_bag, tmp_path):
    for what, bag in _bad_bags(full_bag, tmp_path).items():
        with pytest.raises(bagio.BagError) as ei:
            bagio.bag_info(bag)
            list(bagio.read_bag(bag))
        assert "\n" not in str(ei.value) and str(bag) in str(ei.value), (what, str(ei.value))


def test_evaluate_bag_on_a_cut_bag_reports_recovered_and_scores_the_prefix(full_bag, tmp_path, capsys):
    bag = _cut(full_bag, tmp_path / "cut", 0.6)
    assert cli.main(["evaluate", "--bag", str(bag), *TINY, "--out", str(tmp_path / "o1"), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "RECOVERED bag" in out
    rep = json.loads((tmp_path / "o1" / "bag_report_offline.json").read_text())
    assert rep["recovered"]["messages"] > 0 and rep["recovered"]["bytes_unread"] > 0
    assert cli.main(["evaluate", "--bag", str(full_bag), *TINY, "--out", str(tmp_path / "o2"), "--no-progress"]) == 0
    full = json.loads((tmp_path / "o2" / "bag_report_offline.json").read_text())
    assert full["recovered"] is None
    got = {(r["stamp_ns"], r["id"]): r["uncertainty"] for r in rep["records"]}
    ref = {(r["stamp_ns"], r["id"]): r["uncertainty"] for r in full["records"]}
    assert 0 < len(got) < len(ref) and set(got) <= set(ref)
    np.testing.assert_allclose([got[k] for k in sorted(got)], [ref[k] for k in sorted(got)], atol=1e-6)


def test_evaluate_bag_on_unreadable_bags_exits_2_with_one_line(full_bag, tmp_path, capsys):
    for what, bag in _bad_bags(full_bag, tmp_path).items():
        rc = cli.main(["evaluate", "--bag", str(bag), *TINY, "--out", str(tmp_path / "o"), "--no-progress"])
        err = capsys.readouterr().err
        assert rc == 2, what
        assert "Traceback" not in err and str(bag) in err, (what, err)


def test_replay_on_cut_and_unreadable_bags(full_bag, tmp_path, capsys):
    pytest.importorskip("rclpy")
    bag = _cut(full_bag, tmp_path / "cut", 0.6)
    assert cli.main(["replay", str(bag), "--rate", "0", "--ack-timeout", "1"]) == 0
    cap = capsys.readouterr()
    n = bagio.bag_info(bag).recovery.messages
    assert "recovered" in cap.err and f"published {n} messages" in cap.out
    for what, bad in _bad_bags(full_bag, tmp_path / "bad").items():
        assert cli.main(["replay", str(bad), "--rate", "0"]) == 1, what
        err = capsys.readouterr().err
        assert "replay failed" in err and "Traceback" not in err, (what, err)


def test_sqlite_bag_corrupted_after_its_index_fails_in_one_line(tmp_path):
    """rosbags opens it (the schema is intact) but a page of messages is garbage."""
    sq = tmp_path / "sq"
    make_bag.write_bag(make_bag.skimage_frames("voc")[:2], sq, storage="sqlite3", start_ns=S0, progress=False)
    db = next(sq.glob("*.db3"))
    with sqlite3.connect(db) as c:
        n = c.execute("select count(*) from messages").fetchone()[0]
    assert n > 0
    data = bytearray(db.read_bytes())
    data[len(data) // 2: len(data) // 2 + 4096] = b"\xff" * 4096
    db.write_bytes(bytes(data))
    try:
        msgs = list(bagio.read_bag(sq))
    except bagio.BagError as exc:
        assert "\n" not in str(exc)
    else:  # the garbage landed in image bytes: the bag still reads, message for message
        assert len(msgs) == n
