"""Lightning training: tasks, callbacks and the ``rnndrop fit`` CLI (needs Lightning)."""

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
