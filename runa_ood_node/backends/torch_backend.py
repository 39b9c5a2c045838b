"""PyTorch visual backend (CPU or CUDA; fp32, or fp16 autocast on CUDA): every output set of
:mod:`runa_ood_node.core.backbone` straight from the torch tower.

fp16 uses ``torch.autocast("cuda", float16)`` over the fp32 trunk: matmuls and convolutions run
in fp16 while autocast keeps LayerNorm and softmax in fp32, which is what keeps CLIP embeddings
from collapsing in half precision (a plain ``.half()`` of the whole trunk also runs LayerNorm in
fp16). Runs under ``torch.inference_mode``.

The encoder's own trunk is used as is when it already lives on the requested device in fp32;
otherwise a private copy is made on that device, so the encoder (and its text tower) is never
moved or mutated.
"""
from __future__ import annotations

import copy
from typing import Optional

import torch

from ..core.backbone import backbone_forward
from .base import BackendUnavailableError, ModelInfo, VisualBackend, cuda_available


class TorchBackend(VisualBackend):
    """Run the torch ``visual_trunk`` directly.

    Args:
        info: :class:`base.ModelInfo` (from ``describe_model(encoder)``).
        device: ``"cpu"`` or ``"cuda[:N]"``.
        precision: ``"fp32"``; ``"fp16"`` only on CUDA (autocast).
        max_batch: optional cap on views per forward pass (memory bound).
    """

    def __init__(self, info: ModelInfo, device: str = "cpu", precision: str = "fp32", max_batch: Optional[int] = None):
        if device.startswith("cuda") and not cuda_available():
            raise BackendUnavailableError(f"device {device!r} requested but CUDA is not available to torch")
        if precision == "fp16" and not device.startswith("cuda"):
            raise BackendUnavailableError("fp16 torch inference needs CUDA (on CPU it is slower than fp32); use fp32")
        if precision not in ("fp32", "fp16"):
            raise BackendUnavailableError(f"torch backend supports fp32/fp16, not {precision!r}")
        self.device = device
        self.precision = precision
        self.max_batch = max_batch
        self.input_size = info.input_size
        self.width = info.width
        self.num_tokens = info.num_tokens
        self.name = f"torch-{'cuda' if device.startswith('cuda') else 'cpu'}-{precision}"
        target = torch.device(device)
        if target.type == "cuda" and target.index is None:
            target = torch.device("cuda", torch.cuda.current_device())
        params = list(info.trunk.parameters())
        p0 = params[0] if params else None
        if p0 is not None and p0.device == target and p0.dtype == torch.float32:
            self.trunk = info.trunk
        else:
            self.trunk = copy.deepcopy(info.trunk).to(device=target, dtype=torch.float32)
        self.trunk.eval()
        self._target = target

    def _run(self, views: torch.Tensor) -> torch.Tensor:
        return self._run_outputs(views, ("cls",), None)["cls"]

    def _run_outputs(self, views, names, pairs):
        x = views.to(self._target, torch.float32, non_blocking=True)
        p = None if pairs is None else pairs.to(self._target)
        visual = getattr(self.trunk, "visual", self.trunk)
        with torch.inference_mode():
            if self.precision == "fp16":
                with torch.autocast("cuda", dtype=torch.float16):
                    out = backbone_forward(visual, x, names, p)
            else:
                out = backbone_forward(visual, x, names, p)
        return {n: t.float() for n, t in out.items()}
