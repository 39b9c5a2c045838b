"""The shared CLIP encoder every method reads (``DualEncoder``, named after RUNA's two views), on an open_clip ViT.

The views (see :mod:`views`) go through the visual *trunk* (everything up to and including ``ln_post``
and the [CLS] pooling, i.e. the tower without its final projection), giving pre-projection features of
size ``width`` (and the other backbone outputs, :mod:`backbone`). The model's projection ``P_g``
(``proj_global``, the off-the-shelf ``visual.proj``) is applied outside the trunk by the methods; a
method's own trained projections are its head's, not this encoder's (RUNA's fine-tuned regional
projection ``P_r``: ``core.methods.runa``). Keeping projections out of the trunk means one exported
ONNX/TensorRT trunk serves every fine-tune (:meth:`set_backend` swaps the trunk implementation).

Tensor conventions: every tensor returned by this class is float32 on the CPU (features,
projections, embeddings); the trunk itself runs on ``device`` in the model's precision.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import pathlib
import threading
from typing import Callable, Dict, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .backbone import backbone_forward, output_set, serve_outputs
from .backbone import grid_size as _grid_size
from .paths import cache_dir

LOG = logging.getLogger(__name__)

MODEL_CONFIG_DIR = pathlib.Path(__file__).resolve().parent / "model_configs"
_CONFIGS_REGISTERED = False
_REGISTER_LOCK = threading.Lock()

#: a visual backend: ``views -> [B, width]``; one with an ``outputs(views, names, pairs)`` method
#: (``backends.base.VisualBackend``) serves every output set of :meth:`DualEncoder.visual_outputs`
Backend = Callable[[torch.Tensor], torch.Tensor]


#: seed of every randomly initialised model (tests, demos and benchmarks of speed only)
RANDOM_WEIGHTS_SEED = 0


class WeightsUnavailableError(RuntimeError):
    """Pretrained weights could not be loaded (offline, unknown tag, missing file) and random
    weights were not allowed."""


def register_model_configs() -> None:
    """Register this package's extra open_clip model configs (``core/model_configs/*.json``) once."""
    global _CONFIGS_REGISTERED
    with _REGISTER_LOCK:
        if _CONFIGS_REGISTERED:
            return
        import open_clip

        if MODEL_CONFIG_DIR.is_dir():
            open_clip.add_model_config(MODEL_CONFIG_DIR)
        _CONFIGS_REGISTERED = True


#: registered weights names (``pretrained: <name>``) -> {model: checkpoint file relative to the calibration
#: directory}. The file loads as any checkpoint path does (weights id = the file's sha256).
REGISTERED_WEIGHTS: Dict[str, Dict[str, str]] = {
    # the CLIP trained in the proving-ground world (runa_ood_node/proving_ground/clip_train.py)
    "proving-ground": {"runa-pg-vit": "proving_ground/runa-pg-vit.pt"},
}


def registered_weights_file(name: str, model_name: str) -> pathlib.Path:
    """The checkpoint file of a registered weights name (:data:`REGISTERED_WEIGHTS`) for ``model_name``.

    Looked up in ``paths.calibration_dir()`` (``$RUNA_OOD_CALIBRATION_DIR``, the source checkout's
    ``calibration/``, the installed ``share/runa_ood_node/calibration``), then in the source checkout's
    and the installed calibration folders (a calibration directory of one's own need not copy it).

    Raises:
        WeightsUnavailableError: the name is not registered for this model, or the file is missing
            (every place tried is named).
    """
    from .paths import _installed_calibration_dir, _repo_calibration_dir, calibration_dir

    models = REGISTERED_WEIGHTS.get(name.strip().lower())
    if models is None:
        raise WeightsUnavailableError(f"{name!r} is not a registered weights name ({sorted(REGISTERED_WEIGHTS)})")
    rel = models.get(model_name.replace("/", "-"))
    if rel is None:
        raise WeightsUnavailableError(
            f"pretrained={name!r} names weights of {sorted(models)}, not of model {model_name!r}; use "
            + " or ".join(f"model: {m}" for m in sorted(models)))
    tried = []
    for root in (calibration_dir(), _repo_calibration_dir(), _installed_calibration_dir()):
        if root is None:
            continue
        cand = root / rel
        if str(cand) in tried:
            continue
        tried.append(str(cand))
        if cand.is_file():
            return cand
    raise WeightsUnavailableError(
        f"the checkpoint of pretrained={name!r} (model {model_name!r}) is missing; tried {', '.join(tried)}. It is "
        "committed in the repository's calibration/ folder and installed with the package (colcon build); "
        "remake it with `runa-ood proving-ground train`, or pass pretrained=<path to the file>.")


def _how_to_provide(model_name: str) -> str:
    return (
        f"Provide weights for {model_name!r} by passing pretrained=<path to a local open_clip checkpoint "
        "(.pt/.bin/.safetensors)>, or run once on a machine with internet access with the same tag so "
        "the open_clip / Hugging Face cache (HF_HOME, ~/.cache/huggingface) is filled, then copy that "
        "cache to this machine. For tests only, allow_random=True builds random weights (meaningless scores)."
    )


def env_offline() -> bool:
    """True when RUNA_OOD_OFFLINE or HF_HUB_OFFLINE is set: never try to download weights."""
    return any(os.environ.get(k, "").strip().lower() in ("1", "true", "yes", "on")
               for k in ("RUNA_OOD_OFFLINE", "HF_HUB_OFFLINE"))


def find_cached_tag_weights(arch: str, tag: str) -> Optional[str]:
    """Local file of an open_clip pretrained tag if it is already cached, else None. No network.

    Looks where open_clip's own download would have put it: the Hugging Face hub cache
    (``HF_HUB_CACHE``/``HF_HOME``; safetensors preferred, as open_clip does) and, for URL-only
    tags, ``~/.cache/clip/<file>``.
    """
    import open_clip

    cfg = open_clip.get_pretrained_cfg(arch, tag)
    if not cfg:
        return None
    if cfg.get("file") and os.path.isfile(cfg["file"]):
        return cfg["file"]
    hub = cfg.get("hf_hub", "")
    if hub:
        try:
            from huggingface_hub import try_to_load_from_cache
        except ImportError:
            try_to_load_from_cache = None
        if try_to_load_from_cache is not None:
            # open_clip's convention: "org/repo/" (default file name) or "org/repo/file.bin"
            repo_id, filename = os.path.split(hub)
            filename = filename or "open_clip_pytorch_model.bin"
            names = (["open_clip_model.safetensors"] if filename == "open_clip_pytorch_model.bin" else
                     [filename[:-4] + ".safetensors"] if filename.endswith((".bin", ".pth")) else []) + [filename]
            for name in names:
                try:
                    found = try_to_load_from_cache(repo_id, name)
                except Exception:  # malformed cache entries must not crash loading
                    found = None
                if isinstance(found, str) and os.path.isfile(found):
                    return found
    url = cfg.get("url", "")
    if url:
        cand = os.path.join(os.path.expanduser("~/.cache/clip"), os.path.basename(url))
        if os.path.isfile(cand):
            return cand
    return None


def _check_model_name(model_name) -> Tuple[str, bool]:
    """``(arch, has_schema)`` of an open_clip model name (``hf-hub:`` / ``local-dir:`` schemas pass as they
    are); ValueError for an unknown one."""
    import open_clip

    if not isinstance(model_name, str) or not model_name:
        raise ValueError(f"model_name must be a non-empty string, got {model_name!r}")
    has_schema = model_name.startswith(("hf-hub:", "local-dir:"))
    arch = model_name.replace("/", "-")
    if not has_schema and arch not in open_clip.list_models():
        raise ValueError(f"unknown open_clip model {model_name!r}; known ViT models include "
                         f"{[m for m in open_clip.list_models() if m.startswith('ViT-')][:12]} ... "
                         "and this package's configs in core/model_configs")
    return arch, has_schema


def _schema_source(model_name: str, allow_download: bool) -> Tuple[str, Dict]:
    """``(weights_id, create_model kwargs)`` of an ``hf-hub:`` / ``local-dir:`` model."""
    if model_name.startswith("hf-hub:") and not allow_download:
        # open_clip fetches hf-hub models over the network (even to check its cache)
        raise WeightsUnavailableError(
            f"{model_name!r} is a Hugging Face hub model and downloading is disabled "
            "(allow_download=False or RUNA_OOD_OFFLINE/HF_HUB_OFFLINE set); download it once into a "
            "folder and use 'local-dir:<folder>' instead. " + _how_to_provide(model_name))
    return f"schema:{model_name}", {}


def _weights_source(model_name: str, arch: str, pretrained: str, allow_download: bool) -> Tuple[str, Dict]:
    """``(weights_id, create_model kwargs)`` of ``pretrained``: a registered name, a checkpoint file or an
    open_clip tag (:func:`_tag_source`); WeightsUnavailableError when it is none of them."""
    import open_clip

    if pretrained.strip().lower() in REGISTERED_WEIGHTS:
        path = registered_weights_file(pretrained, arch)
        return f"file:{file_sha256(path, memo=True)}", {"pretrained": str(path)}
    path = pathlib.Path(pretrained).expanduser()
    known_tags = open_clip.list_pretrained_tags_by_model(arch)
    looks_like_path = os.sep in pretrained or pretrained.endswith((".pt", ".pth", ".bin", ".safetensors", ".ckpt"))
    if path.is_file():
        return f"file:{file_sha256(path, memo=True)}", {"pretrained": str(path)}
    if looks_like_path or pretrained.lower() not in [t.lower() for t in known_tags]:
        where = "checkpoint file not found" if looks_like_path else \
            f"not an existing file nor a known open_clip tag for {arch} (tags: {known_tags})"
        raise WeightsUnavailableError(f"cannot load weights {pretrained!r}: {where}. " + _how_to_provide(model_name))
    tag = next(t for t in known_tags if t.lower() == pretrained.lower())
    return _tag_source(model_name, arch, tag, allow_download)


def _tag_source(model_name: str, arch: str, tag: str, allow_download: bool) -> Tuple[str, Dict]:
    """``(weights_id, create_model kwargs)`` of an open_clip tag: from the local cache when it is there,
    else a download (refused when not allowed)."""
    import open_clip

    weights_id = f"tag:{tag}"
    tag_cfg = open_clip.get_pretrained_cfg(arch, tag)
    # open_clip only *warns* when a tag was trained with QuickGELU (OpenAI weights) and the
    # architecture name lacks "-quickgelu"; the activations would then be wrong. Force it.
    quick_gelu = bool(tag_cfg.get("quick_gelu", False))
    if quick_gelu:
        weights_id += "|quickgelu"
    cached = find_cached_tag_weights(arch, tag)
    if cached is not None:
        # Same result as open_clip's tag path (preprocessing of the tag), but straight
        # from the cache: no HEAD requests and retries when offline.
        LOG.info("loading %s/%s from cached file %s", arch, tag, cached)
        return weights_id, {"pretrained": cached, "force_quick_gelu": quick_gelu,
                            "force_preprocess_cfg": {k: tag_cfg[k] for k in ("mean", "std", "interpolation",
                                                                            "resize_mode") if k in tag_cfg}}
    if not allow_download:
        raise WeightsUnavailableError(
            f"weights for {model_name!r} tag {tag!r} are not in the local cache and downloading is "
            "disabled (allow_download=False or RUNA_OOD_OFFLINE/HF_HUB_OFFLINE set). "
            + _how_to_provide(model_name))
    return weights_id, {"pretrained": tag, "force_quick_gelu": quick_gelu}


def file_sha256(path: Union[str, os.PathLike], chunk: int = 1 << 22, memo: bool = False) -> str:
    """sha256 hex digest of a file's bytes: the one file hash of the package (weights files here,
    ONNX graphs for engine keys and int8 sidecars in ``backends``).

    ``memo=True`` remembers it in ``cache_dir()/file_hashes.json`` by (path, size, mtime_ns), so a
    multi-GB checkpoint is hashed once (a read-only cache just hashes again next time).
    """
    path = pathlib.Path(path)
    key = memo_path = None
    memo_data: Dict[str, str] = {}
    if memo:
        st = path.stat()
        key = f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}"
        memo_path = cache_dir() / "file_hashes.json"
        try:
            memo_data = json.loads(memo_path.read_text())
        except (OSError, ValueError):
            memo_data = {}
        if key in memo_data:
            return memo_data[key]
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    digest = h.hexdigest()
    if memo:
        memo_data[key] = digest
        try:
            tmp = memo_path.with_suffix(f".tmp{os.getpid()}")
            tmp.write_text(json.dumps(memo_data))
            os.replace(tmp, memo_path)
        except OSError:  # read-only cache: hashing again next time is fine
            pass
    return digest


def state_dict_sha256(module: nn.Module) -> str:
    """sha256 hex digest over the names, shapes and float32 values of a module's state dict: the one
    weights hash (random weights' id here, ``backends.base.ModelInfo.weights_hash`` = its first 16 hex)."""
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()


class VisualTrunk(nn.Module):
    """open_clip ``VisionTransformer`` without its projection: views ``[B,3,S,S]`` -> ``[B,width]``.

    Shares parameters with the CLIP model (no copy, no mutation): it re-runs the tower's own
    ``_embeds -> transformer -> _pool`` steps and skips ``@ proj``. The output is the pooled token
    after ``ln_post`` (the [CLS] token for OpenAI-style ViTs). Suitable for ONNX export.
    """

    def __init__(self, visual: nn.Module):
        super().__init__()
        self.visual = visual

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        v = self.visual
        x = v._embeds(x)
        x = v.transformer(x)
        pooled, _ = v._pool(x)
        return pooled

    def outputs(self, x: torch.Tensor, names: Sequence[str], pairs: Optional[torch.Tensor] = None
                ) -> Dict[str, torch.Tensor]:
        """The named backbone outputs (:func:`backbone.backbone_forward`; ``cls`` equals :meth:`forward`)."""
        return backbone_forward(self.visual, x, output_set(names), pairs)


class DualEncoder:
    """RUNA's dual image encoder plus the CLIP text tower for the ID prompts.

    Build with :meth:`load`. Attributes (read-only by convention):

    * ``model_name``, ``pretrained``: what was loaded (``pretrained`` is the tag, path, or None).
    * ``input_size`` (S, px), ``mean``, ``std`` (RGB, for [0,1] inputs): preprocessing of views.
    * ``width``: pre-projection feature size; ``embed_dim`` (D): joint embedding size.
    * ``proj_global``: float32 CPU ``[width, D]``, the model's projection (a method's own projections,
      RUNA's fine-tuned ``P_r``, are its head's: ``core.methods``).
    * ``random_weights``: True when weights are random (tests only; scores are meaningless).
    * ``model_id``: stable string identifying architecture + weights (for caches and engines).
    * ``visual_trunk``: :class:`VisualTrunk` (torch module, on ``device``, eval mode).
    * ``backend_name``: ``"torch"`` or the name of the backend given to :meth:`set_backend`.
    """

    def __init__(self, model: nn.Module, tokenizer, model_name: str, pretrained: Optional[str], device: str,
                 random_weights: bool, weights_id: str, precision: str = "fp32"):
        import open_clip

        visual = getattr(model, "visual", None)
        if not isinstance(visual, open_clip.transformer.VisionTransformer) or not isinstance(
                getattr(visual, "proj", None), torch.Tensor):
            raise ValueError(
                f"model {model_name!r} has a {type(visual).__name__} visual tower; runa_ood_node needs an open_clip "
                "VisionTransformer with a linear projection `visual.proj` (ViT-B-32, ViT-B-16, ViT-L-14, ...). "
                "timm/ConvNeXt/ResNet towers are not supported."
            )
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.model_name = model_name
        self.pretrained = pretrained
        self.device = torch.device(device)
        self.precision = precision
        self.random_weights = bool(random_weights)
        self.model_id = hashlib.sha256(f"{model_name}|{weights_id}".encode()).hexdigest()[:16]
        self.weights_id = weights_id

        size = visual.image_size
        if isinstance(size, (tuple, list)):
            if size[0] != size[1]:
                raise ValueError(f"only square image inputs are supported, {model_name!r} has {size}")
            size = size[0]
        self.input_size = int(size)
        pp = getattr(visual, "preprocess_cfg", None) or {}
        self.mean = tuple(float(v) for v in (pp.get("mean") or getattr(visual, "image_mean", None) or open_clip.OPENAI_DATASET_MEAN))
        self.std = tuple(float(v) for v in (pp.get("std") or getattr(visual, "image_std", None) or open_clip.OPENAI_DATASET_STD))

        self.proj_global = visual.proj.detach().to("cpu", torch.float32).clone()
        self.width, self.embed_dim = (int(d) for d in self.proj_global.shape)
        self.visual_trunk = VisualTrunk(visual).eval()
        self._backend: Optional[Backend] = None
        self.backend_name = "torch"
        self._text_cache: Dict[str, torch.Tensor] = {}
        self.text_encode_calls = 0  # number of text-tower runs (for diagnostics and cache tests)
        self._check_trunk()

    # ------------------------------------------------------------------ construction
    @classmethod
    def load(cls, model_name: str, pretrained: Optional[str] = None, device: str = "cpu",
             allow_random: bool = False, precision: str = "fp32", backend: Optional[Backend] = None,
             allow_download: Optional[bool] = None, random_seed: int = RANDOM_WEIGHTS_SEED) -> "DualEncoder":
        """Load an open_clip ViT for RUNA.

        Args:
            model_name: open_clip architecture (``"ViT-B-16"``) or one of this package's configs
                (``"runa-tiny-vit"``); see ``open_clip.list_models()``.
            pretrained: an open_clip tag (``"openai"``, ``"laion2b_s34b_b88k"``...), a path to a
                local checkpoint file, a registered name (:data:`REGISTERED_WEIGHTS`:
                ``"proving-ground"`` with ``runa-pg-vit``), or None for no pretrained weights.
            device: torch device for the trunk and text tower (``"cpu"``, ``"cuda"``).
            allow_random: when ``pretrained`` is None, build randomly initialised weights (tests,
                benchmarks of speed only). Never used as a silent fallback for failed loading.
            precision: open_clip precision (``"fp32"``, ``"fp16"``, ``"bf16"``...).
            backend: optional visual backend callable, as for :meth:`set_backend`.
            allow_download: for a tag whose weights are not cached locally, let open_clip try to
                download them (without network that costs about a minute of retries before
                failing). None = allowed unless ``RUNA_OOD_OFFLINE=1`` or ``HF_HUB_OFFLINE=1``.
                Cached tag weights are always loaded from the cache without touching the network.
            random_seed: seed of random weights (``allow_random``). Drawn inside a forked RNG, so
                every process that asks for the same model and seed gets the same random model.

        OpenAI weights use QuickGELU. For a tag, this loader forces QuickGELU when the tag says so
        (open_clip itself only warns about the mismatch). For a local *file* of OpenAI weights,
        name the ``-quickgelu`` architecture (``ViT-B-16-quickgelu``), or activations are wrong.

        Raises:
            WeightsUnavailableError: weights cannot be loaded (unknown tag, missing file, offline),
                or ``pretrained`` is None and ``allow_random`` is False. The message says how to
                provide weights.
            ValueError: unknown model name or a non-ViT visual tower.
        """
        import open_clip

        register_model_configs()
        arch, has_schema = _check_model_name(model_name)
        if pretrained is not None and not isinstance(pretrained, (str, os.PathLike)):
            raise ValueError(f"pretrained must be a tag, a path or None, got {pretrained!r}")
        pretrained = os.fspath(pretrained) if pretrained is not None else None
        if pretrained == "":
            pretrained = None
        if allow_download is None:
            allow_download = not env_offline()
        random_weights = False
        if has_schema:
            weights_id, kwargs = _schema_source(model_name, allow_download)
        elif pretrained is None:
            if not allow_random:
                raise WeightsUnavailableError(
                    f"no pretrained weights requested for {model_name!r} (pretrained=None) and allow_random=False. "
                    + _how_to_provide(model_name))
            random_weights = True
            weights_id, kwargs = None, {"pretrained": None}  # the id from the state dict below
        else:
            weights_id, kwargs = _weights_source(model_name, arch, pretrained, allow_download)
        try:
            # Random weights are always drawn with seed RANDOM_WEIGHTS_SEED inside a forked RNG, so
            # the node, the tools and the tests build the *same* random model (their scores can be
            # compared) without disturbing the caller's RNG.
            with torch.random.fork_rng(devices=[]):
                if random_weights:
                    torch.manual_seed(int(random_seed))
                model = open_clip.create_model(model_name, device=device, precision=precision,
                                               pretrained_text=False, **kwargs)
        except Exception as exc:  # download failures, corrupt files, state-dict mismatches
            if random_weights:
                raise
            raise WeightsUnavailableError(
                f"loading {model_name!r} with pretrained={pretrained!r} failed: {type(exc).__name__}: {exc}. "
                + _how_to_provide(model_name)) from exc
        tokenizer = open_clip.get_tokenizer(model_name)
        if random_weights:
            weights_id = f"random-seed:{state_dict_sha256(model)}"
            LOG.warning("DualEncoder %s uses RANDOM weights: OOD scores are meaningless (tests only)", model_name)
        enc = cls(model, tokenizer, model_name, pretrained, device, random_weights, weights_id, precision)
        if backend is not None:
            enc.set_backend(backend)
        return enc

    def _check_trunk(self) -> None:
        """Verify once that trunk(x) @ proj reproduces the tower's own output (API drift guard)."""
        S = self.input_size
        gen = torch.Generator().manual_seed(0)
        x = torch.randn((1, 3, S, S), generator=gen).to(self.device, self._trunk_dtype())
        with torch.no_grad():
            ref = self.model.visual(x)
            if isinstance(ref, tuple):
                ref = ref[0]
            ours = self.visual_trunk(x) @ self.model.visual.proj
        tol = 1e-4 if self._trunk_dtype() == torch.float32 else 5e-2
        if not torch.allclose(ref.float(), ours.float(), atol=tol, rtol=tol):
            raise RuntimeError(f"the visual trunk of {self.model_name!r} does not reproduce open_clip's output "
                               "(unsupported open_clip version or pooling); please report")

    def _trunk_dtype(self) -> torch.dtype:
        return self.model.visual.conv1.weight.dtype

    # ------------------------------------------------------------------ visual side
    def set_backend(self, backend: Optional[Backend], name: Optional[str] = None) -> None:
        """Use ``backend`` (callable ``views [B,3,S,S] f32 -> features [B,width]``) for the trunk.

        ``None`` restores the built-in torch trunk. The backend must produce the same features as
        :attr:`visual_trunk` (e.g. an ONNX Runtime or TensorRT export of it).
        """
        self._backend = backend
        self.backend_name = "torch" if backend is None else (name or getattr(backend, "name", None) or type(backend).__name__)

    @property
    def grid_size(self) -> int:
        """G, the patch grid side (``T = 1 + G*G`` tokens; patches row-major after the CLS token)."""
        return _grid_size(self.model.visual)

    @property
    def num_tokens(self) -> int:
        """T = 1 + G*G: tokens per view (the CLS token and the patches)."""
        return 1 + self.grid_size ** 2

    def _torch_trunk(self, views: torch.Tensor) -> torch.Tensor:
        return self._torch_outputs(views, ("cls",), None)["cls"]

    def _torch_outputs(self, views: torch.Tensor, names, pairs: Optional[torch.Tensor]) -> Dict[str, torch.Tensor]:
        dev = self.device
        with torch.no_grad():
            return self.visual_trunk.outputs(views.to(dev, self._trunk_dtype()), names,
                                             None if pairs is None else pairs.to(dev))

    def _outputs_runner(self, names):
        """``(views, names, pairs) -> dict`` of the active backend (the torch trunk when none is set)."""
        backend = self._backend
        if backend is None:
            return self._torch_outputs
        outputs = getattr(backend, "outputs", None)
        if callable(outputs):
            return lambda v, n, p: outputs(v, n, p)
        if tuple(names) != ("cls",):
            raise RuntimeError(f"visual backend {self.backend_name!r} is a plain callable (views -> cls features) "
                               f"and cannot give the backbone outputs {tuple(names)}; use a backends.VisualBackend")
        return lambda v, n, p: {"cls": backend(v)}

    def visual_outputs(self, views: torch.Tensor, outputs: Sequence[str], pairs: Optional[torch.Tensor] = None,
                       max_batch: Optional[int] = None) -> Dict[str, torch.Tensor]:
        """Named outputs of ONE backbone pass over a batch of normalised views (see :mod:`backbone`).

        Args:
            views: float32 ``[B,3,S,S]`` (see :mod:`views`). B may be 0.
            outputs: names from ``registry.BACKBONE_OUTPUTS``: ``cls`` ``[B,W]`` (= :meth:`visual_features`),
                ``tokens`` ``[B,T,W]`` (after ``ln_post``, not projected), ``attn_cls`` ``[B,T]`` (CLS->token
                attention averaged over layers and heads), ``xattn`` ``[P,T]`` (needs ``pairs``).
            pairs: integer ``[P,2]`` (query view, key view) indices into this batch, for ``xattn``.
            max_batch: split into calls of at most this many views (pairs stay within one call).

        Returns:
            ``{name: float32 CPU tensor}`` for exactly the names asked for.

        Raises:
            ValueError: wrong view shape, unknown output, missing / bad pairs; RuntimeError (or
            whatever the backend raises) on failure; a backend returning a wrong shape raises RuntimeError.
        """
        S = self.input_size
        if not isinstance(views, torch.Tensor):
            views = torch.as_tensor(np.asarray(views), dtype=torch.float32)
        if views.ndim != 4 or tuple(views.shape[1:]) != (3, S, S):
            size = int(views.shape[-1]) if views.ndim == 4 else 0
            patch = S // self.grid_size
            # a larger square size (a multiple of the patch): the torch trunk only, positional embeddings
            # interpolated (backbone.backbone_forward); the exported graphs are traced at S
            if not (views.ndim == 4 and tuple(views.shape[1:]) == (3, size, size) and size > S
                    and size % patch == 0 and self._backend is None):
                raise ValueError(f"views must be [B,3,{S},{S}] (larger square sizes, multiples of {patch}, on the "
                                 f"torch backend only; this one is {self.backend_name!r}), got {tuple(views.shape)}")
        names = output_set(outputs)
        T, W = 1 + (int(views.shape[-1]) // (S // self.grid_size)) ** 2, self.width
        run = self._outputs_runner(names)
        views = views.float().contiguous()
        out = serve_outputs(run, views, names, pairs, max_batch, T, W)
        B = int(views.shape[0])
        P = 0 if "xattn" not in names else int(out["xattn"].shape[0])
        shapes = {"cls": (B, W), "tokens": (B, T, W), "attn_cls": (B, T), "xattn": (P, T)}
        res: Dict[str, torch.Tensor] = {}
        for n in names:
            t = out[n]
            if not isinstance(t, torch.Tensor):
                t = torch.as_tensor(np.asarray(t))
            t = t.detach().to("cpu", torch.float32)
            if tuple(t.shape) != shapes[n]:
                raise RuntimeError(f"visual backend {self.backend_name!r} returned shape {tuple(t.shape)} for "
                                   f"{n!r}, expected {shapes[n]}")
            res[n] = t
        return res

    def visual_features(self, views: torch.Tensor, max_batch: Optional[int] = None) -> torch.Tensor:
        """Pre-projection features of a batch of normalised views: ``visual_outputs(views, ("cls",))["cls"]``.

        Args:
            views: float32 ``[B,3,S,S]`` (see :mod:`views`). B may be 0.
            max_batch: split into chunks of at most this many views (None = one call).

        Returns:
            float32 CPU ``[B, width]``.

        Raises:
            ValueError: wrong view shape; RuntimeError (or whatever the backend raises) on failure;
            a backend returning the wrong shape raises RuntimeError.
        """
        return self.visual_outputs(views, ("cls",), max_batch=max_batch)["cls"]

    # ------------------------------------------------------------------ text side
    def _text_key(self, prompts: Sequence[Sequence[str]]) -> str:
        blob = json.dumps({"model_id": self.model_id, "prompts": [list(p) for p in prompts]}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:32]

    def text_cache_path(self, label_set) -> pathlib.Path:
        """Disk cache file for a label set's text embeddings."""
        return cache_dir() / "text" / f"{self._text_key(label_set.prompts())}.pt"

    def _encode_prompts(self, prompts: Sequence[Sequence[str]], chunk: int = 256) -> torch.Tensor:
        flat = [p for group in prompts for p in group]
        embs = []
        with torch.no_grad():
            for start in range(0, len(flat), chunk):
                tokens = self.tokenizer(flat[start:start + chunk]).to(self.device)
                e = self.model.encode_text(tokens)
                embs.append(F.normalize(e.float(), dim=-1).cpu())
        self.text_encode_calls += 1
        all_e = torch.cat(embs, 0)
        out, pos = [], 0
        for group in prompts:
            mean = all_e[pos:pos + len(group)].mean(0)
            out.append(mean / mean.norm().clamp_min(1e-12))
            pos += len(group)
        return torch.stack(out).to(torch.float32)

    def text_embeddings(self, label_set) -> torch.Tensor:
        """L2-normalised text embeddings ``[K, D]`` (float32 CPU) of a :class:`labels.LabelSet`
        (or a built-in name / YAML path, see :func:`labels.load_label_set`).

        Each label's embedding is the mean of its prompts' normalised embeddings (templates x
        names), renormalised. Cached in memory and on disk under
        ``cache_dir()/text/<sha256(model_id, prompts)>.pt``, so a second call, or a fresh encoder
        with the same ``model_id``, does not run the text tower. A corrupt cache file is ignored
        and rewritten.
        """
        if not hasattr(label_set, "prompts"):
            from .labels import load_label_set

            label_set = load_label_set(label_set)
        prompts = label_set.prompts()
        key = self._text_key(prompts)
        if key in self._text_cache:
            return self._text_cache[key].clone()
        path = cache_dir() / "text" / f"{key}.pt"
        emb = None
        if path.is_file():
            try:
                blob = torch.load(path, map_location="cpu", weights_only=True)
                cand = blob["embeddings"]
                if (blob.get("model_id") == self.model_id and blob.get("prompts") == [list(p) for p in prompts]
                        and tuple(cand.shape) == (len(prompts), self.embed_dim) and torch.isfinite(cand).all()):
                    emb = cand.to(torch.float32)
                else:
                    LOG.warning("text embedding cache %s does not match; recomputing", path)
            except Exception as exc:  # corrupt / truncated / old format
                LOG.warning("ignoring unreadable text embedding cache %s: %s", path, exc)
        if emb is None:
            emb = self._encode_prompts(prompts)
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                tmp = path.with_suffix(f".tmp{os.getpid()}")
                torch.save({"model_id": self.model_id, "label_set": label_set.name,
                            "prompts": [list(p) for p in prompts], "embeddings": emb}, tmp)
                os.replace(tmp, path)
            except OSError as exc:
                LOG.warning("could not write text embedding cache %s: %s", path, exc)
        self._text_cache[key] = emb
        return emb.clone()

    def describe(self) -> dict:
        """Summary for logs/diagnostics."""
        return {"model_name": self.model_name, "pretrained": self.pretrained, "model_id": self.model_id,
                "random_weights": self.random_weights, "input_size": self.input_size, "width": self.width,
                "embed_dim": self.embed_dim, "device": str(self.device), "precision": self.precision,
                "backend": self.backend_name}
