"""Plain ``nn.Module`` models (no Lightning): language models and sequence models."""

from .encoders import LSTMStack, TransformerEncoder, build_encoder
from .language_model import LanguageModel, LMOutput
from .sequence_model import SeqOutput, SequenceModel

__all__ = [
    "LMOutput",
    "LSTMStack",
    "LanguageModel",
    "SeqOutput",
    "SequenceModel",
    "TransformerEncoder",
    "build_encoder",
]
