"""Shared fixtures: tiny models are made only through `perco init-tiny`, once per session.

The suite never writes into the user's cache: PERCO_CACHE points at a private folder for the
session (the bundled model and exported artifacts are made there on first use), removed after.
"""

import atexit
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest

from perco.engine.cli import main

_CACHE = tempfile.mkdtemp(prefix="perco-test-cache-")
os.environ["PERCO_CACHE"] = _CACHE
atexit.register(shutil.rmtree, _CACHE, True)

DATA = Path(__file__).parent / "data"
CLIP_TOKENIZER = DATA / "clip-tokenizer"


def init_tiny(folder: Path, *args) -> Path:
    assert main(["init-tiny", str(folder), *args]) == 0
    return folder


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """Rate 0.0313 (grid 32, codebook 256), the real CLIP vocabulary, seed 0."""
    return init_tiny(tmp_path_factory.mktemp("models") / "tiny", "--tokenizer", str(CLIP_TOKENIZER))


@pytest.fixture(scope="session")
def other_seed_model(tmp_path_factory) -> Path:
    return init_tiny(tmp_path_factory.mktemp("models") / "seed1", "--seed", "1", "--tokenizer", str(CLIP_TOKENIZER))


@pytest.fixture(scope="session")
def builtin_tokenizer_model(tmp_path_factory) -> Path:
    """Rate 0.1250 (grid 64) with the small built-in tokenizer."""
    return init_tiny(tmp_path_factory.mktemp("models") / "builtin", "--rate", "0.1250")


@pytest.fixture(scope="session")
def codec(tiny_model):
    from perco.engine import Codec

    return Codec.from_pretrained(tiny_model, backend="torch")


def random_image(height: int, width: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, size=(height // 8 + 1, width // 8 + 1, 3)).astype(np.uint8)
    return np.ascontiguousarray(base.repeat(8, 0).repeat(8, 1)[:height, :width])
