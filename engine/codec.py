"""The codec: compress an image to bytes and back, on any backend.

The decode loop, the sampler, the noise, the bitstream and the entropy coders live here (numpy)
and are shared by every backend; a backend only runs the networks of `GRAPHS`.

>>> from perco.engine import Codec                       # doctest: +SKIP
>>> codec = Codec.from_pretrained("perco-sd-0.0313")      # doctest: +SKIP
>>> data = codec.compress("kodim13.png", caption="a river in a forest")  # doctest: +SKIP
>>> image = codec.decompress(data)                        # doctest: +SKIP
"""

import math
import time
from contextlib import contextmanager
from typing import Optional

import numpy as np

from perco.engine import bitstream
from perco.engine.backends import open_backend
from perco.engine.bitstream import Header, Hints
from perco.engine.errors import PercoError
from perco.engine.imageio import as_rgb_array, from_model_output, pad_to_multiple, to_model_input
from perco.engine.limits import (
    VAE_TILE, VAE_TILE_OVERLAP, DecodeLimit, available_memory, backend_memory, decode_limit, tiles, vae_tiled,
)
from perco.engine.model import ModelSpec
from perco.engine.noise import gaussian_noise
from perco.engine.sampling import guided, make_sampler
from perco.engine.text import CaptionTokenizer, Retokenizer, caption_text


class StageTimings(dict):
    """Seconds per stage of the last call, in the order the stages ran."""

    @contextmanager
    def stage(self, name: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self[name] = self.get(name, 0.0) + time.perf_counter() - start

    def table(self) -> str:
        width = max(len(k) for k in self) if self else 0
        rows = [f"  {k:<{width}}  {v * 1000:9.1f} ms" for k, v in self.items()]
        rows.append(f"  {'total':<{width}}  {sum(self.values()) * 1000:9.1f} ms")
        return "\n".join(rows)


class Codec:
    """A model plus a backend. `compress` and `decompress` record `timings` per stage.

    `limit` bounds the image size both ways (see `perco.engine.limits`): by default, what the
    backend's memory and profile allow; `max_pixels` replaces the pixel count.
    """

    def __init__(self, model: ModelSpec, backend, limit: Optional[DecodeLimit] = None):
        self.model = model
        self.backend = backend
        self.limit = limit or DecodeLimit(None)
        self.timings = StageTimings()
        self._tokenizer: Optional[CaptionTokenizer] = None
        self._uncond_embedding: Optional[dict] = None
        self._retokenizer: Optional[Retokenizer] = None  # the optional text encoder's tokenizer, at first use

    @classmethod
    def from_pretrained(cls, folder=None, backend: str = "torch", artifacts=None, progress: bool = False,
                        max_pixels=None) -> "Codec":
        """A codec from a model folder and/or exported artifacts (`perco export`).

        backend "torch" runs the checkpoint; "onnxruntime" runs `artifacts` (exported from
        `folder` into the cache first when only `folder` is given). `max_pixels` (or the
        PERCO_MAX_PIXELS variable) replaces the size limit estimated from memory.
        """
        host_memory = available_memory()  # before the weights load: the estimate counts them itself
        spec, runner = open_backend(backend, folder, artifacts, progress)
        memory = backend_memory(runner.name, runner.max_size, host_memory)
        return cls(spec, runner, decode_limit(spec.sizes, memory, max_pixels))

    @property
    def max_pixels(self) -> Optional[int]:
        return self.limit.max_pixels

    @max_pixels.setter
    def max_pixels(self, value: Optional[int]) -> None:
        self.limit = DecodeLimit(value, self.limit.max_size, "set on the codec")

    def close(self) -> None:
        """Release the backend's resources (device memory; TensorRT-RTX saves its runtime cache)."""
        self.backend.close()

    def __enter__(self) -> "Codec":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # --- encoder side ---------------------------------------------------------------------

    def compress(self, image, caption: str = "", seed: int = 0, hints: Hints = Hints(), progress: bool = False,
                 send=None) -> bytes:
        """Image (path, PIL image or uint8 [H, W, 3]) + caption -> bitstream bytes.

        `send` (hybrid mode, a learned entropy model only): the index groups to transmit, as a count (int)
        or a fraction of the schedule's groups (float in (0, 1], rounded up); the decoder generates the
        rest. Images over the size limit are refused (DecodeLimitError): they could not be decoded.
        """
        if not 0 <= seed < 1 << 64:
            raise PercoError(f"seed must be in 0..2^64-1, got {seed}")
        if hints.guidance is not None:
            check_guidance(hints.guidance)
        if hints.steps is not None and not 1 <= hints.steps <= bitstream.MAX_STEPS:
            raise PercoError(f"the steps hint must be in 1..{bitstream.MAX_STEPS}, got {hints.steps}")
        self.timings = t = StageTimings()
        bar = _progress(None, progress, total=4, desc="compressing", unit="stage")
        try:
            with t.stage("prepare"):
                rgb = as_rgb_array(image)
                height, width = rgb.shape[:2]
                self.check_size(width, height, encode=True)
                x = to_model_input(pad_to_multiple(rgb, self.model.pad_multiple))  # [1, 3, H', W']
            with t.stage("vae_encode"):
                latent = self._run("vae_encoder", image=x)["latent"]  # [1, 4, H'/8, W'/8]
            bar.update()
            with t.stage("hyper_encode"):
                indices = self._run("hyper_encoder", latent=latent)["indices"][0]  # [gh, gw]
            bar.update()
            with t.stage("tokenize"):
                caption_ids = self._tokenize(caption)
            bar.update()
            with t.stage("entropy_encode"):
                groups = self._groups_sent(send, indices.shape)
                header = Header(self.model.fingerprint[: bitstream.FINGERPRINT_BYTES], width, height, seed, hints,
                                self.model.family, groups)
                data = bitstream.pack(header, caption_ids, indices, self.model.stream_spec, self.backend)
            bar.update()
        finally:
            bar.close()
        return data

    def _groups_sent(self, send, shape: tuple) -> Optional[int]:
        """The header's group count for `send` (None: every group, no hybrid flag)."""
        if send is None:
            return None
        coder = self.model.stream_spec.coder()
        total = coder.num_groups(shape)
        if isinstance(send, bool) or not isinstance(send, (int, float)) or not math.isfinite(send):
            raise PercoError(f"send must be a group count or a fraction in (0, 1], got {send!r}")
        if total == 1:
            raise PercoError(f"hybrid mode needs a learned entropy model: this model's {coder.name} index coding "
                             f"has one group (train one with 'perco train-entropy')")
        count = send if isinstance(send, int) else math.ceil(send * total - 1e-9)
        if isinstance(send, float) and not 0 < send <= 1 or not 1 <= count <= total:
            raise PercoError(f"send must be 1..{total} groups or a fraction in (0, 1], got {send!r}")
        return None if count == total else count

    def _tokenize(self, caption: str) -> np.ndarray:
        if not caption:
            return np.zeros(0, dtype=np.int64)
        if self._tokenizer is None:
            if self.model.tokenizer_dir is None:
                raise PercoError("this model has no tokenizer folder: cannot compress a caption")
            self._tokenizer = CaptionTokenizer(self.model.tokenizer_dir, self.model.tokens)
        return self._tokenizer(caption)

    # --- decoder side ---------------------------------------------------------------------

    def decompress(
        self,
        data: bytes,
        steps: Optional[int] = None,
        guidance: Optional[float] = None,
        sampler: Optional[str] = None,
        guidance_stop: int = 0,
        progress: bool = False,
    ) -> np.ndarray:
        """Bitstream bytes -> uint8 [H, W, 3] at the original size.

        `steps` and `guidance` default to the bitstream's hints, then to the model's defaults
        (20 steps below 0.05 bpp, 5 at or above; guidance 3.0). `sampler` defaults to the model's
        scheduler: "ddim" (the PerCo (SD) reference; or "dpmpp2m") for a beta schedule, "flow-euler" for
        flow matching. The last `guidance_stop` steps run the conditional branch only.
        """
        return self.decompress_batch([data], steps, guidance, sampler, guidance_stop, progress)[0]

    def decompress_batch(
        self,
        datas: list,
        steps: Optional[int] = None,
        guidance: Optional[float] = None,
        sampler: Optional[str] = None,
        guidance_stop: int = 0,
        progress: bool = False,
    ) -> list:
        """Decode bitstreams of one image size together (one network call per step for all).

        Steps and guidance come from the arguments, else the first bitstream's hints, else the
        model's defaults. Results can differ from one-by-one decoding in the last bits, since
        the networks run at another batch size.
        """
        if not datas:
            return []
        timings = StageTimings()
        with timings.stage("entropy_decode"):
            decoded = [self.unpack(data) for data in datas]
        return self.decompress_unpacked(decoded, steps, guidance, sampler, guidance_stop, progress, timings)

    def unpack(self, data: bytes) -> tuple:
        """Bitstream bytes -> (Header, caption content ids, indices [rows, cols]), checked against this model
        (BitstreamError; ModelMismatchError for another model's). What `decompress_unpacked` takes: a server
        checks each request once and decodes the valid ones together."""
        return bitstream.unpack(data, self.model.stream_spec, self.backend)

    def decode_settings(self, hints: Hints, steps: Optional[int] = None, guidance: Optional[float] = None) -> tuple:
        """(steps, guidance) a decode runs with: the arguments, else the bitstream's hints, else the model's
        defaults. PercoError for a guidance outside 0..MAX_GUIDANCE."""
        steps = steps or hints.steps or self.model.default_steps
        if guidance is None:
            guidance = hints.guidance if hints.guidance is not None else self.model.family_def.guidance
        return steps, check_guidance(guidance)

    def decompress_unpacked(self, decoded: list, steps: Optional[int] = None, guidance: Optional[float] = None,
                            sampler: Optional[str] = None, guidance_stop: int = 0, progress: bool = False,
                            timings: Optional[StageTimings] = None) -> list:
        """`decompress_batch` on what `unpack` returned, [(header, caption ids, indices), ...] of one image size."""
        if not decoded:
            return []
        self.timings = t = timings if timings is not None else StageTimings()
        headers = [header for header, _, _ in decoded]
        sizes = {(h.width, h.height) for h in headers}
        if len(sizes) > 1:
            raise PercoError(f"a batch must hold images of one size, got {sorted(sizes)}")
        self.check_size(headers[0].width, headers[0].height)
        steps, guidance = self.decode_settings(headers[0].hints, steps, guidance)
        family = self.model.family_def
        try:
            schedule = make_sampler(sampler, self.model.schedule, steps)
        except ValueError as exc:
            raise PercoError(str(exc)) from None
        if not 0 <= guidance_stop <= steps:
            raise PercoError(f"guidance_stop must be in 0..{steps} (the step count), got {guidance_stop}")
        batch = len(decoded)

        with t.stage("text_encode"):  # the family's text outputs, e.g. {text_embeddings: [B, 77, D]}
            cond = self._encode_text([caption for _, caption, _ in decoded])
            uncond = self._uncond()
            both = {k: np.concatenate([np.repeat(uncond[k], batch, axis=0), v]) for k, v in cond.items()}  # (uncond, cond)
        with t.stage("local_features"):  # once per image, reused by every step
            indices = np.stack([ids for _, _, ids in decoded]).astype(np.int64)  # [B, gh, gw]
            local = self._run("local_features", indices=indices)["local_features"]  # [B, M, h, w]
            local2 = np.concatenate([local, local])  # both guidance branches see the same layout
        h, w = local.shape[2:]
        noise_shape = (1, family.latent_channels, h, w)
        latent = np.concatenate([gaussian_noise(hd.seed, noise_shape) for hd in headers])  # [B, C, h, w]

        guided_steps = steps - guidance_stop
        with t.stage("denoise"):
            for i, step_t in enumerate(_progress(schedule.timesteps, progress)):
                if i < guided_steps:
                    out = self._run("denoiser", sample=np.concatenate([latent, latent]),
                                    timestep=np.full(2 * batch, step_t, dtype=np.float32),
                                    local_features=local2, **both)["model_output"]
                    out = guided(out, guidance)
                else:  # guidance stopped: the conditional branch alone, half the work
                    out = self._run("denoiser", sample=latent, timestep=np.full(batch, step_t, dtype=np.float32),
                                    local_features=local, **cond)["model_output"]
                latent = schedule.step(out, step_t, latent)
        with t.stage("vae_decode"):
            image = self._decode_latent(latent)  # [B, 3, f h, f w]
        with t.stage("postprocess"):
            f = family.latent_factor
            assert image.shape[2:] == (f * h, f * w), image.shape
            header = headers[0]
            out_images = [np.ascontiguousarray(from_model_output(image[i : i + 1])[: header.height, : header.width])
                          for i in range(batch)]
        return out_images

    def check_size(self, width: int, height: int, encode: bool = False) -> None:
        """DecodeLimitError if an image of this size is over the limit (to decode, or to `encode` and
        decode); called before any network runs."""
        self.limit.check_image(width, height, self.model.pad_multiple, encode)

    def _decode_latent(self, latent: np.ndarray) -> np.ndarray:
        """The VAE decoder, in overlapping tiles for large latents (`limits.vae_tiled`: by size alone)."""
        h, w = latent.shape[2:]
        if not vae_tiled(h, w):
            return self._run("vae_decoder", latent=latent)["image"]
        f = self.model.family_def.latent_factor
        image = np.zeros((latent.shape[0], 3, f * h, f * w), np.float32)
        total = np.zeros((f * h, f * w), np.float32)
        ys, xs = tiles(h), tiles(w)
        for y in ys:
            for x in xs:
                th, tw = min(VAE_TILE, h), min(VAE_TILE, w)
                part = self._run("vae_decoder", latent=np.ascontiguousarray(latent[:, :, y : y + th, x : x + tw]))
                weight = np.outer(_ramp(f * th, f, y > 0, y + th < h), _ramp(f * tw, f, x > 0, x + tw < w))
                image[:, :, f * y : f * (y + th), f * x : f * (x + tw)] += part["image"] * weight
                total[f * y : f * (y + th), f * x : f * (x + tw)] += weight
        return image / total

    def _encode_text(self, captions: list) -> dict:
        """The family's text outputs for caption token ids (e.g. text_embeddings [B, 77, D]), with the rows of
        its optional text encoder (PerCoV2's T5) filled in where the model has one."""
        per_caption = [self.model.text_input_ids(c) for c in captions]
        out = self._run("text_encoder", **{k: np.stack([ids[k] for ids in per_caption]) for k in per_caption[0]})
        out = {name: out[name] for name in self.model.family_def.text_outputs}
        if self.model.has_optional_text:
            optional = self.model.family_def.optional_text
            if self._retokenizer is None:
                self._retokenizer = Retokenizer(self.model.optional_text_dir, optional.max_length)
            ids = self._retokenizer([caption_text(c, self.model.tokenizer_dir) for c in captions])
            rows = self._run(optional.component, **{optional.input: ids})[optional.output]
            into = out[optional.into] = np.array(out[optional.into])
            into[:, optional.offset : optional.offset + optional.max_length] = rows
        return out

    def _uncond(self) -> dict:
        if self._uncond_embedding is None:  # the empty caption, once per codec
            self._uncond_embedding = self._encode_text([[]])
        return self._uncond_embedding

    def _run(self, graph: str, **inputs) -> dict:
        return self.backend.run(graph, inputs)


def check_guidance(guidance: float) -> float:
    """A finite guidance scale in 0..MAX_GUIDANCE (1 = conditional only, 0 = unconditional only)."""
    if not isinstance(guidance, (int, float)) or not math.isfinite(guidance) or not 0 <= guidance <= bitstream.MAX_GUIDANCE:
        raise PercoError(f"guidance must be a finite number in 0..{bitstream.MAX_GUIDANCE:g}, got {guidance}")
    return float(guidance)


def _ramp(n: int, factor: int, rise: bool, fall: bool) -> np.ndarray:
    """Blend weights along one tile side: linear over the overlap where a neighbour shares it, else 1."""
    edge = factor * VAE_TILE_OVERLAP
    ramp = (np.arange(edge, dtype=np.float32) + 0.5) / edge
    weight = np.ones(n, np.float32)
    if rise:
        weight[:edge] = ramp
    if fall:
        weight[n - edge :] = np.minimum(weight[n - edge :], ramp[::-1])
    return weight


class _NoProgress:
    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass


def _progress(items, enabled: bool, desc: str = "denoising", unit: str = "step", total=None):
    """A tqdm bar on stderr over `items` (or a manual one when items is None), or nothing."""
    if not enabled:
        return _NoProgress() if items is None else items
    from tqdm import tqdm

    return tqdm(items, desc=desc, unit=unit, total=total, leave=False, dynamic_ncols=True)
