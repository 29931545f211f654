"""PerCoV2 with SD3's optional T5 text encoder (`init-tiny --family percov2 --t5`): a tiny random T5 and a
small built-in T5 tokenizer (T5's own tokenizer files cannot be downloaded here), with the real CLIP
tokenizer for the caption. The decoded pixels are meaningless (random weights); what is checked is that
T5 is run, not ignored, that its ids are exactly what transformers gives SD3, and that torch and ONNX
Runtime agree."""

import json
import shutil

import numpy as np
import pytest

from conftest import CLIP_TOKENIZER, init_tiny
from perco.engine import Codec
from perco.engine.demo import sample_image
from perco.engine.errors import ModelError
from perco.engine.families.percov2 import PERCOV2, T5
from perco.engine.manifest import read_manifest
from perco.engine.model import ModelInfo
from perco.engine.text import Retokenizer, caption_text
from perco.export import onnx as onnx_export
from perco.export.graphs import Profile

CAPTION = "A red barn, on a green hill! Under a blue sky?"
PROFILE = Profile(batch=(1, 1, 2), height=(64, 512, 768), width=(64, 512, 768))

# punctuation, digits, unicode, emoji, whitespace runs, over-long and empty captions
CORPUS = [
    "", " ", "a", "A photo of a Dog, running! It's 3.5 m  tall?", "emoji 🐶🐱 café naïve — “quoted”",
    "don't stop (x) [y] {z} #tag @user 100% $5 & more...", "tab\tand\nnewline  and   spaces",
    "ÉCOLE Ünïcödé ﬁ ligature ① ２", "中文 日本語 한국어", "word " * 300, "x" * 500,
    "a red barn on a green hill under a blue sky", "1 2 3 4 5 6 7 8 9 10 11 12",
] + [f"caption {i}: {'two dogs' if i % 2 else 'three cats'} near the {i * 7} sea, looking up." for i in range(60)]


@pytest.fixture(scope="module")
def t5_model(tmp_path_factory):
    return init_tiny(tmp_path_factory.mktemp("v2t5") / "tiny", "--family", "percov2", "--t5", "--rate", "0.0078",
                     "--tokenizer", str(CLIP_TOKENIZER))


@pytest.fixture(scope="module")
def no_t5_model(tmp_path_factory, t5_model):
    folder = tmp_path_factory.mktemp("v2not5") / "tiny"
    shutil.copytree(t5_model, folder)
    shutil.rmtree(folder / T5.component)
    shutil.rmtree(folder / T5.tokenizer)
    return folder


@pytest.fixture(scope="module")
def t5_artifacts(tmp_path_factory, t5_model):
    folder = tmp_path_factory.mktemp("v2t5-artifacts")
    onnx_export.export_model(t5_model, folder, profile=PROFILE, log=lambda text: None)
    return folder


@pytest.fixture(scope="module")
def codecs(t5_model, t5_artifacts):
    return (Codec.from_pretrained(t5_model, backend="torch"),
            Codec.from_pretrained(backend="onnxruntime", artifacts=t5_artifacts))


def test_folder_has_t5_and_keeps_the_fingerprint(t5_model, no_t5_model):
    info = ModelInfo(t5_model)
    assert info.optional_text is T5 and info.spec.has_optional_text
    index = json.loads((t5_model / "model_index.json").read_text())
    assert index["text_encoder_3"] == ["transformers", "T5EncoderModel"]
    assert info.configs["text_encoder_3"]["d_model"] == info.configs["transformer"]["joint_attention_dim"]
    # the bitstream does not depend on T5 (docs/percov2.md): one file decodes with or without it
    assert ModelInfo(no_t5_model).fingerprint == info.fingerprint and not ModelInfo(no_t5_model).optional_text


def test_t5_graph_is_exported_and_matches_torch(t5_model, t5_artifacts):
    manifest = read_manifest(t5_artifacts, verify=True)
    assert manifest["model"]["optional_text"] is True and T5.component in manifest["graphs"]
    assert (t5_artifacts / manifest["tokenizer"] / T5.tokenizer / "tokenizer.json").is_file()
    report = onnx_export.parity(t5_model, t5_artifacts)
    assert set(report) == set(PERCOV2.graphs) | {T5.component}
    for result in report.values():
        limit = 1e-4 if "max_rel_error" in result else 0
        assert result.get("max_rel_error", result.get("mismatch_fraction")) <= limit


def test_t5_fills_the_rows_sd3_leaves_zero_without_it(codecs, no_t5_model, t5_model):
    torch_codec, _ = codecs
    ids = torch_codec._tokenize(CAPTION)
    with_t5 = torch_codec._encode_text([ids, []])["text_embeddings"]
    without = Codec.from_pretrained(no_t5_model, backend="torch")._encode_text([ids, []])["text_embeddings"]
    np.testing.assert_array_equal(with_t5[:, :77], without[:, :77])  # the CLIP rows are T5's business only
    assert not without[:, 77:].any() and np.abs(with_t5[:, 77:]).min(axis=-1).all()  # every T5 row filled
    t5_ids = Retokenizer(t5_model / T5.tokenizer, T5.max_length)([caption_text(ids, t5_model / "tokenizer"), ""])
    rows = torch_codec.backend.run(T5.component, {T5.input: t5_ids})[T5.output]
    np.testing.assert_array_equal(with_t5[:, 77:], rows)


def test_768x512_photo_on_both_backends_with_t5(codecs, no_t5_model):
    torch_codec, ort_codec = codecs
    image = sample_image(768, 512)
    data = torch_codec.compress(image, caption=CAPTION)
    assert ort_codec.compress(image, caption=CAPTION) == data  # byte-identical across backends
    ours, theirs = torch_codec.decompress(data, steps=3), ort_codec.decompress(data, steps=3)
    assert ours.shape == theirs.shape == (512, 768, 3)
    assert _psnr(ours, theirs) >= 40  # measured 86 dB (768x512, 20 steps, `perco decompress` on both)
    plain = Codec.from_pretrained(no_t5_model, backend="torch").decompress(data, steps=3)
    assert not np.array_equal(plain, ours)  # T5 changed the image: it was run, not ignored


def test_t5_ids_are_transformers_ids(t5_model):
    """What SD3's pipeline calls: tokenizer_3(text, padding="max_length", max_length=256, truncation=True)."""
    transformers = pytest.importorskip("transformers", reason="the reference tokenizer is transformers'")
    reference = transformers.AutoTokenizer.from_pretrained(str(t5_model / T5.tokenizer))
    ours = Retokenizer(t5_model / T5.tokenizer, T5.max_length)(CORPUS)
    theirs = reference(CORPUS, padding="max_length", max_length=T5.max_length, truncation=True)["input_ids"]
    np.testing.assert_array_equal(ours, np.array(theirs))
    assert ours.shape == (len(CORPUS), 256) and (ours[:, -1] == 0).sum() < len(CORPUS)  # some captions fill 256


def test_caption_text_is_clips_own_decode():
    transformers = pytest.importorskip("transformers", reason="the reference tokenizer is transformers'")
    clip = transformers.CLIPTokenizer.from_pretrained(str(CLIP_TOKENIZER))
    for text in CORPUS:
        ids = clip(text, truncation=True, max_length=77)["input_ids"][1:-1]
        expected = clip.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False).strip(" ")
        assert caption_text(ids, CLIP_TOKENIZER) == expected, text
    assert caption_text([], CLIP_TOKENIZER) == "" and caption_text([10**9], CLIP_TOKENIZER) == ""


def _copy(model, tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(model, folder)
    return folder


def test_bad_t5_folders_are_one_clear_error(t5_model, tmp_path):
    folder = _copy(t5_model, tmp_path)
    (folder / T5.tokenizer / "tokenizer.json").unlink()
    with pytest.raises(ModelError, match="tokenizer_3/tokenizer.json is missing"):
        ModelInfo(folder)
    shutil.rmtree(folder / T5.tokenizer)
    with pytest.raises(ModelError, match="tokenizer_3/tokenizer.json is missing"):
        ModelInfo(folder)
    shutil.copytree(t5_model / T5.tokenizer, folder / T5.tokenizer)
    config = json.loads((folder / T5.component / "config.json").read_text())
    (folder / T5.component / "config.json").write_text(json.dumps(dict(config, d_model=32)))
    with pytest.raises(ModelError, match="d_model is 32, but the transformer's joint_attention_dim is 96"):
        ModelInfo(folder)
    (folder / T5.component / "config.json").write_text(json.dumps(config))
    (folder / T5.component / "model.safetensors").unlink()
    with pytest.raises(ModelError, match="model.safetensors .or its sharded index. is missing"):
        ModelInfo(folder)
    shutil.rmtree(folder / T5.component)
    (folder / T5.component).mkdir()  # an empty folder is not "no T5": it is an incomplete one
    with pytest.raises(ModelError, match="text_encoder_3/config.json is missing"):
        ModelInfo(folder)


def test_corrupt_t5_tokenizer_or_weights_fail_at_decode_in_one_error(t5_model, codecs, tmp_path):
    folder = _copy(t5_model, tmp_path)
    (folder / T5.tokenizer / "tokenizer.json").write_text("{not json")
    data = codecs[0].compress(sample_image(64, 64), caption=CAPTION)
    with pytest.raises(ModelError, match="cannot read tokenizer .*tokenizer_3/tokenizer.json"):
        Codec.from_pretrained(folder, backend="torch").decompress(data, steps=1)
    shutil.copyfile(t5_model / T5.tokenizer / "tokenizer.json", folder / T5.tokenizer / "tokenizer.json")
    weights = folder / T5.component / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(ModelError, match="text_encoder_3/model.safetensors"):
        Codec.from_pretrained(folder, backend="torch")


def test_sharded_t5_weights_load(t5_model, tmp_path):
    """transformers saves T5-XXL as shards plus model.safetensors.index.json; both layouts load strictly."""
    from safetensors.numpy import load_file, save_file

    folder = _copy(t5_model, tmp_path)
    state = load_file(str(folder / T5.component / "model.safetensors"))
    (folder / T5.component / "model.safetensors").unlink()
    names = sorted(state)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for shard, keys in shards.items():
        save_file({k: state[k] for k in keys}, str(folder / T5.component / shard))
    index = {"metadata": {}, "weight_map": {k: shard for shard, keys in shards.items() for k in keys}}
    (folder / T5.component / "model.safetensors.index.json").write_text(json.dumps(index))
    info = ModelInfo(folder)
    assert info.optional_text is T5
    image = sample_image(64, 64)
    a = Codec.from_pretrained(t5_model, backend="torch")
    b = Codec.from_pretrained(folder, backend="torch")
    data = a.compress(image, caption=CAPTION)
    np.testing.assert_array_equal(a.decompress(data, steps=2), b.decompress(data, steps=2))


def test_artifacts_without_the_t5_graph_are_refused(t5_artifacts, tmp_path):
    folder = tmp_path / "art"
    shutil.copytree(t5_artifacts, folder)
    manifest = json.loads((folder / "manifest.json").read_text())
    del manifest["graphs"][T5.component]
    (folder / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ModelError, match="lacks graphs: text_encoder_3"):
        Codec.from_pretrained(backend="onnxruntime", artifacts=folder)


def test_tensorrt_rtx_builds_the_t5_graph(t5_artifacts, tmp_path):
    pytest.importorskip("tensorrt_rtx", reason="TensorRT-RTX is not installed (pip install tensorrt-rtx)")
    from perco.export import build as trt_build

    out = tmp_path / "fp16"  # an FP16 graph is checked against FP32 on ids drawn from T5's own vocabulary
    trt_build.build(t5_artifacts, out, "fp16", "tensorrt-rtx", log=lambda text: None, graphs=[T5.component],
                    overrides={"batch": (1, 1, 2), "height": (64, 128, 256), "width": (64, 128, 256)})
    manifest = json.loads((out / "engines.json").read_text())
    assert set(manifest["graphs"]) == {T5.component} and (out / manifest["graphs"][T5.component]["file"]).is_file()
    exported = json.loads((t5_artifacts / "manifest.json").read_text())["graphs"]
    assert exported[T5.component]["vocab_size"] < exported["text_encoder"]["vocab_size"]
    assert manifest["graphs"][T5.component]["vs_fp32"]["value"] < 0.05
    assert (out / manifest["tokenizer"] / T5.tokenizer / "tokenizer.json").is_file()  # engines are self-contained


def _psnr(a, b) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return 10 * np.log10(255**2 / mse) if mse else np.inf


def test_quantized_artifacts_keep_t5(t5_artifacts, tmp_path):
    """INT8 calibration feeds the denoiser T5's rows as the codec does; the T5 graph and tokenizer travel along."""
    from perco.export.quantize import quantize

    out = tmp_path / "q"
    quantize(t5_artifacts, out, size=(64, 64), count=2, log=lambda text: None)
    manifest = read_manifest(out, verify=True)
    assert T5.component in manifest["graphs"] and "quantized" not in manifest["graphs"][T5.component]
    assert (out / manifest["tokenizer"] / T5.tokenizer / "tokenizer.json").is_file()
    fp32, int8 = (Codec.from_pretrained(backend="onnxruntime", artifacts=a) for a in (t5_artifacts, out))
    data = fp32.compress(sample_image(64, 64), caption=CAPTION)
    psnr = _psnr(fp32.decompress(data, steps=2), int8.decompress(data, steps=2))
    assert psnr > 25, psnr  # measured 39.0 dB (random tiny model, 64x64, 2 steps)
