"""In-distribution (ID) label sets and the text prompts built from them.

A :class:`LabelSet` is the list of K ID class names the detector was trained on, plus prompt
templates. The text encoder embeds every prompt; the K embeddings (one per label, an average over
templates and aliases) are what each box is compared against.

Built-in sets (``BUILTIN_SETS``)
--------------------------------
``voc``  the 20 PASCAL-VOC classes, written with COCO-style names exactly as in the shared
         ``ood_pack/annotations.json`` ``id_sets.voc`` (aeroplane -> airplane, diningtable ->
         dining table, motorbike -> motorcycle, pottedplant -> potted plant, sofa -> couch,
         tvmonitor -> tv), so evaluation label strings match.
``bdd``  9 names matching ``id_sets.bdd`` of the pack. BDD-100K's detection benchmark has 10 classes:
         pedestrian, rider, car, truck, bus, train, motorcycle, bicycle, traffic light, traffic
         sign. The pack (and this set) maps ``pedestrian`` and ``rider`` -> ``person`` and
         ``traffic sign`` -> ``stop sign`` (:data:`BDD_ORIGINAL_TO_SET`). Built-in sets use the
         paper's single prompt "a photo of a {label}" and no aliases, so numbers stay comparable;
         a YAML set can add e.g. ``aliases: {person: [pedestrian, rider]}``.
``coco`` the 80 COCO detection classes (2017 names).

User sets (YAML)
----------------
::

    name: warehouse              # required, non-empty string
    templates:                   # optional; default ["a photo of a {label}"]; each needs {label}
      - "a photo of a {label}"
      - "a blurry photo of a {label}"
    labels:                      # required, non-empty, unique after normalisation
      - forklift
      - name: person
        aliases: [worker, pedestrian]   # optional extra names, prompted with the same templates
    aliases:                     # optional alternative: mapping label -> list of aliases
      pallet: [skid]

Errors in a file raise :class:`LabelSetError` (a ``ValueError``) naming the file and the problem.
"""
from __future__ import annotations

import dataclasses
import os
import pathlib
from typing import Dict, Iterable, List, Mapping, Tuple, Union

DEFAULT_TEMPLATES: Tuple[str, ...] = ("a photo of a {label}",)

VOC_LABELS: Tuple[str, ...] = (
    "airplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "couch", "cow",
    "dining table", "dog", "horse", "motorcycle", "person", "potted plant", "sheep", "train", "tv",
)

BDD_LABELS: Tuple[str, ...] = (
    "bicycle", "bus", "car", "motorcycle", "person", "stop sign", "traffic light", "train", "truck",
)
#: BDD-100K original class name -> name used in the ``bdd`` set (see module docstring).
BDD_ORIGINAL_TO_SET: Dict[str, str] = {
    "pedestrian": "person", "rider": "person", "car": "car", "truck": "truck", "bus": "bus",
    "train": "train", "motorcycle": "motorcycle", "bicycle": "bicycle",
    "traffic light": "traffic light", "traffic sign": "stop sign",
}

COCO_LABELS: Tuple[str, ...] = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat",
    "traffic light", "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog",
    "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella",
    "handbag", "tie", "suitcase", "frisbee", "skis", "snowboard", "sports ball", "kite",
    "baseball bat", "baseball glove", "skateboard", "surfboard", "tennis racket", "bottle",
    "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple", "sandwich", "orange",
    "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch", "potted plant",
    "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote", "keyboard", "cell phone",
    "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock", "vase", "scissors",
    "teddy bear", "hair drier", "toothbrush",
)


class LabelSetError(ValueError):
    """A label set definition is invalid (empty, duplicate labels, bad template, bad YAML...)."""


def _norm(label: str) -> str:
    return " ".join(label.strip().lower().split())


@dataclasses.dataclass(frozen=True)
class LabelSet:
    """K in-distribution class names with the prompt templates used to embed them.

    Attributes:
        name: identifier of the set (used in logs, caches, LabelInfo).
        labels: the K class names, in index order (``label_idx`` in results indexes this).
        templates: prompt templates, each containing ``{label}``; the text embedding of a label is
            the renormalised mean over all templates x (label + aliases).
        aliases: optional extra names per label, prompted with the same templates.
        source: where the set came from ("builtin" or a file path), informational only.
    """

    name: str
    labels: Tuple[str, ...]
    templates: Tuple[str, ...] = DEFAULT_TEMPLATES
    aliases: Mapping[str, Tuple[str, ...]] = dataclasses.field(default_factory=dict)
    source: str = "builtin"

    def __post_init__(self) -> None:
        # Normalise containers so lists from YAML or callers are accepted, then validate.
        object.__setattr__(self, "labels", tuple(self.labels) if not isinstance(self.labels, str) else (self.labels,))
        templates = self.templates
        if isinstance(templates, str):
            templates = (templates,)
        object.__setattr__(self, "templates", tuple(templates))
        object.__setattr__(self, "aliases", {str(k): tuple(v) for k, v in dict(self.aliases or {}).items()})
        self._validate()

    # ------------------------------------------------------------------ validation
    def _validate(self) -> None:
        where = f"label set {self.name!r}" + (f" ({self.source})" if self.source != "builtin" else "")
        if not isinstance(self.name, str) or not self.name.strip():
            raise LabelSetError(f"{where}: 'name' must be a non-empty string")
        if not self.labels:
            raise LabelSetError(f"{where}: 'labels' is empty; give at least one ID class name")
        seen: Dict[str, str] = {}
        for lab in self.labels:
            if not isinstance(lab, str) or not lab.strip():
                raise LabelSetError(f"{where}: every label must be a non-empty string, got {lab!r}")
            key = _norm(lab)
            if key in seen:
                raise LabelSetError(f"{where}: duplicate label {lab!r} (same as {seen[key]!r})")
            seen[key] = lab
        if not self.templates:
            raise LabelSetError(f"{where}: 'templates' is empty; omit it to use {list(DEFAULT_TEMPLATES)}")
        for tpl in self.templates:
            if not isinstance(tpl, str) or "{label}" not in tpl:
                raise LabelSetError(f"{where}: template {tpl!r} must be a string containing '{{label}}'")
            try:
                tpl.format(label="x")
            except (KeyError, IndexError, ValueError) as exc:
                raise LabelSetError(
                    f"{where}: template {tpl!r} has placeholders other than {{label}} ({exc!r}); "
                    "write literal braces as {{ and }}"
                ) from None
        if len(set(self.templates)) != len(self.templates):
            raise LabelSetError(f"{where}: duplicate templates {list(self.templates)}")
        for lab, names in self.aliases.items():
            if lab not in self.labels:
                raise LabelSetError(f"{where}: aliases given for {lab!r}, which is not one of the labels")
            for alias in names:
                if not isinstance(alias, str) or not alias.strip():
                    raise LabelSetError(f"{where}: alias {alias!r} of {lab!r} must be a non-empty string")

    # ------------------------------------------------------------------ API
    def __len__(self) -> int:
        return len(self.labels)

    def index(self, label: str) -> int:
        """Index of ``label`` (case/whitespace-insensitive). Raises KeyError when absent."""
        key = _norm(label)
        for i, lab in enumerate(self.labels):
            if _norm(lab) == key:
                return i
        raise KeyError(f"{label!r} is not in label set {self.name!r}")

    def names_for(self, label: str) -> Tuple[str, ...]:
        """The label followed by its aliases, the names that get prompted."""
        return (label,) + tuple(self.aliases.get(label, ()))

    def prompts(self) -> List[List[str]]:
        """Per label, the list of prompts to embed: every template x (label + aliases).

        Returns a list of K lists (index-aligned with ``labels``); each inner list has
        ``len(templates) * (1 + n_aliases)`` strings.
        """
        return [[tpl.format(label=name) for name in self.names_for(lab) for tpl in self.templates] for lab in self.labels]

    def content_hash(self) -> str:
        """16 hex digits of sha256 over what the text embeddings depend on: the labels in order, the
        templates and the aliases (not the name or the source). Recorded by thresholds files."""
        import hashlib
        import json

        body = json.dumps({"labels": list(self.labels), "templates": list(self.templates),
                           "aliases": {k: list(v) for k, v in sorted(self.aliases.items())}}, sort_keys=True)
        return hashlib.sha256(body.encode("utf-8")).hexdigest()[:16]

    def to_dict(self) -> dict:
        """YAML/JSON-friendly representation (round-trips through :func:`label_set_from_dict`)."""
        out: dict = {"name": self.name, "templates": list(self.templates), "labels": list(self.labels)}
        if self.aliases:
            out["aliases"] = {k: list(v) for k, v in self.aliases.items()}
        return out


def _builtin(name: str) -> LabelSet:
    if name == "voc":
        return LabelSet("voc", VOC_LABELS)
    if name == "bdd":
        return LabelSet("bdd", BDD_LABELS)
    if name == "coco":
        return LabelSet("coco", COCO_LABELS)
    raise KeyError(name)


#: The built-in set names, usable anywhere a label-set name or path is accepted.
BUILTIN_SETS: Tuple[str, ...] = ("voc", "bdd", "coco")


def label_set_from_dict(data: Mapping, source: str = "<dict>") -> LabelSet:
    """Build a :class:`LabelSet` from the YAML schema in the module docstring."""
    if not isinstance(data, Mapping):
        raise LabelSetError(f"{source}: expected a mapping with 'name' and 'labels', got {type(data).__name__}")
    unknown = set(data) - {"name", "labels", "templates", "aliases", "description"}
    if unknown:
        raise LabelSetError(f"{source}: unknown keys {sorted(unknown)} (allowed: name, labels, templates, aliases, description)")
    name = data.get("name")
    if not isinstance(name, str) or not name.strip():
        raise LabelSetError(f"{source}: 'name' is required and must be a non-empty string")
    raw_labels = data.get("labels")
    if raw_labels is None or isinstance(raw_labels, (str, Mapping)) or not isinstance(raw_labels, Iterable):
        raise LabelSetError(f"{source}: 'labels' is required and must be a list of names")
    labels: List[str] = []
    aliases: Dict[str, List[str]] = {}
    for i, entry in enumerate(raw_labels):
        if isinstance(entry, str):
            labels.append(entry.strip())
        elif isinstance(entry, Mapping) and isinstance(entry.get("name"), str):
            extra = set(entry) - {"name", "aliases"}
            if extra:
                raise LabelSetError(f"{source}: labels[{i}] has unknown keys {sorted(extra)}")
            lab = entry["name"].strip()
            labels.append(lab)
            al = entry.get("aliases") or []
            if isinstance(al, str) or not isinstance(al, Iterable):
                raise LabelSetError(f"{source}: labels[{i}].aliases must be a list of strings")
            aliases.setdefault(lab, []).extend(str(a).strip() for a in al)
        else:
            raise LabelSetError(f"{source}: labels[{i}] must be a string or a mapping with 'name', got {entry!r}")
    top_aliases = data.get("aliases") or {}
    if not isinstance(top_aliases, Mapping):
        raise LabelSetError(f"{source}: 'aliases' must map label -> list of aliases")
    for lab, al in top_aliases.items():
        if isinstance(al, str):
            al = [al]
        aliases.setdefault(str(lab), []).extend(str(a).strip() for a in al)
    templates = data.get("templates")
    if templates is None:
        templates = DEFAULT_TEMPLATES
    elif isinstance(templates, str):
        templates = [templates]
    elif not isinstance(templates, Iterable):
        raise LabelSetError(f"{source}: 'templates' must be a list of strings containing {{label}}")
    return LabelSet(name.strip(), tuple(labels), tuple(templates), {k: tuple(v) for k, v in aliases.items()}, source)


def load_label_set_file(path: Union[str, os.PathLike]) -> LabelSet:
    """Read a YAML label set file (schema in the module docstring)."""
    import yaml

    path = pathlib.Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise LabelSetError(f"cannot read label set file {path}: {exc}") from exc
    except yaml.YAMLError as exc:
        raise LabelSetError(f"label set file {path} is not valid YAML: {exc}") from exc
    return label_set_from_dict(data, source=str(path))


def load_label_set(name_or_path: Union[str, os.PathLike, LabelSet]) -> LabelSet:
    """A built-in set by name (``voc``, ``bdd``, ``coco``) or a YAML file.

    A file may be given as a path, or as a bare name resolved inside the calibration directory
    (``warehouse`` -> ``calibration/warehouse.yaml``), see :func:`paths.resolve_calibration_file`.
    A :class:`LabelSet` is returned unchanged.
    """
    if isinstance(name_or_path, LabelSet):
        return name_or_path
    text = os.fspath(name_or_path)
    if not text.strip():
        raise LabelSetError("empty label set name; use one of " f"{list(BUILTIN_SETS)} or a YAML path")
    if text.strip().lower() in BUILTIN_SETS and not os.path.exists(text):
        return _builtin(text.strip().lower())
    from .paths import resolve_calibration_file

    try:
        path = resolve_calibration_file(text, (".yaml", ".yml"))
    except FileNotFoundError as exc:
        raise LabelSetError(f"{exc}; built-in label sets are {list(BUILTIN_SETS)}") from None
    return load_label_set_file(path)
