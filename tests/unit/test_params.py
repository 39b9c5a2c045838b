"""Node parameters: validation errors, settings, descriptors, the shipped YAML file."""
import math
import pathlib

import pytest
import yaml

from conftest import flatten_params
from runa_ood_node.ros import params as P

REPO = pathlib.Path(__file__).resolve().parents[2]


def test_defaults_validate_and_map_to_scorer_config():
    s = P.validate({})
    assert s.lam == 0.5 and s.scorer == "max_cosine" and s.backend == "auto" and s.label_set == "voc"
    assert P.validate({"scorer": "runa"}).scorer == "max_cosine"  # the old name: an alias (registry.SCORER_ALIASES)
    assert s.image_topic_resolved == "image"
    cfg = s.config  # the scorer's typed configuration, its files loaded
    assert cfg.model == "ViT-B-16" and cfg.pretrained == "openai" and cfg.allow_random is False
    assert cfg.label_set.name == "voc" and cfg.backend == "auto" and cfg.backend_kwargs() == {"device": "cpu"}
    assert P.validate({"backend": "torch"}).config.backend_kwargs() == {}
    th = s.config.thresholds
    assert th.for_label("car") == pytest.approx(P.UNCALIBRATED_DEFAULT_THRESHOLD)


@pytest.mark.parametrize("name,value,needle", [
    ("scorer", "maxlogit", "scorer"),
    ("lam", 1.5, "lam"),
    ("lam", -0.1, "lam"),
    ("blur_radius", -1.0, "blur_radius"),
    ("backend", "tensorflow", "backend"),
    ("label_set", "imagenet_not_a_set", "label_set"),
    ("thresholds_file", "/nonexistent/thresholds.yaml", "thresholds_file"),
    ("image_qos", "best_effort_please", "image_qos"),
    ("detections_qos", "", "detections_qos"),
    ("image_transport", "theora", "image_transport"),
    ("device", "tpu", "device"),
    ("alert.k", 9, "alert.k"),
    ("alert.roi", [0.5, 0.5, 0.2, 0.9], "alert.roi"),
    ("alert.roi", [0.1, 0.2, 0.3], "alert.roi"),
    ("alert.roi", [0.0, 0.0, 2.0, 0.5, 0.5, 1.0], "alert.roi"),
    ("max_boxes", 2.5, "max_boxes"),
    ("temperature", math.nan, "temperature"),
    ("publish_annotated", "yes", "publish_annotated"),
    ("pretrained", "", "allow_random_weights"),
    ("pairing_max_age_s", 0.1, "pairing_max_age_s"),
    ("no_such_parameter", 1, "unknown parameter"),
    ("precision", "fp8", "precision"),
    ("precision", "fp16", "fp16 needs a CUDA device"),  # device defaults to cpu
    ("allow_download", "no", "allow_download"),
    ("scorer", "mcm", "calibrated for it"),  # no thresholds_file: default_threshold is in runa units
    ("scorer", "energy", "thresholds_file"),
    ("alert.takeover_k", 9, "alert.takeover_k"),
    ("alert.takeover_k", -1, "alert.takeover_k"),
])
def test_invalid_values_give_clear_errors(name, value, needle):
    values = {name: value}
    if name == "pairing_max_age_s":
        values["pairing_slop_s"] = 0.5
    with pytest.raises(P.ParameterValidationError) as err:
        P.validate(values)
    msg = str(err.value)
    assert needle in msg and all(p.split(":")[0] for p in err.value.problems)


def test_all_problems_reported_at_once():
    with pytest.raises(P.ParameterValidationError) as err:
        P.validate({"lam": 2.0, "scorer": "nope", "blur_radius": -3.0})
    names = sorted(p.split(":")[0] for p in err.value.problems)
    assert names == ["blur_radius", "lam", "scorer"]


def test_alert_settings_and_roi(tmp_path):
    s = P.validate({"alert.roi": [0.25, 0.5, 0.75, 1.0], "alert.takeover_min_area_frac": -1.0,
                    "alert.k": 2, "alert.n": 4})
    assert s.alert.roi == ((0.25, 0.5), (0.75, 0.5), (0.75, 1.0), (0.25, 1.0))
    assert s.alert.takeover_min_area_frac is None and s.alert.k == 2
    cfg = s.alert.to_alert_config()
    assert cfg.k == 2 and cfg.n == 4 and cfg.takeover_min_area_frac is None
    poly = P.validate({"alert.roi": [0.1, 0.9, 0.5, 0.4, 0.9, 0.9]}).alert.roi
    assert len(poly) == 3


def test_random_weights_and_thresholds_file(tmp_path):
    from runa_ood_node.core.thresholds import Thresholds

    f = Thresholds(global_threshold=-0.3, per_class={"car": -0.28}).save(tmp_path / "th.yaml")
    s = P.validate({"pretrained": "", "allow_random_weights": True, "thresholds_file": str(f),
                    "image_transport": "compressed", "engine_path": ""})
    assert s.config.pretrained == "" and s.config.allow_random is True
    assert s.config.thresholds.for_label("car") == pytest.approx(-0.28)
    assert s.image_topic_resolved == "image/compressed"
    with pytest.raises(P.ParameterValidationError, match="engine_path"):
        P.validate({"engine_path": str(tmp_path / "missing.engine")})



def test_generated_files_are_in_sync_with_the_table():
    """config/runa_ood.yaml, its schema and the table of docs/parameters.md are what `runa-ood params --write` makes."""
    from runa_ood_node.tools import params as gen

    assert gen.stale(REPO) == [], "run `runa-ood params --write`"


def test_generator_detects_every_stale_file_and_rewrites_them(tmp_path, monkeypatch, capsys):
    from runa_ood_node.tools import params as gen
    from runa_ood_node.tools.cli import main

    (tmp_path / "config").mkdir()
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "parameters.md").write_text("# x\n\n<!-- params:begin -->\nold table\n<!-- params:end -->\ntail\n")
    (tmp_path / "config" / "runa_ood.yaml").write_text(gen.render_yaml())
    assert main(["params", "--check", "--root", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "runa_ood.schema.json" in err and "parameters.md" in err and "runa_ood.yaml" not in err
    # a new row in the table (what another branch adds) makes every generated file stale
    row = P.ParamSpec("max_image_pixels", 4096 * 4096, "Largest image accepted (pixels).", 1, 1e9, section="inputs")
    monkeypatch.setattr(gen, "PARAMETERS", P.PARAMETERS + (row,))
    assert main(["params", "--write", "--root", str(tmp_path)]) == 0
    assert gen.stale(tmp_path) == []
    text = (tmp_path / "docs" / "parameters.md").read_text()
    assert "old table" not in text and "`max_image_pixels`" in text and text.endswith("<!-- params:end -->\ntail\n")
    flat = dict(flatten_params(yaml.safe_load((tmp_path / "config" / "runa_ood.yaml").read_text())["/**"]["ros__parameters"]))
    assert flat["max_image_pixels"] == 4096 * 4096


def test_shipped_yaml_holds_every_parameter_at_its_default_and_validates():
    data = yaml.safe_load((REPO / "config" / "runa_ood.yaml").read_text())
    flat = dict(flatten_params(data["/**"]["ros__parameters"]))
    assert list(flat) == [p.name for p in P.PARAMETERS]  # every one, in table order
    assert flat == P.defaults()
    s = P.validate(flat)
    assert s == P.NodeSettings()  # the settings' defaults are the table's
    assert s.alert.roi is None  # alert.roi: [] = no ROI


def test_yaml_validates_against_the_schema_and_the_schema_refuses_bad_files():
    jsonschema = pytest.importorskip("jsonschema")
    import json

    schema = json.loads((REPO / "config" / "runa_ood.schema.json").read_text())
    jsonschema.Draft7Validator.check_schema(schema)
    data = yaml.safe_load((REPO / "config" / "runa_ood.yaml").read_text())
    jsonschema.validate(data, schema)
    params = data["/**"]["ros__parameters"]
    for change in ({"lam": 1.5}, {"scorer": "maxlogit"}, {"no_such": 1}, {"max_boxes": 2.5}, {"model": ""},
                   {"alert": {**params["alert"], "roi": ["x"]}}, {"alert": {**params["alert"], "k": 0}}):
        bad = {"/**": {"ros__parameters": {**params, **change}}}
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(bad, schema)


def test_a_split_prefix_group_is_refused_by_the_generator():
    from runa_ood_node.tools import params as gen

    split = P.PARAMETERS + (P.ParamSpec("alert.extra", 1, "x"),)
    with pytest.raises(ValueError, match="contiguous"):
        gen.render_yaml(split)


def test_descriptors_have_descriptions_ranges_and_read_only():
    pytest.importorskip("rcl_interfaces")
    from rcl_interfaces.msg import ParameterType

    for spec in P.PARAMETERS:
        d = P._descriptor(spec)
        assert d.description, spec.name
        if isinstance(spec.default, float) and spec.lo is not None:
            assert d.floating_point_range[0].from_value == spec.lo
        if isinstance(spec.default, int) and not isinstance(spec.default, bool) and spec.lo is not None:
            assert d.integer_range[0].to_value == int(spec.hi)
    assert P._descriptor(P._BY_NAME["model"]).read_only
    assert not P._descriptor(P._BY_NAME["lam"]).read_only
    assert P._descriptor(P._BY_NAME["alert.roi"]).type == ParameterType.PARAMETER_DOUBLE_ARRAY
    assert P._descriptor(P._BY_NAME["max_boxes"]).type == ParameterType.PARAMETER_INTEGER


def test_precision_resolved_and_passed_to_the_scorer_not_the_backend_options():
    cpu = P.validate({})
    assert cpu.precision == "auto" and cpu.resolved_precision == "fp32"
    cfg = cpu.config
    assert cfg.resolved_precision == "fp32" and "precision" not in cfg.backend_kwargs()
    gpu = P.validate({"device": "cuda"})  # auto on a CUDA device: the fp16 engine of build-engine
    assert gpu.resolved_precision == "fp16" and gpu.config.resolved_precision == "fp16"
    assert gpu.config.backend_kwargs() == {"device": "cuda"}
    assert P.validate({"device": "cuda", "precision": "fp32"}).config.resolved_precision == "fp32"
    assert P.validate({"device": "cuda", "precision": "FP16"}).config.resolved_precision == "fp16"
    assert P.validate({"precision": "fp32"}).config.resolved_precision == "fp32"


def test_allow_download_off_by_default_read_only_and_passed_through():
    assert P.validate({}).allow_download is False
    assert P.validate({}).config.allow_download is False
    assert P.validate({"allow_download": True}).config.allow_download is True
    assert P._BY_NAME["allow_download"].read_only and P._BY_NAME["precision"].read_only
    assert "local cache" in P._BY_NAME["allow_download"].describe()


def test_non_runa_scorer_needs_a_calibrated_thresholds_file(tmp_path):
    from runa_ood_node.core.thresholds import Thresholds

    with pytest.raises(P.ParameterValidationError) as err:
        P.validate({"scorer": "sum", "default_threshold": 3.0})  # even an explicit default is refused
    assert [p.split(":")[0] for p in err.value.problems] == ["thresholds_file"]
    assert "runa-ood calibrate --scorer sum" in str(err.value)
    f = Thresholds(global_threshold=-5.0, meta={"scorer": "energy"}).save(tmp_path / "energy.yaml")
    s = P.validate({"scorer": "energy", "thresholds_file": str(f)})
    assert s.config.scorer == "energy" and s.config.thresholds.global_threshold == pytest.approx(-5.0)
    assert P.validate({"scorer": "runa"}).thresholds_file == ""  # runa keeps its default_threshold


def test_alert_defaults_come_from_alert_config():
    from runa_ood_node.core.alerts import AlertConfig

    ref = AlertConfig()
    cfg = P.validate({}).alert.to_alert_config()
    for name in ("k", "n", "hold_s", "clear_s", "takeover_min_area_frac", "takeover_min_bottom_frac", "roi",
                 "takeover_k", "match_iou"):
        assert getattr(cfg, name) == getattr(ref, name), name
    assert P.defaults()["alert.k"] == ref.k and P.defaults()["alert.hold_s"] == ref.hold_s
    assert P.defaults()["alert.takeover_k"] == 0  # 0 = same as k (AlertConfig: None)
    s = P.validate({"alert.takeover_k": 2, "alert.k": 3, "alert.n": 4})
    assert s.alert.takeover_k == 2 and s.alert.to_alert_config().effective_takeover_k == 2


def test_detection_ids_are_opt_in_and_match_iou_is_passed_through():
    s = P.validate({})
    assert s.alert.use_detection_ids is False  # per-frame box numbers must not merge objects by default
    s = P.validate({"alert.use_detection_ids": True, "alert.match_iou": 0.5})
    assert s.alert.use_detection_ids is True and s.alert.to_alert_config().match_iou == 0.5
    with pytest.raises(P.ParameterValidationError, match="alert.match_iou"):
        P.validate({"alert.match_iou": 0.0})


@pytest.mark.parametrize("roi, polygon", [
    (None, None), ([], None), ((), None),
    ([0.25, 0.5, 0.75, 1.0], [(0.25, 0.5), (0.75, 0.5), (0.75, 1.0), (0.25, 1.0)]),
    ([0.1, 0.9, 0.5, 0.4, 0.9, 0.9], [(0.1, 0.9), (0.5, 0.4), (0.9, 0.9)]),
    ([[0.1, 0.9], [0.5, 0.4], [0.9, 0.9]], [(0.1, 0.9), (0.5, 0.4), (0.9, 0.9)]),
])
def test_one_roi_parser_for_the_parameter_and_the_alert_config(roi, polygon):
    """The node parameter (flat double array) and AlertConfig (pairs too) go through core.roi."""
    from runa_ood_node.core.alerts import AlertConfig
    from runa_ood_node.core.roi import parse_roi

    assert parse_roi(roi) == polygon
    if roi is not None and (not roi or not isinstance(roi[0], list)):
        s = P.validate({"alert.roi": list(roi)})
        assert s.alert.roi == (None if polygon is None else tuple(polygon))
        assert s.alert.to_alert_config()._roi_poly == polygon
    assert AlertConfig(roi=roi)._roi_poly == polygon


def test_cameras_give_one_input_stream_each_with_per_camera_overrides():
    single = P.validate({})
    assert single.cameras == () and len(single.inputs) == 1
    (one,) = single.inputs
    assert one.name == "" and one.prefix == "" and one.image_topic_resolved == "image" and one.detections_topic == "detections"
    s = P.validate({"cameras": ["front", "left"], "image_transport": "compressed", "image_qos": "reliable",
                    "camera.left.image_transport": "raw", "camera.left.image_queue_size": 7})
    front, left = s.inputs
    assert (front.name, front.image_topic_resolved, front.detections_topic) == ("front", "front/image/compressed",
                                                                              "front/detections")
    assert front.image_qos == "reliable" and front.image_queue_size == 5  # the node-wide values
    assert left.image_topic_resolved == "left/image" and left.image_queue_size == 7 and left.image_qos == "reliable"


@pytest.mark.parametrize("values,needle", [
    ({"cameras": ["front", "front"]}, "duplicate"),
    ({"cameras": ["front/left"]}, "letters, digits"),
    ({"cameras": ["1cam"]}, "letters, digits"),
    ({"cameras": "front"}, "list of names"),
    ({"cameras": ["front"], "camera.rear.image_qos": "reliable"}, "camera.rear.image_qos: 'rear' is not in cameras"),
    ({"cameras": ["front"], "camera.front.image_transprt": "raw"}, "did you mean camera.front.image_transport"),
    ({"cameras": ["front"], "camera.front.model": "ViT-B-32"}, "only image_transport"),
    ({"cameras": ["front"], "camera.front.image_qos": "best"}, "camera.front.image_qos: 'best' is not one of"),
])
def test_bad_cameras_and_overrides_are_refused(values, needle):
    with pytest.raises(P.ParameterValidationError) as e:
        P.validate(dict(values, pretrained="", allow_random_weights=True), check_files=False)
    assert needle in str(e.value)


def test_closest_parameter_names_the_declared_one():
    names = [p.name for p in P.PARAMETERS]
    assert P.closest_parameter("camers", names) == "cameras"
    assert P.closest_parameter("alert.kk", names) == "alert.k"
    assert P.closest_parameter("alrt.hold_s", names) == "alert.hold_s"
    assert P.closest_parameter("health.frame_timeout", names) == "health.frame_timeout_s"
    assert P.closest_parameter("zzzzzz", names) is None


def test_schema_accepts_per_camera_overrides_and_refuses_unknown_ones():
    jsonschema = pytest.importorskip("jsonschema")
    schema = __import__("json").loads((REPO / "config" / "runa_ood.schema.json").read_text())
    ok = {"/**": {"ros__parameters": {"cameras": ["front"], "camera": {"front": {"image_transport": "compressed"}}}}}
    jsonschema.validate(ok, schema)
    for bad in ({"camera": {"front": {"model": "x"}}}, {"camera": {"front": {"image_qos": "best"}}},
                {"cameras": ["a/b"]}):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate({"/**": {"ros__parameters": bad}}, schema)
