"""``core.config.ScorerConfig``: one typed configuration, checked against the one parameter table,
built from node parameters, command-line arguments and a parameters file alike, validated once."""
import argparse
import dataclasses
import pathlib

import pytest
import yaml

from runa_ood_node.core import config as C
from runa_ood_node.core import parameters as T
from runa_ood_node.core.labels import LabelSet
from runa_ood_node.core.methods import get_method
from runa_ood_node.core.thresholds import Thresholds

REPO = pathlib.Path(__file__).resolve().parents[2]
RANDOM = {"model": "runa-tiny-vit", "pretrained": "", "allow_random_weights": True}


def test_every_field_is_a_table_row_with_the_tables_default():
    names = {p.name for p in T.PARAMETERS}
    plain = C.ScorerConfig()
    seen = set()
    for f in dataclasses.fields(C.ScorerConfig):
        meta = f.metadata
        assert ("param" in meta) + ("params" in meta) + ("tool" in meta) + ("source" in meta) == 1, f.name
        if "source" in meta:  # the parameter values it was built from
            assert f.name == "parameters" and not f.compare
            continue
        if "tool" in meta:
            assert f.name in C.TOOL_FIELDS
            continue
        rows = [meta["param"]] if "param" in meta else list(meta["params"])
        assert set(rows) <= names, (f.name, rows)
        seen.update(rows)
        if "params" in meta:  # the method's settings: each field its row's default
            got = dataclasses.asdict(plain.method_settings)
            assert {r: got[r] for r in rows} == {r: T.default(r) for r in rows}
        elif not meta.get("loaded"):
            assert f.default == T.default(meta["param"]), f.name
            assert getattr(plain, f.name) == T.default(meta["param"]), f.name
    # the loaded fields from the defaults: the default label set, default_threshold for every label
    built = C.from_parameters(RANDOM)
    assert isinstance(built.label_set, LabelSet) and built.label_set.name == T.default("label_set")
    assert built.thresholds.for_label("car") == pytest.approx(T.default("default_threshold"))
    assert built.head is None and plain.label_set.name == T.default("label_set")
    # every scorer-side row of the table reaches the config
    for row in ("model", "pretrained", "device", "precision", "backend", "engine_path", "allow_download",
                "allow_random_weights", "label_set", "method", "head", "lam", "blur_radius", "scorer", "temperature",
                "thresholds_file", "thresholds_allow_mismatch", "max_boxes", "min_box_size"):
        assert row in seen, row


def test_the_factory_defaults_nothing_itself():
    """No default of a parameter is written in the factory or the pipeline's builder path (the table's only)."""
    text = (REPO / "runa_ood_node" / "factory.py").read_text()
    for needle in ("0.5", "\"voc\"", "\"runa\"", "2.0", "\"dual\""):
        assert needle not in text, needle


def test_three_builders_make_the_same_config(tmp_path):
    values = {**RANDOM, "lam": 0.25, "label_set": "bdd", "backend": "torch", "max_boxes": 0}
    from_params = C.from_parameters(values)
    f = tmp_path / "p.yaml"
    f.write_text(yaml.safe_dump({"/**": {"ros__parameters": {"lam": 0.25, "label_set": "bdd"}},
                                 "runa_ood": {"ros__parameters": {**RANDOM, "backend": "torch", "max_boxes": 0}}}))
    from_file = C.from_yaml(f)
    args = argparse.Namespace(model="runa-tiny-vit", pretrained="none", lam=0.25, id_set="bdd", backend="torch",
                              max_boxes=0, device="cpu", offline=True, allow_random_weights=True, thresholds=None)
    from_cli = C.from_args(args, {"allow_random_weights": True})
    for cfg in (from_file, from_cli):
        assert cfg.label_set.name == "bdd" and cfg.method_settings.lam == 0.25 and cfg.max_boxes == 0
        assert cfg.model == from_params.model and cfg.backend == "torch" and cfg.pretrained == ""
    assert from_cli.allow_download is False  # --offline
    shipped = C.from_yaml(REPO / "config" / "runa_ood.yaml", overrides=RANDOM)  # every parameter at its default
    assert shipped == C.from_parameters(RANDOM)
    assert from_cli.parameters["label_set"] == "bdd" and from_params.parameters == values  # where each came from


def test_validated_once_every_problem_listed_and_files_loaded_once(tmp_path):
    with pytest.raises(T.ParameterValidationError) as err:
        C.from_parameters({**RANDOM, "lam": 2.0, "label_set": str(tmp_path / "none.yaml"), "scorer": "energy"})
    names = [p.split(":")[0] for p in err.value.problems]
    assert "lam" in names and "label_set" in names and "thresholds_file" in names
    th = Thresholds(global_threshold=-1.0, meta={"scorer": "energy"}).save(tmp_path / "e.yaml")
    cfg = C.from_parameters({**RANDOM, "scorer": "energy", "thresholds_file": str(th)})
    assert isinstance(cfg.thresholds, Thresholds) and cfg.thresholds.global_threshold == -1.0


def test_node_rules_are_lifted_by_name_not_by_substitution():
    """A tool that fits thresholds / a head says so; the config keeps its real scorer and method."""
    with pytest.raises(T.ParameterValidationError, match="head"):
        C.from_parameters({**RANDOM, "method": "uni-ood"})
    cfg = C.from_parameters({**RANDOM, "method": "uni-ood", "scorer": "mcm"}, thresholds=False, need_head=False)
    assert cfg.method == "uni-ood" and cfg.scorer == "mcm" and cfg.thresholds is None and cfg.head is None
    assert isinstance(cfg.method_settings, get_method("uni-ood").Settings)


def test_tool_fields_and_replace():
    cfg = C.from_parameters(RANDOM, ablation="regional", views="cpu")
    assert cfg.ablation == "regional" and cfg.views == "cpu"
    with pytest.raises(TypeError):
        C.from_parameters(RANDOM, lamda=0.3)
    assert cfg.replace(lam=0.75).method_settings.lam == 0.75 and cfg.method_settings.lam == T.default("lam")
    assert cfg.replace(pretrained="", allow_random=True).allow_random
    with pytest.raises(TypeError, match="lamda"):
        cfg.replace(lamda=0.75)  # a typo is refused, not ignored


@pytest.mark.parametrize("change", [{"scorer": "nope"}, {"min_box_size": -1.0}, {"temperature": 0.0},
                                    {"method": "no-such-method"}, {"precision": "fp16"}, {"lam": 2.0},
                                    {"blur_radius": -1.0}, {"scorer": "energy"}, {"method": "uni-ood"},
                                    {"allow_random": False}, {"label_set": "/no/such/labels.yaml"}])
def test_replace_refuses_what_the_builders_refuse(change):
    """``replace`` goes through the builders' one validation: the same error, the same problems."""
    cfg = C.from_parameters(RANDOM)
    params = {("allow_random_weights" if k == "allow_random" else k): v for k, v in change.items()}
    with pytest.raises(T.ParameterValidationError) as by_builder:
        C.from_parameters({**RANDOM, **params})
    with pytest.raises(T.ParameterValidationError) as by_replace:
        cfg.replace(**change)
    assert by_replace.value.problems == by_builder.value.problems


def test_replace_makes_what_the_builders_make():
    cfg = C.from_parameters(RANDOM, ablation="regional")
    assert cfg.replace() == cfg and cfg.replace().ablation == "regional"
    for change in ({"lam": 0.25}, {"blur_radius": 3.0}, {"lam": 0.0, "blur_radius": 0.5}, {"scorer": "runa"},
                   {"max_boxes": 3.0}, {"label_set": "bdd"}, {"min_box_size": 0.0}, {"temperature": 2.0}):
        got = cfg.replace(**change)
        assert got == C.from_parameters({**RANDOM, **change}, ablation="regional"), change
        assert got.parameters == {**RANDOM, **change}  # what it was built from, the changes over it
    assert cfg.replace(scorer="runa").scorer == "max_cosine" and type(cfg.replace(max_boxes=3.0).max_boxes) is int
    settings = get_method("runa").make_settings({"lam": 0.3, "blur_radius": 2.0})
    assert cfg.replace(method_settings=settings).method_settings == settings
    # a change of method makes the new method's settings; a setting it does not have is refused
    lifted = C.from_parameters({**RANDOM, "method": "uni-ood"}, need_head=False)  # finetune's: no head yet
    assert isinstance(lifted.replace(method="tagood").method_settings, get_method("tagood").Settings)
    assert isinstance(lifted.replace(method="runa").method_settings, get_method("runa").Settings)
    with pytest.raises(TypeError, match="lam"):
        cfg.replace(method="tagood", lam=0.3)


def test_replace_loads_only_the_files_a_change_names(tmp_path, monkeypatch):
    th = Thresholds(global_threshold=-0.5, meta={"scorer": "energy"}).save(tmp_path / "e.yaml")
    cfg = C.from_parameters({**RANDOM, "scorer": "energy", "thresholds_file": str(th)})
    calls = []
    monkeypatch.setattr(C, "load_label_set", lambda *a, **k: calls.append(("label_set", a)))
    monkeypatch.setattr(C, "load_head", lambda *a, **k: calls.append(("head", a)))
    monkeypatch.setattr(C.Thresholds, "load", classmethod(lambda cls, *a, **k: calls.append(("thresholds", a))))
    got = cfg.replace(lam=0.25, temperature=2.0, max_boxes=5, scorer="mcm")
    assert calls == [] and got.label_set is cfg.label_set and got.thresholds is cfg.thresholds
    assert got.method_settings.lam == 0.25 and got.scorer == "mcm" and got.max_boxes == 5
    monkeypatch.undo()
    # a change that names a file loads it, as a builder would
    th2 = Thresholds(global_threshold=-0.25, meta={"scorer": "energy"}).save(tmp_path / "e2.yaml")
    again = cfg.replace(thresholds_file=str(th2), label_set="bdd")
    assert again.thresholds.global_threshold == -0.25 and again.label_set.name == "bdd"
    assert again == C.from_parameters({**RANDOM, "scorer": "energy", "thresholds_file": str(th2), "label_set": "bdd"})
    # a tool's config without thresholds stays without: no file is read for them
    tool = C.from_parameters(RANDOM, thresholds=False)
    assert tool.replace(scorer="energy").thresholds is None


def test_replace_checks_a_kept_head_as_a_loaded_one():
    from runa_ood_node.core.methods.heads import Head

    lifted = C.from_parameters({**RANDOM, "method": "uni-ood"}, need_head=False)  # finetune's: no head yet
    assert lifted.replace(temperature=2.0).head is None  # the rule stays lifted
    head = Head("uni-ood", {}, {}, "by hand")
    with_head = lifted.replace(head=head)
    assert with_head.head is head and with_head.replace(temperature=2.0).head is head
    with pytest.raises(T.ParameterValidationError, match="trained for method 'uni-ood'"):
        with_head.replace(method="tagood")
    node = C.from_parameters(RANDOM)
    with pytest.raises(T.ParameterValidationError, match="needs a trained head"):
        node.replace(method="uni-ood")
    assert node.replace(method="uni-ood", head=head).head is head
