"""The cell family: each cell is one file with its layout, fused op and per-step math.

Adding a cell means adding its file here and its kernels in :mod:`rnndrop.kernels`; the
layer, direction, packing, state and mask machinery of :class:`rnndrop.nn.rnn.RNNBase`
is shared.
"""

from .base import Cell
from .gru import GRU_CELL
from .lstm import LSTM_CELL

CELLS: dict[str, Cell] = {"lstm": LSTM_CELL, "gru": GRU_CELL}

__all__ = ["CELLS", "GRU_CELL", "LSTM_CELL", "Cell"]
