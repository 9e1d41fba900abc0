"""Language modelling with truncated backprop through time."""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
from torch.nn import functional as F

from ..analysis.calibration import SplitCalibration
from ..functional import activation_regularization, temporal_activation_regularization
from ..models import LanguageModel
from ..nn import mc_dropout
from .base import OptimizerName, SplitMetric, Task, detach_state, model_hparams

__all__ = ["LanguageModelTask"]

SPLITS = ("train", "val", "test")


class LanguageModelTask(Task):
    r"""Train and evaluate a :class:`~rnndrop.models.LanguageModel` on contiguous BPTT chunks.

    Truncated BPTT as in Zaremba et al. 2014 and AWD-LSTM: the hidden state is carried from
    chunk to chunk and detached, reset at the start of every training epoch and of every
    evaluation. Loss and perplexity are token-weighted over the epoch (``train/loss``,
    ``val/ppl``, ``test/ppl``; ``*/bpc`` bits per character for character corpora).

    With ``mc_samples = S > 0`` evaluation also runs Monte Carlo dropout (Gal & Ghahramani
    2016): ``S`` stochastic passes, each with its own carried state, whose predictive
    distributions are averaged; logged as ``val/ppl_mc`` beside the deterministic
    ``val/ppl``, with the mean predictive entropy ``val/entropy_mc``; the geometric
    aggregation (normalised mean of the passes' log-probabilities) as ``val/ppl_mc_geo``.

    Calibration of every evaluation (:mod:`rnndrop.analysis.calibration`): ``val/ece``,
    ``val/nll``, ``val/brier`` (deterministic), ``val/ece_mc``, ... (MC, arithmetic), and a
    reliability diagram ``val/reliability`` in TensorBoard (the same for ``test/``).

    Args:
        model: the network (its arguments go under ``model:`` in a config).
        optimizer, lr, momentum, weight_decay, lr_decay, decay_start, nonmono, max_norm,
        concrete_length_scale, concrete_dataset_size: see :class:`~rnndrop.lit.base.Task`.
            Gradient clipping is the trainer's ``gradient_clip_val``.
        alpha: activation regularisation ``α·mean(h²)`` on the dropped output (AR).
        beta: temporal activation regularisation ``β·mean((h_t - h_{t-1})²)`` on the
            undropped output (TAR) (both Merity et al. 2017).
        lr_scale_by_length: scale the step size by ``T / bptt`` for chunks of variable length
            ``T`` (AWD-LSTM with ``variable_bptt``).
        loss_reduction: what the optimiser minimises: ``"token_mean"`` (cross-entropy averaged
            over the chunk's tokens; pytorch/examples, AWD-LSTM) or ``"sequence_sum"`` (summed
            over the chunk's ``T`` steps, averaged over the batch: Zaremba et al. 2014 and Gal's
            code, whose learning rate 1 and clipping norm 5 assume it; its gradient is ``T``
            times the token mean's). Logged losses are always per token.
        mc_samples: Monte Carlo evaluation passes (0: off).
        bpc: log bits per character; default: when the data module's corpus is char level.
        reliability_diagrams: draw the reliability diagram into TensorBoard at every
            evaluation's end (about 0.2 s of matplotlib each; the calibration scalars are
            logged either way).
    """

    hp_metrics = ("hp/val_ppl", "hp/test_ppl", "hp/val_ppl_mc")

    def __init__(
        self,
        model: LanguageModel,
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
        alpha: float = 0.0,
        beta: float = 0.0,
        lr_scale_by_length: bool = False,
        loss_reduction: Literal["token_mean", "sequence_sum"] = "token_mean",
        mc_samples: int = 0,
        bpc: bool | None = None,
        reliability_diagrams: bool = True,
    ) -> None:
        super().__init__(optimizer, lr, momentum, weight_decay, lr_decay, decay_start, nonmono,
                         max_norm, concrete_length_scale, concrete_dataset_size)  # fmt: skip
        if mc_samples < 0:
            raise ValueError(f"mc_samples must be >= 0, got {mc_samples}")
        if loss_reduction not in ("token_mean", "sequence_sum"):
            raise ValueError(
                f"loss_reduction must be 'token_mean' or 'sequence_sum', got {loss_reduction!r}"
            )
        self.loss_reduction = loss_reduction
        self.model = model
        self.save_hyperparameters(ignore=["model"])
        self.hparams["model"] = model_hparams(model)
        self.alpha, self.beta, self.mc_samples, self.bpc = alpha, beta, mc_samples, bpc
        self.lr_scale_by_length = lr_scale_by_length
        self.state: dict[str, Any] = dict.fromkeys(SPLITS)
        self.mc_state: dict[str, list[Any] | None] = dict.fromkeys(SPLITS)
        self.nll = SplitMetric()
        self.nll_mc = SplitMetric()
        self.entropy_mc = SplitMetric()
        self.nll_mc_geo = SplitMetric()
        self.calibration = SplitCalibration()
        self.reliability_diagrams = reliability_diagrams
        self.best = {"val": math.inf, "val_mc": math.inf}
        self._lr_scale = 1.0

    def forward(self, tokens: torch.Tensor, state: Any = None):
        return self.model(tokens, state)

    def setup(self, stage: str) -> None:
        super().setup(stage)
        if self.bpc is None:
            corpus = getattr(getattr(self.trainer, "datamodule", None), "corpus", None)
            self.bpc = getattr(corpus, "level", None) == "char"

    # ---- training ----------------------------------------------------------------------------

    def on_train_epoch_start(self) -> None:
        if self.batches_done_this_epoch() == 0:  # a resumed epoch keeps its restored state
            self.state["train"] = None

    def _training_set_size(self) -> int | None:
        dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        corpus = getattr(dm, "corpus", None)
        return len(corpus["train"]) if corpus is not None else None

    def _output_weight(self) -> torch.Tensor | None:
        return self.model.decoder.weight

    def training_step(self, batch, batch_idx):
        x, y = batch  # (B, T)
        out = self.model(x, self.state["train"])
        self.state["train"] = detach_state(out.state)
        loss = F.cross_entropy(out.logits.flatten(0, 1), y.flatten())
        total = loss * x.shape[1] if self.loss_reduction == "sequence_sum" else loss
        if self.alpha:
            total = total + activation_regularization(out.output, self.alpha)
        if self.beta:
            total = total + temporal_activation_regularization(
                out.raw_output, self.beta, batch_first=True
            )
        if (reg := self.concrete_loss()) is not None:
            total = total + reg
        self.nll["train"].update(loss.detach(), y.numel())
        self.log("train/loss", loss, on_step=True, prog_bar=True, batch_size=y.numel())
        if self.lr_scale_by_length:
            bptt = getattr(self.trainer.datamodule, "bptt", x.shape[1])
            self._lr_scale = x.shape[1] / bptt
        return total

    def on_before_optimizer_step(self, optimizer) -> None:
        if self._lr_scale != 1.0:
            for g in optimizer.param_groups:
                g["lr"] *= self._lr_scale

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        if self._lr_scale != 1.0:
            for g in self.optimizers().optimizer.param_groups:
                g["lr"] /= self._lr_scale
            self._lr_scale = 1.0
        super().on_train_batch_end(outputs, batch, batch_idx)

    def on_train_epoch_end(self) -> None:
        loss = self.nll["train"].compute()
        self.nll["train"].reset()
        logs = self._summary("train", loss)
        logs["train/epoch_loss"] = logs.pop("train/loss")  # train/loss is the per-step curve
        self.log_reduced(logs)

    # ---- evaluation --------------------------------------------------------------------------

    def _eval_step(self, batch, split: str) -> None:
        x, y = batch
        out = self.model(x, self.state[split])
        self.state[split] = detach_state(out.state)
        logp = out.logits.float().log_softmax(-1)
        self.nll[split].update(F.nll_loss(logp.flatten(0, 1), y.flatten()), y.numel())
        self.calibration.update(split, logp, y, log=True)
        if self.mc_samples:
            self._mc_step(x, y, split)

    @torch.no_grad()
    def _mc_step(self, x, y, split: str) -> None:
        states = self.mc_state[split] or [None] * self.mc_samples
        probs, logp_sum = 0.0, 0.0
        with mc_dropout(self.model):
            for s in range(self.mc_samples):
                out = self.model(x, states[s])
                states[s] = detach_state(out.state)
                logp = out.logits.float().log_softmax(-1)
                probs = probs + logp.exp()
                logp_sum = logp_sum + logp
        self.mc_state[split] = states
        probs = probs / self.mc_samples  # (B, T, V) predictive distribution
        geo = (logp_sum / self.mc_samples).log_softmax(-1)  # normalised geometric mean
        self.nll_mc_geo[split].update(F.nll_loss(geo.flatten(0, 1), y.flatten()), y.numel())
        self.calibration.update(split, probs, y, kind="mc")
        nll = -probs.gather(-1, y.unsqueeze(-1)).clamp_min(1e-30).log().mean()
        entropy = -(probs * probs.clamp_min(1e-30).log()).sum(-1).mean()
        self.nll_mc[split].update(nll, y.numel())
        self.entropy_mc[split].update(entropy, y.numel())

    def _start_eval(self, split: str) -> None:
        self.state[split], self.mc_state[split] = None, None

    def _end_eval(self, split: str) -> dict[str, float]:
        loss = self.nll[split].compute()
        self.nll[split].reset()
        logs = self._summary(split, loss)
        if self.mc_samples:
            loss_mc = self.nll_mc[split].compute()
            logs[f"{split}/loss_mc"] = loss_mc
            logs[f"{split}/ppl_mc"] = loss_mc.exp()
            logs[f"{split}/entropy_mc"] = self.entropy_mc[split].compute()
            self.nll_mc[split].reset()
            self.entropy_mc[split].reset()
            loss_geo = self.nll_mc_geo[split].compute()
            logs[f"{split}/loss_mc_geo"] = loss_geo
            logs[f"{split}/ppl_mc_geo"] = loss_geo.exp()
            self.nll_mc_geo[split].reset()
        self._log_reliability(split)
        logs.update(self.calibration.epoch_logs(split))
        return logs

    def _log_reliability(self, split: str) -> None:
        trainer = self.trainer
        if self.reliability_diagrams and not trainer.sanity_checking and trainer.is_global_zero:
            self.calibration.log_figure(split, self.loggers, self.global_step)

    def _summary(self, split: str, loss: torch.Tensor) -> dict[str, torch.Tensor]:
        logs = {f"{split}/loss": loss, f"{split}/ppl": loss.exp()}
        if self.bpc:
            logs[f"{split}/bpc"] = loss / math.log(2)
        return logs

    def on_validation_epoch_start(self) -> None:
        super().on_validation_epoch_start()
        self._start_eval("val")

    def validation_step(self, batch, batch_idx) -> None:
        self._eval_step(batch, "val")

    def on_validation_epoch_end(self) -> None:
        logs = self._end_eval("val")
        if not self.trainer.sanity_checking:
            self.best["val"] = min(self.best["val"], float(logs["val/ppl"]))
            logs["hp/val_ppl"] = torch.tensor(self.best["val"])
            if self.mc_samples:
                self.best["val_mc"] = min(self.best["val_mc"], float(logs["val/ppl_mc"]))
                logs["hp/val_ppl_mc"] = torch.tensor(self.best["val_mc"])
        self.log_reduced(logs, prog_bar=False)
        self.note_validation(float(logs["val/loss"]))
        super().on_validation_epoch_end()

    def on_test_epoch_start(self) -> None:
        self._swap_in_average()
        self._start_eval("test")

    def test_step(self, batch, batch_idx) -> None:
        self._eval_step(batch, "test")

    def on_test_epoch_end(self) -> None:
        logs = self._end_eval("test")
        logs["hp/test_ppl"] = logs["test/ppl"]
        self.log_reduced(logs)
        self._swap_out_average()

    # ---- checkpoints ------------------------------------------------------------------------

    def extra_state(self) -> dict[str, Any]:
        return {"train_state": self.state["train"], "best": dict(self.best)}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        self.state["train"] = state["train_state"]
        self.best = dict(state["best"])
