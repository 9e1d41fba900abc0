"""Torch-only building blocks: import these without Lightning.

>>> from rnndrop.nn import GRU, LSTM
>>> from rnndrop.config import RecurrentDropout
>>> lstm = LSTM(32, 64, num_layers=2, dropout=RecurrentDropout.variational(0.3))
"""

from ..config import as_dropout
from .dropout import (
    DropPath,
    EmbeddingDropout,
    LockedDropout,
    StochasticModule,
    Zoneout,
    mc_dropout,
)
from .elman import RNN, RNNCell
from .layernorm_lstm import LayerNormLSTM
from .rnn import GRU, LSTM, RNNBase, concrete_rates, concrete_regularizer
from .stepcells import CellMasks, GRUCell, LSTMCell, cell_dropout, sequence
from .transformer import CausalTransformer, TransformerBlock

__all__ = [
    "GRU",
    "LSTM",
    "RNN",
    "CausalTransformer",
    "CellMasks",
    "DropPath",
    "EmbeddingDropout",
    "GRUCell",
    "LSTMCell",
    "LayerNormLSTM",
    "LockedDropout",
    "RNNBase",
    "RNNCell",
    "StochasticModule",
    "TransformerBlock",
    "Zoneout",
    "as_dropout",
    "cell_dropout",
    "concrete_rates",
    "concrete_regularizer",
    "mc_dropout",
    "sequence",
]
