"""Bitstream v1: round trips, framing budget, golden bytes, every malformed input -> BitstreamError."""

import json
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest

from perco.engine import bitstream
from perco.engine.bitstream import Header, Hints, StreamSpec
from perco.engine.errors import BitstreamError
from perco.engine.text import TokenLayout

GOLDEN = Path(__file__).parent / "golden" / "bitstreams.json"
CLIP = TokenLayout(vocab_size=49408, bos_id=49406, eos_id=49407, pad_id=0)
FP = bytes.fromhex("0123456789abcdef0011223344556677")
SPEC = StreamSpec(fingerprint=FP, tokens=CLIP, codebook_size=256, token_stride=16, pad_multiple=16)
CAPTION = [320, 736, 10942, 593, 320, 10750, 530, 518, 5994]  # "a red barn with a pond in the background"


def make(width=512, height=512, seed=0, hints=Hints(), caption=CAPTION, spec=SPEC, index_seed=0):
    rows, cols = spec.token_grid(width, height)
    indices = np.random.default_rng(index_seed).integers(0, spec.codebook_size, (rows, cols))
    header = Header(spec.fingerprint[:4], width, height, seed, hints)
    return bitstream.pack(header, caption, indices, spec), indices


def test_round_trip_default():
    data, indices = make()
    header, caption, decoded = bitstream.unpack(data, SPEC)
    assert (header.width, header.height, header.seed) == (512, 512, 0)
    assert caption.tolist() == CAPTION
    np.testing.assert_array_equal(decoded, indices)


def test_framing_at_most_12_bytes_at_512_default():
    data, _ = make()
    *_, sections = bitstream.parse(data)
    assert sections.framing <= 12
    assert sections.total == len(data)
    assert 1024 <= sections.indices <= 1024 + 8  # 32x32 tokens x 8 bits + what is left of the rANS head


@pytest.mark.parametrize(
    "width,height,seed,hints",
    [(768, 512, 0, Hints()), (1, 1, 1, Hints()), (513, 7, 2**64 - 1, Hints(steps=5, guidance=2.5)),
     (512, 512, 42, Hints(steps=20)), (16384, 16, 0, Hints(guidance=0.0))],
)
def test_round_trip_fields(width, height, seed, hints):
    data, indices = make(width, height, seed, hints)
    header, caption, decoded = bitstream.unpack(data, SPEC)
    assert (header.width, header.height, header.seed, header.hints) == (width, height, seed, hints)
    np.testing.assert_array_equal(decoded, indices)


@pytest.mark.parametrize("n", [0, 1, 74, 75, 200])
def test_caption_lengths(n):
    ids = list(np.random.default_rng(n).integers(0, 49406, n))
    data, _ = make(caption=ids)
    _, caption, _ = bitstream.unpack(data, SPEC)
    assert caption.tolist() == ids[:75]  # CLIP keeps at most 75 content tokens


def test_golden_bytes():
    """Pinned bytes for fixed inputs. Regenerate only on purpose: PERCO_REGENERATE_GOLDEN=1."""
    cases = {
        "default_512": make()[0],
        "kodak_768x512_seed7": make(768, 512, seed=7)[0],
        "hints_empty_caption": make(64, 48, hints=Hints(steps=5, guidance=3.0), caption=[])[0],
    }
    actual = {name: data.hex() for name, data in cases.items()}
    if os.environ.get("PERCO_REGENERATE_GOLDEN"):
        GOLDEN.write_text(json.dumps(actual, indent=1) + "\n")
    assert actual == json.loads(GOLDEN.read_text())


def _with_crc(body: bytes) -> bytes:
    return body + struct.pack("<I", zlib.crc32(body))


@pytest.mark.parametrize(
    "data,match",
    [
        (b"", "empty bitstream"),
        (b"\x00" * 20, "not a PerCo Engine bitstream"),
        (b"\xb2" + b"\x00" * 20, "unsupported bitstream version 2"),
        (b"\xb1\x00", "truncated"),
        (_with_crc(b"\xb1" + FP[:4] + b"\x80\x00"), "unknown flags"),
        (_with_crc(b"\xb1" + FP[:4] + b"\x01\x00\x05\x00"), "image size 0x5"),
        (_with_crc(b"\xb1" + FP[:4] + b"\x01\x81"), "ends inside the image width"),
        (_with_crc(b"\xb1" + FP[:4] + b"\x00\x05"), "ends inside the caption stream"),
        (_with_crc(b"\xb1" + FP[:4] + b"\x02\x80\x00\x00"), "non-canonical"),
        (_with_crc(b"\xb1" + FP[:4] + b"\x00\x00\x01\x00"), "index stream ends in a zero byte"),
        (_with_crc(b"\xb1" + FP[:4] + b"\x00\x02\x05\x00"), "caption stream ends in a zero byte"),
        (_with_crc(b"\xb1" + FP[:4] + b"\x04\x01\x01\x00\x00"), "step count 0"),
    ],
)
def test_malformed(data, match):
    with pytest.raises(BitstreamError, match=match):
        bitstream.unpack(data, SPEC)


def test_every_truncation_is_refused():
    data, _ = make(100, 60)
    for n in range(len(data)):
        with pytest.raises(BitstreamError):
            bitstream.unpack(data[:n], SPEC)


def test_wrong_model_is_refused():
    data, _ = make()
    other = StreamSpec(b"\xff" * 16, CLIP, 256, 16, 16)
    with pytest.raises(BitstreamError, match="made for model 01234567.*decode it with the model"):
        bitstream.unpack(data, other)


def test_empty_index_stream_is_an_all_zero_grid():
    """rANS codes a trailing run of symbol 0 in no bytes at all; decoding stays bounded by MAX_SIDE."""
    data, _ = make(64, 48)
    header = Header(FP[:4], 64, 48)
    empty = bitstream.pack(header, CAPTION, np.zeros((3, 4), np.int64), SPEC)
    assert bitstream.parse(empty)[3].indices == 0 and len(empty) < len(data)
    assert not bitstream.unpack(empty, SPEC)[2].any()


# Fuzzing (random and mutated inputs, CRC fixed up): tests/test_fuzz.py and perco.benchmarks.fuzz.
