"""`runa-ood proving-ground`: the synthetic proving ground of issue 22.

Subcommands
-----------
``world``  writes the COCO splits (``runa_ood_node.proving_ground.world.write_split``: frame i of a
           split from seed ``SPLIT_SEEDS[split] + i``), a contact sheet PNG of a few test frames
           with boxes coloured by group (ID green, near-OOD orange, far-OOD red) and a bag of the
           test split written by ``make-bag``'s writer (so ``evaluate --bag``, ``replay`` and
           ``fleet`` run on it). The ID label set is ``calibration/proving_ground/labels.yaml``.
``train``  trains the proving-ground CLIP (``runa_ood_node.proving_ground.clip_train``).

Synthetic world: evidence that the pipeline works, not real-world quality.
"""
from __future__ import annotations

import argparse
import json
import logging
import pathlib
import sys
import time
from typing import Dict, List

import numpy as np
import torch

from ..core.encoder import DualEncoder
from ..core.paths import _repo_calibration_dir
from ..proving_ground import clip_train as ct
from . import plots

LOG = logging.getLogger(__name__)

#: group -> box colour (RGB) on the contact sheet
GROUP_RGB = {"id": (40, 220, 40), "near": (255, 150, 0), "far": (255, 30, 30)}
DEFAULT_FRAMES = "train=150,calibration=150,test=300"


def parse_frames(text: str) -> Dict[str, int]:
    """``"train=150,calibration=150,test=300"`` -> ``{"train": 150, ...}`` (splits of ``SPLIT_SEEDS``)."""
    from runa_ood_node.proving_ground.world import SPLIT_SEEDS

    out: Dict[str, int] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, sep, n = part.partition("=")
        name = name.strip()
        if not sep or name not in SPLIT_SEEDS:
            raise ValueError(f"--frames: {part!r} is not <split>=<count> with a split in {sorted(SPLIT_SEEDS)}")
        try:
            count = int(n)
        except ValueError:
            raise ValueError(f"--frames: {part!r}: count {n!r} is not an integer") from None
        if count < 0:
            raise ValueError(f"--frames: {part!r}: count must be >= 0")
        out[name] = count
    if not out:
        raise ValueError("--frames: no split given")
    return out


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="pg_command", metavar="SUBCOMMAND")
    w = sub.add_parser("world", help="write the COCO splits, a contact sheet and a bag of the test split",
                       description="write the proving-ground COCO splits, a contact sheet PNG and a bag of the "
                                   "test split (synthetic world)")
    w.add_argument("--out", "-o", default="out/proving_ground", help="output folder (default out/proving_ground)")
    w.add_argument("--frames", default=DEFAULT_FRAMES,
                   help=f"frames per split, <split>=<n>,... (default {DEFAULT_FRAMES})")
    w.add_argument("--bag-split", default="test", help="split written as a bag (default test; '' = no bag)")
    w.add_argument("--storage", choices=("mcap", "sqlite3"), default="mcap", help="bag storage (default mcap)")
    w.add_argument("--fps", type=float, default=5.0, help="bag frame rate of the header stamps (Hz)")
    w.add_argument("--compressed", action="store_true",
                   help="bag images as JPEG CompressedImage (~10x smaller; default raw rgb8 Image, "
                        "about 2.5 MB per 1280x720 frame)")
    w.add_argument("--sheet-frames", type=int, default=8, help="frames on the contact sheet (default 8)")
    w.add_argument("--no-progress", action="store_true", help="no progress bars")
    w.set_defaults(_pg_run=run_world)
    t = sub.add_parser("train", help="train the proving-ground CLIP",
                       description="train the proving-ground CLIP (runa_ood_node.proving_ground.clip_train)")
    add_train_arguments(t)
    t.set_defaults(_pg_run=run_train)


def draw_boxes(rgb: np.ndarray, boxes, classes: List[str]) -> np.ndarray:
    """A copy of ``rgb`` with every box outlined in its group's colour and its class name."""
    import cv2

    from runa_ood_node.proving_ground.world import CLASS_BY_NAME

    img = np.ascontiguousarray(rgb).copy()
    th = max(1, int(round(img.shape[1] / 640)))
    for (x, y, w, h), c in zip(np.asarray(boxes, float).reshape(-1, 4), classes):
        col = GROUP_RGB[CLASS_BY_NAME[c].group]
        cv2.rectangle(img, (int(x), int(y)), (int(round(x + w)) - 1, int(round(y + h)) - 1), col, th)
        cv2.putText(img, c, (int(x), max(int(y) - 4, 12)), cv2.FONT_HERSHEY_SIMPLEX, 0.4 * th, col, th, cv2.LINE_AA)
    return img


def contact_sheet_png(annotations: pathlib.Path, out_png: pathlib.Path, n: int) -> pathlib.Path:
    """Contact sheet of the first ``n`` frames of a written split, boxes coloured by group."""
    import cv2

    from .demo import contact_sheet

    data = json.loads(pathlib.Path(annotations).read_text())
    names = {c["id"]: c["name"] for c in data["categories"]}
    per: Dict[int, list] = {}
    for a in data["annotations"]:
        per.setdefault(a["image_id"], []).append(a)
    images, captions = [], []
    for img in data["images"][:max(n, 0)]:
        bgr = cv2.imread(str(pathlib.Path(annotations).parent / img["file_name"]), cv2.IMREAD_COLOR)
        if bgr is None:
            LOG.warning("cannot read %s; left off the contact sheet", img["file_name"])
            continue
        anns = per.get(img["id"], [])
        images.append(draw_boxes(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB), [a["bbox"] for a in anns],
                                 [names[a["category_id"]] for a in anns]))
        groups = [a["group"] for a in anns]
        captions.append(f"{pathlib.Path(img['file_name']).name} {img['width']}x{img['height']}: "
                        f"{groups.count('id')} ID {groups.count('near')} near {groups.count('far')} far")
    title = ["PROVING GROUND (synthetic world): ground-truth boxes",
             "green: ID (the label set)   orange: near-OOD   red: far-OOD"]
    sheet = contact_sheet(images, captions, title, cols=4) if images else np.zeros((32, 32, 3), np.uint8)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(out_png), cv2.cvtColor(sheet, cv2.COLOR_RGB2BGR))
    return out_png


def class_atlas_png(out_png: pathlib.Path, size: int = 112) -> pathlib.Path:
    """Every class drawn once (``world.render_object``), captioned with its name, attributes and group."""
    import cv2

    from runa_ood_node.proving_ground import world

    from .demo import contact_sheet

    images = [world.render_object(c.name, size) for c in world.CLASSES]
    captions = [f"{c.name} [{c.group}] {c.shape}/{c.texture}/{c.colour}" for c in world.CLASSES]
    title = ["PROVING GROUND (synthetic world): the classes, one per tile",
             "rows: ID (the label set), near-OOD (two attributes of an ID class), far-OOD (at most one)"]
    sheet = contact_sheet(images, captions, title, tile_w=270, cols=6)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(out_png), cv2.cvtColor(sheet, cv2.COLOR_RGB2BGR))
    return out_png


def split_summary(annotations: pathlib.Path) -> dict:
    data = json.loads(pathlib.Path(annotations).read_text())
    groups = [a["group"] for a in data["annotations"]]
    sizes = [(i["width"], i["height"]) for i in data["images"]]
    return {"annotations": str(annotations), "frames": len(data["images"]), "boxes": len(groups),
            "id": groups.count("id"), "near": groups.count("near"), "far": groups.count("far"),
            "frame_sizes": {f"{w}x{h}": sizes.count((w, h)) for w, h in sorted(set(sizes))},
            "objects_placed": data["info"].get("objects_placed"), "objects_dropped": data["info"].get("objects_dropped")}


def run_world(args) -> int:
    from runa_ood_node.proving_ground import world

    from . import bagio, make_bag

    try:
        frames = parse_frames(args.frames)
    except ValueError as exc:
        print(f"proving-ground world: {exc}", file=sys.stderr)
        return 2
    if args.bag_split and args.bag_split not in frames:
        print(f"proving-ground world: --bag-split {args.bag_split!r} is not among --frames ({sorted(frames)})",
              file=sys.stderr)
        return 2
    out = pathlib.Path(args.out)
    progress = not args.no_progress
    t0 = time.perf_counter()
    summary: dict = {"out": str(out), "label_set": str(world.LABELS_PATH),
                     "note": "synthetic world: evidence that the pipeline works, not real-world quality",
                     "splits": {}}
    paths = {}
    try:
        for split, n in frames.items():
            t = time.perf_counter()
            paths[split] = world.write_split(out, split, n, progress=progress)
            summary["splits"][split] = dict(split_summary(paths[split]), base_seed=world.SPLIT_SEEDS[split],
                                            seconds=round(time.perf_counter() - t, 2))
        sheet_split = "test" if "test" in paths else next(iter(paths))
        summary["contact_sheet"] = str(contact_sheet_png(paths[sheet_split], out / "contact_sheet.png",
                                                         args.sheet_frames))
        summary["class_atlas"] = str(class_atlas_png(out / "class_atlas.png"))
        if args.bag_split:
            bag_frames = make_bag.pack_frames(paths[args.bag_split], id_set=str(world.LABELS_PATH),
                                              require_boxes=False)
            summary["bag"] = make_bag.write_bag(bag_frames, out / f"{args.bag_split}_bag", fps=args.fps,
                                                storage=args.storage, compressed=args.compressed, overwrite=True,
                                                progress=progress)
    except (bagio.BagError, ValueError, OSError) as exc:
        print(f"proving-ground world failed: {exc}", file=sys.stderr)
        return 1
    summary["seconds"] = round(time.perf_counter() - t0, 2)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary, indent=2))
    return 0


def run(args) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    fn = getattr(args, "_pg_run", None)
    if fn is None:
        print("runa-ood proving-ground: choose a subcommand: world (the world's splits and bag) or train "
              "(the proving-ground CLIP); see --help", file=sys.stderr)
        return 2
    return fn(args)


# ---------------------------------------------------------------------------------------------- train
def _fractions(text: str):
    """``"LO,HI"`` -> ``(lo, hi)`` with 0 < lo <= hi <= 1 (argparse type)."""
    try:
        lo, hi = (float(v) for v in str(text).split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected LO,HI (two numbers), got {text!r}") from None
    if not 0.0 < lo <= hi <= 1.0:
        raise argparse.ArgumentTypeError(f"expected 0 < LO <= HI <= 1, got {text!r}")
    return lo, hi


def add_train_arguments(p: argparse.ArgumentParser) -> None:
    """``runa-ood proving-ground train``'s options (the trainer: ``proving_ground.clip_train``)."""
    p.add_argument("--out", default=None,
                   help=f"checkpoint to write (default: the repository's calibration/{ct.CHECKPOINT}); the sha256, "
                        "loss curve PNG and run JSON go beside it")
    p.add_argument("--model", default=ct.MODEL_NAME, help="open_clip model config to train (default %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed of the model, the sampler and the augmentations")
    p.add_argument("--scenes", type=int, default=800, help="'clip'-split scenes rendered into the pool")
    p.add_argument("--steps", type=int, default=560, help="optimiser steps")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--warmup", type=int, default=40, help="linear warm-up steps (then cosine decay)")
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--scene-fraction", type=float, default=0.25, help="share of whole-scene / region pairs per batch")
    p.add_argument("--whole-scene", type=float, default=ct.WHOLE_SCENE_P,
                   help="share of the scene pairs showing the whole frame (default %(default)s)")
    p.add_argument("--scene-region", type=_fractions, default=ct.SCENE_REGION, metavar="LO,HI",
                   help="side fractions of the other scene pairs' regions (default %(default)s)")
    p.add_argument("--scene-region-law", choices=ct.REGION_LAWS, default="uniform",
                   help="how the region's side fractions are drawn (default %(default)s)")
    p.add_argument("--tile-fraction", type=float, default=0.0,
                   help="share of object-in-scene tiles per batch (default %(default)s: none)")
    p.add_argument("--tile-region", type=_fractions, default=ct.TILE_REGION, metavar="LO,HI",
                   help="side fractions of the object tiles, log-uniform (default %(default)s)")
    p.add_argument("--eval-scenes", type=int, default=40, help="held-out 'calibration' scenes for the zero-shot figures (0: none)")
    p.add_argument("--threads", type=int, default=2, help="torch threads (2: this machine's cores)")
    p.add_argument("--frame-scale", type=float, default=1.0, help="render frames at this scale (smoke runs only)")
    p.add_argument("--no-progress", action="store_true")


def run_train(args) -> int:
    """Train the proving-ground CLIP, save it with its sha256, loss curve PNG and run JSON."""
    t_start = time.perf_counter()
    torch.set_num_threads(int(args.threads))
    np.random.seed(args.seed)
    progress = not args.no_progress
    out = pathlib.Path(args.out) if args.out else _repo_calibration_dir() / ct.CHECKPOINT
    stem = out.with_suffix("")
    size = None if args.frame_scale == 1.0 else (max(4, round(12 * args.frame_scale)), max(8, round(300 * args.frame_scale)))

    t0 = time.perf_counter()
    pool = ct.build_pool(args.scenes, frame_scale=args.frame_scale, size_range=size, progress=progress)
    render_s = time.perf_counter() - t0
    LOG.info("pool: %d object patches, %d scenes (%.1f s); per class %s", len(pool.patches), len(pool.scenes),
             render_s, pool.class_counts())
    print(f"pool: {len(pool.patches)} object patches from {len(pool.scenes)} scenes in {render_s:.1f} s "
          f"(skipped: {pool.skipped_occluded} occluded > {ct.MAX_OCCLUSION}, {pool.skipped_tiny} tiny)", flush=True)

    model, tokenizer = ct.build_model(args.model, args.seed)
    S = model.visual.image_size
    S = int(S[0] if isinstance(S, (tuple, list)) else S)
    sampler = ct.Sampler(pool, size=S, scene_fraction=args.scene_fraction, seed=args.seed, whole_scene=args.whole_scene,
                         scene_region=args.scene_region, region_law=args.scene_region_law,
                         tile_fraction=args.tile_fraction, tile_region=args.tile_region)
    t0 = time.perf_counter()
    hist = ct.train(model, tokenizer, sampler, args.steps, args.batch_size, lr=args.lr, warmup=args.warmup,
                 weight_decay=args.weight_decay, progress=progress)
    train_s = time.perf_counter() - t0
    ips = args.steps * args.batch_size / max(1e-9, train_s)
    print(f"trained {args.steps} steps x {args.batch_size} in {train_s:.1f} s ({ips:.1f} images/s; "
          f"data {hist['data_s']:.1f} s, model {hist['step_s']:.1f} s); loss {np.mean(hist['loss'][:10]):.3f} -> "
          f"{np.mean(hist['loss'][-10:]):.3f}", flush=True)

    digest = ct.save_checkpoint(model, out)
    size_mb = out.stat().st_size / 1e6
    print(f"checkpoint {out} ({size_mb:.1f} MB, sha256 {digest})", flush=True)
    png = plots.loss_curve_png(hist, stem.with_name(stem.name + "_loss.png"),
                         f"{args.model}: contrastive pre-training in the proving-ground world "
                         f"({args.steps} steps x {args.batch_size}, seed {args.seed})")

    report = {"model": args.model, "checkpoint": str(out), "sha256": digest, "size_mb": round(size_mb, 2),
              "settings": {k: v for k, v in vars(args).items() if not k.startswith("_") and k != "func"},
              "pool": {"scenes": len(pool.scenes), "object_patches": len(pool.patches),
                       "per_class": pool.class_counts(), "skipped_occluded": pool.skipped_occluded,
                       "skipped_tiny": pool.skipped_tiny},
              "times_s": {"render": round(render_s, 1), "train": round(train_s, 1)},
              "images_per_s": round(ips, 1),
              "loss_first10": float(np.mean(hist["loss"][:10])), "loss_last10": float(np.mean(hist["loss"][-10:])),
              "loss_curve_png": str(png)}
    if args.eval_scenes > 0:
        t0 = time.perf_counter()
        enc = DualEncoder.load(args.model, pretrained=str(out))  # the fp16 file as every user loads it
        trained = ct.zero_shot(enc.model, enc.tokenizer, args.eval_scenes, frame_scale=args.frame_scale,
                            size_range=size, progress=progress)
        rnd, rtok = ct.build_model(args.model, seed=10_000 + args.seed)
        random_ = ct.zero_shot(rnd, rtok, args.eval_scenes, frame_scale=args.frame_scale, size_range=size,
                            progress=progress)
        report["times_s"]["eval"] = round(time.perf_counter() - t0, 1)
        report["zero_shot"] = {"label": "synthetic world, model trained here", "trained": trained,
                               "random_weights_same_architecture": random_}
        for name, r in (("trained", trained), ("random", random_)):
            print(f"zero-shot [{name}] on {r['boxes']} {r['split']} boxes: accuracy {r['accuracy_all_classes']:.3f} "
                  f"(ID over ID {r['accuracy_id_boxes_over_id_classes']:.3f}); AUROC near {r['auroc_near']:.3f}, "
                  f"far {r['auroc_far']:.3f}, near <32px {r['auroc_near_below_32px']:.3f}; FPR95 near "
                  f"{r['fpr95_near']:.3f}", flush=True)
    report["times_s"]["total"] = round(time.perf_counter() - t_start, 1)
    stem.with_name(stem.name + "_train.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    print(f"total {report['times_s']['total']:.1f} s; report {stem.with_name(stem.name + '_train.json')}", flush=True)
    return 0
