"""The one way files and folders are written: atomically, so a failure never leaves half of one.

`atomic_write` writes bytes through a temporary file in the target's folder (flushed, fsynced,
given its permission bits, renamed over the target). `copy_folder` copies named files of a
folder into a temporary sibling, then renames it into place. User-facing outputs add their
checks on top (`perco.engine.imageio.write_output`: symlinks, special files, standard output).
"""

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterable, Optional

# the files of a transformers CLIP tokenizer folder that travel with models, exports and engines
TOKENIZER_COPY = ("vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json")
# a learned entropy model (perco.engine.entropy.learned): an export or engines folder carries a copy
ENTROPY_FILES = ("config.json", "model.safetensors")
# a fast tokenizer (T5's): an exported tokenizer folder holds one per optional text encoder, in a subfolder
FAST_TOKENIZER_COPY = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def tokenizer_files(folder) -> tuple:
    """TOKENIZER_COPY, plus FAST_TOKENIZER_COPY of each subfolder of `folder` that holds a tokenizer.json."""
    folder = Path(folder)
    subs = sorted(p.name for p in folder.iterdir() if (p / "tokenizer.json").is_file()) if folder.is_dir() else []
    return TOKENIZER_COPY + tuple(f"{sub}/{name}" for sub in subs for name in FAST_TOKENIZER_COPY)


def umask() -> int:
    old = os.umask(0)
    os.umask(old)
    return old


def atomic_write(path, data, mode: Optional[int] = None) -> None:
    """Write `data` (bytes-like) to `path` atomically; `mode` defaults to 0o666 & ~umask.

    On any failure the temporary file is removed and `path` is left as it was. Raises OSError.
    """
    path = os.fspath(path)
    folder, name = os.path.dirname(path) or ".", os.path.basename(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~umask() if mode is None else mode)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def atomic_json(path, value) -> None:
    atomic_write(path, (json.dumps(value, indent=1) + "\n").encode("utf-8"))


def copy_folder(source, target, names: Iterable[str] = TOKENIZER_COPY, replace: bool = False) -> Path:
    """Copy the files `names` (paths relative to `source`) that exist in `source` into the folder `target`,
    atomically.

    An existing `target` is kept as it is unless `replace`. Returns `target`.
    """
    source, target = Path(source), Path(target)
    if target.is_dir() and not replace:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        for name in names:
            if (source / name).is_file():
                (tmp / name).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(source / name, tmp / name)
        os.chmod(tmp, 0o777 & ~umask())
        if target.is_dir():
            shutil.rmtree(target)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target
