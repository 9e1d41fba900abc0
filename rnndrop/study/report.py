"""A study's report: results.csv, a Markdown summary with 95% intervals, plots, TensorBoard."""

from __future__ import annotations

import csv
import math
from collections import defaultdict
from pathlib import Path
from typing import Any

from ..analysis import mean_ci, normalized_accuracy, solved_distance
from .common import format_ci, group_by, tensorboard_summary
from .config import StudyConfig

__all__ = ["regime", "score", "train_score", "write_report"]

COLUMNS = ["study", "task", "scheme", "rate", "label", "encoder", "distance", "seed",
           "config_hash", "status", "acc", "loss", "loss_vs_baseline", "score", "acc_mc",
           "loss_mc", "mc_tv", "mc_entropy", "mc_std", "seconds", "train_size", "train_score",
           "gap", "heldout_in_train"]  # fmt: skip


def score(result: dict[str, Any]) -> float:
    """How well a cell remembers, 0 = no better than memoryless, 1 = perfect.

    Classification: normalised accuracy ``(acc - chance) / (1 - chance)`` where memory is
    tested; regression: ``1 - loss / baseline_loss``.
    """
    return _score_of(result, "metrics")


def train_score(result: dict[str, Any]) -> float:
    """:func:`score` on training sequences (the fixed set, or for the unlimited regime the
    first ones the model saw once); ``nan`` for results written before it was measured."""
    return _score_of(result, "train_metrics")


def _score_of(result: dict[str, Any], key: str) -> float:
    m, task = result.get(key), result["task"]
    if result["status"] != "ok" or not m:
        return math.nan
    if task["loss"] == "cross_entropy":
        return normalized_accuracy(m["acc"], task["chance"])
    return 1.0 - m["loss"] / task["baseline_loss"]


def regime(study: StudyConfig) -> str:
    """The data regime in words, for report headings."""
    if study.train_size is None:
        return "unlimited data (fresh sequences every step)"
    return f"{study.train_size} training sequences (fixed set, epochs over it)"


def _row(study: StudyConfig, r: dict[str, Any]) -> dict[str, Any]:
    m, c = r["metrics"], r["cell"]
    row = {"study": study.name, "task": study.task, "scheme": c["scheme"], "rate": c["rate"],
           "label": c["label"], "encoder": r["spec"]["encoder"], "distance": c["distance"],
           "seed": c["seed"], "config_hash": r["config_hash"], "status": r["status"].split(":")[0],
           "seconds": round(r["seconds"], 1), "score": score(r)}  # fmt: skip
    for k in ("acc", "loss", "acc_mc", "loss_mc", "mc_tv", "mc_entropy", "mc_std"):
        row[k] = m.get(k, math.nan)
    row["loss_vs_baseline"] = m.get("loss", math.nan) / r["task"]["baseline_loss"]
    reg = r.get("regime") or {}
    row["train_size"] = reg.get("train_size")
    row["train_score"] = train_score(r)
    row["gap"] = row["train_score"] - row["score"]  # > 0: better on what it trained on
    row["heldout_in_train"] = reg.get("heldout_in_train")
    return row


def write_report(study: StudyConfig, results: list[dict[str, Any]]) -> dict[str, Path]:
    """Write results.csv, summary.md, PNG plots and a TensorBoard summary under the study root.

    Returns the paths written.
    """
    root = study.root
    root.mkdir(parents=True, exist_ok=True)
    rows = [_row(study, r) for r in results]
    paths = {"csv": root / "results.csv", "markdown": root / "summary.md"}
    with paths["csv"].open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    labels = list(dict.fromkeys(r["label"] for r in rows))
    distances = sorted({r["distance"] for r in rows})
    table = _score_table(study, rows, labels, distances)
    md = _markdown(study, rows, labels, distances, table, results)
    paths["markdown"].write_text(md)
    paths.update(_plots(study, rows, labels, distances, results))
    tensorboard_summary(root, paths, md, images=("score_png", "gradient_png"))
    return paths


def _score_table(study, rows, labels, distances):
    cell = group_by(rows, lambda r: (r["label"], r["distance"]))
    table = {}
    for label in labels:
        for d in distances:
            table[label, d] = mean_ci([r["score"] for r in cell.get((label, d), [])])
    return table


def _markdown(study, rows, labels, distances, table, results) -> str:
    seeds = sorted({r["seed"] for r in rows})
    lines = [
        f"# {study.name}: {study.task}, distances {distances}",
        "",
        f"Data regime: {regime(study)}.",
        "",
        f"{len(rows)} runs; {len(seeds)} seed(s) each; {study.steps} steps of "
        f"{study.batch_size} samples per run; model {study.model}. Score: normalised accuracy "
        "where memory is tested ((acc - chance) / (1 - chance); 1 - loss/baseline for "
        "regression), mean ± 95% interval over seeds (Student t). Solved: the largest "
        f"distance up to which the mean score stays >= {study.solved_threshold}.",
        "",
        "| scheme | " + " | ".join(f"d={d}" for d in distances) + " | solved up to |",
        "|---|" + "---|" * (len(distances) + 1),
    ]
    for label in labels:
        # an unmeasured distance (nan: a rate swept at one distance) ends the run of solved
        # ones: "solved up to d" claims every shorter distance
        solved = solved_distance({d: table[label, d][0] for d in distances},
                                 study.solved_threshold)  # fmt: skip
        cells = [format_ci(*table[label, d]) for d in distances]
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {solved if solved else '–'} |")
    lines += _generalisation_table(rows, labels, distances)
    mc = [r for r in rows if not math.isnan(r["mc_tv"])]
    if mc:
        lines += ["", "Monte Carlo dropout at test time (mean over seeds): total-variation gap "
                  "between MC-averaged and deterministic predictions / predictive entropy (nats).",
                  "", "| scheme | " + " | ".join(f"d={d}" for d in distances) + " |",
                  "|---|" + "---|" * len(distances)]  # fmt: skip
        cell = group_by(mc, lambda r: (r["label"], r["distance"]))
        for label in labels:
            vals = []
            for d in distances:
                group = cell.get((label, d), [])
                tv, ent = mean_ci([r["mc_tv"] for r in group])[0], mean_ci(
                    [r["mc_entropy"] for r in group])[0]  # fmt: skip
                vals.append("–" if math.isnan(tv) else f"{tv:.3f} / {ent:.2f}")
            lines.append(f"| {label} | " + " | ".join(vals) + " |")
    d_grad = grad_distance(study, distances)
    recurrent = sorted({r["encoder"] for r in rows} - {"transformer"})
    for wrt, what, note in GRADIENTS:
        note = note.format(cells="/".join(c.upper() for c in recurrent))
        grads = _gradient_summary(results, d_grad, wrt)
        if not grads:
            continue
        ks = sorted({k for g in grads.values() for k in g})
        lines += ["", f"Gradient norm through time at d={d_grad}: {what} relative to k={ks[0]} "
                  f"({note}; deterministic net, one held-out batch), mean over seeds.", "",
                  "| scheme | " + " | ".join(f"k={k}" for k in ks) + " |",
                  "|---|" + "---|" * len(ks)]  # fmt: skip
        for label, g in grads.items():
            lines.append(f"| {label} | " + " | ".join(
                f"{g[k]:.2g}" if k in g else "–" for k in ks) + " |")  # fmt: skip
    diverged = [r for r in rows if r["status"] != "ok"]
    if diverged:
        lines += [
            "",
            f"{len(diverged)} run(s) diverged (non-finite loss): "
            + ", ".join(f"{r['label']} d={r['distance']} seed={r['seed']}" for r in diverged),
        ]
    total = sum(r["seconds"] for r in rows)
    lines += ["", f"Compute: {total / 60:.1f} CPU-minutes of training and evaluation in total."]
    return "\n".join(lines) + "\n"


def _generalisation_table(rows, labels, distances) -> list[str]:
    """Train score / held-out score / gap per scheme and distance (means over seeds); empty
    when no result has a train score (results from before it was measured)."""
    if all(math.isnan(r["train_score"]) for r in rows):
        return []
    cell = group_by(rows, lambda r: (r["label"], r["distance"]))
    lines = ["", "Train score / held-out score / gap (train − held-out), mean over seeds: the "
             "same score on training sequences and on held-out ones of the same distribution.",
             "", "| scheme | " + " | ".join(f"d={d}" for d in distances) + " |",
             "|---|" + "---|" * len(distances)]  # fmt: skip
    for label in labels:
        vals = []
        for d in distances:
            group = cell.get((label, d), [])
            tr, te = (mean_ci([r[k] for r in group])[0] for k in ("train_score", "score"))
            vals.append("–" if math.isnan(tr) else f"{tr:.2f} / {te:.2f} / {tr - te:+.2f}")
        lines.append(f"| {label} | " + " | ".join(vals) + " |")
    overlap = [r["heldout_in_train"] for r in rows if r["heldout_in_train"] is not None]
    if overlap and max(overlap) > 0:
        lines += ["", f"Held-out sequences that also occur in the training set: up to "
                  f"{max(overlap):.1%} (a small input space; the held-out score partly "
                  "measures recall of the training set there)."]  # fmt: skip
    return lines


# (key in result.json, what is measured, note): the input gradient exists for every encoder,
# the hidden-state one for the recurrent encoders (LSTM, GRU); {cells} names those in the study
GRADIENTS = (
    ("input", "‖∂L_T/∂x_(T-1-k)‖", "encoder input, every encoder"),
    ("state", "‖∂L_T/∂h_(T-1-k)‖", "{cells} hidden state, all layers"),
)


def grad_distance(study: StudyConfig, distances: list[int]) -> int:
    """The distance whose gradient curves the report shows: ``report_grad_distance`` if set
    (and run), else the middle one, where schemes tend to differ most (short distances are
    solved by all, the longest by none)."""
    if study.report_grad_distance in distances:
        return study.report_grad_distance
    return distances[len(distances) // 2]


def _gradient_summary(results, distance: int, wrt: str = "input") -> dict[str, dict[int, float]]:
    by_label: dict[str, list[dict[str, float]]] = defaultdict(list)
    for r in results:
        if r["cell"]["distance"] == distance and r["status"] == "ok":
            g = r["grad_through_time"].get(wrt)
            if g:  # the transformer has no hidden state to probe
                by_label[r["cell"]["label"]].append(g)
    out = {}
    for label, gs in by_label.items():
        # relative to the nearest k: a run that solved the task has a small loss and so small
        # gradients everywhere; the decay with k is what compares across schemes
        rel = []
        for g in gs:
            k0 = min(g, key=int, default=None)
            if k0 is not None and g[k0] > 0:
                rel.append({int(k): v / g[k0] for k, v in g.items()})
        ks = sorted({k for g in rel for k in g})
        out[label] = {k: mean_ci([g[k] for g in rel if k in g])[0] for k in ks}
    return out


LINES = {"lstm": "-", "gru": "-.", "transformer": "--"}  # line style by encoder


def _styles(labels: list[str], encoders: dict[str, str]) -> dict[str, dict[str, Any]]:
    """Plot style per label: the colour names the scheme, the line style the encoder (LSTM
    solid, GRU dash-dotted, transformer dashed), so ``gru_variational_p0.25`` has the colour of
    ``variational_p0.25``."""
    import matplotlib

    def base(label: str) -> str:
        return label.removeprefix(f"{encoders[label]}_")

    bases = list(dict.fromkeys(base(label) for label in labels))
    cmap = matplotlib.colormaps["tab20" if len(bases) > 10 else "tab10"]
    return {label: {"color": cmap(bases.index(base(label)) % cmap.N),
                    "ls": LINES.get(encoders[label], "-")} for label in labels}  # fmt: skip


def _plots(study, rows, labels, distances, results) -> dict[str, Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = {}
    style = _styles(labels, {r["label"]: r["encoder"] for r in rows})
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    cell = group_by(rows, lambda r: (r["label"], r["distance"]))
    for label in labels:
        stats = [mean_ci([r["score"] for r in cell.get((label, d), [])]) for d in distances]
        err = [0.0 if math.isnan(h) else h for _, h in stats]
        ax.errorbar(distances, [m for m, _ in stats], yerr=err, marker="o", capsize=3, label=label,
                    **style[label])  # fmt: skip
    ax.axhline(study.solved_threshold, color="grey", lw=0.8, ls="--")
    ax.set_ylim(-0.05, 1.05)  # few seeds give t-intervals wider than the score's range
    ax.set_xticks(distances)
    ax.set_xlabel("dependency distance")
    ax.set_ylabel("score (normalised accuracy)")
    ax.set_title(f"{study.task}: memory against distance")
    ax.legend(fontsize=7)
    fig.tight_layout()
    paths["score_png"] = study.root / "score_vs_distance.png"
    fig.savefig(paths["score_png"], dpi=120)
    plt.close(fig)

    d_grad = grad_distance(study, distances)
    panels = [(w, what, _gradient_summary(results, d_grad, w)) for w, what, _ in GRADIENTS]
    panels = [p for p in panels if p[2]]
    if panels:
        fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 4.2), squeeze=False)
        for ax, (wrt, what, grads) in zip(axes[0], panels, strict=True):
            for label, g in grads.items():
                ks = [k for k in sorted(g) if k > 0 and g[k] > 0]
                ax.loglog(ks, [g[k] for k in ks], marker=".", label=label, **style[label])
            ax.set_xlabel("k (steps back from the loss)")
            ax.set_ylabel(f"{what}, relative to the nearest k")
            ax.set_title(f"gradient norm through time ({wrt}), d={d_grad}")
            ax.legend(fontsize=7)
        fig.tight_layout()
        paths["gradient_png"] = study.root / "grad_through_time.png"
        fig.savefig(paths["gradient_png"], dpi=120)
        plt.close(fig)
    return paths
