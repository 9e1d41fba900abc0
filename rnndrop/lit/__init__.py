"""Lightning training: tasks, callbacks and the ``rnndrop fit`` CLI (needs Lightning)."""

import warnings

from .base import Task, detach_state, max_norm_
from .callbacks import (
    GradientThroughTime,
    LearningRateLogger,
    MaskStatistics,
    NaNGuard,
    NonFiniteLossError,
)
from .lm import LanguageModelTask
from .sequence import SequenceTask

# Lightning 2.6 calls a pytree API that torch >= 2.10 deprecates, once per fit: harmless, and it
# buried the study's per-cell lines. Only this exact message is silenced.
warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated")

__all__ = [
    "GradientThroughTime",
    "LanguageModelTask",
    "LearningRateLogger",
    "MaskStatistics",
    "NaNGuard",
    "NonFiniteLossError",
    "SequenceTask",
    "Task",
    "detach_state",
    "max_norm_",
]
