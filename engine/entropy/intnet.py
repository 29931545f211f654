"""The integer network of the masked-token entropy model: its config, weights and numpy reference.

The network maps a grid of token ids (MASK = K where a token is not known yet) to integer logits, and
those to frequency tables, with integer arithmetic only (Ballé et al. 2019, "Integer networks for data
compression"), so every implementation (this numpy reference, the ONNX graph, torch float64 on CPU or
CUDA) gives the same integers. docs/entropy-model-arithmetic.md is the full specification:

    x0 = embed[ids]                                   uint8 [C, h, w]
    acc = conv_l(x, weight_l) + bias_l                 'same' zero padding, exact (|acc| < 2^31)
    x = min(255, (max(acc, 0) * m_l + 2^(s_l - 1)) >> s_l)        per hidden layer l, uint8
    logits = conv1x1(x, head.weight) + head.bias       int32 [K, h, w]
    steps_i = min(((max_j logits_j - logits_i) * logit_multiplier) >> logit_shift, 2^20 - 1)
    tables = tables_from_steps(steps)                  int64, each row >= 1 and summing to 2^24

numpy computes the convolutions as float64 matrix products: every product x * w is an integer below
2^15 in magnitude and every partial sum, in any order, an integer below 2^31, so float64 (53-bit)
arithmetic is exact; the requantization runs in int64.
"""

import hashlib
from dataclasses import dataclass
from typing import Dict, Mapping, Optional, Tuple

import numpy as np

from perco.engine.entropy.schedules import SCHEDULES
from perco.engine.entropy.tables import LOGIT_FRAC_BITS, LOGIT_MAX_STEPS, tables_from_steps

ACT_MAX = 255  # activations are uint8
WEIGHT_MAX = 127  # weights are int8 in [-127, 127]
ACC_LIMIT = (1 << 31) - 1  # |conv + bias| <= ACC_LIMIT: int32 accumulation
MULTIPLIER_LIMIT = 1 << 15  # multipliers in [0, 2^15), so max(acc, 0) * m + 2^(s-1) < 2^46 < 2^53
SHIFT_MIN, SHIFT_MAX = 1, 31  # hidden-layer shifts (>= 1 for the 2^(s-1) rounding term)
MAX_CODEBOOK = 1 << 16

PRESETS: Dict[str, dict] = {
    "tiny": {"channels": 16, "layers": ((3, 1), (3, 2), (3, 1))},
    "small": {"channels": 64, "layers": ((3, 1), (3, 2), (3, 4), (3, 1))},
    "base": {"channels": 128, "layers": ((3, 1), (3, 2), (3, 4), (3, 8), (3, 1))},
}


def _check_int(name: str, value, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not low <= value <= high:
        raise ValueError(f"{name} must be an integer in [{low}, {high}], got {value!r}")
    return int(value)


def conv_bound(in_channels: int, kernel: int) -> int:
    """The largest |conv(x, w)| for uint8 x and weights in [-127, 127]: 255 * 127 * Cin * k * k."""
    return ACT_MAX * WEIGHT_MAX * in_channels * kernel * kernel


@dataclass(frozen=True)
class IntNetConfig:
    """Shape and fixed-point constants of the network (JSON-friendly through to_dict/from_dict).

    codebook_size K (2..65536; the MASK id is K), channels C, layers: (kernel, dilation) of each hidden
    'same'-padded convolution (odd kernel), schedule: a name in schedules.SCHEDULES, and the head's
    logit rescale (logit_multiplier in [1, 2^15), logit_shift in [0, 31]; logits to steps of 2^-12 nat).
    """

    codebook_size: int
    channels: int
    layers: Tuple[Tuple[int, int], ...]
    schedule: str = "coarse-to-fine"
    logit_multiplier: int = 1
    logit_shift: int = 0

    def __post_init__(self):
        _check_int("codebook_size", self.codebook_size, 2, MAX_CODEBOOK)
        _check_int("channels", self.channels, 1, ACC_LIMIT)
        try:
            layers = tuple((int(k), int(d)) for k, d in self.layers)
        except (TypeError, ValueError):
            raise ValueError(f"layers must be (kernel, dilation) pairs, got {self.layers!r}") from None
        object.__setattr__(self, "layers", layers)
        for index, (kernel, dilation) in enumerate(layers):
            if kernel < 1 or kernel % 2 == 0 or dilation < 1:
                raise ValueError(f"layer {index}: need an odd kernel >= 1 and dilation >= 1, got {(kernel, dilation)}")
            if conv_bound(self.channels, kernel) > ACC_LIMIT:
                raise ValueError(f"layer {index}: 255 * 127 * {self.channels} * {kernel}^2 overflows int32")
        if conv_bound(self.channels, 1) > ACC_LIMIT:
            raise ValueError(f"head: 255 * 127 * {self.channels} overflows int32")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"unknown schedule {self.schedule!r}; known: {', '.join(sorted(SCHEDULES))}")
        _check_int("logit_multiplier", self.logit_multiplier, 1, MULTIPLIER_LIMIT - 1)
        _check_int("logit_shift", self.logit_shift, 0, 31)

    @property
    def mask(self) -> int:
        """The id of the MASK token (an unknown position): K."""
        return self.codebook_size

    def to_dict(self) -> dict:
        return {"codebook_size": self.codebook_size, "channels": self.channels,
                "layers": [list(layer) for layer in self.layers], "schedule": self.schedule,
                "logit_multiplier": self.logit_multiplier, "logit_shift": self.logit_shift}

    @classmethod
    def from_dict(cls, data: Mapping) -> "IntNetConfig":
        known, required = set(cls.__dataclass_fields__), {"codebook_size", "channels", "layers"}
        if not isinstance(data, Mapping) or set(data) - known or not required <= set(data):
            raise ValueError(f"an entropy model config needs codebook_size, channels, layers (and optionally "
                             f"schedule, logit_multiplier, logit_shift), got {data!r}")
        return cls(**data)

    @classmethod
    def preset(cls, name: str, codebook_size: int, **overrides) -> "IntNetConfig":
        """The preset `name` (a key of PRESETS) for a codebook of `codebook_size`."""
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; known: {', '.join(sorted(PRESETS))}")
        return cls(codebook_size=codebook_size, **{**PRESETS[name], **overrides})


def weight_specs(config: IntNetConfig) -> Dict[str, Tuple[np.dtype, Tuple[tuple, ...]]]:
    """name -> (dtype, allowed shapes), in the canonical order (the order of `weights_digest`)."""
    c, k = config.channels, config.codebook_size
    specs = {"embed": (np.dtype(np.uint8), ((k + 1, c),))}
    for index, (kernel, _) in enumerate(config.layers):
        specs[f"conv{index}.weight"] = (np.dtype(np.int8), ((c, c, kernel, kernel),))
        specs[f"conv{index}.bias"] = (np.dtype(np.int32), ((c,),))
        specs[f"conv{index}.multiplier"] = (np.dtype(np.int32), ((), (c,)))
        specs[f"conv{index}.shift"] = (np.dtype(np.int32), ((), (c,)))
    specs["head.weight"] = (np.dtype(np.int8), ((k, c, 1, 1),))
    specs["head.bias"] = (np.dtype(np.int32), ((k,),))
    return specs


def _check_range(name: str, array: np.ndarray, low: int, high: int) -> None:
    if array.size and (int(array.min()) < low or int(array.max()) > high):
        raise ValueError(f"{name}: values must lie in [{low}, {high}], found [{int(array.min())}, {int(array.max())}]")


def validate_weights(config: IntNetConfig, weights: Mapping[str, np.ndarray]) -> None:
    """Raise ValueError unless `weights` has exactly the names, dtypes, shapes and value ranges of `config`."""
    specs = weight_specs(config)
    missing, extra = sorted(set(specs) - set(weights)), sorted(set(weights) - set(specs))
    if missing or extra:
        raise ValueError(f"entropy model weights do not match the config: missing {missing}, unexpected {extra}")
    for name, (dtype, shapes) in specs.items():
        array = weights[name]
        if not isinstance(array, np.ndarray) or array.dtype != dtype or array.shape not in shapes:
            got = f"{array.dtype} {array.shape}" if isinstance(array, np.ndarray) else type(array).__name__
            raise ValueError(f"{name}: expected {dtype} of shape {' or '.join(map(str, shapes))}, got {got}")
    for index, (kernel, _) in enumerate(config.layers):
        _check_range(f"conv{index}.weight", weights[f"conv{index}.weight"], -WEIGHT_MAX, WEIGHT_MAX)
        bias_limit = ACC_LIMIT - conv_bound(config.channels, kernel)
        _check_range(f"conv{index}.bias", weights[f"conv{index}.bias"], -bias_limit, bias_limit)
        _check_range(f"conv{index}.multiplier", weights[f"conv{index}.multiplier"], 0, MULTIPLIER_LIMIT - 1)
        _check_range(f"conv{index}.shift", weights[f"conv{index}.shift"], SHIFT_MIN, SHIFT_MAX)
    _check_range("head.weight", weights["head.weight"], -WEIGHT_MAX, WEIGHT_MAX)
    bias_limit = ACC_LIMIT - conv_bound(config.channels, 1)
    _check_range("head.bias", weights["head.bias"], -bias_limit, bias_limit)


def weights_digest(config: IntNetConfig, weights: Mapping[str, np.ndarray]) -> str:
    """SHA-256 over, in `weight_specs` order, `name:dtype:shape\\n` then the little-endian C-order bytes."""
    digest = hashlib.sha256()
    for name, (dtype, _) in weight_specs(config).items():
        array = np.ascontiguousarray(weights[name], dtype=dtype.newbyteorder("<"))
        digest.update(f"{name}:{dtype.name}:{list(array.shape)}\n".encode())
        digest.update(array.tobytes())
    return digest.hexdigest()


def logit_steps(logits: np.ndarray, multiplier: int, shift: int) -> np.ndarray:
    """Integer logits [N, K] -> steps [N, K] int64: min(((row max - logit) * multiplier) >> shift, 2^20 - 1)."""
    logits = np.asarray(logits, dtype=np.int64)
    return np.minimum(((logits.max(axis=1, keepdims=True) - logits) * multiplier) >> shift, LOGIT_MAX_STEPS)


def _columns(x: np.ndarray, kernel: int, dilation: int) -> np.ndarray:
    """float64 [Cin, h, w] -> im2col [Cin * k * k, h * w] of a 'same' zero-padded, dilated convolution."""
    cin, h, w = x.shape
    pad = dilation * (kernel - 1) // 2
    padded = np.pad(x, ((0, 0), (pad, pad), (pad, pad)))
    cols = np.empty((cin, kernel, kernel, h, w), dtype=np.float64)
    for a in range(kernel):
        for b in range(kernel):
            cols[:, a, b] = padded[:, a * dilation:a * dilation + h, b * dilation:b * dilation + w]
    return cols.reshape(cin * kernel * kernel, h * w)


class IntNet:
    """The numpy reference of the integer network for one (config, weights); the weights are validated."""

    def __init__(self, config: IntNetConfig, weights: Mapping[str, np.ndarray]):
        validate_weights(config, weights)
        self.config = config
        self.weights = {name: np.array(weights[name]) for name in weight_specs(config)}
        for array in self.weights.values():
            array.flags.writeable = False
        c = config.channels
        self._embed = self.weights["embed"].astype(np.float64)
        self._layers = []
        for index, (kernel, dilation) in enumerate(config.layers):
            weight, bias, multiplier, shift = (self.weights[f"conv{index}.{part}"].astype(np.int64)
                                               for part in ("weight", "bias", "multiplier", "shift"))
            self._layers.append((kernel, dilation, weight.reshape(c, -1).astype(np.float64), bias[:, None],
                                 np.broadcast_to(multiplier, (c,))[:, None], np.broadcast_to(shift, (c,))[:, None]))
        self._head = self.weights["head.weight"].reshape(config.codebook_size, c).T.astype(np.float64)  # [C, K]
        self._head_bias = self.weights["head.bias"].astype(np.int64)
        self._digest: Optional[str] = None

    def validate(self) -> None:
        """Raise ValueError unless the weights still match the config (see `validate_weights`)."""
        validate_weights(self.config, self.weights)

    def weights_digest(self) -> str:
        """`weights_digest` of the weights as built (computed once: the layers are fixed at construction)."""
        if self._digest is None:
            self._digest = weights_digest(self.config, self.weights)
        return self._digest

    def _check_ids(self, ids) -> np.ndarray:
        ids = np.asarray(ids)
        if ids.ndim != 2 or 0 in ids.shape or ids.dtype.kind not in "iu":
            raise ValueError(f"expected a non-empty [h, w] integer grid, got {ids.dtype} {ids.shape}")
        if int(ids.min()) < 0 or int(ids.max()) > self.config.mask:
            raise ValueError(f"token ids must lie in [0, {self.config.mask}] ({self.config.mask} = MASK)")
        return ids.astype(np.int64)

    def features(self, ids) -> np.ndarray:
        """ids [h, w] (MASK = K) -> the last hidden layer's activations, uint8 [C, h, w]."""
        ids = self._check_ids(ids)
        h, w = ids.shape
        x = self._embed[ids].transpose(2, 0, 1)
        for kernel, dilation, weight, bias, multiplier, shift in self._layers:
            acc = (weight @ _columns(x, kernel, dilation)).astype(np.int64) + bias
            y = np.minimum(ACT_MAX, (np.maximum(acc, 0) * multiplier + (1 << (shift - 1))) >> shift)
            x = y.reshape(-1, h, w).astype(np.float64)
        return x.astype(np.uint8)

    def _head_logits(self, features: np.ndarray) -> np.ndarray:
        """uint8 features [C, N] -> int32 logits [N, K]."""
        return ((features.T.astype(np.float64) @ self._head).astype(np.int64) + self._head_bias).astype(np.int32)

    def logits(self, ids) -> np.ndarray:
        """ids [h, w] (MASK = K) -> int32 logits [K, h, w]."""
        features = self.features(ids)
        c, h, w = features.shape
        return np.ascontiguousarray(self._head_logits(features.reshape(c, h * w)).T).reshape(-1, h, w)

    def steps(self, ids, positions) -> np.ndarray:
        """Logit steps int64 [len(positions), K] at the flat (raster) `positions` of the grid `ids`."""
        features = self.features(ids)
        positions = np.asarray(positions, dtype=np.int64).reshape(-1)
        if positions.size and (positions.min() < 0 or positions.max() >= features[0].size):
            raise ValueError(f"positions must lie in [0, {features[0].size})")
        logits = self._head_logits(features.reshape(features.shape[0], -1)[:, positions])
        return logit_steps(logits, self.config.logit_multiplier, self.config.logit_shift)

    def tables(self, ids, positions) -> np.ndarray:
        """Frequency tables int64 [len(positions), K] (rows >= 1, summing to 2^24) at the flat `positions`."""
        return tables_from_steps(self.steps(ids, positions))


def group_tables(net: IntNet, grid, schedule, group: int) -> np.ndarray:
    """Tables [n, K] for the positions of `group` in raster order, predicted from the groups before it.

    `grid` [h, w] holds the tokens of groups < `group` (what is elsewhere is ignored: those positions
    are set to MASK here), so an encoder may pass the whole grid and a decoder its partial one.
    """
    grid, schedule = np.asarray(grid), np.asarray(schedule)
    if grid.shape != schedule.shape:
        raise ValueError(f"grid {grid.shape} and schedule {schedule.shape} differ in shape")
    positions = np.flatnonzero(schedule.reshape(-1) == group)
    if not positions.size:
        raise ValueError(f"the schedule has no group {group}")
    return net.tables(np.where(schedule < group, grid, net.config.mask), positions)


class _SplitMix64:
    """The splitmix64 sequence (x += 0x9E3779B97F4A7C15, then the mix): test weights independent of numpy's RNGs."""

    def __init__(self, seed: int):
        self.seed, self.count = np.uint64(seed), 0

    def ints(self, shape, low: int, high: int) -> np.ndarray:
        """Integers in [low, high] (int64) of `shape`, the next values of the sequence."""
        n = int(np.prod(shape, dtype=np.int64))
        x = self.seed + np.arange(self.count + 1, self.count + n + 1, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15)
        self.count += n
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        x ^= x >> np.uint64(31)
        return (x % np.uint64(high - low + 1)).astype(np.int64).reshape(shape) + low


def random_weights(config: IntNetConfig, seed: int = 0) -> Dict[str, np.ndarray]:
    """Deterministic random weights (splitmix64 from `seed`) scaled so activations neither die nor saturate.

    Embeddings and conv weights are uniform; each hidden layer's bias cancels the mean its input adds,
    its per-channel multiplier (with one shift per layer) maps the estimated pre-activation std to
    about 80, and the head is scaled so logits spread by about 2.5 nats under the config's rescale.
    For tests and untrained presets.
    """
    _check_int("seed", seed, 0, (1 << 64) - 1)
    rng, c, k = _SplitMix64(seed), config.channels, config.codebook_size
    weights = {"embed": rng.ints((k + 1, c), 0, ACT_MAX).astype(np.uint8)}
    mean, var = ACT_MAX / 2, ((ACT_MAX + 1) ** 2 - 1) / 12  # of uniform uint8 inputs
    target = 80.0
    for index, (kernel, _) in enumerate(config.layers):
        weight = rng.ints((c, c, kernel, kernel), -WEIGHT_MAX, WEIGHT_MAX)
        flat = weight.reshape(c, -1).astype(np.float64)
        std = np.maximum(np.sqrt((flat ** 2).sum(axis=1) * var), 1.0)
        shift = int(np.clip(np.floor(np.log2((MULTIPLIER_LIMIT - 1) * std.min() / target)), SHIFT_MIN, SHIFT_MAX))
        multiplier = np.clip(np.round(target * 2.0 ** shift / std), 1, MULTIPLIER_LIMIT - 1)
        bias_limit = ACC_LIMIT - conv_bound(c, kernel)
        bias = np.clip(np.round(-mean * flat.sum(axis=1)) + np.round(rng.ints((c,), -64, 64) * std / 512),
                       -bias_limit, bias_limit)
        weights.update({f"conv{index}.weight": weight.astype(np.int8), f"conv{index}.bias": bias.astype(np.int32),
                        f"conv{index}.multiplier": multiplier.astype(np.int32),
                        f"conv{index}.shift": np.array(shift, dtype=np.int32)})
        mean, var = target / np.sqrt(2 * np.pi), target ** 2 * (0.5 - 1 / (2 * np.pi))  # of max(N(0, target^2), 0)
    logit_std = 2.5 * (1 << LOGIT_FRAC_BITS) * 2.0 ** config.logit_shift / config.logit_multiplier
    amplitude = int(np.clip(round(np.sqrt(3) * logit_std / np.sqrt(c * (var + mean ** 2))), 1, WEIGHT_MAX))
    bias_limit = min(ACC_LIMIT - conv_bound(c, 1), int(logit_std))
    weights["head.weight"] = rng.ints((k, c, 1, 1), -amplitude, amplitude).astype(np.int8)
    weights["head.bias"] = rng.ints((k,), -bias_limit, bias_limit).astype(np.int32)
    return weights
