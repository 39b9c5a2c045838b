"""OodScorer end to end on a real photograph with the tiny random ViT.

Random weights make the scores meaningless, so these tests check structure and invariants that hold
for any weights: batching equivalence, statuses, caps, ablations, failure handling, thresholds.
"""
import contextlib
import json
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from runa_ood_node.core.boxes import BoxStatus
from runa_ood_node.core.config import method_settings
from runa_ood_node.core.labels import load_label_set
from runa_ood_node.core.pipeline import FrameResult, OodScorer


@contextlib.contextmanager
def using_backend(encoder, backend, name=None):
    """``encoder`` runs ``backend`` for its trunk inside the block, its torch trunk again after it."""
    encoder.set_backend(backend, name=name)
    try:
        yield
    finally:
        encoder.set_backend(None)


def _runa(**values):
    """RUNA's settings with ``values`` over the table's defaults (``core.config.method_settings``)."""
    return method_settings("runa", values)


def _device_lost(views):
    raise RuntimeError("CUDA error: device lost")

TINY = "runa-tiny-vit"


class FakeThresholds:
    """Stand-in with the Thresholds interface (for_label, global_threshold)."""

    def __init__(self, global_threshold, per_class=None):
        self.global_threshold = global_threshold
        self.per_class = per_class or {}

    def for_label(self, label):
        return self.per_class.get(label, self.global_threshold)


@pytest.fixture(scope="module")
def scorer(tiny_encoder):
    return OodScorer(tiny_encoder, "voc")


@pytest.fixture(scope="module")
def photo(real_photo):
    image, boxes_xywh = real_photo
    return image, np.asarray(boxes_xywh, np.float32)


def _check_shapes(r: FrameResult, n: int):
    assert r.boxes_xyxy.shape == (n, 4) and r.boxes_xyxy.dtype == np.float32
    assert r.status.shape == (n,) and r.status.dtype == np.uint8
    for a in (r.uncertainty, r.similarity, r.threshold):
        assert a.shape == (n,) and a.dtype == np.float32
    assert r.label_idx.shape == (n,) and r.is_ood.shape == (n,) and r.is_ood.dtype == bool
    assert len(r.label) == n and len(r) == n
    assert set(r.timings) == {"views", "encode", "score", "total"}
    assert all(v >= 0 for v in r.timings.values())


def test_scores_real_photo(scorer, photo):
    image, boxes = photo
    r = scorer.score(image, boxes, box_format="xywh")
    n = len(boxes)
    _check_shapes(r, n)
    assert (r.status == BoxStatus.OK).all() and r.error is None
    assert np.isfinite(r.uncertainty).all() and np.isfinite(r.similarity).all()
    # runa: uncertainty = -max cosine, and the label is the argmax label
    assert np.allclose(r.uncertainty, -r.similarity, atol=1e-6)
    assert ((r.label_idx >= 0) & (r.label_idx < 20)).all()
    assert r.label == [scorer.label_set.labels[k] for k in r.label_idx]
    # no thresholds: threshold NaN and nothing declared OOD
    assert np.isnan(r.threshold).all() and not r.is_ood.any()
    assert r.boxes_xyxy[0].tolist() == pytest.approx([boxes[0, 0], boxes[0, 1], boxes[0, 0] + boxes[0, 2],
                                                      boxes[0, 1] + boxes[0, 3]], abs=1e-3)


def test_matches_manual_computation(scorer, photo, tiny_encoder):
    image, boxes = photo
    r = scorer.score(image, boxes, box_format="xywh")
    reg, glo = scorer.view_maker.make(image, r.boxes_xyxy)
    with torch.no_grad():
        fr = tiny_encoder.visual_trunk(reg)
        fg = tiny_encoder.visual_trunk(glo)
    emb = F.normalize((0.5 * fr + 0.5 * fg) @ tiny_encoder.proj_global, dim=-1)  # paper Eq. 3
    sims = emb @ tiny_encoder.text_embeddings(scorer.label_set).T
    assert np.allclose(r.uncertainty, -sims.max(1).values.numpy(), atol=1e-5)
    assert (r.label_idx == sims.argmax(1).numpy()).all()


def test_batched_equals_one_by_one(scorer, photo):
    image, boxes = photo
    r = scorer.score(image, boxes, box_format="xywh")
    for i in range(len(boxes)):
        ri = scorer.score(image, boxes[i:i + 1], box_format="xywh")
        assert ri.uncertainty[0] == pytest.approx(float(r.uncertainty[i]), abs=1e-5)
        assert ri.label_idx[0] == r.label_idx[i]


def test_invalid_boxes_keep_status_and_do_not_break_frame(scorer, photo):
    image, boxes = photo
    H, W = image.shape[:2]
    good = boxes[:2].copy()
    bad = np.array([
        [np.nan, 0, 10, 10],
        [0, 0, np.inf, 10],
        [50, 50, 0, 10],          # xywh with zero width
        [W + 10, 10, 30, 30],     # outside
        [5, 5, 1, 50],            # 1 px wide
        [10, 10, -20, 30],        # negative width
    ], np.float32)
    allb = np.concatenate([good[:1], bad, good[1:]])
    r = scorer.score(image, allb, box_format="xywh")
    S = BoxStatus
    assert r.status.tolist() == [S.OK, S.NAN, S.INFINITE, S.ZERO_AREA, S.OUTSIDE_IMAGE, S.TOO_SMALL, S.ZERO_AREA, S.OK]
    bad_rows = r.status != S.OK
    assert np.isnan(r.uncertainty[bad_rows]).all() and (r.label_idx[bad_rows] == -1).all()
    assert all(r.label[i] == "" for i in np.flatnonzero(bad_rows))
    assert not r.is_ood[bad_rows].any()
    # the valid boxes score exactly as without the invalid ones around them
    ref = scorer.score(image, good, box_format="xywh")
    assert r.uncertainty[[0, 7]] == pytest.approx(ref.uncertainty, abs=1e-5)
    recs = r.to_records()
    json.dumps(recs)  # JSON-serialisable (NaN -> None)
    assert recs[1]["status"] == "NAN" and recs[1]["uncertainty"] is None and recs[0]["status"] == "OK"


def test_zero_boxes(scorer, photo):
    image, _ = photo
    for empty in ([], np.zeros((0, 4)), None):
        r = scorer.score(image, empty)
        _check_shapes(r, 0)
        assert r.to_records() == [] and r.error is None


def test_all_invalid_boxes_never_call_the_encoder(tiny_encoder, photo):
    image, _ = photo
    s = OodScorer(tiny_encoder, "voc")
    calls = []
    with using_backend(tiny_encoder, lambda v: calls.append(1)):
        r = s.score(image, [[np.nan, 0, 1, 1], [0, 0, 0, 0]])
    assert calls == [] and r.status.tolist() == [BoxStatus.NAN, BoxStatus.ZERO_AREA]


def test_max_boxes_keeps_highest_detector_scores(tiny_encoder, photo):
    image, boxes = photo
    n = len(boxes)
    s = OodScorer(tiny_encoder, "voc", max_boxes=2)
    det = np.linspace(0.1, 0.9, n).astype(np.float32)[::-1].copy()
    det[n - 1] = 0.95  # the last box is the most confident
    r = s.score(image, boxes, box_format="xywh", detector_scores=det)
    assert set(np.flatnonzero(r.status == BoxStatus.OK)) == {0, n - 1}
    assert (r.status[1:n - 1] == BoxStatus.NOT_SCORED).all()
    assert np.isnan(r.uncertainty[r.status == BoxStatus.NOT_SCORED]).all()
    # capped boxes score the same as uncapped
    full = OodScorer(tiny_encoder, "voc").score(image, boxes, box_format="xywh")
    assert r.uncertainty[[0, n - 1]] == pytest.approx(full.uncertainty[[0, n - 1]], abs=1e-5)
    # without detector scores: input order; invalid boxes do not use up the cap
    r2 = s.score(image, np.concatenate([[[np.nan] * 4], boxes]), box_format="xywh")
    assert r2.status.tolist()[:4] == [BoxStatus.NAN, BoxStatus.OK, BoxStatus.OK, BoxStatus.NOT_SCORED]
    with pytest.raises(ValueError, match="detector_scores"):
        s.score(image, boxes, box_format="xywh", detector_scores=det[:1])


def test_ablations_differ_and_encode_only_needed_views(tiny_encoder, photo):
    image, boxes = photo
    results, batch_sizes = {}, {}
    for ab in ("dual", "regional", "global"):
        seen = []

        def backend(v, seen=seen):
            seen.append(v.shape[0])
            with torch.no_grad():
                return tiny_encoder.visual_trunk(v)

        with using_backend(tiny_encoder, backend):
            results[ab] = OodScorer(tiny_encoder, "voc", ablation=ab).score(image, boxes, box_format="xywh")
        batch_sizes[ab] = seen
    n = len(boxes)
    assert batch_sizes == {"dual": [2 * n], "regional": [n], "global": [n]}  # ONE backend call per frame
    u = {k: v.uncertainty for k, v in results.items()}
    assert not np.allclose(u["dual"], u["regional"]) and not np.allclose(u["dual"], u["global"])
    assert not np.allclose(u["regional"], u["global"])
    # regional ablation == dual with lam = 1
    lam1 = OodScorer(tiny_encoder, "voc", settings=_runa(lam=1.0)).score(image, boxes, box_format="xywh")
    assert np.allclose(lam1.uncertainty, u["regional"], atol=1e-5)


def test_blur_radius_changes_dual_but_not_regional(tiny_encoder, photo):
    image, boxes = photo
    a = OodScorer(tiny_encoder, "voc", settings=_runa(blur_radius=0.0)).score(image, boxes, box_format="xywh")
    b = OodScorer(tiny_encoder, "voc", settings=_runa(blur_radius=3.0)).score(image, boxes, box_format="xywh")
    assert not np.allclose(a.uncertainty, b.uncertainty)
    ra = OodScorer(tiny_encoder, "voc", settings=_runa(blur_radius=0.0), ablation="regional").score(
        image, boxes, box_format="xywh")
    rb = OodScorer(tiny_encoder, "voc", settings=_runa(blur_radius=3.0), ablation="regional").score(
        image, boxes, box_format="xywh")
    assert np.allclose(ra.uncertainty, rb.uncertainty, atol=1e-6)


def test_backend_exception_marks_boxes_and_sets_error(tiny_encoder, photo):
    image, boxes = photo

    s = OodScorer(tiny_encoder, "voc")
    with using_backend(tiny_encoder, _device_lost, name="broken"):
        r = s.score(image, np.concatenate([boxes, [[np.nan] * 4]]), box_format="xywh")
    assert (r.status[:-1] == BoxStatus.BACKEND_ERROR).all() and r.status[-1] == BoxStatus.NAN
    assert "device lost" in r.error and "broken" in r.error
    assert np.isnan(r.uncertainty).all() and not r.is_ood.any()
    # the next frame works again
    assert s.score(image, boxes, box_format="xywh").error is None


def test_non_finite_features_flag_only_affected_boxes(tiny_encoder, photo):
    image, boxes = photo
    n = len(boxes)

    def nan_for_box1(v):
        with torch.no_grad():
            out = tiny_encoder.visual_trunk(v).clone()
        out[1] = float("nan")  # regional view of box 1 (dual batch is [regional..., global...])
        return out

    s = OodScorer(tiny_encoder, "voc")
    with using_backend(tiny_encoder, nan_for_box1):
        r = s.score(image, boxes, box_format="xywh")
    assert r.status[1] == BoxStatus.BACKEND_ERROR and np.isnan(r.uncertainty[1])
    others = [i for i in range(n) if i != 1]
    assert (r.status[others] == BoxStatus.OK).all() and np.isfinite(r.uncertainty[others]).all()
    assert r.error is not None and "non-finite" in r.error


def test_thresholds_per_label(tiny_encoder, photo):
    image, boxes = photo
    base = OodScorer(tiny_encoder, "voc").score(image, boxes, box_format="xywh")
    lab0 = base.label[0]
    # per-class threshold just below box 0's uncertainty -> OOD; global very high -> others ID
    th = FakeThresholds(10.0, {lab0: float(base.uncertainty[0]) - 1e-4})
    r = OodScorer(tiny_encoder, "voc", thresholds=th).score(image, boxes, box_format="xywh")
    assert r.is_ood[0] and r.threshold[0] == pytest.approx(base.uncertainty[0] - 1e-4)
    for i in range(len(boxes)):
        want_thr = th.for_label(r.label[i])
        assert r.threshold[i] == pytest.approx(want_thr)
        assert r.is_ood[i] == (r.uncertainty[i] > want_thr)
    # a global threshold below every score flags everything
    r2 = OodScorer(tiny_encoder, "voc", thresholds=FakeThresholds(-10.0)).score(image, boxes, box_format="xywh")
    assert r2.is_ood.all()


def test_real_thresholds_and_compatibility_check(tiny_encoder, photo, tmp_path):
    thresholds = pytest.importorskip("runa_ood_node.core.thresholds")
    image, boxes = photo
    th = thresholds.Thresholds(global_threshold=-10.0, meta={"model_id": tiny_encoder.model_id, "scorer": "runa"})
    r = OodScorer(tiny_encoder, "voc", thresholds=th).score(image, boxes, box_format="xywh")
    assert r.is_ood.all()
    # whether thresholds fit is checked where they are loaded (node, tools): core.thresholds.check_fit
    wrong = thresholds.Thresholds(global_threshold=0.0, meta={"fitted_for": {"model": "another-model"}})
    with pytest.raises(thresholds.ThresholdsMismatchError, match="model: fitted for 'another-model'"):
        thresholds.check_fit(wrong, OodScorer(tiny_encoder, "voc", thresholds=wrong))


def test_other_scorers_run(tiny_encoder, photo):
    image, boxes = photo
    for method in ("mcm", "energy", "sum"):
        r = OodScorer(tiny_encoder, "bdd", scorer=method, temperature=0.5).score(image, boxes, box_format="xywh")
        assert (r.status == BoxStatus.OK).all() and np.isfinite(r.uncertainty).all()
        assert ((r.label_idx >= 0) & (r.label_idx < 9)).all()


def test_bad_inputs_raise_value_error(scorer, photo):
    image, boxes = photo
    for bad in (image[..., 0], image.astype(np.float32), image[..., :2], "image.png"):
        with pytest.raises(ValueError, match="image"):
            scorer.score(bad, boxes)
    with pytest.raises(ValueError, match=r"\[N,4\]"):
        scorer.score(image, [[1, 2, 3]])
    with pytest.raises(ValueError, match="format"):
        scorer.score(image, boxes, box_format="ltrb")


@pytest.mark.parametrize("kwargs, match", [
    ({"scorer": "maxlogit"}, "scorer"), ({"ablation": "both"}, "ablation"), ({"settings": {"lam": 1.5}}, "lam"),
    ({"max_boxes": -1}, "max_boxes"), ({"temperature": 0.0}, "temperature"),
    ({"settings": {"blur_radius": -1}}, "blur_radius"),
])
def test_bad_configuration_raises(tiny_encoder, kwargs, match):
    with pytest.raises(ValueError, match=match):  # RUNA's settings: made as the caller makes them
        if "settings" in kwargs:
            kwargs = {**kwargs, "settings": _runa(**kwargs["settings"])}
        OodScorer(tiny_encoder, "voc", **kwargs)


def test_custom_view_maker_is_used(tiny_encoder, photo):
    from runa_ood_node.core.views import ViewMaker

    image, boxes = photo
    vm = ViewMaker(tiny_encoder.input_size, tiny_encoder.mean, tiny_encoder.std, blur_radius=0.0)
    a = OodScorer(tiny_encoder, "voc", view_maker=vm).score(image, boxes, box_format="xywh")
    b = OodScorer(tiny_encoder, "voc", settings=_runa(blur_radius=0.0)).score(image, boxes, box_format="xywh")
    assert np.allclose(a.uncertainty, b.uncertainty, atol=1e-6)


def test_view_maker_failure_is_contained(tiny_encoder, photo):
    image, boxes = photo

    class BrokenViews:
        blur_radius = 1.0

        def make(self, image_rgb, boxes_xyxy):
            raise RuntimeError("CUDA out of memory")

    r = OodScorer(tiny_encoder, "voc", view_maker=BrokenViews()).score(image, boxes, box_format="xywh")
    assert (r.status == BoxStatus.BACKEND_ERROR).all()
    assert "BrokenViews" in r.error and "out of memory" in r.error


def test_warmup_scores_a_synthetic_frame(tiny_scorer):
    r = tiny_scorer.warmup(num_boxes=3)
    assert len(r) == 3 and (r.status == BoxStatus.OK).all() and r.error is None


# ---------------------------------------------------------------------- encode / score_features split
def _assert_same_result(a: FrameResult, b: FrameResult, atol=1e-6):
    np.testing.assert_array_equal(a.status, b.status)
    np.testing.assert_array_equal(a.boxes_xyxy, b.boxes_xyxy)
    np.testing.assert_allclose(a.uncertainty, b.uncertainty, rtol=1e-5, atol=atol, equal_nan=True)
    np.testing.assert_allclose(a.similarity, b.similarity, rtol=1e-5, atol=atol, equal_nan=True)
    np.testing.assert_array_equal(a.threshold, b.threshold)
    np.testing.assert_array_equal(a.label_idx, b.label_idx)
    np.testing.assert_array_equal(a.is_ood, b.is_ood)
    assert a.label == b.label and a.error == b.error


def test_score_is_score_features_of_encode(tiny_encoder, photo):
    image, boxes = photo
    allb = np.concatenate([boxes, [[np.nan] * 4, [5, 5, 0, 0]]]).astype(np.float32)
    det = np.linspace(0.9, 0.1, len(allb)).astype(np.float32)
    s = OodScorer(tiny_encoder, "voc", max_boxes=len(boxes) - 1, thresholds=FakeThresholds(-0.1))
    feats = s.encode(image, allb, box_format="xywh", detector_scores=det)
    assert feats.views == ("regional", "global") and len(feats) == len(allb)
    f_r = feats.data["regional.cls"]  # RUNA's crop features
    assert f_r.shape == (len(allb), tiny_encoder.width) and f_r.dtype == torch.float32
    ok = feats.status == BoxStatus.OK
    assert torch.isfinite(f_r[torch.from_numpy(ok)]).all() and torch.isnan(f_r[torch.from_numpy(~ok)]).all()
    status_before, f_r_before = feats.status.copy(), feats.data["regional.cls"].clone()
    split = s.score_features(feats)
    whole = s.score(image, allb, box_format="xywh", detector_scores=det)
    _check_shapes(split, len(allb))
    _assert_same_result(split, whole)
    np.testing.assert_array_equal(split.detector_scores, det)
    assert split.status[-2] == BoxStatus.NAN and split.status[-1] == BoxStatus.ZERO_AREA
    assert (split.status == BoxStatus.NOT_SCORED).sum() == 1  # the max_boxes cap is applied in encode
    # scoring does not mutate the encoding: a second call gives the same result
    _assert_same_result(s.score_features(feats), split)
    np.testing.assert_array_equal(feats.status, status_before)
    assert torch.equal(torch.nan_to_num(feats.data["regional.cls"]), torch.nan_to_num(f_r_before))
    split.status[:] = BoxStatus.BACKEND_ERROR  # results own their arrays
    np.testing.assert_array_equal(feats.status, status_before)


def test_one_encoding_scores_every_scorer_and_ablation_like_a_fresh_scorer(tiny_encoder, photo):
    image, boxes = photo
    base = OodScorer(tiny_encoder, "voc")
    calls = []

    def backend(v):
        calls.append(v.shape[0])
        with torch.no_grad():
            return tiny_encoder.visual_trunk(v)

    with using_backend(tiny_encoder, backend):
        feats = base.encode(image, boxes, box_format="xywh", views=("global", "regional"))
    assert calls == [2 * len(boxes)] and feats.views == ("regional", "global")  # one backend call, both views
    for ab in ("dual", "regional", "global"):
        for sc in ("runa", "mcm", "energy", "sum"):
            got = base.score_features(feats, scorer=sc, ablation=ab, lam=0.3, temperature=0.5)
            want = OodScorer(tiny_encoder, "voc", scorer=sc, ablation=ab, settings=_runa(lam=0.3),
                             temperature=0.5).score(
                image, boxes, box_format="xywh")
            _assert_same_result(got, want, atol=1e-5)
    # the defaults are the scorer's own settings
    _assert_same_result(base.score_features(feats), base.score(image, boxes, box_format="xywh"))


def test_encode_default_views_follow_the_ablation_and_missing_views_raise(tiny_encoder, photo):
    image, boxes = photo
    reg = OodScorer(tiny_encoder, "voc", ablation="regional")
    feats = reg.encode(image, boxes, box_format="xywh")
    assert feats.views == ("regional",) and "global.cls" not in feats.data
    assert reg.score_features(feats, ablation="dual", lam=1.0).ok.all()  # lam=1 needs only the crop
    with pytest.raises(ValueError, match="global view"):
        reg.score_features(feats, ablation="global")
    with pytest.raises(ValueError, match="global view"):
        reg.score_features(feats, ablation="dual")
    for kwargs in ({"scorer": "maxlogit"}, {"ablation": "both"}, {"lam": 1.5}, {"temperature": 0.0}):
        with pytest.raises(ValueError):
            reg.score_features(feats, **kwargs)
    for views in ((), ("crop",), "depth"):
        with pytest.raises(ValueError, match="views"):
            reg.encode(image, boxes, box_format="xywh", views=views)


def test_overridden_scorer_uses_thresholds_only_when_compatible(tiny_encoder, photo):
    thresholds = pytest.importorskip("runa_ood_node.core.thresholds")
    image, boxes = photo
    th = thresholds.Thresholds(global_threshold=-10.0, meta={"model_id": tiny_encoder.model_id, "scorer": "runa"})
    s = OodScorer(tiny_encoder, "voc", thresholds=th)
    feats = s.encode(image, boxes, box_format="xywh")
    assert s.score_features(feats).is_ood.all()
    other = s.score_features(feats, scorer="mcm")  # runa thresholds are not in mcm units
    assert np.isnan(other.threshold).all() and not other.is_ood.any() and other.ok.all()
    # thresholds without scorer provenance apply to any scorer, as for a fresh OodScorer
    fake = OodScorer(tiny_encoder, "voc", thresholds=FakeThresholds(-10.0))
    _assert_same_result(fake.score_features(fake.encode(image, boxes, box_format="xywh"), scorer="mcm"),
                        OodScorer(tiny_encoder, "voc", scorer="mcm", thresholds=FakeThresholds(-10.0)).score(
                            image, boxes, box_format="xywh"))


def test_concatenated_frames_score_like_each_frame(tiny_encoder, photo):
    from runa_ood_node.core.pipeline import BoxFeatures

    image, boxes = photo
    s = OodScorer(tiny_encoder, "voc", scorer="mcm")
    parts = [s.encode(image, boxes[:2], box_format="xywh"),
             BoxFeatures.unscored(3, tiny_encoder.width, error="cannot read frame"),
             s.encode(np.ascontiguousarray(image[:, ::-1]), boxes, box_format="xywh")]
    joined = BoxFeatures.concat(parts)
    assert len(joined) == 2 + 3 + len(boxes) and joined.error == "cannot read frame"
    r = s.score_features(joined)
    singles = [s.score_features(p) for p in parts]
    for attr in ("status", "uncertainty", "label_idx", "similarity"):
        np.testing.assert_allclose(getattr(r, attr), np.concatenate([getattr(x, attr) for x in singles]),
                                   rtol=1e-5, atol=1e-6, equal_nan=True)
    assert (r.status[2:5] == BoxStatus.NOT_SCORED).all() and np.isnan(r.uncertainty[2:5]).all()
    # views present in only some parts are dropped
    reg = OodScorer(tiny_encoder, "voc", ablation="regional").encode(image, boxes, box_format="xywh")
    assert BoxFeatures.concat([parts[0], reg]).views == ("regional",)
    with pytest.raises(ValueError):
        BoxFeatures.concat([])


def test_encode_contains_backend_failure(tiny_encoder, photo):
    image, boxes = photo

    def broken(v):
        raise RuntimeError("engine lost")

    s = OodScorer(tiny_encoder, "voc")
    with using_backend(tiny_encoder, broken, name="broken"):
        feats = s.encode(image, boxes, box_format="xywh", views=("regional", "global"))
    assert (feats.status == BoxStatus.BACKEND_ERROR).all() and "engine lost" in feats.error
    assert torch.isnan(feats.data["regional.cls"]).all() and torch.isnan(feats.data["global.cls"]).all()
    for ab in ("dual", "global"):
        r = s.score_features(feats, ablation=ab)
        assert (r.status == BoxStatus.BACKEND_ERROR).all() and "engine lost" in r.error and not r.is_ood.any()


def test_detector_labels_are_carried_through_and_checked(scorer, photo):
    image, boxes = photo
    names = [f"det{i}" for i in range(len(boxes))]
    r = scorer.score(image, boxes, box_format="xywh", detector_labels=names)
    assert r.detector_labels == names
    assert [rec["detector_label"] for rec in r.to_records()] == names
    assert scorer.score(image, boxes, box_format="xywh").detector_labels is None
    with pytest.raises(ValueError, match="detector_labels"):
        scorer.score(image, boxes, box_format="xywh", detector_labels=names[:-1])


def test_max_boxes_zero_means_no_cap(tiny_encoder):
    """0 = no cap, the node parameter's documented meaning, in OodScorer too (it used to score
    nothing there while the config path turned it into "no cap")."""
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (120, 160, 3), dtype=np.uint8)
    boxes = [[10, 10, 60, 60], [50, 20, 150, 100], [0, 0, 160, 120]]
    r = OodScorer(tiny_encoder, "voc", max_boxes=0).score(image, boxes)
    assert (r.status == BoxStatus.OK).all() and np.isfinite(r.uncertainty).all()
    capped = OodScorer(tiny_encoder, "voc", max_boxes=1).score(image, boxes)
    assert capped.status.tolist() == [BoxStatus.OK, BoxStatus.NOT_SCORED, BoxStatus.NOT_SCORED]


def test_score_frames_makes_one_backend_call_and_equals_scoring_each_frame(tiny_encoder, photo):
    """Several frames scored together (fleet actors) give each frame's own result, through ONE
    backend call carrying every view of every frame; frames without valid boxes add no views."""
    from runa_ood_node.core.pipeline import FrameInput

    image, boxes = photo
    flipped = np.ascontiguousarray(image[:, ::-1])
    frames = [FrameInput(image, boxes, "xywh", None, [f"d{i}" for i in range(len(boxes))]),
              FrameInput(flipped, boxes[:2], "xywh"),
              FrameInput(image, [[np.nan] * 4], "xyxy"),
              FrameInput(flipped, np.zeros((0, 4), np.float32))]
    s = OodScorer(tiny_encoder, "voc")
    calls = []

    def counting(views):
        calls.append(int(views.shape[0]))
        return tiny_encoder._torch_trunk(views)

    with using_backend(tiny_encoder, counting, name="counting"):
        t0 = time.perf_counter()
        together = s.score_frames(frames)
        wall = (time.perf_counter() - t0) * 1e3
    assert calls == [2 * (len(boxes) + 2)]
    # totals: the shared backend call once, each frame's own work, the bookkeeping shared equally: they
    # add up to the call's wall time (frames without views carry no encode time)
    enc = together[0].timings["encode"]
    assert enc > 0 and together[1].timings["encode"] == enc and together[3].timings["encode"] == 0.0
    assert sum(r.timings["total"] for r in together) - enc == pytest.approx(wall, rel=0.05, abs=0.5)
    one = s.score(image, boxes, box_format="xywh")
    assert one.timings["total"] >= one.timings["views"] + one.timings["encode"] + one.timings["score"]
    alone = [s.score(f.image_rgb, f.boxes, box_format=f.box_format, detector_labels=f.detector_labels)
             for f in frames]
    for a, b in zip(together, alone):
        np.testing.assert_array_equal(a.status, b.status)
        np.testing.assert_allclose(a.uncertainty, b.uncertainty, atol=1e-5, equal_nan=True)
        assert a.label == b.label and a.detector_labels == b.detector_labels
    assert together[2].status.tolist() == [BoxStatus.NAN] and len(together[3]) == 0


def test_score_frames_backend_failure_marks_every_frame(tiny_encoder, photo):
    from runa_ood_node.core.pipeline import FrameInput

    image, boxes = photo

    s = OodScorer(tiny_encoder, "voc")
    with using_backend(tiny_encoder, _device_lost, name="broken"):
        res = s.score_frames([FrameInput(image, boxes, "xywh"), FrameInput(image, boxes[:1], "xywh")])
    assert all((r.status == BoxStatus.BACKEND_ERROR).all() and "device lost" in r.error for r in res)
