r"""The plain-autograd reference loop: one layer and direction in differentiable torch ops.

The loop backends (:mod:`rnndrop.kernels.python`, ``cpp``, ``triton``) run one hand-written
autograd node per layer, fast but opaque: it has a first-order backward only, and it is
made of in-place writes and compiled kernels that no tracer can see through. This module
computes the same step (the same masks, the same equations as the cells' ``step_forward``)
with out-of-place torch ops only, so that autograd, ``torch.func``, ``torch.export``,
ONNX and TorchScript tracing can all see and differentiate it:

* higher-order autograd (``create_graph=True``) and every ``torch.func`` transform
  (``grad``, ``vmap``, ``jacrev``, ...) differentiate it to any order;
* exporters and tracers record it as ordinary ops (one unrolled step per time step).

:func:`rnndrop.kernels.rnn_layer` picks it automatically where the fast node cannot serve
(see :func:`wants_reference`); ``RNNLayer``'s backward re-runs it when asked for a
differentiable gradient (double backward).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .contract import LayerInputs, LayerMasks

__all__ = ["reference_layer", "transform_active", "wants_reference"]


def _at(m: Tensor | None, t: int) -> Tensor | None:
    if m is None:
        return None
    return m[0] if m.shape[0] == 1 else m[t]


def _project(inp: LayerInputs) -> Tensor:
    """``x W_ihᵀ + b_x`` for all steps (per gate ``(x ⊙ m_k) W_ih,kᵀ`` with untied masks)."""
    x, w_ih, m = inp.x, inp.w_ih, inp.masks.input
    if w_ih is None:
        return x
    if m is None:
        acts = x @ w_ih.t()
    else:
        G = m.shape[0]
        H = w_ih.shape[0] // G
        acts = torch.cat([(x * m[k]) @ w_ih[k * H : (k + 1) * H].t() for k in range(G)], -1)
    return acts if inp.b_x is None else acts + inp.b_x


def _recurrent(h: Tensor, m: Tensor | None, w_hh: Tensor) -> Tensor:
    """``(h ⊙ m) W_hhᵀ``; with per-gate masks ``(Gr, B, H)`` one block of ``W_hh`` each."""
    if m is None:
        return h @ w_hh.t()
    Gr = m.shape[0]
    if Gr == 1:
        return (h * m[0]) @ w_hh.t()
    H = w_hh.shape[0] // Gr  # rows per gate block (W_hh has P columns with a projection)
    return torch.cat([(h * m[k]) @ w_hh[k * H : (k + 1) * H].t() for k in range(Gr)], -1)


#: The step masks a cell's ``reference_step`` applies (zoneout on ``h`` is the loop's).
_CELL_STEP_MASKS = tuple(n for n in LayerMasks.step_names() if n != "zoneout_h")


def _zone(new: Tensor, prev: Tensor, z: Tensor | None) -> Tensor:
    """Zoneout: ``z ⊙ prev + (1 - z) ⊙ new`` (written out: ``lerp`` exports less widely)."""
    return new if z is None else new + z * (prev - new)


def reference_layer(inp: LayerInputs) -> tuple[Tensor, Tensor | None]:
    """One layer and direction: ``(h_seq (T, B, H), c_last)``, differentiable to any order.

    The same computation as every loop backend (the cells' per-step math in
    :mod:`rnndrop.nn.cells`), tensors and layouts of :class:`LayerInputs`.
    """
    cell, m = inp.cell, inp.masks
    if getattr(cell, "reference_step", None) is None:  # never another cell's math
        raise NotImplementedError(
            f"the plain-autograd reference loop has no step for the {cell.name!r} cell "
            "(give its Cell a reference_step): torch.func, export, tracing and double "
            "backward need it"
        )
    # one tensor per step: a trace (jit.trace, legacy ONNX) unrolls the loop for this T, and
    # unbind's fixed count makes the traced graph fail on another length, never truncate
    xs = _project(inp).unbind(0)
    T = len(xs)
    h, c = inp.h0, inp.c0
    outs: list[Tensor] = [h] * T  # placeholders, each overwritten below
    steps = range(T - 1, -1, -1) if inp.reverse else range(T)
    for t in steps:
        rec = _recurrent(h, _at(m.recurrent, t), inp.w_hh)
        if inp.b_h is not None:  # the recurrent product's own bias (the GRU's b_hh)
            rec = rec + inp.b_h
        # the cell's own step, in its file, with the step's masks that act inside the step
        step = LayerMasks(**{n: _at(getattr(m, n), t) for n in _CELL_STEP_MASKS})
        h_new, c = cell.reference_step(xs[t], rec, h, c, step, inp.extra)
        if inp.w_hr is not None:  # LSTM with projections: h_t = W_hr (o ⊙ tanh c_t)
            h_new = h_new @ inp.w_hr.t()
        h = _zone(h_new, h, _at(m.zoneout_h, t))
        outs[t] = h
    return torch.stack(outs), c


def _tensors_traced(tensors: tuple[Tensor | None, ...]) -> bool:
    """True if a tensor is a fake tensor (export, ONNX dynamo export, make_fx): the fast
    node's kernels cannot run on it."""
    from torch._subclasses.fake_tensor import FakeTensor

    return any(isinstance(t, FakeTensor) for t in tensors)


def wants_reference(tensors: tuple[Tensor | None, ...]) -> str | None:
    """Why this call must run the reference loop instead of a fast backend, or None.

    * a ``torch.func`` transform is active, or a tensor is a functorch wrapper: the fast
      node has no vmap rule and a first-order backward only;
    * ``torch.export`` / ``torch.onnx.export(dynamo=True)`` / ``torch.jit.trace`` (and
      the legacy ONNX exporter, which traces): they must record plain ops;
    * ``torch.compile`` when no gradient is needed (inference: eval, ``no_grad``): the
      unrolled loop compiles into the graph, no graph break. With gradients the fast node
      stays (one graph break per loop layer), as unrolling a long sequence into autograd
      would multiply compile time.
    """
    # dynamo folds these flags to constants; the checks below are for eager Python only
    if torch.compiler.is_exporting():
        return "export"
    if torch.compiler.is_compiling():
        needs_grad = torch.is_grad_enabled() and any(
            t is not None and t.requires_grad for t in tensors
        )
        return None if needs_grad else "compile (inference)"
    if torch.jit.is_tracing():
        return "jit.trace"
    if transform_active(*tensors):
        return "torch.func transform or forward-mode AD"
    if _tensors_traced(tensors):
        return "fake tensors (export, make_fx)"
    return None


def transform_active(*tensors: Tensor | None) -> bool:
    """True under a ``torch.func`` transform (``grad``, ``vmap``, ``jacrev``, ``jvp``, ...),
    inside a ``torch.autograd.forward_ad.dual_level`` (forward-mode AD), or for a
    functorch-wrapped tensor: where only plain ops can serve (the fused ops have no vmap
    rule). Eager Python only."""
    from torch.autograd import forward_ad

    wrapped = torch._C._functorch.is_functorch_wrapped_tensor
    return (torch._C._are_functorch_transforms_active() or forward_ad._current_level >= 0
            or any(t is not None and wrapped(t) for t in tensors))  # fmt: skip
