"""`perco serve`: decode bitstreams over HTTP on Ray Serve, batching concurrent requests of one image size.

    POST /decode[?steps=N&guidance=G]   body: a bitstream -> 200 image/png
    GET  /health                         -> 200 JSON: family, model fingerprint, backend, limits, defaults

Every request's bitstream is checked on its own (`bitstream.unpack` against the model's stream spec,
the decode limit, the settings) before it joins a batch, so a bad request gets its own status (400
bad bitstream or parameter, 409 a bitstream for another model, 413 a body over the largest valid
bitstream, 422 over this server's decode limits) and never fails its batch-mates. Valid requests
are collected by `serve.batch` (up to --max-batch, waiting at most --batch-wait-ms), grouped by
(image size, steps, guidance) and decoded with one `Codec.decompress_unpacked` call per group (the checked requests are not entropy-decoded again). Queues
are bounded: a replica holds at most 2 x --max-batch requests (one batch decoding, one filling) and
each proxy queues at most --max-queue more; beyond that Serve answers 503 at once. docs/serve.md.

Ray is imported only inside the functions that need it, so `perco --help` stays fast without the
scale extra.
"""

import argparse
import asyncio
import math
import signal
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

from perco.engine.cli import integer_type, number_type
from perco.engine.errors import (
    BitstreamError, DecodeLimitError, ExtensionError, ModelMismatchError, PercoError, UsageError,
)

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8000
DEFAULT_MAX_BATCH = 8
DEFAULT_BATCH_WAIT_MS = 10.0
DEFAULT_MAX_QUEUE = 32
DEFAULT_MAX_STEPS = 100
APP_NAME = "perco"
DEPLOYMENT_NAME = "PercoDecoder"
QUERY_PARAMETERS = ("steps", "guidance")
NEEDS_SCALE = "perco serve needs the scale extra: pip install 'perco-engine[scale]'"


@dataclass(frozen=True)
class ServeOptions:
    """Everything a replica needs to build its codec and answer requests (plain values: it travels to Ray)."""

    model: Optional[str] = None  # model folder (absolute), or None with artifacts
    artifacts: Optional[str] = None
    backend: str = "torch"
    max_pixels: Optional[int] = None
    max_batch: int = DEFAULT_MAX_BATCH
    batch_wait_ms: float = DEFAULT_BATCH_WAIT_MS
    max_queue: int = DEFAULT_MAX_QUEUE
    max_steps: int = DEFAULT_MAX_STEPS
    steps: Optional[int] = None  # server defaults; a request's query parameters override them
    guidance: Optional[float] = None
    sampler: Optional[str] = None
    guidance_stop: int = 0
    replicas: int = 1
    replica_cpus: float = 1.0
    replica_gpus: float = 0.0

    @property
    def max_ongoing(self) -> int:
        """Requests one replica holds at once: a batch decoding plus the next one filling."""
        return 2 * self.max_batch


# --- the replica ----------------------------------------------------------------------------------


class RequestError(Exception):
    """A request that gets its own HTTP status and one-line body; nothing else is affected."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def status_for(exc: Exception) -> int:
    """The HTTP status of an engine error raised while checking one request's bitstream."""
    if isinstance(exc, ModelMismatchError):
        return 409
    if isinstance(exc, DecodeLimitError):
        return 422
    if isinstance(exc, BitstreamError):
        return 400
    return 422  # a valid bitstream these settings cannot decode (e.g. --guidance-stop over its steps)


@dataclass
class _Job:
    """One checked request waiting for its batch; `key` is what a decompress_unpacked call must share."""

    unpacked: tuple  # Codec.unpack's (header, caption ids, indices): the entropy decode is done once, here
    width: int
    height: int
    steps: int
    guidance: float
    enqueued: float  # perf_counter when it joined the batch queue
    entropy_s: float = 0.0  # its entropy decode, in the check

    @property
    def key(self) -> tuple:
        return self.width, self.height, self.steps, self.guidance


@dataclass
class _Decoded:
    image: object  # uint8 [H, W, 3]
    batch_size: int  # images in the decompress_unpacked call that decoded it
    queue_s: float  # from joining the queue to its decompress_unpacked call starting
    stages: dict  # the call's Codec.timings (seconds per stage, for the whole batch)


class DecodeServer:
    """The Serve replica: one codec, a batching queue, the /decode and /health routes (plain starlette)."""

    def __init__(self, options: dict):
        from ray import serve

        from perco.engine.codec import Codec

        self.options = ServeOptions(**options)
        o = self.options
        # Every network call, the model's load included, runs on this one thread: torch's OpenMP gives each thread
        # that calls it a team of its own, and a second team made the decodes about 2x slower on a 2-core machine
        # (the load on the replica's thread, every decode on this one)
        self._codec_thread = ThreadPoolExecutor(1, thread_name_prefix="perco-codec")
        self.codec = self._codec_thread.submit(Codec.from_pretrained, o.model, backend=o.backend,
                                               artifacts=o.artifacts, max_pixels=o.max_pixels).result()
        spec = self.codec.model
        # the uniform index coder is numpy only: those streams are checked beside a running decode; a coder that
        # runs networks (the learned one) is checked on the codec's own thread, which also runs every decode
        self._check_on_codec_thread = spec.stream_spec.index_coder != "uniform"
        self._io = ThreadPoolExecutor(4, thread_name_prefix="perco-io")  # checks and PNG encoding
        self._batched = serve.batch(max_batch_size=o.max_batch, batch_wait_timeout_s=o.batch_wait_ms / 1000)(
            self._decode_jobs)
        try:
            self._replica = serve.get_replica_context().replica_id.unique_id
        except serve.exceptions.RayServeException:  # built outside Serve (tests): the health route omits it
            self._replica = None

    def __del__(self):
        codec = getattr(self, "codec", None)
        if codec is not None:
            codec.close()

    async def __call__(self, request):
        from starlette.responses import JSONResponse, PlainTextResponse

        path = request.url.path.rstrip("/") or "/"
        routes = {"/decode": "POST", "/health": "GET"}
        if path not in routes:
            return PlainTextResponse(f"error: no route {path} (POST /decode, GET /health)\n", 404)
        if request.method != routes[path] and not (path == "/health" and request.method == "HEAD"):
            return PlainTextResponse(f"error: {path} takes {routes[path]}, not {request.method}\n", 405,
                                     headers={"Allow": routes[path]})
        if path == "/health":
            return JSONResponse(self.health())
        try:
            return await self._decode_request(request)
        except RequestError as exc:
            return PlainTextResponse(f"error: {exc}\n", exc.status)
        except Exception as exc:  # a bug: one line for the client, the traceback in the replica's log
            import logging

            logging.getLogger("ray.serve").exception("perco serve: internal error")
            return PlainTextResponse(f"error: internal error ({type(exc).__name__}: {_one_line(exc)})\n", 500)

    def health(self) -> dict:
        from perco.engine.cli import MAX_BITSTREAM_BYTES

        o, spec, limit = self.options, self.codec.model, self.codec.limit
        return {
            "status": "ok",
            "family": spec.family,
            "fingerprint": spec.fingerprint.hex(),
            "backend": self.codec.backend.name,
            "replica": self._replica,
            "limits": {
                "max_body_bytes": MAX_BITSTREAM_BYTES,
                "max_pixels": limit.max_pixels,
                "max_size": list(limit.max_size) if limit.max_size else None,
                "max_steps": o.max_steps,
                "max_batch": o.max_batch,
                "batch_wait_ms": o.batch_wait_ms,
                "max_ongoing_requests": o.max_ongoing,
                "max_queued_requests": o.max_queue,
            },
            "defaults": {
                "steps": o.steps or spec.default_steps,
                "guidance": o.guidance if o.guidance is not None else spec.family_def.guidance,
                "sampler": o.sampler,
                "guidance_stop": o.guidance_stop,
                "steps_from_hints": o.steps is None,
                "guidance_from_hints": o.guidance is None,
            },
        }

    async def _decode_request(self, request):
        from starlette.responses import Response

        start = time.perf_counter()
        steps, guidance = self._query(request.query_params)
        data = await _read_body(request)
        loop = asyncio.get_running_loop()
        pool = self._codec_thread if self._check_on_codec_thread else self._io
        job = await loop.run_in_executor(pool, self._check, data, steps, guidance)
        checked = time.perf_counter()
        job.enqueued = checked
        decoded = await self._batched(job)
        if isinstance(decoded, Exception):  # only a bug gets here: the batch re-decodes a failed group one by one
            raise decoded
        png_start = time.perf_counter()
        png = await loop.run_in_executor(self._io, _png_bytes, decoded.image)
        end = time.perf_counter()
        timing = [("check", checked - start), ("entropy_decode", job.entropy_s), ("queue", decoded.queue_s),
                  *decoded.stages.items(),
                  ("png", end - png_start), ("total", end - start)]
        headers = {
            "Server-Timing": ", ".join(f"{name};dur={seconds * 1000:.2f}" for name, seconds in timing),
            "X-Perco-Batch-Size": str(decoded.batch_size),
            "X-Perco-Queue-Ms": f"{decoded.queue_s * 1000:.2f}",
            "X-Perco-Steps": str(job.steps),
            "X-Perco-Guidance": f"{job.guidance:g}",
            "X-Perco-Image-Size": f"{job.width}x{job.height}",
        }
        return Response(png, 200, headers=headers, media_type="image/png")

    def _query(self, params) -> tuple:
        """(steps or None, guidance or None) from the query string; RequestError 400 on a bad one."""
        from perco.engine.codec import check_guidance

        unknown = sorted(set(params) - set(QUERY_PARAMETERS))
        if unknown:
            raise RequestError(400, f"unknown query parameter {unknown[0]!r} (known: {', '.join(QUERY_PARAMETERS)})")
        steps = guidance = None
        if "steps" in params:
            text = params["steps"]
            steps = int(text) if text.strip().isdigit() else None
            if steps is None or not 1 <= steps <= self.options.max_steps:
                raise RequestError(400, f"steps must be an integer in 1..{self.options.max_steps}, got {text!r}")
        if "guidance" in params:
            text = params["guidance"]
            try:
                guidance = check_guidance(float(text))
            except (ValueError, PercoError):
                from perco.engine.bitstream import MAX_GUIDANCE

                raise RequestError(400, f"guidance must be a finite number in 0..{MAX_GUIDANCE:g}, got {text!r}") \
                    from None
        return steps, guidance

    def _check(self, data: bytes, steps: Optional[int], guidance: Optional[float]) -> _Job:
        """Unpack the bitstream against the model and fix its decode settings; RequestError if it cannot be decoded.

        Steps: the query, else --steps, else the bitstream's hint, else the model's default (the same order as
        `perco decompress`, where flags override hints); guidance likewise.
        """
        from perco.engine import bitstream

        o, spec = self.options, self.codec.model
        started = time.perf_counter()
        try:
            if self._check_on_codec_thread:  # a learned entropy model runs on the backend: only on its thread
                unpacked = self.codec.unpack(data)
            else:
                unpacked = bitstream.unpack(data, spec.stream_spec)
            header, entropy_s = unpacked[0], time.perf_counter() - started
            self.codec.check_size(header.width, header.height)
            asked = steps
            steps, guidance = self.codec.decode_settings(header.hints, steps or o.steps,
                                                         guidance if guidance is not None else o.guidance)
            if asked is None and steps > o.max_steps:
                raise PercoError(f"this bitstream asks for {steps} steps, over this server's limit of "
                                 f"{o.max_steps}: ask for fewer with ?steps=N")
            if o.guidance_stop > steps:
                raise PercoError(f"this server runs the last {o.guidance_stop} steps without guidance, more than "
                                 f"the {steps} steps asked for: ask for at least {o.guidance_stop} with ?steps=N")
        except PercoError as exc:
            raise RequestError(status_for(exc), str(exc)) from None
        return _Job(unpacked, header.width, header.height, steps, float(guidance), 0.0, entropy_s)

    async def _decode_jobs(self, jobs: list) -> list:
        """serve.batch's function: one result (_Decoded, or the exception) per job, in order."""
        groups = {}
        for i, job in enumerate(jobs):
            groups.setdefault(job.key, []).append(i)
        results = [None] * len(jobs)
        loop = asyncio.get_running_loop()
        for members in groups.values():
            for chunk in self._chunks(members, jobs[members[0]]):
                out = await loop.run_in_executor(self._codec_thread, self._decode_chunk, [jobs[i] for i in chunk])
                for i, result in zip(chunk, out):
                    results[i] = result
        return results

    def _chunks(self, members: list, job: _Job) -> list:
        """A size group split so that a batch's padded pixels stay within the decode limit (one image always fits:
        it passed check_size)."""
        m = self.codec.model.pad_multiple
        pixels = (-(-job.width // m) * m) * (-(-job.height // m) * m)
        budget = self.codec.max_pixels
        size = len(members) if not budget else max(1, min(len(members), budget // pixels))
        return [members[i : i + size] for i in range(0, len(members), size)]

    def _decode_chunk(self, chunk: list) -> list:
        """decompress_unpacked on the codec thread; a failure there (never expected after _check) is retried one by
        one, so only the request that causes it fails."""
        o = self.options
        started = time.perf_counter()
        first = chunk[0]
        try:
            images = self.codec.decompress_unpacked([j.unpacked for j in chunk], steps=first.steps,
                                                    guidance=first.guidance, sampler=o.sampler,
                                                    guidance_stop=o.guidance_stop)
        except Exception as exc:
            if len(chunk) == 1:
                return [exc]
            return [r for job in chunk for r in self._decode_chunk([job])]
        stages = dict(self.codec.timings)
        return [_Decoded(image, len(chunk), started - job.enqueued, stages) for job, image in zip(chunk, images)]


async def _read_body(request) -> bytes:
    """The request body, refusing (413) more than the largest valid bitstream without reading past it."""
    from perco.engine.cli import MAX_BITSTREAM_BYTES

    too_large = RequestError(413, f"request body over {MAX_BITSTREAM_BYTES >> 20} MiB: not a PerCo Engine bitstream")
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > MAX_BITSTREAM_BYTES:
        raise too_large
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_BITSTREAM_BYTES:
            raise too_large
    if not body:
        raise RequestError(400, "empty request body: POST the bitstream's bytes (Content-Type: application/octet-stream)")
    return bytes(body)


def _png_bytes(image) -> bytes:
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(image, "RGB").save(buffer, format="PNG")
    return buffer.getvalue()


def _one_line(exc: Exception) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[-1] if lines else type(exc).__name__


# --- the application and the command --------------------------------------------------------------


def build_app(options: ServeOptions):
    """The Serve application: DecodeServer replicas with the options' batching and backpressure bounds."""
    serve = _import_serve()
    deployment = serve.deployment(
        name=DEPLOYMENT_NAME,
        num_replicas=options.replicas,
        max_ongoing_requests=options.max_ongoing,
        max_queued_requests=options.max_queue,
        ray_actor_options={"num_cpus": options.replica_cpus, "num_gpus": options.replica_gpus},
    )(DecodeServer)
    return deployment.bind(asdict(options))


def deploy(options: ServeOptions, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT, verbose: bool = False) -> None:
    """Start Serve's HTTP proxies on host:port (unless Serve already runs on the cluster: its options stay) and run
    the application at /; returns once every replica is up. Ray must be initialized."""
    serve = _import_serve()
    logging_config = {"log_level": "INFO" if verbose else "WARNING", "enable_access_log": verbose}
    serve.start(http_options={"host": host, "port": port}, logging_config=logging_config)
    try:
        serve.run(build_app(options), name=APP_NAME, route_prefix="/", logging_config=logging_config)
    except (RuntimeError, serve.exceptions.RayServeException) as exc:
        raise PercoError(f"the decoder replicas did not start: {_one_line(exc)}") from None


def _import_serve():
    try:
        import ray  # noqa: F401
        from ray import serve
    except ImportError:
        raise ExtensionError(NEEDS_SCALE) from None
    return serve


def add_commands(sub) -> dict:
    """Add `perco serve` to the `perco` subparsers; return {verb: handler}."""
    from perco.engine.cli import backend_arg, guidance_type, model_arg, positive_int, quiet_arg, sampler_args

    p = sub.add_parser("serve", help="decode bitstreams over HTTP (Ray Serve, batched)",
                       description="Serve POST /decode (bitstream -> PNG) and GET /health on Ray Serve, batching "
                                   "concurrent requests of one image size, with bounded queues (503 when full). "
                                   "Runs until Ctrl-C or SIGTERM. docs/serve.md.")
    model_arg(p, required=False)
    backend_arg(p)
    p.add_argument("--host", default=DEFAULT_HOST,
                   help="address to listen on (default: %(default)s; 0.0.0.0 for every interface)")
    p.add_argument("--port", type=_port, default=DEFAULT_PORT, help="HTTP port (default: %(default)s)")
    p.add_argument("--address", default="local", metavar="ray://HOST:PORT|auto|local",
                   help="Ray cluster: local (default) starts one on this machine for this command, auto joins the "
                        "one 'ray start' runs here, ray://HOST:10001 connects a Ray Client")
    p.add_argument("--replicas", type=positive_int, default=1, metavar="N", help="decoder replicas (default: 1)")
    p.add_argument("--replica-cpus", type=_cpus, default=1.0, metavar="N",
                   help="CPUs reserved per replica; also its OpenMP thread count (default: 1)")
    p.add_argument("--replica-gpus", type=_gpus, default=0.0, metavar="N",
                   help="GPUs per replica, for --backend tensorrt or a CUDA provider (default: 0; a fraction shares "
                        "one GPU between replicas)")
    p.add_argument("--max-batch", type=positive_int, default=DEFAULT_MAX_BATCH, metavar="N",
                   help=f"most requests decoded together (default: {DEFAULT_MAX_BATCH})")
    p.add_argument("--batch-wait-ms", type=_wait_ms, default=DEFAULT_BATCH_WAIT_MS, metavar="MS",
                   help=f"longest wait for a batch to fill (default: {DEFAULT_BATCH_WAIT_MS:g})")
    p.add_argument("--max-queue", type=positive_int, default=DEFAULT_MAX_QUEUE, metavar="N",
                   help="requests queued per proxy beyond what the replicas hold (2 x --max-batch each); more get "
                        f"503 at once (default: {DEFAULT_MAX_QUEUE})")
    p.add_argument("--max-steps", type=positive_int, default=DEFAULT_MAX_STEPS, metavar="N",
                   help=f"most denoising steps a request may ask for (default: {DEFAULT_MAX_STEPS})")
    p.add_argument("--steps", type=positive_int, default=None, metavar="N",
                   help="default denoising steps (default: the bitstream's hint, else the model's)")
    p.add_argument("--guidance", type=guidance_type, default=None, metavar="G",
                   help="default guidance scale, 0..50 (default: the bitstream's hint, else the model's)")
    sampler_args(p)
    p.add_argument("-v", "--verbose", action="store_true", help="Ray's and Serve's logs (access log included) on stderr")
    quiet_arg(p)
    return {"serve": cmd_serve}


_port = integer_type(1, 65535, "a port in 1..65535")
_cpus = number_type(0, open_low=True, expected="a positive number of CPUs")
_gpus = number_type(0, expected="a number of GPUs, 0 or more")


def _wait_ms(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and 0 <= value <= 60_000):
        raise argparse.ArgumentTypeError(f"expected milliseconds in 0..60000, got {text!r}")
    return value


def options_from_args(args) -> ServeOptions:
    """Check the flags against the model (configs only, no network loads) and return the replicas' options."""
    from perco.engine.cli import backend_name, model_folder, spec_and_manifest
    from perco.engine.sampling import make_sampler

    model = model_folder(args)
    remote = args.address.startswith("ray://")
    for flag, folder in (("--model", model), ("--artifacts", args.artifacts)):
        if folder and not Path(folder).is_dir() and not remote:  # a Ray Client's folders live on the cluster
            raise PercoError(f"{flag} {folder} is not a folder")
    local = all(not folder or Path(folder).is_dir() for folder in (model, args.artifacts))
    if args.steps is not None and args.steps > args.max_steps:
        raise UsageError(f"--steps {args.steps} is over --max-steps {args.max_steps}")
    if args.guidance_stop < 0:
        raise UsageError(f"--guidance-stop must be 0 or more, got {args.guidance_stop}")
    if local:
        spec = spec_and_manifest(model, args.artifacts)[0]
        try:
            make_sampler(args.sampler, spec.schedule, args.steps or spec.default_steps)
        except ValueError as exc:
            raise UsageError(str(exc)) from None
    absolute = lambda folder: str(Path(folder).resolve()) if folder and local else folder  # noqa: E731
    return ServeOptions(
        model=absolute(model), artifacts=absolute(args.artifacts), backend=backend_name(args),
        max_pixels=args.max_pixels, max_batch=args.max_batch, batch_wait_ms=args.batch_wait_ms,
        max_queue=args.max_queue, max_steps=args.max_steps, steps=args.steps, guidance=args.guidance,
        sampler=args.sampler, guidance_stop=args.guidance_stop, replicas=args.replicas,
        replica_cpus=args.replica_cpus, replica_gpus=args.replica_gpus,
    )


def cmd_serve(args) -> None:
    """Start (or join) Ray, run the application, print the URL, block until Ctrl-C or SIGTERM, then shut down."""
    options = options_from_args(args)
    serve = _import_serve()
    import logging

    import ray

    if not args.verbose:  # Serve's driver-side progress lines; errors still show
        logging.getLogger("ray.serve").setLevel(logging.WARNING)
    previous = signal.signal(signal.SIGTERM, _interrupt)  # SIGTERM stops like Ctrl-C: through the cleanup below
    started_ray = started_serve = deployed = ready = False
    try:
        if not ray.is_initialized():
            extra = {"include_dashboard": False} if args.address == "local" else {}
            ray.init(address=args.address, logging_level=logging.INFO if args.verbose else logging.ERROR,
                     log_to_driver=args.verbose, **extra)
            started_ray = True
            signal.signal(signal.SIGTERM, _interrupt)  # again: Ray's core worker put its own crash reporter there
        _check_resources(ray, options, args.address == "local")
        started_serve = not serve.status().proxies
        deployed = True  # from here on, stopping removes the application, even one half deployed
        deploy(options, args.host, args.port, verbose=args.verbose)
        ready = True
        host, port = _http_address(args.host, args.port)
        if not args.quiet:
            host = f"[{host}]" if ":" in host else host
            print(f"perco serve: http://{host}:{port} (POST /decode, GET /health; {options.replicas} "
                  f"replica(s), batches of up to {options.max_batch}); Ctrl-C to stop", flush=True)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        if not ready:  # stopped while starting: the CLI's "interrupted", exit 130
            raise
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second SIGTERM must not cut the shutdown short
        if not args.quiet and ready:
            print("perco serve: stopping", file=sys.stderr, flush=True)
        try:
            if started_serve:
                serve.shutdown()
            elif deployed:
                serve.delete(APP_NAME)  # Serve was already running on the cluster: leave the rest of it alone
        finally:
            if started_ray:
                ray.shutdown()
            signal.signal(signal.SIGTERM, previous)


def _http_address(host: str, port: int) -> tuple:
    """(host, port) Serve's proxies really listen on: a Serve already running on the cluster keeps its own."""
    try:
        from ray.serve.context import _get_global_client  # Serve has no public getter for its HTTP options

        config = _get_global_client().http_config
        actual = (config.host, config.port)
    except (ImportError, AttributeError):
        return host, port
    if actual != (host, port):
        print(f"warning: Serve already runs on this cluster, listening on {actual[0]}:{actual[1]}; --host and "
              f"--port do not apply (stop Serve first to change them)", file=sys.stderr)
    return actual


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def _check_resources(ray, options: ServeOptions, local: bool) -> None:
    """A local cluster that cannot place every replica would wait forever: refuse; elsewhere an autoscaler may add
    nodes, so only warn."""
    resources = ray.cluster_resources()
    short = [(what, options.replicas * per, resources.get(what, 0))
             for what, per in (("CPU", options.replica_cpus), ("GPU", options.replica_gpus))
             if options.replicas * per > resources.get(what, 0)]
    if not short:
        return
    what, need, has = short[0]
    flag = "--replica-cpus" if what == "CPU" else "--replica-gpus"
    message = (f"{options.replicas} replica(s) need {need:g} {what}(s), the cluster has {has:g}: lower --replicas or "
               f"{flag}")
    if local:
        raise UsageError(message)
    print(f"warning: {message} (waiting for the cluster to grow)", file=sys.stderr)
