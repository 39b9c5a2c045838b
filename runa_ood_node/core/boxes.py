"""Box formats and box sanitising.

Conventions
-----------
* Coordinates are in **original image pixels**, continuous: the image covers ``[0, W] x [0, H]``,
  pixel ``(col i, row j)`` is the unit square ``[i, i+1] x [j, j+1]``.
* ``xyxy``  = (x_min, y_min, x_max, y_max)
  ``xywh``  = (x_min, y_min, width, height)   (COCO annotation style)
  ``cxcywh`` = (centre x, centre y, width, height)  (vision_msgs BoundingBox2D, YOLO)
* After :func:`sanitize_boxes` every box is float32 xyxy, finite, and clipped to the image.

Per-box problems never raise: each box gets a :class:`BoxStatus`. Only a malformed *array* (not
``[N,4]``-shaped) or a bad image size raises ``ValueError``.

Reversed corners (``x_max < x_min`` or ``y_max < y_min``, i.e. negative width/height) are **not**
silently swapped: they are flagged ``ZERO_AREA`` ("zero or negative width/height"), because a
detector emitting them almost always has a format/convention bug, and guessing would score the
wrong region.
"""
from __future__ import annotations

import enum
from typing import Tuple

import numpy as np

BOX_FORMATS = ("xyxy", "xywh", "cxcywh")


class BoxStatus(enum.IntEnum):
    """Validity of one box; ``OK`` boxes are scored, all others carry NaN scores."""

    OK = 0
    NAN = 1
    INFINITE = 2
    ZERO_AREA = 3
    TOO_SMALL = 4
    OUTSIDE_IMAGE = 5
    NOT_SCORED = 6
    BACKEND_ERROR = 7

    @property
    def text(self) -> str:
        """Short human-readable explanation (for diagnostics and tables)."""
        return STATUS_TEXT[self]


STATUS_TEXT = {
    BoxStatus.OK: "ok",
    BoxStatus.NAN: "coordinate is NaN",
    BoxStatus.INFINITE: "coordinate is infinite",
    BoxStatus.ZERO_AREA: "zero or negative width/height (reversed corners)",
    BoxStatus.TOO_SMALL: "smaller than min_size after clipping to the image",
    BoxStatus.OUTSIDE_IMAGE: "entirely outside the image",
    BoxStatus.NOT_SCORED: "not scored (over the max_boxes cap)",
    BoxStatus.BACKEND_ERROR: "encoder backend failed or returned non-finite features",
}


def status_text(status: int) -> str:
    """Text for a status code; unknown codes give ``"unknown status <n>"``."""
    try:
        return STATUS_TEXT[BoxStatus(int(status))]
    except ValueError:
        return f"unknown status {int(status)}"


def _as_n4(boxes) -> np.ndarray:
    """Coerce a list/array/tensor of boxes to float64 ``[N,4]``; raise ValueError on bad shape."""
    if boxes is None:
        return np.zeros((0, 4), np.float64)
    if hasattr(boxes, "detach"):  # torch tensor
        boxes = boxes.detach().cpu().numpy()
    try:
        arr = np.asarray(boxes, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"boxes must be numeric with shape [N,4]; could not convert: {exc}") from None
    if arr.size == 0:
        return np.zeros((0, 4), np.float64)
    if arr.ndim == 1 and arr.shape[0] == 4:
        arr = arr[None, :]
    if arr.ndim != 2 or arr.shape[1] != 4:
        raise ValueError(f"boxes must have shape [N,4] (or a single box of 4 numbers), got shape {tuple(arr.shape)}")
    return arr


def to_xyxy(boxes, fmt: str = "xyxy") -> np.ndarray:
    """Convert boxes from ``fmt`` (one of ``BOX_FORMATS``) to float64 xyxy ``[N,4]``.

    No validation or clipping: NaN/inf propagate (use :func:`sanitize_boxes` for that).
    """
    if fmt not in BOX_FORMATS:
        raise ValueError(f"unknown box format {fmt!r}; expected one of {BOX_FORMATS}")
    arr = _as_n4(boxes)
    if fmt == "xyxy":
        return arr.copy()
    out = np.empty_like(arr)
    with np.errstate(invalid="ignore", over="ignore"):
        if fmt == "xywh":
            out[:, 0:2] = arr[:, 0:2]
            out[:, 2:4] = arr[:, 0:2] + arr[:, 2:4]
        else:  # cxcywh
            half = arr[:, 2:4] / 2.0
            out[:, 0:2] = arr[:, 0:2] - half
            out[:, 2:4] = arr[:, 0:2] + half
    return out


def sanitize_boxes(boxes, width: int, height: int, fmt: str = "xyxy", min_size: float = 2.0
                   ) -> Tuple[np.ndarray, np.ndarray]:
    """Validate, convert and clip boxes against a ``width`` x ``height`` image.

    Args:
        boxes: ``[N,4]`` array-like (list, numpy, torch) in ``fmt``; ``[]``/``None`` means no boxes.
        width, height: image size in pixels (positive).
        fmt: ``"xyxy"``, ``"xywh"`` or ``"cxcywh"``.
        min_size: minimum width *and* height in pixels after clipping; smaller -> ``TOO_SMALL``.

    Returns:
        ``(xyxy, status)``: float32 ``[N,4]`` and uint8 ``[N]`` (:class:`BoxStatus` codes).
        Checks in order, first failing wins: ``NAN`` (any given value NaN), ``INFINITE`` (any
        given value infinite, or a format conversion that overflows),
        ``ZERO_AREA`` (width or height <= 0 before clipping, including reversed corners),
        ``OUTSIDE_IMAGE`` (no overlap of positive area with the image), ``TOO_SMALL``.
        Every returned row is finite and inside the image: rows with NaN/inf are zeros, all
        others are clipped to ``[0,W] x [0,H]`` (so a box partly outside is cut to its visible
        part and stays ``OK`` if that part is large enough).

    Raises:
        ValueError: boxes not ``[N,4]``-shaped, unknown ``fmt``, non-positive image size or
            negative ``min_size``.
    """
    if not (np.isfinite(width) and np.isfinite(height)) or int(width) <= 0 or int(height) <= 0:
        raise ValueError(f"image size must be positive, got width={width}, height={height}")
    if not np.isfinite(min_size) or min_size < 0:
        raise ValueError(f"min_size must be a finite number >= 0, got {min_size}")
    raw = _as_n4(boxes)
    xyxy = to_xyxy(raw, fmt)
    n = xyxy.shape[0]
    status = np.full(n, BoxStatus.OK, dtype=np.uint8)
    if n == 0:
        return np.zeros((0, 4), np.float32), status

    W, H = float(width), float(height)
    # judged on the input as given: NaN only when a given value is NaN; an infinite value, or a
    # conversion that overflows (inf - inf = NaN included), is INFINITE
    isnan = np.isnan(raw).any(axis=1)
    isinf = ~isnan & ~np.isfinite(xyxy).all(axis=1)
    bad = isnan | isinf
    safe = np.where(bad[:, None], 0.0, xyxy)
    w, h = safe[:, 2] - safe[:, 0], safe[:, 3] - safe[:, 1]
    zero = ~bad & ((w <= 0) | (h <= 0))
    clipped = np.empty_like(safe)
    clipped[:, [0, 2]] = np.clip(safe[:, [0, 2]], 0.0, W)
    clipped[:, [1, 3]] = np.clip(safe[:, [1, 3]], 0.0, H)
    cw, ch = clipped[:, 2] - clipped[:, 0], clipped[:, 3] - clipped[:, 1]
    outside = ~bad & ~zero & ((cw <= 0) | (ch <= 0))
    small = ~bad & ~zero & ~outside & ((cw < min_size) | (ch < min_size))

    status[small] = BoxStatus.TOO_SMALL
    status[outside] = BoxStatus.OUTSIDE_IMAGE
    status[zero] = BoxStatus.ZERO_AREA
    status[isinf] = BoxStatus.INFINITE
    status[isnan] = BoxStatus.NAN
    return clipped.astype(np.float32), status


def pixel_bounds(box_xyxy, width: int, height: int) -> Tuple[int, int, int, int]:
    """Integer pixel slice bounds ``(x0, y0, x1, y1)`` covering a float xyxy box.

    ``floor`` of the min corner, ``ceil`` of the max corner, clipped to the image, and at least one
    pixel wide and high. ``image[y0:y1, x0:x1]`` is then the smallest pixel block containing the box.
    """
    x0 = int(np.floor(box_xyxy[0]))
    y0 = int(np.floor(box_xyxy[1]))
    x1 = int(np.ceil(box_xyxy[2]))
    y1 = int(np.ceil(box_xyxy[3]))
    x0 = min(max(x0, 0), width - 1)
    y0 = min(max(y0, 0), height - 1)
    x1 = min(max(x1, x0 + 1), width)
    y1 = min(max(y1, y0 + 1), height)
    return x0, y0, x1, y1
