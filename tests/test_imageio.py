"""Image input conversion and safe output writing (engine/imageio.py); fast, no models."""

import io
import os
import stat
import struct
import sys
import warnings
import zlib

import numpy as np
import pytest
from PIL import Image

from perco.engine import imageio
from perco.engine.errors import ImageError, OutputError, PercoError


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def _png16(samples: np.ndarray, color_type: int) -> bytes:
    """A 16-bit-per-sample PNG written by hand (Pillow cannot write 16-bit colour PNGs).

    Rows alternate between filter 0 (none) and filter 1 (sub) to exercise unfiltering.
    """
    h, w, ch = samples.shape
    bpp = 2 * ch
    rows = []
    for i in range(h):
        raw = np.frombuffer(samples[i].astype(">u2").tobytes(), np.uint8).astype(np.int32)
        if i % 2:
            filt = raw.copy()
            filt[bpp:] = (raw[bpp:] - raw[:-bpp]) % 256
            rows.append(b"\x01" + filt.astype(np.uint8).tobytes())
        else:
            rows.append(b"\x00" + raw.astype(np.uint8).tobytes())
    ihdr = struct.pack(">IIBBBBB", w, h, 16, color_type, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", ihdr)
        + _png_chunk(b"IDAT", zlib.compress(b"".join(rows)))
        + _png_chunk(b"IEND", b"")
    )


def _round257(v):
    return np.rint(np.asarray(v, dtype=np.float64) / 257.0).astype(np.uint8)


# ------------------------------------------------------------------------------------------ inputs


def test_16bit_grey_png_keeps_brightness(tmp_path):
    grad = np.tile(np.linspace(0, 65535, 64).astype(np.uint16), (16, 1))
    path = tmp_path / "g16.png"
    Image.fromarray(grad).save(path)  # mode I;16
    with Image.open(path) as img:
        assert img.mode.startswith("I")
    out = imageio.load_image(path)
    assert out.dtype == np.uint8 and out.shape == (16, 64, 3)
    ref = _round257(grad)
    assert abs(out[..., 0].astype(float).mean() - ref.astype(float).mean()) <= 1
    assert np.array_equal(out[..., 0], ref)
    assert out.max() == 255 and out.min() == 0
    assert not np.all(out[:, 1:] == 255)  # not clipped to white


@pytest.mark.parametrize("mode", ["I;16B", "I;16L", "I"])
def test_16bit_grey_modes(mode):
    value = 1000
    img = Image.new(mode, (4, 3), value)
    out = imageio.as_rgb_array(img)
    assert np.all(out == _round257(value))


def test_16bit_rgb_png_rounded_not_truncated(tmp_path):
    rng = np.random.default_rng(0)
    samples = rng.integers(0, 65536, (5, 7, 3)).astype(np.uint16)
    samples[0, 0] = (255 * 256 + 255, 200, 65535)  # high byte truncation would differ
    path = tmp_path / "rgb16.png"
    path.write_bytes(_png16(samples, 2))
    out = imageio.load_image(path)
    assert np.array_equal(out, _round257(samples))


def test_16bit_rgba_and_la_png_composited_over_white(tmp_path):
    rng = np.random.default_rng(1)
    rgba = rng.integers(0, 65536, (4, 6, 4)).astype(np.uint16)
    rgba[..., 3] = 65535
    rgba[0, 0, 3] = 0
    path = tmp_path / "rgba16.png"
    path.write_bytes(_png16(rgba, 6))
    out = imageio.load_image(path)
    assert np.array_equal(out[0, 0], [255, 255, 255])
    assert np.array_equal(out[1:], _round257(rgba[1:, :, :3]))

    la = rng.integers(0, 65536, (3, 5, 2)).astype(np.uint16)
    la[..., 1] = 65535
    la[2, 4, 1] = 0
    path = tmp_path / "la16.png"
    path.write_bytes(_png16(la, 4))
    out = imageio.load_image(path)
    assert np.array_equal(out[2, 4], [255, 255, 255])
    assert np.array_equal(out[0, :, 0], _round257(la[0, :, 0]))
    assert np.array_equal(out[..., 0], out[..., 2])


def test_uint16_array():
    arr = np.array([[[0, 257, 65535]]], dtype=np.uint16)
    assert imageio.as_rgb_array(arr).tolist() == [[[0, 1, 255]]]
    assert imageio.as_rgb_array(np.full((2, 3), 65535, np.uint16)).shape == (2, 3, 3)
    with pytest.raises(ImageError, match="expected a uint8 or uint16"):
        imageio.as_rgb_array(np.zeros((2, 2, 5), np.uint8))


def test_float_mode_scaled():
    img = Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32))
    assert img.mode == "F"
    assert imageio.as_rgb_array(img)[0, :, 0].tolist() == [0, 128, 255]
    img = Image.fromarray(np.array([[0.0, 100.0, 200.0]], dtype=np.float32))
    assert imageio.as_rgb_array(img)[0, :, 0].tolist() == [0, 100, 200]


def test_palette_with_transparency(tmp_path):
    img = Image.new("P", (4, 4), 0)
    img.putpalette([10, 20, 30, 200, 100, 50] + [0] * 762)
    img.putpixel((1, 1), 1)
    img.info["transparency"] = 0
    path = tmp_path / "p.png"
    img.save(path, transparency=0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = imageio.load_image(path)
    assert not caught
    assert np.array_equal(out[0, 0], [255, 255, 255])
    assert np.array_equal(out[1, 1], [200, 100, 50])


def test_palette_without_transparency(tmp_path):
    img = Image.new("P", (2, 2), 1)
    img.putpalette([0, 0, 0, 12, 34, 56] + [0] * 762)
    path = tmp_path / "p.png"
    img.save(path)
    assert np.all(imageio.load_image(path) == [12, 34, 56])


@pytest.mark.parametrize("mode,fill", [("LA", (100, 0)), ("RGBA", (10, 20, 30, 0))])
def test_transparent_pixels_become_white(tmp_path, mode, fill):
    img = Image.new(mode, (3, 3), fill)
    opaque = (100, 255) if mode == "LA" else (10, 20, 30, 255)
    img.putpixel((0, 0), opaque)
    path = tmp_path / "a.png"
    img.save(path)
    out = imageio.load_image(path)
    assert np.array_equal(out[1, 1], [255, 255, 255])
    assert np.array_equal(out[0, 0], [100, 100, 100] if mode == "LA" else [10, 20, 30])


def test_half_alpha_blends_with_white():
    out = imageio.as_rgb_array(Image.new("RGBA", (1, 1), (0, 0, 0, 128)))
    assert abs(int(out[0, 0, 0]) - 127) <= 1


@pytest.mark.parametrize("mode", ["L", "1", "CMYK", "YCbCr", "RGB"])
def test_other_modes(tmp_path, mode):
    img = Image.new("RGB", (5, 4), (255, 255, 255)).convert(mode)
    ext = ".jpg" if mode in ("CMYK", "YCbCr") else ".png"
    path = tmp_path / f"x{ext}"
    img.save(path, **({"quality": 100} if ext == ".jpg" else {}))
    out = imageio.load_image(path)
    assert out.shape == (4, 5, 3) and out.dtype == np.uint8
    assert out.min() >= 250


def test_cmyk_black():
    out = imageio.as_rgb_array(Image.new("CMYK", (2, 2), (0, 0, 0, 255)))
    assert np.all(out == 0)


def test_exif_orientation_applied(tmp_path):
    arr = np.zeros((20, 40, 3), np.uint8)
    arr[:, :20] = 255  # left half white
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise for display
    path = tmp_path / "o.jpg"
    Image.fromarray(arr).save(path, exif=exif.tobytes(), quality=95)
    out = imageio.load_image(path)
    assert out.shape == (40, 20, 3)
    assert out[5, 10].mean() > 200 and out[35, 10].mean() < 50  # left half is now the top
    assert imageio.read_image_size(path) == (40, 20)  # header size, before rotation


def test_bomb_guard_one_line_no_warning(tmp_path):
    path = tmp_path / "big.png"
    Image.new("RGB", (100, 50)).save(path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(ImageError, match=r"is 100x50 \(5000 pixels\), more than the limit of 4999 pixels") as info:
            imageio.load_image(path, max_pixels=4999)
    assert "\n" not in str(info.value)
    assert not caught
    assert imageio.load_image(path, max_pixels=5000).shape == (50, 100, 3)


def test_bomb_guard_checks_before_decoding(tmp_path, monkeypatch):
    path = tmp_path / "big.png"
    Image.new("RGB", (10, 10)).save(path)

    def boom(self, *a, **k):
        raise AssertionError("decoded before the size check")

    monkeypatch.setattr(Image.Image, "load", boom)
    from PIL import ImageFile

    monkeypatch.setattr(ImageFile.ImageFile, "load", boom)
    with pytest.raises(ImageError, match="more than the limit"):
        imageio.load_image(path, max_pixels=10)


def test_pillow_bomb_limit_is_one_line_and_silent(tmp_path, monkeypatch):
    path = tmp_path / "big.png"
    Image.new("RGB", (30, 30)).save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 300)  # 900 > 2 * 300: DecompressionBombError
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(ImageError, match="cannot read image") as info:
            imageio.load_image(path)
    assert "\n" not in str(info.value) and not caught
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 800)  # 900 > 800: only a warning, never printed
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert imageio.load_image(path).shape == (30, 30, 3)
        assert imageio.read_image_size(path) == (30, 30)
    assert not caught


def test_read_image_size(tmp_path):
    path = tmp_path / "s.png"
    Image.new("RGB", (7, 3)).save(path)
    assert imageio.read_image_size(path) == (7, 3)
    assert imageio.read_image_size("-") is None
    with pytest.raises(ImageError, match="does not exist"):
        imageio.read_image_size(tmp_path / "nope.png")


def test_read_errors_are_image_errors(tmp_path):
    with pytest.raises(ImageError, match="does not exist"):
        imageio.load_image(tmp_path / "missing.png")
    with pytest.raises(ImageError, match="is a directory"):
        imageio.load_image(tmp_path)
    junk = tmp_path / "junk.png"
    junk.write_bytes(b"not an image")
    with pytest.raises(ImageError, match="not a recognised image format"):
        imageio.load_image(junk)
    truncated = tmp_path / "trunc.png"
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (1, 2, 3)).save(buf, "PNG")
    truncated.write_bytes(buf.getvalue()[:60])
    with pytest.raises(ImageError, match="cannot read image"):
        imageio.load_image(truncated)


class _FakeStd:
    def __init__(self, data=b""):
        self.buffer = io.BytesIO(data)


def test_read_from_stdin(monkeypatch):
    buf = io.BytesIO()
    Image.new("RGB", (6, 2), (9, 8, 7)).save(buf, "PNG")
    monkeypatch.setattr(sys, "stdin", _FakeStd(buf.getvalue()))
    out = imageio.load_image("-")
    assert out.shape == (2, 6, 3) and np.all(out == [9, 8, 7])


def test_read_16bit_rgb_from_stdin(monkeypatch):
    samples = np.random.default_rng(2).integers(0, 65536, (3, 4, 3)).astype(np.uint16)
    monkeypatch.setattr(sys, "stdin", _FakeStd(_png16(samples, 2)))
    assert np.array_equal(imageio.load_image("-"), _round257(samples))


def test_stdin_empty_and_limit(monkeypatch):
    monkeypatch.setattr(sys, "stdin", _FakeStd(b""))
    with pytest.raises(ImageError, match="standard input"):
        imageio.load_image("-")
    buf = io.BytesIO()
    Image.new("RGB", (6, 2)).save(buf, "PNG")
    monkeypatch.setattr(sys, "stdin", _FakeStd(buf.getvalue()))
    with pytest.raises(ImageError, match=r"6x2 \(12 pixels\), more than the limit of 11"):
        imageio.load_image("-", max_pixels=11)


# ----------------------------------------------------------------------------------------- outputs


def test_output_format_by_extension():
    assert imageio.output_format("a.png") == "PNG"
    assert imageio.output_format("a.PNG") == "PNG"
    assert imageio.output_format("a.jpg") == "JPEG"
    assert imageio.output_format("a.JPEG") == "JPEG"
    assert imageio.output_format("a.WebP") == "WEBP"
    assert imageio.output_format("-") == "PNG"


@pytest.mark.parametrize("name", ["a.gif", "a.bmp", "noext"])
def test_unknown_extension_refused(tmp_path, name):
    with pytest.raises(OutputError, match=r"\.png, \.jpg, \.jpeg or \.webp"):
        imageio.output_format(name)
    with pytest.raises(OutputError, match="gif" if name == "a.gif" else "extension"):
        imageio.save_image(tmp_path / name, np.zeros((2, 2, 3), np.uint8))
    assert not (tmp_path / name).exists()


def test_save_image_formats(tmp_path):
    img = np.random.default_rng(3).integers(0, 256, (8, 9, 3)).astype(np.uint8)
    imageio.save_image(tmp_path / "a.png", img)
    imageio.save_image(tmp_path / "a.jpg", img)
    imageio.save_image(tmp_path / "a.jpeg", img)
    imageio.save_image(tmp_path / "a.webp", img)
    png = (tmp_path / "a.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n")
    assert (tmp_path / "a.jpg").read_bytes()[:2] == b"\xff\xd8"
    assert (tmp_path / "a.jpeg").read_bytes()[:2] == b"\xff\xd8"
    webp = (tmp_path / "a.webp").read_bytes()
    assert webp[:4] == b"RIFF" and webp[8:12] == b"WEBP"
    assert np.array_equal(imageio.load_image(tmp_path / "a.png"), img)
    assert np.array_equal(imageio.load_image(tmp_path / "a.webp"), img)  # lossless
    imageio.save_png(tmp_path / "forced.jpg", img)
    assert (tmp_path / "forced.jpg").read_bytes().startswith(b"\x89PNG")
    imageio.save_image(tmp_path / "forced2.png", img, format="JPEG")
    assert (tmp_path / "forced2.png").read_bytes()[:2] == b"\xff\xd8"


def test_dash_writes_to_stdout(monkeypatch, tmp_path):
    fake = _FakeStd()
    monkeypatch.setattr(sys, "stdout", fake)
    imageio.check_output("-")
    imageio.write_output("-", b"hello")
    assert fake.buffer.getvalue() == b"hello"
    fake2 = _FakeStd()
    monkeypatch.setattr(sys, "stdout", fake2)
    imageio.save_image("-", np.zeros((2, 2, 3), np.uint8))
    assert fake2.buffer.getvalue().startswith(b"\x89PNG")
    assert not (tmp_path / "-").exists() and not os.path.exists("-")


def test_symlink_followed(tmp_path):
    target = tmp_path / "real.bin"
    target.write_bytes(b"old")
    link = tmp_path / "link.bin"
    link.symlink_to(target)
    imageio.write_output(link, b"new bytes")
    assert link.is_symlink()
    assert target.read_bytes() == b"new bytes"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link.bin", "real.bin"]


def test_dangling_symlink_creates_target(tmp_path):
    link = tmp_path / "link.png"
    link.symlink_to(tmp_path / "new.png")
    imageio.check_output(link)
    imageio.write_output(link, b"x")
    assert link.is_symlink() and (tmp_path / "new.png").read_bytes() == b"x"


def test_fifo_refused(tmp_path):
    if not hasattr(os, "mkfifo"):
        pytest.skip("no os.mkfifo on this platform")
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)
    msg = r"refusing to write .*pipe\.png: it is a named pipe \(FIFO\), not a regular file; use - for standard output"
    with pytest.raises(OutputError, match=msg):
        imageio.check_output(fifo)
    with pytest.raises(OutputError, match=msg):
        imageio.write_output(fifo, b"data")
    assert stat.S_ISFIFO(os.stat(fifo).st_mode)  # not replaced
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pipe.png"]
    link = tmp_path / "link.png"
    link.symlink_to(fifo)
    with pytest.raises(OutputError, match="refusing to write"):
        imageio.write_output(link, b"data")


def test_dev_null_refused():
    if not os.path.exists("/dev/null"):
        pytest.skip("no /dev/null")
    with pytest.raises(OutputError, match="it is a character device, not a regular file"):
        imageio.check_output("/dev/null")
    with pytest.raises(OutputError, match="refusing to write /dev/null"):
        imageio.write_output("/dev/null", b"x")
    assert stat.S_ISCHR(os.stat("/dev/null").st_mode)


def test_folder_and_missing_parent_refused(tmp_path):
    with pytest.raises(OutputError, match="is a folder"):
        imageio.check_output(tmp_path)
    with pytest.raises(OutputError, match="is a folder"):
        imageio.write_output(tmp_path, b"x")
    with pytest.raises(OutputError, match="does not exist"):
        imageio.check_output(tmp_path / "no" / "such" / "out.png")
    with pytest.raises(OutputError, match="does not exist"):
        imageio.write_output(tmp_path / "no" / "out.png", b"x")
    assert issubclass(OutputError, PercoError)


@pytest.fixture
def umask():
    old = os.umask(0o022)
    os.umask(old)

    def set_mask(mask):
        os.umask(mask)

    yield set_mask
    os.umask(old)


@pytest.mark.parametrize("mask,expected", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_new_file_respects_umask(tmp_path, umask, mask, expected):
    umask(mask)
    path = tmp_path / "new.png"
    imageio.write_output(path, b"x")
    assert stat.S_IMODE(os.stat(path).st_mode) == expected


def test_existing_mode_kept(tmp_path, umask):
    umask(0o077)
    path = tmp_path / "old.png"
    path.write_bytes(b"old")
    os.chmod(path, 0o640)
    imageio.write_output(path, b"new")
    assert path.read_bytes() == b"new"
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o640


def test_failed_write_leaves_target_intact(tmp_path, monkeypatch):
    path = tmp_path / "keep.png"
    path.write_bytes(b"original")

    def fail(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OutputError, match=r"^cannot write .*keep\.png: No space left on device$") as info:
        imageio.write_output(path, b"new data")
    assert "\n" not in str(info.value)
    assert path.read_bytes() == b"original"
    assert [p.name for p in tmp_path.iterdir()] == ["keep.png"]  # no temp file left


def test_failed_fsync_leaves_no_temp(tmp_path, monkeypatch):
    path = tmp_path / "new.png"

    def fail(fd):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(os, "fsync", fail)
    with pytest.raises(OutputError, match="Input/output error"):
        imageio.write_output(path, b"data")
    assert list(tmp_path.iterdir()) == []


def test_interrupt_leaves_no_temp(tmp_path, monkeypatch):
    path = tmp_path / "x.png"
    path.write_bytes(b"original")

    def interrupt(*a):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", interrupt)
    with pytest.raises(KeyboardInterrupt):
        imageio.write_output(path, b"new")
    assert path.read_bytes() == b"original"
    assert [p.name for p in tmp_path.iterdir()] == ["x.png"]


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root ignores folder permissions")
def test_unwritable_folder(tmp_path):
    folder = tmp_path / "ro"
    folder.mkdir()
    os.chmod(folder, 0o500)
    try:
        with pytest.raises(OutputError, match="cannot write .*Permission denied"):
            imageio.write_output(folder / "out.png", b"x")
    finally:
        os.chmod(folder, 0o700)
