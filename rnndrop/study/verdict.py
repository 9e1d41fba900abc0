"""Paired comparisons against no dropout, budget-free measures, and the verdict table.

Every scheme is compared with its baseline (:meth:`StudyConfig.baseline`: no dropout, same
encoder and model) seed by seed. A seed fixes the data, their order and the initial weights
(``tests/test_study.py`` checks this), so the difference of two cells with the same seed is
the effect of the dropout alone plus the noise dropout itself adds, and the interval over
seeds of those differences is narrower than that of two independent means.

Measures:

- **score**: the fixed-budget score of the report (normalised accuracy, or
  ``1 - loss/baseline`` for regression) after the last step;
- **AUC**: the area under the learning curve (validation score against step, clipped to
  [0, 1], as a Riemann sum over the validations and divided by the budget): 1 = solved from
  the first validation on, 0 = never better than memoryless;
- **steps to solve**: the first validation step whose score reaches the solve threshold,
  censored at the budget (``> steps``) when none does.

A scheme that learns later but reaches a higher score has a lower AUC and a higher score:
the two verdicts differ, and the report shows both.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..analysis import mean_ci, normalized_accuracy
from .common import group_by, same_machine, tensorboard_summary
from .config import StudyConfig
from .report import regime, score, train_score, write_report

__all__ = ["curve_measures", "paired_differences", "verdict", "write_reports", "write_verdict"]


def _point_score(point: dict[str, float], task: dict[str, Any]) -> float:
    if task["loss"] == "cross_entropy":
        return normalized_accuracy(point["acc"], task["chance"]) if "acc" in point else math.nan
    return 1.0 - point["loss"] / task["baseline_loss"]


def curve_measures(result: dict[str, Any], threshold: float, steps: int) -> dict[str, float]:
    """``auc`` and ``steps_to_solve`` (``inf`` when censored) from a cell's learning curve.

    ``nan`` for both when the cell has no curve (results written before curves were kept)
    or did not finish.
    """
    curve = result.get("curve") or []
    if result.get("status") != "ok" or not curve:
        return {"auc": math.nan, "steps_to_solve": math.nan}
    pts = sorted(curve, key=lambda p: p["step"])
    scores = [_point_score(p, result["task"]) for p in pts]
    # each validation stands for the steps since the previous one: a Riemann sum over the budget
    area, last = 0.0, 0
    for p, s in zip(pts, scores, strict=True):
        area += (p["step"] - last) * (0.0 if math.isnan(s) else min(1.0, max(0.0, s)))
        last = p["step"]
    solved = [p["step"] for p, s in zip(pts, scores, strict=True) if s >= threshold]
    return {"auc": area / steps, "steps_to_solve": float(solved[0]) if solved else math.inf}


def _values(study: StudyConfig, result: dict[str, Any]) -> dict[str, float]:
    sub = study.for_task(result["cell"].get("task"))
    return {"score": score(result), "train_score": train_score(result),
            **curve_measures(result, sub.solved_threshold, sub.steps)}  # fmt: skip


def paired_differences(
    study: StudyConfig, results: Sequence[dict[str, Any]]
) -> list[dict[str, Any]]:
    """One row per (task, scheme at rate, distance) with a baseline: the seeds' paired
    differences (scheme − baseline) of score and AUC, their means and 95% t-intervals, and
    median steps to solve of both."""

    def key(r: dict[str, Any]) -> tuple:
        c = r["cell"]
        return c.get("task"), c["scheme"], c["rate"], c["distance"], c["seed"]

    by_key = {key(r): r for r in results}
    rows = []
    for (task, scheme, rate, d), group in group_by(results, lambda r: key(r)[:4]).items():
        base = study.baseline(scheme)
        if base is None:
            continue
        diffs: dict[str, dict[int, float]] = {"score": {}, "auc": {}}
        solve: dict[str, list[float]] = {"scheme": [], "baseline": []}
        fit: dict[str, list[float]] = {k: [] for k in ("train", "heldout", "base_train",
                                                       "base_heldout")}  # fmt: skip
        seeds, mixed = [], 0
        for r in sorted(group, key=lambda r: r["cell"]["seed"]):
            partner = by_key.get((task, base, None, d, r["cell"]["seed"]))
            if partner is None:
                continue
            mixed += same_machine(r, partner) is False
            a, b = _values(study, r), _values(study, partner)
            seeds.append(r["cell"]["seed"])
            for m in diffs:
                diffs[m][r["cell"]["seed"]] = a[m] - b[m]
            solve["scheme"].append(a["steps_to_solve"])
            solve["baseline"].append(b["steps_to_solve"])
            for prefix, v in (("", a), ("base_", b)):
                fit[prefix + "train"].append(v["train_score"])
                fit[prefix + "heldout"].append(v["score"])
        if not seeds:
            continue
        row = {"task": task or study.task, "scheme": scheme, "rate": rate,
               "label": group[0]["cell"]["label"], "baseline": base, "distance": d,
               "seeds": len(seeds), "budget": study.for_task(task).steps,
               "mixed_machines": mixed}  # fmt: skip
        for m, xs in diffs.items():
            row[f"d_{m}"], row[f"d_{m}_ci"] = mean_ci(list(xs.values()))
            row[f"d_{m}_per_seed"] = xs
        for who, xs in solve.items():
            row[f"solve_{who}"] = _median(xs)
        for k, xs in fit.items():  # means over the paired seeds; nan before train scores
            row[k] = sum(xs) / len(xs)
        row["gap"], row["base_gap"] = (
            row["train"] - row["heldout"],
            row["base_train"] - row["base_heldout"],
        )
        row["train_size"] = study.for_task(task).train_size
        rows.append(row)
    return rows


def _median(xs: list[float]) -> float:
    xs = sorted(x for x in xs if not math.isnan(x))
    if not xs:
        return math.nan
    n = len(xs)
    return xs[n // 2] if n % 2 else (xs[n // 2 - 1] + xs[n // 2]) / 2


def _call(mean: float, half: float) -> str:
    """better / worse / unresolved: does the 95% interval of the mean difference exclude 0?"""
    if math.isnan(mean) or math.isnan(half):
        return "n/a"
    if mean - half > 0:
        return "better"
    if mean + half < 0:
        return "worse"
    return "unresolved"


def verdict(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (task, scheme, rate): the paired difference averaged over the task's distances.

    Each seed's differences are averaged over the distances first (the area between the two
    score-against-distance curves), then the interval is taken over seeds, so distances that
    every scheme solves (or none does) dilute the effect but never fake one.
    """
    out = []
    for (task, scheme, rate), group in group_by(
        rows, lambda r: (r["task"], r["scheme"], r["rate"])
    ).items():
        entry = {"task": task, "scheme": scheme, "rate": rate, "label": group[0]["label"],
                 "baseline": group[0]["baseline"],
                 "distances": [r["distance"] for r in group]}  # fmt: skip
        # the seeds every distance has: each seed's average over the same distances
        seeds = set.intersection(*(set(r["d_score_per_seed"]) for r in group))
        entry["seeds"] = len(seeds)
        for m in ("score", "auc"):
            per_seed = [sum(r[f"d_{m}_per_seed"][s] for r in group) / len(group)
                        for s in sorted(seeds)]  # fmt: skip
            mean, half = mean_ci(per_seed)
            entry[m], entry[f"{m}_ci"], entry[f"{m}_call"] = mean, half, _call(mean, half)
        out.append(entry)
    return out


def _span(xs: list[int]) -> str:
    return str(xs[0]) if len(xs) == 1 else f"{xs[0]}–{xs[-1]}"


def _fmt(mean: float, half: float) -> str:
    if math.isnan(mean):
        return "–"
    mark = "**" if not math.isnan(half) and abs(mean) > half else ""
    half_s = "" if math.isnan(half) else f" ± {half:.2f}"
    return f"{mark}{mean:+.2f}{half_s}{mark}"


def _steps(x: float, budget: int) -> str:
    if math.isnan(x):
        return "–"
    return f"> {budget}" if math.isinf(x) else f"{x:.0f}"


CALL = {"better": "better", "worse": "worse", "unresolved": "·", "n/a": "–"}


def verdict_markdown(study: StudyConfig, rows, verdicts, results=None) -> str:
    """The verdict tables (scheme × task × rate, one per data regime), then each task's paired
    differences; with the cells' ``results``, how much of the grid they are and their cost."""
    tasks = list(dict.fromkeys(r["task"] for r in rows))
    # [None]: every scheme at a fixed rate of its own (the tuned schemes), one column per task
    rates = sorted({v["rate"] for v in verdicts if v["rate"] is not None}) or [None]
    schemes = list(dict.fromkeys(v["scheme"] for v in verdicts))
    seeds = sorted({v["seeds"] for v in verdicts})
    lines = [
        f"# {study.name}: verdict against no dropout",
        "",
        f"Tasks: {', '.join(tasks)}; {_span(seeds)} paired seeds per comparison (same "
        "data, order and initial weights as the baseline). Each entry: the scheme's score minus "
        "its baseline's (no dropout, same encoder and model), averaged over the task's "
        "distances (those it ran at are named when they are fewer, as for a rate swept at one "
        "distance), mean over seeds with its 95% t-interval; **better** / **worse** when the "
        "interval excludes 0, `·` (unresolved) when it does not. Score: normalised accuracy "
        "(1 - loss/baseline for regression) after the budget. AUC: area under the validation "
        "learning curve, the budget-free measure: a scheme that learns later but higher loses "
        "AUC and gains score.",
        "",
    ]
    if results is not None:
        ok = [r for r in results if r.get("status") == "ok"]
        hours = sum(r.get("seconds", 0.0) for r in ok) / 3600
        lines += [f"Measured: {len(ok)} of the grid's {len(study.cells())} cells, "
                  f"{hours:.1f} hours of cell time (the cells' wall times summed, training and "
                  "evaluation: CPU-hours where each cell ran on one thread, as with `--workers` "
                  "= cores).", ""]  # fmt: skip
    mixed = sum(r.get("mixed_machines", 0) for r in rows)
    if mixed:
        pairs = sum(r["seeds"] for r in rows)
        lines += [
            f"**Warning: {mixed} of {pairs} pairs compare cells run on different machines** "
            "(CPU vector ISA, torch build or threads differ: see `machine` in each result.json). "
            "A seed does not reproduce to the bit across machines, so those differences carry "
            "machine noise besides the dropout's; rerun the baselines (or the schemes) on one "
            "machine for a clean pairing.",
            "",
        ]
    lines += _verdict_tables(study, tasks, rates, schemes, verdicts)
    for task in tasks:
        trows = [r for r in rows if r["task"] == task]
        dists = sorted({r["distance"] for r in trows})
        labels = list(dict.fromkeys(r["label"] for r in trows))
        cell = {(r["label"], r["distance"]): r for r in trows}
        budget = trows[0]["budget"]
        lines += [f"## {task}: paired differences per distance", "",
                  f"Data regime: {regime(study.for_task(task) if study.tasks else study)}.",
                  "",
                  "Δ score (bold: the 95% interval excludes 0) / median steps to solve, "
                  f"scheme vs baseline (censored at the budget, {budget} steps).", "",
                  "| scheme | " + " | ".join(f"d={d}" for d in dists) + " |",
                  "|---|" + "---|" * len(dists)]  # fmt: skip
        for label in labels:
            vals = []
            for d in dists:
                r = cell.get((label, d))
                vals.append("–" if r is None else (
                    f"{_fmt(r['d_score'], r['d_score_ci'])} / "
                    f"{_steps(r['solve_scheme'], budget)} vs {_steps(r['solve_baseline'], budget)}"
                ))  # fmt: skip
            lines.append(f"| {label} | " + " | ".join(vals) + " |")
        lines.append("")
        lines += _fit_table(trows, dists, labels)
    return "\n".join(lines)


def _verdict_tables(
    study: StudyConfig, tasks: list[str], rates: list, schemes: list[str], verdicts
) -> list[str]:
    """Score and AUC tables of scheme x (task, rate), one pair per data regime when the study
    has several (unlimited, each train_size), and the better / worse / unresolved counts.
    An entry measured at some of its task's distances only (a rate swept at one distance)
    names them."""
    by = {(v["task"], v["scheme"], v["rate"]): v for v in verdicts}
    sub = {t: study.for_task(t) if study.tasks else study for t in tasks}
    regimes = group_by(tasks, lambda t: sub[t].train_size)
    lines: list[str] = []
    for rtasks in regimes.values():
        cols = [(t, p) for t in rtasks for p in rates
                if any(by.get((t, s, p)) for s in schemes) or p is None]  # fmt: skip
        rverdicts = [v for v in verdicts if v["task"] in rtasks]
        where = "" if len(regimes) == 1 else f" — {regime(sub[rtasks[0]])}"
        for measure, title in (("score", "Final score"), ("auc", "Area under the learning curve")):
            heads = [t if p is None else f"{t} p={p:g}" for t, p in cols]
            lines += [f"## {title}{where}", "", "| scheme | " + " | ".join(heads) + " |",
                      "|---|" + "---|" * len(cols)]  # fmt: skip
            for s in schemes:
                cells = []
                for t, p in cols:
                    v = by.get((t, s, p)) or by.get((t, s, None))
                    if v is None:
                        cells.append("–")
                        continue
                    mean, half = v[measure], v[f"{measure}_ci"]
                    part = sorted(v["distances"]) != sorted(sub[t].distances)
                    at = f" (d={', '.join(map(str, sorted(v['distances'])))})" if part else ""
                    cells.append(f"{CALL[v[f'{measure}_call']]} {_fmt(mean, half)}{at}")
                lines.append(f"| {s} | " + " | ".join(cells) + " |")
            lines.append("")
        if len(regimes) > 1:
            lines += [_counts(rverdicts, f"{regime(sub[rtasks[0]])}: final score"), ""]
    return [*lines, _counts(verdicts, "Final score"), ""]


def _counts(verdicts, what: str) -> str:
    counts = {c: sum(v["score_call"] == c for v in verdicts) for c in ("better", "worse",
                                                                        "unresolved")}  # fmt: skip
    return (
        f"{what}: {counts['better']} better, {counts['worse']} worse, "
        f"{counts['unresolved']} unresolved of {len(verdicts)} (scheme, rate, task) "
        "comparisons."
    )


def _fit(train: float, heldout: float) -> str:
    if math.isnan(train):
        return "–"
    return f"{train:.2f} / {heldout:.2f} / {train - heldout:+.2f}"


def _fit_table(trows, dists: list[int], labels: list[str]) -> list[str]:
    """Train / held-out / gap of each scheme and of its baseline, mean over the paired seeds:
    a scheme that closes the baseline's gap regularises; one that lowers both only costs."""
    if all(math.isnan(r["train"]) for r in trows):
        return []
    cell = {(r["label"], r["distance"]): r for r in trows}
    lines = ["Train score / held-out score / gap (train − held-out), mean over the paired "
             "seeds.", "", "| scheme | " + " | ".join(f"d={d}" for d in dists) + " |",
             "|---|" + "---|" * len(dists)]  # fmt: skip
    bases = list(dict.fromkeys(r["baseline"] for r in trows))
    for base in bases:  # the baselines' own row, from any scheme paired with them
        vals = []
        for d in dists:
            r = next((r for r in trows if r["baseline"] == base and r["distance"] == d), None)
            vals.append("–" if r is None else _fit(r["base_train"], r["base_heldout"]))
        lines.append(f"| {base} | " + " | ".join(vals) + " |")
    for label in labels:
        vals = [("–" if (r := cell.get((label, d))) is None else _fit(r["train"], r["heldout"]))
                for d in dists]  # fmt: skip
        lines.append(f"| {label} | " + " | ".join(vals) + " |")
    return [*lines, ""]


COLUMNS = ["task", "scheme", "rate", "label", "baseline", "distance", "seeds", "d_score",
           "d_score_ci", "d_auc", "d_auc_ci", "solve_scheme", "solve_baseline",
           "budget", "mixed_machines", "train_size", "train", "heldout", "gap", "base_train",
           "base_heldout", "base_gap"]  # fmt: skip


def write_verdict(study: StudyConfig, results: Sequence[dict[str, Any]]) -> dict[str, Path]:
    """``verdict.md``, ``paired.csv`` and ``verdict.png`` under the study's root, and the
    verdict as TensorBoard text; nothing when no scheme has its baseline."""
    rows = paired_differences(study, results)
    if not rows:
        return {}
    verdicts = verdict(rows)
    root = study.study_root
    root.mkdir(parents=True, exist_ok=True)
    paths = {"verdict": root / "verdict.md", "paired_csv": root / "paired.csv"}
    paths["verdict"].write_text(verdict_markdown(study, rows, verdicts, results))
    with paths["paired_csv"].open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    paths["verdict_png"] = _plot(study, verdicts, root / "verdict.png")
    tensorboard_summary(root, paths, paths["verdict"].read_text(), images=("verdict_png",))
    return paths


def _plot(study: StudyConfig, verdicts, path: Path) -> Path:
    """Δ score per scheme (rows) and task × rate (columns), red worse, blue better; a dot
    marks the comparisons whose interval excludes 0."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    tasks = list(dict.fromkeys(v["task"] for v in verdicts))
    rates = sorted({v["rate"] for v in verdicts if v["rate"] is not None}) or [None]
    schemes = list(dict.fromkeys(v["scheme"] for v in verdicts))
    cols = [(t, p) for t in tasks for p in rates]
    by = {(v["task"], v["scheme"], v["rate"]): v for v in verdicts}
    grid = np.full((len(schemes), len(cols)), np.nan)
    for i, s in enumerate(schemes):
        for j, (t, p) in enumerate(cols):
            v = by.get((t, s, p)) or by.get((t, s, None))
            if v is not None:
                grid[i, j] = v["score"]
    lim = max(0.05, float(np.nanmax(np.abs(grid))) if np.isfinite(grid).any() else 0.05)
    fig, ax = plt.subplots(figsize=(1.2 + 0.9 * len(cols), 1.0 + 0.35 * len(schemes)))
    im = ax.imshow(grid, cmap="RdBu", vmin=-lim, vmax=lim, aspect="auto")
    for i, s in enumerate(schemes):
        for j, (t, p) in enumerate(cols):
            v = by.get((t, s, p)) or by.get((t, s, None))
            if v is not None and v["score_call"] in ("better", "worse"):
                ax.plot(j, i, "k.", ms=4)
    ax.set_xticks(range(len(cols)), [f"{t}\np={p:g}" if p is not None else t for t, p in cols],
                  fontsize=7)  # fmt: skip
    ax.set_yticks(range(len(schemes)), schemes, fontsize=7)
    fig.colorbar(im, ax=ax, label="Δ score vs no dropout")
    ax.set_title(f"{study.name}: paired Δ score (• resolved)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_reports(
    study: StudyConfig, results: Sequence[dict[str, Any]]
) -> tuple[dict[str, Path], str]:
    """Each task's report (:func:`write_report`) and the study's verdict; returns the paths
    written and the Markdown to print (the task summaries, then the verdict)."""
    paths: dict[str, Path] = {}
    texts = []
    by_task = group_by(results, lambda r: r["cell"].get("task"))
    for label in study.task_labels():
        sub = study.for_task(label)
        mine = by_task.get(label if study.tasks else None, [])
        if not mine:
            continue
        written = write_report(sub, mine)
        prefix = f"{label}_" if study.tasks else ""
        paths.update({prefix + k: p for k, p in written.items()})
        texts.append(written["markdown"].read_text())
    verdict_paths = write_verdict(study, results)
    paths.update(verdict_paths)
    if "verdict" in verdict_paths:
        texts.append(verdict_paths["verdict"].read_text())
    return paths, "\n".join(texts)
