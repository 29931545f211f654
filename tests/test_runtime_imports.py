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
