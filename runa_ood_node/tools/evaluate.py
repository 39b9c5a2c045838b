"""`runa-ood evaluate`: object-level OOD metrics of RUNA and its variants on labelled boxes.

Dataset mode (default): every annotated box of a COCO-style file (default: the shared ood_pack)
is scored; ID boxes are the positive class. For each scorer x ablation the table gives FPR95,
AUROC, AUPR-In, AUPR-Out (fractions, ``core.metrics``), the number of ID / OOD boxes used and the
throughput in boxes per second.

Features are computed **once**: per frame, ``OodScorer.encode(..., views=...)`` sends the
regional and global views of every box (only those the requested ablations need) through the
visual trunk in one backend call; then every scorer x ablation is scored from those features with
``OodScorer.score_features`` (fusion with lam, 1 or 0, similarities, scorer; see ``tools.common``).
``boxes/s`` of a row is (OK boxes) / (image reading + view making + the share of the trunk pass
that ablation needs + its fusion and scoring), i.e. what a run of that configuration alone would
take, measured within the shared pass (a single-view ablation is charged the fraction of the
shared pass that its views make up, e.g. half when both views were encoded).

Outputs in ``--out`` (default ``out/evaluate``): ``report.json`` (``random_weights`` flag, model,
dataset counts, per-run metrics and box status counts), ``roc.png`` (one line per run),
``hist_<scorer>_<ablation>.png`` (ID vs OOD uncertainty, as the paper's Fig. 4).

Methods: ``--method all`` (with ``--head METHOD=DIR`` for each trained method) evaluates every method
side by side in one run: one encoding pass per method (each method's own views and backbone outputs),
the rows of every method in one table and report, and one ROC plot overlaying them
(``<method>/<scorer>/<ablation>``). ``--thresholds`` are fitted for one method and are refused there.

Bag mode: ``--bag PATH`` (with ``--live`` to go through the running node) is delegated to
``tools.bag_eval.run_bag``.
"""
from __future__ import annotations

import argparse
import logging
import pathlib
import sys
import time

from ..core.methods.runa import effective_lam
from . import common

LOG = logging.getLogger("runa_ood_node.tools.evaluate")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    common.add_common_arguments(parser, allow_all=True)
    parser.add_argument("--max-images", type=int, default=None,
                        help="evaluate on at most this many images, evenly spread over the file (default all)")
    parser.add_argument("--out", default="out/evaluate", help="output folder (default %(default)s)")
    parser.add_argument("--tpr", type=float, default=0.95, help="TPR of the FPR@TPR metric (default %(default)s)")
    parser.add_argument("--save-scores", action="store_true", help="also write scores.json (one record per box)")
    parser.add_argument("--baselines", action="store_true",
                        help="also score the zero-shot baselines beside the methods: MCM on the crop alone "
                             "(mcm-crop: runa, scorer mcm, ablation regional, no head) and RUNA without "
                             "fine-tuning (runa-0shot)")
    parser.add_argument("--size-frame", default="1280x720",
                        help="frame size WxH whose boxes the by-size metrics use (a pixel size means something "
                             "else at another resolution); 'all' = every frame (default %(default)s)")
    _add_bag_arguments(parser)


def _add_bag_arguments(parser: argparse.ArgumentParser) -> None:
    """``--bag`` / ``--live`` from ``tools.bag_eval`` when importable, else plain flags (lazy dispatch)."""
    try:
        from . import bag_eval  # noqa: WPS433 (optional teammate module)

        bag_eval.add_bag_arguments(parser)
        return
    except Exception as exc:  # module absent or broken: dataset mode must keep working
        LOG.debug("tools.bag_eval unavailable (%s); adding --bag/--live placeholders", exc)
    existing = {s for a in parser._actions for s in a.option_strings}
    if "--bag" not in existing:
        parser.add_argument("--bag", default=None, help="evaluate on a recorded bag instead (tools.bag_eval)")
    if "--live" not in existing:
        parser.add_argument("--live", action="store_true", help="with --bag: replay through the running node")


def _encoding_entry(enc) -> dict:
    return {"seconds": enc.seconds, "image_errors": enc.image_errors, "boxes": len(enc), "views": list(enc.views)}


#: zero-shot baseline runs of ``--baselines``: (run name, method, scorer, ablation); no head
BASELINES = (("mcm-crop", "runa", "mcm", "regional"), ("runa-0shot", "runa", "max_cosine", "dual"))


def _format_table(rows, random_weights: bool, with_method: bool = False) -> str:
    mcol = (lambda r: f"{r['run']:<10} ") if with_method else (lambda r: "")
    head = (f"{'method':<10} " if with_method else "") + \
        f"{'scorer':<8} {'ablation':<9} {'FPR95':>7} {'AUROC':>7} {'AUPR-In':>8} {'AUPR-Out':>8} " \
        f"{'#ID':>6} {'#OOD':>6} {'boxes/s':>9}"
    lines = [head, "-" * len(head)]

    def f(v):
        return "   n/a" if v is None or v != v else f"{v:7.4f}"

    for r in rows:
        m = r["metrics"]
        lines.append(f"{mcol(r)}{r['scorer']:<8} {r['ablation']:<9} {f(m['fpr95']):>7} {f(m['auroc']):>7} "
                     f"{f(m['aupr_in']):>8} {f(m['aupr_out']):>8} {m['n_id']:>6} {m['n_ood']:>6} "
                     f"{r['boxes_per_s']:>9.1f}")
    for r in rows:
        op = r.get("at_thresholds")
        if op:
            t = "n/a" if op["tpr"] is None else f"{op['tpr']:.4f}"
            f_ = "n/a" if op["fpr"] is None else f"{op['fpr']:.4f}"
            lines.append(f"at thresholds ({r['scorer']}/{r['ablation']}, target TPR {op['target_tpr']}): "
                         f"TPR {t}, FPR {f_}" + (" [MISMATCHED thresholds: fitted for another configuration]"
                                                 if op.get("mismatch") else ""))
    if random_weights:
        lines.insert(0, f"*** {common.RANDOM_LABEL} ***")
        lines.append(f"*** {common.RANDOM_LABEL} ***")
    return "\n".join(lines)


def _format_breakdown(rows, random_weights: bool) -> str:
    """AUROC / FPR95 per OOD group and per box size (``metrics.breakdown``), one line per run; empty
    when the dataset names no group and no size bin holds boxes."""
    groups = sorted({g for r in rows for g in r.get("breakdown", {}).get("by_group", {})})
    bins = [b for b in rows[0].get("breakdown", {}).get("by_size", {})] if rows else []
    if not groups and not bins:
        return ""

    def cell(m):
        if not m or m.get("auroc") is None or m["auroc"] != m["auroc"]:
            return f"{'n/a':>13}"
        return f"{m['auroc']:.3f}/{m['fpr95']:.3f}".rjust(13)

    cols = [f"{g} OOD" for g in groups] + [f"size {b}" for b in bins] + \
        [f"{b} {g}" for b in bins for g in groups]
    head = f"{'run':<30} " + " ".join(f"{c:>13}" for c in cols)
    lines = ["AUROC/FPR95 by OOD group and by box size sqrt(w*h) px (ID boxes of the same size bin as positives)",
             head, "-" * len(head)]
    for r in rows:
        bd = r.get("breakdown", {})
        vals = [cell(bd.get("by_group", {}).get(g)) for g in groups] + \
            [cell(bd.get("by_size", {}).get(b, {}).get("all")) for b in bins] + \
            [cell(bd.get("by_size", {}).get(b, {}).get(g)) for b in bins for g in groups]
        lines.append(f"{r['run'] + '/' + r['scorer'] + '/' + r['ablation']:<30} " + " ".join(vals))
    counts = rows[0]["breakdown"]["by_size"] if bins else {}
    if counts:
        lines.append("boxes per size bin (ID/OOD): " + ", ".join(
            f"{b} {c['all']['n_id']}/{c['all']['n_ood']}" for b, c in counts.items()))
    if random_weights:
        lines.append(f"*** {common.RANDOM_LABEL} ***")
    return "\n".join(lines)


def _size_mask(enc, size_frame: str):
    """Boxes whose frame is ``size_frame`` (``WxH``), for the by-size bins; all boxes for ``all`` or when
    no frame has that size (said in the report's ``size_frame``)."""
    import numpy as np

    if not size_frame or size_frame == "all":
        return np.ones(len(enc), bool), "all frames"
    try:
        w, h = (int(v) for v in size_frame.lower().split("x"))
    except ValueError:
        raise common.fail([f"--size-frame {size_frame!r}: expected WxH (e.g. 1280x720) or 'all'"])
    mask = (enc.frame_wh[:, 0] == w) & (enc.frame_wh[:, 1] == h) if len(enc) else np.zeros(0, bool)
    if not mask.any():
        return np.ones(len(enc), bool), f"all frames (none is {w}x{h})"
    return mask, f"{w}x{h} frames ({int(mask.sum())} of {len(enc)} boxes)"


def run(args) -> int:
    if getattr(args, "bag", None):  # one configuration of a bag (bag_eval resolves --method / --head)
        try:
            from . import bag_eval
        except Exception as exc:
            print(f"error: --bag needs runa_ood_node.tools.bag_eval, which cannot be imported: {exc}",
                  file=sys.stderr)
            return 2
        try:
            return int(bag_eval.run_bag(args) or 0)
        except SystemExit as exc:  # common.fail inside bag_eval: the message is already printed
            return int(exc.code or 0)
    try:
        heads = common.method_heads(args)
    except SystemExit as exc:
        return int(exc.code or 0)
    if len(heads) == 1:  # one method: --head is its one value, as the node's `head` parameter
        (args.method, args.head), = heads.items()
    if getattr(args, "live", False):
        print("error: --live needs --bag PATH", file=sys.stderr)
        return 2
    common.setup_logging(args)
    try:
        return _run_dataset(args)
    except SystemExit as exc:  # common.fail: the message is already printed
        return int(exc.code or 0)


def _run_dataset(args) -> int:
    import numpy as np
    import warnings

    from ..core import metrics
    from ..core.boxes import BoxStatus
    from . import plots

    from ..core.methods import get_method

    heads = common.method_heads(args)
    methods = list(heads)
    several = len(methods) > 1
    scorers = common.expand_choice(args.scorer, common.SCORERS)
    ablations = common.expand_choice(args.ablation, common.ABLATIONS)
    if getattr(args, "baselines", False) and args.thresholds:
        raise common.fail(["--thresholds are fitted for one configuration: --baselines compares without them"])
    if several and args.thresholds:
        raise common.fail(["--thresholds are fitted for one method and head: compare --method all without them"])
    dataset = common.load_dataset_or_exit(args)
    if args.max_images:
        dataset = dataset.subset(args.max_images)
    if dataset.n_boxes == 0:
        raise common.fail([f"no labelled boxes in {dataset.annotation_path} for ID set {args.id_set!r}"])
    thresholds = common.load_thresholds_or_exit(args)
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows, curves, all_records, encodings, th_report = [], {}, {}, {}, None
    # runs: (name, method, head, scorers, ablations); --baselines adds the zero-shot ones (no head)
    runs = [(m, m, heads[m], scorers, [ab for ab in ablations if ab in get_method(m).ablations]) for m in methods]
    if getattr(args, "baselines", False):
        runs += [(name, m, "", [sc], [ab]) for name, m, sc, ab in BASELINES]
    several = len(runs) > 1
    size_info = None
    for run_name, method, head, run_scorers, abls in runs:
        # the method's ablations among those asked (RUNA's views ablation; the others score both views)
        if not abls:
            LOG.warning("method %s has none of the ablations %s: skipped", method, ablations)
            continue
        # one pipeline per method (the tools' one path, common.scorer_from_args ->
        # factory.build_scorer): its encode() runs once per frame, its score_features() once per
        # scorer x ablation; --thresholds are checked and applied per run below (_check_thresholds)
        ref = common.scorer_from_args(args, {"scorer": run_scorers[0], "method": method, "head": head},
                                      ablation=abls[0], apply_thresholds=False).scorer
        encoder = ref.encoder
        th_report, th_wrong = _check_thresholds(args, thresholds, ref, run_scorers, abls)
        rw = bool(encoder.random_weights)
        LOG.info("evaluating %d images, %d boxes (%d ID / %d OOD), ID set %s, method %s, scorers %s, ablations %s",
                 dataset.n_images, dataset.n_boxes, dataset.n_id, dataset.n_ood, dataset.label_set.name, run_name,
                 run_scorers, abls)
        views = tuple(dict.fromkeys(v for ab in abls for v in ref.method.views_for(ab)))
        t0 = time.perf_counter()
        enc = common.encode_boxes(ref, dataset, views=views, progress=not args.no_progress,
                                  desc=f"encoding boxes ({run_name})" if several else "encoding boxes")
        LOG.info("encoded %d boxes of %d images (%s views) in %.1f s", len(enc), enc.n_images, "+".join(enc.views),
                 time.perf_counter() - t0)
        encodings[run_name] = enc
        size_mask, size_info = _size_mask(enc, getattr(args, "size_frame", "all"))
        for ab in abls:
            for sc in run_scorers:
                scored = common.score_boxes(enc, scorer=sc, ablation=ab)
                ok = scored.status == BoxStatus.OK
                id_s = scored.uncertainty[ok & enc.is_id]
                ood_s = scored.uncertainty[ok & ~enc.is_id]
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", metrics.MetricsWarning)
                    summ = metrics.summary(id_s, ood_s, tpr=args.tpr)
                    fpr, tpr, _ = metrics.roc_curve(id_s, ood_s)
                secs = enc.seconds_for(ab) + scored.seconds
                n_ok = int(ok.sum())
                names, counts = np.unique(scored.status, return_counts=True)
                row = {"run": run_name, "method": method, "head": head or None, "scorer": sc, "ablation": ab,
                       "lam": effective_lam(ab, args.lam), "metrics": summ,
                       "boxes_per_s": n_ok / secs if secs > 0 else float("nan"), "seconds": secs,
                       "status_counts": {BoxStatus(int(s)).name: int(c) for s, c in zip(names, counts)},
                       "nearest_label_accuracy_on_id": _label_accuracy(enc, scored, dataset.label_set),
                       "breakdown": metrics.breakdown(scored.uncertainty, enc.is_id, enc.group, enc.size, size_mask,
                                                      tpr=args.tpr)}  # NaN unless scored (ScoredBoxes)
                tib = scored.result.tokens_in_box if scored.result is not None else None
                if tib is not None:  # one-pass methods (TagOOD): scored boxes that cover no token centre
                    row["boxes_below_token"] = scored.result.boxes_below_token
                    row["boxes_below_token_id_ood"] = [int(np.count_nonzero(ok & (tib < 1) & m))
                                                       for m in (enc.is_id, ~enc.is_id)]
                gthr = None
                wrong = th_wrong.get((sc, ab))
                if wrong is not None and (not wrong or args.allow_threshold_mismatch):
                    row["at_thresholds"] = _operating_point(thresholds, scored, ok, enc.is_id)
                    row["at_thresholds"]["mismatch"] = wrong
                    gthr = thresholds.global_threshold
                rows.append(row)
                name = f"{run_name}/{sc}/{ab}" if several else f"{sc}/{ab}"
                curves[name] = (fpr, tpr, summ)
                stem = f"{run_name}_{sc}_{ab}" if several else f"{sc}_{ab}"
                hp = plots.hist_plot(id_s, ood_s, out / f"hist_{stem}.png",
                                     title=f"{name} — {dataset.label_set.name} ID vs OOD boxes",
                                     threshold=gthr, random_weights=rw)
                row["histogram"] = hp.name
                if args.save_scores:
                    all_records[name] = common.make_records(enc, scored, secs)
    if not rows:
        raise common.fail([f"no method of {methods} accepts the ablations {ablations}"])
    roc = plots.roc_plot(curves, out / "roc.png",
                         title=f"ROC, ID = {dataset.label_set.name} ({encoder.model_name})", random_weights=rw)

    table = _format_table(rows, rw, several)
    print(table)
    bd_table = _format_breakdown(rows, rw)
    if bd_table:
        print(bd_table)
    for r in rows:
        if "boxes_below_token" in r:
            print(f"{r['run']}: {r['boxes_below_token']} of {r['status_counts'].get('OK', 0)} scored boxes cover no token centre (ID/OOD "
                  f"{r['boxes_below_token_id_ood'][0]}/{r['boxes_below_token_id_ood'][1]}): scored from their "
                  "nearest token, shared with neighbours")
    report = {
        "random_weights": rw,
        "warning": common.RANDOM_LABEL if rw else None,
        "config": common.tool_config(args, encoder),
        "dataset": dataset.describe(),
        "methods": methods,
        "runs_compared": [r[0] for r in runs],
        "encoding": {**({m: _encoding_entry(e) for m, e in encodings.items()} if several else
                        _encoding_entry(enc)),
                     "note": "features computed once per box and method (OodScorer.encode: one trunk pass per "
                             "frame over the views listed), shared by all scorers and ablations; each run "
                             "scored with OodScorer.score_features"},
        "tpr": args.tpr,
        "thresholds": th_report,
        "runs": rows,
        "plots": {"roc": roc.name},
        "table": table,
        "breakdown_table": bd_table,
        "size_frame": size_info,
        "size_bins": {name: [lo, hi] for name, lo, hi in metrics.SIZE_BINS},
    }
    common.write_json(out / "report.json", report)
    if args.save_scores:
        common.write_json(out / "scores.json", {k: list(v) for k, v in all_records.items()})
    if any(e.image_errors for e in encodings.values()):
        LOG.warning("frame problem(s), see report.json encoding image_errors")
    print(f"wrote {out / 'report.json'}, {roc} and {len(rows)} histogram(s)")
    if rw:
        common.banner([common.RANDOM_LABEL, "the table above is a plumbing check, not a quality result"])
    return 0


def _check_thresholds(args, thresholds, ref, scorers, ablations):
    """``--thresholds`` against every scorer x ablation run (``core.thresholds``' one check).

    Returns ``(report entry, {(scorer, ablation): mismatches})``; the thresholds apply to the runs
    without mismatches (all runs with ``--allow-threshold-mismatch``, marked). Exit 2 when they fit
    no run and the override is not given."""
    if thresholds is None:
        return None, {}
    from ..core.thresholds import ThresholdsMismatchError, fit_identity

    wrong = {(sc, ab): thresholds.check_compatible(fit_identity(ref, scorer_name=sc, ablation=ab))
             for ab in ablations for sc in scorers}
    allow = bool(args.allow_threshold_mismatch)
    if all(wrong.values()):
        first = wrong[(scorers[0], ablations[0])]
        if not allow:
            raise common.fail(str(ThresholdsMismatchError(args.thresholds, first)).splitlines())
        LOG.warning("--allow-threshold-mismatch: thresholds %s fit no run (%s); applied anyway, reported as "
                    "mismatched", args.thresholds, "; ".join(first))
    applied = [f"{sc}/{ab}" for (sc, ab), w in wrong.items() if allow or not w]
    return ({"file": args.thresholds, "allow_mismatch": allow, "applied_to": applied,
             "mismatch": {f"{sc}/{ab}": w for (sc, ab), w in wrong.items() if w},
             "fitted_for": thresholds.fitted_for}, wrong)


def _operating_point(thresholds, scored, ok, is_id) -> dict:
    """TPR (ID boxes accepted) and FPR (OOD boxes accepted) at the per-class thresholds."""
    import numpy as np

    thr = thresholds.for_labels(scored.label)
    acc = ok & (scored.uncertainty <= thr)
    n_id, n_ood = int((ok & is_id).sum()), int((ok & ~is_id).sum())
    return {"tpr": float(acc[is_id].sum() / n_id) if n_id else None,
            "fpr": float(acc[~is_id].sum() / n_ood) if n_ood else None,
            "global_threshold": thresholds.global_threshold, "target_tpr": thresholds.tpr}


def _label_accuracy(enc, scored, label_set) -> float:
    """Fraction of scored ID boxes whose nearest ID label is their own category (NaN if none)."""
    from ..core.boxes import BoxStatus
    from ..core.dataset import label_lookup, normalize_name

    lookup = label_lookup(label_set)
    hits = tot = 0
    for i in range(len(enc)):
        if enc.is_id[i] and scored.status[i] == BoxStatus.OK:
            k = lookup.get(normalize_name(enc.category[i]))
            if k is None:
                continue
            tot += 1
            hits += int(scored.label_idx[i] == k)
    return hits / tot if tot else float("nan")
