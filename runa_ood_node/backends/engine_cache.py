"""Pure helpers for TensorRT engines: cache keys, paths, compatibility checks, batch splitting.

Nothing here imports TensorRT or needs a GPU, so all of it is tested in CI. A TensorRT engine is
only valid for the exact TensorRT version and GPU compute capability it was built with, and it
bakes in the ONNX graph, the precision and the optimisation profile (min/opt/max batch). The cache
key hashes exactly those five things, so an engine is rebuilt when (and only when) one changes.

Files (``cache_root`` defaults to :func:`runa_ood_node.core.paths.cache_dir`)::

    <cache_root>/engines/<model_id>-<precision>-b<min>_<opt>_<max>[-o<outputs>]-<key[:16]>.engine
    <cache_root>/engines/<same stem>.json        # metadata sidecar (EngineMeta.to_dict())

One engine per backbone output set (:mod:`runa_ood_node.core.backbone`): ``("cls",)`` engines keep
today's names, keys and I/O (``views`` -> ``features``); other sets add ``-o<names>`` to the file
name and their outputs to the key, have one output tensor per name (``cls`` still called
``features``) and, with ``xattn``, a second int32 input ``pairs`` ``[P, 2]``.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pathlib
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

from ..core.backbone import output_set
from ..core.encoder import file_sha256  # noqa: F401  (the one file hash; re-exported for the backends)
from ..core.registry import RESOLVED_PRECISIONS as PRECISIONS  # one definition

INPUT_NAME = "views"
OUTPUT_NAME = "features"
#: int32 ``[P, 2]`` (query view, key view) input of graphs / engines whose output set has ``xattn``
PAIRS_NAME = "pairs"


def graph_output_names(outputs: Sequence[str]) -> List[str]:
    """Tensor names of an output set's graph / engine, in canonical order: ``cls`` keeps today's
    name ``features`` (so ``("cls",)`` graphs and engines are today's), the others their own names."""
    return [OUTPUT_NAME if n == "cls" else n for n in output_set(outputs)]


def outputs_file_tag(outputs: Sequence[str]) -> str:
    """``""`` for ``("cls",)`` (today's file names), else ``-o<names joined by _>`` (``-ocls_tokens``)."""
    from ..core.backbone import output_set_tag

    tag = output_set_tag(outputs)
    return f"-o{tag.replace('+', '_')}" if tag else ""


def graph_input_names(outputs: Sequence[str]) -> List[str]:
    """``["views"]``, plus ``"pairs"`` when the output set has ``xattn``."""
    return [INPUT_NAME] + ([PAIRS_NAME] if "xattn" in output_set(outputs) else [])


class EngineMismatchError(RuntimeError):
    """A serialized engine was built for another TensorRT version, GPU, model or precision."""


@dataclasses.dataclass(frozen=True)
class Profile:
    """Optimisation profile of the batch axis: ``1 <= min <= opt <= max`` (views per call)."""

    min: int = 1
    opt: int = 16
    max: int = 64

    def __post_init__(self) -> None:
        vals = (self.min, self.opt, self.max)
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in vals):
            raise ValueError(f"profile batch sizes must be integers, got {vals}")
        if not 1 <= self.min <= self.opt <= self.max:
            raise ValueError(f"profile must satisfy 1 <= min <= opt <= max, got min={self.min} opt={self.opt} max={self.max}")

    def as_tuple(self) -> Tuple[int, int, int]:
        return (self.min, self.opt, self.max)

    @classmethod
    def coerce(cls, profile: Union["Profile", Sequence[int], Mapping[str, int]]) -> "Profile":
        if isinstance(profile, Profile):
            return profile
        if isinstance(profile, Mapping):
            return cls(int(profile["min"]), int(profile["opt"]), int(profile["max"]))
        vals = tuple(int(v) for v in profile)
        if len(vals) != 3:
            raise ValueError(f"profile needs (min, opt, max), got {profile!r}")
        return cls(*vals)


def normalize_compute_capability(cc: Union[str, Sequence[int]]) -> str:
    """``(8, 6)``, ``"8.6"``, ``"sm_86"`` -> ``"8.6"``."""
    if isinstance(cc, str):
        s = cc.strip().lower()
        if s.startswith("sm_"):
            digits = s[3:]
            if not digits.isdigit() or len(digits) < 2:
                raise ValueError(f"bad compute capability {cc!r}")
            return f"{int(digits[:-1])}.{int(digits[-1])}"
        parts = s.split(".")
        if len(parts) != 2 or not all(p.isdigit() for p in parts):
            raise ValueError(f"bad compute capability {cc!r} (expected 'major.minor')")
        return f"{int(parts[0])}.{int(parts[1])}"
    vals = tuple(int(v) for v in cc)
    if len(vals) != 2:
        raise ValueError(f"bad compute capability {cc!r} (expected (major, minor))")
    return f"{vals[0]}.{vals[1]}"


def engine_cache_key(model_hash: str, trt_version: str, compute_capability: Union[str, Sequence[int]],
                     precision: str, profile: Union[Profile, Sequence[int]],
                     outputs: Sequence[str] = ("cls",)) -> str:
    """Hex sha256 identifying one engine build.

    Args:
        model_hash: hash of the ONNX file the engine is built from (:func:`file_sha256`).
        trt_version: ``tensorrt.__version__`` (the full version: engines are not portable across
            TensorRT releases).
        compute_capability: the GPU's ``(major, minor)`` / ``"8.6"``.
        precision: ``"fp32"`` or ``"fp16"``.
        profile: ``(min, opt, max)`` batch sizes of the optimisation profile.
        outputs: the backbone output set the engine emits (``("cls",)`` engines keep today's keys).

    The key changes exactly when one of these changes (``"8.6"`` and ``(8, 6)`` are the same GPU).
    """
    if not model_hash or not isinstance(model_hash, str):
        raise ValueError("model_hash must be a non-empty string")
    if not trt_version or not isinstance(trt_version, str):
        raise ValueError("trt_version must be a non-empty string")
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    fields = {
        "model": model_hash,
        "trt": trt_version.strip(),
        "cc": normalize_compute_capability(compute_capability),
        "precision": precision,
        "profile": list(Profile.coerce(profile).as_tuple()),
    }
    names = output_set(outputs)
    if names != ("cls",):
        fields["outputs"] = list(names)
    blob = json.dumps(fields, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def engine_path_for(model_id: str, precision: str, profile: Union[Profile, Sequence[int]], key: str,
                    cache_root: Optional[Union[str, os.PathLike]] = None,
                    outputs: Sequence[str] = ("cls",)) -> pathlib.Path:
    """Where the engine for ``key`` lives (see the module docstring); the sidecar is ``.with_suffix('.json')``.
    An output set other than ``("cls",)`` adds its tag (``-o<cls+tokens>``) before the key."""
    p = Profile.coerce(profile)
    safe_id = "".join(c if c.isalnum() or c in "-_." else "_" for c in str(model_id)) or "model"
    root = pathlib.Path(cache_root) if cache_root is not None else _default_cache_root()
    tag = outputs_file_tag(outputs)
    return root / "engines" / f"{safe_id}-{precision}-b{p.min}_{p.opt}_{p.max}{tag}-{key[:16]}.engine"


def _default_cache_root() -> pathlib.Path:
    try:
        from ..core.paths import cache_dir

        return cache_dir()
    except ImportError:  # pragma: no cover - core always ships with the package
        env = os.environ.get("RUNA_OOD_CACHE_DIR")
        return pathlib.Path(env).expanduser() if env else pathlib.Path.home() / ".cache" / "runa_ood_node"


@dataclasses.dataclass
class EngineMeta:
    """Sidecar metadata written next to every engine (JSON)."""

    key: str
    model_id: str
    model_hash: str
    trt_version: str
    compute_capability: str
    precision: str
    profile: Tuple[int, int, int]
    input_size: int
    width: int
    input_name: str = INPUT_NAME
    output_name: str = OUTPUT_NAME
    build_mode: str = ""          # "fp32", "strongly-typed", "builder-flag"
    onnx_path: str = ""
    weights_hash: str = ""        # base.trunk_weights_hash of the trunk (matches bare-trunk model ids)
    outputs: Tuple[str, ...] = ("cls",)  # the backbone output set (sidecars without it: today's cls engines)

    def to_dict(self) -> Dict[str, Any]:
        d = dataclasses.asdict(self)
        d["profile"] = list(self.profile)
        d["outputs"] = list(self.outputs)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "EngineMeta":
        fields = {f.name for f in dataclasses.fields(cls)}
        missing = {"key", "model_id", "model_hash", "trt_version", "compute_capability", "precision", "profile",
                   "input_size", "width"} - set(d)
        if missing:
            raise EngineMismatchError(f"engine metadata lacks {sorted(missing)}; rebuild with `runa-ood build-engine`")
        kw = {k: v for k, v in d.items() if k in fields}
        kw["profile"] = tuple(int(v) for v in d["profile"])
        try:
            kw["outputs"] = output_set(d.get("outputs") or ("cls",))
        except ValueError as exc:
            raise EngineMismatchError(f"engine metadata names unknown outputs ({exc}); rebuild the engine") from exc
        return cls(**kw)

    def save(self, path: Union[str, os.PathLike]) -> None:
        path = pathlib.Path(path)
        tmp = path.with_name(path.name + f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True))
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: Union[str, os.PathLike]) -> "EngineMeta":
        try:
            return cls.from_dict(json.loads(pathlib.Path(path).read_text()))
        except FileNotFoundError as exc:
            raise EngineMismatchError(f"engine metadata {path} not found; rebuild with `runa-ood build-engine`") from exc
        except ValueError as exc:
            raise EngineMismatchError(f"engine metadata {path} is not valid JSON ({exc}); rebuild the engine") from exc


def check_engine_compat(meta: Union[EngineMeta, Mapping[str, Any]], trt_version: str,
                        compute_capability: Union[str, Sequence[int]], *, model_id: Optional[str] = None,
                        precision: Optional[str] = None, outputs: Optional[Sequence[str]] = None) -> None:
    """Return None when the engine described by ``meta`` can run here, else raise.

    Raises:
        EngineMismatchError: naming what differs (TensorRT version, GPU compute capability, model
            or precision) and how to fix it (rebuild with ``runa-ood build-engine``).
    """
    if not isinstance(meta, EngineMeta):
        meta = EngineMeta.from_dict(meta)
    problems: List[str] = []
    if meta.trt_version.strip() != str(trt_version).strip():
        problems.append(f"built with TensorRT {meta.trt_version}, this machine has TensorRT {trt_version}")
    here = normalize_compute_capability(compute_capability)
    there = normalize_compute_capability(meta.compute_capability)
    if here != there:
        problems.append(f"built for GPU compute capability {there}, this GPU is {here}")
    if model_id is not None and model_id not in (meta.model_id, meta.weights_hash):
        problems.append(f"built for model_id {meta.model_id}, the loaded model is {model_id}")
    if precision is not None and meta.precision != precision:
        problems.append(f"built for precision {meta.precision}, {precision} was requested")
    if outputs is not None and output_set(outputs) != meta.outputs:
        problems.append(f"built for outputs {meta.outputs}, {output_set(outputs)} were requested")
    if problems:
        raise EngineMismatchError("TensorRT engine is not usable here: " + "; ".join(problems)
                                  + ". Rebuild it on this machine with `runa-ood build-engine`.")


def split_batches(n: int, max_batch: Optional[int]) -> List[slice]:
    """Slices covering ``range(n)`` in chunks of at most ``max_batch`` (None or <= 0: one chunk).

    ``split_batches(0, 8) == []``; ``split_batches(10, 4)`` -> ``[0:4], [4:8], [8:10]``.
    """
    n = int(n)
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if n == 0:
        return []
    if not max_batch or max_batch <= 0:
        return [slice(0, n)]
    step = int(max_batch)
    return [slice(s, min(s + step, n)) for s in range(0, n, step)]


# ---------------------------------------------------------------------- dtype mapping
#: TensorRT DataType member names -> torch dtype names (strings, so no import is needed)
_TRT_TO_TORCH = {
    "FLOAT": "float32", "HALF": "float16", "BF16": "bfloat16", "INT8": "int8", "INT32": "int32",
    "INT64": "int64", "BOOL": "bool", "UINT8": "uint8", "FP8": "float8_e4m3fn",
}
#: I/O types a visual-trunk engine may have: float32 (our exports keep float32 I/O) or float16
ENGINE_IO_TYPES = ("FLOAT", "HALF")


def _trt_name(dtype: Any) -> str:
    name = getattr(dtype, "name", None) or str(dtype)
    name = name.split(".")[-1].upper()
    return name


def trt_dtype_to_torch(dtype: Any):
    """``tensorrt.DataType`` (or its name, ``"HALF"``) -> ``torch.dtype``; TypeError if unsupported."""
    import torch

    name = _trt_name(dtype)
    if name not in _TRT_TO_TORCH or not hasattr(torch, _TRT_TO_TORCH[name]):
        raise TypeError(f"TensorRT dtype {name} has no torch equivalent here")
    return getattr(torch, _TRT_TO_TORCH[name])


def engine_io_dtypes(input_dtype: Any, output_dtype: Any) -> Tuple[Any, Any]:
    """torch dtypes of an engine's ``views`` input and ``features`` output tensors.

    Args:
        input_dtype, output_dtype: ``engine.get_tensor_dtype(name)`` (``tensorrt.DataType``) or
            their member names (``"FLOAT"``, ``"HALF"``).

    Returns:
        ``(torch input dtype, torch output dtype)``: :class:`TensorRTBackend` casts the views to the
        first and allocates the output buffer with the second.

    Raises:
        EngineMismatchError: an I/O tensor is not float32/float16 (an int8-I/O or foreign engine:
            feeding it float views would be silently wrong).
    """
    out = []
    for role, dt in (("input 'views'", input_dtype), ("output 'features'", output_dtype)):
        name = _trt_name(dt)
        if name not in ENGINE_IO_TYPES:
            raise EngineMismatchError(f"engine {role} has TensorRT type {name}; a visual-trunk engine needs "
                                      f"{' or '.join(ENGINE_IO_TYPES)} I/O. Rebuild it with `runa-ood build-engine`.")
        out.append(trt_dtype_to_torch(name))
    return out[0], out[1]
