"""Long-range measurements: how far information and gradients reach, and summaries."""

from .context import MODES as CONTEXT_MODES
from .context import context_usage, effective_context
from .evaluation import evaluate_sequence_model
from .gradients import default_distances, gradient_through_time, last_step_loss
from .stats import mean_ci, normalized_accuracy, solved_distance, t_quantile

__all__ = [
    "CONTEXT_MODES",
    "context_usage",
    "default_distances",
    "effective_context",
    "evaluate_sequence_model",
    "gradient_through_time",
    "last_step_loss",
    "mean_ci",
    "normalized_accuracy",
    "solved_distance",
    "t_quantile",
]
