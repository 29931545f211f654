"""Entropy coder throughput: batched rANS decode/encode, split streams, and the learned model's steps -> symbols.

    python benchmarks/entropy.py [--smoke] [--out benchmarks/results/entropy]

Paths: "cpu" (the stream coder of perco.engine.entropy.rans: constriction, one core) always; the kernels
library through $PERCO_KERNELS_LIB where it loads: "cuda" on a GPU, "host-emulation" for
libperco_kernels_host.so (kernels/host: the CUDA kernels executed on the CPU, one thread per CUDA thread;
its timings say nothing about a GPU, the rows only show the path runs). Sections:
  1. batched decode/encode through the host helpers (host <-> device copies included), per model kind;
  2. static-table batched decode of >= 10^4 streams with everything on the device (the kernel alone),
     plain and split (P sub-streams per sequence);
  3. split streams: one long sequence decoded as P sub-streams (P threads), and the bytes each extra
     sub-stream costs;
  4. steps -> symbols: a batch of coarse-to-fine grids coded with per-symbol tables from int64 logit
     steps, decoded group by group with the steps already on the device (tables made there, only the
     symbols copied back), against the floor of reading every step once at the device bandwidth
     measured with device-to-device copies; the CPU path (numpy tables + the CPU coder) beside it.
Every figure is the median of the repeats after a warm-up, with min and max.
"""

import argparse
import json
import platform
import statistics
from pathlib import Path

import numpy as np

from perco.benchmarks.harness import measure
from perco.engine.entropy.batch import OK, BatchCoder, Model
from perco.engine.entropy.schedules import group_positions, make_schedule
from perco.engine.entropy.tables import PROB_TOTAL, tables_from_logits, tables_from_steps


def timed(fn, repeats):
    times = measure(fn, repeats, warmup=1)
    return statistics.median(times), min(times), max(times)


def label(coder: BatchCoder) -> str:
    return "host-emulation" if coder.emulated else coder.device


def sample(rng, cdf_rows: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """One symbol per entry of `rows` from the cumulative tables cdf_rows [R, K+1] (row cdf_rows[rows[i]])."""
    u = rng.integers(0, PROB_TOTAL, rows.size)
    if cdf_rows.shape[0] == 1:
        return (np.searchsorted(cdf_rows[0], u, side="right") - 1).astype(np.int32)
    return np.array([np.searchsorted(cdf_rows[r], v, side="right") - 1 for r, v in zip(rows.tolist(), u.tolist())],
                    dtype=np.int32)


# --- 1. the host-helper matrix ------------------------------------------------------------------

def cases(smoke: bool, emulated: bool):
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


def host_helper_rows(coders, smoke, repeats):
    rows = []
    for kind, k, streams, length, model, symbols in cases(smoke, False):
        n = streams * length
        for coder in coders:
            if coder.emulated and n * (k if kind == "per_symbol" else 1) > 3_000_000:
                continue  # the emulation pays a real thread per CUDA thread: keep it to small batches
            words = coder.encode(symbols, model)
            decoded, status = coder.decode(words, [length] * streams, model)
            assert (status == OK).all() and all(np.array_equal(a, b) for a, b in zip(decoded, symbols))
            enc = timed(lambda: coder.encode(symbols, model), repeats)
            dec = timed(lambda: coder.decode(words, [length] * streams, model), repeats)
            bits = 32 * sum(len(w) for w in words)
            rows.append({"path": label(coder), "kind": kind, "K": k, "streams": streams, "symbols_per_stream": length,
                         "encode_symbols_per_s": n / enc[0], "decode_symbols_per_s": n / dec[0],
                         "encode_s": enc, "decode_s": dec, "bits_per_symbol": bits / n})
            print(json.dumps(rows[-1]), flush=True)
    return rows


# --- 2. + 3. device-resident static decode, split streams ---------------------------------------

def static_model(k: int, rng) -> Model:
    return Model(k, tables_from_logits(rng.standard_normal(k).astype(np.float32) * 2))


def encode_batch(cpu: BatchCoder, sequences: int, length: int, model: Model, splits: int, rng):
    """Identical sequences (the encode is the CPU's, once): per sequence `splits` word arrays."""
    symbols = sample(rng, model.cdf(), np.zeros(length, np.int64))
    sub = cpu.encode_split([symbols], model, splits)[0]
    return symbols, [sub] * sequences


def device_decode(coder: BatchCoder, model: Model, streams, length: int, splits: int, repeats: int, expect):
    """The kernel alone on device-resident inputs -> (median s, min, max)."""
    flat = [w for sub in streams for w in sub]
    words = coder.to_device(np.concatenate(flat).astype(np.uint32))
    word_offsets = coder.to_device(np.concatenate([[0], np.cumsum([len(w) for w in flat])]).astype(np.uint64))
    symbol_offsets = coder.to_device(np.arange(len(streams) + 1, dtype=np.uint64) * length)
    cdf = coder.to_device(model.cdf())
    out = coder.empty_device(max(len(streams) * length, 1), np.int32)
    status = coder.empty_device((len(streams), splits), np.int32)
    run = lambda: coder.decode_split_device(model, cdf, words, word_offsets, symbol_offsets, splits, out, status)
    run()
    got = out.to_host()
    assert (status.to_host() == OK).all() and np.array_equal(got[:length], expect)
    assert np.array_equal(got[-length:], expect)
    return timed(run, repeats)


def batched_static_rows(coders, smoke, repeats):
    rng = np.random.default_rng(1)
    k, cpu = 256, BatchCoder(use_gpu=False)
    model = static_model(k, rng)
    rows = []
    for coder in coders:
        small = smoke or coder.emulated
        sequences, length = (200, 256) if small else (10_000, 1024)
        for splits in (1, 4) if not small else (1, 2):
            symbols, streams = encode_batch(cpu, sequences, length, model, splits, rng)
            n = sequences * length
            if coder.device == "cpu":
                if splits > 1:
                    continue
                decoded = timed(lambda: coder.decode([s[0] for s in streams], [length] * sequences, model), repeats)
            else:
                decoded = device_decode(coder, model, streams, length, splits, repeats, symbols)
            rows.append({"path": label(coder), "K": k, "sequences": sequences, "symbols_per_sequence": length,
                         "splits": splits, "threads": sequences * splits, "decode_s": decoded,
                         "decode_symbols_per_s": n / decoded[0],
                         "note": "device-resident: kernel only" if coder.device == "cuda" else "CPU coder, one core"})
            print(json.dumps(rows[-1]), flush=True)
    return rows


def split_rows(coders, smoke, repeats):
    """One sequence as P sub-streams: decode time against P, and the words each extra sub-stream costs."""
    rng = np.random.default_rng(2)
    k, cpu = 8192, BatchCoder(use_gpu=False)
    model = static_model(k, rng)
    rows, data = [], {}
    for coder in coders:
        small = smoke or coder.emulated
        length = 4096 if small else 1 << 20
        if length not in data:  # the same symbols for every path
            data[length] = sample(rng, model.cdf(), np.zeros(length, np.int64))
        symbols = data[length]
        single = sum(len(w) for w in cpu.encode_split([symbols], model, 1)[0])
        for splits in ((1, 8, 64) if small else (1, 16, 256, 4096)):
            streams = cpu.encode_split([symbols], model, splits)
            words = sum(len(w) for w in streams[0])
            if coder.device == "cpu":
                decoded = timed(lambda: coder.decode_split(streams, [length], model, splits), repeats)
            else:
                decoded = device_decode(coder, model, streams, length, splits, repeats, symbols)
            rows.append({"path": label(coder), "K": k, "symbols": length, "splits": splits, "decode_s": decoded,
                         "decode_symbols_per_s": length / decoded[0], "words": words,
                         "bytes_per_extra_stream": 4 * (words - single) / (splits - 1) if splits > 1 else 0.0})
            print(json.dumps(rows[-1]), flush=True)
    return rows


# --- 4. steps -> symbols (the learned entropy model's decode) -----------------------------------

def learned_workload(side: int, k: int, rng):
    """A coarse-to-fine grid's groups, random int64 steps for every position (the row maximum at 0)."""
    order = group_positions(make_schedule("coarse-to-fine", side, side))
    steps = rng.integers(0, 40_000, (side * side, k), dtype=np.int64)
    steps[np.arange(side * side), rng.integers(0, k, side * side)] = 0
    sequence = np.concatenate(order)  # the coded order: group by group, raster order within a group
    tables = tables_from_steps(steps[sequence])
    symbols = sample(rng, np.concatenate([np.zeros((len(tables), 1), np.int64), np.cumsum(tables, 1)], 1),
                     np.arange(len(tables)))
    return order, steps, sequence, tables, symbols


def steps_rows(coders, smoke, repeats):
    rng = np.random.default_rng(3)
    cpu = BatchCoder(use_gpu=False)
    rows, extra = [], {}
    for coder in coders:
        small = smoke or coder.emulated
        side, k, batch = (8, 256, 2) if small else (64, 8192, 8)
        if coder.device == "cpu":  # one grid: the CPU path decodes the batch's grids one after another
            batch = 1
        order, steps, sequence, tables, symbols = learned_workload(side, k, rng)
        splits_list = (1,) if coder.device == "cpu" else (1, 32) if not small else (1, 4)
        for splits in splits_list:
            words = cpu.encode_split([symbols], Model(k, tables), splits)[0]
            streams = [words] * batch
            starts = np.cumsum([0] + [len(p) for p in order])
            if coder.device == "cpu":
                chunks = [steps[sequence[starts[g] : starts[g + 1]]] for g in range(len(order))]
            else:  # each group's steps for the whole batch, on the device before the clock starts
                chunks = [coder.to_device(np.tile(steps[sequence[starts[g] : starts[g + 1]]], (batch, 1)))
                          for g in range(len(order))]

            def run():
                decoder = coder.resumable(streams, splits)
                got = [decoder.pop_steps(chunk) for chunk in chunks]
                status = decoder.finish()
                decoder.close()
                return got, status

            got, status = run()
            assert (status == OK).all()
            for g, part in enumerate(got):
                assert np.array_equal(part.reshape(batch, -1), np.tile(symbols[starts[g] : starts[g + 1]], (batch, 1)))
            decoded = timed(run, repeats)
            n = batch * side * side
            step_bytes = n * k * 8
            row = {"path": label(coder), "grid": f"{side}x{side}", "K": k, "batch": batch, "groups": len(order),
                   "splits": splits, "symbols": n, "steps_bytes": step_bytes, "decode_s": decoded,
                   "decode_symbols_per_s": n / decoded[0], "steps_bytes_per_s": step_bytes / decoded[0]}
            if coder.device == "cuda":
                bandwidth = extra.setdefault(label(coder), coder.copy_bandwidth(1 << 20 if small else 1 << 30,
                                                                                 3 if small else 20))
                row["device_bandwidth_bytes_per_s"] = bandwidth
                row["floor_s"] = step_bytes / bandwidth
                row["over_floor"] = decoded[0] / row["floor_s"]
            rows.append(row)
            print(json.dumps(rows[-1]), flush=True)
    return rows, extra


# --- report -----------------------------------------------------------------------------------

def markdown(result: dict, command: str) -> str:
    lines = [f"Entropy coder throughput (`{command}`), {result['machine']}", ""]
    if result["emulated"]:
        lines += ["**host-emulation** rows: libperco_kernels_host.so, the CUDA kernels executed on the CPU (a thread "
                  "per CUDA thread, real barriers). Their timings mean nothing for a GPU; they show the GPU code path "
                  "runs and gives the CPU coder's symbols.", ""]
    lines += ["## 1. Batched coding through the host helpers (copies included)", "",
              "| path | model | K | streams x symbols | decode Msym/s | encode Msym/s | bits/symbol |",
              "|---|---|---:|---|---:|---:|---:|"]
    lines += [f"| {r['path']} | {r['kind']} | {r['K']} | {r['streams']} x {r['symbols_per_stream']} | "
              f"{r['decode_symbols_per_s'] / 1e6:.2f} | {r['encode_symbols_per_s'] / 1e6:.2f} | "
              f"{r['bits_per_symbol']:.3f} |" for r in result["rows"]]
    lines += ["", "## 2. Static-table batched decode (device rows: inputs and outputs on the device, kernel only)", "",
              "| path | K | sequences x symbols | splits | threads | decode Msym/s | median ms |",
              "|---|---:|---|---:|---:|---:|---:|"]
    lines += [f"| {r['path']} | {r['K']} | {r['sequences']} x {r['symbols_per_sequence']} | {r['splits']} | "
              f"{r['threads']} | {r['decode_symbols_per_s'] / 1e6:.2f} | {1e3 * r['decode_s'][0]:.3f} |"
              for r in result["batched_static"]]
    lines += ["", "## 3. Split streams: one sequence as P sub-streams (symbol t in sub-stream t mod P)", "",
              "| path | K | symbols | P | decode Msym/s | median ms | words | bytes per extra sub-stream |",
              "|---|---:|---:|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['path']} | {r['K']} | {r['symbols']} | {r['splits']} | {r['decode_symbols_per_s'] / 1e6:.2f} | "
              f"{1e3 * r['decode_s'][0]:.3f} | {r['words']} | {r['bytes_per_extra_stream']:.2f} |"
              for r in result["split"]]
    lines += ["", "## 4. Steps -> symbols (learned model, coarse-to-fine, group by group; device rows: steps on the "
              "device, only the symbols copied back)", "",
              "| path | grid x batch | K | groups | P | Msym/s | steps GB/s | median ms | floor ms | x floor |",
              "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in result["steps_to_symbols"]:
        floor = f"{1e3 * r['floor_s']:.3f} | {r['over_floor']:.2f}" if "floor_s" in r else "- | -"
        lines.append(f"| {r['path']} | {r['grid']} x {r['batch']} | {r['K']} | {r['groups']} | {r['splits']} | "
                     f"{r['decode_symbols_per_s'] / 1e6:.3f} | {r['steps_bytes_per_s'] / 1e9:.2f} | "
                     f"{1e3 * r['decode_s'][0]:.3f} | {floor} |")
    for path, bandwidth in result["bandwidth"].items():
        lines.append(f"\n{path}: device-to-device copy bandwidth {bandwidth / 1e9:.1f} GB/s (read + written); the "
                     "floor reads every int64 step once at it.")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true", help="small sizes (seconds), as CI runs it")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default="benchmarks/results/entropy")
    args = parser.parse_args()
    coders = [BatchCoder(use_gpu=False)]
    if BatchCoder().device == "cuda":
        coders.append(BatchCoder())
    rows = host_helper_rows(coders, args.smoke, args.repeats)
    batched = batched_static_rows(coders, args.smoke, args.repeats)
    split = split_rows(coders, args.smoke, args.repeats)
    steps, bandwidth = steps_rows(coders, args.smoke, args.repeats)
    result = {"machine": platform.platform(), "python": platform.python_version(), "smoke": args.smoke,
              "repeats": args.repeats, "emulated": any(c.emulated for c in coders), "rows": rows,
              "batched_static": batched, "split": split, "steps_to_symbols": steps, "bandwidth": bandwidth}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    command = f"python benchmarks/entropy.py{' --smoke' if args.smoke else ''}"
    out.with_suffix(".md").write_text(markdown(result, command))
    print(markdown(result, command))


if __name__ == "__main__":
    main()
