"""Image reading, padding, cropping and atomic writing."""

import os
import tempfile
from pathlib import Path

import numpy as np

from perco.engine.errors import ImageError, PercoError


def load_image(path) -> np.ndarray:
    """Read any Pillow-readable image as uint8 [H, W, 3] RGB."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    try:
        with Image.open(path) as img:
            img.load()
            return np.asarray(img.convert("RGB"), dtype=np.uint8)
    except FileNotFoundError:
        raise ImageError(f"image {path} does not exist") from None
    except IsADirectoryError:
        raise ImageError(f"image {path} is a directory") from None
    except UnidentifiedImageError:
        raise ImageError(f"cannot read image {path}: not a recognised image format") from None
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise ImageError(f"cannot read image {path}: {exc}") from None


def as_rgb_array(image) -> np.ndarray:
    """Accept a path, a PIL image or an array; return uint8 [H, W, 3]."""
    if isinstance(image, (str, os.PathLike)):
        return load_image(image)
    if hasattr(image, "convert"):  # PIL image
        return np.asarray(image.convert("RGB"), dtype=np.uint8)
    array = np.asarray(image)
    if array.ndim == 2:
        array = np.repeat(array[:, :, None], 3, axis=2)
    if array.ndim != 3 or array.shape[2] not in (3, 4) or array.dtype != np.uint8:
        raise ImageError(f"expected a uint8 [H, W, 3] image array, got {array.dtype} {array.shape}")
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


def atomic_write(path, data: bytes) -> None:
    """Write bytes via a temporary file in the same folder and rename: never a half-written file."""
    path = Path(path)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent or ".")
    except OSError as exc:
        raise PercoError(f"cannot write {path}: {exc.strerror or exc}") from None
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException as exc:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        if isinstance(exc, OSError):
            raise PercoError(f"cannot write {path}: {exc.strerror or exc}") from None
        raise


def save_png(path, image: np.ndarray) -> None:
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    atomic_write(path, buffer.getvalue())
