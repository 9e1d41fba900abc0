"""Thin modules around :mod:`rnndrop.functional`, and Monte Carlo dropout at test time."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import Tensor, nn

from .. import functional as F
from ..config import check_rate

__all__ = [
    "DropPath",
    "EmbeddingDropout",
    "LockedDropout",
    "StochasticModule",
    "Zoneout",
    "mc_dropout",
]


class StochasticModule(nn.Module):
    """Base of every rnndrop module that samples masks.

    Masks are sampled when ``self.training`` is true, or when ``self.mc`` is true
    (Monte Carlo dropout at test time; see :func:`mc_dropout`). ``mc`` leaves the
    module in eval mode, so batch norm, other layers and the rest of the model stay
    deterministic.
    """

    mc: bool = False
    record_masks: bool = False  # keep this forward's masks in ``last_masks``, by site name

    @property
    def sampling(self) -> bool:
        """True if masks are sampled in this forward (training or MC mode)."""
        return self.training or self.mc

    def _refuse_frozen_masks(self, active: bool = True) -> None:
        """Raise under ``torch.jit.trace`` (and the legacy ONNX exporter, which traces) when
        this call samples masks: the trace would record them as constants and replay them
        on every later call (``active``: the module has a rate that draws a mask)."""
        if active and self.sampling and torch.jit.is_tracing():
            raise RuntimeError(
                f"{type(self).__name__}: torch.jit.trace (or torch.onnx.export(dynamo=False)) "
                "of a model that samples dropout masks (training or mc mode) would freeze "
                "this call's masks into the trace. Trace (or export) in eval mode "
                "(model.eval()), where every scheme is deterministic."
            )

    def _keep_mask(self, site: str, mask: Tensor) -> None:
        if self.record_masks:
            self.__dict__.setdefault("last_masks", {})[site] = mask


def script_refusal(module: nn.Module) -> RuntimeError:
    """The error for ``torch.jit.script`` of a layer or cell, naming what works instead."""
    return RuntimeError(
        f"torch.jit.script does not support rnndrop's {type(module).__name__} (its forward "
        "picks a path and draws masks in Python). Use torch.export.export(model.eval(), "
        "(x,)) or torch.onnx.export(..., dynamo=True) for deployment; torch.jit.trace of "
        "an eval-mode model also works."
    )


@contextlib.contextmanager
def mc_dropout(model: nn.Module, enabled: bool = True) -> Iterator[nn.Module]:
    """Sample rnndrop's dropout masks at test time (Gal & Ghahramani 2016).

    Inside the block every :class:`StochasticModule` in ``model`` samples masks as in
    training (so repeated forwards give different outputs to average) while the model
    stays in eval mode. Previous settings are restored on exit::

        model.eval()
        with torch.no_grad(), mc_dropout(model):
            probs = torch.stack([model(x).softmax(-1) for _ in range(50)]).mean(0)
    """
    mods = [m for m in model.modules() if isinstance(m, StochasticModule)]
    before = [m.mc for m in mods]
    try:
        for m in mods:
            m.mc = enabled
        yield model
    finally:
        for m, b in zip(mods, before, strict=True):
            m.mc = b


class LockedDropout(StochasticModule):
    """Dropout whose mask is shared over time (Gal & Ghahramani 2016; Merity et al. 2017).

    Args:
        p: drop rate in [0, 1).
        batch_first: input is ``(B, T, F)`` instead of ``(T, B, F)``.
        per_step: draw a fresh mask each step (ordinary dropout) instead.
        per_sample: one mask per sequence (default) or one for the batch.
        scaling: ``"inverted"`` (1/(1-p) in training) or ``"classic"`` (×(1-p) in eval).

    Shape:
        ``(T, B, *)`` or ``(B, T, *)``; output has the same shape.
    """

    def __init__(
        self,
        p: float = 0.5,
        *,
        batch_first: bool = False,
        per_step: bool = False,
        per_sample: bool = True,
        scaling: str = "inverted",
    ) -> None:
        super().__init__()
        self.p = check_rate("p", p)
        self.batch_first = batch_first
        self.per_step = per_step
        self.per_sample = per_sample
        self.scaling = _check_scaling(scaling)

    def forward(self, x: Tensor) -> Tensor:
        self._refuse_frozen_masks(self.p > 0)
        if not self.sampling:
            return x * (1 - self.p) if self.scaling == "classic" and self.p else x
        return F.locked_dropout(
            x,
            self.p,
            True,
            batch_first=self.batch_first,
            per_step=self.per_step,
            per_sample=self.per_sample,
            scale=self.scaling == "inverted",
        )

    def extra_repr(self) -> str:
        return f"p={self.p}, per_step={self.per_step}, per_sample={self.per_sample}"


class EmbeddingDropout(nn.Embedding, StochasticModule):
    """An ``nn.Embedding`` that drops whole word types (Gal & Ghahramani 2016).

    Each row of the embedding matrix is zeroed with probability ``p``, so all
    occurrences of a dropped word vanish together. Parameters and state_dict are
    those of ``nn.Embedding``.

    Args:
        num_embeddings, embedding_dim, padding_idx: as ``nn.Embedding``.
        p: drop rate in [0, 1).
        per_sample: one vocabulary mask per sequence instead of one per batch (AWD).
        batch_first: index layout ``(B, T)`` (only matters with ``per_sample``).
        scaling: ``"inverted"`` or ``"classic"``.

    Shape:
        indices ``(T, B)`` -> ``(T, B, E)``.
    """

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        p: float = 0.1,
        *,
        per_sample: bool = False,
        batch_first: bool = False,
        scaling: str = "inverted",
        padding_idx: int | None = None,
        **kwargs,
    ) -> None:
        super().__init__(num_embeddings, embedding_dim, padding_idx=padding_idx, **kwargs)
        self.p = check_rate("p", p)
        self.per_sample = per_sample
        self.batch_first = batch_first
        self.scaling = _check_scaling(scaling)

    def forward(self, indices: Tensor) -> Tensor:
        self._refuse_frozen_masks(self.p > 0)
        if not self.sampling:
            out = super().forward(indices)
            return out * (1 - self.p) if self.scaling == "classic" and self.p else out
        out, mask = F._embedding_dropout(
            indices,
            self.weight,
            self.p,
            per_sample=self.per_sample,
            batch_first=self.batch_first,
            scale=self.scaling == "inverted",
            padding_idx=self.padding_idx,
        )
        self._keep_mask("embedding", mask)  # (V,) or (B, V): one entry per word type
        return out

    def extra_repr(self) -> str:
        return super().extra_repr() + f", p={self.p}, per_sample={self.per_sample}"


class DropPath(StochasticModule):
    """Stochastic depth (Huang et al. 2016): drop a residual branch for whole samples.

    Args:
        p: drop rate in [0, 1).

    Shape:
        ``(B, *)`` -> same.
    """

    def __init__(self, p: float = 0.0) -> None:
        super().__init__()
        self.p = check_rate("p", p)

    def forward(self, x: Tensor) -> Tensor:
        self._refuse_frozen_masks(self.p > 0)
        return F.drop_path(x, self.p, self.sampling)

    def extra_repr(self) -> str:
        return f"p={self.p}"


class Zoneout(StochasticModule):
    """Zoneout (Krueger et al. 2016) between a previous and a new state.

    ``y = d ⊙ prev + (1-d) ⊙ new``, ``d ~ Bernoulli(p)``; eval uses ``d = p``.

    Args:
        p: zoneout rate in [0, 1).
    """

    def __init__(self, p: float = 0.1) -> None:
        super().__init__()
        self.p = check_rate("p", p)

    def forward(self, prev: Tensor, new: Tensor) -> Tensor:
        self._refuse_frozen_masks(self.p > 0)
        return F.zoneout(prev, new, self.p, self.sampling)

    def extra_repr(self) -> str:
        return f"p={self.p}"


def _check_scaling(scaling: str) -> str:
    if scaling not in ("inverted", "classic"):
        raise ValueError(f"scaling must be 'inverted' or 'classic', got {scaling!r}")
    return scaling
