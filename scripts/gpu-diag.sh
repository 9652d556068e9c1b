#!/usr/bin/env bash
# Where the CUDA build's time goes, on a GPU machine, in about 3 minutes:
#   scripts/gpu-diag.sh OUT_DIR [REID_BINARY_OR_XZ]
#
# Runs from the repository root, as scripts/gpu-check.sh does (same binary, same
# libraries), and writes OUT_DIR/diag.log:
# - the device settings of `DeviceSpec::open` switched back one at a time
#   (REID_CUDA_EVENTS=1: cudarc's per-buffer events; REID_CUDA_POOL_TRIM=1: the
#   memory pool handed back at each synchronisation), each with `reid bench infer`
#   and `reid bench train` on res2net50_26w_4s at 256x128, batch 64;
# - inference at batch 8 beside batch 64 (time per batch that does not shrink with
#   the batch is host-side overhead per op, not GPU work);
# - the GPU's utilisation, sampled every 100 ms during a training bench;
# - host stacks of that bench, three samples by cuda-gdb (use an unstripped
#   binary: .cuda/target/release/reid, xz-packed);
# - per-kernel GPU times by Nsight Compute for 200 launches of the training step,
#   where the machine's runtime lets ncu read the counters.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:?usage: scripts/gpu-diag.sh OUT_DIR [REID_BINARY_OR_XZ]}
bin=${2:-.cuda/reid.xz}
mkdir -p "$out"
source scripts/gpu-env.sh
log=$out/diag.log
exec > >(tee -a "$log") 2>&1

shape=(--arch res2net50_26w_4s --height 256 --width 128)
bench() { # LABEL ENV... -- ARGS...: one bench, its JSON line
  local label=$1; shift
  local envs=()
  while [[ $1 != -- ]]; do envs+=("$1"); shift; done
  shift
  echo "== $label: $(env "${envs[@]}" timeout 60 "$bin" bench "$@" 2>&1 | tail -1)"
}
for setting in "" REID_CUDA_EVENTS=1 REID_CUDA_POOL_TRIM=1 "REID_CUDA_EVENTS=1 REID_CUDA_POOL_TRIM=1"; do
  read -ra envs <<< "$setting"
  bench "infer b64 [${setting:-tuned}]" "${envs[@]}" -- infer --device cuda "${shape[@]}" --batch 64 --iters 10 --warmup 3
  bench "train b64 [${setting:-tuned}]" "${envs[@]}" -- train --device cuda "${shape[@]}" --batch 64 --iters 8 --warmup 3
done
bench "infer b8 [tuned]" -- infer --device cuda "${shape[@]}" --batch 8 --iters 10 --warmup 3
bench "train b64 no-tf32 [tuned]" -- train --device cuda --no-tf32 "${shape[@]}" --batch 64 --iters 8 --warmup 3

echo "== utilisation and host stacks during a training bench"
nvidia-smi --query-gpu=utilization.gpu --format=csv,noheader,nounits -lms 100 > "$out/util.txt" 2>&1 &
smi=$!
# Not under `timeout`: cuda-gdb must attach to reid itself, not to its parent.
"$bin" bench train --device cuda "${shape[@]}" --batch 64 --iters 30 --warmup 3 > "$out/train-long.log" 2>&1 &
pid=$!
(sleep 90; kill "$pid" 2>/dev/null) &
sleep 12
for i in 1 2 3; do
  echo "-- stack sample $i"
  timeout 20 cuda-gdb -q -batch -p "$pid" -ex "thread apply all bt 30" 2>&1 | grep -E "^#|^Thread" | head -120
  sleep 1
done
wait "$pid"
kill "$smi" 2>/dev/null
echo "utilisation %, samples: $(wc -l < "$out/util.txt"), mean: $(awk '{s+=$1} END {if (NR) print s/NR}' "$out/util.txt")"
tail -1 "$out/train-long.log"

echo "== Nsight Compute: 200 launches of the training step"
timeout 60 ncu --clock-control none --launch-skip 3000 --launch-count 200 --metrics gpu__time_duration.sum --csv \
  "$bin" bench train --device cuda "${shape[@]}" --batch 64 --iters 2 --warmup 1 > "$out/ncu.csv" 2>&1
echo "ncu exit $?"
python3 - "$out/ncu.csv" <<'PY'
import csv, sys, collections
rows = list(csv.reader(open(sys.argv[1])))
start = next((i for i, r in enumerate(rows) if "Kernel Name" in r), None)
if start is None:
    print("no ncu rows"); sys.exit()
rows = [r for r in rows[start:] if len(r) == len(rows[start])]
head = rows[0]
k, v = head.index("Kernel Name"), head.index("Metric Value")
by = collections.defaultdict(lambda: [0, 0.0])
for r in rows[1:]:
    try:
        t = float(r[v].replace(",", ""))
    except ValueError:
        continue
    by[r[k][:90]][0] += 1
    by[r[k][:90]][1] += t
total = sum(t for _, t in by.values())
print(f"{len(rows) - 1} kernels, {total / 1e3:.1f} us of GPU time (unit as ncu gives)")
for name, (n, t) in sorted(by.items(), key=lambda x: -x[1][1])[:25]:
    print(f"{t / total * 100:5.1f}%  {n:4d}x  {name}")
PY
