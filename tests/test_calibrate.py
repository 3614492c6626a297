"""``scoreda calibrate``: split-conformal θ intervals from smoothings of known truths, and their
use by ``scoreda smooth``; bad input refused in one line with nothing written."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import xarray as xr
import yaml

from pipeline import calibrate as cal
from pipeline import smooth as sm
from pipeline.cli import main
from pipeline.config import CalibrateConfig, ConfigError, SmoothConfig, validate

pytestmark = pytest.mark.usefixtures("one_thread")
TRAJ = list(range(11))   # 11 calibration windows: frames 0..11 of 11 test trajectories


def smooth_cfg(run: Path, trajectory: int, start: int = 0, **over) -> SmoothConfig:
    data = {"stage": "smooth", "model_run": str(run), "trajectory": trajectory, "start": start,
            "length": 12, "observation": {"kind": "every_kth", "options": {"k": 2}, "sigma": 0.5},
            "samples": 5, "sda": {"steps": 16}, "seed": 3}
    data.update(over)
    cfg = validate(data, SmoothConfig)
    assert isinstance(cfg, SmoothConfig)
    return cfg


@pytest.fixture(scope="module")
def windows(tmp_path_factory, make_l96_store, train_l96_window_model) -> tuple[Path, Path]:
    """A small model and smoothings of the first 12 frames of 11 of its 16 test trajectories:
    ``(model, dir)`` with ``dir/t{trajectory}`` each, ``dir/overlap_t0_s6`` (frames 6..17 of
    trajectory 0, sharing frames with ``t0``) and ``dir/disjoint_t0_s20`` (frames 20..31 of
    trajectory 0: no common frame, but its θ)."""
    d = tmp_path_factory.mktemp("calibrate")
    make_l96_store(d / "l96.zarr", 20, 32, 32, test=0.5)
    model = train_l96_window_model(d, 150)
    for t in TRAJ:
        assert sm.smooth(smooth_cfg(model, t), d / f"t{t}") is not None
    assert sm.smooth(smooth_cfg(model, 0, 6), d / "overlap_t0_s6") is not None
    assert sm.smooth(smooth_cfg(model, 0, 20), d / "disjoint_t0_s20") is not None
    return model, d


def write_cfg(path: Path, **data) -> Path:
    path.write_text(yaml.safe_dump({"stage": "calibrate", **data}))
    return path


def posterior(run: Path) -> tuple[float, float, float]:
    """(mean, sd, truth) of F recomputed from the stored samples."""
    ds = xr.open_zarr(run / sm.STORE, consolidated=False)
    draws = ds["theta"].values[:, :, 0].mean(1)
    return float(draws.mean()), float(draws.std(ddof=1)), float(ds["theta_truth"].values[:, 0].mean())


def test_bound_is_the_conformal_rank_of_the_windows_scores(tmp_path, windows, capsys):
    model, d = windows
    runs = [d / f"t{t}" for t in TRAJ[:9]]
    cfg = write_cfg(tmp_path / "c.yaml", runs=[str(d / "t[0-4]"), str(d / "t[5-8]")],
                    evaluate=[str(d / "t9"), str(d / "t10")])
    assert main(["calibrate", str(cfg), "--out", str(tmp_path / "out")]) == 0
    res = json.loads((tmp_path / "out" / cal.CALIBRATION).read_text())
    assert sorted(Path(r["path"]) for r in res["runs"]) == sorted(runs)
    scores = []
    for r in runs:
        m, sd, truth = posterior(r)
        scores.append(abs(truth - m) / sd)
    # 9 windows at 90 %: the ⌈10·0.9⌉ = 9th smallest score, the largest
    assert res["windows"] == 9 and res["bound"]["F"] == pytest.approx(max(scores), rel=1e-5)
    assert res["gaussian_bound"] == pytest.approx(1.6449, abs=1e-4)
    # leaving a window out leaves 8, too few for a finite bound: no leave-one-out figure
    assert res["coverage"]["leave_one_out"]["F"] is None
    ev = res["evaluate"]
    held = [abs(t - m) / sd for m, sd, t in map(posterior, (d / "t9", d / "t10"))]
    assert ev["calibrated"]["F"] == pytest.approx(np.mean([h <= max(scores) for h in held]))
    for name in (cal.CALIBRATION, cal.SUMMARY, cal.FIGURE):
        assert (tmp_path / "out" / name).is_file()
    assert "calibrated on 9 windows" in capsys.readouterr().out

    # smooth with it: mean ± bound·sd on a window the bound never saw
    out = tmp_path / "smoothed"
    assert main(["smooth", str(_smooth_yaml(tmp_path, model, 9)), "--out", str(out),
                 "--calibration", str(tmp_path / "out")]) == 0
    f = json.loads((out / sm.METRICS).read_text())
    th, q = f["theta"]["F"], res["bound"]["F"]
    assert th["cal_lo"] == pytest.approx(th["mean"] - q * th["std"])
    assert th["cal_hi"] == pytest.approx(th["mean"] + q * th["std"])
    assert th["cal_covered"] == (th["cal_lo"] <= th["truth"] <= th["cal_hi"])
    assert f["calibration"]["windows"] == 9
    assert "calibrated 90% [" in (out / sm.SUMMARY).read_text()
    # a calibration written before a sampler key existed matches a config at its default
    old = json.loads((tmp_path / "out" / cal.CALIBRATION).read_text())
    del old["setup"]["sda"]["likelihood_cg"]
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / cal.CALIBRATION).write_text(json.dumps(old))
    assert main(["smooth", str(_smooth_yaml(tmp_path, model, 9)), "--out", str(tmp_path / "s2"),
                 "--calibration", str(tmp_path / "old")]) == 0
    old["setup"]["sda"]["likelihood_cg"] = 2  # but a stored value still counts
    (tmp_path / "old" / cal.CALIBRATION).write_text(json.dumps(old))
    assert main(["smooth", str(_smooth_yaml(tmp_path, model, 9)), "--out", str(tmp_path / "s3"),
                 "--calibration", str(tmp_path / "old")]) == 2
    assert "sda.likelihood_cg = 0 against 2" in capsys.readouterr().err


def test_leave_one_out_and_a_shared_bound(tmp_path, windows):
    """With 11 windows each left-out window has 10 others (finite); ``pool: all`` gives every
    parameter the same bound (one parameter here: the same as per parameter)."""
    _, d = windows
    for pool in ("param", "all"):
        cfg = validate({"stage": "calibrate", "runs": [str(d / "t*")], "pool": pool},
                       CalibrateConfig)
        res = cal.calibrate(cfg, tmp_path / pool)
        s = np.array([r["scores"]["F"] for r in res["runs"]])
        assert len(s) == 11
        # 10 others: the ⌈11·0.9⌉ = 10th smallest of them, their largest
        loo = np.mean([s[i] <= np.delete(s, i).max() for i in range(11)])
        assert res["coverage"]["leave_one_out"]["F"] == pytest.approx(loo)
        # all 11: the ⌈12·0.9⌉ = 11th smallest, the largest
        assert res["bound"]["F"] == pytest.approx(s.max())


def _smooth_yaml(tmp_path: Path, model: Path, trajectory: int, **over) -> Path:
    cfg = smooth_cfg(model, trajectory, **over)
    p = tmp_path / f"smooth_{trajectory}.yaml"
    p.write_text(yaml.safe_dump(json.loads(cfg.model_dump_json())))
    return p


@pytest.mark.parametrize("case, needle", [
    ("too_few", "8 windows per parameter are too few for a 90% bound (at least 9"),
    ("nothing", "matches nothing"),
    ("missing", "no such smooth output"),
    ("twice", "copy_of_t0 and |are windows of one test trajectory (0), sharing its θ"),
    ("overlapping", "overlap_t0_s6 and |are windows of one test trajectory (0)"),
    ("disjoint", "disjoint_t0_s20 and |are windows of one test trajectory (0)"),
    ("evaluated", "disjoint_t0_s20 is a window of test trajectory 0, as the calibration window"),
    ("not_smooth", "not a finished `scoreda smooth` output"),
])
def test_bad_calibration_input_is_one_line_and_writes_nothing(tmp_path, windows, capsys, case,
                                                              needle):
    _, d = windows
    nine = [str(d / f"t{t}") for t in TRAJ[:9]]
    shutil.copytree(d / "t0", tmp_path / "copy_of_t0")
    data = {
        "too_few": {"runs": nine[:8]},
        "nothing": {"runs": [str(d / "nope*")]},
        "missing": {"runs": nine + [str(d / "nope")]},
        "twice": {"runs": nine + [str(tmp_path / "copy_of_t0")]},
        "overlapping": {"runs": nine + [str(d / "overlap_t0_s6")]},
        "disjoint": {"runs": nine + [str(d / "disjoint_t0_s20")]},
        "evaluated": {"runs": nine, "evaluate": [str(d / "disjoint_t0_s20")]},
        "not_smooth": {"runs": nine + [str(tmp_path)]},
    }[case]
    out = tmp_path / "out"
    assert main(["calibrate", str(write_cfg(tmp_path / "c.yaml", **data)), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert all(part in err for part in needle.split("|")) and "\n" not in err, err
    assert not out.exists()


def test_another_set_up_is_refused_by_name(tmp_path, windows, capsys):
    """A window smoothed with another σ cannot join the calibration, nor can a smoothing with
    another σ (or on frames of a calibration window) use it."""
    model, d = windows
    other = tmp_path / "sigma1"
    assert sm.smooth(smooth_cfg(model, 11, observation={
        "kind": "every_kth", "options": {"k": 2}, "sigma": 1.0}), other) is not None
    nine = [str(d / f"t{t}") for t in TRAJ[:9]]
    assert main(["calibrate", str(write_cfg(tmp_path / "c.yaml", runs=nine + [str(other)])),
                 "--out", str(tmp_path / "bad")]) == 2
    assert "observation.sigma = 1.0 against 0.5" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()

    cfg = validate({"stage": "calibrate", "runs": nine}, CalibrateConfig)
    cal.calibrate(cfg, tmp_path / "cal")
    for (traj, start), over, needle in (
            ((11, 0), {"observation": {"kind": "every_kth", "options": {"k": 2}, "sigma": 1.0}},
             "observation.sigma"),
            ((3, 11), {}, "frames 11..23\\) is of the trajectory of its calibration window"),
            ((3, 20), {}, "frames 20..32\\) is of the trajectory of its calibration window"),
            ((11, 0), {"sda": {"steps": 8}}, "sda.steps")):
        scfg = smooth_cfg(model, traj, start, calibration=str(tmp_path / "cal"), **over)
        with pytest.raises(ConfigError, match=needle):
            sm.smooth(scfg, tmp_path / "never")
        assert not (tmp_path / "never").exists()
    with pytest.raises(ConfigError, match="no calibration.json"):
        sm.smooth(smooth_cfg(model, 11, calibration=str(tmp_path)), tmp_path / "never")

    # an existing output is kept
    (tmp_path / "keep").mkdir()
    assert main(["calibrate", str(write_cfg(tmp_path / "c2.yaml", runs=nine)), "--out",
                 str(tmp_path / "keep")]) == 2
    assert "exists" in capsys.readouterr().err and not any((tmp_path / "keep").iterdir())
