"""ONNX export of every graph, graph cleanup, and the artifacts manifest.

Artifacts folder:
    manifest.json                   written last, atomically; the only entry point
    <graph>-<key12>.onnx[.data]     one per graph; external data when the graph exceeds 2 GB
    tokenizer-<fp8>/                the model's tokenizer files (for compressing captions)

`key` is a content hash of (model fingerprint, opset, profile, exporter versions): re-running an
unchanged export reuses the files after verifying their hashes; a changed export writes new
names, so an interrupted run never leaves the manifest pointing at a broken file.
"""

import gc
import hashlib
import json
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import onnx
import torch

from perco.engine import families
from perco.engine.errors import ModelError, PercoError
from perco.engine.files import ENTROPY_FILES, FAST_TOKENIZER_COPY, atomic_json, copy_folder
from perco.engine.graphs import ENTROPY_CONTRACT, ENTROPY_GRAPH, GRAPHS
from perco.engine.manifest import MANIFEST, MANIFEST_FORMAT, file_sha256, read_manifest
from perco.engine.model import ModelInfo
from perco.export.graphs import (
    Profile, component_groups, dynamic_axes, graph_vocab_size, io_shapes, model_constants, model_graphs, sample_inputs,
    symbol_sizes,
)

DEFAULT_OPSET = 18
_EXTERNAL_DATA_BYTES = 1_900_000_000  # protobuf cannot hold 2 GB


def export_key(info: ModelInfo, opset: int, profile: Profile) -> str:
    from importlib.metadata import version

    payload = {
        "format": MANIFEST_FORMAT,
        "fingerprint": info.fingerprint.hex(),
        **({"optional_text": info.optional_text_digest} if info.optional_text else {}),
        "opset": opset,
        "profile": profile.to_dict(),
        "torch": torch.__version__,
        "onnx": onnx.__version__,
        "perco-engine": version("perco-engine"),
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def check_profile(profile: Profile, pad_multiple: int) -> None:
    for name in ("batch", "height", "width"):
        lo, opt, hi = getattr(profile, name)
        if not 1 <= lo <= opt <= hi:
            raise PercoError(f"{name} range {lo}:{opt}:{hi} must satisfy 1 <= min <= opt <= max")
        if name != "batch" and any(v % pad_multiple for v in (lo, opt, hi)):
            raise PercoError(f"{name} range {lo}:{opt}:{hi}: every value must be a multiple of {pad_multiple} "
                             f"(this model pads images to that multiple)")


def export_model(model_dir, out_dir, opset: int = DEFAULT_OPSET, profile: Profile = Profile(), log=print) -> Path:
    """Export every graph of GRAPHS; return the manifest path. Reuses an identical earlier export."""
    info = ModelInfo.open(model_dir)
    check_profile(profile, info.pad_multiple)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    key = export_key(info, opset, profile)
    if _reusable(out, key):
        log(f"artifacts in {out} are up to date (key {key[:12]}); reusing them")
        return out / MANIFEST

    log(f"exporting {info.folder} to {out} (opset {opset}, key {key[:12]})")
    sizes = symbol_sizes(profile, info.rate.token_stride, model_constants(info), info.family.latent_factor)
    contract = info.family.contract(bool(info.optional_text))
    entries = {}
    for components in component_groups(info):  # one network (or pair) in memory at a time
        graphs = model_graphs(info, components)
        for name, module in graphs.items():
            start = time.perf_counter()
            log(f"[{len(entries) + 1}/{len(contract)}] {name}")
            args = sample_inputs(name, sizes, graph_vocab_size(info, name), info.rate.codebook_size, contract=contract)
            entries[name] = _export_graph(module, name, args, out, key, opset, sizes, log, contract)
            entries[name]["export_seconds"] = round(time.perf_counter() - start, 3)
            if any(n.startswith("input_ids") for n, _, _ in contract[name].inputs):  # its own vocabulary (T5's)
                entries[name]["vocab_size"] = graph_vocab_size(info, name)
        del graphs
        gc.collect()
    entries = {name: entries[name] for name in contract}
    extra = {}
    if info.entropy_model is not None:  # the integer network, built node by node (not traced): exact on every provider
        entries[ENTROPY_GRAPH] = _export_entropy_graph(info, out, key, log)
        extra["entropy_model"] = f"entropy_model-{info.fingerprint[:4].hex()}"
        copy_folder(info.folder / "entropy_model", out / extra["entropy_model"], names=ENTROPY_FILES, replace=True)

    tokenizer = f"tokenizer-{info.fingerprint[:4].hex()}"
    copy_folder(info.folder / "tokenizer", out / tokenizer, replace=True)
    if info.optional_text:  # the decoder re-tokenizes the caption text for it (perco.engine.text.Retokenizer)
        copy_folder(info.folder / info.optional_text.tokenizer, out / tokenizer / info.optional_text.tokenizer,
                    names=FAST_TOKENIZER_COPY, replace=True)
    manifest = {
        "format": MANIFEST_FORMAT,
        "key": key,
        "opset": opset,
        "profile": profile.to_dict(),
        "model": info.spec.to_dict(),
        "tokenizer": tokenizer,
        **extra,
        "graphs": entries,
    }
    atomic_json(out / MANIFEST, manifest)
    _remove_unreferenced(out, manifest)
    log(f"wrote {out / MANIFEST}")
    return out / MANIFEST


def _export_entropy_graph(info: ModelInfo, out: Path, key: str, log) -> dict:
    from perco.export.entropy_model import export_entropy_graph

    start = time.perf_counter()
    filename = f"{ENTROPY_GRAPH}-{key[:12]}.onnx"
    log(f"[+] {ENTROPY_GRAPH} (integer network, {info.entropy_model.config.channels} channels)")
    export_entropy_graph(info.entropy_model, out / filename)
    return {
        "file": filename, "external_data": None, "sha256": {filename: file_sha256(out / filename)},
        "bytes": (out / filename).stat().st_size,
        "inputs": [{"name": n, "dtype": d, "shape": s} for n, d, s in ENTROPY_CONTRACT.inputs],
        "outputs": [{"name": n, "dtype": d, "shape": s} for n, d, s in ENTROPY_CONTRACT.outputs],
        "export_seconds": round(time.perf_counter() - start, 3),
    }


def _reusable(out: Path, key: str) -> bool:
    try:
        manifest = read_manifest(out, verify=True)
    except PercoError:
        return False
    return manifest.get("key") == key


def _export_graph(module, name: str, args: tuple, out: Path, key: str, opset: int, sizes: dict, log,
                  graphs: dict = GRAPHS) -> dict:
    contract = graphs[name]
    input_names = [n for n, _, _ in contract.inputs]
    output_names = [n for n, _, _ in contract.outputs]
    filename = f"{name}-{key[:12]}.onnx"
    with tempfile.TemporaryDirectory(prefix=f".{name}-", dir=out) as tmp:
        raw = Path(tmp) / "raw.onnx"
        with torch.no_grad(), warnings.catch_warnings():
            # tracing warns about Python branches on shapes; the graph contract fixes those shapes
            warnings.simplefilter("ignore")
            torch.onnx.export(module, args, str(raw), input_names=input_names, output_names=output_names,
                              dynamic_axes=dynamic_axes(name, graphs), opset_version=opset, do_constant_folding=True,
                              dynamo=False)
        passes = _optimize(raw)
        model = passes.pop("model")
        staged = Path(tmp) / filename
        external = _proto_bytes(model) > _EXTERNAL_DATA_BYTES
        if external:
            onnx.save_model(model, str(staged), save_as_external_data=True, all_tensors_to_one_file=True,
                            location=filename + ".data", size_threshold=1024)
        else:
            onnx.save_model(model, str(staged))
        del model
        onnx.shape_inference.infer_shapes_path(str(staged), str(staged))
        onnx.checker.check_model(str(staged))
        passes["shape_inference"] = len(onnx.load(str(staged), load_external_data=False).graph.node)
        log("    nodes: " + ", ".join(f"{k} {v}" for k, v in passes.items()) + "; onnx.checker ok")
        files = [filename] + ([filename + ".data"] if external else [])
        for f in files:  # stage complete: move into place (new names; nothing live is overwritten)
            os.replace(Path(tmp) / f, out / f)
    return {
        "file": filename,
        "external_data": filename + ".data" if external else None,
        "sha256": {f: file_sha256(out / f) for f in files},
        "bytes": sum((out / f).stat().st_size for f in files),
        "inputs": [{"name": n, "dtype": d, "shape": s} for n, d, s in contract.inputs],
        "outputs": [{"name": n, "dtype": d, "shape": s} for n, d, s in contract.outputs],
        "dynamic_axes": {k: {str(i): v for i, v in axes.items()} for k, axes in dynamic_axes(name, graphs).items()},
        "shapes": io_shapes(name, sizes, graphs),
        "nodes": passes,
    }


def _proto_bytes(model) -> int:
    """Serialized size, or more than 2 GB when protobuf refuses to serialize it at all."""
    from google.protobuf.message import EncodeError

    try:
        return model.ByteSize()
    except (ValueError, EncodeError):
        return 1 << 31


def _optimize(raw: Path) -> dict:
    """Cleanup, constant folding, cleanup again (onnx-graphsurgeon); node count after each pass."""
    import onnx_graphsurgeon as gs
    import onnxruntime

    onnxruntime.set_default_logger_severity(3)  # folding is best effort; keep its warnings quiet
    model = onnx.load(str(raw))
    counts = {"export": len(model.graph.node)}
    graph = gs.import_onnx(model)
    ir_version = model.ir_version
    del model  # the graph holds the weights now; do not keep a second copy of a multi-GB proto
    graph.cleanup().toposort()
    counts["cleanup"] = len(graph.nodes)
    graph.fold_constants(error_ok=True, size_threshold=64 << 20).cleanup().toposort()
    counts["fold_constants"] = len(graph.nodes)
    optimized = gs.export_onnx(graph)
    del graph
    optimized.ir_version = ir_version
    return dict(counts, model=optimized)


_GRAPH_NAMES = {name for f in map(families.get, families.names()) for name in f.contract(optional_text=True)}
_GRAPH_NAMES.add(ENTROPY_GRAPH)


def _remove_unreferenced(out: Path, manifest: dict) -> None:
    keep = {f for g in manifest["graphs"].values() for f in g["sha256"]}
    for path in out.iterdir():
        if path.suffix in (".onnx", ".data") and path.name not in keep and path.name.split("-")[0] in _GRAPH_NAMES:
            path.unlink()


def parity(model_dir, artifacts, seed: int = 0) -> dict:
    """Each exported graph vs the torch module on seeded inputs: max error relative to max |reference|."""
    import onnxruntime as ort

    info = ModelInfo.open(model_dir)
    manifest = read_manifest(artifacts, verify=False)
    if manifest["model"]["fingerprint"] != info.fingerprint.hex():
        raise ModelError("artifacts were exported from another model")
    graphs = model_graphs(info)
    contract = info.family.contract(bool(info.optional_text))
    profile = Profile(**{k: tuple(v) for k, v in manifest["profile"].items()})
    sizes = symbol_sizes(profile, info.rate.token_stride, model_constants(info), info.family.latent_factor)
    report = {}
    for name in contract:
        args = sample_inputs(name, sizes, graph_vocab_size(info, name), info.rate.codebook_size, seed=seed + 1,
                             contract=contract)
        with torch.no_grad():
            reference = graphs[name](*args)
        reference = [r.numpy() for r in (reference if isinstance(reference, (tuple, list)) else (reference,))]
        session = ort.InferenceSession(str(Path(artifacts) / manifest["graphs"][name]["file"]),
                                       providers=["CPUExecutionProvider"])
        feed = {n: a.numpy() for (n, _, _), a in zip(contract[name].inputs, args)}
        actual = session.run([n for n, _, _ in contract[name].outputs], feed)
        if reference[0].dtype == np.int64:
            report[name] = {"mismatch_fraction": float((actual[0] != reference[0]).mean())}
        else:  # the worst output, relative to its own scale
            err = max(float(np.abs(a - r).max() / max(float(np.abs(r).max()), 1e-12)) for a, r in zip(actual, reference))
            report[name] = {"max_rel_error": err}
    if info.entropy_model is not None and ENTROPY_GRAPH in manifest["graphs"]:  # integers: exactly equal or wrong
        report[ENTROPY_GRAPH] = _entropy_parity(info, Path(artifacts) / manifest["graphs"][ENTROPY_GRAPH]["file"],
                                                sizes, seed)
    return report


def _entropy_parity(info: ModelInfo, path: Path, sizes: dict, seed: int) -> dict:
    """The ONNX integer network vs the numpy reference on a seeded grid with a random half masked."""
    import onnxruntime as ort

    rng = np.random.default_rng(seed)
    k = info.entropy_model.config.codebook_size
    shape = (sizes["gh"][1], sizes["gw"][1])
    ids = np.where(rng.random(shape) < 0.5, rng.integers(0, k, shape), k).astype(np.int64)
    logits = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(["logits"], {"ids": ids})[0]
    return {"mismatch_fraction": float((logits != info.entropy_model.net.logits(ids)).mean())}


def export_into_cache(model_dir, progress: bool) -> Path:
    """The artifacts of `model_dir` in the cache, exported there first if needed (the `export_into_cache`
    hook: the onnxruntime backend given only a model folder)."""
    from perco.engine.demo import cache_dir

    folder = cache_dir() / "artifacts" / ModelInfo.open(model_dir).fingerprint.hex()
    log = (lambda text: print(text, file=sys.stderr)) if progress else (lambda text: None)
    export_model(model_dir, folder, log=log)
    return folder
