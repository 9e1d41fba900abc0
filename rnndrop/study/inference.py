"""Test-time inference under each dropout scheme: weight scaling, MC arithmetic, MC geometric.

``rnndrop study inference --config experiments/inference/delayed_recall.yaml``: for every
scheme x rate x seed, train a small :class:`~rnndrop.models.SequenceModel` on a synthetic
classification task (or reuse the model a previous run saved, when everything that decides
the training is the same), then predict the held-out targets three ways:

- **weight scaling**: one deterministic forward (inverted dropout: every unit at its
  expectation);
- **MC arithmetic**: ``S`` passes with sampled masks, probabilities averaged (Gal &
  Ghahramani 2016);
- **MC geometric**: the same passes, log-probabilities averaged and renormalised (the
  estimate of the normalised geometric ensemble that weight scaling equals exactly for a
  single softmax layer; :func:`rnndrop.analysis.exact_ensemble`).

Each is scored on the targets that test memory (the task's ``memory_mask``) by accuracy, NLL,
ECE and Brier score (:mod:`rnndrop.analysis.inference`, :mod:`rnndrop.analysis.calibration`).
The convergence in ``S``: the largest ``S`` draws are split into ``S_max // S`` disjoint groups
of ``S``, each group aggregated (:func:`rnndrop.analysis.mc_aggregate`) and scored, and the
mean and spread over groups reported for every ``S`` in ``sample_sizes``.

Runs live in ``runs/<name>/<task>/<scheme>/seed=<s>`` (``model.pt``, ``train.json``,
``result.json`` and a TensorBoard run with the training curves, the final scores as
``inference/*`` scalars, the convergence against ``S`` and a reliability diagram); the report
is ``inference.md``, ``inference.csv``, ``convergence.png`` and ``reliability.png`` under
``runs/<name>/<task>``, and a TensorBoard run ``summary``.

Learned dropout rates: after training, :func:`learned_rates` reads the rates of any
learnable-rate dropout (concrete dropout, Gal, Hron & Kendall 2017) from the model: its
``learned_rates()`` method if it has one, else parameters whose names contain ``rate`` or
``logit``. A scheme with such dropout (a ``custom_schemes`` entry) gets them in the report;
the built-in schemes have none.
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import torch

from ..analysis.inference import (
    METHODS,
    SCORES,
    collect_predictions,
    evaluate_inference,
    learned_rates,
)
from .base import V1_DROPOUT_FIELDS, Run, Study, spec_hash
from .common import fresh_run_dir, write_json
from .inference_report import TITLES, write_inference_report

__all__ = [
    "METHODS",
    "InferenceCell",
    "InferenceStudyConfig",
    "collect_predictions",
    "evaluate_inference",
    "learned_rates",
    "load_inference_result",
    "load_inference_study",
    "run_inference_cell",
    "run_inference_study",
    "train_model",
    "write_inference_report",
]

FORMAT = 1

_TRAIN_KEYS = ("task", "task_args", "distance", "model", "steps", "batch_size", "optimizer",
               "lr", "gradient_clip_val", "val_every")  # fmt: skip


InferenceCell = Run  # the name before the studies shared a base class (kept: code imports it)


@dataclass
class InferenceStudyConfig(Study):
    """Schemes x rates x seeds of sequence models on one synthetic classification task, each
    evaluated by weight scaling and by Monte Carlo with both aggregations.

    ``sample_sizes`` are the ``S`` of the convergence curve; the largest is the ``S`` of the
    MC rows of the tables. ``n_bins``: confidence bins for ECE and the reliability diagrams.
    ``threads``: torch's intra-op threads while the study runs; these models are too small to
    gain from more than one, and on a busy machine more threads spin (ten times slower
    measured on a loaded 2-core machine).
    """

    _SETTINGS = "inference-study"
    # the study was born after concrete dropout: its specs hold every field of the time
    _DROPOUT_FIELDS = (*V1_DROPOUT_FIELDS, "concrete", "temperature")

    # the fields of Study (name, schemes, rates, seeds, custom_schemes, model, steps,
    # batch_size, optimizer, lr, gradient_clip_val, out_dir) at its defaults, except these
    name: str = "inference"  # the study's folder under out_dir
    schemes: list[str] = field(default_factory=lambda: ["none", "naive", "variational"])
    model: dict[str, Any] = field(default_factory=lambda: {"hidden_size": 64, "embedding_size": 16})
    task: str = "delayed_recall"  # a classification task of rnndrop.data.synthetic
    task_args: dict[str, Any] = field(default_factory=lambda: {"n_symbols": 4})  # its arguments
    distance: int = 10  # the task's dependency distance
    val_every: int = 500  # validation (TensorBoard curves) every n steps
    eval_size: int = 512  # held-out sequences scored
    eval_batch_size: int = 256
    sample_sizes: list[int] = field(default_factory=lambda: [1, 2, 5, 10, 50])  # S; max: MC rows
    n_bins: int = 15  # confidence bins of ECE and the reliability diagrams
    threads: int | None = 1  # torch threads (None: torch's default); small models: one is best

    def __post_init__(self) -> None:
        from ..data.synthetic import TASKS

        self._check_study(("distance", "steps", "batch_size", "val_every", "eval_size",
                           "eval_batch_size", "n_bins"))  # fmt: skip
        if self.task not in TASKS:
            raise ValueError(f"task must be one of {sorted(TASKS)}, got {self.task!r}")
        if TASKS[self.task].loss != "cross_entropy":
            raise ValueError(f"task {self.task!r} is a regression: the inference study needs "
                             "class probabilities (copy, delayed_recall, "
                             "associative_recall, selective_copy)")  # fmt: skip
        if self.threads is not None and (not isinstance(self.threads, int) or self.threads < 1):
            raise ValueError(f"threads must be an integer >= 1 or null, got {self.threads!r}")
        sizes = self.sample_sizes
        if not sizes or any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in sizes):
            raise ValueError(f"sample_sizes must be integers >= 1, got {sizes}")
        self.sample_sizes = sorted(set(sizes))

    @property
    def mc_samples(self) -> int:
        return max(self.sample_sizes)

    @property
    def root(self) -> Path:
        return Path(self.out_dir) / self.name / self.task

    def train_spec(self, cell: Run) -> dict[str, Any]:
        """Everything that decides the trained model (hashed: a saved model is reused when
        only the evaluation settings change)."""
        encoder, dropout = self.resolve(cell.scheme, cell.rate)
        train = {k: getattr(self, k) for k in _TRAIN_KEYS}
        return {**train, "model": self.model_for(cell.scheme), "format": FORMAT,
                "scheme": cell.scheme, "rate": cell.rate, "seed": cell.seed, "encoder": encoder,
                "dropout": self.dropout_spec(dropout)}  # fmt: skip

    def cell_spec(self, cell: Run) -> dict[str, Any]:
        """The training's spec and the evaluation settings (the run's hash)."""
        evaluation = {k: getattr(self, k) for k in ("eval_size", "sample_sizes", "n_bins")}
        return {**self.train_spec(cell), "eval": evaluation}

    def train_hash(self, cell: Run) -> str:
        """The hash of :meth:`train_spec`: a saved model with it is reused."""
        return spec_hash(self.train_spec(cell))


def load_inference_study(path: str | Path | None = None, **overrides: Any) -> InferenceStudyConfig:
    """A study from a YAML file (keys as :class:`InferenceStudyConfig`'s fields) + overrides."""
    return InferenceStudyConfig.load(path, **overrides)


def load_inference_result(study: InferenceStudyConfig, cell: Run) -> dict[str, Any] | None:
    """The run's saved result if it exists for exactly this configuration (same hash)."""
    return study.load_result(cell)


# ---- running --------------------------------------------------------------------------------


class Trained(NamedTuple):
    """What :func:`train_model` returns."""

    model: Any  # the SequenceModel, trained or reloaded
    data: Any  # its SyntheticDataModule (the test split is the study's held-out set)
    logger: Any  # the run's TensorBoardLogger
    info: dict[str, Any]  # train.json: train_hash, spec, status, seconds
    reused: bool  # True if the model a previous run saved was loaded instead of trained


def train_model(
    study: InferenceStudyConfig,
    cell: Run,
    *,
    progress: bool = False,
    customize: Callable[[Any], None] | None = None,
) -> Trained:
    """Train the run's model, or load the one a previous run saved for the same training.

    The study's training, for the study and for scripts that need its models
    (``scripts/ensemble_demo.py``). ``customize(model)`` changes the freshly built model
    before it is trained or loaded (a different head, say); a saved model is recognised by the
    run's :meth:`~InferenceStudyConfig.train_hash` alone, so give a customised model a study
    (an ``out_dir`` or ``name``) of its own.
    """
    from lightning.pytorch.loggers import TensorBoardLogger

    from ..data import SyntheticDataModule

    out = study.cell_dir(cell)
    out.mkdir(parents=True, exist_ok=True)
    dm = SyntheticDataModule(
        study.task, study.distance, study.task_args, train_size=study.steps * study.batch_size,
        val_size=study.eval_size, test_size=study.eval_size, batch_size=study.batch_size,
        eval_batch_size=study.eval_batch_size, seed=cell.seed,
    )  # fmt: skip
    logger = TensorBoardLogger(str(out), name="", version="", default_hp_metric=False)
    model, info, reused = _train(study, cell, dm, logger, progress, customize)
    return Trained(model, dm, logger, info, reused)


def _train(study: InferenceStudyConfig, cell: Run, dm, logger, progress: bool, customize=None):
    """Train the cell's model, or load the one a previous run saved for the same training."""
    import lightning as L

    from ..lit import NaNGuard, NonFiniteLossError, SequenceTask
    from ..lit.cli import progress_display
    from ..models import SequenceModel

    out = study.cell_dir(cell)
    spec = study.train_spec(cell)
    encoder = spec["encoder"]
    _, dropout = study.resolve(cell.scheme, cell.rate)
    L.seed_everything(cell.seed, verbose=False)
    model = SequenceModel(dm.input_kind, vocab_size=dm.vocab_size, input_size=dm.input_size,
                          output_size=dm.output_size, target=dm.target, encoder=encoder,
                          dropout=dropout, **spec["model"])  # fmt: skip
    if customize is not None:
        customize(model)
    try:
        saved = json.loads((out / "train.json").read_text())
    except (OSError, json.JSONDecodeError):
        saved = {}
    if saved.get("train_hash") == study.train_hash(cell) and (out / "model.pt").is_file():
        model.load_state_dict(torch.load(out / "model.pt", weights_only=True))
        return model, saved, True
    fresh_run_dir(out, progress)
    start = time.perf_counter()
    # no diagram per validation: the study draws its own from the final predictions
    task = SequenceTask(model, loss=dm.loss, baseline_loss=dm.baseline_loss,
                        optimizer=study.optimizer, lr=study.lr,
                        reliability_diagrams=False)  # fmt: skip
    trainer = L.Trainer(
        max_steps=study.steps, max_epochs=1, val_check_interval=min(study.val_every, study.steps),
        logger=logger, enable_checkpointing=False, gradient_clip_val=study.gradient_clip_val,
        enable_progress_bar=progress, enable_model_summary=False, num_sanity_val_steps=0,
        callbacks=[NaNGuard(save_every_n_steps=0)]
        + ([progress_display([], True)] if progress else []),  # plain lines off a terminal
        default_root_dir=str(out),
        log_every_n_steps=max(1, min(50, study.steps // 30)),
    )  # fmt: skip
    status = "ok"
    try:
        trainer.fit(task, dm)
    except NonFiniteLossError as err:
        status = f"diverged: {err}"
    info = {"train_hash": study.train_hash(cell), "spec": spec, "status": status,
            "seconds": time.perf_counter() - start}  # fmt: skip
    if status == "ok":
        torch.save(model.state_dict(), out / "model.pt")
    write_json(out / "train.json", info)
    return model, info, False


def run_inference_cell(
    study: InferenceStudyConfig, cell: Run, progress: bool = False
) -> dict[str, Any]:
    """Train (or reuse) one model and compare its test-time inferences; write ``result.json``."""
    start = time.perf_counter()
    out = study.cell_dir(cell)
    model, dm, logger, info, reused = train_model(study, cell, progress=progress)
    evaluation: dict[str, Any] = {}
    rates: dict[str, float] = {}
    if info["status"] == "ok":
        torch.manual_seed(cell.seed)  # the MC draws, reproducible
        scaled, sampled, target = collect_predictions(model, dm.test_dataloader(),
                                                      study.mc_samples, task=dm.task)  # fmt: skip
        evaluation = evaluate_inference(scaled, sampled, target, sample_sizes=study.sample_sizes,
                                        n_bins=study.n_bins)  # fmt: skip
        rates = learned_rates(model)
        _log_cell(logger, study, cell, evaluation, rates, scaled, sampled, target)
    result = {
        "cell": {"scheme": cell.scheme, "rate": cell.rate, "seed": cell.seed,
                 "label": cell.label},
        "config_hash": study.cell_hash(cell), "train_hash": study.train_hash(cell),
        "spec": study.cell_spec(cell), "status": info["status"], "reused_model": reused,
        "train_seconds": info.get("seconds", math.nan), "evaluation": evaluation,
        "learned_rates": rates, "chance": 1.0 / dm.output_size,
        "seconds": time.perf_counter() - start,
    }  # fmt: skip
    write_json(out / "result.json", result)
    return result


def _log_cell(logger, study, cell, evaluation, rates, scaled, sampled, target) -> None:
    """Final scores, the convergence in S and a reliability diagram, to the cell's TensorBoard."""
    from ..analysis import Calibration, mc_aggregate, reliability_diagram

    w = logger.experiment
    for method, scores in evaluation["methods"].items():
        for k in SCORES:
            w.add_scalar(f"inference/{method}/{k}", scores[k], global_step=study.steps)
    for agg, curve in evaluation["convergence"].items():
        for s, scores in curve.items():
            for k in ("acc", "nll"):
                w.add_scalar(f"inference_convergence/mc_{agg}_{k}", scores[k][0], global_step=s)
    for site, rate in rates.items():
        w.add_scalar(f"inference/learned_rate/{site}", rate, global_step=study.steps)
    bins = {}
    draws = sampled[: study.mc_samples]
    preds = {"weight scaling": scaled.float().log_softmax(-1),
             "MC arithmetic": mc_aggregate(draws, "arithmetic", log=True),
             "MC geometric": mc_aggregate(draws, "geometric", log=True)}  # fmt: skip
    for name, logp in preds.items():
        m = Calibration(n_bins=study.n_bins)
        m.update(logp, target, log=True)
        bins[name] = m.reliability()
    fig = reliability_diagram(bins, title=str(cell))
    w.add_figure("inference/reliability", fig, global_step=study.steps)  # closes the figure
    hp = {"scheme": cell.scheme, "rate": cell.rate or 0.0, "seed": cell.seed}
    final = {f"final/{m}_{k}": v[k] for m, v in evaluation["methods"].items() for k in SCORES}
    logger.log_hyperparams(hp, final)
    w.flush()


def run_inference_study(
    study: InferenceStudyConfig, progress: bool = True, only: set[int] | None = None
) -> list[dict[str, Any]]:
    """Run every unfinished cell in this process (``only``: of these cell numbers); return all
    finished results."""
    from tqdm.auto import tqdm

    cells = study.cells()
    todo = [c for i, c in enumerate(cells)
            if (only is None or i in only) and load_inference_result(study, c) is None]  # fmt: skip
    print(f"inference study {study.name}: {len(cells)} runs, {len(todo)} to run; results under "
          f"{study.root}", file=sys.stderr, flush=True)  # fmt: skip
    from .runner import on_terminal

    # a bar only on a terminal; in a log each run is one plain line (bar.write prints it)
    bar = tqdm(total=len(todo), desc=study.name, unit="run",
               disable=not (progress and on_terminal()) or not todo)  # fmt: skip
    threads = torch.get_num_threads()
    if study.threads is not None:
        torch.set_num_threads(study.threads)
    try:
        for cell in todo:
            r = run_inference_cell(study, cell, progress=progress)
            bar.write(_summary_line(r), file=sys.stderr)
            bar.update()
    finally:
        torch.set_num_threads(threads)
        bar.close()
    return [r for c in cells if (r := load_inference_result(study, c)) is not None]


def _summary_line(r: dict[str, Any]) -> str:
    c = r["cell"]
    if r["status"] != "ok":
        return f"{c['label']} seed={c['seed']}: {r['status'][:80]}"
    m = r["evaluation"]["methods"]
    parts = ", ".join(f"{TITLES[k]} acc {m[k]['acc']:.3f} nll {m[k]['nll']:.3f}"
                      for k in METHODS)  # fmt: skip
    how = "reused model" if r["reused_model"] else f"trained in {r['train_seconds']:.0f} s"
    return f"{c['label']} seed={c['seed']}: {parts} ({how}, {r['seconds']:.0f} s)"
