"""``scoreda assimilate``: a single-process twin experiment with parameter particles.

A truth run with the true θ produces synthetic observations; an ensemble whose members carry
their own θ particles (for the parameters being estimated) is cycled: forecast, observe,
analysis (EnSF, LETKF or EnKF from ``kernels/``), roughening of θ. Per-cycle metrics, θ
particles and (for small states) truth and analysis mean are stored in one dataset, with plots.

Every random draw comes from a stream keyed by (seed, cycle, member, purpose), so the same
cycle function serves the distributed, restartable campaigns unchanged.
"""

from __future__ import annotations

import argparse
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import xarray as xr

from kernels import metrics
from kernels.assimilation import Analysis, FilterSpec, roughen
from kernels.dynamics import Dynamics
from kernels.ensf import EnSFSettings
from kernels.observe import add_noise, make_operator
from kernels.streams import generator, per_member
from pipeline.config import AssimilateConfig, dump
from pipeline.datasets import software_version
from pipeline.runtime import compute_device, progress
from pipeline.simulate import DivergenceError
from pipeline.storage import check_output, config_path_for, write_dataset

#: states larger than this are not stored per cycle unless store_states is set
STORE_STATES_MAX = 1 << 17


def filter_spec(cfg: AssimilateConfig) -> FilterSpec:
    """The kernel-level filter description of a config."""
    f, e = cfg.filter, cfg.filter.ensf
    settings = EnSFSettings(
        steps=e.steps, eps_alpha=e.eps_alpha, eps_beta=e.eps_beta, estimator=e.estimator,
        mixture_size=e.mixture_size, gm_bandwidth=e.gm_bandwidth, gm_shrink=e.gm_shrink,
        likelihood=e.likelihood, sampler=e.sampler, score_clip=e.score_clip, init=e.init)
    return FilterSpec(method=f.method, inflation=f.inflation, rtps=f.rtps, radius=f.radius,
                      ensf=settings, coupling=e.coupling, ridge=e.ridge,
                      column_chunk=f.column_chunk)


def initial_theta(model: Dynamics, cfg: AssimilateConfig, members: range) -> torch.Tensor:
    """θ particles of the given members in the natural space, ``(len(members), P_all)``.

    Estimated parameters are drawn from their prior (stream ``(seed, "theta", member)``); the
    others stay at the truth.
    """
    truth = model.truth_theta(1, cfg.model.params, dtype=torch.float64)[0]
    est = cfg.parameters.estimate
    idx = [model.param_names.index(n) for n in est]

    def draw(g: torch.Generator) -> torch.Tensor:
        th = truth.clone()
        z = torch.rand(len(est), generator=g, dtype=torch.float64)
        n = torch.randn(len(est), generator=g, dtype=torch.float64)
        for k, name in enumerate(est):
            p = model.param(name)
            spec = cfg.parameters.prior.get(name)
            if spec is not None and spec.uniform is not None:
                lo, hi = spec.uniform
                th[idx[k]] = lo + (hi - lo) * z[k]
            else:
                loc, scale = spec.normal if spec is not None else (p.prior_loc, p.prior_scale)
                th[idx[k]] = p.from_unconstrained(torch.tensor(loc + scale * float(n[k])))
        return th

    return per_member(draw, cfg.seed, members, "theta")


def _failure(x: torch.Tensor) -> str:
    """How a run that ``Dynamics.unstable`` flagged failed, for its error message."""
    if bool(torch.isfinite(x).all()):
        return "unstable (it grew faster than the model allows, before overflowing)"
    return "non-finite"


@dataclass
class TwinState:
    """Everything a cycle needs; small enough to checkpoint."""

    truth: torch.Tensor        # (1, *state_shape)
    ensemble: torch.Tensor     # (N, *state_shape)
    theta: torch.Tensor        # (N, P_all) natural space
    cycle: int = 0


def forecast_where(max_refinements: int) -> str:
    """Where a forecast failed, for the divergence messages (with the steps tried)."""
    return ("forecast" if not max_refinements else
            f"forecast (at every step tried, down to dt/{1 << max_refinements}; max_refinements)")


class Twin:
    """A twin experiment built from a validated config."""

    def __init__(self, cfg: AssimilateConfig) -> None:
        self.cfg = cfg
        self.model = cfg.model.build()
        self.dtype = getattr(torch, cfg.dtype)
        self.device = compute_device(cfg.device)
        self.dt = float(cfg.model.dt)
        obs = cfg.observation
        self.op = make_operator(obs.kind, self.model.state_shape, nonlinearity=obs.nonlinearity,
                                **obs.options)
        self.sigma = obs.sigma
        self.est_idx = [self.model.param_names.index(n) for n in cfg.parameters.estimate]
        # SDA (campaigns only) samples windows with a trained model: no ensemble analysis
        self.analysis = (None if cfg.filter.method == "sda" else
                         Analysis(self.op, self.sigma, len(self.est_idx), filter_spec(cfg)))
        self.truth_theta = self.model.truth_theta(1, cfg.model.params, dtype=self.dtype,
                                                  device=self.device)

    # -- set-up --------------------------------------------------------------------------------
    def initial_state(self, members: range | None = None) -> TwinState:
        """The state before cycle 0: spun-up truth, and ``members`` (all by default) as truth
        plus N(0, spread²) and θ from the prior, each from the member's own stream."""
        cfg, m = self.cfg, self.model
        x = m.initial_state(1, generator(cfg.seed, "truth"), dtype=torch.float64)
        x = x.to(self.dtype).to(self.device)
        with torch.no_grad():
            x0, x = x, m.advance(x, self.truth_theta, cfg.truth_spinup, self.dt)
        if cfg.truth_spinup > 0 and bool(m.unstable(x0, x, cfg.truth_spinup * self.dt).any()):
            raise DivergenceError(f"truth_spinup: the truth became {_failure(x)} in its spin-up "
                                  f"at model.dt = {self.dt:g}; lower model.dt")
        members = range(cfg.members) if members is None else members
        noise = per_member(lambda g: torch.randn(m.state_shape, generator=g, dtype=torch.float64),
                           cfg.seed, members, "init")
        ens = x + cfg.initial.spread * noise.to(x)
        theta = initial_theta(m, cfg, members).to(self.dtype).to(self.device)
        return TwinState(x, ens, theta, 0)

    # -- one cycle -----------------------------------------------------------------------------
    def cycle(self, st: TwinState) -> tuple[TwinState, dict[str, torch.Tensor]]:
        """Forecast, observe, analyse, roughen; returns the new state and this cycle's record."""
        c, n = st.cycle, st.ensemble.shape[0]
        with torch.no_grad():
            truth = self.advance_truth(st.truth, c)
            ens, halvings = self.forecast(st.ensemble, st.theta)
            self._check_finite(ens, c, forecast_where(self.cfg.max_refinements))
            y = self.observe(truth, c)
            ens_a, theta_a = self.analyse(self.augment(ens, st.theta), y, st.theta, c)
            self._check_finite(torch.cat([ens_a.reshape(n, -1), theta_a], 1), c, "analysis")
        rec = self._record(truth, ens, ens_a, theta_a, y)
        rec["refined"] = (halvings > 0).sum()
        # roughening after recording: the stored θ is the analysis, the next forecast uses the walk
        theta_next = self.roughen_theta(theta_a, range(n), c)
        return TwinState(truth, ens_a, theta_next, c + 1), rec

    # -- the pieces of a cycle (also used member-slice-wise by MPI campaigns) ------------------
    def advance_truth(self, truth: torch.Tensor, cycle: int) -> torch.Tensor:
        """The truth ``(1, *state_shape)`` one cycle on, with this cycle's shock if any.

        Raises:
            DivergenceError: the truth became non-finite, or grew faster than the model allows
                (``unstable``: a step past its stability limit, finite for a few steps before it
                overflows). Its step is the config's own; every rank computes the same truth, so
                every rank raises.
        """
        m, every = self.model, self.cfg.observation.every
        x = m.advance(truth, self.truth_theta, every, self.dt)
        if bool(m.unstable(truth, x, every * self.dt).any()):
            raise DivergenceError(f"cycle {cycle}: the truth became {_failure(x)} at model.dt = "
                                  f"{self.dt:g}; lower model.dt (nothing of this cycle is kept)")
        return self._shock(x, cycle)

    def forecast(self, ensemble: torch.Tensor, theta: torch.Tensor,
                 bound: float = math.inf) -> tuple[torch.Tensor, torch.Tensor]:
        """Members ``(n, *state_shape)`` one cycle on, each with its own θ ``(n, P_all)``.

        A member whose forecast fails (non-finite, past the model's growth bound or past
        ``bound``) redoes it with half the step, up to ``max_refinements`` times; every cycle
        starts from ``dt`` again, so a member's numbers depend on its own state and θ only.

        Returns:
            the forecast ``(n, *state_shape)`` and ``(n,)`` int64, the halvings of the step
            each member's forecast was made with. A member that failed at every step keeps its
            attempt at ``max_refinements`` halvings, for the caller's guard.
        """
        level = torch.zeros(ensemble.shape[0], dtype=torch.int64)
        most = self.cfg.max_refinements
        y, level = self.model.advance_refined(ensemble, theta, self.cfg.observation.every,
                                              self.dt, level, most, bound)
        return y, level.clamp(max=most)

    def observe(self, truth: torch.Tensor, cycle: int) -> torch.Tensor:
        """Synthetic observations ``(m,)`` of the truth, noise from the stream (seed, cycle)."""
        return add_noise(self.op(truth)[0], self.sigma, generator(self.cfg.seed, cycle, "obs"))

    def augment(self, ensemble: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
        """``[flattened state, u(θ_estimated)]``, ``(n, D + P)``."""
        u = self.model.to_unconstrained(theta)[:, self.est_idx]
        return torch.cat([ensemble.reshape(ensemble.shape[0], -1), u], dim=1)

    def analyse(self, z: torch.Tensor, y: torch.Tensor, theta: torch.Tensor,
                cycle: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Analysis of the full augmented ensemble ``z (N, D + P)``.

        Returns the analysis states ``(N, *state_shape)`` and θ ``(N, P_all)`` (``theta`` with
        the estimated columns replaced).
        """
        n, d = z.shape[0], math.prod(self.model.state_shape)
        gens = [generator(self.cfg.seed, cycle, i, "analysis") for i in range(n)]
        za = self.analysis(z, y, gens)
        theta_a = theta.clone()
        if self.est_idx:
            theta_a[:, self.est_idx] = self._from_u(za[:, d:])
        return za[:, :d].reshape(n, *self.model.state_shape), theta_a

    def roughen_theta(self, theta: torch.Tensor, members: range, cycle: int) -> torch.Tensor:
        """θ rows of ``members`` after this cycle's random walk (each member its own stream)."""
        p = self.cfg.parameters
        if not self.est_idx or p.roughening <= 0:
            return theta
        std = p.roughening * p.roughening_decay ** cycle
        u = self.model.to_unconstrained(theta)[:, self.est_idx]
        u = roughen(u, std, [generator(self.cfg.seed, cycle, i, "roughen") for i in members])
        out = theta.clone()
        out[:, self.est_idx] = self._from_u(u)
        return out

    def _shock(self, truth: torch.Tensor, cycle: int) -> torch.Tensor:
        """Apply this cycle's unmodelled shock to the truth ``(1, *state_shape)``, if any."""
        sh = self.cfg.shocks
        if sh.probability <= 0:
            return truth
        g = generator(self.cfg.seed, cycle, "shock")
        if float(torch.rand((), generator=g, dtype=torch.float64)) >= sh.probability:
            return truth
        hit = torch.rand(truth.shape, generator=g, dtype=torch.float64) < sh.fraction
        jump = sh.amplitude * torch.randn(truth.shape, generator=g, dtype=torch.float64)
        return truth + (hit * jump).to(truth)

    def _from_u(self, u: torch.Tensor) -> torch.Tensor:
        return self.model.from_unconstrained(u, self.est_idx)

    @staticmethod
    def _check_finite(x: torch.Tensor, cycle: int, where: str) -> None:
        bad = ~torch.isfinite(x.reshape(x.shape[0], -1)).all(dim=1)
        if bool(bad.any()):
            i = int(bad.nonzero()[0, 0])
            raise DivergenceError(f"cycle {cycle}: member {i} became non-finite in the {where} "
                                  f"(rank 0); nothing of this cycle is kept")

    def _record(self, truth: torch.Tensor | None, ens_f: torch.Tensor, ens_a: torch.Tensor,
                theta_a: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        """This cycle's metrics; with no truth (observations from a file) the metrics that need
        it are NaN and no truth field is kept."""
        n = ens_f.shape[0]
        t = None if truth is None else truth.reshape(-1)
        fields = metrics.verification_fields(ens_f.reshape(n, -1), ens_a.reshape(n, -1), t)
        return self.record_from_fields(fields, t, theta_a, y)

    def record_from_fields(self, fields: torch.Tensor, truth: torch.Tensor | None,
                           theta_a: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        """The metrics of :meth:`_record` from the per-component fields ``(F, D)`` of
        :func:`kernels.metrics.verification_fields` (a distributed campaign gathers them from its
        column blocks), the flat
        ``truth (D,)`` or None, every member's θ ``(N, P_all)`` and ``y``."""
        mean_f, var_f, mean_a, var_a = fields[:4]
        rec = {"spread_f": var_f.mean().sqrt(), "spread_a": var_a.mean().sqrt(),
               "theta": theta_a[:, self.est_idx], "y": y}
        if truth is None:
            nan = torch.tensor(math.nan, dtype=mean_a.dtype)
            rec.update(rmse_f=nan, rmse_a=nan, crps_a=nan)
        else:
            rec.update(rmse_f=metrics.rmse(mean_f, truth), rmse_a=metrics.rmse(mean_a, truth),
                       crps_a=fields[4].mean())
        if self.est_idx:
            th = rec["theta"].to(torch.float64)
            rec["theta_mean"] = th.mean(0)
            rec["theta_q05"], rec["theta_q95"] = metrics.credible_interval(th, 0.9)
        if self.store_states:
            rec["mean_a"], rec["spread_field"] = mean_a, var_a.sqrt()
            if truth is not None:
                rec["truth"] = truth
        return rec

    @property
    def store_states(self) -> bool:
        s = self.cfg.store_states
        return math.prod(self.model.state_shape) <= STORE_STATES_MAX if s is None else s

    # -- whole run -----------------------------------------------------------------------------
    def run(self, desc: str = "assimilate") -> xr.Dataset:
        st = self.initial_state()
        recs: list[dict[str, torch.Tensor]] = []
        t0 = time.perf_counter()
        with progress(self.cfg.cycles, desc, unit="cycle") as bar:
            for _ in range(self.cfg.cycles):
                st, rec = self.cycle(st)
                recs.append(rec)
                bar.update(1)
                bar.set_postfix(rmse=f"{float(rec['rmse_a']):.3f}", refresh=False)
        elapsed = time.perf_counter() - t0
        return self.dataset(recs, elapsed)

    def dataset(self, recs: list[dict[str, torch.Tensor]], elapsed: float) -> xr.Dataset:
        cfg, m = self.cfg, self.model
        def stack(key: str) -> np.ndarray:
            return torch.stack([r[key] for r in recs]).detach().cpu().to(torch.float64).numpy()
        cyc = np.arange(len(recs))
        time_ = (cyc + 1) * cfg.observation.every * self.dt
        names = list(cfg.parameters.estimate)
        data = {
            name: (("cycle",), stack(name), {"long_name": long})
            for name, long in [("rmse_f", "forecast RMSE of the ensemble mean"),
                               ("rmse_a", "analysis RMSE of the ensemble mean"),
                               ("spread_f", "forecast ensemble spread"),
                               ("spread_a", "analysis ensemble spread"),
                               ("crps_a", "analysis CRPS, mean over state components")]
        }
        data["y"] = (("cycle", "obs"), stack("y"), {"long_name": "observations"})
        data["refined"] = (("cycle",), stack("refined").astype(np.int64),
                           {"long_name": "members whose forecast needed a smaller step"})
        coords = {"cycle": cyc, "time": ("cycle", time_, {"units": "1"}),
                  "member": np.arange(cfg.members), "param": np.array(names, dtype=object)}
        if names:
            th = stack("theta")  # (C, N, P)
            truth = np.array([m.truth_theta(1, cfg.model.params, dtype=torch.float64)[0, j].item()
                              for j in self.est_idx])
            data["theta_particles"] = (("cycle", "member", "param"), th,
                                       {"long_name": "analysis θ particles"})
            data["theta_mean"] = (("cycle", "param"), stack("theta_mean"), {})
            data["theta_q05"] = (("cycle", "param"), stack("theta_q05"), {})
            data["theta_q95"] = (("cycle", "param"), stack("theta_q95"), {})
            data["theta_truth"] = (("param",), truth, {})
        if self.store_states:
            shape = m.state_shape
            dims = tuple(f"s{i}" for i in range(len(shape)))
            for key, long in [("truth", "truth"), ("mean_a", "analysis mean"),
                              ("spread_field", "analysis spread")]:
                arr = stack(key).reshape(len(recs), *shape)
                data[key] = (("cycle", *dims), arr, {"long_name": long})
        s = slice(cfg.burn_in, None)
        summary = {
            "rmse_a_mean": float(stack("rmse_a")[s].mean()),
            "rmse_f_mean": float(stack("rmse_f")[s].mean()),
            "spread_a_mean": float(stack("spread_a")[s].mean()),
            "seconds_per_cycle": elapsed / max(len(recs), 1),
        }
        attrs = {"Conventions": "CF-1.8", "model": m.name, "method": cfg.filter.method,
                 "config": dump(cfg), "software": f"scoreda {software_version()}",
                 "burn_in": cfg.burn_in, **summary}
        if names:
            mean, lo, hi = (recs[-1][k] for k in ("theta_mean", "theta_q05", "theta_q95"))
            for k, name in enumerate(names):
                attrs[f"theta_{name}_final_mean"] = float(mean[k])
                attrs[f"theta_{name}_final_q05"] = float(lo[k])
                attrs[f"theta_{name}_final_q95"] = float(hi[k])
        return xr.Dataset(data, coords=coords, attrs=attrs)


def summary_lines(ds: xr.Dataset) -> list[str]:
    """Human-readable summary of a twin run."""
    a = ds.attrs
    out = [f"{a['model']} {a['method']}: analysis RMSE {a['rmse_a_mean']:.4f} "
           f"(forecast {a['rmse_f_mean']:.4f}, spread {a['spread_a_mean']:.4f}) "
           f"after {a['burn_in']} burn-in cycles; {a['seconds_per_cycle'] * 1e3:.1f} ms/cycle"]
    for name in ds["param"].values if "param" in ds.coords else []:
        truth = float(ds["theta_truth"].sel(param=name))
        mean = a[f"theta_{name}_final_mean"]
        lo, hi = a[f"theta_{name}_final_q05"], a[f"theta_{name}_final_q95"]
        out.append(f"  θ {name}: mean {mean:.4g}, 90% interval [{lo:.4g}, {hi:.4g}], "
                   f"truth {truth:.4g} ({'covered' if lo <= truth <= hi else 'NOT covered'})")
    members, cycles = refined_counts(ds)
    if members:
        out.append(f"  forecasts at a smaller step (max_refinements): {members} "
                   f"member-cycles in {cycles} cycles")
    return out


def refined_counts(ds: xr.Dataset) -> tuple[int, int]:
    """``(member-cycles, cycles)`` of ``ds``'s cycles whose forecasts needed a smaller step
    (``(0, 0)`` for outputs made before the ``refined`` variable existed)."""
    if "refined" not in ds:
        return 0, 0
    r = np.nan_to_num(ds["refined"].values)
    return int(r.sum()), int((r > 0).sum())


def assimilate(cfg: AssimilateConfig, out: str | Path, overwrite: bool = False,
               plots: bool = True) -> xr.Dataset:
    """Run a twin experiment and write its dataset (and plots beside it)."""
    out = check_output(out, overwrite, beside=("_metrics.png", "_state.png"))
    ds = Twin(cfg).run()
    write_dataset(ds, out, dump(cfg))
    if plots:
        from pipeline.report import plot_assimilation, plot_state_snapshot

        plot_assimilation(ds, out.with_name(out.stem + "_metrics.png"))
        plot_state_snapshot(ds, out.with_name(out.stem + "_state.png"))
    return ds


# -- CLI ---------------------------------------------------------------------------------------
def add_cli(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("assimilate", help="twin experiment: truth, observations, cycled filter",
                       description="Run a single-process twin experiment from a config "
                                   "(file or shipped example name) and store metrics and plots.")
    p.add_argument("config", help="assimilate config (file or shipped example name)")
    p.add_argument("--out", required=True, help="output dataset (.nc or .zarr)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output")
    p.add_argument("--cycles", type=int, help="override the number of cycles")
    p.add_argument("--method", choices=["ensf", "letkf", "enkf"], help="override filter.method")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG figures")
    p.set_defaults(func=_cmd)


def _cmd(args: argparse.Namespace) -> int:
    from pipeline.config import ConfigError, load_yaml, resolve_config_path, validate
    from pipeline.runtime import tune_allocator

    path = resolve_config_path(args.config)
    data = load_yaml(path)
    if data.get("stage", "assimilate") != "assimilate":
        raise ConfigError(f"{path}: stage: assimilate needs an 'assimilate' config "
                          f"(got {data.get('stage')!r})")
    if args.cycles is not None:
        data["cycles"] = args.cycles
    if args.method is not None:
        data.setdefault("filter", {})
        data["filter"] = {**data["filter"], "method": args.method}
    cfg = validate(data, AssimilateConfig, str(path))
    tune_allocator()
    ds = assimilate(cfg, args.out, overwrite=args.overwrite, plots=not args.no_plots)
    for line in summary_lines(ds):
        print(line)
    print(f"wrote {args.out} (config beside it: {config_path_for(Path(args.out))})")
    return 0
