"""Long-range measurements: how far information and gradients reach, and summaries."""

from .context import MODES as CONTEXT_MODES
from .context import context_usage, effective_context
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
from .stats import mean_ci, normalized_accuracy, solved_distance, t_quantile

__all__ = [
    "CONTEXT_MODES",
    "Ensemble",
    "categorical_kl",
    "context_usage",
    "default_distances",
    "effective_context",
    "evaluate_sequence_model",
    "exact_ensemble",
    "gradient_through_time",
    "last_step_loss",
    "mc_aggregate",
    "mc_convergence",
    "mc_predict",
    "mean_ci",
    "normalized_accuracy",
    "solved_distance",
    "t_quantile",
]
