"""Batched rANS over many independent streams: the CUDA library when a GPU is there, else the CPU.

Both paths produce the same words and the same per-stream status (docs/entropy-coding.md):
    OK         every word consumed and the coder state back to empty
    CORRUPT    a stream ends in a zero word, or at least one whole word is left unread
    TRUNCATED  all words read but the state did not return to empty
The CUDA library (`libperco_kernels.so`, built by the top-level CMakeLists.txt) is found through
$PERCO_KERNELS_LIB; it is loaded with ctypes, so no torch or CUDA array library is needed.
"""

import ctypes
import os
from dataclasses import dataclass
from typing import List, Optional

import constriction
import numpy as np

from perco.engine.entropy.tables import PROB_TOTAL, uniform_table

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


class _Perco(ctypes.Structure):
    _fields_ = [("kind", ctypes.c_int), ("num_symbols", ctypes.c_uint32),
                ("cdf", ctypes.c_void_p), ("table_index", ctypes.c_void_p)]


def _load_library():
    path = os.environ.get("PERCO_KERNELS_LIB")
    if not path:
        return None
    try:
        lib = ctypes.CDLL(path)
    except OSError:
        return None
    lib.perco_cuda_device_count.restype = ctypes.c_int
    return lib if lib.perco_cuda_device_count() > 0 else None


class BatchCoder:
    """Encode/decode lists of streams; `device` says which path runs ("cuda" or "cpu")."""

    def __init__(self, use_gpu: bool = True):
        self._lib = _load_library() if use_gpu else None
        self.device = "cuda" if self._lib is not None else "cpu"

    # -- decode --------------------------------------------------------------------------------

    def decode(self, streams: List[np.ndarray], counts: List[int], model: Model) -> tuple:
        """uint32 word arrays + symbol counts -> (list of int32 symbol arrays, int32 status array)."""
        offsets = np.concatenate([[0], np.cumsum(counts, dtype=np.uint64)]).astype(np.uint64)
        if model.kind == PER_SYMBOL and model.table.shape[0] != int(offsets[-1]):
            raise ValueError("a per-symbol model needs one table per symbol of the batch")
        if self._lib is not None:
            symbols, status = self._decode_gpu(streams, offsets, model)
        else:
            symbols, status = self._decode_cpu(streams, offsets, model)
        return [symbols[offsets[i] : offsets[i + 1]] for i in range(len(streams))], status

    def _decode_cpu(self, streams, offsets, model):
        symbols = np.zeros(int(offsets[-1]), dtype=np.int32)
        status = np.zeros(len(streams), dtype=np.int32)
        floats = None if model.table is None else (np.atleast_2d(model.table) - 1).astype(np.float64)
        for i, words in enumerate(streams):
            words = np.asarray(words, dtype=np.uint32)
            n, lo = int(offsets[i + 1] - offsets[i]), int(offsets[i])
            if words.size and words[-1] == 0:
                status[i] = CORRUPT
                continue
            coder = constriction.stream.stack.AnsCoder(words)
            if n:
                if model.kind == UNIFORM:
                    symbols[lo : lo + n] = coder.decode(constriction.stream.model.Uniform(model.num_symbols), n)
                elif model.kind == STATIC:
                    symbols[lo : lo + n] = coder.decode(
                        constriction.stream.model.Categorical(floats[0], perfect=False), n)
                else:
                    symbols[lo : lo + n] = coder.decode(
                        constriction.stream.model.Categorical(perfect=False), floats[lo : lo + n])
            left = coder.num_words()  # unread bulk words + the words of the state
            status[i] = OK if left == 0 else CORRUPT if left >= 3 else TRUNCATED
        return symbols, status

    def _decode_gpu(self, streams, offsets, model):
        words = np.concatenate([np.asarray(s, dtype=np.uint32) for s in streams] or [np.zeros(0, np.uint32)])
        word_offsets = np.concatenate([[0], np.cumsum([len(s) for s in streams])]).astype(np.uint64)
        symbols = np.zeros(max(int(offsets[-1]), 1), dtype=np.int32)
        status = np.zeros(len(streams), dtype=np.int32)
        cdf = model.cdf() if model.table is not None else None
        spec = _Perco(model.kind, model.num_symbols, cdf.ctypes.data if cdf is not None else None, None)
        result = self._lib.perco_rans_decode_host(
            spec, ctypes.c_size_t(0 if cdf is None else cdf.size), ctypes.c_size_t(0),
            _ptr(words), _ptr(word_offsets), _ptr(offsets), ctypes.c_uint32(len(streams)), _ptr(symbols), _ptr(status))
        if result != 0:
            raise RuntimeError(f"perco_rans_decode_host failed with code {result}")
        return symbols[: int(offsets[-1])], status

    # -- encode --------------------------------------------------------------------------------

    def encode(self, symbols: List[np.ndarray], model: Model) -> List[np.ndarray]:
        """int symbol arrays -> uint32 word arrays (constriction's AnsCoder format)."""
        counts = [len(s) for s in symbols]
        offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.uint64)
        flat = np.concatenate([np.asarray(s, dtype=np.int32) for s in symbols] or [np.zeros(0, np.int32)])
        if flat.size and (flat.min() < 0 or flat.max() >= model.num_symbols):
            raise ValueError(f"symbol out of range [0, {model.num_symbols})")
        if self._lib is not None:
            return self._encode_gpu(flat, offsets, model)
        floats = None if model.table is None else (np.atleast_2d(model.table) - 1).astype(np.float64)
        out = []
        for i in range(len(symbols)):
            part, lo = flat[offsets[i] : offsets[i + 1]], int(offsets[i])
            coder = constriction.stream.stack.AnsCoder()
            if part.size:
                if model.kind == UNIFORM:
                    coder.encode_reverse(part, constriction.stream.model.Uniform(model.num_symbols))
                elif model.kind == STATIC:
                    coder.encode_reverse(part, constriction.stream.model.Categorical(floats[0], perfect=False))
                else:
                    coder.encode_reverse(part, constriction.stream.model.Categorical(perfect=False),
                                         floats[lo : lo + part.size])
            out.append(coder.get_compressed().astype(np.uint32))
        return out

    def _encode_gpu(self, flat, offsets, model):
        n = len(offsets) - 1
        words = np.zeros(flat.size + 2 * n, dtype=np.uint32)
        counts = np.zeros(n, dtype=np.uint32)
        status = np.zeros(n, dtype=np.int32)
        cdf = model.cdf() if model.table is not None else None
        spec = _Perco(model.kind, model.num_symbols, cdf.ctypes.data if cdf is not None else None, None)
        result = self._lib.perco_rans_encode_host(
            spec, ctypes.c_size_t(0 if cdf is None else cdf.size), ctypes.c_size_t(0), _ptr(flat), _ptr(offsets),
            ctypes.c_uint32(n), _ptr(words), _ptr(counts), _ptr(status))
        if result != 0 or status.any():
            raise RuntimeError(f"perco_rans_encode_host failed (code {result}, statuses {np.unique(status)})")
        return [words[int(offsets[i]) + 2 * i : int(offsets[i]) + 2 * i + int(counts[i])].copy() for i in range(n)]


def _ptr(array: np.ndarray):
    return ctypes.c_void_p(array.ctypes.data)
