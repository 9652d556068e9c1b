#!/usr/bin/env bash
# Installs a CUDA 13.0 toolchain from PyPI into .cuda/ (git-ignored) and builds a
# link-time stand-in for the driver library, so that the `cuda,cudnn` build
# compiles and links on a machine without a GPU or a CUDA install. Prints the
# environment to build with; `source <(scripts/cuda-toolchain.sh --env)` sets it.
#
# cudarc 0.19 (candle 0.11's) accepts CUDA up to 13.4; PyPI's unpinned nvcc is
# newer, so every package is pinned. The stand-in libcuda.so is for linking only:
# the binary loads the real driver on a GPU machine.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD/.cuda
venv=$root/venv
home=$root/home

env_lines() {
  local nv
  nv=$(echo "$venv"/lib/python3*/site-packages/nvidia)
  echo "export PATH=$nv/cu13/bin:\$PATH"
  echo "export CUDA_HOME=$home CUDA_ROOT=$home CUDA_PATH=$home"
  echo "export CUDA_COMPUTE_CAP=\${CUDA_COMPUTE_CAP:-90}"
  echo "export LIBRARY_PATH=$home/lib:$home/lib/stubs\${LIBRARY_PATH:+:\$LIBRARY_PATH}"
  echo "export LD_LIBRARY_PATH=$home/lib\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH}"
}
if [ "${1:-}" = "--env" ]; then env_lines; exit 0; fi

if [ ! -x "$venv/bin/pip" ]; then python3 -m venv "$venv"; fi
"$venv/bin/pip" install --quiet --disable-pip-version-check \
  nvidia-cuda-nvcc==13.0.88 nvidia-cuda-crt==13.0.88 nvidia-nvvm==13.0.88 \
  nvidia-cuda-runtime==13.0.96 nvidia-cuda-cccl==13.0.85 nvidia-cuda-nvrtc==13.0.88 \
  nvidia-curand==10.4.0.35 nvidia-cublas==13.0.2.14 nvidia-cudnn-cu13==9.21.1.3

nv=$(echo "$venv"/lib/python3*/site-packages/nvidia)
mkdir -p "$home/lib/stubs" "$home/include"
# One tree in the layout build scripts expect: bin/, include/, lib/.
ln -sfn "$nv/cu13/bin" "$home/bin"
for d in "$nv"/cu13/include "$nv"/cudnn/include; do
  for f in "$d"/*; do ln -sfn "$f" "$home/include/$(basename "$f")"; done
done
for f in "$nv"/cu13/lib/*.so* "$nv"/cudnn/lib/*.so*; do ln -sfn "$f" "$home/lib/$(basename "$f")"; done
for l in cublas cublasLt cudart nvrtc; do ln -sfn "$nv/cu13/lib/lib$l.so.13" "$home/lib/lib$l.so"; done
ln -sfn "$nv/cu13/lib/libcurand.so.10" "$home/lib/libcurand.so"
ln -sfn "$nv/cudnn/lib/libcudnn.so.9" "$home/lib/libcudnn.so"

# The driver API stand-in: every cu* symbol cudarc declares, returning an error.
cargo fetch --quiet
sys=$(ls -d "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/cudarc-0.19.*/src/driver/sys 2>/dev/null | head -1)
[ -n "$sys" ] || { echo "cudarc 0.19 sources not found after cargo fetch" >&2; exit 1; }
grep -rohP '\bpub (unsafe )?fn \Kcu\w+(?=\()' "$sys" | sort -u \
  | awk '{print "int " $1 "(void){return 999;}"}' > "$root/cuda_stub.c"
gcc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$home/lib/stubs/libcuda.so" "$root/cuda_stub.c"
ln -sfn libcuda.so "$home/lib/stubs/libcuda.so.1"
echo "CUDA 13.0 toolchain in $root; build environment:" >&2
env_lines
