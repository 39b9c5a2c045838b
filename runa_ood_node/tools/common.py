"""Shared pieces of the offline tools: CLI arguments, encoder loading, the dataset scoring loop.

The dataset loop holds no method code: :func:`encode_boxes` calls ``OodScorer.encode`` once per
frame (sanitising, views, visual trunk -> per-box pre-projection features) and :func:`score_boxes`
calls ``OodScorer.score_features`` (fusion, similarities, scorer) once per scorer x ablation on
the features of the whole dataset; :func:`score_dataset` chains the two for one configuration.
The split exists so ``evaluate`` can compare several scorers and ablations on one encoding, and
``finetune`` the regional projection before and after training (``score_boxes(...,
regional_projection=...)``).

Model loading, ONE path for every tool: :func:`scorer_from_args` = the command-line arguments ->
the node's parameters (:func:`node_parameters_from_args`: ``core.config.parameters_from_args`` puts
a flag under the node parameter of its name, ``core.config.FLAG_PARAMETERS`` for the few that
differ; :data:`TOOL_PARAMETERS` where a tool departs from the node) -> ONE validation into the typed
``core.config.ScorerConfig`` (:func:`config_from_args`: ``core.config.from_parameters``, the label
set, thresholds and head loaded once; a tool that fits thresholds or a head says so by name) ->
``factory.build_scorer`` (the node's construction: encoder precision, the backend, GPU views on
CUDA, the head, thresholds) -> the node's thresholds fit check. A tool therefore scores what the
node configured with the same parameters scores; a new node parameter with a flag of the same name
needs no code here.

Weights policy: a tool never silently falls back to random weights. When the requested weights
cannot be loaded it prints what failed and how to provide weights, and exits with status 2.
``--allow-random-weights`` builds a randomly initialised model instead (``DualEncoder.load`` seeds
it with ``core.encoder.RANDOM_WEIGHTS_SEED``, so separate tool runs and the node share the same
random model); every output is then labelled :data:`RANDOM_LABEL`. ``--offline`` (or
``RUNA_OOD_OFFLINE=1`` / ``HF_HUB_OFFLINE=1``) makes an uncached pretrained tag fail at once
instead of open_clip retrying a download for about a minute.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import math
import pathlib
import sys
import time
from typing import Any, Dict, Iterable, List, Optional, Sequence

import numpy as np

LOG = logging.getLogger("runa_ood_node.tools")

RANDOM_LABEL = "RANDOM WEIGHTS — numbers say nothing about detection quality"
from ..core import config as scorer_config  # noqa: E402
from ..core.parameters import defaults as _node_defaults  # noqa: E402

#: the tools' method defaults are the node's (one table: core.parameters.PARAMETERS)
NODE_DEFAULTS = _node_defaults()
DEFAULT_MODEL = NODE_DEFAULTS["model"]
DEFAULT_PRETRAINED = NODE_DEFAULTS["pretrained"]
from ..core.registry import (ABLATIONS, BACKENDS, DEFAULT_METHOD, METHODS, PRECISIONS, SCORERS, canonical_scorer,  # noqa: E402
                             resolve_device as _resolve_device, resolve_precision)

from ..core.paths import data_pack_annotations  # noqa: E402
from ..factory import build_scorer  # noqa: E402

#: ``--annotations`` when not given: ``$RUNA_OOD_DATA_PACK`` (None when unset; no path is guessed)
DEFAULT_ANNOTATIONS = data_pack_annotations()


# ---------------------------------------------------------------------------------------------- arguments
def add_model_arguments(parser: argparse.ArgumentParser, allow_all: bool = False) -> None:
    """``--model --pretrained --device --precision --backend --offline --allow-random-weights --projection
    --method --head``; ``allow_all``: ``--method all`` and ``--head METHOD=DIR`` (repeatable), for a tool
    that compares the methods (``evaluate``)."""
    g = parser.add_argument_group("model")
    g.add_argument("--model", default=DEFAULT_MODEL,
                   help="open_clip ViT architecture, e.g. ViT-B-16 (paper), ViT-B-32, ViT-L-14 (default %(default)s)")
    g.add_argument("--pretrained", default=DEFAULT_PRETRAINED,
                   help="open_clip pretrained tag (cached locally) or a checkpoint path; 'none' for no weights "
                        "(needs --allow-random-weights) (default %(default)s, as in the paper)")
    g.add_argument("--device", default=TOOL_PARAMETERS["device"], help="torch device: cpu, cuda, cuda:0 or auto (default %(default)s)")
    g.add_argument("--precision", default=TOOL_PARAMETERS["precision"], choices=PRECISIONS,
                   help="trunk precision of the model and the backend: auto = fp16 on CUDA, fp32 on the CPU; "
                        "fp16 needs CUDA (default %(default)s)")
    g.add_argument("--backend", default=TOOL_PARAMETERS["backend"], choices=BACKENDS,
                   help="visual trunk backend; auto tries TensorRT -> ONNX Runtime -> torch (default %(default)s)")
    g.add_argument("--offline", action="store_true",
                   help="never download weights: a pretrained tag that is not in the local cache fails at once "
                        "(as with RUNA_OOD_OFFLINE=1 or HF_HUB_OFFLINE=1) instead of about a minute of retries")
    g.add_argument("--allow-random-weights", action="store_true",
                   help="if the weights cannot be loaded, use a RANDOM model instead of failing "
                        "(plumbing tests only; every number and plot is labelled as meaningless)")
    g.add_argument("--projection", default=None,
                   help="fine-tuned regional projection (a calibration/<domain> folder name or path), "
                        "see `runa-ood finetune`")
    g.add_argument("--method", default=NODE_DEFAULTS["method"], choices=METHODS + (("all",) if allow_all else ()),
                   help="OOD method, the node's `method` parameter: runa (default), uni-ood, tagood "
                        "(the last two need --head)" + ("; all = every method side by side" if allow_all else ""))
    g.add_argument("--head", default=None, action="append" if allow_all else "store",
                   help="trained head of the method, the node's `head` parameter (a folder written by "
                        "`runa-ood finetune --method M --out DIR`, or its name in calibration/)"
                        + ("; with --method all: METHOD=DIR, once per method" if allow_all else ""))


def add_scoring_arguments(parser: argparse.ArgumentParser, allow_all: bool = False) -> None:
    """``--id-set --scorer --ablation --lam --blur-radius --temperature --thresholds --min-box-size``."""
    g = parser.add_argument_group("scoring")
    g.add_argument("--id-set", default=NODE_DEFAULTS["label_set"],
                   help="ID label set: voc | bdd (pack flags decide ID/OOD), coco, or a label-set YAML path "
                        "(then ID = category in the set) (default %(default)s)")
    extra = " or all" if allow_all else ""
    g.add_argument("--scorer", default=NODE_DEFAULTS["scorer"], type=canonical_scorer,
                   choices=SCORERS + (("all",) if allow_all else ()),
                   help=f"uncertainty score: max_cosine (RUNA, paper Eq. 6; old name runa), mcm, energy, sum{extra} "
                        "(default %(default)s)")
    g.add_argument("--ablation", default=ABLATIONS[0], choices=ABLATIONS + (("all",) if allow_all else ()),
                   help=f"views: dual (RUNA), regional (crop only), global (blurred frame only){extra} "
                        "(default %(default)s)")
    g.add_argument("--lam", type=float, default=NODE_DEFAULTS["lam"], help="fusion weight of the regional view (default %(default)s)")
    g.add_argument("--blur-radius", type=float, default=NODE_DEFAULTS["blur_radius"],
                   help="Gaussian sigma in px at the encoder input size for the global view (default %(default)s)")
    g.add_argument("--temperature", type=float, default=NODE_DEFAULTS["temperature"],
                   help="temperature of the mcm / energy scorers (default %(default)s)")
    g.add_argument("--min-box-size", type=float, default=NODE_DEFAULTS["min_box_size"],
                   help="boxes narrower/shorter than this (px) are not scored (default %(default)s)")
    g.add_argument("--thresholds", default=None,
                   help="thresholds file (name in calibration/ or path) from `runa-ood calibrate`; refused when "
                        "it was fitted for another model, weights, scorer, ablation, lam, blur, label set or projection")
    g.add_argument("--allow-threshold-mismatch", action="store_true",
                   help="use --thresholds even when fitted for another configuration (or an older file that "
                        "records none): warns, and the report lists the mismatches")


def add_dataset_arguments(parser: argparse.ArgumentParser) -> None:
    """``--annotations`` (default: ``$RUNA_OOD_DATA_PACK``)."""
    parser.add_argument("--annotations", default=None,
                        help="COCO-style annotation JSON (ood_pack format or plain COCO); default "
                             "$RUNA_OOD_DATA_PACK when set")


def add_common_arguments(parser: argparse.ArgumentParser, allow_all: bool = False) -> None:
    """All shared arguments: dataset, model, scoring."""
    add_dataset_arguments(parser)
    add_model_arguments(parser, allow_all=allow_all)
    add_scoring_arguments(parser, allow_all=allow_all)
    parser.add_argument("--no-progress", action="store_true", help="no tqdm progress bars")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")


def setup_logging(args) -> None:
    """INFO for runa_ood_node loggers (DEBUG with -v); third-party (open_clip's root logs) at WARNING."""
    level = logging.DEBUG if getattr(args, "verbose", False) else logging.INFO
    logging.basicConfig(level=logging.WARNING, format="[%(levelname)s] %(name)s: %(message)s")
    logging.getLogger("runa_ood_node").setLevel(level)


# ---------------------------------------------------------------------------------------------- messages
def banner(lines: Sequence[str], char: str = "#", stream=None) -> None:
    """Print a boxed, prominent message to ``stream`` (stderr by default)."""
    import textwrap

    stream = stream or sys.stderr
    wrapped: List[str] = []
    for s in lines:
        indent = s[: len(s) - len(s.lstrip())]
        wrapped.extend(textwrap.wrap(s, 96, subsequent_indent=indent + "  ") or [""])
    lines = wrapped
    width = max(78, max(len(s) for s in lines) + 4)
    bar = char * width
    print(bar, file=stream)
    for s in lines:
        print(f"{char} {s.ljust(width - 4)} {char}", file=stream)
    print(bar, file=stream, flush=True)


def fail(message_lines: Sequence[str], code: int = 2) -> "SystemExit":
    """Print an error banner and return a ``SystemExit(code)`` for the caller to raise."""
    banner(["ERROR"] + list(message_lines), char="!")
    return SystemExit(code)


def _pretrained_arg(value) -> Optional[str]:
    if value is None:
        return None
    text = str(value).strip()
    return None if text.lower() in ("", "none", "null", "random") else text


def allow_download(args) -> bool:
    """May open_clip download uncached tag weights? False with ``--offline`` or when
    ``RUNA_OOD_OFFLINE`` / ``HF_HUB_OFFLINE`` is set (``core.config.parameters_from_args``)."""
    return scorer_config.parameters_from_args(args)["allow_download"]


#: where an offline tool departs from the node's defaults: every box scored (no cap), the torch
#: backend unless ``--backend`` says otherwise, reliable QoS for a replayed bag; and the loading
#: settings written out (so a live node started with these parameters loads the model alike)
TOOL_PARAMETERS: Dict[str, Any] = {"max_boxes": 0, "backend": "torch", "image_qos": "reliable",
                                   "detections_qos": "reliable",
                                   **{k: NODE_DEFAULTS[k] for k in ("autostart", "device", "precision")}}


def node_parameters_from_args(args, overrides: Optional[Dict[str, Any]] = None, *, random_weights: bool = False,
                              image_topic: Optional[str] = None, n_frames: int = 100) -> Dict[str, Any]:
    """The node parameters of a tool run (a live node's too): THE converter from command-line arguments.

    In order (later wins): :data:`TOOL_PARAMETERS`; ``core.config.parameters_from_args`` (every
    argument whose destination is a node parameter name or in ``core.config.FLAG_PARAMETERS``; ``--device``
    resolved, ``--pretrained none`` -> empty, ``--scorer all`` -> RUNA's, ``allow_download`` from
    ``--offline``); then :func:`_run_parameters`: the bag's topics and queue sizes, the seeded random
    model when ``random_weights``, ``overrides``, ``--node-params name:=value`` (``args.node_params``).
    """
    return scorer_config.parameters_from_args(
        args, TOOL_PARAMETERS, _run_parameters(args, overrides, random_weights, image_topic, n_frames))


def _run_parameters(args, overrides: Optional[Dict[str, Any]], random_weights: bool, image_topic: Optional[str],
                    n_frames: int) -> Dict[str, Any]:
    """What a run sets over its arguments: the topic settings of ``image_topic`` (a ``.../compressed``
    topic -> compressed transport) and queue / pairing sizes of a bag of ``n_frames`` images; the seeded
    random model when ``random_weights``; ``overrides``; last ``--node-params name:=value``."""
    p: Dict[str, Any] = {}
    if image_topic:
        from . import bagio

        compressed = image_topic.endswith("/compressed")
        p.update(image_topic=image_topic[: -len("/compressed")] if compressed else image_topic,
                 image_transport="compressed" if compressed else "raw",
                 detections_topic=getattr(args, "detections_topic", None) or bagio.DETECTIONS_TOPIC)
    n = int(n_frames)
    p.update(image_queue_size=max(5, min(1000, n)), detections_queue_size=max(10, min(1000, n)),
             processing_queue_size=max(2, min(100, n)), pairing_buffer=max(30, min(1000, n)))
    if random_weights:
        p.update(pretrained="", allow_random_weights=True)
    p.update(overrides or {})
    p.update(parse_node_params(getattr(args, "node_params", None)))
    return p


def parse_node_params(items: Optional[Sequence[str]]) -> Dict[str, Any]:
    """``["name:=value", ...]`` -> dict (values parsed as YAML, like ``--ros-args -p``)."""
    import yaml

    out: Dict[str, Any] = {}
    for it in items or ():
        if ":=" not in it:
            raise ValueError(f"node parameter must be name:=value, got {it!r}")
        k, v = it.split(":=", 1)
        out[k.strip()] = yaml.safe_load(v) if v.strip() else ""
    return out


def settings_from_parameters(params: Dict[str, Any], apply_thresholds: bool = True, fit_head: bool = False):
    """The node's validated settings of ``params`` (``core.config.validate``: ``settings.config`` is the
    ``ScorerConfig``, its files loaded; raises ``ParameterValidationError``, a ValueError, listing every
    bad value). The rules a running node adds are lifted by name for the tools that make what they ask:
    ``apply_thresholds=False`` (no thresholds loaded; a scorer other than RUNA's needs no
    ``thresholds_file``), ``fit_head=True`` (``finetune``: a method other than ``runa`` needs no ``head``)."""
    return scorer_config.validate(params, thresholds=apply_thresholds, need_head=not fit_head)


def scorer_from_parameters(params: Dict[str, Any], ablation: Optional[str] = None, encoder=None,
                           apply_thresholds: bool = True, fit_head: bool = False):
    """``(OodScorer, ScorerConfig)`` of node parameters: ``core.config.from_parameters`` ->
    ``factory.build_scorer`` (the node's construction). ``ablation`` (a tool's ``--ablation``; None =
    dual, the node's views), ``encoder`` (an already loaded model to build around): passed on. Raises as
    they do; Ray actors and tests call this, command-line tools :func:`scorer_from_args`."""
    config = scorer_config.from_parameters(params, thresholds=apply_thresholds, need_head=not fit_head,
                                           **({"ablation": ablation} if ablation else {}))
    return build_scorer(config, encoder=encoder), config


@dataclasses.dataclass
class ToolScorer:
    """What :func:`scorer_from_args` built: the ``scorer``, the node ``params`` it was built from
    (random weights recorded in them), their ``config`` (``core.config.ScorerConfig``), the ``ablation``
    and the thresholds-file ``mismatch`` list (non-empty only with ``--allow-threshold-mismatch``)."""

    scorer: Any
    params: Dict[str, Any]
    config: Any
    ablation: str
    mismatch: List[str]

    @property
    def random_weights(self) -> bool:
        return bool(self.scorer.encoder.random_weights)


def ablation_of(args, overrides: Optional[str] = None) -> str:
    """``--ablation`` (``all`` / missing -> dual), or ``overrides``."""
    return overrides or _single(getattr(args, "ablation", None), "dual")


def config_from_args(args, overrides: Optional[Dict[str, Any]] = None, *, ablation: Optional[str] = None,
                     apply_thresholds: bool = True, image_topic: Optional[str] = None, n_frames: int = 100,
                     fit_head: bool = False):
    """``(ScorerConfig, node parameters, reason)`` of a command line, validated once (exit 2 listing every
    bad value before a model loads). No weights asked for (``--pretrained none``): the seeded random model's
    parameters, with ``reason`` saying why (else None). Arguments: as :func:`scorer_from_args`."""
    ablation = ablation_of(args, ablation)
    if ablation not in ABLATIONS:
        raise fail([f"--ablation {ablation!r}: not one of {list(ABLATIONS)}"])
    device = _resolve_device(getattr(args, "device", "cpu"))
    if device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise fail([f"--device {device}: CUDA is not available here; use --device cpu or --device auto"])
    extra = _run_parameters(args, overrides, False, image_topic, n_frames)
    reason = None
    if not _pretrained_arg(extra.get("pretrained", getattr(args, "pretrained", None))) \
            and not extra.get("allow_random_weights"):  # no weights asked for: the seeded random model's
        extra = _run_parameters(args, overrides, True, image_topic, n_frames)
        reason = f"no pretrained weights requested for {extra.get('model', getattr(args, 'model', None))!r} " \
                 f"(--pretrained {getattr(args, 'pretrained', None)})"
    try:  # ONE validation into the typed config: the arguments' parameters over TOOL_PARAMETERS, then the run's
        config = scorer_config.from_args(args, extra, base=TOOL_PARAMETERS, thresholds=apply_thresholds,
                                         need_head=not fit_head, ablation=ablation)
    except ValueError as exc:
        raise fail([f"invalid settings: {exc}"])
    params = dict(config.parameters)
    return config, params, reason


def scorer_from_args(args, overrides: Optional[Dict[str, Any]] = None, *, ablation: Optional[str] = None,
                     apply_thresholds: bool = True, image_topic: Optional[str] = None,
                     n_frames: int = 100, fit_head: bool = False) -> ToolScorer:
    """THE way a tool turns its command-line arguments into a scorer: :func:`config_from_args` (arguments
    -> node parameters -> one validation into a ``ScorerConfig``) -> ``factory.build_scorer`` -> the
    node's thresholds fit check (``ScorerConfig.check_thresholds``; ``--allow-threshold-mismatch`` = the
    node's ``thresholds_allow_mismatch``).

    Weights policy: when the weights of ``--model`` / ``--pretrained`` cannot be loaded (or none are
    asked for) the tool exits 2 saying how to provide them, unless ``--allow-random-weights``: then
    the seeded random model is built (``pretrained`` empty, ``allow_random_weights`` in the
    parameters, as the node builds it) and a banner says so.

    ``overrides``: parameter values that win over the arguments (e.g. the scorer of one run);
    ``ablation``: None = ``--ablation`` (``all`` -> dual); ``apply_thresholds``: False for tools that
    apply ``--thresholds`` themselves or fit them (no thresholds on the scorer, no check here);
    ``image_topic`` / ``n_frames``: the bag's (topics, pairing buffer); ``fit_head``: True for
    ``finetune``, which builds a method's scorer to train its head (a method other than ``runa`` then
    needs no ``head``).

    Raises:
        SystemExit(2): invalid settings, unusable weights, CUDA missing, an unavailable backend, an
            unreadable head / thresholds file, thresholds fitted for another configuration.
    """
    from ..core.encoder import RANDOM_WEIGHTS_SEED, WeightsUnavailableError

    config, params, reason = config_from_args(args, overrides, ablation=ablation, apply_thresholds=apply_thresholds,
                                              image_topic=image_topic, n_frames=n_frames, fit_head=fit_head)
    scorer = None
    if reason is None:
        if not config.allow_random:
            _log_weights_source(config.model, config.pretrained, config.allow_download)
        try:
            with _build_failures(config.model, config.backend):
                scorer = build_scorer(config)
        except WeightsUnavailableError as exc:
            reason = str(exc)
    if scorer is None:
        if not bool(getattr(args, "allow_random_weights", False)):
            raise fail([f"cannot load weights for model {config.model!r} (--pretrained "
                        f"{getattr(args, 'pretrained', None)}):", *_wrap(reason), "", *_WEIGHTS_HELP(config.model)])
        params = {**params, "pretrained": "", "allow_random_weights": True}
        config = config.replace(pretrained="", allow_random=True)
        with _build_failures(config.model, config.backend):
            scorer = build_scorer(config)
        banner([RANDOM_LABEL, f"model {config.model!r} runs with RANDOM weights (seed {RANDOM_WEIGHTS_SEED}) because:",
                *_wrap(reason), "Use this run to test plumbing only."])
    mismatch = _check_thresholds(config, scorer) if apply_thresholds else []
    enc = scorer.encoder
    LOG.info("pipeline: %s on %s, %s, backend %s, %s views, %s ablation%s", enc.model_name, enc.device,
             enc.precision, enc.backend_name, type(scorer.view_maker).__name__, config.ablation,
             f", projection {params['projection']}" if params.get("projection") else "")
    return ToolScorer(scorer, params, config, config.ablation, mismatch)


def _WEIGHTS_HELP(model: str) -> List[str]:
    return ["How to provide weights:",
            "  * --pretrained /path/to/checkpoint.pt   (a local open_clip checkpoint file), or",
            f"  * run once with internet access with --model {model} --pretrained <tag> so open_clip caches",
            "    the tag (HF_HOME / ~/.cache/huggingface), then reuse or copy that cache here.",
            "  * plumbing tests only: --allow-random-weights (numbers then say nothing about quality)."]


def _check_thresholds(config, scorer) -> List[str]:
    """The node's thresholds check (``core.thresholds.check_fit``), refused (exit 2) or reported as the node does."""
    try:
        mismatch = config.check_thresholds(scorer)
    except ValueError as exc:
        raise fail(str(exc).splitlines())
    if mismatch:
        LOG.warning("--allow-threshold-mismatch: thresholds %s were fitted for another configuration (%s); "
                    "applied anyway", config.thresholds_file, "; ".join(mismatch))
    return mismatch


def _single(value: Optional[str], default: str) -> str:
    return default if value in (None, "", "all") else value


def _log_weights_source(model: str, pretrained: str, download: bool) -> None:
    """Say where the weights come from before a possibly long load (paths: DualEncoder reports)."""
    path = pathlib.Path(pretrained).expanduser()
    if path.exists() or "/" in pretrained or path.suffix:
        LOG.info("loading %s weights from file %s", model, pretrained)
        return
    try:
        from ..core.encoder import (REGISTERED_WEIGHTS, find_cached_tag_weights, register_model_configs,
                                    registered_weights_file)

        if pretrained.strip().lower() in REGISTERED_WEIGHTS:
            LOG.info("loading %s weights %r from file %s", model, pretrained, registered_weights_file(pretrained, model))
            return
        register_model_configs()
        cached = find_cached_tag_weights(model.replace("/", "-"), pretrained)
    except Exception:  # unknown tag etc.: DualEncoder.load says why
        cached = None
    if cached:
        LOG.info("loading %s weights %r from the local cache (%s)", model, pretrained, cached)
    elif download:
        LOG.info("%s weights %r are not cached: open_clip will try to download them (without network this "
                 "takes about a minute to fail; --offline fails at once)", model, pretrained)


@contextlib.contextmanager
def _build_failures(model: str, backend: str):
    """Around ``factory.build_scorer``: every failure but missing weights becomes ``fail`` (exit 2)."""
    from ..core.encoder import WeightsUnavailableError

    try:
        yield
    except WeightsUnavailableError:
        raise
    except Exception as exc:
        name = type(exc).__name__
        if name == "BackendUnavailableError":
            raise fail([f"backend {backend!r} is not available: {exc}",
                        "use --backend auto (falls back TensorRT -> ONNX Runtime -> torch) or --backend torch"])
        if isinstance(exc, (OSError, ValueError, KeyError, ImportError, RuntimeError)):
            raise fail([f"cannot build the pipeline for model {model!r}: {name}: {exc}"])
        raise


def load_encoder_or_exit(args):
    """The :class:`DualEncoder` of the model arguments: :func:`scorer_from_args` ``.scorer.encoder``
    (no thresholds). Exits 2 as it does."""
    return scorer_from_args(args, apply_thresholds=False).scorer.encoder


def _wrap(text: Optional[str], width: int = 100) -> List[str]:
    import textwrap

    return ["  " + s for s in textwrap.wrap(text or "", width)] or ["  (no reason given)"]


def load_thresholds_or_exit(args):
    """``Thresholds`` from ``--thresholds`` (None when not given); exit 2 on a bad file."""
    if not getattr(args, "thresholds", None):
        return None
    from ..core.paths import resolve_calibration_file
    from ..core.thresholds import Thresholds

    try:
        return Thresholds.load(resolve_calibration_file(args.thresholds, (".yaml", ".yml", ".json")))
    except (OSError, ValueError) as exc:
        raise fail([f"cannot load thresholds {args.thresholds!r}: {exc}"])


def annotations_path_or_exit(args) -> pathlib.Path:
    """``--annotations`` or the default shared pack; exit 2 if neither exists."""
    path = pathlib.Path(args.annotations).expanduser() if args.annotations else DEFAULT_ANNOTATIONS
    if path is None:
        raise fail(["no annotation file: pass --annotations /path/to/annotations.json (ood_pack or COCO format) "
                    "or set RUNA_OOD_DATA_PACK"])
    if not path.is_file():
        raise fail([f"annotation file not found: {path}",
                    "pass --annotations /path/to/annotations.json (ood_pack or COCO format)"])
    return path


def load_dataset_or_exit(args, id_set=None):
    """:class:`Dataset` from ``--annotations`` and ``--id-set``; exit 2 with the reason on failure."""
    from ..core.dataset import DatasetError, load_dataset
    from ..core.labels import LabelSetError

    path = annotations_path_or_exit(args)
    try:
        return load_dataset(path, id_set if id_set is not None else args.id_set)
    except (DatasetError, LabelSetError) as exc:
        raise fail([str(exc)])


def tool_config(args, encoder) -> Dict[str, Any]:
    """Model / method settings for report files (device, precision and backend as actually used)."""
    return {"model": encoder.describe(), "random_weights": bool(encoder.random_weights),
            "device": str(encoder.device), "precision": encoder.precision, "backend": encoder.backend_name,
            "projection": getattr(args, "projection", None), "lam": args.lam, "blur_radius": args.blur_radius,
            "temperature": args.temperature, "min_box_size": args.min_box_size, "id_set": args.id_set}


# ---------------------------------------------------------------------------------------------- JSON
def _jsonable(obj):
    """Plain JSON values: ``core.plain.to_plain`` (numpy / torch / paths / dates -> Python), then
    non-finite floats -> None (JSON has no NaN / inf)."""
    from ..core.plain import to_plain

    text = json.dumps(to_plain(obj), allow_nan=True)  # NaN / Infinity tokens, mapped to null below
    return json.loads(text, parse_constant=lambda _token: None)


def write_json(path, obj) -> pathlib.Path:
    """Write ``obj`` as indented JSON (NaN/inf -> null, numpy -> Python), parents created."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_jsonable(obj), indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return path


# ---------------------------------------------------------------------------------------------- scoring loop
@dataclasses.dataclass
class EncodedBoxes:
    """Every box of a dataset encoded once by an ``OodScorer`` (all frames, in frame order).

    Attributes:
        image_id, ann_id: identifiers ``[B]``; ``category`` B names; ``is_id`` bool ``[B]``.
        frame_idx: int ``[B]`` index of the box's frame in the dataset.
        features: :class:`~runa_ood_node.core.pipeline.BoxFeatures` of all B boxes
            (``OodScorer.encode`` per frame, joined with ``BoxFeatures.concat``); boxes of
            unreadable images are ``NOT_SCORED``, boxes of frames where the backend failed
            ``BACKEND_ERROR``.
        pipeline: the ``OodScorer`` that encoded them; :func:`score_boxes` scores with it.
        seconds: wall time per stage in seconds: ``load`` (image reading + box sanitising),
            ``views`` (view making), ``encode`` (the visual trunk passes of the encoded views).
        n_images: frames processed; ``image_errors``: list of ``(path, message)``.
        group: B OOD group names (the annotations' ``group``, ``""`` where absent).
        size: float ``[B]`` annotated box size ``sqrt(w * h)`` in pixels; ``frame_wh`` int ``[B, 2]``
            the annotated size of the box's frame (``metrics.breakdown``'s size bins).
    """

    image_id: list
    ann_id: list
    category: List[str]
    is_id: np.ndarray
    frame_idx: np.ndarray
    features: Any
    pipeline: Any
    seconds: Dict[str, float]
    n_images: int
    image_errors: list
    group: List[str] = dataclasses.field(default_factory=list)
    size: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(0, np.float32))
    frame_wh: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros((0, 2), np.int64))

    def __len__(self) -> int:
        return len(self.features)

    @property
    def status(self) -> np.ndarray:
        """uint8 ``[B]`` :class:`BoxStatus` after encoding."""
        return self.features.status

    @property
    def views(self) -> tuple:
        """The encoded views, a subset of ``("regional", "global")``."""
        return self.features.views

    def seconds_for(self, ablation: str) -> float:
        """Wall time a run of ``ablation`` alone would spend before scoring: image loading + views +
        the trunk passes it needs. The encoded views share one backend call of equal-sized halves,
        so a single-view ablation is charged ``encode * (views it needs) / (views encoded)``."""
        from ..core.pipeline import VIEWS_FOR_ABLATION

        need = VIEWS_FOR_ABLATION[ablation]
        share = len(need) / max(1, len(self.views))
        return self.seconds["load"] + self.seconds["views"] + self.seconds["encode"] * share


def encode_boxes(pipeline, dataset, views=None, progress: bool = True, desc: str = "encoding") -> EncodedBoxes:
    """``pipeline.encode`` (an ``OodScorer``) over every frame of ``dataset``, boxes in xywh.

    ``views``: as for ``OodScorer.encode`` (None = what ``pipeline.ablation`` needs; both to score
    every ablation). A frame whose image cannot be read marks its boxes ``NOT_SCORED``; a backend
    failure marks them ``BACKEND_ERROR`` (``OodScorer.encode``); neither stops the loop (both are
    logged and listed in ``image_errors``).
    """
    from tqdm import tqdm

    from ..core.boxes import BoxStatus
    from ..core.pipeline import BoxFeatures

    views = pipeline.resolve_views(views)
    width = pipeline.encoder.width
    B = dataset.n_boxes
    image_id, ann_id, category, group = [], [], [], []
    is_id = np.zeros(B, bool)
    frame_idx = np.zeros(B, np.int64)
    size = np.zeros(B, np.float32)
    frame_wh = np.zeros((B, 2), np.int64)
    secs = {"load": 0.0, "views": 0.0, "encode": 0.0}
    errors = []
    parts = []
    size_mismatch = 0
    pos = n_ok = 0
    bar = tqdm(dataset.frames, desc=desc, unit="img", disable=not progress, leave=False, dynamic_ncols=True)
    for fi, fr in enumerate(bar):
        n = len(fr)
        sl = slice(pos, pos + n)
        image_id.extend([fr.image_id] * n)
        ann_id.extend(fr.ann_ids)
        category.extend(fr.categories)
        group.extend(fr.groups or [""] * n)
        is_id[sl] = fr.is_id
        frame_idx[sl] = fi
        if n:
            size[sl] = np.sqrt(np.clip(fr.boxes[:, 2], 0, None) * np.clip(fr.boxes[:, 3], 0, None))
        frame_wh[sl] = (fr.width, fr.height)
        pos += n
        if n == 0:
            continue
        t0 = time.perf_counter()
        try:
            img = dataset.load_image(fr)
        except Exception as exc:
            errors.append((str(fr.path), str(exc)))
            LOG.warning("skipping %d boxes of %s: %s", n, fr.path, exc)
            secs["load"] += time.perf_counter() - t0
            parts.append(BoxFeatures.unscored(n, width, views, error=f"{fr.path}: {exc}"))
            continue
        secs["load"] += time.perf_counter() - t0
        H, W = img.shape[:2]
        if (W, H) != (fr.width, fr.height):
            size_mismatch += 1
            LOG.warning("%s is %dx%d but annotated as %dx%d; boxes used as annotated", fr.path, W, H, fr.width,
                        fr.height)
        feat = pipeline.encode(img, fr.boxes, box_format="xywh", views=views)
        t = feat.timings
        secs["views"] += t["views"] / 1e3
        secs["encode"] += t["encode"] / 1e3
        secs["load"] += max(0.0, t["total"] - t["views"] - t["encode"]) / 1e3  # sanitising, cap
        if feat.error:
            errors.append((str(fr.path), feat.error))
        parts.append(feat)
        n_ok += int((feat.status == BoxStatus.OK).sum())
        if progress:
            bar.set_postfix(boxes_s=f"{n_ok / max(1e-9, sum(secs.values())):.1f}")
    bar.close()
    if size_mismatch:
        errors.append(("*", f"{size_mismatch} image(s) differ in size from their annotation"))
    features = BoxFeatures.concat(parts) if parts else BoxFeatures.unscored(0, width, views)
    # frames without boxes are skipped above, so the joined features hold exactly the B boxes
    assert len(features) == B, (len(features), B)
    return EncodedBoxes(image_id, ann_id, category, is_id, frame_idx, features, pipeline, secs, dataset.n_images,
                        errors, group, size, frame_wh)


@dataclasses.dataclass
class ScoredBoxes:
    """Scores of one scorer x ablation over :class:`EncodedBoxes` (arrays of length B)."""

    uncertainty: np.ndarray  # float32, NaN unless status OK
    label_idx: np.ndarray  # int64, -1 unless OK
    label: List[str]
    similarity: np.ndarray  # float32
    status: np.ndarray  # uint8 (OK boxes with non-finite embeddings become BACKEND_ERROR)
    seconds: float  # fuse + similarity + score wall time
    result: Any = None  # the FrameResult over all B boxes (threshold, is_ood, ...)


def score_boxes(enc: EncodedBoxes, scorer: Optional[str] = None, ablation: Optional[str] = None,
                lam: Optional[float] = None, temperature: Optional[float] = None,
                regional_projection=None) -> ScoredBoxes:
    """Score every encoded box with ``enc.pipeline.score_features`` (one call for the dataset).

    ``scorer`` / ``ablation`` / ``lam`` / ``temperature``: None = the pipeline's own settings.
    ``regional_projection``: optional ``[width, D]`` to use as ``P_r`` for this call only, e.g.
    ``finetune``'s before/after comparison: passed as ``score_features(head=...)``, so nothing shared
    (encoder, method) is changed and a scorer used elsewhere keeps its own ``P_r``.
    """
    res = enc.pipeline.score_features(enc.features, scorer=scorer, ablation=ablation, lam=lam,
                                      temperature=temperature, head=regional_projection)
    return ScoredBoxes(res.uncertainty, res.label_idx, list(res.label), res.similarity, res.status,
                       res.timings["score"] / 1e3, res)


class Records(list):
    """List of per-box dicts from :func:`score_dataset`, with run statistics as attributes.

    Each record: ``image_id``, ``ann_id``, ``category``, ``is_id`` (bool), ``status`` (BoxStatus
    name), ``uncertainty`` (float or None), ``label`` (nearest ID label or ""), ``similarity``.
    Attributes: ``boxes_per_s`` (OK boxes / wall seconds, image reading included), ``seconds``,
    ``n_images``, ``status_counts``, ``image_errors``.
    """

    boxes_per_s: float = float("nan")
    seconds: float = float("nan")
    n_images: int = 0
    status_counts: Dict[str, int] = {}
    image_errors: list = []

    def arrays(self):
        """``(is_id bool[B], uncertainty float32[B] (NaN unless OK), labels list[str])``."""
        is_id = np.asarray([r["is_id"] for r in self], bool)
        unc = np.asarray([np.nan if r["uncertainty"] is None else r["uncertainty"] for r in self], np.float32)
        return is_id, unc, [r["label"] for r in self]


def make_records(enc: EncodedBoxes, scored: ScoredBoxes, seconds: float) -> Records:
    """:class:`Records` of one scored run (``seconds``: its wall time, for ``boxes_per_s``)."""
    from ..core.boxes import BoxStatus

    def f(v):
        v = float(v)
        return v if math.isfinite(v) else None

    recs = Records()
    for i in range(len(enc)):
        recs.append({"image_id": enc.image_id[i], "ann_id": enc.ann_id[i], "category": enc.category[i],
                     "is_id": bool(enc.is_id[i]), "status": BoxStatus(int(scored.status[i])).name,
                     "uncertainty": f(scored.uncertainty[i]), "label": scored.label[i],
                     "similarity": f(scored.similarity[i])})
    n_ok = int((scored.status == BoxStatus.OK).sum())
    recs.seconds = float(seconds)
    recs.boxes_per_s = n_ok / seconds if seconds > 0 else float("nan")
    recs.n_images = enc.n_images
    names, counts = np.unique(scored.status, return_counts=True)
    recs.status_counts = {BoxStatus(int(s)).name: int(c) for s, c in zip(names, counts)}
    recs.image_errors = list(enc.image_errors)
    return recs


def score_dataset(scorer, dataset, progress: bool = True) -> Records:
    """Score every box of ``dataset`` with an ``OodScorer`` (its encoder, views and settings).

    Only the views the scorer's ablation needs are encoded. Returns :class:`Records` (per box:
    image_id, category, is_id, uncertainty, label, similarity, status; plus ``boxes_per_s``).
    Thresholds are not applied here (tools compare uncertainties against them explicitly).
    """
    enc = encode_boxes(scorer, dataset, views=None, progress=progress)
    scored = score_boxes(enc)
    return make_records(enc, scored, enc.seconds_for(scorer.ablation) + scored.seconds)


def method_heads(args) -> Dict[str, str]:
    """The methods a run compares and their heads: ``{method: head}`` from ``--method`` (``all`` = every
    method) and ``--head`` (one value ``DIR`` for one method; ``METHOD=DIR`` per method, repeatable).
    A method without a head maps to ``""`` (the node's empty ``head``). Exits 2 on a head that names no
    compared method, or a bare ``DIR`` with several methods."""
    methods = expand_choice(getattr(args, "method", None) or DEFAULT_METHOD, METHODS)
    given = getattr(args, "head", None)
    given = [given] if isinstance(given, str) else list(given or ())
    heads = {m: "" for m in methods}
    for h in given:
        m, sep, path = h.partition("=")
        if sep and m in METHODS:
            if m not in heads:
                raise fail([f"--head {h}: method {m!r} is not compared here (--method {args.method})"])
            heads[m] = path
        elif len(methods) == 1:
            heads[methods[0]] = h
        else:
            raise fail([f"--head {h}: with several methods, give each head as METHOD=DIR "
                        f"(methods: {', '.join(methods)})"])
    return heads


def expand_choice(value: str, choices: Iterable[str]) -> List[str]:
    """``"all"`` -> every choice, else ``[value]``."""
    return list(choices) if value == "all" else [value]
