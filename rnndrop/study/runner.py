"""Running a study: one Lightning run per cell, skipping finished cells, N worker processes."""

from __future__ import annotations

import math
import os
import signal
import sys
import time
import warnings
from typing import Any

import torch

from .base import RESULT
from .common import fresh_run_dir, machine, write_json
from .config import LongRangeRun, StudyConfig

__all__ = ["StudyInterrupted", "is_finished", "load_result", "run_cell", "run_study"]


def cell_record(cell: LongRangeRun) -> dict[str, Any]:
    """The cell's identity as a ``result.json`` records it."""
    return {"scheme": cell.scheme, "rate": cell.rate, "distance": cell.distance,
            "seed": cell.seed, "label": cell.label, "task": cell.task}  # fmt: skip


def load_result(study: StudyConfig, cell: LongRangeRun) -> dict[str, Any] | None:
    """The cell's saved result (whatever its hash), or None if absent or unreadable.

    The result is reported as ``cell``, the cell that asks for it: the hash leaves out the
    task label, so a result written under another label (a task renamed in the YAML, or a
    cell copied from another study with the same hash) would otherwise pair with nothing.
    """
    result = study.load_result(cell, any_hash=True)
    if result is not None:
        result["cell"] = cell_record(cell)
    return result


def is_finished(study: StudyConfig, cell: LongRangeRun) -> bool:
    """True if the cell has a result for exactly this configuration (same hash)."""
    return study.load_result(cell) is not None


def _step_bar(cell: LongRangeRun, steps: int, position: int):
    """A one-line training-step bar for a cell run in a worker (Lightning's own bar would
    fight the other workers' for the terminal)."""
    from lightning.pytorch.callbacks import Callback
    from tqdm.auto import tqdm

    class StepBar(Callback):
        def on_train_start(self, trainer, pl_module) -> None:
            self.bar = tqdm(total=steps, desc=str(cell), unit="step", position=position,
                            leave=False, dynamic_ncols=True)  # fmt: skip

        def on_train_batch_end(self, trainer, *args) -> None:
            self.bar.update(trainer.global_step - self.bar.n)

        def on_train_end(self, trainer, pl_module) -> None:
            self.bar.close()

    return StepBar()


def run_cell(
    study: StudyConfig,
    cell: LongRangeRun,
    *,
    progress: bool = False,
    bar_position: int | None = None,
) -> dict[str, Any]:
    """Train and evaluate one cell; write ``result.json`` into its run directory.

    ``progress`` shows Lightning's progress bar and logs; ``bar_position`` (workers) a
    one-line step bar at that terminal row instead.
    """
    import lightning as L
    from lightning.pytorch.loggers import TensorBoardLogger

    from ..analysis import evaluate_sequence_model, gradient_through_time
    from ..data import SyntheticDataModule
    from ..lit import NaNGuard, NonFiniteLossError, SequenceTask
    from ..lit.cli import progress_display
    from ..models import RECURRENT_CELLS, SequenceModel

    start = time.perf_counter()
    study = study.for_task(cell.task)  # a study of several tasks: this cell's task
    out = study.cell_dir(cell)
    fresh_run_dir(out, progress)
    L.seed_everything(cell.seed, verbose=False)
    encoder, dropout = study.resolve(cell.scheme, cell.rate)
    finite = study.train_size is not None
    # unlimited: one pass over steps * batch_size distinct sequences (fresh every step);
    # finite: epochs over the first train_size sequences of the same seeded stream
    dm = SyntheticDataModule(
        study.task, cell.distance, study.task_args,
        train_size=study.train_size if finite else study.steps * study.batch_size,
        val_size=study.eval_size, test_size=study.eval_size, batch_size=study.batch_size,
        seed=cell.seed,
    )  # fmt: skip
    recurrent = encoder in RECURRENT_CELLS
    model = SequenceModel(
        dm.input_kind, vocab_size=dm.vocab_size, input_size=dm.input_size,
        output_size=dm.output_size, target=dm.target, encoder=encoder, dropout=dropout,
        **study.model_for(cell.scheme),
    )  # fmt: skip
    task = SequenceTask(
        model,
        loss=dm.loss,
        baseline_loss=dm.baseline_loss,
        optimizer=study.optimizer,
        lr=study.lr,
        reliability_diagrams=False,
    )  # a figure per validation: seconds per cell
    curve = _LearningCurve()
    logger = TensorBoardLogger(str(out), name="", version="", default_hp_metric=False)
    trainer = L.Trainer(
        max_steps=study.steps, max_epochs=-1 if finite else 1,
        # finite: validate every val_every steps across epochs (an epoch may be one batch)
        check_val_every_n_epoch=None if finite else 1,
        val_check_interval=min(study.val_every, study.steps),
        logger=logger, enable_checkpointing=False, gradient_clip_val=study.gradient_clip_val,
        enable_progress_bar=progress, enable_model_summary=False, num_sanity_val_steps=0,
        callbacks=[NaNGuard(save_every_n_steps=0), curve]
        + ([_step_bar(cell, study.steps, bar_position)] if bar_position is not None else [])
        # as `rnndrop fit`: a bar on a terminal, plain lines in a log (no redraws, no escapes)
        + ([progress_display([], True)] if progress and bar_position is None else []),
        default_root_dir=str(out),
        log_every_n_steps=max(1, min(50, study.steps // 30)),
    )  # fmt: skip
    status = "ok"
    try:
        with warnings.catch_warnings():
            # a small fixed set has fewer batches per epoch than the logging interval; Lightning
            # warns, but it counts logging steps across epochs, so nothing is lost
            warnings.filterwarnings("ignore", message=".*smaller than the logging interval")
            trainer.fit(task, dm)
    except NonFiniteLossError as err:  # record it, keep the sweep going
        status = f"diverged: {err}"
    metrics: dict[str, float] = {}
    train_metrics: dict[str, float] = {}
    grads: dict[str, dict[int, float]] = {}
    if status == "ok":
        test = dm.test_dataloader()
        metrics = evaluate_sequence_model(model, test, task=dm.task, mc_samples=study.mc_samples)
        x, y = next(iter(test))
        ks = study.grad_distances
        if ks is not None:
            ks = [k for k in ks if k < x.shape[1]]
        grads["input"] = gradient_through_time(model, x, y, ks)
        if recurrent:  # LSTM or GRU: ‖∂L/∂h‖ through the hidden state
            ks_state = None if ks is None else [k for k in ks if k >= 1]
            grads["state"] = gradient_through_time(model, x, y, ks_state, wrt="state")
        # after the held-out measurements, which therefore stay those of earlier results
        train_metrics = evaluate_sequence_model(
            model, train_subset(dm, study.eval_size, study.batch_size), task=dm.task
        )
        metrics_train = {"train_" + k: v for k, v in train_metrics.items()}
        _log_final(logger, cell, encoder, {**metrics, **metrics_train}, grads)
    result = {
        "cell": cell_record(cell),
        "config_hash": study.cell_hash(cell), "spec": study.cell_spec(cell), "status": status,
        "task": {"name": study.task, "baseline_loss": dm.baseline_loss, "loss": dm.loss,
                 "chance": 1.0 / dm.output_size if dm.loss == "cross_entropy" else None},
        "metrics": metrics,
        "train_metrics": train_metrics,
        "regime": {"train_size": study.train_size,
                   "heldout_in_train": heldout_in_train(dm) if finite and status == "ok"
                   else None},
        "curve": curve.points,
        "grad_through_time": {w: {str(k): v for k, v in g.items()} for w, g in grads.items()},
        "seconds": time.perf_counter() - start,
        "machine": machine(),
    }  # fmt: skip
    write_json(out / RESULT, result)
    return result


def train_subset(dm, size: int, batch_size: int):
    """A loader over the first ``size`` training sequences (all of them if fewer): the train
    score. Unlimited regime: sequences the model saw once; finite: the fixed training set."""
    from torch.utils.data import DataLoader, Subset

    train = dm.datasets["train"]
    return DataLoader(Subset(train, range(min(size, len(train)))), batch_size=batch_size)


def heldout_in_train(dm) -> float:
    """The fraction of test sequences equal (input and target) to a training sequence.

    The splits are seeded apart, so a match is a coincidence of a small input space (3 copy
    symbols of 8 have 512 values): the held-out score of such a task partly measures recall
    of the training set, and this says how much.
    """

    def key(item) -> bytes:
        x, y = item
        return x.numpy().tobytes() + y.numpy().tobytes()

    train = {key(item) for item in dm.datasets["train"]}
    test = dm.datasets["test"]
    return sum(key(item) in train for item in test) / len(test)


def _LearningCurve():
    """A callback recording ``{step, loss, acc}`` after every validation: the learning curve
    the budget-free measures (steps to solve, area under the curve) are read from."""
    from lightning.pytorch.callbacks import Callback

    class LearningCurve(Callback):
        def __init__(self) -> None:
            self.points: list[dict[str, float]] = []

        def on_validation_end(self, trainer, pl_module) -> None:
            if trainer.sanity_checking:
                return
            m = trainer.callback_metrics
            point = {"step": int(trainer.global_step)}
            for key in ("loss", "acc"):
                if f"val/{key}" in m:
                    point[key] = float(m[f"val/{key}"])
            if len(point) > 1 and (not self.points or self.points[-1]["step"] != point["step"]):
                self.points.append(point)

    return LearningCurve()


def _log_final(logger, cell: LongRangeRun, encoder: str, metrics, grads) -> None:
    """Final metrics as hparams (HPARAMS tab) and gradient norm against k as a curve."""
    hp = {"scheme": cell.scheme, "rate": cell.rate if cell.rate is not None else 0.0,
          "distance": cell.distance, "seed": cell.seed, "encoder": encoder}  # fmt: skip
    logger.log_hyperparams(hp, {f"final/{k}": v for k, v in metrics.items()})
    for wrt, norms in grads.items():
        for k, v in sorted(norms.items()):
            if math.isfinite(v):
                logger.experiment.add_scalar(f"final/grad_through_time_{wrt}", v, global_step=k)
    logger.experiment.flush()


_SLOT: dict[str, int | None] = {"row": None}  # this worker's terminal row for its step bar


class StudyInterrupted(Exception):
    """SIGTERM or SIGINT reached the study: workers are stopped, finished cells are kept."""

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message)
        self.signum = signum


def _interrupt(signum, frame) -> None:
    raise StudyInterrupted(signal.Signals(signum).name, signum)


def _die_now(signum, frame) -> None:
    # a worker asked to stop leaves no result: its result.json would be written only after
    # training and evaluation, and a rerun clears its partial TensorBoard events
    os._exit(128 + signum)


def _init_worker(threads: int, slots: Any, bars: bool) -> None:
    torch.set_num_threads(threads)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group: main decides
    signal.signal(signal.SIGTERM, _die_now)  # Lightning's own handler only sets a flag
    if sys.platform.startswith("linux"):  # die with the main process, even if it is SIGKILLed
        import ctypes

        ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    if bars:
        with slots.get_lock():
            slots.value += 1
            _SLOT["row"] = slots.value  # row 0 is the sweep's bar


def _work(job: tuple[StudyConfig, LongRangeRun]) -> dict[str, Any]:
    study, cell = job
    return run_cell(study, cell, bar_position=_SLOT["row"])


def summary_line(result: dict[str, Any]) -> str:
    c, m = result["cell"], result["metrics"]
    if result["status"] != "ok":
        return f"{c['label']} d={c['distance']} seed={c['seed']}: {result['status'][:80]}"
    score = f"acc {m['acc']:.3f}" if "acc" in m else f"mse {m['loss']:.4f}"
    ratio = m["loss"] / result["task"]["baseline_loss"]
    tm = result.get("train_metrics") or {}
    train = ""
    if tm:
        train = f" (train {tm['acc']:.3f})" if "acc" in tm else f" (train {tm['loss']:.4f})"
    return (f"{c['label']} d={c['distance']} seed={c['seed']}: {score}{train}, loss/baseline "
            f"{ratio:.3f} ({result['seconds']:.0f} s)")  # fmt: skip


def run_study(
    study: StudyConfig,
    *,
    workers: int = 1,
    only: list[int] | None = None,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Run every unfinished cell (or the cells numbered ``only``); return all results.

    Finished cells (a ``result.json`` with the same config hash) are skipped, so a killed
    sweep continues where it stopped. ``workers > 1`` runs cells in that many processes,
    each with ``cpu_count // workers`` threads.
    """
    from tqdm.auto import tqdm

    cells = study.cells()
    if only is not None:
        bad = [i for i in only if not 0 <= i < len(cells)]
        if bad:
            raise ValueError(f"cell numbers {bad} out of range: the study has {len(cells)} cells")
        cells = [cells[i] for i in only]
    # seed-major: every cell's first seed before any cell's second, so a sweep stopped early
    # leaves whole seeds, each paired with its baseline
    seeds = {seed: i for i, seed in enumerate(dict.fromkeys(c.seed for c in cells))}
    todo = sorted((c for c in cells if not is_finished(study, c)), key=lambda c: seeds[c.seed])
    print(f"study {study.name}: {len(cells)} cells, {len(cells) - len(todo)} finished, "
          f"{len(todo)} to run, {min(workers, len(todo))} worker(s); results under "
          f"{study.study_root if study.tasks else study.root}",
          file=sys.stderr, flush=True)  # fmt: skip
    workers = max(1, min(workers, len(todo)))
    # bars only on a terminal: in a log (`> log`, SLURM) tqdm's redraws and cursor escapes are
    # noise, so there each finished cell is its summary line alone
    terminal = progress and on_terminal()
    bar = tqdm(total=len(todo), desc=study.name, unit="cell", disable=not terminal or not todo)
    handlers = {s: signal.signal(s, _interrupt) for s in (signal.SIGTERM, signal.SIGINT)}

    def done(result: dict[str, Any]) -> None:
        bar.write(summary_line(result))  # a plain print when the bar is off
        bar.update()

    try:
        if workers <= 1:
            for cell in todo:
                done(run_cell(study, cell, progress=progress))
        else:
            _run_pool(study, todo, workers, terminal, done)
    except StudyInterrupted as err:
        done = sum(is_finished(study, c) for c in cells)
        raise StudyInterrupted(
            f"stopped by {err}: {done} of {len(cells)} cells finished and kept; run the same "
            "command again to continue",
            err.signum,
        ) from None
    finally:
        for s, h in handlers.items():
            signal.signal(s, h)
        bar.close()
    return [r for c in cells if (r := load_result(study, c)) is not None]


def on_terminal() -> bool:
    """True when both output streams are terminals: the rule `rnndrop fit` uses for its bar."""
    return sys.stdout.isatty() and sys.stderr.isatty()


def _run_pool(
    study: StudyConfig, todo: list[LongRangeRun], workers: int, progress: bool, done
) -> None:
    """The cells in ``workers`` spawned processes; an interrupt terminates them all."""
    import multiprocessing as mp

    from ..kernels.cpp import build as _ext

    _ext.load()  # build the loop kernel once here, not in every worker at the same time

    threads = max(1, (os.cpu_count() or 1) // workers)
    ctx = mp.get_context("spawn")
    slots = ctx.Value("i", 0)
    pool = ctx.Pool(workers, _init_worker, (threads, slots, progress))
    try:
        for result in pool.imap_unordered(_work, [(study, c) for c in todo]):
            done(result)
        pool.close()
    except BaseException:
        pool.terminate()  # SIGTERM to every worker: each exits at once, writing nothing
        raise
    finally:
        pool.join()
