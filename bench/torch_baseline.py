#!/usr/bin/env python3
"""PyTorch on the shapes `reid bench` times, timed the same way (median of timed
iterations after warm-up), one JSON line per run.

  infer  eval-mode forward of --arch, --batch images of 3 x --height x --width
  train  the siamese step of `reid bench train`: the backbone once on
         cat[x1, x2] (--batch images, half of them x1), identification Linear(D, K)
         on both halves, verification Linear(D, 2) on (f1 - f2)^2, loss
         0.5 * CE + 0.5 * CE + 1.0 * CE, dropout 0.5, one backward, SGD (momentum
         0.9, weight decay 5e-4)
  eval   reads two gallery files (--query, --gallery: safetensors with features,
         pids, camids, as `reid bench eval` writes them), computes cosine
         distances with torch and ranks with torchreid's Cython evaluator
         (`rank_cy`, see bench/README.md), and reports each part

Set-up: python3 -m venv .bench && .bench/bin/pip install -r bench/requirements.txt
Run:    .bench/bin/python bench/torch_baseline.py train --threads 2
Run it right after `reid bench` on the same machine and thread count; the
machines are shared, so compare figures of one session only.
"""
import argparse
import json
import statistics
import time


def timed(fn, warmup, iters):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times), min(times)


def peak_rss_mib():
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def model_step(a, torch, dev, sync):
    """The timed function of infer or train."""
    import timm
    backbone = timm.create_model(a.arch, pretrained=False, num_classes=0).to(dev)
    x = torch.randn(a.batch, 3, a.height, a.width, device=dev)
    autocast = lambda: torch.autocast(dev.type, dtype=torch.bfloat16, enabled=a.precision == "bf16")
    if a.cmd == "infer":
        backbone.eval()

        def step():
            with torch.inference_mode(), autocast():
                backbone(x)
            sync()
        return step
    pairs = a.batch // 2
    dim = backbone.num_features
    id_head = torch.nn.Linear(dim, a.classes).to(dev)
    verif_head = torch.nn.Linear(dim, 2).to(dev)
    drop = torch.nn.Dropout(0.5)
    y1 = torch.arange(pairs, device=dev) % a.classes
    same = (torch.arange(pairs, device=dev) % 2).long()
    y2 = torch.where(same == 0, y1, (y1 + 1) % a.classes)
    params = list(backbone.parameters()) + list(id_head.parameters()) + list(verif_head.parameters())
    opt = torch.optim.SGD(params, lr=0.01, momentum=0.9, weight_decay=5e-4)
    ce = torch.nn.functional.cross_entropy
    backbone.train()

    def step():
        opt.zero_grad(set_to_none=True)
        with autocast():
            f = backbone(x)
            f1, f2 = f[:pairs], f[pairs:]
            loss = 0.5 * ce(id_head(drop(f1)), y1) + 0.5 * ce(id_head(drop(f2)), y2) \
                + ce(verif_head(drop((f1 - f2) ** 2)), same)
        loss.backward()
        opt.step()
        sync()
    return step


def load_rank_cy(path):
    import importlib
    import sys
    if path:
        sys.path.insert(0, path)
    return importlib.import_module("rank_cy")


def evaluate_files(a, torch):
    """Whole-pipeline timing of torch distances plus torchreid's Cython ranking."""
    import numpy as np
    from safetensors.numpy import load_file
    rank_cy = load_rank_cy(a.rank_cy)
    out = {}
    t = time.perf_counter()
    q, g = load_file(a.query), load_file(a.gallery)
    out["read_s"] = time.perf_counter() - t
    t = time.perf_counter()
    keep = g["pids"] != -1  # junk never counts (torchreid's callers drop it too)
    qf = torch.nn.functional.normalize(torch.from_numpy(q["features"]))
    gf = torch.nn.functional.normalize(torch.from_numpy(g["features"][keep]))
    dist = (1 - qf @ gf.T).numpy()
    out["distance_s"] = time.perf_counter() - t
    t = time.perf_counter()
    cmc, m_ap = rank_cy.evaluate_cy(dist, q["pids"].astype(np.int64), g["pids"][keep].astype(np.int64),
                                    q["camids"].astype(np.int64), g["camids"][keep].astype(np.int64), 50, False)
    out["ranking_s"] = time.perf_counter() - t
    out["total_s"] = out["read_s"] + out["distance_s"] + out["ranking_s"]
    out.update(rank1=float(cmc[0]), mAP=float(m_ap))
    if a.f64:
        out["mAP_f64_distances"] = f64_truth(q, g, keep)
    return out


def f64_truth(q, g, keep):
    """mAP from float64 cosine distances (the float32 features in float64), ranked
    with ties broken by gallery order, under the same protocol."""
    import numpy as np
    qf, gf = q["features"].astype(np.float64), g["features"][keep].astype(np.float64)
    qf /= np.linalg.norm(qf, axis=1, keepdims=True)
    gf /= np.linalg.norm(gf, axis=1, keepdims=True)
    gp, gc = g["pids"][keep], g["camids"][keep]
    aps = []
    for start in range(0, len(qf), 256):
        dist = 1.0 - qf[start:start + 256] @ gf.T
        order = np.argsort(dist, axis=1, kind="stable")
        for r, o in enumerate(order):
            i = start + r
            valid = ~((gp[o] == q["pids"][i]) & (gc[o] == q["camids"][i]))
            match = (gp[o] == q["pids"][i])[valid]
            if match.any():
                hits = np.flatnonzero(match)
                aps.append(np.mean((np.arange(len(hits)) + 1) / (hits + 1)))
    return float(np.mean(aps))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("cmd", choices=["infer", "train", "eval"])
    p.add_argument("--arch", default="res2net50_26w_4s")
    p.add_argument("--batch", type=int, help="images per iteration [32 infer, 16 train]")
    p.add_argument("--height", type=int, default=256)
    p.add_argument("--width", type=int, default=128)
    p.add_argument("--classes", type=int, default=751)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--precision", choices=["f32", "bf16", "both"], default="f32",
                   help="bf16: autocast (weights and optimiser stay f32); both: f32 then "
                        "bf16 in this one process, a JSON line each")
    p.add_argument("--query", help="eval: query gallery file")
    p.add_argument("--gallery", help="eval: gallery file")
    p.add_argument("--rank-cy", help="eval: folder holding torchreid's compiled rank_cy module")
    p.add_argument("--f64", action="store_true", help="eval: also the mAP of float64 distances (slow)")
    a = p.parse_args()
    import torch
    torch.set_num_threads(a.threads)
    dev = torch.device(a.device)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    precisions = ["f32", "bf16"] if a.precision == "both" else [a.precision]
    for precision in precisions:
        a.precision = precision
        res = {"cmd": a.cmd, "threads": a.threads, "device": a.device, "torch": torch.__version__}
        if a.cmd == "eval":
            runs = [evaluate_files(a, torch) for _ in range(max(1, a.iters))]
            res.update({k: statistics.median(r[k] for r in runs) for k in runs[0]})
            res["iters"] = len(runs)
        else:
            res.update(model_run(a, torch, dev, sync))
        res["peak_rss_mib"] = peak_rss_mib()
        print(json.dumps(res), flush=True)


def model_run(a, torch, dev, sync):
    """Times infer or train of --arch in a.precision."""
    a.batch = a.batch or (32 if a.cmd == "infer" else 16)
    step = model_step(a, torch, dev, sync)
    med, best = timed(step, a.warmup, a.iters)
    res = dict(arch=a.arch, batch=a.batch, height=a.height, width=a.width, precision=a.precision,
               sec_per_iter_median=med, images_per_s_median=a.batch / med, images_per_s_best=a.batch / best)
    if dev.type == "cuda":
        res["peak_gpu_mib"] = torch.cuda.max_memory_allocated() / 2**20
    return res


if __name__ == "__main__":
    main()
