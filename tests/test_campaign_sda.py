"""``filter.method: sda`` in ``scoreda campaign`` and ``campaign compare``: rank-count invariance,
kill/resume bit for bit, models that do not fit refused with the field named, the same truth as
EnSF, the joint report, and differing truths refused."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import xarray as xr
import yaml
from test_campaign import MPIEXEC, assert_same, in_process, run_cli, stored, write_cfg  # tests/

from pipeline import campaign as cp
from pipeline.campaign_sda import block_members, observed_frames
from pipeline.cli import main
from pipeline.config import CampaignConfig, ConfigError, validate

needs_mpi = pytest.mark.skipif(not MPIEXEC.exists(), reason="no mpiexec in the venv")
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model_run(tmp_path_factory, train_l96_window_model) -> Path:
    """A small Lorenz-96 store (F per trajectory, frames 0.1 apart) and a briefly trained
    window model (W = 3), as in tests/test_smooth.py but trained 600 steps (~6 s): after 150
    the θ head is so rough that most sampled F leave [-1000, 1000] and the forecast of such a
    member blows up (measured)."""
    return train_l96_window_model(tmp_path_factory.mktemp("campaign_sda"), 600)


def make_cfg(run: Path, method: str = "sda", **over) -> CampaignConfig:
    """An L96 campaign whose cycles (every 2 steps of 0.05) match the store's frame spacing."""
    filters = {
        "sda": {"method": "sda", "sda": {"model": str(run), "window": 4, "batch": 2,
                                         "steps": 32, "gamma": 1.0}},
        "ensf": {"method": "ensf", "ensf": {"estimator": "gaussian", "steps": 20}},
    }
    data = {
        "stage": "campaign",
        "model": {"name": "lorenz96", "size": 20, "params": {"F": 8.0}, "dt": 0.05},
        "members": 6, "cycles": 6, "burn_in": 1, "truth_spinup": 200, "seed": 3,
        "observation": {"kind": "identity", "sigma": 1.0, "every": 2},
        "parameters": {"estimate": ["F"], "prior": {"F": {"uniform": [6.0, 10.0]}}},
        "filter": filters[method],
    }
    for k, v in over.items():  # observation and parameters: changed keys only
        data[k] = {**data[k], **v} if k in ("observation", "parameters") else v
    cfg = validate(data, CampaignConfig)
    assert isinstance(cfg, CampaignConfig)
    return cfg


def final_checkpoint(run_dir: Path, cfg: CampaignConfig) -> dict[str, torch.Tensor]:
    from pipeline.assimilate import Twin

    assert cfg.filter.sda is not None
    s = cp._load_checkpoint(run_dir, cfg.cycles, range(cfg.members), Twin(cfg),
                            cfg.filter.sda.window)
    assert s.y_window is not None
    return {"truth": s.truth, "ensemble": s.ensemble, "theta": s.theta, "y_window": s.y_window}


# --------------------------------------------------------------------------------------------
def test_window_and_block_layout():
    # frame j of a window of 4 at cycle c is cycle c - 3 + j: before cycle 3 the first are empty
    assert observed_frames(0, 4) == [3] and observed_frames(2, 4) == [1, 2, 3]
    assert observed_frames(3, 4) == observed_frames(9, 4) == [0, 1, 2, 3]
    # whole blocks of 2 per rank, the last block shorter; every member exactly once
    assert [block_members(7, 2, 3, r) for r in range(3)] == [range(0, 4), range(4, 6), range(6, 7)]
    assert [block_members(3, 4, 2, r) for r in range(2)] == [range(0, 3), range(3, 3)]


def test_sda_campaign_fits_the_observations(tmp_path, model_run):
    cfg = make_cfg(model_run)
    assert in_process(cfg, tmp_path / "run") == cp.EXIT_DONE
    got = stored(tmp_path / "run")
    assert got["theta_particles"].shape == (6, 6, 1) and np.isfinite(got["theta_particles"]).all()
    # σ = 1 on every site: the posterior mean is far closer to the truth than the climatology
    # (L96 std ≈ 3.6) and fits the observations to about the noise
    assert (got["rmse_a"] < 2.0).all(), got["rmse_a"]
    assert (got["rmse_obs_a"] < 1.6).all(), got["rmse_obs_a"]
    assert (got["spread_a"] > 0.05).all()
    # the checkpoint carries the observation window: the last 4 cycles' y
    prog = json.loads((tmp_path / "run" / cp.PROGRESS).read_text())
    assert len(prog["sda_model_fingerprint"]) == 16
    ck = final_checkpoint(tmp_path / "run", cfg)
    assert torch.equal(ck["y_window"], torch.from_numpy(got["y"][-4:]))


# --------------------------------------------------------------------------------------------
@pytest.mark.mpi
@needs_mpi
def test_one_and_two_ranks_are_bitwise_equal(tmp_path, model_run):
    cfg = make_cfg(model_run, members=5)  # blocks [0,2) [2,4) [4,5): ranks own 4 and 1 members
    in_process(cfg, tmp_path / "r1")
    conf = write_cfg(tmp_path / "c.yaml", cfg)
    r = run_cli(["run", str(conf), "--run-dir", str(tmp_path / "r2")], 2, timeout=300)
    assert r.returncode == 0, r.stderr
    assert_same(stored(tmp_path / "r1"), stored(tmp_path / "r2"), "sda R=1 vs R=2")
    a, b = final_checkpoint(tmp_path / "r1", cfg), final_checkpoint(tmp_path / "r2", cfg)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    files = sorted(p.name for p in cp._ckpt_dir(tmp_path / "r2", cfg.cycles).iterdir())
    assert files == ["members-000000-000003.pt", "members-000004-000004.pt", "truth.pt"]


@pytest.mark.mpi
@needs_mpi
def test_kill_and_resume_is_bitwise(tmp_path, model_run):
    cfg = make_cfg(model_run, cycles=7, checkpoint_every=2)
    ref = tmp_path / "ref"
    in_process(cfg, ref)
    conf = write_cfg(tmp_path / "c.yaml", cfg)
    run = tmp_path / "run"
    # a kill after the commit of cycle 2 (checkpoint after 2 cycles: 1 cycle to redo, whose
    # window needs the observations of cycles 0 and 1 from the checkpoint), one inside a
    # checkpoint write on rank 1, one in the forecast; R changes between attempts
    plan = [("2:committed", 1), ("3:checkpoint:1", 2), ("5:forecast", 2)]
    for i, (spec, ranks) in enumerate(plan):
        args = ["run", str(conf), "--run-dir", str(run)] if i == 0 else ["resume", str(run)]
        r = run_cli(args, ranks, env={"SCOREDA_TEST_DIE_AT": spec}, timeout=300)
        assert r.returncode != 0, (spec, r.stdout, r.stderr)
    r = run_cli(["resume", str(run)], 1, timeout=300)
    assert r.returncode == 0, r.stderr
    assert_same(stored(ref), stored(run), "sda killed and resumed vs uninterrupted")
    a, b = final_checkpoint(ref, cfg), final_checkpoint(run, cfg)
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_resume_refuses_a_changed_model(tmp_path, model_run, capsys):
    cfg = make_cfg(model_run, cycles=2)
    run = tmp_path / "run"
    in_process(cfg, run)
    prog = json.loads((run / cp.PROGRESS).read_text())
    cp.write_progress(run, {**prog, "cycles_done": 1, "checkpoint": 1,
                            "sda_model_fingerprint": "0" * 16})
    assert main(["campaign", "resume", str(run)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "SDA model differs" in err and str(model_run) in err


@pytest.mark.parametrize("dropped", [("likelihood_cg",),
                                     ("theta_composition", "theta_evidence_scale", "likelihood_cg")])
def test_a_run_from_before_later_sampler_keys_resumes(tmp_path, model_run, dropped):
    """A run made before ``filter.sda`` gained a key recorded its hash without it; at the key's
    default (its behaviour then) the run still resumes, with the same numbers."""
    cfg = make_cfg(model_run, cycles=2)
    run = tmp_path / "run"
    in_process(cfg, run)
    ref = stored(run)
    d = cp.hashed_config(cfg)
    old = {**d, "filter": {**d["filter"], "sda": {k: v for k, v in d["filter"]["sda"].items()
                                                  if k not in dropped}}}
    old_hash = cp._digest(old)
    assert old_hash != cp.config_hash(cfg) and cp.hash_matches(cfg, old_hash)
    text = yaml.safe_load((run / cp.CONFIG).read_text())
    for k in dropped:
        del text["filter"]["sda"][k]
    (run / cp.CONFIG).write_text(yaml.safe_dump(text))  # as that version wrote it
    prog = json.loads((run / cp.PROGRESS).read_text())
    cp.write_progress(run, {**prog, "cycles_done": 1, "checkpoint": 1, "config_hash": old_hash})
    assert main(["campaign", "resume", str(run)]) == 0
    assert_same(ref, stored(run), "resumed under the old hash")
    # a later key away from its default is another run
    cg = cfg.model_copy(update={"filter": cfg.filter.model_copy(
        update={"sda": cfg.filter.sda.model_copy(update={"likelihood_cg": 1})})})
    assert not cp.hash_matches(cg, old_hash) and not cp.hash_matches(cg, cp.config_hash(cfg))


# --------------------------------------------------------------------------------------------
MISMATCHES = [
    ({"model": {"name": "lorenz96", "size": 40, "params": {"F": 8.0}, "dt": 0.05}}, "model.size:"),
    ({"observation": {"every": 1}}, "observation.every:"),
    ({"model": {"name": "lorenz96", "size": 20, "params": {"F": 8.0}, "dt": 0.1}},
     "observation.every:"),
    ({"parameters": {"estimate": [], "prior": {}}}, "parameters.estimate:"),
    ({"model": {"name": "kdv", "size": 20}, "parameters": {"estimate": [], "prior": {}}},
     "model.name:"),
    ({"model": {"name": "lorenz96", "size": 20, "options": {"tile": 32}}}, "model.options:"),
]


@pytest.mark.parametrize("change,field", MISMATCHES, ids=[m[1] + str(i) for i, m in
                                                            enumerate(MISMATCHES)])
def test_a_model_that_does_not_fit_is_refused(tmp_path, model_run, capsys, change, field):
    cfg = make_cfg(model_run, **change)
    conf = write_cfg(tmp_path / "c.yaml", cfg)
    assert main(["campaign", "run", str(conf), "--run-dir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and field in err, err
    assert not (tmp_path / "run").exists()  # refused before anything is written


@pytest.mark.parametrize("sda,field", [
    ({"window": 2}, "filter.sda.window:"),
    ({"model": "/nonexistent/run"}, "filter.sda.model:"),
    ({"theta_evidence_scale": 0.5}, "filter.sda.theta_evidence_scale:"),  # pooled: no evidence
])
def test_bad_sda_settings_are_refused(tmp_path, model_run, capsys, sda, field):
    _assert_refused(tmp_path, capsys, model_run, sda, field)


def _assert_refused(tmp_path: Path, capsys, run: Path, sda: dict, field: str) -> None:
    """`campaign run` with ``sda`` merged into the filter's settings exits 2 with one line
    naming ``field`` and writes nothing."""
    data = make_cfg(run).model_dump(mode="json")
    data["filter"]["sda"].update(sda)
    conf = tmp_path / "c.yaml"
    conf.write_text(yaml.safe_dump(data))
    assert main(["campaign", "run", str(conf), "--run-dir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and field in err, err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("sda,field", [
    ({"static_theta": False}, "filter.sda.static_theta:"),
    ({"theta_composition": "pooled"}, "filter.sda.theta_composition:"),
    ({"theta_evidence_scale": 0.0}, "filter.sda.theta_evidence_scale"),
])
def test_a_shared_theta_model_takes_only_its_composition(tmp_path, model_run, capsys,
                                                          train_l96_window_model, sda, field):
    """A model trained with one θ noise per window samples a static θ through the shared
    composition only: per-frame θ or a per-frame composition is refused by name, nothing written."""
    shared = model_run.parent / "shared"
    if not shared.exists():
        train_l96_window_model(model_run.parent, 150, name="shared", theta_noise="shared")
    _assert_refused(tmp_path, capsys, shared, sda, field)


def test_config_rules_for_method_sda(model_run):
    base = make_cfg(model_run).model_dump(mode="json")
    with pytest.raises(ConfigError, match=r"filter\.sda: method sda needs"):
        validate({**base, "filter": {"method": "sda"}}, CampaignConfig)
    with pytest.raises(ConfigError, match=r"filter\.sda: only used with method sda"):
        validate({**base, "filter": {**base["filter"], "method": "ensf"}}, CampaignConfig)
    from pipeline.config import AssimilateConfig

    assim = {k: v for k, v in base.items() if k not in
             ("checkpoint_every", "keep_checkpoints", "threads", "blowup", "observations")}
    with pytest.raises(ConfigError, match=r"filter\.method: sda runs .* only in `scoreda campaign`"):
        validate({**assim, "stage": "assimilate"}, AssimilateConfig)
    # runs made before filter.sda existed keep their config hash; so do SDA runs made before
    # sda.theta_guidance, whose default is the behaviour they had
    assert "sda" not in cp.hashed_config(make_cfg(model_run, "ensf"))["filter"]
    sda = make_cfg(model_run)
    assert "theta_guidance" not in cp.hashed_config(sda)["filter"]["sda"]
    off = sda.model_copy(update={"filter": sda.filter.model_copy(
        update={"sda": sda.filter.sda.model_copy(update={"theta_guidance": False})})})
    assert cp.config_hash(off) != cp.config_hash(sda)


# --------------------------------------------------------------------------------------------
def test_same_truth_as_ensf_and_joint_report(tmp_path, model_run, capsys):
    sda, ensf = make_cfg(model_run), make_cfg(model_run, "ensf", members=8)
    in_process(sda, tmp_path / "sda")
    in_process(ensf, tmp_path / "ensf")
    a, b = stored(tmp_path / "sda"), stored(tmp_path / "ensf")
    for k in ("y", "truth", "theta_truth"):
        assert np.array_equal(a[k], b[k]), f"{k}: SDA and EnSF campaigns see another truth"
    capsys.readouterr()
    out = tmp_path / "cmp"
    assert main(["campaign", "compare", str(tmp_path / "sda"), str(tmp_path / "ensf"),
                 "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "| sda | sda (L = 4, 32 steps) | 6 |" in printed
    assert "| ensf | ensf (gaussian) | 8 |" in printed and "θ F mean [90%] (truth)" in printed
    assert (out / "compare.png").stat().st_size > 10_000
    md = (out / "compare.md").read_text()
    assert "6 common cycles" in md and "![metrics](compare.png)" in md
    rows = json.loads((out / "compare.json").read_text())["runs"]
    assert [r["method"] for r in rows] == ["sda (L = 4, 32 steps)", "ensf (gaussian)"]
    for r, s in zip(rows, (a, b), strict=True):  # the table's numbers are the stores' numbers
        assert r["rmse_a"] == pytest.approx(s["rmse_a"][1:].mean(), rel=1e-12)
        assert r["theta"]["F"]["mean"] == pytest.approx(s["theta_mean"][-1, 0], rel=1e-12)
    # existing outputs are kept unless --overwrite
    assert main(["campaign", "compare", str(tmp_path / "sda"), str(tmp_path / "ensf"),
                 "--out", str(out)]) == 2
    assert "exists" in capsys.readouterr().err
    # another seed: another truth and other observations, refused naming the run
    other = make_cfg(model_run, "ensf", members=8, seed=4, cycles=3)
    in_process(other, tmp_path / "other")
    assert main(["campaign", "compare", str(tmp_path / "sda"), str(tmp_path / "other"),
                 "--out", str(tmp_path / "cmp2")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(tmp_path / "other") in err
    assert "observations differ from cycle 0" in err
    assert not (tmp_path / "cmp2").exists()


def test_differing_truth_with_equal_observations_is_refused(tmp_path, model_run, capsys):
    """Equal y but another stored truth (a tampered store) is refused too."""
    ensf = make_cfg(model_run, "ensf", members=8, cycles=3)
    in_process(ensf, tmp_path / "a")
    in_process(ensf, tmp_path / "b")
    import zarr

    g = zarr.open_group(tmp_path / "b" / cp.STORE, mode="r+", zarr_format=3)
    truth = g["truth"][...]
    truth[2, 0] += 1e-9
    g["truth"][...] = truth
    assert main(["campaign", "compare", str(tmp_path / "a"), str(tmp_path / "b"),
                 "--out", str(tmp_path / "cmp")]) == 2
    assert "truth differs from cycle 2" in capsys.readouterr().err
    ds = xr.open_zarr(tmp_path / "a" / cp.STORE, consolidated=False)
    assert ds.sizes["cycle"] == 3
