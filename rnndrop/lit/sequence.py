"""Sequence tasks: the synthetic long-range tasks and pixel MNIST."""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Literal

import torch
from torch.nn import functional as F

from ..analysis.calibration import SplitCalibration
from ..models import SequenceModel
from ..nn import mc_dropout
from .base import OptimizerName, SplitMetric, Task, model_hparams

__all__ = ["SequenceTask"]

SPLITS = ("train", "val", "test")


def _right_total() -> list[int]:
    """A (right, total) tally; a named function, not a lambda, so the task pickles (ddp_spawn)."""
    return [0, 0]


class SequenceTask(Task):
    r"""Train and evaluate a :class:`~rnndrop.models.SequenceModel` on a sequence task.

    Logs ``{split}/loss`` (cross-entropy over every target, or MSE), ``{split}/acc``
    (accuracy where the task tests memory: its ``memory_mask``, e.g. the recalled symbols of
    the copy task), ``{split}/acc@d=K`` for tasks that ask several distances in one sequence
    (cued delayed recall), and, so curves read at a glance, the task's memoryless baseline
    ``{split}/baseline_loss`` and the ratio ``{split}/loss_vs_baseline`` (1 = remembers
    nothing useful, 0 = perfect).

    Classification evaluations also log calibration on the targets accuracy scores
    (:mod:`rnndrop.analysis.calibration`): ``val/ece``, ``val/nll``, ``val/brier`` and a
    reliability diagram ``val/reliability`` in TensorBoard; with ``mc_samples = S > 0``, the
    Monte Carlo prediction (``S`` stochastic passes, probabilities averaged) as
    ``val/loss_mc``, ``val/acc_mc``, ``val/ece_mc``, ``val/nll_mc``, ``val/brier_mc`` (the
    same for ``test/``).

    Args:
        model: the network (its arguments go under ``model:`` in a config).
        loss: ``"cross_entropy"`` or ``"mse"`` (linked from the data module).
        baseline_loss: the task's memoryless loss (linked from the data module).
        optimizer, lr, momentum, weight_decay, lr_decay, decay_start, nonmono, max_norm,
        concrete_length_scale, concrete_dataset_size: see :class:`~rnndrop.lit.base.Task`.
        mc_samples: Monte Carlo evaluation passes (0: off; classification only).
        reliability_diagrams: draw the reliability diagram into TensorBoard at every
            evaluation's end (about 0.2 s of matplotlib each; the calibration scalars are
            logged either way).
    """

    hp_metrics = ("hp/val_loss", "hp/val_acc", "hp/test_acc")

    def __init__(
        self,
        model: SequenceModel,
        loss: Literal["cross_entropy", "mse"] = "cross_entropy",
        baseline_loss: float | None = None,
        optimizer: OptimizerName = "adam",
        lr: float = 1e-3,
        momentum: float = 0.0,
        weight_decay: float = 0.0,
        lr_decay: float = 1.0,
        decay_start: int = 0,
        nonmono: int = 5,
        max_norm: float | None = None,
        concrete_length_scale: float = 1e-4,
        concrete_dataset_size: int | None = None,
        mc_samples: int = 0,
        reliability_diagrams: bool = True,
    ) -> None:
        super().__init__(optimizer, lr, momentum, weight_decay, lr_decay, decay_start, nonmono,
                         max_norm, concrete_length_scale, concrete_dataset_size)  # fmt: skip
        if loss not in ("cross_entropy", "mse"):
            raise ValueError(f"loss must be 'cross_entropy' or 'mse', got {loss!r}")
        if mc_samples < 0:
            raise ValueError(f"mc_samples must be >= 0, got {mc_samples}")
        self.mc_samples = mc_samples
        self.model = model
        self.save_hyperparameters(ignore=["model"])
        self.hparams["model"] = model_hparams(model)
        self.loss_kind, self.baseline_loss = loss, baseline_loss
        self.loss_avg = SplitMetric()
        self.acc_avg = SplitMetric()
        self.loss_mc_avg = SplitMetric()
        self.acc_mc_avg = SplitMetric()
        self.calibration = SplitCalibration()
        self.reliability_diagrams = reliability_diagrams
        self.by_distance: dict[str, dict[int, list[int]]] = {s: defaultdict(_right_total)
                                                            for s in SPLITS}  # fmt: skip
        self.best = {"loss": math.inf, "acc": 0.0}

    def forward(self, x: torch.Tensor):
        return self.model(x)

    @property
    def _task(self):
        return getattr(getattr(self.trainer, "datamodule", None), "task", None)

    def _step(self, batch, split: str) -> torch.Tensor:
        x, y = batch
        pred = self.model(x).prediction  # (B, T, C) / (B, C) / (B, 1)
        if self.loss_kind == "mse":
            loss = F.mse_loss(pred.squeeze(-1), y.float())
            self.loss_avg[split].update(loss.detach(), y.numel())
            return loss
        flat_pred = pred.flatten(0, -2) if pred.dim() == 3 else pred
        loss = F.cross_entropy(flat_pred, y.flatten() if pred.dim() == 3 else y)
        counted = (y != -100).sum()
        self.loss_avg[split].update(loss.detach(), counted)
        with torch.no_grad():
            correct = pred.argmax(-1) == y
            task = self._task
            scored = task.memory_mask(y) if hasattr(task, "memory_mask") else y != -100
            if scored.any():
                self.acc_avg[split].update(correct[scored].float().mean(), scored.sum())
            if split != "train" and getattr(task, "cued", False):
                self._count_by_distance(split, task.distance_of(x), correct)
            if split != "train":
                self._eval_calibration(x, y, pred, scored, split)
        return loss

    def _eval_calibration(self, x, y, pred, scored, split: str) -> None:
        """Calibration of the deterministic and (``mc_samples``) Monte Carlo predictions."""
        y_scored = torch.where(scored, y, -100)
        self.calibration.update(split, pred.float().log_softmax(-1), y_scored, log=True)
        if not self.mc_samples:
            return
        with mc_dropout(self.model):
            probs = sum(self.model(x).prediction.float().softmax(-1)
                        for _ in range(self.mc_samples)) / self.mc_samples  # fmt: skip
        logp = probs.clamp_min(torch.finfo(probs.dtype).tiny).log()
        valid = y != -100
        self.loss_mc_avg[split].update(F.nll_loss(logp[valid], y[valid]), valid.sum())
        if scored.any():
            right = (probs.argmax(-1) == y)[scored].float()
            self.acc_mc_avg[split].update(right.mean(), scored.sum())
        self.calibration.update(split, probs, y_scored, kind="mc")

    def _count_by_distance(self, split, dist: torch.Tensor, correct: torch.Tensor) -> None:
        for d in dist.unique().tolist():
            if d > 0:
                sel = dist == d
                tally = self.by_distance[split][d]
                tally[0] += int(correct[sel].sum())
                tally[1] += int(sel.sum())

    def _epoch_logs(self, split: str) -> dict[str, torch.Tensor]:
        loss = self.loss_avg[split].compute()
        logs = {f"{split}/loss": loss}
        if self.loss_kind == "cross_entropy" and self.acc_avg[split].update_count:
            logs[f"{split}/acc"] = self.acc_avg[split].compute()
        if self.baseline_loss:
            logs[f"{split}/baseline_loss"] = torch.tensor(self.baseline_loss)
            logs[f"{split}/loss_vs_baseline"] = loss / self.baseline_loss
        for d, (right, total) in sorted(self.by_distance[split].items()):
            logs[f"{split}/acc@d={d}"] = torch.tensor(right / max(total, 1))
        if split != "train" and self.loss_kind == "cross_entropy":
            logs.update(self._calibration_logs(split))
        self.loss_avg[split].reset()
        self.acc_avg[split].reset()
        self.by_distance[split].clear()
        return logs

    def _calibration_logs(self, split: str) -> dict[str, torch.Tensor]:
        logs = {}
        for name, metric in (("loss_mc", self.loss_mc_avg), ("acc_mc", self.acc_mc_avg)):
            if metric[split].update_count:
                logs[f"{split}/{name}"] = metric[split].compute()
            metric[split].reset()
        trainer = self.trainer
        if self.reliability_diagrams and not trainer.sanity_checking and trainer.is_global_zero:
            self.calibration.log_figure(split, self.loggers, self.global_step)
        logs.update(self.calibration.epoch_logs(split))
        return logs

    def _training_set_size(self) -> int | None:
        dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        datasets = getattr(dm, "datasets", None)
        return len(datasets["train"]) if datasets else None

    def _output_weight(self) -> torch.Tensor | None:
        return self.model.head.weight

    def training_step(self, batch, batch_idx):
        loss = self._step(batch, "train")
        self.log("train/loss", loss, on_step=True, prog_bar=True, batch_size=len(batch[0]))
        reg = self.concrete_loss()
        return loss if reg is None else loss + reg

    def on_train_epoch_end(self) -> None:
        logs = self._epoch_logs("train")
        logs["train/epoch_loss"] = logs.pop("train/loss")  # train/loss is the per-step curve
        self.log_reduced(logs)

    def validation_step(self, batch, batch_idx) -> None:
        self._step(batch, "val")

    def on_validation_epoch_end(self) -> None:
        logs = self._epoch_logs("val")
        if not self.trainer.sanity_checking:
            self.best["loss"] = min(self.best["loss"], float(logs["val/loss"]))
            logs["hp/val_loss"] = torch.tensor(self.best["loss"])
            if "val/acc" in logs:
                self.best["acc"] = max(self.best["acc"], float(logs["val/acc"]))
                logs["hp/val_acc"] = torch.tensor(self.best["acc"])
        self.log_reduced(logs)
        self.note_validation(float(logs["val/loss"]))
        super().on_validation_epoch_end()

    def on_test_epoch_start(self) -> None:
        self._swap_in_average()

    def test_step(self, batch, batch_idx) -> None:
        self._step(batch, "test")

    def on_test_epoch_end(self) -> None:
        logs = self._epoch_logs("test")
        if "test/acc" in logs:
            logs["hp/test_acc"] = logs["test/acc"]
        self.log_reduced(logs)
        self._swap_out_average()

    def extra_state(self):
        return {"best": dict(self.best)}

    def load_extra_state(self, state) -> None:
        self.best = dict(state["best"])
