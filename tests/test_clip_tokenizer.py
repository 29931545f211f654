"""The runtime's CLIP tokenizer (tokenizers library, no transformers) against transformers' CLIPTokenizer on a
corpus of thousands of captions with the real CLIP vocabulary: every mismatch is a failure. And compressing a
caption works with transformers blocked."""

import json
import subprocess
import sys

import numpy as np
import pytest

from conftest import CLIP_TOKENIZER
from perco.engine.model import ModelInfo
from perco.engine.text import CaptionTokenizer, TokenLayout

_PIECES = [
    ",", ".", "!", "?", ";", ":", "'", '"', "-", "(", ")", "[", "]", "...", "--", "&", "%", "$", "#", "@", "/",
    "'s", "n't", "'re", "I'm", "it'll", "we'd", "3", "42", "3.14", "1,000", "2024", "0.5x", "10km/h", "4k",
    "café", "naïve", "Ünïcödé", "ÉCOLE", "ﬁne", "Straße", "İstanbul", "日本語", "中文字", "한국어", "Привет",
    "مرحبا", "שלום", "ελληνικά", "हिन्दी", "🙂", "🐶🐱", "👨‍👩‍👧", "🇫🇷", "❤️", "☕", "∑x²", "½", "™", "©",
    "<|endoftext|>", "<|startoftext|>", "\t", "\n", "\u00a0", "\u3000", "  ", "A", "PHOTO", "McDonald's",
    "e-mail", "U.S.A.", "x86-64", "C++", "snake_case", "CamelCase", "http://a.b/c?d=e", "\u0301", "\u200b",
]


def _corpus(n: int = 3000) -> list:
    """Deterministic captions: words of the CLIP vocabulary mixed with the pieces above, 0 to ~120 tokens."""
    vocab = json.loads((CLIP_TOKENIZER / "vocab.json").read_text(encoding="utf-8"))
    words = [t[:-4] for t in vocab if t.endswith("</w>") and t[:-4].isalpha() and t[:-4].isascii()][:20000]
    rng = np.random.default_rng(2026)
    out = ["", " ", "\t\n", "a", "A photo of a dog.", "word " * 100, "x" * 400, "🙂" * 80]
    while len(out) < n:
        size = int(rng.choice([1, 3, 8, 15, 30, 60, 120]))
        parts = [words[i] if rng.random() < 0.7 else _PIECES[rng.integers(len(_PIECES))]
                 for i in rng.integers(0, len(words), size)]
        seps = rng.choice([" ", "", "  ", " \t"], size=size, p=[0.8, 0.1, 0.05, 0.05])
        text = "".join(p + s for p, s in zip(parts, seps))
        out.append(text.upper() if rng.random() < 0.05 else text.capitalize() if rng.random() < 0.3 else text)
    return out


CORPUS = _corpus()


SHARED_TOKENIZER = CLIP_TOKENIZER.parents[2].parent / "shared" / "data" / "clip-tokenizer"  # with tokenizer.json


@pytest.fixture(scope="module", params=["vocab-and-merges", "tokenizer.json"])
def tokenizers_pair(request):
    """transformers builds its CLIPTokenizer from vocab.json + merges.txt (a model folder as released: the
    repo's copy) or loads tokenizer.json where the folder has one (the workplace's copy, if present)."""
    transformers = pytest.importorskip("transformers", reason="the reference is transformers' CLIPTokenizer")
    folder = CLIP_TOKENIZER if request.param == "vocab-and-merges" else SHARED_TOKENIZER
    if not (folder / "tokenizer.json").is_file() and request.param == "tokenizer.json":
        pytest.skip(f"no CLIP folder with tokenizer.json at {folder} (outside the repository; optional)")
    layout = TokenLayout.from_tokenizer_dir(folder)
    return CaptionTokenizer(folder, layout), transformers.CLIPTokenizer.from_pretrained(str(folder)), layout


def test_every_caption_gives_transformers_input_ids(tokenizers_pair):
    ours, reference, layout = tokenizers_pair
    expected = reference(CORPUS, padding="max_length", max_length=77, truncation=True)["input_ids"]
    mismatches = [(text, ours(text).tolist()) for text, ids in zip(CORPUS, expected)
                  if layout.input_ids(ours(text)).tolist() != ids]
    assert not mismatches, f"{len(mismatches)} of {len(CORPUS)} captions differ, e.g. {mismatches[:3]}"
    long = sum(len(reference(t)["input_ids"]) > 77 for t in CORPUS)
    assert long > 100 and sum(not t.strip() for t in CORPUS) >= 3  # the corpus does reach truncation and empties
    batch = ours.batch(CORPUS[:50])
    assert all(np.array_equal(a, ours(t)) for a, t in zip(batch, CORPUS[:50]))


def test_compressing_a_caption_needs_no_transformers(tiny_model, tmp_path):
    """A fresh interpreter with transformers (and torch) made unimportable compresses a caption."""
    script = f"""
import sys
for name in ("transformers", "torch", "diffusers"):
    sys.modules[name] = None  # import raises ImportError
from perco.engine.text import CaptionTokenizer
from perco.engine.model import ModelInfo
info = ModelInfo({str(tiny_model)!r})
print(CaptionTokenizer(info.folder / "tokenizer", info.tokens)("A red barn, on a hill!").tolist())
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    info = ModelInfo(tiny_model)
    assert json.loads(done.stdout) == CaptionTokenizer(info.folder / "tokenizer", info.tokens)("A red barn, on a hill!").tolist()
