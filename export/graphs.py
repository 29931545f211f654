"""The torch module behind each graph of `perco.engine.graphs.GRAPHS`, and its export contract.

The torch backend runs these modules and the ONNX exporter exports the very same modules, so
both backends compute the same thing by construction. Input/output names, dtypes and symbolic
shapes come from `GRAPHS` (the one declaration); this file turns the symbols into dynamic axes,
(min, opt, max) shapes for a profile, and seeded sample inputs.
"""

from dataclasses import dataclass

import torch
from torch import nn

from perco.engine.graphs import GRAPHS


class TextEncoder(nn.Module):
    def __init__(self, text_encoder):
        super().__init__()
        self.text_encoder = text_encoder

    def forward(self, input_ids):  # [B, 77] -> [B, 77, D]
        return self.text_encoder(input_ids).last_hidden_state


class VaeEncoder(nn.Module):
    def __init__(self, vae, scaling_factor: float):
        super().__init__()
        self.vae, self.scaling_factor = vae, scaling_factor

    def forward(self, image):  # [B, 3, H, W] -> [B, 4, H/8, W/8]; the posterior mean (deterministic)
        return self.vae.encode(image).latent_dist.mean * self.scaling_factor


class HyperEncoderGraph(nn.Module):
    def __init__(self, hyper_enc):
        super().__init__()
        self.hyper_enc = hyper_enc

    def forward(self, latent):  # [B, 4, h, w] -> [B, gh, gw] int64
        return self.hyper_enc(latent)


class LocalFeatures(nn.Module):
    def __init__(self, hyper_enc):
        super().__init__()
        self.hyper_enc = hyper_enc

    def forward(self, indices):  # [B, gh, gw] -> [B, M, h, w]
        return self.hyper_enc.local_features(indices)


class Denoiser(nn.Module):
    def __init__(self, unet):
        super().__init__()
        self.unet = unet

    def forward(self, sample, timestep, text_embeddings, local_features):  # -> [2B, 4, h, w]
        return self.unet(sample, timestep, text_embeddings, local_features, return_dict=False)[0]


class VaeDecoder(nn.Module):
    def __init__(self, vae, scaling_factor: float):
        super().__init__()
        self.vae, self.scaling_factor = vae, scaling_factor

    def forward(self, latent):  # [B, 4, h, w] -> [B, 3, 8h, 8w] in [-1, 1]
        return self.vae.decode(latent / self.scaling_factor).sample


# graph -> the model component (subfolder) it runs
GRAPH_COMPONENT = {"text_encoder": "text_encoder", "vae_encoder": "vae", "hyper_encoder": "hyper_enc",
                   "local_features": "hyper_enc", "denoiser": "unet", "vae_decoder": "vae"}


def graph_modules(modules: dict, scaling_factor: float) -> dict:
    """name -> eval-mode module implementing that graph of GRAPHS, for the components in `modules`."""
    make = {
        "text_encoder": lambda: TextEncoder(modules["text_encoder"]),
        "vae_encoder": lambda: VaeEncoder(modules["vae"], scaling_factor),
        "hyper_encoder": lambda: HyperEncoderGraph(modules["hyper_enc"]),
        "local_features": lambda: LocalFeatures(modules["hyper_enc"]),
        "denoiser": lambda: Denoiser(modules["unet"]),
        "vae_decoder": lambda: VaeDecoder(modules["vae"], scaling_factor),
    }
    assert set(make) == set(GRAPHS) == set(GRAPH_COMPONENT)
    return {name: make[name]().eval() for name in GRAPHS if GRAPH_COMPONENT[name] in modules}


# --- export contract: symbols -> sizes -----------------------------------------------------


@dataclass(frozen=True)
class Profile:
    """(min, opt, max) of the batch and of the padded image height and width in pixels."""

    batch: tuple = (1, 1, 4)
    height: tuple = (64, 512, 1024)
    width: tuple = (64, 512, 1024)

    def to_dict(self) -> dict:
        return {"batch": list(self.batch), "height": list(self.height), "width": list(self.width)}


def graph_constants(configs: dict) -> dict:
    """The fixed shape symbols of a model: D (text width) and M (local-feature channels)."""
    return {"D": int(configs["text_encoder"]["hidden_size"]), "M": int(configs["hyper_enc"]["M"])}


def symbol_sizes(profile: Profile, token_stride: int, constants: dict, latent_factor: int) -> dict:
    """Each shape symbol -> (min, opt, max). `constants` gives the model's fixed symbols (D, M, ...);
    `latent_factor` is its family's image pixels per latent pixel."""
    sizes = {
        "B": profile.batch,
        # the denoiser: 2B with guidance (uncond, cond), down to B once guidance stops (cond only)
        "2B": (profile.batch[0], 2 * profile.batch[1], 2 * profile.batch[2]),
        "H": profile.height,
        "W": profile.width,
        "h": tuple(v // latent_factor for v in profile.height),
        "w": tuple(v // latent_factor for v in profile.width),
        "gh": tuple(v // token_stride for v in profile.height),
        "gw": tuple(v // token_stride for v in profile.width),
    }
    sizes.update({k: (v, v, v) for k, v in constants.items()})
    return sizes


_DYNAMIC = {"B", "2B", "H", "W", "h", "w", "gh", "gw"}  # every other symbol is a model constant


def _dims(shape: str) -> list:
    return shape.split(",")


def dynamic_axes(graph: str, contract: dict = GRAPHS) -> dict:
    """ONNX dynamic axes: every symbolic dimension of contract[graph] (dim_param = the symbol)."""
    axes = {}
    for name, _, shape in contract[graph].inputs + contract[graph].outputs:
        dynamic = {i: ("B2" if d == "2B" else d) for i, d in enumerate(_dims(shape)) if d in _DYNAMIC}
        if dynamic:
            axes[name] = dynamic
    return axes



def io_shapes(graph: str, sizes: dict, contract: dict = GRAPHS) -> dict:
    """name -> {"min": [...], "opt": [...], "max": [...]} for inputs and outputs."""
    out = {}
    for name, _, shape in contract[graph].inputs + contract[graph].outputs:
        dims = [sizes[d] if d in sizes else (int(d),) * 3 for d in _dims(shape)]
        out[name] = {k: [d[i] for d in dims] for i, k in enumerate(("min", "opt", "max"))}
    return out


def sample_inputs(graph: str, sizes: dict, vocab_size: int, codebook_size: int, seed: int = 0,
                  contract: dict = GRAPHS) -> tuple:
    """Seeded inputs at the opt shape, in the contract's input order."""
    g = torch.Generator().manual_seed(seed)
    tensors = []
    for name, dtype, shape in contract[graph].inputs:
        dims = [sizes[d][1] if d in sizes else int(d) for d in _dims(shape)]
        if name.startswith("input_ids"):
            tensors.append(torch.randint(0, vocab_size, dims, generator=g))
        elif name == "indices":
            tensors.append(torch.randint(0, codebook_size, dims, generator=g))
        elif name == "timestep":
            tensors.append(torch.randint(1, 1000, dims, generator=g).float())
        else:
            tensors.append(torch.randn(dims, generator=g))
    return tuple(tensors)


# --- every family -------------------------------------------------------------------------------


def component_groups(info) -> list:
    """The components of a model folder to load together, one group at a time (a graph may need two:
    PerCoV2's CLIPs), with the optional text encoder where the folder has it."""
    if info.family.name == "percov2":
        groups = [("text_encoder", "text_encoder_2"), ("vae",), ("hyper_enc",), ("transformer",)]
        return groups + ([(info.optional_text.component,)] if info.optional_text else [])
    return [("text_encoder",), ("vae",), ("hyper_enc",), ("unet",)]


def graph_vocab_size(info, graph: str) -> int:
    """The vocabulary the token-id inputs of `graph` index (the optional text encoder has its own)."""
    if info.optional_text and graph == info.optional_text.component:
        return int(info.configs[graph]["vocab_size"])
    return info.tokens.vocab_size


def model_graphs(info, components=None) -> dict:
    """graph -> eval-mode module for a model folder of any family, for `components` (default: all)."""
    if info.family.name == "percov2":
        from perco.export.models import percov2

        return percov2.graph_modules(percov2.load_model(info, tuple(components or percov2.components_of(info))), info)
    from perco.export.models.perco_sd import load_model

    names = tuple(components or ("unet", "vae", "text_encoder", "hyper_enc"))
    return graph_modules(load_model(info, names), info.scaling_factor)


def model_constants(info) -> dict:
    """The fixed shape symbols of a model folder's graphs."""
    if info.family.name == "percov2":
        from perco.export.models.percov2 import graph_constants as percov2_constants

        return percov2_constants(info.configs)
    return graph_constants(info.configs)
