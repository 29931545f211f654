"""ONNX -> TensorRT engines: `perco build`. Full TensorRT or TensorRT-RTX behind one small adapter.

Engines folder:
    engines.json                             written last, atomically
    <graph>-<precision>-<key12>.engine       one per graph
    <graph>-<precision>-<hash12>.onnx        precision graphs made from the FP32 export (fp16)
    timing-tensorrt.cache                    full TensorRT's timing cache, reused across builds
                                             (TensorRT-RTX tunes at run time: its runtime cache
                                             belongs to the runtime, not to the build)

`key` = SHA-256 of (ONNX graph hash, precision, profile, flavor + version, target compute
capabilities): an engine is rebuilt exactly when one of them changes.
"""

import hashlib
import json
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from perco.engine.backends.tensorrt import ENGINES_FORMAT, ENGINES_MANIFEST, import_flavor, make_logger
from perco.engine.errors import PercoError
from perco.engine.files import ENTROPY_FILES, atomic_json, atomic_write, copy_folder, tokenizer_files
from perco.engine import families
from perco.engine.manifest import file_sha256, read_manifest

PRECISIONS = ("fp32", "fp16", "bf16", "int8", "fp8")
# Ops kept in FP32 in FP16 graphs: normalisations and softmax (SD 2.1 overflows in FP16 attention;
# its config sets upcast_attention) and the reductions they are built from.
FP32_OPS = ["Softmax", "LayerNormalization", "GroupNormalization", "InstanceNormalization", "ReduceMean", "Pow",
            "Sqrt", "Div", "Exp", "Erf"]
_MIN_CC = {"bf16": 80, "fp8": 89}  # BF16 tensor cores from Ampere, FP8 from Ada (SM89) and Hopper
_BYTES_PER_WEIGHT = {"fp32": 4, "fp16": 2, "bf16": 2, "int8": 1, "fp8": 1}


@dataclass(frozen=True)
class Flavor:
    """What differs between TensorRT and TensorRT-RTX, and nothing else."""

    name: str  # "tensorrt" or "tensorrt-rtx"
    module: object

    @property
    def version(self) -> str:
        return self.module.__version__

    @property
    def strongly_typed(self) -> bool:
        return self.name == "tensorrt-rtx"  # RTX builds strongly typed networks only

    def unsupported(self, precision: str, target_cc: tuple = ()) -> Optional[str]:
        """Why this flavor cannot build `precision` for these targets, or None."""
        needs = _MIN_CC.get(precision)
        lacking = [cc for cc in target_cc if needs and cc < needs]
        if lacking:
            return (f"{precision} needs compute capability {needs // 10}.{needs % 10} or newer; target "
                    f"{', '.join(f'{cc // 10}.{cc % 10}' for cc in lacking)} lacks it")
        return None

    @property
    def uses_timing_cache(self) -> bool:
        return not self.strongly_typed  # TensorRT-RTX: timing-cache calls are no-ops (it tunes at run time)

    def network_flags(self) -> int:
        flag = getattr(self.module.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
        return 1 << int(flag) if flag is not None and self.strongly_typed else 0

    def configure(self, config, precision: str, target_cc: tuple, refittable: bool = False) -> None:
        trt = self.module
        if refittable:
            config.set_flag(trt.BuilderFlag.REFIT)
        if not self.strongly_typed and precision in ("fp16", "bf16", "int8", "fp8"):
            config.set_flag(getattr(trt.BuilderFlag, precision.upper()))  # int8/fp8: explicit Q/DQ graphs only
            if precision in ("int8", "fp8"):
                config.set_flag(trt.BuilderFlag.FP16)  # layers without Q/DQ run in FP16, not FP32
        if self.strongly_typed and target_cc:
            config.num_compute_capabilities = len(target_cc)
            for i, cc in enumerate(target_cc):
                config.set_compute_capability(getattr(trt.ComputeCapability, f"SM{cc}"), i)


def detect_flavor(requested: str = "auto") -> Flavor:
    order = ["tensorrt", "tensorrt-rtx"] if requested == "auto" else [requested]
    if requested not in ("auto", "tensorrt", "tensorrt-rtx"):
        raise PercoError(f"unknown flavor {requested!r}: auto, tensorrt or tensorrt-rtx")
    for name in order:
        module = import_flavor(name)
        if module is not None and hasattr(module, "Builder"):
            return Flavor(name, module)
    install = "pip install tensorrt-rtx" if requested != "tensorrt" else "install TensorRT (NVIDIA's wheels or JetPack)"
    raise PercoError(f"no usable TensorRT flavor ({requested}) is installed: {install}")


def engine_key(onnx_sha: str, precision: str, shapes: dict, flavor: Flavor, target_cc: tuple,
               refittable: bool = False) -> str:
    payload = {"format": ENGINES_FORMAT, "onnx": onnx_sha, "precision": precision, "shapes": shapes,
               "flavor": flavor.name, "version": flavor.version, "target_cc": list(target_cc)}
    if refittable:  # keys of non-refittable builds are unchanged by the option's addition
        payload["refittable"] = True
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def profile_shapes(graph_entry: dict, overrides: dict) -> dict:
    """Input name -> {min, opt, max}: the manifest's ranges, with batch/height/width overrides.

    overrides: {"batch": (min, opt, max), "height": ..., "width": ...} in images and pixels.
    """
    shapes = {}
    for inp in graph_entry["inputs"]:
        name, dims = inp["name"], inp["shape"].split(",")
        ranges = {k: list(v) for k, v in graph_entry["shapes"][name].items()}
        for axis, symbol in enumerate(dims):
            for which, factor_symbols in (("batch", {"B": 1, "2B": 2}), ("height", {"H": 1, "h": 8}),
                                          ("width", {"W": 1, "w": 8})):
                if which in overrides and symbol in factor_symbols:
                    factor = factor_symbols[symbol]
                    for i, key in enumerate(("min", "opt", "max")):
                        value = overrides[which][i]
                        if which != "batch":
                            ranges[key][axis] = value // factor
                        else:  # the denoiser's 2B runs down to B once guidance stops
                            ranges[key][axis] = value * (1 if key == "min" else factor)
        shapes[name] = ranges
    return shapes


def check_quantization(manifest: dict, precision: str, artifacts) -> None:
    """int8/fp8 engines are built only from Q/DQ artifacts (`perco quantize`): explicit quantization."""
    if precision in ("int8", "fp8"):
        made = (manifest.get("quantization") or {}).get("precision")
        if made != precision:
            raise PercoError(f"{precision} engines need Q/DQ graphs: run 'perco quantize --artifacts {artifacts} "
                             f"-o QART --precision {precision}' and build from QART (implicit calibration is never used)")


def precision_graph(artifacts: Path, entry: dict, precision: str, flavor: Flavor, out: Path, log) -> tuple:
    """(ONNX graph to build, the precision its engine gets): the export (FP32, or Q/DQ for int8/fp8),
    or an FP16/BF16 graph made from it. Graphs `perco quantize` left in float build as FP16.

    FP16 and BF16 graphs are strongly typed: every tensor has its type in the graph, with the ops of
    FP32_OPS (and their inputs and outputs) kept in FP32. BF16 is the FP16 graph with FLOAT16
    retyped to BFLOAT16 and its weights rounded from the FP32 export, not from FP16.
    """
    source = artifacts / entry["file"]
    if entry.get("quantized"):
        return source, entry["quantized"]
    if precision in ("int8", "fp8"):
        precision = "fp16"  # a graph perco quantize left in float
    if precision == "fp32" or not flavor.strongly_typed:  # full TensorRT: precision by builder flags
        return source, precision
    digest = entry["sha256"][entry["file"]]
    target = out / f"{Path(entry['file']).stem}-{precision}-{digest[:12]}.onnx"
    if target.is_file():
        return target, precision
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    log(f"    making the {precision} graph from {source.name} ...")
    model = onnx.load(str(source))
    half = convert_float_to_float16(model, keep_io_types=True, op_block_list=FP32_OPS, disable_shape_infer=True)
    del model
    _drop_duplicate_casts(half)
    half = _toposorted(half)
    if precision == "bf16":
        _retype_bf16(half, onnx.load(str(source)).graph.initializer)
    tmp = target.with_name(f".{target.name}.tmp")
    large = half.ByteSize() > 1_900_000_000 if _fits(half) else True
    if large:
        onnx.save_model(half, str(tmp), save_as_external_data=True, location=target.name + ".data")
    else:
        onnx.save_model(half, str(tmp))
    try:
        onnx.checker.check_model(str(tmp))
    except onnx.checker.ValidationError as exc:
        os.unlink(tmp)
        raise PercoError(f"the {precision} graph made from {source.name} is invalid: {str(exc).splitlines()[0]}") \
            from None
    os.replace(tmp, target)
    log(f"    wrote {target.name} (kept in fp32: {', '.join(FP32_OPS)})")
    return target, precision


def bfloat16_bits(values):
    """float32 -> bfloat16 bit patterns (uint16), rounded to nearest even; NaN stays NaN."""
    import numpy as np

    bits = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32)
    rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)
    nan = np.isnan(values)
    rounded[nan] = ((bits[nan] >> 16) | 0x40).astype(np.uint16)  # keep NaNs quiet NaNs
    return rounded


def _retype_bf16(model, fp32_initializers) -> None:
    """FLOAT16 -> BFLOAT16 in a graph from the FP16 converter: weights (re-rounded from FP32), Constant
    values, Cast targets and declared types."""
    import numpy as np
    from onnx import AttributeProto, TensorProto, numpy_helper

    def to_bf16(tensor, fp32_values) -> None:
        tensor.CopyFrom(TensorProto(name=tensor.name, dims=tensor.dims, data_type=TensorProto.BFLOAT16,
                                    raw_data=bfloat16_bits(fp32_values).tobytes()))

    originals = {t.name: t for t in fp32_initializers}
    for t in model.graph.initializer:
        if t.data_type == TensorProto.FLOAT16:
            origin = originals.get(t.name)
            values = numpy_helper.to_array(origin) if origin is not None and origin.data_type == TensorProto.FLOAT \
                else numpy_helper.to_array(t).astype(np.float32)
            to_bf16(t, values)
    for node in model.graph.node:
        for attr in node.attribute:
            if attr.name in ("to", "dtype") and attr.i == TensorProto.FLOAT16:
                attr.i = TensorProto.BFLOAT16
            elif attr.type == AttributeProto.TENSOR and attr.t.data_type == TensorProto.FLOAT16:
                to_bf16(attr.t, numpy_helper.to_array(attr.t).astype(np.float32))
    for info in (*model.graph.value_info, *model.graph.input, *model.graph.output):
        if info.type.tensor_type.elem_type == TensorProto.FLOAT16:
            info.type.tensor_type.elem_type = TensorProto.BFLOAT16


def _drop_duplicate_casts(model) -> None:
    """The converter inserts one Cast per consumer of a tensor that feeds several FP32-kept ops,
    all with the same output name; they are identical, so keep the first of each."""
    seen, kept = set(), []
    for node in model.graph.node:
        if node.op_type == "Cast" and node.output[0] in seen:
            continue
        seen.update(node.output)
        kept.append(node)
    if len(kept) != len(model.graph.node):
        del model.graph.node[:]
        model.graph.node.extend(kept)


def _toposorted(model):
    """The converter appends its Cast nodes at the end; ONNX wants nodes in topological order."""
    import onnx_graphsurgeon as gs

    graph = gs.import_onnx(model)
    graph.cleanup().toposort()
    sorted_model = gs.export_onnx(graph)
    sorted_model.ir_version = model.ir_version
    return sorted_model


def _fits(model) -> bool:
    from google.protobuf.message import EncodeError

    try:
        model.ByteSize()
        return True
    except (ValueError, EncodeError):
        return False


def plan(artifacts, precision: str, flavor_name: str = "auto", overrides: Optional[dict] = None,
         target_cc: tuple = (), out=None, refittable: bool = False) -> list:
    """What `build` would do, without building: per graph, weights size at this precision and cache state."""
    manifest = read_manifest(artifacts)
    overrides = overrides or {}
    try:
        flavor = detect_flavor(flavor_name)
        flavor_label, version = flavor.name, flavor.version
    except PercoError:
        flavor, flavor_label, version = None, flavor_name, "not installed"
    existing = _read_engines(Path(out)) if out else {}
    rows = []
    for name in families.manifest_contract(manifest):
        entry = manifest["graphs"][name]
        shapes = profile_shapes(entry, overrides)
        if entry.get("quantized"):  # Q/DQ graphs already store 8-bit weights
            weights = entry["bytes"]
        else:  # float graphs of an int8/fp8 build become FP16 engines
            weights = entry["bytes"] * _BYTES_PER_WEIGHT["fp16" if precision in ("int8", "fp8") else precision] // 4
        key = engine_key(entry["sha256"][entry["file"]], precision, shapes, flavor, target_cc, refittable) \
            if flavor else None
        cached = bool(key and existing.get("graphs", {}).get(name, {}).get("key") == key)
        try:
            check_quantization(manifest, precision, artifacts)
            reason = flavor.unsupported(precision, target_cc) if flavor else "flavor not installed"
        except PercoError as exc:
            reason = str(exc)
        rows.append({"graph": name, "precision": precision, "flavor": f"{flavor_label} {version}",
                     "weights_bytes": weights, "max_shapes": {k: v["max"] for k, v in shapes.items()},
                     "unsupported": reason, "cached": cached})
    return rows


def build(artifacts, out, precision: str = "fp16", flavor_name: str = "auto", overrides: Optional[dict] = None,
          target_cc: tuple = (), log=print, graphs: Optional[list] = None, refittable: bool = False) -> Path:
    """Build one engine per graph (or per graph of `graphs`); reuse engines whose key is unchanged.

    `refittable` engines can take another model's weights in place (TensorRTBackend.switch).
    """
    if precision not in PRECISIONS:
        raise PercoError(f"unknown precision {precision!r}: {', '.join(PRECISIONS)}")
    artifacts, out = Path(artifacts), Path(out)
    manifest = read_manifest(artifacts)
    flavor = detect_flavor(flavor_name)
    reason = flavor.unsupported(precision, target_cc)
    if reason:
        raise PercoError(f"{flavor.name} {flavor.version} cannot build {precision}: {reason}")
    check_quantization(manifest, precision, artifacts)
    out.mkdir(parents=True, exist_ok=True)
    previous = _read_engines(out)
    same_run = previous.get("precision") == precision and previous.get("flavor") == flavor.name
    entries = {}
    cache_path = out / f"timing-{flavor.name}.cache"
    trt = flavor.module
    logger = make_logger(trt, flavor.name, log)
    builder = trt.Builder(logger)
    timing_cache = None
    selected = [g for g in families.manifest_contract(manifest) if graphs is None or g in graphs]
    for i, name in enumerate(selected, 1):
        entry = manifest["graphs"][name]
        shapes = profile_shapes(entry, overrides or {})
        key = engine_key(entry["sha256"][entry["file"]], precision, shapes, flavor, target_cc, refittable)
        old = previous.get("graphs", {}).get(name, {})
        engine_file = f"{name}-{precision}-{key[:12]}.engine"
        if same_run and old.get("key") == key and (out / engine_file).is_file() \
                and file_sha256(out / engine_file) == old.get("sha256"):
            log(f"[{i}/{len(selected)}] {name}: cached ({engine_file})")
            entries[name] = old
            continue
        log(f"[{i}/{len(selected)}] {name}: building {precision} with {flavor.name} {flavor.version}")
        start = time.perf_counter()
        source, made = precision_graph(artifacts, entry, precision, flavor, out, log)
        network = builder.create_network(flavor.network_flags())
        parser = trt.OnnxParser(network, logger)
        if not parser.parse_from_file(str(source)):
            errors = "; ".join(str(parser.get_error(j)) for j in range(parser.num_errors))
            raise PercoError(f"{flavor.name} cannot parse {source.name}: {errors}")
        config = builder.create_builder_config()
        if flavor.uses_timing_cache:
            if timing_cache is None:
                timing_cache = config.create_timing_cache(cache_path.read_bytes() if cache_path.is_file() else b"")
            config.set_timing_cache(timing_cache, ignore_mismatch=False)
        flavor.configure(config, precision, target_cc, refittable)
        if hasattr(trt, "IProgressMonitor"):
            config.progress_monitor = _progress_monitor(trt, log)
        profile = builder.create_optimization_profile()
        for j in range(network.num_inputs):
            tensor = network.get_input(j)
            ranges = shapes[tensor.name]
            profile.set_shape(tensor.name, ranges["min"], ranges["opt"], ranges["max"])
        config.add_optimization_profile(profile)
        blob = builder.build_serialized_network(network, config)
        if blob is None:
            hint = ""
            if refittable and flavor.strongly_typed and any("CUDA_SUCCESS" in e for e in logger.errors):
                hint = " (TensorRT-RTX compiles refittable engines on a GPU: build them where one is present)"
            raise PercoError(f"{flavor.name} failed to build {name} at {precision}: "
                             f"{'; '.join(logger.errors[-3:])}{hint}")
        atomic_write(out / engine_file, memoryview(blob))
        entries[name] = {"file": engine_file, "key": key, "sha256": file_sha256(out / engine_file),
                         "bytes": (out / engine_file).stat().st_size, "onnx": source.name,
                         "onnx_path": str(source.resolve()), "shapes": shapes, "refittable": refittable,
                         "precision": made, "build_seconds": round(time.perf_counter() - start, 3)}
        if entry.get("quantized"):  # a Q/DQ graph: its error was measured by perco quantize
            entries[name]["vs_fp32"] = manifest["quantization"]["error_vs_fp32"][name]
        elif source.name != entry["file"]:  # a precision graph: its error against FP32 on ONNX Runtime CPU
            error = graph_error(artifacts / entry["file"], source, entry, shapes, manifest["model"])
            entries[name]["vs_fp32"] = error
            log(f"    {source.name} vs fp32 on ONNX Runtime CPU: {error['metric']} {error['value']:.2e}")
        del blob, network, parser, config
    if timing_cache is not None:
        atomic_write(cache_path, memoryview(timing_cache.serialize()))
    result = {"format": ENGINES_FORMAT, "flavor": flavor.name, "version": flavor.version, "precision": precision,
              "target_cc": list(target_cc), "model": manifest["model"], "tokenizer": _copy_tokenizer(artifacts, manifest, out),
              **_copy_entropy_model(artifacts, manifest, out), "graphs": entries}
    atomic_json(out / ENGINES_MANIFEST, result)
    keep = {e["file"] for e in entries.values()} | {e["onnx"] for e in entries.values()}
    for path in out.iterdir():  # engines of earlier builds of this precision that no manifest names
        if path.suffix == ".engine" and path.name not in keep and f"-{precision}-" in path.name:
            path.unlink()
    log(f"wrote {out / ENGINES_MANIFEST}")
    return out / ENGINES_MANIFEST


def graph_error(reference: Path, candidate: Path, entry: dict, shapes: dict, model: dict, seed: int = 0) -> dict:
    """`compare_graphs` on seeded inputs at the profile's opt shapes; token ids and indices are drawn
    within the graph's vocabulary (its entry's, e.g. T5's, else the caption tokenizer's) and the codebook
    (`model`: the manifest's model entry)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    feed = {}
    for inp in entry["inputs"]:
        shape = shapes[inp["name"]]["opt"]
        if inp["name"].startswith("input_ids"):
            vocab = entry.get("vocab_size", model["tokens"]["vocab_size"])
            feed[inp["name"]] = rng.integers(0, vocab, shape).astype(np.int64)
        elif inp["name"] == "indices":
            feed[inp["name"]] = rng.integers(0, model["codebook_size"], shape).astype(np.int64)
        elif inp["name"] == "timestep":
            feed[inp["name"]] = np.full(shape, 500, np.float32)
        else:
            feed[inp["name"]] = rng.standard_normal(shape).astype(np.float32)
    return compare_graphs(reference, candidate, [feed])


def compare_graphs(reference: Path, candidate: Path, feeds: list, optimize: bool = True) -> dict:
    """A candidate graph (FP16, BF16, Q/DQ) against its FP32 reference on ONNX Runtime CPU, over `feeds`:
    {"metric": "max_rel_error", "value": max |c - r| / max |r|, "rms_rel_error": ...}, worst feed and output;
    {"metric": "mismatch_fraction", "value": ...} for integer outputs. BF16 graphs run through
    `_bf16_emulation`; `optimize=False` runs the candidate's Q and DQ as written (ONNX Runtime's
    CPU provider has no float8 kernels to fuse them into)."""
    import numpy as np
    import onnxruntime as ort

    options = ort.SessionOptions()
    if not optimize:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    with tempfile.TemporaryDirectory() as tmp:
        runnable = _bf16_emulation(candidate, Path(tmp)) if _has_bf16(candidate) else candidate
        a = ort.InferenceSession(str(reference), providers=["CPUExecutionProvider"])
        b = ort.InferenceSession(str(runnable), options, providers=["CPUExecutionProvider"])
        pairs = [pair for feed in feeds for pair in zip(a.run(None, feed), b.run(None, feed))]
    if pairs[0][0].dtype == np.int64:
        return {"metric": "mismatch_fraction", "value": max(float((x != y).mean()) for x, y in pairs)}
    worst = rms = 0.0
    for x, y in pairs:
        x, y = x.astype(np.float64), y.astype(np.float64)
        worst = max(worst, float(np.abs(y - x).max() / max(np.abs(x).max(), 1e-12)))
        rms = max(rms, float(np.sqrt(((y - x) ** 2).mean() / max((x**2).mean(), 1e-24))))
    return {"metric": "max_rel_error", "value": worst, "rms_rel_error": rms}


def _progress_monitor(trt, log):
    """Builds of full-size graphs take minutes: log each top-level builder phase and its time."""

    class Monitor(trt.IProgressMonitor):
        def __init__(self):
            trt.IProgressMonitor.__init__(self)
            self.started, self.top = {}, set()

        def phase_start(self, phase_name, parent_phase, num_steps):
            if parent_phase is None or parent_phase in self.top:
                if parent_phase is None:
                    self.top.add(phase_name)
                self.started[phase_name] = time.perf_counter()
                log(f"    {'  ' if parent_phase else ''}{phase_name} ({num_steps} steps) ...")

        def step_complete(self, phase_name, step):
            return True  # never cancel

        def phase_finish(self, phase_name):
            if phase_name in self.started:
                indent = "" if phase_name in self.top else "  "
                self.top.discard(phase_name)
                log(f"    {indent}{phase_name}: {time.perf_counter() - self.started.pop(phase_name):.1f} s")

    return Monitor()


def _copy_tokenizer(artifacts: Path, manifest: dict, out: Path) -> Optional[str]:
    """Engines folders are self-contained: the tokenizer (for compressing captions) travels with them."""
    name = manifest.get("tokenizer")
    if name:
        copy_folder(artifacts / name, out / name, names=tokenizer_files(artifacts / name))
    return name


def _copy_entropy_model(artifacts: Path, manifest: dict, out: Path) -> dict:
    """The learned entropy model travels too: TensorRT does not build its integer network, the runtime's numpy
    reference runs it (the same integers)."""
    name = manifest.get("entropy_model")
    if not name:
        return {}
    copy_folder(artifacts / name, out / name, names=ENTROPY_FILES, replace=True)
    return {"entropy_model": name}


def _has_bf16(path: Path) -> bool:
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    return any(t.data_type == onnx.TensorProto.BFLOAT16 for t in graph.initializer)


def _bf16_emulation(path: Path, folder: Path) -> Path:
    """An FP32 graph that rounds to BF16 wherever the BF16 graph stores a BF16 tensor (weights and
    every BF16 node output), computing each op in FP32 as TensorRT's BF16 kernels accumulate.
    ONNX Runtime's CPU provider runs almost no op in BF16; it runs this."""
    import onnx
    import onnx.external_data_helper
    from onnx import TensorProto, helper, numpy_helper

    inferred = folder / "inferred.onnx"
    onnx.shape_inference.infer_shapes_path(str(path), str(inferred))
    model = onnx.load(str(inferred), load_external_data=False)
    onnx.external_data_helper.load_external_data_for_model(model, str(path.parent))
    bf16 = {v.name for v in (*model.graph.value_info, *model.graph.output)
            if v.type.tensor_type.elem_type == TensorProto.BFLOAT16}
    for t in model.graph.initializer:
        if t.data_type == TensorProto.BFLOAT16:
            t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t).astype("float32"), t.name))
    nodes = []
    for node in model.graph.node:
        for attr in node.attribute:
            if attr.name in ("to", "dtype") and attr.i == TensorProto.BFLOAT16:
                attr.i = TensorProto.FLOAT
            elif attr.type == onnx.AttributeProto.TENSOR and attr.t.data_type == TensorProto.BFLOAT16:
                attr.t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(attr.t).astype("float32")))
        rounded = []
        for i, name in enumerate(node.output):
            if name in bf16:
                node.output[i] = f"{name}__fp32"
                rounded += [helper.make_node("Cast", [f"{name}__fp32"], [f"{name}__bf16"], to=TensorProto.BFLOAT16),
                            helper.make_node("Cast", [f"{name}__bf16"], [name], to=TensorProto.FLOAT)]
        nodes += [node, *rounded]
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    del model.graph.value_info[:]
    out = folder / "bf16-emulation.onnx"
    large = not _fits(model) or model.ByteSize() > 1_900_000_000
    onnx.save_model(model, str(out), save_as_external_data=large, location="bf16-emulation.data")
    return out


def _read_engines(out: Path) -> dict:
    try:
        value = json.loads((out / ENGINES_MANIFEST).read_text())
        return value if value.get("format") == ENGINES_FORMAT else {}
    except (OSError, ValueError):
        return {}


def build_into_cache(model_dir, progress: bool) -> Path:
    """FP16 engines of `model_dir` in the cache, exported and built there first if needed (the
    `build_into_cache` hook: the tensorrt backend given only a model folder)."""
    from perco.engine.demo import cache_dir
    from perco.engine.model import ModelInfo
    from perco.export.onnx import export_into_cache

    artifacts = export_into_cache(model_dir, progress)
    folder = cache_dir() / "engines" / f"{ModelInfo.open(model_dir).fingerprint.hex()}-fp16"
    build(artifacts, folder, "fp16", "auto", log=(lambda text: print(text, file=sys.stderr)) if progress
          else (lambda text: None))
    return folder
