"""The decode model of a `perco triton-repo` repository; written there, byte for byte, as perco_decode/1/model.py.

Triton's Python backend runs it. Each request's BITSTREAM (uint8 [N], the bytes of one bitstream) is decoded
by PerCo Engine's own decode loop (`perco.engine.codec.Codec`: entropy decoding, the sampler, the noise and
guidance in numpy), with a backend whose every network call is a BLS request to the repository's TensorRT
model of that graph: the networks run on Triton's TensorRT backend, the loop here. The response's IMAGE is
uint8 [H, W, 3] at the original size; STEPS (int32 [1]) and GUIDANCE (fp32 [1]) are optional overrides of the
bitstream's hints. A bitstream the model cannot decode (corrupt, another model's, over the engines' profile)
answers that request with an error; the other requests of the batch are decoded.

Needs perco-engine (its runtime: numpy, no torch) importable in the Python backend's environment. The model
description (engines.json, tokenizer) is read from perco_spec/ beside this file.
"""

from pathlib import Path

import numpy as np

SPEC_FOLDER = "perco_spec"  # in the model version folder, beside model.py
BITSTREAM, IMAGE, STEPS, GUIDANCE = "BITSTREAM", "IMAGE", "STEPS", "GUIDANCE"


class TritonBackend:
    """A perco Backend over BLS: `run(graph, inputs)` is one InferenceRequest to the graph's TensorRT model.

    `manifest`: the repository's copy of engines.json, whose graph entries name their Triton model
    (`triton_model`) and the tensors sent with a trailing axis of 1 that the model's config `reshape` drops
    (`triton_reshape`: rank-1 tensors of a batching model, which Triton cannot declare with empty dims).
    """

    name = "triton"
    device = "cuda"

    def __init__(self, pb_utils, manifest: dict):
        from perco.engine import families
        from perco.engine.backends.tensorrt import profile_size

        self.pb = pb_utils
        self.contract = families.manifest_contract(manifest)
        self.entries = {graph: manifest["graphs"][graph] for graph in self.contract if graph in manifest["graphs"]}
        self.precision = manifest.get("precision", "mixed")
        self.max_size = profile_size(manifest)
        # Outputs are wanted in host memory (numpy); PreferredMemory exists from Triton 23.04 on.
        preferred = getattr(pb_utils, "PreferredMemory", None)
        self.request_options = {"preferred_memory": preferred(pb_utils.TRITONSERVER_MEMORY_CPU, 0)} if preferred else {}

    def runs(self, graph: str) -> bool:
        return graph in self.entries  # the learned entropy model's network is left to the numpy reference

    def run(self, graph: str, inputs: dict) -> dict:
        from perco.engine.errors import BackendError

        entry = self.entries.get(graph)
        if entry is None:
            raise BackendError(f"this Triton repository has no model for graph {graph!r}")
        model, reshaped = entry["triton_model"], set(entry.get("triton_reshape", ()))
        contract = self.contract[graph]
        tensors = []
        for name, dtype, _ in contract.inputs:
            array = np.ascontiguousarray(inputs[name], dtype=dtype)
            tensors.append(self.pb.Tensor(name, array.reshape(*array.shape, 1) if name in reshaped else array))
        names = [name for name, _, _ in contract.outputs]
        request = self.pb.InferenceRequest(model_name=model, requested_output_names=names, inputs=tensors,
                                           **self.request_options)
        response = request.exec()
        if response.has_error():
            raise BackendError(f"Triton model {model}: {response.error().message()}")
        results = {}
        for name in names:
            tensor = self.pb.get_output_tensor_by_name(response, name)
            if tensor is None:
                raise BackendError(f"Triton model {model} answered without output {name}")
            if not tensor.is_cpu():
                raise BackendError(f"Triton model {model} returned {name} in GPU memory: BLS outputs in host memory "
                                   "need Triton 23.04 or later (InferenceRequest preferred_memory)")
            value = tensor.as_numpy()
            results[name] = value.reshape(value.shape[:-1]) if name in reshaped else value
        return results

    def close(self) -> None:
        """Nothing to release: the TensorRT models belong to Triton."""


class TritonPythonModel:
    """perco_decode: bitstream in, image out, through the repository's TensorRT models."""

    def initialize(self, args):
        import triton_python_backend_utils as pb_utils

        try:
            from perco.engine.backends.tensorrt import spec_from_engines
            from perco.engine.codec import Codec
            from perco.engine.limits import backend_memory, decode_limit
        except ImportError as exc:
            raise RuntimeError(f"perco_decode needs perco-engine in Triton's Python backend environment ({exc.name} "
                               "is missing): pip install perco-engine in the server's image, or point "
                               "EXECUTION_ENV_PATH at a packed environment that has it") from None
        self.pb = pb_utils
        folder = Path(args["model_repository"]) / args["model_version"] / SPEC_FOLDER
        spec, manifest = spec_from_engines(folder)
        backend = TritonBackend(pb_utils, manifest)
        # the engines' profile bounds the image size (there is no device memory to estimate from here)
        self.codec = Codec(spec, backend, decode_limit(spec.sizes, backend_memory("tensorrt", backend.max_size)))

    def execute(self, requests):
        from perco.engine.errors import PercoError

        responses = []
        for request in requests:
            try:
                image = self._decode(request)  # uint8 [H, W, 3]
            except PercoError as exc:  # this request's input: the others still decode
                responses.append(self.pb.InferenceResponse(error=self.pb.TritonError(str(exc))))
                continue
            responses.append(self.pb.InferenceResponse(output_tensors=[self.pb.Tensor(IMAGE, image)]))
        return responses

    def _decode(self, request) -> np.ndarray:
        from perco.engine.bitstream import MAX_STEPS
        from perco.engine.errors import PercoError

        data = self.pb.get_input_tensor_by_name(request, BITSTREAM).as_numpy()
        steps = self._scalar(request, STEPS)
        guidance = self._scalar(request, GUIDANCE)
        if steps is not None and not 1 <= steps <= MAX_STEPS:
            raise PercoError(f"{STEPS} must be in 1..{MAX_STEPS}, got {steps}")
        return self.codec.decompress(np.ascontiguousarray(data, dtype=np.uint8).tobytes(),
                                     steps=None if steps is None else int(steps),
                                     guidance=None if guidance is None else float(guidance))

    def _scalar(self, request, name: str):
        from perco.engine.errors import PercoError

        tensor = self.pb.get_input_tensor_by_name(request, name)
        if tensor is None:  # an optional input the client left out
            return None
        values = tensor.as_numpy().reshape(-1)
        if values.size != 1:
            raise PercoError(f"{name} must hold one value, got {values.size}")
        return values[0].item()

    def finalize(self):
        self.codec.close()
