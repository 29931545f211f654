"""ONNX Runtime backend: runs the exported graphs. Never imports torch.

CPU execution provider everywhere; the CUDA execution provider when onnxruntime-gpu is
installed, with I/O binding: inputs that stay the same across denoising steps (text embeddings,
local features) are copied to the GPU once and stay there for the whole loop.
"""

from pathlib import Path
from typing import Dict, Optional

import numpy as np

from perco.engine import families, plugins
from perco.engine.errors import BackendError, ModelError
from perco.engine.manifest import spec_from_artifacts
from perco.engine.model import ModelInfo

_STEP_CONSTANT_INPUTS = {"text_embeddings", "local_features"}


class OnnxRuntimeBackend:
    name = "onnxruntime"
    max_size = None  # any size the profile's dynamic axes allow; memory bounds it (perco.engine.limits)

    def __init__(self, folder, manifest: dict, providers: Optional[list] = None, io_binding: Optional[bool] = None):
        """`io_binding` defaults to on with the CUDA provider; on with the CPU provider, it runs the
        same binding code with host buffers (how the tests check it without a GPU)."""
        import onnxruntime as ort

        self._ort = ort
        self.folder = Path(folder)
        self.manifest = manifest
        self.graphs = families.runtime_graphs(manifest)
        available = ort.get_available_providers()
        self.providers = providers or [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]
        self.on_gpu = self.providers[0] == "CUDAExecutionProvider"
        self.device = "cuda" if self.on_gpu else "cpu"
        quantized = {g.get("quantized") for g in manifest["graphs"].values()} - {None}
        self.precision = f"{'/'.join(sorted(quantized))}+fp32" if quantized else "fp32"
        self.io_binding = self.on_gpu if io_binding is None else io_binding
        self._device_inputs = {}  # id(array) -> (array, OrtValue on the device)
        self.uploads = 0  # step-constant inputs copied to the device
        self._sessions = {graph: self._load(graph) for graph in self.graphs}  # load once, outside timed stages

    def _load(self, graph: str):
        options = self._ort.SessionOptions()
        options.log_severity_level = 3
        if self.manifest["graphs"][graph].get("quantized") == "fp8":  # run Q and DQ as written: the CPU provider
            options.graph_optimization_level = self._ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # fuses no float8
        path = self.folder / self.manifest["graphs"][graph]["file"]
        try:
            return self._ort.InferenceSession(str(path), options, providers=self.providers)
        except Exception as exc:  # onnxruntime raises its own exception types
            raise ModelError(f"onnxruntime cannot load {path}: {str(exc).splitlines()[0]}") from None

    def runs(self, graph: str) -> bool:
        return graph in self._sessions

    def run(self, graph: str, inputs: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
        if graph not in self.graphs:
            raise BackendError(f"unknown graph {graph!r}")
        session = self._sessions[graph]
        feed = {name: np.ascontiguousarray(inputs[name]) for name, _, _ in self.graphs[graph].inputs}
        output_names = [name for name, _, _ in self.graphs[graph].outputs]
        if not self.io_binding:
            return dict(zip(output_names, session.run(output_names, feed)))
        binding = session.io_binding()
        for name, array in feed.items():
            if name in _STEP_CONSTANT_INPUTS:
                binding.bind_ortvalue_input(name, self._on_device(inputs[name]))
            else:
                binding.bind_cpu_input(name, array)
        for name in output_names:
            binding.bind_output(name, self.device)
        session.run_with_iobinding(binding)
        return dict(zip(output_names, binding.copy_outputs_to_cpu()))

    def close(self) -> None:
        self._sessions.clear()
        self._device_inputs.clear()

    def _on_device(self, array: np.ndarray):
        """The device copy of a step-constant input, made once per array object (the codec passes the
        same text embeddings and local features to every step)."""
        cached = self._device_inputs.get(id(array))
        if cached is None or cached[0] is not array:
            if len(self._device_inputs) > 8:
                self._device_inputs.clear()
            value = self._ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(array), self.device, 0)
            self.uploads += 1
            cached = self._device_inputs[id(array)] = (array, value)  # keep `array` alive: ids stay unique
        return cached[1]


def open_backend(model_dir=None, artifacts=None, progress: bool = False):
    """(ModelSpec, backend). Without `artifacts`, export `model_dir` into the cache first (needs torch)."""
    if artifacts is None:
        if model_dir is None:
            raise BackendError("the onnxruntime backend needs --artifacts DIR (from 'perco export') or --model DIR")
        export_into_cache = plugins.load("perco.hooks", "export_into_cache",
                                         "the onnxruntime backend without --artifacts (exporting --model first)")
        artifacts = export_into_cache(model_dir, progress)
    spec, manifest = spec_from_artifacts(artifacts)
    if model_dir is not None and ModelInfo.open(model_dir).fingerprint != spec.fingerprint:
        raise ModelError(f"artifacts in {artifacts} were exported from another model than {model_dir}")
    return spec, OnnxRuntimeBackend(artifacts, manifest)
