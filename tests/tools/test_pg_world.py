"""The proving-ground world (issue 22, item 1): class rules, seeded scenes, COCO splits, the tool."""
import dataclasses
import json

import numpy as np
import pytest

from runa_ood_node.proving_ground import world
from runa_ood_node.proving_ground.world import (CLASS_BY_NAME, CLASSES, FAR_CLASSES, ID_CLASSES, NEAR_CLASSES,
                                                SPLIT_SEEDS, render_scene)


def _shared(a, b):
    return sum(x == y for x, y in zip((a.shape, a.texture, a.colour), (b.shape, b.texture, b.colour)))


# --------------------------------------------------------------------------- classes
def test_class_table_follows_the_rules():
    assert world.check_class_rules() == []
    assert len(CLASSES) >= 12 and len(FAR_CLASSES) >= 3 and len(NEAR_CLASSES) >= 1
    assert CLASSES[:len(ID_CLASSES)] == ID_CLASSES and all(c.group == "id" for c in ID_CLASSES)
    assert CLASS_BY_NAME == {c.name: c for c in CLASSES}
    # every colour, shape and texture used by >= 2 classes: no class decidable by one attribute
    for attr in ("shape", "texture", "colour"):
        values = [getattr(c, attr) for c in CLASSES]
        assert min(values.count(v) for v in set(values)) >= 2, attr
    for c in NEAR_CLASSES:
        shared = [_shared(c, i) for i in ID_CLASSES]
        assert max(shared) == 2, c  # two of three with some ID class, never all three
    for c in FAR_CLASSES:
        assert max(_shared(c, i) for i in ID_CLASSES) <= 1, c
    assert len({(c.shape, c.texture, c.colour) for c in CLASSES}) == len(CLASSES)


def test_rule_checker_catches_violations():
    far_too_close = dataclasses.replace(FAR_CLASSES[0], shape="box", texture="solid")  # 2 shared with car
    near_too_far = dataclasses.replace(NEAR_CLASSES[0], shape="star", texture="waves", colour="white")
    errs = world.check_class_rules(ID_CLASSES + NEAR_CLASSES[1:] + (near_too_far,) + (far_too_close,)
                                   + FAR_CLASSES[1:])
    assert any("far-OOD" in e for e in errs) and any("near-OOD" in e for e in errs)
    # a colour used by one class only: decidable by colour alone
    errs = world.check_class_rules(ID_CLASSES + NEAR_CLASSES + FAR_CLASSES[:-1]
                                   + (dataclasses.replace(FAR_CLASSES[-1], colour="white"),))
    assert any("'purple' used by one class only" in e for e in errs)
    # an ID duplicate among near classes
    errs = world.check_class_rules(ID_CLASSES + (dataclasses.replace(ID_CLASSES[0], name="x", group="near"),)
                                   + NEAR_CLASSES + FAR_CLASSES)
    assert any("all three" in e for e in errs)


def test_label_set_is_the_id_classes():
    from runa_ood_node.core.labels import load_label_set

    ls = load_label_set(str(world.LABELS_PATH))
    assert list(ls.labels) == [c.name for c in ID_CLASSES]


def test_clutter_colours_are_never_class_colours():
    for name, rgb in world._CLUTTER.items():
        d = min(np.abs(np.subtract(rgb, c)).sum() for c in world.COLOURS.values())
        assert d >= 60, name


# --------------------------------------------------------------------------- scenes
def test_render_is_deterministic_and_seed_dependent():
    a, b, c = render_scene(7), render_scene(7), render_scene(8)
    assert a.image.dtype == np.uint8 and a.image.shape == (720, 1280, 3)
    assert a.image.tobytes() == b.image.tobytes()
    assert np.array_equal(a.boxes, b.boxes) and a.classes == b.classes and np.array_equal(a.occlusion, b.occlusion)
    assert a.image.tobytes() != c.image.tobytes()
    assert not (a.classes == c.classes and a.boxes.shape == c.boxes.shape and np.array_equal(a.boxes, c.boxes))


@pytest.fixture(scope="module")
def scenes():
    return [render_scene(SPLIT_SEEDS["test"] + i, *world.frame_size(i)) for i in range(24)]


def test_scene_boxes_sizes_and_occlusion(scenes):
    all_sizes, bottoms, occ = [], [], []
    for i, s in enumerate(scenes):
        H, W = s.image.shape[:2]
        assert (W, H) == world.frame_size(i)
        n = len(s.classes)
        assert 1 <= n <= 10 and s.boxes.shape == (n, 4) and s.occlusion.shape == (n,)
        assert s.boxes.dtype == np.float32 and s.occlusion.dtype == np.float32
        x, y, w, h = s.boxes.T
        assert (x >= 0).all() and (y >= 0).all() and (x + w <= W).all() and (y + h <= H).all()
        longest = np.maximum(w, h)
        assert (longest >= 12).all() and (longest <= 300).all()
        assert ((s.occlusion >= 0) & (s.occlusion <= world.MAX_OCCLUSION)).all()
        assert set(s.classes) <= set(CLASS_BY_NAME)
        assert set(s.dropped) == {"outside", "occluded", "small"} and min(s.dropped.values()) >= 0
        all_sizes += list(longest)
        bottoms += list((y + h - H * 0.4) / H)
        occ += list(s.occlusion)
    sizes = np.asarray(all_sizes)
    assert (sizes < 32).any() and (sizes > 96).any()
    assert (np.asarray(occ) > 0.05).any()  # some objects partly hidden
    # perspective: larger objects stand lower in the frame
    assert np.corrcoef(sizes, bottoms)[0, 1] > 0.5
    groups = [CLASS_BY_NAME[c].group for s in scenes for c in s.classes]
    assert {"id", "near", "far"} <= set(groups)
    assert groups.count("id") > groups.count("near") > groups.count("far")


def test_occlusion_is_what_objects_in_front_hide():
    # recompute the hidden fraction from the objects' own masks, drawn back to front
    partial = 0
    for seed in range(3):
        rng = np.random.default_rng(seed)
        objs = [world._place(rng, CLASSES[k % len(CLASSES)], 320, 240, 100, 160, 2.0, (12, 120)) for k in range(8)]
        objs.sort(key=lambda o: o.base_y)
        occ = world._occlusion(objs, 320, 240)
        front = objs[-1]
        if front.x0 >= 0 and front.y0 >= 0 and front.x0 + front.w <= 320 and front.y0 + front.h <= 240:
            assert occ[-1] == 0.0  # the front object is never hidden
        canvas = np.full((240, 320), -1)
        for i, o in enumerate(objs):
            x0, y0 = max(o.x0, 0), max(o.y0, 0)
            x1, y1 = min(o.x0 + o.w, 320), min(o.y0 + o.h, 240)
            if x1 > x0 and y1 > y0:
                m = o.mask[y0 - o.y0:y1 - o.y0, x0 - o.x0:x1 - o.x0] > 0
                canvas[y0:y1, x0:x1][m] = i
        for i, o in enumerate(objs):
            x0, y0 = max(o.x0, 0), max(o.y0, 0)
            x1, y1 = min(o.x0 + o.w, 320), min(o.y0 + o.h, 240)
            if x1 <= x0 or y1 <= y0:
                continue
            m = o.mask[y0 - o.y0:y1 - o.y0, x0 - o.x0:x1 - o.x0] > 0
            hidden = 1 - np.count_nonzero(canvas[y0:y1, x0:x1][m] == i) / m.sum()
            assert occ[i] == pytest.approx(hidden, abs=1e-5)
            partial += 0.0 < hidden < 1.0
    assert partial >= 2


def test_textures_scale_with_the_object():
    # a pattern drawn in object coordinates: the same number of periods across a small and a large object
    for tex in ("stripes", "checker", "waves", "dots"):
        small = world._texture(tex, 40, 40, np.random.default_rng(3), 0.0)
        large = world._texture(tex, 200, 200, np.random.default_rng(3), 0.0)
        transitions = lambda t: int(np.count_nonzero(np.diff(t, axis=1) != 0, axis=1).max())  # noqa: E731
        assert transitions(large) >= 2, tex
        assert abs(transitions(small) - transitions(large)) <= 2, tex
    assert (world._texture("solid", 30, 20, np.random.default_rng(0), 0.0) == 1).all()


def test_render_object_draws_the_class():
    tiles = {c.name: world.render_object(c.name, 64) for c in CLASSES}
    assert all(t.shape == (80, 80, 3) and t.dtype == np.uint8 for t in tiles.values())
    # the object's base colour dominates its centre; the classes differ pairwise
    car = tiles["car"][30:50, 30:50].reshape(-1, 3).mean(0)
    assert car[0] > 150 and car[1] < 80 and car[2] < 80
    names = list(tiles)
    assert all(not np.array_equal(tiles[a], tiles[b]) for i, a in enumerate(names) for b in names[i + 1:])
    with pytest.raises(ValueError, match="unknown class"):
        world.render_object("unicorn")


def test_classes_restrict_and_errors():
    s = render_scene(5, 640, 360, classes=["car", "moose", "tire"], n_objects=6, size_range=(12, 120))
    assert s.image.shape == (360, 640, 3) and set(s.classes) <= {"car", "moose", "tire"} and len(s.classes) >= 1
    with pytest.raises(ValueError, match="unknown class"):
        render_scene(1, classes=["unicorn"])
    with pytest.raises(ValueError):
        render_scene(1, size_range=(50, 10))
    with pytest.raises(ValueError):
        world.split_frame("nope", 0)


def test_split_seeds_and_frame_sizes():
    bases = sorted(SPLIT_SEEDS.values())
    assert {"clip", "train", "calibration", "test", "gate", "demo"} <= set(SPLIT_SEEDS)
    assert min(np.diff(bases)) >= 1_000_000  # splits never share a seed
    sizes = [world.frame_size(i) for i in range(8)]
    assert sizes.count((1280, 720)) == 6 and len(set(sizes)) == 2
    assert world.FRAME_SIZES[0] == (1280, 720)
    assert len({w / h for w, h in world.FRAME_SIZES}) >= 2


# --------------------------------------------------------------------------- COCO split
def test_write_split_loads_with_the_label_set(tmp_path):
    from runa_ood_node.core.dataset import load_dataset

    ann = world.write_split(tmp_path, "calibration", 5, progress=False)
    data = json.loads(ann.read_text())
    assert [i["file_name"] for i in data["images"]] == [f"images/calibration_{i:06d}.jpg" for i in range(5)]
    assert {(i["width"], i["height"]) for i in data["images"]} == {(1280, 720), (960, 720)}
    cats = {c["id"]: c for c in data["categories"]}
    assert [c["name"] for c in data["categories"]] == [c.name for c in CLASSES]
    for a in data["annotations"]:
        c = cats[a["category_id"]]
        assert a["group"] == c["group"] == c["supercategory"] == CLASS_BY_NAME[c["name"]].group
        assert a["iscrowd"] == 0 and 0 <= a["occlusion"] <= world.MAX_OCCLUSION
    # the same frames as render_scene with the split's seeds
    sc = render_scene(SPLIT_SEEDS["calibration"] + 3, *world.frame_size(3))
    anns3 = [a for a in data["annotations"] if a["image_id"] == data["images"][3]["id"]]
    assert [cats[a["category_id"]]["name"] for a in anns3] == sc.classes
    info = data["info"]
    assert info["objects_placed"] == len(data["annotations"]) + sum(info["objects_dropped"].values())
    ds = load_dataset(ann, id_set=str(world.LABELS_PATH))
    assert len(ds.frames) == 5
    n = 0
    for f in ds.frames:
        for cat, is_id in zip(f.categories, f.is_id):
            assert bool(is_id) == (CLASS_BY_NAME[cat].group == "id")
            n += 1
    assert n == len(data["annotations"])


# --------------------------------------------------------------------------- the tool
def test_tool_world_end_to_end(tmp_path):
    from runa_ood_node.tools import bagio, cli

    out = tmp_path / "pg"
    rc = cli.main(["proving-ground", "world", "--out", str(out), "--frames", "train=2,test=4",
                   "--sheet-frames", "3", "--no-progress"])
    assert rc == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["splits"]["test"]["frames"] == 4 and summary["splits"]["train"]["frames"] == 2
    assert summary["label_set"].endswith("calibration/proving_ground/labels.yaml")
    assert (out / "contact_sheet.png").stat().st_size > 1000
    assert (out / "class_atlas.png").stat().st_size > 1000
    test_data = json.loads((out / "test" / "annotations.json").read_text())
    ann_groups = {str(a["id"]): a["group"] for a in test_data["annotations"]}
    frames = [f for f in bagio.iter_frames(out / "test_bag", decode=False)]
    assert len(frames) == 4 and all(f.kind == "pair" and f.reason is None for f in frames)
    seen = 0
    for f in frames:
        for det_id in f.ids:
            is_ood, _cat = f.ground_truth[det_id]
            assert is_ood == (ann_groups[det_id] != "id")
            seen += 1
    assert seen == len(test_data["annotations"]) == summary["bag"]["boxes"]


def test_tool_rejects_bad_frames(tmp_path, capsys):
    from runa_ood_node.tools import cli

    assert cli.main(["proving-ground", "world", "--out", str(tmp_path), "--frames", "nosuch=3"]) == 2
    assert "nosuch" in capsys.readouterr().err
    assert cli.main(["proving-ground"]) == 2
