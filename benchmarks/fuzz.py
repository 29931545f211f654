"""Bitstream fuzzing: two targets, a seeded mutation generator, and a campaign runner.

Targets, in atheris style (`fuzz_one(data)` returns for an accepted input or an expected error and
lets anything else propagate):

    parse   bitstream.parse and the full entropy decode (bitstream.unpack) against the stream
            geometry of the tiny model, built without torch. An accepted input must give indices
            of the header's grid and caption ids inside the vocabulary, and must survive a
            re-pack -> unpack round trip (grids up to 2^16 tokens). Expected: BitstreamError only.
    decode  Codec.decompress on the torch backend with a tiny model, steps=1, max_pixels 256*256,
            so a claimed size above that ends in DecodeLimitError before any network runs.
            Expected: any PercoError; an accepted input must give uint8 [height, width, 3].

Input i of a campaign depends only on (seed, i), so any input can be made again from its index.
The campaign (docs/fuzzing.md has the figures of the recorded runs):

    python -m perco.benchmarks.fuzz --target parse --inputs 1000000 --seed 0 \
        --out benchmarks/results/fuzz-parse-1e6.json
    python -m perco.benchmarks.fuzz --target decode --inputs 150000 --seed 0 \
        --out benchmarks/results/fuzz-decode-150k.json
    python -m perco.benchmarks.fuzz --target parse --replay tests/data/fuzz-regressions/*.json
    python -m perco.benchmarks.fuzz --target parse --atheris -- -atheris_runs=100000   # if installed

An unexpected exception, an input over --time-limit (1 s, twice: a slow input is timed again) or
over --hang-limit (10 s, interrupted by SIGALRM) is a failure: it is saved under --crash-dir as
JSON (target, hex, error, traceback), the format of the regression cases in
tests/data/fuzz-regressions/, and the exit status is 1.
"""

import argparse
import heapq
import json
import os
import platform
import random
import re
import resource
import shlex
import signal
import struct
import subprocess
import sys
import tempfile
import time
import traceback
import zlib
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from perco.engine import bitstream
from perco.engine.bitstream import Header, Hints, StreamSpec
from perco.engine.errors import BitstreamError, PercoError
from perco.engine.text import TokenLayout

REPO = Path(__file__).resolve().parent.parent
GOLDEN = REPO / "tests" / "golden" / "bitstreams.json"
CLIP_TOKENIZER = REPO / "tests" / "data" / "clip-tokenizer"

# The stream geometry of the tiny model (`perco init-tiny`, rate 0.0313, the real CLIP vocabulary):
# codebook 256, 16 pixels per token, padding to 16; the fingerprint is the golden bitstreams' one
# (tests/golden/bitstreams.json), so those are valid seeds as they are.
CLIP = TokenLayout(vocab_size=49408, bos_id=49406, eos_id=49407, pad_id=0)
TINY_SPEC = StreamSpec(fingerprint=bytes.fromhex("0123456789abcdef0011223344556677"), tokens=CLIP,
                       codebook_size=256, token_stride=16, pad_multiple=16)
CAPTION = [320, 736, 10942, 593, 320, 10750, 530, 518, 5994]  # "a red barn with a pond in the background"
DECODE_MAX_PIXELS = 256 * 256
TIME_LIMIT = 1.0  # seconds per input; slower inputs are failures
HANG_LIMIT = 10.0  # seconds after which an input is interrupted (a hang)
TARGETS = ("parse", "decode")
ROUND_TRIP_TOKENS = 1 << 16  # accepted inputs up to this many tokens are re-packed and decoded again
RETIME_SLOWEST = 20  # the slowest inputs of a campaign are timed again at the end (best of 3)


# --- targets ----------------------------------------------------------------------------------


class ParseTarget:
    """bitstream.unpack (parse + caption and index decode) with invariants on what it accepts."""

    name = "parse"
    expected = (BitstreamError,)

    def __init__(self, spec: StreamSpec = TINY_SPEC):
        self.spec = spec

    def __call__(self, data: bytes) -> None:
        header, caption, indices = bitstream.unpack(data, self.spec)
        layout = self.spec.tokens
        assert indices.shape == self.spec.token_grid(header.width, header.height), indices.shape
        assert indices.size == 0 or 0 <= indices.min() <= indices.max() < self.spec.codebook_size
        assert caption.size <= layout.max_content
        assert not np.isin(caption, [layout.bos_id, layout.eos_id]).any() and (caption < layout.vocab_size).all()
        if indices.size <= ROUND_TRIP_TOKENS:  # re-pack -> unpack gives the same (larger grids: decode time only)
            again = bitstream.unpack(bitstream.pack(header, caption, indices, self.spec), self.spec)
            assert again[0] == header, (again[0], header)
            assert np.array_equal(again[1], caption) and np.array_equal(again[2], indices)


class DecodeTarget:
    """Codec.decompress at tiny size: steps=1 (or `steps`; None: the hint's), a small pixel limit.

    `threads` sets torch's thread count (the torch backend's): on a busy 2-core machine two OpenMP
    threads turned 20 ms decodes into 2-3 s ones (spinning workers), one thread keeps them at 20 ms.
    """

    name = "decode"
    expected = (PercoError,)

    def __init__(self, codec, steps: Optional[int] = 1, max_pixels: int = DECODE_MAX_PIXELS,
                 threads: Optional[int] = None):
        self.codec = codec
        self.steps = steps
        codec.max_pixels = max_pixels
        self.spec = codec.model.stream_spec
        if threads:
            import torch

            torch.set_num_threads(threads)

    def warm_up(self, seeds: list) -> None:
        """One decode before the clock starts: the first one pays for lazy initialisation."""
        self(seeds[0])

    def __call__(self, data: bytes) -> None:
        image = self.codec.decompress(data, steps=self.steps)
        header = bitstream.parse(data)[0]
        assert image.dtype == np.uint8 and image.shape == (header.height, header.width, 3), image.shape


def tiny_model_folder(folder: Optional[Path] = None) -> Path:
    """A tiny model (rate 0.0313, the CLIP vocabulary of tests/data when present), written once."""
    from perco.engine import plugins

    folder = Path(folder or Path(tempfile.gettempdir()) / f"perco-fuzz-tiny-{os.getuid()}")
    if not (folder / "model_index.json").exists():
        init_tiny = plugins.load("perco.hooks", "init_tiny", "the decode fuzz target")
        init_tiny(folder, tokenizer=CLIP_TOKENIZER if CLIP_TOKENIZER.is_dir() else None)
    return folder


def make_target(name: str, model=None, codec=None, steps: Optional[int] = 1, threads: Optional[int] = 1):
    """The target called `name`; "parse" reads `model`'s stream spec if given, "decode" opens
    `codec` (or a torch codec of `model`, or of a tiny model made in the temp folder)."""
    if name == "parse":
        if model is None:
            return ParseTarget()
        from perco.engine.model import ModelInfo

        return ParseTarget(ModelInfo(model).stream_spec)
    if name == "decode":
        if codec is None:
            from perco.engine import Codec

            codec = Codec.from_pretrained(model or tiny_model_folder(), backend="torch")
        return DecodeTarget(codec, steps, threads=threads)
    raise ValueError(f"unknown fuzz target {name!r}: {', '.join(TARGETS)}")


_TARGETS: dict = {}


def fuzz_one(data: bytes, target: str = "parse") -> None:
    """Atheris-style entry point: returns for an accepted input or an expected error (BitstreamError
    for "parse", any PercoError for "decode"); any other exception propagates."""
    if target not in _TARGETS:
        _TARGETS[target] = make_target(target)
    fn = _TARGETS[target]
    try:
        fn(bytes(data))
    except fn.expected:
        pass


# --- bitstream structure ------------------------------------------------------------------------


def varint(value: int) -> bytes:
    """Unsigned LEB128 of any value >= 0 (also 2^64 and above, which readers must refuse)."""
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def with_crc(body: bytes) -> bytes:
    return bytes(body) + struct.pack("<I", zlib.crc32(body))


def split(data: bytes) -> list:
    """A valid bitstream -> its fields as [name, bytes] pairs (body only; the CRC is left off).

    Names: magic, fingerprint, flags, family, width, height, seed, hint_count, hint_key, hint_value,
    caption_len, caption, index. Joining the bytes gives the body back.
    """
    body, pos, fields = bytes(data[: -bitstream.CRC_BYTES]), 0, []

    def take(name, n):
        nonlocal pos
        fields.append([name, body[pos : pos + n]])
        pos += n

    def take_varint(name):
        n = 1
        while body[pos + n - 1] & 0x80:
            n += 1
        value = sum((b & 0x7F) << (7 * i) for i, b in enumerate(body[pos : pos + n]))
        take(name, n)
        return value

    take("magic", 1)
    take("fingerprint", bitstream.FINGERPRINT_BYTES)
    flags = body[pos]
    take("flags", 1)
    if flags & bitstream.FLAG_FAMILY:
        take("family", 1)
    if flags & bitstream.FLAG_SIZE:
        take_varint("width")
        take_varint("height")
    if flags & bitstream.FLAG_SEED:
        take_varint("seed")
    if flags & bitstream.FLAG_HINTS:
        for _ in range(take_varint("hint_count")):
            take("hint_key", 1)
            take_varint("hint_value")
    caption = take_varint("caption_len")
    take("caption", caption)
    take("index", len(body) - pos)
    return fields


def join(fields: list) -> bytes:
    return b"".join(value for _, value in fields)


# --- seeds ----------------------------------------------------------------------------------------


def make_seed(spec: StreamSpec, width: int, height: int, seed: int = 0, hints: Hints = Hints(),
              caption=CAPTION, index_seed: int = 0, zero_indices: bool = False) -> bytes:
    rows, cols = spec.token_grid(width, height)
    rng = np.random.default_rng(index_seed)
    indices = np.zeros((rows, cols), np.int64) if zero_indices else rng.integers(0, spec.codebook_size, (rows, cols))
    header = Header(spec.fingerprint[: bitstream.FINGERPRINT_BYTES], width, height, seed, hints, spec.family)
    return bitstream.pack(header, caption, indices, spec)


def refingerprint(data: bytes, spec: StreamSpec) -> bytes:
    body = bytearray(data[: -bitstream.CRC_BYTES])
    body[1 : 1 + bitstream.FINGERPRINT_BYTES] = spec.fingerprint[: bitstream.FINGERPRINT_BYTES]
    return with_crc(bytes(body))


def seed_corpus(spec: StreamSpec, tiny: bool = False) -> list:
    """Valid bitstreams for `spec` covering every header field, both caption ends and an empty
    index stream; `tiny` keeps to sizes a tiny decode does in milliseconds. The golden bitstreams
    join them (fingerprint replaced) where tests/golden is present."""
    layout = spec.tokens

    def ids(values):  # caption ids valid in this vocabulary
        values = [int(v) % layout.vocab_size for v in values]
        return [v for v in values if v not in (layout.bos_id, layout.eos_id)]

    caption, long_caption = ids(CAPTION), ids(np.random.default_rng(75).integers(0, 49406, 80))
    cases = [
        (16, 16, 0, Hints(), caption, False),
        (33, 17, 0, Hints(), caption[:2], False),
        (48, 32, 3, Hints(steps=1), [], False),
        (1, 1, (1 << 64) - 1, Hints(steps=1, guidance=0.0), caption, False),
        (64, 48, 0, Hints(guidance=50.0), long_caption, False),
        (40, 8, 5, Hints(), caption, True),  # an empty index stream: the all-zero grid
    ]
    if not tiny:
        cases += [
            (512, 512, 0, Hints(), caption, False),
            (96, 40, 3, Hints(steps=4), [], False),
            (16384, 16, 0, Hints(guidance=3.0), caption[:1], False),
            (300, 200, 7, Hints(steps=1000, guidance=7.5), caption, False),
        ]
    seeds = [make_seed(spec, w, h, s, hint, cap, index_seed=i, zero_indices=zero)
             for i, (w, h, s, hint, cap, zero) in enumerate(cases)]
    if GOLDEN.exists():
        for value in json.loads(GOLDEN.read_text()).values():
            data = refingerprint(bytes.fromhex(value), spec)
            header = bitstream.parse(data)[0]
            if not tiny or header.width * header.height <= 64 * 64:
                seeds.append(data)
    return seeds


# --- mutations ------------------------------------------------------------------------------------

INTERESTING = sorted({0, 1, 2, 3, 7, 15, 16, 17, 63, 64, 65, 127, 128, 255, 256, 257, 511, 512, 513, 999, 1000,
                      1001, 4999, 5000, 5001, 16383, 16384, 16385, 1 << 16, (1 << 31) - 1, 1 << 31, (1 << 32) - 1,
                      1 << 32, 1 << 53, (1 << 63) - 1, 1 << 63, (1 << 64) - 1, 1 << 64, (1 << 70) - 1})
SIDES = [0, 1, 2, 15, 16, 17, 63, 64, 65, 255, 256, 257, 511, 512, 513, 4096, 16383, 16384, 16385, 1 << 32,
         (1 << 64) - 1]
HINT_KEYS = [0, bitstream.HINT_STEPS, bitstream.HINT_GUIDANCE_CENTI, 3, 127, 128, 255]
VARINT_FIELDS = ("width", "height", "seed", "hint_count", "hint_value", "caption_len")


def _bytes(rng: random.Random, n: int) -> bytes:
    return rng.getrandbits(8 * n).to_bytes(n, "little") if n else b""


def _value(rng: random.Random) -> int:
    return rng.choice(INTERESTING) if rng.random() < 0.7 else rng.getrandbits(rng.randint(1, 64))


def _encode(rng: random.Random, value: int) -> bytes:
    """Mostly canonical; sometimes non-canonical (a trailing zero group), overlong, or unterminated."""
    r = rng.random()
    if r < 0.8:
        return varint(value)
    if r < 0.9:
        raw = bytearray(varint(value))
        raw[-1] |= 0x80
        return bytes(raw) + b"\x80" * rng.randint(0, 10) + b"\x00"
    if r < 0.95:
        return b"\xff" * rng.randint(9, 12) + b"\x01"
    return bytes(b | 0x80 for b in varint(value))  # continuation bit on the last byte


def _field(fields: list, names, rng: random.Random) -> Optional[int]:
    spots = [i for i, (name, _) in enumerate(fields) if name in names]
    return rng.choice(spots) if spots else None


def _set_flag(fields: list, flag: int) -> None:
    fields[2][1] = bytes([fields[2][1][0] | flag])


def _ensure_size(fields: list) -> None:
    if not any(name == "width" for name, _ in fields):
        _set_flag(fields, bitstream.FLAG_SIZE)
        at = 4 if fields[3][0] == "family" else 3
        fields[at:at] = [["width", varint(512)], ["height", varint(512)]]


def _resync_caption(fields: list) -> None:
    """The caption length field set to the caption stream's byte count again."""
    for i in range(len(fields) - 1):
        if fields[i][0] == "caption_len" and fields[i + 1][0] == "caption":
            fields[i][1] = varint(len(fields[i + 1][1]))


def _mutate_bytes(raw: bytes, rng: random.Random, ops: int) -> bytes:
    data = bytearray(raw)
    for _ in range(ops):
        op = rng.randrange(5)
        if op == 0 and data:
            data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
        elif op == 1 and data:
            data[rng.randrange(len(data))] = rng.randrange(256)
        elif op == 2:
            data.insert(rng.randint(0, len(data)), rng.randrange(256))
        elif op == 3 and data:
            del data[rng.randrange(len(data))]
        elif data:  # a run of equal bytes (0x00, 0xff or any)
            pos = rng.randrange(len(data))
            n = min(rng.randint(1, 8), len(data) - pos)
            data[pos : pos + n] = bytes([rng.choice((0, 0xFF, rng.randrange(256)))]) * n
    return bytes(data)


def m_random(fields, rng, seeds):
    """Random bytes (0..96), half of them behind a valid magic byte and fingerprint."""
    data = _bytes(rng, rng.randint(0, 96))
    if rng.random() < 0.5:
        data = join(fields[:2]) + data
    return data


def m_bitflip(fields, rng, seeds):
    """1..4 bit flips anywhere in the body."""
    data = bytearray(join(fields))
    for _ in range(rng.randint(1, 4)):
        data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
    return bytes(data)


def m_bytes(fields, rng, seeds):
    """1..4 byte edits anywhere in the body: flip, overwrite, insert, delete, runs of one byte."""
    return _mutate_bytes(join(fields), rng, rng.randint(1, 4))


def m_truncate(fields, rng, seeds):
    """The body cut at any point (with the CRC fixed, the reader sees a short but intact file)."""
    data = join(fields)
    return data[: rng.randrange(len(data))]


def m_extend(fields, rng, seeds):
    """1..64 random bytes appended to the body, or inserted at a field boundary."""
    extra = _bytes(rng, rng.randint(1, 64))
    if rng.random() < 0.5:
        return join(fields) + extra
    i = rng.randint(0, len(fields))
    return join(fields[:i]) + extra + join(fields[i:])


def m_splice(fields, rng, seeds):
    """The head of one seed and the tail of another, at any byte or at field boundaries."""
    other = split(rng.choice(seeds))
    if rng.random() < 0.5:
        a, b = join(fields), join(other)
        return a[: rng.randint(0, len(a))] + b[rng.randint(0, len(b)) :]
    return join(fields[: rng.randint(0, len(fields))] + other[rng.randint(0, len(other)) :])


def m_varint(fields, rng, seeds):
    """One varint field (size, seed, hint count or value, caption length) set to an edge value."""
    i = _field(fields, VARINT_FIELDS, rng)
    if i is None:
        return m_bitflip(fields, rng, seeds)
    fields[i][1] = _encode(rng, _value(rng))
    return join(fields)


def m_size(fields, rng, seeds):
    """Width and height set to edge values (0, 1, multiples of 16 and their neighbours, 16384,
    16385, 2^64-1); the index stream kept, emptied (an all-zero grid) or made random."""
    _ensure_size(fields)
    w = _field(fields, ("width",), rng)
    fields[w][1] = _encode(rng, rng.choice(SIDES) if rng.random() < 0.8 else rng.randint(1, 600))
    fields[w + 1][1] = _encode(rng, rng.choice(SIDES) if rng.random() < 0.8 else rng.randint(1, 600))
    r = rng.random()
    if r < 0.4:
        fields[-1][1] = b""
    elif r < 0.6:
        fields[-1][1] = _bytes(rng, rng.randint(1, 2048)).rstrip(b"\0")
    return join(fields)


def m_hints(fields, rng, seeds):
    """The hint section rewritten: a count from 0 to 2^64-1 (matching the entries or not), keys
    steps, guidance and unknown ones, values at the bounds (0, 1000, 1001, 5000, 5001, 2^64-1)."""
    fields = [f for f in fields if f[0] not in ("hint_count", "hint_key", "hint_value")]
    _set_flag(fields, bitstream.FLAG_HINTS)
    n = rng.choice((0, 1, 2, 3, 16, 17)) if rng.random() < 0.8 else rng.randint(0, 40)
    entries = []
    for _ in range(n):
        key = rng.choice(HINT_KEYS) if rng.random() < 0.8 else rng.randrange(256)
        entries += [["hint_key", bytes([key])], ["hint_value", _encode(rng, _value(rng))]]
    count = n if rng.random() < 0.7 else _value(rng)
    at = _field(fields, ("caption_len",), rng)
    fields[at:at] = [["hint_count", _encode(rng, count)]] + entries
    return join(fields)


def m_flags(fields, rng, seeds):
    """The flags byte set at random (fields then read out of step) or one defined flag toggled."""
    fields[2][1] = bytes([rng.randrange(256) if rng.random() < 0.3 else fields[2][1][0] ^ (1 << rng.randrange(4))])
    return join(fields)


def m_family(fields, rng, seeds):
    """The family flag set with an id (0, which is never written, 1 = percov2, unknown ones) or cleared."""
    fields = [f for f in fields if f[0] != "family"]
    if rng.random() < 0.2:
        fields[2][1] = bytes([fields[2][1][0] & ~bitstream.FLAG_FAMILY])
    else:
        _set_flag(fields, bitstream.FLAG_FAMILY)
        fields.insert(3, ["family", bytes([rng.choice((0, 1, 1, 2, 15, 255, rng.randrange(256)))])])
    return join(fields)


def m_caption(fields, rng, seeds):
    """The caption stream edited, emptied, or made random; its length field mostly kept in step."""
    i = _field(fields, ("caption",), rng)
    r = rng.random()
    if r < 0.6:
        fields[i][1] = _mutate_bytes(fields[i][1], rng, rng.randint(1, 3))
    elif r < 0.8:
        fields[i][1] = _bytes(rng, rng.randint(0, 64))
    else:
        fields[i][1] = fields[i][1][: rng.randint(0, len(fields[i][1]))]
    if rng.random() < 0.8:
        _resync_caption(fields)
    return join(fields)


def m_index(fields, rng, seeds):
    """The index stream edited, cut, extended, emptied, or replaced by random bytes."""
    raw, r = fields[-1][1], rng.random()
    if r < 0.5:
        raw = _mutate_bytes(raw, rng, rng.randint(1, 4))
    elif r < 0.65:
        raw = raw[: rng.randint(0, len(raw))]
    elif r < 0.8:
        raw = raw + _bytes(rng, rng.randint(1, 16))
    elif r < 0.9:
        raw = b""
    else:
        raw = _bytes(rng, rng.randint(1, 2 * len(raw) + 8))
    fields[-1][1] = raw
    return join(fields)


def m_stream_end(fields, rng, seeds):
    """A stream made to end in zero bytes, or its last bytes dropped (word padding edges)."""
    i = _field(fields, ("caption", "index"), rng)
    raw = fields[i][1]
    fields[i][1] = raw + b"\0" * rng.randint(1, 4) if rng.random() < 0.5 else raw[: -rng.randint(1, 4) or None]
    if fields[i][0] == "caption":
        _resync_caption(fields)
    return join(fields)


def m_identity(fields, rng, seeds):
    """The magic/version byte or the fingerprint changed."""
    if rng.random() < 0.5:
        fields[0][1] = bytes([rng.choice((0xB0, 0xB2, 0xBF, 0xA1, 0x00, rng.randrange(256)))])
    else:
        fields[1][1] = _bytes(rng, bitstream.FINGERPRINT_BYTES)
    return join(fields)


MUTATIONS = {  # name -> (mutation, weight)
    "random": (m_random, 8), "bitflip": (m_bitflip, 10), "bytes": (m_bytes, 10), "truncate": (m_truncate, 8),
    "extend": (m_extend, 6), "splice": (m_splice, 6), "varint": (m_varint, 10), "size": (m_size, 8),
    "hints": (m_hints, 10), "flags": (m_flags, 4), "family": (m_family, 2), "caption": (m_caption, 8),
    "index": (m_index, 8), "stream_end": (m_stream_end, 3), "identity": (m_identity, 1),
}
CRC_FIXED = 0.75  # of the mutated inputs get a correct CRC-32; the rest keep the seed's or a random one


class Mutator:
    """Input i is a function of (seed, i) alone: `mutator.input(i)` -> (mutation, crc fixed, bytes)."""

    def __init__(self, seeds: list, seed: int = 0):
        self.seeds = list(seeds)
        self.split = [split(s) for s in self.seeds]
        self.seed = seed
        self.names = list(MUTATIONS)
        self.weights = [MUTATIONS[n][1] for n in self.names]

    def input(self, i: int) -> tuple:
        rng = random.Random((self.seed << 40) ^ i)
        k = rng.randrange(len(self.seeds))
        fields = [list(f) for f in self.split[k]]
        name = rng.choices(self.names, self.weights)[0]
        body = MUTATIONS[name][0](fields, rng, self.seeds)
        if rng.random() < 0.1:  # sometimes a byte-level edit on top
            body = _mutate_bytes(body, rng, 1)
        r = rng.random()
        if r < CRC_FIXED:
            return name, True, with_crc(body)
        if r < CRC_FIXED + (1 - CRC_FIXED) / 2:
            return name, False, body + self.seeds[k][-bitstream.CRC_BYTES :]
        return name, False, body + _bytes(rng, rng.choice((0, 1, 2, 3, 4, 4, 4)))

    def __iter__(self):
        i = 0
        while True:
            yield self.input(i)
            i += 1


# --- the campaign ---------------------------------------------------------------------------------


class Hang(BaseException):
    """An input ran past the hang limit (raised by SIGALRM, so no `except Exception` swallows it)."""


def _on_alarm(signum, frame):
    raise Hang()


_NUMBER = re.compile(r"\b[0-9a-f]{8}\b|0x[0-9a-f]+|(?<![A-Za-wyz\d-])\d+(?:\.\d+)?(?:e[+-]?\d+)?")


def message_class(exc: BaseException) -> str:
    """'BitstreamError: corrupt bitstream: image size NxN outside N..N': numbers and hex replaced by N."""
    return f"{type(exc).__name__}: {_NUMBER.sub('N', str(exc).splitlines()[0] if str(exc) else '')}"[:160]


def _maxrss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def machine() -> dict:
    from importlib.metadata import version

    info = {"platform": platform.platform(), "machine": platform.machine(), "cpus": os.cpu_count(),
            "python": platform.python_version(), "numpy": np.__version__, "constriction": version("constriction")}
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            info["cpu"] = next(line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    if "torch" in sys.modules:
        info["torch"] = sys.modules["torch"].__version__
        info["torch_threads"] = sys.modules["torch"].get_num_threads()
    info["loadavg_at_end"] = [round(x, 2) for x in os.getloadavg()]  # others' work on the machine slows the run
    try:
        commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--", "engine"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        info["git"] = commit + (" (engine/ modified)" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        pass
    return info


def _time_again(target, data: bytes, expected, hang_limit: float = 0) -> float:
    """Seconds for one more run of an input that ran without failing (at most `hang_limit`, if set)."""
    t0 = time.perf_counter()
    try:
        if hang_limit:
            signal.setitimer(signal.ITIMER_REAL, hang_limit)
        target(data)
    except expected:
        pass
    except Hang:
        return hang_limit
    finally:
        if hang_limit:
            signal.setitimer(signal.ITIMER_REAL, 0)
    return time.perf_counter() - t0


def save_failure(crash_dir: Path, target: str, seed: int, index, kind: str, data: bytes, error: str, tb: str) -> Path:
    crash_dir.mkdir(parents=True, exist_ok=True)
    path = crash_dir / f"{target}-seed{seed}-{index}.json"
    path.write_text(json.dumps({"target": target, "seed": seed, "index": index, "mutation": kind, "hex": data.hex(),
                                "error": error, "traceback": tb, "expect": None}, indent=1) + "\n")
    return path


def run_campaign(target: Callable, inputs: int, seed: int = 0, start: int = 0, seeds: Optional[list] = None,
                 time_limit: float = TIME_LIMIT, hang_limit: float = HANG_LIMIT, crash_dir: Optional[Path] = None,
                 progress: bool = True, use_tracemalloc: bool = False) -> dict:
    """Feed inputs start..start+inputs-1 of the seeded generator to `target`; the report as a dict."""
    name = getattr(target, "name", "target")
    spec = getattr(target, "spec", TINY_SPEC)
    seeds = seeds or seed_corpus(spec, tiny=name == "decode")
    mutator = Mutator(seeds, seed)
    expected = getattr(target, "expected", (PercoError,))
    outcomes, types, by_mutation = {}, {}, {}
    failures, slow, noise = [], [], []
    top = []  # (seconds, index, mutation, bytes, outcome) of the slowest inputs, retimed at the end
    times = np.zeros(inputs, np.float32)
    slowest = None
    crc_fixed = 0
    biggest = 0
    if hasattr(target, "warm_up"):
        target.warm_up(seeds)
    rss_before = _maxrss()
    rss_step = {"bytes": 0}
    if use_tracemalloc:
        import tracemalloc

        tracemalloc.start()
    use_alarm = hang_limit > 0 and hasattr(signal, "setitimer")
    old_handler = signal.signal(signal.SIGALRM, _on_alarm) if use_alarm else None
    load_before = [round(x, 2) for x in os.getloadavg()]
    began = last_report = time.perf_counter()
    try:
        for n in range(inputs):
            i = start + n
            kind, fixed, data = mutator.input(i)
            crc_fixed += fixed
            biggest = max(biggest, len(data))
            error, tb = None, ""
            rss0 = _maxrss()
            t0 = time.perf_counter()
            try:
                if use_alarm:
                    signal.setitimer(signal.ITIMER_REAL, hang_limit)
                try:
                    target(data)
                finally:
                    if use_alarm:
                        signal.setitimer(signal.ITIMER_REAL, 0)
                outcome, kind_of = "accepted", "accepted"
            except expected as exc:
                outcome, kind_of = message_class(exc), type(exc).__name__
            except Hang:
                outcome, kind_of, error = f"HANG: over {hang_limit:g} s", "HANG", f"interrupted after {hang_limit:g} s"
                tb = traceback.format_exc()
            except Exception as exc:  # noqa: BLE001 - anything else is what a fuzzer looks for
                outcome, kind_of = f"CRASH {message_class(exc)}", f"CRASH {type(exc).__name__}"
                error, tb = f"{type(exc).__name__}: {exc}", traceback.format_exc()
            dt = time.perf_counter() - t0
            times[n] = dt
            rss1 = _maxrss()
            if rss1 > rss0 and rss1 - rss0 > rss_step["bytes"]:
                rss_step = {"bytes": rss1 - rss0, "index": i, "mutation": kind, "input_bytes": len(data)}
            retimed = None
            if error is None and dt > time_limit:  # timed again, so that a pause of the machine is not a failure
                retimed = _time_again(target, data, expected, hang_limit if use_alarm else 0)
                if retimed > time_limit:
                    error = f"took {dt:.3f} s and {retimed:.3f} s, over the {time_limit:g} s limit ({outcome})"
                else:
                    noise.append({"index": i, "seconds": round(dt, 6), "retimed_seconds": round(retimed, 6)})
            outcomes[outcome] = outcomes.get(outcome, 0) + 1
            types[kind_of] = types.get(kind_of, 0) + 1
            row = by_mutation.setdefault(kind, {"inputs": 0, "crc_fixed": 0, "accepted": 0, "errors": 0, "failures": 0})
            row["inputs"] += 1
            row["crc_fixed"] += fixed
            row["accepted" if outcome == "accepted" else "errors"] += 1
            if error is None and (len(top) < RETIME_SLOWEST or dt > top[0][0]):
                (heapq.heappush if len(top) < RETIME_SLOWEST else heapq.heappushpop)(top, (dt, i, kind, data, outcome))
            if slowest is None or dt > slowest["seconds"]:
                slowest = {"index": i, "mutation": kind, "seconds": round(dt, 6), "bytes": len(data),
                           "outcome": outcome, "hex": data.hex() if len(data) <= 4096 else data[:4096].hex() + "..."}
                if retimed is not None:
                    slowest["retimed_seconds"] = round(retimed, 6)
            if error is not None:
                row["failures"] += 1
                saved = save_failure(crash_dir, name, seed, i, kind, data, error, tb) if crash_dir else None
                failures.append({"index": i, "mutation": kind, "seconds": round(dt, 6), "error": error,
                                 "hex": data.hex(), "file": str(saved) if saved else None})
                if dt > time_limit:
                    slow.append(i)
                if progress:
                    print(f"[{name}] FAILURE at input {i} ({kind}): {error}", file=sys.stderr)
            now = time.perf_counter()
            if progress and (now - last_report > 10 or n + 1 == inputs):
                last_report = now
                rate = (n + 1) / (now - began)
                print(f"[{name}] {n + 1}/{inputs} inputs, {rate:,.0f}/s, accepted {outcomes.get('accepted', 0)}, "
                      f"failures {len(failures)}, slowest {slowest['seconds'] * 1000:.1f} ms, "
                      f"eta {(inputs - n - 1) / rate:,.0f} s", file=sys.stderr, flush=True)
        wall = time.perf_counter() - began
        retimed = []
        for dt, i, kind, data, outcome in top:  # the slowest again, best of 3: what the input costs, not the machine
            best = min(_time_again(target, data, expected, hang_limit if use_alarm else 0) for _ in range(3))
            retimed.append({"index": i, "mutation": kind, "bytes": len(data), "outcome": outcome,
                            "first_seconds": round(dt, 6), "retimed_seconds": round(best, 6),
                            "hex": data.hex() if len(data) <= 4096 else data[:4096].hex() + "..."})
        retimed.sort(key=lambda r: -r["retimed_seconds"])
    finally:
        if use_alarm:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, old_handler)
    memory = {"ru_maxrss_bytes": _maxrss(), "ru_maxrss_before_bytes": rss_before, "largest_rise_in_one_input": rss_step}
    if use_tracemalloc:
        memory["tracemalloc_peak_bytes"] = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    ms = times.astype(np.float64) * 1000
    return {
        "target": name, "inputs": inputs, "seed": seed, "start": start, "seeds": len(seeds),
        "wall_s": round(wall, 2), "inputs_per_s": round(inputs / wall, 1) if wall else None,
        "crc_fixed": crc_fixed, "crc_fixed_fraction": round(crc_fixed / inputs, 4) if inputs else None,
        "largest_input_bytes": biggest,
        "outcomes_by_type": dict(sorted(types.items(), key=lambda kv: -kv[1])),
        "outcomes": dict(sorted(outcomes.items(), key=lambda kv: -kv[1])),
        "by_mutation": by_mutation,
        "time_limit_s": time_limit, "hang_limit_s": hang_limit,
        "time_ms": {"mean": round(float(ms.mean()), 4), "p50": round(float(np.percentile(ms, 50)), 4),
                    "p99": round(float(np.percentile(ms, 99)), 4), "p99.99": round(float(np.percentile(ms, 99.99)), 4),
                    "max": round(float(ms.max()), 4)} if inputs else {},
        "slowest": slowest, "slowest_retimed": retimed[:5], "over_time_limit": slow, "over_time_limit_once": noise,
        "peak_memory": memory,
        "failures": failures,
        "machine": {**machine(), "loadavg_at_start": load_before},
    }


def summary(report: dict) -> str:
    def one(row: dict, key: str) -> str:
        return (f"{row.get(key, 0) * 1000:.1f} ms (#{row.get('index')}, {row.get('mutation')}, "
                f"{row.get('bytes')} bytes, {row.get('outcome')})")

    mem = report["peak_memory"]
    lines = [
        f"fuzz target {report['target']}: {report['inputs']:,} inputs (seed {report['seed']}, from {report['start']}) "
        f"in {report['wall_s']:,.1f} s, {report['inputs_per_s']:,.0f}/s; CRC fixed for "
        f"{report['crc_fixed_fraction']:.1%}",
        "outcomes by type: " + ", ".join(f"{k} {v:,}" for k, v in report["outcomes_by_type"].items()),
        f"distinct outcomes: {len(report['outcomes'])}; slowest input: {one(report['slowest'] or {}, 'seconds')}",
    ]
    if report.get("slowest_retimed"):
        lines.append(f"slowest on retiming (the {RETIME_SLOWEST} slowest again, best of 3): "
                     f"{one(report['slowest_retimed'][0], 'retimed_seconds')}")
    memory = (f"peak memory (ru_maxrss): {mem['ru_maxrss_bytes'] / 2**20:,.1f} MiB "
              f"(at the start {mem['ru_maxrss_before_bytes'] / 2**20:,.1f} MiB)")
    if "tracemalloc_peak_bytes" in mem:
        memory += f"; tracemalloc peak {mem['tracemalloc_peak_bytes'] / 2**20:,.1f} MiB"
    lines.append(memory)
    lines.append(f"failures: {len(report['failures'])}")
    lines += [f"  #{f['index']} ({f['mutation']}): {f['error']}" for f in report["failures"][:20]]
    return "\n".join(lines)


def load_case(path, spec: StreamSpec) -> tuple:
    """A saved failure or regression case -> (case dict, bytes). JSON with "hex" (raw bytes otherwise);
    the bytes of a "decode" case get `spec`'s fingerprint (CRC fixed up), as they must match the model."""
    raw = Path(path).read_bytes()
    try:
        case = json.loads(raw)
        data = bytes.fromhex(case["hex"])
    except (ValueError, KeyError, UnicodeDecodeError):
        return {}, raw
    if case.get("target") == "decode" and len(data) > 4 + bitstream.CRC_BYTES:
        data = refingerprint(data, spec)
    return case, data


def replay(target, paths: list) -> int:
    """Run saved failures or regression cases and print each outcome; 1 if any crashed."""
    bad = 0
    for path in paths:
        case, data = load_case(path, target.spec)
        steps = getattr(target, "steps", None)
        if isinstance(target, DecodeTarget) and "steps" in case:
            target.steps = case["steps"]
        try:
            target(data)
            outcome = "accepted"
        except getattr(target, "expected", (PercoError,)) as exc:
            outcome = f"{type(exc).__name__}: {exc}"
        except Exception:  # noqa: BLE001
            bad += 1
            outcome = "CRASH\n" + traceback.format_exc()
        finally:
            if isinstance(target, DecodeTarget):
                target.steps = steps
        expect, other = case.get("expect"), case.get("target") not in (None, target.name)
        print(f"{path}: {outcome}" + (f"   (a {case['target']} case: {expect} there)" if other else
                                       f"   (expected {expect})" if expect else ""))
    return 1 if bad else 0


def run_atheris(target_name: str, model, libfuzzer_args: list, fix_crc: bool) -> None:
    """Coverage-guided fuzzing under atheris (optional, `pip install atheris`): libFuzzer mutates the
    body and, with `fix_crc`, the target appends the right CRC-32 so mutations reach the parser."""
    import atheris

    target = make_target(target_name, model)
    expected = target.expected

    def one(data: bytes) -> None:
        try:
            target(with_crc(data) if fix_crc else data)
        except expected:
            pass

    corpus = Path(tempfile.mkdtemp(prefix=f"perco-fuzz-{target_name}-corpus-"))
    for k, data in enumerate(seed_corpus(target.spec, tiny=target_name == "decode")):
        (corpus / f"seed{k}").write_bytes(data[: -bitstream.CRC_BYTES] if fix_crc else data)
    print(f"seed corpus (libFuzzer adds to it): {corpus}", file=sys.stderr)
    atheris.instrument_all()
    atheris.Setup([sys.argv[0], *libfuzzer_args, str(corpus)], one)
    atheris.Fuzz()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m perco.benchmarks.fuzz", description=__doc__.split("\n\n")[0])
    p.add_argument("--target", choices=TARGETS, default="parse")
    p.add_argument("--inputs", type=int, default=10_000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--start", type=int, default=0, help="index of the first input (input i depends on seed and i only)")
    p.add_argument("--model", help="model folder (parse: its stream spec; decode: the model to run); "
                                   "default: the tiny model's geometry / a tiny model in the temp folder")
    p.add_argument("--out", help="JSON report")
    p.add_argument("--crash-dir", help="where failures are saved (default: fuzz-crashes/ beside --out)")
    p.add_argument("--time-limit", type=float, default=TIME_LIMIT, help="seconds per input; slower is a failure")
    p.add_argument("--hang-limit", type=float, default=HANG_LIMIT, help="seconds after which an input is interrupted")
    p.add_argument("--threads", type=int, default=1, help="decode: torch threads (default 1; 0 leaves torch's default)")
    p.add_argument("--tracemalloc", action="store_true", help="also record the tracemalloc peak (slower)")
    p.add_argument("--quiet", action="store_true", help="no progress on stderr")
    p.add_argument("--replay", nargs="+", metavar="FILE", help="run saved failures / regression cases instead")
    p.add_argument("--atheris", action="store_true",
                   help="coverage-guided run under atheris; arguments after -- go to libFuzzer")
    p.add_argument("--no-fix-crc", action="store_true", help="with --atheris: feed libFuzzer's bytes as they are")
    args, rest = p.parse_known_args(argv)
    rest = [a for a in rest if a != "--"]
    if rest and not args.atheris:
        p.error(f"unrecognized arguments: {' '.join(rest)}")
    if args.atheris:
        run_atheris(args.target, args.model, rest, not args.no_fix_crc)
        return 0
    target = make_target(args.target, args.model, threads=args.threads)
    if args.replay:
        return replay(target, args.replay)
    crash_dir = Path(args.crash_dir or (Path(args.out).parent if args.out else Path(".")) / "fuzz-crashes")
    report = run_campaign(target, args.inputs, args.seed, args.start, time_limit=args.time_limit,
                          hang_limit=args.hang_limit, crash_dir=crash_dir, progress=not args.quiet,
                          use_tracemalloc=args.tracemalloc)
    report["command"] = "python -m perco.benchmarks.fuzz " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    print(summary(report))
    return 1 if report["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
