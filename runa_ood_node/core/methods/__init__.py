"""OOD methods behind one seam (``base.Method``), one file each; the registry of their names.

``get_method(name)`` -> the method class for a name of ``core.registry.METHODS``:

========== ===================================================== ==========================================
name       file                                                   what it needs trained
========== ===================================================== ==========================================
``runa``   ``runa.py``  (paper 001, the default)                  nothing (optional regional projection)
``uni-ood`` ``uni_ood.py`` (paper 002, CVPR 2026)                 the target / background combiners
``tagood`` ``tagood.py`` (paper 003, adapted to detector boxes)   projection model + class centres
========== ===================================================== ==========================================
"""
from __future__ import annotations

import importlib
from typing import Type

from ..registry import DEFAULT_METHOD, METHODS
from .base import Method

__all__ = ["METHODS", "DEFAULT_METHOD", "Method", "get_method", "make_method"]

_MODULES = {"runa": ("runa", "RunaMethod"), "uni-ood": ("uni_ood", "UniOodMethod"), "tagood": ("tagood", "TagOodMethod")}


def get_method(name: str) -> Type[Method]:
    """The :class:`Method` class registered under ``name`` (``core.registry.METHODS``).

    Raises:
        ValueError: unknown name (the message lists the known ones), or a method whose
            implementation is not available in this build.
    """
    key = str(name or DEFAULT_METHOD).strip().lower()
    if key not in METHODS:
        raise ValueError(f"unknown method {name!r}; expected one of {list(METHODS)}")
    module, cls = _MODULES[key]
    try:
        mod = importlib.import_module(f"{__name__}.{module}")
    except ImportError as exc:
        raise ValueError(f"method {key!r} is not available in this build ({exc})") from exc
    return getattr(mod, cls)


def make_method(name: str, encoder, head=None, settings=None) -> Method:
    """An instance of method ``name`` over ``encoder``, with ``head`` (a loaded ``heads.Head``) or None and
    ``settings`` (that method's ``Settings``; None: it must have none, e.g. UNI-OOD and TagOOD)."""
    return get_method(name)(encoder, head=head, settings=settings)
