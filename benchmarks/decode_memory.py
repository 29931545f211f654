"""Peak memory of one decode against the size limit's estimate (`perco.engine.limits`).

Each decode runs in its own process, so its peak resident set (ru_maxrss) is its own:

    python -m perco.benchmarks.decode_memory --model DIR --backends torch,onnxruntime \
        --sizes 512x512,1024x1024,1536x1536 --steps 1 --out benchmarks/results/decode_memory

The bitstreams carry random token indices of the right grid (any valid stream costs the same to
decode), so no encoder runs. The estimate must stay above the measurement (it is meant to err high).
"""

import argparse
import json
import resource
import subprocess
import sys
from pathlib import Path

import numpy as np


def make_bitstream(spec, width: int, height: int, seed: int = 0) -> bytes:
    from perco.engine import bitstream

    m, stride = spec.pad_multiple, spec.rate.token_stride
    grid = (-(-height // m) * m // stride, -(-width // m) * m // stride)
    indices = np.random.default_rng(seed).integers(0, spec.rate.codebook_size, size=grid)
    header = bitstream.Header(spec.fingerprint[: bitstream.FINGERPRINT_BYTES], width, height, seed, bitstream.Hints(),
                              spec.family)
    return bitstream.pack(header, np.zeros(0, np.int64), indices, spec.stream_spec)


def _child(model: str, backend: str, width: int, height: int, steps: int) -> None:
    """Decode once and print the peak RSS (bytes) as JSON."""
    import time

    from perco.engine import Codec

    codec = Codec.from_pretrained(model, backend=backend, max_pixels=width * height)
    baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    data = make_bitstream(codec.model, width, height)
    start = time.perf_counter()
    codec.decompress(data, steps=steps)
    print(json.dumps({"peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                      "rss_after_load": baseline, "seconds": time.perf_counter() - start}))


def measure(model: str, backends: list, sizes: list, steps: int) -> list:
    from perco.engine import limits
    from perco.engine.model import ModelInfo

    spec = ModelInfo.open(model).spec
    rows = []
    for backend in backends:
        memory = limits.backend_memory(backend)
        for width, height in sizes:
            m = spec.pad_multiple
            latent = (-(-height // m) * m // 8) * (-(-width // m) * m // 8)
            estimate = limits.coding_bytes(spec.sizes, memory, latent)
            proc = subprocess.run([sys.executable, "-m", "perco.benchmarks.decode_memory", "--child", model, backend,
                                   str(width), str(height), str(steps)], capture_output=True, text=True)
            row = {"backend": backend, "width": width, "height": height, "steps": steps, "estimate": estimate}
            if proc.returncode == 0:
                row.update(json.loads(proc.stdout.strip().splitlines()[-1]))
            else:
                row["error"] = (proc.stderr.strip().splitlines() or ["failed"])[-1]
            rows.append(row)
            print(_line(row), file=sys.stderr)
    return rows


def _line(row: dict) -> str:
    gib = 2.0**30
    measured = f"{row['peak_rss'] / gib:7.2f} GiB peak RSS" if "peak_rss" in row else f"error: {row['error']}"
    return (f"{row['backend']:12s} {row['width']}x{row['height']:<6d} estimate {row['estimate'] / gib:7.2f} GiB  "
            f"{measured}")


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--child":
        _child(argv[1], argv[2], int(argv[3]), int(argv[4]), int(argv[5]))
        return 0
    p = argparse.ArgumentParser(prog="python -m perco.benchmarks.decode_memory", description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True)
    p.add_argument("--backends", default="torch,onnxruntime")
    p.add_argument("--sizes", default="512x512,1024x1024")
    p.add_argument("--steps", type=int, default=1)
    p.add_argument("--out", default=None, help="write OUT.json and OUT.md")
    args = p.parse_args(argv)
    sizes = [tuple(int(v) for v in s.lower().split("x")) for s in args.sizes.split(",")]
    rows = measure(args.model, args.backends.split(","), sizes, args.steps)
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.with_suffix(".json").write_text(json.dumps(rows, indent=1) + "\n")
        out.with_suffix(".md").write_text("\n".join(_line(r) for r in rows) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
