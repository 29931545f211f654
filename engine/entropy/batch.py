"""Batched rANS over many independent streams: the CUDA library when a GPU is there, else the CPU.

Both paths produce the same words and the same per-stream status (docs/entropy-coding.md):
    OK         every word consumed and the coder state back to empty
    CORRUPT    a stream ends in a zero word, or at least one whole word is left unread
    TRUNCATED  all words read but the state did not return to empty
The CUDA library (`libperco_kernels.so`, built by the top-level CMakeLists.txt) is found through
$PERCO_KERNELS_LIB; it is loaded with ctypes, so no torch or CUDA array library is needed. The CPU
path is the stream coder of `perco.engine.entropy.rans` (constriction, or the built-in coder where
constriction is missing), so it runs wherever the bitstream decodes.

Beyond one stream per sequence (`encode` / `decode`):
  - split streams (`encode_split` / `decode_split`): a sequence coded as P independent streams,
    symbol t in sub-stream t mod P, so P GPU threads decode it (`split_symbols` gives the
    sub-sequences; each sub-stream is an ordinary stream the CPU coder decodes alone);
  - resumable decoding (`BatchCoder.resumable` -> `ResumableDecoder`): chunk after chunk, each
    chunk's tables known only once the previous chunks are decoded (the learned entropy model);
    on the GPU the coder state stays on the device between chunks, the tables can be made there
    from integer logit steps, and only the symbols come back (`StepsStreamDecoder` is the
    single-stream form the learned index coder needs);
  - `DeviceArray`: device memory through the library, for callers without torch or cupy (any
    object with `__cuda_array_interface__` is accepted where device steps are).
"""

import ctypes
import os
from dataclasses import dataclass
from typing import List, Optional, Sequence

import numpy as np

from perco.engine.entropy import rans
from perco.engine.entropy.tables import PROB_TOTAL, tables_from_steps, uniform_table
from perco.engine.errors import BitstreamError

OK, CORRUPT, TRUNCATED = 0, 1, 2
UNIFORM, STATIC, PER_SYMBOL = 0, 1, 2


@dataclass(frozen=True)
class Model:
    """uniform over `num_symbols`; or one int table [K] per batch; or one table per symbol [S, K]."""

    num_symbols: int
    table: Optional[np.ndarray] = None  # [K] (static) or [S, K] (per symbol), entries >= 1, rows sum 2^24

    @property
    def kind(self) -> int:
        if self.table is None:
            return UNIFORM
        return STATIC if self.table.ndim == 1 else PER_SYMBOL

    def cdf(self) -> np.ndarray:
        table = uniform_table(self.num_symbols)[None] if self.table is None else np.atleast_2d(self.table)
        out = np.zeros((table.shape[0], self.num_symbols + 1), dtype=np.uint32)
        out[:, 1:] = np.cumsum(table, axis=1)
        assert (out[:, -1] == PROB_TOTAL).all(), "tables must sum to 2^24"
        return out

    def static_table(self) -> np.ndarray:
        """The one table of a uniform or static model."""
        return uniform_table(self.num_symbols) if self.table is None else self.table


def split_counts(count: int, splits: int) -> np.ndarray:
    """Symbols of each of the `splits` sub-streams of a `count`-symbol sequence: ceil((count - j) / P)."""
    j = np.arange(splits, dtype=np.int64)
    return np.maximum(0, (count - j + splits - 1) // splits)


def split_symbols(symbols: np.ndarray, splits: int) -> List[np.ndarray]:
    """The sub-sequences of split streams: sub-stream j holds symbols[j::splits]."""
    return [symbols[j::splits] for j in range(splits)]


class _Perco(ctypes.Structure):
    _fields_ = [("kind", ctypes.c_int), ("num_symbols", ctypes.c_uint32),
                ("cdf", ctypes.c_void_p), ("table_index", ctypes.c_void_p)]


_u32, _u64, _size, _ptr_t, _int = ctypes.c_uint32, ctypes.c_uint64, ctypes.c_size_t, ctypes.c_void_p, ctypes.c_int
_SIGNATURES = {  # name: argument types (all return perco_result, an int, except where noted)
    "perco_rans_decode_host": [_Perco, _size, _size, _ptr_t, _ptr_t, _ptr_t, _u32, _ptr_t, _ptr_t],
    "perco_rans_encode_host": [_Perco, _size, _size, _ptr_t, _ptr_t, _u32, _ptr_t, _ptr_t, _ptr_t],
    "perco_rans_decode_split_host": [_Perco, _size, _size, _ptr_t, _ptr_t, _ptr_t, _u32, _u32, _ptr_t, _ptr_t],
    "perco_rans_encode_split_host": [_Perco, _size, _size, _ptr_t, _ptr_t, _u32, _u32, _ptr_t, _ptr_t, _ptr_t],
    "perco_rans_decode_split": [_Perco, _ptr_t, _ptr_t, _ptr_t, _u32, _u32, _ptr_t, _ptr_t, _ptr_t],
    "perco_decoder_create_host": [_ptr_t, _ptr_t, _u32, _u32, _ptr_t, ctypes.POINTER(_ptr_t)],
    "perco_decoder_decode_host": [_ptr_t, _Perco, _size, _size, _ptr_t, _u64, _ptr_t, _ptr_t],
    "perco_decoder_decode_steps": [_ptr_t, _ptr_t, _int, _u32, _ptr_t, _u64, _ptr_t, _ptr_t],
    "perco_decoder_finish_host": [_ptr_t, _ptr_t],
    "perco_tables_from_steps_host": [_ptr_t, _int, _u32, _u32, _ptr_t, _ptr_t, _ptr_t],
    "perco_sample_steps_host": [_ptr_t, _int, _u32, _u32, _u64, _u64, _ptr_t, _ptr_t, _ptr_t],
    "perco_device_alloc": [_size, ctypes.POINTER(_ptr_t)],
    "perco_device_free": [_ptr_t],
    "perco_device_copy": [_ptr_t, _ptr_t, _size, _int],
    "perco_device_synchronize": [],
    "perco_copy_bandwidth_host": [_size, _int, ctypes.POINTER(ctypes.c_double)],
}


_LIBRARIES = {}  # path -> the loaded library (or None): loaded and described once per process


def _load_library():
    path = os.environ.get("PERCO_KERNELS_LIB")
    if not path:
        return None
    if path not in _LIBRARIES:
        _LIBRARIES[path] = _open_library(path)
    return _LIBRARIES[path]


def _open_library(path: str):
    try:
        lib = ctypes.CDLL(path)
    except OSError:
        return None
    lib.perco_cuda_device_count.restype = ctypes.c_int
    if lib.perco_cuda_device_count() <= 0:
        return None
    for name, argtypes in _SIGNATURES.items():
        function = getattr(lib, name, None)
        if function is None:  # a library built from older sources
            return None
        function.argtypes, function.restype = argtypes, ctypes.c_int
    lib.perco_decoder_destroy.argtypes, lib.perco_decoder_destroy.restype = [_ptr_t], None
    return lib


def _check(result: int, what: str) -> None:
    if result != 0:
        kind = "invalid argument" if result == 1 else "CUDA error"
        raise RuntimeError(f"{what} failed with code {result} ({kind})")


def _ptr(array: np.ndarray):
    return ctypes.c_void_p(array.ctypes.data)


def _offsets(counts) -> np.ndarray:
    return np.concatenate([[0], np.cumsum(np.asarray(counts, dtype=np.uint64), dtype=np.uint64)]).astype(np.uint64)


def _spec(model: Model, cdf: Optional[np.ndarray]) -> _Perco:
    return _Perco(model.kind, model.num_symbols, cdf.ctypes.data if cdf is not None else None, None)


class DeviceArray:
    """A C-contiguous array in device memory allocated through the kernels library (freed with it).

    Exposes `__cuda_array_interface__` (torch.as_tensor and cupy.asarray take it on a GPU). With the
    host emulation of the kernels (kernels/host) the "device" is host memory the library registered.
    """

    def __init__(self, lib, shape, dtype):
        self._lib, self.shape, self.dtype = lib, tuple(int(s) for s in np.atleast_1d(shape)), np.dtype(dtype)
        self.nbytes = int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize
        handle = ctypes.c_void_p()
        _check(lib.perco_device_alloc(self.nbytes, ctypes.byref(handle)), "perco_device_alloc")
        self.ptr = handle.value or 0

    @classmethod
    def from_host(cls, lib, array) -> "DeviceArray":
        array = np.ascontiguousarray(array)
        out = cls(lib, array.shape, array.dtype)
        if out.nbytes:
            _check(lib.perco_device_copy(out.ptr, array.ctypes.data, out.nbytes, 1), "perco_device_copy")
        return out

    def to_host(self) -> np.ndarray:
        out = np.empty(self.shape, self.dtype)
        if self.nbytes:
            _check(self._lib.perco_device_copy(out.ctypes.data, self.ptr, self.nbytes, 2), "perco_device_copy")
        return out

    @property
    def __cuda_array_interface__(self) -> dict:
        return {"shape": self.shape, "typestr": self.dtype.str, "data": (self.ptr, False), "version": 3,
                "strides": None}

    def free(self) -> None:
        if self.ptr:
            self._lib.perco_device_free(self.ptr)
            self.ptr = 0

    def __del__(self):
        self.free()


def _device_view(array, dtype: str, ndim: int, lib) -> Optional[tuple]:
    """(pointer, shape) of a C-contiguous device array of `dtype`, or None for a host array."""
    interface = getattr(array, "__cuda_array_interface__", None)
    if interface is None:
        return None
    shape = tuple(interface["shape"])
    if np.dtype(interface["typestr"]) != np.dtype(dtype) or len(shape) != ndim:
        raise ValueError(f"device array must be {np.dtype(dtype)} with {ndim} dimensions, got "
                         f"{interface['typestr']} {shape}")
    itemsize, strides = np.dtype(dtype).itemsize, interface.get("strides")
    contiguous = tuple(int(np.prod(shape[i + 1:], dtype=np.int64)) * itemsize for i in range(ndim))
    if strides is not None and tuple(strides) != contiguous and int(np.prod(shape, dtype=np.int64)) > 1:
        raise ValueError("device array must be C-contiguous")
    if interface.get("stream") not in (None, 0, 1):  # produced on another stream: wait for it
        _check(lib.perco_device_synchronize(), "perco_device_synchronize")
    return int(interface["data"][0] or 0), shape


class BatchCoder:
    """Encode/decode lists of streams; `device` says which path runs ("cuda" or "cpu")."""

    def __init__(self, use_gpu: bool = True):
        self._lib = _load_library() if use_gpu else None
        self.device = "cuda" if self._lib is not None else "cpu"
        # libperco_kernels_host.so (kernels/host): the kernels run on the CPU; its speed means nothing
        self.emulated = self._lib is not None and hasattr(self._lib, "perco_kernels_host_emulation")

    # -- decode --------------------------------------------------------------------------------

    def decode(self, streams: List[np.ndarray], counts: List[int], model: Model) -> tuple:
        """uint32 word arrays + symbol counts -> (list of int32 symbol arrays, int32 status array)."""
        offsets = _offsets(counts)
        if model.kind == PER_SYMBOL and model.table.shape[0] != int(offsets[-1]):
            raise ValueError("a per-symbol model needs one table per symbol of the batch")
        if self._lib is not None:
            symbols, status = self._decode_gpu([[s] for s in streams], offsets, model, 1)
            status = status[:, 0]
        else:
            symbols, status = self._decode_cpu(streams, offsets, model)
        return [symbols[offsets[i] : offsets[i + 1]] for i in range(len(streams))], status

    def _decode_cpu(self, streams, offsets, model):
        symbols = np.zeros(int(offsets[-1]), dtype=np.int32)
        status = np.zeros(len(streams), dtype=np.int32)
        for i, words in enumerate(streams):
            lo, hi = int(offsets[i]), int(offsets[i + 1])
            symbols[lo:hi], status[i] = _cpu_decode_one(words, model, lo, hi)
        return symbols, status

    def _decode_gpu(self, streams, offsets, model, splits):
        flat = [np.asarray(w, dtype=np.uint32) for sub in streams for w in sub]
        words = np.concatenate(flat or [np.zeros(0, np.uint32)])
        word_offsets = _offsets([len(w) for w in flat])
        symbols = np.zeros(max(int(offsets[-1]), 1), dtype=np.int32)
        status = np.zeros((len(streams), splits), dtype=np.int32)
        cdf = model.cdf() if model.table is not None else None
        _check(self._lib.perco_rans_decode_split_host(
            _spec(model, cdf), 0 if cdf is None else cdf.size, 0, _ptr(words), _ptr(word_offsets), _ptr(offsets),
            len(streams), splits, _ptr(symbols), _ptr(status)), "perco_rans_decode_split_host")
        return symbols[: int(offsets[-1])], status

    # -- encode --------------------------------------------------------------------------------

    def encode(self, symbols: List[np.ndarray], model: Model) -> List[np.ndarray]:
        """int symbol arrays -> uint32 word arrays (constriction's AnsCoder format)."""
        flat, offsets = self._flatten(symbols, model)
        if self._lib is not None:
            return [sub[0] for sub in self._encode_gpu(flat, offsets, model, 1)]
        return [_cpu_encode_one(flat[offsets[i] : offsets[i + 1]], model, int(offsets[i]))
                for i in range(len(symbols))]

    @staticmethod
    def _flatten(symbols, model):
        offsets = _offsets([len(s) for s in symbols])
        flat = np.concatenate([np.asarray(s, dtype=np.int32) for s in symbols] or [np.zeros(0, np.int32)])
        if flat.size and (flat.min() < 0 or flat.max() >= model.num_symbols):
            raise ValueError(f"symbol out of range [0, {model.num_symbols})")
        if model.kind == PER_SYMBOL and model.table.shape[0] != flat.size:
            raise ValueError("a per-symbol model needs one table per symbol of the batch")
        return flat, offsets

    def _encode_gpu(self, flat, offsets, model, splits):
        n = len(offsets) - 1
        words = np.zeros(flat.size + 2 * n * splits, dtype=np.uint32)
        counts = np.zeros((n, splits), dtype=np.uint32)
        status = np.zeros((n, splits), dtype=np.int32)
        cdf = model.cdf() if model.table is not None else None
        result = self._lib.perco_rans_encode_split_host(
            _spec(model, cdf), 0 if cdf is None else cdf.size, 0, _ptr(flat), _ptr(offsets), n, splits, _ptr(words),
            _ptr(counts), _ptr(status))
        if result != 0 or status.any():
            raise RuntimeError(f"perco_rans_encode_split_host failed (code {result}, statuses {np.unique(status)})")
        out, at = [], 0
        for q in range(n):  # the regions follow each other: a sub-stream's symbols + 2 words each
            sub = []
            for j, count in enumerate(split_counts(int(offsets[q + 1] - offsets[q]), splits)):
                sub.append(words[at : at + int(counts[q, j])].copy())
                at += int(count) + 2
            out.append(sub)
        return out

    # -- split streams -------------------------------------------------------------------------

    def encode_split(self, symbols: List[np.ndarray], model: Model, splits: int) -> List[List[np.ndarray]]:
        """Each sequence -> its `splits` sub-streams (sub-stream j codes symbols[j::splits], with the
        per-symbol rows of those symbols); the words of each are those the CPU coder writes for it."""
        if splits < 1:
            raise ValueError(f"splits must be >= 1, got {splits}")
        flat, offsets = self._flatten(symbols, model)
        if self._lib is not None:
            return self._encode_gpu(flat, offsets, model, splits)
        out = []
        for q in range(len(symbols)):
            lo, hi = int(offsets[q]), int(offsets[q + 1])
            out.append([_cpu_encode_one(flat[lo + j : hi : splits], model, lo + j, splits) for j in range(splits)])
        return out

    def decode_split(self, streams: List[Sequence[np.ndarray]], counts: List[int], model: Model,
                     splits: int) -> tuple:
        """Per sequence a list of `splits` word arrays + symbol counts -> (list of int32 symbol arrays,
        int32 status [N, splits])."""
        if splits < 1 or any(len(sub) != splits for sub in streams):
            raise ValueError(f"every sequence needs exactly {splits} sub-streams (splits >= 1)")
        offsets = _offsets(counts)
        if model.kind == PER_SYMBOL and model.table.shape[0] != int(offsets[-1]):
            raise ValueError("a per-symbol model needs one table per symbol of the batch")
        if self._lib is not None:
            symbols, status = self._decode_gpu(streams, offsets, model, splits)
        else:
            symbols = np.zeros(int(offsets[-1]), dtype=np.int32)
            status = np.zeros((len(streams), splits), dtype=np.int32)
            for q, sub in enumerate(streams):
                lo, hi = int(offsets[q]), int(offsets[q + 1])
                for j, words in enumerate(sub):
                    symbols[lo + j : hi : splits], status[q, j] = _cpu_decode_one(words, model, lo + j, hi, splits)
        return [symbols[offsets[i] : offsets[i + 1]] for i in range(len(streams))], status

    # -- resumable decoding, tables on the device ----------------------------------------------

    def resumable(self, streams: List[Sequence[np.ndarray]], splits: int = 1, stream: int = 0) -> "ResumableDecoder":
        """A decoder that pops the sequences chunk by chunk; `streams` as for `decode_split` (per sequence
        `splits` word arrays). `stream`: the CUDA stream (handle as an int) its work is ordered on; 0, the
        legacy default stream, is ordered with the device work of every blocking stream."""
        return ResumableDecoder(self, streams, splits, stream)

    def tables_from_steps(self, steps) -> np.ndarray:
        """`tables_from_steps` (int64 tables [N, K]); host or device steps run on the device where the
        library is loaded (the kernel perco_tables_from_steps), else numpy's."""
        if self._lib is None:
            return tables_from_steps(_host_steps(steps))
        pointer, on_device, (rows, k), keep = _steps_pointer(steps, self._lib)
        cdf = np.zeros((rows, k + 1), dtype=np.uint32)
        _check(self._lib.perco_tables_from_steps_host(pointer, on_device, rows, k, _ptr(cdf), None, None),
               "perco_tables_from_steps_host")
        del keep
        return np.diff(cdf.astype(np.int64), axis=1)

    def sample_steps(self, steps, seed: int, group: int) -> np.ndarray:
        """The hybrid-mode draw (learned.py's `sample_tables`) from the tables of `steps` [N, K]: int64 [N]."""
        if self._lib is None:
            from perco.engine.entropy.learned import sample_tables

            return sample_tables(tables_from_steps(_host_steps(steps)), seed, group)
        pointer, on_device, (rows, k), keep = _steps_pointer(steps, self._lib)
        out = np.zeros(max(rows, 1), dtype=np.int32)
        _check(self._lib.perco_sample_steps_host(pointer, on_device, rows, k, seed % (1 << 64), group % (1 << 64),
                                                 _ptr(out), None, None), "perco_sample_steps_host")
        del keep
        return out[:rows].astype(np.int64)

    # -- device memory (the library path only) --------------------------------------------------

    def to_device(self, array) -> DeviceArray:
        """A device copy of a host array."""
        self._need_library("to_device")
        return DeviceArray.from_host(self._lib, array)

    def empty_device(self, shape, dtype) -> DeviceArray:
        self._need_library("empty_device")
        return DeviceArray(self._lib, shape, dtype)

    def synchronize(self) -> None:
        self._need_library("synchronize")
        _check(self._lib.perco_device_synchronize(), "perco_device_synchronize")

    def copy_bandwidth(self, nbytes: int = 1 << 28, repeats: int = 20) -> float:
        """Device memory bandwidth in bytes/s (read + written) of device-to-device copies of `nbytes`."""
        self._need_library("copy_bandwidth")
        out = ctypes.c_double()
        _check(self._lib.perco_copy_bandwidth_host(nbytes, repeats, ctypes.byref(out)), "perco_copy_bandwidth_host")
        return out.value

    def decode_split_device(self, model: Model, cdf: Optional[DeviceArray], words: DeviceArray,
                            word_offsets: DeviceArray, symbol_offsets: DeviceArray, splits: int,
                            symbols: DeviceArray, status: DeviceArray, synchronize: bool = True) -> None:
        """perco_rans_decode_split on device arrays (a benchmark of the kernel alone: no copies). `model`
        gives the kind and K; `cdf` its rows on the device (None for uniform)."""
        self._need_library("decode_split_device")
        num_sequences = symbol_offsets.shape[0] - 1
        spec = _Perco(model.kind, model.num_symbols, cdf.ptr if cdf is not None else None, None)
        _check(self._lib.perco_rans_decode_split(spec, words.ptr, word_offsets.ptr, symbol_offsets.ptr, num_sequences,
                                                 splits, symbols.ptr, status.ptr, None), "perco_rans_decode_split")
        if synchronize:
            self.synchronize()

    def _need_library(self, what: str) -> None:
        if self._lib is None:
            raise RuntimeError(f"BatchCoder.{what} needs the kernels library ($PERCO_KERNELS_LIB and a device)")


class ResumableDecoder:
    """N sequences of `splits` sub-streams each, decoded chunk by chunk (see `BatchCoder.resumable`).

    Every `pop*` call decodes the next chunk of every sequence: `counts` symbols of each (an int for all,
    or one per sequence; default: the tables' rows / N each), in sequence order in the returned int64
    array. Decoding a sequence in any chunks gives exactly the symbols and final statuses of one
    `decode_split`. `finish()` returns the statuses [N, splits]. On the library path the coder state,
    the words and the tables stay on the device; only the symbols come back.
    """

    _handle = None

    def __init__(self, coder: BatchCoder, streams, splits: int, stream: int = 0):
        if splits < 1 or any(len(sub) != splits for sub in streams):
            raise ValueError(f"every sequence needs exactly {splits} sub-streams (splits >= 1)")
        self._lib, self.splits, self.num_sequences = coder._lib, splits, len(streams)
        self._position = np.zeros(self.num_sequences, dtype=np.int64)  # symbols popped per sequence
        self._handle = None
        if self._lib is not None:
            flat = [np.asarray(w, dtype=np.uint32) for sub in streams for w in sub]
            words = np.concatenate(flat or [np.zeros(0, np.uint32)])
            offsets = _offsets([len(w) for w in flat])
            handle = ctypes.c_void_p()
            _check(self._lib.perco_decoder_create_host(_ptr(words), _ptr(offsets), self.num_sequences, splits,
                                                       stream or None, ctypes.byref(handle)),
                   "perco_decoder_create_host")
            self._handle = handle
        else:
            self._coders = [[_CpuStream(w) for w in sub] for sub in streams]

    def _counts(self, counts, rows: Optional[int]) -> np.ndarray:
        n = self.num_sequences
        if counts is None:
            if rows is None or (n and rows % n) or (not n and rows):
                raise ValueError(f"give counts: {rows} table rows do not split evenly over {n} sequences")
            counts = rows // n if n else 0
        counts = np.broadcast_to(np.asarray(counts, dtype=np.int64), (n,)).copy()
        if counts.size and counts.min() < 0:
            raise ValueError("chunk counts must be >= 0")
        if rows is not None and int(counts.sum()) != rows:
            raise ValueError(f"the chunk has {int(counts.sum())} symbols but {rows} table rows")
        return counts

    def _chunk(self, counts: np.ndarray) -> tuple:
        """(chunk_counts pointer or None, chunk_count): equal counts need no offsets on the device."""
        if counts.size and (counts == counts[0]).all():
            return None, int(counts[0])
        self._chunk_counts = counts.astype(np.uint64)  # alive until the call returns
        return _ptr(self._chunk_counts), 0

    def pop(self, model: Model, counts=None) -> np.ndarray:
        """The next chunk with `model`: uniform, static (counts required), or per symbol (a row per chunk
        symbol, sequence after sequence)."""
        counts = self._counts(counts, model.table.shape[0] if model.kind == PER_SYMBOL else None)
        if self._lib is None:
            return self._pop_cpu(model, counts)
        total = int(counts.sum())
        out = np.zeros(max(total, 1), dtype=np.int32)
        cdf = model.cdf() if model.table is not None else None
        chunk, count = self._chunk(counts)
        _check(self._lib.perco_decoder_decode_host(self._handle, _spec(model, cdf), 0 if cdf is None else cdf.size, 0,
                                                   chunk, count, _ptr(out), None), "perco_decoder_decode_host")
        self._position += counts
        return out[:total].astype(np.int64)

    def pop_tables(self, tables: np.ndarray, counts=None) -> np.ndarray:
        """The next chunk with a frequency table per symbol (int [T, K], rows >= 1 summing to 2^24)."""
        tables = np.atleast_2d(np.asarray(tables))
        return self.pop(Model(tables.shape[1], tables), counts)

    def pop_steps(self, steps, counts=None, out=None) -> np.ndarray:
        """The next chunk with the tables `tables_from_steps(steps)`: int64 logit steps [T, K], a host array
        or a device one (`__cuda_array_interface__`, C-contiguous; on the library path the tables are made
        on the device and only the symbols come back). `out`: an optional device int32 [T] array that
        also receives the symbols (library path only)."""
        if self._lib is None:
            if out is not None:
                raise RuntimeError("pop_steps(out=...) needs the kernels library")
            tables = tables_from_steps(_host_steps(steps))
            return self.pop(Model(tables.shape[1], tables), counts)
        pointer, on_device, (rows, k), keep = _steps_pointer(steps, self._lib)
        counts = self._counts(counts, rows)
        device_out = None
        if out is not None:
            view = _device_view(out, "<i4", 1, self._lib)
            if view is None or view[1][0] != rows:
                raise ValueError(f"out must be a device int32 array of {rows} symbols")
            device_out = view[0] or None
        host = np.zeros(max(rows, 1), dtype=np.int32)
        chunk, count = self._chunk(counts)
        _check(self._lib.perco_decoder_decode_steps(self._handle, pointer or None, on_device, k, chunk, count,
                                                    _ptr(host), device_out), "perco_decoder_decode_steps")
        del keep
        self._position += counts
        return host[:rows].astype(np.int64)

    def _pop_cpu(self, model: Model, counts: np.ndarray) -> np.ndarray:
        out = np.zeros(int(counts.sum()), dtype=np.int64)
        at = 0
        for q, count in enumerate(counts.tolist()):
            position = int(self._position[q])
            for j, sub in enumerate(self._coders[q]):
                first = (j - position) % self.splits  # chunk symbols t with (position + t) mod P == j
                if first >= count:
                    continue
                rows = None if model.kind != PER_SYMBOL else model.table[at + first : at + count : self.splits]
                n = len(range(first, count, self.splits))
                out[at + first : at + count : self.splits] = sub.pop(model, n, rows)
            self._position[q] += count
            at += count
        return out

    def finish(self) -> np.ndarray:
        """Final statuses [N, splits] (OK / CORRUPT / TRUNCATED, as `decode_split`'s)."""
        if self._lib is None:
            return np.array([[sub.status() for sub in subs] for subs in self._coders], dtype=np.int32).reshape(
                self.num_sequences, self.splits)
        status = np.zeros((self.num_sequences, self.splits), dtype=np.int32)
        _check(self._lib.perco_decoder_finish_host(self._handle, _ptr(status)), "perco_decoder_finish_host")
        return status

    def close(self) -> None:
        if self._handle is not None:
            self._lib.perco_decoder_destroy(self._handle)
            self._handle = None

    def __del__(self):
        self.close()


class StepsStreamDecoder:
    """One index stream decoded group by group from logit steps: what the learned index coder's decode
    loop needs (`rans.StreamDecoder` with `pop_tables(tables_from_steps(steps))`), with the steps on the
    device where the kernels library is loaded.

        decoder = StepsStreamDecoder(words, num_symbols=K)
        for each group: indices = decoder.pop_steps(steps)          # steps [n_g, K] int64, host or device
                        (hybrid: decoder.sample_steps(steps, seed, group))
        decoder.finish()                                              # BitstreamError unless consumed exactly

    `words`: one uint32 word array, or a list of P of them (split streams: symbol t of the grid's symbol
    sequence in sub-stream t mod P). The same symbols and the same errors on every path.
    """

    def __init__(self, words, num_symbols: int, coder: Optional[BatchCoder] = None, what: str = "index",
                 stream: int = 0):
        parts = [words] if isinstance(words, np.ndarray) else list(words)
        parts = [np.ascontiguousarray(w, dtype=np.uint32) for w in parts]
        for w in parts:
            if w.size and w[-1] == 0:
                raise BitstreamError(f"corrupt {what} stream: the compressed data ends in a zero word")
        self.num_symbols, self._what = num_symbols, what
        self._coder = coder if coder is not None else BatchCoder()
        self._decoder = self._coder.resumable([parts], splits=len(parts), stream=stream)
        # whether pop_steps / sample_steps take device steps (__cuda_array_interface__): a real GPU library
        self.takes_device_steps = self._coder.device == "cuda" and not self._coder.emulated

    def pop_steps(self, steps) -> np.ndarray:
        return self._decoder.pop_steps(steps)

    def pop_tables(self, tables: np.ndarray) -> np.ndarray:
        if not np.atleast_2d(tables).shape[0]:
            return np.zeros(0, dtype=np.int64)
        return self._decoder.pop_tables(tables)

    def sample_steps(self, steps, seed: int, group: int) -> np.ndarray:
        return self._coder.sample_steps(steps, seed, group)

    def finish(self) -> None:
        status = self._decoder.finish()
        self._decoder.close()
        if (status != OK).any():  # rans.StreamDecoder's message, whether words or only state words are left
            raise BitstreamError(f"corrupt {self._what} stream: data left over after the last symbol")


# --- the CPU path: the stream coder of perco.engine.entropy.rans ----------------------------------

def _host_steps(steps) -> np.ndarray:
    """Host steps as numpy's tables_from_steps takes them: int64 [N, K], every step >= 0."""
    if hasattr(steps, "__cuda_array_interface__") and not hasattr(steps, "__array_interface__"):
        raise TypeError("device steps need the kernels library ($PERCO_KERNELS_LIB and a device)")
    steps = np.ascontiguousarray(steps)
    if steps.dtype.kind not in "iu" or steps.ndim != 2:
        raise ValueError(f"expected integer steps [N, K], got {steps.dtype} {steps.shape}")
    if steps.size and steps.min() < 0:
        raise ValueError("logit steps must be >= 0")
    return steps.astype(np.int64, copy=False)


def _steps_pointer(steps, lib) -> tuple:
    """(pointer, on_device, (rows, K), keep-alive) of int64 steps [rows, K], a device or a host array. Device
    steps are not checked for negative values (the kernel shifts each row by its minimum)."""
    view = _device_view(steps, "<i8", 2, lib)
    if view is None:
        host = _host_steps(steps)
        pointer, shape, keep = host.ctypes.data, host.shape, host
    else:
        pointer, shape, keep = view[0], view[1], steps
    rows, k = int(shape[0]), int(shape[1])
    if not 2 <= k <= 65536:
        raise ValueError(f"tables need 2 <= K <= 65536 symbols, got {k}")
    return pointer, int(view is not None), (rows, k), keep


class _CpuStream:
    """One stream on the CPU coder, with the status rule of the kernels."""

    def __init__(self, words):
        words = np.ascontiguousarray(words, dtype=np.uint32)
        self.corrupt = bool(words.size and words[-1] == 0)  # constriction never ends a stream in a zero word
        self.coder = None if self.corrupt else rans._Coder(words)

    def pop(self, model: Model, count: int, rows: Optional[np.ndarray] = None) -> np.ndarray:
        if self.corrupt or not count:
            return np.zeros(count, dtype=np.int64)
        if model.kind == PER_SYMBOL:
            return np.asarray(self.coder.decode_tables(rows))
        return np.asarray(self.coder.decode_static(model.static_table(), count))

    def status(self) -> int:
        if self.corrupt:
            return CORRUPT
        left = self.coder.coder.num_words()  # unread bulk words + the words of the state
        return OK if left == 0 else CORRUPT if left >= 3 else TRUNCATED


def _cpu_decode_one(words, model: Model, lo: int, hi: int, step: int = 1) -> tuple:
    """Symbols lo, lo + step, ... < hi of the batch from one stream -> (int32 symbols, status)."""
    stream = _CpuStream(words)
    n = len(range(lo, hi, step))
    rows = model.table[lo:hi:step] if model.kind == PER_SYMBOL else None
    return stream.pop(model, n, rows).astype(np.int32), stream.status()


def _cpu_encode_one(part: np.ndarray, model: Model, lo: int, step: int = 1) -> np.ndarray:
    """One stream of `part` (symbols lo, lo + step, ... of the batch) -> uint32 words."""
    if model.kind == PER_SYMBOL:
        return rans.encode_symbol_tables(part, model.table[lo : lo + step * len(part) : step]).astype(np.uint32)
    return rans.encode_symbols(part, model.static_table()).astype(np.uint32)
