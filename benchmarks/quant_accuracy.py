"""Q/DQ accuracy: per-graph error against FP32 and end-to-end decode PSNR, on ONNX Runtime CPU.

    python benchmarks/quant_accuracy.py [--model DIR] [--images DIR] [--out benchmarks/results/quant_tiny]

Without --model, a tiny random model is made with `perco init-tiny` (seed 0, real layout). The
FP32 export is quantized with `perco quantize` (int8 and fp8, default graphs: text encoder and
denoiser), then every test image is compressed once (FP32) and decoded with the FP32 and the
quantized artifacts; PSNR is of the quantized decode against the FP32 decode.
"""

import argparse
import json
import platform
import tempfile
from pathlib import Path

import numpy as np


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b) ** 2)
    return float(10 * np.log10(255**2 / mse)) if mse > 0 else float("inf")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=None)
    parser.add_argument("--images", default=None, help="folder of PNG/JPEG test images (default: 3 built-in ones)")
    parser.add_argument("--size", default="128x64", help="decode size WxH (default: %(default)s)")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--graphs", default="text_encoder,denoiser")
    parser.add_argument("--out", default="benchmarks/results/quant_tiny")
    args = parser.parse_args()

    from PIL import Image

    from perco.engine import Codec
    from perco.engine.cli import main as perco
    from perco.engine.demo import sample_image
    from perco.export.graphs import Profile
    from perco.export.onnx import export_model
    from perco.export.quantize import quantize

    width, height = (int(v) for v in args.size.lower().split("x"))
    work = Path(tempfile.mkdtemp(prefix="perco-quant-"))
    model = args.model
    if model is None:
        model = str(work / "tiny")
        assert perco(["init-tiny", model]) == 0
    export_model(model, work / "fp32", profile=Profile(batch=(1, 1, 2), height=(64, height, 512),
                                                       width=(64, width, 512)), log=lambda t: None)
    if args.images:
        paths = sorted(p for p in Path(args.images).iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg"))
        images = [np.asarray(Image.open(p).convert("RGB").resize((width, height), Image.BICUBIC)) for p in paths]
    else:
        rng = np.random.default_rng(7)
        images = [sample_image(width, height)] + [
            rng.integers(0, 256, (height // 8 + 1, width // 8 + 1, 3)).astype(np.uint8).repeat(8, 0).repeat(8, 1)
            [:height, :width] for _ in range(2)]
    graphs = tuple(args.graphs.split(","))
    fp32 = Codec.from_pretrained(backend="onnxruntime", artifacts=work / "fp32")
    streams = [fp32.compress(image, caption="a red barn on a hill") for image in images]
    reference = [fp32.decompress(s, steps=args.steps) for s in streams]
    result = {"machine": platform.platform(), "model": model if args.model else "tiny random (init-tiny, seed 0)",
              "size": [width, height], "steps": args.steps, "images": len(images), "graphs": list(graphs),
              "precisions": {}}
    for precision in ("int8", "fp8"):
        folder = work / precision
        report = quantize(work / "fp32", folder, precision, log=lambda t: None, graphs=graphs)
        q = Codec.from_pretrained(backend="onnxruntime", artifacts=folder)
        same_bits = all(q.compress(image, caption="a red barn on a hill") == s for image, s in zip(images, streams))
        values = [psnr(q.decompress(s, steps=args.steps), r) for s, r in zip(streams, reference)]
        result["precisions"][precision] = {"per_graph": report, "psnr_db": values,
                                           "psnr_median_db": float(np.median(values)), "same_bitstream": same_bits}
        print(precision, json.dumps(result["precisions"][precision]), flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [f"# Q/DQ accuracy on ONNX Runtime CPU ({result['model']})", "",
             f"`python benchmarks/quant_accuracy.py {' '.join(f'--{k} {v}' for k, v in vars(args).items() if v)}`; "
             f"{platform.platform()}; {width}x{height}, {args.steps} DDIM steps, {len(images)} images; quantized "
             f"graphs: {', '.join(graphs)} (the others stay float).", "",
             "| precision | graph | max rel. error | RMS rel. error |", "|---|---|---:|---:|"]
    for precision, r in result["precisions"].items():
        for graph, e in r["per_graph"].items():
            lines.append(f"| {precision} | {graph} | {e['value']:.3f} | {e['rms_rel_error']:.3f} |")
    lines += ["", "| precision | decode PSNR vs FP32 decode (dB), median [per image] | same bitstream |", "|---|---|---|"]
    for precision, r in result["precisions"].items():
        lines.append(f"| {precision} | {r['psnr_median_db']:.1f} {[round(v, 1) for v in r['psnr_db']]} | "
                     f"{r['same_bitstream']} |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
