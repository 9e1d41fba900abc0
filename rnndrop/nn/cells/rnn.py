r"""The Elman RNN cell (``torch.nn.RNN``): torch's layout, fused op, and the loop's step math.

Elman 1990, in torch's form with one gate block and ``φ = tanh`` or ``relu``. One step with
every mask the loop path carries::

    a_t  = xp_t + (h_{t-1} ⊙ m^h_t) W_hhᵀ          xp_t = x_t W_ihᵀ + b_ih + b_hh
    h̃_t = φ(a_t)
    h_t  = z^h_t ⊙ h_{t-1} + (1 - z^h_t) ⊙ h̃_t     zoneout on h (Krueger et al. 2016); z = 0 off

``m^h`` is the recurrent mask (Gal & Ghahramani 2016; with one gate block, tied and untied
are the same). The cell has no cell state and no gated candidate, so ``zoneout_cell`` and
``candidate`` mean nothing for it. :func:`step_forward` / :func:`step_backward` are the
reference every loop backend is tested against; ``rnndrop/kernels/cpp/cell_rnn.h`` has the
same math in C++.
"""

from __future__ import annotations

import warnings
from functools import partial

import torch
from torch import _VF, Tensor

from ...kernels.contract import LayerMasks, Saved, State
from .base import Cell, needs_opaque

__all__ = ["RNN_RELU_CELL", "RNN_TANH_CELL"]


# Module-level functions bound with functools.partial (not closures), so that modules
# holding the cell pickle (torch.save of a whole module, spawned workers).


# no torch.compiler.disable: dynamo records aten.rnn_tanh / rnn_relu, as the LSTM's _fused
def _fused(op_name, x, batch_sizes, state, weights, has_bias, num_layers, train, bidir,
           batch_first):  # fmt: skip
    """The fused ATen/cuDNN op ``_VF.rnn_tanh`` / ``rnn_relu`` with nn.RNN's arguments;
    returns (out, (h,))."""
    args = (op_name, x, batch_sizes, state[0], weights, has_bias, num_layers, train, bidir,
            batch_first)  # fmt: skip
    if torch.compiler.is_compiling():  # dynamo cannot trace catch_warnings
        return _opaque(*args) if needs_opaque(x, *state, *weights) else _call(*args)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="RNN module weights are not part")
        return _call(*args)


def _call(op_name, x, batch_sizes, h0, weights, has_bias, num_layers, train, bidir,
          batch_first):  # fmt: skip
    op = getattr(_VF, op_name)
    if batch_sizes is None:
        out, h = op(x, h0, weights, has_bias, num_layers, 0.0, train, bidir, batch_first)
    else:
        out, h = op(x, batch_sizes, h0, weights, has_bias, num_layers, 0.0, train, bidir)
    return out, (h,)


# torch.compile with gradients: inductor cannot run the fused op's training form, so that
# one call stays out of the graph (as the LSTM's)
_opaque = torch.compiler.disable(_call)


def step_forward(relu: bool, a: Tensor, rec: None, prev: State, m: LayerMasks,
                 out: Saved | None = None) -> State:  # fmt: skip
    """One step: ``a`` ``(B, H)`` pre-activations (recurrent product added) -> ``h̃ = φ(a)``,
    then zoneout on ``h``; returns ``(h_t, None)``.

    ``m``: the step's masks (``zoneout_h``; no candidate, no cell state). In the loop
    (``out``: the step's :class:`Saved` rows) ``a`` becomes ``h̃`` in place; with
    ``out=None`` out of place (autograd: step cells). ``relu`` picks ``φ`` (bound per cell).
    """
    if out is None:
        phi = torch.relu if relu else torch.tanh
    else:  # in place, into the saved activations
        phi = torch.relu_ if relu else torch.tanh_
    h = phi(a)
    if m.zoneout_h is not None:
        h = torch.lerp(h, prev.h, m.zoneout_h)
    return State(h)


def step_backward(relu: bool, d: State, prev: State, s: Saved, m: LayerMasks, dgx: Tensor,
                  dgh: Tensor, dm: LayerMasks | None = None) -> State:  # fmt: skip
    """Backward of :func:`step_forward`: dL/da into ``dgx`` (the same buffer as ``dgh``).

    ``d.h`` is dL/dh_t (all paths). Returns zoneout's carry into ``h_{t-1}`` (or None) and
    None (no cell state). ``dm``: None, or a ``zoneout_h`` buffer for ``dL/dz^h = dL/dh_t ⊙
    (h_{t-1} − h̃_t)`` (concrete dropout).
    """
    acts, zh = s.acts, m.zoneout_h
    dht = d.h if zh is None else d.h * (1 - zh)
    # φ'(a) from the saved h̃ = φ(a): relu' = [h̃ > 0], tanh' = 1 - h̃²
    torch.mul(dht, (acts > 0).to(acts.dtype) if relu else 1 - acts * acts, out=dgx)
    if dm is not None and dm.zoneout_h is not None:
        torch.mul(d.h, prev.h - acts, out=dm.zoneout_h)
    return State(None if zh is None else d.h * zh)


def reference_step(relu: bool, xp: Tensor, rec: Tensor, h: Tensor, c: None, m: LayerMasks,
                   params: tuple[Tensor, ...] = ()) -> tuple[Tensor, None]:  # fmt: skip
    """The plain-autograd loop's step (:mod:`rnndrop.kernels.reference`): ``(h̃_t, None)``,
    ``h̃ = φ(xp + (h ⊙ m) W_hhᵀ)`` out of place; zoneout on ``h`` (the only step mask) is
    the loop's. ``relu`` picks ``φ`` (bound per cell); ``h``, ``c``, ``m``, ``params`` unused."""
    a = xp + rec
    return (torch.relu(a) if relu else torch.tanh(a)), None


def _split_bias(b_ih: Tensor, b_hh: Tensor) -> tuple[Tensor, None]:
    return b_ih + b_hh, None


def _cell(nonlinearity: str) -> Cell:
    relu, mode = nonlinearity == "relu", f"RNN_{nonlinearity.upper()}"
    return Cell(
        name=mode.lower(),
        mode=mode,
        gates=1,
        gate_names=("h",),
        has_cell=False,
        split_recurrent=False,
        fused=partial(_fused, mode.lower()),
        split_bias=_split_bias,
        step_forward=partial(step_forward, relu),
        step_backward=partial(step_backward, relu),
        reference_step=partial(reference_step, relu),
    )


RNN_TANH_CELL = _cell("tanh")
RNN_RELU_CELL = _cell("relu")
