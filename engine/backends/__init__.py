"""Backends run the networks of `perco.engine.graphs.GRAPHS`; everything else is shared numpy.

A backend is any object with a `name` and `run(graph, inputs) -> outputs` over named numpy
arrays. Backends are registered by name and imported only when asked for, so the runtime
never imports torch unless the torch backend is chosen.
"""

import importlib
from typing import Dict, Protocol

import numpy as np

from perco.engine.errors import BackendError

# name -> (module with `open_backend(model_dir, artifacts, progress)`, what to install if it is missing)
_REGISTRY = {
    "torch": ("perco.export.reference", "pip install 'perco-engine[export]'"),
    "onnxruntime": ("perco.engine.backends.onnxruntime", "pip install onnxruntime (or onnxruntime-gpu)"),
    "tensorrt": ("perco.engine.backends.tensorrt", "pip install tensorrt-rtx cuda-bindings (or NVIDIA's TensorRT)"),
}


class Backend(Protocol):
    name: str

    def run(self, graph: str, inputs: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
        """Run one network of GRAPHS on named float32/int64 arrays."""
        raise NotImplementedError


def available() -> list:
    return sorted(_REGISTRY)


def open_backend(name: str, model_dir=None, artifacts=None, progress: bool = False):
    """(ModelSpec, Backend) for backend `name` from a model folder and/or exported artifacts."""
    if name not in _REGISTRY:
        raise BackendError(f"unknown backend {name!r}; choose one of: {', '.join(available())}")
    module_name, install = _REGISTRY[name]
    try:
        module = importlib.import_module(module_name)
        open_fn = module.open_backend
        return open_fn(model_dir, artifacts, progress)
    except ImportError as exc:
        raise BackendError(f"backend {name!r} is not installed ({exc.name} missing): {install}") from None
