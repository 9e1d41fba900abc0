"""Dropout as an ensemble: the exact ensemble of every mask, and Monte Carlo estimates of it.

Dropout on ``N`` units trains ``2^N`` weight-sharing subnetworks. At test time there are two
natural ways to combine them, and two shortcuts:

- the *arithmetic* ensemble, the mean of the subnetworks' predictive distributions (what
  Monte Carlo dropout estimates; Gal & Ghahramani 2016);
- the *geometric* ensemble, the normalised weighted geometric mean of those distributions;
- *weight scaling*: one forward with every unit kept at its expectation (inverted dropout:
  the identity at test time; Srivastava et al. 2014);
- Monte Carlo with ``S`` sampled masks, aggregated either way (:func:`mc_aggregate`).

:func:`exact_ensemble` enumerates all ``2^N`` masks of a small layer, so the shortcuts can be
measured against the ensembles they stand for (:func:`categorical_kl`,
:func:`mc_convergence`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch
from torch import Tensor

from ..config import check_rate

__all__ = [
    "AGGREGATES",
    "DEFAULT_SAMPLE_SIZES",
    "MAX_EXACT_UNITS",
    "Ensemble",
    "categorical_kl",
    "exact_ensemble",
    "mc_aggregate",
    "mc_convergence",
    "mc_predict",
]

#: Largest ``N`` :func:`exact_ensemble` enumerates: ``2^20`` (about a million) forwards of
#: ``f`` per row. Cost and time double with every unit, so beyond this use Monte Carlo.
MAX_EXACT_UNITS = 20

#: The aggregations of Monte Carlo samples: mean of probabilities, or normalised mean of
#: log-probabilities.
AGGREGATES: tuple[str, ...] = ("arithmetic", "geometric")

#: The sample counts :func:`mc_convergence` reports by default.
DEFAULT_SAMPLE_SIZES: tuple[int, ...] = (1, 2, 5, 10, 50)

_ROWS_PER_CHUNK = 1 << 17  # patterns x batch rows passed to ``f`` in one call


class Ensemble(NamedTuple):
    """The three test-time predictions of a dropout layer, each ``(B, C)`` probabilities.

    Attributes:
        arithmetic: mean of the subnetworks' softmax outputs, weighted by mask probability.
        geometric: normalised weighted geometric mean of those outputs.
        scaled: ``softmax(f(h))``, weight scaling (inverted dropout's deterministic eval).
    """

    arithmetic: Tensor
    geometric: Tensor
    scaled: Tensor


@torch.no_grad()
def exact_ensemble(
    f: Callable[[Tensor], Tensor],
    h: Tensor,
    p: float,
    *,
    max_units: int = MAX_EXACT_UNITS,
) -> Ensemble:
    r"""The exact dropout ensemble over every keep/drop pattern of ``N`` units.

    ``h`` holds ``N`` units under inverted dropout at rate ``p``: a mask ``m`` keeps each unit
    independently with probability ``q = 1 - p`` and scales kept units by ``1/q``, so
    ``E[m] = 1``. For every one of the ``2^N`` patterns ``m`` (probability
    ``q^k p^(N-k)`` with ``k`` units kept) this evaluates ``f(h ⊙ m)`` and combines the
    subnetworks' distributions two ways (Srivastava et al. 2014, sec. 7.5; Baldi & Sadowski
    2013)::

        arithmetic = Σ_m P(m) softmax(f(h ⊙ m))
        geometric  = softmax(Σ_m P(m) log_softmax(f(h ⊙ m)))   (normalised geometric mean)
        scaled     = softmax(f(h))                               (weight scaling)

    The identity: for an affine ``f(x) = W x + b``, ``log_softmax(f(h ⊙ m)) = W (h ⊙ m) + b
    - log Z(m)``; its ``P``-weighted mean is ``W (h ⊙ E[m]) + b - const = f(h) - const``,
    and the constant cancels on normalising, so ``geometric == scaled`` exactly: weight
    scaling *is* the normalised geometric ensemble of a softmax layer. For a nonlinear ``f``
    (a hidden layer between the dropped units and the softmax) it is only an approximation,
    and neither shortcut equals the arithmetic ensemble in general.

    Masks are enumerated in chunks of patterns, each chunk one batched call of ``f``;
    probabilities and log-probabilities are accumulated in float64. The masked inputs keep
    ``h``'s dtype, so a float32 ``f`` is evaluated in float32. rnndrop's own masks
    (:func:`rnndrop.functional.bernoulli_mask`) realise ``keep_probability(p)``, which
    differs from ``1 - p`` by less than ``7.7e-6``; the enumeration uses ``1 - p``.

    Args:
        f: maps masked units ``(M, N)`` to logits ``(M, C)`` for any ``M`` (rows are
            independent: no batch statistics), e.g. the layers after the dropout.
        h: the units before dropout.
        p: drop rate in [0, 1).
        max_units: refuse ``N`` above this (default :data:`MAX_EXACT_UNITS`, 20): the cost is
            ``2^N`` evaluations of ``f`` per row.

    Returns:
        :class:`Ensemble` ``(arithmetic, geometric, scaled)``, float64 probabilities.

    Shape:
        - h: ``(B, N)``
        - f: ``(M, N) -> (M, C)``
        - each returned tensor: ``(B, C)``

    Raises:
        ValueError: ``h`` is not 2-D, ``p`` is not in [0, 1), ``N > max_units``, or ``f``
            returns the wrong shape.
    """
    p = check_rate("p", p)
    if h.dim() != 2:
        raise ValueError(f"exact_ensemble: h must be (B, N), got shape {tuple(h.shape)}")
    B, n = h.shape
    if n > max_units:
        raise ValueError(
            f"exact_ensemble: N={n} units means 2^{n} = {2**n:,} subnetworks per row, above "
            f"the limit of {max_units} units (2^{max_units} = {2**max_units:,}): the cost "
            "doubles with every unit; estimate the ensemble by Monte Carlo (mc_predict) instead"
        )
    q = 1.0 - p

    scaled_logits = _logits(f, h, B)
    C = scaled_logits.shape[-1]
    scaled = scaled_logits.double().softmax(-1)
    arith = torch.zeros(B, C, dtype=torch.float64, device=h.device)
    geo = torch.zeros(B, C, dtype=torch.float64, device=h.device)

    bits = 1 << torch.arange(n, device=h.device)
    total = 1 << n
    chunk = max(1, min(total, _ROWS_PER_CHUNK // max(B, 1)))
    for start in range(0, total, chunk):
        codes = torch.arange(start, min(start + chunk, total), device=h.device)
        keep = (codes[:, None] & bits) != 0  # (M, N): unit j kept in pattern `code`
        kept = keep.sum(1, dtype=torch.float64)
        weight = q**kept * p ** (n - kept)  # P(pattern), exact in float64
        mask = keep.to(h.dtype) / q  # inverted scaling
        x = (h[None] * mask[:, None]).reshape(-1, n)  # (M*B, N), pattern-major
        logits = _logits(f, x, x.shape[0]).double().view(-1, B, C)
        arith += torch.einsum("m,mbc->bc", weight, logits.softmax(-1))
        geo += torch.einsum("m,mbc->bc", weight, logits.log_softmax(-1))
    return Ensemble(arithmetic=arith, geometric=geo.softmax(-1), scaled=scaled)


def _logits(f: Callable[[Tensor], Tensor], x: Tensor, rows: int) -> Tensor:
    out = f(x)
    if not isinstance(out, Tensor) or out.dim() != 2 or out.shape[0] != rows:
        shape = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
        raise ValueError(
            f"exact_ensemble: f must map ({rows}, N) units to ({rows}, C) logits, got {shape}"
        )
    return out


def _check_aggregate(aggregate: str) -> str:
    if aggregate not in AGGREGATES:
        raise ValueError(f"aggregate must be one of {list(AGGREGATES)}, got {aggregate!r}")
    return aggregate


def mc_aggregate(
    logits: Tensor, aggregate: str = "arithmetic", *, dim: int = 0, log: bool = False
) -> Tensor:
    r"""Combine ``S`` sampled forwards (stacked along ``dim``) into one predictive distribution.

    - ``"arithmetic"``: ``(1/S) Σ_s softmax(z_s)``, the Monte Carlo estimate of the arithmetic
      ensemble (Gal & Ghahramani 2016);
    - ``"geometric"``: ``softmax((1/S) Σ_s log_softmax(z_s))``, the estimate of the normalised
      geometric ensemble.

    Computed in at least float32 (float64 stays float64), in log space.

    Args:
        logits: the sampled logits.
        aggregate: ``"arithmetic"`` or ``"geometric"``.
        dim: the sample dimension.
        log: return log-probabilities (for NLL and perplexity) instead of probabilities.

    Shape:
        ``(S, *, C)`` (with ``dim=0``) -> ``(*, C)``.
    """
    _check_aggregate(aggregate)
    z = logits.to(torch.promote_types(logits.dtype, torch.float32)).log_softmax(-1)
    S = z.shape[dim]
    if aggregate == "arithmetic":
        out = torch.logsumexp(z, dim) - math.log(S)
    else:
        out = z.mean(dim).log_softmax(-1)
    return out if log else out.exp()


def mc_predict(
    model_fn: Callable[[], Tensor],
    samples: int,
    aggregate: str = "arithmetic",
    *,
    log: bool = False,
) -> Tensor:
    """Monte Carlo prediction: ``samples`` stochastic forwards, aggregated.

    ``model_fn()`` runs one forward with freshly sampled masks (for an rnndrop model, call it
    inside :func:`rnndrop.nn.mc_dropout` and ``torch.no_grad()``) and returns logits
    ``(*, C)``. See :func:`mc_aggregate` for the two aggregations.

    Shape:
        returns ``(*, C)`` probabilities (log-probabilities with ``log=True``).
    """
    _check_aggregate(aggregate)
    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
        raise ValueError(f"samples must be an integer >= 1, got {samples!r}")
    return mc_aggregate(torch.stack([model_fn() for _ in range(samples)]), aggregate, log=log)


def categorical_kl(p: Tensor, q: Tensor) -> Tensor:
    r"""``KL(p ‖ q) = Σ_c p_c (log p_c - log q_c)`` over the last dimension, per row.

    Terms with ``p_c = 0`` count 0; ``q`` is clamped at the dtype's smallest normal number so
    a zero where ``p`` has mass gives a large finite value. Computed in float64.

    Shape:
        ``(*, C)``, ``(*, C)`` -> ``(*)``.
    """
    p, q = p.double(), q.double()
    tiny = torch.finfo(torch.float64).tiny
    terms = p * (p.clamp_min(tiny).log() - q.clamp_min(tiny).log())
    return torch.where(p > 0, terms, torch.zeros_like(terms)).sum(-1)


def mc_convergence(
    samples: Tensor | Callable[[], Tensor],
    reference: Tensor,
    sample_sizes: Sequence[int] = DEFAULT_SAMPLE_SIZES,
    aggregate: str = "arithmetic",
) -> dict[int, float]:
    """How far the ``S``-sample Monte Carlo estimate lies from a reference, for each ``S``.

    Draws ``max(sample_sizes)`` forwards once (or takes them, stacked) and, for each ``S``,
    aggregates the first ``S`` (nested prefixes of one sequence of draws, so the curve is
    one run's convergence) and reports the mean over rows of ``KL(reference ‖ estimate)``
    (:func:`categorical_kl`). The reference is typically the exact ensemble
    (:func:`exact_ensemble`) or a many-sample estimate.

    Args:
        samples: logits ``(S_max, *, C)`` with ``S_max >= max(sample_sizes)``, or a callable
            returning one sampled forward's logits ``(*, C)``.
        reference: probabilities ``(*, C)``.
        sample_sizes: the ``S`` to report (default 1, 2, 5, 10, 50).
        aggregate: ``"arithmetic"`` or ``"geometric"``.

    Returns:
        ``{S: mean KL(reference ‖ estimate_S)}`` in nats.
    """
    _check_aggregate(aggregate)
    sizes = [int(s) for s in sample_sizes]
    if not sizes or min(sizes) < 1:
        raise ValueError(f"sample_sizes must be integers >= 1, got {list(sample_sizes)}")
    if callable(samples) and not isinstance(samples, Tensor):
        samples = torch.stack([samples() for _ in range(max(sizes))])
    if samples.shape[0] < max(sizes):
        raise ValueError(
            f"mc_convergence: {samples.shape[0]} samples given, sample_sizes needs {max(sizes)}"
        )
    return {
        s: float(categorical_kl(reference, mc_aggregate(samples[:s], aggregate)).mean())
        for s in sizes
    }
