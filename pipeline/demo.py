"""``scoreda demo``: the main job on one machine, using the shipped example configs.

It grows with the pipeline: each stage that lands adds its step here.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import torch

from pipeline.assimilate import assimilate, summary_lines
from pipeline.calibrate import calibrate
from pipeline.calibrate import summary_lines as calibrate_summary
from pipeline.campaign import report as campaign_report
from pipeline.config import (
    AssimilateConfig,
    CalibrateConfig,
    GenerateConfig,
    SimulateConfig,
    SmoothConfig,
    SurrogateConfig,
    load_config,
    resolve_config_path,
)
from pipeline.generate import generate
from pipeline.report import plot_hovmoller, plot_vorticity
from pipeline.simulate import simulate
from pipeline.smooth import smooth
from pipeline.smooth import summary_lines as smooth_summary
from pipeline.surrogate import read_metrics as surrogate_metrics
from pipeline.surrogate import start as surrogate_start
from pipeline.surrogate import summary_lines as surrogate_summary
from pipeline.train import read_metrics


def _say(msg: str) -> None:
    print(f"[demo] {msg}", flush=True)


def _campaign_on_two_ranks(run_dir: Path) -> None:
    """``mpiexec -n 2 scoreda campaign run`` with the venv's own launcher."""
    mpiexec = Path(sys.executable).parent / "mpiexec"
    cmd = [str(mpiexec), "-n", "2", sys.executable, "-m", "pipeline.cli", "campaign", "run",
           "campaign_l96_letkf", "--run-dir", str(run_dir), "--overwrite"]
    if not mpiexec.exists():
        raise RuntimeError(f"{mpiexec}: not found; run env/setup.sh (installs mpich into the venv)")
    subprocess.run(cmd, check=True)


def _train_on_two_processes(store: Path, run_dir: Path) -> None:
    """``mpiexec -n 2 scoreda train train_demo`` (DDP, gloo) on the demo's Lorenz-96 store."""
    mpiexec = Path(sys.executable).parent / "mpiexec"
    cmd = [str(mpiexec), "-n", "2", sys.executable, "-m", "pipeline.cli", "train", "train_demo",
           "--store", str(store), "--run-dir", str(run_dir), "--overwrite"]
    subprocess.run(cmd, check=True)


def _slurm_chain(out: Path) -> None:
    """``scoreda submit submit_local``: generate → train → campaign → smooth (an array of nine
    held-out windows) → calibrate as chained jobs on a local
    single-node SLURM started (and stopped) just for this, by PID, in ``out/slurm``."""
    import os
    import shutil

    from pipeline.submit import TERMINAL, free_port_pair, job_info, status_lines

    script = Path(__file__).resolve().parents[1] / "env" / "slurm.sh"
    if shutil.which("slurmctld") is None or not script.exists():
        _say("slurm: slurm-wlm is not installed (env/setup.sh installs it); step skipped")
        return
    state, run = (out / "slurm").absolute(), (out / "chain").absolute()
    env = {**os.environ, "SCOREDA_SLURM_DIR": str(state),
           "SCOREDA_SLURM_PORT": str(free_port_pair()), "SCOREDA_SLURM_CRED_EXPIRE": "5"}
    subprocess.run(["bash", str(script), "stop"], env=env, capture_output=True)  # a stale one
    subprocess.run(["bash", str(script), "start"], env=env, check=True, capture_output=True)
    env["SLURM_CONF"] = str(state / "slurm.conf")
    old = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = env["SLURM_CONF"]
    try:
        shutil.rmtree(run, ignore_errors=True)
        _say("slurm: submit generate → train → campaign → smooth (9 windows) → calibrate as "
             "chained jobs (submit_local)")
        subprocess.run([sys.executable, "-m", "pipeline.cli", "submit", "submit_local",
                        "--run-dir", str(run)], env=env, check=True)
        ids = [j["job_id"] for j in json.loads((run / "jobs.json").read_text())["jobs"]]
        deadline = time.time() + 600
        while time.time() < deadline:
            rows = [job_info(j) for j in ids]  # an array job has one row per task
            if all(r and all(t.get("JobState") in TERMINAL for t in r) for r in rows):
                break
            time.sleep(2)
        for line in status_lines(run):
            _say(f"slurm: {line}")
        _say(f"wrote {run} (jobs/*.sbatch, logs/, data.zarr, train/, campaign/, smooth/, "
             "calibrate/)")
    finally:
        if old is None:
            os.environ.pop("SLURM_CONF", None)
        else:
            os.environ["SLURM_CONF"] = old
        subprocess.run(["bash", str(script), "stop"], env=env, capture_output=True)


def run_demo(out: Path) -> None:
    """Simulate a Kolmogorov flow and a Lorenz-96 ensemble, plot them, generate a small sharded
    trajectory store, run a Lorenz-96 twin experiment that estimates F, and the same as a 2-rank
    restartable campaign with its report, train a Lorenz-96 score network of (state, F) with
    DDP on 2 processes and smooth a held-out window with it (SDA, θ included), train a
    Lorenz-96 surrogate whose roll-out EnSF corrects, retrained once on its analyses, then submit
    generate → train → campaign → smooth → calibrate as chained jobs to a local SLURM; all
    into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()

    cfg = load_config(resolve_config_path("simulate_kolmogorov"), "simulate")
    assert isinstance(cfg, SimulateConfig)
    _say(f"simulate kolmogorov {cfg.model.size}^2, {cfg.members} members, "
         f"{cfg.spinup}+{cfg.steps} steps")
    ds = simulate(cfg, out / "kolmogorov.zarr", overwrite=True)
    plot_vorticity(ds, out / "kolmogorov_vorticity.png")
    _say(f"wrote {out / 'kolmogorov.zarr'} and {out / 'kolmogorov_vorticity.png'}")

    cfg = load_config(resolve_config_path("simulate_lorenz96"), "simulate")
    _say(f"simulate lorenz96 d={cfg.model.size}, {cfg.members} members")
    ds = simulate(cfg, out / "lorenz96.nc", overwrite=True)
    plot_hovmoller(ds, out / "lorenz96_hovmoller.png")
    _say(f"wrote {out / 'lorenz96.nc'} and {out / 'lorenz96_hovmoller.png'}")

    gcfg = load_config(resolve_config_path("generate_demo"), "generate")
    assert isinstance(gcfg, GenerateConfig)
    _say(f"generate {gcfg.trajectories} {gcfg.model.name} trajectories into a sharded Zarr store "
         f"with a Dask LocalCluster")
    generate(gcfg, out / "kolmogorov_demo.zarr", overwrite=True, echo=_say)

    acfg = load_config(resolve_config_path("assimilate_l96_theta"), "assimilate")
    assert isinstance(acfg, AssimilateConfig)
    _say(f"twin experiment: lorenz96 d={acfg.model.size}, {acfg.filter.method}, {acfg.members} "
         f"members, {acfg.cycles} cycles, estimating {', '.join(acfg.parameters.estimate)}")
    ds = assimilate(acfg, out / "twin_l96_theta.nc", overwrite=True)
    for line in summary_lines(ds):
        _say(line)
    _say(f"wrote {out / 'twin_l96_theta.nc'} and {out / 'twin_l96_theta_metrics.png'}")

    run_dir = out / "campaign_l96"
    _say("campaign: the same experiment as a restartable MPI campaign on 2 ranks "
         "(campaign_l96_letkf)")
    _campaign_on_two_ranks(run_dir)
    for path in campaign_report(run_dir):
        _say(f"wrote {path}")

    gcfg = load_config(resolve_config_path("generate_demo_l96"), "generate")
    assert isinstance(gcfg, GenerateConfig)
    store = out / "lorenz96_demo.zarr"
    _say(f"generate {gcfg.trajectories} lorenz96 trajectories (F from its prior) for training")
    generate(gcfg, store, overwrite=True, echo=_say)
    run_dir = out / "train_l96"
    _say("train: a window score network of (state, F) with DDP on 2 processes (train_demo)")
    t1 = time.perf_counter()
    _train_on_two_processes(store, run_dir)
    recs = [r for r in read_metrics(run_dir) if "valid_loss" in r]
    if recs:
        v = recs[-1]
        _say(f"trained {v['step']} steps in {time.perf_counter() - t1:.0f} s: validation DSM loss "
             f"{v['valid_loss']:.3f} (trivial denoiser 1), x0 error at t=0.5 "
             f"{v['valid_x0_err']:.3f} (trivial {v['valid_x0_err_trivial']:.3f})")
    _say(f"wrote {run_dir / 'model.pt'} and {run_dir / 'loss.png'}")

    scfg = load_config(resolve_config_path("smooth_demo"), "smooth")
    assert isinstance(scfg, SmoothConfig)
    scfg = scfg.model_copy(update={"model_run": str(run_dir.absolute())})
    cal_dir = out / "calibrate_l96"
    trajs = range(1, 10)   # 9 windows: the fewest that bound 90 %, one per trajectory (independent)
    _say(f"calibrate: the same smoothing of {len(trajs)} more held-out windows with a known truth "
         f"(test trajectories 1-9), then split-conformal F intervals from them")
    t1 = time.perf_counter()
    for t in trajs:
        smooth(scfg.model_copy(update={"trajectory": t}), cal_dir / f"t{t}", overwrite=True)
    ccfg = load_config(resolve_config_path("calibrate_demo"), "calibrate")
    assert isinstance(ccfg, CalibrateConfig)
    ccfg = ccfg.model_copy(update={"runs": [str((cal_dir / "t?").absolute())]})
    calib = calibrate(ccfg, cal_dir / "bound", overwrite=True)
    for line in calibrate_summary(calib):
        _say(line)
    _say(f"wrote {cal_dir / 'bound'} (calibration.json, summary.md, scores.png) in "
         f"{time.perf_counter() - t1:.0f} s")
    scfg = scfg.model_copy(update={"calibration": str((cal_dir / "bound").absolute())})
    _say(f"smooth: SDA posterior of {scfg.samples} samples of a held-out {scfg.length}-frame "
         "window and F with that model (smooth_demo), with the calibrated interval")
    met = smooth(scfg, out / "smooth_l96", overwrite=True)
    assert met is not None
    for line in smooth_summary(met):
        _say(line)
    _say(f"wrote {out / 'smooth_l96'} (states.png, theta.png, summary.md)")

    ucfg = load_config(resolve_config_path("surrogate_demo"), "surrogate")
    assert isinstance(ucfg, SurrogateConfig)
    run_dir = out / "surrogate_l96"
    _say(f"surrogate: a conv surrogate of lorenz96 d={ucfg.model.size}, its roll-out corrected by "
         f"EnSF from arctan observations, {ucfg.retrain.iterations} retraining iteration(s) on "
         "the analyses (surrogate_demo)")
    t1 = time.perf_counter()
    threads = torch.get_num_threads()
    surrogate_start(ucfg, run_dir, overwrite=True)
    torch.set_num_threads(threads)
    for line in surrogate_summary(surrogate_metrics(run_dir)):
        _say(line)
    _say(f"wrote {run_dir} (metrics.json, summary.md, leadtime.png) in "
         f"{time.perf_counter() - t1:.0f} s")

    _slurm_chain(out)
    _say(f"done in {time.perf_counter() - t0:.1f} s")
