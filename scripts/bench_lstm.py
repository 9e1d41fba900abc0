#!/usr/bin/env python
"""Forward + backward speed of rnndrop.nn.LSTM per scheme, as a ratio to fused nn.LSTM.

Every round times each variant once (a few repetitions, median) and divides by the
nn.LSTM time of the same round, so machine drift cancels; the table reports the median
over rounds of the time and of the ratio. Training mode (masks sampled every call).

    python scripts/bench_lstm.py                       # all configs, all schemes
    python scripts/bench_lstm.py --configs medium --rounds 15
    python scripts/bench_lstm.py --loop python         # the pure-PyTorch loop instead of C++
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time

import torch

from rnndrop import _ext
from rnndrop.config import RecurrentDropout
from rnndrop.nn import LSTM
from rnndrop.nn.masks import needs_loop

CONFIGS = {  # input, hidden, layers, T, B
    "small": (200, 200, 2, 20, 20),
    "medium": (650, 650, 2, 35, 20),
    "long": (128, 128, 1, 500, 32),
}

SCHEMES = {
    "none": RecurrentDropout.none(),
    "naive": RecurrentDropout.naive(0.5),
    "naive_recurrent": RecurrentDropout.naive_recurrent(0.5),
    "variational": RecurrentDropout.variational(0.5),
    "variational untied": RecurrentDropout.variational(0.5, tied=False),
    "variational per-batch": RecurrentDropout.variational(0.5).replace(batch="per_batch"),
    "zoneout": RecurrentDropout.zoneout(0.05, 0.5),
    "weight_drop": RecurrentDropout.weight_drop(0.5),
    "semeniuta": RecurrentDropout.semeniuta(0.25),
    "awd": RecurrentDropout.awd(),
}


def time_fwd_bwd(model, x, reps: int) -> float:
    times = []
    sync = torch.cuda.synchronize if x.is_cuda else (lambda: None)
    for _ in range(reps):
        sync()
        start = time.perf_counter()
        out, (_, c) = model(x)
        (out.sum() + c.sum()).backward()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def bench(config: str, schemes: list[str], rounds: int, reps: int, dtype, device) -> list[tuple]:
    I, H, L, T, B = CONFIGS[config]
    torch.manual_seed(0)
    ref = torch.nn.LSTM(I, H, L).to(device, dtype)
    models = {"nn.LSTM": ref}
    for name in schemes:
        m = LSTM(I, H, L, dropout=SCHEMES[name]).to(device, dtype)
        m.load_state_dict(ref.state_dict())
        models[name] = m
    x = torch.randn(T, B, I, dtype=dtype, device=device, requires_grad=True)
    for m in models.values():  # warm up (and build the kernel)
        time_fwd_bwd(m, x, 2)
    ms = {n: [] for n in models}
    ratios = {n: [] for n in models}
    for _ in range(rounds):
        base = time_fwd_bwd(ref, x, reps)
        ms["nn.LSTM"].append(base)
        ratios["nn.LSTM"].append(1.0)
        for name, m in models.items():
            if name == "nn.LSTM":
                continue
            t = time_fwd_bwd(m, x, reps)
            ms[name].append(t)
            ratios[name].append(t / base)
    path = {n: _path(m, device) for n, m in models.items()}
    return [
        (config, n, statistics.median(ms[n]) * 1e3, statistics.median(ratios[n]), path[n])
        for n in models
    ]


def _path(m, device: str) -> str:
    if not isinstance(m, LSTM):
        return "fused (torch)"
    loop = any(needs_loop(m.dropout, layer, True) for layer in range(m.num_layers))
    if not loop:
        return "fused"
    compiled = device == "cpu" and os.environ.get("RNNDROP_LOOP") != "python" and _ext.load()
    return "loop (C++)" if compiled else "loop (python)"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    ap.add_argument("--schemes", nargs="+", default=list(SCHEMES), choices=list(SCHEMES))
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--loop", choices=["auto", "python"], default="auto")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--float64", action="store_true")
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    args = ap.parse_args(argv)
    if args.loop == "python":
        os.environ["RNNDROP_LOOP"] = "python"
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = torch.float64 if args.float64 else torch.float32
    print(
        f"# torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cpus, {dtype}, "
        f"{torch.cuda.get_device_name() if args.device == 'cuda' else 'cpu'}; "
        f"rounds={args.rounds} reps={args.reps}; median over rounds",
        file=sys.stdout,
    )
    print("| config | scheme | path | fwd+bwd ms | ratio to nn.LSTM |")
    print("|---|---|---|---|---|")
    for config in args.configs:
        for row in bench(config, args.schemes, args.rounds, args.reps, dtype, args.device):
            cfg, name, ms, ratio, path = row
            print(f"| {cfg} | {name} | {path} | {ms:.1f} | {ratio:.2f} |", flush=True)


if __name__ == "__main__":
    main()
