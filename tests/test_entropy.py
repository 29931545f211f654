import constriction
import numpy as np
import pytest

from perco.engine.entropy import PROB_BITS, caption_table, decode_symbols, encode_symbols, uniform_table
from perco.engine.errors import BitstreamError


def reference_rans_encode(symbols, table):
    """Independent integer rANS in constriction's AnsCoder format (64-bit state, 32-bit words)."""
    cum = np.concatenate([[0], np.cumsum(table)]).astype(object)
    words, head = [], 0  # constriction starts from an empty head
    for s in reversed(symbols.tolist()):
        freq = int(table[s])
        if (head >> (64 - PROB_BITS)) >= freq:
            words.append(head & 0xFFFFFFFF)
            head >>= 32
        head = ((head // freq) << PROB_BITS) | (head % freq + int(cum[s]))
    words += [head & 0xFFFFFFFF, head >> 32]
    while words and words[-1] == 0:
        words.pop()
    return np.array(words, dtype=np.uint32)


@pytest.mark.parametrize("k", [2, 3, 256, 1000, 8192, 65536])
def test_uniform_table_is_constrictions_uniform(k):
    table = uniform_table(k)
    assert table.min() >= 1 and table.sum() == 1 << PROB_BITS
    symbols = np.random.default_rng(k).integers(0, k, 777).astype(np.int32)
    coder = constriction.stream.stack.AnsCoder()
    coder.encode_reverse(symbols, constriction.stream.model.Uniform(k))
    np.testing.assert_array_equal(encode_symbols(symbols, table), coder.get_compressed())


@pytest.mark.parametrize("k,skew", [(2, 0.0), (256, 0.0), (256, 3.0), (49408, 1.5), (65536, 4.0)])
def test_integer_tables_code_exactly_their_frequencies(k, skew):
    rng = np.random.default_rng(k)
    weights = rng.random(k) ** (1 + skew)
    table = 1 + np.floor(weights / weights.sum() * ((1 << PROB_BITS) - k)).astype(np.int64)
    table[np.argmax(table)] += (1 << PROB_BITS) - table.sum()
    symbols = rng.choice(k, size=500, p=table / table.sum()).astype(np.int32)
    words = encode_symbols(symbols, table)
    np.testing.assert_array_equal(words, reference_rans_encode(symbols, table))
    np.testing.assert_array_equal(decode_symbols(words, table, len(symbols)), symbols)


@pytest.mark.parametrize("n", [0, 1, 2, 3, 31, 1000])
def test_round_trip_lengths_and_exact_size(n):
    table = caption_table(49408, 49407, 49406)
    symbols = np.random.default_rng(n).integers(0, 49406, n)
    words = encode_symbols(symbols, table)
    np.testing.assert_array_equal(decode_symbols(words, table, n, "caption"), symbols)
    ideal_bits = -np.log2(table[symbols] / (1 << PROB_BITS)).sum()
    assert 32 * len(words) <= ideal_bits + 64 + 32
    if n:  # the reported size is exact: one word less does not decode to the same symbols
        with pytest.raises(BitstreamError):
            out = decode_symbols(words[:-1], table, n, "caption")
            assert not np.array_equal(out, symbols)
            raise BitstreamError("decoded differently")


def test_leftover_data_is_an_error():
    table = uniform_table(256)
    words = encode_symbols(np.arange(10), table)
    with pytest.raises(BitstreamError, match="left over"):
        decode_symbols(words, table, 5)


def test_zero_terminated_stream_is_an_error():
    with pytest.raises(BitstreamError, match="corrupt index stream"):
        decode_symbols(np.array([7, 0], dtype=np.uint32), uniform_table(256), 1)


def test_caption_table_shape():
    table = caption_table(49408, 49407, 49406)
    assert table.sum() == 1 << PROB_BITS and table.min() >= 1
    assert table[49406] == 1  # start token never occurs inside a caption
    assert table[49407] == 1 << (PROB_BITS - 4)  # end of caption: 1/16
    assert table[320] > table[5000] > table[40000]  # lower merge rank, more probable


def test_symbol_out_of_range():
    with pytest.raises(ValueError, match="out of range"):
        encode_symbols(np.array([256]), uniform_table(256))
