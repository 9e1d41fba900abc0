"""How far weight scaling and Monte Carlo lie from the exact dropout ensemble, per scheme.

A small LSTM (and, with ``--gru``, a GRU) reads delayed-recall sequences
(``rnndrop.data.DelayedRecall``: output the token seen ``d`` steps ago) and predicts every
target step through a head; the last layer's output dropout (rate ``p``, inverted) acts on
its ``H <= 16`` hidden units. One model is trained per scheme and head for a few hundred
steps on CPU, by the inference study's training (:func:`rnndrop.study.inference.train_model`:
a :class:`~rnndrop.models.SequenceModel` on fresh sequences every step, Lightning, Adam; the
MLP head swapped in before training), and scored on the study's held-out split.

What is exact: the ensemble over the *output-dropout mask* of the ``H`` units feeding the
head, given the recurrent network run deterministically (eval mode: inverted masks are the
identity, zoneout uses its expectation, weight drop keeps ``W_hh``). Per prediction this is
the same ``2^H``-member ensemble whether the scheme draws output masks per step (naive) or
per sequence (variational, ...): each target sees one mask of ``H`` units. It is computed
by :func:`rnndrop.analysis.exact_ensemble`, in float64. Against it, on held-out sequences:

- weight scaling: the deterministic prediction ``softmax(head(h))``;
- MC arithmetic / geometric: ``S`` sampled output masks (``bernoulli_mask``), aggregated by
  :func:`rnndrop.analysis.mc_aggregate` (the ``S = 10`` estimate is the prefix of the
  ``S = 50`` draws);
- full MC: ``S = 50`` forwards with every site of the scheme sampled
  (:func:`rnndrop.nn.mc_dropout`), which is a different, larger ensemble: shown to size
  what the output-only ensemble leaves out.

Usage::

    python scripts/ensemble_demo.py            # LSTM, linear and MLP heads: 8 models
    python scripts/ensemble_demo.py --gru      # and the GRU with a linear head: 12 models
    python scripts/ensemble_demo.py --steps 50 --quick  # smoke run
"""

from __future__ import annotations

import argparse
import copy
import datetime
import sys
import time
from pathlib import Path

import torch
from torch import nn

from rnndrop.analysis import categorical_kl, exact_ensemble, mc_aggregate
from rnndrop.config import RecurrentDropout as RD
from rnndrop.functional import bernoulli_mask
from rnndrop.nn import mc_dropout
from rnndrop.study.inference import InferenceStudyConfig, train_model

IGNORE = -100


def schemes(p: float, cell: str) -> dict[str, RD]:
    """Each scheme with output dropout ``p`` on the last layer's units."""
    zone = RD(zoneout_hidden=0.05, zoneout_cell=0.3 if cell == "lstm" else 0.0, output=p)
    return {
        "naive": RD.naive(p),  # input + output, fresh mask every step
        "variational": RD.variational(p),  # input + recurrent + output, one mask per sequence
        "zoneout+output": zone,
        "weight_drop+output": RD(weight_hh=0.5, output=p),
    }


def study_for(args: argparse.Namespace, cell: str, head: str) -> InferenceStudyConfig:
    """The inference study that trains this demo's models for one cell and head: each scheme
    a custom scheme at its fixed rates, one seed, the demo's budget. Its runs (``model.pt``,
    TensorBoard) go under ``--runs``; a rerun with the same settings reuses the models."""
    return InferenceStudyConfig(
        name=f"ensemble_demo_{cell}_{head}", task="delayed_recall",
        task_args={"n_symbols": args.symbols, "length": args.length}, distance=args.distance,
        schemes=list(schemes(args.p, cell)),
        custom_schemes={name: {"encoder": cell, "dropout": cfg.to_dict()}
                        for name, cfg in schemes(args.p, cell).items()},
        seeds=[args.seed], model={"hidden_size": args.hidden, "embedding_size": 16},
        steps=args.steps, batch_size=args.batch, lr=args.lr, val_every=args.steps,
        eval_size=args.test_size, eval_batch_size=args.test_size, out_dir=str(args.runs),
    )  # fmt: skip


def mlp_head(model: nn.Module) -> None:
    """A tanh hidden layer between the dropped units and the softmax (the study's model has a
    linear head): ``customize`` of :func:`rnndrop.study.inference.train_model`."""
    hidden, classes = model.head.in_features, model.head.out_features
    model.head = nn.Sequential(nn.Linear(hidden, 24), nn.Tanh(), nn.Linear(24, classes))


def test_batch(dm) -> tuple[torch.Tensor, torch.Tensor]:
    """The held-out split (the study's test set) as one batch."""
    test = dm.datasets["test"]
    xs, ys = zip(*(test[i] for i in range(len(test))), strict=True)
    return torch.stack(xs), torch.stack(ys)


@torch.no_grad()
def evaluate(model: nn.Module, x, y, p: float, seed: int) -> dict[str, float]:
    model.eval()
    keep = y != IGNORE
    # the last layer's output before output dropout (eval: the deterministic network)
    h = model.encoder(model.features(x), None)[1][keep].double()  # (n, H): every target's units
    target = y[keep]
    head = copy.deepcopy(model.head).double()
    exact = exact_ensemble(head, h, p)

    gen = torch.Generator().manual_seed(seed)
    masks = bernoulli_mask((50, *h.shape), p, dtype=torch.float64, generator=gen)
    logits = head((h[None] * masks).flatten(0, 1)).view(50, h.shape[0], -1)
    preds = {
        "exact_arith": exact.arithmetic,
        "exact_geo": exact.geometric,
        "scaled": exact.scaled,
    }
    for s in (10, 50):
        preds[f"mc_arith_{s}"] = mc_aggregate(logits[:s], "arithmetic")
        preds[f"mc_geo_{s}"] = mc_aggregate(logits[:s], "geometric")
    torch.manual_seed(seed)
    with mc_dropout(model):
        full = torch.stack([model(x).prediction[keep] for _ in range(50)])
    preds["full_mc_50"] = mc_aggregate(full.double(), "arithmetic")

    row: dict[str, float] = {}
    for name, pr in preds.items():
        row[f"acc/{name}"] = float((pr.argmax(-1) == target).double().mean())
        row[f"nll/{name}"] = float(-pr.gather(-1, target[:, None]).clamp_min(1e-300).log().mean())
        row[f"kl_a/{name}"] = float(categorical_kl(exact.arithmetic, pr).mean())
        row[f"kl_g/{name}"] = float(categorical_kl(exact.geometric, pr).mean())
    for s in (1, 2, 5, 10, 50):
        est = mc_aggregate(logits[:s], "arithmetic")
        row[f"conv/{s}"] = float(categorical_kl(exact.arithmetic, est).mean())
    row["n"] = float(h.shape[0])
    return row


def fmt_kl(v: float) -> str:
    if abs(v) < 1e-12:  # rounding: float64 sums of terms that cancel
        return "< 1e-12"
    return f"{v:.1e}" if v < 1e-3 else f"{v:.4f}"


def tables(rows: list[dict]) -> str:
    lines = [
        "KL(exact arithmetic ‖ estimate), mean over held-out targets, nats (A = exact "
        "arithmetic ensemble, G = exact normalised geometric ensemble, over the output mask):",
        "",
        "| cell | head | scheme | scaled | MC-arith S=10 | MC-arith S=50 | MC-geo S=10 "
        "| MC-geo S=50 | KL(G ‖ scaled) | KL(A ‖ G) | full MC S=50 |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        cols = ["scaled", "mc_arith_10", "mc_arith_50", "mc_geo_10", "mc_geo_50"]
        kl = [fmt_kl(r[f"kl_a/{c}"]) for c in cols]
        kl += [fmt_kl(r["kl_g/scaled"]), fmt_kl(r["kl_a/exact_geo"]), fmt_kl(r["kl_a/full_mc_50"])]
        lines.append(f"| {r['cell']} | {r['head']} | {r['scheme']} | " + " | ".join(kl) + " |")
    lines += [
        "",
        "Accuracy on held-out targets (and NLL of the exact arithmetic ensemble / weight scaling):",
        "",
        "| cell | head | scheme | exact A | exact G | scaled | MC-arith 10 | MC-arith 50 "
        "| MC-geo 10 | MC-geo 50 | full MC 50 | NLL A | NLL scaled |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        cols = ["exact_arith", "exact_geo", "scaled", "mc_arith_10", "mc_arith_50"]
        cols += ["mc_geo_10", "mc_geo_50", "full_mc_50"]
        acc = [f"{r[f'acc/{c}']:.4f}" for c in cols]
        acc += [f"{r['nll/exact_arith']:.4f}", f"{r['nll/scaled']:.4f}"]
        lines.append(f"| {r['cell']} | {r['head']} | {r['scheme']} | " + " | ".join(acc) + " |")
    lines += [
        "",
        "Convergence of MC arithmetic: KL(exact arithmetic ‖ S-sample estimate), nested draws:",
        "",
        "| cell | head | scheme | S=1 | S=2 | S=5 | S=10 | S=50 |",
        "|---|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        conv = [fmt_kl(r[f"conv/{s}"]) for s in (1, 2, 5, 10, 50)]
        lines.append(f"| {r['cell']} | {r['head']} | {r['scheme']} | " + " | ".join(conv) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=250, help="training steps per model")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=2e-2)
    ap.add_argument("--hidden", type=int, default=12, help="units under output dropout (<=16)")
    ap.add_argument("--p", type=float, default=0.3, help="output dropout rate")
    ap.add_argument("--distance", type=int, default=3)
    ap.add_argument("--symbols", type=int, default=6)
    ap.add_argument("--length", type=int, default=16)
    ap.add_argument(
        "--runs",
        type=Path,
        default=Path("runs"),
        help="where the inference study keeps the models (reused by a rerun)",
    )
    ap.add_argument("--test-size", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--gru", action="store_true", help="also the GRU (linear head)")
    ap.add_argument("--quick", action="store_true", help="LSTM, linear head only (smoke run)")
    ap.add_argument("--out", type=Path, default=Path("docs/results/ensembles"))
    args = ap.parse_args(argv)
    if not 1 <= args.hidden <= 16:
        ap.error("--hidden must be in 1..16 (the exact ensemble enumerates 2^hidden masks)")
    torch.set_num_threads(min(2, torch.get_num_threads()))

    runs = [("lstm", "linear"), ("lstm", "mlp"), ("gru", "linear")]
    if not args.gru:
        runs = runs[:2]
    if args.quick:
        runs = runs[:1]
    rows, start, cpu = [], time.perf_counter(), time.process_time()
    for cell, head in runs:
        study = study_for(args, cell, head)
        for run in study.cells():
            t0 = time.perf_counter()
            trained = train_model(study, run, customize=mlp_head if head == "mlp" else None)
            if trained.info["status"] != "ok":
                print(f"{cell} {head} {run.scheme}: {trained.info['status']}", file=sys.stderr)
                continue
            x, y = test_batch(trained.data)
            row = evaluate(trained.model, x, y, args.p, args.seed)
            row.update(cell=cell, head=head, scheme=run.scheme)
            rows.append(row)
            how = "reused" if trained.reused else "trained"
            print(
                f"{cell:4s} {head:6s} {run.scheme:18s} acc scaled {row['acc/scaled']:.3f}  "
                f"KL(A‖scaled) {row['kl_a/scaled']:.2e}  ({how}, "
                f"{time.perf_counter() - t0:.1f}s)",
                flush=True,
            )
    text = tables(rows)
    elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu
    command = "python scripts/ensemble_demo.py " + " ".join(sys.argv[1:] if argv is None else argv)
    header = (
        f"# Dropout ensembles: weight scaling and MC against the exact ensemble\n\n"
        f"Command: `{command.strip()}` ({datetime.date.today().isoformat()}, "
        f"{elapsed:.0f} s wall, {cpu:.0f} s CPU on {torch.get_num_threads()} threads, torch "
        f"{torch.__version__}).\n\n"
        f"Delayed recall (distance {args.distance}, {args.symbols} symbols, length "
        f"{args.length}); {args.test_size} held-out sequences = {int(rows[0]['n'])} targets. "
        f"Hidden {args.hidden}, output dropout p = {args.p} (inverted), {args.steps} steps of "
        f"Adam (lr {args.lr}, {args.batch} fresh sequences a step) per model, trained by the "
        "inference study (rnndrop.study.inference.train_model). Exact = the ensemble over the "
        f"2^{args.hidden} "
        "output-dropout masks given the deterministic (eval-mode) recurrent network; "
        "full MC samples every site.\n\n"
    )
    print()
    print(text)
    print(f"\n{elapsed:.0f} s wall, {cpu:.0f} s CPU")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "table.md").write_text(header + text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
