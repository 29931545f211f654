"""How large an image each backend can code: a memory estimate from the network sizes.

A bitstream header may claim any size up to 16384 x 16384, and a 17-byte file must not be able
to make a decoder allocate 17 GB. So the codec checks the claimed size against a limit before
any network runs. The limit is the largest pixel count whose estimated peak memory fits in
`MEMORY_FRACTION` of the memory the backend can use, and, for TensorRT, the engines'
optimization profile. `PERCO_MAX_PIXELS` (or `--max-pixels`) replaces the estimate.

The estimate (`coding_bytes`) is deliberately simple and errs high. Per image, with the latent
of T = h*w pixels (an image of 64*T pixels):
- UNet: 2 guidance branches x (activations and skip tensors ~ 8 x c0 x T floats) plus, where
  the backend has no memory-efficient attention, the score and softmax matrices of the
  highest-resolution attention: heads x (T / 4^level)^2 floats each;
- VAE decoder: ~4 live full-resolution tensors of c0 channels, plus its mid-block attention
  (one head over T tokens) without memory-efficient attention. Above `VAE_TILE_ABOVE` the latent
  is decoded in tiles (`perco.engine.codec.tiled`), so only one tile counts;
- weights: once (torch), twice for ONNX Runtime (initializers and prepacked copies), plus the
  runtime's own footprint (1 GiB for torch, 0.5 GiB for ONNX Runtime).
ONNX Runtime keeps each session's arena at its peak, so its stages add up; torch frees between
stages, so its peak is the largest stage.
"""

import os
from dataclasses import asdict, dataclass
from typing import Optional, Tuple

from perco.engine.errors import DecodeLimitError, PercoError, UsageError

MAX_PIXELS_ENV = "PERCO_MAX_PIXELS"
MEMORY_FRACTION = 0.85  # of the memory available when the codec opens
VAE_TILE = 64  # latent pixels per tile side (512 image pixels)
VAE_TILE_OVERLAP = 16  # latent pixels shared by neighbouring tiles, blended linearly
VAE_TILE_ABOVE = 128 * 128  # latents with more pixels are decoded in tiles (images above 1024 x 1024)
_FLOAT = 4


@dataclass(frozen=True)
class NetworkSizes:
    """The few network dimensions that decide decoding memory."""

    unet_channels: int  # UNet block_out_channels[0]
    unet_heads: int  # heads of its highest-resolution attention
    unet_attention_level: int  # downsampling level of that attention (0 = latent resolution)
    vae_channels: int  # VAE block_out_channels[0]: the channels at full image resolution
    weights_bytes: int  # all weights, float32
    latent_factor: int = 8  # image pixels per latent pixel
    max_side: int = 0  # padded image pixels a side the network can take at all (0: no bound), e.g. SD3's position table

    @classmethod
    def from_configs(cls, unet: dict, vae: dict, weights_bytes: int) -> "NetworkSizes":
        blocks = unet.get("down_block_types")
        blocks = blocks if isinstance(blocks, list) else ["CrossAttnDownBlock2D"]  # diffusers' default: attention first
        level = next((i for i, b in enumerate(blocks) if "Attn" in str(b)), 0)
        heads = unet.get("num_attention_heads") or unet.get("attention_head_dim") or 8  # diffusers' naming quirk
        heads = heads[min(level, len(heads) - 1)] if isinstance(heads, list) else heads
        return cls(int(unet["block_out_channels"][0]), int(heads), level, int(vae["block_out_channels"][0]),
                   int(weights_bytes))

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "NetworkSizes":
        return cls(**{k: int(d[k]) for k in cls.__dataclass_fields__ if k in d})


# Stable Diffusion 2.1 with a PerCo hyper-encoder: assumed for exports that did not record their sizes.
SD21_SIZES = NetworkSizes(unet_channels=320, unet_heads=5, unet_attention_level=0, vae_channels=128,
                          weights_bytes=5_200_000_000)


@dataclass(frozen=True)
class BackendMemory:
    """What a backend's peak memory depends on, besides the network sizes."""

    name: str
    memory_bytes: Optional[int]  # what it may use; None: unknown (no estimate-based limit)
    memory_efficient_attention: bool  # attention without materialising T x T scores
    stages_add_up: bool  # stage peaks are kept (ONNX Runtime's per-session arenas)
    weights_factor: float
    overhead_bytes: int = 0  # the runtime itself (libraries, interpreter, arenas' slack)
    max_size: Optional[Tuple[int, int]] = None  # (height, width) of padded images its profile accepts


def tiles(n: int) -> list:
    """Tile starts along one latent side of n pixels: VAE_TILE wide, VAE_TILE_OVERLAP shared."""
    if n <= VAE_TILE:
        return [0]
    stride = VAE_TILE - VAE_TILE_OVERLAP
    starts = list(range(0, n - VAE_TILE, stride))
    return starts + [n - VAE_TILE]


def vae_tiled(h: int, w: int) -> bool:
    """Whether a latent of h x w is decoded in tiles (by size alone, so every backend agrees)."""
    return h * w > VAE_TILE_ABOVE


def coding_bytes(sizes: NetworkSizes, backend: BackendMemory, latent_pixels: int, batch: int = 1,
                 tiled: Optional[bool] = None, encode: bool = False) -> int:
    """Estimated peak bytes for decoding `batch` images whose latent has `latent_pixels` pixels
    (`encode`: for encoding one, whose VAE encoder runs untiled at full resolution)."""
    t = latent_pixels
    if encode:
        vae = _FLOAT * 4 * sizes.vae_channels * sizes.latent_factor**2 * t
        vae += 0 if backend.memory_efficient_attention else _FLOAT * 2 * t**2
        return int(backend.overhead_bytes + backend.weights_factor * sizes.weights_bytes + vae
                   + _FLOAT * 3 * sizes.latent_factor**2 * t)
    tiled = t > VAE_TILE_ABOVE if tiled is None else tiled
    t_vae = min(t, VAE_TILE * VAE_TILE) if tiled else t
    branches = 2 * batch
    t_attn = t / 4**sizes.unet_attention_level
    unet = branches * _FLOAT * 8 * sizes.unet_channels * t
    if backend.memory_efficient_attention:
        unet += branches * _FLOAT * 4 * t_attn * sizes.unet_channels * 2**sizes.unet_attention_level
    else:
        unet += branches * _FLOAT * 2 * sizes.unet_heads * t_attn**2
    vae = batch * _FLOAT * 4 * sizes.vae_channels * sizes.latent_factor**2 * t_vae
    if not backend.memory_efficient_attention:
        vae += batch * _FLOAT * 2 * t_vae**2
    output = batch * _FLOAT * 2 * 3 * sizes.latent_factor**2 * t  # the float image (tiled: accumulator + weights)
    stages = unet + vae if backend.stages_add_up else max(unet, vae)
    return int(backend.overhead_bytes + backend.weights_factor * sizes.weights_bytes + stages + output)


def available_memory() -> Optional[int]:
    """Bytes of RAM available now (Linux MemAvailable), else the physical total, else None."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def backend_memory(name: str, max_size: Optional[Tuple[int, int]] = None,
                   host_memory: Optional[int] = None) -> BackendMemory:
    """The memory model of a backend by name; `host_memory` (default: available now) bounds the CPU backends."""
    if name == "torch":  # eager float32; diffusers' attention runs torch SDPA (flash attention on the CPU)
        return BackendMemory(name, host_memory or available_memory(), True, False, 1.0, 1 << 30)
    if name == "onnxruntime":  # exported MatMul + Softmax attention; one arena per session
        return BackendMemory(name, host_memory or available_memory(), False, True, 2.0, 1 << 29)
    # TensorRT: fused attention, device memory sized by the engines at build time; the profile bounds the size
    return BackendMemory(name, None, True, False, 1.0, 0, max_size)


@dataclass(frozen=True)
class DecodeLimit:
    """The largest image a codec decodes (and so encodes); `check` refuses larger ones."""

    max_pixels: Optional[int]  # None: no pixel limit
    max_size: Optional[Tuple[int, int]] = None  # (height, width) bound of padded images
    reason: str = ""  # where the limit comes from, for the error message
    max_encode_pixels: Optional[int] = None  # encoding needs its own memory too; None: max_pixels

    def check_image(self, width: int, height: int, pad_multiple: int, encode: bool = False) -> None:
        """`check` for an image of this size padded to `pad_multiple`; over bitstream.MAX_SIDE a side is a
        PercoError whatever the limit (the format cannot hold it)."""
        from perco.engine.bitstream import MAX_SIDE

        if max(width, height) > MAX_SIDE:
            raise PercoError(f"image {width}x{height} is larger than {MAX_SIDE} pixels on a side")
        m = pad_multiple
        self.check(width, height, (-(-height // m) * m, -(-width // m) * m), encode)

    def check(self, width: int, height: int, padded: Tuple[int, int], encode: bool = False) -> None:
        """DecodeLimitError naming how to raise the limit; `padded` is (height, width) as the networks see it."""
        if self.max_size is not None and (padded[0] > self.max_size[0] or padded[1] > self.max_size[1]):
            raise DecodeLimitError(
                f"image {width}x{height} (padded {padded[1]}x{padded[0]}) is larger than this model and backend take, "
                f"at most {self.max_size[1]}x{self.max_size[0]} (the network's position table, or the engines' "
                "profile: rebuild them with 'perco build --height/--width')")
        limit, what = self.max_pixels, "decode"
        if encode and self.max_encode_pixels is not None and (limit is None or self.max_encode_pixels < limit):
            limit, what = self.max_encode_pixels, "encode"
        pixels = padded[0] * padded[1]  # what the networks run on: a 1 x 16384 claim is 64 x 16384 of work
        if limit is not None and pixels > limit:
            size = f"{width}x{height}" + (f", padded to {padded[1]}x{padded[0]}" if (height, width) != padded else "")
            raise DecodeLimitError(
                f"image {size} ({pixels / 1e6:.2f} Mpx) is over the {what} limit of {limit / 1e6:.2f} Mpx "
                f"({self.reason}); raise it with --max-pixels N or {MAX_PIXELS_ENV}=N")


def parse_max_pixels(value) -> Optional[int]:
    """A positive pixel count from a flag or the environment ('4096x4096' or '16777216'); None if empty."""
    if value is None or str(value).strip() == "":
        return None
    text = str(value).strip().lower()
    try:
        parts = [int(v) for v in text.split("x")]
    except ValueError:
        parts = []
    if len(parts) not in (1, 2) or min(parts) < 1:
        raise UsageError(f"a pixel limit is a positive count or WxH, got {value!r}")
    return parts[0] * (parts[1] if len(parts) == 2 else 1)


def decode_limit(sizes: Optional[NetworkSizes], backend: BackendMemory, max_pixels=None, batch: int = 1) -> DecodeLimit:
    """The limit for this model and backend: `max_pixels` (argument, else PERCO_MAX_PIXELS) if set, else the estimate."""
    override = parse_max_pixels(max_pixels if max_pixels is not None else os.environ.get(MAX_PIXELS_ENV))
    max_size = backend.max_size
    if sizes is not None and sizes.max_side:
        side = (sizes.max_side, sizes.max_side)
        max_size = side if max_size is None else (min(max_size[0], side[0]), min(max_size[1], side[1]))
    if override is not None:
        return DecodeLimit(override, max_size, "set by --max-pixels or " + MAX_PIXELS_ENV)
    if backend.memory_bytes is None:
        return DecodeLimit(None, max_size, "")
    sizes = sizes or SD21_SIZES
    budget = MEMORY_FRACTION * backend.memory_bytes

    def largest(low, high, tiled, encode=False):  # the estimate grows with the size: bisect for the largest that fits
        while low < high:
            mid = (low + high + 1) // 2
            fits = coding_bytes(sizes, backend, mid, batch, tiled, encode) <= budget
            low, high = (mid, high) if fits else (low, mid - 1)
        return low

    latent = largest(0, VAE_TILE_ABOVE, False)
    if latent == VAE_TILE_ABOVE:  # every untiled size fits: go on with tiles (up to 16384 x 16384 images)
        latent = largest(VAE_TILE_ABOVE, 2048 * 2048, True)
    encode = largest(0, 2048 * 2048, None, encode=True)
    gib = backend.memory_bytes / 2**30
    return DecodeLimit(latent * sizes.latent_factor**2, max_size,
                       f"estimated peak memory on {backend.name} within {MEMORY_FRACTION:.0%} of {gib:.1f} GiB available",
                       min(encode, latent) * sizes.latent_factor**2)
