#!/usr/bin/env bash
# One check of a GPU machine, in at most 8 minutes (the sum of the step limits),
# into one JSON report:
#   scripts/gpu-check.sh OUT_DIR [REID_BINARY_OR_XZ]
#
# The machine needs no Rust toolchain and no network: build the CUDA binary on a
# CPU machine first (scripts/build-cuda.sh packs it as .cuda/reid.xz) and copy the
# repository (tests/fixtures, bench/) with it. python3 with torch and timm must be
# installed there; the CUDA libraries the binary loads (cuBLAS, cuRAND, cuDNN,
# NVRTC, the runtime) are taken from torch's nvidia wheels when the system has none.
#
# Runs: nvidia-smi; reid selftest --device cuda; reid bench train (res2net50_26w_4s,
# 256x128, 32 pairs) in f32 (TF32) and bf16; reid bench infer; the same shapes in
# PyTorch (bench/torch_baseline.py: eager f32 and bf16 autocast); reid demo on the
# GPU, timed (stopped at its limit: the report then says how many epochs it
# finished). Each step has a time limit; a step that fails or times out is
# recorded as such and the rest still run. The report is OUT_DIR/gpu-check.json,
# with each step's output in OUT_DIR/<step>.log.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:?usage: scripts/gpu-check.sh OUT_DIR [REID_BINARY_OR_XZ]}
bin=${2:-.cuda/reid.xz}
mkdir -p "$out"
started=$(date +%s)

source scripts/gpu-env.sh

# step NAME SECONDS COMMAND...: runs with a time limit, keeps its log, and records
# (name, exit status, seconds, and the last JSON line it printed) for the report.
records=()
step() {
  local name=$1 limit=$2; shift 2
  local t0=$(date +%s)
  timeout "$limit" "$@" > "$out/$name.log" 2>&1
  local rc=$?
  local secs=$(( $(date +%s) - t0 ))
  local json=$(grep -E '^\{.*\}$' "$out/$name.log" | tail -1)
  records+=("$name|$rc|$secs|${json:-null}")
  echo "== $name: exit $rc in ${secs}s" >&2
}

train_shape=(--arch res2net50_26w_4s --height 256 --width 128 --batch 64)
step nvidia-smi 20 nvidia-smi
step selftest 80 "$bin" selftest --device cuda --fixtures tests/fixtures --verbose
step reid-train-f32 60 "$bin" bench train --device cuda "${train_shape[@]}" --iters 10 --warmup 3
step reid-train-bf16 60 "$bin" bench train --device cuda --precision bf16 "${train_shape[@]}" --iters 10 --warmup 3
step reid-infer-f32 40 "$bin" bench infer --device cuda --arch res2net50_26w_4s --batch 64 --iters 10 --warmup 3
step torch-train-f32 45 python3 bench/torch_baseline.py train --device cuda "${train_shape[@]}" --iters 10 --warmup 3
step torch-train-bf16 45 python3 bench/torch_baseline.py train --device cuda --precision bf16 "${train_shape[@]}" --iters 10 --warmup 3
step torch-infer-f32 30 python3 bench/torch_baseline.py infer --device cuda --arch res2net50_26w_4s --batch 64 --iters 10 --warmup 3
step demo 100 "$bin" demo --device cuda --data "$out/demo-data" --artifacts "$out/demo-artifacts"

python3 - "$out" "$started" "${records[@]}" <<'PY'
import json, sys, time
out, started, rows = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
report = {"started_unix": started, "seconds": int(time.time()) - started, "steps": {}}
for row in rows:
    name, rc, secs, js = row.split("|", 3)
    entry = {"exit": int(rc), "seconds": int(secs), "passed": rc == "0"}
    try:
        entry["result"] = json.loads(js)
    except ValueError:
        entry["result"] = None
    report["steps"][name] = entry
log = open(f"{out}/nvidia-smi.log").read()
report["gpu"] = next((l.strip() for l in log.splitlines() if "NVIDIA" in l and "Driver" not in l), None)
tail = open(f"{out}/selftest.log").read().strip().splitlines()
report["selftest"] = tail[-1] if tail else None
demo = open(f"{out}/demo.log").read().splitlines()
report["demo_table"] = [l for l in demo if l.startswith("|") or l.startswith("total")]
report["demo_epochs_done"] = sum(1 for l in demo if l.startswith("epoch "))
def ips(step):
    r = report["steps"][step]["result"] or {}
    return r.get("images_per_s_median")
for p in ("f32", "bf16"):
    a, b = ips(f"reid-train-{p}"), ips(f"torch-train-{p}")
    report[f"train_{p}_ratio_to_torch"] = a / b if a and b else None
json.dump(report, open(f"{out}/gpu-check.json", "w"), indent=1)
print(json.dumps(report, indent=1))
PY
