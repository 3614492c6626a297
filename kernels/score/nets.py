"""Noise-prediction networks over a window of ``W = 2k + 1`` consecutive augmented states.

An augmented state is a physical field plus the model parameters θ (in their normalised
unconstrained space). Every network here maps

    x_state (B, W, C, *spatial), x_theta (B, W, P), t (B,)  ->  ε_state (B, W, C, *spatial), ε_theta (B, W, P)

with ``P = 0`` allowed (no parameters). The ``W`` states of a window are stacked along the
channel axis, and θ enters as ``W·P`` constant channels, so one convolution sees the whole
window at once. The diffusion time is embedded with sinusoids and an MLP and modulates every
residual block by FiLM (per-channel scale and shift).

θ is a global quantity: its ε is predicted by a head over spatially pooled features, either
(``theta_head: linear``) the mean of the last feature map and a linear map, or
(``theta_head: moments``) the mean and the log mean square of the feature maps of every level
and the log mean squares of the input field and its derivatives, an MLP conditioned on the
diffusion time. A parameter such as a viscosity acts through the fine-scale energy of the
field, a second moment that the mean of the group-normalised last features hardly sees; the
moments head reads it at every scale. With circular padding, translation-equivariant
normalisation and that global pooling, rolling the input along the periodic axes rolls
``ε_state`` the same way and leaves ``ε_theta`` unchanged (for the U-Net: rolls by multiples of
its total down-sampling factor, since stride-2 sampling only commutes with even shifts).

The final state convolution and the θ head start at zero, so an untrained network predicts
``ε = 0`` (the trivial predictor, loss 1) and training starts from a stable point.

:func:`build_network` builds either network from a kind name and checks every option.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn
from torch.nn import functional as F

RING_OPTIONS: tuple[str, ...] = ("width", "depth", "kernel_size", "time_features", "theta_head")
UNET_OPTIONS: tuple[str, ...] = (
    "width", "mults", "blocks", "kernel_size", "time_features", "forcing", "downsample", "upsample",
    "theta_head",
)
THETA_HEADS: tuple[str, ...] = ("linear", "moments")
NETWORK_KINDS: tuple[str, ...] = ("ring", "unet")


def _check_int(name: str, value: object, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"option {name!r} must be an integer >= {low}, got {value!r}")
    return value


def _check_window(window: object) -> int:
    w = _check_int("window", window, 1)
    if w % 2 == 0:
        raise ValueError(f"option 'window' must be odd (2k + 1 states), got {w}")
    return w


def _check_kernel(kernel_size: object) -> int:
    k = _check_int("kernel_size", kernel_size, 1)
    if k % 2 == 0:
        raise ValueError(f"option 'kernel_size' must be odd (same-size circular padding), got {k}")
    return k


def _groups(channels: int) -> int:
    """GroupNorm groups: at most 8, and a divisor of ``channels`` (so any width is accepted)."""
    return math.gcd(channels, 8)


class TimeEmbedding(nn.Module):
    """Sinusoidal features of ``t ∈ [0, 1]`` followed by a two-layer SiLU MLP."""

    def __init__(self, features: int = 64, dim: int | None = None) -> None:
        """Args:
            features: number of sinusoidal features (even); frequencies are log-spaced in
                ``[1, 1000]`` rad per unit ``t``, resolving both the coarse and the fine
                structure of the schedule.
            dim: output size (``4 · features`` when None).
        """
        super().__init__()
        if features < 2 or features % 2:
            raise ValueError(f"option 'time_features' must be an even integer >= 2, got {features}")
        self.dim = 4 * features if dim is None else dim
        # Non-persistent: fixed by `features`, so it need not be in checkpoints.
        self.register_buffer("freqs", torch.exp(torch.linspace(0.0, math.log(1000.0), features // 2)),
                             persistent=False)
        self.mlp = nn.Sequential(nn.Linear(features, self.dim), nn.SiLU(), nn.Linear(self.dim, self.dim))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        """``t (B,) -> (B, dim)``."""
        arg = t.to(self.freqs.dtype)[:, None] * self.freqs
        return self.mlp(torch.cat([torch.sin(arg), torch.cos(arg)], dim=-1))


def _conv(ndim: int, cin: int, cout: int, kernel_size: int, stride: int = 1) -> nn.Module:
    cls = nn.Conv1d if ndim == 1 else nn.Conv2d
    return cls(cin, cout, kernel_size, stride=stride, padding=kernel_size // 2, padding_mode="circular")


class ResBlock(nn.Module):
    """Pre-activation residual block with FiLM time conditioning.

    ``GroupNorm → SiLU → conv → GroupNorm → FiLM → SiLU → conv``, plus a 1×1 skip when the
    channel count changes. GroupNorm normalises over all positions, so it is translation
    equivariant and independent of the batch. The FiLM scale is ``1 + s`` with ``s`` starting at
    zero, so each block starts as an unconditioned residual block.
    """

    def __init__(self, ndim: int, cin: int, cout: int, emb_dim: int, kernel_size: int) -> None:
        super().__init__()
        self.ndim = ndim
        self.norm1 = nn.GroupNorm(_groups(cin), cin)
        self.conv1 = _conv(ndim, cin, cout, kernel_size)
        self.norm2 = nn.GroupNorm(_groups(cout), cout)
        self.film = nn.Linear(emb_dim, 2 * cout)
        nn.init.zeros_(self.film.weight)
        nn.init.zeros_(self.film.bias)
        self.conv2 = _conv(ndim, cout, cout, kernel_size)
        self.skip = nn.Identity() if cin == cout else _conv(ndim, cin, cout, 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        """``x (B, cin, *spatial)``, ``emb (B, emb_dim)`` (SiLU applied) -> ``(B, cout, *spatial)``."""
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = self.film(emb).reshape(emb.shape[0], 2, -1, *([1] * self.ndim)).unbind(1)
        h = self.conv2(F.silu(self.norm2(h) * (1.0 + scale) + shift))
        return self.skip(x) + h


def field_moments(x: torch.Tensor, ndim: int, delta: float = 1e-4) -> torch.Tensor:
    """``log(δ + mean(f²))`` over space of a periodic field and of its derivatives.

    ``f`` is the field, its forward difference along each spatial axis and its (2·ndim + 1)-point
    Laplacian: energy, gradient energy and curvature energy — the slope of the spectrum, where a
    viscosity shows. ``x (B, K, *spatial)`` with ``ndim`` spatial axes → ``(B, K · (ndim + 2))``.
    """
    dims = tuple(range(2, 2 + ndim))
    lap = -2.0 * ndim * x
    grads = []
    for ax in dims:
        fwd = torch.roll(x, -1, ax)
        grads.append(fwd - x)
        lap = lap + fwd + torch.roll(x, 1, ax)
    return torch.cat([torch.log(delta + f.square().mean(dim=dims)) for f in (x, *grads, lap)], dim=1)


class MomentHead(nn.Module):
    """ε_θ from the first and second spatial moments of several feature maps and of the input.

    Each map ``(B, c_i, *spatial)`` gives its spatial mean and ``log(δ + mean(h²))`` per channel
    (the log puts energies that differ by orders of magnitude on one scale, as a spectrum's slope
    is read on log axes; ``δ = 1e-4`` keeps it finite for a vanishing channel). The diffused
    input window adds its :func:`field_moments` (``n_field`` numbers): the fine-scale energy is
    a few percent of the field's, a difference learnt features need many examples to find.
    The pooled vector goes through ``Linear → (+ time) → SiLU → Linear → SiLU → Linear``; the
    last layer starts at zero (an untrained head predicts ε_θ = 0).
    """

    delta: float = 1e-4

    def __init__(self, widths: Sequence[int], emb_dim: int, out: int, hidden: int,
                 n_field: int = 0) -> None:
        super().__init__()
        self.inp = nn.Linear(2 * sum(widths) + n_field, hidden)
        self.time = nn.Linear(emb_dim, hidden)
        self.mid = nn.Linear(hidden, hidden)
        self.out = nn.Linear(hidden, out)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, feats: Sequence[torch.Tensor], emb: torch.Tensor,
                field: torch.Tensor | None = None) -> torch.Tensor:
        """``feats``: maps ``(B, c_i, *spatial_i)``; ``emb (B, emb_dim)`` (SiLU applied);
        ``field (B, n_field)`` the input's moments -> ``(B, out)``."""
        pooled = [] if field is None else [field]
        for h in feats:
            dims = tuple(range(2, h.dim()))
            pooled += [h.mean(dim=dims), torch.log(self.delta + h.square().mean(dim=dims))]
        z = F.silu(self.inp(torch.cat(pooled, dim=1)) + self.time(emb))
        return self.out(F.silu(self.mid(z)))


class _WindowNet(nn.Module):
    """Shared input/output plumbing of the window networks."""

    ndim: int = 1

    def _init_io(self, window: int, channels: int, n_params: int, head_width: int,
                 theta_head: str = "linear", pooled_widths: Sequence[int] = (),
                 emb_dim: int = 0) -> None:
        """``pooled_widths``: channels of the intermediate maps the ``moments`` head reads (the
        final ``head_width`` map is always read)."""
        self.window = _check_window(window)
        self.channels = _check_int("channels", channels, 1)
        self.n_params = _check_int("n_params", n_params, 0)
        if theta_head not in THETA_HEADS:
            raise ValueError(f"option 'theta_head' must be one of {', '.join(THETA_HEADS)}, "
                             f"got {theta_head!r}")
        self.theta_head_kind = theta_head
        self.out_norm = nn.GroupNorm(_groups(head_width), head_width)
        self.out_conv = _conv(self.ndim, head_width, self.window * self.channels, 1)
        nn.init.zeros_(self.out_conv.weight)
        nn.init.zeros_(self.out_conv.bias)
        self.theta_head: nn.Module | None = None
        if self.n_params and theta_head == "linear":
            self.theta_head = nn.Linear(head_width, self.window * self.n_params)
            nn.init.zeros_(self.theta_head.weight)
            nn.init.zeros_(self.theta_head.bias)
        elif self.n_params:
            widths = [*pooled_widths, head_width]
            n_field = self.window * self.channels * (self.ndim + 2)
            self.theta_head = MomentHead(widths, emb_dim, self.window * self.n_params,
                                         hidden=max(64, 2 * head_width), n_field=n_field)

    def _inputs(self, x_state: torch.Tensor, x_theta: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Check shapes and stack the window into channels: ``(B, W·C + W·P, *spatial)``."""
        w, c, p = self.window, self.channels, self.n_params
        if x_state.dim() != 3 + self.ndim or tuple(x_state.shape[1:3]) != (w, c):
            raise ValueError(f"x_state must be (B, {w}, {c}, <{self.ndim} spatial dims>), "
                             f"got {tuple(x_state.shape)}")
        b, spatial = x_state.shape[0], x_state.shape[3:]
        if tuple(x_theta.shape) != (b, w, p):
            raise ValueError(f"x_theta must be ({b}, {w}, {p}), got {tuple(x_theta.shape)}")
        if tuple(t.shape) != (b,):
            raise ValueError(f"t must be ({b},), got {tuple(t.shape)}")
        theta = x_theta.reshape(b, w * p, *([1] * self.ndim)).expand(b, w * p, *spatial)
        return torch.cat([x_state.reshape(b, w * c, *spatial), theta], dim=1)

    def _outputs(self, h: torch.Tensor, feats: Sequence[torch.Tensor] = (),
                 emb: torch.Tensor | None = None,
                 x_state: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Final features ``(B, width, *spatial)`` -> ``(ε_state, ε_theta)``; ``feats``, the
        time embedding ``emb`` and the input window ``x_state (B, W, C, *spatial)`` feed the
        ``moments`` θ head."""
        b, spatial = h.shape[0], h.shape[2:]
        h = F.silu(self.out_norm(h))
        eps_state = self.out_conv(h).reshape(b, self.window, self.channels, *spatial)
        if self.theta_head is None:
            return eps_state, h.new_zeros(b, self.window, 0)
        if self.theta_head_kind == "moments":
            field = field_moments(x_state.flatten(1, 2), self.ndim)  # type: ignore[union-attr]
            eps_theta = self.theta_head([*feats, h], emb, field)
        else:
            eps_theta = self.theta_head(h.mean(dim=tuple(range(2, h.dim()))))
        return eps_state, eps_theta.reshape(b, self.window, self.n_params)


class RingResNet(_WindowNet):
    """1-D circular-convolution residual network for fields on a ring (Lorenz-96, FitzHugh–Nagumo).

    Works on any ring length ``L >= kernel_size // 2``; the receptive field is
    ``1 + depth · 2 · (kernel_size − 1) + (kernel_size − 1)`` points (a 4-block net with kernel 5
    sees 37 points, the whole of a 40-variable Lorenz-96 ring).
    """

    ndim = 1

    def __init__(
        self,
        window: int,
        channels: int,
        n_params: int = 0,
        *,
        width: int = 64,
        depth: int = 4,
        kernel_size: int = 5,
        time_features: int = 64,
        theta_head: str = "linear",
    ) -> None:
        """Args:
            window: states per window ``W`` (odd).
            channels: state channels ``C`` per site (1 for Lorenz-96, 2 for FitzHugh–Nagumo).
            n_params: parameters ``P`` (0 for none).
            width: feature channels of every block.
            depth: number of residual blocks.
            kernel_size: odd convolution size along the ring.
            time_features: sinusoidal time features (the embedding has ``4 ×`` as many).
            theta_head: ``"linear"`` (mean of the last features) or ``"moments"`` (moments of
                every block's features and of the input, :class:`MomentHead`).
        """
        super().__init__()
        width = _check_int("width", width, 1)
        depth = _check_int("depth", depth, 1)
        self.kernel_size = _check_kernel(kernel_size)
        # The embedding is built after the output layers, as before the θ head option existed, so
        # a seed gives the same initial weights as then.
        emb_dim = 4 * _check_int("time_features", time_features, 2)
        self._init_io(window, channels, n_params, width, theta_head, [width] * (depth - 1), emb_dim)
        self.embed = TimeEmbedding(time_features)
        self.inp = _conv(1, self.window * (self.channels + self.n_params), width, self.kernel_size)
        self.blocks = nn.ModuleList(
            ResBlock(1, width, width, self.embed.dim, self.kernel_size) for _ in range(depth)
        )

    def forward(
        self, x_state: torch.Tensor, x_theta: torch.Tensor, t: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Predict the noise of a diffused window.

        Args:
            x_state: ``(B, W, C, L)``.
            x_theta: ``(B, W, P)``.
            t: diffusion times ``(B,)``.

        Returns:
            ``ε_state (B, W, C, L)`` and ``ε_theta (B, W, P)``.
        """
        h = self.inp(self._inputs(x_state, x_theta, t))
        emb = F.silu(self.embed(t))
        feats = []
        for block in self.blocks:
            h = block(h, emb)
            feats.append(h)
        return self._outputs(h, feats[:-1], emb, x_state)


class UNet2d(_WindowNet):
    """2-D U-Net with circular padding for doubly periodic fields (Kolmogorov flow).

    ``len(mults)`` resolution levels with ``width · mults[i]`` channels and ``blocks`` residual
    blocks each, stride-2 (or average-pool) down-sampling between levels, a middle block, and a
    mirrored decoder whose first block at each level takes the encoder's skip features
    concatenated. Each spatial size must be divisible by ``2 ** (len(mults) − 1)``.
    """

    ndim = 2

    def __init__(
        self,
        window: int,
        channels: int,
        n_params: int = 0,
        *,
        width: int = 32,
        mults: Sequence[int] = (1, 2, 2),
        blocks: int = 1,
        kernel_size: int = 3,
        time_features: int = 64,
        forcing: int = 0,
        downsample: str = "conv",
        upsample: str = "nearest",
        theta_head: str = "linear",
    ) -> None:
        """Args:
            window: states per window ``W`` (odd).
            channels: state channels ``C`` (2 for velocity, 1 for vorticity).
            n_params: parameters ``P`` (0 for none).
            width: channels at the finest level.
            mults: channel multiplier per level, finest first.
            blocks: residual blocks per level in the encoder and in the decoder.
            kernel_size: odd convolution size.
            time_features: sinusoidal time features (the embedding has ``4 ×`` as many).
            forcing: number of constant auxiliary input fields (e.g. the forcing pattern), passed
                to :meth:`forward` as ``forcing``; 0 for none.
            downsample: ``"conv"`` (3×3 stride-2 circular conv) or ``"avgpool"`` (2×2 mean + 1×1 conv).
            upsample: ``"nearest"`` (nearest-neighbour ×2 + conv) or ``"transposed"`` (2×2 stride-2
                transposed conv).
            theta_head: ``"linear"`` (mean of the last features) or ``"moments"`` (moments of every
                encoder level, the middle block, the last features and the input,
                :class:`MomentHead`).
        """
        super().__init__()
        width = _check_int("width", width, 1)
        blocks = _check_int("blocks", blocks, 1)
        self.kernel_size = kernel_size = _check_kernel(kernel_size)
        self.forcing = _check_int("forcing", forcing, 0)
        if isinstance(mults, (str, bytes)) or not isinstance(mults, Sequence) or not mults:
            raise ValueError(f"option 'mults' must be a non-empty sequence of integers, got {mults!r}")
        self.mults = tuple(_check_int("mults", m, 1) for m in mults)
        if downsample not in ("conv", "avgpool"):
            raise ValueError(f"option 'downsample' must be 'conv' or 'avgpool', got {downsample!r}")
        if upsample not in ("nearest", "transposed"):
            raise ValueError(f"option 'upsample' must be 'nearest' or 'transposed', got {upsample!r}")
        self.factor = 2 ** (len(self.mults) - 1)
        chs = [width * m for m in self.mults]
        # the embedding after the output layers, as in RingResNet (same initial weights as before)
        emb = 4 * _check_int("time_features", time_features, 2)
        self._init_io(window, channels, n_params, chs[0], theta_head, [*chs, chs[-1]], emb)
        self.embed = TimeEmbedding(time_features)
        cin = self.window * (self.channels + self.n_params) + self.forcing
        self.inp = _conv(2, cin, chs[0], kernel_size)

        self.enc = nn.ModuleList()
        self.down = nn.ModuleList()
        self.dec = nn.ModuleList()
        self.up = nn.ModuleList()
        for i, ch in enumerate(chs):
            self.enc.append(nn.ModuleList(ResBlock(2, ch, ch, emb, kernel_size) for _ in range(blocks)))
            dec = [ResBlock(2, 2 * ch, ch, emb, kernel_size)]
            dec += [ResBlock(2, ch, ch, emb, kernel_size) for _ in range(blocks - 1)]
            self.dec.append(nn.ModuleList(dec))
            if i + 1 < len(chs):
                nxt = chs[i + 1]
                self.down.append(
                    _conv(2, ch, nxt, 3, stride=2) if downsample == "conv"
                    else nn.Sequential(nn.AvgPool2d(2), _conv(2, ch, nxt, 1))
                )
                self.up.append(
                    nn.Sequential(nn.Upsample(scale_factor=2, mode="nearest"), _conv(2, nxt, ch, kernel_size))
                    if upsample == "nearest" else nn.ConvTranspose2d(nxt, ch, 2, stride=2)
                )
        self.mid = ResBlock(2, chs[-1], chs[-1], emb, kernel_size)

    def forward(
        self,
        x_state: torch.Tensor,
        x_theta: torch.Tensor,
        t: torch.Tensor,
        forcing: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Predict the noise of a diffused window.

        Args:
            x_state: ``(B, W, C, Ny, Nx)``, ``Ny`` and ``Nx`` divisible by ``2 ** (len(mults) − 1)``.
            x_theta: ``(B, W, P)``.
            t: diffusion times ``(B,)``.
            forcing: auxiliary fields ``(F, Ny, Nx)`` shared by the batch or ``(B, F, Ny, Nx)``;
                required iff the net was built with ``forcing = F > 0``.

        Returns:
            ``ε_state (B, W, C, Ny, Nx)`` and ``ε_theta (B, W, P)``.
        """
        x = self._inputs(x_state, x_theta, t)
        b, spatial = x.shape[0], tuple(x.shape[2:])
        if any(n % self.factor for n in spatial):
            raise ValueError(f"spatial size {spatial} is not divisible by "
                             f"2 ** (len(mults) - 1) = {self.factor}")
        if self.forcing:
            expected = (self.forcing, *spatial)
            if forcing is None or forcing.dim() not in (3, 4) or tuple(forcing.shape[-3:]) != expected:
                got = None if forcing is None else tuple(forcing.shape)
                raise ValueError(f"forcing must be ({self.forcing}, {spatial[0]}, {spatial[1]}) "
                                 f"or (B, ...), got {got}")
            x = torch.cat([x, forcing.to(x.dtype).expand(b, *forcing.shape[-3:])], dim=1)
        elif forcing is not None:
            raise ValueError("forcing given but the network was built with forcing = 0")

        emb = F.silu(self.embed(t))
        h = self.inp(x)
        skips = []
        for i, level in enumerate(self.enc):
            for block in level:
                h = block(h, emb)
            skips.append(h)
            if i < len(self.down):
                h = self.down[i](h)
        h = self.mid(h, emb)
        mid = h
        for i in reversed(range(len(self.dec))):
            if i < len(self.up):
                h = self.up[i](h)
            h = torch.cat([h, skips[i]], dim=1)
            for block in self.dec[i]:
                h = block(h, emb)
        return self._outputs(h, [*skips, mid], emb, x_state)


def build_network(
    kind: str,
    *,
    window: int,
    channels: int,
    spatial: Sequence[int],
    n_params: int,
    **options: object,
) -> nn.Module:
    """Build a window network by kind, checking every option against the field it will see.

    Args:
        kind: ``"ring"`` (:class:`RingResNet`, ``spatial = (L,)``) or ``"unet"``
            (:class:`UNet2d`, ``spatial = (Ny, Nx)``).
        window: states per window ``W = 2k + 1``.
        channels: state channels ``C``.
        spatial: the field's spatial shape, used to validate the options.
        n_params: parameters ``P``.
        **options: the network's keyword options (:data:`RING_OPTIONS` / :data:`UNET_OPTIONS`).

    Returns:
        The network, with ``spec`` holding the arguments that rebuild it
        (``build_network(**net.spec)``), for checkpoints.

    Raises:
        ValueError: unknown kind or option, or an option value that does not fit, naming it.
    """
    if kind not in NETWORK_KINDS:
        raise ValueError(f"unknown network kind {kind!r}; known: {', '.join(NETWORK_KINDS)}")
    allowed = RING_OPTIONS if kind == "ring" else UNET_OPTIONS
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ValueError(f"unknown option {unknown[0]!r} for network kind {kind!r}; "
                         f"known: {', '.join(allowed)}")
    ndim = 1 if kind == "ring" else 2
    if isinstance(spatial, (str, bytes)) or not isinstance(spatial, Sequence) or len(spatial) != ndim:
        raise ValueError(f"option 'spatial' must have {ndim} entr{'y' if ndim == 1 else 'ies'} "
                         f"for network kind {kind!r}, got {spatial!r}")
    spatial = tuple(_check_int("spatial", n, 1) for n in spatial)
    net: _WindowNet
    if kind == "ring":
        net = RingResNet(window, channels, n_params, **options)  # type: ignore[arg-type]
        coarsest = spatial
    else:
        net = UNet2d(window, channels, n_params, **options)  # type: ignore[arg-type]
        if any(n % net.factor for n in spatial):
            raise ValueError(f"option 'spatial' = {spatial} must be divisible by 2 ** (len(mults) - 1) = "
                             f"{net.factor} (option 'mults' = {net.mults})")
        coarsest = tuple(n // net.factor for n in spatial)
    # Circular padding cannot wrap around more than once.
    if min(coarsest) < net.kernel_size // 2:
        raise ValueError(f"option 'kernel_size' = {net.kernel_size} is too large for spatial = {spatial} "
                         f"(coarsest grid {coarsest})")
    net.spec = dict(kind=kind, window=window, channels=channels, spatial=spatial, n_params=n_params,
                    **options)
    return net
