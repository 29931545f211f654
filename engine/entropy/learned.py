"""The learned index coder: a masked-token entropy model that codes the token grid group by group.

The model folder's `entropy_model/` holds the integer network (`perco.engine.entropy.intnet`;
docs/entropy-model-arithmetic.md): `config.json` (its `IntNetConfig`, with `"_class_name":
"PercoEntropyModel"` and the training record) and `model.safetensors` (the integer weights). The
fingerprint covers both, so a file is only ever decoded with the entropy model that coded it.

Coding: the schedule (recorded in the config) splits the [h, w] grid into groups; group g is coded
with one frequency table per position, predicted from the tokens of groups < g (the others MASK).
Every group's symbols go, in schedule then raster order, into one rANS stream. The tables are
integers that every implementation of the network reproduces exactly, so a file coded with one
(numpy, ONNX Runtime, torch on CPU or CUDA) decodes with any other. In hybrid mode only the first
`groups` groups are sent; the decoder draws the others from the same tables with `sample_tables`,
an integer PRNG seeded from the header, so every backend draws the same tokens.
"""

import json
import os
import weakref
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Optional

import numpy as np

from perco.engine.entropy.intnet import IntNet, IntNetConfig
from perco.engine.entropy.batch import StepsStreamDecoder
from perco.engine.entropy.rans import encode_symbol_tables
from perco.engine.entropy.schedules import group_positions, make_schedule
from perco.engine.entropy.tables import PROB_BITS, tables_from_steps
from perco.engine.errors import BitstreamError, ModelError
from perco.engine.files import atomic_json, atomic_write
from perco.engine.graphs import ENTROPY_GRAPH as GRAPH

FOLDER = "entropy_model"
CONFIG, WEIGHTS = "config.json", "model.safetensors"
CLASS_NAME = "PercoEntropyModel"


@dataclass(frozen=True)
class EntropyModel:
    """A loaded entropy model: its network and the bytes that identify it."""

    net: IntNet
    config_bytes: bytes  # config.json as stored (the fingerprint hashes these and the weights file)
    weights_bytes: bytes
    training: dict

    @property
    def config(self) -> IntNetConfig:
        return self.net.config


def save_entropy_model(folder, config: IntNetConfig, weights: dict, training: Optional[dict] = None) -> Path:
    """Write `folder` (a model's entropy_model/): config.json and model.safetensors, each atomically."""
    from safetensors.numpy import save

    IntNet(config, weights)  # validate before writing anything
    # per-layer scalars are stored per channel: safetensors has no 0-d tensors
    stored = {k: np.ascontiguousarray(np.broadcast_to(v, (config.channels,)) if np.ndim(v) == 0 else v)
              for k, v in weights.items()}
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write(folder / WEIGHTS, save(stored))
    atomic_json(folder / CONFIG, {"_class_name": CLASS_NAME, **config.to_dict(), "training": training or {}})
    return folder


def load_entropy_model(folder) -> EntropyModel:
    """The entropy model of a model's entropy_model/ folder; ModelError for anything wrong with it."""
    folder = Path(folder)
    key = []
    for name in (CONFIG, WEIGHTS):
        try:
            st = os.stat(folder / name)
        except OSError:
            raise ModelError(f"entropy model is incomplete: {folder / name} is missing") from None
        key.append((st.st_size, st.st_mtime_ns))
    return _load(str(folder), tuple(key))


@lru_cache(maxsize=8)
def _load(folder: str, _state: tuple) -> EntropyModel:
    from safetensors import SafetensorError
    from safetensors.numpy import load

    config_path, weights_path = Path(folder) / CONFIG, Path(folder) / WEIGHTS
    try:
        config_bytes, weights_bytes = config_path.read_bytes(), weights_path.read_bytes()
        data = json.loads(config_bytes)
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot read entropy model {config_path}: {exc}") from None
    if not isinstance(data, dict) or data.get("_class_name") != CLASS_NAME:
        raise ModelError(f"{config_path} is not a PerCo Engine entropy model config (_class_name {CLASS_NAME})")
    fields = {k: v for k, v in data.items() if k not in ("_class_name", "training")}
    try:
        config = IntNetConfig.from_dict(fields)
        weights = load(weights_bytes)
        net = IntNet(config, weights)
    except SafetensorError as exc:
        raise ModelError(f"{weights_path} is not a safetensors file: {exc}") from None
    except ValueError as exc:
        raise ModelError(f"entropy model {folder} is invalid: {exc}") from None
    return EntropyModel(net, config_bytes, weights_bytes, data.get("training") or {})


def sample_tables(tables: np.ndarray, seed: int, group: int) -> np.ndarray:
    """One symbol per row of integer tables [N, K], drawn by the format's PRNG (hybrid mode).

    Row i draws u = splitmix64(seed + (group * 2^32 + i + 1) * 0x9E3779B97F4A7C15) >> 40, a 24-bit
    integer, and takes the symbol s with cdf[s] <= u < cdf[s + 1] (cdf = cumulative table sums). All
    uint64 arithmetic modulo 2^64, so every implementation draws the same symbols.
    """
    n = tables.shape[0]
    counter = (np.uint64(group) << np.uint64(32)) + np.arange(1, n + 1, dtype=np.uint64)
    with np.errstate(over="ignore"):
        x = np.uint64(seed) + counter * np.uint64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        x ^= x >> np.uint64(31)
    u = (x >> np.uint64(64 - PROB_BITS)).astype(np.int64)
    cdf = np.cumsum(tables, axis=1)  # cdf[:, s] = sum of table[:, :s + 1]
    return (cdf <= u[:, None]).sum(axis=1).astype(np.int64)


_CHECKED = weakref.WeakKeyDictionary()  # backend -> weight digests whose graph on it matched the reference


class LearnedIndexCoder:
    """Group-by-group coding with the entropy model (see the module docstring)."""

    name = "learned"

    def __init__(self, model: EntropyModel):
        self.model = model
        self.net = model.net
        self.codebook_size = model.config.codebook_size

    def num_groups(self, shape: tuple) -> int:
        return len(group_positions(make_schedule(self.model.config.schedule, *shape)))

    def _steps(self, ids: np.ndarray, positions: np.ndarray, backend) -> np.ndarray:
        """Logit steps [len(positions), K]: the backend's graph where it runs one, else the numpy reference."""
        if backend is not None and backend.runs(GRAPH):
            self._check(backend)
            return self._backend_steps(backend, ids).reshape(self.codebook_size, -1)[:, positions].T
        return self.net.steps(ids, positions)

    def _decode_steps(self, ids: np.ndarray, positions: np.ndarray, backend, on_device: bool):
        """The group's steps for the decoder: on the device, never copied to the host, where the decoder takes
        device steps and the backend can hand them over (`entropy_steps_on_device`), else `_steps`."""
        if on_device and backend is not None and backend.runs(GRAPH) and hasattr(backend, "entropy_steps_on_device"):
            self._check(backend)
            return backend.entropy_steps_on_device(np.ascontiguousarray(ids, dtype=np.int64), positions)
        return self._steps(ids, positions, backend)

    def _backend_steps(self, backend, ids: np.ndarray) -> np.ndarray:
        return backend.run(GRAPH, {"ids": np.ascontiguousarray(ids, dtype=np.int64)})["steps"]

    def _check(self, backend) -> None:
        """Once per backend: its graph must give the reference's integers on a probe grid, else ModelError
        (a graph from other weights, or a broken implementation, must never code in silence)."""
        digest = self.net.weights_digest()
        if digest in _CHECKED.get(backend, ()):
            return
        k = self.codebook_size
        probe = (np.arange(5 * 7, dtype=np.int64).reshape(5, 7) * 7919) % (k + 1)  # every id range, MASK included
        expected = self.net.steps(probe, np.arange(probe.size))
        actual = np.asarray(self._backend_steps(backend, probe)).reshape(k, -1).T
        if actual.shape != expected.shape or not np.array_equal(actual, expected):
            raise ModelError(f"the {backend.name} backend's {GRAPH} graph disagrees with the model's entropy model "
                             f"(another model's export, or a broken implementation): re-export it")
        _CHECKED.setdefault(backend, set()).add(digest)

    def _tables(self, grid: np.ndarray, schedule: np.ndarray, group: int, positions, backend) -> np.ndarray:
        ids = np.where(schedule < group, grid, self.net.config.mask)
        return tables_from_steps(self._steps(ids, positions, backend))

    def encode(self, indices: np.ndarray, backend=None, groups: Optional[int] = None) -> np.ndarray:
        """indices [rows, cols] -> stream words of the first `groups` groups (all when None)."""
        grid = np.asarray(indices, dtype=np.int64)
        schedule = make_schedule(self.model.config.schedule, *grid.shape)
        order = group_positions(schedule)[: groups or None]
        flat = grid.reshape(-1)
        tables = [self._tables(grid, schedule, g, positions, backend) for g, positions in enumerate(order)]
        symbols = np.concatenate([flat[p] for p in order])
        return encode_symbol_tables(symbols, np.concatenate(tables))

    def decode(self, words: np.ndarray, shape: tuple, backend=None, groups: Optional[int] = None,
               seed: int = 0) -> np.ndarray:
        """Stream words -> indices [rows, cols]: the first `groups` groups decoded (all when None), the rest
        drawn with `sample_tables`. BitstreamError for a defective stream or an impossible group count."""
        schedule = make_schedule(self.model.config.schedule, *shape)
        order = group_positions(schedule)
        sent = len(order) if groups is None else groups
        if groups is not None and not 1 <= groups < len(order):
            raise BitstreamError(f"corrupt bitstream: hybrid mode sent {groups} groups of this grid's {len(order)} "
                                 f"(possible: 1..{len(order) - 1})")
        grid = np.zeros(shape, dtype=np.int64)
        flat = grid.reshape(-1)
        # the kernels library's resumable decoder where one is loaded (the coder state and the tables stay on
        # the device, tables_from_steps and the hybrid draw run there), else the CPU coder: the same symbols
        decoder = StepsStreamDecoder(words, self.codebook_size, what="index")
        for g, positions in enumerate(order):
            ids = np.where(schedule < g, grid, self.net.config.mask)
            steps = self._decode_steps(ids, positions, backend, decoder.takes_device_steps)
            flat[positions] = decoder.pop_steps(steps) if g < sent else decoder.sample_steps(steps, seed, g)
        decoder.finish()
        return grid
