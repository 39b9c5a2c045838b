"""What every drawing of a scored frame shows, free of any message type (numpy only): the colours,
each box's label, which boxes are drawn (bounded) and the Foxglove annotation items.

:mod:`.draw` draws them (annotated image, RViz markers, Foxglove annotations as rclpy messages) and
:func:`.wire.write_image_annotations` writes the annotations' bytes; both import this module, which
imports neither (so ``wire`` does not climb up to ``draw``). ``draw`` re-exports every public name.
The rules are in :mod:`.draw`'s docstring.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import numpy as np

from ..core.boxes import BoxStatus

ID_RGB: Tuple[int, int, int] = (0, 200, 0)
OOD_RGB: Tuple[int, int, int] = (230, 0, 0)
NOT_SCORED_RGB: Tuple[int, int, int] = (150, 150, 150)
WATERMARK = "RANDOM WEIGHTS \u2014 NOT A QUALITY RESULT"
WATERMARK_ASCII = "RANDOM WEIGHTS - NOT A QUALITY RESULT"
WATERMARK_RGB: Tuple[int, int, int] = (255, 220, 0)
#: at most this many boxes are drawn / marked per frame (OOD first, then ID, then not scored)
MAX_DRAWN_BOXES = 200
#: at most this many of them may be boxes that were not scored
MAX_DRAWN_NOT_SCORED = 20


def select_boxes(frame_result, max_boxes: int = MAX_DRAWN_BOXES,
                 max_not_scored: int = MAX_DRAWN_NOT_SCORED) -> Tuple[np.ndarray, int]:
    """Indices of the boxes worth drawing, in drawing order (not scored, then ID, then OOD on top),
    and how many drawable boxes were left out. See :mod:`.draw`'s docstring for the rule."""
    if frame_result is None or len(frame_result.status) == 0:
        return np.zeros(0, np.intp), 0
    status = np.asarray(frame_result.status).astype(np.int64).reshape(-1)
    boxes = np.asarray(frame_result.boxes_xyxy, np.float64).reshape(-1, 4)
    ood = np.asarray(frame_result.is_ood).astype(bool).reshape(-1) & (status == BoxStatus.OK)
    finite = np.isfinite(boxes).all(axis=1)
    ood_i = np.flatnonzero(finite & ood)
    id_i = np.flatnonzero(finite & (status == BoxStatus.OK) & ~ood)
    ns_i = np.flatnonzero(finite & (status != BoxStatus.OK))
    keep_ood = ood_i[:max_boxes]
    keep_id = id_i[: max_boxes - keep_ood.size]
    keep_ns = ns_i[: max(0, min(max_not_scored, max_boxes - keep_ood.size - keep_id.size))]
    omitted = int(ood_i.size + id_i.size + ns_i.size - keep_ood.size - keep_id.size - keep_ns.size)
    return np.concatenate([keep_ns, keep_id, keep_ood]), omitted


def _box_style(frame_result, i: int) -> Tuple[Tuple[int, int, int], str]:
    """Colour and label text of box ``i``."""
    st = int(frame_result.status[i])
    if st != BoxStatus.OK:
        try:
            name = BoxStatus(st).name
        except ValueError:
            name = f"STATUS_{st}"
        return NOT_SCORED_RGB, name
    u = float(frame_result.uncertainty[i])
    label = str(frame_result.label[i])
    if bool(frame_result.is_ood[i]):
        return OOD_RGB, f"OOD {u:.2f} (~{label})"
    return ID_RGB, f"{label} {u:.2f}"


def _ink(color: Tuple[int, int, int]) -> Tuple[int, int, int]:
    """Text colour on a label background of ``color``: black on green and grey, white on red."""
    return (0, 0, 0) if color == ID_RGB or color == NOT_SCORED_RGB else (255, 255, 255)


def _finite_box(frame_result, i: int) -> Optional[Tuple[float, float, float, float]]:
    """Box ``i`` as 4 finite floats, else None (per box and plain floats: cheaper than NumPy on
    one row, and every drawing calls it for each box it draws)."""
    try:
        b = tuple(float(v) for v in frame_result.boxes_xyxy[i])
    except (TypeError, ValueError):
        return None
    if len(b) != 4 or not all(map(math.isfinite, b)):
        return None
    return b


#: stroke of the Foxglove box outlines and size of their label texts, in image pixels
ANNOTATION_THICKNESS = 2.0
ANNOTATION_FONT_SIZE = 14.0


def annotation_items(frame_result, indices: Optional[np.ndarray] = None, random_weights: bool = False):
    """What the Foxglove annotations draw (see :mod:`.draw`'s docstring), free of any message type:
    ``(outlines, texts)``, ``outlines`` a list of ``(x1, y1, x2, y2, rgb)`` boxes in drawing order,
    ``texts`` a list of ``(x, y, text, ink_rgb, background_rgb)`` (``(x, y)``: the text's bottom-left
    corner). ``draw.make_image_annotations`` turns them into a message, ``wire.write_image_annotations``
    into its bytes. Arguments as ``draw.make_image_annotations``."""
    omitted = 0
    if indices is None:
        indices, omitted = select_boxes(frame_result)
    outlines, texts = [], []
    for i in np.asarray(indices, np.intp).tolist():
        box = _finite_box(frame_result, i)
        if box is None:
            continue
        rgb, label = _box_style(frame_result, i)
        x1, y1, x2, y2 = box
        outlines.append((x1, y1, x2, y2, rgb))
        # above the box; inside it, under its top edge, when the box touches the image's top
        ty = y1 if y1 >= ANNOTATION_FONT_SIZE else y1 + ANNOTATION_FONT_SIZE + ANNOTATION_THICKNESS
        texts.append((x1, ty, label, _ink(rgb), rgb))
    line = ANNOTATION_FONT_SIZE + 4.0
    row = 1
    if omitted:
        texts.append((0.0, line * row, f"+{omitted} boxes not drawn", (0, 0, 0), NOT_SCORED_RGB))
        row += 1
    if random_weights:
        texts.append((0.0, line * row, WATERMARK, WATERMARK_RGB, (0, 0, 0)))
    return outlines, texts
