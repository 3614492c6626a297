"""SDA as a sliding-window filter inside ``scoreda campaign`` (``filter.method: sda``).

At cycle c the campaign samples the SDA posterior of the window of the last ``L =
filter.sda.window`` frames — one frame per cycle, the frames of cycles c − L + 1 … c — given the
observations of those frames, with the window model of a ``scoreda train`` run composed over the
L frames (:func:`kernels.score.sda.trajectory_eps`, :func:`kernels.score.sda.sample_posterior`).
The campaign's members become the posterior samples of the *last* frame and of θ; the forecast
of the previous cycle's members is kept only for the forecast metrics (``rmse_f``, ``spread_f``).

The start. The window always has L frames; while fewer than L cycles exist, its leading frames
(before the first cycle) carry no observation and are sampled from the prior alone. They are
real states of the truth's past (its spin-up), unobserved, so the posterior of the last frame
is the filtering posterior given every observation so far. One window shape means one sampler
configuration for the whole run, and no window shorter than the network's own.

Work split. Members are sampled in fixed global blocks of ``filter.sda.batch`` members
(``[0, B), [B, 2B), …``), each block in one batch: a convolution's floating-point result
depends on the batch it runs in (measured: the ring network of ``runs/train_l96`` gives other
last bits for a batch of 3 than for 40, in float32 and float64, with or without oneDNN), so
fixing the batches is what makes the samples independent of the rank count. Rank r owns the
whole blocks ``member_slice(n_blocks, R, r)`` (:func:`block_members`); member i of cycle c draws
all its noise from the stream ``(seed, c, i, "sda")``.

State. The analysis needs only the observations of the last L cycles: ``y_window (L, m)``, kept
in the checkpoint's ``truth.pt`` beside the truth, so a resume repeats the uninterrupted run bit
for bit (the members are never an input of the SDA analysis).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from kernels.dynamics import model_class
from kernels.score.sda import (
    likelihood_scale,
    make_window_observe,
    mean_projection,
    sample_posterior,
)
from kernels.streams import generator
from pipeline.config import CampaignConfig, ConfigError, load_yaml
from pipeline.runtime import member_slice

__all__ = ["WindowFilter", "block_members", "check_model", "observed_frames"]


def block_members(n: int, block: int, size: int, rank: int) -> range:
    """Members of ``rank`` of ``size``: whole global blocks of ``block`` consecutive members
    (the last block may be shorter), the blocks split as :func:`member_slice` splits members."""
    blocks = member_slice(-(-n // block), size, rank)
    return range(min(blocks.start * block, n), min(blocks.stop * block, n))


def observed_frames(cycle: int, window: int) -> list[int]:
    """Indices of the window's frames that have an observation at ``cycle``: frame j of the
    window is cycle ``cycle − window + 1 + j``; cycles before 0 have none."""
    return list(range(max(0, window - 1 - cycle), window))


def check_model(cfg: CampaignConfig, spec: dict[str, Any], state_shape: tuple[int, ...]) -> None:
    """Refuse a trained model that does not fit the campaign, naming the campaign's field.

    Checks the model name, the θ channels against ``parameters.estimate`` (same names, same
    order), the state shape against ``model.size``, the model options, the parameters the
    training store held fixed against ``model.params``, the frame spacing (the store's
    ``save_every · dt``) against the cycle interval ``observation.every · model.dt``, and the
    window length against the network's.
    """
    src = f"filter.sda.model ({cfg.filter.sda.model})" if cfg.filter.sda else "filter.sda.model"
    if spec["model"] != cfg.model.name:
        raise ConfigError(f"model.name: {cfg.model.name} but the SDA model of {src} was trained "
                          f"on {spec['model']}")
    est = list(cfg.parameters.estimate)
    if list(spec["params"]) != est:
        raise ConfigError(f"parameters.estimate: {est} but the SDA model carries θ = "
                          f"{list(spec['params'])} (the same names in the same order)")
    frame = (int(spec["channels"]), *(int(v) for v in spec["spatial"]))
    if frame != tuple(state_shape) and not (frame[0] == 1 and frame[1:] == tuple(state_shape)):
        raise ConfigError(f"model.size: the campaign's state has shape {tuple(state_shape)}, the "
                          f"SDA model's frames {frame} (grid {spec['grid']})")
    mc = spec["model_config"]
    if dict(mc.get("options", {})) != dict(cfg.model.options):
        raise ConfigError(f"model.options: {dict(cfg.model.options)} but the SDA model's store "
                          f"was simulated with {dict(mc.get('options', {}))}")
    for p in model_class(cfg.model.name).params:
        if p.name in spec["params"]:
            continue
        ours, theirs = cfg.model.params.get(p.name, p.truth), mc.get("params", {}).get(p.name, p.truth)
        if not math.isclose(ours, theirs, rel_tol=1e-12, abs_tol=0.0):
            raise ConfigError(f"model.params.{p.name}: {ours:g} but the SDA model's store holds it "
                              f"fixed at {theirs:g} (estimate it, or use the store's value)")
    cycle_dt = cfg.observation.every * float(cfg.model.dt)
    if not math.isclose(cycle_dt, float(spec["dt_frames"]), rel_tol=1e-9):
        raise ConfigError(f"observation.every: cycles are observation.every × model.dt = "
                          f"{cfg.observation.every} × {cfg.model.dt:g} = {cycle_dt:g} apart; the "
                          f"SDA model's frames are {spec['dt_frames']:g} apart (its store's "
                          "save_every × dt)")
    assert cfg.filter.sda is not None
    if cfg.filter.sda.window < int(spec["window"]):
        raise ConfigError(f"filter.sda.window: {cfg.filter.sda.window} is shorter than the SDA "
                          f"model's window of {spec['window']} frames")


def _static_theta(run: Path, given: bool | None) -> bool:
    """One θ per window unless the training store's θ walks (per-frame θ then)."""
    if given is not None:
        return given
    from pipeline.storage import OutputError
    from pipeline.store import store_config

    try:
        store = load_yaml(run / "config.yaml")["store"]
        return store_config(Path(store)).theta.mode != "walk"
    except (ConfigError, OutputError, KeyError, TypeError) as exc:
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ConfigError(f"filter.sda.static_theta: null needs the training store of {run} to "
                          f"read its θ mode ({msg}); set true or false") from None


class WindowFilter:
    """The trained window model of a campaign's ``filter.sda``, checked against the campaign,
    and the sliding-window posterior sampler (module docstring)."""

    def __init__(self, cfg: CampaignConfig, op: Any, state_shape: tuple[int, ...]) -> None:
        """Args:
            cfg: a campaign config with ``filter.method: sda``.
            op: the campaign's observation operator ``(N, *state_shape) -> (N, m)``.
            state_shape: the campaign model's state shape.

        Raises:
            ConfigError: one line naming the field, for a missing or mismatched model.
        """
        from pipeline.storage import OutputError
        from pipeline.train import composed_model_eps, fingerprint, load_model

        s = cfg.filter.sda
        if s is None:
            raise ConfigError("filter.sda: required for method sda")
        run = Path(s.model)
        if not (run / "model.pt").is_file():
            raise ConfigError(f"filter.sda.model: {run}: no model.pt (not a finished "
                              "`scoreda train` run)")
        try:
            den, spec = load_model(run)
        except OutputError as exc:
            raise ConfigError(f"filter.sda.model: {exc}") from None
        check_model(cfg, spec, state_shape)
        self.static_theta = _static_theta(run, s.static_theta)
        self.fingerprint = fingerprint(den)  # a resume refuses a model changed in place
        self.dtype = getattr(torch, s.dtype)
        self.den = den.to(dtype=self.dtype)
        self.spec = spec
        self.op, self.state_shape = op, tuple(state_shape)
        self.seed, self.window, self.batch = cfg.seed, s.window, s.batch
        self.n_params = len(spec["params"])
        self.frame_shape = (int(spec["channels"]), *(int(v) for v in spec["spatial"]))
        self.settings = s.settings()
        self.eps = composed_model_eps(self.den, spec, self.static_theta, s.theta_composition,
                                      "filter.sda", s.theta_evidence_scale)
        # (σ_t/μ_t)² is a variance per normalised state entry and y is physical: γ is scaled
        # by what such a white perturbation gives the observations (as in `scoreda smooth`)
        self.state_var = self.den.normalizer.state_std.double().square()
        self.project = mean_projection(self.den.normalizer, model_class(cfg.model.name).mean_free)

    def sample(self, members: range, y_window: torch.Tensor, cycle: int,
               sigma: float | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Posterior samples of the last frame for ``members`` at ``cycle``.

        Args:
            members: whole blocks of global member indices (:func:`block_members`).
            y_window: observations ``(L, m)`` of the window's frames, the newest last; rows
                before cycle 0 are ignored.
            cycle: the cycle c (keys the noise streams, places cycle 0 in the window).
            sigma: observation noise std, a float or ``(m,)``.

        Returns:
            states ``(n, *state_shape)`` in physical units and θ ``(n, P)`` in the model's
            unconstrained transform, float64, ``n = len(members)``.
        """
        if members.start % self.batch and members.start != members.stop:
            raise ValueError(f"members {members} do not start on a block of {self.batch}")
        lw, p = self.window, self.n_params
        if not len(members):
            return (torch.empty(0, *self.state_shape, dtype=torch.float64),
                    torch.empty(0, p, dtype=torch.float64))
        times = observed_frames(cycle, lw)
        y = y_window[times].reshape(-1).to(self.dtype)
        sig = sigma if isinstance(sigma, float) else sigma.to(self.dtype).repeat(len(times))
        observe = make_window_observe(self.den.normalizer, self.op, times, self.state_shape)
        scale = likelihood_scale(self.op, self.state_var, sig, len(times), self.dtype)
        states, thetas = [], []
        for a in range(members.start, members.stop, self.batch):
            gens = [generator(self.seed, cycle, i, "sda")
                    for i in range(a, min(a + self.batch, members.stop))]
            xs, xt = sample_posterior(
                self.eps, self.den.schedule, (lw, *self.frame_shape), p, gens, self.settings,
                observe=observe, y=y, sigma_y=sig, gamma_scale=scale,
                dtype=self.dtype, theta_frames=1 if self.static_theta else None,
                project_state=self.project)
            with torch.no_grad():
                x, u = self.den.normalizer.decode(xs[:, -1], xt[:, -1])  # last frame
            states.append(x.to(torch.float64).reshape(len(gens), *self.state_shape))
            thetas.append(u.to(torch.float64))
        return torch.cat(states), torch.cat(thetas)
