"""``rnndrop study long-range``: run (or continue) a study and write its report.

rnndrop study long-range --quick                       # the README's main job (CPU, minutes)
rnndrop study long-range --config experiments/long_range/full.yaml --workers 2
rnndrop study long-range --config s.yaml --list-cells  # number the cells
rnndrop study long-range --config s.yaml --cell 7      # one cell (a scheduler array job)
rnndrop study long-range --config s.yaml --report-only # aggregate what has finished
rnndrop study context --config experiments/long_range/context_ptb.yaml  # LM context usage
rnndrop study inference --config experiments/inference/delayed_recall.yaml  # WS vs MC, ECE
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from importlib.resources import files

from .config import load_study
from .runner import StudyInterrupted, is_finished, load_result, run_study
from .verdict import write_reports

__all__ = ["main"]

QUICK = files("rnndrop.study").joinpath("quick.yaml")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="rnndrop study", description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    p.add_argument("kind", choices=["long-range", "context", "inference"], help="the study to run")
    p.add_argument("--config", help="study YAML (fields of StudyConfig / ContextStudyConfig)")
    p.add_argument(
        "--quick", action="store_true", help="the built-in quick study (~3 min on 2 idle cores)"
    )
    p.add_argument(
        "--workers", type=int, default=None,
        help="cells run in parallel processes, each with cpu_count/workers threads (default: "
        "one per CPU core, up to 8: the study's small models run best on one thread each)",
    )  # fmt: skip
    p.add_argument("--cell", type=int, nargs="+", help="run only these cell numbers")
    p.add_argument(
        "--only", nargs="+", metavar="KEY=V1,V2", default=[],
        help="run a slice of the grid: cells whose task, scheme, rate, distance and seed are "
        "among the values given (e.g. --only scheme=none,zoneout seed=0,1,2); it has the "
        "same results as the whole grid's cells, which a later run of the whole grid keeps "
        "(context and inference studies: scheme, rate and seed)",
    )  # fmt: skip
    p.add_argument("--list-cells", action="store_true", help="print the numbered cells and exit")
    p.add_argument("--report-only", action="store_true", help="only write the report")
    p.add_argument("--out-dir", help="where runs go (default: the config's out_dir, runs/)")
    p.add_argument("--name", help="study name (its folder under out_dir)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def select_cells(
    cells: list,
    filters: list[str],
    keys: tuple[str, ...] = ("task", "scheme", "rate", "distance", "seed"),
) -> set[int]:
    """Numbers of the cells matching every ``key=v1,v2`` filter (a key's values are ORed)."""
    picked = set(range(len(cells)))
    for f in filters:
        key, sep, values = f.partition("=")
        if not sep or key not in keys or not values:
            raise ValueError(f"--only {f!r}: give KEY=V1,V2 with KEY one of {sorted(keys)}")
        wanted = {v.strip() for v in values.split(",")}
        # a scheme without a rate runs once whatever the rates: a rate filter keeps it
        picked &= {i for i, c in enumerate(cells) if _as_text(getattr(c, key)) in wanted
                   or (key == "rate" and c.rate is None)}  # fmt: skip
    if not picked:
        raise ValueError(f"--only {' '.join(filters)}: no cell of the study matches")
    return picked


def _as_text(value) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from ..data import DATA_ERRORS

    try:
        return _main(args)
    except (ValueError, FileNotFoundError, *DATA_ERRORS) as err:  # a bad config, a cell
        print(f"rnndrop study: error: {err}", file=sys.stderr)  # number, a missing corpus
        return 2
    except StudyInterrupted as err:  # workers stopped, finished cells kept
        print(f"rnndrop study: {err}", file=sys.stderr)
        return 128 + err.signum


def _context(args: argparse.Namespace) -> int:
    from . import context as c

    if not args.config:
        print("rnndrop study context: give --config", file=sys.stderr)
        return 2
    return _grid_study(args, "context", c.load_context_study, c.run_context_study,
                       c.load_context_result, c.write_context_report)  # fmt: skip


def _inference(args: argparse.Namespace) -> int:
    from . import inference as i

    return _grid_study(args, "inference", i.load_inference_study, i.run_inference_study,
                       i.load_inference_result, i.write_inference_report)  # fmt: skip


def _grid_study(args, kind: str, load, run, load_result, write_report) -> int:
    """A study of schemes x rates x seeds (context, inference): run, or read, then report."""
    if args.quick or args.cell or args.list_cells:
        print(f"rnndrop study {kind}: give --config (no --quick, --cell, --list-cells)",
              file=sys.stderr)  # fmt: skip
        return 2
    study = load(args.config, out_dir=args.out_dir, name=args.name)
    # a slice (e.g. one scheme per process or machine); the report covers every finished run
    only = select_cells(study.cells(), args.only, ("scheme", "rate", "seed")) if args.only else None
    if not args.report_only:
        results = run(study, progress=not args.no_progress, only=only)
    else:
        results = [r for c in study.cells() if (r := load_result(study, c)) is not None]
    if not results:
        print(f"rnndrop study: no finished runs under {study.root}", file=sys.stderr)
        return 1
    paths = write_report(study, results)
    print("report: " + ", ".join(str(p) for p in paths.values()), file=sys.stderr)
    print(paths["markdown"].read_text())
    return 0


def _main(args: argparse.Namespace) -> int:
    if args.kind == "context":
        return _context(args)
    if args.kind == "inference":
        return _inference(args)
    if args.quick and args.config:
        print("rnndrop study: give --quick or --config, not both", file=sys.stderr)
        return 2
    path = str(QUICK) if args.quick or not args.config else args.config
    study = load_study(path, out_dir=args.out_dir, name=args.name)
    cells = study.cells()
    if args.list_cells:
        for i, cell in enumerate(cells):
            done = "done" if is_finished(study, cell) else "todo"
            print(f"{i:4d}  {done}  {cell}")
        return 0
    start = time.perf_counter()
    only = args.cell
    if args.only:
        picked = select_cells(cells, args.only)
        only = [i for i in (only if only is not None else range(len(cells))) if i in picked]
    if not args.report_only:
        workers = args.workers or min(8, os.cpu_count() or 1)
        run_study(study, workers=workers, only=only, progress=not args.no_progress)
    if only is not None and not args.report_only and not args.only:
        return 0  # one array job: the report is written once all cells have finished
    results = [r for c in cells if (r := load_result(study, c)) is not None]
    if not results:
        print(f"rnndrop study: no finished cells under {study.study_root}", file=sys.stderr)
        return 1
    paths, markdown = write_reports(study, results)
    missing = len(cells) - len(results)
    note = f" ({missing} cell(s) not finished yet)" if missing else ""
    print(f"report{note}: " + ", ".join(str(p) for p in paths.values()), file=sys.stderr)
    print(f"wall time {time.perf_counter() - start:.0f} s", file=sys.stderr)
    print(markdown)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
