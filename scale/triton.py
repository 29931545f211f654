"""`perco triton-repo --engines DIR -o REPO`: a Triton Inference Server model repository from a `perco build` folder.

REPO (Triton's model-repository layout, one folder per model, one version each):
    README.txt                       what is here, how to serve it, what has and has not been checked
    perco_repo.json                  what this command wrote: the engines' I/O, profiles, hashes, the files
    <graph>/config.pbtxt             platform tensorrt_plan: the engine's inputs, outputs, dtypes, dims
    <graph>/1/model.plan             the engine of engines.json, hard-linked (or copied), never a symlink
    perco_decode/config.pbtxt        backend python: BITSTREAM (uint8 [N]) -> IMAGE (uint8 [H, W, 3])
    perco_decode/1/model.py          the decode loop (perco.scale.triton_model), networks over BLS
    perco_decode/1/perco_spec/       engines.json (model description, profiles; no build-machine paths),
                                     the tokenizer and entropy model folders it names

Each engine's I/O comes from the family's graph contract (names and dtypes: TensorRT keeps the ONNX graph's
I/O types, and the export writes the contract's) and the engine's optimization profile in engines.json
(dims: -1 where the profile's min and max differ); where the ONNX graph an engine was built from is still at
hand (and onnx is installed), its names, types and static dims are checked against that and fill the static
output dims the profile cannot say. Every config.pbtxt is parsed against Triton's ModelConfig protobuf (from
tritonclient) and checked against the engine; the repository is built beside REPO and renamed into place
only when every check passed. The Triton server itself has not run on it here.
"""

import ast
import inspect
import json
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from perco.engine.errors import ExtensionError, ModelError, OutputError, UsageError
from perco.scale.triton_model import SPEC_FOLDER

REPO_MANIFEST = "perco_repo.json"
REPO_FORMAT = 1
WRITTEN_BY = "perco triton-repo"
DECODE_MODEL = "perco_decode"
ENGINE_FILE = "model.plan"  # Triton's TensorRT backend default name
VERSION = "1"
INSTALL = "perco triton-repo needs the scale extra: pip install 'perco-engine[scale]'"
NOT_RUN = ("The Triton server itself has not run on this repository here: it is validated against Triton's "
           "ModelConfig schema and the engines only.")
# numpy dtype names (the graph contract's) -> Triton's; ONNX TensorProto element types -> numpy dtype names
TRITON_TYPES = {"float32": "TYPE_FP32", "float16": "TYPE_FP16", "bfloat16": "TYPE_BF16", "int64": "TYPE_INT64",
                "int32": "TYPE_INT32", "int8": "TYPE_INT8", "uint8": "TYPE_UINT8", "bool": "TYPE_BOOL"}
_ONNX_TYPES = {1: "float32", 2: "uint8", 3: "int8", 6: "int32", 7: "int64", 9: "bool", 10: "float16", 16: "bfloat16"}
# perco_decode's interface: (name, Triton type, dims, optional)
DECODE_INPUTS = (("BITSTREAM", "TYPE_UINT8", (-1,), False), ("STEPS", "TYPE_INT32", (1,), True),
                 ("GUIDANCE", "TYPE_FP32", (1,), True))
DECODE_OUTPUTS = (("IMAGE", "TYPE_UINT8", (-1, -1, 3)),)


@dataclass(frozen=True)
class TensorIO:
    name: str
    dtype: str  # numpy name: float32, int64, ...
    dims: tuple  # the full shape, batch axis included; -1 where the profile lets it vary
    profile: Optional[dict] = None  # inputs: {"min": [...], "opt": [...], "max": [...]}

    def to_dict(self) -> dict:
        return {"name": self.name, "dtype": self.dtype, "dims": list(self.dims), **(self.profile or {})}

    @classmethod
    def from_dict(cls, d: dict) -> "TensorIO":
        profile = {k: list(d[k]) for k in ("min", "opt", "max")} if "min" in d else None
        return cls(d["name"], d["dtype"], tuple(d["dims"]), profile)


@dataclass(frozen=True)
class EngineIO:
    """What Triton needs to know of one engine: its tensors, its one optimization profile, its batch."""

    graph: str
    inputs: tuple  # TensorIO, in the contract's order
    outputs: tuple
    source: str  # where the names, dtypes and static dims were checked: "onnx graph NAME" or "graph contract"

    @property
    def max_batch_size(self) -> int:
        """The profile's largest batch where every tensor's first axis is the same dynamic batch axis, else 0
        (Triton then sees the full shapes)."""
        tensors = self.inputs + self.outputs
        if not all(t.dims and t.dims[0] == -1 for t in tensors):
            return 0
        return min(t.profile["max"][0] for t in self.inputs)

    @property
    def reshaped(self) -> tuple:
        """Rank-1 tensors of a batching model: declared dims [1] with reshape [] (Triton has no empty dims)."""
        if not self.max_batch_size:
            return ()
        return tuple(t.name for t in self.inputs + self.outputs if len(t.dims) == 1)

    def to_dict(self) -> dict:
        return {"inputs": [t.to_dict() for t in self.inputs], "outputs": [t.to_dict() for t in self.outputs],
                "io_source": self.source, "max_batch_size": self.max_batch_size}

    @classmethod
    def from_dict(cls, graph: str, d: dict) -> "EngineIO":
        return cls(graph, tuple(TensorIO.from_dict(t) for t in d["inputs"]),
                   tuple(TensorIO.from_dict(t) for t in d["outputs"]), d.get("io_source", "graph contract"))


def _schema():
    """(ModelConfig class, protobuf text_format): Triton's own schema, shipped with tritonclient."""
    try:
        from google.protobuf import text_format
        from tritonclient.grpc import model_config_pb2
    except ImportError:
        raise ExtensionError(INSTALL) from None
    return model_config_pb2, text_format


# --- the engines' I/O ---------------------------------------------------------------------------------


def engine_io(folder: Path, graph: str, entry: dict, contract) -> EngineIO:
    """The I/O of the engine `entry` of an engines folder, from the graph contract and the engine's profile,
    checked against the ONNX graph it was built from where that is still at hand."""
    shapes = entry.get("shapes") or {}
    names = [name for name, _, _ in contract.inputs]
    if sorted(shapes) != sorted(names):
        raise ModelError(f"engines.json: the {graph} engine's profile covers {sorted(shapes)}, its graph has inputs "
                         f"{sorted(names)}: rebuild it with 'perco build'")
    known = {}  # contract symbol -> its size, where a profile fixes it
    inputs = []
    for name, dtype, symbols in contract.inputs:
        ranges = shapes[name]
        low, opt, high = (list(ranges.get(k) or []) for k in ("min", "opt", "max"))
        axes = symbols.split(",")
        if not (len(low) == len(opt) == len(high) == len(axes)) or \
                not all(0 < a <= b <= c for a, b, c in zip(low, opt, high)):
            raise ModelError(f"engines.json: the {graph} engine's profile for {name} ({low}, {opt}, {high}) does not "
                             f"fit its shape {symbols}: rebuild it with 'perco build'")
        dims = tuple(a if a == c else -1 for a, c in zip(low, high))
        for symbol, dim in zip(axes, dims):
            if dim != -1 and not symbol.isdigit():
                known[symbol] = dim
        inputs.append(TensorIO(name, dtype, dims, {"min": low, "opt": opt, "max": high}))
    outputs = []
    for name, dtype, symbols in contract.outputs:
        dims = tuple(int(s) if s.isdigit() else known.get(s, -1) for s in symbols.split(","))
        outputs.append(TensorIO(name, dtype, dims))
    io = EngineIO(graph, tuple(inputs), tuple(outputs), "graph contract")
    source = _source_graph(folder, entry)
    return _checked_against_onnx(io, source) if source is not None else io


def _source_graph(folder: Path, entry: dict) -> Optional[Path]:
    """The ONNX graph the engine was built from: in the engines folder (precision graphs) or where the build
    found it; None if it is gone or onnx is not installed (the contract and profile then say it all)."""
    try:
        import onnx  # noqa: F401  (the export extra)
    except ImportError:
        return None
    candidates = [folder / entry["onnx"]] if entry.get("onnx") else []
    candidates += [Path(entry["onnx_path"])] if entry.get("onnx_path") else []
    return next((path for path in candidates if path.is_file()), None)


def _checked_against_onnx(io: EngineIO, path: Path) -> EngineIO:
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    initializers = {t.name for t in graph.initializer}
    declared = {"input": {v.name: v for v in graph.input if v.name not in initializers},
                "output": {v.name: v for v in graph.output}}

    def check(kind: str, tensors: tuple) -> tuple:
        values = declared[kind]
        if sorted(values) != sorted(t.name for t in tensors):
            raise ModelError(f"{path.name}, the graph the {io.graph} engine was built from, has {kind}s "
                             f"{sorted(values)}, not the graph contract's {sorted(t.name for t in tensors)}")
        out = []
        for t in tensors:
            tensor_type = values[t.name].type.tensor_type
            dtype = _ONNX_TYPES.get(tensor_type.elem_type, f"ONNX type {tensor_type.elem_type}")
            if dtype != t.dtype:
                raise ModelError(f"{path.name}: {kind} {t.name} is {dtype}, the graph contract says {t.dtype}: "
                                 "re-export and rebuild")
            static = [d.dim_value if d.HasField("dim_value") else -1 for d in tensor_type.shape.dim]
            if len(static) != len(t.dims):
                raise ModelError(f"{path.name}: {kind} {t.name} has rank {len(static)}, the profile {len(t.dims)}")
            dims = []
            for axis, (ours, theirs) in enumerate(zip(t.dims, static)):
                if ours != -1 and theirs != -1 and ours != theirs:
                    raise ModelError(f"{path.name}: {kind} {t.name} axis {axis} is {theirs}, the engine's profile "
                                     f"fixes it at {ours}")
                dims.append(ours if ours != -1 else theirs)
            out.append(TensorIO(t.name, t.dtype, tuple(dims), t.profile))
        return tuple(out)

    return EngineIO(io.graph, check("input", io.inputs), check("output", io.outputs), f"onnx graph {path.name}")


# --- config.pbtxt -------------------------------------------------------------------------------------------


def _dims(values) -> str:
    return "[ " + ", ".join(str(v) for v in values) + " ]"


def _tensor_block(tensor: TensorIO, batching: bool) -> str:
    dims = tensor.dims[1:] if batching else tensor.dims
    lines = [f'    name: "{tensor.name}"', f"    data_type: {TRITON_TYPES[tensor.dtype]}"]
    if batching and not dims:  # [batch] alone: dims [1] reshaped to [] (the model sees [batch])
        lines += ["    dims: [ 1 ]", "    reshape: { shape: [ ] }"]
    else:
        lines.append(f"    dims: {_dims(dims)}")
    return "  {\n" + "\n".join(lines) + "\n  }"


def engine_config(io: EngineIO, instances: int = 1) -> str:
    """config.pbtxt of one engine's model (Triton's TensorRT backend)."""
    batch = io.max_batch_size
    profile = "; ".join(f"{t.name} {t.profile['min']}..{t.profile['max']}" for t in io.inputs)
    return "\n".join([
        f"# {io.graph}: written by {WRITTEN_BY} from engines.json; profile 0: {profile}",
        f'name: "{io.graph}"',
        'platform: "tensorrt_plan"',
        'backend: "tensorrt"',
        f"max_batch_size: {batch}",
        "input [\n" + ",\n".join(_tensor_block(t, batch > 0) for t in io.inputs) + "\n]",
        "output [\n" + ",\n".join(_tensor_block(t, batch > 0) for t in io.outputs) + "\n]",
        f'instance_group [\n  {{\n    kind: KIND_GPU\n    count: {instances}\n    profile: [ "0" ]\n  }}\n]',
        "",
    ])


def decode_config(instances: int = 1) -> str:
    """config.pbtxt of perco_decode (Triton's Python backend)."""
    inputs = ",\n".join(f'  {{\n    name: "{name}"\n    data_type: {dtype}\n    dims: {_dims(dims)}'
                        + ("\n    optional: true" if optional else "") + "\n  }"
                        for name, dtype, dims, optional in DECODE_INPUTS)
    outputs = ",\n".join(f'  {{\n    name: "{name}"\n    data_type: {dtype}\n    dims: {_dims(dims)}\n  }}'
                         for name, dtype, dims in DECODE_OUTPUTS)
    return "\n".join([
        f"# the PerCo decode loop (model.py), its networks over BLS; written by {WRITTEN_BY}",
        f'name: "{DECODE_MODEL}"',
        'backend: "python"',
        "max_batch_size: 0",
        f"input [\n{inputs}\n]",
        f"output [\n{outputs}\n]",
        # the loop is numpy on the CPU; the networks run on the GPU models it calls
        f"instance_group [\n  {{\n    kind: KIND_CPU\n    count: {instances}\n  }}\n]",
        "",
    ])


def parse_config(text: str, where: str):
    """A ModelConfig from config.pbtxt text; ModelError naming the file and Triton's parse message."""
    model_config_pb2, text_format = _schema()
    config = model_config_pb2.ModelConfig()
    try:
        text_format.Parse(text, config)
    except text_format.ParseError as exc:
        raise ModelError(f"{where} is not a valid Triton ModelConfig: {exc}") from None
    return config


def check_engine_config(config, io: EngineIO, where: str) -> None:
    """ModelError unless the parsed config declares exactly the engine's tensors, dtypes, dims and profile."""
    model_config_pb2, _ = _schema()
    type_name = model_config_pb2.DataType.Name

    def fail(problem: str):
        raise ModelError(f"{where}: {problem}")

    if config.name != io.graph:
        fail(f"name is {config.name!r}, the model folder is {io.graph!r}")
    if config.platform != "tensorrt_plan" or config.backend not in ("", "tensorrt"):
        fail(f"platform {config.platform!r} / backend {config.backend!r}: the engine needs tensorrt_plan / tensorrt")
    batch = config.max_batch_size
    if batch < 0 or batch > io.max_batch_size or (batch > 0) != (io.max_batch_size > 0):
        why = "its first axis is not one dynamic batch axis" if not io.max_batch_size else \
            f"its profile batch is at most {io.max_batch_size}"
        fail(f"max_batch_size {batch} does not fit the engine ({why}; expected {io.max_batch_size})")
    for kind, declared, tensors in (("input", config.input, io.inputs), ("output", config.output, io.outputs)):
        names = [t.name for t in declared]
        if len(set(names)) != len(names) or set(names) != {t.name for t in tensors}:
            fail(f"{kind}s {names}, the engine's are {[t.name for t in tensors]}")
        by_name = {t.name: t for t in declared}
        for t in tensors:
            c = by_name[t.name]
            if type_name(c.data_type) != TRITON_TYPES[t.dtype]:
                fail(f"{kind} {t.name} is {type_name(c.data_type)}, the engine's is {TRITON_TYPES[t.dtype]}")
            shape = list(c.reshape.shape) if c.HasField("reshape") else list(c.dims)
            if c.HasField("reshape") and _count(c.dims) != _count(c.reshape.shape):
                fail(f"{kind} {t.name}: dims {list(c.dims)} and reshape {shape} hold different element counts")
            full = [-1] + shape if batch > 0 else shape
            if full != list(t.dims):
                fail(f"{kind} {t.name} has dims {full} (batch axis included), the engine's are {list(t.dims)} "
                     f"(-1: dynamic in its profile{_range(t)})")
    if not config.instance_group:
        fail("no instance_group: the engine's optimization profile 0 must be named")
    for group in config.instance_group:
        if model_config_pb2.ModelInstanceGroup.Kind.Name(group.kind) not in ("KIND_GPU", "KIND_AUTO"):
            fail("a TensorRT engine runs on the GPU: instance_group kind must be KIND_GPU")
        if list(group.profile) != ["0"]:
            fail(f"instance_group profile {list(group.profile)}: the engine has one optimization profile, \"0\"")


def check_decode_config(config, where: str) -> None:
    model_config_pb2, _ = _schema()
    type_name = model_config_pb2.DataType.Name

    def fail(problem: str):
        raise ModelError(f"{where}: {problem}")

    if config.name != DECODE_MODEL or config.backend != "python" or config.platform:
        fail(f"name {config.name!r}, backend {config.backend!r}: expected {DECODE_MODEL!r} on the python backend")
    if config.max_batch_size != 0:
        fail("max_batch_size must be 0 (one bitstream per request; the loop batches nothing)")
    declared = {t.name: t for t in config.input}
    if set(declared) != {name for name, _, _, _ in DECODE_INPUTS}:
        fail(f"inputs {sorted(declared)}, expected {[name for name, _, _, _ in DECODE_INPUTS]}")
    for name, dtype, dims, optional in DECODE_INPUTS:
        t = declared[name]
        if type_name(t.data_type) != dtype or tuple(t.dims) != dims or t.optional != optional:
            fail(f"input {name} is {type_name(t.data_type)} {list(t.dims)}{' optional' if t.optional else ''}, "
                 f"model.py reads {dtype} {list(dims)}{' optional' if optional else ''}")
    outputs = {t.name: t for t in config.output}
    if set(outputs) != {name for name, _, _ in DECODE_OUTPUTS}:
        fail(f"outputs {sorted(outputs)}, expected {[name for name, _, _ in DECODE_OUTPUTS]}")
    for name, dtype, dims in DECODE_OUTPUTS:
        if type_name(outputs[name].data_type) != dtype or tuple(outputs[name].dims) != dims:
            fail(f"output {name} must be {dtype} {list(dims)}")


def _count(dims) -> Optional[int]:
    total = 1
    for d in dims:
        if d < 0:
            return None
        total *= d
    return total


def _range(t: TensorIO) -> str:
    return f" {t.profile['min']}..{t.profile['max']}" if t.profile else ""


# --- the repository -----------------------------------------------------------------------------------------


def check_repo(repo) -> dict:
    """Validate a repository this command wrote: every config.pbtxt against Triton's schema and against the
    engines recorded in perco_repo.json (names, dtypes, dims, profiles), the engine files by hash, the decode
    model and its model description; no symlinks, no absolute paths. ModelError on the first problem; returns
    the repository manifest."""
    try:
        return _check_repo(Path(repo))
    except (KeyError, TypeError, ValueError, AttributeError) as exc:  # a hand-edited record or engines.json
        raise ModelError(f"{repo}: {REPO_MANIFEST} or {SPEC_FOLDER}/engines.json is malformed "
                         f"({type(exc).__name__}: {exc}): write the repository again") from None


def _check_repo(repo: Path) -> dict:
    from perco.engine import families
    from perco.engine.backends.tensorrt import decoder_graphs, spec_from_engines
    from perco.engine.manifest import file_sha256
    from perco.engine.model import read_json

    record = read_json(repo / REPO_MANIFEST, missing=f"{repo} is not a repository of '{WRITTEN_BY}' "
                                                     f"({REPO_MANIFEST} missing)")
    if record.get("format") != REPO_FORMAT or record.get("written_by") != WRITTEN_BY:
        raise ModelError(f"{repo / REPO_MANIFEST} is not a format-{REPO_FORMAT} record of '{WRITTEN_BY}'")
    for path in repo.rglob("*"):
        if path.is_symlink():
            raise ModelError(f"{path} is a symlink: a repository holds its files (a link can dangle)")
    _no_absolute_paths(record, repo / REPO_MANIFEST)
    spec_dir = repo / DECODE_MODEL / VERSION / SPEC_FOLDER
    if not (spec_dir / "engines.json").is_file():
        raise ModelError(f"{spec_dir / 'engines.json'} is missing: the decode model has no model description")
    spec_from_engines(spec_dir)  # the decode model's own start: the model description must load
    manifest = read_json(spec_dir / "engines.json")
    _no_absolute_paths(manifest, spec_dir / "engines.json")
    contract = families.manifest_contract(manifest)
    missing = [g for g in decoder_graphs(manifest) if g not in record["models"]]
    if missing:
        raise ModelError(f"{repo}: no model for {', '.join(missing)}, which the decode loop runs")
    for graph, entry in record["models"].items():
        if graph not in contract:
            raise ModelError(f"{repo}: model {graph} is not a graph of the {manifest['model']['family']} family")
        io = EngineIO.from_dict(graph, entry)
        for kind, tensors, expected in (("input", io.inputs, contract[graph].inputs),
                                        ("output", io.outputs, contract[graph].outputs)):
            if [(t.name, t.dtype) for t in tensors] != [(n, d) for n, d, _ in expected]:
                raise ModelError(f"{repo / REPO_MANIFEST}: {graph} {kind}s {[(t.name, t.dtype) for t in tensors]} are "
                                 f"not the graph contract's {[(n, d) for n, d, _ in expected]}")
        spec_entry = manifest["graphs"].get(graph, {})
        if spec_entry.get("shapes") != {t.name: t.profile for t in io.inputs}:
            raise ModelError(f"{repo}: the profile of {graph} differs between {REPO_MANIFEST} and "
                             f"{SPEC_FOLDER}/engines.json")
        if spec_entry.get("triton_model") != graph or spec_entry.get("triton_reshape") != list(io.reshaped):
            raise ModelError(f"{spec_dir / 'engines.json'}: {graph} must name its Triton model {graph!r} and the "
                             f"tensors model.py sends reshaped, {list(io.reshaped)}")
        where = repo / graph / "config.pbtxt"
        check_engine_config(parse_config(_read_text(where), str(where)), io, str(where))
        plan = repo / graph / VERSION / ENGINE_FILE
        if not plan.is_file() or plan.stat().st_size != entry["bytes"] or file_sha256(plan) != entry["sha256"]:
            raise ModelError(f"{plan} is missing or is not the engine engines.json lists (size or SHA-256 differs)")
    where = repo / DECODE_MODEL / "config.pbtxt"
    check_decode_config(parse_config(_read_text(where), str(where)), str(where))
    _check_model_py(repo / DECODE_MODEL / VERSION / "model.py")
    for name in record["spec"]["files"]:
        if not (spec_dir / name).is_file():
            raise ModelError(f"{spec_dir / name} is missing (listed in {REPO_MANIFEST})")
    return record


def _check_model_py(path: Path) -> None:
    try:
        tree = ast.parse(_read_text(path), str(path))
    except SyntaxError as exc:
        raise ModelError(f"{path} is not valid Python: line {exc.lineno}: {exc.msg}") from None
    classes = {node.name: node for node in tree.body if isinstance(node, ast.ClassDef)}
    model = classes.get("TritonPythonModel")
    methods = {n.name for n in model.body if isinstance(n, ast.FunctionDef)} if model else set()
    if not {"initialize", "execute", "finalize"} <= methods:
        raise ModelError(f"{path} must define TritonPythonModel with initialize, execute and finalize")


def _no_absolute_paths(value, where: Path) -> None:
    if isinstance(value, dict):
        for v in value.values():
            _no_absolute_paths(v, where)
    elif isinstance(value, list):
        for v in value:
            _no_absolute_paths(v, where)
    elif isinstance(value, str) and os.path.isabs(value):
        raise ModelError(f"{where} holds the absolute path {value}: a repository must not depend on the build machine")


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ModelError(f"cannot read {path}: {exc.strerror}") from None


def _place_engine(source: Path, target: Path) -> str:
    """Hard-link the engine (same file system), else copy it: a repository never holds a symlink."""
    try:
        os.link(source, target)
        return "hard-linked"
    except OSError:
        shutil.copyfile(source, target)
        return "copied"


def _spec_manifest(manifest: dict, models: dict) -> dict:
    """engines.json as the decode model reads it: graph entries name their Triton model; the build machine's
    paths are dropped."""
    graphs = {}
    for graph, entry in manifest["graphs"].items():
        kept = {k: v for k, v in entry.items() if k not in ("onnx_path", "file")}
        graphs[graph] = {**kept, "file": f"../../../{graph}/{VERSION}/{ENGINE_FILE}", "triton_model": graph,
                         "triton_reshape": list(models[graph].reshaped)}
    return {**manifest, "graphs": graphs}


def _readme(record: dict, placed: str) -> str:
    models = ", ".join(record["models"])
    flavor = record["engines"]["flavor"]
    lines = [
        f"Triton Inference Server model repository written by {WRITTEN_BY} (perco-engine {record['perco']}).",
        "",
        f"TensorRT models (platform tensorrt_plan, one per engine, {placed}): {models}.",
        f"{DECODE_MODEL} (backend python): BITSTREAM uint8 [N] -> IMAGE uint8 [H, W, 3]; optional STEPS int32 [1],",
        "GUIDANCE fp32 [1]. Its model.py runs PerCo Engine's decode loop and sends every network to the models",
        "above as a BLS request; perco_decode/1/perco_spec/ holds the model description it needs.",
        "",
        f"Engines: {flavor} {record['engines']['version']}, {record['engines']['precision']}. Triton's TensorRT "
        "backend must link that exact TensorRT version (engines are version-locked).",
    ]
    if flavor == "tensorrt-rtx":
        lines.append("These are TensorRT-RTX engines: Triton's TensorRT backend loads full-TensorRT engines. Build "
                     "with 'perco build --flavor tensorrt' on the serving GPU for a repository Triton can load.")
    lines += [
        "",
        "Serve:  tritonserver --model-repository <this folder>   (in NVIDIA's tritonserver container, with",
        "        perco-engine installed in its Python environment for perco_decode)",
        "",
        NOT_RUN,
        "",
    ]
    return "\n".join(lines)


def write_repo(engines, out, force: bool = False, instances: int = 1, log=print, warn=None) -> dict:
    """Write the repository for the engines folder `engines` at `out` (built beside it, checked, then renamed
    into place); returns its perco_repo.json record. `log` gets the summary, `warn` (default: stderr) caveats."""
    from perco.engine import families
    from perco.engine.backends.tensorrt import ENGINES_MANIFEST, read_engines

    _schema()  # the extension first: nothing is written without the validator
    engines, out = Path(engines), Path(out)
    if not (engines / ENGINES_MANIFEST).is_file():
        raise ModelError(f"{engines} is not an engines folder ({ENGINES_MANIFEST} missing): run 'perco build'")
    manifest = read_engines(engines)
    _check_target(out, force)
    contract = families.manifest_contract(manifest)
    unknown = sorted(set(manifest["graphs"]) - set(contract))
    if unknown:
        raise ModelError(f"{engines / ENGINES_MANIFEST} lists engines for {', '.join(unknown)}, which are not graphs "
                         f"of the {manifest['model']['family']} family")
    models = {graph: engine_io(engines, graph, manifest["graphs"][graph], contract[graph])
              for graph in contract if graph in manifest["graphs"]}
    for graph, entry in manifest["graphs"].items():
        if not (engines / entry["file"]).is_file():
            raise ModelError(f"engine {engines / entry['file']} is missing: re-run 'perco build'")

    tmp = None
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
        record, placed = _write_into(tmp, engines, manifest, models, instances)
        try:
            check_repo(tmp)
        except ModelError as exc:  # name the repository, not its temporary folder
            raise ModelError(str(exc).replace(str(tmp), str(out))) from None
        _move_into_place(tmp, out)
    except OSError as exc:
        raise OutputError(f"cannot write the repository {out}: {exc.strerror or exc}") from None
    finally:
        if tmp is not None and tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    log(f"wrote {out}: {len(models)} TensorRT models ({', '.join(models)}; engines {' and '.join(sorted(placed))}) "
        f"and {DECODE_MODEL} (Python backend, BLS)")
    log(f"  validated: every config.pbtxt against Triton's ModelConfig schema, names, dtypes and dims against the "
        f"engines and their profiles (I/O from {_sources(models)})")
    log(f"  {NOT_RUN}")
    if manifest.get("flavor") == "tensorrt-rtx":
        (warn or _stderr)("warning: these are TensorRT-RTX engines; Triton's TensorRT backend loads full-TensorRT "
                          "engines: build with 'perco build --flavor tensorrt' on the serving GPU for a repository it "
                          "can load")
    return record


def _write_into(tmp: Path, engines: Path, manifest: dict, models: dict, instances: int) -> tuple:
    """Every file of the repository into the empty folder `tmp`: (perco_repo.json record, how engines were placed)."""
    from perco.engine.backends.tensorrt import ENGINES_MANIFEST
    from perco.engine.files import ENTROPY_FILES, atomic_json, copy_folder, tokenizer_files

    placed = set()
    for graph, io in models.items():
        (tmp / graph / VERSION).mkdir(parents=True)
        placed.add(_place_engine(engines / manifest["graphs"][graph]["file"], tmp / graph / VERSION / ENGINE_FILE))
        (tmp / graph / "config.pbtxt").write_text(engine_config(io, instances), encoding="utf-8")
    version_dir = tmp / DECODE_MODEL / VERSION
    spec_dir = version_dir / SPEC_FOLDER
    spec_dir.mkdir(parents=True)
    (tmp / DECODE_MODEL / "config.pbtxt").write_text(decode_config(instances), encoding="utf-8")
    shutil.copyfile(inspect.getsourcefile(_model_module()), version_dir / "model.py")
    atomic_json(spec_dir / ENGINES_MANIFEST, _spec_manifest(manifest, models))
    for key, names in (("tokenizer", None), ("entropy_model", ENTROPY_FILES)):
        folder = manifest.get(key)
        if folder:
            source = engines / folder
            copy_folder(source, spec_dir / folder, names=names or tokenizer_files(source))
    files = sorted(str(p.relative_to(spec_dir)) for p in spec_dir.rglob("*") if p.is_file())
    record = {
        "format": REPO_FORMAT, "written_by": WRITTEN_BY, "perco": _release(),
        "engines": {k: manifest.get(k) for k in ("flavor", "version", "precision", "target_cc")},
        "models": {graph: {"file": f"{graph}/{VERSION}/{ENGINE_FILE}", "sha256": manifest["graphs"][graph]["sha256"],
                           "bytes": manifest["graphs"][graph]["bytes"], **io.to_dict()}
                   for graph, io in models.items()},
        "decode_model": DECODE_MODEL,
        "spec": {"folder": f"{DECODE_MODEL}/{VERSION}/{SPEC_FOLDER}", "files": files},
        "validated": "every config.pbtxt parsed against Triton's ModelConfig schema (tritonclient) and checked "
                     "against the engines' names, dtypes, dims and profiles; engine files by SHA-256",
        "server_run": False,
    }
    atomic_json(tmp / REPO_MANIFEST, record)
    (tmp / "README.txt").write_text(_readme(record, " and ".join(sorted(placed))), encoding="utf-8")
    return record, placed


def _stderr(text: str) -> None:
    print(text, file=sys.stderr)


def _sources(models: dict) -> str:
    kinds = sorted({"the ONNX graphs they were built from" if io.source.startswith("onnx") else "the graph contract"
                    for io in models.values()})
    return " and ".join(kinds)


def _model_module():
    from perco.scale import triton_model

    return triton_model


def _release() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("perco-engine")
    except PackageNotFoundError:
        return "unknown (not installed)"


def _check_target(out: Path, force: bool) -> None:
    if out.is_symlink() or (out.exists() and not out.is_dir()):
        raise OutputError(f"{out} exists and is not a folder: choose another -o")
    if not out.is_dir() or not any(out.iterdir()):
        return
    ours = _is_our_repo(out)
    if not force:
        hint = " (written by this command: --force replaces it)" if ours else ""
        raise OutputError(f"{out} exists and is not empty{hint}")
    if not ours:
        raise OutputError(f"{out} is not empty and holds no {REPO_MANIFEST} of '{WRITTEN_BY}': --force replaces only "
                         "a repository this command wrote")


def _is_our_repo(folder: Path) -> bool:
    try:
        return json.loads((folder / REPO_MANIFEST).read_text()).get("written_by") == WRITTEN_BY
    except (OSError, ValueError, AttributeError):
        return False


def _move_into_place(tmp: Path, out: Path) -> None:
    """Rename the finished repository onto `out`; a previous one is renamed aside first and removed after."""
    old = None
    if out.is_dir() and any(out.iterdir()):
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old.", dir=out.parent))
        os.replace(out, old / "repo")
    elif out.is_dir():
        out.rmdir()
    try:
        os.replace(tmp, out)
    except OSError:
        if old is not None:  # put the previous repository back
            os.replace(old / "repo", out)
        raise
    finally:
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


# --- the verb -----------------------------------------------------------------------------------------------


def add_commands(sub) -> dict:
    p = sub.add_parser("triton-repo", help="a Triton Inference Server model repository from TensorRT engines",
                       description="Write a Triton model repository from an engines folder ('perco build'): one "
                                   "TensorRT model per engine and perco_decode, a Python-backend model running the "
                                   "PerCo decode loop over BLS. Every config.pbtxt is validated against Triton's "
                                   "ModelConfig schema and the engines; the Triton server itself has not run on it "
                                   "here. --check REPO validates an existing repository (after hand edits).")
    p.add_argument("--engines", metavar="DIR", default=None, help="engines folder from 'perco build'")
    p.add_argument("-o", "--output", metavar="REPO", default=None, help="repository folder to write (absent or empty)")
    p.add_argument("--force", action="store_true", help="replace a repository this command wrote before")
    from perco.engine.cli import integer_type

    p.add_argument("--instances", type=integer_type(1), default=1, metavar="N",
                   help="instance_group count of every model (default: %(default)s)")
    p.add_argument("--check", metavar="REPO", default=None, help="validate an existing repository instead")
    p.add_argument("-q", "--quiet", action="store_true", help="print nothing but errors")
    return {"triton-repo": _triton_repo}


def _triton_repo(args) -> None:
    say = (lambda text: None) if args.quiet else print
    if args.check is not None:
        if args.engines or args.output:
            raise UsageError("--check takes only the repository: no --engines or -o")
        record = check_repo(args.check)
        say(f"{args.check}: valid ({len(record['models'])} TensorRT models and {DECODE_MODEL} against Triton's "
            f"ModelConfig schema and the engines). {NOT_RUN}")
        return
    if not args.engines or not args.output:
        raise UsageError("perco triton-repo needs --engines DIR and -o REPO (or --check REPO)")
    write_repo(args.engines, args.output, force=args.force, instances=args.instances, log=say,
               warn=(lambda text: None) if args.quiet else _stderr)
