"""TensorBoard runs -> a table, read with TensorBoard's own event reader.

It lives with the studies, not at rnndrop's top level: it needs TensorBoard (the ``train``
extra), and the top level needs torch alone. ``scripts/tb_export.py`` runs it too.

rnndrop export-tb runs/quick                                  # every scalar, last value, CSV
rnndrop export-tb runs/quick --tags val/acc final/acc --stat max --out table.md
rnndrop export-tb runs/a runs/b --long --out all.csv          # one row per (run, tag, step)

Every directory under the given paths that holds ``events.out.tfevents.*`` files is one run,
named by its path relative to the path given. Wide tables have one row per run and one
column per tag (the tag's last, min, max or mean value); ``--long`` keeps every point.

Why not ``tbparse``: it reads the same events through the same TensorBoard reader and returns a
pandas DataFrame; this module needs neither pandas (a new dependency of the ``train`` extra) nor
more than ~100 lines, and it writes Markdown as well as CSV.
"""

from __future__ import annotations

import argparse
import csv
import io
import math
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path

__all__ = ["find_runs", "main", "read_scalars", "to_table"]

STATS = ("last", "min", "max", "mean")


def find_runs(paths: Iterable[str | Path]) -> dict[str, Path]:
    """``{run name: directory}`` for every directory under ``paths`` holding event files."""
    runs: dict[str, Path] = {}
    for root in map(Path, paths):
        if not root.exists():
            raise FileNotFoundError(f"{root} does not exist")
        dirs = {p.parent for p in root.rglob("events.out.tfevents.*")}
        for d in sorted(dirs):
            rel = d.relative_to(root).as_posix()
            name = root.name if rel == "." else f"{root.name}/{rel}"
            runs[name] = d
    return runs


def read_scalars(run_dir: str | Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar of one run: ``{tag: [(step, value), ...]}`` in step order."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})  # 0: keep every point
    ea.Reload()
    return {tag: [(e.step, e.value) for e in ea.Scalars(tag)] for tag in ea.Tags()["scalars"]}


def _stat(points: list[tuple[int, float]], stat: str) -> float:
    values = [v for _, v in points if math.isfinite(v)]
    if not values:
        return math.nan
    if stat == "last":
        return points[-1][1]
    if stat == "min":
        return min(values)
    if stat == "max":
        return max(values)
    return sum(values) / len(values)


def to_table(
    runs: dict[str, Path],
    tags: Sequence[str] | None = None,
    stat: str = "last",
    long: bool = False,
) -> tuple[list[str], list[list[object]]]:
    """``(header, rows)``: wide (a row per run, a column per tag) or long (a row per point)."""
    if stat not in STATS:
        raise ValueError(f"stat must be one of {STATS}, got {stat!r}")
    data = {name: read_scalars(d) for name, d in runs.items()}
    all_tags = sorted({t for scalars in data.values() for t in scalars})
    if tags:
        missing = [t for t in tags if t not in all_tags]
        if missing:
            raise ValueError(f"tag(s) {missing} in no run; tags found: {all_tags}")
        all_tags = list(tags)
    if long:
        rows = [[name, tag, step, value] for name, scalars in data.items()
                for tag in all_tags for step, value in scalars.get(tag, [])]  # fmt: skip
        return ["run", "tag", "step", "value"], rows
    rows = [[name] + [_stat(scalars[t], stat) if t in scalars else math.nan for t in all_tags]
            for name, scalars in data.items()]  # fmt: skip
    return ["run", *all_tags], rows


def _markdown(header: list[str], rows: list[list[object]]) -> str:
    def fmt(v: object) -> str:
        if isinstance(v, float):
            return "–" if math.isnan(v) else f"{v:.4g}"
        return str(v)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="rnndrop export-tb", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    p.add_argument("paths", nargs="+", help="run directories or folders of runs")
    p.add_argument("--tags", nargs="+", help="only these scalar tags (default: all)")
    p.add_argument("--stat", choices=STATS, default="last", help="per-tag summary (wide table)")
    p.add_argument("--long", action="store_true", help="one row per (run, tag, step)")
    p.add_argument("--out", help="write here (.csv or .md); default: CSV on stdout")
    args = p.parse_args(argv)
    try:
        runs = find_runs(args.paths)
        if not runs:
            raise FileNotFoundError(f"no TensorBoard event files under {args.paths}")
        header, rows = to_table(runs, args.tags, args.stat, args.long)
    except (FileNotFoundError, ValueError) as err:
        print(f"rnndrop export-tb: error: {err}", file=sys.stderr)
        return 2
    if args.out and args.out.endswith(".md"):
        text = _markdown(header, rows)
    else:
        buf = io.StringIO()
        writer = csv.writer(buf)
        writer.writerow(header)
        writer.writerows(rows)
        text = buf.getvalue()
    if args.out:
        Path(args.out).write_text(text)
        print(f"{len(rows)} row(s) from {len(runs)} run(s) -> {args.out}", file=sys.stderr)
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
