"""PerCoV2 (Körber et al., 2025) as this engine defines it (no public code or weights; the choices
are in docs/percov2.md): Stable Diffusion 3's MMDiT with the local features concatenated to the
16 latent channels at its patch embedding, the 16-channel SD3 VAE (shift and scale), CLIP-L and
CLIP-G text encoders with pooled projections (and T5-XXL where the folder has it), flow-matching Euler with
classifier-free guidance, and a hyper-encoder + VQ on the 16-channel latent."""

from perco.engine.families import Family, OptionalTextEncoder, register
from perco.engine.families.perco_sd import CONFIG_FIELDS as _SD_FIELDS
from perco.engine.graphs import GraphContract
from perco.engine.limits import NetworkSizes

T5_TOKENS = 256  # SD3's max_sequence_length; zeros stand in for T5-XXL's states when it is absent
CLIP_TOKENS = 77

# rate (bpp of the indices at 512x512) -> (token grid side at 512x512, codebook size); 0.0024-0.031 bpp
# before entropy coding, the paper's 0.003-0.03 bpp range once the caption is added
RATES = {
    "0.0313": (32, 256),
    "0.0098": (16, 1024),
    "0.0078": (16, 256),
    "0.0024": (8, 1024),
}

GRAPHS = {
    "text_encoder": GraphContract(  # CLIP-L and CLIP-G: penultimate states (padded to J) + T5 zeros; pooled
        inputs=(("input_ids", "int64", "B,77"), ("input_ids_2", "int64", "B,77")),
        outputs=(("text_embeddings", "float32", "B,S,J"), ("pooled_projections", "float32", "B,P")),
    ),
    "vae_encoder": GraphContract(  # (posterior mean - shift) * scale
        inputs=(("image", "float32", "B,3,H,W"),),
        outputs=(("latent", "float32", "B,16,h,w"),),
    ),
    "hyper_encoder": GraphContract(
        inputs=(("latent", "float32", "B,16,h,w"),),
        outputs=(("indices", "int64", "B,gh,gw"),),
    ),
    "local_features": GraphContract(
        inputs=(("indices", "int64", "B,gh,gw"),),
        outputs=(("local_features", "float32", "B,M,h,w"),),
    ),
    "denoiser": GraphContract(  # MMDiT, [latent, local features] at the patch embedding; predicts the velocity
        inputs=(
            ("sample", "float32", "2B,16,h,w"),
            ("timestep", "float32", "2B"),
            ("text_embeddings", "float32", "2B,S,J"),
            ("pooled_projections", "float32", "2B,P"),
            ("local_features", "float32", "2B,M,h,w"),
        ),
        outputs=(("model_output", "float32", "2B,16,h,w"),),
    ),
    "vae_decoder": GraphContract(  # latent / scale + shift, decoded to [-1, 1]
        inputs=(("latent", "float32", "B,16,h,w"),),
        outputs=(("image", "float32", "B,3,H,W"),),
    ),
}

T5 = OptionalTextEncoder(  # T5-XXL on the caption text: rows 77..332 of text_embeddings (zeros without it)
    component="text_encoder_3", tokenizer="tokenizer_3", files=("config.json", "model.safetensors"),
    contract=GraphContract(inputs=(("input_ids_3", "int64", "B,256"),),
                           outputs=(("t5_embeddings", "float32", "B,256,J"),)),
    into="text_embeddings", offset=CLIP_TOKENS, max_length=T5_TOKENS,
    width=("d_model", ("transformer", "joint_attention_dim")),
)

_CH = ("int", 1, 8192, None)
_TEXT = {"hidden_size": _CH, "intermediate_size": ("int", 1, 65536, None), "num_hidden_layers": ("int", 1, 128, None),
         "num_attention_heads": ("int", 1, 256, None), "max_position_embeddings": ("int", 1, 4096, 77),
         "vocab_size": ("int", 2, 1 << 20, None), "projection_dim": _CH}
CONFIG_FIELDS = {
    "hyper_enc": _SD_FIELDS["hyper_enc"],
    "vae": dict(_SD_FIELDS["vae"], latent_channels=("int", 16, 16, None), scaling_factor=("float", 1e-6, 1e6, None),
                shift_factor=("float", -1e3, 1e3, None)),
    "transformer": {"num_layers": ("int", 1, 128, None), "num_attention_heads": ("int", 1, 256, None),
                    "attention_head_dim": ("int", 1, 1024, None), "joint_attention_dim": _CH,
                    "caption_projection_dim": _CH, "pooled_projection_dim": _CH, "in_channels": ("int", 16, 16, None),
                    "out_channels": ("int", 16, 16, None), "patch_size": ("int", 1, 8, None),
                    "pos_embed_max_size": ("int", 1, 4096, None)},
    "text_encoder": _TEXT,
    "text_encoder_2": _TEXT,
    "text_encoder_3": {"d_model": _CH, "d_ff": ("int", 1, 65536, None), "d_kv": ("int", 1, 1024, None),
                       "num_layers": ("int", 1, 128, None), "num_heads": ("int", 1, 256, None),
                       "vocab_size": ("int", 2, 1 << 20, None)},
}


def _network_sizes(configs: dict, weights_bytes: int) -> NetworkSizes:
    """The MMDiT in the UNet-shaped estimate: its tokens are latent patches (level log2(patch)), and its
    width over 4 channels per latent pixel gives the same activation count per token."""
    t = configs["transformer"]
    patch = int(t["patch_size"])
    return NetworkSizes(unet_channels=max(1, t["num_attention_heads"] * t["attention_head_dim"] // patch**2),
                        unet_heads=int(t["num_attention_heads"]), unet_attention_level=patch.bit_length() - 1,
                        vae_channels=int(configs["vae"]["block_out_channels"][0]), weights_bytes=int(weights_bytes),
                        max_side=int(t["pos_embed_max_size"]) * patch * 8)


PERCOV2 = register(Family(
    name="percov2",
    title="PerCoV2",
    pipelines=("StableDiffusion3Pipeline",),
    graphs=GRAPHS,
    components={
        "transformer": ("config.json", "diffusion_pytorch_model.safetensors"),
        "vae": ("config.json", "diffusion_pytorch_model.safetensors"),
        "text_encoder": ("config.json", "model.safetensors"),
        "text_encoder_2": ("config.json", "model.safetensors"),
        "hyper_enc": ("config.json", "diffusion_pytorch_model.safetensors"),
    },
    config_fields=CONFIG_FIELDS,
    denoiser="transformer",
    latent_channels=16,
    latent_factor=8,
    text_inputs=(("input_ids", "tokenizer"), ("input_ids_2", "tokenizer_2")),
    text_outputs=("text_embeddings", "pooled_projections"),
    optional_text=T5,  # T5-XXL where the folder has it; zeros in its place otherwise (docs/percov2.md)
    schedules=("FlowSchedule",),
    guidance=3.0,
    steps=(20, 20, 0.05),
    rates=RATES,
    network_sizes=_network_sizes,
))
