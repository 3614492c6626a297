"""``scoreda campaign run | resume | status | report``: distributed, restartable twin experiments.

The twin experiment of :mod:`pipeline.assimilate` run by MPI ranks (``mpiexec -n R``, ``srun``,
or plain python with R = 1). Rank r owns the contiguous members ``member_slice(N, R, r)`` and
their θ particles. Per cycle:

1. every rank advances the (cheap, deterministic) truth and draws the shared shock and
   observation noise from streams keyed by (seed, cycle, purpose), so all ranks agree on y;
2. each rank forecasts its own members with its own θ (local);
3. divergence guard: a non-finite or blown-up member stops the run before anything of the
   cycle is committed, naming cycle, member and rank (exit 1);
4. analysis. EnSF with the paired or gaussian estimator runs *distributed*
   (:meth:`kernels.assimilation.Analysis.run` with an :class:`pipeline.runtime.MPILayout`): each
   rank integrates only its own particles; column statistics, the θ regression, RTPS and the
   verification fields are computed in a column layout reached by ``alltoall``. LETKF, EnKF and
   the mixture/gm priors run *replicated*: ``allgather`` of the augmented forecast
   z = [state, u(θ)], the same analysis on every rank with the generators of all members keyed
   by (seed, cycle, member, "analysis"), each rank keeps its own rows. Roughening of a
   member's θ uses its own stream on its owning rank;
5. commit: rank 0 writes the per-cycle globals and each rank its members' θ rows into the
   cycle's own chunks of ``campaign.zarr``; when due, each rank saves its slice into
   ``checkpoints/cycle-KKKKKK/``; barrier; rank 0 replaces ``progress.json`` atomically (temp,
   fsync, rename); barrier.

With ``filter.method: sda`` the analysis is the SDA posterior of a sliding window of the last L
cycles' frames sampled with a trained window model (:mod:`pipeline.campaign_sda`): each rank
samples its own fixed blocks of members, and checkpoints carry the window's observations.
``campaign compare`` (:mod:`pipeline.campaign_compare`) puts runs on one truth side by side.

Observations come from the twin run or, with ``observations: {path, variable, sigma}``, from a
netCDF/Zarr file validated before anything is written (no truth then: truth metrics are NaN and
``rmse_obs_*`` measure the fit in observation space). Per cycle rank 0 records the seconds spent
in forecast, analysis, communication and I/O (``seconds_*``; ``scoreda bench campaign``).

Determinism rule: one torch thread per rank (``threads``, default 1), per-member streams, the
fixed-order column sums of :mod:`kernels.ensemble` and GEMMs on fixed column blocks make
R = 1, 2, 4 run the same arithmetic on the same numbers: results are identical bit for bit for
every method (docs/campaign.md).

Exit codes: 0 done, 1 divergence, 2 bad input (config, run dir, checkpoint), 3 stopped cleanly
by SIGTERM/SIGUSR1 after committing the current cycle (resumable: requeue).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import functools
import hashlib
import io
import json
import math
import os
import re
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kernels.assimilation import Analysis
from kernels.ensemble import member_mean
from kernels.metrics import verification_fields
from kernels.observe import check_observations
from kernels.streams import generator
from pipeline.assimilate import Twin, filter_spec, forecast_where, refined_counts, summary_lines
from pipeline.campaign_sda import WindowFilter, block_members
from pipeline.config import (
    CampaignConfig,
    ConfigError,
    ObservationFileConfig,
    dump,
    load_yaml,
    resolve_config_path,
    validate,
)
from pipeline.runtime import (
    MPILayout,
    StopSignals,
    agree,
    member_slice,
    progress,
    rank_logger,
    tune_allocator,
    world,
)
from pipeline.simulate import DivergenceError
from pipeline.storage import (
    OutputError,
    Replacing,
    atomic_write,
    write_file_atomic,
    write_text_atomic,
)
from pipeline.store import first_difference

EXIT_DONE, EXIT_DIVERGED, EXIT_BAD_INPUT, EXIT_STOPPED = 0, 1, 2, 3
CONFIG, PROGRESS, STORE, CHECKPOINTS, LOGS = ("config.yaml", "progress.json", "campaign.zarr",
                                               "checkpoints", "logs")
#: keys that may change between a run and its resume (they do not change any stored number)
MUTABLE_KEYS = ("checkpoint_every", "keep_checkpoints", "blowup", "max_refinements")
_CKPT_DIR = re.compile(r"^cycle-(\d{6})$")
_CKPT_FILE = re.compile(r"^members-(\d{6})-(\d{6})\.pt$")
_ERRORS = (ConfigError, OutputError, DivergenceError)
#: per-cycle timing split (rank 0's seconds), stored as ``seconds_<phase>`` with ``seconds_wall``
PHASES = ("forecast", "analysis", "comm", "io")
TIMING_VARS = tuple(f"seconds_{p}" for p in PHASES) + ("seconds_wall",)
#: metrics that need the truth (NaN when the observations come from a file)
TRUTH_METRICS = ("rmse_f", "rmse_a", "crps_a")


# --------------------------------------------------------------------------------------------
# testing hook: die inside a commit phase
def _die_at(cycle: int, phase: str, rank: int) -> None:
    """``SCOREDA_TEST_DIE_AT=CYCLE:PHASE[:RANK]`` makes the process ``os._exit(137)`` (as after
    kill -9) at that point; phases: forecast, store, checkpoint, commit, committed. For tests."""
    spec = os.environ.get("SCOREDA_TEST_DIE_AT")
    if not spec:
        return
    parts = spec.split(":")
    if int(parts[0]) == cycle and parts[1] == phase and (len(parts) < 3 or int(parts[2]) == rank):
        os._exit(137)


def _test_delay() -> None:
    """``SCOREDA_TEST_CYCLE_SLEEP=SECONDS`` sleeps at the start of every cycle: a campaign that
    lasts past a SLURM time limit without using the CPU, for the requeue tests."""
    secs = os.environ.get("SCOREDA_TEST_CYCLE_SLEEP")
    if secs:
        time.sleep(float(secs))


# --------------------------------------------------------------------------------------------
# config identity
def hashed_config(cfg: CampaignConfig) -> dict[str, Any]:
    """The part of the config that determines the stored numbers."""
    d = cfg.model_dump(mode="json")
    for k in MUTABLE_KEYS:
        d.pop(k, None)
    if d.get("observations") is None:  # runs made before the key existed keep their hash
        d.pop("observations", None)
    if d["filter"].get("sda") is None:  # likewise filter.sda (method sda only)
        d["filter"].pop("sda", None)
    elif d["filter"]["sda"].get("theta_guidance") is True:  # and its default, the one behaviour
        d["filter"]["sda"].pop("theta_guidance")           # before the key existed
    return d


def _digest(d: dict[str, Any]) -> str:
    text = json.dumps(d, sort_keys=True, separators=(",", ":"))
    return hashlib.blake2b(text.encode(), digest_size=16).hexdigest()


def config_hash(cfg: CampaignConfig) -> str:
    return _digest(hashed_config(cfg))


#: filter.sda keys added after SDA campaigns existed, in the order they were added, each at the
#: value that is the behaviour from before it
_SDA_LATER = (("theta_composition", "auto"), ("theta_evidence_scale", 1.0), ("likelihood_cg", 0))


def hash_matches(cfg: CampaignConfig, stored: str) -> bool:
    """Whether a run's stored config hash is ``cfg``'s: its hash now, or the hash a run made
    before the last of the later ``filter.sda`` keys existed recorded (those keys absent, each
    at the default that keeps its old behaviour), so that such a run still resumes."""
    d = hashed_config(cfg)
    if stored == _digest(d):
        return True
    sda = d["filter"].get("sda")
    if sda is None:
        return False
    for n in range(len(_SDA_LATER), 0, -1):  # the keys added last drop first
        keys = _SDA_LATER[-n:]
        if all(sda.get(k) == v for k, v in keys):
            old = {**d, "filter": {**d["filter"], "sda": {k: v for k, v in sda.items()
                                                          if k not in dict(keys)}}}
            if stored == _digest(old):
                return True
    return False


def load_campaign_config(path: str | Path) -> CampaignConfig:
    """A campaign config from a file or shipped example name; an ``assimilate`` config is
    accepted too (its keys mean the same)."""
    path = resolve_config_path(str(path))
    data = load_yaml(path)
    if data.get("stage", "campaign") not in ("campaign", "assimilate"):
        raise ConfigError(f"{path}: stage: campaign needs a 'campaign' config "
                          f"(got {data.get('stage')!r})")
    data["stage"] = "campaign"
    cfg = validate(data, CampaignConfig, str(path))
    assert isinstance(cfg, CampaignConfig)
    return cfg


# --------------------------------------------------------------------------------------------
# observations from a file (instead of the twin's truth run)
@dataclass
class ObservationFile:
    """Validated observations of the cycles a campaign uses, read from a netCDF/Zarr file."""

    path: Path
    y: np.ndarray                       # (cycles, m) float64
    sigma: float | np.ndarray | None    # from the file; None: the config's observation.sigma
    digest: str                         # blake2b of y and sigma: a resume refuses a changed file

    def sigma_for(self, twin: Twin) -> float | torch.Tensor:
        if self.sigma is None:
            return twin.sigma
        if isinstance(self.sigma, float):
            return self.sigma
        return torch.from_numpy(self.sigma).to(twin.dtype)


def load_observations(cfg: CampaignConfig, m: int) -> ObservationFile | None:
    """Open and validate ``cfg.observations`` (None: observations come from the twin run).

    Every failure is one ``ConfigError``/``OutputError`` line naming the file and the problem.
    """
    if cfg.observations is None:
        return None
    return read_observations(cfg.observations, "cycle", cfg.cycles, m, cfg.observation.kind,
                             cfg.observation.sigma)


def read_observations(spec: ObservationFileConfig, row_dim: str, rows: int, m: int, kind: str,
                      default_sigma: float) -> ObservationFile:
    """Observations ``spec.variable`` with dims ``(row_dim, "obs")`` from a netCDF/Zarr file:
    the first ``rows`` rows of ``m`` observations each (``kind``: the operator, for messages),
    with the noise std from the file or ``default_sigma``; validated, one-line errors."""
    import xarray as xr

    path = Path(spec.path)
    if not path.exists():
        raise ConfigError(f"{path}: observation file does not exist (observations.path)")
    if path.suffix == ".nc":
        opener = lambda: xr.open_dataset(path, engine="netcdf4")  # noqa: E731
    elif path.suffix == ".zarr" or path.is_dir():
        opener = lambda: xr.open_zarr(path, consolidated=False)  # noqa: E731
    else:
        raise ConfigError(f"{path}: observation file must be netCDF (.nc) or Zarr (.zarr)")
    try:
        ds = opener()
    except Exception as exc:  # netCDF4/zarr raise many types for unreadable files
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise OutputError(f"{path}: cannot open the observation file ({msg})") from None
    with ds:
        var = spec.variable
        if var not in ds.data_vars:
            known = ", ".join(map(str, ds.data_vars)) or "none"
            raise ConfigError(f"{path}: no variable {var!r} (observations.variable; "
                              f"variables: {known})")
        da = ds[var]
        if da.dims != (row_dim, "obs"):
            raise ConfigError(f"{path}: {var} has dims {da.dims}; expected ('{row_dim}', 'obs')")
        nc, no = da.shape
        if nc < rows:
            raise ConfigError(f"{path}: {var} has {nc} {row_dim}s; the config needs {rows}")
        if no != m:
            raise ConfigError(f"{path}: {var} has {no} observations per {row_dim}; the observation "
                              f"operator ({kind}) gives {m}")
        if da.dtype.kind != "f":
            raise ConfigError(f"{path}: {var} has dtype {da.dtype}; expected floating point")
        try:
            y = np.asarray(da.isel({row_dim: slice(0, rows)}).values, dtype=np.float64)
        except Exception as exc:
            msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise OutputError(f"{path}: cannot read {var} ({msg})") from None
        bad = ~np.isfinite(y)
        if bad.any():
            c = int(np.argwhere(bad.any(axis=1))[0, 0])
            raise ConfigError(f"{path}: {var} has {int(bad.sum())} NaN/inf value(s) in the "
                              f"{rows} {row_dim}s used (first in {row_dim} {c})")
        sigma: float | np.ndarray | None = None
        sname = spec.sigma
        if sname in ds.data_vars:
            sv = ds[sname]
            if sv.dims not in ((), ("obs",)) or (sv.dims == ("obs",) and sv.shape[0] != m):
                raise ConfigError(f"{path}: {sname} has dims {sv.dims} and shape {sv.shape}; "
                                  f"expected a scalar or ('obs',) of {m}")
            try:
                arr = np.asarray(sv.values, dtype=np.float64)
            except (TypeError, ValueError):
                raise ConfigError(f"{path}: {sname} is not numeric (dtype {sv.dtype})") from None
            sigma = float(arr) if arr.ndim == 0 else arr
        elif sname in da.attrs or sname in ds.attrs:
            raw = da.attrs.get(sname, ds.attrs.get(sname))
            try:
                sigma = float(np.asarray(raw, dtype=np.float64).reshape(()))
            except (TypeError, ValueError):
                raise ConfigError(f"{path}: attribute {sname} = {raw!r} is not a number") from None
    sig: float | torch.Tensor = (default_sigma if sigma is None else sigma
                                 if isinstance(sigma, float) else torch.from_numpy(sigma))
    try:
        check_observations(torch.from_numpy(y), m, sig)
    except ValueError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    h = hashlib.blake2b(y.tobytes(), digest_size=16)
    h.update(b"none" if sigma is None else np.asarray(sigma, dtype=np.float64).tobytes())
    return ObservationFile(path, y, sigma, h.hexdigest())


# --------------------------------------------------------------------------------------------
# run directory: config, progress record
def read_run_config(run_dir: Path) -> CampaignConfig:
    path = run_dir / CONFIG
    if not run_dir.is_dir():
        raise OutputError(f"{run_dir}: no such run directory")
    if not path.is_file():
        raise OutputError(f"{run_dir}: not a campaign run directory (no {CONFIG})")
    cfg = validate(load_yaml(path), CampaignConfig, str(path))
    assert isinstance(cfg, CampaignConfig)
    return cfg


def read_progress(run_dir: Path) -> dict[str, Any]:
    path = run_dir / PROGRESS
    try:
        rec = json.loads(path.read_text())
    except FileNotFoundError:
        raise OutputError(f"{path}: missing; not a campaign run directory") from None
    except (OSError, ValueError) as exc:
        raise OutputError(f"{path}: unreadable progress record ({exc})") from None
    if not isinstance(rec, dict):
        raise OutputError(f"{path}: unreadable progress record (not a JSON object)")
    for key in ("cycles_done", "checkpoint", "config_hash"):
        if key not in rec:
            raise OutputError(f"{path}: progress record lacks {key!r}")
    done, ck = rec["cycles_done"], rec["checkpoint"]
    if not (type(done) is int and type(ck) is int and 0 <= ck <= done):
        raise OutputError(f"{path}: damaged progress record (cycles_done {done!r}, checkpoint "
                          f"{ck!r}: whole numbers with 0 <= checkpoint <= cycles_done)")
    return rec


def write_progress(run_dir: Path, rec: dict[str, Any], cycle: int = -1, rank: int = 0) -> None:
    """Replace the progress record atomically: temp file, fsync, rename, fsync of the dir."""
    write_file_atomic(run_dir / PROGRESS, (json.dumps(rec, indent=1) + "\n").encode(),
                      before_rename=lambda: _die_at(cycle, "commit", rank))


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


# --------------------------------------------------------------------------------------------
# the Zarr store: one chunk per cycle along the cycle axis, one member per chunk for θ rows
def _create_store(cfg: CampaignConfig, twin: Twin, path: Path,
                  obs: ObservationFile | None = None) -> None:
    import dask.array as da
    import xarray as xr

    m, c, n = twin.model, cfg.cycles, cfg.members
    names = list(cfg.parameters.estimate)
    p = len(names)
    nobs = int(twin.op.m)
    time_ = (np.arange(c) + 1) * cfg.observation.every * twin.dt
    coords: dict[str, Any] = {
        "cycle": ("cycle", np.arange(c)), "time": ("cycle", time_, {"units": "1"}),
        "member": ("member", np.arange(n)), "obs": ("obs", np.arange(nobs)),
        "param": ("param", np.array(names, dtype=object)),
    }
    data: dict[str, Any] = {}
    enc: dict[str, Any] = {}

    def add(name: str, dims: tuple[str, ...], shape: tuple[int, ...], chunks: tuple[int, ...],
            long: str) -> None:
        data[name] = (dims, da.full(shape, np.nan, chunks=chunks), {"long_name": long})
        enc[name] = {"chunks": chunks, "_FillValue": np.nan}

    for name, long in [("rmse_f", "forecast RMSE of the ensemble mean"),
                       ("rmse_a", "analysis RMSE of the ensemble mean"),
                       ("spread_f", "forecast ensemble spread"),
                       ("spread_a", "analysis ensemble spread"),
                       ("crps_a", "analysis CRPS, mean over state components"),
                       ("rmse_obs_f", "RMS of y - ensemble mean of H(forecast)"),
                       ("rmse_obs_a", "RMS of y - ensemble mean of H(analysis)"),
                       ("refined", "members whose forecast needed a smaller step"),
                       ("seconds", "wall-clock seconds of forecast + analysis (not reproducible)"),
                       ("seconds_forecast", "rank 0: seconds in the forecast"),
                       ("seconds_analysis", "rank 0: seconds in the (replicated) analysis"),
                       ("seconds_comm", "rank 0: seconds in allgathers, barriers, allreduce "
                                        "(includes waiting for slower ranks)"),
                       ("seconds_io", "rank 0: seconds in store writes, checkpoint, commit"),
                       ("seconds_wall", "rank 0: wall-clock seconds of the whole cycle, "
                                        "commit included")]:
        add(name, ("cycle",), (c,), (1,), long)
    add("y", ("cycle", "obs"), (c, nobs), (1, nobs), "observations")
    data["y"][2]["sigma"] = float(cfg.observation.sigma) if obs is None or obs.sigma is None \
        else obs.sigma if isinstance(obs.sigma, float) else float("nan")
    if obs is not None and isinstance(obs.sigma, np.ndarray):
        data["sigma"] = (("obs",), obs.sigma, {"long_name": "observation noise std"})
    if p:
        add("theta_particles", ("cycle", "member", "param"), (c, n, p), (1, 1, p),
            "analysis θ particles")
        for name in ("theta_mean", "theta_q05", "theta_q95"):
            add(name, ("cycle", "param"), (c, p), (1, p), name.replace("_", " "))
        if obs is None:  # with observations from a file the true θ is unknown
            truth = m.truth_theta(1, cfg.model.params, dtype=torch.float64)[0, twin.est_idx]
            data["theta_truth"] = (("param",), truth.numpy(), {"long_name": "true θ"})
    if twin.store_states:
        shape = tuple(m.state_shape)
        dims = tuple(f"s{i}" for i in range(len(shape)))
        for name, long in [("truth", "truth"), ("mean_a", "analysis mean"),
                           ("spread_field", "analysis spread")]:
            if name != "truth" or obs is None:
                add(name, ("cycle", *dims), (c, *shape), (1, *shape), long)
    attrs = {"Conventions": "CF-1.8", "model": m.name, "method": cfg.filter.method,
             "burn_in": cfg.burn_in, "config": dump(cfg), "config_hash": config_hash(cfg),
             "observations": "twin" if obs is None else str(obs.path)}
    ds = xr.Dataset(data, coords=coords, attrs=attrs)
    atomic_write(path, lambda tmp: ds.to_zarr(tmp, mode="w", zarr_format=3, consolidated=False,
                                              compute=False, encoding=enc))


class _StoreWriter:
    """Region writes of one cycle: rank 0 the globals, each rank its own members' θ rows."""

    def __init__(self, path: Path) -> None:
        import zarr

        try:
            self.group = zarr.open_group(path, mode="r+", zarr_format=3)
        except (OSError, ValueError, KeyError) as exc:  # missing, or a damaged zarr.json
            raise OutputError(f"{path}: cannot open the campaign store "
                              f"({type(exc).__name__}: {exc})") from None
        self.arrays: dict[str, Any] = {}
        self.names = set(self.group.array_keys())

    def __call__(self, name: str, index: Any, value: Any) -> None:
        if name not in self.names:
            return  # a store made by an older version lacks the newer variables
        if name not in self.arrays:
            self.arrays[name] = self.group[name]
        if isinstance(value, torch.Tensor):
            value = value.detach().cpu().to(torch.float64).numpy()
        self.arrays[name][index] = value


def open_run(run_dir: str | Path, committed_only: bool = True):  # -> xr.Dataset
    """The run's store as a labelled Dataset (only the committed cycles by default), with the
    summary attrs ``plot_assimilation`` and ``summary_lines`` use."""
    import xarray as xr

    run_dir = Path(run_dir)
    cfg = read_run_config(run_dir)
    prog = read_progress(run_dir)
    done = int(prog["cycles_done"])
    try:
        ds = xr.open_zarr(run_dir / STORE, consolidated=False)
        if committed_only:
            ds = ds.isel(cycle=slice(0, done)).load()
    except (OSError, ValueError, KeyError) as exc:  # missing, or a damaged chunk or zarr.json
        raise OutputError(f"{run_dir / STORE}: cannot read the campaign store "
                          f"({type(exc).__name__}: {exc})") from None
    burn = min(cfg.burn_in, max(done - 1, 0))
    s = slice(burn, None)
    secs = ds["seconds"].values[s] if done else np.array([np.nan])
    ds.attrs.update(
        burn_in=burn, cycles_done=done,
        rmse_a_mean=float(ds["rmse_a"].values[s].mean()) if done else float("nan"),
        rmse_f_mean=float(ds["rmse_f"].values[s].mean()) if done else float("nan"),
        spread_a_mean=float(ds["spread_a"].values[s].mean()) if done else float("nan"),
        seconds_per_cycle=float(np.nanmean(secs)) if done else float("nan"),
        truth_known=int(cfg.observations is None))
    if "rmse_obs_a" in ds:
        ds.attrs["rmse_obs_a_mean"] = float(ds["rmse_obs_a"].values[s].mean()) if done else math.nan
        ds.attrs["rmse_obs_f_mean"] = float(ds["rmse_obs_f"].values[s].mean()) if done else math.nan
    if done and "theta_particles" in ds:
        mean, lo, hi = (ds[k].values[done - 1] for k in ("theta_mean", "theta_q05", "theta_q95"))
        for k, name in enumerate(ds["param"].values):
            ds.attrs[f"theta_{name}_final_mean"] = float(mean[k])
            ds.attrs[f"theta_{name}_final_q05"] = float(lo[k])
            ds.attrs[f"theta_{name}_final_q95"] = float(hi[k])
    return ds


# --------------------------------------------------------------------------------------------
# checkpoints: one directory per checkpointed cycle count, one file per rank's member block
def _ckpt_dir(run_dir: Path, k: int) -> Path:
    return run_dir / CHECKPOINTS / f"cycle-{k:06d}"


def _ckpt_cycles(run_dir: Path) -> list[int]:
    d = run_dir / CHECKPOINTS
    if not d.is_dir():
        return []
    return sorted(int(m.group(1)) for p in d.iterdir() if (m := _CKPT_DIR.match(p.name)))


def _save_tensors(path: Path, obj: dict[str, Any]) -> None:
    buf = io.BytesIO()
    torch.save(obj, buf)
    write_file_atomic(path, buf.getvalue())


def _load_tensors(path: Path) -> dict[str, Any]:
    try:
        obj = torch.load(path, weights_only=True, map_location="cpu")
    except FileNotFoundError:
        raise OutputError(f"{path}: checkpoint file is missing") from None
    except Exception as exc:  # torch raises RuntimeError / UnpicklingError / EOFError / ...
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise OutputError(f"{path}: corrupt or truncated checkpoint ({msg}); delete the run's "
                          f"newest checkpoint directory to fall back to an older one, or "
                          f"start again with --overwrite") from None
    if not isinstance(obj, dict):
        raise OutputError(f"{path}: corrupt checkpoint (not a mapping of tensors)")
    return obj


@dataclass
class _Slice:
    """One rank's part of the campaign state: the truth (shared) and its members."""

    truth: torch.Tensor     # (1, *state_shape)
    ensemble: torch.Tensor  # (n_local, *state_shape)
    theta: torch.Tensor     # (n_local, P_all) natural space
    cycles_done: int
    y_window: torch.Tensor | None = None  # (L, m) last L cycles' observations (method sda)


def _load_checkpoint(run_dir: Path, k: int, members: range, twin: Twin,
                     y_rows: int = 0) -> _Slice:
    """Rows ``members`` of checkpoint ``k``, from whichever member files overlap them (and,
    with ``y_rows`` > 0, the observation window ``(y_rows, m)`` of method sda)."""
    d = _ckpt_dir(run_dir, k)
    if not d.is_dir():
        raise OutputError(f"{d}: checkpoint directory is missing")
    truth = _load_tensors(d / "truth.pt")
    shape = tuple(twin.model.state_shape)
    if not isinstance(truth.get("truth"), torch.Tensor) or tuple(truth["truth"].shape) != (1, *shape):
        raise OutputError(f"{d / 'truth.pt'}: corrupt checkpoint (no truth of shape {(1, *shape)})")
    y_window = None
    if y_rows:
        y_window = truth.get("y_window")
        want = (y_rows, int(twin.op.m))
        if not isinstance(y_window, torch.Tensor) or tuple(y_window.shape) != want:
            raise OutputError(f"{d / 'truth.pt'}: corrupt checkpoint (no observation window of "
                              f"shape {want})")
        y_window = y_window.to(twin.dtype)
    files = sorted((int(m.group(1)), int(m.group(2)), p) for p in d.iterdir()
                   if (m := _CKPT_FILE.match(p.name)))
    ens: list[torch.Tensor] = []
    th: list[torch.Tensor] = []
    nxt = members.start
    for a, b, p in files:
        if b < nxt or a >= members.stop:
            continue
        if a > nxt:
            break
        obj = _load_tensors(p)
        e, t, held = obj.get("ensemble"), obj.get("theta"), obj.get("members")
        n = b - a + 1
        if not (isinstance(e, torch.Tensor) and isinstance(t, torch.Tensor)
                and tuple(e.shape) == (n, *shape) and t.shape[0] == n
                and t.shape[1] == len(twin.model.param_names)):
            raise OutputError(f"{p}: corrupt checkpoint (ensemble/theta of unexpected shape)")
        # the name is where the file says its rows are; the file itself records which they are
        if not (isinstance(held, torch.Tensor) and held.tolist() == [a, b]):
            raise OutputError(f"{p}: corrupt checkpoint (it holds members "
                              f"{held.tolist() if isinstance(held, torch.Tensor) else '?'}, "
                              f"not [{a}, {b}] as its name says)")
        lo, hi = nxt - a, min(b + 1, members.stop) - a
        ens.append(e[lo:hi])
        th.append(t[lo:hi])
        nxt = a + hi
        if nxt >= members.stop:
            break
    if nxt < members.stop:
        raise OutputError(f"{d}: incomplete checkpoint (no file holds member {nxt})")
    dtype = twin.dtype
    return _Slice(truth["truth"].to(dtype), torch.cat(ens).to(dtype), torch.cat(th).to(dtype), k,
                  y_window)


def _initial_slice(twin: Twin, members: range, y_rows: int = 0) -> _Slice:
    """The state before cycle 0 for ``members`` only (the same numbers as ``Twin.run`` uses);
    with ``y_rows`` > 0 an empty observation window ``(y_rows, m)`` (method sda)."""
    st = twin.initial_state(members)
    y_window = (torch.zeros(y_rows, int(twin.op.m), dtype=twin.dtype) if y_rows else None)
    return _Slice(st.truth, st.ensemble, st.theta, 0, y_window)


# --------------------------------------------------------------------------------------------
# the cycling loop
def _bad_member(x: torch.Tensor, limit: float) -> tuple[int, str] | None:
    """First row of ``x`` that is non-finite or exceeds ``limit`` in magnitude."""
    flat = x.reshape(x.shape[0], -1)
    nonfinite = ~torch.isfinite(flat).all(dim=1)
    big = flat.abs().nan_to_num(0.0, posinf=math.inf).amax(dim=1) > limit if flat.numel() else nonfinite
    bad = nonfinite | big
    if not bool(bad.any()):
        return None
    i = int(bad.nonzero()[0, 0])
    return i, ("became non-finite" if bool(nonfinite[i]) else f"blew up (|x| > {limit:g})")


def _diverged(c: int, member: int, rank: int, what: str, where: str, done: int) -> DivergenceError:
    return DivergenceError(f"cycle {c}: member {member} (rank {rank}) {what} in the {where}; "
                           f"cycle {c} is not committed (last committed cycle: {done - 1})")


@dataclass
class _Split:
    """Seconds per phase of one cycle on this rank (see :data:`PHASES`)."""

    s: dict[str, float] = field(default_factory=lambda: dict.fromkeys(PHASES, 0.0))

    @contextmanager
    def __call__(self, phase: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.s[phase] += time.perf_counter() - t0


def _observation_space(twin: Twin, rec: dict[str, Any], ens_f: torch.Tensor,
                       ens_a: torch.Tensor, y: torch.Tensor) -> None:
    """Add ``rmse_obs_f``/``rmse_obs_a`` (RMS of y − ensemble mean of H(x)) to ``rec``."""
    for key, ens in (("rmse_obs_f", ens_f), ("rmse_obs_a", ens_a)):
        hx = member_mean(twin.op(ens).reshape(ens.shape[0], -1))
        rec[key] = ((y.reshape(-1) - hx) ** 2).mean().sqrt()


class Campaign:
    """One rank's view of a campaign in ``run_dir``."""

    def __init__(self, cfg: CampaignConfig, run_dir: Path, comm: Any,
                 obs: ObservationFile | None = None, sda: WindowFilter | None = None) -> None:
        self.cfg, self.run_dir, self.comm = cfg, run_dir, comm
        self.rank, self.size = comm.Get_rank(), comm.Get_size()
        self.sda = sda
        if sda is not None:  # whole sampler blocks per rank: samples independent of R
            self.members = block_members(cfg.members, sda.batch, self.size, self.rank)
        else:
            self.members = member_slice(cfg.members, self.size, self.rank)
        self.twin = Twin(cfg)
        self.obs = obs
        if obs is not None and obs.sigma is not None:
            tw = self.twin
            tw.sigma = obs.sigma_for(tw)
            if tw.analysis is not None:
                tw.analysis = Analysis(tw.op, tw.sigma, len(tw.est_idx), filter_spec(cfg))
        self.hash = config_hash(cfg)
        self.log = rank_logger(run_dir / LOGS, self.rank)
        # rank 0: called after the first cycle's commit (the run it replaces goes then)
        self.after_commit: Any = None

    @property
    def y_rows(self) -> int:
        """Rows of the observation window a checkpoint carries (0: none, methods but sda)."""
        return self.sda.window if self.sda is not None else 0

    def initial_slice(self) -> _Slice:
        return _initial_slice(self.twin, self.members, self.y_rows)

    def metric_keys(self) -> tuple[str, ...]:
        if self.obs is None:
            return ("rmse_f", "rmse_a", "spread_f", "spread_a", "crps_a", "rmse_obs_a")
        return ("rmse_obs_f", "rmse_obs_a", "spread_f", "spread_a")

    # -- commit helpers --------------------------------------------------------------------
    def _write_cycle(self, w: _StoreWriter, c: int, rec: dict[str, torch.Tensor] | None,
                     theta_rows: torch.Tensor, seconds: float, refined: int) -> None:
        if self.rank == 0 and rec is not None:
            for key in ("rmse_f", "rmse_a", "spread_f", "spread_a", "crps_a", "rmse_obs_f",
                        "rmse_obs_a"):
                w(key, c, float(rec[key]))
            w("seconds", c, seconds)
            w("refined", c, refined)
            w("y", (c, slice(None)), rec["y"])
            if "mean_a" in rec:
                shape = tuple(self.twin.model.state_shape)
                for key in ("truth", "mean_a", "spread_field"):
                    if key in rec:
                        w(key, (c, ...), rec[key].reshape(shape))
            if self.twin.est_idx:
                for key in ("theta_mean", "theta_q05", "theta_q95"):
                    w(key, (c, slice(None)), rec[key])
        if self.twin.est_idx and len(self.members):
            w("theta_particles", (c, slice(self.members.start, self.members.stop), slice(None)),
              theta_rows)

    def _checkpoint(self, st: _Slice, tm: _Split | None = None) -> None:
        tm = tm if tm is not None else _Split()
        k = st.cycles_done
        d = _ckpt_dir(self.run_dir, k)

        def head() -> None:
            if self.rank == 0:
                # a dir left by an uncommitted attempt (maybe with another R) starts afresh
                shutil.rmtree(d, ignore_errors=True)
                d.mkdir(parents=True)
                obj = {"truth": st.truth.detach().cpu()}
                if st.y_window is not None:
                    obj["y_window"] = st.y_window.detach().cpu()
                _save_tensors(d / "truth.pt", obj)

        def mine() -> None:
            if len(self.members):
                a, b = self.members.start, self.members.stop - 1
                obj = {"ensemble": st.ensemble.detach().cpu().contiguous(),
                       "theta": st.theta.detach().cpu().contiguous(),
                       "members": torch.tensor([a, b])}
                _die_at(k - 1, "checkpoint", self.rank)
                _save_tensors(d / f"members-{a:06d}-{b:06d}.pt", obj)

        # each part agreed (the first one also orders rank 0's directory before the others'
        # files): a rank that cannot write stops every rank, naming the checkpoint
        with tm("io"):
            agree(self.comm, _writing(d, "the checkpoint", head), _ERRORS)
            agree(self.comm, _writing(d, "the checkpoint", mine), _ERRORS)

    def _prune(self, keep_upto: int) -> None:
        """Keep the newest ``keep_checkpoints`` checkpoints at or below ``keep_upto``."""
        ks = [k for k in _ckpt_cycles(self.run_dir) if k <= keep_upto]
        for k in ks[:-self.cfg.keep_checkpoints]:
            shutil.rmtree(_ckpt_dir(self.run_dir, k), ignore_errors=True)

    # -- analysis ------------------------------------------------------------------------
    def _guard_analysis(self, ens_a: torch.Tensor, theta_a: torch.Tensor, c: int,
                        tm: _Split) -> None:
        """Divergence guard on this rank's analysed members; every rank learns of any failure."""
        bad = None
        if len(self.members):
            bad = _bad_member(torch.cat([ens_a.reshape(len(self.members), -1), theta_a], 1),
                              self.cfg.blowup)
        with tm("comm"):
            found = self.comm.allgather(None if bad is None else (self.members.start + bad[0], bad[1]))
        for r, f in enumerate(found):
            if f is not None:
                self.log.error("diverged in the analysis: cycle %d member %d", c, f[0])
                raise _diverged(c, f[0], r, f[1], "analysis", c)

    def _analyse_distributed(self, z_loc: torch.Tensor, ens_f: torch.Tensor, y: torch.Tensor,
                             theta: torch.Tensor, truth: torch.Tensor | None, c: int,
                             tm: _Split) -> tuple[dict[str, Any] | None, torch.Tensor, torch.Tensor]:
        """EnSF (paired/gaussian) on this rank's members; statistics and metrics from the
        column layout (two alltoalls and small allgathers instead of an allgather of z)."""
        twin, m = self.twin, self.twin.model
        d, n = math.prod(m.state_shape), self.cfg.members
        lay = MPILayout(self.comm, n, twin.analysis.spec.column_chunk)
        gens = [generator(self.cfg.seed, c, i, "analysis") for i in self.members]
        with tm("analysis"):
            res = twin.analysis.run(z_loc, y, gens, lay)
        ens_a = res.z[:, :d].reshape(len(self.members), *m.state_shape)
        theta_a = theta.clone()
        if twin.est_idx:
            theta_a[:, twin.est_idx] = twin._from_u(res.z[:, d:])
        self._guard_analysis(ens_a, theta_a, c, tm)
        cols = res.columns
        ns = max(0, min(cols.stop, d) - cols.start)  # state columns among mine
        with tm("analysis"):
            fields = verification_fields(res.prior_columns[:, :ns], res.post_columns[:, :ns],
                                  None if truth is None else truth[cols.start:cols.start + ns])
            hx_f = twin.op(ens_f).reshape(len(self.members), -1)
            hx_a = twin.op(ens_a).reshape(len(self.members), -1)
        with tm("comm"):
            fields = lay.gather_columns(fields, d)
            theta_all = lay.gather_rows(theta_a)
            k = hx_f.shape[1]
            hx_mean = lay.gather_columns(
                torch.stack([member_mean(lay.to_columns(hx_f)), member_mean(lay.to_columns(hx_a))]), k)
        rec = None
        if self.rank == 0:
            rec = twin.record_from_fields(fields, truth, theta_all, y)
            for key, hm in (("rmse_obs_f", hx_mean[0]), ("rmse_obs_a", hx_mean[1])):
                rec[key] = ((y.reshape(-1) - hm) ** 2).mean().sqrt()
        return rec, ens_a, theta_a

    def _analyse_replicated(self, z_loc: torch.Tensor, y: torch.Tensor, theta: torch.Tensor,
                            truth: torch.Tensor | None, c: int,
                            tm: _Split) -> tuple[dict[str, Any] | None, torch.Tensor, torch.Tensor]:
        """Methods that need every member (LETKF, EnKF, mixture/gm EnSF): allgather of the
        augmented forecast, the same analysis on every rank, each keeps its own rows."""
        twin, m, comm = self.twin, self.twin.model, self.comm
        n, d = self.cfg.members, math.prod(m.state_shape)
        with tm("comm"):
            parts = comm.allgather(z_loc.cpu().numpy())
            theta_parts = comm.allgather(theta.cpu())
        z = torch.from_numpy(np.concatenate(parts)).to(z_loc)
        theta_full = torch.cat(theta_parts).to(theta)
        with tm("analysis"):
            ens_a, theta_a = twin.analyse(z, y, theta_full, c)
        mine = slice(self.members.start, self.members.stop)
        self._guard_analysis(ens_a[mine], theta_a[mine], c, tm)
        rec = None
        if self.rank == 0:
            ens_f_full = z[:, :d].reshape(n, *m.state_shape)
            rec = twin._record(truth, ens_f_full, ens_a, theta_a, y)
            _observation_space(twin, rec, ens_f_full, ens_a, y)
        return rec, ens_a[mine].clone(), theta_a[mine].clone()

    def _analyse_sda(self, ens_f: torch.Tensor, y_window: torch.Tensor, y: torch.Tensor,
                     theta: torch.Tensor, truth: torch.Tensor | None, c: int,
                     tm: _Split) -> tuple[dict[str, Any] | None, torch.Tensor, torch.Tensor]:
        """SDA window posterior: each rank samples its own member blocks (no communication);
        rank 0 gathers forecast and analysis for the metrics."""
        twin = self.twin
        assert self.sda is not None
        with tm("analysis"):
            x, u = self.sda.sample(self.members, y_window, c, twin.sigma)
        ens_a = x.to(ens_f)
        theta_a = theta.clone()
        if twin.est_idx:
            theta_a[:, twin.est_idx] = twin._from_u(u.to(theta))
        self._guard_analysis(ens_a, theta_a, c, tm)
        with tm("comm"):
            parts = self.comm.gather((ens_f.cpu().numpy(), ens_a.cpu().numpy(),
                                      theta_a.cpu().numpy()), root=0)
        rec = None
        if self.rank == 0:
            full = [torch.from_numpy(np.concatenate(a)).to(ens_f) for a in zip(*parts, strict=True)]
            ens_f_full, ens_a_full, theta_full = full
            with tm("analysis"):
                rec = twin._record(truth, ens_f_full, ens_a_full, theta_full, y)
                _observation_space(twin, rec, ens_f_full, ens_a_full, y)
        return rec, ens_a, theta_a

    # -- main loop -------------------------------------------------------------------------
    def run(self, st: _Slice, prog: dict[str, Any]) -> int:
        cfg, twin, comm = self.cfg, self.twin, self.comm
        obs = self.obs
        y_file = None if obs is None else torch.from_numpy(obs.y).to(twin.dtype)
        w = agree(comm, lambda: _StoreWriter(self.run_dir / STORE), _ERRORS)
        self.log.info("start at cycle %d of %d, %d ranks, members [%d, %d)", st.cycles_done,
                      cfg.cycles, self.size, self.members.start, self.members.stop)
        with StopSignals() as stop, progress(cfg.cycles, "campaign", unit="cycle",
                                             initial=st.cycles_done) as bar:
            for c in range(st.cycles_done, cfg.cycles):
                _test_delay()
                tm = _Split()
                t0 = time.perf_counter()
                with torch.no_grad():
                    # with observations from a file there is no truth: it stays the spun-up
                    # initial state (the initial ensemble's centre), never advanced
                    truth = twin.advance_truth(st.truth, c) if obs is None else st.truth
                    with tm("forecast"):
                        ens_f, halvings = twin.forecast(st.ensemble, st.theta, cfg.blowup)
                    _die_at(c, "forecast", self.rank)
                    bad = _bad_member(ens_f, cfg.blowup) if len(self.members) else None
                    with tm("comm"):
                        found = comm.allgather((None if bad is None else
                                                (self.members.start + bad[0], bad[1]),
                                                int((halvings > 0).sum()),
                                                int(halvings.max()) if halvings.numel() else 0))
                    for r, (f, _, _) in enumerate(found):
                        if f is not None:
                            self.log.error("diverged: cycle %d member %d", c, f[0])
                            raise _diverged(c, f[0], r, f[1],
                                            forecast_where(cfg.max_refinements), c)
                    refined = sum(n for _, n, _ in found)
                    if refined and self.rank == 0:
                        self.log.warning("cycle %d: %d member(s) forecast at a smaller step "
                                         "(down to dt/%d)", c, refined,
                                         1 << max(lv for _, _, lv in found))
                    y = twin.observe(truth, c) if y_file is None else y_file[c]
                    t_flat = truth.reshape(-1) if obs is None else None
                    y_window = None
                    if self.sda is not None:
                        assert st.y_window is not None
                        # the window slides by one frame: the oldest observation drops out
                        y_window = torch.cat([st.y_window[1:], y.reshape(1, -1).to(st.y_window)])
                        rec, ens_a_mine, theta_a_mine = self._analyse_sda(
                            ens_f, y_window, y, st.theta, t_flat, c, tm)
                    elif twin.analysis.distributable:
                        rec, ens_a_mine, theta_a_mine = self._analyse_distributed(
                            twin.augment(ens_f, st.theta), ens_f, y, st.theta, t_flat, c, tm)
                    else:
                        rec, ens_a_mine, theta_a_mine = self._analyse_replicated(
                            twin.augment(ens_f, st.theta), y, st.theta, t_flat, c, tm)
                    theta_rows = theta_a_mine[:, twin.est_idx].clone()
                    th_new = twin.roughen_theta(theta_a_mine.clone(), self.members, c)
                    st = _Slice(truth, ens_a_mine, th_new, c + 1, y_window)
                seconds = time.perf_counter() - t0
                # -- commit ------------------------------------------------------------------
                write = functools.partial(self._write_cycle, w, c, rec, theta_rows, seconds, refined)
                with tm("io"):  # agreed: a rank whose write fails must not leave the others waiting
                    agree(comm, _writing(self.run_dir / STORE, f"cycle {c}", write), _ERRORS)
                _die_at(c, "store", self.rank)
                due = (c + 1) % cfg.checkpoint_every == 0 or c + 1 == cfg.cycles
                if due:
                    self._checkpoint(st, tm)
                with tm("comm"):
                    comm.Barrier()
                if self.rank == 0:
                    assert rec is not None
                    ck = c + 1 if due else prog["checkpoint"]
                    # a redone cycle (after a resume from an older checkpoint) never lowers the count
                    prog = {**prog, "cycles_done": max(c + 1, int(prog["cycles_done"])),
                            "checkpoint": ck, "ranks": self.size,
                            "updated": _now(),
                            "seconds_total": float(prog.get("seconds_total", 0.0)) + seconds,
                            "last_seconds": seconds,
                            "last_metrics": {key: float(rec[key]) for key in self.metric_keys()}}
                    with tm("io"):
                        write_progress(self.run_dir, prog, c, self.rank)
                        _die_at(c, "committed", self.rank)
                        if self.after_commit is not None:
                            self.after_commit()
                            self.after_commit = None
                        self._prune(ck)
                with tm("comm"):
                    comm.Barrier()
                shown = "rmse_a" if obs is None else "rmse_obs_a"
                self.log.info("committed cycle %d (%.3f s)%s", c, seconds,
                              f" {shown} {float(rec[shown]):.4f}" if rec is not None else "")
                bar.update(1)
                if rec is not None:
                    bar.set_postfix(rmse=f"{float(rec[shown]):.3f}", refresh=False)
                with tm("comm"):
                    stop_now = comm.allreduce(1 if stop.requested else 0, op=_max())
                if self.rank == 0:
                    # the timing split of a committed cycle: written after its commit (a kill
                    # here leaves NaN, which only means "not recorded"); not itself timed. A
                    # failed write is logged: the next cycle's agreed write reports the store
                    wall = time.perf_counter() - t0
                    try:
                        for phase in PHASES:
                            w(f"seconds_{phase}", c, tm.s[phase])
                        w("seconds_wall", c, wall)
                    except (OSError, ValueError, KeyError) as exc:
                        self.log.warning("cycle %d: timing split not recorded (%s)", c, exc)
                if stop_now and c + 1 < cfg.cycles:
                    self.log.info("stop signal (%s): exiting after committed cycle %d",
                                  stop.signal or "on another rank", c)
                    if self.rank == 0:
                        print(f"campaign: stopped by signal after cycle {c} "
                              f"({c + 1}/{cfg.cycles} committed); resume with "
                              f"`scoreda campaign resume {self.run_dir}` (exit {EXIT_STOPPED})",
                              flush=True)
                    return EXIT_STOPPED
        self.log.info("finished %d cycles", cfg.cycles)
        return EXIT_DONE


def _writing(where: Path, what: str, fn: Any) -> Any:
    """``fn`` with a failed write (file system, zarr) turned into one line naming ``where``."""
    def run() -> Any:
        try:
            return fn()
        except (OSError, ValueError, KeyError) as exc:
            if isinstance(exc, (ConfigError, OutputError)):
                raise
            raise OutputError(f"{where}: cannot write {what} ({type(exc).__name__}: "
                              f"{str(exc).splitlines()[0] if str(exc) else ''})") from None
    return run


def _max() -> Any:
    from mpi4py import MPI

    return MPI.MAX


# --------------------------------------------------------------------------------------------
# entry points (every rank calls them)
def start(cfg: CampaignConfig, run_dir: str | Path, overwrite: bool = False,
          comm: Any = None) -> int:
    """Create ``run_dir`` and run the campaign from cycle 0."""
    comm = comm if comm is not None else world()
    run_dir = Path(run_dir)
    torch.set_num_threads(cfg.threads)
    # the observation file is validated on every rank before anything is written
    obs = agree(comm, lambda: load_observations(cfg, _n_obs(cfg)), _ERRORS)
    # so is the trained model of method sda (shape, θ, frame spacing against the campaign)
    sda = agree(comm, lambda: load_window_filter(cfg), _ERRORS)
    agree(comm, lambda: check_ranks(cfg, sda, comm.Get_size()), _ERRORS)

    def create() -> None:
        if comm.Get_rank() != 0:
            return
        if run_dir.exists() and any(run_dir.iterdir()) and not overwrite:
            hint = (f"use `scoreda campaign resume {run_dir}` to continue it, or "
                    if (run_dir / PROGRESS).exists() else "")
            raise OutputError(f"{run_dir}: exists; {hint}pass --overwrite to replace it")
        if run_dir.exists() and not run_dir.is_dir():
            raise OutputError(f"{run_dir}: exists and is not a directory")
        try:
            rep.append(Replacing(run_dir, overwrite, keep_fresh=True))  # kept until a commit
            run_dir.mkdir(parents=True, exist_ok=True)  # without --overwrite it may be empty
            write_text_atomic(run_dir / CONFIG, dump(cfg))
            _create_store(cfg, Twin(cfg), run_dir / STORE, obs)
            rec = {"cycles_done": 0, "checkpoint": 0, "cycles": cfg.cycles,
                   "ranks": comm.Get_size(), "config_hash": config_hash(cfg),
                   "started": _now(), "updated": _now(), "seconds_total": 0.0}
            if obs is not None:
                rec["observations_digest"] = obs.digest
            if sda is not None:
                rec["sda_model_fingerprint"] = sda.fingerprint
            write_progress(run_dir, rec)
        except OSError as exc:
            raise OutputError(f"{run_dir}: cannot create the run directory "
                              f"({exc.strerror or exc})") from None

    rep: list[Replacing] = []
    try:
        agree(comm, create, _ERRORS)
    except BaseException:
        if rep:
            rep[0].failed()
        raise
    # a truth that fails its spin-up or a first cycle that diverges puts the old run back
    with rep[0] if rep else contextlib.nullcontext():
        camp = Campaign(cfg, run_dir, comm, obs, sda)
        camp.after_commit = rep[0].committed if rep else None
        return camp.run(camp.initial_slice(), read_progress(run_dir))


def resume(run_dir: str | Path, config: CampaignConfig | None = None, comm: Any = None) -> int:
    """Continue the campaign in ``run_dir`` from its last committed cycle (any rank count).

    ``config`` (optional) may differ from the stored one only in ``checkpoint_every``,
    ``keep_checkpoints``, ``blowup`` and ``max_refinements``; anything else is refused, naming
    the first difference.
    """
    comm = comm if comm is not None else world()
    run_dir = Path(run_dir)

    def check() -> tuple[CampaignConfig, dict[str, Any], ObservationFile | None,
                         WindowFilter | None]:
        cfg = read_run_config(run_dir)
        prog = read_progress(run_dir)
        if not hash_matches(cfg, prog["config_hash"]):
            raise OutputError(f"{run_dir / CONFIG}: does not match the run's progress record "
                              f"(config hash {config_hash(cfg)} != {prog['config_hash']}); "
                              "was it edited?")
        if config is not None:
            if not hash_matches(config, prog["config_hash"]):
                raise ConfigError(f"{run_dir}: cannot resume with this config: "
                                  f"{first_difference(hashed_config(cfg), hashed_config(config))}"
                                  f"; only {', '.join(MUTABLE_KEYS)} may change")
            cfg = config
        obs = load_observations(cfg, _n_obs(cfg))
        if obs is not None and prog.get("observations_digest") != obs.digest:
            raise OutputError(f"{obs.path}: the observations differ from those the run in "
                              f"{run_dir} started with; refusing to resume")
        sda = load_window_filter(cfg)
        if sda is not None and prog.get("sda_model_fingerprint") != sda.fingerprint:
            assert cfg.filter.sda is not None
            raise OutputError(f"{cfg.filter.sda.model}: the SDA model differs from the one the "
                              f"run in {run_dir} started with; refusing to resume")
        check_ranks(cfg, sda, comm.Get_size())
        return cfg, prog, obs, sda

    cfg, prog, obs, sda = agree(comm, check, _ERRORS)
    torch.set_num_threads(cfg.threads)
    if comm.Get_rank() == 0 and config is not None:
        write_text_atomic(run_dir / CONFIG, dump(cfg))
    done, k = int(prog["cycles_done"]), int(prog["checkpoint"])
    if done >= cfg.cycles:
        if comm.Get_rank() == 0:
            print(f"campaign: {run_dir} is complete ({done}/{cfg.cycles} cycles)")
        return EXIT_DONE
    camp = Campaign(cfg, run_dir, comm, obs, sda)

    def load() -> _Slice:
        if k == 0:
            return camp.initial_slice()
        return _load_checkpoint(run_dir, k, camp.members, camp.twin, camp.y_rows)

    st = agree(comm, load, _ERRORS)
    comm.Barrier()
    if comm.Get_rank() == 0:
        # checkpoints of cycles never committed are left-overs of the interrupted attempt
        for kk in _ckpt_cycles(run_dir):
            if kk > done:
                shutil.rmtree(_ckpt_dir(run_dir, kk), ignore_errors=True)
        print(f"campaign: resuming {run_dir} at cycle {done} (checkpoint after {k} cycles, "
              f"{done - k} to redo) on {comm.Get_size()} rank(s)", flush=True)
    comm.Barrier()
    prog = {**prog, "resumed": int(prog.get("resumed", 0)) + 1}
    # cycles between the checkpoint and the last commit are redone: same numbers, same regions
    return camp.run(st, prog)


def check_ranks(cfg: CampaignConfig, sda: WindowFilter | None, size: int) -> None:
    """Refuse more ranks than there are members to split (whole sampler blocks for SDA): a rank
    without members would stop in its first collective while the others wait for it."""
    units = cfg.members if sda is None else -(-cfg.members // sda.batch)
    if size > units:
        what = (f"{cfg.members} members" if sda is None else
                f"{cfg.members} members in {units} sampler blocks of filter.sda.batch {sda.batch}")
        raise ConfigError(f"members: {what} cannot be split over {size} ranks; run on at most "
                          f"{units}")


def load_window_filter(cfg: CampaignConfig) -> WindowFilter | None:
    """The checked SDA window model of ``filter.method: sda`` (None for other methods)."""
    if cfg.filter.method != "sda":
        return None
    from kernels.observe import make_operator

    o = cfg.observation
    shape = tuple(cfg.model.build().state_shape)
    op = make_operator(o.kind, shape, nonlinearity=o.nonlinearity, **o.options)
    return WindowFilter(cfg, op, shape)


def _n_obs(cfg: CampaignConfig) -> int:
    """Observations per cycle of the config's operator (without building a whole Twin)."""
    from kernels.observe import make_operator

    o = cfg.observation
    return int(make_operator(o.kind, cfg.model.build().state_shape, nonlinearity=o.nonlinearity,
                             **o.options).m)


def timing_split(run_dir: str | Path) -> dict[str, float] | None:
    """Mean seconds per committed cycle of each phase (rank 0), or None if none recorded."""
    import xarray as xr

    run_dir = Path(run_dir)
    done = int(read_progress(run_dir)["cycles_done"])
    try:
        ds = xr.open_zarr(run_dir / STORE, consolidated=False)
    except Exception:  # noqa: BLE001 - status must still print the rest
        return None
    if not done or "seconds_wall" not in ds:
        return None
    out: dict[str, float] = {}
    with ds:
        for name in TIMING_VARS:
            v = ds[name].isel(cycle=slice(0, done)).values
            if not np.isfinite(v).any():
                return None
            out[name.removeprefix("seconds_")] = float(np.nanmean(v))
    return out


def refined_cycles(run_dir: str | Path) -> tuple[int, int]:
    """:func:`pipeline.assimilate.refined_counts` of the committed cycles in the store."""
    import xarray as xr

    run_dir = Path(run_dir)
    done = int(read_progress(run_dir)["cycles_done"])
    try:
        ds = xr.open_zarr(run_dir / STORE, consolidated=False)
    except Exception:  # noqa: BLE001 - status must still print the rest
        return 0, 0
    with ds:
        return refined_counts(ds.isel(cycle=slice(0, done)))


def status_lines(run_dir: str | Path) -> list[str]:
    run_dir = Path(run_dir)
    cfg = read_run_config(run_dir)
    prog = read_progress(run_dir)
    done = int(prog["cycles_done"])
    out = [f"{run_dir}: {done}/{cfg.cycles} cycles committed "
           f"({'complete' if done >= cfg.cycles else 'resumable'}), {cfg.model.name} "
           f"{cfg.filter.method}, {cfg.members} members, last run on {prog.get('ranks')} rank(s)",
           f"  last checkpoint after {prog['checkpoint']} cycles; updated {prog.get('updated')}"]
    if done:
        secs = float(prog.get("seconds_total", 0.0)) / max(done, 1)
        lm = prog.get("last_metrics", {})
        out.append("  last cycle: " + ", ".join(f"{k} {v:.4g}" for k, v in lm.items()))
        out.append(f"  time per cycle: {secs * 1e3:.1f} ms (mean over all attempts), "
                   f"last {float(prog.get('last_seconds', 0)) * 1e3:.1f} ms")
        split = timing_split(run_dir)
        if split is not None:
            wall = split["wall"]
            parts = [f"{p} {split[p] * 1e3:.1f} ms ({split[p] / wall:.0%})" for p in PHASES]
            other = wall - sum(split[p] for p in PHASES)
            out.append(f"  time split per cycle (rank 0, mean): wall {wall * 1e3:.1f} ms = "
                       + ", ".join(parts) + f", other {other * 1e3:.1f} ms")
        members, cycles = refined_cycles(run_dir)
        if members:
            out.append(f"  forecasts at a smaller step (max_refinements {cfg.max_refinements}): "
                       f"{members} member-cycles in {cycles} cycles")
    if cfg.observations is not None:
        out.append(f"  observations from {cfg.observations.path} (variable "
                   f"{cfg.observations.variable}); no truth: rmse/crps are NaN, rmse_obs_* are "
                   "observation-space errors")
    return out


def report(run_dir: str | Path) -> list[Path]:
    """PNG plots (RMSE/spread, θ with 90% intervals) and a markdown summary of the committed
    cycles; returns the written paths."""
    from pipeline.report import plot_assimilation, plot_state_snapshot
    from pipeline.storage import write_text_atomic as _w

    run_dir = Path(run_dir)
    ds = open_run(run_dir)
    if ds.attrs["cycles_done"] == 0:
        raise OutputError(f"{run_dir}: no committed cycle to report yet")
    png = run_dir / "report_metrics.png"
    known = bool(ds.attrs.get("truth_known", 1))
    plot_assimilation(ds if known else _obs_space_view(ds), png)
    a = ds.attrs
    rows = [("cycles committed", f"{a['cycles_done']}"),
            ("model / method", f"{a['model']} / {a['method']}"),
            ("members", f"{ds.sizes['member']}")]
    if known:
        rows += [("analysis RMSE (after burn-in)", f"{a['rmse_a_mean']:.4f}"),
                 ("forecast RMSE (after burn-in)", f"{a['rmse_f_mean']:.4f}")]
    else:
        rows += [("observations", f"{ds.attrs.get('observations')} (no truth: RMSE and CRPS "
                                  "unknown)")]
    if "rmse_obs_a_mean" in a:
        rows += [("analysis obs-space RMS of y - H(x) (after burn-in)",
                  f"{a['rmse_obs_a_mean']:.4f}"),
                 ("forecast obs-space RMS of y - H(x) (after burn-in)",
                  f"{a['rmse_obs_f_mean']:.4f}")]
    rows += [("analysis spread (after burn-in)", f"{a['spread_a_mean']:.4f}"),
             ("seconds per cycle", f"{a['seconds_per_cycle']:.4f}")]
    members, cycles = refined_counts(ds)  # ds holds the committed cycles
    if members:
        rows.append(("forecasts at a smaller step (max_refinements)",
                     f"{members} member-cycles in {cycles} cycles"))
    split = timing_split(run_dir)
    if split is not None:
        rows.append(("time split per cycle, ms (rank 0)",
                     ", ".join(f"{k} {v * 1e3:.1f}" for k, v in split.items())))
    for name in ds["param"].values if "param" in ds.coords else []:
        lo, hi = a[f"theta_{name}_final_q05"], a[f"theta_{name}_final_q95"]
        mean = a[f"theta_{name}_final_mean"]
        if "theta_truth" not in ds:
            rows.append((f"θ {name}: final mean [90% interval] (truth unknown)",
                         f"{mean:.4g} [{lo:.4g}, {hi:.4g}]"))
            continue
        truth = float(ds["theta_truth"].sel(param=name))
        rows.append((f"θ {name}: final mean [90% interval] (truth)",
                     f"{mean:.4g} [{lo:.4g}, {hi:.4g}] ({truth:.4g}, "
                     f"{'covered' if lo <= truth <= hi else 'NOT covered'})"))
    written = [png]
    md = [f"# Campaign report: {run_dir.name}", "", "| quantity | value |", "|---|---|"]
    md += [f"| {k} | {v} |" for k, v in rows]
    md += ["", f"![metrics]({png.name})", ""]
    state_png = run_dir / "report_state.png"
    if plot_state_snapshot(ds, state_png):  # truth / mean / spread fields, when stored
        written.append(state_png)
        md += [f"![state at the last committed cycle]({state_png.name})", ""]
    out = run_dir / "report.md"
    _w(out, "\n".join(md))
    return [*written, out]


def _obs_space_view(ds):  # -> xr.Dataset
    """For plotting a run without truth: observation-space errors in place of the RMSEs."""
    v = ds.copy()
    if "rmse_obs_a" in v:
        v["rmse_f"], v["rmse_a"] = v["rmse_obs_f"], v["rmse_obs_a"]
        v.attrs["rmse_a_mean"] = v.attrs.get("rmse_obs_a_mean", math.nan)
        v.attrs["method"] = f"{v.attrs.get('method', '')} (observation space, no truth)"
    if "param" in v.coords and "theta_truth" not in v:
        v["theta_truth"] = (("param",), np.full(v.sizes["param"], np.nan))
    return v


def campaign_summary_lines(ds) -> list[str]:
    """``summary_lines`` of :mod:`pipeline.assimilate`, also for runs without truth."""
    if ds.attrs.get("truth_known", 1) and ("theta_truth" in ds or "param" not in ds.coords):
        return summary_lines(ds)
    a = ds.attrs
    out = [f"{a['model']} {a['method']} (observations from a file, no truth): obs-space RMS of "
           f"y - H(x_a) {a.get('rmse_obs_a_mean', math.nan):.4f} (forecast "
           f"{a.get('rmse_obs_f_mean', math.nan):.4f}, spread {a['spread_a_mean']:.4f}) after "
           f"{a['burn_in']} burn-in cycles; {a['seconds_per_cycle'] * 1e3:.1f} ms/cycle"]
    for name in ds["param"].values if "param" in ds.coords else []:
        out.append(f"  θ {name}: mean {a[f'theta_{name}_final_mean']:.4g}, 90% interval "
                   f"[{a[f'theta_{name}_final_q05']:.4g}, {a[f'theta_{name}_final_q95']:.4g}]"
                   ", truth unknown")
    return out


# -- CLI ---------------------------------------------------------------------------------------
def add_cli(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("campaign", help="distributed, restartable twin experiments (MPI)",
                       description="Cycle a twin experiment over MPI ranks (mpiexec/srun/plain "
                                   "python) into a run directory that survives kills. Exit codes: "
                                   "0 done, 1 diverged, 2 bad input, 3 stopped by SIGTERM/SIGUSR1 "
                                   "after a commit (resumable: requeue and run `resume`).")
    cs = p.add_subparsers(dest="campaign_command", metavar="ACTION", required=True)
    r = cs.add_parser("run", help="start a campaign from a config")
    r.add_argument("config", help="campaign (or assimilate) config: file or shipped example name")
    r.add_argument("--run-dir", required=True, help="run directory to create")
    r.add_argument("--overwrite", action="store_true", help="replace an existing run directory")
    r.add_argument("--cycles", type=int, help="override the number of cycles")
    r.add_argument("--observations", metavar="FILE",
                   help="observations from FILE (.nc or .zarr with y(cycle, obs)) instead of "
                        "the twin run; sets observations.path")
    r.set_defaults(func=_cmd)
    s = cs.add_parser("resume", help="continue a run from its last committed cycle")
    s.add_argument("run_dir")
    s.add_argument("--config", help="a changed config (only checkpoint_every, keep_checkpoints, "
                                    "blowup, max_refinements may differ)")
    s.set_defaults(func=_cmd)
    t = cs.add_parser("status", help="cycles done, last metrics, time per cycle")
    t.add_argument("run_dir")
    t.set_defaults(func=_cmd)
    q = cs.add_parser("report", help="PNG plots and a markdown summary in the run directory")
    q.add_argument("run_dir")
    q.set_defaults(func=_cmd)
    v = cs.add_parser("compare", help="runs on one truth side by side: one figure, one table",
                      description="Check that the runs share the twin truth and observations "
                                  "(refused otherwise), then draw RMSE/spread and θ with 90% "
                                  "intervals of every run in one figure and write a table.")
    v.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="two or more run directories")
    v.add_argument("--out", required=True, help="directory for compare.png, compare.md, "
                                                "compare.json")
    v.add_argument("--overwrite", action="store_true", help="replace existing outputs in --out")
    v.set_defaults(func=_cmd)


def _cmd(args: argparse.Namespace) -> int:
    action = args.campaign_command
    if action == "status":
        for line in status_lines(args.run_dir):
            print(line)
        return 0
    if action == "compare":
        from pipeline.campaign_compare import compare

        paths, lines = compare(args.run_dirs, args.out, overwrite=args.overwrite)
        for line in lines:
            print(line)
        for path in paths:
            print(f"wrote {path}")
        return 0
    if action == "report":
        for path in report(args.run_dir):
            print(f"wrote {path}")
        for line in campaign_summary_lines(open_run(args.run_dir)):
            print(line)
        return 0
    comm = world()
    tune_allocator()
    try:
        if action == "run":
            cfg = load_campaign_config(args.config)
            if args.cycles is not None or args.observations is not None:
                data = cfg.model_dump(mode="json")
                if args.cycles is not None:
                    data["cycles"] = args.cycles
                if args.observations is not None:
                    data["observations"] = {**(data.get("observations") or {}),
                                            "path": args.observations}
                cfg = validate(data, CampaignConfig, f"{args.config} (command line)")
            code = start(cfg, args.run_dir, overwrite=args.overwrite, comm=comm)
        else:
            new = load_campaign_config(args.config) if args.config else None
            code = resume(args.run_dir, new, comm=comm)
    except _ERRORS as exc:
        if comm.Get_rank() != 0:  # every rank has the same error: rank 0 reports it
            return EXIT_DIVERGED if isinstance(exc, DivergenceError) else EXIT_BAD_INPUT
        raise
    if code == EXIT_DONE and comm.Get_rank() == 0:
        for line in status_lines(args.run_dir):
            print(line)
    return code
