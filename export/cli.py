"""The `perco` verbs that need torch: init-tiny, export, check, build, quantize, bench, train-entropy.

They are registered with the runtime's CLI through the `perco.commands` entry point
(`perco.engine.plugins`), so `perco.engine` never imports this side. This module itself imports
nothing heavy: each verb imports what it needs when it runs, and a missing extra is one error
line naming what to install.
"""

import argparse
import sys

from perco.engine import families
from perco.engine.cli import model_arg, positive_int, uint64, integer_type, number_type
from perco.engine.entropy.intnet import PRESETS
from perco.engine.entropy.schedules import SCHEDULES
from perco.engine.errors import PercoError, UsageError
from perco.engine.plugins import EXPORT_EXTRA

_count = integer_type(0)
_positive_float = number_type(0, open_low=True)


def add_commands(sub) -> dict:
    """Add the torch-side verbs to the `perco` subparsers; return {verb: handler}."""
    p = sub.add_parser("init-tiny", help="write a tiny random model in the real folder layout",
                       description="Write a tiny, seeded, randomly initialised model of a family in exactly its "
                                   "folder layout (for tests and the demo; its pixels are meaningless).")
    p.add_argument("dir", metavar="DIR", help="folder to create (must not exist or be empty)")
    p.add_argument("--family", default="perco-sd", choices=families.names(),
                   help="perco-sd: PerCo (SD), Stable Diffusion 2.1; percov2: PerCoV2, Stable Diffusion 3 "
                        "(default: %(default)s)")
    p.add_argument("--rate", default="0.0313", metavar="BPP",
                   help="rate preset whose token grid and codebook to keep; " + "; ".join(
                       f"{f.name}: " + ", ".join(f"{r} (grid {g}, {k} codes)" for r, (g, k) in f.rates.items())
                       for f in map(families.get, families.names())) + " (default: %(default)s)")
    p.add_argument("--seed", type=uint64, default=0, metavar="N", help="weight seed (default: 0)")
    p.add_argument("--tokenizer", default=None, metavar="DIR",
                   help="CLIP tokenizer folder to copy (transformers format); default: a small built-in one")
    p.add_argument("--full-size", action="store_true",
                   help="the real dimensions instead of tiny ones (SD 2.1: about 5 GB of random weights; SD3-medium: "
                        "about 10 GB), for export and speed measurements")
    p.add_argument("--t5", action="store_true",
                   help="percov2 only: also write the optional T5 text encoder (text_encoder_3/, tokenizer_3/ with a "
                        "small built-in T5 tokenizer; with --full-size, T5-XXL's 4.7B parameters)")

    p = sub.add_parser("export", help="export every network to ONNX (+ manifest)",
                       description="Export each network of a model to an optimized ONNX graph with dynamic batch "
                                   "and image size, plus manifest.json. An unchanged re-run reuses the files.")
    model_arg(p)
    p.add_argument("-o", "--output", required=True, metavar="ARTIFACTS", help="artifacts folder")
    p.add_argument("--opset", type=positive_int, default=18, metavar="N", help="ONNX opset (default: %(default)s)")
    p.add_argument("--batch-max", type=positive_int, default=4, metavar="B",
                   help="largest batch recorded in the profile (default: %(default)s)")
    p.add_argument("--height", type=_range, default=(64, 512, 1024), metavar="MIN:OPT:MAX",
                   help="padded image height range in pixels (default: 64:512:1024)")
    p.add_argument("--width", type=_range, default=(64, 512, 1024), metavar="MIN:OPT:MAX",
                   help="padded image width range in pixels (default: 64:512:1024)")

    p = sub.add_parser("check", help="parity of exported graphs against torch",
                       description="Run every exported graph on ONNX Runtime (CPU) and the torch module on the "
                                   "same seeded inputs; print the max error relative to max |torch output|.")
    model_arg(p)
    p.add_argument("--artifacts", required=True, metavar="DIR", help="artifacts folder from 'perco export'")
    p.add_argument("--tolerance", type=float, default=1e-4, help="max relative error allowed (default: 1e-4)")

    p = sub.add_parser("build", help="build TensorRT engines from exported graphs",
                       description="Build one TensorRT (or TensorRT-RTX) engine per exported graph, with an "
                                   "optimization profile from the manifest or the flags. Engines are cached by a "
                                   "content key (graph, precision, profile, flavor, targets).")
    p.add_argument("--artifacts", required=True, metavar="ART", help="artifacts folder from 'perco export'")
    p.add_argument("-o", "--output", required=True, metavar="ENGINES", help="engines folder")
    p.add_argument("--precision", default="fp16", choices=["fp32", "fp16", "bf16", "int8", "fp8"],
                   help="engine precision (default: %(default)s)")
    p.add_argument("--flavor", default="auto", choices=["auto", "tensorrt", "tensorrt-rtx"],
                   help="auto: full TensorRT if installed, else TensorRT-RTX (default)")
    p.add_argument("--batch", type=_range, default=None, metavar="MIN:OPT:MAX", help="batch range (images)")
    p.add_argument("--height", type=_range, default=None, metavar="MIN:OPT:MAX", help="padded height range (px)")
    p.add_argument("--width", type=_range, default=None, metavar="MIN:OPT:MAX", help="padded width range (px)")
    p.add_argument("--target-cc", default="", metavar="CC[,CC]",
                   help="TensorRT-RTX compute capabilities to build for, e.g. 86,89 (default: the flavor's)")
    p.add_argument("--refittable", action="store_true",
                   help="engines that can take another rate's weights in place (another cache key)")
    p.add_argument("--plan", action="store_true", help="print what would be built, build nothing")

    p = sub.add_parser("quantize", help="INT8/FP8 Q/DQ graphs, calibrated and validated",
                       description="Write a complete artifacts folder whose text encoder, VAE and denoiser are "
                                   "explicitly quantized (Q/DQ) graphs, calibrated by running the FP32 graphs on "
                                   "images, and report each graph's error against FP32 on ONNX Runtime CPU.")
    p.add_argument("--artifacts", required=True, metavar="ART", help="FP32 artifacts from 'perco export'")
    p.add_argument("-o", "--output", required=True, metavar="QART", help="folder for the quantized artifacts")
    p.add_argument("--precision", default="int8", choices=["int8", "fp8"], help="(default: %(default)s)")
    p.add_argument("--calibration", default=None, metavar="DIR",
                   help="calibration images (PNG/JPEG); default: the built-in sample and seeded images")
    p.add_argument("--count", type=positive_int, default=4, help="calibration images to use (default: %(default)s)")
    p.add_argument("--graphs", default="text_encoder,denoiser", metavar="G[,G]",
                   help="graphs to quantize, of text_encoder, vae_encoder, denoiser, vae_decoder (default: "
                        "%(default)s; the others stay float and build as FP16 engines)")
    p.add_argument("--size", default=None, metavar="WxH",
                   help="calibration image size in pixels (default: the export profile's opt size; smaller "
                        "needs less memory)")
    p.add_argument("--keep-float", default="", metavar="NAME[,NAME]",
                   help="more layers to leave unquantized: fragments of their ONNX node names, e.g. "
                        "/down_blocks.0/ (attention products and boundary layers always stay float)")

    p = sub.add_parser("bench", help="latency and throughput, backends side by side",
                       description="Per-stage latency, end-to-end decode and throughput of each backend on the "
                                   "same bitstreams; JSON, markdown and a PNG plot. --smoke: tiny model, seconds.")
    model_arg(p, required=False)
    p.add_argument("--smoke", action="store_true", help="tiny sizes and steps (what CI runs)")
    p.add_argument("--backends", default="torch,onnxruntime",
                   help="comma-separated, of torch, onnxruntime, tensorrt (default: %(default)s)")
    p.add_argument("--artifacts", default=None, metavar="DIR",
                   help="exported graphs for onnxruntime (default: --model exported into the cache)")
    p.add_argument("--engines", default=None, metavar="DIR", help="engines for tensorrt (from 'perco build')")
    p.add_argument("--sizes", default="512x512,768x512", help="WxH list (default: %(default)s)")
    p.add_argument("--steps", default="1,5,20", help="step counts for latency (default: %(default)s)")
    p.add_argument("--batches", default="1,2,4,8,16,32", help="batch sizes for throughput (default: %(default)s)")
    p.add_argument("--throughput-steps", default="5,20", help="step counts for throughput (default: %(default)s)")
    p.add_argument("--repeats", type=positive_int, default=3, help="timed repeats (default: %(default)s)")
    p.add_argument("--out", default="benchmarks/results/bench", metavar="PATH",
                   help="output path without suffix (default: %(default)s)")

    p = sub.add_parser("train-entropy", help="train the learned entropy model of the token indices",
                       description="Train a model's masked-token entropy model (an integer network, "
                                   "docs/entropy-model-arithmetic.md) on the index maps of images through the "
                                   "model's own hyper-encoder: the float network first, then quantization-aware "
                                   "fine-tuning; write it to DIR/entropy_model/ and print the bits per token of the "
                                   "held-out images (uniform, static unigram, float, integer). Checkpoints go to "
                                   "DIR/entropy_model.train/checkpoint.pt.")
    model_arg(p)
    p.add_argument("--images", required=True, metavar="DIR|GLOB",
                   help="training images: a folder (PNG, JPEG, WebP, BMP, TIFF, PPM) or a quoted glob pattern")
    p.add_argument("--preset", default="tiny", choices=sorted(PRESETS),
                   help="network size: tiny (16 channels, 9x9 context), small (64, 17x17), base (128, 33x33) "
                        "(default: %(default)s)")
    p.add_argument("--steps", type=positive_int, default=2000, metavar="N",
                   help="total training steps, the last quarter quantization-aware (default: %(default)s)")
    p.add_argument("--batch", type=positive_int, default=16, metavar="N",
                   help="index maps per step (default: %(default)s)")
    p.add_argument("--crop", type=positive_int, default=256, metavar="PX",
                   help="side of the random training crops in pixels, a multiple of the model's pad multiple, "
                        "clamped to each image (default: %(default)s)")
    p.add_argument("--crops", type=positive_int, default=32, metavar="N",
                   help="random crops (each flipped with probability 1/2) per training image (default: %(default)s)")
    p.add_argument("--schedule", default="coarse-to-fine", choices=sorted(SCHEDULES),
                   help="group order of the coder (default: %(default)s)")
    p.add_argument("--held-out", type=_count, default=1, metavar="N",
                   help="images (the last N by name) kept out of training and measured whole; 0: measure the "
                        "training images (default: %(default)s)")
    p.add_argument("--lr", type=_positive_float, default=1e-2, metavar="LR",
                   help="peak Adam learning rate (default: %(default)s)")
    p.add_argument("--seed", type=uint64, default=0, metavar="N", help="crop and initialisation seed (default: 0)")
    p.add_argument("--threads", type=positive_int, default=None, metavar="N",
                   help="torch threads while training (default: torch's; the tiny preset is as fast on 1)")
    p.add_argument("--resume", action="store_true",
                   help="continue from the checkpoint (its data seed) up to --steps in total")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars or log lines on stderr")

    handlers = {"init-tiny": cmd_init_tiny, "export": cmd_export, "check": cmd_check, "build": cmd_build,
                "quantize": cmd_quantize, "bench": cmd_bench, "train-entropy": cmd_train_entropy}
    return {verb: _needs_extra(verb, handler) for verb, handler in handlers.items()}


def _needs_extra(verb: str, handler):
    """Each verb imports torch and friends when it runs; without them, one line saying what to install."""
    def run(args):
        try:
            return handler(args)
        except ImportError as exc:
            raise PercoError(f"{verb} needs {exc.name or 'torch'}: {EXPORT_EXTRA}") from None

    return run


def _range(text: str) -> tuple:
    try:
        values = tuple(int(v) for v in text.split(":"))
    except ValueError:
        values = ()
    if len(values) != 3:
        raise argparse.ArgumentTypeError(f"expected MIN:OPT:MAX, got {text!r}")
    return values


def _size(text):
    """'WxH' -> (W, H), or None."""
    if text is None:
        return None
    try:
        width, height = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise UsageError(f"--size takes WxH in pixels, e.g. 256x256, got {text!r}") from None
    if width <= 0 or height <= 0:
        raise UsageError(f"--size must be positive, got {text!r}")
    return width, height


def cmd_init_tiny(args) -> None:
    from perco.export.tiny import init_tiny

    folder = init_tiny(args.dir, rate=args.rate, seed=args.seed, tokenizer=args.tokenizer,
                       full_size=args.full_size, family=args.family, t5=args.t5)
    size = "full-size" if args.full_size else "tiny"
    print(f"wrote {size} random {args.family} model{' with T5' if args.t5 else ''} (rate {args.rate}, seed "
          f"{args.seed}) to {folder}")


def cmd_build(args) -> None:
    from perco.export import build as trt_build

    overrides = {k: getattr(args, k) for k in ("batch", "height", "width") if getattr(args, k)}
    try:
        target_cc = tuple(int(v) for v in args.target_cc.split(",") if v)
    except ValueError:
        raise PercoError(f"--target-cc takes numbers like 86,89, got {args.target_cc!r}") from None
    if args.plan:
        for row in trt_build.plan(args.artifacts, args.precision, args.flavor, overrides, target_cc, args.output,
                                  args.refittable):
            state = row["unsupported"] or ("cached" if row["cached"] else "to build")
            print(f"{row['graph']:15s} {row['precision']:5s} {row['flavor']:24s} weights "
                  f"{row['weights_bytes'] / 2**20:9.1f} MiB  max {row['max_shapes']}  [{state}]")
        return
    trt_build.build(args.artifacts, args.output, args.precision, args.flavor, overrides, target_cc,
                    log=lambda text: print(text, file=sys.stderr), refittable=args.refittable)


def cmd_quantize(args) -> None:
    from perco.export.quantize import quantize

    report = quantize(args.artifacts, args.output, args.precision, args.calibration, args.count,
                      log=lambda text: print(text, file=sys.stderr), graphs=tuple(args.graphs.split(",")),
                      keep_float=tuple(v for v in args.keep_float.split(",") if v), size=_size(args.size))
    for name, r in report.items():
        print(f"{name:15s} {args.precision} vs fp32: max rel error {r['value']:.3e}, rms rel error {r['rms_rel_error']:.3e}")


def cmd_bench(args) -> None:
    from perco.benchmarks.harness import BenchConfig, run, smoke_config
    from perco.engine.demo import default_model

    model = args.model or str(default_model(progress=True))
    try:
        if args.smoke:
            config = smoke_config(model, args.out)
        else:
            config = BenchConfig(
                model=model, backends=args.backends.split(","), repeats=args.repeats, out=args.out,
                artifacts=args.artifacts, engines=args.engines,
                sizes=[tuple(int(v) for v in s.lower().split("x")) for s in args.sizes.split(",")],
                steps=[int(v) for v in args.steps.split(",")], batches=[int(v) for v in args.batches.split(",")],
                throughput_steps=[int(v) for v in args.throughput_steps.split(",")])
    except ValueError:
        raise PercoError("--sizes takes WxH[,WxH...]; --steps, --batches, --throughput-steps take N[,N...]") from None
    run(config, log=lambda text: print(text, file=sys.stderr))
    print(f"wrote {args.out}.json, {args.out}.md")


def cmd_export(args) -> None:
    import perco.export.onnx as onnx_export
    from perco.export.graphs import Profile

    profile = Profile(batch=(1, 1, args.batch_max), height=args.height, width=args.width)
    onnx_export.export_model(args.model, args.output, opset=args.opset, profile=profile,
                             log=lambda text: print(text, file=sys.stderr))


def cmd_check(args) -> None:
    from perco.export.onnx import parity

    report = parity(args.model, args.artifacts)
    failed = []
    for name, result in report.items():
        value = result.get("max_rel_error", result.get("mismatch_fraction"))
        ok = value <= (args.tolerance if "max_rel_error" in result else 0.0)
        failed += [] if ok else [name]
        print(f"{name:15s} {'max rel error' if 'max_rel_error' in result else 'index mismatch'} "
              f"{value:.3e}  {'ok' if ok else 'FAIL'}")
    if failed:
        raise PercoError(f"parity check failed for: {', '.join(failed)}")


def cmd_train_entropy(args) -> None:
    from perco.export.entropy_train import train_entropy

    log = (lambda text: None) if args.quiet else (lambda text: print(text, file=sys.stderr))
    r = train_entropy(args.model, args.images, preset=args.preset, steps=args.steps, batch=args.batch,
                      crop=args.crop, crops_per_image=args.crops, lr=args.lr, schedule=args.schedule, seed=args.seed,
                      resume=args.resume, held_out=args.held_out, threads=args.threads, progress=not args.quiet,
                      log=log)
    bits = r["bits_per_token"]
    print(f"entropy model ({r['preset']}, {r['schedule']}, K {r['codebook_size']}) trained {r['steps']} steps on "
          f"{r['images']} image(s) in {r['train_seconds']:.1f} s; {r['evaluated_on']}, {r['evaluation_tokens']} "
          f"tokens:")
    for name in ("uniform", "unigram", "float", "integer", "rounded_without_qat"):
        print(f"  {name:20s} {bits[name]:8.4f} bits/token ({bits[name] / bits['uniform']:6.1%} of uniform)")
    print(f"  integer vs float: {r['integer_vs_float_gap']:+.2%}")
    print(f"wrote {r['entropy_model']}")
