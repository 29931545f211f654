"""The optimized torch backend (`torch-fast`) against the reference backend, on the CPU in FP32 and BF16 (CI
has no GPU; the CUDA-only parts, CUDA graphs and FP16 on the GPU, are checked by benchmarks/gpu_check.py on
a GPU machine). Tiny random models: the pixels are meaningless, the agreement is what is checked."""

import numpy as np
import pytest
import torch

from conftest import CLIP_TOKENIZER, init_tiny, random_image
from perco.engine import Codec
from perco.engine.errors import BackendError
from perco.export.fast import FastSettings

CAPTION = "a red barn on a green hill"


@pytest.fixture(scope="module")
def v2_model(tmp_path_factory):
    return init_tiny(tmp_path_factory.mktemp("fast-v2") / "v2", "--family", "percov2", "--rate", "0.0078",
                     "--tokenizer", str(CLIP_TOKENIZER))


def _psnr(a, b) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return 10 * np.log10(255**2 / mse) if mse else np.inf


# measured on the 2-core CI machine, 128 x 96, 3 steps: perco-sd FP32 87.8 dB, BF16 46.6 dB; percov2 FP32 90.8 dB,
# BF16 45.4 dB. The floors leave over 20 / 13 dB of margin.
@pytest.mark.parametrize("dtype,floor", [("fp32", 65.0), ("bf16", 32.0)])
@pytest.mark.parametrize("family", ["perco-sd", "percov2"])
def test_fast_backend_matches_the_reference(tiny_model, v2_model, monkeypatch, dtype, floor, family):
    monkeypatch.setenv("PERCO_TORCH_DTYPE", dtype)
    model = tiny_model if family == "perco-sd" else v2_model
    reference = Codec.from_pretrained(model, backend="torch")
    fast = Codec.from_pretrained(model, backend="torch-fast")
    assert (fast.backend.device, fast.backend.precision) == ("cpu", dtype)
    image = random_image(96, 128, seed=3)
    data = reference.compress(image, caption=CAPTION)
    assert fast.compress(image, caption=CAPTION) == data  # the encoder graphs stay FP32: the same bytes
    psnr = _psnr(reference.decompress(data, steps=3), fast.decompress(data, steps=3))
    assert psnr >= floor, psnr
    fast.backend.close()


def test_settings_are_checked(monkeypatch):
    monkeypatch.setenv("PERCO_TORCH_DTYPE", "fp8")
    with pytest.raises(BackendError, match="PERCO_TORCH_DTYPE='fp8'"):
        FastSettings.from_env()
    monkeypatch.setenv("PERCO_TORCH_DTYPE", "fp32")
    monkeypatch.setenv("PERCO_TORCH_DEVICE", "cpu")
    monkeypatch.setenv("PERCO_TORCH_GRAPHS", "1")
    with pytest.raises(BackendError, match="needs the cuda device"):
        FastSettings.from_env()
    if not torch.cuda.is_available():
        monkeypatch.setenv("PERCO_TORCH_DEVICE", "cuda")
        with pytest.raises(BackendError, match="no CUDA GPU"):
            FastSettings.from_env()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs and FP16 on the GPU need a CUDA GPU (none here)")
def test_cuda_graph_step_matches_eager(tiny_model, monkeypatch):
    monkeypatch.setenv("PERCO_TORCH_DEVICE", "cuda")
    monkeypatch.setenv("PERCO_TORCH_DTYPE", "fp16")
    image = random_image(96, 128, seed=3)
    monkeypatch.setenv("PERCO_TORCH_GRAPHS", "0")
    eager = Codec.from_pretrained(tiny_model, backend="torch-fast")
    data = eager.compress(image, caption=CAPTION)
    monkeypatch.setenv("PERCO_TORCH_GRAPHS", "1")
    graphed = Codec.from_pretrained(tiny_model, backend="torch-fast")
    assert _psnr(eager.decompress(data, steps=3), graphed.decompress(data, steps=3)) >= 60
