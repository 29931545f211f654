"""The bundled default model (tiny, random, made on first use), the sample image, and `perco demo`.

The model is written by `perco init-tiny`'s code on the torch side (the `init_tiny` hook of
`perco-engine[export]`, see `perco.engine.plugins`); once in the cache, the runtime alone uses it.
"""

import os
import sys
from pathlib import Path

import numpy as np

from perco.engine import plugins
from perco.engine.errors import PercoError

DEMO_RATE = "0.0313"
DEMO_SEED = 0
DEMO_CAPTION = "a red barn on a green hill under a blue sky"
_CACHE_VERSION = "1"  # bump when init-tiny's output changes


def cache_dir() -> Path:
    root = os.environ.get("PERCO_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "perco-engine"
    )
    return Path(root)


def default_model_folder() -> Path:
    return cache_dir() / f"tiny-{DEMO_RATE}-seed{DEMO_SEED}-v{_CACHE_VERSION}"


def default_model(progress: bool = True) -> Path:
    """The bundled default model: a tiny seeded model in the cache, created on first use."""
    folder = default_model_folder()
    if not folder.is_dir():
        init_tiny = plugins.load("perco.hooks", "init_tiny", "the bundled tiny model (made on first use)")
        if progress:
            print(f"creating the bundled tiny model in {folder} (first use) ...", file=sys.stderr)
        init_tiny(folder, rate=DEMO_RATE, seed=DEMO_SEED)
    return folder


def sample_image(width: int = 768, height: int = 512) -> np.ndarray:
    """A deterministic synthetic landscape: sky, sun, hills, a barn. uint8 [H, W, 3]."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    u, v = x / width, y / height
    img = np.empty((height, width, 3), np.float32)
    img[:] = np.stack([110 + 80 * v, 160 + 60 * v, 235 - 20 * v], axis=-1)  # sky gradient
    sun = (u - 0.8) ** 2 + ((v - 0.2) * height / width) ** 2 < 0.004
    img[sun] = (255, 230, 120)
    hill = v > 0.62 + 0.08 * np.sin(6.0 * u) + 0.03 * np.sin(23.0 * u)
    shade = (1.0 - 0.4 * v)[..., None]
    img[hill] = (np.array([70, 150, 60], np.float32) * shade)[hill]
    barn = (u > 0.25) & (u < 0.42) & (v > 0.45) & (v < 0.72)
    roof = (v <= 0.45) & (v > 0.45 - 0.12 * (1 - np.abs((u - 0.335) / 0.1))) & (np.abs(u - 0.335) < 0.1)
    img[barn | roof] = (170, 35, 30)
    door = (u > 0.31) & (u < 0.36) & (v > 0.58) & (v < 0.72)
    img[door] = (240, 240, 235)
    texture = np.sin(x * 0.9) * np.sin(y * 1.3) * 6.0  # a little high frequency content
    return np.clip(img + texture[..., None], 0, 255).astype(np.uint8)


def run_demo(args, codec) -> None:
    from perco.engine.imageio import load_image, save_image, write_output

    say = (lambda text: None) if args.quiet else print
    out = Path(args.out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise PercoError(f"cannot create output folder {out}: {exc.strerror or exc}") from None
    image = load_image(args.image, max_pixels=codec.limit.max_encode_pixels) if args.image else sample_image()
    random_weights = args.model is not None and Path(args.model).resolve() == default_model_folder().resolve()
    if random_weights:
        say("model: bundled tiny model with RANDOM weights - the decoded pixels are meaningless; "
            "pass --model DIR with a real PerCo (SD) checkpoint for real reconstructions")
    say(f"{codec.model.describe()}, backend {codec.backend.name}")

    from perco.engine.captioners import caption_for

    caption, captioning = caption_for(args, image, default="" if args.image else DEMO_CAPTION)
    data = codec.compress(image, caption=caption, progress=not args.quiet)
    compress_timings = type(codec.timings)({"caption": captioning, **codec.timings} if captioning else codec.timings)
    write_output(out / "image.perco", data)
    decoded = codec.decompress(data, steps=args.steps, progress=not args.quiet)
    save_image(out / "original.png", image)
    save_image(out / "decoded.png", decoded)
    h, w = image.shape[:2]
    bpp = 8 * len(data) / (w * h)
    right = f"decoded, {len(data)} bytes = {bpp:.4f} bpp" + (" (random tiny model: noise)" if random_weights else "")
    save_image(out / "side_by_side.png", side_by_side(image, decoded, "original", right))

    say(f"image {w}x{h}: {len(data)} bytes = {bpp:.4f} bpp -> {out / 'image.perco'}")
    say(f"decoded {decoded.shape[1]}x{decoded.shape[0]} -> {out / 'side_by_side.png'} (left: original, right: decoded)")
    say("stage timings (compress):\n" + compress_timings.table())
    say("stage timings (decompress):\n" + codec.timings.table())


LABEL_HEIGHT = 24


def side_by_side(left: np.ndarray, right: np.ndarray, left_label: str, right_label: str) -> np.ndarray:
    """Two images of one size next to each other, each under a white band with its label."""
    from PIL import Image, ImageDraw

    h, w = left.shape[:2]
    canvas = Image.new("RGB", (2 * w, h + LABEL_HEIGHT), (255, 255, 255))
    canvas.paste(Image.fromarray(left), (0, LABEL_HEIGHT))
    canvas.paste(Image.fromarray(right), (w, LABEL_HEIGHT))
    draw = ImageDraw.Draw(canvas)
    for x, label in ((0, left_label), (w, right_label)):
        draw.text((x + 6, 6), label, fill=(0, 0, 0))
    return np.asarray(canvas)
