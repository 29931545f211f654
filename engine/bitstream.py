"""Bitstream v1: the container, byte by byte as in docs/bitstream.md. Never pickle.

    byte 0        0xB1: high nibble 0xB marks a PerCo Engine bitstream, low nibble = version 1
    bytes 1-4     model fingerprint (first 4 bytes)
    byte 5        flags: bit 0 explicit size, bit 1 explicit seed, bit 2 decoder hints, bit 3 model family,
                  bit 4 hybrid mode
    [u8 family id]              if flag 3 (1 = percov2), else 0 = perco-sd
    [varint w, varint h]        if flag 0, else 512 x 512
    [varint seed]               if flag 1, else 0
    [varint n, n x (u8 key, varint value)]   if flag 2
    [varint G]                  if flag 4: the index stream holds only the first G groups of the learned
                                entropy model's schedule; the decoder generates the rest
    varint caption byte count C
    C bytes       caption stream (rANS, caption prior over CLIP token ids, EOS-terminated)
    ... bytes     index stream, the rest: written by the model's index coder (`entropy.index_coders`;
                  "uniform": rANS, uniform over the codebook, raster order)
    4 bytes       CRC-32 (zlib) of every byte before it, LE

A stream is its uint32 LE words with the trailing zero bytes dropped (an AnsCoder stream never
ends in a zero word, so a reader restores it by zero-padding to whole words).

At 512 x 512 with the default seed and no hints the framing is 1 + 4 + 1 + 1 + 4 = 11 bytes.
"""

import struct
import zlib
from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from perco.engine.entropy import caption_table
from perco.engine.entropy.rans import StreamDecoder, encode_symbols
from perco.engine.errors import BitstreamError, ModelMismatchError
from perco.engine.text import TokenLayout

VERSION = 1
MAGIC_NIBBLE = 0xB
DEFAULT_SIZE = (512, 512)  # (width, height) when the size flag is clear
MAX_SIDE = 16384
FINGERPRINT_BYTES = 4
CRC_BYTES = 4

FLAG_SIZE, FLAG_SEED, FLAG_HINTS, FLAG_FAMILY, FLAG_HYBRID = 1, 2, 4, 8, 16
_FLAGS = FLAG_SIZE | FLAG_SEED | FLAG_HINTS | FLAG_FAMILY | FLAG_HYBRID
# the model family, as numbered by the format: 0 (perco-sd) is implied when FLAG_FAMILY is clear, so
# PerCo (SD) streams are unchanged; a reader refuses a stream of another family before any decoding
FAMILY_IDS = {"perco-sd": 0, "percov2": 1}
_FAMILY_NAMES = {v: k for k, v in FAMILY_IDS.items()}
HINT_STEPS, HINT_GUIDANCE_CENTI = 1, 2  # hint keys; unknown keys are skipped by readers
_MAX_VARINT_BYTES = 10
MAX_HINTS = 16  # hint entries a reader accepts (two keys are defined; the rest is room for new ones)
MAX_STEPS = 1000
MAX_GUIDANCE = 50.0  # classifier-free guidance scales beyond this only saturate the image


@dataclass(frozen=True)
class Hints:
    """Optional decoder hints chosen by the encoder; flags given to the decoder override them."""

    steps: Optional[int] = None
    guidance: Optional[float] = None  # stored in hundredths

    def items(self) -> list:
        out = []
        if self.steps is not None:
            out.append((HINT_STEPS, int(self.steps)))
        if self.guidance is not None:
            out.append((HINT_GUIDANCE_CENTI, int(round(self.guidance * 100))))
        return out


@dataclass(frozen=True)
class Header:
    fingerprint: bytes  # FINGERPRINT_BYTES
    width: int
    height: int
    seed: int = 0
    hints: Hints = field(default_factory=Hints)
    family: str = "perco-sd"
    groups: Optional[int] = None  # hybrid mode: the index groups sent (None: all of them)


@dataclass(frozen=True)
class StreamSpec:
    """What a model fixes about its streams: identity, caption vocabulary, index geometry."""

    fingerprint: bytes
    tokens: TokenLayout
    codebook_size: int
    token_stride: int  # image pixels per token
    pad_multiple: int  # images are padded to a multiple of this many pixels
    family: str = "perco-sd"
    index_coder: str = "uniform"  # perco.engine.entropy.index_coders
    entropy_dir: Optional[object] = field(default=None, compare=False)  # the learned coder's entropy_model/ folder

    def coder(self):
        from perco.engine.entropy.index_coders import make_index_coder

        return make_index_coder(self.index_coder, self.codebook_size, self.entropy_dir)

    def token_grid(self, width: int, height: int) -> tuple:
        """(rows, cols) of the token grid for an image of this size."""
        pad_h = -(-height // self.pad_multiple) * self.pad_multiple
        pad_w = -(-width // self.pad_multiple) * self.pad_multiple
        return pad_h // self.token_stride, pad_w // self.token_stride


@dataclass(frozen=True)
class Sections:
    """Byte count of each part of a serialized bitstream (for `perco info`)."""

    header: int
    caption: int
    indices: int
    check: int

    @property
    def total(self) -> int:
        return self.header + self.caption + self.indices + self.check

    @property
    def framing(self) -> int:
        return self.header + self.check


# --- varints (unsigned LEB128) ---------------------------------------------------------------


def _put_varint(out: bytearray, value: int) -> None:
    if value < 0 or value >= 1 << 64:
        raise ValueError(f"varint out of range: {value}")
    while True:
        byte = value & 0x7F
        value >>= 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return


class _Reader:
    def __init__(self, data: bytes):
        self.data, self.pos = data, 0

    def byte(self, what: str) -> int:
        if self.pos >= len(self.data):
            raise BitstreamError(f"truncated bitstream: ends inside the {what}")
        self.pos += 1
        return self.data[self.pos - 1]

    def varint(self, what: str) -> int:
        value = 0
        for i in range(_MAX_VARINT_BYTES):
            byte = self.byte(what)
            value |= (byte & 0x7F) << (7 * i)
            if not byte & 0x80:
                if i and byte == 0:
                    raise BitstreamError(f"corrupt bitstream: non-canonical varint in the {what}")
                if value >= 1 << 64:
                    raise BitstreamError(f"corrupt bitstream: {what} exceeds 64 bits")
                return value
        raise BitstreamError(f"corrupt bitstream: varint too long in the {what}")

    def stream(self, size: int, what: str) -> np.ndarray:
        """`size` bytes of a trimmed stream -> its uint32 words."""
        end = self.pos + size
        if end > len(self.data):
            raise BitstreamError(f"truncated bitstream: ends inside the {what} stream")
        raw = self.data[self.pos : end]
        self.pos = end
        if raw and raw[-1] == 0:
            raise BitstreamError(f"corrupt bitstream: {what} stream ends in a zero byte")
        raw += b"\0" * (-size % 4)
        return np.frombuffer(raw, dtype="<u4").astype(np.uint32)


def _trimmed(words: np.ndarray) -> bytes:
    return np.asarray(words, dtype="<u4").tobytes().rstrip(b"\0")


# --- container -------------------------------------------------------------------------------


def serialize(header: Header, caption_words: np.ndarray, index_words: np.ndarray) -> bytes:
    if len(header.fingerprint) != FINGERPRINT_BYTES:
        raise ValueError("fingerprint must be 4 bytes")
    if not (1 <= header.width <= MAX_SIDE and 1 <= header.height <= MAX_SIDE):
        raise ValueError(f"image size {header.width}x{header.height} outside 1..{MAX_SIDE}")
    hints = header.hints.items()
    if header.family not in FAMILY_IDS:
        raise ValueError(f"model family {header.family!r} has no bitstream id")
    family = FAMILY_IDS[header.family]
    flags = (
        (FLAG_SIZE if (header.width, header.height) != DEFAULT_SIZE else 0)
        | (FLAG_SEED if header.seed else 0)
        | (FLAG_HINTS if hints else 0)
        | (FLAG_FAMILY if family else 0)
        | (FLAG_HYBRID if header.groups is not None else 0)
    )
    out = bytearray([MAGIC_NIBBLE << 4 | VERSION])
    out += header.fingerprint
    out.append(flags)
    if flags & FLAG_FAMILY:
        out.append(family)
    if flags & FLAG_SIZE:
        _put_varint(out, header.width)
        _put_varint(out, header.height)
    if flags & FLAG_SEED:
        _put_varint(out, header.seed)
    if flags & FLAG_HINTS:
        _put_varint(out, len(hints))
        for key, value in hints:
            out.append(key)
            _put_varint(out, value)
    if flags & FLAG_HYBRID:
        if header.groups < 1:
            raise ValueError(f"hybrid mode sends at least one group, got {header.groups}")
        _put_varint(out, header.groups)
    caption = _trimmed(caption_words)
    _put_varint(out, len(caption))
    out += caption
    out += _trimmed(index_words)
    out += struct.pack("<I", zlib.crc32(out))
    return bytes(out)


def parse(data: bytes) -> tuple:
    """bytes -> (Header, caption words, index words, Sections). Checks framing and the CRC only."""
    data = bytes(data)
    if not data:
        raise BitstreamError("empty bitstream")
    if data[0] >> 4 != MAGIC_NIBBLE:
        raise BitstreamError("not a PerCo Engine bitstream (bad magic byte)")
    if data[0] & 0xF != VERSION:
        raise BitstreamError(f"unsupported bitstream version {data[0] & 0xF} (this build reads {VERSION})")
    minimum = 1 + FINGERPRINT_BYTES + 1 + 1 + CRC_BYTES
    if len(data) < minimum:
        raise BitstreamError(f"truncated bitstream: {len(data)} bytes, a valid one has at least {minimum}")
    body, (crc,) = data[:-CRC_BYTES], struct.unpack("<I", data[-CRC_BYTES:])
    if zlib.crc32(body) != crc:
        raise BitstreamError("corrupt or truncated bitstream: integrity check (CRC-32) failed")

    reader = _Reader(body)
    reader.pos = 1 + FINGERPRINT_BYTES
    fingerprint = body[1 : 1 + FINGERPRINT_BYTES]
    flags = reader.byte("flags")
    if flags & ~_FLAGS:
        raise BitstreamError(f"corrupt bitstream: unknown flags 0x{flags:02x}")
    family = "perco-sd"
    if flags & FLAG_FAMILY:
        family_id = reader.byte("model family")
        if family_id == 0 or family_id not in _FAMILY_NAMES:  # 0 is written as a clear flag, never explicitly
            raise BitstreamError(f"corrupt bitstream or newer format: unknown model family id {family_id}")
        family = _FAMILY_NAMES[family_id]
    width, height = DEFAULT_SIZE
    if flags & FLAG_SIZE:
        width, height = reader.varint("image width"), reader.varint("image height")
        if not (1 <= width <= MAX_SIDE and 1 <= height <= MAX_SIDE):
            raise BitstreamError(f"corrupt bitstream: image size {width}x{height} outside 1..{MAX_SIDE}")
    seed = reader.varint("seed") if flags & FLAG_SEED else 0
    steps = guidance = None
    if flags & FLAG_HINTS:
        count = reader.varint("hint count")
        if count > MAX_HINTS:
            raise BitstreamError(f"corrupt bitstream: {count} decoder hints, at most {MAX_HINTS} are allowed")
        for _ in range(count):
            key, value = reader.byte("hint key"), reader.varint("hint value")
            if key == HINT_STEPS:
                steps = value
            elif key == HINT_GUIDANCE_CENTI:
                guidance = value / 100.0
    if steps is not None and not 1 <= steps <= MAX_STEPS:
        raise BitstreamError(f"corrupt bitstream: hinted step count {steps} outside 1..{MAX_STEPS}")
    if guidance is not None and not guidance <= MAX_GUIDANCE:
        raise BitstreamError(f"corrupt bitstream: hinted guidance {guidance} outside 0..{MAX_GUIDANCE:g}")
    groups = None
    if flags & FLAG_HYBRID:
        groups = reader.varint("hybrid group count")
        if groups < 1:
            raise BitstreamError("corrupt bitstream: hybrid mode with 0 groups sent")
    caption_size = reader.varint("caption length")
    header_len = reader.pos
    caption = reader.stream(caption_size, "caption")
    rest = len(body) - reader.pos
    indices = reader.stream(rest, "index")
    header = Header(bytes(fingerprint), width, height, seed, Hints(steps, guidance), family, groups)
    sections = Sections(header=header_len, caption=caption_size, indices=rest, check=CRC_BYTES)
    return header, caption, indices, sections


# --- payload: caption ids + indices <-> streams ---------------------------------------------


def pack(header: Header, caption_ids, indices: np.ndarray, spec: StreamSpec, backend=None) -> bytes:
    """Entropy-code the caption and the indices (with the spec's index coder, which may run networks on
    `backend`) and serialize a complete bitstream."""
    caption_ids = np.asarray(caption_ids, dtype=np.int64).reshape(-1)[: spec.tokens.max_content]
    rows, cols = spec.token_grid(header.width, header.height)
    if indices.shape != (rows, cols):
        raise ValueError(f"indices have shape {indices.shape}, expected {(rows, cols)}")
    layout = spec.tokens
    if caption_ids.size and (caption_ids.min() < 0 or caption_ids.max() >= layout.vocab_size):
        raise ValueError("caption token id outside the vocabulary")
    symbols = caption_ids
    if caption_ids.size < layout.max_content:
        symbols = np.append(caption_ids, layout.eos_id)
    caption_words = encode_symbols(symbols, caption_table(layout.vocab_size, layout.eos_id, layout.bos_id))
    coder = spec.coder()
    if header.groups is None:
        index_words = coder.encode(indices, backend)
    else:
        total = coder.num_groups((rows, cols))
        if not 1 <= header.groups < total:
            raise ValueError(f"hybrid mode sends 1..{total - 1} of this grid's {total} groups, got {header.groups}")
        index_words = coder.encode(indices, backend, groups=header.groups)
    return serialize(header, caption_words, index_words)


def unpack(data: bytes, spec: StreamSpec, backend=None) -> tuple:
    """bytes -> (Header, caption content ids, indices [rows, cols]). Any defect -> BitstreamError."""
    header, caption_words, index_words, _ = parse(data)
    if header.family != spec.family:
        raise ModelMismatchError(f"this is a {header.family} bitstream, but the model is {spec.family}: decode it "
                             f"with a {header.family} model")
    if header.fingerprint != spec.fingerprint[:FINGERPRINT_BYTES]:
        raise ModelMismatchError(
            f"bitstream was made for model {header.fingerprint.hex()}, but this model is "
            f"{spec.fingerprint[:FINGERPRINT_BYTES].hex()}: decode it with the model (and rate) that encoded it"
        )
    return header, decode_caption(caption_words, spec.tokens), decode_indices(index_words, header, spec, backend)


def decode_caption(words: np.ndarray, layout: TokenLayout) -> np.ndarray:
    table = caption_table(layout.vocab_size, layout.eos_id, layout.bos_id)
    decoder = StreamDecoder(words, table, "caption")
    ids = []
    for _ in range(layout.max_content):
        token = int(decoder.pop(1)[0])
        if token == layout.eos_id:
            break
        if token == layout.bos_id:
            raise BitstreamError("corrupt caption stream: start token inside the caption")
        ids.append(token)
    decoder.finish()
    return np.asarray(ids, dtype=np.int64)


def decode_indices(words: np.ndarray, header: Header, spec: StreamSpec, backend=None) -> np.ndarray:
    shape = spec.token_grid(header.width, header.height)
    if header.groups is None:
        return spec.coder().decode(words, shape, backend)
    return spec.coder().decode(words, shape, backend, groups=header.groups, seed=header.seed)
