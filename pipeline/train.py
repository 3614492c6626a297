"""``scoreda train``: a window denoiser (score network) on the trajectory store, DDP over ranks.

The network learns the joint prior of W = 2k + 1 consecutive saved states *and* their parameters
θ (in the unconstrained space; static per trajectory or a random walk, as the store was made):
the self-organizing augmentation of SDA. Denoising score matching in the ε parameterisation
(:func:`kernels.score.dsm_loss`) under the variance-preserving cosine schedule.

Data: :class:`WindowSource` reads windows ``(trajectory, start)`` of the chosen split straight
from the Zarr store through a bounded cache of decoded chunks; each rank reads only the windows
of its own rows of the global batch. The order is a pure function of the step — epoch
``e = step // batches_per_epoch`` uses the permutation keyed ``(seed, "epoch", e)`` — and so
is the noise (``(seed, "noise", step)`` draws the whole global batch's ``t`` and ε; a rank keeps
its rows). So R processes see exactly the samples and noise one process sees on the concatenated
batch, and a resumed run repeats the uninterrupted one: the sampler's position *is* the step.

Processes: plain python (one), ``torchrun``, ``mpiexec`` or ``srun`` — the launcher is found by
:func:`pipeline.runtime.init_distributed`; DDP with gloo on CPU, NCCL on CUDA; optional bf16
autocast on CUDA. AdamW, linear warm-up + cosine decay, gradient clipping, EMA weights.

Run directory: ``config.yaml`` (resolved), ``progress.json`` (atomic: last checkpointed step),
``checkpoints/step-SSSSSSSS.pt`` (model, EMA, optimizer, scheduler, step; atomic, every
``checkpoint_every`` steps and on SIGTERM/SIGUSR1, last ``keep_checkpoints`` kept; loaded with
``weights_only=True``), ``metrics.jsonl`` (training and validation records), ``loss.png``,
``model.pt`` (the EMA denoiser and everything needed to rebuild it, at the end), ``logs/``.

Exit codes: 0 done, 2 bad input, 3 stopped by a signal or ``--until`` after a checkpoint
(resumable with ``scoreda train --resume RUN_DIR``).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import math
import os
import re
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kernels.assimilation import block_range
from kernels.score import Normalizer, VPSchedule, WindowDenoiser, build_network, dsm_loss, trajectory_eps
from kernels.score.denoiser import denoising_error
from kernels.score.sda import EpsFn
from kernels.streams import generator
from pipeline.config import ConfigError, TrainConfig, dump, load_yaml, resolve_config_path, validate
from pipeline.runtime import (
    StopSignals,
    compute_device,
    init_distributed,
    progress,
    rank_logger,
    tune_allocator,
)
from pipeline.storage import OutputError, Replacing, write_bytes_atomic, write_text_atomic

EXIT_DONE, EXIT_BAD_INPUT, EXIT_STOPPED = 0, 2, 3
CONFIG, PROGRESS, CHECKPOINTS, LOGS = "config.yaml", "progress.json", "checkpoints", "logs"
METRICS, MODEL, LOSS_PNG = "metrics.jsonl", "model.pt", "loss.png"
#: keys that may change on resume: they do not change any number of the run
MUTABLE_KEYS = ("checkpoint_every", "keep_checkpoints", "log_every", "validate_every", "cache_mb")
_CKPT = re.compile(r"^step-(\d{8})\.pt$")
SPLITS = {"train": 0, "valid": 1, "test": 2}


# --------------------------------------------------------------------------------------------
# data
class WindowSource:
    """Windows of W consecutive saved states of one split of a trajectory store.

    Args:
        cfg: the training config (store, grid, params, window, cache).
        split: ``"train"``, ``"valid"`` or ``"test"``.

    Attributes:
        channels, spatial: state layout ``(C, *spatial)`` of one saved state.
        param_names: θ channels, in the order of the θ axis.
        index: ``(n_windows, 2)`` int64 ``[trajectory, first frame]``.
    """

    def __init__(self, cfg: TrainConfig, split: str) -> None:
        import zarr

        from pipeline.store import finished_store_config, layout

        store = Path(cfg.store)
        gcfg = finished_store_config(store)
        model = gcfg.model.build()
        lay = layout(gcfg, model)
        grid = cfg.grid or lay.grids[0]
        if grid not in lay.grids:
            raise ConfigError(f"grid: the store has grids {list(lay.grids)}, not {grid}")
        specs = [a for a in lay.arrays if a.grid == grid]

        def read(name: str) -> Any:
            try:
                return zarr.open_array(store / name, mode="r")
            except (OSError, ValueError, KeyError) as exc:  # missing or damaged metadata
                raise OutputError(f"{store}: cannot open {name} ({type(exc).__name__}: "
                                  f"{str(exc).splitlines()[0] if str(exc) else ''})") from None

        self.arrays = [read(a.name) for a in specs]
        self.names = [a.name for a in specs]
        self.model_name, self.grid, self.model_cfg = gcfg.model.name, grid, gcfg.model
        self.theta_mode = gcfg.theta.mode
        self.channels, self.spatial = len(specs), tuple(specs[0].shape[2:])
        self.frames, self.chunk_frames = gcfg.frames, gcfg.store.chunk_frames
        self.dt_frames = gcfg.model.dt * gcfg.save_every
        self.window = cfg.window
        theta = torch.from_numpy(np.asarray(read("theta")[:]))
        self.theta_natural = theta.to(torch.float64)  # (T, F, P_all), every parameter
        u = model.to_unconstrained(self.theta_natural)  # (T, F, P_all)
        names = list(model.param_names)
        if cfg.params is None:
            varies = u.reshape(-1, len(names)).std(0) > 0
            self.param_names = [n for n, v in zip(names, varies.tolist(), strict=True) if v]
        else:
            unknown = [p for p in cfg.params if p not in names]
            if unknown:
                raise ConfigError(f"params: {self.model_name} has no parameter {unknown[0]!r} "
                                  f"(has {names})")
            self.param_names = list(cfg.params)
        self.theta_u = u[..., [names.index(p) for p in self.param_names]].to(torch.float32)
        split_codes = np.asarray(read("split")[:])
        trajs = np.nonzero(split_codes == SPLITS[split])[0]
        per = self.frames - cfg.window + 1
        if per < 1:
            raise ConfigError(f"window: {cfg.window} is longer than the store's {self.frames} frames")
        if len(trajs) == 0:
            raise OutputError(f"{store}: the store has no {split} trajectories")
        starts = np.arange(per)
        self.index = np.stack([np.repeat(trajs, per), np.tile(starts, len(trajs))], 1).astype(np.int64)
        self._cache: OrderedDict[tuple[int, int, int], np.ndarray] = OrderedDict()
        self._cache_bytes, self._cache_max = 0, cfg.cache_mb << 20

    def __len__(self) -> int:
        return len(self.index)

    def _chunk(self, ch: int, traj: int, c: int) -> np.ndarray:
        key = (ch, traj, c)
        hit = self._cache.get(key)
        if hit is not None:
            self._cache.move_to_end(key)
            return hit
        a = self.arrays[ch]
        block = np.asarray(a[traj, c * self.chunk_frames:(c + 1) * self.chunk_frames])
        if block.nbytes <= self._cache_max:
            self._cache[key] = block
            self._cache_bytes += block.nbytes
            while self._cache_bytes > self._cache_max:
                _, old = self._cache.popitem(last=False)
                self._cache_bytes -= old.nbytes
        return block

    def read(self, rows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """Windows ``rows`` (indices into :attr:`index`) → state ``(B, W, C, *spatial)`` float32
        and θ ``(B, W, P)`` (unconstrained)."""
        w, cf = self.window, self.chunk_frames
        out = np.empty((len(rows), w, self.channels, *self.spatial), dtype=np.float32)
        for b, row in enumerate(rows):
            traj, t0 = (int(v) for v in self.index[row])
            for ch in range(self.channels):
                pos = 0
                for c in range(t0 // cf, (t0 + w - 1) // cf + 1):  # one or two chunks
                    blk = self._chunk(ch, traj, c)
                    lo, hi = max(t0, c * cf) - c * cf, min(t0 + w, (c + 1) * cf) - c * cf
                    out[b, pos:pos + hi - lo, ch] = blk[lo:hi]
                    pos += hi - lo
        idx = torch.from_numpy(self.index[rows])
        frames = idx[:, 1:2] + torch.arange(w)  # (B, W)
        theta = self.theta_u[idx[:, 0:1], frames]
        return torch.from_numpy(out), theta

    def stats(self, max_trajectories: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
        """All frames of the first ``max_trajectories`` trajectories: state ``(T, F, C, *sp)``
        and θ ``(T, F, P)`` (for the normaliser; the same on every rank)."""
        trajs = np.unique(self.index[:, 0])[:max_trajectories]
        state = np.stack([np.stack([np.asarray(a[int(t)]) for a in self.arrays], 1) for t in trajs])
        return torch.from_numpy(state.astype(np.float32)), self.theta_u[torch.from_numpy(trajs)]


class Sampler:
    """The global batch of a step: a pure function of ``(seed, step)`` (module docstring)."""

    def __init__(self, n_windows: int, batch: int, seed: int) -> None:
        if n_windows < batch:
            raise ConfigError(f"batch_size: {batch} is more than the {n_windows} training windows")
        self.n, self.batch, self.seed = n_windows, batch, seed
        self.per_epoch = n_windows // batch
        self._epoch, self._perm = -1, torch.empty(0, dtype=torch.int64)

    def position(self, step: int) -> tuple[int, int]:
        """``(epoch, batch within the epoch)`` of ``step``."""
        return divmod(step, self.per_epoch)

    def batch_rows(self, step: int) -> np.ndarray:
        epoch, b = self.position(step)
        if epoch != self._epoch:
            self._perm = torch.randperm(self.n, generator=generator(self.seed, "epoch", epoch))
            self._epoch = epoch
        return self._perm[b * self.batch:(b + 1) * self.batch].numpy()


def global_noise(seed: int, step: int, batch: int, state_shape: tuple[int, ...],
                 theta_shape: tuple[int, ...], shared_theta: bool = False,
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``t (B,)``, ε_state ``(B, *state_shape)``, ε_θ ``(B, *theta_shape)`` of a whole global
    batch from the stream ``(seed, "noise", step)`` (the order of ``draw_noise``).

    ``shared_theta``: one θ noise per window, the same at all W frames of ``theta_shape =
    (W, P)`` (a static θ is sampled as one vector shown to every frame: kernels.score.sda)."""
    g = generator(seed, "noise", step)
    t = torch.rand(batch, generator=g)
    ns = torch.randn((batch, *state_shape), generator=g)
    if shared_theta:
        nt = torch.randn((batch, 1, *theta_shape[1:]), generator=g).expand(batch, *theta_shape)
    else:
        nt = torch.randn((batch, *theta_shape), generator=g)
    return t, ns, nt


# --------------------------------------------------------------------------------------------
# model
def build_denoiser(spec: dict[str, Any]) -> WindowDenoiser:
    """A :class:`WindowDenoiser` from the description saved in checkpoints and ``model.pt``."""
    net = build_network(spec["kind"], window=spec["window"], channels=spec["channels"],
                        spatial=tuple(spec["spatial"]), n_params=len(spec["params"]),
                        **spec["options"])
    norm = Normalizer(spec["channels"], len(spec["params"]), len(spec["spatial"]))
    return WindowDenoiser(net, norm, VPSchedule(spec["eta"], spec.get("theta_lag", 1.0)))


def model_spec(cfg: TrainConfig, src: WindowSource) -> dict[str, Any]:
    """What rebuilds and describes the model: network, data layout, the θ noise of training and
    θ's training prior (mean and std of the unconstrained θ over the train split's frames)."""
    shared = cfg.theta_noise == "shared"
    trajs = torch.from_numpy(np.unique(src.index[:, 0]))
    prior = src.theta_u[trajs].double().flatten(0, 1)  # (frames, P); P may be 0
    mean = prior.mean(0)
    std = (prior - mean).square().mean(0).sqrt()  # population std (torch warns on P = 0)
    return {"kind": cfg.network.kind, "options": dict(cfg.network.options), "window": cfg.window,
            "channels": src.channels, "spatial": list(src.spatial), "params": src.param_names,
            "eta": cfg.eta, "theta_lag": cfg.theta_lag, "model": src.model_name,
            "model_config": src.model_cfg.model_dump(mode="json"),
            "grid": src.grid, "variables": src.names, "dt_frames": src.dt_frames,
            "theta_noise": "shared" if shared else "per_frame",
            "theta_prior": {"mean": mean.tolist(), "std": std.tolist()}}


def theta_prior_normalised(
    den: WindowDenoiser, spec: dict[str, Any]
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The shared composition's prior ``(mean (P,), std (P,))`` of normalised θ for a model
    trained with shared θ noise (kernels.score.sda.composed_eps); None for any other model."""
    if spec.get("theta_noise") != "shared" or not spec["params"]:
        return None
    return den.normalizer.encode_theta_gaussian(torch.tensor(spec["theta_prior"]["mean"]),
                                                torch.tensor(spec["theta_prior"]["std"]))


def composed_model_eps(den: WindowDenoiser, spec: dict[str, Any], static_theta: bool,
                       composition: str, field: str, evidence_scale: float = 1.0) -> EpsFn:
    """The trajectory noise predictor (kernels.score.sda.trajectory_eps) of a trained model.

    A model trained with shared θ noise takes a static θ through the shared composition
    (``composition`` must be ``auto``); a per-frame model takes ``pooled`` (also for ``auto``)
    or ``evidence``; ``evidence_scale`` tempers the windows' θ evidence of either (not the
    pooled mean, which has none). ``field`` names the config section in errors (``sda``,
    ``filter.sda``).
    """
    w = int(spec["window"])
    prior = theta_prior_normalised(den, spec)
    if prior is None:
        if evidence_scale != 1.0 and not (static_theta and composition == "evidence"):
            raise ConfigError(f"{field}.theta_evidence_scale: only the shared and evidence "
                              "compositions of a static θ weight windows' evidence (leave it 1)")
        return trajectory_eps(den.eps, w, static_theta=static_theta,
                              schedule=den.schedule if composition == "evidence" else None,
                              evidence_scale=evidence_scale)
    if not static_theta:
        raise ConfigError(f"{field}.static_theta: the model was trained with one θ noise per "
                          "window (theta_noise: shared) and samples only a static θ")
    if composition != "auto":
        raise ConfigError(f"{field}.theta_composition: {composition} is for models trained with "
                          "per-frame θ noise; this one shares it (use auto)")
    return trajectory_eps(den.eps, w, static_theta=True, schedule=den.schedule, theta_prior=prior,
                          evidence_scale=evidence_scale)


def load_model(path: str | Path, device: str | torch.device = "cpu") -> tuple[WindowDenoiser, dict[str, Any]]:
    """The trained EMA denoiser of a run's ``model.pt`` (or the file itself) and its spec."""
    path = Path(path)
    if path.is_dir():
        path = path / MODEL
    obj = _load(path)
    try:
        den = build_denoiser(obj["spec"])
        den.load_state_dict(obj["ema"])
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:  # a spec or weights that do not fit
        raise OutputError(f"{path}: not a model this version can build ({type(exc).__name__}: "
                          f"{str(exc).splitlines()[0][:160] if str(exc) else ''})") from None
    bad = [k for k, v in den.state_dict().items() if v.is_floating_point() and not v.isfinite().all()]
    if bad:  # a run that diverged, or a damaged file: every sample would be NaN
        raise OutputError(f"{path}: non-finite weights ({bad[0]}"
                          + (f" and {len(bad) - 1} more" if len(bad) > 1 else "") + ")")
    return den.to(device).eval(), obj["spec"]


def fingerprint(module: torch.nn.Module) -> str:
    """SHA-256 (16 hex digits) of a module's parameters and buffers, in ``state_dict`` order."""
    import hashlib

    h = hashlib.sha256()
    for v in module.state_dict().values():
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def lr_lambda(cfg: TrainConfig):
    o = cfg.optim

    def f(step: int) -> float:
        if o.warmup and step < o.warmup:
            return (step + 1) / o.warmup
        if o.schedule == "constant":
            return 1.0
        frac = min(1.0, (step - o.warmup) / max(1, cfg.steps - o.warmup))
        return o.min_lr_ratio + (1 - o.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * frac))

    return f


# --------------------------------------------------------------------------------------------
# run directory
def _load(path: Path) -> dict[str, Any]:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise OutputError(f"{path}: missing") from None
    except Exception as exc:  # truncated zip, bad pickle, wrong types: all one clear message
        raise OutputError(f"{path}: unreadable checkpoint ({type(exc).__name__}: "
                          f"{str(exc).splitlines()[0][:120]})") from None


def _save(path: Path, obj: dict[str, Any]) -> None:
    import io

    buf = io.BytesIO()
    torch.save(obj, buf)
    write_bytes_atomic(path, buf.getvalue())


def checkpoints(run_dir: Path) -> list[int]:
    d = run_dir / CHECKPOINTS
    if not d.is_dir():
        return []
    return sorted(int(m.group(1)) for p in d.iterdir() if (m := _CKPT.match(p.name)))


def read_progress(run_dir: Path) -> dict[str, Any]:
    p = run_dir / PROGRESS
    try:
        rec = json.loads(p.read_text())
        int(rec["step"])
        return rec
    except FileNotFoundError:
        raise OutputError(f"{p}: missing (not a training run directory?)") from None
    except (ValueError, KeyError, TypeError):
        raise OutputError(f"{p}: unreadable progress record") from None


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    p = run_dir / METRICS
    if not p.exists():
        return []
    out = []
    for line in p.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            break  # a line cut by a kill: everything after it is redone
    return out


def loss_plot(run_dir: Path) -> Path | None:
    """``loss.png``: training loss (and validation, with the trivial level 1) over steps."""
    recs = read_metrics(run_dir)
    tr = [(r["step"], r["loss"]) for r in recs if "loss" in r]
    va = [(r["step"], r["valid_loss"]) for r in recs if "valid_loss" in r]
    if not tr:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=110)
    ax.semilogy(*zip(*tr, strict=True), label="train (DSM, per log interval)")
    if va:
        ax.semilogy(*zip(*va, strict=True), "o-", label="valid (EMA weights)")
    ax.axhline(1.0, color="k", lw=0.8, ls="--", label="trivial denoiser")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.legend()
    fig.tight_layout()
    out = run_dir / LOSS_PNG
    tmp = out.with_name(".loss.tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, out)
    return out


# --------------------------------------------------------------------------------------------
# training
@dataclass
class _State:
    step: int
    model: torch.nn.Module          # the (DDP-wrapped) module that trains
    inner: WindowDenoiser           # the bare denoiser
    ema: WindowDenoiser
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LambdaLR


class Trainer:
    """One rank's training loop over ``run_dir``."""

    def __init__(self, cfg: TrainConfig, run_dir: Path, rank: int, size: int) -> None:
        self.cfg, self.run_dir, self.rank, self.size = cfg, run_dir, rank, size
        # rank 0: called after the first checkpoint's commit (the run it replaces goes then)
        self.after_commit: Any = None
        if cfg.batch_size % size:
            raise ConfigError(f"batch_size: {cfg.batch_size} does not split evenly over {size} "
                              "processes (each must hold the same number of windows)")
        self.device = compute_device(cfg.device)
        self.dtype = getattr(torch, cfg.dtype)
        self.src = WindowSource(cfg, "train")
        self.valid = WindowSource(cfg, "valid")
        self.sampler = Sampler(len(self.src), cfg.batch_size, cfg.seed)
        self.rows = block_range(cfg.batch_size, size, rank)
        if cfg.theta_noise == "shared" and self.src.theta_mode == "walk":
            raise ConfigError("theta_noise: shared is for a static θ; the store's θ walks "
                              "(use per_frame)")
        self.spec = model_spec(cfg, self.src)
        try:  # a bad network option is bad input: refuse it before the run directory exists
            build_denoiser(self.spec)
        except ValueError as exc:
            raise ConfigError(f"network: {exc}") from None
        self.log: Any = None  # opened once the run directory exists

    def open_log(self) -> None:
        self.log = rank_logger(self.run_dir / LOGS, self.rank, "scoreda.train")

    def fresh(self) -> _State:
        torch.manual_seed(self.cfg.seed)  # initial weights: the same on every rank
        den = build_denoiser(self.spec)
        state, theta = self.src.stats()
        norm = Normalizer.from_data(state, theta, spatial_ndim=len(self.src.spatial))
        den.normalizer.load_state_dict(norm.state_dict())
        return self._wrap(den, None)

    def _wrap(self, den: WindowDenoiser, ckpt: dict[str, Any] | None) -> _State:
        cfg = self.cfg
        den = den.to(self.device, self.dtype)
        ema = copy.deepcopy(den).requires_grad_(False)
        opt = torch.optim.AdamW(den.parameters(), lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg))
        step = 0
        if ckpt is not None:
            den.load_state_dict(ckpt["model"])
            ema.load_state_dict(ckpt["ema"])
            opt.load_state_dict(ckpt["optimizer"])
            sched.load_state_dict(ckpt["scheduler"])
            step = int(ckpt["step"])
        model: torch.nn.Module = den
        if self.size > 1:
            import inspect

            from torch.nn.parallel import DistributedDataParallel as DDP

            # the normaliser's buffers never change: no per-step sync of them (the keyword was
            # renamed in newer torch; pyproject allows torch >= 2.4)
            no_sync = ({"forward_sync_buffers": False}
                       if "forward_sync_buffers" in inspect.signature(DDP).parameters
                       else {"broadcast_buffers": False})
            model = DDP(den, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                        gradient_as_bucket_view=True, **no_sync)
        return _State(step, model, den, ema, opt, sched)

    def restore(self, step: int) -> _State:
        path = self.run_dir / CHECKPOINTS / f"step-{step:08d}.pt"
        ckpt = _load(path)
        spec = ckpt.get("spec")
        if isinstance(spec, dict) and "theta_noise" not in spec:
            # written before θ noise was a choice: per-frame noise, no prior recorded
            spec = {**spec, "theta_noise": "per_frame", "theta_prior": self.spec.get("theta_prior")}
            ckpt["spec"] = spec
        if isinstance(spec, dict) and "theta_lag" not in spec:
            spec = ckpt["spec"] = {**spec, "theta_lag": 1.0}  # before θ had its own clock
        if spec != self.spec:
            raise OutputError(f"{path}: written for another model or data set")
        try:
            st = self._wrap(build_denoiser(ckpt["spec"]), ckpt)
        except (KeyError, RuntimeError, ValueError) as exc:
            raise OutputError(f"{path}: does not match this run ({type(exc).__name__}: "
                              f"{str(exc).splitlines()[0][:120]})") from None
        return st

    # -- pieces ------------------------------------------------------------------------------
    def _batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        rows = self.sampler.batch_rows(step)[self.rows.start:self.rows.stop]
        return self.src.read(rows)

    def _checkpoint(self, st: _State) -> None:
        # every rank logs a fingerprint of its weights: DDP replicas that drift apart show here
        self.log.info("step %d weights %s", st.step, fingerprint(st.inner))
        if self.rank == 0:
            obj = {"step": st.step, "spec": self.spec, "model": st.inner.state_dict(),
                   "ema": st.ema.state_dict(), "optimizer": st.opt.state_dict(),
                   "scheduler": st.sched.state_dict()}
            _save(self.run_dir / CHECKPOINTS / f"step-{st.step:08d}.pt", obj)
            epoch, b = self.sampler.position(st.step)
            write_text_atomic(self.run_dir / PROGRESS, json.dumps(
                {"step": st.step, "epoch": epoch, "batch_in_epoch": b, "steps": self.cfg.steps},
                indent=1))
            if self.after_commit is not None:
                self.after_commit()
                self.after_commit = None
            for k in checkpoints(self.run_dir)[:-self.cfg.keep_checkpoints]:
                (self.run_dir / CHECKPOINTS / f"step-{k:08d}.pt").unlink(missing_ok=True)
            loss_plot(self.run_dir)
        self._barrier()

    def _barrier(self) -> None:
        if self.size > 1:
            import torch.distributed as dist

            dist.barrier()

    def _allreduce(self, values: list[float], op: str = "sum") -> list[float]:
        if self.size == 1:
            return values
        import torch.distributed as dist

        t = torch.tensor(values, dtype=torch.float64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
        return t.tolist()

    @torch.no_grad()
    def validate(self, den: WindowDenoiser) -> dict[str, float]:
        """EMA-weight DSM loss on fixed validation windows and noise, and the x̂₀ error at
        t = 0.5 against the trivial denoiser (both in normalised units)."""
        cfg, v = self.cfg, self.valid
        g = generator(cfg.seed, "valid")
        rows = torch.randperm(len(v), generator=g)[:cfg.valid_windows].numpy()
        state, theta = v.read(rows)
        state, theta = state.to(self.device, self.dtype), theta.to(self.device, self.dtype)
        t, ns, nt = global_noise(cfg.seed, -1, len(rows), tuple(state.shape[1:]), tuple(theta.shape[1:]),
                                 self.spec["theta_noise"] == "shared")
        draws = (t.to(state), ns.to(state), nt.to(state))
        loss = float(dsm_loss(den, state, theta, theta_weight=cfg.theta_weight, draws=draws))
        err = denoising_error(den, state, theta, 0.5, (ns.to(state), nt.to(state)),
                              theta_weight=cfg.theta_weight)
        return {"valid_loss": loss, "valid_x0_err": float(err.learned),
                "valid_x0_err_trivial": float(err.trivial)}

    def _append(self, rec: dict[str, Any]) -> None:
        with open(self.run_dir / METRICS, "a") as fh:
            fh.write(json.dumps(rec) + "\n")

    # -- loop --------------------------------------------------------------------------------
    def run(self, st: _State, until: int | None = None) -> int:
        cfg = self.cfg
        end = cfg.steps if until is None else min(cfg.steps, until)
        ac = (torch.autocast("cuda", dtype=torch.bfloat16) if cfg.autocast == "bf16"
              else nullcontext())
        shape_s = (cfg.window, self.src.channels, *self.src.spatial)
        shape_t = (cfg.window, len(self.src.param_names))
        acc = {"loss": 0.0, "n": 0, "data": 0.0, "compute": 0.0, "grad": 0.0}
        t_log = time.perf_counter()
        self.log.info("start at step %d of %d (%d processes, rows %s of %d)", st.step, cfg.steps,
                      self.size, self.rows, cfg.batch_size)
        pool = ThreadPoolExecutor(max_workers=1)  # reads the next batch while this one computes
        nxt = pool.submit(self._batch, st.step) if st.step < end else None
        try:
            with StopSignals() as stop, progress(cfg.steps, "train", initial=st.step) as bar:
                while st.step < end:
                    t0 = time.perf_counter()
                    assert nxt is not None
                    state, theta = nxt.result()
                    if st.step + 1 < end:
                        nxt = pool.submit(self._batch, st.step + 1)
                    state = state.to(self.device, self.dtype, non_blocking=True)
                    theta = theta.to(self.device, self.dtype, non_blocking=True)
                    t, ns, nt = global_noise(cfg.seed, st.step, cfg.batch_size, shape_s, shape_t,
                                             self.spec["theta_noise"] == "shared")
                    sl = slice(self.rows.start, self.rows.stop)
                    draws = (t[sl].to(state), ns[sl].to(state), nt[sl].to(state))
                    t1 = time.perf_counter()
                    with ac:
                        loss = dsm_loss(st.inner, state, theta, theta_weight=cfg.theta_weight,
                                        draws=draws, module=st.model)
                    st.opt.zero_grad(set_to_none=True)
                    loss.backward()
                    gn = (torch.nn.utils.clip_grad_norm_(st.inner.parameters(), cfg.optim.grad_clip)
                          if cfg.optim.grad_clip else torch.zeros(()))
                    st.opt.step()
                    st.sched.step()
                    # EMA with a warm-up (decay ≤ (1 + n)/(10 + n)): a short run's average is
                    # not stuck at the initial (all-zero-output) weights
                    decay = min(cfg.optim.ema, (1.0 + st.step) / (10.0 + st.step))
                    with torch.no_grad():
                        for pe, p in zip(st.ema.parameters(), st.inner.parameters(), strict=True):
                            pe.lerp_(p, 1.0 - decay)
                    st.step += 1
                    t2 = time.perf_counter()
                    lv = float(loss.detach())
                    if not math.isfinite(lv):
                        raise OutputError(f"training diverged at step {st.step}: loss {lv} "
                                          f"(lower optim.lr or set optim.grad_clip)")
                    acc["loss"] += lv
                    acc["n"] += 1
                    acc["data"] += t1 - t0
                    acc["compute"] += t2 - t1
                    acc["grad"] = float(gn)
                    bar.update(1)
                    if st.step % cfg.log_every == 0 or st.step == end:
                        loss_sum, data_sum, comp_sum = self._allreduce(
                            [acc["loss"] / acc["n"], acc["data"], acc["compute"]], "sum")
                        now = time.perf_counter()
                        rec = {"step": st.step, "loss": loss_sum / self.size,
                               "lr": st.sched.get_last_lr()[0], "grad_norm": acc["grad"],
                               "samples_per_s": acc["n"] * cfg.batch_size / (now - t_log),
                               "data_s_per_step": data_sum / self.size / acc["n"],
                               "compute_s_per_step": comp_sum / self.size / acc["n"]}
                        bar.set_postfix(loss=f"{rec['loss']:.3f}",
                                        sps=f"{rec['samples_per_s']:.0f}", refresh=False)
                        if self.rank == 0:
                            self._append(rec)
                        acc = {"loss": 0.0, "n": 0, "data": 0.0, "compute": 0.0, "grad": 0.0}
                        t_log = now
                    if self.rank == 0 and (st.step % cfg.validate_every == 0 or st.step == cfg.steps):
                        self._append({"step": st.step, **self.validate(st.ema)})
                    # ranks agree on a stop every 10 steps (one collective less on the others)
                    stopping = (st.step % 10 == 0 or st.step == end) and self._allreduce(
                        [1.0 if stop.requested else 0.0], "max")[0] > 0
                    if st.step % cfg.checkpoint_every == 0 or st.step == end or stopping:
                        self._checkpoint(st)
                    if stopping and st.step < cfg.steps:
                        self.log.info("stop signal: checkpointed step %d", st.step)
                        if self.rank == 0:
                            print(f"train: stopped by signal at step {st.step}; resume with "
                                  f"`scoreda train --resume {self.run_dir}` (exit {EXIT_STOPPED})",
                                  flush=True)
                        return EXIT_STOPPED
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
        if st.step < cfg.steps:
            if self.rank == 0:
                print(f"train: stopped at step {st.step} of {cfg.steps} (--until); resume with "
                      f"`scoreda train --resume {self.run_dir}` (exit {EXIT_STOPPED})", flush=True)
            return EXIT_STOPPED
        if self.rank == 0:
            _save(self.run_dir / MODEL, {"spec": self.spec, "ema": st.ema.state_dict(),
                                         "step": st.step})
        self._barrier()
        self.log.info("finished %d steps", cfg.steps)
        return EXIT_DONE


# --------------------------------------------------------------------------------------------
# entry points
def _setup(cfg: TrainConfig) -> tuple[int, int]:
    torch.set_num_threads(cfg.threads)
    dev = compute_device(cfg.device)  # before any collective: a bad device stops every rank alike
    if dev.type == "cuda":
        torch.cuda.set_device(dev)  # NCCL's collectives run on the current device
    return init_distributed(cfg.device)


def _agree_error(size: int, err: BaseException | None) -> None:
    """Every rank raises the first rank's error (a bad input on one rank stops all)."""
    if size == 1:
        if err is not None:
            raise err
        return
    import torch.distributed as dist

    msgs: list[Any] = [None] * size
    dist.all_gather_object(msgs, None if err is None else (type(err).__name__, str(err)))
    for m in msgs:
        if m is not None:
            if err is not None:
                raise err
            raise OutputError(m[1])


def start(cfg: TrainConfig, run_dir: str | Path, overwrite: bool = False,
          until: int | None = None) -> int:
    """Create ``run_dir`` and train from step 0."""
    run_dir = Path(run_dir)
    rank, size = _setup(cfg)
    err: BaseException | None = None
    trainer = rep = None
    try:
        if rank == 0 and run_dir.exists() and not overwrite:
            raise OutputError(f"{run_dir}: exists (use --overwrite or `scoreda train --resume`)")
        trainer = Trainer(cfg, run_dir, rank, size)
    except (ConfigError, OutputError, ValueError) as exc:
        err = exc
    _agree_error(size, err)
    assert trainer is not None
    if rank == 0:
        try:
            rep = Replacing(run_dir, overwrite)  # an earlier run stays until this one commits
        except OSError as exc:
            err = OutputError(f"{run_dir}: cannot set the earlier run aside ({exc})")
    _agree_error(size, err)
    trainer.after_commit = rep.committed if rep is not None else None
    with rep if rep is not None else contextlib.nullcontext():
        if rank == 0:
            run_dir.mkdir(parents=True)
            write_text_atomic(run_dir / CONFIG, dump(cfg))
        trainer._barrier()
        trainer.open_log()
        st = None
        try:  # the normaliser reads the first trajectories: a damaged store shows here
            st = trainer.fresh()
        except (OSError, ValueError, KeyError) as exc:
            err = OutputError(f"{cfg.store}: cannot read the training data ({exc})")
        _agree_error(size, err)
        assert st is not None
        return trainer.run(st, until)


def resume(run_dir: str | Path, until: int | None = None, steps: int | None = None) -> int:
    """Continue a run from its last checkpoint (``steps``: a new total, which reshapes the
    learning-rate schedule from here on)."""
    run_dir = Path(run_dir)
    cfg = load_train_config(run_dir / CONFIG)
    if steps is not None:
        cfg = validate({**cfg.model_dump(mode="json"), "steps": steps}, TrainConfig, "--steps")
        assert isinstance(cfg, TrainConfig)
    rank, size = _setup(cfg)
    err: BaseException | None = None
    st = trainer = None
    try:
        prog = read_progress(run_dir)
        if steps is not None and steps < int(prog["step"]):
            raise ConfigError(f"--steps: {steps} is below step {int(prog['step'])}, where "
                              f"{run_dir} has its last checkpoint")
        trainer = Trainer(cfg, run_dir, rank, size)
        st = trainer.restore(int(prog["step"])) if int(prog["step"]) > 0 else trainer.fresh()
    except (ConfigError, OutputError, ValueError) as exc:
        err = exc
    _agree_error(size, err)
    assert trainer is not None and st is not None
    if rank == 0:
        if steps is not None:
            write_text_atomic(run_dir / CONFIG, dump(cfg))
        # records written after the checkpoint belong to steps that are redone now
        keep = [r for r in read_metrics(run_dir) if r["step"] <= st.step]
        write_text_atomic(run_dir / METRICS, "".join(json.dumps(r) + "\n" for r in keep))
    trainer._barrier()
    trainer.open_log()
    return trainer.run(st, until)


def load_train_config(path: str | Path) -> TrainConfig:
    path = resolve_config_path(str(path))
    cfg = validate(load_yaml(path), TrainConfig, str(path))
    assert isinstance(cfg, TrainConfig)
    return cfg


def add_cli(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train a window score network on a trajectory store (DDP)",
                       description="Train a window denoiser on a store's train split; runs under "
                                   "plain python, torchrun, mpiexec or srun. Exit codes: 0 done, "
                                   "2 bad input, 3 stopped after a checkpoint (resume with "
                                   "--resume RUN_DIR).")
    p.add_argument("config", nargs="?", help="train config: file or shipped example name")
    p.add_argument("--run-dir", help="run directory to create")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue this run from its last checkpoint")
    p.add_argument("--overwrite", action="store_true", help="replace an existing run directory")
    p.add_argument("--steps", type=int, help="override the total number of steps")
    p.add_argument("--store", help="override the trajectory store")
    p.add_argument("--until", type=int, metavar="STEP",
                   help="checkpoint and exit 3 after STEP (split a long training over jobs)")
    p.set_defaults(func=_cmd)


def _cmd(args: argparse.Namespace) -> int:
    tune_allocator()
    if args.resume:
        if args.config or args.run_dir or args.store or args.overwrite:
            raise ConfigError("--resume takes the run directory alone (no config, --run-dir, "
                              "--store or --overwrite; --steps and --until may change)")
        return resume(args.resume, args.until, args.steps)
    if not args.config or not args.run_dir:
        raise ConfigError("train needs CONFIG and --run-dir (or --resume RUN_DIR)")
    path = resolve_config_path(args.config)
    data = load_yaml(path)
    for key in ("steps", "store"):
        if getattr(args, key) is not None:
            data[key] = getattr(args, key)
    cfg = validate(data, TrainConfig, str(path))
    assert isinstance(cfg, TrainConfig)
    return start(cfg, args.run_dir, args.overwrite, args.until)
