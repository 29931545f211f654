"""Backends run the networks of `perco.engine.graphs.GRAPHS`; everything else is shared numpy.

A backend is any object with a `name` and `run(graph, inputs) -> outputs` over named numpy
arrays. Backends are registered by name and imported only when asked for, so the runtime
never imports torch unless the torch backend is chosen.
"""

import importlib
from typing import Dict, Protocol

import numpy as np

from perco.engine.errors import BackendError

# name -> (module, class, what to install if the import fails)
_REGISTRY = {
    "torch": ("perco.export.reference", "TorchBackend", "pip install 'perco-engine[export]'"),
}


class Backend(Protocol):
    name: str

    def run(self, graph: str, inputs: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
        """Run one network of GRAPHS on named float32/int64 arrays."""
        raise NotImplementedError


def available() -> list:
    return sorted(_REGISTRY)


def load_backend(name: str, model) -> Backend:
    """Instantiate backend `name` for a `ModelInfo`."""
    if name not in _REGISTRY:
        raise BackendError(f"unknown backend {name!r}; choose one of: {', '.join(available())}")
    module_name, class_name, install = _REGISTRY[name]
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise BackendError(f"backend {name!r} is not installed ({exc.name} missing): {install}") from None
    return getattr(module, class_name)(model)
