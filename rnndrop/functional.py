"""Dropout for recurrent networks as pure functions.

Every function takes the rate and a ``training`` flag explicitly and returns its
input untouched when ``training`` is false or the rate is 0. Masks come from
:func:`bernoulli_mask`, which all of rnndrop uses, so a seed fixes every mask.
Imports torch and rnndrop's own kernel loader (:mod:`rnndrop.kernels.cpp.build`, itself
torch-only), whose compiled mask kernel it uses when it is already loaded.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .config import CONCRETE_RATE_BOUNDS, check_rate
from .kernels.cpp import build as _ext

__all__ = [
    "activation_regularization",
    "bernoulli_mask",
    "concrete_logit",
    "concrete_logit_init",
    "concrete_mask",
    "draw_seed",
    "drop_path",
    "drop_path_mask",
    "embedding_dropout",
    "keep_probability",
    "locked_dropout",
    "seeded_mask",
    "seeded_mask_mul",
    "sequence_mask",
    "temporal_activation_regularization",
    "traced",
    "zoneout",
]

_LEVELS = 1 << 16  # masks compare 16-bit random integers with a threshold

# SplitMix64 constants, as signed int64 (torch has no uint64 arithmetic)
_GOLDEN = 0x9E3779B97F4A7C15 - (1 << 64)
_MIX1 = 0xBF58476D1CE4E5B9 - (1 << 64)
_MIX2 = 0x94D049BB133111EB - (1 << 64)


def keep_probability(p: float) -> float:
    """The keep probability a mask with drop rate ``p`` really has.

    Masks compare 16-bit random integers against a threshold, so ``1 - p`` is
    rounded to a multiple of 2^-16 (an error below 7.7e-6). Inverted dropout scales
    by this realised value, so the mask's expectation is exactly 1.
    """
    return round((1.0 - p) * _LEVELS) / _LEVELS


def _functorch_active() -> bool:
    """Inside a ``torch.func`` transform (grad, vmap, ...) tensors have no storage the
    compiled kernel could write: masks come from plain torch ops there."""
    active = getattr(torch._C, "_are_functorch_transforms_active", None)
    return bool(active is not None and active())


def traced() -> bool:
    """Under ``torch.compile`` or a ``torch.func`` transform."""
    compiler = getattr(torch, "compiler", None)
    return bool(compiler is not None and compiler.is_compiling()) or _functorch_active()


@torch.compiler.disable  # a Python int from the generator: drawn eagerly under torch.compile
def draw_seed(generator: torch.Generator | None) -> int:
    """One 64-bit mask seed from ``generator`` (or torch's global CPU generator)."""
    word = torch.empty((), dtype=torch.int64)
    return int(word.random_(-(2**63), 2**63 - 1, generator=generator))


def _shr(z: Tensor, k: int) -> Tensor:
    return (z >> k) & ((1 << (64 - k)) - 1)  # logical shift of an int64


def _eager(fn):
    """Keep ``fn`` out of ``torch.compile`` graphs: inductor's int64 code for the mixing below
    does not give the eager bits (measured: different, and biased, masks), and a mask must
    not depend on whether the model is compiled."""
    disable = getattr(getattr(torch, "compiler", None), "disable", None)
    return disable(fn) if disable is not None else fn


@_eager
def _mask_bits(n: int, seed: int, threshold: int, device: torch.device) -> Tensor:
    """Boolean keep-mask from SplitMix64 words ``mix(seed + (w+1)·golden)`` (torch ops)."""
    z = torch.arange(1, (n + 3) // 4 + 1, dtype=torch.int64, device=device)
    z = z.mul_(_GOLDEN).add_(seed)
    z = (z ^ _shr(z, 30)) * _MIX1
    z = (z ^ _shr(z, 27)) * _MIX2
    z = z ^ _shr(z, 31)
    return z.view(torch.int16)[:n] < threshold


# drawn eagerly under torch.compile: the seed is a Python int from the generator, so one
# opaque call per mask is the least a graph can break (tracing into it broke it 2-3 times)
@torch.compiler.disable
def bernoulli_mask(
    shape: tuple[int, ...] | torch.Size,
    p: float,
    *,
    scale: bool = True,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
    generator: torch.Generator | None = None,
) -> Tensor:
    """A dropout mask: 1 (or ``1/keep``) with the keep probability, 0 with probability ``p``.

    One 64-bit seed is drawn from torch's CPU generator (``generator`` or the global
    one, so ``torch.manual_seed`` fixes every mask); the mask's bits come from
    SplitMix64 run as a counter-based generator, 16 bits per element. The bits depend
    only on the seed: CPU and CUDA, the compiled kernel and plain torch ops give the
    same mask.

    Args:
        shape: shape of the mask.
        p: drop rate in [0, 1).
        scale: multiply kept entries by ``1/keep`` (inverted dropout); else they are 1.
        device, dtype: of the returned mask.
        generator: a CPU ``torch.Generator`` to draw the seed from.
    """
    keep = keep_probability(p)
    n = math.prod(int(s) for s in shape)
    if keep >= 1.0 or n == 0:
        value = 1.0 / keep if scale else 1.0
        return torch.full(tuple(shape), value, device=device, dtype=dtype)
    return seeded_mask(shape, p, draw_seed(generator), scale=scale, device=device, dtype=dtype)


def _threshold_value(p: float, scale: bool) -> tuple[int, float]:
    keep = keep_probability(p)
    return int(keep * _LEVELS) - _LEVELS // 2, (1.0 / keep if scale else 1.0)


def seeded_mask(
    shape: tuple[int, ...] | torch.Size,
    p: float,
    seed: int,
    *,
    scale: bool = True,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """The mask :func:`bernoulli_mask` returns after drawing ``seed``: a pure function of it.

    Lets a caller draw the seed once, apply the mask without storing it
    (:func:`seeded_mask_mul`) and rebuild it later, e.g. for backward.
    """
    threshold, value = _threshold_value(p, scale)
    device = torch.device(device or "cpu")
    n = math.prod(int(s) for s in shape)
    if keep_probability(p) >= 1.0:
        return torch.full(tuple(shape), value, device=device, dtype=dtype)
    ext = None if _functorch_active() else _ext.loaded()
    if ext is not None and device.type == "cpu" and dtype in (torch.float32, torch.float64):
        return ext.bernoulli_mask(n, seed, threshold, value, dtype == torch.float64).view(
            tuple(shape)
        )
    mask = _mask_bits(n, seed, threshold, device).view(tuple(shape)).to(dtype)
    return mask.mul_(value) if value != 1.0 else mask


def seeded_mask_mul(x: Tensor, p: float, seed: int, *, scale: bool = True, out: Tensor) -> Tensor:
    """``out = x * seeded_mask(x.shape, p, seed)``; ``out`` may be ``x``.

    With the compiled kernel (CPU, float32/64, contiguous) the mask is never stored:
    weight drop multiplies ``W_hh`` forward and its gradient backward with one seed.
    """
    ext = None if _functorch_active() else _ext.loaded()
    if keep_probability(p) >= 1.0:
        return torch.mul(x, _threshold_value(p, scale)[1], out=out)
    if (
        ext is not None
        and x.device.type == "cpu"
        and x.dtype in (torch.float32, torch.float64)
        and x.is_contiguous()
        and out.is_contiguous()
    ):
        threshold, value = _threshold_value(p, scale)
        ext.mask_mul(x, seed, threshold, value, out)
        return out
    mask = seeded_mask(x.shape, p, seed, scale=scale, device=x.device, dtype=x.dtype)
    return torch.mul(x, mask, out=out)


def _policy_shape(x: Tensor, time_dim: int, batch_dim: int, per_step: bool, per_sample: bool):
    shape = list(x.shape)
    if not per_step:
        shape[time_dim] = 1
    if not per_sample:
        shape[batch_dim] = 1
    return tuple(shape)


def locked_dropout(
    x: Tensor,
    p: float,
    training: bool = True,
    *,
    batch_first: bool = False,
    per_step: bool = False,
    per_sample: bool = True,
    scale: bool = True,
) -> Tensor:
    """Dropout on a sequence whose mask is shared over time ("locked", "variational").

    Gal & Ghahramani 2016; Merity et al. 2017: ``y_t = x_t ⊙ m`` with one ``m`` for all
    ``t``. ``per_step=True`` gives ordinary dropout (a new mask each step);
    ``per_sample=False`` shares the mask across the batch too.

    Args:
        x: ``(T, B, F)`` or ``(B, T, F)`` with ``batch_first``; more trailing dims are fine.
        p: drop rate in [0, 1).
        training: apply the mask only if true.
        scale: inverted dropout (``1/(1-p)``) if true, 0/1 masks otherwise.
    """
    p = check_rate("p", p)
    if not training or p == 0.0:
        return x
    time_dim, batch_dim = (1, 0) if batch_first else (0, 1)
    shape = _policy_shape(x, time_dim, batch_dim, per_step, per_sample)
    mask = bernoulli_mask(shape, p, scale=scale, device=x.device, dtype=x.dtype)
    return x * mask


def embedding_dropout(
    indices: Tensor,
    weight: Tensor,
    p: float,
    training: bool = True,
    *,
    per_sample: bool = False,
    batch_first: bool = False,
    scale: bool = True,
    padding_idx: int | None = None,
) -> Tensor:
    """Embedding lookup that drops whole word types.

    Gal & Ghahramani 2016; Merity et al. 2017: each row of the embedding matrix is
    zeroed with probability ``p``, so every occurrence of a dropped word in a sequence
    vanishes together. ``per_sample=False`` (AWD) draws one mask over the vocabulary
    for the batch; ``per_sample=True`` one per sequence.

    Args:
        indices: token ids, ``(T, B)`` (or ``(B, T)`` with ``batch_first``) or ``(T,)``.
        weight: ``(V, E)`` embedding matrix.
        p: drop rate in [0, 1).

    Shape:
        returns ``indices.shape + (E,)``.
    """
    p = check_rate("p", p)
    if not training or p == 0.0:
        return torch.nn.functional.embedding(indices, weight, padding_idx)
    return _embedding_dropout(indices, weight, p, per_sample=per_sample, batch_first=batch_first,
                              scale=scale, padding_idx=padding_idx)[0]  # fmt: skip


def _embedding_dropout(
    indices: Tensor,
    weight: Tensor,
    p: float,
    *,
    per_sample: bool,
    batch_first: bool,
    scale: bool,
    padding_idx: int | None,
) -> tuple[Tensor, Tensor]:
    """:func:`embedding_dropout` in training, also returning its mask over the vocabulary."""
    out = torch.nn.functional.embedding(indices, weight, padding_idx)
    vocab = weight.shape[0]
    if per_sample and indices.dim() >= 2:
        batch_dim = 0 if batch_first else 1
        n_seq = indices.shape[batch_dim]
        mask = bernoulli_mask((n_seq, vocab), p, scale=scale, device=weight.device, dtype=out.dtype)
        seq = torch.arange(n_seq, device=indices.device)
        shape = [1] * indices.dim()
        shape[batch_dim] = n_seq
        keep = mask[seq.view(shape).expand_as(indices), indices]
    else:
        mask = bernoulli_mask((vocab,), p, scale=scale, device=weight.device, dtype=out.dtype)
        keep = mask[indices]
    return out * keep.unsqueeze(-1), mask


def zoneout(
    prev: Tensor,
    new: Tensor,
    p: float,
    training: bool = True,
    *,
    mask: Tensor | None = None,
) -> Tensor:
    """Zoneout (Krueger et al. 2016): keep each unit's previous value with probability p.

    ``y = d ⊙ prev + (1-d) ⊙ new`` with ``d ~ Bernoulli(p)`` in training and ``d = p``
    (the expectation) in eval. No rescaling.

    Args:
        prev, new: tensors of the same shape.
        p: zoneout rate in [0, 1).
        mask: a precomputed 0/1 ``d`` (overrides sampling).
    """
    p = check_rate("p", p)
    if p == 0.0:
        return new
    if mask is None:
        if not training:
            return torch.lerp(new, prev, p)
        mask = bernoulli_mask(new.shape, p, scale=False, device=new.device, dtype=new.dtype)
        mask = 1.0 - mask  # bernoulli_mask gives 1 with prob 1-p; d must be 1 with prob p
    return torch.lerp(new, prev, mask)


def drop_path(x: Tensor, p: float, training: bool = True, *, scale: bool = True) -> Tensor:
    """DropPath / stochastic depth (Huang et al. 2016): drop a whole residual branch per sample.

    Args:
        x: the branch output, ``(B, ...)``; one keep/drop decision per sample.
        p: drop rate in [0, 1).
    """
    p = check_rate("p", p)
    if not training or p == 0.0:
        return x
    return x * drop_path_mask(x, p, scale)


def drop_path_mask(x: Tensor, p: float, scale: bool = True) -> Tensor:
    """The ``(B, 1, ...)`` mask :func:`drop_path` multiplies ``x`` by."""
    shape = (x.shape[0],) + (1,) * (x.dim() - 1)
    return bernoulli_mask(shape, p, scale=scale, device=x.device, dtype=x.dtype)


def sequence_mask(lengths: Tensor, max_len: int, *, batch_first: bool = False) -> Tensor:
    """Boolean ``(T, B)`` (or ``(B, T)``) mask, true at positions before each length."""
    steps = torch.arange(max_len, device=lengths.device)
    valid = steps[:, None] < lengths[None, :]
    return valid.t() if batch_first else valid


def activation_regularization(output: Tensor, alpha: float) -> Tensor:
    """AR (Merity et al. 2017): ``α · mean(h_t²)`` on the *dropped* output of the last layer."""
    if alpha == 0:
        return output.new_zeros(())
    return alpha * output.pow(2).mean()


def temporal_activation_regularization(
    raw_output: Tensor, beta: float, *, batch_first: bool = False
) -> Tensor:
    """TAR (Merity et al. 2017): ``β · mean((h_t - h_{t-1})²)`` on the *undropped* output."""
    if beta == 0:
        return raw_output.new_zeros(())
    t = 1 if batch_first else 0
    diff = raw_output.narrow(t, 1, raw_output.shape[t] - 1) - raw_output.narrow(
        t, 0, raw_output.shape[t] - 1
    )
    return beta * diff.pow(2).mean()


# ---- concrete dropout (Gal, Hron & Kendall 2017) -----------------------------------------

_LOGIT_BOUND = math.log(CONCRETE_RATE_BOUNDS[1] / (1 - CONCRETE_RATE_BOUNDS[1]))  # logit(0.999)


def concrete_logit(theta: Tensor) -> Tensor:
    """The logit of a learned rate from its parameter: ``b·tanh(θ/b)``, ``b = logit(0.999)``.

    The rate ``σ(b·tanh(θ/b))`` stays in ``CONCRETE_RATE_BOUNDS``, (0.001, 0.999), whatever
    step an optimiser takes, and its gradient never vanishes (no clamp); near the middle the
    map is the identity (``tanh(x) ≈ x``), so ``θ`` reads as the rate's logit.
    """
    return _LOGIT_BOUND * torch.tanh(theta / _LOGIT_BOUND)


def concrete_logit_init(p: float) -> float:
    """The parameter ``θ`` whose rate is ``p`` (the inverse of :func:`concrete_logit`)."""
    lo, hi = CONCRETE_RATE_BOUNDS
    if not lo < p < hi:
        raise ValueError(f"a concrete rate must be in ({lo}, {hi}), got {p}")
    return _LOGIT_BOUND * math.atanh(math.log(p / (1 - p)) / _LOGIT_BOUND)


def concrete_mask(
    logit: Tensor,
    shape: tuple[int, ...] | torch.Size,
    temperature: float,
    *,
    keep: bool = True,
    scale: bool = True,
    generator: torch.Generator | None = None,
) -> Tensor:
    r"""A relaxed Bernoulli (concrete) dropout mask, differentiable in ``logit``.

    ``z = σ((logit + log u − log(1 − u)) / t)``, ``u ~ U(0, 1)`` (clamped to
    ``[1e-7, 1 − 1e-7]`` as in the paper's code), is the relaxed "dropped" indicator of rate
    ``p = σ(logit)``; it tends to Bernoulli(p) as ``t → 0``. Returns ``(1 − z)/(1 − p)``
    (``keep`` and ``scale``), ``1 − z`` (``keep``, no scale) or ``z`` (``keep=False``:
    zoneout's weight of the previous value).

    Args:
        logit: 0-dim ``log p − log(1 − p)``; the mask takes its dtype and device.
        shape: of the mask.
        temperature: ``t > 0``.
        keep, scale: see above.
        generator: for ``u`` (torch's global generator by default, so ``torch.manual_seed``
            fixes the noise).
    """
    u = torch.rand(tuple(shape), device=logit.device, dtype=logit.dtype, generator=generator)
    u = u.clamp_(1e-7, 1 - 1e-7)
    noise = torch.log(u) - torch.log1p(-u)
    if not keep:
        return torch.sigmoid((logit + noise) / temperature)
    kept = torch.sigmoid(-(logit + noise) / temperature)  # 1 − z, without cancellation
    return kept / torch.sigmoid(-logit) if scale else kept  # σ(−logit) = 1 − p
