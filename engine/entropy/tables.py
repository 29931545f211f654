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


# --- tables from model outputs (docs/entropy-coding.md) ---------------------------------------
# Integer-only after one IEEE float32 operation per entry, so numpy and CUDA agree bit for bit.

ONE = 1 << 31  # fixed-point 1.0 of the weights
LOGIT_FRAC_BITS = 12  # logits are quantized to 1/4096 nat
LOGIT_MAX_STEPS = (1 << 20) - 1  # (max - logit) beyond 256 nats: weight 0 (frequency 1)
_EXP_UNIT = 2146959424  # round(2^31 * exp(-1/4096))
_EXP_STEP = 2114190000  # round(2^31 * exp(-64/4096))


@lru_cache(maxsize=None)
def exp_tables() -> tuple:
    """(hi, lo): 2^31 * exp(-j/64) for j >= 0 until it rounds to 0, and 2^31 * exp(-k/4096), k < 64.

    Built by truncating integer recurrences from two constants (so hi decays to exactly 0), and
    C/CUDA rebuild the same integers.
    """
    lo = [ONE]
    for _ in range(63):
        lo.append((lo[-1] * _EXP_UNIT) >> 31)
    hi = [ONE]
    while hi[-1]:
        hi.append((hi[-1] * _EXP_STEP) >> 31)
    return np.array(hi, dtype=np.uint64), np.array(lo, dtype=np.uint64)


def _normalize(weights: np.ndarray) -> np.ndarray:
    """uint64 weights [N, K], each row's max == 2^31 -> int64 tables [N, K] (>= 1, rows sum to 2^24)."""
    k = weights.shape[1]
    if not 2 <= k <= 1 << 16:
        raise ValueError(f"tables need 2 <= K <= 65536 symbols, got {k}")
    total = weights.sum(axis=1, keepdims=True, dtype=np.uint64)
    tables = (1 + (weights * np.uint64(PROB_TOTAL - k)) // total).astype(np.int64)
    first_max = np.argmax(weights, axis=1)  # the first index holding the row maximum
    tables[np.arange(len(tables)), first_max] += PROB_TOTAL - tables.sum(axis=1)
    return tables


def _rows(values: np.ndarray) -> tuple:
    values = np.asarray(values, dtype=np.float32)
    if values.ndim not in (1, 2):
        raise ValueError(f"expected [K] or [N, K] values, got shape {values.shape}")
    return np.atleast_2d(values), values.ndim == 1


def tables_from_probabilities(probabilities) -> np.ndarray:
    """float32 probabilities [K] or [N, K] (any positive scale) -> integer tables of the same shape.

    Row maximum s (NaN ignored); r_i = p_i / s in float32; w_i = trunc(r_i * 2^31) (0 for NaN or
    negative p_i); then the integer normalisation. A row whose maximum is not a positive finite
    number gets equal weights.
    """
    p, single = _rows(probabilities)
    with np.errstate(invalid="ignore", divide="ignore"):
        s = np.nanmax(np.where(np.isnan(p), -np.inf, p), axis=1, keepdims=True)
        valid = np.isfinite(s[:, 0]) & (s[:, 0] > 0)
        r = np.where(valid[:, None], p / np.where(valid[:, None], s, 1), 0).astype(np.float32)
    r = np.where(np.isnan(r) | (r < 0), 0, r)
    weights = (r.astype(np.float64) * ONE).astype(np.uint64)  # exact: r * 2^31 < 2^53
    weights[~valid] = ONE
    tables = _normalize(weights)
    return tables[0] if single else tables


def tables_from_logits(logits) -> np.ndarray:
    """float32 logits [K] or [N, K] -> integer tables approximating softmax.

    m = row max (NaN ignored); t_i = (m - x_i) * 4096 in float32; n_i = trunc(t_i), capped at
    2^20 - 1 (NaN -> cap); w_i = (hi[n_i >> 6] * lo[n_i & 63]) >> 31 from `exp_tables()`
    (0 past the end of hi); then the integer normalisation. A row whose maximum is not finite
    gets equal weights.
    """
    x, single = _rows(logits)
    with np.errstate(invalid="ignore", over="ignore"):
        m = np.max(np.where(np.isnan(x), -np.inf, x), axis=1, keepdims=True)
        valid = np.isfinite(m[:, 0])
        t = ((np.where(valid[:, None], m, 0) - x) * np.float32(1 << LOGIT_FRAC_BITS)).astype(np.float32)
    t = np.where(np.isnan(t) | (t >= LOGIT_MAX_STEPS), LOGIT_MAX_STEPS, np.maximum(t, 0))  # < 0 only in invalid rows
    n = t.astype(np.uint64)
    n[~valid] = 0  # weight 2^31 everywhere
    tables = tables_from_steps(n)
    return tables[0] if single else tables


def tables_from_steps(steps) -> np.ndarray:
    """Integer logit steps [K] or [N, K] (>= 0, in 2^-12 nat below the row maximum) -> integer tables.

    The integer half of `tables_from_logits`, for models whose logits are integers already: each row
    is shifted so its minimum is 0 and capped at 2^20 - 1 (n_i); w_i = (hi[n_i >> 6] * lo[n_i & 63]) >> 31
    from `exp_tables()` (0 past the end of hi); then the integer normalisation.

    >>> tables_from_steps([[0, 0], [0, 2839]]).tolist()  # 2839 steps ~ ln 2
    [[8388608, 8388608], [11184692, 5592524]]
    """
    n = np.asarray(steps)
    if n.dtype.kind not in "iu" or n.ndim not in (1, 2):
        raise ValueError(f"expected integer steps [K] or [N, K], got {n.dtype} {n.shape}")
    single = n.ndim == 1
    n = np.atleast_2d(n)
    if n.size and n.min() < 0:
        raise ValueError("logit steps must be >= 0")
    n = n.astype(np.uint64)
    n = np.minimum(n - n.min(axis=1, keepdims=True), np.uint64(LOGIT_MAX_STEPS))
    hi, lo = exp_tables()
    hi_index = n >> np.uint64(6)
    in_range = hi_index < len(hi)
    weights = np.where(in_range, (hi[np.minimum(hi_index, len(hi) - 1)] * lo[n & np.uint64(63)]) >> np.uint64(31), 0)
    tables = _normalize(weights.astype(np.uint64))
    return tables[0] if single else tables
