"""``runa-ood bench-node``: end-to-end latency through the running node vs the core pipeline alone.

Layout (as on a vehicle, where the consumer of the answers is another process):

* **this process**: the node under test (``RunaOodNode``, spun exactly as ``runa_ood_node`` spins
  it, SingleThreadedExecutor), a do-nothing "echo" node on the same executor (the floor), and a
  camera + detector node that publishes a real 640x480 photograph (``sensor_msgs/Image`` rgb8) and
  ``k`` boxes (``vision_msgs/Detection2DArray``). The image crosses no process boundary, for the
  floor and the node alike;
* **a consumer process** (``multiprocessing``, spawn): raw subscriptions to ``ood/detections`` and
  the echo; it timestamps each answer when its bytes arrive (``time.perf_counter``, the system's
  CLOCK_MONOTONIC, comparable across processes) and reports through a pipe. It then deserializes
  the answer with rclpy and reports that time separately (what a Python consumer pays to read the
  richer message; not part of the end-to-end figure, as the floor's header read is not either).

Closed loop, one frame in flight, ``--gap-ms`` idle after each answer (as between camera frames,
so the node's after-publish work - alerts, drawing, accounting - is done before the next frame).
For every frame:

* ``e2e``      camera publish -> ``ood/detections`` bytes at the consumer (ms);
* ``pipeline`` the core pipeline's own time for that frame (``FrameResult.timings["total"]``, read
  through the node's ``frame_observer`` hook for the same stamp);
* ``overhead`` = e2e - pipeline: transport in and out, decoding, conversion, pairing, hand-off,
  building and publishing ``ood/detections``.

The **rclpy floor**: the same image published to a do-nothing node, which answers with its
header - what any Python ROS node pays to receive this image and answer. A second floor receives
**the node's own inputs**: the same image and the same detections, published back to back by the
same camera/detector thread as the node's, and answers with the header once both are in - what
any Python node with this node's interface pays (the detector's publish call and a second message
are in the node's end-to-end time, and in this floor's, but not in the image-only one's). Both
floors are plain rclpy nodes (deserializing subscriptions) on the node's executor. Floor and node
frames alternate, so a slow burst of the shared machine hits them all alike.

Overhead goal: within 0.5 ms of the rclpy floor at p50, judged against both floors; p95 and the
worst frame (with its stage breakdown) are printed too. rclpy's ``rclpy.experimental.EventsExecutor`` (kilted wheels) is not
usable by this node: while it spins, ``publish()`` from another Python thread (the node's scoring
worker) blocks forever when a subscription of the same process listens (re-checked with kilted's
rclpy: a node publishing from a second thread to a topic it also subscribes to hangs at its first
publish, and SIGTERM does not end it). Random weights cost the same time as real ones, so
``--model ViT-B-32`` with random weights is a fair speed test; the numbers say nothing about
quality. Run on an otherwise idle machine; the first ``--warmup`` frames are not counted.

``--cameras 1,3,6`` (issue 19) measures, for each N, ONE node serving N cameras (parameter ``cameras``)
against N single-camera nodes, each node its own process (``python -m runa_ood_node.ros.node``, as on
a vehicle), fed the same frames: this process publishes every camera's image and detections at
``--rate`` Hz (open loop, as cameras do) for ``--duration`` s and times each answer on
``<C>/ood/detections`` (one clock: it sends and receives). Printed: resident memory (the largest
VmRSS seen during the run, summed over the processes), frames scored per second, each camera's p50 /
p95 latency (publish -> answer, queueing included), frames per backend call (the N-camera node's
/diagnostics), and the issue's goals (memory <= 1.3x one single-camera node's, throughput >= the N
nodes'). With an offered rate the nodes keep up with, the throughputs are equal and the latencies
and the CPU tell; raise ``--rate`` to saturate. Per setup it also prints the CPU the node processes,
this driver and the whole machine used while sending, and what the node(s) received, paired, scored
and dropped (by reason) over the measured window, from the change of their /diagnostics counters,
so a frame not answered has a reason. Every process of the run uses one Fast DDS profile
(``--fastdds-profile``; default ``config/fastdds_one_host.xml``, images through shared memory in one
piece): with Fast DDS's default transports a 640x480 image is cut into fragments and arrives in
bursts (p95 ~0.4-1 s on this machine) that overflow the node's queue, and the run then measures the
transport instead of the node. ``--rig-variants 'gather_window_ms=5;scoring_threads=2'`` adds one-node
setups with those parameters on top to the same run (each compared with the N nodes, p50 / p95 next
to the throughput), so that settings are compared under the same load.

``--ab N`` measures, in one run, N alternating rounds with the node's latency optimisations switched
off (image converted with a copy, no hand-off wait: ``ros.node.ZERO_COPY_RGB8`` /
``HANDOFF_WAIT_S``) and on, and prints both side by side.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import pathlib
import random
import sys
import threading
import time
from typing import Dict, List, Optional

import numpy as np

from ..core.metrics import percentile
from ..ros.transport import ONE_HOST_PROFILE, fastdds_profile  # noqa: F401 - shared with the launch file


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--frames", type=int, default=100, help="frames measured (after warm-up) [100]")
    p.add_argument("--warmup", type=int, default=5, help="frames sent first and not counted [5]")
    p.add_argument("--boxes", type=int, default=5, help="boxes per frame (k) [5]")
    p.add_argument("--model", default="runa-tiny-vit", help="open_clip model [runa-tiny-vit]")
    p.add_argument("--pretrained", default="", help="weights tag/path; empty = random weights (speed only) ['']")
    p.add_argument("--backend", default="torch", choices=["auto", "torch", "onnxruntime", "tensorrt"],
                   help="visual backend [torch]")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="[cpu]")
    p.add_argument("--image", default=None, help="a photograph to publish (default: a 640x480 photo of the "
                   "shared ood_pack, resized to 640x480 if needed)")
    p.add_argument("--annotated", action="store_true", help="also subscribe to ood/annotated_image (so the node "
                   "draws it: lazy drawing is otherwise skipped)")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for one frame's result [60]")
    p.add_argument("--gap-ms", type=float, default=20.0,
                   help="idle time after each answer before the next frame, as between camera frames [20]")
    p.add_argument("--json", default=None, help="write the results as JSON here")
    p.add_argument("--cameras", default="", metavar="N[,N...]",
                   help="one node serving N cameras against N single-camera nodes (each its own process), same "
                        "frames: resident memory, frames/s scored, per-camera p50/p95 latency, frames per backend "
                        "call; e.g. 1,3,6 ['' = the single-node latency benchmark]")
    p.add_argument("--rate", type=float, default=15.0, help="--cameras: frames per second per camera [15]")
    p.add_argument("--duration", type=float, default=20.0, help="--cameras: seconds measured per setup [20]")
    p.add_argument("--fastdds-profile", default="one-host", metavar="one-host|env|none|PATH",
                   help="--cameras: the Fast DDS profile of every process of the run (driver and nodes): one-host = "
                        "config/fastdds_one_host.xml (images through shared memory in one piece), env = whatever "
                        "FASTDDS_DEFAULT_PROFILES_FILE says (unset: Fast DDS's defaults, which cut a 640x480 image "
                        "into fragments), none = Fast DDS's defaults, or a profile file [one-host]")
    p.add_argument("--rig-variants", default="", metavar="K=V[,K=V][;...]",
                   help="--cameras: more one-node setups in the same run, each with these node parameters on top "
                        "(e.g. 'scoring_threads=2;scoring_threads=2,gather_window_ms=5'), each compared with the N "
                        "nodes [none]")
    p.add_argument("--ab", type=int, default=0, metavar="ROUNDS",
                   help="A/B in one run: alternate ROUNDS times between the node's latency optimisations "
                        "switched off (copying image conversion, no hand-off wait) and on, and print both "
                        "side by side [0 = off]")


def _find_photo(path) -> np.ndarray:
    import cv2

    if path:
        bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
        if bgr is None:
            raise SystemExit(f"cannot read image {path}")
    else:
        from ..core.paths import data_pack_annotations

        # the data pack's annotation file ($RUNA_OOD_DATA_PACK; or a pack folder in $RUNA_OOD_PACK): no path is guessed
        folder = os.environ.get("RUNA_OOD_PACK", "").strip()
        ann_file = data_pack_annotations() or (pathlib.Path(folder) / "annotations.json" if folder else None)
        if ann_file is None or not ann_file.exists():
            raise SystemExit(f"no --image given and no data pack ({ann_file or 'none named'}): pass --image or set "
                             "RUNA_OOD_DATA_PACK to an annotations.json")
        pack = ann_file.parent
        ann = json.loads(ann_file.read_text())
        img = next((i for i in ann["images"] if (i["width"], i["height"]) == (640, 480)), ann["images"][0])
        bgr = cv2.imread(str(pack / img["file_name"]), cv2.IMREAD_COLOR)
    if bgr.shape[:2] != (480, 640):
        bgr = cv2.resize(bgr, (640, 480), interpolation=cv2.INTER_AREA)
    return np.ascontiguousarray(bgr[:, :, ::-1])


def _boxes(k: int, w: int = 640, h: int = 480, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    wh = rng.uniform(40, 200, (k, 2))
    xy = rng.uniform(0, 1, (k, 2)) * (np.array([w, h]) - wh)
    return np.concatenate([xy, xy + wh], 1)


def _stats(values: List[float]) -> Dict[str, float]:
    a = np.asarray([v for v in values if math.isfinite(v)], np.float64)
    if not a.size:
        return {"p50": math.nan, "p95": math.nan, "mean": math.nan, "max": math.nan, "n": 0}
    return {"p50": percentile(a, 50), "p95": percentile(a, 95), "mean": float(a.mean()),
            "max": float(a.max()), "n": int(a.size)}


def run(args) -> int:
    """Run the benchmark (``--ab``: the A/B comparison; ``--cameras``: one node for N cameras against
    N nodes); exit status 0 when no frame was lost."""
    if args.cameras:
        return _run_cameras(args)
    if not args.ab:
        return _run_once(args)
    from ..ros import node as node_mod

    saved = (node_mod.HANDOFF_WAIT_S, node_mod.ZERO_COPY_RGB8)
    rows: Dict[str, List[dict]] = {"off": [], "on": []}
    code = 0
    try:
        for _ in range(args.ab):
            for key, (yield_s, zero_copy) in (("off", (None, False)), ("on", saved)):
                node_mod.HANDOFF_WAIT_S, node_mod.ZERO_COPY_RGB8 = yield_s, zero_copy
                print(f"\n=== optimisations {key.upper()}")
                res: dict = {}
                code |= _run_once(args, res)
                rows[key].append(res)
    finally:
        node_mod.HANDOFF_WAIT_S, node_mod.ZERO_COPY_RGB8 = saved
    print("\nA/B (p50 ms per round; off = copying conversion + no hand-off wait, on = current):")
    keys = [("overhead", "overhead_ms"), ("e2e", "e2e_ms"), ("pipeline", "pipeline_ms"),
            ("floor", "transport_floor_ms"), ("floor2", "inputs_floor_ms")]
    stage_keys = ("inputs_in (publish -> paired)", "wait", "convert", "publish", "result_out (published -> client)")
    for key in ("off", "on"):
        for i, r in enumerate(rows[key]):
            if not r:
                continue
            cells = [f"{n} {r[k]['p50']:6.2f}" for n, k in keys]
            cells += [f"{n.split()[0]} {r['node_stages_ms'][n]['p50']:5.2f}" for n in stage_keys
                      if n in r["node_stages_ms"]]
            print(f"  {key:>3} #{i + 1}: " + "  ".join(cells))
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(rows, indent=2))
    return code


def _consumer(conn, cfg: dict) -> None:
    """The consumer of the answers, in a process of its own (as a planner or a driver HMI would
    be): raw subscriptions to ``ood/detections`` and the floor's echo; each answer is timestamped
    when its bytes arrive and reported through ``conn`` as ``(kind, stamp_ns, t)``; a node answer
    is then deserialized with rclpy, timed and reported as ``("deser", stamp_ns, ms)``. Runs until
    the benchmark sends ``"stop"``."""
    import rclpy
    from rclpy.executors import SingleThreadedExecutor
    from rclpy.node import Node
    from rclpy.qos import QoSProfile, ReliabilityPolicy
    from rclpy.serialization import deserialize_message

    from ..ros import wire
    from runa_ood_msgs.msg import OodDetectionArray
    from sensor_msgs.msg import Image
    from std_msgs.msg import Header

    ctx = rclpy.Context()
    rclpy.init(context=ctx)
    node = Node("runa_ood_bench_consumer", namespace=cfg["namespace"], context=ctx)
    ex = SingleThreadedExecutor(context=ctx)
    spinner = None
    send_lock = threading.Lock()

    def send(item):
        with send_lock:
            conn.send(item)

    try:
        qos = QoSProfile(depth=10, reliability=ReliabilityPolicy.RELIABLE)

        def on_result(raw):
            t = time.perf_counter()
            stamp = wire.header_stamp_ns(raw)
            send(("node", stamp, t))
            t1 = time.perf_counter()  # what this consumer then pays to read the answer
            deserialize_message(raw, OodDetectionArray)
            send(("deser", stamp, (time.perf_counter() - t1) * 1e3))

        def on_echo(kind):
            def cb(raw):
                t = time.perf_counter()
                send((kind, wire.header_stamp_ns(raw), t))
            return cb

        sub_res = node.create_subscription(OodDetectionArray, "ood/detections", on_result, qos, raw=True)
        sub_echo = node.create_subscription(Header, "bench_floor/echo", on_echo("floor"), qos, raw=True)
        sub_echo2 = node.create_subscription(Header, "bench_floor2/echo", on_echo("floor2"), qos, raw=True)
        if cfg["annotated"]:
            node.create_subscription(Image, "ood/annotated_image", lambda m: None, qos, raw=True)
        ex.add_node(node)
        spinner = threading.Thread(target=ex.spin, daemon=True)
        spinner.start()
        end = time.monotonic() + 30
        while min(sub_res.get_publisher_count(), sub_echo.get_publisher_count(), sub_echo2.get_publisher_count()) == 0:
            if time.monotonic() > end:
                send(("error", 0, "the consumer discovered no publisher of ood/detections or the floor's echo"))
                return
            time.sleep(0.01)
        send(("ready", 0, 0.0))
        while conn.recv() != "stop":
            pass
    except Exception as exc:  # reported by the benchmark process
        send(("error", 0, f"{type(exc).__name__}: {exc}"))
    finally:
        ex.shutdown()
        if spinner is not None:
            spinner.join(timeout=5)
        node.destroy_node()
        rclpy.shutdown(context=ctx)


def _ros_messages():
    """Discovery kept on this machine, a DDS domain of the benchmark's own; the message classes it
    uses (a namespace), or None (said on stderr) when the message packages are not built."""
    os.environ.setdefault("ROS_AUTOMATIC_DISCOVERY_RANGE", "LOCALHOST")  # never discover off this machine
    os.environ.setdefault("ROS_DOMAIN_ID", str(random.SystemRandom().randint(1, 100)))
    import types

    try:
        from diagnostic_msgs.msg import DiagnosticArray
        from runa_ood_msgs.msg import OodDetectionArray
        from sensor_msgs.msg import Image
        from std_msgs.msg import Header
        from vision_msgs.msg import Detection2DArray
    except ImportError as exc:
        print(f"message packages not found ({exc}): run `bash scripts/setup.sh` and `source scripts/env.sh`",
              file=sys.stderr)
        return None
    return types.SimpleNamespace(DiagnosticArray=DiagnosticArray, OodDetectionArray=OodDetectionArray, Image=Image,
                                 Header=Header, Detection2DArray=Detection2DArray)


def _node_params(args) -> dict:
    """The node's parameters in every benchmark: the model of the arguments, no health verdicts."""
    return {"model": args.model, "pretrained": args.pretrained, "allow_random_weights": not args.pretrained,
            "backend": args.backend, "device": args.device, "image_qos": "reliable",
            "health.latency_budget_ms": 1e6, "health.frame_timeout_s": 3600.0, "max_boxes": max(args.boxes, 1)}


def _run_once(args, out: Optional[dict] = None) -> int:
    msgs = _ros_messages()
    if msgs is None:
        return 2
    Image, Header, Detection2DArray = msgs.Image, msgs.Header, msgs.Detection2DArray
    import multiprocessing

    import rclpy
    from rclpy.executors import SingleThreadedExecutor
    from rclpy.node import Node
    from rclpy.parameter import Parameter
    from rclpy.qos import QoSProfile, ReliabilityPolicy
    from tqdm import tqdm

    from ..ros import convert
    from ..ros.node import RunaOodNode

    rgb = _find_photo(args.image)
    boxes = _boxes(args.boxes)
    ctx = rclpy.Context()
    rclpy.init(context=ctx)
    params = dict(_node_params(args), image_queue_size=10, processing_queue_size=10)
    # every node of the benchmark in a namespace of its own: no other node on this machine (a running
    # runa_ood, another benchmark, a test's node) hears its frames or answers on its topics
    ns = f"/runa_ood_bench_{os.getpid()}_{random.SystemRandom().randint(0, 1 << 30)}"
    node = RunaOodNode("runa_ood_bench", namespace=ns, context=ctx,
                       parameter_overrides=[Parameter(k, value=v) for k, v in params.items()])
    ex_node = proc = here = None
    spinner = None
    try:
        print(f"loading {args.model} ({args.pretrained or 'RANDOM weights: speed only'}) on {args.backend}/{args.device} ...")
        if not node.autostart():
            print(f"node start-up failed: {node.last_error}", file=sys.stderr)
            return 1
        observed: Dict[int, object] = {}
        cv = threading.Condition()

        def on_frame(rec):
            with cv:
                observed[rec.stamp_ns] = rec
                cv.notify_all()

        node.frame_observer = on_frame
        qos = QoSProfile(depth=10, reliability=ReliabilityPolicy.RELIABLE)
        # the floor: a do-nothing rclpy node on the node's executor answers each image with its Header
        echo = Node("runa_ood_bench_echo", namespace=ns, context=ctx)
        echo_pub = echo.create_publisher(Header, "bench_floor/echo", qos)
        echo.create_subscription(Image, "bench_floor/image", lambda m: echo_pub.publish(m.header), qos)
        # the floor with the node's inputs: answers once the image and the detections of a stamp are in
        echo2 = Node("runa_ood_bench_echo_inputs", namespace=ns, context=ctx)
        echo2_pub = echo2.create_publisher(Header, "bench_floor2/echo", qos)
        pending: Dict[int, int] = {}

        def on_floor2_input(m):
            st = m.header.stamp.sec * 1_000_000_000 + m.header.stamp.nanosec
            if pending.pop(st, None) is None:
                pending[st] = 1
            else:
                echo2_pub.publish(m.header)

        echo2.create_subscription(Image, "bench_floor2/image", on_floor2_input, qos)
        echo2.create_subscription(Detection2DArray, "bench_floor2/detections", on_floor2_input, qos)
        # the camera and the detector: publishers in this process (the 640x480 image crosses no process
        # boundary, for the floor and the node alike); the consumer of both answers is another process
        camera = Node("runa_ood_bench_camera", namespace=ns, context=ctx)
        pub_img = camera.create_publisher(Image, "image", qos)
        pub_det = camera.create_publisher(Detection2DArray, "detections", qos)
        floor_pub = camera.create_publisher(Image, "bench_floor/image", qos)
        floor2_img = camera.create_publisher(Image, "bench_floor2/image", qos)
        floor2_det = camera.create_publisher(Detection2DArray, "bench_floor2/detections", qos)
        ex_node = SingleThreadedExecutor(context=ctx)
        ex_node.add_node(node)
        ex_node.add_node(echo)
        ex_node.add_node(echo2)
        spinner = threading.Thread(target=ex_node.spin, daemon=True)
        spinner.start()
        mp = multiprocessing.get_context("spawn")
        here, there = mp.Pipe()
        proc = mp.Process(target=_consumer, name="runa_ood_bench_consumer", daemon=True,
                          args=(there, {"annotated": args.annotated, "namespace": ns}))
        proc.start()
        rx: Dict[tuple, float] = {}
        deser: Dict[int, float] = {}

        def wait_for(kind: str, stamp: int, timeout: float) -> bool:
            end = time.monotonic() + timeout
            while (kind, stamp) not in rx:
                left = end - time.monotonic()
                if left <= 0 or not here.poll(left):
                    return False
                k, s_ns, v = here.recv()
                if k == "error":
                    raise RuntimeError(f"consumer: {v}")
                if k == "deser":
                    deser[s_ns] = v
                else:
                    rx[(k, s_ns)] = v
            return True

        if not wait_for("ready", 0, 60):
            print("the consumer process did not come up", file=sys.stderr)
            return 1
        end = time.monotonic() + 30
        while min(pub_img.get_subscription_count(), pub_det.get_subscription_count(),
                  floor_pub.get_subscription_count(), floor2_img.get_subscription_count(),
                  floor2_det.get_subscription_count()) == 0:
            if time.monotonic() > end:
                print("discovery timed out", file=sys.stderr)
                return 1
            time.sleep(0.01)

        gap = args.gap_ms * 1e-3
        e2e, pipe, node_ms, over, floor, floor2, stamps, consumer = [], [], [], [], [], [], [], []
        floor_of: Dict[int, float] = {}
        floor2_of: Dict[int, float] = {}
        stages: Dict[str, List[float]] = {}
        lost = 0
        total = args.warmup + args.frames
        base = time.time_ns()
        # floor and node frames alternate, so a slow burst of a shared machine hits both alike
        def publish(pubs, stamp: int) -> float:
            """The camera's image (and the detector's boxes, for two publishers) stamped ``stamp``,
            built first (a driver's job), then published back to back; returns when publishing began."""
            h = convert.copy_header(None)
            h.stamp = convert.ns_to_stamp(stamp)
            h.frame_id = "camera"
            msgs = [convert.rgb_to_image(rgb, h)]
            if len(pubs) > 1:
                msgs.append(convert.boxes_to_detections(h, boxes, scores=[0.9] * len(boxes)))
            t0 = time.perf_counter()
            for pub, msg in zip(pubs, msgs):
                pub.publish(msg)
            return t0

        def floor_frame(kind: str, pubs, stamp: int, i: int, series: List[float], of: Dict[int, float]) -> None:
            t0 = publish(pubs, stamp)
            if wait_for(kind, stamp, args.timeout) and i >= args.warmup:
                series.append((rx[(kind, stamp)] - t0) * 1e3)
                of[i] = series[-1]
            time.sleep(gap)

        for i in tqdm(range(total), desc="frames", unit="frame", file=sys.stderr):
            floor_frame("floor", (floor_pub,), base - (i + 1) * 1000, i, floor, floor_of)
            # the floor with the node's inputs, published as the node's are
            floor_frame("floor2", (floor2_img, floor2_det), base - (i + 1) * 1000 - 500, i, floor2, floor2_of)
            stamp = base + i * 33_333_333
            t0 = publish((pub_img, pub_det), stamp)
            ok = wait_for("node", stamp, args.timeout)
            with cv:  # the observer fires after the node's after-publish work (alerts, drawing)
                ok = cv.wait_for(lambda: stamp in observed, timeout=args.timeout) and ok
            wait_for("deser", stamp, 0.0)
            time.sleep(gap)  # idle between frames, as between camera frames
            if not ok:
                lost += 1
                continue
            if i < args.warmup:
                continue
            rec, t_rx = observed[stamp], rx[("node", stamp)]
            e = (t_rx - t0) * 1e3
            e2e.append(e)
            stamps.append(i)
            pipe.append(rec.pipeline_ms)
            node_ms.append(rec.node_ms)
            over.append(e - rec.pipeline_ms)
            stages.setdefault("inputs_in (publish -> paired)", []).append((rec.t_pair - t0) * 1e3)
            for k, v in (rec.stages_ms or {}).items():
                if k != "secondary":  # after ood/detections is out: not in the end-to-end path
                    stages.setdefault(k, []).append(v)
            stages.setdefault("result_out (published -> consumer)", []).append((t_rx - rec.t_published) * 1e3)
        wait_for("deser", -1, 0.5)  # collect the last deserialization reports
        consumer = [deser[base + i * 33_333_333] for i in stamps if base + i * 33_333_333 in deser]
        acc = node.accounting()
        worst = int(np.argmax(over)) if over else None
        result = {
            "executor": type(ex_node).__name__,
            "layout": "camera+detector publishers, node and floor echo in one process; consumer in another",
            "model": args.model, "random_weights": node.random_weights, "backend": node.backend_name,
            "device": args.device, "boxes": args.boxes, "frames": len(e2e), "lost": lost,
            "image": "640x480 rgb8", "gap_ms": args.gap_ms,
            "e2e_ms": _stats(e2e), "pipeline_ms": _stats(pipe), "node_processing_ms": _stats(node_ms),
            "overhead_ms": _stats(over), "transport_floor_ms": _stats(floor), "inputs_floor_ms": _stats(floor2),
            "node_stages_ms": {k: _stats(v) for k, v in stages.items()},
            "consumer_deserialize_ms": _stats(consumer),
            # per frame: the node's overhead minus the floor frame measured just before it, so a
            # drift of the shared machine's speed cancels; its median is the figure to compare
            "paired_gap_ms": _stats([o - floor_of[i] for o, i in zip(over, stamps) if i in floor_of]),
            "paired_gap_inputs_floor_ms": _stats([o - floor2_of[i] for o, i in zip(over, stamps) if i in floor2_of]),
            "overhead_minus_floor_p50_ms": (percentile(over, 50) - percentile(floor, 50)
                                            if over and floor else math.nan),
            "overhead_minus_inputs_floor_p50_ms": (percentile(over, 50) - percentile(floor2, 50)
                                                   if over and floor2 else math.nan),
            "worst_frame": None if worst is None else {
                "frame": stamps[worst], "overhead_ms": over[worst], "e2e_ms": e2e[worst], "pipeline_ms": pipe[worst],
                "stages_ms": {k: v[worst] for k, v in stages.items() if len(v) == len(over)}},
            "accounting_balanced": acc["balanced"],
            "frame_drops": acc["frame_drops"],
        }
    except RuntimeError as exc:
        print(str(exc), file=sys.stderr)
        return 1
    finally:
        if proc is not None:
            try:
                here.send("stop")
            except (OSError, ValueError):
                pass
            proc.join(timeout=10)
            if proc.is_alive():
                proc.kill()
        if ex_node is not None:
            ex_node.shutdown()
        if spinner is not None:
            spinner.join(timeout=5)
        try:
            node.trigger_shutdown()
        except Exception:
            pass
        node.destroy_node()
        rclpy.shutdown(context=ctx)

    def row(name, s):
        return (f"  {name:<36} p50 {s['p50']:8.2f}   p95 {s['p95']:8.2f}   mean {s['mean']:8.2f}   "
                f"worst {s.get('max', math.nan):8.2f}")

    print(f"\nbench-node: {result['model']} ({'RANDOM weights' if result['random_weights'] else 'pretrained'}), "
          f"backend {result['backend']}/{args.device}, 640x480 rgb8, {args.boxes} boxes, {result['frames']} frames"
          f"{f', {lost} LOST' if lost else ''}, {result['executor']}, consumer in its own process  [ms]")
    print(row("end-to-end (client)", result["e2e_ms"]))
    print(row("core pipeline", result["pipeline_ms"]))
    print(row("node processing", result["node_processing_ms"]))
    print(row("node overhead", result["overhead_ms"]))
    print(row("rclpy floor (image in, header out)", result["transport_floor_ms"]))
    print(row("rclpy floor, node's inputs (image + dets)", result["inputs_floor_ms"]))
    print("  where the end-to-end time goes:")
    for k, s in result["node_stages_ms"].items():
        print(row(f"  {k}", s))
    print(row("consumer: deserializing the result", result["consumer_deserialize_ms"]))
    print("    (what a Python consumer then pays to read OodDetectionArray with rclpy: outside the end-to-end "
          "time, which stops when the bytes arrive, as the floor's does)")
    for name, d, g in (("rclpy floor (image in, header out)", result["overhead_minus_floor_p50_ms"],
                        result["paired_gap_ms"]),
                       ("rclpy floor with the node's inputs (image + detections in, header out)",
                        result["overhead_minus_inputs_floor_p50_ms"], result["paired_gap_inputs_floor_ms"])):
        verdict = "meets" if d <= 0.5 else "MISSES"
        print(f"  node overhead - {name} at p50: {d:+.2f} ms ({verdict} the goal: within 0.5 ms); paired (each node "
              f"frame minus that floor's frame just before it): median {g['p50']:+.2f} ms, p95 {g['p95']:+.2f} ms")
    print("    overhead = end-to-end - core pipeline, per frame; a floor is what any Python node pays to receive "
          "these inputs and answer (same executor, no work); the paired median is less moved by a slow drift of "
          "the machine's speed than the p50 difference")
    w = result["worst_frame"]
    if w:
        st = ", ".join(f"{k.split()[0]} {v:.2f}" for k, v in w["stages_ms"].items())
        print(f"  worst frame: #{w['frame']}: overhead {w['overhead_ms']:.2f} ms, end-to-end {w['e2e_ms']:.2f}, "
              f"pipeline {w['pipeline_ms']:.2f} ({st})")
    if out is not None:
        out.update(result)
    elif args.json:
        pathlib.Path(args.json).write_text(json.dumps(result, indent=2))
        print(f"  written {args.json}")
    return 0 if not lost else 1


# ============================================================================ --cameras: one node vs N nodes
def _parse_counts(text: str) -> List[int]:
    try:
        counts = [int(t) for t in str(text).replace(" ", "").split(",") if t]
    except ValueError:
        raise SystemExit(f"--cameras: a comma-separated list of camera counts (1,3,6), got {text!r}") from None
    if not counts or min(counts) < 1 or max(counts) > 32:
        raise SystemExit(f"--cameras: counts in [1, 32], got {text!r}")
    return counts


def _rss_mb(pid: int) -> float:
    """Resident memory of process ``pid`` (MB), NaN when it is gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return math.nan


def _start_node_process(ns: str, params: dict, workdir: pathlib.Path, tag: str):
    """``runa_ood_node`` as its own process (as on a vehicle) in namespace ``ns``, its log in ``workdir``."""
    import subprocess

    import yaml

    pfile = workdir / f"{tag}.yaml"
    pfile.write_text(yaml.safe_dump({"/**": {"ros__parameters": params}}))
    log = open(workdir / f"{tag}.log", "w")
    cmd = [sys.executable, "-m", "runa_ood_node.ros.node", "--ros-args", "-r", f"__ns:={ns}",
           "--params-file", str(pfile), "--log-level", "warn"]
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True), log


def _cpu_s(pid: int) -> float:
    """CPU time (user + system, s) process ``pid`` has used, NaN when it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return math.nan


def _system_busy_s() -> float:
    """CPU time (s, summed over the cores) the machine has spent busy (not idle or waiting on I/O)."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    return (sum(v[:8]) - v[3] - v[4]) / os.sysconf("SC_CLK_TCK")


def _cpu_snapshot(pids: List[int]) -> np.ndarray:
    """CPU seconds used so far by: the processes ``pids`` together, this process, the whole machine."""
    return np.array([sum(_cpu_s(pid) for pid in pids), _cpu_s(os.getpid()), _system_busy_s()])


def summarize_cameras_run(sent: Dict[str, Dict[int, float]], answered: Dict[str, Dict[int, float]],
                          duration_s: float) -> dict:
    """Figures of one --cameras run from the send and answer times (perf_counter s) per camera and
    stamp: frames answered per second over ``duration_s`` (first frame sent -> last answer),
    per-camera p50 / p95 latency (ms), frames not answered (dropped to keep the answers fresh)."""
    per_cam = {}
    n_ans = 0
    for cam, s in sent.items():
        got = answered.get(cam, {})
        lat = [(got[st] - t) * 1e3 for st, t in s.items() if st in got]
        n_ans += len(lat)
        st = _stats(lat)
        per_cam[cam] = {"sent": len(s), "answered": len(lat), "p50_ms": st["p50"], "p95_ms": st["p95"]}
    p50s = [c["p50_ms"] for c in per_cam.values() if math.isfinite(c["p50_ms"])]
    p95s = [c["p95_ms"] for c in per_cam.values() if math.isfinite(c["p95_ms"])]
    return {"frames_sent": sum(c["sent"] for c in per_cam.values()), "frames_answered": n_ans,
            "fps": n_ans / duration_s if duration_s > 0 else math.nan,
            "p50_ms_mean_over_cameras": float(np.mean(p50s)) if p50s else math.nan,
            "p95_ms_worst_camera": max(p95s) if p95s else math.nan, "per_camera": per_cam}


def _run_cameras(args) -> int:
    """One node serving N cameras against N single-camera nodes (each its own process), same frames:
    resident memory, frames scored per second, per-camera p50 / p95 latency, frames per backend call."""
    import tempfile

    import rclpy

    counts = _parse_counts(args.cameras)
    try:
        profile = fastdds_profile(args.fastdds_profile)
    except FileNotFoundError as exc:
        print(f"bench-node: {exc}", file=sys.stderr)
        return 2
    # before this process's first DDS participant; the node processes inherit it
    if profile:
        os.environ["FASTDDS_DEFAULT_PROFILES_FILE"] = profile
    else:
        os.environ.pop("FASTDDS_DEFAULT_PROFILES_FILE", None)
    args.transport = f"Fast DDS profile {profile}" if profile else "Fast DDS default transports"
    msgs = _ros_messages()
    if msgs is None:
        return 2
    rgb = _find_photo(args.image)
    boxes = _boxes(args.boxes)
    base = dict(_node_params(args), publish_annotated=False)
    workdir = pathlib.Path(tempfile.mkdtemp(prefix="runa_ood_bench_cams_"))
    ctx = rclpy.Context()
    rclpy.init(context=ctx)
    rows: List[dict] = []
    code = 0
    try:
        variants = _parse_variants(args.rig_variants)
    except ValueError as exc:
        print(f"bench-node: --rig-variants: {exc}", file=sys.stderr)
        return 2
    try:
        for n in counts:
            setups = [("one node", {})] + [(f"one node [{_variant_name(v)}]", v) for v in variants] + [(f"{n} nodes", None)]
            for setup, extra in setups:
                ns = f"/runa_ood_bench_cams_{os.getpid()}_{random.SystemRandom().randint(0, 1 << 30)}"
                cams = [f"cam{i}" for i in range(n)]
                procs = []
                try:
                    if extra is not None:  # one node for every camera (+ the variant's parameters)
                        tag = f"n{n}_one" + (f"_v{variants.index(extra)}" if extra else "")
                        procs.append(_start_node_process(ns, dict(base, cameras=cams, **extra), workdir, tag))
                    else:
                        for c in cams:
                            procs.append(_start_node_process(f"{ns}/{c}", dict(base), workdir, f"n{n}_{c}"))
                    row = _drive_cameras(args, ctx, ns, cams, procs, rgb, boxes, msgs)
                finally:
                    for p, log in procs:
                        if p.poll() is None:
                            import signal

                            os.killpg(p.pid, signal.SIGINT)
                    for p, log in procs:
                        try:
                            p.wait(timeout=30)
                        except Exception:
                            os.killpg(p.pid, 9)
                            p.wait(timeout=10)
                        log.close()
                row.update({"cameras": n, "setup": setup, "processes": len(procs), "rig": extra is not None})
                rows.append(row)
                if row.get("error"):
                    print(f"  N={n} {setup}: {row['error']} (logs in {workdir})", file=sys.stderr)
                    code = 1
                else:
                    print(f"  N={n} {setup}: RSS {row['rss_mb_total']:7.0f} MB, {row['fps']:6.1f} frames/s scored "
                          f"(offered {row['offered_fps']:.0f}), p50 {row['p50_ms_mean_over_cameras']:7.1f} ms, "
                          f"p95 {row['p95_ms_worst_camera']:7.1f} ms, {row['frames_per_backend_call']:.2f} frames/call",
                          flush=True)
                    print(f"      CPU while sending (% of one core): node(s) {row['cpu_pct_nodes']:.0f}, driver "
                          f"{row['cpu_pct_driver']:.0f}, machine {row['cpu_pct_machine']:.0f} of {100 * (os.cpu_count() or 1)}", flush=True)
                    nc = row.get("node_counts") or {}
                    if nc:
                        print("      the node(s) over the window: " + ", ".join(f"{k} {v}" for k, v in nc.items()), flush=True)
    finally:
        rclpy.shutdown(context=ctx)
    _print_cameras_table(args, rows)
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps({"args": {k: getattr(args, k) for k in (
            "cameras", "model", "pretrained", "backend", "device", "boxes", "rate", "duration", "transport")},
            "rows": rows}, indent=2))
        print(f"  written {args.json}")
    return code


def _drive_cameras(args, ctx, ns, cams, procs, rgb, boxes, msgs) -> dict:
    """Publish every camera's frames at ``--rate`` for ``--duration`` s to the node(s) in ``ns`` and
    time the answers (this process sends and receives: one clock)."""
    from rclpy.executors import SingleThreadedExecutor
    from rclpy.node import Node
    from rclpy.qos import QoSProfile, ReliabilityPolicy

    from ..ros import convert, wire

    Image, Detection2DArray = msgs.Image, msgs.Detection2DArray
    OodDetectionArray, DiagnosticArray = msgs.OodDetectionArray, msgs.DiagnosticArray
    qos = QoSProfile(depth=10, reliability=ReliabilityPolicy.RELIABLE)
    drv = Node("runa_ood_bench_cams_driver", namespace=ns, context=ctx)
    lock = threading.Lock()
    answered: Dict[str, Dict[int, float]] = {c: {} for c in cams}

    def on_answer(cam):
        def cb(raw):
            t = time.perf_counter()
            st = wire.header_stamp_ns(raw)
            with lock:
                answered[cam][st] = t
        return cb

    diag: Dict[str, Dict[str, str]] = {}

    def on_diag(msg):
        for st in msg.status:
            if st.name.startswith(ns + "/"):
                kv = {k.key: k.value for k in st.values}
                with lock:
                    diag[st.name] = kv

    pubs = {}
    for c in cams:
        pubs[c] = (drv.create_publisher(Image, f"{c}/image", qos), drv.create_publisher(Detection2DArray, f"{c}/detections", qos))
        drv.create_subscription(OodDetectionArray, f"{c}/ood/detections", on_answer(c), qos, raw=True)
    drv.create_subscription(DiagnosticArray, "/diagnostics", on_diag, QoSProfile(depth=50, reliability=ReliabilityPolicy.RELIABLE))
    ex = SingleThreadedExecutor(context=ctx)
    ex.add_node(drv)
    spinner = threading.Thread(target=ex.spin, daemon=True)
    spinner.start()
    header = convert.copy_header(None)
    img = convert.rgb_to_image(rgb, header)
    dets = convert.boxes_to_detections(header, boxes.astype(np.float64), scores=[0.9] * len(boxes))
    stamp = [int(time.time() * 1e9)]

    def send(cam) -> int:
        stamp[0] += 1000
        s = convert.ns_to_stamp(stamp[0])
        img.header.stamp = s
        dets.header.stamp = s
        pi, pd = pubs[cam]
        pi.publish(img)
        pd.publish(dets)
        return stamp[0]

    rss_max = [0.0] * len(procs)
    try:
        end = time.monotonic() + max(args.timeout, 300.0)  # N processes importing torch on a shared CPU
        while not all(pi.get_subscription_count() and pd.get_subscription_count()
                      and drv.count_publishers(f"{ns}/{c}/ood/detections") for c, (pi, pd) in pubs.items()):
            if time.monotonic() > end or any(p.poll() is not None for p, _ in procs):
                return {"error": "the node(s) did not come up"}
            time.sleep(0.2)
        # warm-up: every camera answered at least once (model loaded, first frames through)
        end = time.monotonic() + max(args.timeout, 300.0)
        while True:
            with lock:
                ready = all(answered[c] for c in cams)
            if ready:
                break
            if time.monotonic() > end:
                return {"error": "no answers during the warm-up"}
            for c in cams:
                send(c)
            time.sleep(0.3)
        time.sleep(1.0)
        with lock:
            for c in cams:
                answered[c].clear()
            diag_start = {k: dict(v) for k, v in diag.items()}
        sent: Dict[str, Dict[int, float]] = {c: {} for c in cams}
        period = 1.0 / args.rate
        pids = [p.pid for p, _ in procs]
        cpu0 = _cpu_snapshot(pids)
        t0 = time.perf_counter()
        next_rss = 0.0
        k = 0
        while True:  # open loop: every camera at --rate, as cameras do
            due = t0 + k * period
            now = time.perf_counter()
            if due - t0 >= args.duration:
                break
            if due > now:
                time.sleep(due - now)
            for c in cams:
                t = time.perf_counter()
                sent[c][send(c)] = t
            k += 1
            if time.perf_counter() >= next_rss:
                rss_max = [max(m, _rss_mb(p.pid)) for m, (p, _) in zip(rss_max, procs)]
                next_rss = time.perf_counter() + 0.5
        # CPU while sending, % of one core: the node processes together, this driver, the machine
        cpu_nodes, cpu_driver, cpu_machine = 100.0 * (_cpu_snapshot(pids) - cpu0) / (time.perf_counter() - t0)
        # the answers of the frames still queued: until none came for twice the slowest latency so far
        # (at least 3 s, at most --timeout); frames/s = answers / (last answer - first frame sent)
        end = time.perf_counter() + args.timeout
        while time.perf_counter() < end:
            with lock:
                times = [(t - sent[c][st]) for c, v in answered.items() for st, t in v.items() if st in sent[c]]
                last = max((t for v in answered.values() for t in v.values()), default=t0)
            if time.perf_counter() - last > max(3.0, 2.0 * max(times, default=0.0)):
                break
            time.sleep(0.2)
        time.sleep(1.5)  # one more /diagnostics (published every second) after the last answer
        with lock:
            got = {c: dict(v) for c, v in answered.items()}
            diag_end = {k: dict(v) for k, v in diag.items()}
        last = max((t for v in got.values() for t in v.values()), default=t0)
        out = summarize_cameras_run(sent, got, max(last - t0, args.duration))
        out["node_counts"] = _diag_delta(diag_start, diag_end)
        fpc = [float(kv.get("frames_per_backend_call", 1.0)) for kv in diag_end.values()]
        out.update({"offered_fps": len(cams) * args.rate, "rss_mb_total": float(sum(rss_max)),
                    "rss_mb_per_process": rss_max,
                    "cpu_pct_nodes": float(cpu_nodes), "cpu_pct_driver": float(cpu_driver),
                    "cpu_pct_machine": float(cpu_machine),
                    "frames_per_backend_call": float(np.mean(fpc)) if fpc and len(procs) == 1 else 1.0})
        return out
    finally:
        ex.shutdown()
        spinner.join(timeout=5)
        drv.destroy_node()


#: /diagnostics keys whose change over the measured window the --cameras run reports (summed over
#: the cameras' statuses): what the node(s) received, scored and dropped, by reason
_COUNT_KEYS = ("messages_received.image", "messages_lost.image", "frames_paired", "frames_scored")


def _parse_variants(text: str) -> List[Dict[str, object]]:
    """``'scoring_threads=2;scoring_threads=2,gather_window_ms=5'`` -> one parameter dict per variant
    (values read as YAML scalars, then as the parameter table's type: ``5`` for a float parameter is 5.0,
    which ROS would otherwise refuse as an integer)."""
    import yaml

    from ..ros.params import PARAMETERS

    kinds = {spec.name: spec.kind for spec in PARAMETERS}
    out = []
    for part in (text or "").split(";"):
        if not part.strip():
            continue
        params: Dict[str, object] = {}
        for kv in part.split(","):
            key, sep, value = kv.partition("=")
            if not sep or not key.strip():
                raise ValueError(f"{kv!r} is not NAME=VALUE")
            key, value = key.strip(), yaml.safe_load(value.strip())
            if key not in kinds:
                raise ValueError(f"{key!r} is not a node parameter")
            params[key] = float(value) if kinds[key] == "float" and isinstance(value, int) else value
        out.append(params)
    return out


def _variant_name(params: Dict[str, object]) -> str:
    return ",".join(f"{k}={v}" for k, v in params.items())


def _diag_delta(start: Dict[str, Dict[str, str]], end: Dict[str, Dict[str, str]]) -> Dict[str, int]:
    """Change of the counting /diagnostics keys (``_COUNT_KEYS`` and every ``drops.*``) between two
    snapshots {status name: {key: value}}, summed over the statuses; zero changes left out."""
    out: Dict[str, int] = {}
    for name, kv in end.items():
        before = start.get(name, {})
        for k, v in kv.items():
            if k in _COUNT_KEYS or k.startswith("drops."):
                try:
                    d = int(v) - int(before.get(k, 0))
                except ValueError:
                    continue
                out[k] = out.get(k, 0) + d
    return {k: n for k, n in sorted(out.items()) if n or k in _COUNT_KEYS}


def _print_cameras_table(args, rows: List[dict]) -> None:
    print(f"\nbench-node --cameras: {args.model} ({'pretrained' if args.pretrained else 'RANDOM weights: speed only'}), "
          f"{args.backend}/{args.device}, 640x480 rgb8, {args.boxes} boxes, every camera at {args.rate:g} Hz for "
          f"{args.duration:g} s; each node its own process; {getattr(args, 'transport', 'transport as the environment says')}")
    print("| cameras | setup | processes | RSS (MB) | frames/s scored (offered) | p50 ms (mean over cameras) "
          "| p95 ms (worst camera) | frames per backend call |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        if r.get("error"):
            print(f"| {r['cameras']} | {r['setup']} | {r['processes']} | {r['error']} | | | | |")
            continue
        print(f"| {r['cameras']} | {r['setup']} | {r['processes']} | {r['rss_mb_total']:.0f} | {r['fps']:.1f} "
              f"({r['offered_fps']:.0f}) | {r['p50_ms_mean_over_cameras']:.1f} | {r['p95_ms_worst_camera']:.1f} "
              f"| {r['frames_per_backend_call']:.2f} |")
    rigs = [r for r in rows if r.get("rig", r["setup"].startswith("one node")) and not r.get("error")]
    many = {r["cameras"]: r for r in rows if not r.get("rig", r["setup"].startswith("one node")) and not r.get("error")}
    single = [r["rss_mb_total"] / r["processes"] for r in many.values()]
    for a in rigs:
        n = a["cameras"]
        if n not in many:
            continue
        b = many[n]
        ref = float(np.mean(single)) if single else math.nan
        mem, thr = a["rss_mb_total"] / ref, a["fps"] / b["fps"] if b["fps"] else math.nan
        print(f"  N={n}: {a['setup']}'s RSS = {mem:.2f}x one single-camera node's ({'meets' if mem <= 1.3 else 'MISSES'} "
              f"<= 1.3x); its throughput = {thr:.2f}x the {n} nodes' ({'meets' if thr >= 1.0 else 'MISSES'} >= 1x); "
              f"p50 {a['p50_ms_mean_over_cameras']:.0f} / p95 {a['p95_ms_worst_camera']:.0f} ms against the nodes' "
              f"{b['p50_ms_mean_over_cameras']:.0f} / {b['p95_ms_worst_camera']:.0f} ms")
