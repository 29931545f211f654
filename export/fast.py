"""The optimized torch backend (`--backend torch-fast`): the reference modules in FP16 or BF16 on the GPU,
channels-last convolutions, PyTorch's SDPA attention (flash / memory-efficient kernels on CUDA), the
denoiser step captured as a CUDA graph, and `torch.compile` on request.

It runs on the shared decode loop of `perco.engine.codec` like every backend; only the networks
differ. It is device-agnostic: on a machine without CUDA it runs on the CPU (BF16 or FP32), which is
how CI checks it against the reference; the CUDA-only parts (graphs, compile modes) are then off.

The encoder graphs (VAE encoder, hyper-encoder) stay FP32 on every device: their argmax picks the
transmitted indices, so compressing gives the same bytes as the reference backend.

Settings (environment, since backends open from a model folder alone):
    PERCO_TORCH_DEVICE   cuda | cpu            default: cuda if available
    PERCO_TORCH_DTYPE    fp16 | bf16 | fp32    default: fp16 on CUDA, bf16 on the CPU
    PERCO_TORCH_GRAPHS   1 | 0                 CUDA graph of the denoiser step; default 1 on CUDA
    PERCO_TORCH_CHANNELS_LAST  1 | 0           channels-last convolutions; default 1 on CUDA
    PERCO_TORCH_COMPILE  0 | default | max-autotune   torch.compile of the denoiser; default 0
"""

import copy
import os
from dataclasses import dataclass
from typing import Dict, Optional

import numpy as np
import torch

from perco.engine.errors import BackendError
from perco.engine.graphs import ENTROPY_CONTRACT, ENTROPY_GRAPH
from perco.engine.model import ModelInfo
from perco.export.graphs import model_graphs

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
FP32_GRAPHS = ("vae_encoder", "hyper_encoder", "local_features")  # pick or embed the transmitted indices
CONV_GRAPHS = ("denoiser", "vae_decoder", "vae_encoder")  # channels-last helps their convolutions


@dataclass(frozen=True)
class FastSettings:
    device: str
    dtype: str
    cuda_graphs: bool
    compile: str  # "0" (off), "default", "max-autotune", ...
    channels_last: bool = False

    @classmethod
    def from_env(cls, environ=os.environ) -> "FastSettings":
        cuda = torch.cuda.is_available()
        device = environ.get("PERCO_TORCH_DEVICE", "cuda" if cuda else "cpu")
        if device not in ("cuda", "cpu") or device == "cuda" and not cuda:
            raise BackendError(f"PERCO_TORCH_DEVICE={device!r}: choose cpu" + (" or cuda" if cuda else
                                                                            " (this machine has no CUDA GPU)"))
        dtype = environ.get("PERCO_TORCH_DTYPE", "fp16" if device == "cuda" else "bf16")
        if dtype not in DTYPES:
            raise BackendError(f"PERCO_TORCH_DTYPE={dtype!r}: choose one of {', '.join(DTYPES)}")
        graphs = environ.get("PERCO_TORCH_GRAPHS", "1" if device == "cuda" else "0") == "1"
        if graphs and device != "cuda":
            raise BackendError("PERCO_TORCH_GRAPHS=1 needs the cuda device (CUDA graphs)")
        channels_last = environ.get("PERCO_TORCH_CHANNELS_LAST", "1" if device == "cuda" else "0") == "1"
        return cls(device, dtype, graphs, environ.get("PERCO_TORCH_COMPILE", "0"), channels_last)


class _CapturedStep:
    """The denoiser called through a CUDA graph: static input buffers per input shape, replayed per step."""

    def __init__(self, module):
        self.module = module
        self.graphs: Dict[tuple, tuple] = {}  # shapes -> (graph, static inputs, static output)

    def __call__(self, *args):
        key = tuple((tuple(a.shape), a.dtype) for a in args)
        if key not in self.graphs:
            static = [a.clone() for a in args]
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):  # warm-up outside the graph (allocator, cuDNN plans)
                for _ in range(2):
                    self.module(*static)
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                out = self.module(*static)
            self.graphs[key] = (graph, static, out)
        graph, static, out = self.graphs[key]
        for target, source in zip(static, args):
            target.copy_(source)
        graph.replay()
        return out


class TorchFastBackend:
    name = "torch-fast"
    max_size = None  # bounded by memory only (perco.engine.limits)

    def __init__(self, model: ModelInfo, settings: Optional[FastSettings] = None):
        self.settings = s = settings or FastSettings.from_env()
        self.info = model
        self.device = s.device
        self.precision = s.dtype
        self.contract = dict(model.family.contract(bool(model.optional_text)))
        self._dtype = DTYPES[s.dtype]
        self.graphs = {}
        for name, module in model_graphs(model).items():
            dtype = torch.float32 if name in FP32_GRAPHS else self._dtype
            if dtype != self._dtype:  # the VAE serves both directions: the encoder side gets its own FP32 copy
                module = copy.deepcopy(module)
            module = module.to(device=s.device, dtype=dtype)
            if s.channels_last and name in CONV_GRAPHS:
                module = module.to(memory_format=torch.channels_last)
            self.graphs[name] = module
        if model.entropy_model is not None:  # float64 integers: exact on any device
            from perco.export.entropy_model import EntropyGraph

            self.contract[ENTROPY_GRAPH] = ENTROPY_CONTRACT
            self.graphs[ENTROPY_GRAPH] = EntropyGraph(model.entropy_model, device=s.device)
        self._calls = dict(self.graphs)
        if s.compile != "0":
            self._calls["denoiser"] = torch.compile(self.graphs["denoiser"], mode=None if s.compile == "default"
                                                    else s.compile, fullgraph=False)
        if s.cuda_graphs:
            self._calls["denoiser"] = _CapturedStep(self._calls["denoiser"])

    def runs(self, graph: str) -> bool:
        return graph in self.graphs

    @torch.inference_mode()
    def run(self, graph: str, inputs: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
        if graph not in self.graphs:
            raise BackendError(f"unknown graph {graph!r}")
        dtype = torch.float32 if graph in FP32_GRAPHS else self._dtype
        args = []
        for name, kind, _ in self.contract[graph].inputs:
            tensor = torch.from_numpy(np.ascontiguousarray(inputs[name])).to(self.device, non_blocking=True)
            if kind == "float32" and name != "timestep":  # timesteps stay FP32, as diffusers' pipelines pass them
                tensor = tensor.to(dtype)
                if self.settings.channels_last and graph in CONV_GRAPHS and tensor.dim() == 4:
                    tensor = tensor.contiguous(memory_format=torch.channels_last)
            args.append(tensor)
        outputs = self._calls[graph](*args)
        outputs = outputs if isinstance(outputs, (tuple, list)) else (outputs,)
        result = {}
        for (name, kind, _), value in zip(self.contract[graph].outputs, outputs):
            value = value.float() if kind == "float32" else value
            result[name] = value.contiguous().cpu().numpy()
        return result

    @torch.inference_mode()
    def entropy_steps_on_device(self, ids: np.ndarray, positions: np.ndarray):
        """The learned coder's group steps [n_g, K] int64 where they are made: a contiguous CUDA tensor on a GPU
        (the kernels library reads it in place: tables, decode and the next group's input never leave the
        device, only the indices come back), numpy on the CPU. The same integers as `run` gives."""
        graph = self._calls[ENTROPY_GRAPH]
        _, steps = graph(torch.from_numpy(np.ascontiguousarray(ids, dtype=np.int64)).to(self.device))
        rows = torch.from_numpy(np.ascontiguousarray(positions, dtype=np.int64)).to(self.device)
        steps = steps.reshape(steps.shape[0], -1).index_select(1, rows).t().contiguous()
        return steps if steps.is_cuda else steps.numpy()

    def close(self) -> None:
        self.graphs, self._calls = {}, {}
        if self.device == "cuda":
            torch.cuda.empty_cache()


def open_backend(model_dir, artifacts=None, progress=False):
    """(ModelSpec, TorchFastBackend) for a model folder (settings from the environment; see the module doc)."""
    if model_dir is None:
        raise BackendError("the torch-fast backend needs --model DIR (a model folder)")
    info = ModelInfo.open(model_dir)
    return info.spec, TorchFastBackend(info)
