"""Real views to calibrate, check and time the CPU variants on: a method's own backend calls.

Two sources of photographs, in order: the data pack's annotated photographs (``shared/data/ood_pack``,
when present), else scikit-image's sample photographs with their hand-labelled boxes (shipped with
scikit-image, a base requirement; what ``runa-ood demo`` uses).

* :func:`calibration_views` -- RUNA's regional and global views of up to 4 boxes per photograph (the
  static int8 calibration set of ``runa-ood bench`` / ``build-engine --int8 static`` before methods
  existed; kept for the ``("cls",)`` graphs and tools without a scorer).
* :func:`method_sample` -- what a scorer (any method) sends to its backend for those photographs:
  its :meth:`OodScorer.encode` runs on every photograph with a *tap* backend that records the views
  and pairs of each call (the same view maker, view kinds, pairs and batch layout as the node's
  calls, no second copy of that logic) and answers with the torch trunk. TagOOD's calls are one
  whole-frame view each, UNI-OOD's the crops with their masked backgrounds and the inter-image
  pairs, RUNA's the crops and their blurred global views.

:class:`Sample` holds the views (every call's, concatenated: static int8 calibration and fidelity),
the pairs re-indexed into them, and the calls as made (timing: one call per frame, as the node).
"""
from __future__ import annotations

import dataclasses
import logging
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch

from ..core import photos
from ..core.paths import data_pack_annotations

LOG = logging.getLogger(__name__)

#: photographs and boxes per photograph of a sample (bounded: auto measures at start-up)
SAMPLE_IMAGES = 8
SAMPLE_BOXES = 4


@dataclasses.dataclass
class Sample:
    """A method's backend calls on real photographs.

    Attributes:
        views: ``[B,3,S,S]`` every call's views, in call order.
        pairs: ``[P,2]`` int64 (query, key) indices into ``views`` (None without ``xattn``).
        calls: ``[(views, pairs or None), ...]`` each call as the scorer made it (pairs local to it).
        source: where the photographs came from (for logs and records).
    """

    views: torch.Tensor
    pairs: Optional[torch.Tensor]
    calls: List[Tuple[torch.Tensor, Optional[torch.Tensor]]]
    source: str

    @classmethod
    def of_views(cls, views: torch.Tensor, outputs: Sequence[str] = ("cls",), source: str = "views") -> "Sample":
        """One call over ``views``; with ``xattn`` each view's CLS query against its neighbour's keys."""
        pairs = None
        if "xattn" in tuple(outputs):
            B = int(views.shape[0])
            pairs = torch.tensor([[i, (i + 1) % B] for i in range(B)], dtype=torch.int64)
        return cls(views=views, pairs=pairs, calls=[(views, pairs)], source=source)

    def head(self, calls: int) -> "Sample":
        """The first ``calls`` calls only (views and pairs re-assembled from them)."""
        n = max(1, int(calls))
        if n >= len(self.calls):
            return self
        return _assemble(self.calls[:n], f"the first {n} calls of {self.source}")


def _assemble(calls, source: str) -> Sample:
    views, pairs, offset = [], [], 0
    for v, p in calls:
        views.append(v)
        if p is not None:
            pairs.append(p.to(torch.int64) + offset)
        offset += int(v.shape[0])
    return Sample(views=torch.cat(views, 0), pairs=torch.cat(pairs, 0) if pairs else None, calls=list(calls),
                  source=source)


def sample_frames(max_images: int = 16, annotations=None):
    """``(frames, description)``: ``core.photos`` frame specs (``.load()`` -> RGB, ``.boxes`` xywh)
    of the data pack when there is one (``annotations``, else ``$RUNA_OOD_DATA_PACK``), else of
    scikit-image's sample photographs."""
    ann = annotations or data_pack_annotations()
    if photos.pack_available(ann):
        frames = photos.pack_frames(ann, "voc", max_images=max_images)
        return frames, f"{len(frames)} data-pack photographs"
    frames = photos.skimage_frames("voc")[:max_images]
    return frames, f"{len(frames)} scikit-image sample photographs"


def _frame_boxes(frame, boxes: int):
    """``(image, xyxy [<=boxes, 4])`` of a frame spec: its first usable boxes (None when it has none)."""
    from ..core.boxes import sanitize_boxes

    img = frame.load()
    xyxy, st = sanitize_boxes(np.asarray(frame.boxes, np.float32).reshape(-1, 4), img.shape[1], img.shape[0],
                              fmt="xywh")
    if not np.any(st == 0):
        return img, None
    return img, xyxy[st == 0][:boxes]


def calibration_views(encoder, max_images: int = 16, annotations=None):
    """RUNA's views (regional, then global, of up to 4 boxes per photograph) of :func:`sample_frames`,
    for the static int8 calibration of ``("cls",)`` graphs. Returns ``(views [B,3,S,S], description)``."""
    from ..core.views import ViewMaker

    frames, where = sample_frames(max_images, annotations)
    vm = ViewMaker(encoder.input_size, encoder.mean, encoder.std, 1.0)
    regs, globs = [], []
    for f in frames:
        img, xyxy = _frame_boxes(f, SAMPLE_BOXES)
        if xyxy is None:
            continue
        r, g = vm.make(img, xyxy)
        regs.append(r)
        globs.append(g)
    if not regs:
        raise ValueError("no calibration boxes found")
    views = torch.cat(regs + globs, 0)
    return views, f"{views.shape[0]} views from {where}"


class _Tap:
    """A backend that records every call's views and pairs and answers with the torch trunk."""

    def __init__(self, encoder):
        from .base import describe_model
        from .torch_backend import TorchBackend

        self.torch = TorchBackend(describe_model(encoder))  # CPU fp32: the encoder's own trunk when it is there
        self.calls: List[Tuple[torch.Tensor, Optional[torch.Tensor]]] = []

    def outputs(self, views, names, pairs=None):
        views = views.detach().to("cpu", torch.float32)
        pairs = None if pairs is None else pairs.detach().to("cpu", torch.int64)
        self.calls.append((views.clone(), None if pairs is None else pairs.clone()))
        return self.torch.outputs(views, tuple(names), pairs)


def method_sample(scorer, max_images: int = SAMPLE_IMAGES, annotations=None, boxes: int = SAMPLE_BOXES) -> Sample:
    """The backend calls ``scorer`` (an ``OodScorer`` of any method) makes on up to ``max_images``
    real photographs with up to ``boxes`` boxes each (see the module docstring). The scorer's encoder
    keeps its backend: it is restored after the tap."""
    enc = scorer.encoder
    frames, where = sample_frames(max_images, annotations)
    tap = _Tap(enc)
    prev, prev_name = getattr(enc, "_backend", None), enc.backend_name
    enc.set_backend(tap, "sample-tap")
    try:
        for f in frames:
            img, xyxy = _frame_boxes(f, boxes)
            if xyxy is None:
                continue
            feats = scorer.encode(img, xyxy)
            if feats.error:
                raise RuntimeError(f"sample views: {feats.error}")
    finally:
        enc.set_backend(prev, prev_name)
    if not tap.calls:
        raise ValueError(f"no boxes to make sample views from ({where})")
    n = sum(int(v.shape[0]) for v, _ in tap.calls)
    return _assemble(tap.calls, f"{scorer.method.name}'s views of {len(tap.calls)} photographs ({n} views) from {where}")


__all__ = ["Sample", "sample_frames", "calibration_views", "method_sample", "SAMPLE_IMAGES", "SAMPLE_BOXES"]
