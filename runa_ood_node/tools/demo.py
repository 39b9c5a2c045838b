"""`runa-ood demo`: the whole product on real photographs, no arguments needed.

1. builds a short bag (``--frames``, default 12) from real photographs: the shared data pack when
   it exists (COCO frames whose boxes include VOC classes, then RoadAnomaly road obstacles and
   OpenImages apples, i.e. OOD objects), else scikit-image's sample photographs with hand-labelled
   boxes;
2. loads real pretrained weights (``--model`` ViT-B-16 ``--pretrained`` openai, or a local
   checkpoint path). When none can be loaded it says so prominently, says how to provide them and
   continues on **random weights** (``--random-model``, default ViT-B-32; ``--tiny``: the tiny test
   ViT), seeded like every tool;
3. starts the node (``runa_ood_node`` subprocess), replays the bag into it and collects its outputs;
4. prints the per-box table and the driver-alert timeline, writes one annotated PNG per frame
   (``ros.draw.annotate``), a contact sheet, ``report.txt``, ``demo.json`` and the node's outputs
   as a bag (``output_bag``, for Foxglove / RViz: the input image, ``/ood/image_annotations``
   that Foxglove draws over it, the alerts, ...) under ``--out`` (default ``out/demo``), with
   ``foxglove_layout.json``, the Foxglove / Lichtblick layout that shows that bag.

Without real weights the demo runs on the **proving ground** (``--fallback proving-ground``, the
default): procedurally generated driving scenes (``proving_ground.world``, split ``demo``) scored by
the small CLIP trained there (``runa-pg-vit`` / ``pretrained: proving-ground``) with the committed
few-shot head and calibrated thresholds of ``calibration/proving_ground/``: known objects green,
unknown ones red, the synthetic FPR95 / AUROC printed, every output labelled "synthetic world, model
trained here: evidence that the pipeline works, not real-world quality". ``--fallback random`` (or
``--tiny``) keeps the photographs on random weights instead.

Random weights: every table, image and file is marked (banner, watermark, ``random_weights`` in
the JSON) and no quality figure (FPR95 / AUROC) is printed, because none would mean anything.
There is no calibrated threshold for a random model either: the demo uses the median uncertainty
of the first frame's boxes, labelled "demo threshold, not calibrated", so both ID and OOD states
of the machinery are visible.
"""
from __future__ import annotations

import argparse
import logging
import math
import os
import pathlib
import socket
import sys
import textwrap
import time
import types
from typing import Any, Dict, List, Optional, Sequence

import numpy as np

from ..core.parameters import default
from ..core.registry import DEFAULT_METHOD, METHODS
from . import bagio, bag_eval, foxglove_layout, make_bag

LOG = logging.getLogger("runa_ood_node.tools.demo")

RANDOM_BANNER = "RANDOM WEIGHTS \u2014 NOT A QUALITY RESULT: scores, OOD flags and alerts below are meaningless"
DEMO_THRESHOLD_LABEL = "demo threshold, not calibrated"
HOW_TO_PROVIDE = [
    "How to provide real weights:",
    "  * runa-ood demo --pretrained /path/to/open_clip_checkpoint.pt  (e.g. ViT-B-16 OpenAI weights), or",
    "  * run once on a machine with internet access (open_clip caches the tag under HF_HOME,",
    "    ~/.cache/huggingface), then copy that cache to this machine.",
]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="out/demo", help="output folder (default %(default)s)")
    p.add_argument("--model", default="ViT-B-16", help="open_clip model to try with real weights (default %(default)s)")
    p.add_argument("--pretrained", default="openai",
                   help="pretrained tag or local checkpoint path; 'none' = go straight to random weights")
    p.add_argument("--random-model", default="ViT-B-32",
                   help="model used with random weights when no real weights load (default %(default)s)")
    p.add_argument("--tiny", action="store_true",
                   help="random fallback on the tiny test ViT (CI, seconds); implies --fallback random")
    p.add_argument("--fallback", default="proving-ground", choices=("proving-ground", "random"),
                   help="without real weights: the proving ground (synthetic scenes, the CLIP trained there, "
                        "its committed head and thresholds) or random weights on the photographs "
                        "(default %(default)s)")
    p.add_argument("--frames", type=int, default=12, help="frames in the demo bag (default %(default)s)")
    p.add_argument("--id-set", default="voc", help="ID label set (default %(default)s)")
    p.add_argument("--skimage", action="store_true", help="use scikit-image's photographs even if the pack exists")
    p.add_argument("--threshold", type=float, default=None, help="use this OOD threshold instead of the default")
    p.add_argument("--thresholds", default=None, help="calibrated thresholds file (real weights only)")
    p.add_argument("--method", default=DEFAULT_METHOD, choices=METHODS,
                   help="OOD method of the node (default %(default)s; uni-ood and tagood need --head)")
    p.add_argument("--head", default=None, help="trained head of the method (`runa-ood finetune --method M --out DIR`)")
    p.add_argument("--rate", type=float, default=1.0, help="replay speed factor (bag at 5 fps; default 1)")
    p.add_argument("--node-timeout", type=float, default=300.0, help="seconds for the node to load and subscribe")
    p.add_argument("--no-progress", action="store_true")


# =========================================================================== frames
def demo_frames(n: int, id_set: str = "voc", force_skimage: bool = False):
    """(frames, description): ~half COCO frames with ID boxes, then OOD-only frames
    (road_anomaly obstacles, oi_apple); or scikit-image photographs (+ mirrored copies)."""
    if not force_skimage and make_bag.pack_available():
        from runa_ood_node.core.dataset import load_dataset

        ds = load_dataset(make_bag.DEFAULT_ANNOTATIONS, id_set)
        by_src: Dict[str, list] = {}
        for f in ds.frames:
            if 1 <= len(f) <= 5:
                by_src.setdefault(f.source, []).append(f)
        n_ood = max(1, n // 2)
        n_id = n - n_ood
        coco = [f for f in by_src.get("lightly_coco256", []) + by_src.get("coco_tiny", []) if f.is_id.any()]
        road = [f for f in by_src.get("road_anomaly", []) if not f.is_id.any()
                and not pathlib.Path(f.path).name.startswith(("animals", "vehicle"))]
        apple = by_src.get("oi_apple", [])
        n_apple = min(len(apple), max(1, n_ood // 3))
        order = _spread(coco, n_id) + _spread(road, n_ood - n_apple) + _spread(apple, n_apple)
        specs = make_bag.pack_frames(make_bag.DEFAULT_ANNOTATIONS, id_set)  # same ids/flags, as FrameSpec
        by_image = {s.image_id: s for s in specs}
        frames = [by_image[f.image_id] for f in order if f.image_id in by_image]
        return frames, f"data pack {make_bag.DEFAULT_ANNOTATIONS.parent} ({len(frames)} frames: COCO with " \
                       f"{id_set.upper()} objects, then RoadAnomaly obstacles and OpenImages apples)"
    frames = make_bag.skimage_frames(id_set, mirrored=True)[:max(1, n)]
    return frames, f"scikit-image sample photographs with hand-labelled boxes ({len(frames)} frames)"


def _spread(items: Sequence, k: int) -> list:
    if k <= 0 or not items:
        return []
    if k >= len(items):
        return list(items)
    return [items[i] for i in np.unique(np.floor(np.arange(k) * (len(items) / k)).astype(int))]


#: what every proving-ground output says of its figures
SYNTHETIC_LABEL = "SYNTHETIC WORLD, MODEL TRAINED HERE: evidence that the pipeline works, not real-world quality"


def proving_ground_frames(n: int, out: pathlib.Path, progress: bool = True):
    """(frames, description): ``n`` frames of the proving ground's ``demo`` split written as a COCO
    split (``world.write_split``) and read back as bag frames (``make_bag.pack_frames``: one reader)."""
    from ..proving_ground import world

    ann = world.write_split(out, "demo", max(1, n), progress=progress)
    frames = make_bag.pack_frames(ann, str(world.LABELS_PATH))
    return frames, f"proving-ground scenes, split 'demo' ({len(frames)} frames, synthetic: ID = " \
                   f"{', '.join(c.name for c in world.ID_CLASSES)})"


# =========================================================================== weights
def _internet_reachable(host: str = "huggingface.co", timeout_s: float = 2.0) -> bool:
    try:
        socket.create_connection((host, 443), timeout=timeout_s).close()
        return True
    except OSError:
        return False


def _real_weights_available(args) -> bool:
    """Whether ``--pretrained`` can give real weights here without trying a download that cannot work:
    a checkpoint file that exists, a tag already in the local cache, or any tag with internet access."""
    from runa_ood_node.core.encoder import find_cached_tag_weights

    pretrained = (args.pretrained or "").strip()
    if pretrained.lower() in ("", "none", "random"):
        return False
    if os.path.isfile(os.path.expanduser(pretrained)):
        return True
    if find_cached_tag_weights(args.model.replace("/", "-"), pretrained):
        return True
    return _internet_reachable()


def _banner(lines: Sequence[str], char: str = "#") -> None:
    from .common import banner

    banner(list(lines), char=char, stream=sys.stdout)


def load_scorer(args, base_params: Dict[str, Any]):
    """(scorer, params, random_weights, weights_note): real weights when they load, else random."""
    from runa_ood_node.core.encoder import WeightsUnavailableError

    pretrained = (args.pretrained or "").strip()
    reason = None
    if pretrained.lower() not in ("", "none", "random"):
        if not _internet_reachable() and not os.environ.get("RUNA_OOD_OFFLINE"):
            os.environ["RUNA_OOD_OFFLINE"] = "1"  # fail fast instead of a minute of download retries
            os.environ["HF_HUB_OFFLINE"] = "1"
            LOG.info("no internet: looking for weights in the local cache only")
        params = dict(base_params, model=args.model, pretrained=pretrained, allow_random_weights=False)
        try:
            print(f"loading {args.model} with pretrained weights {pretrained!r} ...", flush=True)
            return _scorer(params), params, False, f"{args.model} / {pretrained}"
        except (WeightsUnavailableError, FileNotFoundError, RuntimeError) as exc:
            reason = f"{type(exc).__name__}: {exc}"
    else:
        reason = "--pretrained none"
    model = "runa-tiny-vit" if args.tiny else args.random_model
    _banner(["NO PRETRAINED WEIGHTS COULD BE LOADED: this demo continues on RANDOM WEIGHTS.",
             f"tried: --model {args.model} --pretrained {args.pretrained}",
             *["  " + s for s in textwrap.wrap(reason or "", 96)[:6]],
             "", *HOW_TO_PROVIDE, "",
             f"Random model: {model} (seeded). Every table and image below is marked; no quality figure",
             "(FPR95 / AUROC) is printed, because with random weights it would mean nothing."], char="!")
    params = dict(base_params, model=model, pretrained="", allow_random_weights=True)
    return _scorer(params), params, True, reason


def _scorer(params: Dict[str, Any]):
    """The scorer the node builds from ``params`` (``core.config.from_parameters`` -> ``factory.build_scorer``)."""
    from .common import scorer_from_parameters

    return scorer_from_parameters(params)[0]


# =========================================================================== output helpers
def frame_result_from_msg(msg, width: int, height: int):
    """A ``core.pipeline.FrameResult`` rebuilt from an ``OodDetectionArray`` (for drawing): the
    boxes read by the node's reader (``convert.detections_to_arrays``) and clipped by core's
    ``sanitize_boxes``, as the node's own result holds them."""
    from runa_ood_node.core.boxes import BoxStatus, sanitize_boxes
    from runa_ood_node.core.pipeline import FrameResult
    from runa_ood_node.ros.convert import detections_to_arrays

    from runa_ood_node.ros.msgdefs import shared_typestore

    Detection2DArray = shared_typestore().types["vision_msgs/msg/Detection2DArray"]
    cxcywh = detections_to_arrays(Detection2DArray(header=msg.header, detections=[d.detection for d in msg.detections]))[0]
    xyxy, _ = sanitize_boxes(cxcywh, width, height, fmt="cxcywh", min_size=0.0)
    status = np.asarray([int(d.status) for d in msg.detections], np.uint8)
    ok = status == BoxStatus.OK
    unc = np.asarray([d.uncertainty for d in msg.detections], np.float32)
    return FrameResult(boxes_xyxy=xyxy, status=status, uncertainty=np.where(ok, unc, np.nan).astype(np.float32),
                       label_idx=np.where(ok, 0, -1).astype(np.int64),
                       label=[str(d.nearest_label) for d in msg.detections],
                       similarity=np.asarray([d.similarity for d in msg.detections], np.float32),
                       threshold=np.asarray([d.threshold for d in msg.detections], np.float32),
                       is_ood=np.asarray([bool(d.is_ood) for d in msg.detections], bool), timings={})


def _num(v, fmt="{:+.4f}") -> str:
    return "-" if v is None or (isinstance(v, float) and not math.isfinite(v)) else fmt.format(v)


def format_table(rows: List[Dict], random_weights: bool, threshold_note: str) -> str:
    head = (f"{'frame':>5} {'t[s]':>5} {'id':>7} {'category':<14} {'GT':<4} {'status':<10} {'uncert.':>8} "
            f"{'thresh.':>8} {'nearest label':<14} {'sim.':>7} {'OOD?':<4}")
    lines = [head, "-" * len(head)]
    for r in rows:
        gt = "-" if r["gt_is_ood"] is None else ("OOD" if r["gt_is_ood"] else "ID")
        lines.append(f"{r['frame']:>5} {r['t_s']:>5.1f} {str(r['id'])[-7:]:>7} {r['category'][:14]:<14} {gt:<4} "
                     f"{r['status'][:10]:<10} {_num(r['uncertainty']):>8} {_num(r['threshold']):>8} "
                     f"{r['label'][:14]:<14} {_num(r['similarity']):>7} {'OOD' if r['is_ood'] else 'id':<4}")
    lines.append(f"threshold: {threshold_note}")
    if random_weights:
        bar = "*** " + RANDOM_BANNER + " ***"
        lines = [bar] + lines + [bar]
    return "\n".join(lines)


def format_alerts(timeline: List[Dict], t0_ns: int, t_end_ns: int, random_weights: bool,
                  wall0_ns: Optional[int] = None) -> str:
    """Alert timeline. ``t`` is the alert's stamp relative to frame 0's stamp when the alert carries
    a frame stamp (driver alerts), else (node clock: activation, monitor health) its wall time
    relative to the moment frame 0 was published, marked ``w``."""
    lines = [f"{'t[s]':>8} {'topic':<15} {'level':<9} reason", "-" * 100]

    def in_bag(a) -> bool:
        return t0_ns - 1e9 <= a["stamp_ns"] <= t_end_ns + 5e9

    def t_of(a) -> float:
        if in_bag(a):
            return (a["stamp_ns"] - t0_ns) / 1e9
        return (a["stamp_ns"] - wall0_ns) / 1e9 if wall0_ns else float("-inf")

    for a in sorted(timeline, key=t_of):
        if in_bag(a):
            t = f"{t_of(a):8.2f}"
        elif wall0_ns:
            t = f"{t_of(a):7.2f}w"
        else:
            t = "   start"
        topic = "driver_alert" if a["source"] == "OOD_OBJECT" else "monitor_health"
        lines.append(f"{t} {topic:<15} {a['level']:<9} {a['reason'][:170]}")
    if len(lines) == 2:
        lines.append("(no alert received)")
    lines.append("t: frame stamp - stamp of frame 0;  w: node wall clock - wall time frame 0 was published")
    if random_weights:
        lines.insert(0, "*** " + RANDOM_BANNER + " ***")
    return "\n".join(lines)


#: RGB of the contact sheet's title block: random weights (warning), proving ground (synthetic)
WARN_RGB, SYNTHETIC_RGB = (120, 0, 0), (10, 40, 110)


def contact_sheet(images: List[np.ndarray], captions: List[str], title: List[str], tile_w: int = 400,
                  cols: int = 4, warn: bool = False, synthetic: bool = False) -> np.ndarray:
    """Grid of RGB images (each scaled to ``tile_w`` wide, letterboxed to a common height) with a
    caption under every tile and a title block on top (yellow on dark red when ``warn``; white on
    dark blue when ``synthetic``: the proving ground)."""
    import cv2

    tile_h = int(round(tile_w * 0.75))
    cap_h, pad = 24, 6
    cols = max(1, min(cols, len(images)))
    rows = int(math.ceil(len(images) / cols))
    title_h = 12 + 26 * len(title)
    W = cols * (tile_w + pad) + pad
    H = title_h + rows * (tile_h + cap_h + pad) + pad
    sheet = np.full((H, W, 3), 32, np.uint8)
    if warn:
        sheet[:title_h] = WARN_RGB
    elif synthetic:
        sheet[:title_h] = SYNTHETIC_RGB
    for k, line in enumerate(title):
        cv2.putText(sheet, line, (pad + 4, 28 + 26 * k), cv2.FONT_HERSHEY_SIMPLEX, 0.65,
                    (255, 220, 0) if warn else (255, 255, 255), 2 if k == 0 else 1, cv2.LINE_AA)
    for i, (img, cap) in enumerate(zip(images, captions)):
        r, c = divmod(i, cols)
        x0, y0 = pad + c * (tile_w + pad), title_h + r * (tile_h + cap_h + pad)
        s = min(tile_w / img.shape[1], tile_h / img.shape[0])
        size = (max(1, int(img.shape[1] * s)), max(1, int(img.shape[0] * s)))
        im = cv2.resize(img, size, interpolation=cv2.INTER_AREA)
        oy, ox = (tile_h - im.shape[0]) // 2, (tile_w - im.shape[1]) // 2
        sheet[y0:y0 + tile_h, x0:x0 + tile_w] = 0
        sheet[y0 + oy:y0 + oy + im.shape[0], x0 + ox:x0 + ox + im.shape[1]] = im
        cv2.putText(sheet, cap, (x0 + 2, y0 + tile_h + 17), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (230, 230, 230), 1,
                    cv2.LINE_AA)
    return sheet


# =========================================================================== main
def run(args) -> int:
    import cv2

    from runa_ood_node.ros import draw

    from . import common

    logging.basicConfig(level=logging.INFO, format="[%(levelname)s] %(name)s: %(message)s")
    os.environ["ROS_AUTOMATIC_DISCOVERY_RANGE"] = "LOCALHOST"
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    progress = not args.no_progress
    t_start = time.perf_counter()

    # 1) bag: real photographs, or the proving ground's scenes when no real weights exist here
    pg = None
    if not args.tiny and args.fallback == "proving-ground" and not _real_weights_available(args):
        from ..proving_ground import artefacts

        try:  # the committed model, label set, head and thresholds of the method
            pg = artefacts.for_method(args.method)
        except FileNotFoundError as exc:
            print(f"proving ground unavailable ({exc}); falling back to random weights", file=sys.stderr)
    if pg is not None:
        _banner(["NO PRETRAINED WEIGHTS HERE: this demo runs on the PROVING GROUND.", SYNTHETIC_LABEL,
                 f"model {pg.model} / {pg.pretrained} (trained in the synthetic world), method {args.method}, "
                 f"head {pg.head}", f"thresholds {pg.thresholds} (calibrated at 95% ID TPR on synthetic scenes)",
                 "", *HOW_TO_PROVIDE], char="=")
        frames, source_note = proving_ground_frames(args.frames, out / "world", progress)
    else:
        frames, source_note = demo_frames(args.frames, args.id_set, args.skimage)
    if not frames:
        print("no demo frames could be selected", file=sys.stderr)
        return 1
    print(f"demo bag from {source_note}")
    bag_path = out / "demo_bag"
    bag_summary = make_bag.write_bag(frames, bag_path, fps=5.0, storage="mcap", overwrite=True, progress=progress)
    bag_frames = [f for f in bagio.iter_frames(bag_path) if f.ok]

    # 2) weights (real, else random + prominent notice)
    ns = types.SimpleNamespace(lam=default("lam"), blur_radius=default("blur_radius"), scorer=default("scorer"),
                               temperature=default("temperature"), id_set=args.id_set,
                               thresholds=args.thresholds, min_box_size=default("min_box_size"), pretrained=args.pretrained,
                               projection=None, backend="torch", device="cpu", node_params=[], model=args.model,
                               method=args.method, head=args.head)
    base = common.node_parameters_from_args(ns, pg.node_parameters() if pg is not None else None,
                                            image_topic=bag_summary["image_topic"], n_frames=len(bag_frames))
    if pg is not None:
        scorer, params, rw = _scorer(base), base, False
        weights_note = f"{pg.model} / {pg.pretrained} ({SYNTHETIC_LABEL})"
    else:
        scorer, params, rw, weights_note = load_scorer(args, base)

    # 3) threshold
    first = bag_frames[0]
    _ids = first.ids
    first_res = scorer.score(first.rgb, first.boxes_cxcywh, box_format="cxcywh", detector_scores=first.scores,
                             detector_labels=first.class_ids)
    first_unc = first_res.uncertainty[np.isfinite(first_res.uncertainty)]
    if args.threshold is not None:
        params["default_threshold"] = float(args.threshold)
        params["thresholds_file"] = ""
        threshold_note = f"{args.threshold:+.4f} (given with --threshold)"
    elif rw:
        thr = float(np.median(first_unc)) if first_unc.size else 0.0
        params["default_threshold"] = thr
        params["thresholds_file"] = ""
        threshold_note = f"{thr:+.4f} = median uncertainty of frame 0 ({DEMO_THRESHOLD_LABEL})"
    elif params.get("thresholds_file"):
        threshold_note = f"calibrated thresholds from {params['thresholds_file']}"
    else:
        thr = params.get("default_threshold", common.NODE_DEFAULTS["default_threshold"])  # validated with the scorer
        threshold_note = f"{thr:+.4f} = the node's default_threshold (uncalibrated guess; run `runa-ood calibrate`)"
    del scorer

    # 4) node + replay
    print(f"starting the node ({params['model']}, {'RANDOM weights' if rw else params['pretrained']}) and "
          f"replaying {bag_summary['frames']} frames ...", flush=True)
    try:
        live = bag_eval.run_live(bag_path, params, out, out_bag=out / "output_bag", rate=args.rate,
                                 node_timeout_s=args.node_timeout, progress=progress)
    except bag_eval.NodeStartError as exc:
        print(f"demo failed: {exc}", file=sys.stderr)
        return 1
    except ImportError as exc:  # rclpy or the interface packages missing
        print(f"demo failed: {exc}\nInstall/build first: bash scripts/setup.sh && source scripts/env.sh", file=sys.stderr)
        return 1

    layout_path = out / "foxglove_layout.json"
    # every frame of the demo has boxes: the panel pairs each image with its own annotations
    layout_path.write_text(foxglove_layout.dumps(foxglove_layout.layout([(None, live["image_topic"])],
                                                                        synchronize=True)))

    # 5) tables
    gt = bag_eval.ground_truth_map(bag_path)
    records = bag_eval.live_records(live, gt)
    stamps = [f.stamp_ns for f in bag_frames]
    index = {s: i for i, s in enumerate(stamps)}
    rows = [dict(r, frame=index.get(r["stamp_ns"], -1), t_s=(r["stamp_ns"] - stamps[0]) / 1e9) for r in records]
    rows.sort(key=lambda r: (r["frame"], str(r["id"])))
    table = format_table(rows, rw, threshold_note)
    timeline = sorted(bag_eval.alert_timeline(live["alerts"]) + bag_eval.alert_timeline(live["health"]),
                      key=lambda a: a["stamp_ns"])
    alerts_text = format_alerts(timeline, stamps[0], stamps[-1], rw, live.get("publish_wall", {}).get(stamps[0]))
    first_live = {r["id"]: r["uncertainty"] for r in records if r["stamp_ns"] == stamps[0]}
    diffs = [abs(first_live[i] - float(u)) for i, u in zip(_ids, first_res.uncertainty)
             if first_live.get(i) is not None and math.isfinite(float(u))]
    lat = bag_eval.percentiles(list(live["latency_ms"].values()))
    received = {bagio.stamp_ns_of(m.header) for _, m in live["arrays"]}

    # 6) images
    frames_dir = out / "frames"
    frames_dir.mkdir(exist_ok=True)
    tiles, caps, pngs = [], [], []
    by_stamp = {bagio.stamp_ns_of(m.header): m for _, m in live["arrays"]}
    for i, fr in enumerate(bag_frames):
        rgb = fr.rgb
        msg = by_stamp.get(fr.stamp_ns)
        if msg is None:
            ann = rgb.copy()
            cv2.putText(ann, "NO OUTPUT (dropped)", (10, 40), cv2.FONT_HERSHEY_SIMPLEX, 1.0, (255, 0, 0), 2)
            n_flag = 0
        else:
            res = frame_result_from_msg(msg, rgb.shape[1], rgb.shape[0])
            ann = draw.annotate(rgb, res, random_weights=bool(msg.random_weights) or rw)
            n_flag = int(res.is_ood.sum())
        g = fr.ground_truth or {}
        n_gt_ood = sum(1 for is_ood, _cat in g.values() if is_ood)
        n_gt_id = len(g) - n_gt_ood
        p = frames_dir / f"frame_{i:02d}.png"
        cv2.imwrite(str(p), np.ascontiguousarray(ann[:, :, ::-1]))
        pngs.append(str(p))
        tiles.append(ann)
        caps.append(f"frame {i}: GT {n_gt_id} ID / {n_gt_ood} OOD -> flagged OOD {n_flag}")
    title = [f"runa_ood_node demo: {len(bag_frames)} frames, model {params['model']}"
             + (" (RANDOM WEIGHTS)" if rw else f" ({params['pretrained']})"),
             "green = ID, red = flagged OOD, grey = not scored; threshold: " + threshold_note[:90]]
    if rw:
        title.insert(0, "RANDOM WEIGHTS - NOT A QUALITY RESULT (no pretrained weights could be loaded)")
    if pg is not None:
        title.insert(0, SYNTHETIC_LABEL)
    sheet = contact_sheet(tiles, caps, title, warn=rw, synthetic=pg is not None)
    sheet_path = out / "contact_sheet.png"
    cv2.imwrite(str(sheet_path), np.ascontiguousarray(sheet[:, :, ::-1]))

    # 7) report
    head = [f"runa_ood_node demo ({time.strftime('%Y-%m-%d %H:%M:%S')})",
            f"{'frames' if pg is not None else 'photographs'}: {source_note}",
            f"model: {params['model']} / " + ("RANDOM WEIGHTS (seeded)" if rw else str(params["pretrained"])),
            f"weights: {'NOT LOADED: ' + str(weights_note)[:300] if rw else weights_note}",
            f"frames: published {len(live['published_frames'])}, answered {len(received)}, "
            f"dropped {len(live['published_frames']) - len(received)}",
            f"end-to-end latency (image publish -> ood/detections, ms): p50 {lat['p50']}  p95 {lat['p95']}  "
            f"max {lat['max']}",
            f"node vs in-process scorer on frame 0: max |uncertainty difference| = "
            f"{max(diffs) if diffs else float('nan'):.2e} over {len(diffs)} boxes"]
    if rw:
        head.insert(0, "*** " + RANDOM_BANNER + " ***")
        head.append("No FPR95 / AUROC: with random weights they would mean nothing.")
    else:
        m = bag_eval.metrics_from_records(records)
        head.append(f"on these {m['n_id']} ID / {m['n_ood']} OOD boxes (a handful, not a benchmark): "
                    f"FPR95 {m['fpr95']:.3f}  AUROC {m['auroc']:.3f}")
        if pg is not None:
            head.insert(0, "*** " + SYNTHETIC_LABEL + " ***")
            head.append("(" + SYNTHETIC_LABEL + "; the proving ground's full table: docs/proving_ground.md, "
                        "`bash scripts/proving_ground.sh`)")
    report_text = "\n".join(head) + "\n\nPER-BOX TABLE\n" + table + "\n\nALERT TIMELINE\n" + alerts_text + \
        f"\n\nfiles: {sheet_path}, {frames_dir}/frame_*.png, {out / 'output_bag'} (Foxglove/RViz; " \
        f"Foxglove layout {layout_path}), {out / 'demo.json'}\n"
    (out / "report.txt").write_text(report_text, encoding="utf-8")
    common.write_json(out / "demo.json", {
        "random_weights": rw, "random_label": RANDOM_BANNER if rw else None, "model": params["model"],
        "proving_ground": pg is not None, "synthetic_label": SYNTHETIC_LABEL if pg is not None else None,
        "metrics": None if rw else bag_eval.metrics_from_records(records),
        "pretrained": params["pretrained"], "weights_note": weights_note, "photographs": source_note,
        "threshold": params.get("default_threshold"), "threshold_note": threshold_note,
        "node_parameters": params, "bag": bag_summary, "frames_published": len(live["published_frames"]),
        "frames_answered": len(received), "latency_ms": lat,
        "node_vs_inprocess_max_abs_diff": max(diffs) if diffs else None,
        "records": rows, "alerts": timeline, "pngs": pngs, "contact_sheet": str(sheet_path),
        "output_bag": live.get("out_bag"), "foxglove_layout": str(layout_path), "node_log": live["node_log"],
        "seconds": round(time.perf_counter() - t_start, 1)})
    print()
    print(report_text)
    return 0
