"""``rnndrop fit|validate|test``: LightningCLI over the tasks and data modules.

    rnndrop fit --config experiments/ptb/zaremba_small.yaml
    rnndrop fit --config experiments/synthetic/copy.yaml \
        --model.init_args.model.dropout.recurrent 0.3
    rnndrop fit --config experiments/synthetic/base.yaml \
        --config experiments/synthetic/copy.yaml \
        --model.init_args.model.encoder gru --model.init_args.model.dropout variational

A config picks a task (``model.class_path``: ``rnndrop.lit.LanguageModelTask`` or
``rnndrop.lit.SequenceTask``) and a data module (``data.class_path``); without them it
trains an LSTM on delayed recall. The model's ``encoder`` is ``lstm``, ``gru`` or
``transformer``; its ``dropout`` is anything :func:`rnndrop.config.as_dropout` takes: a dict
of :class:`~rnndrop.config.RecurrentDropout` fields, a preset name (``dropout: variational``),
a preset with arguments (``dropout: {preset: variational, p: 0.3}``) or a float. What the
model must know about the data (vocabulary size, input size, classes, loss, memoryless
baseline) is linked from the data module.
Where outputs go: everything a run writes is under the trainer's root dir,
``--trainer.default_root_dir`` (default ``runs``, relative to the current directory, as
Lightning reads it): TensorBoard events, ``hparams.yaml`` and the resolved ``config.yaml`` in
``ROOT/<logger name>/version_<n>/``, checkpoints in its ``checkpoints/``. A relative output path
in a config (the logger's ``save_dir``, ``checkpoint.dirpath``) is taken relative to the root
dir; an absolute one is used as it is. Checkpoints: ``last.ckpt`` and the best by the monitored
validation metric (``checkpoint.monitor``, default ``val/loss``) are kept;
``--checkpoint.every_n_train_steps N`` adds mid-epoch saves (the ``checkpoint`` group is
Lightning's ``ModelCheckpoint``; ``--trainer.enable_checkpointing false`` turns it off).

User errors (a bad key or value, in a file or on the command line; a missing or corrupt
corpus; a trainer setting Lightning rejects; a ``--ckpt_path`` that is missing, torn, not a
checkpoint, of another task or model, from a newer rnndrop, or contradicted by an explicit
setting) exit with code 2 and one ``error:`` line naming the problem, where it was set and the
fix, and leave no empty run directory behind.

Faults (docs/training.md, "Faults: what survives what"): checkpoints are written atomically;
SIGTERM saves ``last.ckpt`` at the next step boundary and exits with 143; a save that fails (a
full disk) keeps the previous checkpoint and exits with 1 and one line.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path
from typing import Any, NoReturn

import lightning as L
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from ..runtime import tune_allocator  # also its old home, rnndrop.lit.cli.tune_allocator
from .base import Task
from .callbacks import Preemption
from .checkpoints import RESUMABLE, CheckpointError, CheckpointSaveError, conflicts, read_checkpoint
from .errors import _sources, cli_spelling, fail, set_argv, summarize

__all__ = ["FinalValidation", "RnndropArgumentParser", "RnndropCLI", "main"]

#: the trainer's root dir when none is given (relative to the current directory)
DEFAULT_ROOT = "runs"

#: the checkpoint group's defaults: last.ckpt plus the best by validation loss (both tasks
#: log ``val/loss``; the language model's ``val/ppl`` is its exponential)
CHECKPOINT_DEFAULTS = {
    "monitor": "val/loss",
    "mode": "min",
    "save_top_k": 1,
    "save_last": True,
    "filename": "best-{epoch}-{step}",
}

# data module attribute -> where it goes in the chosen task; links whose target the chosen
# classes lack are skipped
LINKS = {
    "vocab_size": "model.init_args.model.init_args.vocab_size",
    "input_kind": "model.init_args.model.init_args.input_kind",
    "input_size": "model.init_args.model.init_args.input_size",
    "output_size": "model.init_args.model.init_args.output_size",
    "target": "model.init_args.model.init_args.target",
    "loss": "model.init_args.loss",
    "baseline_loss": "model.init_args.baseline_loss",
}


class FinalValidation(Callback):
    """Validate after the last step when ``max_steps`` ends training mid-epoch.

    Lightning stops a ``max_steps`` run without validating unless the step happens to end an
    epoch, so the last logged ``val/*`` would belong to older weights and ``last.ckpt`` would
    miss the final steps. Asking the loop to stop at that step makes Lightning validate first
    (as it does for early stopping); the checkpoint callback then saves after that validation.
    """

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if 0 < trainer.max_steps <= trainer.global_step:
            trainer.should_stop = True


def progress_display(callbacks: list, enabled: bool | None) -> Callback | None:
    """The progress display: a bar on a terminal, plain periodic lines in a log file.

    Lightning's bar redraws with carriage returns every step, which fills a SLURM or CI log
    (71 KB for 300 steps) and reads the logged metrics (a host sync on a GPU) every step. On
    a terminal the bar refreshes every 10 steps; elsewhere :class:`LineProgress` writes a line
    every 100 steps or 60 s. None when progress is off or the user chose a display.
    """
    from lightning.pytorch.callbacks import ProgressBar, TQDMProgressBar

    from .callbacks import LineProgress

    if enabled is False or any(isinstance(c, ProgressBar) for c in callbacks):
        return None
    if sys.stdout.isatty() and sys.stderr.isatty():
        return TQDMProgressBar(refresh_rate=10)
    return LineProgress()


def trainer_defaults() -> dict:
    """Root dir ``runs``; TensorBoard logging under it; lr monitor, NaN guard, final validation,
    mask statistics and the gradient through time."""
    from jsonargparse import lazy_instance
    from lightning.pytorch.loggers import TensorBoardLogger

    from .callbacks import GradientThroughTime, LearningRateLogger, MaskStatistics, NaNGuard

    return {
        "max_epochs": 10,
        "default_root_dir": DEFAULT_ROOT,
        # lazy: still configurable from a config (trainer.logger.init_args.name, save_dir);
        # save_dir "." is the root dir itself (relative paths are resolved against it)
        "logger": lazy_instance(
            TensorBoardLogger, save_dir=".", name="rnndrop", default_hp_metric=False
        ),
        # persistent: present in every run. The figures a researcher opens first, cheap
        # enough to stay on: observed drop rate per site every 100 steps (a few means), and
        # the gradient through time on 32 validation sequences at each validation
        "callbacks": [
            LearningRateLogger(logging_interval="epoch"),
            NaNGuard(),
            FinalValidation(),
            MaskStatistics(every_n_steps=100),
            GradientThroughTime(every_n_epochs=1),
        ],
    }


# ---- one way to fail (the error text: rnndrop/lit/errors.py) -----------------------------------


class RnndropArgumentParser(LightningArgumentParser):
    """LightningCLI's parser whose errors are one line: what, where (file and key, or
    option) and the fix, instead of the usage and a dump of every union member."""

    def error(self, message: str, ex: Exception | None = None) -> NoReturn:
        if not self.exit_on_error:  # a nested parser: its caller reports, with more context
            super().error(message, ex)
        parser = getattr(ex, "subcommand_parser", None) or self
        fail(summarize(message, parser.format_usage()))


def _data_errors() -> tuple[type[BaseException], ...]:
    """Data problems a user fixes (a missing or corrupt corpus): exit 2, not a traceback."""
    from ..data import DATA_ERRORS

    return DATA_ERRORS


def _user_errors() -> tuple[type[BaseException], ...]:
    """What a running subcommand reports as a user error: data problems and Lightning's
    configuration errors."""
    return (*_data_errors(), MisconfigurationException)


def _message(err: BaseException) -> str:
    # a KeyError's str() is the repr of its argument: use the argument
    return str(err.args[0]) if len(err.args) == 1 else str(err)


OPTIMIZER_GROUPS = ("optimizer", "lr_scheduler")


def reject_optimizer_groups(sources: list[tuple[str, str, Any]]) -> None:
    """One way to choose the optimiser: the task's ``optimizer`` argument.

    LightningCLI's ``--optimizer``/``--lr_scheduler`` would replace the task's
    ``configure_optimizers`` with only a warning, silently dropping ``lr_decay``, NT-ASGD's
    averaging and the per-chunk learning-rate scaling; the CLI is built without them
    (``auto_configure_optimizers=False``), and this names the replacement.
    """
    for where, key, _ in sources:
        if key.split(".")[0] in OPTIMIZER_GROUPS:
            group = key.split(".")[0]
            place = where if where.startswith("--") else f"{where}: {group}"
            fix = ("choose the optimiser with --model.init_args.optimizer (sgd, nt_asgd, adam, "
                   "adamw) and its lr, momentum, weight_decay, lr_decay, decay_start "
                   "(docs/training.md)")  # fmt: skip
            fail(f"{place}: LightningCLI's {group} group is not supported; {fix}")


class RnndropCLI(LightningCLI):
    """LightningCLI with rnndrop's links, defaults, output rule and error messages."""

    def init_parser(self, **kwargs: Any) -> LightningArgumentParser:
        # no abbreviations: `--trainer.max_step 3` is an unknown key, not max_steps
        kwargs.setdefault("allow_abbrev", False)
        return super().init_parser(**kwargs)

    def parse_arguments(self, parser: LightningArgumentParser, args) -> None:
        given = sys.argv[1:] if args is None else args
        self._argv = set_argv(given if isinstance(given, list) else [])  # dict/Namespace: none
        reject_optimizer_groups(_sources(self._argv))
        super().parse_arguments(parser, args)

    def _parse_ckpt_path(self) -> None:
        """Check ``--ckpt_path`` before LightningCLI reads the task's settings from it.

        A missing, torn or foreign checkpoint, or one from a newer rnndrop, is one ``error:``
        line (exit 2) naming the file, the problem and the sound checkpoints beside it. An
        explicit setting that contradicts the checkpoint is refused, naming both values
        (LightningCLI would silently replace it by the checkpoint's); the settings in
        :data:`~rnndrop.lit.checkpoints.RESUMABLE` keep the value given.
        """
        sub = self.config.get("subcommand")
        config = self.config.get(sub) if sub else None
        ckpt_path = config.get("ckpt_path") if config is not None else None
        if not ckpt_path or str(ckpt_path) in ("last", "best", "hpc", "registry") or \
                "://" in str(ckpt_path):  # fmt: skip
            return super()._parse_ckpt_path()
        sources = _sources(self._argv)
        where = next((w for w, k, _ in reversed(sources) if k == "ckpt_path"), "--ckpt_path")
        where = where if where.startswith("--") else f"{where}: ckpt_path"
        try:
            ckpt = read_checkpoint(ckpt_path)
        except CheckpointError as err:
            fail(f"{where}: {err}")
        explicit = [(w, k) for w, k, v in sources if not isinstance(v, dict)]
        problems = conflicts(ckpt, config, explicit)
        if problems:
            fail(f"{where}: {ckpt_path} conflicts with this run's settings: "
                 + "; ".join(problems) + ". A resumed run keeps the checkpoint's model, "
                 "task and data: drop those settings, or train a new run without --ckpt_path "
                 "(README: 'What a resumed run may change')")  # fmt: skip
        given = {key for _, key in explicit}
        resumable = {k: config.get(f"model.init_args.{k}") for k in RESUMABLE["model"]
                     if f"model.init_args.{k}" in given}  # fmt: skip
        super()._parse_ckpt_path()
        # LightningCLI has put the checkpoint's task settings over the run's: put back the
        # resumable ones the user gave
        for key, value in resumable.items():
            self.config[sub][f"model.init_args.{key}"] = value

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument(
            "--test_after_fit",
            type=bool,
            default=False,
            help="after fit, evaluate on the test split: the best checkpoint (by "
            "checkpoint.monitor) when one was saved, else the final weights; the log says which",
        )
        # Lightning's ModelCheckpoint as its own group: `--checkpoint.every_n_train_steps 500`
        parser.add_class_arguments(ModelCheckpoint, "checkpoint", fail_untyped=False,
                                   sub_configs=True)  # fmt: skip
        parser.set_defaults({f"checkpoint.{k}": v for k, v in CHECKPOINT_DEFAULTS.items()})
        for source, target in LINKS.items():
            parser.link_arguments(f"data.{source}", target, apply_on="instantiate")
        parser.set_defaults(
            {
                "model": {
                    "class_path": "rnndrop.lit.SequenceTask",
                    "init_args": {"model": {"class_path": "rnndrop.models.SequenceModel"}},
                },
                "data": {
                    "class_path": "rnndrop.data.SyntheticDataModule",
                    "init_args": {"task": "delayed_recall", "distance": 10},
                },
            }
        )

    def before_instantiate_classes(self) -> None:
        """Put every output under the trainer's root dir (relative paths are taken from it)."""
        config = self.config.get(self.subcommand) if self.subcommand else self.config
        trainer = config.get("trainer")
        if trainer is None:
            return
        if trainer.get("default_root_dir") is None:
            trainer.default_root_dir = DEFAULT_ROOT
        root = Path(trainer.default_root_dir)
        loggers = trainer.get("logger")
        for logger in loggers if isinstance(loggers, list) else [loggers]:
            init = getattr(logger, "init_args", None)
            if init is not None and isinstance(init.get("save_dir"), str | Path):
                init.save_dir = str(root / init.save_dir)  # an absolute save_dir stays as it is
        checkpoint = config.get("checkpoint")
        if checkpoint is not None and checkpoint.get("dirpath"):
            checkpoint.dirpath = str(root / checkpoint.dirpath)

    def instantiate_classes(self) -> None:
        # a value the parser accepts but a class rejects (a rate of 1.5, an unknown task name,
        # a trainer setting Lightning refuses) gets the same treatment as a bad key: one
        # error line and exit code 2, no traceback
        try:
            super().instantiate_classes()
        except _data_errors() as err:  # the links read the corpus (its vocabulary size)
            fail(cli_spelling(_message(err)))
        except (ValueError, TypeError, MisconfigurationException) as err:
            self.parser.error(str(err))

    def instantiate_trainer(self, **kwargs: Any) -> L.Trainer:
        # the checkpoint group and the progress display join the trainer's callbacks
        config = self.config_init.get(self.subcommand) if self.subcommand else self.config_init
        checkpoint = config.get("checkpoint")
        trainer = config.get("trainer", {})
        if "callbacks" not in kwargs:
            given = trainer.get("callbacks") or []
            given = list(given if isinstance(given, list) else [given])
            extra = []
            if isinstance(checkpoint, ModelCheckpoint) and \
                    trainer.get("enable_checkpointing", True) is not False:  # fmt: skip
                extra.append(checkpoint)
            if not any(isinstance(c, Preemption) for c in given):
                extra.append(Preemption())  # SIGTERM: save at the next step, exit 143
            progress = progress_display(given, trainer.get("enable_progress_bar"))
            if progress is not None:
                extra.append(progress)
            if extra:
                kwargs["callbacks"] = [*given, *extra]
        return super().instantiate_trainer(**kwargs)

    # the subcommands: a user error while running (a missing corpus, a corrupt file) exits 2
    # with one line and removes the run directory it had just created
    def _run_trainer(self, name: str, **kwargs: Any) -> Any:
        from lightning.pytorch.utilities.exceptions import SIGTERMException

        fresh = self._fresh_dirs()
        try:
            return getattr(self.trainer, name)(**kwargs)
        except _user_errors() as err:
            if self.trainer.global_step == 0:
                _remove_empty_runs(fresh)
            fail(cli_spelling(_message(err)))
        except CheckpointSaveError as err:  # a full disk: the previous checkpoint is intact
            sys.stderr.write(f"{err}\n")
            raise SystemExit(1) from None
        except SIGTERMException:
            raise SystemExit(preempted(self.trainer)) from None

    def fit(self, **kwargs: Any) -> None:
        self._run_trainer("fit", **kwargs)

    def validate(self, **kwargs: Any) -> Any:
        return self._run_trainer("validate", **kwargs)

    def test(self, **kwargs: Any) -> Any:
        return self._run_trainer("test", **kwargs)

    def predict(self, **kwargs: Any) -> Any:
        return self._run_trainer("predict", **kwargs)

    def _fresh_dirs(self) -> list[Path]:
        """The run's directories that do not exist yet, deepest first."""
        trainer, fresh = self.trainer, []
        dirs = [Path(trainer.default_root_dir)]
        for logger in trainer.loggers:
            log_dir = getattr(logger, "log_dir", None)  # TensorBoard/CSV: picks the version
            if log_dir:
                dirs.append(Path(log_dir))
        for d in dirs:
            d = d.absolute()
            while not d.exists() and d not in fresh:
                fresh.append(d)
                d = d.parent
        return sorted(fresh, key=lambda p: len(p.parts), reverse=True)

    def after_fit(self) -> None:
        if self.config.fit.get("test_after_fit") and not self.trainer.fast_dev_run:
            best = getattr(self.trainer.checkpoint_callback, "best_model_path", "")
            if best:
                print(f"test_after_fit: testing the best checkpoint {best}", file=sys.stderr)
            else:
                print("test_after_fit: no best checkpoint was saved; testing the final weights",
                      file=sys.stderr)  # fmt: skip
            self.test(model=self.model, datamodule=self.datamodule,
                      ckpt_path="best" if best else None)  # fmt: skip


def _remove_empty_runs(fresh: list[Path]) -> None:
    """Remove what a run that failed before its first step created: no checkpoint inside."""
    for d in fresh:  # deepest first
        if d.is_dir() and not any(d.rglob("*.ckpt")):
            shutil.rmtree(d, ignore_errors=True)


def preempted(trainer: L.Trainer) -> int:
    """After a SIGTERM: one line saying what was saved; the exit code 128 + 15."""
    import signal

    path = next((c.path for c in trainer.callbacks if isinstance(c, Preemption)), None)
    where = f"epoch {trainer.current_epoch}, global step {trainer.global_step}"
    if path is not None:
        what = f"saved {path}; resume with --ckpt_path {path}"
    elif trainer.state.fn == "fit" and trainer.global_step == 0:
        what = "nothing trained yet, no checkpoint saved"
    else:
        what = "no checkpoint saved"
    sys.stderr.write(f"rnndrop: stopped by SIGTERM at {where}: {what}\n")
    return 128 + signal.SIGTERM


def make_cli(args: list[str] | None = None, run: bool = True, **kwargs) -> RnndropCLI:
    """Build the CLI (``run=False`` to only instantiate: tests, notebooks)."""
    import rnndrop.data
    import rnndrop.lit  # noqa: F401

    # early, before the data is loaded; the task applies the rest of
    # rnndrop.runtime.training_defaults (subnormal flushing) when a fit starts, so --help or a
    # config error never builds the compiled kernel that flushing uses
    tune_allocator()

    return RnndropCLI(
        Task,
        L.LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        trainer_defaults=trainer_defaults(),
        save_config_kwargs={"overwrite": True},
        seed_everything_default=0,
        parser_class=RnndropArgumentParser,
        auto_configure_optimizers=False,  # the task's optimizer argument is the one way
        args=args,
        run=run,
        **kwargs,
    )


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``rnndrop fit|validate|test`` (``argv=None``: the command line)."""
    from .callbacks import NonFiniteLossError

    try:
        make_cli(argv)
    except NonFiniteLossError as err:
        print(err, file=sys.stderr)
        return 1
    return 0
