"""Tokenizer folders for `init-tiny`: copy a given CLIP tokenizer, or write a small built-in one.

The built-in tokenizer is a real CLIP-format byte-level BPE (vocab.json + merges.txt loadable by
transformers' CLIPTokenizer): the 512 byte tokens, merges learned from a short built-in word
list, then <|startoftext|> and <|endoftext|>. The built-in T5 tokenizer (`write_builtin_t5_tokenizer`)
is a small Unigram model in the layout of T5's fast tokenizer (tokenizer.json).
"""

import json
from collections import Counter
from pathlib import Path

from perco.engine.errors import ModelError
from perco.engine.files import copy_folder
from perco.engine.text import bytes_to_unicode

_WORDS = """
a an the of in on with and to at by for from near next under over front top side behind
background foreground sky water river lake sea ocean beach sand wave waves mountain mountains
forest tree trees grass field flower flowers garden road street city building buildings house
houses barn pond bridge boat boats car cars train bus bike man men woman women person people
child children boy girl dog dogs cat cats bird birds horse parrot parrots red blue green yellow
white black brown orange gray large small big old young standing sitting walking riding
running flying looking holding wearing close up view picture photo image window door wall
table chair room kitchen food plate bowl fruit two three group its each other rocky snow
sunset light lighthouse cliff hat face hair is are there this that some many into through runs
""".split()

_SPECIAL = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "pad_token": "!",
            "unk_token": "<|endoftext|>"}


def _learn_merges(words, count: int) -> list:
    """Greedy BPE over words (each a tuple of symbols, the last one ending in '</w>')."""
    byte_char = bytes_to_unicode()
    corpus = Counter()
    for word in words:
        chars = [byte_char[b] for b in word.encode("utf-8")]
        corpus[tuple(chars[:-1] + [chars[-1] + "</w>"])] += 1
    merges = []
    for _ in range(count):
        pairs = Counter()
        for symbols, freq in corpus.items():
            for pair in zip(symbols, symbols[1:]):
                pairs[pair] += freq
        if not pairs:
            break
        best = min(pairs, key=lambda p: (-pairs[p], p))  # most frequent, then lexicographic
        merges.append(best)
        merged = Counter()
        for symbols, freq in corpus.items():
            out, i = [], 0
            while i < len(symbols):
                if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == best:
                    out.append(symbols[i] + symbols[i + 1])
                    i += 2
                else:
                    out.append(symbols[i])
                    i += 1
            merged[tuple(out)] += freq
        corpus = merged
    return merges


def write_builtin_tokenizer(folder: Path, num_merges: int = 400) -> int:
    """Write the small built-in CLIP-format tokenizer; return its vocabulary size."""
    base = list(bytes_to_unicode().values())
    vocab = base + [c + "</w>" for c in base]
    merges = _learn_merges(_WORDS, num_merges)
    for a, b in merges:
        token = a + b
        if token not in vocab:
            vocab.append(token)
    vocab += [_SPECIAL["bos_token"], _SPECIAL["eos_token"]]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}, ensure_ascii=False),
                                       encoding="utf-8")
    lines = ["#version: 0.2 - PerCo Engine built-in tokenizer"] + [f"{a} {b}" for a, b in merges]
    (folder / "merges.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    _write_special(folder)
    return len(vocab)


def copy_tokenizer(source: Path, folder: Path) -> int:
    """Copy a transformers CLIPTokenizer folder (vocab.json + merges.txt); return its vocab size."""
    for name in ("vocab.json", "merges.txt"):
        if not (source / name).is_file():
            raise ModelError(f"tokenizer folder {source} has no {name}")
    copy_folder(source, folder, replace=True)
    if not (folder / "tokenizer_config.json").is_file():
        _write_special(folder)
    try:
        return len(json.loads((folder / "vocab.json").read_text(encoding="utf-8")))
    except ValueError as exc:
        raise ModelError(f"tokenizer vocabulary {source / 'vocab.json'} is not JSON: {exc}") from None


def _write_special(folder: Path) -> None:
    config = dict(_SPECIAL, model_max_length=77, tokenizer_class="CLIPTokenizer", do_lower_case=True)
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    (folder / "special_tokens_map.json").write_text(json.dumps(_SPECIAL, indent=2) + "\n", encoding="utf-8")


def set_pad_token(folder: Path, token: str) -> None:
    """Make `token` the padding token of a tokenizer folder (SD3 pads CLIP-L with EOS, CLIP-G with '!')."""
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        path = folder / name
        if path.is_file():
            config = json.loads(path.read_text(encoding="utf-8"))
            config["pad_token"] = token
            path.write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")


T5_SPECIAL = {"pad_token": "<pad>", "eos_token": "</s>", "unk_token": "<unk>"}


def write_builtin_t5_tokenizer(folder: Path) -> int:
    """A small T5-layout tokenizer (tokenizer.json + configs, loadable by transformers' T5TokenizerFast); return
    its vocabulary size.

    The structure of T5's: a Unigram model over "▁"-prefixed pieces, whitespace split then Metaspace, "</s>"
    appended, ids 0/1/2 = <pad>/</s>/<unk>. Its pieces are the built-in words and single characters. It has no
    normaliser: T5's is a precompiled sentencepiece charsmap, which needs T5's own files (transformers 5 keeps
    exactly that one when it rebuilds a T5 tokenizer, and drops any other).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

    chars = [chr(c) for c in range(33, 127)]
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    pieces += [("▁" + w, -1.0 - 0.1 * len(w)) for w in sorted(set(_WORDS))]
    pieces += [(c, -8.0) for c in chars] + [("▁" + c, -8.5) for c in chars]
    tokenizer = Tokenizer(models.Unigram(pieces, unk_id=2, byte_fallback=False))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")])
    tokenizer.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                                             special_tokens=[("</s>", 1)])
    tokenizer.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(folder / "tokenizer.json"))
    config = dict(T5_SPECIAL, model_max_length=512, tokenizer_class="T5Tokenizer", extra_ids=0)
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    (folder / "special_tokens_map.json").write_text(json.dumps(T5_SPECIAL, indent=2) + "\n", encoding="utf-8")
    return tokenizer.get_vocab_size()
