"""TensorRT backend: runs the engines of `perco build` (full TensorRT or TensorRT-RTX). No torch.

- One CUDA stream; device buffers through cuda-python; `execute_async_v3`.
- Activation memory shared: every execution context is created USER_MANAGED and given the same
  scratch buffer, sized for the largest engine (the networks run one after another on one stream).
- Inputs that stay the same across denoising steps (text embeddings, local features) are
  uploaded once per decode; the denoiser call is captured in a CUDA graph the second time a
  shape is seen (TensorRT must have run once at a shape before capture) and replayed after.
- Refit: `switch(other_engines)` moves to another build (another rate of the same family).
  Engines with the same key stay loaded as they are; refittable engines of the same topology
  take the other model's weights in place (no second UNet in device memory); the rest load.
- TensorRT-RTX compiles kernels at run time; its runtime cache is kept in the engines folder.
"""

import sys
from pathlib import Path
from typing import Dict, Optional

import numpy as np

from perco.engine import families, plugins
from perco.engine.errors import BackendError, ModelError
from perco.engine.files import atomic_write

FLAVOR_MODULES = {"tensorrt": "tensorrt", "tensorrt-rtx": "tensorrt_rtx"}
ENGINES_MANIFEST = "engines.json"
ENGINES_FORMAT = 1
RUNTIME_CACHE = "runtime-tensorrt-rtx.cache"
_STEP_CONSTANT_INPUTS = {"text_embeddings", "local_features"}
_CAPTURED_GRAPHS = {"denoiser"}  # called once per step with the same shapes
DECODER_GRAPHS = ("text_encoder", "local_features", "denoiser", "vae_decoder")  # loaded at open
ENCODER_GRAPHS = ("vae_encoder", "hyper_encoder")  # optional in an engines folder; loaded at first compress
_NUMPY = {"FLOAT": np.float32, "HALF": np.float16, "INT32": np.int32, "INT64": np.int64, "INT8": np.int8,
          "UINT8": np.uint8, "BOOL": np.bool_}
# Messages TensorRT-RTX logs while probing for a GPU it does not need (ahead-of-time builds on a CPU).
_GPU_PROBING = ("CUDA driver version is insufficient", "cudaError 35", "cudaError 100")


def import_flavor(name: str):
    """The TensorRT Python module of a flavor, or None if it is missing or only PyPI's stub."""
    try:
        module = __import__(FLAVOR_MODULES[name])
    except Exception:  # the PyPI 'tensorrt' stub can fail in odd ways at import
        return None
    return module if hasattr(module, "Builder") or hasattr(module, "Runtime") else None


def make_logger(trt, flavor: str, log):
    """A TensorRT logger that keeps errors for our messages and drops GPU-probing noise."""

    class Logger(trt.ILogger):
        def __init__(self):
            trt.ILogger.__init__(self)
            self.errors = []

        def log(self, severity, msg):
            if severity > trt.ILogger.Severity.ERROR or any(text in msg for text in _GPU_PROBING):
                return
            self.errors.append(msg)
            log(f"    [{flavor}] {msg}")

    return Logger()


def read_engines(folder) -> dict:
    """The engine manifest of a `perco build` folder, checked for completeness."""
    from perco.engine.model import read_json

    path = Path(folder) / ENGINES_MANIFEST
    manifest = read_json(path, missing=f"{folder} holds no engines ({ENGINES_MANIFEST} missing): run 'perco build'")
    if manifest.get("format") != ENGINES_FORMAT:
        raise ModelError(f"{path} is not a format-{ENGINES_FORMAT} engine manifest: re-run 'perco build'")
    needed = decoder_graphs(manifest)
    missing = sorted(set(needed) - set(manifest.get("graphs", {})))
    if missing:
        raise ModelError(f"{path} lacks engines for: {', '.join(missing)} (a decoder needs "
                         f"{', '.join(needed)})")
    return manifest


def decoder_graphs(manifest: dict) -> tuple:
    """The graphs a decoder loads at open: DECODER_GRAPHS, plus the model's optional text encoder (T5)."""
    known = DECODER_GRAPHS + ENCODER_GRAPHS
    return DECODER_GRAPHS + tuple(g for g in families.manifest_contract(manifest) if g not in known)


class _Engine:
    """One engine, its execution context, its device buffers and its captured CUDA graphs."""

    def __init__(self, name: str, entry: dict, engine, context, backend: "TensorRTBackend"):
        self.name, self.entry, self.engine, self.context, self.backend = name, entry, engine, context, backend
        trt = backend.trt
        io = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        self.inputs = [n for n in io if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.outputs = [n for n in io if engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        contract = backend.graphs[name]
        expected = ({n for n, _, _ in contract.inputs}, {n for n, _, _ in contract.outputs})
        if (set(self.inputs), set(self.outputs)) != expected:
            raise ModelError(f"engine {entry['file']} has inputs {self.inputs} and outputs {self.outputs}, "
                             f"not those of {name}: {sorted(expected[0])} -> {sorted(expected[1])}")
        self.dtypes = {n: _numpy_dtype(engine.get_tensor_dtype(n), entry["file"], n) for n in io}
        self.buffers: Dict[str, tuple] = {}  # name -> (pointer, capacity in bytes)
        self.uploaded: Dict[str, np.ndarray] = {}  # step-constant input -> the array now on the device
        self.graphs: Dict[tuple, object] = {}  # (shapes, pointers) of the last call -> instantiated CUDA graph
        self.last_key: Optional[tuple] = None  # run once uncaptured: capturable from the next call on
        self.capturable = backend.cuda_graphs and name in _CAPTURED_GRAPHS

    def buffer(self, name: str, nbytes: int) -> int:
        ptr, capacity = self.buffers.get(name, (0, -1))
        if nbytes > capacity:
            cuda = self.backend.cuda
            if ptr:
                cuda.free(ptr)
            ptr = cuda.malloc(nbytes)
            self.buffers[name] = (ptr, nbytes)
            self.uploaded.pop(name, None)
            self.drop_graphs()  # captured graphs hold the old address
        return ptr

    def drop_graphs(self) -> None:
        for graph_exec in self.graphs.values():
            self.backend.cuda.destroy_graph(graph_exec)
        self.graphs.clear()
        self.last_key = None

    def run(self, inputs: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
        cuda, context = self.backend.cuda, self.context
        shapes, in_flight = [], []  # in_flight: host arrays the stream reads until it is synchronized
        for name in self.inputs:
            array = np.ascontiguousarray(inputs[name], dtype=self.dtypes[name])
            if not context.set_input_shape(name, array.shape):
                low, _, high = self.engine.get_tensor_profile_shape(name, 0)
                raise BackendError(f"{self.name}: input {name} of shape {tuple(array.shape)} is outside the engine's "
                                   f"profile {tuple(low)}..{tuple(high)}; rebuild with 'perco build --batch/--height/"
                                   "--width'")
            ptr = self.buffer(name, array.nbytes)
            if name not in _STEP_CONSTANT_INPUTS or self.uploaded.get(name) is not array:
                cuda.upload(ptr, array)
                if name in _STEP_CONSTANT_INPUTS:
                    self.uploaded[name] = array  # kept alive, so identity means "unchanged"
                in_flight.append(array)
            context.set_tensor_address(name, ptr)
            shapes.append(array.shape)
        results = {}
        for name in self.outputs:
            shape = tuple(context.get_tensor_shape(name))
            results[name] = np.empty(shape, dtype=self.dtypes[name])
            context.set_tensor_address(name, self.buffer(name, results[name].nbytes))
        self._execute((tuple(shapes), tuple(p for p, _ in self.buffers.values())))
        for name, array in results.items():
            cuda.download(array, self.buffers[name][0])
        cuda.synchronize()
        return results

    def _execute(self, key: tuple) -> None:
        """Replay the captured graph of `key`, or capture it, or run uncaptured.

        Only the graph of the latest shapes is kept: a context's shape-dependent internal state is
        rewritten by a run at other shapes, so an older graph could replay stale state.
        """
        cuda = self.backend.cuda
        if key != self.last_key:
            self.drop_graphs()
        graph_exec = self.graphs.get(key)
        if graph_exec is not None:
            cuda.launch(graph_exec)
            return
        if self.capturable and key == self.last_key and self._stream_capturable():
            cuda.begin_capture()
            ok, graph_exec = False, None
            try:
                ok = self.context.execute_async_v3(cuda.stream)
            finally:
                try:  # always end the capture, even after a failed enqueue
                    graph_exec = cuda.end_capture()
                except BackendError:
                    ok = False
            if ok:
                self.graphs[key] = graph_exec
                cuda.launch(graph_exec)
                return
            if graph_exec is not None:
                cuda.destroy_graph(graph_exec)
            self.capturable = False  # this engine cannot be captured: run it uncaptured from now on
        if not self.context.execute_async_v3(cuda.stream):
            errors = self.backend.logger.errors
            raise BackendError(f"{self.name}: execute_async_v3 failed: {errors[-1] if errors else 'no message'}")
        self.last_key = key

    def _stream_capturable(self) -> bool:
        check = getattr(self.context, "is_stream_capturable", None)  # TensorRT-RTX: false while it still compiles
        return check(self.backend.cuda.stream) if check is not None else True

    def release(self) -> None:
        self.drop_graphs()
        for ptr, _ in self.buffers.values():
            self.backend.cuda.free(ptr)
        self.buffers.clear()
        self.uploaded.clear()


class TensorRTBackend:
    name = "tensorrt"
    device = "cuda"

    def __init__(self, folder, manifest: dict, cuda=None, trt=None, cuda_graphs: bool = True, log=None):
        from perco.engine.cuda import open_cuda

        self.folder, self.manifest = Path(folder), manifest
        self.graphs = families.manifest_contract(manifest)
        self.max_size = profile_size(manifest)  # (height, width): larger images are outside every profile
        self.precision = manifest.get("precision", "mixed")
        self.flavor = manifest.get("flavor", "")
        if trt is None and self.flavor in FLAVOR_MODULES:
            trt = import_flavor(self.flavor)
        if trt is None:
            install = "pip install tensorrt-rtx" if self.flavor == "tensorrt-rtx" else "install TensorRT"
            raise BackendError(f"engines in {folder} were built with {self.flavor!r}, which is not installed: {install}")
        self.trt = trt
        built = manifest.get("version")
        if built and getattr(trt, "__version__", built) != built:
            raise ModelError(f"engines in {folder} were built with {self.flavor} {built}, this is "
                             f"{trt.__version__}: rebuild them with 'perco build'")
        self.cuda = cuda or open_cuda()  # cuda: a perco.engine.cuda.Cuda (or a stand-in with its methods)
        self.cuda_graphs = cuda_graphs
        self.logger = make_logger(self.trt, self.flavor, log or (lambda text: print(text, file=sys.stderr)))
        self.runtime = self.trt.Runtime(self.logger)
        self._scratch, self._scratch_bytes = 0, 0
        self._runtime_cache = None
        self.engines = {name: self._load(name, self.folder, manifest["graphs"][name])
                        for name in decoder_graphs(manifest)}
        self._share_activation_memory()

    # --- loading --------------------------------------------------------------------------

    def _load(self, name: str, folder: Path, entry: dict) -> _Engine:
        path = folder / entry["file"]
        try:
            blob = path.read_bytes()
        except OSError as exc:
            raise ModelError(f"cannot read engine {path}: {exc.strerror}") from None
        self.logger.errors.clear()
        engine = self.runtime.deserialize_cuda_engine(blob)
        if engine is None:
            reason = self.logger.errors[-1] if self.logger.errors else "no message"
            raise ModelError(f"{self.flavor} cannot load engine {path} on {self.cuda.name} "
                             f"(compute capability {'.'.join(map(str, self.cuda.compute_capability))}): {reason}")
        return _Engine(name, entry, engine, self._context(engine), self)

    def _context(self, engine):
        strategy = self.trt.ExecutionContextAllocationStrategy.USER_MANAGED
        if not hasattr(engine, "create_runtime_config"):  # full TensorRT
            return engine.create_execution_context(strategy)
        config = engine.create_runtime_config()  # TensorRT-RTX: runtime cache for its JIT kernels
        config.set_execution_context_allocation_strategy(strategy)
        if self._runtime_cache is None:
            self._runtime_cache = config.create_runtime_cache()
            cache_file = self.folder / RUNTIME_CACHE
            if cache_file.is_file():
                self._runtime_cache.deserialize(cache_file.read_bytes())
        config.set_runtime_cache(self._runtime_cache)
        return engine.create_execution_context(config)

    def _share_activation_memory(self) -> None:
        need = max(e.engine.device_memory_size_v2 for e in self.engines.values())
        if need > self._scratch_bytes:
            if self._scratch:
                self.cuda.free(self._scratch)
            self._scratch, self._scratch_bytes = self.cuda.malloc(need), need
            for e in self.engines.values():
                e.drop_graphs()
        for e in self.engines.values():
            e.context.set_device_memory(self._scratch, self._scratch_bytes)

    @property
    def activation_bytes(self) -> int:
        """Device memory shared by every engine's activations (the largest engine's need)."""
        return self._scratch_bytes

    # --- running --------------------------------------------------------------------------

    def runs(self, graph: str) -> bool:
        """TensorRT builds the family's networks; the entropy model's integer network is left to numpy."""
        return graph in self.graphs and graph in self.manifest["graphs"]

    def run(self, graph: str, inputs: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
        if graph not in self.engines:
            if graph not in self.graphs:
                raise BackendError(f"unknown graph {graph!r}")
            entry = self.manifest["graphs"].get(graph)
            if entry is None:
                raise ModelError(f"engines in {self.folder} have no {graph} engine (a decode-only build): "
                                 "build every graph to compress")
            self.engines[graph] = self._load(graph, self.folder, entry)
            self._share_activation_memory()
        return self.engines[graph].run(inputs)

    # --- switching builds: keep, refit or load ------------------------------------------------

    def switch(self, folder) -> dict:
        """Move to the engines of `folder` (another rate of the same family): what happened per graph.

        Same key: kept as loaded. Refittable, same topology: refitted in place from the other
        build's ONNX weights. Otherwise: the other engine is loaded.
        """
        folder = Path(folder)
        manifest = read_engines(folder)
        if manifest.get("flavor") != self.flavor:
            raise ModelError(f"engines in {folder} are {manifest.get('flavor')}, loaded ones are {self.flavor}")
        actions = {}
        for name in list(self.engines):
            entry, current = manifest["graphs"].get(name), self.engines[name]
            if entry is None:  # an encoder engine the other build lacks
                current.release()
                del self.engines[name]
                actions[name] = "released"
                continue
            if entry["key"] == current.entry["key"]:
                actions[name] = "kept"
                continue
            if current.engine.refittable and self._refit(current, folder, entry):
                current.entry = entry
                actions[name] = "refitted"
                continue
            current.release()
            self.engines[name] = self._load(name, folder, entry)
            actions[name] = "loaded"
        self._share_activation_memory()
        self.folder, self.manifest = folder, manifest
        return actions

    def _refit(self, current: _Engine, folder: Path, entry: dict) -> bool:
        source = _weights_source(folder, entry)
        if source is None:
            return False
        refitter = self.trt.Refitter(current.engine, self.logger)
        parser = self.trt.OnnxParserRefitter(refitter, self.logger)
        self.logger.errors.clear()
        if not parser.refit_from_file(str(source)) or not refitter.refit_cuda_engine():
            return False  # another topology: the caller loads the other engine instead
        current.drop_graphs()  # captured graphs may hold the old weights' addresses
        return True

    def close(self) -> None:
        if self._runtime_cache is not None:  # keep what TensorRT-RTX compiled for the next process
            try:
                atomic_write(self.folder / RUNTIME_CACHE, bytes(self._runtime_cache.serialize()))
            except OSError:
                pass
        for e in self.engines.values():
            e.release()
        self.engines = {}
        self._runtime_cache = None
        if self._scratch:
            self.cuda.free(self._scratch)
            self._scratch = 0


def _weights_source(folder: Path, entry: dict) -> Optional[Path]:
    """The ONNX graph an engine was built from (its weights), if it is still where the build left it."""
    for candidate in (folder / entry["onnx"], Path(entry["onnx_path"])):
        if candidate.is_file():
            return candidate
    return None


def _numpy_dtype(dtype, file: str, tensor: str):
    try:
        return _NUMPY[dtype.name]
    except KeyError:
        raise ModelError(f"engine {file}: tensor {tensor} has type {dtype.name}, which numpy cannot hold; "
                         "rebuild from graphs with float32/int64 inputs and outputs") from None


def open_backend(model_dir=None, artifacts=None, progress: bool = False):
    """(ModelSpec, backend) from an engines folder (`perco build`), given as `artifacts`. With only
    `model_dir`, export it and build FP16 engines into the cache first (needs the export extra)."""
    from perco.engine.cuda import open_cuda
    from perco.engine.model import ModelInfo

    cuda = open_cuda()  # before any export or build: fail fast where there is no GPU
    if artifacts is None:
        if model_dir is None:
            raise BackendError("the tensorrt backend needs --artifacts ENGINES (a folder from 'perco build') "
                               "or --model DIR")
        build_into_cache = plugins.load("perco.hooks", "build_into_cache",
                                        "the tensorrt backend without --artifacts (building --model first)")
        artifacts = build_into_cache(model_dir, progress)
    spec, manifest = spec_from_engines(artifacts)
    if model_dir is not None and ModelInfo.open(model_dir).fingerprint != spec.fingerprint:
        raise ModelError(f"engines in {artifacts} were built from another model than {model_dir}")
    return spec, TensorRTBackend(artifacts, manifest, cuda=cuda)


def spec_from_engines(folder) -> tuple:
    """(ModelSpec, engine manifest) of a `perco build` folder."""
    from perco.engine.model import ModelSpec

    manifest = read_engines(folder)
    tokenizer = Path(folder) / manifest["tokenizer"] if manifest.get("tokenizer") else None
    entropy = Path(folder) / manifest["entropy_model"] if manifest.get("entropy_model") else None
    return ModelSpec.from_dict(manifest["model"], tokenizer_dir=tokenizer, entropy_dir=entropy), manifest


def profile_size(manifest: dict):
    """(height, width) of the largest padded image the engines' profiles accept (denoiser and VAE decoder)."""
    sides = []
    for graph, tensor in (("denoiser", "sample"), ("vae_decoder", "latent")):
        try:
            sides.append(manifest["graphs"][graph]["shapes"][tensor]["max"][2:4])
        except (KeyError, TypeError, IndexError):
            continue
    if not sides:
        return None
    return tuple(8 * min(int(side[i]) for side in sides) for i in (0, 1))
