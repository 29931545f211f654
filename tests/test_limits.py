"""The size limit's estimate and the tiled VAE decode it relies on."""

import numpy as np
import pytest

from perco.engine import limits
from perco.engine.codec import Codec
from perco.engine.errors import DecodeLimitError, UsageError
from perco.engine.model import SD21_SIZES, ModelInfo, ModelSpec

GIB = 1 << 30


class _LocalVAE:
    """A stand-in VAE decoder that is purely local (nearest upsampling of 3 channels), so a tiled
    decode must reproduce the untiled one exactly; it checks the tiling and blending arithmetic, not
    the seams a real decoder's global mid-block attention leaves."""

    name = "local-vae"

    def __init__(self):
        self.shapes = []

    def run(self, graph, inputs):
        latent = inputs["latent"]
        self.shapes.append(latent.shape[2:])
        return {"image": np.repeat(np.repeat(latent[:, :3] * 0.5, 8, axis=2), 8, axis=3)}


@pytest.mark.parametrize("h,w", [(130, 200), (40, 500), (129, 129), (64, 257)])
def test_tiled_decode_matches_untiled_for_a_local_decoder(h, w, tiny_model):
    backend = _LocalVAE()
    codec = Codec(ModelInfo(tiny_model).spec, backend)
    latent = np.random.default_rng(0).standard_normal((2, 4, h, w)).astype(np.float32)
    assert limits.vae_tiled(h, w)
    tiled = codec._decode_latent(latent)
    untiled = backend.run("vae_decoder", {"latent": latent})["image"]
    np.testing.assert_allclose(tiled, untiled, rtol=1e-6, atol=1e-6)
    assert all(th <= limits.VAE_TILE and tw <= limits.VAE_TILE for th, tw in backend.shapes[:-1])


def test_small_latents_are_not_tiled(tiny_model):
    backend = _LocalVAE()
    Codec(ModelInfo(tiny_model).spec, backend)._decode_latent(np.zeros((1, 4, 128, 128), np.float32))
    assert backend.shapes == [(128, 128)]


def test_tiles_cover_each_side():
    for n in (1, 64, 65, 100, 128, 1000, 2048):
        starts = limits.tiles(n)
        covered = np.zeros(n, bool)
        for s in starts:
            covered[s : s + limits.VAE_TILE] = True
        assert covered.all() and starts == sorted(set(starts))


def test_estimate_grows_with_size_and_orders_the_backends():
    ort, torch = limits.backend_memory("onnxruntime", host_memory=24 * GIB), limits.backend_memory("torch", host_memory=24 * GIB)
    sizes = [64 * 64, 96 * 96, 128 * 128]
    for backend in (ort, torch):
        values = [limits.coding_bytes(SD21_SIZES, backend, t) for t in sizes]
        assert values == sorted(values)
    # memory-efficient attention (torch SDPA) lets torch go further than onnxruntime's materialised scores
    assert limits.decode_limit(SD21_SIZES, torch).max_pixels > limits.decode_limit(SD21_SIZES, ort).max_pixels
    small = limits.decode_limit(SD21_SIZES, limits.backend_memory("onnxruntime", host_memory=8 * GIB))
    assert small.max_pixels < limits.decode_limit(SD21_SIZES, ort).max_pixels


def test_limit_override_and_errors(monkeypatch):
    memory = limits.backend_memory("torch", host_memory=24 * GIB)
    monkeypatch.setenv(limits.MAX_PIXELS_ENV, "100x100")
    assert limits.decode_limit(SD21_SIZES, memory).max_pixels == 10000
    assert limits.decode_limit(SD21_SIZES, memory, max_pixels=5).max_pixels == 5  # the argument wins
    with pytest.raises(UsageError):
        limits.parse_max_pixels("0")
    limit = limits.DecodeLimit(10000, (512, 512), "test")
    limit.check(100, 100, (100, 100))
    with pytest.raises(DecodeLimitError, match="over the decode limit"):
        limit.check(101, 100, (100, 101))
    with pytest.raises(DecodeLimitError, match=r"1x100, padded to 128x128 \(0.02 Mpx\)"):
        limit.check(1, 100, (128, 128))  # the padded size is what counts: the networks run on it
    with pytest.raises(DecodeLimitError, match="at most 512x512"):
        limit.check(64, 64, (576, 64))


def test_tensorrt_limit_is_the_profile():
    from perco.engine.backends.tensorrt import profile_size

    manifest = {"graphs": {"denoiser": {"shapes": {"sample": {"max": [8, 4, 128, 96]}}},
                           "vae_decoder": {"shapes": {"latent": {"max": [4, 4, 128, 128]}}}}}
    assert profile_size(manifest) == (1024, 768)
    limit = limits.decode_limit(SD21_SIZES, limits.backend_memory("tensorrt", profile_size(manifest)))
    assert limit.max_pixels is None and limit.max_size == (1024, 768)


def test_sizes_travel_with_the_spec(tiny_model):
    spec = ModelInfo(tiny_model).spec
    assert spec.sizes.unet_attention_level == 1 and spec.sizes.weights_bytes > 0
    assert ModelSpec.from_dict(spec.to_dict()).sizes == spec.sizes
    old = {k: v for k, v in spec.to_dict().items() if k != "sizes"}  # an export made before sizes were recorded
    assert ModelSpec.from_dict(old).sizes is None
