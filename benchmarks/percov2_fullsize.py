"""Full-size PerCoV2 on the CPU machine: ONNX export, one guided MMDiT step on torch and ONNX Runtime
CPU, and TensorRT-RTX engine builds, with time, peak memory and file sizes.

    python benchmarks/percov2_fullsize.py [--work /tmp/percov2-full] [--repeats 3] [--rss-limit-gib 19]
    python benchmarks/percov2_fullsize.py --layers 1 --out /tmp/percov2-full/smoke   # a quick dry run

No model folder is written: the SD3-medium-size PercoV2Transformer (24 MMDiT blocks, width 1536,
M = 320 local-feature channels at the patch embedding) and the 16-channel SD3 VAE are built in
memory from `torch.manual_seed` (random weights; speed and memory do not depend on their values).
Every heavy step runs in its own child process (`--job`), so each peak RSS is that job's own
(`ru_maxrss`); the parent polls the child's RSS and the machine's MemAvailable and kills the child
before it could make the machine swap or OOM-kill anything else.

Precision. The VAE graphs are exported in FP32 with the exporter's own `_export_graph`. The FP32
transformer is not exported: its weights alone are 8 GB, and that export path keeps about 4.4x the
weights resident (PerCo (SD)'s 3.5 GB UNet peaked at 15.3 GiB), ~35 GiB here. The denoiser is
exported in FP16 instead. Torch on this CPU runs FP16 GEMMs at ~1 GFLOP/s (no AVX512-FP16/AMX;
measured below), which would make the tracing forward pass take hours, so the module is built and
traced in BF16 (AVX512-BF16 GEMMs, fast) behind float32 inputs/outputs, and the traced graph is
retyped BF16 -> FP16 (weights converted exactly, Cast targets and declared types), then cleaned
and folded with the exporter's `_optimize`, as `_export_graph` does. The FP32 torch reference of
the latency job uses the very same weights (the BF16 init rounded to FP16, upcast to FP32).
Results: benchmarks/results/percov2_fullsize.{json,md}.
"""

import argparse
import gc
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
RATE = "0.0313"
SEED = 0
OPSET = 18
KEY = "fullsize0000"  # file-name key for the exporter's helpers (no manifest is written)
GIB = 2**30
JOBS = ("export:vae_decoder", "export:vae_encoder", "export:denoiser", "latency", "trt:denoiser", "trt:vae_decoder")
# (need GiB estimate before starting, time limit s) per job; the estimates are checked against MemAvailable
BUDGET = {"export:vae_decoder": (3, 600), "export:vae_encoder": (3, 600), "export:denoiser": (14, 1500),
          "latency": (10, 1800), "trt:denoiser": (14, 1200), "trt:vae_decoder": (3, 600)}


# --- memory ---------------------------------------------------------------------------------------


def _status_kib(pid, field: str) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def mem_available_gib() -> float:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 2**20
    return 0.0


def rss_gib() -> float:
    return _status_kib("self", "VmRSS") / 2**20


def peak_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


class Phases:
    """Wall time, current and peak RSS at the end of each phase of a child job."""

    def __init__(self):
        self.start = self.last = time.perf_counter()
        self.rows = []

    def mark(self, name: str) -> None:
        now = time.perf_counter()
        self.rows.append({"phase": name, "seconds": round(now - self.last, 2), "rss_gib": round(rss_gib(), 2),
                          "peak_rss_gib": round(peak_gib(), 2)})
        print(f"  {name}: {now - self.last:.1f} s, RSS {rss_gib():.2f} GiB, peak {peak_gib():.2f} GiB", flush=True)
        self.last = now

    @property
    def total(self) -> float:
        return time.perf_counter() - self.start


# --- the networks -------------------------------------------------------------------------------


def model_configs(layers: int) -> dict:
    from perco.export.models.percov2 import PRESETS, SD3_TRANSFORMER, SD3_VAE

    return {"transformer": dict(SD3_TRANSFORMER, num_layers=layers), "vae": dict(SD3_VAE),
            "hyper_enc": PRESETS[RATE].hyper_enc}


def export_sizes(configs: dict, profile=None) -> dict:
    from perco.engine.families.percov2 import PERCOV2, RATES
    from perco.export.graphs import Profile, symbol_sizes
    from perco.export.models.percov2 import graph_constants

    stride = 512 // RATES[RATE][0]
    return symbol_sizes(profile or Profile(), stride, graph_constants(configs), PERCOV2.latent_factor)


def build_transformer(configs: dict):
    """The PercoV2Transformer, seeded, built directly in BF16 (never 8 GB of FP32)."""
    import torch

    from perco.export.models.percov2 import build_modules

    torch.manual_seed(SEED)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        module = build_modules(configs, ("transformer",))["transformer"]
    finally:
        torch.set_default_dtype(previous)
    return module.to(torch.bfloat16).eval().requires_grad_(False)  # fp32 buffers (pos_embed) too


def build_vae(configs: dict):
    import torch

    from perco.export.models.percov2 import build_modules

    torch.manual_seed(SEED)
    return build_modules(configs, ("vae",))["vae"].eval().requires_grad_(False)


def count(module) -> int:
    return sum(p.numel() for p in module.parameters())


# --- child jobs -------------------------------------------------------------------------------------


def job_export_vae(args, graph: str) -> dict:
    from perco.engine.families.percov2 import GRAPHS
    from perco.export.graphs import sample_inputs
    from perco.export.models.percov2 import SD3_VAE, VaeDecoder, VaeEncoder
    from perco.export.onnx import _export_graph

    phases = Phases()
    configs = model_configs(args.layers)
    vae = build_vae(configs)
    part = vae.decoder if graph == "vae_decoder" else vae.encoder
    params = {"vae": count(vae), graph: count(part)}
    cls = VaeDecoder if graph == "vae_decoder" else VaeEncoder
    module = cls(vae, SD3_VAE["scaling_factor"], SD3_VAE["shift_factor"]).eval()
    phases.mark("build (fp32)")
    sizes = export_sizes(configs)
    inputs = sample_inputs(graph, sizes, 49408, 256, contract=GRAPHS)
    out = Path(args.work) / "onnx"
    out.mkdir(parents=True, exist_ok=True)
    entry = _export_graph(module, graph, inputs, out, KEY, OPSET, sizes, lambda t: print(t, flush=True), GRAPHS)
    phases.mark("_export_graph (trace, optimize, save, shape inference, checker)")
    return {"graph": graph, "precision": "fp32", "params": params, "path": str(out / entry["file"]),
            "bytes": entry["bytes"], "external_data": bool(entry["external_data"]), "nodes": entry["nodes"],
            "trace_shapes": {k: list(v.shape) for k, v in zip([n for n, _, _ in GRAPHS[graph].inputs], inputs)},
            "dynamic_axes": entry["dynamic_axes"], "wall_seconds": phases.total, "peak_rss_gib": peak_gib(),
            "phases": phases.rows}


class _Bf16Io:
    """Float32 inputs cast to BF16 (timestep stays float32: SD3 embeds it in FP32), output back to FP32."""

    def __new__(cls, denoiser):
        import torch
        from torch import nn

        class Wrapper(nn.Module):
            def __init__(self, inner):
                super().__init__()
                self.inner = inner

            def forward(self, sample, timestep, text_embeddings, pooled_projections, local_features):
                b = torch.bfloat16
                return self.inner(sample.to(b), timestep, text_embeddings.to(b), pooled_projections.to(b),
                                  local_features.to(b)).float()

        return Wrapper(denoiser).eval()


def bf16_to_fp16(graph, counts=None) -> dict:
    """Retype a BF16 ONNX graph to FP16 in place: weights and Constant values (exactly: every BF16
    value of the random init is within FP16 range), Cast/dtype targets, declared value types."""
    import numpy as np
    from onnx import AttributeProto, TensorProto

    counts = counts if counts is not None else {"initializers": 0, "constants": 0, "casts": 0, "value_types": 0,
                                                "non_finite_after": 0}
    bf16, fp16 = TensorProto.BFLOAT16, TensorProto.FLOAT16

    def convert(t):
        bits = np.frombuffer(t.raw_data, np.uint16) if t.raw_data else np.asarray(t.int32_data).astype(np.uint16)
        values = (bits.astype(np.uint32) << 16).view(np.float32).astype(np.float16)
        counts["non_finite_after"] += int((~np.isfinite(values)).sum())
        t.ClearField("int32_data")
        t.data_type = fp16
        t.raw_data = values.tobytes()

    for t in graph.initializer:
        if t.data_type == bf16:
            convert(t)
            counts["initializers"] += 1
    for node in graph.node:
        for a in node.attribute:
            if a.type == AttributeProto.TENSOR and a.t.data_type == bf16:
                convert(a.t)
                counts["constants"] += 1
            elif a.type == AttributeProto.INT and a.name in ("to", "dtype") and a.i == bf16:
                a.i = fp16
                counts["casts"] += 1
            elif a.type == AttributeProto.GRAPH:
                bf16_to_fp16(a.g, counts)
            elif a.type == AttributeProto.GRAPHS:
                for g in a.graphs:
                    bf16_to_fp16(g, counts)
    for info in (*graph.value_info, *graph.input, *graph.output):
        if info.type.tensor_type.elem_type == bf16:
            info.type.tensor_type.elem_type = fp16
            counts["value_types"] += 1
    return counts


def job_export_denoiser(args) -> dict:
    import warnings

    import onnx
    import torch

    from perco.engine.families.percov2 import GRAPHS
    from perco.export.graphs import dynamic_axes, io_shapes, sample_inputs
    from perco.export.models.percov2 import Denoiser
    from perco.export.onnx import _EXTERNAL_DATA_BYTES, _optimize, _proto_bytes

    phases = Phases()
    configs = model_configs(args.layers)
    transformer = build_transformer(configs)
    params = count(transformer)
    phases.mark("build (bf16, seeded random init)")
    contract = GRAPHS["denoiser"]
    names_in, names_out = [n for n, _, _ in contract.inputs], [n for n, _, _ in contract.outputs]
    sizes = export_sizes(configs)
    inputs = sample_inputs("denoiser", sizes, 49408, 256, contract=GRAPHS)  # opt shapes: 2B=2, 64x64 latent
    out = Path(args.work) / "onnx"
    tmp = out / ".denoiser-tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "raw").mkdir(parents=True)
    (tmp / "half").mkdir()
    raw = tmp / "raw" / "raw.onnx"
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(_Bf16Io(Denoiser(transformer)), inputs, str(raw), input_names=names_in,
                          output_names=names_out, dynamic_axes=dynamic_axes("denoiser", GRAPHS), opset_version=OPSET,
                          do_constant_folding=True, dynamo=False)
    phases.mark("torch.onnx.export (TorchScript trace in bf16, constant folding, external data)")
    del transformer
    gc.collect()
    raw_bytes = sum(f.stat().st_size for f in raw.parent.iterdir())
    model = onnx.load(str(raw))
    retyped = bf16_to_fp16(model.graph)
    half = tmp / "half" / "half.onnx"
    onnx.save_model(model, str(half), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="half.onnx.data", size_threshold=1024)
    del model
    gc.collect()
    shutil.rmtree(raw.parent)
    phases.mark("bf16 -> fp16 retype (load, convert, save)")
    passes = _optimize(half)
    model = passes.pop("model")
    shutil.rmtree(half.parent)
    phases.mark("_optimize (onnx-graphsurgeon cleanup + fold_constants)")
    filename = f"denoiser-fp16-{KEY}.onnx"
    final = out / filename
    external = _proto_bytes(model) > _EXTERNAL_DATA_BYTES
    if external:
        onnx.save_model(model, str(final), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=filename + ".data", size_threshold=1024)
    else:
        onnx.save_model(model, str(final))
    del model
    gc.collect()
    onnx.shape_inference.infer_shapes_path(str(final), str(final))
    onnx.checker.check_model(str(final))
    passes["shape_inference"] = len(onnx.load(str(final), load_external_data=False).graph.node)
    phases.mark("save (external data), shape inference, onnx.checker")
    shutil.rmtree(tmp, ignore_errors=True)
    files = [final] + ([out / (filename + ".data")] if external else [])
    return {"graph": "denoiser", "precision": "fp16", "params": {"transformer": params}, "path": str(final),
            "bytes": sum(f.stat().st_size for f in files), "raw_bf16_export_bytes": raw_bytes,
            "external_data": external, "nodes": passes, "retype": retyped,
            "trace_shapes": {k: list(v.shape) for k, v in zip(names_in, inputs)},
            "dynamic_axes": {k: {str(i): v for i, v in a.items()} for k, a in dynamic_axes("denoiser", GRAPHS).items()},
            "io_shapes": io_shapes("denoiser", sizes, GRAPHS), "wall_seconds": phases.total,
            "peak_rss_gib": peak_gib(), "phases": phases.rows}


def _denoiser_feed(configs: dict) -> dict:
    import numpy as np

    from perco.export.models.percov2 import graph_constants

    c = graph_constants(configs)
    rng = np.random.default_rng(1)
    return {"sample": rng.standard_normal((2, 16, 64, 64), dtype=np.float32),
            "timestep": np.full(2, 500.0, np.float32),
            "text_embeddings": rng.standard_normal((2, c["S"], c["J"]), dtype=np.float32),
            "pooled_projections": rng.standard_normal((2, c["P"]), dtype=np.float32),
            "local_features": rng.standard_normal((2, c["M"], 64, 64), dtype=np.float32)}


def _timed(fn, repeats: int) -> dict:
    from perco.benchmarks.harness import measure, summarize

    return summarize(measure(fn, repeats, warmup=0))  # the caller's first (output) call is the warm-up


def job_latency(args, onnx_path: str) -> dict:
    """One guided MMDiT step (batch 2 = uncond + cond) at 512x512: torch CPU FP32, then ONNX Runtime
    CPU on the exported FP16 graph, same process, same inputs, same weights."""
    import numpy as np
    import onnxruntime as ort
    import torch

    from perco.export.models.percov2 import Denoiser

    phases = Phases()
    configs = model_configs(args.layers)
    feed = _denoiser_feed(configs)
    transformer = build_transformer(configs)
    with torch.no_grad():  # the export's weights exactly: BF16 init -> FP16 -> FP32, one tensor at a time
        for p in transformer.parameters():
            p.data = p.data.to(torch.float16).to(torch.float32)
        for mod in transformer.modules():
            for name, b in list(mod._buffers.items()):
                if b is not None and b.is_floating_point():
                    mod._buffers[name] = b.to(torch.float16).to(torch.float32)
    denoiser = Denoiser(transformer).eval()
    phases.mark("build torch fp32 module (export weights upcast)")
    tensors = [torch.from_numpy(v) for v in feed.values()]
    result = {"shapes": {k: list(v.shape) for k, v in feed.items()}, "timestep": 500.0,
              "threads": {"torch": torch.get_num_threads()}}
    with torch.inference_mode():
        start = time.perf_counter()
        reference = denoiser(*tensors).numpy().copy()
        result["torch_first_call_s"] = time.perf_counter() - start
        result["torch_cpu"] = _timed(lambda: denoiser(*tensors), args.repeats)
    result["torch_cpu"]["precision"] = "fp32"
    result["torch_peak_rss_gib"] = peak_gib()
    phases.mark(f"torch cpu fp32: warm-up + {args.repeats} repeats")
    denoiser = transformer = tensors = None  # free the torch module before the ONNX Runtime session
    gc.collect()
    phases.mark("free torch module")
    start = time.perf_counter()
    try:
        session = ort.InferenceSession(onnx_path, providers=["CPUExecutionProvider"])
        result["ort_session_s"] = time.perf_counter() - start
        phases.mark("onnxruntime session (fp16 graph)")
        start = time.perf_counter()
        actual = session.run(None, feed)[0]
        result["ort_first_call_s"] = time.perf_counter() - start
        result["onnxruntime_cpu"] = _timed(lambda: session.run(None, feed), args.repeats)
        result["onnxruntime_cpu"]["precision"] = "fp16 graph (float32 inputs/outputs)"
        result["ort_rss_gib_after"] = rss_gib()
        phases.mark(f"onnxruntime cpu: warm-up + {args.repeats} repeats")
        r, a = reference.astype(np.float64), actual.astype(np.float64)
        result["reference_finite"] = bool(np.isfinite(r).all())
        result["onnxruntime_finite"] = bool(np.isfinite(a).all())
        result["max_rel_diff"] = float(np.abs(a - r).max() / max(float(np.abs(r).max()), 1e-12))
        result["rms_rel_diff"] = float(np.sqrt(((a - r) ** 2).mean() / max(float((r**2).mean()), 1e-24)))
        result["reference_abs_max"] = float(np.abs(r).max())
    except Exception as exc:  # noqa: BLE001 - recorded verbatim
        result["onnxruntime_cpu"] = {"error": f"{type(exc).__name__}: {exc}"}
    result["ort_version"] = ort.__version__
    result["providers"] = ["CPUExecutionProvider"]
    result.update(wall_seconds=phases.total, peak_rss_gib=peak_gib(), phases=phases.rows)
    return result


def job_trt(args, graph: str, onnx_path: str, onnx_bytes: int) -> dict:
    """Parse + build with TensorRT-RTX (strongly typed: the engine takes the graph's types) for a
    512x512 profile, as perco.export.build does for one graph, without an artifacts manifest."""
    from perco.engine.backends.tensorrt import make_logger
    from perco.engine.families.percov2 import GRAPHS
    from perco.export.build import _progress_monitor, detect_flavor
    from perco.export.graphs import Profile, io_shapes

    phases = Phases()
    configs = model_configs(args.layers)
    sizes = export_sizes(configs, Profile(batch=(1, 1, 1), height=(512,) * 3, width=(512,) * 3))
    shapes = io_shapes(graph, sizes, GRAPHS)  # denoiser: 2B = 1 (cond only) .. 2 (guided), opt 2
    flavor = detect_flavor("tensorrt-rtx")
    trt = flavor.module
    log = lambda t: print(t, flush=True)  # noqa: E731
    logger = make_logger(trt, flavor.name, log)
    builder = trt.Builder(logger)
    network = builder.create_network(flavor.network_flags())
    parser = trt.OnnxParser(network, logger)
    result = {"graph": graph, "flavor": f"{flavor.name} {flavor.version}", "onnx": onnx_path,
              "onnx_bytes": onnx_bytes, "strongly_typed": flavor.strongly_typed,
              "profile": {n: shapes[n] for n, _, _ in GRAPHS[graph].inputs}}
    if not parser.parse_from_file(onnx_path):
        result["error"] = "parse failed: " + "; ".join(str(parser.get_error(j)) for j in range(parser.num_errors))
        return dict(result, wall_seconds=phases.total, peak_rss_gib=peak_gib())
    phases.mark("parse")
    result["parse_seconds"] = phases.rows[-1]["seconds"]
    config = builder.create_builder_config()
    flavor.configure(config, "fp16" if "fp16" in Path(onnx_path).name else "fp32", ())
    if hasattr(trt, "IProgressMonitor"):
        config.progress_monitor = _progress_monitor(trt, log)
    profile = builder.create_optimization_profile()
    for j in range(network.num_inputs):
        tensor = network.get_input(j)
        r = shapes[tensor.name]
        profile.set_shape(tensor.name, r["min"], r["opt"], r["max"])
    config.add_optimization_profile(profile)
    start = time.perf_counter()
    blob = builder.build_serialized_network(network, config)
    result["build_seconds"] = time.perf_counter() - start
    if blob is None:
        result["error"] = "build_serialized_network returned None: " + "; ".join(logger.errors[-3:])
        return dict(result, wall_seconds=phases.total, peak_rss_gib=peak_gib(), phases=phases.rows)
    phases.mark("build_serialized_network")
    engine = Path(args.work) / "engines" / f"{graph}.engine"
    engine.parent.mkdir(parents=True, exist_ok=True)
    with open(engine, "wb") as f:
        f.write(memoryview(blob))
    result["engine_bytes"] = engine.stat().st_size
    del blob
    phases.mark("write engine")
    return dict(result, wall_seconds=phases.total, peak_rss_gib=peak_gib(), phases=phases.rows)


def run_child(args) -> None:
    name = args.job
    print(f"[{name}] pid {os.getpid()}, MemAvailable {mem_available_gib():.1f} GiB", flush=True)
    if name.startswith("export:"):
        graph = name.split(":", 1)[1]
        result = job_export_denoiser(args) if graph == "denoiser" else job_export_vae(args, graph)
    elif name == "latency":
        result = job_latency(args, args.onnx)
    elif name.startswith("trt:"):
        result = job_trt(args, name.split(":", 1)[1], args.onnx, args.onnx_bytes)
    else:
        raise SystemExit(f"unknown job {name}")
    Path(args.result).write_text(json.dumps(result, indent=2) + "\n")


# --- the parent ----------------------------------------------------------------------------------------


def spawn(args, job: str, extra: list, log_dir: Path) -> dict:
    """Run one job in a child; kill it past its RSS limit, when MemAvailable runs low, or past its time."""
    need, limit_s = BUDGET[job]
    avail = mem_available_gib()
    rss_limit = min(args.rss_limit_gib, avail - 1.0)
    if rss_limit < need:
        return {"status": "not run", "reason": f"MemAvailable {avail:.1f} GiB leaves {rss_limit:.1f} GiB for the job; "
                                                 f"it needs about {need} GiB"}
    result_file = log_dir / f"{job.replace(':', '_')}.json"
    log_file = log_dir / f"{job.replace(':', '_')}.log"
    result_file.unlink(missing_ok=True)
    cmd = [sys.executable, __file__, "--job", job, "--work", args.work, "--layers", str(args.layers),
           "--repeats", str(args.repeats), "--result", str(result_file)] + extra
    start = time.perf_counter()
    observed, killed = 0.0, None
    with open(log_file, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        while proc.poll() is None:
            rss = _status_kib(proc.pid, "VmRSS") / 2**20
            observed = max(observed, rss)
            if rss > rss_limit:
                killed = f"RSS {rss:.1f} GiB passed the job's limit {rss_limit:.1f} GiB"
            elif mem_available_gib() < 0.75:
                killed = f"machine MemAvailable fell below 0.75 GiB (job RSS {rss:.1f} GiB)"
            elif time.perf_counter() - start > limit_s:
                killed = f"did not finish within {limit_s} s"
            if killed:
                proc.kill()
                proc.wait()
                break
            time.sleep(0.25)
    wall = time.perf_counter() - start
    tail = log_file.read_text(errors="replace").strip().splitlines()[-15:]
    print("\n".join(f"    | {line}" for line in tail[-6:]), flush=True)
    base = {"job_wall_seconds": wall, "load_average_at_end": list(os.getloadavg()), "observed_peak_rss_gib": observed, "rss_limit_gib": rss_limit,
            "mem_available_gib_at_start": avail}
    if killed:
        return dict(base, status="killed", reason=killed, log_tail=tail)
    if proc.returncode or not result_file.is_file():
        errors = [line for line in tail if "Error" in line or "error" in line] or tail[-1:]
        return dict(base, status="failed", returncode=proc.returncode, reason=errors[-1] if errors else "", log_tail=tail)
    return dict(base, status="ok", **json.loads(result_file.read_text()))


def gemm_rates() -> dict:
    """torch CPU GEMM GFLOP/s by dtype (why the FP16 module is traced in BF16)."""
    import torch

    rates = {}
    for dtype, n in ((torch.float32, 1024), (torch.bfloat16, 1024), (torch.float16, 384)):
        a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
        a @ b
        start = time.perf_counter()
        for _ in range(3):
            a @ b
        rates[str(dtype).split(".")[1]] = round(3 * 2 * n**3 / (time.perf_counter() - start) / 1e9, 1)
    return rates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work", default="/tmp/percov2-full", help="scratch folder (~10 GB; deleted at the end)")
    parser.add_argument("--layers", type=int, default=24, help="MMDiT blocks (24 = SD3-medium; fewer: a dry run)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--rss-limit-gib", type=float, default=19.0, help="kill a child job past this RSS")
    parser.add_argument("--jobs", default=",".join(JOBS))
    parser.add_argument("--out", default=None, help="results path without suffix (default benchmarks/results/"
                                                    "percov2_fullsize for full size)")
    parser.add_argument("--keep", action="store_true", help="keep the scratch folder")
    parser.add_argument("--job", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    parser.add_argument("--onnx", help=argparse.SUPPRESS)
    parser.add_argument("--onnx-bytes", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.job:
        return run_child(args)

    out = Path(args.out) if args.out else (RESULTS / "percov2_fullsize" if args.layers == 24 else
                                           Path(args.work) / "smoke")
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    log_dir = work / "logs"
    log_dir.mkdir(exist_ok=True)
    disk = shutil.disk_usage(work)
    configs = model_configs(args.layers)
    t = configs["transformer"]
    result = {
        "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(), "processor": platform.machine(),
                    "python": platform.python_version(), "mem_total_gib": round(_meminfo("MemTotal"), 1),
                    "mem_available_gib_at_start": round(mem_available_gib(), 1),
                    "scratch_free_gb_at_start": round(disk.free / 1e9, 1),
                    "load_average_at_start": list(os.getloadavg())},
        "command": "python " + " ".join([os.path.relpath(__file__)] + sys.argv[1:]),
        "model": {"transformer": {k: t[k] for k in ("num_layers", "num_attention_heads", "attention_head_dim",
                                                    "joint_attention_dim", "caption_projection_dim",
                                                    "pooled_projection_dim", "patch_size", "pos_embed_max_size")},
                  "local_channels_M": configs["hyper_enc"]["M"], "vae_latent_channels": configs["vae"]["latent_channels"],
                  "rate": RATE, "seed": SEED, "weights": "random (torch.manual_seed)"},
        "gemm_gflops_torch_cpu": gemm_rates(),
        "jobs": {},
    }
    versions = {}
    for mod in ("torch", "onnx", "onnxruntime", "diffusers", "tensorrt_rtx"):
        try:
            versions[mod] = __import__(mod).__version__
        except Exception as exc:  # noqa: BLE001
            versions[mod] = f"unavailable: {exc}"
    result["versions"] = versions
    print(json.dumps(result["machine"]), json.dumps(result["gemm_gflops_torch_cpu"]), flush=True)
    jobs = [j for j in args.jobs.split(",") if j]
    total_start = time.perf_counter()
    for job in jobs:
        extra = []
        if job == "latency" or job.startswith("trt:"):
            source = result["jobs"].get("export:" + (job.split(":")[1] if ":" in job else "denoiser"), {})
            if source.get("status") != "ok":
                result["jobs"][job] = {"status": "not run", "reason": "its ONNX export did not succeed"}
                continue
            extra = ["--onnx", source["path"], "--onnx-bytes", str(source["bytes"])]
        print(f"== {job} (MemAvailable {mem_available_gib():.1f} GiB)", flush=True)
        result["jobs"][job] = spawn(args, job, extra, log_dir)
        r = result["jobs"][job]
        print(f"   {job}: {r['status']} in {r['job_wall_seconds']:.0f} s, peak RSS "
              f"{r.get('peak_rss_gib', r['observed_peak_rss_gib']):.2f} GiB {r.get('reason', '')}", flush=True)
        write(result, out)  # after every job: an interruption keeps what was measured
    result["total_wall_seconds"] = time.perf_counter() - total_start
    text = write(result, out)
    print(text)
    if not args.keep:
        shutil.rmtree(work / "onnx", ignore_errors=True)
        shutil.rmtree(work / "engines", ignore_errors=True)
        if out.parent.resolve() != work.resolve():
            shutil.rmtree(work, ignore_errors=True)


def _meminfo(field: str) -> float:
    return _status_like("/proc/meminfo", field)


def _status_like(path: str, field: str) -> float:
    with open(path) as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 2**20
    return 0.0


# --- the report ------------------------------------------------------------------------------------


def _fmt_t(t: dict) -> str:
    return f"{t['median_s']:.1f} s ({t['min_s']:.1f}-{t['max_s']:.1f})"


def write(result: dict, out: Path) -> str:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    jobs = result["jobs"]
    m = result["machine"]
    t = result["model"]["transformer"]
    lines = ["# Full-size PerCoV2 (SD3-medium dimensions): ONNX export, CPU step latency, TensorRT-RTX builds", "",
             f"Machine: {m['cpu_count']}-core {m['processor']} ({m['platform']}), {m['mem_total_gib']} GiB RAM, no GPU; "
             f"load average at start {', '.join(f'{x:.1f}' for x in m['load_average_at_start'])} (another engineer's "
             f"jobs shared the cores). Command: `{result['command']}`.", "",
             f"Model: PercoV2Transformer, {t['num_layers']} MMDiT blocks, {t['num_attention_heads']} heads x "
             f"{t['attention_head_dim']}, joint dim {t['joint_attention_dim']}, patch embedding sees 16 + "
             f"{result['model']['local_channels_M']} channels; SD3 VAE ({result['model']['vae_latent_channels']} latent "
             f"channels); random weights (seed {result['model']['seed']}), built in memory, no model folder.", ""]
    params = {}
    for job in jobs.values():
        params.update(job.get("params", {}))
    if params:
        lines += ["| network | parameters | FP32 bytes |", "|---|---:|---:|"]
        for k, v in params.items():
            lines.append(f"| {k} | {v:,} ({v / 1e9:.3f} B) | {v * 4 / 1e9:.2f} GB |")
        lines.append("")
    g = result["gemm_gflops_torch_cpu"]
    lines += [f"torch CPU GEMM in this run: fp32 {g['float32']} GFLOP/s, bf16 {g['bfloat16']} GFLOP/s, fp16 "
              f"{g['float16']} GFLOP/s.", "", "## ONNX export (each graph in its own process)", "",
              "| graph | precision | why | wall (s) | peak RSS (GiB) | files (MB) | external data | nodes (export -> folded) |",
              "|---|---|---|---:|---:|---:|---|---|"]
    why = {"vae_decoder": "FP32 fits (exporter's `_export_graph`)", "vae_encoder": "FP32 fits (exporter's `_export_graph`)",
           "denoiser": "FP32 does not fit: 8 GB of weights, ~35 GiB estimated for the FP32 export; traced in BF16, "
                       "retyped to FP16"}
    for name in ("export:denoiser", "export:vae_decoder", "export:vae_encoder"):
        r = jobs.get(name)
        if not r:
            continue
        graph = name.split(":")[1]
        if r["status"] != "ok":
            lines.append(f"| {graph} | - | {r['status']}: {r.get('reason', '')} | {r['job_wall_seconds']:.0f} | "
                         f"{r['observed_peak_rss_gib']:.1f} (observed) | | | |")
            continue
        n = r["nodes"]
        lines.append(f"| {graph} | {r['precision']} | {why[graph]} | {r['wall_seconds']:.0f} | {r['peak_rss_gib']:.2f} | "
                     f"{r['bytes'] / 1e6:.1f} | {r['external_data']} | {n['export']} -> {n['fold_constants']} |")
    d = jobs.get("export:denoiser", {})
    if d.get("status") == "ok":
        lines += ["", "Denoiser export phases: " + "; ".join(
            f"{p['phase']} {p['seconds']:.0f} s (peak {p['peak_rss_gib']:.1f} GiB)" for p in d["phases"]) + ".",
            f"Retype BF16 -> FP16: {d['retype']}. Traced at {d['trace_shapes']}; dynamic axes {d['dynamic_axes']}."]
    lines += ["", "## One guided MMDiT step at 512x512 (batch 2 = uncond + cond; latent 16x64x64, text 333x4096, "
              "pooled 2048, local 320x64x64, timestep 500.0)", ""]
    lat = jobs.get("latency")
    if lat and lat.get("status") == "ok":
        ort_t = lat["onnxruntime_cpu"]
        lines += ["| backend | precision | median (min-max), warm-up 1 + repeats | first call |", "|---|---|---|---:|",
                  f"| torch CPU (eager) | fp32 | {_fmt_t(lat['torch_cpu'])}, n={lat['torch_cpu']['n']} | "
                  f"{lat['torch_first_call_s']:.1f} s |"]
        if "error" in ort_t:
            lines.append(f"| ONNX Runtime CPU | fp16 graph | could not run: `{ort_t['error']}` | |")
        else:
            lines.append(f"| ONNX Runtime {lat['ort_version']} CPU EP | {ort_t['precision']} | {_fmt_t(ort_t)}, "
                         f"n={ort_t['n']} | {lat['ort_first_call_s']:.1f} s |")
            lines += ["", f"Max relative difference (max |ort - torch| / max |torch|): {lat['max_rel_diff']:.2e} "
                          f"(RMS relative {lat['rms_rel_diff']:.2e}; outputs finite: torch {lat['reference_finite']}, "
                          f"ORT {lat['onnxruntime_finite']}). Same weights (the FP16 export's, upcast for torch); the "
                          f"difference is FP16 compute in the graph against FP32 in torch.",
                      *([f"The cores were shared with other processes: torch's first call ({lat['torch_first_call_s']:.0f} s) "
                         f"was faster than every timed repeat, so the torch figure is inflated by contention and the "
                         f"ratio between the backends is indicative only."]
                        if lat["torch_first_call_s"] < lat["torch_cpu"]["min_s"] else []),
                      f"Peak RSS of the latency job {lat['peak_rss_gib']:.1f} GiB (torch part {lat['torch_peak_rss_gib']:.1f} GiB; "
                      f"ORT session RSS after timing {lat.get('ort_rss_gib_after', 0):.1f} GiB; session creation "
                      f"{lat.get('ort_session_s', 0):.0f} s)."]
    elif lat:
        lines.append(f"Not measured: {lat['status']}: {lat.get('reason', '')}")
    lines += ["", "## TensorRT-RTX engine builds (512x512 profile; no GPU: built for RTX targets on the CPU)", "",
              "| graph | graph precision | flavor | parse (s) | build (s) | peak RSS (GiB) | ONNX (MB) | engine (MB) | profile |",
              "|---|---|---|---:|---:|---:|---:|---:|---|"]
    for name in ("trt:denoiser", "trt:vae_decoder"):
        r = jobs.get(name)
        if not r:
            continue
        graph = name.split(":")[1]
        prec = "fp16" if graph == "denoiser" else "fp32"
        if r["status"] != "ok" or "error" in r:
            reason = r.get("error") or r.get("reason", "")
            lines.append(f"| {graph} | {prec} | {r.get('flavor', '-')} | failed ({r['status']}): {reason} | | "
                         f"{r.get('peak_rss_gib', r['observed_peak_rss_gib']):.1f} | | | |")
            continue
        prof = "; ".join(f"{k} {v['min']}..{v['max']}" if v["min"] != v["max"] else f"{k} {v['opt']}"
                         for k, v in r["profile"].items())
        lines.append(f"| {graph} | {prec} (strongly typed) | {r['flavor']} | {r['parse_seconds']:.0f} | "
                     f"{r['build_seconds']:.0f} | {r['peak_rss_gib']:.2f} | {r['onnx_bytes'] / 1e6:.0f} | "
                     f"{r['engine_bytes'] / 1e6:.0f} | {prof} |")
    lines += ["", "## Notes", "",
              "- Peak RSS: each job's own `ru_maxrss` (its own process); the parent also polled it and would have "
              "killed a job past its limit (min(19 GiB, MemAvailable - 1 GiB)).",
              "- FP32 transformer export not attempted: the exporter's path keeps ~4.4x the weights resident "
              "(PerCo (SD) 3.5 GB UNet: 15.3 GiB), i.e. ~35 GiB for 8 GB of FP32 weights, over the ~20 GiB allowed here.",
              "- Why BF16 tracing: torch's CPU FP16 GEMM on this machine (no AVX512-FP16/AMX) runs at the fp16 rate above; "
              "the tracing forward pass of a ~4 TFLOP step would take hours. BF16 has the exponent range of FP32, so the "
              "random init's values convert to FP16 (`non_finite_after` in the retype counts above: values outside the FP16 range).",
              "- The TensorRT-RTX engines are not run (no GPU here); their latency belongs to a GPU run."]
    if result.get("total_wall_seconds"):
        lines.append(f"- Total wall time {result['total_wall_seconds'] / 60:.1f} min.")
    text = "\n".join(lines) + "\n"
    out.with_suffix(".md").write_text(text)
    return text


if __name__ == "__main__":
    main()
