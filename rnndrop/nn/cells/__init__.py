"""The cell family: each cell is one file with its layout, fused op and per-step math.

Adding a cell means adding its file here and its kernels in :mod:`rnndrop.kernels`; the
layer, direction, packing, state and mask machinery of :class:`rnndrop.nn.rnn.RNNBase`
is shared.
"""

from .base import Cell
from .gru import GRU_CELL
from .lstm import LSTM_CELL
from .rnn import RNN_RELU_CELL, RNN_TANH_CELL

CELLS: dict[str, Cell] = {
    c.name: c for c in (LSTM_CELL, GRU_CELL, RNN_TANH_CELL, RNN_RELU_CELL)
}

__all__ = ["CELLS", "GRU_CELL", "LSTM_CELL", "RNN_RELU_CELL", "RNN_TANH_CELL", "Cell"]
