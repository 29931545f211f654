"""The `perco` verbs of perco.scale, registered through the perco.commands entry point.

Each part module adds its own verbs with `add_commands(subparsers) -> {verb: handler}` and imports
Ray, torch or tritonclient only inside its handlers, so `perco --help` stays fast and works
without the scale extra.
"""

import importlib
import importlib.util

PARTS = ("batch", "evaluate", "serve", "triton")


def add_commands(sub) -> dict:
    """Add the scale verbs to the `perco` subparsers; return {verb: handler}."""
    handlers = {}
    for part in PARTS:
        name = f"perco.scale.{part}"
        if importlib.util.find_spec(name) is not None:  # parts land one by one
            handlers.update(importlib.import_module(name).add_commands(sub))
    return handlers
