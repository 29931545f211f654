"""The built-in rANS coder: constriction's `AnsCoder` stream format in numpy and plain Python integers.

Used where constriction is missing (it has no aarch64 Linux wheels, so a Jetson has none), or when
`PERCO_RANS=builtin`. It writes the same words and reports the same states as constriction for every
table kind the bitstream uses (uniform, static, one table per symbol); tests/test_pyrans.py checks it
word for word. The algorithm (docs/entropy-coding.md): 64-bit state, 32-bit words, 24-bit
probabilities. Encoding runs last symbol first:

    if head >> 40 >= f: push(head & 0xffffffff); head >>= 32
    head = (head // f) << 24 | (head % f + c)

then pushes the state's low and high words and drops trailing zero words. Decoding starts from the
top two words and, per symbol, `q = head & 0xffffff`, `s` with `c[s] <= q < c[s+1]`,
`head = f[s] * (head >> 24) + q - c[s]`, then refills one word from the top while `head < 2^32`.

A PerCo image has hundreds to a few thousand symbols, so a Python loop is fast enough
(docs/jetson.md reports its symbols/s beside constriction's).
"""

import numpy as np

PRECISION = 24
_MASK = (1 << PRECISION) - 1
_WORD = 0xFFFFFFFF


def cumulative(tables: np.ndarray) -> np.ndarray:
    """[N, K] frequency tables -> [N, K + 1] cumulative (int64), cdf[:, 0] = 0."""
    tables = np.atleast_2d(np.asarray(tables, dtype=np.int64))
    return np.concatenate([np.zeros((tables.shape[0], 1), np.int64), np.cumsum(tables, axis=1)], axis=1)


class AnsCoder:
    """A rANS stack with constriction's `AnsCoder` semantics for what the engine uses of it."""

    def __init__(self, compressed=None):
        words = [] if compressed is None else [int(w) for w in np.asarray(compressed, dtype=np.uint32)]
        if words and words[-1] == 0:
            raise ValueError("the compressed data ends in a zero word")
        self._head = 0
        if len(words) >= 2:
            self._head = words.pop() << 32 | words.pop()
        elif words:
            self._head = words.pop()
        self._bulk = words  # the top of the stack is the end of the list

    # -- encoding -------------------------------------------------------------------------------

    def encode_reverse(self, symbols, tables: np.ndarray) -> None:
        """Push `symbols` (last first) with one table for all ([K]) or one per symbol ([N, K])."""
        symbols = np.asarray(symbols, dtype=np.int64).reshape(-1)
        cdf = cumulative(tables)
        rows = np.arange(len(symbols)) if np.ndim(tables) == 2 else np.zeros(len(symbols), dtype=np.int64)
        starts = cdf[rows, symbols].tolist()  # c and f of each coded symbol only
        freqs = (cdf[rows, symbols + 1] - cdf[rows, symbols]).tolist()
        head, bulk = self._head, self._bulk
        for i in range(len(symbols) - 1, -1, -1):
            c, f = starts[i], freqs[i]
            if head >> (64 - PRECISION) >= f:
                bulk.append(head & _WORD)
                head >>= 32
            head = (head // f) << PRECISION | (head % f + c)
        self._head = head

    def get_compressed(self) -> np.ndarray:
        words = self._bulk + [self._head & _WORD, self._head >> 32]
        while words and words[-1] == 0:
            words.pop()
        return np.array(words, dtype=np.uint32)

    # -- decoding -------------------------------------------------------------------------------

    def decode(self, tables: np.ndarray, count: int = 0) -> np.ndarray:
        """Pop `count` symbols with one table ([K]), or one symbol per row of [N, K] tables."""
        return self.decode_cdf(cumulative(tables), count if np.ndim(tables) == 1 else None)

    def decode_cdf(self, cdf: np.ndarray, count=None) -> np.ndarray:
        """As `decode`, from `cumulative` tables: `count` symbols of row 0, or (None) one per row."""
        per_symbol = count is None
        n = cdf.shape[0] if per_symbol else count
        out = np.empty(n, dtype=np.int32)  # as constriction returns them
        head, bulk = self._head, self._bulk
        for i in range(n):
            row = cdf[i] if per_symbol else cdf[0]
            q = head & _MASK
            s = int(np.searchsorted(row, q, side="right")) - 1
            c = int(row[s])
            head = int(row[s + 1] - c) * (head >> PRECISION) + q - c
            if head < 1 << 32 and bulk:
                head = head << 32 | bulk.pop()
            out[i] = s
        self._head = head
        return out

    def num_words(self) -> int:
        """Words still in the stack: the bulk plus those of the state (as constriction counts them)."""
        return len(self._bulk) + (2 if self._head >> 32 else 1 if self._head else 0)

    def is_empty(self) -> bool:
        return not self._bulk and self._head == 0
