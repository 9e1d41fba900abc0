"""How much context a language model uses (Khandelwal, He, Qi & Jurafsky 2018).

"Sharp nearby, fuzzy far away": perturb the context farther than ``d`` tokens from the
target and measure how much the loss on the *same* targets rises. Three perturbations:

- ``shuffle``: the far tokens are permuted (word order destroyed, words kept);
- ``replace``: the far tokens are replaced by tokens drawn from the text's unigram
  distribution (words destroyed, length kept);
- ``cut``: the context is truncated to the last ``d`` tokens (restricted context).

Each target is predicted from a fixed window of ``window`` preceding tokens read from a zero
state, so the unperturbed reference and every perturbation see the same targets.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torch.nn import functional as F

__all__ = ["MODES", "compare_probes", "context_usage", "effective_context"]

MODES = ("shuffle", "replace", "cut")


def _last_logits(model: nn.Module, x: Tensor) -> Tensor:
    """The prediction after the last token, ``(B, V)``: the model's own ``last_logits`` where
    it has one (:meth:`~rnndrop.models.LanguageModel.last_logits` decodes that position only),
    else the last position of its whole output."""
    last = getattr(model, "last_logits", None)
    return last(x) if callable(last) else model(x).logits[:, -1]


@torch.no_grad()
def _last_step_nll(model: nn.Module, x: Tensor, y: Tensor, batch_size: int) -> Tensor:
    """Per-target NLL of ``y`` given contexts ``x`` (N, L): the prediction after the last token."""
    out = []
    for i in range(0, len(x), batch_size):
        logits = _last_logits(model, x[i : i + batch_size]).float()  # (b, V)
        out.append(F.cross_entropy(logits, y[i : i + batch_size], reduction="none"))
    return torch.cat(out)


@torch.no_grad()
def context_usage(
    model: nn.Module,
    stream: Tensor,
    distances: Sequence[int],
    *,
    modes: Sequence[str] = MODES,
    window: int = 200,
    n_targets: int = 500,
    batch_size: int = 64,
    seed: int = 0,
    bootstrap: int = 0,
    threshold: float = 0.01,
    per_target: bool = False,
) -> dict[str, object]:
    """Loss increase when the context beyond each distance is perturbed.

    Args:
        model: a language model: ``model(tokens (B, T)).logits`` is ``(B, T, V)``, the
            prediction of the token after each position (e.g. :class:`~rnndrop.models.
            LanguageModel`). It is run in eval mode.
        stream: held-out token ids, ``(N,)``.
        distances: the ``d`` to probe (``1 <= d < window``); the ``d`` tokens right before
            the target are never touched.
        modes: any of ``"shuffle"``, ``"replace"``, ``"cut"``.
        window: context length of the unperturbed reference.
        n_targets: targets sampled uniformly from the stream (seeded).
        bootstrap: resamples of the targets for percentile bootstrap intervals (0: none).
            One set of resampled targets serves every mode and ``d``, as the probe itself
            scores the same targets for each.
        threshold: the relative loss increase that counts as "still used", for the effective
            context (:func:`effective_context` at ``threshold`` x the reference loss).
        per_target: also return ``"per_target"``: the targets' positions in ``stream``, their
            reference NLL and each mode's and distance's per-target increase (tensors), for
            paired comparisons between models probed with the same ``seed``.

    Returns:
        ``{"loss": reference NLL, "increase": {mode: {d: mean NLL increase (nats)}},
        "stderr": {mode: {d: standard error of that mean}},
        "effective": {mode: effective context or None}}``; with ``bootstrap``, also
        ``"ci"`` (``{mode: {d: [low, high]}}``, 95% percentile intervals of the mean
        increase), ``"loss_ci"`` and ``"effective_ci"`` (``{mode: [low, high]}``, the 2.5% and
        97.5% quantiles of the resampled effective context; ``None`` stands for "beyond the
        largest d").
    """
    if bootstrap < 0:
        raise ValueError(f"bootstrap must be >= 0 resamples, got {bootstrap}")
    if not 0 < threshold < 1:
        raise ValueError(f"threshold is a relative loss increase in (0, 1), got {threshold}")
    bad = [m for m in modes if m not in MODES]
    if bad:
        raise ValueError(f"unknown context perturbation(s) {bad}; choose from {list(MODES)}")
    if any(not 1 <= d < window for d in distances):
        raise ValueError(f"distances must lie in [1, {window - 1}], got {list(distances)}")
    if len(stream) <= window + 1:
        raise ValueError(f"stream of {len(stream)} tokens is too short for window={window}")
    gen = torch.Generator().manual_seed(seed)
    device = next(model.parameters()).device
    was = model.training
    model.eval()
    try:
        t = torch.randint(window, len(stream), (n_targets,), generator=gen)
        idx = t[:, None] - window + torch.arange(window)[None, :]
        x, y = stream[idx].to(device), stream[t].to(device)  # (N, window), (N,)
        ref = _last_step_nll(model, x, y, batch_size)
        unigram = torch.bincount(stream, minlength=int(stream.max()) + 1).double()
        increase: dict[str, dict[int, float]] = {m: {} for m in modes}
        stderr: dict[str, dict[int, float]] = {m: {} for m in modes}
        diffs: dict[str, dict[int, Tensor]] = {m: {} for m in modes}
        for mode in modes:
            for d in distances:
                xp = _perturb(x, d, mode, unigram, gen)
                diff = _last_step_nll(model, xp, y, batch_size) - ref
                diffs[mode][d] = diff.double().cpu()
                increase[mode][d] = float(diff.mean())
                stderr[mode][d] = float(diff.std() / len(diff) ** 0.5) if len(diff) > 1 else 0.0
    finally:
        model.train(was)
    loss = float(ref.mean())
    out: dict[str, object] = {
        "loss": loss, "increase": increase, "stderr": stderr,
        "effective": {m: effective_context(increase[m], threshold * loss) for m in modes},
    }  # fmt: skip
    if bootstrap:
        out.update(_bootstrap(ref.double().cpu(), diffs, threshold, bootstrap, seed))
    if per_target:
        out["per_target"] = {"positions": t, "loss": ref.double().cpu(), "increase": diffs}
    return out


def _bootstrap(
    ref: Tensor, diffs: dict[str, dict[int, Tensor]], threshold: float, n: int, seed: int
) -> dict[str, object]:
    """Percentile intervals over resampled targets: each resample draws the targets with
    replacement once and rescores every mode and distance (and the effective context, whose
    threshold follows the resampled loss) on them."""
    idx = _resamples(len(ref), n, seed + 1)
    losses = ref[idx].mean(1)  # (n,)
    ci: dict[str, dict[int, list[float]]] = {}
    effective_ci: dict[str, list[int | None]] = {}
    for mode, by_d in diffs.items():
        ds = sorted(by_d)
        means = torch.stack([by_d[d][idx].mean(1) for d in ds], 1)  # (n, len(ds))
        lo, hi = _percentiles(means)
        ci[mode] = {d: [float(lo[i]), float(hi[i])] for i, d in enumerate(ds)}
        # smallest d from which on every mean stays below the threshold; len(ds): none does
        below = means < threshold * losses[:, None]
        tail = below.flip(1).cumprod(1).flip(1).bool()  # every d' >= d below
        first = torch.where(tail.any(1), tail.float().argmax(1), torch.full((n,), len(ds)))
        ranks = first.double()  # quantiles of a rank: outward to a probed d
        q = [int(ranks.quantile(0.025, interpolation="lower")),
             int(ranks.quantile(0.975, interpolation="higher"))]  # fmt: skip
        effective_ci[mode] = [ds[i] if i < len(ds) else None for i in q]
    lo, hi = _percentiles(losses)
    return {"ci": ci, "loss_ci": [float(lo), float(hi)], "effective_ci": effective_ci,
            "bootstrap": n}  # fmt: skip


def _resamples(n_targets: int, n: int, seed: int) -> Tensor:
    """``(n, n_targets)`` indices: ``n`` bootstrap resamples of the targets (seeded)."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(n_targets, (n, n_targets), generator=gen)


def _percentiles(means: Tensor) -> tuple[Tensor, Tensor]:
    """The 95% percentile interval of resampled means (over dim 0)."""
    return means.quantile(0.025, 0), means.quantile(0.975, 0)


def _perturb(x: Tensor, d: int, mode: str, unigram: Tensor, gen: torch.Generator) -> Tensor:
    far = x.shape[1] - d  # positions [0, far) lie more than d tokens before the target
    if mode == "cut":
        return x[:, far:]
    out = x.clone()
    if mode == "shuffle":
        keys = torch.rand(x.shape[0], far, generator=gen)
        out[:, :far] = x[:, :far].gather(1, keys.argsort(1).to(x.device))
    else:  # replace
        draws = torch.multinomial(unigram, x.shape[0] * far, replacement=True, generator=gen)
        out[:, :far] = draws.view(x.shape[0], far).to(x.device)
    return out


def effective_context(increase: dict[int, float], threshold: float) -> int | None:
    """Smallest probed ``d`` from which on every increase stays below ``threshold`` nats.

    The model no longer uses (in this perturbation's sense) what lies beyond it. ``None``
    if even the largest probed distance matters.
    """
    ds = sorted(increase)
    for i, d in enumerate(ds):
        if all(increase[e] < threshold for e in ds[i:]):
            return d
    return None


def compare_probes(
    a: dict[str, object], b: dict[str, object], bootstrap: int = 1000, seed: int = 0
) -> dict[str, object]:
    """Paired difference ``a - b`` between two models probed on the same targets.

    ``a`` and ``b`` are :func:`context_usage`'s ``"per_target"`` results (``per_target=True``)
    from the same stream, window, ``n_targets`` and ``seed``. The targets are resampled once
    for every comparison (a percentile bootstrap over targets, ``bootstrap`` resamples).

    Returns:
        ``{"loss": [mean, low, high], "increase": {mode: {d: [mean, low, high]}}}``: the mean
        difference of the reference NLL and of each increase, with its 95% interval.
    """
    if bootstrap < 1:
        raise ValueError(f"bootstrap must be >= 1 resamples, got {bootstrap}")
    if not torch.equal(a["positions"], b["positions"]):
        raise ValueError("the probes scored different targets: probe both models with the "
                         "same stream, window, n_targets and seed")  # fmt: skip
    idx = _resamples(len(a["positions"]), bootstrap, seed)

    def interval(diff: Tensor) -> list[float]:
        lo, hi = _percentiles(diff.double()[idx].mean(1))
        return [float(diff.double().mean()), float(lo), float(hi)]

    common = [m for m in a["increase"] if m in b["increase"]]
    return {"loss": interval(a["loss"] - b["loss"]),
            "increase": {m: {d: interval(a["increase"][m][d] - b["increase"][m][d])
                             for d in a["increase"][m] if d in b["increase"][m]}
                         for m in common}}  # fmt: skip
