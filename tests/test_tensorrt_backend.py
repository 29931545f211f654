"""The TensorRT backend's own logic on a CPU stand-in for TensorRT and CUDA (tests/fake_tensorrt.py),
over engines folders made by a real TensorRT-RTX build; and the real thing where a GPU is present."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from conftest import init_tiny, random_image
from perco.engine import Codec
from perco.engine.errors import BackendError, ModelError, PercoError

pytest.importorskip("tensorrt_rtx", reason="TensorRT-RTX is not installed (pip install tensorrt-rtx)")
from fake_tensorrt import FakeCuda, FakeTrt  # noqa: E402
from perco.engine.backends import tensorrt as trt_backend  # noqa: E402
from perco.export import build as trt_build  # noqa: E402
from perco.export import onnx as onnx_export  # noqa: E402
from perco.export.graphs import Profile  # noqa: E402

PROFILE = Profile(batch=(1, 1, 2), height=(64, 64, 128), width=(64, 64, 128))
QUIET = dict(log=lambda text: None)


def _build(model, folder):
    onnx_export.export_model(model, folder / "art", profile=PROFILE, **QUIET)
    trt_build.build(folder / "art", folder / "eng", "fp32", "tensorrt-rtx", **QUIET)
    return folder / "art", folder / "eng"


@pytest.fixture(scope="module")
def built(tmp_path_factory, tiny_model):
    return _build(tiny_model, tmp_path_factory.mktemp("trt"))


def _backend(engines, cuda=None, refittable=None, **kwargs):
    cuda = cuda or FakeCuda()
    manifest = json.loads((engines / "engines.json").read_text())
    fake = FakeTrt(cuda, manifest["version"])
    fake.register(engines, refittable)
    return trt_backend.TensorRTBackend(engines, trt_backend.read_engines(engines), cuda=cuda, trt=fake, **kwargs), fake


def _codec(engines, **kwargs):  # kwargs: of _backend
    from perco.engine.model import ModelSpec

    backend, _ = _backend(engines, **kwargs)
    manifest = backend.manifest
    return Codec(ModelSpec.from_dict(manifest["model"], tokenizer_dir=engines / manifest["tokenizer"]), backend), backend


def test_decode_matches_onnxruntime_with_one_upload_of_step_constants(built, codec):
    artifacts, engines = built
    data = codec.compress(random_image(64, 96), caption="a red barn")
    reference = Codec.from_pretrained(backend="onnxruntime", artifacts=artifacts).decompress(data, steps=4)
    trt_codec, backend = _codec(engines)
    image = trt_codec.decompress(data, steps=4)
    assert np.array_equal(image, reference)
    cuda = backend.cuda
    # uploads: text 1x + uncond text 1x, local 1x, vae 1; per step sample + timestep, plus text + local once
    assert cuda.uploads == 1 + 1 + 1 + 4 * 2 + 2 + 1
    # the denoiser ran uncaptured once, was captured at step 2 and replayed for steps 2-4
    assert cuda.graphs_made == 1 and cuda.launches == 3
    assert backend.engines["denoiser"].context.executed == 4


def test_same_image_decodes_to_the_same_bytes_twice(built, codec):
    _, engines = built
    data = codec.compress(random_image(64, 64, seed=3))
    trt_codec, _ = _codec(engines)
    assert np.array_equal(trt_codec.decompress(data, steps=3), trt_codec.decompress(data, steps=3))


def test_without_cuda_graphs_the_result_is_the_same(built, codec):
    _, engines = built
    data = codec.compress(random_image(64, 64, seed=4))
    with_graphs, backend = _codec(engines)
    without, plain = _codec(engines, cuda_graphs=False)
    assert np.array_equal(with_graphs.decompress(data, steps=3), without.decompress(data, steps=3))
    assert plain.cuda.launches == 0 and backend.cuda.launches == 2


def test_new_shape_recaptures_and_compress_matches(built, codec):
    _, engines = built
    trt_codec, backend = _codec(engines)
    small, large = random_image(64, 64), random_image(128, 96)
    for image in (small, large):
        assert trt_codec.compress(image, caption="a barn") == codec.compress(image, caption="a barn")
        trt_codec.decompress(codec.compress(image), steps=3)
    assert backend.cuda.graphs_made == 2  # one per latent shape


def test_activation_memory_is_one_shared_buffer(built):
    _, engines = built
    backend, _ = _backend(engines)
    scratch = {e.context.memory for e in backend.engines.values()}
    assert len(scratch) == 1
    address, size = scratch.pop()
    assert size == max(e.engine.device_memory_size_v2 for e in backend.engines.values()) == backend.activation_bytes


def test_outside_the_profile_says_how_to_rebuild(built, codec):
    _, engines = built
    trt_codec, _ = _codec(engines)
    data = codec.compress(random_image(192, 64))  # height 192 > profile max 128
    with pytest.raises(BackendError, match=r"outside the engine's profile .*perco build --batch/--height/--width"):
        trt_codec.decompress(data, steps=2)


def test_switch_keeps_shared_networks_refits_the_unet_and_loads_the_rest(built, codec, tiny_model, tmp_path):
    """Another rate: the VAE and text encoder engines are kept (same keys), the UNet takes the new
    weights in place, the local features (another grid) load their own engine. (Encoder engines
    load at the first compress, so a decoder never holds them.)"""
    _, engines = built
    other_model = init_tiny(tmp_path / "m", "--rate", "0.1250", "--tokenizer", str(codec.model.tokenizer_dir))
    for shared in ("vae", "text_encoder"):  # as in the released checkpoints: SD 2.1's own
        shutil.rmtree(other_model / shared)
        shutil.copytree(tiny_model / shared, other_model / shared)
    other_art, other_eng = _build(other_model, tmp_path)
    trt_codec, backend = _codec(engines, refittable=True)
    backend.trt.register(other_eng, refittable=True)
    before = {name: e.engine for name, e in backend.engines.items()}
    actions = backend.switch(other_eng)
    assert actions == {"text_encoder": "kept", "local_features": "loaded", "denoiser": "refitted", "vae_decoder": "kept"}
    assert backend.engines["denoiser"].engine is before["denoiser"]  # the same engine, new weights
    other_codec = Codec.from_pretrained(other_model, backend="torch")
    data = other_codec.compress(random_image(64, 64), caption="a barn")
    reference = Codec.from_pretrained(backend="onnxruntime", artifacts=other_art).decompress(data, steps=3)
    trt_codec.model = other_codec.model
    assert np.array_equal(trt_codec.decompress(data, steps=3), reference)


def test_not_refittable_engines_load_instead(other_seed_model, built, tmp_path):
    _, engines = built
    _, other = _build(other_seed_model, tmp_path)  # same topology, other weights: every key differs
    backend, _ = _backend(engines)
    backend.trt.register(other)
    assert set(backend.switch(other).values()) == {"loaded"}
    refittable, _ = _backend(engines, refittable=True)
    refittable.trt.register(other)
    assert set(refittable.switch(other).values()) == {"refitted"}


def test_decode_only_engines_decode_and_refuse_to_compress_clearly(built, codec, tmp_path):
    artifacts, _ = built
    trt_build.build(artifacts, tmp_path / "dec", "fp32", "tensorrt-rtx", graphs=list(trt_backend.DECODER_GRAPHS),
                    **QUIET)
    trt_codec, backend = _codec(tmp_path / "dec")
    data = codec.compress(random_image(64, 64), caption="a barn")
    reference = Codec.from_pretrained(backend="onnxruntime", artifacts=artifacts).decompress(data, steps=2)
    assert np.array_equal(trt_codec.decompress(data, steps=2), reference)
    assert set(backend.engines) == set(trt_backend.DECODER_GRAPHS)
    with pytest.raises(ModelError, match="no vae_encoder engine .*decode-only"):
        trt_codec.compress(random_image(64, 64))


def test_bad_engines_folders_give_one_clear_error(built, tmp_path):
    _, engines = built
    with pytest.raises(ModelError, match="holds no engines .*perco build"):
        trt_backend.read_engines(tmp_path)
    broken = tmp_path / "broken"
    shutil.copytree(engines, broken)
    manifest = json.loads((broken / "engines.json").read_text())
    (broken / manifest["graphs"]["denoiser"]["file"]).write_bytes(b"not an engine")
    cuda = FakeCuda()
    fake = FakeTrt(cuda, manifest["version"])
    fake.register(engines)  # knows the intact engines only
    with pytest.raises(ModelError, match="cannot load engine .*denoiser.*not an engine"):
        trt_backend.TensorRTBackend(broken, manifest, cuda=cuda, trt=fake)
    manifest["version"] = "0.0.1"
    (broken / "engines.json").write_text(json.dumps(manifest))
    with pytest.raises(ModelError, match="built with tensorrt-rtx 0.0.1.*rebuild"):
        trt_backend.TensorRTBackend(broken, manifest, cuda=FakeCuda(), trt=FakeTrt(FakeCuda(), "1.0"))


def test_without_a_gpu_the_cli_says_so(built, codec, tmp_path):
    from perco.engine.cli import main

    _, engines = built
    stream = tmp_path / "x.perco"
    stream.write_bytes(codec.compress(random_image(64, 64)))
    out = tmp_path / "x.png"
    code = main(["decompress", str(stream), "-o", str(out), "--backend", "tensorrt", "--artifacts", str(engines)])
    if _has_gpu():
        pytest.skip("a GPU is present: the real-GPU test covers this path")
    assert code == 1 and not out.exists()


def _has_gpu() -> bool:
    try:
        from perco.engine.cuda import open_cuda

        open_cuda()
        return True
    except PercoError:
        return False


@pytest.mark.skipif(not _has_gpu(), reason="needs an NVIDIA GPU with cuda-python (none here)")
def test_real_gpu_decode_matches_onnxruntime(built, codec):
    artifacts, engines = built
    data = codec.compress(random_image(64, 96), caption="a red barn")
    reference = Codec.from_pretrained(backend="onnxruntime", artifacts=artifacts).decompress(data, steps=4)
    image = Codec.from_pretrained(backend="tensorrt", artifacts=engines).decompress(data, steps=4)
    diff = image.astype(np.float64) - reference
    assert 10 * np.log10(255 ** 2 / max(np.mean(diff ** 2), 1e-12)) > 40


def test_info_reads_an_engines_folder(built, codec, tmp_path, capsys):
    from perco.engine.cli import main

    _, engines = built
    stream = tmp_path / "x.perco"
    stream.write_bytes(codec.compress(random_image(64, 64), caption="a red barn"))
    assert main(["info", str(stream), "--artifacts", str(engines), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["caption"] == "a red barn" and info["token_grid"] == [4, 4]


def test_codec_close_releases_device_memory(built, codec):
    _, engines = built
    trt_codec, backend = _codec(engines)
    with trt_codec:
        trt_codec.decompress(codec.compress(random_image(64, 64)), steps=2)
    assert backend.cuda.memory == {}


def test_guidance_stop_recaptures_at_the_new_batch_and_keeps_one_graph(built, codec):
    _, engines = built
    data = codec.compress(random_image(64, 64, seed=5))
    trt_codec, backend = _codec(engines)
    reference, _ = _codec(engines, cuda_graphs=False)
    image = trt_codec.decompress(data, steps=6, guidance_stop=3)
    assert np.array_equal(image, reference.decompress(data, steps=6, guidance_stop=3))
    # 3 guided steps (2B): run, capture, replay; 3 cond-only steps (B): run, capture, replay
    assert backend.cuda.graphs_made == 2 and backend.cuda.launches == 4
    assert len(backend.engines["denoiser"].graphs) == 1


def test_bench_runs_the_tensorrt_backend_beside_onnxruntime(built, tiny_model, tmp_path, monkeypatch):
    """`perco bench` with the TensorRT backend (on the stand-in): the harness's GPU path."""
    from perco.benchmarks.harness import BenchConfig, run

    artifacts, engines = built

    def fake_open(model_dir=None, folder=None, progress=False):
        spec, _ = trt_backend.spec_from_engines(folder)
        return spec, _backend(Path(folder))[0]

    monkeypatch.setattr(trt_backend, "open_backend", fake_open)
    config = BenchConfig(model=str(tiny_model), backends=["onnxruntime", "tensorrt"], sizes=[(64, 64)], steps=[2],
                         batches=[1, 2], throughput_steps=[1], repeats=1, warmup=1, out=str(tmp_path / "b"),
                         artifacts=str(artifacts), engines=str(engines))
    result = run(config, log=lambda text: None)
    assert {r["backend"] for r in result["latency"]} == {"onnxruntime", "tensorrt"}
    assert result["machine"]["gpu"] == "fake GPU" and "tensorrt: fp32" in result["precision"]
    memory = result["device_memory"]["tensorrt"]
    assert 0 < memory["activation_gib"] <= memory["used_gib"]
    assert "device memory" in (tmp_path / "b.md").read_text()
