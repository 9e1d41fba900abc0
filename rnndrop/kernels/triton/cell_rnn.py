r"""The Elman RNN's pointwise math for the ``triton`` kernels (the contract: ``_kernels.py``).

Elman 1990 in torch's form (``torch.nn.RNN``), one gate block, ``φ = tanh`` or ``relu``;
the step of :mod:`rnndrop.nn.cells.rnn` without zoneout (the loops apply it)::

    h̃_t = φ(a_t)        a_t = xp_t + (h_{t-1} ⊙ m^h_t) W_hhᵀ

No cell state and no candidate: ``c`` is never read, and no step mask (the loop applies
zoneout on ``h``).
"""

import triton.language as tl

from ._kernels import tanh, zeros_like

STEP_MASKS = ()  # the step masks it reads


def _forward(xs, RELU: tl.constexpr):
    # relu: NaN stays NaN, as torch's
    hn = tl.where(xs[0] < 0.0, 0.0, xs[0]) if RELU else tanh(xs[0])
    return (hn,), hn


def _backward(acts, dh, RELU: tl.constexpr):
    hn = acts[0]
    # φ'(a) from the saved h̃ = φ(a): relu' = [h̃ > 0], tanh' = 1 - h̃²
    dg = dh * tl.where(hn > 0.0, 1.0, 0.0) if RELU else dh * (1.0 - hn * hn)
    return (dg,), hn


def tanh_forward(xs, ps, h, c, ms, SM):
    acts, hn = _forward(xs, False)
    return acts, hn, c, hn


def tanh_backward(acts, aux, hp, cp, ct, dh, dc, ms, SM):
    dg, hn = _backward(acts, dh, False)
    return dg, dg, zeros_like(dh), dc, hn, ms


def relu_forward(xs, ps, h, c, ms, SM):
    acts, hn = _forward(xs, True)
    return acts, hn, c, hn


def relu_backward(acts, aux, hp, cp, ct, dh, dc, ms, SM):
    dg, hn = _backward(acts, dh, True)
    return dg, dg, zeros_like(dh), dc, hn, ms
