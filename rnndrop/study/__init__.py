"""Long-range studies: how each dropout scheme changes what a model can remember."""

from .config import (
    BUILTIN_SCHEMES,
    Cell,
    StudyConfig,
    load_study,
    preset_scheme,
    resolve_scheme,
)
from .report import write_report
from .runner import is_finished, load_result, run_cell, run_study

__all__ = [
    "BUILTIN_SCHEMES",
    "Cell",
    "StudyConfig",
    "is_finished",
    "load_result",
    "load_study",
    "preset_scheme",
    "resolve_scheme",
    "run_cell",
    "run_study",
    "write_report",
]
