#!/usr/bin/env bash
# Builds torchreid's Cython ranking (rank_cy) into .bench/rank_cy, for
# `torch_baseline.py eval --rank-cy .bench/rank_cy`. The PyPI packages of
# torchreid 0.2.5 (wheel and sdist) leave the .pyx out, so the source comes from
# the deep-person-reid repository at a pinned commit: from a local clone given as
# $1, else downloaded (set-up only: benchmarks and tests never touch the network).
set -euo pipefail
cd "$(dirname "$0")/.."
commit=f8cd150fdf77e8d9e1ed143b7f308c2c609ded50
dir=.bench/rank_cy
py=.bench/bin/python
[ -x "$py" ] || { echo "no $py: python3 -m venv .bench && .bench/bin/pip install -r bench/requirements.txt" >&2; exit 1; }
mkdir -p "$dir"
for f in rank_cy.pyx setup.py; do
  if [ $# -ge 1 ]; then
    git -C "$1" show "$commit:torchreid/metrics/rank_cylib/$f" >"$dir/$f"
  else
    curl -fsSL "https://raw.githubusercontent.com/KaiyangZhou/deep-person-reid/$commit/torchreid/metrics/rank_cylib/$f" -o "$dir/$f"
  fi
done
# setup.py imports distutils, which Python 3.12 dropped; setuptools provides it.
(cd "$dir" && "../bin/python" setup.py build_ext --inplace >/dev/null)
"$py" -c "import sys; sys.path.insert(0, '$dir'); import rank_cy; print('rank_cy built:', rank_cy.__file__)"
