"""Score networks and SDA pieces: noise schedule, window networks, denoiser and training loss."""

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
    UNET_OPTIONS,
    RingResNet,
    TimeEmbedding,
    UNet2d,
    build_network,
)
from kernels.score.schedule import VPSchedule

__all__ = [
    "NETWORK_KINDS",
    "RING_OPTIONS",
    "UNET_OPTIONS",
    "DenoisingError",
    "Normalizer",
    "RingResNet",
    "TimeEmbedding",
    "UNet2d",
    "VPSchedule",
    "WindowDenoiser",
    "build_network",
    "denoising_error",
    "draw_noise",
    "dsm_loss",
    "trivial_dsm_loss",
]
