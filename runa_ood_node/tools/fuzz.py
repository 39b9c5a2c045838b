"""`runa-ood fuzz`: hostile input against the real node over real DDS, with every message accounted for.

The node runs as its own process (``python -m runa_ood_node.ros.node``, the tiny random model), in
a namespace of its own; this process publishes thousands of generated messages to it, in
categories (``CATEGORIES``):

``good``                  a well-formed pair (between every hostile case, so far stamps never chain)
``bad_encoding``          unknown / empty / unicode encodings
``bad_size_step``         step below the row size, zero sizes, truncated or odd-width data
``huge_declared_size``    raw images declaring up to 2^31 pixels per side with a few bytes of data
``bad_boxes``             NaN / inf / +-1e39 / negative / rotated boxes, NaN scores, no hypotheses
``many_boxes``            2,000 boxes in one frame
``unicode_and_huge_ids``  unicode class ids and tracking ids, 1 MB class ids
``stamps``                duplicate, out-of-order, far-future and far-past stamps, invalid nanoseconds
``malformed_cdr``         truncated, bit-flipped and random serialized payloads (published raw)
``garbage_compressed``    random bytes and truncated JPEG / PNG (compressed transport)
``bad_format``            compressed formats that are not JPEG / PNG
``decompression_bomb``    a few hundred bytes of JPEG / PNG declaring 20000 x 20000 pixels (only when
                          the node has the ``max_image_pixels`` parameter; otherwise skipped, said so)

Two node processes run side by side, one on the raw transport and one on the compressed one
(``--soak``: raw only). At the end a known-good pair must be answered by each with its source
header, and each is checked:
the node process is alive; every published message is received or counted as lost in transport
(published = received + lost, per stream); received = 2 x (frames scored + frame drops + frames
queued) + pairer drops + pending + input drops; every /diagnostics message said
``accounting_balanced=true``; no stamp was answered twice; peak RSS (``VmHWM``) under ``--max-rss-mb``.

``--soak`` runs the same generator for longer (default 30 min, raw transport) and records the
node's memory every few seconds (``rss.csv`` + ``rss.png`` under ``--out``), so a leak shows as a
slope. Not part of CI: ``tests/test_fuzz.py`` runs the bounded version.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import pathlib
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from typing import Any, Dict, List, Optional

import numpy as np

CATEGORIES_RAW = ("good", "bad_encoding", "bad_size_step", "huge_declared_size", "bad_boxes", "many_boxes",
                  "unicode_and_huge_ids", "stamps", "malformed_cdr")
CATEGORIES_COMPRESSED = ("good", "garbage_compressed", "bad_format", "decompression_bomb", "bad_boxes", "stamps",
                         "malformed_cdr")
CATEGORIES = tuple(dict.fromkeys(CATEGORIES_RAW + CATEGORIES_COMPRESSED))
W, H = 96, 72  # small images: the model's cost per good frame stays low, the hostile part dominates


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--duration", type=float, default=None,
                   help="seconds of fuzzing in all (default 60; with --soak 1800)")
    p.add_argument("--soak", action="store_true",
                   help="long run of the raw phase, recording the node's RSS curve (rss.csv, rss.png)")
    p.add_argument("--out", default="out/fuzz", help="output folder (report.json; rss.csv/png with --soak)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-rss-mb", type=float, default=2048.0, help="fail when the node's peak RSS exceeds this")
    p.add_argument("--rate", type=float, default=40.0, help="hostile cases per second and node, at most")
    p.add_argument("--sample-s", type=float, default=5.0, help="RSS sampling period of --soak (s)")


# ---------------------------------------------------------------------------------------------- node
def _rss_kb(pid: int) -> Dict[str, int]:
    out = {}
    try:
        for line in pathlib.Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(("VmRSS:", "VmHWM:")):
                out[line.split(":")[0]] = int(line.split()[1])
    except OSError:
        pass
    return out


def node_supports(param: str) -> bool:
    """Whether this build of the node declares ``param``."""
    from ..ros.params import PARAMETERS

    return any(p.name == param for p in PARAMETERS)


@contextlib.contextmanager
def node_process(namespace: str, transport: str, workdir: pathlib.Path):
    """Start the node (tiny random model) as a child process; yields the Popen."""
    params = {
        "model": "runa-tiny-vit", "pretrained": "", "allow_random_weights": True, "backend": "torch",
        "image_transport": transport, "image_qos": "reliable", "detections_qos": "reliable",
        "image_queue_size": 100, "detections_queue_size": 100, "max_boxes": 50,
        "health.frame_timeout_s": 5.0, "health.latency_budget_ms": 1e5,
    }
    if node_supports("max_image_pixels"):
        params["max_image_pixels"] = 4096 * 4096
    import yaml

    pfile = workdir / f"params_{transport}.yaml"
    pfile.write_text(yaml.safe_dump({"/**": {"ros__parameters": params}}))
    env = dict(os.environ, ROS_LOG_DIR=str(workdir / "ros_log"), PYTHONUNBUFFERED="1")
    env.setdefault("ROS_AUTOMATIC_DISCOVERY_RANGE", "LOCALHOST")
    log = open(workdir / f"node_{transport}.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "runa_ood_node.ros.node", "--ros-args", "-r", f"__ns:=/{namespace}",
                             "-r", "__node:=runa_ood_fuzz", "--params-file", str(pfile)],
                            env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        log.close()


# ------------------------------------------------------------------------------------- generator
class Fuzzer:
    """Publishes generated messages to one node and records what it answers."""

    def __init__(self, node, namespace: str, transport: str, rng: random.Random):
        from diagnostic_msgs.msg import DiagnosticArray
        from rclpy.qos import QoSProfile, ReliabilityPolicy
        from runa_ood_msgs.msg import OodDetectionArray
        from sensor_msgs.msg import CompressedImage, Image
        from vision_msgs.msg import Detection2DArray

        self.node, self.rng, self.transport = node, rng, transport
        self.np_rng = np.random.default_rng(rng.randrange(2**32))
        qos = QoSProfile(depth=500, reliability=ReliabilityPolicy.RELIABLE)
        img_type = CompressedImage if transport == "compressed" else Image
        img_topic = f"/{namespace}/image" + ("/compressed" if transport == "compressed" else "")
        self.pub_img = node.create_publisher(img_type, img_topic, qos)
        self.pub_det = node.create_publisher(Detection2DArray, f"/{namespace}/detections", qos)
        self.lock = threading.Lock()
        self.answers: List[Any] = []
        self.diags: List[Dict[str, str]] = []
        self.status_name = f"/{namespace}/runa_ood_fuzz: OOD monitor"
        node.create_subscription(OodDetectionArray, f"/{namespace}/ood/detections", self._on_answer, qos)
        node.create_subscription(DiagnosticArray, "/diagnostics", self._on_diag, qos)
        self.published = Counter()  # per stream
        self.by_category = Counter()  # messages per category
        self.t_ns = 1_000_000_000_000  # stamp clock (1000 s), 10 ms per good frame
        self.good_frame = self._good_frame()
        self.bombs = node_supports("max_image_pixels")

    # ---------------------------------------------------------------- plumbing
    def _on_answer(self, msg) -> None:
        with self.lock:
            self.answers.append((msg.header.stamp.sec, msg.header.stamp.nanosec, msg.header.frame_id))

    def _on_diag(self, msg) -> None:
        for st in msg.status:
            if st.name == self.status_name:
                with self.lock:
                    self.diags.append({v.key: v.value for v in st.values})

    def connected(self) -> bool:
        return self.pub_img.get_subscription_count() > 0 and self.pub_det.get_subscription_count() > 0

    def header(self, stamp_ns: Optional[int] = None, frame_id: str = "fuzz_cam"):
        from std_msgs.msg import Header

        h = Header(frame_id=frame_id)
        ns = self.t_ns if stamp_ns is None else stamp_ns
        h.stamp.sec = int(ns // 1_000_000_000) % (2**31)
        h.stamp.nanosec = int(ns % 1_000_000_000)
        return h

    def send(self, category: str, image=None, dets=None) -> None:
        if image is not None:
            self.pub_img.publish(image)
            self.published["image"] += 1
            self.by_category[category] += 1
        if dets is not None:
            self.pub_det.publish(dets)
            self.published["detections"] += 1
            self.by_category[category] += 1

    def tick(self) -> int:
        self.t_ns += 10_000_000
        return self.t_ns

    # ---------------------------------------------------------------- messages
    def _good_frame(self) -> np.ndarray:
        yy, xx = np.mgrid[0:H, 0:W]
        return np.stack([xx * 255 // W, yy * 255 // H, (xx + yy) % 256], -1).astype(np.uint8)

    def image(self, stamp_ns=None, frame_id="fuzz_cam"):
        from ..ros import convert

        h = self.header(stamp_ns, frame_id)
        if self.transport == "compressed":
            return convert.rgb_to_compressed(self.good_frame, h, fmt="jpeg")
        return convert.rgb_to_image(self.good_frame, h)

    def dets(self, boxes=None, stamp_ns=None, frame_id="fuzz_cam", **kw):
        from ..ros import convert

        boxes = np.array([[10.0, 10.0, 40.0, 50.0], [50.0, 20.0, 90.0, 60.0]]) if boxes is None else boxes
        return convert.boxes_to_detections(self.header(stamp_ns, frame_id), np.asarray(boxes, np.float64).reshape(-1, 4),
                                           **kw)

    def good(self) -> None:
        self.tick()
        self.send("good", self.image(), self.dets())

    # ---------------------------------------------------------------- hostile cases
    def case(self, category: str) -> None:
        getattr(self, "_" + category)()

    def _bad_encoding(self):
        from sensor_msgs.msg import Image

        self.tick()
        m = Image(header=self.header(), width=W, height=H, step=W * 3)
        m.encoding = self.rng.choice(["", "yuv_weird", "rgb9", "RGB8 ", "ünïcödé", "8UC3" * 50, "bayer_rggb8"])
        m.data = bytes(W * H * 3)
        self.send("bad_encoding", m, self.dets())

    def _bad_size_step(self):
        from sensor_msgs.msg import Image

        self.tick()
        kind = self.rng.randrange(6)
        w, h, step, n, enc = W, H, W * 3, W * H * 3, "rgb8"
        if kind == 0:
            step = W * 3 - self.rng.randint(1, 30)
        elif kind == 1:
            w = h = 0
        elif kind == 2:
            n = self.rng.randint(0, W * H * 3 - 1)
        elif kind == 3:
            w, enc, step, n = W - 1, "yuv422", (W - 1) * 2, (W - 1) * 2 * H
        elif kind == 4:
            step, n = W * 3 + 4096, (W * 3 + 4096) * H  # padded rows: valid, must be honoured
        else:
            step = 2**32 - 1
        m = Image(header=self.header(), width=w, height=h, step=step, encoding=enc)
        m.data = bytes(n)
        self.send("bad_size_step", m, self.dets())

    def _huge_declared_size(self):
        from sensor_msgs.msg import Image

        self.tick()
        side = self.rng.choice([20_000, 100_000, 2**31 - 1, 2**32 - 1])
        m = Image(header=self.header(), width=side, height=side, encoding=self.rng.choice(["rgb8", "mono16", "bgra8"]))
        m.step = min(side * 3, 2**32 - 1)
        m.data = bytes(self.rng.randint(0, 64))
        self.send("huge_declared_size", m, self.dets())

    def _bad_boxes(self):
        self.tick()
        vals = [math.nan, math.inf, -math.inf, 1e39, -1e39, 3.5e38, -5.0, 0.0, 1e-30, 1e300]
        n = self.rng.randint(1, 12)
        boxes = np.array([[self.rng.choice(vals + [20.0, 40.0]) for _ in range(4)] for _ in range(n)])
        d = self.dets(boxes, scores=[self.rng.choice([math.nan, 0.5, -1.0, math.inf]) for _ in range(n)])
        for det in d.detections:
            if self.rng.random() < 0.3:
                det.bbox.center.theta = self.rng.choice([math.nan, math.inf, 1.0, -7.0, 1e30])
            if self.rng.random() < 0.2:
                det.results = []
        self.send("bad_boxes", self.image(), d)

    def _cached(self, key, build):
        """Heavy messages are built once and re-stamped (building 2,000 boxes in Python is slow)."""
        cache = self.__dict__.setdefault("_cache", {})
        if key not in cache:
            cache[key] = build()
        msg = cache[key]
        msg.header = self.header()
        return msg

    def _many_boxes(self):
        self.tick()
        n = 2000

        def build(seed):
            rng = np.random.default_rng(seed)
            xy = rng.uniform(0, min(W, H) - 8, (n, 2))
            boxes = np.concatenate([xy, xy + rng.uniform(2, 30, (n, 2))], 1)
            return self.dets(boxes, scores=rng.uniform(0, 1, n).tolist())

        seed = self.rng.randrange(3)
        self.send("many_boxes", self.image(), self._cached(("many", seed), lambda: build(seed)))

    def _unicode_and_huge_ids(self):
        self.tick()
        kind = self.rng.randrange(3)
        self.send("unicode_and_huge_ids", self.image(), self._cached(("ids", kind), lambda: self._ids_msg(kind)))

    def _ids_msg(self, kind):
        if kind == 0:
            ids = ["🚗 véhicule", "人", "\u202e\u0000x"]
        elif kind == 1:
            ids = ["x" * (1 << 20), "car", ""]
        else:
            ids = ["\U0010ffff" * 1000, "a\nb", " "]
        return self.dets(np.array([[5, 5, 30, 30], [40, 10, 80, 60], [0, 0, 96, 72]], float), class_ids=ids,
                         ids=[ids[-1], "y" * (1 << 16), "id-3"])

    def _stamps(self):
        kind = self.rng.randrange(8)
        sec = 1_000_000_000
        if kind == 0:  # duplicate of the last good stamp, both streams
            self.send("stamps", self.image(self.t_ns), self.dets(stamp_ns=self.t_ns))
        elif kind == 1:  # out of order, within the pairing window
            old = self.t_ns - self.rng.randint(1, 100) * 10_000_000
            self.send("stamps", self.image(old), self.dets(stamp_ns=old))
        elif kind == 2:  # 1.5 s (or much more) in the future, one stream
            far = self.t_ns + self.rng.choice([int(1.5 * sec), 30 * sec, 10**6 * sec])
            self.send("stamps", *((self.image(far), None) if self.rng.random() < 0.5 else (None, self.dets(stamp_ns=far))))
        elif kind == 3:  # far in the past
            far = self.rng.choice([0, self.t_ns - 100 * sec, 1])
            self.send("stamps", *((self.image(far), None) if self.rng.random() < 0.5 else (None, self.dets(stamp_ns=far))))
        elif kind == 4:  # a far-future pair on both streams (a glitched camera frame the detector ran on)
            far = self.t_ns + 5 * sec
            self.send("stamps", self.image(far), self.dets(stamp_ns=far))
        elif kind == 5:  # invalid nanoseconds (>= 1e9)
            h = self.header(self.tick())
            h.stamp.nanosec = 2**32 - 1
            d = self.dets()
            d.header = h
            self.send("stamps", None, d)
        elif kind == 6:  # detections for an image that never comes
            self.send("stamps", None, self.dets(stamp_ns=self.tick()))
        else:  # image whose detections never come
            self.send("stamps", self.image(self.tick()), None)

    def _malformed_cdr(self):
        from rclpy.serialization import serialize_message

        self.tick()
        img = self.rng.random() < 0.5
        bad = malformed_payload(serialize_message(self.image() if img else self.dets()), self.rng)
        if img:
            self.pub_img.publish(bad)
            self.published["image"] += 1
        else:
            self.pub_det.publish(bad)
            self.published["detections"] += 1
        self.by_category["malformed_cdr"] += 1

    def _garbage_compressed(self):
        import cv2
        from sensor_msgs.msg import CompressedImage

        self.tick()
        fmt = self.rng.choice(["jpeg", "png", ""])
        ok, enc = cv2.imencode(".png" if fmt == "png" else ".jpg", self.good_frame)
        data = enc.tobytes()
        kind = self.rng.randrange(3)
        if kind == 0:
            data = bytes(self.rng.randrange(256) for _ in range(self.rng.randint(0, 2000)))
        elif kind == 1:
            data = data[: self.rng.randint(0, len(data) - 1)]
        else:
            b = bytearray(data)
            for _ in range(20):
                b[self.rng.randrange(len(b))] = self.rng.randrange(256)
            data = bytes(b)
        self.send("garbage_compressed", CompressedImage(header=self.header(), format=fmt, data=data), self.dets())

    def _bad_format(self):
        from sensor_msgs.msg import CompressedImage

        self.tick()
        m = self.image()
        m.format = self.rng.choice(["h264", "bmp", "ünï", "x" * 10000, "rgb8; theora"])
        self.send("bad_format", m, self.dets())

    def _decompression_bomb(self):
        if not self.bombs:
            return
        from sensor_msgs.msg import CompressedImage

        self.tick()
        fmt = self.rng.choice(["jpeg", "png"])
        self.send("decompression_bomb", CompressedImage(header=self.header(), format=fmt, data=bomb(fmt, 20000)),
                  self.dets())


def malformed_payload(raw: bytes, rng: random.Random) -> bytes:
    """``raw`` (a serialized message) truncated, bit-flipped, replaced by random bytes after its
    4-byte encapsulation header, or with a length field set to 2^31.

    Never empty: a zero-length sample published raw wedges the *publisher's own* reliable Fast DDS
    stream (every reader, the node's and any independent one, receives nothing more from that
    writer until its history overflows), so it would test the generator, not the node. No typed
    publisher can send one: any CDR serialization holds at least the encapsulation header.
    1-3 bytes (a truncated header) are still sent and are refused by the node's middleware."""
    kind = rng.randrange(4)
    if kind == 0:
        return raw[: rng.randint(1, max(1, len(raw) - 1))]
    if kind == 1:
        b = bytearray(raw)
        for _ in range(rng.randint(1, 8)):
            b[rng.randrange(len(b))] = rng.randrange(256)
        return bytes(b)
    if kind == 2:
        return raw[:4] + bytes(rng.randrange(256) for _ in range(rng.randint(0, 200)))
    return raw[:8] + b"\xff\xff\xff\x7f" + raw[12:]  # a length field at the start of the payload set to 2^31


def bomb(fmt: str, side: int) -> bytes:
    """A few hundred bytes of JPEG / PNG whose header declares ``side`` x ``side`` pixels."""
    import struct
    import zlib

    import cv2

    if fmt == "png":
        ihdr = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
        chunk = lambda t, d: struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d))  # noqa: E731
        return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b"")
    ok, enc = cv2.imencode(".jpg", np.zeros((16, 16, 3), np.uint8))
    data = bytearray(enc.tobytes())
    i = data.find(b"\xff\xc0")  # SOF0: length(2) precision(1) height(2) width(2)
    data[i + 5:i + 9] = struct.pack(">HH", min(side, 65535), min(side, 65535))
    return bytes(data)


# ----------------------------------------------------------------------------------------- phases
def _diag_int(kv: Dict[str, str], key: str) -> int:
    try:
        return int(kv.get(key, "0"))
    except ValueError:
        return 0


def check_books(kv: Dict[str, str]) -> Dict[str, Any]:
    """From one /diagnostics status: received = 2 x (scored + frame drops + queued) + pairer drops
    + pending + input drops (pairs hold two messages)."""
    from ..ros.pairing import REASONS

    drops = {k[len("drops."):]: _diag_int(kv, k) for k in kv if k.startswith("drops.")}
    pairer = sum(drops.get(r, 0) for r in REASONS)
    inputs = sum(n for r, n in drops.items() if r.startswith("input_"))
    frame = sum(n for r, n in drops.items() if r not in REASONS and not r.startswith("input_")
                and r != "lost_in_transport")
    received = _diag_int(kv, "messages_received.image") + _diag_int(kv, "messages_received.detections")
    accounted = (2 * (_diag_int(kv, "frames_scored") + frame + _diag_int(kv, "frames_queued")) + pairer
                 + _diag_int(kv, "images_pending") + _diag_int(kv, "detections_pending") + inputs)
    return {"received": received, "accounted": accounted, "balanced": received == accounted,
            "drops": {r: n for r, n in drops.items() if n}}


def run_phases(transports, duration_s: float, rng: random.Random, workdir: pathlib.Path, rate: float,
               soak: bool = False, sample_s: float = 5.0, progress: bool = True) -> List[Dict[str, Any]]:
    """Fuzz one node process per transport, all at once, for ``duration_s``; one result per transport."""
    from tqdm import tqdm

    from ..ros.spin import spinning_node

    t_launch = time.monotonic()
    with contextlib.ExitStack() as stack:
        procs = {t: stack.enter_context(node_process(f"fuzz_{t}_{os.getpid()}", t, workdir)) for t in transports}
        node = stack.enter_context(spinning_node("runa_ood_fuzzer"))
        fzs = {t: Fuzzer(node, f"fuzz_{t}_{os.getpid()}", t, rng) for t in transports}
        end = time.monotonic() + 180.0
        while time.monotonic() < end and not all(fz.connected() for fz in fzs.values()):
            if any(p.poll() is not None for p in procs.values()):
                break
            time.sleep(0.1)
        for t, fz in fzs.items():  # a first good pair answered: the node is warm and knows both publishers
            if procs[t].poll() is not None or not fz.connected():
                raise RuntimeError(f"the {t} node did not come up (see {workdir}/node_{t}.log)")
            while not fz.answers and time.monotonic() < end:
                fz.good()
                time.sleep(0.5)
        startup_s = time.monotonic() - t_launch
        rss_start = {t: _rss_kb(p.pid) for t, p in procs.items()}
        curves: Dict[str, List[tuple]] = {t: [] for t in transports}
        cases = Counter()
        t0 = time.monotonic()
        next_sample = t0
        bar = tqdm(total=int(duration_s), desc="fuzz " + "+".join(transports), unit="s", disable=not progress)
        while time.monotonic() - t0 < duration_s and all(p.poll() is None for p in procs.values()):
            for t, fz in fzs.items():
                cats = CATEGORIES_COMPRESSED if t == "compressed" else CATEGORIES_RAW
                fz.case(rng.choice([c for c in cats if c != "good"]))
                fz.good()  # a good pair after every hostile case: far stamps never chain into a "jump"
                cases[t] += 1
            time.sleep(1.0 / rate)
            now = time.monotonic()
            if now >= next_sample:
                for t, p in procs.items():
                    r = _rss_kb(p.pid)
                    curves[t].append((round(now - t0, 1), r.get("VmRSS", 0) / 1024.0, r.get("VmHWM", 0) / 1024.0))
                next_sample = now + (sample_s if soak else 1.0)
                bar.update(min(int(now - t0), int(duration_s)) - bar.n)
        bar.close()
        alive = {t: p.poll() is None for t, p in procs.items()}
        known = {}
        for t, fz in fzs.items():  # the known-good pair, to be answered with its source header
            fz.tick()
            fz.tick()
            known[t] = (int(fz.t_ns // 1_000_000_000), int(fz.t_ns % 1_000_000_000), "fuzz_known_good")
            fz.send("good", fz.image(frame_id="fuzz_known_good"), fz.dets(frame_id="fuzz_known_good"))
        end = time.monotonic() + 60.0
        while time.monotonic() < end and not all(known[t] in fz.answers for t, fz in fzs.items()):
            time.sleep(0.1)
        results = []
        for t, fz in fzs.items():
            # the final books: a /diagnostics message that has seen every published message
            final, end = None, time.monotonic() + 60.0
            while time.monotonic() < end:
                with fz.lock:
                    kv = fz.diags[-1] if fz.diags else None
                if kv is not None:
                    seen = {s: _diag_int(kv, f"messages_received.{s}") + _diag_int(kv, f"messages_lost.{s}")
                            for s in ("image", "detections")}
                    if seen == dict(fz.published) and _diag_int(kv, "frames_queued") == 0:
                        final = kv
                        break
                time.sleep(0.2)
            kv = final or (fz.diags[-1] if fz.diags else {})
            rss_end = _rss_kb(procs[t].pid)
            with fz.lock:
                answers, diags = list(fz.answers), list(fz.diags)
            books = check_books(kv)
            stamps = [(sec, nsec) for sec, nsec, _ in answers]
            peak = max([rss_end.get("VmHWM", 0) / 1024.0] + [h for *_, h in curves[t]])
            results.append({
                "transport": t,
                "duration_s": duration_s,
                "startup_s": round(startup_s, 1),
                "hostile_cases": cases[t],
                "published": dict(fz.published),
                "messages_by_category": dict(fz.by_category),
                "received": {s: _diag_int(kv, f"messages_received.{s}") for s in ("image", "detections")},
                "lost_in_transport": {s: _diag_int(kv, f"messages_lost.{s}") for s in ("image", "detections")},
                "every_message_seen": final is not None,
                "frames_scored": _diag_int(kv, "frames_scored"),
                "drops_by_reason": books["drops"],
                "books_balance": books["balanced"],
                "books": {"received": books["received"], "accounted": books["accounted"]},
                "diagnostics_messages": len(diags),
                "diagnostics_unbalanced": sum(d.get("accounting_balanced") != "true" for d in diags),
                "answers": len(answers),
                "stamps_answered_twice": len(stamps) - len(set(stamps)),
                "known_good_answered": known[t] in answers,
                "node_alive": alive[t],
                "bombs_included": fz.bombs,
                "rss_mb": {"start": rss_start[t].get("VmRSS", 0) / 1024.0, "end": rss_end.get("VmRSS", 0) / 1024.0,
                           "peak": peak},
                "rss_curve": curves[t],
            })
    for r, p in zip(results, procs.values()):
        r["node_exit_code"] = p.returncode
    return results


def verdict(phase: Dict[str, Any], max_rss_mb: float) -> List[str]:
    """Problems of one phase (empty: it passed)."""
    p = []
    if not phase["node_alive"]:
        p.append("the node died")
    if not phase["every_message_seen"]:
        p.append(f"published {phase['published']} != received {phase['received']} + lost {phase['lost_in_transport']}")
    if not phase["books_balance"]:
        p.append(f"books do not balance: {phase['books']}")
    if phase["diagnostics_unbalanced"]:
        p.append(f"{phase['diagnostics_unbalanced']} /diagnostics messages said accounting_balanced=false")
    if phase["stamps_answered_twice"]:
        p.append(f"{phase['stamps_answered_twice']} stamps answered twice")
    if not phase["known_good_answered"]:
        p.append("the known-good pair was not answered with its header")
    if phase["rss_mb"]["peak"] > max_rss_mb:
        p.append(f"peak RSS {phase['rss_mb']['peak']:.0f} MB > {max_rss_mb:.0f} MB")
    return p


def _plot(curve, path: pathlib.Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = [c[0] / 60.0 for c in curve]
    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.plot(t, [c[1] for c in curve], label="RSS")
    ax.plot(t, [c[2] for c in curve], "--", label="peak RSS (VmHWM)")
    ax.set_xlabel("minutes")
    ax.set_ylabel("MB")
    ax.set_title(title)
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def run(args) -> int:
    os.environ.setdefault("ROS_AUTOMATIC_DISCOVERY_RANGE", "LOCALHOST")
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    duration = args.duration if args.duration is not None else (1800.0 if args.soak else 60.0)
    rng = random.Random(args.seed)
    work = pathlib.Path(tempfile.mkdtemp(prefix="runa_ood_fuzz_"))
    if not node_supports("max_image_pixels"):
        print("fuzz: this node has no max_image_pixels parameter: decompression bombs are NOT sent", flush=True)
    transports = ("raw",) if args.soak else ("raw", "compressed")
    phases = run_phases(transports, duration, rng, work, args.rate, soak=args.soak, sample_s=args.sample_s)
    report = {"seed": args.seed, "duration_s": duration, "soak": bool(args.soak), "phases": phases,
              "problems": [f"{ph['transport']}: {x}" for ph in phases for x in verdict(ph, args.max_rss_mb)],
              "node_logs": str(work)}
    if args.soak:
        curve = phases[0]["rss_curve"]
        with open(out / "rss.csv", "w") as f:
            f.write("t_s,rss_mb,peak_rss_mb\n")
            f.writelines(f"{t},{r:.1f},{h:.1f}\n" for t, r, h in curve)
        _plot(curve, out / "rss.png", f"runa_ood node memory under hostile input ({duration / 60:.0f} min)")
    (out / "report.json").write_text(json.dumps(report, indent=1))
    for ph in phases:
        print(f"[{ph['transport']}] node start-up {ph['startup_s']} s, then {ph['duration_s']:.0f} s of fuzzing")
        print(f"[{ph['transport']}] {sum(ph['messages_by_category'].values())} messages "
              f"({ph['hostile_cases']} hostile cases) by category: {ph['messages_by_category']}")
        print(f"[{ph['transport']}] published {ph['published']}, received {ph['received']}, lost in transport "
              f"{ph['lost_in_transport']}, frames scored {ph['frames_scored']}")
        print(f"[{ph['transport']}] drops by reason: {ph['drops_by_reason']}")
        print(f"[{ph['transport']}] RSS MB start {ph['rss_mb']['start']:.0f}, end {ph['rss_mb']['end']:.0f}, "
              f"peak {ph['rss_mb']['peak']:.0f}; /diagnostics messages {ph['diagnostics_messages']} "
              f"(unbalanced {ph['diagnostics_unbalanced']}); stamps answered twice {ph['stamps_answered_twice']}")
    print("fuzz: " + ("PASSED" if not report["problems"] else "FAILED: " + "; ".join(report["problems"])))
    print(f"report: {out / 'report.json'}")
    return 0 if not report["problems"] else 1
