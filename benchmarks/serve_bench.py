"""`perco serve` (Ray Serve, batched) against `Codec.decompress` in the same process, on the tiny model.

    python -m perco.benchmarks.serve_bench --out benchmarks/results/serve_bench
        [--requests 64] [--concurrency 1,4,16] [--size 256x256] [--steps 4] [--max-batch 8] [--batch-wait-ms 10]

A tiny random-weight model is written with `perco init-tiny` into a temporary folder. The same
bitstreams (one image size, a seed each) are decoded three ways, one after another in this run:
directly with `Codec.decompress` one by one (the reference), directly with `decompress_batch` in
batches of --max-batch (the most batching can give), and through a local Ray Serve deployment over
HTTP on 127.0.0.1 at each concurrency (client threads, one keep-alive connection each, after a
warm-up of as many requests). Latencies are per request (p50, p99); throughput is requests over
the wall time of the whole round; "x direct" is throughput over the one-by-one direct throughput.
The replica gets every core (--replica-cpus, default all), as the direct codec does. The machine
(CPU model, cores, load average before and after) is recorded: a loaded machine's numbers are
marked as such in the markdown. Writes OUT.json and OUT.md.
"""

import argparse
import http.client
import json
import os
import platform
import shlex
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from perco.benchmarks.harness import size_type

LOADED = 0.25  # load average (1 min) per core before the run above which the markdown flags the machine


def percentile_ms(latencies: list, q: float) -> float:
    return float(np.percentile(np.asarray(latencies) * 1000, q)) if latencies else float("nan")


def summarize(latencies: list, wall_s: float, requests: int) -> dict:
    """p50/p99 latency (ms) and throughput (requests/s) of one round."""
    return {"requests": requests, "p50_ms": percentile_ms(latencies, 50), "p99_ms": percentile_ms(latencies, 99),
            "mean_ms": float(np.mean(latencies) * 1000) if latencies else float("nan"),
            "throughput_rps": requests / wall_s if wall_s > 0 else float("nan"), "wall_s": wall_s}


def post(conn: http.client.HTTPConnection, path: str, body: bytes) -> tuple:
    """(status, lower-cased headers, body) of one POST on a keep-alive connection."""
    conn.request("POST", path, body=body, headers={"Content-Type": "application/octet-stream"})
    response = conn.getresponse()
    data = response.read()
    return response.status, {k.lower(): v for k, v in response.getheaders()}, data


def load(host: str, port: int, bodies: list, concurrency: int, requests: int, path: str = "/decode",
         timeout_s: float = 300.0) -> dict:
    """`requests` POSTs of `bodies` (round robin) from `concurrency` threads; per-request latency, status and batch.

    Every request has a socket timeout of timeout_s, so a round always ends; a request that fails
    to connect or times out counts with status 0.
    """
    counter = iter(range(requests))
    lock = threading.Lock()
    records = []

    def worker():
        conn = http.client.HTTPConnection(host, port, timeout=timeout_s)
        try:
            while True:
                with lock:
                    i = next(counter, None)
                if i is None:
                    return
                start = time.perf_counter()
                try:
                    status, headers, _ = post(conn, path, bodies[i % len(bodies)])
                except (OSError, http.client.HTTPException):
                    conn.close()
                    conn = http.client.HTTPConnection(host, port, timeout=timeout_s)
                    status, headers = 0, {}
                elapsed = time.perf_counter() - start
                with lock:
                    records.append((elapsed, status, int(headers.get("x-perco-batch-size", 0)),
                                    float(headers.get("x-perco-queue-ms", "nan"))))
        finally:
            conn.close()

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(concurrency)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout_s * (requests + 1))
    wall = time.perf_counter() - start
    ok = [r for r in records if r[1] == 200]
    row = summarize([r[0] for r in ok], wall, len(ok))
    statuses = {}
    for r in records:
        statuses[str(r[1])] = statuses.get(str(r[1]), 0) + 1
    row.update(concurrency=concurrency, statuses=statuses,
               mean_batch=float(np.mean([r[2] for r in ok])) if ok else float("nan"),
               max_batch_seen=max((r[2] for r in ok), default=0),
               queue_p50_ms=float(np.nanmedian([r[3] for r in ok])) if ok else float("nan"))
    return row


def direct(codec, bodies: list, requests: int, steps: int, batch: int) -> list:
    """The reference rows: decompress one by one, and decompress_batch in batches of `batch` (warmed up first)."""
    for data in bodies[:3]:
        codec.decompress(data, steps=steps)
    codec.decompress_batch(bodies[:batch], steps=steps)
    latencies = []
    start = time.perf_counter()
    for i in range(requests):
        t = time.perf_counter()
        codec.decompress(bodies[i % len(bodies)], steps=steps)
        latencies.append(time.perf_counter() - t)
    one = summarize(latencies, time.perf_counter() - start, requests)
    latencies, sizes = [], []
    start = time.perf_counter()
    while len(latencies) < requests:
        n = min(batch, requests - len(latencies))
        t = time.perf_counter()
        codec.decompress_batch([bodies[(len(latencies) + k) % len(bodies)] for k in range(n)], steps=steps)
        latencies += [time.perf_counter() - t] * n  # every image of a batch waits for the whole batch
        sizes += [n] * n
    batched = summarize(latencies, time.perf_counter() - start, requests)
    return [{"mode": "direct decompress", "concurrency": 1, "mean_batch": 1.0, **one},
            {"mode": f"direct decompress_batch({batch})", "concurrency": 1, "mean_batch": float(np.mean(sizes)),
             **batched}]


def machine(loadavg_before: tuple) -> dict:
    from importlib.metadata import PackageNotFoundError, version

    info = {"platform": platform.platform(), "machine": platform.machine(), "cores": os.cpu_count(),
            "cores_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
            "python": platform.python_version(), "loadavg_before": [round(x, 2) for x in loadavg_before]}
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            info["cpu"] = next(line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name"))
    except (OSError, StopIteration):
        info["cpu"] = platform.processor() or "unknown"
    if "torch" in sys.modules:
        info["torch_threads_direct"] = sys.modules["torch"].get_num_threads()
    for package in ("ray", "torch", "numpy"):
        try:
            info[package] = version(package)
        except PackageNotFoundError:
            pass
    return info


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def markdown(result: dict) -> str:
    m, c = result["machine"], result["config"]
    loaded = m["loadavg_before"][0] > LOADED * m["cores"]
    lines = [
        f"`perco serve` vs direct decoding (`{result['command']}`)",
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores ({m['cores_usable']} usable), {m['platform']}; Python {m['python']}, "
        f"Ray {m.get('ray', '?')}, torch {m.get('torch', '?')}. Load average (1, 5, 15 min) before "
        f"{m['loadavg_before']}, after {m['loadavg_after']}.",
    ]
    if loaded:
        lines += ["", f"**Measured on a loaded machine** (load {m['loadavg_before'][0]} on {m['cores']} cores before "
                      "the run): other work shared the cores; these numbers show the method, not this CPU's speed."]
    lines += [
        "",
        f"Tiny random-weight model (`perco init-tiny`, rate 0.0313), torch backend, {c['width']}x{c['height']}, "
        f"{c['steps']} steps, guidance 3.0; Serve: {c['replicas']} replica x {c['replica_cpus']:g} CPUs, "
        f"--max-batch {c['max_batch']}, --batch-wait-ms {c['batch_wait_ms']:g}, --max-queue {c['max_queue']}; "
        f"{c['requests']} requests per row after a warm-up.",
        "",
        "| mode | concurrency | p50 ms | p99 ms | throughput req/s | x direct | mean batch | statuses |",
        "|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    reference = result["rows"][0]["throughput_rps"]
    for r in result["rows"]:
        statuses = ", ".join(f"{k}: {v}" for k, v in sorted(r.get("statuses", {"200": r["requests"]}).items()))
        lines.append(f"| {r['mode']} | {r['concurrency']} | {r['p50_ms']:.1f} | {r['p99_ms']:.1f} | "
                     f"{r['throughput_rps']:.2f} | {r['throughput_rps'] / reference:.2f} | {r['mean_batch']:.2f} | "
                     f"{statuses} |")
    return "\n".join(lines) + "\n"


_size = size_type(1)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="benchmarks/results/serve_bench", help="OUT.json and OUT.md")
    parser.add_argument("--requests", type=int, default=64, help="requests per row (default: 64)")
    parser.add_argument("--concurrency", default="1,4,16", help="client threads per Serve row (default: 1,4,16)")
    parser.add_argument("--size", type=_size, default=(256, 256), metavar="WxH", help="image size (default: 256x256)")
    parser.add_argument("--steps", type=int, default=4, help="denoising steps (default: 4)")
    parser.add_argument("--max-batch", type=int, default=8)
    parser.add_argument("--batch-wait-ms", type=float, default=10.0)
    parser.add_argument("--max-queue", type=int, default=64, help="Serve's queue bound (default: 64, above every "
                                                                  "concurrency measured, so no 503)")
    parser.add_argument("--replica-cpus", type=float, default=float(os.cpu_count() or 1))
    args = parser.parse_args(argv)
    concurrencies = [int(c) for c in args.concurrency.split(",")]
    if args.requests < 1 or min(concurrencies) < 1:
        parser.error("--requests and every --concurrency must be positive")

    from perco.engine import Codec
    from perco.engine.cli import main as perco
    from perco.scale.serve import ServeOptions, deploy

    loadavg_before = os.getloadavg()  # before this run's own work (init-tiny, the codec) adds to it
    width, height = args.size
    with tempfile.TemporaryDirectory(prefix="perco-serve-bench-") as tmp:
        model = Path(tmp) / "tiny"
        if perco(["init-tiny", str(model)]) != 0:
            return 1
        codec = Codec.from_pretrained(model, backend="torch")
        info = machine(loadavg_before)  # after the codec: torch's thread count is known
        rng = np.random.default_rng(0)
        image = rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)
        bodies = [codec.compress(image, caption="a red barn on a green hill", seed=s) for s in range(16)]
        print(f"direct: {args.requests} decodes one by one, then in batches of {args.max_batch}", file=sys.stderr)
        rows = direct(codec, bodies, args.requests, args.steps, args.max_batch)
        codec.close()

        import logging

        import ray
        from ray import serve

        logging.getLogger("ray.serve").setLevel(logging.WARNING)

        options = ServeOptions(model=str(model), steps=args.steps, max_batch=args.max_batch,
                               batch_wait_ms=args.batch_wait_ms, max_queue=args.max_queue,
                               replica_cpus=args.replica_cpus)
        host, port = "127.0.0.1", free_port()
        ray.init(address="local", num_cpus=max(args.replica_cpus, os.cpu_count() or 1), include_dashboard=False,
                 logging_level="WARNING", log_to_driver=False)
        try:
            deploy(options, host, port)
            for c in concurrencies:
                print(f"serve: concurrency {c}", file=sys.stderr)
                load(host, port, bodies, c, c)  # warm-up: every client thread's first request
                row = load(host, port, bodies, c, args.requests)
                rows.append({"mode": "perco serve", **row})
        finally:
            serve.shutdown()
            ray.shutdown()
    info["loadavg_after"] = [round(x, 2) for x in os.getloadavg()]
    command = "python -m perco.benchmarks.serve_bench " + shlex.join(argv if argv is not None else sys.argv[1:])
    config = {"width": width, "height": height, "steps": args.steps, "requests": args.requests,
              "concurrency": concurrencies, "max_batch": args.max_batch, "batch_wait_ms": args.batch_wait_ms,
              "max_queue": args.max_queue, "replicas": 1, "replica_cpus": args.replica_cpus}
    result = {"command": command.strip(), "machine": info, "config": config, "rows": rows}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    out.with_suffix(".md").write_text(markdown(result))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
