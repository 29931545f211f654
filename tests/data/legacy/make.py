"""Writes the legacy fixtures with the research code's own container and the real torchac (not installed in CI:
`pip install torchac`, which compiles its C++ extension with ninja on first import). Run from the repo root:

    python tests/data/legacy/make.py

Each case: seeded random indices of the research code's grid, its uniform CDF (compute_cdf_uniform_prob),
torchac.encode_float_cdf(cdf, indices.int16, check_input_bounds=True), zlib level 9 of the caption, and
pickle.dump({0: pickle.dumps(caption), 1: pickle.dumps(indices), 2: pickle.dumps((H, W))}).
"""

import pickle
import zlib
from pathlib import Path

import numpy as np
import torch
import torchac

CASES = {  # name: (codebook size, grid rows, grid cols, H, W, caption, seed)
    "k256_32x32": (256, 32, 32, 512, 512, "a river runs through a rocky forest with mountains in the background", 0),
    "k1024_16x24": (1024, 16, 24, 512, 768, "two parrots standing next to each other with leaves in the background", 1),
    "k8192_8x8": (8192, 8, 8, 128, 128, "A Red barn, with a pond! Ünïcödé ok.", 2),
}


def indices_of(k, rows, cols, seed):
    return np.random.default_rng(seed).integers(0, k, (1, rows, cols))


def main():
    for name, (k, rows, cols, h, w, caption, seed) in CASES.items():
        indices = torch.from_numpy(indices_of(k, rows, cols, seed))
        cdf = torch.cumsum(torch.full((k,), 1.0 / k), dim=0)
        cdf = torch.cat([torch.zeros(1), cdf]).view(1, 1, 1, -1).expand(1, rows, cols, -1).clone()
        cdf[..., -1] = 1.0
        stream = torchac.encode_float_cdf(cdf, indices.to(torch.int16), check_input_bounds=True)
        assert torch.equal(torchac.decode_float_cdf(cdf, stream), indices.to(torch.int16))
        text = zlib.compress(caption.encode("utf-8"), level=zlib.Z_BEST_COMPRESSION)
        container = {0: pickle.dumps(text), 1: pickle.dumps(stream), 2: pickle.dumps((h, w))}
        with open(Path(__file__).parent / f"{name}.pkl", "wb") as f:
            pickle.dump(container, f)


if __name__ == "__main__":
    main()
