"""Captioners as plugins, with a tiny random BLIP-2 in transformers' own folder format: its captions are
meaningless (random weights); what is checked is the plumbing (loading, batching, 32 new tokens at most, the
CLI flags, --caption overriding, the warning without either, the captioning time in the stage table)."""

import json

import numpy as np
import pytest
from PIL import Image

from conftest import random_image
from perco.engine.captioners import available, open_captioner
from perco.engine.cli import main
from perco.engine.errors import PercoError


@pytest.fixture(scope="module")
def blip2(tmp_path_factory):
    pytest.importorskip("transformers", reason="BLIP-2 runs through transformers")
    from perco.export.captioners import write_tiny_blip2

    return write_tiny_blip2(tmp_path_factory.mktemp("blip2") / "tiny")


@pytest.fixture
def photo(tmp_path):
    path = tmp_path / "photo.png"
    Image.fromarray(random_image(64, 96, seed=3)).save(path)
    return path


def test_blip2_is_registered_and_captions_a_batch(blip2):
    assert "blip2" in available()
    captioner = open_captioner("blip2", blip2)
    images = [random_image(64, 96, seed=i) for i in range(3)]
    captions = captioner(images)
    assert len(captions) == 3 and all(isinstance(c, str) for c in captions)
    ids = captioner.processor.tokenizer(captions)["input_ids"]
    assert all(len(i) <= 32 + 1 for i in ids)  # at most 32 new tokens (+ the start token the processor adds)
    captioner.batch_size = 2  # batches of 2 and 1: the same captions as one batch of 3 (greedy decoding)
    assert captioner(images) == captions


def test_cli_captions_and_caption_overrides(blip2, photo, tmp_path, capsys):
    out = tmp_path / "a.perco"
    assert main(["compress", str(photo), "-o", str(out), "--captioner", "blip2", "--captioner-model", str(blip2)]) == 0
    err = capsys.readouterr().err
    assert "warning: no --caption" not in err and "  caption " in err, err  # the captioner's time, beside the stages
    expected = open_captioner("blip2", blip2)([np.asarray(Image.open(photo))])[0]
    assert main(["info", str(out), "--json", "--model", _bundled()]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["caption"] == _clip_text(expected)
    assert main(["compress", str(photo), "-o", str(out), "--caption", "a red barn", "--captioner", "blip2",
                 "--captioner-model", str(blip2)]) == 0
    capsys.readouterr()
    assert main(["info", str(out), "--json", "--model", _bundled()]) == 0
    assert json.loads(capsys.readouterr().out)["caption"] == "a red barn"


def test_no_caption_warns_once(photo, tmp_path, capsys):
    assert main(["compress", str(photo), "-o", str(tmp_path / "b.perco")]) == 0
    err = capsys.readouterr().err
    assert err.count("warning: no --caption and no --captioner") == 1
    assert main(["compress", "-q", str(photo), "-o", str(tmp_path / "c.perco")]) == 0
    assert capsys.readouterr().err == ""


def test_captioner_errors_are_one_line(photo, tmp_path, capsys):
    with pytest.raises(PercoError, match="unknown captioner 'molmo'"):
        open_captioner("molmo", tmp_path)
    assert main(["compress", str(photo), "-o", str(tmp_path / "d.perco"), "--captioner", "blip2"]) == 1
    assert "needs --captioner-model DIR" in capsys.readouterr().err
    assert main(["compress", str(photo), "-o", str(tmp_path / "d.perco"), "--captioner", "blip2",
                 "--captioner-model", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: BLIP-2 folder") and err.count("\n") == 1
    assert not (tmp_path / "d.perco").exists()


def _bundled() -> str:
    from perco.engine.demo import default_model_folder

    return str(default_model_folder())


def _clip_text(caption: str) -> str:
    from perco.engine.model import ModelInfo
    from perco.engine.text import CaptionTokenizer, caption_text

    info = ModelInfo(_bundled())
    return caption_text(CaptionTokenizer(info.folder / "tokenizer", info.tokens)(caption), info.folder / "tokenizer")
