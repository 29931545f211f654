"""The graph contract type, and PerCo (SD)'s contract: the networks the runtime calls, by name, with
their input and output names (PerCoV2's is in `perco.engine.families.percov2`).

Every backend implements `run(graph, inputs) -> outputs` over exactly the model family's names; the
export side builds its modules and ONNX graphs against the same contract. Shapes use B for batch,
H x W for the padded image, h x w = H/8 x W/8 for the latent, gh x gw for the token grid,
D for the text width and M for the local-feature channels.
"""

from dataclasses import dataclass


@dataclass(frozen=True)
class GraphContract:
    inputs: tuple  # (name, dtype, symbolic shape)
    outputs: tuple


GRAPHS = {
    "text_encoder": GraphContract(
        inputs=(("input_ids", "int64", "B,77"),),
        outputs=(("text_embeddings", "float32", "B,77,D"),),
    ),
    "vae_encoder": GraphContract(  # posterior mean times the VAE scaling factor
        inputs=(("image", "float32", "B,3,H,W"),),
        outputs=(("latent", "float32", "B,4,h,w"),),
    ),
    "hyper_encoder": GraphContract(  # backbone + cosine-similarity VQ
        inputs=(("latent", "float32", "B,4,h,w"),),
        outputs=(("indices", "int64", "B,gh,gw"),),
    ),
    "local_features": GraphContract(  # project_out(codebook[indices]), nearest-upsampled to h x w
        inputs=(("indices", "int64", "B,gh,gw"),),
        outputs=(("local_features", "float32", "B,M,h,w"),),
    ),
    "denoiser": GraphContract(  # UNet with conv_in_extended; guidance batch 2B = (uncond, cond)
        inputs=(
            ("sample", "float32", "2B,4,h,w"),
            ("timestep", "float32", "2B"),
            ("text_embeddings", "float32", "2B,77,D"),
            ("local_features", "float32", "2B,M,h,w"),
        ),
        outputs=(("model_output", "float32", "2B,4,h,w"),),
    ),
    "vae_decoder": GraphContract(  # divides by the scaling factor, decodes to [-1, 1]
        inputs=(("latent", "float32", "B,4,h,w"),),
        outputs=(("image", "float32", "B,3,H,W"),),
    ),
}


# The learned entropy model's integer network (perco.engine.entropy.learned), in an export when the model has
# one: ids [gh, gw] (MASK = K) -> int32 logits and int64 logit steps [K, gh, gw]. Not a family graph: TensorRT
# does not build it, and a backend without it leaves it to the numpy reference (the integers are the same).
ENTROPY_GRAPH = "entropy_model"
ENTROPY_CONTRACT = GraphContract(
    inputs=(("ids", "int64", "gh,gw"),),
    outputs=(("logits", "int32", "K,gh,gw"), ("steps", "int64", "K,gh,gw")),
)
