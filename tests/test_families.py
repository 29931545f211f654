"""The family seam: PerCo (SD) is registered, found from model_index.json, and drives the runtime."""

import json
import shutil

import pytest

from perco.engine import families
from perco.engine.errors import ModelError
from perco.engine.model import ModelInfo


def test_perco_sd_is_registered_and_found_from_its_folder(tiny_model):
    family = families.get("perco-sd")
    assert family.title == "PerCo (SD)" and "0.0313" in family.rates
    info = ModelInfo(tiny_model)
    assert info.family is family and info.spec.family_def is family
    assert info.pad_multiple == family.pad_multiple(info.configs, info.rate.token_stride)
    assert set(family.text_outputs) <= {n for n, _, _ in family.graphs["denoiser"].inputs}


def test_unknown_family_and_pipeline_are_refused(tiny_model, tmp_path):
    with pytest.raises(ModelError, match="unknown model family 'nope'"):
        families.get("nope")
    bad = tmp_path / "model"
    shutil.copytree(tiny_model, bad)
    index = json.loads((bad / "model_index.json").read_text())
    (bad / "model_index.json").write_text(json.dumps(dict(index, _class_name="KandinskyPipeline")))
    with pytest.raises(ModelError, match="'KandinskyPipeline', which no family runs"):
        ModelInfo(bad)


def test_a_folder_without_model_index_is_perco_sd(tiny_model, tmp_path):
    bare = tmp_path / "model"
    shutil.copytree(tiny_model, bare)
    (bare / "model_index.json").unlink()
    assert ModelInfo(bare).family.name == "perco-sd"
    assert ModelInfo(bare).fingerprint == ModelInfo(tiny_model).fingerprint  # the family, not the file, is hashed


def test_manifest_family(tiny_model):
    spec = ModelInfo(tiny_model).spec
    assert families.of_manifest({"model": spec.to_dict()}).name == "perco-sd"
    assert families.of_manifest({}).name == "perco-sd"  # manifests written before families


def test_a_folder_is_opened_and_fingerprinted_once(tiny_model, tmp_path, monkeypatch):
    copy = tmp_path / "model"
    shutil.copytree(tiny_model, copy)
    hashed = []
    original = ModelInfo.fingerprint.func
    monkeypatch.setattr(ModelInfo, "fingerprint", property(lambda self: hashed.append(1) or original(self)))
    first = ModelInfo.open(copy)
    assert ModelInfo.open(copy) is first and ModelInfo.open(str(copy)) is first
    first.spec, first.spec  # the spec (and its fingerprint) is computed once per object
    assert len(hashed) == 1
    config = copy / "unet" / "config.json"
    config.write_text(config.read_text() + " ")  # a changed file is a new folder state
    assert ModelInfo.open(copy) is not first
