"""ML surrogates of dynamical systems and their EnSF / EnKF-corrected roll-outs.

``nets``: history-window networks (residual circular CNN for rings of any size, MLP for small
states); ``training``: (history, target) pairs, losses, keyed target noise, a fit loop, pairs from
analyses; ``rollout``: plain and filtered roll-outs, observation helpers, lead-time metrics.
"""

from __future__ import annotations

from kernels.surrogate.nets import (
    CONV_OPTIONS,
    MLP_OPTIONS,
    SURROGATE_KINDS,
    ConvSurrogate,
    MLPSurrogate,
    Surrogate,
    build_surrogate,
    parameter_count,
)
from kernels.surrogate.rollout import (
    FilteredRollout,
    Forecast,
    cycle_mask,
    default_filter,
    filtered_rollout,
    markov_forecast,
    mean_std,
    observe_trajectory,
    perturbed_ensemble,
    rmse_by_lead,
    rollout,
)
from kernels.surrogate.training import (
    add_trajectory_noise,
    analysis_pairs,
    fit,
    make_pairs,
    one_step_loss,
    one_step_rmse,
    unrolled_loss,
)

__all__ = [
    "CONV_OPTIONS",
    "MLP_OPTIONS",
    "SURROGATE_KINDS",
    "ConvSurrogate",
    "FilteredRollout",
    "Forecast",
    "MLPSurrogate",
    "Surrogate",
    "add_trajectory_noise",
    "analysis_pairs",
    "build_surrogate",
    "cycle_mask",
    "default_filter",
    "filtered_rollout",
    "fit",
    "make_pairs",
    "markov_forecast",
    "mean_std",
    "observe_trajectory",
    "one_step_loss",
    "one_step_rmse",
    "parameter_count",
    "perturbed_ensemble",
    "rmse_by_lead",
    "rollout",
    "unrolled_loss",
]
