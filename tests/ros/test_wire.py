"""runa_ood_node.ros.wire: the node's readers and writers of CDR bytes, held equal to rclpy's and
rosbags' (de)serialization of the same messages.

Readers: every field of random Detection2DArray / Image / CompressedImage messages (odd string
lengths, unicode, several or no hypotheses, rotated and non-finite boxes, both byte orders) against
an independent reading of the rclpy message; garbage and every truncation raise CdrError.
Writers: the bytes equal rosbags' serialization of the same output message, for both placements of
an embedded detection (same offset modulo 8 as in the input, and moved by 4)."""
import math
import types

import numpy as np
import pytest

pytest.importorskip("sensor_msgs.msg")
vision_msg = pytest.importorskip("vision_msgs.msg", reason="build ros2_ws (scripts/setup.sh) and source scripts/env.sh")
runa_msg = pytest.importorskip("runa_ood_msgs.msg", reason="build ros2_ws (scripts/setup.sh) and source scripts/env.sh")

from rclpy.serialization import deserialize_message, serialize_message  # noqa: E402
from sensor_msgs.msg import CompressedImage, Image  # noqa: E402
from std_msgs.msg import Header  # noqa: E402

from runa_ood_node.core.boxes import BoxStatus  # noqa: E402
from runa_ood_node.ros import convert, msgdefs, wire  # noqa: E402

DET = "vision_msgs/msg/Detection2DArray"
STRINGS = ["", "a", "ab", "abc", "abcd", "abcde", "car", "é", "🚗 truck", "x" * 13]


def _hdr(sec=1700000000, nsec=123456789, frame="camera_optical"):
    h = Header()
    h.stamp.sec, h.stamp.nanosec, h.frame_id = sec, nsec, frame
    return h


def _random_detections(rng, n=None):
    """An rclpy Detection2DArray with everything the reader must get right."""
    n = int(rng.integers(0, 7)) if n is None else n
    msg = vision_msg.Detection2DArray(header=_hdr(int(rng.integers(-5, 2**31 - 1)), int(rng.integers(0, 10**9)),
                                                  str(rng.choice(STRINGS))))
    for i in range(n):
        d = vision_msg.Detection2D()
        d.header = _hdr(1, 2, str(rng.choice(STRINGS)))
        d.id = str(rng.choice(STRINGS))
        d.bbox.center.position.x, d.bbox.center.position.y = (float(v) for v in rng.uniform(-50, 700, 2))
        d.bbox.size_x, d.bbox.size_y = (float(v) for v in rng.uniform(0, 300, 2))
        d.bbox.center.theta = float(rng.choice([0.0, 0.0, 0.3, -1.2, math.pi / 2, math.nan, math.inf]))
        if rng.uniform() < 0.1:
            d.bbox.center.position.x = float(rng.choice([math.nan, 1e39, -1e300]))
        for _ in range(int(rng.integers(0, 4))):
            h = vision_msg.ObjectHypothesisWithPose()
            h.hypothesis.class_id = str(rng.choice(STRINGS))
            h.hypothesis.score = float(rng.choice([rng.uniform(), rng.uniform(), math.nan]))
            h.pose.pose.position.x = float(rng.normal())
            h.pose.pose.orientation.w = 1.0
            h.pose.covariance = [float(v) for v in rng.normal(size=36)]
            d.results.append(h)
        msg.detections.append(d)
    return msg


def _reference_arrays(msg):
    """The documented rules, read independently from the rclpy message's fields."""
    rows, scores, cls, ids = [], [], [], []
    for d in msg.detections:
        x, y, t = d.bbox.center.position.x, d.bbox.center.position.y, d.bbox.center.theta
        w, h = d.bbox.size_x, d.bbox.size_y
        if not math.isfinite(t):
            w = h = math.nan
        elif t != 0:
            c, s = abs(math.cos(t)), abs(math.sin(t))
            w, h = w * c + h * s, w * s + h * c
        rows.append((x, y, w, h))
        best, best_id = math.nan, ""
        for j, r in enumerate(d.results):  # the highest score; NaN loses to any number; the first of equals wins
            sc = r.hypothesis.score
            if j == 0 or sc > best or (math.isnan(best) and not math.isnan(sc)):
                best, best_id = sc, r.hypothesis.class_id
        scores.append(best)
        cls.append(best_id)
        ids.append(d.id)
    with np.errstate(over="ignore"):
        return (np.array(rows, np.float64).reshape(-1, 4).astype(np.float32),
                np.array(scores, np.float64).astype(np.float32), cls, ids)


def _assert_arrays_equal(got, want):
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_array_equal(got[1], want[1])
    assert got[2] == want[2] and got[3] == want[3]


# ------------------------------------------------------------------------------------- detections


def test_read_detections_every_field_of_random_messages():
    rng = np.random.default_rng(7)
    for _ in range(300):
        msg = _random_detections(rng)
        raw = serialize_message(msg)
        dets = wire.read_detections(raw)
        _assert_arrays_equal(dets.arrays(), _reference_arrays(msg))
        assert dets.header == (wire.Time(msg.header.stamp.sec, msg.header.stamp.nanosec), msg.header.frame_id)
        assert len(dets) == len(msg.detections) and dets.boxes_cxcywh.dtype == np.float32
        # each span is one whole Detection2D: the spans tile the array after its count
        if dets.spans:
            ends, starts = [e for _, e, _ in dets.spans], [s for s, _, _ in dets.spans]
            assert all(-(e - 4) & 3 == s - e for e, s in zip(ends, starts[1:]))
            assert ends[-1] == len(raw)


def test_read_detections_big_endian_and_every_flavour_of_input():
    rng = np.random.default_rng(8)
    store = msgdefs.shared_typestore()
    for _ in range(20):
        msg = _random_detections(rng, n=3)
        le = serialize_message(msg)
        obj = msgdefs.decode(le, DET)
        be = bytes(store.serialize_cdr(obj, DET, little_endian=False))
        assert be[:2] == b"\x00\x00"
        want = _reference_arrays(msg)
        for source in (le, be, obj, msg, memoryview(le), bytearray(le)):
            _assert_arrays_equal(convert.detections_to_arrays(source), want)
        # big-endian detections are re-laid little endian, so outputs can embed them (the same message;
        # the bytes may differ in padding: rclpy's serializer leaves its padding bytes unset)
        outs = [deserialize_message(wire.write_ood_only(msg.header, wire.read_detections(raw), _result(3, ood=[1] * 3)),
                                    vision_msg.Detection2DArray) for raw in (be, le)]
        assert str(outs[0]) == str(outs[1]) == str(msg)


def test_truncated_garbage_and_hostile_bytes_raise_cdr_error():
    rng = np.random.default_rng(9)
    raw = serialize_message(_random_detections(rng, n=3))
    wire.read_detections(raw)
    for k in range(len(raw)):  # every truncation
        with pytest.raises(msgdefs.CdrError):
            wire.read_detections(raw[:k])
    for _ in range(3000):  # corrupted bytes: read or refused, never another exception
        b = bytearray(raw)
        for i in rng.integers(0, len(b), int(rng.integers(1, 6))):
            b[i] = int(rng.integers(0, 256))
        try:
            wire.read_detections(bytes(b))
        except msgdefs.CdrError:
            pass
    hostile = raw[:4] + raw[4:8] + raw[8:12] + b"\x01\x00\x00\x00\x00\x00\x00\x00" + b"\xf0\xff\xff\xff"
    with pytest.raises(msgdefs.CdrError, match="cannot fit"):
        wire.read_detections(hostile)  # 4 billion detections declared: refused before any allocation
    with pytest.raises(msgdefs.CdrError, match="encapsulation"):
        wire.read_detections(b"\x00\x07\x00\x00" + raw[4:])  # XCDR2: not what ROS 2 sends
    with pytest.raises(msgdefs.CdrError):
        wire.read_detections(b"")


# ----------------------------------------------------------------------------------------- images


@pytest.mark.parametrize("encoding,step_pad,big", [("rgb8", 0, 0), ("bgr8", 5, 0), ("mono16", 2, 1),
                                                   ("mono16", 0, 0), ("yuv422", 0, 0)])
def test_read_image_fields_pixels_and_zero_copy(encoding, step_pad, big):
    rng = np.random.default_rng(3)
    bpp = {"rgb8": 3, "bgr8": 3, "mono16": 2, "yuv422": 2}[encoding]
    h, w = 5, 6
    step = w * bpp + step_pad
    m = Image(header=_hdr(frame="cam" * (step_pad + 1)), height=h, width=w, encoding=encoding, is_bigendian=big,
              step=step)
    m.data = rng.integers(0, 256, h * step, dtype=np.uint8).tobytes()
    raw = serialize_message(m)
    v = wire.read_image(raw)
    assert (v.height, v.width, v.encoding, v.is_bigendian, v.step) == (h, w, encoding, big, step)
    assert v.header == (wire.Time(m.header.stamp.sec, m.header.stamp.nanosec), m.header.frame_id)
    assert bytes(v.data) == bytes(m.data)
    assert np.shares_memory(np.frombuffer(v.data, np.uint8), np.frombuffer(raw, np.uint8))  # no pixel copy
    np.testing.assert_array_equal(convert.image_to_rgb(v), convert.image_to_rgb(m))
    for k in (0, 11, 20, len(raw) - 1):
        with pytest.raises(msgdefs.CdrError):
            wire.read_image(raw[:k])


def test_read_compressed_and_image_views_are_read_only():
    m = CompressedImage(header=_hdr(frame="é"), format="jpeg")
    m.data = bytes(range(256)) * 3
    raw = serialize_message(m)
    v = wire.read_compressed(raw)
    assert (v.format, bytes(v.data), v.header.frame_id) == ("jpeg", bytes(m.data), "é")
    with pytest.raises(TypeError):
        v.data[0] = 1
    with pytest.raises(msgdefs.CdrError):
        wire.read_compressed(raw[:-1])


def test_images_corrupted_non_utf8_or_big_endian():
    """Every corruption of an image message is read or refused with CdrError (invalid UTF-8 and a
    missing string terminator included); big-endian encapsulation reads the same fields."""
    rng = np.random.default_rng(5)
    m = Image(header=_hdr(frame="cam"), height=2, width=3, encoding="rgb8", step=9)
    m.data = bytes(range(18))
    c = CompressedImage(header=_hdr(frame="cam"), format="png")
    c.data = bytes(range(40))
    for raw, read in ((serialize_message(m), wire.read_image), (serialize_message(c), wire.read_compressed)):
        for _ in range(2000):
            b = bytearray(raw)
            for i in rng.integers(4, len(b), int(rng.integers(1, 4))):
                b[i] = int(rng.integers(0, 256))
            try:
                read(bytes(b))
            except msgdefs.CdrError:
                pass
        bad = bytearray(raw)
        bad[16] = 0xFF  # the first byte of frame_id "cam": not UTF-8
        with pytest.raises(msgdefs.CdrError, match="UTF-8"):
            read(bytes(bad))
        bad = bytearray(raw)
        bad[19] = ord("x")  # frame_id's terminating NUL
        with pytest.raises(msgdefs.CdrError, match="NUL"):
            read(bytes(bad))
    store = msgdefs.shared_typestore()
    for raw, read, typ in ((serialize_message(m), wire.read_image, "sensor_msgs/msg/Image"),
                           (serialize_message(c), wire.read_compressed, "sensor_msgs/msg/CompressedImage")):
        be = bytes(store.serialize_cdr(msgdefs.decode(raw, typ), typ, little_endian=False))
        assert be[:2] == b"\x00\x00"
        fields = ("header", "height", "width", "encoding", "is_bigendian", "step", "format")
        assert [getattr(read(be), k) for k in fields] == [getattr(read(raw), k) for k in fields]
        assert bytes(read(be).data) == bytes(read(raw).data)


def test_unterminated_or_non_utf8_strings_in_detections_are_refused():
    """Outputs embed the detections' bytes: a string a subscriber could not read (no NUL, not UTF-8)
    in any of them, the skipped Detection2D.header.frame_id included, is refused here."""
    msg = _random_detections(np.random.default_rng(3), n=1)
    msg.header.frame_id = "camera"
    msg.detections[0].results = []
    msg.detections[0].header.frame_id = "abc"
    msg.detections[0].id = "xyz"
    raw = serialize_message(msg)
    wire.read_detections(raw)
    for needle in (b"abc\x00", b"xyz\x00"):
        at = raw.index(needle)
        for i, v in ((at, 0xFF), (at + 3, ord("q"))):
            bad = bytearray(raw)
            bad[i] = v
            with pytest.raises(msgdefs.CdrError):
                wire.read_detections(bytes(bad))


# ---------------------------------------------------------------------------------------- writers


def _result(n, ood=None, status=None, error=None, short=0):
    """Duck-typed core FrameResult for n boxes (``short`` boxes fewer)."""
    rng = np.random.default_rng(n)
    m = n - short
    st = np.zeros(m, np.uint8) if status is None else np.asarray(status, np.uint8)[:m]
    return types.SimpleNamespace(
        status=st, uncertainty=rng.normal(size=m).astype(np.float32),
        threshold=np.full(m, -0.24, np.float32), similarity=rng.normal(size=m).astype(np.float32),
        is_ood=np.zeros(m, bool) if ood is None else np.asarray(ood, bool)[:m],
        label=[f"label{i}" * (i % 3) for i in range(m)], error=error)


def _expected_fields(res, n):
    """What every OodDetection must say, from the message definition's documented rules."""
    out = []
    for i in range(n):
        if res is None or i >= len(res.status):
            text = "no OOD result for this box" + ("" if res is None else f" (result has {len(res.status)} boxes)")
            out.append(dict(uncertainty=math.nan, threshold=math.nan, is_ood=False, nearest_label="",
                            similarity=math.nan, status=int(BoxStatus.NOT_SCORED), status_text=text))
            continue
        st = int(res.status[i])
        text = BoxStatus(st).text + (f": {res.error}" if st == BoxStatus.BACKEND_ERROR and res.error else "")
        out.append(dict(uncertainty=float(res.uncertainty[i]), threshold=float(res.threshold[i]),
                        is_ood=bool(res.is_ood[i]), nearest_label=res.label[i] if st == BoxStatus.OK else "",
                        similarity=float(res.similarity[i]), status=st, status_text=text))
    return out


def _record_placements(monkeypatch):
    """Which path each embedded detection took: 0 = copied as it is, 4 = moved by 4 bytes."""
    seen = []
    orig = wire._Out.detection

    def detection(self, dets, i):
        seen.append((len(self.buf) + (-(len(self.buf) - 4) & 3) - dets.spans[i][0]) & 7)
        orig(self, dets, i)
    monkeypatch.setattr(wire._Out, "detection", detection)
    return seen


def test_writers_equal_rosbags_serialization_in_both_placements(monkeypatch):
    """The bytes of every output equal rosbags' serialization of the message built field by field
    (rosbags pads with zeros, as do both): the embedded detections come out exactly as they went in."""
    seen = _record_placements(monkeypatch)
    store = msgdefs.shared_typestore()
    T = store.types
    rng = np.random.default_rng(11)
    for trial in range(120):
        msg = _random_detections(rng, n=int(rng.integers(0, 6)))
        n = len(msg.detections)
        le = bytes(store.serialize_cdr(msgdefs.decode(serialize_message(msg), DET), DET))  # zero padding
        dets = wire.read_detections(le)
        objs = msgdefs.decode(le, DET).detections
        status = rng.choice([0, 0, 0, int(BoxStatus.TOO_SMALL), int(BoxStatus.BACKEND_ERROR)], n)
        res = [None, _result(n, ood=rng.uniform(size=n) > 0.5, status=status, error="CUDA out of memory"),
               _result(n, short=min(n, 2))][trial % 3]
        hdr = _hdr(5, 6, str(rng.choice(STRINGS)))
        model = str(rng.choice(STRINGS))
        fields = _expected_fields(res, n)
        head = T["std_msgs/msg/Header"](stamp=T["builtin_interfaces/msg/Time"](sec=5, nanosec=6),
                                         frame_id=hdr.frame_id)
        ood = [T["runa_ood_msgs/msg/OodDetection"](detection=objs[i], **fields[i]) for i in range(n)]
        want = T["runa_ood_msgs/msg/OodDetectionArray"](header=head, detections=ood, model=model, backend="torch",
                                                        scorer="runa", random_weights=bool(trial % 2))
        got = wire.write_ood_array(hdr, dets, res, model, "torch", "runa", bool(trial % 2))
        assert got == bytes(store.serialize_cdr(want, "runa_ood_msgs/msg/OodDetectionArray")), trial
        flags = [False] * n if res is None else [i < len(res.is_ood) and bool(res.is_ood[i]) for i in range(n)]
        want = T[DET](header=head, detections=[objs[i] for i in range(n) if flags[i]])
        assert wire.write_ood_only(hdr, dets, res) == bytes(store.serialize_cdr(want, DET)), trial
        idx = [i for i in (3, 0, 17, 1) if i < n]
        want = T["runa_ood_msgs/msg/DriverAlert"](header=head, level=2, source=0, reason=model,
                                                  objects=[ood[i] for i in idx])
        got = wire.write_alert(hdr, 2, 0, model, dets, res, [3, 0, 17, 1])
        assert got == bytes(store.serialize_cdr(want, "runa_ood_msgs/msg/DriverAlert")), trial
    assert set(seen) == {0, 4}, "both placements of an embedded detection must have been exercised"


def test_outputs_from_rclpy_serialized_input_read_back_field_by_field():
    """From rclpy-serialized input (its padding bytes are its own), rclpy reads the outputs back
    with every field as documented and every embedded detection equal to the input's."""
    rng = np.random.default_rng(12)
    for n in range(6):
        msg = _random_detections(rng, n=n)
        dets = wire.read_detections(serialize_message(msg))
        res = _result(n, ood=[i % 2 for i in range(n)], status=[0, 0, int(BoxStatus.BACKEND_ERROR), 0, 4, 0][:n],
                      error="boom")
        for model in ("m", "mo", "mod", "mode"):
            out = deserialize_message(wire.write_ood_array(_hdr(frame="img"), dets, res, model, "onnxruntime",
                                                           "runa", True), runa_msg.OodDetectionArray)
            assert (out.header.frame_id, out.model, out.backend, out.scorer, out.random_weights) == \
                ("img", model, "onnxruntime", "runa", True)
            assert [str(o.detection) for o in out.detections] == [str(d) for d in msg.detections]
            for o, f in zip(out.detections, _expected_fields(res, n)):
                assert (o.is_ood, o.nearest_label, o.status, o.status_text) == \
                    (f["is_ood"], f["nearest_label"], f["status"], f["status_text"])
                for k in ("uncertainty", "threshold", "similarity"):
                    assert getattr(o, k) == pytest.approx(f[k], nan_ok=True)
        only = deserialize_message(wire.write_ood_only(_hdr(), dets, res), vision_msg.Detection2DArray)
        assert [str(d) for d in only.detections] == [str(d) for i, d in enumerate(msg.detections) if i % 2]
        alert = deserialize_message(wire.write_alert(_hdr(), 1, 0, "OOD object ahead", dets, res, [n - 1, 99]),
                                    runa_msg.DriverAlert)
        assert (alert.level, alert.source, alert.reason) == (1, 0, "OOD object ahead")
        assert [str(o.detection) for o in alert.objects] == [str(d) for d in msg.detections[-1:]]


def test_ood_fields_without_or_with_a_short_result():
    assert [f[5] for f in wire.ood_fields(None, 3)] == [BoxStatus.NOT_SCORED] * 3
    short = wire.ood_fields(_result(4, short=2), 4)
    assert [f[5] for f in short] == [0, 0, BoxStatus.NOT_SCORED, BoxStatus.NOT_SCORED]
    assert "result has 2 boxes" in short[3][6] and math.isnan(short[3][0])
    err = wire.ood_fields(_result(2, status=[BoxStatus.BACKEND_ERROR, 0], error="CUDA out of memory"), 2)
    assert err[0][6].endswith(": CUDA out of memory") and err[0][3] == "" and err[1][3] == "label1"


def test_a_real_frame_result_is_written(tiny_encoder):
    from runa_ood_node.core.pipeline import OodScorer

    msg = convert.boxes_to_detections(_hdr(), [[10, 10, 60, 50], [5, 5, 6, 6]], class_ids=["car", "x"],
                                      scores=[0.9, 0.8])
    dets = wire.read_detections(serialize_message(msg))
    res = OodScorer(tiny_encoder, "voc").score(np.full((80, 100, 3), 128, np.uint8), dets.boxes_cxcywh,
                                               box_format="cxcywh")
    out = deserialize_message(wire.write_ood_array(_hdr(), dets, res, "m", "torch", "runa", True),
                              runa_msg.OodDetectionArray)
    assert [o.status for o in out.detections] == [BoxStatus.OK, BoxStatus.TOO_SMALL]
    assert out.detections[0].nearest_label == res.label[0] != ""
    assert out.detections[0].uncertainty == pytest.approx(float(res.uncertainty[0]))
