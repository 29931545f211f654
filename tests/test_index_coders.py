"""The index-coder seam: a coder plugs in without touching the codec or the bitstream."""

import dataclasses

import numpy as np
import pytest

from conftest import random_image
from perco.engine import Codec, bitstream
from perco.engine.entropy import index_coders
from perco.engine.entropy.index_coders import UniformIndexCoder
from perco.engine.errors import ModelError


class _ReversedCoder(UniformIndexCoder):
    """A stand-in for a learned coder: codes the grid in reverse raster order and records the backend it
    was given (a learned entropy model runs its network there). It checks the plumbing only."""

    name = "test-reversed"
    seen = []

    def encode(self, indices, backend=None):
        self.seen.append(backend)
        return super().encode(np.asarray(indices)[::-1, ::-1], backend)

    def decode(self, words, shape, backend=None):
        self.seen.append(backend)
        return super().decode(words, shape, backend)[::-1, ::-1]


@pytest.fixture
def reversed_coder(monkeypatch):
    monkeypatch.setitem(index_coders.INDEX_CODERS, "test-reversed", _ReversedCoder)
    _ReversedCoder.seen = []
    return _ReversedCoder


def test_a_new_coder_round_trips_through_the_codec(codec, reversed_coder):
    custom = Codec(dataclasses.replace(codec.model, index_coder="test-reversed"), codec.backend)
    image = random_image(64, 96, seed=4)
    data = custom.compress(image, caption="")
    assert data != codec.compress(image, caption="")  # another index stream, same container
    assert custom.decompress(data, steps=1).shape == (64, 96, 3)
    assert reversed_coder.seen == [codec.backend, codec.backend]  # the coder got the backend both ways
    spec = custom.model.stream_spec
    header, _, indices = bitstream.unpack(data, spec)
    _, _, plain = bitstream.unpack(codec.compress(image, caption=""), codec.model.stream_spec)
    np.testing.assert_array_equal(indices, plain)  # the same tokens, coded another way


def test_uniform_is_v1s_index_section(codec):
    image = random_image(64, 96, seed=4)
    data = codec.compress(image)
    header, _, index_words, _ = bitstream.parse(data)
    coder = index_coders.make_index_coder("uniform", codec.model.rate.codebook_size)
    indices = coder.decode(index_words, codec.model.stream_spec.token_grid(96, 64))
    np.testing.assert_array_equal(indices, bitstream.unpack(data, codec.model.stream_spec)[2])


def test_unknown_coder_is_refused():
    with pytest.raises(ModelError, match="unknown index coder 'nope'"):
        index_coders.make_index_coder("nope", 256)
