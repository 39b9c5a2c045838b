"""Debug drawing for runa_ood_node: the annotated image, RViz markers and Foxglove image annotations.

Colours (RGB): in-distribution boxes green :data:`ID_RGB`, OOD boxes red :data:`OOD_RGB`, boxes that
were not scored (any status other than OK) grey :data:`NOT_SCORED_RGB`. Each box carries a label:

* ID:          ``"<nearest label> <uncertainty>"``           e.g. ``car -0.31``
* OOD:         ``"OOD <uncertainty> (~<nearest label>)"``    e.g. ``OOD -0.12 (~car)``
* not scored:  the status name                               e.g. ``TOO_SMALL``

Uncertainty is RUNA's score (higher = more OOD; negative max cosine similarity), two decimals.
With ``random_weights`` a yellow banner "RANDOM WEIGHTS - NOT A QUALITY RESULT" is burnt into the
bottom of the image (OpenCV's Hershey fonts are ASCII-only, so the banner uses a hyphen where
:data:`WATERMARK` has an em dash).

:func:`annotate` needs only NumPy and OpenCV; :func:`make_markers` and :func:`make_image_annotations`
import the message packages when called (nothing ROS is imported at module import). The node draws
through one call, :func:`publish_drawings`: the three drawings of a scored frame, each made only
when wanted. The colours, labels and the selection of boxes are in :mod:`.boxstyle`.

Foxglove image annotations
--------------------------
:func:`make_image_annotations` gives the same boxes, colours and labels as a
``foxglove_msgs/ImageAnnotations`` that Foxglove / Lichtblick draw on the client over the image
(Image panel, "annotations" of the camera topic). Every annotation carries the image's stamp (the
panel pairs annotations with the image by it). Per box one ``PointsAnnotation`` ``LINE_LOOP`` of the 4
corners ``(x1,y1) (x2,y1) (x2,y2) (x1,y2)`` in the image's pixel coordinates (origin at the top-left
corner of the top-left pixel, as core's boxes), outlined in the box's colour, no fill; and one
``TextAnnotation`` with the label, its bottom-left corner at the box's top-left corner (inside the
box when it touches the image's top), text on a background of the box's colour, as in the annotated
image. Then, top-left, "+N boxes not drawn"
when :func:`select_boxes` left boxes out, and with ``random_weights`` the :data:`WATERMARK` text.
:func:`annotation_items` decides all of it; :func:`make_image_annotations` makes the rclpy
message of it and ``wire.write_image_annotations`` its CDR bytes (what the node publishes).

Marker frame
------------
Markers are drawn in the image's own ``frame_id`` (normally the camera's optical frame: x right,
y down, z forward, REP 103) on a virtual image plane ``depth`` metres in front of the camera:
pixel ``(u, v)`` -> ``((u - W/2) * scale, (v - H/2) * scale, depth)``. The default
``scale = 0.001`` (1 px = 1 mm) and ``depth = 1.0`` m give a readable overlay, not a metric
reprojection; for one that lines up with the camera frustum use ``scale = depth / fx`` from
``sensor_msgs/CameraInfo``. The first marker of every array is ``DELETEALL`` (with ``ns`` set) so boxes
of the previous frame vanish even when the box count drops (some RViz versions clear every marker of
the display, whatever the namespace: keep ``ood/markers`` in a display of its own); per box one
``LINE_STRIP`` rectangle (id ``2i+1``) and one ``TEXT_VIEW_FACING`` label (id ``2i+2``), with
lifetime 0 (until replaced). Boxes with non-finite coordinates get no markers.

What is drawn (bounded)
-----------------------
:func:`select_boxes` decides, for both the image and the markers: every OOD box, then every ID
box, then boxes that were not scored, at most :data:`MAX_DRAWN_BOXES` in all and at most
:data:`MAX_DRAWN_NOT_SCORED` not-scored ones (a detector sending 1,000 boxes over the ``max_boxes``
cap must not cost 2,000 markers per frame); boxes with non-finite coordinates are never drawn. The
number left out is returned (the node counts it as ``boxes_not_drawn``) and the annotated image
says "+N boxes not drawn".
"""
from __future__ import annotations

import math
from typing import Dict, List, Optional, Tuple

import numpy as np

from . import convert, wire
from .boxstyle import (ANNOTATION_FONT_SIZE, ANNOTATION_THICKNESS, ID_RGB, MAX_DRAWN_BOXES,  # re-exported
                       MAX_DRAWN_NOT_SCORED, NOT_SCORED_RGB, OOD_RGB, WATERMARK, WATERMARK_ASCII, WATERMARK_RGB,
                       _box_style, _finite_box, _ink, annotation_items, select_boxes)

def annotate(rgb: np.ndarray, frame_result, random_weights: bool = False,
             indices: Optional[np.ndarray] = None) -> np.ndarray:
    """Return a copy of ``rgb`` (``HxWx3 uint8 RGB``) with the boxes of :func:`select_boxes` (or
    ``indices``, in drawing order), their labels and, when ``random_weights``, the watermark banner
    drawn on it. The input is never modified.

    ``frame_result`` is a core ``FrameResult`` (or any object with ``boxes_xyxy``, ``status``,
    ``uncertainty``, ``label``, ``is_ood``); ``None`` draws only the watermark. Box ``[x1,y1,x2,y2]``
    covers pixels ``x1..x2-1`` (continuous pixel coordinates, as in core.boxes), so the outline's
    outer edge lies on the box's first/last pixel rows and columns.
    """
    import cv2

    a = np.asarray(rgb)
    if a.ndim != 3 or a.shape[2] != 3 or a.dtype != np.uint8:
        raise ValueError(f"annotate needs HxWx3 uint8 RGB, got shape {a.shape} dtype {a.dtype}")
    out = np.ascontiguousarray(a).copy()
    h, w = out.shape[:2]
    thick = max(1, int(round(min(h, w) / 240)))
    font = cv2.FONT_HERSHEY_SIMPLEX
    fscale = max(0.35, min(h, w) / 960.0)
    omitted = 0
    if indices is None:  # not scored first, then ID, then OOD on top (the important ones stay visible)
        indices, omitted = select_boxes(frame_result)
    labels = []
    for i in np.asarray(indices, np.intp).tolist():
        box = _finite_box(frame_result, i)
        if box is None:
            continue
        color, text = _box_style(frame_result, i)
        x1 = int(np.clip(math.floor(box[0]), 0, w - 1))
        y1 = int(np.clip(math.floor(box[1]), 0, h - 1))
        x2 = int(np.clip(math.ceil(box[2]) - 1, 0, w - 1))
        y2 = int(np.clip(math.ceil(box[3]) - 1, 0, h - 1))
        # thickness grows inwards so the outline never covers pixels outside the box
        for t in range(thick):
            if x2 - t < x1 + t or y2 - t < y1 + t:
                break
            cv2.rectangle(out, (x1 + t, y1 + t), (x2 - t, y2 - t), color, 1, cv2.LINE_8)
        labels.append((x1, y1, color, text))
    for x1, y1, color, text in labels:  # labels after all boxes, so no box crosses a label
        (tw, th), base = cv2.getTextSize(text, font, fscale, 1)
        pad = 2
        ty = y1 - pad - base if y1 - th - base - 2 * pad >= 0 else y1 + th + pad + thick
        tx = min(max(0, x1), max(0, w - tw - 2 * pad))
        cv2.rectangle(out, (tx, ty - th - pad), (tx + tw + 2 * pad, ty + base), color, cv2.FILLED)
        cv2.putText(out, text, (tx + pad, ty), font, fscale, _ink(color), 1, cv2.LINE_AA)
    if omitted:
        text = f"+{omitted} boxes not drawn"
        (tw, th), base = cv2.getTextSize(text, font, fscale, 1)
        cv2.rectangle(out, (0, 0), (tw + 4, th + base + 4), NOT_SCORED_RGB, cv2.FILLED)
        cv2.putText(out, text, (2, th + 2), font, fscale, (0, 0, 0), 1, cv2.LINE_AA)
    if random_weights:
        _watermark(out)
    return out


def _watermark(out: np.ndarray) -> None:
    import cv2

    h, w = out.shape[:2]
    font = cv2.FONT_HERSHEY_SIMPLEX
    fscale = 1.0
    (tw, th), base = cv2.getTextSize(WATERMARK_ASCII, font, fscale, 2)
    fscale = max(0.3, min(1.0, 0.9 * w / max(tw, 1)))  # fit the width
    (tw, th), base = cv2.getTextSize(WATERMARK_ASCII, font, fscale, 2)
    band = min(h, th + base + 10)
    y0 = h - band
    out[y0:, :] //= 3  # darken the strip
    cv2.putText(out, WATERMARK_ASCII, (max(0, (w - tw) // 2), h - base - 5), font, fscale,
                WATERMARK_RGB, 2, cv2.LINE_AA)


def _rgba(rgb: Tuple[int, int, int], alpha: float = 1.0):
    ColorRGBA = _msg("std_msgs", "ColorRGBA")
    return ColorRGBA(r=rgb[0] / 255.0, g=rgb[1] / 255.0, b=rgb[2] / 255.0, a=float(alpha))


def _msg(module: str, name: str):
    import importlib

    return getattr(importlib.import_module(module + ".msg"), name)


def make_markers(header, frame_result, width: int, height: int, ns: str = "runa_ood",
                 scale: float = 0.001, depth: float = 1.0, line_px: float = 2.0,
                 text_px: float = 14.0, indices: Optional[np.ndarray] = None):
    """``visualization_msgs/MarkerArray`` of the boxes (see the module docstring for the frame).

    Args:
        header: the source image's header; copied into every marker (stamp and frame_id).
        frame_result: core ``FrameResult`` (None: only the DELETEALL marker).
        indices: the boxes to mark (default :func:`select_boxes`: bounded, OOD first).
        width, height: image size in pixels (the plane is centred on the image centre).
        ns: marker namespace.
        scale: metres per pixel on the virtual image plane.
        depth: distance of that plane along the optical axis (z), metres.
        line_px, text_px: line width and text height, in pixels (times ``scale``).
    """
    Marker = _msg("visualization_msgs", "Marker")
    MarkerArray = _msg("visualization_msgs", "MarkerArray")
    Point = _msg("geometry_msgs", "Point")

    def to_xyz(u: float, v: float) -> Tuple[float, float, float]:
        return (u - width / 2.0) * scale, (v - height / 2.0) * scale, float(depth)

    out = MarkerArray()
    clear = Marker()
    clear.header = convert.copy_header(header)
    clear.ns = ns
    clear.id = 0
    clear.action = Marker.DELETEALL
    markers: List = [clear]
    if indices is None:
        indices, _ = select_boxes(frame_result)
    for i in sorted(np.asarray(indices, np.intp).tolist()):
        box = _finite_box(frame_result, i)
        if box is None:
            continue
        color, text = _box_style(frame_result, i)
        x1, y1, x2, y2 = box
        rect = Marker()
        rect.header = convert.copy_header(header)
        rect.ns, rect.id = ns, 2 * i + 1
        rect.type, rect.action = Marker.LINE_STRIP, Marker.ADD
        rect.pose.orientation.w = 1.0
        rect.scale.x = float(line_px * scale)
        rect.color = _rgba(color)
        rect.points = [Point(x=p[0], y=p[1], z=p[2]) for p in
                       (to_xyz(x1, y1), to_xyz(x2, y1), to_xyz(x2, y2), to_xyz(x1, y2),
                        to_xyz(x1, y1))]
        label = Marker()
        label.header = convert.copy_header(header)
        label.ns, label.id = ns, 2 * i + 2
        label.type, label.action = Marker.TEXT_VIEW_FACING, Marker.ADD
        tx, ty, tz = to_xyz(x1 + (x2 - x1) / 2.0, y1 - text_px)  # centred above the box
        label.pose.position.x, label.pose.position.y, label.pose.position.z = tx, ty, tz
        label.pose.orientation.w = 1.0
        label.scale.z = float(text_px * scale)
        label.color = _rgba(color)
        label.text = text
        markers += [rect, label]
    out.markers = markers
    return out


def make_image_annotations(header, frame_result, indices: Optional[np.ndarray] = None,
                           random_weights: bool = False):
    """``foxglove_msgs/ImageAnnotations`` of the boxes (see the module docstring), as an rclpy
    message. A publisher on the hot path should send the same message as bytes,
    ``wire.write_image_annotations`` (equal to this message's serialization): rclpy's message
    objects (six per box) cost far more to build and serialize than the bytes do.

    Args:
        header: the source image's header (``std_msgs/Header`` or ``wire.Header``); its stamp is
            every annotation's ``timestamp``.
        frame_result: core ``FrameResult`` (or any object with ``boxes_xyxy``, ``status``,
            ``uncertainty``, ``label``, ``is_ood``); None: no boxes (only the watermark, if asked).
        indices: the boxes to draw, in drawing order (default :func:`select_boxes`: bounded, OOD
            last so on top; the boxes it leaves out are named in a "+N boxes not drawn" text).
        random_weights: add the :data:`WATERMARK` text (the model is untrained).
    """
    Time = _msg("builtin_interfaces", "Time")
    Color, Point2 = _msg("foxglove_msgs", "Color"), _msg("foxglove_msgs", "Point2")
    PointsAnnotation, TextAnnotation = _msg("foxglove_msgs", "PointsAnnotation"), _msg("foxglove_msgs", "TextAnnotation")
    sec, nanosec = int(header.stamp.sec), int(header.stamp.nanosec)

    def color(rgb: Tuple[int, int, int], alpha: float = 1.0):
        return Color(r=rgb[0] / 255.0, g=rgb[1] / 255.0, b=rgb[2] / 255.0, a=float(alpha))

    outlines, texts = annotation_items(frame_result, indices, random_weights)
    points = [PointsAnnotation(
        timestamp=Time(sec=sec, nanosec=nanosec), type=PointsAnnotation.LINE_LOOP,
        points=[Point2(x=x, y=y) for x, y in ((x1, y1), (x2, y1), (x2, y2), (x1, y2))],
        outline_color=color(rgb), outline_colors=[], fill_color=color((0, 0, 0), 0.0),
        thickness=ANNOTATION_THICKNESS) for x1, y1, x2, y2, rgb in outlines]
    labels = [TextAnnotation(timestamp=Time(sec=sec, nanosec=nanosec), position=Point2(x=x, y=y), text=text,
                             font_size=ANNOTATION_FONT_SIZE, text_color=color(ink), background_color=color(bg))
              for x, y, text, ink, bg in texts]
    return _msg("foxglove_msgs", "ImageAnnotations")(circles=[], points=points, texts=labels)


#: the publishers' keys of the three drawings, in the order they are published
DRAWINGS = ("annotated", "markers", "annotations")


def publish_drawings(pubs, header, rgb: np.ndarray, frame_result, random_weights: bool = False,
                     lazy: bool = True) -> Dict[str, int]:
    """Draw one scored frame three ways and publish each on ``pubs[key]`` (:data:`DRAWINGS`): the
    annotated image (``sensor_msgs/Image`` rgb8), the RViz markers and the Foxglove image
    annotations (written as bytes, ``wire.write_image_annotations``), all of the same bounded
    selection of boxes (:func:`select_boxes`) and stamped with ``header``. With ``lazy`` a drawing
    is only made while someone subscribes to it.

    Returns the counters to add (``annotated_frames``, ``marker_frames``, ``annotation_frames``,
    ``boxes_not_drawn``); empty when nothing was drawn."""
    want = {k: not lazy or pubs[k].get_subscription_count() > 0 for k in DRAWINGS}
    if not any(want.values()):
        return {}
    h, w = rgb.shape[:2]
    drawn, not_drawn = select_boxes(frame_result)  # bounded: OOD, then ID, few not scored
    if want["annotated"]:
        pubs["annotated"].publish(convert.rgb_to_image(
            annotate(rgb, frame_result, random_weights, indices=drawn), header))
    if want["markers"]:
        pubs["markers"].publish(make_markers(header, frame_result, w, h, indices=drawn))
    if want["annotations"]:  # Foxglove: the same boxes drawn on the client, stamped like the image
        pubs["annotations"].publish(wire.write_image_annotations(header, frame_result, drawn, random_weights))
    return {"annotated_frames": int(want["annotated"]), "marker_frames": int(want["markers"]),
            "annotation_frames": int(want["annotations"]), "boxes_not_drawn": not_drawn}


__all__ = ["ID_RGB", "OOD_RGB", "NOT_SCORED_RGB", "WATERMARK", "WATERMARK_ASCII", "WATERMARK_RGB", "MAX_DRAWN_BOXES",
           "MAX_DRAWN_NOT_SCORED", "ANNOTATION_THICKNESS", "ANNOTATION_FONT_SIZE", "select_boxes", "annotate",
           "make_markers", "annotation_items", "make_image_annotations", "DRAWINGS", "publish_drawings"]
