"""The SLURM scaling sweep: ``scoreda submit`` with a ``bench`` stage.

Each array task (``SLURM_ARRAY_TASK_ID`` = index into ``bench.ranks``) runs at its rank count R:

* **campaign** (the ``campaign`` suite's Lorenz-96 EnSF run): *strong* — the suite's N members
  over R ranks; *weak* — N·R members. Seconds per cycle per phase (forecast, analysis, comm, io)
  from rank 0's timing record.
* **train** (the ``train`` suite's ring network): *strong* — the suite's global batch over R
  DDP ranks; *weak* — batch·R. Samples/s and data/compute seconds per step.
* **probe** (R ≥ 2): MPI latency (8-byte alltoall) and per-rank bandwidth (alltoall of 8 MiB per
  rank) between the job's ranks — the inputs of the communication model.
* the floors of ``scoreda bench`` (memory bandwidth, SGEMM) on the node.

It writes ``RUN/bench/ranks-R.json``. The gather job (``afterany`` of the array) writes
``scaling.json``, ``scaling.md`` (measured table + the model's extrapolation to 1024 ranks) and
``scaling.png``. The model, stated in docs/benchmarks.md, for either workload:

    t(R) = c₁ · W/R + s₁ · W + κ · log₂R        W = 1 (strong) or R (weak)

c₁ is the parallel work at R = 1 (campaign: forecast + analysis; training: the whole step), s₁
the serial part (campaign: rank 0's io + other; training: none), κ the communication cost per
doubling of R, taken at the smallest measured R > 1 (campaign: its own ``comm`` phase; training:
t(R) − c₁·W/R) — collectives of tree / recursive-doubling shape cost ∝ log₂R in latency. With
only R = 1, 2 measured the model reproduces them by construction; more rank counts (a cluster
sweep) test it. The MPI probe is reported beside it as the network's floor.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from pipeline.config import CampaignConfig, SubmitConfig, TrainConfig, validate
from pipeline.storage import write_text_atomic

EXTRAPOLATE = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024]


def _run(cmd: list[str], what: str, timeout: float = 3600) -> None:
    env = {**os.environ, "SCOREDA_NO_PROGRESS": "1"}
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    if r.returncode != 0:
        tail = (r.stderr or r.stdout).strip().splitlines()[-5:]
        raise RuntimeError(f"bench {what}: exit {r.returncode}: " + " | ".join(tail))


def _campaign_cfg(quick: bool, members: int) -> CampaignConfig:
    from pipeline.bench_campaign import bench_config

    data = bench_config(quick).model_dump(mode="json")
    data["members"] = members
    cfg = validate(data, CampaignConfig, "bench campaign")
    assert isinstance(cfg, CampaignConfig)
    return cfg


def probe(out: str) -> None:
    """MPI latency and per-rank all-to-all bandwidth between this world's ranks (rank 0 writes)."""
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    r, size = comm.Get_rank(), comm.Get_size()
    small = np.zeros(size, dtype=np.float64)
    recv = np.empty_like(small)
    big_n = (8 * 2**20) // 8 // size * size  # 8 MiB of float64 per rank, split over peers
    big = np.ones(big_n)
    rbig = np.empty_like(big)

    def timed(fn: Callable[[], None], reps: int) -> float:
        fn()
        comm.Barrier()
        best = float("inf")
        for _ in range(3):
            t0 = time.perf_counter()
            for _ in range(reps):
                fn()
            comm.Barrier()
            best = min(best, (time.perf_counter() - t0) / reps)
        return best

    lat = timed(lambda: comm.Alltoall(small, recv), 200)
    t_big = timed(lambda: comm.Alltoall(big, rbig), 5)
    moved = big.nbytes * (size - 1) / size  # bytes each rank sends to others
    if r == 0:
        Path(out).write_text(json.dumps({"ranks": size, "latency_s": lat,
                                         "bandwidth_Bps": moved / max(t_big - lat, 1e-9)}))


def run_array_task(run_dir: Path, sub: SubmitConfig, scoreda: str,
                   launcher: Callable[[int], list[str]]) -> int:
    """Measure at the rank count of this array task; write ``bench/ranks-R.json``."""
    import torch

    from pipeline.bench import Floors
    from pipeline.bench_campaign import read_split
    from pipeline.bench_train import bench_configs, read_rates

    spec = sub.bench
    assert spec is not None
    i = int(os.environ.get("SLURM_ARRAY_TASK_ID", "0"))
    if not 0 <= i < len(spec.ranks):
        print(f"scoreda job bench: array index {i} outside bench.ranks", file=sys.stderr)
        return 2
    ranks = spec.ranks[i]
    out = run_dir / "bench"
    work = out / f"work-R{ranks}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    exe = scoreda.split()
    floors = Floors(torch.device("cpu"), repeats=spec.repeats, quick=spec.quick)
    rec: dict[str, Any] = {"ranks": ranks, "host": os.uname().nodename,
                           "nodes": int(os.environ.get("SLURM_JOB_NUM_NODES", "1")),
                           "floors": floors.summary(), "campaign": {}, "train": {}}
    try:
        if "campaign" in spec.suites:
            n1 = _campaign_cfg(spec.quick, 8 if spec.quick else 16).members
            for mode, members in (("strong", n1), ("weak", n1 * ranks)):
                cfg = _campaign_cfg(spec.quick, members)
                conf = work / f"campaign-{mode}.yaml"
                conf.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
                d = work / f"campaign-{mode}"
                _run([*launcher(ranks), *exe, "campaign", "run", str(conf), "--run-dir", str(d),
                      "--overwrite"], f"campaign {mode} R={ranks}")
                rec["campaign"][mode] = {"members": members, "state": cfg.model.size,
                                         "bytes": 8 if cfg.dtype == "float64" else 4,
                                         **read_split(d)}
        if "train" in spec.suites:
            from distributed import Client, LocalCluster

            from pipeline.generate import generate
            from pipeline.train import load_model

            store = work / "l96.zarr"
            gen, tcfg = bench_configs(store, spec.quick)
            with LocalCluster(n_workers=1, threads_per_worker=1, processes=False,
                              dashboard_address=":0") as cluster, Client(cluster) as client:
                generate(gen, store, client=client, echo=lambda s: None)
            for mode, batch in (("strong", tcfg.batch_size), ("weak", tcfg.batch_size * ranks)):
                data = {**tcfg.model_dump(mode="json"), "batch_size": batch}
                cfg_t = validate(data, TrainConfig, "bench train")
                conf = work / f"train-{mode}.yaml"
                conf.write_text(yaml.safe_dump(cfg_t.model_dump(mode="json")))
                d = work / f"train-{mode}"
                _run([*launcher(ranks), *exe, "train", str(conf), "--run-dir", str(d),
                      "--overwrite"], f"train {mode} R={ranks}")
                den, _ = load_model(d)
                rec["train"][mode] = {"batch": batch, "params": sum(p.numel() for p in den.parameters()),
                                      **read_rates(d)}
        if ranks > 1:
            pf = work / "probe.json"
            _run([*launcher(ranks), sys.executable, "-m", "pipeline.bench_scaling", "probe",
                  str(pf)], f"probe R={ranks}")
            rec["probe"] = json.loads(pf.read_text())
    except RuntimeError as exc:
        print(f"scoreda job bench: {exc}", file=sys.stderr)
        return 1
    write_text_atomic(out / f"ranks-{ranks}.json", json.dumps(rec, indent=1))
    shutil.rmtree(work, ignore_errors=True)
    print(f"scoreda job bench: R={ranks} measured → {out / f'ranks-{ranks}.json'}")
    return 0


# ------------------------------------------------------------------------------------------------
# the model
def model_time(c1: float, s1: float, kappa: float, ranks: int, weak: bool) -> float:
    """Seconds per cycle / step at ``ranks`` (module docstring)."""
    w = ranks if weak else 1
    return c1 * w / ranks + s1 * w + kappa * math.log2(ranks)


def model_inputs(kind: str, mode: str, recs: dict[int, dict[str, Any]]) -> tuple[float, float, float, int]:
    """``(c₁, s₁, κ, R_κ)`` of one workload from the measurements (module docstring)."""
    one = recs[1][kind][mode]
    if kind == "campaign":
        c1, s1 = one["forecast"] + one["analysis"], one["io"] + one.get("other", 0.0)
    else:
        c1, s1 = one["batch"] / one["samples_per_s"], 0.0
    more = sorted(r for r in recs if r > 1 and mode in recs[r].get(kind, {}))
    if not more:
        return c1, s1, 0.0, 1
    rk = more[0]
    m = recs[rk][kind][mode]
    w = rk if mode == "weak" else 1
    if kind == "campaign":
        comm = m["comm"]
    else:
        comm = m["batch"] / m["samples_per_s"] - c1 * w / rk
    return c1, s1, max(comm, 0.0) / math.log2(rk), rk


def gather(bench_dir: Path) -> dict[str, Any]:
    """Table, plots and extrapolation from every ``ranks-R.json`` there."""
    recs = {}
    for p in sorted(bench_dir.glob("ranks-*.json")):
        r = json.loads(p.read_text())
        recs[int(r["ranks"])] = r
    if 1 not in recs:
        raise RuntimeError(f"{bench_dir}: no R = 1 measurement (ranks-1.json): nothing to scale from")
    probes = [r["probe"] for r in recs.values() if "probe" in r]
    pr = max(probes, key=lambda q: q["ranks"]) if probes else None
    one = recs[1]
    work = [(k, m) for k in ("campaign", "train") for m in ("strong", "weak") if m in one.get(k, {})]
    inputs = {f"{k}_{m}": model_inputs(k, m, recs) for k, m in work}
    rows: list[dict[str, Any]] = []
    lines = ["| what | R | measured | model | efficiency (measured) |", "|---|---|---|---|---|"]
    for kind, mode in work:
        c1, s1, kappa, _ = inputs[f"{kind}_{mode}"]
        weak = mode == "weak"
        base = one[kind][mode]
        t1 = base["wall"] if kind == "campaign" else base["batch"] / base["samples_per_s"]
        for rk in sorted(recs):
            m = recs[rk].get(kind, {}).get(mode)
            if m is None:
                continue
            meas = m["wall"] if kind == "campaign" else m["batch"] / m["samples_per_s"]
            mod = model_time(c1, s1, kappa, rk, weak)
            eff = t1 / meas if weak else t1 / (rk * meas)
            rows.append({"kind": kind, "mode": mode, "ranks": rk, "measured_s": meas,
                         "model_s": mod, "efficiency": eff})
            lines.append(f"| {kind} {mode} | {rk} | {meas * 1e3:.1f} ms | {mod * 1e3:.1f} ms "
                         f"| {eff:.2f} |")
    ext = ["", "Model inputs (c₁ parallel, s₁ serial, κ per doubling; seconds):", ""]
    ext += [f"- {key}: c₁ = {c1:.4g}, s₁ = {s1:.4g}, κ = {kappa:.4g} (from R = {rk})"
            for key, (c1, s1, kappa, rk) in inputs.items()]
    ext += ["", "Extrapolation (model; efficiency t₁/(R·t_R) strong, t₁/t_R weak):", "",
            "| R | " + " | ".join(f"{k} {m}" for k, m in work) + " |",
            "|---|" + "---|" * len(work)]
    extrap: dict[str, list[float]] = {}
    for rk in EXTRAPOLATE:
        cells = []
        for kind, mode in work:
            c1, s1, kappa, _ = inputs[f"{kind}_{mode}"]
            weak = mode == "weak"
            t1, tr = model_time(c1, s1, kappa, 1, weak), model_time(c1, s1, kappa, rk, weak)
            eff = t1 / tr if weak else t1 / (rk * tr)
            extrap.setdefault(f"{kind}_{mode}", []).append(eff)
            cells.append(f"{eff:.2f}")
        ext.append(f"| {rk} | " + " | ".join(cells) + " |")
    result = {"ranks": sorted(recs), "probe": pr, "rows": rows,
              "inputs": {k: dict(zip(("c1", "s1", "kappa", "from_ranks"), v, strict=True))
                         for k, v in inputs.items()},
              "extrapolate_ranks": EXTRAPOLATE, "extrapolated_efficiency": extrap,
              "floors": {k: v["floors"] for k, v in recs.items()}}
    probe_txt = (f"MPI probe at R = {pr['ranks']}: latency {pr['latency_s'] * 1e6:.1f} µs, "
                 f"all-to-all bandwidth {pr['bandwidth_Bps'] / 1e9:.2f} GB/s per rank; "
                 if pr else "no MPI probe (R = 1 only); ")
    head = [f"# Scaling sweep ({', '.join(map(str, sorted(recs)))} ranks)", "",
            probe_txt + f"floors at R = 1: memory {one['floors']['memory_bandwidth_GBps']:.1f} "
            f"GB/s, SGEMM {one['floors']['sgemm_GFLOPs']:.1f} GFLOP/s.", ""]
    write_text_atomic(bench_dir / "scaling.json", json.dumps(result, indent=1))
    write_text_atomic(bench_dir / "scaling.md", "\n".join(head + lines + ext) + "\n")
    _plot(bench_dir / "scaling.png", rows, extrap)
    print("\n".join(head + lines + ext))
    return result


def _plot(path: Path, rows: list[dict[str, Any]], extrap: dict[str, list[float]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for key, effs in extrap.items():
        axes[1].semilogx(EXTRAPOLATE, effs, "-", label=f"{key} (model)", base=2)
    for kind, mode in {(r["kind"], r["mode"]) for r in rows}:
        sel = sorted((r for r in rows if r["kind"] == kind and r["mode"] == mode), key=lambda r: r["ranks"])
        rk = [r["ranks"] for r in sel]
        axes[0].plot(rk, [r["measured_s"] * 1e3 for r in sel], "o-", label=f"{kind} {mode} measured")
        axes[0].plot(rk, [r["model_s"] * 1e3 for r in sel], "x--", label=f"{kind} {mode} model")
        axes[1].semilogx(rk, [r["efficiency"] for r in sel], "o", label=f"{kind}_{mode} measured", base=2)
    axes[0].set_xlabel("ranks")
    axes[0].set_ylabel("ms per cycle / step")
    axes[0].legend(fontsize=7)
    axes[1].set_xlabel("ranks")
    axes[1].set_ylabel("parallel efficiency")
    axes[1].set_ylim(0, 1.1)
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(path)


if __name__ == "__main__":  # `python -m pipeline.bench_scaling probe OUT.json` under srun
    if len(sys.argv) == 3 and sys.argv[1] == "probe":
        probe(sys.argv[2])
    else:
        sys.exit("usage: python -m pipeline.bench_scaling probe OUT.json")
