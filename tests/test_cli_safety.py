"""Every hardening case at the command line: one `error:` line, the documented exit code, and
nothing destroyed or half-written. Inputs that must fail before any model loads run with
`Codec.from_pretrained` replaced by a function that fails the test."""

import json
import os
import shutil
import stat
import struct
import subprocess
import sys
import zlib

import numpy as np
import pytest
from PIL import Image

from conftest import random_image
from perco.engine import bitstream
from perco.engine.cli import main
from perco.engine.model import ModelInfo


@pytest.fixture(scope="module")
def stream(tmp_path_factory, tiny_model):
    d = tmp_path_factory.mktemp("safety")
    image = d / "photo.png"
    Image.fromarray(random_image(64, 96)).save(image)
    assert main(["compress", str(image), "-o", str(d / "photo.perco"), "--model", str(tiny_model), "-q"]) == 0
    return d / "photo.perco"


@pytest.fixture
def no_model_load(monkeypatch):
    """Fail the test if a command gets as far as loading a model."""
    from perco.engine.codec import Codec

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the input was checked")

    monkeypatch.setattr(Codec, "from_pretrained", classmethod(refuse))


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def one_error(code, err, match, expected_code=1):
    lines = err.strip().splitlines()
    assert code == expected_code, (code, err)
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert match in lines[0], lines[0]


def claimed_size_stream(tiny_model, width, height) -> bytes:
    """A valid bitstream (right grid, right CRC) for an image of any claimed size."""
    from perco.benchmarks.decode_memory import make_bitstream

    return make_bitstream(ModelInfo(tiny_model).spec, width, height)


# --- outputs ------------------------------------------------------------------------------------

def test_output_symlink_is_followed_and_kept(stream, tiny_model, tmp_path, capsys):
    target = tmp_path / "target.png"
    target.write_bytes(b"old")
    link = tmp_path / "link.png"
    link.symlink_to(target)
    code, _, _ = run(capsys, "decompress", stream, "-o", link, "--model", tiny_model, "--steps", "1", "-q")
    assert code == 0 and link.is_symlink() and os.readlink(link) == str(target)
    assert Image.open(target).size == (96, 64)


@pytest.mark.parametrize("make", ["fifo", "device"])
def test_output_special_file_is_refused_untouched(make, stream, tiny_model, tmp_path, capsys, no_model_load):
    if make == "fifo":
        path = tmp_path / "pipe.png"
        os.mkfifo(path)
    else:  # a character device, as /dev/stdout resolves to on a terminal; /dev/null stands in for it
        path = "/dev/null"
    link = tmp_path / "stdout-like.png"  # like /dev/stdout: a link to the special file
    link.symlink_to(path)
    before = os.stat(path).st_mode
    code, _, err = run(capsys, "decompress", stream, "-o", link, "--model", tiny_model)
    one_error(code, err, "not a regular file")
    assert os.stat(path).st_mode == before and link.is_symlink()


@pytest.mark.parametrize("umask,mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_output_respects_umask(umask, mode, stream, tiny_model, tmp_path, capsys):
    old = os.umask(umask)
    try:
        out = tmp_path / "decoded.png"
        code, _, _ = run(capsys, "decompress", stream, "-o", out, "--model", tiny_model, "--steps", "1", "-q")
    finally:
        os.umask(old)
    assert code == 0 and stat.S_IMODE(out.stat().st_mode) == mode


@pytest.mark.parametrize("ext,fmt", [(".png", "PNG"), (".jpg", "JPEG"), (".JPEG", "JPEG"), (".webp", "WEBP")])
def test_output_format_follows_extension(ext, fmt, stream, tiny_model, tmp_path, capsys):
    out = tmp_path / f"decoded{ext}"
    assert run(capsys, "decompress", stream, "-o", out, "--model", tiny_model, "--steps", "1", "-q")[0] == 0
    assert Image.open(out).format == fmt


def test_dev_null_is_refused_as_a_device_not_for_its_extension(stream, tiny_model, capsys, no_model_load):
    code, _, err = run(capsys, "decompress", stream, "-o", "/dev/null", "--model", tiny_model)
    one_error(code, err, "it is a character device, not a regular file; use - for standard output")


def test_unknown_output_extension_refused_before_work(stream, tiny_model, tmp_path, capsys, no_model_load):
    code, _, err = run(capsys, "decompress", stream, "-o", tmp_path / "decoded.bmp", "--model", tiny_model)
    one_error(code, err, "unknown image extension '.bmp'")
    assert not list(tmp_path.iterdir())


def test_stdin_and_stdout(stream, tiny_model, tmp_path):
    """`-` is standard input and output, in real processes; status lines go to stderr."""
    image = Image.fromarray(random_image(64, 64, seed=3))
    png = tmp_path / "in.png"
    image.save(png)
    cli = [sys.executable, "-m", "perco.engine.cli"]
    proc = subprocess.run(cli + ["compress", "-", "-o", "-", "--model", str(tiny_model)], input=png.read_bytes(),
                          capture_output=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert bitstream.parse(proc.stdout)[0].width == 64 and b"bytes" in proc.stderr
    assert not (tmp_path / "-").exists() and not os.path.exists("-")
    proc = subprocess.run(cli + ["decompress", "-", "-o", "-", "--model", str(tiny_model), "--steps", "1", "-q"],
                          input=proc.stdout, capture_output=True, timeout=300)
    assert proc.returncode == 0 and proc.stderr == b"", proc.stderr
    assert proc.stdout.startswith(b"\x89PNG") and not os.path.exists("-")
    info = subprocess.run(cli + ["info", "-", "--json"], input=stream.read_bytes(), capture_output=True, timeout=300)
    assert json.loads(info.stdout)["width"] == 96


# --- inputs ------------------------------------------------------------------------------------

def test_16_bit_png_matches_its_8_bit_version(tiny_model, tmp_path, capsys):
    rgb8 = random_image(64, 64, seed=5)
    Image.fromarray(rgb8).save(tmp_path / "8bit.png")
    wide = rgb8.astype(np.uint16) * 257  # the same picture in 16 bits
    raw = zlib.compress(b"".join(b"\0" + row.astype(">u2").tobytes() for row in wide.reshape(64, -1)))
    (tmp_path / "16bit.png").write_bytes(_png(64, 64, 16, 2, raw))
    for name in ("8bit", "16bit"):
        assert run(capsys, "compress", tmp_path / f"{name}.png", "-o", tmp_path / f"{name}.perco",
                   "--model", tiny_model, "-q")[0] == 0
    assert (tmp_path / "8bit.perco").read_bytes() == (tmp_path / "16bit.perco").read_bytes()


def _png(width, height, depth, colour, idat: bytes) -> bytes:
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, depth, colour, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def test_huge_image_refused_from_its_header(tiny_model, tmp_path, capsys, no_model_load):
    """PNG headers claiming huge images (decompression bombs) are refused before any pixel is decoded."""
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(_png(40000, 40000, 8, 2, zlib.compress(b"\0" * 1000)))
    code, _, err = run(capsys, "compress", bomb, "-o", tmp_path / "x.perco", "--model", tiny_model)
    one_error(code, err, "decompression bomb")  # Pillow's own guard, above 2 x 89 Mpx
    bomb.write_bytes(_png(17000, 10000, 8, 2, zlib.compress(b"\0" * 1000)))
    code, _, err = run(capsys, "compress", bomb, "-o", tmp_path / "x.perco", "--model", tiny_model)
    one_error(code, err, "larger than 16384 pixels on a side")
    small_bomb = tmp_path / "bomb2.png"
    small_bomb.write_bytes(_png(8000, 8000, 8, 2, zlib.compress(b"\0" * 1000)))
    code, _, err = run(capsys, "compress", small_bomb, "-o", tmp_path / "x.perco", "--model", tiny_model,
                       "--max-pixels", "4096x4096")
    one_error(code, err, "over the")
    assert not (tmp_path / "x.perco").exists()


def test_encoder_refuses_what_the_decoder_cannot_decode(tiny_model, tmp_path, capsys, no_model_load):
    image = tmp_path / "photo.png"
    Image.fromarray(random_image(64, 96)).save(image)
    code, _, err = run(capsys, "compress", image, "-o", tmp_path / "x.perco", "--model", tiny_model,
                       "--max-pixels", "1000")
    one_error(code, err, "raise it with --max-pixels")


# --- bitstreams ----------------------------------------------------------------------------------

@pytest.mark.parametrize("size", [(16384, 16384), (2048, 2048)])
def test_huge_header_refused_before_the_model_loads(size, tiny_model, tmp_path, capsys, no_model_load):
    path = tmp_path / "huge.perco"
    path.write_bytes(claimed_size_stream(tiny_model, *size))
    assert len(path.read_bytes()) <= 1100 << 10  # about one byte per token: 1 MiB at 16384 x 16384
    for backend in ("torch", "onnxruntime"):
        code, _, err = run(capsys, "decompress", path, "-o", tmp_path / "x.png", "--model", tiny_model,
                           "--backend", backend, "--max-pixels", "1024x1024")
        one_error(code, err, "over the decode limit of 1.05 Mpx")
    code, out, _ = run(capsys, "info", path)
    assert code == 0 and f"{size[0]}x{size[1]}" in out  # info reads the header only, and says the size
    code, out, _ = run(capsys, "info", path, "--model", tiny_model, "--json", "--max-pixels", "1024x1024")
    assert code == 0 and json.loads(out)["decodable"]["ok"] is False  # ... and, with a model, that it is too large


def test_default_limit_stops_a_huge_header(tiny_model, tmp_path, capsys, no_model_load, monkeypatch):
    """With the estimate on an 8 GiB machine, 16384 x 16384 is refused by onnxruntime (no memory-efficient attention)."""
    from perco.engine import limits

    monkeypatch.setattr(limits, "available_memory", lambda: 8 << 30)
    monkeypatch.delenv(limits.MAX_PIXELS_ENV, raising=False)
    path = tmp_path / "huge.perco"
    path.write_bytes(claimed_size_stream(tiny_model, 16384, 16384))
    code, _, err = run(capsys, "decompress", path, "-o", tmp_path / "x.png", "--model", tiny_model,
                       "--backend", "onnxruntime")
    one_error(code, err, "estimated peak memory on onnxruntime")


def test_empty_and_oversized_bitstreams_fail_before_the_model_loads(tiny_model, tmp_path, capsys, no_model_load):
    (tmp_path / "empty.perco").write_bytes(b"")
    code, _, err = run(capsys, "decompress", tmp_path / "empty.perco", "-o", tmp_path / "x.png", "--model", tiny_model)
    one_error(code, err, "empty bitstream")
    code, _, err = run(capsys, "decompress", "/dev/zero", "-o", tmp_path / "x.png", "--model", tiny_model)
    one_error(code, err, "larger than 16 MiB")
    assert not (tmp_path / "x.png").exists()


@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "-2", "51"])
def test_bad_guidance_is_a_usage_error(value, stream, tiny_model, tmp_path, capsys, no_model_load):
    code, _, err = run(capsys, "decompress", stream, "-o", tmp_path / "x.png", "--model", tiny_model,
                       f"--guidance={value}")
    one_error(code, err, "expected a finite number in 0..50", expected_code=2)


def test_steps_1000(stream, tiny_model, tmp_path, capsys):
    code, _, err = run(capsys, "decompress", stream, "-o", tmp_path / "x.png", "--model", tiny_model,
                       "--steps", "1000")
    one_error(code, err, "steps must be in 1..999")
    assert not (tmp_path / "x.png").exists()


@pytest.mark.parametrize("component,field,value,match", [
    ("unet", "block_out_channels", None, "'block_out_channels' must be a list"),
    ("vae", "scaling_factor", "x", "'scaling_factor' must be a finite number"),
    ("hyper_enc", "M", 10**7, "'M' = 10000000 is outside"),
    ("hyper_enc", "codebook_dim", 10**9, "'codebook_dim' = 1000000000 is outside"),
    ("hyper_enc", "cfg_ss", 32.7, "'cfg_ss' must be an integer"),
])
def test_bad_config_field_named(component, field, value, match, stream, tiny_model, tmp_path, capsys):
    bad = tmp_path / "model"
    shutil.copytree(tiny_model, bad)
    path = bad / component / "config.json"
    config = json.loads(path.read_text())
    config[field] = value
    path.write_text(json.dumps(config))
    code, _, err = run(capsys, "decompress", stream, "-o", tmp_path / "x.png", "--model", bad)
    one_error(code, err, match)


# --- basics --------------------------------------------------------------------------------------

def test_version(capsys):
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.startswith("perco-engine ")


def test_usage_errors_exit_2(capsys):
    code, _, err = run(capsys, "decompress", "x", "-o", "y.png", "--max-pixels", "lots")
    one_error(code, err, "a pixel limit is a positive count", expected_code=2)


def test_init_tiny_help_lists_the_rates(capsys):
    assert main(["init-tiny", "--help"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert all(rate in out for rate in ("0.1250", "0.0313", "0.0019"))


def test_artifacts_pick_the_backend(tmp_path):
    import argparse

    from perco.engine.cli import backend_name

    (tmp_path / "graphs").mkdir()
    (tmp_path / "graphs" / "manifest.json").write_text("{}")
    (tmp_path / "engines").mkdir()
    (tmp_path / "engines" / "engines.json").write_text("{}")
    pick = lambda artifacts, backend=None: backend_name(argparse.Namespace(artifacts=artifacts, backend=backend))
    assert pick(None) == "torch" and pick(str(tmp_path / "graphs")) == "onnxruntime"
    assert pick(str(tmp_path / "engines")) == "tensorrt" and pick(str(tmp_path / "engines"), "onnxruntime") == "onnxruntime"


def test_demo_quiet_prints_nothing(tmp_path, tiny_model, capsys):
    code, out, err = run(capsys, "demo", "--out", tmp_path / "demo", "--model", tiny_model, "--steps", "1", "-q")
    assert code == 0 and out == "" and err == ""
    side = Image.open(tmp_path / "demo" / "side_by_side.png")
    assert side.size == (1536, 512 + 24)  # original | decoded, under a labelled band


def test_tests_use_a_private_cache():
    from perco.engine.demo import cache_dir

    assert "perco-test-cache-" in str(cache_dir())
