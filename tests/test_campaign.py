"""``scoreda campaign``: rank-count invariance, kills at every commit phase, SIGTERM, resume with
another rank count, refused configs, corrupt checkpoints, divergence guard, status and report."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import xarray as xr
import yaml

from pipeline import campaign as cp
from pipeline.assimilate import Twin
from pipeline.cli import main
from pipeline.config import CampaignConfig, validate

ROOT = Path(__file__).resolve().parents[1]
PYTHON = sys.executable
MPIEXEC = Path(PYTHON).parent / "mpiexec"
ENV = {**os.environ, "SCOREDA_NO_PROGRESS": "1", "PYTHONPATH": str(ROOT)}
ENV.pop("SCOREDA_TEST_DIE_AT", None)

FILTERS = {
    "letkf": {"method": "letkf", "inflation": 1.02, "radius": 6.0},
    "enkf": {"method": "enkf", "inflation": 1.05},
    "ensf-paired": {"method": "ensf", "ensf": {"estimator": "paired", "steps": 20}},
    "ensf-gaussian": {"method": "ensf", "ensf": {"estimator": "gaussian", "steps": 20}},
    # column blocks of 8 spread the 41 columns over every rank: the column-layout statistics,
    # the regression's block sums and RTPS all cross ranks
    "ensf-blocks": {"method": "ensf", "inflation": 1.05, "rtps": 0.3, "column_chunk": 8,
                    "ensf": {"estimator": "gaussian", "likelihood": "denoised", "score_clip": 50,
                             "steps": 20}},
    # localized regression of the unobserved half (replicated analysis) + global θ regression
    "ensf-local": {"method": "ensf", "radius": 2.0,
                   "ensf": {"estimator": "gaussian", "coupling": "local", "ridge": 0.1, "steps": 20}},
}


def make_cfg(method: str = "letkf", **over) -> CampaignConfig:
    data = {
        "stage": "campaign",
        "model": {"name": "lorenz96", "size": 40, "params": {"F": 8.0}, "dt": 0.05},
        "members": 8, "cycles": 12, "burn_in": 2, "truth_spinup": 200, "seed": 3,
        "observation": {"kind": "every_kth", "options": {"k": 2}, "sigma": 1.0},
        "parameters": {"estimate": ["F"], "prior": {"F": {"uniform": [6.0, 10.0]}},
                       "roughening": 0.05},
        "filter": FILTERS[method],
    }
    data.update(over)
    cfg = validate(data, CampaignConfig)
    assert isinstance(cfg, CampaignConfig)
    return cfg


def write_cfg(path: Path, cfg: CampaignConfig) -> Path:
    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    return path


def launch(args: list[str], ranks: int, env: dict | None = None, **kw) -> subprocess.Popen:
    cmd = [PYTHON, "-m", "pipeline.cli", "campaign", *args]
    if ranks > 1:
        cmd = [str(MPIEXEC), "-n", str(ranks), *cmd]
    return subprocess.Popen(cmd, cwd=ROOT, env={**ENV, **(env or {})}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True, **kw)


def run_cli(args: list[str], ranks: int, env: dict | None = None,
            timeout: float = 120) -> subprocess.CompletedProcess:
    p = launch(args, ranks, env)
    try:
        out, err = p.communicate(timeout=timeout)
    finally:
        _killgroup(p)
    return subprocess.CompletedProcess(p.args, p.returncode, out, err)


def _killgroup(p: subprocess.Popen) -> None:
    try:
        os.killpg(p.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def in_process(cfg: CampaignConfig, run_dir: Path) -> int:
    """A campaign on one rank inside the test process (plain python: MPI world of one)."""
    threads = torch.get_num_threads()
    try:
        return cp.start(cfg, run_dir, overwrite=True)
    finally:
        torch.set_num_threads(threads)


def stored(run_dir: Path) -> dict[str, np.ndarray]:
    ds = xr.open_zarr(run_dir / cp.STORE, consolidated=False).load()
    # the timing variables are the only non-reproducible ones
    return {k: ds[k].values for k in ds.data_vars if not k.startswith("seconds")}


def assert_same(a: dict[str, np.ndarray], b: dict[str, np.ndarray], what: str) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert np.array_equal(a[k], b[k], equal_nan=True), f"{what}: {k} differs"


def final_checkpoint(run_dir: Path, cfg: CampaignConfig) -> dict[str, torch.Tensor]:
    twin = Twin(cfg)
    s = cp._load_checkpoint(run_dir, cfg.cycles, range(cfg.members), twin)
    return {"truth": s.truth, "ensemble": s.ensemble, "theta": s.theta}


needs_mpi = pytest.mark.skipif(not MPIEXEC.exists(), reason="no mpiexec in the venv")


# --------------------------------------------------------------------------------------------
# R = 1 equals the single-process twin driver
def test_one_rank_equals_twin_driver(tmp_path):
    cfg = make_cfg("letkf")
    assert in_process(cfg, tmp_path / "run") == cp.EXIT_DONE
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        ds = Twin(cfg).run()
    finally:
        torch.set_num_threads(threads)
    got = stored(tmp_path / "run")
    for k in ("rmse_a", "rmse_f", "spread_a", "y", "theta_particles", "theta_mean", "mean_a"):
        assert np.array_equal(ds[k].values, got[k]), k
    prog = json.loads((tmp_path / "run" / cp.PROGRESS).read_text())
    assert prog["cycles_done"] == cfg.cycles and prog["checkpoint"] == cfg.cycles
    # keep_checkpoints = 2: only the last two survive
    assert cp._ckpt_cycles(tmp_path / "run") == [cfg.cycles - 1, cfg.cycles]


# --------------------------------------------------------------------------------------------
# rank-count invariance: bit for bit
@pytest.mark.mpi
@needs_mpi
@pytest.mark.parametrize("method,ranks", [("letkf", 4), ("ensf-paired", 4), ("ensf-gaussian", 2),
                                          ("ensf-blocks", 3), ("enkf", 2), ("ensf-local", 2)])
def test_rank_count_invariance(tmp_path, method, ranks):
    cfg = make_cfg(method)
    in_process(cfg, tmp_path / "r1")
    conf = write_cfg(tmp_path / "c.yaml", cfg)
    r = run_cli(["run", str(conf), "--run-dir", str(tmp_path / "rn")], ranks)
    assert r.returncode == 0, r.stderr
    assert_same(stored(tmp_path / "r1"), stored(tmp_path / "rn"), f"{method} R=1 vs R={ranks}")
    a, b = final_checkpoint(tmp_path / "r1", cfg), final_checkpoint(tmp_path / "rn", cfg)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    files = sorted(p.name for p in cp._ckpt_dir(tmp_path / "rn", cfg.cycles).iterdir())
    assert len([f for f in files if f.startswith("members-")]) == ranks
    logs = sorted(p.name for p in (tmp_path / "rn" / cp.LOGS).iterdir())
    assert logs == [f"rank-{r:04d}.log" for r in range(ranks)]


# dt 0.2 at 16² with the initial members 20 units off the truth: every member outruns RK4 in
# cycle 0's forecast, member 6 (on rank 1 of 2) needs dt/4 and the others dt/2
REFINE = {"model": {"name": "kolmogorov", "size": 16, "dt": 0.2}, "cycles": 4, "burn_in": 0,
          "truth_spinup": 50, "initial": {"spread": 20.0},
          "observation": {"kind": "every_kth", "options": {"k": 2}, "sigma": 0.5, "every": 2},
          "parameters": {"estimate": ["drag"]}, "filter": FILTERS["letkf"]}


@pytest.mark.mpi
@needs_mpi
def test_refined_forecasts_are_rank_count_invariant_and_a_stopped_run_resumes(tmp_path):
    cfg = make_cfg(**REFINE)
    in_process(cfg, tmp_path / "r1")
    ref = stored(tmp_path / "r1")
    assert ref["refined"].tolist() == [8, 0, 0, 0] and np.isfinite(ref["rmse_a"]).all()
    conf = write_cfg(tmp_path / "c.yaml", cfg)
    r = run_cli(["run", str(conf), "--run-dir", str(tmp_path / "r2")], 2)
    assert r.returncode == 0, r.stderr
    assert_same(ref, stored(tmp_path / "r2"), "refined forecasts R=1 vs R=2")
    cp.report(tmp_path / "r2")
    assert "| forecasts at a smaller step (max_refinements) | 8 member-cycles in 1 cycles |" \
        in (tmp_path / "r2" / "report.md").read_text()
    assert "  forecasts at a smaller step (max_refinements 3): 8 member-cycles in 1 cycles" \
        in cp.status_lines(tmp_path / "r2")
    log = (tmp_path / "r2" / cp.LOGS / "rank-0000.log").read_text()
    assert "cycle 0: 8 member(s) forecast at a smaller step (down to dt/4)" in log
    # with one halving allowed member 6 stops cycle 0; raising the cap on resume goes on
    low = write_cfg(tmp_path / "low.yaml", make_cfg(**REFINE, max_refinements=1))
    r = run_cli(["run", str(low), "--run-dir", str(tmp_path / "r3")], 2)
    assert r.returncode == 1 and "cycle 0: member 6 (rank 1) blew up" in r.stderr, r.stderr
    assert "down to dt/2; max_refinements" in r.stderr
    r = run_cli(["resume", str(tmp_path / "r3"), "--config", str(conf)], 2)
    assert r.returncode == 0, r.stderr
    assert_same(ref, stored(tmp_path / "r3"), "stopped, resumed with max_refinements 3")


# --------------------------------------------------------------------------------------------
# kills at every commit phase, resumed with changing rank counts
@pytest.mark.mpi
@needs_mpi
def test_kill_at_every_phase_then_resume_is_bitwise(tmp_path):
    cfg = make_cfg("ensf-paired", cycles=24, checkpoint_every=3)
    ref = tmp_path / "ref"
    in_process(cfg, ref)
    conf = write_cfg(tmp_path / "c.yaml", cfg)
    run = tmp_path / "run"
    # (die spec, ranks of the attempt that dies); each attempt resumes the previous one
    # ten kill points over every phase, several inside the commit (checkpoints fall on the
    # cycles c with (c + 1) % 3 == 0)
    plan = [("1:forecast", 2), ("3:store:1", 2), ("5:checkpoint:1", 4), ("7:commit", 1),
            ("9:committed", 2), ("11:checkpoint", 2), ("12:store", 1), ("14:commit:0", 4),
            ("16:forecast:1", 2), ("19:committed:0", 1)]
    done_before = 0
    for i, (spec, ranks) in enumerate(plan):
        args = ["run", str(conf), "--run-dir", str(run)] if i == 0 else ["resume", str(run)]
        r = run_cli(args, ranks, env={"SCOREDA_TEST_DIE_AT": spec})
        assert r.returncode != 0, (spec, r.stdout, r.stderr)
        prog = json.loads((run / cp.PROGRESS).read_text())  # never half-written
        assert prog["cycles_done"] >= done_before
        done_before = prog["cycles_done"]
        cycle, phase = int(spec.split(":")[0]), spec.split(":")[1]
        assert prog["cycles_done"] == (cycle + 1 if phase == "committed" else cycle), spec
        ds = cp.open_run(run)  # the store stays readable
        assert ds.sizes["cycle"] == prog["cycles_done"]
        assert np.isfinite(ds["rmse_a"].values).all()
    r = run_cli(["resume", str(run)], 4)
    assert r.returncode == 0, r.stderr
    assert "resuming" in r.stdout
    assert_same(stored(ref), stored(run), "killed and resumed vs uninterrupted")
    a, b = final_checkpoint(ref, cfg), final_checkpoint(run, cfg)
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.mpi
@needs_mpi
def test_sigkill_at_random_moment(tmp_path):
    cfg = make_cfg("letkf", cycles=60)
    ref = tmp_path / "ref"
    in_process(cfg, ref)
    conf = write_cfg(tmp_path / "c.yaml", cfg)
    run = tmp_path / "run"
    p = launch(["run", str(conf), "--run-dir", str(run)], 2)
    try:
        deadline = time.time() + 60
        while time.time() < deadline and not (run / cp.PROGRESS).exists():
            time.sleep(0.05)
        time.sleep(random.uniform(0.0, 0.3))
        os.killpg(p.pid, signal.SIGKILL)  # mpiexec and both ranks, wherever they are
        p.wait(timeout=30)
    finally:
        _killgroup(p)
    prog = json.loads((run / cp.PROGRESS).read_text())
    assert prog["cycles_done"] <= cfg.cycles
    cp.open_run(run)
    r = run_cli(["resume", str(run)], 1)
    assert r.returncode == 0, r.stderr
    assert_same(stored(ref), stored(run), f"SIGKILL after {prog['cycles_done']} cycles")


@pytest.mark.mpi
@needs_mpi
def test_sigterm_stops_cleanly_and_resume_completes(tmp_path):
    cfg = make_cfg("letkf", cycles=120)
    conf = write_cfg(tmp_path / "c.yaml", cfg)
    run = tmp_path / "run"
    p = launch(["run", str(conf), "--run-dir", str(run)], 2)
    try:
        deadline = time.time() + 60
        while time.time() < deadline:
            try:
                if json.loads((run / cp.PROGRESS).read_text())["cycles_done"] >= 1:
                    break
            except (OSError, ValueError):
                pass
            time.sleep(0.02)
        p.send_signal(signal.SIGTERM)  # mpiexec forwards it to the ranks (as srun does)
        out, err = p.communicate(timeout=60)
    finally:
        _killgroup(p)
    assert p.returncode == cp.EXIT_STOPPED, (out, err)
    assert "stopped by signal" in out
    prog = json.loads((run / cp.PROGRESS).read_text())
    assert 1 <= prog["cycles_done"] < cfg.cycles
    assert prog["checkpoint"] == prog["cycles_done"]
    assert main(["campaign", "resume", str(run)]) == 0
    ref = tmp_path / "ref"
    in_process(cfg, ref)
    assert_same(stored(ref), stored(run), "SIGTERM + resume vs uninterrupted")


# --------------------------------------------------------------------------------------------
# refused input, corrupt checkpoints, divergence, status and report (in-process, R = 1)
def test_incompatible_config_and_existing_dir_refused(tmp_path, capsys):
    cfg = make_cfg("letkf", cycles=4, burn_in=0)
    conf = write_cfg(tmp_path / "c.yaml", cfg)
    run = tmp_path / "run"
    assert main(["campaign", "run", str(conf), "--run-dir", str(run)]) == 0
    capsys.readouterr()
    assert main(["campaign", "run", str(conf), "--run-dir", str(run)]) == 2
    err = capsys.readouterr().err
    assert "exists" in err and "campaign resume" in err and "--overwrite" in err
    other = write_cfg(tmp_path / "o.yaml", make_cfg("letkf", cycles=4, burn_in=0, seed=9))
    assert main(["campaign", "resume", str(run), "--config", str(other)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "cannot resume with this config" in err and "seed" in err
    ok = write_cfg(tmp_path / "k.yaml", make_cfg("letkf", cycles=4, burn_in=0, checkpoint_every=2))
    assert main(["campaign", "resume", str(run), "--config", str(ok)]) == 0
    assert "complete" in capsys.readouterr().out
    # an edited config.yaml no longer matches the progress record
    (run / cp.CONFIG).write_text((run / cp.CONFIG).read_text().replace("seed: 3", "seed: 4"))
    assert main(["campaign", "resume", str(run)]) == 2
    assert "does not match" in capsys.readouterr().err
    assert main(["campaign", "status", str(tmp_path / "nowhere")]) == 2
    assert "no such run directory" in capsys.readouterr().err


@pytest.mark.parametrize("damage", ["truncate", "garbage", "delete", "mislabelled"])
def test_corrupt_checkpoint_names_the_file(tmp_path, capsys, damage):
    cfg = make_cfg("letkf", cycles=6, burn_in=0)
    run = tmp_path / "run"
    in_process(cfg, run)
    # pretend the last cycle was never committed: resume must load checkpoint 5
    prog = json.loads((run / cp.PROGRESS).read_text())
    cp.write_progress(run, {**prog, "cycles_done": 5, "checkpoint": 5})
    f = cp._ckpt_dir(run, 5) / "members-000000-000007.pt"
    if damage == "truncate":
        f.write_bytes(f.read_bytes()[:200])
    elif damage == "garbage":
        f.write_bytes(b"not a checkpoint at all" * 10)
    elif damage == "mislabelled":  # another run's rows under this name (files swapped by hand)
        obj = torch.load(f, weights_only=True)
        f.write_bytes(b"")
        torch.save({**obj, "members": torch.tensor([8, 15])}, f)
    else:
        f.unlink()
    assert main(["campaign", "resume", str(run)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    if damage == "delete":
        assert "incomplete checkpoint" in err and str(cp._ckpt_dir(run, 5)) in err
    elif damage == "mislabelled":
        assert str(f) in err and "holds members [8, 15], not [0, 7] as its name says" in err
    else:
        assert str(f) in err and "corrupt or truncated" in err


def test_divergence_guard_names_cycle_member_rank(tmp_path, capsys):
    cfg = make_cfg("letkf", cycles=6, burn_in=0, blowup=4.0)  # L96 states reach |x| > 4 at once
    conf = write_cfg(tmp_path / "c.yaml", cfg)
    run = tmp_path / "run"
    assert main(["campaign", "run", str(conf), "--run-dir", str(run)]) == 1
    err = capsys.readouterr().err
    assert "cycle " in err and "member " in err and "(rank 0)" in err and "not committed" in err
    prog = json.loads((run / cp.PROGRESS).read_text())
    c = int(err.split("cycle ")[1].split(":")[0])
    assert prog["cycles_done"] == c


def test_a_non_finite_truth_is_named(tmp_path, capsys):
    cfg = make_cfg("letkf", cycles=4, burn_in=0, truth_spinup=0,
                   model={"name": "lorenz96", "size": 40, "params": {"F": 16.0}, "dt": 0.2},
                   observation={"kind": "every_kth", "options": {"k": 2}, "sigma": 1.0, "every": 5})
    run = tmp_path / "run"
    assert main(["campaign", "run", str(write_cfg(tmp_path / "c.yaml", cfg)), "--run-dir",
                 str(run)]) == 1
    err = capsys.readouterr().err
    assert "cycle 0: the truth became non-finite at model.dt = 0.2; lower model.dt" in err
    assert json.loads((run / cp.PROGRESS).read_text())["cycles_done"] == 0


def _tree(d: Path) -> dict[str, bytes]:
    return {str(f.relative_to(d)): f.read_bytes() for f in sorted(d.rglob("*"))
            if f.is_file() and "logs" not in f.parts}


def test_a_failed_overwrite_puts_the_earlier_run_back(tmp_path, capsys):
    """--overwrite moves the earlier run aside until the new one commits its first cycle: a truth
    that fails its spin-up or a first cycle that diverges leaves the earlier run as it was."""
    cfg = make_cfg("letkf", cycles=3, burn_in=0)
    run = tmp_path / "run"
    assert in_process(cfg, run) == cp.EXIT_DONE
    before = _tree(run)
    bad = {"spinup": dict(model={"name": "lorenz96", "size": 40, "params": {"F": 16.0},
                                 "dt": 0.2}, truth_spinup=50),
           "cycle 0": dict(blowup=1.0)}
    for what, over in bad.items():
        conf = write_cfg(tmp_path / "bad.yaml", make_cfg("letkf", cycles=3, burn_in=0, **over))
        assert main(["campaign", "run", str(conf), "--run-dir", str(run), "--overwrite"]) == 1
        assert ("truth_spinup" if what == "spinup" else "cycle 0: member") in capsys.readouterr().err
        assert _tree(run) == before, what
        assert not (tmp_path / ".run.replaced").exists()
    # a replacement that commits a cycle removes the earlier run
    conf = write_cfg(tmp_path / "new.yaml", make_cfg("letkf", cycles=2, burn_in=0, seed=4))
    assert main(["campaign", "run", str(conf), "--run-dir", str(run), "--overwrite"]) == 0
    assert json.loads((run / cp.PROGRESS).read_text())["cycles"] == 2
    assert not (tmp_path / ".run.replaced").exists()
    # a replacement killed before its first commit leaves the earlier run aside and an
    # uncommitted one in its place: the next replacement that fails puts the earlier one back
    after = _tree(run)
    os.rename(run, tmp_path / ".run.replaced")
    (run / "debris").mkdir(parents=True)
    conf = write_cfg(tmp_path / "bad.yaml", make_cfg("letkf", cycles=3, burn_in=0, blowup=1.0))
    assert main(["campaign", "run", str(conf), "--run-dir", str(run), "--overwrite"]) == 1
    assert _tree(run) == after and not (tmp_path / ".run.replaced").exists()


def test_a_missing_or_damaged_store_is_named(tmp_path, capsys, monkeypatch):
    """resume and report of a run whose campaign.zarr is gone or garbled: one line, exit 2."""
    import shutil
    cfg = make_cfg("letkf", cycles=4, burn_in=0)
    run = tmp_path / "run"
    monkeypatch.setattr(cp.os, "_exit", lambda code: (_ for _ in ()).throw(SystemExit(code)))
    monkeypatch.setenv("SCOREDA_TEST_DIE_AT", "1:committed")
    with pytest.raises(SystemExit):
        in_process(cfg, run)
    monkeypatch.delenv("SCOREDA_TEST_DIE_AT")
    garbled = tmp_path / "garbled"
    shutil.copytree(run, garbled)
    (garbled / cp.STORE / "zarr.json").write_text("garbage")
    shutil.rmtree(run / cp.STORE)
    capsys.readouterr()
    for d in (run, garbled):
        for args in (["resume", str(d)], ["report", str(d)]):
            assert main(["campaign", *args]) == 2, (d, args)
            err = [ln for ln in capsys.readouterr().err.splitlines() if ln]
            assert len(err) == 1 and f"{d / cp.STORE}: cannot " in err[0], err
    # a progress record edited by hand: refused in one line, whatever the value
    prog = json.loads((garbled / cp.PROGRESS).read_text())
    for bad in ({"cycles_done": "five"}, {"cycles_done": -4}, {"checkpoint": 9}):
        (garbled / cp.PROGRESS).write_text(json.dumps({**prog, **bad}))
        assert main(["campaign", "resume", str(garbled)]) == 2, bad
        err = [ln for ln in capsys.readouterr().err.splitlines() if ln]
        assert len(err) == 1 and "damaged progress record" in err[0], err


@pytest.mark.mpi
@needs_mpi
def test_more_ranks_than_members_is_refused_not_hung(tmp_path):
    """A rank without members used to fail alone while the others waited for it forever."""
    conf = write_cfg(tmp_path / "c.yaml", make_cfg("ensf-gaussian", members=3, cycles=2, burn_in=0))
    run = tmp_path / "run"
    r = run_cli(["run", str(conf), "--run-dir", str(run)], 4, timeout=90)
    assert r.returncode == 2, r.stderr[-2000:]
    assert "members: 3 members cannot be split over 4 ranks; run on at most 3" in r.stderr
    assert not run.exists()
    assert run_cli(["run", str(conf), "--run-dir", str(run)], 2, timeout=90).returncode == 0
    r = run_cli(["resume", str(run)], 4, timeout=90)
    assert r.returncode == 2 and "cannot be split over 4 ranks" in r.stderr, r.stderr[-2000:]


@pytest.mark.mpi
@needs_mpi
def test_a_write_that_fails_on_one_rank_stops_every_rank(tmp_path):
    """Rank 1's θ rows of cycle 1 cannot be written (a directory where the chunk goes): every
    rank stops with one line naming the store, instead of rank 0 waiting in the commit."""
    conf = write_cfg(tmp_path / "c.yaml", make_cfg("letkf", cycles=4, burn_in=0))
    run = tmp_path / "run"
    r = run_cli(["run", str(conf), "--run-dir", str(run)], 2,
                env={"SCOREDA_TEST_DIE_AT": "1:forecast"}, timeout=90)
    assert r.returncode != 0 and json.loads((run / cp.PROGRESS).read_text())["cycles_done"] == 1
    (run / cp.STORE / "theta_particles" / "c" / "1" / "6" / "0").mkdir(parents=True)
    r = run_cli(["resume", str(run)], 2, timeout=90)
    assert r.returncode == 2, r.stderr[-2000:]
    assert f"{run / cp.STORE}: cannot write cycle 1 (IsADirectoryError" in r.stderr, r.stderr[-2000:]
    assert json.loads((run / cp.PROGRESS).read_text())["cycles_done"] == 1


def test_status_and_report(tmp_path, capsys):
    cfg = make_cfg("ensf-gaussian", cycles=8)
    run = tmp_path / "run"
    in_process(cfg, run)
    capsys.readouterr()
    assert main(["campaign", "status", str(run)]) == 0
    out = capsys.readouterr().out
    assert "8/8 cycles committed" in out and "rmse_a" in out and "ms" in out
    assert "time split per cycle" in out and "forecast" in out and "io" in out
    split = cp.timing_split(run)
    assert split is not None and set(split) == {"forecast", "analysis", "comm", "io", "wall"}
    assert all(v >= 0 for v in split.values())
    assert split["wall"] >= sum(split[p] for p in cp.PHASES)
    assert main(["campaign", "report", str(run)]) == 0
    assert (run / "report_metrics.png").stat().st_size > 1000
    md = (run / "report.md").read_text()
    assert "| analysis RMSE" in md and "θ F" in md and "time split" in md
    ds = xr.open_zarr(run / cp.STORE, consolidated=False)
    assert ds["theta_particles"].encoding["chunks"] == (1, 1, 1)
    assert ds["rmse_a"].encoding["chunks"] == (1,)


# --------------------------------------------------------------------------------------------
# observations from a file
def twin_files(tmp_path: Path, cfg: CampaignConfig) -> tuple[Path, Path]:
    """A twin campaign run (its store holds y(cycle, obs)) and an ``assimilate`` .nc output."""
    from pipeline.assimilate import assimilate
    from pipeline.config import AssimilateConfig

    run = tmp_path / "twin"
    assert in_process(cfg, run) == cp.EXIT_DONE
    data = cfg.model_dump(mode="json")
    for k in ("checkpoint_every", "keep_checkpoints", "threads", "blowup", "observations"):
        data.pop(k)
    data["stage"] = "assimilate"
    nc = tmp_path / "assim.nc"
    acfg = validate(data, AssimilateConfig)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assimilate(acfg, nc, plots=False)
    finally:
        torch.set_num_threads(threads)
    return run, nc


def test_observations_from_file_reproduce_twin_analysis(tmp_path, capsys):
    cfg = make_cfg("letkf", cycles=8)
    twin_run, nc = twin_files(tmp_path, cfg)
    ref = stored(twin_run)
    for src in (twin_run / cp.STORE, nc):
        run = tmp_path / f"file-{src.suffix[1:]}"
        fcfg = make_cfg("letkf", cycles=8, observations={"path": str(src)})
        if src.suffix == ".nc":  # through the command line's --observations
            conf = write_cfg(tmp_path / "twin.yaml", cfg)
            assert main(["campaign", "run", str(conf), "--run-dir", str(run),
                         "--observations", str(src)]) == cp.EXIT_DONE
            assert cp.read_run_config(run) == fcfg
        else:
            assert in_process(fcfg, run) == cp.EXIT_DONE
        got = stored(run)
        for k in ("y", "spread_f", "spread_a", "rmse_obs_f", "rmse_obs_a", "theta_particles",
                  "theta_mean", "theta_q05", "theta_q95", "mean_a", "spread_field"):
            assert np.array_equal(ref[k], got[k]), f"{src.name}: {k} differs"
        a, b = final_checkpoint(twin_run, cfg), final_checkpoint(run, fcfg)
        assert torch.equal(a["ensemble"], b["ensemble"]) and torch.equal(a["theta"], b["theta"])
        # no truth: truth metrics NaN, no truth fields, θ truth unknown
        for k in cp.TRUTH_METRICS:
            assert np.isnan(got[k]).all(), k
        assert "truth" not in got and "theta_truth" not in got
        assert np.isfinite(got["rmse_obs_a"]).all() and (got["rmse_obs_a"] > 0).all()
    capsys.readouterr()
    assert main(["campaign", "status", str(run)]) == 0
    out = capsys.readouterr().out
    assert "observations from" in out and "rmse_obs_a" in out
    assert main(["campaign", "report", str(run)]) == 0
    out = capsys.readouterr().out
    assert "no truth" in out and "truth unknown" in out
    md = (run / "report.md").read_text()
    assert "truth unknown" in md and "obs-space" in md
    # a resume with a changed observation file is refused
    prog = json.loads((run / cp.PROGRESS).read_text())
    cp.write_progress(run, {**prog, "cycles_done": 7, "checkpoint": 7})
    with xr.open_dataset(nc, engine="netcdf4") as ds:
        ds = ds.load()
    ds["y"][7, 0] += 1.0
    ds.to_netcdf(tmp_path / "changed.nc", engine="netcdf4")
    os.replace(tmp_path / "changed.nc", nc)
    assert main(["campaign", "resume", str(run)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(nc) in err and "differ" in err


def _obs_dataset(cycles: int = 6, m: int = 20, **over) -> xr.Dataset:
    rng = np.random.default_rng(0)
    ds = xr.Dataset({"y": (("cycle", "obs"), rng.normal(size=(cycles, m)))})
    for k, v in over.items():
        if v is None:
            ds = ds.drop_vars(k)
        else:
            ds[k] = v
    return ds


BAD_FILES = {
    "missing": (None, "does not exist"),
    "suffix": ("text", "must be netCDF (.nc) or Zarr (.zarr)"),
    "garbage": ("garbage", "cannot open the observation file"),
    "no-variable": (_obs_dataset().rename(y="obs_y"), "no variable 'y'"),
    "dims": (_obs_dataset().rename(obs="station"), "expected ('cycle', 'obs')"),
    "cycles": (_obs_dataset(cycles=3), "has 3 cycles; the config needs 4"),
    "m": (_obs_dataset(m=40), "has 40 observations per cycle"),
    "nan": (_obs_dataset(y=(("cycle", "obs"), np.where(np.eye(6, 20) > 0, np.nan, 1.0))),
            "NaN/inf value(s) in the 4 cycles used (first in cycle 0)"),
    "sigma": (_obs_dataset(sigma=(("obs",), np.r_[np.ones(19), 0.0])), "sigma must be positive"),
    "sigma-attr": (_obs_dataset().assign_attrs(sigma="loud"), "is not a number"),
    "sigma-text": (_obs_dataset(sigma=((), "abc")), "sigma is not numeric"),
}


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_bad_observation_files_refused(tmp_path, capsys, case):
    content, expect = BAD_FILES[case]
    path = tmp_path / ("obs.zarr" if case == "dims" else "obs.txt" if case == "suffix"
                       else "obs.nc")
    if isinstance(content, xr.Dataset):
        if path.suffix == ".zarr":
            content.to_zarr(path, zarr_format=3, consolidated=False)
        else:
            content.to_netcdf(path, engine="netcdf4")
    elif content is not None:
        path.write_bytes(b"this is not an observation file\n" * 20)
    cfg = make_cfg("letkf", cycles=4, burn_in=0, observations={"path": str(path)})
    conf = write_cfg(tmp_path / "c.yaml", cfg)
    run = tmp_path / "run"
    assert main(["campaign", "run", str(conf), "--run-dir", str(run)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(path) in err and expect in err, err
    assert not run.exists()  # refused before anything is written


def test_observation_file_sigma_is_used(tmp_path):
    """A per-observation σ from the file replaces observation.sigma (and is stored)."""
    cfg = make_cfg("letkf", cycles=3, burn_in=0)
    ds = _obs_dataset(cycles=3, sigma=(("obs",), np.full(20, 2.0)))
    ds["y"] = ds["y"] * 0.0 + 1.0
    path = tmp_path / "obs.nc"
    ds.to_netcdf(path, engine="netcdf4")
    fcfg = make_cfg("letkf", cycles=3, burn_in=0, observations={"path": str(path)})
    camp_obs = cp.load_observations(fcfg, 20)
    assert camp_obs is not None and isinstance(camp_obs.sigma, np.ndarray)
    assert in_process(fcfg, tmp_path / "run") == cp.EXIT_DONE
    got = xr.open_zarr(tmp_path / "run" / cp.STORE, consolidated=False)
    assert np.array_equal(got["sigma"].values, np.full(20, 2.0))
    assert np.array_equal(got["y"].values, np.ones((3, 20)))
    assert cfg.observation.sigma == 1.0


# --------------------------------------------------------------------------------------------
# timing split and the bench suite
@pytest.mark.mpi
@needs_mpi
def test_bench_campaign_quick():
    from pipeline.bench import Floors
    from pipeline.bench_campaign import campaign_suite

    entries = campaign_suite(Floors(torch.device("cpu"), repeats=1, quick=True), 1)
    assert [e.extra["ranks"] for e in entries] == [1, 2]
    for e in entries:
        assert e.suite == "campaign" and e.seconds > 0 and e.floor_seconds > 0
        x = e.extra
        assert x["wall_s"] > 0 and x["forecast_s"] > 0 and x["analysis_s"] > 0
        assert x["io_s"] > 0 and x["comm_s"] >= 0
        assert abs(sum(x[f"{p}_s"] for p in ("forecast", "analysis", "comm", "io", "other"))
                   - x["wall_s"]) < 1e-9
    assert 0 < entries[1].extra["parallel_efficiency"] == pytest.approx(
        entries[0].seconds / (2 * entries[1].seconds))


@pytest.mark.mpi
@needs_mpi
def test_observations_from_file_two_ranks(tmp_path):
    cfg = make_cfg("ensf-gaussian", cycles=6)
    twin_run = tmp_path / "twin"
    in_process(cfg, twin_run)
    fcfg = make_cfg("ensf-gaussian", cycles=6,
                    observations={"path": str(twin_run / cp.STORE)})
    conf = write_cfg(tmp_path / "c.yaml", fcfg)
    r = run_cli(["run", str(conf), "--run-dir", str(tmp_path / "rn")], 2)
    assert r.returncode == 0, r.stderr
    ref, got = stored(twin_run), stored(tmp_path / "rn")
    for k in ("y", "spread_a", "rmse_obs_a", "theta_particles", "mean_a"):
        assert np.array_equal(ref[k], got[k]), k
    assert np.isnan(got["rmse_a"]).all()
