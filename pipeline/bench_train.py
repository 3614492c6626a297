"""Benchmark suite ``train``: samples/s of ``scoreda train`` on 1 and 2 processes against the
bare single-process training step.

The floor is the compute of one optimisation step of the same network on an in-memory batch
(normalise, diffuse, forward, backward, clip, AdamW, EMA; one process, one torch thread),
expressed in seconds per sample and measured moments before. Each entry is a real
``scoreda train`` run in a subprocess on a small Lorenz-96 store written for the purpose — plain
python for one process, the venv's ``mpiexec -n 2`` (DDP, gloo) for two — and reports seconds
per sample from its ``metrics.jsonl`` (the first log interval left out as warm-up). The ratio is
then the end-to-end overhead over bare compute (data loading, logging, checkpoints; with two
processes, the gradient all-reduce too, and ideally 0.5). ``extra`` carries samples/s, the data
and compute seconds per step, the data share, and for two processes the parallel efficiency
``sps(2) / (2 sps(1))`` (goal ≥ 0.8).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import yaml

from pipeline.bench import Entry, Floors, suite
from pipeline.config import GenerateConfig, TrainConfig, validate

ROOT = Path(__file__).resolve().parents[1]


def bench_configs(store: Path, quick: bool) -> tuple[GenerateConfig, TrainConfig]:
    d, traj, frames = (40, 16, 32) if quick else (40, 64, 128)
    gen = validate({
        "stage": "generate", "model": {"name": "lorenz96", "size": d, "dt": 0.05},
        "trajectories": traj, "frames": frames, "save_every": 2, "spinup": 200, "seed": 0,
        "theta": {"mode": "prior"}, "dtype": "float32",
        "store": {"trajectories_per_shard": 8, "shard_frames": frames, "chunk_frames": 16},
        "split": {"valid": 0.125, "test": 0.125}, "dask": {"workers": 1},
    }, GenerateConfig, "bench train store")
    width, batch, steps = (32, 32, 60) if quick else (64, 128, 400)
    train = validate({
        "stage": "train", "store": str(store), "window": 5,
        "network": {"kind": "ring", "options": {"width": width, "depth": 4}},
        "batch_size": batch, "steps": steps, "log_every": steps // 10,
        "validate_every": steps, "checkpoint_every": steps, "valid_windows": 64,
        "optim": {"lr": 1e-3, "warmup": 10},
    }, TrainConfig, "bench train")
    assert isinstance(gen, GenerateConfig) and isinstance(train, TrainConfig)
    return gen, train


def bare_step_seconds(cfg: TrainConfig, repeats: int) -> float:
    """Seconds per sample of the bare optimisation step (module docstring), one thread."""
    from pipeline.train import Trainer, global_noise

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        tr = Trainer(cfg, Path(tempfile.gettempdir()), 0, 1)
        st = tr.fresh()
        state, theta = tr.src.read(np.arange(cfg.batch_size) % len(tr.src))
        t, ns, nt = global_noise(0, 0, cfg.batch_size, tuple(state.shape[1:]), tuple(theta.shape[1:]))
        from kernels.score import dsm_loss

        def step() -> None:
            loss = dsm_loss(st.inner, state, theta, draws=(t, ns, nt))
            st.opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(st.inner.parameters(), 1.0)
            st.opt.step()
            with torch.no_grad():
                for pe, p in zip(st.ema.parameters(), st.inner.parameters(), strict=True):
                    pe.lerp_(p, 1e-3)

        for _ in range(3):
            step()
        best = float("inf")
        for _ in range(max(1, repeats)):
            t0 = time.perf_counter()
            for _ in range(10):
                step()
            best = min(best, (time.perf_counter() - t0) / 10)
        return best / cfg.batch_size
    finally:
        torch.set_num_threads(threads)


def _run(conf: Path, run_dir: Path, procs: int) -> None:
    cmd = [sys.executable, "-m", "pipeline.cli", "train", str(conf), "--run-dir", str(run_dir),
           "--overwrite"]
    if procs > 1:
        cmd = [str(Path(sys.executable).parent / "mpiexec"), "-n", str(procs), *cmd]
    env = {**os.environ, "SCOREDA_NO_PROGRESS": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=3600)
    if r.returncode != 0:
        tail = (r.stderr or r.stdout).strip().splitlines()[-5:]
        raise RuntimeError(f"bench train: {procs}-process run failed (exit {r.returncode}): "
                           + " | ".join(tail))


def read_rates(run_dir: Path) -> dict[str, float]:
    """Mean samples/s and data/compute seconds per step over the log records after the first."""
    from pipeline.train import read_metrics

    recs = [r for r in read_metrics(run_dir) if "samples_per_s" in r][1:]
    out = {k: float(np.mean([r[k] for r in recs]))
           for k in ("samples_per_s", "data_s_per_step", "compute_s_per_step")}
    out["data_share"] = out["data_s_per_step"] / (out["data_s_per_step"] + out["compute_s_per_step"])
    return out


@suite("train")
def train_suite(floors: Floors, repeats: int) -> list[Entry]:
    """Samples/s of ``scoreda train`` with 1 and 2 processes against the bare step."""
    from distributed import Client, LocalCluster

    from pipeline.generate import generate

    tmp = Path(tempfile.mkdtemp(prefix="scoreda-bench-train-"))
    out: list[Entry] = []
    try:
        store = tmp / "l96.zarr"
        gen, cfg = bench_configs(store, floors.quick)
        with LocalCluster(n_workers=1, threads_per_worker=1, processes=False,
                          dashboard_address=":0") as cluster, Client(cluster) as client:
            generate(gen, store, client=client, echo=lambda s: None)
        bare = bare_step_seconds(cfg, repeats)
        conf = tmp / "train.yaml"
        conf.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
        mpi = (Path(sys.executable).parent / "mpiexec").exists()
        sps: dict[int, float] = {}
        for procs in ([1, 2] if mpi else [1]):
            run_dir = tmp / f"p{procs}"
            _run(conf, run_dir, procs)
            rates = read_rates(run_dir)
            sps[procs] = rates["samples_per_s"]
            extra: dict[str, float | int] = {"processes": procs, "batch": cfg.batch_size,
                                             "steps": cfg.steps, **rates}
            if procs > 1:
                extra["parallel_efficiency"] = sps[procs] / (procs * sps[1])
            out.append(Entry(
                "train", f"lorenz96 ring width {cfg.network.options['width']} batch "
                         f"{cfg.batch_size}, {procs} process" + "es" * (procs > 1),
                1.0 / rates["samples_per_s"], "bare training step, 1 process, 1 thread (per sample)",
                bare, note="ratio = end-to-end seconds per sample / bare step per sample "
                           "(2 processes ideal: 0.5); goal: efficiency >= 0.8",
                extra=extra))
            print(f"[train] {procs} process(es): {rates['samples_per_s']:.0f} samples/s "
                  f"(bare {1 / bare:.0f}), data {rates['data_s_per_step'] * 1e3:.1f} ms / compute "
                  f"{rates['compute_s_per_step'] * 1e3:.1f} ms per step"
                  + (f", efficiency {extra['parallel_efficiency']:.2f}" if procs > 1 else ""),
                  flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out
