"""``scoreda surrogate``: an ML surrogate, its EnSF / EnKF-corrected roll-outs, retraining on analyses.

After Bao, Zhang, Tang et al. ("A score filter enhanced data assimilation framework for
data-driven dynamical systems"). The run is a fixed list of *tasks*, each committed on its own:

* ``train:0`` — fit the surrogate (:mod:`kernels.surrogate`) to trajectories of the true model,
  as the regime says (accurate, noisy, insufficient);
* ``evaluate:k`` — on ``rollout.trials`` held-out truths: the one-step error along the truth
  (the ceiling of any roll-out), the plain roll-out from the true initial window (the floor), and
  the roll-out corrected by every filter × observation network of the config (15 + 5 cycles);
  RMSE against lead time for every trial;
* ``retrain:k`` (k = 1 … ``retrain.iterations``) — filter the training-period observations with
  the current surrogate, take the analyses as targets (:func:`kernels.surrogate.analysis_pairs`),
  fine-tune, followed by ``evaluate:k``;
* ``report`` — ``metrics.json``, ``summary.md``, ``leadtime.png``.

Data: made in-process from ``kernels.dynamics`` (the 1-D models are cheap), training trajectory
``j`` from the stream ``(data.seed, "train", j)`` and trial ``i``'s truth from
``(data.seed, "test", i)``: disjoint random starts, each spun up. Nothing is stored but the
models, so every rank (and a resumed run) rebuilds the same tensors.

Processes: plain python, ``mpiexec``/``srun`` or ``torchrun`` (:func:`pipeline.runtime.init_distributed`).
Training splits the global batch into ``training.chunks`` fixed sub-batches; a rank computes the
gradients of its sub-batches, all ranks gather them and add them *in sub-batch order*. Weights
are therefore bit-identical for 1 … ``chunks`` ranks, which a bucketed DDP all-reduce (summing in
an order that depends on the rank count) would not give — and a chaotic roll-out turns a
last-bit weight difference into an O(1) difference of its long-horizon RMSE. Evaluation trials
and the training trajectories filtered for retraining are split over ranks by index; every
random draw is keyed by (seed, purpose, index), so results do not depend on the rank count.

Run directory: ``config.yaml``, ``progress.json`` (atomic: the tasks done), ``models/iter-KK.pt``
(surrogate of iteration k), ``evaluations/iter-KK.json`` (per-trial curves),
``retrain/iter-KK.json`` (analysis-target statistics), ``partial.pt`` (a training task stopped
by a signal), ``logs/``, and at the end ``metrics.json``, ``summary.md``, ``leadtime.png``.

Exit codes: 0 done, 2 bad input, 3 stopped by SIGTERM/SIGUSR1 after a commit (``--resume``).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from kernels.assimilation import FilterSpec, block_range
from kernels.ensf import EnSFSettings
from kernels.observe import ObservationOperator, make_operator
from kernels.streams import generator, stream_seed
from kernels.surrogate import (
    Surrogate,
    add_trajectory_noise,
    analysis_pairs,
    build_surrogate,
    cycle_mask,
    filtered_rollout,
    make_pairs,
    markov_forecast,
    mean_std,
    observe_trajectory,
    one_step_loss,
    perturbed_ensemble,
    rmse_by_lead,
    rollout,
    unrolled_loss,
)
from pipeline.config import (
    ConfigError,
    SurrogateConfig,
    SurrogateFilterConfig,
    dump,
    load_yaml,
    resolve_config_path,
    validate,
)
from pipeline.runtime import StopSignals, init_distributed, progress, rank_logger, tune_allocator
from pipeline.storage import OutputError, Replacing, write_bytes_atomic, write_text_atomic

EXIT_DONE, EXIT_BAD_INPUT, EXIT_STOPPED = 0, 2, 3
CONFIG, PROGRESS, PARTIAL, LOGS = "config.yaml", "progress.json", "partial.pt", "logs"
MODELS, EVALS, RETRAIN = "models", "evaluations", "retrain"
METRICS, SUMMARY, PLOT = "metrics.json", "summary.md", "leadtime.png"
#: a long-horizon RMSE at most this fraction of the plain roll-out's meets the issue's target
TARGET_RATIO = 0.5
#: prefix of the curves of filters run with the true model (rollout.reference)
REFERENCE = "reference:"
F64 = torch.float64


# --------------------------------------------------------------------------------------------
# testing hook
def _die_at(task: str, phase: str) -> None:
    """``SCOREDA_TEST_DIE_AT=TASK:PHASE`` (e.g. ``evaluate:0:written``) makes the process
    ``os._exit(137)`` there; phases: ``written`` (outputs written, not committed), ``committed``."""
    spec = os.environ.get("SCOREDA_TEST_DIE_AT")
    if spec and spec == f"{task}:{phase}":
        os._exit(137)


# --------------------------------------------------------------------------------------------
# tasks and the progress record
def tasks(cfg: SurrogateConfig) -> list[str]:
    """The run's tasks in order: ``train:0, evaluate:0, (retrain:k, evaluate:k)…, report``."""
    out = ["train:0", "evaluate:0"]
    for k in range(1, cfg.retrain.iterations + 1):
        out += [f"retrain:{k}", f"evaluate:{k}"]
    return out + ["report"]


def config_hash(cfg: SurrogateConfig | dict[str, Any]) -> str:
    """Hash of everything that determines the numbers (``threads`` does not). A mapping is hashed
    as read from a run's stored config, so that a key added to the schema after the run started
    (absent from its file, at a default that keeps the old behaviour) does not change the hash."""
    d = dict(cfg) if isinstance(cfg, dict) else cfg.model_dump(mode="json")
    d.pop("threads", None)
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


def read_progress(run_dir: Path) -> dict[str, Any]:
    path = run_dir / PROGRESS
    try:
        rec = json.loads(path.read_text())
        list(rec["done"])
        str(rec["config_hash"])
        return rec
    except FileNotFoundError:
        raise OutputError(f"{path}: missing (not a surrogate run directory?)") from None
    except (OSError, ValueError, KeyError, TypeError):
        raise OutputError(f"{path}: unreadable progress record") from None


def _commit(run_dir: Path, cfg: SurrogateConfig, done: list[str], task: str) -> None:
    _die_at(task, "written")
    write_text_atomic(run_dir / PROGRESS, json.dumps(
        {"done": done, "config_hash": config_hash(cfg), "tasks": tasks(cfg)}, indent=1) + "\n")
    _die_at(task, "committed")


def _save(path: Path, obj: dict[str, Any]) -> None:
    buf = io.BytesIO()
    torch.save(obj, buf)
    write_bytes_atomic(path, buf.getvalue())


def _load(path: Path) -> dict[str, Any]:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise OutputError(f"{path}: missing") from None
    except Exception as exc:  # truncated zip, bad pickle: one clear message
        raise OutputError(f"{path}: unreadable ({type(exc).__name__})") from None


def model_path(run_dir: Path, k: int) -> Path:
    return run_dir / MODELS / f"iter-{k:02d}.pt"


def record_path(run_dir: Path, sub: str, k: int) -> Path:
    """The JSON record of iteration ``k`` in ``sub`` (``EVALS`` or ``RETRAIN``)."""
    return run_dir / sub / f"iter-{k:02d}.json"


def load_surrogate(path: str | Path) -> tuple[Surrogate, dict[str, Any]]:
    """A saved surrogate (``models/iter-KK.pt``) in eval mode and its record."""
    obj = _load(Path(path))
    try:
        net = build_surrogate(**obj["spec"])
        net.load_state_dict(obj["state"])
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:  # spec or weights do not fit
        raise OutputError(f"{path}: not a surrogate this version can build "
                          f"({type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''})"
                          ) from None
    return net.eval(), obj


def check_committed(run_dir: Path, done: list[str]) -> None:
    """Refuse a resume whose committed tasks' outputs cannot be read back (found now, not after
    the remaining tasks have run): the models of train/retrain, the JSON of evaluate/retrain."""
    for task in done:
        kind, _, k = task.partition(":")
        if kind in ("train", "retrain"):
            load_surrogate(model_path(run_dir, int(k)))
        sub = {"evaluate": EVALS, "retrain": RETRAIN}.get(kind)
        if sub is not None:
            path = record_path(run_dir, sub, int(k))
            try:
                json.loads(path.read_text())
            except (OSError, ValueError) as exc:
                raise OutputError(f"{path}: unreadable record of committed task {task} "
                                  f"({type(exc).__name__})") from None


# --------------------------------------------------------------------------------------------
# data
@dataclass
class Data:
    """True trajectories, float64 on the CPU.

    Attributes:
        train: clean training trajectories ``(N, T, *state)`` (all of ``data.trajectories``).
        inputs: what the surrogate trains on ``(N', T', *state)`` (regime applied).
        test: one truth per trial ``(R, H + horizon, *state)``.
        frame_dt: model time per frame.
    """

    train: torch.Tensor
    inputs: torch.Tensor
    test: torch.Tensor
    frame_dt: float


def _trajectories(cfg: SurrogateConfig, purpose: str, count: int, frames: int) -> torch.Tensor:
    """``count`` spun-up trajectories of ``frames`` frames, ``(count, frames, *state)`` float64;
    trajectory ``j`` starts from the stream ``(data.seed, purpose, j)``."""
    model, d = cfg.model.build(), cfg.data
    x0 = torch.cat([model.initial_state(1, generator(d.seed, purpose, j), dtype=F64)
                    for j in range(count)])
    theta = model.truth_theta(count, cfg.model.params, dtype=F64)
    x0 = model.advance(x0, theta, d.spinup, cfg.model.dt)
    return model.rollout(x0, theta, (frames - 1) * d.save_every, save_every=d.save_every,
                         dt=cfg.model.dt)


def store_selection(cfg: SurrogateConfig) -> tuple[Path, str, list[int]]:
    """Check ``data.store`` against the run and pick its training trajectories.

    The store must be a finished ``scoreda generate`` store of the same system sampled the same
    way (model, size, dt, save_every) with the run's true θ on every trajectory (``theta.mode:
    fixed``): the surrogate learns one system and is tested on truths made with that θ.

    Returns:
        the store path, the state array's name and the first ``data.trajectories`` indices of
        its ``train`` split.

    Raises:
        ConfigError (naming ``data.store``) or OutputError (unreadable / unfinished store).
    """
    import numpy as np
    import zarr

    from pipeline.store import SPLIT_NAMES, finished_store_config, layout

    d = cfg.data
    assert d.store is not None
    path = Path(d.store)
    gcfg = finished_store_config(path)

    def bad(msg: str) -> ConfigError:
        return ConfigError(f"data.store: {path}: {msg}")

    g, m = gcfg.model, cfg.model
    if (g.name, int(g.size)) != (m.name, int(m.size)):
        raise bad(f"holds {g.name} size {g.size}, the run is {m.name} size {m.size}")
    if not math.isclose(float(g.dt), float(m.dt), rel_tol=1e-12):
        raise bad(f"model dt {g.dt} differs from model.dt {m.dt}")
    if gcfg.save_every != d.save_every:
        raise bad(f"save_every {gcfg.save_every} differs from data.save_every {d.save_every}")
    if gcfg.theta.mode != "fixed":
        raise bad(f"θ is drawn per trajectory (theta.mode {gcfg.theta.mode}); a surrogate learns "
                  "one system: generate with theta.mode fixed")
    model = m.build()
    truth = model.truth_theta(1, m.params, dtype=F64)[0]
    stored = torch.from_numpy(np.asarray(zarr.open_array(path / "theta", mode="r")[0, 0])).to(F64)
    if not torch.allclose(stored, truth, rtol=1e-6, atol=1e-6):
        raise bad(f"θ {stored.tolist()} differs from the run's truth {truth.tolist()} "
                  f"({', '.join(model.param_names)}; see model.params)")
    if gcfg.frames < d.frames:
        raise bad(f"has {gcfg.frames} frames per trajectory, data.frames asks for {d.frames}")
    codes = np.asarray(zarr.open_array(path / "split", mode="r")[:])
    train = np.nonzero(codes == SPLIT_NAMES.index("train"))[0].tolist()
    if len(train) < d.trajectories:
        raise bad(f"has {len(train)} train-split trajectories, data.trajectories asks for "
                  f"{d.trajectories}")
    spec = next(a for a in layout(gcfg, model).arrays if a.grid == int(g.size))
    return path, spec.name, train[: d.trajectories]


def _store_trajectories(cfg: SurrogateConfig) -> torch.Tensor:
    """The training trajectories from ``data.store``: ``(N, frames, *state)`` float64."""
    import numpy as np
    import zarr

    path, name, idx = store_selection(cfg)
    arr = zarr.open_array(path / name, mode="r")
    frames = cfg.data.frames
    # the selection is sorted and shards hold whole trajectories: one read per trajectory
    try:
        out = np.stack([np.asarray(arr[j, :frames]) for j in idx])
    except (OSError, ValueError, KeyError) as exc:  # a damaged shard (checksum, truncation)
        raise OutputError(f"{path}: cannot read {name} ({exc})") from None
    return torch.from_numpy(out).to(F64)


def make_data(cfg: SurrogateConfig) -> Data:
    d, reg = cfg.data, cfg.regime
    train = (_store_trajectories(cfg) if d.store is not None
             else _trajectories(cfg, "train", d.trajectories, d.frames))
    inputs = train[: reg.trajectories or d.trajectories, : reg.frames or d.frames]
    if reg.kind == "noisy":
        inputs = add_trajectory_noise(inputs, reg.noise_std, d.seed, "target-noise")
    test = _trajectories(cfg, "test", cfg.rollout.trials, cfg.network.history + cfg.rollout.horizon)
    return Data(train, inputs, test, float(cfg.model.dt) * d.save_every)


def operators(cfg: SurrogateConfig) -> dict[str, ObservationOperator]:
    shape = cfg.model.build().state_shape
    return {name: make_operator(o.kind, shape, nonlinearity=o.nonlinearity, **o.options)
            for name, o in cfg.rollout.observations.items()}


def filter_spec(f: SurrogateFilterConfig) -> FilterSpec:
    """The kernel-level analysis of a filter section."""
    e = f.ensf
    settings = EnSFSettings(
        steps=e.steps, eps_alpha=e.eps_alpha, eps_beta=e.eps_beta, estimator=e.estimator,
        mixture_size=e.mixture_size, gm_bandwidth=e.gm_bandwidth, gm_shrink=e.gm_shrink,
        likelihood=e.likelihood, sampler=e.sampler, score_clip=e.score_clip, init=e.init)
    return FilterSpec(method=f.method, inflation=f.inflation, rtps=f.rtps, radius=f.radius,
                      ensf=settings, coupling=e.coupling, ridge=e.ridge, column_chunk=f.column_chunk)


def bounds_of(cfg: SurrogateConfig, data: Data) -> tuple[float, float] | None:
    """Clamp range of filtered members: mean ± ``rollout.bounds`` std of the training inputs."""
    if cfg.rollout.bounds is None:
        return None
    m, s = float(data.inputs.mean()), float(data.inputs.std())
    return m - cfg.rollout.bounds * s, m + cfg.rollout.bounds * s


# --------------------------------------------------------------------------------------------
# process group helpers
class Comm:
    """The few collectives the stage needs, over torch.distributed (a no-op world of one)."""

    def __init__(self, rank: int, size: int) -> None:
        self.rank, self.size = rank, size

    def gather_objects(self, obj: Any) -> list[Any]:
        """Every rank's ``obj`` in rank order, on every rank."""
        if self.size == 1:
            return [obj]
        import torch.distributed as dist

        out: list[Any] = [None] * self.size
        dist.all_gather_object(out, obj)
        return out

    def any(self, flag: bool) -> bool:
        return any(self.gather_objects(bool(flag)))

    def barrier(self) -> None:
        if self.size > 1:
            import torch.distributed as dist

            dist.barrier()

    def agree_error(self, err: BaseException | None) -> None:
        """Every rank raises the lowest rank's error (a bad input on one rank stops all)."""
        msgs = self.gather_objects(None if err is None else str(err))
        first = next((m for m in msgs if m is not None), None)
        if first is not None:
            if err is not None and str(err) == first:
                raise err
            raise OutputError(first)

    def chunk_gradients(self, mine: torch.Tensor, owned: range, total: int) -> torch.Tensor:
        """All ranks' per-chunk vectors ``(total, P)`` in chunk order, from this rank's
        ``mine (len(owned), P)``."""
        if self.size == 1:
            return mine
        import torch.distributed as dist

        width = max(len(block_range(total, self.size, r)) for r in range(self.size))
        send = mine.new_zeros(width, mine.shape[1])
        send[: len(owned)] = mine
        got = [torch.empty_like(send) for _ in range(self.size)]
        dist.all_gather(got, send)
        return torch.cat([got[r][: len(block_range(total, self.size, r))]
                          for r in range(self.size)])


# --------------------------------------------------------------------------------------------
# training with a fixed-order gradient reduction
def _schedule(steps: int, warmup: int):
    def factor(k: int) -> float:
        if k < warmup:
            return (k + 1) / warmup
        return 0.5 * (1.0 + math.cos(math.pi * (k - warmup) / max(steps - warmup, 1)))

    return factor


def train_steps(
    net: Surrogate,
    hist: torch.Tensor,
    targets: torch.Tensor,
    *,
    comm: Comm,
    task: str,
    seed: int,
    steps: int,
    batch_size: int,
    chunks: int,
    lr: float,
    weight_decay: float,
    warmup: int,
    unroll: int,
    grad_clip: float | None,
    stop: StopSignals,
    partial: Path,
) -> torch.Tensor | None:
    """Train ``net`` in place; the global batch of step ``s`` is drawn from the stream
    ``(seed, "batch", task, s)``, split into ``chunks`` fixed sub-batches reduced in order.

    Args:
        net: the surrogate (normalisation set).
        hist: ``(M, H, *state)`` training windows.
        targets: ``(M, K, *state)`` with ``K >= unroll`` (the frame axis is required).
        comm: the process group; rank r computes the sub-batches ``block_range(chunks, R, r)``.
        task: key of the batch streams and of the partial checkpoint.
        stop: the signal flag; when raised, ``partial`` is written and None returned.
        partial: checkpoint of a stopped task (loaded here when it belongs to ``task``).

    Returns:
        the loss of every step ``(steps,)`` float64, or None when stopped by a signal.
    """
    if targets.ndim != hist.ndim or targets.shape[1] < unroll:
        raise ValueError(f"targets must be (M, K >= {unroll}, *state), got {tuple(targets.shape)}")
    params = [p for p in net.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _schedule(steps, warmup))
    losses = torch.zeros(steps, dtype=F64)
    start = 0
    if partial.exists():
        obj = _load(partial)
        if obj.get("task") == task:
            net.load_state_dict(obj["model"])
            opt.load_state_dict(obj["optimizer"])
            sched.load_state_dict(obj["scheduler"])
            start, losses = int(obj["step"]), obj["losses"]
    owned = block_range(chunks, comm.size, comm.rank)
    rows = [block_range(batch_size, chunks, c) for c in range(chunks)]
    net.train()
    with progress(steps, task, initial=start) as bar:
        for s in range(start, steps):
            idx = torch.randint(hist.shape[0], (batch_size,), generator=generator(seed, "batch", task, s))
            mine = []
            for c in owned:
                sel = idx[rows[c].start:rows[c].stop]
                h, t = hist[sel], targets[sel, :unroll]
                loss = one_step_loss(net, h, t) if unroll == 1 else unrolled_loss(net, h, t)
                # a sub-batch's share of the global mean, so the chunk sum is the batch gradient
                loss = loss * (len(sel) / batch_size)
                grads = torch.autograd.grad(loss, params)
                mine.append(torch.cat([g.reshape(-1) for g in grads] + [loss.detach().reshape(1)]))
            flat = torch.stack(mine) if mine else hist.new_zeros(0, sum(p.numel() for p in params) + 1)
            every = comm.chunk_gradients(flat.to(params[0].dtype), owned, chunks)
            total = every[0].clone()
            for c in range(1, chunks):  # fixed order: the same sum for any rank count
                total += every[c]
            pos = 0
            for p in params:
                p.grad = total[pos:pos + p.numel()].view_as(p).clone()
                pos += p.numel()
            if grad_clip is not None:
                torch.nn.utils.clip_grad_norm_(params, grad_clip)
            opt.step()
            sched.step()
            losses[s] = float(total[-1])
            if not math.isfinite(losses[s]):
                raise OutputError(f"{task}: training diverged at step {s} (lower training.lr)")
            bar.update(1)
            if (s + 1) % 10 == 0 and s + 1 < steps and comm.any(stop.requested):
                if comm.rank == 0:
                    _save(partial, {"task": task, "step": s + 1, "model": net.state_dict(),
                                    "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                                    "losses": losses})
                comm.barrier()
                net.eval()
                return None
    net.eval()
    return losses


# --------------------------------------------------------------------------------------------
# evaluation
def evaluate_trial(cfg: SurrogateConfig, net: Surrogate, truth: torch.Tensor, i: int,
                   ops: dict[str, ObservationOperator],
                   bounds: tuple[float, float] | None,
                   reference: bool = False) -> dict[str, list[float]]:
    """RMSE against lead time of one trial, every curve ``(L,)`` as a list.

    Args:
        net: the surrogate, float64, eval mode.
        truth: ``(H + L, *state)`` float64, the trial's true trajectory.
        i: trial index (the key of its random streams: observations, initial ensemble, filters).
        reference: also ``"reference:<filter>/<observation>"``: the same filter, observations,
            initial ensemble and streams with the true model as the forecast, i.e. what the
            observation network allows without any surrogate error.

    Returns:
        ``{"one_step", "plain", "<filter>/<observation>", "spread:<filter>/<observation>"}``.
    """
    ro, h = cfg.rollout, cfg.network.history
    steps = truth.shape[0] - h
    hist, tgt = make_pairs(truth, h)  # (L, H, *state), (L, 1, *state): the true window each step
    with torch.no_grad():
        out = {"one_step": rmse_by_lead(net(hist), tgt[:, 0]),
               "plain": rmse_by_lead(rollout(net, truth[None, :h], steps)[0], truth[h:])}
    ens = perturbed_ensemble(truth[:h], ro.members, ro.spread, stream_seed(cfg.seed, "init", i))
    mask = cycle_mask(steps, ro.assimilate, ro.forecast)
    forecasts: list[tuple[str, Any, float | None]] = [("", net, None)]
    if reference:
        model = cfg.model.build()
        theta = model.truth_theta(1, cfg.model.params, dtype=F64)
        # the true model gets no additive noise: it has no error to stand in for
        forecasts.append((REFERENCE, markov_forecast(model, theta, cfg.data.save_every,
                                                         cfg.model.dt), 0.0))
    for oname, op in ops.items():
        sigma = ro.observations[oname].sigma
        y = observe_trajectory(op, truth[h:], sigma, stream_seed(cfg.seed, "obs", oname, i))
        for prefix, fc, noise in forecasts:
            for fname, f in ro.filters.items():
                res = filtered_rollout(fc, ens, y, op, sigma, filter_spec(f), assimilate=mask,
                                       seed=stream_seed(cfg.seed, "filter", fname, oname, i),
                                       additive_std=f.additive_std if noise is None else noise,
                                       bounds=bounds)
                out[f"{prefix}{fname}/{oname}"] = rmse_by_lead(res.mean, truth[h:])
                out[f"spread:{prefix}{fname}/{oname}"] = res.spread
    return {k: v.tolist() for k, v in out.items()}


def evaluate(cfg: SurrogateConfig, net: Surrogate, data: Data, comm: Comm,
             reference: bool = False) -> dict[str, Any]:
    """Every trial's curves (trials split over ranks by index), gathered in trial order;
    ``reference``: with the true-model curves of :func:`evaluate_trial`."""
    ops, bounds = operators(cfg), bounds_of(cfg, data)
    net64 = build_surrogate(**net.spec).double()
    net64.load_state_dict(net.state_dict())  # roll-outs and filters in float64
    net64.eval()
    mine = block_range(cfg.rollout.trials, comm.size, comm.rank)
    res = [evaluate_trial(cfg, net64, data.test[i], i, ops, bounds, reference) for i in mine]
    trials = [r for part in comm.gather_objects(res) for r in part]
    return {"curves": {k: [t[k] for t in trials] for k in trials[0]}}


def long_horizon(cfg: SurrogateConfig, curves: list[list[float]]) -> torch.Tensor:
    """Per-trial mean RMSE over leads > ``score_from`` steps, ``(R,)`` from ``curves (R, L)``
    (column 0 is lead 1)."""
    start = cfg.rollout.score_from if cfg.rollout.score_from is not None else cfg.rollout.horizon // 2
    return torch.tensor(curves, dtype=F64)[:, start:].mean(1)


# --------------------------------------------------------------------------------------------
# retraining on analyses
def analysis_targets(cfg: SurrogateConfig, net: Surrogate, data: Data, k: int,
                     comm: Comm) -> tuple[torch.Tensor, torch.Tensor, dict[str, float]]:
    """Filter the training-period observations of the first ``retrain.trajectories`` training
    trajectories with ``net`` (split over ranks by trajectory), keep the analyses after
    ``retrain.burn_in`` as targets.

    Returns:
        ``hist (M, H, *state)``, ``targets (M, *state)`` (trajectory order, float64) and
        statistics: pairs, RMSE of the targets against the truth and of the noisy/clean training
        inputs for comparison.
    """
    rt, ro, h = cfg.retrain, cfg.rollout, cfg.network.history
    op = operators(cfg)[rt.observation]
    sigma = ro.observations[rt.observation].sigma
    spec = filter_spec(ro.filters[rt.filter])
    fcfg = ro.filters[rt.filter]
    n_traj = rt.trajectories or cfg.data.trajectories
    frames = rt.frames or cfg.data.frames
    bounds = bounds_of(cfg, data)
    net64 = build_surrogate(**net.spec).double()
    net64.load_state_dict(net.state_dict())
    net64.eval()
    # the first window comes from the data the surrogate sees (noisy in the noisy regime), or the
    # clean one where that regime has no data for this trajectory
    seen = data.inputs
    mine = []
    for j in block_range(n_traj, comm.size, comm.rank):
        truth = data.train[j, :frames]
        start = seen[j, :h] if j < seen.shape[0] else truth[:h]
        # observations are data: the same in every iteration; the filter's noise is not
        y = observe_trajectory(op, truth[h:], sigma, stream_seed(cfg.seed, "retrain-obs", j))
        ens = perturbed_ensemble(start, ro.members, ro.spread, stream_seed(cfg.seed, "retrain-init", k, j))
        mask = cycle_mask(frames - h, ro.assimilate, ro.forecast)
        res = filtered_rollout(net64, ens, y, op, sigma, spec, assimilate=mask,
                               seed=stream_seed(cfg.seed, "retrain-filter", k, j),
                               additive_std=fcfg.additive_std, bounds=bounds)
        keep = res.assimilated & (torch.arange(frames - h) >= rt.burn_in)
        hi, ti = analysis_pairs(ens.mean(0), res.mean, keep)
        err = (res.mean[keep] - truth[h:][keep]).square().sum().item()
        mine.append((j, hi, ti, err, int(keep.sum()) * truth[0].numel()))
    parts = sorted((p for part in comm.gather_objects(mine) for p in part), key=lambda p: p[0])
    hist = torch.cat([p[1] for p in parts])
    targets = torch.cat([p[2] for p in parts])
    count = sum(p[4] for p in parts)
    stats = {"pairs": int(hist.shape[0]), "trajectories": n_traj,
             "target_rmse": math.sqrt(sum(p[3] for p in parts) / max(count, 1))}
    n_in = min(seen.shape[0], n_traj)
    t_in = min(seen.shape[1], frames)
    stats["input_rmse"] = float((seen[:n_in, h:t_in] - data.train[:n_in, h:t_in]).square().mean().sqrt())
    return hist, targets, stats


# --------------------------------------------------------------------------------------------
# report
def summarize(cfg: SurrogateConfig, evals: list[dict[str, Any]],
              retrains: list[dict[str, Any]]) -> dict[str, Any]:
    """``metrics.json``: mean ± std over trials of every curve and long-horizon RMSE, ratios to
    the plain roll-out, the target check and the retraining gain, per iteration."""
    iters = []
    for k, ev in enumerate(evals):
        curves, lh = {}, {}
        for name, rows in ev["curves"].items():
            m, s = mean_std(torch.tensor(rows, dtype=F64))
            curves[name] = {"mean": m.tolist(), "std": s.tolist()}
            if not name.startswith("spread:"):
                v = long_horizon(cfg, rows)
                mm, ss = mean_std(v)
                # the median too: one plain roll-out that blows up (seen: 1e7) rules the mean
                lh[name] = {"mean": float(mm), "std": float(ss), "median": float(v.median()),
                            "trials": v.tolist()}
        plain, plain_med = lh["plain"]["mean"], lh["plain"]["median"]
        for rec in lh.values():
            rec["ratio_to_plain"] = rec["mean"] / plain if plain > 0 else float("nan")
            rec["median_ratio_to_plain"] = (rec["median"] / plain_med if plain_med > 0
                                            else float("nan"))
        iters.append({"iteration": k, "curves": curves, "long_horizon": lh,
                      "retrain": retrains[k - 1] if k > 0 else None})
    # filtered surrogate roll-outs (the reference curves exist at iteration 0 only)
    names = [n for n in iters[0]["long_horizon"] if "/" in n and not n.startswith(REFERENCE)]
    first = iters[0]["long_horizon"]
    gain = {n: [it["long_horizon"][n]["mean"] / first[n]["mean"] for it in iters]
            for n in ["plain", *names]}
    last = iters[-1]["long_horizon"]
    # met only when both the mean and the median over trials are within the target ratio
    targets = {n: {"ratio": last[n]["ratio_to_plain"],
                   "median_ratio": last[n]["median_ratio_to_plain"],
                   "met": bool(max(last[n]["ratio_to_plain"], last[n]["median_ratio_to_plain"])
                               <= TARGET_RATIO)}
               for n in names}
    start = cfg.rollout.score_from if cfg.rollout.score_from is not None else cfg.rollout.horizon // 2
    return {"model": cfg.model.name, "size": cfg.model.size, "regime": cfg.regime.kind,
            "trials": cfg.rollout.trials, "horizon": cfg.rollout.horizon,
            "long_horizon_from_lead": start + 1, "target_ratio": TARGET_RATIO,
            "iterations": iters, "targets_final": targets, "retrain_gain": gain,
            "config_hash": config_hash(cfg)}


def summary_lines(met: dict[str, Any]) -> list[str]:
    """A few lines for the terminal and the demo: long-horizon RMSE, ratios, retraining gain."""
    last = met["iterations"][-1]["long_horizon"]
    first = met["iterations"][0]["long_horizon"]
    lines = [f"{met['model']} d={met['size']} ({met['regime']}), {met['trials']} trials, RMSE over "
             f"leads {met['long_horizon_from_lead']}-{met['horizon']}: plain roll-out "
             f"{first['plain']['mean']:.3f} ± {first['plain']['std']:.3f}"]
    for name, rec in first.items():
        if "/" in name:
            lines.append(f"  {name}: {rec['mean']:.3f} ± {rec['std']:.3f} "
                         f"({rec['ratio_to_plain']:.2f}x plain, target <= {met['target_ratio']})")
    if len(met["iterations"]) > 1:
        parts = [f"{n} {' -> '.join(f'{g:.2f}' for g in gs)}" for n, gs in met["retrain_gain"].items()]
        lines.append("  retraining (long-horizon RMSE / iteration 0): " + "; ".join(parts))
        lines.append(f"  after {len(met['iterations']) - 1} retraining iterations: plain "
                     f"{last['plain']['mean']:.3f}")
    return lines


def write_summary(run_dir: Path, cfg: SurrogateConfig, met: dict[str, Any]) -> None:
    its = met["iterations"]
    names = list(its[0]["long_horizon"])
    out = [f"# Surrogate run: {cfg.model.name} d={cfg.model.size}, regime {cfg.regime.kind}", "",
           f"{cfg.rollout.trials} trials, horizon {cfg.rollout.horizon} surrogate steps "
           f"({cfg.rollout.assimilate} assimilation + {cfg.rollout.forecast} forecast-only per "
           f"cycle), {cfg.rollout.members} members. Long-horizon RMSE = mean RMSE over leads "
           f"{met['long_horizon_from_lead']}–{cfg.rollout.horizon}, mean ± std over trials; "
           f"ratio = to the plain roll-out of the same iteration (target ≤ {TARGET_RATIO}).", "",
           "| iteration | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for it in its:
        cells = [(f"{it['long_horizon'][n]['mean']:.3f} ± {it['long_horizon'][n]['std']:.3f}"
                  + (f" ({it['long_horizon'][n]['ratio_to_plain']:.2f}×)" if "/" in n else ""))
                 if n in it["long_horizon"] else "—" for n in names]
        out.append(f"| {it['iteration']} | " + " | ".join(cells) + " |")
    out += ["", "`one_step`: error of one step from the true window (the ceiling); `plain`: "
            "free roll-out from the true initial window (the floor); `F/O`: roll-out corrected "
            "by filter F with observation network O; `reference:F/O`: the same filter and "
            "observations with the true model as the forecast (iteration 0 only), what the "
            "observation network allows without surrogate error.", ""]
    if len(its) > 1:
        out += ["## Retraining on analyses", "",
                "| iteration | pairs | target RMSE | training-input RMSE | "
                + " | ".join(f"{n} gain" for n in met["retrain_gain"]) + " |",
                "|---" * (4 + len(met["retrain_gain"])) + "|"]
        for it in its[1:]:
            r = it["retrain"]
            gains = [f"{met['retrain_gain'][n][it['iteration']]:.2f}" for n in met["retrain_gain"]]
            out.append(f"| {it['iteration']} | {r['pairs']} | {r['target_rmse']:.3f} | "
                       f"{r['input_rmse']:.3f} | " + " | ".join(gains) + " |")
        out += ["", "gain = long-horizon RMSE / iteration 0's (< 1: retraining helped).", ""]
    out += ["## Targets (last iteration)", ""]
    for n, t in met["targets_final"].items():
        out.append(f"- {n}: {t['ratio']:.2f}× plain (median over trials {t['median_ratio']:.2f}×) — "
                   f"{'met' if t['met'] else 'NOT met'}")
    write_text_atomic(run_dir / SUMMARY, "\n".join(out) + "\n")


def plot(run_dir: Path, met: dict[str, Any], frame_dt: float) -> Path:
    """``leadtime.png``: RMSE vs lead time per iteration (mean ± std bands) and the long-horizon
    RMSE against the retraining iteration."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    its = met["iterations"]
    panels = len(its) + (1 if len(its) > 1 else 0)
    fig, axes = plt.subplots(1, panels, figsize=(5.2 * panels, 4), dpi=110, squeeze=False)
    axes = axes[0]
    names = [n for n in its[0]["curves"] if not n.startswith("spread:")]
    color = {n: f"C{i % 10}" for i, n in enumerate(names)}  # one colour per curve in every panel
    for ax, it in zip(axes, its, strict=False):
        for name, c in it["curves"].items():
            if name.startswith("spread:"):
                continue
            m, s = torch.tensor(c["mean"]), torch.tensor(c["std"])
            lead = (torch.arange(len(m)) + 1) * frame_dt
            ls = ":" if name == "one_step" else "-"
            ax.semilogy(lead, m, ls, lw=1.2, color=color[name], label=name)
            ax.fill_between(lead, (m - s).clamp_min(1e-6), m + s, color=color[name], alpha=0.2)
        ax.set_title(f"iteration {it['iteration']}")
        ax.set_xlabel("lead time")
        ax.set_ylabel("RMSE")
        ax.legend(fontsize=7)
    if len(its) > 1:
        ax = axes[-1]
        for name in names[1:]:  # not one_step; the reference exists at iteration 0 only
            if name.startswith(REFERENCE):
                continue
            m = [it["long_horizon"][name]["mean"] for it in its]
            s = [it["long_horizon"][name]["std"] for it in its]
            ax.errorbar(range(len(its)), m, yerr=s, marker="o", capsize=3, color=color[name],
                        label=name)
        ax.set_yscale("log")
        ax.set_xlabel("retraining iteration")
        ax.set_xticks(range(len(its)))
        ax.set_ylabel("long-horizon RMSE")
        ax.legend(fontsize=7)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    write_bytes_atomic(run_dir / PLOT, buf.getvalue())
    return run_dir / PLOT


# --------------------------------------------------------------------------------------------
# the run
class Run:
    """One rank's view of a run directory."""

    def __init__(self, cfg: SurrogateConfig, run_dir: Path, comm: Comm) -> None:
        self.cfg, self.run_dir, self.comm = cfg, run_dir, comm
        # rank 0: called after the first task's commit (the run it replaces goes then)
        self.after_commit: Any = None
        self.data = make_data(cfg)
        self.log = rank_logger(run_dir / LOGS, comm.rank, "scoreda.surrogate")

    def _json(self, sub: str, k: int) -> Path:
        return record_path(self.run_dir, sub, k)

    def _save_model(self, net: Surrogate, k: int, losses: torch.Tensor) -> None:
        if self.comm.rank == 0:
            _save(model_path(self.run_dir, k), {"spec": net.spec, "state": net.state_dict(),
                                                "iteration": k, "losses": losses})
            (self.run_dir / PARTIAL).unlink(missing_ok=True)

    def _pairs(self) -> tuple[torch.Tensor, torch.Tensor]:
        dtype = getattr(torch, self.cfg.dtype)
        hist, tgt = make_pairs(self.data.inputs, self.cfg.network.history, self.cfg.training.unroll)
        return hist.to(dtype), tgt.to(dtype)

    def _fit(self, net: Surrogate, hist: torch.Tensor, tgt: torch.Tensor, task: str, steps: int,
             lr: float, warmup: int, unroll: int, stop: StopSignals) -> torch.Tensor | None:
        t = self.cfg.training
        return train_steps(net, hist, tgt, comm=self.comm, task=task, seed=self.cfg.seed,
                           steps=steps, batch_size=t.batch_size, chunks=t.chunks, lr=lr,
                           weight_decay=t.weight_decay, warmup=warmup, unroll=unroll,
                           grad_clip=t.grad_clip, stop=stop, partial=self.run_dir / PARTIAL)

    def do(self, task: str, stop: StopSignals) -> bool:
        """Run one task and write its outputs (rank 0); False when stopped inside it."""
        cfg, kind = self.cfg, task.split(":")[0]
        k = int(task.split(":")[1]) if ":" in task else -1
        if kind == "train":
            dtype = getattr(torch, cfg.dtype)
            torch.manual_seed(stream_seed(cfg.seed, "init-weights"))  # the only global draw
            net = build_surrogate(cfg.network.kind, history=cfg.network.history,
                                  size=int(cfg.model.size), **cfg.network.options).to(dtype)
            net.fit_normalization(self.data.inputs.to(dtype))
            hist, tgt = self._pairs()
            t = cfg.training
            losses = self._fit(net, hist, tgt, task, cfg.regime.steps or t.steps, t.lr, t.warmup,
                               t.unroll, stop)
            if losses is None:
                return False
            self._save_model(net, 0, losses)
            return True
        if kind == "evaluate":
            net, _ = load_surrogate(model_path(self.run_dir, k))
            # the true-model reference does not change with the surrogate: once, at iteration 0
            ev = evaluate(cfg, net, self.data, self.comm, cfg.rollout.reference and k == 0)
            if self.comm.rank == 0:
                write_text_atomic(self._json(EVALS, k), json.dumps(ev))
            return True
        if kind == "retrain":
            net, _ = load_surrogate(model_path(self.run_dir, k - 1))
            hist_a, tgt_a, stats = analysis_targets(cfg, net, self.data, k, self.comm)
            dtype = net.mean.dtype
            hist, tgt = hist_a.to(dtype), tgt_a.to(dtype).unsqueeze(1)  # (M, 1, *state)
            if cfg.retrain.include_data:
                h0, t0 = self._pairs()
                hist, tgt = torch.cat([h0, hist]), torch.cat([t0[:, :1], tgt])
            losses = self._fit(net, hist, tgt, task, cfg.retrain.steps, cfg.retrain.lr, 0, 1, stop)
            if losses is None:
                return False
            self._save_model(net, k, losses)
            if self.comm.rank == 0:
                stats["final_loss"] = float(losses[-max(1, len(losses) // 10):].mean())
                write_text_atomic(self._json(RETRAIN, k), json.dumps(stats))
            return True
        assert kind == "report"
        if self.comm.rank == 0:
            self.report()
        return True

    def report(self) -> dict[str, Any]:
        cfg = self.cfg
        evals = [json.loads(self._json(EVALS, k).read_text())
                 for k in range(cfg.retrain.iterations + 1)]
        retrains = [json.loads(self._json(RETRAIN, k).read_text())
                    for k in range(1, cfg.retrain.iterations + 1)]
        met = summarize(cfg, evals, retrains)
        write_text_atomic(self.run_dir / METRICS, json.dumps(met, indent=1) + "\n")
        write_summary(self.run_dir, cfg, met)
        plot(self.run_dir, met, self.data.frame_dt)
        return met

    def run(self) -> int:
        cfg, comm = self.cfg, self.comm
        done = list(read_progress(self.run_dir)["done"])
        todo = [t for t in tasks(cfg) if t not in done]
        self.log.info("start: %d of %d tasks done, %d ranks", len(done), len(tasks(cfg)), comm.size)
        with StopSignals() as stop:
            for task in todo:
                t0 = time.perf_counter()
                if not self.do(task, stop):
                    return self._stopped(task)
                done.append(task)
                if comm.rank == 0:
                    _commit(self.run_dir, cfg, done, task)
                    if self.after_commit is not None:
                        self.after_commit()
                        self.after_commit = None
                comm.barrier()
                self.log.info("%s committed in %.1f s", task, time.perf_counter() - t0)
                if task != todo[-1] and comm.any(stop.requested):
                    return self._stopped(task)
        return EXIT_DONE

    def _stopped(self, task: str) -> int:
        if self.comm.rank == 0:
            print(f"surrogate: stopped by signal in/after {task}; resume with "
                  f"`scoreda surrogate --resume {self.run_dir}` (exit {EXIT_STOPPED})", flush=True)
        return EXIT_STOPPED


def _setup(cfg: SurrogateConfig) -> Comm:
    torch.set_num_threads(cfg.threads)
    return Comm(*init_distributed("cpu"))


def start(cfg: SurrogateConfig, run_dir: str | Path, overwrite: bool = False) -> int:
    """Create ``run_dir`` and run every task."""
    run_dir = Path(run_dir)
    comm = _setup(cfg)
    err = None
    if comm.rank == 0 and run_dir.exists() and not overwrite:
        err = OutputError(f"{run_dir}: exists (use --overwrite or `scoreda surrogate --resume`)")
    if comm.rank == 0 and err is None and cfg.data.store is not None:
        try:  # a bad store is refused before the run directory is touched
            store_selection(cfg)
        except (ConfigError, OutputError) as exc:
            err = exc
    rep = None
    if comm.rank == 0 and err is None:
        try:
            rep = Replacing(run_dir, overwrite)  # an earlier run stays until it commits a task
        except OSError as exc:
            err = OutputError(f"{run_dir}: cannot set the earlier run aside ({exc})")
    comm.agree_error(err)
    with rep if rep is not None else contextlib.nullcontext():
        if comm.rank == 0:
            for sub in (MODELS, EVALS, RETRAIN):
                (run_dir / sub).mkdir(parents=True)
            write_text_atomic(run_dir / CONFIG, dump(cfg))
            write_text_atomic(run_dir / PROGRESS, json.dumps(
                {"done": [], "config_hash": config_hash(cfg), "tasks": tasks(cfg)}, indent=1) + "\n")
        comm.barrier()
        run = Run(cfg, run_dir, comm)
        run.after_commit = rep.committed if rep is not None else None
        return run.run()


def load_surrogate_config(path: str | Path) -> SurrogateConfig:
    path = resolve_config_path(str(path))
    cfg = validate(load_yaml(path), SurrogateConfig, str(path))
    assert isinstance(cfg, SurrogateConfig)
    return cfg


def resume(run_dir: str | Path) -> int:
    """Continue a run after its last committed task (a stopped training continues mid-way)."""
    run_dir = Path(run_dir)
    if not (run_dir / CONFIG).is_file():
        raise OutputError(f"{run_dir}: not a surrogate run directory (no {CONFIG})")
    cfg = load_surrogate_config(run_dir / CONFIG)
    comm = _setup(cfg)
    err = None
    try:
        rec = read_progress(run_dir)
        # the file as written, not its re-validation: that would gain the keys added since
        if rec["config_hash"] != config_hash(load_yaml(run_dir / CONFIG)):
            raise OutputError(f"{run_dir / CONFIG}: changed since the run started")
        check_committed(run_dir, list(rec["done"]))
    except OutputError as exc:
        err = exc
    comm.agree_error(err)
    return Run(cfg, run_dir, comm).run()


def read_metrics(run_dir: str | Path) -> dict[str, Any]:
    path = Path(run_dir) / METRICS
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise OutputError(f"{path}: missing (run not finished?)") from None


def add_cli(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("surrogate", help="ML surrogate: train, EnSF/EnKF-corrected roll-outs, "
                                         "retraining on analyses",
                       description="Train a surrogate of lorenz96 / kdv, evaluate plain and "
                                   "filtered roll-outs, retrain on analyses; runs under plain "
                                   "python, mpiexec, srun or torchrun. Exit codes: 0 done, 2 bad "
                                   "input, 3 stopped by a signal (resume with --resume RUN_DIR).")
    p.add_argument("config", nargs="?", help="surrogate config: file or shipped example name")
    p.add_argument("--run-dir", help="run directory to create")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue this run after its last commit")
    p.add_argument("--overwrite", action="store_true", help="replace an existing run directory")
    p.set_defaults(func=_cmd)


def _cmd(args: argparse.Namespace) -> int:
    tune_allocator()
    if args.resume:
        if args.config or args.run_dir:
            raise ConfigError("--resume takes the run directory alone (no config, no --run-dir)")
        code, run_dir = resume(args.resume), Path(args.resume)
    else:
        if not args.config or not args.run_dir:
            raise ConfigError("surrogate needs CONFIG and --run-dir (or --resume RUN_DIR)")
        code, run_dir = start(load_surrogate_config(args.config), args.run_dir, args.overwrite), \
            Path(args.run_dir)
    if code == EXIT_DONE and init_distributed("cpu")[0] == 0:
        for line in summary_lines(read_metrics(run_dir)):
            print(line)
    return code
