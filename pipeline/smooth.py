"""``scoreda smooth``: joint posterior samples of a trajectory window and its parameters θ (SDA).

A window model trained by ``scoreda train`` is composed over a window of ``length`` frames
(:func:`kernels.score.sda.trajectory_eps`) and sampled with the predictor–corrector scheme of
:func:`kernels.score.sda.sample_posterior`, conditioned on observations of a held-out trajectory:
frame ``start .. start + length`` of trajectory ``trajectory`` of the store's *test* split is the
truth, and every ``observation.every``-th frame is observed through ``observation.kind`` (+
nonlinearity) with N(0, σ²) noise from the stream ``(seed, "obs", frame)``.

The θ channels of the samples are the self-organized parameter estimate: each sample's θ
averaged over the window's frames is one posterior draw of θ (static θ in the store) — mean,
90 % interval and coverage of the truth are reported.

With ``calibration:`` (a ``scoreda calibrate`` output of the same set-up, pipeline/calibrate.py)
each θ also gets the split-conformal interval ``mean ± bound·sd`` calibrated on twin windows.

Under ``mpiexec -n R`` rank r draws samples ``member_slice(samples, R, r)``, each from its own
stream ``(seed, "sample", i)``: the samples do not depend on R. Rank 0 gathers and writes.

Each rank draws its samples in batches of ``batch`` and commits every finished sample to
``.OUT.partial/`` (one file per sample, written atomically, under a key of everything that fixes
sample i: the config without ``samples``/``batch``/``threads``/``ensf_members``/``calibration``
and the model file's hash). SIGTERM or SIGUSR1 (SLURM's pre-timeout signal) stops every rank
after its current batch with exit 3; the same command then draws only what is missing, so an
interrupted run ends with the samples of an uninterrupted one (bitwise with the same ``batch``;
another batch size, like another rank count, changes the batched network calls' rounding only).
A partial of another key is refused (``--overwrite`` discards it); it is removed once the output
is in place.

Output directory (written under a temporary name and renamed: never half-written):
``config.yaml``, ``smooth.zarr`` (state samples ``(sample, time, *space)`` per variable,
``theta(sample, time, param)`` natural units, ``truth_*``, ``theta_truth``, ``y(obs_time, obs)``),
``metrics.json``, ``summary.md``, ``states.png``, ``theta.png``.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kernels import metrics
from kernels.observe import add_noise, make_operator
from kernels.score.sda import (
    likelihood_scale,
    make_window_observe,
    mean_projection,
    sample_posterior,
    sample_theta_given_states,
)
from kernels.streams import generator
from pipeline.calibrate import check_calibration, load_calibration
from pipeline.config import (
    ConfigError,
    ModelConfig,
    SmoothConfig,
    TrainConfig,
    dump,
    load_yaml,
    resolve_config_path,
    validate,
    with_later_defaults,
)
from pipeline.runtime import StopSignals, compute_device, member_slice, progress, tune_allocator, world
from pipeline.storage import OutputError, write_bytes_atomic, write_text_atomic
from pipeline.store import store_config

CONFIG, STORE, METRICS, SUMMARY = "config.yaml", "smooth.zarr", "metrics.json", "summary.md"
KEY = "key.json"  # in the partial directory: what its samples were drawn with
EXIT_STOPPED = 3  # stopped by a signal after a commit: the same command resumes


class SmoothStopped(Exception):
    """Every rank stopped after committing its current batch (a stop signal)."""


class Problem:
    """The truth window, its observations and the trained model of a smoothing config."""

    def __init__(self, cfg: SmoothConfig) -> None:
        from pipeline.train import CONFIG as TRAIN_CONFIG
        from pipeline.train import WindowSource, composed_model_eps, load_model

        self.cfg = cfg
        run = Path(cfg.model_run)
        if not (run / "model.pt").exists():
            raise OutputError(f"{run}: no model.pt (not a finished `scoreda train` run)")
        self.device = compute_device(cfg.device)
        self.den, self.spec = load_model(run, self.device)
        self.den = self.den.to(dtype=getattr(torch, cfg.dtype))
        tdata = load_yaml(run / TRAIN_CONFIG)
        if cfg.store is not None:
            tdata["store"] = cfg.store
        tdata["window"] = 1  # one frame per row: the window is assembled here
        tcfg = validate(tdata, TrainConfig, str(run / TRAIN_CONFIG))
        assert isinstance(tcfg, TrainConfig)
        src = WindowSource(tcfg, "test")
        self.tcfg = tcfg
        if src.param_names != self.spec["params"] or src.names != self.spec["variables"]:
            raise ConfigError(f"store: {tcfg.store} does not hold the variables/parameters the "
                              f"model was trained on ({self.spec['variables']}, {self.spec['params']})")
        held = (src.model_name, list(src.spatial))
        trained = (self.spec["model"], list(self.spec["spatial"]))
        if held != trained:
            raise ConfigError(f"store: {tcfg.store} holds {held[0]} on a {held[1]} grid; the "
                              f"model was trained on {trained[0]} on {trained[1]}")
        dt_frames = self.spec.get("dt_frames")
        if dt_frames is not None and not math.isclose(src.dt_frames, dt_frames, rel_tol=1e-9):
            raise ConfigError(f"store: {tcfg.store} saves a frame every {src.dt_frames:g} time "
                              f"units; the model was trained on frames {dt_frames:g} "
                              "apart")
        w = self.spec["window"]
        if cfg.length < w:
            raise ConfigError(f"length: {cfg.length} is shorter than the model window {w}")
        trajs = np.unique(src.index[:, 0])
        if cfg.trajectory >= len(trajs):
            raise ConfigError(f"trajectory: the store has {len(trajs)} test trajectories")
        if cfg.start + cfg.length > src.frames:
            raise ConfigError(f"start: frames {cfg.start}..{cfg.start + cfg.length} exceed the "
                              f"store's {src.frames}")
        self.store_trajectory = int(trajs[cfg.trajectory])
        rows = np.nonzero((src.index[:, 0] == self.store_trajectory)
                          & (src.index[:, 1] >= cfg.start)
                          & (src.index[:, 1] < cfg.start + cfg.length))[0]
        state, theta_u = src.read(rows)  # (L, 1, C, *sp), (L, 1, P)
        self.truth = state[:, 0].to(torch.float64)            # (L, C, *sp) physical
        mcfg = ModelConfig.model_validate({**self.spec["model_config"], "size": self.spec["grid"]})
        self.model = mcfg.build()
        names = list(self.model.param_names)
        self.pidx = [names.index(p) for p in self.spec["params"]]
        self.theta_truth = self._natural(theta_u[:, 0].to(torch.float64))  # (L, P)
        self.frame_shape = tuple(self.truth.shape[1:])        # (C, *sp)
        self.times = list(range(0, cfg.length, cfg.observation.every))
        obs = cfg.observation
        try:
            self.op = make_operator(obs.kind, self.model.state_shape, nonlinearity=obs.nonlinearity,
                                    **obs.options)
        except ValueError as exc:
            raise ConfigError(f"observation.options: {exc}") from None
        self.sigma: float | torch.Tensor = obs.sigma
        self.has_truth = cfg.observations is None
        if self.has_truth:
            with torch.no_grad():
                hx = self.op(self.truth[self.times].reshape(len(self.times), *self.model.state_shape))
            self.y = torch.stack([add_noise(hx[i], obs.sigma, generator(cfg.seed, "obs", cfg.start + t))
                                  for i, t in enumerate(self.times)])  # (T_obs, m)
        else:
            from pipeline.campaign import read_observations

            f = read_observations(cfg.observations, "obs_time", len(self.times), self.op.m,
                                  obs.kind, obs.sigma)
            self.y = torch.from_numpy(f.y)
            if f.sigma is not None:
                self.sigma = f.sigma if isinstance(f.sigma, float) else torch.from_numpy(f.sigma)
        # a θ that does not move along a trajectory is sampled as one vector per sample
        # (kernels.score.sda: per-frame copies of a static θ drift apart and diverge)
        self.gcfg = store_config(Path(tcfg.store))
        self.static_theta = self.gcfg.theta.mode != "walk"
        if cfg.condition == "truth_states" and (not self.static_theta or not self.spec["params"]):
            raise ConfigError("condition: truth_states samples a static θ; the model has none")
        self.eps = composed_model_eps(self.den, self.spec, self.static_theta,
                                      cfg.sda.theta_composition, "sda", cfg.sda.theta_evidence_scale)

    def _sigma_flat(self, dtype: torch.dtype) -> float | torch.Tensor:
        """σ for the flattened ``(T_obs · m)`` observations of the window."""
        if isinstance(self.sigma, float):
            return self.sigma
        return self.sigma.to(dtype).repeat(len(self.times))

    def _natural(self, u: torch.Tensor) -> torch.Tensor:
        """Unconstrained θ of the model's estimated parameters ``(..., P)`` → natural units."""
        return self.model.from_unconstrained(u, self.pidx)

    def sample(self, indices: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Posterior samples ``indices``: states ``(S, L, C, *sp)`` and θ ``(S, L, P)``, physical."""
        cfg, den = self.cfg, self.den
        dtype = getattr(torch, cfg.dtype)
        if not len(indices):
            p = len(self.spec["params"])
            return (torch.empty(0, cfg.length, *self.frame_shape, dtype=torch.float64),
                    torch.empty(0, cfg.length, p, dtype=torch.float64))
        gens = [generator(cfg.seed, "sample", i) for i in indices]
        s = cfg.sda
        settings = s.settings()
        observe = make_window_observe(den.normalizer, self.op, self.times, self.model.state_shape)
        # (σ_t/μ_t)² is a variance per normalised state entry; the observations are physical:
        # scale γ by what such a white perturbation gives each observation (a point: the
        # channel's physical variance; a block mean or a velocity: far less) so γ keeps its meaning
        scale = likelihood_scale(self.op, den.normalizer.state_std.double().square(),
                                 self._sigma_flat(torch.float64), len(self.times), dtype, self.device)
        if cfg.condition == "truth_states":
            x0, _ = den.normalizer.encode(self.truth.to(dtype=dtype, device=self.device),
                                          torch.zeros(len(self.spec["params"]), dtype=dtype,
                                                      device=self.device))
            xt = sample_theta_given_states(self.eps, den.schedule, x0, len(self.spec["params"]),
                                           gens, s.steps, theta_frames=1, theta_clip=s.theta_clip)
            xs = x0.unsqueeze(0).expand(len(gens), *x0.shape)
        else:
            xs, xt = sample_posterior(
                self.eps, den.schedule, (cfg.length, *self.frame_shape), len(self.spec["params"]),
                gens, settings, observe=observe, y=self.y.reshape(-1).to(dtype),
                sigma_y=self._sigma_flat(dtype), gamma_scale=scale, dtype=dtype, device=self.device,
                theta_frames=1 if self.static_theta else None,
                project_state=mean_projection(den.normalizer, self.model.mean_free))
        xt = xt.expand(-1, cfg.length, -1)  # static θ: the same vector at every frame
        with torch.no_grad():
            state, theta_u = den.normalizer.decode(xs, xt)
        return state.double().cpu(), self._natural(theta_u.double().cpu())


def ensf_baseline(p: Problem, members: int) -> dict[str, Any]:
    """The same truth and observations filtered by EnSF with θ particles, for comparison.

    Prior: ``members`` training trajectories at frame ``start`` with their own θ (draws from the
    store's prior), i.e. a climatological ensemble of states and parameters. Between frames each
    member runs the true model (``save_every`` steps of ``dt``) with its θ; at observed frames
    the recommended EnSF analysis (gaussian prior, denoised likelihood, ensemble regression for
    θ and unobserved components, kernels/ensf.py) updates ``[state, u(θ)]``; θ is roughened by
    0.01 per frame (unconstrained) so its spread does not collapse. Returns the analysis RMSE of
    the state per frame and its mean, and the θ particles' summary at the last frame.
    """
    from kernels.assimilation import Analysis, FilterSpec, roughen
    from kernels.ensf import EnSFSettings
    from pipeline.train import WindowSource

    cfg, model = p.cfg, p.model
    src = WindowSource(p.tcfg, "train")
    rows = np.nonzero(src.index[:, 1] == cfg.start)[0][:members]
    if len(rows) < 2:
        raise ConfigError(f"ensf_members: the store has {len(rows)} training trajectories")
    state, _ = src.read(rows)
    n = len(rows)
    x = state[:, 0].to(torch.float64).reshape(n, *model.state_shape)
    theta = src.theta_natural[torch.from_numpy(src.index[rows, 0]), cfg.start].clone()  # (N, P_all)
    spec = FilterSpec(method="ensf", ensf=EnSFSettings(estimator="gaussian", likelihood="denoised",
                                                      score_clip=50.0, init="prior", steps=100),
                    ridge=1.0)  # the campaign default: a small ridge collapses the θ spread
    analysis = Analysis(p.op, cfg.observation.sigma, len(p.pidx), spec)
    d = math.prod(model.state_shape)
    truth = p.truth.reshape(cfg.length, -1)
    rmse = []
    for k in range(cfg.length):
        if k:
            x = model.advance(x, theta, p.gcfg.save_every, p.gcfg.model.dt)
            if not torch.isfinite(x).all():
                raise OutputError(f"ensf baseline: the forecast diverged before frame {cfg.start + k}")
        if k in p.times:
            u = model.to_unconstrained(theta)[:, p.pidx]
            gens = [generator(cfg.seed, "ensf", cfg.start + k, i) for i in range(n)]
            za = analysis(torch.cat([x.reshape(n, -1), u], 1), p.y[p.times.index(k)], gens)
            x = za[:, :d].reshape(n, *model.state_shape)
            u = roughen(za[:, d:], 0.01, [generator(cfg.seed, "ensf-roughen", cfg.start + k, i)
                                          for i in range(n)])
            theta[:, p.pidx] = model.from_unconstrained(u, p.pidx)
        if not torch.isfinite(x).all():
            raise OutputError(f"ensf baseline diverged at frame {cfg.start + k}")
        rmse.append(float(metrics.rmse(x.reshape(n, -1).mean(0), truth[k])))
    out: dict[str, Any] = {"members": n, "rmse_mean": float(np.mean(rmse)), "rmse_per_frame": rmse}
    if p.pidx:
        summ = metrics.param_summary(theta[:, p.pidx], p.theta_truth[-1], 0.9)
        out["theta"] = {name: {k: float(v[j]) if v.dtype != torch.bool else bool(v[j])
                               for k, v in summ.items()} | {"truth": float(p.theta_truth[-1, j])}
                        for j, name in enumerate(p.spec["params"])}
    return out


def evaluate(p: Problem, state: torch.Tensor, theta: torch.Tensor,
             calibration: dict[str, Any] | None = None) -> dict[str, Any]:
    """Metrics of the samples ``state (S, L, C, *sp)``, ``theta (S, L, P)`` against the truth;
    with a ``scoreda calibrate`` result, also its calibrated θ intervals (``cal_lo``/``cal_hi``)."""
    cfg = p.cfg
    s = state.shape[0]
    flat = state.reshape(s, cfg.length, -1)
    truth = p.truth.reshape(cfg.length, -1)
    mean = flat.mean(0)
    nan = float("nan")
    t = p.has_truth
    out: dict[str, Any] = {
        "samples": s,
        "truth": t,
        "rmse_mean": float(metrics.rmse(mean.reshape(-1), truth.reshape(-1))) if t else nan,
        "rmse_per_frame": metrics.rmse(mean, truth).tolist() if t else [],
        "spread": float(metrics.spread(flat.reshape(s, -1))) if s > 1 else nan,
        "crps": float(metrics.crps_ensemble(flat.reshape(s, -1), truth.reshape(-1)).mean()) if t else nan,
        "truth_std": float(truth.std()) if t else nan,
    }
    # observation residual of each sample, in units of σ_y (SDA's consistency check: ≈ 1)
    with torch.no_grad():
        obs_states = state[:, p.times].reshape(-1, *p.model.state_shape)
        hx = p.op(obs_states).reshape(s, len(p.times), -1)
    resid = (p.y.unsqueeze(0) - hx) / torch.as_tensor(p.sigma, dtype=hx.dtype)
    out["residual_std_over_sigma"] = float(resid.reshape(s, -1).std(1).mean())
    out["observations"] = int(p.y.numel())
    if theta.shape[-1]:
        draws = theta.mean(1)  # one θ draw per sample: the window average (θ is static here)
        truth_th = p.theta_truth.mean(0)
        summ = metrics.param_summary(draws, truth_th, 0.9)
        out["interval_level"] = metrics.interval_level(s, 0.9)
        if not t:  # no truth: only the posterior itself
            summ = {k: v for k, v in summ.items() if k in ("mean", "std", "lo", "hi")}
        out["theta"] = {name: {k: float(v[j]) if v.dtype != torch.bool else bool(v[j])
                               for k, v in summ.items()} | ({"truth": float(truth_th[j])} if t else {})
                        for j, name in enumerate(p.spec["params"])}
        clip = cfg.sda.theta_clip
        if clip is not None:
            # samples whose θ ended on the sampler's bound were set by it, not by the data (a
            # stiff θ score with few steps runs there: 44 windows at 64 steps, docs/benchmarks.md)
            norm = p.den.normalizer
            u = p.model.to_unconstrained(draws, p.pidx)
            z = (u - norm.theta_mean.double().cpu()) / norm.theta_std.double().cpu()
            at = (z.abs() >= 0.98 * clip).sum(0)  # within 2 %: the last step's noise (~1e-3)
            out["theta_clip"] = clip
            for j, name in enumerate(p.spec["params"]):
                out["theta"][name]["at_clip"] = int(at[j])
        if calibration is not None:
            out["calibration"] = {k: calibration[k] for k in ("level", "pool", "windows", "bound")}
            out["calibration"]["path"] = p.cfg.calibration
            for name, th in out["theta"].items():
                half = calibration["bound"][name] * th["std"]
                th["cal_lo"], th["cal_hi"] = th["mean"] - half, th["mean"] + half
                if t:
                    th["cal_covered"] = bool(th["cal_lo"] <= th["truth"] <= th["cal_hi"])
    return out


def write_outputs(p: Problem, out: Path, state: torch.Tensor, theta: torch.Tensor,
                  met: dict[str, Any]) -> None:
    """The output directory (module docstring), written into ``out`` (already empty)."""
    import xarray as xr

    cfg = p.cfg
    names = p.spec["variables"]
    sp = p.frame_shape[1:]
    space = [f"x{i}" if len(sp) > 1 else "space" for i in range(len(sp))]
    if len(sp) == 2:
        space = ["y", "x"]
    frames = np.arange(cfg.start, cfg.start + cfg.length)
    data: dict[str, Any] = {}
    for c, name in enumerate(names):
        data[name] = (("sample", "time", *space), state[:, :, c].numpy().astype(np.float32))
        if p.has_truth:
            data[f"truth_{name}"] = (("time", *space), p.truth[:, c].numpy().astype(np.float32))
    data["theta"] = (("sample", "time", "param"), theta.numpy())
    if p.has_truth:
        data["theta_truth"] = (("time", "param"), p.theta_truth.numpy())
    sig = p.sigma if isinstance(p.sigma, float) else p.sigma.numpy()
    data["y"] = (("obs_time", "obs"), p.y.numpy(),
                 {"sigma": sig} if isinstance(sig, float) else {})
    if not isinstance(sig, float):
        data["sigma"] = (("obs",), sig)
    ds = xr.Dataset(data, coords={"time": frames * p.spec["dt_frames"], "frame": ("time", frames),
                                  "param": np.array(p.spec["params"], dtype=object),
                                  "obs_time": np.asarray(p.times) + cfg.start})
    ds.attrs.update({"config": dump(cfg), "model_run": cfg.model_run,
                     "store_trajectory": p.store_trajectory, "observation_sigma": cfg.observation.sigma})
    ds.to_zarr(out / STORE, mode="w", consolidated=False)
    write_text_atomic(out / METRICS, json.dumps(met, indent=1))
    write_text_atomic(out / SUMMARY, "\n".join(summary_lines(met)) + "\n")
    _plots(p, out, state, theta)


def _interval_note(met: dict[str, Any]) -> list[str]:
    lv = met.get("interval_level", 0.9)
    if "theta" not in met or lv >= 0.9:
        return []
    return [f"θ intervals below are the range of {met['samples']} samples: {lv:.0%} coverage when "
            f"calibrated (a 90% interval needs at least 19 samples)"]


def _clip_lines(met: dict[str, Any]) -> list[str]:
    """A warning per parameter with samples on the ``theta_clip`` bound."""
    return [f"  {t['at_clip']} of {met['samples']} samples of θ {name} ended on sda.theta_clip "
            f"({met['theta_clip']:g} training sd from its mean): the bound set them, not the data; raise "
            "sda.steps (a stiff θ score outruns few steps) or shorten the window"
            for name, t in met.get("theta", {}).items() if t.get("at_clip")]


def summary_lines(met: dict[str, Any]) -> list[str]:
    if met.get("condition") == "truth_states":
        lines = [f"θ given the true states (no observations): {met['samples']} samples, "
                 f"{met['seconds_per_sample']:.2f} s per sample"]
        lines += _interval_note(met)
        for name, t in met.get("theta", {}).items():
            lines.append(f"θ {name}: mean {t['mean']:.4g} ± {t['std']:.2g}, 90% [{t['lo']:.4g}, "
                         f"{t['hi']:.4g}], truth {t['truth']:.4g} "
                         f"({'covered' if t['covered'] else 'NOT covered'})")
        return lines + _clip_lines(met)
    lines = [f"SDA smoothing: {met['samples']} samples; posterior-mean RMSE {met['rmse_mean']:.4f} "
             f"(truth std {met['truth_std']:.3f}), spread {met['spread']:.4f}, CRPS {met['crps']:.4f}",
             f"observation residual std / σ_y: {met['residual_std_over_sigma']:.3f} "
             f"({met['observations']} observations)",
             f"{met['seconds']:.1f} s wall on {met['ranks']} rank(s), "
             f"{met['seconds_per_sample']:.2f} s per sample"
             + (f" ({met['samples_drawn']} drawn now, {met['samples_resumed']} committed by an "
                "earlier run)" if met.get("samples_resumed") else "")]
    lines += _interval_note(met)
    for name, t in met.get("theta", {}).items():
        truth = (f", truth {t['truth']:.4g} ({'covered' if t['covered'] else 'NOT covered'})"
                 if "truth" in t else " (observations from a file: no truth)")
        lines.append(f"θ {name}: posterior mean {t['mean']:.4g} ± {t['std']:.2g}, 90% "
                     f"[{t['lo']:.4g}, {t['hi']:.4g}]{truth}")
        if "cal_lo" in t:
            c = met["calibration"]
            cov = (f" ({'covered' if t['cal_covered'] else 'NOT covered'})"
                   if "cal_covered" in t else "")
            lines.append(f"  calibrated {c['level']:.0%} [{t['cal_lo']:.4g}, {t['cal_hi']:.4g}] "
                         f"(mean ± {c['bound'][name]:.2f} sd, from {c['windows']} windows){cov}")
    lines += _clip_lines(met)
    if "ensf" in met:
        e = met["ensf"]
        lines.append(f"EnSF on the same data ({e['members']} members, filter): analysis RMSE "
                     f"{e['rmse_mean']:.4f} (SDA smoother: {met['rmse_mean']:.4f})")
        for name, t in e.get("theta", {}).items():
            lines.append(f"  EnSF θ {name} at the last frame: {t['mean']:.4g} ± {t['std']:.2g}, "
                         f"90% [{t['lo']:.4g}, {t['hi']:.4g}] "
                         f"({'covered' if t['covered'] else 'NOT covered'})")
    return lines


def _plots(p: Problem, out: Path, state: torch.Tensor, theta: torch.Tensor) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    mean, spread = state.mean(0), state.std(0) if state.shape[0] > 1 else torch.zeros_like(state[0])
    c = p.truth.shape[1]
    # without a truth (observations from a file) the truth panels are left out
    first = 0 if p.has_truth else 1
    if p.truth.dim() == 3:  # ring (L, C, n): Hovmöller per channel
        fig, axes = plt.subplots(c, 3 - first, figsize=(11, 2.8 * c), squeeze=False, dpi=100)
        for ch in range(c):
            vmax = float(mean[:, ch].abs().max() if first else p.truth[:, ch].abs().max())
            panels = (("truth", p.truth[:, ch]), ("posterior mean", mean[:, ch]),
                      ("posterior std", spread[:, ch]))
            for k, (title, img) in enumerate(panels):
                if k < first:
                    continue
                ax = axes[ch, k - first]
                im = ax.imshow(img.numpy(), aspect="auto", origin="lower",
                               cmap="RdBu_r" if k < 2 else "viridis",
                               vmin=-vmax if k < 2 else 0, vmax=vmax if k < 2 else None)
                ax.set_title(f"{p.spec['variables'][ch]}: {title}", fontsize=9)
                ax.set_xlabel("site")
                ax.set_ylabel("frame")
                fig.colorbar(im, ax=ax)
    else:  # 2-D fields (L, C, H, W): first, middle and last frame
        frames = [0, p.cfg.length // 2, p.cfg.length - 1]
        fig, axes = plt.subplots(3 - first, len(frames), figsize=(3.4 * len(frames), 9.5),
                                 squeeze=False, dpi=100)
        vmax = float(mean[:, 0].abs().max() if first else p.truth[:, 0].abs().max())
        for j, f in enumerate(frames):
            panels = (("truth", p.truth[f, 0]), ("posterior mean", mean[f, 0]),
                      ("posterior std", spread[f, 0]))
            for k, (title, img) in enumerate(panels):
                if k < first:
                    continue
                ax = axes[k - first, j]
                ax.imshow(img.numpy(), origin="lower", cmap="RdBu_r" if k < 2 else "viridis",
                          vmin=-vmax if k < 2 else 0, vmax=vmax if k < 2 else None)
                ax.set_title(f"frame {p.cfg.start + f}: {title}", fontsize=9)
                ax.set_xticks([])
                ax.set_yticks([])
    fig.tight_layout()
    fig.savefig(out / "states.png")
    plt.close(fig)
    n_p = theta.shape[-1]
    if n_p:
        fig, axes = plt.subplots(1, n_p, figsize=(3.6 * n_p, 3), squeeze=False, dpi=100)
        draws = theta.mean(1)
        for j, name in enumerate(p.spec["params"]):
            ax = axes[0, j]
            d = draws[:, j].numpy()
            # an explicit, padded range: one sample or float32-identical draws have none to bin
            pad = 0.05 * float(np.ptp(d)) + 1e-3 * float(np.abs(d).max()) + 1e-12
            ax.hist(d, bins=max(5, min(30, draws.shape[0] // 2)), color="C0", alpha=0.8,
                    range=(float(d.min()) - pad, float(d.max()) + pad))
            if p.has_truth:
                ax.axvline(float(p.theta_truth[:, j].mean()), color="k", lw=2, label="truth")
                ax.legend(fontsize=8)
            ax.set_title(f"posterior of {name}", fontsize=9)
        fig.tight_layout()
        fig.savefig(out / "theta.png")
        plt.close(fig)


def partial_dir(out: Path) -> Path:
    """Where a run writing ``out`` commits its finished samples."""
    return out.with_name(f".{out.name}.partial")


def sampling_key(cfg: SmoothConfig) -> dict[str, Any]:
    """What fixes sample i: the config less how many samples are drawn, how they are batched
    and what is done with them afterwards, plus the model file's SHA-256."""
    import hashlib

    key = cfg.model_dump(mode="json")
    for k in ("samples", "batch", "threads", "ensf_members", "calibration"):
        key.pop(k)
    h = hashlib.sha256()
    with open(Path(cfg.model_run) / "model.pt", "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    key["model_sha256"] = h.hexdigest()
    return key


def _prepare_partial(part: Path, key: dict[str, Any], overwrite: bool) -> int:
    """Rank 0: keep a partial directory drawn with ``key`` (or make one); another key is refused
    unless ``overwrite``, which discards it. Returns the samples already committed."""
    if part.exists():
        try:
            old = json.loads((part / KEY).read_text())
        except (OSError, ValueError):
            old = None
        if isinstance(old, dict):
            # keys added since the partial was written take their defaults, their old behaviour
            base = SmoothConfig(model_run=str(old.get("model_run", "."))).model_dump(mode="json")
            old = with_later_defaults(old, {k: v for k, v in base.items() if k in key})
        if old != key:
            if not overwrite:
                raise OutputError(f"{part}: committed samples of another set-up (config or model "
                                  "changed); --overwrite discards them")
            shutil.rmtree(part)
    part.mkdir(parents=True, exist_ok=True)
    if not (part / KEY).exists():
        write_text_atomic(part / KEY, json.dumps(key, indent=1))
    return len(list(part.glob("sample-*.npz")))


def _sample_file(part: Path, i: int) -> Path:
    return part / f"sample-{i:07d}.npz"


def _commit(part: Path, i: int, state: torch.Tensor, theta: torch.Tensor) -> None:
    import io

    buf = io.BytesIO()
    np.savez(buf, state=state.numpy(), theta=theta.numpy())
    write_bytes_atomic(_sample_file(part, i), buf.getvalue())


def _load(part: Path, i: int) -> tuple[np.ndarray, np.ndarray] | None:
    """Committed sample ``i``, or None when its file is missing or damaged (it is drawn again:
    its numbers depend on its index alone)."""
    import zipfile

    path = _sample_file(part, i)
    if not path.exists():
        return None
    try:
        with np.load(path) as f:
            return f["state"], f["theta"]
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
        print(f"smooth: {path} is damaged; drawing sample {i} again", file=sys.stderr, flush=True)
        return None


def _draw(p: Problem, mine: range, part: Path) -> tuple[list[Any], int, str]:
    """This rank's samples ``mine``: the committed ones read back, the rest drawn in batches and
    committed. Returns ``(state, theta)`` pairs in index order, how many were drawn, and why it
    ended early: "" (it did not), "stopped" (a signal) or "non-finite" (that batch is dropped)."""
    have = {i: v for i in mine if (v := _load(part, i)) is not None}
    todo = [i for i in mine if i not in have]
    bs = p.cfg.batch or max(len(todo), 1)
    drawn, why = 0, ""
    with StopSignals() as stop, progress(math.ceil(len(todo) / bs), "smooth", unit="batch") as bar:
        for b0 in range(0, len(todo), bs):
            idx = todo[b0:b0 + bs]
            state, theta = p.sample(idx)
            if not (torch.isfinite(state).all() and torch.isfinite(theta).all()):
                why = "non-finite"
                break
            for j, i in enumerate(idx):
                _commit(part, i, state[j], theta[j])
                have[i] = (state[j].numpy(), theta[j].numpy())
            drawn += len(idx)
            bar.update(1)
            if stop.requested and b0 + bs < len(todo):
                why = "stopped"
                break
    return [have[i] for i in mine if i in have], drawn, why


def smooth(cfg: SmoothConfig, out: str | Path, overwrite: bool = False,
           comm: Any = None) -> dict[str, Any] | None:
    """Run the smoothing; rank 0 writes ``out`` and returns the metrics (None on other ranks).

    Raises :class:`SmoothStopped` on every rank when a stop signal ended it after a commit."""
    out = Path(out)
    comm = comm if comm is not None else world()
    rank, size = comm.Get_rank(), comm.Get_size()
    torch.set_num_threads(cfg.threads)
    err = None
    p = None
    calib = None
    try:
        if rank == 0 and out.exists() and not overwrite:
            raise OutputError(f"{out}: exists (use --overwrite)")
        p = Problem(cfg)
        if cfg.calibration is not None:
            calib = load_calibration(cfg.calibration)
            check_calibration(calib, cfg, p.spec["params"])
        if rank == 0:
            resumed = _prepare_partial(partial_dir(out), sampling_key(cfg), overwrite)
            if resumed:
                print(f"smooth: resuming with {resumed} committed sample(s) in {partial_dir(out)}",
                      flush=True)
    except (ConfigError, OutputError) as exc:
        err = exc
    errs = comm.allgather(None if err is None else str(err))
    first = next((e for e in errs if e is not None), None)
    if first is not None:
        raise err if err is not None else OutputError(first)
    assert p is not None
    part = partial_dir(out)
    mine = member_slice(cfg.samples, size, rank)
    t0 = time.perf_counter()
    pairs, drawn, why = _draw(p, mine, part)
    wall = time.perf_counter() - t0
    ends = comm.allgather((why, drawn))
    if any(w == "non-finite" for w, _ in ends):
        raise OutputError("smooth: non-finite samples (lower sda.tau or raise sda.steps)")
    committed = sum(1 for _ in part.glob("sample-*.npz")) if rank == 0 else 0
    if any(w == "stopped" for w, _ in ends):
        raise SmoothStopped(f"smooth: stopped by a signal with {committed} of {cfg.samples} "
                            f"samples committed in {part}; the same command resumes "
                            f"(exit {EXIT_STOPPED})")
    parts = comm.gather(pairs, root=0)
    if rank != 0:
        return None
    rows = [pair for ps in parts for pair in ps]
    state = torch.from_numpy(np.stack([a for a, _ in rows]))
    theta = torch.from_numpy(np.stack([b for _, b in rows]))
    met = evaluate(p, state, theta, calib)
    new = sum(d for _, d in ends)
    met.update(seconds=wall, ranks=size,
               seconds_per_sample=wall * size / new if new else float("nan"),
               samples_drawn=new, samples_resumed=cfg.samples - new, condition=cfg.condition)
    if cfg.ensf_members and p.has_truth:
        met["ensf"] = ensf_baseline(p, cfg.ensf_members)
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    write_text_atomic(tmp / CONFIG, dump(cfg))
    write_outputs(p, tmp, state, theta, met)
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    shutil.rmtree(part, ignore_errors=True)  # the output holds every sample now
    return met


def add_cli(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("smooth", help="SDA: posterior samples of a trajectory window and θ",
                       description="Sample states and parameters of a held-out trajectory window "
                                   "given noisy observations, with a model from `scoreda train`; "
                                   "under mpiexec each rank draws its own samples.")
    p.add_argument("config", help="smooth config: file or shipped example name")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output")
    p.add_argument("--model-run", help="override model_run (a `scoreda train` run directory)")
    p.add_argument("--samples", type=int, help="override the number of samples")
    p.add_argument("--trajectory", type=int, help="override the test trajectory (index)")
    p.add_argument("--start", type=int, help="override the window's first frame")
    p.add_argument("--calibration", help="override calibration (a `scoreda calibrate` output)")
    p.set_defaults(func=_cmd)


def _cmd(args: argparse.Namespace) -> int:
    tune_allocator()
    path = resolve_config_path(args.config)
    data = load_yaml(path)
    if args.model_run is not None:
        data["model_run"] = args.model_run
    for key in ("samples", "trajectory", "start", "calibration"):
        if getattr(args, key) is not None:
            data[key] = getattr(args, key)
    cfg = validate(data, SmoothConfig, str(path))
    assert isinstance(cfg, SmoothConfig)
    try:
        met = smooth(cfg, args.out, args.overwrite)
    except SmoothStopped as exc:
        if world().Get_rank() == 0:
            print(exc, flush=True)
        return EXIT_STOPPED
    if met is not None:
        for line in summary_lines(met):
            print(line)
        print(f"wrote {args.out}")
    # a NaN RMSE against a truth is a failure; without a truth (observations from a file) the
    # truth metrics are NaN by design
    return 0 if met is None or not met["truth"] or math.isfinite(met["rmse_mean"]) else 1
