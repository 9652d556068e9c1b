#!/usr/bin/env bash
# Builds the `cuda,cudnn` binary on a machine without a GPU (CUDA 13.0 from PyPI,
# see scripts/cuda-toolchain.sh) and packs it for a GPU machine as .cuda/reid.xz.
# CUDA_COMPUTE_CAP defaults to 90 (H100/H200).
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .cuda/home/lib/stubs/libcuda.so ] || scripts/cuda-toolchain.sh >/dev/null
eval "$(scripts/cuda-toolchain.sh --env)"
cargo build --release --features cuda,cudnn --target-dir .cuda/target
strip -o .cuda/reid .cuda/target/release/reid
xz -6 -T0 -c .cuda/reid > .cuda/reid.xz
ls -l .cuda/reid.xz
