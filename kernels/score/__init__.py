"""Score networks and SDA pieces: noise schedule, window networks, denoiser, training loss,
window-score composition and the posterior sampler."""

from __future__ import annotations

from kernels.score.denoiser import (
    DenoisingError,
    Normalizer,
    WindowDenoiser,
    denoising_error,
    draw_noise,
    dsm_loss,
    trivial_dsm_loss,
)
from kernels.score.nets import (
    NETWORK_KINDS,
    RING_OPTIONS,
    THETA_HEADS,
    UNET_OPTIONS,
    MomentHead,
    RingResNet,
    TimeEmbedding,
    UNet2d,
    build_network,
)
from kernels.score.schedule import VPSchedule
from kernels.score.sda import (
    EpsFn,
    ObserveFn,
    SDASettings,
    composed_eps,
    composed_score,
    make_window_observe,
    posterior_eps,
    sample_posterior,
    sample_theta_given_states,
    trajectory_eps,
)

__all__ = [
    "NETWORK_KINDS",
    "RING_OPTIONS",
    "THETA_HEADS",
    "MomentHead",
    "UNET_OPTIONS",
    "DenoisingError",
    "EpsFn",
    "ObserveFn",
    "SDASettings",
    "Normalizer",
    "RingResNet",
    "TimeEmbedding",
    "UNet2d",
    "VPSchedule",
    "WindowDenoiser",
    "build_network",
    "composed_eps",
    "composed_score",
    "denoising_error",
    "draw_noise",
    "dsm_loss",
    "make_window_observe",
    "posterior_eps",
    "sample_posterior",
    "sample_theta_given_states",
    "trajectory_eps",
    "trivial_dsm_loss",
]
