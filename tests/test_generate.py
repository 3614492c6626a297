"""``scoreda generate | verify | export``: round trip, crash-resume, concurrency, MPI, bad input."""

from __future__ import annotations

import json
import os
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

from kernels.dynamics import get_model
from kernels.streams import per_member
from pipeline import store as st
from pipeline.cli import main
from pipeline.config import GenerateConfig, validate
from pipeline.generate import generate, integrate, theta_paths, verify
from pipeline.simulate import DivergenceError

ROOT = Path(__file__).resolve().parents[1]
PYTHON = sys.executable
ENV = {**os.environ, "SCOREDA_NO_PROGRESS": "1", "PYTHONPATH": str(ROOT)}


def make_cfg(**over) -> GenerateConfig:
    data = {
        "stage": "generate",
        "model": {"name": "lorenz96", "size": 16, "dt": 0.05},
        "trajectories": 6, "frames": 8, "save_every": 2, "spinup": 10, "seed": 11,
        "dtype": "float64",
        "store": {"trajectories_per_shard": 2, "shard_frames": 4, "chunk_frames": 2},
        "dask": {"workers": 2},
    }
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(data.get(key), dict):
            data[key] = {**data[key], **value}
        else:
            data[key] = value
    cfg = validate(data, GenerateConfig)
    assert isinstance(cfg, GenerateConfig)
    return cfg


def write_cfg(path: Path, cfg: GenerateConfig) -> Path:
    d = cfg.model_dump(mode="json")
    d.pop("out")
    path.write_text(yaml.safe_dump(d))
    return path


@pytest.fixture(scope="module")
def client():
    """One 2-worker LocalCluster for the in-process tests (starting one costs seconds)."""
    from distributed import Client, LocalCluster

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                      dashboard_address=None) as cluster, Client(cluster) as c:
        yield c


def direct(cfg: GenerateConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Trajectories ``(N, T, *state)`` and θ ``(N, P)`` integrated in memory, one batch, no store."""
    model = cfg.model.build()
    n = range(cfg.trajectories)
    theta = per_member(lambda g: model.sample_prior(1, g, dtype=torch.float64)[0], cfg.seed, n,
                       "theta")
    x0 = per_member(lambda g: model.initial_state(1, g, dtype=torch.float64)[0], cfg.seed, n, "init")
    dtype = getattr(torch, cfg.dtype)
    th, x = theta.to(dtype), x0.to(dtype)
    threads = torch.get_num_threads()
    torch.set_num_threads(cfg.dask.threads_per_worker)  # the thread count changes the last bits
    try:
        x = model.advance(x, th, cfg.spinup, cfg.model.dt)
        traj = model.rollout(x, th, (cfg.frames - 1) * cfg.save_every, save_every=cfg.save_every,
                             dt=cfg.model.dt)
    finally:
        torch.set_num_threads(threads)
    return traj, theta


def load_arrays(path: Path) -> dict[str, np.ndarray]:
    with xr.open_zarr(path, consolidated=False) as ds:
        return {k: ds[k].values for k in ds.data_vars}


def shard_files(path: Path) -> dict[str, int]:
    """Chunk/shard files of the state arrays with their modification times."""
    return {str(p.relative_to(path)): p.stat().st_mtime_ns
            for p in path.rglob("*") if p.is_file() and "/c/" in str(p.relative_to(path))}


# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("model,size,grids", [("lorenz96", 16, [16, 8]),
                                               ("kolmogorov", 16, [16, 8]),
                                               ("fhn", 8, None)])
def test_round_trip_equals_direct_integration(tmp_path, client, model, size, grids):
    cfg = make_cfg(model={"name": model, "size": size, "dt": {"kolmogorov": 0.01, "fhn": 0.05}
                          .get(model, 0.05)}, store={"grids": grids})
    out = tmp_path / "s.zarr"
    res = generate(cfg, out, client=client, echo=lambda s: None)
    assert res.shards_written == res.shards_total == 6 and not res.resumed
    traj, theta = direct(cfg)
    m = get_model(model, size)
    with xr.open_zarr(out, consolidated=False) as ds:
        assert ds["theta"].dims == ("trajectory", "time", "param")
        np.testing.assert_array_equal(ds["theta"].values, theta[:, None].expand(-1, 8, -1).numpy())
        if len(m.variables) > 1:
            for i, v in enumerate(m.variables):
                assert ds[v].dims == ("trajectory", "time", *m.state_dims[1:])
                np.testing.assert_array_equal(ds[v].values, traj[:, :, i].numpy())
        else:
            v = m.variables[0]
            assert ds[v].dims == ("trajectory", "time", *m.state_dims)
            np.testing.assert_array_equal(ds[v].values, traj.numpy())  # bit for bit
            if grids:
                coarse = ds[f"{v}_8"].values
                f = size // 8
                blocks = traj.numpy().reshape(*traj.shape[:2], *sum(([8, f] for _ in m.state_dims), []))
                want = blocks.mean(axis=tuple(range(3, 3 + 2 * len(m.state_dims), 2)))
                np.testing.assert_allclose(coarse, want, rtol=1e-12, atol=1e-12)
                assert ds[f"{v}_8"].dims[-1] == m.state_dims[-1] + "_8"
        assert ds.attrs["model"] == model and ds.attrs["config_hash"] == st.config_hash(cfg)
        assert set(np.unique(ds["split"].values)) <= {0, 1, 2}
        np.testing.assert_allclose(np.diff(ds["time"].values), cfg.save_every * cfg.model.dt)
        enc = ds[m.variables[0]].encoding
        assert enc["shards"][:2] == (2, 4) and enc["chunks"][:2] == (1, 2)
    assert verify(out, samples=2, seed=0).ok


def test_theta_walk_is_a_markov_augmented_state(tmp_path, client):
    cfg = make_cfg(theta={"mode": "walk", "walk_std": 0.1})
    out = tmp_path / "w.zarr"
    generate(cfg, out, client=client, echo=lambda s: None)
    model = cfg.model.build()
    with xr.open_zarr(out, consolidated=False) as ds:
        theta = torch.from_numpy(ds["theta"].values)
        x = torch.from_numpy(ds["x"].values)
    u = model.to_unconstrained(theta)
    inc = (u[:, 1:] - u[:, :-1]).flatten()
    assert 0.03 < float(inc.std()) < 0.3  # the roughening increments, std walk_std
    # saved state k+1 is saved state k integrated with θ_k: the augmented state is Markov
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for k in range(cfg.frames - 1):
            nxt = model.advance(x[:, k], theta[:, k], cfg.save_every, cfg.model.dt)
            torch.testing.assert_close(nxt, x[:, k + 1], rtol=0, atol=0)
    finally:
        torch.set_num_threads(threads)
    assert verify(out, samples=3, seed=1).ok


def test_theta_prior_override_keeps_each_trajectory_quantile():
    base = make_cfg(trajectories=64, store={"trajectories_per_shard": 4})
    model = base.model.build()
    trajs = range(64)
    u0 = theta_paths(model, base, trajs)[:, 0, 0]
    # no override: the model's own prior draws, bit for bit, and the store identity of before
    want = per_member(lambda g: model.sample_prior(1, g, dtype=torch.float64)[0], base.seed,
                      trajs, "theta")[:, 0]
    torch.testing.assert_close(u0, want, rtol=0, atol=0)
    assert "prior" not in st.hashed_config(base)["theta"]
    z = (u0 - 8.0) / 2.0                           # F's prior: N(8, 2²)
    wide = make_cfg(trajectories=64, store={"trajectories_per_shard": 4},
                    theta={"prior": {"F": {"normal": [9.0, 3.0]}}})
    torch.testing.assert_close(theta_paths(model, wide, trajs)[:, 0, 0], 9.0 + 3.0 * z)
    flat = make_cfg(trajectories=64, store={"trajectories_per_shard": 4},
                    theta={"prior": {"F": {"uniform": [4.0, 12.0]}}})
    uni = theta_paths(model, flat, trajs)[:, 0, 0]
    torch.testing.assert_close(uni, 4.0 + 8.0 * torch.special.ndtr(z))
    assert 4.0 < float(uni.min()) and float(uni.max()) < 12.0
    assert len({st.config_hash(c) for c in (base, wide, flat)}) == 3
    # a walk reverts to the override's centre
    walk = make_cfg(trajectories=64, store={"trajectories_per_shard": 4},
                    theta={"mode": "walk", "walk_std": 0.5, "walk_reversion": 0.5,
                           "prior": {"F": {"normal": [20.0, 0.1]}}})
    assert abs(float(theta_paths(model, walk, trajs)[:, -1, 0].mean()) - 20.0) < 0.5


@pytest.mark.parametrize("theta,needle", [
    ({"prior": {"G": {"normal": [1.0, 1.0]}}}, "theta.prior.G: lorenz96 has no parameter 'G'"),
    ({"prior": {"F": {"uniform": [-60.0, 1.0]}}}, "theta.prior.F.uniform: [-60.0, 1.0] leaves"),
    ({"prior": {"F": {"normal": [1.0, 0.0]}}}, "theta.prior.F.normal: scale 0.0 must be positive"),
    ({"mode": "fixed", "prior": {"F": {"normal": [1.0, 1.0]}}}, "theta.prior: only θ drawn"),
])
def test_bad_theta_prior_is_one_line(tmp_path, capsys, theta, needle):
    d = make_cfg().model_dump(mode="json")
    d["theta"] = {**d["theta"], **theta}
    conf = tmp_path / "bad.yaml"
    conf.write_text(yaml.safe_dump(d))
    assert main(["generate", str(conf), "--out", str(tmp_path / "x.zarr")]) == 2
    assert needle in _one_line_error(capsys)
    assert not (tmp_path / "x.zarr").exists()


# dt 0.4 at 16²: the low-drag draw (trajectory 3: ν 6.9e-4, μ 0.036) outruns RK4 in the interval
# to saved time 7; the other five stay stable
UNSTABLE = {"model": {"name": "kolmogorov", "size": 16, "dt": 0.4}}


def test_a_failing_trajectory_halves_its_step_from_the_failing_interval_on(tmp_path, client):
    fixed = make_cfg(**UNSTABLE, max_refinements=0)
    with pytest.raises(DivergenceError, match=r"trajectory 3 .* by saved time 7, even at dt = 0\.4 "
                                              r"\(max_refinements: 0\)"):
        list(integrate(fixed, range(6)))
    cfg = make_cfg(**UNSTABLE)
    assert cfg.max_refinements == 3
    # the cap decides only when to give up, never a finished shard's numbers
    assert st.config_hash(cfg) == st.config_hash(fixed)
    out, lines = tmp_path / "s.zarr", []
    res = generate(cfg, out, client=client, echo=lines.append)
    assert res.refined == {3: 1}
    assert any("1 trajectory needed a smaller step than dt = 0.4: 3 (dt/2)" in s for s in lines)
    traj, theta = direct(fixed)  # fixed step, one batch, no check
    stored = load_arrays(out)["vorticity"]
    others = [0, 1, 2, 4, 5]
    np.testing.assert_array_equal(stored[others], traj[others].numpy())  # bit for bit
    np.testing.assert_array_equal(stored[3, :7], traj[3, :7].numpy())
    # from frame 6 on: 2 × 2 steps of dt/2; the fixed step's frame 7 had blown up
    model = cfg.model.build()
    threads = torch.get_num_threads()
    torch.set_num_threads(cfg.dask.threads_per_worker)  # as the workers: the last bits depend on it
    try:
        half = model.advance(traj[3:4, 6], theta[3:4], 4, 0.2)
    finally:
        torch.set_num_threads(threads)
    np.testing.assert_array_equal(stored[3, 7], half[0].numpy())
    assert bool(model.unstable(traj[3:4, 6], traj[3:4, 7], 0.8)) and np.isfinite(stored).all()
    # the shard of trajectories 2–3 that holds frame 7 records the halving; the earlier one not
    assert json.loads(st.marker_path(out, 1, 1).read_text())["refined"] == {"3": 1}
    assert json.loads(st.marker_path(out, 1, 0).read_text())["refined"] == {}
    assert verify(out, samples=6).ok  # recomputed alone: the same halving, bit for bit


def test_a_trajectory_past_every_refinement_stops_the_run_clearly(tmp_path, capsys):
    # no dashboard (the config's is :8787): nothing binds 8787, which another cluster in this
    # session may hold
    cfg = make_cfg(**UNSTABLE, max_refinements=0)
    assert cfg.dask.dashboard == ":8787"
    path = write_cfg(tmp_path / "g.yaml", cfg)
    out = tmp_path / "s.zarr"
    assert main(["generate", str(path), "--out", str(out), "--workers", "1", "--no-dashboard"]) == 1
    cap = capsys.readouterr()
    assert "dashboard: off (dask.dashboard: null)" in cap.out
    err = cap.err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("scoreda: error: trajectory 3 (θ = [") and "max_refinements: 0" in err[0]


def test_a_failed_overwrite_puts_the_earlier_store_back(tmp_path, client, capsys):
    """--overwrite keeps the earlier store aside until the new one has a shard: a config whose
    every trajectory outruns its step leaves the earlier store as it was."""
    out = tmp_path / "s.zarr"
    generate(make_cfg(), out, client=client, echo=lambda s: None)

    def tree() -> dict[str, bytes]:
        return {str(f.relative_to(out)): f.read_bytes() for f in sorted(out.rglob("*"))
                if f.is_file()}

    before = tree()
    bad = make_cfg(model={"name": "lorenz96", "size": 16, "dt": 0.9}, max_refinements=0)
    path = write_cfg(tmp_path / "g.yaml", bad)
    assert main(["generate", str(path), "--out", str(out), "--overwrite", "--workers", "1",
                 "--no-dashboard"]) == 1
    assert "max_refinements: 0" in capsys.readouterr().err
    assert tree() == before and not (tmp_path / ".s.zarr.replaced").exists()
    assert verify(out, samples=2, seed=0).ok
    # a replacement that writes its shards removes the earlier store
    generate(make_cfg(seed=12), out, overwrite=True, client=client, echo=lambda s: None)
    assert not (tmp_path / ".s.zarr.replaced").exists() and verify(out, samples=2, seed=0).ok


def test_two_workers_repeated_no_lost_or_corrupt_shards(tmp_path, client):
    cfg = make_cfg(model={"name": "kolmogorov", "size": 16, "dt": 0.01}, trajectories=24,
                   dtype="float32", store={"grids": [16, 8]})
    ref = None
    for rep in range(3):
        out = tmp_path / "s.zarr"
        res = generate(cfg, out, overwrite=rep > 0, client=client, echo=lambda s: None)
        assert res.shards_written == 24 and not res.resumed
        marks = st.finished_shards(out)
        assert sorted(marks) == [(b, c) for b in range(12) for c in range(2)]
        with xr.open_zarr(out, consolidated=False) as ds:
            for (b, c), mk in marks.items():
                for name in ("vorticity", "vorticity_8"):
                    shard = ds[name].isel(trajectory=slice(2 * b, 2 * b + 2),
                                          time=slice(4 * c, 4 * c + 4)).values
                    assert st.checksum(shard) == mk["checksums"][name]
                    assert np.isfinite(shard).all()
        arrays = load_arrays(out)
        if ref is None:
            ref = arrays
        else:
            for k, v in ref.items():
                np.testing.assert_array_equal(arrays[k], v)


@pytest.mark.slow
def test_sigkill_then_resume_equals_uninterrupted(tmp_path, client):
    cfg = make_cfg(model={"name": "kolmogorov", "size": 32, "dt": 0.01}, trajectories=16,
                   frames=16, save_every=10, spinup=100, dtype="float32",
                   store={"trajectories_per_shard": 2, "shard_frames": 8, "chunk_frames": 4,
                          "grids": [32, 16]})
    conf = write_cfg(tmp_path / "gen.yaml", cfg)
    out = tmp_path / "killed.zarr"
    cmd = [PYTHON, "-m", "pipeline.cli", "generate", str(conf), "--out", str(out), "--workers", "1"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            start_new_session=True)
    deadline = time.monotonic() + 90
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if len(st.finished_shards(out)) >= 3:
                break
            time.sleep(0.05)
        assert proc.poll() is None, "generation finished before it could be killed"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(30)
    finally:
        time.sleep(0.5)  # let the worker processes notice that their parent is gone
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # whatever of this test's process group is left
        except ProcessLookupError:
            pass
        proc.communicate()
    before = st.finished_shards(out)
    total = 16
    assert 3 <= len(before) < total
    files_before = shard_files(out)
    marker_times = {k: st.marker_path(out, *k).stat().st_mtime_ns for k in before}

    rerun = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=180)
    assert rerun.returncode == 0, rerun.stderr
    assert f"resuming, {len(before)} of {total} shards finished" in rerun.stdout
    assert f"wrote {total - len(before)} shards" in rerun.stdout
    after = st.finished_shards(out)
    assert sorted(after) == [(b, c) for b in range(8) for c in range(2)]
    for k, mk in before.items():  # finished shards were neither recomputed nor rewritten
        assert after[k] == mk
        assert st.marker_path(out, *k).stat().st_mtime_ns == marker_times[k]
    files_after = shard_files(out)
    for (b, c) in before:
        for name in ("vorticity", "vorticity_16"):
            key = f"{name}/c/{b}/{c}/0/0"
            assert files_after[key] == files_before[key]

    ref = tmp_path / "ref.zarr"
    generate(cfg, ref, client=client, echo=lambda s: None)
    a, b = load_arrays(out), load_arrays(ref)
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])


@pytest.mark.mpi
@pytest.mark.slow
def test_dask_mpi_under_mpiexec(tmp_path, client):
    mpiexec = Path(PYTHON).parent / "mpiexec"
    if not mpiexec.exists():
        pytest.skip("no mpiexec in the venv")
    cfg = make_cfg(trajectories=8)
    conf = write_cfg(tmp_path / "gen.yaml", cfg)
    out = tmp_path / "mpi.zarr"
    r = subprocess.run([str(mpiexec), "-n", "3", PYTHON, "-m", "pipeline.cli", "generate", str(conf),
                        "--out", str(out)], cwd=ROOT, env=ENV, capture_output=True, text=True,
                       timeout=180)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "1 Dask workers" in r.stdout
    ref = tmp_path / "ref.zarr"
    generate(cfg, ref, client=client, echo=lambda s: None)
    a, b = load_arrays(out), load_arrays(ref)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
    assert st.status(out).complete


# --------------------------------------------------------------------------------------------
def _tree(path: Path) -> dict[str, tuple[int, int]]:
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for p in path.rglob("*") if p.is_file()}


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("scoreda: error: ") and "\n" not in err, err
    return err


@pytest.mark.parametrize("change,needle", [
    ({"model": {"name": "navier"}}, "model.name"),
    ({"store": {"chunk_frames": 3}}, "store.chunk_frames: 3 does not divide"),
    ({"store": {"shard_frames": 3}}, "store.shard_frames: 3 does not divide frames"),
    ({"store": {"trajectories_per_shard": 4}}, "store.trajectories_per_shard: 4 does not divide"),
    ({"store": {"grids": [5]}}, "store.grids: stored grid 5 does not divide"),
])
def test_bad_config_is_one_line(tmp_path, capsys, change, needle):
    d = make_cfg().model_dump(mode="json")
    for k, v in change.items():
        d[k] = {**d[k], **v}
    conf = tmp_path / "bad.yaml"
    conf.write_text(yaml.safe_dump(d))
    assert main(["generate", str(conf), "--out", str(tmp_path / "x.zarr")]) == 2
    assert needle in _one_line_error(capsys)
    assert not (tmp_path / "x.zarr").exists()


def test_existing_store_other_config_refused_unchanged(tmp_path, capsys, client):
    cfg = make_cfg()
    out = tmp_path / "s.zarr"
    generate(cfg, out, client=client, echo=lambda s: None)
    before = _tree(out)
    other = write_cfg(tmp_path / "other.yaml", make_cfg(seed=12))
    assert main(["generate", str(other), "--out", str(out)]) == 2
    err = _one_line_error(capsys)
    assert "different config" in err and "seed: 11 in the store, 12 now" in err and "--overwrite" in err
    assert _tree(out) == before
    # a foreign directory is not touched either
    foreign = tmp_path / "foreign.zarr"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("mine")
    assert main(["generate", str(other), "--out", str(foreign)]) == 2
    assert "not a scoreda trajectory store" in _one_line_error(capsys)
    assert (foreign / "keep.txt").read_text() == "mine"


def test_second_writer_is_refused_while_the_first_holds_the_store(tmp_path, capsys, client):
    """A second `scoreda generate` on a store another process is writing exits 2 and leaves it
    alone; the lock goes with the holder, even when it is killed (SIGKILL)."""
    cfg = make_cfg()
    out = tmp_path / "s.zarr"
    generate(cfg, out, client=client, echo=lambda s: None)
    before = _tree(out)
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from pathlib import Path; "
         "from pipeline.store import writer_lock\n"
         f"with writer_lock(Path({str(out)!r})):\n print('held', flush=True); time.sleep(60)"],
        cwd=ROOT, env=ENV, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        conf = write_cfg(tmp_path / "g.yaml", cfg)
        for extra in ([], ["--overwrite"]):
            assert main(["generate", str(conf), "--out", str(out), *extra]) == 2
            assert "another `scoreda generate` is writing this store" in _one_line_error(capsys)
            assert _tree(out) == before
    finally:
        holder.kill()
        holder.wait()
    res = generate(cfg, out, client=client, echo=lambda s: None)
    assert res.resumed and res.shards_written == 0


def test_unwritable_and_bad_paths(tmp_path, capsys):
    conf = write_cfg(tmp_path / "g.yaml", make_cfg())
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert main(["generate", str(conf), "--out", str(blocker / "s.zarr")]) == 2
    assert "is not a directory" in _one_line_error(capsys)
    assert blocker.read_text() == "x"
    assert main(["generate", str(conf), "--out", str(tmp_path / "s.nc")]) == 2
    assert "must end in .zarr" in _one_line_error(capsys)
    if os.geteuid() != 0:  # root may write anywhere
        ro = tmp_path / "ro"
        ro.mkdir(mode=0o500)
        assert main(["generate", str(conf), "--out", str(ro / "s.zarr")]) == 2
        assert "not writable" in _one_line_error(capsys)
    assert main(["verify", str(tmp_path / "none.zarr")]) == 2
    assert "no such store" in _one_line_error(capsys)


def test_export_netcdf_and_verify_detects_corruption(tmp_path, capsys, client):
    cfg = make_cfg(store={"grids": [16, 8]})
    out = tmp_path / "s.zarr"
    generate(cfg, out, client=client, echo=lambda s: None)
    nc = tmp_path / "part.nc"
    assert main(["export", str(out), "--netcdf", str(nc), "--select", "trajectory=2:5",
                 "--select", "time=0:8:2"]) == 0
    with xr.open_dataset(nc) as ds, xr.open_zarr(out, consolidated=False) as z:
        assert ds.sizes["trajectory"] == 3 and ds.sizes["time"] == 4
        np.testing.assert_array_equal(ds["x"].values, z["x"].values[2:5, 0:8:2])
        assert ds.attrs["Conventions"] == "CF-1.8" and ds["time"].attrs["axis"] == "T"
        assert ds["split"].attrs["flag_meanings"] == "train valid test"
    test = tmp_path / "test.nc"
    assert main(["export", str(out), "--netcdf", str(test), "--select", "split=test"]) == 0
    assert main(["export", str(out), "--netcdf", str(test), "--select", "foo=1:2"]) == 2
    capsys.readouterr()
    # selections that are empty or malformed are refused, writing nothing
    empty = tmp_path / "empty.nc"
    for select, needle in (("trajectory=5:2", "selects no trajectory of the store's"),
                           ("time=100:200", "selects no time of the store's"),
                           ("time=0:10:-1", "STEP must be positive"),
                           ("time=0:10:0", "STEP must be positive")):
        assert main(["export", str(out), "--netcdf", str(empty), "--select", select]) == 2
        assert needle in _one_line_error(capsys) and not empty.exists()
    assert main(["verify", str(out), "--samples", "0"]) == 2
    assert "--samples: 0" in _one_line_error(capsys)

    assert main(["verify", str(out), "--samples", "6"]) == 0
    assert "bit-identical" in capsys.readouterr().out
    # flip one stored value of trajectory 0, keeping the file readable
    import zarr

    arr = zarr.open_array(out, path="x", mode="r+")
    block = arr[0:2, 0:4]
    block[0, 1, 3] += 1.0
    arr[0:2, 0:4] = block
    assert main(["verify", str(out), "--samples", "6"]) == 1
    text = capsys.readouterr().out
    assert "MISMATCH trajectory 0: x at frames 0:4" in text and "checksum differs" in text
    # a damaged chunk is named by export in one line; a garbled marker is a verify finding
    chunk = next(f for f in sorted((out / "x" / "c").rglob("*")) if f.is_file())
    chunk.write_bytes(chunk.read_bytes()[:100])
    assert main(["export", str(out), "--netcdf", str(tmp_path / "d.nc")]) == 2
    assert "cannot read the selection" in _one_line_error(capsys)

    # an unfinished store refuses to export the unfinished part
    (st.marker_path(out, 2, 1)).unlink()
    assert main(["export", str(out), "--netcdf", str(tmp_path / "all.nc")]) == 2
    assert "trajectory 4" in _one_line_error(capsys)
    st.marker_path(out, 1, 0).write_text("{not json")
    assert main(["verify", str(out), "--samples", "1", "--seed", "5"]) == 1
    assert "_progress/shard-000001-0000.json: unreadable shard marker" in capsys.readouterr().out
    import shutil
    shutil.rmtree(out / "x")
    assert main(["export", str(out), "--netcdf", str(tmp_path / "nox.nc")]) == 2
    assert "variable 'x' is missing from the store" in _one_line_error(capsys)


def test_example_configs_validate():
    from pipeline.config import example_names, example_path, load_config

    names = [n for n in example_names() if n.startswith("generate_")]
    assert {"generate_demo", "generate_kolmogorov_128", "generate_kolmogorov_512"} <= set(names)
    for n in names:
        cfg = load_config(example_path(n))
        assert isinstance(cfg, GenerateConfig)
        lay = st.layout(cfg)
        assert lay.shards >= 1


def test_marker_is_json_with_checksums(tmp_path, client):
    cfg = make_cfg(trajectories=2)
    out = tmp_path / "s.zarr"
    generate(cfg, out, client=client, echo=lambda s: None)
    mk = json.loads(st.marker_path(out, 0, 1).read_text())
    assert mk["block"] == 0 and mk["time_block"] == 1 and set(mk["checksums"]) == {"x"}
