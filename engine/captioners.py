"""Captioners: image -> caption, the encoder's source of global semantics when no --caption is given.

A captioner is registered under the `perco.captioners` entry point group as a factory
`make(model_dir) -> Captioner`; `perco compress --captioner NAME --captioner-model DIR` opens it. The
runtime ships none (every captioner worth using is a torch network): the torch side registers `blip2`
(BLIP-2 through transformers, as the PerCo (SD) research code captions). docs/captioners.md shows how
to add another (e.g. Molmo, which PerCoV2 uses).
"""

import sys
import time
from typing import List, Protocol

import numpy as np

from perco.engine import plugins

GROUP = "perco.captioners"


class Captioner(Protocol):
    name: str

    def __call__(self, images: List[np.ndarray]) -> List[str]:
        """uint8 [H, W, 3] images -> one caption each (batched where the captioner can)."""
        raise NotImplementedError


def available() -> list:
    return plugins.names(GROUP)


def open_captioner(name: str, model_dir) -> Captioner:
    """The captioner `name` loaded from `model_dir` (a folder the user gives: nothing is downloaded)."""
    from perco.engine.errors import PercoError

    if name not in available():
        known = ", ".join(available()) or "none installed"
        raise PercoError(f"unknown captioner {name!r} (installed: {known})")
    if model_dir is None:
        raise PercoError(f"--captioner {name} needs --captioner-model DIR (its weights; nothing is downloaded)")
    return plugins.load(GROUP, name, f"captioner {name!r}")(model_dir)


def caption_for(args, image, default: str = "") -> tuple:
    """(caption, seconds spent captioning): --caption, else the --captioner's, else `default` (with a warning
    when that is empty: PerCo's global context is the caption)."""
    if getattr(args, "caption", None) is not None:
        return args.caption, 0.0
    if args.captioner:
        captioner = open_captioner(args.captioner, args.captioner_model)  # loading is not captioning time
        start = time.perf_counter()
        caption = captioner([image])[0]
        return caption, time.perf_counter() - start
    if not default and not args.quiet:
        print("warning: no --caption and no --captioner: the caption is empty, so the decoder has no global "
              "context (see 'perco compress --help')", file=sys.stderr)
    return default, 0.0
