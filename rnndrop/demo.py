"""A two-minute tour: every dropout scheme on delayed recall (the token seen d steps ago).

Temporary main job until the long-range study lands; it trains with plain PyTorch.
"""

from __future__ import annotations

import time

import torch
from torch import nn

from .config import RecurrentDropout
from .nn import LSTM

SCHEMES = {
    "none": RecurrentDropout.none(),
    "naive (Zaremba)": RecurrentDropout.naive(0.25),
    "naive_recurrent": RecurrentDropout.naive_recurrent(0.25),
    "variational (Gal)": RecurrentDropout.variational(0.25),
    "zoneout (Krueger)": RecurrentDropout.zoneout(0.1, 0.3),
    "weight_drop (Merity)": RecurrentDropout.weight_drop(0.3),
    "semeniuta": RecurrentDropout.semeniuta(0.25),
}


def delayed_recall(batch: int, length: int, distance: int, vocab: int, gen: torch.Generator):
    x = torch.randint(vocab, (length, batch), generator=gen)
    y = torch.full_like(x, -100)  # -100: ignored by cross_entropy
    y[distance:] = x[:-distance]
    return x, y


class Net(nn.Module):
    def __init__(self, vocab: int, hidden: int, dropout: RecurrentDropout) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, 16)
        self.lstm = LSTM(16, hidden, dropout=dropout)
        self.head = nn.Linear(hidden, vocab)

    def forward(self, x):
        return self.head(self.lstm(self.embed(x))[0])


def run_demo(steps: int = 1500, distance: int = 10, seed: int = 0, vocab: int = 8) -> None:
    length, batch, hidden = distance + 30, 32, 64
    print(
        f"delayed recall: output the token seen {distance} steps ago ({vocab} symbols; "
        f"chance accuracy {1 / vocab:.3f}); {steps} Adam steps per scheme, CPU"
    )
    print(f"{'scheme':24s} {'accuracy':>9s} {'seconds':>8s}")
    for name, scheme in SCHEMES.items():
        torch.manual_seed(seed)
        gen = torch.Generator().manual_seed(seed)
        model = Net(vocab, hidden, scheme)
        opt = torch.optim.Adam(model.parameters(), lr=3e-3)
        start = time.perf_counter()
        for _ in range(steps):
            x, y = delayed_recall(batch, length, distance, vocab, gen)
            loss = nn.functional.cross_entropy(model(x).flatten(0, 1), y.flatten())
            opt.zero_grad()
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
        model.eval()
        with torch.no_grad():
            x, y = delayed_recall(512, length, distance, vocab, gen)
            pred = model(x).argmax(-1)
            acc = (pred[distance:] == y[distance:]).float().mean().item()
        print(f"{name:24s} {acc:9.3f} {time.perf_counter() - start:8.1f}", flush=True)
