"""Bag evaluation (tools.bag_eval via `runa-ood evaluate --bag`): offline and through the live node.

The live test starts the real node as a subprocess (tiny random ViT) and replays a 4-frame bag of
real photographs into it; the node's scores must equal the in-process scores box for box.
"""
import json
import types

import numpy as np
import pytest

from runa_ood_node.tools import bag_eval, bagio, common, make_bag

TINY = "runa-tiny-vit"
STAMP0 = 1_700_000_000_000_000_000


def _node_scorer(params, encoder=None):
    """What ``evaluate --bag`` scores with offline: the node's factory path around ``encoder``."""
    return common.scorer_from_parameters(params, encoder=encoder)[0]


@pytest.fixture(scope="module")
def photo_bag(tmp_path_factory):
    """4 frames of scikit-image photographs (always available), 10 labelled boxes."""
    path = tmp_path_factory.mktemp("bag_eval") / "bag"
    frames = make_bag.skimage_frames("voc", names=["astronaut", "chelsea", "coffee", "rocket"])
    make_bag.write_bag(frames, path, fps=5.0, start_ns=STAMP0, progress=False)
    return path


def _evaluate(bag, out, *extra):
    from runa_ood_node.tools import cli

    rc = cli.main(["evaluate", "--bag", str(bag), "--model", TINY, "--pretrained", "none", "--allow-random-weights",
                   "--out", str(out), "--no-progress", *extra])
    assert rc == 0
    mode = "live" if "--live" in extra else "offline"
    return json.loads((out / f"bag_report_{mode}.json").read_text())


def test_offline_and_live_give_the_same_scores(photo_bag, tmp_path, capsys):
    pytest.importorskip("rclpy")
    pytest.importorskip("runa_ood_msgs.msg")
    off = _evaluate(photo_bag, tmp_path / "off")
    live = _evaluate(photo_bag, tmp_path / "live", "--live", "--out-bag", str(tmp_path / "out_bag"))
    printed = capsys.readouterr().out
    assert "RANDOM WEIGHTS" in printed

    for rep in (off, live):
        assert rep["random_weights"] is True and "RANDOM" in rep["random_label"]
        assert rep["status_counts"] == {"OK": 10}
    a = {(r["stamp_ns"], r["id"]): r for r in off["records"]}
    b = {(r["stamp_ns"], r["id"]): r for r in live["records"]}
    assert set(a) == set(b) and len(a) == 10
    for k in a:
        assert b[k]["uncertainty"] == pytest.approx(a[k]["uncertainty"], abs=1e-5)
        assert b[k]["similarity"] == pytest.approx(a[k]["similarity"], abs=1e-5)
        assert (b[k]["label"], b[k]["is_ood"], b[k]["gt_is_ood"]) == (a[k]["label"], a[k]["is_ood"], a[k]["gt_is_ood"])
        assert b[k]["threshold"] == pytest.approx(a[k]["threshold"])  # the node's default_threshold, offline too
    for key in ("fpr95", "auroc", "n_id", "n_ood"):
        assert live["metrics"][key] == pytest.approx(off["metrics"][key])
    assert off["metrics"]["n_id"] == 2 and off["metrics"]["n_ood"] == 8  # person + cat; flag, shuttle, helmet, ...

    # live-only figures: every frame answered, one latency per frame, alerts, the output bag
    assert live["frames_published"] == 4 and live["frames_received"] == 4 and live["frames_dropped"] == 0
    assert live["latency_ms"]["n"] == 4 and live["latency_ms"]["p50"] > 0
    assert live["alerts"] and live["alerts"][0]["level"] in ("CLEAR", "CAUTION", "TAKE_OVER")
    assert live["node_diagnostics"], "the node's /diagnostics were received"
    counts = bagio.bag_info(tmp_path / "out_bag").counts
    assert counts["/ood/detections"] == 4 and counts["/ood/ood_only"] == 4
    assert counts[bagio.IMAGE_TOPIC] == 4 and counts.get("/ood/driver_alert", 0) >= 1
    # every per-frame output of every frame, the last frame's too (the drain waits for each topic)
    for t in bag_eval.PER_FRAME_TOPICS:
        assert counts.get(t, 0) == 4, (t, counts)
    arr = [bagio.deserialize(m.rawdata, m.msgtype) for m in bagio.read_bag(tmp_path / "out_bag", ["/ood/detections"])]
    assert all(x.random_weights for x in arr)
    assert sorted(bagio.stamp_ns_of(x.header) for x in arr) == [STAMP0 + k * 200_000_000 for k in range(4)]


def test_ros_args_keep_declared_types():
    args = bag_eval.ros_args({"lam": 1, "model": "true", "pretrained": "", "autostart": True, "max_boxes": 0,
                              "label_set": "it's.yaml", "alert.roi": [0, 0.5, 1, 1]})
    pairs = [args[i + 1] for i in range(1, len(args), 2)]
    assert args[0] == "--ros-args" and all(args[i] == "-p" for i in range(1, len(args), 2))
    assert pairs == ["lam:=1.0", "model:='true'", "pretrained:=''", "autostart:=true", "max_boxes:=0",
                     "label_set:='it''s.yaml'", "alert.roi:=[0.0, 0.5, 1.0, 1.0]"]


def test_node_params_are_mirrored_offline(tiny_encoder, photo_bag):
    ns = types.SimpleNamespace(lam=0.5, blur_radius=1.0, scorer="runa", temperature=1.0, id_set="voc",
                               thresholds=None, min_box_size=2.0, pretrained="none", projection=None,
                               backend="torch", device="cpu",
                               node_params=["default_threshold:=-1.0", "max_boxes:=1", "lam:=0.25"])
    params = common.node_parameters_from_args(ns, {"model": TINY}, random_weights=True, image_topic=bagio.IMAGE_TOPIC,
                                              n_frames=4)
    assert params["default_threshold"] == -1.0 and params["max_boxes"] == 1 and params["lam"] == 0.25
    assert params["pretrained"] == "" and params["allow_random_weights"] is True
    assert params["image_topic"] == bagio.IMAGE_TOPIC and params["image_transport"] == "raw"
    from runa_ood_node.ros.params import PARAMETERS

    if "precision" in {p.name for p in PARAMETERS}:  # the node loads the model in the precision the tool uses
        assert params["precision"] == "auto"
        assert common.node_parameters_from_args(types.SimpleNamespace(**vars(ns), precision="fp32"), {"model": TINY},
                                                random_weights=True, image_topic=bagio.IMAGE_TOPIC,
                                                n_frames=4)["precision"] == "fp32"
    scorer = _node_scorer(params, tiny_encoder)
    assert scorer.lam == 0.25 and scorer.max_boxes == 1
    res = bag_eval.evaluate_offline(photo_bag, scorer, progress=False)
    statuses = [r["status"] for r in res["records"] if r["stamp_ns"] == STAMP0]
    assert statuses == ["OK", "NOT_SCORED", "NOT_SCORED", "NOT_SCORED"]  # max_boxes 1 of 4 astronaut boxes
    ok = [r for r in res["records"] if r["status"] == "OK"]
    assert all(r["threshold"] == -1.0 and r["is_ood"] == (r["uncertainty"] > -1.0) for r in ok)
    comp = common.node_parameters_from_args(ns, {"model": TINY}, random_weights=True,
                                            image_topic=bagio.COMPRESSED_TOPIC, n_frames=4)
    assert comp["image_topic"] == bagio.IMAGE_TOPIC and comp["image_transport"] == "compressed"


def test_offline_counts_unusable_frames(tiny_encoder, tmp_path):
    path = tmp_path / "bad"
    rgb = np.zeros((32, 32, 3), np.uint8)
    with bagio.BagWriter(path) as w:
        for i, kind in enumerate(("ok", "float_image", "no_detections")):
            st = STAMP0 + i * 100_000_000
            hdr = bagio.header(st)
            img = bagio.image_msg(rgb, hdr)
            if kind == "float_image":
                img.encoding = "32FC1"
            w.write(bagio.IMAGE_TOPIC, bagio.IMAGE_TYPE, st, img)
            if kind != "no_detections":
                w.write(bagio.DETECTIONS_TOPIC, bagio.DETECTIONS_TYPE, st,
                        bagio.detections_msg(hdr, [[2, 2, 20, 20], [np.nan, 0, 5, 5]], ["cat", "cat"], ["a", "b"]))
    ns = types.SimpleNamespace(lam=0.5, blur_radius=1.0, scorer="runa", temperature=1.0, id_set="voc",
                               thresholds=None, min_box_size=2.0, pretrained="none", projection=None,
                               backend="torch", device="cpu", node_params=[])
    scorer = _node_scorer(common.node_parameters_from_args(ns, {"model": TINY}, random_weights=True,
                                                           image_topic=bagio.IMAGE_TOPIC), tiny_encoder)
    res = bag_eval.evaluate_offline(path, scorer, progress=False)
    # the node's own drop reasons: a conversion failure and an image the pairer gave up
    assert res["skipped"] == {"image_unsupported_encoding": 1, "image_without_detections": 1}
    assert [r["status"] for r in res["records"]] == ["OK", "NAN"]
    assert res["records"][0]["gt_is_ood"] is None  # no ground-truth topic in this bag
    m = bag_eval.metrics_from_records(res["records"])
    assert m["n_id"] == 0 and m["n_ood"] == 0


def test_node_that_cannot_start_is_reported(photo_bag, tmp_path):
    pytest.importorskip("rclpy")
    params = {"model": "no-such-model", "pretrained": "", "allow_random_weights": True, "autostart": True}
    with pytest.raises(bag_eval.NodeStartError, match="exited") as exc:
        bag_eval.run_live(photo_bag, params, tmp_path, node_timeout_s=60, progress=False)
    assert "no-such-model" in str(exc.value)  # the tail of the node's log says why
    assert (tmp_path / "node.log").exists()


def test_percentiles():
    p = bag_eval.percentiles([1.0, 2.0, 3.0, 4.0, float("nan")])
    assert p["n"] == 4 and p["p50"] == 2.5 and p["max"] == 4.0
    assert bag_eval.percentiles([])["p95"] is None


def test_live_compressed_transport_matches_offline(tiny_encoder, tmp_path):
    """A JPEG bag goes through the node's compressed transport (image_transport:=compressed on
    <image_topic>/compressed); the node decodes the same pixels as the offline path."""
    pytest.importorskip("rclpy")
    pytest.importorskip("runa_ood_msgs.msg")
    path = tmp_path / "jpeg_bag"
    make_bag.write_bag(make_bag.skimage_frames("voc", names=["chelsea", "coffee"]), path, compressed=True,
                       start_ns=STAMP0, progress=False)
    ns = types.SimpleNamespace(lam=0.5, blur_radius=1.0, scorer="runa", temperature=1.0, id_set="voc",
                               thresholds=None, min_box_size=2.0, pretrained="none", projection=None,
                               backend="torch", device="cpu", node_params=[])
    params = common.node_parameters_from_args(ns, {"model": TINY}, random_weights=True,
                                              image_topic=bagio.COMPRESSED_TOPIC, n_frames=2)
    off = bag_eval.evaluate_offline(path, _node_scorer(params, tiny_encoder), progress=False)
    live = bag_eval.run_live(path, params, tmp_path, progress=False)
    recs = bag_eval.live_records(live, bag_eval.ground_truth_map(path))
    a = {(r["stamp_ns"], r["id"]): r["uncertainty"] for r in off["records"]}
    b = {(r["stamp_ns"], r["id"]): r["uncertainty"] for r in recs}
    assert set(a) == set(b) and len(a) == 3
    assert all(b[k] == pytest.approx(a[k], abs=1e-5) for k in a)
    assert live["image_topic"] == bagio.COMPRESSED_TOPIC and len(live["latency_ms"]) == 2


def test_alert_timeline_lists_changes_not_heartbeats():
    """The node's heartbeat re-publishes the current monitor health with a fresh stamp: a timeline
    keeps each source's changes only (a repeat on one source never hides a change on the other)."""
    from types import SimpleNamespace as NS

    from runa_ood_node.tools.bag_eval import alert_timeline

    def msg(t, source, level, reason):
        return NS(header=NS(stamp=NS(sec=t, nanosec=0)), source=source, level=level, reason=reason, objects=[])

    seq = [msg(0, 1, 0, "CLEAR: waiting"), msg(1, 1, 0, "CLEAR: waiting"), msg(1, 0, 0, "CLEAR"),
           msg(2, 1, 1, "CAUTION: latency"), msg(3, 1, 1, "CAUTION: latency"), msg(3, 0, 0, "CLEAR"),
           msg(4, 0, 1, "CAUTION: object"), msg(5, 1, 0, "CLEAR: healthy")]
    got = [(r["stamp_ns"] // 10**9, r["source"], r["level"]) for r in alert_timeline(seq)]
    assert got == [(0, "MONITOR_HEALTH", "CLEAR"), (1, "OOD_OBJECT", "CLEAR"), (2, "MONITOR_HEALTH", "CAUTION"),
                   (4, "OOD_OBJECT", "CAUTION"), (5, "MONITOR_HEALTH", "CLEAR")]
