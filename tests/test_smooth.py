"""``scoreda smooth``: SDA posterior samples of a held-out window and θ from a trained model;
outputs, rank-count independence, bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import xarray as xr
import yaml

from pipeline import smooth as sm
from pipeline import train as tr
from pipeline.cli import main
from pipeline.config import ConfigError, SmoothConfig, validate

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
ENV = {**os.environ, "SCOREDA_NO_PROGRESS": "1", "PYTHONPATH": str(ROOT)}
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model_run(tmp_path_factory, train_l96_window_model) -> Path:
    """A small Lorenz-96 store (F per trajectory) and a briefly trained window model."""
    return train_l96_window_model(tmp_path_factory.mktemp("smooth"), 150)


def make_cfg(run: Path, **over) -> SmoothConfig:
    data = {"stage": "smooth", "model_run": str(run), "trajectory": 0, "start": 2, "length": 12,
            "observation": {"kind": "every_kth", "options": {"k": 2}, "sigma": 0.5},
            "samples": 6, "sda": {"steps": 24}, "seed": 1}
    data.update(over)
    cfg = validate(data, SmoothConfig)
    assert isinstance(cfg, SmoothConfig)
    return cfg


def test_smooth_writes_samples_metrics_and_plots(tmp_path, model_run):
    cfg = make_cfg(model_run, ensf_members=8)
    met = sm.smooth(cfg, tmp_path / "out")
    assert met is not None and np.isfinite(met["rmse_mean"])
    # the EnSF baseline filtered the same observations: one RMSE per frame, θ particles summarised
    e = met["ensf"]
    assert e["members"] == 8 and len(e["rmse_per_frame"]) == 12
    assert np.isfinite(e["rmse_mean"]) and set(e["theta"]["F"]) >= {"mean", "lo", "hi", "covered"}
    for name in (sm.CONFIG, sm.STORE, sm.METRICS, sm.SUMMARY, "states.png", "theta.png"):
        assert (tmp_path / "out" / name).exists(), name
    ds = xr.open_zarr(tmp_path / "out" / sm.STORE, consolidated=False)
    assert ds["x"].shape == (6, 12, 20) and ds["theta"].shape == (6, 12, 1)
    assert ds["y"].shape == (12, 10)
    # a static θ (the store's mode is prior): one vector per sample, repeated over frames
    th = ds["theta"].values
    assert np.array_equal(th, np.repeat(th[:, :1], 12, axis=1))
    f = json.loads((tmp_path / "out" / sm.METRICS).read_text())
    assert set(f["theta"]["F"]) >= {"mean", "lo", "hi", "truth", "covered"}
    # 6 samples cannot hold a 90 % interval: the range, 5/7 when calibrated, and the summary says so
    assert f["interval_level"] == pytest.approx(5 / 7)
    assert "range of 6 samples: 71% coverage" in (tmp_path / "out" / sm.SUMMARY).read_text()
    # the truth is the store's test trajectory, frames 2..13
    store = xr.open_zarr(tr.load_train_config(model_run / tr.CONFIG).store, consolidated=False)
    j = int(np.nonzero(store["split"].values == 2)[0][0])
    assert np.array_equal(ds["truth_x"].values, store["x"].values[j, 2:14])
    # observations away from the truth by the noise only (σ = 0.5, every 2nd site)
    resid = ds["y"].values - store["x"].values[j, 2:14, ::2]
    assert 0.3 < resid.std() < 0.7


def test_theta_composition_follows_the_training_noise(tmp_path, model_run, train_l96_window_model):
    """A per-frame model (the default) takes `pooled` (also `auto`) and `evidence`: both reach the
    sampler (different θ from the same streams, finite, one θ per sample). A model trained with
    `theta_noise: shared` samples through the shared composition and refuses the per-frame
    compositions by name. `theta_guidance: false` reaches the sampler too."""
    _, spec = tr.load_model(model_run)
    assert spec["theta_noise"] == "per_frame" and len(spec["theta_prior"]["mean"]) == 1
    out = {}
    for comp in ("auto", "pooled", "evidence"):
        cfg = make_cfg(model_run, samples=4, sda={"steps": 12, "theta_composition": comp})
        sm.smooth(cfg, tmp_path / comp)
        out[comp] = xr.open_zarr(tmp_path / comp / sm.STORE, consolidated=False)["theta"].values
    assert np.array_equal(out["auto"], out["pooled"])
    assert np.isfinite(out["evidence"]).all() and out["evidence"].shape == out["pooled"].shape
    assert np.array_equal(out["evidence"], np.repeat(out["evidence"][:, :1], 12, axis=1))
    assert not np.allclose(out["evidence"], out["pooled"])
    # `theta_guidance: false` reaches the sampler: the same streams, another θ
    cfg = make_cfg(model_run, samples=4, sda={"steps": 12, "theta_guidance": False})
    sm.smooth(cfg, tmp_path / "states_only")
    th = xr.open_zarr(tmp_path / "states_only" / sm.STORE, consolidated=False)["theta"].values
    assert np.isfinite(th).all() and not np.allclose(th, out["pooled"])
    # so does `likelihood_cg` (Tweedie's covariance added to γ's): the same streams, other states
    states = {}
    for name, extra in (("gamma", {}), ("tweedie", {"likelihood_cg": 1})):
        sm.smooth(make_cfg(model_run, samples=4, sda={"steps": 12, **extra}), tmp_path / name)
        states[name] = xr.open_zarr(tmp_path / name / sm.STORE, consolidated=False)["x"].values
    assert np.isfinite(states["tweedie"]).all() and not np.allclose(states["tweedie"], states["gamma"])
    with pytest.raises(ConfigError, match="sda.likelihood_cg"):
        make_cfg(model_run, sda={"likelihood_cg": -1})

    shared = train_l96_window_model(model_run.parent, 150, name="shared", theta_noise="shared")
    assert tr.load_model(shared)[1]["theta_noise"] == "shared"
    for comp in ("pooled", "evidence"):
        with pytest.raises(ConfigError, match="sda.theta_composition"):
            sm.Problem(make_cfg(shared, sda={"theta_composition": comp}))
    sm.smooth(make_cfg(shared, samples=4, sda={"steps": 12}), tmp_path / "shared")
    th = xr.open_zarr(tmp_path / "shared" / sm.STORE, consolidated=False)["theta"].values
    assert np.isfinite(th).all() and not np.allclose(th, out["pooled"])
    # a tempered evidence (`theta_evidence_scale`) reaches the shared composition; the pooled
    # mean has no evidence weight and refuses it by name, as does a scale outside (0, 1]
    sm.smooth(make_cfg(shared, samples=4, sda={"steps": 12, "theta_evidence_scale": 0.25}),
              tmp_path / "tempered")
    tt = xr.open_zarr(tmp_path / "tempered" / sm.STORE, consolidated=False)["theta"].values
    assert np.isfinite(tt).all() and not np.allclose(tt, th)
    with pytest.raises(ConfigError, match="sda.theta_evidence_scale"):
        sm.Problem(make_cfg(model_run, sda={"theta_evidence_scale": 0.5}))
    sm.Problem(make_cfg(model_run, sda={"theta_evidence_scale": 0.5, "theta_composition": "evidence"}))
    for bad in (0, 1.5):
        with pytest.raises(ConfigError, match="theta_evidence_scale"):
            make_cfg(model_run, sda={"theta_evidence_scale": bad})


def test_theta_given_the_true_states(tmp_path, model_run):
    """`condition: truth_states` samples θ alone given the window's true states: the stored
    states are the truth in every sample, θ one finite vector per sample, the summary says what
    was conditioned on; with an observations file it is refused by name."""
    cfg = make_cfg(model_run, samples=4, sda={"steps": 16}, condition="truth_states")
    met = sm.smooth(cfg, tmp_path / "given")
    assert met is not None and met["condition"] == "truth_states"
    ds = xr.open_zarr(tmp_path / "given" / sm.STORE, consolidated=False)
    np.testing.assert_allclose(ds["x"].values, np.broadcast_to(ds["truth_x"].values, ds["x"].shape),
                               rtol=1e-5, atol=1e-4)
    th = ds["theta"].values
    assert np.isfinite(th).all() and np.array_equal(th, np.repeat(th[:, :1], 12, axis=1))
    assert sm.summary_lines(met)[0].startswith("θ given the true states")
    with pytest.raises(ValueError, match="condition"):
        make_cfg(model_run, condition="truth_states",
                 observations={"path": str(tmp_path / "y.nc"), "variable": "y"})


def test_theta_on_the_clip_bound_is_counted_and_warned(tmp_path, model_run):
    """Samples whose θ ended on ``sda.theta_clip`` are the bound's, not the data's: counted per
    parameter in the metrics and named in the summary; none with the shipped bound (4 sd)."""
    met = sm.smooth(make_cfg(model_run, samples=4, sda={"steps": 16}, condition="truth_states"),
                    tmp_path / "free")
    assert met is not None and met["theta"]["F"]["at_clip"] == 0 and met["theta_clip"] == 4.0
    assert not any("theta_clip" in line for line in sm.summary_lines(met))
    # a bound of 0.3 training sd: two samples end on it (z −0.298, −0.299), two inside (−0.23,
    # +0.13; measured with these seeds)
    met = sm.smooth(make_cfg(model_run, samples=4, sda={"steps": 16, "theta_clip": 0.3},
                             condition="truth_states"), tmp_path / "clipped")
    assert met is not None and met["theta"]["F"]["at_clip"] == 2
    saved = json.loads((tmp_path / "clipped" / sm.METRICS).read_text())
    assert saved["theta"]["F"]["at_clip"] == 2
    assert ("2 of 4 samples of θ F ended on sda.theta_clip (0.3 training sd from its mean)"
            in (tmp_path / "clipped" / sm.SUMMARY).read_text())


@pytest.mark.mpi
@pytest.mark.skipif(not (BIN / "mpiexec").exists(), reason="no mpiexec in the venv")
def test_samples_do_not_depend_on_the_rank_count(tmp_path, model_run):
    cfg = make_cfg(model_run, samples=4, sda={"steps": 12})
    sm.smooth(cfg, tmp_path / "one")
    conf = tmp_path / "s.yaml"
    conf.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    r = subprocess.run([str(BIN / "mpiexec"), "-n", "2", sys.executable, "-m", "pipeline.cli",
                        "smooth", str(conf), "--out", str(tmp_path / "two")], cwd=ROOT, env=ENV,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    a = xr.open_zarr(tmp_path / "one" / sm.STORE, consolidated=False)
    b = xr.open_zarr(tmp_path / "two" / sm.STORE, consolidated=False)
    np.testing.assert_allclose(a["x"].values, b["x"].values, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(a["theta"].values, b["theta"].values, rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
def test_train_and_smooth_on_the_device_match_the_cpu(tmp_path, train_l96_window_model, device):
    """The pipeline's device path (``compute_device``, the model, batches and sampler on the
    device, noise from the CPU streams): float64 runs on ``--device`` equal the CPU's to
    rounding. Needs ``--device cuda``."""
    import torch

    cpu = torch.device("cpu")
    runs = {d.type: train_l96_window_model(tmp_path, 30, name=f"run_{d.type}", device=str(d),
                                           dtype="float64") for d in (cpu, device)}
    (a, _), (b, _) = (tr.load_model(runs[k]) for k in (cpu.type, device.type))
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        torch.testing.assert_close(pb, pa, rtol=1e-6, atol=1e-8, msg=name)
    outs = {}
    for d in (cpu, device):
        outs[d.type] = tmp_path / f"smooth_{d.type}"
        sm.smooth(make_cfg(runs["cpu"], samples=3, sda={"steps": 12}, dtype="float64",
                           device=str(d)), outs[d.type])
    x, y = (xr.open_zarr(outs[k] / sm.STORE, consolidated=False) for k in (cpu.type, device.type))
    np.testing.assert_allclose(y["x"].values, x["x"].values, rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(y["theta"].values, x["theta"].values, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("change,needle", [
    ({"length": 2}, "length"),
    ({"trajectory": 99}, "trajectory"),
    ({"start": 30}, "start"),
    ({"observation": {"kind": "every_kth", "options": {"q": 1}}}, "observation"),
    ({"model_run": "/nonexistent/run"}, "model.pt"),
    ({"sda": {"tau": 0}}, "tau"),
    ({"length": 8, "observation": {"every": 9}}, "observation.every"),
])
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, model_run, capsys, change, needle):
    data = make_cfg(model_run).model_dump(mode="json")
    data.update(change)
    conf = tmp_path / "bad.yaml"
    conf.write_text(yaml.safe_dump(data))
    assert main(["smooth", str(conf), "--out", str(tmp_path / "out")]) == 2
    lines = [ln for ln in capsys.readouterr().err.strip().splitlines() if ln]
    assert len(lines) == 1 and needle in lines[0], lines
    assert not (tmp_path / "out").exists()


def test_a_store_of_another_grid_is_refused(tmp_path, model_run, make_l96_store, capsys):
    """The variables match (Lorenz-96's x) but not the size the model was trained on."""
    store = make_l96_store(tmp_path / "l96_12.zarr", 12, 16, 32)
    conf = tmp_path / "bad.yaml"
    conf.write_text(yaml.safe_dump({**make_cfg(model_run).model_dump(mode="json"),
                                    "store": str(store)}))
    assert main(["smooth", str(conf), "--out", str(tmp_path / "out")]) == 2
    lines = [ln for ln in capsys.readouterr().err.strip().splitlines() if ln]
    assert len(lines) == 1 and "holds lorenz96 on a [12] grid; the model was trained on " \
        "lorenz96 on [20]" in lines[0], lines
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("damage,needle", [
    ("bogus_weights", "not a model this version can build (RuntimeError"),
    ("no_window", "not a model this version can build (KeyError: 'window')"),
    ("nan_weights", "non-finite weights"),
])
def test_a_damaged_model_is_named(tmp_path, model_run, capsys, damage, needle):
    import shutil
    run = tmp_path / "run"
    shutil.copytree(model_run, run)
    obj = torch.load(run / "model.pt", weights_only=True)
    if damage == "bogus_weights":
        obj["ema"] = {"bogus": torch.zeros(1)}
    elif damage == "no_window":
        obj["spec"] = {k: v for k, v in obj["spec"].items() if k != "window"}
    else:
        obj["ema"] = {k: v * float("nan") if v.is_floating_point() else v
                      for k, v in obj["ema"].items()}
    torch.save(obj, run / "model.pt")
    conf = tmp_path / "s.yaml"
    conf.write_text(yaml.safe_dump(make_cfg(run).model_dump(mode="json")))
    assert main(["smooth", str(conf), "--out", str(tmp_path / "out")]) == 2
    lines = [ln for ln in capsys.readouterr().err.strip().splitlines() if ln]
    assert len(lines) == 1 and f"{run / 'model.pt'}: {needle}" in lines[0], lines
    assert not (tmp_path / "out").exists() and not sm.partial_dir(tmp_path / "out").exists()


def test_existing_output_is_kept(tmp_path, model_run, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    conf = tmp_path / "s.yaml"
    conf.write_text(yaml.safe_dump(make_cfg(model_run).model_dump(mode="json")))
    assert main(["smooth", str(conf), "--out", str(out)]) == 2
    assert "exists" in capsys.readouterr().err
    assert (out / "keep.txt").read_text() == "x"


def test_observations_from_a_file_reproduce_the_twin_samples(tmp_path, model_run, capsys):
    """A smoothing run fed the y (and σ) another run wrote draws the same samples; without a
    truth the truth metrics are NaN and no truth is stored."""
    cfg = make_cfg(model_run, samples=3, sda={"steps": 12})
    sm.smooth(cfg, tmp_path / "twin")
    fcfg = make_cfg(model_run, samples=3, sda={"steps": 12},
                    observations={"path": str(tmp_path / "twin" / sm.STORE)})
    fconf = tmp_path / "file.yaml"
    fconf.write_text(yaml.safe_dump(fcfg.model_dump(mode="json")))
    assert main(["smooth", str(fconf), "--out", str(tmp_path / "file")]) == 0  # no truth: no failure
    met = json.loads((tmp_path / "file" / sm.METRICS).read_text())
    assert met["truth"] is False and np.isnan(met["rmse_mean"])
    assert "covered" not in met["theta"]["F"]
    a = xr.open_zarr(tmp_path / "twin" / sm.STORE, consolidated=False)
    b = xr.open_zarr(tmp_path / "file" / sm.STORE, consolidated=False)
    assert np.array_equal(a["x"].values, b["x"].values)
    assert np.array_equal(a["theta"].values, b["theta"].values)
    assert "truth_x" not in b and "theta_truth" not in b
    # a file with the wrong number of observed frames is refused, naming the file
    bad = make_cfg(model_run, length=14, observations={"path": str(tmp_path / "twin" / sm.STORE)})
    conf = tmp_path / "bad.yaml"
    conf.write_text(yaml.safe_dump(bad.model_dump(mode="json")))
    assert main(["smooth", str(conf), "--out", str(tmp_path / "bad")]) == 2
    err = capsys.readouterr().err
    assert "smooth.zarr" in err and "obs_time" in err and not (tmp_path / "bad").exists()


def test_kolmogorov_velocity_observations(tmp_path, make_kolmogorov_store):
    """A 16² Kolmogorov store and a briefly trained U-Net, smoothed from pooled velocity (rows
    that overlap: the likelihood takes their full covariance) and from sparse vorticity: finite
    samples whose mean vorticity stays zero (the model's `mean_free`, which the sampler pins and
    no velocity observation sees) and the stored observations of the right size."""
    from pipeline.config import TrainConfig

    store = make_kolmogorov_store(tmp_path / "k.zarr")
    tcfg = validate({"stage": "train", "store": str(store), "window": 3, "theta_noise": "shared",
                     "network": {"kind": "unet", "options": {"width": 8, "mults": [1, 2],
                                                             "blocks": 1}},
                     "batch_size": 8, "steps": 30, "log_every": 10, "validate_every": 30,
                     "checkpoint_every": 30, "optim": {"lr": 3e-3, "warmup": 5}}, TrainConfig)
    assert tr.start(tcfg, tmp_path / "run") == tr.EXIT_DONE
    velocity = {"kind": "coarse_velocity", "options": {"factor": 4}, "sigma": 0.05}
    # the last: Tweedie's covariance added to the velocities' full per-frame one
    for obs, m, cg in ((velocity, 32, 0), ({"kind": "every_kth", "options": {"k": 4}, "sigma": 0.1}, 16, 0),
                       (velocity, 32, 2)):
        cfg = make_cfg(tmp_path / "run", start=1, length=4, samples=2, observation=obs,
                       sda={"steps": 8, "likelihood_cg": cg})
        out = tmp_path / f"{obs['kind']}{cg}"
        met = sm.smooth(cfg, out)
        assert met is not None and np.isfinite(met["rmse_mean"])
        ds = xr.open_zarr(out / sm.STORE, consolidated=False)
        w = ds["vorticity"].values
        assert w.shape == (2, 4, 16, 16) and ds["y"].shape == (4, m)
        assert np.abs(w.mean(axis=(-2, -1))).max() < 1e-2 * w.std()


def test_a_stopped_run_resumes_to_the_samples_of_an_uninterrupted_one(tmp_path, model_run,
                                                                       monkeypatch):
    """Batches of `batch` samples are committed one by one; a stop signal ends the run after the
    current batch (SmoothStopped, exit 3 in the CLI), and the same call draws only the rest: the
    samples equal those of an uninterrupted run with the same batches. A partial of another set-up is refused
    unless --overwrite discards it."""
    import signal

    from pipeline.storage import OutputError

    cfg = make_cfg(model_run, samples=6, batch=2, sda={"steps": 12})
    sm.smooth(cfg, tmp_path / "whole")
    out = tmp_path / "out"
    calls: list[list[int]] = []
    draw = sm.Problem.sample

    def signalled(self, idx):
        calls.append(list(idx))
        res = draw(self, idx)
        if len(calls) == 1:
            os.kill(os.getpid(), signal.SIGUSR1)  # as SLURM's pre-timeout signal would
        return res

    monkeypatch.setattr(sm.Problem, "sample", signalled)
    with pytest.raises(sm.SmoothStopped, match="2 of 6 samples committed"):
        sm.smooth(cfg, out)
    part = sm.partial_dir(out)
    assert not out.exists() and len(list(part.glob("sample-*.npz"))) == 2
    key = json.loads((part / sm.KEY).read_text())  # as a version before sda.likelihood_cg wrote it
    del key["sda"]["likelihood_cg"]
    (part / sm.KEY).write_text(json.dumps(key))
    met = sm.smooth(cfg, out)
    assert calls == [[0, 1], [2, 3], [4, 5]] and not part.exists()
    assert met["samples_drawn"] == 4 and met["samples_resumed"] == 2
    # committed samples whose files are damaged are drawn again (an unreadable one stopped its
    # rank, and under MPI the others waited): the same numbers, from their index
    calls.clear()
    with pytest.raises(sm.SmoothStopped):
        sm.smooth(cfg, out, overwrite=True)
    f0, f1 = sm._sample_file(part, 0), sm._sample_file(part, 1)
    f0.write_bytes(f0.read_bytes()[:50])
    f1.write_bytes(b"not a zip")
    sm.smooth(cfg, out, overwrite=True)
    assert calls == [[0, 1], [0, 1], [2, 3], [4, 5]]
    with (xr.open_zarr(out / sm.STORE, consolidated=False) as c,
          xr.open_zarr(tmp_path / "whole" / sm.STORE, consolidated=False) as w):
        np.testing.assert_array_equal(c["x"].values, w["x"].values)
    a, b = (xr.open_zarr(d / sm.STORE, consolidated=False) for d in (tmp_path / "whole", out))
    np.testing.assert_array_equal(b["x"].values, a["x"].values)
    np.testing.assert_array_equal(b["theta"].values, a["theta"].values)
    # another batch size changes only the rounding of the batched network calls
    sm.smooth(make_cfg(model_run, samples=6, sda={"steps": 12}), tmp_path / "one_batch")
    c = xr.open_zarr(tmp_path / "one_batch" / sm.STORE, consolidated=False)
    np.testing.assert_allclose(c["x"].values, a["x"].values, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(c["theta"].values, a["theta"].values, rtol=1e-5, atol=1e-5)
    # committed samples of another set-up are never mixed in
    other = tmp_path / "other"
    sm.partial_dir(other).mkdir()
    (sm.partial_dir(other) / sm.KEY).write_text('{"seed": 99}')
    with pytest.raises(OutputError, match="another set-up"):
        sm.smooth(cfg, other)
    assert sm.smooth(cfg, other, overwrite=True)["samples_drawn"] == 6


def test_a_non_finite_batch_is_not_committed(tmp_path, model_run, monkeypatch):
    from pipeline.storage import OutputError

    draw = sm.Problem.sample

    def nan_after_two(self, idx):
        state, theta = draw(self, idx)
        return (state * float("nan") if idx[0] >= 2 else state), theta

    monkeypatch.setattr(sm.Problem, "sample", nan_after_two)
    out = tmp_path / "out"
    with pytest.raises(OutputError, match="non-finite"):
        sm.smooth(make_cfg(model_run, samples=4, batch=2, sda={"steps": 12}), out)
    assert sorted(p.name for p in sm.partial_dir(out).glob("sample-*")) == [
        "sample-0000000.npz", "sample-0000001.npz"]
    assert not out.exists()
