"""Image reading, padding, cropping and safe (atomic) writing of outputs.

PerCo codes RGB only. Every reader here returns uint8 [H, W, 3]; an alpha channel (or a
palette / colour-key transparency) is composited over white and is not kept.
"""

import io
import os
import stat
import sys
import warnings

import numpy as np

from perco.engine.errors import ImageError, OutputError
from perco.engine.files import atomic_write

__all__ = [
    "load_image",
    "read_image_size",
    "as_rgb_array",
    "pad_to_multiple",
    "to_model_input",
    "from_model_output",
    "output_format",
    "check_output",
    "write_output",
    "save_image",
    "save_png",
]

STDIO = "-"

# EXIF orientation tag -> numpy transform of an [H, W, ...] array (same as PIL.ImageOps.exif_transpose).
_ORIENTATION = {
    2: lambda a: a[:, ::-1],
    3: lambda a: a[::-1, ::-1],
    4: lambda a: a[::-1],
    5: lambda a: a.swapaxes(0, 1),
    6: lambda a: np.rot90(a, -1),
    7: lambda a: np.rot90(a, 2).swapaxes(0, 1),
    8: lambda a: np.rot90(a, 1),
}


def _display(path) -> str:
    return "standard input" if str(path) == STDIO else str(path)


def _open_source(path):
    """Return something Image.open accepts: a path, or a BytesIO of all of standard input."""
    if str(path) == STDIO:
        try:
            data = sys.stdin.buffer.read()
        except (OSError, AttributeError, ValueError) as exc:
            raise ImageError(f"cannot read image from standard input: {exc}") from None
        if not data:
            raise ImageError("cannot read image from standard input: it is empty")
        return io.BytesIO(data)
    return os.fspath(path)


def _open_errors(path, exc):
    """Map an exception raised while opening/decoding to a one-line ImageError (or None)."""
    from PIL import Image, UnidentifiedImageError

    name = _display(path)
    if isinstance(exc, FileNotFoundError):
        return ImageError(f"image {name} does not exist")
    if isinstance(exc, IsADirectoryError):
        return ImageError(f"image {name} is a directory")
    if isinstance(exc, PermissionError):
        return ImageError(f"cannot read image {name}: permission denied")
    if isinstance(exc, UnidentifiedImageError):
        return ImageError(f"cannot read image {name}: not a recognised image format")
    if isinstance(exc, Image.DecompressionBombError):
        return ImageError(f"cannot read image {name}: {_one_line(exc)}")
    if isinstance(exc, (OSError, ValueError, SyntaxError, EOFError, MemoryError)):
        detail = getattr(exc, "strerror", None) or _one_line(exc) or type(exc).__name__
        return ImageError(f"cannot read image {name}: {detail}")
    return None


def _one_line(exc) -> str:
    return " ".join(str(exc).split())


def _check_pixels(path, size, max_pixels):
    if max_pixels is None:
        return
    w, h = size
    if w * h > max_pixels:
        raise ImageError(
            f"image {_display(path)} is {w}x{h} ({w * h} pixels), more than the limit of {max_pixels} pixels"
        )


def read_image_size(path):
    """(width, height) from the image header only (no pixel decoding), for early checks.

    Returns None for "-" (standard input cannot be read twice). The size is the stored one,
    before any EXIF rotation (which does not change the pixel count).
    """
    if str(path) == STDIO:
        return None
    from PIL import Image

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(os.fspath(path)) as img:
                return tuple(img.size)
    except Exception as exc:  # noqa: BLE001 - mapped to one line or re-raised
        err = _open_errors(path, exc)
        if err is None:
            raise
        raise err from None


def load_image(path, max_pixels=None) -> np.ndarray:
    """Read any Pillow-readable image as uint8 [H, W, 3] RGB.

    `path` may be "-" to read the whole of standard input. 16-bit and float images are scaled
    to 8 bits (round(v / 257) for 16-bit), palettes and CMYK / YCbCr are converted, EXIF
    orientation is applied. PerCo codes RGB only: alpha (and palette or colour-key
    transparency) is composited over white and is not kept. If `max_pixels` is given, an
    image with more pixels is refused (ImageError) from its header, before decoding.
    """
    from PIL import Image

    source = _open_source(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(source) as img:
                _check_pixels(path, img.size, max_pixels)
                wide = _wide_png(img, source)
                img.load()
                orientation = _orientation(img)
                rgb, alpha = wide if wide is not None else _pil_to_float(img)
    except ImageError:
        raise
    except Exception as exc:  # noqa: BLE001 - mapped to one line or re-raised
        err = _open_errors(path, exc)
        if err is None:
            raise
        raise err from None
    out = _composite(rgb, alpha)
    transform = _ORIENTATION.get(orientation)
    if transform is not None:
        out = np.ascontiguousarray(transform(out))
    return out


def _orientation(img) -> int:
    try:
        value = img.getexif().get(0x0112)
    except Exception:  # noqa: BLE001 - a broken EXIF block is not worth refusing the image
        return 1
    try:
        return int(value) if value is not None else 1
    except (TypeError, ValueError):
        return 1


def _wide_png(img, source):
    """16-bit-per-channel RGB / RGBA / LA PNG at full precision, or None.

    Pillow has no 16-bit colour mode and keeps only the high byte of each sample (truncating
    instead of rounding). The PNG decoder unfilters by the raw mode's pixel size, so decoding
    the same data again with a raw mode of the same size that picks the low bytes (or all
    bytes) recovers the exact 16-bit samples. Returns (rgb float [H, W, 3] on the 0..255
    scale, alpha float [H, W] in 0..1 or None); None when not applicable.
    """
    from PIL import Image

    if img.format != "PNG" or not img.tile or len(img.tile) != 1:
        return None
    rawmode = img.tile[0].args
    if isinstance(rawmode, tuple):
        rawmode = rawmode[0] if rawmode else None
    plans = {
        "RGB;16B": ("RGB", "RGB;16L", 3),
        "RGBA;16B": ("RGBA", "RGBA;16L", 4),
        "LA;16B": ("RGBA", "RGBA", 2),
    }
    if rawmode not in plans or img.mode != plans[rawmode][0]:
        return None
    mode, second, channels = plans[rawmode]
    try:
        img.load()
        if isinstance(source, io.BytesIO):
            source.seek(0)
        with Image.open(source) as twin:
            tile = twin.tile[0]
            args = tile.args
            args = (second,) + tuple(args[1:]) if isinstance(args, tuple) else second
            twin.tile = [tile._replace(args=args)]
            twin.load()
            other = np.asarray(twin, dtype=np.uint16)
        if rawmode == "LA;16B":
            # raw bytes per pixel: L hi, L lo, A hi, A lo
            samples = np.stack([other[..., 0] * 256 + other[..., 1], other[..., 2] * 256 + other[..., 3]], -1)
        else:
            high = np.asarray(img, dtype=np.uint16)
            samples = high * 256 + other
    except Exception:  # noqa: BLE001 - fall back to Pillow's own 8-bit decoding
        return None
    if samples.shape[-1] != channels:
        return None
    samples = samples.astype(np.float64)
    if channels == 2:
        rgb = np.repeat(samples[..., :1], 3, axis=2) / 257.0
        alpha = samples[..., 1] / 65535.0
    else:
        rgb = samples[..., :3] / 257.0
        alpha = samples[..., 3] / 65535.0 if channels == 4 else None
        key = img.info.get("transparency")
        if alpha is None and isinstance(key, tuple) and len(key) == 3:
            alpha = np.where(np.all(samples == np.asarray(key, dtype=np.float64), axis=-1), 0.0, 1.0)
    return rgb, alpha


def _pil_to_float(img):
    """Any PIL image -> (rgb float [H, W, 3] on the 0..255 scale, alpha float [H, W] in 0..1 or None)."""
    mode = img.mode
    if mode == "I" or mode.startswith("I;"):
        values = np.asarray(img.convert("I"), dtype=np.float64)
        key = img.info.get("transparency")
        alpha = None
        if isinstance(key, (int, float)) and not isinstance(key, bool):
            alpha = np.where(values == key, 0.0, 1.0)
        grey = np.clip(values, 0, 65535) / 257.0
        return np.repeat(grey[:, :, None], 3, axis=2), alpha
    if mode == "F":
        values = np.nan_to_num(np.asarray(img, dtype=np.float64), nan=0.0, posinf=0.0, neginf=0.0)
        # A float image has no declared range: values within [0, 1] are taken as 0..1,
        # within [0, 255] as 8-bit, anything larger as 16-bit.
        top = float(values.max()) if values.size else 0.0
        if top <= 1.0:
            grey = values * 255.0
        elif top <= 255.0:
            grey = values
        else:
            grey = values / 257.0
        grey = np.clip(grey, 0, 255)
        return np.repeat(grey[:, :, None], 3, axis=2), None
    has_alpha = "A" in mode or "a" in mode or "transparency" in img.info
    if mode == "P" and img.palette is not None and getattr(img.palette, "mode", "RGB") == "RGBA":
        has_alpha = True
    if has_alpha:
        if mode in ("RGBa", "La"):  # premultiplied
            img = img.convert("RGBA" if mode == "RGBa" else "LA")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "palette images with transparency ... should be RGBA"
            rgba = np.asarray(img.convert("RGBA"), dtype=np.float64)
        return rgba[..., :3], rgba[..., 3] / 255.0
    return np.asarray(img.convert("RGB"), dtype=np.float64), None


def _composite(rgb, alpha) -> np.ndarray:
    """Float RGB on the 0..255 scale (+ optional alpha 0..1) over white -> uint8 [H, W, 3]."""
    if alpha is not None:
        a = alpha[..., None]
        rgb = rgb * a + 255.0 * (1.0 - a)
    return np.ascontiguousarray(np.clip(np.rint(rgb), 0, 255).astype(np.uint8))


def as_rgb_array(image) -> np.ndarray:
    """Accept a path, a PIL image or an array; return uint8 [H, W, 3].

    Arrays may be uint8 or uint16 (scaled by round(v / 257)), [H, W] (grey) or [H, W, 3|4]
    (a fourth channel is dropped). PIL images and paths are converted as by load_image
    (alpha composited over white).
    """
    if isinstance(image, (str, os.PathLike)):
        return load_image(image)
    if hasattr(image, "convert") and hasattr(image, "mode"):  # PIL image
        return _composite(*_pil_to_float(image))
    array = np.asarray(image)
    if array.dtype == np.uint16:
        array = np.rint(array.astype(np.float64) / 257.0).astype(np.uint8)
    if array.ndim == 2:
        array = np.repeat(array[:, :, None], 3, axis=2)
    if array.ndim != 3 or array.shape[2] not in (3, 4) or array.dtype != np.uint8:
        raise ImageError(f"expected a uint8 or uint16 [H, W, 3] image array, got {array.dtype} {array.shape}")
    return np.ascontiguousarray(array[:, :, :3])


def pad_to_multiple(image: np.ndarray, multiple: int) -> np.ndarray:
    """[H, W, 3] -> [H', W', 3] with H', W' multiples of `multiple`, edge pixels repeated."""
    h, w = image.shape[:2]
    ph, pw = -h % multiple, -w % multiple
    if ph == 0 and pw == 0:
        return image
    return np.pad(image, ((0, ph), (0, pw), (0, 0)), mode="edge")


def to_model_input(image: np.ndarray) -> np.ndarray:
    """uint8 [H, W, 3] -> float32 [1, 3, H, W] in [-1, 1]."""
    return (image.astype(np.float32) / 127.5 - 1.0).transpose(2, 0, 1)[None]


def from_model_output(x: np.ndarray) -> np.ndarray:
    """float [1, 3, H, W] in [-1, 1] -> uint8 [H, W, 3] (round half to even, clipped)."""
    return np.clip(np.rint((x[0].astype(np.float32) + 1.0) * 127.5), 0, 255).astype(np.uint8).transpose(1, 2, 0)


# ----------------------------------------------------------------------------------------- outputs

_EXTENSIONS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP"}
_ACCEPTED = ".png, .jpg, .jpeg or .webp"


def output_format(path) -> str:
    """"PNG", "JPEG" or "WEBP" from the output path's extension (case-insensitive); "-" -> "PNG"."""
    if str(path) == STDIO:
        return "PNG"
    ext = os.path.splitext(os.fspath(path))[1]
    fmt = _EXTENSIONS.get(ext.lower())
    if fmt is None:
        what = f"unknown image extension '{ext}'" if ext else "no file extension"
        raise OutputError(f"cannot write {path}: {what} (use {_ACCEPTED}, or - for standard output)")
    return fmt


def _special_kind(mode):
    """Name of a non-regular, non-folder file type, or None for a regular file."""
    if stat.S_ISREG(mode):
        return None
    if stat.S_ISCHR(mode):
        return "character device"
    if stat.S_ISBLK(mode):
        return "block device"
    if stat.S_ISFIFO(mode):
        return "named pipe (FIFO)"
    if stat.S_ISSOCK(mode):
        return "socket"
    return "special file"


def _resolve_output(path):
    """Check an output path; return (resolved target, existing st_mode or None)."""
    target = os.path.realpath(os.fspath(path))
    try:
        st = os.stat(target)
    except FileNotFoundError:
        st = None
    except OSError as exc:
        raise OutputError(f"cannot write {path}: {exc.strerror or exc}") from None
    if st is not None:
        if stat.S_ISDIR(st.st_mode):
            raise OutputError(f"cannot write {path}: it is a folder")
        kind = _special_kind(st.st_mode)
        if kind is not None:
            raise OutputError(
                f"refusing to write {path}: it is a {kind}, not a regular file; use - for standard output"
            )
        return target, st.st_mode
    parent = os.path.dirname(target) or "."
    if not os.path.exists(parent):
        raise OutputError(f"cannot write {path}: folder {parent} does not exist")
    if not os.path.isdir(parent):
        raise OutputError(f"cannot write {path}: {parent} is not a folder")
    return target, None


def check_output(path) -> None:
    """Refuse an output path that cannot be written safely; call before doing any work.

    "-" (standard output) is fine. Symlinks are followed. A folder, a device, FIFO or socket,
    or a path whose folder does not exist raises OutputError.
    """
    if str(path) == STDIO:
        return
    _resolve_output(path)


def write_output(path, data: bytes) -> None:
    """Write bytes to an output path safely; "-" writes to standard output.

    Symlinks are followed (the target is replaced, the link stays). Special files are refused.
    The bytes go to a temporary file in the target's folder, which is flushed, fsynced, given
    the target's permission bits (or 0o666 & ~umask for a new file) and renamed over the
    target: on any failure the temporary file is removed and the target is left untouched.
    """
    if str(path) == STDIO:
        try:
            out = sys.stdout.buffer
            out.write(data)
            out.flush()
        except (OSError, ValueError, AttributeError) as exc:
            raise OutputError(f"cannot write standard output: {getattr(exc, 'strerror', None) or exc}") from None
        return
    target, existing = _resolve_output(path)
    try:
        atomic_write(target, data, stat.S_IMODE(existing) if existing is not None else None)
    except OSError as exc:
        raise OutputError(f"cannot write {path}: {exc.strerror or exc}") from None


def save_image(path, image, format=None) -> None:
    """Encode an image (anything as_rgb_array accepts) and write it with write_output.

    The format is output_format(path) unless given: PNG (lossless), JPEG (quality 95) or
    WEBP (lossless).
    """
    from PIL import Image

    fmt = output_format(path) if format is None else str(format).upper()
    if fmt == "JPG":
        fmt = "JPEG"
    options = {"PNG": {}, "JPEG": {"quality": 95}, "WEBP": {"lossless": True}}
    if fmt not in options:
        raise OutputError(f"cannot write {path}: unknown image format {format!r} (use PNG, JPEG or WEBP)")
    array = as_rgb_array(image)
    buffer = io.BytesIO()
    try:
        Image.fromarray(array, "RGB").save(buffer, format=fmt, **options[fmt])
    except (OSError, KeyError, ValueError) as exc:
        raise OutputError(f"cannot write {path}: cannot encode {fmt}: {_one_line(exc)}") from None
    write_output(path, buffer.getvalue())


def save_png(path, image: np.ndarray) -> None:
    """Write a lossless PNG (whatever the extension)."""
    save_image(path, image, "PNG")
