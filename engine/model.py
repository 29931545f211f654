"""A model folder as the runtime sees it: configs, geometry and fingerprint. No torch.

The folder is the released diffusers pipeline layout of its family (see docs/architecture.md), e.g.
model_index.json, unet/, vae/, text_encoder/, tokenizer/, scheduler/, hyper_enc/ for PerCo (SD).
"""

import hashlib
import json
import math
import os
import struct
from dataclasses import asdict, dataclass
from functools import cached_property
from pathlib import Path
from typing import Optional

from perco.engine import families
from perco.engine.bitstream import StreamSpec
from perco.engine.errors import ModelError
from perco.engine.families.perco_sd import PERCO_SD
from perco.engine.limits import SD21_SIZES, NetworkSizes  # noqa: F401 (SD21_SIZES: re-exported)
from perco.engine.sampling import schedule_from_config
from perco.engine.text import TokenLayout

REFERENCE_SIDE = PERCO_SD.reference_side  # the token grid side in the config is the grid at 512 x 512 (both families)
MODEL_INDEX = "model_index.json"
SCHEDULER_CONFIG = "scheduler/scheduler_config.json"
TOKENIZER_FILES = ("vocab.json", "merges.txt")


def read_json(path: Path, missing: Optional[str] = None) -> dict:
    """A JSON object from `path`; ModelError (with `missing` if the file is absent) otherwise."""
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ModelError(missing or f"model folder is incomplete: {path} is missing") from None
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot read {path}: {exc}") from None
    if not isinstance(value, dict):
        raise ModelError(f"{path} does not hold a JSON object")
    return value


def safetensors_header(path: Path) -> bytes:
    """The JSON header of a safetensors file (tensor names, dtypes, shapes, offsets)."""
    try:
        with open(path, "rb") as f:
            (size,) = struct.unpack("<Q", f.read(8))
            if size > 100_000_000:
                raise ValueError("header larger than 100 MB")
            header = f.read(size)
    except FileNotFoundError:
        raise ModelError(f"model folder is incomplete: {path} is missing") from None
    except (OSError, struct.error, ValueError) as exc:
        raise ModelError(f"{path} is not a safetensors file: {exc}") from None
    if len(header) != size:
        raise ModelError(f"{path} is truncated")
    return header


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_fields(config: dict, fields: dict, path) -> None:
    """Validate `config` against `fields` (see a family's config_fields); an absent field takes its default, and it is
    not written back (the fingerprint hashes the config as stored)."""
    for key, (kind, low, high, default) in fields.items():
        if key not in config and default is None:
            raise ModelError(f"{path}: required field {key!r} is missing")
        value = config.get(key, default)
        where = f"{path}: field {key!r}"
        if kind == "float":
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
                raise ModelError(f"{where} must be a finite number, got {value!r}")
            values = [value]
        elif kind == "int":
            if not _is_int(value):
                raise ModelError(f"{where} must be an integer, got {value!r}")
            values = [value]
        else:  # "ints" or "int_or_ints"
            if kind == "int_or_ints" and _is_int(value):
                values = [value]
            elif not isinstance(value, list) or not 1 <= len(value) <= 8 or not all(_is_int(v) for v in value):
                raise ModelError(f"{where} must be a list of 1 to 8 integers, got {value!r}")
            else:
                values = value
        if not all(low <= v <= high for v in values):
            raise ModelError(f"{where} = {value!r} is outside {low:g}..{high:g}")


@dataclass(frozen=True)
class RateGeometry:
    grid: int  # token grid side at 512 x 512
    codebook_size: int

    @property
    def nominal_bpp(self) -> float:
        return self.grid**2 * math.log2(self.codebook_size) / REFERENCE_SIDE**2

    @property
    def token_stride(self) -> int:
        """Image pixels per token."""
        return REFERENCE_SIDE // self.grid


@dataclass(frozen=True)
class ModelSpec:
    """What the runtime needs to know about a model: identity, geometry, tokens, sampler config.

    Built from a model folder (`ModelInfo(folder).spec`) or read back from an export manifest,
    so a decoder running exported graphs needs neither the checkpoint nor torch.
    """

    fingerprint: bytes  # 16 bytes
    rate: RateGeometry
    tokens: TokenLayout
    scheduler_config: dict
    pad_multiple: int
    family: str = PERCO_SD.name
    tokenizer_dir: Optional[Path] = None  # compressing captions (and decoding, for a re-tokenizing text encoder)
    sizes: Optional[NetworkSizes] = None  # for the decode size limit; None in exports made before it
    extra_tokens: tuple = ()  # ((text_encoder input, TokenLayout), ...) beyond input_ids (PerCoV2's CLIP-G)
    index_coder: str = "uniform"  # how the token indices are entropy coded (perco.engine.entropy.index_coders)
    optional_text_dir: Optional[Path] = None  # the family's optional text encoder's tokenizer, where the model has it
    entropy_dir: Optional[Path] = None  # the learned index coder's entropy_model/ folder (index_coder "learned")

    @property
    def has_optional_text(self) -> bool:
        return self.optional_text_dir is not None

    def text_input_ids(self, caption_ids) -> dict:
        """The text_encoder inputs for one caption's content ids: input_ids (+ the family's others)."""
        return {"input_ids": self.tokens.input_ids(caption_ids),
                **{name: layout.input_ids(caption_ids) for name, layout in self.extra_tokens}}

    @cached_property
    def schedule(self):
        """The NoiseSchedule or FlowSchedule of the scheduler config (by its `_class_name`)."""
        return schedule_from_config(self.scheduler_config)

    @property
    def family_def(self) -> families.Family:
        return families.get(self.family)

    @property
    def default_steps(self) -> int:
        return self.family_def.default_steps(self.rate.nominal_bpp)

    @property
    def stream_spec(self) -> StreamSpec:
        return StreamSpec(
            fingerprint=self.fingerprint,
            tokens=self.tokens,
            codebook_size=self.rate.codebook_size,
            token_stride=self.rate.token_stride,
            pad_multiple=self.pad_multiple,
            family=self.family,
            index_coder=self.index_coder,
            entropy_dir=self.entropy_dir,
        )

    def describe(self) -> str:
        return (
            f"{self.family} model (token grid {self.rate.grid} at {self.family_def.reference_side}x"
            f"{self.family_def.reference_side}, codebook {self.rate.codebook_size}, "
            f"{self.rate.nominal_bpp:.4f} bpp nominal, fingerprint {self.fingerprint[:4].hex()})"
        )

    def to_dict(self) -> dict:
        return {
            "family": self.family,
            "fingerprint": self.fingerprint.hex(),
            "grid": self.rate.grid,
            "codebook_size": self.rate.codebook_size,
            "tokens": asdict(self.tokens),
            "scheduler": self.scheduler_config,
            "pad_multiple": self.pad_multiple,
            **({"sizes": self.sizes.to_dict()} if self.sizes else {}),
            **({"extra_tokens": {name: asdict(t) for name, t in self.extra_tokens}} if self.extra_tokens else {}),
            **({"index_coder": self.index_coder} if self.index_coder != "uniform" else {}),
            **({"optional_text": True} if self.has_optional_text else {}),
        }

    @classmethod
    def from_dict(cls, d: dict, tokenizer_dir: Optional[Path] = None,
                  entropy_dir: Optional[Path] = None) -> "ModelSpec":
        """A spec from its `to_dict`; an exported folder's `tokenizer_dir` also holds the optional text
        encoder's tokenizer, in a subfolder of its name, and `entropy_dir` is its entropy model's copy."""
        try:
            spec = cls(
                fingerprint=bytes.fromhex(d["fingerprint"]),
                rate=RateGeometry(int(d["grid"]), int(d["codebook_size"])),
                tokens=TokenLayout(**{k: int(v) for k, v in d["tokens"].items()}),
                scheduler_config=dict(d["scheduler"]),
                pad_multiple=int(d["pad_multiple"]),
                family=str(d["family"]),
                tokenizer_dir=tokenizer_dir,
                sizes=NetworkSizes.from_dict(d["sizes"]) if "sizes" in d else None,
                extra_tokens=tuple((str(name), TokenLayout(**{k: int(v) for k, v in t.items()}))
                                   for name, t in (d.get("extra_tokens") or {}).items()),
                index_coder=str(d.get("index_coder", "uniform")),
                optional_text_dir=_optional_text_dir(d, tokenizer_dir),
                entropy_dir=Path(entropy_dir) if entropy_dir is not None else None,
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ModelError(f"model description is malformed: {exc!r}") from None
        spec.family_def  # an unknown family, and
        spec.schedule  # an unsupported scheduler, are refused now, not at the first decode
        return spec


def _optional_text_dir(d: dict, tokenizer_dir: Optional[Path]) -> Optional[Path]:
    if not d.get("optional_text"):
        return None
    optional = families.get(str(d["family"])).optional_text
    if optional is None:
        raise ValueError(f"family {d['family']} has no optional text encoder")
    if tokenizer_dir is None:
        raise ValueError(f"the model runs {optional.component}, but no tokenizer folder came with it")
    return Path(tokenizer_dir) / optional.tokenizer


class ModelInfo:
    """A model folder read without torch: file checks, configs, and its `ModelSpec`.

    `ModelInfo.open(folder)` returns one object per folder state, so a command that opens a model
    in several places reads its configs and hashes its fingerprint once.
    """

    _opened: dict = {}  # (real path, file states) -> ModelInfo

    @classmethod
    def open(cls, folder) -> "ModelInfo":
        folder = Path(folder)
        try:
            key = (os.path.realpath(folder), _folder_state(folder))
        except OSError:  # missing or unreadable: let the constructor say what is wrong
            return cls(folder)
        info = cls._opened.get(key)
        if info is None:
            if len(cls._opened) >= 8:
                cls._opened.clear()
            info = cls._opened[key] = cls(folder)
        return info

    def __init__(self, folder):
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise ModelError(f"model folder {self.folder} does not exist")
        self.family = family = _family_of(self.folder)
        for name in family.refused_components:
            if (self.folder / name).is_dir():
                raise ModelError(f"{self.folder / name}: {family.title} runs without this component here (see "
                                 f"docs/percov2.md); remove it, or use a folder without it")
        components = family.components
        self.configs = {name: read_json(self.folder / name / files[0]) for name, files in components.items()}
        for name, (_, weights) in components.items():
            if not (self.folder / name / weights).is_file():
                raise ModelError(f"model folder is incomplete: {self.folder / name / weights} is missing")
        self.scheduler_config = read_json(self.folder / SCHEDULER_CONFIG)
        for _, tokenizer in family.text_inputs:
            for name in TOKENIZER_FILES:
                if not (self.folder / tokenizer / name).is_file():
                    raise ModelError(f"model folder is incomplete: {self.folder / tokenizer / name} is missing")
        for name, fields in family.config_fields.items():
            if name in components:
                check_fields(self.configs[name], fields, self.folder / name / components[name][0])
        hyper = self.configs["hyper_enc"]
        self.rate = RateGeometry(hyper["cfg_ss"], hyper["cfg_cs"])
        if self.rate.grid not in (8, 16, 32, 64):
            raise ModelError(f"{self.folder / 'hyper_enc/config.json'}: cfg_ss (token grid) must be 8, 16, 32 or 64, "
                             f"got {self.rate.grid}")
        kind = type(schedule_from_config(self.scheduler_config)).__name__  # unsupported classes are refused here
        if kind not in family.schedules:
            needs = "a beta schedule (e.g. DDIMScheduler)" if family.schedules == ("NoiseSchedule",) else \
                "a flow-matching schedule (FlowMatchEulerDiscreteScheduler)"
            raise ModelError(f"{self.folder / SCHEDULER_CONFIG}: {family.title} is a "
                             f"{'diffusion' if 'NoiseSchedule' in family.schedules else 'flow-matching'} model and "
                             f"needs {needs}, not {self.scheduler_config.get('_class_name')}")
        self.optional_text = self._read_optional_text()
        self.entropy_model = self._read_entropy_model()
        self.tokens = TokenLayout.from_tokenizer_dir(self.folder / "tokenizer")
        self.extra_tokens = tuple((name, TokenLayout.from_tokenizer_dir(self.folder / tokenizer))
                                  for name, tokenizer in family.text_inputs[1:])
        self.scaling_factor = float(self.configs["vae"].get("scaling_factor", 0.18215))
        self.shift_factor = float(self.configs["vae"].get("shift_factor") or 0.0)

    def _read_optional_text(self):
        """The family's optional text encoder if the folder has it (its config joins `configs`), else None."""
        optional = self.family.optional_text
        if optional is None or not (self.folder / optional.component).is_dir():
            return None
        folder = self.folder / optional.component
        config_file, weights = optional.files
        self.configs[optional.component] = config = read_json(folder / config_file)
        if not (folder / weights).is_file() and not (folder / f"{weights}.index.json").is_file():
            raise ModelError(f"model folder is incomplete: {folder / weights} (or its sharded index) is missing")
        check_fields(config, self.family.config_fields[optional.component], folder / config_file)
        width, (component, field) = optional.width
        if config[width] != self.configs[component][field]:
            raise ModelError(f"{folder / config_file}: {width} is {config[width]}, but the {component}'s {field} is "
                             f"{self.configs[component][field]}; they must be equal")
        if not (self.folder / optional.tokenizer / "tokenizer.json").is_file():
            raise ModelError(f"{self.folder / optional.tokenizer / 'tokenizer.json'} is missing; {optional.component} "
                             f"needs its fast tokenizer file (transformers writes it: "
                             f"AutoTokenizer.from_pretrained(folder).save_pretrained(folder))")
        return optional

    def _read_entropy_model(self):
        """The learned entropy model of entropy_model/ if the folder has one (it codes the indices), else None."""
        from perco.engine.entropy.learned import FOLDER, load_entropy_model

        if not (self.folder / FOLDER).exists():
            return None
        model = load_entropy_model(self.folder / FOLDER)
        if model.config.codebook_size != self.rate.codebook_size:
            raise ModelError(f"{self.folder / FOLDER}: the entropy model is for a codebook of "
                             f"{model.config.codebook_size}, hyper_enc's has {self.rate.codebook_size}; retrain it "
                             f"(perco train-entropy) or remove it")
        return model

    @cached_property
    def optional_text_digest(self) -> Optional[str]:
        """A hash of the optional text encoder (config, tensor layout, tokenizer), or None without one.

        Not part of the fingerprint: the bitstream does not depend on it (a file decodes with or without
        T5, as with another step count), but exported graphs do.
        """
        if self.optional_text is None:
            return None
        optional = self.optional_text
        h = hashlib.blake2b(digest_size=16)
        h.update(json.dumps(self.configs[optional.component], sort_keys=True).encode())
        for path in weights_files(self.folder / optional.component / optional.files[1]):
            h.update(safetensors_header(path))
        h.update((self.folder / optional.tokenizer / "tokenizer.json").read_bytes())
        return h.hexdigest()

    @property
    def pad_multiple(self) -> int:
        """Images are padded to a multiple of this: the token stride and the denoiser's downsampling."""
        return self.family.pad_multiple(self.configs, self.rate.token_stride)

    @cached_property
    def fingerprint(self) -> bytes:
        """16-byte BLAKE2b over what decoding depends on (configs, tensor layouts, hyper-encoder weights).

        It reads only safetensors headers plus the small hyper-encoder file, so it is cheap even
        for full-size checkpoints, yet separates rates and differently trained checkpoints
        (their codebooks differ). The bitstream stores its first 4 bytes.
        """
        h = hashlib.blake2b(digest_size=16)
        h.update(self.family.name.encode())

        def canonical(config: dict) -> bytes:
            kept = {k: v for k, v in config.items() if not k.startswith("_") and k != "transformers_version"}
            return json.dumps(kept, sort_keys=True, separators=(",", ":")).encode()

        for name, (_, weights) in sorted(self.family.components.items()):
            h.update(name.encode())
            h.update(canonical(self.configs[name]))
            h.update(safetensors_header(self.folder / name / weights))
        h.update(canonical(self.scheduler_config))
        for t in (self.tokens, *(layout for _, layout in self.extra_tokens)):
            h.update(struct.pack("<5q", t.vocab_size, t.bos_id, t.eos_id, t.pad_id, t.max_length))
        h.update((self.folder / "hyper_enc" / self.family.components["hyper_enc"][1]).read_bytes())
        if self.entropy_model is not None:  # absent: the fingerprints of models without one are unchanged
            config = self.entropy_model.config
            h.update(b"entropy_model" + json.dumps(config.to_dict(), sort_keys=True).encode())
            h.update(bytes.fromhex(self.entropy_model.net.weights_digest()))
        return h.digest()

    @cached_property
    def spec(self) -> ModelSpec:
        return ModelSpec(
            fingerprint=self.fingerprint,
            rate=self.rate,
            tokens=self.tokens,
            scheduler_config=self.scheduler_config,
            pad_multiple=self.pad_multiple,
            family=self.family.name,
            tokenizer_dir=self.folder / "tokenizer",
            sizes=self.family.network_sizes(self.configs, self._weights_bytes()),
            extra_tokens=self.extra_tokens,
            optional_text_dir=self.folder / self.optional_text.tokenizer if self.optional_text else None,
            index_coder="learned" if self.entropy_model is not None else "uniform",
            entropy_dir=self.folder / "entropy_model" if self.entropy_model is not None else None,
        )

    @property
    def stream_spec(self) -> StreamSpec:
        return self.spec.stream_spec

    def _weights_bytes(self) -> int:
        """Bytes of every weights file the decoder loads, the optional text encoder's included."""
        files = [self.folder / name / weights for name, (_, weights) in self.family.components.items()]
        if self.optional_text:
            files += weights_files(self.folder / self.optional_text.component / self.optional_text.files[1])
        return sum(f.stat().st_size for f in files)


def weights_files(path: Path) -> list:
    """A weights file, or the shards its `.index.json` names (as transformers saves large models)."""
    if path.is_file():
        return [path]
    index = read_json(path.parent / f"{path.name}.index.json")
    shards = sorted(set((index.get("weight_map") or {}).values()))
    if not shards or any("/" in s or "\\" in s or s.startswith(".") for s in shards):
        raise ModelError(f"{path.parent / (path.name + '.index.json')}: no usable weight_map")
    return [path.parent / s for s in shards]


def _family_of(folder: Path) -> families.Family:
    """The family model_index.json names (a folder without one is PerCo (SD), as its first releases)."""
    index = folder / MODEL_INDEX
    pipeline = read_json(index).get("_class_name") if index.is_file() else None
    return families.for_pipeline(pipeline)


def _folder_state(folder: Path) -> tuple:
    """(name, size, mtime) of every file a ModelInfo reads: a changed file is a new state."""
    family = _family_of(folder)
    files = [f"{name}/{f}" for name, pair in family.components.items() for f in pair]
    files += [SCHEDULER_CONFIG] + [f"{tok}/{f}" for _, tok in family.text_inputs for f in TOKENIZER_FILES]
    if (folder / "entropy_model").is_dir():
        files += [f"entropy_model/{f}" for f in sorted(os.listdir(folder / "entropy_model"))]
    optional = family.optional_text
    if optional and (folder / optional.component).is_dir():
        files += [f"{optional.component}/{f}" for f in os.listdir(folder / optional.component)]
        files += [f"{optional.tokenizer}/{f}" for f in os.listdir(folder / optional.tokenizer)]
    state = tuple((f, st.st_size, st.st_mtime_ns) for f in files for st in [os.stat(folder / f)])
    index = folder / MODEL_INDEX
    return state + ((MODEL_INDEX, index.stat().st_mtime_ns) if index.is_file() else ())
