"""What a recurrent cell is to the engine: its gates, its state, its fused op, its step math."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

__all__ = ["Cell", "needs_opaque"]


def needs_opaque(*tensors) -> bool:
    """Under ``torch.compile`` (not export): whether the fused op must stay out of the graph,
    i.e. whether autograd will differentiate it (inductor cannot compile its backward)."""
    if torch.compiler.is_exporting() or not torch.is_grad_enabled():
        return False
    return any(t.requires_grad for t in tensors)


@dataclass(frozen=True)
class Cell:
    """One cell of the family (see :mod:`rnndrop.nn.cells.lstm`, :mod:`rnndrop.nn.cells.gru`).

    Attributes:
        name: ``"lstm"``, ``"gru"``, ``"rnn_tanh"`` or ``"rnn_relu"``; loop backends
            dispatch on it.
        mode: torch's name of the mode (``"LSTM"``), for cuDNN's weight flattening.
        gates: ``G``, the gate blocks stacked in ``W_ih`` and ``W_hh`` (``G·H`` rows).
        gate_names: torch's gate order.
        has_cell: the state is ``(h, c)`` rather than ``h``.
        split_recurrent: ``h W_hhᵀ`` enters the gates apart from the input projection
            (the GRU's ``r ⊙ (W_hn h + b_hn)``), so the loop keeps it in its own buffer.
        fused: the fused ATen/cuDNN op, ``(x, batch_sizes, state, weights, has_bias,
            num_layers, train, bidirectional, batch_first) -> (out, state)``, or None: the
            cell has none (the LayerNorm LSTM), and every forward runs the loop.
        split_bias: ``(b_ih, b_hh) -> (b_x, b_h)``, the biases of the input projection and
            of the recurrent product as :class:`rnndrop.kernels.LayerInputs` takes them.
        step_forward, step_backward: the reference per-step math of the ``python`` backend.
        extra_params: the cell's parameters beyond torch's four, registered per layer and
            direction after them: ``(name, size in units of H, initial value)``, e.g.
            ``("gamma_ih", 4, 1.0)`` is ``gamma_ih_l0`` of shape ``(4H,)`` filled with 1.
        extra_inputs: ``(b_ih, b_hh, *extra params) -> LayerInputs.extra`` (the biases
            None without ``bias``), for a cell with ``extra_params``; each entry a 1-D
            tensor, zeros where a parameter is absent.
        saved_width: ``H -> W``, the width of the row the cell's step saves per step for
            its backward (``Saved.extra``, ``(T, B, W)``), or None.
        reference_step: the differentiable step of :mod:`rnndrop.kernels.reference`
            (out-of-place ops), ``(xp_t, rec_t, h, c, m, extra) -> (h̃_t, c_t)`` with ``m``
            the step's :class:`~rnndrop.kernels.LayerMasks` that act inside the step (all
            but zoneout on ``h``, which the loop applies), ``rec_t`` with ``b_h`` added. Every
            cell has one; a cell without it cannot run the reference loop (torch.func,
            export, tracing, double backward).
    """

    name: str
    mode: str
    gates: int
    gate_names: tuple[str, ...]
    has_cell: bool
    split_recurrent: bool
    fused: Callable | None
    split_bias: Callable
    step_forward: Callable
    step_backward: Callable
    extra_params: tuple[tuple[str, int, float], ...] = ()
    extra_inputs: Callable | None = None
    saved_width: Callable[[int], int] | None = None
    reference_step: Callable | None = None

    def __repr__(self) -> str:
        return f"Cell({self.name})"
