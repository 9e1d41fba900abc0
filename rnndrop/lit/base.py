"""What the Lightning tasks share: optimisers, NT-ASGD averaging, max-norm, exact resume."""

from __future__ import annotations

import inspect
import os
import random
from typing import Any, Literal

import lightning as L
import numpy as np
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_info
from torch import nn
from torchmetrics import Metric

from .. import __version__
from ..nn import GRUCell, LSTMCell, RNNBase
from ..runtime import training_defaults

__all__ = ["OptimizerName", "SplitMetric", "Task", "WeightedMean", "detach_state", "max_norm_"]

OptimizerName = Literal["sgd", "nt_asgd", "adam", "adamw"]


class WeightedMean(Metric):
    """``Σ w·x / Σ w`` over updates, summed across DDP ranks at ``compute``.

    torchmetrics' ``MeanMetric`` checks every update for NaNs (a host sync per step on a GPU),
    and its ``nan_strategy="disable"`` also drops the weights (torchmetrics 1.9). The NaN guard
    stops training on a NaN loss, and a NaN evaluation loss should show as NaN, so this mean
    does no check.
    """

    full_state_update = False

    def __init__(self) -> None:
        super().__init__()
        self.add_state("total", torch.zeros(()), dist_reduce_fx="sum")
        self.add_state("weight", torch.zeros(()), dist_reduce_fx="sum")

    def update(self, value: torch.Tensor | float, weight: torch.Tensor | float = 1.0) -> None:
        value = torch.as_tensor(value, dtype=torch.float32, device=self.device)
        weight = torch.as_tensor(weight, dtype=torch.float32, device=self.device)
        self.total += (value * weight).sum()
        self.weight += torch.broadcast_to(weight, value.shape).sum()

    def compute(self) -> torch.Tensor:
        return self.total / self.weight


class SplitMetric(nn.Module):
    """One token- (or sample-) weighted running mean per split, moved with the module."""

    def __init__(self) -> None:
        super().__init__()
        # "train" would clash with nn.Module.train as a ModuleDict key
        self.means = nn.ModuleDict({f"{s}_": WeightedMean() for s in ("train", "val", "test")})

    def __getitem__(self, split: str):
        return self.means[f"{split}_"]


def model_hparams(model) -> dict[str, Any]:
    """The model as LightningCLI writes it (``class_path`` + ``init_args``), for hparams.

    In this form ``rnndrop fit|test --ckpt_path`` can parse a checkpoint's hyperparameters
    back into the model's arguments (LightningCLI does so), and the HPARAMS tab shows them.
    """
    cls = type(model)
    from .. import models

    module = "rnndrop.models" if getattr(models, cls.__name__, None) is cls else cls.__module__
    return {"class_path": f"{module}.{cls.__qualname__}",
            "init_args": dict(getattr(model, "config", {}))}  # fmt: skip


def detach_state(state: Any) -> Any:
    """Detach a recurrent state (tensors in nested tuples/lists) for truncated BPTT."""
    if state is None:
        return None
    if isinstance(state, torch.Tensor):
        return state.detach()
    return type(state)(detach_state(s) for s in state)


def max_norm_(module: nn.Module, max_norm: float) -> None:
    """Max-norm constraint (Srivastava et al. 2014): ``‖w_j‖₂ ≤ c`` for the incoming weights
    of every unit, i.e. each row of every ``nn.Linear`` weight and every LSTM/GRU (layer or
    cell, rnndrop's or torch's) ``weight_*`` matrix (embedding rows are word vectors, not
    units, and are left alone). In place."""
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, nn.Linear):
                weights = [m.weight]
            elif isinstance(m, RNNBase | LSTMCell | GRUCell | nn.RNNBase | nn.RNNCellBase):
                weights = [
                    p for n, p in m.named_parameters(recurse=False) if n.startswith("weight")
                ]
            else:
                continue
            for w in weights:
                w.copy_(torch.renorm(w, 2, 0, max_norm))


class Task(L.LightningModule):
    """Base of :class:`LanguageModelTask` and :class:`SequenceTask`.

    Args:
        optimizer: ``"sgd"``, ``"nt_asgd"`` (SGD, then averaged iterates once validation
            loss stops improving for ``nonmono`` epochs: Merity et al. 2017), ``"adam"`` or
            ``"adamw"``.
        lr, momentum, weight_decay: optimiser settings.
        lr_decay, decay_start: multiply the learning rate by ``lr_decay`` every epoch from
            epoch ``decay_start`` on (Zaremba et al. 2014: 0.5 after 4 epochs for small).
        nonmono: NT-ASGD's patience, in validations.
        max_norm: if set, renormalise each unit's incoming weights to at most this L2 norm
            after every step (Srivastava et al. 2014).
        concrete_length_scale: the prior length-scale ``l`` of concrete dropout's regulariser
            (Gal, Hron & Kendall 2017), added to the loss when the model learns its rates
            (``RecurrentDropout(concrete=True)``); see :func:`rnndrop.nn.concrete_regularizer`.
        concrete_dataset_size: ``N`` of that regulariser; default the training set's size
            (tokens for a language model, sequences for a sequence task).
    """

    #: metrics shown in TensorBoard's HPARAMS tab (declared at fit start, logged later)
    hp_metrics: tuple[str, ...] = ()

    def __init__(
        self,
        optimizer: OptimizerName = "sgd",
        lr: float = 1.0,
        momentum: float = 0.0,
        weight_decay: float = 0.0,
        lr_decay: float = 1.0,
        decay_start: int = 0,
        nonmono: int = 5,
        max_norm: float | None = None,
        concrete_length_scale: float = 1e-4,
        concrete_dataset_size: int | None = None,
    ) -> None:
        super().__init__()
        if concrete_length_scale < 0:
            raise ValueError(f"concrete_length_scale must be >= 0, got {concrete_length_scale}")
        if concrete_dataset_size is not None and concrete_dataset_size < 1:
            raise ValueError(f"concrete_dataset_size must be >= 1, got {concrete_dataset_size}")
        self.concrete = {"length_scale": concrete_length_scale, "n": concrete_dataset_size}
        if optimizer not in ("sgd", "nt_asgd", "adam", "adamw"):
            raise ValueError(f"optimizer must be sgd, nt_asgd, adam or adamw, got {optimizer!r}")
        if lr <= 0:
            raise ValueError(f"lr must be positive, got {lr}")
        if not 0 < lr_decay <= 1:
            raise ValueError(f"lr_decay must be in (0, 1], got {lr_decay}")
        self.optim = {"name": optimizer, "lr": lr, "momentum": momentum,
                      "weight_decay": weight_decay, "lr_decay": lr_decay,
                      "decay_start": decay_start}  # fmt: skip
        self.nonmono, self.max_norm = nonmono, max_norm
        self.val_history: list[float] = []  # validation losses, for NT-ASGD's trigger
        # NT-ASGD's running average. Not torch.optim.swa_utils.AveragedModel: that wraps a deep
        # copy of the whole module (a second model to move between devices, checkpoint and
        # swap for evaluation); the average of the parameters alone, a dict saved in the task's
        # extra state and swapped in by _load_params, is what AWD-LSTM's evaluation needs
        self.averaged: dict[str, torch.Tensor] | None = None
        self.n_averaged = 0
        self._backup: dict[str, torch.Tensor] | None = None

    # ---- optimisation --------------------------------------------------------------------

    def configure_optimizers(self):
        o = self.optim
        rates = {id(p) for p in self._concrete_parameters()}
        params: Any = [p for p in self.parameters() if p.requires_grad and id(p) not in rates]
        if rates:  # weight decay would pull every rate logit to 0, every rate to 0.5
            params = [{"params": params},
                      {"params": self._concrete_parameters(), "weight_decay": 0.0}]  # fmt: skip
        if o["name"] in ("sgd", "nt_asgd"):
            opt = torch.optim.SGD(params, lr=o["lr"], momentum=o["momentum"],
                                  weight_decay=o["weight_decay"])  # fmt: skip
        elif o["name"] == "adam":
            opt = torch.optim.Adam(params, lr=o["lr"], weight_decay=o["weight_decay"])
        else:
            opt = torch.optim.AdamW(params, lr=o["lr"], weight_decay=o["weight_decay"])
        if o["lr_decay"] == 1.0:
            return opt
        decay, start = o["lr_decay"], o["decay_start"]
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda epoch: decay ** max(0, epoch + 1 - start)
        )  # epoch is the number of finished epochs: epochs 0..start-1 run at lr
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "epoch"}}

    # ---- concrete dropout -----------------------------------------------------------------

    def _concrete_parameters(self) -> list[torch.nn.Parameter]:
        from ..nn import RNNBase

        return [p for m in self.modules() if isinstance(m, RNNBase)
                for p in m.concrete_parameters().values()]  # fmt: skip

    def concrete_dataset_size(self) -> int:
        """``N`` of concrete dropout's regulariser: the setting, else the task's training set."""
        if self.concrete["n"] is not None:
            return self.concrete["n"]
        n = self._training_set_size()
        if n is None:
            raise ValueError("concrete dropout needs the training set's size for its regulariser: "
                             "set concrete_dataset_size")  # fmt: skip
        return n

    def _training_set_size(self) -> int | None:
        return None

    def _output_weight(self) -> torch.Tensor | None:
        return None

    def concrete_loss(self) -> torch.Tensor | None:
        """The concrete-dropout regulariser for the loss, and the learned rates logged as
        ``dropout_rate/<module>/<site>``; None when no layer learns its rates."""
        if not self._concrete_parameters():
            return None
        from ..nn import concrete_rates, concrete_regularizer

        reg = concrete_regularizer(self.model, self.concrete_dataset_size(),
                                   self.concrete["length_scale"],
                                   output_weight=self._output_weight())  # fmt: skip
        self.log("train/concrete_reg", reg.detach(), on_step=True)
        self.log_dict({f"dropout_rate/{k}": v for k, v in concrete_rates(self.model).items()},
                      on_step=True)  # fmt: skip
        return reg

    def log_reduced(self, logs: dict[str, Any], **kwargs: Any) -> None:
        """Log epoch values that are already the same on every DDP rank.

        The epoch metrics come from torchmetrics, whose ``compute`` sums over ranks, and what
        is derived from them (perplexity, the best-so-far ``hp/*``) is then equal on every rank.
        ``sync_dist=True`` would all-reduce them a second time; plain ``log`` makes Lightning
        advise ``sync_dist=True`` for each of them at every evaluation. ``rank_zero_only=True``
        is Lightning's public way to say "no reduction" (its sync becomes a no-op); every rank
        still logs, so callbacks (checkpoint monitors) see the values on every rank.
        """
        self.log_dict(logs, sync_dist=True, rank_zero_only=True, **kwargs)

    def optimizer_step(self, epoch, batch_idx, optimizer, optimizer_closure=None) -> None:
        # an overflowing step (Adam at lr 1e38) raises a bare RuntimeError from inside torch,
        # before any weight changes: stop as the guard stops for a diverged loss
        from .callbacks import OVERFLOW_MESSAGE, DivergenceError, guard_of

        try:
            super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        except RuntimeError as err:
            if OVERFLOW_MESSAGE not in str(err):
                raise
            guard = guard_of(self.trainer)
            if guard is not None:
                guard.overflow(self.trainer)
            raise DivergenceError(
                f"rnndrop: optimizer overflow (a step too large for float32) at global step "
                f"{self.trainer.global_step}; training stopped before the update. Lower the "
                "learning rate."
            ) from err

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        if self.max_norm is not None:
            max_norm_(self, self.max_norm)
        if self.averaged is not None:  # ASGD's average of the iterates since the trigger
            self.n_averaged += 1
            with torch.no_grad():
                for name, p in self.named_parameters():
                    a = self.averaged[name]
                    a.add_(p.detach() - a, alpha=1.0 / self.n_averaged)

    def note_validation(self, loss: float) -> None:
        """Record a validation loss; start NT-ASGD averaging when it stops improving."""
        if self.trainer.sanity_checking:
            return
        # awd-lstm-lm's rule: worse than the best of the earlier losses, the last `nonmono`
        # of them left out (the current loss is not yet in the history)
        h, n = self.val_history, self.nonmono
        waiting = self.optim["name"] == "nt_asgd" and self.averaged is None
        if waiting and len(h) > n and loss > min(h[:-n]):
            self.averaged = {k: p.detach().clone() for k, p in self.named_parameters()}
            self.n_averaged = 1
            rank_zero_info(f"NT-ASGD: averaging the iterates from validation {len(h) + 1} on")
        h.append(loss)

    # evaluate (and finish) with the averaged weights, as AWD-LSTM does
    def _swap_in_average(self) -> None:
        if self.averaged is not None and self._backup is None:
            self._backup = {k: p.detach().clone() for k, p in self.named_parameters()}
            self._load_params(self.averaged)

    def _swap_out_average(self) -> None:
        if self._backup is not None:
            self._load_params(self._backup)
            self._backup = None

    def _load_params(self, values: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for k, p in self.named_parameters():
                p.copy_(values[k])

    def on_validation_epoch_start(self) -> None:
        self._swap_in_average()

    def on_validation_epoch_end(self) -> None:
        self._swap_out_average()

    def on_train_end(self) -> None:
        if self.averaged is not None:  # the final model is the averaged one
            self._load_params(self.averaged)

    # ---- TensorBoard HPARAMS ---------------------------------------------------------------

    def tensorboard_hparams(self) -> dict[str, Any]:
        """What the HPARAMS tab shows: the task's settings, the model's (only those its encoder
        uses), the data module's (corpus, bptt, batch size, ...) and the seed; no ``None``."""
        flat: dict[str, Any] = {}

        def put(prefix: str, value: Any) -> None:
            if isinstance(value, dict):
                for k, v in value.items():
                    put(f"{prefix}/{k}" if prefix else str(k), v)
            elif value is not None:
                ok = isinstance(value, bool | int | float | str)
                flat[prefix] = value if ok else str(value)

        task = {k: v for k, v in self.hparams.items() if k != "model" and not k.startswith("_")}
        if "bpc" in task:  # resolved from the corpus in setup
            task["bpc"] = bool(getattr(self, "bpc", False))
        put("", task)
        model = dict(self.hparams.get("model", {}).get("init_args", {}))
        if model.get("encoder", "lstm") != "transformer":  # settings a recurrent encoder ignores
            for k in ("transformer_dropout", "num_heads", "ffn_size", "positions", "max_len"):
                model.pop(k, None)
        put("model", model)
        datamodule = getattr(self.trainer, "datamodule", None)
        data = getattr(datamodule, "hparams", {}) or {}
        put("data", {k: v for k, v in data.items() if not k.startswith("_")})
        seed = os.environ.get("PL_GLOBAL_SEED")  # set by seed_everything (the CLI's seed)
        if seed is not None:
            flat["seed"] = int(seed)
        return flat

    def on_fit_start(self) -> None:
        # a task in the user's own Trainer runs as fast as under `rnndrop fit`: the allocator
        # and subnormal flushing, once per process (opt-outs in rnndrop.runtime)
        training_defaults()
        # the hparams summary itself, declaring the hp/* metrics: Lightning's
        # log_hyperparams(params, metrics) would also log the metrics' placeholder values as
        # scalars at step 0 (NaN in every hp/* curve); the real values come at validation
        if not self.hp_metrics or not self.trainer.is_global_zero:
            return
        from torch.utils.tensorboard.summary import hparams

        for logger in self.loggers:
            if isinstance(logger, TensorBoardLogger):
                summaries = hparams(self.tensorboard_hparams(), dict.fromkeys(self.hp_metrics, 0.0))
                writer = logger.experiment.file_writer
                for summary in summaries:  # experiment, session start, session end
                    writer.add_summary(summary)

    # ---- exact resume ---------------------------------------------------------------------

    def setup(self, stage: str) -> None:
        # every checkpoint of this task's trainer is written atomically (temporary file,
        # fsync, rename): a kill during a save never leaves a torn last.ckpt
        from .checkpoints import use_atomic_checkpoints

        use_atomic_checkpoints(self.trainer)

    def batches_done_this_epoch(self) -> int:
        """Training batches already run in the current epoch (> 0 after a mid-epoch resume)."""
        try:
            return int(self.trainer.fit_loop.epoch_loop.batch_progress.current.ready)
        except AttributeError:  # Lightning moved its loop internals: assume a fresh epoch
            return 0

    def extra_state(self) -> dict[str, Any]:
        """Task state that a checkpoint must carry besides weights and optimiser."""
        return {}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        """Restore :meth:`extra_state`."""

    def _split_metrics(self) -> list[tuple[str, SplitMetric]]:
        return [(n, m) for n, m in self.named_children() if isinstance(m, SplitMetric)]

    @staticmethod
    def _state_of(metric: Metric) -> dict[str, torch.Tensor]:
        return {k: v.detach().cpu().clone() for k, v in metric.metric_state.items()}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # The CLI offers the data module's links (loss, baseline_loss) to every task, and
        # Lightning's CLI instantiator records them in the hyperparameters even where the task
        # does not take them; `rnndrop fit|test --ckpt_path` (LightningCLI) parses the saved
        # hyperparameters back into the task's arguments and would fail on them. Keep only
        # the task's own arguments (and Lightning's `_` keys).
        hparams = checkpoint.get("hyper_parameters")
        if hparams:
            params = inspect.signature(type(self).__init__).parameters
            for key in [k for k in hparams if not k.startswith("_") and k not in params]:
                del hparams[key]
        name, keys, pos, has_gauss, gauss = np.random.get_state()
        checkpoint["rnndrop"] = {  # tensors and plain types only: loads with weights_only
            "version": __version__,  # a newer checkpoint format is refused by an older rnndrop
            "rng": {
                "torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
                "numpy": (
                    name,
                    torch.from_numpy(keys.copy()),
                    int(pos),
                    int(has_gauss),
                    float(gauss),
                ),
                "python": random.getstate(),
            },
            "val_history": list(self.val_history),
            "averaged": self.averaged,
            "n_averaged": self.n_averaged,
            # the epoch's running means so far: a mid-epoch resume ends the epoch with the
            # same train/epoch_loss as an uninterrupted run (this rank's; under DDP, rank 0's)
            "train_means": {name: self._state_of(m["train"]) for name, m in self._split_metrics()},
            **self.extra_state(),
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint.get("rnndrop")
        if state is None:
            return
        rng = state["rng"]
        torch.set_rng_state(rng["torch"])
        if rng["cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])
        name, keys, pos, has_gauss, gauss = rng["numpy"]
        np.random.set_state((name, keys.numpy(), pos, has_gauss, gauss))
        random.setstate(rng["python"])
        self.val_history = list(state["val_history"])
        self.averaged, self.n_averaged = state["averaged"], state["n_averaged"]
        saved = state.get("train_means", {})  # absent in checkpoints from before it was kept
        for name, m in self._split_metrics():
            if name in saved and set(saved[name]) == set(m["train"].metric_state):
                m["train"].reset()
                m["train"].merge_state({k: v.to(self.device) for k, v in saved[name].items()})
        self.load_extra_state(state)
