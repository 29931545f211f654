"""The integer table procedures of docs/entropy-coding.md, against a scalar reference."""

import hashlib

import numpy as np
import pytest

from perco.engine.entropy import decode_symbols, encode_symbols
from perco.engine.entropy.tables import (
    ONE, PROB_TOTAL, exp_tables, tables_from_logits, tables_from_probabilities,
)


def reference_normalize(weights):
    """Scalar, pure-Python version of the integer normalisation."""
    k, total = len(weights), sum(weights)
    table = [1 + (w * (PROB_TOTAL - k)) // total for w in weights]
    table[weights.index(max(weights))] += PROB_TOTAL - sum(table)
    return table


def reference_logits(row):
    hi, lo = (list(map(int, t)) for t in exp_tables())
    finite = [v for v in row.tolist() if not np.isnan(v)]
    m = np.float32(max(finite)) if finite else np.float32(np.nan)
    if not np.isfinite(m):
        return reference_normalize([ONE] * len(row))
    weights = []
    for v in row:
        t = np.float32(np.float32(m - v) * np.float32(4096))
        n = (1 << 20) - 1 if np.isnan(t) or t >= (1 << 20) - 1 else int(t)
        weights.append((hi[n >> 6] * lo[n & 63]) >> 31 if (n >> 6) < len(hi) else 0)
    return reference_normalize(weights)


def test_exp_tables_are_pinned():
    hi, lo = exp_tables()
    assert hi[0] == lo[0] == ONE and hi[-1] == 0 and len(lo) == 64
    np.testing.assert_allclose(lo.astype(float) / ONE, np.exp(-np.arange(64) / 4096), rtol=1e-7)
    np.testing.assert_allclose(hi[:200].astype(float) / ONE, np.exp(-np.arange(200) / 64), rtol=1e-5)
    digest = hashlib.sha256(hi.tobytes() + lo.tobytes()).hexdigest()
    assert digest == EXP_TABLES_SHA256, digest


EXP_TABLES_SHA256 = "811879b74748bbd344874a0355aaaf8ff42530e7d93d8109d9419b8634b8fec9"


@pytest.mark.parametrize("k", [2, 3, 256, 8192, 65536])
def test_logit_tables_match_scalar_reference(k):
    rng = np.random.default_rng(k)
    logits = (rng.standard_normal((3, k)) * [[0.1], [3.0], [40.0]]).astype(np.float32)
    logits[2, : k // 3] = -np.inf
    tables = tables_from_logits(logits)
    assert tables.shape == (3, k) and (tables >= 1).all() and (tables.sum(axis=1) == PROB_TOTAL).all()
    rows = [0, 1, 2] if k <= 8192 else [1]
    for i in rows:
        assert tables[i].tolist() == reference_logits(logits[i])


def test_logit_tables_approximate_softmax():
    rng = np.random.default_rng(0)
    logits = (rng.standard_normal(1024) * 2).astype(np.float32)
    p = np.exp(logits - logits.max())
    p /= p.sum()
    q = tables_from_logits(logits) / PROB_TOTAL
    assert (p * np.log2(p / q)).sum() < 1e-3  # bits lost per symbol


def test_probability_tables():
    p = np.array([0.5, 0.25, 0.25, 0.0], np.float32)
    table = tables_from_probabilities(p)
    assert table.sum() == PROB_TOTAL and table[3] == 1 and abs(int(table[0]) - 2 * int(table[1])) <= 2
    np.testing.assert_array_equal(tables_from_probabilities(p * 7), table)  # any scale
    assert tables_from_probabilities(np.array([[1, 2], [3, 4]], np.float32)).shape == (2, 2)


@pytest.mark.parametrize("bad", [np.zeros(5), np.full(5, np.nan), np.array([1, np.inf, 0, 0, 0])])
def test_degenerate_rows_become_flat(bad):
    flat = reference_normalize([ONE] * 5)  # equal weights; the remainder on index 0
    assert tables_from_probabilities(bad.astype(np.float32)).tolist() == flat
    if np.isinf(bad).any() or np.isnan(bad).all():
        assert tables_from_logits(bad.astype(np.float32)).tolist() == flat


def test_per_symbol_tables_code_with_constriction():
    import constriction

    rng = np.random.default_rng(3)
    tables = tables_from_logits(rng.standard_normal((50, 300)).astype(np.float32) * 3)
    symbols = np.array([rng.choice(300, p=t / PROB_TOTAL) for t in tables], dtype=np.int32)
    coder = constriction.stream.stack.AnsCoder()
    model = constriction.stream.model.Categorical(perfect=False)
    coder.encode_reverse(symbols, model, (tables - 1).astype(np.float64))
    words = coder.get_compressed()
    decoder = constriction.stream.stack.AnsCoder(words)
    np.testing.assert_array_equal(decoder.decode(model, (tables - 1).astype(np.float64)), symbols)
    assert decode_symbols(encode_symbols(symbols[:1], tables[0]), tables[0], 1)[0] == symbols[0]
