"""``scoreda surrogate``: end to end with two retraining iterations, kill + resume and SIGTERM +
resume equal to an uninterrupted run, 1 vs 2 MPI ranks bitwise equal, bad configs name the key."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from pipeline import surrogate as su
from pipeline.cli import main
from pipeline.config import SurrogateConfig, validate

ROOT = Path(__file__).resolve().parents[1]
PYTHON = sys.executable
BIN = Path(PYTHON).parent
ENV = {**os.environ, "SCOREDA_NO_PROGRESS": "1", "PYTHONPATH": str(ROOT)}
needs_mpi = pytest.mark.skipif(not (BIN / "mpiexec").exists(), reason="no mpiexec in the venv")

TINY = {
    "stage": "surrogate",
    "model": {"name": "lorenz96", "size": 12},
    "data": {"trajectories": 4, "frames": 80, "spinup": 200, "seed": 1},
    "network": {"kind": "conv", "history": 2,
                "options": {"width": 8, "depth": 1, "kernel_size": 3, "linear_kernel": 5}},
    "training": {"steps": 40, "batch_size": 32, "chunks": 2, "lr": 3e-3, "warmup": 5},
    "rollout": {"trials": 3, "horizon": 30, "members": 8, "reference": True,
                "observations": {"full": {"kind": "identity"},
                                 "half": {"kind": "every_kth", "options": {"k": 2}}},
                "filters": {"ensf": {"method": "ensf", "ensf": {"steps": 10, "ridge": 1e-3}},
                            "enkf": {"method": "enkf"}}},
    "retrain": {"iterations": 2, "filter": "enkf", "trajectories": 3, "frames": 50, "burn_in": 5,
                "steps": 20},
    "seed": 2,
}


def write_cfg(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


def cli(args: list[str], pre: list[str] | None = None, env: dict | None = None):
    cmd = [*(pre or []), PYTHON, "-m", "pipeline.cli", "surrogate", *args]
    return subprocess.run(cmd, cwd=ROOT, env=env or ENV, capture_output=True, text=True, timeout=300)


def numbers(run_dir: Path) -> dict:
    """Everything numeric of a finished run: metrics without the plot, and every model."""
    met = json.loads((run_dir / su.METRICS).read_text())
    models = {p.name: su._load(p)["state"] for p in sorted((run_dir / su.MODELS).iterdir())}
    return {"metrics": met, "models": models}


def assert_same(a: dict, b: dict) -> None:
    assert a["metrics"] == b["metrics"]
    assert a["models"].keys() == b["models"].keys()
    for name, sd in a["models"].items():
        for k, v in sd.items():
            assert torch.equal(v, b["models"][name][k]), (name, k)


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """One uninterrupted in-process run of the tiny config."""
    run_dir = tmp_path_factory.mktemp("surr") / "ref"
    n = torch.get_num_threads()
    cfg = validate(TINY, SurrogateConfig)
    assert su.start(cfg, run_dir) == su.EXIT_DONE
    torch.set_num_threads(n)
    return run_dir


def test_end_to_end_with_two_retraining_iterations(reference):
    met = json.loads((reference / su.METRICS).read_text())
    its = met["iterations"]
    assert [it["iteration"] for it in its] == [0, 1, 2]
    names = {"one_step", "plain", "ensf/full", "enkf/full", "ensf/half", "enkf/half"}
    refs = {f"reference:{n}" for n in names if "/" in n}
    for it in its:
        # the true-model reference is run once, at iteration 0
        assert set(it["long_horizon"]) == (names | refs if it["iteration"] == 0 else names)
        for n in names:
            c = it["curves"][n]
            assert len(c["mean"]) == len(c["std"]) == 30
            assert all(v >= 0 and v == v for v in c["mean"] + c["std"])
            assert len(it["long_horizon"][n]["trials"]) == 3
        # the one-step error (true window every step) is below the free roll-out's
        assert it["long_horizon"]["one_step"]["mean"] < it["long_horizon"]["plain"]["mean"]
    for it in its[1:]:
        r = it["retrain"]
        assert r["pairs"] > 0 and r["trajectories"] == 3 and r["target_rmse"] > 0
        # fine-tuning fits its targets: the loss is in units of a persistence step (1 = as bad)
        assert r["final_loss"] < 1.0, r
    assert set(met["retrain_gain"]) == names - {"one_step"}
    assert all(g[0] == 1.0 and len(g) == 3 for g in met["retrain_gain"].values())
    assert set(met["targets_final"]) == names - {"one_step", "plain"}
    for n, t in met["targets_final"].items():
        rec = its[-1]["long_horizon"][n]
        assert rec["median"] == sorted(rec["trials"])[1]  # 3 trials
        assert t["met"] == (max(t["ratio"], t["median_ratio"]) <= su.TARGET_RATIO)
    # every iteration has its own model and retraining changed the weights
    m = [su.load_surrogate(su.model_path(reference, k))[0].state_dict() for k in range(3)]
    assert not torch.equal(m[0]["linear.weight"], m[1]["linear.weight"])
    assert not torch.equal(m[1]["linear.weight"], m[2]["linear.weight"])
    text = (reference / su.SUMMARY).read_text()
    assert "ensf/half" in text and "Retraining on analyses" in text and "reference:ensf/half" in text
    # the true model with full observations tracks at least as well as the 40-step surrogate
    lh0 = its[0]["long_horizon"]
    assert lh0["reference:enkf/full"]["mean"] < lh0["enkf/full"]["mean"]
    assert (reference / su.PLOT).read_bytes()[:4] == b"\x89PNG"
    prog = json.loads((reference / su.PROGRESS).read_text())
    assert prog["done"] == su.tasks(validate(TINY, SurrogateConfig)) and not (reference / su.PARTIAL).exists()


@pytest.mark.parametrize("die_at", ["train:0:committed", "retrain:1:written", "evaluate:2:written"])
def test_kill_and_resume_equals_uninterrupted(tmp_path, reference, die_at):
    conf = write_cfg(tmp_path / "s.yaml", TINY)
    run_dir = tmp_path / "run"
    r = cli([str(conf), "--run-dir", str(run_dir)], env={**ENV, "SCOREDA_TEST_DIE_AT": die_at})
    assert r.returncode == 137, r.stderr[-2000:]
    done = json.loads((run_dir / su.PROGRESS).read_text())["done"]
    task = die_at.rsplit(":", 1)[0]
    assert (task in done) == die_at.endswith("committed")
    r = cli(["--resume", str(run_dir)])
    assert r.returncode == 0, r.stderr[-2000:]
    assert "plain roll-out" in r.stdout
    assert_same(numbers(run_dir), numbers(reference))


def test_stop_signal_inside_training_then_resume(tmp_path, reference, monkeypatch):
    class Raised(su.StopSignals):
        def __enter__(self):
            super().__enter__()
            self.requested = True  # as if SIGTERM arrived at once
            return self

    cfg = validate(TINY, SurrogateConfig)
    run_dir = tmp_path / "run"
    monkeypatch.setattr(su, "StopSignals", Raised)
    assert su.start(cfg, run_dir) == su.EXIT_STOPPED
    assert json.loads((run_dir / su.PROGRESS).read_text())["done"] == []
    assert su._load(run_dir / su.PARTIAL)["step"] == 10  # stops are agreed every 10 steps
    monkeypatch.undo()
    assert su.resume(run_dir) == su.EXIT_DONE
    assert_same(numbers(run_dir), numbers(reference))


@pytest.mark.mpi
@needs_mpi
def test_two_ranks_equal_one(tmp_path, reference):
    conf = write_cfg(tmp_path / "s.yaml", TINY)
    r = cli([str(conf), "--run-dir", str(tmp_path / "r2")], pre=[str(BIN / "mpiexec"), "-n", "2"])
    assert r.returncode == 0, r.stderr[-2000:]
    assert_same(numbers(tmp_path / "r2"), numbers(reference))
    assert (tmp_path / "r2" / "logs" / "rank-0001.log").exists()


@pytest.mark.parametrize("change,key", [
    ({"retrain": {"filter": "letkf"}}, "retrain.filter"),
    ({"regime": {"kind": "noisy"}}, "regime.noise_std"),
    ({"regime": {"kind": "insufficient"}}, "regime.kind"),
    ({"regime": {"kind": "insufficient", "trajectories": 9}}, "regime.trajectories"),
    ({"rollout": {"horizn": 10}}, "rollout.horizn"),
    ({"rollout": {"observations": {"full": {"kind": "every_kth"}}}}, "rollout.observations.full.options"),
    ({"rollout": {"filters": {"ensf": {"method": "ensf", "inflation": 0.5}}}},
     "rollout.filters.ensf.inflation"),
    ({"network": {"options": {"widht": 3}}}, "network.options"),
    ({"model": {"name": "kolmogorov", "size": 16}}, "model.name"),
    ({"training": {"chunks": 64}}, "training.chunks"),
])
def test_bad_config_names_the_key(tmp_path, change, key, capsys):
    data = json.loads(json.dumps(TINY))
    for section, value in change.items():
        data[section] = value if section == "model" else {**data.get(section, {}), **value}
    conf = write_cfg(tmp_path / "bad.yaml", data)
    assert main(["surrogate", str(conf), "--run-dir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert f": {key}:" in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "run").exists()


def test_train_steps_need_a_frame_axis(tmp_path):
    net = su.build_surrogate("conv", history=1, width=4, depth=1)
    hist = torch.randn(6, 1, 8)
    with pytest.raises(ValueError, match="targets must be"):
        su.train_steps(net, hist, hist[:, 0], comm=su.Comm(0, 1), task="t", seed=0, steps=1,
                       batch_size=2, chunks=1, lr=1e-3, weight_decay=0.0, warmup=0, unroll=1,
                       grad_clip=None, stop=su.StopSignals(), partial=tmp_path / "p.pt")


def test_existing_run_dir_and_bad_resume(tmp_path, reference, capsys):
    conf = write_cfg(tmp_path / "s.yaml", TINY)
    assert main(["surrogate", str(conf), "--run-dir", str(reference)]) == 2
    assert "exists" in capsys.readouterr().err
    assert main(["surrogate", "--resume", str(tmp_path)]) == 2
    assert "not a surrogate run directory" in capsys.readouterr().err


def test_resume_refuses_an_edited_config_and_takes_an_older_one(tmp_path, reference, capsys):
    """The stored config is compared as written: an edited value is refused; a file from before a
    key existed (its progress hashed without that key) resumes with the key's default."""
    import shutil
    edited = tmp_path / "edited"
    shutil.copytree(reference, edited)
    data = yaml.safe_load((edited / su.CONFIG).read_text())
    data["seed"] = 3
    write_cfg(edited / su.CONFIG, data)
    assert main(["surrogate", "--resume", str(edited)]) == 2
    assert "changed since the run started" in capsys.readouterr().err

    older = tmp_path / "older"
    shutil.copytree(reference, older)
    data = yaml.safe_load((older / su.CONFIG).read_text())
    for f in data["rollout"]["filters"].values():
        del f["ensf"]["coupling"]  # as if written before the key existed
    data["threads"] = 2  # not part of the hash
    write_cfg(older / su.CONFIG, data)
    rec = json.loads((older / su.PROGRESS).read_text())
    rec["config_hash"] = su.config_hash({**data, "threads": 1})
    (older / su.PROGRESS).write_text(json.dumps(rec))
    assert su.config_hash(data) != su.config_hash(validate(TINY, SurrogateConfig))
    assert main(["surrogate", "--resume", str(older)]) == su.EXIT_DONE


@pytest.fixture(scope="module")
def l96_store(tmp_path_factory):
    """A finished `scoreda generate` store of the tiny system (truth θ on every trajectory) and a
    second one with θ drawn per trajectory."""
    from distributed import Client, LocalCluster

    from pipeline.config import GenerateConfig
    from pipeline.generate import generate

    root = tmp_path_factory.mktemp("surr-store")
    base = {"stage": "generate", "model": {"name": "lorenz96", "size": 12},
            "trajectories": 8, "frames": 80, "save_every": 5, "spinup": 50, "seed": 3,
            "dtype": "float64", "theta": {"mode": "fixed"}, "split": {"valid": 0.25, "test": 0.0},
            "store": {"trajectories_per_shard": 2, "chunk_frames": 40}}
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False,
                      dashboard_address=None) as cluster, Client(cluster) as client:
        paths = {}
        for name, theta in (("fixed", "fixed"), ("prior", "prior")):
            cfg = validate({**base, "theta": {"mode": theta}}, GenerateConfig)
            paths[name] = root / f"{name}.zarr"
            generate(cfg, paths[name], client=client, echo=lambda s: None)
    return paths


def test_training_data_from_a_store(tmp_path, l96_store):
    import numpy as np
    import zarr

    data = json.loads(json.dumps(TINY))
    data["data"] = {**TINY["data"], "frames": 60, "store": str(l96_store["fixed"])}
    data["rollout"]["trials"] = 1
    data["retrain"] = {"iterations": 0}
    cfg = validate(data, SurrogateConfig)
    d = su.make_data(cfg)
    split = np.asarray(zarr.open_array(l96_store["fixed"] / "split", mode="r")[:])
    rows = np.nonzero(split == 0)[0][:4]
    stored = np.asarray(zarr.open_array(l96_store["fixed"] / "x", mode="r")[:])[rows, :60]
    assert d.train.shape == (4, 60, 12) and d.train.dtype == torch.float64
    np.testing.assert_array_equal(d.train.numpy(), stored)
    # test truths stay in-process and independent of the store
    torch.testing.assert_close(d.test, su.make_data(validate(TINY, SurrogateConfig)).test[:1])
    assert su.start(cfg, tmp_path / "run") == su.EXIT_DONE
    assert json.loads((tmp_path / "run" / su.METRICS).read_text())["iterations"][0]["long_horizon"]


def test_resume_names_a_damaged_committed_output(tmp_path, reference, capsys):
    """Found at the start, not after the remaining tasks ran (a report that crashed at the end)."""
    import shutil
    run = tmp_path / "run"
    shutil.copytree(reference, run)
    f = run / su.EVALS / "iter-00.json"
    f.write_text("{")
    assert main(["surrogate", "--resume", str(run)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"{f}: unreadable record of committed task evaluate:0" in err[0], err
    shutil.copy(reference / su.EVALS / "iter-00.json", f)
    m = su.model_path(run, 1)
    obj = torch.load(m, weights_only=True)
    torch.save({**obj, "spec": {k: v for k, v in obj["spec"].items() if k != "kind"}}, m)
    assert main(["surrogate", "--resume", str(run)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"{m}: not a surrogate this version can build (TypeError" in err[0], err


def test_a_damaged_store_leaves_runs_as_they_were(tmp_path, reference, l96_store, capsys):
    """A shard that fails its checksum is named in one line; --overwrite puts the earlier run
    back untouched, and a new run directory is not left half-made."""
    import shutil
    bad = tmp_path / "bad.zarr"
    shutil.copytree(l96_store["fixed"], bad)
    shard = next(f for f in sorted((bad / "x" / "c").rglob("*")) if f.is_file())
    shard.write_bytes(shard.read_bytes()[:100])
    data = json.loads(json.dumps(TINY))
    data["data"] = {**TINY["data"], "frames": 60, "store": str(bad)}
    conf = write_cfg(tmp_path / "s.yaml", data)
    run = tmp_path / "run"
    shutil.copytree(reference, run)

    def tree() -> dict[str, bytes]:
        return {str(f.relative_to(run)): f.read_bytes() for f in sorted(run.rglob("*"))
                if f.is_file() and "logs" not in f.parts}

    before = tree()
    assert main(["surrogate", str(conf), "--run-dir", str(run), "--overwrite"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"{bad}: cannot read x" in err[0], err
    assert tree() == before and not (tmp_path / ".run.replaced").exists()
    assert main(["surrogate", str(conf), "--run-dir", str(tmp_path / "new")]) == 2
    assert not (tmp_path / "new").exists()


@pytest.mark.parametrize("change,needle", [
    ({"store": "prior"}, "theta.mode prior"),
    ({"frames": 90}, "data.frames asks for 90"),
    ({"trajectories": 7}, "data.trajectories asks for 7"),
    ({"save_every": 4}, "save_every 5 differs"),
    ({"store": "missing"}, "no such store"),
])
def test_bad_store_is_refused_before_anything_is_written(tmp_path, l96_store, change, needle, capsys):
    data = json.loads(json.dumps(TINY))
    which = change.pop("store", "fixed")
    path = l96_store.get(which, tmp_path / "missing.zarr")
    data["data"] = {**TINY["data"], "frames": 60, "store": str(path), **change}
    conf = write_cfg(tmp_path / "s.yaml", data)
    assert main(["surrogate", str(conf), "--run-dir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert needle in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "run").exists()
