"""Every GPU check in one command, for a fresh H100/H200 machine with no package registry (docs/gpu.md).

    python benchmarks/gpu_check.py --out gpu-results            # on the GPU machine, <= 8 minutes
    python benchmarks/gpu_check.py --out /tmp/dry --dry-run     # tiny models on the CPU (a CI test)

Steps, each recorded (a failed step is reported and the next one runs):
  1. device: name, capability, memory, versions; the measured GEMM peak (FP16/BF16 on the GPU);
  2. kernels: CMake build for the GPU, ctest (the GPU-vs-CPU byte-identity sweep), compute-sanitizer
     memcheck and racecheck on it, and the binding tests against the built library;
  3. kernel benchmark: benchmarks/entropy.py (batched rANS symbols/s, CPU beside GPU);
  4. pipelines: random-weight models written on the spot (full size; tiny in a dry run), the eager
     reference (FP32 and FP16) against `torch-fast` (FP16 + CUDA graph, and BF16) in one process:
     per-stage latency (median and spread), batched throughput, peak device memory, achieved TFLOP/s
     of the denoiser against the measured GEMM peak, PSNR of each decode against the FP32 reference.
Writes results.json, results.md and latency.png into --out (3 files).
"""

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent  # the source tree (--source where the package is installed)
# (family, rate, steps): PerCo (SD) at its highest and lowest preset rates, then PerCoV2 where time remains
PIPELINES = [("perco-sd", "0.0313", 5), ("perco-sd", "0.0019", 20), ("percov2", "0.0313", 20)]
# (backend label, PERCO_TORCH_DTYPE, PERCO_TORCH_GRAPHS and _CHANNELS_LAST): the reference as the research code
# runs it (eager, NCHW), then ours
VARIANTS = [("eager fp32 (reference)", "fp32", "0"), ("eager fp16 (reference)", "fp16", "0"),
            ("torch-fast fp16 + cuda graph", "fp16", "1"), ("torch-fast bf16 + cuda graph", "bf16", "1")]
DRY_VARIANTS = [("eager fp32 (reference)", "fp32", "0"), ("torch-fast bf16", "bf16", "0")]
TARGETS = {"denoiser_step_ms": 5.0, "vae_decode_ms": 8.0, "decode_5_steps_ms": 40.0, "decode_20_steps_ms": 120.0,
           "peak_memory_gib": 4.0, "images_per_s_5_steps_batched": 30.0}


def _run(cmd: list, timeout: float, env=None) -> dict:
    start = time.perf_counter()
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=env)
        return {"cmd": " ".join(map(str, cmd)), "rc": done.returncode, "seconds": round(time.perf_counter() - start, 1),
                "tail": (done.stdout + done.stderr)[-2000:]}
    except (OSError, subprocess.TimeoutExpired) as exc:
        return {"cmd": " ".join(map(str, cmd)), "rc": None, "error": f"{type(exc).__name__}: {exc}"}


def device_info(torch, cuda: bool) -> dict:
    from perco.benchmarks.harness import gemm_peak_tflops

    info = {"python": platform.python_version(), "torch": torch.__version__, "machine": platform.machine(),
            "cpu_count": os.cpu_count()}
    if not cuda:
        return dict(info, device="cpu", gemm_peak_tflops={"fp32_numpy": gemm_peak_tflops(512, 3)})
    props = torch.cuda.get_device_properties(0)
    peaks = {}
    for name, dtype in (("fp16", torch.float16), ("bf16", torch.bfloat16)):
        a = torch.randn(8192, 8192, device="cuda", dtype=dtype)
        for _ in range(3):
            a @ a
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(20):
            a @ a
        end.record()
        torch.cuda.synchronize()
        peaks[name] = 2 * 8192**3 * 20 / (start.elapsed_time(end) / 1e3) / 1e12
    return dict(info, device=props.name, capability=f"{props.major}.{props.minor}",
                memory_gib=round(props.total_memory / 2**30, 1), cuda=torch.version.cuda, gemm_peak_tflops=peaks)


def kernels(out: Path, deadline: float) -> dict:
    build = out.parent / f".{out.name}-kernels"
    steps = {"configure": _run(["cmake", "-S", ".", "-B", str(build), "-DCMAKE_BUILD_TYPE=Release",
                                "-DCMAKE_CUDA_ARCHITECTURES=90"], 120)}
    steps["build"] = _run(["cmake", "--build", str(build), "-j8"], max(30, deadline - time.time()))
    steps["ctest"] = _run(["ctest", "--test-dir", str(build), "--output-on-failure"], 120)
    test = build / "test_rans"
    for tool in ("memcheck", "racecheck"):
        steps[f"compute-sanitizer {tool}"] = _run(["compute-sanitizer", "--tool", tool, "--error-exitcode", "1",
                                                   str(test)], 180)
    env = dict(os.environ, PERCO_KERNELS_LIB=str(build / "libperco_kernels.so"))
    steps["binding tests"] = _run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                                   "tests/test_batch_coder.py"], 180, env=env)
    steps["kernel benchmark"] = _run([sys.executable, "benchmarks/entropy.py", "--out", str(out / "entropy")], 180,
                                     env=env)
    return steps


def _stage_ms(codec, fn, repeats: int) -> dict:
    """Per-stage milliseconds of `fn` (codec stage timings; every stage ends in a device -> host copy)."""
    fn()  # warm-up: allocator, kernel plans, CUDA graph capture
    runs = []
    for _ in range(repeats):
        fn()
        runs.append(dict(codec.timings, total=sum(codec.timings.values())))
    return {stage: {"median_ms": 1e3 * statistics.median(r[stage] for r in runs),
                    "min_ms": 1e3 * min(r[stage] for r in runs), "max_ms": 1e3 * max(r[stage] for r in runs)}
            for stage in runs[0]}


def _denoiser_ms(torch, codec, width: int, height: int, repeats: int) -> dict:
    """One guided denoiser step (batch 2) on the backend, timed with CUDA events (perf_counter on the CPU)."""
    spec, backend = codec.model, codec.backend
    f = spec.family_def.latent_factor
    pad = spec.pad_multiple
    h, w = -(-height // pad) * pad // f, -(-width // pad) * pad // f
    rng = np.random.default_rng(0)
    text = codec._encode_text([[], []])
    local = codec._run("local_features", indices=np.zeros((1, *spec.stream_spec.token_grid(width, height)),
                                                           dtype=np.int64))["local_features"]
    feed = {"sample": rng.standard_normal((2, spec.family_def.latent_channels, h, w)).astype(np.float32),
            "timestep": np.full(2, 500, np.float32), "local_features": np.repeat(local, 2, axis=0), **text}
    for _ in range(2):
        backend.run("denoiser", feed)
    times = []
    for _ in range(repeats):
        if backend.device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            backend.run("denoiser", feed)
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t = time.perf_counter()
            backend.run("denoiser", feed)
            times.append(1e3 * (time.perf_counter() - t))
    return {"median_ms": statistics.median(times), "min_ms": min(times), "max_ms": max(times)}


def pipelines(torch, cuda: bool, dry: bool, deadline: float, log) -> list:
    from perco.benchmarks.harness import count_flops
    from perco.engine import Codec
    from perco.engine.demo import sample_image
    from perco.export.tiny import init_tiny

    size = (64, 64) if dry else (512, 512)
    results = []
    variants = VARIANTS if cuda else DRY_VARIANTS
    with tempfile.TemporaryDirectory(prefix="perco-gpu-check-") as tmp:
        for family, rate, steps in [(f, r, 2) for f, r, _ in PIPELINES[:1]] if dry else PIPELINES:
            if time.time() > deadline:
                results.append({"family": family, "rate": rate, "skipped": "out of the time budget"})
                continue
            folder = Path(tmp) / f"{family}-{rate}"
            start = time.perf_counter()
            init_tiny(folder, rate=rate, full_size=not dry, family=family)
            entry = {"family": family, "rate": rate, "steps": steps, "size": list(size), "full_size": not dry,
                     "write_seconds": round(time.perf_counter() - start, 1), "variants": {}}
            image = sample_image(*size)
            flops = count_flops(Codec.from_pretrained(folder, backend="torch"), *size)["denoiser"]
            entry["denoiser_gflop_per_step"] = flops / 1e9
            decoded = {}
            data = None
            for label, dtype, graphs in variants:
                ours = label.startswith("torch-fast")
                os.environ.update(PERCO_TORCH_DTYPE=dtype, PERCO_TORCH_GRAPHS=graphs,
                                  PERCO_TORCH_DEVICE="cuda" if cuda else "cpu",
                                  PERCO_TORCH_CHANNELS_LAST="1" if ours and cuda else "0")
                if cuda:
                    torch.cuda.reset_peak_memory_stats()
                codec = Codec.from_pretrained(folder, backend="torch-fast")
                data = data or codec.compress(image, caption="a photo")
                stages = _stage_ms(codec, lambda c=codec, k=label: decoded.__setitem__(k, c.decompress(data, steps=steps)),
                                   repeats=2 if dry else 5)
                step = _denoiser_ms(torch, codec, *size, repeats=3 if dry else 20)
                batch = 2 if dry else 8
                t = time.perf_counter()
                codec.decompress_batch([data] * batch, steps=steps)
                per_s = batch / (time.perf_counter() - t)
                v = {"stages": stages, "denoiser_step": step, "images_per_s_batched": per_s, "batch": batch,
                     "tflops": flops / (step["median_ms"] / 1e3) / 1e12}
                if cuda:
                    v["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
                v["psnr_vs_fp32_reference"] = _psnr(decoded[variants[0][0]], decoded[label])
                entry["variants"][label] = v
                log(f"{family} {rate} {label}: decode {stages['total']['median_ms']:.1f} ms, step "
                    f"{step['median_ms']:.2f} ms, {per_s:.1f} img/s")
                codec.backend.close()
                del codec
            results.append(entry)
            shutil.rmtree(folder, ignore_errors=True)
    return results


def _psnr(a, b) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(255**2 / mse)


def markdown(result: dict) -> str:
    d = result["device"]
    lines = [f"# GPU check: {d['device']}" + (" (dry run: tiny models on the CPU)" if result["dry_run"] else ""),
             "", f"`{result['command']}`, {result['seconds']:.0f} s. torch {d['torch']}, GEMM peak "
             f"{', '.join(f'{k} {v:.3g} TFLOP/s' for k, v in d['gemm_peak_tflops'].items())}.", ""]
    if result.get("kernels_skipped"):
        lines += [f"Kernels: {result['kernels_skipped']}.", ""]
    if result.get("kernels"):
        lines += ["## Kernels", "", "| step | rc | seconds |", "|---|---:|---:|"]
        lines += [f"| {name} | {s.get('rc')} | {s.get('seconds', '-')} |" for name, s in result["kernels"].items()]
        lines.append("")
    peak = max(d["gemm_peak_tflops"].values())
    for p in result["pipelines"]:
        if "skipped" in p:
            lines += [f"## {p['family']} {p['rate']}: skipped ({p['skipped']})", ""]
            continue
        lines += [f"## {p['family']} {p['rate']}, {p['steps']} steps, {p['size'][0]}x{p['size'][1]}, batch 1",
                  "", f"Denoiser: {p['denoiser_gflop_per_step']:.1f} GFLOP per guided step.", "",
                  "| backend | decode ms (min-max) | step ms | VAE decode ms | img/s batched | TFLOP/s (of peak) "
                  "| peak GiB | PSNR vs FP32 ref |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
        for label, v in p["variants"].items():
            total, vae = v["stages"]["total"], v["stages"].get("vae_decode", {"median_ms": float("nan")})
            lines.append(f"| {label} | {total['median_ms']:.1f} ({total['min_ms']:.1f}-{total['max_ms']:.1f}) | "
                         f"{v['denoiser_step']['median_ms']:.2f} | {vae['median_ms']:.1f} | "
                         f"{v['images_per_s_batched']:.1f} | {v['tflops']:.3g} ({100 * v['tflops'] / peak:.0f} %) | "
                         f"{v.get('peak_memory_gib', float('nan')):.2f} | {v['psnr_vs_fp32_reference']:.1f} |")
        lines.append("")
    lines += ["Targets (H100/H200, 512x512, batch 1): " + ", ".join(f"{k} {v:g}" for k, v in TARGETS.items()), ""]
    return "\n".join(lines)


def plot(result: dict, path: Path) -> None:
    """Decode latency per pipeline and backend as horizontal bars (Pillow: the GPU image has no matplotlib)."""
    from PIL import Image, ImageDraw

    rows = [(f"{p['family']} {p['rate']}  {label}", v["stages"]["total"]["median_ms"])
            for p in result["pipelines"] if "variants" in p for label, v in p["variants"].items()]
    width, left, row = 900, 330, 26
    image = Image.new("RGB", (width, 40 + row * max(1, len(rows))), "white")
    draw = ImageDraw.Draw(image)
    draw.text((10, 10), "decode latency, ms (median)", fill="black")
    top = max([ms for _, ms in rows] or [1.0])
    for i, (label, ms) in enumerate(rows):
        y = 34 + i * row
        draw.text((10, y + 5), label, fill="black")
        draw.rectangle([left, y, left + int((width - left - 90) * ms / top), y + row - 6], fill=(70, 110, 180))
        draw.text((left + int((width - left - 90) * ms / top) + 6, y + 5), f"{ms:.1f}", fill="black")
    image.save(path)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="folder for results.json, results.md, latency.png")
    parser.add_argument("--dry-run", action="store_true", help="tiny models on the CPU, no kernels (CI)")
    parser.add_argument("--budget-s", type=float, default=450, help="stop starting new pipelines after this")
    parser.add_argument("--source", default=None, help="the source tree (kernels, tests) when the package is "
                                                        "installed from a wheel (default: this file's tree)")
    args = parser.parse_args(argv)
    global ROOT
    if args.source:
        ROOT = Path(args.source).resolve()
    import torch

    begin = time.time()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cuda = torch.cuda.is_available() and not args.dry_run
    if not cuda and not args.dry_run:
        print("error: no CUDA GPU here; use --dry-run for the CPU check", file=sys.stderr)
        return 2
    result = {"command": " ".join(["python", "benchmarks/gpu_check.py", *sys.argv[1:]] if argv is None else argv),
              "dry_run": args.dry_run, "device": device_info(torch, cuda)}
    if cuda:
        result["kernels"] = kernels(out, begin + args.budget_s / 2)
    else:
        result["kernels_skipped"] = "dry run: no GPU (CI runs the kernels on the CPU through the host shim)"
    result["pipelines"] = pipelines(torch, cuda, args.dry_run, begin + args.budget_s,
                                    log=lambda text: print(text, file=sys.stderr))
    result["seconds"] = time.time() - begin
    (out / "results.json").write_text(json.dumps(result, indent=1) + "\n")
    (out / "results.md").write_text(markdown(result))
    plot(result, out / "latency.png")
    print(f"wrote {out / 'results.json'}, results.md, latency.png ({result['seconds']:.0f} s)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
