"""Torch-only building blocks: import these without Lightning.

>>> from rnndrop.nn import LSTM
>>> from rnndrop.config import RecurrentDropout
>>> lstm = LSTM(32, 64, num_layers=2, dropout=RecurrentDropout.variational(0.3))
"""

from .dropout import (
    DropPath,
    EmbeddingDropout,
    LockedDropout,
    StochasticModule,
    Zoneout,
    mc_dropout,
)
from .lstm import LSTM, as_dropout
from .transformer import CausalTransformer, TransformerBlock

__all__ = [
    "LSTM",
    "CausalTransformer",
    "DropPath",
    "EmbeddingDropout",
    "LockedDropout",
    "StochasticModule",
    "TransformerBlock",
    "Zoneout",
    "as_dropout",
    "mc_dropout",
]
