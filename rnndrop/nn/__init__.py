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

__all__ = [
    "LSTM",
    "DropPath",
    "EmbeddingDropout",
    "LockedDropout",
    "StochasticModule",
    "Zoneout",
    "as_dropout",
    "mc_dropout",
]
