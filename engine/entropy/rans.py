"""rANS streams in constriction's `AnsCoder` format: 32-bit words, 64-bit state, 24-bit probabilities.

A stream is a little-endian uint32 word array. Symbols are decoded in the order they were
given to `encode_symbols` (the encoder codes them in reverse, ANS being a stack). A stream is
valid only if decoding exactly the expected number of symbols consumes it completely.

Two implementations write the same words: constriction where it is installed, else the built-in
coder (`perco.engine.entropy.pyrans`; constriction has no aarch64 Linux wheels). `PERCO_RANS=builtin`
or `constriction` chooses one; `CODER` says which runs.
"""

import os
from typing import Optional

import numpy as np

from perco.engine.entropy import pyrans
from perco.engine.errors import BitstreamError, PercoError


def _choose() -> str:
    wanted = os.environ.get("PERCO_RANS", "")
    if wanted not in ("", "builtin", "constriction"):
        raise PercoError(f"PERCO_RANS={wanted!r}: choose builtin or constriction")
    if wanted == "builtin":
        return "builtin"
    try:
        import constriction  # noqa: F401
    except ImportError:
        if wanted == "constriction":
            raise PercoError("PERCO_RANS=constriction, but constriction is not installed") from None
        return "builtin"
    return "constriction"


CODER = _choose()

if CODER == "constriction":
    import constriction

    _Categorical = constriction.stream.model.Categorical
    _FAMILY = _Categorical(perfect=False)  # one table per symbol, quantized as `_static`

    def _static(table: np.ndarray):
        # constriction's non-perfect quantization maps float64 values (f - 1) to exactly the
        # integer frequencies f when f >= 1 and sum(f) == 2^24 (checked in tests/test_entropy.py).
        return _Categorical((table - 1).astype(np.float64), perfect=False)

    def _floats(tables: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(np.atleast_2d(tables) - 1, dtype=np.float64)

    class _Coder:
        """constriction's AnsCoder behind the calls this module makes."""

        def __init__(self, words=None):
            self.coder = constriction.stream.stack.AnsCoder(*(() if words is None else (words,)))

        def encode_static(self, symbols, table):
            self.coder.encode_reverse(symbols, _static(table))

        def encode_tables(self, symbols, tables):
            self.coder.encode_reverse(symbols, _FAMILY, _floats(tables))

        def decode_static(self, table, count):
            if getattr(self, "_table", None) is not table:  # one model per stream: the caption pops one by one
                self._table, self._model = table, _static(table)
            return self.coder.decode(self._model, count)

        def decode_tables(self, tables):
            return self.coder.decode(_FAMILY, _floats(tables))

        def words(self):
            return self.coder.get_compressed()

        def is_empty(self):
            return self.coder.is_empty()
else:
    class _Coder:
        """The built-in coder behind the same calls."""

        def __init__(self, words=None):
            self.coder = pyrans.AnsCoder(words)

        def encode_static(self, symbols, table):
            self.coder.encode_reverse(symbols, np.asarray(table).reshape(-1))

        def encode_tables(self, symbols, tables):
            self.coder.encode_reverse(symbols, np.atleast_2d(tables))

        def decode_static(self, table, count):
            if getattr(self, "_table", None) is not table:
                self._table, self._cdf = table, pyrans.cumulative(table)
            return self.coder.decode_cdf(self._cdf, count)

        def decode_tables(self, tables):
            return self.coder.decode(np.atleast_2d(tables))

        def words(self):
            return self.coder.get_compressed()

        def is_empty(self):
            return self.coder.is_empty()


def encode_symbols(symbols: np.ndarray, table: np.ndarray) -> np.ndarray:
    """Encode `symbols` (int array, each in [0, len(table))) -> uint32 words."""
    symbols = np.ascontiguousarray(symbols, dtype=np.int32).reshape(-1)
    if symbols.size and (symbols.min() < 0 or symbols.max() >= len(table)):
        raise ValueError(f"symbol out of range [0, {len(table)})")
    coder = _Coder()
    if symbols.size:
        coder.encode_static(symbols, table)
    return coder.words().astype("<u4")


def encode_symbol_tables(symbols: np.ndarray, tables: np.ndarray) -> np.ndarray:
    """Encode `symbols` [N], symbol i with its own table `tables[i]` ([N, K]) -> uint32 words."""
    symbols = np.ascontiguousarray(symbols, dtype=np.int32).reshape(-1)
    if tables.shape[0] != symbols.size:
        raise ValueError(f"{symbols.size} symbols need as many tables, got {tables.shape[0]}")
    if symbols.size and (symbols.min() < 0 or symbols.max() >= tables.shape[1]):
        raise ValueError(f"symbol out of range [0, {tables.shape[1]})")
    coder = _Coder()
    if symbols.size:
        coder.encode_tables(symbols, tables)
    return coder.words().astype("<u4")


class StreamDecoder:
    """Pops symbols from one stream (with one static `table`, or a table per symbol through `pop_tables`);
    `finish()` checks that the stream was consumed exactly."""

    def __init__(self, words: np.ndarray, table: Optional[np.ndarray], what: str):
        self._what = what
        self._table = table
        try:
            self._coder = _Coder(np.ascontiguousarray(words, dtype=np.uint32))
        except ValueError as exc:  # e.g. a stream that ends in a zero word
            raise BitstreamError(f"corrupt {what} stream: {exc}") from None

    def pop(self, count: int) -> np.ndarray:
        return self._coder.decode_static(self._table, count)

    def pop_tables(self, tables: np.ndarray) -> np.ndarray:
        """One symbol per row of `tables` [N, K]."""
        if not tables.shape[0]:
            return np.zeros(0, dtype=np.int64)
        return np.asarray(self._coder.decode_tables(tables)).astype(np.int64)

    def finish(self) -> None:
        if not self._coder.is_empty():
            raise BitstreamError(f"corrupt {self._what} stream: data left over after the last symbol")


def decode_symbols(words: np.ndarray, table: np.ndarray, count: int, what: str = "index") -> np.ndarray:
    """Decode exactly `count` symbols from `words`; raise BitstreamError unless that uses them all."""
    decoder = StreamDecoder(words, table, what)
    symbols = decoder.pop(count) if count else np.zeros(0, dtype=np.int32)
    decoder.finish()
    return symbols
