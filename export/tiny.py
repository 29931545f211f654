"""`perco init-tiny`: tiny (or full-size) seeded random models in the released folder layout."""

import os
import shutil
import tempfile
from pathlib import Path

from perco.engine.demo import DEMO_RATE, DEMO_SEED
from perco.engine.errors import ModelError, PercoError
from perco.engine import families


def init_tiny(folder, rate: str = DEMO_RATE, seed: int = DEMO_SEED, tokenizer=None, full_size: bool = False,
              family: str = "perco-sd", t5: bool = False) -> Path:
    """Write a tiny (or full-size) random model of `family` to `folder` atomically (a temporary sibling,
    then a rename); `t5` adds PerCoV2's optional T5 text encoder."""
    presets, write_model_folder = _family_writer(family)
    if t5 and families.get(family).optional_text is None:
        raise PercoError(f"--t5: {families.get(family).title} has no optional T5 text encoder (percov2 has)")
    folder = Path(folder)
    if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
        raise PercoError(f"{folder} already exists and is not an empty folder")
    if tokenizer is not None and not Path(tokenizer).is_dir():
        raise ModelError(f"tokenizer folder {tokenizer} does not exist")
    key = rate_key(rate, families.get(family))
    config = presets[key if full_size else f"tiny-{key}"]
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        write_model_folder(config, tmp, seed=seed, tokenizer_dir=tokenizer, **({"t5": True} if t5 else {}))
        if folder.exists():
            folder.rmdir()
        os.replace(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


def rate_key(rate, family) -> str:
    """Normalise '0.0313', 0.0313, '.0313' -> '0.0313'; an error naming the family's rates otherwise."""
    try:
        key = f"{float(rate):.4f}"
    except (TypeError, ValueError):
        key = None
    if key not in family.rates:
        raise ModelError(f"unknown rate {rate!r}; {family.title} rates are {', '.join(family.rates)}")
    return key


def _family_writer(family: str):
    families.get(family)  # an unknown family is a ModelError naming the known ones
    if family == "percov2":
        from perco.export.models.percov2 import PRESETS, write_model_folder
    else:
        from perco.export.models.perco_sd import PRESETS, write_model_folder
    return PRESETS, write_model_folder
