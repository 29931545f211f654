"""`perco`: compress, decompress, inspect; create tiny models; run the demo.

Every user error ends in one `error: ...` line on stderr. Exit codes: 0 success, 1 an error,
2 a bad flag or flag value, 130 interrupted. Outputs are written atomically (a failed run
leaves no partial file and destroys nothing); "-" is standard input or output.
"""

import argparse
import json
import math
import os
import sys
from pathlib import Path
from typing import Optional

from perco.engine import plugins
from perco.engine.errors import PercoError, UsageError

COMMAND_GROUP = "perco.commands"  # entry points adding verbs: name -> add_commands(subparsers) -> {verb: handler}
DEFAULT_BACKEND = "torch"  # without --backend: the backend --artifacts was made for, else this
MAX_BITSTREAM_BYTES = 16 << 20  # a valid bitstream is far smaller (16384 x 16384 at the finest grid: < 7 MB)


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, not argparse's usage dump
        self.exit(2, f"error: {message} (see '{self.prog} --help')\n")


def model_arg(p, required=True):
    p.add_argument("--model", metavar="DIR", required=required, default=None,
                   help="PerCo (SD) model folder (diffusers layout with hyper_enc/)"
                        + ("" if required else "; default: the bundled tiny demo model"))


def backend_arg(p):
    from perco.engine.backends import available
    from perco.engine.limits import MAX_PIXELS_ENV

    p.add_argument("--backend", default=None, choices=available(),
                   help=f"network backend (default: the one --artifacts was made for, else {DEFAULT_BACKEND}); "
                        "onnxruntime runs exported graphs without torch, tensorrt runs engines on an NVIDIA GPU")
    p.add_argument("--artifacts", metavar="DIR", default=None,
                   help="exported graphs for --backend onnxruntime (from 'perco export'; without it, --model is "
                        "exported into the cache on first use), or engines for --backend tensorrt (from "
                        "'perco build')")
    p.add_argument("--max-pixels", type=_pixels, default=None, metavar="N|WxH",
                   help="largest image to code, in pixels (default: estimated from the backend's memory, and "
                        f"the engines' profile for tensorrt; also {MAX_PIXELS_ENV})")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="perco", description=__doc__.split("\n")[0],
                     epilog="Run 'perco COMMAND --help' for the options of a command. Exit codes: 0 success, "
                            "1 error, 2 bad flags, 130 interrupted.")
    parser.add_argument("--version", action="version", version=_version())
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    p = sub.add_parser("compress", help="image -> bitstream",
                       description="Compress an image to a PerCo bitstream (caption + VQ token indices).")
    p.add_argument("image", metavar="IMAGE", help="input image (PNG, JPEG, WebP, ...; 8 or 16 bits; alpha is "
                                                   "composited over white), or - for standard input")
    p.add_argument("-o", "--output", required=True, metavar="OUT", help="bitstream file to write, or - for "
                                                                         "standard output")
    model_arg(p, required=False)
    p.add_argument("--caption", default=None, metavar="TEXT",
                   help="caption describing the image (global semantics); overrides --captioner")
    captioner_args(p)
    p.add_argument("--seed", type=uint64, default=0, metavar="N", help="decoder noise seed (default: 0)")
    p.add_argument("--steps-hint", type=positive_int, default=None, metavar="N",
                   help="suggest a step count to the decoder (stored in the bitstream)")
    p.add_argument("--send", type=_send, default=None, metavar="FRACTION|N",
                   help="hybrid mode (a model with a learned entropy model): transmit only the first groups of the "
                        "index schedule, a fraction of them (0.5) or a count (3); the decoder generates the rest from "
                        "the entropy model, seeded by --seed. Default: every group")
    backend_arg(p)
    quiet_arg(p)

    p = sub.add_parser("decompress", help="bitstream -> image",
                       description="Decode a bitstream to an image at the original size.")
    p.add_argument("input", metavar="IN", help="bitstream file, or - for standard input")
    p.add_argument("-o", "--output", required=True, metavar="OUT",
                   help="image to write: .png, .webp (both lossless) or .jpg/.jpeg (quality 95) by its extension, "
                        "or - for a PNG on standard output")
    model_arg(p, required=False)
    p.add_argument("--steps", type=positive_int, default=None, metavar="N",
                   help="denoising steps (default: the bitstream's hint, else 20 below 0.05 bpp, 5 at or above)")
    p.add_argument("--guidance", type=guidance_type, default=None, metavar="G",
                   help="classifier-free guidance scale, 0..50 (default: the bitstream's hint, else 3.0)")
    sampler_args(p)
    backend_arg(p)
    quiet_arg(p)

    p = sub.add_parser("info", help="show what a bitstream holds",
                       description="Header fields, bytes per section and bits per pixel of a bitstream.")
    p.add_argument("input", metavar="IN", help="bitstream file, or - for standard input")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    p.add_argument("--model", metavar="DIR", default=None,
                   help="also decode the caption and check the fingerprint against this model")
    p.add_argument("--artifacts", metavar="DIR", default=None,
                   help="the same with exported artifacts ('perco export') or engines ('perco build') instead "
                        "of a model folder; with either, also say whether the image is within the decode limit")
    p.add_argument("--backend", default=None, choices=["torch", "onnxruntime", "tensorrt"],
                   help="backend whose decode limit to check (default: as for decompress)")
    p.add_argument("--max-pixels", type=_pixels, default=None, metavar="N|WxH", help="a decode limit to check instead")

    p = sub.add_parser("import-legacy", help="convert a PerCo (SD) research-code file to a bitstream",
                       description="Read a file written by the PerCo (SD) research code (a pickled dict: zlib caption, "
                                   "torchac indices, image size) without running any pickle code, and write the same "
                                   "caption and indices as a PerCo Engine bitstream. The file stores no rate: give the "
                                   "model (and rate) that made it.")
    p.add_argument("input", metavar="OLD", help="research file, or - for standard input")
    p.add_argument("-o", "--output", required=True, metavar="OUT", help="bitstream file to write, or - for "
                                                                         "standard output")
    p.add_argument("--model", metavar="DIR", default=None, help="the PerCo (SD) model folder of the file's rate")
    p.add_argument("--artifacts", metavar="DIR", default=None, help="exported artifacts instead of a model folder")
    quiet_arg(p)

    p = sub.add_parser("demo", help="compress and decompress a sample image with the bundled tiny model",
                       description="Compress and decompress a generated sample image, write a side-by-side "
                                   "PNG and print the rate and stage timings. The bundled model has random "
                                   "weights: the pixels are meaningless. Use --model for a real checkpoint.")
    p.add_argument("--out", default="perco-demo", metavar="DIR", help="output folder (default: %(default)s)")
    p.add_argument("--image", default=None, metavar="IMAGE", help="use this image instead of the sample")
    captioner_args(p)
    model_arg(p, required=False)
    p.add_argument("--steps", type=positive_int, default=None, metavar="N", help="denoising steps")
    backend_arg(p)
    quiet_arg(p)
    parser.handlers = dict(COMMANDS)
    for name in plugins.names(COMMAND_GROUP):  # verbs an installed extension adds (the torch side's)
        add_commands = plugins.find(COMMAND_GROUP, name)
        if add_commands is not None:
            parser.handlers.update(add_commands(sub))
    return parser


def captioner_args(p):
    p.add_argument("--captioner", default=None, metavar="NAME",
                   help="caption the image with this captioner when no --caption is given (installed: blip2 with "
                        "perco-engine[export]; docs/captioners.md)")
    p.add_argument("--captioner-model", default=None, metavar="DIR",
                   help="the captioner's weights folder (BLIP-2: a transformers Blip2ForConditionalGeneration "
                        "folder such as blip2-opt-2.7b-coco; nothing is downloaded)")


def sampler_args(p):
    from perco.engine.sampling import SAMPLERS

    p.add_argument("--sampler", default=None, choices=sorted(SAMPLERS),
                   help="default: the model's (ddim, the PerCo (SD) reference); dpmpp2m: DPM-Solver++ 2M, for few "
                        "steps; flow-euler: flow-matching Euler, for flow-matching models")
    p.add_argument("--guidance-stop", type=int, default=0, metavar="N",
                   help="run the last N steps without guidance (conditional branch only; default 0)")


def quiet_arg(p):
    p.add_argument("-q", "--quiet", action="store_true", help="print nothing but errors")


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    from perco.engine.bitstream import VERSION

    try:
        release = version("perco-engine")
    except PackageNotFoundError:
        release = "unknown (not installed)"
    return f"perco-engine {release} (bitstream v{VERSION})"


def integer_type(minimum: int, maximum: Optional[int] = None, expected: Optional[str] = None):
    """An argparse `type`: an integer in minimum..maximum, else one line saying what was `expected`."""
    expected = expected or (f"an integer in {minimum}..{maximum}" if maximum is not None else
                            "a positive integer" if minimum == 1 else f"an integer >= {minimum}")

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < minimum or maximum is not None and value > maximum:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
        return value

    return parse


def number_type(minimum: float, maximum: float = math.inf, open_low: bool = False, expected: Optional[str] = None):
    """An argparse `type`: a finite number in minimum..maximum (minimum excluded with `open_low`)."""
    expected = expected or ("a positive number" if open_low and minimum == 0 and maximum == math.inf else
                            f"a number in {minimum:g}..{maximum:g}")

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        low_ok = value > minimum if open_low else value >= minimum
        if not (math.isfinite(value) and low_ok and value <= maximum):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
        return value

    return parse


positive_int = integer_type(1)
uint64 = integer_type(0, (1 << 64) - 1, "an integer in 0..2^64-1")


def _send(text: str):
    """A group count ("3") or a fraction in (0, 1] ("0.5")."""
    try:
        value = float(text) if any(c in text for c in ".eE") else int(text)
    except ValueError:
        value = None
    if value is None or isinstance(value, float) and not 0 < value <= 1 or isinstance(value, int) and value < 1:
        raise argparse.ArgumentTypeError(f"expected a fraction in (0, 1] or a group count >= 1, got {text!r}")
    return value


def guidance_type(text: str) -> float:
    from perco.engine.bitstream import MAX_GUIDANCE
    from perco.engine.codec import check_guidance

    try:
        return check_guidance(float(text))
    except (ValueError, PercoError):
        raise argparse.ArgumentTypeError(f"expected a finite number in 0..{MAX_GUIDANCE:g}, got {text!r}") from None


def _pixels(text: str) -> int:
    from perco.engine.limits import parse_max_pixels

    try:
        return parse_max_pixels(text)
    except UsageError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _say(args, text: str) -> None:
    """Progress and timings: stderr, unless --quiet."""
    if not getattr(args, "quiet", False):
        print(text, file=sys.stderr)


def _result(args, text: str) -> None:
    """The one-line result: stdout, or stderr when stdout carries the output; nothing with --quiet."""
    if not getattr(args, "quiet", False):
        print(text, file=sys.stderr if getattr(args, "output", None) == "-" else sys.stdout)


def backend_name(args) -> str:
    """--backend, else the backend --artifacts was made for (engines: tensorrt; graphs: onnxruntime), else torch."""
    from perco.engine.backends.tensorrt import ENGINES_MANIFEST
    from perco.engine.manifest import MANIFEST

    if args.backend:
        return args.backend
    if args.artifacts:
        folder = Path(args.artifacts)
        if (folder / ENGINES_MANIFEST).is_file() and not (folder / MANIFEST).is_file():
            return "tensorrt"
        return "onnxruntime"
    return DEFAULT_BACKEND


def model_folder(args):
    """--model, else (without --artifacts) the bundled tiny model, made on first use."""
    if args.model is None and args.artifacts is None:
        from perco.engine.demo import default_model

        args.model = str(default_model(progress=not getattr(args, "quiet", False)))
    return args.model


def _limit(args):
    """The codec's size limit for these flags, from configs and manifests only: no network is loaded."""
    from perco.engine.backends.tensorrt import profile_size
    from perco.engine.limits import backend_memory, decode_limit

    spec, manifest = spec_and_manifest(model_folder(args), args.artifacts)
    name = backend_name(args)
    max_size = profile_size(manifest) if name == "tensorrt" and manifest else None
    return spec, decode_limit(spec.sizes, backend_memory(name, max_size), args.max_pixels)


def _codec(args):
    from perco.engine.codec import Codec

    return Codec.from_pretrained(model_folder(args), backend=backend_name(args), artifacts=args.artifacts,
                                 progress=not args.quiet, max_pixels=args.max_pixels)


def read_bitstream(path) -> bytes:
    """All bytes of a bitstream file or of standard input ("-"), refusing more than MAX_BITSTREAM_BYTES."""
    name = "standard input" if path == "-" else str(path)
    try:
        if path == "-":
            data = sys.stdin.buffer.read(MAX_BITSTREAM_BYTES + 1)
        else:
            with open(path, "rb") as f:
                data = f.read(MAX_BITSTREAM_BYTES + 1)
    except FileNotFoundError:
        raise PercoError(f"bitstream {name} does not exist") from None
    except IsADirectoryError:
        raise PercoError(f"bitstream {name} is a folder") from None
    except OSError as exc:
        raise PercoError(f"cannot read bitstream {name}: {exc.strerror or exc}") from None
    if len(data) > MAX_BITSTREAM_BYTES:
        raise PercoError(f"{name} is larger than {MAX_BITSTREAM_BYTES >> 20} MiB: not a PerCo Engine bitstream")
    return data


def cmd_compress(args) -> None:
    from perco.engine.bitstream import Hints
    from perco.engine.imageio import check_output, load_image, read_image_size, write_output

    check_output(args.output)
    size = read_image_size(args.image)  # the header only: fail on a bad or huge image before any model loads
    spec, limit = _limit(args)
    if size is not None:
        limit.check_image(*size, spec.pad_multiple, encode=True)
    bound = limit.max_encode_pixels or limit.max_pixels
    image = load_image(args.image, max_pixels=bound)
    limit.check_image(image.shape[1], image.shape[0], spec.pad_multiple, encode=True)
    from perco.engine.captioners import caption_for

    caption, captioning = caption_for(args, image)
    with _codec(args) as codec:
        data = codec.compress(image, caption=caption, seed=args.seed, hints=Hints(steps=args.steps_hint),
                              progress=not args.quiet, send=args.send)
    write_output(args.output, data)
    h, w = image.shape[:2]
    _result(args, f"{args.output}: {len(data)} bytes, {8 * len(data) / (h * w):.4f} bpp ({w}x{h})")
    timings = type(codec.timings)({"caption": captioning, **codec.timings} if captioning else codec.timings)
    _say(args, "stage timings (compress):\n" + timings.table())


def cmd_decompress(args) -> None:
    from perco.engine import bitstream
    from perco.engine.imageio import check_output, output_format, save_image

    check_output(args.output)  # a device or special file first: its name has no image extension to complain of
    output_format(args.output)
    data = read_bitstream(args.input)
    header = bitstream.parse(data)[0]  # a corrupt or truncated file fails here, before any model loads
    spec, limit = _limit(args)
    limit.check_image(header.width, header.height, spec.pad_multiple)
    with _codec(args) as codec:
        image = codec.decompress(data, steps=args.steps, guidance=args.guidance, sampler=args.sampler,
                                 guidance_stop=args.guidance_stop, progress=not args.quiet)
    save_image(args.output, image)
    _result(args, f"{args.output}: {image.shape[1]}x{image.shape[0]} {output_format(args.output)}")
    _say(args, "stage timings (decompress):\n" + codec.timings.table())


def cmd_import_legacy(args) -> None:
    from perco.engine.imageio import check_output, write_output
    from perco.engine.legacy import import_legacy

    check_output(args.output)
    if not args.model and not args.artifacts:
        raise PercoError("import-legacy needs --model DIR (or --artifacts DIR): the file does not say its rate")
    old = read_bitstream(args.input)
    spec, _ = spec_and_manifest(args.model, args.artifacts)
    data = import_legacy(old, spec)
    write_output(args.output, data)
    _result(args, f"{args.output}: {len(data)} bytes (the research file: {len(old)} bytes, "
                  f"{100 * (1 - len(data) / len(old)):.0f} % smaller)")


def cmd_info(args) -> None:
    from perco.engine import bitstream

    data = read_bitstream(args.input)
    header, caption_words, index_words, sections = bitstream.parse(data)
    pixels = header.width * header.height
    info = {
        "version": bitstream.VERSION,
        "family": header.family,
        "fingerprint": header.fingerprint.hex(),
        "width": header.width,
        "height": header.height,
        "seed": header.seed,
        "hints": {"steps": header.hints.steps, "guidance": header.hints.guidance},
        "hybrid_groups_sent": header.groups,
        "bytes": {"total": sections.total, "header": sections.header, "caption": sections.caption,
                  "indices": sections.indices, "check": sections.check, "framing": sections.framing},
        "bpp": {"total": 8 * sections.total / pixels, "caption": 8 * sections.caption / pixels,
                "indices": 8 * sections.indices / pixels, "framing": 8 * sections.framing / pixels},
    }
    if args.model or args.artifacts:
        from perco.engine.text import detokenize

        from perco.engine.errors import DecodeLimitError

        spec, limit = _limit(args)
        _, caption_ids, indices = bitstream.unpack(data, spec.stream_spec)
        info["caption_tokens"] = int(caption_ids.size)
        info["caption"] = detokenize(caption_ids, spec.tokenizer_dir)
        info["token_grid"] = list(indices.shape)
        coder = spec.stream_spec.coder()
        info["index_coder"] = {"name": coder.name, "groups": coder.num_groups(indices.shape)}
        try:
            limit.check_image(header.width, header.height, spec.pad_multiple)
            info["decodable"] = {"backend": backend_name(args), "ok": True, "max_pixels": limit.max_pixels}
        except DecodeLimitError as exc:
            info["decodable"] = {"backend": backend_name(args), "ok": False, "max_pixels": limit.max_pixels,
                                 "reason": str(exc)}
    if args.json:
        print(json.dumps(info, indent=2))
        return
    b = info["bytes"]
    print(f"PerCo Engine bitstream v{info['version']}, {info['family']} model {info['fingerprint']}")
    print(f"  image     {header.width}x{header.height}, seed {header.seed}, hints {info['hints']}")
    print(f"  total     {b['total']:6d} bytes  {info['bpp']['total']:.4f} bpp")
    print(f"  framing   {b['framing']:6d} bytes  (header {b['header']}, check {b['check']})")
    print(f"  caption   {b['caption']:6d} bytes" + (f"  {info['caption_tokens']} tokens: {info['caption']!r}"
                                                    if "caption" in info else ""))
    print(f"  indices   {b['indices']:6d} bytes" + (f"  grid {info['token_grid'][0]}x{info['token_grid'][1]}"
                                                    if "token_grid" in info else ""))
    if "index_coder" in info:
        coder = info["index_coder"]
        sent = header.groups or coder["groups"]
        print(f"  coder     {coder['name']}, {sent} of {coder['groups']} groups sent"
              + (" (hybrid: the decoder draws the rest)" if header.groups else ""))
    elif header.groups:
        print(f"  hybrid    {header.groups} index groups sent (the decoder draws the rest)")
    if "decodable" in info:
        d = info["decodable"]
        print(f"  decode    {'within' if d['ok'] else 'OVER'} the {d['backend']} limit" + ("" if d["ok"] else
                                                                                         f": {d['reason']}"))


def spec_and_manifest(model, artifacts):
    """(ModelSpec, manifest or None) of an artifacts or engines folder, else of a model folder (no torch)."""
    from perco.engine.backends.tensorrt import ENGINES_MANIFEST, spec_from_engines
    from perco.engine.manifest import MANIFEST, spec_from_artifacts
    from perco.engine.model import ModelInfo

    if not artifacts:
        return ModelInfo.open(model).spec, None
    folder = Path(artifacts)
    if not (folder / MANIFEST).is_file() and (folder / ENGINES_MANIFEST).is_file():
        return spec_from_engines(folder)
    return spec_from_artifacts(folder)


def cmd_demo(args) -> None:
    from perco.engine.demo import run_demo

    with _codec(args) as codec:
        run_demo(args, codec)


COMMANDS = {"compress": cmd_compress, "decompress": cmd_decompress, "info": cmd_info, "demo": cmd_demo,
            "import-legacy": cmd_import_legacy}


def main(argv=None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help (0) or a bad flag (2, after one error line)
        return int(exc.code or 0)
    if not args.command:
        parser.print_help()
        return 2
    try:
        parser.handlers[args.command](args)
    except PercoError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # a bug: still one line, with a way to get the traceback
        if os.environ.get("PERCO_DEBUG"):
            raise
        print(f"error: internal error ({type(exc).__name__}: {exc}); rerun with PERCO_DEBUG=1 for a traceback",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
