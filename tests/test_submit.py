"""``scoreda submit | status | job`` against a real single-node SLURM (env/slurm.sh).

The chain's outputs equal the same stages run directly; a campaign longer than its time limit is
signalled, requeues, resumes and ends bitwise equal to an uninterrupted run, and so does a
signalled task of a smooth array; a failing stage
cancels its dependents; ``--dry-run`` scripts pass ``sbatch --test-only``; bad site settings are
refused before anything is written. Config/render checks without SLURM run everywhere.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from pipeline.config import ConfigError, SubmitConfig, slurm_seconds, validate
from pipeline.submit import TERMINAL

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "env" / "slurm.sh"
SCOREDA = [sys.executable, "-m", "pipeline.cli"]
HAVE_SLURM = shutil.which("slurmctld") is not None and shutil.which("munged") is not None

GENERATE = {
    "stage": "generate", "model": {"name": "lorenz96", "size": 40, "dt": 0.05},
    "out": "unused.zarr", "trajectories": 16, "frames": 32, "save_every": 2, "spinup": 100,
    "seed": 3, "theta": {"mode": "prior"},
    "store": {"trajectories_per_shard": 8, "shard_frames": 32, "chunk_frames": 16},
    "split": {"valid": 0.125, "test": 0.125}, "dask": {"workers": 1},
}
TRAIN = {
    "stage": "train", "store": "unused.zarr", "window": 5,
    "network": {"kind": "ring", "options": {"width": 16, "depth": 2}},
    "batch_size": 16, "steps": 40, "checkpoint_every": 20, "log_every": 10,
    "validate_every": 40, "valid_windows": 16, "optim": {"lr": 1e-3, "warmup": 5}, "seed": 1,
}
CAMPAIGN = {
    "stage": "campaign", "model": {"name": "lorenz96", "size": 40, "params": {"F": 8.0}, "dt": 0.05},
    "members": 8, "cycles": 12, "burn_in": 2, "seed": 4, "dtype": "float64",
    "observation": {"kind": "every_kth", "options": {"k": 2}, "sigma": 1.0, "every": 2},
    "parameters": {"estimate": ["F"], "prior": {"F": {"uniform": [6.0, 10.0]}}, "roughening": 0.03},
    "filter": {"method": "ensf", "ensf": {"estimator": "paired", "steps": 20, "coupling": "regression"}},
    "checkpoint_every": 2, "keep_checkpoints": 2,
}
SMOOTH = {  # model_run: the chain's train stage
    "stage": "smooth", "model_run": "unused", "start": 4, "length": 12, "samples": 4,
    "observation": {"kind": "every_kth", "options": {"k": 4}, "sigma": 0.5},
    "sda": {"steps": 12}, "seed": 2,
}
CALIBRATE = {"stage": "calibrate", "runs": ["unused"], "level": 0.5}  # runs: the chain's windows


def _write(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def _submit_cfg(tmp: Path, stages: dict, site: dict | None = None) -> Path:
    data = {"stage": "submit", "site": {"time": "00:10:00", **(site or {})}}
    for name, (cfg, spec) in stages.items():
        data[name] = {"config": str(_write(tmp / f"{name}.yaml", cfg)), **spec}
    return _write(tmp / "submit.yaml", data)


# ------------------------------------------------------------------------------------------------
# without SLURM
def test_slurm_time_formats():
    assert slurm_seconds("30") == 1800 and slurm_seconds("1:30") == 90
    assert slurm_seconds("02:00:00") == 7200 and slurm_seconds("1-12") == 129600
    assert slurm_seconds("1-0:0:1") == 86401
    for bad in ("1:60", "1:2:3:4", "x", "0", "-1", "1-24", ""):
        with pytest.raises(ValueError):
            slurm_seconds(bad)


@pytest.mark.parametrize("data, key", [
    ({"site": {"time": "1:99"}}, "site.time"),
    ({"site": {"sbatch": ["constraint=x"]}}, "site.sbatch"),
    ({"train": {"config": "train_demo", "gpus": 2}}, "train.gpus"),
    ({"campaign": {"config": "campaign_l96_ensf", "time": "5", "signal_lead": 300}},
     "campaign.signal_lead"),
    ({"campaign": {"signal_lead": 30}}, "campaign.config"),
    ({"generate": {"config": "generate_demo", "mem": "lots"}}, "generate.mem"),
    ({"bench": {"ranks": [1, 1]}}, "bench.ranks"),
    ({"smooth": {"config": "smooth_demo", "trajectories": [0, 1, 0]}}, "smooth.trajectories"),
    ({"smooth": {"trajectories": [0]}}, "smooth.config"),
    ({"calibrate": {"config": "calibrate_fhn", "ntasks": 2}}, "calibrate.ntasks"),
])
def test_submit_config_refused_with_the_field_named(data, key):
    with pytest.raises(ConfigError, match=f"x.yaml: {key}:"):
        validate({"stage": "submit", **data}, SubmitConfig, "x.yaml")


def test_templates_render_every_field(tmp_path):
    from pipeline.submit import render

    sub = validate({"stage": "submit", "site": {"partition": "p", "account": "a", "gpus_per_node": 4,
                                                "modules": ["m/1"], "setup": ["echo hi"]},
                    "generate": {"config": "g"}, "train": {"config": "t", "gpus": 4, "ntasks": 4},
                    "campaign": {"config": "c", "ntasks": 8, "signal_lead": 90},
                    "smooth": {"config": "s", "ntasks": 2, "trajectories": [3, 5, 7]},
                    "calibrate": {"config": "k"},
                    "bench": {"ranks": [1, 2, 4]}}, SubmitConfig, "x")
    assert isinstance(sub, SubmitConfig)
    run = tmp_path / "run"
    for stage in ("generate", "train", "campaign", "smooth", "calibrate", "bench"):
        text = render(sub, stage, run)
        assert "{" not in text and "}" not in text, text
        assert f"exec {sys.executable}" in text or "scoreda job" in text
        assert f"job {stage} {run}" in text
        assert "#SBATCH --partition=p" in text and "#SBATCH --account=a" in text
        assert "module load m/1" in text and "echo hi" in text
    assert "--signal=B:USR1@90" in render(sub, "campaign", run)
    assert "--requeue" in render(sub, "campaign", run) and "--ntasks=8" in render(sub, "campaign", run)
    assert "--gpus-per-node=4" in render(sub, "train", run)  # the GPU template
    assert "--array=0-2" in render(sub, "bench", run) and "--ntasks=4" in render(sub, "bench", run)
    assert "bench_gather" in render(sub, "bench", run, template="bench_gather")
    smooth = render(sub, "smooth", run)  # one array task per window, each on ntasks ranks
    assert "--array=0-2" in smooth and "--ntasks=2" in smooth and "_%a.out" in smooth
    assert "--ntasks=1" in render(sub, "calibrate", run)


def test_job_starts_then_resumes(tmp_path):
    from pipeline.submit import _stage_argv

    sub = validate({"stage": "submit", "train": {"config": "t"}, "campaign": {"config": "c"}},
                   SubmitConfig, "x")
    assert isinstance(sub, SubmitConfig)
    assert _stage_argv("campaign", tmp_path, sub)[:2] == ["campaign", "run"]
    assert _stage_argv("train", tmp_path, sub)[1].endswith("train.yaml")
    for d in ("campaign", "train"):
        (tmp_path / d).mkdir()
        (tmp_path / d / "progress.json").write_text("{}")
    assert _stage_argv("campaign", tmp_path, sub) == ["campaign", "resume", str(tmp_path / "campaign")]
    assert _stage_argv("train", tmp_path, sub) == ["train", "--resume", str(tmp_path / "train")]


# ------------------------------------------------------------------------------------------------
# against the local SLURM
@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    if not HAVE_SLURM:
        pytest.skip("slurm-wlm / munge not installed (env/setup.sh installs them)")
    from pipeline.submit import free_port_pair

    state = tmp_path_factory.mktemp("slurm")
    env = {**os.environ, "SCOREDA_SLURM_DIR": str(state), "SCOREDA_SLURM_PORT": str(free_port_pair()),
           "SCOREDA_SLURM_CRED_EXPIRE": "5", "SCOREDA_NO_PROGRESS": "1"}
    up = subprocess.run(["bash", str(SCRIPT), "start"], env=env, capture_output=True, text=True,
                        timeout=120)
    assert up.returncode == 0, up.stderr
    env["SLURM_CONF"] = str(state / "slurm.conf")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    try:
        yield env
    finally:
        subprocess.run(["bash", str(SCRIPT), "stop"], env=env, capture_output=True, timeout=60)


def _cli(env, *args, timeout=300):
    return subprocess.run([*SCOREDA, *map(str, args)], env=env, capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)


def _jobs(run: Path) -> dict[str, str]:
    return {j["stage"]: j["job_id"] for j in json.loads((run / "jobs.json").read_text())["jobs"]}


def _state(env, jid: str) -> dict[str, str]:
    r = subprocess.run(["scontrol", "-o", "show", "job", jid], env=env, capture_output=True,
                       text=True, timeout=30)
    return dict(f.split("=", 1) for f in r.stdout.split() if "=" in f)


def _wait(env, jids, timeout: float) -> dict[str, dict[str, str]]:
    deadline = time.time() + timeout
    while True:
        info = {j: _state(env, j) for j in jids}
        if all(i.get("JobState") in TERMINAL for i in info.values()) or time.time() > deadline:
            return info
        time.sleep(1)


def _logs(run: Path) -> str:
    return "\n".join(f"== {p.name}\n{p.read_text()[-2000:]}" for p in sorted((run / "logs").glob("*")))


def _same_tree_arrays(a: Path, b: Path) -> None:
    import zarr

    ga, gb = zarr.open_group(str(a), mode="r"), zarr.open_group(str(b), mode="r")
    names = sorted(k for k, _ in ga.arrays())
    assert names == sorted(k for k, _ in gb.arrays())
    for k in names:
        if k.startswith("seconds"):
            continue  # wall-clock timings
        np.testing.assert_array_equal(ga[k][...], gb[k][...], err_msg=k)


@pytest.mark.slurm
def test_dry_run_and_refusals(slurm, tmp_path):
    cfg = _submit_cfg(tmp_path, {"generate": (GENERATE, {}), "train": (TRAIN, {"ntasks": 2}),
                                 "campaign": (CAMPAIGN, {"ntasks": 2, "signal_lead": 30})})
    run = tmp_path / "run"
    r = _cli(slurm, "submit", cfg, "--run-dir", run, "--dry-run")
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.count(" ok ") == 3 and "to start at" in r.stdout
    for s in ("generate", "train", "campaign"):
        assert (run / "jobs" / f"{s}.sbatch").exists() and (run / "configs" / f"{s}.yaml").exists()
    assert not (run / "jobs.json").exists()
    assert yaml.safe_load((run / "configs" / "train.yaml").read_text())["store"] == str(run / "data.zarr")
    # refused before anything is written: unknown partition, a time over the partition's limit,
    # a malformed time, a train stage whose store nobody makes
    bad_cases = [
        ({"partition": "nosuch"}, {}, "site.partition: 'nosuch' is not a partition"),
        ({"partition": "short"}, {}, "site.time: 00:10:00 exceeds the maximum of partition 'short'"),
        ({"time": "10:99"}, {}, "site.time: '10:99': a field is out of range"),
    ]
    for i, (site, _, msg) in enumerate(bad_cases):
        d = tmp_path / f"bad{i}"
        d.mkdir()
        c = _submit_cfg(d, {"campaign": (CAMPAIGN, {})}, site)
        r = _cli(slurm, "submit", c, "--run-dir", d / "run")
        assert r.returncode == 2 and msg in r.stderr, r.stderr
        assert len(r.stderr.strip().splitlines()) == 1
        assert not (d / "run").exists()
    d = tmp_path / "nostore"
    d.mkdir()
    c = _submit_cfg(d, {"train": (TRAIN, {})})
    r = _cli(slurm, "submit", c, "--run-dir", d / "run")
    assert r.returncode == 2 and "train.config: store" in r.stderr and "no generate stage" in r.stderr
    r = _cli(slurm, "submit", cfg, "--run-dir", run, "--stages", "train,nosuch")
    assert r.returncode == 2 and "--stages: unknown stage 'nosuch'" in r.stderr


@pytest.mark.slurm
def test_chain_equals_direct_stages(slurm, tmp_path):
    cfg = _submit_cfg(tmp_path, {"generate": (GENERATE, {}), "train": (TRAIN, {"ntasks": 2}),
                                 "campaign": (CAMPAIGN, {"ntasks": 2, "signal_lead": 30}),
                                 "smooth": (SMOOTH, {"ntasks": 2, "trajectories": [0, 1]}),
                                 "calibrate": (CALIBRATE, {})})
    run = tmp_path / "run"
    r = _cli(slurm, "submit", cfg, "--run-dir", run)
    assert r.returncode == 0, r.stderr
    jobs = _jobs(run)
    assert list(jobs) == ["generate", "train", "campaign", "smooth", "calibrate"]
    info = _wait(slurm, jobs.values(), 600)
    states = {s: info[j].get("JobState") for s, j in jobs.items()}
    assert set(states.values()) == {"COMPLETED"}, f"{states}\n{_logs(run)}"
    st = _cli(slurm, "status", run)
    assert st.returncode == 0 and "2/2 shards" in st.stdout and "12/12 cycles" in st.stdout
    assert "step 40/40" in st.stdout and st.stdout.count("COMPLETED") == 5
    assert "2/2 windows" in st.stdout and st.stdout.rstrip().endswith("done")
    # the same stages run directly, from the same rendered configs
    direct = tmp_path / "direct"
    mpiexec = str(Path(sys.executable).parent / "mpiexec")
    steps = [
        [*SCOREDA, "generate", run / "configs/generate.yaml", "--out", direct / "data.zarr"],
        [mpiexec, "-n", "2", *SCOREDA, "train", run / "configs/train.yaml",
         "--store", direct / "data.zarr", "--run-dir", direct / "train"],
        [mpiexec, "-n", "2", *SCOREDA, "campaign", "run", run / "configs/campaign.yaml",
         "--run-dir", direct / "campaign"],
        [mpiexec, "-n", "2", *SCOREDA, "smooth", run / "configs/smooth.yaml", "--trajectory", "1",
         "--model-run", direct / "train", "--out", direct / "smooth_t1"],
    ]
    for cmd in steps:
        p = subprocess.run(list(map(str, cmd)), env=slurm, capture_output=True, text=True,
                           timeout=600, cwd=ROOT)
        assert p.returncode == 0, p.stderr[-2000:]
    _same_tree_arrays(run / "data.zarr", direct / "data.zarr")
    import torch

    wa = torch.load(run / "train/model.pt", weights_only=True)["ema"]
    wb = torch.load(direct / "train/model.pt", weights_only=True)["ema"]
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k
    _same_tree_arrays(run / "campaign/campaign.zarr", direct / "campaign/campaign.zarr")
    # one array task per window, each on 2 ranks; the calibration took exactly those windows
    _same_tree_arrays(run / "smooth/t1/smooth.zarr", direct / "smooth_t1/smooth.zarr")
    assert list((run / "logs").glob("smooth-*_1.out"))
    cal = json.loads((run / "calibrate/calibration.json").read_text())
    assert sorted(r["path"] for r in cal["runs"]) == [str(run / "smooth/t0"), str(run / "smooth/t1")]


@pytest.mark.slurm
def test_time_limited_campaign_requeues_and_finishes_bitwise(slurm, tmp_path):
    camp = {**CAMPAIGN, "cycles": 40}
    # a 2-minute limit with USR1 30 s before it (SLURM may send it up to a minute early: from
    # 30 s on); 3 s of sleep per cycle make the campaign outlast the limit without using the CPU
    cfg = _submit_cfg(tmp_path, {"campaign": (camp, {"ntasks": 2, "time": "2", "signal_lead": 30})})
    env = {**slurm, "SCOREDA_TEST_CYCLE_SLEEP": "3"}
    run = tmp_path / "run"
    r = _cli(env, "submit", cfg, "--run-dir", run)
    assert r.returncode == 0, r.stderr
    jid = _jobs(run)["campaign"]
    info = _wait(slurm, [jid], 900)[jid]
    log = _logs(run)
    assert info.get("JobState") == "COMPLETED", f"{info}\n{log}"
    assert int(info["Restarts"]) >= 1, log
    assert "committed and stopped; requeue 1" in log
    direct = tmp_path / "direct"
    p = _cli(slurm, "campaign", "run", run / "configs/campaign.yaml", "--run-dir", direct)
    assert p.returncode == 0, p.stderr
    _same_tree_arrays(run / "campaign/campaign.zarr", direct / "campaign.zarr")


@pytest.mark.slurm
def test_signalled_smooth_array_task_requeues_and_resumes(slurm, tmp_path, train_l96_window_model):
    """USR1 to a running smooth array task (as SLURM sends before the time limit): its window
    stops after the current batch, the task requeues itself, resumes with the committed samples
    and ends equal to an uninterrupted run; the other task is untouched."""
    model = train_l96_window_model(tmp_path, 30)
    smooth = {**SMOOTH, "model_run": str(model), "batch": 1, "samples": 4, "sda": {"steps": 360}}
    cfg = _submit_cfg(tmp_path, {"smooth": (smooth, {"trajectories": [0, 1], "signal_lead": 30})})
    run = tmp_path / "run"
    r = _cli(slurm, "submit", cfg, "--run-dir", run)
    assert r.returncode == 0, r.stderr
    jid = _jobs(run)["smooth"]
    deadline = time.time() + 120
    while _state(slurm, f"{jid}_0").get("JobState") != "RUNNING" and time.time() < deadline:
        time.sleep(0.5)
    time.sleep(6)  # into the window's first batches
    sig = subprocess.run(["scancel", "--signal=USR1", "--batch", f"{jid}_0"], env=slurm,
                         capture_output=True, text=True, timeout=30)
    assert sig.returncode == 0, sig.stderr
    info = _wait(slurm, [f"{jid}_0", f"{jid}_1"], 600)
    log = _logs(run)
    assert {i.get("JobState") for i in info.values()} == {"COMPLETED"}, f"{info}\n{log}"
    assert int(info[f"{jid}_0"]["Restarts"]) >= 1 and int(info[f"{jid}_1"]["Restarts"]) == 0, log
    assert "committed and stopped; requeue 1" in log and "resuming with" in log, log
    direct = tmp_path / "direct"
    p = _cli(slurm, "smooth", run / "configs/smooth.yaml", "--trajectory", "0", "--out", direct)
    assert p.returncode == 0, p.stderr
    _same_tree_arrays(run / "smooth/t0/smooth.zarr", direct / "smooth.zarr")


@pytest.mark.slurm
def test_failing_stage_cancels_its_dependents(slurm, tmp_path):
    # RK4 blows up at dt 0.9, and without step halving the stage fails
    bad = {**GENERATE, "model": {"name": "lorenz96", "size": 40, "dt": 0.9}, "max_refinements": 0}
    cfg = _submit_cfg(tmp_path, {"generate": (bad, {}), "train": (TRAIN, {}),
                                 "campaign": (CAMPAIGN, {"signal_lead": 30})})
    run = tmp_path / "run"
    r = _cli(slurm, "submit", cfg, "--run-dir", run)
    assert r.returncode == 0, r.stderr
    jobs = _jobs(run)
    info = _wait(slurm, jobs.values(), 300)
    states = {s: info[j].get("JobState") for s, j in jobs.items()}
    assert states == {"generate": "FAILED", "train": "CANCELLED", "campaign": "CANCELLED"}, \
        f"{states}\n{_logs(run)}"
    st = _cli(slurm, "status", run)
    assert "FAILED" in st.stdout and st.stdout.count("CANCELLED") == 2


@pytest.mark.slurm
def test_bench_sweep_runs_as_an_array_and_gathers(slurm, tmp_path):
    cfg = _write(tmp_path / "submit.yaml", {
        "stage": "submit", "site": {"time": "00:10:00"},
        "bench": {"suites": ["campaign"], "ranks": [1, 2], "quick": True, "repeats": 1}})
    run = tmp_path / "run"
    r = _cli(slurm, "submit", cfg, "--run-dir", run)
    assert r.returncode == 0, r.stderr
    jobs = _jobs(run)
    assert list(jobs) == ["bench", "bench_gather"]
    info = _wait(slurm, jobs.values(), 600)
    assert {i.get("JobState") for i in info.values()} == {"COMPLETED"}, _logs(run)
    assert "--array=0-1" in (run / "jobs" / "bench.sbatch").read_text()
    res = json.loads((run / "bench" / "scaling.json").read_text())
    assert res["ranks"] == [1, 2] and res["probe"]["ranks"] == 2
    assert {(row["kind"], row["mode"], row["ranks"]) for row in res["rows"]} == {
        ("campaign", m, rk) for m in ("strong", "weak") for rk in (1, 2)}
    assert len(res["extrapolated_efficiency"]["campaign_strong"]) == len(res["extrapolate_ranks"])
    assert res["extrapolate_ranks"][-1] == 1024
    assert (run / "bench" / "scaling.png").stat().st_size > 0
    table = (run / "bench" / "scaling.md").read_text()
    assert "| campaign strong | 2 |" in table and "| 1024 |" in table


def test_chain_paths_are_wired_into_the_stage_configs(tmp_path):
    from pipeline.submit import _stage_configs

    sub = validate({"stage": "submit", "generate": {"config": "generate_demo_l96"},
                    "train": {"config": "train_demo"}, "campaign": {"config": "campaign_l96_sda"},
                    "smooth": {"config": "smooth_demo", "trajectories": list(range(9))},
                    "calibrate": {"config": "calibrate_fhn"}},
                   SubmitConfig, "x")
    assert isinstance(sub, SubmitConfig)
    stages = ["generate", "train", "campaign", "smooth", "calibrate"]
    out = _stage_configs(sub, tmp_path, stages)
    assert out["generate"]["out"] == str(tmp_path / "data.zarr")
    assert out["train"]["store"] == str(tmp_path / "data.zarr")
    assert out["campaign"]["filter"]["sda"]["model"] == str(tmp_path / "train")
    assert out["smooth"]["model_run"] == str(tmp_path / "train")
    assert out["calibrate"]["runs"] == [str(tmp_path / "smooth" / f"t{t}") for t in range(9)]
    # eight windows cannot make a 90 % bound per parameter: refused before anything runs
    few = sub.model_copy(update={"smooth": sub.smooth.model_copy(update={"trajectories": [0, 1]})})
    with pytest.raises(ConfigError, match=r"smooth.trajectories: 2 windows are too few .*at least 9"):
        _stage_configs(few, tmp_path, stages)
    conf = _write(tmp_path / "s.yaml", {**SMOOTH, "model_run": str(tmp_path / "nosuch")})
    alone = validate({"stage": "submit", "smooth": {"config": str(conf)}}, SubmitConfig, "x")
    with pytest.raises(ConfigError, match="smooth.config: model_run .* no train stage makes it"):
        _stage_configs(alone, tmp_path, ["smooth"])
    data = yaml.safe_load((ROOT / "pipeline/configs/campaign_l96_sda.yaml").read_text())
    data["filter"]["sda"]["model"] = str(tmp_path / "nosuch")
    conf = _write(tmp_path / "c.yaml", data)
    bad = validate({"stage": "submit", "campaign": {"config": str(conf)}}, SubmitConfig, "x")
    with pytest.raises(ConfigError, match="filter.sda.model .* no train stage makes it"):
        _stage_configs(bad, tmp_path, ["campaign"])
    # a stage config that does not exist is named with the key that points to it
    missing = validate({"stage": "submit", "train": {"config": "train_nosuch"}}, SubmitConfig, "x")
    with pytest.raises(ConfigError, match="^train.config: no example config 'train_nosuch'"):
        _stage_configs(missing, tmp_path, ["train"])


def test_train_gpus_and_the_config_device_must_agree(tmp_path):
    """One DDP rank per GPU, no GPUs for a CPU training, no GPU training without GPUs: refused
    at submit time, naming the key, before any job is queued."""
    from pipeline.submit import _stage_configs

    store = tmp_path / "s.zarr"
    store.mkdir()
    data = yaml.safe_load((ROOT / "pipeline/configs/train_demo.yaml").read_text())

    def sub(device, **spec):
        conf = _write(tmp_path / "t.yaml", {**data, "device": device, "store": str(store)})
        return validate({"stage": "submit", "site": {"gpus_per_node": 4},
                         "train": {"config": str(conf), **spec}}, SubmitConfig, "x")

    for device, spec, needle in (
            ("cuda", {}, r"train.gpus: 0, but train.config .* device 'cuda'"),
            ("cpu", {"gpus": 2, "ntasks": 2}, r"train.gpus: 2 per node asked, .* device 'cpu'"),
            ("cuda", {"gpus": 4, "nodes": 2, "ntasks": 4}, r"train.ntasks: 4 ranks on 2 node"),
            ("cuda:0", {"gpus": 2, "ntasks": 2}, r"device 'cuda:0' puts every rank")):
        with pytest.raises(ConfigError, match=needle):
            _stage_configs(sub(device, **spec), tmp_path, ["train"])
    ok = _stage_configs(sub("cuda", gpus=4, nodes=2, ntasks=8), tmp_path, ["train"])
    assert ok["train"]["device"] == "cuda"


def test_job_passes_an_early_usr1_on_and_the_rerun_resumes_training(tmp_path, make_l96_store):
    """`scoreda job train` outside SLURM: a USR1 that arrives at once (as SLURM may send it) is
    held and passed on; training stops with exit 3 and a second `scoreda job` resumes it to the
    same weights as an uninterrupted run."""
    import signal

    import torch

    store = make_l96_store(tmp_path / "s.zarr", 40, 16, 32)
    run = tmp_path / "run"
    (run / "configs").mkdir(parents=True)
    _write(run / "submit.yaml", {"stage": "submit", "train": {"config": "unused"}})
    _write(run / "configs" / "train.yaml", {**TRAIN, "store": str(store), "steps": 200,
                                            "checkpoint_every": 100, "validate_every": 200})
    env = {**os.environ, "SCOREDA_NO_PROGRESS": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    env.pop("SLURM_JOB_ID", None)
    p = subprocess.Popen([*SCOREDA, "job", "train", str(run)], env=env, cwd=ROOT,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    time.sleep(1.0)  # the job's CLI is up (it records USR1 from its first line), torch may not be
    p.send_signal(signal.SIGUSR1)
    out, _ = p.communicate(timeout=300)
    assert p.returncode == 3, out
    assert "SIGUSR1 → stage" in out and "stopped by signal" in out
    assert "run it again to resume" in out
    step = json.loads((run / "train" / "progress.json").read_text())["step"]
    assert 0 < step < 200
    again = subprocess.run([*SCOREDA, "job", "train", str(run)], env=env, cwd=ROOT,
                           capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "train --resume" in again.stdout
    direct = subprocess.run([*SCOREDA, "train", str(run / "configs" / "train.yaml"), "--run-dir",
                             str(tmp_path / "direct")], env=env, cwd=ROOT, capture_output=True,
                            text=True, timeout=300)
    assert direct.returncode == 0, direct.stderr
    wa = torch.load(run / "train" / "model.pt", weights_only=True)["ema"]
    wb = torch.load(tmp_path / "direct" / "model.pt", weights_only=True)["ema"]
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_smooth_job_resumes_a_stopped_window_skips_finished_ones_then_calibrates(
        tmp_path, train_l96_window_model):
    """`scoreda job smooth` outside SLURM: an early USR1 is passed on and the first window stops
    after one committed batch (exit 3); the next run resumes it and smooths the other; a third
    skips both; `scoreda job calibrate` calibrates on exactly those windows. The resumed window's
    samples equal the same smoothing run directly, uninterrupted (same batches: bitwise)."""
    import signal

    from pipeline import smooth as sm
    from pipeline.config import SmoothConfig

    model = train_l96_window_model(tmp_path, 30)
    run = tmp_path / "run"
    (run / "configs").mkdir(parents=True)
    _write(run / "submit.yaml", {"stage": "submit", "calibrate": {"config": "unused"},
                                 "smooth": {"config": "unused", "trajectories": [1, 0]}})
    # one sample per batch, slow enough (~2 s each) for the signal to land mid-window
    smooth = validate({**SMOOTH, "model_run": str(model), "batch": 1, "samples": 3,
                       "sda": {"steps": 360}}, SmoothConfig)
    _write(run / "configs" / "smooth.yaml", smooth.model_dump(mode="json"))
    outs = [run / "smooth" / "t1", run / "smooth" / "t0"]
    _write(run / "configs" / "calibrate.yaml", {**CALIBRATE, "runs": list(map(str, outs))})
    env = {**os.environ, "SCOREDA_NO_PROGRESS": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    for k in ("SLURM_JOB_ID", "SLURM_ARRAY_TASK_ID"):
        env.pop(k, None)

    def job(stage: str, usr1: bool = False) -> tuple[int, str]:
        p = subprocess.Popen([*SCOREDA, "job", stage, str(run)], env=env, cwd=ROOT,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        if usr1:
            time.sleep(1.0)  # the job's CLI records USR1 from its first line
            p.send_signal(signal.SIGUSR1)
        out, _ = p.communicate(timeout=300)
        return p.returncode, out

    rc, log = job("smooth", usr1=True)
    assert rc == 3 and "SIGUSR1 → stage" in log and "run it again to resume" in log, log
    committed = len(list(sm.partial_dir(outs[0]).glob("sample-*.npz")))
    assert 1 <= committed < 3 and not outs[0].exists() and not outs[1].exists()
    rc, log = job("smooth")
    assert rc == 0 and f"resuming with {committed} committed" in log, log
    stamps = [(o / "metrics.json").stat().st_mtime_ns for o in outs]
    rc, again = job("smooth")
    assert rc == 0 and again.count("is complete; skipped") == 2
    assert not [ln for ln in again.splitlines() if "scoreda job:" in ln and "skipped" not in ln]
    assert [(o / "metrics.json").stat().st_mtime_ns for o in outs] == stamps
    rc, log = job("calibrate")
    assert rc == 0, log
    cal = json.loads((run / "calibrate" / "calibration.json").read_text())
    assert cal["windows"] == 2 and {r["path"] for r in cal["runs"]} == set(map(str, outs))
    sm.smooth(smooth.model_copy(update={"trajectory": 1}), tmp_path / "direct")
    _same_tree_arrays(outs[0] / sm.STORE, tmp_path / "direct" / sm.STORE)
