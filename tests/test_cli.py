"""The CLI round-trips through xarray with the documented dims, and fails cleanly on bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import xarray as xr

from kernels.dynamics import get_model
from kernels.streams import generator
from pipeline.cli import main

SCOREDA = [sys.executable, "-m", "pipeline.cli"]


@pytest.mark.parametrize(
    "model,size,dims",
    [
        ("lorenz96", 12, {"x": ("member", "time", "site")}),
        ("fhn", 8, {"v": ("member", "time", "neuron"), "w": ("member", "time", "neuron")}),
        ("kolmogorov", 16, {"vorticity": ("member", "time", "y", "x")}),
        ("kdv", 32, {"u": ("member", "time", "x")}),
    ],
)
@pytest.mark.parametrize("suffix", [".nc", ".zarr"])
def test_simulate_round_trip(tmp_path, model, size, dims, suffix):
    out = tmp_path / f"run{suffix}"
    rc = main(["simulate", model, "--size", str(size), "--members", "3", "--steps", "6",
               "--save-every", "2", "--seed", "5", "--dtype", "float64", "--out", str(out)])
    assert rc == 0
    ds = xr.open_zarr(out, consolidated=False) if suffix == ".zarr" else xr.open_dataset(out)
    for var, d in dims.items():
        assert ds[var].dims == d
        assert ds[var].attrs["units"]
        assert ds.sizes["time"] == 4 and ds.sizes["member"] == 3
    assert ds["theta"].dims == ("member", "param")
    assert ds.attrs["model"] == model and "config" in ds.attrs
    assert (tmp_path / "run.config.yaml").is_file()
    np.testing.assert_allclose(ds["time"].values[1] - ds["time"].values[0],
                               2 * float(ds.attrs["dt"]))
    # member 1 is reproducible alone from its own stream
    m = get_model(model, size)
    x0 = m.initial_state(1, generator(5, "init", 1), dtype=torch.float64)
    first = np.stack([ds[v].isel(member=1, time=0).values for v in dims]) if len(dims) > 1 \
        else ds[next(iter(dims))].isel(member=1, time=0).values
    np.testing.assert_array_equal(first.reshape(x0.shape[1:]), x0[0].numpy())
    ds.close()


def test_simulate_param_prior_and_override(tmp_path):
    out = tmp_path / "p.nc"
    assert main(["simulate", "lorenz96", "--size", "8", "--members", "2", "--steps", "2",
                 "--param", "F=3.5", "--out", str(out)]) == 0
    with xr.open_dataset(out) as ds:
        assert np.all(ds["theta_F"].values == 3.5)
    out2 = tmp_path / "q.nc"
    assert main(["simulate", "fhn", "--size", "8", "--members", "4", "--steps", "2",
                 "--theta", "prior", "--out", str(out2)]) == 0
    with xr.open_dataset(out2) as ds:
        assert len(np.unique(ds["theta_tau"].values)) == 4


def test_replacing_keeps_the_earlier_run_until_the_new_one_commits(tmp_path):
    from pipeline.storage import Replacing

    run, aside = tmp_path / "run", tmp_path / ".run.replaced"

    def make(d: Path, text: str) -> None:
        d.mkdir()
        (d / "f").write_text(text)

    make(run, "old")
    rep = Replacing(run, overwrite=True)
    assert not run.exists() and (aside / "f").read_text() == "old"
    make(run, "new")
    rep.failed()  # before a commit: the new run goes, the old one is back
    assert (run / "f").read_text() == "old" and not aside.exists()
    rep = Replacing(run, overwrite=True)
    make(run, "new")
    rep.committed()
    rep.failed()  # after a commit the new run stays
    assert (run / "f").read_text() == "new" and not aside.exists()
    # killed before its commit: the next replacement takes the aside as the run it replaces
    # (the uncommitted one goes); without overwrite the aside is never touched
    run.rename(aside)
    make(run, "killed")
    rep = Replacing(run, overwrite=True)
    assert not run.exists() and (aside / "f").read_text() == "new"
    rep.failed()
    assert (run / "f").read_text() == "new"
    fresh = tmp_path / "fresh"
    (tmp_path / ".fresh.replaced").mkdir()
    rep = Replacing(fresh, overwrite=False)
    make(fresh, "x")
    rep.committed()
    assert (tmp_path / ".fresh.replaced").exists()
    rep = Replacing(tmp_path / "other", overwrite=False, keep_fresh=True)
    make(tmp_path / "other", "y")
    rep.failed()  # a fresh run kept on failure (a campaign at cycle 0 can be resumed)
    assert (tmp_path / "other" / "f").exists()


def test_refuses_overwrite_and_bad_input(tmp_path, capsys):
    out = tmp_path / "a.nc"
    assert main(["simulate", "lorenz96", "--size", "8", "--steps", "2", "--out", str(out)]) == 0
    before = out.read_bytes()
    rc = main(["simulate", "lorenz96", "--size", "8", "--steps", "4", "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 2 and "exists" in err and str(out) in err and err.count("\n") == 1
    assert out.read_bytes() == before
    # a.zarr would write its config over a.nc's (a.config.yaml): refused, nothing written
    conf = (tmp_path / "a.config.yaml").read_bytes()
    rc = main(["simulate", "lorenz96", "--size", "8", "--steps", "4", "--out",
               str(tmp_path / "a.zarr")])
    err = capsys.readouterr().err
    assert rc == 2 and "a.config.yaml: exists (beside another output" in err
    assert (tmp_path / "a.config.yaml").read_bytes() == conf and not (tmp_path / "a.zarr").exists()
    rc = main(["simulate", "lorenz96", "--param", "G=1", "--out", str(tmp_path / "b.nc")])
    err = capsys.readouterr().err
    assert rc == 2 and "model.params.G" in err and not (tmp_path / "b.nc").exists()
    rc = main(["simulate", "lorenz96", "--out", str(tmp_path / "c.txt")])
    assert rc == 2 and ".nc" in capsys.readouterr().err
    rc = main(["simulate", "lorenz96", "--steps", "5", "--save-every", "2",
               "--out", str(tmp_path / "d.nc")])
    assert rc == 2 and "steps" in capsys.readouterr().err


def test_divergence_writes_nothing(tmp_path, capsys):
    out = tmp_path / "blow.nc"
    rc = main(["simulate", "lorenz96", "--size", "8", "--steps", "200", "--dt", "2.0",
               "--out", str(out)])
    assert rc == 1 and "non-finite" in capsys.readouterr().err
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_simulate_halves_the_step_of_a_failing_member(tmp_path, capsys):
    # dt 0.4 at 16²: the low-drag draw of member 3 outruns RK4 (as trajectory 3 of the generate
    # tests: the same streams); the other members keep dt
    args = ["simulate", "kolmogorov", "--size", "16", "--dt", "0.4", "--steps", "14",
            "--save-every", "2", "--spinup", "10", "--seed", "11", "--theta", "prior",
            "--dtype", "float64"]
    assert main([*args, "--members", "6", "--out", str(tmp_path / "a.nc")]) == 0
    assert "1 member(s) needed a smaller step than dt = 0.4: 3 (dt/2)" in capsys.readouterr().out
    a = xr.open_dataset(tmp_path / "a.nc")
    assert json.loads(a.attrs["refined"]) == {"3": 1} and np.isfinite(a["vorticity"]).all()
    assert main([*args, "--members", "3", "--out", str(tmp_path / "b.nc")]) == 0
    b = xr.open_dataset(tmp_path / "b.nc")
    assert json.loads(b.attrs["refined"]) == {}
    np.testing.assert_allclose(a["vorticity"][:3], b["vorticity"], rtol=1e-12, atol=1e-12)
    # without refinement the member stops the run, naming it, and nothing is written
    conf = tmp_path / "s.yaml"
    conf.write_text("stage: simulate\nmodel: {name: kolmogorov}\nmax_refinements: 0\n")
    assert main(["simulate", "--config", str(conf), *args[2:], "--members", "6",
                 "--out", str(tmp_path / "c.nc")]) == 1
    err = capsys.readouterr().err
    assert "member 3 (θ = [" in err and "even at dt = 0.4 (max_refinements: 0)" in err
    assert not (tmp_path / "c.nc").exists()


def test_config_show_and_list():
    r = subprocess.run(SCOREDA + ["config", "show", "simulate_kolmogorov"], capture_output=True,
                       text=True, check=True)
    assert "kolmogorov" in r.stdout and "#" in r.stdout
    r = subprocess.run(SCOREDA + ["config", "list"], capture_output=True, text=True, check=True)
    assert "simulate_lorenz96" in r.stdout.split()
    r = subprocess.run(SCOREDA + ["config", "show", "nope"], capture_output=True, text=True)
    assert r.returncode == 2 and "nope" in r.stderr


def test_simulate_from_config_with_overrides(tmp_path):
    out = tmp_path / "k.zarr"
    assert main(["simulate", "--config", "simulate_kolmogorov", "--size", "16", "--steps", "4",
                 "--save-every", "2", "--spinup", "0", "--out", str(out)]) == 0
    with xr.open_zarr(out, consolidated=False) as ds:
        assert ds.sizes["x"] == 16 and ds.sizes["time"] == 3
        assert ds.attrs["spinup_steps"] == 0


def test_cuda_without_an_index_spreads_a_jobs_ranks_over_the_node_gpus(monkeypatch):
    from pipeline.config import ConfigError
    from pipeline.runtime import compute_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    for var in ("LOCAL_RANK", "SLURM_LOCALID", "MPI_LOCALRANKID", "OMPI_COMM_WORLD_LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    assert compute_device("cuda") == torch.device("cuda", 0)
    monkeypatch.setenv("MPI_LOCALRANKID", "3")            # mpiexec: 4th rank on the node
    assert compute_device("cuda") == torch.device("cuda", 1)
    monkeypatch.setenv("LOCAL_RANK", "2")                 # torchrun's own variable comes first
    assert compute_device("cuda") == torch.device("cuda", 0)
    assert compute_device("cuda:1") == torch.device("cuda", 1)
    with pytest.raises(ConfigError, match=r"device: 'cuda:2'.* 2 CUDA"):
        compute_device("cuda:2")
    assert compute_device("cpu") == torch.device("cpu")


def test_a_gpu_config_without_a_gpu_fails_in_one_line_and_writes_nothing(tmp_path, capsys,
                                                                        monkeypatch):
    import yaml

    from pipeline.config import load_yaml, resolve_config_path

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for stage, name, flag in (("train", "train_demo", "--run-dir"),
                              ("generate", "generate_demo_l96", "--out")):
        data = {**load_yaml(resolve_config_path(name)), "device": "cuda"}
        path = tmp_path / f"{stage}.yaml"
        path.write_text(yaml.safe_dump(data))
        out = tmp_path / (f"{stage}.zarr" if stage == "generate" else f"{stage}_run")
        rc = main([stage, str(path), flag, str(out)])
        err = capsys.readouterr().err
        assert rc == 2 and "device: 'cuda'" in err and err.count("\n") == 1, (stage, err)
        assert not out.exists()
    rc = main(["simulate", "lorenz96", "--size", "8", "--steps", "2", "--device", "cuda",
               "--out", str(tmp_path / "s.nc")])
    err = capsys.readouterr().err
    assert rc == 2 and "device: 'cuda'" in err and not (tmp_path / "s.nc").exists()


def test_a_usr1_after_the_stage_is_ignored_while_the_process_exits():
    # SLURM's USR1, passed on every 10 s until a stage exits, once killed a finished campaign in
    # Python's shutdown (which resets Python handlers to "die"): the CLI ignores it at exit. The
    # probe is registered first, so it runs after the CLI's exit hook, as Python's shutdown does.
    probe = (
        "import atexit, os, signal\n"
        "def probe():\n"
        "    ok = signal.getsignal(signal.SIGUSR1) is signal.SIG_IGN\n"
        "    os.kill(os.getpid(), signal.SIGUSR1)\n"
        "    print('ignored' if ok else 'handled by Python only')\n"
        "atexit.register(probe)\n"
        "from pipeline.cli import main\n"
        "raise SystemExit(main(['config', 'list']))\n"
    )
    p = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip().endswith("ignored"), p.stdout[-300:]
