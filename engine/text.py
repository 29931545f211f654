"""CLIP token ids: what the bitstream carries and how the decoder rebuilds `input_ids`.

The bitstream carries a caption's content token ids (no start, end or padding tokens; at most
`max_length - 2` of them). The decoder rebuilds exactly what `CLIPTokenizer(text,
padding="max_length", max_length=77, truncation=True)` returns, so it needs no tokenizer. A text
encoder with another vocabulary (PerCoV2's T5) gets the ids' text (`caption_text`), re-tokenized by
its own tokenizer (`Retokenizer`).
"""

import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from perco.engine.errors import ModelError, PercoError


@dataclass(frozen=True)
class TokenLayout:
    """The special ids and length of a CLIP text input (read from the model's tokenizer folder)."""

    vocab_size: int
    bos_id: int
    eos_id: int
    pad_id: int
    max_length: int = 77

    @property
    def max_content(self) -> int:
        return self.max_length - 2

    def input_ids(self, content_ids) -> np.ndarray:
        """Content ids -> [max_length] int64: start, content, end, padding.

        >>> TokenLayout(49408, 49406, 49407, 0).input_ids([320, 736])[:5].tolist()
        [49406, 320, 736, 49407, 0]
        """
        content = np.asarray(content_ids, dtype=np.int64).reshape(-1)[: self.max_content]
        ids = np.full(self.max_length, self.pad_id, dtype=np.int64)
        ids[0] = self.bos_id
        ids[1 : 1 + content.size] = content
        ids[1 + content.size] = self.eos_id
        return ids

    @classmethod
    def from_tokenizer_dir(cls, folder: Path) -> "TokenLayout":
        """Read vocab size and special ids from a transformers CLIPTokenizer folder (no tokenizer lib)."""
        vocab_file = folder / "vocab.json"
        try:
            vocab = json.loads(vocab_file.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise ModelError(f"cannot read tokenizer vocabulary {vocab_file}: {exc}") from None
        specials = _special_tokens(folder)

        def lookup(role: str, default: str) -> int:
            token = specials.get(role, default)
            if token not in vocab:
                raise ModelError(f"tokenizer {role} {token!r} is not in {vocab_file}")
            return int(vocab[token])

        eos = lookup("eos_token", "<|endoftext|>")
        max_length = int(specials.get("model_max_length", 77))
        if max_length > 1000:  # transformers' "unset" sentinel; CLIP text towers take 77
            max_length = 77
        return cls(
            vocab_size=len(vocab),
            bos_id=lookup("bos_token", "<|startoftext|>"),
            eos_id=eos,
            pad_id=lookup("pad_token", "<|endoftext|>") if "pad_token" in specials else eos,
            max_length=max_length,
        )


def _special_tokens(folder: Path) -> dict:
    """Merge tokenizer_config.json and special_tokens_map.json; tokens may be str or {content: str}."""
    merged: dict = {}
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        path = folder / name
        if path.is_file():
            try:
                merged.update(json.loads(path.read_text(encoding="utf-8")))
            except ValueError as exc:
                raise ModelError(f"cannot parse {path}: {exc}") from None
    return {k: (v["content"] if isinstance(v, dict) and "content" in v else v) for k, v in merged.items()}


# transformers' CLIP pre-tokenizer pattern (CLIPTokenizer of transformers 5, CLIPTokenizerFast of 4.x)
CLIP_SPLIT = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""


class CaptionTokenizer:
    """Text -> content token ids with the model's own CLIP BPE (encoder side only), without transformers.

    Built with the `tokenizers` library from the folder's `vocab.json` and `merges.txt` (a released
    SD 2.1 folder may have no tokenizer.json) exactly as transformers builds its CLIPTokenizer (5.x;
    CLIPTokenizerFast in 4.x): NFC, whitespace runs to one space, lowercase; split by CLIP's pattern,
    byte-level; BPE with "</w>" ending each word; the start and end tokens as special tokens. ftfy is
    not used (transformers' tokenizers-backed CLIP does not use it either; the original OpenAI code
    and transformers 4.x's slow tokenizer do, and differ on text ftfy would repair). The first
    `max_length - 2` content ids are kept, as transformers' truncation keeps them.
    tests/test_caption.py checks it against transformers on a corpus of thousands of captions.
    """

    def __init__(self, folder: Path, layout: TokenLayout):
        try:
            from tokenizers import Regex, Tokenizer, normalizers, pre_tokenizers
            from tokenizers.models import BPE
        except ImportError:
            raise PercoError("compressing a caption needs the tokenizers package: pip install tokenizers") from None
        folder = Path(folder)
        inverse, _ = _vocabulary(str(folder))
        vocab = {token: i for i, token in inverse.items()}
        try:
            lines = (folder / "merges.txt").read_text(encoding="utf-8").splitlines()
        except OSError as exc:
            raise ModelError(f"cannot read tokenizer merges {folder / 'merges.txt'}: {exc}") from None
        merges = [tuple(line.split()) for line in lines if line and not line.startswith("#version")]
        if any(len(m) != 2 for m in merges):
            raise ModelError(f"{folder / 'merges.txt'} is not a BPE merges file (a line is not two tokens)")
        specials = _special_tokens(folder)
        tokenizer = Tokenizer(BPE(vocab=vocab, merges=merges, dropout=None, continuing_subword_prefix="",
                                  end_of_word_suffix="</w>", fuse_unk=False,
                                  unk_token=str(specials.get("unk_token", "<|endoftext|>"))))
        tokenizer.normalizer = normalizers.Sequence(
            [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()])
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Split(Regex(CLIP_SPLIT), behavior="removed", invert=True),
             pre_tokenizers.ByteLevel(add_prefix_space=False)])
        # transformers matches its special tokens in the raw text: SD 2.1's pad token "!" too
        special = {inverse[layout.bos_id], inverse[layout.eos_id], inverse[layout.pad_id]}
        special |= {specials[k] for k in ("unk_token", "pad_token") if isinstance(specials.get(k), str)}
        tokenizer.add_special_tokens(sorted(t for t in special if t in vocab))
        self._tokenizer = tokenizer
        self._layout = layout

    def __call__(self, text: str) -> np.ndarray:
        ids = self._tokenizer.encode(text, add_special_tokens=False).ids[: self._layout.max_content]
        return np.asarray(ids, dtype=np.int64)

    def batch(self, texts: list) -> list:
        return [np.asarray(e.ids[: self._layout.max_content], dtype=np.int64)
                for e in self._tokenizer.encode_batch(list(texts), add_special_tokens=False)]


def caption_text(content_ids, folder: Path) -> str:
    """The text of CLIP content ids, as the decoder gives it to a re-tokenizing text encoder (T5).

    Defined here, not borrowed from a tokenizer library, because a decoder must reproduce it exactly:
    the tokens of `vocab.json` (an id it lacks is nothing) joined, "</w>" made a space, the byte-level
    characters mapped back to bytes (a character outside the table is "?"), decoded as UTF-8 with
    U+FFFD for invalid sequences, then stripped of ASCII spaces at both ends. It equals transformers'
    `CLIPTokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False).strip(" ")`
    (tests/test_percov2.py checks this on a caption corpus): lowercase, words and punctuation split by
    spaces, "a photo of a dog , running".
    """
    inverse, byte_of = _vocabulary(str(folder))
    text = "".join(inverse.get(int(i), "") for i in np.asarray(content_ids).reshape(-1)).replace("</w>", " ")
    return bytes(byte_of.get(c, ord("?")) for c in text).decode("utf-8", errors="replace").strip(" ")


def detokenize(content_ids, folder: Path) -> str:
    """The text of content ids (for display in `perco info`): `caption_text`."""
    return caption_text(content_ids, folder)


@lru_cache(maxsize=8)
def _vocabulary(folder: str) -> tuple:
    vocab_file = Path(folder) / "vocab.json"
    try:
        vocab = json.loads(vocab_file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot read tokenizer vocabulary {vocab_file}: {exc}") from None
    byte_of = {c: b for b, c in bytes_to_unicode().items()}
    byte_of[" "] = ord(" ")  # word ends ("</w>") become spaces
    return {v: k for k, v in vocab.items()}, byte_of


class Retokenizer:
    """Caption text -> [B, max_length] int64 ids with a text encoder's own `tokenizer.json` (PerCoV2's T5).

    Uses the `tokenizers` library (no transformers, no torch), set as transformers' fast tokenizer is
    when SD3 calls it: `tokenizer(text, padding="max_length", max_length=N, truncation=True)`, special
    tokens added by the file's post-processor (T5: the closing "</s>").
    """

    def __init__(self, folder: Path, max_length: int):
        try:
            from tokenizers import Tokenizer
        except ImportError:
            raise PercoError("this model's T5 text encoder needs the tokenizers package: "
                             "pip install tokenizers") from None
        path = Path(folder) / "tokenizer.json"
        try:
            tokenizer = Tokenizer.from_file(str(path))
        except Exception as exc:  # tokenizers raises a bare Exception for unreadable or malformed files
            reason = str(exc).splitlines()[0] if str(exc) else repr(exc)
            raise ModelError(f"cannot read tokenizer {path}: {reason}") from None
        pad = _special_tokens(Path(folder)).get("pad_token", "<pad>")
        pad_id = tokenizer.token_to_id(pad) if isinstance(pad, str) else None
        if pad_id is None:
            raise ModelError(f"{path}: the padding token {pad!r} is not in its vocabulary")
        tokenizer.no_padding()
        tokenizer.enable_truncation(max_length)
        tokenizer.enable_padding(length=max_length, pad_id=pad_id, pad_token=pad)
        self._tokenizer = tokenizer
        self.max_length = max_length

    def __call__(self, texts: list) -> np.ndarray:
        return np.array([e.ids for e in self._tokenizer.encode_batch(list(texts))], dtype=np.int64)


def bytes_to_unicode() -> dict:
    """GPT-2/CLIP byte <-> printable character table used by byte-level BPE vocabularies."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(
        range(ord("®"), ord("ÿ") + 1)
    )
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {b: chr(c) for b, c in zip(printable, chars)}
