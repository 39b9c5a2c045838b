"""`runa-ood demo`: end to end with the tiny random ViT (real node subprocess, real DDS)."""
import json
import pathlib
import re
import types

import numpy as np
import pytest

from runa_ood_node.tools import demo, foxglove_layout


def test_demo_end_to_end_tiny_marks_random_weights(tmp_path, capsys):
    pytest.importorskip("rclpy")
    pytest.importorskip("runa_ood_msgs.msg")
    import cv2

    from runa_ood_node.tools import cli

    out = tmp_path / "demo"
    rc = cli.main(["demo", "--tiny", "--pretrained", "none", "--skimage", "--frames", "4", "--out", str(out),
                   "--no-progress"])
    printed = capsys.readouterr().out
    assert rc == 0
    report = (out / "report.txt").read_text()
    for text in (printed, report):
        assert "RANDOM WEIGHTS" in text and "NOT A QUALITY RESULT" in text
        assert demo.DEMO_THRESHOLD_LABEL in text
        assert not re.search(r"(FPR95|AUROC)\s+[0-9.]", text), "no quality figure with random weights"
        assert "PER-BOX TABLE" in text and "ALERT TIMELINE" in text
    js = json.loads((out / "demo.json").read_text())
    assert js["random_weights"] is True and "NOT A QUALITY RESULT" in js["random_label"]
    assert js["frames_published"] == 4 and js["frames_answered"] == 4
    assert js["node_vs_inprocess_max_abs_diff"] is not None and js["node_vs_inprocess_max_abs_diff"] <= 1e-5
    # the demo threshold is the median of frame 0 (astronaut, 4 boxes): both states appear there
    frame0 = [r for r in js["records"] if r["frame"] == 0]
    assert len(frame0) == 4 and {r["is_ood"] for r in frame0} == {True, False}
    assert all(r["threshold"] == pytest.approx(js["threshold"]) for r in js["records"])
    assert len(js["records"]) == sum(len(t) for t in (["person", "flag", "shuttle", "helmet"], ["cat"],
                                                      ["cup", "spoon"], ["rocket", "tower", "tower"]))
    # images: one annotated PNG per frame + the contact sheet, with the warning title block (dark red)
    assert len(js["pngs"]) == 4 and all((out / "frames" / f"frame_{i:02d}.png").exists() for i in range(4))
    sheet = cv2.imread(str(out / "contact_sheet.png"))
    assert sheet is not None and sheet.shape[0] > 300 and sheet.shape[1] > 800
    assert tuple(sheet[3, 3]) == (0, 0, 120)  # BGR of the random-weights title block
    frame = cv2.imread(str(out / "frames" / "frame_00.png"))
    assert frame.shape[1] == 640
    assert (out / "output_bag" / "metadata.yaml").exists()
    # Foxglove: the layout written for this bag names its image and the node's topics
    layout = json.loads((out / "foxglove_layout.json").read_text())
    assert foxglove_layout.topics(layout) == [js["bag"]["image_topic"],
                                              "/ood/image_annotations", "/ood/driver_alert", "/ood/monitor_health"]
    assert [c["imageMode"]["synchronize"] for c in layout["configById"].values() if "imageMode" in c] == [True]
    _bag_carries_image_annotations(out / "output_bag", js)


def _bag_carries_image_annotations(bag, js):
    """One ImageAnnotations per answered frame, decoded by rosbags knowing only upstream's
    definitions (test_foxglove.UPSTREAM), each stamped like its image, with one outline per box that
    has finite coordinates, coloured as the node's verdict; the bag's schema is upstream's text."""
    from rosbags.highlevel import AnyReader
    from rosbags.typesys import Stores, get_types_from_msg, get_typestore

    from runa_ood_node.ros import draw
    from runa_ood_node.tools import bagio
    import sys

    ros_room = str(pathlib.Path(__file__).resolve().parents[1] / "ros")  # upstream's definitions live in its test
    if ros_room not in sys.path:
        sys.path.insert(0, ros_room)
    from test_foxglove import UPSTREAM

    store = get_typestore(Stores.ROS2_KILTED)
    for name, text in UPSTREAM.items():
        store.register(get_types_from_msg(text, name))
    msgs = list(bagio.read_bag(bag, topics=["/ood/image_annotations"]))
    assert len(msgs) == js["frames_answered"] == 4
    assert {m.msgtype for m in msgs} == {"foxglove_msgs/msg/ImageAnnotations"}
    by_stamp = {}
    for r in js["records"]:
        by_stamp.setdefault(r["stamp_ns"], []).append(r)
    image_stamps = {m.stamp_ns for m in bagio.read_bag(bag, topics=[js["bag"]["image_topic"]])}
    seen = set()
    for m in msgs:
        ann = store.deserialize_cdr(m.rawdata, "foxglove_msgs/msg/ImageAnnotations")
        stamps = {a.timestamp.sec * 10**9 + a.timestamp.nanosec for a in [*ann.points, *ann.texts]}
        assert len(stamps) == 1
        st = stamps.pop()
        assert st in image_stamps and st in by_stamp
        seen.add(st)
        recs = by_stamp[st]
        assert len(ann.points) == len(recs)  # the demo's boxes are all finite, under the drawing cap
        red = sum(p.outline_color.r > 0.8 and p.outline_color.g < 0.1 for p in ann.points)
        assert red == sum(bool(r["is_ood"]) for r in recs)
        assert all(p.type == 2 and len(p.points) == 4 for p in ann.points)
        assert ann.texts[-1].text == draw.WATERMARK  # random weights
    assert seen == set(by_stamp)
    with AnyReader([pathlib.Path(bag)]) as reader:
        conn = next(c for c in reader.connections if c.topic == "/ood/image_annotations")
        assert "foxglove_msgs/TextAnnotation[] texts" in conn.msgdef.data  # Foxglove decodes from this


def test_unloadable_weights_fall_back_to_random_with_a_prominent_notice(capsys):
    args = types.SimpleNamespace(pretrained="/nonexistent/ViT-B-16.pt", model="ViT-B-16", tiny=True,
                                 random_model="ViT-B-32")
    base = {"label_set": "voc", "max_boxes": 0}
    scorer, params, rw, note = demo.load_scorer(args, base)
    out = capsys.readouterr().out
    assert rw is True and params["model"] == "runa-tiny-vit" and params["allow_random_weights"] is True
    assert params["pretrained"] == "" and scorer.encoder.random_weights
    assert "NO PRETRAINED WEIGHTS" in out and "How to provide real weights" in out and "/nonexistent" in out
    assert "WeightsUnavailableError" in note


def test_demo_frames_from_the_pack_mix_id_and_ood(ood_pack):
    frames, note = demo.demo_frames(12, "voc")
    assert len(frames) == 12 and "data pack" in note
    first, second = frames[:6], frames[6:]
    assert all(f.source in ("lightly_coco256", "coco_tiny") and (~f.is_ood).any() for f in first)
    assert all(f.source in ("road_anomaly", "oi_apple") and f.is_ood.all() for f in second)
    assert {"road_anomaly", "oi_apple"} <= {f.source for f in second}


def test_demo_frames_fall_back_to_skimage():
    frames, note = demo.demo_frames(5, "voc", force_skimage=True)
    assert len(frames) == 5 and "scikit-image" in note and all(f.source == "skimage" for f in frames)


def test_contact_sheet_layout():
    imgs = [np.full((480, 640, 3), 200, np.uint8), np.full((100, 50, 3), 50, np.uint8), np.zeros((30, 30, 3), np.uint8)]
    sheet = demo.contact_sheet(imgs, ["a", "b", "c"], ["title"], tile_w=200, cols=2, warn=True)
    assert sheet.dtype == np.uint8 and sheet.shape[1] == 2 * (200 + 6) + 6
    assert tuple(sheet[2, 2]) == (120, 0, 0)


def test_demo_without_real_weights_runs_on_the_proving_ground(tmp_path, capsys):
    """No real weights here: the default fallback is the proving ground (its CLIP, head, thresholds and
    scenes), labelled synthetic everywhere, with its FPR95 / AUROC printed; never the random banner."""
    pytest.importorskip("rclpy")
    pytest.importorskip("runa_ood_msgs.msg")
    import cv2

    from runa_ood_node.tools import cli

    out = tmp_path / "demo"
    rc = cli.main(["demo", "--pretrained", "none", "--frames", "3", "--out", str(out), "--no-progress"])
    printed = capsys.readouterr().out
    assert rc == 0
    report = (out / "report.txt").read_text()
    for text in (printed, report):
        assert demo.SYNTHETIC_LABEL in text and "RANDOM WEIGHTS" not in text
        assert re.search(r"FPR95 [0-9.]+\s+AUROC [0-9.]+", text), "the synthetic quality figures are printed"
    js = json.loads((out / "demo.json").read_text())
    assert js["proving_ground"] is True and js["random_weights"] is False
    assert (js["model"], js["pretrained"]) == ("runa-pg-vit", "proving-ground")
    assert js["frames_published"] == 3 and js["frames_answered"] == 3
    assert js["node_parameters"]["thresholds_file"].endswith("thresholds.yaml")
    assert js["metrics"]["n_id"] > 0 and js["metrics"]["n_ood"] > 0
    # ground truth of the synthetic frames reached the table: both kinds of object were scored
    assert {r["gt_is_ood"] for r in js["records"]} == {True, False}
    sheet = cv2.imread(str(out / "contact_sheet.png"))
    assert tuple(int(v) for v in sheet[3, 3][::-1]) == demo.SYNTHETIC_RGB  # the synthetic title block
