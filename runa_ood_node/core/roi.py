"""The take-over region of interest: one parser for the node parameter and ``AlertConfig`` (no numpy).

A ROI is given in **normalised image coordinates** (0..1, x to the right, y down) as

* nothing: ``None`` or an empty sequence (the ``alert.roi`` parameter's default ``[]``) -> no ROI;
* a rectangle ``[x1, y1, x2, y2]`` with ``x2 > x1`` and ``y2 > y1`` -> its four corners;
* a polygon as a flat list ``[x1, y1, x2, y2, x3, y3, ...]`` (>= 3 points, as a ROS double array
  parameter can carry it) or as pairs ``[[x, y], ...]``.
"""
from __future__ import annotations

import math
from numbers import Real
from typing import List, Optional, Tuple

__all__ = ["parse_roi"]


def _num(v) -> bool:
    return isinstance(v, Real) and not isinstance(v, bool)


def parse_roi(roi) -> Optional[List[Tuple[float, float]]]:
    """The ROI as a polygon, a list of ``(x, y)`` points in [0, 1], or None for "no ROI".

    Raises:
        ValueError: the message says which form was expected and what was given.
    """
    if roi is None:
        return None
    vals = list(roi)
    if not vals:
        return None
    if all(_num(v) for v in vals):
        v = [float(x) for x in vals]
        if len(v) == 4:
            x1, y1, x2, y2 = v
            if not (x2 > x1 and y2 > y1):
                raise ValueError(f"roi rectangle [x1, y1, x2, y2] needs x2 > x1 and y2 > y1, got {v}")
            pts = [(x1, y1), (x2, y1), (x2, y2), (x1, y2)]
        elif len(v) >= 6 and len(v) % 2 == 0:
            pts = [(v[i], v[i + 1]) for i in range(0, len(v), 2)]
        else:
            raise ValueError(f"roi: expected 4 values (rectangle [x1, y1, x2, y2]) or an even number >= 6 "
                             f"(polygon [x1, y1, x2, y2, x3, y3, ...]), got {len(v)} value(s)")
    else:
        try:
            pts = [(float(p[0]), float(p[1])) for p in vals if len(p) == 2 and _num(p[0]) and _num(p[1])]
        except TypeError:
            pts = []
        if len(pts) != len(vals) or len(pts) < 3:
            raise ValueError("roi must be empty (no ROI), a rectangle [x1, y1, x2, y2] or a polygon "
                             f"[[x, y], ...] / [x1, y1, x2, y2, x3, y3, ...] with >= 3 points, got {roi!r}")
    if not all(math.isfinite(c) and 0.0 <= c <= 1.0 for p in pts for c in p):
        raise ValueError(f"roi coordinates are normalised to the image and must be in [0, 1], got {roi!r}")
    return pts
