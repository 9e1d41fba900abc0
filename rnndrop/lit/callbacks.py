"""Callbacks: a NaN/inf guard, mask statistics, gradient norm through time."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, LearningRateMonitor
from lightning.pytorch.loggers import TensorBoardLogger

from ..analysis import gradient_through_time
from ..models import RecurrentStack
from ..nn.dropout import StochasticModule

__all__ = [
    "GradientThroughTime",
    "LearningRateLogger",
    "MaskStatistics",
    "NaNGuard",
    "NonFiniteLossError",
]


class NonFiniteLossError(RuntimeError):
    """Training produced a NaN or infinite loss (raised before it reached the weights)."""


class NaNGuard(Callback):
    """Stop at the first non-finite loss, before its backward pass touches the weights.

    Every ``save_every_n_steps`` steps (and at the end of each epoch) the current state is
    written to ``<log_dir>/checkpoints/last_good.ckpt``; a non-finite loss raises
    :class:`NonFiniteLossError` with a message saying where and what to try, and that
    checkpoint is the last one known to be good (``--ckpt_path`` resumes from it).

    Args:
        save_every_n_steps: how often to refresh the last good checkpoint (0: epoch ends only).
        check_grads: also stop on non-finite gradients (one pass over the gradients a step).
    """

    def __init__(self, save_every_n_steps: int = 500, check_grads: bool = False) -> None:
        self.every, self.check_grads = save_every_n_steps, check_grads
        self.path: Path | None = None

    def _save(self, trainer: L.Trainer) -> None:
        # a non-finite gradient with a finite loss poisons the weights silently: never keep
        # such weights as "good" (check_grads=True stops at the gradient itself)
        for name, p in trainer.lightning_module.named_parameters():
            if not torch.isfinite(p).all():
                self._fail(trainer, f"non-finite weights in {name} (from a non-finite gradient)")
        if trainer.fast_dev_run:  # Lightning writes no checkpoint in a smoke run; neither do we
            return
        # beside the run's other checkpoints, under the trainer's root dir (never the cwd)
        root = Path(trainer.log_dir or trainer.default_root_dir)
        self.path = root / "checkpoints" / "last_good.ckpt"
        trainer.save_checkpoint(self.path, weights_only=False)  # full state: resumable

    def _fail(self, trainer: L.Trainer, what: str) -> None:
        where = f"epoch {trainer.current_epoch}, global step {trainer.global_step}"
        good = f"last good checkpoint: {self.path}" if self.path else "no checkpoint saved yet"
        raise NonFiniteLossError(
            f"rnndrop: {what} at {where}; training stopped before the update. {good}. "
            "Usual causes: a learning rate too high for the dropout scheme, no gradient "
            "clipping (set trainer.gradient_clip_val, e.g. 0.25 or 5), or a bad input batch."
        )

    def on_before_backward(self, trainer, pl_module, loss: torch.Tensor) -> None:
        if not torch.isfinite(loss).all():
            self._fail(trainer, f"non-finite loss ({float(loss.detach().float().mean())})")

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if self.check_grads:
            for name, p in pl_module.named_parameters():
                if p.grad is not None and not torch.isfinite(p.grad).all():
                    self._fail(trainer, f"non-finite gradient of {name}")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.every and trainer.global_step % self.every == 0:
            self._save(trainer)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self._save(trainer)


class LearningRateLogger(LearningRateMonitor):
    """Lightning's ``LearningRateMonitor`` that stays quiet when the run has no logger."""

    def on_train_start(self, trainer, *args, **kwargs) -> None:
        if trainer.loggers:
            super().on_train_start(trainer, *args, **kwargs)

    def on_train_batch_start(self, trainer, *args, **kwargs) -> None:
        if trainer.loggers:
            super().on_train_batch_start(trainer, *args, **kwargs)

    def on_train_epoch_start(self, trainer, *args, **kwargs) -> None:
        if trainer.loggers:
            super().on_train_epoch_start(trainer, *args, **kwargs)


def _recorders(module: torch.nn.Module) -> list[tuple[str, StochasticModule]]:
    return [(n or "model", m) for n, m in module.named_modules() if isinstance(m, StochasticModule)]


class MaskStatistics(Callback):
    """Log the observed drop rate of every mask site, every ``every_n_steps`` steps.

    Tags ``masks/<module>/<site>``, e.g. ``masks/model.encoder.parts.0/recurrent/l0``,
    ``masks/model.embedding/embedding`` (word types), ``masks/model.encoder.net.blocks.0/ffn``:
    the fraction of zeros in the mask (for zoneout, the fraction of units that kept their
    previous value). Compare with the configured rates to see the masks at work. Every
    :class:`~rnndrop.nn.dropout.StochasticModule` that records masks takes part: the LSTM and
    GRU, embedding dropout and the transformer's embedding, residual, FFN and DropPath sites
    (attention dropout happens inside the fused attention kernel and cannot be seen).
    """

    def __init__(self, every_n_steps: int = 100) -> None:
        self.every = every_n_steps
        self._recording = False

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._recording = trainer.global_step % self.every == 0
        for _, m in _recorders(pl_module):
            m.record_masks = self._recording

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if not self._recording:
            return
        logs = {}
        for name, m in _recorders(pl_module):
            for site, mask in getattr(m, "last_masks", {}).items():
                kept_prev = site.startswith("zoneout")
                rate = (mask != 0) if kept_prev else (mask == 0)
                logs[f"masks/{name}/{site}"] = rate.float().mean()
            m.record_masks, m.last_masks = False, {}
        if logs:
            pl_module.log_dict(logs, on_step=True, on_epoch=False)
        self._recording = False


class GradientThroughTime(Callback):
    """Gradient norm through time on a fixed validation batch, as scalars and a figure.

    Every ``every_n_epochs`` validations, ``‖∂L_T/∂h_{T-1-k}‖`` (``wrt="state"``: the LSTM's
    or GRU's hidden state ``h``, all layers) or ``‖∂L_T/∂x_{T-1-k}‖`` (``wrt="input"``: the
    encoder's input, any encoder) of the last step's loss for distances
    ``k`` (see :func:`rnndrop.analysis.gradient_through_time`), logged as
    ``grad_through_time/k=<k>`` and as a log-scale plot in TensorBoard's IMAGES tab.

    Args:
        every_n_epochs: how often.
        distances: the ``k``; default: about 12 log-spaced ones.
        wrt: ``"state"``, ``"input"``, or ``"auto"``: the state for LSTMs and GRUs, else the
            input.
        max_batch: samples of the first validation batch to use.
    """

    def __init__(
        self,
        every_n_epochs: int = 1,
        distances: Sequence[int] | None = None,
        wrt: str = "auto",
        max_batch: int = 32,
    ) -> None:
        self.every, self.distances, self.wrt, self.max_batch = (
            every_n_epochs,
            distances,
            wrt,
            max_batch,
        )
        self._batch: tuple[torch.Tensor, torch.Tensor] | None = None

    def _fixed_batch(self, trainer):
        if self._batch is None:
            loader = trainer.datamodule.val_dataloader()
            x, y = next(iter(loader))
            self._batch = (x[: self.max_batch], y[: self.max_batch])
        return self._batch

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking or trainer.current_epoch % self.every:
            return
        x, y = (t.to(pl_module.device) for t in self._fixed_batch(trainer))
        wrt = self.wrt
        if wrt == "auto":
            wrt = "state" if isinstance(pl_module.model.encoder, RecurrentStack) else "input"
        norms = gradient_through_time(pl_module.model, x, y, self.distances, wrt=wrt)
        pl_module.log_dict({f"grad_through_time/k={k}": v for k, v in norms.items()})
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                logger.experiment.add_figure(
                    "grad_through_time", _plot(norms, wrt), trainer.global_step
                )


def _plot(norms: dict[int, float], wrt: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    ks = [k for k in norms if k > 0 and norms[k] > 0 and math.isfinite(norms[k])]
    ax.loglog(ks, [norms[k] for k in ks], marker="o")
    ax.set_xlabel("distance k (steps back from the loss)")
    sym = "x" if wrt == "input" else "h"
    ax.set_ylabel(f"‖∂L_T / ∂{sym}_(T-1-k)‖")
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    return fig
