"""CLI: the happy path, and every bad input ends in exactly one `error:` line, exit 1, no output file."""

import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from conftest import random_image
from perco.engine.cli import main


@pytest.fixture(scope="module")
def files(tmp_path_factory, tiny_model):
    d = tmp_path_factory.mktemp("cli")
    image = d / "photo.png"
    Image.fromarray(random_image(64, 96)).save(image)
    stream = d / "photo.perco"
    assert main(["compress", str(image), "-o", str(stream), "--model", str(tiny_model),
                 "--caption", "a red barn", "-q"]) == 0
    return {"dir": d, "image": image, "stream": stream}


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_error(code, err, match, expected_code=1):
    assert code == expected_code
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert match in lines[0], lines[0]


def test_decompress_and_info(files, tiny_model, capsys):
    out_png = files["dir"] / "decoded.png"
    code, out, err = run(capsys, "decompress", files["stream"], "-o", out_png, "--model", tiny_model, "--steps", "2")
    assert code == 0 and "stage timings" in err and "denoise" in err
    assert Image.open(out_png).size == (96, 64)
    code, out, _ = run(capsys, "info", files["stream"], "--json", "--model", tiny_model)
    info = json.loads(out)
    assert (info["width"], info["height"]) == (96, 64)
    assert info["bytes"]["total"] == files["stream"].stat().st_size
    assert info["bytes"]["framing"] <= 12 + 4  # + the explicit 96x64 size
    assert info["caption"] == "a red barn" and info["token_grid"] == [4, 6]
    code, out, _ = run(capsys, "info", files["stream"])
    assert code == 0 and "caption" in out and "bpp" in out


def test_framing_at_512(files, tiny_model, capsys):
    image = files["dir"] / "square.png"
    Image.fromarray(random_image(512, 512)).save(image)
    stream = files["dir"] / "square.perco"
    assert run(capsys, "compress", image, "-o", stream, "--model", tiny_model, "-q")[0] == 0
    info = json.loads(run(capsys, "info", stream, "--json")[1])
    assert info["bytes"]["framing"] <= 12


@pytest.mark.parametrize("command", ["compress", "decompress", "info", "init-tiny", "demo"])
def test_help(command, capsys):
    assert main([command, "--help"]) == 0
    assert "usage: perco" in capsys.readouterr().out


def _bad_inputs(files, tiny_model):
    d = files["dir"]
    data = files["stream"].read_bytes()
    (d / "text.png").write_text("not an image")
    (d / "empty.perco").write_bytes(b"")
    (d / "truncated.perco").write_bytes(data[: len(data) // 2])
    corrupt = bytearray(data)
    corrupt[len(corrupt) // 2] ^= 0x10
    (d / "corrupt.perco").write_bytes(bytes(corrupt))
    (d / "incomplete").mkdir(exist_ok=True)
    (d / "incomplete" / "unet").mkdir(exist_ok=True)
    out = d / "never.png"
    m = ["--model", tiny_model]
    return [
        (["compress", d / "missing.png", "-o", out, *m], "does not exist"),
        (["compress", d / "text.png", "-o", out, *m], "cannot read image"),
        (["compress", d, "-o", out, *m], "is a directory"),
        (["decompress", d / "missing.perco", "-o", out, *m], "does not exist"),
        (["decompress", d / "empty.perco", "-o", out, *m], "empty bitstream"),
        (["decompress", d / "truncated.perco", "-o", out, *m], "truncated"),
        (["decompress", d / "corrupt.perco", "-o", out, *m], "CRC-32"),
        (["decompress", files["image"], "-o", out, *m], "not a PerCo Engine bitstream"),
        (["info", d / "corrupt.perco"], "CRC-32"),
        (["compress", files["image"], "-o", out, "--model", d / "nope"], "does not exist"),
        (["compress", files["image"], "-o", out, "--model", d / "incomplete"], "incomplete"),
        (["decompress", files["stream"], "-o", out, "--model", d / "incomplete"], "incomplete"),
        (["decompress", files["stream"], "-o", d / "no_such_dir" / "x.png", *m], "cannot write"),
        (["init-tiny", d / "t", "--rate", "0.5"], "unknown rate"),
        (["init-tiny", d, "--rate", "0.0313"], "already exists"),
    ]


def test_bad_inputs_give_one_error_line(files, tiny_model, capsys):
    for argv, match in _bad_inputs(files, tiny_model):
        code, out, err = run(capsys, *argv)
        assert_one_error(code, err, match)
        assert not (files["dir"] / "never.png").exists()
    assert not [p for p in files["dir"].iterdir() if p.name.startswith(".") and p.name.endswith(".tmp")]


def test_wrong_model_via_cli(files, other_seed_model, capsys):
    code, _, err = run(capsys, "decompress", files["stream"], "-o", files["dir"] / "never.png",
                       "--model", other_seed_model)
    assert_one_error(code, err, "decode it with the model")


@pytest.mark.parametrize(
    "argv,match",
    [(["compress"], "required"), (["decompress", "x", "-o", "y", "--steps", "0"], "positive integer"),
     (["compress", "x", "-o", "y", "--seed", "-3"], "0..2^64-1"), (["bogus"], "invalid choice"),
     (["compress", "x", "-o", "y", "--backend", "cuda"], "invalid choice")],
)
def test_bad_flags(argv, match, capsys):
    code, _, err = run(capsys, *argv)
    assert_one_error(code, err, match, expected_code=2)


def test_console_script_subprocess(files, tiny_model, tmp_path):
    """The installed `perco` entry point: a real process, stderr has one line, exit code 1."""
    proc = subprocess.run([sys.executable, "-m", "perco.engine.cli", "decompress", str(tmp_path / "none.perco"),
                           "-o", str(tmp_path / "x.png"), "--model", str(tiny_model)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and proc.stderr.strip().count("\n") == 0 and proc.stderr.startswith("error:")


def test_demo(tmp_path, tiny_model, capsys):
    code, out, _ = run(capsys, "demo", "--out", tmp_path / "demo", "--model", tiny_model, "--steps", "1")
    assert code == 0 and "bpp" in out and "denoise" in out
    side = np.asarray(Image.open(tmp_path / "demo" / "side_by_side.png"))
    assert side.shape == (512 + 24, 1536, 3)


def test_quantize_bad_size_is_one_line(tmp_path, capsys):
    from perco.engine.cli import main

    assert main(["quantize", "--artifacts", str(tmp_path), "-o", str(tmp_path / "q"), "--size", "big"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: --size takes WxH in pixels, e.g. 256x256, got 'big'"] and not (tmp_path / "q").exists()
