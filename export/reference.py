"""The torch reference backend: eager modules, float32, the ground truth for every other backend."""

from typing import Dict

import numpy as np
import torch

from perco.engine.errors import BackendError
from perco.engine.graphs import ENTROPY_CONTRACT, ENTROPY_GRAPH
from perco.engine.model import ModelInfo
from perco.export.entropy_model import EntropyGraph
from perco.export.graphs import model_graphs


class TorchBackend:
    name = "torch"
    device = "cpu"
    precision = "fp32"
    max_size = None  # bounded by memory only (perco.engine.limits)

    def __init__(self, model: ModelInfo):
        self.info = model
        self.contract = model.family.contract(bool(model.optional_text))
        self.graphs = model_graphs(model)
        if model.entropy_model is not None:  # torch float64: the integers of the numpy reference, on any device
            self.contract = {**self.contract, ENTROPY_GRAPH: ENTROPY_CONTRACT}
            self.graphs[ENTROPY_GRAPH] = EntropyGraph(model.entropy_model)

    def runs(self, graph: str) -> bool:
        return graph in self.graphs

    @torch.inference_mode()
    def run(self, graph: str, inputs: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
        if graph not in self.graphs:
            raise BackendError(f"unknown graph {graph!r}")
        args = [torch.from_numpy(np.ascontiguousarray(inputs[name])) for name, _, _ in self.contract[graph].inputs]
        outputs = self.graphs[graph](*args)
        outputs = outputs if isinstance(outputs, (tuple, list)) else (outputs,)
        return {name: value.numpy() for (name, _, _), value in zip(self.contract[graph].outputs, outputs)}

    def close(self) -> None:
        self.graphs = {}


def open_backend(model_dir, artifacts=None, progress=False):
    """(ModelSpec, TorchBackend) for a model folder; the torch backend needs no artifacts."""
    if model_dir is None:
        raise BackendError("the torch backend needs --model DIR (a PerCo (SD) model folder)")
    info = ModelInfo.open(model_dir)
    return info.spec, TorchBackend(info)
