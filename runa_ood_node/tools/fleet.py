"""`runa-ood fleet`: OOD scoring, mining and evaluation over many recordings, on Ray Data.

A fleet's recordings are hundreds or thousands of bags. This command scores every detector box of
every bag with the **same method as the node** and writes what a perception-data team needs:
per-box Parquet records, a per-bag summary, the top-K most OOD boxes (contact sheet + COCO-style
labelling export) and, where the bags carry ground truth, the same metrics table as
``runa-ood evaluate``, overall and per bag.

Pipeline (Ray Data, streaming)::

    bags (driver: expand folders / globs / URIs, drop bags already done)
      -> read   : one task per bag -> the project's bag reader decodes the image, detections and
                  ground-truth messages and pairs them per frame (blocks of decoded frames)
      -> score  : actor pool, one scorer (= one model) per actor, ``map_batches`` over batches of
                  frames that may span bags; ``num_gpus`` per actor on CUDA machines
      -> write  : the driver streams the per-box rows back and commits each bag atomically
                  (Parquet part file, then the bag's state file: tmp + rename)

Why a per-bag read task and not ``ray.data.read_mcap``: ``read_mcap`` returns one row per raw CDR
message of MCAP files only. It cannot read sqlite3 rosbag2 bags, decodes nothing, and spreads a
bag's messages over blocks, so the image / detections / ground-truth streams of a bag could not be
paired with the node's rules without a shuffle. The node's semantics are per bag and in stamp
order (pairing, drops by reason, a corrupt bag failing as a whole), so the unit of reading is the
bag: one read task runs the project's reader over one bag (local, or copied from any filesystem
pyarrow understands), which also lets a truncated or topic-less bag fail on its own, with its
reason, without touching the others.

Why the driver writes and not ``Dataset.write_parquet``: resumption needs a per-bag commit (a bag
is either fully written or absent), Ray's writer cuts files at block boundaries that do not align
with bags and leaves partial files behind when a run dies. The rows that come back are small (no
pixels, except a few thumbnails of top-K candidates), so writing them from the driver is cheap.

Same method as ``runa-ood evaluate --bag``: the scorer comes from the tools' one path
(``common.scorer_from_args``: arguments -> node parameters -> one validation into a
``core.config.ScorerConfig`` -> ``factory.build_scorer`` -> the node's thresholds fit check,
``--allow-threshold-mismatch`` as in ``evaluate``; ``--ablation`` applied), every actor builds its
scorer from that same ScorerConfig (``factory.build_scorer``: its files were loaded once, on the
driver), frames come from the same bag reader with the same pairing and decoding, so per-box results
equal ``evaluate --bag`` (tested).

No box is lost without a count: the read side's end marker of a bag lists every frame it sent with
its box count, every scored row carries its frame's row count, and the driver commits a bag only
when every frame has all its rows (Ray may cut an actor's output over several blocks). A row that
arrives for a bag already committed fails that bag (records removed, state ``failed``,
``--retry-failed`` redoes it). Each bag's summary reconciles ``boxes_read`` = ``boxes`` written +
``boxes_dropped`` by reason, and the final line adds them up. A bag cut short (an MCAP without its
footer: the recorder lost power) is read up to its last complete message and marked
``recovered``; one that cannot be read at all fails on its own with a one-line reason.

Networking: Ray never binds to loopback by itself; it registers the machine's own address and
talks over it. On machines where traffic must stay local, run the command inside a network
namespace that only has loopback::

    unshare -rn sh -c 'ip link set lo up && exec runa-ood fleet BAGS... --out out/fleet'

Starting a **local** Ray on a machine with a non-loopback interface up is refused (exit 2, with that
line) unless ``--allow-network`` is given: refusing is the safe default on shared or restricted
machines, and ``--allow-network`` is one flag away on a workstation where Ray may use the LAN.
Joining a cluster with ``--address`` is networking by definition and is not checked.
Usage reports are off (``RAY_USAGE_STATS_ENABLED=0``) and no dashboard is started.
"""
from __future__ import annotations

import argparse
import collections
import csv
import dataclasses
import fnmatch
import hashlib
import heapq
import io
import json
import logging
import math
import os
import pathlib
import shutil
import sys
import tempfile
import time
from typing import Any, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

import numpy as np

from . import bagio

LOG = logging.getLogger("runa_ood_node.tools.fleet")

#: bumped when the records' meaning changes: part of every bag's key, so old results are redone
SCHEMA_VERSION = 2  # 2: boxes_read / boxes_dropped / recovered in the bag summaries
BAG_FILE_SUFFIXES = (".mcap", ".db3")
#: node parameters that do not change scores (queue sizes, topics, QoS): left out of the bag key
_NOT_SCORING = {"image_topic", "detections_topic", "image_transport", "image_qos", "detections_qos",
                "image_queue_size", "detections_queue_size", "processing_queue_size", "pairing_buffer",
                "autostart", "allow_download"}
GLOB_CHARS = "*?["

# =========================================================================== CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from . import common

    parser.add_argument("inputs", nargs="+",
                        help="bags: rosbag2 folders (MCAP or sqlite3), folders holding bags (searched recursively), "
                             "globs, or URIs of any filesystem pyarrow understands (file://, s3://, gs://, ...)")
    parser.add_argument("--out", default="out/fleet", help="output folder (default %(default)s)")
    t = parser.add_argument_group("topics (defaults: what runa-ood make-bag writes)")
    t.add_argument("--image-topic", default=None,
                   help=f"image topic (default: {bagio.IMAGE_TOPIC}, else {bagio.COMPRESSED_TOPIC})")
    t.add_argument("--detections-topic", default=bagio.DETECTIONS_TOPIC, help="default %(default)s")
    t.add_argument("--gt-topic", default=bagio.GROUND_TRUTH_TOPIC,
                   help="ground-truth topic (runa_ood_msgs/GroundTruth); '' for none (default %(default)s)")
    common.add_model_arguments(parser)
    common.add_scoring_arguments(parser)
    parser.add_argument("--node-params", nargs="*", default=[], metavar="NAME:=VALUE",
                        help="further node parameters (YAML values), as for `evaluate --bag`: e.g. pairing_slop_s:=0.02")
    r = parser.add_argument_group("Ray")
    r.add_argument("--address", default=None,
                   help="join this Ray cluster (ray.init(address=...), e.g. 'auto' or ray://host:10001) instead of "
                        "starting a local Ray sized to this machine")
    r.add_argument("--workers", type=int, default=0,
                   help="scoring actors (one model each); 0 = one per GPU, else one per 4 CPUs (at least 1)")
    r.add_argument("--threads-per-worker", type=int, default=0,
                   help="torch threads of a CPU actor (0 = CPUs / workers)")
    r.add_argument("--batch-frames", type=int, default=8, help="frames per scoring batch (default %(default)s)")
    r.add_argument("--block-mb", type=float, default=1.0,
                   help="Ray Data's target block size in MiB (DataContext.target_max_block_size): smaller blocks "
                        "stream results back sooner; an actor's output may be cut over several blocks, which "
                        "the driver's per-frame row counts make safe (default %(default)s)")
    r.add_argument("--allow-network", action="store_true",
                   help="start a local Ray even though this machine has non-loopback interfaces (by default "
                        "refused: run inside `unshare -rn sh -c 'ip link set lo up && exec ...'`)")
    o = parser.add_argument_group("outputs")
    o.add_argument("--top-k", type=int, default=50, help="most-OOD boxes in the contact sheet / export (default 50)")
    o.add_argument("--tpr", type=float, default=0.95, help="TPR of the FPR@TPR metric (default %(default)s)")
    o.add_argument("--retry-failed", action="store_true",
                   help="score again bags that failed in an earlier run (unchanged failed bags are skipped)")
    o.add_argument("--force", action="store_true", help="score every bag again, ignoring earlier runs")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")


# =========================================================================== network guard


def non_loopback_interfaces() -> List[str]:
    """Names of the network interfaces that are up and not loopback, in this process's network
    namespace (ioctl on the interfaces the kernel lists; /sys/class/net may show another namespace)."""
    import fcntl
    import socket
    import struct

    out = []
    try:
        names = [n for _, n in socket.if_nameindex()]
    except OSError:
        return out
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for name in names:
            try:
                req = struct.pack("16sH14s", name.encode()[:15], 0, b"\0" * 14)
                flags = struct.unpack("16sH14s", fcntl.ioctl(s.fileno(), 0x8913, req))[1]  # SIOCGIFFLAGS
            except OSError:
                continue
            if flags & 0x1 and not flags & 0x8:  # IFF_UP and not IFF_LOOPBACK
                out.append(name)
    return out


LOOPBACK_WRAPPER = "unshare -rn sh -c 'ip link set lo up && exec runa-ood fleet ...'"


# =========================================================================== inputs


@dataclasses.dataclass
class BagRef:
    """One bag to process: ``uri`` as given (local absolute path or ``scheme://...``), ``local``
    (True when readable in place), ``size`` (bytes, all files) and ``mtime_ns`` (newest file)."""

    uri: str
    local: bool
    size: int
    mtime_ns: int
    error: Optional[str] = None

    def key(self, config_hash: str) -> str:
        blob = json.dumps([self.uri, self.size, self.mtime_ns, config_hash, SCHEMA_VERSION])
        return hashlib.sha256(blob.encode()).hexdigest()[:20]

    @property
    def name(self) -> str:
        return self.uri.rstrip("/").rsplit("/", 1)[-1]


def _fs_and_path(spec: str):
    """(pyarrow filesystem, path on it, is_local, uri prefix) of a path or URI."""
    from pyarrow import fs as pafs

    if "://" in spec and not spec.startswith("file://"):
        fs, path = pafs.FileSystem.from_uri(spec)
        return fs, path, False, spec[: spec.index("://") + 3]
    if spec.startswith("file://"):
        # file:// goes through pyarrow too (same code path as object stores), but reads in place
        fs, path = pafs.FileSystem.from_uri(spec)
        return fs, path, True, "file://"
    return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(spec)), True, ""


def _bag_ref(fs, path: str, infos: Sequence, local: bool, prefix: str) -> BagRef:
    files = [i for i in infos if i.type.name == "File"]
    size = sum(int(i.size or 0) for i in files)
    mtime = max((int(i.mtime_ns or 0) for i in files), default=0)
    return BagRef(uri=prefix + path if prefix else path, local=local, size=size, mtime_ns=mtime)


def expand_inputs(specs: Sequence[str]) -> List[BagRef]:
    """Bags named by ``specs``: a rosbag2 folder (has ``metadata.yaml``), a folder holding bags
    (searched recursively), a bare ``.mcap`` / ``.db3`` file outside a bag folder, a glob over any
    of those, or URIs of the same on any pyarrow filesystem. Inputs that match nothing come back as
    a ``BagRef`` with ``error`` set (reported, never fatal). Sorted by URI, no duplicates."""
    from pyarrow import fs as pafs

    out: Dict[str, BagRef] = {}
    for spec in specs:
        try:
            fs, path, local, prefix = _fs_and_path(spec)
        except Exception as exc:  # unknown scheme, no credentials, ...
            out[spec] = BagRef(spec, False, 0, 0, error=f"cannot open {spec}: {type(exc).__name__}: {exc}")
            continue
        pattern = None
        if any(c in path for c in GLOB_CHARS):
            pattern = path
            base = path[: min(path.index(c) for c in GLOB_CHARS if c in path)]
            path = base.rsplit("/", 1)[0] or "/"
        try:
            info = fs.get_file_info(path)
        except Exception as exc:
            out[spec] = BagRef(spec, local, 0, 0, error=f"cannot stat {spec}: {type(exc).__name__}: {exc}")
            continue
        if info.type == pafs.FileType.NotFound:
            out[spec] = BagRef(spec, local, 0, 0, error=f"{spec}: no such file or folder")
            continue
        if info.type == pafs.FileType.File and pattern is None:
            if path.endswith("/metadata.yaml") or path == "metadata.yaml":
                path = path.rsplit("/", 1)[0]
                infos = fs.get_file_info(pafs.FileSelector(path, recursive=True))
            else:
                infos = [info]
            ref = _bag_ref(fs, path, infos, local, prefix)
            out[ref.uri] = ref
            continue
        infos = fs.get_file_info(pafs.FileSelector(path, recursive=True))
        by_dir: Dict[str, List] = collections.defaultdict(list)
        for i in infos:
            by_dir[i.path.rsplit("/", 1)[0]].append(i)
        bag_dirs = sorted({i.path.rsplit("/", 1)[0] for i in infos if i.base_name == "metadata.yaml"})
        if any(i.base_name == "metadata.yaml" for i in infos) and path not in bag_dirs:
            if fs.get_file_info(path + "/metadata.yaml").type == pafs.FileType.File:
                bag_dirs.append(path)
        if fs.get_file_info(path.rstrip("/") + "/metadata.yaml").type == pafs.FileType.File:
            bag_dirs = [path.rstrip("/")]

        def inside_bag(p: str) -> bool:
            return any(p == d or p.startswith(d + "/") for d in bag_dirs)

        found = []
        for d in bag_dirs:
            found.append((d, [i for i in infos if i.path.startswith(d + "/")]))
        for i in infos:
            if i.type == pafs.FileType.File and i.path.endswith(BAG_FILE_SUFFIXES) and not inside_bag(i.path):
                found.append((i.path, [i]))
        if pattern is not None:
            found = [(p, fi) for p, fi in found if fnmatch.fnmatch(p, pattern)]
        if not found:
            out[spec] = BagRef(spec, local, 0, 0, error=f"{spec}: no bags found (no metadata.yaml, .mcap or .db3)")
        for p, fi in found:
            ref = _bag_ref(fs, p, fi, local, prefix)
            out[ref.uri] = ref
    return [out[k] for k in sorted(out)]


# =========================================================================== reading (runs in Ray tasks)

READ_COLUMNS = ("kind", "bag_key", "bag", "image_topic", "frame_index", "n_boxes", "stamp_ns", "height", "width",
                "image", "boxes", "det_scores", "meta", "info")


def _read_schema():
    import pyarrow as pa

    return pa.schema([("kind", pa.string()), ("bag_key", pa.string()), ("bag", pa.string()),
                      ("image_topic", pa.string()), ("frame_index", pa.int32()), ("n_boxes", pa.int32()),
                      ("stamp_ns", pa.int64()),
                      ("height", pa.int32()), ("width", pa.int32()), ("image", pa.binary()),
                      ("boxes", pa.binary()), ("det_scores", pa.binary()), ("meta", pa.string()),
                      ("info", pa.string())])


def _bag_topic(path, image_topic: Optional[str]) -> Tuple[str, int]:
    """The image topic read from the bag at ``path`` (``image_topic``, else the bag's) and its message count."""
    info = bagio.bag_info(path)
    topic = image_topic or bagio.pick_image_topic(info.topics) or bagio.IMAGE_TOPIC
    return topic, info.counts.get(topic, 0)


def bag_node_parameters(args_ns, random_weights: bool, path, image_topic: Optional[str]) -> Dict[str, Any]:
    """The node parameters ``evaluate --bag`` uses for this bag (``common.node_parameters_from_args``
    with the bag's image topic and image count: the pairing buffer follows it)."""
    from . import common

    topic, n = _bag_topic(path, image_topic)
    return common.node_parameters_from_args(args_ns, random_weights=random_weights, image_topic=topic, n_frames=n)


def iter_bag_frames(path, image_topic: Optional[str], detections_topic: str, gt_topic: Optional[str],
                    params: Dict[str, Any], drops: collections.Counter, counts: Dict[str, int],
                    box_drops: Optional[collections.Counter] = None) -> Iterator[Tuple[int, "bagio.BagFrame"]]:
    """``(frame_index, frame)`` for every paired, decoded frame of one local bag, read by the one
    reader (``bagio.iter_frames``: the node's pairer with ``params``' pairing settings, the node's
    decoders) exactly as ``evaluate --bag`` reads it. ``frame_index`` numbers the bag's images in
    the order the reader gives them; everything not scorable is counted in ``drops`` by the
    reader's reason (messages in ``drops``, their detection boxes in ``box_drops``),
    ``counts["images"]`` = images read, ``counts["boxes_read"]`` = boxes of every detections
    message read (those of the frames yielded + ``box_drops``).

    Raises:
        bagio.BagError: no image or detections topic, or the bag cannot be read; the storage layer's
            own errors for a truncated or corrupt file.
    """
    info = bagio.bag_info(path)
    topic = image_topic or bagio.pick_image_topic(info.topics)
    if topic is None or topic not in info.topics:
        raise bagio.BagError(f"no image topic ({topic or bagio.IMAGE_TOPIC + ' / ' + bagio.COMPRESSED_TOPIC}); "
                             f"topics {sorted(info.topics)}")
    if detections_topic not in info.topics:
        raise bagio.BagError(f"no detections topic {detections_topic}; topics {sorted(info.topics)}")
    counts["images"] = counts["boxes_read"] = 0
    box_drops = collections.Counter() if box_drops is None else box_drops
    for fr in bagio.iter_frames(path, topic, detections_topic, gt_topic, params=params):
        k = counts["images"]
        if fr.kind in ("pair", "image"):
            counts["images"] += 1
        counts["boxes_read"] += len(fr.ids)
        if not fr.ok:
            drops[fr.reason] += 1
            if fr.ids:
                box_drops[fr.reason] += len(fr.ids)
            continue
        yield k, fr


def _image_topic_of(path, wanted: Optional[str]) -> Optional[str]:
    try:
        return wanted or bagio.pick_image_topic(bagio.bag_info(path).topics)
    except Exception:
        return wanted


def _localise(uri: str, local: bool, tmp: str) -> str:
    """A local path to read ``uri`` from: itself when local, else a copy under ``tmp``."""
    from pyarrow import fs as pafs

    fs, path, is_local, _ = _fs_and_path(uri)
    if local and isinstance(fs, pafs.LocalFileSystem):
        return path
    dst = os.path.join(tmp, path.rstrip("/").rsplit("/", 1)[-1])
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.Directory:
        os.makedirs(dst, exist_ok=True)
        pafs.copy_files(path, dst, source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
    else:
        with fs.open_input_stream(path) as src, open(dst, "wb") as out:
            shutil.copyfileobj(src, out, 1 << 22)
    return dst


class ReadBags:
    """``map_batches`` function of the read stage: each input row names one bag; yields Arrow
    blocks of decoded, paired frames and finally one ``bag_end`` row (frames sent, drops by
    reason, error) so the driver knows when the bag is complete and why frames were lost."""

    def __init__(self, image_topic: Optional[str], detections_topic: str, gt_topic: Optional[str],
                 args_ns, random_weights: bool, frames_per_block: int = 8):
        self.image_topic, self.detections_topic, self.gt_topic = image_topic, detections_topic, gt_topic
        self.args_ns, self.random_weights = args_ns, bool(random_weights)
        self.frames_per_block = max(1, int(frames_per_block))

    def __call__(self, batch) -> Iterator[Any]:
        for row in batch.to_pylist():
            yield from self._bag(row)

    def _bag(self, row: Dict[str, Any]) -> Iterator[Any]:
        import pyarrow as pa

        schema = _read_schema()
        t0 = time.perf_counter()
        drops: collections.Counter = collections.Counter()
        box_drops: collections.Counter = collections.Counter()
        sent, boxes_sent, error, topic, recovered = 0, 0, None, None, None
        frame_boxes: Dict[int, int] = {}
        counts: Dict[str, int] = {"images": 0, "boxes_read": 0}
        pending: List[Dict[str, Any]] = []
        tmp = tempfile.mkdtemp(prefix="runa_fleet_")
        try:
            path = _localise(row["bag"], row["local"], tmp)
            info = bagio.bag_info(path)
            if info.recovered:
                recovered = info.recovery.as_dict()
                LOG.warning("bag %s is cut short (no MCAP footer): %s", row["bag"], info.recovery.describe())
            topic = _image_topic_of(path, self.image_topic)
            params = bag_node_parameters(self.args_ns, self.random_weights, path, topic)
            for k, fr in iter_bag_frames(path, topic, self.detections_topic, self.gt_topic, params, drops, counts,
                                         box_drops):
                gt = fr.ground_truth or {}
                meta = {"det_labels": list(fr.class_ids), "det_ids": list(fr.ids),
                        "gt_is_ood": [gt[i][0] if i in gt else None for i in fr.ids],
                        "gt_category": [gt[i][1] if i in gt else None for i in fr.ids]}
                pending.append({"kind": "frame", "bag_key": row["bag_key"], "bag": row["bag"], "image_topic": topic,
                                "frame_index": k, "n_boxes": len(fr.ids), "stamp_ns": int(fr.stamp_ns),
                                "height": int(fr.rgb.shape[0]), "width": int(fr.rgb.shape[1]),
                                "image": np.ascontiguousarray(fr.rgb).tobytes(),
                                "boxes": np.asarray(fr.boxes_cxcywh, np.float32).tobytes(),
                                "det_scores": np.asarray(fr.scores, np.float32).tobytes(),
                                "meta": json.dumps(meta), "info": None})
                sent += 1
                boxes_sent += len(fr.ids)
                frame_boxes[k] = len(fr.ids)
                if len(pending) >= self.frames_per_block:
                    yield pa.Table.from_pylist(pending, schema=schema)
                    pending = []
        except Exception as exc:  # corrupt / topic-less / unreadable bag: reported, never fatal
            error = f"{type(exc).__name__}: {exc}"
            LOG.warning("bag %s failed: %s", row["bag"], error)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        if pending:
            yield pa.Table.from_pylist(pending, schema=schema)
        # the bag's end marker: what the driver must receive before it may commit the bag (every
        # frame sent, with its box count) and how the boxes read reconcile (sent + dropped by reason)
        info = {"frames_sent": sent, "boxes_sent": boxes_sent, "frame_boxes": frame_boxes,
                "images": counts["images"], "boxes_read": counts["boxes_read"], "drops": dict(drops),
                "box_drops": dict(box_drops), "error": error, "recovered": recovered,
                "read_s": round(time.perf_counter() - t0, 3), "image_topic": topic}
        yield pa.Table.from_pylist([{"kind": "bag_end", "bag_key": row["bag_key"], "bag": row["bag"],
                                     "image_topic": topic, "frame_index": -1, "n_boxes": 0, "stamp_ns": 0,
                                     "height": 0, "width": 0, "image": None, "boxes": None, "det_scores": None,
                                     "meta": None, "info": json.dumps(info)}], schema=schema)


# =========================================================================== scoring (Ray actors)


def _out_schema():
    import pyarrow as pa

    return pa.schema([
        ("kind", pa.string()), ("bag_key", pa.string()), ("bag", pa.string()), ("topic", pa.string()),
        ("stamp_ns", pa.int64()), ("frame_index", pa.int32()), ("frame_rows", pa.int32()), ("box_index", pa.int32()),
        ("det_id", pa.string()), ("det_label", pa.string()), ("det_score", pa.float32()),
        ("x1", pa.float32()), ("y1", pa.float32()), ("x2", pa.float32()), ("y2", pa.float32()),
        ("label", pa.string()), ("similarity", pa.float64()), ("uncertainty", pa.float64()),
        ("threshold", pa.float64()), ("is_ood", pa.bool_()), ("status", pa.string()),
        ("gt_is_ood", pa.bool_()), ("gt_category", pa.string()), ("model_id", pa.string()),
        ("thumb", pa.binary()), ("context", pa.binary()), ("info", pa.string()),
        ("worker_pid", pa.int32()), ("worker_rss_mb", pa.float32()), ("worker_busy_s", pa.float64()),
        ("worker_boxes", pa.int64())])


OUT_NULLS = {"stamp_ns": 0, "frame_index": -1, "frame_rows": 0, "box_index": -1}


def _png(rgb: np.ndarray) -> bytes:
    import cv2

    ok, buf = cv2.imencode(".png", np.ascontiguousarray(rgb[:, :, ::-1]))
    return bytes(buf) if ok else b""


def _jpg(rgb: np.ndarray, quality: int = 85) -> bytes:
    import cv2

    ok, buf = cv2.imencode(".jpg", np.ascontiguousarray(rgb[:, :, ::-1]), [int(cv2.IMWRITE_JPEG_QUALITY), quality])
    return bytes(buf) if ok else b""


def crop_and_context(rgb: np.ndarray, box, crop_px: int = 160, context_w: int = 320) -> Tuple[bytes, bytes]:
    """PNG of the box crop (10 % margin, longest side ``crop_px``) and JPEG of the whole frame
    scaled to ``context_w`` wide with the box drawn in red."""
    import cv2

    h, w = rgb.shape[:2]
    x1, y1, x2, y2 = [float(v) for v in box]
    mx, my = 0.1 * (x2 - x1), 0.1 * (y2 - y1)
    a, b = int(max(0, math.floor(x1 - mx))), int(max(0, math.floor(y1 - my)))
    c, d = int(min(w, math.ceil(x2 + mx))), int(min(h, math.ceil(y2 + my)))
    crop = rgb[b:max(d, b + 1), a:max(c, a + 1)]
    s = crop_px / max(crop.shape[:2])
    crop = cv2.resize(crop, (max(1, int(crop.shape[1] * s)), max(1, int(crop.shape[0] * s))),
                      interpolation=cv2.INTER_AREA if s < 1 else cv2.INTER_LINEAR)
    s2 = context_w / w
    ctx = cv2.resize(rgb, (context_w, max(1, int(round(h * s2)))), interpolation=cv2.INTER_AREA)
    cv2.rectangle(ctx, (int(x1 * s2), int(y1 * s2)), (int(x2 * s2), int(y2 * s2)), (255, 0, 0), 2)
    return _png(crop), _jpg(ctx)


class ScoreFrames:
    """``map_batches`` callable class of the score stage: one scorer (one model) per actor, built
    by ``factory.build_scorer(config)`` from the driver's ``core.config.ScorerConfig`` (the node's
    construction, as ``evaluate --bag`` builds it; ``config.ablation`` applied). A batch holds frames of one or several
    bags, scored together: ``OodScorer.score_frames`` sends the views of every box of the batch
    through the visual trunk in one backend call (equal to the node's per-frame ``score``). Every
    frame becomes one row per box (a ``frame`` row when it has no box, or when scoring it failed:
    that row counts its boxes as dropped), and every row of a frame carries ``frame_rows``, the
    number of rows the frame has: Ray may cut this output over several blocks, and the driver
    commits a bag only once every frame's rows are in. Boxes in the top ``top_k`` of their bag
    within the batch carry a crop and a context thumbnail: the union of those is a superset of
    every bag's (and the fleet's) top K, at a bounded cost per batch."""

    def __init__(self, config, threads: int = 0, top_k: int = 50):
        import torch

        from ..factory import build_scorer

        if threads > 0:
            torch.set_num_threads(int(threads))
        logging.basicConfig(level=logging.WARNING, format="[%(levelname)s] %(name)s: %(message)s")
        self.scorer = build_scorer(config)
        self.model_id = str(self.scorer.encoder.model_id)
        self.top_k = int(top_k)
        self.pid = os.getpid()
        self.busy_s, self.boxes = 0.0, 0  # time spent in __call__ and boxes scored by this actor

    @staticmethod
    def _rss_mb() -> float:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0

    def __call__(self, batch):
        import pyarrow as pa

        from ..core.boxes import BoxStatus

        t0 = time.perf_counter()
        out: List[Dict[str, Any]] = []
        frames: Dict[int, np.ndarray] = {}
        from ..core.pipeline import FrameInput
        from .bag_eval import finite_or_none

        todo = []  # (base, meta, rgb, det, FrameInput) of the batch's frames, scored together below
        for row in batch.to_pylist():
            base = {"bag_key": row["bag_key"], "bag": row["bag"], "topic": row["image_topic"],
                    "model_id": self.model_id, "worker_pid": self.pid}
            if row["kind"] != "frame":
                out.append({**base, **OUT_NULLS, "kind": row["kind"], "info": row["info"]})
                continue
            base.update(stamp_ns=row["stamp_ns"], frame_index=row["frame_index"])
            meta = json.loads(row["meta"])
            rgb = np.frombuffer(row["image"], np.uint8).reshape(row["height"], row["width"], 3)
            boxes = np.frombuffer(row["boxes"], np.float32).reshape(-1, 4)
            det = np.frombuffer(row["det_scores"], np.float32)
            todo.append((base, meta, rgb, det, FrameInput(rgb, boxes, "cxcywh", det, meta["det_labels"])))
        try:  # one backend call for every frame of the batch (OodScorer.score_frames)
            results = self.scorer.score_frames([t[-1] for t in todo])
        except Exception:  # a frame the scorer refuses: score one by one so only that frame is lost
            results = []
            for t in todo:
                try:
                    results.append(self.scorer.score_frames([t[-1]])[0])
                except Exception as exc:
                    results.append(exc)
        for (base, meta, rgb, det, fin), res in zip(todo, results):
            first = len(out)
            if isinstance(res, Exception):  # counted (its boxes as dropped), never fatal
                out.append({**base, "kind": "frame", "box_index": -1,
                            "info": json.dumps({"error": f"{type(res).__name__}: {res}",
                                                "boxes_dropped": len(meta["det_ids"])})})
                for r in out[first:]:
                    r["frame_rows"] = len(out) - first
                continue
            if len(res) == 0 or res.error:
                out.append({**base, "kind": "frame", "box_index": -1,
                            "info": json.dumps({"error": res.error}) if res.error else None})
            for i in range(len(res)):
                st = int(res.status[i])
                out.append({**base, "kind": "box", "box_index": i, "det_id": meta["det_ids"][i],
                            "det_label": meta["det_labels"][i],
                            "det_score": finite_or_none(det[i]) if i < det.size else None,
                            "x1": finite_or_none(res.boxes_xyxy[i, 0]), "y1": finite_or_none(res.boxes_xyxy[i, 1]),
                            "x2": finite_or_none(res.boxes_xyxy[i, 2]), "y2": finite_or_none(res.boxes_xyxy[i, 3]),
                            "label": res.label[i], "similarity": finite_or_none(res.similarity[i]),
                            "uncertainty": finite_or_none(res.uncertainty[i]),
                            "threshold": finite_or_none(res.threshold[i]),
                            "is_ood": bool(res.is_ood[i]),
                            "status": BoxStatus(st).name if st in BoxStatus._value2member_map_ else str(st),
                            "gt_is_ood": meta["gt_is_ood"][i], "gt_category": meta["gt_category"][i]})
                frames[len(out) - 1] = rgb
            for r in out[first:]:
                r["frame_rows"] = len(out) - first
        # thumbnails for the per-bag top K of this batch
        by_bag: Dict[str, List[int]] = collections.defaultdict(list)
        for j, r in enumerate(out):
            if r.get("kind") == "box" and r.get("uncertainty") is not None and r["status"] == "OK":
                by_bag[r["bag_key"]].append(j)
        for rows in by_bag.values():
            for j in heapq.nlargest(self.top_k, rows, key=lambda j: out[j]["uncertainty"]):
                r = out[j]
                r["thumb"], r["context"] = crop_and_context(frames[j], (r["x1"], r["y1"], r["x2"], r["y2"]))
        rss = self._rss_mb()
        self.boxes += sum(1 for r in out if r.get("kind") == "box")
        self.busy_s += time.perf_counter() - t0
        for r in out:
            r["worker_rss_mb"], r["worker_busy_s"], r["worker_boxes"] = rss, self.busy_s, self.boxes
        return pa.Table.from_pylist(out, schema=_out_schema())


# =========================================================================== driver: state and commit


def _atomic_write_bytes(path: pathlib.Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _atomic_write_json(path: pathlib.Path, obj: Any) -> None:
    from ..core.plain import to_plain

    _atomic_write_bytes(path, (json.dumps(to_plain(obj), indent=2, default=str) + "\n").encode())


def _atomic_write_parquet(path: pathlib.Path, table, metadata: Optional[Dict[str, str]] = None) -> None:
    import pyarrow.parquet as pq

    path.parent.mkdir(parents=True, exist_ok=True)
    if metadata:
        table = table.replace_schema_metadata({**(table.schema.metadata or {}),
                                               **{k.encode(): v.encode() for k, v in metadata.items()}})
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    pq.write_table(table, tmp)
    os.replace(tmp, path)


WORKER_COLUMNS = ("worker_pid", "worker_rss_mb", "worker_busy_s", "worker_boxes")
RECORD_DROP = ("kind", "thumb", "context", "info") + WORKER_COLUMNS


class BagState:
    """What the driver gathers for one bag while its rows stream back, and when it may commit.

    Completeness is counted, never guessed from frame indices: the read side's end marker lists
    every frame it sent with its box count, and every scored row carries ``frame_rows`` (how many
    rows its frame has). The bag is complete once the end marker is in and every frame sent has
    exactly its rows; a frame with more rows than announced (a duplicate) makes the bag fail."""

    def __init__(self, ref: BagRef, key: str):
        self.ref, self.key = ref, key
        self.tables: List[Any] = []
        self.rows: collections.Counter = collections.Counter()  # frame index -> rows received
        self.expected: Dict[int, int] = {}  # frame index -> rows announced by the score stage
        self.frame_errors: collections.Counter = collections.Counter()
        self.boxes_dropped: collections.Counter = collections.Counter()  # scoring failures, by reason
        self.problems: List[str] = []
        self.end: Optional[Dict[str, Any]] = None

    def add(self, table) -> None:
        import pyarrow.compute as pc

        kinds = table.column("kind").to_pylist()
        if "bag_end" in kinds:
            for r in table.filter(pc.equal(table.column("kind"), "bag_end")).to_pylist():
                if self.end is not None:
                    self.problems.append("two end markers")
                self.end = json.loads(r["info"])
        frames = table.filter(pc.not_equal(table.column("kind"), "bag_end"))
        if frames.num_rows:
            for fi, n in zip(frames.column("frame_index").to_pylist(), frames.column("frame_rows").to_pylist()):
                self.rows[fi] += 1
                if self.expected.setdefault(fi, n) != n:
                    self.problems.append(f"frame {fi}: rows announce {n} and {self.expected[fi]} rows")
            for info in frames.filter(pc.equal(frames.column("kind"), "frame")).column("info").to_pylist():
                if info:
                    d = json.loads(info)
                    err = d.get("error")
                    if err:
                        self.frame_errors[err.split(":", 1)[0]] += 1
                        if d.get("boxes_dropped"):
                            self.boxes_dropped["score_error:" + err.split(":", 1)[0]] += int(d["boxes_dropped"])
            self.tables.append(frames)
        over = [fi for fi, n in self.rows.items() if n > self.expected.get(fi, n)]
        if over:
            self.problems.append(f"duplicate rows for frame(s) {sorted(over)[:5]}")

    @property
    def complete(self) -> bool:
        """Every frame the read side sent has all its rows (or the bag already has a problem)."""
        if self.end is None:
            return False
        if self.problems:
            return True
        sent = {int(k) for k in (self.end.get("frame_boxes") or {})}
        return len(sent) == int(self.end["frames_sent"]) and all(
            fi in self.expected and self.rows[fi] == self.expected[fi] for fi in sent)


def _records_table(tables: List[Any], identity: Dict[str, Any]):
    import pyarrow as pa
    import pyarrow.compute as pc

    schema = _out_schema()
    t = pa.concat_tables(tables) if tables else schema.empty_table()
    boxes = t.filter(pc.equal(t.column("kind"), "box"))
    candidates = boxes.filter(pc.is_valid(boxes.column("thumb")))
    boxes = boxes.drop_columns(list(RECORD_DROP))
    boxes = boxes.sort_by([("stamp_ns", "ascending"), ("box_index", "ascending")])
    n = boxes.num_rows
    for name, value in identity.items():
        if name in boxes.column_names:  # model_id: the actor's own value
            continue
        typ = pa.bool_() if isinstance(value, bool) else pa.string()
        boxes = boxes.append_column(name, pa.array([value if isinstance(value, bool) else
                                                    ("" if value is None else str(value))] * n, typ))
    return boxes, candidates.drop_columns(["kind", "info", *WORKER_COLUMNS])


def commit_bag(out: pathlib.Path, st: BagState, identity: Dict[str, Any], top_k: int,
               config_hash: str = "default") -> Dict[str, Any]:
    """Write one bag's outputs (records Parquet, top-K candidates, then its state file; each
    atomically) and return its summary row. A failed bag writes only its state file.

    The summary reconciles the bag's boxes: ``boxes_read`` (every detection box of the bag) =
    ``boxes`` (rows written) + ``boxes_dropped`` (by reason: the reader's drop reasons, and
    ``score_error:<type>`` for frames whose scoring raised). A bag whose counts do not reconcile,
    or that received duplicate rows, fails with that reason instead of being written short."""
    import pyarrow.compute as pc

    end = st.end or {}
    error = end.get("error")
    summary: Dict[str, Any] = {"bag": st.ref.uri, "bag_key": st.key, "size": st.ref.size,
                               "mtime_ns": st.ref.mtime_ns, "image_topic": end.get("image_topic"),
                               "status": "failed" if error else "done", "error": error,
                               "recovered": end.get("recovered"), "read_s": end.get("read_s"),
                               "random_weights": identity["random_weights"], "resumed": False}
    drops = collections.Counter(end.get("drops") or {})
    drops.update({f"score_error:{k}": v for k, v in st.frame_errors.items()})
    boxes_dropped = collections.Counter(end.get("box_drops") or {})
    boxes_dropped.update(st.boxes_dropped)
    boxes, cand = _records_table(st.tables, identity)
    boxes_read = int(end.get("boxes_read", 0))
    if not error:
        if st.problems:
            error = "incomplete: " + "; ".join(st.problems)
        elif boxes.num_rows + sum(boxes_dropped.values()) != boxes_read:
            error = (f"counts do not reconcile: {boxes_read} boxes read, {boxes.num_rows} rows written, "
                     f"{sum(boxes_dropped.values())} dropped {dict(boxes_dropped)}")
    if error:
        summary.update(status="failed", error=error, frames=0, frames_scored=0, boxes=0, boxes_scored=0,
                       ood_boxes=0, boxes_read=boxes_read, boxes_dropped=dict(boxes_dropped), drops=dict(drops))
        _atomic_write_json(out / "state" / f"{st.key}.json", summary)
        return summary
    part = out / "records" / f"config={config_hash}" / f"{st.key}.parquet"  # hive partition per model config
    _atomic_write_parquet(part, boxes, {"runa_ood.identity": json.dumps(identity, default=str)})
    if cand.num_rows:
        cand = cand.take(pc.sort_indices(cand, sort_keys=[("uncertainty", "descending")])[:top_k])
    _atomic_write_parquet(out / "state" / "candidates" / f"{st.key}.parquet", cand)
    status = boxes.column("status").to_pylist()
    summary.update(frames=int(end.get("images", 0)), frames_scored=int(end.get("frames_sent", 0)), boxes=boxes.num_rows,
                   boxes_scored=status.count("OK"), ood_boxes=int(sum(boxes.column("is_ood").to_pylist())),
                   boxes_read=boxes_read, boxes_dropped=dict(boxes_dropped),
                   status_counts=dict(collections.Counter(status)), drops=dict(drops),
                   records=str(part.relative_to(out)))
    _atomic_write_json(out / "state" / f"{st.key}.json", summary)
    return summary


def fail_committed(out: pathlib.Path, summary: Dict[str, Any], reason: str) -> Dict[str, Any]:
    """A row came back for a bag already committed: the bag is NOT complete after all. Its records
    and candidates are removed and its state rewritten as failed (``--retry-failed`` redoes it)."""
    for p in (out / summary["records"] if summary.get("records") else None,
              out / "state" / "candidates" / f"{summary['bag_key']}.parquet"):
        if p is not None and p.exists():
            p.unlink()
    summary.update(status="failed", error=reason, records=None)
    _atomic_write_json(out / "state" / f"{summary['bag_key']}.json", summary)
    LOG.error("bag %s: %s", summary["bag"], reason)
    return summary


def load_done(out: pathlib.Path, key: str) -> Optional[Dict[str, Any]]:
    """The state of a bag committed by an earlier run (None when absent, unreadable, or its
    records file is missing)."""
    p = out / "state" / f"{key}.json"
    try:
        s = json.loads(p.read_text())
    except (OSError, ValueError):
        return None
    if s.get("status") == "done" and not (out / s.get("records", "records/missing")).is_file():
        return None
    return s


# =========================================================================== driver: reports


def _read_records(out: pathlib.Path, summaries: Sequence[Dict[str, Any]], columns: Sequence[str]):
    import pyarrow as pa
    import pyarrow.parquet as pq

    tables = [pq.read_table(out / s["records"], columns=list(columns)) for s in summaries
              if s.get("status") == "done" and s.get("records")]
    return pa.concat_tables(tables) if tables else None


def metrics_tables(out: pathlib.Path, summaries: Sequence[Dict[str, Any]], tpr: float) -> Dict[str, Any]:
    """``evaluate``'s metrics (``bag_eval.metrics_from_records``: FPR@TPR, AUROC, AUPR-In/Out, ID
    positive) over the boxes with ground truth, overall and per bag; {} without ground truth."""
    from .bag_eval import metrics_from_records

    t = _read_records(out, summaries, ["bag", "uncertainty", "gt_is_ood"])
    if t is None:
        return {}
    rows = [r for r in t.to_pylist() if r["gt_is_ood"] is not None]
    if not rows:
        return {}
    per_bag = collections.defaultdict(list)
    for r in rows:
        per_bag[r["bag"]].append(r)
    return {"overall": metrics_from_records(rows, tpr),
            "per_bag": {b: metrics_from_records(rs, tpr) for b, rs in sorted(per_bag.items())}}


def top_k_outputs(out: pathlib.Path, summaries: Sequence[Dict[str, Any]], k: int, random_weights: bool,
                  identity: Dict[str, Any]) -> Dict[str, Any]:
    """The fleet's ``k`` most OOD boxes (OK boxes, highest uncertainty) from every bag's
    candidates: crops + context images, a contact sheet PNG and a COCO-style export."""
    import cv2
    import pyarrow as pa
    import pyarrow.parquet as pq

    from .common import RANDOM_LABEL

    tables = []
    for s in summaries:
        p = out / "state" / "candidates" / f"{s['bag_key']}.parquet"
        if s.get("status") == "done" and p.is_file():
            tables.append(pq.read_table(p))
    rows = pa.concat_tables(tables).to_pylist() if tables else []
    rows.sort(key=lambda r: (-r["uncertainty"], r["bag"], r["stamp_ns"], r["box_index"]))
    rows = rows[:k]
    tdir = out / "top_ood"
    if tdir.exists():
        shutil.rmtree(tdir)
    (tdir / "crops").mkdir(parents=True)
    (tdir / "context").mkdir()
    images, annotations, tiles, captions = [], [], [], []
    for rank, r in enumerate(rows, 1):
        crop_f, ctx_f = f"crops/{rank:04d}.png", f"context/{rank:04d}.jpg"
        (tdir / crop_f).write_bytes(r["thumb"])
        (tdir / ctx_f).write_bytes(r["context"])
        crop = cv2.imdecode(np.frombuffer(r["thumb"], np.uint8), cv2.IMREAD_COLOR)[:, :, ::-1]
        ctx = cv2.imdecode(np.frombuffer(r["context"], np.uint8), cv2.IMREAD_COLOR)[:, :, ::-1]
        h = ctx.shape[0]
        s = h / crop.shape[0]
        crop_r = cv2.resize(crop, (max(1, int(crop.shape[1] * s)), h), interpolation=cv2.INTER_NEAREST)
        tiles.append(np.concatenate([crop_r, np.full((h, 4, 3), 32, np.uint8), ctx], 1))
        captions.append(f"#{rank} u={r['uncertainty']:.3f} ~{r['label']} det:{r['det_label']} "
                        f"{pathlib.Path(r['bag']).name}@{r['frame_index']}")
        x1, y1, x2, y2 = r["x1"], r["y1"], r["x2"], r["y2"]
        images.append({"id": rank, "file_name": crop_f, "width": int(crop.shape[1]), "height": int(crop.shape[0]),
                       "context_file": ctx_f,
                       "frame": {"bag": r["bag"], "topic": r["topic"], "stamp_ns": int(r["stamp_ns"]),
                                 "frame_index": int(r["frame_index"])}})
        annotations.append({"id": rank, "image_id": rank, "category_id": 1,
                            "bbox_in_frame": [x1, y1, x2 - x1, y2 - y1], "area_in_frame": (x2 - x1) * (y2 - y1),
                            "iscrowd": 0, "uncertainty": r["uncertainty"], "threshold": r["threshold"],
                            "is_ood": r["is_ood"], "nearest_id_label": r["label"], "similarity": r["similarity"],
                            "detector_label": r["det_label"], "detector_score": r["det_score"],
                            "detection_id": r["det_id"], "gt_is_ood": r["gt_is_ood"],
                            "gt_category": r["gt_category"]})
    coco = {"info": {"description": "runa-ood fleet: most out-of-distribution boxes, to label next"
                                    + (f" -- {RANDOM_LABEL}" if random_weights else ""),
                     "random_weights": random_weights, "identity": identity,
                     "note": "file_name: the box crop (10 % margin); frame: where to find the full frame"},
            "images": images, "annotations": annotations,
            "categories": [{"id": 1, "name": "ood_candidate", "supercategory": "unknown"}]}
    _atomic_write_json(tdir / "coco.json", coco)
    result = {"k": len(rows), "coco": str((tdir / "coco.json").relative_to(out))}
    if tiles:
        from .demo import contact_sheet

        title = [f"runa-ood fleet: {len(rows)} most OOD boxes (crop | frame)"]
        if random_weights:
            title.insert(0, RANDOM_LABEL)
        sheet = contact_sheet(tiles, captions, title, tile_w=420, cols=4, warn=random_weights)
        _atomic_write_bytes(tdir / "contact_sheet.png", _png(sheet))
        result["contact_sheet"] = str((tdir / "contact_sheet.png").relative_to(out))
    return result


SUMMARY_FIELDS = ("bag", "status", "resumed", "recovered", "frames", "frames_scored", "boxes_read", "boxes",
                  "boxes_dropped", "boxes_scored", "ood_boxes", "drops", "error", "image_topic", "random_weights",
                  "bag_key", "size", "mtime_ns")


def write_summary(out: pathlib.Path, summaries: Sequence[Dict[str, Any]]) -> None:
    rows = []
    for s in summaries:
        r = {k: s.get(k) for k in SUMMARY_FIELDS}
        for k in ("drops", "boxes_dropped"):
            r[k] = ";".join(f"{a}={b}" for a, b in sorted((s.get(k) or {}).items()))
        rec = s.get("recovered")
        r["recovered"] = "" if not rec else (f"{rec.get('messages')} messages to "
                                             f"{(rec.get('last_stamp_ns') or 0) * 1e-9:.3f} s, "
                                             f"{rec.get('bytes_unread')} bytes unread")
        rows.append(r)
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(SUMMARY_FIELDS))
    w.writeheader()
    w.writerows(rows)
    _atomic_write_bytes(out / "summary.csv", buf.getvalue().encode())


# =========================================================================== driver: Ray


def _ray_init(args, n_cpus: int, n_gpus: int):
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    import ray

    kw = dict(include_dashboard=False, logging_level=logging.WARNING, log_to_driver=bool(args.verbose),
              configure_logging=True)
    if args.address:
        ray.init(address=args.address, **kw)
    else:
        ray.init(num_cpus=n_cpus, num_gpus=n_gpus, **kw)
    return ray


def _identity(encoder, params: Dict[str, Any], ablation: str) -> Dict[str, Any]:
    return {"model": params["model"], "weights": "RANDOM" if encoder.random_weights else (params["pretrained"] or ""),
            "model_id": str(encoder.model_id), "projection": params.get("projection") or "",
            "thresholds": params.get("thresholds_file") or f"default_threshold={params.get('default_threshold', 'node default')}",
            "scorer": params["scorer"], "ablation": ablation, "label_set": params["label_set"],
            "random_weights": bool(encoder.random_weights)}


def run(args) -> int:
    from . import common

    common.setup_logging(args)
    progress = not args.no_progress
    out = pathlib.Path(args.out)
    if not args.address and not args.allow_network:
        ifaces = non_loopback_interfaces()
        if ifaces:
            raise common.fail([
                f"refusing to start a local Ray: this machine has non-loopback interfaces up ({', '.join(ifaces)}), "
                "and Ray registers and talks over the machine's address, not loopback.",
                "Run it inside a network namespace that has only loopback:",
                f"  {LOOPBACK_WRAPPER}",
                "or pass --allow-network where Ray may use the network (or --address to join a cluster)."])
    refs = expand_inputs(args.inputs)
    if not refs:
        raise common.fail([f"no bags in {args.inputs}"])
    # the one path of every tool (common.scorer_from_args): arguments -> node parameters -> one
    # validation into a ScorerConfig -> factory.build_scorer -> the node's thresholds fit check (exit 2
    # on a mismatch unless --allow-threshold-mismatch); the actors build theirs from the same config
    built = common.scorer_from_args(args, image_topic=args.image_topic or bagio.IMAGE_TOPIC)
    rw = built.random_weights
    params = built.params
    identity = _identity(built.scorer.encoder, params, built.ablation)
    device = params["device"]
    built.scorer = None  # the actors load their own model
    key_blob = {k: v for k, v in params.items() if k not in _NOT_SCORING}
    key_blob.update(model_id=identity["model_id"], ablation=built.ablation, image_topic=args.image_topic,
                    detections_topic=args.detections_topic, gt_topic=args.gt_topic)
    config_hash = hashlib.sha256(json.dumps(key_blob, sort_keys=True, default=str).encode()).hexdigest()[:16]

    out.mkdir(parents=True, exist_ok=True)
    summaries: List[Dict[str, Any]] = []
    todo: List[Tuple[BagRef, str]] = []
    for ref in refs:
        key = ref.key(config_hash)
        if ref.error:
            summaries.append({"bag": ref.uri, "bag_key": key, "status": "failed", "error": ref.error,
                              "frames": 0, "boxes": 0, "ood_boxes": 0, "drops": {}, "random_weights": rw})
            continue
        done = None if args.force else load_done(out, key)
        if done is not None and not (done.get("status") == "failed" and args.retry_failed):
            summaries.append({**done, "resumed": True})
            continue
        todo.append((ref, key))
    n_resumed = sum(1 for s in summaries if s.get("resumed"))
    LOG.info("%d bags: %d to score, %d done in an earlier run, %d unreadable inputs", len(refs), len(todo),
             n_resumed, len(summaries) - n_resumed)

    t_run = time.perf_counter()
    perf: Dict[str, Any] = {"bags_scored": len(todo)}
    if todo:
        perf.update(_run_pipeline(args, todo, built.config, identity, device, out, summaries, progress,
                                  config_hash))
    perf["wall_s"] = round(time.perf_counter() - t_run, 3)

    summaries.sort(key=lambda s: s["bag"])
    metrics = metrics_tables(out, summaries, args.tpr)
    top = top_k_outputs(out, summaries, args.top_k, rw, identity)
    write_summary(out, summaries)
    done = [s for s in summaries if s.get("status") == "done"]
    dropped = collections.Counter()
    for s in done:
        dropped.update(s.get("boxes_dropped") or {})
    totals = {"bags": len(summaries), "bags_done": len(done),
              "bags_failed": sum(1 for s in summaries if s.get("status") == "failed"),
              "bags_resumed": n_resumed, "bags_recovered": sum(1 for s in done if s.get("recovered")),
              "frames": sum(s.get("frames", 0) for s in done),
              "boxes_read": sum(s.get("boxes_read", 0) for s in done),
              "boxes": sum(s.get("boxes", 0) for s in done), "boxes_dropped": dict(dropped),
              "ood_boxes": sum(s.get("ood_boxes", 0) for s in done)}
    report = {"random_weights": rw, "random_label": common.RANDOM_LABEL if rw else None, "identity": identity,
              "node_parameters": params, "ablation": built.ablation, "thresholds_mismatch": built.mismatch,
              "config_hash": config_hash, "totals": totals, "performance": perf,
              "metrics": metrics, "top_ood": top, "bags": summaries,
              "records": f"records/config={config_hash}/ (Parquet dataset; records/ holds one partition per model "
                         "configuration ever run into this folder)"}
    _atomic_write_json(out / "summary.json", report)
    if not metrics and (out / "metrics.json").exists():
        (out / "metrics.json").unlink()  # a metrics file of an earlier run would be taken for this one's
    if metrics:
        _atomic_write_json(out / "metrics.json", {"random_weights": rw, "random_label": report["random_label"],
                                                   "tpr": args.tpr, **metrics})
    _print(report, out)
    return 0


def _run_pipeline(args, todo, config, identity, device, out, summaries, progress, config_hash) -> Dict[str, Any]:
    import torch
    from tqdm import tqdm

    cuda = str(device).startswith("cuda")
    n_cpus, n_gpus = os.cpu_count() or 1, (torch.cuda.device_count() if cuda else 0)
    t0 = time.perf_counter()
    ray = _ray_init(args, n_cpus, n_gpus)
    try:
        import ray.data

        res = ray.cluster_resources()  # the local Ray, or the whole cluster with --address
        total_cpus = float(res.get("CPU", n_cpus))
        n_gpus = int(res.get("GPU", 0)) if cuda else 0
        workers = args.workers or (n_gpus if n_gpus else max(1, int(total_cpus) // 4))
        threads = args.threads_per_worker or max(1, int(total_cpus) // workers)
        if args.address and not args.threads_per_worker:
            threads = 4  # the CPUs of one cluster node are not known here: a sane default
        perf: Dict[str, Any] = {"workers": workers, "threads_per_worker": None if n_gpus else threads,
                                "gpus_per_worker": 1 if n_gpus else 0, "batch_frames": args.batch_frames}
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = progress
        ctx.verbose_progress = False
        # blocks of about one read batch (each yield of the read task), so that frames spread over
        # every actor and results stream back per batch instead of per bag
        ctx.target_max_block_size = max(1024, int(float(args.block_mb) * (1 << 20)))
        read_cpus = 0.25
        actor_cpus = 1.0 if n_gpus else max(0.1, min(float(threads), (total_cpus - read_cpus) / workers))
        perf["ray_start_s"] = round(time.perf_counter() - t0, 3)
        items = [{"bag": ref.uri, "local": ref.local, "bag_key": key} for ref, key in todo]
        ds = ray.data.from_items(items, override_num_blocks=len(items))
        args_ns = argparse.Namespace(**{k: v for k, v in vars(args).items() if not k.startswith("_")})
        ds = ds.map_batches(ReadBags(args.image_topic, args.detections_topic, args.gt_topic or None,
                                     args_ns, identity["random_weights"], args.batch_frames),
                            batch_size=1, batch_format="pyarrow", num_cpus=read_cpus)
        ds = ds.map_batches(ScoreFrames, fn_constructor_kwargs={"config": config, "threads": 0 if n_gpus else threads,
                                                                "top_k": args.top_k},
                            batch_size=args.batch_frames, batch_format="pyarrow", concurrency=workers,
                            num_cpus=actor_cpus, num_gpus=1 if n_gpus else None)
        states = {key: BagState(ref, key) for ref, key in todo}
        committed: Dict[str, Dict[str, Any]] = {}  # bag key -> its summary (in ``summaries``)
        n_boxes = 0
        late = collections.Counter()  # rows for no bag of this run, by bag key
        t1 = time.perf_counter()
        t_first = None
        workers_seen: Dict[int, Dict[str, float]] = {}
        bar = tqdm(total=len(todo), desc="fleet bags", unit="bag", disable=not progress)
        try:
            import pyarrow.compute as pc

            for table in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
                if t_first is None:
                    t_first = time.perf_counter()
                for pid, rss, busy, nb in zip(*(table.column(c).to_pylist() for c in WORKER_COLUMNS)):
                    if pid is not None:
                        w = workers_seen.setdefault(pid, {"rss_mb": 0.0, "busy_s": 0.0, "boxes": 0})
                        w["rss_mb"] = max(w["rss_mb"], rss or 0.0)
                        w["busy_s"], w["boxes"] = max(w["busy_s"], busy or 0.0), max(w["boxes"], nb or 0)
                keys = table.column("bag_key").to_pylist()
                n_boxes += sum(1 for k in table.column("kind").to_pylist() if k == "box")
                for key in sorted(set(keys)):
                    part = table.filter(pc.equal(table.column("bag_key"), key))
                    st = states.get(key)
                    if st is None:  # never silently: a committed bag turns failed, an unknown key is counted
                        if key in committed and committed[key].get("status") == "done":
                            fail_committed(out, committed[key], f"incomplete: {part.num_rows} row(s) arrived after "
                                                                "the bag was committed")
                        elif key not in committed:
                            late[key] += part.num_rows
                            LOG.error("%d row(s) for bag key %s, which is not in this run", part.num_rows, key)
                        else:  # a bag that already failed: its rows change nothing, but are said
                            LOG.warning("%d row(s) for bag %s after it was committed as failed", part.num_rows,
                                        committed[key]["bag"])
                        continue
                    st.add(part)
                    if st.complete:
                        committed[key] = commit_bag(out, st, identity, args.top_k, config_hash)
                        summaries.append(committed[key])
                        del states[key]
                        bar.update(1)
                        bar.set_postfix(boxes=n_boxes)
        except Exception as exc:  # the engine itself failed: keep what was committed, report the rest
            LOG.error("pipeline failed: %s: %s", type(exc).__name__, exc)
            for st in states.values():
                summaries.append({"bag": st.ref.uri, "bag_key": st.key, "status": "failed",
                                  "error": f"pipeline failed: {type(exc).__name__}: {exc}", "frames": 0, "boxes": 0,
                                  "ood_boxes": 0, "drops": {}, "random_weights": identity["random_weights"]})
            states = {}
        finally:
            bar.close()
        for st in states.values():  # stream ended before a bag's rows were all in
            missing = "no end marker" if st.end is None else (
                f"{sum(1 for k, n in (st.end.get('frame_boxes') or {}).items() if st.rows[int(k)] != st.expected.get(int(k), -1))}"
                " frame(s) without all their rows")
            summaries.append({"bag": st.ref.uri, "bag_key": st.key, "status": "failed",
                              "error": f"incomplete: the pipeline ended before this bag finished ({missing})",
                              "frames": 0, "boxes": 0, "ood_boxes": 0, "drops": {},
                              "random_weights": identity["random_weights"]})
            _atomic_write_json(out / "state" / f"{st.key}.json", summaries[-1])
        perf["rows_for_unknown_bags"] = dict(late)
        dt = time.perf_counter() - t1
        perf.update(pipeline_s=round(dt, 3), boxes=n_boxes, boxes_per_s=round(n_boxes / dt, 3) if dt > 0 else None,
                    first_result_s=None if t_first is None else round(t_first - t1, 3),
                    scoring_boxes_per_s=round(sum(w["boxes"] / w["busy_s"] for w in workers_seen.values()
                                                  if w["busy_s"] > 0), 3),
                    workers_used=len(workers_seen),
                    worker_peak_rss_mb={str(k): round(v["rss_mb"], 1) for k, v in sorted(workers_seen.items())},
                    worker_boxes={str(k): int(v["boxes"]) for k, v in sorted(workers_seen.items())},
                    ray=("cluster " + str(args.address)) if args.address else f"local, {n_cpus} CPUs, {n_gpus} GPUs")
    finally:
        ray.shutdown()
    return perf


def _print(rep: Dict[str, Any], out: pathlib.Path) -> None:
    from .common import RANDOM_LABEL

    lines = []
    if rep["random_weights"]:
        lines.append(f"*** {RANDOM_LABEL} ***")
    t = rep["totals"]
    lines.append(f"{t['bags']} bags: {t['bags_done']} done ({t['bags_resumed']} from earlier runs, "
                 f"{t['bags_recovered']} recovered from a cut), {t['bags_failed']} failed; {t['frames']} frames, "
                 f"{t['boxes']} boxes, {t['ood_boxes']} OOD")
    dropped = t["boxes_dropped"]
    lines.append(f"boxes of the done bags: {t['boxes_read']} read = {t['boxes']} written + {sum(dropped.values())} "
                 f"dropped" + (f" ({', '.join(f'{k} {v}' for k, v in sorted(dropped.items()))})" if dropped else ""))
    for s in rep["bags"]:
        if s.get("status") == "failed":
            lines.append(f"  FAILED {s['bag']}: {s.get('error')}")
        elif s.get("recovered"):
            r = s["recovered"]
            lines.append(f"  RECOVERED {s['bag']}: cut short, {r.get('messages')} messages read up to log time "
                         f"{(r.get('last_stamp_ns') or 0) * 1e-9:.3f} s, {r.get('bytes_unread')} bytes unread")
    if rep["performance"].get("rows_for_unknown_bags"):
        lines.append(f"  ROWS FOR NO BAG OF THIS RUN: {rep['performance']['rows_for_unknown_bags']}")
    p = rep["performance"]
    if p.get("boxes_per_s") is not None:
        lines.append(f"throughput {p['boxes_per_s']:.2f} boxes/s end to end ({p['boxes']} boxes in "
                     f"{p['pipeline_s']:.1f} s after a {p['ray_start_s']:.1f} s Ray start, {p['workers']} workers, "
                     f"actor start-up included), {p['scoring_boxes_per_s']:.2f} boxes/s while scoring (sum over "
                     f"workers of boxes / busy time); boxes per worker {p['worker_boxes']}, worker peak RSS MB "
                     f"{p['worker_peak_rss_mb']}")
    m = rep["metrics"].get("overall") if rep["metrics"] else None
    if m:
        f = lambda v: "n/a" if v is None or (isinstance(v, float) and not math.isfinite(v)) else f"{v:.4f}"  # noqa
        lines.append(f"overall: {m['n_id']} ID / {m['n_ood']} OOD boxes  FPR95 {f(m['fpr95'])}  AUROC "
                     f"{f(m['auroc'])}  AUPR-In {f(m['aupr_in'])}  AUPR-Out {f(m['aupr_out'])}")
    lines.append(f"outputs: {out}/records/config={rep['config_hash']} (Parquet), summary.json, summary.csv, top_ood/ (contact sheet, coco.json)"
                 + (", metrics.json" if rep["metrics"] else ""))
    if rep["random_weights"]:
        lines.append(f"*** {RANDOM_LABEL} ***")
    print("\n".join(lines))
