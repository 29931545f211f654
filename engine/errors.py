"""One error hierarchy for everything a user can get wrong.

The CLI turns any `PercoError` into a single `error: ...` line and its `exit_code`: 2 for a
usage error (a bad flag or flag value), 1 for everything else. Anything else escaping the
engine is a bug (also one line, exit 1; `PERCO_DEBUG=1` shows the traceback).
"""


class PercoError(Exception):
    """Base class of every error caused by input (files, flags, models)."""

    exit_code = 1


class UsageError(PercoError):
    """A flag or argument value is invalid (exit code 2, as for argparse's own errors)."""

    exit_code = 2


class BitstreamError(PercoError):
    """The bytes are not a valid bitstream for this model (corrupt, truncated, foreign)."""


class ModelMismatchError(BitstreamError):
    """A valid bitstream made for another model (family, fingerprint or rate): a server answers 409, not 400."""


class ModelError(PercoError):
    """The model folder is missing, incomplete, or does not match what is expected."""


class ImageError(PercoError):
    """An input image cannot be read, or an output image cannot be written."""


class OutputError(PercoError):
    """An output path cannot be written safely (a folder, a device or special file, no permission)."""


class DecodeLimitError(PercoError):
    """Decoding (or encoding) this image size would exceed the backend's memory or profile limit."""


class BackendError(PercoError):
    """A backend is unknown or its optional dependencies are not installed."""


class ExtensionError(BackendError):
    """Something the command needs lives in an extension (e.g. the export extra) that is not installed."""
