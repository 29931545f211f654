"""`perco serve` end to end: the real command in a subprocess (a local Ray cluster and Serve), HTTP on 127.0.0.1.

One server for the module, started with small bounds so every behaviour shows quickly: batches of
up to 4 (so a replica holds 8 requests), a queue of 8 per proxy, a 200 ms batch window, decode
limit 256x256, 2 steps by default. Every wait is bounded (startup, each request's socket, the
shutdown). The last test stops the server with SIGTERM and checks a clean exit.
"""

import http.client
import io
import json
import os
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from PIL import Image

from conftest import random_image
from perco.engine.cli import MAX_BITSTREAM_BYTES, main

pytest.importorskip("ray.serve", reason="needs the scale extra")  # the test extra installs it: CI runs these

STARTUP_S = 240  # a loaded 2-core machine starts Ray, Serve and a torch replica in 30-60 s
REQUEST_S = 120
MAX_BATCH = 4
MAX_QUEUE = 8  # Serve counts a request as queued until a replica takes it: a burst of 8 must fit


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`perco serve` as a child process; stdout and stderr are drained by threads so it never blocks on a pipe."""

    def __init__(self, model, port: int):
        self.port = port
        cmd = [sys.executable, "-m", "perco.engine.cli", "serve", "--model", str(model), "--port", str(port),
               "--max-batch", str(MAX_BATCH), "--batch-wait-ms", "200", "--max-queue", str(MAX_QUEUE),
               "--max-pixels", "256x256", "--steps", "2"]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.lines = queue.Queue()
        self.stderr = []
        threading.Thread(target=self._drain, args=(self.proc.stdout, self.lines.put), daemon=True).start()
        threading.Thread(target=self._drain, args=(self.proc.stderr, self.stderr.append), daemon=True).start()

    @staticmethod
    def _drain(stream, put):
        for line in stream:
            put(line)

    def wait_ready(self) -> str:
        deadline = time.monotonic() + STARTUP_S
        while time.monotonic() < deadline:
            try:
                line = self.lines.get(timeout=1.0)
            except queue.Empty:
                if self.proc.poll() is not None:
                    break
                continue
            if "http://" in line:
                return line
        self.stop()
        raise AssertionError("perco serve did not start: " + "".join(self.stderr[-20:]))

    def stop(self, timeout: float = 90) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(30)
        return self.proc.returncode

    def request(self, method: str, path: str, body: bytes = None, headers=None) -> tuple:
        """(status, lower-cased headers, body bytes)."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=REQUEST_S)
        try:
            conn.request(method, path, body=body, headers=headers or {})
            response = conn.getresponse()
            return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
        finally:
            conn.close()

    def decode(self, data: bytes, query: str = "") -> tuple:
        return self.request("POST", "/decode" + query, data, {"Content-Type": "application/octet-stream"})


@pytest.fixture(scope="module")
def server(tiny_model):
    srv = Server(tiny_model, _free_port())
    srv.ready_line = srv.wait_ready()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def streams(codec):
    """Bitstreams of the tiny model: 96x64 and 64x64 with seeds 0..7, one at 128x128, one over the limit."""
    image = random_image(64, 96, seed=1)
    small = random_image(64, 64, seed=2)
    return {
        "96x64": [codec.compress(image, caption="a red barn on a green hill", seed=s) for s in range(8)],
        "64x64": [codec.compress(small, caption="a boat", seed=s) for s in range(8)],
        "128x128": codec.compress(random_image(128, 128, seed=3), caption="a river", seed=0),
        "320x320": codec.compress(random_image(320, 320, seed=4), seed=0),  # padded 320x320 > 256x256 pixels
    }


def _png(body: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(body)) as img:
        assert img.format == "PNG"
        return np.asarray(img.convert("RGB"))


def _server_timing(header: str) -> dict:
    out = {}
    for part in header.split(","):
        name, _, dur = part.strip().partition(";dur=")
        out[name] = float(dur)
    return out


def _close(a: np.ndarray, b: np.ndarray) -> None:
    """Decoded images agree up to decompress_batch's documented last-bit differences (another batch size, another
    thread count in the replica): at most 2 levels anywhere, under 1 % of the values off at all."""
    assert a.shape == b.shape
    diff = np.abs(a.astype(np.int16) - b.astype(np.int16))
    assert diff.max() <= 2, diff.max()
    assert np.count_nonzero(diff) <= 0.01 * diff.size, np.count_nonzero(diff)


def test_ready_line_and_health(server, tiny_model):
    from perco.engine.model import ModelInfo

    assert server.ready_line.strip().startswith(f"perco serve: http://127.0.0.1:{server.port} ")
    status, headers, body = server.request("GET", "/health")
    assert status == 200 and headers["content-type"].startswith("application/json")
    health = json.loads(body)
    spec = ModelInfo.open(tiny_model).spec
    assert health["status"] == "ok"
    assert health["family"] == "perco-sd" and health["fingerprint"] == spec.fingerprint.hex()
    assert health["backend"] == "torch"
    limits = health["limits"]
    assert limits["max_body_bytes"] == MAX_BITSTREAM_BYTES and limits["max_pixels"] == 256 * 256
    assert (limits["max_batch"], limits["max_ongoing_requests"], limits["max_queued_requests"]) == (4, 8, MAX_QUEUE)
    assert health["defaults"]["steps"] == 2


def test_decode_equals_in_process_decode(server, codec, streams):
    data = streams["96x64"][0]
    status, headers, body = server.decode(data)
    assert status == 200, body
    assert headers["content-type"] == "image/png"
    assert headers["x-perco-batch-size"] == "1" and headers["x-perco-steps"] == "2"
    assert headers["x-perco-image-size"] == "96x64" and headers["x-perco-guidance"] == "3"
    _close(_png(body), codec.decompress(data, steps=2))
    timing = _server_timing(headers["server-timing"])
    for stage in ("queue", "check", "entropy_decode", "text_encode", "denoise", "vae_decode", "png", "total"):
        assert stage in timing and timing[stage] >= 0, (stage, timing)
    assert timing["total"] >= timing["denoise"] and float(headers["x-perco-queue-ms"]) == timing["queue"]


def test_query_parameters_override_the_defaults(server, codec, streams):
    data = streams["96x64"][1]
    status, headers, body = server.decode(data, "?steps=1&guidance=1.5")
    assert status == 200, body
    assert headers["x-perco-steps"] == "1" and headers["x-perco-guidance"] == "1.5"
    _close(_png(body), codec.decompress(data, steps=1, guidance=1.5))


@pytest.mark.parametrize("query, message", [
    ("?steps=0", "steps must be an integer in 1..100"),
    ("?steps=abc", "steps must be an integer"),
    ("?steps=101", "steps must be an integer in 1..100"),
    ("?guidance=nan", "guidance must be a finite number"),
    ("?guidance=51", "guidance must be a finite number in 0..50"),
    ("?seed=3", "unknown query parameter 'seed'"),
])
def test_bad_query_parameters_get_400(server, streams, query, message):
    status, _, body = server.decode(streams["96x64"][0], query)
    assert status == 400 and body.decode().startswith(f"error: {message}"), body


def test_bad_and_foreign_bitstreams_fail_alone(server, codec, streams, other_seed_model):
    from perco.engine import Codec

    good = streams["96x64"][2]
    status, headers, body = server.decode(b"not a bitstream")
    text = body.decode()
    assert status == 400 and text == "error: not a PerCo Engine bitstream (bad magic byte)\n", text
    assert headers["content-type"].startswith("text/plain")
    status, _, body = server.decode(good[:-3])
    assert status == 400 and body.decode().startswith("error: corrupt or truncated bitstream"), body
    status, _, body = server.decode(b"")
    assert status == 400 and body.decode().startswith("error: empty request body"), body

    with Codec.from_pretrained(other_seed_model, backend="torch") as other:
        foreign = other.compress(random_image(64, 96, seed=1), caption="a red barn", seed=0)
    status, _, body = server.decode(foreign)
    assert status == 409 and "bitstream was made for model" in body.decode(), body
    assert body.decode().count("\n") == 1

    status, _, body = server.decode(streams["320x320"])
    assert status == 422 and body.decode().startswith("error: image 320x320"), body

    status, headers, body = server.decode(good)  # the server is unharmed
    assert status == 200, body
    _close(_png(body), codec.decompress(good, steps=2))


def test_body_over_the_largest_bitstream_gets_413(server):
    status, _, body = server.request("POST", "/decode", b"\xb1" * 16,
                                     {"Content-Length": str(MAX_BITSTREAM_BYTES + 1)})
    assert status == 413 and body.decode().startswith("error: request body over 16 MiB"), body


def test_routes_and_methods(server):
    status, headers, body = server.request("GET", "/decode")
    assert status == 405 and headers["allow"] == "POST", body
    status, _, body = server.request("GET", "/nowhere")
    assert status == 404 and body.decode().startswith("error: no route /nowhere"), body


def _burst(server, bodies: list, query: str = "") -> list:
    """Every body POSTed at once from its own thread (a barrier lines them up); [(status, headers, body, seconds)]."""
    barrier = threading.Barrier(len(bodies), timeout=60)

    def one(data):
        barrier.wait()
        start = time.perf_counter()
        status, headers, body = server.decode(data, query)
        return status, headers, body, time.perf_counter() - start

    with ThreadPoolExecutor(len(bodies)) as pool:
        return list(pool.map(one, bodies, timeout=REQUEST_S + 60))


def test_concurrent_requests_of_one_size_are_batched(server, codec, streams):
    bodies = streams["96x64"]  # 8 requests: what one replica holds at --max-batch 4
    results = _burst(server, bodies)
    assert [r[0] for r in results] == [200] * len(bodies), [r[2][:80] for r in results]
    batch_sizes = [int(r[1]["x-perco-batch-size"]) for r in results]
    assert max(batch_sizes) > 1 and max(batch_sizes) <= MAX_BATCH, batch_sizes
    expected = codec.decompress_batch(bodies[:4], steps=2) + codec.decompress_batch(bodies[4:], steps=2)
    for (_, _, body, _), want in zip(results, expected):
        _close(_png(body), want)


def test_mixed_sizes_are_decoded_in_their_own_groups(server, codec, streams):
    bodies = streams["96x64"][:4] + streams["64x64"][:4]
    order = [0, 4, 1, 5, 2, 6, 3, 7]  # interleaved, so batches hold both sizes
    results = _burst(server, [bodies[i] for i in order])
    assert [r[0] for r in results] == [200] * 8, [r[2][:80] for r in results]
    for i, (_, headers, body, _) in zip(order, results):
        image = _png(body)
        assert headers["x-perco-image-size"] == ("96x64" if i < 4 else "64x64")
        assert image.shape == ((64, 96, 3) if i < 4 else (64, 64, 3))
        _close(image, codec.decompress(bodies[i], steps=2))


def test_overload_gets_503_quickly_and_the_server_recovers(server, codec, streams):
    # 48 slow requests (128x128, 20 steps) at once: the replica holds 8, the proxy queues 8, the rest must be
    # refused at once (a few more slip in: Serve's queue count lags, up to 10 extra seen on this 2-core machine,
    # and some as the first finish), and every accepted one must finish
    burst = 48
    results = _burst(server, [streams["128x128"]] * burst, "?steps=20")
    statuses = [r[0] for r in results]
    assert set(statuses) <= {200, 503}, statuses
    assert statuses.count(200) >= 1 and statuses.count(503) >= (burst - 2 * MAX_BATCH - MAX_QUEUE) // 2, statuses
    assert all(r[2].startswith(b"Request dropped due to backpressure") for r in results if r[0] == 503)
    slowest_ok = max(r[3] for r in results if r[0] == 200)
    fastest_refusal = min(r[3] for r in results if r[0] == 503)
    assert fastest_refusal < slowest_ok, (fastest_refusal, slowest_ok)
    status, _, _ = server.request("GET", "/health")
    assert status == 200
    data = streams["96x64"][3]
    status, _, body = server.decode(data)
    assert status == 200, body
    _close(_png(body), codec.decompress(data, steps=2))


def test_bench_rows_against_the_server(server, codec, streams):
    from perco.benchmarks.serve_bench import direct, load, markdown

    row = load("127.0.0.1", server.port, streams["96x64"][:2], concurrency=2, requests=4)
    assert row["statuses"] == {"200": 4} and row["requests"] == 4
    assert 0 < row["p50_ms"] <= row["p99_ms"] and row["throughput_rps"] > 0 and row["mean_batch"] >= 1
    one, batched = direct(codec, streams["64x64"][:3], requests=3, steps=1, batch=2)
    assert one["requests"] == batched["requests"] == 3 and batched["mean_batch"] == pytest.approx(5 / 3)
    assert 0 < one["p50_ms"] <= one["p99_ms"] and batched["throughput_rps"] > 0
    machine = {"cpu": "test", "cores": 2, "cores_usable": 2, "platform": "linux", "python": "3", "ray": "2",
               "torch": "2", "loadavg_before": [1.5, 1.0, 1.0], "loadavg_after": [1.0, 1.0, 1.0]}
    config = {"width": 96, "height": 64, "steps": 2, "requests": 4, "max_batch": 4, "batch_wait_ms": 200.0,
              "max_queue": 2, "replicas": 1, "replica_cpus": 1.0}
    text = markdown({"command": "test", "machine": machine, "config": config,
                     "rows": [one, batched, {"mode": "perco serve", **row}]})
    assert "**Measured on a loaded machine**" in text and "| perco serve | 2 |" in text


def test_sigterm_stops_the_server_cleanly(server):
    # last in the module: the fixture's teardown then finds the process gone
    assert server.stop() == 0, "".join(server.stderr[-20:])
    assert any("perco serve: stopping" in line for line in server.stderr)
    assert not any("Traceback" in line for line in server.stderr), "".join(server.stderr[-20:])


# --- flag checks before any Ray starts -------------------------------------------------------------


def test_serve_flag_errors_are_one_line(tiny_model, capsys, tmp_path):
    assert main(["serve", "--model", str(tiny_model), "--port", "0"]) == 2
    assert "expected a port in 1..65535" in capsys.readouterr().err
    assert main(["serve", "--model", str(tiny_model), "--steps", "200"]) == 2
    assert capsys.readouterr().err == "error: --steps 200 is over --max-steps 100\n"
    assert main(["serve", "--model", str(tmp_path / "missing")]) == 1
    assert capsys.readouterr().err.startswith("error: --model ")
    assert main(["serve", "--model", str(tiny_model), "--sampler", "flow-euler"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1


def test_a_local_cluster_too_small_for_the_replicas_is_refused(tiny_model):
    # runs after the module's server has stopped: a second local cluster, started and stopped by the command
    cmd = [sys.executable, "-m", "perco.engine.cli", "serve", "--model", str(tiny_model), "--port", str(_free_port()),
           "--replica-cpus", "100000"]  # more than any machine has, so this test means the same everywhere
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=STARTUP_S)
    assert done.returncode == 2, done.stderr
    assert re.fullmatch(r"error: 1 replica\(s\) need 100000 CPU\(s\), the cluster has \d+: lower --replicas or "
                        r"--replica-cpus", done.stderr.strip().splitlines()[-1]), done.stderr
    assert done.stdout == ""


def test_serve_without_ray_names_the_extra(tiny_model, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` now raises ImportError, as without the extra
    assert main(["serve", "--model", str(tiny_model)]) == 1
    assert capsys.readouterr().err == "error: perco serve needs the scale extra: pip install 'perco-engine[scale]'\n"


def test_help_lists_serve_and_the_module_does_not_import_ray():
    code = ("import sys; import perco.scale.serve; assert 'ray' not in sys.modules, 'ray imported'; "
            "from perco.engine.cli import build_parser; h = build_parser().format_help(); assert ' serve ' in h, h")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120, env={**os.environ})


# --- the replica's own logic, in this process (a real codec; Serve's batching and HTTP are tested above) -----


def _replica(model, **options):
    from dataclasses import asdict

    from perco.scale.serve import DecodeServer, ServeOptions

    return DecodeServer(asdict(ServeOptions(model=str(model), **options)))


def test_settings_follow_query_then_flags_then_hints(tiny_model, codec):
    from perco.engine.bitstream import Hints
    from perco.scale.serve import RequestError

    hinted = codec.compress(random_image(64, 64), seed=0, hints=Hints(steps=7, guidance=2.5))
    plain = codec.compress(random_image(64, 64), seed=0)
    replica = _replica(tiny_model)
    job = replica._check(hinted, None, None)
    assert (job.steps, job.guidance, job.width, job.height) == (7, 2.5, 64, 64)
    assert replica._check(plain, None, None).steps == codec.model.default_steps
    assert replica._check(hinted, 5, 1.0).key == (64, 64, 5, 1.0)
    flagged = _replica(tiny_model, steps=3, guidance=4.0)
    assert flagged._check(hinted, None, None).key == (64, 64, 3, 4.0)
    assert flagged._check(hinted, 2, None).key == (64, 64, 2, 4.0)
    with pytest.raises(RequestError, match="asks for 7 steps, over this server's limit of 6") as info:
        _replica(tiny_model, max_steps=6)._check(hinted, None, None)
    assert info.value.status == 422
    with pytest.raises(RequestError, match="last 3 steps without guidance") as info:
        _replica(tiny_model, guidance_stop=3)._check(plain, 2, None)
    assert info.value.status == 422


def test_a_group_is_split_to_stay_within_the_decode_limit(tiny_model, streams):
    replica = _replica(tiny_model, max_pixels=2 * 128 * 128)
    job = replica._check(streams["128x128"], 2, None)
    assert [len(c) for c in replica._chunks(list(range(5)), job)] == [2, 2, 1]
    small = replica._check(streams["64x64"][0], 2, None)
    assert [len(c) for c in replica._chunks(list(range(5)), small)] == [5]


def test_a_failing_group_is_redecoded_one_by_one(tiny_model, codec, streams):
    import asyncio

    from perco.scale.serve import _Decoded

    replica = _replica(tiny_model)
    jobs = [replica._check(data, 2, None) for data in streams["64x64"][:3]]
    header, caption, indices = jobs[1].unpacked
    jobs[1].unpacked = (header, caption, indices + 10**6)  # after its check only a bug could do this: it fails alone
    results = asyncio.run(replica._decode_jobs(jobs))
    assert isinstance(results[1], Exception) and not isinstance(results[1], _Decoded)
    for i in (0, 2):
        assert isinstance(results[i], _Decoded) and results[i].batch_size == 1
        _close(results[i].image, codec.decompress(streams["64x64"][i], steps=2))
    results = asyncio.run(replica._decode_jobs([jobs[0], jobs[2]]))
    assert [r.batch_size for r in results] == [2, 2]
