"""Long-range measurements: how far information and gradients reach."""

from .gradients import default_distances, gradient_through_time, last_step_loss

__all__ = ["default_distances", "gradient_through_time", "last_step_loss"]
