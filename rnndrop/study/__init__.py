"""Long-range studies: how each dropout scheme changes what a model can remember."""

from .._extras import needs_train_extra, require_train_extra

require_train_extra("rnndrop.study")  # its functions import Lightning when they run
with needs_train_extra("rnndrop.study"):  # without the train extra: an error naming it
    from .base import Run, Study
    from .config import (
        BUILTIN_SCHEMES,
        Cell,
        LongRangeRun,
        StudyConfig,
        load_study,
        preset_scheme,
        resolve_scheme,
    )
    from .report import write_report
    from .runner import StudyInterrupted, is_finished, load_result, run_cell, run_study
    from .verdict import curve_measures, paired_differences, verdict, write_reports, write_verdict

__all__ = [
    "BUILTIN_SCHEMES",
    "Cell",
    "LongRangeRun",
    "Run",
    "Study",
    "StudyConfig",
    "StudyInterrupted",
    "curve_measures",
    "is_finished",
    "load_result",
    "load_study",
    "paired_differences",
    "preset_scheme",
    "resolve_scheme",
    "run_cell",
    "run_study",
    "verdict",
    "write_report",
    "write_reports",
    "write_verdict",
]
