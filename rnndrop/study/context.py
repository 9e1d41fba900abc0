"""How much context a language model uses under each dropout scheme (Khandelwal et al. 2018).

``rnndrop study context --config c.yaml``: for every scheme x rate x seed, train a language
model on a corpus for the same number of steps, then probe it with
:func:`rnndrop.analysis.context_usage` on held-out text: the loss increase when tokens farther
than ``d`` are shuffled, replaced or cut, on the same targets for every ``d``. The effective
context of a run is the smallest probed ``d`` beyond which the increase stays below
``context_threshold`` times the reference loss (Khandelwal et al. use about 1%).

Runs live in ``runs/<name>/<corpus>/<scheme>/seed=<s>``, resumable like the long-range study;
the report is ``context.csv`` (a row per run, mode and ``d``), ``context.md`` and
``context_usage.png`` under ``runs/<name>/<corpus>``, and a TensorBoard run ``summary``.
"""

from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from .base import Run, Study
from .common import (
    format_ci,
    fresh_run_dir,
    group_by,
    tensorboard_summary,
    write_json,
)

__all__ = [
    "ContextCell",
    "ContextStudyConfig",
    "load_context_result",
    "load_context_study",
    "run_context_study",
    "write_context_report",
]

FORMAT = 1
TARGETS = "targets.pt"  # a run's per-target probe: positions, reference NLL, increases
MODEL = "model.pt"  # the probed model's state dict
RUN = "run.json"  # a started run's settings: what a resumed run must match


ContextCell = Run  # the name before the studies shared a base class (kept: code imports it)


@dataclass
class ContextStudyConfig(Study):
    """Schemes x rates x seeds of language models on one corpus, each probed for context use.

    ``corpus`` is ``ptb``, ``ptb_char``, ``wikitext2`` (from ``data_dir`` /
    ``$RNNDROP_DATA_DIR``) or ``folder`` (``data_dir`` holding train/valid/test text files).
    """

    _SETTINGS = "context-study"

    # the fields of Study (name, schemes, rates, seeds, custom_schemes, model, steps,
    # batch_size, optimizer, lr, gradient_clip_val, out_dir) at its defaults, except these
    name: str = "context"
    schemes: list[str] = field(default_factory=lambda: ["none", "naive", "variational"])
    model: dict[str, Any] = field(
        default_factory=lambda: {"embedding_size": 200, "hidden_size": 200, "num_layers": 2}
    )
    batch_size: int = 20
    lr: float = 2e-3
    corpus: str = "ptb"
    data_dir: str | None = None
    bptt: int = 35
    window: int = 200  # context of the unperturbed reference
    distances: list[int] = field(default_factory=lambda: [1, 2, 5, 10, 20, 50, 100, 150])
    modes: list[str] = field(default_factory=lambda: ["shuffle", "replace", "cut"])
    n_targets: int = 1000
    context_threshold: float = 0.01  # relative loss increase that counts as "still used"
    # training to convergence (all off by default: `steps` steps, no validation)
    val_every: int = 0  # steps between validations on the validation split (0: none)
    patience: int = 0  # stop after this many validations in a row without a new best
    plateau_factor: float = 1.0  # learning-rate multiplier at each of those validations
    bootstrap: int = 0  # resamples of the probed targets for percentile intervals

    #: later fields, in a run's spec only when not at these defaults (published hashes)
    _LATER: ClassVar[dict[str, Any]] = {
        "val_every": 0, "patience": 0, "plateau_factor": 1.0, "bootstrap": 0,
    }  # fmt: skip

    def __post_init__(self) -> None:
        from ..analysis.context import MODES

        self._check_study(("steps", "batch_size", "bptt", "n_targets"))
        if self.val_every < 0 or self.patience < 0 or self.bootstrap < 0:
            raise ValueError(f"val_every, patience and bootstrap must be >= 0, got "
                             f"{self.val_every}, {self.patience}, {self.bootstrap}")  # fmt: skip
        if self.patience and not self.val_every:
            raise ValueError(
                f"patience={self.patience} needs validations to count: set "
                "val_every (steps between validations), e.g. one epoch's steps"
            )
        if not 0 < self.plateau_factor <= 1:
            raise ValueError(f"plateau_factor must be in (0, 1], got {self.plateau_factor}")
        if self.plateau_factor != 1 and not self.patience:
            raise ValueError(
                "plateau_factor acts at validations without improvement: set "
                "patience (and val_every) too"
            )
        if not 0 < self.context_threshold < 1:
            raise ValueError(f"context_threshold is a relative loss increase in (0, 1), got "
                             f"{self.context_threshold}")  # fmt: skip
        if self.corpus not in ("ptb", "ptb_char", "wikitext2", "folder"):
            raise ValueError(f"corpus must be ptb, ptb_char, wikitext2 or folder, got "
                             f"{self.corpus!r}")  # fmt: skip
        if self.corpus == "folder" and not self.data_dir:
            raise ValueError("corpus 'folder' needs data_dir, the folder with train/valid/test")
        bad = [m for m in self.modes if m not in MODES]
        if bad:
            raise ValueError(f"unknown mode(s) {bad}; choose from {list(MODES)}")
        if any(not 1 <= d < self.window for d in self.distances):
            raise ValueError(f"distances must lie in [1, window - 1 = {self.window - 1}], got "
                             f"{self.distances}")  # fmt: skip
        transformers = [s for s in self.schemes
                        if self.scheme_spec(s).get("encoder", "lstm") == "transformer"]  # fmt: skip
        if transformers and self.window > self.bptt:
            raise ValueError(
                f"window={self.window} > bptt={self.bptt}: the transformer scheme(s) "
                f"{transformers} carry no state across chunks, so in training they never see "
                "more than bptt tokens; probe with window <= bptt or train with bptt >= window"
            )

    @property
    def root(self) -> Path:
        return Path(self.out_dir) / self.name / self.corpus

    def cell_spec(self, cell: Run) -> dict[str, Any]:
        """Every setting but where the study lives and its grid, the run's scheme, rate and
        seed, its encoder, dropout and model (hashed to recognise finished runs)."""
        encoder, dropout = self.resolve(cell.scheme, cell.rate)
        d = self.to_dict()
        for k in ("name", "schemes", "rates", "seeds", "custom_schemes", "out_dir", "data_dir"):
            d.pop(k)
        for k, default in self._LATER.items():
            if d[k] == default:
                d.pop(k)
        cell_keys = {"scheme": cell.scheme, "rate": cell.rate, "seed": cell.seed}
        return {**d, **cell_keys, "format": FORMAT, "encoder": encoder,
                "dropout": self.dropout_spec(dropout),
                "model": self.model_for(cell.scheme)}  # fmt: skip


def load_context_study(path: str | Path, **overrides: Any) -> ContextStudyConfig:
    """A study from a YAML file (keys as :class:`ContextStudyConfig`'s fields) + overrides."""
    return ContextStudyConfig.load(path, **overrides)


def load_context_result(study: ContextStudyConfig, cell: Run) -> dict[str, Any] | None:
    """The run's saved result if it exists for exactly this configuration (same hash)."""
    return study.load_result(cell)


def run_context_cell(study: ContextStudyConfig, cell: Run, progress: bool = False):
    """Train one language model and probe its use of context; write ``result.json``."""
    import lightning as L
    import torch
    from lightning.pytorch.loggers import TensorBoardLogger

    from ..analysis import context_usage
    from ..data import LanguageModelDataModule
    from ..lit import LanguageModelTask, NaNGuard, NonFiniteLossError, PlateauStop
    from ..lit.cli import progress_display
    from ..models import LanguageModel

    start = time.perf_counter()
    out = study.cell_dir(cell)
    spec = study.cell_spec(cell)
    earlier = _earlier_run(out, spec)
    if earlier and earlier.get("stopped_on_plateau"):  # a higher cap changes nothing
        return _raise_cap(study, cell, out, spec, earlier["result"])
    ckpt = earlier["checkpoint"] if earlier else None
    # a fresh run clears a partial run's events and checkpoint; a resumed run adds to them
    fresh_run_dir(out, progress, resuming=ckpt is not None)
    write_json(out / RUN, {"config_hash": study.cell_hash(cell), "spec": spec})
    L.seed_everything(cell.seed, verbose=False)
    encoder, dropout = study.resolve(cell.scheme, cell.rate)
    dm = LanguageModelDataModule(study.corpus, data_dir=study.data_dir,
                                 batch_size=study.batch_size, bptt=study.bptt)  # fmt: skip
    dm.setup("fit")
    model = LanguageModel(dm.vocab_size, encoder=encoder, dropout=dropout, **spec["model"])
    task = LanguageModelTask(model, optimizer=study.optimizer, lr=study.lr)
    logger = TensorBoardLogger(str(out), name="", version="", default_hp_metric=False)
    plateau = PlateauStop(study.patience, study.plateau_factor) if study.patience else None
    validate = ({"val_check_interval": study.val_every, "check_val_every_n_epoch": None}
                if study.val_every else {"limit_val_batches": 0})  # fmt: skip
    trainer = L.Trainer(
        max_steps=study.steps, max_epochs=-1, logger=logger, enable_checkpointing=False,
        gradient_clip_val=study.gradient_clip_val, enable_progress_bar=progress,
        enable_model_summary=False, num_sanity_val_steps=0, **validate,
        callbacks=[NaNGuard(save_every_n_steps=0)] + ([plateau] if plateau else [])
        + ([progress_display([], True)] if progress else []),  # plain lines off a terminal
        default_root_dir=str(out),
        log_every_n_steps=max(1, min(50, study.steps // 30)),
    )  # fmt: skip
    status, probe, effective, training = "ok", {}, {}, {}
    if ckpt is not None and plateau is not None and earlier.get("history") is not None:
        # a checkpoint from before PlateauStop kept its state: take it up from the record
        weights = out / MODEL
        plateau.restore(
            earlier["history"],
            torch.load(weights, weights_only=True) if weights.is_file() else None,
        )
    try:
        trainer.fit(task, dm, ckpt_path=ckpt)
    except NonFiniteLossError as err:
        status = f"diverged: {err}"
    if status == "ok":
        training = {"steps": trainer.global_step}
        if ckpt is not None:
            training["resumed_from_step"] = earlier["step"]
        if plateau is not None:  # the best validation's weights are back in the model
            training.update(best_val_loss=plateau.best, best_step=plateau.best_step,
                            stopped_step=plateau.stopped_step,
                            converged=plateau.stopped_step is not None,
                            history=[list(h) for h in plateau.history])  # fmt: skip
        if study.val_every:  # the whole test split, carried state, as a PTB paper reports it
            training["test_loss"] = float(trainer.test(task, dm, verbose=False)[0]["test/loss"])
        stream = dm.corpus["test"]
        probe = context_usage(model, stream, study.distances, modes=study.modes,
                              window=study.window, n_targets=study.n_targets, seed=0,
                              bootstrap=study.bootstrap, threshold=study.context_threshold,
                              per_target=True)  # fmt: skip
        effective = probe.pop("effective")
        # for paired comparisons between runs (same targets) and probing again later
        torch.save(probe.pop("per_target"), out / TARGETS)
        torch.save(model.state_dict(), out / MODEL)
        hp = {"scheme": cell.scheme, "rate": cell.rate or 0.0, "seed": cell.seed}
        final = {f"final/effective_context_{m}": math.nan if v is None else float(v)
                 for m, v in effective.items()}  # fmt: skip
        final["final/loss"] = probe["loss"]
        logger.log_hyperparams(hp, final)
        for m, inc in probe["increase"].items():
            for d, v in sorted(inc.items()):
                logger.experiment.add_scalar(f"final/context_increase_{m}", v, global_step=d)
        logger.experiment.flush()
    result = {
        "cell": {"scheme": cell.scheme, "rate": cell.rate, "seed": cell.seed,
                 "label": cell.label},
        "config_hash": study.cell_hash(cell), "spec": spec, "status": status, "probe": probe,
        "effective_context": effective,
        # a resumed run's time includes the finished run's it went on from
        "seconds": time.perf_counter() - start + (earlier or {}).get("seconds", 0.0),
    }  # fmt: skip
    if training:
        result["training"] = training
    write_json(out / "result.json", result)
    return result


def _earlier_run(out: Path, spec: dict[str, Any]) -> dict[str, Any] | None:
    """What an earlier run of this cell left to build on, or None.

    The checkpoint in ``out`` (NaNGuard's last good one, written at every epoch's end and
    when training ends) belongs to the run that started last: ``run.json`` names it (a run
    from before ``run.json`` existed: its ``result.json``). Training resumes from it to the
    new cap when that run had this cell's settings but for a ``steps`` cap no higher than
    this one's: a run killed before its result, or a finished run under a raised cap. A
    finished run that stopped on its plateau (below its cap, or at it) would have stopped there
    under any higher cap: its result stands as this cell's (``stopped_on_plateau``). The checkpoint
    holds the RNG states, the carried state and the data position (the tasks' exact resume)
    and PlateauStop's state, so on CPU the resumed run is the uninterrupted run bit for bit
    (tests/test_context_convergence.py).
    """
    import torch

    plain = json.loads(json.dumps(spec, default=str))  # as a saved spec reads back
    started, result = _read_json(out / RUN), _read_json(out / "result.json")
    started = started or result
    prev = (started or {}).get("spec") or {}
    if {k: v for k, v in prev.items() if k != "steps"} != {
        k: v for k, v in plain.items() if k != "steps"
    }:
        return None  # nothing started here, or with other settings: start afresh
    if prev["steps"] > plain["steps"]:
        return None  # a lower cap than the earlier run's: train again from the start
    # the last started run's result, if it finished (a result of an older run does not count)
    finished = result if result is not None and result.get("spec") == prev else None
    if finished is not None and finished.get("status") != "ok":
        return None
    training = (finished or {}).get("training") or {}
    # stopped on its plateau, below its cap or at it: a higher cap sees the same validations
    # and stops at the same step (resuming would train on past the stop)
    if training.get("converged"):
        return {"stopped_on_plateau": True, "result": finished}
    ckpt = out / "checkpoints" / "last_good.ckpt"
    if not ckpt.is_file():
        return None
    # mmap: the step without reading the weights and optimiser state (Lightning reads them)
    step = torch.load(ckpt, map_location="cpu", weights_only=False, mmap=True)["global_step"]
    return {"checkpoint": ckpt, "step": step, "history": training.get("history"),
            "seconds": (finished or {}).get("seconds", 0.0)}  # fmt: skip


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _raise_cap(study: ContextStudyConfig, cell: Run, out: Path, spec, result) -> dict[str, Any]:
    """The earlier run's result under this cell's settings: the same run, since its plateau
    stop (at or below its cap) holds under any higher cap."""
    training = {**result["training"], "cap_raised_from": result["spec"]["steps"]}
    result = {**result, "config_hash": study.cell_hash(cell), "spec": spec, "training": training}
    write_json(out / "result.json", result)
    return result


def run_context_study(
    study: ContextStudyConfig, progress: bool = True, only: set[int] | None = None
) -> list[dict[str, Any]]:
    """Run every unfinished cell in this process (``only``: of these cell numbers); return all
    finished results."""
    from tqdm.auto import tqdm

    cells = study.cells()
    todo = [c for i, c in enumerate(cells)
            if (only is None or i in only) and load_context_result(study, c) is None]  # fmt: skip
    print(f"context study {study.name}: {len(cells)} runs, {len(todo)} to run; results under "
          f"{study.root}", file=sys.stderr, flush=True)  # fmt: skip
    from .runner import on_terminal

    # a bar only on a terminal; in a log each run is one plain line (bar.write prints it)
    bar = tqdm(total=len(todo), desc=study.name, unit="run",
               disable=not (progress and on_terminal()) or not todo)  # fmt: skip
    for cell in todo:
        r = run_context_cell(study, cell, progress=progress)
        eff = ", ".join(f"{m} {v}" for m, v in r["effective_context"].items())
        loss = r["probe"].get("loss", math.nan)
        bar.write(f"{cell}: {r['status'][:60]}; loss {loss:.3f}; effective context {eff} "
                  f"({r['seconds']:.0f} s)")  # fmt: skip
        bar.update()
    bar.close()
    return [r for c in cells if (r := load_context_result(study, c)) is not None]


def write_context_report(study: ContextStudyConfig, results: list[dict[str, Any]]):
    """``context.csv``, ``context.md``, ``context_usage.png`` and a TensorBoard summary."""
    import csv

    from ..analysis import mean_ci

    root = study.root
    root.mkdir(parents=True, exist_ok=True)
    ok = [r for r in results if r["status"] == "ok"]
    rows = [{"label": r["cell"]["label"], "scheme": r["cell"]["scheme"], "rate": r["cell"]["rate"],
             "seed": r["cell"]["seed"], "config_hash": r["config_hash"], "mode": m, "distance": d,
             "increase": v, "stderr": _get(r["probe"]["stderr"][m], d),
             "loss": r["probe"]["loss"]}
            for r in ok for m, inc in r["probe"]["increase"].items()
            for d, v in inc.items()]  # fmt: skip
    paths = {"csv": root / "context.csv", "markdown": root / "context.md"}
    with paths["csv"].open("w", newline="") as f:
        cols = ["label", "scheme", "rate", "seed", "config_hash", "mode", "distance",
                "increase", "stderr", "loss"]  # fmt: skip
        writer = csv.DictWriter(f, fieldnames=cols)
        writer.writeheader()
        writer.writerows(rows)
    labels = list(dict.fromkeys(r["cell"]["label"] for r in ok))
    by_label = group_by(ok, lambda r: r["cell"]["label"])
    # one seed with bootstrap intervals: those are the intervals (over targets, not seeds)
    boot = len(study.seeds) == 1 and all("ci" in r["probe"] for r in ok)
    trained = all("training" in r for r in ok) and bool(ok)
    spread = (f"[low, high]: 95% percentile bootstrap intervals over the probed targets "
              f"({study.bootstrap} resamples; one seed)" if boot
              else "Mean ± 95% interval over seeds")  # fmt: skip
    lines = [f"# {study.name}: context usage on {study.corpus}", "",
             f"{len(ok)} runs, {study.steps} steps each" + (
                 f" at most (validation every {study.val_every} steps; the learning rate "
                 f"times {study.plateau_factor:g} at each validation without a new best, "
                 f"{study.patience} in a row stop the run; the best validation's weights are "
                 "tested and probed)" if study.patience else "")
             + f", model {study.model}. Loss increase "
             "(nats) when the context beyond d is perturbed, on the same targets "
             f"(window {study.window}, {study.n_targets} targets); effective context: smallest d "
             f"beyond which the increase stays below {study.context_threshold:.0%} of the "
             f"loss. {spread}.", ""]  # fmt: skip
    train_cols = ["steps", "best val ppl", "test ppl"] if trained else []
    lines += ["| scheme | " + "".join(f"{c} | " for c in train_cols) + "probe loss | "
              + " | ".join(f"eff. context ({m})" for m in study.modes) + " |",
              "|---|" + "---|" * (len(train_cols) + 1 + len(study.modes))]  # fmt: skip
    for label in labels:
        group = by_label[label]
        row = [label]
        if trained:
            row.append(", ".join(_steps_text(r["training"]) for r in group))
            for key in ("best_val_loss", "test_loss"):
                vals = [math.exp(r["training"][key]) for r in group if key in r["training"]]
                row.append(format_ci(*mean_ci(vals), digits=1) if vals else "–")
        row.append(_interval_text(_interval(group, boot, lambda r: r["probe"]["loss"],
                                            lambda r: r["probe"]["loss_ci"]), boot, 3))  # fmt: skip
        for m in study.modes:
            vals = [r["effective_context"][m] for r in group]
            if boot:
                lo, hi = group[0]["probe"]["effective_ci"][m]
                row.append(f"{_d_text(vals[0], study)} [{_d_text(lo, study)}, "
                           f"{_d_text(hi, study)}]")  # fmt: skip
            elif any(v is not None for v in vals):
                row.append(format_ci(*mean_ci([math.nan if v is None else float(v)
                                               for v in vals]), 1))  # fmt: skip
            else:
                row.append(f"> {max(study.distances)}")
        lines.append("| " + " | ".join(row) + " |")
    for m in study.modes:
        lines += ["", f"Loss increase, {m}:", "",
                  "| scheme | " + " | ".join(f"d={d}" for d in study.distances) + " |",
                  "|---|" + "---|" * len(study.distances)]  # fmt: skip
        for label in labels:
            vals = [_interval_text(_increase(by_label[label], boot, m, d), boot, 3)
                    for d in study.distances]  # fmt: skip
            lines.append(f"| {label} | " + " | ".join(vals) + " |")
    lines += _paired_section(study, ok, labels)
    md = "\n".join(lines) + "\n"
    paths["markdown"].write_text(md)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(study.modes), figsize=(4.2 * len(study.modes), 3.6),
                             squeeze=False)  # fmt: skip
    for ax, m in zip(axes[0], study.modes, strict=True):
        for label in labels:
            stats = [_increase(by_label[label], boot, m, d) for d in study.distances]
            means = [v for v, _, _ in stats]  # asymmetric bars: bootstrap intervals can be
            err = [[_or0(v - lo) for v, lo, _ in stats], [_or0(hi - v) for v, _, hi in stats]]
            ax.errorbar(study.distances, means, yerr=err, marker="o", ms=3, capsize=2,
                        label=label)  # fmt: skip
        ax.set_xscale("log")
        ax.set_xlabel("d (tokens kept intact before the target)")
        ax.set_ylabel("loss increase (nats)")
        ax.set_title(m)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    paths["context_png"] = root / "context_usage.png"
    fig.savefig(paths["context_png"], dpi=120)
    plt.close(fig)
    tensorboard_summary(root, paths, md, images=("context_png",))
    return paths


def _paired_section(study: ContextStudyConfig, ok: list[dict], labels: list[str]) -> list[str]:
    """Each run minus the reference run (``none``'s, or the first scheme's) on the same
    targets, with paired bootstrap intervals: one seed, runs that saved their per-target probe
    (``targets.pt``); nothing otherwise."""
    import torch

    from ..analysis import compare_probes

    if len(study.seeds) != 1 or len(labels) < 2:
        return []
    paths = {r["cell"]["label"]: study.cell_dir(Run(r["cell"]["scheme"], r["cell"]["rate"],
                                                    r["cell"]["seed"])) / TARGETS
             for r in ok}  # fmt: skip
    if not all(p.is_file() for p in paths.values()):
        return []
    ref = "none" if "none" in labels else labels[0]
    base = torch.load(paths[ref], weights_only=True)
    n, ds = study.bootstrap or 1000, sorted(study.distances)
    lines = ["", f"Paired against {ref} (the same {study.n_targets} targets): the run's value "
             f"minus {ref}'s, [95% bootstrap interval over the targets, {n} resamples]; * where "
             "the interval excludes 0.", "",
             "| scheme | Δ probe loss | mode | " + " | ".join(f"Δ d={d}" for d in ds) + " |",
             "|---|---|---|" + "---|" * len(ds)]  # fmt: skip
    for label in labels:
        if label == ref:
            continue
        diff = compare_probes(torch.load(paths[label], weights_only=True), base, n)
        for i, m in enumerate(study.modes):
            head = f"| {label} | {_diff_text(diff['loss'])} |" if i == 0 else "| | |"
            lines.append(
                f"{head} {m} | " + " | ".join(_diff_text(diff["increase"][m][d]) for d in ds) + " |"
            )
    return lines


def _diff_text(d: list[float]) -> str:
    mean, lo, hi = d
    star = "*" if lo > 0 or hi < 0 else ""
    return f"{mean:+.3f}{star} [{lo:+.3f}, {hi:+.3f}]"


def _interval(group: list[dict], boot: bool, value, ci) -> tuple[float, float, float]:
    """``(estimate, low, high)``: the one seed's bootstrap interval over its probed targets
    (``boot``), else the mean over the runs (seeds) with its 95% t-interval."""
    if boot:
        (r,) = group
        low, high = ci(r)
        return value(r), low, high
    from ..analysis import mean_ci

    mean, half = mean_ci([value(r) for r in group])
    return mean, mean - half, mean + half


def _increase(group: list[dict], boot: bool, mode: str, d: int) -> tuple[float, float, float]:
    """:func:`_interval` of the loss increase at ``mode`` and ``d``."""
    return _interval(group, boot, lambda r: _get(r["probe"]["increase"][mode], d),
                     lambda r: _get(r["probe"]["ci"][mode], d))  # fmt: skip


def _interval_text(interval: tuple[float, float, float], boot: bool, digits: int) -> str:
    """``v [low, high]`` for a bootstrap interval, ``mean ± half`` for one over seeds."""
    v, low, high = interval
    if boot:
        return f"{v:.{digits}f} [{low:.{digits}f}, {high:.{digits}f}]"
    return format_ci(v, (high - low) / 2, digits=digits)


def _or0(x: float) -> float:
    return 0.0 if math.isnan(x) else x


def _d_text(d: int | None, study: ContextStudyConfig) -> str:
    """An effective context; None: beyond the largest probed distance."""
    return f"> {max(study.distances)}" if d is None else str(d)


def _steps_text(training: dict[str, Any]) -> str:
    """Steps trained, and whether the run stopped on its plateau (converged) or at the cap."""
    if "converged" not in training:
        return str(training["steps"])
    how = "converged" if training["converged"] else "cap"
    history = training.get("history") or []
    # how far the rate fell says how near a run stopped at the cap was to its plateau
    lr = (f", lr {history[0][2]:.3g} → {history[-1][2]:.3g}"
          if history and history[-1][2] != history[0][2] else "")  # fmt: skip
    return f"{training['steps']} ({how}, best at {training['best_step']}{lr})"


def _get(increase: dict, d: int):
    """``increase[d]``: JSON turns the int keys into strings; a run's own result keeps ints."""
    return increase[str(d)] if str(d) in increase else increase[d]
