"""`perco batch` on a real local Ray cluster (started once for the module, 2 CPUs): Ray Data actor pools holding a
Codec each, same-size batching, per-item failures in the report, resume, and the CLI's one-line errors.

Each batch output is compared with the same call made in this process (Codec.compress: the same bytes;
Codec.decompress_batch on the same group in the same order: the same pixels, within the one level that another
thread count may move a rounding).
"""

import json
import os
import shutil
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from perco.engine import Codec, bitstream
from perco.engine.cli import main
from perco.engine.errors import ExtensionError, PercoError, UsageError
from perco.engine.imageio import load_image
from perco.engine.model import ModelInfo

from conftest import random_image

ray = pytest.importorskip("ray")
batch = pytest.importorskip("perco.scale.batch")

SEED = 3
STEPS = 2
SIZES = {"a": (64, 64), "b": (64, 64), "c": (64, 64), "d": (64, 96)}  # name -> (height, width)
CAPTIONS = {"a.png": "a red barn on a green hill", "d.png": "a river in a forest"}


@pytest.fixture(scope="module")
def cluster():
    started = not ray.is_initialized()
    if started:
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
                 object_store_memory=100 << 20, logging_level="ERROR")
    yield ray
    if started:
        ray.shutdown()


@pytest.fixture(scope="module")
def local_codec(tiny_model):
    return Codec.from_pretrained(tiny_model, backend="torch")


def _forge(data: bytes) -> bytes:
    """A bitstream with its index stream garbled and a fresh CRC: it parses (so the driver passes it on), then
    fails in the actor's entropy decoding, which makes its batch fall back to one-by-one decoding."""
    sections = bitstream.parse(data)[3]
    body = bytearray(data[: -bitstream.CRC_BYTES])
    for k in range(sections.header + sections.caption, len(body)):
        body[k] ^= 0xFF
    return bytes(body) + struct.pack("<I", zlib.crc32(bytes(body)))


@pytest.fixture(scope="module")
def blip2(tmp_path_factory):
    from perco.export.captioners import write_tiny_blip2

    return write_tiny_blip2(tmp_path_factory.mktemp("blip2") / "tiny")


@pytest.fixture(scope="module")
def compressed(cluster, tiny_model, blip2, tmp_path_factory):
    """(report, images folder, output folder): a batch compress of four images and one corrupt .png, 2 actors;
    the two images without a caption in CAPTIONS are captioned by a tiny random BLIP-2 in the actor."""
    root = tmp_path_factory.mktemp("batch-compress")
    images = root / "images"
    images.mkdir()
    for i, (name, (h, w)) in enumerate(SIZES.items()):
        Image.fromarray(random_image(h, w, seed=i)).save(images / f"{name}.png")
    (images / "broken.png").write_bytes(b"this is not a PNG file")
    (images / "notes.txt").write_text("not an input: a folder contributes its images only")
    report = batch.run_job("compress", images, root / "coded", model=tiny_model, actors=2, captions=CAPTIONS,
                           seed=SEED, captioner="blip2", captioner_model=blip2)
    return report, images, root / "coded"


@pytest.fixture(scope="module")
def decompressed(cluster, tiny_model, other_seed_model, compressed, tmp_path_factory):
    """(report, input folder, output folder): the coded files plus a forged one (same size as d, in d's batch: it
    fails its check alone), a truncated one and one from another model; batch size 4, the default actor layout."""
    _, _, coded = compressed
    root = tmp_path_factory.mktemp("batch-decompress")
    inputs = root / "inputs"
    inputs.mkdir()
    for name in SIZES:
        shutil.copy(coded / f"{name}.perco", inputs)
    data = (coded / "d.perco").read_bytes()
    (inputs / "e_forged.perco").write_bytes(_forge(data))
    (inputs / "f_truncated.perco").write_bytes(data[:-3])
    with Codec.from_pretrained(other_seed_model, backend="torch") as other:
        (inputs / "g_other.perco").write_bytes(other.compress(random_image(64, 64), seed=SEED))
    report = batch.run_job("decompress", inputs, root / "decoded", model=tiny_model, batch_size=4,
                           decode_options={"steps": STEPS})
    return report, inputs, root / "decoded"


def _by_name(entries) -> dict:
    return {Path(e["input"]).stem: e for e in entries}


def test_compress_codes_every_image_and_reports_the_corrupt_one(compressed, local_codec, blip2):
    from perco.export.captioners import Blip2Captioner

    report, images, coded = compressed
    # b and c share a batch (64x64, with a): the actor captions them in one call, as here
    captions = dict(CAPTIONS, **dict(zip(["b.png", "c.png"], Blip2Captioner(blip2)(
        [load_image(images / "b.png"), load_image(images / "c.png")]))))
    assert all(captions.values())
    assert [Path(e["input"]).name for e in report["failed"]] == ["broken.png"]
    reason = report["failed"][0]["error"]
    assert "not a recognised image format" in reason and "\n" not in reason
    done = _by_name(report["done"])
    assert sorted(done) == sorted(SIZES) and report["skipped"] == [] and report["actors"] == 2
    for name in SIZES:
        expected = local_codec.compress(load_image(images / f"{name}.png"), caption=captions[f"{name}.png"],
                                        seed=SEED)
        assert done[name]["caption"] == captions[f"{name}.png"]
        assert (coded / f"{name}.perco").read_bytes() == expected, name
        assert done[name]["bytes"] == len(expected) and done[name]["output"] == str(coded / f"{name}.perco")
    assert report["sizes"] == {"64x64": {"items": 3, "batches": 1}, "96x64": {"items": 1, "batches": 1}}
    assert report["warnings"] == []  # the captioner captions what CAPTIONS leaves out
    on_disk = json.loads((coded / "report.json").read_text())
    assert on_disk["done"] == report["done"] and on_disk["failed"] == report["failed"]
    assert report["items_per_second"] == pytest.approx(len(report["done"]) / report["seconds"])
    assert not list(coded.glob(".*.tmp"))


def test_decompress_batches_one_size_and_matches_decompress_batch(decompressed, local_codec):
    report, inputs, decoded = decompressed
    failed = _by_name(report["failed"])
    assert sorted(failed) == ["e_forged", "f_truncated", "g_other"]
    assert "corrupt index stream" in failed["e_forged"]["error"]
    assert "CRC-32" in failed["f_truncated"]["error"]
    assert "made for model" in failed["g_other"]["error"]
    done = _by_name(report["done"])
    assert sorted(done) == sorted(SIZES)
    # a, b, c (64x64) were decoded as one batch; d's batch-mate (the forged file) failed its check, so d decoded alone
    assert [done[n]["batch"] for n in "abcd"] == [3, 3, 3, 1]
    assert report["sizes"] == {"64x64": {"items": 3, "batches": 1}, "96x64": {"items": 2, "batches": 1}}
    together = local_codec.decompress_batch([(inputs / f"{n}.perco").read_bytes() for n in "abc"], steps=STEPS)
    alone = local_codec.decompress((inputs / "d.perco").read_bytes(), steps=STEPS)
    for name, expected in zip("abcd", [*together, alone]):
        with Image.open(decoded / f"{name}.png") as img:
            assert img.format == "PNG"
            got = np.asarray(img.convert("RGB"))
        assert got.shape == expected.shape == (*SIZES[name], 3), name
        assert np.abs(got.astype(int) - expected.astype(int)).max() <= 1, name
        assert done[name]["bytes"] == (decoded / f"{name}.png").stat().st_size
    assert not (decoded / "e_forged.png").exists() and not (decoded / "f_truncated.png").exists()


def test_rerun_skips_valid_outputs_and_redoes_broken_ones(decompressed, tiny_model, capsys):
    report, inputs, decoded = decompressed
    first = {n: np.asarray(Image.open(decoded / f"{n}.png")) for n in "abc"}
    d_stat = (decoded / "d.png").stat()
    a = (decoded / "a.png").read_bytes()
    (decoded / "a.png").write_bytes(a[: len(a) // 2])  # a half file, as a non-atomic writer leaves it
    (decoded / "b.png").unlink()
    Image.fromarray(random_image(8, 8)).save(decoded / "c.png")  # a readable PNG of the wrong size
    stale = decoded / ".a.png.x1y2z3.tmp"  # what a killed atomic_write leaves
    stale.write_bytes(b"partial")
    code = main(["batch", "decompress", str(inputs), "-o", str(decoded), "--model", str(tiny_model), "--steps",
                 str(STEPS), "--batch-size", "4", "-q"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1  # the three bad inputs fail again
    assert len(err) == 1 and err[0].startswith("error: 3 of 7 inputs failed") and "report.json" in err[0]
    rerun = json.loads((decoded / "report.json").read_text())
    assert [Path(e["input"]).stem for e in rerun["skipped"]] == ["d"]
    assert sorted(_by_name(rerun["done"])) == ["a", "b", "c"]
    assert [e["batch"] for e in rerun["done"]] == [3, 3, 3]
    assert (decoded / "d.png").stat().st_mtime_ns == d_stat.st_mtime_ns
    for name, expected in first.items():  # the same batch again: the same pixels
        assert np.array_equal(np.asarray(Image.open(decoded / f"{name}.png")), expected), name
    assert not stale.exists()


def test_plan_skips_only_valid_bitstreams(compressed, tiny_model, other_seed_model, tmp_path):
    _, images, coded = compressed
    out = tmp_path / "coded"
    shutil.copytree(coded, out)
    data = (out / "a.perco").read_bytes()
    (out / "a.perco").write_bytes(data[:-5])  # truncated
    (out / "b.perco").write_bytes(b"")  # empty
    shutil.copy(out / "d.perco", out / "c.perco")  # valid, but of another image size
    paths = batch.resolve_inputs("compress", images)
    targets = batch._outputs("compress", paths, out)
    spec = ModelInfo.open(tiny_model).spec
    todo, skipped, failed = batch.plan("compress", paths, targets, spec, seed=SEED)
    assert [Path(i["input"]).stem for i in todo] == ["a", "b", "c"]
    assert [Path(e["input"]).stem for e in skipped] == ["d"] and [Path(e["input"]).stem for e in failed] == ["broken"]
    todo, skipped, _ = batch.plan("compress", paths, targets, spec, seed=SEED + 1, captions={"a.png": "a barn"})
    assert len(todo) == 4 and skipped == []  # another seed: redo all
    assert [i["caption"] for i in todo] == ["a barn", None, None, None]
    assert "3 of 4 images have no caption" in batch._warnings("compress", todo, None)[0]
    assert batch._warnings("compress", todo, "blip2") == []
    other = ModelInfo.open(other_seed_model).spec
    todo, skipped, _ = batch.plan("compress", paths, targets, other, seed=SEED)  # another model: redo all
    assert len(todo) == 4 and skipped == []


def test_batches_hold_one_size_largest_first():
    items = [{"input": f"{i}.png", "size": size} for i, size in
             enumerate([[64, 64], [96, 64], [64, 64], [64, 64], [96, 64], [64, 64], [32, 32]])]
    chunks = batch.batches(items, 3)
    assert [[i["input"] for i in c] for c in chunks] == [["1.png", "4.png"], ["0.png", "2.png", "3.png"],
                                                         ["5.png"], ["6.png"]]


def test_inputs_folder_glob_list_file(tmp_path):
    for name in ("x.png", "y.jpg", "z.perco", "notes.txt"):
        (tmp_path / name).write_bytes(b"")
    assert [p.name for p in batch.resolve_inputs("compress", tmp_path)] == ["x.png", "y.jpg"]
    assert [p.name for p in batch.resolve_inputs("decompress", tmp_path)] == ["z.perco"]
    assert [p.name for p in batch.resolve_inputs("compress", str(tmp_path / "*.jpg"))] == ["y.jpg"]
    sub = tmp_path / "lists"
    sub.mkdir()
    (sub / "inputs.txt").write_text("# two images\n../x.png\n\n../y.jpg\n../x.png\n")
    assert batch.resolve_inputs("compress", sub / "inputs.txt") == [sub / "../x.png", sub / "../y.jpg"]
    with pytest.raises(PercoError, match="no inputs: folder .* holds no images"):
        batch.resolve_inputs("compress", sub)
    with pytest.raises(PercoError, match="does not exist"):
        batch.resolve_inputs("compress", tmp_path / "missing")
    with pytest.raises(PercoError, match="holds no .perco bitstreams"):
        batch.resolve_inputs("decompress", str(tmp_path / "*.nothing"))


def test_name_clash_and_bad_options_fail_before_any_work(tmp_path, tiny_model):
    images = tmp_path / "images"
    images.mkdir()
    (images / "x.png").write_bytes(b"")
    (images / "x.jpg").write_bytes(b"")
    out = tmp_path / "out"
    with pytest.raises(PercoError, match=r"x.jpg and .*x.png would both write .*x.perco"):
        batch.run_job("compress", images, out, model=tiny_model)
    assert not out.exists()
    with pytest.raises(UsageError, match="bad Ray address"):
        batch.run_job("compress", images, out, model=tiny_model, address="ray://nohost")
    with pytest.raises(UsageError, match="unknown decode option"):
        batch.run_job("decompress", images, out, model=tiny_model, decode_options={"stepz": 2})
    with pytest.raises(PercoError, match="model folder .* does not exist"):
        batch.run_job("decompress", [images / "x.png"], out, model=tmp_path / "no-model")


def test_cli_errors_are_one_line(tmp_path, capsys):
    cases = [
        (["batch", "compress", str(tmp_path / "missing"), "-o", str(tmp_path / "out")], 1, "does not exist"),
        (["batch", "compress", str(tmp_path), "-o", str(tmp_path / "out"), "--bogus"], 2, "unrecognized arguments"),
        (["batch", "decompress", str(tmp_path), "-o", str(tmp_path / "o"), "--address", "a b:1"], 2, "bad Ray address"),
        (["batch", "decompress", str(tmp_path), "-o", str(tmp_path / "o"), "--batch-size", "0"], 2, "positive"),
        (["batch"], 2, "required: VERB"),
    ]
    for argv, code, text in cases:
        assert main(argv) == code, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ") and text in err[0], (argv, err)
    assert not (tmp_path / "out").exists()


def test_missing_ray_is_an_extension_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` now raises ImportError
    with pytest.raises(ExtensionError, match=r"perco-engine\[scale\]"):
        batch.ray_session().__enter__()


def test_module_imports_neither_ray_nor_torch():
    code = ("import sys, perco.scale.batch; bad = [m for m in ('ray', 'torch') if m in sys.modules]; "
            "sys.exit(', '.join(bad) or None)")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": ""})
    assert run.returncode == 0, run.stderr


def test_spread_gives_every_actor_a_batch():
    items = [{"input": f"{i}.png", "size": [64, 64]} for i in range(5)]
    assert [len(c) for c in batch.spread(items, 8, 1)] == [5]
    assert [len(c) for c in batch.spread(items, 8, 2)] == [3, 2]
    assert [len(c) for c in batch.spread(items, 8, 3)] == [2, 2, 1]
    assert [len(c) for c in batch.spread(items, 8, 9)] == [1] * 5  # never more batches than items


def test_actor_layout_on_the_local_cluster(cluster):
    assert batch.actor_layout(cluster) == (1, 2.0, 0.0)  # one node: one actor with its 2 CPUs
    assert batch.actor_layout(cluster, 2) == (2, 1.0, 0.0)
    assert batch.actor_layout(cluster, 4) == (4, 0.5, 0.0)  # more actors than CPUs: fractional shares


class _GpuCluster:
    """A stand-in for the two calls actor_layout makes (cluster_resources, nodes), describing two nodes with
    16 CPUs and 2 GPUs each: it checks the GPU arithmetic this CPU-only machine cannot reach, not Ray."""

    node = {"Alive": True, "Resources": {"CPU": 16.0, "GPU": 2.0}}

    def cluster_resources(self):
        return {"CPU": 32.0, "GPU": 4.0}

    def nodes(self):
        return [self.node, self.node, {"Alive": False, "Resources": {"CPU": 64.0}}]


def test_actor_layout_one_actor_per_gpu():
    assert batch.actor_layout(_GpuCluster()) == (4, 8.0, 1.0)  # one per GPU, with its share of the node's CPUs
    assert batch.actor_layout(_GpuCluster(), 8) == (8, 4.0, 0.5)  # two actors per GPU
    assert batch.actor_layout(_GpuCluster(), 2) == (2, 8.0, 1.0)


def test_a_dead_address_fails_fast():
    import socket

    with socket.socket() as s:  # a port nothing listens on: bound, never listening
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        with pytest.raises(PercoError, match=f"nothing answers at 127.0.0.1:{port}"):
            batch.probe(f"127.0.0.1:{port}", timeout=5)
        with pytest.raises(PercoError, match=f"nothing answers at 127.0.0.1:{port}"):
            batch.probe(f"ray://127.0.0.1:{port}", timeout=5)


def test_a_worker_that_cannot_load_the_model_reports_it_to_the_driver(tmp_path):
    """In this process (no Ray): the actor class keeps the load error and answers every batch with it, so the
    driver stops the job with that reason instead of Ray printing a dead actor's traceback."""
    worker = batch.BatchWorker({"verb": "decompress", "model": str(tmp_path / "gone"), "backend": "torch",
                                "artifacts": None, "decode_options": {}, "seed": 0})
    out = worker({"batch": np.array([json.dumps([{"input": "x.perco"}])] * 2, dtype=object)})
    assert [json.loads(r) for r in out["result"]] == [{"fatal": f"model folder {tmp_path / 'gone'} does not exist"}] * 2


def test_worker_checks_each_bitstream_once_groups_by_hints_and_isolates_a_failing_decode(tiny_model, tmp_path,
                                                                                         monkeypatch):
    """In this process (no Ray): every bitstream is unpacked once; the valid ones are decoded together per
    (steps, guidance) from their own hints; a decode that fails for the group is retried one by one, so only
    the item that fails alone is reported."""
    from perco.engine.bitstream import Hints

    worker = batch.BatchWorker({"verb": "decompress", "model": str(tiny_model), "backend": "torch",
                                "artifacts": None, "decode_options": {}, "seed": 0})
    codec = worker.codec
    streams = {"a": codec.compress(random_image(64, 64, seed=1), seed=SEED, hints=Hints(steps=2)),
               "b": codec.compress(random_image(64, 64, seed=2), caption="a poisoned caption", seed=SEED,
                                   hints=Hints(steps=2)),
               "c": codec.compress(random_image(64, 64, seed=3), seed=SEED, hints=Hints(steps=2)),
               "d": codec.compress(random_image(64, 64, seed=4), seed=SEED, hints=Hints(steps=1)),
               "e": b"PRC not a bitstream"}
    items = []
    for name, data in streams.items():
        (tmp_path / f"{name}.perco").write_bytes(data)
        items.append({"input": f"{name}.perco", "read": str(tmp_path / f"{name}.perco"),
                      "output": f"{name}.png", "write": str(tmp_path / f"{name}.png")})
    calls, decode = [], codec.decompress_unpacked

    def poisoned(decoded, **kwargs):
        calls.append((len(decoded), kwargs["steps"]))
        if any(len(ids) for _, ids, _ in decoded):  # b's caption: a failure that is not the bitstream's
            raise RuntimeError("boom")
        return decode(decoded, **kwargs)

    monkeypatch.setattr(codec, "decompress_unpacked", poisoned)
    results = {Path(r["input"]).stem: r for r in worker._decompress(items)}
    assert calls == [(3, 2), (1, 2), (1, 2), (1, 2), (1, 1)]  # a+b+c together, then one by one; d alone
    assert results["b"] == {"input": "b.perco", "error": "internal error (RuntimeError: boom)"}
    assert "error" in results["e"] and "\n" not in results["e"]["error"]
    assert [results[n]["batch"] for n in "acd"] == [1, 1, 1]
    expected = decode([codec.unpack(streams["a"])], steps=2, guidance=codec.decode_settings(Hints())[1])[0]
    with Image.open(tmp_path / "a.png") as img:
        assert np.array_equal(np.asarray(img.convert("RGB")), expected)
    assert not (tmp_path / "b.png").exists() and not (tmp_path / "e.png").exists()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_job_through_ray_client_on_a_cluster_that_ray_start_made(tiny_model, local_codec, tmp_path):
    """A real cluster as users run one: `ray start --head` in its own process (127.0.0.1 only, token
    authentication with a token of this test's own), then `perco batch decompress --address ray://...` in
    another process, as a Ray Client. Ray Data cannot run in a client (it has no core worker), so the job's loop
    runs as a task on the cluster; the images must equal an in-process decode."""
    import secrets
    import socket
    import tempfile
    import time

    inputs, out = tmp_path / "in", tmp_path / "out"
    inputs.mkdir()
    for i in range(3):
        (inputs / f"x{i}.perco").write_bytes(local_codec.compress(random_image(64, 64, seed=10 + i), seed=SEED))
    gcs, client = _free_port(), _free_port()
    env = dict(os.environ, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(16), RAY_USAGE_STATS_ENABLED="0")
    temp = tempfile.mkdtemp(prefix="perco-ray-")  # short: Ray's socket paths under it must fit in 107 bytes
    head = subprocess.Popen([str(Path(sys.executable).with_name("ray")), "start", "--head", "--block",
                             f"--port={gcs}", f"--ray-client-server-port={client}", "--node-ip-address=127.0.0.1",
                             "--num-cpus=1", "--include-dashboard=false", "--object-store-memory=100000000",
                             f"--temp-dir={temp}"], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 90
        while True:  # the client server is the last to listen
            assert head.poll() is None, "ray start --head exited"
            try:
                socket.create_connection(("127.0.0.1", client), timeout=1).close()
                break
            except OSError:
                assert time.monotonic() < deadline, "the Ray client server did not start in 90 s"
                time.sleep(0.5)
        run = subprocess.run([sys.executable, "-m", "perco.engine.cli", "batch", "decompress", str(inputs), "-o",
                              str(out), "--model", str(tiny_model), "--steps", str(STEPS), "--batch-size", "2",
                              "--address", f"ray://127.0.0.1:{client}"], env=env, capture_output=True, text=True,
                             timeout=240)
        logs = "".join(f.read_text(errors="replace")[-1500:] for f in Path(temp).glob("session_*/logs/ray_client*.err"))
        assert run.returncode == 0, run.stderr[-2000:] + "\n" + logs
        assert "3 done, 0 skipped, 0 failed" in run.stderr
    finally:
        # ray start and what it started (its process group: the client server and its per-client server, which
        # would hold port 23000 for the next cluster otherwise), then any process of the session that left it
        os.killpg(head.pid, 9)
        subprocess.run(["pkill", "-KILL", "-f", temp], check=False)
        head.wait(timeout=60)
        shutil.rmtree(temp, ignore_errors=True)
    report = json.loads((out / "report.json").read_text())
    assert report["nodes"] == 1 and report["actors"] == 1 and len(report["done"]) == 3
    for i in range(3):
        expected = local_codec.decompress((inputs / f"x{i}.perco").read_bytes(), steps=STEPS)
        with Image.open(out / f"x{i}.png") as img:
            got = np.asarray(img.convert("RGB"))
        assert np.abs(got.astype(int) - expected.astype(int)).max() <= 1


def test_captions_file_is_the_evaluate_format_keyed_by_name_or_stem(tmp_path):
    """`perco batch compress --captions` reads what `perco evaluate --captions` reads: JSON or TSV, keyed by file
    name or stem; an input it does not name gets None (the captioner's caption, else the empty one)."""
    (tmp_path / "c.tsv").write_text("a.png\ta red barn\nb\ta cat\n", encoding="utf-8")
    (tmp_path / "c.json").write_text(json.dumps({"a": "a red barn", "b.png": "a cat"}), encoding="utf-8")
    paths = [tmp_path / "a.png", tmp_path / "b.png", tmp_path / "c.png"]
    for name in ("c.tsv", "c.json"):
        assert batch._caption_map(batch.read_captions(tmp_path / name), paths) == ["a red barn", "a cat", None]
    (tmp_path / "bad.tsv").write_text("no tab here\n", encoding="utf-8")
    with pytest.raises(PercoError, match="line 1: expected 'name<TAB>caption'"):
        batch.read_captions(tmp_path / "bad.tsv")
