r"""``rnndrop.nn.RNN`` and ``RNNCell``: drop-in ``torch.nn.RNN`` / ``RNNCell`` (Elman 1990)
with recurrent dropout.

The layer machinery is :class:`~rnndrop.nn.rnn.RNNBase`'s, the step cell's
:class:`~rnndrop.nn.stepcells.StepCellBase`'s; the cell (layout, fused op, step math) is
:mod:`rnndrop.nn.cells.rnn`. Kept apart from ``rnn.py`` and ``stepcells.py`` so that a
cell's modules are its own file.
"""

from __future__ import annotations

import torch
from torch import _VF, Tensor

from ..config import DropoutSpec
from .cells import RNN_RELU_CELL, RNN_TANH_CELL
from .rnn import RNNBase
from .stepcells import StepCellBase

__all__ = ["RNN", "RNNCell"]

_CELLS = {"tanh": RNN_TANH_CELL, "relu": RNN_RELU_CELL}


class RNN(RNNBase):
    r"""A drop-in ``torch.nn.RNN`` carrying every recurrent dropout scheme that means
    something for it.

    Computes, for each layer and step (torch's equations; Elman 1990)::

        h_t = φ(W_ih x_t + b_ih + W_hh h_{t-1} + b_hh),    φ = tanh or relu

    Dropout sites (:class:`rnndrop.config.RecurrentDropout`): ``input``,
    ``between_layers``, ``output`` as for the LSTM (naive dropout, Zaremba et al. 2014;
    per-step or per-sequence, tied or not); ``recurrent`` masks ``h_{t-1}`` where it enters
    ``W_hh`` (per step, or variational: Gal & Ghahramani 2016); ``weight_hh`` drops
    elements of ``W_hh`` (Merity et al. 2018); ``zoneout_hidden`` acts on ``h`` (Krueger et
    al. 2016); ``embedding`` belongs to the model around it. ``candidate``, ``cell`` and
    ``zoneout_cell`` raise a ``ValueError``: there is no gated candidate and no cell state.
    Parameter names, shapes, initialisation and state_dicts are ``torch.nn.RNN``'s; with no
    dropout active the fused op (``_VF.rnn_tanh`` / ``rnn_relu``) runs with the same
    arguments, so outputs are bitwise equal. Execution paths, mask recording and inference
    modes: :class:`~rnndrop.nn.rnn.RNNBase`.

    Args:
        input_size: features of ``x``.
        hidden_size: features of ``h``.
        num_layers: stacked layers.
        nonlinearity: ``"tanh"`` or ``"relu"``.
        bias: use ``b_ih`` and ``b_hh``.
        batch_first: input and output are ``(B, T, *)``.
        dropout: a :class:`~rnndrop.config.RecurrentDropout`, a dict of its fields, a preset
            name, or a float (``nn.RNN``'s meaning: per-step dropout between layers).
        bidirectional: run a second, reversed direction per layer.

    Shape:
        - input: ``(T, B, H_in)``, ``(B, T, H_in)`` with ``batch_first``, ``(T, H_in)``
          unbatched, or a ``PackedSequence``.
        - hx: optional ``h_0`` ``(D·num_layers, B, H)``; zeros if absent.
        - output: ``(T, B, D·H)`` (as the input's layout), ``h_n`` as hx. With
          ``return_pre_dropout=True`` a third item: the output before output dropout.
    """

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        num_layers: int = 1,
        nonlinearity: str = "tanh",
        bias: bool = True,
        batch_first: bool = False,
        dropout: DropoutSpec = None,
        bidirectional: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        if nonlinearity not in _CELLS:  # torch's message
            raise ValueError(
                f"Unknown nonlinearity '{nonlinearity}'. Select from 'tanh' or 'relu'."
            )
        super().__init__(_CELLS[nonlinearity], input_size, hidden_size, num_layers, bias,
                         batch_first, dropout, bidirectional, 0, device, dtype)  # fmt: skip
        self.nonlinearity = nonlinearity

    def extra_repr(self) -> str:
        s = super().extra_repr()
        return s if self.nonlinearity == "tanh" else s + f", nonlinearity={self.nonlinearity!r}"


class RNNCell(StepCellBase):
    r"""A drop-in ``torch.nn.RNNCell`` carrying every recurrent dropout scheme that means
    something for it.

    One step of :class:`RNN` (Elman 1990) with the masks of
    :class:`~rnndrop.config.RecurrentDropout`::

        h̃'     = φ(W_ih (x ⊙ m^x) + b_ih + (W_hh ⊙ M)(h ⊙ m^h) + b_hh),   φ = tanh | relu
        h'      = d^h ⊙ h + (1 - d^h) ⊙ h̃'
        output  = h' ⊙ m^o                      (returned with ``return_output=True``)

    ``m^x``, ``m^h``: input and recurrent masks (Gal & Ghahramani 2016); ``M``: weight drop
    (Merity et al. 2017); ``d^h``: zoneout, 1 = keep the previous value (Krueger et al.
    2016); ``m^o``: output. An absent site is 1 (``d``: 0). ``candidate``, ``cell`` and
    ``zoneout_cell`` raise a ``ValueError`` (no gated candidate, no cell state). Parameter
    names, shapes, initialisation and state_dicts are ``torch.nn.RNNCell``'s; with no site
    acting in a call, ``torch._VF.rnn_tanh_cell`` / ``rnn_relu_cell`` runs with
    ``nn.RNNCell``'s arguments (bitwise equal). Per-sequence masks (a ``sequence`` scope or
    ``masks=``), eval and MC modes, recording: :class:`~rnndrop.nn.stepcells.StepCellBase`.

    Args:
        input_size: features of ``x``.
        hidden_size: features of ``h``.
        bias: use ``b_ih`` and ``b_hh``.
        nonlinearity: ``"tanh"`` or ``"relu"``.
        device, dtype: of the parameters.
        dropout: a :class:`~rnndrop.config.RecurrentDropout`, a dict of its fields or a
            preset name (``between_layers`` is ignored, with a warning).

    Shape:
        - input: ``(B, I)`` or ``(I,)`` unbatched.
        - hx: optional ``h`` ``(B, H)`` (``(H,)`` unbatched); zeros if absent (a new
          sequence).
        - masks: optional :class:`~rnndrop.nn.CellMasks` of the sequence.
        - returns ``h'`` as hx; with ``return_output=True``, ``(output, h')``.
    """

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        bias: bool = True,
        nonlinearity: str = "tanh",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        dropout: DropoutSpec = None,
    ) -> None:
        if nonlinearity not in _CELLS:  # torch's message
            raise ValueError(f"Unknown nonlinearity: {nonlinearity}. Select from 'tanh' or 'relu'.")
        super().__init__(_CELLS[nonlinearity], input_size, hidden_size, bias, device, dtype,
                         dropout)  # fmt: skip
        self.nonlinearity = nonlinearity

    def extra_repr(self) -> str:
        s = super().extra_repr()
        return s if self.nonlinearity == "tanh" else s + f", nonlinearity={self.nonlinearity!r}"

    def _fused(self, x: Tensor, state: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
        op = _VF.rnn_relu_cell if self.nonlinearity == "relu" else _VF.rnn_tanh_cell
        return (op(x, state[0], self.weight_ih, self.weight_hh, self.bias_ih, self.bias_hh),)
