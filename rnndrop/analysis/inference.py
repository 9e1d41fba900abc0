"""Test-time inference compared on one set of predictions: weight scaling, MC arithmetic,
MC geometric; their accuracy, NLL, calibration, and convergence in the number of samples.

:func:`collect_predictions` runs a sequence model deterministically and with ``S`` sampled
masks on the targets a task scores; :func:`evaluate_inference` scores the three predictions
(:mod:`rnndrop.analysis.calibration`, which needs torchmetrics) and the convergence of both
Monte Carlo aggregations in ``S`` (:func:`rnndrop.analysis.mc_aggregate`);
:func:`learned_rates` reads the rates of learnable-rate (concrete) dropout from a model.
``rnndrop study inference`` (:mod:`rnndrop.study.inference`) runs them per scheme.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ..nn import mc_dropout
from .ensembles import mc_aggregate

__all__ = ["METHODS", "SCORES", "collect_predictions", "evaluate_inference", "learned_rates"]

#: The three predictions compared, in report order.
METHODS: tuple[str, ...] = ("weight_scaling", "mc_arithmetic", "mc_geometric")
#: The scores of each prediction (with ``mce`` and ``confidence`` besides).
SCORES: tuple[str, ...] = ("acc", "nll", "ece", "brier")


@torch.no_grad()
def collect_predictions(
    model: nn.Module, loader, samples: int, *, task: Any = None
) -> tuple[Tensor, Tensor, Tensor]:
    """Deterministic and ``samples`` Monte Carlo logits on the scored targets of ``loader``.

    The scored targets are those the task's ``memory_mask`` selects (else every target that
    is not -100). The model is put in eval mode (restored after); MC passes sample every
    rnndrop dropout site (:func:`rnndrop.nn.mc_dropout`).

    Returns:
        ``(scaled, sampled, target)``: logits ``(N, C)``, ``(S, N, C)`` and classes ``(N,)``,
        float32 on the CPU.
    """
    was = model.training
    model.eval()
    det, mc, targets = [], [], []
    device = next(model.parameters()).device
    try:
        for x, y in loader:
            x, y = x.to(device), y.to(device)
            scored = task.memory_mask(y) if hasattr(task, "memory_mask") else y != -100
            det.append(model(x).prediction.float()[scored].cpu())
            with mc_dropout(model):
                mc.append(torch.stack([model(x).prediction.float()[scored].cpu()
                                       for _ in range(samples)]))  # fmt: skip
            targets.append(y[scored].cpu())
    finally:
        model.train(was)
    return torch.cat(det), torch.cat(mc, 1), torch.cat(targets)


def _scores(logp: Tensor, target: Tensor, n_bins: int, bins: dict | None = None):
    """Scores of one prediction; with ``bins``, its reliability bins go in there too."""
    from .calibration import Calibration

    metric = Calibration(n_bins=n_bins)
    metric.update(logp, target, log=True)
    m = {k: float(v) for k, v in metric.compute().items()}
    if bins is not None:
        rel = metric.reliability()
        bins.update(count=rel.count.tolist(),
                    confidence_sum=(rel.confidence.nan_to_num() * rel.count).tolist(),
                    correct_sum=(rel.accuracy.nan_to_num() * rel.count).tolist())  # fmt: skip
    return {k: m[k] for k in (*SCORES, "mce", "confidence")}


def evaluate_inference(
    scaled: Tensor,
    sampled: Tensor,
    target: Tensor,
    *,
    sample_sizes: Sequence[int] = (1, 2, 5, 10, 50),
    n_bins: int = 15,
) -> dict[str, Any]:
    """Score weight scaling, MC arithmetic and MC geometric on the same targets.

    Args:
        scaled: deterministic logits ``(N, C)``.
        sampled: Monte Carlo logits ``(S_max, N, C)``, ``S_max >= max(sample_sizes)``.
        target: classes ``(N,)``.
        sample_sizes: the ``S`` of the convergence curve.
        n_bins: ECE bins.

    Returns:
        ``{"methods": {method: {acc, nll, ece, brier, mce, confidence}}, "convergence":
        {aggregate: {S: {score: [mean, std over groups, groups]}}}, "mc_samples": S_max,
        "targets": N, "bins": {method: {count, confidence_sum, correct_sum}}}`` (the
        reliability bins, which pool over runs by adding). The MC methods aggregate the
        first ``max(sample_sizes)`` draws; the convergence at ``S`` splits those into
        ``S_max // S`` disjoint groups.
    """
    s_max = max(sample_sizes)
    if sampled.shape[0] < s_max:
        raise ValueError(f"{sampled.shape[0]} MC samples given, sample_sizes needs {s_max}")
    sampled = sampled[:s_max]
    bins: dict[str, dict[str, list[float]]] = {m: {} for m in METHODS}
    methods = {"weight_scaling": _scores(scaled.float().log_softmax(-1), target, n_bins,
                                         bins["weight_scaling"])}  # fmt: skip
    for agg in ("arithmetic", "geometric"):
        logp = mc_aggregate(sampled, agg, log=True)
        methods[f"mc_{agg}"] = _scores(logp, target, n_bins, bins[f"mc_{agg}"])
    convergence: dict[str, dict[int, dict[str, list[float]]]] = {}
    for agg in ("arithmetic", "geometric"):
        curve = {}
        for s in sample_sizes:
            groups = [_scores(mc_aggregate(sampled[g * s : (g + 1) * s], agg, log=True), target,
                              n_bins) for g in range(s_max // s)]  # fmt: skip
            curve[int(s)] = {k: _mean_std([g[k] for g in groups]) for k in SCORES}
        convergence[agg] = curve
    return {"methods": methods, "convergence": convergence, "mc_samples": s_max,
            "targets": int(target.numel()), "bins": bins}  # fmt: skip


def _mean_std(values: list[float]) -> list[float]:
    n = len(values)
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else math.nan
    return [mean, std, float(n)]


def learned_rates(model: nn.Module) -> dict[str, float]:
    """Learned dropout rates of ``model`` (concrete dropout), ``{}`` when it has none.

    rnndrop's recurrent layers report theirs (:func:`rnndrop.nn.concrete_rates`: keys
    ``"<module path>/<site>"``). Other modules: a ``learned_rates()`` method (a mapping of site
    to rate) where one exists, else every parameter whose name contains ``rate`` (its mean) or
    ``logit`` (the sigmoid of its mean) is read as a rate.
    """
    from ..nn import concrete_rates

    out = dict(concrete_rates(model))
    if out:
        return out
    for prefix, module in model.named_modules():
        fn = getattr(module, "learned_rates", None)
        if callable(fn) and module is not model:
            for site, value in dict(fn()).items():
                key = f"{prefix}.{site}" if prefix else str(site)
                out[key] = float(torch.as_tensor(value).float().mean())
    if out:
        return out
    for name, p in model.named_parameters():
        low = name.lower()
        if "logit" in low:
            out[name] = float(torch.sigmoid(p.detach().float().mean()))
        elif "rate" in low:
            out[name] = float(p.detach().float().mean())
    return out
