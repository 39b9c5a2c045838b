"""`runa-ood fleet` (tools.fleet) on real bags made by make-bag, through a real local Ray.

Every run that starts Ray goes through a subprocess inside a network namespace that has only
loopback (``unshare -rn sh -c 'ip link set lo up && exec ...'``): Ray registers the machine's own
address otherwise, and traffic here must stay on loopback. Two Ray runs in total (a few seconds to
start each, then the tiny random model) with one worker: the first over a folder with three good
bags, one cut short, a topic-less one and one that is not a bag; the second adds a bag by
``file://`` URI and must redo only that one; a third finds all done. One more run with two workers.
Every run makes Ray cut the actors' outputs through frames (thumbnails for every box, tiny blocks).
"""
import json
import os
import pathlib
import shutil
import subprocess
import sys

import numpy as np
import pytest

from runa_ood_node.tools import bagio, fleet, make_bag

TINY = "runa-tiny-vit"
REPO = pathlib.Path(__file__).resolve().parents[2]
MODEL_ARGS = ["--model", TINY, "--pretrained", "none", "--allow-random-weights"]
S0 = 1_700_000_000_000_000_000


def _netns_prefix():
    """The loopback-only namespace wrapper, or skip (fail under RUNA_OOD_REQUIRE_ROS=1) when user
    and network namespaces cannot be created here."""
    unshare = shutil.which("unshare")
    ok = False
    if unshare:
        r = subprocess.run([unshare, "-rn", "sh", "-c", "ip link set lo up && true"], capture_output=True, timeout=30)
        ok = r.returncode == 0
        why = r.stderr.decode(errors="replace").strip()
    else:
        why = "no unshare binary"
    if not ok:
        msg = f"cannot create a loopback-only network namespace (unshare -rn): {why}; Ray must not run outside one"
        if os.environ.get("RUNA_OOD_REQUIRE_ROS"):
            pytest.fail(msg)
        pytest.skip(msg)
    return [unshare, "-rn", "sh", "-c", 'ip link set lo up && exec "$@"', "sh"]


def _env():
    from runa_ood_node.tools.bag_eval import child_env

    env = child_env({"PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
                     "RAY_USAGE_STATS_ENABLED": "0"})
    return env


def _fleet(inputs, out, *extra, workers=1, timeout=300):
    """``runa-ood fleet`` in a loopback-only namespace; returns (summary.json, stdout+stderr)."""
    cmd = _netns_prefix() + [sys.executable, "-m", "runa_ood_node.tools.cli", "fleet", *map(str, inputs),
                             "--out", str(out), *MODEL_ARGS, "--workers", str(workers), "--no-progress", *extra]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=_env())
    log = r.stdout + r.stderr
    assert r.returncode == 0, log[-4000:]
    return json.loads((out / "summary.json").read_text()), log


def _heavy_frames(n_frames: int = 4, per_frame: int = 12):
    """Frames of real photographs with many boxes each (a grid of ``per_frame``): the heavy frames
    whose rows an actor's output block is most likely to be cut through."""
    src = make_bag.skimage_frames("voc", names=["astronaut", "coffee", "chelsea", "rocket"])
    out = []
    for k in range(n_frames):
        f = src[k % len(src)]
        rgb = f.load()
        h, w = rgb.shape[:2]
        cols = 4
        bw, bh = w / cols, h / ((per_frame + cols - 1) // cols)
        boxes = np.asarray([[(i % cols) * bw + 2, (i // cols) * bh + 2, bw - 4, bh - 4] for i in range(per_frame)],
                           np.float32)
        cats = ["person" if i % 3 else "giraffe" for i in range(per_frame)]
        out.append(make_bag.FrameSpec(name=f"heavy{k}", load=f.load, boxes=boxes, categories=cats,
                                      is_ood=np.asarray([c == "giraffe" for c in cats]),
                                      ids=[f"h{k}_{i}" for i in range(per_frame)],
                                      scores=np.linspace(1.0, 0.5, per_frame).astype(np.float32), source="test"))
    return out


@pytest.fixture(scope="module")
def bags(tmp_path_factory):
    """A folder with three good bags (MCAP raw, sqlite3, MCAP with 12 boxes per frame), an MCAP cut
    short (its recorder "lost power": read up to the cut), a bag without image and detections
    topics, one that is not a bag at all and a corrupt sqlite3 bag; and, outside it, a good bag of
    compressed images."""
    root = tmp_path_factory.mktemp("fleet")
    frames = make_bag.skimage_frames("voc", mirrored=True)
    d = root / "bags"
    make_bag.write_bag(frames[:3], d / "a", start_ns=S0, progress=False)
    make_bag.write_bag(frames[3:6], d / "b", storage="sqlite3", start_ns=S0 + 10**10, progress=False)
    make_bag.write_bag(_heavy_frames(), d / "heavy", start_ns=S0 + 5 * 10**10, progress=False)
    make_bag.write_bag(frames[:4], d / "trunc", start_ns=S0 + 3 * 10**10, progress=False)
    mcap = next((d / "trunc").glob("*.mcap"))
    mcap.write_bytes(mcap.read_bytes()[: int(mcap.stat().st_size * 0.6)])
    with bagio.BagWriter(d / "notopic") as w:
        w.write(bagio.GROUND_TRUTH_TOPIC, bagio.GROUND_TRUTH_TYPE, S0,
                bagio.ground_truth_msg(bagio.header(S0), ["1"], [True], ["x"]))
    make_bag.write_bag(frames[:1], d / "garbage", start_ns=S0 + 4 * 10**10, progress=False)
    next((d / "garbage").glob("*.mcap")).write_bytes(b"not an mcap file" * 64)
    make_bag.write_bag(frames[:1], d / "badsql", storage="sqlite3", start_ns=S0 + 6 * 10**10, progress=False)
    db = next((d / "badsql").glob("*.db3"))
    db.write_bytes(db.read_bytes()[:1024] + b"\xde\xad" * 2048)
    make_bag.write_bag(frames[6:8], root / "extra" / "c", compressed=True, start_ns=S0 + 2 * 10**10, progress=False)
    return root


#: every box gets thumbnails (top-K above the box count), two frames per batch and blocks far
#: smaller than one row of thumbnails: Ray cuts actor outputs through frames
SPLIT = ["--top-k", "1000", "--batch-frames", "2", "--block-mb", "0.02"]
GOOD = ("a", "b", "heavy", "trunc")


def _evaluate_bag(bag, out):
    from runa_ood_node.tools import cli

    assert cli.main(["evaluate", "--bag", str(bag), *MODEL_ARGS, "--out", str(out), "--no-progress"]) == 0
    return json.loads((out / "bag_report_offline.json").read_text())


@pytest.fixture(scope="module")
def evaluated(bags, tmp_path_factory):
    """``runa-ood evaluate --bag`` of every good bag (the reference fleet must equal)."""
    out = tmp_path_factory.mktemp("eval")
    paths = {n: bags / "bags" / n for n in GOOD}
    paths["c"] = bags / "extra" / "c"
    return {n: _evaluate_bag(p, out / n) for n, p in paths.items()}


def _records(out, bag):
    import pyarrow.dataset as pads

    t = pads.dataset(str(out / "records"), format="parquet", partitioning="hive").to_table()
    return [r for r in t.to_pylist() if r["bag"] == str(bag)]


def _check_every_box_once(rep, out, bags, evaluated, extra=None):
    """Every good bag: done, its records are exactly the boxes ``evaluate --bag`` reports, once
    each, with the same scores; its summary reconciles boxes read = written + dropped."""
    by_bag = {pathlib.Path(s["bag"]).name: s for s in rep["bags"]}
    for name, ref_rep in evaluated.items():
        if name == "c" and extra is None:
            continue
        s = by_bag[name]
        assert s["status"] == "done", s
        ref = ref_rep["records"]
        got = _records(out, extra if name == "c" else bags / "bags" / name)
        keys = [(r["stamp_ns"], r["det_id"]) for r in got]
        assert len(keys) == len(set(keys)), f"{name}: a box written twice"
        assert len(got) == len(ref) == s["boxes"] > 0, (name, len(got), len(ref), s["boxes"])
        a = {(r["stamp_ns"], r["id"]): r for r in ref}
        b = {(r["stamp_ns"], r["det_id"]): r for r in got}
        assert set(a) == set(b)
        assert max(abs(a[k]["uncertainty"] - b[k]["uncertainty"]) for k in a) <= 1e-5
        for k in a:
            assert (b[k]["status"], b[k]["label"], b[k]["is_ood"], b[k]["gt_is_ood"]) == \
                   (a[k]["status"], a[k]["label"], a[k]["is_ood"], a[k]["gt_is_ood"])
        assert s["ood_boxes"] == sum(r["is_ood"] for r in ref)
        assert s["boxes_read"] == s["boxes"] + sum(s["boxes_dropped"].values())
        assert bool(s.get("recovered")) == (name == "trunc") == bool(ref_rep["recovered"])
    t = rep["totals"]
    assert t["boxes_read"] == t["boxes"] + sum(t["boxes_dropped"].values())
    return by_bag


def test_fleet_equals_evaluate_reports_bad_bags_and_resumes(bags, evaluated, tmp_path):
    """One worker, outputs cut through frames (SPLIT): every box of every frame is written once and
    equals evaluate --bag; the cut bag is recovered, the bad ones fail on their own; a second run
    adds a bag by URI and redoes only that one."""
    out = tmp_path / "out"
    rep, log = _fleet([bags / "bags"], out, *SPLIT)
    by_bag = _check_every_box_once(rep, out, bags, evaluated)
    assert set(by_bag) == {"a", "b", "heavy", "trunc", "notopic", "garbage", "badsql"}
    assert by_bag["notopic"]["status"] == "failed" and "no image topic" in by_bag["notopic"]["error"]
    assert by_bag["garbage"]["status"] == "failed" and "not an MCAP file" in by_bag["garbage"]["error"]
    assert by_bag["badsql"]["status"] == "failed" and "cannot be read" in by_bag["badsql"]["error"]
    assert all("\n" not in by_bag[k]["error"] and "Traceback" not in log for k in ("garbage", "badsql"))
    assert by_bag["trunc"]["recovered"]["bytes_unread"] > 0 and "RECOVERED" in log
    assert "FAILED" in log and "RANDOM WEIGHTS" in log
    assert rep["random_weights"] is True and rep["identity"]["weights"] == "RANDOM"
    t = rep["totals"]
    assert (t["bags_done"], t["bags_failed"], t["bags_recovered"]) == (4, 3, 1)
    assert f"{t['boxes_read']} read = {t['boxes']} written + " in log
    perf = rep["performance"]
    assert perf["bags_scored"] == 7 and perf["boxes_per_s"] > 0 and perf["scoring_boxes_per_s"] > 0
    assert sum(perf["worker_boxes"].values()) == perf["boxes"] == t["boxes"]
    assert all(v > 0 for v in perf["worker_peak_rss_mb"].values())
    assert perf["rows_for_unknown_bags"] == {}

    # outputs: summary CSV, metrics (evaluate's table, overall and per bag), top-K sheet + COCO export
    csv_text = (out / "summary.csv").read_text()
    assert csv_text.count("\n") == 8 and "failed" in csv_text and "bytes unread" in csv_text
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["random_weights"] is True
    assert set(metrics["per_bag"]) == {str(bags / "bags" / n) for n in GOOD}
    n_boxes = sum(by_bag[k]["boxes"] for k in GOOD)
    assert metrics["overall"]["n_id"] + metrics["overall"]["n_ood"] == n_boxes == t["boxes"]
    coco = json.loads((out / "top_ood" / "coco.json").read_text())
    assert "RANDOM WEIGHTS" in coco["info"]["description"]
    n_ok = sum(by_bag[k]["boxes_scored"] for k in GOOD)
    assert len(coco["images"]) == len(coco["annotations"]) == n_ok  # --top-k above the box count: all of them
    unc = [a["uncertainty"] for a in coco["annotations"]]
    assert unc == sorted(unc, reverse=True)
    assert all((out / "top_ood" / im["file_name"]).is_file() and im["frame"]["stamp_ns"] > 0 for im in coco["images"])
    import cv2

    sheet = cv2.imread(str(out / "top_ood" / "contact_sheet.png"))
    assert sheet is not None and sheet.shape[0] > 200

    # resumption: a second run adds a bag by file:// URI (through pyarrow's filesystem layer, as an
    # object store); only that one is scored, every earlier record file is left as it was
    parts = {p.name: p.stat().st_mtime_ns for p in (out / "records").rglob("*.parquet")}
    extra = "file://" + str(bags / "extra" / "c")
    rep2, log2 = _fleet([bags / "bags", extra], out, *SPLIT)
    assert rep2["performance"]["bags_scored"] == 1
    by2 = _check_every_box_once(rep2, out, bags, evaluated, extra=extra)
    assert all(s["resumed"] for n, s in by2.items() if n != "c") and not by2["c"]["resumed"]
    after = {p.name: p.stat().st_mtime_ns for p in (out / "records").rglob("*.parquet")}
    assert {k: v for k, v in after.items() if k in parts} == parts and len(after) == len(parts) + 1
    t2 = rep2["totals"]
    assert t2["bags_resumed"] == 7 and t2["boxes"] == t["boxes"] + by2["c"]["boxes"]
    assert f"{t2['boxes_read']} read = {t2['boxes']} written + " in log2

    # a third run finds everything done and starts no Ray at all
    rep3, log3 = _fleet([bags / "bags", extra], out, *SPLIT)
    assert rep3["performance"] == {"bags_scored": 0, "wall_s": rep3["performance"]["wall_s"]}
    assert "Running Dataset" not in log3 and rep3["totals"] == {**t2, "bags_resumed": 8}


def test_two_workers_lose_no_box_either(bags, evaluated, tmp_path):
    out = tmp_path / "out2"
    rep, log = _fleet([bags / "bags"], out, *SPLIT, workers=2)
    _check_every_box_once(rep, out, bags, evaluated)
    assert rep["performance"]["workers"] == 2


def _rows(key, fi, n, boxes, stamp=1):
    """Score-stage rows of frame ``fi`` (``n`` rows in all), box indices ``boxes``."""
    import pyarrow as pa

    return pa.Table.from_pylist([{"kind": "box", "bag_key": key, "bag": "/x/bag", "topic": "/t", "stamp_ns": stamp + fi,
                                  "frame_index": fi, "frame_rows": n, "box_index": i, "det_id": f"{fi}_{i}",
                                  "status": "OK", "is_ood": False, "uncertainty": -0.1} for i in boxes],
                                schema=fleet._out_schema())


def _end(key, frame_boxes, boxes_read=None, **kw):
    import pyarrow as pa

    info = {"frames_sent": len(frame_boxes), "frame_boxes": {str(k): v for k, v in frame_boxes.items()},
            "boxes_read": sum(frame_boxes.values()) if boxes_read is None else boxes_read, "images": len(frame_boxes),
            "drops": {}, "box_drops": {}, "error": None, **kw}
    return pa.Table.from_pylist([{"kind": "bag_end", "bag_key": key, "bag": "/x/bag", "frame_index": -1,
                                  "frame_rows": 0, "box_index": -1, "info": json.dumps(info)}],
                                schema=fleet._out_schema())


def test_bag_commits_only_when_every_row_of_every_frame_is_in(tmp_path):
    """A frame's rows may come back in several blocks, its end marker before or after them: the
    bag is complete only when every frame has the rows its score stage announced; a row arriving
    after the commit fails the bag (records removed), a duplicate row fails it too."""
    import pyarrow.parquet as pq

    ident = {"model": TINY, "weights": "RANDOM", "model_id": "m", "random_weights": True}
    ref = fleet.BagRef("/x/bag", True, 10, 20)
    st = fleet.BagState(ref, ref.key("cfg"))
    st.add(_rows(st.key, 0, 6, range(4)))  # frame 0: 4 of its 6 rows (the block was cut)
    st.add(_end(st.key, {0: 6, 1: 2}))
    st.add(_rows(st.key, 1, 2, range(2)))
    assert not st.complete  # every frame index has been seen, but frame 0 lacks 2 rows
    st.add(_rows(st.key, 0, 6, range(4, 6)))
    assert st.complete
    s = fleet.commit_bag(tmp_path, st, ident, top_k=5)
    assert s["status"] == "done" and s["boxes"] == s["boxes_read"] == 8
    assert sorted(pq.read_table(tmp_path / s["records"]).column("box_index").to_pylist()) == [0, 0, 1, 1, 2, 3, 4, 5]
    # a late row after the commit: the bag was not complete after all -> failed, records removed
    fleet.fail_committed(tmp_path, s, "incomplete: 1 row(s) arrived after the bag was committed")
    assert s["status"] == "failed" and not list((tmp_path / "records").rglob("*.parquet"))
    assert fleet.load_done(tmp_path, st.key)["status"] == "failed"  # --retry-failed redoes it
    # a duplicate row fails the bag; so does a count that does not reconcile with the boxes read
    dup = fleet.BagState(ref, ref.key("dup"))
    dup.add(_end(dup.key, {0: 2}))
    dup.add(_rows(dup.key, 0, 2, range(2)))
    dup.add(_rows(dup.key, 0, 2, [1]))
    assert dup.complete and "duplicate" in fleet.commit_bag(tmp_path, dup, ident, 5)["error"]
    short = fleet.BagState(ref, ref.key("short"))
    short.add(_end(short.key, {0: 2}, boxes_read=3))
    short.add(_rows(short.key, 0, 2, range(2)))
    s3 = fleet.commit_bag(tmp_path, short, ident, 5)
    assert s3["status"] == "failed" and "3 boxes read, 2 rows written" in s3["error"]


def test_interrupted_bag_is_redone(tmp_path):
    """A bag counts as done only once its state file and its records file are both there: a run
    killed between the two writes (or before) scores the bag again."""
    import pyarrow.parquet as pq

    ref = fleet.BagRef("/x/bag", True, 10, 20)
    st = fleet.BagState(ref, ref.key("cfg"))
    st.end = {"frames_sent": 0, "images": 0, "drops": {}, "error": None}
    ident = {"model": TINY, "weights": "RANDOM", "model_id": "m", "random_weights": True}
    summary = fleet.commit_bag(tmp_path, st, ident, top_k=5)
    assert summary["status"] == "done" and summary["boxes"] == 0
    assert fleet.load_done(tmp_path, st.key)["status"] == "done"
    assert pq.read_table(tmp_path / summary["records"]).num_rows == 0
    (tmp_path / summary["records"]).unlink()
    assert fleet.load_done(tmp_path, st.key) is None
    assert fleet.load_done(tmp_path, "another") is None
    assert not list(tmp_path.rglob(".*.tmp*")), "no temporary files left behind"


def test_bag_key_follows_file_and_model_config(bags):
    refs = {pathlib.Path(r.uri).name: r for r in fleet.expand_inputs([str(bags / "bags")])}
    a = refs["a"]
    assert a.key("cfg1") == a.key("cfg1") and a.key("cfg1") != a.key("cfg2")
    touched = fleet.BagRef(a.uri, a.local, a.size, a.mtime_ns + 1)
    assert touched.key("cfg1") != a.key("cfg1")


def test_expand_inputs_folders_globs_uris(bags):
    d = bags / "bags"
    names = lambda refs: sorted(pathlib.Path(r.uri).name for r in refs)  # noqa: E731
    assert names(fleet.expand_inputs([str(d)])) == ["a", "b", "badsql", "garbage", "heavy", "notopic", "trunc"]
    assert names(fleet.expand_inputs([str(d / "a"), str(d / "b" / "metadata.yaml")])) == ["a", "b"]
    assert names(fleet.expand_inputs([str(d / "[ab]")])) == ["a", "b"]
    uri = fleet.expand_inputs(["file://" + str(bags / "extra")])
    assert [r.uri for r in uri] == ["file://" + str(bags / "extra" / "c")] and uri[0].size > 0
    bare = fleet.expand_inputs([str(next((d / "a").glob("*.mcap")))])
    assert len(bare) == 1 and bare[0].uri.endswith(".mcap") and bare[0].error is None
    missing = fleet.expand_inputs([str(bags / "nope")])
    assert len(missing) == 1 and "no such" in missing[0].error


def test_refuses_local_ray_outside_a_loopback_namespace(bags, tmp_path, capsys):
    """No Ray is started: the check comes first."""
    if not fleet.non_loopback_interfaces():
        pytest.skip("this machine has only loopback: nothing to refuse")
    from runa_ood_node.tools import cli

    with pytest.raises(SystemExit) as exc:
        cli.main(["fleet", str(bags / "bags" / "a"), "--out", str(tmp_path / "o"), *MODEL_ARGS])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "unshare -rn" in err and "--allow-network" in err
    assert not (tmp_path / "o").exists()


def test_namespace_has_only_loopback():
    cmd = _netns_prefix() + [sys.executable, "-c",
                             "from runa_ood_node.tools.fleet import non_loopback_interfaces as f; print(f())"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=60, env=_env())
    assert r.returncode == 0 and r.stdout.strip() == "[]", r.stderr


def test_remote_bag_is_copied_for_reading(bags, tmp_path):
    """A bag on a non-local filesystem is copied to a temporary folder for the reader (exercised
    with pyarrow's local filesystem standing in for an object store)."""
    src = bags / "bags" / "a"
    path = fleet._localise("file://" + str(src), False, str(tmp_path))
    assert pathlib.Path(path) != src and (pathlib.Path(path) / "metadata.yaml").is_file()
    assert bagio.bag_info(path).counts == bagio.bag_info(src).counts
