"""Caption bytes: our CLIP-token coder vs zlib level 9, with a model's tokenizer.

    python benchmarks/caption_rate.py --model DIR [--out benchmarks/results/caption_rate]

Writes JSON + markdown. With the real CLIP vocabulary (e.g. a model made by
`perco init-tiny DIR --tokenizer tests/data/clip-tokenizer`) this is the figure docs/bitstream.md quotes.
"""

import argparse
import json
import platform
import zlib
from pathlib import Path

import numpy as np

from perco.engine import bitstream
from perco.engine.bitstream import Header
from perco.engine.model import ModelInfo
from perco.engine.text import CaptionTokenizer

CAPTIONS = [  # the three published PerCo (SD) BLIP-2 captions, then ordinary COCO-style captions
    "a red barn with a pond in the background",
    "a river runs through a rocky forest with mountains in the background",
    "two parrots standing next to each other with leaves in the background",
    "a man riding a wave on top of a surfboard",
    "a kitchen with a stove, a sink and a refrigerator",
    "a lighthouse on a cliff overlooking the ocean at sunset",
    "a bowl of fruit on a wooden table",
    "two boats docked in a harbor next to a village",
]


def measure(model_dir) -> dict:
    info = ModelInfo(model_dir)
    spec = info.stream_spec
    tokenizer = CaptionTokenizer(info.folder / "tokenizer", info.tokens)
    rows, cols = spec.token_grid(512, 512)
    results = []
    for text in CAPTIONS:
        ids = tokenizer(text)
        data = bitstream.pack(Header(spec.fingerprint[:4], 512, 512), ids, np.zeros((rows, cols), np.int64), spec)
        results.append({"caption": text, "tokens": int(ids.size), "ours_bytes": bitstream.parse(data)[3].caption,
                        "zlib9_bytes": len(zlib.compress(text.encode(), 9)), "utf8_bytes": len(text.encode())})
    ours, theirs = sum(r["ours_bytes"] for r in results), sum(r["zlib9_bytes"] for r in results)
    return {"vocab_size": info.tokens.vocab_size, "python": platform.python_version(), "captions": results,
            "total_ours": ours, "total_zlib9": theirs, "ratio": ours / theirs}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True, help="model folder (its tokenizer is used)")
    parser.add_argument("--out", default="benchmarks/results/caption_rate", help="output path without suffix")
    args = parser.parse_args()
    result = measure(args.model)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [f"Caption bytes, CLIP vocabulary of {result['vocab_size']} tokens "
             f"(`python benchmarks/caption_rate.py --model DIR`)", "",
             "| caption | tokens | ours (B) | zlib -9 (B) |", "|---|---:|---:|---:|"]
    lines += [f"| {r['caption']} | {r['tokens']} | {r['ours_bytes']} | {r['zlib9_bytes']} |" for r in result["captions"]]
    lines += [f"| **total** | | **{result['total_ours']}** | **{result['total_zlib9']}** |", "",
              f"ratio ours / zlib: {result['ratio']:.3f}"]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
