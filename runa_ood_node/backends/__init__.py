"""Visual backends (PyTorch, ONNX Runtime, TensorRT) for the RUNA visual trunk.

``make_backend(kind, encoder, ...)`` builds one (``kind="auto"``: TensorRT -> ONNX Runtime ->
PyTorch with logged fallbacks); see :mod:`runa_ood_node.backends.base` for the contract.
Runtimes (onnxruntime, tensorrt) are imported lazily, only when a backend needs them.
"""
from .base import BackendUnavailableError, VisualBackend
from .select import make_backend

__all__ = ["BackendUnavailableError", "VisualBackend", "make_backend"]
