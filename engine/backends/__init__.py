"""Backends run the networks of a model family's graph contract (`perco.engine.families`); the rest is numpy.

A backend implements `Backend`: `run(graph, inputs) -> outputs` over named numpy arrays (every
output a graph declares), `close()`, and says its `device` and `precision`. The runtime's own
backends (onnxruntime, tensorrt) are listed here; others, such as the torch reference backend of
`perco-engine[export]`, register under the `perco.backends` entry point group
(`perco.engine.plugins`). Each is imported only when asked for, so the runtime never imports
torch unless the torch backend is chosen.
"""

import importlib
from typing import Dict, Optional, Protocol, Tuple

import numpy as np

from perco.engine import plugins
from perco.engine.errors import BackendError

# the runtime's own backends: name -> (module with `open_backend(model_dir, artifacts, progress)`, what to install)
_BUILTIN = {
    "onnxruntime": ("perco.engine.backends.onnxruntime", "pip install onnxruntime (or onnxruntime-gpu)"),
    "tensorrt": ("perco.engine.backends.tensorrt", "pip install tensorrt-rtx cuda-bindings (or NVIDIA's TensorRT)"),
}
GROUP = "perco.backends"


class Backend(Protocol):
    name: str
    device: str  # "cpu" or "cuda"
    precision: str  # what its networks compute in: "fp32", "fp16", "int8", ... ("mixed" for per-graph choices)
    max_size: Optional[Tuple[int, int]]  # (height, width) of the largest padded image it accepts; None: any

    def run(self, graph: str, inputs: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
        """Run one network of the contract on named float32/int64 arrays; return every output it declares."""
        raise NotImplementedError

    def runs(self, graph: str) -> bool:
        """Whether it has `graph`: the learned entropy model's network is optional (without it, the numpy
        reference computes the same integers)."""
        raise NotImplementedError

    def close(self) -> None:
        """Release what the backend holds (device memory, caches); idempotent."""
        raise NotImplementedError

    # Optional, the one capability found by hasattr: `entropy_steps_on_device(ids, positions)` -> the learned
    # coder's group steps [n_g, K] int64 as a CUDA array (__cuda_array_interface__) where the entropy graph runs
    # on a GPU (torch-fast), for the kernels library to decode in place (docs/entropy-coding.md).


def available() -> list:
    return sorted(set(_BUILTIN) | set(plugins.names(GROUP)))


def open_backend(name: str, model_dir=None, artifacts=None, progress: bool = False):
    """(ModelSpec, Backend) for backend `name` from a model folder and/or exported artifacts."""
    if name not in available():
        raise BackendError(f"unknown backend {name!r}; choose one of: {', '.join(available())}")
    if name not in _BUILTIN:
        open_fn = plugins.load(GROUP, name, f"backend {name!r}")
        try:
            return open_fn(model_dir, artifacts, progress)
        except ImportError as exc:
            raise BackendError(f"backend {name!r} needs {exc.name}: {plugins.EXPORT_EXTRA}") from None
    module_name, install = _BUILTIN[name]
    try:
        return importlib.import_module(module_name).open_backend(model_dir, artifacts, progress)
    except ImportError as exc:
        raise BackendError(f"backend {name!r} is not installed ({exc.name} missing): {install}") from None
