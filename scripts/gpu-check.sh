#!/usr/bin/env bash
# One check of a GPU machine, in at most 5 minutes (the sum of the step limits),
# into one JSON report, so that a rerun fits in the same window:
#   scripts/gpu-check.sh OUT_DIR [REID_BINARY_OR_XZ]
#
# The machine needs no Rust toolchain and no network: build the CUDA binary on a
# CPU machine first (scripts/build-cuda.sh packs it as .cuda/reid.xz) and copy the
# repository (tests/fixtures, bench/) with it. python3 with torch and timm must be
# installed there; the CUDA libraries the binary loads (cuBLAS, cuRAND, cuDNN,
# NVRTC, the runtime) are taken from torch's nvidia wheels when the system has none.
#
# Steps: a 20-second precheck (driver, the binary and the libraries it loads,
# torch's CUDA) that stops the run at once if it fails; reid selftest --device
# cuda; reid bench train (res2net50_26w_4s, 256x128, 32 pairs) with --ledger in
# f32 (TF32) with the GPU's utilisation sampled, in bf16, and in f32 on the
# generic ops (--ops generic, candle's graph: the old path); the same ledgers in
# f32 and bf16 on this machine's CPU under --ops as-cuda (tiny images: the
# counts do not depend on the size), which the CUDA ledgers must equal; PyTorch's eager f32 and bf16
# autocast in one process; inference in f32 and bf16, ours and PyTorch's. Nothing
# large is written to OUT_DIR: the unpacked binary goes to /tmp. The report is
# OUT_DIR/gpu-check.json, with each step's output in OUT_DIR/<step>.log.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:?usage: scripts/gpu-check.sh OUT_DIR [REID_BINARY_OR_XZ]}
bin=${2:-.cuda/reid.xz}
mkdir -p "$out"
started=$(date +%s)
unpack=$(mktemp -d /tmp/reid-gpu.XXXXXX)

report_dir=$out
out=$unpack
source scripts/gpu-env.sh
out=$report_dir

# step NAME SECONDS COMMAND...: runs with a time limit, keeps its log, and records
# (name, exit status, seconds, and every JSON line it printed) for the report.
records=()
step() {
  local name=$1 limit=$2; shift 2
  local t0=$(date +%s)
  timeout "$limit" "$@" > "$out/$name.log" 2>&1
  local rc=$?
  local secs=$(( $(date +%s) - t0 ))
  local json=$(grep -E '^\{.*\}$' "$out/$name.log" | paste -sd, -)
  records+=("$name|$rc|$secs|[${json}]")
  echo "== $name: exit $rc in ${secs}s" >&2
  return $rc
}

# utilisation NAME COMMAND...: the step, with nvidia-smi sampling the GPU's
# utilisation (percent, every 100 ms) into OUT/NAME.util.
utilisation() {
  local name=$1; shift
  nvidia-smi --query-gpu=utilization.gpu --format=csv,noheader,nounits -lms 100 > "$out/$name.util" 2>/dev/null &
  local sampler=$!
  step "$name" "$@"
  local rc=$?
  kill "$sampler" 2>/dev/null
  return $rc
}

shape=(--arch res2net50_26w_4s --height 256 --width 128 --batch 64)
bench=(--iters 10 --warmup 3)
# The driver, the binary with the libraries it loads at start, torch's CUDA.
precheck='nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader && "$1" --version && python3 -c "import torch; print(\"torch\", torch.__version__, \"cuda\", torch.version.cuda); assert torch.cuda.is_available()"'
if ! step precheck 20 bash -c "$precheck" precheck "$bin"; then
  echo "precheck failed: see $out/precheck.log" >&2
else
  step selftest 65 "$bin" selftest --device cuda --fixtures tests/fixtures
  utilisation reid-train-f32 40 "$bin" bench train --device cuda "${shape[@]}" "${bench[@]}" --ledger
  step reid-train-bf16 35 "$bin" bench train --device cuda --precision bf16 "${shape[@]}" "${bench[@]}" --ledger
  step reid-train-generic 20 "$bin" bench train --device cuda --ops generic "${shape[@]}" --iters 5 --warmup 2 --ledger
  ledger_cpu='for p in f32 bf16; do "$1" bench train --device cpu --ops as-cuda --precision $p \
    --arch res2net50_26w_4s --batch 4 --height 64 --width 32 --iters 1 --warmup 0 --ledger || exit 1; done'
  step reid-ledger-cpu 15 bash -c "$ledger_cpu" ledger "$bin"
  step torch-train 50 python3 bench/torch_baseline.py train --device cuda --precision both "${shape[@]}" "${bench[@]}"
  step reid-infer-f32 15 "$bin" bench infer --device cuda --arch res2net50_26w_4s --batch 64 "${bench[@]}"
  step reid-infer-bf16 15 "$bin" bench infer --device cuda --precision bf16 --arch res2net50_26w_4s --batch 64 "${bench[@]}"
  step torch-infer 25 python3 bench/torch_baseline.py infer --device cuda --precision both --arch res2net50_26w_4s --batch 64 "${bench[@]}"
fi
rm -rf "$unpack"

python3 - "$out" "$started" "${records[@]}" <<'PY'
import json, sys, time
out, started, rows = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
report = {"started_unix": started, "seconds": int(time.time()) - started, "steps": {}}
for row in rows:
    name, rc, secs, js = row.split("|", 3)
    entry = {"exit": int(rc), "seconds": int(secs), "passed": rc == "0"}
    try:
        results = json.loads(js)
    except ValueError:
        results = []
    entry["result"] = results[-1] if len(results) == 1 else (results or None)
    report["steps"][name] = entry
report["precheck"] = open(f"{out}/precheck.log").read().strip().splitlines()
try:
    tail = open(f"{out}/selftest.log").read().strip().splitlines()
    report["selftest"] = tail[-1] if tail else None
except OSError:
    report["selftest"] = None
try:
    util = [float(v) for v in open(f"{out}/reid-train-f32.util").read().split() if v.strip()]
    report["gpu_utilisation_f32_train"] = {"samples": len(util), "mean": sum(util) / len(util) if util else None}
except (OSError, ValueError):
    report["gpu_utilisation_f32_train"] = None
def result(step, precision=None):
    r = report["steps"].get(step, {}).get("result")
    if isinstance(r, list):
        r = next((x for x in r if x.get("precision") == precision), None)
    return r or {}
torch_runs = {p: result("torch-train", p).get("images_per_s_median") for p in ("f32", "bf16")}
for p, ours in (("f32", "reid-train-f32"), ("bf16", "reid-train-bf16")):
    a, b = result(ours).get("images_per_s_median"), torch_runs[p]
    report[f"train_{p}_ratio_to_torch"] = a / b if a and b else None
for p in ("f32", "bf16"):
    a, b = result(f"reid-infer-{p}").get("images_per_s_median"), result("torch-infer", p).get("images_per_s_median")
    report[f"infer_{p}_ratio_to_torch"] = a / b if a and b else None
report["ledger"] = {s: result(s).get("ledger") for s in ("reid-train-f32", "reid-train-bf16", "reid-train-generic")}
for p in ("f32", "bf16"):
    report["ledger"][f"reid-ledger-cpu-{p}"] = result("reid-ledger-cpu", p).get("ledger")
# Each CUDA step's counts against the CPU's as-cuda plan in its precision (all
# but the bytes, which depend on the images' size).
for p in ("f32", "bf16"):
    cuda, cpu = report["ledger"][f"reid-train-{p}"], report["ledger"][f"reid-ledger-cpu-{p}"]
    if cuda and cpu:
        differ = {k: [cuda.get(k), cpu.get(k)] for k in cpu if k != "bytes_allocated" and cuda.get(k) != cpu.get(k)}
        report[f"ledger_{p}_cuda_equals_cpu_as_cuda"] = {"equal": not differ, "differ": differ}
    else:
        report[f"ledger_{p}_cuda_equals_cpu_as_cuda"] = None
json.dump(report, open(f"{out}/gpu-check.json", "w"), indent=1)
print(json.dumps(report, indent=1))
ok = all(s["passed"] for s in report["steps"].values())
sys.exit(0 if ok and len(report["steps"]) > 1 else 1)
PY
