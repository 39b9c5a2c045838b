"""`runa-ood fleet` (tools.fleet) on real bags made by make-bag, through a real local Ray.

Every run that starts Ray goes through a subprocess inside a network namespace that has only
loopback (``unshare -rn sh -c 'ip link set lo up && exec ...'``): Ray registers the machine's own
address otherwise, and traffic here must stay on loopback. Two Ray runs in total (a few seconds to
start each, then the tiny random model): the first over a folder with two good bags, a truncated
one and a topic-less one; the second adds a bag by ``file://`` URI and must redo only that one.
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
REPO = pathlib.Path(__file__).resolve().parents[1]
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


def _fleet(inputs, out, *extra, timeout=240):
    """``runa-ood fleet`` in a loopback-only namespace; returns (summary.json, stdout+stderr)."""
    cmd = _netns_prefix() + [sys.executable, "-m", "runa_ood_node.tools.cli", "fleet", *map(str, inputs),
                             "--out", str(out), *MODEL_ARGS, "--workers", "1", "--no-progress", *extra]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=_env())
    log = r.stdout + r.stderr
    assert r.returncode == 0, log[-4000:]
    return json.loads((out / "summary.json").read_text()), log


@pytest.fixture(scope="module")
def bags(tmp_path_factory):
    """A folder with two good bags (MCAP raw, sqlite3), a truncated MCAP and a bag without image
    and detections topics; and, outside it, a third good bag (compressed images)."""
    root = tmp_path_factory.mktemp("fleet")
    frames = make_bag.skimage_frames("voc", mirrored=True)
    d = root / "bags"
    make_bag.write_bag(frames[:3], d / "a", start_ns=S0, progress=False)
    make_bag.write_bag(frames[3:6], d / "b", storage="sqlite3", start_ns=S0 + 10**10, progress=False)
    make_bag.write_bag(frames[:3], d / "trunc", start_ns=S0 + 3 * 10**10, progress=False)
    mcap = next((d / "trunc").glob("*.mcap"))
    mcap.write_bytes(mcap.read_bytes()[: mcap.stat().st_size // 2])
    with bagio.BagWriter(d / "notopic") as w:
        w.write(bagio.GROUND_TRUTH_TOPIC, bagio.GROUND_TRUTH_TYPE, S0,
                bagio.ground_truth_msg(bagio.header(S0), ["1"], [True], ["x"]))
    make_bag.write_bag(frames[6:8], root / "extra" / "c", compressed=True, start_ns=S0 + 2 * 10**10, progress=False)
    return root


def _evaluate_bag(bag, out):
    from runa_ood_node.tools import cli

    assert cli.main(["evaluate", "--bag", str(bag), *MODEL_ARGS, "--out", str(out), "--no-progress"]) == 0
    return json.loads((out / "bag_report_offline.json").read_text())


def _records(out, bag):
    import pyarrow.dataset as pads

    t = pads.dataset(str(out / "records"), format="parquet", partitioning="hive").to_table()
    return [r for r in t.to_pylist() if r["bag"] == str(bag)]


def test_fleet_equals_evaluate_reports_bad_bags_and_resumes(bags, tmp_path):
    out = tmp_path / "out"
    extra = "file://" + str(bags / "extra" / "c")  # through pyarrow's filesystem layer, as an object store
    inputs = [bags / "bags", extra]
    rep, log = _fleet(inputs, out)
    by_bag = {pathlib.Path(s["bag"]).name: s for s in rep["bags"]}
    assert set(by_bag) == {"a", "b", "c", "trunc", "notopic"}
    assert by_bag["trunc"]["status"] == "failed" and by_bag["trunc"]["error"]
    assert by_bag["notopic"]["status"] == "failed" and "no image topic" in by_bag["notopic"]["error"]
    assert "FAILED" in log and "RANDOM WEIGHTS" in log
    assert rep["random_weights"] is True and rep["identity"]["weights"] == "RANDOM"
    assert rep["totals"]["bags_done"] == 3 and rep["totals"]["bags_failed"] == 2
    perf = rep["performance"]
    assert perf["bags_scored"] == 5 and perf["boxes_per_s"] > 0 and perf["scoring_boxes_per_s"] > 0
    assert sum(perf["worker_boxes"].values()) == perf["boxes"] == rep["totals"]["boxes"]
    assert all(v > 0 for v in perf["worker_peak_rss_mb"].values())

    # per-box results equal `runa-ood evaluate --bag` on the same bags
    paths = {"a": bags / "bags" / "a", "b": bags / "bags" / "b", "c": bags / "extra" / "c"}
    for name, path in paths.items():
        s = by_bag[name]
        n = 2 if name == "c" else 3
        assert s["status"] == "done" and s["frames"] == n and s["frames_scored"] == n
        ref = _evaluate_bag(path, tmp_path / f"eval_{name}")["records"]
        got = _records(out, extra if name == "c" else path)
        assert len(got) == len(ref) == s["boxes"] > 0
        a = {(r["stamp_ns"], r["id"]): r for r in ref}
        b = {(r["stamp_ns"], r["det_id"]): r for r in got}
        assert set(a) == set(b)
        diffs = [abs(a[k]["uncertainty"] - b[k]["uncertainty"]) for k in a]
        assert max(diffs) <= 1e-5
        for k in a:
            assert (b[k]["status"], b[k]["label"], b[k]["is_ood"], b[k]["gt_is_ood"]) == \
                   (a[k]["status"], a[k]["label"], a[k]["is_ood"], a[k]["gt_is_ood"])
            assert b[k]["random_weights"] is True and b[k]["model"] == TINY and b[k]["model_id"]
        assert s["ood_boxes"] == sum(r["is_ood"] for r in ref)

    # outputs: summary CSV, metrics (evaluate's table, overall and per bag), top-K sheet + COCO export
    csv_text = (out / "summary.csv").read_text()
    assert csv_text.count("\n") == 6 and "failed" in csv_text and "True" in csv_text
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["random_weights"] is True
    assert set(metrics["per_bag"]) == {str(paths["a"]), str(paths["b"]), extra}
    n_boxes = sum(by_bag[k]["boxes"] for k in paths)
    assert metrics["overall"]["n_id"] + metrics["overall"]["n_ood"] == n_boxes == rep["totals"]["boxes"]
    coco = json.loads((out / "top_ood" / "coco.json").read_text())
    assert "RANDOM WEIGHTS" in coco["info"]["description"]
    n_top = min(50, n_boxes)
    assert len(coco["images"]) == len(coco["annotations"]) == n_top
    unc = [a["uncertainty"] for a in coco["annotations"]]
    assert unc == sorted(unc, reverse=True)
    assert all((out / "top_ood" / im["file_name"]).is_file() and im["frame"]["stamp_ns"] > 0 for im in coco["images"])
    import cv2

    sheet = cv2.imread(str(out / "top_ood" / "contact_sheet.png"))
    assert sheet is not None and sheet.shape[0] > 200

    # resumption: a second run over the same inputs finds every bag done and starts no Ray at all
    parts = {p.name: p.stat().st_mtime_ns for p in (out / "records").rglob("*.parquet")}
    rep2, log2 = _fleet(inputs, out)
    assert rep2["performance"] == {"bags_scored": 0, "wall_s": rep2["performance"]["wall_s"]}
    assert "Running Dataset" not in log2
    assert all(s["resumed"] for s in rep2["bags"]) and len(rep2["bags"]) == 5
    assert {p.name: p.stat().st_mtime_ns for p in (out / "records").rglob("*.parquet")} == parts
    assert rep2["totals"] == {**rep["totals"], "bags_resumed": 5}
    assert rep2["metrics"] == rep["metrics"]
    assert json.loads((out / "top_ood" / "coco.json").read_text())["annotations"] == coco["annotations"]


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
    assert names(fleet.expand_inputs([str(d)])) == ["a", "b", "notopic", "trunc"]
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
