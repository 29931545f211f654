"""The built-in rANS coder (engine/entropy/pyrans.py) against constriction, word for word: sweeps over lengths,
alphabet sizes and table kinds, the golden bitstreams, corrupt and truncated streams (same states), and a
whole decode in a subprocess where constriction cannot be imported."""

import json
import subprocess
import sys

import numpy as np
import pytest

from perco.engine.entropy import pyrans
from perco.engine.entropy.tables import PROB_TOTAL, caption_table, tables_from_steps, uniform_table

constriction = pytest.importorskip("constriction", reason="the reference coder is constriction")
Categorical = constriction.stream.model.Categorical


def _tables(rng, n: int, k: int, kind: str) -> np.ndarray:
    if kind == "uniform":
        return uniform_table(k)
    if kind == "static":
        return tables_from_steps(rng.integers(0, 40000, (1, k)))[0]
    return tables_from_steps(rng.integers(0, 40000, (n, k)))


def _reference_encode(symbols, tables) -> np.ndarray:
    coder = constriction.stream.stack.AnsCoder()
    if len(symbols):
        if tables.ndim == 1:
            coder.encode_reverse(symbols.astype(np.int32), Categorical((tables - 1).astype(np.float64), perfect=False))
        else:
            coder.encode_reverse(symbols.astype(np.int32), Categorical(perfect=False), (tables - 1).astype(np.float64))
    return coder.get_compressed()


@pytest.mark.parametrize("kind", ["uniform", "static", "per_symbol"])
@pytest.mark.parametrize("k", [2, 3, 64, 256, 1000, 8192, 65536])
@pytest.mark.parametrize("n", [0, 1, 2, 5, 77, 1000])
def test_words_and_symbols_match_constriction(kind, k, n):
    if kind == "per_symbol" and k * n > 2_000_000:
        n = 2_000_000 // k
    rng = np.random.default_rng(k * 7919 + n)
    tables = _tables(rng, n, k, kind)
    symbols = rng.integers(0, k, n)
    if kind == "static" and n:  # draw from the table too, so the skewed symbols dominate
        symbols = rng.choice(k, size=n, p=tables / PROB_TOTAL)
    ours = pyrans.AnsCoder()
    if n:
        ours.encode_reverse(symbols, tables)
    words = ours.get_compressed()
    np.testing.assert_array_equal(words, _reference_encode(symbols, tables))
    decoder = pyrans.AnsCoder(words)
    got = decoder.decode(tables, n) if tables.ndim == 1 else decoder.decode(tables)
    np.testing.assert_array_equal(got, symbols)
    assert decoder.is_empty() and decoder.num_words() == 0


def test_corrupt_and_truncated_streams_report_the_same_states():
    rng = np.random.default_rng(5)
    table = caption_table(49408, 49407, 49406)
    symbols = rng.integers(0, 49406, 300)
    words = _reference_encode(symbols, table)
    model = Categorical((table - 1).astype(np.float64), perfect=False)
    cases = [words[:-1], words[1:], words[: len(words) // 2], np.concatenate([[123, 456], words]), words[-2:],
             np.array([7], np.uint32), np.zeros(0, np.uint32)]
    flipped = words.copy()
    flipped[len(words) // 3] ^= 1 << 13
    cases.append(flipped)
    for case in cases:
        case = np.ascontiguousarray(case, dtype=np.uint32)
        if case.size and case[-1] == 0:
            with pytest.raises(ValueError):
                pyrans.AnsCoder(case)
            continue
        ours, theirs = pyrans.AnsCoder(case), constriction.stream.stack.AnsCoder(case)
        np.testing.assert_array_equal(ours.decode(table, 300), theirs.decode(model, 300))
        assert (ours.num_words(), ours.is_empty()) == (theirs.num_words(), theirs.is_empty())
    with pytest.raises(ValueError):
        pyrans.AnsCoder(np.array([5, 0], np.uint32))


def test_golden_bitstreams_decode_with_constriction_blocked(tmp_path):
    """The pinned PerCo (SD) bitstreams parse and entropy-decode identically in a process without constriction."""
    golden = json.loads(open("tests/golden/bitstreams.json").read())
    script = r"""
import json, sys
sys.modules["constriction"] = None  # import raises ImportError
from perco.engine.entropy import rans
assert rans.CODER == "builtin", rans.CODER
sys.path.insert(0, "tests")
from test_bitstream import SPEC
from perco.engine import bitstream
out = {}
for name, hexdata in json.loads(sys.argv[1]).items():
    _, caption, indices = bitstream.unpack(bytes.fromhex(hexdata), SPEC)
    out[name] = [caption.tolist(), indices.tolist()]
print(json.dumps(out))
"""
    done = subprocess.run([sys.executable, "-c", script, json.dumps(golden)], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    sys.path.insert(0, "tests")
    from perco.engine import bitstream
    from test_bitstream import SPEC

    for name, (caption, indices) in json.loads(done.stdout).items():
        _, c, i = bitstream.unpack(bytes.fromhex(golden[name]), SPEC)
        assert caption == c.tolist() and indices == i.tolist(), name


def test_full_decode_without_constriction_gives_the_same_bytes_and_pixels(tiny_model, tmp_path):
    from conftest import random_image
    from perco.engine import Codec

    image = random_image(64, 96, seed=8)
    np.save(tmp_path / "image.npy", image)
    codec = Codec.from_pretrained(tiny_model, backend="onnxruntime")
    data = codec.compress(image, caption="a red barn")
    pixels = codec.decompress(data, steps=2)
    script = f"""
import sys
sys.modules["constriction"] = None
import numpy as np
from perco.engine import Codec
from perco.engine.entropy import rans
assert rans.CODER == "builtin"
codec = Codec.from_pretrained({str(tiny_model)!r}, backend="onnxruntime")
data = codec.compress(np.load({str(tmp_path / "image.npy")!r}), caption="a red barn")
open({str(tmp_path / "data.perco")!r}, "wb").write(data)
np.save({str(tmp_path / "pixels.npy")!r}, codec.decompress(data, steps=2))
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "data.perco").read_bytes() == data
    np.testing.assert_array_equal(np.load(tmp_path / "pixels.npy"), pixels)
