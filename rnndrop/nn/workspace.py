"""Per-call masked weights (weight drop, folded masks) without a fresh allocation per call.

Weight drop hands the fused op a new ``W_hh ⊙ M`` every forward. On CPU, allocating that
tensor (6.8 MB per layer at PTB-medium) and its mask anew each call makes glibc map and
unmap memory around the op's own buffers, and the page faults cost more than the
arithmetic: on the 2-core VM a plain ``W_hh.clone()`` fed to the fused op measured 1.13–1.16×
``nn.LSTM`` at PTB-medium, while writing the product into reused storage measured 1.01–1.02×
(``scripts/bench_rnn.py``). So:

- :class:`MaskedWeight` computes ``W ⊙ M`` (and ``W`` times masks folded into its
  columns) into storage from a :class:`WeightBuffers` pool. The weight-drop mask is never
  stored: it is a pure function of a seed (:func:`~rnndrop.functional.seeded_mask`) and
  is rebuilt in backward.
- :class:`WeightBuffers` hands a storage out again only when nothing but the pool refers to
  it, i.e. the graph that saved the previous product has been freed. A second forward before
  backward gets a storage of its own, so reuse can never change a saved tensor.

Used on CPU only (CUDA's caching allocator already reuses memory), outside ``torch.compile``
and ``torch.func`` transforms; elsewhere, and if torch lacks the use-count query, plain ops
run.
"""

from __future__ import annotations

import threading

import torch
from torch import Tensor

from ..functional import seeded_mask, seeded_mask_mul, traced

__all__ = ["MaskedWeight", "WeightBuffers", "masked_weight"]

_use_count = getattr(torch._C, "_storage_Use_Count", None)


class WeightBuffers:
    """A few reusable storages per key (layer, direction, which weight).

    Module state that is neither a parameter nor a buffer: not saved, not copied by
    ``deepcopy`` or pickling (a copy starts empty), cleared when the module moves.
    """

    max_per_key = 4  # more simultaneous live graphs than this get fresh tensors

    def __init__(self) -> None:
        self._slots: dict[tuple, list[torch.UntypedStorage]] = {}
        self._lock = threading.Lock()

    def usable(self, like: Tensor) -> bool:
        return _use_count is not None and like.device.type == "cpu" and not traced()

    def empty_like(self, key: tuple, like: Tensor) -> Tensor:
        """A contiguous tensor shaped like ``like``, on storage no live tensor uses."""
        if not self.usable(like):
            return torch.empty_like(like, memory_format=torch.contiguous_format)
        nbytes = like.numel() * like.element_size()
        with self._lock:
            slots = self._slots.setdefault((key, like.dtype), [])
            for storage in slots:
                if storage.nbytes() == nbytes and _use_count(storage._cdata) == 1:
                    break
            else:
                if len(slots) >= self.max_per_key:
                    return torch.empty_like(like, memory_format=torch.contiguous_format)
                storage = torch.empty(like.numel(), dtype=like.dtype).untyped_storage()
                slots.append(storage)
            return torch.empty(0, dtype=like.dtype).set_(storage, 0, like.shape)

    def clear(self) -> None:
        with self._lock:
            self._slots.clear()

    def __deepcopy__(self, memo: dict) -> WeightBuffers:
        return WeightBuffers()

    def __reduce__(self):
        return (WeightBuffers, ())

    def __repr__(self) -> str:
        return f"WeightBuffers({sum(len(s) for s in self._slots.values())} storages)"


class MaskedWeight(torch.autograd.Function):
    """``W ⊙ M_seed ⊙ fold`` into pooled storage; backward multiplies by the same masks.

    ``M_seed`` is the weight-drop mask of rate ``p`` rebuilt from ``seed`` (None: no weight
    drop); ``fold`` a ``(G, 1, cols)`` mask on the columns of each of ``G`` row blocks.
    """

    @staticmethod
    def forward(ctx, w, p, seed, scale, fold, buffers, key):
        out = buffers.empty_like(key, w) if buffers is not None else torch.empty_like(w)
        if seed is not None:
            seeded_mask_mul(w.contiguous(), p, seed, scale=scale, out=out)
        else:
            out.copy_(w)
        if fold is not None:
            out.view(fold.shape[0], -1, w.shape[-1]).mul_(fold)
        ctx.save_for_backward(fold)
        ctx.p, ctx.seed, ctx.scale = p, seed, scale
        return out

    @staticmethod
    def backward(ctx, grad):
        (fold,) = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph=True: the same product, differentiable
            g = grad
            if fold is not None:
                g = (g.view(fold.shape[0], -1, g.shape[-1]) * fold).view(g.shape)
            if ctx.seed is not None:
                g = g * seeded_mask(g.shape, ctx.p, ctx.seed, scale=ctx.scale,
                                    device=g.device, dtype=g.dtype)  # fmt: skip
            return g, None, None, None, None, None, None
        # The incoming gradient is the fused op's fresh dW, consumed only here: scale it in
        # place rather than allocate another weight-sized tensor.
        if not grad.is_contiguous():
            grad = grad.contiguous()
        if fold is not None:  # reverse order of forward: bitwise what autograd's muls give
            grad.view(fold.shape[0], -1, grad.shape[-1]).mul_(fold)
        if ctx.seed is not None:
            seeded_mask_mul(grad, ctx.p, ctx.seed, scale=ctx.scale, out=grad)
        return grad, None, None, None, None, None, None


def masked_weight(
    w: Tensor,
    *,
    p: float = 0.0,
    seed: int | None = None,
    scale: bool = True,
    fold: Tensor | None = None,
    buffers: WeightBuffers | None = None,
    key: tuple = (),
) -> Tensor:
    """``w`` times its weight-drop mask (``seed``) and folded column masks (``fold``).

    Args:
        w: the weight, ``(rows, cols)``.
        p: weight-drop rate; the mask is :func:`~rnndrop.functional.seeded_mask` of ``seed``.
        seed: the mask's seed, or None for no weight drop.
        scale: inverted scaling of the weight-drop mask.
        fold: ``(G, 1, cols)`` masks for the columns of ``G`` equal row blocks, or None.
        buffers: a pool to reuse storage from (CPU), or None.
        key: this weight's key in the pool.
    """
    if seed is None and fold is None:
        return w
    if buffers is None or not buffers.usable(w):  # plain autograd ops
        if seed is not None:
            w = w * seeded_mask(w.shape, p, seed, scale=scale, device=w.device, dtype=w.dtype)
        if fold is not None:
            w = (w.view(fold.shape[0], -1, w.shape[-1]) * fold).view(w.shape)
        return w
    return MaskedWeight.apply(w, p, seed, scale, fold, buffers, key)
