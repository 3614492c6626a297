"""Surrogate networks: a window of past states ``(B, H, *state)`` -> the next state ``(B, *state)``.

Every network predicts a residual increment, ``x_{t+1} = x_t + s · f(history)``, where ``f`` sees
the history normalised by per-channel buffers (``mean``, ``scale``) and ``s`` is the per-channel
scale of one-step increments (``step_scale``). The three buffers are persistent, so a checkpoint
(``state_dict``) carries them; :meth:`Surrogate.fit_normalization` sets them from training data.

States are ``(n,)`` rings or ``(C, n)`` (``C`` variables on a ring). Statistics are per channel
and shared by all grid points, which keeps the convolutional network translation equivariant.

Each network is the sum of two paths, both zero-initialised so an untrained network is
persistence (``x_{t+1} = x_t``), a stable start for training and roll-outs:

* a *linear* path, one circular convolution from the whole window to the increment (a learned
  linear autoregression; it represents any circulant linear step exactly, which a stack of
  nonlinear layers only approximates);
* a *nonlinear* path, a residual stack (:class:`ConvSurrogate`) or an MLP (:class:`MLPSurrogate`).

The networks hold no batch statistics (no batch norm, no dropout): a member's prediction does
not depend on which members share its batch. :func:`build_surrogate` builds one from a kind name
and checked options; ``net.spec`` holds the arguments that rebuild it (``build_surrogate(**spec)``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

SURROGATE_KINDS: tuple[str, ...] = ("conv", "mlp")
CONV_OPTIONS: tuple[str, ...] = ("width", "depth", "kernel_size", "dilations", "linear_kernel")
MLP_OPTIONS: tuple[str, ...] = ("hidden", "depth")

__all__ = [
    "CONV_OPTIONS",
    "MLP_OPTIONS",
    "SURROGATE_KINDS",
    "ConvSurrogate",
    "MLPSurrogate",
    "Surrogate",
    "build_surrogate",
    "parameter_count",
]


def _check_int(name: str, value: object, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"option {name!r} must be an integer >= {low}, got {value!r}")
    return value


def _check_odd(name: str, value: object) -> int:
    k = _check_int(name, value, 1)
    if k % 2 == 0:
        raise ValueError(f"option {name!r} must be odd (same-size circular padding), got {k}")
    return k


def _as_channels(x: torch.Tensor, frame_ndim: int) -> torch.Tensor:
    """View states with ``frame_ndim`` trailing state axes as ``(..., C, n)`` (``C = 1`` for rings)."""
    return x.unsqueeze(-2) if frame_ndim == 1 else x


class Surrogate(nn.Module):
    """Common interface: ``forward(history (B, H, *state)) -> (B, *state)``.

    Subclasses implement :meth:`increment`, the normalised increment from the normalised
    history ``(B, H, C, n) -> (B, C, n)``.

    Attributes:
        history: window length ``H`` (the number of past states the network reads).
        channels: variables per grid point ``C``; states are ``(n,)`` when ``C = 1`` and
            ``(C, n)`` otherwise (a ``(1, n)`` state is accepted too).
        spec: the arguments of :func:`build_surrogate` that rebuild this network.
    """

    kind: str = ""

    def __init__(self, history: int, channels: int) -> None:
        super().__init__()
        self.history = _check_int("history", history, 1)
        self.channels = _check_int("channels", channels, 1)
        self.spec: dict[str, Any] = {}
        shape = (self.channels, 1)
        self.register_buffer("mean", torch.zeros(shape))
        self.register_buffer("scale", torch.ones(shape))
        self.register_buffer("step_scale", torch.ones(shape))

    # -- normalisation ---------------------------------------------------------------------------
    @torch.no_grad()
    def fit_normalization(self, trajectories: torch.Tensor) -> Surrogate:
        """Set ``mean``, ``scale`` and ``step_scale`` from trajectories; returns ``self``.

        Args:
            trajectories: ``(T, *state)`` or ``(N, T, *state)`` with ``T >= 2``; statistics are
                per channel over trajectories, time and grid points, computed in float64.
        """
        traj = self._trajectories(trajectories).to(torch.float64)  # (N, T, C, n)
        if traj.shape[1] < 2:
            raise ValueError("fit_normalization needs trajectories of at least 2 frames")
        per_channel = traj.transpose(0, 2).reshape(self.channels, -1)
        steps = (traj[:, 1:] - traj[:, :-1]).transpose(0, 2).reshape(self.channels, -1)
        tiny = 1e-12
        self.mean.copy_(per_channel.mean(1, keepdim=True))
        self.scale.copy_(per_channel.std(1, keepdim=True).clamp_min(tiny))
        self.step_scale.copy_(steps.square().mean(1, keepdim=True).sqrt().clamp_min(tiny))
        return self

    def _trajectories(self, traj: torch.Tensor) -> torch.Tensor:
        """``(T, *state)`` or ``(N, T, *state)`` -> ``(N, T, C, n)``."""
        frame_ndim = 1 if self.channels == 1 and traj.ndim in (2, 3) else 2
        if traj.ndim == frame_ndim + 1:
            traj = traj.unsqueeze(0)
        if traj.ndim != frame_ndim + 2:
            raise ValueError(f"trajectories must be (T, *state) or (N, T, *state), got {tuple(traj.shape)}")
        out = _as_channels(traj, frame_ndim)
        if out.shape[-2] != self.channels:
            raise ValueError(f"trajectories have {out.shape[-2]} channels; the network has {self.channels}")
        return out

    def normalized_error(self, estimate: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """``(estimate − target) / step_scale``: errors in units of a typical one-step change.

        Args:
            estimate, target: ``(B, ..., *state)`` of equal shape (at least one leading axis).

        Returns:
            the same shape. The ``(C, 1)`` buffer broadcasts against ``(C, n)`` states and, with
            ``C = 1``, against ``(n,)`` states.
        """
        return (estimate - target) / self.step_scale.to(estimate.dtype)

    # -- forward ---------------------------------------------------------------------------------
    def increment(self, z: torch.Tensor) -> torch.Tensor:
        """Normalised increment ``(B, C, n)`` from the normalised history ``z (B, H, C, n)``."""
        raise NotImplementedError

    def frame_ndim(self, history: torch.Tensor) -> int:
        """Number of state axes of a history ``(B, H, *state)``: 1 for rings, 2 for ``(C, n)``."""
        frame_ndim = history.ndim - 2
        if frame_ndim not in (1, 2) or (frame_ndim == 1 and self.channels != 1):
            want = "(B, H, n)" if self.channels == 1 else f"(B, H, {self.channels}, n)"
            raise ValueError(f"history must be {want}, got {tuple(history.shape)}")
        if history.shape[1] != self.history:
            raise ValueError(f"history has {history.shape[1]} frames; the network reads {self.history}")
        if frame_ndim == 2 and history.shape[2] != self.channels:
            raise ValueError(f"history has {history.shape[2]} channels; the network has {self.channels}")
        return frame_ndim

    def forward(self, history: torch.Tensor) -> torch.Tensor:
        """Predict the next state.

        Args:
            history: ``(B, H, *state)``, oldest frame first; any floating dtype (the network runs
                in its parameters' dtype, the residual is added in the input's).

        Returns:
            ``(B, *state)``, dtype and device of ``history``.
        """
        frame_ndim = self.frame_ndim(history)
        h = _as_channels(history, frame_ndim)  # (B, H, C, n)
        wdtype = self.mean.dtype
        z = (h.to(wdtype) - self.mean) / self.scale
        inc = (self.step_scale * self.increment(z)).to(history.dtype)
        out = h[:, -1] + inc
        return out.squeeze(-2) if frame_ndim == 1 else out


class ConvSurrogate(Surrogate):
    """Residual 1-D circular-convolution network for rings (Lorenz-96 of any size, KdV).

    The ``H`` frames of ``C`` channels are stacked into ``H·C`` input channels. Nonlinear path:
    ``conv_in`` (kernel ``k``) -> ``depth`` residual blocks ``h + conv(GELU(conv(GELU(h))))``, both
    convolutions of block ``i`` with dilation ``dilations[i]`` -> a zero-initialised 1×1 output
    convolution. Linear path: one zero-initialised convolution of size ``linear_kernel``.

    Circular padding and shared weights make it translation equivariant, so the same weights run
    on rings of any size ``n`` (at least the largest padding, ``dilation · (k − 1)/2``). The
    receptive field is ``1 + (k − 1)(1 + 2 Σ dilations)`` points; dilations ``(1, 2, 4, 8)``
    widen it for KdV's dispersive, wave-like dynamics.
    """

    kind = "conv"

    def __init__(
        self,
        history: int,
        channels: int = 1,
        *,
        width: int = 64,
        depth: int = 4,
        kernel_size: int = 5,
        dilations: Sequence[int] | None = None,
        linear_kernel: int = 9,
    ) -> None:
        """Args:
            history: window length ``H``.
            channels: variables per grid point ``C``.
            width: feature channels.
            depth: residual blocks.
            kernel_size: odd convolution size ``k``.
            dilations: one dilation per block (default all 1).
            linear_kernel: odd size of the linear path's convolution.
        """
        super().__init__(history, channels)
        width = _check_int("width", width, 1)
        depth = _check_int("depth", depth, 1)
        k = _check_odd("kernel_size", kernel_size)
        lk = _check_odd("linear_kernel", linear_kernel)
        dil = (1,) * depth if dilations is None else tuple(dilations)
        if len(dil) != depth:
            raise ValueError(f"option 'dilations' needs one entry per block ({depth}), got {dilations!r}")
        for d in dil:
            _check_int("dilations", d, 1)
        self.spec = {"kind": "conv", "history": self.history, "channels": self.channels,
                     "width": width, "depth": depth, "kernel_size": k, "dilations": list(dil),
                     "linear_kernel": lk}
        cin = self.history * self.channels

        def conv(a: int, b: int, size: int, dilation: int = 1) -> nn.Conv1d:
            return nn.Conv1d(a, b, size, padding=dilation * (size // 2), dilation=dilation,
                             padding_mode="circular")

        self.conv_in = conv(cin, width, k)
        self.blocks = nn.ModuleList(
            nn.ModuleList([conv(width, width, k, d), conv(width, width, k, d)]) for d in dil
        )
        self.conv_out = conv(width, self.channels, 1)
        self.linear = conv(cin, self.channels, lk)
        for layer in (self.conv_out, self.linear):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    @property
    def receptive_field(self) -> int:
        """Grid points that one output point depends on (through the nonlinear path)."""
        k = self.spec["kernel_size"]
        return 1 + (k - 1) * (1 + 2 * sum(self.spec["dilations"]))

    def increment(self, z: torch.Tensor) -> torch.Tensor:
        b, h, c, n = z.shape
        x = z.reshape(b, h * c, n)
        y = self.conv_in(x)
        for first, second in self.blocks:
            y = y + second(F.gelu(first(F.gelu(y))))
        return self.conv_out(F.gelu(y)) + self.linear(x)


class MLPSurrogate(Surrogate):
    """Fully connected residual MLP for small states (e.g. Lorenz-96 with ``d = 20``).

    Reads the whole flattened window ``H·C·n`` and predicts all ``C·n`` increments, so it is
    tied to one state size (no translation equivariance): ``size`` is fixed at construction.
    """

    kind = "mlp"

    def __init__(self, history: int, size: int, channels: int = 1, *, hidden: int = 256,
                 depth: int = 2) -> None:
        """Args:
            history: window length ``H``.
            size: ring length ``n``.
            channels: variables per grid point ``C``.
            hidden: width of the hidden layers.
            depth: hidden layers.
        """
        super().__init__(history, channels)
        self.size = _check_int("size", size, 1)
        hidden = _check_int("hidden", hidden, 1)
        depth = _check_int("depth", depth, 1)
        self.spec = {"kind": "mlp", "history": self.history, "channels": self.channels,
                     "size": self.size, "hidden": hidden, "depth": depth}
        d_in, d_out = self.history * self.channels * self.size, self.channels * self.size
        layers: list[nn.Module] = []
        width = d_in
        for _ in range(depth):
            layers += [nn.Linear(width, hidden), nn.GELU()]
            width = hidden
        out = nn.Linear(width, d_out)
        self.mlp = nn.Sequential(*layers, out)
        self.linear = nn.Linear(d_in, d_out)
        for layer in (out, self.linear):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def increment(self, z: torch.Tensor) -> torch.Tensor:
        b, _, c, n = z.shape
        if n != self.size:
            raise ValueError(f"state has {n} points; this MLP surrogate was built for {self.size}")
        x = z.reshape(b, -1)
        return (self.mlp(x) + self.linear(x)).reshape(b, c, n)


def build_surrogate(kind: str, *, history: int, channels: int = 1, size: int | None = None,
                    **options: Any) -> Surrogate:
    """Build a surrogate by kind, checking every option.

    Args:
        kind: ``"conv"`` (:class:`ConvSurrogate`, any ring size) or ``"mlp"``
            (:class:`MLPSurrogate`, needs ``size``).
        history: window length ``H``.
        channels: variables per grid point ``C``.
        size: ring length ``n`` (required for ``"mlp"``; checked against the receptive padding
            for ``"conv"`` when given).
        **options: :data:`CONV_OPTIONS` / :data:`MLP_OPTIONS`.

    Returns:
        the network (float32, persistence until trained); ``net.spec`` rebuilds it.

    Raises:
        ValueError: unknown kind or option, or a value that does not fit, naming it.
    """
    if kind not in SURROGATE_KINDS:
        raise ValueError(f"unknown surrogate kind {kind!r}; known: {', '.join(SURROGATE_KINDS)}")
    allowed = CONV_OPTIONS if kind == "conv" else MLP_OPTIONS
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ValueError(f"unknown option {unknown[0]!r} for surrogate kind {kind!r}; "
                         f"known: {', '.join(allowed)}")
    if kind == "mlp":
        if size is None:
            raise ValueError("surrogate kind 'mlp' needs option 'size' (the ring length)")
        return MLPSurrogate(history, size, channels, **options)
    net = ConvSurrogate(history, channels, **options)
    if size is not None:
        _check_int("size", size, 1)
        pad = max(d * (net.spec["kernel_size"] // 2) for d in net.spec["dilations"])
        pad = max(pad, net.spec["linear_kernel"] // 2)
        if pad > size:
            raise ValueError(f"option 'dilations'/'kernel_size' pad by {pad} points, more than the "
                             f"ring of {size}: circular padding would wrap more than once")
    return net


def parameter_count(net: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(math.prod(p.shape) for p in net.parameters() if p.requires_grad)
