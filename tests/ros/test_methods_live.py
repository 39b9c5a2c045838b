"""Offline == live for the methods other than RUNA (TagOOD, UNI-OOD): the running node, started with the parameters
``method`` / ``head``, scores what ``evaluate --bag`` scores offline with the same parameters (the
bag and the comparison of ``test_offline_equivalence``)."""
import types

import pytest

pytest.importorskip("rclpy")
pytest.importorskip("vision_msgs.msg")
pytest.importorskip("runa_ood_msgs.msg")

from test_offline_equivalence import TINY, _raw_images, _write_bag, assert_live_equals_offline  # noqa: E402

from runa_ood_node.tools import bag_eval, bagio, common  # noqa: E402


def _head(tmp_path, encoder, method):
    """An untrained (0 epochs) head of the tiny model: enough to compare two paths."""
    import numpy as np
    import torch

    from runa_ood_node.core.labels import load_label_set
    from runa_ood_node.core.methods.heads import head_meta, save_head
    from runa_ood_node.core.pipeline import OodScorer

    sc = OodScorer(encoder, "voc", method=method)
    img = np.random.default_rng(0).integers(0, 255, (96, 128, 3), dtype=np.uint8)
    feats = sc.encode(img, [[0, 0, 60, 60], [40, 20, 120, 90]])
    small = {"dim": 32, "heads": 4, "mlp": 64} if method == "tagood" else \
        {"combiner": {"channels": [8, 8, 8], "mlp_hidden": 16, "reduce_to": 8}}
    state, curve, hyper = sc.method.fit(feats.data, torch.tensor([0, 1]), sc.text_emb, epochs=0, **small)
    return save_head(tmp_path / f"{method}_head", method, state, head_meta(encoder, load_label_set("voc"), hyper, curve))


#: boxes scored per frame: TagOOD all but the malformed one (its small boxes included, for the count below)
CAP = {"uni-ood": 2, "tagood": 5}


@pytest.mark.parametrize("method", ["tagood", "uni-ood"])
def test_running_node_with_a_method_scores_what_offline_evaluation_scores(tmp_path, tiny_encoder, method):
    head = _head(tmp_path, tiny_encoder, method)
    images = [im for im in _raw_images() if im[0] in ("bgr8", "yuv422")]
    bag = _write_bag(tmp_path / "bag", images, bagio.IMAGE_TOPIC, bagio.IMAGE_TYPE)
    ns = types.SimpleNamespace(lam=0.5, blur_radius=1.0, scorer="runa", temperature=1.0, id_set="voc",
                               thresholds=None, min_box_size=2.0, pretrained="none", projection=None,
                               backend="torch", device="cpu",
                               node_params=[f"max_boxes:={CAP[method]}", f"method:={method}", f"head:={head}"])
    params = common.node_parameters_from_args(ns, {"model": TINY}, random_weights=True, image_topic=bagio.IMAGE_TOPIC,
                                              n_frames=len(images))
    scorer = common.scorer_from_parameters(params, encoder=tiny_encoder)[0]
    assert scorer.method.name == method and scorer.method.head is not None
    off = bag_eval.evaluate_offline(bag, scorer, progress=False, params=params)
    assert len(off["frames"]) == 2
    live = bag_eval.run_live(bag, params, tmp_path, progress=False, drain_timeout_s=5.0)
    a = assert_live_equals_offline(off, live, n_boxes=2 * 5)
    assert sum(r["status"] == "OK" for r in a.values()) == {"uni-ood": 4, "tagood": 8}[method]
    # a one-pass method counts the boxes smaller than one of its tokens in /diagnostics; the others do not
    kv = {v.key: v.value for st in live["diagnostics"].status for v in st.values}
    if method == "tagood":
        expected = _boxes_below_token(bag, scorer, params)
        assert int(kv["boxes_below_token"]) == expected > 0, expected
    else:
        assert "boxes_below_token" not in kv


def _boxes_below_token(bag, scorer, params):
    """The boxes the offline scorer counts below a token (``FrameResult.boxes_below_token``) over the bag."""
    n = 0
    for fr in bagio.iter_frames(bag, params=params):
        if fr.ok:
            res = scorer.score(fr.rgb, fr.boxes_cxcywh, box_format="cxcywh", detector_scores=fr.scores)
            n += res.boxes_below_token
    return n
