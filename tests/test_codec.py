"""End to end on the tiny model: any size, deterministic, wrong model refused, README example runs."""

import re
from pathlib import Path

import numpy as np
import pytest

from conftest import random_image
from perco.engine import BitstreamError, Codec, Hints, PercoError
from perco.engine.bitstream import parse


@pytest.mark.parametrize("height,width", [(48, 80), (512, 768)])
def test_round_trip_keeps_size(codec, height, width):
    image = random_image(height, width)
    data = codec.compress(image, caption="a red barn with a pond in the background")
    decoded = codec.decompress(data, steps=2)
    assert decoded.shape == (height, width, 3) and decoded.dtype == np.uint8
    header, *_ = parse(data)
    assert (header.width, header.height) == (width, height)
    assert set(codec.timings) == {"entropy_decode", "text_encode", "local_features", "denoise", "vae_decode",
                                  "postprocess"}


def test_compress_and_decompress_are_deterministic(codec, tiny_model):
    image = random_image(40, 56, seed=3)
    a = codec.compress(image, caption="two parrots", seed=9)
    b = Codec.from_pretrained(tiny_model).compress(image, caption="two parrots", seed=9)
    assert a == b
    np.testing.assert_array_equal(codec.decompress(a, steps=3), codec.decompress(a, steps=3))
    assert not np.array_equal(codec.decompress(a, steps=3),
                              codec.decompress(codec.compress(image, caption="two parrots", seed=10), steps=3))


def test_default_steps_and_hints(codec):
    image = random_image(32, 32)
    assert codec.model.default_steps == 20  # 0.0313 bpp < 0.05
    data = codec.compress(image, hints=Hints(steps=1))
    calls = []
    run = codec.backend.run
    codec.backend.run = lambda graph, inputs: calls.append(graph) or run(graph, inputs)
    try:
        codec.decompress(data)
    finally:
        codec.backend.run = run
    assert calls.count("denoiser") == 1 and calls.count("local_features") == 1


def test_high_rate_defaults_to_5_steps(builtin_tokenizer_model):
    codec = Codec.from_pretrained(builtin_tokenizer_model)
    assert codec.model.rate.nominal_bpp == 0.125 and codec.model.default_steps == 5
    decoded = codec.decompress(codec.compress(random_image(24, 40), caption="a dog"))
    assert decoded.shape == (24, 40, 3)


def test_wrong_model_is_refused(codec, other_seed_model, builtin_tokenizer_model):
    data = codec.compress(random_image(32, 32))
    for folder in (other_seed_model, builtin_tokenizer_model):
        with pytest.raises(BitstreamError, match="decode it with the model"):
            Codec.from_pretrained(folder).decompress(data)


def test_bad_seed(codec):
    with pytest.raises(PercoError, match="seed"):
        codec.compress(random_image(16, 16), seed=-1)


def test_readme_example_runs(tiny_model, monkeypatch, tmp_path):
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    code = re.search(r"## Python API\s+```python\n(.*?)```", readme, re.S).group(1)
    monkeypatch.setenv("PERCO_CACHE", str(tmp_path / "cache"))
    exec(compile(code, "README.md", "exec"), {})
    assert any((tmp_path / "cache").iterdir())
