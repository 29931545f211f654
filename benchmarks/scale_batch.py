"""`perco batch` throughput: Ray Data actor pools (1 and 2 CPU actors) against the plain in-process loop.

On the tiny model (`init-tiny` into a temporary folder) and the same images in one run: the in-process loop
(one Codec: load_image + Codec.compress + write, then read + Codec.decompress + save, one image at a time) and
`run_job` with 1 and 2 actors (decompress in same-size batches of --batch-size through decompress_batch), both
verbs, several repeats each (median, min, max). A job's time is end to end: actor start, model load, every batch,
the report; the loop's is given with and without its one model load. Ray is started once (a local cluster with
this machine's cores) and warmed up by a one-image job of each verb, and the loop's codec by one image, before
anything is timed. The machine (cores, CPU model, load average at start and end) is
recorded: the tiny model's work is small, so the actors' fixed start-up cost and other load on the machine weigh.

    python -m perco.benchmarks.scale_batch --out benchmarks/results/scale_batch
    python -m perco.benchmarks.scale_batch --images 4 --repeats 1 --out /tmp/scale_batch   # a smoke run
"""

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from perco.benchmarks.harness import size_type

LOADED = 0.5  # 1-minute load average per core at the start above which a run is marked as made on a loaded machine


def machine() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    info = {"platform": platform.platform(), "machine": platform.machine(), "cores": os.cpu_count(),
            "python": platform.python_version(), "numpy": np.__version__}
    for package in ("ray", "torch"):
        try:
            info[package] = version(package)
        except PackageNotFoundError:
            info[package] = None
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            info["cpu"] = next(line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name"))
    except (OSError, StopIteration):
        info["cpu"] = platform.processor() or None
    return info


def make_inputs(folder: Path, count: int, width: int, height: int) -> list:
    """`count` deterministic images (8x8 blocks of random colour) as PNG files."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        rng = np.random.default_rng(i)
        base = rng.integers(0, 256, size=(height // 8 + 1, width // 8 + 1, 3)).astype(np.uint8)
        image = np.ascontiguousarray(base.repeat(8, 0).repeat(8, 1)[:height, :width])
        path = folder / f"img{i:04d}.png"
        Image.fromarray(image).save(path)
        paths.append(path)
    return paths


def in_process(model: Path, paths: list, work: Path, steps: int, seed: int) -> dict:
    """The plain loop, one Codec in this process: seconds of the model load, the compress and the decompress loop."""
    from perco.engine.codec import Codec
    from perco.engine.imageio import load_image, save_image, write_output

    coded, decoded = work / "coded", work / "decoded"
    coded.mkdir(parents=True)
    decoded.mkdir(parents=True)
    start = time.perf_counter()
    codec = Codec.from_pretrained(model, backend="torch")
    load = time.perf_counter() - start
    codec.decompress(codec.compress(load_image(paths[0]), seed=seed), steps=steps)  # warm-up, not timed
    start = time.perf_counter()
    for path in paths:
        write_output(coded / f"{path.stem}.perco", codec.compress(load_image(path), seed=seed))
    compress = time.perf_counter() - start
    start = time.perf_counter()
    for path in paths:
        data = (coded / f"{path.stem}.perco").read_bytes()
        save_image(decoded / f"{path.stem}.png", codec.decompress(data, steps=steps))
    decompress = time.perf_counter() - start
    codec.close()
    return {"load": load, "compress": compress, "decompress": decompress, "coded": coded}


def batch_jobs(model: Path, images: Path, work: Path, actors: int, steps: int, seed: int, batch_size: int,
               only=None) -> dict:
    """One batch compress and one batch decompress job (fresh output folders: nothing skipped); `only`: a list of
    the images to code instead of the folder (the warm-up's)."""
    from perco.scale.batch import run_job

    coded, decoded = work / "coded", work / "decoded"
    jobs = {}
    jobs["compress"] = run_job("compress", only if only is not None else images, coded, model=model, actors=actors,
                               batch_size=batch_size, seed=seed)
    jobs["decompress"] = run_job("decompress", coded, decoded, model=model, actors=actors, batch_size=batch_size,
                                 decode_options={"steps": steps})
    for verb, job in jobs.items():
        if job["failed"] or job["skipped"]:
            raise RuntimeError(f"batch {verb} with {actors} actor(s): {len(job['failed'])} failed, "
                               f"{len(job['skipped'])} skipped (expected every item done): {job['failed'][:1]}")
    return {**jobs, "coded": coded}


def _stats(times: list, images: int) -> dict:
    median = statistics.median(times)
    return {"median_s": median, "min_s": min(times), "max_s": max(times), "n": len(times), "times_s": times,
            "images_per_second": images / median if median > 0 else None}


def run(args) -> dict:
    from perco.engine import plugins
    from perco.scale.batch import ray_session

    width, height = args.size
    actor_counts = args.actors
    load_start = [round(x, 2) for x in os.getloadavg()]
    root = Path(tempfile.mkdtemp(prefix="perco-scale-batch-"))
    try:
        if args.model:
            model = Path(args.model).resolve()
        else:
            model = root / "model"
            plugins.load("perco.hooks", "init_tiny", "the benchmark's tiny model")(model, rate=0.0313, seed=0)
        paths = make_inputs(root / "images", args.images, width, height)
        from perco.engine.codec import Codec

        Codec.from_pretrained(model, backend="torch").close()  # torch's import out of the loop's timed load
        loop = {"load": [], "compress": [], "decompress": [], "compress_with_load": [], "decompress_with_load": []}
        jobs = {n: {"compress": [], "decompress": [], "compress_first_batch": [], "decompress_first_batch": []}
                for n in actor_counts}
        matches = True
        import ray

        with ray_session("local"):
            print(f"ray: {ray.cluster_resources().get('CPU', 0):g} CPUs", file=sys.stderr)
            batch_jobs(model, root / "images", root / "warm-up", 1, 1, args.seed, args.batch_size, paths[:1])
            for repeat in range(args.repeats):
                timings = in_process(model, paths, root / f"loop{repeat}", args.steps, args.seed)
                for key in ("load", "compress", "decompress"):
                    loop[key].append(timings[key])
                for verb in ("compress", "decompress"):
                    loop[f"{verb}_with_load"].append(timings[verb] + timings["load"])
                for count in actor_counts:
                    out = batch_jobs(model, root / "images", root / f"batch{count}-{repeat}", count, args.steps,
                                     args.seed, args.batch_size)
                    for verb in ("compress", "decompress"):
                        jobs[count][verb].append(out[verb]["seconds"])
                        jobs[count][f"{verb}_first_batch"].append(out[verb]["first_batch_seconds"])
                    matches &= all((out["coded"] / f"{p.stem}.perco").read_bytes() ==
                                   (timings["coded"] / f"{p.stem}.perco").read_bytes() for p in paths)
                print(f"repeat {repeat + 1}/{args.repeats} done", file=sys.stderr)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    n = args.images
    rows = []
    for verb in ("compress", "decompress"):
        reference = _stats(loop[verb], n)
        rows.append({"verb": verb, "method": "in-process loop", **reference})
        rows.append({"verb": verb, "method": "in-process loop incl. model load",
                     **_stats(loop[f"{verb}_with_load"], n)})
        for count in actor_counts:
            stats = _stats(jobs[count][verb], n)
            first = [t for t in jobs[count][f"{verb}_first_batch"] if t is not None]
            rows.append({"verb": verb, "method": f"perco batch, {count} actor{'s' if count > 1 else ''}",
                         "actors": count, **stats,
                         "first_batch_median_s": statistics.median(first) if first else None,
                         "speedup_vs_loop": reference["median_s"] / stats["median_s"]})
    load_end = [round(x, 2) for x in os.getloadavg()]
    info = machine()
    loaded = load_start[0] > LOADED * (info["cores"] or 1)  # at the end the 1-minute average counts this run too
    return {"benchmark": "scale_batch", "machine": info, "loadavg_start": load_start, "loadavg_end": load_end,
            "loaded": loaded, "model": args.model or "tiny (init-tiny, rate 0.0313, seed 0, random weights)",
            "images": n, "size": f"{width}x{height}", "steps": args.steps, "seed": args.seed,
            "batch_size": args.batch_size, "repeats": args.repeats, "compress_bytes_match_loop": matches,
            "rows": rows}


def markdown(result: dict, command: str) -> str:
    m = result["machine"]
    lines = [
        "# perco batch throughput (Ray Data actor pools vs the in-process loop)", "",
        f"`{command}`", "",
        f"Machine: {m.get('cpu')}, {m['cores']} cores, {m['platform']}; python {m['python']}, ray {m['ray']}, "
        f"torch {m['torch']}. Load average {result['loadavg_start'][0]} at the start, {result['loadavg_end'][0]} "
        "at the end.", "",
    ]
    if result["loaded"]:
        lines += ["**This machine was loaded when the run started** (1-minute load average above "
                  f"{LOADED} per core): other work shared the cores, so these figures are not a measurement of "
                  "the code alone.", ""]
    lines += [
        f"{result['images']} images of {result['size']}, {result['model']}, decompress with {result['steps']} "
        f"steps, batch size {result['batch_size']}, {result['repeats']} repeat(s); median (min..max). A batch job "
        "counts everything from run_job's start to its report: actor start and model load included (the 'first "
        "batch' column: the time to the first finished batch). Compressed bytes equal the loop's: "
        f"{result['compress_bytes_match_loop']}.", "",
        "| verb | method | seconds | images/s | speedup vs loop | first batch (s) |",
        "|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        speed = f"{r['speedup_vs_loop']:.3g}x" if "speedup_vs_loop" in r else ""
        first = f"{r['first_batch_median_s']:.2f}" if r.get("first_batch_median_s") is not None else ""
        lines.append(f"| {r['verb']} | {r['method']} | {r['median_s']:.2f} ({r['min_s']:.2f}..{r['max_s']:.2f}) | "
                     f"{r['images_per_second']:.2f} | {speed} | {first} |")
    return "\n".join(lines) + "\n"


_size = size_type(8)


def _counts(text: str) -> list:
    try:
        counts = [int(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected actor counts like 1,2, got {text!r}") from None
    if not counts or min(counts) < 1:
        raise argparse.ArgumentTypeError(f"expected positive actor counts, got {text!r}")
    return counts


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=32, help="images per job (default: %(default)s)")
    parser.add_argument("--size", type=_size, default=(128, 128), metavar="WxH", help="image size (default: 128x128)")
    parser.add_argument("--steps", type=int, default=5, help="decoding steps (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=8, help="perco batch --batch-size (default: %(default)s)")
    parser.add_argument("--actors", type=_counts, default=[1, 2], metavar="N,N", help="actor counts (default: 1,2)")
    parser.add_argument("--repeats", type=int, default=3, help="repeats of everything (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--model", default=None, metavar="DIR",
                        help="a model folder to measure instead of the tiny model (made in a temporary folder)")
    parser.add_argument("--out", default="benchmarks/results/scale_batch", help="JSON + markdown path, no suffix")
    args = parser.parse_args(argv)
    if args.images < 1 or args.repeats < 1 or args.steps < 1 or args.batch_size < 1:
        parser.error("--images, --repeats, --steps and --batch-size must be positive")
    result = run(args)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    command = "python -m perco.benchmarks.scale_batch " + " ".join(argv if argv is not None else sys.argv[1:])
    text = markdown(result, command.strip())
    out.with_suffix(".md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
