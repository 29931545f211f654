"""Full-size PerCo (SD) ONNX export on the CPU, and ONNX Runtime CPU vs torch CPU latency.

    python benchmarks/onnx_fullsize.py [--work DIR] [--rate 0.0313] [--repeats 3]

Writes a full-size random model (SD 2.1 dimensions; speed does not depend on weight values),
exports it with `perco export` in a child process (wall time, peak RSS), records file sizes,
then times one guided UNet step (batch 2, 64x64 latent = 512x512) and one VAE decode at
512x512 on torch (eager, float32) and ONNX Runtime (CPU EP), same process, same inputs.
Results: benchmarks/results/onnx_fullsize.{json,md}.
"""

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from perco.benchmarks.harness import measure, summarize

RESULTS = Path(__file__).parent / "results"


def timed(fn, repeats: int) -> dict:
    return summarize(measure(fn, repeats, warmup=1))  # warm-up outside the timed region


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work", default="/tmp/perco-fullsize", help="scratch folder (needs ~10 GB)")
    parser.add_argument("--rate", default="0.0313")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--tokenizer", default=str(Path(__file__).parent.parent / "tests/data/clip-tokenizer"))
    args = parser.parse_args()
    work = Path(args.work)
    model, artifacts = work / f"model-{args.rate}", work / f"artifacts-{args.rate}"
    perco = [sys.executable, "-m", "perco.engine.cli"]
    result = {"machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(),
                          "python": platform.python_version()}, "rate": args.rate}

    if not model.is_dir():
        start = time.perf_counter()
        subprocess.run(perco + ["init-tiny", str(model), "--full-size", "--rate", args.rate,
                                "--tokenizer", args.tokenizer], check=True)
        result["init_seconds"] = time.perf_counter() - start

    start = time.perf_counter()
    subprocess.run(perco + ["export", "--model", str(model), "-o", str(artifacts)], check=True)
    peak_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    result["export"] = {"wall_seconds": time.perf_counter() - start,
                        "peak_rss_gib": peak_kb / 2**20,
                        "peak_rss_note": "largest max RSS of this script's child processes (the export dominates)"}
    manifest = json.loads((artifacts / "manifest.json").read_text())
    result["graphs"] = {name: {"bytes": g["bytes"], "external_data": bool(g["external_data"]),
                               "nodes": g["nodes"], "export_seconds": g["export_seconds"]}
                        for name, g in manifest["graphs"].items()}

    import onnxruntime as ort
    import torch

    from perco.engine.model import ModelInfo
    from perco.export.graphs import graph_modules
    from perco.export.models.perco_sd import load_model

    info = ModelInfo(model)
    graphs = graph_modules(load_model(info), info.scaling_factor)
    rng = np.random.default_rng(0)
    d = int(info.configs["text_encoder"]["hidden_size"])
    m = int(info.configs["hyper_enc"]["M"])
    inputs = {
        "denoiser": {"sample": rng.standard_normal((2, 4, 64, 64), dtype=np.float32),
                     "timestep": np.full(2, 501, np.float32),
                     "text_embeddings": rng.standard_normal((2, 77, d), dtype=np.float32),
                     "local_features": rng.standard_normal((2, m, 64, 64), dtype=np.float32)},
        "vae_decoder": {"latent": rng.standard_normal((1, 4, 64, 64), dtype=np.float32)},
    }
    result["threads"] = {"torch": torch.get_num_threads()}
    result["latency"] = {}
    for name, feed in inputs.items():
        session = ort.InferenceSession(str(artifacts / manifest["graphs"][name]["file"]),
                                       providers=["CPUExecutionProvider"])
        tensors = [torch.from_numpy(v) for v in feed.values()]
        with torch.inference_mode():
            reference = graphs[name](*tensors).numpy()
            torch_t = timed(lambda: graphs[name](*tensors), args.repeats)
        ort_out = session.run(None, feed)[0]
        ort_t = timed(lambda: session.run(None, feed), args.repeats)
        err = float(np.abs(ort_out - reference).max() / np.abs(reference).max())
        result["latency"][name] = {"shape": {k: list(v.shape) for k, v in feed.items()}, "precision": "fp32",
                                   "torch_cpu": torch_t, "onnxruntime_cpu": ort_t, "max_rel_error": err}
        print(name, json.dumps(result["latency"][name]), flush=True)

    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "onnx_fullsize.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [f"# Full-size PerCo (SD) {args.rate}: ONNX export and CPU latency",
             "", f"Machine: {result['machine']['cpu_count']} CPU cores, {result['machine']['platform']}; "
             f"`python benchmarks/onnx_fullsize.py`", "",
             f"Export: {result['export']['wall_seconds']:.0f} s wall, peak RSS {result['export']['peak_rss_gib']:.1f} GiB",
             "", "| graph | size (MB) | external data | nodes (export -> folded) | export (s) |", "|---|---:|---|---|---:|"]
    for name, g in result["graphs"].items():
        lines.append(f"| {name} | {g['bytes'] / 1e6:.1f} | {g['external_data']} | "
                     f"{g['nodes']['export']} -> {g['nodes']['fold_constants']} | {g['export_seconds']:.1f} |")
    lines += ["", "| network, fp32, batch | torch CPU median (min-max) | ONNX Runtime CPU median (min-max) | rel. error |",
              "|---|---|---|---:|"]
    for name, r in result["latency"].items():
        label = "guided UNet step, 2x4x64x64" if name == "denoiser" else "VAE decode, 1x4x64x64 -> 512x512"
        t, o = r["torch_cpu"], r["onnxruntime_cpu"]
        lines.append(f"| {label} | {t['median_s']:.2f} s ({t['min_s']:.2f}-{t['max_s']:.2f}) | "
                     f"{o['median_s']:.2f} s ({o['min_s']:.2f}-{o['max_s']:.2f}) | {r['max_rel_error']:.1e} |")
    (RESULTS / "onnx_fullsize.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
