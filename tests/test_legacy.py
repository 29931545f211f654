"""Import of PerCo (SD) research-code files: the fixtures in tests/data/legacy/ were written by the research code's
own container and the real torchac (tests/data/legacy/make.py; torchac is not installed in CI). Our torchac
decoder reads them and our encoder writes them byte for byte; hostile pickles are refused and never run."""

import pickle
import zlib
from pathlib import Path

import numpy as np
import pytest

from perco.engine import bitstream
from perco.engine.cli import main
from perco.engine.errors import BitstreamError
from perco.engine.legacy import import_legacy, read_legacy, torchac_decode, torchac_encode, uniform_cdf
from perco.engine.model import ModelInfo
from perco.engine.text import CaptionTokenizer

LEGACY = Path(__file__).parent / "data" / "legacy"
# name: (codebook size, rows, cols, seed), as tests/data/legacy/make.py wrote them
FIXTURES = {"k256_32x32": (256, 32, 32, 0), "k1024_16x24": (1024, 16, 24, 1), "k8192_8x8": (8192, 8, 8, 2)}


def _indices(k, rows, cols, seed) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, k, (1, rows, cols)).reshape(-1)


@pytest.mark.parametrize("name", sorted(FIXTURES))
def test_research_files_decode_and_reencode_byte_for_byte(name):
    k, rows, cols, seed = FIXTURES[name]
    legacy = read_legacy((LEGACY / f"{name}.pkl").read_bytes())
    cdf = uniform_cdf(k)
    expected = _indices(k, rows, cols, seed)
    np.testing.assert_array_equal(torchac_decode(legacy.index_bytes, cdf, rows * cols), expected)
    assert torchac_encode(expected, cdf) == legacy.index_bytes


@pytest.mark.parametrize("k", [2, 3, 64, 1000, 8192])
@pytest.mark.parametrize("n", [1, 2, 17, 2000])
def test_coder_round_trips_and_matches_torchac_where_installed(k, n):
    symbols = np.random.default_rng(k + n).integers(0, k, n)
    if n > 100:
        symbols[: n // 2] = k - 1  # the top symbol, whose interval ends at 2^16
    cdf = uniform_cdf(k)
    data = torchac_encode(symbols, cdf)
    np.testing.assert_array_equal(torchac_decode(data, cdf, n), symbols)
    try:
        import torch
        import torchac
    except ImportError:
        return  # the fixtures above are the check against the real torchac
    float_cdf = torch.cat([torch.zeros(1), torch.cumsum(torch.full((k,), 1.0 / k), 0)]).view(1, -1).repeat(n, 1)
    float_cdf[:, -1] = 1.0
    assert torchac.encode_float_cdf(float_cdf, torch.from_numpy(symbols).to(torch.int16)) == data


def test_uniform_cdf_is_torchacs_conversion():
    torch = pytest.importorskip("torch", reason="the research code's float CDF is built with torch")
    for k in (2, 3, 64, 256, 1000, 1024, 8192):
        cdf = torch.cat([torch.zeros(1), torch.cumsum(torch.full((k,), 1.0 / k), 0)])
        cdf[-1] = 1.0
        ints = (cdf * (2**16 - k)).round().to(torch.int16) + torch.arange(k + 1, dtype=torch.int16)  # torchac's
        np.testing.assert_array_equal(uniform_cdf(k), ints.numpy().astype(np.int64) & 0xFFFF)


def test_import_gives_our_encoders_bytes(tiny_model):
    info = ModelInfo(tiny_model)  # rate 0.0313: grid 32, 256 codes, as the k256 fixture
    data = import_legacy((LEGACY / "k256_32x32.pkl").read_bytes(), info.spec)
    legacy = read_legacy((LEGACY / "k256_32x32.pkl").read_bytes())
    caption = CaptionTokenizer(info.folder / "tokenizer", info.tokens)(legacy.caption)
    header = bitstream.Header(info.fingerprint[:4], 512, 512)
    expected = bitstream.pack(header, caption, _indices(256, 32, 32, 0).reshape(32, 32), info.stream_spec)
    assert data == expected
    old = (LEGACY / "k256_32x32.pkl").stat().st_size
    assert len(data) <= old - 100  # measured 1177 -> 1061 bytes: the same 1024 index bytes, no pickle framing, and
    # the caption in 18 bytes instead of zlib's 56


class _Evil:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))  # unpickling would create the marker file


def test_hostile_pickles_are_refused_and_nothing_runs(tmp_path):
    marker = tmp_path / "ran"
    evil = pickle.dumps(_Evil(marker))
    inner = {0: pickle.dumps(zlib.compress(b"a caption")), 1: evil, 2: pickle.dumps((512, 512))}
    for data in (evil, pickle.dumps(inner), pickle.dumps({0: evil, 1: evil, 2: evil})):
        with pytest.raises(BitstreamError, match="refused; nothing was run"):
            read_legacy(data)
    assert not marker.exists()
    pickle.loads(evil).close()  # the same bytes through plain pickle do run: the test's own check that they would
    assert marker.exists()


@pytest.mark.parametrize("data,match", [
    (b"", "cannot read its container"),
    (b"not a pickle", "cannot read its container"),
    (pickle.dumps([1, 2, 3]), "expected a dict"),
    (pickle.dumps({0: b"", 1: b""}), "expected a dict"),
    (pickle.dumps({0: pickle.dumps(b"x"), 1: pickle.dumps(b""), 2: pickle.dumps((512, True))}), "bad image size"),
    (pickle.dumps({0: pickle.dumps(b"x"), 1: pickle.dumps(b""), 2: pickle.dumps((0, 512))}), "bad image size"),
    (pickle.dumps({0: pickle.dumps(b"not zlib"), 1: pickle.dumps(b""), 2: pickle.dumps((64, 64))}), "not zlib"),
    (pickle.dumps({0: pickle.dumps(zlib.compress(bytes(10**6))), 1: pickle.dumps(b""), 2: pickle.dumps((64, 64))}),
     "truncated or too long"),
    (pickle.dumps({0: pickle.dumps("str"), 1: pickle.dumps(b""), 2: pickle.dumps((64, 64))}), "must be bytes"),
    (bytes(2 << 20), "more than such a file has"),
])
def test_malformed_files_are_one_error(data, match):
    with pytest.raises(BitstreamError, match=match):
        read_legacy(data)


def test_another_rate_or_truncation_is_detected(tiny_model):
    spec = ModelInfo(tiny_model).spec
    with pytest.raises(BitstreamError, match="another rate"):
        import_legacy((LEGACY / "k1024_16x24.pkl").read_bytes(), spec)
    container = pickle.loads((LEGACY / "k256_32x32.pkl").read_bytes())  # our own fixture: safe to unpickle
    container[1] = pickle.dumps(pickle.loads(container[1])[:-40])  # a truncated stream re-encodes differently
    with pytest.raises(BitstreamError, match="another rate"):
        import_legacy(pickle.dumps(container), spec)
    # A flipped bit is undetectable: under a uniform model every bit string is some valid index map (the research
    # format has no check), so the import gives other, valid indices; our bitstream adds a CRC from then on.


def test_cli_import_then_decompress(tiny_model, tmp_path, capsys):
    out = tmp_path / "new.perco"
    assert main(["import-legacy", str(LEGACY / "k256_32x32.pkl"), "-o", str(out), "--model", str(tiny_model)]) == 0
    assert "% smaller" in capsys.readouterr().out
    _, caption, indices = bitstream.unpack(out.read_bytes(), ModelInfo(tiny_model).stream_spec)
    np.testing.assert_array_equal(indices.reshape(-1), _indices(256, 32, 32, 0))
    evil = tmp_path / "evil.pkl"
    evil.write_bytes(pickle.dumps(_Evil(tmp_path / "ran")))
    assert main(["import-legacy", str(evil), "-o", str(tmp_path / "x.perco"), "--model", str(tiny_model)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: not a PerCo (SD) research file") and err.count("\n") == 1
    assert not (tmp_path / "ran").exists() and not (tmp_path / "x.perco").exists()
    assert main(["import-legacy", str(evil), "-o", str(tmp_path / "x.perco")]) == 1
    assert "needs --model" in capsys.readouterr().err
