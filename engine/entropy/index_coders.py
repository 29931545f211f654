"""Index coders: the token grid <-> its stream words, the seam a learned entropy model plugs into.

A coder gets the backend, so it may run a network between groups of tokens (a masked-token entropy
model codes group by group, each conditioned on the groups already decoded). The bitstream only
frames the stream it returns. `uniform` is bitstream v1's index section: every index equiprobable
over the codebook, raster order, one rANS stream. `learned` is the masked-token entropy model
(`perco.engine.entropy.learned`), which also codes part of the groups only (hybrid mode).
"""

from typing import Dict, Optional, Protocol

import numpy as np

from perco.engine.entropy.rans import decode_symbols, encode_symbols
from perco.engine.entropy.tables import uniform_table
from perco.engine.errors import BitstreamError, ModelError


class IndexCoder(Protocol):
    name: str

    def num_groups(self, shape: tuple) -> int:
        """How many groups a grid of `shape` is coded in (hybrid mode sends 1..that many)."""
        raise NotImplementedError

    def encode(self, indices: np.ndarray, backend=None, groups: Optional[int] = None) -> np.ndarray:
        """indices [rows, cols] in 0..K-1 -> uint32 stream words (of the first `groups` groups; None: all)."""
        raise NotImplementedError

    def decode(self, words: np.ndarray, shape: tuple, backend=None, groups: Optional[int] = None,
               seed: int = 0) -> np.ndarray:
        """uint32 stream words -> indices [rows, cols]; BitstreamError for a defective stream. With `groups`,
        only that many were sent and the coder generates the rest (seeded by `seed`)."""
        raise NotImplementedError


class UniformIndexCoder:
    name = "uniform"

    def __init__(self, codebook_size: int, entropy_dir=None):  # every coder is made from (K, entropy model folder)
        self.codebook_size = codebook_size
        self.table = uniform_table(codebook_size)

    def num_groups(self, shape: tuple) -> int:
        return 1

    def encode(self, indices: np.ndarray, backend=None, groups: Optional[int] = None) -> np.ndarray:
        if groups not in (None, 1):
            raise ValueError("uniform index coding has one group: hybrid mode needs a learned entropy model")
        return encode_symbols(np.asarray(indices).reshape(-1), self.table)

    def decode(self, words: np.ndarray, shape: tuple, backend=None, groups: Optional[int] = None,
               seed: int = 0) -> np.ndarray:
        if groups is not None:
            raise BitstreamError("corrupt bitstream: a hybrid-mode header, but this model codes its indices "
                                 "uniformly (hybrid mode needs a learned entropy model)")
        rows, cols = shape
        # No lower bound on bytes per token: rANS codes a trailing run of symbol 0 in zero bytes, so an
        # empty stream is a valid all-zero grid. Work stays bounded by the bitstream's MAX_SIDE.
        return decode_symbols(words, self.table, rows * cols, "index").reshape(rows, cols)


def _learned(codebook_size: int, entropy_dir=None):
    from perco.engine.entropy.learned import LearnedIndexCoder, load_entropy_model

    if entropy_dir is None:
        raise ModelError("this model codes its indices with a learned entropy model, but none came with it")
    coder = LearnedIndexCoder(load_entropy_model(entropy_dir))
    if coder.codebook_size != codebook_size:
        raise ModelError(f"entropy model {entropy_dir} is for a codebook of {coder.codebook_size}, the model's has "
                         f"{codebook_size}")
    return coder


# name -> factory(codebook_size, entropy_dir): a coder class or function
INDEX_CODERS: Dict[str, object] = {"uniform": UniformIndexCoder, "learned": _learned}


def make_index_coder(name: str, codebook_size: int, entropy_dir=None) -> IndexCoder:
    """The coder `name` for a codebook of `codebook_size` (the learned one reads the folder `entropy_dir`)."""
    if name not in INDEX_CODERS:
        raise ModelError(f"unknown index coder {name!r}; known: {', '.join(sorted(INDEX_CODERS))}")
    return INDEX_CODERS[name](codebook_size, entropy_dir)
