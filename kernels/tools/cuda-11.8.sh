#!/usr/bin/env bash
# A CUDA 11.8 toolkit (nvcc, headers, CUB/libcu++ 1.x) in a private folder, from Debian 12's non-free
# packages, for compiling the kernels for Jetson Xavier (SM72): CUDA 13 has no SM72 target, and
# JetPack 5's own toolkit (CUDA 11.4) has the same CUB and no cuda/functional. Nothing is installed
# system-wide: the packages are downloaded with a private apt configuration and unpacked with dpkg -x
# into the conventional layout (bin/, include/, lib64/, nvvm/) that nvcc and CMake expect.
#
#   bash kernels/tools/cuda-11.8.sh DIR    -> prints DIR/root, the toolkit root (DIR/root/bin/nvcc)
#
# The host compiler must be GCC 11 or older (CUDA 11.8's limit): apt-get install g++-11.
# Exit 3: the packages could not be downloaded (no network, no Debian mirror).
set -euo pipefail
dir=$(realpath -m "${1:?usage: cuda-11.8.sh DIR}")
root="$dir/root"
if [ -x "$root/bin/nvcc" ]; then echo "$root"; exit 0; fi
version="11.8.89~11.8.0-5~deb12u1"
mkdir -p "$dir/apt/lists/partial" "$dir/debs"
cat >"$dir/apt/sources.list" <<EOF
deb http://deb.debian.org/debian bookworm main contrib non-free
EOF
apt_opts=(-o Dir::Etc::sourcelist="$dir/apt/sources.list" -o Dir::Etc::sourceparts=- -o Dir::State::Lists="$dir/apt/lists"
          -o Dir::Cache::archives="$dir/debs" -o APT::Get::List-Cleanup=0 -o Debug::NoLocking=1 -qq)
if ! apt-get "${apt_opts[@]}" update >"$dir/apt.log" 2>&1; then
  echo "cannot reach Debian's non-free packages (see $dir/apt.log)" >&2; exit 3
fi
(cd "$dir/debs" && apt-get "${apt_opts[@]}" download "nvidia-cuda-toolkit=$version" "nvidia-cuda-dev=$version" \
  "libnvvm4=$version" "libcudart11.0=$version" libcub-dev libcu++-dev libthrust-dev >>"$dir/apt.log" 2>&1) \
  || { echo "cannot download the CUDA 11.8 packages (see $dir/apt.log)" >&2; exit 3; }
rm -rf "$dir/unpacked" "$root"
mkdir -p "$dir/unpacked"
for deb in "$dir"/debs/*.deb; do
  case "$(basename "$deb")" in
    nvidia-cuda-dev_*)  # 2.9 GB unpacked, nearly all static libraries: only the headers and the runtime
      dpkg-deb --fsys-tarfile "$deb" | tar -x -C "$dir/unpacked" --wildcards './usr/include/*' \
        './usr/lib/x86_64-linux-gnu/libcudart*' './usr/lib/x86_64-linux-gnu/libcudadevrt*' \
        './usr/lib/x86_64-linux-gnu/libculibos*' './usr/lib/x86_64-linux-gnu/stubs/*' ;;
    *) dpkg -x "$deb" "$dir/unpacked" ;;
  esac
done
rm -rf "$dir/debs"
u="$dir/unpacked/usr"
mkdir -p "$root/bin" "$root/nvvm/bin" "$root/nvvm/lib64"
cp "$u/lib/nvidia-cuda-toolkit/bin/nvcc" "$root/bin/"          # a copy: nvcc reads nvcc.profile beside itself
cp -r "$u/lib/nvidia-cuda-toolkit/bin/crt" "$root/bin/"
for tool in ptxas fatbinary nvlink cudafe++ bin2c cuobjdump nvdisasm cu++filt; do
  [ -e "$u/bin/$tool" ] && ln -s "$u/bin/$tool" "$root/bin/$tool"
done
ln -s "$u/lib/nvidia-cuda-toolkit/bin/cicc" "$root/nvvm/bin/cicc"
ln -s "$u/lib/nvidia-cuda-toolkit/libdevice" "$root/nvvm/libdevice"
ln -s "$u"/lib/x86_64-linux-gnu/libnvvm.so* "$root/nvvm/lib64/"
ln -s "$u/include" "$root/include"
ln -s "$u/lib/x86_64-linux-gnu" "$root/lib64"
cat >"$root/bin/nvcc.profile" <<'EOF'
TOP              = $(_HERE_)/..
NVVMIR_LIBRARY_DIR = $(TOP)/nvvm/libdevice
LD_LIBRARY_PATH += $(TOP)/nvvm/lib64:$(TOP)/lib64:
PATH            += $(TOP)/nvvm/bin:$(_HERE_):
INCLUDES        +=  "-I$(TOP)/include" $(_SPACE_)
LIBRARIES        =+ $(_SPACE_) "-L$(TOP)/lib64/stubs" "-L$(TOP)/lib64"
CUDAFE_FLAGS    +=
PTXAS_FLAGS     +=
EOF
echo "$root"
