"""The scorer's ONE typed configuration: :class:`ScorerConfig`, built from node parameters, from
command-line arguments or from a parameters YAML file, validated once, its files loaded once.

The parameter table (``core.parameters.PARAMETERS``) is the only place a default is written: every
field of :class:`ScorerConfig` that is a node parameter names its row (``metadata["param"]``) and
takes its default from it (``tests/unit/test_config.py`` checks both). The few fields that are not
node parameters (``ablation``, ``max_batch``, ``views``, ``backend_options``: offline tools only) say
so (``metadata["tool"]``).

One builder each, all ending in :func:`validate`:

* :func:`from_parameters`: a mapping of node parameters (``ros.params.read_parameters`` gives one);
* :func:`from_args`: an ``argparse`` namespace (a flag lands on the parameter of its name,
  :data:`FLAG_PARAMETERS` for the few that differ; :func:`parameters_from_args`);
* :func:`from_yaml`: a parameters file as ``ros2 run ... --params-file`` reads it
  (``config/runa_ood.yaml``: ``/**`` or the node's name, ``ros__parameters``).

:func:`validate` checks every value against the table (``core.parameters.check``), applies the rules a
running node adds (a method other than ``runa`` needs a ``head``; a scorer other than RUNA's needs a
``thresholds_file``; each can be lifted by the tool that makes what is missing), loads the label set,
the thresholds, the head and the projection ONCE and raises ``ParameterValidationError`` listing every
problem; the node's :class:`~runa_ood_node.core.parameters.NodeSettings` carries the result as
``settings.config``. ``factory.build_scorer`` takes a :class:`ScorerConfig` and loads nothing of it again.
:meth:`ScorerConfig.replace` goes through the same :func:`validate` (its loaded objects kept, only a
file a change names loaded).
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional

import yaml

from .encoder import env_offline
from .labels import LabelSet, load_label_set
from .methods import get_method
from .methods.heads import Head, check_head, load_head
from .parameters import (ALERT_PREFIX, DEFAULT_SCORER, PARAMETERS, Checked, NodeSettings, ParameterValidationError,
                         check, default, defaults)
from .paths import resolve_calibration_file
from .registry import ABLATIONS, METHODS, resolve_device, resolve_precision
from .thresholds import Thresholds, check_fit

__all__ = ["ScorerConfig", "validate", "from_parameters", "from_args", "from_yaml",
           "parameters_from_args", "method_settings", "FLAG_PARAMETERS", "TOOL_FIELDS",
           "ParameterValidationError"]

_THRESHOLD_SUFFIXES = (".yaml", ".yml", ".json")


def _param(name: str, **meta) -> Any:
    """A field that is node parameter ``name``, with the table's default."""
    return field(default=default(name), metadata={"param": name, **meta})


def method_settings(method: str, values: Optional[Mapping[str, Any]] = None):
    """Method ``method``'s own ``Settings`` (``core.methods``: RUNA's ``lam`` and ``blur_radius``; none for
    the others) from checked parameter ``values``; a name missing there takes the table's default."""
    cls = get_method(method)
    given = {**defaults(), **dict(values or {})}
    return cls.make_settings({f.name: given[f.name] for f in dataclasses.fields(cls.Settings) if f.name in given})


@dataclass(frozen=True)
class ScorerConfig:
    """Everything ``factory.build_scorer`` needs, typed and validated; the files it names loaded.

    Loaded fields: ``label_set`` (a ``LabelSet``), ``thresholds`` (a ``Thresholds``: the
    ``thresholds_file``'s, or ``default_threshold`` for every label; None = none applied, for tools
    that fit or apply them per run), ``head`` (a loaded ``heads.Head`` or None; for RUNA the
    ``projection`` parameter is its alias; the model it was made for is checked by the factory against
    the loaded encoder). ``method_settings``: the method's own ``Settings`` (``core.methods``).
    ``precision`` is the parameter's value (``auto`` allowed; :attr:`resolved_precision` for ``device``)."""

    label_set: LabelSet = field(default=None, metadata={"param": "label_set", "loaded": True})
    model: str = _param("model")
    pretrained: str = _param("pretrained")
    allow_download: bool = _param("allow_download")
    allow_random: bool = _param("allow_random_weights")
    backend: str = _param("backend")
    device: str = _param("device")
    precision: str = _param("precision")
    engine_path: str = _param("engine_path")
    method: str = _param("method")
    head: Optional[Head] = field(default=None, metadata={"param": "head", "loaded": True})
    method_settings: Any = field(default=None, metadata={"params": ("lam", "blur_radius")})  # None: the table's
    scorer: str = _param("scorer")
    temperature: float = _param("temperature")
    thresholds: Optional[Thresholds] = field(default=None, metadata={"param": "thresholds_file", "loaded": True})
    thresholds_file: str = _param("thresholds_file")
    thresholds_allow_mismatch: bool = _param("thresholds_allow_mismatch")
    max_boxes: int = _param("max_boxes")
    min_box_size: float = _param("min_box_size")
    # ---- not node parameters: offline tools only
    ablation: str = field(default=ABLATIONS[0], metadata={"tool": "views fused: dual (the node's), regional, global"})
    max_batch: Optional[int] = field(default=None, metadata={"tool": "views per backend call (None = all)"})
    views: Optional[str] = field(default=None, metadata={"tool": "cpu / gpu view maker (None = gpu on CUDA)"})
    backend_options: Mapping[str, Any] = field(default_factory=dict,
                                               metadata={"tool": "extra make_backend keywords"})
    # ---- where it came from: the node parameter values it was built from (reports, a live node alike)
    parameters: Mapping[str, Any] = field(default_factory=dict, compare=False, metadata={"source": True})

    def __post_init__(self):  # a config written by hand (tests, scripts): a label set name loaded, settings made
        if not isinstance(self.label_set, LabelSet):
            object.__setattr__(self, "label_set", load_label_set(self.label_set or default("label_set")))
        if self.method_settings is None:
            object.__setattr__(self, "method_settings", method_settings(self.method))

    @property
    def resolved_precision(self) -> str:
        """``precision`` with ``auto`` resolved for ``device`` (fp16 on CUDA, fp32 on the CPU)."""
        return resolve_precision(self.precision, self.device)

    def backend_kwargs(self) -> Dict[str, Any]:
        """Keyword arguments of ``backends.select.make_backend`` from this configuration ({} for torch)."""
        if self.backend == "torch":
            return {}
        kw: Dict[str, Any] = {"device": self.device}
        if self.engine_path:
            kw["engine_path"] = self.engine_path
        kw.update(self.backend_options)
        return kw

    def replace(self, **changes) -> "ScorerConfig":
        """A copy with ``changes``, through the builders' one :func:`validate` (an invalid value raises
        ``ParameterValidationError`` as they do; a name that is neither a field nor a setting of the
        method, ``TypeError``). A method setting's name (``lam``, ``blur_radius``) changes the method's
        settings. Files are loaded only for what a change names: a label set, head or thresholds file
        given by name or path is loaded; a loaded ``LabelSet`` / ``Head`` / ``Thresholds`` (or None) is
        taken as it is; every other loaded object is kept (a kept head re-checked against the method and
        label set, ``heads.check_head``). The rules of a node are lifted as the original build lifted
        them: no thresholds loaded (``thresholds`` None) keeps them off, a method that needs a head
        built without one keeps that rule off. ``parameters`` records the changes over the values it
        was built from."""
        fields = {f.name: f for f in dataclasses.fields(self)}
        method = changes.get("method", self.method)
        settings = {f.name for f in dataclasses.fields(get_method(method).Settings)} if method in METHODS else set()
        unknown = sorted(k for k in changes if k not in fields and k not in settings)
        if unknown:
            raise TypeError(f"ScorerConfig of method {method!r} has no setting {unknown}")
        loaded = {n: f.metadata["param"] for n, f in fields.items() if f.metadata.get("loaded")}
        objects = {k: v for k, v in changes.items() if k in loaded and not isinstance(v, (str, os.PathLike))}
        changed: Dict[str, Any] = {}
        for k, value in changes.items():
            if k in objects or k == "parameters":
                continue
            if k == "method_settings":
                changed.update(dataclasses.asdict(value))
            elif k in fields and "param" in fields[k].metadata:
                changed[fields[k].metadata["param"]] = os.fspath(value) if k in loaded else value
            elif k not in fields:  # a method setting
                changed[k] = value
        # the loaded objects: given ones as they are, the others kept unless a change names their file
        kept = {n: getattr(self, n) for n, param in loaded.items() if param not in changed}
        kept.update(objects)
        thresholds = (objects["thresholds"] if "thresholds" in objects else self.thresholds) is not None
        need_head = not (self.method in METHODS and get_method(self.method).needs_head and self.head is None)
        tool = {n: changes.get(n, getattr(self, n)) for n in TOOL_FIELDS}
        source = {**changes.get("parameters", self.parameters), **changed}
        return _validate({**self._parameter_values(), **changed}, True, thresholds, need_head, tool, kept,
                         source).config

    def _parameter_values(self) -> Dict[str, Any]:
        """The node parameter values of this configuration: those it was built from, its fields' over them."""
        values = dict(self.parameters)
        for f in dataclasses.fields(self):
            if "param" in f.metadata and not f.metadata.get("loaded"):
                values[f.metadata["param"]] = getattr(self, f.name)
        values.update(dataclasses.asdict(self.method_settings))
        values.setdefault("label_set", self.label_set.name)
        return values

    def check_thresholds(self, scorer) -> List[str]:
        """The thresholds-file check every user runs once the scorer is built (``core.thresholds.check_fit``
        against the scorer's fit identity): the mismatches (empty: compatible, or no ``thresholds_file``:
        the uncalibrated ``default_threshold`` records nothing); with ``thresholds_allow_mismatch`` they are
        returned for the caller to log and report, else ``ThresholdsMismatchError`` names each."""
        if not self.thresholds_file or scorer.thresholds is None:
            return []
        return check_fit(scorer.thresholds, scorer, allow_mismatch=self.thresholds_allow_mismatch,
                         source=self.thresholds_file)


#: :class:`ScorerConfig` fields that are not node parameters (a tool sets them: ``validate(**tool)``)
TOOL_FIELDS = tuple(f.name for f in dataclasses.fields(ScorerConfig) if "tool" in f.metadata)


# ------------------------------------------------------------------------------------ validation
def validate(values: Optional[Mapping[str, Any]] = None, check_files: bool = True, *, thresholds: bool = True,
             need_head: bool = True, **tool) -> NodeSettings:
    """Validate raw parameter values ONCE into :class:`NodeSettings` holding the :class:`ScorerConfig`.

    Args:
        values: parameter name -> value (missing names: the table's defaults; ``camera.<C>.<name>``
            overrides as ``core.parameters.check`` takes them).
        check_files: load the label set, thresholds, head and projection (into ``settings.config``);
            False: values only, ``settings.config`` None.
        thresholds: False for a tool that fits thresholds or applies them per run: none are loaded
            (``scorer.thresholds`` None) and a scorer other than RUNA's needs no ``thresholds_file``.
        need_head: False for ``finetune``, which trains the head: a method other than ``runa`` needs none.
        tool: :data:`TOOL_FIELDS` values (``ablation``, ``max_batch``, ``views``, ``backend_options``).

    Raises:
        ParameterValidationError: listing every invalid parameter with the reason.
    """
    return _validate(values, check_files, thresholds, need_head, tool)


def _validate(values: Optional[Mapping[str, Any]], check_files: bool, thresholds: bool, need_head: bool,
              tool: Mapping[str, Any], kept: Optional[Mapping[str, Any]] = None,
              source: Optional[Mapping[str, Any]] = None) -> NodeSettings:
    """:func:`validate`; ``kept``: loaded objects (``label_set``, ``thresholds``, ``head``) taken as they are
    instead of loading their files (``ScorerConfig.replace``); ``source``: ``config.parameters`` (None: ``values``)."""
    c = check(values)
    v = c.values
    kept = kept or {}
    has_head = kept["head"] is not None if "head" in kept else bool(v["head"])
    if need_head and v["method"] in METHODS and get_method(v["method"]).needs_head and not has_head:
        c.problems.append(f"head: method {v['method']!r} needs a trained head (`runa-ood finetune --method "
                          f"{v['method']} --out DIR`, then head:=DIR)")
    if thresholds and v["scorer"] != DEFAULT_SCORER and not v["thresholds_file"]:
        c.problems.append(f"thresholds_file: scorer {v['scorer']!r} needs a thresholds file calibrated for it "
                          f"(`runa-ood calibrate --scorer {v['scorer']}`); default_threshold is in {DEFAULT_SCORER} "
                          "units (-max cosine) and means nothing for other scorers")
    unknown = sorted(set(tool) - set(TOOL_FIELDS))
    if unknown:
        raise TypeError(f"not scorer settings of a tool: {unknown} (known: {list(TOOL_FIELDS)})")
    parameters = dict(values or {}) if source is None else dict(source)
    config = _load(c, thresholds, dict(tool, parameters=parameters), kept) if check_files else None
    if c.problems:
        raise ParameterValidationError(c.problems)
    return NodeSettings(alert=c.alert, inputs=c.inputs, config=config,
                        **{spec.attr: v[spec.name] for spec in PARAMETERS if not spec.name.startswith(ALERT_PREFIX)})


def _load(c: Checked, thresholds: bool, tool: Mapping[str, Any],
          kept: Mapping[str, Any]) -> Optional[ScorerConfig]:
    """The :class:`ScorerConfig` of checked values, its files loaded (each failure a problem); a loaded
    object in ``kept`` is taken instead of its file (a kept head checked as a loaded one is)."""
    v, problems = c.values, c.problems

    def load(name, fn, *args, **kw):
        try:
            return fn(*args, **kw)
        except (ValueError, OSError) as exc:
            problems.append(f"{name}: {exc}")
            return None

    labels = kept["label_set"] if "label_set" in kept else load("label_set", load_label_set, v["label_set"])
    thr = None
    if thresholds and "thresholds" in kept:
        thr = kept["thresholds"]
    elif thresholds and v["thresholds_file"]:
        thr = load("thresholds_file", lambda f: Thresholds.load(resolve_calibration_file(f, _THRESHOLD_SUFFIXES)),
                   v["thresholds_file"])
    elif thresholds:
        thr = Thresholds(global_threshold=v["default_threshold"],
                         meta={"source": "default_threshold parameter (uncalibrated)"})
    # the method and label set refusals here; the model's once it is loaded (factory). RUNA's projection
    # parameter is its head's alias (a projection file loads as a RUNA head; no label set recorded)
    head = None
    projection = not v["head"] and v["projection"] and get_method(v["method"]).head_is_projection
    if "head" in kept:
        head = kept["head"]
        if head is not None:
            load("head", check_head, head, method=v["method"], label_set=None if projection else labels)
    elif v["head"]:
        head = load("head", load_head, v["head"], method=v["method"], label_set=labels)
    elif projection:
        head = load("projection", load_head, v["projection"], method=v["method"])
    settings = load(f"{v['method']} settings", method_settings, v["method"], v)
    if problems or labels is None:
        return None
    fields = {f.name: v[f.metadata["param"]] for f in dataclasses.fields(ScorerConfig)
              if "param" in f.metadata and not f.metadata.get("loaded")}
    return ScorerConfig(label_set=labels, thresholds=thr, head=head, method_settings=settings, **fields, **tool)


def from_parameters(values: Optional[Mapping[str, Any]] = None, *, thresholds: bool = True, need_head: bool = True,
                    **tool) -> ScorerConfig:
    """The :class:`ScorerConfig` of node parameter ``values`` (:func:`validate`; raises as it does)."""
    return validate(values, thresholds=thresholds, need_head=need_head, **tool).config


#: flags whose destination differs from the node parameter they set. Every other flag whose
#: destination IS a node parameter's name (``--lam`` -> ``lam``, ``--model`` -> ``model``) lands in the
#: parameters under that name by itself: adding a node parameter (one row in the table) and its flag
#: needs no change here. ``--allow-random-weights`` (None: no parameter) is the tools' fallback policy,
#: not the node's ``allow_random_weights`` (which builds random weights when ``pretrained`` is empty).
FLAG_PARAMETERS: Dict[str, Optional[str]] = {"id_set": "label_set", "thresholds": "thresholds_file",
                                             "allow_threshold_mismatch": "thresholds_allow_mismatch",
                                             "allow_random_weights": None}
_NAMES = frozenset(p.name for p in PARAMETERS)


def parameters_from_args(args, base: Optional[Mapping[str, Any]] = None,
                         overrides: Optional[Mapping[str, Any]] = None) -> Dict[str, Any]:
    """The node parameters of a namespace: ``base``, then the parameters its arguments name (None values
    skipped): a flag under the parameter of its name or :data:`FLAG_PARAMETERS`'; ``--device`` resolved to
    the node's ``cpu`` / ``cuda``; ``--pretrained none`` -> empty; ``--scorer all`` -> RUNA's;
    ``--offline`` (or the offline environment) -> ``allow_download`` false; last ``overrides``."""
    p: Dict[str, Any] = dict(base or {})
    for dest, value in sorted(vars(args).items()):
        name = FLAG_PARAMETERS.get(dest, dest)
        if name is not None and name in _NAMES and value is not None:
            p[name] = value
    if "device" in p:
        device = resolve_device(p["device"])
        p["device"] = "cuda" if device.startswith("cuda") else device
    if "pretrained" in p:
        text = str(p["pretrained"]).strip()
        p["pretrained"] = "" if text.lower() in ("", "none", "null", "random") else text
    if p.get("scorer") == "all":
        p["scorer"] = DEFAULT_SCORER
    for k in ("projection", "thresholds_file"):  # written out, empty = none (reports, a live node alike)
        p[k] = str(p.get(k) or "")
    p["label_set"] = str(p.get("label_set") or default("label_set"))
    p["allow_download"] = not (bool(getattr(args, "offline", False)) or env_offline())
    p.update(overrides or {})
    return p


def from_args(args, overrides: Optional[Mapping[str, Any]] = None, *, base: Optional[Mapping[str, Any]] = None,
              thresholds: bool = True, need_head: bool = True, **tool) -> ScorerConfig:
    """The :class:`ScorerConfig` of a command line: :func:`parameters_from_args` (``base`` under the
    arguments, ``overrides`` over them) -> :func:`from_parameters`; ``config.parameters`` holds the values."""
    return from_parameters(parameters_from_args(args, base, overrides), thresholds=thresholds, need_head=need_head,
                           **tool)


def from_yaml(path, node_name: str = "runa_ood", overrides: Optional[Mapping[str, Any]] = None, *,
              thresholds: bool = True, need_head: bool = True, **tool) -> ScorerConfig:
    """The :class:`ScorerConfig` of a parameters file (``--params-file``: ``/**`` then ``node_name``'s
    ``ros__parameters``, the latter winning; nested names joined with dots) with ``overrides`` on top."""
    with open(os.path.expanduser(os.fspath(path)), encoding="utf-8") as f:
        doc = yaml.safe_load(f) or {}
    values: Dict[str, Any] = {}
    for key in ("/**", node_name, "/" + node_name.lstrip("/")):
        section = (doc.get(key) or {}).get("ros__parameters") if isinstance(doc.get(key), dict) else None
        values.update(_flatten(section or {}))
    values.update(overrides or {})
    return from_parameters(values, thresholds=thresholds, need_head=need_head, **tool)


def _flatten(d: Mapping[str, Any], prefix: str = "") -> Dict[str, Any]:
    out: Dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out
