"""Deterministic and Monte Carlo evaluation of a sequence model on a loader."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from ..nn import mc_dropout

__all__ = ["evaluate_sequence_model"]


@torch.no_grad()
def evaluate_sequence_model(
    model: nn.Module,
    loader,
    *,
    task: Any = None,
    mc_samples: int = 0,
    device: torch.device | str = "cpu",
) -> dict[str, float]:
    """Loss and accuracy, deterministic and (with ``mc_samples > 0``) Monte Carlo.

    Deterministic: eval mode, every dropout at its expectation. Monte Carlo (Gal &
    Ghahramani 2016): ``mc_samples`` stochastic passes in eval mode (:func:`mc_dropout`),
    predictive distributions averaged. Reported for classification:

    - ``loss``, ``acc``: deterministic cross-entropy (all targets) and accuracy where the task
      tests memory (``task.memory_mask``, else every target);
    - ``loss_mc``, ``acc_mc``: the same for the MC-averaged distribution;
    - ``mc_tv``: mean total-variation distance between the MC and deterministic predictive
      distributions (0: MC changes nothing);
    - ``mc_entropy``: mean entropy of the MC predictive distribution (nats).

    For regression (``task.loss == "mse"``) ``loss`` and ``loss_mc`` are MSEs and ``mc_std``
    the mean standard deviation of the MC predictions.
    """
    was = model.training
    model.eval()
    sums: dict[str, float] = {}
    counts: dict[str, float] = {}

    def add(key: str, value: float, n: float) -> None:
        sums[key] = sums.get(key, 0.0) + value
        counts[key] = counts.get(key, 0.0) + n

    regression = getattr(task, "loss", "cross_entropy") == "mse"
    try:
        for x, y in loader:
            x, y = x.to(device), y.to(device)
            det = model(x).prediction.float()
            samples = []
            if mc_samples:
                with mc_dropout(model):
                    samples = [model(x).prediction.float() for _ in range(mc_samples)]
            if regression:
                _regression(det, samples, y, add)
            else:
                _classification(det, samples, y, task, add)
    finally:
        model.train(was)
    return {k: sums[k] / counts[k] if counts[k] else math.nan for k in sums}


def _regression(det, samples, y, add) -> None:
    y = y.float()
    add("loss", float(F.mse_loss(det.squeeze(-1), y, reduction="sum")), y.numel())
    if samples:
        stack = torch.stack([s.squeeze(-1) for s in samples])
        add("loss_mc", float(F.mse_loss(stack.mean(0), y, reduction="sum")), y.numel())
        add("mc_std", float(stack.std(0).sum()), y.numel())


def _classification(det, samples, y, task, add) -> None:
    valid = y != -100
    scored = task.memory_mask(y) if hasattr(task, "memory_mask") else valid
    p_det = det.softmax(-1)
    n = float(valid.sum())
    add("loss", float(F.cross_entropy(det[valid], y[valid], reduction="sum")), n)
    add("acc", float((det.argmax(-1) == y)[scored].sum()), float(scored.sum()))
    if not samples:
        return
    p_mc = torch.stack([s.softmax(-1) for s in samples]).mean(0)
    logp = p_mc.clamp_min(1e-30).log()
    add("loss_mc", float(-logp[valid].gather(-1, y[valid].unsqueeze(-1)).sum()), n)
    add("acc_mc", float((p_mc.argmax(-1) == y)[scored].sum()), float(scored.sum()))
    add("mc_tv", float(0.5 * (p_mc - p_det).abs().sum(-1)[valid].sum()), n)
    add("mc_entropy", float(-(p_mc * logp).sum(-1)[valid].sum()), n)
