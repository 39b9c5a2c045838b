"""`runa-ood calibrate`: OOD thresholds at a target ID true-positive rate, with a held-out check.

Procedure:

1. the annotated images are split **by image** (``--split``, seeded) into a calibration part and
   a held-out part;
2. every box is scored with the configured model / projection / scorer / ablation (the same
   loop as ``evaluate``, ``tools.common.score_dataset``);
3. ``core.thresholds.calibrate`` fits, on the calibration part's **ID** boxes only, a global
   threshold (smallest gamma accepting >= ``--tpr`` of them) and a per-class threshold for every
   nearest-ID-label with at least ``--min-per-class`` boxes. Boxes are grouped by the label the
   scorer *predicts* (what the node looks thresholds up by at run time);
4. the held-out ID boxes give the achieved TPR with a ``--confidence`` Wilson interval, and, when
   the file has OOD boxes (never used for fitting), the FPR (OOD boxes accepted as ID) with its
   interval, both for the per-class thresholds and for the global threshold alone.

Writes the thresholds YAML (``--out PATH`` or ``--domain NAME`` ->
``calibration/<NAME>/thresholds.yaml``) and ``calibration_report.json`` next to it. Refuses (exit
status 2, nothing written) when the calibration part has fewer ID boxes than the TPR needs
(``ceil(1/(1-tpr))``, 20 for 0.95).
"""
from __future__ import annotations

import argparse
import logging
import pathlib

from . import common

LOG = logging.getLogger("runa_ood_node.tools.calibrate")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    common.add_common_arguments(parser)
    g = parser.add_argument_group("calibration")
    g.add_argument("--tpr", type=float, default=0.95, help="target ID acceptance rate (default %(default)s)")
    g.add_argument("--split", type=float, default=0.5,
                   help="fraction of images used for fitting; the rest is held out (default %(default)s)")
    g.add_argument("--seed", type=int, default=0, help="seed of the image split (default %(default)s)")
    g.add_argument("--min-per-class", type=int, default=20,
                   help="boxes a class needs for its own threshold, else it uses the global one (default %(default)s)")
    g.add_argument("--confidence", type=float, default=0.95, help="level of the reported intervals (default %(default)s)")
    g.add_argument("--max-images", type=int, default=None, help="use at most this many images, evenly spread")
    o = parser.add_argument_group("output")
    o.add_argument("--domain", default=None, help="write <calibration dir>/<DOMAIN>/thresholds.yaml")
    o.add_argument("--out", default=None, help="thresholds YAML path (overrides --domain)")


def _out_path(args) -> pathlib.Path:
    if args.out:
        p = pathlib.Path(args.out)
        return p / "thresholds.yaml" if p.is_dir() or p.suffix == "" else p
    if args.domain:
        from ..core.paths import calibration_dir

        return calibration_dir() / args.domain / "thresholds.yaml"
    raise common.fail(["say where to write thresholds: --domain NAME (-> calibration/NAME/thresholds.yaml) "
                       "or --out PATH"])


def _rate(values, confidence: float):
    """(rate, lo, hi, n) of ``values <= 0`` (accepted) with a Wilson interval; None when empty."""
    import numpy as np

    from ..core.thresholds import tpr_with_ci

    v = np.asarray(values, np.float64)
    v = v[np.isfinite(v)]
    if v.size == 0:
        return None
    r, lo, hi = tpr_with_ci(v, 0.0, confidence=confidence)
    return {"rate": r, "lo": lo, "hi": hi, "n": int(v.size)}


def run(args) -> int:
    try:
        return _run(args)
    except SystemExit as exc:  # common.fail: message already printed
        return int(exc.code or 0)


def _run(args) -> int:
    import numpy as np

    from ..core.boxes import BoxStatus
    from ..core.thresholds import calibrate, fit_identity, min_samples_for_tpr

    common.setup_logging(args)
    if not 0.0 < args.tpr < 1.0:
        raise common.fail([f"--tpr must be in (0, 1), got {args.tpr}"])
    if not 0.0 < args.split <= 1.0:
        raise common.fail([f"--split must be in (0, 1], got {args.split}"])
    out = _out_path(args)
    dataset = common.load_dataset_or_exit(args)
    if args.max_images:
        dataset = dataset.subset(args.max_images)
    cal, held = dataset.split(args.split, seed=args.seed)
    need = min_samples_for_tpr(args.tpr)
    if cal.n_id < need:  # refuse before loading the model
        raise common.fail([f"too few ID boxes to calibrate for tpr={args.tpr}: the calibration part "
                           f"({cal.n_images} of {dataset.n_images} images, --split {args.split}) has {cal.n_id} ID "
                           f"boxes, at least ceil(1/(1-tpr)) = {need} are needed.",
                           "Use more images (--max-images / a larger annotation file), a larger --split or a "
                           "lower --tpr."])
    scorer = common.scorer_from_args(args, apply_thresholds=False).scorer  # fits them: none applied
    encoder = scorer.encoder
    rw = bool(encoder.random_weights)
    progress = not args.no_progress
    rec_cal = common.score_dataset(scorer, cal, progress=progress)
    is_id, unc, labels = rec_cal.arrays()
    ok = np.asarray([r["status"] == BoxStatus.OK.name for r in rec_cal])
    sel = ok & is_id
    meta = {"model_id": encoder.model_id, "model_name": encoder.model_name, "pretrained": encoder.pretrained,
            "random_weights": rw, "scorer": scorer.scorer, "label_set": dataset.label_set.name,
            "ablation": scorer.ablation, "blur_radius": scorer.blur_radius,
            "temperature": scorer.temperature, "projection": args.projection,
            "annotations": str(dataset.annotation_path), "split": args.split, "seed": args.seed,
            "label_source": "predicted nearest ID label",
            # what the node and the tools check before applying them; its ``lam`` is the fusion weight the
            # scores were made with (the ablation's effective lam: 1 regional, 0 global), the only lam written
            "fitted_for": fit_identity(scorer)}
    if rw:
        meta["warning"] = common.RANDOM_LABEL
    try:
        thr, rep = calibrate(unc[sel], [labels[i] for i in np.flatnonzero(sel)], tpr=args.tpr,
                             min_per_class=args.min_per_class, meta=meta)
    except ValueError as exc:
        raise common.fail([f"cannot calibrate: {exc}",
                           f"(calibration part: {cal.n_images} images, {int(sel.sum())} scored ID boxes; "
                           f"box status counts {rec_cal.status_counts})"])
    thr.save(out)

    report = {"random_weights": rw, "warning": common.RANDOM_LABEL if rw else None,
              "config": common.tool_config(args, encoder), "thresholds_file": str(out),
              "dataset": dataset.describe(), "calibration_images": cal.n_images, "held_out_images": held.n_images,
              "fit": rep, "calibration_boxes_per_s": rec_cal.boxes_per_s, "held_out": None, "ood": None}

    # OOD boxes of the calibration part were not used for fitting either: pool them with held-out OOD
    ood_unc, ood_lab = list(unc[ok & ~is_id]), [labels[i] for i in np.flatnonzero(ok & ~is_id)]
    if held.n_boxes:
        rec_h = common.score_dataset(scorer, held, progress=progress)
        h_id, h_unc, h_lab = rec_h.arrays()
        h_ok = np.asarray([r["status"] == BoxStatus.OK.name for r in rec_h])
        m = h_ok & h_id
        lab_m = [h_lab[i] for i in np.flatnonzero(m)]
        report["held_out"] = {
            "per_class": _rate(h_unc[m] - thr.for_labels(lab_m), args.confidence),
            "global_only": _rate(h_unc[m] - thr.global_threshold, args.confidence),
            "status_counts": rec_h.status_counts}
        ood_unc += list(h_unc[h_ok & ~h_id])
        ood_lab += [h_lab[i] for i in np.flatnonzero(h_ok & ~h_id)]
    if ood_unc:
        o = np.asarray(ood_unc, np.float64)
        report["ood"] = {"fpr_per_class": _rate(o - thr.for_labels(ood_lab), args.confidence),
                         "fpr_global_only": _rate(o - thr.global_threshold, args.confidence)}
    rpath = common.write_json(out.with_name("calibration_report.json"), report)

    lines = [f"thresholds ({scorer.scorer}/{scorer.ablation}, ID set {dataset.label_set.name}, tpr {args.tpr}) "
             f"-> {out}",
             f"  global {thr.global_threshold:.5f} from {rep['n']} ID boxes of {cal.n_images} images "
             f"(achieved {rep['global_tpr']:.3f} on them)",
             f"  per-class thresholds: {len(thr.per_class)}; {len(rep['fallback_classes'])} class(es) use the global "
             f"one (< {rep['min_required']} boxes): {', '.join(rep['fallback_classes']) or '-'}"]
    ho = report["held_out"]
    pct = int(round(args.confidence * 100))
    if ho and ho["per_class"]:
        a, b = ho["per_class"], ho["global_only"]
        lines.append(f"  held-out ID TPR: {a['rate']:.3f} [{a['lo']:.3f}, {a['hi']:.3f}] ({pct}% CI, n={a['n']}); "
                     f"global threshold only: {b['rate']:.3f} [{b['lo']:.3f}, {b['hi']:.3f}]")
    else:
        lines.append("  held-out ID TPR: n/a (no held-out ID boxes; use --split < 1)")
    if report["ood"]:
        a, b = report["ood"]["fpr_per_class"], report["ood"]["fpr_global_only"]
        lines.append(f"  OOD FPR (OOD boxes accepted as ID): {a['rate']:.3f} [{a['lo']:.3f}, {a['hi']:.3f}] "
                     f"(n={a['n']}); global only: {b['rate']:.3f}")
    else:
        lines.append("  OOD FPR: n/a (no OOD boxes in this file)")
    if rw:
        lines.insert(0, f"*** {common.RANDOM_LABEL} ***")
    print("\n".join(lines))
    print(f"wrote {out} and {rpath}")
    if rw:
        common.banner([common.RANDOM_LABEL, "these thresholds belong to a RANDOM model: plumbing check only"])
    return 0
