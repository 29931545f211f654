"""PerCo (SD) (Körber et al., 2024): Stable Diffusion 2.1, v-prediction DDIM, one CLIP text encoder,
a hyper-encoder whose token grid enters the UNet through `conv_in_extended`."""

from perco.engine.families import Family, register
from perco.engine.graphs import GRAPHS
from perco.engine.limits import NetworkSizes

# released rates: rate (bpp of the indices at 512x512) -> (token grid side at 512x512, codebook size)
RATES = {
    "0.1250": (64, 256),
    "0.0937": (64, 64),
    "0.0507": (32, 8192),
    "0.0313": (32, 256),
    "0.0098": (16, 1024),
    "0.0024": (8, 1024),
    "0.0019": (8, 256),
}

# Config fields the runtime and the model builders read, with their kinds and sane ranges; checked
# field by field before anything is built, so a wrong type or an absurd size is a ModelError naming
# the field instead of a failure (or a terabyte allocation) inside torch. (kind, low, high, default)
_CH = ("int", 1, 8192, None)
_CHANNEL_LIST = ("ints", 1, 8192, None)
CONFIG_FIELDS = {
    "hyper_enc": {"in_channels": ("int", 1, 64, None), "N": _CH, "M": _CH, "codebook_dim": _CH,
                  "cfg_ss": ("int", 1, 1024, None), "cfg_cs": ("int", 2, 65536, None)},
    "vae": {"block_out_channels": _CHANNEL_LIST, "latent_channels": ("int", 1, 64, 4),
            "layers_per_block": ("int", 1, 16, 1), "norm_num_groups": ("int", 1, 1024, 32),
            "scaling_factor": ("float", 1e-6, 1e6, 0.18215)},
    "unet": {"block_out_channels": _CHANNEL_LIST, "layers_per_block": ("int", 1, 16, 2),
             "attention_head_dim": ("int_or_ints", 1, 1024, 8), "cross_attention_dim": ("int", 1, 8192, 1280),
             "norm_num_groups": ("int", 1, 1024, 32), "in_channels": ("int", 1, 64, 4)},
    "text_encoder": {"hidden_size": _CH, "intermediate_size": ("int", 1, 65536, None),
                     "num_hidden_layers": ("int", 1, 128, None), "num_attention_heads": ("int", 1, 256, None),
                     "max_position_embeddings": ("int", 1, 4096, 77), "vocab_size": ("int", 2, 1 << 20, None)},
}

PERCO_SD = register(Family(
    name="perco-sd",
    title="PerCo (SD)",
    pipelines=("StableDiffusionPipeline",),
    graphs=GRAPHS,
    components={
        "unet": ("config.json", "diffusion_pytorch_model.safetensors"),
        "vae": ("config.json", "diffusion_pytorch_model.safetensors"),
        "text_encoder": ("config.json", "model.safetensors"),
        "hyper_enc": ("config.json", "diffusion_pytorch_model.safetensors"),
    },
    config_fields=CONFIG_FIELDS,
    denoiser="unet",
    latent_channels=4,
    latent_factor=8,
    text_outputs=("text_embeddings",),
    schedules=("NoiseSchedule",),
    guidance=3.0,
    steps=(20, 5, 0.05),  # the reference: 20 DDIM steps below 0.05 bpp, 5 at or above
    rates=RATES,
    network_sizes=lambda configs, weights_bytes: NetworkSizes.from_configs(configs["unet"], configs["vae"],
                                                                           weights_bytes),
))
