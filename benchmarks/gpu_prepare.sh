#!/usr/bin/env bash
# Prepare the GPU check on a machine with a package index: wheels for what the GPU image lacks
# (CPython 3.12, x86-64; the image has torch, numpy, onnx, onnxruntime, cupy, triton, cuda-python),
# at the versions constraints.txt pins, plus this project's own wheel, into wheelhouse/ (about 40 MB,
# inside the 64 MiB a device call carries). docs/gpu.md says how to run the check with it.
set -euo pipefail
cd "$(dirname "$0")/.."
PACKAGES="diffusers transformers huggingface_hub hf-xet tokenizers safetensors constriction tqdm pillow regex PyYAML
requests certifi idna charset-normalizer urllib3 importlib_metadata zipp filelock packaging anyio h11 httpx httpcore
pytest iniconfig pluggy"
pins=()
for name in $PACKAGES; do
  pin=$(grep -iE "^${name//[-_]/[-_]}==" constraints.txt || true)
  pins+=("${pin:-$name}")
done
rm -rf wheelhouse && mkdir wheelhouse
python3 -m pip download -q --only-binary=:all: --no-deps --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 \
  -d wheelhouse "${pins[@]}"
python3 -m pip wheel -q --no-deps --no-build-isolation -w wheelhouse .
du -sh wheelhouse
