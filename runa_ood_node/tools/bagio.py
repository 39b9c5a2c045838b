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
    * message objects are the type store's dataclasses (same field names as the ROS messages),
      except the images and detections :func:`iter_frames` reads with ``ros.wire``.

Reading frames: :func:`iter_frames` is the one way offline tools (``evaluate --bag``, the demo,
batch tools) get frames out of a bag. It pairs images and detections with the node's own
``ros.pairing.StampPairer`` and reads them from their bytes with the node's own readers
(``ros.wire``, then ``ros.convert`` for the pixels), so an offline tool sees exactly the arrays,
pairs and drop reasons the node would. Nothing here converts
messages to arrays by itself.
"""
from __future__ import annotations

import dataclasses
import logging
import pathlib
from typing import Any, Dict, Iterable, Iterator, List, NamedTuple, Optional, Sequence, Tuple

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


class BagError(RuntimeError):
    """A bag cannot be opened, written or decoded (message says what and where)."""


class BagMessage(NamedTuple):
    """One message as stored: topic, ROS type name (``pkg/msg/Type``), log time in ns, CDR bytes."""

    topic: str
    msgtype: str
    stamp_ns: int
    rawdata: bytes


# --------------------------------------------------------------------------- type store
def typestore():
    """The type store for every topic of the project's bags (ROS 2 kilted + vision_msgs +
    runa_ood_msgs): ``runa_ood_node.ros.msgdefs.shared_typestore()``, the package's one definition."""
    from runa_ood_node.ros.msgdefs import shared_typestore

    return shared_typestore()


def msg_class(msgtype: str):
    """The type store's dataclass for ``pkg/msg/Type``."""
    try:
        return typestore().types[msgtype]
    except KeyError as exc:
        raise BagError(f"message type {msgtype!r} is not in the type store") from exc


def serialize(msg, msgtype: str) -> bytes:
    """CDR bytes of a type-store message (equal to rclpy's ``serialize_message``)."""
    from runa_ood_node.ros.msgdefs import encode

    return encode(msg, msgtype)


def deserialize(rawdata: bytes, msgtype: str):
    """Type-store message from CDR bytes (raises :class:`BagError` on truncated/garbage data)."""
    from runa_ood_node.ros.msgdefs import CdrError, decode

    try:
        return decode(rawdata, msgtype)
    except CdrError as exc:
        raise BagError(str(exc)) from exc


def restamp(rawdata: bytes, msgtype: str, offset_ns: int) -> bytes:
    """CDR bytes of the message with every ``header.stamp`` in it (nested ones too, e.g. each
    Detection2D's) shifted by ``offset_ns``; the bytes unchanged when ``offset_ns`` is 0."""
    if not offset_ns:
        return rawdata
    import dataclasses

    def shift(obj):
        if isinstance(obj, (list, tuple)):
            return type(obj)(shift(x) for x in obj)
        if not dataclasses.is_dataclass(obj) or isinstance(obj, type):
            return obj
        changes = {}
        for f in dataclasses.fields(obj):
            v = getattr(obj, f.name)
            if f.name == "stamp" and hasattr(v, "sec") and hasattr(v, "nanosec"):
                ns = int(v.sec) * 1_000_000_000 + int(v.nanosec) + int(offset_ns)
                changes[f.name] = dataclasses.replace(v, sec=ns // 1_000_000_000, nanosec=ns % 1_000_000_000)
            elif dataclasses.is_dataclass(v) or isinstance(v, (list, tuple)):
                changes[f.name] = shift(v)
        return dataclasses.replace(obj, **changes) if changes else obj

    return serialize(shift(deserialize(rawdata, msgtype)), msgtype)


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
MCAP_MAGIC = b"\x89MCAP0\r\n"


@dataclasses.dataclass
class Recovery:
    """What was read from an MCAP bag that ``rosbags`` refuses (no footer / summary: the recorder
    was cut, e.g. a vehicle lost power): every complete message up to the cut, in file order.

    Attributes: ``files`` read; ``reason`` why the normal reader refused the bag; ``messages``
    recovered; ``last_stamp_ns`` log time of the last one (None when none); ``bytes_read`` up to
    the end of the last complete record; ``bytes_unread`` after it (the cut record, or a footer
    that could not be read); ``complete``: the data section ended properly (only the index is
    missing) so nothing was lost."""

    files: List[str]
    reason: str
    messages: int = 0
    last_stamp_ns: Optional[int] = None
    bytes_read: int = 0
    bytes_unread: int = 0
    complete: bool = False

    def describe(self) -> str:
        last = "none" if self.last_stamp_ns is None else f"{self.last_stamp_ns * 1e-9:.3f} s"
        return (f"recovered {self.messages} messages up to log time {last}; {self.bytes_unread} bytes unread "
                f"({self.reason})")

    def as_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)


def _mcap_files(path) -> List[pathlib.Path]:
    p = pathlib.Path(path)
    if p.is_file():
        return [p] if p.suffix == ".mcap" else []
    return sorted(p.glob("*.mcap")) if p.is_dir() else []


class _McapStream:
    """A forward-only MCAP reader that needs no footer, summary or index (the part of the format
    a recorder writes as it goes): Schema / Channel / Message records, top level or inside chunks
    (uncompressed, lz4 or zstd, the decompressors ``rosbags`` itself depends on). It stops at the
    first incomplete record; an uncompressed chunk cut in the middle still gives its complete
    messages."""

    def __init__(self, files: Sequence[pathlib.Path], reason: str):
        self.files = list(files)
        self.recovery = Recovery([str(f) for f in self.files], reason)
        self.schemas: Dict[int, str] = {}
        self.channels: Dict[int, Tuple[str, int]] = {}  # id -> (topic, schema id)

    @staticmethod
    def _str(buf, pos: int) -> Tuple[str, int]:
        n = int.from_bytes(buf[pos:pos + 4], "little")
        if pos + 4 + n > len(buf):
            raise ValueError("string past the record")
        return bytes(buf[pos + 4:pos + 4 + n]).decode("utf-8", "replace"), pos + 4 + n

    def _records(self, buf, pos: int, end: int, partial_ok: bool):
        """(opcode, content) of the complete records in ``buf[pos:end]``; stops at a cut one."""
        while pos + 9 <= end:
            op = buf[pos]
            n = int.from_bytes(buf[pos + 1:pos + 9], "little")
            if pos + 9 + n > end:
                if partial_ok:
                    yield op, None, pos  # the cut record (content incomplete)
                return
            yield op, buf[pos + 9:pos + 9 + n], pos + 9 + n
            pos += 9 + n

    def _inner(self, op: int, rec, wanted):
        if op == 0x03:  # Schema
            sid = int.from_bytes(rec[0:2], "little")
            self.schemas[sid], _ = self._str(rec, 2)
        elif op == 0x04:  # Channel
            cid, sid = int.from_bytes(rec[0:2], "little"), int.from_bytes(rec[2:4], "little")
            topic, _ = self._str(rec, 4)
            self.channels[cid] = (topic, sid)
        elif op == 0x05:  # Message
            cid = int.from_bytes(rec[0:2], "little")
            log_time = int.from_bytes(rec[6:14], "little")
            topic, sid = self.channels.get(cid, ("", 0))
            r = self.recovery
            r.messages += 1
            r.last_stamp_ns = log_time if r.last_stamp_ns is None else max(r.last_stamp_ns, log_time)
            if wanted is None or topic in wanted:
                return topic, self.schemas.get(sid, ""), log_time, bytes(rec[22:])
        return None

    def messages(self, wanted: Optional[set] = None) -> Iterator[Tuple[str, str, int, bytes]]:
        """(topic, msgtype, log time ns, CDR bytes) of every complete message, file order."""
        import mmap

        r = self.recovery
        r.messages, r.last_stamp_ns, r.bytes_read, r.bytes_unread, r.complete = 0, None, 0, 0, True
        for f in self.files:
            size = f.stat().st_size
            if size == 0:
                raise BagError(f"{f}: empty file")
            with open(f, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as buf:
                if buf[:8] != MCAP_MAGIC:
                    raise BagError(f"{f}: not an MCAP file (bad magic)")
                done, good_end = False, 8
                for op, rec, nxt in self._records(buf, 8, size, partial_ok=True):
                    if rec is None:  # the cut record: an uncompressed chunk still gives its messages
                        if op == 0x06:
                            yield from self._chunk(buf[nxt + 9:size], wanted, partial=True)
                        break
                    if op == 0x06:
                        yield from self._chunk(rec, wanted, partial=False)
                    elif op in (0x02, 0x0F):  # Footer / DataEnd: the data section is whole
                        good_end, done = nxt, True
                        break
                    else:
                        m = self._inner(op, rec, wanted)
                        if m is not None:
                            yield m
                    good_end = nxt
                r.bytes_read += good_end
                r.bytes_unread += 0 if done else size - good_end
                r.complete = r.complete and done

    def _chunk(self, rec, wanted, partial: bool):
        # start u64, end u64, uncompressed size u64, crc u32, compression str, records length u64, records
        try:
            comp, pos = self._str(rec, 28)
        except ValueError:
            return
        body = rec[pos + 8:]
        if partial and comp:
            return  # a cut compressed chunk cannot be decoded
        if comp == "lz4":
            from lz4.frame import decompress as lz4_decompress

            body = lz4_decompress(bytes(body))
        elif comp == "zstd":
            try:
                from compression import zstd  # Python >= 3.14
            except ImportError:
                from backports import zstd  # rosbags' own dependency
            body = zstd.decompress(bytes(body))
        elif comp:
            raise BagError(f"unsupported MCAP chunk compression {comp!r}")
        for op, inner, _ in self._records(body, 0, len(body), partial_ok=False):
            m = self._inner(op, inner, wanted)
            if m is not None:
                yield m


_SCANS: Dict[Tuple, Tuple] = {}


def _open_failure(path) -> Optional[str]:
    """None when ``rosbags`` opens the bag; else why not (a one-line reason)."""
    from rosbags.rosbag2 import Reader

    p = pathlib.Path(path)
    if not p.exists():
        return f"{p}: no such file or folder"
    if not (p / "metadata.yaml").exists():
        return "no metadata.yaml"
    try:
        with Reader(p):
            return None
    except Exception as exc:  # rosbags' ReaderError, sqlite3 errors, bad YAML ...
        return f"{type(exc).__name__}: {exc}".splitlines()[0]


def _stream(path) -> Optional[_McapStream]:
    """The stream reader for a bag ``rosbags`` refuses whose data is MCAP, else None when rosbags
    opens it. Raises BagError when neither can read it (one line: what and why)."""
    reason = _open_failure(path)
    if reason is None:
        return None
    files = _mcap_files(path)
    if not files:
        if not pathlib.Path(path).exists() or reason == "no metadata.yaml":
            raise BagError(f"{path} is not a rosbag2 folder (no metadata.yaml) nor an MCAP file")
        raise BagError(f"{path}: cannot be read: {reason}")
    return _McapStream(files, reason)


def _scan(path) -> Tuple[Dict[str, str], Dict[str, int], int, int, Recovery]:
    """(topics, counts, start, end, recovery) of a bag read by the stream reader (one pass over
    the file, cached per file size and modification time)."""
    st = _stream(path)
    key = tuple((str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in st.files)
    if key not in _SCANS:
        topics: Dict[str, str] = {}
        counts: Dict[str, int] = {}
        start, end = None, 0
        for topic, _, t, _ in st.messages(wanted=None):
            counts[topic] = counts.get(topic, 0) + 1
            start = t if start is None else min(start, t)
            end = max(end, t)
        for topic, sid in st.channels.values():
            topics[topic] = st.schemas.get(sid, "")
        _SCANS[key] = (topics, counts, start or 0, end, st.recovery)
    return _SCANS[key]


def _reader(path):
    from rosbags.rosbag2 import Reader

    p = pathlib.Path(path)
    if not (p / "metadata.yaml").exists():
        raise BagError(f"{p} is not a rosbag2 folder (no metadata.yaml)")
    return Reader(p)


def read_bag(path, topics: Optional[Iterable[str]] = None) -> Iterator[BagMessage]:
    """Yield every message of the bag (all topics, or those named) in log-time order.

    A bag ``rosbags`` refuses whose data is MCAP (no footer: the recorder was cut; or a bare
    ``.mcap`` without ``metadata.yaml``) is read by the stream reader up to its last complete
    message, in file order (:func:`bag_info` reports it as ``recovered``). Any other bag that
    cannot be read raises :class:`BagError` with a one-line reason, never the storage layer's own
    exception."""
    wanted = None if topics is None else set(topics)
    st = _stream(path)
    if st is not None:
        for topic, msgtype, t, raw in st.messages(wanted):
            yield BagMessage(topic, msgtype, int(t), raw)
        return
    try:
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
    except BagError:
        raise
    except Exception as exc:  # a storage file corrupt past its index
        raise BagError(f"{path}: cannot be read: {type(exc).__name__}: {exc}".splitlines()[0]) from exc


@dataclasses.dataclass
class BagInfo:
    """Summary of a bag: ``topics`` topic -> msgtype, ``counts`` topic -> messages,
    ``start_ns`` / ``end_ns`` log-time bounds, ``storage`` (``mcap`` / ``sqlite3``); ``recovery``
    (:class:`Recovery`) when the bag was read up to a cut by the stream reader, else None."""

    path: str
    topics: Dict[str, str]
    counts: Dict[str, int]
    start_ns: int
    end_ns: int
    storage: str
    recovery: Optional[Recovery] = None

    @property
    def duration_s(self) -> float:
        return (self.end_ns - self.start_ns) / 1e9

    @property
    def recovered(self) -> bool:
        return self.recovery is not None


def bag_info(path) -> BagInfo:
    """:class:`BagInfo` of a bag. Raises :class:`BagError` (one line) when it cannot be read at all
    (missing, empty, not a bag, a corrupt sqlite3 file)."""
    if _stream(path) is not None:
        topics, counts, start, end, rec = _scan(path)
        return BagInfo(str(path), topics, counts, start, end, "mcap", rec)
    try:
        with _reader(path) as reader:
            topics = {c.topic: c.msgtype for c in reader.connections}
            counts: Dict[str, int] = {}
            for c in reader.connections:
                counts[c.topic] = counts.get(c.topic, 0) + int(c.msgcount)
            storage = "mcap" if any(pathlib.Path(path).glob("*.mcap")) else "sqlite3"
            return BagInfo(str(path), topics, counts, int(reader.start_time), int(reader.end_time), storage)
    except BagError:
        raise
    except Exception as exc:
        raise BagError(f"{path}: cannot be read: {type(exc).__name__}: {exc}".splitlines()[0]) from exc


@dataclasses.dataclass
class BagFrame:
    """One record of :func:`iter_frames`: a paired frame, or a message that did not pair.

    Attributes:
        kind: ``"pair"`` (an image and its detections, paired by the node's rules), ``"image"``
            or ``"detections"`` (a message the pairer gave up; ``reason`` says why).
        stamp_ns: the image's header stamp (pairs, images) or the detections' (detections), ns.
        frame_id: that header's ``frame_id``.
        header: that header (``ros.wire.Header``: ``stamp.sec``, ``stamp.nanosec``, ``frame_id``).
        reason: None when the frame is ready to score. Otherwise the reason the node would count
            for it: a pairer reason (``ros.pairing.REASONS``: ``image_without_detections``,
            ``detections_without_image``, ``buffer_overflow``, ``out_of_order``,
            ``duplicate_stamp``, ``time_jump_back``), ``image_<ImageConversionError.reason>``
            (e.g. ``image_too_large``, ``image_unsupported_encoding``).
        detail: human-readable detail of ``reason`` ("" when None).
        rgb: ``HxWx3 uint8 RGB`` (``ros.convert`` readers), None unless ``reason`` is None and
            decoding was asked for.
        image_type: the image's message type (``sensor_msgs/msg/Image`` / ``CompressedImage``),
            "" for detections-only records.
        boxes_cxcywh: float32 ``[N,4]`` (``ros.wire.read_detections``: centre, size, rotated
            boxes as their axis-aligned envelope); ``scores`` float32 ``[N]`` (best hypothesis,
            NaN without one), ``class_ids`` and ``ids`` (``Detection2D.id``) lists of N str.
            Empty for records without detections.
        detections_stamp_ns: stamp of the paired detections (differs from ``stamp_ns`` only
            with a pairing slop), None without detections.
        ground_truth: ``{detection id: (is_ood, category)}`` from the ground-truth message stamped
            like the image, None when there is none.
        image_msg / detections_msg: the messages as read (``ros.wire.ImageView`` /
            ``ros.wire.Detections``) or None.
    """

    kind: str
    stamp_ns: int
    frame_id: str
    header: Any
    reason: Optional[str] = None
    detail: str = ""
    rgb: Optional[np.ndarray] = None
    image_type: str = ""
    boxes_cxcywh: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros((0, 4), np.float32))
    scores: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(0, np.float32))
    class_ids: List[str] = dataclasses.field(default_factory=list)
    ids: List[str] = dataclasses.field(default_factory=list)
    detections_stamp_ns: Optional[int] = None
    ground_truth: Optional[Dict[str, Tuple[bool, str]]] = None
    image_msg: Any = None
    detections_msg: Any = None

    @property
    def ok(self) -> bool:
        """A paired frame that decoded: ready for ``OodScorer.score``."""
        return self.kind == "pair" and self.reason is None


def pick_image_topic(topics: Iterable[str]) -> Optional[str]:
    """The bag's image topic: ``/camera/image_raw``, else ``/camera/image_raw/compressed``, else None."""
    topics = set(topics)
    return next((t for t in (IMAGE_TOPIC, COMPRESSED_TOPIC) if t in topics), None)


def read_ground_truth(path, topic: str = GROUND_TRUTH_TOPIC) -> Dict[int, Dict[str, Tuple[bool, str]]]:
    """``{stamp_ns: {detection id: (is_ood, category)}}`` from the bag's GroundTruth messages
    (empty when the bag has no such topic)."""
    out: Dict[int, Dict[str, Tuple[bool, str]]] = {}
    if topic not in bag_info(path).topics:
        return out
    for m in read_bag(path, [topic]):
        g = deserialize(m.rawdata, m.msgtype)
        out.setdefault(stamp_ns_of(g.header), {}).update(
            {str(d): (bool(o), str(c)) for d, o, c in zip(g.detection_ids, g.is_ood, g.category)})
    return out


def _node_default(name: str):
    from runa_ood_node.ros.params import defaults

    return defaults()[name]


def iter_frames(path, image_topic: Optional[str] = None, detections_topic: str = DETECTIONS_TOPIC,
                gt_topic: Optional[str] = GROUND_TRUTH_TOPIC, max_image_pixels: Optional[int] = None,
                params: Optional[Dict[str, Any]] = None, decode: bool = True) -> Iterator[BagFrame]:
    """Read a bag as the node would receive it: the ONE frame iterator of the offline tools.

    The image and detections messages are offered, in the bag's log-time order, to the node's own
    ``ros.pairing.StampPairer`` with the node's pairing settings (``pairing_slop_s``,
    ``pairing_max_age_s``, ``pairing_buffer`` from ``params``, else the node's defaults); every
    message is read from its bytes with the node's readers (``ros.wire``) and every pair decoded
    with them (``ros.convert.image_to_rgb`` / ``compressed_to_rgb`` with the pixel cap). At the end of the bag the
    messages still waiting are given up (``pairer.flush()``), so every image and detections message
    of the bag ends in exactly one record: a ``"pair"`` record stands for one image and one
    detections message, an ``"image"`` / ``"detections"`` record for one message that did not pair.

    Args:
        path: bag folder (MCAP or sqlite3).
        image_topic: None picks ``/camera/image_raw``, else ``/camera/image_raw/compressed``.
        detections_topic, gt_topic: the detections and ground-truth topics (``gt_topic`` None or
            absent from the bag: no ground truth).
        max_image_pixels: the reader's pixel cap; None = ``params["max_image_pixels"]``, else the
            node's default (``convert.DEFAULT_MAX_IMAGE_PIXELS``).
        params: node parameter values (name -> value, e.g. ``tools.common.node_parameters_from_args``);
            the pairing settings and ``max_image_pixels`` are read from it, missing ones take the
            node's defaults.
        decode: False skips image decoding (``rgb`` stays None, no ``image_*`` reasons): for
            callers that need only boxes, stamps and ground truth.

    Yields:
        :class:`BagFrame` records in the order the pairer decides them (pairs in stamp order).

    Raises:
        BagError: the bag cannot be read, has no image topic, or holds an image or detections
            message that is not one (unreadable bytes; a recorder never writes those).
    """
    from runa_ood_node.ros import convert, wire
    from runa_ood_node.ros.pairing import StampPairer

    params = dict(params or {})

    def setting(name):
        return params[name] if name in params else _node_default(name)

    if max_image_pixels is None:
        max_image_pixels = params.get("max_image_pixels", convert.DEFAULT_MAX_IMAGE_PIXELS)
    pairer = StampPairer(slop_ns=int(round(float(setting("pairing_slop_s")) * 1e9)),
                         max_buffer=int(setting("pairing_buffer")),
                         max_age_ns=int(round(float(setting("pairing_max_age_s")) * 1e9)))
    info = bag_info(path)
    image_topic = image_topic or pick_image_topic(info.topics)
    if image_topic is None or image_topic not in info.topics:
        raise BagError(f"{path}: no image topic {image_topic or (IMAGE_TOPIC + ' / ' + COMPRESSED_TOPIC)}; "
                       f"topics {sorted(info.topics)}")
    image_type = info.topics[image_topic]
    gt = read_ground_truth(path, gt_topic) if gt_topic else {}

    def header_of(msg):
        h = msg.header
        return h, stamp_ns_of(h), str(h.frame_id)

    def unpaired(d) -> BagFrame:
        msg = d.message
        hdr, _, fid = header_of(msg)
        is_image = d.kind == "image"
        return BagFrame(kind=d.kind, stamp_ns=int(d.stamp_ns), frame_id=fid, header=hdr, reason=d.reason,
                        detail=f"{d.kind} stamped {d.stamp_ns * 1e-9:.9f} s: {d.reason}",
                        image_type=image_type if is_image else "",
                        ground_truth=gt.get(int(d.stamp_ns)) if is_image else None,
                        image_msg=msg if is_image else None, detections_msg=None if is_image else msg)

    def paired(pair) -> BagFrame:
        img, det = pair.image, pair.detections
        hdr, st, fid = header_of(img)
        fr = BagFrame(kind="pair", stamp_ns=st, frame_id=fid, header=hdr, image_type=image_type,
                      detections_stamp_ns=int(pair.detections_stamp_ns), ground_truth=gt.get(st),
                      image_msg=img, detections_msg=det)
        fr.boxes_cxcywh, fr.scores, fr.class_ids, fr.ids = det.arrays()
        if decode:
            try:
                if image_type == COMPRESSED_TYPE:
                    fr.rgb = convert.compressed_to_rgb(img, max_pixels=max_image_pixels)
                else:
                    fr.rgb = convert.image_to_rgb(img, max_pixels=max_image_pixels)
            except convert.ImageConversionError as exc:
                fr.reason, fr.detail = f"image_{exc.reason}", str(exc)
        return fr

    def emit(out) -> Iterator[BagFrame]:
        for pair in out.pairs:
            yield paired(pair)
        for d in out.drops:
            yield unpaired(d)

    read_image = wire.read_compressed if image_type == COMPRESSED_TYPE else wire.read_image
    for m in read_bag(path, [image_topic, detections_topic]):
        try:  # the node's readers, on the bytes as the node receives them
            msg = read_image(m.rawdata) if m.topic == image_topic else wire.read_detections(m.rawdata)
        except wire.CdrError as exc:
            raise BagError(f"{m.topic}: {exc}") from exc
        st = stamp_ns_of(msg.header)
        out = pairer.add_image(st, msg) if m.topic == image_topic else pairer.add_detections(st, msg)
        yield from emit(out)
    for d in pairer.flush():
        yield unpaired(d)
