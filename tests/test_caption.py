"""Caption transmission: exact CLIPTokenizer input_ids rebuilt without a tokenizer; rate vs zlib."""

import zlib

import numpy as np
import pytest
from transformers import CLIPTokenizer

from conftest import CLIP_TOKENIZER
from perco.benchmarks.caption_rate import CAPTIONS as ORDINARY
from perco.engine import bitstream
from perco.engine.bitstream import Header, StreamSpec
from perco.engine.model import ModelInfo
from perco.engine.text import CaptionTokenizer, TokenLayout, detokenize

CAPTIONS = ORDINARY + [  # the benchmark's ordinary captions, then edge cases
    "A close-up of a MOTORCYCLE parked on the side of the road!!",
    "",
    "  spaces   and\ttabs  ",
    "ünïcödé café — naïve 日本語 🙂",
    "word " * 100,  # truncated to 75 content tokens
]


@pytest.fixture(scope="module", params=["clip", "builtin"])
def model_folder(request, tiny_model, builtin_tokenizer_model):
    return tiny_model if request.param == "clip" else builtin_tokenizer_model


@pytest.mark.parametrize("text", CAPTIONS)
def test_decoder_rebuilds_clip_input_ids(model_folder, text):
    info = ModelInfo(model_folder)
    reference = CLIPTokenizer.from_pretrained(str(model_folder / "tokenizer"))
    expected = reference(text, padding="max_length", max_length=77, truncation=True)["input_ids"]
    spec = info.stream_spec
    ids = CaptionTokenizer(model_folder / "tokenizer", info.tokens)(text)
    rows, cols = spec.token_grid(64, 64)
    data = bitstream.pack(Header(spec.fingerprint[:4], 64, 64), ids, np.zeros((rows, cols), np.int64), spec)
    _, decoded, _ = bitstream.unpack(data, spec)
    assert info.tokens.input_ids(decoded).tolist() == expected


def test_real_clip_layout():
    layout = TokenLayout.from_tokenizer_dir(CLIP_TOKENIZER)
    assert layout == TokenLayout(vocab_size=49408, bos_id=49406, eos_id=49407, pad_id=0, max_length=77)


def test_caption_bytes_at_most_half_of_zlib(tiny_model):
    """On ordinary English captions with the real CLIP vocabulary: <= 1/2 of zlib level 9."""
    info = ModelInfo(tiny_model)
    tokenizer = CaptionTokenizer(tiny_model / "tokenizer", info.tokens)
    ours = theirs = 0
    for text in ORDINARY:
        spec = info.stream_spec
        rows, cols = spec.token_grid(64, 64)
        data = bitstream.pack(Header(spec.fingerprint[:4], 64, 64), tokenizer(text), np.zeros((rows, cols)), spec)
        caption_bytes = bitstream.parse(data)[3].caption
        zlib_bytes = len(zlib.compress(text.encode(), 9))
        assert caption_bytes <= zlib_bytes / 2, text
        ours, theirs = ours + caption_bytes, theirs + zlib_bytes
    assert ours <= 0.45 * theirs


def test_detokenize(tiny_model):
    info = ModelInfo(tiny_model)
    ids = CaptionTokenizer(tiny_model / "tokenizer", info.tokens)("Two parrots, standing")
    assert detokenize(ids, tiny_model / "tokenizer") == "two parrots , standing"


def test_spec_token_grid():
    spec = StreamSpec(b"0000", TokenLayout(10, 8, 9, 0), 256, token_stride=16, pad_multiple=64)
    assert spec.token_grid(768, 512) == (32, 48)
    assert spec.token_grid(1, 65) == (8, 4)
