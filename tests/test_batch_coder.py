"""Batched coder: CPU path everywhere; the CUDA path (same words, same statuses) where a GPU is present."""

import os

import numpy as np
import pytest

from perco.engine.entropy import encode_symbols, rans, uniform_table
from perco.engine.entropy.batch import (CORRUPT, OK, TRUNCATED, BatchCoder, DeviceArray, Model, StepsStreamDecoder,
                                        split_counts, split_symbols)
from perco.engine.entropy.tables import PROB_TOTAL, tables_from_logits, tables_from_steps
from perco.engine.errors import BitstreamError


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


# --- split streams and resumable decoding: the CPU path ------------------------------------------

def _steps(rng, n, k):
    """Logit steps as the entropy model makes them: the row maximum at step 0, a few nats of spread."""
    steps = rng.integers(0, 30000, (n, k)).astype(np.int64)
    steps[np.arange(n), rng.integers(0, k, n)] = 0
    if n:
        steps[:: 3, : k // 2] = (1 << 20) + 5  # beyond the cap on some rows
    return steps


def _split_batch(k, lengths, kind, rng):
    """A batch whose per-symbol tables come from steps (returned too), as the learned model's."""
    total = int(sum(lengths))
    steps = None
    if kind == "per_symbol":
        steps = _steps(rng, total, k)
        model = Model(k, tables_from_steps(steps))
    elif kind == "static":
        model = Model(k, tables_from_logits(rng.standard_normal(k).astype(np.float32) * 3))
    else:
        model = Model(k)
    cdf = np.cumsum(np.atleast_2d(model.static_table() if kind != "per_symbol" else model.table), axis=1)
    rows = np.zeros(total, np.int64) if kind != "per_symbol" else np.arange(total)
    u = rng.integers(0, PROB_TOTAL, total)
    flat = np.array([np.searchsorted(cdf[r], v, side="right") for r, v in zip(rows, u)], dtype=np.int32)
    return model, np.split(flat, np.cumsum(lengths)[:-1]), steps


def _damaged(streams):
    """Variants of split streams: every third sub-stream damaged (a flipped word, the top word lost,
    a word left over, a zero last word, only the state left) and every word stream cut short."""
    out = [[w.copy() for w in sub] for sub in streams]
    i = 0
    for sub in out:
        for j, w in enumerate(sub):
            i += 1
            if i % 3:
                continue
            if i % 5 == 0 and w.size > 2:
                w[w.size // 2 - 1] ^= 0x00F0F00F
            elif i % 5 == 1:
                sub[j] = w[:-1]
            elif i % 5 == 2:
                sub[j] = np.concatenate([[0x9999], w]).astype(np.uint32)
            elif i % 5 == 3:
                sub[j] = np.concatenate([w, [0]]).astype(np.uint32)
            else:
                sub[j] = w[-2:]
    return out


LENGTHS = [0, 1, 2, 3, 7, 40, 5]


@pytest.mark.parametrize("splits", [1, 2, 3, 8])
@pytest.mark.parametrize("kind", ["uniform", "static", "per_symbol"])
def test_cpu_split_streams_are_cpu_coder_streams(kind, splits):
    """Sub-stream j of a sequence is the CPU coder's stream of symbols[j::P] (with their rows), so any
    constriction-format decoder reads it alone; decode_split inverts encode_split."""
    k = 40 if kind == "per_symbol" else 256
    rng = np.random.default_rng(splits * 7 + len(kind))
    model, symbols, _ = _split_batch(k, LENGTHS, kind, rng)
    coder = BatchCoder(use_gpu=False)
    streams = coder.encode_split(symbols, model, splits)
    offsets = np.concatenate([[0], np.cumsum(LENGTHS)])
    for q, (sub, part) in enumerate(zip(streams, symbols)):
        assert len(sub) == splits and [len(p) for p in split_symbols(part, splits)] == split_counts(len(part),
                                                                                                  splits).tolist()
        for j, (words, piece) in enumerate(zip(sub, split_symbols(part, splits))):
            if kind == "per_symbol":
                want = rans.encode_symbol_tables(piece, model.table[offsets[q] + j : offsets[q + 1] : splits])
            else:
                want = encode_symbols(piece, model.static_table())
            np.testing.assert_array_equal(words, want)
    decoded, status = coder.decode_split(streams, LENGTHS, model, splits)
    assert status.shape == (len(LENGTHS), splits) and (status == OK).all()
    for a, b in zip(decoded, symbols):
        np.testing.assert_array_equal(a, b)


def _chunked(coder, streams, lengths, model, splits, chunks, rng, steps=None, device=None):
    """Decode in `chunks` random chunks per sequence (empty ones included) -> (symbols list, status)."""
    cuts = [np.sort(np.concatenate([[0, n], rng.integers(0, n + 1, chunks - 1)])) for n in lengths]
    counts = np.array([np.diff(c) for c in cuts]).T  # [chunks, N]
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    decoder = coder.resumable(streams, splits)
    out = [[] for _ in lengths]
    done = np.zeros(len(lengths), np.int64)
    for c, chunk in enumerate(counts):
        index = np.concatenate([np.arange(offsets[q] + done[q], offsets[q] + done[q] + n)
                                for q, n in enumerate(chunk)] + [np.zeros(0, np.int64)]).astype(np.int64)
        if steps is not None:
            part = steps[index]
            got = decoder.pop_steps(device(part) if device and c % 2 == 0 else part, chunk)
        elif model.kind == 2:
            got = decoder.pop_tables(model.table[index].reshape(-1, model.num_symbols), chunk)
        else:
            got = decoder.pop(model, chunk)
        assert got.dtype == np.int64 and got.shape == (int(chunk.sum()),)
        for q, piece in enumerate(np.split(got, np.cumsum(chunk)[:-1])):
            out[q].append(piece)
        done += chunk
    status = decoder.finish()
    decoder.close()
    return [np.concatenate(p).astype(np.int32) for p in out], status


def _resumable_matches_one_shot(coder, kind, k, splits, lengths, chunkings, seed, steps_path=False, device=None,
                                reference=None):
    rng = np.random.default_rng(seed)
    model, symbols, steps = _split_batch(k, lengths, kind, rng)
    reference = reference or BatchCoder(use_gpu=False)
    good = reference.encode_split(symbols, model, splits)
    for streams in (good, _damaged(good)):
        want, want_status = reference.decode_split(streams, lengths, model, splits)
        for trial in range(chunkings):
            chunks = 1 + trial % 5 + (20 if trial == chunkings - 1 else 0)
            got, status = _chunked(coder, streams, lengths, model, splits, chunks, rng,
                                   steps if steps_path else None, device)
            np.testing.assert_array_equal(status, want_status)
            for a, b in zip(got, want):
                np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("splits", [1, 3])
@pytest.mark.parametrize("kind", ["uniform", "static", "per_symbol"])
def test_cpu_resumable_matches_one_shot(kind, splits):
    _resumable_matches_one_shot(BatchCoder(use_gpu=False), kind, 40 if kind == "per_symbol" else 300, splits,
                                LENGTHS, 4, seed=11 * splits + len(kind), steps_path=kind == "per_symbol")


def test_cpu_resumable_k8192():
    _resumable_matches_one_shot(BatchCoder(use_gpu=False), "per_symbol", 8192, 2, [0, 9, 30], 3, seed=5,
                                steps_path=True)


def test_resumable_argument_checks():
    coder = BatchCoder(use_gpu=False)
    with pytest.raises(ValueError, match="sub-streams"):
        coder.resumable([[np.zeros(0, np.uint32)]], splits=2)
    decoder = coder.resumable([[np.zeros(0, np.uint32)], [np.zeros(0, np.uint32)]])
    with pytest.raises(ValueError, match="do not split evenly"):
        decoder.pop_tables(np.full((3, 2), PROB_TOTAL // 2))
    with pytest.raises(ValueError, match="table rows"):
        decoder.pop_tables(np.full((3, 2), PROB_TOTAL // 2), [1, 1])
    with pytest.raises(ValueError, match=">= 0"):
        decoder.pop_steps(np.array([[0, -1]]), [1, 0])
    with pytest.raises(TypeError, match="kernels library"):
        coder.tables_from_steps(_FakeDevice())


class _FakeDevice:
    __cuda_array_interface__ = {"shape": (1, 2), "typestr": "<i8", "data": (0, False), "version": 3}


def _learned(schedule="coarse-to-fine", k=64):
    from perco.engine.entropy.intnet import IntNet, IntNetConfig, random_weights
    from perco.engine.entropy.learned import EntropyModel, LearnedIndexCoder

    config = IntNetConfig.preset("tiny", k, schedule=schedule)
    return LearnedIndexCoder(EntropyModel(IntNet(config, random_weights(config, 9)), b"", b"", {}))


def _decode_with_steps(learned, words, shape, coder, to_device=None, sent=None, seed=0):
    """learned.py's decode loop with StepsStreamDecoder in place of rans.StreamDecoder (the wiring the
    learned coder would use): steps per group -> tables on the device -> indices."""
    from perco.engine.entropy.schedules import group_positions, make_schedule

    config = learned.model.config
    schedule = make_schedule(config.schedule, *shape)
    order = group_positions(schedule)
    sent = len(order) if sent is None else sent
    grid = np.zeros(shape, dtype=np.int64)
    flat = grid.reshape(-1)
    decoder = StepsStreamDecoder(words, config.codebook_size, coder=coder)
    for g, positions in enumerate(order):
        steps = learned.net.steps(np.where(schedule < g, grid, config.mask), positions)
        steps = to_device(steps) if to_device else steps
        flat[positions] = decoder.pop_steps(steps) if g < sent else decoder.sample_steps(steps, seed, g)
    decoder.finish()
    return grid


def test_cpu_steps_stream_decoder_is_the_learned_decode():
    learned = _learned()
    grid = np.random.default_rng(4).integers(0, 64, (5, 7))
    words = learned.encode(grid)
    coder = BatchCoder(use_gpu=False)
    np.testing.assert_array_equal(_decode_with_steps(learned, words, grid.shape, coder), learned.decode(words, (5, 7)))
    partial = learned.encode(grid, groups=2)
    np.testing.assert_array_equal(_decode_with_steps(learned, partial, grid.shape, coder, sent=2, seed=77),
                                  learned.decode(partial, (5, 7), groups=2, seed=77))
    for bad, message in ((np.concatenate([words, [0]]).astype(np.uint32), "zero word"),
                         (np.concatenate([[1], words]).astype(np.uint32), "left over"), (words[:-1], "corrupt")):
        with pytest.raises(BitstreamError, match=message):
            _decode_with_steps(learned, bad, grid.shape, coder)


def test_batch_cpu_path_runs_on_the_builtin_coder(tmp_path):
    """Without constriction (aarch64), the CPU path is the built-in coder: the same words and statuses."""
    import subprocess
    import sys

    script = r"""
import sys, json
import numpy as np
sys.modules["constriction"] = None
from perco.engine.entropy import rans
assert rans.CODER == "builtin"
from perco.engine.entropy.batch import BatchCoder, Model
from perco.engine.entropy.tables import tables_from_steps
rng = np.random.default_rng(3)
coder = BatchCoder(use_gpu=False)
out = {}
for name, model, lengths in (("uniform", Model(300), [0, 5, 40]), ("per_symbol", None, [3, 0, 20])):
    if model is None:
        model = Model(50, tables_from_steps(rng.integers(0, 20000, (23, 50))))
    symbols = [rng.integers(0, model.num_symbols, n).astype(np.int32) for n in lengths]
    streams = coder.encode_split(symbols, model, 3)
    streams[2][1] = streams[2][1][1:]
    decoded, status = coder.decode_split(streams, lengths, model, 3)
    out[name] = [[[w.tolist() for w in sub] for sub in streams], [d.tolist() for d in decoded], status.tolist(),
                 [s.tolist() for s in symbols], model.table.tolist() if model.table is not None else None]
print(json.dumps(out))
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    coder = BatchCoder(use_gpu=False)
    for name, (streams, decoded, status, symbols, table) in __import__("json").loads(done.stdout).items():
        model = Model(300) if table is None else Model(50, np.array(table))
        symbols = [np.array(s, np.int32) for s in symbols]
        want = coder.encode_split(symbols, model, 3)
        want[2][1] = want[2][1][1:]
        assert [[w.tolist() for w in sub] for sub in want] == streams
        lengths = [len(s) for s in symbols]
        d, st = coder.decode_split([[np.array(w, np.uint32) for w in sub] for sub in streams], lengths, model, 3)
        assert st.tolist() == status and [x.tolist() for x in d] == decoded
        assert (np.array(status)[2, 1] != OK) and (np.delete(np.array(status).reshape(-1), 7) == OK).all()


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


@pytest.fixture(params=["host", "gpu"])
def kernels(request):
    """The kernels library path: the host emulation (as host_kernels), or a GPU where PERCO_KERNELS_LIB names
    the CUDA build (benchmarks/gpu_check.py runs this file so)."""
    if request.param == "host":
        return request.getfixturevalue("host_kernels")
    coder = BatchCoder()
    if coder.device != "cuda" or coder.emulated:
        pytest.skip("needs a CUDA GPU and PERCO_KERNELS_LIB pointing at the built libperco_kernels.so")
    return coder


@pytest.mark.parametrize("splits", [1, 3, 8])
@pytest.mark.parametrize("kind", ["uniform", "static", "per_symbol"])
def test_kernels_split_matches_cpu(kernels, kind, splits):
    """encode_split / decode_split on the kernels: the CPU path's words and statuses, damaged streams too."""
    k = 40 if kind == "per_symbol" else 256
    rng = np.random.default_rng(100 + splits)
    lengths = LENGTHS + list(rng.integers(0, 60, 40))
    model, symbols, _ = _split_batch(k, lengths, kind, rng)
    cpu = BatchCoder(use_gpu=False)
    streams = kernels.encode_split(symbols, model, splits)
    assert [[w.tolist() for w in sub] for sub in streams] == [[w.tolist() for w in sub]
                                                              for sub in cpu.encode_split(symbols, model, splits)]
    for batch in (streams, _damaged(streams)):
        (g, gs), (c, cs) = kernels.decode_split(batch, lengths, model, splits), cpu.decode_split(
            batch, lengths, model, splits)
        np.testing.assert_array_equal(gs, cs)
        for a, b in zip(g, c):
            np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("kind, k, splits, lengths, steps_path", [
    ("uniform", 65536, 3, LENGTHS, False),
    ("static", 300, 1, LENGTHS, False),
    ("per_symbol", 40, 1, LENGTHS, False),
    ("per_symbol", 40, 4, [0, 1, 6, 3], True),   # tables made by the kernel from host and device steps
    ("per_symbol", 8192, 2, [0, 60, 9], False),
    ("per_symbol", 8192, 1, [2, 1], True),
])
def test_kernels_resumable_matches_cpu(kernels, kind, k, splits, lengths, steps_path):
    """Chunk by chunk on the kernels (state on the device) == one-shot decode_split on the CPU path: the
    same symbols and final statuses for every chunking, damaged streams included. The steps cases feed
    every other chunk as a DeviceArray (the device-steps path)."""
    _resumable_matches_one_shot(kernels, kind, k, splits, lengths, 2 if k == 8192 else 4,
                                seed=k + splits, steps_path=steps_path, device=kernels.to_device)


def test_kernels_tables_from_steps_bit_identical(kernels):
    """perco_tables_from_steps == numpy tables_from_steps (host and device steps), and the hybrid draw ==
    learned.py's sample_tables."""
    from perco.engine.entropy.learned import sample_tables

    rng = np.random.default_rng(8)
    for k in (2, 257, 8192):
        rows = 2 if k == 8192 else 6
        steps = _steps(rng, rows, k)
        steps[1] += 12345  # a row minimum above 0
        if rows > 2:
            steps[2] = 7  # all equal
        want = tables_from_steps(steps)
        np.testing.assert_array_equal(kernels.tables_from_steps(steps), want)
        np.testing.assert_array_equal(kernels.tables_from_steps(kernels.to_device(steps)), want)
        np.testing.assert_array_equal(kernels.sample_steps(steps, 2**63 + 5, 3), sample_tables(want, 2**63 + 5, 3))


def test_kernels_steps_stream_decoder_is_the_learned_decode(kernels):
    """The learned coder's decode loop with the tables made on the device (steps as DeviceArrays, only the
    indices come back) decodes what LearnedIndexCoder.encode wrote, hybrid mode included."""
    learned = _learned("checkerboard", k=32)
    grid = np.random.default_rng(6).integers(0, 32, (3, 5))
    words = learned.encode(grid)
    want = learned.decode(words, grid.shape)
    for to_device in (None, kernels.to_device):
        np.testing.assert_array_equal(_decode_with_steps(learned, words, grid.shape, kernels, to_device), want)
    partial = learned.encode(grid, groups=1)
    np.testing.assert_array_equal(
        _decode_with_steps(learned, partial, grid.shape, kernels, kernels.to_device, sent=1, seed=9),
        learned.decode(partial, grid.shape, groups=1, seed=9))
    with pytest.raises(BitstreamError, match="left over"):
        _decode_with_steps(learned, np.concatenate([[1], words]).astype(np.uint32), grid.shape, kernels)


def test_kernels_device_arrays(kernels):
    """DeviceArray round trip, the CUDA array interface, decode on device arrays, the copy bandwidth."""
    data = np.arange(10, dtype=np.int64).reshape(2, 5)
    device = kernels.to_device(data)
    assert isinstance(device, DeviceArray) and device.__cuda_array_interface__["typestr"] == "<i8"
    np.testing.assert_array_equal(device.to_host(), data)
    rng = np.random.default_rng(2)
    model, symbols, _ = _split_batch(256, [50, 0, 13], "static", rng)
    streams = kernels.encode_split(symbols, model, 4)
    flat = [w for sub in streams for w in sub]
    words = kernels.to_device(np.concatenate(flat).astype(np.uint32))
    word_offsets = kernels.to_device(np.concatenate([[0], np.cumsum([len(w) for w in flat])]).astype(np.uint64))
    symbol_offsets = kernels.to_device(np.array([0, 50, 50, 63], np.uint64))
    out, status = kernels.empty_device(63, np.int32), kernels.empty_device((3, 4), np.int32)
    kernels.decode_split_device(model, kernels.to_device(model.cdf()), words, word_offsets, symbol_offsets,
                                     4, out, status)
    np.testing.assert_array_equal(out.to_host(), np.concatenate(symbols))
    assert (status.to_host() == OK).all()
    assert kernels.copy_bandwidth(1 << 16, 2) > 0
    # pop_steps(out=...): the symbols also left in a device array (the next group's input on the device)
    steps = _steps(rng, 6, 40)
    tables = tables_from_steps(steps)
    symbols = np.array([np.searchsorted(np.cumsum(t), v, side="right") for t, v in
                        zip(tables, rng.integers(0, PROB_TOTAL, 6))], np.int32)
    (words,) = kernels.encode([symbols], Model(40, tables))
    decoder = kernels.resumable([[words]])
    left = kernels.empty_device(6, np.int32)
    np.testing.assert_array_equal(decoder.pop_steps(kernels.to_device(steps), out=left), symbols)
    np.testing.assert_array_equal(left.to_host(), symbols)
    assert decoder.finish().tolist() == [[OK]]


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


@pytest.mark.parametrize("groups", [None, 2])
def test_learned_decode_host_kernels_match_cpu(host_kernels, monkeypatch, tmp_path, groups):
    """The learned index coder's decode loop on the kernels library (resumable decode, tables_from_steps
    and the hybrid draw as kernels; here the host build) gives the CPU coder's indices, and a damaged
    stream the same error."""
    from perco.engine.entropy.intnet import IntNetConfig, random_weights
    from perco.engine.entropy.learned import LearnedIndexCoder, load_entropy_model, save_entropy_model

    config = IntNetConfig.preset("tiny", 64, schedule="coarse-to-fine")
    coder = LearnedIndexCoder(load_entropy_model(save_entropy_model(tmp_path, config, random_weights(config, 5))))
    grid = np.random.default_rng(2).integers(0, 64, size=(12, 10))
    words = coder.encode(grid, groups=groups)
    damaged = words.copy()
    damaged[len(damaged) // 2] ^= 0x5A5A5A5A

    def decode_both(data):
        results = []
        for lib in (os.environ["PERCO_KERNELS_LIB"], None):
            if lib is None:
                monkeypatch.delenv("PERCO_KERNELS_LIB")
            try:
                results.append(coder.decode(data, grid.shape, groups=groups, seed=7))
            except BitstreamError as exc:
                results.append(str(exc))
        monkeypatch.setenv("PERCO_KERNELS_LIB", os.environ.get("PERCO_KERNELS_HOST_LIB"))
        return results

    on_lib, on_cpu = decode_both(words)
    np.testing.assert_array_equal(on_lib, on_cpu)
    if groups is None:
        np.testing.assert_array_equal(on_lib, grid)
    damaged_lib, damaged_cpu = decode_both(damaged)
    if isinstance(damaged_cpu, str):
        assert damaged_lib == damaged_cpu
    else:
        np.testing.assert_array_equal(damaged_lib, damaged_cpu)


def test_learned_decode_with_cuda_steps(tmp_path, monkeypatch):
    """On a GPU with the kernels library (benchmarks/gpu_check.py runs this file there): the torch-fast backend
    makes each group's steps on the device and the library decodes them in place; only the indices reach the
    host. The indices equal the reference coder's. The CPU run of the same branch: tests/test_learned_coder.py::
    test_device_steps_path_gives_the_same_indices."""
    torch = pytest.importorskip("torch", reason="the torch-fast backend needs torch (the export extra)")
    if not torch.cuda.is_available() or BatchCoder().device != "cuda" or BatchCoder().emulated:
        pytest.skip("needs a CUDA GPU, torch with CUDA and PERCO_KERNELS_LIB pointing at the built libperco_kernels.so")
    from conftest import init_tiny, random_image
    from perco.engine import Codec, bitstream
    from perco.engine.entropy.intnet import IntNetConfig, random_weights
    from perco.engine.entropy.learned import save_entropy_model
    from perco.engine.model import ModelInfo

    model = init_tiny(tmp_path / "model")
    config = IntNetConfig.preset("tiny", ModelInfo(model).rate.codebook_size)
    save_entropy_model(model / "entropy_model", config, random_weights(config, 3))
    reference = Codec.from_pretrained(model, backend="torch")
    monkeypatch.setenv("PERCO_TORCH_DEVICE", "cuda")
    fast = Codec.from_pretrained(model, backend="torch-fast")
    handed = []
    original = type(fast.backend).entropy_steps_on_device
    monkeypatch.setattr(type(fast.backend), "entropy_steps_on_device",
                        lambda self, ids, positions: handed.append(original(self, ids, positions)) or handed[-1])
    image = random_image(128, 192, seed=4)
    for send in (None, 0.5):
        data = reference.compress(image, caption="a boat", seed=1, send=send)
        expected = bitstream.unpack(data, reference.model.stream_spec, reference.backend)[2]
        handed.clear()
        got = bitstream.unpack(data, fast.model.stream_spec, fast.backend)[2]
        np.testing.assert_array_equal(got, expected)
        assert handed and all(steps.is_cuda for steps in handed)
