"""Object-level OOD datasets: COCO-style annotation files -> frames of boxes with ID/OOD flags.

No ROS here (core room). Two annotation formats are read:

``ood_pack`` format (``/work/shared/data/ood_pack/annotations.json``, see its README)
    ``images[]`` with ``id``, ``file_name`` (relative to the annotation file's folder), ``width``,
    ``height``; ``annotations[]`` with ``image_id``, ``category`` (a class *name*), ``bbox``
    ``[x, y, w, h]`` in pixels and per-label-set flags ``voc_id`` / ``bdd_id`` (true = ID,
    false = OOD, null = unknown for this image).

Plain COCO
    ``categories[]`` (``id``, ``name``) and ``annotations[]`` with ``category_id``; ``iscrowd=1``
    boxes are skipped (counted in :attr:`Dataset.stats`).

Which boxes are ID (``id_set`` argument of :func:`load_dataset`):

* ``"voc"`` / ``"bdd"`` on a file whose annotations carry the ``voc_id`` / ``bdd_id`` flag: the
  flag decides; ``null`` boxes are *unknown* and are dropped from the frames (counted in
  ``stats["skipped_unknown"]``), because neither answer would be right (e.g. RoadAnomaly cows are
  VOC classes but were never labelled as such).
* Anything else (a built-in name without flags in the file, a YAML label set path, a
  :class:`LabelSet`): **membership decides** - a box is ID iff its category name equals one of
  the set's labels or aliases (case/whitespace-insensitive). Flag fields are then ignored. This
  assumes the annotation file labels *every* object of the ID classes (true for COCO-derived
  sources; see the pack README about ``oi_apple``).

Boxes are kept as given (``xywh`` float32, original pixels); validity (NaN, zero area, outside the
image) is decided later by :func:`boxes.sanitize_boxes` in the scoring loop, which reports a
status per box. Images are read with OpenCV on demand (:meth:`Dataset.load_image`).

Determinism: :meth:`Dataset.split`, :meth:`Dataset.subset` and :meth:`Dataset.sample_shots`
depend only on their ``seed`` argument and the annotation file content (NumPy ``default_rng``).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import pathlib
from collections import Counter, OrderedDict
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from .labels import LabelSet, load_label_set

LOG = logging.getLogger(__name__)

#: built-in set name -> per-annotation flag field of the ood_pack format
FLAG_FIELDS = {"voc": "voc_id", "bdd": "bdd_id"}


class DatasetError(ValueError):
    """The annotation file is missing, unreadable or malformed, or an image cannot be read."""


def normalize_name(name: str) -> str:
    return " ".join(str(name).strip().lower().split())


@dataclasses.dataclass
class Frame:
    """One image and its labelled boxes (only boxes whose ID/OOD status is known).

    Attributes:
        image_id: the image's ``id`` in the annotation file.
        path: absolute path of the image file.
        width, height: image size in pixels as declared by the annotation file.
        boxes: float32 ``[N,4]`` **xywh** in original image pixels, as annotated.
        categories: N class names (as in the file).
        is_id: bool ``[N]``: True = in-distribution box, False = OOD box.
        ann_ids: N annotation ids.
        source: the image's ``source`` field ("" when absent).
        groups: N OOD groups of the boxes (an annotation's ``group`` field, e.g. ``"id"`` / ``"near"`` /
            ``"far"`` in the proving ground; ``""`` where absent): evaluation reports metrics per group.
    """

    image_id: int
    path: pathlib.Path
    width: int
    height: int
    boxes: np.ndarray
    categories: List[str]
    is_id: np.ndarray
    ann_ids: List[int]
    source: str = ""
    groups: List[str] = dataclasses.field(default_factory=list)

    def __len__(self) -> int:
        return int(self.boxes.shape[0])


@dataclasses.dataclass
class Shots:
    """Few-shot training boxes drawn by :meth:`Dataset.sample_shots`.

    Attributes:
        frame_idx: int ``[S]`` index into ``dataset.frames``.
        box_idx: int ``[S]`` index of the box inside that frame.
        labels: S ID label names (the label set's spelling).
        label_idx: int ``[S]`` index into ``dataset.label_set.labels``.
        report: ``{"n_per_class": requested, "per_class": {label: {"available", "drawn"}},
            "short_classes": [labels with fewer boxes than requested: all were taken],
            "missing_classes": [labels with no box at all], "seed": seed}``.
    """

    frame_idx: np.ndarray
    box_idx: np.ndarray
    labels: List[str]
    label_idx: np.ndarray
    report: dict

    def __len__(self) -> int:
        return int(self.frame_idx.shape[0])

    def by_frame(self) -> "OrderedDict[int, List[int]]":
        """frame index -> positions in this shot list whose box lies in that frame (sorted)."""
        out: "OrderedDict[int, List[int]]" = OrderedDict()
        for pos in np.argsort(self.frame_idx, kind="stable"):
            out.setdefault(int(self.frame_idx[pos]), []).append(int(pos))
        return out


@dataclasses.dataclass
class Dataset:
    """Frames of an annotation file under one ID set.

    Attributes:
        frames: the images, in file order (images without any known box are kept, with N=0).
        label_set: the ID :class:`LabelSet` the scorer compares boxes against.
        id_rule: ``"flag:<field>"`` or ``"membership"`` (see module docstring).
        annotation_path: absolute path of the annotation file.
        stats: counts from loading (``images``, ``boxes_total``, ``boxes``, ``id``, ``ood``,
            ``skipped_unknown``, ``skipped_crowd``, ``skipped_bad_bbox``, ``skipped_no_image``).
    """

    frames: List[Frame]
    label_set: LabelSet
    id_rule: str
    annotation_path: pathlib.Path
    stats: Dict[str, int]

    # ------------------------------------------------------------------ counts
    @property
    def n_images(self) -> int:
        return len(self.frames)

    @property
    def n_boxes(self) -> int:
        return sum(len(f) for f in self.frames)

    @property
    def n_id(self) -> int:
        return int(sum(int(f.is_id.sum()) for f in self.frames))

    @property
    def n_ood(self) -> int:
        return self.n_boxes - self.n_id

    def describe(self) -> dict:
        """JSON-friendly summary for reports."""
        return {"annotations": str(self.annotation_path), "id_set": self.label_set.name, "id_rule": self.id_rule,
                "images": self.n_images, "boxes": self.n_boxes, "id_boxes": self.n_id, "ood_boxes": self.n_ood,
                "load_stats": dict(self.stats)}

    def _with_frames(self, frames: Sequence[Frame]) -> "Dataset":
        return Dataset(list(frames), self.label_set, self.id_rule, self.annotation_path, dict(self.stats))

    # ------------------------------------------------------------------ selections
    def subset(self, max_images: Optional[int], strategy: str = "spread", seed: int = 0) -> "Dataset":
        """At most ``max_images`` frames (None or <= 0: all).

        Args:
            strategy: ``"spread"`` evenly spaced over the file order (covers every source of a
                file sorted by source, deterministic), ``"first"`` the first frames, ``"random"``
                a seeded random choice (kept in file order).
        """
        n = len(self.frames)
        if max_images is None or max_images <= 0 or max_images >= n:
            return self._with_frames(self.frames)
        k = int(max_images)
        if strategy == "first":
            idx = np.arange(k)
        elif strategy == "spread":
            idx = np.unique(np.floor(np.arange(k) * (n / k)).astype(int))
        elif strategy == "random":
            idx = np.sort(np.random.default_rng(seed).choice(n, size=k, replace=False))
        else:
            raise ValueError(f"unknown subset strategy {strategy!r}; use 'spread', 'first' or 'random'")
        return self._with_frames([self.frames[i] for i in idx])

    def split(self, frac: float, seed: int = 0) -> Tuple["Dataset", "Dataset"]:
        """Split **by image** (boxes of one image never straddle) into ``(a, b)``.

        ``a`` gets ``round(frac * n_images)`` images chosen by a seeded permutation (e.g. the
        calibration part), ``b`` the rest (held-out); both keep file order.

        Raises:
            ValueError: ``frac`` not in [0, 1].
        """
        if not 0.0 <= float(frac) <= 1.0:
            raise ValueError(f"split fraction must be in [0, 1], got {frac}")
        n = len(self.frames)
        perm = np.random.default_rng(seed).permutation(n)
        k = int(round(float(frac) * n))
        a = np.sort(perm[:k])
        b = np.sort(perm[k:])
        return self._with_frames([self.frames[i] for i in a]), self._with_frames([self.frames[i] for i in b])

    def without_frames(self, frame_indices) -> "Dataset":
        """A copy without the given frame indices (e.g. images that provided fine-tuning shots)."""
        drop = {int(i) for i in frame_indices}
        return self._with_frames([f for i, f in enumerate(self.frames) if i not in drop])

    def sample_shots(self, n_per_class: int, seed: int = 0, min_size: float = 2.0) -> Shots:
        """Draw N ID ground-truth boxes per ID class (the paper's few-shot protocol).

        Candidates are all ID boxes whose category maps to a label of :attr:`label_set` and whose
        width and height are finite and >= ``min_size`` px (smaller ones could not be encoded).
        For each label, ``n_per_class`` are drawn without replacement with
        ``default_rng(seed)``; a class with fewer candidates contributes all of them and is
        listed in ``report["short_classes"]`` (and logged). Result order: by label index, then
        by (frame, box).

        Raises:
            ValueError: ``n_per_class`` < 1, or no ID box at all.
        """
        if int(n_per_class) < 1:
            raise ValueError(f"n_per_class must be >= 1, got {n_per_class}")
        n_per_class = int(n_per_class)
        lookup = label_lookup(self.label_set)
        cand: Dict[int, List[Tuple[int, int]]] = {k: [] for k in range(len(self.label_set))}
        for fi, fr in enumerate(self.frames):
            for bi in np.flatnonzero(fr.is_id):
                k = lookup.get(normalize_name(fr.categories[bi]))
                if k is None:
                    continue
                w, h = float(fr.boxes[bi, 2]), float(fr.boxes[bi, 3])
                if not (np.isfinite(w) and np.isfinite(h) and w >= min_size and h >= min_size):
                    continue
                cand[k].append((fi, int(bi)))
        if not any(cand.values()):
            raise ValueError(f"no ID boxes of label set {self.label_set.name!r} to draw shots from")
        rng = np.random.default_rng(seed)
        fidx, bidx, labs, lidx = [], [], [], []
        per_class, short, missing = {}, [], []
        for k, lab in enumerate(self.label_set.labels):
            pool = cand[k]
            if len(pool) <= n_per_class:
                chosen = list(range(len(pool)))
                if len(pool) < n_per_class:
                    (short if pool else missing).append(lab)
            else:
                chosen = sorted(rng.choice(len(pool), size=n_per_class, replace=False).tolist())
            per_class[lab] = {"available": len(pool), "drawn": len(chosen)}
            for c in chosen:
                fidx.append(pool[c][0])
                bidx.append(pool[c][1])
                labs.append(lab)
                lidx.append(k)
        if short:
            LOG.warning("few-shot: %d class(es) have fewer than %d boxes, all taken: %s", len(short), n_per_class,
                        ", ".join(f"{c} ({per_class[c]['available']})" for c in short))
        if missing:
            LOG.warning("few-shot: no ID box at all for %d class(es): %s", len(missing), ", ".join(missing))
        report = {"n_per_class": n_per_class, "seed": int(seed), "n_shots": len(labs), "per_class": per_class,
                  "short_classes": short, "missing_classes": missing}
        return Shots(np.asarray(fidx, np.int64), np.asarray(bidx, np.int64), labs, np.asarray(lidx, np.int64), report)

    # ------------------------------------------------------------------ images
    @staticmethod
    def load_image(frame: Frame) -> np.ndarray:
        """Read the frame's image as ``HxWx3`` uint8 **RGB**.

        Raises:
            DatasetError: the file is missing or not a decodable image.
        """
        import cv2

        bgr = cv2.imread(str(frame.path), cv2.IMREAD_COLOR)
        if bgr is None:
            raise DatasetError(f"cannot read image {frame.path} (missing or not a decodable image)")
        return np.ascontiguousarray(bgr[:, :, ::-1])


def label_lookup(label_set: LabelSet) -> Dict[str, int]:
    """normalised name or alias -> label index."""
    out: Dict[str, int] = {}
    for k, lab in enumerate(label_set.labels):
        for name in label_set.names_for(lab):
            out.setdefault(normalize_name(name), k)
    return out


def _resolve_id_set(id_set) -> Tuple[LabelSet, Optional[str]]:
    """(label set, flag field or None). Flag fields apply only to the built-in voc/bdd names."""
    if isinstance(id_set, LabelSet):
        return id_set, None
    text = os.fspath(id_set)
    key = text.strip().lower()
    if key in FLAG_FIELDS and not os.path.exists(text):
        return load_label_set(key), FLAG_FIELDS[key]
    return load_label_set(text), None


def load_dataset(path: Union[str, os.PathLike], id_set: Union[str, os.PathLike, LabelSet] = "voc") -> Dataset:
    """Load an ood_pack-format or plain COCO annotation file (see module docstring).

    Args:
        path: the annotation JSON; image ``file_name`` entries are relative to its folder
            (absolute names are used as they are).
        id_set: ``"voc"`` / ``"bdd"`` (flags of the pack when present, else membership), another
            built-in name, a YAML label set path/name, or a :class:`LabelSet` (membership).

    Returns:
        :class:`Dataset`; unknown-status boxes, crowd boxes and boxes with a malformed ``bbox``
        are dropped and counted in ``stats``.

    Raises:
        DatasetError: file missing / not JSON / missing ``images`` or ``annotations`` / an
            annotation without a category.
        labels.LabelSetError: invalid ``id_set``.
    """
    path = pathlib.Path(path).expanduser().resolve()
    data = _read_coco(path)
    label_set, flag = _resolve_id_set(id_set)
    anns = data["annotations"]
    if flag is not None and anns and not any(flag in a for a in anns[:50]):
        LOG.info("%s has no %r flags: ID = membership in label set %r", path, flag, label_set.name)
        flag = None
    stats = Counter(images=0, boxes_total=len(anns), boxes=0, id=0, ood=0, skipped_unknown=0, skipped_crowd=0,
                    skipped_bad_bbox=0, skipped_no_image=0)
    per_image = _rows_per_image(path, data, label_lookup(label_set), flag, stats)
    frames = _frames(path, data["images"], per_image, stats)
    rule = f"flag:{flag}" if flag else "membership"
    ds = Dataset(frames, label_set, rule, path, dict(stats))
    LOG.info("loaded %s: %d images, %d boxes (%d ID / %d OOD) for ID set %r (%s); skipped %d unknown, %d crowd",
             path, ds.n_images, ds.n_boxes, ds.n_id, ds.n_ood, label_set.name, rule, stats["skipped_unknown"],
             stats["skipped_crowd"])
    return ds


def _read_coco(path: pathlib.Path) -> dict:
    """The annotation file's JSON object, checked for its ``images`` and ``annotations`` lists."""
    if not path.is_file():
        raise DatasetError(f"annotation file not found: {path}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise DatasetError(f"cannot read annotation file {path}: {exc}") from exc
    if not isinstance(data, dict) or not isinstance(data.get("images"), list) or not isinstance(
            data.get("annotations"), list):
        raise DatasetError(f"{path}: expected a JSON object with 'images' and 'annotations' lists (COCO style)")
    return data


def _category(path, i: int, a: dict, cat_names: Dict[object, str]) -> str:
    cat = a.get("category")
    if cat is None and "category_id" in a:
        cat = cat_names.get(a["category_id"])
        if cat is None:
            raise DatasetError(f"{path}: annotations[{i}] has category_id {a['category_id']!r} "
                               "that is not in categories[]")
    if cat is None:
        raise DatasetError(f"{path}: annotations[{i}] has neither 'category' nor 'category_id'")
    return str(cat)


def _rows_per_image(path, data: dict, lookup, flag: Optional[str], stats: Counter) -> Dict[object, list]:
    """image id -> [(box xywh, category, is_id, annotation id, group)]; what is skipped is counted in ``stats``."""
    cat_names: Dict[object, str] = {}
    if isinstance(data.get("categories"), list):
        for c in data["categories"]:
            if isinstance(c, dict) and "id" in c and "name" in c:
                cat_names[c["id"]] = str(c["name"])
    per_image: Dict[object, list] = {}
    for i, a in enumerate(data["annotations"]):
        if not isinstance(a, dict) or "image_id" not in a:
            raise DatasetError(f"{path}: annotations[{i}] is not an object with 'image_id'")
        if a.get("iscrowd"):
            stats["skipped_crowd"] += 1
            continue
        cat = _category(path, i, a, cat_names)
        bbox = a.get("bbox")
        try:
            box = np.asarray(bbox, dtype=np.float32).reshape(4)
        except (TypeError, ValueError):
            stats["skipped_bad_bbox"] += 1
            LOG.warning("%s: annotations[%d] has a malformed bbox %r; skipped", path, i, bbox)
            continue
        if flag is not None:
            v = a.get(flag)
            if v is None:
                stats["skipped_unknown"] += 1
                continue
            is_id = bool(v)
        else:
            is_id = normalize_name(cat) in lookup
        per_image.setdefault(a["image_id"], []).append((box, cat, is_id, a.get("id", i), str(a.get("group") or "")))
    return per_image


def _frames(path: pathlib.Path, images: list, per_image: Dict[object, list], stats: Counter) -> List[Frame]:
    """One :class:`Frame` per image entry; annotations of unknown images counted as ``skipped_no_image``."""
    frames: List[Frame] = []
    seen_ids = set()
    for j, img in enumerate(images):
        if not isinstance(img, dict) or "id" not in img or "file_name" not in img:
            raise DatasetError(f"{path}: images[{j}] needs 'id' and 'file_name'")
        try:
            w, h = int(img["width"]), int(img["height"])
        except (KeyError, TypeError, ValueError):
            raise DatasetError(f"{path}: images[{j}] ({img['file_name']}) needs integer 'width' and 'height'") from None
        seen_ids.add(img["id"])
        rows = per_image.get(img["id"], [])
        fp = pathlib.Path(img["file_name"])
        fp = fp if fp.is_absolute() else path.parent / fp
        frames.append(Frame(
            image_id=img["id"], path=fp, width=w, height=h,
            boxes=np.stack([r[0] for r in rows]).astype(np.float32) if rows else np.zeros((0, 4), np.float32),
            categories=[r[1] for r in rows], is_id=np.asarray([r[2] for r in rows], dtype=bool),
            ann_ids=[r[3] for r in rows], source=str(img.get("source", "")), groups=[r[4] for r in rows]))
        stats["images"] += 1
        stats["boxes"] += len(rows)
        stats["id"] += sum(1 for r in rows if r[2])
        stats["ood"] += sum(1 for r in rows if not r[2])
    orphans = [k for k in per_image if k not in seen_ids]
    if orphans:
        n = sum(len(per_image[k]) for k in orphans)
        stats["skipped_no_image"] = n
        LOG.warning("%s: %d annotation(s) refer to %d image id(s) not in images[]; skipped", path, n, len(orphans))
    return frames


__all__ = ["Dataset", "DatasetError", "Frame", "Shots", "load_dataset", "label_lookup", "normalize_name", "FLAG_FIELDS"]
