"""rANS streams in constriction's `AnsCoder` format: 32-bit words, 64-bit state, 24-bit probabilities.

A stream is a little-endian uint32 word array. Symbols are decoded in the order they were
given to `encode_symbols` (the encoder codes them in reverse, ANS being a stack). A stream is
valid only if decoding exactly the expected number of symbols consumes it completely.
"""

from typing import Optional

import constriction
import numpy as np

from perco.engine.errors import BitstreamError

_Categorical = constriction.stream.model.Categorical
_AnsCoder = constriction.stream.stack.AnsCoder


def _model(table: np.ndarray):
    # constriction's non-perfect quantization maps float64 values (f - 1) to exactly the
    # integer frequencies f when f >= 1 and sum(f) == 2^24 (checked in tests/test_entropy.py).
    return _Categorical((table - 1).astype(np.float64), perfect=False)


_FAMILY = _Categorical(perfect=False)  # the same quantization, with a table per symbol


def _floats(tables: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(np.atleast_2d(tables) - 1, dtype=np.float64)


def encode_symbols(symbols: np.ndarray, table: np.ndarray) -> np.ndarray:
    """Encode `symbols` (int array, each in [0, len(table))) -> uint32 words."""
    symbols = np.ascontiguousarray(symbols, dtype=np.int32).reshape(-1)
    if symbols.size and (symbols.min() < 0 or symbols.max() >= len(table)):
        raise ValueError(f"symbol out of range [0, {len(table)})")
    coder = _AnsCoder()
    if symbols.size:
        coder.encode_reverse(symbols, _model(table))
    return coder.get_compressed().astype("<u4")


def encode_symbol_tables(symbols: np.ndarray, tables: np.ndarray) -> np.ndarray:
    """Encode `symbols` [N], symbol i with its own table `tables[i]` ([N, K]) -> uint32 words."""
    symbols = np.ascontiguousarray(symbols, dtype=np.int32).reshape(-1)
    if tables.shape[0] != symbols.size:
        raise ValueError(f"{symbols.size} symbols need as many tables, got {tables.shape[0]}")
    if symbols.size and (symbols.min() < 0 or symbols.max() >= tables.shape[1]):
        raise ValueError(f"symbol out of range [0, {tables.shape[1]})")
    coder = _AnsCoder()
    if symbols.size:
        coder.encode_reverse(symbols, _FAMILY, _floats(tables))
    return coder.get_compressed().astype("<u4")


class StreamDecoder:
    """Pops symbols from one stream (with one static `table`, or a table per symbol through `pop_tables`);
    `finish()` checks that the stream was consumed exactly."""

    def __init__(self, words: np.ndarray, table: Optional[np.ndarray], what: str):
        self._what = what
        self._table = table
        try:
            self._coder = _AnsCoder(np.ascontiguousarray(words, dtype=np.uint32))
        except ValueError as exc:  # e.g. a stream that ends in a zero word
            raise BitstreamError(f"corrupt {what} stream: {exc}") from None
        self._model = _model(table) if table is not None else None

    def pop(self, count: int) -> np.ndarray:
        return self._coder.decode(self._model, count)

    def pop_tables(self, tables: np.ndarray) -> np.ndarray:
        """One symbol per row of `tables` [N, K]."""
        if not tables.shape[0]:
            return np.zeros(0, dtype=np.int64)
        return self._coder.decode(_FAMILY, _floats(tables)).astype(np.int64)

    def finish(self) -> None:
        if not self._coder.is_empty():
            raise BitstreamError(f"corrupt {self._what} stream: data left over after the last symbol")


def decode_symbols(words: np.ndarray, table: np.ndarray, count: int, what: str = "index") -> np.ndarray:
    """Decode exactly `count` symbols from `words`; raise BitstreamError unless that uses them all."""
    decoder = StreamDecoder(words, table, what)
    symbols = decoder.pop(count) if count else np.zeros(0, dtype=np.int32)
    decoder.finish()
    return symbols
