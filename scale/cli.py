"""The `perco` verbs of perco.scale, registered through the perco.commands entry point.

Each part adds its verbs with `add_commands(subparsers) -> {verb: handler}` and imports Ray, torch,
torchmetrics or tritonclient only inside its handlers, so `perco --help` stays fast and works
without the scale and eval extras.
"""

from perco.scale import batch, evaluate, serve, triton


def add_commands(sub) -> dict:
    """Add the scale verbs to the `perco` subparsers; return {verb: handler}."""
    handlers = {}
    for part in (batch, evaluate, serve, triton):
        handlers.update(part.add_commands(sub))
    return handlers
