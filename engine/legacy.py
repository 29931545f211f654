"""Import of PerCo (SD) research-code files (`perco import-legacy`), safely: no pickle code ever runs.

The research code (Körber et al.'s `compression_utils.py`) writes `pickle.dump({0: pickle.dumps(caption),
1: pickle.dumps(indices), 2: pickle.dumps((H, W))})`: the caption as `zlib.compress(utf8, 9)`, the token
indices arithmetic-coded by torchac (16-bit CDF, bitwise coder) under a uniform model over the codebook,
raster order. No rate or model id is stored.

`read_legacy` parses that with an unpickler that resolves no global at all (so no callable, hence no
code, can come out of the file) and admits exactly the dict / bytes / tuple / int structure above;
`torchac_decode` is the arithmetic decoder, written here from torchac's algorithm (integer state,
renormalisation bit by bit), and `torchac_encode` its encoder, used by tests and the byte-savings
benchmark. The CDF is torchac's own conversion of the research code's float CDF (`uniform_cdf`).
"""

import io
import pickle
import zlib
from dataclasses import dataclass

import numpy as np

from perco.engine.errors import BitstreamError

MAX_LEGACY_BYTES = 1 << 20  # a research file of a 16384 x 16384 image at grid 64 is about 70 kB
MAX_CAPTION_BYTES = 1 << 16
PRECISION = 16
_HALF, _QUARTER, _FULL, _U64 = 0x80000000, 0x40000000, 0xFFFFFFFF, (1 << 64) - 1


@dataclass(frozen=True)
class LegacyFile:
    caption: str
    index_bytes: bytes  # torchac's stream
    height: int
    width: int


class _NoGlobals(pickle.Unpickler):
    """An unpickler for data only: every global (class, function) is refused, so nothing can be called."""

    def find_class(self, module, name):
        raise BitstreamError(f"not a PerCo (SD) research file: its pickle asks for {module}.{name} (refused; "
                             f"nothing was run)")

    def persistent_load(self, pid):
        raise BitstreamError("not a PerCo (SD) research file: its pickle has persistent ids (refused)")


def _unpickle(data: bytes, what: str):
    try:
        return _NoGlobals(io.BytesIO(data)).load()
    except BitstreamError:
        raise
    except Exception as exc:  # every malformed pickle: truncation, bad opcodes, recursion
        raise BitstreamError(f"not a PerCo (SD) research file: cannot read its {what} ({type(exc).__name__})") from None


def read_legacy(data: bytes) -> LegacyFile:
    """Parse a research file; BitstreamError (one line) for anything that is not exactly that format."""
    if len(data) > MAX_LEGACY_BYTES:
        raise BitstreamError(f"not a PerCo (SD) research file: {len(data)} bytes, more than such a file has")
    outer = _unpickle(data, "container")
    if not isinstance(outer, dict) or set(outer) != {0, 1, 2} or not all(isinstance(v, bytes) for v in outer.values()):
        raise BitstreamError("not a PerCo (SD) research file: expected a dict {0, 1, 2} of pickled bytes")
    caption, indices, shape = (_unpickle(outer[k], name) for k, name in ((0, "caption"), (1, "indices"), (2, "size")))
    if not isinstance(caption, bytes) or not isinstance(indices, bytes):
        raise BitstreamError("not a PerCo (SD) research file: its caption and indices must be bytes")
    if (not isinstance(shape, tuple) or len(shape) != 2 or not all(type(v) is int for v in shape)
            or not all(1 <= v <= 16384 for v in shape)):
        raise BitstreamError(f"not a PerCo (SD) research file: bad image size {shape!r}")
    decompressor = zlib.decompressobj()
    try:
        text = decompressor.decompress(caption, MAX_CAPTION_BYTES)
        if decompressor.unconsumed_tail or not decompressor.eof:
            raise BitstreamError("corrupt research file: its caption is truncated or too long")
        text = text.decode("utf-8")
    except (zlib.error, UnicodeDecodeError) as exc:
        raise BitstreamError(f"corrupt research file: its caption is not zlib-compressed UTF-8 ({exc})") from None
    return LegacyFile(text, indices, shape[0], shape[1])


def uniform_cdf(codebook_size: int) -> np.ndarray:
    """torchac's integer CDF [K + 1] of the research code's uniform float CDF.

    The research code builds cumsum(float32 1/K repeated K times) with a leading 0 and the last entry
    set to 1.0 (torch accumulates the float32 cumsum in float64 on the CPU, rounding each output to
    float32); torchac maps it to round(cdf * (2^16 - K)) + arange(K + 1) in int16, which the coder
    reads as uint16 (the last entry, 2^16, wraps to 0 and is never read: the top symbol ends at 2^16).
    """
    k = int(codebook_size)
    cdf = np.concatenate([[0.0], np.cumsum(np.full(k, np.float32(1.0 / k), np.float32), dtype=np.float64)])
    cdf = cdf.astype(np.float32)
    cdf[-1] = 1.0
    return (np.rint(cdf * np.float32(2**PRECISION - k)).astype(np.int64) + np.arange(k + 1)) & 0xFFFF


def _bounds(cdf: np.ndarray, s: int, k: int) -> tuple:
    return int(cdf[s]), (1 << PRECISION) if s == k - 1 else int(cdf[s + 1])


def torchac_encode(symbols: np.ndarray, cdf: np.ndarray) -> bytes:
    """torchac's arithmetic encoder (32-bit low/high, pending bits, MSB first, zero padded)."""
    k = len(cdf) - 1
    bits, pending = [], 0
    low, high = 0, _FULL

    def emit(bit):
        nonlocal pending
        bits.append(bit)
        bits.extend([1 - bit] * pending)
        pending = 0

    for s in np.asarray(symbols, dtype=np.int64).reshape(-1).tolist():
        span = high - low + 1
        c_low, c_high = _bounds(cdf, s, k)
        high = (low - 1 + (span * c_high >> PRECISION)) & _FULL
        low = (low + (span * c_low >> PRECISION)) & _FULL
        while True:
            if high < _HALF:
                emit(0)
            elif low >= _HALF:
                emit(1)
            elif low >= _QUARTER and high < _HALF + _QUARTER:
                pending += 1
                low, high = (low << 1) & 0x7FFFFFFF, ((high << 1) | 0x80000001) & _FULL
                continue
            else:
                break
            low, high = (low << 1) & _FULL, ((high << 1) | 1) & _FULL
    pending += 1
    emit(0 if low < _QUARTER else 1)
    bits.extend([0] * (-len(bits) % 8))
    return np.packbits(np.array(bits, dtype=np.uint8)).tobytes() if bits else b""


def torchac_decode(data: bytes, cdf: np.ndarray, count: int) -> np.ndarray:
    """torchac's arithmetic decoder: `count` symbols from `data` (bits past the end read as 0, as torchac)."""
    k = len(cdf) - 1
    bits = np.unpackbits(np.frombuffer(data, dtype=np.uint8)).tolist()
    pos = 0

    def bit():
        nonlocal pos
        pos += 1
        return bits[pos - 1] if pos <= len(bits) else 0

    value = 0
    for _ in range(32):
        value = (value << 1) | bit()
    low, high = 0, _FULL
    table = [int(v) for v in cdf[:k]]
    out = np.empty(count, dtype=np.int64)
    for i in range(count):
        span = high - low + 1
        scaled = ((((value - low + 1) & _U64) << PRECISION) - 1) & _U64  # torchac's uint64 arithmetic
        target = (scaled // span) & 0xFFFF  # and its uint16 cast
        s = _search(table, target, k)
        out[i] = s
        if i == count - 1:
            break
        c_low, c_high = _bounds(cdf, s, k)
        high = (low - 1 + (span * c_high >> PRECISION)) & _FULL
        low = (low + (span * c_low >> PRECISION)) & _FULL
        while True:
            if low >= _HALF or high < _HALF:
                low, high = (low << 1) & _FULL, ((high << 1) | 1) & _FULL
                value = ((value << 1) | bit()) & _FULL
            elif low >= _QUARTER and high < _HALF + _QUARTER:
                low, high = (low << 1) & 0x7FFFFFFF, ((high << 1) | 0x80000001) & _FULL
                value = (((value - _QUARTER) << 1) | bit()) & _FULL
            else:
                break
    return out


def _search(table: list, target: int, k: int) -> int:
    """torchac's binary search: the largest m in [0, k) with table[m] <= target (an exact hit returns it)."""
    left, right = 0, k
    while left + 1 < right:
        m = (left + right) // 2
        if table[m] < target:
            left = m
        elif table[m] > target:
            right = m
        else:
            return m
    return left


def import_legacy(data: bytes, spec) -> bytes:
    """A research file -> our bitstream for the model `spec` (a ModelSpec of PerCo (SD), the rate that made it).

    The caption is tokenized with the model's CLIP tokenizer, the indices decoded under the uniform model of
    its codebook; the result is what `perco compress` writes for those indices and that caption (seed 0).
    """
    from perco.engine import bitstream
    from perco.engine.text import CaptionTokenizer

    if spec.family != "perco-sd":
        raise BitstreamError(f"research files are PerCo (SD) files; this model is {spec.family}")
    legacy = read_legacy(data)
    factor = spec.rate.token_stride  # the research code: factor = 512 // cfg_ss, grid = H // factor x W // factor
    rows, cols = spec.stream_spec.token_grid(legacy.width, legacy.height)
    if (legacy.height // factor, legacy.width // factor) != (rows, cols):
        raise BitstreamError(f"research file of a {legacy.width}x{legacy.height} image: not a multiple of this "
                             f"model's token stride ({factor} px), so its token grid is not this engine's")
    cdf = uniform_cdf(spec.rate.codebook_size)
    indices = torchac_decode(legacy.index_bytes, cdf, rows * cols)
    if torchac_encode(indices, cdf) != legacy.index_bytes:  # torchac streams carry no check: re-encode instead
        raise BitstreamError(f"corrupt research file, or one of another rate: its indices do not decode under this "
                             f"model's uniform {spec.rate.codebook_size}-code model ({spec.describe()})")
    caption_ids = CaptionTokenizer(spec.tokenizer_dir, spec.tokens)(legacy.caption) if legacy.caption else []
    header = bitstream.Header(spec.fingerprint[: bitstream.FINGERPRINT_BYTES], legacy.width, legacy.height,
                              family=spec.family)
    return bitstream.pack(header, caption_ids, indices.reshape(rows, cols), spec.stream_spec)
