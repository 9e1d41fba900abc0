"""Long-range measurements, dropout ensembles and calibration, and summaries.

The calibration names (:mod:`rnndrop.analysis.calibration`) need torchmetrics (the ``train``
extra) and are imported on first use, so the rest of this package needs torch alone.
"""

from .context import MODES as CONTEXT_MODES
from .context import compare_probes, context_usage, effective_context
from .ensembles import (
    Ensemble,
    categorical_kl,
    exact_ensemble,
    mc_aggregate,
    mc_convergence,
    mc_predict,
)
from .evaluation import evaluate_sequence_model
from .gradients import default_distances, gradient_through_time, last_step_loss
from .inference import collect_predictions, evaluate_inference, learned_rates
from .stats import mean_ci, normalized_accuracy, solved_distance, t_quantile

_CALIBRATION = (
    "Calibration",
    "Reliability",
    "SplitCalibration",
    "calibration_metrics",
    "reliability_diagram",
)


def __getattr__(name: str):
    if name in _CALIBRATION:
        from . import calibration

        return getattr(calibration, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "CONTEXT_MODES",
    "Calibration",
    "Ensemble",
    "Reliability",
    "SplitCalibration",
    "calibration_metrics",
    "categorical_kl",
    "collect_predictions",
    "compare_probes",
    "context_usage",
    "default_distances",
    "effective_context",
    "evaluate_inference",
    "evaluate_sequence_model",
    "exact_ensemble",
    "gradient_through_time",
    "last_step_loss",
    "learned_rates",
    "mc_aggregate",
    "mc_convergence",
    "mc_predict",
    "mean_ci",
    "normalized_accuracy",
    "reliability_diagram",
    "solved_distance",
    "t_quantile",
]
