"""Trained heads: the one artefact kind every method's ``fit`` writes and the node / tools load.

A head folder (``runa-ood finetune --method M --out DIR``)::

    DIR/head.pt     a dict of float32 CPU tensors (torch.load(weights_only=True) reads it)
    DIR/head.yaml   method, model_name, model_id, weights_id, label_set, label_set_hash, hyper-parameters,
                    loss_curve, created, sha256 (of head.pt), format_version

:func:`load_head` refuses, with a :class:`HeadError` (a ValueError) whose message names the head and
says why (no traceback for the node to log): a head made for another method, model (``model_id``) or
label set (content hash), a missing, truncated or corrupt weights file (its sha256 differs from the
YAML's, or torch cannot read it), a weights file whose tensors are not what the YAML says.

Existing RUNA projection files (``projection.pt`` + ``projection.yaml`` of ``core.finetune``, a folder,
the ``.pt`` itself or a domain name under the calibration directory) load as RUNA heads
(``state = {"proj_regional": P_r}``); such a file recording another ``model_id`` is refused too.
"""
from __future__ import annotations

import dataclasses
import datetime as _dt
import hashlib
import os
import pathlib
from typing import Dict, Mapping, Optional, Union

import torch
import yaml

from ..plain import to_plain
from ..registry import METHODS

__all__ = ["Head", "HeadError", "save_head", "load_head", "head_meta", "HEAD_FILE", "HEAD_META", "FORMAT_VERSION"]

HEAD_FILE = "head.pt"
HEAD_META = "head.yaml"
FORMAT_VERSION = 1


class HeadError(ValueError):
    """A head cannot be used here; the message names the head and the reason."""


@dataclasses.dataclass
class Head:
    """A loaded head: ``state`` (tensors), ``meta`` (the YAML), ``source`` (where it came from)."""

    method: str
    state: Dict[str, torch.Tensor]
    meta: Dict
    source: str

    @property
    def sha256(self) -> str:
        return str(self.meta.get("sha256") or "")

    @property
    def hyper(self) -> Dict:
        return dict(self.meta.get("hyper") or {})


def _file_sha256(path: pathlib.Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def head_meta(encoder, label_set, hyper: Optional[Mapping] = None, loss_curve=(), **extra) -> Dict:
    """The provenance :func:`load_head` checks, for a head trained on ``encoder`` for ``label_set``."""
    return {"model_name": encoder.model_name, "model_id": encoder.model_id, "weights_id": encoder.weights_id,
            "pretrained": encoder.pretrained, "random_weights": bool(encoder.random_weights),
            "label_set": label_set.name, "label_set_hash": label_set.content_hash(),
            "prompts": [list(p) for p in label_set.prompts()], "hyper": dict(hyper or {}),
            "loss_curve": [float(v) for v in loss_curve], **extra}


def save_head(out_dir: Union[str, os.PathLike], method: str, state: Mapping[str, torch.Tensor],
              meta: Optional[Mapping] = None) -> pathlib.Path:
    """Write ``out_dir/head.pt`` and ``out_dir/head.yaml`` (temporary names, then renamed); return the folder.

    ``meta`` should carry ``model_name``, ``model_id``, ``weights_id``, ``label_set``, ``label_set_hash``,
    ``hyper`` and ``loss_curve``; ``method``, ``sha256``, ``shapes``, ``created`` and ``format_version``
    are filled here. Raises ValueError for an unknown method or non-finite / non-tensor weights.
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; expected one of {list(METHODS)}")
    clean = {}
    for k, t in state.items():
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"head weight {k!r} is a {type(t).__name__}, not a tensor")
        t = t.detach().to("cpu").contiguous().clone()
        if t.is_floating_point():
            t = t.to(torch.float32)
            if not torch.isfinite(t).all():
                raise ValueError(f"head weight {k!r} contains NaN or inf; refusing to save it")
        clean[str(k)] = t
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    pt = out / HEAD_FILE
    tmp = out / (HEAD_FILE + ".tmp")
    torch.save(clean, tmp)
    tmp.replace(pt)
    m = dict(meta or {})
    m.update(format_version=FORMAT_VERSION, method=method, sha256=_file_sha256(pt),
             shapes={k: [int(s) for s in t.shape] for k, t in clean.items()})
    m.setdefault("created", _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat())
    tmp = out / (HEAD_META + ".tmp")
    tmp.write_text(yaml.safe_dump(to_plain(m), sort_keys=False))
    tmp.replace(out / HEAD_META)
    return out


def _resolve(name_or_path) -> Optional[pathlib.Path]:
    raw = pathlib.Path(os.fspath(name_or_path)).expanduser()
    candidates = [raw]
    if not raw.is_absolute():
        from ..paths import calibration_dir

        candidates.append(calibration_dir() / raw)
    for c in candidates:
        if (c / HEAD_META).is_file() or (c / HEAD_FILE).is_file() or (c.is_file() and c.name == HEAD_FILE):
            return c.parent if c.is_file() else c
    return None


def _check_fit(head: Head, method: Optional[str], encoder, label_set) -> None:
    name, meta = head.source, head.meta
    if method is not None and head.method != method:
        raise HeadError(f"head {name} was trained for method {head.method!r}, not {method!r}")
    if encoder is not None:
        mid = meta.get("model_id")
        if mid and mid != encoder.model_id:
            raise HeadError(f"head {name} was trained for model {meta.get('model_name')!r} (model_id {mid}); the "
                            f"loaded model is {encoder.model_name!r} (model_id {encoder.model_id}): another model "
                            "or other weights. Fine-tune a head for this model")
    if label_set is not None and meta.get("label_set_hash"):
        if meta["label_set_hash"] != label_set.content_hash():
            raise HeadError(f"head {name} was trained for label set {meta.get('label_set')!r} "
                            f"(hash {meta['label_set_hash']}), not for {label_set.name!r} "
                            f"(hash {label_set.content_hash()}): its classes or prompts differ")


def check_head(head: Head, encoder=None, method: Optional[str] = None, label_set=None) -> None:
    """Refuse (``HeadError``) a loaded ``head`` made for another ``method``, model (``encoder.model_id``) or
    label set: for a head loaded before its model (``core.config``; the factory checks the model)."""
    _check_fit(head, method, encoder, label_set)


def _legacy_projection(name_or_path) -> Head:
    """A ``core.finetune`` projection file as a RUNA head (FileNotFoundError when there is none)."""
    from ..finetune import load_projection
    from .runa import PROJECTION_KEY

    try:
        proj, meta = load_projection(name_or_path)
    except FileNotFoundError:
        raise
    except ValueError as exc:
        raise HeadError(f"head {os.fspath(name_or_path)} (a RUNA projection file) is unusable: {exc}") from exc
    m = dict(meta or {})
    m.setdefault("hyper", {k: m.get(k) for k in ("lr", "epochs", "tau", "shots", "seed") if k in m})
    return Head("runa", {PROJECTION_KEY: proj}, m, os.fspath(name_or_path))


def load_head(name_or_path: Union[str, os.PathLike], method: Optional[str] = None, encoder=None,
              label_set=None) -> Head:
    """Load a head folder (or a RUNA projection file) and check it fits.

    Args:
        name_or_path: a head folder, its ``head.pt``, a name under the calibration directory, or a
            RUNA projection (folder with ``projection.pt``, the ``.pt``, a domain name).
        method, encoder, label_set: when given, the head must have been made for them (method name,
            ``encoder.model_id``, ``label_set.content_hash()``).

    Raises:
        HeadError: it does not fit, or its files are truncated / corrupt / inconsistent.
        FileNotFoundError: nothing there (the message lists what was looked for).
    """
    folder = _resolve(name_or_path)
    if folder is None:
        try:
            head = _legacy_projection(name_or_path)
        except FileNotFoundError as exc:
            raise FileNotFoundError(f"head {os.fspath(name_or_path)!r} not found: no {HEAD_META} / {HEAD_FILE} "
                                    f"there nor under the calibration directory, and no RUNA projection ({exc})") from None
        _check_fit(head, method, encoder, label_set)
        return head
    name = str(folder)
    ymeta, pt = folder / HEAD_META, folder / HEAD_FILE
    if not ymeta.is_file():
        raise HeadError(f"head {name}: {HEAD_META} is missing (method, model and sha256 unknown); re-run "
                        "`runa-ood finetune --out`")
    try:
        meta = yaml.safe_load(ymeta.read_text()) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise HeadError(f"head {name}: {HEAD_META} is not valid YAML ({exc})") from None
    if not isinstance(meta, dict) or meta.get("method") not in METHODS:
        raise HeadError(f"head {name}: {HEAD_META} does not name a method of {list(METHODS)}")
    if meta.get("format_version", FORMAT_VERSION) != FORMAT_VERSION:
        raise HeadError(f"head {name}: format_version {meta.get('format_version')!r} is not supported "
                        f"(this code reads {FORMAT_VERSION})")
    head = Head(str(meta["method"]), {}, meta, name)
    _check_fit(head, method, encoder, label_set)  # before reading weights: the cheap refusals first
    if not pt.is_file():
        raise HeadError(f"head {name}: weights file {HEAD_FILE} is missing")
    digest = _file_sha256(pt)
    if meta.get("sha256") and digest != meta["sha256"]:
        raise HeadError(f"head {name}: {HEAD_FILE} is truncated or corrupt (sha256 {digest[:16]}..., "
                        f"{HEAD_META} records {str(meta['sha256'])[:16]}...)")
    try:
        state = torch.load(pt, map_location="cpu", weights_only=True)
    except Exception as exc:  # zip / pickle errors of a damaged file
        raise HeadError(f"head {name}: {HEAD_FILE} cannot be read ({type(exc).__name__}: "
                        f"{str(exc).splitlines()[0] if str(exc) else ''})") from None
    if not isinstance(state, dict) or not all(isinstance(t, torch.Tensor) for t in state.values()):
        raise HeadError(f"head {name}: {HEAD_FILE} does not hold a dict of tensors")
    shapes = meta.get("shapes") or {}
    for k, shape in shapes.items():
        if k not in state or list(state[k].shape) != list(shape):
            got = list(state[k].shape) if k in state else "nothing"
            raise HeadError(f"head {name}: weight {k!r} should be {shape} ({HEAD_META}), {HEAD_FILE} holds {got}")
    head.state = {k: (t.to(torch.float32) if t.is_floating_point() else t) for k, t in state.items()}
    head.meta = dict(meta, sha256=digest)
    return head
