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


def _recording(codec):
    calls = []
    run = codec.backend.run

    def record(graph, inputs):
        calls.append((graph, {k: v.shape for k, v in inputs.items()}))
        return run(graph, inputs)

    return calls, record


def test_batch_decode_matches_single(codec):
    datas = [codec.compress(random_image(40, 56, seed=s), caption=c, seed=s) for s, c in [(1, "a dog"), (2, ""), (3, "x")]]
    batch = codec.decompress_batch(datas, steps=2)
    for data, image in zip(datas, batch):
        single = codec.decompress(data, steps=2).astype(np.float64)
        mse = ((single - image) ** 2).mean()
        assert image.shape == (40, 56, 3) and (mse == 0 or 10 * np.log10(255**2 / mse) > 40)
    with pytest.raises(PercoError, match="one size"):
        codec.decompress_batch([datas[0], codec.compress(random_image(32, 32))])


def test_dpm_sampler_and_guidance_stop(codec, monkeypatch):
    data = codec.compress(random_image(32, 48), caption="a barn")
    calls, record = _recording(codec)
    monkeypatch.setattr(codec.backend, "run", record)
    image = codec.decompress(data, steps=4, sampler="dpmpp2m", guidance_stop=1)
    assert image.shape == (32, 48, 3)
    batches = [shapes["sample"][0] for graph, shapes in calls if graph == "denoiser"]
    assert batches == [2, 2, 2, 1]  # guided steps at batch 2B, the last one conditional only
    with pytest.raises(PercoError, match="guidance_stop"):
        codec.decompress(data, steps=2, guidance_stop=3)
    with pytest.raises(PercoError, match="unknown sampler"):
        codec.decompress(data, steps=2, sampler="euler")
