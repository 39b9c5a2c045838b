"""Where runa_ood_node keeps caches and finds calibration artefacts.

Nothing here touches the network or ROS. All functions return :class:`pathlib.Path` objects and
never create directories except :func:`cache_dir` (which is created on demand, because every caller
of it wants to write).

Environment variables
---------------------
``RUNA_OOD_CACHE_DIR``
    Root of writable caches (text embeddings, file hashes, engines). Default
    ``~/.cache/runa_ood_node``.
``RUNA_OOD_DATA_PACK``
    An annotation file (COCO-style or the ood_pack's ``annotations.json``) the tools and the
    backends' measurement samples use when no ``--annotations`` is given. Unset: none (nothing
    guesses a path; ``scripts/env.sh`` sets it in a development checkout with the pack beside it).
``RUNA_OOD_CALIBRATION_DIR``
    Directory holding label sets, thresholds and projection pointers. Default: the repository's
    ``calibration/`` folder when running from a source checkout, else the installed
    ``share/runa_ood_node/calibration`` found through ``ament_index_python``.
"""
from __future__ import annotations

import os
import pathlib
from typing import Iterable, Optional, Sequence, Union

PACKAGE_NAME = "runa_ood_node"
CACHE_ENV = "RUNA_OOD_CACHE_DIR"
CALIBRATION_ENV = "RUNA_OOD_CALIBRATION_DIR"
DATA_PACK_ENV = "RUNA_OOD_DATA_PACK"

PathLike = Union[str, os.PathLike]


def cache_dir(create: bool = True) -> pathlib.Path:
    """Root directory for writable caches.

    ``$RUNA_OOD_CACHE_DIR`` if set, else ``~/.cache/runa_ood_node``. Created (with parents) when
    ``create`` is true.
    """
    env = os.environ.get(CACHE_ENV)
    root = pathlib.Path(env).expanduser() if env else pathlib.Path.home() / ".cache" / PACKAGE_NAME
    if create:
        root.mkdir(parents=True, exist_ok=True)
    return root


def data_pack_annotations() -> Optional[pathlib.Path]:
    """The annotation file named by ``$RUNA_OOD_DATA_PACK`` (None when unset or empty)."""
    env = os.environ.get(DATA_PACK_ENV, "").strip()
    return pathlib.Path(env).expanduser() if env else None


def _repo_calibration_dir() -> pathlib.Path:
    # runa_ood_node/core/paths.py -> parents[2] is the repository root in a source checkout.
    return pathlib.Path(__file__).resolve().parents[2] / "calibration"


def _installed_calibration_dir() -> Optional[pathlib.Path]:
    try:
        from ament_index_python.packages import get_package_share_directory  # type: ignore
    except Exception:  # ament_index not importable outside a ROS environment
        return None
    try:
        path = pathlib.Path(get_package_share_directory(PACKAGE_NAME)) / "calibration"
    except Exception:  # package not installed in any prefix on AMENT_PREFIX_PATH
        return None
    return path if path.is_dir() else None


def calibration_dir() -> pathlib.Path:
    """Directory that holds calibration artefacts (label sets, thresholds, projections).

    Resolution order: ``$RUNA_OOD_CALIBRATION_DIR``; the source checkout's ``calibration/`` (the
    parent of the package) if it exists; the installed ``share/runa_ood_node/calibration`` via
    ``ament_index_python``. When none exists the repository path is returned anyway, so error
    messages can name it.
    """
    env = os.environ.get(CALIBRATION_ENV)
    if env:
        return pathlib.Path(env).expanduser()
    repo = _repo_calibration_dir()
    if repo.is_dir():
        return repo
    installed = _installed_calibration_dir()
    if installed is not None:
        return installed
    return repo


def resolve_calibration_file(name_or_path: PathLike, suffix: Union[str, Sequence[str]] = "") -> pathlib.Path:
    """Find a calibration artefact given either a path or a bare name.

    Tried in order: ``name_or_path`` as given (absolute or relative to the working directory),
    then ``calibration_dir()/name_or_path``, each also with every suffix in ``suffix`` appended
    (e.g. ``suffix=(".yaml", ".yml")`` lets users write ``bdd_custom`` for
    ``calibration/bdd_custom.yaml``). Directories are accepted too (projection folders).

    Raises:
        FileNotFoundError: listing every place that was tried.
    """
    suffixes: Iterable[str] = [suffix] if isinstance(suffix, str) else list(suffix)
    raw = pathlib.Path(os.fspath(name_or_path)).expanduser()
    bases = [raw]
    if not raw.is_absolute():
        bases.append(calibration_dir() / raw)
    tried = []
    for base in bases:
        candidates = [base] + [base.with_name(base.name + s) for s in suffixes if s and not base.name.endswith(s)]
        for cand in candidates:
            tried.append(str(cand))
            if cand.exists():
                return cand
    raise FileNotFoundError(
        f"calibration file {os.fspath(name_or_path)!r} not found; tried: {', '.join(tried)} "
        f"(set ${CALIBRATION_ENV} to point at another calibration directory)"
    )
