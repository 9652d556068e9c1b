#!/usr/bin/env bash
# The strong recipe (configs/demo-strong.toml: P x K batches, batch-hard triplet,
# in-batch verification) against the demo recipe (configs/demo.toml), each with and
# without the verification loss, as whole `reid demo` runs (render, index, train,
# extract with flip, evaluate). Seed 0 is the default synthetic set; every further
# seed renders its own set and runs the two recipes with verification only (ALL=1
# runs all four there too).
#
#   bench/ablation.sh [OUT]        # default artifacts/ablation; SEEDS="0 1"
#
# Prints one line per run and writes OUT/ablation.csv.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-artifacts/ablation}
seeds=${SEEDS:-"0 1"}
mkdir -p "$out"
cargo build --release --quiet
reid=target/release/reid
csv="$out/ablation.csv"
echo "seed,recipe,verif,rank1,mAP,train_s,total_s" > "$csv"
for seed in $seeds; do
  data=data/synthetic
  [ "$seed" = 0 ] || data=data/synthetic-seed$seed
  for verif in 1.0 0.0; do
    if [ "$seed" != 0 ] && [ "$verif" = 0.0 ] && [ -z "${ALL:-}" ]; then continue; fi
    for recipe in demo strong; do
      config=configs/demo.toml
      [ "$recipe" = strong ] && config=configs/demo-strong.toml
      name="$recipe-verif$verif-seed$seed"
      SECONDS=0
      "$reid" demo --seed "$seed" --config "$config" --set "loss.verif=$verif" \
        --data "$data" --artifacts "$out" --name "$name" > "$out/$name.log" 2>&1
      total=$SECONDS
      python3 - "$out/reports/$name/metrics.json" "$out/$name.log" "$seed" "$recipe" "$verif" "$total" >> "$csv" <<'PY'
import json, re, sys
path, log, seed, recipe, verif, total = sys.argv[1:]
m = json.load(open(path))
train = re.search(r"train\s+([0-9.]+)\s*s", open(log).read())
print(f"{seed},{recipe},{verif},{100 * m['rank1']:.2f},{100 * m['mAP']:.2f},{train.group(1) if train else ''},{float(total):.0f}")
PY
      tail -1 "$csv"
    done
  done
done
