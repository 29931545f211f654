"""A CPU stand-in for `triton_python_backend_utils`, Triton's Python-backend module, serving a repository of
`perco triton-repo`: tests import perco_decode/1/model.py with this module in its place.

What it checks, as Triton would at each BLS call (`InferenceRequest.exec()`): the model named is one of the
repository's; the requested outputs and the inputs sent are exactly those its config.pbtxt declares (parsed
with Triton's ModelConfig schema), with the declared data types and shapes that fit the declared dims (the
batch axis within max_batch_size, the config's `reshape` applied as Triton applies it); for a TensorRT model,
the shapes are inside the engine's optimization profile (engines.json of the engines folder). The model then
runs the ONNX graph its engine was built from (matched by the engine file's SHA-256, as tests/fake_tensorrt.py
does) on ONNX Runtime, and the response's outputs are checked against the declared outputs. So it exercises
model.py's decode loop, tensor names, dtypes, shapes and BLS plumbing against the written configs.

What it cannot: the Triton server itself (loading the repository, the C++ TensorRT and Python backends, the
stub process and its shared memory, scheduling, GPU tensors) and TensorRT execution: the numbers are ONNX
Runtime's. Only a real `tritonserver --model-repository REPO` run on a GPU can check those.
"""

import hashlib
import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
from google.protobuf import json_format, text_format
from tritonclient.grpc import model_config_pb2

TRITONSERVER_MEMORY_CPU = 0
TRITONSERVER_MEMORY_GPU = 1
_NUMPY = {"TYPE_FP32": np.float32, "TYPE_FP16": np.float16, "TYPE_INT64": np.int64, "TYPE_INT32": np.int32,
          "TYPE_INT8": np.int8, "TYPE_UINT8": np.uint8, "TYPE_BOOL": np.bool_}
_SERVED = {}  # model name -> _Model
CALLS = []  # (model name, {input: shape}) of every BLS request that reached a model


class TritonModelException(Exception):
    pass


class TritonError:
    def __init__(self, message, code=None):
        self._message = message

    def message(self):
        return self._message


class PreferredMemory:
    def __init__(self, preferred_memory_type, preferred_device_id=0):
        self.type, self.device_id = preferred_memory_type, preferred_device_id


class Tensor:
    def __init__(self, name, array):
        assert isinstance(array, np.ndarray), f"pb_utils.Tensor({name!r}) takes a numpy array, got {type(array)}"
        self._name, self._array = name, array

    def name(self):
        return self._name

    def as_numpy(self):
        return self._array

    def is_cpu(self):
        return True


class InferenceResponse:
    def __init__(self, output_tensors=None, error=None):
        self._outputs, self._error = list(output_tensors or []), error

    def has_error(self):
        return self._error is not None

    def error(self):
        return self._error

    def output_tensors(self):
        return self._outputs


class InferenceRequest:
    def __init__(self, model_name, requested_output_names, inputs, preferred_memory=None, **kwargs):
        self.model_name, self._requested, self._inputs = model_name, list(requested_output_names), list(inputs)
        self.preferred_memory = preferred_memory

    def inputs(self):
        return self._inputs

    def requested_output_names(self):
        return self._requested

    def exec(self):
        model = _SERVED.get(self.model_name)
        if model is None:
            return InferenceResponse(error=TritonError(f"Request for unknown model: '{self.model_name}'"))
        if self.preferred_memory is not None and self.preferred_memory.type != TRITONSERVER_MEMORY_CPU:
            return InferenceResponse(error=TritonError("this stand-in returns host memory only"))
        try:
            return InferenceResponse(output_tensors=model.infer(self._inputs, self._requested))
        except _Refused as exc:
            return InferenceResponse(error=TritonError(str(exc)))


def get_input_tensor_by_name(request, name):
    return next((t for t in request.inputs() if t.name() == name), None)


def get_output_tensor_by_name(response, name):
    return next((t for t in response.output_tensors() if t.name() == name), None)


class _Refused(Exception):
    """What Triton would answer with an error response."""


class _Model:
    def __init__(self, folder: Path, config, onnx_path=None, profile=None):
        self.folder, self.config, self.profile = folder, config, profile
        self.session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"]) if onnx_path else None

    def request_shape(self, tensor_config, array, kind):
        """The shape the model sees: the request's, checked against the config, after its reshape."""
        name = tensor_config.name
        dtype = model_config_pb2.DataType.Name(tensor_config.data_type)
        if array.dtype != np.dtype(_NUMPY[dtype]):
            raise _Refused(f"{self.config.name}: {kind} '{name}' is {array.dtype}, the config declares {dtype}")
        shape, dims = list(array.shape), list(tensor_config.dims)
        batch = self.config.max_batch_size
        if batch > 0:
            if not shape or not 1 <= shape[0] <= batch:
                raise _Refused(f"{self.config.name}: {kind} '{name}' shape {shape}: batch outside 1..{batch}")
            head, shape = shape[:1], shape[1:]
        else:
            head = []
        if len(shape) != len(dims) or any(d != -1 and d != s for d, s in zip(dims, shape)):
            raise _Refused(f"{self.config.name}: unexpected shape for {kind} '{name}': {head + shape}, the config "
                           f"declares {dims}{' after the batch axis' if batch else ''}")
        if tensor_config.HasField("reshape"):
            shape = list(tensor_config.reshape.shape)
        return head + shape

    def infer(self, inputs, requested):
        declared = {t.name: t for t in self.config.input}
        sent = {t.name(): t.as_numpy() for t in inputs}
        missing = [n for n, t in declared.items() if n not in sent and not t.optional]
        if set(sent) - set(declared) or missing:
            raise _Refused(f"{self.config.name}: inputs {sorted(sent)}, the config declares {sorted(declared)}")
        outputs = {t.name: t for t in self.config.output}
        if not set(requested) <= set(outputs):
            raise _Refused(f"{self.config.name}: unknown outputs {sorted(set(requested) - set(outputs))}")
        feed = {}
        for name, array in sent.items():
            shape = self.request_shape(declared[name], array, "input")
            if self.profile is not None:
                r = self.profile[name]
                if not all(lo <= s <= hi for lo, s, hi in zip(r["min"], shape, r["max"])):
                    raise _Refused(f"{self.config.name}: input '{name}' shape {shape} is outside the engine's profile "
                                   f"{r['min']}..{r['max']}")
            feed[name] = array.reshape(shape)
        CALLS.append((self.config.name, {n: a.shape for n, a in sent.items()}))
        values = dict(zip(requested, self.session.run(requested, feed)))
        results = []
        for name in requested:  # as Triton presents them: the config's dims (a reshape undone), checked
            value, config = values[name], outputs[name]
            if config.HasField("reshape"):
                value = value.reshape([value.shape[0]] + list(config.dims) if self.config.max_batch_size else
                                      list(config.dims))
            self.request_shape(config, value, "output")
            results.append(Tensor(name, value))
        return results


def serve(repo, engines) -> None:
    """Serve the TensorRT models of `repo`: each runs the ONNX graph its model.plan was built from, found through
    the engines folder `engines` (its engines.json names each engine's graph and profile)."""
    repo, engines = Path(repo), Path(engines)
    built = {}
    for entry in json.loads((engines / "engines.json").read_text())["graphs"].values():
        built[hashlib.sha256((engines / entry["file"]).read_bytes()).hexdigest()] = entry
    _SERVED.clear()
    CALLS.clear()
    for config_path in sorted(repo.glob("*/config.pbtxt")):
        config = text_format.Parse(config_path.read_text(), model_config_pb2.ModelConfig())
        assert config.name == config_path.parent.name
        if config.platform == "tensorrt_plan":
            plan = config_path.parent / "1" / "model.plan"
            entry = built[hashlib.sha256(plan.read_bytes()).hexdigest()]
            _SERVED[config.name] = _Model(config_path.parent, config, entry["onnx_path"], entry["shapes"])
        else:
            _SERVED[config.name] = _Model(config_path.parent, config)


def client_request(model_name, inputs):
    """A request from a client to a served Python model, checked against its config as Triton does."""
    model = _SERVED[model_name]
    declared = {t.name: t for t in model.config.input}
    for tensor in inputs:
        if tensor.name() not in declared:
            raise _Refused(f"{model_name}: unexpected input {tensor.name()}")
        model.request_shape(declared[tensor.name()], tensor.as_numpy(), "input")
    return InferenceRequest(model_name, [t.name for t in model.config.output], inputs)


def initialize_args(repo, model_name) -> dict:
    """The `args` Triton's Python backend passes to TritonPythonModel.initialize."""
    model = _SERVED[model_name]
    return {"model_config": json_format.MessageToJson(model.config), "model_instance_kind": "CPU",
            "model_instance_device_id": "0", "model_repository": str(Path(repo) / model_name), "model_version": "1",
            "model_name": model_name}


def check_response(model_name, response) -> None:
    """A Python model's response, checked against its config's outputs as Triton does."""
    if response.has_error():
        return
    outputs = {t.name: t for t in _SERVED[model_name].config.output}
    for tensor in response.output_tensors():
        _SERVED[model_name].request_shape(outputs[tensor.name()], tensor.as_numpy(), "output")
