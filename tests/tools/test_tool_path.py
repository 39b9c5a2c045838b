"""The tools' one path from command-line arguments to a scorer (tools.common), and what fleet gets
from it without starting Ray: the node's thresholds fit check, ``--ablation`` applied, the read
and score stages' row counts (their ``map_batches`` callables called directly)."""
import argparse
import collections
import json

import numpy as np
import pytest

from runa_ood_node.tools import bagio, cli, common, fleet, make_bag

TINY = ["--model", "runa-tiny-vit", "--pretrained", "none", "--allow-random-weights"]
S0 = 1_700_000_000_000_000_000


def _args(*argv):
    p = argparse.ArgumentParser()
    fleet.add_arguments(p)
    return p.parse_args(["bags", *TINY, *argv])


def test_flags_land_in_the_node_parameters_by_name():
    from runa_ood_node.ros.params import PARAMETERS

    a = _args("--lam", "0.3", "--id-set", "bdd", "--thresholds", "t.yaml", "--allow-threshold-mismatch",
              "--device", "cuda:1", "--node-params", "max_boxes:=7")
    p = common.node_parameters_from_args(a)
    assert (p["lam"], p["label_set"], p["thresholds_file"], p["thresholds_allow_mismatch"]) == (0.3, "bdd", "t.yaml", True)
    assert p["device"] == "cuda" and p["pretrained"] == "" and p["max_boxes"] == 7  # --node-params last
    assert set(p) <= {s.name for s in PARAMETERS}
    # a flag named like a node parameter needs no code to arrive (as --method / --head will)
    a.blur_radius, a.not_a_parameter = 3.0, 1
    p = common.node_parameters_from_args(a)
    assert p["blur_radius"] == 3.0 and "not_a_parameter" not in p


def test_old_scorer_name_and_the_typed_config_of_a_command_line():
    """--scorer runa (the name before the rename) is the node's alias: max_cosine, in the parameters and the
    ScorerConfig alike; the config holds the loaded label set and the node parameters it came from."""
    from runa_ood_node.core.labels import LabelSet

    a = _args("--scorer", "runa", "--id-set", "bdd", "--lam", "0.4")
    assert common.node_parameters_from_args(a)["scorer"] == "max_cosine"
    config, params, reason = common.config_from_args(a)
    assert config.scorer == "max_cosine" and isinstance(config.label_set, LabelSet) and config.label_set.name == "bdd"
    assert config.method_settings.lam == 0.4 and params == dict(config.parameters) and params["lam"] == 0.4
    assert reason and config.allow_random and config.pretrained == ""  # --pretrained none: the seeded random model


def test_scorer_from_args_is_the_node_construction(tmp_path):
    from runa_ood_node.factory import build_scorer
    from runa_ood_node.ros.params import validate

    built = common.scorer_from_args(_args("--lam", "0.25", "--ablation", "regional"))
    assert built.random_weights and built.params["allow_random_weights"] is True and built.params["pretrained"] == ""
    assert (built.scorer.lam, built.scorer.ablation, built.ablation) == (0.25, "regional", "regional")
    assert built.config == built.config.replace() and built.config.ablation == "regional"
    node_config = validate(built.params).config  # what the node makes of the same parameters
    node = build_scorer(node_config.replace(ablation="regional"), encoder=built.scorer.encoder)
    rng = np.random.default_rng(1)
    img = rng.integers(0, 256, (64, 96, 3), np.uint8)
    boxes = [[4, 4, 40, 30], [30, 10, 90, 60]]
    np.testing.assert_array_equal(built.scorer.score(img, boxes).uncertainty, node.score(img, boxes).uncertainty)
    with pytest.raises(SystemExit) as e:  # every bad value at once, before a model loads
        common.scorer_from_args(_args("--lam", "2", "--min-box-size", "-1"))
    assert e.value.code == 2


def test_score_boxes_leaves_the_shared_encoder_alone(ood_pack):
    """finetune's before/after comparison scores with another P_r without changing the pipeline's."""
    import torch

    from runa_ood_node.core.dataset import load_dataset

    scorer = common.scorer_from_args(_args(), apply_thresholds=False).scorer
    ds = load_dataset(ood_pack / "annotations.json", "voc").subset(2)
    enc = common.encode_boxes(scorer, ds, progress=False)
    before = scorer.method.proj_regional.clone()  # RUNA's P_r (its head's; off the shelf: P_g)
    other = torch.randn_like(before)
    a = common.score_boxes(enc)
    b = common.score_boxes(enc, regional_projection=other)
    assert scorer.method.proj_regional is not other and torch.equal(scorer.method.proj_regional, before)
    assert torch.equal(scorer.encoder.proj_global, before)  # the shared encoder's projection untouched
    ok = a.status == 0
    assert ok.any() and not np.allclose(a.uncertainty[ok], b.uncertainty[ok])  # the other P_r was used
    np.testing.assert_array_equal(common.score_boxes(enc).uncertainty, a.uncertainty)


@pytest.fixture(scope="module")
def small_bag(tmp_path_factory):
    p = tmp_path_factory.mktemp("tp") / "bag"
    make_bag.write_bag(make_bag.skimage_frames("voc", names=["astronaut", "coffee", "chelsea"]), p, start_ns=S0,
                       progress=False)
    return p


def test_fleet_refuses_thresholds_fitted_for_another_configuration(small_bag, tmp_path, capsys):
    """As evaluate and the node: refused (exit 2, before Ray starts) unless --allow-threshold-mismatch."""
    from runa_ood_node.core.thresholds import Thresholds, fit_identity

    s = common.scorer_from_args(_args("--lam", "0.5")).scorer
    path = Thresholds(global_threshold=0.0, meta={"fitted_for": fit_identity(s)}).save(tmp_path / "t.yaml")
    base = ["fleet", str(small_bag), "--out", str(tmp_path / "o"), *TINY, "--allow-network", "--thresholds", str(path)]
    with pytest.raises(SystemExit) as e:
        cli.main([*base, "--lam", "0.7"])
    assert e.value.code == 2 and "lam: fitted for 0.5, in use is 0.7" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
    ok = common.scorer_from_args(_args("--lam", "0.7", "--thresholds", str(path), "--allow-threshold-mismatch"))
    assert ok.mismatch == ["lam: fitted for 0.5, in use is 0.7"] and ok.scorer.thresholds.global_threshold == 0.0


def test_read_and_score_stages_count_every_row(small_bag):
    """ReadBags' end marker lists every frame with its box count; ScoreFrames gives every row of a
    frame that frame's row count, whatever the batch; boxes read = rows + dropped."""
    import pyarrow as pa

    a = _args("--ablation", "global")
    built = common.scorer_from_args(a)
    reader = fleet.ReadBags(None, bagio.DETECTIONS_TOPIC, bagio.GROUND_TRUTH_TOPIC, a, True, frames_per_block=2)
    blocks = list(reader(pa.Table.from_pylist([{"bag": str(small_bag), "local": True, "bag_key": "k"}])))
    rows = pa.concat_tables(blocks).to_pylist()
    end = json.loads(rows[-1]["info"])
    frames = [r for r in rows if r["kind"] == "frame"]
    assert rows[-1]["kind"] == "bag_end" and end["frames_sent"] == len(frames) == 3
    assert end["frame_boxes"] == {str(r["frame_index"]): r["n_boxes"] for r in frames}
    assert end["boxes_read"] == end["boxes_sent"] == sum(r["n_boxes"] for r in frames) > 3
    score = fleet.ScoreFrames(built.config, top_k=1000)  # the driver's typed config, as Ray hands it on
    assert score.scorer.ablation == "global"
    out = score(pa.Table.from_pylist(rows[1:], schema=fleet._read_schema())).to_pylist()  # frames 1, 2 + end
    out += score(pa.Table.from_pylist(rows[:1], schema=fleet._read_schema())).to_pylist()
    per = collections.Counter(r["frame_index"] for r in out if r["kind"] != "bag_end")
    for r in out:
        if r["kind"] != "bag_end":
            assert r["frame_rows"] == per[r["frame_index"]]
    st = fleet.BagState(fleet.BagRef(str(small_bag), True, 1, 1), "k")
    st.add(pa.Table.from_pylist(out, schema=fleet._out_schema()))
    assert st.complete and not st.problems
    ident = {"model": "runa-tiny-vit", "weights": "RANDOM", "model_id": "m", "random_weights": True}
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        s = fleet.commit_bag(__import__("pathlib").Path(d), st, ident, top_k=5)
    assert s["status"] == "done" and s["boxes"] == end["boxes_read"] and s["boxes_dropped"] == {}
    # the global ablation scores with the blurred frame only: every OK box of a frame shares the global view
    # and differs from the dual scores of evaluate --bag
    assert all(r["thumb"] for r in out if r["kind"] == "box" and r["status"] == "OK")  # top-K above the count
