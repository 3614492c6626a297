"""``scoreda generate | verify | export``: trajectory data sets with Dask into a sharded Zarr v3 store.

One Dask task per trajectory block (``trajectories_per_shard`` trajectories, integrated together
in one batch): it draws each trajectory's θ and initial state from the trajectory's own streams
``(seed, "theta", j)``, ``(seed, "init", j)`` (and ``(seed, "walk", j)`` for a θ random walk),
spins up, integrates, pools each saved state onto the stored grids, and writes every shard of its
block (all saved times, split into ``shard_frames`` pieces) as soon as the shard is full. Each
shard is re-read, its checksum compared with the one computed before writing, and a marker file
records it (see ``pipeline/store.py``). A re-run skips recorded shards, so a crash costs at most
the unfinished shards; the numbers never depend on the worker count or on resuming, because
every draw comes from a per-trajectory stream and a member's result never depends on its batch.

The driver creates all array metadata, coords and θ once, before any task runs. Workers come from
a ``distributed.LocalCluster`` (processes, one torch thread each), from dask-mpi when the command
runs under ``mpiexec``/``srun`` with 3 or more ranks (scheduler on rank 0, this driver on rank 1,
workers on the rest), or from an existing scheduler (``dask.scheduler: tcp://host:port``).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import logging
import os
import random
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kernels.streams import generator, per_member
from pipeline import store as st
from pipeline.config import (
    ConfigError,
    DaskConfig,
    GenerateConfig,
    PriorSpec,
    load_yaml,
    resolve_config_path,
    validate,
)
from pipeline.runtime import compute_device, progress
from pipeline.simulate import DivergenceError, RefinedStepper

EXIT_BAD_INPUT = 2
EXIT_FAILED = 1


class IntegrityError(RuntimeError):
    """A shard read back differently from what was written, or a recomputation differs."""


# --------------------------------------------------------------------------------------------
# per-trajectory draws (the only randomness; all keyed by trajectory index)
def theta_paths(model: Any, cfg: GenerateConfig, trajs: Sequence[int]) -> torch.Tensor:
    """θ of trajectories ``trajs`` at every saved time, ``(J, T, P)`` float64, natural space.

    ``theta[j, k]`` drives the integration from saved time k to k+1 (and the spin-up for k=0).
    For ``walk``, the unconstrained ``u`` follows ``u_k = m + (1−r)(u_{k−1} − m) + σ ξ_k`` with
    ``m`` the prior mean, ``r = walk_reversion`` (0: a pure random walk) and ``σ = walk_std``.
    """
    th = cfg.theta
    if th.initial == "prior":
        theta0 = per_member(lambda g: draw_prior(model, th.prior, g), cfg.seed, trajs, "theta")
    else:
        theta0 = model.truth_theta(len(trajs), cfg.model.params, dtype=torch.float64)
    if th.mode != "walk":
        return theta0[:, None, :].expand(-1, cfg.frames, -1).clone()
    p = len(model.params)
    steps = per_member(lambda g: torch.randn(max(cfg.frames - 1, 0), p, generator=g,
                                             dtype=torch.float64), cfg.seed, trajs, "walk")
    m = prior_centre(model, th.prior)
    u = [model.to_unconstrained(theta0)]
    for k in range(cfg.frames - 1):
        u.append(m + (1.0 - th.walk_reversion) * (u[-1] - m) + th.walk_std * steps[:, k])
    return model.from_unconstrained(torch.stack(u, dim=1))


def draw_prior(model: Any, prior: dict[str, PriorSpec], g: torch.Generator) -> torch.Tensor:
    """One θ ``(P,)`` float64 (natural space) from the model's prior, or ``prior``'s per parameter.

    The same standard normal ``z`` (one per parameter, the draw of ``model.sample_prior``)
    feeds every form: ``normal: [loc, scale]`` gives ``loc + scale·z`` unconstrained and
    ``uniform: [lo, hi]`` gives ``lo + (hi − lo)·Φ(z)``, so a trajectory keeps its quantile when
    only its prior changes, and an empty ``prior`` reproduces the model's draws exactly.
    """
    if not prior:
        return model.sample_prior(1, g, dtype=torch.float64)[0]
    z = torch.randn(len(model.params), generator=g, dtype=torch.float64)
    out = []
    for k, q in enumerate(model.params):
        spec = prior.get(q.name)
        if spec is not None and spec.uniform is not None:
            lo, hi = spec.uniform
            out.append(lo + (hi - lo) * torch.special.ndtr(z[k]))
            continue
        loc, scale = spec.normal if spec is not None else (q.prior_loc, q.prior_scale)
        out.append(q.from_unconstrained(loc + scale * z[k]))
    return torch.stack(out)


def prior_centre(model: Any, prior: dict[str, PriorSpec]) -> torch.Tensor:
    """``(P,)`` float64: each prior's centre in the unconstrained space (a walk reverts to it)."""
    out = []
    for q in model.params:
        spec = prior.get(q.name)
        if spec is None:
            out.append(q.prior_loc)
        elif spec.normal is not None:
            out.append(spec.normal[0])
        else:
            ends = q.to_unconstrained(torch.tensor(spec.uniform, dtype=torch.float64))
            out.append(float(ends.mean()))
    return torch.tensor(out, dtype=torch.float64)


def initial_states(model: Any, cfg: GenerateConfig, trajs: Sequence[int]) -> torch.Tensor:
    """Initial states ``(J, *state_shape)`` float64 from the streams ``(seed, "init", j)``."""
    return per_member(lambda g: model.initial_state(1, g, dtype=torch.float64)[0],
                      cfg.seed, trajs, "init")


def split_of(cfg: GenerateConfig) -> np.ndarray:
    """Split index per trajectory ``(N,)`` int8 (0 train, 1 valid, 2 test), from ``(seed, "split")``.

    A seeded permutation puts ``round(test·N)`` trajectories in test and ``round(valid·N)`` in
    valid, so whole trajectories (never pieces of one) go to one split.
    """
    n = cfg.trajectories
    perm = torch.randperm(n, generator=generator(cfg.seed, "split")).numpy()
    n_test, n_valid = round(cfg.split.test * n), round(cfg.split.valid * n)
    out = np.zeros(n, dtype=np.int8)
    out[perm[:n_test]] = 2
    out[perm[n_test:n_test + n_valid]] = 1
    return out


# --------------------------------------------------------------------------------------------
# integration
def integrate(
    cfg: GenerateConfig,
    trajs: Sequence[int],
    model: Any | None = None,
    time_blocks: int | None = None,
    refined: dict[int, int] | None = None,
) -> Iterator[tuple[int, dict[str, np.ndarray], float]]:
    """Integrate trajectories ``trajs`` in one batch and yield their shards along time.

    Args:
        cfg: the generate config.
        trajs: trajectory indices (the batch).
        model: the built model (built from ``cfg`` when None).
        time_blocks: stop after this many time blocks (all when None).
        refined: filled before each yield with ``{trajectory: halvings}`` of the trajectories
            whose step had to be halved so far (:class:`RefinedStepper`).

    Yields:
        ``(c, arrays, solve_seconds)`` for time block ``c``: ``arrays[name]`` is
        ``(J, shard_frames, *space)`` in the stored dtype for every stored array, and
        ``solve_seconds`` the time spent integrating and pooling that block.
    """
    from kernels.observe import CoarsePool

    model = model if model is not None else cfg.model.build()
    lay = st.layout(cfg, model)
    dtype, device = getattr(torch, cfg.dtype), torch.device(cfg.device)
    theta = theta_paths(model, cfg, trajs).to(dtype=dtype, device=device)
    n_space = len(lay.space_dims)
    pools = {g: CoarsePool(model.state_shape, int(cfg.model.size) // g, spatial_ndim=n_space)
             for g in lay.grids if g != int(cfg.model.size)}
    channels = model.state_shape[:-n_space]
    n_blocks = lay.time_blocks if time_blocks is None else min(time_blocks, lay.time_blocks)
    step = RefinedStepper(model, cfg.model.dt, cfg.max_refinements, trajs)
    t0 = time.perf_counter()
    with torch.no_grad():
        x = initial_states(model, cfg, trajs).to(dtype=dtype, device=device)
        # the spin-up in saved-interval pieces, so that a failure is redone from close by
        for s0 in range(0, cfg.spinup, cfg.save_every):
            x = step(x, theta[:, 0], min(cfg.save_every, cfg.spinup - s0), "in the spin-up")
        for c in range(n_blocks):
            bufs = {a.name: np.empty((len(trajs), lay.shard_frames, *a.shape[2:]), dtype=cfg.dtype)
                    for a in lay.arrays}
            for i, k in enumerate(lay.frame_range(c)):
                if k > 0:
                    x = step(x, theta[:, k - 1], cfg.save_every, f"by saved time {k}")
                elif not bool(torch.isfinite(x).all()):  # the initial state itself (no spin-up)
                    bad = int((~torch.isfinite(x.flatten(1)).all(dim=1)).nonzero()[0, 0])
                    raise DivergenceError(f"trajectory {trajs[bad]}: non-finite initial state")
                on_grid: dict[int, torch.Tensor] = {int(cfg.model.size): x}
                for g, pool in pools.items():
                    on_grid[g] = pool(x).reshape(x.shape[0], *channels,
                                                 *(s // pool.factor for s in x.shape[-n_space:]))
                for a in lay.arrays:
                    v = on_grid[a.grid] if a.channel is None else on_grid[a.grid][:, a.channel]
                    bufs[a.name][:, i] = v.to("cpu").numpy()
            solve = time.perf_counter() - t0
            if refined is not None:
                refined.update(step.refined())
            yield c, bufs, solve
            t0 = time.perf_counter()


def run_block(cfg: GenerateConfig, path: str, b: int, skip: Sequence[int] = ()) -> dict[str, Any]:
    """The Dask task: integrate trajectory block ``b`` and write its unfinished shards.

    Args:
        cfg: the generate config.
        path: the store (its metadata already exists).
        b: trajectory block index.
        skip: time blocks of this trajectory block that are already recorded as finished.

    Returns:
        ``{"block", "written", "solve_s", "write_s", "bytes", "refined"}`` for the driver's
        summary (``refined``: ``{trajectory: halvings}`` where the step had to be halved).
    """
    import zarr

    from pipeline.runtime import tune_allocator

    tune_allocator()
    torch.set_num_threads(cfg.dask.threads_per_worker)
    store = Path(path)
    model = cfg.model.build()
    lay = st.layout(cfg, model)
    todo = [c for c in range(lay.time_blocks) if c not in set(skip)]
    refined: dict[int, int] = {}
    result: dict[str, Any] = {"block": b, "written": [], "solve_s": 0.0, "write_s": 0.0, "bytes": 0,
                              "refined": refined}
    if not todo:
        return result
    group = zarr.open_group(store, mode="r+")
    arrays = {a.name: group[a.name] for a in lay.arrays}
    trajs = lay.block_trajectories(b)
    j0, j1 = trajs.start, trajs.stop
    for c, bufs, solve in integrate(cfg, trajs, model, time_blocks=max(todo) + 1, refined=refined):
        result["solve_s"] += solve
        if c not in todo:
            continue  # recorded in an earlier run: integrated through, not rewritten
        t_start = time.perf_counter()
        f0, f1 = lay.frame_range(c).start, lay.frame_range(c).stop
        sums: dict[str, str] = {}
        for name, data in bufs.items():
            sums[name] = st.checksum(data)
            arrays[name][j0:j1, f0:f1] = data  # exactly one shard: no read-modify-write
            back = arrays[name][j0:j1, f0:f1]
            if st.checksum(back) != sums[name]:
                raise IntegrityError(f"{store}: shard ({b}, {c}) of {name} read back differently "
                                     "from what was written")
            result["bytes"] += data.nbytes
        # halvings of this block's trajectories up to the shard's last frame (JSON: str keys)
        st.write_marker(store, b, c, sums, {"trajectories": [j0, j1], "frames": [f0, f1],
                                            "refined": {str(j): v for j, v in refined.items()}})
        result["write_s"] += time.perf_counter() - t_start
        result["written"].append(c)
    return result


# --------------------------------------------------------------------------------------------
# Dask
def dashboard_available() -> bool:
    return importlib.util.find_spec("bokeh") is not None


def _dashboard_options(dcfg: DaskConfig) -> dict[str, Any]:
    """Scheduler keywords for ``dask.dashboard``. Without a dashboard (null, or no bokeh) the
    scheduler still serves its plain HTTP routes (health, metrics): on a free port, so that a
    second cluster on this machine does not find 8787 taken."""
    if dcfg.dashboard is not None and dashboard_available():
        return {"dashboard": True, "dashboard_address": dcfg.dashboard}
    return {"dashboard": False, "dashboard_address": ":0"}


def mpi_world_size() -> int:
    """Size of the launcher's MPI world; 1 without a parallel launcher (MPI is not touched then)."""
    sizes = [os.environ.get(v) for v in ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "PMIX_SIZE",
                                          "SLURM_STEP_NUM_TASKS", "MPI_LOCALNRANKS")]
    if not any(s and s.isdigit() and int(s) > 1 for s in sizes):
        return 1
    from mpi4py import MPI

    return MPI.COMM_WORLD.Get_size()


def start_dask_mpi(dcfg: DaskConfig) -> Any:
    """Turn this MPI job into a Dask cluster; returns a Client on rank 1 only.

    dask-mpi runs the scheduler on rank 0 and workers on ranks 2.., which block in here and exit
    when the client rank finishes (its atexit hook tells the scheduler to close).
    """
    import dask_mpi
    from distributed import Client

    try:
        dask_mpi.initialize(nthreads=dcfg.threads_per_worker, memory_limit=dcfg.memory_limit,
                            **_dashboard_options(dcfg))
    except dask_mpi.WorldTooSmallException:
        raise ConfigError("generate under MPI needs at least 3 ranks (scheduler, driver, "
                          "worker)") from None
    client = Client()
    client.wait_for_workers(mpi_world_size() - 2, timeout=120)
    return client


@contextlib.contextmanager
def dask_client(dcfg: DaskConfig) -> Iterator[Any]:
    """A Client for a LocalCluster (default) or an existing scheduler address."""
    from distributed import Client, LocalCluster

    if dcfg.scheduler is not None:
        try:
            client = Client(dcfg.scheduler, timeout=30)
        except OSError as exc:
            raise ConfigError(f"dask.scheduler: cannot connect to {dcfg.scheduler} ({exc})") from None
        with client:
            yield client
        return
    workers = dcfg.workers or max(1, (os.cpu_count() or 1) // dcfg.threads_per_worker)
    dash = _dashboard_options(dcfg)
    # LocalCluster turns the dashboard on for any address; the scheduler keywords override it
    # a failed task is raised again here with its message (the CLI's one line): the workers'
    # own "Compute Failed" tracebacks would only repeat it on stderr
    with LocalCluster(n_workers=workers, threads_per_worker=dcfg.threads_per_worker,
                      processes=True, memory_limit=dcfg.memory_limit,
                      silence_logs=logging.CRITICAL,
                      dashboard_address=dash["dashboard_address"] if dash["dashboard"] else None,
                      scheduler_kwargs=dash) as cluster, \
            Client(cluster) as client:
        yield client


def _describe_dashboard(client: Any, dcfg: DaskConfig) -> str:
    if dcfg.scheduler is None and dcfg.dashboard is None:
        return "dashboard: off (dask.dashboard: null)"
    if not dashboard_available():
        return "dashboard: not available (install bokeh to get one)"
    return f"dashboard: {client.dashboard_link}"


# --------------------------------------------------------------------------------------------
# driver
@dataclass
class GenerateResult:
    """What one ``generate`` call did."""

    path: Path
    resumed: bool
    shards_total: int
    shards_skipped: int
    shards_written: int
    seconds: float
    solve_s: float = 0.0
    write_s: float = 0.0
    bytes_written: int = 0
    workers: int = 0
    blocks_run: list[int] = field(default_factory=list)
    #: ``{trajectory: halvings}`` of the trajectories integrated here whose step was halved
    refined: dict[int, int] = field(default_factory=dict)


def generate(cfg: GenerateConfig, out: str | Path | None = None, overwrite: bool = False,
             client: Any | None = None, echo: Any = print) -> GenerateResult:
    """Generate (or resume) the store that ``cfg`` describes.

    Args:
        cfg: the generate config.
        out: the store path (``cfg.out`` when None).
        overwrite: replace an existing store even if it has another config.
        client: a ``distributed.Client`` to use; a cluster from ``cfg.dask`` is started when None.
        echo: where the few lines of status go.
    """
    t_start = time.perf_counter()
    target = out if out is not None else cfg.out
    if target is None:
        raise ConfigError("generate: no output store; set 'out' in the config or pass --out")
    if client is None and cfg.dask.scheduler is None:
        compute_device(cfg.device)  # the local workers share this node: refuse here, not on each
    path = st.check_store_path(target)
    with st.writer_lock(path):
        return _generate(cfg, path, overwrite, client, echo, t_start)


def _generate(cfg: GenerateConfig, path: Path, overwrite: bool, client: Any | None, echo: Any,
              t_start: float) -> GenerateResult:
    model = cfg.model.build()
    lay = st.layout(cfg, model)
    # θ and splits are cheap (no integration): the driver writes them with the metadata
    theta = theta_paths(model, cfg, range(cfg.trajectories)).numpy()
    resumed, rep = st.prepare(cfg, path, overwrite, theta, split_of(cfg), model)
    # a failure before the first shard puts back the store it replaced
    with rep if rep is not None else contextlib.nullcontext():
        return _fill(cfg, path, resumed, rep, client, echo, t_start, model, lay)


def _fill(cfg: GenerateConfig, path: Path, resumed: bool, rep: st.Replacing | None,
          client: Any | None, echo: Any, t_start: float, model: Any,
          lay: st.Layout) -> GenerateResult:
    """Write the shards ``path`` does not hold yet (``rep``: committed at the first one)."""
    done = st.finished_shards(path) if resumed else {}
    todo = {b: sorted(c for c in range(lay.time_blocks) if (b, c) in done)
            for b in range(lay.blocks)}
    todo = {b: skip for b, skip in todo.items() if len(skip) < lay.time_blocks}
    skipped = lay.shards - sum(lay.time_blocks - len(s) for s in todo.values())
    result = GenerateResult(path, resumed, lay.shards, skipped, 0, 0.0)
    echo(f"generate: {path} ({'resuming, ' if resumed else 'new, '}{skipped} of {lay.shards} shards "
         f"finished) — {cfg.trajectories} trajectories × {cfg.frames} frames of "
         f"{model.name} {int(cfg.model.size)}, {lay.per_shard} trajectories × {lay.shard_frames} "
         f"frames per shard")
    if not todo:
        echo("generate: nothing to do, every shard is recorded as finished")
        result.seconds = time.perf_counter() - t_start
        return result
    with contextlib.ExitStack() as stack:
        if client is None:
            client = stack.enter_context(dask_client(cfg.dask))
        result.workers = len(client.scheduler_info(n_workers=-1)["workers"])
        echo(f"generate: {result.workers} Dask workers; {_describe_dashboard(client, cfg.dask)}")
        _run_tasks(client, cfg, path, lay, todo, result,
                   None if rep is None else rep.committed)
    result.seconds = time.perf_counter() - t_start
    echo(f"generate: wrote {result.shards_written} shards ({result.bytes_written / 2**20:.1f} MiB "
         f"raw) in {result.seconds:.1f} s; {skipped} finished shards skipped")
    if result.refined:
        dt = float(cfg.model.dt)
        listed = ", ".join(f"{j} (dt/{1 << v})" for j, v in sorted(result.refined.items())[:8])
        more = len(result.refined) - 8
        n = len(result.refined)
        echo(f"generate: {n} trajector{'y' if n == 1 else 'ies'} needed a smaller step than "
             f"dt = {dt:g}: {listed}{f' and {more} more' if more > 0 else ''} (recorded in "
             "their shards' markers)")
    return result


def _run_tasks(client: Any, cfg: GenerateConfig, path: Path, lay: st.Layout,
               todo: dict[int, list[int]], result: GenerateResult,
               first_shard: Any = None) -> None:
    from distributed import as_completed

    tag = st.config_hash(cfg)[:10]
    futures = [client.submit(run_block, cfg, str(path), b, skip, key=f"generate-{tag}-block-{b}",
                             retries=0) for b, skip in todo.items()]
    # under dask-mpi the driver is rank 1 and should still show the bar
    with progress(len(todo) * lay.per_shard, "generate", unit="traj", any_rank=True) as bar:
        try:
            for fut in as_completed(futures):
                r = fut.result()
                result.shards_written += len(r["written"])
                if first_shard is not None and r["written"]:
                    first_shard()  # a shard of the new store is in place: the old one goes
                    first_shard = None
                result.solve_s += r["solve_s"]
                result.write_s += r["write_s"]
                result.bytes_written += r["bytes"]
                result.blocks_run.append(r["block"])
                result.refined.update(r["refined"])
                bar.update(lay.per_shard)
        except BaseException:
            client.cancel(futures)
            raise


# --------------------------------------------------------------------------------------------
# verify
@dataclass
class VerifyResult:
    checked: list[int]
    mismatches: list[str]
    shards_done: int
    shards_total: int

    @property
    def ok(self) -> bool:
        return not self.mismatches


def verify(path: str | Path, samples: int = 3, seed: int | None = None) -> VerifyResult:
    """Recompute ``samples`` random finished trajectories alone and compare bit for bit.

    Each sampled trajectory is integrated from its own streams in a batch of one (a member's
    result does not depend on its batch, so this equals the batched run), and every stored array
    and θ is compared exactly; the shards that hold it are re-read and their checksums compared
    with their markers.
    """
    path = Path(path)
    if samples < 1:
        raise ConfigError(f"--samples: {samples}; verify recomputes at least one trajectory")
    cfg = st.store_config(path)
    model = cfg.model.build()
    lay = st.layout(cfg, model)
    status = st.status(path, cfg)
    markers = st.finished_shards(path)
    pool = [j for b in status.complete_blocks for j in lay.block_trajectories(b)]
    rng = random.Random(seed)
    chosen = sorted(rng.sample(pool, min(samples, len(pool))))
    ds = st.open_store(path)
    bad: list[str] = []
    threads = torch.get_num_threads()
    torch.set_num_threads(cfg.dask.threads_per_worker)
    try:
        for j in chosen:
            try:
                bad.extend(_verify_one(cfg, model, lay, ds, markers, j))
            except Exception as exc:  # an unreadable shard is a finding, not a crash of verify
                bad.append(f"trajectory {j}: cannot be read back ({type(exc).__name__}: {exc})")
    finally:
        torch.set_num_threads(threads)
        ds.close()
    # a marker that cannot be read makes its shard count as unfinished (generate redoes it):
    # a finding here, where nothing else would show it
    for name in st.unreadable_markers(path):
        bad.append(f"{st.PROGRESS}/{name}: unreadable shard marker (the shard counts as "
                   "unfinished; `scoreda generate` redoes it)")
    return VerifyResult(chosen, bad, status.shards_done, status.shards_total)


def _verify_one(cfg: GenerateConfig, model: Any, lay: st.Layout, ds: Any,
                markers: dict[tuple[int, int], dict[str, Any]], j: int) -> list[str]:
    """Mismatches of trajectory ``j`` against its recomputation and its shards' markers."""
    bad: list[str] = []
    b = j // lay.per_shard
    want = theta_paths(model, cfg, [j])[0].numpy()
    if not np.array_equal(ds["theta"].isel(trajectory=j).values, want):
        bad.append(f"trajectory {j}: theta differs from its stream")
    for c, bufs, _ in integrate(cfg, [j], model):
        frames = lay.frame_range(c)
        for name, data in bufs.items():
            stored = ds[name].isel(trajectory=j, time=slice(frames.start, frames.stop)).values
            if not np.array_equal(stored, data[0]):
                bad.append(f"trajectory {j}: {name} at frames {frames.start}:{frames.stop} "
                           "differs from the recomputation")
            shard = ds[name].isel(trajectory=slice(b * lay.per_shard, (b + 1) * lay.per_shard),
                                  time=slice(frames.start, frames.stop)).values
            if st.checksum(shard) != markers[(b, c)]["checksums"].get(name):
                bad.append(f"shard ({b}, {c}) of {name}: checksum differs from its marker")
    return bad


# --------------------------------------------------------------------------------------------
# CLI
def generate_config(args: argparse.Namespace) -> GenerateConfig:
    """The config of ``scoreda generate CONFIG`` with command-line overrides applied."""
    path = resolve_config_path(args.config)
    data = dict(load_yaml(path))
    if data.get("stage", "generate") != "generate":
        raise ConfigError(f"{path}: stage: generate needs a 'generate' config "
                          f"(got {data.get('stage')!r})")
    if args.out is not None:
        data["out"] = args.out
    dask_over = {k: v for k, v in (("workers", args.workers), ("scheduler", args.scheduler),
                                   ("dashboard", args.dashboard)) if v is not None}
    if getattr(args, "no_dashboard", False):
        dask_over["dashboard"] = None
    if dask_over:
        data["dask"] = {**(data.get("dask") or {}), **dask_over}
    # as campaign does: with options from the command line, an error may be in one of them
    cfg = validate(data, GenerateConfig, f"{path} (command line)" if dask_over else str(path))
    assert isinstance(cfg, GenerateConfig)
    return cfg


def _cmd_generate(args: argparse.Namespace) -> int:
    from pipeline.runtime import rank, tune_allocator

    world = mpi_world_size()
    try:
        cfg = generate_config(args)
    except ConfigError:
        if world > 1 and rank() != 0:
            return EXIT_BAD_INPUT  # every rank sees the same error; rank 0 reports it
        raise
    tune_allocator()
    client = start_dask_mpi(cfg.dask) if world > 1 else None  # returns on the driver rank only
    try:
        generate(cfg, args.out, overwrite=args.overwrite, client=client,
                 echo=lambda s: print(s, flush=True))
    except IntegrityError as exc:
        print(f"scoreda: error: {exc}", file=sys.stderr)
        return EXIT_FAILED
    finally:
        if client is not None:
            client.close()
    return 0


def _cmd_verify(args: argparse.Namespace) -> int:
    res = verify(args.store, samples=args.samples, seed=args.seed)
    print(f"verify: {args.store}: {res.shards_done} of {res.shards_total} shards finished; "
          f"recomputed trajectories {res.checked or 'none'}")
    for line in res.mismatches:
        print(f"verify: MISMATCH {line}")
    print("verify: " + ("bit-identical" if res.ok else f"{len(res.mismatches)} mismatches"))
    return 0 if res.ok else EXIT_FAILED


def _cmd_export(args: argparse.Namespace) -> int:
    ds = st.export_netcdf(args.store, args.netcdf, args.select, overwrite=args.overwrite)
    dims = ", ".join(f"{k}={v}" for k, v in ds.sizes.items())
    print(f"wrote {args.netcdf} ({dims})")
    return 0


def add_cli(sub: Any) -> None:
    """Register ``generate``, ``verify`` and ``export`` on the ``scoreda`` sub-parsers."""
    g = sub.add_parser(
        "generate", help="generate a trajectory data set into a sharded Zarr v3 store (Dask)",
        description="Integrate many trajectories (θ and initial state from per-trajectory seeds) "
                    "on a Dask cluster and write them into a sharded Zarr v3 store. Re-running "
                    "the same command resumes: finished shards are skipped. Under mpiexec/srun "
                    "with >= 3 ranks it runs on dask-mpi.")
    g.add_argument("config", help="a generate config (file or shipped example name)")
    g.add_argument("--out", help="store path ending in .zarr (overrides the config's 'out')")
    g.add_argument("--overwrite", action="store_true",
                   help="replace an existing store, even one made with another config")
    g.add_argument("--workers", type=int, help="LocalCluster workers (default: config or CPU count)")
    g.add_argument("--scheduler", help="connect to an existing scheduler, e.g. tcp://host:8786")
    dash = g.add_mutually_exclusive_group()
    dash.add_argument("--dashboard", help="dashboard address, e.g. :8787 (needs bokeh)")
    dash.add_argument("--no-dashboard", action="store_true",
                      help="no dashboard (dask.dashboard: null), e.g. where its port is taken")
    g.set_defaults(func=_cmd_generate)

    v = sub.add_parser("verify", help="recompute sampled trajectories of a store, compare bit for bit")
    v.add_argument("store")
    v.add_argument("--samples", type=int, default=3, help="trajectories to recompute (default 3)")
    v.add_argument("--seed", type=int, help="seed of the sample choice (default: random)")
    v.set_defaults(func=_cmd_verify)

    e = sub.add_parser("export", help="export (part of) a store to netCDF4 with CF attributes")
    e.add_argument("store")
    e.add_argument("--netcdf", required=True, metavar="OUT.nc", help="output file")
    e.add_argument("--select", action="append", default=[], metavar="DIM=START:STOP",
                   help="positional selection, e.g. trajectory=0:10, time=0:50:2, split=test "
                        "(repeatable)")
    e.add_argument("--overwrite", action="store_true", help="replace an existing OUT.nc")
    e.set_defaults(func=_cmd_export)
