"""ONNX export and the ONNX Runtime backend: checker, parity with torch, manifest, caching, no torch."""

import json
import subprocess
import sys

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from PIL import Image

from conftest import random_image
from perco.engine import Codec, ModelError, PercoError
from perco.engine.graphs import GRAPHS
from perco.engine.manifest import MANIFEST, read_manifest
from perco.engine.model import ModelInfo
from perco.export import onnx as onnx_export
from perco.export.graphs import Profile
from test_runtime_imports import BLOCKER

PROFILE = Profile(batch=(1, 1, 4), height=(64, 64, 512), width=(64, 128, 768))


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory, tiny_model):
    folder = tmp_path_factory.mktemp("artifacts")
    onnx_export.export_model(tiny_model, folder, profile=PROFILE, log=lambda text: None)
    return folder


@pytest.fixture(scope="module")
def ort_codec(artifacts):
    return Codec.from_pretrained(backend="onnxruntime", artifacts=artifacts)


def test_every_graph_passes_the_checker(artifacts):
    manifest = read_manifest(artifacts, verify=True)
    for name in GRAPHS:
        path = artifacts / manifest["graphs"][name]["file"]
        onnx.checker.check_model(str(path))
        model = onnx.load(str(path))
        assert [i.name for i in model.graph.input] == [n for n, _, _ in GRAPHS[name].inputs]
        assert [o.name for o in model.graph.output] == [n for n, _, _ in GRAPHS[name].outputs]


def test_parity_with_torch_fp32(tiny_model, artifacts):
    report = onnx_export.parity(tiny_model, artifacts)
    assert set(report) == set(GRAPHS)
    for name, result in report.items():
        if "max_rel_error" in result:
            assert result["max_rel_error"] <= 1e-4, (name, result)
        else:
            assert result["mismatch_fraction"] == 0.0, (name, result)


def test_manifest_contents(tiny_model, artifacts):
    manifest = json.loads((artifacts / MANIFEST).read_text())
    info = ModelInfo(tiny_model)
    assert manifest["model"]["fingerprint"] == info.fingerprint.hex()
    assert manifest["opset"] == 18 and manifest["profile"] == PROFILE.to_dict()
    denoiser = manifest["graphs"]["denoiser"]
    assert denoiser["dynamic_axes"]["sample"] == {"0": "B2", "2": "h", "3": "w"}
    # batch from B (guidance stopped: cond only) to 2B (guided)
    assert denoiser["shapes"]["sample"] == {"min": [1, 4, 8, 8], "opt": [2, 4, 8, 16], "max": [8, 4, 64, 96]}
    assert manifest["graphs"]["hyper_encoder"]["shapes"]["indices"]["max"] == [4, 32, 48]  # 16 px per token
    for entry in manifest["graphs"].values():
        assert set(entry["nodes"]) == {"export", "cleanup", "fold_constants", "shape_inference"}
        assert entry["nodes"]["fold_constants"] <= entry["nodes"]["export"]


def test_dynamic_batch_and_size(artifacts):
    manifest = read_manifest(artifacts)
    session = ort.InferenceSession(str(artifacts / manifest["graphs"]["denoiser"]["file"]))
    rng = np.random.default_rng(0)
    for batch, h, w in [(2, 8, 8), (8, 24, 40)]:
        out = session.run(None, {
            "sample": rng.standard_normal((batch, 4, h, w), dtype=np.float32),
            "timestep": np.full(batch, 500, np.float32),
            "text_embeddings": rng.standard_normal((batch, 77, 32), dtype=np.float32),
            "local_features": rng.standard_normal((batch, 16, h, w), dtype=np.float32),
        })[0]
        assert out.shape == (batch, 4, h, w)


@pytest.mark.parametrize("height,width", [(48, 80), (512, 768)])
def test_compress_byte_identical_and_decompress_close(codec, ort_codec, height, width):
    image = random_image(height, width, seed=5)
    data = codec.compress(image, caption="a red barn with a pond in the background", seed=3)
    assert ort_codec.compress(image, caption="a red barn with a pond in the background", seed=3) == data
    ours = ort_codec.decompress(data, steps=3).astype(np.float64)
    reference = codec.decompress(data, steps=3).astype(np.float64)
    mse = ((ours - reference) ** 2).mean()
    assert mse == 0 or 10 * np.log10(255**2 / mse) >= 40


def test_reexport_reuses_and_changed_export_replaces(tiny_model, artifacts, tmp_path):
    messages = []
    before = {p.name: p.stat().st_mtime_ns for p in artifacts.iterdir() if p.suffix == ".onnx"}
    onnx_export.export_model(tiny_model, artifacts, profile=PROFILE, log=messages.append)
    assert "reusing" in messages[0]
    assert before == {p.name: p.stat().st_mtime_ns for p in artifacts.iterdir() if p.suffix == ".onnx"}

    import shutil

    folder = tmp_path / "art"
    shutil.copytree(artifacts, folder)
    onnx_export.export_model(tiny_model, folder, profile=Profile(height=(64, 64, 128), width=(64, 64, 128)),
                             log=lambda text: None)
    names = {p.name for p in folder.iterdir() if p.suffix == ".onnx"}
    assert len(names) == len(GRAPHS) and not names & set(before)  # new key, old files collected


def test_interrupted_export_leaves_a_valid_manifest(tiny_model, artifacts, tmp_path, monkeypatch):
    import shutil

    folder = tmp_path / "art"
    shutil.copytree(artifacts, folder)
    old = read_manifest(folder, verify=True)
    real = onnx_export._export_graph
    calls = []

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(onnx_export, "_export_graph", failing)
    with pytest.raises(KeyboardInterrupt):
        onnx_export.export_model(tiny_model, folder, opset=17, profile=PROFILE, log=lambda text: None)
    assert read_manifest(folder, verify=True) == old  # untouched and every file it names intact


def test_bad_profile(tiny_model, tmp_path):
    with pytest.raises(PercoError, match="multiple of 16"):
        onnx_export.export_model(tiny_model, tmp_path, profile=Profile(height=(40, 64, 128)), log=print)
    with pytest.raises(PercoError, match="min <= opt <= max"):
        onnx_export.export_model(tiny_model, tmp_path, profile=Profile(batch=(2, 1, 4)), log=print)


def test_artifacts_from_another_model_are_refused(other_seed_model, artifacts):
    with pytest.raises(ModelError, match="exported from another model"):
        Codec.from_pretrained(other_seed_model, backend="onnxruntime", artifacts=artifacts)


def test_missing_artifacts(tmp_path):
    with pytest.raises(ModelError, match="run 'perco export'"):
        Codec.from_pretrained(backend="onnxruntime", artifacts=tmp_path)


def test_decompress_with_torch_blocked(codec, artifacts, tmp_path):
    """A full decompress on ONNX Runtime in a process where importing torch fails."""
    stream = tmp_path / "a.perco"
    stream.write_bytes(codec.compress(random_image(64, 96), caption="two parrots"))
    out = tmp_path / "a.png"
    code = BLOCKER + (
        "from perco.engine.cli import main\n"
        f"code = main(['decompress', {str(stream)!r}, '-o', {str(out)!r}, '--backend', 'onnxruntime',"
        f" '--artifacts', {str(artifacts)!r}, '--steps', '2', '-q'])\n"
        "assert 'torch' not in sys.modules\n"
        "raise SystemExit(code)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert Image.open(out).size == (96, 64)


def test_model_only_exports_into_the_cache(tiny_model, tmp_path, monkeypatch):
    monkeypatch.setenv("PERCO_CACHE", str(tmp_path))
    codec = Codec.from_pretrained(tiny_model, backend="onnxruntime")
    assert codec.backend.name == "onnxruntime"
    assert (tmp_path / "artifacts" / ModelInfo(tiny_model).fingerprint.hex() / MANIFEST).is_file()


def test_info_with_artifacts_only(codec, artifacts, tmp_path, capsys):
    from perco.engine.cli import main

    stream = tmp_path / "a.perco"
    stream.write_bytes(codec.compress(random_image(64, 96), caption="two parrots"))
    assert main(["info", str(stream), "--json", "--artifacts", str(artifacts)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["caption"] == "two parrots" and info["token_grid"] == [4, 6]


def test_cli_export_and_check(tiny_model, artifacts, capsys):
    from perco.engine.cli import main

    assert main(["export", "--model", str(tiny_model), "-o", str(artifacts), "--height", "64:64:512",
                 "--width", "64:128:768"]) == 0
    assert "reusing" in capsys.readouterr().err
    assert main(["check", "--model", str(tiny_model), "--artifacts", str(artifacts)]) == 0
    out = capsys.readouterr().out
    assert out.count(" ok") == len(GRAPHS)
    assert main(["export", "--model", str(tiny_model), "-o", str(artifacts), "--height", "64:512"]) == 2
    assert "MIN:OPT:MAX" in capsys.readouterr().err


def test_io_binding_path_matches_plain_runs_and_uploads_step_constants_once(artifacts, codec):
    """The CUDA provider's I/O-binding code, run with host buffers (no GPU here): same pixels, and the
    text embeddings and local features are copied once per decode, not once per step."""
    from perco.engine.backends.onnxruntime import OnnxRuntimeBackend
    from perco.engine.manifest import spec_from_artifacts

    spec, manifest = spec_from_artifacts(artifacts)
    data = codec.compress(random_image(64, 96), caption="a red barn")
    plain = Codec(spec, OnnxRuntimeBackend(artifacts, manifest)).decompress(data, steps=4)
    bound_backend = OnnxRuntimeBackend(artifacts, manifest, io_binding=True)
    bound = Codec(spec, bound_backend).decompress(data, steps=4)
    assert np.array_equal(plain, bound)
    assert bound_backend.uploads == 2  # the [2B] text embeddings and [2B] local features, for all 4 steps
