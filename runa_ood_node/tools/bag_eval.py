"""Bag evaluation for `runa-ood evaluate --bag PATH [--live]`: the same metrics from a recorded bag.

A bag made by ``runa-ood make-bag`` (or recorded on a vehicle with a ground-truth topic) holds an
image topic, ``/detections`` and ``/ood/ground_truth``, all stamped alike.

Offline mode (default, in-process, deterministic): the frames are paired, decoded and read by the
node's own code (:func:`bagio.iter_frames`: ``ros.pairing.StampPairer`` with the node's pairing
settings, the ``ros.convert`` readers with its pixel cap), and scored by the **same** ``core.pipeline.OodScorer`` the node builds, with the
settings the node would get (``tools.common.scorer_from_args``, the tools' one path; thresholds: ``--thresholds`` or the node's
``default_threshold``). Reported: ``core.metrics.summary`` over the boxes with ground truth
(ID = positive class), per-frame processing time percentiles (ms), box status counts.

Live mode (``--live``): the node runs as a subprocess (``runa_ood_node --ros-args -p ...`` with
those same settings, ``ROS_AUTOMATIC_DISCOVERY_RANGE=LOCALHOST``), the bag is replayed into it with
rclpy (:class:`tools.replay.BagPlayer`), and its outputs are collected: ``ood/detections`` gives
the scores for the same metrics, plus **end-to-end latency** (wall time from publishing a frame's
image to receiving its ``ood/detections``, ms) and **drops** (frames published without an output).
``--out-bag`` records the input topics and every output of the node (``ood/detections``,
``ood/ood_only``, ``ood/driver_alert``, ``ood/monitor_health``, ``ood/annotated_image``,
``ood/markers``, ``/diagnostics``) into a bag for RViz / Foxglove; the log time of a message is its
header stamp (receipt time mapped onto the bag's clock for header-less messages).

For a live run, the node's processing queue is made as long as the bag (``processing_queue_size``)
so that every frame is scored, as an evaluation needs; ``--node-params name:=value`` overrides any
node parameter (and those that change scoring are mirrored in offline mode).

Child processes: the ROS wheels' ``.pth`` bootstrap re-executes Python with the wheels' library
path and sets ``_ROS_WHEELS_BOOTSTRAP_COMPLETE=1``; a child inheriting that variable without the
library path cannot import rclpy, so :func:`child_env` removes it and the child bootstraps itself.
"""
from __future__ import annotations

import argparse
import collections
import logging
import math
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import threading
import time
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from . import bagio

LOG = logging.getLogger("runa_ood_node.tools.bag_eval")

#: node output topics (relative to the node's namespace; the node runs in the root namespace here)
OUTPUT_TOPICS: Dict[str, str] = {
    "/ood/detections": "runa_ood_msgs/msg/OodDetectionArray",
    "/ood/ood_only": "vision_msgs/msg/Detection2DArray",
    "/ood/driver_alert": "runa_ood_msgs/msg/DriverAlert",
    "/ood/monitor_health": "runa_ood_msgs/msg/DriverAlert",
    "/ood/annotated_image": "sensor_msgs/msg/Image",
    "/ood/markers": "visualization_msgs/msg/MarkerArray",
    "/ood/image_annotations": "foxglove_msgs/msg/ImageAnnotations",
    "/diagnostics": "diagnostic_msgs/msg/DiagnosticArray",
}
#: outputs the node publishes once per scored frame (to a listener): the drain waits for each of them
PER_FRAME_TOPICS = ("/ood/detections", "/ood/ood_only", "/ood/annotated_image", "/ood/markers",
                    "/ood/image_annotations")
NODE_EXECUTABLE = "runa_ood_node"
from ..core.metrics import LATENCY_PERCENTILES  # noqa: E402


# =========================================================================== CLI
def add_bag_arguments(parser: argparse.ArgumentParser) -> None:
    """``--bag --live --out-bag --node-params --bag-rate --node-timeout`` (added to ``evaluate``)."""
    g = parser.add_argument_group("bag evaluation")
    g.add_argument("--bag", default=None, help="evaluate on this bag (runa-ood make-bag) instead of a dataset")
    g.add_argument("--live", action="store_true",
                   help="with --bag: start the node, replay the bag through it and evaluate its outputs")
    g.add_argument("--out-bag", default=None, help="with --live: record the node's outputs into this bag folder")
    g.add_argument("--node-params", nargs="*", default=[], metavar="NAME:=VALUE",
                   help="extra node parameters (YAML values), also mirrored offline when they affect scoring")
    g.add_argument("--bag-rate", type=float, default=1.0, help="with --live: replay speed factor (default 1)")
    g.add_argument("--node-timeout", type=float, default=180.0,
                   help="with --live: seconds to wait for the node to load its model and subscribe")


# =========================================================================== settings
def _declared_parameters() -> Dict[str, Any]:
    """Name -> default of the node's declared parameters (types for ``ros_args``)."""
    from ..ros.params import PARAMETERS

    return {p.name: p.default for p in PARAMETERS}


def ros_args(params: Dict[str, Any]) -> List[str]:
    """``--ros-args -p name:=value ...`` with values typed as the node declares them (floats keep a
    decimal point, strings are YAML-quoted so ``true`` / ``1.0`` / ``''`` stay strings)."""
    declared = _declared_parameters()
    out = ["--ros-args"]
    for k, v in params.items():
        d = declared.get(k, v)
        if isinstance(v, bool):
            s = "true" if v else "false"
        elif isinstance(d, float) and isinstance(v, (int, float)):
            s = repr(float(v))
        elif isinstance(v, (int, float)):
            s = repr(v)
        elif isinstance(v, (list, tuple)):
            s = "[" + ", ".join(repr(float(x)) for x in v) + "]"
        else:
            s = "'" + str(v).replace("'", "''") + "'"
        out += ["-p", f"{k}:={s}"]
    return out


def child_env(extra: Optional[Dict[str, str]] = None) -> Dict[str, str]:
    """Environment for a child ROS process: discovery kept on this machine, and without
    ``_ROS_WHEELS_BOOTSTRAP_COMPLETE`` so the ROS wheels' bootstrap runs again in the child
    (it sets the library path rclpy needs)."""
    env = dict(os.environ)
    env.pop("_ROS_WHEELS_BOOTSTRAP_COMPLETE", None)
    env["ROS_AUTOMATIC_DISCOVERY_RANGE"] = "LOCALHOST"
    env.setdefault("PYTHONUNBUFFERED", "1")
    env.update(extra or {})
    return env


# =========================================================================== results
def percentiles(values_ms: Sequence[float]) -> Dict[str, Optional[float]]:
    """``{"n", "mean", "p50", "p90", "p95", "p99", "max"}`` in ms (None when empty)."""
    from ..core.metrics import latency_summary

    return latency_summary(values_ms, LATENCY_PERCENTILES)


def finite_or_none(v) -> Optional[float]:
    """``float(v)``, or None when it is NaN / inf (JSON and Parquet records)."""
    v = float(v)
    return v if math.isfinite(v) else None


def ground_truth_map(bag) -> Dict[Tuple[int, str], Tuple[bool, str]]:
    """(stamp_ns, detection id) -> (is_ood, category) from the bag's GroundTruth messages."""
    return {(st, did): v for st, by_id in bagio.read_ground_truth(bag).items() for did, v in by_id.items()}


def metrics_from_records(records: Sequence[Dict], tpr: float = 0.95) -> Dict[str, Any]:
    """``core.metrics.summary`` over records with ground truth and a score (ID = positive)."""
    import warnings

    from ..core import metrics

    id_s = [r["uncertainty"] for r in records if r.get("gt_is_ood") is False and r["uncertainty"] is not None]
    ood_s = [r["uncertainty"] for r in records if r.get("gt_is_ood") is True and r["uncertainty"] is not None]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return metrics.summary(np.asarray(id_s, np.float64), np.asarray(ood_s, np.float64), tpr)


# =========================================================================== offline
def evaluate_offline(bag, scorer, image_topic: Optional[str] = None, progress: bool = True,
                     params: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """Score every frame of ``bag`` with ``scorer`` in this process, as the node would.

    Frames come from :func:`bagio.iter_frames` (the node's pairing rules with the pairing settings
    and ``max_image_pixels`` of ``params``, the node's readers) and are scored with the node's
    call: ``scorer.score(rgb, boxes, box_format="cxcywh", detector_scores=..., detector_labels=...)``.

    Returns ``{"frames": [{"stamp_ns", "n_boxes", "timings", "error"}], "records": [per box],
    "latency_ms": percentiles of FrameResult.timings["total"], "skipped": {reason: messages}}``;
    ``skipped`` counts what the node would count as drops (pairer reasons per message,
    ``image_<reason>`` / ``bad_detections`` per frame); a record: ``stamp_ns, id, category,
    gt_is_ood (None without GT), status, uncertainty, threshold, is_ood, label, similarity``.
    """
    from tqdm import tqdm

    from ..core.boxes import BoxStatus

    records, out_frames, totals = [], [], []
    skipped = collections.Counter()
    for fr in tqdm(bagio.iter_frames(bag, image_topic, params=params), desc="offline scoring", unit="frame",
                   disable=not progress, leave=False):
        if not fr.ok:
            skipped[fr.reason] += 1
            LOG.warning("%s stamped %d not scored: %s", fr.kind, fr.stamp_ns, fr.detail or fr.reason)
            continue
        res = scorer.score(fr.rgb, fr.boxes_cxcywh, box_format="cxcywh", detector_scores=fr.scores,
                           detector_labels=fr.class_ids)
        totals.append(res.timings.get("total", float("nan")))
        out_frames.append({"stamp_ns": fr.stamp_ns, "n_boxes": len(res), "timings": dict(res.timings),
                           "error": res.error})
        gt = fr.ground_truth or {}
        for i in range(len(res)):
            g = gt.get(fr.ids[i])
            st = int(res.status[i])
            records.append({"stamp_ns": fr.stamp_ns, "id": fr.ids[i], "category": g[1] if g else fr.class_ids[i],
                            "gt_is_ood": None if g is None else g[0],
                            "status": BoxStatus(st).name if st in BoxStatus._value2member_map_ else str(st),
                            "uncertainty": finite_or_none(res.uncertainty[i]),
                            "threshold": finite_or_none(res.threshold[i]),
                            "is_ood": bool(res.is_ood[i]), "label": res.label[i],
                            "similarity": finite_or_none(res.similarity[i])})
    return {"frames": out_frames, "records": records, "latency_ms": percentiles(totals), "skipped": dict(skipped)}


# =========================================================================== live
class NodeProcess:
    """The node as a subprocess (stdout+stderr to ``log_path``); a context manager that stops it
    with SIGINT (then SIGTERM, then SIGKILL) on exit."""

    def __init__(self, params: Dict[str, Any], log_path, env: Optional[Dict[str, str]] = None,
                 executable: Optional[str] = None):
        exe = executable or shutil.which(NODE_EXECUTABLE, path=os.pathsep.join(
            [str(pathlib.Path(sys.executable).parent), os.environ.get("PATH", "")]))
        exe_cmd = [exe] if exe else [sys.executable, "-m", "runa_ood_node.ros.node"]
        self.cmd = exe_cmd + ros_args(params)
        self.log_path = pathlib.Path(log_path)
        self.env = child_env(env)
        self.proc: Optional[subprocess.Popen] = None

    def __enter__(self) -> "NodeProcess":
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "wb")
        LOG.info("starting node: %s", " ".join(self.cmd))
        self.proc = subprocess.Popen(self.cmd, stdout=self._log, stderr=subprocess.STDOUT, env=self.env,
                                     start_new_session=True)
        return self

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_tail(self, n: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def stop(self, timeout_s: float = 10.0) -> Optional[int]:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            for sig, wait in ((signal.SIGINT, timeout_s), (signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
                try:
                    self.proc.send_signal(sig)
                    self.proc.wait(wait)
                    break
                except subprocess.TimeoutExpired:
                    LOG.warning("node did not stop on %s", sig.name)
        return self.proc.returncode

    def __exit__(self, *exc) -> None:
        self.stop()
        self._log.close()


class NodeStartError(RuntimeError):
    """The node exited or did not come up in time (message holds the tail of its log)."""


def _matching_qos(node, topic: str, depth: int = 100):
    """A subscription QoS compatible with the publishers found on ``topic``: reliable when every
    publisher is reliable, best effort otherwise; transient local when a publisher offers it."""
    from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy

    infos = node.get_publishers_info_by_topic(topic)
    reliable = bool(infos) and all(i.qos_profile.reliability == ReliabilityPolicy.RELIABLE for i in infos)
    transient = any(i.qos_profile.durability == DurabilityPolicy.TRANSIENT_LOCAL for i in infos)
    return QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=depth,
                      reliability=ReliabilityPolicy.RELIABLE if reliable else ReliabilityPolicy.BEST_EFFORT,
                      durability=DurabilityPolicy.TRANSIENT_LOCAL if transient else DurabilityPolicy.VOLATILE)


def run_live(bag, params: Dict[str, Any], out_dir, out_bag=None, rate: float = 1.0, node_timeout_s: float = 180.0,
             drain_timeout_s: float = 30.0, progress: bool = True, storage: str = "mcap") -> Dict[str, Any]:
    """Start the node with ``params``, replay ``bag`` into it, collect every output.

    Returns ``{"arrays": [(recv_wall_ns, OodDetectionArray)], "alerts": [DriverAlert],
    "health": [DriverAlert], "latency_ms": {stamp_ns: ms}, "published_frames": [stamp_ns],
    "publish_wall": {stamp_ns: wall time ns the frame's image was published},
    "received": {topic: count}, "diagnostics": last DiagnosticArray or None, "node_log": path,
    "node_returncode": int}`` (messages are type-store objects). Raises :class:`NodeStartError`.
    """
    from ..ros.spin import spinning_node
    from .replay import BagPlayer, message_class

    out_dir = pathlib.Path(out_dir)
    info = bagio.bag_info(bag)
    image_topic = bagio.pick_image_topic(info.topics)
    if image_topic is None:
        raise bagio.BagError(f"{bag}: no image topic")
    log_path = out_dir / "node.log"
    lock = threading.Lock()
    got: Dict[str, List[Tuple[int, bytes]]] = {t: [] for t in OUTPUT_TOPICS}
    result: Dict[str, Any] = {"node_log": str(log_path)}
    with spinning_node("runa_ood_bag_eval") as node:
        with NodeProcess(params, log_path) as proc:
            # 1) the node is up when its main output exists (model loaded, configured)
            deadline = time.monotonic() + node_timeout_s
            while node.count_publishers("/ood/detections") == 0:
                if not proc.alive():
                    raise NodeStartError(f"node exited with {proc.proc.returncode} during start-up; "
                                         f"log {log_path}:\n{proc.log_tail()}")
                if time.monotonic() > deadline:
                    raise NodeStartError(f"node did not publish /ood/detections within {node_timeout_s:.0f} s; "
                                         f"log {log_path}:\n{proc.log_tail()}")
                time.sleep(0.1)
            time.sleep(0.5)  # let the remaining publishers be discovered
            subs = []
            for topic, msgtype in OUTPUT_TOPICS.items():
                def cb(raw, t=topic):
                    with lock:
                        got[t].append((time.time_ns(), raw))
                qos = _matching_qos(node, topic, depth=1000)
                subs.append(node.create_subscription(message_class(msgtype), topic, cb, qos, raw=True))
            # 2) replay once the node subscribed to the inputs and our subscriptions matched
            player = BagPlayer(node, bag, topics=[image_topic, bagio.DETECTIONS_TOPIC], qos="reliable",
                               depth=max(100, info.counts.get(image_topic, 0)))
            ok = player.wait_for_subscribers(1, max(10.0, deadline - time.monotonic()))
            if not ok:
                raise NodeStartError(f"node did not subscribe to {image_topic} / {bagio.DETECTIONS_TOPIC}; "
                                     f"log {log_path}:\n{proc.log_tail()}")
            t_sub = time.monotonic() + 10.0
            while any(s.get_publisher_count() == 0 for s in subs[:1]) and time.monotonic() < t_sub:
                time.sleep(0.05)
            player.play(rate=rate, progress=progress)
            player.wait_acked(10.0)
            n_frames = player.published[image_topic]
            # 3) drain: until every frame has its output on every per-frame topic (ood_only and the
            # drawings follow ood/detections), or nothing new arrives for drain_timeout_s
            from .common import NODE_DEFAULTS

            drawn = bool(params.get("publish_annotated", NODE_DEFAULTS["publish_annotated"]))
            per_frame = PER_FRAME_TOPICS if drawn else PER_FRAME_TOPICS[:2]
            last_n, last_change = -1, time.monotonic()
            while True:
                with lock:
                    counts = {t: len(got[t]) for t in per_frame}
                n = min(counts.values())
                if n >= n_frames:
                    break
                if sum(counts.values()) != last_n:
                    last_n, last_change = sum(counts.values()), time.monotonic()
                elif time.monotonic() - last_change > drain_timeout_s or not proc.alive():
                    LOG.warning("received %s of %d frames' outputs; giving up waiting",
                                ", ".join(f"{t} {c}" for t, c in counts.items()), n_frames)
                    break
                time.sleep(0.05)
            time.sleep(0.5)  # trailing alerts / health
            # a /diagnostics snapshot taken after the last answer (published at 1 Hz), so its counts hold
            # every frame; bounded
            with lock:
                last_answer = got["/ood/detections"][-1][0] if got["/ood/detections"] else 0
            t_diag = time.monotonic() + 3.0
            while time.monotonic() < t_diag and proc.alive():
                with lock:
                    if got["/diagnostics"] and got["/diagnostics"][-1][0] > last_answer:
                        break
                time.sleep(0.05)
            if not proc.alive():
                LOG.error("node exited early (%s); log %s:\n%s", proc.proc.returncode, log_path, proc.log_tail())
        result["node_returncode"] = proc.proc.returncode
        publish_wall = {st: wall for topic, st, wall in player.publish_log if topic == image_topic}

    with lock:
        snapshot = {t: list(v) for t, v in got.items()}
    arrays, lat = [], {}
    for wall, raw in snapshot["/ood/detections"]:
        msg = bagio.deserialize(raw, OUTPUT_TOPICS["/ood/detections"])
        st = bagio.stamp_ns_of(msg.header)
        arrays.append((wall, msg))
        if st in publish_wall and st not in lat:
            lat[st] = (wall - publish_wall[st]) / 1e6
    result.update(
        arrays=arrays, latency_ms=lat, published_frames=sorted(publish_wall), publish_wall=publish_wall,
        image_topic=image_topic,
        alerts=[bagio.deserialize(r, OUTPUT_TOPICS["/ood/driver_alert"]) for _, r in snapshot["/ood/driver_alert"]],
        health=[bagio.deserialize(r, OUTPUT_TOPICS["/ood/monitor_health"]) for _, r in snapshot["/ood/monitor_health"]],
        diagnostics=(bagio.deserialize(snapshot["/diagnostics"][-1][1], OUTPUT_TOPICS["/diagnostics"])
                     if snapshot["/diagnostics"] else None),
        received={t: len(v) for t, v in snapshot.items()})
    if out_bag:
        result["out_bag"] = write_output_bag(out_bag, bag, snapshot, publish_wall, rate, storage)
    return result


def write_output_bag(path, in_bag, snapshot: Dict[str, List[Tuple[int, bytes]]], publish_wall: Dict[int, int],
                     rate: float = 1.0, storage: str = "mcap") -> Dict[str, Any]:
    """Input topics + node outputs into one bag (log time = header stamp; header-less messages:
    receipt wall time mapped onto the input bag's clock through the first published frame)."""
    if publish_wall:
        st0 = min(publish_wall)
        wall0 = publish_wall[st0]
    else:
        st0 = wall0 = 0
    scale = rate if rate > 0 else 1.0
    with bagio.BagWriter(path, storage=storage, overwrite=True) as w:
        for m in bagio.read_bag(in_bag):
            w.write_raw(m.topic, m.msgtype, m.stamp_ns, m.rawdata)
        for topic, items in snapshot.items():
            msgtype = OUTPUT_TOPICS[topic]
            for wall, raw in items:
                log_ns = st0 + int((wall - wall0) * scale)
                try:
                    msg = bagio.deserialize(raw, msgtype)
                    hdr = getattr(msg, "header", None)
                    if hdr is None and getattr(msg, "markers", None):
                        hdr = msg.markers[0].header
                    if hdr is not None and bagio.stamp_ns_of(hdr) > 0:
                        log_ns = bagio.stamp_ns_of(hdr)
                except bagio.BagError:
                    pass
                w.write_raw(topic, msgtype, log_ns, raw)
        counts = dict(w.counts)
    return {"path": str(path), "counts": counts}


def live_records(live: Dict[str, Any], gt: Dict[Tuple[int, str], Tuple[bool, str]]) -> List[Dict]:
    """Per-box records (same keys as offline) from the node's OodDetectionArray messages."""
    from ..core.boxes import BoxStatus

    recs, seen = [], set()
    for _, msg in live["arrays"]:
        st = bagio.stamp_ns_of(msg.header)
        if st in seen:  # a frame is counted once even if delivered twice
            continue
        seen.add(st)
        for d in msg.detections:
            did = str(d.detection.id)
            g = gt.get((st, did))
            s = int(d.status)
            recs.append({"stamp_ns": st, "id": did,
                         "category": g[1] if g else (d.detection.results[0].hypothesis.class_id
                                                     if d.detection.results else ""),
                         "gt_is_ood": None if g is None else g[0],
                         "status": BoxStatus(s).name if s in BoxStatus._value2member_map_ else str(s),
                         "uncertainty": finite_or_none(d.uncertainty) if s == BoxStatus.OK else None,
                         "threshold": finite_or_none(d.threshold), "is_ood": bool(d.is_ood),
                         "label": str(d.nearest_label),
                         "similarity": finite_or_none(d.similarity) if s == BoxStatus.OK else None})
    return recs


def alert_timeline(alerts) -> List[Dict[str, Any]]:
    """[{stamp_ns, level (name), source (name), reason, n_objects}] from DriverAlert messages, in
    the order received: the changes only. A message repeating its source's previous level and
    reason (the node's heartbeat re-publishes the current monitor health) is left out."""
    from ..core.registry import AlertLevel

    levels = {int(lv): lv.name for lv in AlertLevel}
    sources = {0: "OOD_OBJECT", 1: "MONITOR_HEALTH"}
    out: List[Dict[str, Any]] = []
    last: Dict[str, Tuple[str, str]] = {}
    for a in alerts:
        rec = {"stamp_ns": bagio.stamp_ns_of(a.header), "level": levels.get(int(a.level), str(a.level)),
               "source": sources.get(int(a.source), str(a.source)), "reason": str(a.reason),
               "n_objects": len(a.objects)}
        if last.get(rec["source"]) != (rec["level"], rec["reason"]):
            out.append(rec)
            last[rec["source"]] = (rec["level"], rec["reason"])
    return out


def diagnostics_summary(diag) -> Dict[str, Dict[str, str]]:
    """status name -> {key: value} of a DiagnosticArray (None -> {})."""
    if diag is None:
        return {}
    return {str(s.name): {str(kv.key): str(kv.value) for kv in s.values} for s in diag.status}


# =========================================================================== entry point
def run_bag(args) -> int:
    """``runa-ood evaluate --bag PATH [--live]``: metrics, latency and drops of a bag (see module)."""
    from . import common

    heads = common.method_heads(args)
    if len(heads) > 1:
        print("error: bag mode evaluates one configuration: give one --method (`all` compares the methods "
              "on a dataset: runa-ood evaluate without --bag)", file=sys.stderr)
        raise SystemExit(2)
    (args.method, args.head), = heads.items()  # one method: --head is its one value, as the node's `head`
    common.setup_logging(args)
    bag = pathlib.Path(args.bag)
    try:
        info = bagio.bag_info(bag)
    except bagio.BagError as exc:
        raise common.fail([str(exc)])
    image_topic = bagio.pick_image_topic(info.topics)
    if image_topic is None or bagio.DETECTIONS_TOPIC not in info.topics:
        raise common.fail([f"{bag} needs {bagio.IMAGE_TOPIC} (or /compressed) and {bagio.DETECTIONS_TOPIC}; "
                           f"it has {sorted(info.topics)}"])
    if bagio.GROUND_TRUTH_TOPIC not in info.topics:
        LOG.warning("%s has no %s: latency and drops only, no OOD metrics", bag, bagio.GROUND_TRUTH_TOPIC)
    if info.recovered:
        LOG.warning("%s is cut short (no MCAP footer): %s", bag, info.recovery.describe())
    if getattr(args, "scorer", None) == "all" or getattr(args, "ablation", "dual") == "all":
        raise common.fail(["bag mode evaluates one configuration: give one --scorer and one --ablation "
                           "(`all` compares several on a dataset: runa-ood evaluate without --bag)"])
    if args.live and common.ablation_of(args) != "dual":
        raise common.fail([f"--live runs the node, which always scores both views: --ablation "
                           f"{args.ablation} cannot be applied there (drop --live to score it offline)"])
    n_frames = info.counts.get(image_topic, 0)
    # the one path (tools.common.scorer_from_args): arguments -> node parameters -> one validation into
    # a core.config.ScorerConfig -> factory.build_scorer -> the node's thresholds fit check
    built = common.scorer_from_args(args, image_topic=image_topic, n_frames=n_frames)
    scorer, params = built.scorer, built.params
    rw = built.random_weights
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    progress = not getattr(args, "no_progress", False)
    tpr = float(getattr(args, "tpr", 0.95))
    report: Dict[str, Any] = {"bag": str(bag), "mode": "live" if args.live else "offline", "random_weights": rw,
                              "random_label": common.RANDOM_LABEL if rw else None, "node_parameters": params,
                              "ablation": built.ablation, "model": scorer.encoder.describe(),
                              "bag_counts": info.counts, "thresholds_mismatch": built.mismatch,
                              "recovered": info.recovery.as_dict() if info.recovered else None}
    if args.live:
        del scorer
        try:
            live = run_live(bag, params, out, args.out_bag, args.bag_rate, args.node_timeout, progress=progress)
        except (NodeStartError, bagio.BagError) as exc:
            raise common.fail([str(exc)])
        gt = ground_truth_map(bag)
        records = live_records(live, gt)
        received = {bagio.stamp_ns_of(m.header) for _, m in live["arrays"]}
        dropped = [s for s in live["published_frames"] if s not in received]
        report.update(latency_ms=percentiles(list(live["latency_ms"].values())),
                      latency_definition="image publish (replay) -> ood/detections receipt, wall time",
                      frames_published=len(live["published_frames"]), frames_received=len(received),
                      frames_dropped=len(dropped), dropped_stamps=dropped, received=live["received"],
                      alerts=alert_timeline(live["alerts"]), node_diagnostics=diagnostics_summary(live["diagnostics"]),
                      node_log=live["node_log"], out_bag=live.get("out_bag"))
    else:
        try:
            off = evaluate_offline(bag, scorer, image_topic, progress, params)
        except bagio.BagError as exc:  # unreadable past its start: one line, exit 2
            raise common.fail([str(exc)])
        records = off["records"]
        report.update(latency_ms=off["latency_ms"], latency_definition="OodScorer.score wall time per frame",
                      frames_scored=len(off["frames"]), skipped=off["skipped"])
    report["metrics"] = metrics_from_records(records, tpr)
    report["status_counts"] = dict(collections.Counter(r["status"] for r in records))
    report["records"] = records
    path = common.write_json(out / f"bag_report_{report['mode']}.json", report)
    _print_report(report, rw)
    print(f"report: {path}")
    return 0


def _print_report(rep: Dict[str, Any], rw: bool) -> None:
    from . import common

    lines = []
    if rw:
        lines.append(f"*** {common.RANDOM_LABEL} ***")
    m = rep["metrics"]

    def f(v):
        return "n/a" if v is None or (isinstance(v, float) and not math.isfinite(v)) else f"{v:.4f}"

    if rep.get("recovered"):
        r = rep["recovered"]
        lines.append(f"RECOVERED bag (cut short): {r['messages']} messages read up to log time "
                     f"{(r['last_stamp_ns'] or 0) * 1e-9:.3f} s, {r['bytes_unread']} bytes unread")
    lines.append(f"bag {rep['bag']} ({rep['mode']}): {m['n_id']} ID / {m['n_ood']} OOD boxes; "
                 f"status {rep['status_counts']}")
    lines.append(f"FPR95 {f(m['fpr95'])}  AUROC {f(m['auroc'])}  AUPR-In {f(m['aupr_in'])}  "
                 f"AUPR-Out {f(m['aupr_out'])}")
    lat = rep["latency_ms"]
    lines.append(f"latency ms ({rep['latency_definition']}): p50 {lat['p50']}  p95 {lat['p95']}  "
                 f"p99 {lat['p99']}  max {lat['max']}  (n={lat['n']})")
    if rep["mode"] == "live":
        lines.append(f"frames published {rep['frames_published']}, received {rep['frames_received']}, "
                     f"dropped {rep['frames_dropped']}; alerts {len(rep['alerts'])}")
    if rw:
        lines.append(f"*** {common.RANDOM_LABEL} ***")
    print("\n".join(lines))
