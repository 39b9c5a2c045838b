"""`runa-ood finetune`: few-shot fine-tuning of the regional projection ``P_r`` (paper Eq. 7).

Protocol (paper, "Few-shot Fine-tuning" and implementation details): from the ID ground-truth
boxes of an annotated dataset, N shots per ID class are drawn (``--shots 10``,
``Dataset.sample_shots``, seeded); only the regional encoder's projection is trained, with the
backbone frozen, so the regional crops' **pre-projection** features are computed once (and cached
on disk under ``cache_dir()/features``, keyed by model, annotation file and shot boxes) and
``core.finetune.train_projection`` runs AdamW on them (lr 5e-6, batch 256, 100 epochs, tau 0.01
by default). The global projection stays off-the-shelf.

Outputs (``--out DIR`` or ``--domain NAME`` -> ``calibration/<NAME>/``): ``projection.pt`` +
``projection.yaml`` (``core.finetune.save_projection``; load with ``--projection`` in every tool,
or the node's ``projection`` parameter), ``loss_curve.png``, ``finetune_report.json`` with the
Eq. 7 loss and each shot's cosine to its own class text embedding before and after, and
(``--eval-images N``, 0 to skip) before/after metrics on held-out images that contributed no shot.

Every method is fitted through ``Method.fit_shots`` (the one fitting path): a one-class label set is
warned about there (logged, printed here, recorded in the report and the head); UNI-OOD also gets each
shot's image context (``core.finetune.shot_context``: the other ID objects of its image, its training
background text; ``--method-option train_background_text=...``, ``exclude_self=...`` set its head settings).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import pathlib
import time
import warnings

from . import common

LOG = logging.getLogger("runa_ood_node.tools.finetune")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    common.add_common_arguments(parser)  # --method M: the method whose head is trained (head folder in --out)
    g = parser.add_argument_group("fine-tuning (paper defaults)")
    g.add_argument("--shots", type=int, default=10, help="ID boxes drawn per class (default %(default)s)")
    g.add_argument("--seed", type=int, default=0, help="seed of the shot draw and the batch order (default %(default)s)")
    g.add_argument("--epochs", type=int, default=100, help="default %(default)s")
    g.add_argument("--lr", type=float, default=5e-6, help="AdamW learning rate (default %(default)s)")
    g.add_argument("--batch-size", type=int, default=256, help="default %(default)s")
    g.add_argument("--tau", type=float, default=0.01, help="Eq. 7 temperature (default %(default)s)")
    g.add_argument("--weight-decay", type=float, default=0.01, help="AdamW weight decay (default %(default)s)")
    g.add_argument("--max-images", type=int, default=None,
                   help="draw shots (and held-out images) from at most this many images, evenly spread (default all)")
    g.add_argument("--method-option", action="append", default=[], metavar="KEY=VALUE",
                   help="a setting of the method's head, recorded in it (repeatable; not for runa). tagood: "
                        "frame_size=448 (the frame pass's side in px, a multiple of the patch size; torch backend), "
                        "selection=attn|all|mu (token selection), thr=0.5, centre_init=class_means|randn, "
                        "ema_span=0.1 (0 = TagOOD's plain EMA). uni-ood: train_background_text=others|aggregate (a shot's "
                        "training background text: its image's other ID objects, default, or the inference aggregate), "
                        "exclude_self=true|false (inference background text without the candidate's own prompt)")
    o = parser.add_argument_group("output")
    o.add_argument("--domain", default=None, help="write to <calibration dir>/<DOMAIN>/ (see core.paths)")
    o.add_argument("--out", default=None, help="write to this folder instead of the calibration directory")
    o.add_argument("--eval-images", type=int, default=100,
                   help="held-out images (without shots) for the before/after evaluation; 0 skips (default %(default)s)")
    o.add_argument("--no-feature-cache", action="store_true", help="recompute the shots' features")


def _out_dir(args) -> pathlib.Path:
    if args.out:
        return pathlib.Path(args.out)
    if args.domain:
        from ..core.paths import calibration_dir

        return calibration_dir() / args.domain
    raise common.fail(["say where to write the projection: --domain NAME (-> calibration/NAME/) or --out DIR"])


def _feature_cache_key(encoder, dataset, shots, min_box_size: float) -> str:
    st = dataset.annotation_path.stat()
    boxes = [[str(dataset.frames[f].path), int(b), [float(v) for v in dataset.frames[f].boxes[b]]]
             for f, b in zip(shots.frame_idx, shots.box_idx)]
    # the trunk's precision and backend change the features slightly: part of the key
    blob = json.dumps({"model_id": encoder.model_id, "ann": [str(dataset.annotation_path), st.st_size, st.st_mtime_ns],
                       "boxes": boxes, "S": encoder.input_size, "min": min_box_size,
                       "precision": str(getattr(encoder, "precision", "fp32")),
                       "backend": str(getattr(encoder, "backend_name", "torch"))}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


def shot_features(scorer, dataset, shots, use_cache: bool = True, progress: bool = True):
    """Pre-projection features (after ``ln_post``, before any projection) of the shots' regional crops.

    Computed once per run by the pipeline itself: ``scorer.encode(image, shot boxes,
    box_format="xywh", views=("regional",))`` per frame (the scorer's sanitising with its
    ``min_box_size``, its view maker and backend: training sees the crops scoring sees; the global
    views are not built, only ``P_r`` is trained). Boxes are ``xywh`` in original pixels.

    Returns ``(features float32 [S', width] torch, keep bool [S])``: shots whose box is not
    encodable (status other than OK: outside the image, too small, backend failure; non-finite
    features; unreadable image) are dropped (``keep`` False, logged). Cached on disk
    (``cache_dir()/features``) by model id, annotation file, shot boxes, input size,
    ``min_box_size``, trunk precision and backend.
    """
    import numpy as np
    import torch

    from ..core.boxes import BoxStatus
    from ..core.paths import cache_dir

    encoder = scorer.encoder
    path = None
    if use_cache:
        key = _feature_cache_key(encoder, dataset, shots, scorer.min_box_size)
        path = cache_dir() / "features" / f"shots_{key}.pt"
        if path.is_file():
            try:
                blob = torch.load(path, map_location="cpu", weights_only=True)
                feats, keep = blob["features"], blob["keep"].numpy().astype(bool)
                if feats.shape == (int(keep.sum()), encoder.width) and torch.isfinite(feats).all():
                    LOG.info("shot features loaded from cache %s", path)
                    return feats, keep
            except Exception as exc:  # corrupt cache: recompute
                LOG.warning("ignoring unreadable feature cache %s: %s", path, exc)
    n = len(shots)
    feats = torch.full((n, encoder.width), float("nan"))
    keep = np.zeros(n, bool)
    for fr, positions, enc in _encoded_shots(scorer, dataset, shots, ("regional",), progress):
        f_r = enc.data["regional.cls"]
        good = (enc.status == BoxStatus.OK) & torch.isfinite(f_r).all(dim=1).numpy()
        if not good.all():
            LOG.warning("dropping %d unencodable shot box(es) of %s", int((~good).sum()), fr.path)
        pos = np.asarray(positions)[good]
        feats[pos] = f_r[torch.from_numpy(good)]
        keep[pos] = True
    feats = feats[torch.from_numpy(keep)].contiguous()
    if path is not None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            torch.save({"features": feats, "keep": torch.from_numpy(keep)}, path)
        except OSError as exc:
            LOG.warning("cannot write feature cache %s: %s", path, exc)
    return feats, keep


def _encoded_shots(scorer, dataset, shots, views, progress: bool = False):
    """``(frame, shot positions, BoxFeatures)`` per image holding shots: ``scorer.encode`` of its shot
    boxes (xywh) with ``views``; images that cannot be read are logged and skipped."""
    from tqdm import tqdm

    groups = shots.by_frame()
    for fi, positions in tqdm(groups.items(), desc="shot features", unit="img", disable=not progress, leave=False):
        fr = dataset.frames[fi]
        try:
            img = dataset.load_image(fr)
        except Exception as exc:
            LOG.warning("dropping %d shot(s) of %s: %s", len(positions), fr.path, exc)
            continue
        enc = scorer.encode(img, fr.boxes[shots.box_idx[positions]], box_format="xywh", views=views)
        if enc.error:
            LOG.error("shots of %s: %s", fr.path, enc.error)
        yield fr, positions, enc


def run(args) -> int:
    try:
        return _run(args)
    except SystemExit as exc:  # common.fail: the message is already printed
        return int(exc.code or 0)


def _run(args) -> int:
    import numpy as np
    import torch

    from ..core import finetune as ft
    from ..core import metrics
    from ..core.boxes import BoxStatus
    from . import plots

    out = _out_dir(args)
    common.setup_logging(args)
    dataset = common.load_dataset_or_exit(args)
    if args.max_images:
        dataset = dataset.subset(args.max_images)
    try:
        shots = dataset.sample_shots(args.shots, seed=args.seed, min_size=args.min_box_size)
    except ValueError as exc:
        raise common.fail([f"cannot draw shots: {exc}"])
    label_set = dataset.label_set
    scorer = common.scorer_from_args(args, apply_thresholds=False, fit_head=True).scorer
    encoder = scorer.encoder
    rw = bool(encoder.random_weights)
    text_emb = scorer.text_emb
    LOG.info("%d shots over %d classes (%d per class requested; short: %s)", len(shots), len(label_set),
             args.shots, shots.report["short_classes"] or "none")

    _configure_method(scorer.method, args.method_option)
    if not scorer.method.head_is_projection:  # the other methods' heads: the method's own fit on its own features
        return _fit_head(args, scorer, dataset, shots, out)
    t0 = time.perf_counter()
    feats, keep = shot_features(scorer, dataset, shots, use_cache=not args.no_feature_cache,
                                progress=not args.no_progress)
    y = torch.from_numpy(shots.label_idx[keep])
    if feats.shape[0] == 0:
        raise common.fail(["no shot could be encoded (see the warnings above)"])
    feat_s = time.perf_counter() - t0
    init = scorer.method.proj_regional.clone()  # where RunaMethod.fit starts (its head's P_r, else P_g)
    loss_before = float(ft.eq7_loss(feats, y, text_emb, init, args.tau))
    cos_before = ft.own_class_cosine(feats, y, text_emb, init)
    t1 = time.perf_counter()
    fitted = scorer.method.fit_shots({"regional.cls": feats}, y, text_emb, progress=not args.no_progress,
                                     tau=args.tau, lr=args.lr, batch_size=args.batch_size, epochs=args.epochs,
                                     weight_decay=args.weight_decay, seed=args.seed)
    proj, curve = fitted.state["proj_regional"], fitted.loss_curve
    train_s = time.perf_counter() - t1
    loss_after = float(ft.eq7_loss(feats, y, text_emb, proj, args.tau))
    cos_after = ft.own_class_cosine(feats, y, text_emb, proj)
    improved = int((cos_after > cos_before).sum())

    kept_pos = np.flatnonzero(keep)
    shot_list = [{"image_id": dataset.frames[shots.frame_idx[p]].image_id,
                  "ann_id": dataset.frames[shots.frame_idx[p]].ann_ids[shots.box_idx[p]],
                  "label": shots.labels[p]} for p in kept_pos]
    meta = {"model_name": encoder.model_name, "model_id": encoder.model_id, "pretrained": encoder.pretrained,
            "random_weights": rw, "label_set": label_set.name, "prompts": label_set.prompts(),
            "shots": args.shots, "n_shots": int(len(kept_pos)), "seed": args.seed, "lr": args.lr,
            "epochs": args.epochs, "batch_size": args.batch_size, "tau": args.tau, "weight_decay": args.weight_decay,
            "loss_curve": [float(v) for v in curve], "loss_before": loss_before, "loss_after": loss_after,
            "annotations": str(dataset.annotation_path), "id_rule": dataset.id_rule,
            "shots_per_class": shots.report["per_class"], "shot_list": shot_list, "warnings": fitted.warnings}
    if rw:
        meta["warning"] = common.RANDOM_LABEL
    pt = ft.save_projection(out, proj, meta)
    _save_head(out, scorer, label_set, {"proj_regional": proj}, curve, meta)
    lp = plots.loss_plot(curve, out / "loss_curve.png",
                         title=f"Eq. 7 loss, {len(kept_pos)} shots, {label_set.name} ({encoder.model_name})",
                         random_weights=rw)

    report = {"random_weights": rw, "warning": common.RANDOM_LABEL if rw else None,
              "config": common.tool_config(args, encoder), "projection": str(pt), "loss_curve_png": lp.name,
              "shots": shots.report, "n_shots_used": int(len(kept_pos)),
              "seconds": {"features": feat_s, "training": train_s},
              "loss_before": loss_before, "loss_after": loss_after,
              "own_class_cosine_before": cos_before.tolist(), "own_class_cosine_after": cos_after.tolist(),
              "shots_with_higher_own_class_cosine": improved, "held_out": None, "warnings": fitted.warnings}
    _print_warnings(fitted.warnings)
    print(f"Eq. 7 loss on {len(kept_pos)} shots: {loss_before:.4f} -> {loss_after:.4f}; own-class cosine "
          f"mean {float(cos_before.mean()):.4f} -> {float(cos_after.mean()):.4f} "
          f"(higher for {improved}/{len(kept_pos)} shots)")

    if args.eval_images and args.eval_images > 0:
        held = dataset.without_frames(set(shots.frame_idx.tolist())).subset(args.eval_images)
        if held.n_boxes == 0:
            LOG.warning("no held-out boxes left for the before/after evaluation")
        else:
            # encode the held-out boxes once (the views args.ablation needs, with the scorer's view
            # maker and min box size), then score them with P_r = init and P_r = proj
            enc = common.encode_boxes(scorer, held, views=None, progress=not args.no_progress, desc="held-out")
            res = {}
            for name, p in (("before", init), ("after", proj)):
                sc = common.score_boxes(enc, scorer=args.scorer, ablation=args.ablation, lam=args.lam,
                                        temperature=args.temperature, regional_projection=p)
                ok = sc.status == BoxStatus.OK
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", metrics.MetricsWarning)
                    res[name] = metrics.summary(sc.uncertainty[ok & enc.is_id], sc.uncertainty[ok & ~enc.is_id])
            report["held_out"] = {"images": held.n_images, "scorer": args.scorer, "ablation": args.ablation, **res}
            hdr = f"{'':<8}{'FPR95':>8}{'AUROC':>8}{'AUPR-In':>9}{'AUPR-Out':>9}{'#ID':>6}{'#OOD':>6}"
            print(f"held-out ({held.n_images} images without shots, {args.scorer}/{args.ablation}):\n{hdr}")
            for name in ("before", "after"):
                m = res[name]
                print(f"{name:<8}{m['fpr95']:>8.4f}{m['auroc']:>8.4f}{m['aupr_in']:>9.4f}{m['aupr_out']:>9.4f}"
                      f"{m['n_id']:>6}{m['n_ood']:>6}")
    common.write_json(out / "finetune_report.json", report)
    print(f"wrote {pt}, {lp} and {out / 'finetune_report.json'}")
    if rw:
        common.banner([common.RANDOM_LABEL, "this projection was trained on a RANDOM model: plumbing check only"])
    return 0


def _save_head(out, scorer, label_set, state, curve, extra):
    """The head folder files (``core.methods.heads``) of any method: head.pt + head.yaml."""
    from ..core.methods.heads import head_meta, save_head

    hyper = {k: extra[k] for k in ("lr", "epochs", "batch_size", "tau", "weight_decay", "seed") if k in extra}
    hyper.update(extra.get("hyper") or {})
    meta = head_meta(scorer.encoder, label_set, hyper, curve, shots=extra.get("shots"), n_shots=extra.get("n_shots"),
                     warnings=list(extra.get("warnings") or []))
    return save_head(out, scorer.method.name, state, meta)


def _print_warnings(warnings) -> None:
    """The fit's warnings (``Method.fit_shots``; already logged) in the tool's output."""
    for w in warnings:
        print(f"WARNING: {w}")
    if warnings:
        common.banner(["WARNING", *warnings])


def _configure_method(method, options) -> None:
    """``--method-option KEY=VALUE`` -> ``method.configure(KEY=VALUE, ...)`` before the shots are encoded
    (settings such as TagOOD's ``frame_size`` change the features); bad ones end the run with the reason."""
    if not options:
        return
    pairs = dict(o.split("=", 1) for o in options if "=" in o)
    bad = [o for o in options if "=" not in o]
    if bad:
        raise common.fail([f"--method-option: expected KEY=VALUE, got {bad!r}"])
    try:  # Method.configure: a method without options refuses any ("method 'runa' has no options")
        method.configure(**pairs)
    except (TypeError, ValueError) as exc:
        raise common.fail([f"--method-option: {exc}"])


def _fit_head(args, scorer, dataset, shots, out) -> int:
    """Few-shot fit of a non-RUNA method: encode the shot boxes with the views the method fits on (the
    scorer's own view maker and backend, one backend call per image), ``method.fit`` -> head folder."""
    import numpy as np
    import torch

    from ..core.boxes import BoxStatus
    from ..core.pipeline import BoxFeatures
    from . import plots

    from ..core.finetune import shot_context

    method, encoder, label_set = scorer.method, scorer.encoder, dataset.label_set
    rw = bool(encoder.random_weights)
    t0 = time.perf_counter()
    context = shot_context(dataset, shots)  # per shot, its image's other ID objects (UNI-OOD's background text)
    parts, labels, contexts = [], [], []
    for fr, positions, enc in _encoded_shots(scorer, dataset, shots, method.fit_views,
                                             not args.no_progress):
        good = np.flatnonzero(enc.status == BoxStatus.OK)
        if good.size < len(positions):
            LOG.warning("dropping %d unencodable shot box(es) of %s", len(positions) - good.size, fr.path)
        if good.size:
            parts.append(BoxFeatures(enc.boxes_xyxy[good], enc.status[good], enc.rows(good), {}, views=enc.views,
                                     image_wh=enc.image_wh[good]))
            labels.extend(int(v) for v in np.asarray(shots.label_idx)[np.asarray(positions)[good]])
            contexts.extend(context[int(p)] for p in np.asarray(positions)[good])
    if not parts:
        raise common.fail(["no shot could be encoded (see the warnings above)"])
    feats = BoxFeatures.concat(parts)
    y = torch.as_tensor(labels, dtype=torch.long)
    feat_s = time.perf_counter() - t0
    t1 = time.perf_counter()
    fitted = method.fit_shots(feats.data, y, scorer.text_emb, context=contexts, progress=not args.no_progress,
                              epochs=args.epochs, batch_size=args.batch_size, seed=args.seed)
    state, curve, hyper = fitted.state, fitted.loss_curve, fitted.hyper
    train_s = time.perf_counter() - t1
    folder = _save_head(out, scorer, label_set, state, curve, {"hyper": hyper, "shots": args.shots, "n_shots": len(labels),
                                                               "warnings": fitted.warnings})
    lp = plots.loss_plot(curve, out / "loss_curve.png", title=f"{method.name} loss, {len(labels)} shots, "
                         f"{label_set.name} ({encoder.model_name})", random_weights=rw)
    report = {"random_weights": rw, "warning": common.RANDOM_LABEL if rw else None, "method": method.name,
              "config": common.tool_config(args, encoder), "head": str(folder), "loss_curve_png": lp.name,
              "shots": shots.report, "n_shots_used": len(labels), "hyper": hyper,
              "seconds": {"features": feat_s, "training": train_s},
              "loss_first_epoch": curve[0] if curve else None, "loss_last_epoch": curve[-1] if curve else None,
              "warnings": fitted.warnings}
    common.write_json(out / "finetune_report.json", report)
    _print_warnings(fitted.warnings)
    print(f"{method.name} head on {len(labels)} shots: loss {curve[0]:.4f} -> {curve[-1]:.4f}" if curve else
          f"{method.name} head on {len(labels)} shots (no epochs)")
    print(f"wrote {folder}, {lp} and {out / 'finetune_report.json'}")
    if rw:
        common.banner([common.RANDOM_LABEL, "this head was trained on a RANDOM model: plumbing check only"])
    return 0
