"""Cosine-similarity VQ semantics and local features, checked against plain numpy."""

import numpy as np
import torch

from perco.export.models.perco_sd import HyperEncoder


def _model(grid=32, k=16):
    torch.manual_seed(0)
    model = HyperEncoder(4, 16, 16, 8, grid, k).eval()
    with torch.no_grad():  # a codebook that is NOT unit-norm: it must be used as stored
        model.quantizer._codebook.embed.copy_(torch.randn(1, k, 8) * 3)
    return model


def test_indices_are_argmax_cosine_with_stored_codebook():
    model = _model()
    z = torch.randn(2, 10, 16)
    with torch.no_grad():
        ours = model.quantizer.indices(z).numpy()
        e = model.quantizer.project_in(z).numpy()
    e /= np.linalg.norm(e, axis=-1, keepdims=True)
    codebook = model.quantizer._codebook.embed[0].numpy()
    np.testing.assert_array_equal(ours, (e @ codebook.T).argmax(-1))
    # normalising the code vectors would change the choice: stored norms matter
    assert not np.array_equal(ours, (e @ (codebook / np.linalg.norm(codebook, axis=-1, keepdims=True)).T).argmax(-1))


def test_local_features_project_selected_code_and_upsample_nearest():
    model = _model(grid=16)
    indices = torch.randint(0, 16, (1, 3, 5))
    with torch.no_grad():
        features = model.local_features(indices).numpy()
    assert features.shape == (1, 16, 12, 20)  # grid 16 at 512 -> 4 latent pixels per token
    w = model.quantizer.project_out.weight.detach().numpy()
    b = model.quantizer.project_out.bias.detach().numpy()
    code = model.quantizer._codebook.embed[0].numpy()[indices[0, 1, 2]]
    np.testing.assert_allclose(features[0, :, 4:8, 8:12], (w @ code + b)[:, None, None].repeat(4, 1).repeat(4, 2),
                               rtol=1e-5, atol=1e-6)


def test_token_grid_geometry():
    for grid, factor in [(64, 1), (32, 2), (16, 4), (8, 8)]:
        model = _model(grid=grid)
        with torch.no_grad():
            indices = model(torch.randn(1, 4, 64, 96))
        assert indices.shape == (1, 64 // factor, 96 // factor) and indices.dtype == torch.int64
