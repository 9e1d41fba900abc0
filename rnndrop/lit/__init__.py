"""Lightning training: tasks, callbacks and the ``rnndrop fit`` CLI (needs Lightning)."""

import warnings

from .._extras import needs_train_extra

with needs_train_extra("rnndrop.lit"):  # without Lightning: an error naming the extra
    from .base import Task, detach_state, max_norm_
    from .callbacks import (
        DivergenceError,
        GradientThroughTime,
        LearningRateLogger,
        LineProgress,
        MaskStatistics,
        NaNGuard,
        NonFiniteLossError,
        PlateauStop,
        Preemption,
    )
    from .checkpoints import AtomicCheckpointIO, CheckpointError, CheckpointSaveError
    from .lm import LanguageModelTask
    from .sequence import SequenceTask


# Lightning 2.6's CombinedLoader builds a torch pytree LeafSpec, which torch >= 2.10 deprecates
# with a FutureWarning, once per fit/validate/test: harmless, and it buried the study's
# per-cell lines. Neither Lightning nor torch has a switch for it, so this uses the public
# mechanism Python has, a warnings filter, made as narrow as it can be: this message, this
# category, and only when raised from Lightning's pytree module; the same warning from any
# other code (yours) still shows. It has to be set at import: the study's worker processes
# and Python API users call Trainer.fit themselves.
def _quiet_lightning_pytree() -> None:
    warnings.filterwarnings(
        "ignore",
        message=r"`isinstance\(treespec, LeafSpec\)` is deprecated",
        category=FutureWarning,
        module=r"lightning\.pytorch\.utilities\._pytree",
    )


_quiet_lightning_pytree()

__all__ = [
    "AtomicCheckpointIO",
    "CheckpointError",
    "CheckpointSaveError",
    "DivergenceError",
    "GradientThroughTime",
    "LanguageModelTask",
    "LearningRateLogger",
    "LineProgress",
    "MaskStatistics",
    "NaNGuard",
    "NonFiniteLossError",
    "PlateauStop",
    "Preemption",
    "SequenceTask",
    "Task",
    "detach_state",
    "max_norm_",
]
