"""`runa-ood make-bag`: write a ROS 2 bag (MCAP or sqlite3) from real photographs with boxes.

Topics written (one message of each per frame, all with the same header: stamp spaced at
``1/fps`` seconds, ``frame_id`` "camera"; the bag's log time equals the header stamp):

* ``/camera/image_raw`` (``sensor_msgs/Image``, ``rgb8`` or ``bgr8``) or, with ``--compressed``,
  ``/camera/image_raw/compressed`` (``sensor_msgs/CompressedImage``, JPEG);
* ``/detections`` (``vision_msgs/Detection2DArray``): the dataset's boxes (``class_id`` = category,
  ``score`` 1.0, ``id`` = annotation id), or a detector's boxes from ``--boxes``;
* ``/ood/ground_truth`` (``runa_ood_msgs/GroundTruth``): ID/OOD of every detection id.

Image sources: the shared data pack (``../shared/data/ood_pack/annotations.json``, ID/OOD flags
per label set) or any COCO-style file with ``--annotations``. When the pack is absent (or with
``--skimage``) the photographs scikit-image installs are used (astronaut, chelsea the cat, coffee,
rocket, stereo motorcycle), with boxes this project labelled by hand (``SKIMAGE_BOXES``).

``--boxes`` JSON: ``{"<file_name or image id>": [{"bbox": [x, y, w, h], "category": str,
"score": float (optional), "id": str (optional), "is_ood": bool (optional)}]}``; ``is_ood``
defaults to "category not in the ID set". Images missing from the file get no detections.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import pathlib
import sys
import time
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np

from . import bagio

LOG = logging.getLogger(__name__)

_REPO = pathlib.Path(__file__).resolve().parents[2]
DEFAULT_ANNOTATIONS = (_REPO.parent / "shared" / "data" / "ood_pack" / "annotations.json")

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


# --------------------------------------------------------------------------- frame sources
def pack_available(annotations=DEFAULT_ANNOTATIONS) -> bool:
    return pathlib.Path(annotations).is_file()


def pack_frames(annotations=DEFAULT_ANNOTATIONS, id_set: str = "voc", max_images: Optional[int] = None,
                images_per_source: Optional[int] = None, sources: Optional[Sequence[str]] = None,
                require_boxes: bool = True) -> List[FrameSpec]:
    """Frames of a COCO-style / ood_pack annotation file (via ``core.dataset.load_dataset``).

    ``images_per_source`` keeps the first k frames of every source (file order), ``sources``
    restricts to the named sources, ``max_images`` then caps the total (evenly spread).
    """
    from runa_ood_node.core.dataset import Dataset, load_dataset

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
    import cv2
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
    import skimage.data

    from runa_ood_node.core.labels import load_label_set

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


def apply_boxes_file(frames: List[FrameSpec], boxes_json, id_set: str = "voc") -> List[FrameSpec]:
    """Replace every frame's boxes by a detector's boxes from a JSON file (see module docstring)."""
    from runa_ood_node.core.labels import load_label_set

    data = json.loads(pathlib.Path(boxes_json).read_text())
    if not isinstance(data, dict):
        raise ValueError(f"{boxes_json}: expected an object mapping file name / image id to a list of boxes")
    ls = load_label_set(id_set)
    id_names = {n.lower() for lab in ls.labels for n in ls.names_for(lab)}
    missing = 0
    for fr in frames:
        entries = data.get(fr.name, data.get(str(fr.image_id), None) if fr.image_id is not None else None)
        if entries is None:
            missing += 1
            entries = []
        fr.boxes = np.asarray([e["bbox"] for e in entries], np.float32).reshape(-1, 4)
        fr.categories = [str(e.get("category", "")) for e in entries]
        fr.scores = np.asarray([float(e.get("score", 1.0)) for e in entries], np.float32)
        fr.ids = [str(e.get("id", f"{fr.name}#{i}")) for i, e in enumerate(entries)]
        fr.is_ood = np.asarray([bool(e["is_ood"]) if "is_ood" in e else c.lower() not in id_names
                                for e, c in zip(entries, fr.categories)], bool)
    if missing:
        LOG.warning("--boxes %s: %d of %d frames have no entry (written without detections)", boxes_json, missing,
                    len(frames))
    return frames


# --------------------------------------------------------------------------- writing
def write_bag(frames: Sequence[FrameSpec], out, fps: float = 5.0, storage: str = "mcap", compressed: bool = False,
              encoding: str = "rgb8", start_ns: Optional[int] = None, jpeg_quality: int = 90,
              overwrite: bool = False, progress: bool = True) -> dict:
    """Write ``frames`` as a bag at ``out``; returns a summary dict (path, storage, topics,
    counts, frames, boxes, id/ood boxes, start/end stamps in ns, seconds spent).

    Frames whose image cannot be read are skipped with a warning (counted in ``skipped``)."""
    from tqdm import tqdm

    if fps <= 0:
        raise ValueError(f"fps must be > 0, got {fps}")
    start_ns = time.time_ns() if start_ns is None else int(start_ns)
    period_ns = int(round(1e9 / fps))
    t0 = time.perf_counter()
    img_topic, img_type = ((bagio.COMPRESSED_TOPIC, bagio.COMPRESSED_TYPE) if compressed
                           else (bagio.IMAGE_TOPIC, bagio.IMAGE_TYPE))
    skipped, n_boxes, n_ood, k = [], 0, 0, 0
    with bagio.BagWriter(out, storage=storage, overwrite=overwrite) as bag:
        for fr in tqdm(frames, desc="make-bag", unit="frame", disable=not progress):
            try:
                rgb = fr.load()
            except Exception as exc:  # unreadable file: skip, keep going
                LOG.warning("skipping %s: %s", fr.name, exc)
                skipped.append(fr.name)
                continue
            st = start_ns + k * period_ns
            k += 1
            hdr = bagio.header(st)
            img = bagio.compressed_msg(rgb, hdr, jpeg_quality) if compressed else bagio.image_msg(rgb, hdr, encoding)
            bag.write(img_topic, img_type, st, img)
            bag.write(bagio.DETECTIONS_TOPIC, bagio.DETECTIONS_TYPE, st,
                      bagio.detections_msg(hdr, fr.boxes, fr.categories, fr.ids, fr.scores))
            bag.write(bagio.GROUND_TRUTH_TOPIC, bagio.GROUND_TRUTH_TYPE, st,
                      bagio.ground_truth_msg(hdr, fr.ids, fr.is_ood, fr.categories))
            n_boxes += len(fr.ids)
            n_ood += int(np.count_nonzero(fr.is_ood))
        counts = dict(bag.counts)
    return {"path": str(out), "storage": storage, "image_topic": img_topic, "counts": counts, "frames": k,
            "boxes": n_boxes, "id_boxes": n_boxes - n_ood, "ood_boxes": n_ood, "skipped": skipped,
            "start_ns": start_ns, "end_ns": start_ns + max(k - 1, 0) * period_ns, "fps": fps,
            "seconds": round(time.perf_counter() - t0, 3)}


# --------------------------------------------------------------------------- CLI
def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", "-o", default="out/bag", help="bag folder to create (default out/bag)")
    p.add_argument("--annotations", default=str(DEFAULT_ANNOTATIONS),
                   help="COCO-style / ood_pack annotation JSON (default: the shared data pack)")
    p.add_argument("--id-set", default="voc", help="ID label set deciding ID/OOD ground truth (voc, bdd, YAML)")
    p.add_argument("--max-images", type=int, default=40, help="cap on frames (evenly spread; 0 = all)")
    p.add_argument("--images-per-source", type=int, default=0, help="first k frames of every source (0 = all)")
    p.add_argument("--sources", nargs="*", default=None, help="only these pack sources (e.g. coco_tiny road_anomaly)")
    p.add_argument("--skimage", action="store_true",
                   help="use scikit-image's sample photographs (the fallback when the pack is absent)")
    p.add_argument("--boxes", default=None, help="JSON of detector boxes per image (replaces the dataset's boxes)")
    p.add_argument("--compressed", action="store_true", help="write JPEG CompressedImage instead of raw Image")
    p.add_argument("--encoding", choices=("rgb8", "bgr8"), default="rgb8", help="raw image encoding")
    p.add_argument("--jpeg-quality", type=int, default=90)
    p.add_argument("--fps", type=float, default=5.0, help="frame rate of the header stamps (Hz)")
    p.add_argument("--start-stamp", type=float, default=None, help="first stamp, s since epoch (default: now)")
    p.add_argument("--storage", choices=bagio.STORAGES, default="mcap")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")


def run(args) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        if args.skimage or not pack_available(args.annotations):
            if not args.skimage:
                print(f"data pack not found at {args.annotations}: using scikit-image's sample photographs")
            frames = skimage_frames(args.id_set, mirrored=True)
            if args.max_images:
                frames = frames[: args.max_images]
        else:
            frames = pack_frames(args.annotations, args.id_set, args.max_images or None,
                                 args.images_per_source or None, args.sources)
        if args.boxes:
            frames = apply_boxes_file(frames, args.boxes, args.id_set)
        if not frames:
            print("no frames selected (check --sources / --max-images)", file=sys.stderr)
            return 1
        start_ns = None if args.start_stamp is None else int(args.start_stamp * 1e9)
        summary = write_bag(frames, args.out, args.fps, args.storage, args.compressed, args.encoding, start_ns,
                            args.jpeg_quality, args.overwrite)
    except (bagio.BagError, ValueError, OSError) as exc:
        print(f"make-bag failed: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(summary, indent=2))
    return 0
