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
Each run logs to TensorBoard under ``runs/<name>/version_<n>/`` with the resolved config
saved beside it as ``config.yaml``.
"""

from __future__ import annotations

import sys

import lightning as L
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from .base import Task

__all__ = ["RnndropCLI", "main"]

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


def trainer_defaults() -> dict:
    """TensorBoard logging under runs/, learning-rate monitor and NaN guard always on."""
    from jsonargparse import lazy_instance
    from lightning.pytorch.loggers import TensorBoardLogger

    from .callbacks import LearningRateLogger, NaNGuard

    return {
        "max_epochs": 10,
        # lazy: still configurable from a config (trainer.logger.init_args.name, save_dir)
        "logger": lazy_instance(
            TensorBoardLogger, save_dir="runs", name="rnndrop", default_hp_metric=False
        ),
        # persistent: present in every run
        "callbacks": [LearningRateLogger(logging_interval="epoch"), NaNGuard()],
    }


class RnndropCLI(LightningCLI):
    """LightningCLI with rnndrop's links and defaults."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument(
            "--test_after_fit",
            type=bool,
            default=False,
            help="after fit, evaluate the final model on the test split",
        )
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

    def _parse_ckpt_path(self) -> None:
        """As LightningCLI's, minus hyperparameters the task's class does not take.

        Links from the data module (``loss``, ``baseline_loss``) are offered to every task
        and land in the checkpoint's hyperparameters even where the task ignores them; parsed
        back they would fail ``--ckpt_path`` with "unexpected keyword argument".
        """
        import inspect
        from importlib import import_module
        from pathlib import Path

        import torch

        if not self.config.get("subcommand"):
            return
        ckpt_path = self.config[self.config.subcommand].get("ckpt_path")
        if not (ckpt_path and Path(ckpt_path).is_file()):
            return
        hparams = torch.load(ckpt_path, weights_only=True, map_location="cpu").get(
            "hyper_parameters", {}
        )
        hparams.pop("_instantiator", None)
        class_path = hparams.pop("_class_path", None)
        if not hparams or class_path is None:
            return super()._parse_ckpt_path()
        module, _, name = class_path.rpartition(".")
        params = inspect.signature(getattr(import_module(module), name)).parameters
        kwargs = {k: v for k, v in hparams.items() if k in params}
        ckpt = {"model": {"class_path": class_path, "init_args": kwargs}}
        try:
            self.config = self.parser.parse_object({self.config.subcommand: ckpt}, self.config)
        except SystemExit:
            sys.stderr.write(f"could not parse the hyperparameters stored in {ckpt_path}\n")
            raise

    def instantiate_classes(self) -> None:
        # a value the parser accepts but a class rejects (a rate of 1.5, an unknown task name)
        # gets the same treatment as a bad key: the message and exit code 2, no traceback
        try:
            super().instantiate_classes()
        except (ValueError, TypeError) as err:
            self.parser.error(str(err))

    def after_fit(self) -> None:
        if self.config.fit.get("test_after_fit") and not self.trainer.fast_dev_run:
            self.trainer.test(self.model, datamodule=self.datamodule)


def make_cli(args: list[str] | None = None, run: bool = True, **kwargs) -> RnndropCLI:
    """Build the CLI (``run=False`` to only instantiate: tests, notebooks)."""
    import rnndrop.data
    import rnndrop.lit  # noqa: F401

    return RnndropCLI(
        Task,
        L.LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        trainer_defaults=trainer_defaults(),
        save_config_kwargs={"overwrite": True},
        seed_everything_default=0,
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
