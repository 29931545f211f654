"""The few CUDA runtime calls the TensorRT backend makes, through cuda-python (no torch).

Every call checks its status and raises BackendError naming the call and CUDA's message.
Pointers and streams are plain ints, as TensorRT's Python API takes them.
"""

import numpy as np

from perco.engine.errors import BackendError


def _cudart():
    try:
        from cuda.bindings import runtime  # cuda-python >= 12.6 (package cuda-bindings)
    except ImportError:
        from cuda import cudart as runtime  # older cuda-python
    return runtime


class Cuda:
    """One device, one stream. `check` unwraps cuda-python's (status, value...) tuples."""

    def __init__(self, device: int = 0):
        self.rt = rt = _cudart()
        self.check(rt.cudaSetDevice(device), "cudaSetDevice")
        self.device = device
        props = self.check(rt.cudaGetDeviceProperties(device), "cudaGetDeviceProperties")
        self.name = props.name.decode(errors="replace").rstrip("\0") if isinstance(props.name, bytes) else props.name
        self.compute_capability = (props.major, props.minor)
        self.stream = int(self.check(rt.cudaStreamCreateWithFlags(rt.cudaStreamNonBlocking), "cudaStreamCreate"))

    def check(self, result, what: str):
        status, *values = result if isinstance(result, tuple) else (result,)
        if status != self.rt.cudaError_t.cudaSuccess:
            _, message = self.rt.cudaGetErrorString(status)
            raise BackendError(f"{what} failed: {message.decode() if isinstance(message, bytes) else message}")
        return values[0] if len(values) == 1 else values or None

    def malloc(self, nbytes: int) -> int:
        return int(self.check(self.rt.cudaMalloc(max(nbytes, 1)), f"cudaMalloc({nbytes} bytes)"))

    def free(self, ptr: int) -> None:
        self.check(self.rt.cudaFree(ptr), "cudaFree")

    def upload(self, ptr: int, array: np.ndarray) -> None:
        """Host -> device on the stream. `array` must stay alive until the stream is synchronized."""
        kind = self.rt.cudaMemcpyKind.cudaMemcpyHostToDevice
        self.check(self.rt.cudaMemcpyAsync(ptr, array.ctypes.data, array.nbytes, kind, self.stream), "upload")

    def download(self, array: np.ndarray, ptr: int) -> None:
        kind = self.rt.cudaMemcpyKind.cudaMemcpyDeviceToHost
        self.check(self.rt.cudaMemcpyAsync(array.ctypes.data, ptr, array.nbytes, kind, self.stream), "download")

    def synchronize(self) -> None:
        self.check(self.rt.cudaStreamSynchronize(self.stream), "cudaStreamSynchronize")

    def begin_capture(self) -> None:
        mode = self.rt.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal
        self.check(self.rt.cudaStreamBeginCapture(self.stream, mode), "cudaStreamBeginCapture")

    def end_capture(self) -> int:
        """The captured work as an instantiated graph, ready to launch."""
        graph = self.check(self.rt.cudaStreamEndCapture(self.stream), "cudaStreamEndCapture")
        try:
            return self.check(self.rt.cudaGraphInstantiate(graph, 0), "cudaGraphInstantiate")
        finally:
            self.rt.cudaGraphDestroy(graph)

    def launch(self, graph_exec) -> None:
        self.check(self.rt.cudaGraphLaunch(graph_exec, self.stream), "cudaGraphLaunch")

    def destroy_graph(self, graph_exec) -> None:
        self.rt.cudaGraphExecDestroy(graph_exec)

    def memory_info(self) -> tuple:
        """(free, total) bytes on the device."""
        return tuple(self.check(self.rt.cudaMemGetInfo(), "cudaMemGetInfo"))


def open_cuda(device: int = 0) -> Cuda:
    """A Cuda for `device`, or BackendError saying what is missing (cuda-python, a driver, a GPU)."""
    try:
        _cudart()
    except ImportError:
        raise BackendError("the tensorrt backend needs cuda-python: pip install cuda-bindings") from None
    try:
        return Cuda(device)
    except BackendError as exc:
        raise BackendError(f"no usable CUDA device {device}: {exc}") from None
