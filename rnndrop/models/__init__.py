"""Plain ``nn.Module`` models (no Lightning): language models and sequence models."""

from .encoders import (
    ENCODERS,
    RECURRENT_CELLS,
    RecurrentStack,
    TransformerEncoder,
    build_encoder,
)
from .language_model import LanguageModel, LMOutput
from .sequence_model import SeqOutput, SequenceModel

__all__ = [
    "ENCODERS",
    "RECURRENT_CELLS",
    "LMOutput",
    "LanguageModel",
    "RecurrentStack",
    "SeqOutput",
    "SequenceModel",
    "TransformerEncoder",
    "build_encoder",
]
