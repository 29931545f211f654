"""`perco init-tiny`: tiny (or full-size) seeded random models in the released folder layout."""

import os
import shutil
import tempfile
from pathlib import Path

from perco.engine.demo import DEMO_RATE, DEMO_SEED
from perco.engine.errors import ModelError, PercoError
from perco.export.models.perco_sd import PRESETS, rate_key, write_model_folder


def init_tiny(folder, rate: str = DEMO_RATE, seed: int = DEMO_SEED, tokenizer=None, full_size: bool = False) -> Path:
    """Write a tiny (or full-size) random model to `folder` atomically (a temporary sibling, then a rename)."""
    folder = Path(folder)
    if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
        raise PercoError(f"{folder} already exists and is not an empty folder")
    if tokenizer is not None and not Path(tokenizer).is_dir():
        raise ModelError(f"tokenizer folder {tokenizer} does not exist")
    config = PRESETS[rate_key(rate) if full_size else f"tiny-{rate_key(rate)}"]
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        write_model_folder(config, tmp, seed=seed, tokenizer_dir=tokenizer)
        if folder.exists():
            folder.rmdir()
        os.replace(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder
