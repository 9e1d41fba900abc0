r"""``rnndrop.nn.LayerNormLSTM``: a LayerNorm LSTM (Ba et al. 2016, haste's form) with every
recurrent dropout scheme.

The layer machinery is :class:`~rnndrop.nn.rnn.RNNBase`'s; the cell (parameters, step math,
no fused op) is :mod:`rnndrop.nn.cells.layernorm_lstm`. Kept apart from ``rnn.py`` so that a
cell's module is its own file.
"""

from __future__ import annotations

import torch

from ..config import DropoutSpec
from .cells import LAYERNORM_LSTM_CELL
from .rnn import RNNBase

__all__ = ["LayerNormLSTM"]


class LayerNormLSTM(RNNBase):
    r"""An LSTM with layer normalisation (Ba, Kiros & Hinton 2016) carrying every recurrent
    dropout scheme, with ``torch.nn.LSTM``'s interface.

    Computes, for each layer and step (haste's ``LayerNormLSTM`` equations, torch's gate
    order i, f, g, o)::

        i, f, g, o = σ, σ, tanh, σ (LN(W_ih x_t; γ_x) + LN(W_hh h_{t-1}; γ_h) + b)
        c_t = f ⊙ c_{t-1} + i ⊙ g
        h_t = o ⊙ tanh(LN(c_t; γ_c, β_c))

    ``LN`` normalises over the ``4H`` gate vector (the gates' LNs have no shift: ``b`` is
    it) and over the ``H`` cell units, with ε = 1e-5 and the biased variance; ``b = b_ih +
    b_hh``. Every site of :class:`rnndrop.config.RecurrentDropout` means what it means for
    the LSTM: ``input``, ``between_layers``, ``output`` (naive, Zaremba et al. 2014, per
    step or per sequence, tied or per gate); ``recurrent`` masks ``h_{t-1}`` before
    ``W_hh`` (per step, or variational: Gal & Ghahramani 2016, tied or untied);
    ``weight_hh`` drops elements of ``W_hh`` (Merity et al. 2018); ``candidate`` masks
    ``g`` (Semeniuta et al. 2016); ``cell`` masks ``c̃`` (Moon et al. 2015);
    ``zoneout_hidden`` / ``zoneout_cell`` (Krueger et al. 2016; ``LN(c)`` normalises the
    cell value before zoneout, see :mod:`rnndrop.nn.cells.layernorm_lstm`); ``embedding``
    belongs to the model around it (``encoder="layernorm_lstm"``); concrete dropout learns
    the rates. There is no fused op: every forward runs a loop backend (``cpp`` on CPU
    float32/float64, else ``python``). With no dropout active it computes the equations
    above; execution, mask recording and inference modes: :class:`~rnndrop.nn.rnn.RNNBase`.

    Parameters, per layer ``k`` (``_reverse`` for the second direction): torch's
    ``weight_ih_l{k}`` ``(4H, I)``, ``weight_hh_l{k}`` ``(4H, H)``, ``bias_ih_l{k}``,
    ``bias_hh_l{k}`` ``(4H)`` (their sum is haste's one ``bias``; kept as two so that an
    ``nn.LSTM`` state dict loads with ``strict=False`` and leaves the LNs at identity
    gains), and the LNs': ``gamma_ih_l{k}`` ``(4H)`` (haste's ``gamma[0]``, γ_x),
    ``gamma_hh_l{k}`` ``(4H)`` (``gamma[1]``, γ_h), ``gamma_c_l{k}`` and ``beta_c_l{k}``
    ``(H)`` (haste's ``gamma_h`` / ``beta_h``, the LN on ``c``). Initialisation: torch's
    ``U(-1/√H, 1/√H)`` for the four, γ = 1, β = 0 (haste uses Xavier / orthogonal weights and
    a forget bias of 1; set those yourself if you want them).

    Args:
        input_size: features of ``x``.
        hidden_size: features of ``h`` and ``c``.
        num_layers: stacked layers.
        bias: use ``b_ih`` and ``b_hh`` (without: ``b = 0``; the LN gains stay).
        batch_first: input and output are ``(B, T, *)``.
        dropout: a :class:`~rnndrop.config.RecurrentDropout`, a dict of its fields, a
            preset name, or a float (``nn.LSTM``'s meaning: per-step dropout between
            layers).
        bidirectional: run a second, reversed direction per layer.

    Shape:
        - input: ``(T, B, H_in)``, ``(B, T, H_in)`` with ``batch_first``, ``(T, H_in)``
          unbatched, or a ``PackedSequence``.
        - hx: optional ``(h_0, c_0)``, each ``(D·num_layers, B, H)``; zeros if absent.
        - output: ``(T, B, D·H)`` (as the input's layout), ``(h_n, c_n)`` as hx. With
          ``return_pre_dropout=True`` a third item: the output before output dropout.
    """

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        num_layers: int = 1,
        bias: bool = True,
        batch_first: bool = False,
        dropout: DropoutSpec = None,
        bidirectional: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(LAYERNORM_LSTM_CELL, input_size, hidden_size, num_layers, bias,
                         batch_first, dropout, bidirectional, 0, device, dtype)  # fmt: skip
