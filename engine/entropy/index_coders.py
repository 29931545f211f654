"""Index coders: the token grid <-> its stream words, the seam a learned entropy model plugs into.

A coder gets the backend, so it may run a network between groups of tokens (a masked-token entropy
model codes group by group, each conditioned on the groups already decoded). The bitstream only
frames the stream it returns. `uniform` is bitstream v1's index section: every index equiprobable
over the codebook, raster order, one rANS stream.
"""

from typing import Dict, Optional, Protocol

import numpy as np

from perco.engine.entropy.rans import decode_symbols, encode_symbols
from perco.engine.entropy.tables import uniform_table
from perco.engine.errors import ModelError


class IndexCoder(Protocol):
    name: str

    def encode(self, indices: np.ndarray, backend=None) -> np.ndarray:
        """indices [rows, cols] in 0..K-1 -> uint32 stream words."""
        raise NotImplementedError

    def decode(self, words: np.ndarray, shape: tuple, backend=None) -> np.ndarray:
        """uint32 stream words -> indices [rows, cols]; BitstreamError for a defective stream."""
        raise NotImplementedError


class UniformIndexCoder:
    name = "uniform"

    def __init__(self, codebook_size: int):
        self.codebook_size = codebook_size
        self.table = uniform_table(codebook_size)

    def encode(self, indices: np.ndarray, backend=None) -> np.ndarray:
        return encode_symbols(np.asarray(indices).reshape(-1), self.table)

    def decode(self, words: np.ndarray, shape: tuple, backend=None) -> np.ndarray:
        rows, cols = shape
        # No lower bound on bytes per token: rANS codes a trailing run of symbol 0 in zero bytes, so an
        # empty stream is a valid all-zero grid. Work stays bounded by the bitstream's MAX_SIDE.
        return decode_symbols(words, self.table, rows * cols, "index").reshape(rows, cols)


INDEX_CODERS: Dict[str, type] = {"uniform": UniformIndexCoder}


def make_index_coder(name: str, codebook_size: int, model_dir: Optional[str] = None) -> IndexCoder:
    """The coder `name` for a codebook of `codebook_size` (a learned one also reads `model_dir`)."""
    if name not in INDEX_CODERS:
        raise ModelError(f"unknown index coder {name!r}; known: {', '.join(sorted(INDEX_CODERS))}")
    return INDEX_CODERS[name](codebook_size)
