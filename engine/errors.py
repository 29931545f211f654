"""One error hierarchy for everything a user can get wrong.

The CLI turns any `PercoError` into a single `error: ...` line and exit code 1.
Anything else escaping the engine is a bug.
"""


class PercoError(Exception):
    """Base class of every error caused by input (files, flags, models)."""


class BitstreamError(PercoError):
    """The bytes are not a valid bitstream for this model (corrupt, truncated, foreign)."""


class ModelError(PercoError):
    """The model folder is missing, incomplete, or does not match what is expected."""


class ImageError(PercoError):
    """An input image cannot be read, or an output image cannot be written."""


class BackendError(PercoError):
    """A backend is unknown or its optional dependencies are not installed."""
