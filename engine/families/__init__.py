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
class OptionalTextEncoder:
    """A text encoder a model folder may carry, fed the caption re-tokenized by its own tokenizer.

    The bitstream carries the first tokenizer's ids only; the decoder turns them back into text
    (`perco.engine.text.caption_text`) and tokenizes that with this encoder's `tokenizer.json`. Its
    output fills rows `offset:offset + max_length` of the text output `into`; without it those rows
    stay as the text_encoder graph made them (PerCoV2: SD3's zeros in place of T5).
    """

    component: str  # model folder, also the graph name: "text_encoder_3"
    tokenizer: str  # its tokenizer folder: "tokenizer_3"
    files: Tuple[str, str]  # (config file, weights file) in `component`
    contract: GraphContract  # the graph: one int64 input [B, max_length] -> one float32 output
    into: str  # the text output it fills: "text_embeddings"
    offset: int  # the first row of `into` it fills
    max_length: int
    width: Tuple[str, Tuple[str, str]]  # its config's output width field == (component, field) of another config

    @property
    def input(self) -> str:
        return self.contract.inputs[0][0]

    @property
    def output(self) -> str:
        return self.contract.outputs[0][0]


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
    optional_text: Optional[OptionalTextEncoder] = None  # run where the model folder has it (PerCoV2's T5)
    reference_side: int = 512
    network_sizes: Optional[Callable] = field(default=None, compare=False)  # (configs, weights bytes) -> NetworkSizes

    def contract(self, optional_text: bool = False) -> Dict[str, GraphContract]:
        """The graphs a model of this family runs: `graphs`, plus the optional text encoder's if it has one."""
        if not (optional_text and self.optional_text):
            return self.graphs
        return {**self.graphs, self.optional_text.component: self.optional_text.contract}

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


def manifest_contract(manifest: dict) -> Dict[str, GraphContract]:
    """The graphs an export or engines manifest must hold: its family's, plus the optional text encoder's
    where the model has it."""
    return of_manifest(manifest).contract(bool((manifest.get("model") or {}).get("optional_text")))


def runtime_graphs(manifest: dict) -> Dict[str, GraphContract]:
    """What a backend of an export runs: `manifest_contract`, plus the entropy model's graph where it was exported."""
    from perco.engine.graphs import ENTROPY_CONTRACT, ENTROPY_GRAPH

    contract = manifest_contract(manifest)
    if ENTROPY_GRAPH in (manifest.get("graphs") or {}):
        contract = {**contract, ENTROPY_GRAPH: ENTROPY_CONTRACT}
    return contract


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
