"""Index-section rate of the learned entropy model vs uniform and static coding, on Kodak, both families.

    python benchmarks/entropy_rate.py [--kodak ../shared/data/kodak] [--held-out 3] [--steps 2000]
                                      [--out benchmarks/results/entropy_rate]

For each case (family, rate) a tiny random-weight model is written with `perco init-tiny` into a
temporary folder and its entropy model trained (`train_entropy`, tiny preset) on the first photos
(random crops, flips); the last `--held-out` photos, whole (edge-padded to the pad multiple), are
measured: bits per token of uniform coding (log2 K), a static unigram table (the training crops'
histogram + 1), the float model and the exported integer network (exact, from its tables); the
index-section bytes, estimated (ceil(bits / 8)) and from the real coders (rANS words, trailing zero
bytes dropped; the learned stream decoded back); hybrid mode at 1/2 and 1/4 of the groups (bits and
bytes of the sent groups only); the entropy model's latency per image (one network call per
group, numpy `IntNet` and ONNX Runtime CPU, steps checked equal) and the tiny denoiser's latency
per guided step on ONNX Runtime CPU at the same image size. Timings: median (min-max) after a warm-up.
"""

import argparse
import json
import math
import os
import platform
import shlex
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from perco.benchmarks.harness import measure, summarize

CASES = (("perco-sd", "0.0313"), ("perco-sd", "0.0019"), ("percov2", "0.0313"), ("percov2", "0.0078"))
ROOT = Path(__file__).resolve().parent.parent
FULL_SIZE = {  # the full-size denoiser step on ONNX Runtime CPU, from this repository's own results
    "perco-sd": ("onnx_fullsize.json", ("latency", "denoiser", "onnxruntime_cpu"), "guided UNet step, 512x512, fp32"),
    "percov2": ("percov2_fullsize.json", ("jobs", "latency", "onnxruntime_cpu"),
                "guided MMDiT step, 512x512, fp16 graph"),
}


def stream_bytes(words: np.ndarray) -> int:
    """Bytes of a rANS stream: 4 per uint32 word, less the trailing zero bytes."""
    return len(np.ascontiguousarray(words, dtype="<u4").tobytes().rstrip(b"\0"))


def static_stream(symbols: np.ndarray, table: np.ndarray) -> np.ndarray:
    from perco.engine.entropy.rans import encode_symbol_tables

    return encode_symbol_tables(symbols, np.ascontiguousarray(np.broadcast_to(table, (symbols.size, table.size))))


def _preset_text(name: str) -> str:
    from perco.engine.entropy.intnet import PRESETS

    preset = PRESETS[name]
    context = 1 + sum((kernel - 1) * dilation for kernel, dilation in preset["layers"])
    return f"{name} preset ({preset['channels']} channels, {context}x{context} context)"


def denoiser_step(model: Path, work: Path, width: int, height: int, repeats: int) -> dict:
    """One guided denoiser step (batch 2) of the exported tiny model on ONNX Runtime CPU at width x height."""
    import onnxruntime as ort

    from perco.engine.model import ModelInfo
    from perco.export.graphs import Profile, model_constants, sample_inputs, symbol_sizes
    from perco.export.onnx import export_model

    info = ModelInfo.open(model)
    profile = Profile(batch=(1, 1, 1), height=(height,) * 3, width=(width,) * 3)
    manifest = json.loads(export_model(model, work, profile=profile, log=lambda text: None).read_text())
    contract = info.family.contract(False)
    sizes = symbol_sizes(profile, info.rate.token_stride, model_constants(info), info.family.latent_factor)
    args = sample_inputs("denoiser", sizes, info.tokens.vocab_size, info.rate.codebook_size, contract=contract)
    feed = {name: a.numpy() for (name, _, _), a in zip(contract["denoiser"].inputs, args)}
    session = ort.InferenceSession(str(work / manifest["graphs"]["denoiser"]["file"]),
                                   providers=["CPUExecutionProvider"])
    return {"shapes": {k: list(v.shape) for k, v in feed.items()},
            **summarize(measure(lambda: session.run(None, feed), repeats, warmup=1))}


def full_size_step(family: str):
    name, keys, what = FULL_SIZE[family]
    path = ROOT / "benchmarks" / "results" / name
    if not path.is_file():
        return None
    value = json.loads(path.read_text())
    for key in keys:
        value = value[key]
    return {"source": f"benchmarks/results/{name}", "what": what, **value}


def measure_case(family: str, rate: str, args, work: Path, log) -> dict:
    import onnxruntime as ort

    from perco.engine.entropy.learned import LearnedIndexCoder, load_entropy_model
    from perco.engine.entropy.schedules import group_positions, make_schedule
    from perco.engine.entropy.tables import uniform_table
    from perco.engine.model import ModelInfo
    from perco.export.entropy_model import onnx_graph
    from perco.export.entropy_train import index_maps, integer_group_bits, static_bits, train_entropy, unigram_table
    from perco.export.tiny import init_tiny

    model = init_tiny(work / "model", rate=rate, family=family)
    maps = index_maps(model, args.kodak, crop=args.crop, crops_per_image=args.crops, held_out=args.held_out, log=log)
    stride = ModelInfo.open(model).rate.token_stride
    height, width = (side * stride for side in maps.evaluation[0].shape)
    log(f"{family} {rate}: the tiny denoiser's step on ONNX Runtime at {width}x{height}")
    denoiser = denoiser_step(model, work / "onnx", width, height, args.repeats)
    report = train_entropy(model, maps=maps, preset=args.preset, steps=args.steps, batch=args.batch, threads=args.threads, log=log)

    entropy = load_entropy_model(model / "entropy_model")
    net, coder = entropy.net, LearnedIndexCoder(entropy)
    k = net.config.codebook_size
    unigram = unigram_table(maps.histogram)
    session = ort.InferenceSession(onnx_graph(net.config, net.weights).SerializeToString(),
                                   providers=["CPUExecutionProvider"])
    images = []
    for path, grid in zip(maps.held_out_images, maps.evaluation):
        plan = make_schedule(net.config.schedule, *grid.shape)
        order = group_positions(plan)
        inputs = [np.where(plan < g, grid, net.config.mask).astype(np.int64) for g in range(len(order))]
        for ids, positions in zip(inputs, order):  # the ONNX graph computes exactly the reference's steps
            ours = session.run(["steps"], {"ids": ids})[0].reshape(k, -1)[:, positions].T
            assert np.array_equal(ours, net.steps(ids, positions)), "ONNX Runtime and numpy steps differ"
        flat = grid.reshape(-1)
        group_bits = integer_group_bits(net, grid)
        words = coder.encode(grid)
        assert np.array_equal(coder.decode(words, grid.shape), grid), "the learned stream does not round-trip"
        bits = {"uniform": grid.size * math.log2(k), "unigram": static_bits(unigram, [grid]),
                "learned": float(group_bits.sum())}
        row = {"image": Path(path).name, "grid": list(grid.shape), "tokens": int(grid.size), "groups": len(order),
               "bits": bits, "bytes_estimate": {name: math.ceil(b / 8) for name, b in bits.items()},
               "bytes": {"uniform": stream_bytes(static_stream(flat, uniform_table(k))),
                         "unigram": stream_bytes(static_stream(flat, unigram)), "learned": stream_bytes(words)},
               "hybrid": {}}
        for label, fraction in (("1/2", 0.5), ("1/4", 0.25)):
            sent = math.ceil(len(order) * fraction)  # as the codec rounds a fraction of the groups
            hybrid = coder.encode(grid, groups=sent)
            known = np.concatenate(order[:sent])
            decoded = coder.decode(hybrid, grid.shape, groups=sent).reshape(-1)
            assert np.array_equal(decoded[known], flat[known]), "a hybrid stream does not round-trip its groups"
            row["hybrid"][label] = {"groups": sent, "tokens": int(known.size), "bits": float(group_bits[:sent].sum()),
                                    "bytes": stream_bytes(hybrid)}

        def timed(fn) -> dict:
            runs = measure(fn, args.repeats, warmup=1)
            return {**summarize(runs), "runs_s": runs}

        row["latency"] = {
            "numpy_network": timed(lambda: [net.steps(i, p) for i, p in zip(inputs, order)]),
            "onnxruntime_network": timed(lambda: [session.run(["steps"], {"ids": i}) for i in inputs]),
            "numpy_encode": timed(lambda: coder.encode(grid)),
            "numpy_decode": timed(lambda: coder.decode(words, grid.shape)),
        }
        images.append(row)
    training = {key: value for key, value in report.items() if key not in ("entropy_model", "checkpoint")}
    codes = int(np.unique(np.concatenate([m.reshape(-1) for m in maps.evaluation])).size)
    return {"family": family, "rate": rate, "codebook_size": k, "codes_used_held_out": codes, "token_stride": stride,
            "image_size": [width, height],
            "training": training, "images": images, "denoiser_step_tiny": denoiser,
            "denoiser_step_full_size": full_size_step(family)}


def totals(case: dict) -> dict:
    rows = case["images"]
    tokens = sum(r["tokens"] for r in rows)
    out = {"tokens": tokens}
    for name in ("uniform", "unigram", "learned"):
        out[name] = {"bits_per_token": sum(r["bits"][name] for r in rows) / tokens,
                     "bytes_estimate": sum(r["bytes_estimate"][name] for r in rows),
                     "bytes": sum(r["bytes"][name] for r in rows)}
    for label in ("1/2", "1/4"):
        out[f"hybrid {label}"] = {key: sum(r["hybrid"][label][key] for r in rows)
                                  for key in ("tokens", "bits", "bytes")}
    return out


def pool(timings: list) -> dict:
    """Median (min, max) over the runs of several `summarize` results (each keeps its runs in "runs_s")."""
    runs = [t for timing in timings for t in timing["runs_s"]]
    return summarize(runs)


def _bits(value: float) -> str:
    return f"{value:.4f}" if value >= 0.01 else f"{value:.2e}"


def _ms(t: dict) -> str:
    return f"{t['median_s'] * 1e3:.1f} ({t['min_s'] * 1e3:.1f}-{t['max_s'] * 1e3:.1f})"


def write_markdown(result: dict, path: Path) -> None:
    m = result["machine"]
    lines = [
        "# Learned entropy model: index-section rate on Kodak, both families", "",
        "**The hyper-encoders here have random weights** (tiny models from `perco init-tiny`, seed 0): their index "
        "maps carry the photos' structure (a random cosine VQ sends similar latents to the same few codes, so large "
        "uniform regions become runs of one index), but they use only a handful of the K codes and are far more "
        "predictable than a trained checkpoint's. The savings below show that the model learns and that the integer "
        "network, the coder and hybrid mode work end to end; they are **not** the savings on a trained PerCo "
        "checkpoint.", "",
        f"Machine: {m['cpu_count']}-core {m['machine']} CPU ({m['platform']}), no GPU; Python {m['python']}, torch "
        f"{m['torch']}, ONNX Runtime {m['onnxruntime']}. Load average at start {m['load_start']}, at end "
        f"{m['load_end']}, 1-minute load as each case began "
        f"{', '.join(f'{v:.1f}' for v in m['load_1min_at_each_case'])}: the cores were shared with other jobs, "
        "so the timings are indicative and the minimum is the better estimate of the uncontended latency.",
        f"Command: `{result['command']}` ({result['wall_seconds'] / 60:.1f} min).", "",
        f"Training: {_preset_text(result['settings'].get('preset', 'tiny'))}, coarse-to-fine schedule, {result['settings']['steps']} "
        f"steps (the last quarter quantization-aware), batch {result['settings']['batch']}, "
        f"{result['settings']['crops']} random {result['settings']['crop']} px crops (each flipped with probability "
        f"1/2) of each of the {result['train_images']} training photos, torch threads {result['settings']['threads']}. "
        f"Measured on the {len(result['held_out_images'])} held-out photos ({', '.join(result['held_out_images'])}), "
        "whole, edge-padded to the pad multiple.", "",
        "## Bits per token (held-out photos)", "",
        "| case | grid | K (codes used) | uniform | static unigram | learned (integer, exact) | learned vs unigram "
        "| float model | integer vs float | rounded, no QAT | training (s) |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for case in result["cases"]:
        t, bits = case["totals"], case["training"]["bits_per_token"]
        grid = "x".join(map(str, case["images"][0]["grid"]))
        saving = t["learned"]["bits_per_token"] / t["unigram"]["bits_per_token"] - 1
        lines.append(f"| {case['family']} {case['rate']} | {grid} | {case['codebook_size']} "
                     f"({case['codes_used_held_out']}) | {t['uniform']['bits_per_token']:.3f} | "
                     f"{_bits(t['unigram']['bits_per_token'])} | {_bits(t['learned']['bits_per_token'])} | "
                     f"{saving:+.1%} | {_bits(bits['float'])} | {case['training']['integer_vs_float_gap']:+.2%} | "
                     f"{_bits(bits['rounded_without_qat'])} | {case['training']['train_seconds']:.0f} |")
    lines += ["", "The static unigram table is the training crops' histogram + 1 (`tables_from_probabilities`). "
              "Float model: the network without rounding at the end of its phase; rounded, no QAT: that "
              "float model exported to integers directly. Learned = the exported integer network after QAT, its "
              "exact code length -log2(table / 2^24) group by group. Codes used: distinct indices in the held-out "
              "maps; where a random hyper-encoder sends almost every token to one code (perco-sd 0.0019) all the "
              "rates are near 0 and their ratios mean little.", "",
              "## Index-section bytes, all held-out photos together", "",
              "Estimate: ceil(bits / 8) per photo; real: the rANS stream of each coder (uint32 words, trailing zero "
              "bytes dropped; a stream carries a few bytes of final coder state on top of its bits), the learned one "
              "decoded back. Hybrid: only the first groups are sent (the decoder samples the rest); bits and bytes "
              "of the sent groups.", "",
              "| case | tokens | uniform est. / real | unigram est. / real | learned est. / real | "
              "hybrid 1/2: groups, bits, bytes | hybrid 1/4: groups, bits, bytes |",
              "|---|---:|---:|---:|---:|---|---|"]
    for case in result["cases"]:
        t = case["totals"]
        groups = case["images"][0]
        cells = [f"{t[n]['bytes_estimate']} / {t[n]['bytes']}" for n in ("uniform", "unigram", "learned")]
        hybrid = [f"{groups['hybrid'][h]['groups']} of {groups['groups']}, {t[f'hybrid {h}']['bits']:.1f}, "
                  f"{t[f'hybrid {h}']['bytes']}" for h in ("1/2", "1/4")]
        lines.append(f"| {case['family']} {case['rate']} | {t['tokens']} | " + " | ".join(cells + hybrid) + " |")
    lines += ["", "## Latency per image (ms, median (min-max) over the runs of all held-out photos)", "",
              "Entropy model: one network call per group (all positions of the grid, groups >= g MASK), numpy "
              "`IntNet` and the ONNX graph on ONNX Runtime's CPU provider (default threads; their steps checked "
              "equal); encode and decode: the whole learned index coder (network, tables, rANS) with numpy. "
              "Denoiser: one guided step (batch 2) of the exported **tiny** model on ONNX Runtime CPU at the same "
              "image size; the full-size figure is this repository's earlier measurement at 512x512 (source file "
              "named), not rerun here.", "",
              "| case | grid | groups | numpy network | ONNX Runtime network | numpy encode | numpy decode | "
              "tiny denoiser step (ORT) | full-size denoiser step (ORT) |", "|---|---|---:|---|---|---|---|---|---|"]
    for case in result["cases"]:
        full = case["denoiser_step_full_size"]
        full_text = f"{full['median_s']:.2f} s ({full['what']}; {full['source']})" if full else "not measured"
        first = case["images"][0]
        pooled = {name: pool([row["latency"][name] for row in case["images"]]) for name in first["latency"]}
        lines.append(f"| {case['family']} {case['rate']} | {'x'.join(map(str, first['grid']))} | {first['groups']} | "
                     f"{_ms(pooled['numpy_network'])} | {_ms(pooled['onnxruntime_network'])} | "
                     f"{_ms(pooled['numpy_encode'])} | {_ms(pooled['numpy_decode'])} | "
                     f"{_ms(case['denoiser_step_tiny'])} | {full_text} |")
    lines += ["", f"Timed repeats: {result['settings']['repeats']} after one warm-up, host `perf_counter`. The entropy "
              "model's size does not depend on the diffusion model's, so its latency here is that of a full-size "
              "model at the same grid; the tiny denoiser's is not."]
    path.write_text("\n".join(lines) + "\n")


def main() -> None:
    import onnxruntime
    import torch

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--kodak", default=str(ROOT.parent / "shared" / "data" / "kodak"),
                        help="folder of photos, sorted by name; the last --held-out are measured "
                             "(default: %(default)s)")
    parser.add_argument("--held-out", type=int, default=3, help="photos held out (default: %(default)s)")
    parser.add_argument("--preset", default="tiny", choices=["tiny", "small", "base"],
                        help="entropy model size preset (default: %(default)s)")
    parser.add_argument("--steps", type=int, default=2000, help="training steps per case (default: %(default)s)")
    parser.add_argument("--batch", type=int, default=16, help="maps per training step (default: %(default)s)")
    parser.add_argument("--crop", type=int, default=384,
                        help="training crop side in pixels, a multiple of every case's pad multiple "
                             "(default: %(default)s)")
    parser.add_argument("--crops", type=int, default=64, help="random crops per training photo (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads while training (default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=11,
                        help="timed repeats after one warm-up (default: %(default)s)")
    parser.add_argument("--out", default="benchmarks/results/entropy_rate", help="output path without suffix")
    args = parser.parse_args()

    def log(text: str) -> None:
        print(text, file=sys.stderr)

    start = time.perf_counter()
    result = {
        "machine": {"cpu_count": os.cpu_count(), "machine": platform.machine(), "platform": platform.platform(),
                    "python": platform.python_version(), "torch": torch.__version__,
                    "onnxruntime": onnxruntime.__version__,
                    "load_start": ", ".join(f"{v:.1f}" for v in os.getloadavg())},
        "command": shlex.join(["python", "benchmarks/entropy_rate.py", *sys.argv[1:]]),
        "settings": {k: getattr(args, k)
                     for k in ("preset", "held_out", "steps", "batch", "crop", "crops", "threads", "repeats")},
        "cases": [],
    }
    loads = []
    for family, rate in CASES:
        loads.append(os.getloadavg()[0])
        with tempfile.TemporaryDirectory(prefix="perco-entropy-rate-") as work:
            case = measure_case(family, rate, args, Path(work), log)
        case["totals"] = totals(case)
        result["cases"].append(case)
        log(f"{family} {rate}: " + ", ".join(f"{name} {case['totals'][name]['bits_per_token']:.4f}"
                                             for name in ("uniform", "unigram", "learned")) + " bits/token")
    result["train_images"] = result["cases"][0]["training"]["images"]
    result["held_out_images"] = [row["image"] for row in result["cases"][0]["images"]]
    result["machine"]["load_end"] = ", ".join(f"{v:.1f}" for v in os.getloadavg())
    result["machine"]["load_1min_at_each_case"] = loads
    result["wall_seconds"] = time.perf_counter() - start
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    write_markdown(result, out.with_suffix(".md"))
    print(f"wrote {out}.json, {out}.md")


if __name__ == "__main__":
    main()
