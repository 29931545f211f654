"""`perco evaluate`: rate and quality of one or more models on a folder of images, on the batch machinery.

For each `--model`, inside one Ray session: `run_job("compress", ...)` writes the bitstreams and
`run_job("decompress", ...)` the decoded PNGs into REPORT/work/ (so a rerun resumes), then the driver
compares every (original, decoded) pair: bits per pixel (bitstream bytes * 8 / (width * height)), PSNR,
MS-SSIM, LPIPS, CLIP score of the decoded image against its caption, and FID / KID of the decoded set
against the originals (perco.scale.metrics, torchmetrics). A failed image is listed in the report and
never stops the run. The report: REPORT/report.json, REPORT/report.md and REPORT/rate_metrics.png.

    perco evaluate --images kodak/ --captions captions.tsv -o eval-report/ \\
        --model perco-sd-0.0313 --model perco-sd-0.1250 --metrics-models metrics-models/

Ray, torch and torchmetrics are imported inside the handler only, so `perco --help` stays fast.
docs/evaluate.md.
"""

import hashlib
import json
import math
import platform
import sys
import time
from pathlib import Path

from perco.engine.errors import OutputError, PercoError, UsageError
from perco.scale.batch import read_captions  # one captions format for both verbs

REPORT_JSON, REPORT_MD, REPORT_PLOT = "report.json", "report.md", "rate_metrics.png"
WORK = "work"
REPORT_VERSION = 1
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff", ".ppm")
ALIASES = {"clip": "clip_score", "msssim": "ms_ssim", "ms-ssim": "ms_ssim"}
LABELS = {"psnr": "PSNR (dB)", "ms_ssim": "MS-SSIM", "lpips": "LPIPS", "fid": "FID", "kid": "KID",
          "clip_score": "CLIP score"}
MAX_MARKDOWN_IMAGES = 100  # per-image rows in report.md up to this many images (report.json always has them all)


# --- inputs ---------------------------------------------------------------------------------------------------


def list_images(folder) -> list:
    """The images of `folder` (not its subfolders), sorted by name; one stem per image (the work files are named
    after it)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise PercoError(f"image folder {folder} does not exist" if not folder.exists()
                         else f"--images {folder} is not a folder")
    images = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not images:
        raise PercoError(f"folder {folder} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    stems = {}
    for path in images:
        if path.stem in stems:
            raise PercoError(f"images {stems[path.stem].name} and {path.name} share the name {path.stem!r}: "
                             "rename one (bitstreams and decoded images are named after it)")
        stems[path.stem] = path
    return images


def match_captions(images: list, captions: dict) -> tuple:
    """({file name: caption} for every image (empty where the file names none), [names without one],
    [caption names matching no image])."""
    out, missing, used = {}, [], set()
    for path in images:
        for key in (path.name, path.stem):
            if key in captions:
                out[path.name] = captions[key]
                used.add(key)
                break
        else:
            out[path.name] = ""
            missing.append(path.name)
    return out, missing, sorted(set(captions) - used)


def choose_metrics(requested, reasons: dict) -> tuple:
    """(metrics to compute, {metric: reason} of those left out). `requested` None: every available metric;
    a list: exactly those, and any unavailable one is an error."""
    from perco.scale.metrics import METRICS

    if requested is None:
        return [m for m in METRICS if reasons[m] is None], {m: r for m, r in reasons.items() if r is not None}
    chosen = []
    for name in requested:
        name = ALIASES.get(name, name)
        if name not in METRICS:
            raise UsageError(f"unknown metric {name!r}: choose from {', '.join(METRICS)}")
        if reasons[name] is not None:
            raise PercoError(f"metric {name} was asked for but is unavailable: {reasons[name]}")
        if name not in chosen:
            chosen.append(name)
    return chosen, {}


def _metrics_list(text: str) -> list:
    names = [n.strip().lower() for n in text.split(",") if n.strip()]
    if not names:
        raise UsageError("--metrics needs a comma-separated list, e.g. psnr,ms_ssim,fid")
    return names


def _digest(value) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:10]


def _work_folders(work: Path, model, spec, captions: dict, seed: int, steps, backend) -> tuple:
    """(bitstreams, decoded) folders of one model: named after what their files depend on, so a rerun with other
    captions, seed, steps or backend never reuses files made with the old ones."""
    base = work / f"{Path(model).name}-{spec.fingerprint[:4].hex()}"
    coded = _digest({"seed": seed, "captions": captions})
    return (base / f"bitstreams-{coded}",
            base / f"decoded-{_digest({'bitstreams': coded, 'steps': steps, 'backend': backend})}")


# --- the run --------------------------------------------------------------------------------------------------


def evaluate(images, output, models=None, *, captions=None, metrics_models=None, metrics=None, backend=None,
             address=None, actors=None, steps=None, seed=0, batch_size=8, device=None, progress=False) -> dict:
    """Evaluate `models` (model folders; None: the bundled tiny model) on the image folder `images`; write the
    report into the folder `output` (report.json, report.md, rate_metrics.png, work/) and return it.

    captions: {image file name or stem: caption} (images without one get the empty caption); metrics_models:
    the metric networks' folder (docs/evaluate.md); metrics: the metric names to compute (None: every available
    one; a named metric that is unavailable is an error); steps: decoding steps (None: the model's default)."""
    from perco.engine.model import ModelInfo
    from perco.scale import metrics as m

    start = time.perf_counter()
    paths = list_images(images)
    caption_map, uncaptioned, unmatched = match_captions(paths, captions or {})
    reasons = m.availability(metrics_models)
    chosen, unavailable = choose_metrics(metrics, reasons)
    m.require_torchmetrics()
    _check_report_folder(output)
    if not models:
        from perco.engine.demo import default_model

        models = [str(default_model(progress=progress))]
    specs = [ModelInfo.open(model).spec for model in models]  # a missing or broken model fails before any work
    device = _device(device)
    suite = _open_suite(m, chosen, metrics_models, device, seed)  # broken networks fail before any coding
    report_dir = _report_folder(output)
    from perco.scale.batch import ray_session, run_job

    stand_ins = m.stand_ins(metrics_models)
    if progress:
        for reason in dict.fromkeys(unavailable.values()):
            names = ", ".join(n for n, r in unavailable.items() if r == reason)
            print(f"warning: not computed: {names}: {reason}", file=sys.stderr)
        if stand_ins:
            print(f"warning: {m.STAND_IN_WARNING}", file=sys.stderr)
    runs = []
    with ray_session(address):
        for model, spec in zip(models, specs):
            coded, decoded = _work_folders(report_dir / WORK, model, spec, caption_map, seed, steps, backend)
            jobs = {}
            common = dict(model=str(model), backend=backend, address=address, actors=actors, batch_size=batch_size,
                          seed=seed, progress=progress)
            jobs["compress"] = run_job("compress", [str(p) for p in paths], coded, report=coded.parent /
                                       f"{coded.name}.json", captions=caption_map, **common)
            streams = [coded / f"{p.stem}.perco" for p in paths if (coded / f"{p.stem}.perco").is_file()]
            if streams:
                jobs["decompress"] = run_job("decompress", [str(s) for s in streams], decoded,
                                             report=decoded.parent / f"{decoded.name}.json",
                                             decode_options={"steps": steps}, **common)
            runs.append({"model": str(model), "spec": spec, "coded": coded, "decoded": decoded, "jobs": jobs})
    results = []
    for number, run in enumerate(runs):
        results.append(_score_model(run, paths, caption_map, suite, first=number == 0, progress=progress))
        suite.next_model()
    report = {
        "perco_evaluate": REPORT_VERSION,
        "warning": m.STAND_IN_WARNING if stand_ins else None,
        "images": {"folder": str(images), "count": len(paths)},
        "captions": {"with_caption": len(paths) - len(uncaptioned), "without_caption": uncaptioned,
                     "unmatched_names": unmatched,
                     "note": (f"{len(uncaptioned)} of {len(paths)} images have no caption: they were compressed "
                              "with the empty caption and their CLIP score is against the empty caption")
                     if uncaptioned else None},
        "metrics": {"computed": chosen, "unavailable": unavailable,
                    "folder": str(metrics_models) if metrics_models is not None else None, "stand_ins": stand_ins,
                    "device": device},
        "settings": {"backend": backend, "steps": steps, "seed": seed, "batch_size": batch_size, "address": address,
                     "actors": actors},
        "models": results,
        "environment": _environment(),
        "seconds": time.perf_counter() - start,
    }
    write_report(report_dir, report)
    return report


def _check_report_folder(output) -> Path:
    folder = Path(output)
    if folder.exists() and not folder.is_dir():
        raise OutputError(f"report folder {folder} is a file: -o names a folder (report.json, report.md, "
                          f"{REPORT_PLOT}, work/)")
    return folder


def _report_folder(output) -> Path:
    folder = _check_report_folder(output)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"cannot create report folder {folder}: {exc.strerror or exc}") from None
    return folder


def _device(device) -> str:
    """--device, else cuda when torch sees a GPU, else cpu; cuda without a GPU is an error."""
    import torch

    if device is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise PercoError("--device cuda: torch sees no CUDA GPU here (use --device cpu)")
    return device


def _open_suite(m, chosen: list, folder, device: str, seed: int):
    """The MetricSuite; a network file that exists but does not load is one line naming the folder."""
    try:
        return m.MetricSuite(chosen, folder, device=device, seed=seed)
    except PercoError:
        raise
    except Exception as exc:  # noqa: BLE001 - torch.jit.load / from_pretrained on a broken file: one line
        lines = str(exc).strip().splitlines()
        detail = " ".join(lines[0].split())[:300] if lines else type(exc).__name__
        raise PercoError(f"cannot load the metric networks of {folder} ({', '.join(chosen)}): "
                         f"{type(exc).__name__}: {detail}") from None


def _score_model(run: dict, paths: list, captions: dict, suite, first: bool, progress: bool) -> dict:
    """One model's per-image rows, failures and summary (the metrics on the driver, image by image)."""
    from perco.engine.imageio import load_image

    failed = {}
    for verb, job in run["jobs"].items():
        for entry in job["failed"]:
            failed[Path(entry["input"]).stem] = {"image": None, "stage": verb, "error": entry["error"]}
    rows, bpps = [], []
    for path in paths:
        try:
            original = load_image(path)
        except PercoError as exc:
            original = None
            failed.setdefault(path.stem, {"image": None, "stage": "read", "error": str(exc)})
        if original is not None and first:
            suite.add_real(original)
        if path.stem in failed:
            failed[path.stem]["image"] = path.name
            continue
        stream, decoded_path = run["coded"] / f"{path.stem}.perco", run["decoded"] / f"{path.stem}.png"
        if not decoded_path.is_file():
            failed[path.stem] = {"image": path.name, "stage": "decompress", "error": f"{decoded_path} was not written"}
            continue
        h, w = original.shape[:2]
        size = stream.stat().st_size
        row = {"image": path.name, "width": w, "height": h, "bytes": size, "bpp": size * 8 / (w * h),
               "caption": captions[path.name]}
        try:
            row.update(suite.add_pair(original, load_image(decoded_path), captions[path.name]))
        except PercoError as exc:
            failed[path.stem] = {"image": path.name, "stage": "metrics", "error": str(exc)}
            continue
        except Exception as exc:  # noqa: BLE001 - recorded, the run goes on
            detail = " ".join(str(exc).split())[:300]
            failed[path.stem] = {"image": path.name, "stage": "metrics",
                                 "error": f"internal error ({type(exc).__name__}: {detail})"}
            continue
        rows.append(row)
        bpps.append(row["bpp"])
    summary = suite.summary()
    notes = summary.pop("notes", {})
    identical = sum(1 for r in rows if r.get("identical"))
    if identical and "psnr" in suite.names:
        notes["psnr_identical"] = (f"{identical} decoded images equal their originals (infinite PSNR): per-image "
                                   "psnr is null and the mean is over the others")
    spec = run["spec"]
    result = {
        "model": run["model"], "family": spec.family, "fingerprint": spec.fingerprint.hex(),
        "nominal_bpp": spec.rate.nominal_bpp,
        "bpp": {"mean": sum(bpps) / len(bpps) if bpps else None, "min": min(bpps, default=None),
                "max": max(bpps, default=None)},
        "metrics": summary, "notes": notes, "images_scored": len(rows),
        "failed": sorted(failed.values(), key=lambda f: f["image"] or ""),
        "jobs": {verb: {k: job.get(k) for k in ("seconds", "items_per_second", "actors", "backend")}
                 | {"done": len(job["done"]), "skipped": len(job["skipped"]), "failed": len(job["failed"])}
                 for verb, job in run["jobs"].items()},
        "work": {"bitstreams": str(run["coded"]), "decoded": str(run["decoded"])},
        "images": rows,
    }
    if progress:
        print(f"{run['model']}: {len(rows)} images scored, {len(failed)} failed, bpp "
              f"{_fmt(result['bpp']['mean'], 4)}", file=sys.stderr)
    return result


def _environment() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    versions = {}
    for name in ("perco-engine", "torch", "torchmetrics", "transformers", "ray", "torchvision"):
        try:
            versions[name] = version(name)
        except PackageNotFoundError:
            versions[name] = None
    return {"python": platform.python_version(), "platform": platform.platform(), "host": platform.node(),
            "versions": versions}


# --- the report -----------------------------------------------------------------------------------------------


def write_report(folder: Path, report: dict) -> None:
    """report.json, report.md and rate_metrics.png into `folder`, each written atomically."""
    from perco.engine.files import atomic_write

    try:
        image = plot(report)
        report["plot"] = {"file": REPORT_PLOT, "note": None}
    except ImportError:  # the plot needs matplotlib; the JSON and markdown are the results
        image = None
        report["plot"] = {"file": None, "note": "no plot: matplotlib is not installed (pip install matplotlib)"}
    report = _finite(report)
    try:
        atomic_write(folder / REPORT_JSON, (json.dumps(report, indent=1, allow_nan=False) + "\n").encode())
        atomic_write(folder / REPORT_MD, markdown(report).encode())
        if image is not None:
            atomic_write(folder / REPORT_PLOT, image)
    except OSError as exc:
        raise OutputError(f"cannot write the report into {folder}: {exc.strerror or exc}") from None


def _finite(value):
    """The report with every non-finite float as None (standard JSON; the metrics note why a value is missing)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


def _fmt(value, digits=3) -> str:
    if value is None:
        return "-"
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return f"{value:.{digits}f}"


def _metric_cell(metrics: dict, name: str) -> str:
    if name == "kid" and metrics.get("kid") is not None:
        return f"{metrics['kid']:.5f} ± {metrics.get('kid_std', 0.0):.5f}"
    return _fmt(metrics.get(name), 4 if name in ("ms_ssim", "lpips", "bpp") else 3)


def markdown(report: dict) -> str:
    """The human-readable report: warnings first, one row per model, failures, per-image rows (small runs)."""
    from perco.scale.metrics import HIGHER_IS_BETTER

    lines = ["# perco evaluate", ""]
    if report["warning"]:
        lines += [f"> **WARNING: {report['warning']}**", ""]
    images, captions = report["images"], report["captions"]
    lines.append(f"{images['count']} images from `{images['folder']}`; {captions['with_caption']} with a caption.")
    if captions["note"]:
        lines.append(f"Note: {captions['note']}.")
    if captions["unmatched_names"]:
        lines.append(f"Note: {len(captions['unmatched_names'])} caption names match no image.")
    metrics = report["metrics"]
    for name, reason in metrics["unavailable"].items():
        lines.append(f"- **{name} unavailable**: {reason}")
    computed = metrics["computed"]
    lines += ["", "| model | bpp | " + " | ".join(f"{LABELS[n]} {'↑' if HIGHER_IS_BETTER[n] else '↓'}"
                                                   for n in computed) + " | scored | failed |",
              "|---|---|" + "---|" * len(computed) + "---|---|"]
    for result in report["models"]:
        lines.append(f"| `{Path(result['model']).name}` | {_fmt(result['bpp']['mean'], 4)} | "
                     + " | ".join(_metric_cell(result["metrics"], n) for n in computed)
                     + f" | {result['images_scored']} | {len(result['failed'])} |")
    for result in report["models"]:
        name = Path(result["model"]).name
        for key, note in result["notes"].items():
            lines.append(f"- `{name}` {key}: {note}")
        for failure in result["failed"]:
            lines.append(f"- `{name}` **failed** {failure['image']} ({failure['stage']}): {failure['error']}")
    settings = report["settings"]
    lines += ["", f"Settings: backend {settings['backend'] or 'default'}, steps {settings['steps'] or 'default'}, "
                  f"seed {settings['seed']}; metrics on {metrics['device']}; {report['seconds']:.1f} s. "
                  f"Plot: {'`' + REPORT_PLOT + '`' if report['plot']['file'] else report['plot']['note']}; every "
                  f"value and image: `{REPORT_JSON}`."]
    if images["count"] <= MAX_MARKDOWN_IMAGES:
        per_image = [n for n in computed if n in ("psnr", "ms_ssim", "lpips", "clip_score")]
        for result in report["models"]:
            lines += ["", f"## `{Path(result['model']).name}` per image", "",
                      "| image | size | bytes | bpp | " + " | ".join(LABELS[n] for n in per_image) + " |",
                      "|---|---|---|---|" + "---|" * len(per_image)]
            for row in result["images"]:
                cells = ["inf" if n == "psnr" and row.get("identical") else _metric_cell(row, n) for n in per_image]
                lines.append(f"| {row['image']} | {row['width']}x{row['height']} | {row['bytes']} | "
                             f"{row['bpp']:.4f} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(report: dict) -> bytes:
    """PNG bytes: one panel per computed metric, rate (mean bpp) on x, one point per model, labeled."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = report["metrics"]["computed"] or ["(no metric)"]
    cols = min(3, len(names))
    rows = -(-len(names) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.4 * rows), squeeze=False)
    for ax, name in zip(axes.flat, names):
        points = [(r["bpp"]["mean"], r["metrics"].get(name), Path(r["model"]).name) for r in report["models"]]
        points = sorted((x, y, label) for x, y, label in points if x is not None and y is not None)
        if points:
            ax.plot([p[0] for p in points], [p[1] for p in points], "o-")
            for x, y, label in points:
                ax.annotate(label, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
        else:
            ax.text(0.5, 0.5, "no value", ha="center", va="center", transform=ax.transAxes)
        ax.set_xlabel("bits per pixel")
        ax.set_ylabel(LABELS.get(name, name))
        ax.grid(True, alpha=0.3)
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    title = "perco evaluate: rate vs metric"
    if report["warning"]:
        title += f"\n{report['warning'].upper()}"
    fig.suptitle(title, fontsize=9, color="red" if report["warning"] else "black")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    return buffer.getvalue()


# --- CLI ------------------------------------------------------------------------------------------------------


def add_commands(sub) -> dict:
    """`perco evaluate`; returns {verb: handler}."""
    from perco.engine import cli
    from perco.engine.backends import available

    p = sub.add_parser("evaluate", help="rate and quality (bpp, FID, KID, LPIPS, PSNR, MS-SSIM, CLIP) of models",
                       description="Compress and decompress every image of a folder with each --model (Ray batch "
                                   "jobs), then report bits per pixel and FID, KID, LPIPS, PSNR, MS-SSIM and CLIP "
                                   "score as JSON, markdown and a rate-vs-metric plot. Metric networks load from "
                                   "--metrics-models only. docs/evaluate.md")
    p.add_argument("--images", required=True, metavar="DIR", help="folder of images (not its subfolders)")
    p.add_argument("--captions", default=None, metavar="FILE",
                   help="a JSON object {image file name: caption} or TSV lines 'name<TAB>caption'; images without "
                        "one get the empty caption")
    p.add_argument("-o", "--output", required=True, metavar="REPORT",
                   help=f"report folder (made if missing): {REPORT_JSON}, {REPORT_MD}, {REPORT_PLOT}, and {WORK}/ "
                        "with the bitstreams and decoded images (a rerun resumes from them)")
    p.add_argument("--model", action="append", default=None, metavar="DIR",
                   help="model folder; repeat for several rates (one point per model). Default: the bundled tiny "
                        "model")
    p.add_argument("--backend", default=None, choices=available(), help="network backend (default: torch)")
    p.add_argument("--metrics-models", default=None, metavar="DIR",
                   help="the metric networks: inception-2015-12-05.pt, clip/, torch/hub/checkpoints/ "
                        "(docs/evaluate.md); without it only PSNR and MS-SSIM are computed")
    p.add_argument("--metrics", type=_metrics_list, default=None, metavar="LIST",
                   help="compute exactly these (comma-separated: psnr,ms_ssim,lpips,fid,kid,clip_score); one that "
                        "is unavailable is an error. Default: every available metric")
    p.add_argument("--steps", type=cli.positive_int, default=None, metavar="N",
                   help="denoising steps (default: the bitstream's hint, else the model's)")
    p.add_argument("--seed", type=cli.uint64, default=0, metavar="N", help="decoder noise seed (default: 0)")
    p.add_argument("--address", default=None, metavar="ray://HOST:PORT|auto|local",
                   help="Ray cluster (default: a new local cluster on this machine)")
    p.add_argument("--actors", type=cli.positive_int, default=None, metavar="N",
                   help="codec actors (default: one per GPU, else one per node)")
    p.add_argument("--batch-size", type=cli.positive_int, default=8, metavar="N",
                   help="images of one size per actor call (default: %(default)s)")
    p.add_argument("--device", default=None, choices=["cpu", "cuda"],
                   help="where the metric networks run (default: cuda when torch sees a GPU, else cpu)")
    cli.quiet_arg(p)
    return {"evaluate": cmd_evaluate}


def cmd_evaluate(args) -> None:
    captions = read_captions(args.captions) if args.captions else None
    report = evaluate(args.images, args.output, args.model, captions=captions, metrics_models=args.metrics_models,
                      metrics=args.metrics, backend=args.backend, address=args.address, actors=args.actors,
                      steps=args.steps, seed=args.seed, batch_size=args.batch_size, device=args.device,
                      progress=not args.quiet)
    if not args.quiet:
        out = Path(args.output)
        for result in report["models"]:
            values = ", ".join(f"{n} {_metric_cell(result['metrics'], n)}" for n in report["metrics"]["computed"])
            print(f"{Path(result['model']).name}: bpp {_fmt(result['bpp']['mean'], 4)}; {values}; "
                  f"{len(result['failed'])} failed")
        print(f"report: {out / REPORT_JSON}, {out / REPORT_MD}, {out / REPORT_PLOT}", file=sys.stderr)
        if report["warning"]:
            print(f"warning: {report['warning']}", file=sys.stderr)
    failures = [(Path(r["model"]).name, f) for r in report["models"] for f in r["failed"]]
    if failures:  # the report is complete; the exit code says that not every image made it
        name, first = failures[0]
        raise PercoError(f"{len(failures)} image evaluations failed (first: {name} {first['image']} at "
                         f"{first['stage']}: {first['error']}); all in {Path(args.output) / REPORT_JSON}")
