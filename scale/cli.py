"""The `perco` verbs of perco.scale, registered through the perco.commands entry point."""


def add_commands(sub) -> dict:
    """Add the scale verbs to the `perco` subparsers; return {verb: handler}."""
    return {}
