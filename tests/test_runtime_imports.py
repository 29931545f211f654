"""The runtime must not import torch (nor diffusers/transformers) at import time."""

import subprocess
import sys

BLOCKER = """
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in ('torch', 'diffusers', 'transformers'):
            raise ImportError('blocked: ' + name)
sys.meta_path.insert(0, Block())
"""


def test_engine_imports_without_torch():
    code = BLOCKER + (
        "import perco.engine, perco.engine.cli, perco.engine.codec, perco.engine.bitstream, perco.engine.demo\n"
        "from perco.engine.cli import build_parser; build_parser()\n"
        "print('ok')\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr


def test_torch_backend_without_torch_is_a_clear_error(tmp_path):
    code = BLOCKER + (
        "from perco.engine.cli import main\n"
        f"raise SystemExit(main(['init-tiny', {str(tmp_path / 'm')!r}]))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1 and "pip install 'perco-engine[export]'" in proc.stderr, proc.stderr


def test_engine_names_no_module_of_the_torch_side():
    """engine/ names nothing of perco.export or perco.benchmarks, not in an import (even a lazy one), a
    string handed to importlib, or a comment: the torch side reaches the runtime only through entry
    points (perco.engine.plugins), so the runtime stands alone."""
    import re
    from pathlib import Path

    import perco.engine

    torch_side = re.compile(r"perco\.(export|benchmarks)\b|\b(export|benchmarks)/")
    found = [f"{path.name}:{i}: {line.strip()}"
             for path in sorted(Path(perco.engine.__file__).parent.rglob("*.py"))
             for i, line in enumerate(path.read_text().splitlines(), 1) if torch_side.search(line)]
    assert found == []


def test_torch_side_registers_through_entry_points():
    from perco.engine import plugins
    from perco.engine.backends import available

    assert "torch" in available() and "torch" in plugins.names("perco.backends")
    assert {"init_tiny", "export_into_cache", "build_into_cache"} <= set(plugins.names("perco.hooks"))
    from perco.engine.cli import build_parser

    assert {"init-tiny", "export", "check", "build", "quantize", "bench"} <= set(build_parser().handlers)


def test_every_package_is_installed():
    """A fresh, non-editable install ships every package folder (a missing entry only fails there)."""
    from pathlib import Path

    try:
        import tomllib
    except ImportError:  # Python 3.10
        import pytest

        pytest.skip("tomllib needs Python 3.11")
    root = Path(__file__).parent.parent
    setup = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(setup["packages"])
    for package, folder in setup["package-dir"].items():
        for init in (root / folder).rglob("__init__.py"):
            rel = init.parent.relative_to(root / folder).parts
            assert ".".join((package, *rel)) in listed, f"{init.parent} is not in pyproject.toml's packages"
