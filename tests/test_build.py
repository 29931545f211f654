"""`perco build` with TensorRT-RTX on the CPU: every supported precision builds; cache, plan, errors."""

import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from perco.engine.errors import PercoError
from perco.engine.graphs import GRAPHS
from perco.export import onnx as onnx_export
from perco.export.graphs import Profile

trt = pytest.importorskip("tensorrt_rtx", reason="TensorRT-RTX is not installed (pip install tensorrt-rtx)")
from perco.export import build as trt_build  # noqa: E402

PROFILE = Profile(batch=(1, 1, 2), height=(64, 64, 128), width=(64, 64, 128))


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory, tiny_model):
    folder = tmp_path_factory.mktemp("art")
    onnx_export.export_model(tiny_model, folder, profile=PROFILE, log=lambda text: None)
    return folder


@pytest.fixture(scope="module")
def engines(tmp_path_factory, artifacts):
    folder = tmp_path_factory.mktemp("engines")
    for precision in ("fp32", "fp16", "bf16"):
        trt_build.build(artifacts, folder / precision, precision, "tensorrt-rtx", log=lambda text: None)
    return folder


@pytest.mark.parametrize("precision", ["fp32", "fp16", "bf16"])
def test_every_graph_builds(engines, precision):
    manifest = json.loads((engines / precision / "engines.json").read_text())
    assert manifest["flavor"] == "tensorrt-rtx" and manifest["precision"] == precision
    assert set(manifest["graphs"]) == set(GRAPHS)
    for entry in manifest["graphs"].values():
        assert (engines / precision / entry["file"]).stat().st_size == entry["bytes"] > 0
        if precision != "fp32":  # bf16 keeps 8 significant bits to fp16's 11
            if entry["vs_fp32"]["metric"] == "max_rel_error":  # measured: never exactly the fp32 result
                assert 0 < entry["vs_fp32"]["value"] < {"fp16": 1e-2, "bf16": 5e-2}[precision]
            else:  # indices: a fraction may flip where two codewords are nearly tied
                assert entry["vs_fp32"]["value"] < 0.1


@pytest.mark.parametrize("precision,match", [("int8", "need Q/DQ graphs"), ("fp8", "need Q/DQ graphs")])
def test_unsupported_precisions_say_why(artifacts, tmp_path, precision, match):
    with pytest.raises(PercoError, match=match):
        trt_build.build(artifacts, tmp_path, precision, "tensorrt-rtx", log=lambda text: None)


def test_rebuild_is_cached_and_profile_change_rebuilds(artifacts, engines):
    messages = []
    trt_build.build(artifacts, engines / "fp32", "fp32", "tensorrt-rtx", log=messages.append)
    assert sum("cached" in m for m in messages) == len(GRAPHS)
    before = json.loads((engines / "fp32" / "engines.json").read_text())
    messages.clear()
    trt_build.build(artifacts, engines / "fp32", "fp32", "tensorrt-rtx", overrides={"batch": (1, 2, 2)},
                    log=messages.append)
    after = json.loads((engines / "fp32" / "engines.json").read_text())
    assert not any("cached" in m for m in messages)
    assert after["graphs"]["denoiser"]["shapes"]["sample"]["opt"][0] == 4  # 2B for batch opt 2
    assert after["graphs"]["denoiser"]["key"] != before["graphs"]["denoiser"]["key"]
    engine_files = {p.name for p in (engines / "fp32").glob("*.engine")}
    assert engine_files == {e["file"] for e in after["graphs"].values()}  # old engines removed


def test_keys_depend_on_every_input(artifacts):
    flavor = trt_build.detect_flavor("tensorrt-rtx")
    shapes = {"x": {"min": [1], "opt": [1], "max": [2]}}
    keys = {trt_build.engine_key("a", "fp16", shapes, flavor, ()), trt_build.engine_key("b", "fp16", shapes, flavor, ()),
            trt_build.engine_key("a", "fp32", shapes, flavor, ()), trt_build.engine_key("a", "fp16", shapes, flavor, (89,)),
            trt_build.engine_key("a", "fp16", {"x": {"min": [1], "opt": [2], "max": [2]}}, flavor, ())}
    assert len(keys) == 5


def test_plan_builds_nothing(artifacts, engines, tmp_path):
    rows = trt_build.plan(artifacts, "fp16", "tensorrt-rtx", out=engines / "fp16")
    assert [r["graph"] for r in rows] == list(GRAPHS) and all(r["cached"] for r in rows)
    assert all(r["weights_bytes"] > 0 for r in rows if r["graph"] != "local_features")
    rows = trt_build.plan(artifacts, "int8", "tensorrt-rtx", out=tmp_path)
    assert all("perco quantize" in r["unsupported"] for r in rows) and not any(tmp_path.iterdir())


def test_unparsable_graph_fails_with_the_parsers_message(artifacts, tmp_path):
    import shutil

    folder = tmp_path / "art"
    shutil.copytree(artifacts, folder)
    manifest = json.loads((folder / "manifest.json").read_text())
    entry = manifest["graphs"]["local_features"]
    node = helper.make_node("NoSuchOp", ["indices"], ["local_features"], domain="perco.test")
    graph = helper.make_graph([node], "broken", [helper.make_tensor_value_info("indices", TensorProto.INT64, [1, 2, 2])],
                              [helper.make_tensor_value_info("local_features", TensorProto.FLOAT, [1, 16, 4, 4])])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("perco.test", 1)]),
              str(folder / entry["file"]))
    from perco.engine.manifest import file_sha256

    entry["sha256"][entry["file"]] = file_sha256(folder / entry["file"])
    (folder / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(PercoError, match="cannot parse .*NoSuchOp"):
        trt_build.build(folder, tmp_path / "e", "fp32", "tensorrt-rtx", log=lambda text: None)


def test_cli_build_plan(artifacts, capsys):
    from perco.engine.cli import main

    assert main(["build", "--artifacts", str(artifacts), "-o", "/nonexistent-never-written", "--plan",
                 "--flavor", "tensorrt-rtx"]) == 0
    out = capsys.readouterr().out
    assert out.count("to build") == len(GRAPHS)
    assert main(["build", "--artifacts", str(artifacts), "-o", "x", "--target-cc", "eighty"]) == 1


@pytest.fixture(scope="module")
def int8_artifacts(tmp_path_factory, artifacts):
    from perco.export.quantize import quantize

    folder = tmp_path_factory.mktemp("qart")
    quantize(artifacts, folder, "int8", count=2, log=lambda text: None, size=(96, 64))
    return folder


def test_quantize_writes_complete_validated_artifacts(int8_artifacts):
    from perco.engine.manifest import read_manifest

    manifest = read_manifest(int8_artifacts, verify=True)
    q = manifest["quantization"]
    assert q["precision"] == "int8" and set(q["error_vs_fp32"]) == {"text_encoder", "denoiser"}
    assert q["calibration_size"] == [96, 64]
    for name, err in q["error_vs_fp32"].items():
        assert 0 < err["value"] and 0 < err["rms_rel_error"]  # measured, and not a copy of the FP32 graph
        model = onnx.load(str(int8_artifacts / manifest["graphs"][name]["file"]))
        assert any(n.op_type == "QuantizeLinear" for n in model.graph.node)
    for name in ("hyper_encoder", "vae_decoder"):  # indices must not change; the VAE stays float by default
        assert "quantized" not in manifest["graphs"][name]


def test_boundary_layers_and_attention_products_stay_float(artifacts, int8_artifacts):
    from perco.export.quantize import BOUNDARY_LAYERS, excluded_nodes

    manifest = json.loads((artifacts / "manifest.json").read_text())
    unet = onnx.load(str(artifacts / manifest["graphs"]["denoiser"]["file"]))
    excluded = excluded_nodes(unet)
    for layer in ("/conv_in_extended/", "/unet/conv_out/", "/time_embedding/", "/attn2/to_k/", "/attn2/to_v/"):
        assert any(layer in name for name in excluded), layer  # the export still names them so
    weights = {t.name for t in unet.graph.initializer}
    products = [n.name for n in unet.graph.node if n.op_type == "MatMul" and not set(n.input) & weights]
    assert products and set(products) <= set(excluded)
    block = {n.name for n in unet.graph.node if "/down_blocks.0/" in n.name and n.op_type in ("Conv", "MatMul", "Gemm")}
    assert block and block - set(excluded) and block <= set(excluded_nodes(unet, keep_float=("/down_blocks.0/",)))
    vae = onnx.load(str(artifacts / manifest["graphs"]["vae_decoder"]["file"]))
    assert {b for b in BOUNDARY_LAYERS for n in excluded_nodes(vae) if b in n} == {"/post_quant_conv/",
                                                                                 "/decoder/conv_out/"}
    qmanifest = json.loads((int8_artifacts / "manifest.json").read_text())
    quantized = onnx.load(str(int8_artifacts / qmanifest["graphs"]["denoiser"]["file"]))
    dequantized = {i for n in quantized.graph.node if n.op_type in ("Conv", "MatMul", "Gemm") for i in n.input
                   if "DequantizeLinear" in i}
    conv_in = next(n for n in quantized.graph.node if "/conv_in_extended/" in n.name and n.op_type == "Conv")
    assert dequantized and not set(conv_in.input) & dequantized


def test_int8_engines_build_from_qdq_only(artifacts, int8_artifacts, tmp_path):
    path = trt_build.build(int8_artifacts, tmp_path / "int8", "int8", "tensorrt-rtx", log=lambda text: None)
    manifest = json.loads(path.read_text())
    assert set(manifest["graphs"]) == set(GRAPHS) and manifest["graphs"]["denoiser"]["vs_fp32"]["value"] > 0
    precisions = {name: entry["precision"] for name, entry in manifest["graphs"].items()}
    assert precisions == {"text_encoder": "int8", "denoiser": "int8", "vae_encoder": "fp16", "vae_decoder": "fp16",
                          "hyper_encoder": "fp16", "local_features": "fp16"}
    with pytest.raises(PercoError, match="run 'perco quantize"):
        trt_build.build(artifacts, tmp_path / "bad", "int8", "tensorrt-rtx", log=lambda text: None)


def test_quantized_artifacts_decode_on_onnxruntime(codec, int8_artifacts):
    from conftest import random_image
    from perco.engine import Codec

    data = codec.compress(random_image(64, 64), caption="a barn")
    image = Codec.from_pretrained(backend="onnxruntime", artifacts=int8_artifacts).decompress(data, steps=3)
    reference = codec.decompress(data, steps=3)
    mse = np.mean((image.astype(np.float64) - reference) ** 2)
    psnr = 10 * np.log10(255**2 / mse)
    # INT8 is lossy, so the bound is a floor, not a match. At 64x64, 3 steps, this tiny random model
    # measured 29.98 dB on onnxruntime 1.32.0 and 1.31.1, 30.02 dB on 1.22.1; a broken
    # recipe measures far lower (every graph quantized, boundary layers included: 15.8 dB). 24 dB keeps
    # about 6 dB of margin for kernel changes across onnxruntime versions and still catches that.
    assert image.shape == (64, 64, 3) and 24.0 < psnr < 100.0


def test_fp16_build_with_a_small_vocabulary(tmp_path, builtin_tokenizer_model):
    """Validation inputs stay inside the model's vocabulary (the built-in tokenizer has 852 ids)."""
    onnx_export.export_model(builtin_tokenizer_model, tmp_path / "art", profile=PROFILE, log=lambda text: None)
    path = trt_build.build(tmp_path / "art", tmp_path / "e", "fp16", "tensorrt-rtx", log=lambda text: None,
                           graphs=["text_encoder", "local_features"])
    graphs = json.loads(path.read_text())["graphs"]
    assert graphs["text_encoder"]["vs_fp32"]["value"] < 1e-2
    assert graphs["local_features"]["vs_fp32"]["value"] < 1e-2


def test_refittable_rtx_build_without_a_gpu_says_why(artifacts, tmp_path):
    """Measured with TensorRT-RTX 1.7: the REFIT flag makes its builder JIT-compile, which needs CUDA."""
    from perco.engine.cuda import open_cuda

    try:
        open_cuda()
        pytest.skip("a GPU is present: refittable builds are expected to work here")
    except PercoError:
        pass
    with pytest.raises(PercoError, match="compiles refittable engines on a GPU"):
        trt_build.build(artifacts, tmp_path, "fp32", "tensorrt-rtx", log=lambda text: None,
                        graphs=["local_features"], refittable=True)


def test_bf16_graph_is_strongly_typed_with_weights_rounded_from_fp32(artifacts, engines):
    import numpy as np
    from onnx import TensorProto, numpy_helper

    manifest = json.loads((engines / "bf16" / "engines.json").read_text())
    bf16 = onnx.load(str(engines / "bf16" / manifest["graphs"]["denoiser"]["onnx"]))
    fp32 = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(artifacts / json.loads(
        (artifacts / "manifest.json").read_text())["graphs"]["denoiser"]["file"])).graph.initializer}
    types = {t.data_type for t in bf16.graph.initializer}
    assert TensorProto.BFLOAT16 in types and TensorProto.FLOAT16 not in types
    assert not any(a.name == "to" and a.i == TensorProto.FLOAT16 for n in bf16.graph.node for a in n.attribute)
    weight = next(t for t in bf16.graph.initializer if t.data_type == TensorProto.BFLOAT16 and t.name in fp32)
    assert np.array_equal(np.frombuffer(weight.raw_data, np.uint16),
                          trt_build.bfloat16_bits(fp32[weight.name]).ravel())
    assert {n.op_type for n in bf16.graph.node if n.op_type in trt_build.FP32_OPS}  # kept ops are present


def test_bfloat16_rounding_matches_ml_dtypes():
    import numpy as np

    ml_dtypes = pytest.importorskip("ml_dtypes", reason="ml_dtypes (an onnx dependency) is not installed")
    values = np.concatenate([np.random.default_rng(0).standard_normal(10000).astype(np.float32) * 1e3,
                             np.array([0.0, -0.0, np.inf, -np.inf, 1e-40, 3.4e38, 1.00390625, 1.01171875],
                                      np.float32)])
    expected = values.astype(ml_dtypes.bfloat16).view(np.uint16)
    assert np.array_equal(trt_build.bfloat16_bits(values), expected)
    assert np.isnan(np.array([np.nan], np.float32).astype(ml_dtypes.bfloat16).astype(np.float32)).all()
    nan_bits = trt_build.bfloat16_bits(np.array([np.nan], np.float32))
    assert np.isnan(nan_bits.astype(np.uint32).__lshift__(16).view(np.float32)).all()


def test_precisions_a_target_lacks_are_refused_before_building(artifacts, tmp_path):
    """Measured: TensorRT-RTX itself fails fp8 for sm86 deep in its compiler; we say why up front."""
    with pytest.raises(PercoError, match=r"fp8 needs compute capability 8.9 or newer; target 8.6 lacks it"):
        trt_build.build(artifacts, tmp_path, "fp8", "tensorrt-rtx", target_cc=(86, 89), log=lambda text: None)
    with pytest.raises(PercoError, match=r"bf16 needs compute capability 8.0 .*target 7.5"):
        trt_build.build(artifacts, tmp_path, "bf16", "tensorrt-rtx", target_cc=(75,), log=lambda text: None)
    assert not any(tmp_path.iterdir())
