"""Thin helpers over ``rosbags`` (pure Python) to write and read the project's ROS 2 bags.

Nothing here needs rclpy or a colcon build: message types come from a ``rosbags`` type store
(``Stores.ROS2_KILTED`` plus ``vision_msgs`` and ``runa_ood_msgs`` registered from their .msg
text). rosbags' CDR bytes equal rclpy's ``serialize_message`` output, and the recorded type hashes
equal rosidl's, so a bag written here replays into real ROS 2 topics unchanged.

Conventions:
    * stamps are integer **nanoseconds** since the epoch (``stamp_ns``); the bag's log time of
      every message written by :class:`BagWriter` defaults to its header stamp;
    * images are ``HxWx3 uint8 RGB`` numpy arrays; boxes are ``[N,4]`` float pixels, ``xywh``
      (top-left corner + size) unless stated otherwise; ``vision_msgs/BoundingBox2D`` stores the
      box **centre** and size;
    * message objects are the type store's dataclasses (same field names as the ROS messages).
"""
from __future__ import annotations

import dataclasses
import functools
import logging
import os
import pathlib
from typing import Dict, Iterable, Iterator, List, NamedTuple, Optional, Sequence

import numpy as np

LOG = logging.getLogger(__name__)

#: default topics of the bags this package writes (absolute names, as a camera driver publishes)
IMAGE_TOPIC = "/camera/image_raw"
COMPRESSED_TOPIC = "/camera/image_raw/compressed"
DETECTIONS_TOPIC = "/detections"
GROUND_TRUTH_TOPIC = "/ood/ground_truth"
FRAME_ID = "camera"

IMAGE_TYPE = "sensor_msgs/msg/Image"
COMPRESSED_TYPE = "sensor_msgs/msg/CompressedImage"
DETECTIONS_TYPE = "vision_msgs/msg/Detection2DArray"
GROUND_TRUTH_TYPE = "runa_ood_msgs/msg/GroundTruth"

STORAGES = ("mcap", "sqlite3")
_REPO = pathlib.Path(__file__).resolve().parents[2]


class BagError(RuntimeError):
    """A bag cannot be opened, written or decoded (message says what and where)."""


class BagMessage(NamedTuple):
    """One message as stored: topic, ROS type name (``pkg/msg/Type``), log time in ns, CDR bytes."""

    topic: str
    msgtype: str
    stamp_ns: int
    rawdata: bytes


# --------------------------------------------------------------------------- type store
def _msg_dirs() -> List[pathlib.Path]:
    """Folders holding the .msg files of vision_msgs and runa_ood_msgs: the source tree first,
    then every ``share/<pkg>/msg`` of the ament prefixes (installed packages)."""
    dirs = sorted((_REPO / "ros2_ws" / "src").glob("*/msg"))
    for prefix in os.environ.get("AMENT_PREFIX_PATH", "").split(os.pathsep):
        for pkg in ("vision_msgs", "runa_ood_msgs"):
            d = pathlib.Path(prefix) / "share" / pkg / "msg"
            if prefix and d.is_dir() and not any(x.parent.name == pkg for x in dirs):
                dirs.append(d)
    return dirs


def _build_typestore():
    from rosbags.typesys import Stores, get_types_from_msg, get_typestore

    store = get_typestore(Stores.ROS2_KILTED)
    types: Dict = {}
    for d in _msg_dirs():
        pkg = d.parent.name
        for f in sorted(d.glob("*.msg")):
            types.update(get_types_from_msg(f.read_text(), f"{pkg}/msg/{f.stem}"))
    if not types:
        raise BagError(f"no .msg definitions found for vision_msgs / runa_ood_msgs (looked in {_msg_dirs()})")
    store.register(types)
    return store


@functools.lru_cache(maxsize=1)
def typestore():
    """The type store for every topic of the project's bags (ROS 2 kilted + vision_msgs +
    runa_ood_msgs). Prefers ``runa_ood_node.ros.msgdefs.typestore()`` (one definition for the whole
    package) and builds the same thing from ``ros2_ws/src/*/msg`` when that module is absent."""
    try:
        from runa_ood_node.ros.msgdefs import typestore as _shared
    except ImportError:
        return _build_typestore()
    return _shared()


def msg_class(msgtype: str):
    """The type store's dataclass for ``pkg/msg/Type``."""
    try:
        return typestore().types[msgtype]
    except KeyError as exc:
        raise BagError(f"message type {msgtype!r} is not in the type store") from exc


def serialize(msg, msgtype: str) -> bytes:
    """CDR bytes of a type-store message (equal to rclpy's ``serialize_message``)."""
    return bytes(typestore().serialize_cdr(msg, msgtype))


def deserialize(rawdata: bytes, msgtype: str):
    """Type-store message from CDR bytes (raises :class:`BagError` on truncated/garbage data)."""
    try:
        return typestore().deserialize_cdr(rawdata, msgtype)
    except Exception as exc:  # rosbags raises assorted errors on bad bytes
        raise BagError(f"cannot deserialize {len(rawdata)} bytes as {msgtype}: {type(exc).__name__}: {exc}") from exc


# --------------------------------------------------------------------------- message builders
def header(stamp_ns: int, frame_id: str = FRAME_ID):
    """``std_msgs/Header`` with the stamp split into (sec, nanosec)."""
    T = typestore().types
    sec, nsec = divmod(int(stamp_ns), 1_000_000_000)
    return T["std_msgs/msg/Header"](stamp=T["builtin_interfaces/msg/Time"](sec=sec, nanosec=nsec), frame_id=frame_id)


def stamp_ns_of(hdr) -> int:
    """Nanoseconds of a Header (type-store or rclpy message alike)."""
    return int(hdr.stamp.sec) * 1_000_000_000 + int(hdr.stamp.nanosec)


def image_msg(rgb: np.ndarray, hdr, encoding: str = "rgb8"):
    """``sensor_msgs/Image`` from an HxWx3 uint8 RGB array, stored as ``rgb8`` or ``bgr8``."""
    rgb = np.asarray(rgb)
    if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"expected HxWx3 uint8 RGB, got {rgb.dtype} {rgb.shape}")
    if encoding == "rgb8":
        data = rgb
    elif encoding == "bgr8":
        data = rgb[:, :, ::-1]
    else:
        raise ValueError(f"encoding must be rgb8 or bgr8, got {encoding!r}")
    h, w = rgb.shape[:2]
    return msg_class(IMAGE_TYPE)(header=hdr, height=h, width=w, encoding=encoding, is_bigendian=0, step=w * 3,
                                 data=np.ascontiguousarray(data).reshape(-1))


def compressed_msg(rgb: np.ndarray, hdr, quality: int = 90):
    """``sensor_msgs/CompressedImage`` (format ``jpeg``) from an HxWx3 uint8 RGB array."""
    import cv2

    ok, buf = cv2.imencode(".jpg", np.ascontiguousarray(np.asarray(rgb)[:, :, ::-1]),
                           [int(cv2.IMWRITE_JPEG_QUALITY), int(quality)])
    if not ok:
        raise BagError("JPEG encoding failed")
    return msg_class(COMPRESSED_TYPE)(header=hdr, format="jpeg", data=np.asarray(buf, np.uint8).reshape(-1))


def detections_msg(hdr, boxes_xywh, class_ids: Sequence[str], ids: Sequence[str], scores=None):
    """``vision_msgs/Detection2DArray``: one Detection2D per box with one hypothesis
    (``class_id``, ``score``; score 1.0 when not given) and ``id`` set; ``bbox.center`` is the
    box centre in pixels, ``size_x/size_y`` its width/height."""
    T = typestore().types
    boxes = np.asarray(boxes_xywh, np.float64).reshape(-1, 4)
    n = boxes.shape[0]
    if len(class_ids) != n or len(ids) != n:
        raise ValueError(f"{n} boxes but {len(class_ids)} class ids and {len(ids)} ids")
    scores = np.ones(n) if scores is None else np.asarray(scores, np.float64).reshape(-1)
    pose = T["geometry_msgs/msg/PoseWithCovariance"](
        pose=T["geometry_msgs/msg/Pose"](position=T["geometry_msgs/msg/Point"](x=0.0, y=0.0, z=0.0),
                                         orientation=T["geometry_msgs/msg/Quaternion"](x=0.0, y=0.0, z=0.0, w=1.0)),
        covariance=np.zeros(36, np.float64))
    dets = []
    for (x, y, w, h), cls, did, sc in zip(boxes, class_ids, ids, scores):
        centre_xy = T["vision_msgs/msg/Point2D"](x=float(x + w / 2), y=float(y + h / 2))
        center = T["vision_msgs/msg/Pose2D"](position=centre_xy, theta=0.0)
        bbox = T["vision_msgs/msg/BoundingBox2D"](center=center, size_x=float(w), size_y=float(h))
        hyp = T["vision_msgs/msg/ObjectHypothesisWithPose"](
            hypothesis=T["vision_msgs/msg/ObjectHypothesis"](class_id=str(cls), score=float(sc)), pose=pose)
        dets.append(T["vision_msgs/msg/Detection2D"](header=hdr, results=[hyp], bbox=bbox, id=str(did)))
    return T[DETECTIONS_TYPE](header=hdr, detections=dets)


def ground_truth_msg(hdr, detection_ids: Sequence[str], is_ood: Sequence[bool], category: Sequence[str]):
    """``runa_ood_msgs/GroundTruth`` (three parallel arrays, ids match Detection2D.id)."""
    if not (len(detection_ids) == len(is_ood) == len(category)):
        raise ValueError("detection_ids, is_ood and category must have the same length")
    return msg_class(GROUND_TRUTH_TYPE)(header=hdr, detection_ids=[str(i) for i in detection_ids],
                                        is_ood=np.asarray(is_ood, bool), category=[str(c) for c in category])


# --------------------------------------------------------------------------- decoding
def image_from_msg(msg, msgtype: str) -> np.ndarray:
    """HxWx3 uint8 RGB from a type-store Image (rgb8, bgr8, rgba8, bgra8, mono8; any row ``step``)
    or CompressedImage. Raises ValueError for other encodings or inconsistent sizes."""
    if msgtype == COMPRESSED_TYPE:
        import cv2

        bgr = cv2.imdecode(np.frombuffer(bytes(msg.data), np.uint8), cv2.IMREAD_COLOR)
        if bgr is None:
            raise ValueError(f"cannot decode compressed image (format {msg.format!r}, {len(msg.data)} bytes)")
        return np.ascontiguousarray(bgr[:, :, ::-1])
    channels = {"rgb8": 3, "bgr8": 3, "rgba8": 4, "bgra8": 4, "mono8": 1}
    enc = str(msg.encoding).lower()
    if enc not in channels:
        raise ValueError(f"unsupported image encoding {msg.encoding!r}")
    c, h, w, step = channels[enc], int(msg.height), int(msg.width), int(msg.step)
    buf = np.frombuffer(bytes(msg.data), np.uint8)
    if step < w * c or buf.size < step * h:
        raise ValueError(f"image {w}x{h} {enc}: step {step}, {buf.size} bytes is inconsistent")
    arr = buf[: step * h].reshape(h, step)[:, : w * c].reshape(h, w, c)
    if enc == "mono8":
        arr = np.repeat(arr, 3, axis=2)
    elif enc.startswith("bgr"):
        arr = arr[:, :, 2::-1]
    else:
        arr = arr[:, :, :3]
    return np.ascontiguousarray(arr)


def detections_from_msg(msg):
    """(boxes xywh float32 [N,4], class_ids list[str], scores float32 [N] (NaN: no hypothesis),
    ids list[str]) from a type-store Detection2DArray."""
    n = len(msg.detections)
    boxes = np.zeros((n, 4), np.float32)
    scores = np.full(n, np.nan, np.float32)
    cls, ids = [], []
    for i, d in enumerate(msg.detections):
        cx, cy = d.bbox.center.position.x, d.bbox.center.position.y
        boxes[i] = (cx - d.bbox.size_x / 2, cy - d.bbox.size_y / 2, d.bbox.size_x, d.bbox.size_y)
        if d.results:
            best = max(d.results, key=lambda r: r.hypothesis.score)
            cls.append(best.hypothesis.class_id)
            scores[i] = best.hypothesis.score
        else:
            cls.append("")
        ids.append(d.id)
    return boxes, cls, scores, ids


# --------------------------------------------------------------------------- writing
def storage_plugin(storage: str):
    from rosbags.rosbag2 import StoragePlugin

    try:
        return {"mcap": StoragePlugin.MCAP, "sqlite3": StoragePlugin.SQLITE3}[storage]
    except KeyError:
        raise ValueError(f"storage must be one of {STORAGES}, got {storage!r}") from None


class BagWriter:
    """Write a rosbag2 (version 9) with ``rosbags``; a context manager.

    Example::

        with BagWriter("out/bag", storage="mcap") as bag:
            bag.write(IMAGE_TOPIC, IMAGE_TYPE, stamp_ns, image_msg(rgb, header(stamp_ns)))

    Topics are added on first use. ``write`` serialises a type-store message; ``write_raw``
    stores CDR bytes as they are (e.g. received from a live topic). The target folder must not
    exist (rosbags refuses to overwrite); ``overwrite=True`` deletes it first.
    """

    def __init__(self, path, storage: str = "mcap", overwrite: bool = False):
        from rosbags.rosbag2 import Writer

        self.path = pathlib.Path(path)
        if self.path.exists():
            if not overwrite:
                raise BagError(f"{self.path} exists; remove it or pass overwrite")
            import shutil

            shutil.rmtree(self.path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.storage = storage
        self._writer = Writer(self.path, version=9, storage_plugin=storage_plugin(storage))
        self._conns: Dict[str, object] = {}
        self.counts: Dict[str, int] = {}
        self._open = False

    def __enter__(self) -> "BagWriter":
        self.open()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def open(self) -> None:
        self._writer.open()
        self._open = True

    def close(self) -> None:
        if self._open:
            self._writer.close()
            self._open = False

    def _conn(self, topic: str, msgtype: str):
        conn = self._conns.get(topic)
        if conn is None:
            conn = self._writer.add_connection(topic, msgtype, typestore=typestore())
            self._conns[topic] = conn
            self.counts[topic] = 0
        elif conn.msgtype != msgtype:
            raise BagError(f"topic {topic} already holds {conn.msgtype}, not {msgtype}")
        return conn

    def write_raw(self, topic: str, msgtype: str, stamp_ns: int, rawdata: bytes) -> None:
        self._writer.write(self._conn(topic, msgtype), int(stamp_ns), bytes(rawdata))
        self.counts[topic] += 1

    def write(self, topic: str, msgtype: str, stamp_ns: int, msg) -> None:
        self.write_raw(topic, msgtype, stamp_ns, serialize(msg, msgtype))


# --------------------------------------------------------------------------- reading
def _reader(path):
    from rosbags.rosbag2 import Reader

    p = pathlib.Path(path)
    if not (p / "metadata.yaml").exists():
        raise BagError(f"{p} is not a rosbag2 folder (no metadata.yaml)")
    return Reader(p)


def read_bag(path, topics: Optional[Iterable[str]] = None) -> Iterator[BagMessage]:
    """Yield every message of the bag (all topics, or those named) in log-time order."""
    wanted = None if topics is None else set(topics)
    with _reader(path) as reader:
        conns = [c for c in reader.connections if wanted is None or c.topic in wanted]
        if wanted is not None:
            missing = wanted - {c.topic for c in conns}
            if missing:
                LOG.warning("bag %s has no topic(s) %s (it has %s)", path, sorted(missing),
                            sorted({c.topic for c in reader.connections}))
        if not conns:
            return
        for conn, stamp, raw in reader.messages(connections=conns):
            yield BagMessage(conn.topic, conn.msgtype, int(stamp), bytes(raw))


@dataclasses.dataclass
class BagInfo:
    """Summary of a bag: ``topics`` topic -> msgtype, ``counts`` topic -> messages,
    ``start_ns`` / ``end_ns`` log-time bounds, ``storage`` (``mcap`` / ``sqlite3``)."""

    path: str
    topics: Dict[str, str]
    counts: Dict[str, int]
    start_ns: int
    end_ns: int
    storage: str

    @property
    def duration_s(self) -> float:
        return (self.end_ns - self.start_ns) / 1e9


def bag_info(path) -> BagInfo:
    with _reader(path) as reader:
        topics = {c.topic: c.msgtype for c in reader.connections}
        counts: Dict[str, int] = {}
        for c in reader.connections:
            counts[c.topic] = counts.get(c.topic, 0) + int(c.msgcount)
        storage = "mcap" if any(pathlib.Path(path).glob("*.mcap")) else "sqlite3"
        return BagInfo(str(path), topics, counts, int(reader.start_time), int(reader.end_time), storage)


def frames_by_stamp(path, image_topic: Optional[str] = None, detections_topic: str = DETECTIONS_TOPIC,
                    ground_truth_topic: str = GROUND_TRUTH_TOPIC) -> List[Dict]:
    """Group a bag's image, detections and ground truth by header stamp (exact match, ns).

    Returns one dict per image stamp, in stamp order: ``stamp_ns``, ``image`` (type-store message),
    ``image_type``, ``detections`` (message or None), ``ground_truth`` (message or None).
    ``image_topic`` None picks ``/camera/image_raw`` or else ``/camera/image_raw/compressed``.
    """
    info = bag_info(path)
    if image_topic is None:
        image_topic = next((t for t in (IMAGE_TOPIC, COMPRESSED_TOPIC) if t in info.topics), None)
        if image_topic is None:
            raise BagError(f"{path}: no image topic ({IMAGE_TOPIC} or {COMPRESSED_TOPIC}); "
                           f"topics {sorted(info.topics)}")
    frames: Dict[int, Dict] = {}
    for m in read_bag(path, [image_topic, detections_topic, ground_truth_topic]):
        msg = deserialize(m.rawdata, m.msgtype)
        st = stamp_ns_of(msg.header)
        slot = frames.setdefault(st, {"stamp_ns": st, "image": None, "image_type": None,
                                      "detections": None, "ground_truth": None})
        if m.topic == image_topic:
            slot["image"], slot["image_type"] = msg, m.msgtype
        elif m.topic == detections_topic:
            slot["detections"] = msg
        else:
            slot["ground_truth"] = msg
    return [frames[k] for k in sorted(frames)]
