"""Entropy coder throughput: symbols/s of batched rANS decode and encode, per path and model kind.

    python benchmarks/entropy.py [--smoke] [--out benchmarks/results/entropy]

Paths: "cpu" (constriction, one core) always; "cuda" (libperco_kernels via $PERCO_KERNELS_LIB,
host helpers, so the GPU figure includes host<->device copies) where a GPU is present. Every
figure is the median of the repeats after a warm-up, with min and max.
"""

import argparse
import json
import platform
import statistics
from pathlib import Path

import numpy as np

from perco.benchmarks.harness import measure
from perco.engine.entropy.batch import OK, BatchCoder, Model
from perco.engine.entropy.tables import PROB_TOTAL, tables_from_logits


def timed(fn, repeats):
    times = measure(fn, repeats, warmup=1)
    return statistics.median(times), min(times), max(times)


def cases(smoke: bool):
    rng = np.random.default_rng(0)
    grid = [(256, 1, 4096), (256, 100, 1024), (8192, 100, 1024), (65536, 10, 1024)]
    if not smoke:
        grid += [(256, 10_000, 1024), (8192, 10_000, 256)]
    for k, streams, length in grid:
        for kind in ("uniform", "static", "per_symbol"):
            n = streams * length
            if kind == "per_symbol" and n * k > (2_000_000 if smoke else 200_000_000):
                continue
            if kind == "uniform":
                model = Model(k)
            elif kind == "static":
                model = Model(k, tables_from_logits(rng.standard_normal(k).astype(np.float32) * 2))
            else:
                model = Model(k, tables_from_logits(rng.standard_normal((n, k)).astype(np.float32) * 2))
            table = model.table if model.table is not None else None
            if table is None or table.ndim == 1:
                p = (np.full(k, 1 / k) if table is None else table / PROB_TOTAL)
                symbols = rng.choice(k, size=n, p=p)
            else:
                symbols = np.array([rng.choice(k, p=row / PROB_TOTAL) for row in table])
            yield kind, k, streams, length, model, np.split(symbols.astype(np.int32), streams)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true", help="small sizes (seconds), as CI runs it")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default="benchmarks/results/entropy")
    args = parser.parse_args()
    coders = [BatchCoder(use_gpu=False)]
    if BatchCoder().device == "cuda":
        coders.append(BatchCoder())
    rows = []
    for kind, k, streams, length, model, symbols in cases(args.smoke):
        n = streams * length
        for coder in coders:
            words = coder.encode(symbols, model)
            decoded, status = coder.decode(words, [length] * streams, model)
            assert (status == OK).all() and all(np.array_equal(a, b) for a, b in zip(decoded, symbols))
            enc = timed(lambda: coder.encode(symbols, model), args.repeats)
            dec = timed(lambda: coder.decode(words, [length] * streams, model), args.repeats)
            bits = 32 * sum(len(w) for w in words)
            rows.append({"path": coder.device, "kind": kind, "K": k, "streams": streams, "symbols_per_stream": length,
                         "encode_symbols_per_s": n / enc[0], "decode_symbols_per_s": n / dec[0],
                         "encode_s": enc, "decode_s": dec, "bits_per_symbol": bits / n})
            print(json.dumps(rows[-1]), flush=True)
    result = {"machine": platform.platform(), "python": platform.python_version(), "smoke": args.smoke,
              "repeats": args.repeats, "rows": rows}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [f"Entropy coder throughput (`python benchmarks/entropy.py{' --smoke' if args.smoke else ''}`), "
             f"{platform.platform()}", "",
             "| path | model | K | streams x symbols | decode Msym/s | encode Msym/s | bits/symbol |",
             "|---|---|---:|---|---:|---:|---:|"]
    lines += [f"| {r['path']} | {r['kind']} | {r['K']} | {r['streams']} x {r['symbols_per_stream']} | "
              f"{r['decode_symbols_per_s'] / 1e6:.2f} | {r['encode_symbols_per_s'] / 1e6:.2f} | "
              f"{r['bits_per_symbol']:.3f} |" for r in rows]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
