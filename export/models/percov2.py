"""PerCoV2 networks (torch): SD3's MMDiT with local features at the patch embedding, the 16-channel
SD3 VAE, CLIP-L and CLIP-G text encoders with projections, and PerCo's hyper-encoder on the
16-channel latent, and T5-XXL where the folder has it (SD3 and this engine run without it, with zeros in
its place). Folder layout: diffusers' StableDiffusion3Pipeline plus hyper_enc/. See docs/percov2.md."""

from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from perco.engine.families.percov2 import PERCOV2, RATES, T5, T5_TOKENS
from perco.engine.errors import ModelError
from perco.engine.model import ModelInfo
from perco.export.models.perco_sd import (
    HyperEncoder, _quiet_from_config, _write_json, load_state_strict, load_strict, save_components,
)

COMPONENTS = PERCOV2.components

SD3_TRANSFORMER = {  # stable-diffusion-3-medium
    "sample_size": 128, "patch_size": 2, "in_channels": 16, "num_layers": 24, "attention_head_dim": 64,
    "num_attention_heads": 24, "joint_attention_dim": 4096, "caption_projection_dim": 1536,
    "pooled_projection_dim": 2048, "out_channels": 16, "pos_embed_max_size": 192,
}
SD3_VAE = {
    "act_fn": "silu", "block_out_channels": [128, 256, 512, 512], "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4, "in_channels": 3, "out_channels": 3, "latent_channels": 16,
    "layers_per_block": 2, "norm_num_groups": 32, "sample_size": 1024, "scaling_factor": 1.5305,
    "shift_factor": 0.0609, "use_quant_conv": False, "use_post_quant_conv": False,
}
CLIP_L = {  # CLIPTextModelWithProjection, OpenAI ViT-L/14 text tower
    "architectures": ["CLIPTextModelWithProjection"], "hidden_act": "quick_gelu", "hidden_size": 768,
    "intermediate_size": 3072, "num_attention_heads": 12, "num_hidden_layers": 12, "projection_dim": 768,
    "max_position_embeddings": 77, "model_type": "clip_text_model", "vocab_size": 49408, "bos_token_id": 0,
    "eos_token_id": 2, "pad_token_id": 1, "layer_norm_eps": 1e-05,
}
CLIP_G = dict(CLIP_L, hidden_act="gelu", hidden_size=1280, intermediate_size=5120, num_attention_heads=20,
              num_hidden_layers=32, projection_dim=1280)
T5_XXL = {  # T5EncoderModel of google/t5-v1_1-xxl, as SD3's text_encoder_3
    "architectures": ["T5EncoderModel"], "model_type": "t5", "d_model": 4096, "d_ff": 10240, "d_kv": 64,
    "num_heads": 64, "num_layers": 24, "vocab_size": 32128, "feed_forward_proj": "gated-gelu",
    "relative_attention_num_buckets": 32, "relative_attention_max_distance": 128, "layer_norm_epsilon": 1e-06,
    "dropout_rate": 0.1, "is_encoder_decoder": True, "pad_token_id": 0, "eos_token_id": 1,
    "decoder_start_token_id": 0, "tie_word_embeddings": False,
}
FLOW_SCHEDULER = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 3.0}


@dataclass(frozen=True)
class PercoV2Config:
    grid: int
    codebook_size: int
    transformer: dict = field(default_factory=lambda: dict(SD3_TRANSFORMER))
    vae: dict = field(default_factory=lambda: dict(SD3_VAE))
    text_encoder: dict = field(default_factory=lambda: dict(CLIP_L))
    text_encoder_2: dict = field(default_factory=lambda: dict(CLIP_G))
    text_encoder_3: dict = field(default_factory=lambda: dict(T5_XXL))  # written only with init-tiny --t5
    hyper_channels: tuple = (192, 320, 32)  # N, M, codebook_dim, as PerCo (SD)
    scheduler: dict = field(default_factory=lambda: dict(FLOW_SCHEDULER))

    @property
    def hyper_enc(self) -> dict:
        n, m, d = self.hyper_channels
        return {"_class_name": "HyperEncoder", "in_channels": 16, "N": n, "M": m, "codebook_dim": d,
                "cfg_ss": self.grid, "cfg_cs": self.codebook_size}


def _tiny(grid: int, codebook_size: int) -> PercoV2Config:
    """The same structure at a few hundred kB: 2 MMDiT blocks of width 32, small CLIPs, a small VAE."""
    clip_l = dict(CLIP_L, hidden_size=32, intermediate_size=64, num_attention_heads=2, num_hidden_layers=2,
                  projection_dim=32)
    clip_g = dict(CLIP_G, hidden_size=48, intermediate_size=96, num_attention_heads=2, num_hidden_layers=2,
                  projection_dim=32)
    return PercoV2Config(
        grid=grid, codebook_size=codebook_size,
        transformer=dict(SD3_TRANSFORMER, num_layers=2, attention_head_dim=16, num_attention_heads=2,
                         joint_attention_dim=96, caption_projection_dim=32, pooled_projection_dim=64,
                         pos_embed_max_size=128, sample_size=64),
        vae=dict(SD3_VAE, block_out_channels=[8, 16, 16, 16], layers_per_block=1, norm_num_groups=8, sample_size=512),
        text_encoder=clip_l, text_encoder_2=clip_g, hyper_channels=(16, 16, 8),
        text_encoder_3=dict(T5_XXL, d_ff=64, d_kv=16, num_heads=2, num_layers=2, relative_attention_num_buckets=8,
                            relative_attention_max_distance=32),
    )


PRESETS = {rate: PercoV2Config(grid, k) for rate, (grid, k) in RATES.items()}
PRESETS.update({f"tiny-{rate}": _tiny(grid, k) for rate, (grid, k) in RATES.items()})


# --- the MMDiT with local features -------------------------------------------------------------


def _transformer_class():
    from diffusers import SD3Transformer2DModel

    class PercoV2Transformer(SD3Transformer2DModel):
        """SD3's MMDiT whose patch embedding sees [latent (16), local features (M)]."""

        def add_local_feature_input(self, local_channels: int) -> None:
            old = self.pos_embed.proj
            self.pos_embed.proj = nn.Conv2d(old.in_channels + local_channels, old.out_channels, old.kernel_size,
                                            stride=old.stride, bias=old.bias is not None)

        def forward(self, sample, timestep, encoder_hidden_states, pooled_projections, local_features):
            return super().forward(torch.cat([sample, local_features], dim=1), encoder_hidden_states=encoder_hidden_states,
                                   pooled_projections=pooled_projections, timestep=timestep, return_dict=False)[0]

    return PercoV2Transformer


def components_of(info: ModelInfo) -> tuple:
    """The components of a PerCoV2 folder: the family's, plus T5 where the folder has it."""
    return tuple(COMPONENTS) + ((T5.component,) if info.optional_text else ())


def build_modules(configs: dict, names=tuple(COMPONENTS)) -> dict:
    """Random-initialised modules for the components `names` (seed torch first)."""
    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    modules = {}
    for name in names:
        if name == "hyper_enc":
            modules[name] = HyperEncoder.from_config(configs["hyper_enc"])
        elif name == "transformer":
            modules[name] = _quiet_from_config(_transformer_class(), configs["transformer"])
            modules[name].add_local_feature_input(int(configs["hyper_enc"]["M"]))
        elif name == "vae":
            modules[name] = _quiet_from_config(AutoencoderKL, configs["vae"])
        elif name == T5.component:
            config = T5Config(**{k: v for k, v in configs[name].items() if not k.startswith("_")})
            modules[name] = T5EncoderModel(config)
        else:  # text_encoder, text_encoder_2
            config = CLIPTextConfig(**{k: v for k, v in configs[name].items() if not k.startswith("_")})
            modules[name] = CLIPTextModelWithProjection(config)
    return modules


def load_model(info: ModelInfo, names=tuple(COMPONENTS)) -> dict:
    """Networks of a PerCoV2 folder, strictly loaded, eval mode, float32, CPU."""
    modules = build_modules(info.configs, names)
    for name, module in modules.items():
        if name == T5.component:
            _load_t5(module, info.folder / name / T5.files[1])
        else:
            load_strict(module, info.folder / name / COMPONENTS[name][1], "text_encoder" if "text" in name else name)
        module.eval().requires_grad_(False)
    return modules


def _load_t5(module, path: Path) -> None:
    """T5 strictly, from one file or transformers' shards; the tied shared/encoder embedding may be stored once."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from perco.engine.model import weights_files

    state = {}
    for f in weights_files(path):
        try:
            state.update(load_file(str(f)))
        except (SafetensorError, OSError) as exc:
            raise ModelError(f"cannot read weights {f}: {exc}") from None
    if "shared.weight" in state:  # transformers stores the tied pair as shared.weight alone
        state.setdefault("encoder.embed_tokens.weight", state["shared.weight"])
    load_state_strict(module, state, path)


# --- the graphs ----------------------------------------------------------------------------------


class TextEncoder(nn.Module):
    """SD3's prompt embedding without T5: CLIP-L and CLIP-G penultimate states side by side, zero-padded
    to the joint width, then T5_TOKENS zero rows; pooled: both projected pooled outputs."""

    def __init__(self, clip_l, clip_g, joint_dim: int):
        super().__init__()
        self.clip_l, self.clip_g, self.joint_dim = clip_l, clip_g, joint_dim

    def forward(self, input_ids, input_ids_2):
        out_l = self.clip_l(input_ids, output_hidden_states=True)
        out_g = self.clip_g(input_ids_2, output_hidden_states=True)
        clip = torch.cat([out_l.hidden_states[-2], out_g.hidden_states[-2]], dim=-1)
        clip = F.pad(clip, (0, self.joint_dim - clip.shape[-1]))
        t5 = torch.zeros(clip.shape[0], T5_TOKENS, self.joint_dim, dtype=clip.dtype)
        return torch.cat([clip, t5], dim=1), torch.cat([out_l.text_embeds, out_g.text_embeds], dim=-1)


class T5Encoder(nn.Module):
    """T5-XXL's last hidden states for SD3 (no attention mask: SD3 runs it over the padding too)."""

    def __init__(self, t5):
        super().__init__()
        self.t5 = t5

    def forward(self, input_ids_3):
        return self.t5(input_ids_3).last_hidden_state


class VaeEncoder(nn.Module):
    def __init__(self, vae, scale: float, shift: float):
        super().__init__()
        self.vae, self.scale, self.shift = vae, scale, shift

    def forward(self, image):  # [B, 3, H, W] -> [B, 16, H/8, W/8]
        return (self.vae.encode(image).latent_dist.mean - self.shift) * self.scale


class VaeDecoder(nn.Module):
    def __init__(self, vae, scale: float, shift: float):
        super().__init__()
        self.vae, self.scale, self.shift = vae, scale, shift

    def forward(self, latent):  # [B, 16, h, w] -> [B, 3, 8h, 8w] in [-1, 1]
        return self.vae.decode(latent / self.scale + self.shift).sample


class Denoiser(nn.Module):
    def __init__(self, transformer):
        super().__init__()
        self.transformer = transformer

    def forward(self, sample, timestep, text_embeddings, pooled_projections, local_features):
        return self.transformer(sample, timestep, text_embeddings, pooled_projections, local_features)


class _HyperGraph(nn.Module):
    def __init__(self, hyper_enc, local: bool):
        super().__init__()
        self.hyper_enc, self.local = hyper_enc, local

    def forward(self, x):
        return self.hyper_enc.local_features(x) if self.local else self.hyper_enc(x)


GRAPH_COMPONENTS = {"text_encoder": ("text_encoder", "text_encoder_2"), "vae_encoder": ("vae",),
                    "hyper_encoder": ("hyper_enc",), "local_features": ("hyper_enc",), "denoiser": ("transformer",),
                    "vae_decoder": ("vae",), T5.component: (T5.component,)}


def graph_modules(modules: dict, info: ModelInfo) -> dict:
    """name -> eval-mode module of each PerCoV2 graph whose components are in `modules`."""
    scale, shift = info.scaling_factor, info.shift_factor
    make = {
        "text_encoder": lambda: TextEncoder(modules["text_encoder"], modules["text_encoder_2"],
                                            int(info.configs["transformer"]["joint_attention_dim"])),
        "vae_encoder": lambda: VaeEncoder(modules["vae"], scale, shift),
        "hyper_encoder": lambda: _HyperGraph(modules["hyper_enc"], local=False),
        "local_features": lambda: _HyperGraph(modules["hyper_enc"], local=True),
        "denoiser": lambda: Denoiser(modules["transformer"]),
        "vae_decoder": lambda: VaeDecoder(modules["vae"], scale, shift),
        T5.component: lambda: T5Encoder(modules[T5.component]),
    }
    return {name: make[name]().eval() for name in PERCOV2.contract(optional_text=True)
            if all(c in modules for c in GRAPH_COMPONENTS[name])}


def graph_constants(configs: dict) -> dict:
    t = configs["transformer"]
    return {"S": 77 + T5_TOKENS, "J": int(t["joint_attention_dim"]), "P": int(t["pooled_projection_dim"]),
            "M": int(configs["hyper_enc"]["M"])}


# --- writing a model folder (init-tiny --family percov2) --------------------------------------


def _save_t5(folder: Path, module, config: dict) -> None:
    """As transformers saves T5EncoderModel: the tied embedding once, as shared.weight."""
    from safetensors.torch import save_file

    folder.mkdir(exist_ok=True)
    _write_json(folder / T5.files[0], config)
    state = {k: v.detach().contiguous() for k, v in module.state_dict().items() if k != "encoder.embed_tokens.weight"}
    save_file(state, str(folder / T5.files[1]))


def write_model_folder(config: PercoV2Config, folder: Path, seed: int, tokenizer_dir=None, t5: bool = False) -> Path:
    """A seeded, random PerCoV2 model in the SD3 diffusers layout plus hyper_enc/ (with `t5`, also
    text_encoder_3/ and tokenizer_3/: T5-XXL's architecture, or a tiny T5 with the built-in T5 tokenizer)."""
    from perco.export.models.tokenizer import (
        copy_tokenizer, set_pad_token, write_builtin_t5_tokenizer, write_builtin_tokenizer,
    )

    folder = Path(folder)
    for tok, pad in (("tokenizer", "<|endoftext|>"), ("tokenizer_2", "!")):  # SD3: CLIP-L pads with EOS, CLIG-G with !
        (folder / tok).mkdir(parents=True, exist_ok=True)
        vocab_size = copy_tokenizer(Path(tokenizer_dir), folder / tok) if tokenizer_dir else \
            write_builtin_tokenizer(folder / tok)
        set_pad_token(folder / tok, pad)
    configs = {
        "transformer": dict(config.transformer, _class_name="SD3Transformer2DModel"),
        "vae": dict(config.vae, _class_name="AutoencoderKL"),
        "text_encoder": dict(config.text_encoder, vocab_size=vocab_size),
        "text_encoder_2": dict(config.text_encoder_2, vocab_size=vocab_size),
        "hyper_enc": config.hyper_enc,
    }
    clip_width = configs["text_encoder"]["hidden_size"] + configs["text_encoder_2"]["hidden_size"]
    pooled = configs["text_encoder"]["projection_dim"] + configs["text_encoder_2"]["projection_dim"]
    assert clip_width <= config.transformer["joint_attention_dim"] and pooled == config.transformer["pooled_projection_dim"]
    torch.manual_seed(seed)
    save_components(folder, build_modules(configs), configs, COMPONENTS, config.scheduler)
    if t5:
        t5_config = dict(config.text_encoder_3, d_model=config.transformer["joint_attention_dim"],
                         vocab_size=write_builtin_t5_tokenizer(folder / T5.tokenizer))
        _save_t5(folder / T5.component, build_modules({T5.component: t5_config}, (T5.component,))[T5.component],
                 t5_config)
    _write_json(folder / "model_index.json", {
        "_class_name": "StableDiffusion3Pipeline",
        "hyper_enc": ["hyper_encoder", "HyperEncoder"],
        "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
        "text_encoder": ["transformers", "CLIPTextModelWithProjection"],
        "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
        "text_encoder_3": ["transformers", "T5EncoderModel"] if t5 else [None, None],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "tokenizer_2": ["transformers", "CLIPTokenizer"],
        "tokenizer_3": ["transformers", "T5TokenizerFast"] if t5 else [None, None],
        "transformer": ["perco_v2", "SD3Transformer2DModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    })  # fmt: skip
    return folder
