"""Label sets: built-ins match the data pack, prompts, YAML validation, resolution by name."""
import pathlib

import pytest

from runa_ood_node.core.labels import (BDD_ORIGINAL_TO_SET, BUILTIN_SETS, COCO_LABELS, DEFAULT_TEMPLATES, LabelSet,
                                       LabelSetError, label_set_from_dict, load_label_set)

REPO = pathlib.Path(__file__).resolve().parents[2]


def test_builtin_sets_match_pack(ood_pack_annotations):
    for name in ("voc", "bdd"):
        assert list(load_label_set(name).labels) == ood_pack_annotations["id_sets"][name]


def test_builtin_sizes_and_names():
    assert set(BUILTIN_SETS) == {"voc", "bdd", "coco"}
    assert len(load_label_set("voc")) == 20
    assert len(load_label_set("BDD")) == 9  # case-insensitive
    coco = load_label_set("coco")
    assert len(coco) == 80 and len(set(COCO_LABELS)) == 80
    # every VOC and BDD name is a COCO name (the pack's OOD sets are defined against COCO names)
    assert set(load_label_set("voc").labels) <= set(coco.labels)
    assert set(load_label_set("bdd").labels) <= set(coco.labels)
    # BDD-100K's 10 original classes all map into the 9-name set
    assert len(BDD_ORIGINAL_TO_SET) == 10
    assert set(BDD_ORIGINAL_TO_SET.values()) == set(load_label_set("bdd").labels)


def test_prompts_default_template_and_ensembles():
    s = LabelSet("t", ["car", "person"])
    assert s.templates == DEFAULT_TEMPLATES
    assert s.prompts() == [["a photo of a car"], ["a photo of a person"]]
    s2 = LabelSet("t", ["car", "person"], ["a photo of a {label}", "a {label} on the road"],
                  aliases={"person": ["pedestrian"]})
    p = s2.prompts()
    assert p[0] == ["a photo of a car", "a car on the road"]
    assert p[1] == ["a photo of a person", "a person on the road", "a photo of a pedestrian", "a pedestrian on the road"]
    assert s2.index("PERSON ") == 1
    with pytest.raises(KeyError):
        s2.index("dog")


@pytest.mark.parametrize("data, match", [
    ({"name": "x", "labels": []}, "empty"),
    ({"name": "x"}, "labels"),
    ({"labels": ["a"]}, "name"),
    ({"name": "x", "labels": ["car", "Car "]}, "duplicate"),
    ({"name": "x", "labels": ["car"], "templates": ["a photo of a thing"]}, r"\{label\}"),
    ({"name": "x", "labels": ["car"], "templates": ["a {label} {other}"]}, "placeholders"),
    ({"name": "x", "labels": ["car"], "templates": []}, "templates"),
    ({"name": "x", "labels": ["car"], "aliases": {"dog": ["puppy"]}}, "not one of the labels"),
    ({"name": "x", "labels": ["car", 3]}, "labels\\[1\\]"),
    ({"name": "x", "labels": ["car"], "colour": "red"}, "unknown keys"),
    ({"name": "x", "labels": "car"}, "list"),
])
def test_invalid_definitions_raise_clear_errors(data, match):
    with pytest.raises(LabelSetError, match=match):
        label_set_from_dict(data)


def test_yaml_roundtrip_and_aliases(tmp_path):
    f = tmp_path / "warehouse.yaml"
    f.write_text(
        "name: warehouse\n"
        "templates: ['a photo of a {label}']\n"
        "labels:\n  - forklift\n  - name: person\n    aliases: [worker]\n  - pallet\n"
        "aliases:\n  pallet: skid\n")
    s = load_label_set(str(f))
    assert s.name == "warehouse" and s.labels == ("forklift", "person", "pallet")
    assert s.prompts()[1] == ["a photo of a person", "a photo of a worker"]
    assert s.prompts()[2] == ["a photo of a pallet", "a photo of a skid"]
    assert label_set_from_dict(s.to_dict()).prompts() == s.prompts()


def test_bad_yaml_file_names_the_file(tmp_path):
    f = tmp_path / "broken.yaml"
    f.write_text("name: [unclosed\n")
    with pytest.raises(LabelSetError, match="broken.yaml"):
        load_label_set(f)
    g = tmp_path / "dup.yaml"
    g.write_text("name: d\nlabels: [car, car]\n")
    with pytest.raises(LabelSetError, match="dup.yaml.*duplicate"):
        load_label_set(g)


def test_resolve_by_name_in_calibration_dir(tmp_path, monkeypatch):
    (tmp_path / "mine.yaml").write_text("name: mine\nlabels: [a, b]\n")
    monkeypatch.setenv("RUNA_OOD_CALIBRATION_DIR", str(tmp_path))
    assert load_label_set("mine").labels == ("a", "b")
    with pytest.raises(LabelSetError, match="not found.*built-in"):
        load_label_set("does_not_exist")


def test_example_file_in_repo_is_valid():
    s = load_label_set(REPO / "calibration" / "example_labels.yaml")
    assert len(s) >= 2 and all(len(p) >= 1 for p in s.prompts())


def test_paths_env(tmp_path, monkeypatch):
    from runa_ood_node.core import paths

    monkeypatch.setenv("RUNA_OOD_CACHE_DIR", str(tmp_path / "c"))
    assert paths.cache_dir() == tmp_path / "c" and (tmp_path / "c").is_dir()
    monkeypatch.delenv("RUNA_OOD_CALIBRATION_DIR", raising=False)
    assert paths.calibration_dir() == REPO / "calibration"
    assert paths.resolve_calibration_file("example_labels", (".yaml", ".yml")).name == "example_labels.yaml"
    with pytest.raises(FileNotFoundError, match="tried"):
        paths.resolve_calibration_file("nope", ".yaml")
