"""`perco triton-repo`: a Triton model repository from a real TensorRT-RTX engines folder (built on the CPU).

Every config.pbtxt is parsed here against Triton's ModelConfig schema and compared with engines.json; the
decode model (perco_decode/1/model.py) runs on tests/fake_triton.py, a stand-in for Triton's Python-backend
module whose BLS calls run the engines' ONNX graphs on ONNX Runtime. The Triton server itself never runs here.
"""

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import random_image
from perco.engine import Codec
from perco.engine.cli import main
from perco.engine.errors import ExtensionError, ModelError

pytest.importorskip("tensorrt_rtx", reason="TensorRT-RTX is not installed (pip install tensorrt-rtx)")
pytest.importorskip("tritonclient.grpc", reason="the scale extra is not installed")
import fake_triton  # noqa: E402
from google.protobuf import text_format  # noqa: E402
from tritonclient.grpc import model_config_pb2  # noqa: E402

from perco.engine.graphs import GRAPHS  # noqa: E402
from perco.export import build as trt_build  # noqa: E402
from perco.export import onnx as onnx_export  # noqa: E402
from perco.export.graphs import Profile  # noqa: E402
from perco.scale import triton  # noqa: E402

PROFILE = Profile(batch=(1, 1, 2), height=(64, 64, 128), width=(64, 64, 128))
TYPES = {"float32": "TYPE_FP32", "int64": "TYPE_INT64"}


@pytest.fixture(scope="module")
def built(tmp_path_factory, tiny_model):
    folder = tmp_path_factory.mktemp("triton")
    onnx_export.export_model(tiny_model, folder / "art", profile=PROFILE, log=lambda text: None)
    trt_build.build(folder / "art", folder / "eng", "fp32", "tensorrt-rtx", log=lambda text: None)
    return folder / "art", folder / "eng"


@pytest.fixture(scope="module")
def repo(built, tmp_path_factory):
    _, engines = built
    out = tmp_path_factory.mktemp("repos") / "repo"
    assert main(["triton-repo", "--engines", str(engines), "-o", str(out), "-q"]) == 0
    return out


def _parse(path: Path):
    return text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())


def _one_error_line(capsys, match: str) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: ") and match in err, err
    return err


def test_layout_every_config_parses_and_plans_are_the_engines(built, tmp_path, capsys):
    _, engines = built
    out = tmp_path / "repo"
    assert main(["triton-repo", "--engines", str(engines), "-o", str(out)]) == 0
    printed = capsys.readouterr()
    assert "has not run" in printed.out and "TensorRT-RTX" in printed.err  # said plainly, and the flavor caveat
    manifest = json.loads((engines / "engines.json").read_text())
    assert sorted(p.name for p in out.iterdir()) == sorted([*GRAPHS, "perco_decode", "README.txt", "perco_repo.json"])
    for graph, entry in manifest["graphs"].items():
        config = _parse(out / graph / "config.pbtxt")
        assert config.name == graph and config.platform == "tensorrt_plan" and config.backend == "tensorrt"
        plan = out / graph / "1" / "model.plan"
        assert not plan.is_symlink() and plan.read_bytes() == (engines / entry["file"]).read_bytes()
    decode = _parse(out / "perco_decode" / "config.pbtxt")
    assert decode.backend == "python" and decode.max_batch_size == 0
    assert [(t.name, model_config_pb2.DataType.Name(t.data_type), list(t.dims), t.optional) for t in decode.input] == \
        [("BITSTREAM", "TYPE_UINT8", [-1], False), ("STEPS", "TYPE_INT32", [1], True),
         ("GUIDANCE", "TYPE_FP32", [1], True)]
    assert [(t.name, list(t.dims)) for t in decode.output] == [("IMAGE", [-1, -1, 3])]
    model_py = out / "perco_decode" / "1" / "model.py"
    assert model_py.read_text() == Path(triton.__file__).with_name("triton_model.py").read_text()
    assert "has not run" in (out / "README.txt").read_text()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # no temporary folder left


def test_configs_declare_the_engines_tensors_dtypes_dims_and_profile(built, repo):
    _, engines = built
    manifest = json.loads((engines / "engines.json").read_text())
    for graph, entry in manifest["graphs"].items():
        config = _parse(repo / graph / "config.pbtxt")
        shapes = entry["shapes"]
        batch = min(r["max"][0] for r in shapes.values())
        assert config.max_batch_size == batch  # every tensor's first axis is the dynamic batch axis here
        assert [t.name for t in config.input] == [n for n, _, _ in GRAPHS[graph].inputs]
        assert [t.name for t in config.output] == [n for n, _, _ in GRAPHS[graph].outputs]
        for tensor, (name, dtype, _) in zip(config.input, GRAPHS[graph].inputs):
            assert model_config_pb2.DataType.Name(tensor.data_type) == TYPES[dtype]
            shape = list(tensor.reshape.shape) if tensor.HasField("reshape") else list(tensor.dims)
            r = shapes[name]
            assert [-1] + shape == [lo if lo == hi else -1 for lo, hi in zip(r["min"], r["max"])], (graph, name)
        for tensor, (name, dtype, _) in zip(config.output, GRAPHS[graph].outputs):
            assert model_config_pb2.DataType.Name(tensor.data_type) == TYPES[dtype]
        assert [list(g.profile) for g in config.instance_group] == [["0"]]
        assert all(model_config_pb2.ModelInstanceGroup.Kind.Name(g.kind) == "KIND_GPU" for g in config.instance_group)
    denoiser = _parse(repo / "denoiser" / "config.pbtxt")
    assert {t.name: list(t.dims) for t in denoiser.input}["timestep"] == [1]  # [2B] alone: dims [1], reshape []
    text = _parse(repo / "text_encoder" / "config.pbtxt")
    assert list(text.output[0].dims) == [77, 32]  # static width from the ONNX graph the engine was built from


def test_repo_is_self_contained(built, repo, tmp_path, capsys):
    art, engines = built
    for path in repo.rglob("*"):
        assert not path.is_symlink()
        if path.suffix in (".json", ".pbtxt", ".txt", ".py"):
            text = path.read_text()
            assert str(engines) not in text and str(art) not in text and str(tmp_path.parent) not in text, path
    moved = tmp_path / "elsewhere"
    shutil.copytree(repo, moved)
    record = triton.check_repo(moved)
    assert record["server_run"] is False
    assert main(["triton-repo", "--check", str(moved)]) == 0
    assert "valid" in capsys.readouterr().out
    assert "perco_spec/engines.json" in [f"perco_spec/{f}" for f in record["spec"]["files"]]
    assert any(f.startswith("tokenizer-") for f in record["spec"]["files"])


@pytest.fixture
def decode_model(built, repo, monkeypatch):
    _, engines = built
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", fake_triton)
    fake_triton.serve(repo, engines)
    spec = importlib.util.spec_from_file_location("perco_decode_model", repo / "perco_decode" / "1" / "model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    model = module.TritonPythonModel()
    model.initialize(fake_triton.initialize_args(repo, "perco_decode"))
    yield model
    model.finalize()


def _request(data: bytes, **extra):
    tensors = [fake_triton.Tensor("BITSTREAM", np.frombuffer(data, np.uint8))]
    tensors += [fake_triton.Tensor(name, np.array([value], dtype)) for name, (value, dtype) in extra.items()]
    return fake_triton.client_request("perco_decode", tensors)


def test_decode_model_gives_the_image_of_codec_decompress(built, decode_model):
    art, _ = built
    reference = Codec.from_pretrained(backend="onnxruntime", artifacts=art)
    data = reference.compress(random_image(64, 96), caption="a red barn", seed=3)
    other = reference.compress(random_image(80, 64, seed=1), seed=5)
    responses = decode_model.execute([_request(data, STEPS=(3, np.int32)),
                                      _request(b"not a bitstream"),
                                      _request(other, STEPS=(2, np.int32), GUIDANCE=(1.5, np.float32))])
    for r in responses:
        fake_triton.check_response("perco_decode", r)
    image = fake_triton.get_output_tensor_by_name(responses[0], "IMAGE").as_numpy()
    assert image.dtype == np.uint8 and image.shape == (64, 96, 3)
    assert np.array_equal(image, reference.decompress(data, steps=3))
    assert responses[1].has_error() and "bitstream" in responses[1].error().message()
    second = fake_triton.get_output_tensor_by_name(responses[2], "IMAGE").as_numpy()
    assert np.array_equal(second, reference.decompress(other, steps=2, guidance=1.5))
    calls = [name for name, _ in fake_triton.CALLS]
    # per decode: caption + (once per codec) empty caption, local features, one denoiser call per step, VAE
    assert calls.count("denoiser") == 3 + 2 and calls.count("vae_decoder") == 2 and calls.count("local_features") == 2
    assert calls.count("text_encoder") == 2 + 1 and not {"vae_encoder", "hyper_encoder"} & set(calls)
    timestep_shapes = {shapes["timestep"] for name, shapes in fake_triton.CALLS if name == "denoiser"}
    assert timestep_shapes == {(2, 1)}  # [2B] sent as [2B, 1]: the config's reshape drops the 1


def test_decode_model_refuses_bad_steps_per_request(decode_model, built):
    art, _ = built
    data = Codec.from_pretrained(backend="onnxruntime", artifacts=art).compress(random_image(64, 64), seed=1)
    (response,) = decode_model.execute([_request(data, STEPS=(0, np.int32))])
    assert response.has_error() and "STEPS must be in 1..1000" in response.error().message()


def test_the_stand_in_refuses_what_the_configs_do_not_declare(built, repo, monkeypatch):
    _, engines = built
    fake_triton.serve(repo, engines)

    def send(model, **arrays):
        inputs = [fake_triton.Tensor(n, a) for n, a in arrays.items()]
        return fake_triton.InferenceRequest(model, ["model_output"], inputs).exec()

    ok = dict(sample=np.zeros((2, 4, 8, 8), np.float32), timestep=np.zeros((2, 1), np.float32),
              text_embeddings=np.zeros((2, 77, 32), np.float32), local_features=np.zeros((2, 16, 8, 8), np.float32))
    assert not send("denoiser", **ok).has_error()
    for change, message in ((dict(timestep=np.zeros(2, np.float32)), "unexpected shape"),  # no trailing 1
                            (dict(sample=np.zeros((2, 4, 8, 8), np.float64)), "the config declares TYPE_FP32"),
                            (dict(sample=np.zeros((2, 4, 24, 8), np.float32)), "outside the engine's profile"),
                            (dict(text_embeddings=np.zeros((2, 77, 16), np.float32)), "unexpected shape")):
        response = send("denoiser", **{**ok, **change})
        assert response.has_error() and message in response.error().message(), change
    assert "unknown model" in send("unet", **ok).error().message()


def test_not_an_engines_folder_and_non_empty_repo_are_one_line_errors(built, repo, tmp_path, capsys):
    _, engines = built
    assert main(["triton-repo", "--engines", str(tmp_path), "-o", str(tmp_path / "r")]) == 1
    _one_error_line(capsys, "is not an engines folder")
    assert not (tmp_path / "r").exists()
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("mine")
    assert main(["triton-repo", "--engines", str(engines), "-o", str(foreign)]) == 1
    _one_error_line(capsys, "exists and is not empty")
    assert main(["triton-repo", "--engines", str(engines), "-o", str(foreign), "--force"]) == 1
    _one_error_line(capsys, "--force replaces only a repository this command wrote")
    assert sorted(p.name for p in foreign.iterdir()) == ["keep.txt"]
    again = tmp_path / "again"
    shutil.copytree(repo, again)
    (again / "stale.txt").write_text("from before")
    assert main(["triton-repo", "--engines", str(engines), "-o", str(again), "-q"]) == 1
    _one_error_line(capsys, "--force replaces it")
    assert main(["triton-repo", "--engines", str(engines), "-o", str(again), "-q", "--force"]) == 0
    assert not (again / "stale.txt").exists() and triton.check_repo(again)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    assert main(["triton-repo", "--engines", str(engines)]) == 2
    _one_error_line(capsys, "needs --engines DIR and -o REPO")


def _replace(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text, (path, old)
    path.write_text(text.replace(old, new, 1))


@pytest.mark.parametrize("graph,old,new,match", [
    ("denoiser", "data_type: TYPE_FP32", "data_type: TYPE_FP16", "is TYPE_FP16, the engine's is TYPE_FP32"),
    ("denoiser", "dims: [ 77, 32 ]", "dims: [ 77, 64 ]", "has dims [-1, 77, 64]"),
    ("text_encoder", 'name: "input_ids"', 'name: "ids"', "inputs ['ids']"),
    ("vae_decoder", "max_batch_size: 2", "max_batch_size: 8", "max_batch_size 8 does not fit"),
    ("local_features", 'profile: [ "0" ]', 'profile: [ "1" ]', "one optimization profile"),
    ("vae_decoder", "dims: [ 3, -1, -1 ]", "dims: [ 3, -1, -1 ] colour: 1", "not a valid Triton ModelConfig"),
    ("denoiser", "reshape: { shape: [ ] }", "", "has dims [-1, 1]"),
    ("perco_decode", "data_type: TYPE_UINT8", "data_type: TYPE_STRING", "model.py reads TYPE_UINT8"),
])
def test_a_hand_corrupted_config_is_detected(repo, tmp_path, capsys, graph, old, new, match):
    copy = tmp_path / "repo"
    shutil.copytree(repo, copy)
    _replace(copy / graph / "config.pbtxt", old, new)
    with pytest.raises(ModelError, match=match.replace("[", r"\[").replace("(", r"\(")):
        triton.check_repo(copy)
    assert main(["triton-repo", "--check", str(copy)]) == 1
    _one_error_line(capsys, match)


def test_a_changed_engine_file_or_a_symlink_is_detected(repo, tmp_path):
    copy = tmp_path / "repo"
    shutil.copytree(repo, copy)
    plan = copy / "vae_decoder" / "1" / "model.plan"
    data = bytearray(plan.read_bytes())
    data[-1] ^= 1
    plan.write_bytes(bytes(data))
    with pytest.raises(ModelError, match="not the engine engines.json lists"):
        triton.check_repo(copy)
    plan.unlink()
    os.symlink(repo / "vae_decoder" / "1" / "model.plan", plan)
    with pytest.raises(ModelError, match="is a symlink"):
        triton.check_repo(copy)


def _engines_copy(engines: Path, folder: Path, edit) -> Path:
    shutil.copytree(engines, folder, copy_function=os.link)
    manifest = json.loads((folder / "engines.json").read_text())
    edit(manifest)
    (folder / "engines.json").unlink()  # a hard link: never write through it
    (folder / "engines.json").write_text(json.dumps(manifest))
    return folder


def test_without_the_onnx_graphs_the_contract_and_profile_say_it(built, tmp_path):
    _, engines = built

    def forget_graphs(manifest):
        for entry in manifest["graphs"].values():
            entry["onnx"], entry["onnx_path"] = "gone.onnx", str(tmp_path / "gone.onnx")

    folder = _engines_copy(engines, tmp_path / "eng", forget_graphs)
    record = triton.write_repo(folder, tmp_path / "repo", log=lambda text: None)
    assert {m["io_source"] for m in record["models"].values()} == {"graph contract"}
    text = _parse(tmp_path / "repo" / "text_encoder" / "config.pbtxt")
    assert list(text.output[0].dims) == [77, -1]  # the width D is no input's: a wildcard Triton accepts
    denoiser = _parse(tmp_path / "repo" / "denoiser" / "config.pbtxt")
    assert list(denoiser.output[0].dims) == [4, -1, -1]  # channels fixed by the sample input's profile


def test_a_profile_that_contradicts_the_engines_graph_fails_and_writes_nothing(built, tmp_path, capsys):
    _, engines = built

    def narrow(manifest):
        for key in ("min", "opt", "max"):
            manifest["graphs"]["text_encoder"]["shapes"]["input_ids"][key][1] = 76

    folder = _engines_copy(engines, tmp_path / "eng", narrow)
    assert main(["triton-repo", "--engines", str(folder), "-o", str(tmp_path / "repo")]) == 1
    _one_error_line(capsys, "input input_ids axis 1 is 77, the engine's profile fixes it at 76")
    assert not (tmp_path / "repo").exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_without_tritonclient_it_names_the_extra(built, tmp_path, monkeypatch):
    _, engines = built
    monkeypatch.setitem(sys.modules, "tritonclient.grpc", None)
    with pytest.raises(ExtensionError, match=r"pip install 'perco-engine\[scale\]'"):
        triton.write_repo(engines, tmp_path / "repo", log=lambda text: None)
    assert not (tmp_path / "repo").exists()


def test_the_module_imports_neither_tritonclient_nor_torch():
    code = ("import sys, perco.scale.triton, perco.scale.triton_model; "
            "assert not {'tritonclient', 'torch', 'triton_python_backend_utils'} & set(sys.modules), sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)
