"""Integer frequency tables: every coder (CPU now, CUDA later) codes with exactly these.

A table is an int64 array `f` of length K with every entry >= 1 and `f.sum() == 2**PROB_BITS`.
Tables are built with integer arithmetic only, so any implementation (numpy, C, CUDA)
reproduces them bit for bit.
"""

from functools import lru_cache

import numpy as np

PROB_BITS = 24  # constriction AnsCoder default: 24-bit probabilities
PROB_TOTAL = 1 << PROB_BITS

# Caption prior (see docs/bitstream.md, "Caption prior").
CAPTION_EOS_FREQ = PROB_TOTAL >> 4  # P(end of caption) = 1/16 per position
CAPTION_ZIPF_OFFSET = 48  # weight of token id i is 1 / (i + offset)
_WEIGHT_SCALE = 1 << 40


@lru_cache(maxsize=None)
def uniform_table(num_symbols: int) -> np.ndarray:
    """Uniform table over `num_symbols`: floor(2^24/K) each, the rounding remainder on the last.

    This is exactly the quantization of constriction's `Uniform(K)` model.

    >>> uniform_table(4).tolist()
    [4194304, 4194304, 4194304, 4194304]
    >>> int(uniform_table(3)[-1] - uniform_table(3)[0])
    1
    """
    if not 2 <= num_symbols <= PROB_TOTAL:
        raise ValueError(f"uniform table needs 2 <= K <= 2^{PROB_BITS}, got K={num_symbols}")
    base = PROB_TOTAL // num_symbols
    table = np.full(num_symbols, base, dtype=np.int64)
    table[-1] += PROB_TOTAL - base * num_symbols
    table.flags.writeable = False
    return table


@lru_cache(maxsize=None)
def caption_table(vocab_size: int, eos_id: int, bos_id: int) -> np.ndarray:
    """Static prior over CLIP token ids for caption coding (Zipf-like in the BPE merge rank).

    CLIP's vocabulary is ordered by merge rank, so a lower id is roughly a more frequent token.
    `eos_id` terminates a caption and gets a fixed probability of 1/16; `bos_id` never occurs
    in a caption and gets the minimum frequency 1. Every other id i gets
    1 + floor(w_i * R / W) with w_i = floor(2^40 / (i + 48)), W = sum of w_i and R the
    probability mass left after the minimum of 1 per symbol and the end-of-caption mass;
    the rounding remainder goes to id 0.
    """
    if vocab_size < 4 or not (0 <= eos_id < vocab_size and 0 <= bos_id < vocab_size):
        raise ValueError(f"bad caption vocabulary: size={vocab_size} eos={eos_id} bos={bos_id}")
    ids = np.arange(vocab_size, dtype=np.int64)
    weights = _WEIGHT_SCALE // (ids + CAPTION_ZIPF_OFFSET)
    weights[[eos_id, bos_id]] = 0
    budget = PROB_TOTAL - vocab_size - CAPTION_EOS_FREQ  # mass above the floor of 1 each
    table = 1 + (weights * budget) // int(weights.sum())
    table[eos_id] = CAPTION_EOS_FREQ
    table[0] += PROB_TOTAL - int(table.sum())
    assert table.min() >= 1 and int(table.sum()) == PROB_TOTAL
    table.flags.writeable = False
    return table
