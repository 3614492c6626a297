"""Benchmark suite ``campaign``: a Lorenz-96 campaign on R = 1 and R = 2 MPI ranks against the
bare single-process cycle.

The floor is :meth:`pipeline.assimilate.Twin.cycle` (forecast, observe, analysis, roughening of
the whole ensemble in this process, one torch thread, no store, no MPI) timed per cycle moments
before. Each entry is the mean wall clock per cycle of a real ``scoreda campaign run`` (rank 0's
``seconds_wall``, commit included, cycle 0 left out as warm-up) launched as a subprocess — plain
python for R = 1, the venv's ``mpiexec -n 2`` for R = 2 — so its ratio is the campaign overhead
(store writes, checkpoints, fsyncs, allgathers, replicated analysis) over the bare cycle; with
R = 2 a ratio below 1 means the forecast split pays for the communication. ``extra`` carries the
per-phase split read back from the run's store (forecast, analysis, comm, io, other), and for
R = 2 the speed-up and the parallel efficiency t(R=1) / (2 t(R=2)).
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
from pipeline.config import CampaignConfig, validate

ROOT = Path(__file__).resolve().parents[1]


def bench_config(quick: bool) -> CampaignConfig:
    # forecast-heavy on purpose (observation.every model steps per cycle): the regime campaigns
    # are for; the analysis (EnSF gaussian, replicated on every rank) is the serial part
    d, n, cycles, every = (200, 8, 5, 5) if quick else (20000, 16, 10, 40)
    cfg = validate({
        "stage": "campaign",
        "model": {"name": "lorenz96", "size": d, "params": {"F": 8.0}, "dt": 0.01},
        "members": n, "cycles": cycles, "burn_in": 0, "truth_spinup": 100, "seed": 1,
        "observation": {"kind": "every_kth", "options": {"k": 2}, "sigma": 1.0, "every": every},
        "parameters": {"estimate": ["F"], "prior": {"F": {"uniform": [6.0, 10.0]}},
                       "roughening": 0.02},
        "filter": {"method": "ensf", "ensf": {"estimator": "gaussian", "steps": 20}},
        "store_states": False, "checkpoint_every": 5,
    }, CampaignConfig, "bench campaign")
    assert isinstance(cfg, CampaignConfig)
    return cfg


def bare_cycle_seconds(cfg: CampaignConfig, cycles: int) -> float:
    """Seconds per :meth:`Twin.cycle` of the whole ensemble, one thread, after one warm-up."""
    from pipeline.assimilate import Twin

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        twin = Twin(cfg)
        st, _ = twin.cycle(twin.initial_state())  # warm-up: allocator, operator tables
        t0 = time.perf_counter()
        for _ in range(cycles):
            st, _ = twin.cycle(st)
        return (time.perf_counter() - t0) / cycles
    finally:
        torch.set_num_threads(threads)


def mpiexec() -> Path:
    return Path(sys.executable).parent / "mpiexec"


def run_campaign(conf: Path, run_dir: Path, ranks: int, timeout: float = 1800) -> None:
    """``scoreda campaign run`` in a subprocess (plain python for one rank)."""
    cmd = [sys.executable, "-m", "pipeline.cli", "campaign", "run", str(conf),
           "--run-dir", str(run_dir), "--overwrite"]
    if ranks > 1:
        cmd = [str(mpiexec()), "-n", str(ranks), *cmd]
    env = {**os.environ, "SCOREDA_NO_PROGRESS": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    env.pop("SCOREDA_TEST_DIE_AT", None)
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    if r.returncode != 0:
        tail = (r.stderr or r.stdout).strip().splitlines()[-5:]
        raise RuntimeError(f"bench campaign: R={ranks} run failed (exit {r.returncode}): "
                           + " | ".join(tail))


def read_split(run_dir: Path, skip: int = 1) -> dict[str, float]:
    """Mean seconds per cycle of each phase (rank 0) over the cycles after ``skip`` warm-up."""
    import xarray as xr

    from pipeline.campaign import PHASES, STORE, TIMING_VARS

    with xr.open_zarr(run_dir / STORE, consolidated=False) as ds:
        vals = {v.removeprefix("seconds_"): ds[v].values[skip:] for v in TIMING_VARS}
    out = {k: float(np.mean(v)) for k, v in vals.items()}
    out["other"] = out["wall"] - sum(out[p] for p in PHASES)
    return out


@suite("campaign")
def campaign_suite(floors: Floors, repeats: int) -> list[Entry]:
    """Seconds per campaign cycle on 1 and 2 ranks against the bare single-process cycle."""
    cfg = bench_config(floors.quick)
    n, d = cfg.members, cfg.model.size
    bare = bare_cycle_seconds(cfg, max(cfg.cycles - 1, 1))
    tmp = Path(tempfile.mkdtemp(prefix="scoreda-bench-campaign-"))
    out: list[Entry] = []
    try:
        conf = tmp / "campaign.yaml"
        conf.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
        ranks_list = [1, 2] if mpiexec().exists() else [1]
        per: dict[int, float] = {}
        for ranks in ranks_list:
            best: dict[str, float] | None = None
            for r in range(max(1, min(repeats, 2))):
                run_dir = tmp / f"r{ranks}-{r}"
                run_campaign(conf, run_dir, ranks)
                split = read_split(run_dir)
                if best is None or split["wall"] < best["wall"]:
                    best = split
                shutil.rmtree(run_dir, ignore_errors=True)
            assert best is not None
            per[ranks] = best["wall"]
            extra: dict[str, float | int] = {"ranks": ranks, "members": n, "state": d,
                                             "cycles_timed": cfg.cycles - 1}
            extra.update({f"{k}_s": v for k, v in best.items()})
            extra.update({f"{k}_share": v / best["wall"] for k, v in best.items() if k != "wall"})
            if ranks > 1:
                extra["speedup"] = per[1] / best["wall"]
                extra["parallel_efficiency"] = per[1] / (ranks * best["wall"])
            out.append(Entry(
                "campaign", f"lorenz96 {d} x{n} ensf-gaussian, {ranks} rank" + "s" * (ranks > 1),
                best["wall"], "bare Twin.cycle, 1 process, 1 thread", bare,
                note="ratio = campaign wall per cycle (commit included) / bare cycle",
                extra=extra))
            print(f"[campaign] R={ranks}: {best['wall'] * 1e3:.1f} ms/cycle (bare {bare * 1e3:.1f})"
                  " split " + ", ".join(f"{k} {v * 1e3:.1f}" for k, v in best.items()
                                        if k != "wall")
                  + (f", efficiency {extra['parallel_efficiency']:.2f}" if ranks > 1 else ""),
                  flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out
