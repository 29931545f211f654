#!/usr/bin/env bash
# A real aarch64 run of the torch-free runtime, under QEMU user emulation (issue 17, item 3).
#
#   sudo benchmarks/aarch64_check.sh [CACHE_DIR]        (default CACHE_DIR: /tmp/perco-aarch64)
#
# NOT run by CI: it takes several minutes (the emulated decodes alone take about a minute each, and
# the first run builds a Debian arm64 root filesystem), needs root (chroot, a private mount namespace)
# and the Debian and PyPI mirrors. Re-runnable: the root filesystem and the wheels are cached in
# CACHE_DIR; the aarch64 environment, the model, the artifacts and every output are made afresh.
#
# What it does:
#  1. a Debian arm64 root filesystem (`debootstrap --foreign --variant=minbase`, python3 + python3-pip
#     + libstdc++6); the packages are unpacked with dpkg-deb, not configured: a second stage would run
#     aarch64 programs from aarch64 programs, which needs binfmt_misc, and this script registers
#     nothing with the kernel. Every aarch64 program runs as `chroot ROOTFS qemu-aarch64-static PROG`.
#  2. aarch64 wheels of the runtime's dependencies (pip download --only-binary=:all: --platform
#     manylinux*_aarch64, at the versions constraints.txt pins) + this project's own wheel (pure Python);
#     then, under QEMU, a venv in the root filesystem and `pip install --no-index` of perco-engine
#     from those wheels alone: no torch, and no constriction (the environment marker leaves it out).
#  3. x86-64 (this machine's .venv): init-tiny, export (ONNX + manifest), compress a sample image
#     (torch backend from the model, and onnxruntime from the artifacts), decompress on onnxruntime.
#  4. aarch64, once per CPU model in QEMU_CPUS: `perco info --json`, `perco compress` and `perco
#     decompress` on onnxruntime from the artifacts, and a probe (the same Python on both sides) that
#     dumps the entropy-decoded caption and indices (bitstream.unpack), every graph's outputs during a
#     compress and a decode, the decoder noise, the rANS coder in use and the package versions.
#  5. compares the two sides and writes benchmarks/results/aarch64_check.json and .md.
#
# Pass: the entropy-decoded caption and indices identical on both sides, and the decoded pixels
# identical or at least MIN_PSNR dB (default 50) from the x86-64 decode. Exit status 1 otherwise.
# Wall times under emulation measure QEMU, not an aarch64 CPU.
#
# Environment: QEMU_CPUS (default "cortex-a76 max": cortex-a76 has about a Jetson Orin's Cortex-A78AE
# feature set, no SVE; max has everything QEMU emulates, SVE2 included), SUITE (bookworm), MIRROR
# (http://deb.debian.org/debian), PYTHON (the x86-64 interpreter with perco[export]: .venv/bin/python),
# MIN_PSNR (50), RESULTS (benchmarks/results).
set -euo pipefail

REPO=$(cd "$(dirname "$0")/.." && pwd)
CACHE=$(mkdir -p "${1:-/tmp/perco-aarch64}" && cd "${1:-/tmp/perco-aarch64}" && pwd)
SUITE=${SUITE:-bookworm}
MIRROR=${MIRROR:-http://deb.debian.org/debian}
QEMU_CPUS=${QEMU_CPUS:-cortex-a76 max}
PYTHON=${PYTHON:-$REPO/.venv/bin/python}
MIN_PSNR=${MIN_PSNR:-50}
RESULTS=${RESULTS:-$REPO/benchmarks/results}
CAPTION="a red barn under a yellow sun"
ROOTFS=$CACHE/rootfs
WHEELS=$CACHE/wheels
WORK=$CACHE/work
LOGS=$WORK/logs
TIMES=$WORK/times.tsv  # step, seconds, command

say() { printf '\n== %s\n' "$*" >&2; }
die() { printf 'aarch64_check: %s\n' "$*" >&2; exit 2; }
trap 'rc=$?; [ $rc -eq 0 ] || printf "aarch64_check: failed (exit %s) in: %s\n  logs: %s\n" "$rc" "${STEP:-setup}" "$LOGS" >&2' EXIT

# timed STEP LOG CMD...: run CMD, its stdout+stderr to $LOGS/LOG, its wall time to $TIMES
timed() {
  local step=$1 log=$2; shift 2
  STEP=$step
  local t0 t1 rc
  t0=$(date +%s.%N)
  set +e
  ( set -e; "$@" ) >"$LOGS/$log" 2>&1  # a subshell outside any `if`, so that errexit holds inside functions
  rc=$?
  set -e
  t1=$(date +%s.%N)
  if [ $rc -ne 0 ]; then
    tr '\r' '\n' <"$LOGS/$log" | tail -n 40 >&2
    return $rc
  fi
  printf '%s\t%s\t%s\n' "$step" "$(echo "$t1 - $t0" | bc)" "$*" >>"$TIMES"
  printf '  %-34s %8.1f s\n' "$step" "$(echo "$t1 - $t0" | bc)" >&2
}

# in_aarch64 CPU CMD...: run an aarch64 program of the root filesystem under qemu-aarch64-static, with
# $WORK at /work and $WHEELS at /wheels, in a private mount namespace (the mounts go with it) and a
# clean environment (nothing of this machine's pip or perco configuration leaks in). /sys is left out on
# purpose: with this machine's (x86-64) sysfs, `import onnxruntime` segfaults under QEMU in its cpuinfo
# probe; without it, onnxruntime warns that cpuinfo failed and takes the CPU features from the auxiliary
# vector (HWCAP), which QEMU sets from -cpu.
in_aarch64() {
  local cpu=$1; shift
  unshare --mount --propagation private /bin/sh -c '
    set -e
    r=$1 w=$2 h=$3 cpu=$4; shift 4
    mount -t proc proc "$r/proc"
    mount --rbind /dev "$r/dev"
    mount --bind "$w" "$r/work"
    mount --bind "$h" "$r/wheels"
    exec env -i PATH=/opt/perco/bin:/usr/bin:/bin HOME=/root LANG=C.UTF-8 QEMU_CPU="$cpu" \
      "$(command -v chroot)" "$r" /usr/bin/qemu-aarch64-static "$@"
  ' sh "$ROOTFS" "$WORK" "$WHEELS" "$cpu" "$@"
}

# --- 0. host tools -----------------------------------------------------------------------------
[ "$(id -u)" = 0 ] || die "run as root (chroot and mount need it)"
[ "$(uname -m)" = x86_64 ] || die "the x86-64 side runs here: this is $(uname -m)"
[ -x "$PYTHON" ] || die "no x86-64 interpreter at $PYTHON (set PYTHON=)"
need=()
command -v qemu-aarch64-static >/dev/null || need+=(qemu-user-static)
command -v debootstrap >/dev/null || need+=(debootstrap)
command -v bc >/dev/null || need+=(bc)
command -v unshare >/dev/null || need+=(util-linux)
if [ ${#need[@]} -gt 0 ]; then
  say "installing ${need[*]}"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi
rm -rf "$WORK" && mkdir -p "$WORK" "$LOGS" "$WHEELS" "$RESULTS"
: >"$TIMES"

# --- 1. the arm64 root filesystem (cached) -----------------------------------------------------
build_rootfs() {
  local part=$CACHE/rootfs.partial
  rm -rf "$part"
  debootstrap --foreign --arch=arm64 --variant=minbase --include=python3,python3-pip,libstdc++6 \
    "$SUITE" "$part" "$MIRROR"
  # debootstrap unpacked the Required packages; unpack the rest (python3, pip and their dependencies)
  local pkg deb
  for pkg in $(cat "$part/debootstrap/base"); do
    deb=$(ls "$part"/var/cache/apt/archives/"${pkg}"_*.deb | head -n 1)
    dpkg-deb --fsys-tarfile "$deb" | tar --keep-directory-symlink -xf - -C "$part"
  done
  rm -f "$part/proc" && mkdir -p "$part/proc" "$part/work" "$part/wheels"  # debootstrap leaves proc -> /proc
  cp "$(command -v qemu-aarch64-static)" "$part/usr/bin/"
  chroot "$part" /usr/bin/qemu-aarch64-static /sbin/ldconfig
  echo "$SUITE $MIRROR $(date -u +%FT%TZ)" >"$part/.perco-rootfs"
  mv "$part" "$ROOTFS"
}
if [ ! -f "$ROOTFS/.perco-rootfs" ]; then
  say "building the arm64 root filesystem ($SUITE) in $ROOTFS"
  rm -rf "$ROOTFS"
  timed rootfs_build rootfs.log build_rootfs
else
  say "arm64 root filesystem: cached ($(cat "$ROOTFS/.perco-rootfs"))"
fi
cp "$(command -v qemu-aarch64-static)" "$ROOTFS/usr/bin/"  # this machine's QEMU, should it have changed
PYVER=$(readlink "$ROOTFS/usr/bin/python3" | sed 's/^python//')  # e.g. 3.11
[[ $PYVER =~ ^3\.[0-9]+$ ]] || die "cannot tell the root filesystem's Python version"

# --- 2. wheels, and the aarch64 environment from them alone --------------------------------------
say "aarch64 wheels for CPython $PYVER"
RUNTIME="numpy pillow safetensors onnxruntime tqdm tokenizers"  # pyproject's runtime set minus constriction
rm -f "$WHEELS"/perco_engine-*.whl
timed wheels_download wheels.log "$PYTHON" -m pip download --only-binary=:all: --implementation cp \
  --python-version "$PYVER" --abi "cp${PYVER/./}" --abi abi3 --abi none \
  --platform manylinux2014_aarch64 --platform manylinux_2_17_aarch64 --platform manylinux_2_28_aarch64 \
  -c "$REPO/constraints.txt" -d "$WHEELS" $RUNTIME
# this project's wheel, built from a copy of the working tree's files (tracked and not ignored), so that
# nothing stale in the repository's setuptools build/ folder gets in and nothing is written there
copy_source() {
  rm -rf "$CACHE/src" && mkdir -p "$CACHE/src"
  git -C "$REPO" ls-files -z --cached --others --exclude-standard \
    | (cd "$REPO" && xargs -0 sh -c 'for f; do if [ -e "$f" ]; then printf "%s\0" "$f"; fi; done' sh) \
    | tar -C "$REPO" --null -T - -cf - | tar -C "$CACHE/src" -xf -
}
timed source_copy source.log copy_source
timed wheel_perco wheel.log env -C "$CACHE/src" "$PYTHON" -m pip wheel --no-deps --no-build-isolation \
  -w "$WHEELS" .
PERCO_VERSION=$(ls "$WHEELS"/perco_engine-*.whl | sed 's/.*perco_engine-\([^-]*\)-.*/\1/')

say "aarch64 venv: pip install --no-index perco-engine from the wheels (under QEMU)"
rm -rf "$ROOTFS/opt/perco"
CPU0=${QEMU_CPUS%% *}
timed aarch64_venv venv.log in_aarch64 "$CPU0" /usr/bin/python3 -m venv --without-pip --system-site-packages /opt/perco
timed aarch64_pip_install pip-install.log in_aarch64 "$CPU0" /opt/perco/bin/python -m pip install \
  --no-index --find-links /wheels --no-cache-dir "perco-engine==$PERCO_VERSION"
timed aarch64_pip_freeze pip-freeze.log in_aarch64 "$CPU0" /opt/perco/bin/python -m pip freeze --local

# --- 3. x86-64 side ----------------------------------------------------------------------------
cat >"$WORK/probe.py" <<'EOF'
"""One side of the aarch64 check: python probe.py SIDE ARTIFACTS IMAGE CAPTION STREAM... (writes SIDE.npz, SIDE.json).

Records the rANS coder and versions; the entropy-decoded caption and indices of each bitstream (bitstream.unpack);
every graph's outputs (first and last call) during a compress of IMAGE and a decode of the first STREAM through the
Codec API (the calls `perco compress` / `perco decompress` make), the decoder noise, and the uint8 results."""
import importlib.metadata as md
import importlib.util
import json
import os
import platform
import sys
import time

import numpy as np

side, artifacts, image_path, caption, *streams = sys.argv[1:]
t0 = time.perf_counter()
os.chdir(os.path.dirname(os.path.abspath(__file__)))  # the work folder: paths are relative to it
from perco.engine import bitstream  # noqa: E402
from perco.engine.codec import Codec  # noqa: E402
from perco.engine.entropy import rans  # noqa: E402
from perco.engine.imageio import load_image  # noqa: E402
from perco.engine.noise import gaussian_noise  # noqa: E402

arrays, meta = {}, {"side": side, "machine": platform.machine(), "python": platform.python_version(),
                    "libc": " ".join(platform.libc_ver()), "coder": rans.CODER, "versions": {}, "streams": {}}
for name in ("perco-engine", "numpy", "onnxruntime", "pillow", "safetensors", "tokenizers", "tqdm", "constriction",
             "torch"):
    try:
        meta["versions"][name] = md.version(name)
    except md.PackageNotFoundError:
        meta["versions"][name] = None
try:  # the CPU features the process sees (AT_HWCAP 16, AT_HWCAP2 26): under QEMU, those of -cpu
    auxv = np.frombuffer(open("/proc/self/auxv", "rb").read(), np.uint64).reshape(-1, 2)
    meta["hwcap"] = {name: hex(int(v)) for key, name in ((16, "AT_HWCAP"), (26, "AT_HWCAP2"))
                     for k, v in auxv if int(k) == key}
except OSError:
    meta["hwcap"] = None
meta["constriction_importable"] = importlib.util.find_spec("constriction") is not None
meta["torch_importable"] = importlib.util.find_spec("torch") is not None
import onnxruntime  # noqa: E402

meta["onnxruntime_providers"] = onnxruntime.get_available_providers()

codec = Codec.from_pretrained(None, backend="onnxruntime", artifacts=artifacts)
spec = codec.model.stream_spec
phase = "none"
calls = {}
run = codec._run


def recording_run(graph, **inputs):
    out = run(graph, **inputs)
    n = calls[phase, graph] = calls.get((phase, graph), 0) + 1
    for key, value in out.items():
        if n == 1:
            arrays[f"{phase}.{graph}.first.{key}"] = np.array(value)
        arrays[f"{phase}.{graph}.last.{key}"] = np.array(value)
    return out


codec._run = recording_run
for path in streams:
    data = open(path, "rb").read()
    header, caption_ids, indices = bitstream.unpack(data, spec, codec.backend)
    name = path.rsplit("/", 1)[-1]
    arrays[f"unpack.{name}.caption"] = caption_ids
    arrays[f"unpack.{name}.indices"] = indices
    meta["streams"][name] = {"bytes": len(data), "width": header.width, "height": header.height,
                             "seed": header.seed, "caption_tokens": int(caption_ids.size),
                             "token_grid": list(indices.shape)}
phase = "compress"
t = time.perf_counter()
arrays["compress.bytes"] = np.frombuffer(codec.compress(load_image(image_path), caption=caption), np.uint8)
meta["compress_s"] = time.perf_counter() - t
phase = "decode"
data = open(streams[0], "rb").read()
header = bitstream.parse(data)[0]
t = time.perf_counter()
arrays["decode.image"] = codec.decompress(data)
meta["decode_s"] = time.perf_counter() - t
local = arrays["decode.local_features.first.local_features"]
arrays["noise"] = gaussian_noise(header.seed, (1, codec.model.family_def.latent_channels, *local.shape[2:]))
meta["calls"] = {f"{p}.{g}": n for (p, g), n in calls.items()}
meta["torch_imported"] = "torch" in sys.modules
meta["constriction_imported"] = "constriction" in sys.modules
meta["total_s"] = time.perf_counter() - t0
np.savez(f"{side}.npz", **arrays)
json.dump(meta, open(f"{side}.json", "w"), indent=1)
print(json.dumps({k: meta[k] for k in ("side", "machine", "coder", "torch_imported", "constriction_imported")}))
EOF

say "x86-64 side ($("$PYTHON" -c 'import platform; print(platform.python_version())'))"
cd "$WORK"
"$PYTHON" -c "from PIL import Image; from perco.engine.demo import sample_image
Image.fromarray(sample_image(256, 192)).save('input.png')"
PERCO_X86=$(dirname "$PYTHON")/perco
timed x86_init_tiny init-tiny.log "$PERCO_X86" init-tiny M --tokenizer "$REPO/tests/data/clip-tokenizer"
timed x86_export export.log "$PERCO_X86" export --model M -o ART
timed x86_compress_torch x86-compress-torch.log "$PERCO_X86" compress input.png -o x86-torch.perco --model M \
  --caption "$CAPTION"
timed x86_compress_onnxruntime x86-compress-ort.log "$PERCO_X86" compress input.png -o x86-ort.perco \
  --backend onnxruntime --artifacts ART --caption "$CAPTION"
x86_info() { "$PERCO_X86" info x86-torch.perco --artifacts ART --json >info-x86.json; }
timed x86_info x86-info.log x86_info
timed x86_decompress x86-decompress.log "$PERCO_X86" decompress x86-torch.perco -o x86.png --backend onnxruntime \
  --artifacts ART
timed x86_probe x86-probe.log "$PYTHON" probe.py x86 ART input.png "$CAPTION" x86-torch.perco

# --- 4. aarch64 side, once per CPU model ---------------------------------------------------------
P="/opt/perco/bin/python /opt/perco/bin/perco"  # the console script, run by the interpreter (no exec of #!)
aarch64_info() { in_aarch64 "$1" $P info /work/x86-torch.perco --artifacts /work/ART --json >"$WORK/info-aarch64-$1.json"; }
for cpu in $QEMU_CPUS; do
  say "aarch64 side, QEMU -cpu $cpu"
  timed "aarch64_${cpu}_info" "aarch64-$cpu-info.log" aarch64_info "$cpu"
  timed "aarch64_${cpu}_compress" "aarch64-$cpu-compress.log" in_aarch64 "$cpu" $P compress /work/input.png \
    -o "/work/aarch64-$cpu.perco" --backend onnxruntime --artifacts /work/ART --caption "$CAPTION"
  timed "aarch64_${cpu}_decompress" "aarch64-$cpu-decompress.log" in_aarch64 "$cpu" $P decompress \
    /work/x86-torch.perco -o "/work/aarch64-$cpu.png" --backend onnxruntime --artifacts /work/ART
  # no shell in between: an emulated program cannot exec another aarch64 program without binfmt_misc
  timed "aarch64_${cpu}_probe" "aarch64-$cpu-probe.log" in_aarch64 "$cpu" /opt/perco/bin/python /work/probe.py \
    "aarch64-$cpu" ART input.png "$CAPTION" x86-torch.perco "aarch64-$cpu.perco"
done

# --- 5. compare and report -----------------------------------------------------------------------
say "comparing"
cat >"$WORK/compare.py" <<'EOF'
"""Compare the x86-64 and aarch64 sides; write aarch64_check.json and .md into RESULTS."""
import hashlib
import json
import math
import os
import platform
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

results, cpus, min_psnr = Path(sys.argv[1]), sys.argv[2].split(), float(sys.argv[3])
env = {k: os.environ[k] for k in ("ROOTFS", "REPO", "SUITE", "CACHE", "COMMIT", "DIRTY")}
rootfs = Path(env["ROOTFS"])


def sha(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def pixels(path):
    return np.asarray(Image.open(path).convert("RGB"))


def psnr(a, b):
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(255.0**2 / mse)


def pixel_report(ref, other):
    d = np.abs(ref.astype(np.int64) - other.astype(np.int64))
    return {"identical": bool((d == 0).all()), "values_differing": int((d > 0).sum()), "values": int(d.size),
            "max_abs_diff": int(d.max()), "psnr_db": psnr(ref, other)}


def array_report(a, b):
    """identical: same shape and values (floats: bit for bit); the dtypes are reported beside."""
    same = a.shape == b.shape and a.dtype.kind == b.dtype.kind and np.array_equal(a, b)
    rep = {"shape": list(a.shape), "dtypes": [str(a.dtype), str(b.dtype)], "identical": bool(same)}
    if a.shape == b.shape and a.dtype.kind == "f":
        d = np.abs(a.astype(np.float64) - b.astype(np.float64))
        rep.update(max_abs_diff=float(d.max()), max_abs=float(np.abs(a).max()),
                   elements_differing=int((d > 0).sum()), elements=int(d.size))
    elif a.shape == b.shape:
        rep["elements_differing"] = int((a != b).sum())
    return rep


def size_mb(path):
    path = Path(path)
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file() and not p.is_symlink()]
    return round(sum(p.stat().st_size for p in files) / 2**20, 1)


def stage_table(log):
    text = Path(log).read_text(errors="replace").replace("\r", "\n")
    m = re.search(r"stage timings \((\w+)\):\n((?:  \S+\s+[\d.]+ ms\n?)+)", text)
    return {k: float(v) for k, v in re.findall(r"  (\S+)\s+([\d.]+) ms", m.group(2))} if m else {}


def strip_memory(info):
    info = json.loads(json.dumps(info))
    info.get("decodable", {}).pop("max_pixels", None)  # estimated from the machine's memory
    return info


times = {}
for line in Path("times.tsv").read_text().splitlines():
    step, seconds, command = line.split("\t", 2)
    times[step] = {"seconds": round(float(seconds), 2), "command": command}

x86 = json.loads(Path("x86.json").read_text())
x86_arrays = np.load("x86.npz")
x86_png = pixels("x86.png")
info_x86 = json.loads(Path("info-x86.json").read_text())
streams = {name: {"bytes": Path(name).stat().st_size, "sha256": sha(name)} for name in ("x86-torch.perco", "x86-ort.perco")}
report = {
    "what": "the torch-free runtime installed from wheels on aarch64 (QEMU user emulation, Debian arm64 root "
            "filesystem) decoding a tiny-model bitstream on ONNX Runtime from exported artifacts, against x86-64",
    "pass_rule": f"caption and indices identical, and pixels identical or PSNR >= {min_psnr} dB against x86-64",
    "host": {"machine": platform.machine(), "cpu": next((l.split(":", 1)[1].strip() for l in
                                                         open("/proc/cpuinfo") if l.startswith("model name")), None),
             "cores": os.cpu_count(), "kernel": platform.release(),
             "debian": Path("/etc/debian_version").read_text().strip(),
             "qemu": subprocess.run(["qemu-aarch64-static", "--version"], capture_output=True,
                                    text=True).stdout.splitlines()[0]},
    "x86_64": {"python": x86["python"], "libc": x86["libc"], "coder": x86["coder"], "versions": x86["versions"]},
    "rootfs": {"suite": env["SUITE"], "debian_version": (rootfs / "etc/debian_version").read_text().strip(),
               "built": (rootfs / ".perco-rootfs").read_text().strip(),
               "note": "debootstrap --foreign --variant=minbase, packages unpacked with dpkg-deb (not configured)"},
    "aarch64_installed": [l for l in Path("logs/pip-freeze.log").read_text().split() if "==" in l],
    "source": {"commit": env["COMMIT"], "uncommitted_changes": int(env["DIRTY"]),
               "note": "the wheel is built from the working tree's files, uncommitted changes included"},
    "bitstreams": streams,
    "sizes_mb": {"rootfs_without_venv": round(size_mb(rootfs) - size_mb(rootfs / "opt/perco"), 1),
                 "aarch64_venv": size_mb(rootfs / "opt/perco"),
                 "aarch64_wheels_installed": round(sum(size_mb(w) for w in Path(env["CACHE"], "wheels").glob("*.whl")), 1),
                 "artifacts": size_mb("ART"), "model_folder": size_mb("M")},
    "x86_64_torch_vs_onnxruntime_compress_identical": streams["x86-torch.perco"]["sha256"] ==
                                                     streams["x86-ort.perco"]["sha256"],
    "x86_64_decode": {"png_sha256": sha("x86.png"), "stages_ms": stage_table("logs/x86-decompress.log"),
                      "probe_decode_equals_cli": bool(np.array_equal(x86_arrays["decode.image"], x86_png))},
    "runs": {},
    "times_s": times,
    "timing_note": "aarch64 wall times are QEMU user-mode emulation on the host above (TCG, no KVM): they measure "
                   "the emulator, not any aarch64 CPU, and say nothing about Jetson speed",
}
ok = True
for cpu in cpus:
    side = f"aarch64-{cpu}"
    meta = json.loads(Path(f"{side}.json").read_text())
    arrays = np.load(f"{side}.npz")
    png = pixels(f"{side}.png")
    info = json.loads(Path(f"info-{side}.json").read_text())
    unpack = {}
    for key in x86_arrays.files:
        if key.startswith("unpack."):
            unpack[key[len("unpack."):]] = array_report(x86_arrays[key], arrays[key])
    # the aarch64-made bitstream, entropy-decoded on aarch64, against the x86-made one decoded on x86-64
    for what in ("caption", "indices"):
        unpack[f"{side}.perco.{what} vs x86-torch.perco.{what}"] = array_report(
            x86_arrays[f"unpack.x86-torch.perco.{what}"], arrays[f"unpack.{side}.perco.{what}"])
    graphs = {key: array_report(x86_arrays[key], arrays[key]) for key in x86_arrays.files
              if key.startswith(("compress.", "decode.", "noise")) and key in arrays.files}
    entropy_identical = all(r["identical"] for r in unpack.values())
    pix = pixel_report(x86_png, png)
    passed = entropy_identical and (pix["identical"] or pix["psnr_db"] >= min_psnr) and meta["coder"] == "builtin" \
        and not meta["constriction_importable"] and not meta["torch_importable"]
    ok &= passed
    report["runs"][cpu] = {
        "qemu_cpu": cpu, "machine": meta["machine"], "python": meta["python"], "libc": meta["libc"],
        "coder": meta["coder"], "hwcap": meta["hwcap"], "versions": meta["versions"], "onnxruntime_providers": meta["onnxruntime_providers"],
        "constriction_importable": meta["constriction_importable"], "torch_importable": meta["torch_importable"],
        "torch_imported": meta["torch_imported"], "constriction_imported": meta["constriction_imported"],
        "info_json_equal_to_x86_64_except_memory_limit": strip_memory(info) == strip_memory(info_x86),
        "info_max_pixels": {"x86_64": info_x86.get("decodable", {}).get("max_pixels"),
                            "aarch64": info.get("decodable", {}).get("max_pixels")},
        "compress_bitstream": {"bytes": Path(f"{side}.perco").stat().st_size, "sha256": sha(f"{side}.perco"),
                               "identical_to_x86_64": sha(f"{side}.perco") == streams["x86-torch.perco"]["sha256"],
                               "probe_compress_identical":
                                   arrays["compress.bytes"].tobytes() == Path(f"{side}.perco").read_bytes()},
        "entropy_decoded": unpack, "entropy_decoded_identical": entropy_identical,
        "decode": {"png_sha256": sha(f"{side}.png"), "png_bytes_identical": sha(f"{side}.png") == sha("x86.png"),
                   "pixels_vs_x86_64": pix, "probe_decode_equals_cli": bool(np.array_equal(arrays["decode.image"], png)),
                   "stages_ms": stage_table(f"logs/{side}-decompress.log")},
        "graph_outputs_vs_x86_64": graphs,
        "probe_decode_s": meta["decode_s"], "probe_compress_s": meta["compress_s"],
        "passed": passed,
    }
report["passed"] = bool(ok)
results.mkdir(parents=True, exist_ok=True)
(results / "aarch64_check.json").write_text(json.dumps(report, indent=1) + "\n")

# --- markdown ---
L = ["# aarch64 check (QEMU user emulation)", "",
     "Generated by `benchmarks/aarch64_check.sh` (not run by CI); the full record is `aarch64_check.json`.", "",
     f"- host: {report['host']['cpu']}, {report['host']['cores']} cores, Linux {report['host']['kernel']}, "
     f"Debian {report['host']['debian']}, {report['host']['qemu']}",
     f"- x86-64 side: Python {x86['python']}, onnxruntime {x86['versions']['onnxruntime']}, numpy "
     f"{x86['versions']['numpy']}, rANS coder `{x86['coder']}`",
     f"- aarch64 root filesystem: Debian {report['rootfs']['debian_version']} ({env['SUITE']}) arm64, "
     f"{report['rootfs']['note']}",
     f"- aarch64 install: `pip install --no-index --find-links WHEELS perco-engine=={x86['versions']['perco-engine']}`"
     f" under QEMU: {', '.join(report['aarch64_installed'])}",
     f"- bitstream: `x86-torch.perco`, {streams['x86-torch.perco']['bytes']} bytes (256x192 sample image, tiny "
     f"perco-sd model, caption \"a red barn under a yellow sun\"); x86-64 compress torch vs onnxruntime identical: "
     f"{report['x86_64_torch_vs_onnxruntime_compress_identical']}",
     f"- pass rule: {report['pass_rule']}. **Result: {'PASS' if ok else 'FAIL'}**", "",
     "| QEMU -cpu | Python | onnxruntime | coder | torch / constriction importable | caption + indices identical "
     "| compress bytes identical | `info --json` equal | decoded PNG bytes identical | pixel values differing | max abs "
     "diff | PSNR vs x86-64 |",
     "|---|---|---|---|---|---|---|---|---|---:|---:|---:|"]
for cpu, r in report["runs"].items():
    p = r["decode"]["pixels_vs_x86_64"]
    L.append(f"| {cpu} | {r['python']} | {r['versions']['onnxruntime']} | `{r['coder']}` | "
             f"{r['torch_importable']} / {r['constriction_importable']} | {r['entropy_decoded_identical']} | "
             f"{r['compress_bitstream']['identical_to_x86_64']} | {r['info_json_equal_to_x86_64_except_memory_limit']} | "
             f"{r['decode']['png_bytes_identical']} | {p['values_differing']} / {p['values']} | {p['max_abs_diff']} | "
             + ("identical" if p["identical"] else f"{p['psnr_db']:.1f} dB") + " |")
L += [""] + [f"- `-cpu {cpu}`: {r['hwcap']}, probe decode {r['probe_decode_s']:.0f} s (the CLI's: "
              f"{r['decode']['stages_ms'].get('total', float('nan')) / 1000:.0f} s)" for cpu, r in report["runs"].items()]
dtype_notes = sorted({f"{k}: {'/'.join(v['dtypes'])}" for r in report["runs"].values()
                      for k, v in r["entropy_decoded"].items() if v["dtypes"][0] != v["dtypes"][1]})
if dtype_notes:
    L += ["", "Equal values, different integer dtypes (x86-64 / aarch64): " + "; ".join(dtype_notes) + "."]
sz = report["sizes_mb"]
L += ["", f"Sizes (MiB): root filesystem {sz['rootfs_without_venv']} + venv {sz['aarch64_venv']}; aarch64 wheels "
      f"{sz['aarch64_wheels_installed']}; ONNX artifacts {sz['artifacts']}; model folder {sz['model_folder']}."]
L += ["", "Graph outputs against x86-64 (max abs difference; `=` bit-identical):", "",
      "| output | " + " | ".join(report["runs"]) + " |", "|---|" + "---:|" * len(report["runs"])]
keys = list(next(iter(report["runs"].values()))["graph_outputs_vs_x86_64"]) if report["runs"] else []
for key in keys:
    cells = []
    for r in report["runs"].values():
        g = r["graph_outputs_vs_x86_64"][key]
        cells.append("=" if g["identical"] else (f"{g['max_abs_diff']:.3g} (of max {g['max_abs']:.3g})"
                                                 if "max_abs_diff" in g else f"{g.get('elements_differing')} differ"))
    L.append(f"| {key} | " + " | ".join(cells) + " |")
L += ["", "Wall times (seconds; aarch64 under QEMU emulation: they measure the emulator, not an aarch64 CPU):", "",
      "| step | s |", "|---|---:|"] + [f"| {k} | {v['seconds']} |" for k, v in times.items()]
L += ["", "Commands (x86-64 in the work folder; aarch64 as `chroot ROOTFS qemu-aarch64-static ...`, with the work "
      "folder at /work):", ""] + [f"- `{k}`: `{v['command']}`" for k, v in times.items()]
(results / "aarch64_check.md").write_text("\n".join(L) + "\n")
print(f"{'PASS' if ok else 'FAIL'}: wrote {results}/aarch64_check.json and .md")
sys.exit(0 if ok else 1)
EOF
STEP=compare
COMMIT=$(git -C "$REPO" rev-parse HEAD 2>/dev/null || echo unknown)
DIRTY=$(git -C "$REPO" --no-optional-locks status --porcelain 2>/dev/null | wc -l)
ROOTFS=$ROOTFS REPO=$REPO SUITE=$SUITE CACHE=$CACHE COMMIT=$COMMIT DIRTY=$DIRTY "$PYTHON" compare.py "$RESULTS" "$QEMU_CPUS" "$MIN_PSNR"
