#!/usr/bin/env python
"""The context probe's cost: decoding every position and keeping the last (the probe before)
against decoding the target's position only (``LanguageModel.last_logits``, which the probe
uses), side by side.

Each round times both on the same windows and takes the ratio, so machine drift cancels; the
table reports medians over rounds. The model is PTB's small LSTM (2x200, 10k words, random
weights: speed does not depend on them).

    python scripts/bench_context_probe.py                     # window 300, 128 windows, 1 thread
    python scripts/bench_context_probe.py --window 200 --threads 2 --rounds 9
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from rnndrop.models import LanguageModel
from rnndrop.runtime import describe_machine


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--window", type=int, default=300)
    ap.add_argument("--windows", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--vocab", type=int, default=10000)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = LanguageModel(vocab_size=args.vocab, embedding_size=200, hidden_size=200,
                          num_layers=2).eval()  # fmt: skip
    x = torch.randint(0, args.vocab, (args.windows, args.window))
    paths = {
        "every position": lambda b: model(b).logits[:, -1],
        "last only": model.last_logits,
    }

    def timed(f) -> float:
        start = time.perf_counter()
        with torch.no_grad():
            for i in range(0, len(x), args.batch_size):
                f(x[i : i + args.batch_size])
        return time.perf_counter() - start

    with torch.no_grad():  # same numbers first: a faster wrong probe is no use
        a, b = paths["every position"](x[:8]), paths["last only"](x[:8])
        diff = (a - b).abs().max().item()
    times: dict[str, list[float]] = {k: [] for k in paths}
    ratios = []
    for _ in range(args.rounds):
        t = {k: timed(f) for k, f in paths.items()}
        for k, v in t.items():
            times[k].append(v)
        ratios.append(t["every position"] / t["last only"])
    print(describe_machine())
    print(f"{args.windows} windows of {args.window} tokens, batch {args.batch_size}, vocabulary "
          f"{args.vocab}, {args.threads} thread(s), {args.rounds} rounds; "
          f"max |logit diff| {diff:.1e}")  # fmt: skip
    print("| decoding | median s |\n|---|---|")
    for k, v in times.items():
        print(f"| {k} | {statistics.median(v):.3f} |")
    print(f"speed-up (median of per-round ratios): {statistics.median(ratios):.2f}x")


if __name__ == "__main__":
    main()
