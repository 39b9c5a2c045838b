"""Plain Python values for YAML / JSON files (thresholds, projection metadata, reports)."""
from __future__ import annotations

import datetime as _dt
import pathlib
from collections.abc import Mapping
from typing import Any


def to_plain(obj: Any) -> Any:
    """Recursively convert mappings, sequences, numpy / torch scalars and arrays, paths and dates
    into dicts, lists, Python scalars and strings that ``yaml.safe_dump`` / ``json.dump`` accept.
    Anything else is returned unchanged."""
    if isinstance(obj, Mapping):
        return {str(k): to_plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_plain(v) for v in obj]
    if isinstance(obj, (pathlib.PurePath, _dt.datetime, _dt.date)):
        return str(obj)
    tolist = getattr(obj, "tolist", None)  # numpy arrays and scalars, torch tensors
    if callable(tolist) and not isinstance(obj, (str, bytes)):
        return to_plain(tolist())
    return obj
