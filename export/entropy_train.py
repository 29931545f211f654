"""Quantization-aware training of the masked-token entropy model's integer network.

    train_entropy(model_dir, "photos/", preset="tiny", steps=2000)   # -> report; writes model_dir/entropy_model/

Data: the token-index maps of the images through the model's own VAE and hyper-encoder, computed
once up front: random crops (a multiple of the model's pad multiple, clamped to the image) with
random horizontal flips for training; the held-out images whole (edge-padded, as the codec does).

Model (`QATNet`): the integer network of docs/entropy-model-arithmetic.md written in the integer
domain. Parameters are stored normalised (embedding / 255, weights / 127, biases in output units)
and projected back into range after every step; the forward rounds them (straight through) to the
integers of the export: embedding 0..255, weights -127..127, a positive requantization ratio per
channel r = m / 2^s (m < 2^15 with the largest shift s, so the forward uses exactly the exported r),
integer biases, and the activation y = min(255, round_half_up(max(acc, 0) * r)). The head's learned
logit rescale t = logit_multiplier / 2^logit_shift turns int logits into steps of 2^-12 nat,
floor((max - logit) * t). In float64 the forward equals `IntNet` exactly; training runs in float32.
With `quantize` off (the float model) nothing is rounded.

Loss: per sample one group g of the schedule, drawn with probability n_g / N, is the target; groups
>= g are MASK and the loss is the mean code length over g's positions, an unbiased estimate of the
bits per token of coding the whole grid. The code length is that of the coder's tables:
p = softmax(-steps / 4096) * (1 - K / 2^24) + 2^-24 (`tables_from_steps` gives every symbol at
least 1 of 2^24 and the rest in proportion).

Schedule: the float model first (`float_fraction` of the steps, warm-up then cosine decay), then QAT
fine-tuning (a shorter cosine from a lower rate). The ratios are initialised from the first batch
so activations neither die nor saturate, the head bias from the training histogram.

Reported on the held-out maps (bits per token): uniform (log2 K), a static unigram table (the
training histogram + 1 through `tables_from_probabilities`), the float model (at the end of its
phase) and the exported integer network, exactly: -log2(table[symbol] / 2^24) with `IntNet.tables`,
group by group in schedule order with the groups before known.
"""

import copy
import dataclasses
import glob
import io
import math
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from perco.engine.entropy.intnet import (
    ACC_LIMIT, ACT_MAX, MULTIPLIER_LIMIT, PRESETS, SHIFT_MAX, SHIFT_MIN, WEIGHT_MAX, IntNet, IntNetConfig, conv_bound,
)
from perco.engine.entropy.learned import FOLDER, save_entropy_model
from perco.engine.entropy.schedules import SCHEDULES, group_positions, make_schedule
from perco.engine.entropy.tables import (
    LOGIT_FRAC_BITS, LOGIT_MAX_STEPS, PROB_BITS, PROB_TOTAL, tables_from_probabilities,
)
from perco.engine.errors import PercoError, UsageError
from perco.engine.files import atomic_write

CHECKPOINT_FOLDER = FOLDER + ".train"  # <model_dir>/entropy_model.train/checkpoint.pt
CHECKPOINT = "checkpoint.pt"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff", ".ppm")
ACT_TARGET = 50.0  # data-driven init: pre-activation std -> 50 of the 0..255 activation range
HEAD_SPREAD = 0.3  # data-driven init: the head weights' logits spread by about 0.3 nat around the unigram prior
STEP_NATS = 1.0 / (1 << LOGIT_FRAC_BITS)


def _ste(x: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """`value` forward, the gradient of `x` backward (straight through)."""
    return x + (value - x).detach()


def _round(x: torch.Tensor) -> torch.Tensor:
    return _ste(x, torch.floor(x + 0.5))


def fixed_point(ratio: torch.Tensor, shift_min: int, shift_max: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Positive ratios -> (multiplier m, shift s) with m / 2^s ~ ratio: the largest s in [shift_min, shift_max]
    keeping m = round(ratio * 2^s) below 2^15 (so m >= 2^14 and 15 significant bits unless s is capped)."""
    r = ratio.detach().double()
    shift = torch.floor(torch.log2((MULTIPLIER_LIMIT - 1) / r)).clamp(shift_min, shift_max)
    multiplier = torch.floor(r * torch.exp2(shift) + 0.5).clamp(1, MULTIPLIER_LIMIT - 1)
    return multiplier, shift


class QATNet(nn.Module):
    """The integer network with learnable parameters; `quantize` switches between the integer forward
    (straight-through rounding, what `export` writes) and the float model."""

    def __init__(self, config: IntNetConfig, seed: int = 0):
        super().__init__()
        self.config = config
        c, k = config.channels, config.codebook_size
        gen = torch.Generator().manual_seed(seed % (1 << 63))
        self.embed = nn.Parameter(torch.rand(k + 1, c, generator=gen))  # x 255
        self.weight = nn.ParameterList(nn.Parameter(torch.rand(c, c, kernel, kernel, generator=gen) * 2 - 1)
                                       for kernel, _ in config.layers)  # x 127
        self.bias = nn.ParameterList(nn.Parameter(torch.zeros(c)) for _ in config.layers)  # output units / 255
        self.log_ratio = nn.ParameterList(nn.Parameter(torch.zeros(c)) for _ in config.layers)
        self.head_weight = nn.Parameter((torch.rand(k, c, generator=gen) * 2 - 1) * 0.5)  # x 127
        self.head_bias = nn.Parameter(torch.zeros(k))  # nats
        self.log_rescale = nn.Parameter(torch.zeros(()))  # ln(logit_multiplier / 2^logit_shift)
        self.quantize = False

    def _q(self, x: torch.Tensor) -> torch.Tensor:
        return _round(x) if self.quantize else x

    def _ratio(self, log_ratio: torch.Tensor, shift_min: int) -> torch.Tensor:
        ratio = torch.exp(log_ratio)
        if not self.quantize:
            return ratio
        multiplier, shift = fixed_point(ratio, shift_min, SHIFT_MAX)
        return _ste(ratio, (multiplier / torch.exp2(shift)).to(ratio.dtype))

    def layer_params(self, index: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(weight, bias, ratio) of hidden layer `index` in the integer domain (integer-valued when quantizing)."""
        kernel = self.config.layers[index][0]
        ratio = self._ratio(self.log_ratio[index], SHIFT_MIN)
        limit = ACC_LIMIT - conv_bound(self.config.channels, kernel)
        bias = self._q(self.bias[index] * ACT_MAX / ratio).clamp(-limit, limit)
        return self._q(self.weight[index] * WEIGHT_MAX), bias, ratio

    def head_params(self) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(weight [K, C], bias [K], logit rescale t) in the integer domain."""
        rescale = self._ratio(self.log_rescale, 0)
        limit = ACC_LIMIT - conv_bound(self.config.channels, 1)
        bias = self._q(self.head_bias / (rescale * STEP_NATS)).clamp(-limit, limit)
        return self._q(self.head_weight * WEIGHT_MAX), bias, rescale

    def features(self, ids: torch.Tensor) -> torch.Tensor:
        """ids [B, h, w] (MASK = K) -> last hidden activations [B, C, h, w] (0..255)."""
        x = self._q(self.embed * ACT_MAX)[ids].permute(0, 3, 1, 2)
        for index, (kernel, dilation) in enumerate(self.config.layers):
            weight, bias, ratio = self.layer_params(index)
            acc = F.conv2d(x, weight, bias, padding=dilation * (kernel - 1) // 2, dilation=dilation)
            x = self._q(torch.clamp(torch.relu(acc) * ratio[:, None, None], max=ACT_MAX))
        return x

    def steps(self, features: torch.Tensor) -> torch.Tensor:
        """features [N, C] -> logit steps [N, K] (2^-12 nat below the row maximum)."""
        weight, bias, rescale = self.head_params()
        logits = F.linear(features, weight, bias)
        below = (logits.max(dim=1, keepdim=True).values - logits) * rescale
        return torch.clamp(_ste(below, torch.floor(below)), max=LOGIT_MAX_STEPS) if self.quantize else below

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """ids [B, h, w] -> logit steps [B, K, h, w] (with `quantize` in float64: exactly `IntNet.steps`)."""
        x = self.features(ids)
        b, c, h, w = x.shape
        return self.steps(x.permute(0, 2, 3, 1).reshape(-1, c)).reshape(b, h, w, -1).permute(0, 3, 1, 2)

    def code_length(self, features: torch.Tensor, symbols: torch.Tensor) -> torch.Tensor:
        """Nats of each symbol [N] under the coder's tables of `features` [N, C]."""
        log_p = F.log_softmax(-self.steps(features) * STEP_NATS, dim=1).gather(1, symbols[:, None])[:, 0]
        k = self.config.codebook_size
        return -torch.logaddexp(log_p + math.log1p(-k / PROB_TOTAL), torch.tensor(-PROB_BITS * math.log(2.0)))

    @torch.no_grad()
    def initialize(self, ids: torch.Tensor, histogram: np.ndarray) -> None:
        """Data-driven init on a batch `ids` [B, h, w]: per-channel ratios and biases so every hidden channel's
        pre-activation has std ACT_TARGET and about 60% active; the head's rescale so its weights spread the
        logits by HEAD_SPREAD nat, its bias at the log of the (smoothed) training histogram."""
        quantize, self.quantize = self.quantize, False
        x = self.embed[ids].permute(0, 3, 1, 2) * ACT_MAX
        for index, (kernel, dilation) in enumerate(self.config.layers):
            acc = F.conv2d(x, self.weight[index] * WEIGHT_MAX, padding=dilation * (kernel - 1) // 2, dilation=dilation)
            mean, std = acc.mean(dim=(0, 2, 3)), acc.std(dim=(0, 2, 3)).clamp(min=1.0)
            ratio = ACT_TARGET / std
            self.log_ratio[index].copy_(torch.log(ratio))
            self.bias[index].copy_((0.25 * ACT_TARGET - ratio * mean) / ACT_MAX)
            acc = acc + (self.bias[index] * ACT_MAX / ratio)[:, None, None]
            x = torch.clamp(torch.relu(acc) * ratio[:, None, None], max=ACT_MAX)
        logits = F.linear(x.permute(0, 2, 3, 1).reshape(-1, x.shape[1]), self.head_weight * WEIGHT_MAX)
        spread = logits.std(dim=1).mean().clamp(min=1.0)
        self.log_rescale.copy_(torch.log(HEAD_SPREAD / (spread * STEP_NATS)))
        prior = torch.log(torch.as_tensor(histogram, dtype=torch.float32) + 0.5)
        self.head_bias.copy_(prior - prior.max())
        self.quantize = quantize

    @torch.no_grad()
    def project_(self) -> None:
        """Clamp the parameters into their ranges (after every optimizer step)."""
        self.embed.clamp_(0, 1)
        for weight in self.weight:
            weight.clamp_(-1, 1)
        self.head_weight.clamp_(-1, 1)

    @torch.no_grad()
    def export(self) -> Tuple[IntNetConfig, Dict[str, np.ndarray]]:
        """The integer config and weights: what the quantizing forward computes in float64 (the float32 training
        forward can differ where a rounding falls within float32's precision of a half)."""
        net = copy.deepcopy(self).double()
        net.quantize = True
        c, k = self.config.channels, self.config.codebook_size
        weights = {"embed": net._q(net.embed * ACT_MAX).numpy().astype(np.uint8)}
        for index in range(len(self.config.layers)):
            weight, bias, _ = net.layer_params(index)
            multiplier, shift = fixed_point(torch.exp(net.log_ratio[index]), SHIFT_MIN, SHIFT_MAX)
            weights.update({f"conv{index}.weight": weight.numpy().astype(np.int8),
                            f"conv{index}.bias": bias.numpy().astype(np.int32),
                            f"conv{index}.multiplier": multiplier.numpy().astype(np.int32),
                            f"conv{index}.shift": shift.numpy().astype(np.int32)})
        weight, bias, _ = net.head_params()
        multiplier, shift = fixed_point(torch.exp(net.log_rescale), 0, 31)
        weights["head.weight"] = weight.numpy().astype(np.int8).reshape(k, c, 1, 1)
        weights["head.bias"] = bias.numpy().astype(np.int32)
        config = dataclasses.replace(self.config, logit_multiplier=int(multiplier), logit_shift=int(shift))
        IntNet(config, weights)  # validates
        return config, weights


# --- data ---------------------------------------------------------------------------------------


def image_paths(images) -> List[Path]:
    """A folder (its image files) or a glob pattern -> the paths sorted; one file or a list of paths as given."""
    if isinstance(images, (list, tuple)):
        paths = [Path(p) for p in images]
    elif Path(images).is_dir():
        paths = sorted(p for p in Path(images).iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    elif Path(images).is_file():
        paths = [Path(images)]
    else:
        paths = sorted(Path(p) for p in glob.glob(str(images)) if Path(p).is_file())
    if not paths:
        raise PercoError(f"no images found in {images} (a folder of {', '.join(IMAGE_SUFFIXES)} files, or a glob)")
    return paths


class MapEncoder:
    """Token-index maps of images through a model's own VAE encoder and hyper-encoder (torch, CPU)."""

    def __init__(self, model_dir):
        from perco.engine.model import ModelInfo
        from perco.export.graphs import model_graphs

        self.info = ModelInfo.open(model_dir)
        self.pad_multiple = self.info.pad_multiple
        self.codebook_size = self.info.rate.codebook_size
        graphs = model_graphs(self.info, components=("vae", "hyper_enc"))
        self._vae, self._hyper = graphs["vae_encoder"], graphs["hyper_encoder"]

    def __call__(self, image: np.ndarray) -> np.ndarray:
        """uint8 [H, W, 3] (H, W multiples of pad_multiple) -> int64 indices [H / stride, W / stride]."""
        from perco.engine.imageio import to_model_input

        with torch.inference_mode():
            return self._hyper(self._vae(torch.from_numpy(to_model_input(image))))[0].numpy().astype(np.int64)

    def full(self, image: np.ndarray) -> np.ndarray:
        """The map of a whole image, edge-padded to the pad multiple as the codec pads it."""
        from perco.engine.imageio import pad_to_multiple

        return self(pad_to_multiple(image, self.pad_multiple))

    def crops(self, image: np.ndarray, crop: int, count: int, rng: np.random.Generator) -> List[np.ndarray]:
        """Maps of `count` random crops of side `crop` (clamped to the image, rounded down to the pad multiple),
        each flipped horizontally with probability 1/2."""
        from perco.engine.imageio import pad_to_multiple

        pad = self.pad_multiple
        image = pad_to_multiple(image, pad) if min(image.shape[:2]) < pad else image
        h, w = (min(crop, side // pad * pad) for side in image.shape[:2])
        maps = []
        for _ in range(count):
            top, left = int(rng.integers(0, image.shape[0] - h + 1)), int(rng.integers(0, image.shape[1] - w + 1))
            patch = image[top:top + h, left:left + w]
            maps.append(self(np.ascontiguousarray(patch[:, ::-1] if rng.random() < 0.5 else patch)))
        return maps


def _bar(iterable, total: int, desc: str, progress: bool, initial: int = 0):
    from tqdm import tqdm

    return tqdm(iterable, total=total, initial=initial, desc=desc, disable=not progress, file=sys.stderr,
                leave=False, dynamic_ncols=True)


@dataclasses.dataclass(frozen=True)
class IndexMaps:
    """The token-index maps a training run uses, computed once by `index_maps`."""

    train: Tuple[np.ndarray, ...]  # random crops of the training images, [h, w] int64 each
    evaluation: Tuple[np.ndarray, ...]  # the held-out images whole (the training images when none is held out)
    train_images: Tuple[str, ...]
    held_out_images: Tuple[str, ...]
    codebook_size: int
    crop: int
    crops_per_image: int
    seed: int
    seconds: float

    @property
    def histogram(self) -> np.ndarray:
        """Symbol counts [K] of the training maps."""
        return np.bincount(np.concatenate([m.reshape(-1) for m in self.train]), minlength=self.codebook_size)


def index_maps(model_dir, images, crop: int = 256, crops_per_image: int = 32, held_out: int = 1, seed: int = 0,
               progress: bool = True, log: Callable[[str], None] = print) -> IndexMaps:
    """The maps of `images` (a folder, glob or list; sorted, the last `held_out` held out) through the model's
    VAE and hyper-encoder: `crops_per_image` random crops (seeded) of each training image, the held-out whole."""
    from perco.engine.imageio import load_image

    for name, value, low in (("crop", crop, 1), ("crops_per_image", crops_per_image, 1), ("held_out", held_out, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise UsageError(f"{name} must be an integer >= {low}, got {value!r}")
    paths = image_paths(images)
    if len(paths) <= held_out:
        raise PercoError(f"{len(paths)} image(s) found and {held_out} held out: none left to train on")
    train, held = paths[:len(paths) - held_out], paths[len(paths) - held_out:]
    encoder = MapEncoder(model_dir)
    if crop % encoder.pad_multiple:
        raise UsageError(f"the crop side (--crop) must be a multiple of {encoder.pad_multiple} px (this model's pad "
                         f"multiple), got {crop}")
    log(f"index maps: {len(train)} training image(s) x {crops_per_image} crops of {crop} px, "
        f"{len(held) or len(train)} evaluation image(s) whole")
    start, rng = time.perf_counter(), np.random.default_rng(seed)
    train_maps, eval_maps = [], []
    for index, path in enumerate(_bar(train + held, len(paths), "index maps", progress)):
        image = load_image(path)
        if index < len(train):
            train_maps += encoder.crops(image, crop, crops_per_image, rng)
        if index >= len(train) or not held:
            eval_maps.append(encoder.full(image))
    return IndexMaps(tuple(train_maps), tuple(eval_maps), tuple(map(str, train)), tuple(map(str, held)),
                     encoder.codebook_size, crop, crops_per_image, seed, time.perf_counter() - start)


class _Buckets:
    """Training maps grouped by shape, each with its schedule and group sizes, for batches of one shape."""

    def __init__(self, maps: Sequence[np.ndarray], schedule: str):
        shapes: Dict[tuple, list] = {}
        for m in maps:
            shapes.setdefault(m.shape, []).append(m)
        self.buckets = []
        for shape, group in sorted(shapes.items()):
            plan = torch.from_numpy(make_schedule(schedule, *shape))
            sizes = torch.bincount(plan.reshape(-1)).float()
            self.buckets.append((torch.from_numpy(np.stack(group)), plan, sizes))
        self.counts = torch.tensor([len(b[0]) for b in self.buckets], dtype=torch.float)

    def batch(self, size: int, gen: torch.Generator, mask: int):
        """(ids [B, h, w] with groups >= g MASK, targets [B, h, w], target positions [B, h, w] bool,
        per-sample weight 1 / n_g [B]) with g drawn per sample with probability n_g / N."""
        maps, plan, sizes = self.buckets[int(torch.multinomial(self.counts, 1, generator=gen))]
        grids = maps[torch.randint(len(maps), (size,), generator=gen)]
        groups = torch.multinomial(sizes, size, replacement=True, generator=gen)
        g = groups[:, None, None]
        return torch.where(plan < g, grids, mask), grids, plan == g, 1.0 / sizes[groups]


def batch_loss(net: QATNet, ids, grids, targets, weights) -> torch.Tensor:
    """Estimated bits per token of the batch (see the module docstring)."""
    x = net.features(ids)
    c = x.shape[1]
    select = targets.reshape(-1)
    nats = net.code_length(x.permute(0, 2, 3, 1).reshape(-1, c)[select], grids.reshape(-1)[select])
    w = weights[:, None, None].expand_as(targets).reshape(-1)[select]
    return (nats * w).sum() / (len(ids) * math.log(2.0))


# --- evaluation ---------------------------------------------------------------------------------


def integer_group_bits(net: IntNet, grid: np.ndarray) -> np.ndarray:
    """Exact code length (bits) of each group of `grid` [h, w] with the integer network's tables: [G]."""
    tables = map_tables(net, grid)
    flat = grid.reshape(-1)
    return np.array([-np.log2(t[np.arange(len(p)), flat[p]] / PROB_TOTAL).sum() for p, t in tables])


def map_tables(net: IntNet, grid: np.ndarray) -> List[Tuple[np.ndarray, np.ndarray]]:
    """[(positions, tables [n_g, K])] per group in schedule order, each from the groups before it."""
    plan = make_schedule(net.config.schedule, *grid.shape)
    return [(p, net.tables(np.where(plan < g, grid, net.config.mask), p)) for g, p in enumerate(group_positions(plan))]


@torch.no_grad()
def qat_group_bits(model: QATNet, grid: np.ndarray) -> np.ndarray:
    """Code length (bits) of each group of `grid` under `model` in its current mode: [G]; one batch of G inputs."""
    plan = make_schedule(model.config.schedule, *grid.shape)
    order = group_positions(plan)
    g = torch.arange(len(order))[:, None, None]
    grids = torch.from_numpy(grid)
    x = model.features(torch.where(torch.from_numpy(plan) < g, grids, model.config.mask))  # [G, C, h, w]
    x = x.reshape(len(order), x.shape[1], -1)
    flat = grids.reshape(-1)
    return np.array([float(model.code_length(x[i][:, p].T, flat[p]).sum()) / math.log(2.0)
                     for i, p in enumerate(map(torch.from_numpy, order))])


def unigram_table(histogram: np.ndarray) -> np.ndarray:
    """The static table of a training histogram [K] + 1."""
    return tables_from_probabilities((np.asarray(histogram) + 1).astype(np.float32))


def static_bits(table: np.ndarray, maps: Sequence[np.ndarray]) -> float:
    return float(sum(-np.log2(table[m.reshape(-1)] / PROB_TOTAL).sum() for m in maps))


# --- training -----------------------------------------------------------------------------------


def _learning_rate(step: int, steps: int, switch: int, lr: float) -> float:
    """Float phase [0, switch): 50-step warm-up, cosine lr -> lr/20; QAT fine-tuning: cosine lr/20 -> lr/200."""
    if step < switch:
        t = step / max(1, switch)
        return lr * min(1.0, (step + 1) / 50) * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * t)))
    t = (step - switch) / max(1, steps - switch)
    return lr * (0.005 + 0.045 * 0.5 * (1 + math.cos(math.pi * t)))


def _generator(seed: int, step: int) -> torch.Generator:
    """The batch sampler of `step` (-1: the initialisation batch): a function of (seed, step), so resuming
    draws the batches an uninterrupted run would."""
    return torch.Generator().manual_seed((seed * 1_000_003 + step + 1) % (1 << 63))


def _save_checkpoint(path: Path, state: dict) -> None:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, buffer.getvalue())


def _check_args(preset: str, steps: int, batch: int, lr: float, schedule: str, float_fraction: float,
                checkpoint_every: int) -> None:
    if preset not in PRESETS:
        raise UsageError(f"unknown preset {preset!r}; known: {', '.join(PRESETS)}")
    if schedule not in SCHEDULES:
        raise UsageError(f"unknown schedule {schedule!r}; known: {', '.join(sorted(SCHEDULES))}")
    for name, value in (("steps", steps), ("batch", batch), ("checkpoint_every", checkpoint_every)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise UsageError(f"{name} must be a positive integer, got {value!r}")
    if not (lr > 0 and math.isfinite(lr)):
        raise UsageError(f"lr must be a positive number, got {lr!r}")
    if not 0 < float_fraction < 1:
        raise UsageError(f"float_fraction must lie in (0, 1), got {float_fraction!r}")


def train_entropy(model_dir, images=None, preset: str = "tiny", steps: int = 2000, batch: int = 16, crop: int = 256,
                  crops_per_image: int = 32, lr: float = 1e-2, schedule: str = "coarse-to-fine", seed: int = 0,
                  resume: bool = False, held_out: int = 1, float_fraction: float = 0.75, checkpoint_every: int = 500,
                  threads: Optional[int] = None, maps: Optional[IndexMaps] = None, progress: bool = True,
                  log: Callable[[str], None] = print) -> dict:
    """Train the entropy model of `model_dir` on `images` (a folder, glob or list; or on `maps` from `index_maps`,
    which then sets crop, crops_per_image, held_out and the data seed); write it with `save_entropy_model` to
    `model_dir/entropy_model/` and return the report (also its training record).

    The last `held_out` images (sorted by path) are held out; with 0, the rates are measured on the training
    images' full maps. `steps` is the total: `resume` continues from `model_dir/entropy_model.train/checkpoint.pt`
    (written every `checkpoint_every` steps and at the end) with the checkpoint's data seed. `threads`: torch's
    intra-op threads while training (None: as they are; the tiny preset runs as fast on one and is steadier on a
    busy machine).
    """
    from perco.engine.model import ModelInfo

    _check_args(preset, steps, batch, lr, schedule, float_fraction, checkpoint_every)
    if (images is None) == (maps is None):
        raise UsageError("train_entropy needs images or maps (one of them)")
    model_dir = Path(model_dir)
    codebook_size = ModelInfo.open(model_dir).rate.codebook_size
    checkpoint_path = model_dir / CHECKPOINT_FOLDER / CHECKPOINT
    state = _load_checkpoint(checkpoint_path, preset, schedule, codebook_size) if resume else None
    if maps is None:
        maps = index_maps(model_dir, images, crop, crops_per_image, held_out, state["data_seed"] if state else seed,
                          progress, log)
    elif maps.codebook_size != codebook_size or (state and state["data_seed"] != maps.seed):
        raise PercoError(f"the index maps (codebook {maps.codebook_size}, seed {maps.seed}) do not belong to this "
                         f"model (codebook {codebook_size})" + (f" and checkpoint (data seed {state['data_seed']})"
                                                                 if state else ""))
    seed = maps.seed
    config = IntNetConfig.preset(preset, codebook_size, schedule=schedule)
    eval_maps = maps.evaluation
    tokens = sum(m.size for m in eval_maps)
    buckets = _Buckets(maps.train, schedule)

    net = QATNet(config, seed)
    optimizer = torch.optim.Adam(net.parameters(), lr=lr)
    switch = max(1, min(steps - 1, round(steps * float_fraction)))
    step, float_rates, train_seconds = 0, None, 0.0
    if state:
        net.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        step, float_rates, train_seconds = state["step"], state["float_rates"], state["train_seconds"]
        log(f"resuming at step {step} of {steps}")
    else:
        net.initialize(buckets.batch(4 * batch, _generator(seed, -1), config.mask)[0], maps.histogram)

    def float_phase_rates() -> dict:
        """The float model's rate, and that of its integer export without QAT (post-training rounding)."""
        net.quantize = False
        rates = {"float": sum(qat_group_bits(net, m).sum() for m in eval_maps) / tokens,
                 "rounded": sum(integer_group_bits(IntNet(*net.export()), m).sum() for m in eval_maps) / tokens}
        log(f"float model at step {step}: {rates['float']:.4f} bits/token ({rates['rounded']:.4f} rounded to "
            f"integers without QAT); quantization-aware from here")
        return rates

    old_threads = torch.get_num_threads()
    torch.set_num_threads(threads or old_threads)
    bar = _bar(None, steps, "training", progress, initial=min(step, steps))
    average, loop_start = None, time.perf_counter()
    try:
        while step < steps:
            if step >= switch and float_rates is None:
                float_rates = float_phase_rates()
            net.quantize = step >= switch
            for group in optimizer.param_groups:
                group["lr"] = _learning_rate(step, steps, switch, lr)
            loss = batch_loss(net, *buckets.batch(batch, _generator(seed, step), config.mask))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            net.project_()
            step += 1
            average = loss.item() if average is None else 0.98 * average + 0.02 * loss.item()
            bar.update(1)
            bar.set_postfix_str(f"{'qat' if net.quantize else 'float'} {average:.3f} bits/token")
            if step % checkpoint_every == 0 or step == steps:
                train_seconds += time.perf_counter() - loop_start
                loop_start = time.perf_counter()
                _save_checkpoint(checkpoint_path, {
                    "model": net.state_dict(), "optimizer": optimizer.state_dict(), "step": step, "data_seed": seed,
                    "preset": preset, "schedule": schedule, "codebook_size": config.codebook_size,
                    "float_rates": float_rates, "train_seconds": train_seconds})
    finally:
        bar.close()
        torch.set_num_threads(old_threads)
    float_rates = float_rates or float_phase_rates()  # none yet: resumed at `steps` before the QAT phase

    final_config, weights = net.export()
    integer = sum(integer_group_bits(IntNet(final_config, weights), m).sum() for m in eval_maps) / tokens
    unigram = static_bits(unigram_table(maps.histogram), eval_maps) / tokens
    report = {
        "steps": step, "preset": preset, "schedule": schedule, "codebook_size": config.codebook_size,
        "batch": batch, "crop": maps.crop, "crops_per_image": maps.crops_per_image, "lr": lr, "seed": seed,
        "float_steps": switch, "images": len(maps.train_images), "held_out_images": len(maps.held_out_images),
        "evaluated_on": "held-out images" if maps.held_out_images else "training images (none held out)",
        "train_maps": len(maps.train), "train_map_shapes": [list(s) for s in sorted({m.shape for m in maps.train})],
        "evaluation_tokens": int(tokens),
        "bits_per_token": {"uniform": math.log2(config.codebook_size), "unigram": unigram,
                           "float": float(float_rates["float"]), "integer": float(integer),
                           "rounded_without_qat": float(float_rates["rounded"])},
        "integer_vs_float_gap": float(integer / float_rates["float"] - 1) if float_rates["float"] > 0 else 0.0,
        "logit_multiplier": final_config.logit_multiplier, "logit_shift": final_config.logit_shift,
        "maps_seconds": maps.seconds, "train_seconds": train_seconds,
    }
    folder = save_entropy_model(model_dir / FOLDER, final_config, weights, training=report)
    log(f"wrote {folder}")
    return {**report, "entropy_model": str(folder), "checkpoint": str(checkpoint_path)}


def _load_checkpoint(path: Path, preset: str, schedule: str, codebook_size: int) -> dict:
    if not path.is_file():
        raise PercoError(f"--resume: no checkpoint at {path} (train without --resume first)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # noqa: BLE001 - any unpickling failure is a damaged checkpoint
        raise PercoError(f"--resume: cannot read the checkpoint {path}: {exc}") from None
    if (state["preset"], state["schedule"], state["codebook_size"]) != (preset, schedule, codebook_size):
        raise PercoError(f"--resume: the checkpoint is preset {state['preset']}, schedule {state['schedule']}, "
                         f"codebook {state['codebook_size']}; asked for {preset}, {schedule}, {codebook_size}")
    return state
