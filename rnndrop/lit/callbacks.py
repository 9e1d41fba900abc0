"""Callbacks: a NaN/inf and divergence guard, mask statistics, gradient norm through time,
plain-line progress for logs that are not a terminal."""

from __future__ import annotations

import math
import sys
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TextIO

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, LearningRateMonitor
from lightning.pytorch.callbacks.progress.progress_bar import ProgressBar
from lightning.pytorch.loggers import TensorBoardLogger

from ..analysis import gradient_through_time
from ..atomic import replace
from ..models import RecurrentStack
from ..nn.dropout import StochasticModule

__all__ = [
    "DivergenceError",
    "GradientThroughTime",
    "LearningRateLogger",
    "LineProgress",
    "MaskStatistics",
    "NaNGuard",
    "NonFiniteLossError",
    "PlateauStop",
    "Preemption",
]


class NonFiniteLossError(RuntimeError):
    """Training produced a NaN or infinite loss (raised before it reached the weights)."""


class DivergenceError(NonFiniteLossError):
    """Training diverged: a finite loss far above the run's first losses, or an optimiser
    overflow (raised before the update, like :class:`NonFiniteLossError`)."""


#: what torch raises when a learning rate or step overflows float32 inside an optimiser
OVERFLOW_MESSAGE = "cannot be converted to type float without overflow"


def guard_of(trainer: L.Trainer) -> NaNGuard | None:
    return next((c for c in trainer.callbacks if isinstance(c, NaNGuard)), None)


class NaNGuard(Callback):
    """Stop at the first non-finite or diverged loss, before its backward pass touches the
    weights.

    Every ``save_every_n_steps`` steps (and at the end of each epoch) the current state is
    written; it becomes ``<log_dir>/checkpoints/last_good.ckpt`` only once the next training
    loss, computed with those weights, has passed the checks (until then it waits as
    ``last_good.pending.ckpt``), so a state is never called good before it was seen to be.
    A bad loss raises :class:`NonFiniteLossError` (NaN or inf) or :class:`DivergenceError`
    (finite but above ``divergence_factor`` times the run's first loss, or times 1 if that
    was smaller; the first loss comes from the initial weights, so a run that blows up in its
    first steps cannot inflate it) with a one-line message saying where and what to try;
    ``--ckpt_path`` resumes from the last good checkpoint. An optimiser overflow (Adam at
    lr 1e38) stops the same way (:class:`~rnndrop.lit.base.Task` reports it here).

    The check reads the loss on the host once a step: on a GPU that is one sync per step, the
    price of stopping before the update rather than after it. Under DDP the verdict is also
    all-reduced (one scalar a step), so one rank's bad loss stops every rank.

    Args:
        save_every_n_steps: how often to refresh the last good checkpoint (0: epoch ends only).
        check_grads: also stop on non-finite gradients (one pass over the gradients a step).
        divergence_factor: how many times the first loss counts as diverged (None: off).
            The first loss is kept in checkpoints, so a resumed run keeps its reference.
    """

    def __init__(
        self,
        save_every_n_steps: int = 500,
        check_grads: bool = False,
        divergence_factor: float | None = 100.0,
    ) -> None:
        if divergence_factor is not None and not divergence_factor > 1:
            raise ValueError(f"divergence_factor must be > 1 or None, got {divergence_factor}")
        self.every, self.check_grads = save_every_n_steps, check_grads
        self.factor = divergence_factor
        self.first_loss: float | None = None
        self.path: Path | None = None  # the last good checkpoint
        self._pending: Path | None = None  # saved, not yet seen to give a good loss

    def state_dict(self) -> dict[str, Any]:
        return {"first_loss": self.first_loss}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.first_loss = state_dict.get("first_loss")

    @property
    def threshold(self) -> float | None:
        """The loss above which training counts as diverged (None before the first loss)."""
        if self.factor is None or self.first_loss is None:
            return None
        return self.factor * max(self.first_loss, 1.0)

    def _save(self, trainer: L.Trainer) -> None:
        # a non-finite gradient with a finite loss poisons the weights silently: never keep
        # such weights (check_grads=True stops at the gradient itself)
        for name, p in trainer.lightning_module.named_parameters():
            if not torch.isfinite(p).all():
                self._fail(trainer, f"non-finite weights in {name} (from a non-finite gradient)")
        if trainer.fast_dev_run:  # Lightning writes no checkpoint in a smoke run; neither do we
            return
        # beside the run's other checkpoints, under the trainer's root dir (never the cwd)
        root = Path(trainer.log_dir or trainer.default_root_dir)
        self._pending = root / "checkpoints" / "last_good.pending.ckpt"
        trainer.save_checkpoint(self._pending, weights_only=False)  # full state: resumable

    def _promote(self, trainer: L.Trainer) -> None:
        if self._pending is None:
            return
        good = self._pending.with_name("last_good.ckpt")
        if trainer.is_global_zero and self._pending.exists():
            replace(self._pending, good)  # atomic and durable
        self.path, self._pending = good, None

    def _fail(self, trainer: L.Trainer, what: str, error: type = NonFiniteLossError) -> None:
        where = f"epoch {trainer.current_epoch}, global step {trainer.global_step}"
        good = f"last good checkpoint: {self.path}" if self.path else "no checkpoint saved yet"
        raise error(
            f"rnndrop: {what} at {where}; training stopped before the update. {good}. "
            "Usual causes: a learning rate too high for the dropout scheme, no gradient "
            "clipping (set trainer.gradient_clip_val, e.g. 0.25 or 5), or a bad input batch."
        )

    def overflow(self, trainer: L.Trainer) -> None:
        """Report an optimiser overflow (the step never happened) and stop."""
        self._fail(trainer, "optimizer overflow (a step too large for float32)", DivergenceError)

    def on_before_backward(self, trainer, pl_module, loss: torch.Tensor) -> None:
        value = float(loss.detach().float().mean())  # the one host sync of the guard
        problem: tuple[str, type] | None = None
        threshold = self.threshold
        if not math.isfinite(value):
            problem = f"non-finite loss ({value})", NonFiniteLossError
        elif threshold is not None and value > threshold:
            problem = (f"diverged: loss {value:.4g} > {self.factor:g} x the first loss "
                       f"{self.first_loss:.4g}", DivergenceError)  # fmt: skip
        # under DDP every rank must stop together: a rank that went on into backward would
        # wait forever in the gradient all-reduce for the one that stopped
        if trainer.world_size > 1 and trainer.strategy.reduce_boolean_decision(
            problem is not None, all=False
        ):
            problem = problem or ("a bad loss on another rank", NonFiniteLossError)
        if problem is not None:
            self._fail(trainer, *problem)
        if self.first_loss is None:
            self.first_loss = value
        self._promote(trainer)  # the weights that gave this loss are good

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

    def on_train_end(self, trainer, pl_module) -> None:
        # the final weights: no later training loss checks them; a finite validation loss
        # (when there was one) and finite weights are the evidence left
        val = trainer.callback_metrics.get("val/loss")
        threshold = self.threshold or math.inf
        if val is None or (math.isfinite(float(val)) and float(val) <= threshold):
            self._promote(trainer)


class Preemption(Callback):
    """SIGTERM (SLURM's ``--signal``, a preemption's grace period): save ``last.ckpt`` at the
    next step boundary and stop.

    Lightning notices SIGTERM itself and stops after the step with a ``SIGTERMException``,
    saving nothing. This saves the full state where ``ModelCheckpoint`` saves mid-epoch (the
    end of a training batch, so the resume is exact), as ``last.ckpt`` in the checkpoint
    directory; a SIGTERM during validation or before the first step saves when the run stops.
    ``rnndrop fit`` then prints one line and exits with 128 + 15 (see :attr:`path`).
    """

    def __init__(self) -> None:
        self.path: Path | None = None  # the checkpoint saved on SIGTERM
        self._saved_at: int | None = None

    @staticmethod
    def _target(trainer: L.Trainer) -> Path:
        from lightning.pytorch.callbacks import ModelCheckpoint

        ckpt = trainer.checkpoint_callback
        if isinstance(ckpt, ModelCheckpoint) and ckpt.dirpath:
            return Path(ckpt.dirpath) / f"{ckpt.CHECKPOINT_NAME_LAST}{ckpt.FILE_EXTENSION}"
        return Path(trainer.log_dir or trainer.default_root_dir) / "checkpoints" / "last.ckpt"

    def _save(self, trainer: L.Trainer) -> None:
        if self._saved_at == trainer.global_step or trainer.fast_dev_run or \
                trainer.state.fn != "fit":  # validate/test: no training state to keep  # fmt: skip
            return
        self._saved_at = trainer.global_step
        if trainer.global_step == 0:  # nothing trained: nothing worth a checkpoint
            return
        self.path = self._target(trainer)
        trainer.save_checkpoint(self.path)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.received_sigterm:
            self._save(trainer)

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        from lightning.pytorch.utilities.exceptions import SIGTERMException

        if isinstance(exception, SIGTERMException):  # not after a NaN or a failed save
            self._save(trainer)


class PlateauStop(Callback):
    """Train to convergence on the validation loss, then keep the best weights.

    At each validation that does not improve on the best loss so far, the learning rate of
    every parameter group is multiplied by ``factor``; after ``patience`` such validations in
    a row training stops. When fit ends the weights of the best validation are loaded back,
    so what is evaluated afterwards is the best model seen, not the last one.

    Args:
        patience: validations in a row without improvement before stopping (>= 1).
        factor: learning-rate multiplier at each of them, in (0, 1] (1: keep the rate).
        monitor: the logged metric to minimise.

    After fit, :attr:`best` is the best value, :attr:`best_step` the global step it was
    reached at, :attr:`stopped_step` the step training stopped at (None: it ran to its
    ``max_steps``) and :attr:`history` every ``(step, value, lr)`` validated.
    """

    def __init__(self, patience: int, factor: float = 1.0, monitor: str = "val/loss") -> None:
        if patience < 1:
            raise ValueError(f"patience must be >= 1 validations, got {patience}")
        if not 0 < factor <= 1:
            raise ValueError(f"factor must be in (0, 1], got {factor}")
        self.patience, self.factor, self.monitor = patience, factor, monitor
        self.best, self.best_step, self.stopped_step = math.inf, None, None
        self.history: list[tuple[int, float, float]] = []
        self._bad = 0
        self._weights: dict[str, torch.Tensor] | None = None

    def state_dict(self) -> dict[str, Any]:
        """Kept in checkpoints: a resumed run goes on with its best, its patience count and
        its best weights."""
        return {"best": self.best, "best_step": self.best_step, "bad": self._bad,
                "stopped_step": self.stopped_step, "history": list(self.history),
                "weights": self._weights}  # fmt: skip

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.best, self.best_step = state_dict["best"], state_dict["best_step"]
        self._bad, self.stopped_step = state_dict["bad"], state_dict["stopped_step"]
        self.history = [tuple(h) for h in state_dict["history"]]
        self._weights = state_dict["weights"]

    def restore(self, history: list, weights: dict[str, torch.Tensor] | None) -> None:
        """Take up a run from its ``history`` of ``(step, value, lr)`` and its best weights
        (a checkpoint written before this callback kept its state)."""
        self.history, self.best, self.best_step, self._bad = [], math.inf, None, 0
        for step, value, lr in history:
            self._record(step, value, lr)
        self._weights = weights

    def _record(self, step: int, value: float, lr: float) -> bool:
        """Note a validation; True if it is a new best (else it counts toward patience)."""
        self.history.append((step, value, lr))
        if value < self.best:
            self.best, self.best_step, self._bad = value, step, 0
            return True
        self._bad += 1
        return False

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        if self.monitor not in trainer.callback_metrics:
            raise KeyError(f"PlateauStop monitors {self.monitor!r}, which the task did not log; "
                           f"logged: {sorted(trainer.callback_metrics)}")  # fmt: skip
        value = float(trainer.callback_metrics[self.monitor])
        lr = trainer.optimizers[0].param_groups[0]["lr"]
        if self._record(trainer.global_step, value, lr):
            self._weights = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}
            return
        for opt in trainer.optimizers:
            for group in opt.param_groups:
                group["lr"] *= self.factor
        if self._bad >= self.patience:
            self.stopped_step = trainer.global_step
            trainer.should_stop = True

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._weights is not None:
            pl_module.load_state_dict(self._weights)


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
        if trainer.sanity_checking or math.isinf(self.every) or trainer.current_epoch % self.every:
            return
        x, y = (t.to(pl_module.device) for t in self._fixed_batch(trainer))
        wrt = self.wrt
        if wrt == "auto":
            wrt = "state" if isinstance(pl_module.model.encoder, RecurrentStack) else "input"
        try:
            norms = gradient_through_time(pl_module.model, x, y, self.distances, wrt=wrt)
        except ValueError as err:  # a task whose batches cannot be probed: say so once, stop
            warnings.warn(f"GradientThroughTime is off for this run: {err}", stacklevel=1)
            self.every = math.inf
            return
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


class LineProgress(ProgressBar):
    """Progress as plain lines, for logs that are not a terminal (SLURM, CI, ``| tee``).

    A carriage-return bar redrawn every step fills such a log with redraws; this writes one
    line every ``every_n_steps`` training steps or ``every_s`` seconds, whichever comes first,
    and one line per validation and test. The progress-bar metrics (a host sync each) are read
    only when a line is written.

    Args:
        every_n_steps: at most this many steps between lines.
        every_s: at most this many seconds between lines (checked at step ends).
        stream: where the lines go (default ``sys.stderr``, where Lightning's bar draws).
    """

    def __init__(self, every_n_steps: int = 100, every_s: float = 60.0,
                 stream: TextIO | None = None) -> None:  # fmt: skip
        super().__init__()
        if every_n_steps < 1:
            raise ValueError(f"every_n_steps must be >= 1, got {every_n_steps}")
        self.every_n_steps, self.every_s, self.stream = every_n_steps, every_s, stream
        self._enabled = True
        self._last = (0.0, 0)  # time and global step of the last line

    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    def _write(self, text: str) -> None:
        if self._enabled and self.trainer.is_global_zero:
            print(text, file=self.stream or sys.stderr, flush=True)

    @staticmethod
    def _format(metrics: dict[str, Any]) -> str:
        return " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                        for k, v in metrics.items())  # fmt: skip

    def on_train_start(self, trainer, pl_module) -> None:
        self._last = (time.monotonic(), trainer.global_step)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        now, step = time.monotonic(), trainer.global_step
        last_time, last_step = self._last
        if step - last_step < self.every_n_steps and now - last_time < self.every_s:
            return
        rate = (step - last_step) / max(now - last_time, 1e-9)
        # Lightning's total_train_batches is min(epoch, steps left *now*): it shrinks during
        # the last epoch of a max_steps run (batch 848/480); the epoch's total is fixed
        total = trainer.num_training_batches
        if isinstance(total, int) and trainer.max_steps > 0:  # the run ends at max_steps
            left = (trainer.max_steps - step) * trainer.accumulate_grad_batches
            total = min(total, batch_idx + 1 + left)
        of = f"/{total}" if isinstance(total, int) else ""
        metrics = self._format(self.get_metrics(trainer, pl_module))
        self._write(f"epoch {trainer.current_epoch} batch {batch_idx + 1}{of} step {step} "
                    f"{rate:.2f} it/s {metrics}")  # fmt: skip
        self._last = (now, step)

    def _eval_line(self, trainer, split: str) -> None:
        metrics = {k: v for k, v in trainer.progress_bar_metrics.items() if k.startswith(split)}
        metrics |= {k: float(v) for k, v in trainer.callback_metrics.items()
                    if k.startswith(f"{split}/") and v.numel() == 1}  # fmt: skip
        self._write(f"epoch {trainer.current_epoch} step {trainer.global_step} {split}: "
                    + self._format(dict(sorted(metrics.items()))))  # fmt: skip

    def on_validation_end(self, trainer, pl_module) -> None:
        if not trainer.sanity_checking:
            self._eval_line(trainer, "val")

    def on_test_end(self, trainer, pl_module) -> None:
        self._eval_line(trainer, "test")
