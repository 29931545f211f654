"""`perco batch compress|decompress`: many images or bitstreams through a pool of Ray actors (Ray Data).

The driver lists the inputs (a folder, a glob or a list file), reads only their headers (an image's
size, a bitstream's header), skips the outputs a previous run already wrote and that are valid, and
cuts the rest into batches of one image size. Ray Data feeds those batches to a pool of actors, each
holding one `Codec` (one actor per GPU where the cluster has GPUs, CPU actors otherwise): an actor
reads its inputs, decodes a batch with `Codec.decompress_batch` (or compresses image by image) and
writes every output atomically. A failed item is recorded (path + one-line reason) in a JSON report
and never stops the job. Inputs, outputs and the model folder are paths that the driver and every
node see alike (one machine, or shared storage); docs/batch.md.

    perco batch compress photos/ -o coded/ --captions captions.json
    perco batch decompress coded/ -o decoded/ --address auto --batch-size 8

Ray is imported inside the functions only, so `perco --help` stays fast without the scale extra.
"""

import glob
import json
import logging
import os
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

from perco.engine.errors import ExtensionError, OutputError, PercoError, UsageError

SCALE_EXTRA = "pip install 'perco-engine[scale]'"
VERBS = ("compress", "decompress")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff", ".gif", ".ppm", ".pgm", ".pnm")
BITSTREAM_SUFFIX = ".perco"
OUTPUT_SUFFIX = {"compress": ".perco", "decompress": ".png"}
REPORT_NAME = "report.json"
DECODE_OPTIONS = ("steps", "guidance", "sampler", "guidance_stop")  # Codec.decompress_batch keywords
LOCAL_OBJECT_STORE = 200 << 20  # bytes, for a cluster this module starts: rows carry paths, not pixels
MAX_BLOCKS = 4096  # Ray Data blocks of the batch list: one per batch up to this, so every actor gets work
PROBE_SECONDS = 10.0  # a cluster address must accept a TCP connection within this before ray.init is tried
TASKS_PER_ACTOR = 2  # batches queued on an actor: enough to hide dispatch, few enough to balance the tail


# --- Ray ------------------------------------------------------------------------------------------------------


def _require_ray():
    try:
        import ray
        import ray.data  # noqa: F401 - the data extra: ray[data]
    except ImportError:
        raise ExtensionError(f"perco batch needs the scale extra: {SCALE_EXTRA}") from None
    return ray


def check_address(address):
    """None -> "local" (a new cluster on this machine); "local", "auto", "ray://HOST:PORT" or "HOST:PORT" as given."""
    if address is None or address == "local":
        return "local"
    if address == "auto":
        return address
    text = address[len("ray://"):] if address.startswith("ray://") else address
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536 or any(c.isspace() for c in host):
        raise UsageError(f"bad Ray address {address!r}: use local, auto, ray://HOST:PORT (the client port, 10001 by "
                         "default) or HOST:PORT (the head's GCS port, 6379 by default)")
    return address


def probe(address: str, timeout: float = PROBE_SECONDS) -> None:
    """PercoError unless something accepts a TCP connection at HOST:PORT (ray.init retries a dead address for many
    minutes before it gives up)."""
    import socket

    host, _, port = address[len("ray://"):].rpartition(":") if address.startswith("ray://") else \
        address.rpartition(":")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
    except OSError as exc:
        raise PercoError(f"cannot connect to the Ray cluster at {address}: nothing answers at {host}:{port} "
                         f"({exc.strerror or type(exc).__name__}); is 'ray start --head' running there?") from None


@contextmanager
def ray_session(address=None):
    """Initialize Ray for the block (unless it already is) and shut it down on exit only if this started it.

    address: None or "local" starts a cluster on this machine (no dashboard, a small object store);
    "auto" joins the cluster `ray start` made on this machine; "ray://HOST:PORT" connects as a Ray client;
    "HOST:PORT" joins a head's GCS. Ray's own log lines stay in its session folder (log_to_driver=False).
    """
    ray = _require_ray()
    if ray.is_initialized():
        yield ray
        return
    address = check_address(address)
    if address not in ("local", "auto"):
        probe(address)
    options = {"log_to_driver": False, "logging_level": logging.ERROR}
    if address == "local":
        options.update(include_dashboard=False, object_store_memory=LOCAL_OBJECT_STORE)
    saved = os.environ.get("RAY_BACKEND_LOG_LEVEL")
    if saved is None:  # the C++ core's notices (one per actor) would reach the terminal; a user's value wins
        os.environ["RAY_BACKEND_LOG_LEVEL"] = "fatal"
    try:
        with _stderr_to_devnull(saved is None):  # the core's one line saying it read that variable
            _init(ray, address, options)
    except Exception as exc:  # noqa: BLE001 - ConnectionError, RuntimeError, ValueError...: one line
        where = "start a local Ray cluster" if address == "local" else f"connect to the Ray cluster at {address}"
        causes, current = [], exc
        while current is not None and len(causes) < 3:  # Ray's ConnectionError says why only in its cause
            causes.append(_one_line(current))
            current = current.__cause__
        reason = "; ".join(c if len(c) <= 240 else c[:240] + "..." for c in causes)
        if address.startswith("ray://") and "timeout" in reason and os.environ.get("RAY_AUTH_MODE") != "token":
            reason += (" (a cluster with token authentication, the default since Ray 2.59, answers a client only with "
                       "RAY_AUTH_MODE=token and its token: RAY_AUTH_TOKEN or ~/.ray/auth_token)")
        raise PercoError(f"cannot {where}: {reason}") from None
    finally:
        if saved is None:
            os.environ.pop("RAY_BACKEND_LOG_LEVEL", None)
    try:
        yield ray
    finally:
        ray.shutdown()


CLIENT_ATTEMPTS = 3  # a Ray client's connection, when the head's per-client server fails to start (transient)


def _init(ray, address: str, options: dict) -> None:
    """ray.init, retried for a Ray client whose per-client server died at start: Ray 2.60's proxy forks it while its
    gRPC threads run ("Starting Ray client server failed"), seen here in about 1 of 8 connections on a loaded
    2-core head; the next attempt gets a new server."""
    for attempt in range(1, CLIENT_ATTEMPTS + 1):
        try:
            ray.init(address=address, **options)
            return
        except Exception as exc:  # noqa: BLE001
            transient = address.startswith("ray://") and "Starting Ray client server failed" in str(exc)
            if not transient or attempt == CLIENT_ATTEMPTS:
                raise
            ray.shutdown()  # whatever the failed attempt left
            time.sleep(1.0)


@contextmanager
def _stderr_to_devnull(enabled: bool):
    """File descriptor 2 to /dev/null for the block (what Ray's C++ core prints there; Python errors still raise)."""
    try:
        fd = sys.stderr.fileno() if enabled else None
    except (AttributeError, OSError, ValueError):  # a replaced sys.stderr (pytest's capture, a notebook)
        fd = None
    if fd != 2:
        yield
        return
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


@contextmanager
def _quiet_ray_data(ray):
    """No Ray Data progress bars and console notices while a job runs (its log file keeps them all; a failure that
    stops the job is the CLI's one error line, not Ray Data's stack trace)."""
    context = ray.data.DataContext.get_current()
    saved = context.enable_progress_bars
    context.enable_progress_bars = False
    handlers = [h for h in logging.getLogger("ray.data").handlers if not isinstance(h, logging.FileHandler)
                and "File" not in type(h).__name__]
    levels = [h.level for h in handlers]
    for handler in handlers:
        handler.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        context.enable_progress_bars = saved
        for handler, level in zip(handlers, levels):
            handler.setLevel(level)


def actor_layout(ray, actors=None) -> tuple:
    """(actors, CPUs each, GPUs each): one actor per GPU where the cluster has GPUs, else one per node, each with
    that node's CPUs; `actors` overrides the count (sharing GPUs or CPUs, fractionally, when over them)."""
    resources = ray.cluster_resources()
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    gpus = int(resources.get("GPU", 0))
    if gpus:  # each actor also gets its share of its GPU node's CPUs (entropy coding, a CPU backend's work)
        count = actors or gpus
        share = min(1.0, gpus / count)
        ratio = min((n["Resources"].get("CPU", 0) / n["Resources"]["GPU"] for n in nodes
                     if n.get("Resources", {}).get("GPU", 0) > 0), default=1.0)
        return count, _cpus(ratio * share), share
    nodes = [n for n in nodes if n.get("Resources", {}).get("CPU", 0) > 0]
    cpus = resources.get("CPU", 1.0)
    count = actors or max(1, len(nodes))
    smallest = min((n["Resources"]["CPU"] for n in nodes), default=cpus)
    return count, _cpus(min(smallest, cpus / count)), 0.0


def _cpus(share: float) -> float:
    """A CPU request Ray can place: whole CPUs where there is at least one to share, else the fraction."""
    return float(int(share)) if share >= 1 else max(share, 0.01)


# --- inputs and plan ------------------------------------------------------------------------------------------


def resolve_inputs(verb: str, inputs) -> list:
    """The input files of a job: a list of paths as given, or a folder (its images, or its .perco files, sorted),
    a glob (the files it matches, sorted), a list file (one path per line, relative to its folder; blank lines and
    lines starting with # skipped) or a single image / bitstream."""
    suffixes = IMAGE_SUFFIXES if verb == "compress" else (BITSTREAM_SUFFIX,)
    kind = "images" if verb == "compress" else f"{BITSTREAM_SUFFIX} bitstreams"
    if isinstance(inputs, (list, tuple)):
        paths, where = [Path(p) for p in inputs], "the input list"
    else:
        text = os.fspath(inputs)
        path, where = Path(text), text
        if path.is_dir():
            paths = sorted(p for p in path.iterdir() if p.suffix.lower() in suffixes and p.is_file())
            where = f"folder {text}"
        elif path.is_file() and path.suffix.lower() in suffixes:
            paths = [path]
        elif path.is_file():
            paths = _read_list(path)
            where = f"list file {text}"
        elif any(c in text for c in "*?["):
            paths = sorted(Path(p) for p in glob.glob(text, recursive=True) if os.path.isfile(p))
            where = f"glob {text}"
        else:
            raise PercoError(f"input {text} does not exist (give a folder, a glob or a list file)")
    unique = list(dict.fromkeys(paths))
    if not unique:
        raise PercoError(f"no inputs: {where} holds no {kind}")
    return unique


def _read_list(path: Path) -> list:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise PercoError(f"list file {path} is not UTF-8 text (one input path per line)") from None
    except OSError as exc:
        raise PercoError(f"cannot read list file {path}: {exc.strerror or exc}") from None
    lines = (line.strip() for line in text.splitlines())
    return [path.parent / line for line in lines if line and not line.startswith("#")]


def _outputs(verb: str, paths: list, output: Path) -> list:
    """OUTPUT/<stem>.perco or .png per input; two inputs with one output name are an error before any work."""
    targets, seen = [], {}
    for path in paths:
        target = output / (path.stem + OUTPUT_SUFFIX[verb])
        if target in seen:
            raise PercoError(f"inputs {seen[target]} and {path} would both write {target}: rename one, or run them "
                             "as two jobs")
        seen[target] = path
        targets.append(target)
    return targets


def _caption_map(captions, paths: list) -> list:
    """One caption (or None: the captioner's, else empty) per input from a str or {file name, stem or path: caption}."""
    if captions is None or isinstance(captions, str):
        return [captions] * len(paths)
    if not isinstance(captions, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                                 for k, v in captions.items()):
        raise UsageError("captions must be one caption (a string) or {input file name: caption} strings")
    return [next((captions[k] for k in (p.name, p.stem, str(p)) if k in captions), None) for p in paths]


def read_captions(path) -> dict:
    """A captions file: a JSON object {image file name: caption}, or TSV lines "name<TAB>caption".

    A name may be the file name ("kodim13.png") or its stem ("kodim13"). Blank TSV lines are skipped."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise PercoError(f"captions file {path} does not exist") from None
    except UnicodeDecodeError:
        raise PercoError(f"captions file {path} is not UTF-8 text") from None
    except OSError as exc:
        raise PercoError(f"cannot read captions file {path}: {exc.strerror or exc}") from None
    if text.lstrip().startswith("{"):
        try:
            value = json.loads(text)
        except json.JSONDecodeError as exc:
            raise PercoError(f"captions file {path} is not valid JSON: {exc.msg} at line {exc.lineno}") from None
        if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
            raise PercoError(f"captions file {path} must be one JSON object of {{image file name: caption}} strings")
        return value
    captions = {}
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        name, tab, caption = line.partition("\t")
        if not tab or not name.strip():
            raise PercoError(f"captions file {path} line {number}: expected 'name<TAB>caption' (or a JSON object)")
        captions[name.strip()] = caption.strip()
    return captions


def _valid_bitstream(path: Path, spec, size: tuple, seed: int) -> bool:
    """An existing .perco a previous run wrote for this input: it parses (CRC included), is for this model and has
    the image's size (either orientation: EXIF rotation is applied after the header is read) and seed."""
    from perco.engine import bitstream

    try:
        header = bitstream.parse(path.read_bytes())[0]
    except (OSError, PercoError):
        return False
    return (header.family == spec.family and header.fingerprint == spec.fingerprint[: bitstream.FINGERPRINT_BYTES]
            and (header.width, header.height) in (size, size[::-1]) and header.seed == seed)


def _valid_png(path: Path, size: tuple) -> bool:
    """An existing PNG of the size in the bitstream header whose chunks are complete (a half file fails verify())."""
    from PIL import Image

    try:
        with Image.open(path) as img:
            if img.format != "PNG" or img.size != tuple(size):
                return False
            img.verify()
    except Exception:  # noqa: BLE001 - any defect means: decode it again
        return False
    return True


def _model_mismatch(header, spec):
    from perco.engine import bitstream

    if header.family != spec.family:
        return f"a {header.family} bitstream, but the model is {spec.family}: decode it with a {header.family} model"
    ours = spec.fingerprint[: bitstream.FINGERPRINT_BYTES]
    if header.fingerprint != ours:
        return (f"made for model {header.fingerprint.hex()}, but this model is {ours.hex()}: decode it with the "
                "model (and rate) that encoded it")
    return None


def _remove_stale_temporaries(target: Path) -> None:
    """The temporary files atomic_write leaves behind when a process is killed mid-write (never a finished file)."""
    for stale in target.parent.glob(f".{glob.escape(target.name)}.*.tmp"):
        try:
            stale.unlink()
        except OSError:
            pass


def plan(verb: str, paths: list, targets: list, spec, seed: int = 0, captions=None) -> tuple:
    """(items to run, skipped entries, failed entries) from headers only. An item is {"input", "output" (as the
    report shows them), "read", "write" (absolute), "size": [w, h], "caption" (None: the captioner's)}; a bad
    input fails here, before any actor starts."""
    from perco.engine.cli import read_bitstream
    from perco.engine import bitstream
    from perco.engine.imageio import read_image_size

    todo, skipped, failed = [], [], []
    for path, target, caption in zip(paths, targets, _caption_map(captions, paths)):
        entry = {"input": str(path), "output": str(target)}
        try:
            if verb == "compress":
                size = read_image_size(path)
                valid = target.is_file() and _valid_bitstream(target, spec, size, seed)
            else:
                header = bitstream.parse(read_bitstream(path))[0]
                mismatch = _model_mismatch(header, spec)
                if mismatch:
                    raise PercoError(f"bitstream {path} was {mismatch}")
                size = (header.width, header.height)
                valid = target.is_file() and _valid_png(target, size)
        except PercoError as exc:
            failed.append({"input": str(path), "error": _one_line(exc)})
            continue
        if valid:
            skipped.append({**entry, "bytes": target.stat().st_size})
            continue
        _remove_stale_temporaries(target)
        todo.append({**entry, "size": list(size), "caption": caption,  # the actors use absolute paths: their
                     "read": os.path.abspath(path), "write": os.path.abspath(target)})  # working folder differs
    return todo, skipped, failed


def batches(items: list, batch_size: int) -> list:
    """Items cut into batches of one image size and at most `batch_size`, the largest images first (they take the
    longest: starting them first balances the actors' tails)."""
    by_size = {}
    for item in sorted(items, key=lambda i: i["input"]):
        by_size.setdefault(tuple(item["size"]), []).append(item)
    out = []
    for size in sorted(by_size, key=lambda s: (-s[0] * s[1], s)):
        group = by_size[size]
        out.extend(group[i : i + batch_size] for i in range(0, len(group), batch_size))
    return out


def spread(items: list, batch_size: int, actors: int) -> list:
    """batches(), with smaller batches where there would be fewer batches than actors (so each has work)."""
    chunks = batches(items, batch_size)
    if len(chunks) < actors:
        batch_size = max(1, min(batch_size, -(-len(items) // actors)))
        chunks = batches(items, batch_size)
    while len(chunks) < actors and batch_size > 1:  # several sizes: their groups' remainders
        batch_size = max(1, batch_size // 2)
        chunks = batches(items, batch_size)
    return chunks


# --- the actor ------------------------------------------------------------------------------------------------


class BatchWorker:
    """A Ray Data actor: one Codec (and captioner, at first use) for the whole job; one batch of one size per call.

    Called with {"batch": [json of a list of items]}; returns {"result": [json of a list of entries]}, an entry
    being {"input", "output", "bytes", "batch"} (compress adds the "caption" coded) or {"input", "error"}.
    """

    def __init__(self, config: dict):
        from concurrent.futures import ThreadPoolExecutor

        self.config = config
        self._captioner = self.codec = None
        self._broken = None
        # Ray Data constructs the actor on one thread and calls it on another. Every network call, the load
        # included, runs on this one thread instead: torch's OpenMP gives each calling thread a team of its own, and
        # a second team made the decodes about 2x slower on a 2-core machine (docs/batch.md).
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="perco-codec")
        self._thread.submit(self._load).result()

    def _load(self) -> None:
        from perco.engine.codec import Codec

        config, threads = self.config, self.config.get("threads")
        try:
            self.codec = Codec.from_pretrained(config["model"], backend=config["backend"],
                                               artifacts=config["artifacts"], max_pixels=config.get("max_pixels"))
        except PercoError as exc:  # raised by the first call instead: a dead actor makes Ray print its traceback
            self._broken = exc
            return
        if threads and "torch" in sys.modules:  # Ray sets OMP_NUM_THREADS; torch's intra-op pool is set here
            sys.modules["torch"].set_num_threads(threads)

    def __call__(self, batch: dict) -> dict:
        return self._thread.submit(self._run, batch).result()

    def _run(self, batch: dict) -> dict:
        import numpy as np

        if self._broken is not None:  # this node cannot run the model: the driver stops the job with the reason
            return {"result": np.array([json.dumps({"fatal": _one_line(self._broken)})] * len(batch["batch"]),
                                       dtype=object)}

        out = []
        for text in batch["batch"]:
            items = json.loads(text)
            run = self._compress if self.config["verb"] == "compress" else self._decompress
            out.append(json.dumps(run(items)))
        return {"result": np.array(out, dtype=object)}

    def _compress(self, items: list) -> list:
        from perco.engine.imageio import load_image, write_output

        limit = self.codec.limit
        bound = limit.max_encode_pixels or limit.max_pixels
        images, results = {}, {}
        for i, item in enumerate(items):
            try:
                images[i] = load_image(item["read"], max_pixels=bound)
            except Exception as exc:  # noqa: BLE001 - recorded, the job goes on
                results[i] = _failure(item, exc)
        self._caption(items, images, results)
        for i, image in images.items():
            if i in results:
                continue
            item = items[i]
            try:
                data = self.codec.compress(image, caption=item["caption"] or "", seed=self.config["seed"])
                write_output(item["write"], data)
                results[i] = {"input": item["input"], "output": item["output"], "bytes": len(data), "batch": 1,
                              "caption": item["caption"] or ""}
            except Exception as exc:  # noqa: BLE001
                results[i] = _failure(item, exc)
        return [results[i] for i in range(len(items))]

    def _caption(self, items: list, images: dict, results: dict) -> None:
        """Caption (in one captioner call) the loaded images that have no caption, when a captioner is set."""
        name = self.config.get("captioner")
        wanted = [i for i in images if items[i]["caption"] is None]
        if not name or not wanted:
            return
        try:
            if self._captioner is None:
                from perco.engine.captioners import open_captioner

                self._captioner = open_captioner(name, self.config.get("captioner_model"))
            captions = self._captioner([images[i] for i in wanted])
        except Exception as exc:  # noqa: BLE001 - every image of the batch fails with the reason
            for i in wanted:
                results[i] = _failure(items[i], exc)
            return
        for i, caption in zip(wanted, captions):
            items[i]["caption"] = caption

    def _decompress(self, items: list) -> list:
        """Each bitstream read (bounded) and checked once with `Codec.unpack`, so a bad one fails alone; the valid
        ones decoded together per (steps, guidance), their own hints or the job's options, as one by one."""
        from perco.engine.cli import read_bitstream

        options = dict(self.config["decode_options"])
        steps, guidance = options.pop("steps", None), options.pop("guidance", None)
        unpacked, groups, results = {}, {}, {}
        for i, item in enumerate(items):
            try:
                unpacked[i] = self.codec.unpack(read_bitstream(item["read"]))
                key = self.codec.decode_settings(unpacked[i][0].hints, steps, guidance)
            except Exception as exc:  # noqa: BLE001 - recorded, the job goes on
                results[i] = _failure(item, exc)
                continue
            groups.setdefault(key, []).append(i)
        for (group_steps, group_guidance), order in groups.items():
            images, batch = self._decode_group([unpacked[i] for i in order], steps=group_steps,
                                               guidance=group_guidance, **options)
            for i, image in zip(order, images):
                results[i] = _failure(items[i], image) if isinstance(image, Exception) else \
                    self._save(items[i], image, batch)
        return [results[i] for i in range(len(items))]

    def _decode_group(self, unpacked: list, **settings) -> tuple:
        """([image or the exception of its decode], images decoded together): the group in one call, or one by one
        when that call fails (not a bitstream's fault: each was checked), so only a failing image fails."""
        try:
            return self.codec.decompress_unpacked(unpacked, **settings), len(unpacked)
        except Exception as exc:  # noqa: BLE001
            if len(unpacked) == 1:
                return [exc], 1
        images = []
        for one in unpacked:
            try:
                images.append(self.codec.decompress_unpacked([one], **settings)[0])
            except Exception as exc:  # noqa: BLE001
                images.append(exc)
        return images, 1

    @staticmethod
    def _save(item: dict, image, batch: int) -> dict:
        from perco.engine.imageio import save_image

        try:
            save_image(item["write"], image, "PNG")
        except Exception as exc:  # noqa: BLE001
            return _failure(item, exc)
        return {"input": item["input"], "output": item["output"], "bytes": os.path.getsize(item["write"]),
                "batch": batch}


def _failure(item: dict, exc: BaseException) -> dict:
    reason = _one_line(exc) if isinstance(exc, PercoError) else f"internal error ({type(exc).__name__}: " \
                                                                 f"{_one_line(exc)})"
    return {"input": item["input"], "error": reason}


def _one_line(exc) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def _job_error(exc: BaseException) -> PercoError:
    """A failure of the job itself (a lost node, a bug) as one line: a PercoError inside Ray's wrapping or named
    in its traceback text where there is one, else the last line Ray gives."""
    seen, current = set(), exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, PercoError):
            return PercoError(f"the batch job stopped: {_one_line(current)}")
        current = getattr(current, "cause", None) or current.__cause__ or current.__context__
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    ours = [line.split(": ", 1)[1] for line in lines if line.startswith("perco.") and ": " in line]
    reason = ours[-1] if ours else lines[-1] if lines else type(exc).__name__  # ours: in Ray's traceback text
    return PercoError(f"the batch job stopped: {reason}")


# --- the job --------------------------------------------------------------------------------------------------


def _check_options(verb, batch_size, actors, decode_options, captioner, captioner_model) -> dict:
    if verb not in VERBS:
        raise UsageError(f"unknown batch verb {verb!r}: choose compress or decompress")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise UsageError(f"batch_size must be a positive integer, got {batch_size!r}")
    if actors is not None and (isinstance(actors, bool) or not isinstance(actors, int) or actors < 1):
        raise UsageError(f"actors must be a positive integer, got {actors!r}")
    options = {k: v for k, v in (decode_options or {}).items() if v is not None}
    unknown = sorted(set(options) - set(DECODE_OPTIONS))
    if unknown:
        raise UsageError(f"unknown decode option(s) {', '.join(unknown)}: use {', '.join(DECODE_OPTIONS)}")
    if "guidance" in options:
        from perco.engine.codec import check_guidance

        check_guidance(options["guidance"])
    if "sampler" in options:
        from perco.engine.sampling import SAMPLERS

        if options["sampler"] not in SAMPLERS:
            raise UsageError(f"unknown sampler {options['sampler']!r}; choose one of: {', '.join(SAMPLERS)}")
    for key in ("steps", "guidance_stop"):
        value = options.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < (key == "steps")):
            raise UsageError(f"{key} must be a{' positive' if key == 'steps' else ' non-negative'} integer, got "
                             f"{value!r}")
    if captioner is not None:
        from perco.engine.captioners import available

        if captioner not in available():
            raise PercoError(f"unknown captioner {captioner!r} (installed: {', '.join(available()) or 'none'})")
        if captioner_model is None:
            raise PercoError(f"--captioner {captioner} needs --captioner-model DIR (its weights; nothing is "
                             "downloaded)")
    return options


def _absolute(path):
    return None if path is None else os.path.abspath(path)


def _output_folder(output) -> Path:
    folder = Path(output)
    if folder.exists() and not folder.is_dir():
        raise OutputError(f"output {folder} is not a folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"cannot create output folder {folder}: {exc.strerror or exc}") from None
    return folder


def run_job(verb, inputs, output, *, model=None, backend=None, artifacts=None, address=None, actors=None,
            batch_size=8, captions=None, seed=0, decode_options=None, progress=False, report=None,
            max_pixels=None, captioner=None, captioner_model=None) -> dict:
    """Run `perco batch compress|decompress` and return its report (also written to `report`, default
    OUTPUT/report.json).

    inputs: a folder, a glob or a list file (str or Path), or a list of paths; output: a folder (made if missing),
    receiving <stem>.perco (compress) or <stem>.png (decompress). captions (compress): one caption for all, or
    {input file name: caption}; images without one are captioned by `captioner` (loaded from `captioner_model` in
    each actor) if given, else get the empty caption. decode_options: decompress_batch keywords (steps, guidance,
    sampler, guidance_stop). Outputs already present and valid are skipped, so a rerun resumes an interrupted job.

    The report: {"verb", "done": [{"input", "output", "bytes", "batch" (images decoded together), "caption"
    (compress)}], "skipped": [{"input", "output", "bytes"}], "failed": [{"input", "error"}], "seconds",
    "items_per_second" (done / seconds), "actors", "sizes", "warnings", ...}; docs/batch.md.
    Job-level problems (no inputs, a bad address, a missing model, an output name clash) raise PercoError before
    any work; a failed item never stops the job.
    """
    from perco.engine.backends import available
    from perco.engine.cli import backend_name, spec_and_manifest
    from perco.engine.errors import BackendError

    start = time.perf_counter()
    ray = _require_ray()
    options = _check_options(verb, batch_size, actors, decode_options, captioner, captioner_model)
    if not 0 <= seed < 1 << 64:
        raise UsageError(f"seed must be in 0..2^64-1, got {seed}")
    address = check_address(address)
    paths = resolve_inputs(verb, inputs)
    if not ray.is_initialized() and address not in ("local", "auto"):
        probe(address)  # a dead address fails now, not after the plan
    chosen = backend_name(SimpleNamespace(backend=backend, artifacts=artifacts))
    if chosen not in available():
        raise BackendError(f"unknown backend {chosen!r}; choose one of: {', '.join(available())}")
    if model is None and artifacts is None:
        from perco.engine.demo import default_model

        model = default_model(progress=progress)
    spec, _ = spec_and_manifest(model, artifacts)  # a missing or broken model folder fails here
    targets = _outputs(verb, paths, Path(output))  # a name clash fails before the folder is made
    folder = _output_folder(output)
    report_path = Path(report) if report is not None else folder / REPORT_NAME
    todo, skipped, failed = plan(verb, paths, targets, spec, seed, captions if verb == "compress" else None)
    warnings = _warnings(verb, todo, captioner)
    if progress:
        for line in warnings:
            print(f"warning: {line}", file=sys.stderr)
    result = {"verb": verb, "model": str(model) if model is not None else None, "artifacts": artifacts,
              "backend": chosen, "batch_size": batch_size, "done": [], "skipped": skipped, "failed": failed,
              "warnings": warnings, "actors": 0, "nodes": 0, "first_batch_seconds": None, "sizes": {}}
    if todo:
        config = {"verb": verb, "model": _absolute(model), "artifacts": _absolute(artifacts), "backend": chosen,
                  "max_pixels": max_pixels, "seed": seed, "decode_options": options, "captioner": captioner,
                  "captioner_model": _absolute(captioner_model)}
        with ray_session(address):
            run = _execute_from_client if _client_mode(ray) else _execute
            result.update(run(ray, todo, batch_size, config, actors, progress, result, start))
    result["seconds"] = seconds = time.perf_counter() - start
    result["items_per_second"] = len(result["done"]) / seconds if seconds > 0 else 0.0
    result["failed"].sort(key=lambda e: e["input"])
    _write_report(report_path, result)
    result["report"] = str(report_path)
    return result


def _client_mode(ray) -> bool:
    """True when this process is a Ray Client (ray://HOST:PORT): it has no core worker of its own."""
    try:
        return bool(ray.util.client.ray.is_connected())
    except AttributeError:
        return False


def _execute_from_client(ray, todo: list, batch_size: int, config: dict, actors, progress: bool, result: dict,
                         start: float) -> dict:
    """`_execute` for a Ray Client: Ray Data's executor needs a core worker, which a client has not, so the job's
    loop runs as a task on the cluster (no CPU of its own) and sends each batch's item count back through a Ray
    queue for the progress bar. The inputs and outputs must be at the same paths on the cluster's nodes."""
    from ray.util.queue import Empty, Queue

    from perco.engine.codec import _progress

    queue = Queue(actor_options={"num_cpus": 0})
    task = ray.remote(num_cpus=0, max_retries=0)(_execute_on_cluster).remote(todo, batch_size, config, actors, queue)
    bar = _progress(None, progress, desc=f"batch {config['verb']}", unit="image", total=len(todo))
    first = None
    try:
        while True:
            finished = bool(ray.wait([task], timeout=0.5)[0])
            while True:
                try:
                    count = queue.get_nowait()
                except Empty:
                    break
                first = first if first is not None else time.perf_counter() - start
                bar.update(count)
            if finished:
                break
        try:
            stats, done, failed = ray.get(task)
        except (KeyboardInterrupt, SystemExit):
            raise
        except Exception as exc:  # noqa: BLE001 - a PercoError inside Ray's task error, or the cluster's failure
            raise _job_error(exc) from None
    finally:
        bar.close()
        ray.kill(queue.actor)
    result["done"].extend(done)  # sorted by _execute on the cluster
    result["failed"].extend(failed)
    return {**stats, "first_batch_seconds": first}


def _execute_on_cluster(todo: list, batch_size: int, config: dict, actors, queue) -> tuple:
    """The Ray task of `_execute_from_client`: (stats, done, failed)."""
    import ray

    result = {"done": [], "failed": []}
    stats = _execute(ray, todo, batch_size, config, actors, False, result, time.perf_counter(), notify=queue.put)
    return stats, result["done"], result["failed"]


def _execute(ray, todo: list, batch_size: int, config: dict, actors, progress: bool, result: dict,
             start: float, notify=None) -> dict:
    """Run the items in batches on an actor pool (no more actors than batches); fills result["done"] and
    result["failed"] as batches finish (and calls notify(items) after each, where given)."""
    wanted = actor_layout(ray, actors)[0]
    chunks = spread(todo, batch_size, wanted)
    count, cpus, gpus = actor_layout(ray, min(wanted, len(chunks)))
    config = {**config, "threads": max(1, int(cpus))}
    total = sum(len(c) for c in chunks)
    from perco.engine.codec import _progress

    first = None
    bar = _progress(None, progress, desc=f"batch {config['verb']}", unit="image", total=total)
    try:
        with _quiet_ray_data(ray):
            ds = ray.data.from_items([{"batch": json.dumps(c)} for c in chunks],
                                     override_num_blocks=min(len(chunks), MAX_BLOCKS))
            ds = ds.map_batches(BatchWorker, batch_size=1, batch_format="numpy",
                                fn_constructor_kwargs={"config": config},
                                compute=ray.data.ActorPoolStrategy(size=count,
                                                                   max_tasks_in_flight_per_actor=TASKS_PER_ACTOR),
                                num_cpus=cpus, num_gpus=gpus or None)
            try:
                for row in ds.iter_rows():
                    if first is None:  # since the job's start: actors started, models loaded, one batch coded
                        first = time.perf_counter() - start
                    entries = json.loads(row["result"])
                    if isinstance(entries, dict):  # {"fatal": reason}: an actor could not load the model
                        raise PercoError(f"the batch job stopped: an actor cannot load the model: {entries['fatal']}")
                    for entry in entries:
                        (result["failed"] if "error" in entry else result["done"]).append(entry)
                    bar.update(len(entries))
                    if notify is not None:
                        notify(len(entries))
            except PercoError:
                raise
            except (KeyboardInterrupt, SystemExit):
                raise
            except Exception as exc:  # noqa: BLE001 - Ray's wrapping of an actor or cluster failure: one line
                raise _job_error(exc) from None
    finally:
        bar.close()
    result["done"].sort(key=lambda e: e["input"])
    nodes = sum(1 for n in ray.nodes() if n.get("Alive"))
    return {"actors": count, "cpus_per_actor": cpus, "gpus_per_actor": gpus, "nodes": nodes,
            "first_batch_seconds": first, "sizes": _sizes(chunks)}


def _sizes(chunks: list) -> dict:
    """{"WxH": {"items", "batches"}} of the batches a job ran."""
    out = {}
    for chunk in chunks:
        entry = out.setdefault("{}x{}".format(*chunk[0]["size"]), {"items": 0, "batches": 0})
        entry["items"] += len(chunk)
        entry["batches"] += 1
    return dict(sorted(out.items()))


def _warnings(verb: str, todo: list, captioner) -> list:
    if verb != "compress" or captioner:
        return []
    empty = sum(1 for item in todo if not item["caption"])
    if not empty:
        return []
    return [f"{empty} of {len(todo)} images have no caption (no --caption, --captions entry or --captioner): the "
            "decoder has no global context for them"]


def _write_report(path: Path, result: dict) -> None:
    from perco.engine.files import atomic_json

    try:
        atomic_json(path, result)
    except OSError as exc:
        raise OutputError(f"cannot write the report {path}: {exc.strerror or exc}") from None


def summary(result: dict) -> str:
    """The one-line summary the CLI prints: counts, time, throughput, actors."""
    return (f"batch {result['verb']}: {len(result['done'])} done, {len(result['skipped'])} skipped, "
            f"{len(result['failed'])} failed in {result['seconds']:.1f} s ({result['items_per_second']:.2f} images/s"
            f" on {result['actors']} actor{'s' if result['actors'] != 1 else ''}); report: {result['report']}")


# --- CLI ------------------------------------------------------------------------------------------------------


def add_commands(sub) -> dict:
    """`perco batch compress|decompress`; returns {verb: handler}."""
    from perco.engine import cli

    p = sub.add_parser("batch", help="compress or decompress many files on a Ray cluster",
                       description="Compress a folder of images, or decompress a folder of bitstreams, on a pool of "
                                   "Ray actors (one per GPU, or CPU actors). Valid outputs of an earlier run are "
                                   "skipped; failed inputs are listed in a JSON report (exit code 1). docs/batch.md")
    verbs = p.add_subparsers(dest="batch_verb", metavar="VERB", parser_class=type(p), required=True)

    c = verbs.add_parser("compress", help="images -> bitstreams (OUTPUT/<stem>.perco)",
                         description="Compress every image of INPUT to OUTPUT/<stem>.perco.")
    _io_args(c, "a folder of images, a glob ('photos/*.jpg') or a list file (one image path per line)")
    cli.model_arg(c, required=False)
    captions = c.add_mutually_exclusive_group()
    captions.add_argument("--caption", default=None, metavar="TEXT", help="one caption for every image")
    captions.add_argument("--captions", default=None, metavar="FILE",
                          help="a JSON object {image file name: caption}; images it does not name go to "
                               "--captioner, else get the empty caption")
    cli.captioner_args(c)
    c.add_argument("--seed", type=cli.uint64, default=0, metavar="N", help="decoder noise seed (default: 0)")
    _job_args(c, cli)

    d = verbs.add_parser("decompress", help="bitstreams -> images (OUTPUT/<stem>.png)",
                         description="Decode every bitstream of INPUT to OUTPUT/<stem>.png, bitstreams of one image "
                                     "size together (Codec.decompress_batch).")
    _io_args(d, "a folder of .perco files, a glob ('coded/*.perco') or a list file (one path per line)")
    cli.model_arg(d, required=False)
    d.add_argument("--steps", type=cli.positive_int, default=None, metavar="N",
                   help="denoising steps (default: the bitstream's hint, else the model's)")
    d.add_argument("--guidance", type=cli.guidance_type, default=None, metavar="G",
                   help="classifier-free guidance scale, 0..50 (default: the bitstream's hint, else 3.0)")
    cli.sampler_args(d)
    _job_args(d, cli)
    return {"batch": cmd_batch}


def _io_args(p, what: str) -> None:
    p.add_argument("input", metavar="INPUT", help=what)
    p.add_argument("-o", "--output", required=True, metavar="OUTPUT", help="output folder (made if missing)")


def _job_args(p, cli) -> None:
    cli.backend_arg(p)
    p.add_argument("--address", default=None, metavar="ray://HOST:PORT|auto|local",
                   help="Ray cluster: ray://HOST:10001 (Ray client), auto (the cluster 'ray start' made here), "
                        "HOST:6379, or local (default: a new cluster on this machine)")
    p.add_argument("--actors", type=cli.positive_int, default=None, metavar="N",
                   help="actors (default: one per GPU, else one per node with the node's CPUs)")
    p.add_argument("--batch-size", type=cli.positive_int, default=8, metavar="N",
                   help="images of one size per actor call (default: %(default)s)")
    p.add_argument("--report", default=None, metavar="FILE", help=f"JSON report (default: OUTPUT/{REPORT_NAME})")
    cli.quiet_arg(p)


def cmd_batch(args) -> None:
    verb = args.batch_verb
    captions = decode = None
    if verb == "compress":
        captions = read_captions(args.captions) if args.captions else args.caption
    else:
        decode = {"steps": args.steps, "guidance": args.guidance, "sampler": args.sampler,
                  "guidance_stop": args.guidance_stop}
    result = run_job(verb, args.input, args.output, model=args.model, backend=args.backend, artifacts=args.artifacts,
                     address=args.address, actors=args.actors, batch_size=args.batch_size, captions=captions,
                     seed=getattr(args, "seed", 0), decode_options=decode, progress=not args.quiet,
                     report=args.report, max_pixels=args.max_pixels, captioner=getattr(args, "captioner", None),
                     captioner_model=getattr(args, "captioner_model", None))
    if not args.quiet:
        print(summary(result), file=sys.stderr)
    failed = result["failed"]
    if failed:
        total = len(failed) + len(result["done"]) + len(result["skipped"])
        raise PercoError(f"{len(failed)} of {total} inputs failed (first: {failed[0]['input']}: {failed[0]['error']});"
                         f" all in {result['report']}")
