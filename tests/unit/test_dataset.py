"""core.dataset: loading the shared ood_pack and plain COCO files, splits, subsets, few-shot draws."""
import json
from collections import Counter

import numpy as np
import pytest

from runa_ood_node.core.dataset import DatasetError, load_dataset
from runa_ood_node.core.labels import LabelSet, VOC_LABELS

# counts of /work/shared/data/ood_pack/README.md: source -> (images, boxes, VOC ID, VOC OOD, VOC unknown)
README = {
    "lightly_coco256": (256, 1827, 967, 860, 0),
    "coco_tiny": (157, 1469, 767, 702, 0),
    "road_anomaly": (60, 225, 0, 129, 96),
    "oi_apple": (17, 37, 0, 37, 0),
}


@pytest.fixture(scope="module")
def voc(ood_pack):
    return load_dataset(ood_pack / "annotations.json", "voc")


@pytest.fixture(scope="module")
def bdd(ood_pack):
    return load_dataset(ood_pack / "annotations.json", "bdd")


def test_pack_counts_match_readme(voc, ood_pack_annotations):
    assert voc.n_images == 490
    assert voc.stats["boxes_total"] == 3558
    assert voc.stats["skipped_unknown"] == sum(v[4] for v in README.values()) == 96
    assert voc.n_boxes == 3558 - 96
    assert voc.id_rule == "flag:voc_id"
    for source, (n_img, n_box, n_id, n_ood, n_unk) in README.items():
        frames = [f for f in voc.frames if f.source == source]
        assert len(frames) == n_img, source
        assert sum(int(f.is_id.sum()) for f in frames) == n_id, source
        assert sum(int((~f.is_id).sum()) for f in frames) == n_ood, source
    # ID flags follow the file, box by box
    flag = {a["id"]: a["voc_id"] for a in ood_pack_annotations["annotations"]}
    for f in voc.frames[:50]:
        assert [flag[i] for i in f.ann_ids] == f.is_id.tolist()


def test_unknown_flags_are_skipped_per_id_set(voc, bdd):
    # bdd has no null flags: every box is kept; road_anomaly animals are VOC-unknown but BDD-OOD
    assert bdd.stats["skipped_unknown"] == 0 and bdd.n_boxes == 3558
    assert bdd.n_id == 1246 and bdd.n_ood == 3558 - 1246
    animals_voc = [f for f in voc.frames if f.path.name.startswith("animals")]
    animals_bdd = [f for f in bdd.frames if f.path.name.startswith("animals")]
    assert animals_voc and sum(len(f) for f in animals_voc) < sum(len(f) for f in animals_bdd)
    assert not any(f.is_id.any() for f in animals_bdd)


def test_frames_hold_xywh_float32_and_real_images(voc):
    f = next(f for f in voc.frames if len(f) >= 3)
    assert f.boxes.dtype == np.float32 and f.boxes.shape == (len(f), 4)
    assert f.path.is_file()
    img = voc.load_image(f)
    assert img.dtype == np.uint8 and img.shape == (f.height, f.width, 3)
    import cv2

    bgr = cv2.imread(str(f.path))
    assert np.array_equal(img, bgr[:, :, ::-1])  # RGB order
    # boxes lie in the declared image
    assert (f.boxes[:, 0] >= -1).all() and (f.boxes[:, 0] + f.boxes[:, 2] <= f.width + 1).all()


def test_yaml_label_set_uses_membership_and_aliases(ood_pack, ood_pack_annotations, tmp_path):
    yml = tmp_path / "road.yaml"
    yml.write_text("name: road\nlabels:\n  - car\n  - name: person\n    aliases: [dog]\n")
    ds = load_dataset(ood_pack / "annotations.json", yml)
    assert ds.id_rule == "membership" and ds.label_set.name == "road"
    assert ds.stats["skipped_unknown"] == 0 and ds.n_boxes == 3558  # flags ignored, nothing unknown
    want = sum(a["category"] in ("car", "person", "dog") for a in ood_pack_annotations["annotations"])
    assert ds.n_id == want
    # a LabelSet object behaves the same
    ds2 = load_dataset(ood_pack / "annotations.json", LabelSet("x", ("car",)))
    assert ds2.n_id == sum(a["category"] == "car" for a in ood_pack_annotations["annotations"])


def test_plain_coco_file(ood_pack, tmp_path):
    img = sorted((ood_pack / "images" / "lightly_coco256").rglob("*.jpg"))[0]
    coco = {
        "images": [{"id": 7, "file_name": str(img), "width": 640, "height": 480}],
        "categories": [{"id": 1, "name": "Car"}, {"id": 2, "name": "fire hydrant"}],
        "annotations": [
            {"id": 1, "image_id": 7, "category_id": 1, "bbox": [10, 10, 50, 40]},
            {"id": 2, "image_id": 7, "category_id": 2, "bbox": [100, 100, 30, 60]},
            {"id": 3, "image_id": 7, "category_id": 1, "bbox": [0, 0, 600, 400], "iscrowd": 1},
            {"id": 4, "image_id": 7, "category_id": 1, "bbox": [1, 2, 3]},
            {"id": 5, "image_id": 99, "category_id": 2, "bbox": [1, 2, 3, 4]},
        ],
    }
    p = tmp_path / "coco.json"
    p.write_text(json.dumps(coco))
    ds = load_dataset(p, "voc")  # no voc_id flags in the file -> membership in the VOC set
    assert ds.id_rule == "membership"
    assert ds.n_images == 1 and ds.n_boxes == 2
    f = ds.frames[0]
    assert f.categories == ["Car", "fire hydrant"] and f.is_id.tolist() == [True, False]
    assert ds.stats["skipped_crowd"] == 1 and ds.stats["skipped_bad_bbox"] == 1 and ds.stats["skipped_no_image"] == 1
    assert ds.load_image(f).shape == (480, 640, 3)


def test_bad_files_raise_dataset_error(tmp_path):
    with pytest.raises(DatasetError, match="not found"):
        load_dataset(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(DatasetError):
        load_dataset(bad)
    bad.write_text(json.dumps({"images": []}))
    with pytest.raises(DatasetError, match="annotations"):
        load_dataset(bad)
    bad.write_text(json.dumps({"images": [], "annotations": [{"image_id": 1, "category_id": 3, "bbox": [0, 0, 1, 1]}],
                               "categories": []}))
    with pytest.raises(DatasetError, match="category_id"):
        load_dataset(bad)


def test_unreadable_image_raises(voc, tmp_path):
    import dataclasses

    f = dataclasses.replace(voc.frames[0], path=tmp_path / "nope.jpg")
    with pytest.raises(DatasetError, match="cannot read image"):
        voc.load_image(f)


def test_split_is_deterministic_disjoint_and_complete(voc):
    a1, b1 = voc.split(0.3, seed=1)
    a2, b2 = voc.split(0.3, seed=1)
    a3, _ = voc.split(0.3, seed=2)
    ids = lambda d: [f.image_id for f in d.frames]  # noqa: E731
    assert ids(a1) == ids(a2) and ids(b1) == ids(b2)
    assert ids(a1) != ids(a3)
    assert len(ids(a1)) == round(0.3 * 490)
    assert set(ids(a1)).isdisjoint(ids(b1)) and set(ids(a1)) | set(ids(b1)) == set(ids(voc))
    with pytest.raises(ValueError):
        voc.split(1.5)


def test_subset_spread_covers_sources(voc):
    sub = voc.subset(8)
    assert sub.n_images == 8
    assert len({f.source for f in sub.frames}) >= 3
    assert voc.subset(None).n_images == 490 and voc.subset(10, "first").frames[0] is voc.frames[0]
    r1, r2 = voc.subset(5, "random", seed=3), voc.subset(5, "random", seed=3)
    assert [f.image_id for f in r1.frames] == [f.image_id for f in r2.frames]


def test_sample_shots_deterministic_and_valid(voc):
    s1 = voc.sample_shots(10, seed=0)
    s2 = voc.sample_shots(10, seed=0)
    s3 = voc.sample_shots(10, seed=1)
    key = lambda s: list(zip(s.frame_idx.tolist(), s.box_idx.tolist()))  # noqa: E731
    assert key(s1) == key(s2)
    assert key(s1) != key(s3)
    counts = Counter(s1.labels)
    assert set(counts) == set(VOC_LABELS)
    # 'train' has only 8 VOC-ID boxes in the pack: all are taken and reported
    assert counts["train"] == 8 and s1.report["short_classes"] == ["train"]
    assert all(c == 10 for lab, c in counts.items() if lab != "train")
    assert len(s1) == 19 * 10 + 8
    assert len(set(key(s1))) == len(s1)  # no box drawn twice
    for fi, bi, lab, k in zip(s1.frame_idx, s1.box_idx, s1.labels, s1.label_idx):
        fr = voc.frames[fi]
        assert fr.is_id[bi] and fr.categories[bi] == lab == VOC_LABELS[k]
        assert fr.boxes[bi, 2] >= 2 and fr.boxes[bi, 3] >= 2
    with pytest.raises(ValueError):
        voc.sample_shots(0)


def test_sample_shots_reports_missing_classes(voc):
    sub = voc.subset(20)
    s = sub.sample_shots(1000, seed=0)  # more than any class has: every ID box is drawn
    rep = s.report
    assert set(rep["missing_classes"]) == {lab for lab, r in rep["per_class"].items() if r["available"] == 0}
    assert sum(r["drawn"] for r in rep["per_class"].values()) == len(s) == sub.n_id - _tiny(sub)


def _tiny(ds):
    return sum(int(((f.boxes[:, 2] < 2) | (f.boxes[:, 3] < 2))[f.is_id].sum()) for f in ds.frames)
