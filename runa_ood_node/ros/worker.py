"""The node's scoring threads: take each camera's next frame, score the batch in one backend call,
publish the answers, then alerts, drawings and health (``ros.node`` starts them).

Threading (why not a MultiThreadedExecutor)
    ROS callbacks (subscriptions, timers) run in a SingleThreadedExecutor and only do cheap work:
    pairing and queueing. Conversion, scoring and publishing run in dedicated worker threads fed
    by a bounded queue per camera (``processing_queue_size``; when full the *oldest* frame is
    dropped and counted, so outputs stay fresh). This keeps the health and diagnostics timers
    running while the model is busy or stuck - exactly when health must be reported - gives a
    per-reason account of overload instead of silent DDS queue drops, and processes each camera's
    frames strictly in stamp order (the alert logic needs it), which a multi-threaded executor
    would not guarantee. Torch releases the GIL while it computes, so the executor thread keeps up.
    A worker takes the frame at the head of every camera's queue it serves (at most one per
    camera: a flooding camera delays the others by at most one batch) and scores them in ONE
    backend call (``OodScorer.score_frames``); ``gather_window_ms`` lets it wait (bounded) for the
    cameras whose next frame has not arrived yet; ``scoring_threads`` shares the cameras out among
    several workers (camera i to worker i mod n).

Latency (``runa-ood bench-node``; ``--ab`` compares with the optimisations below switched off)
    an unpadded ``rgb8`` image is scored through a read-only view of the message buffer (no copy,
    ``ros.node.ZERO_COPY_RGB8``); both inputs are taken raw: the executor thread reads only their
    header stamps (for the pairing), the worker reads them straight from the CDR bytes
    (``ros.wire``, the readers offline bag evaluation uses too; several times cheaper than rclpy's
    or rosbags' generic deserialization), and the outputs that embed detections are written as
    bytes by ``ros.wire``, each input detection copied in as its bytes; ood/ood_only goes out after
    ood/detections; after handing a frame to an idle worker the executor thread waits
    (``ros.node.HANDOFF_WAIT_S``, at most 2 ms) until the worker has read its inputs and entered
    the model, so the two threads do not fight over the GIL in the Python-heavy part;
    ood/ood_only, the annotated image and the markers are only built while someone subscribes;
    alerts, drawing and accounting run after ood/detections is out.

Every frame is accounted for (``core.accounting``): scored or dropped with its reason in the step
that ends its flight; a worker never dies of an exception (the frame is counted
``internal_error``).
"""
from __future__ import annotations

import math
import time
import traceback
from dataclasses import dataclass
from typing import Any, Dict, List, Optional

from . import convert, draw, wire


@dataclass
class FrameRecord:
    """What the node did with one frame (for benchmarks and tests; see ``RunaOodNode.frame_observer``)."""

    stamp_ns: int
    n_boxes: int
    pipeline_ms: float  # FrameResult.timings["total"]: the core pipeline alone
    node_ms: float  # pair formed -> ood/detections published (queue wait + conversion + scoring + publishing)
    error: Optional[str]
    stages_ms: Optional[Dict[str, float]] = None  # wait, convert, score, publish, secondary
    t_pair: float = math.nan  # time.perf_counter() when the pair was formed (s)
    t_published: float = math.nan  # time.perf_counter() after ood/detections was published (s)
    frame_ms: float = math.nan  # pair formed -> everything done for the frame (alerts, drawing too): health's latency
    camera: str = ""  # "" = the single stream
    batch_frames: int = 1  # frames scored in the same backend call (one per camera at most)


@dataclass
class _Frame:
    """One camera's frame in a batch, its inputs read."""

    cam: Any
    pair: Any
    t_pair: float
    header: Any
    rgb: Any
    dets: Any
    boxes: Any
    scores: Any
    class_ids: Any
    ids: Any

    @property
    def when(self) -> str:
        return f"{self.cam.tag} stamped {self.pair.image_stamp_ns * 1e-9:.3f} s"


def score_frames(scorer, frames: List[_Frame]) -> List:
    """FrameResults of ``frames`` in ONE backend call; when the batch is refused (a malformed
    frame: ValueError), each frame alone, so that only the malformed one fails (its slot then
    holds the exception)."""
    if len(frames) == 1:  # the single stream's path, as before: OodScorer.score
        f = frames[0]
        return [scorer.score(f.rgb, f.boxes, box_format="cxcywh", detector_scores=f.scores,
                             detector_labels=f.class_ids)]
    from ..core.pipeline import FrameInput  # torch: imported with the scorer, not with the node

    inputs = [FrameInput(f.rgb, f.boxes, "cxcywh", f.scores, f.class_ids) for f in frames]
    try:
        return scorer.score_frames(inputs)
    except ValueError:
        out = []
        for fr in inputs:
            try:
                out.append(scorer.score(fr.image_rgb, fr.boxes, box_format=fr.box_format,
                                        detector_scores=fr.detector_scores, detector_labels=fr.detector_labels))
            except Exception as exc:  # noqa: BLE001 - this frame only
                out.append(exc)
        return out


class Worker:
    """One scoring thread (:meth:`run` is its target) serving ``cams`` of ``node`` (a
    ``RunaOodNode``: its settings, scorer, books, condition variable and alerts), the cameras'
    publishers; ``zero_copy``: ``ros.node.ZERO_COPY_RGB8`` when the node was configured."""

    def __init__(self, node, cams: List[Any], zero_copy: bool = True):
        self.node = node
        self.cams = list(cams)
        self.zero_copy = zero_copy  # unpadded rgb8 scored through a view of the message buffer

    # ------------------------------------------------------------------ the loop
    def run(self) -> None:
        node = self.node
        while True:
            got = self._next_batch()
            if got is None:
                return
            batch, t_take = got
            try:
                self._process(batch, t_take)
            except Exception as exc:  # never let the worker die
                with node.cv:
                    for cam, _, _ in batch:
                        if cam.ledger.in_flight:
                            cam.ledger.frame_done("internal_error")
                        else:  # already accounted (scored): the failure came after its results were out
                            cam.ledger.count("secondary_output_errors")
                if not node.context.ok():  # ROS is shutting down (Ctrl-C) under the worker
                    continue
                node.get_logger().error(
                    f"internal error while scoring the frames stamped "
                    f"{', '.join(f'{p.image_stamp_ns * 1e-9:.3f} s{c.tag}' for c, p, _ in batch)}: "
                    f"{type(exc).__name__}: {exc}\n{traceback.format_exc(limit=6)}", throttle_duration_sec=5.0)
            finally:
                node.handoff.set()  # also when the frames were dropped before the model
                with node.cv:
                    for cam, _, _ in batch:
                        if cam.ledger.in_flight:  # left without a verdict (no scorer any more: deactivated)
                            cam.ledger.frame_done("deactivated")
                    node.accounts.batch(-1)

    def _next_batch(self):
        """``([(camera, pair, t_pair)], t_take)``: the frame at the head of every camera's queue (stamp
        order within a camera; at most one per camera), now in flight; None when stopping."""
        node, cams = self.node, self.cams
        window = node.settings.gather_window_ms * 1e-3 if len(cams) > 1 else 0.0
        with node.cv:
            while not any(c.ledger.queue for c in cams) and not node.stopping:
                node.cv.wait(timeout=0.5)
            if node.stopping:
                return None
            if window > 0:  # gather: wait (bounded) for the other cameras' next frames, one call for all
                end = time.monotonic() + window
                while not all(c.ledger.queue for c in cams) and not node.stopping:
                    left = end - time.monotonic()
                    if left <= 0:
                        break
                    node.cv.wait(timeout=left)
            batch = []
            t_take = time.perf_counter()  # under the lock: every frame paired before it is in this batch
            for cam in cams:
                item = cam.ledger.take()
                if item is not None:
                    batch.append((cam, item[0], item[1]))
            node.accounts.batch(+1)
            return batch, t_take

    # ------------------------------------------------------------------ one batch
    def _process(self, batch: List, t_start: float) -> None:
        """Score the frames of ``batch`` ([(camera, pair, t_pair)], taken from the queues at
        ``t_start``) in one backend call, then publish each camera's answer, alerts, drawings and
        health."""
        node = self.node
        scorer = node.scorer
        if scorer is None:
            return
        frames = [f for f in (self._read_inputs(cam, pair, t_pair) for cam, pair, t_pair in batch) if f is not None]
        if not frames:
            return
        node.handoff.set()  # the executor thread may go on (HANDOFF_WAIT_S)
        t_conv = time.perf_counter()
        if node.score_lock is not None:  # a backend that must not run twice at once (TensorRT contexts)
            with node.score_lock:
                results = score_frames(scorer, frames)
        else:
            results = score_frames(scorer, frames)
        t_score = time.perf_counter()
        node.accounts.backend_call(len(frames))
        done = self._publish_scores(frames, results)
        # ---- secondary outputs, per camera: a failure is logged and counted, the frame stays scored
        for f, res, t_pub, node_ms, pipeline_ms in done:
            if not self._secondary(f, res):
                return
            # ---- health: the whole per-frame time (queue wait, conversion, scoring, alerts, drawing,
            #      publishing) and whether the frame was evidence (core.health decides both)
            t_end = time.perf_counter()
            frame_ms = (t_end - f.t_pair) * 1e3
            with node.cv:
                f.cam.ledger.frame_time(frame_ms)
                f.cam.health.frame(time.monotonic(), frame_ms, res)
            if node.frame_observer is not None:
                stages = {"wait": (t_start - f.t_pair) * 1e3, "convert": (t_conv - t_start) * 1e3,
                          "score": (t_score - t_conv) * 1e3, "publish": (t_pub - t_score) * 1e3,
                          "secondary": (t_end - t_pub) * 1e3}
                node.frame_observer(FrameRecord(f.pair.image_stamp_ns, len(res), pipeline_ms, node_ms, res.error,
                                                stages, f.t_pair, t_pub, frame_ms, f.cam.name, len(frames)))

    def _read_inputs(self, cam, pair, t_pair: float) -> Optional[_Frame]:
        """A frame's inputs read from their CDR bytes (``ros.wire``, as offline evaluation does; the
        image data stays a view of the received bytes, then the one pixel reader), or None when
        the frame was dropped (accounted and logged here)."""
        node = self.node
        s, log = node.settings, node.get_logger()
        compressed = cam.inputs.image_transport == "compressed"
        when = f"{cam.tag} stamped {pair.image_stamp_ns * 1e-9:.3f} s"
        try:
            img_msg = (wire.read_compressed if compressed else wire.read_image)(pair.image)
        except wire.CdrError as exc:
            cam.ledger.frame_done("image_undecodable")
            log.warning(f"dropped frame{when}: {exc}", throttle_duration_sec=5.0)
            return None
        header = img_msg.header
        try:
            if compressed:
                rgb = convert.compressed_to_rgb(img_msg, max_pixels=s.max_image_pixels)
            else:
                # unpadded rgb8: a read-only view of the message buffer; anything else: one copy
                rgb = convert.image_to_rgb(img_msg, copy=not self.zero_copy, max_pixels=s.max_image_pixels)
        except convert.ImageConversionError as exc:
            cam.ledger.frame_done(f"image_{exc.reason}")
            log.warning(f"dropped frame{when}: cannot convert image ({'format' if img_msg.format else 'encoding'} "
                        f"{img_msg.format or img_msg.encoding!r}): {exc}", throttle_duration_sec=5.0)
            return None
        try:
            dets = wire.read_detections(pair.detections)
            boxes, scores, class_ids, ids = dets.arrays()
        except Exception as exc:
            cam.ledger.frame_done("bad_detections")
            log.warning(f"dropped frame{when}: unreadable detections: {type(exc).__name__}: {exc}",
                        throttle_duration_sec=5.0)
            return None
        if dets.header.frame_id != header.frame_id:
            cam.ledger.count("frame_id_mismatch")
            log.warning(f"detections frame_id{cam.tag} {dets.header.frame_id!r} differs from the image's "
                        f"{header.frame_id!r}; outputs use the image's", throttle_duration_sec=10.0)
        return _Frame(cam, pair, t_pair, header, rgb, dets, boxes, scores, class_ids, ids)

    def _publish_scores(self, frames: List[_Frame], results: List) -> List:
        """Every camera's ood/detections first (every header is the source image's), written as CDR
        bytes (``ros.wire``), each detection copied in as the bytes it came as; each frame counted
        as scored as soon as its results are out. Returns ``[(frame, result, t_pub, node_ms,
        pipeline_ms)]`` of the frames published."""
        node = self.node
        s = node.settings
        done = []
        for f, res in zip(frames, results):
            if isinstance(res, Exception):
                f.cam.ledger.frame_done("internal_error")
                node.get_logger().error(f"internal error while scoring the frame{f.when}: {type(res).__name__}: {res}",
                                        throttle_duration_sec=5.0)
                continue
            f.cam.pubs["detections"].publish(wire.write_ood_array(f.header, f.dets, res, s.model, node.backend_name,
                                                                  s.scorer, node.random_weights))
            t_pub = time.perf_counter()
            node_ms = (t_pub - f.t_pair) * 1e3
            pipeline_ms = float(res.timings.get("total", math.nan))
            # one-pass methods: boxes smaller than a token, counted
            below = res.boxes_below_token if res.tokens_in_box is not None else None
            f.cam.ledger.scored(res.status, res.is_ood, node_ms, pipeline_ms, bool(res.error), below)
            done.append((f, res, t_pub, node_ms, pipeline_ms))
        return done

    def _secondary(self, f: _Frame, res) -> bool:
        """ood/ood_only, the alert update and the drawings of one scored frame; a failure is logged
        and counted (the scores were published). False when ROS is shutting down under the worker."""
        node = self.node
        try:
            self._secondary_outputs(f, res)
        except Exception as exc:
            f.cam.ledger.count("secondary_output_errors")
            if not node.context.ok():  # ROS is shutting down (Ctrl-C) under the worker: nothing to report
                return False
            node.get_logger().error(
                f"internal error in alerts/drawing for the frame{f.when} (scores were published): "
                f"{type(exc).__name__}: {exc}\n{traceback.format_exc(limit=6)}", throttle_duration_sec=5.0)
        return True

    def _secondary_outputs(self, f: _Frame, res) -> None:
        node = self.node
        s, cam, pubs = node.settings, f.cam, f.cam.pubs
        h, w = f.rgb.shape[:2]
        if pubs["ood_only"].get_subscription_count() > 0:  # volatile: nobody listening = nobody misses it
            pubs["ood_only"].publish(wire.write_ood_only(f.header, f.dets, res))
        # a frame that is no evidence (core.health.unscored_reason) holds the current level
        # (AlertMonitor): a failing model must never look like "no OOD object" to the driver;
        # a stamp jump back resets the alert history (AlertMonitor.config.jump_back_reset_s)
        alerts = cam.alerts
        resets = alerts.n_jump_resets
        alert = alerts.update(f.pair.image_stamp_ns * 1e-9, res, w, h,
                              object_ids=f.ids if node.alert_use_ids else None)
        if alerts.n_jump_resets != resets:
            node.get_logger().warning(f"image stamps{cam.tag} jumped back to {f.pair.image_stamp_ns * 1e-9:.3f} s; "
                                      "alert history reset")
        node.vehicle_alert(cam, alert, f.header, f.dets, res)
        if s.publish_annotated:
            cam.ledger.add_counts(draw.publish_drawings(pubs, f.header, f.rgb, res, node.random_weights, s.lazy))


__all__ = ["FrameRecord", "Worker", "score_frames"]
