"""Message <-> array conversion for runa_ood_node (no cv_bridge).

Images
------
:func:`image_to_rgb` turns a ``sensor_msgs/Image`` into the ``HxWx3 uint8 RGB`` array that core
expects; :func:`compressed_to_rgb` does the same for ``sensor_msgs/CompressedImage``. Both honour
``step`` (padded rows), ``is_bigendian`` (16-bit) and validate sizes; every problem raises
:class:`ImageConversionError` whose ``reason`` is one of :data:`REASONS`, so a node can count drops
per reason in its diagnostics and never crash on a bad frame.

Supported ``sensor_msgs/Image`` encodings (:data:`ENCODINGS`)::

    rgb8  bgr8  rgba8  bgra8  mono8  mono16        (sensor_msgs/image_encodings names)
    8UC1 = mono8   8UC3 = bgr8   8UC4 = bgra8   16UC1 = mono16   (OpenCV-style aliases)
    yuv422 (UYVY)  yuv422_yuy2 (YUYV)              (common USB camera outputs; width must be even)

16-bit images (mono16 / 16UC1) become 8-bit grey for the model. ``mono16_scale`` chooses how:

* ``"max"`` (default): ``round(v * 255 / max(frame))`` per frame, so 10/12-bit sensors in 16-bit
  containers and thermal cameras use the whole 8-bit range (an all-zero frame stays zero). The
  mapping changes from frame to frame with the frame's maximum.
* ``"shift"``: ``v >> 8``, a fixed mapping of the full 0..65535 range (dark for < 16-bit sensors).

**One reader.** These functions are the only code in the package that turns image and detection
messages into arrays: the node, offline bag evaluation (``tools.bagio.iter_frames``), the demo and
every batch tool call them. The image readers are duck-typed: :class:`ros.wire.ImageView` (what
the node and the bag tools read from the bytes), rclpy messages and ``rosbags`` messages alike
(``data`` may be ``array.array``, ``bytes``, a ``memoryview`` or a NumPy ``uint8`` array; only the
field names matter). Trailing bytes beyond ``height * step`` are ignored; the last row may omit its
padding (only ``(height-1)*step + width*bytes_per_pixel`` bytes are required).

**Pixel cap (decompression bombs).** Both readers refuse an image larger than ``max_pixels``
(default :data:`DEFAULT_MAX_IMAGE_PIXELS` = 4096 x 4096, the node's ``max_image_pixels``) with reason
``too_large`` **before** allocating or decoding anything: a raw ``Image`` from its declared
``height x width``; a ``CompressedImage`` from its JPEG (SOFn marker) or PNG (IHDR) header, parsed
here without decoding (:func:`compressed_image_size`; OpenCV has no header-only API). Compressed
payloads that are neither JPEG nor PNG are refused (``unsupported_encoding``): their size cannot be
checked before decoding.

Detections and outputs
----------------------
``vision_msgs/Detection2D`` boxes are ``bbox.center.position.{x,y}`` (pixels), ``bbox.center.theta``
(radians) and ``size_x``/``size_y`` (pixels): centre-size in original image pixels. A rotated box
(theta != 0) is replaced by its axis-aligned envelope. Hypotheses are
``results[i].hypothesis.class_id`` (string) and ``.score``. :func:`detections_to_arrays` reads
them with :func:`ros.wire.read_detections`, the one detections reader; the outputs that embed
detections (``OodDetectionArray``, the OOD-only ``Detection2DArray``, object alerts) are written
as bytes by :mod:`ros.wire` too.

Every builder copies the header it is given (stamp and frame_id of the source image) into its
output; nothing here ever stamps with ``now()``. Message classes are imported lazily, so the
readers work without a sourced ROS environment (offline bag tools).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import numpy as np


#: Reason codes carried by :class:`ImageConversionError`.
REASONS = (
    "empty",                 # width, height or data size is zero
    "unsupported_encoding",  # Image.encoding / CompressedImage.format not handled here
    "bad_step",              # step < width * bytes_per_pixel
    "truncated",             # fewer data bytes than height * step requires
    "bad_size",              # size impossible for the encoding (e.g. odd width for yuv422)
    "decode_failed",         # JPEG/PNG payload could not be decoded
    "bad_array",             # (writers) array shape/dtype does not fit the encoding
    "too_large",             # more pixels than the cap (declared size or compressed header)
)

#: Default pixel cap of the readers (the node's ``max_image_pixels``): 4096 x 4096 = 16.8 MP,
#: above the 8-12 MP of automotive cameras, far below what a hostile header can declare.
DEFAULT_MAX_IMAGE_PIXELS = 16_777_216

MONO16_SCALINGS = ("max", "shift")


class ImageConversionError(ValueError):
    """An image message cannot be converted; ``reason`` is one of :data:`REASONS`."""

    def __init__(self, reason: str, detail: str = ""):
        assert reason in REASONS, reason
        self.reason = reason
        self.detail = detail
        super().__init__(f"{reason}: {detail}" if detail else reason)


@dataclass(frozen=True)
class _Enc:
    name: str          # canonical sensor_msgs name
    channels: int      # channels of the array representation
    itemsize: int      # bytes per channel
    kind: str          # rgb | bgr | rgba | bgra | mono | uyvy | yuyv

    @property
    def bytes_per_pixel(self) -> int:
        return self.channels * self.itemsize


_CANON = {
    "rgb8": _Enc("rgb8", 3, 1, "rgb"),
    "bgr8": _Enc("bgr8", 3, 1, "bgr"),
    "rgba8": _Enc("rgba8", 4, 1, "rgba"),
    "bgra8": _Enc("bgra8", 4, 1, "bgra"),
    "mono8": _Enc("mono8", 1, 1, "mono"),
    "mono16": _Enc("mono16", 1, 2, "mono"),
    "yuv422": _Enc("yuv422", 2, 1, "uyvy"),
    "yuv422_yuy2": _Enc("yuv422_yuy2", 2, 1, "yuyv"),
}
_ALIASES = {"8uc1": "mono8", "8uc3": "bgr8", "8uc4": "bgra8", "16uc1": "mono16", "uyvy": "yuv422",
            "yuyv": "yuv422_yuy2", "yuy2": "yuv422_yuy2"}

#: Every accepted ``Image.encoding`` (case-insensitive).
ENCODINGS = tuple(sorted(set(_CANON) | {"8UC1", "8UC3", "8UC4", "16UC1"} | {"yuyv", "uyvy", "yuy2"}))


def _encoding(name: str) -> _Enc:
    key = (name or "").strip().lower()
    key = _ALIASES.get(key, key)
    enc = _CANON.get(key)
    if enc is None:
        raise ImageConversionError("unsupported_encoding", f"image encoding {name!r}")
    return enc


def _check_pixels(width: int, height: int, max_pixels: Optional[int], what: str) -> None:
    """Raise ``too_large`` when ``width * height`` exceeds ``max_pixels`` (None = no cap)."""
    if max_pixels is not None and int(width) * int(height) > int(max_pixels):
        raise ImageConversionError(
            "too_large", f"{what} declares {width}x{height} = {int(width) * int(height)} pixels > "
                         f"max_image_pixels {int(max_pixels)}")


def _bytes_of(data) -> np.ndarray:
    """``data`` (array.array / bytes / memoryview / ndarray / list) as a flat uint8 array."""
    try:
        return np.frombuffer(data, dtype=np.uint8)
    except (TypeError, ValueError, BufferError):
        return np.asarray(data, dtype=np.uint8).reshape(-1)


def _to8(gray16: np.ndarray, mono16_scale: str) -> np.ndarray:
    """uint16 -> uint8 (see the module docstring for ``max`` and ``shift``)."""
    if mono16_scale == "shift":
        return (gray16 >> 8).astype(np.uint8)
    if mono16_scale != "max":
        raise ValueError(f"mono16_scale must be one of {MONO16_SCALINGS}, got {mono16_scale!r}")
    peak = int(gray16.max()) if gray16.size else 0
    if peak == 0:
        return np.zeros(gray16.shape, np.uint8)
    out = gray16.astype(np.float32) * np.float32(255.0 / peak) + np.float32(0.5)
    return np.minimum(out, 255.0).astype(np.uint8)


def _gray_to_rgb(gray: np.ndarray) -> np.ndarray:
    return np.repeat(gray[:, :, None], 3, axis=2)


def image_to_rgb(msg, mono16_scale: str = "max", copy: bool = True,
                 max_pixels: Optional[int] = DEFAULT_MAX_IMAGE_PIXELS) -> np.ndarray:
    """``sensor_msgs/Image`` -> ``HxWx3 uint8 RGB`` array.

    Args:
        msg: the image message (rclpy or rosbags; duck-typed).
        mono16_scale: ``"max"`` or ``"shift"``, 16-bit -> 8-bit mapping (module docstring).
        copy: True (default): always a new array, never a view of ``msg.data``. False: an
            unpadded ``rgb8`` image (the common camera case) comes back as a zero-copy,
            read-only view that keeps ``msg.data`` alive; every other case still copies.
        max_pixels: refuse images whose declared ``height * width`` exceeds this, before any
            allocation (None = no cap).

    Raises:
        ImageConversionError: reason ``empty``, ``too_large``, ``unsupported_encoding``,
            ``bad_step``, ``truncated`` or ``bad_size``.
    """
    h, w, step = int(msg.height), int(msg.width), int(msg.step)
    if h <= 0 or w <= 0:
        raise ImageConversionError("empty", f"image is {w}x{h}")
    _check_pixels(w, h, max_pixels, "image")
    enc = _encoding(msg.encoding)
    row_bytes = w * enc.bytes_per_pixel
    if step < row_bytes:
        raise ImageConversionError(
            "bad_step", f"step {step} < width {w} x {enc.bytes_per_pixel} B/px = {row_bytes}")
    if enc.kind in ("uyvy", "yuyv") and w % 2:
        raise ImageConversionError("bad_size", f"{enc.name} needs an even width, got {w}")
    buf = _bytes_of(msg.data)
    need = (h - 1) * step + row_bytes
    if buf.size < need:
        raise ImageConversionError(
            "truncated", f"{buf.size} data bytes < {need} for {w}x{h} {enc.name}, step {step}")

    # rows without padding: a (h, row_bytes) view with stride `step` (no copy yet); every branch
    # below makes exactly one new array (unless copy=False allows the read-only rgb8 view).
    if step == row_bytes:  # unpadded (the common camera case): a plain reshape, far cheaper than as_strided
        rows = buf[:h * row_bytes].reshape(h, row_bytes)
        rows.flags.writeable = False
    else:
        rows = np.lib.stride_tricks.as_strided(buf, shape=(h, row_bytes), strides=(step, 1), writeable=False)
    if enc.itemsize == 2:
        big = bool(getattr(msg, "is_bigendian", False))
        gray16 = np.array(rows).view(">u2" if big else "<u2").reshape(h, w).astype(np.uint16)
        return _gray_to_rgb(_to8(gray16, mono16_scale))
    px = rows.reshape(h, w, enc.channels)
    if enc.kind == "rgb":
        return px if (not copy and step == row_bytes) else np.array(px)
    if enc.kind == "bgr":
        return np.ascontiguousarray(px[:, :, ::-1])
    if enc.kind == "rgba":
        return np.ascontiguousarray(px[:, :, :3])
    if enc.kind == "bgra":
        return np.ascontiguousarray(px[:, :, 2::-1])
    if enc.kind == "mono":
        return _gray_to_rgb(px[:, :, 0])
    import cv2

    code = cv2.COLOR_YUV2RGB_UYVY if enc.kind == "uyvy" else cv2.COLOR_YUV2RGB_YUY2
    return cv2.cvtColor(np.ascontiguousarray(px), code)


_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
#: JPEG start-of-frame markers (SOF0..SOF15 except DHT C4, JPG C8, DAC CC): they carry the size
_JPEG_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}


def compressed_image_size(data) -> Tuple[str, int, int]:
    """``(kind, width, height)`` of a JPEG or PNG payload, read from its header without decoding.

    PNG: the IHDR chunk that must follow the signature. JPEG: the segments after SOI are walked
    by their lengths (APPn / EXIF thumbnails are skipped whole) up to the first start-of-scan;
    every SOFn frame header on the way is read and the largest size is returned.

    Raises:
        ImageConversionError: ``unsupported_encoding`` (neither a JPEG nor a PNG signature) or
            ``decode_failed`` (a truncated or malformed header, or a JPEG without a frame header
            or with height 0, whose real size only a full decode would tell).
    """
    buf = _bytes_of(data)
    head = bytes(buf[:8])
    if head == _PNG_SIGNATURE:
        if buf.size < 24 or bytes(buf[12:16]) != b"IHDR":
            raise ImageConversionError("decode_failed", "PNG without an IHDR chunk")
        w = int.from_bytes(bytes(buf[16:20]), "big")
        h = int.from_bytes(bytes(buf[20:24]), "big")
        if w <= 0 or h <= 0:
            raise ImageConversionError("decode_failed", f"PNG header declares {w}x{h}")
        return "png", w, h
    if head[:2] != b"\xff\xd8":
        raise ImageConversionError("unsupported_encoding",
                                   "payload is neither JPEG nor PNG (its size cannot be checked before decoding)")
    b = buf.tobytes()  # one copy of the payload: bytes.find walks it at C speed
    n, i = len(b), 2
    best: Optional[Tuple[int, int]] = None
    while True:
        i = b.find(b"\xff", i)  # skips garbage between segments (libjpeg tolerates it too)
        if i < 0:
            break
        while i < n and b[i] == 0xFF:  # fill bytes
            i += 1
        if i >= n:
            break
        marker = b[i]
        i += 1
        if marker == 0xD8 or marker == 0x01 or 0xD0 <= marker <= 0xD7:  # SOI, TEM, RSTn: no length
            continue
        if marker in (0xD9, 0xDA):  # EOI, SOS: no frame header after this point
            break
        if marker == 0x00 or i + 2 > n:  # a stuffed byte outside a scan: malformed; or truncated
            break
        length = (b[i] << 8) | b[i + 1]
        if length < 2:
            raise ImageConversionError("decode_failed", f"JPEG segment 0x{marker:02X} has length {length}")
        if marker in _JPEG_SOF:
            if i + 7 > n:
                break
            h = (b[i + 3] << 8) | b[i + 4]
            w = (b[i + 5] << 8) | b[i + 6]
            if h == 0 or w == 0:
                raise ImageConversionError("decode_failed", f"JPEG frame header declares {w}x{h}")
            if best is None or w * h > best[0] * best[1]:
                best = (w, h)
        i += length
    if best is None:
        raise ImageConversionError("decode_failed", "JPEG without a frame header (SOFn) before its scan data")
    return "jpeg", best[0], best[1]


def compressed_to_rgb(msg, mono16_scale: str = "max",
                      max_pixels: Optional[int] = DEFAULT_MAX_IMAGE_PIXELS) -> np.ndarray:
    """``sensor_msgs/CompressedImage`` (JPEG or PNG) -> new ``HxWx3 uint8 RGB`` array.

    ``format`` follows image_transport: ``"jpeg"``, ``"png"``, ``"rgb8; jpeg compressed bgr8"``,
    ``"16UC1; compressedDepth png"`` (its 12-byte depth header is skipped), or empty (the payload
    is sniffed). Decoded colour payloads are BGR(A), as image_transport writes them; grey and
    16-bit payloads are handled like mono8 / mono16. The size in the payload's header is checked
    against ``max_pixels`` (None = no cap) before decoding.

    Raises:
        ImageConversionError: reason ``empty``, ``unsupported_encoding`` (e.g. ``h264``, or a
            payload that is neither JPEG nor PNG), ``too_large`` or ``decode_failed``.
    """
    import cv2

    fmt = (getattr(msg, "format", "") or "").strip().lower()
    buf = _bytes_of(msg.data)
    if buf.size == 0:
        raise ImageConversionError("empty", "compressed image has no data")
    if "compresseddepth" in fmt:
        buf = buf[12:]  # compressed_depth_image_transport ConfigHeader (format + 2 float32)
    elif fmt and not any(tok in fmt for tok in ("jpeg", "jpg", "png")):
        raise ImageConversionError("unsupported_encoding", f"compressed format {fmt!r}")
    kind, w, h = compressed_image_size(buf)
    _check_pixels(w, h, max_pixels, f"{kind} header")
    try:
        img = cv2.imdecode(buf, cv2.IMREAD_UNCHANGED)
    except cv2.error as exc:
        raise ImageConversionError("decode_failed", str(exc).strip().splitlines()[-1]) from exc
    if img is None or img.size == 0:
        raise ImageConversionError("decode_failed", f"{buf.size} bytes, format {fmt!r}")
    _check_pixels(img.shape[1], img.shape[0], max_pixels, f"decoded {kind}")  # a header that lied
    if img.dtype == np.uint16:
        img = _to8(img, mono16_scale)
    elif img.dtype != np.uint8:
        raise ImageConversionError("decode_failed", f"unexpected decoded dtype {img.dtype}")
    if img.ndim == 2:
        return _gray_to_rgb(img)
    if img.shape[2] == 1:
        return _gray_to_rgb(img[:, :, 0])
    if img.shape[2] == 3:
        return np.ascontiguousarray(img[:, :, ::-1])
    return np.ascontiguousarray(img[:, :, 2::-1])


# --------------------------------------------------------------------------------------------
# message classes (lazy: the readers above work without ROS)


def _msg(module: str, name: str):
    """rclpy's message class ``module/msg/name``."""
    import importlib

    return getattr(importlib.import_module(module + ".msg"), name)


def copy_header(header=None):
    """A new ``std_msgs/Header`` with ``header``'s stamp and frame_id (a default one if None).

    Outputs get their own copy so that mutating one never changes another."""
    Header, Time = _msg("std_msgs", "Header"), _msg("builtin_interfaces", "Time")
    if header is None:
        return Header(stamp=Time(sec=0, nanosec=0), frame_id="")
    return Header(stamp=Time(sec=int(header.stamp.sec), nanosec=int(header.stamp.nanosec)),
                  frame_id=str(header.frame_id))


def stamp_to_ns(stamp) -> int:
    """``builtin_interfaces/Time`` -> integer nanoseconds since the epoch."""
    return int(stamp.sec) * 1_000_000_000 + int(stamp.nanosec)


def ns_to_stamp(ns: int):
    """Integer nanoseconds -> ``builtin_interfaces/Time`` (sec may be negative, nanosec >= 0)."""
    Time = _msg("builtin_interfaces", "Time")
    sec, nsec = divmod(int(ns), 1_000_000_000)
    return Time(sec=sec, nanosec=nsec)


# --------------------------------------------------------------------------------------------
# image writers


def array_to_image(arr: np.ndarray, encoding: str, header=None, step: Optional[int] = None,
                   bigendian: bool = False):
    """An array already in ``encoding``'s layout -> ``sensor_msgs/Image`` (tests, bag writing).

    Args:
        arr: ``HxWxC`` (or ``HxW`` for 1 channel) ``uint8`` array, ``uint16`` for mono16/16UC1;
            channel order as the encoding says (e.g. BGR for bgr8, ``HxWx2`` bytes for yuv422).
        encoding: any of :data:`ENCODINGS`; written to the message as given.
        header: copied into the message (stamp and frame_id).
        step: row length in bytes; default ``width * bytes_per_pixel``; larger values pad each
            row with zero bytes.
        bigendian: 16-bit only: write big-endian samples and set ``is_bigendian``.

    Raises:
        ImageConversionError: ``unsupported_encoding``, ``bad_array``, ``bad_step`` or ``empty``.
    """
    enc = _encoding(encoding)
    a = np.asarray(arr)
    if a.ndim == 2 and enc.channels == 1:
        a = a[:, :, None]
    if a.ndim != 3 or a.shape[2] != enc.channels:
        raise ImageConversionError(
            "bad_array", f"{enc.name} needs HxWx{enc.channels}, got shape {np.shape(arr)}")
    want = np.uint16 if enc.itemsize == 2 else np.uint8
    if a.dtype != want:
        raise ImageConversionError("bad_array", f"{enc.name} needs {np.dtype(want)}, got {a.dtype}")
    h, w = int(a.shape[0]), int(a.shape[1])
    if h == 0 or w == 0:
        raise ImageConversionError("empty", f"array is {w}x{h}")
    row_bytes = w * enc.bytes_per_pixel
    step = row_bytes if step is None else int(step)
    if step < row_bytes:
        raise ImageConversionError("bad_step", f"step {step} < {row_bytes}")
    if enc.itemsize == 2:
        raw = a.astype(">u2" if bigendian else "<u2").view(np.uint8).reshape(h, row_bytes)
    else:
        raw = a.reshape(h, row_bytes)
    if step != row_bytes:
        padded = np.zeros((h, step), np.uint8)
        padded[:, :row_bytes] = raw
        raw = padded
    import array as _array

    Image = _msg("sensor_msgs", "Image")
    msg = Image()
    msg.header = copy_header(header)
    msg.height, msg.width, msg.step = h, w, step
    msg.encoding = encoding
    msg.is_bigendian = 1 if (bigendian and enc.itemsize == 2) else 0
    msg.data = _array.array("B", np.ascontiguousarray(raw).tobytes())
    return msg


def _check_rgb(rgb: np.ndarray) -> np.ndarray:
    a = np.asarray(rgb)
    if a.ndim != 3 or a.shape[2] != 3 or a.dtype != np.uint8:
        raise ImageConversionError(
            "bad_array", f"need HxWx3 uint8 RGB, got shape {a.shape} dtype {a.dtype}")
    return a


def rgb_to_image(rgb: np.ndarray, header=None, encoding: str = "rgb8", step: Optional[int] = None):
    """``HxWx3 uint8 RGB`` -> ``sensor_msgs/Image`` in ``encoding``.

    ``encoding`` may be rgb8, bgr8 (8UC3), rgba8, bgra8 (alpha 255), mono8 (8UC1; ITU-R BT.601
    luma) or mono16 (16UC1; luma x 257, so ``shift`` reads it back exactly).
    """
    import cv2

    a = _check_rgb(rgb)
    enc = _encoding(encoding)
    if enc.kind == "rgb":
        out = a
    elif enc.kind == "bgr":
        out = a[:, :, ::-1]
    elif enc.kind in ("rgba", "bgra"):
        out = np.concatenate([a if enc.kind == "rgba" else a[:, :, ::-1],
                              np.full(a.shape[:2] + (1,), 255, np.uint8)], axis=2)
    elif enc.kind == "mono":
        gray = cv2.cvtColor(np.ascontiguousarray(a), cv2.COLOR_RGB2GRAY)
        out = gray if enc.itemsize == 1 else gray.astype(np.uint16) * np.uint16(257)
    else:
        raise ImageConversionError("unsupported_encoding", f"cannot write {encoding!r} from RGB")
    return array_to_image(np.ascontiguousarray(out), encoding, header=header, step=step)


def rgb_to_compressed(rgb: np.ndarray, header=None, fmt: str = "jpeg", quality: int = 90):
    """``HxWx3 uint8 RGB`` -> ``sensor_msgs/CompressedImage`` (image_transport conventions).

    Args:
        fmt: ``"jpeg"`` (or ``"jpg"``) or ``"png"``; the message format is then
            ``"rgb8; jpeg compressed bgr8"`` / ``"rgb8; png compressed bgr8"``.
        quality: JPEG quality 1..100 (ignored for PNG).
    """
    import array as _array

    import cv2

    a = _check_rgb(rgb)
    f = fmt.strip().lower()
    if f in ("jpeg", "jpg"):
        ok, enc = cv2.imencode(".jpg", np.ascontiguousarray(a[:, :, ::-1]),
                               [int(cv2.IMWRITE_JPEG_QUALITY), int(quality)])
        name = "jpeg"
    elif f == "png":
        ok, enc = cv2.imencode(".png", np.ascontiguousarray(a[:, :, ::-1]))
        name = "png"
    else:
        raise ImageConversionError("unsupported_encoding", f"compressed format {fmt!r}")
    if not ok:
        raise ImageConversionError("decode_failed", f"cv2.imencode({name}) failed")
    CompressedImage = _msg("sensor_msgs", "CompressedImage")
    msg = CompressedImage()
    msg.header = copy_header(header)
    msg.format = f"rgb8; {name} compressed bgr8"
    msg.data = _array.array("B", enc.tobytes())
    return msg


# --------------------------------------------------------------------------------------------
# detections


def detections_to_arrays(msg) -> Tuple[np.ndarray, np.ndarray, List[str], List[str]]:
    """``vision_msgs/Detection2DArray`` -> ``(boxes_cxcywh, scores, class_ids, ids)`` in input order.

    ``msg``: the CDR bytes (as the node receives them and a bag stores them) or a message (rclpy or
    ``rosbags``), serialized first: every path goes through the one reader,
    :func:`ros.wire.read_detections`, whose :class:`ros.wire.Detections` documents the arrays
    (rotated boxes become their axis-aligned envelope, the best hypothesis gives score and
    class_id, values beyond float32 become +-inf silently). Raises ``msgdefs.CdrError`` for
    bytes that are no such message.
    """
    from . import wire

    return wire.read_detections(_detections_bytes(msg)).arrays()


def _detections_bytes(msg):
    if isinstance(msg, (bytes, bytearray, memoryview)):
        return msg
    if hasattr(type(msg), "get_fields_and_field_types"):  # rclpy
        from rclpy.serialization import serialize_message

        return serialize_message(msg)
    from . import msgdefs

    return msgdefs.encode(msg, "vision_msgs/msg/Detection2DArray")


def boxes_to_detections(header, boxes_xyxy, class_ids: Optional[Sequence[str]] = None,
                        scores: Optional[Sequence[float]] = None,
                        ids: Optional[Sequence[str]] = None):
    """xyxy boxes (image pixels) -> ``vision_msgs/Detection2DArray`` (detector side, tests, bags).

    Each ``Detection2D`` gets a copy of ``header``, an axis-aligned bbox (theta 0) and, when
    ``class_ids`` or ``scores`` are given, one hypothesis (class_id "" or score 1.0 fill the one
    missing). ``ids`` default to ``"0", "1", ...``.
    """
    Detection2DArray = _msg("vision_msgs", "Detection2DArray")
    Detection2D = _msg("vision_msgs", "Detection2D")
    Hyp = _msg("vision_msgs", "ObjectHypothesisWithPose")
    b = np.asarray(boxes_xyxy, dtype=np.float64).reshape(-1, 4)
    n = b.shape[0]
    for name, seq in (("class_ids", class_ids), ("scores", scores), ("ids", ids)):
        if seq is not None and len(seq) != n:
            raise ValueError(f"{name} has {len(seq)} entries for {n} boxes")
    out = Detection2DArray()
    out.header = copy_header(header)
    for i in range(n):
        x1, y1, x2, y2 = (float(v) for v in b[i])
        d = Detection2D()
        d.header = copy_header(header)
        d.bbox.center.position.x = (x1 + x2) / 2.0
        d.bbox.center.position.y = (y1 + y2) / 2.0
        d.bbox.center.theta = 0.0
        d.bbox.size_x = x2 - x1
        d.bbox.size_y = y2 - y1
        if class_ids is not None or scores is not None:
            hyp = Hyp()
            hyp.hypothesis.class_id = str(class_ids[i]) if class_ids is not None else ""
            hyp.hypothesis.score = float(scores[i]) if scores is not None else 1.0
            d.results.append(hyp)
        d.id = str(ids[i]) if ids is not None else str(i)
        out.detections.append(d)
    return out


# --------------------------------------------------------------------------------------------
# OOD outputs


def to_health_alert(header, level: int, reason: str):
    """``runa_ood_msgs/DriverAlert`` of the monitor's own health (``SOURCE_MONITOR_HEALTH``, no
    objects) as an rclpy message (the node re-stamps and re-publishes it as a heartbeat). The
    outputs that embed detections are written as bytes by :mod:`ros.wire`."""
    DriverAlert = _msg("runa_ood_msgs", "DriverAlert")
    return DriverAlert(header=copy_header(header), level=int(level), source=DriverAlert.SOURCE_MONITOR_HEALTH,
                       reason=str(reason or ""), objects=[])


def to_label_info(header, labels: Sequence[str], threshold: float = float("nan")):
    """``vision_msgs/LabelInfo`` for the ID label set: class_id = index, class_name = label.

    ``threshold`` is the global OOD threshold (an uncertainty, not a [0,1] confidence; NaN when
    uncalibrated), published for reference.
    """
    LabelInfo = _msg("vision_msgs", "LabelInfo")
    VisionClass = _msg("vision_msgs", "VisionClass")
    if len(labels) > 65535:
        raise ValueError("LabelInfo holds at most 65535 classes (uint16; 65535 = UNLABELED)")
    out = LabelInfo()
    out.header = copy_header(header)
    out.class_map = [VisionClass(class_id=i, class_name=str(name)) for i, name in enumerate(labels)]
    out.threshold = float(threshold)
    return out


__all__ = [
    "ENCODINGS", "REASONS", "MONO16_SCALINGS", "DEFAULT_MAX_IMAGE_PIXELS", "ImageConversionError",
    "image_to_rgb", "compressed_to_rgb", "compressed_image_size", "array_to_image", "rgb_to_image", "rgb_to_compressed", "copy_header",
    "stamp_to_ns", "ns_to_stamp", "detections_to_arrays", "boxes_to_detections", "to_health_alert",
    "to_label_info",
]
