"""`perco bench`: per-stage latency, end-to-end decode and throughput, backends side by side.

Every backend runs in this process on the same bitstreams. Each figure is the median of the
repeats after warm-up runs (outside the timed region), with min and max. Host timers
(perf_counter) time the CPU backends; device timing (CUDA events) belongs to the GPU backends
when they exist. FLOPs are counted once on the torch modules (matmul, convolution, attention)
and turned into achieved TFLOP/s, next to a GEMM peak measured in the same run.

    perco bench --smoke                      # tiny model, CPU, seconds (CI runs this)
    perco bench --model DIR --backends torch,onnxruntime --sizes 512x512,768x512 --steps 1,5,20
"""

import json
import platform
import resource
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional

import numpy as np

from perco.engine.codec import Codec

STAGES = ("entropy_decode", "text_encode", "local_features", "denoise", "vae_decode")


@dataclass
class BenchConfig:
    model: str
    backends: List[str] = field(default_factory=lambda: ["torch", "onnxruntime"])
    sizes: List[tuple] = field(default_factory=lambda: [(512, 512), (768, 512)])  # (width, height)
    steps: List[int] = field(default_factory=lambda: [1, 5, 20])
    batches: List[int] = field(default_factory=lambda: [1, 2, 4, 8, 16, 32])
    throughput_steps: List[int] = field(default_factory=lambda: [5, 20])
    repeats: int = 3
    warmup: int = 1
    out: str = "benchmarks/results/bench"
    artifacts: Optional[str] = None  # exported graphs for onnxruntime (else exported into the cache)
    engines: Optional[str] = None  # `perco build` folder for tensorrt


def size_type(minimum: int = 1):
    """An argparse `type` for an image size "WxH" -> (W, H), each side at least `minimum`."""
    import argparse

    def parse(text: str) -> tuple:
        try:
            w, h = (int(v) for v in text.lower().split("x"))
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected WxH, got {text!r}") from None
        if w < minimum or h < minimum:
            raise argparse.ArgumentTypeError(f"expected at least {minimum}x{minimum}, got {text!r}")
        return w, h

    return parse


def summarize(times: list) -> dict:
    return {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times), "n": len(times)}


def measure(fn, repeats: int, warmup: int) -> list:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def gemm_peak_tflops(n: int = 1024, repeats: int = 5) -> float:
    """Measured float32 GEMM peak of this CPU through numpy (the reference for efficiency)."""
    a = np.random.default_rng(0).standard_normal((n, n), dtype=np.float32)
    best = min(measure(lambda: a @ a, repeats, 1))
    return 2 * n**3 / best / 1e12


def count_flops(codec: Codec, width: int, height: int) -> dict:
    """FLOPs per call of each graph at this size (torch FlopCounterMode on the torch modules)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from perco.export.graphs import model_constants, sample_inputs, symbol_sizes

    spec = codec.model
    graphs, contract = codec.backend.graphs, codec.backend.contract
    pad = spec.pad_multiple
    H, W = -(-height // pad) * pad, -(-width // pad) * pad
    sizes = symbol_sizes(_profile(H, W), spec.rate.token_stride, model_constants(codec.backend.info),
                         spec.family_def.latent_factor)
    flops = {}
    for name in ("text_encoder", "local_features", "denoiser", "vae_decoder", "vae_encoder", "hyper_encoder"):
        args = sample_inputs(name, sizes, spec.tokens.vocab_size, spec.rate.codebook_size, contract=contract)
        counter = FlopCounterMode(display=False)
        with counter, torch.no_grad():
            graphs[name](*args)
        flops[name] = int(counter.get_total_flops())
    return flops  # denoiser at batch 2 (one guided step), the others at batch 1


def _profile(height: int, width: int):
    from perco.export.graphs import Profile

    return Profile(batch=(1, 1, 1), height=(height,) * 3, width=(width,) * 3)


def _image(width: int, height: int) -> np.ndarray:
    from perco.engine.demo import sample_image

    return sample_image(width, height)


def run(config: BenchConfig, log=print) -> dict:
    folders = {"onnxruntime": config.artifacts, "tensorrt": config.engines}
    codecs = {name: Codec.from_pretrained(config.model, backend=name, artifacts=folders.get(name))
              for name in config.backends}
    reference = codecs[config.backends[0]]
    machine = {"platform": platform.platform(), "python": platform.python_version(),
               "processor": platform.processor() or platform.machine()}
    gpu_backends = [c.backend for c in codecs.values() if getattr(c.backend, "cuda", None) is not None]
    if gpu_backends:
        machine["gpu"] = gpu_backends[0].cuda.name
    result = {
        "machine": machine,
        "model": reference.model.describe(),
        "precision": "fp32" if not gpu_backends else
                     ", ".join(f"{n}: {c.backend.manifest['precision'] if n == 'tensorrt' else 'fp32'}"
                               for n, c in codecs.items()),
        "timer": "host perf_counter" + ("; GPU backends synchronize after every network call" if gpu_backends else
                                        " (CPU backends)"),
        "repeats": config.repeats,
        "warmup": config.warmup,
        "gemm_peak_tflops_fp32": gemm_peak_tflops(),
        "latency": [],
        "throughput": [],
    }
    flops = {}
    if "torch" in codecs:
        for width, height in config.sizes:
            flops[f"{width}x{height}"] = count_flops(codecs["torch"], width, height)
    result["flops"] = flops

    for width, height in config.sizes:
        data = reference.compress(_image(width, height), caption="a red barn on a green hill under a blue sky")
        for name, codec in codecs.items():
            encode = measure(lambda: codec.compress(_image(width, height), caption="a red barn"), config.repeats,
                             config.warmup)
            enc_stages = dict(codec.timings)
            for steps in config.steps:
                stage_times = {stage: [] for stage in STAGES}

                def decode():
                    codec.decompress(data, steps=steps)
                    for stage in STAGES:
                        stage_times[stage].append(codec.timings[stage])

                e2e = measure(decode, config.repeats, config.warmup)
                per_stage = {s: summarize(v[config.warmup:]) for s, v in stage_times.items()}
                step = {k: v / steps for k, v in per_stage["denoise"].items() if k != "n"}
                row = {"backend": name, "width": width, "height": height, "steps": steps, "batch": 1,
                       "decode_e2e": summarize(e2e), "stages": per_stage, "unet_step": step,
                       "encode_e2e": summarize(encode), "encode_stages_last": enc_stages}
                f = flops.get(f"{width}x{height}")
                if f:
                    row["unet_step_tflops"] = f["denoiser"] / step["median_s"] / 1e12
                    row["unet_step_fraction_of_gemm_peak"] = row["unet_step_tflops"] / result["gemm_peak_tflops_fp32"]
                result["latency"].append(row)
                log(f"{name:12s} {width}x{height} steps {steps:2d}: decode {row['decode_e2e']['median_s'] * 1e3:9.1f} ms, "
                    f"UNet step {step['median_s'] * 1e3:8.1f} ms")
    width, height = config.sizes[0]  # throughput at the first size
    for name, codec in codecs.items():
        for steps in config.throughput_steps:
            for batch in config.batches:
                datas = [reference.compress(_image(width, height), seed=i) for i in range(batch)]
                times = measure(lambda: codec.decompress_batch(datas, steps=steps), config.repeats, config.warmup)
                row = {"backend": name, "width": width, "height": height, "steps": steps, "batch": batch,
                       "seconds": summarize(times), "images_per_s": batch / statistics.median(times)}
                result["throughput"].append(row)
                log(f"{name:12s} {width}x{height} steps {steps:2d} batch {batch:2d}: {row['images_per_s']:.2f} images/s")
    result["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    for backend in gpu_backends:  # device memory in use with every engine loaded, and the shared activations
        free, total = backend.cuda.memory_info()
        result.setdefault("device_memory", {})[backend.name] = {
            "used_gib": (total - free) / 2**30, "total_gib": total / 2**30,
            "activation_gib": getattr(backend, "activation_bytes", 0) / 2**30}
    write(result, Path(config.out))
    return result


def write(result: dict, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [f"# perco bench: {result['model']}", "",
             f"{result['machine']['platform']} ({result['machine']['processor']}), {result['precision']}, "
             f"timer: {result['timer']}; median (min-max) of {result['repeats']} after {result['warmup']} warm-up; "
             f"fp32 GEMM peak measured {result['gemm_peak_tflops_fp32']:.3f} TFLOP/s; peak RSS "
             f"{result['peak_rss_gib']:.2f} GiB" + "".join(
                 f"; {name} device memory {m['used_gib']:.2f} of {m['total_gib']:.1f} GiB in use (activations "
                 f"{m['activation_gib']:.2f} GiB, shared)" for name, m in result.get("device_memory", {}).items()), "",
             "| backend | size | steps | decode e2e (ms) | UNet step (ms) | VAE decode (ms) | text (ms) | TFLOP/s (UNet) |",
             "|---|---|---:|---|---:|---:|---:|---:|"]
    for r in result["latency"]:
        e = r["decode_e2e"]
        tf = f"{r['unet_step_tflops']:.3f}" if "unet_step_tflops" in r else "-"
        lines.append(f"| {r['backend']} | {r['width']}x{r['height']} | {r['steps']} | {e['median_s'] * 1e3:.1f} "
                     f"({e['min_s'] * 1e3:.1f}-{e['max_s'] * 1e3:.1f}) | {r['unet_step']['median_s'] * 1e3:.1f} | "
                     f"{r['stages']['vae_decode']['median_s'] * 1e3:.1f} | {r['stages']['text_encode']['median_s'] * 1e3:.1f} | {tf} |")
    lines += ["", "| backend | size | steps | batch | images/s |", "|---|---|---:|---:|---:|"]
    lines += [f"| {r['backend']} | {r['width']}x{r['height']} | {r['steps']} | {r['batch']} | {r['images_per_s']:.2f} |"
              for r in result["throughput"]]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    _plot(result, out.with_suffix(".png"))


def _plot(result: dict, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return  # the JSON and markdown are the results; the plot is optional (pip install matplotlib)
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    for backend in sorted({r["backend"] for r in result["latency"]}):
        rows = [r for r in result["latency"] if r["backend"] == backend]
        size = f"{rows[0]['width']}x{rows[0]['height']}"
        rows = [r for r in rows if f"{r['width']}x{r['height']}" == size]
        a.plot([r["steps"] for r in rows], [r["decode_e2e"]["median_s"] * 1e3 for r in rows], "o-", label=f"{backend} {size}")
        for steps in sorted({r["steps"] for r in result["throughput"]}):
            t = [r for r in result["throughput"] if r["backend"] == backend and r["steps"] == steps]
            b.plot([r["batch"] for r in t], [r["images_per_s"] for r in t], "o-", label=f"{backend}, {steps} steps")
    a.set(xlabel="denoising steps", ylabel="decode latency (ms)", title="latency vs steps")
    b.set(xlabel="batch", ylabel="images / s", title="throughput vs batch", xscale="log")
    a.legend(fontsize=7)
    b.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def smoke_config(model: str, out: str) -> BenchConfig:
    """Tiny model, small images, 1-2 steps, batches 1-2: seconds on a CPU."""
    return BenchConfig(model=model, sizes=[(64, 64), (96, 64)], steps=[1, 2], batches=[1, 2], throughput_steps=[1],
                       repeats=2, warmup=1, out=out)
