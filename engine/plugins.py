"""Extensions found through package entry points, so the runtime never imports the torch side.

`perco.engine` runs without torch; what needs torch (the reference backend, writing tiny models,
ONNX export, engine builds and the verbs around them) lives in the package's torch side, which
registers itself under these entry point groups in `pyproject.toml`:

    perco.backends   name -> open_backend(model_dir, artifacts, progress)    e.g. torch
    perco.commands   name -> add_commands(subparsers) -> {verb: handler}      the torch-side verbs
    perco.hooks      init_tiny, export_into_cache, build_into_cache           first-use helpers

The runtime looks them up by group and name and imports them only when asked for; it names no
module of the torch side itself (a test checks this), so another package can register its own.
"""

from importlib.metadata import entry_points
from typing import Optional

from perco.engine.errors import ExtensionError

EXPORT_EXTRA = "pip install 'perco-engine[export]'"

def names(group: str) -> list:
    return sorted({ep.name for ep in entry_points(group=group)})


def load(group: str, name: str, needed_for: str, install: str = EXPORT_EXTRA):
    """The object registered as `name` in `group`, imported now; ExtensionError saying what to install."""
    entry = next((ep for ep in entry_points(group=group) if ep.name == name), None)
    if entry is None:
        raise ExtensionError(f"{needed_for} needs an extension that is not installed ({group}:{name}): {install}")
    try:
        return entry.load()
    except ImportError as exc:
        missing = exc.name or str(exc)
        raise ExtensionError(f"{needed_for} needs {missing}: {install}") from None


def find(group: str, name: str) -> Optional[object]:
    """Like `load`, but None when the extension is absent (for optional additions such as CLI verbs)."""
    try:
        return load(group, name, name)
    except ExtensionError:
        return None
