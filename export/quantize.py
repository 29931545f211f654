"""Explicit quantization: Q/DQ ONNX graphs (INT8 or FP8 E4M3) calibrated on real pipeline inputs.

`perco quantize --artifacts ART -o QART --precision int8|fp8 [--calibration DIR]` writes a
complete artifacts folder: the text encoder, VAE encoder, denoiser and VAE decoder become Q/DQ
graphs (onnxruntime.quantization, QDQ format, per-channel weights, MinMax calibration); the
hyper-encoder and local-feature graphs stay FP32 (the indices must not change). Calibration
inputs come from running the FP32 graphs on the images of DIR (else the built-in sample image
and seeded noise images), so the denoiser sees real latents at real timesteps. Each Q/DQ graph is
then validated against its FP32 graph on ONNX Runtime CPU on held-out inputs. Implicit
(builder-side) calibration is never used.
"""

import json
import shutil
from pathlib import Path
from typing import Optional

import numpy as np

from perco.engine import families
from perco.engine.errors import PercoError
from perco.engine.files import ENTROPY_FILES, atomic_json, copy_folder, tokenizer_files
from perco.engine.manifest import MANIFEST, file_sha256, read_manifest, spec_from_artifacts
from perco.engine.sampling import FlowSchedule
from perco.engine.text import Retokenizer, caption_text
from perco.export.build import compare_graphs

# The denoiser runs at every step and holds nearly all of the decode's FLOPs; the text encoder runs
# once per image. The VAE runs once, and its decoder is the most range-sensitive network (measured:
# docs/tensorrt.md), so it stays in FP16/FP32 unless asked for.
QUANTIZED_GRAPHS = ("text_encoder", "denoiser")
QUANTIZABLE_GRAPHS = ("text_encoder", "vae_encoder", "denoiser", "vae_decoder")
WEIGHTED_OPS = ("Conv", "MatMul", "Gemm")


# Boundary layers left unquantized, by the names our export gives them (tests check they exist):
# the UNet's conv_in_extended reads the noisy latent and the local features concatenated, whose
# ranges differ by channel, and conv_out writes the prediction; the time embedding reads a
# sinusoid; cross-attention keys/values read the text embeddings (CLIP's have outlier channels);
# the VAE's first and last convolutions touch pixels and latents.
BOUNDARY_LAYERS = ("/conv_in_extended/", "/unet/conv_out/", "/time_embedding/", "/attn2/to_k/", "/attn2/to_v/",
                   "/encoder/conv_in/", "/quant_conv/", "/post_quant_conv/", "/decoder/conv_out/")


def excluded_nodes(model, keep_float: tuple = ()) -> list:
    """Names of the weighted layers left unquantized: the boundary layers above, and every product
    of two activations (attention's QK^T and its weighted sum: a softmax output or a key has no
    single range int8 holds well; TensorRT runs these fused in FP16); and layers whose names
    contain one of `keep_float`."""
    graph = model.graph
    weights = {t.name for t in graph.initializer} | {o for n in graph.node if n.op_type == "Constant" for o in n.output}
    excluded = {n.name for n in graph.node if n.op_type == "MatMul" and not any(i in weights for i in n.input)}
    kept = BOUNDARY_LAYERS + tuple(keep_float)  # keep_float: the user's own name fragments
    excluded |= {n.name for n in graph.node if n.op_type in WEIGHTED_OPS and any(b in n.name for b in kept)}
    return sorted(excluded)


def _images(calibration, count: int, width: int, height: int, seed: int) -> list:
    from PIL import Image

    from perco.engine.demo import sample_image
    from perco.engine.imageio import load_image

    if calibration:
        paths = sorted(p for p in Path(calibration).iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg"))
        if not paths:
            raise PercoError(f"calibration folder {calibration} holds no PNG or JPEG images")
        arrays = [load_image(p) for p in paths[:count]]
    else:
        rng = np.random.default_rng(seed)
        arrays = [sample_image(width, height)] + [
            rng.integers(0, 256, (height // 8 + 1, width // 8 + 1, 3)).astype(np.uint8).repeat(8, 0).repeat(8, 1)
            for _ in range(count - 1)]
    return [np.asarray(Image.fromarray(a).resize((width, height), Image.BICUBIC)) for a in arrays]


def pipeline_feeds(artifacts: Path, manifest: dict, images: list, seed: int) -> dict:
    """graph -> list of input dicts, produced by the FP32 graphs on `images` (ONNX Runtime CPU)."""
    import onnxruntime as ort

    from perco.engine.imageio import to_model_input
    from perco.engine.noise import gaussian_noise

    spec, _ = spec_from_artifacts(artifacts)
    family = families.of_manifest(manifest)
    contract = families.manifest_contract(manifest)
    sessions = {name: ort.InferenceSession(str(artifacts / manifest["graphs"][name]["file"]),
                                           providers=["CPUExecutionProvider"]) for name in contract}
    optional = family.optional_text if spec.has_optional_text else None
    retokenize = Retokenizer(spec.optional_text_dir, optional.max_length) if optional else None
    rng = np.random.default_rng(seed)
    feeds = {name: [] for name in contract}
    text_names = [n for n, _, _ in family.graphs["text_encoder"].outputs]
    for i, image in enumerate(images):
        x = to_model_input(image)
        latent = sessions["vae_encoder"].run(None, {"image": x})[0]
        indices = sessions["hyper_encoder"].run(None, {"latent": latent})[0]
        local = sessions["local_features"].run(None, {"indices": indices})[0]
        caption = rng.integers(300, 20000, int(rng.integers(3, 20))) % spec.tokens.vocab_size
        both = [spec.text_input_ids([]), spec.text_input_ids(caption)]  # (uncond, cond)
        ids = {name: np.stack([b[name] for b in both]) for name in both[0]}
        text = dict(zip(text_names, sessions["text_encoder"].run(text_names, ids)))  # e.g. [2, 77, D]
        if optional:  # the T5 rows, as the codec fills them
            t5_ids = retokenize([caption_text(c, spec.tokenizer_dir) for c in ([], caption)])
            rows = sessions[optional.component].run(None, {optional.input: t5_ids})[0]
            text[optional.into][:, optional.offset : optional.offset + optional.max_length] = rows
            feeds[optional.component].append({optional.input: t5_ids})
        feeds["vae_encoder"].append({"image": x})
        feeds["hyper_encoder"].append({"latent": latent})
        feeds["local_features"].append({"indices": indices})
        feeds["text_encoder"].append(ids)
        feeds["vae_decoder"].append({"latent": latent})
        for t in (999, 700, 400, 100):  # noisy latents as the sampler makes them
            noise = gaussian_noise(seed * 1000 + i * 10 + t, latent.shape)
            if isinstance(spec.schedule, FlowSchedule):  # x_sigma = (1 - sigma) x_0 + sigma noise
                sigma = float(spec.schedule.shifted(np.float64((t + 1) / 1000)))
                sample, timestep = (1 - sigma) * latent + sigma * noise, sigma * 1000
            else:
                alpha = spec.schedule.alphas_cumprod[t]
                sample, timestep = np.sqrt(alpha) * latent + np.sqrt(1 - alpha) * noise, t
            sample = sample.astype(np.float32)
            feeds["denoiser"].append({"sample": np.concatenate([sample, sample]),
                                      "timestep": np.full(2, timestep, np.float32),
                                      "local_features": np.concatenate([local, local]),
                                      **{k: text[k] for k in family.text_outputs}})
    return feeds


class _Reader:
    def __init__(self, feeds):
        self._it = iter(feeds)

    def get_next(self):
        return next(self._it, None)


def quantize(artifacts, out, precision: str = "int8", calibration=None, count: int = 4, log=print,
             graphs=QUANTIZED_GRAPHS, keep_float: tuple = (), size: Optional[tuple] = None) -> dict:
    """Write Q/DQ artifacts to `out`; return {graph: {"metric", "value"}} errors vs FP32 (held-out inputs).

    `graphs`: which of QUANTIZABLE_GRAPHS get Q/DQ; the others are copied as they are (FP32),
    and `perco build` makes them FP16 engines. `keep_float`: name fragments of more layers to leave
    in float (for a layer a real checkpoint shows to be sensitive). `size`: (width, height) of the
    calibration and check images, default the profile's opt size; smaller needs less memory
    (calibrating the full-size UNet at 512x512 needs more than 24 GiB).
    """
    import logging

    import onnx

    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    logging.getLogger().setLevel(logging.ERROR)  # the quantizer's advice to pre-process goes to the root logger
    if precision not in ("int8", "fp8"):
        raise PercoError(f"quantize makes int8 or fp8 graphs, not {precision!r}")
    unknown = sorted(set(graphs) - set(QUANTIZABLE_GRAPHS))
    if unknown or not graphs:
        raise PercoError(f"cannot quantize {', '.join(unknown) or 'no graph'}: choose from {', '.join(QUANTIZABLE_GRAPHS)}")
    artifacts, out = Path(artifacts), Path(out)
    if artifacts.resolve() == out.resolve():
        raise PercoError("write quantized artifacts to another folder than the FP32 ones")
    manifest = read_manifest(artifacts)
    if manifest.get("quantization"):
        raise PercoError(f"{artifacts} is already quantized ({manifest['quantization']}); start from FP32 artifacts")
    opt = manifest["graphs"]["vae_encoder"]["shapes"]["image"]["opt"]  # [B, 3, H, W]
    width, height = size or (opt[3], opt[2])
    pad = spec_from_artifacts(artifacts)[0].pad_multiple
    if width % pad or height % pad:
        raise PercoError(f"calibration size {width}x{height} must be a multiple of {pad} pixels")
    calibration_images = _images(calibration, count, width, height, seed=0)
    held_out = _images(None, 2, width, height, seed=1)
    calibration_feeds = pipeline_feeds(artifacts, manifest, calibration_images, seed=0)
    check_feeds = pipeline_feeds(artifacts, manifest, held_out, seed=1)
    qtype = QuantType.QInt8 if precision == "int8" else QuantType.QFLOAT8E4M3FN
    # onnxruntime calibrates float8 only with its Distribution method; int8 uses MinMax
    method = CalibrationMethod.MinMax if precision == "int8" else CalibrationMethod.Distribution
    out.mkdir(parents=True, exist_ok=True)
    new = json.loads(json.dumps(manifest))
    report = {}
    for name in families.runtime_graphs(manifest):  # the entropy model's integer graph is copied as it is
        entry = manifest["graphs"][name]
        files = list(entry["sha256"])
        if name not in graphs:
            for f in files:
                shutil.copyfile(artifacts / f, out / f)
            continue
        target = f"{Path(entry['file']).stem}-{precision}.onnx"
        excluded = excluded_nodes(onnx.load(str(artifacts / entry["file"]), load_external_data=False), keep_float)
        log(f"quantizing {name} to {precision} (calibration: {len(calibration_feeds[name])} inputs; "
            f"{len(excluded)} layers kept in float)")
        quantize_static(str(artifacts / entry["file"]), str(out / target), _Reader(calibration_feeds[name]),
                        quant_format=QuantFormat.QDQ, activation_type=qtype, weight_type=qtype, per_channel=True,
                        calibrate_method=method, op_types_to_quantize=["Conv", "MatMul", "Gemm"],
                        nodes_to_exclude=excluded, use_external_data_format=entry["external_data"] is not None,
                        extra_options={"ActivationSymmetric": True, "WeightSymmetric": True,
                                       "QuantizeBias": False})  # TensorRT takes float biases
        files = [target] + _external_files(out / target)
        new["graphs"][name].update(file=target, external_data=files[1] if len(files) > 1 else None,
                                   sha256={f: file_sha256(out / f) for f in files},
                                   bytes=sum((out / f).stat().st_size for f in files), quantized=precision,
                                   float_layers=len(excluded))
        report[name] = compare_graphs(artifacts / entry["file"], out / target, check_feeds[name], optimize=False)
        log(f"    {name}: {report[name]['metric']} {report[name]['value']:.3e} vs fp32 (held-out inputs, ORT CPU)")
    copy_folder(artifacts / manifest["tokenizer"], out / manifest["tokenizer"],
                names=tokenizer_files(artifacts / manifest["tokenizer"]))
    if manifest.get("entropy_model"):
        copy_folder(artifacts / manifest["entropy_model"], out / manifest["entropy_model"],
                    names=ENTROPY_FILES, replace=True)
    new["quantization"] = {"precision": precision,
                           "method": f"QDQ, {method.name} calibration, per-channel symmetric weights, float biases; "
                                     "attention products and boundary layers kept in float",
                           "graphs": list(report),
                           "calibration": str(calibration) if calibration else "built-in sample + seeded images",
                           "calibration_size": [width, height],
                           "error_vs_fp32": report}
    atomic_json(out / MANIFEST, new)
    return report


def _external_files(path: Path) -> list:
    """The external-data files a saved ONNX graph points at (the quantizer writes one beside a
    graph over 2 GB), so the manifest hashes and copies them too."""
    import onnx
    from onnx.external_data_helper import ExternalDataInfo, uses_external_data

    graph = onnx.load(str(path), load_external_data=False).graph
    return sorted({ExternalDataInfo(t).location for t in graph.initializer if uses_external_data(t)})
