"""The cell family: each cell is one file with its layout, fused op and per-step math.

Adding a cell means adding its file here (one line in :data:`CELLS`), its modules, and its
row kernels and traits in each compiled backend (``kernels/cpp/cell_<name>.h``); the layer,
direction, packing, state and mask machinery of :class:`rnndrop.nn.rnn.RNNBase`, the
``python`` loop and the backend adapters are shared. docs/engine.md ("What a change
touches") has the trace of adding the Elman RNN.
"""

from .base import Cell
from .gru import GRU_CELL
from .layernorm_lstm import LAYERNORM_LSTM_CELL
from .lstm import LSTM_CELL
from .rnn import RNN_RELU_CELL, RNN_TANH_CELL

CELLS: dict[str, Cell] = {c.name: c for c in (LSTM_CELL, GRU_CELL, RNN_TANH_CELL, RNN_RELU_CELL,
                                              LAYERNORM_LSTM_CELL)}  # fmt: skip

__all__ = ["CELLS", "GRU_CELL", "LAYERNORM_LSTM_CELL", "LSTM_CELL", "RNN_RELU_CELL",
           "RNN_TANH_CELL", "Cell"]  # fmt: skip
