"""PerCo (SD): Stable Diffusion 2.1 + a hyper-encoder with a cosine-similarity VQ.

One file for the family: the dataclass config, the table of named presets, the torch modules
that diffusers/transformers do not provide (hyper-encoder, the UNet's `conv_in_extended`),
strict checkpoint loading with key maps for legacy names, and the folder writer used by
`perco init-tiny`. Facts followed here: PerCo (SD) release, see docs/architecture.md.
"""

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from perco.engine.errors import ModelError
from perco.engine.families.perco_sd import PERCO_SD, RATES
from perco.engine.model import SCHEDULER_CONFIG, ModelInfo

COMPONENTS = PERCO_SD.components

SD21_SCHEDULER = {
    "_class_name": "DDIMScheduler",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "num_train_timesteps": 1000,
    "prediction_type": "v_prediction",
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
}

SD21_UNET = {
    "act_fn": "silu",
    "attention_head_dim": [5, 10, 20, 20],
    "block_out_channels": [320, 640, 1280, 1280],
    "center_input_sample": False,
    "cross_attention_dim": 1024,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "downsample_padding": 1,
    "dual_cross_attention": False,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "out_channels": 4,
    "sample_size": 96,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "upcast_attention": True,
    "use_linear_projection": True,
}

SD21_VAE = {
    "act_fn": "silu",
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "in_channels": 3,
    "latent_channels": 4,
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "out_channels": 3,
    "sample_size": 768,
    "scaling_factor": 0.18215,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
}

SD21_TEXT = {  # OpenCLIP ViT-H/14 text tower as used by SD 2.1 (penultimate layer: 23 layers)
    "architectures": ["CLIPTextModel"],
    "bos_token_id": 0,
    "eos_token_id": 2,
    "hidden_act": "gelu",
    "hidden_size": 1024,
    "intermediate_size": 4096,
    "layer_norm_eps": 1e-05,
    "max_position_embeddings": 77,
    "model_type": "clip_text_model",
    "num_attention_heads": 16,
    "num_hidden_layers": 23,
    "pad_token_id": 1,
    "projection_dim": 512,
    "torch_dtype": "float32",
    "vocab_size": 49408,
}


@dataclass(frozen=True)
class PercoSDConfig:
    """Every config file of a PerCo (SD) folder; `grid`/`codebook_size` select the rate."""

    grid: int
    codebook_size: int
    unet: dict = field(default_factory=lambda: dict(SD21_UNET))
    vae: dict = field(default_factory=lambda: dict(SD21_VAE))
    text_encoder: dict = field(default_factory=lambda: dict(SD21_TEXT))
    hyper_channels: tuple = (192, 320, 32)  # N, M, codebook_dim
    scheduler: dict = field(default_factory=lambda: dict(SD21_SCHEDULER))

    @property
    def hyper_enc(self) -> dict:
        n, m, d = self.hyper_channels
        return {"_class_name": "HyperEncoder", "in_channels": 4, "N": n, "M": m, "codebook_dim": d,
                "cfg_ss": self.grid, "cfg_cs": self.codebook_size}


def _tiny(grid: int, codebook_size: int) -> PercoSDConfig:
    """Same structure and rate geometry as the real model, a few hundred kB of weights."""
    return PercoSDConfig(
        grid=grid,
        codebook_size=codebook_size,
        unet=dict(
            SD21_UNET,
            attention_head_dim=[2, 4],
            block_out_channels=[32, 64],
            cross_attention_dim=32,
            # attention only at the lower resolution keeps CPU tests fast at 768x512
            down_block_types=["DownBlock2D", "CrossAttnDownBlock2D"],
            up_block_types=["CrossAttnUpBlock2D", "UpBlock2D"],
            layers_per_block=1,
            norm_num_groups=8,
            sample_size=64,
        ),
        vae=dict(SD21_VAE, block_out_channels=[8, 16, 16, 16], layers_per_block=1, norm_num_groups=8, sample_size=512),
        text_encoder=dict(SD21_TEXT, hidden_size=32, intermediate_size=64, num_attention_heads=2,
                          num_hidden_layers=2, projection_dim=32),
        hyper_channels=(16, 16, 8),
    )


PRESETS = {rate: PercoSDConfig(grid, k) for rate, (grid, k) in RATES.items()}
PRESETS.update({f"tiny-{rate}": _tiny(grid, k) for rate, (grid, k) in RATES.items()})


# --- hyper-encoder (key names as released: backbone.<i>..., quantizer....) -------------------


def _conv1x1(cin: int, cout: int) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, kernel_size=1)


def _conv3x3(cin: int, cout: int) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, kernel_size=3, padding=1)


def _bottleneck(n: int) -> nn.Sequential:
    return nn.Sequential(_conv1x1(n, n // 2), nn.ReLU(), _conv3x3(n // 2, n // 2), nn.ReLU(), _conv1x1(n // 2, n))


class ResidualBottleneck(nn.Module):
    """x + (1x1 N->N/2, ReLU, 3x3, ReLU, 1x1 N/2->N)."""

    def __init__(self, n: int):
        super().__init__()
        self.layers = _bottleneck(n)

    def forward(self, x):
        return x + self.layers(x)


class ResidualUnit(nn.Module):
    """ReLU(x + bottleneck(x)): the unit of CompressAI's AttentionBlock."""

    def __init__(self, n: int):
        super().__init__()
        self.conv = _bottleneck(n)

    def forward(self, x):
        return F.relu(x + self.conv(x))


class AttentionBlock(nn.Module):
    """CompressAI's simplified attention: x + a(x) * sigmoid(b(x))."""

    def __init__(self, n: int):
        super().__init__()
        self.conv_a = nn.Sequential(ResidualUnit(n), ResidualUnit(n), ResidualUnit(n))
        self.conv_b = nn.Sequential(ResidualUnit(n), ResidualUnit(n), ResidualUnit(n), _conv1x1(n, n))

    def forward(self, x):
        return x + self.conv_a(x) * torch.sigmoid(self.conv_b(x))


def _stage_conv(cin: int, cout: int, downsample: bool) -> nn.Conv2d:
    if downsample:
        return nn.Conv2d(cin, cout, kernel_size=5, stride=2, padding=2)
    return _conv1x1(cin, cout)


class _Codebook(nn.Module):
    """Buffers as the VQ library stores them; only `embed` is used at inference."""

    def __init__(self, size: int, dim: int):
        super().__init__()
        self.register_buffer("initted", torch.ones(1))
        self.register_buffer("cluster_size", torch.zeros(1, size))
        self.register_buffer("embed_avg", torch.zeros(1, size, dim))
        self.register_buffer("embed", torch.zeros(1, size, dim))


class CosineVQ(nn.Module):
    """One-head cosine-similarity vector quantizer.

    index = argmax_k <normalize(project_in(z)), embed[k]>; the stored codebook is used as is.
    feature = project_out(embed[index]).
    """

    def __init__(self, dim: int, codebook_size: int, codebook_dim: int):
        super().__init__()
        self.project_in = nn.Linear(dim, codebook_dim)
        self.project_out = nn.Linear(codebook_dim, dim)
        self._codebook = _Codebook(codebook_size, codebook_dim)

    def indices(self, z):  # [B, N, dim] -> [B, N] int64
        e = F.normalize(self.project_in(z), dim=-1)
        return (e @ self._codebook.embed[0].t()).argmax(dim=-1)

    def features(self, indices):  # [...] -> [..., dim]
        return self.project_out(self._codebook.embed[0][indices])


class HyperEncoder(nn.Module):
    """Scaled VAE latent [B, 4, h, w] -> token indices [B, gh, gw]."""

    def __init__(self, in_channels: int, N: int, M: int, codebook_dim: int, cfg_ss: int, cfg_cs: int):
        super().__init__()
        self.grid = cfg_ss
        self.backbone = nn.Sequential(
            _stage_conv(in_channels, N, downsample=cfg_ss <= 8),
            ResidualBottleneck(N), ResidualBottleneck(N), ResidualBottleneck(N),
            _stage_conv(N, N, downsample=cfg_ss <= 16),
            ResidualBottleneck(N), ResidualBottleneck(N), ResidualBottleneck(N),
            AttentionBlock(N),
            _stage_conv(N, N, downsample=cfg_ss <= 32),
            ResidualBottleneck(N), ResidualBottleneck(N), ResidualBottleneck(N),
            _conv1x1(N, M),
            AttentionBlock(M),
        )  # fmt: skip
        self.quantizer = CosineVQ(M, cfg_cs, codebook_dim)

    @classmethod
    def from_config(cls, config: dict) -> "HyperEncoder":
        keys = ("in_channels", "N", "M", "codebook_dim", "cfg_ss", "cfg_cs")
        return cls(**{k: int(config[k]) for k in keys})

    @property
    def upsample(self) -> int:
        """Latent pixels per token."""
        return 64 // self.grid

    def forward(self, latent):
        z = self.backbone(latent)  # [B, M, gh, gw]
        b, m, gh, gw = z.shape
        return self.quantizer.indices(z.permute(0, 2, 3, 1).reshape(b, gh * gw, m)).reshape(b, gh, gw)

    def local_features(self, indices):
        """[B, gh, gw] -> [B, M, gh*u, gw*u]: project_out(codebook[indices]), nearest-upsampled."""
        f = self.quantizer.features(indices).permute(0, 3, 1, 2)  # [B, M, gh, gw]
        return f.repeat_interleave(self.upsample, dim=2).repeat_interleave(self.upsample, dim=3)


# --- UNet with conv_in_extended ---------------------------------------------------------------


def _unet_class():
    from diffusers import UNet2DConditionModel

    class _DormantConvIn(nn.Conv2d):
        """Holds the released, unused `conv_in` weights; input arrives already projected."""

        def forward(self, x):
            return x

    class PercoUNet(UNet2DConditionModel):
        """SD UNet whose first layer `conv_in_extended` sees [latent, local features]."""

        def add_local_feature_input(self, local_channels: int) -> None:
            old = self.conv_in
            self.conv_in = _DormantConvIn(old.in_channels, old.out_channels, old.kernel_size, padding=old.padding)
            self.conv_in_extended = nn.Conv2d(
                old.in_channels + local_channels, old.out_channels, old.kernel_size, padding=old.padding
            )

        def forward(self, sample, timestep, encoder_hidden_states, local_features, **kwargs):
            h = self.conv_in_extended(torch.cat([sample, local_features], dim=1))  # [B, C0, h, w]
            return super().forward(h, timestep, encoder_hidden_states, **kwargs)

    return PercoUNet


# --- building and strict loading --------------------------------------------------------------


def _quiet_from_config(cls, config: dict):
    import logging

    from diffusers.utils import logging as dlogging

    previous = dlogging.get_verbosity()
    dlogging.set_verbosity(logging.ERROR)
    try:
        return cls.from_config(config)
    finally:
        dlogging.set_verbosity(previous)


def build_modules(configs: dict, names=("unet", "vae", "text_encoder", "hyper_enc")) -> dict:
    """Random-initialised modules for the components `names` (seed torch first)."""
    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig, CLIPTextModel

    modules = {}
    if "hyper_enc" in names:
        modules["hyper_enc"] = HyperEncoder.from_config(configs["hyper_enc"])
    if "unet" in names:
        modules["unet"] = _quiet_from_config(_unet_class(), configs["unet"])
        modules["unet"].add_local_feature_input(int(configs["hyper_enc"]["M"]))
    if "vae" in names:
        modules["vae"] = _quiet_from_config(AutoencoderKL, configs["vae"])
    if "text_encoder" in names:
        text_config = CLIPTextConfig(**{k: v for k, v in configs["text_encoder"].items() if not k.startswith("_")})
        modules["text_encoder"] = CLIPTextModel(text_config)
    return {name: modules[name] for name in names}


_VAE_LEGACY = {".query.": ".to_q.", ".key.": ".to_k.", ".value.": ".to_v.", ".proj_attn.": ".to_out.0."}
# Key maps: (renames applied to file keys, file keys that are benign legacy state and dropped)
KEY_MAPS = {
    "vae": (_VAE_LEGACY, ()),
    "text_encoder": ({}, ("text_model.embeddings.position_ids",)),
    "unet": ({}, ()),
    "hyper_enc": ({}, ()),
    "transformer": ({}, ()),
}


def _map_keys(state: dict, component: str) -> dict:
    renames, dropped = KEY_MAPS[component]
    out = {}
    for key, value in state.items():
        if key in dropped:
            continue
        for old, new in renames.items():
            key = key.replace(old, new)
        out[key] = value
    return out


def load_strict(module: nn.Module, path: Path, component: str) -> None:
    """Load safetensors into `module`; any missing, unexpected or misshaped tensor is a ModelError."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        state = _map_keys(load_file(str(path)), component)
    except (SafetensorError, OSError) as exc:
        raise ModelError(f"cannot read weights {path}: {exc}") from None
    load_state_strict(module, state, path)


def load_state_strict(module: nn.Module, state: dict, path: Path) -> None:
    """Load `state` (read from `path`) into `module`; any missing, unexpected or misshaped tensor is a ModelError."""
    expected = module.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]

    def some(keys):
        return repr(keys[0]) + (f" (and {len(keys) - 1} more)" if len(keys) > 1 else "")

    if missing:
        raise ModelError(f"{path}: missing tensor {some(missing)}")
    if unexpected:
        raise ModelError(f"{path}: unexpected tensor {some(unexpected)}")
    for key, tensor in expected.items():
        if tuple(state[key].shape) != tuple(tensor.shape):
            raise ModelError(
                f"{path}: tensor {key!r} has shape {list(state[key].shape)}, expected {list(tensor.shape)}"
            )
    module.load_state_dict(state, strict=True)


def load_model(info: ModelInfo, names=("unet", "vae", "text_encoder", "hyper_enc")) -> dict:
    """Networks of a model folder (all four by default), strictly loaded, eval mode, float32, CPU."""
    modules = build_modules(info.configs, names)
    for name, module in modules.items():
        load_strict(module, info.folder / name / COMPONENTS[name][1], name)
        module.eval().requires_grad_(False)
    return modules


# --- writing a model folder (init-tiny) -------------------------------------------------------


def write_model_folder(config: PercoSDConfig, folder: Path, seed: int, tokenizer_dir=None) -> Path:
    """Write a seeded, random model in the released folder layout and return the folder."""
    from perco.export.models.tokenizer import copy_tokenizer, write_builtin_tokenizer

    folder = Path(folder)
    (folder / "tokenizer").mkdir(parents=True, exist_ok=True)
    if tokenizer_dir is not None:
        vocab_size = copy_tokenizer(Path(tokenizer_dir), folder / "tokenizer")
    else:
        vocab_size = write_builtin_tokenizer(folder / "tokenizer")
    configs = {
        "unet": dict(config.unet, _class_name="UNet2DConditionModel"),
        "vae": dict(config.vae, _class_name="AutoencoderKL"),
        "text_encoder": dict(config.text_encoder, vocab_size=vocab_size),
        "hyper_enc": config.hyper_enc,
    }
    torch.manual_seed(seed)
    save_components(folder, build_modules(configs), configs, COMPONENTS, config.scheduler)
    _write_json(folder / "model_index.json", {
        "_class_name": "StableDiffusionPipeline",
        "hyper_enc": ["hyper_encoder", "HyperEncoder"],
        "scheduler": ["diffusers", "DDIMScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["unet_2d_perco", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    })  # fmt: skip
    return folder


def save_components(folder: Path, modules: dict, configs: dict, components: dict, scheduler: dict) -> None:
    """Write each module's config and safetensors weights into its component folder, and the scheduler
    config; the hyper-encoder's codebook rows are made unit-norm first, as in released checkpoints."""
    from safetensors.torch import save_file

    with torch.no_grad():
        embed = modules["hyper_enc"].quantizer._codebook.embed
        embed.copy_(F.normalize(torch.randn_like(embed), dim=-1))
    for name, module in modules.items():
        (folder / name).mkdir(exist_ok=True)
        _write_json(folder / name / components[name][0], configs[name])
        state = {k: v.detach().contiguous() for k, v in module.state_dict().items()}
        save_file(state, str(folder / name / components[name][1]))
    (folder / "scheduler").mkdir(exist_ok=True)
    _write_json(folder / SCHEDULER_CONFIG, scheduler)


def _write_json(path: Path, value: dict) -> None:
    path.write_text(json.dumps(value, indent=2, sort_keys=True) + "\n", encoding="utf-8")


__all__ = ["PRESETS", "RATES", "PercoSDConfig", "build_modules", "load_model", "load_strict",
           "write_model_folder"]
