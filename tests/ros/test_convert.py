"""runa_ood_node.ros.convert: images (every encoding, padded rows, big-endian, bad data),
compressed images, detections (through ros.wire's reader) and label info. The OOD output messages
are ros.wire's: tests/test_wire.py."""
import math

import numpy as np
import pytest

pytest.importorskip("sensor_msgs.msg")
vision_msg = pytest.importorskip("vision_msgs.msg", reason="build ros2_ws (scripts/setup.sh) and source scripts/env.sh")
runa_msg = pytest.importorskip("runa_ood_msgs.msg", reason="build ros2_ws (scripts/setup.sh) and source scripts/env.sh")

import cv2  # noqa: E402
from sensor_msgs.msg import CompressedImage, Image  # noqa: E402
from std_msgs.msg import Header  # noqa: E402

from runa_ood_node.core.boxes import BoxStatus  # noqa: E402
from runa_ood_node.ros import convert as C  # noqa: E402


@pytest.fixture(scope="module")
def rgb():
    rng = np.random.default_rng(1)
    return rng.integers(0, 256, (7, 11, 3), dtype=np.uint8)  # odd sizes catch stride bugs


def _hdr(sec=1700000000, nsec=123456789, frame="camera_optical"):
    h = Header()
    h.stamp.sec, h.stamp.nanosec, h.frame_id = sec, nsec, frame
    return h


def _gray601(rgb):
    return cv2.cvtColor(np.ascontiguousarray(rgb), cv2.COLOR_RGB2GRAY)


# ----------------------------------------------------------------------------------------- images


@pytest.mark.parametrize("encoding", ["rgb8", "bgr8", "rgba8", "bgra8", "8UC3", "8UC4"])
@pytest.mark.parametrize("pad", [0, 5])
def test_colour_encodings_roundtrip_exactly(rgb, encoding, pad):
    bpp = C._encoding(encoding).bytes_per_pixel
    msg = C.rgb_to_image(rgb, _hdr(), encoding=encoding, step=rgb.shape[1] * bpp + pad)
    assert msg.step == rgb.shape[1] * bpp + pad and len(msg.data) == msg.step * msg.height
    out = C.image_to_rgb(msg)
    assert out.dtype == np.uint8 and out.shape == rgb.shape and out.flags.c_contiguous
    np.testing.assert_array_equal(out, rgb)


@pytest.mark.parametrize("encoding", ["mono8", "8UC1"])
def test_mono8_roundtrip(rgb, encoding):
    msg = C.rgb_to_image(rgb, encoding=encoding, step=rgb.shape[1] + 3)
    out = C.image_to_rgb(msg)
    g = _gray601(rgb)
    for c in range(3):
        np.testing.assert_array_equal(out[:, :, c], g)


@pytest.mark.parametrize("encoding", ["mono16", "16UC1"])
@pytest.mark.parametrize("bigendian", [False, True])
def test_mono16_roundtrip_padded_and_endianness(rgb, encoding, bigendian):
    msg = C.rgb_to_image(rgb, encoding=encoding, step=rgb.shape[1] * 2 + 4)
    if bigendian:
        gray16 = _gray601(rgb).astype(np.uint16) * 257
        msg = C.array_to_image(gray16, encoding, step=rgb.shape[1] * 2 + 4, bigendian=True)
        assert msg.is_bigendian == 1
    np.testing.assert_array_equal(C.image_to_rgb(msg, mono16_scale="shift")[:, :, 0], _gray601(rgb))


def test_bigendian_bytes_are_really_swapped():
    arr = np.array([[0x0102, 0xA0B0]], np.uint16)
    be = C.array_to_image(arr, "mono16", bigendian=True)
    le = C.array_to_image(arr, "mono16")
    assert bytes(be.data) == b"\x01\x02\xa0\xb0" and bytes(le.data) == b"\x02\x01\xb0\xa0"
    for m in (be, le):  # both decode to 0x01 and 0xA0 (high bytes)
        assert C.image_to_rgb(m, mono16_scale="shift")[0, :, 0].tolist() == [0x01, 0xA0]


def test_mono16_max_scaling_uses_full_range():
    arr = np.array([[0, 1000, 2000, 4000]], np.uint16)  # a 12-bit sensor
    out = C.image_to_rgb(C.array_to_image(arr, "16UC1"))[0, :, 0]
    assert out.tolist() == [0, 64, 128, 255]  # round(v * 255 / 4000)
    assert C.image_to_rgb(C.array_to_image(arr, "16UC1"), mono16_scale="shift")[0, :, 0].tolist() == [0, 3, 7, 15]
    zeros = C.image_to_rgb(C.array_to_image(np.zeros((2, 2), np.uint16), "mono16"))
    assert zeros.max() == 0
    with pytest.raises(ValueError):
        C.image_to_rgb(C.array_to_image(arr, "16UC1"), mono16_scale="log")


def test_hand_built_padded_bgr8_message():
    """Bytes written by hand (not by our writer): 2x2 bgr8, step 8, padding filled with 0xEE."""
    m = Image(height=2, width=2, encoding="bgr8", step=8)
    m.data = bytes([1, 2, 3, 4, 5, 6, 0xEE, 0xEE,
                    7, 8, 9, 10, 11, 12, 0xEE, 0xEE])
    out = C.image_to_rgb(m)
    assert out.tolist() == [[[3, 2, 1], [6, 5, 4]], [[9, 8, 7], [12, 11, 10]]]


def test_last_row_may_omit_padding_and_extra_bytes_are_ignored():
    m = Image(height=2, width=1, encoding="mono8", step=4)
    m.data = bytes([10, 0, 0, 0, 20])  # 5 bytes: last row without its padding
    assert C.image_to_rgb(m)[:, 0, 0].tolist() == [10, 20]
    m.data = bytes([10, 0, 0, 0, 20, 0, 0, 0, 99, 99])
    assert C.image_to_rgb(m)[:, 0, 0].tolist() == [10, 20]


def test_result_never_aliases_message_buffer(rgb):
    msg = C.rgb_to_image(rgb)
    out = C.image_to_rgb(msg)
    out[:] = 0
    np.testing.assert_array_equal(C.image_to_rgb(msg), rgb)


def test_yuv422_uyvy_and_yuyv_byte_order():
    # neutral chroma, two luma values: UYVY = U Y0 V Y1, YUYV = Y0 U Y1 V
    for enc, data in (("yuv422", [128, 50, 128, 200]), ("yuv422_yuy2", [50, 128, 200, 128])):
        m = Image(height=1, width=2, encoding=enc, step=4)
        m.data = bytes(data)
        out = C.image_to_rgb(m).astype(int)
        assert out.shape == (1, 2, 3)
        assert np.ptp(out[0, 0]) <= 2 and np.ptp(out[0, 1]) <= 2, f"{enc}: not grey {out}"  # grey
        assert out[0, 0, 0] < 80 < 170 < out[0, 1, 0], out  # pixel 0 dark, pixel 1 bright


@pytest.mark.parametrize("kwargs, reason", [
    (dict(height=0, width=4, encoding="rgb8", step=12, data=b""), "empty"),
    (dict(height=4, width=0, encoding="rgb8", step=0, data=b""), "empty"),
    (dict(height=2, width=2, encoding="rgb8", step=5, data=bytes(12)), "bad_step"),
    (dict(height=2, width=2, encoding="mono16", step=3, data=bytes(8)), "bad_step"),
    (dict(height=2, width=2, encoding="rgb8", step=6, data=bytes(11)), "truncated"),
    (dict(height=2, width=2, encoding="rgb8", step=8, data=bytes(13)), "truncated"),
    (dict(height=2, width=2, encoding="rgb8", step=6, data=b""), "truncated"),
    (dict(height=2, width=2, encoding="bayer_rggb8", step=2, data=bytes(4)), "unsupported_encoding"),
    (dict(height=2, width=2, encoding="32FC1", step=8, data=bytes(16)), "unsupported_encoding"),
    (dict(height=2, width=2, encoding="", step=6, data=bytes(12)), "unsupported_encoding"),
    (dict(height=1, width=3, encoding="yuv422", step=6, data=bytes(6)), "bad_size"),
])
def test_bad_images_raise_with_reason(kwargs, reason):
    m = Image(height=kwargs["height"], width=kwargs["width"], encoding=kwargs["encoding"], step=kwargs["step"])
    m.data = kwargs["data"]
    with pytest.raises(C.ImageConversionError) as ei:
        C.image_to_rgb(m)
    assert ei.value.reason == reason
    assert isinstance(ei.value, ValueError) and reason in str(ei.value)


def test_rosbags_image_messages_are_accepted(rgb):
    """Offline tools hand in rosbags dataclasses whose data is a NumPy array."""
    from runa_ood_node.ros import msgdefs

    store = msgdefs.typestore()
    msg = C.rgb_to_image(rgb, encoding="bgr8", step=rgb.shape[1] * 3 + 2)
    from rclpy.serialization import serialize_message

    rb = store.deserialize_cdr(bytes(serialize_message(msg)), "sensor_msgs/msg/Image")
    assert isinstance(rb.data, np.ndarray)
    np.testing.assert_array_equal(C.image_to_rgb(rb), rgb)


def test_writer_rejects_wrong_arrays(rgb):
    with pytest.raises(C.ImageConversionError) as ei:
        C.array_to_image(rgb, "mono16")
    assert ei.value.reason == "bad_array"
    with pytest.raises(C.ImageConversionError) as ei:
        C.array_to_image(rgb.astype(np.uint16), "rgb8")
    assert ei.value.reason == "bad_array"
    with pytest.raises(C.ImageConversionError) as ei:
        C.rgb_to_image(rgb, step=5)
    assert ei.value.reason == "bad_step"
    with pytest.raises(C.ImageConversionError) as ei:
        C.rgb_to_image(rgb[:, :, 0])
    assert ei.value.reason == "bad_array"


def test_writer_copies_header_not_now():
    h = _hdr()
    m = C.rgb_to_image(np.zeros((2, 2, 3), np.uint8), h)
    assert (m.header.stamp.sec, m.header.stamp.nanosec, m.header.frame_id) == (1700000000, 123456789,
                                                                                 "camera_optical")
    h.frame_id = "changed"
    assert m.header.frame_id == "camera_optical"  # a copy, not an alias
    assert C.rgb_to_image(np.zeros((2, 2, 3), np.uint8)).header.stamp.sec == 0


# ------------------------------------------------------------------------------------- compressed


@pytest.fixture(scope="module")
def smooth():
    y, x = np.mgrid[0:48, 0:64]
    return np.stack([x * 4, y * 5, (x + y) * 2], axis=2).astype(np.uint8)


def test_png_roundtrip_exact(smooth):
    m = C.rgb_to_compressed(smooth, _hdr(), fmt="png")
    assert m.format == "rgb8; png compressed bgr8" and m.header.frame_id == "camera_optical"
    np.testing.assert_array_equal(C.compressed_to_rgb(m), smooth)


def test_jpeg_roundtrip_close_and_channel_order(smooth):
    m = C.rgb_to_compressed(smooth, fmt="jpeg", quality=95)
    assert m.format == "rgb8; jpeg compressed bgr8"
    out = C.compressed_to_rgb(m)
    assert np.abs(out.astype(int) - smooth.astype(int)).mean() < 3.0
    red = np.zeros((16, 16, 3), np.uint8)
    red[..., 0] = 255
    r = C.compressed_to_rgb(C.rgb_to_compressed(red))
    assert r[..., 0].min() > 200 and r[..., 2].max() < 50  # red stays red (BGR handled)


def test_plain_format_strings_and_sniffing(smooth):
    ok, png = cv2.imencode(".png", smooth[:, :, ::-1])
    for fmt in ("png", "PNG", "bgr8; png compressed bgr8", ""):
        m = CompressedImage(format=fmt)
        m.data = png.tobytes()
        np.testing.assert_array_equal(C.compressed_to_rgb(m), smooth)


def test_grey_and_16bit_png(smooth):
    g = smooth[:, :, 1]
    m = CompressedImage(format="mono8; png compressed mono8")
    m.data = cv2.imencode(".png", g)[1].tobytes()
    out = C.compressed_to_rgb(m)
    for c in range(3):
        np.testing.assert_array_equal(out[:, :, c], g)
    g16 = (g.astype(np.uint16) * 257)
    m16 = CompressedImage(format="16UC1; png compressed")
    m16.data = cv2.imencode(".png", g16)[1].tobytes()
    np.testing.assert_array_equal(C.compressed_to_rgb(m16, mono16_scale="shift")[:, :, 0], g)
    depth = CompressedImage(format="16UC1; compressedDepth png")
    depth.data = bytes(12) + cv2.imencode(".png", g16)[1].tobytes()  # 12-byte ConfigHeader
    np.testing.assert_array_equal(C.compressed_to_rgb(depth, mono16_scale="shift")[:, :, 0], g)


@pytest.mark.parametrize("fmt, data, reason", [
    ("jpeg", b"", "empty"),
    ("jpeg", b"\xff\xd8\xff garbage, not a jpeg", "decode_failed"),
    ("png", b"\x89PNG\r\n\x1a\n" + bytes(20), "decode_failed"),
    ("h264", b"\x00\x00\x00\x01\x67", "unsupported_encoding"),
    ("theora", b"x", "unsupported_encoding"),
])
def test_bad_compressed_raise_with_reason(fmt, data, reason):
    m = CompressedImage(format=fmt)
    m.data = data
    with pytest.raises(C.ImageConversionError) as ei:
        C.compressed_to_rgb(m)
    assert ei.value.reason == reason


def test_truncated_jpeg_fails_or_decodes_partially_but_never_crashes(smooth):
    full = C.rgb_to_compressed(smooth).data
    m = CompressedImage(format="jpeg")
    m.data = bytes(full)[: len(full) // 2]
    try:
        out = C.compressed_to_rgb(m)
        assert out.shape == smooth.shape  # libjpeg may pad a truncated scan with grey
    except C.ImageConversionError as e:
        assert e.reason == "decode_failed"


# ------------------------------------------------------------------------------------- detections


def test_detections_roundtrip_xyxy_to_cxcywh():
    boxes = np.array([[10, 20, 30, 60], [0.5, 1.5, 2.5, 9.5]], np.float32)
    msg = C.boxes_to_detections(_hdr(), boxes, class_ids=["car", "person"], scores=[0.9, 0.25], ids=["a", "b"])
    assert msg.header.frame_id == "camera_optical" and msg.detections[0].header.stamp.nanosec == 123456789
    d = msg.detections[0]
    assert (d.bbox.center.position.x, d.bbox.center.position.y, d.bbox.size_x, d.bbox.size_y) == (20, 40, 20, 40)
    assert d.results[0].hypothesis.class_id == "car"
    b, s, cls, ids = C.detections_to_arrays(msg)
    assert b.dtype == np.float32 and b.shape == (2, 4)
    np.testing.assert_allclose(b, [[20, 40, 20, 40], [1.5, 5.5, 2, 8]])
    np.testing.assert_allclose(s, [0.9, 0.25])
    assert cls == ["car", "person"] and ids == ["a", "b"]


def test_detections_best_hypothesis_missing_and_rotated():
    msg = C.boxes_to_detections(_hdr(), [[0, 0, 10, 4], [0, 0, 1, 1], [0, 0, 2, 2]])
    assert [len(d.results) for d in msg.detections] == [0, 0, 0]
    assert [d.id for d in msg.detections] == ["0", "1", "2"]
    for name, sc in (("cat", 0.2), ("dog", 0.7), ("cow", 0.5)):
        h = vision_msg.ObjectHypothesisWithPose()
        h.hypothesis.class_id, h.hypothesis.score = name, sc
        msg.detections[1].results.append(h)
    msg.detections[0].bbox.center.theta = math.pi / 2  # 10x4 rotated by 90 deg -> 4x10 envelope
    msg.detections[0].bbox.center.position.x = 5.0
    msg.detections[2].bbox.center.position.x = float("nan")
    b, s, cls, _ = C.detections_to_arrays(msg)
    np.testing.assert_allclose(b[0], [5, 2, 4, 10], atol=1e-5)
    assert math.isnan(s[0]) and cls[0] == ""
    assert s[1] == pytest.approx(0.7) and cls[1] == "dog"
    assert math.isnan(b[2, 0]) and not np.isnan(b[2, 1:]).any()  # passed through for core to flag


def test_empty_detection_array():
    b, s, cls, ids = C.detections_to_arrays(vision_msg.Detection2DArray())
    assert b.shape == (0, 4) and s.shape == (0,) and cls == [] and ids == []


def test_boxes_to_detections_length_mismatch():
    with pytest.raises(ValueError, match="class_ids"):
        C.boxes_to_detections(_hdr(), [[0, 0, 1, 1]], class_ids=["a", "b"])


# ------------------------------------------------------------------------------------ headers, labels


def _dets(n=4):
    boxes = np.array([[0, 0, 10, 10], [20, 20, 40, 40], [1, 1, 2, 2], [5, 5, 9, 9]], np.float32)[:n]
    return C.boxes_to_detections(_hdr(frame="det_frame"), boxes, class_ids=["car", "moose", "x", "y"][:n],
                                 scores=[0.9, 0.8, 0.7, 0.6][:n])


def test_label_info_and_stamps():
    li = C.to_label_info(_hdr(), ["car", "person"], threshold=-0.25)
    assert [(c.class_id, c.class_name) for c in li.class_map] == [(0, "car"), (1, "person")]
    assert li.threshold == pytest.approx(-0.25) and li.header.frame_id == "camera_optical"
    assert C.stamp_to_ns(_hdr().stamp) == 1700000000123456789
    for ns in (0, 1, 1700000000123456789, -1):
        assert C.stamp_to_ns(C.ns_to_stamp(ns)) == ns


def test_rgb8_zero_copy_view_only_for_unpadded_rgb8():
    rgb = np.random.default_rng(1).integers(0, 255, (6, 8, 3), dtype=np.uint8)
    msg = C.rgb_to_image(rgb)
    view = C.image_to_rgb(msg, copy=False)
    assert np.array_equal(view, rgb) and not view.flags.writeable
    assert np.shares_memory(view, np.frombuffer(msg.data, np.uint8))  # no copy
    assert not np.shares_memory(C.image_to_rgb(msg), np.frombuffer(msg.data, np.uint8))  # default copies
    padded = C.array_to_image(rgb, "rgb8", step=8 * 3 + 4)
    out = C.image_to_rgb(padded, copy=False)
    assert np.array_equal(out, rgb) and not np.shares_memory(out, np.frombuffer(padded.data, np.uint8))
    bgr = C.array_to_image(rgb[:, :, ::-1].copy(), "bgr8")
    out = C.image_to_rgb(bgr, copy=False)
    assert np.array_equal(out, rgb) and not np.shares_memory(out, np.frombuffer(bgr.data, np.uint8))
    msg.data = msg.data[:-3]  # truncated: reported with its reason, as with copy=True
    with pytest.raises(C.ImageConversionError) as err:
        C.image_to_rgb(msg, copy=False)
    assert err.value.reason == "truncated"


# ------------------------------------------------------------------- hostile sizes (issue 9 item 2)


def _peak_rss_kb():
    import re

    with open("/proc/self/status") as f:
        return int(re.search(r"VmHWM:\s+(\d+)", f.read()).group(1))


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM (Linux >= 4.0)
        return True
    except OSError:
        return False


def _bomb_jpeg(width=20000, height=20000) -> bytes:
    """A tiny real JPEG whose frame header (SOF0) is patched to declare width x height."""
    ok, buf = cv2.imencode(".jpg", np.zeros((8, 8, 3), np.uint8))
    b = bytearray(buf.tobytes())
    i = b.find(b"\xff\xc0")
    b[i + 5:i + 9] = height.to_bytes(2, "big") + width.to_bytes(2, "big")
    return bytes(b)


def _bomb_png(width=20000, height=20000) -> bytes:
    import struct
    import zlib

    ok, buf = cv2.imencode(".png", np.zeros((8, 8), np.uint8))
    b = bytearray(buf.tobytes())
    b[16:24] = struct.pack(">II", width, height)
    b[29:33] = struct.pack(">I", zlib.crc32(bytes(b[12:29])))  # keep the IHDR CRC valid
    return bytes(b)


def _refused_with_python_peak(convert_fn, msg):
    """``convert_fn(msg)`` must raise ImageConversionError: (the error, Python's peak allocation
    in bytes while it ran, from tracemalloc)."""
    import tracemalloc

    tracemalloc.start()
    try:
        with pytest.raises(C.ImageConversionError) as ei:
            convert_fn(msg)
        _, py_peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return ei.value, py_peak


@pytest.mark.parametrize("kind", ["jpeg", "png"])
def test_decompression_bomb_is_refused_from_its_header_without_allocating(kind):
    """A ~630-byte JPEG (or PNG) declaring 20000x20000 used to be decoded in full (3.2 GB RSS).
    It is refused from its header: too_large, and neither Python nor the process allocates."""
    data = _bomb_jpeg() if kind == "jpeg" else _bomb_png()
    assert len(data) < 1000
    assert C.compressed_image_size(data) == (kind, 20000, 20000)
    m = CompressedImage(format=kind)
    m.data = data
    can_measure = _reset_peak_rss()
    rss0 = _peak_rss_kb()
    err, py_peak = _refused_with_python_peak(C.compressed_to_rgb, m)
    assert err.reason == "too_large" and "20000x20000" in str(err)
    assert py_peak < 1_000_000  # bytes: no image buffer was allocated
    if can_measure:
        assert _peak_rss_kb() - rss0 < 50_000  # kB: cv2 did not decode either (1.2 GB if it had)
    # the cap is the caller's: a 20000x20000 header passes a cap that allows it (only checked here,
    # not decoded), and a real small image passes the default cap
    assert C.compressed_image_size(data)[1:] == (20000, 20000)
    small = C.rgb_to_compressed(np.zeros((8, 8, 3), np.uint8), fmt=kind)
    assert C.compressed_to_rgb(small).shape == (8, 8, 3)


def test_raw_image_declaring_a_huge_size_is_refused_before_reading_data():
    """100000 x 100000 declared with a few bytes of data: too_large (checked first), not truncated;
    and the cap is a parameter (max_pixels), None = no cap."""
    m = Image(height=100000, width=100000, encoding="rgb8", step=300000)
    m.data = bytes(16)
    err, py_peak = _refused_with_python_peak(C.image_to_rgb, m)
    assert err.reason == "too_large" and py_peak < 1_000_000
    with pytest.raises(C.ImageConversionError) as ei:
        C.image_to_rgb(m, max_pixels=None)  # without a cap: the inconsistent data size is what fails
    assert ei.value.reason == "truncated"
    ok = C.rgb_to_image(np.zeros((10, 20, 3), np.uint8))
    with pytest.raises(C.ImageConversionError) as ei:
        C.image_to_rgb(ok, max_pixels=199)
    assert ei.value.reason == "too_large"
    assert C.image_to_rgb(ok, max_pixels=200).shape == (10, 20, 3)
    assert C.DEFAULT_MAX_IMAGE_PIXELS == 4096 * 4096


def test_compressed_header_parser_skips_segments_and_refuses_unknown_payloads():
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (37, 53, 3), dtype=np.uint8)
    jpg = cv2.imencode(".jpg", img)[1].tobytes()
    assert C.compressed_image_size(jpg) == ("jpeg", 53, 37)
    assert C.compressed_image_size(cv2.imencode(".png", img)[1].tobytes()) == ("png", 53, 37)
    # an APP1 segment whose payload looks like a huge frame header is skipped by its length
    fake_sof = b"\xff\xc0\x00\x11\x08\x4e\x20\x4e\x20" + bytes(8)
    app1 = b"\xff\xe1" + (2 + len(fake_sof)).to_bytes(2, "big") + fake_sof
    assert C.compressed_image_size(jpg[:2] + app1 + jpg[2:]) == ("jpeg", 53, 37)
    m = CompressedImage(format="")
    m.data = jpg[:2] + app1 + jpg[2:]
    assert C.compressed_to_rgb(m).shape == (37, 53, 3)
    # BMP (cv2 would decode it) has no header we check: refused rather than decoded blind
    bmp = CompressedImage(format="")
    bmp.data = cv2.imencode(".bmp", img)[1].tobytes()
    with pytest.raises(C.ImageConversionError) as ei:
        C.compressed_to_rgb(bmp)
    assert ei.value.reason == "unsupported_encoding"
    for bad in (b"\xff\xd8\xff\xda\x00\x02", b"\xff\xd8", jpg[:20]):  # scan before frame, truncated
        with pytest.raises(C.ImageConversionError) as ei:
            C.compressed_image_size(bad)
        assert ei.value.reason == "decode_failed"


# ---------------------------------------------------------- float32 overflow (issue 9 item 7)


def test_coordinates_beyond_float32_are_infinite_silently(tiny_encoder):
    """Coordinates beyond +-3.4e38 used to print 'RuntimeWarning: overflow encountered in cast'.
    They are INFINITE boxes now, with no warning (warnings are errors in this test)."""
    import warnings

    from runa_ood_node.core.pipeline import OodScorer

    arr = C.boxes_to_detections(_hdr(), [[10, 10, 50, 50], [10, 10, 50, 50], [10, 10, 50, 50], [10, 10, 50, 50]],
                                scores=[0.9, 1e39, 0.5, 0.5])
    arr.detections[1].bbox.center.position.x = 1e39
    arr.detections[2].bbox.size_x = -1e300
    arr.detections[3].bbox.center.position.y = -3.5e38
    arr.detections[3].bbox.size_y = 1e308
    arr.detections[3].bbox.center.theta = 0.3
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        boxes, scores, _, _ = C.detections_to_arrays(arr)
        res = OodScorer(tiny_encoder, "voc").score(np.zeros((64, 64, 3), np.uint8), boxes, box_format="cxcywh",
                                                   detector_scores=scores)
    assert res.status.tolist() == [BoxStatus.OK] + [BoxStatus.INFINITE] * 3
    assert np.isinf(scores[1]) and np.isfinite(res.boxes_xyxy).all()


def test_cdr_header_stamp_and_decode_errors():
    from rclpy.serialization import serialize_message

    from runa_ood_node.ros import msgdefs, wire

    raw = serialize_message(_dets())
    assert wire.header_stamp_ns(raw) == C.stamp_to_ns(_dets().header.stamp)
    big_endian = b"\x00\x00\x00\x00" + (-2).to_bytes(4, "big", signed=True) + (7).to_bytes(4, "big") + b"\x00" * 8
    assert wire.header_stamp_ns(big_endian) == -2 * 1_000_000_000 + 7
    for bad in (b"", raw[:11], b"\x01\x01" + raw[2:], b"\x00\x07" + raw[2:]):
        with pytest.raises(ValueError, match="CDR"):
            wire.header_stamp_ns(bad)
    for bad in (raw[:30], raw[:12] + b"\xff\xff\xff\x7f" + raw[16:], raw[:4] + bytes(range(200))):
        with pytest.raises(msgdefs.CdrError, match="Detection2DArray"):
            msgdefs.decode(bad, "vision_msgs/msg/Detection2DArray")
