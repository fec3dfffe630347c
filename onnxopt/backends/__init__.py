"""Deployment back-ends: build a model for a runtime and run it.

``BACKENDS`` maps each back-end's name to its class, given as ``"module:Class"`` so that listing the back-ends imports
no runtime; :func:`get_backend` imports the one asked for. Each module guards its runtime's import and says how to
install it. The interface is in :mod:`onnxopt.backends.base`.
"""

from __future__ import annotations

import importlib

from onnxopt.backends.base import Artifact, Backend, BuildOptions, LatencyStats, Runner, ShapeProfile
from onnxopt.errors import OnnxoptError, OptionsError

BACKENDS: dict[str, str] = {
    "onnxruntime": "onnxopt.backends.onnxruntime:OnnxRuntimeBackend",
    "openvino": "onnxopt.backends.openvino:OpenVinoBackend",
    "tensorrt": "onnxopt.backends.tensorrt:TensorRTBackend",
}


def backend_class(name: str) -> type[Backend]:
    try:
        target = BACKENDS[name]
    except KeyError:
        raise OptionsError(f"unknown back-end {name!r}; available: {', '.join(sorted(BACKENDS))}") from None
    module, _, attr = target.partition(":")
    return getattr(importlib.import_module(module), attr)


def get_backend(name: str, *, require: bool = True) -> Backend:
    """An instance of the back-end ``name``; with ``require``, an error saying how to install it when unavailable."""
    cls = backend_class(name)
    if require:
        ok, why = cls.available()
        if not ok:
            raise OnnxoptError(f"back-end {name!r} is not available: {why}")
    return cls()


__all__ = [
    "BACKENDS", "backend_class", "get_backend", "Artifact", "Backend", "BuildOptions", "LatencyStats", "Runner",
    "ShapeProfile",
]
