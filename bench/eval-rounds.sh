#!/usr/bin/env bash
# Alternating rounds of `reid bench eval` and the PyTorch + torchreid Cython
# baseline on the same case files, in one run (the machines are shared: only
# figures of one run compare). Prints one JSON line per measurement and a summary.
#   bench/eval-rounds.sh [ROUNDS] [Q,G,D]
# Needs the release binary (cargo build --release) and the .bench venv with
# rank_cy built (bench/README.md).
set -euo pipefail
cd "$(dirname "$0")/.."
rounds=${1:-3}
size=${2:-3368,15913,2048}
IFS=, read -r nq ng dim <<<"$size"
case=artifacts/bench/eval-v2-${nq}x${ng}x${dim}
reid=target/release/reid
py=.bench/bin/python
log=$(mktemp)
for r in $(seq "$rounds"); do
  "$reid" bench eval --eval-size "$size" --iters 3 --warmup 0 | tail -1 | sed "s/^{/{\"round\":$r,\"who\":\"reid\",/" | tee -a "$log"
  "$py" bench/torch_baseline.py eval --threads 2 --iters 3 --query "$case/query.safetensors" \
    --gallery "$case/gallery.safetensors" --rank-cy .bench/rank_cy | sed "s/^{/{\"round\":$r,\"who\":\"torch\",/" | tee -a "$log"
done
python3 - "$log" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
reid = [r["process_s_median"] for r in rows if r["who"] == "reid"]
torch = [r["total_s"] for r in rows if r["who"] == "torch"]
ratios = [a / b for a, b in zip(reid, torch)]
print(json.dumps({"reid_process_s": reid, "torch_total_s": torch, "ratio_per_round": ratios,
                  "ratio_median": statistics.median(ratios)}))
PY
rm -f "$log"
