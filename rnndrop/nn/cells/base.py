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
            num_layers, train, bidirectional, batch_first) -> (out, state)``.
        split_bias: ``(b_ih, b_hh) -> (b_x, b_h)``, the biases of the input projection and
            of the recurrent product as :class:`rnndrop.kernels.LayerInputs` takes them.
        step_forward, step_backward: the reference per-step math of the ``python`` backend.
    """

    name: str
    mode: str
    gates: int
    gate_names: tuple[str, ...]
    has_cell: bool
    split_recurrent: bool
    fused: Callable
    split_bias: Callable
    step_forward: Callable
    step_backward: Callable

    def __repr__(self) -> str:
        return f"Cell({self.name})"
