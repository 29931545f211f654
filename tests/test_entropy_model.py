"""The masked-token entropy model's exact core: schedules, the integer network, its ONNX and torch forms.

numpy (the reference), ONNX Runtime CPU and torch float64 must give bit-identical integers
(docs/entropy-model-arithmetic.md); the group-by-group rANS round trip checks the decoder sees exactly
the context the encoder saw.
"""

import doctest
import hashlib
import json

import numpy as np
import pytest

from perco.engine.entropy import intnet, schedules
from perco.engine.entropy.batch import OK, BatchCoder, Model
from perco.engine.entropy.intnet import (
    ACC_LIMIT, IntNet, IntNetConfig, conv_bound, group_tables, random_weights, validate_weights,
)
from perco.engine.entropy.schedules import (
    SCHEDULES, checkerboard, coarse_stride, coarse_to_fine, group_positions, make_schedule,
)
from perco.engine.entropy.tables import LOGIT_MAX_STEPS, PROB_TOTAL, tables_from_logits, tables_from_steps

SIZES = [(1, 1), (1, 2), (2, 1), (1, 7), (7, 1), (5, 3), (3, 5), (4, 4), (9, 9), (17, 2), (64, 48), (33, 65),
         (1, 4096), (4096, 3)]


def test_docstring_examples():
    for module in (schedules, intnet):
        assert doctest.testmod(module).failed == 0


# --- schedules ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(SCHEDULES))
@pytest.mark.parametrize("h, w", SIZES)
def test_schedule_is_a_partition_into_consecutive_groups(name, h, w):
    schedule = make_schedule(name, h, w)
    assert schedule.shape == (h, w) and schedule.dtype == np.int64
    sizes = np.bincount(schedule.reshape(-1))
    assert schedule.min() == 0 and (sizes > 0).all()  # ids 0..G-1, every group non-empty
    positions = group_positions(schedule)
    assert [len(p) for p in positions] == sizes.tolist()
    assert all((np.diff(p) > 0).all() and (schedule.reshape(-1)[p] == g).all() for g, p in enumerate(positions))
    np.testing.assert_array_equal(np.sort(np.concatenate(positions)), np.arange(h * w))
    np.testing.assert_array_equal(schedule, make_schedule(name, h, w))  # deterministic


def test_pinned_schedules():
    assert checkerboard(1, 1).tolist() == [[0]]
    assert checkerboard(2, 3).tolist() == [[0, 1, 0], [1, 0, 1]]
    assert coarse_to_fine(1, 1).tolist() == [[0]]
    assert coarse_to_fine(1, 2).tolist() == [[0, 0]]
    assert coarse_to_fine(4, 4).tolist() == [[0, 2, 0, 2], [2, 1, 2, 1], [0, 2, 0, 2], [2, 1, 2, 1]]
    assert coarse_to_fine(3, 5).tolist() == [[0, 4, 2, 4, 0], [4, 3, 4, 3, 4], [2, 4, 1, 4, 2]]
    assert coarse_to_fine(1, 7).tolist() == [[0, 2, 1, 2, 0, 2, 1]]
    assert coarse_to_fine(5, 1).tolist() == [[0], [2], [1], [2], [0]]
    assert [p.tolist() for p in group_positions(coarse_to_fine(3, 3))] == [[0, 2, 6, 8], [4], [1, 3, 5, 7]]


@pytest.mark.parametrize("h, w", [(64, 64), (64, 48), (33, 65), (5, 3), (4096, 2)])
def test_coarse_to_fine_structure(h, w):
    """A coarse lattice of a few tokens, then per level: diagonal centres after their 4 diagonal
    neighbours at the level's stride, edge midpoints after their 4 axial ones (those inside the grid)."""
    schedule = coarse_to_fine(h, w)
    stride = coarse_stride(h, w)
    assert stride < max(h, w) <= 2 * stride
    levels = stride.bit_length() - 1
    # the coarse group, L edge groups and a diagonal group at each stride 2^v < min(h, w)
    assert schedule.max() + 1 == 1 + levels + min(levels, (min(h, w) - 1).bit_length())
    i, j = np.indices((h, w))
    coarse = (i % stride == 0) & (j % stride == 0)
    assert (schedule[coarse] == 0).all() and (schedule[~coarse] > 0).all() and 2 <= coarse.sum() <= 4
    for v in range(levels):
        s = 1 << v
        new = ((i | j) & (2 * s - 1)) == s  # on the stride-s lattice, not on the 2s one
        diagonal = new & ((i // s) % 2 == 1) & ((j // s) % 2 == 1)
        for mask, offsets in ((diagonal, [(-s, -s), (-s, s), (s, -s), (s, s)]),
                              (new & ~diagonal, [(-s, 0), (s, 0), (0, -s), (0, s)])):
            for a, b in zip(*np.nonzero(mask)):
                for da, db in offsets:
                    if 0 <= a + da < h and 0 <= b + db < w:
                        assert schedule[a + da, b + db] < schedule[a, b]
            assert len(np.unique(schedule[mask])) <= 1  # one group per (level, phase)


@pytest.mark.parametrize("h, w", [(0, 3), (3, 0), (4097, 1), (2.0, 2)])
def test_schedule_sizes_are_checked(h, w):
    with pytest.raises(ValueError, match="schedule needs"):
        coarse_to_fine(h, w)


def test_unknown_schedule():
    with pytest.raises(ValueError, match="unknown schedule"):
        make_schedule("spiral", 4, 4)


# --- config and weights --------------------------------------------------------------------------


def test_config_round_trips_through_json():
    config = IntNetConfig.preset("base", 8192, schedule="checkerboard", logit_multiplier=3, logit_shift=2)
    data = json.loads(json.dumps(config.to_dict()))
    assert IntNetConfig.from_dict(data) == config and config.mask == 8192
    assert config.layers == ((3, 1), (3, 2), (3, 4), (3, 8), (3, 1))


@pytest.mark.parametrize("change, message", [
    ({"codebook_size": 1}, "codebook_size"), ({"codebook_size": 65537}, "codebook_size"),
    ({"channels": 0}, "channels"), ({"layers": ((2, 1),)}, "odd kernel"), ({"layers": ((3, 0),)}, "dilation"),
    ({"layers": ((3,),)}, "pairs"), ({"channels": 8000}, "overflows int32"),
    ({"schedule": "spiral"}, "unknown schedule"),
    ({"logit_multiplier": 0}, "logit_multiplier"), ({"logit_multiplier": 1 << 15}, "logit_multiplier"),
    ({"logit_shift": 32}, "logit_shift"), ({"codebook_size": True}, "codebook_size"),
])
def test_bad_configs_are_refused(change, message):
    with pytest.raises(ValueError, match=message):
        IntNetConfig(**{**IntNetConfig.preset("tiny", 64).to_dict(), **change})


def test_from_dict_is_strict():
    data = IntNetConfig.preset("tiny", 64).to_dict()
    with pytest.raises(ValueError, match="config needs"):
        IntNetConfig.from_dict({**data, "extra": 1})
    with pytest.raises(ValueError, match="config needs"):
        IntNetConfig.from_dict({k: v for k, v in data.items() if k != "channels"})
    with pytest.raises(ValueError, match="unknown preset"):
        IntNetConfig.preset("huge", 64)


def test_bounds():
    """255 * 127 * Cin * k^2 + |bias| < 2^31 (int32 accumulation); the requantized product < 2^46 < 2^53."""
    assert conv_bound(128, 3) == 255 * 127 * 128 * 9 < ACC_LIMIT
    assert ACC_LIMIT * ((1 << 15) - 1) + (1 << 30) < 1 << 46
    assert (2 * ACC_LIMIT) * ((1 << 15) - 1) < 1 << 53  # logit differences times the logit multiplier
    IntNetConfig(codebook_size=64, channels=8000, layers=((1, 1),))  # 255 * 127 * 8000 fits
    with pytest.raises(ValueError, match="layer 0"):
        IntNetConfig(codebook_size=64, channels=8000, layers=((3, 1),))


def _corrupt(weights, name, value):
    return {**weights, name: value}


TINY = IntNetConfig.preset("tiny", 64)
TINY_WEIGHTS = random_weights(TINY, 0)
BIAS_LIMIT = ACC_LIMIT - conv_bound(16, 3)


@pytest.mark.parametrize("name, value, message", [
    ("conv0.weight", TINY_WEIGHTS["conv0.weight"].astype(np.int16), "expected int8"),
    ("conv1.weight", TINY_WEIGHTS["conv1.weight"][:, :, :2], "shape"),
    ("embed", TINY_WEIGHTS["embed"][:64], "shape"),  # no MASK row
    ("head.bias", TINY_WEIGHTS["head.bias"][:-1], "shape"),
    ("head.weight", TINY_WEIGHTS["head.weight"].reshape(64, 16), "shape"),
    ("conv0.shift", np.array(0, np.int32), r"\[1, 31\]"),
    ("conv2.shift", np.full(16, 32, np.int32), r"\[1, 31\]"),
    ("conv0.shift", np.zeros(15, np.int32), "shape"),
    ("conv1.multiplier", np.array(1 << 15, np.int32), "multiplier"),
    ("conv1.multiplier", np.full(16, -1, np.int32), "multiplier"),
    ("conv0.weight", np.full((16, 16, 3, 3), -128, np.int8), "weight"),
    ("conv0.bias", np.full(16, BIAS_LIMIT + 1, np.int32), "bias"),
    ("head.weight", TINY_WEIGHTS["head.weight"].tolist(), "got list"),
])
def test_corrupt_weights_are_refused(name, value, message):
    with pytest.raises(ValueError, match=message):
        IntNet(TINY, _corrupt(TINY_WEIGHTS, name, value))


def test_missing_or_extra_weights_are_refused():
    with pytest.raises(ValueError, match=r"missing \['conv2.shift'\]"):
        IntNet(TINY, {k: v for k, v in TINY_WEIGHTS.items() if k != "conv2.shift"})
    with pytest.raises(ValueError, match=r"unexpected \['conv3.weight'\]"):
        IntNet(TINY, _corrupt(TINY_WEIGHTS, "conv3.weight", TINY_WEIGHTS["conv0.weight"]))
    with pytest.raises(ValueError, match="missing"):  # weights of another config
        IntNet(IntNetConfig.preset("small", 64), TINY_WEIGHTS)
    net = IntNet(TINY, TINY_WEIGHTS)
    net.validate()
    net.weights["conv1.shift"] = np.array(40, np.int32)
    with pytest.raises(ValueError, match="conv1.shift"):
        net.validate()


def test_random_weights_are_deterministic_and_alive():
    config = IntNetConfig.preset("small", 1024)
    weights = random_weights(config, 3)
    assert intnet.weights_digest(config, weights) == intnet.weights_digest(config, random_weights(config, 3))
    assert intnet.weights_digest(config, weights) != intnet.weights_digest(config, random_weights(config, 4))
    validate_weights(config, weights)
    ids = np.random.default_rng(0).integers(0, 1025, (24, 24))
    for depth in range(1, len(config.layers) + 1):  # each hidden layer: neither dead nor saturated
        sub = IntNetConfig.from_dict({**config.to_dict(), "layers": config.layers[:depth]})
        kept = {name: value for name, value in weights.items() if not name.startswith("conv")
                or int(name[4:name.index(".")]) < depth}
        x = IntNet(sub, kept).features(ids)
        assert 0.2 < (x == 0).mean() < 0.8 and (x == 255).mean() < 0.05, depth
    tables = IntNet(config, weights).tables(ids, np.arange(ids.size))
    assert 0.02 < (tables.max(axis=1) / PROB_TOTAL).mean() < 0.9  # neither uniform nor one-hot


# --- numpy == ONNX Runtime == torch float64 --------------------------------------------------------


def _extreme_weights(config, seed):
    """Every bound at its limit: weights +-127, embeddings 0/255, biases at +-limit, largest multipliers,
    per-channel shifts 1..31 and a scalar multiplier in one layer. On an all-MASK grid, layer 0's
    channels 0 and 1 reach acc = +-(2^31 - 1) away from the border."""
    weights = random_weights(config, seed)
    rng = np.random.default_rng(seed)
    c, k = config.channels, config.codebook_size
    weights["embed"] = (rng.integers(0, 2, (k + 1, c)) * 255).astype(np.uint8)
    weights["embed"][k] = 255
    for index, (kernel, _) in enumerate(config.layers):
        limit = ACC_LIMIT - conv_bound(c, kernel)
        weights[f"conv{index}.weight"] = (rng.choice([-127, 127], (c, c, kernel, kernel))).astype(np.int8)
        weights[f"conv{index}.bias"] = rng.choice([-limit, limit, 0], c).astype(np.int32)
        weights[f"conv{index}.weight"][:2] = np.array([127, -127]).reshape(2, 1, 1, 1)
        weights[f"conv{index}.bias"][:2] = [limit, -limit]
        weights[f"conv{index}.multiplier"] = np.full(c, (1 << 15) - 1, np.int32)
        weights[f"conv{index}.shift"] = rng.integers(1, 32, c).astype(np.int32)
    weights["conv0.multiplier"] = np.array((1 << 15) - 1, np.int32)
    limit = ACC_LIMIT - conv_bound(c, 1)
    weights["head.weight"] = rng.choice([-127, 127], (k, c, 1, 1)).astype(np.int8)
    weights["head.bias"] = rng.choice([-limit, limit, 0], k).astype(np.int32)
    return weights


def _per_channel_shift_weights(config, seed):
    weights = random_weights(config, seed)
    shift = int(weights["conv0.shift"])
    weights["conv0.shift"] = (shift + np.arange(config.channels) % 3 - 1).astype(np.int32)
    weights["conv1.multiplier"] = np.array(int(np.median(weights["conv1.multiplier"])), np.int32)
    return weights


CASES = [  # (config, weights maker, grid sizes)
    (TINY, random_weights, [(1, 1), (1, 13), (9, 1), (5, 7), (32, 24)]),
    (IntNetConfig.preset("tiny", 1024), _per_channel_shift_weights, [(2, 3), (16, 11)]),
    (IntNetConfig.preset("small", 1024, logit_multiplier=3, logit_shift=2), random_weights, [(1, 17), (12, 20)]),
    (IntNetConfig.preset("small", 64), _extreme_weights, [(6, 6), (1, 5)]),
    (IntNetConfig.preset("base", 1024), random_weights, [(3, 2), (24, 20)]),
    (IntNetConfig(codebook_size=8192, channels=8, layers=((3, 1), (5, 2))), random_weights, [(3, 5), (8, 8)]),
    (IntNetConfig(codebook_size=8192, channels=4, layers=((3, 1),), logit_multiplier=5, logit_shift=9),
     _extreme_weights, [(4, 7)]),
]


def _grids(config, shape, seed):
    """Grids with random MASK patterns: none, all, half, and a schedule's context for a middle group."""
    rng = np.random.default_rng(seed)
    k = config.codebook_size
    ids = rng.integers(0, k, shape)
    schedule = coarse_to_fine(*shape)
    yield ids
    yield np.full(shape, k)
    yield np.where(rng.random(shape) < 0.5, k, ids)
    yield np.where(schedule < (schedule.max() + 1) // 2, ids, k)


@pytest.mark.parametrize("case", range(len(CASES)))
def test_numpy_onnxruntime_and_torch_agree_bit_for_bit(case):
    ort = pytest.importorskip("onnxruntime", reason="the ONNX graph runs on onnxruntime")
    torch = pytest.importorskip("torch", reason="TorchIntNet needs torch (the export extra)")
    pytest.importorskip("onnx", reason="onnx_graph needs onnx (the export extra)")
    from perco.export.entropy_model import TorchIntNet, onnx_graph

    config, make, shapes = CASES[case]
    weights = make(config, case)
    net = IntNet(config, weights)
    session = ort.InferenceSession(onnx_graph(config, weights).SerializeToString(), providers=["CPUExecutionProvider"])
    torch_net = TorchIntNet(config, weights)
    k = config.codebook_size
    for shape in shapes:
        for ids in _grids(config, shape, case):
            logits = net.logits(ids)
            assert logits.dtype == np.int32 and logits.shape == (k, *shape)
            steps = net.steps(ids, np.arange(ids.size))
            assert steps.min() >= 0 and steps.max() <= LOGIT_MAX_STEPS and (steps.min(axis=1) == 0).all()
            ort_logits, ort_steps = session.run(None, {"ids": ids.astype(np.int64)})
            assert ort_logits.dtype == np.int32 and ort_steps.dtype == np.int64
            np.testing.assert_array_equal(ort_logits, logits)
            np.testing.assert_array_equal(ort_steps.reshape(k, -1).T, steps)
            with torch.no_grad():
                torch_logits = torch_net(torch.from_numpy(ids))
                torch_steps = torch_net.steps(ids)
            assert torch_logits.dtype == torch.int32
            np.testing.assert_array_equal(torch_logits.numpy(), logits)
            np.testing.assert_array_equal(torch_steps.numpy().reshape(k, -1).T, steps)


def test_numpy_matches_an_int64_convolution():
    """The float64 matrix products of the reference are exact: an independent int64 tap-sum agrees."""
    config, _, _ = CASES[3]
    weights = _extreme_weights(config, 3)
    ids = np.random.default_rng(1).integers(0, 65, (7, 9))
    x = weights["embed"][ids].transpose(2, 0, 1).astype(np.int64)
    h, w = ids.shape
    for index, (kernel, dilation) in enumerate(config.layers):
        pad = dilation * (kernel - 1) // 2
        padded = np.pad(x, ((0, 0), (pad, pad), (pad, pad)))
        acc = weights[f"conv{index}.bias"].astype(np.int64)[:, None, None] + sum(
            np.einsum("oc,chw->ohw", weights[f"conv{index}.weight"][:, :, a, b].astype(np.int64),
                      padded[:, a * dilation:a * dilation + h, b * dilation:b * dilation + w])
            for a in range(kernel) for b in range(kernel))
        m = np.broadcast_to(weights[f"conv{index}.multiplier"].astype(np.int64), (config.channels,))[:, None, None]
        s = np.broadcast_to(weights[f"conv{index}.shift"].astype(np.int64), (config.channels,))[:, None, None]
        x = np.minimum(255, (np.maximum(acc, 0) * m + (1 << (s - 1))) // (1 << s))
    logits = np.einsum("kc,chw->khw", weights["head.weight"][:, :, 0, 0].astype(np.int64), x)
    logits += weights["head.bias"][:, None, None]
    assert np.abs(logits).max() < 1 << 31
    np.testing.assert_array_equal(IntNet(config, weights).logits(ids), logits)


# --- tables ---------------------------------------------------------------------------------------


def test_tables_from_steps_matches_tables_from_logits():
    rng = np.random.default_rng(5)
    logits = (rng.standard_normal((6, 300)) * 4).astype(np.float32)
    steps = np.minimum(((logits.max(axis=1, keepdims=True) - logits) * np.float32(4096)).astype(np.int64),
                       LOGIT_MAX_STEPS)
    np.testing.assert_array_equal(tables_from_steps(steps), tables_from_logits(logits))
    np.testing.assert_array_equal(tables_from_steps(steps + 77), tables_from_steps(steps))  # row min -> 0
    np.testing.assert_array_equal(tables_from_steps(steps[0]), tables_from_steps(steps)[0])
    huge = tables_from_steps(np.array([[0, 1 << 40, LOGIT_MAX_STEPS]], dtype=np.uint64))
    assert huge.tolist() == [[PROB_TOTAL - 2, 1, 1]]
    for bad in (np.array([[0, -1]]), np.array([[0.0, 1.0]]), np.zeros((2, 2, 2), np.int64)):
        with pytest.raises(ValueError):
            tables_from_steps(bad)


def test_pinned_tables():
    """Drift guard: random_weights (splitmix64, no numpy RNG) + the network + the table procedure
    for a fixed seed and input. The digests were computed once with this code; a change means the
    arithmetic changed and every coded stream would decode differently."""
    config = IntNetConfig.preset("tiny", 256)
    net = IntNet(config, random_weights(config, 7))
    ids = (np.arange(11 * 13) * 7919 % 257).reshape(11, 13)  # includes MASK (256)
    tables = net.tables(ids, np.arange(ids.size))
    assert tables.shape == (143, 256) and (tables >= 1).all() and (tables.sum(axis=1) == PROB_TOTAL).all()
    assert net.weights_digest() == "0693fe5b37ee9a5cdd5222526ded2997b3aa709a1bc7993dbebfe1ce3c6d9319"
    assert hashlib.sha256(tables.astype("<i8").tobytes()).hexdigest() == (
        "07b3bb9a816d4a134123dfb088504be18d64db85a931fa69636798619c8f39dd")


def test_group_tables_ignores_what_is_not_decoded_yet():
    net = IntNet(TINY, TINY_WEIGHTS)
    schedule = coarse_to_fine(9, 10)
    grid = np.random.default_rng(2).integers(0, 64, (9, 10))
    for group in range(schedule.max() + 1):
        partial = np.where(schedule < group, grid, np.random.default_rng(group).integers(0, 65, grid.shape))
        np.testing.assert_array_equal(group_tables(net, partial, schedule, group),
                                      group_tables(net, grid, schedule, group))
    with pytest.raises(ValueError, match="no group"):
        group_tables(net, grid, schedule, schedule.max() + 1)
    with pytest.raises(ValueError, match="token ids"):
        net.logits(np.full((2, 2), 65))


@pytest.mark.parametrize("schedule_name, shape", [("coarse-to-fine", (12, 9)), ("checkerboard", (5, 16)),
                                                  ("coarse-to-fine", (1, 11)), ("single", (3, 3))])
def test_group_by_group_rans_round_trip(schedule_name, shape):
    config = IntNetConfig.preset("tiny", 256, schedule=schedule_name)
    net = IntNet(config, random_weights(config, 11))
    grid = np.random.default_rng(3).integers(0, 256, shape)
    schedule = make_schedule(config.schedule, *shape)
    positions = group_positions(schedule)
    coder = BatchCoder(use_gpu=False)
    streams, bits = [], 0.0
    for group, where in enumerate(positions):  # encoder: one stream per group, a table per symbol
        tables = group_tables(net, grid, schedule, group)
        symbols = grid.reshape(-1)[where]
        bits -= np.log2(tables[np.arange(len(where)), symbols] / PROB_TOTAL).sum()
        streams += coder.encode([symbols], Model(256, tables))
    decoded = np.full(shape, config.mask)
    for group, where in enumerate(positions):  # decoder: each group from the groups decoded before it
        tables = group_tables(net, decoded, schedule, group)
        (symbols,), status = coder.decode([streams[group]], [len(where)], Model(256, tables))
        assert status.tolist() == [OK]
        decoded.reshape(-1)[where] = symbols
    np.testing.assert_array_equal(decoded, grid)
    words = sum(len(s) for s in streams)
    assert bits - 32 * len(streams) <= 32 * words <= bits + 64 * len(streams)  # size ~ the model's cross-entropy
