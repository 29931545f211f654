"""The released folder layout loads strictly; key names match PerCo (SD) exactly."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import DATA
from perco.engine.errors import ModelError
from perco.engine.model import ModelInfo
from perco.export.models.perco_sd import PRESETS, HyperEncoder, build_modules, load_model, load_strict

RELEASED_HYPER_KEYS = json.loads((DATA / "perco_sd_hyper_enc_state_dict.json").read_text())
LAYOUT = [
    "model_index.json", "scheduler/scheduler_config.json",
    "unet/config.json", "unet/diffusion_pytorch_model.safetensors",
    "vae/config.json", "vae/diffusion_pytorch_model.safetensors",
    "text_encoder/config.json", "text_encoder/model.safetensors",
    "tokenizer/vocab.json", "tokenizer/merges.txt",
    "hyper_enc/config.json", "hyper_enc/diffusion_pytorch_model.safetensors",
]


def test_init_tiny_writes_the_released_layout(tiny_model):
    for name in LAYOUT:
        assert (tiny_model / name).is_file(), name
    hyper = json.loads((tiny_model / "hyper_enc/config.json").read_text())
    assert {"in_channels", "N", "M", "codebook_dim", "cfg_ss", "cfg_cs"} <= set(hyper)
    assert (hyper["cfg_ss"], hyper["cfg_cs"]) == (32, 256)  # real rate geometry of 0.0313


@pytest.mark.parametrize("grid_key", sorted(RELEASED_HYPER_KEYS))
def test_full_size_hyper_encoder_matches_released_keys_and_shapes(grid_key):
    grid, k = map(int, grid_key.split("x"))
    with torch.device("meta"):
        model = HyperEncoder(4, 192, 320, 32, grid, k)
    shapes = {name: list(t.shape) for name, t in model.state_dict().items()}
    assert shapes == RELEASED_HYPER_KEYS[grid_key]
    backbone = sum(t.numel() for n, t in model.state_dict().items() if n.startswith("backbone."))
    assert backbone == {64: 4_080_128, 8: 5_868_032}.get(grid, backbone)  # released parameter counts


def test_tiny_hyper_encoder_has_the_released_key_names(tiny_model):
    keys = set(load_file(str(tiny_model / "hyper_enc/diffusion_pytorch_model.safetensors")))
    assert keys == set(RELEASED_HYPER_KEYS["32x256"])


def test_full_size_unet_has_conv_in_extended():
    config = PRESETS["0.0313"]
    with torch.device("meta"):
        unet = build_modules({"unet": config.unet, "vae": config.vae, "text_encoder": config.text_encoder,
                              "hyper_enc": config.hyper_enc})["unet"]
    state = unet.state_dict()
    assert list(state["conv_in_extended.weight"].shape) == [320, 324, 3, 3]
    assert list(state["conv_in_extended.bias"].shape) == [320]
    assert list(state["conv_in.weight"].shape) == [320, 4, 3, 3]  # still in the file, unused
    sd21 = sum(t.numel() for n, t in state.items() if not n.startswith("conv_in_extended"))
    assert sd21 == 865_910_724


def _copy(model, tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(model, folder)
    return folder


def _rewrite(path, edit):
    state = load_file(str(path))
    edit(state)
    save_file(state, str(path))


def test_renamed_key_is_refused_by_name(tiny_model, tmp_path):
    folder = _copy(tiny_model, tmp_path)
    path = folder / "unet/diffusion_pytorch_model.safetensors"
    _rewrite(path, lambda s: s.__setitem__("conv_in_ext.weight", s.pop("conv_in_extended.weight")))
    with pytest.raises(ModelError, match=r"missing tensor 'conv_in_extended.weight'"):
        load_model(ModelInfo(folder))


@pytest.mark.parametrize(
    "component,edit,match",
    [
        ("hyper_enc", lambda s: s.pop("quantizer.project_out.bias"), "missing tensor 'quantizer.project_out.bias'"),
        ("vae", lambda s: s.__setitem__("extra.weight", torch.zeros(1)), "unexpected tensor 'extra.weight'"),
        ("hyper_enc", lambda s: s.__setitem__("backbone.0.bias", torch.zeros(3)),
         r"tensor 'backbone.0.bias' has shape \[3\], expected \[16\]"),
    ],
)
def test_strict_loading_errors(tiny_model, tmp_path, component, edit, match):
    folder = _copy(tiny_model, tmp_path)
    name = "model.safetensors" if component == "text_encoder" else "diffusion_pytorch_model.safetensors"
    _rewrite(folder / component / name, edit)
    with pytest.raises(ModelError, match=match):
        load_model(ModelInfo(folder))


def test_legacy_names_are_mapped(tiny_model, tmp_path):
    folder = _copy(tiny_model, tmp_path)

    def legacy_vae(state):
        for key in [k for k in state if ".to_q." in k]:
            state[key.replace(".to_q.", ".query.")] = state.pop(key)

    _rewrite(folder / "vae/diffusion_pytorch_model.safetensors", legacy_vae)
    _rewrite(folder / "text_encoder/model.safetensors",
             lambda s: s.__setitem__("text_model.embeddings.position_ids", torch.arange(77)[None]))
    modules = load_model(ModelInfo(folder))
    reference = load_model(ModelInfo(tiny_model))
    for a, b in zip(modules["vae"].state_dict().values(), reference["vae"].state_dict().values()):
        assert torch.equal(a, b)


@pytest.mark.parametrize(
    "remove,match",
    [("unet/config.json", "unet/config.json is missing"),
     ("text_encoder/model.safetensors", "text_encoder/model.safetensors is missing"),
     ("tokenizer/vocab.json", "tokenizer/vocab.json is missing"),
     ("scheduler", "scheduler_config.json is missing")],
)
def test_incomplete_folder(tiny_model, tmp_path, remove, match):
    folder = _copy(tiny_model, tmp_path)
    target = folder / remove
    shutil.rmtree(target) if target.is_dir() else target.unlink()
    with pytest.raises(ModelError, match=match):
        ModelInfo(folder)


def test_corrupt_weights_file(tiny_model, tmp_path):
    folder = _copy(tiny_model, tmp_path)
    (folder / "hyper_enc/diffusion_pytorch_model.safetensors").write_bytes(b"\x00" * 5)
    with pytest.raises(ModelError, match="not a safetensors file"):
        ModelInfo(folder).fingerprint


def test_missing_folder(tmp_path):
    with pytest.raises(ModelError, match="does not exist"):
        ModelInfo(tmp_path / "nope")


def test_fingerprint_separates_models(tiny_model, other_seed_model, builtin_tokenizer_model, tmp_path):
    a, b, c = (ModelInfo(m).fingerprint for m in (tiny_model, other_seed_model, builtin_tokenizer_model))
    assert len({a, b, c}) == 3
    assert ModelInfo(_copy(tiny_model, tmp_path)).fingerprint == a  # location-independent


def test_load_strict_names_the_file(tiny_model):
    path = tiny_model / "hyper_enc/diffusion_pytorch_model.safetensors"
    load_strict(HyperEncoder(4, 16, 16, 8, 32, 256), path, "hyper_enc")
    with pytest.raises(ModelError, match=r"safetensors: tensor 'backbone.9.weight' has shape \[16, 16, 5, 5\]"):
        load_strict(HyperEncoder(4, 16, 16, 8, 64, 256), path, "hyper_enc")  # a grid-64 model, a grid-32 file
