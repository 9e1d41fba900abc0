"""The inference study's report: tables, plots and a TensorBoard summary of its runs."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from ..analysis.inference import METHODS, SCORES
from .common import format_ci, group_by, tensorboard_summary

__all__ = ["TITLES", "write_inference_report"]

TITLES = {"weight_scaling": "weight scaling", "mc_arithmetic": "MC arithmetic",
          "mc_geometric": "MC geometric"}  # fmt: skip
_MIN_BIN = 20  # the reliability plot leaves out bins with fewer (pooled) targets


def _ci(values: list[float], digits: int) -> str:
    from ..analysis import mean_ci

    return format_ci(*mean_ci(values), digits=digits)


def write_inference_report(study, results: list[dict[str, Any]]) -> dict[str, Path]:
    """``inference.md``, ``inference.csv``, ``convergence.png``, ``reliability.png`` and a
    TensorBoard summary under the study's root."""
    import csv

    root = study.root
    root.mkdir(parents=True, exist_ok=True)
    ok = [r for r in results if r["status"] == "ok"]
    labels = list(dict.fromkeys(r["cell"]["label"] for r in ok))
    by_label = group_by(ok, lambda r: r["cell"]["label"])
    s_max = study.mc_samples
    paths = {"markdown": root / "inference.md", "csv": root / "inference.csv"}

    with paths["csv"].open("w", newline="") as f:
        cols = ["label", "scheme", "rate", "seed", "config_hash", "method", "samples", *SCORES]
        writer = csv.DictWriter(f, fieldnames=cols)
        writer.writeheader()
        for r in ok:
            base = {"label": r["cell"]["label"], "scheme": r["cell"]["scheme"],
                    "rate": r["cell"]["rate"], "seed": r["cell"]["seed"],
                    "config_hash": r["config_hash"]}  # fmt: skip
            ev = r["evaluation"]
            for method, scores in ev["methods"].items():
                samples = 1 if method == "weight_scaling" else ev["mc_samples"]
                writer.writerow({**base, "method": method, "samples": samples,
                                 **{k: scores[k] for k in SCORES}})  # fmt: skip
            for agg, curve in ev["convergence"].items():
                for s, scores in curve.items():
                    writer.writerow({**base, "method": f"mc_{agg}_groups", "samples": s,
                                     **{k: scores[k][0] for k in SCORES}})  # fmt: skip

    def col(label: str, method: str, key: str) -> list[float]:
        return [r["evaluation"]["methods"][method][key] for r in by_label[label]]

    seeds = sorted({r["cell"]["seed"] for r in ok})
    n_targets = sorted({r["evaluation"]["targets"] for r in ok})
    lines = [
        f"# {study.name}: test-time inference on {study.task} (d = {study.distance})", "",
        f"{len(ok)} runs ({len(labels)} schemes x {len(seeds)} seed(s)); {study.steps} Adam "
        f"steps of {study.batch_size} per run; model {study.model}; scored on "
        f"{', '.join(map(str, n_targets))} held-out targets (where the task tests memory). "
        f"Weight scaling: one deterministic pass. MC: {s_max} passes with sampled masks, "
        "probabilities averaged (arithmetic) or log-probabilities averaged and renormalised "
        f"(geometric). ECE: {study.n_bins} equal-width bins of top-1 confidence. Mean ± 95% "
        "interval over seeds (Student t).", "",
        "Accuracy and NLL (nats):", "",
        "| scheme | acc WS | acc MC-arith | acc MC-geo | NLL WS | NLL MC-arith | NLL MC-geo |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]  # fmt: skip
    for label in labels:
        accs = [_ci(col(label, m, "acc"), 3) for m in METHODS]
        nlls = [_ci(col(label, m, "nll"), 3) for m in METHODS]
        lines.append(f"| {label} | " + " | ".join(accs + nlls) + " |")
    lines += ["", "Calibration: ECE and Brier score (lower is better), and the mean top-1 "
              "confidence minus accuracy (> 0: overconfident, < 0: underconfident):", "",
              "| scheme | ECE WS | ECE MC-arith | ECE MC-geo | Brier WS | Brier MC-arith | "
              "Brier MC-geo | conf. − acc WS | conf. − acc MC-arith |",
              "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    for label in labels:
        eces = [_ci(col(label, m, "ece"), 3) for m in METHODS]
        briers = [_ci(col(label, m, "brier"), 3) for m in METHODS]
        over = []
        for m in ("weight_scaling", "mc_arithmetic"):
            gaps = [a - b for a, b in zip(col(label, m, "confidence"), col(label, m, "acc"),
                                          strict=True)]  # fmt: skip
            over.append(_ci(gaps, 3))
        lines.append(f"| {label} | " + " | ".join([*eces, *briers, *over]) + " |")
    sizes = study.sample_sizes
    for agg in ("arithmetic", "geometric"):
        lines += ["", f"Convergence in S, MC {agg}: NLL (nats) of S-sample estimates, mean over "
                  f"the {s_max} // S disjoint groups of the {s_max} draws and over seeds "
                  "(weight scaling for reference):", "",
                  "| scheme | WS | " + " | ".join(f"S={s}" for s in sizes) + " |",
                  "|---|---:|" + "---:|" * len(sizes)]  # fmt: skip
        for label in labels:
            vals = [_ci([_curve(r, agg, s, "nll") for r in by_label[label]], 3) for s in sizes]
            ws = _ci(col(label, "weight_scaling", "nll"), 3)
            lines.append(f"| {label} | {ws} | " + " | ".join(vals) + " |")
    lines += ["", "Convergence in S, MC arithmetic: accuracy:", "",
              "| scheme | WS | " + " | ".join(f"S={s}" for s in sizes) + " |",
              "|---|---:|" + "---:|" * len(sizes)]  # fmt: skip
    for label in labels:
        vals = [_ci([_curve(r, "arithmetic", s, "acc") for r in by_label[label]], 3) for s in sizes]
        ws = _ci(col(label, "weight_scaling", "acc"), 3)
        lines.append(f"| {label} | {ws} | " + " | ".join(vals) + " |")
    rated = [r for r in ok if r["learned_rates"]]
    if rated:
        lines += ["", "Learned dropout rates (concrete dropout), mean over seeds:", "",
                  "| scheme | site | rate |", "|---|---|---:|"]  # fmt: skip
        for label, group in group_by(rated, lambda r: r["cell"]["label"]).items():
            for site in group[0]["learned_rates"]:
                vals = [r["learned_rates"].get(site, math.nan) for r in group]
                lines.append(f"| {label} | {site} | {_ci(vals, 3)} |")
    else:
        lines += ["", "Learned dropout rates: none of these schemes learns its rates."]
    failed = [r for r in results if r["status"] != "ok"]
    if failed:
        lines += ["", "Failed runs: " + "; ".join(f"{r['cell']['label']} seed="
                  f"{r['cell']['seed']}: {r['status'][:60]}" for r in failed)]  # fmt: skip
    md = "\n".join(lines) + "\n"
    paths["markdown"].write_text(md)
    if ok:
        paths.update(_plots(study, root, labels, by_label))
    tensorboard_summary(root, paths, md, images=("convergence_png", "reliability_png"))
    return paths


def _curve(r: dict[str, Any], agg: str, s: int, key: str) -> float:
    curve = r["evaluation"]["convergence"][agg]
    return (curve[str(s)] if str(s) in curve else curve[s])[key][0]


def _plots(study, root: Path, labels, by_label) -> dict[str, Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..analysis import mean_ci

    paths = {}
    sizes = study.sample_sizes
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, label in enumerate(labels):
        color = colors[i % len(colors)]
        group = by_label[label]
        for ax, key in zip(axes, ("nll", "acc"), strict=True):
            for agg, ls in (("arithmetic", "-"), ("geometric", "--")):
                ys = [mean_ci([_curve(r, agg, s, key) for r in group])[0] for s in sizes]
                ax.plot(sizes, ys, ls=ls, marker="o", ms=3, color=color,
                        label=label if agg == "arithmetic" else None)  # fmt: skip
            ws = mean_ci([r["evaluation"]["methods"]["weight_scaling"][key] for r in group])[0]
            ax.axhline(ws, color=color, ls=":", lw=1)
    for ax, name in zip(axes, ("NLL (nats)", "accuracy"), strict=True):
        ax.set_xscale("log")
        ax.set_xlabel("MC samples S")
        ax.set_ylabel(name)
    axes[0].set_title("solid: MC arithmetic, dashed: geometric, dotted: WS", fontsize=8)
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    paths["convergence_png"] = root / "convergence.png"
    fig.savefig(paths["convergence_png"], dpi=110)
    plt.close(fig)

    n = len(labels)
    cols = min(3, n)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.3 * cols, 3.1 * rows), squeeze=False)
    for ax, label in zip(axes.flat, labels, strict=False):
        ax.plot([0, 1], [0, 1], color="0.6", ls="--", lw=1)
        for method in ("weight_scaling", "mc_arithmetic"):
            rel = _pooled_bins(by_label[label], method)
            if rel is None:
                continue
            shown = rel.count >= _MIN_BIN  # a bin of a few targets is noise, not a trend
            ece = _ci([r["evaluation"]["methods"][method]["ece"] for r in by_label[label]], 3)
            ax.plot(rel.confidence[shown], rel.accuracy[shown], marker="o", ms=3,
                    label=f"{TITLES[method]} (ECE {ece})")  # fmt: skip
        ax.set_title(f"{label} (bins of >= {_MIN_BIN} targets)", fontsize=8)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_xlabel("confidence", fontsize=8)
        ax.set_ylabel("accuracy", fontsize=8)
        ax.legend(fontsize=6, loc="upper left")
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    fig.tight_layout()
    paths["reliability_png"] = root / "reliability.png"
    fig.savefig(paths["reliability_png"], dpi=110)
    plt.close(fig)
    return paths


def _pooled_bins(group: list[dict[str, Any]], method: str):
    """The reliability bins of one method, pooled over the seeds' runs."""
    from ..analysis import Reliability

    count = conf = correct = None
    for r in group:
        b = r["evaluation"].get("bins", {}).get(method)
        if b is None:
            return None
        c = torch.tensor(b["count"], dtype=torch.float64)
        count = c if count is None else count + c
        cs = torch.tensor(b["confidence_sum"], dtype=torch.float64)
        conf = cs if conf is None else conf + cs
        k = torch.tensor(b["correct_sum"], dtype=torch.float64)
        correct = k if correct is None else correct + k
    if count is None:
        return None
    edges = torch.linspace(0, 1, len(count) + 1, dtype=torch.float64)
    safe = count.clamp_min(1)
    nan = torch.full_like(count, math.nan)
    return Reliability(edges, count, torch.where(count > 0, conf / safe, nan),
                       torch.where(count > 0, correct / safe, nan))  # fmt: skip
