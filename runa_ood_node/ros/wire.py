"""The node's hot messages read from and written to their CDR bytes directly.

The node takes its inputs raw (``create_subscription(..., raw=True)``) and publishes its outputs
that embed detections as bytes. This module is the one reader of those inputs and the one writer
of those outputs, for the node and the offline tools alike:

* :func:`header_stamp_ns`: the header stamp alone (what the executor thread pairs on);
* :func:`read_image` / :func:`read_compressed`: ``sensor_msgs/Image`` / ``CompressedImage`` ->
  an :class:`ImageView` (header, sizes, encoding; ``data`` a read-only view of the received
  bytes, never a copy) that ``convert.image_to_rgb`` / ``compressed_to_rgb`` turn into pixels;
* :func:`read_detections`: ``vision_msgs/Detection2DArray`` -> :class:`Detections`: the arrays
  core scores (``convert.detections_to_arrays`` is this reader) plus where each ``Detection2D``
  lies in the bytes;
* :func:`write_ood_array`, :func:`write_ood_only`, :func:`write_alert`: the outputs that embed
  the input detections (``OodDetectionArray``, ``Detection2DArray`` of the OOD ones,
  ``DriverAlert`` with its objects). Each detection is embedded **as its bytes**: copied when it
  lands at the same offset modulo 8 as in the input, else re-laid with the 8-byte-aligned blocks
  (hypothesis scores and poses, the box) moved by 4 bytes - never deserialized and rebuilt.
* :func:`write_image_annotations`: ``foxglove_msgs/ImageAnnotations`` of the drawn boxes
  (``boxstyle.annotation_items``), what ``draw.make_image_annotations`` builds as message objects.

Why: ``runa-ood bench-node`` measured the generic deserializers (rclpy's and ``rosbags``') at
several times the cost of this flat reading on the node's critical path (numbers in the README).

The wire format is plain CDR (XCDR1, what ROS 2 middlewares put on the wire and in bags): a
4-byte encapsulation header (``00 01`` little endian, ``00 00`` big endian), then the fields in
order, each primitive aligned to its own size relative to the byte after that header; strings
are a uint32 length counting a terminating NUL, then the bytes and the NUL; sequences a uint32
count, then the elements. Both byte orders are read; outputs are written little endian.
Everything else (XCDR2 encapsulations, truncated or inconsistent bytes, strings without their
NUL or not UTF-8) raises :class:`CdrError` with what was wrong. Tests hold every reader and writer
equal to rclpy's and ``rosbags``' (de)serialization of the same messages, field by field.

No rclpy import here (offline tools use it without a sourced ROS environment).
"""
from __future__ import annotations

import math
import struct
from dataclasses import dataclass, field
from typing import List, NamedTuple, Optional, Sequence, Tuple

import numpy as np

from ..core.boxes import BoxStatus, status_text
from . import boxstyle
from .msgdefs import CdrError


class Time(NamedTuple):
    sec: int
    nanosec: int


class Header(NamedTuple):
    """``std_msgs/Header`` as read from the bytes (the field names of the message)."""
    stamp: Time
    frame_id: str


_LE = {name: struct.Struct("<" + fmt) for name, fmt in
       (("u32", "I"), ("stamp", "iI"), ("hw", "II"), ("f64", "d"), ("bbox", "5d"))}
_BE = {name: struct.Struct(">" + s.format[1:]) for name, s in _LE.items()}
_U32 = _LE["u32"]
_STAMP = _LE["stamp"]
_OOD_TAIL = struct.Struct("<ff?")  # uncertainty, threshold, is_ood
_PAD = bytes(8)


def _structs(b: memoryview):
    if len(b) < 4 or b[0] != 0 or b[1] not in (0, 1):
        enc = bytes(b[:2]).hex() if len(b) >= 2 else "none"
        raise CdrError(f"not a plain-CDR message ({len(b)} bytes, encapsulation {enc}; expected 0001 or 0000)")
    return _LE if b[1] == 1 else _BE


def _string(b: memoryview, pos: int, u32: struct.Struct) -> Tuple[str, int]:
    """The string at ``pos`` (aligned to 4 first) and the position after it."""
    pos += -(pos - 4) & 3
    (n,) = u32.unpack_from(b, pos)
    pos += 4
    end = pos + n
    if n == 0 or end > len(b) or b[end - 1] != 0:
        raise CdrError(f"bad string (length {n}, or no terminating NUL) at byte {pos - 4} of {len(b)}")
    try:
        return str(b[pos:end - 1], "utf-8"), end
    except UnicodeDecodeError as exc:
        raise CdrError(f"string at byte {pos - 4} is not UTF-8: {exc}") from None


def _stamp(b: memoryview, st) -> Tuple[int, int]:
    if len(b) < 12:
        raise CdrError(f"{len(b)} bytes: too short for a CDR message with a header")
    return st["stamp"].unpack_from(b, 4)


def header_stamp_ns(raw) -> int:
    """``header.stamp`` (ns) of a serialized message whose first field is a ``std_msgs/Header``,
    read without reading the rest (the node's pairing, on the executor thread). Raises
    :class:`CdrError` for anything shorter or another encapsulation."""
    b = memoryview(raw)
    sec, nsec = _stamp(b, _structs(b))
    return sec * 1_000_000_000 + nsec


def _header(b: memoryview, st) -> Tuple[Header, int]:
    sec, nsec = _stamp(b, st)
    frame_id, pos = _string(b, 12, st["u32"])
    return Header(Time(sec, nsec), frame_id), pos


def _count(b: memoryview, pos: int, u32: struct.Struct, min_size: int, what: str) -> Tuple[int, int]:
    """A sequence length at ``pos`` (aligned to 4 first), checked against the bytes left."""
    pos += -(pos - 4) & 3
    if pos + 4 > len(b):
        raise CdrError(f"truncated before the {what} count (byte {pos} of {len(b)})")
    (n,) = u32.unpack_from(b, pos)
    pos += 4
    if n * min_size > len(b) - pos:
        raise CdrError(f"{n} {what} cannot fit in the {len(b) - pos} bytes left")
    return n, pos


# ------------------------------------------------------------------------------------------ images
@dataclass
class ImageView:
    """A ``sensor_msgs/Image`` (or ``CompressedImage``: ``format`` set, sizes 0) read from its bytes.

    ``data`` is a read-only ``memoryview`` of the received bytes: the pixels are not copied."""
    header: Header
    height: int = 0
    width: int = 0
    encoding: str = ""
    is_bigendian: int = 0
    step: int = 0
    data: memoryview = field(default_factory=lambda: memoryview(b""))
    format: str = ""


def read_image(raw) -> ImageView:
    """``sensor_msgs/Image`` CDR bytes -> :class:`ImageView` (no pixel copy)."""
    b = memoryview(raw).toreadonly()
    st = _structs(b)
    try:
        header, pos = _header(b, st)
        pos += -(pos - 4) & 3
        height, width = st["hw"].unpack_from(b, pos)
        encoding, pos = _string(b, pos + 8, st["u32"])
        is_big = b[pos]
        pos += 1
        pos += -(pos - 4) & 3
        step, n = st["hw"].unpack_from(b, pos)
        pos += 8
    except (struct.error, IndexError) as exc:
        raise CdrError(f"truncated sensor_msgs/Image ({len(b)} bytes): {exc}") from None
    if pos + n > len(b):
        raise CdrError(f"sensor_msgs/Image declares {n} data bytes, {len(b) - pos} follow")
    return ImageView(header, height, width, encoding, is_big, step, b[pos:pos + n])


def read_compressed(raw) -> ImageView:
    """``sensor_msgs/CompressedImage`` CDR bytes -> :class:`ImageView` (``format``, ``data``)."""
    b = memoryview(raw).toreadonly()
    st = _structs(b)
    try:
        header, pos = _header(b, st)
        fmt, pos = _string(b, pos, st["u32"])
        n, pos = _count(b, pos, st["u32"], 1, "data byte")
    except (struct.error, IndexError) as exc:
        raise CdrError(f"truncated sensor_msgs/CompressedImage ({len(b)} bytes): {exc}") from None
    return ImageView(header, data=b[pos:pos + n], format=fmt)


# ------------------------------------------------------------------------------------- detections
_DETECTIONS = "vision_msgs/msg/Detection2DArray"
_RESULT_F64 = 1 + 7 + 36  # hypothesis.score, pose.pose (position 3 + orientation 4), pose.covariance
_MIN_DET = 8 + 5 + 3 + 4 + 40 + 5  # stamp, frame_id "" (+ pad), results count, bbox, id "": 65, the least
_MIN_RESULT = 5 + _RESULT_F64 * 8  # class_id "", score + pose (+ up to 7 bytes of padding)


@dataclass
class Detections:
    """A ``vision_msgs/Detection2DArray`` read from its bytes: what core scores, in input order.

    Attributes:
        header: the array's header.
        boxes_cxcywh: float32 ``[N,4]`` centre x, centre y, width, height (pixels); a box rotated
            by ``theta`` becomes its axis-aligned envelope ``w' = |w cos t| + |h sin t|``,
            ``h' = |w sin t| + |h cos t|`` (non-finite ``theta``: NaN size). Non-finite values pass
            through (core flags them); beyond float32's range they become +-inf, silently.
        scores: float32 ``[N]``, the highest hypothesis score (NaN when there is none; a NaN
            score loses to any number).
        class_ids: the ``class_id`` of that hypothesis ("" when none).
        ids: ``Detection2D.id``.
        raw: the bytes read, little endian (big-endian input, which no ROS 2 platform sends, is
            re-laid little endian through ``msgdefs`` first): outputs embed the detections from them.
        spans: per detection ``(start, end, cuts)``: its bytes ``raw[start:end]`` and the offsets
            where an 8-byte-aligned block starts after padding ``(pad_start, block_start)``.
    """
    header: Header
    boxes_cxcywh: np.ndarray
    scores: np.ndarray
    class_ids: List[str]
    ids: List[str]
    raw: memoryview
    spans: List[Tuple[int, int, Tuple[Tuple[int, int], ...]]]

    def __len__(self) -> int:
        return len(self.ids)

    def arrays(self):
        """``(boxes_cxcywh, scores, class_ids, ids)``."""
        return self.boxes_cxcywh, self.scores, self.class_ids, self.ids


def read_detections(raw) -> Detections:
    """``vision_msgs/Detection2DArray`` CDR bytes -> :class:`Detections` (the one detections
    reader; see :class:`Detections` for the arrays' rules). Raises :class:`CdrError`."""
    b = memoryview(raw).toreadonly()
    st = _structs(b)
    if st is _BE:  # no ROS 2 platform sends these; re-laid little endian once so outputs can embed them
        from .msgdefs import decode, encode

        return read_detections(encode(decode(raw, _DETECTIONS), _DETECTIONS))
    u32, f64, bbox_s = st["u32"], st["f64"], st["bbox"]
    try:
        header, pos = _header(b, st)
        n, pos = _count(b, pos, u32, _MIN_DET, "detections")
        rows: List[Tuple[float, float, float, float]] = []
        scores: List[float] = []
        class_ids: List[str] = []
        ids: List[str] = []
        spans = []
        size = len(b)
        unpack_u32 = u32.unpack_from
        for i in range(n):  # on the node's critical path: flat reads, no per-field objects
            pos += -(pos - 4) & 3
            start = pos
            _, pos = _string(b, pos + 8, u32)  # header: stamp, then frame_id (checked: outputs embed it)
            pos += -(pos - 4) & 3
            (nres,) = unpack_u32(b, pos)
            pos += 4
            if nres * _MIN_RESULT > size - pos:
                raise CdrError(f"detection {i}: {nres} hypotheses cannot fit in the {size - pos} bytes left")
            cuts = []
            best, best_id = math.nan, ""
            for j in range(nres):
                cid, pad = _string(b, pos, u32)
                pos = pad + (-(pad - 4) & 7)
                cuts.append((pad, pos))
                (sc,) = f64.unpack_from(b, pos)
                pos += _RESULT_F64 * 8
                if j == 0 or sc > best or (best != best and sc == sc):
                    best, best_id = sc, cid
            pad = pos
            pos += -(pos - 4) & 7
            cuts.append((pad, pos))
            x, y, theta, w, h = bbox_s.unpack_from(b, pos)
            did, pos = _string(b, pos + 40, u32)
            if theta != 0.0:
                if math.isfinite(theta):
                    c, s = abs(math.cos(theta)), abs(math.sin(theta))
                    w, h = w * c + h * s, w * s + h * c
                else:
                    w = h = math.nan
            rows.append((x, y, w, h))
            scores.append(best)
            class_ids.append(best_id)
            ids.append(did)
            spans.append((start, pos, tuple(cuts)))
    except (struct.error, IndexError, UnicodeDecodeError) as exc:
        raise CdrError(f"truncated or invalid vision_msgs/Detection2DArray ({len(b)} bytes): "
                       f"{type(exc).__name__}: {exc}") from None
    with np.errstate(over="ignore"):  # beyond float32's range -> +-inf, flagged INFINITE by core
        boxes = np.array(rows, np.float64).astype(np.float32).reshape(n, 4)
        return Detections(header, boxes, np.array(scores, np.float64).astype(np.float32), class_ids, ids, b, spans)


# ---------------------------------------------------------------------------------------- writers
class _Out:
    """A little-endian CDR writer (offsets relative to the byte after the encapsulation)."""

    __slots__ = ("buf",)

    def __init__(self):
        self.buf = bytearray(b"\x00\x01\x00\x00")

    def align(self, n: int) -> None:
        pad = -(len(self.buf) - 4) & (n - 1)
        if pad:
            self.buf += _PAD[:pad]

    def string(self, s: str) -> None:
        e = s.encode("utf-8")
        self.align(4)
        self.buf += _U32.pack(len(e) + 1)
        self.buf += e
        self.buf += b"\x00"

    def header(self, header) -> None:
        self.buf += _STAMP.pack(int(header.stamp.sec), int(header.stamp.nanosec))  # offset 0: aligned
        self.string(str(header.frame_id))

    def count(self, n: int) -> None:
        self.align(4)
        self.buf += _U32.pack(n)

    def detection(self, dets: Detections, i: int) -> None:
        """Embed input detection ``i`` as its bytes (see the module docstring)."""
        start, end, cuts = dets.spans[i]
        self.align(4)
        raw, buf = dets.raw, self.buf
        if (len(buf) - start) & 7 == 0:  # same offset modulo 8: the bytes are the message
            buf += raw[start:end]
            return
        at = start
        for pad, block in cuts:  # moved by 4: every 8-byte-aligned block gets the other padding
            buf += raw[at:pad]
            self.align(8)
            at = block
        buf += raw[at:end]

    def ood_detection(self, dets: Detections, i: int, fields) -> None:
        unc, thr, is_ood, label, sim, status, text = fields
        self.detection(dets, i)
        self.align(4)
        self.buf += _OOD_TAIL.pack(unc, thr, is_ood)
        self.string(label)
        self.align(4)
        self.buf += struct.pack("<fB", sim, status)
        self.string(text)


def ood_fields(frame_result, n: int) -> List[Tuple[float, float, bool, str, float, int, str]]:
    """The ``OodDetection`` fields of boxes ``0..n-1`` of a core ``FrameResult``, one tuple
    ``(uncertainty, threshold, is_ood, nearest_label, similarity, status, status_text)`` per box.

    Boxes the result does not cover (``frame_result`` None or shorter than ``n``) are
    ``STATUS_NOT_SCORED`` with NaN scores and a ``status_text`` that says so; ``nearest_label`` is
    set for ``STATUS_OK`` boxes only; a ``BACKEND_ERROR`` box's text carries the frame's error."""
    m = 0 if frame_result is None else min(len(frame_result.status), n)
    out = []
    if m:
        r = frame_result
        err = getattr(r, "error", None)
        unc, thr, ood, sim = (np.asarray(a)[:m].tolist() for a in (r.uncertainty, r.threshold, r.is_ood, r.similarity))
        for i, st in enumerate(np.asarray(r.status)[:m].tolist()):
            text = status_text(st)
            if st == BoxStatus.BACKEND_ERROR and err:
                text = f"{text}: {err}"
            out.append((unc[i], thr[i], bool(ood[i]), str(r.label[i]) if st == BoxStatus.OK else "", sim[i],
                        st if 0 <= st <= 255 else int(BoxStatus.BACKEND_ERROR), text))
    if m < n:
        have = 0 if frame_result is None else len(frame_result.status)
        missing = (math.nan, math.nan, False, "", math.nan, int(BoxStatus.NOT_SCORED),
                   "no OOD result for this box" + ("" if frame_result is None else f" (result has {have} boxes)"))
        out.extend([missing] * (n - m))
    return out


def write_ood_array(header, dets: Detections, frame_result, model: str, backend: str, scorer: str,
                    random_weights: bool) -> bytes:
    """``runa_ood_msgs/OodDetectionArray`` bytes: one entry per input detection, in input order,
    each with the input ``Detection2D`` as it came and :func:`ood_fields`. ``header``: the source
    image's (any object with ``stamp.sec``, ``stamp.nanosec``, ``frame_id``)."""
    o = _Out()
    o.header(header)
    n = len(dets)
    o.count(n)
    for i, f in enumerate(ood_fields(frame_result, n)):
        o.ood_detection(dets, i, f)
    o.string(str(model))
    o.string(str(backend))
    o.string(str(scorer))
    o.buf += b"\x01" if random_weights else b"\x00"
    return bytes(o.buf)


def write_ood_only(header, dets: Detections, frame_result) -> bytes:
    """``vision_msgs/Detection2DArray`` bytes of the input detections flagged OOD (as they came,
    in order)."""
    keep: Sequence[int] = ()
    if frame_result is not None:
        flags = np.asarray(frame_result.is_ood, dtype=bool)
        keep = np.flatnonzero(flags[:len(dets)]).tolist()
    o = _Out()
    o.header(header)
    o.count(len(keep))
    for i in keep:
        o.detection(dets, i)
    return bytes(o.buf)


def write_alert(header, level: int, source: int, reason: str, dets: Optional[Detections] = None,
                frame_result=None, object_indices: Sequence[int] = ()) -> bytes:
    """``runa_ood_msgs/DriverAlert`` bytes; ``objects`` are the input detections at
    ``object_indices`` (out-of-range indices are skipped) with their :func:`ood_fields`."""
    n = 0 if dets is None else len(dets)
    idx = [int(i) for i in object_indices if 0 <= int(i) < n]
    o = _Out()
    o.header(header)
    level, source = int(level), int(source)
    if not (0 <= level <= 255 and 0 <= source <= 255):
        raise ValueError(f"DriverAlert level {level} / source {source}: uint8 fields")
    o.buf += bytes((level, source))
    o.string(str(reason or ""))
    o.count(len(idx))
    fields = ood_fields(frame_result, n) if idx else []
    for i in idx:
        o.ood_detection(dets, i, fields[i])
    return bytes(o.buf)


def write_image_annotations(header, frame_result, indices=None, random_weights: bool = False) -> bytes:
    """``foxglove_msgs/ImageAnnotations`` bytes of ``draw.make_image_annotations`` (the same
    arguments; equal to rclpy's serialization of that message, byte for byte), written from
    ``boxstyle.annotation_items``: every annotation stamped with ``header``'s stamp, per box a 4-point
    ``LINE_LOOP`` outline (no fill) and a label text."""
    outlines, texts = boxstyle.annotation_items(frame_result, indices, random_weights)
    stamp = _STAMP.pack(int(header.stamp.sec), int(header.stamp.nanosec))
    thick, size = float(boxstyle.ANNOTATION_THICKNESS), float(boxstyle.ANNOTATION_FONT_SIZE)
    o = _Out()
    o.count(0)  # circles
    o.count(len(outlines))
    for x1, y1, x2, y2, rgb in outlines:
        o.align(4)
        o.buf += stamp
        o.buf += b"\x02"  # PointsAnnotation.LINE_LOOP
        o.count(4)
        o.align(8)
        o.buf += _OUTLINE.pack(x1, y1, x2, y1, x2, y2, x1, y2, *_rgba(rgb))
        o.count(0)  # outline_colors
        o.align(8)
        o.buf += _FILL_THICKNESS.pack(0.0, 0.0, 0.0, 0.0, thick)
    o.count(len(texts))
    for x, y, text, ink, bg in texts:
        o.align(4)
        o.buf += stamp
        o.align(8)
        o.buf += _XY.pack(x, y)
        o.string(text)
        o.align(8)
        o.buf += _TEXT_TAIL.pack(size, *_rgba(ink), *_rgba(bg))
    return bytes(o.buf)


def _rgba(rgb) -> Tuple[float, float, float, float]:
    return rgb[0] / 255.0, rgb[1] / 255.0, rgb[2] / 255.0, 1.0


_OUTLINE = struct.Struct("<12d")  # 4 corners, outline_color
_FILL_THICKNESS = struct.Struct("<5d")  # fill_color, thickness
_XY = struct.Struct("<2d")
_TEXT_TAIL = struct.Struct("<9d")  # font_size, text_color, background_color


__all__ = ["CdrError", "Header", "Time", "ImageView", "Detections", "header_stamp_ns", "read_image",
           "read_compressed", "read_detections", "ood_fields", "write_ood_array", "write_ood_only", "write_alert",
           "write_image_annotations"]
