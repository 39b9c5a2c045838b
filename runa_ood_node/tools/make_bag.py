"""`runa-ood make-bag`: write a ROS 2 bag (MCAP or sqlite3) from real photographs with boxes.

Topics written (one message of each per frame, all with the same header: stamp spaced at
``1/fps`` seconds, ``frame_id`` "camera"; the bag's log time equals the header stamp):

* ``/camera/image_raw`` (``sensor_msgs/Image``, ``rgb8`` or ``bgr8``) or, with ``--compressed``,
  ``/camera/image_raw/compressed`` (``sensor_msgs/CompressedImage``, JPEG);
* ``/detections`` (``vision_msgs/Detection2DArray``): the dataset's boxes (``class_id`` = category,
  ``score`` 1.0, ``id`` = annotation id), or a detector's boxes from ``--boxes``;
* ``/ood/ground_truth`` (``runa_ood_msgs/GroundTruth``): ID/OOD of every detection id.

Image sources: a data pack (``--annotations``, default ``$RUNA_OOD_DATA_PACK``; ID/OOD flags
per label set) or any COCO-style file (``core.photos``). When the pack is absent (or with
``--skimage``) the photographs scikit-image installs are used (astronaut, chelsea the cat, coffee,
rocket, stereo motorcycle), with boxes this project labelled by hand (``SKIMAGE_BOXES``).

``--boxes`` JSON: ``{"<file_name or image id>": [{"bbox": [x, y, w, h], "category": str,
"score": float (optional), "id": str (optional), "is_ood": bool (optional)}]}``; ``is_ood``
defaults to "category not in the ID set". Images missing from the file get no detections.
"""
from __future__ import annotations

import argparse
import json
import logging
import pathlib
import sys
import time
from typing import List, Optional, Sequence

import numpy as np

from ..core.paths import data_pack_annotations
from ..core.photos import (SKIMAGE_BOXES, SKIMAGE_WIDTH, FrameSpec, pack_available, pack_frames,  # noqa: F401
                           skimage_frames)
from . import bagio

LOG = logging.getLogger(__name__)

#: the data pack named by $RUNA_OOD_DATA_PACK (scripts/env.sh sets it in a development checkout), or None
DEFAULT_ANNOTATIONS = data_pack_annotations()

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
    p.add_argument("--annotations", default=None if DEFAULT_ANNOTATIONS is None else str(DEFAULT_ANNOTATIONS),
                   help="COCO-style / ood_pack annotation JSON (default: $RUNA_OOD_DATA_PACK when set)")
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
                print(f"no data pack ({args.annotations or 'no --annotations, RUNA_OOD_DATA_PACK unset'}): "
                      "using scikit-image's sample photographs")
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
