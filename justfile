# Recipes wiring the `reid` stages. Each is a thin call of the binary; run
# `just --list` for the list. Variables can be set on the command line:
#   just market ROOT=/data/Market-1501-v15.09.15   (or: just market /data/...)
# SET holds config overrides separated by spaces, passed on to every training
# recipe, e.g. a quick check of the recipes on a synthetic Market-size tree:
#   just SET="model.pretrained= model.arch=res2net_tiny schedule.epochs=1" market ROOT=data/synthetic-market

set shell := ["bash", "-euo", "pipefail", "-c"]

reid := "cargo run --release --quiet --"
DATASET := "market1501"
ROOT := ""
CONFIG := "configs/market-res2net50.toml"
RUN := "market-res2net50"
DEVICE := "cpu"
SET := ""
FLIP := ""
# Extra `reid train` flags, e.g. TRAIN_ARGS="--max-steps 20" for a quick check.
TRAIN_ARGS := ""
# Extra `reid index` flags, e.g. INDEX_ARGS=--merge-val (MSMT17's val list into train).
INDEX_ARGS := ""
sets := if SET == "" { "" } else { "--set " + replace(trim(SET), " ", " --set ") }

# The whole pipeline on a generated dataset (no download).
demo:
    {{reid}} demo

# The README's test command (what CI runs).
test:
    cargo test --workspace

# Benchmarks: model inference and training step, and the evaluator.
bench:
    {{reid}} bench infer
    {{reid}} bench train
    {{reid}} bench eval

# Index a dataset folder into artifacts/manifests/<dataset>.parquet.
index:
    {{reid}} index --dataset {{DATASET}} --root {{ if ROOT != "" { ROOT } else if DATASET == "dukemtmc-reid" { "data/DukeMTMC-reID" } else if DATASET == "msmt17" { "data/MSMT17_V1" } else { "data/Market-1501-v15.09.15" } }} --out artifacts/manifests/{{DATASET}}.parquet {{INDEX_ARGS}}

# Train RUN with CONFIG on the dataset's manifest.
train:
    {{reid}} train --manifest artifacts/manifests/{{DATASET}}.parquet --config {{CONFIG}} --out artifacts/runs/{{RUN}} --device {{DEVICE}} {{sets}} {{TRAIN_ARGS}}

# Extract query and gallery features of RUN (cached); FLIP=--flip averages mirrors.
extract:
    {{reid}} extract --run artifacts/runs/{{RUN}} --device {{DEVICE}} {{FLIP}}

# Evaluate RUN's features and write its report.
evaluate:
    {{reid}} evaluate --query artifacts/features/{{RUN}}/query.safetensors --gallery artifacts/features/{{RUN}}/gallery.safetensors --run artifacts/runs/{{RUN}}

# The paper's Market-1501 recipe end to end: Res2Net-50 from ImageNet weights.
market root=(if ROOT == "" { "data/Market-1501-v15.09.15" } else { ROOT }):
    just DATASET=market1501 ROOT={{trim_start_match(root, "ROOT=")}} index
    just DATASET=market1501 CONFIG=configs/market-res2net50.toml RUN=market-res2net50 DEVICE={{DEVICE}} SET="{{SET}}" TRAIN_ARGS="{{TRAIN_ARGS}}" train extract evaluate

# The paper's DukeMTMC-reID recipe end to end.
duke root=(if ROOT == "" { "data/DukeMTMC-reID" } else { ROOT }):
    just DATASET=dukemtmc-reid ROOT={{trim_start_match(root, "ROOT=")}} index
    just DATASET=dukemtmc-reid CONFIG=configs/duke-res2net50.toml RUN=duke-res2net50 DEVICE={{DEVICE}} SET="{{SET}}" TRAIN_ARGS="{{TRAIN_ARGS}}" train extract evaluate

# MSMT17 (V1 or V2) end to end with the paper's recipe (not a table of the paper).
msmt17 root=(if ROOT == "" { "data/MSMT17_V1" } else { ROOT }):
    just DATASET=msmt17 ROOT={{trim_start_match(root, "ROOT=")}} INDEX_ARGS="{{INDEX_ARGS}}" index
    just DATASET=msmt17 CONFIG=configs/msmt17-res2net50.toml RUN=msmt17-res2net50 DEVICE={{DEVICE}} SET="{{SET}}" TRAIN_ARGS="{{TRAIN_ARGS}}" train extract evaluate

# Table 2: random-erasing probability 0.0 to 1.0, one run each, one table and chart.
erasing-sweep DATASET="market1501":
    for p in 0.0 0.1 0.2 0.3 0.4 0.5 0.6 0.7 0.8 0.9 1.0; do \
      just DATASET={{DATASET}} CONFIG=configs/market-res2net50.toml RUN=erasing-$p DEVICE={{DEVICE}} SET="{{SET}} augment.erase=$p" TRAIN_ARGS="{{TRAIN_ARGS}}" train extract; \
    done
    {{reid}} evaluate $(for p in 0.0 0.1 0.2 0.3 0.4 0.5 0.6 0.7 0.8 0.9 1.0; do echo --query artifacts/features/erasing-$p/query.safetensors --gallery artifacts/features/erasing-$p/gallery.safetensors; done) --out artifacts/reports/erasing-sweep

# Table 3: ResNet-50, Res2Net-50, ResNet-101, Res2Net-101, one table and chart.
backbones DATASET="market1501":
    for a in resnet50 res2net50_26w_4s resnet101 res2net101_26w_4s; do \
      just DATASET={{DATASET}} CONFIG=configs/backbone-$a.toml RUN=backbone-$a DEVICE={{DEVICE}} SET="{{SET}}" TRAIN_ARGS="{{TRAIN_ARGS}}" train extract; \
    done
    {{reid}} evaluate $(for a in resnet50 res2net50_26w_4s resnet101 res2net101_26w_4s; do echo --query artifacts/features/backbone-$a/query.safetensors --gallery artifacts/features/backbone-$a/gallery.safetensors; done) --out artifacts/reports/backbones
