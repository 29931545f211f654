"""Full-size TensorRT(-RTX) engine builds on this machine: time, peak memory, engine size.

    python benchmarks/trt_fullsize.py --artifacts DIR [--precisions fp32,fp16,bf16] [--out benchmarks/results/trt_fullsize]
    python benchmarks/trt_fullsize.py --artifacts QART --precisions int8    # QART from perco quantize

DIR holds the full-size export (see benchmarks/onnx_fullsize.py). Each (graph, precision) is
built in its own child process so its peak RSS is its own. The FP16 row includes making the FP16
graph from the FP32 export, and its error against FP32 on ONNX Runtime CPU (BF16: through the
BF16-rounding FP32 emulation, since ONNX Runtime's CPU provider runs almost no op in BF16).
Rows of precisions not run this time are kept from the previous results file.
"""

import argparse
import json
import platform
import subprocess
import sys
from pathlib import Path

CHILD = """
import json, resource, sys, time
from perco.export import build
start = time.perf_counter()
path = build.build(sys.argv[1], sys.argv[2], sys.argv[3], "auto", log=lambda t: print(t, file=sys.stderr),
                   graphs=[sys.argv[4]])
engines = json.loads(open(path).read())
entry = engines["graphs"][sys.argv[4]]
print(json.dumps({"seconds": time.perf_counter() - start, "peak_rss_gib": resource.getrusage(
    resource.RUSAGE_SELF).ru_maxrss / 2**20, "engine_bytes": entry["bytes"], "vs_fp32": entry.get("vs_fp32"),
    "flavor": engines["flavor"], "version": engines["version"], "graph_precision": entry.get("precision")}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--artifacts", required=True)
    parser.add_argument("--engines", default="/tmp/perco-fullsize/engines")
    parser.add_argument("--out", default="benchmarks/results/trt_fullsize")
    parser.add_argument("--precisions", default="fp32,fp16,bf16")
    args = parser.parse_args()
    precisions = args.precisions.split(",")
    out = Path(args.out)
    try:
        rows = [r for r in json.loads(out.with_suffix(".json").read_text())["rows"] if r["precision"] not in precisions]
    except (OSError, ValueError, KeyError):
        rows = []
    for precision in precisions:
        for graph in ("denoiser", "vae_decoder", "text_encoder"):
            proc = subprocess.run([sys.executable, "-c", CHILD, args.artifacts, f"{args.engines}/{precision}", precision,
                                   graph], capture_output=True, text=True)
            if proc.returncode:
                rows.append({"graph": graph, "precision": precision, "error": proc.stderr.strip().splitlines()[-1]})
            else:
                rows.append({"graph": graph, "precision": precision, **json.loads(proc.stdout.strip().splitlines()[-1])})
            print(json.dumps(rows[-1]), flush=True)
    manifest = json.loads((Path(args.artifacts) / "manifest.json").read_text())
    order = {"fp32": 0, "fp16": 1, "bf16": 2, "int8": 3, "fp8": 4}
    rows.sort(key=lambda r: order.get(r["precision"], 9))
    result = {"machine": platform.platform(), "profile": manifest["profile"], "rows": rows}
    out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    print(write_markdown(result, out))


def write_markdown(result: dict, out: Path) -> str:
    lines = [f"# Full-size engine builds on the CPU machine ({result['machine']})", "",
             "`python benchmarks/trt_fullsize.py --artifacts DIR [--precisions ...]` (int8 rows: `--artifacts QART "
             "--precisions int8`, QART from `perco quantize --artifacts DIR -o QART --count 2 --size 256x256 "
             "--graphs denoiser`); PerCo (SD) 0.0313, SD 2.1 dimensions, random weights; profile "
             f"{result['profile']}; each build in its own process. 'int8 build: fp16' = a graph left in float, "
             "built as FP16.", "",
             "| graph | precision | flavor | build (s) | peak RSS (GiB) | engine (MB) | vs FP32 (ORT CPU) |",
             "|---|---|---|---:|---:|---:|---|"]
    for r in result["rows"]:
        if "error" in r:
            lines.append(f"| {r['graph']} | {r['precision']} | - | failed: {r['error']} | | | |")
            continue
        vs = f"{r['vs_fp32']['metric']} {r['vs_fp32']['value']:.1e}" if r.get("vs_fp32") else "-"
        made = r.get("graph_precision") or r["precision"]
        label = r["precision"] if made == r["precision"] else f"{r['precision']} build: {made}"
        lines.append(f"| {r['graph']} | {label} | {r['flavor']} {r['version']} | {r['seconds']:.0f} | "
                     f"{r['peak_rss_gib']:.1f} | {r['engine_bytes'] / 1e6:.0f} | {vs} |")
    text = "\n".join(lines) + "\n"
    out.with_suffix(".md").write_text(text)
    return text


if __name__ == "__main__":
    main()
