"""``scoreda train``: DDP equals one process on the concatenated batch, kill + resume is bitwise,
the loss falls and the denoiser beats the trivial one, torchrun and mpiexec launch, bad input."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from pipeline import train as tr
from pipeline.cli import main
from pipeline.config import TrainConfig, validate

ROOT = Path(__file__).resolve().parents[1]
PYTHON = sys.executable
BIN = Path(PYTHON).parent
ENV = {**os.environ, "SCOREDA_NO_PROGRESS": "1", "PYTHONPATH": str(ROOT)}
needs_mpi = pytest.mark.skipif(not (BIN / "mpiexec").exists(), reason="no mpiexec in the venv")


@pytest.fixture(scope="module")
def store(tmp_path_factory, make_l96_store) -> Path:
    """A small Lorenz-96 store, F drawn per trajectory (the parameter the network must learn)."""
    return make_l96_store(tmp_path_factory.mktemp("train") / "l96.zarr", 40, 32, 64)


def make_cfg(store: Path, **over) -> TrainConfig:
    data = {"stage": "train", "store": str(store), "window": 5,
            "network": {"kind": "ring", "options": {"width": 32, "depth": 3}},
            "batch_size": 32, "steps": 12, "log_every": 4, "validate_every": 6,
            "checkpoint_every": 4, "optim": {"lr": 2e-3, "warmup": 5}, "seed": 1}
    data.update(over)
    cfg = validate(data, TrainConfig)
    assert isinstance(cfg, TrainConfig)
    return cfg


def write_cfg(path: Path, cfg: TrainConfig) -> Path:
    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    return path


def in_process(fn, *args, **kw) -> int:
    threads = torch.get_num_threads()
    try:
        return fn(*args, **kw)
    finally:
        torch.set_num_threads(threads)


def weights(run_dir: Path, step: int) -> dict[str, torch.Tensor]:
    return torch.load(run_dir / tr.CHECKPOINTS / f"step-{step:08d}.pt", weights_only=True)["model"]


def losses(run_dir: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in tr.read_metrics(run_dir) if "loss" in r]


def cli(args: list[str], launcher: list[str] | None = None, timeout: float = 180,
        env: dict | None = None) -> subprocess.CompletedProcess:
    cmd = [*(launcher or []), PYTHON, "-m", "pipeline.cli", "train", *args]
    return subprocess.run(cmd, cwd=ROOT, env={**ENV, **(env or {})}, capture_output=True,
                          text=True, timeout=timeout)


def rank_fingerprints(run_dir: Path) -> dict[int, list[str]]:
    out = {}
    for log in sorted((run_dir / tr.LOGS).iterdir()):
        r = int(re.search(r"(\d+)", log.name).group(1))
        out[r] = re.findall(r"weights ([0-9a-f]{16})", log.read_text())
    return out


# --------------------------------------------------------------------------------------------
@pytest.mark.mpi
@needs_mpi
@pytest.mark.parametrize("launcher", ["mpiexec", "torchrun"])
def test_two_processes_equal_one_on_the_concatenated_batch(tmp_path, store, launcher):
    cfg = make_cfg(store, steps=8)
    assert in_process(tr.start, cfg, tmp_path / "r1") == tr.EXIT_DONE
    conf = write_cfg(tmp_path / "t.yaml", cfg)
    pre = ([str(BIN / "mpiexec"), "-n", "2"] if launcher == "mpiexec" else
           [str(BIN / "torchrun"), "--standalone", "--nproc_per_node", "2", "-m"])
    args = ["--run-dir", str(tmp_path / "r2"), str(conf)]
    if launcher == "torchrun":  # torchrun -m MODULE: the module comes right after -m
        r = subprocess.run([*pre, "pipeline.cli", "train", *args], cwd=ROOT, env=ENV,
                           capture_output=True, text=True, timeout=180)
    else:
        r = cli(args, pre)
    assert r.returncode == 0, r.stderr[-2000:]
    a, b = weights(tmp_path / "r1", 8), weights(tmp_path / "r2", 8)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=2e-5, atol=2e-6, msg=k)
    fp = rank_fingerprints(tmp_path / "r2")
    assert sorted(fp) == [0, 1] and fp[0] == fp[1] and len(fp[0]) == 2  # steps 4 and 8
    la, lb = losses(tmp_path / "r1"), losses(tmp_path / "r2")
    assert [s for s, _ in la] == [s for s, _ in lb]
    for (_, x), (_, y) in zip(la, lb, strict=True):
        assert abs(x - y) <= 1e-5 * abs(x)


def test_kill_and_resume_is_bitwise(tmp_path, store):
    cfg = make_cfg(store, steps=12)
    assert in_process(tr.start, cfg, tmp_path / "straight") == tr.EXIT_DONE
    # stop after step 5 (not a checkpoint step): the checkpoint is written at the stop
    assert in_process(tr.start, cfg, tmp_path / "split", until=5) == tr.EXIT_STOPPED
    assert json.loads((tmp_path / "split" / tr.PROGRESS).read_text())["step"] == 5
    # records written after the checkpoint (as a kill would leave them) are dropped on resume
    with open(tmp_path / "split" / tr.METRICS, "a") as fh:
        fh.write(json.dumps({"step": 9, "loss": 123.0}) + "\n" + '{"step": 1')
    # a checkpoint written before the θ noise and θ's clock were recorded resumes as the
    # per-frame, single-clock run it was
    ck = tmp_path / "split" / tr.CHECKPOINTS / "step-00000005.pt"
    old = torch.load(ck, weights_only=True)
    old["spec"] = {k: v for k, v in old["spec"].items()
                   if k not in ("theta_noise", "theta_prior", "theta_lag")}
    torch.save(old, ck)
    assert in_process(tr.resume, tmp_path / "split") == tr.EXIT_DONE
    a = torch.load(tmp_path / "straight" / tr.MODEL, weights_only=True)
    b = torch.load(tmp_path / "split" / tr.MODEL, weights_only=True)
    assert a["ema"].keys() == b["ema"].keys()
    for k in a["ema"]:
        assert torch.equal(a["ema"][k], b["ema"][k]), k
    for k, v in weights(tmp_path / "straight", 12).items():
        assert torch.equal(v, weights(tmp_path / "split", 12)[k]), k
    # the log interval cut by the stop (steps 5..8) differs; whole intervals and validation agree
    la, lb = dict(losses(tmp_path / "straight")), dict(losses(tmp_path / "split"))
    assert la[4] == lb[4] and la[12] == lb[12] and 9 not in lb

    def valid(d):
        return [(r["step"], r["valid_loss"]) for r in tr.read_metrics(d) if "valid_loss" in r]

    assert valid(tmp_path / "straight") == valid(tmp_path / "split") and len(valid(tmp_path / "split")) == 2
    assert tr.checkpoints(tmp_path / "split") == [8, 12]  # keep_checkpoints = 2
    assert (tmp_path / "split" / tr.LOSS_PNG).stat().st_size > 0


def test_sigterm_checkpoints_and_exits_3(tmp_path, store):
    conf = write_cfg(tmp_path / "t.yaml", make_cfg(store, steps=100000, checkpoint_every=50))
    p = subprocess.Popen([PYTHON, "-m", "pipeline.cli", "train", str(conf), "--run-dir",
                          str(tmp_path / "run")], cwd=ROOT, env=ENV, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while not (tmp_path / "run" / tr.PROGRESS).exists() and time.time() < deadline:
            time.sleep(0.2)
        p.send_signal(signal.SIGTERM)
        out, err = p.communicate(timeout=60)
    finally:
        p.kill()
    assert p.returncode == tr.EXIT_STOPPED, err[-2000:]
    assert "resume with" in out
    step = json.loads((tmp_path / "run" / tr.PROGRESS).read_text())["step"]
    assert step >= 50 and step in tr.checkpoints(tmp_path / "run")
    r = cli(["--resume", str(tmp_path / "run"), "--until", str(step + 3)])
    assert r.returncode == tr.EXIT_STOPPED, r.stderr[-2000:]
    assert json.loads((tmp_path / "run" / tr.PROGRESS).read_text())["step"] == step + 3


def test_loss_falls_and_denoiser_beats_trivial(tmp_path, store):
    cfg = make_cfg(store, steps=300, log_every=50, validate_every=300, checkpoint_every=300)
    assert in_process(tr.start, cfg, tmp_path / "run") == tr.EXIT_DONE
    recs = tr.read_metrics(tmp_path / "run")
    train = [r["loss"] for r in recs if "loss" in r]
    valid = [r for r in recs if "valid_loss" in r][-1]
    assert train[-1] < 0.5 * train[0] and train[-1] < 0.4  # trivial predictor: 1
    assert valid["valid_loss"] < 0.5
    assert valid["valid_x0_err"] < 0.5 * valid["valid_x0_err_trivial"]
    den, spec = tr.load_model(tmp_path / "run")
    assert spec["params"] == ["F"] and spec["window"] == 5
    src = tr.WindowSource(cfg, "test")
    state, theta = src.read(torch.arange(64).numpy())
    assert spec["theta_noise"] == "per_frame"
    err = tr.denoising_error(den, state, theta, 0.5, generator=torch.Generator().manual_seed(0))
    assert err.learned < 0.7 * err.trivial  # held-out (test split) windows: 0.45 vs 0.79 here


def test_windows_match_the_store(store):
    import xarray as xr

    cfg = make_cfg(store, window=7)
    src = tr.WindowSource(cfg, "train")
    ds = xr.open_zarr(store, consolidated=False)
    rows = torch.randperm(len(src), generator=torch.Generator().manual_seed(0))[:20].numpy()
    state, theta = src.read(rows)
    for b, row in enumerate(rows):
        j, t0 = src.index[row]
        want = ds["x"].values[j, t0:t0 + 7]
        assert torch.equal(state[b, :, 0], torch.from_numpy(want))
        assert torch.allclose(theta[b, :, 0], torch.from_numpy(ds["theta"].values[j, t0:t0 + 7, 0]).float())
    assert set(ds["split"].values[src.index[:, 0]]) == {0}


def _err(capsys, argv: list[str]) -> str:
    assert main(argv) == 2
    lines = [ln for ln in capsys.readouterr().err.strip().splitlines() if ln]
    assert len(lines) == 1, lines
    return lines[0]


@pytest.mark.parametrize("change,needle", [
    ({"window": 4}, "window"),
    ({"params": ["G"]}, "params"),
    ({"batch_size": 10_000}, "batch_size"),
    ({"store": "/nonexistent/x.zarr"}, "x.zarr"),
    ({"store": "/tmp/x.txt"}, "store"),
    ({"network": {"kind": "ring", "options": {"depth": 0}}}, "depth"),
    ({"autocast": "bf16"}, "autocast"),
    ({"theta_lag": 0.5}, "theta_lag"),
    ({"network": {"kind": "ring", "options": {"theta_head": "mlp"}}}, "theta_head"),
])
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, store, capsys, change, needle):
    data = make_cfg(store).model_dump(mode="json")
    data.update(change)
    conf = tmp_path / "bad.yaml"
    conf.write_text(yaml.safe_dump(data))
    msg = _err(capsys, ["train", str(conf), "--run-dir", str(tmp_path / "run")])
    assert needle in msg
    assert not (tmp_path / "run").exists()


def test_existing_run_dir_and_corrupt_checkpoint(tmp_path, store, capsys):
    cfg = make_cfg(store, steps=8)
    assert in_process(tr.start, cfg, tmp_path / "run", until=4) == tr.EXIT_STOPPED
    conf = write_cfg(tmp_path / "t.yaml", cfg)
    msg = _err(capsys, ["train", str(conf), "--run-dir", str(tmp_path / "run")])
    assert "exists" in msg
    # --resume refuses what it would ignore, and a total below the checkpoint's step
    msg = _err(capsys, ["train", "--resume", str(tmp_path / "run"), "--store", str(store)])
    assert "--resume takes the run directory alone" in msg
    conf_before = (tmp_path / "run" / tr.CONFIG).read_bytes()
    msg = _err(capsys, ["train", "--resume", str(tmp_path / "run"), "--steps", "2"])
    assert "--steps: 2 is below step 4" in msg
    assert (tmp_path / "run" / tr.CONFIG).read_bytes() == conf_before
    ck = tmp_path / "run" / tr.CHECKPOINTS / "step-00000004.pt"
    before = ck.read_bytes()
    ck.write_bytes(before[: len(before) // 2])
    msg = _err(capsys, ["train", "--resume", str(tmp_path / "run")])
    assert "step-00000004.pt" in msg
    msg = _err(capsys, ["train", "--resume", str(tmp_path / "nope")])
    assert "nope" in msg


def test_a_damaged_store_leaves_runs_as_they_were(tmp_path, store, capsys):
    """A shard that fails its checksum is named in one line; with --overwrite the earlier run is
    put back untouched, and a new run directory is not left half-made."""
    import shutil
    cfg = make_cfg(store, steps=4)
    run = tmp_path / "run"
    assert in_process(tr.start, cfg, run) == tr.EXIT_DONE
    before = {str(f.relative_to(run)): f.read_bytes() for f in sorted(run.rglob("*"))
              if f.is_file() and "logs" not in f.parts}
    bad = tmp_path / "bad.zarr"
    shutil.copytree(store, bad)
    # the first trajectories' shard: the normaliser reads it before any step
    shard = next(f for f in sorted((bad / "x" / "c").rglob("*")) if f.is_file())
    shard.write_bytes(shard.read_bytes()[:100])
    conf = write_cfg(tmp_path / "t.yaml", cfg)
    msg = _err(capsys, ["train", str(conf), "--run-dir", str(run), "--overwrite", "--store", str(bad)])
    assert f"{bad}: cannot read the training data" in msg
    after = {str(f.relative_to(run)): f.read_bytes() for f in sorted(run.rglob("*"))
             if f.is_file() and "logs" not in f.parts}
    assert after == before and not (tmp_path / ".run.replaced").exists()
    msg = _err(capsys, ["train", str(conf), "--run-dir", str(tmp_path / "new"), "--store", str(bad)])
    assert "cannot read the training data" in msg and not (tmp_path / "new").exists()
    (bad / "x" / "zarr.json").write_text("{")  # damaged metadata: named before any reading
    msg = _err(capsys, ["train", str(conf), "--run-dir", str(tmp_path / "new"), "--store", str(bad)])
    assert f"{bad}: cannot open x (JSONDecodeError" in msg and not (tmp_path / "new").exists()


def test_theta_noise_shared_draws_one_noise_per_window(tmp_path, store, capsys, monkeypatch):
    """`theta_noise: shared` draws one θ noise per window (the W copies equal; t and the state
    noise untouched by the choice), `per_frame` (the default) W draws. The model spec records
    the choice and θ's training prior (unconstrained F over the train split); a shared model
    trains (loss falls). A store whose θ walks refuses `shared` by name, writing nothing."""
    src = tr.WindowSource(make_cfg(store), "train")
    assert tr.model_spec(make_cfg(store), src)["theta_noise"] == "per_frame"
    spec = tr.model_spec(make_cfg(store, theta_noise="shared"), src)
    assert spec["theta_noise"] == "shared"
    f = src.theta_u[torch.from_numpy(np.unique(src.index[:, 0])), 0, 0].double()
    assert spec["theta_prior"]["mean"] == pytest.approx([float(f.mean())])
    assert spec["theta_prior"]["std"] == pytest.approx([float(f.std(correction=0))])
    assert spec["theta_lag"] == 1.0
    lagged = tr.model_spec(make_cfg(store, theta_noise="shared", theta_lag=2.5), src)
    assert lagged["theta_lag"] == 2.5 and tr.build_denoiser(lagged).schedule.theta_lag == 2.5
    none = make_cfg(store, params=[])  # no θ learnt: an empty prior
    assert tr.model_spec(none, tr.WindowSource(none, "train"))["theta_prior"] == {"mean": [], "std": []}
    t1, s1, n1 = tr.global_noise(3, 7, 8, (5, 1, 40), (5, 2), shared_theta=True)
    t0, s0, n0 = tr.global_noise(3, 7, 8, (5, 1, 40), (5, 2))
    assert n1.shape == n0.shape == (8, 5, 2)
    assert torch.equal(n1, n1[:, :1].expand(-1, 5, -1)) and not torch.equal(n0, n0[:, :1].expand(-1, 5, -1))
    assert torch.equal(t1, t0) and torch.equal(s1, s0)

    cfg = make_cfg(store, theta_noise="shared", steps=60, log_every=20, validate_every=60,
                   checkpoint_every=60)
    assert in_process(tr.start, cfg, tmp_path / "run") == tr.EXIT_DONE
    loss = losses(tmp_path / "run")
    assert loss[-1][1] < 0.8 * loss[0][1]
    assert tr.load_model(tmp_path / "run")[1]["theta_noise"] == "shared"

    from pipeline import store as st

    real = st.finished_store_config

    def walking(path):  # the same store read as if its θ walked
        gen = real(path)
        return gen.model_copy(update={"theta": gen.theta.model_copy(update={"mode": "walk"})})

    monkeypatch.setattr(st, "finished_store_config", walking)
    cfg_file = write_cfg(tmp_path / "w.yaml", make_cfg(store, theta_noise="shared"))
    assert "theta_noise" in _err(capsys, ["train", str(cfg_file), "--run-dir", str(tmp_path / "w")])
    assert not (tmp_path / "w").exists()
