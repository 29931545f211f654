"""A CPU stand-in for TensorRT's runtime and the CUDA calls of the TensorRT backend.

Device memory is host bytes behind integer addresses; an engine runs the ONNX graph it was
built from on ONNX Runtime, reading its inputs from and writing its outputs to that memory.
Stream capture behaves as CUDA's: captured work does not run until the graph is launched.
What it checks as it goes: reads and writes within allocations, the shared activation memory
set and large enough, input shapes inside the profile, no use after free.
It exercises the backend's own logic (buffers, uploads, addresses, capture, sharing, refit);
it says nothing about TensorRT or CUDA themselves, which only a GPU run can.
"""

import hashlib
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import onnx
import onnx.numpy_helper
import onnxruntime as ort


class FakeCuda:
    name = "fake GPU"
    compute_capability = (9, 0)
    stream = 7

    def __init__(self):
        self.memory = {}  # address -> bytearray
        self.next_address = 1 << 20
        self.capture = None  # list of work while capturing
        self.uploads = 0
        self.launches = 0
        self.graphs_made = 0

    def memory_info(self):
        total = 80 << 30
        return total - sum(len(m) for m in self.memory.values()), total

    def malloc(self, nbytes):
        address, self.next_address = self.next_address, self.next_address + ((max(nbytes, 1) + 255) // 256 + 1) * 256
        self.memory[address] = bytearray(max(nbytes, 1))
        return address

    def free(self, address):
        assert address in self.memory, f"free of unknown address {address}"
        del self.memory[address]

    def view(self, address, nbytes):
        assert address in self.memory, f"use of unallocated or freed address {address}"
        assert nbytes <= len(self.memory[address]), f"{nbytes} bytes at {address} overrun {len(self.memory[address])}"
        return memoryview(self.memory[address])[:nbytes]

    def upload(self, address, array):
        assert self.capture is None, "copies from pageable host memory cannot be captured"
        self.view(address, array.nbytes)[:] = array.tobytes()
        self.uploads += 1

    def download(self, array, address):
        array.reshape(-1).view(np.uint8)[:] = np.frombuffer(self.view(address, array.nbytes), np.uint8)

    def synchronize(self):
        assert self.capture is None

    def begin_capture(self):
        assert self.capture is None
        self.capture = []

    def end_capture(self):
        work, self.capture = self.capture, None
        self.graphs_made += 1
        return SimpleNamespace(work=work, destroyed=False)

    def launch(self, graph):
        assert not graph.destroyed
        self.launches += 1
        for item in graph.work:
            item()

    def destroy_graph(self, graph):
        graph.destroyed = True

    def enqueue(self, work):
        if self.capture is not None:
            self.capture.append(work)
        else:
            work()


class _Enum:
    def __init__(self, name):
        self.name = name

    def __repr__(self):
        return self.name


_DTYPES = {np.dtype(np.float32): _Enum("FLOAT"), np.dtype(np.int64): _Enum("INT64"), np.dtype(np.float16): _Enum("HALF")}


class FakeEngine:
    def __init__(self, onnx_path, shapes, refittable, cuda):
        self.cuda, self.shapes, self.refittable = cuda, shapes, refittable
        self._load(onnx_path)
        self.contexts = []

    def _load(self, onnx_path):
        self.onnx_path = Path(onnx_path)
        self.session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
        self.io = [(i.name, True) for i in self.session.get_inputs()] + [(o.name, False) for o in self.session.get_outputs()]
        self.device_memory_size_v2 = 4096 + 64 * sum(len(n) for n, _ in self.io)

    num_io_tensors = property(lambda self: len(self.io))

    def get_tensor_name(self, i):
        return self.io[i][0]

    def get_tensor_mode(self, name):
        return FakeTrt.TensorIOMode.INPUT if dict(self.io)[name] else FakeTrt.TensorIOMode.OUTPUT

    def get_tensor_dtype(self, name):
        meta = {m.name: m.type for m in self.session.get_inputs() + self.session.get_outputs()}[name]
        return _DTYPES[np.dtype({"tensor(float)": np.float32, "tensor(int64)": np.int64}[meta])]

    def get_tensor_profile_shape(self, name, profile):
        r = self.shapes[name]
        return r["min"], r["opt"], r["max"]

    def create_execution_context(self, strategy):
        assert strategy == FakeTrt.ExecutionContextAllocationStrategy.USER_MANAGED
        context = FakeContext(self)
        self.contexts.append(context)
        return context


class FakeContext:
    def __init__(self, engine):
        self.engine, self.shapes, self.addresses, self.memory = engine, {}, {}, None
        self.executed = 0

    def set_input_shape(self, name, shape):
        r = self.engine.shapes[name]
        if not all(lo <= s <= hi for lo, s, hi in zip(r["min"], shape, r["max"])) or len(shape) != len(r["min"]):
            return False
        self.shapes[name] = tuple(shape)
        return True

    def get_tensor_shape(self, name):
        (out,) = self.engine.session.run([name], {i.name: np.zeros(self.shapes[i.name], _np(i.type))
                                                  for i in self.engine.session.get_inputs()})
        return out.shape

    def set_tensor_address(self, name, address):
        self.addresses[name] = address

    def set_device_memory(self, address, size):
        assert size >= self.engine.device_memory_size_v2
        self.memory = (address, size)

    def execute_async_v3(self, stream):
        assert stream == self.engine.cuda.stream and self.memory is not None, "no activation memory set"
        addresses, shapes = dict(self.addresses), dict(self.shapes)

        def work():
            e = self.engine
            scratch = e.cuda.view(self.memory[0], e.device_memory_size_v2)
            scratch[:] = bytes(len(scratch))  # activations: clobbered by every engine that shares them
            feed = {i.name: np.frombuffer(e.cuda.view(addresses[i.name], _nbytes(shapes[i.name], i.type)),
                                          _np(i.type)).reshape(shapes[i.name]).copy() for i in e.session.get_inputs()}
            for o, value in zip(e.session.get_outputs(), e.session.run(None, feed)):
                e.cuda.view(addresses[o.name], value.nbytes)[:] = np.ascontiguousarray(value).tobytes()
            self.executed += 1

        self.engine.cuda.enqueue(work)
        return True


def _np(ort_type):
    return {"tensor(float)": np.float32, "tensor(int64)": np.int64}[ort_type]


def _nbytes(shape, ort_type):
    return int(np.prod(shape)) * np.dtype(_np(ort_type)).itemsize


class FakeTrt:
    """Enough of the `tensorrt` module for the backend. `engines`: SHA-256 of engine bytes -> (onnx, shapes, refittable)."""

    __version__ = None
    TensorIOMode = SimpleNamespace(INPUT=_Enum("INPUT"), OUTPUT=_Enum("OUTPUT"))
    ExecutionContextAllocationStrategy = SimpleNamespace(USER_MANAGED=_Enum("USER_MANAGED"))

    class ILogger:
        Severity = SimpleNamespace(ERROR=1)

        def __init__(self):
            pass

    def __init__(self, cuda, version):
        self.cuda, self.__version__, self.engines = cuda, version, {}
        fake = self

        class Runtime:
            def __init__(self, logger):
                self.logger = logger

            def deserialize_cuda_engine(self, blob):
                known = fake.engines.get(hashlib.sha256(blob).hexdigest())
                if known is None:
                    self.logger.log(1, "IRuntime::deserializeCudaEngine: not an engine")
                    return None
                return FakeEngine(*known, fake.cuda)

        class Refitter:
            def __init__(self, engine, logger):
                self.engine, self.logger, self.pending = engine, logger, None

            def refit_cuda_engine(self):
                self.engine._load(self.pending)
                return True

        class OnnxParserRefitter:
            def __init__(self, refitter, logger):
                self.refitter = refitter

            def refit_from_file(self, path):
                def topology(p):  # ops, weight shapes, and the values of shape-like constants (int64,
                    graph = onnx.load(str(p)).graph  # Resize scales), which TensorRT bakes into the engine
                    baked = {i for n in graph.node if n.op_type == "Resize" for i in n.input}
                    return ([n.op_type for n in graph.node],
                            {t.name: (tuple(t.dims), onnx.numpy_helper.to_array(t).tobytes()
                                      if t.data_type == onnx.TensorProto.INT64 or t.name in baked else None)
                             for t in graph.initializer})
                if topology(path) != topology(self.refitter.engine.onnx_path):
                    self.refitter.logger.log(1, "refit: weights do not match the engine")
                    return False
                self.refitter.pending = path
                return True

        self.Runtime, self.Refitter, self.OnnxParserRefitter = Runtime, Refitter, OnnxParserRefitter

    def register(self, engines_folder, refittable=None):
        """Make the engines of a real `perco build` folder loadable: each runs the ONNX graph it was built from.
        `refittable` overrides what the build recorded (TensorRT-RTX builds refittable engines only on a GPU)."""
        manifest = json.loads((Path(engines_folder) / "engines.json").read_text())
        for entry in manifest["graphs"].values():
            blob = (Path(engines_folder) / entry["file"]).read_bytes()
            self.engines[hashlib.sha256(blob).hexdigest()] = (entry["onnx_path"], entry["shapes"],
                                                               entry.get("refittable", False) if refittable is None
                                                               else refittable)
        return manifest
