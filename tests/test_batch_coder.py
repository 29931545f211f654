"""Batched coder: CPU path everywhere; the CUDA path (same words, same statuses) where a GPU is present."""

import os

import numpy as np
import pytest

from perco.engine.entropy import encode_symbols, uniform_table
from perco.engine.entropy.batch import CORRUPT, OK, TRUNCATED, BatchCoder, Model
from perco.engine.entropy.tables import PROB_TOTAL, tables_from_logits


def _batch(k, lengths, rng, per_symbol=False, static=False):
    total = sum(lengths)
    if per_symbol:
        model = Model(k, tables_from_logits(rng.standard_normal((total, k)).astype(np.float32) * 2))
    elif static:
        model = Model(k, tables_from_logits(rng.standard_normal(k).astype(np.float32) * 3))
    else:
        model = Model(k)
    symbols = [rng.integers(0, k, n).astype(np.int32) for n in lengths]
    return model, symbols


@pytest.mark.parametrize("k", [2, 3, 256, 8192, 65536])
@pytest.mark.parametrize("kind", ["uniform", "static", "per_symbol"])
def test_cpu_round_trip(k, kind):
    rng = np.random.default_rng(k)
    lengths = [0, 1, 2, 7, 33] if kind == "per_symbol" and k >= 8192 else [0, 1, 2, 7, 333]
    model, symbols = _batch(k, lengths, rng, per_symbol=kind == "per_symbol", static=kind == "static")
    coder = BatchCoder(use_gpu=False)
    streams = coder.encode(symbols, model)
    decoded, status = coder.decode(streams, lengths, model)
    assert (status == OK).all()
    for a, b in zip(decoded, symbols):
        np.testing.assert_array_equal(a, b)
    if kind != "per_symbol":  # the same bytes as the single-stream coder of the bitstream
        table = uniform_table(k) if model.table is None else model.table
        for words, part in zip(streams, symbols):
            np.testing.assert_array_equal(words, encode_symbols(part, table))


def test_cpu_statuses():
    coder = BatchCoder(use_gpu=False)
    model = Model(256)
    good = coder.encode([np.full(300, 5, np.int32)], model)[0]
    streams = [np.array([7, 0], np.uint32), np.concatenate([[12345, 999], good]).astype(np.uint32),
               good[-2:], good]
    _, status = coder.decode(streams, [1, 300, 300, 300], model)
    assert status.tolist() == [CORRUPT, CORRUPT, TRUNCATED, OK]


def test_model_cdf():
    cdf = Model(4).cdf()
    assert cdf.tolist() == [[0, 1 << 22, 2 << 22, 3 << 22, PROB_TOTAL]]




def _check_matches_cpu(gpu, kind, k, per_symbol_streams=50):
    """The library path of `gpu` against the CPU path: the same words, the same statuses."""
    rng = np.random.default_rng(k + len(kind))
    lengths = list(rng.integers(0, 200, 500)) + [0, 1, 100_000]
    if kind == "per_symbol":
        lengths = lengths[:per_symbol_streams]
    model, symbols = _batch(k, lengths, rng, per_symbol=kind == "per_symbol", static=kind == "static")
    cpu = BatchCoder(use_gpu=False)
    streams = gpu.encode(symbols, model)
    for a, b in zip(streams, cpu.encode(symbols, model)):
        np.testing.assert_array_equal(a, b)
    broken = [s.copy() for s in streams]
    for s in broken[::7]:
        if s.size > 2:
            s[len(s) // 2] ^= 0x1234
    for batch in (streams, broken, [s[1:] for s in streams]):
        (g, gs), (c, cs) = gpu.decode(batch, lengths, model), cpu.decode(batch, lengths, model)
        np.testing.assert_array_equal(gs, cs)
        for a, b, st in zip(g, c, gs):
            if st == OK:
                np.testing.assert_array_equal(a, b)


@pytest.mark.skipif(BatchCoder().device != "cuda",
                    reason="needs a CUDA GPU and PERCO_KERNELS_LIB pointing at the built libperco_kernels.so")
@pytest.mark.parametrize("kind", ["uniform", "static", "per_symbol"])
@pytest.mark.parametrize("k", [2, 256, 65536])
def test_gpu_matches_cpu(kind, k):
    _check_matches_cpu(BatchCoder(), kind, k)


@pytest.fixture
def host_kernels(monkeypatch):
    """A BatchCoder whose library path is libperco_kernels_host.so: the CUDA kernels run on the CPU.

    The host library (cmake -DPERCO_KERNELS_HOST=ON, docs/entropy-coding.md) reports one device;
    PERCO_KERNELS_HOST_LIB names it. A sanitized build also needs its runtime preloaded
    (LD_PRELOAD=libasan.so for ASan; .ci/run does this).
    """
    path = os.environ.get("PERCO_KERNELS_HOST_LIB")
    if not path:
        pytest.skip("host kernels not built: set PERCO_KERNELS_HOST_LIB to libperco_kernels_host.so "
                    "(cmake -DPERCO_KERNELS_HOST=ON -DPERCO_KERNELS_CUDA=OFF)")
    assert os.path.isfile(path), f"PERCO_KERNELS_HOST_LIB={path} does not exist"
    monkeypatch.setenv("PERCO_KERNELS_LIB", path)
    coder = BatchCoder()
    assert coder.device == "cuda", f"{path} did not load or reports no device"
    return coder


@pytest.mark.parametrize("kind", ["uniform", "static", "per_symbol"])
@pytest.mark.parametrize("k", [2, 256, 65536])
def test_host_kernels_match_cpu(host_kernels, kind, k):
    # Per-symbol tables at K = 65536 cost 256 KiB per symbol on the CPU path too: fewer streams.
    _check_matches_cpu(host_kernels, kind, k, per_symbol_streams=3 if k == 65536 else 50)


def _empty_per_symbol_batch(coder):
    """A per-symbol batch with no symbols at all (the table array is [0, K])."""
    model = Model(16, np.zeros((0, 16), np.int64))
    streams = coder.encode([np.zeros(0, np.int32), np.zeros(0, np.int32)], model)
    decoded, status = coder.decode([np.zeros(0, np.uint32), np.array([5], np.uint32)], [0, 0], model)
    return streams, decoded, status


@pytest.mark.parametrize("path", ["cpu", "host", "gpu"])
def test_empty_per_symbol_batch(path, request):
    """Empty streams and the same statuses on every path (the library path used to refuse it)."""
    if path == "gpu" and BatchCoder().device != "cuda":
        pytest.skip("needs a CUDA GPU and PERCO_KERNELS_LIB pointing at the built libperco_kernels.so")
    coder = {"cpu": lambda: BatchCoder(use_gpu=False), "gpu": BatchCoder,
             "host": lambda: request.getfixturevalue("host_kernels")}[path]()
    streams, decoded, status = _empty_per_symbol_batch(coder)
    assert [s.size for s in streams] == [0, 0] and [d.size for d in decoded] == [0, 0]
    assert status.tolist() == [OK, TRUNCATED]  # a lone state word: all read, state not empty


def test_entropy_benchmark_smoke(tmp_path):
    """The benchmark script runs (CPU path) so it never drifts from the API."""
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).parent.parent / "benchmarks" / "entropy.py"
    proc = subprocess.run([sys.executable, str(script), "--smoke", "--repeats", "1", "--out", str(tmp_path / "e")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "decode Msym/s" in (tmp_path / "e.md").read_text()
