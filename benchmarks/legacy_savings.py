"""Bytes per file: a PerCo (SD) research-code file against the same content as our bitstream, on photos.

    python benchmarks/legacy_savings.py [--images ../shared/data/kodak] [--out benchmarks/results/legacy_savings]

For each photo, resized to 512 x 512 as the research code's `read_png` does: indices from a tiny random
PerCo (SD) model's hyper-encoder at rates 0.0313 and 0.0019 (uniform coding costs the same whatever the
weights), a fixed caption (the published BLIP-2 caption style); the research file is built exactly as its
`compress` writes it (pickle container, zlib level 9, torchac under the uniform model: our byte-identical
torchac encoder), ours by `perco import-legacy` of that file. Writes JSON and markdown.
"""

import argparse
import json
import pickle
import platform
import statistics
import tempfile
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

from perco.engine import Codec, bitstream
from perco.engine.legacy import import_legacy, torchac_encode, uniform_cdf
from perco.export.tiny import init_tiny

CLIP = Path(__file__).resolve().parents[1] / "tests" / "data" / "clip-tokenizer"  # the real CLIP vocabulary
CAPTION = "a river runs through a rocky forest with mountains in the background"


def legacy_file(indices: np.ndarray, caption: str, size: tuple, k: int) -> bytes:
    container = {0: pickle.dumps(zlib.compress(caption.encode("utf-8"), level=9)),
                 1: pickle.dumps(torchac_encode(indices.reshape(-1), uniform_cdf(k))), 2: pickle.dumps(size)}
    return pickle.dumps(container)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", default=str(Path(__file__).resolve().parents[2] / "shared" / "data" / "kodak"))
    parser.add_argument("--out", default="benchmarks/results/legacy_savings")
    args = parser.parse_args()
    photos = sorted(Path(args.images).glob("*.png"))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for rate in ("0.0313", "0.0019"):
            codec = Codec.from_pretrained(init_tiny(Path(tmp) / rate, rate=rate, tokenizer=CLIP), backend="torch")
            k = codec.model.rate.codebook_size
            for photo in photos:
                image = np.asarray(Image.open(photo).convert("RGB").resize((512, 512), Image.BICUBIC))
                ours_direct = codec.compress(image, caption=CAPTION)
                _, _, indices = bitstream.unpack(ours_direct, codec.model.stream_spec)
                old = legacy_file(indices, CAPTION, (512, 512), k)
                ours = import_legacy(old, codec.model)
                assert ours == ours_direct  # import gives what our encoder writes for the same content
                rows.append({"rate": rate, "photo": photo.name, "legacy_bytes": len(old), "ours_bytes": len(ours),
                             "saved_bytes": len(old) - len(ours)})
    summary = {rate: {"median_legacy": statistics.median(r["legacy_bytes"] for r in rows if r["rate"] == rate),
                      "median_ours": statistics.median(r["ours_bytes"] for r in rows if r["rate"] == rate),
                      "median_saved": statistics.median(r["saved_bytes"] for r in rows if r["rate"] == rate)}
               for rate in ("0.0313", "0.0019")}
    result = {"machine": f"{platform.machine()}, {platform.python_version()}", "caption": CAPTION, "rows": rows,
              "summary": summary, "command": "python benchmarks/legacy_savings.py"}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    lines = ["# Research-code files vs PerCo Engine bitstreams", "",
             f"`{result['command']}`: {len(photos)} Kodak photos at 512 x 512, caption \"{CAPTION}\", tiny random "
             "PerCo (SD) models with the real CLIP tokenizer (uniform index coding: the bytes do not depend on the weights). `ours` is "
             "`perco import-legacy` of the research file, identical to `perco compress` of the same content.", "",
             "| rate | photo | research file | ours | saved |", "|---|---|---:|---:|---:|"]
    lines += [f"| {r['rate']} | {r['photo']} | {r['legacy_bytes']} | {r['ours_bytes']} | {r['saved_bytes']} |"
              for r in rows]
    lines += ["", "| rate | median research file | median ours | median saved |", "|---|---:|---:|---:|"]
    lines += [f"| {rate} | {s['median_legacy']} | {s['median_ours']} | {s['median_saved']} |"
              for rate, s in summary.items()]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
