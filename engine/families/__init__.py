"""Model families: everything the runtime knows about one member of the PerCo family.

A `Family` carries its graph contract, its folder layout and the config fields loaded strictly,
its latent geometry, its conditioning recipe (which text graph outputs feed the denoiser), its
sampler kinds and defaults, and its rate presets. The codec, the model reader, the backends and
the export side read these from the model's family; none of them names a network or a scheduler.
Families register by name; a model folder names its family through `model_index.json`.
"""

import math
from dataclasses import dataclass, field
from typing import Callable, Dict, Optional, Tuple

from perco.engine.errors import ModelError
from perco.engine.graphs import GraphContract


@dataclass(frozen=True)
class Family:
    name: str  # as stored in manifests and hashed into fingerprints: "perco-sd"
    title: str  # for people: "PerCo (SD)"
    pipelines: Tuple[str, ...]  # model_index.json _class_name values that mean this family
    graphs: Dict[str, GraphContract]
    components: Dict[str, Tuple[str, str]]  # component folder -> (config file, weights file), all required
    config_fields: Dict[str, dict]  # component -> {field: (kind, low, high, default)}, checked on load
    denoiser: str  # the component whose downsampling sets the padding
    latent_channels: int
    latent_factor: int  # image pixels per latent pixel
    text_outputs: Tuple[str, ...]  # text_encoder outputs that the denoiser takes, (uncond, cond) batched
    schedules: Tuple[str, ...]  # schedule kinds it samples: "NoiseSchedule" and/or "FlowSchedule"
    guidance: float
    steps: Tuple[int, int, float]  # (steps below the rate threshold, steps at or above, threshold in bpp)
    rates: Dict[str, Tuple[int, int]]  # preset rate -> (token grid side at reference_side, codebook size)
    text_inputs: Tuple[Tuple[str, str], ...] = (("input_ids", "tokenizer"),)  # text_encoder input <- tokenizer folder
    refused_components: Tuple[str, ...] = ()  # folders this engine does not run yet: refused, never ignored
    reference_side: int = 512
    network_sizes: Optional[Callable] = field(default=None, compare=False)  # (configs, weights bytes) -> NetworkSizes

    def default_steps(self, nominal_bpp: float) -> int:
        low, high, threshold = self.steps
        return low if nominal_bpp < threshold else high

    def pad_multiple(self, configs: dict, token_stride: int) -> int:
        """Images are padded to a multiple of this: the token stride and the denoiser's downsampling."""
        return math.lcm(token_stride, self.latent_factor * self.downsampling(configs[self.denoiser]))

    def downsampling(self, config: dict) -> int:
        if "patch_size" in config:  # a transformer: latent pixels per patch side
            return int(config["patch_size"])
        return 2 ** (len(config["block_out_channels"]) - 1)  # a UNet: one halving per block but the last


_FAMILIES: Dict[str, Family] = {}


def register(family: Family) -> Family:
    _FAMILIES[family.name] = family
    return family


def get(name: str) -> Family:
    _load_builtin()
    if name not in _FAMILIES:
        raise ModelError(f"unknown model family {name!r}; known: {', '.join(sorted(_FAMILIES))}")
    return _FAMILIES[name]


def names() -> list:
    _load_builtin()
    return sorted(_FAMILIES)


def of_manifest(manifest: dict) -> Family:
    """The family of an export or engines manifest (manifests before families: PerCo (SD))."""
    return get(str((manifest.get("model") or {}).get("family", "perco-sd")))


def for_pipeline(pipeline: Optional[str]) -> Family:
    """The family of a model_index.json `_class_name` (absent: PerCo (SD), as its first releases)."""
    _load_builtin()
    for family in _FAMILIES.values():
        if pipeline is None and family.name == "perco-sd" or pipeline in family.pipelines:
            return family
    raise ModelError(f"model_index.json names pipeline {pipeline!r}, which no family runs (families: "
                     f"{', '.join(f'{f.name}: {f.pipelines[0]}' for f in _FAMILIES.values())})")


def _load_builtin() -> None:
    from perco.engine.families import perco_sd, percov2  # noqa: F401 (imported once; they register themselves)
