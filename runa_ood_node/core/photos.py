"""Photographs with labelled boxes, as frame specs: the data pack (any COCO-style / ood_pack
annotation file, read by ``core.dataset``) and scikit-image's sample photographs with boxes this
project labelled by hand. ROS-free; used by ``tools.make_bag`` (bags), the demo, and the backends'
measurement samples (``backends.samples``).

No path is guessed: the data pack is the annotation file a caller names, or
``core.paths.data_pack_annotations()`` (``$RUNA_OOD_DATA_PACK``; ``scripts/env.sh`` sets it in a
development checkout that has the pack beside it).
"""
from __future__ import annotations

import dataclasses
import pathlib
from typing import Callable, Dict, List, Optional, Sequence

import cv2
import numpy as np

from .dataset import Dataset, load_dataset
from .labels import load_label_set
from .paths import data_pack_annotations

#: Hand-labelled boxes of scikit-image's sample photographs, ``xywh`` in the images' original
#: pixels, checked by drawing them (category names follow COCO where COCO has the class).
SKIMAGE_BOXES: Dict[str, List[tuple]] = {
    "astronaut": [("person", (25, 15, 340, 497)), ("flag", (0, 0, 95, 310)),
                  ("space shuttle", (352, 0, 118, 275)), ("helmet", (275, 342, 235, 170))],
    "chelsea": [("cat", (5, 0, 441, 300))],
    "coffee": [("cup", (172, 15, 240, 285)), ("spoon", (322, 65, 103, 260))],
    "rocket": [("rocket", (300, 125, 42, 280)), ("tower", (0, 0, 90, 427)), ("tower", (555, 0, 75, 427))],
    "stereo_motorcycle": [("motorcycle", (90, 95, 595, 360)), ("bench", (45, 105, 240, 195))],
}
SKIMAGE_WIDTH = 640  # sample photographs are rescaled to this width (aspect kept)


@dataclasses.dataclass
class FrameSpec:
    """One frame to write: how to get its image and its labelled boxes.

    Attributes:
        name: file name / sample name (for logs and ``--boxes`` look-up).
        load: callable returning the image as HxWx3 uint8 RGB.
        boxes: float32 ``[N,4]`` xywh in the image's pixels.
        categories: N class names; ``is_ood``: bool ``[N]``; ``ids``: N unique detection ids.
        scores: float ``[N]`` detector confidences (1.0 for ground-truth boxes).
        source: data source (pack ``source`` field or ``skimage``).
    """

    name: str
    load: Callable[[], np.ndarray]
    boxes: np.ndarray
    categories: List[str]
    is_ood: np.ndarray
    ids: List[str]
    scores: np.ndarray
    source: str = ""
    image_id: Optional[int] = None


def pack_available(annotations=None) -> bool:
    """Is there an annotation file at ``annotations`` (default: :func:`core.paths.data_pack_annotations`)?"""
    annotations = annotations if annotations is not None else data_pack_annotations()
    return annotations is not None and pathlib.Path(annotations).is_file()


def pack_frames(annotations, id_set: str = "voc", max_images: Optional[int] = None,
                images_per_source: Optional[int] = None, sources: Optional[Sequence[str]] = None,
                require_boxes: bool = True) -> List[FrameSpec]:
    """Frames of a COCO-style / ood_pack annotation file (via ``core.dataset.load_dataset``).

    ``images_per_source`` keeps the first k frames of every source (file order), ``sources``
    restricts to the named sources, ``max_images`` then caps the total (evenly spread).
    """
    ds = load_dataset(annotations, id_set)
    frames = [f for f in ds.frames if (not require_boxes or len(f) > 0) and (not sources or f.source in sources)]
    if images_per_source:
        kept, per = [], {}
        for f in frames:
            if per.get(f.source, 0) < images_per_source:
                kept.append(f)
                per[f.source] = per.get(f.source, 0) + 1
        frames = kept
    if max_images and len(frames) > max_images:
        idx = np.unique(np.floor(np.arange(max_images) * (len(frames) / max_images)).astype(int))
        frames = [frames[i] for i in idx]
    out = []
    for f in frames:
        out.append(FrameSpec(
            name=str(pathlib.Path(f.path).relative_to(pathlib.Path(annotations).resolve().parent))
            if str(f.path).startswith(str(pathlib.Path(annotations).resolve().parent)) else str(f.path),
            load=(lambda fr=f: Dataset.load_image(fr)), boxes=np.asarray(f.boxes, np.float32).reshape(-1, 4),
            categories=list(f.categories), is_ood=~np.asarray(f.is_id, bool), ids=[str(a) for a in f.ann_ids],
            scores=np.ones(len(f), np.float32), source=f.source, image_id=f.image_id))
    return out


def _skimage_rgb(name: str) -> np.ndarray:
    import skimage.data

    img = skimage.data.stereo_motorcycle()[0] if name == "stereo_motorcycle" else getattr(skimage.data, name)()
    img = np.ascontiguousarray(np.asarray(img, np.uint8)[:, :, :3])
    s = SKIMAGE_WIDTH / img.shape[1]
    return cv2.resize(img, (SKIMAGE_WIDTH, int(round(img.shape[0] * s))), interpolation=cv2.INTER_AREA)


def skimage_frames(id_set: str = "voc", names: Optional[Sequence[str]] = None,
                   mirrored: bool = False) -> List[FrameSpec]:
    """Frames from scikit-image's sample photographs with the hand-labelled ``SKIMAGE_BOXES``,
    rescaled to 640 px wide; ID = category is one of ``id_set``'s labels. ``mirrored`` adds a
    horizontally flipped copy of every photograph (more frames for a demo)."""
    import skimage.data  # a workshop dependency (tests, demo, benchmarks), not the vehicle's

    ls = load_label_set(id_set)
    names_in = {n.lower() for lab in ls.labels for n in ls.names_for(lab)} if hasattr(ls, "names_for") \
        else {lab.lower() for lab in ls.labels}
    out: List[FrameSpec] = []
    next_id = 1
    for flip in ((False, True) if mirrored else (False,)):
        for name in (names or SKIMAGE_BOXES):
            table = SKIMAGE_BOXES[name]
            raw = skimage.data.stereo_motorcycle()[0] if name == "stereo_motorcycle" else getattr(skimage.data, name)()
            h0, w0 = raw.shape[:2]
            s = SKIMAGE_WIDTH / w0
            boxes = np.asarray([b for _, b in table], np.float32) * s
            if flip:
                boxes[:, 0] = SKIMAGE_WIDTH - boxes[:, 0] - boxes[:, 2]
            cats = [c for c, _ in table]

            def load(n=name, f=flip):
                rgb = _skimage_rgb(n)
                return np.ascontiguousarray(rgb[:, ::-1]) if f else rgb

            ids = [str(next_id + i) for i in range(len(table))]
            next_id += len(table)
            out.append(FrameSpec(name=name + ("_mirrored" if flip else ""), load=load, boxes=boxes, categories=cats,
                                 is_ood=np.asarray([c.lower() not in names_in for c in cats]), ids=ids,
                                 scores=np.ones(len(table), np.float32), source="skimage"))
    return out
