"""``rnndrop tune``: each scheme at its own best rate, found with the same budget for every scheme.

A scheme compared at one shared rate is compared at an arbitrary point; tuning each method
under the same budget can change published orderings (Melis et al. 2018). For every scheme of
a long-range study that has a rate, ``rnndrop tune``:

1. **searches** its rate with Optuna's TPE sampler (seeded): ``trials`` trials per scheme, each
   trial the same cells (the study's distances x ``search_seeds``, the study's ``steps``), scored
   by the **validation split** (the held-out val sequences of the search seeds, at the last
   validation), never by the test split;
2. **evaluates** each scheme at its chosen rate (the best of its first ``trials`` complete
   trials) on the study's ``seeds``, which must be disjoint from ``search_seeds``: fresh data,
   initial weights and masks the search never saw, paired seed by seed with no dropout (which
   has nothing to tune: its own row). The verdict is the study's (``verdict.md``).

The searches live in an Optuna storage: SQLite under the study folder by default; any storage
URL Optuna accepts (``postgresql://...``, ``mysql://...``, ``sqlite:////shared/tune.db``) lets
several processes, machines or SLURM array jobs share one search: each runs
``rnndrop tune --config c.yaml --phase search --worker $SLURM_ARRAY_TASK_ID`` and stops when
its scheme has ``trials`` complete trials; one job then runs ``--phase evaluate``.

A config is a long-range study YAML (one task) plus a ``tune:`` mapping of
:class:`TuneSettings` fields.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .common import read_settings
from .config import BUILTIN_SCHEMES, LongRangeRun, StudyConfig, _substitute, uses_rate

__all__ = ["TuneSettings", "at_range_edge", "chosen_rates", "edge_notes", "evaluation_study",
           "load_tune", "main", "search", "search_study"]  # fmt: skip


@dataclass
class TuneSettings:
    """How each scheme's rate is searched (the ``tune:`` mapping of a config).

    ``rate_range`` is the searched interval (``rate_ranges`` overrides it per scheme), on a grid
    of ``rate_step``: rates closer than that make no measurable difference, and a rate drawn
    twice reuses its finished cells. ``startup_trials``: TPE's random trials before it models
    the objective (Optuna's default 10, capped at half the trials).
    """

    trials: int = 20
    rate_range: list[float] = field(default_factory=lambda: [0.05, 0.6])
    rate_ranges: dict[str, list[float]] = field(default_factory=dict)
    rate_step: float = 0.01
    search_seeds: list[int] = field(default_factory=lambda: [1000])
    sampler_seed: int = 0
    startup_trials: int | None = None
    storage: str | None = None  # any Optuna storage URL; default sqlite under the study folder

    def __post_init__(self) -> None:
        if isinstance(self.trials, bool) or not isinstance(self.trials, int) or self.trials < 1:
            raise ValueError(f"tune.trials must be an integer >= 1, got {self.trials!r}")
        if not self.search_seeds:
            raise ValueError("tune.search_seeds: give at least one seed")
        if not 0 < self.rate_step < 1:
            raise ValueError(f"tune.rate_step must be in (0, 1), got {self.rate_step}")
        for name, rng in {"rate_range": self.rate_range, **{
                f"rate_ranges.{k}": v for k, v in self.rate_ranges.items()}}.items():  # fmt: skip
            if len(rng) != 2 or not 0 <= rng[0] < rng[1] < 1:
                raise ValueError(f"tune.{name} must be [low, high] with 0 <= low < high < 1, "
                                 f"got {rng!r}")  # fmt: skip

    def range_for(self, scheme: str) -> tuple[float, float]:
        low, high = self.rate_ranges.get(scheme, self.rate_range)
        return float(low), float(high)


def load_tune(
    path: str | Path | None = None, storage: str | None = None, **overrides: Any
) -> tuple[StudyConfig, TuneSettings]:
    """The study (its ``seeds`` are the evaluation seeds) and the tune settings of a config."""
    import yaml

    data: dict[str, Any] = {}
    if path is not None:
        if not Path(path).is_file():
            raise FileNotFoundError(f"tune config {path} does not exist")
        data = yaml.safe_load(Path(path).read_text()) or {}
    tune_data = dict(data.pop("tune", None) or {})
    if storage is not None:
        tune_data["storage"] = storage
    known = {f.name for f in dataclasses.fields(TuneSettings)}
    unknown = sorted(set(tune_data) - known)
    if unknown:
        raise ValueError(f"unknown tune setting(s) {unknown}; valid: {sorted(known)}")
    settings = TuneSettings(**tune_data)
    given = {k: v for k, v in overrides.items() if v is not None}
    study = StudyConfig(**read_settings(None, {**data, **given}, StudyConfig, "study"))
    if len(study.task_labels()) != 1:
        raise ValueError(
            f"a tune config has one task (its rates are tuned per task), got "
            f"{study.task_labels()}: write one config per task and regime"
        )
    if study.tasks:  # one entry under tasks: that task, with its regime
        label = study.task_labels()[0]
        study = dataclasses.replace(study.for_task(label), name=study.name)
    overlap = sorted(set(settings.search_seeds) & set(study.seeds))
    if overlap:
        raise ValueError(f"tune.search_seeds and seeds (the evaluation seeds) share {overlap}: "
                         "the evaluation must use seeds the search never saw")  # fmt: skip
    return study, settings


def tuned_schemes(study: StudyConfig) -> list[str]:
    """The study's schemes that have a rate to tune (those without run once, untuned)."""
    return [s for s in study.all_schemes() if uses_rate(study.scheme_spec(s))]


def _root(study: StudyConfig) -> Path:
    return Path(study.out_dir) / study.name


def storage_url(study: StudyConfig, settings: TuneSettings) -> str:
    """The Optuna storage: ``settings.storage``, or SQLite at ``<out_dir>/<name>/optuna.db``."""
    if settings.storage:
        return settings.storage
    _root(study).mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{(_root(study) / 'optuna.db').resolve()}"


def search_study(study: StudyConfig, settings: TuneSettings) -> StudyConfig:
    """The cells of the search: the study on the search seeds, under ``<name>/search``, without
    Monte Carlo evaluation (the objective reads the validation curve only)."""
    return dataclasses.replace(study, name=f"{study.name}/search",
                               seeds=list(settings.search_seeds),
                               mc_samples=0, grad_distances=[1], variants={},
                               custom_schemes={s: study.scheme_spec(s)
                                               for s in study.all_schemes()},
                               schemes=study.all_schemes())  # fmt: skip


def _optuna_name(study: StudyConfig, scheme: str) -> str:
    return f"{study.name}/{study.task}/{scheme}"


def _open(study: StudyConfig, settings: TuneSettings, scheme: str, worker: int = 0):
    import optuna

    # no "Using an existing study" line per scheme in every phase's log
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    startup = settings.startup_trials
    if startup is None:
        startup = max(1, min(10, settings.trials // 2))
    # each worker its own sampler seed: workers seeded alike would draw the same random rates
    sampler = optuna.samplers.TPESampler(seed=settings.sampler_seed + 1009 * worker,
                                         n_startup_trials=startup)  # fmt: skip
    return optuna.create_study(study_name=_optuna_name(study, scheme), direction="maximize",
                               storage=storage_url(study, settings), sampler=sampler,
                               load_if_exists=True)  # fmt: skip


def validation_score(result: dict[str, Any]) -> float:
    """The cell's score on its validation split at the last validation (-1 if it diverged or
    never validated: below memoryless, so the search moves away from it)."""
    from .verdict import _point_score

    curve = result.get("curve") or []
    if result.get("status") != "ok" or not curve:
        return -1.0
    value = _point_score(max(curve, key=lambda p: p["step"]), result["task"])
    return -1.0 if math.isnan(value) else value


def _objective(study: StudyConfig, settings: TuneSettings, scheme: str, progress: bool):
    from .runner import is_finished, load_result, run_cell

    searched = search_study(study, settings)
    low, high = settings.range_for(scheme)

    def objective(trial) -> float:
        rate = round(trial.suggest_float("rate", low, high, step=settings.rate_step), 10)
        scores = {}
        for d in searched.distances:
            for seed in searched.seeds:
                cell = LongRangeRun(scheme, rate, d, seed)
                r = (load_result(searched, cell) if is_finished(searched, cell)
                     else run_cell(searched, cell))  # fmt: skip
                scores[f"d={d} seed={seed}"] = validation_score(r)
        trial.set_user_attr("scores", scores)
        value = sum(scores.values()) / len(scores)
        if progress:
            print(f"{scheme} trial {trial.number}: rate {rate:g}, validation score {value:.3f}",
                  flush=True)  # fmt: skip
        return value

    return objective


def _complete(optuna_study) -> list:
    import optuna

    done = optuna_study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    return sorted(done, key=lambda t: t.number)


def search(
    study: StudyConfig,
    settings: TuneSettings,
    schemes: list[str] | None = None,
    worker: int = 0,
    progress: bool = True,
) -> dict[str, int]:
    """Run each scheme's search until it has ``settings.trials`` complete trials (also those
    other processes ran in the same storage); returns the complete trials per scheme."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    schemes = tuned_schemes(study) if schemes is None else schemes
    unknown = sorted(set(schemes) - set(tuned_schemes(study)))
    if unknown:
        raise ValueError(f"--scheme {unknown}: not a scheme of this study with a rate; "
                         f"tunable: {tuned_schemes(study)}")  # fmt: skip
    counts = {}
    for scheme in schemes:
        s = _open(study, settings, scheme, worker)
        left = settings.trials - len(_complete(s))
        if left > 0:
            stop = optuna.study.MaxTrialsCallback(
                settings.trials, states=(optuna.trial.TrialState.COMPLETE,)
            )
            s.optimize(_objective(study, settings, scheme, progress), n_trials=left,
                       callbacks=[stop])  # fmt: skip
        counts[scheme] = len(_complete(s))
    return counts


def chosen_rates(study: StudyConfig, settings: TuneSettings) -> dict[str, dict[str, Any]]:
    """Per tuned scheme: the rate of the best of its first ``trials`` complete trials (parallel
    workers may complete a few more; the budget stays the same for every scheme)."""
    out = {}
    missing = []
    for scheme in tuned_schemes(study):
        trials = _complete(_open(study, settings, scheme))[: settings.trials]
        if len(trials) < settings.trials:
            missing.append(f"{scheme} ({len(trials)} of {settings.trials})")
            continue
        best = max(trials, key=lambda t: (t.value, -t.number))  # ties: the earliest
        out[scheme] = {"rate": best.params["rate"], "validation_score": best.value,
                       "trial": best.number, "trials": len(trials),
                       "range": list(settings.range_for(scheme)),
                       "tried": [[t.params["rate"], t.value] for t in trials]}  # fmt: skip
    if missing:
        raise ValueError("the search is not finished for " + ", ".join(missing)
                         + ": run the search phase (again)")  # fmt: skip
    return out


def at_range_edge(rate: float, low: float, high: float, share: float = 0.1) -> str | None:
    """``"upper"`` / ``"lower"`` if ``rate`` lies in the top / bottom ``share`` of the searched
    ``[low, high]``, else None: a best rate at the edge says the optimum may lie outside the
    range, and the comparison is then with the scheme at the range's end, not at its best."""
    margin = share * (high - low)
    if rate >= high - margin - 1e-9:
        return "upper"
    if rate <= low + margin + 1e-9:
        return "lower"
    return None


def edge_notes(chosen: dict[str, dict[str, Any]]) -> list[str]:
    """One report line per scheme whose chosen rate is at the edge of its searched range."""
    notes = []
    for scheme, c in chosen.items():
        low, high = c["range"]
        edge = at_range_edge(c["rate"], low, high)
        if edge is not None:
            beyond = f"above {high:g}" if edge == "upper" else f"below {low:g}"
            notes.append(f"- **{scheme}: chosen rate {c['rate']:g} is in the {edge} tenth of "
                         f"[{low:g}, {high:g}]**: its best rate may lie {beyond}; widen "
                         f"tune.rate_ranges.{scheme} and search again.")  # fmt: skip
    return notes


def _fixed(spec: dict[str, Any], rate: float) -> dict[str, Any]:
    """A scheme's spec with its rate placeholders replaced by ``rate``."""
    dropout = spec.get("dropout")
    if isinstance(dropout, dict):
        dropout = {k: _substitute(v, rate) for k, v in dropout.items()}
    else:
        dropout = _substitute(dropout, rate)
    return {**spec, "dropout": dropout}


def evaluation_study(study: StudyConfig, chosen: dict[str, dict[str, Any]]) -> StudyConfig:
    """The study of the chosen rates: each tuned scheme as ``<scheme>_tuned`` at its rate, the
    schemes without a rate as they are, on the study's (evaluation) seeds."""
    custom: dict[str, dict[str, Any]] = {}
    schemes = []
    for s in study.all_schemes():
        spec = study.scheme_spec(s)
        if s in chosen:
            schemes.append(f"{s}_tuned")
            custom[f"{s}_tuned"] = _fixed(spec, chosen[s]["rate"])
        elif not uses_rate(spec):
            schemes.append(s)
            if BUILTIN_SCHEMES.get(s) != spec:
                custom[s] = spec
    return dataclasses.replace(study, name=f"{study.name}/eval", schemes=schemes,
                               custom_schemes=custom, variants={})  # fmt: skip


def write_tune_report(
    study: StudyConfig, settings: TuneSettings, chosen: dict[str, dict[str, Any]],
    evaluation: StudyConfig, results: list[dict[str, Any]],
) -> Path:  # fmt: skip
    """``tune.md`` and ``tune.json`` under ``<out_dir>/<name>``: the chosen rates and the
    paired verdict of each scheme at its rate against no dropout."""
    from .report import regime
    from .verdict import CALL, _fmt, paired_differences, verdict

    verdicts = {v["scheme"]: v for v in verdict(paired_differences(evaluation, results))}
    seeds = sorted({r["cell"]["seed"] for r in results})
    lines = [
        f"# {study.name}: each scheme at its tuned rate",
        "",
        f"Task {study.task}, distances {study.distances}; data regime: {regime(study)}; "
        f"{study.steps} steps of {study.batch_size}. Search: {settings.trials} trials per scheme "
        f"(Optuna TPE, sampler seed {settings.sampler_seed}, rate grid {settings.rate_step:g}), "
        f"each trial the same cells: seeds {settings.search_seeds}, scored on the validation "
        f"split at the last validation. Evaluation: seeds {seeds} (disjoint from the search's), "
        "paired with no dropout; Δ score = score minus no dropout's, averaged over distances, "
        "mean ± 95% t-interval over seeds; **better** / **worse** when it excludes 0.",
        "",
    ]
    if len(seeds) < 5:
        lines += [f"**{len(seeds)} evaluation seed(s): fewer than 5, intervals are wide.**", ""]
    lines += ["| scheme | searched | chosen rate | validation score | Δ score (test) | "
              "Δ AUC |", "|---|---|---|---|---|---|"]  # fmt: skip
    for scheme, c in chosen.items():
        v = verdicts.get(f"{scheme}_tuned")
        d_score = "–" if v is None else f"{CALL[v['score_call']]} {_fmt(v['score'], v['score_ci'])}"
        d_auc = "–" if v is None else f"{CALL[v['auc_call']]} {_fmt(v['auc'], v['auc_ci'])}"
        lines.append(f"| {scheme} | [{c['range'][0]:g}, {c['range'][1]:g}] | {c['rate']:g} | "
                     f"{c['validation_score']:.3f} | {d_score} | {d_auc} |")  # fmt: skip
    from ..analysis import mean_ci
    from .common import format_ci
    from .report import score, train_score

    untuned = [s for s in evaluation.schemes if not s.endswith("_tuned")]
    for s in untuned:  # no dropout has nothing to tune: its own row, the baseline's scores
        mine = [r for r in results if r["cell"]["scheme"] == s]
        held = mean_ci([score(r) for r in mine])
        train = mean_ci([train_score(r) for r in mine])[0]
        lines.append(f"| {s} (baseline, no rate) | – | – | – | held-out score "
                     f"{format_ci(*held)} (train {train:.2f}) | – |")  # fmt: skip
    notes = edge_notes(chosen)
    if notes:
        lines += ["", "Chosen rates at the edge of the searched range:", "", *notes]
    lines += ["", f"Per-distance tables, train / held-out / gap: `{evaluation.name}/verdict.md`.",
              ""]  # fmt: skip
    root = _root(study)
    root.mkdir(parents=True, exist_ok=True)
    (root / "tune.json").write_text(json.dumps(
        {"chosen": chosen, "settings": dataclasses.asdict(settings),
         "evaluation_seeds": seeds}, indent=2))  # fmt: skip
    path = root / "tune.md"
    path.write_text("\n".join(lines))
    return path


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="rnndrop tune", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--config", required=True, help="a long-range study YAML with a tune: section")
    p.add_argument(
        "--phase",
        choices=["all", "search", "evaluate"],
        default="all",
        help="search the rates, evaluate the chosen ones, or both (default)",
    )
    p.add_argument(
        "--storage", help="Optuna storage URL (default: sqlite:///<out>/<name>/optuna.db)"
    )
    p.add_argument("--scheme", nargs="+", help="search only these schemes")
    p.add_argument("--worker", type=int, default=0,
                   help="this process's index when several share a storage (SLURM_ARRAY_TASK_ID):"
                   " offsets the sampler seed")  # fmt: skip
    p.add_argument("--workers", type=int, default=1, help="processes for the evaluation cells")
    p.add_argument("--out-dir", help="where runs go (default: the config's out_dir)")
    p.add_argument("--name", help="study name (its folder under out_dir)")
    p.add_argument("--no-progress", action="store_true", help="no per-trial or per-cell lines")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return _main(args)
    except (ValueError, FileNotFoundError) as err:
        print(f"rnndrop tune: error: {err}", file=sys.stderr)
        return 2


def _main(args: argparse.Namespace) -> int:
    from .runner import run_study
    from .verdict import write_reports

    study, settings = load_tune(args.config, storage=args.storage, out_dir=args.out_dir,
                                name=args.name)  # fmt: skip
    progress = not args.no_progress
    if args.phase in ("all", "search"):
        counts = search(study, settings, args.scheme, args.worker, progress)
        print("search: " + ", ".join(f"{s} {n} trials" for s, n in counts.items()),
              file=sys.stderr)  # fmt: skip
        if args.phase == "search":
            return 0
    chosen = chosen_rates(study, settings)
    evaluation = evaluation_study(study, chosen)
    results = run_study(evaluation, workers=args.workers, progress=progress)
    write_reports(evaluation, results)
    path = write_tune_report(study, settings, chosen, evaluation, results)
    print(f"report: {path}", file=sys.stderr)
    print(path.read_text())
    return 0
