"""``scoreda campaign compare RUN_DIR RUN_DIR … --out DIR``: several campaigns on one truth.

Campaigns of different methods (SDA, EnSF, LETKF, EnKF) with the same model, observation and
seed config share the twin truth and the observations bit for bit (the truth, the shocks and the
observation noise come from streams keyed by the seed and the cycle, never by the method or the
members). The comparison checks that before drawing anything: over the cycles every run has
committed, the observations ``y``, the stored truth fields (when both runs keep them), the cycle
times and the true θ must be identical; otherwise it refuses, naming the run and the first
differing cycle.

Outputs in ``DIR`` (existing ones are kept unless ``--overwrite``): ``compare.png`` (analysis RMSE
and spread, forecast RMSE, and each estimated θ with its 90 % interval against the truth, every
run in one panel), ``compare.md`` and ``compare.json`` (a side-by-side table: means over the
common cycles after the largest burn-in, θ at the last common cycle, milliseconds per cycle).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.config import CampaignConfig
from pipeline.storage import OutputError, write_text_atomic

OUTPUTS = ("compare.png", "compare.md", "compare.json")


@dataclass
class Run:
    """One committed campaign: its directory, config, store (committed cycles) and label."""

    path: Path
    cfg: CampaignConfig
    ds: Any  # xr.Dataset of the committed cycles (pipeline.campaign.open_run)
    label: str

    @property
    def method(self) -> str:
        f = self.cfg.filter
        if f.method == "ensf":
            return f"ensf ({f.ensf.estimator})"
        if f.method == "sda":
            assert f.sda is not None
            return f"sda (L = {f.sda.window}, {f.sda.steps} steps)"
        return f.method


def load_runs(run_dirs: list[str | Path]) -> list[Run]:
    """Open every run (committed cycles only); refuses runs without a truth or a cycle."""
    from pipeline.campaign import open_run, read_run_config

    paths = [Path(p) for p in run_dirs]
    if len(paths) < 2:
        raise OutputError("campaign compare: give at least two run directories")
    if len({p.resolve() for p in paths}) != len(paths):
        raise OutputError("campaign compare: a run directory is given twice")
    runs = []
    names = [p.name for p in paths]
    for p, name in zip(paths, names, strict=True):
        cfg = read_run_config(p)
        if cfg.observations is not None:
            raise OutputError(f"{p}: observations from a file (no truth); compare needs twin runs")
        ds = open_run(p)
        if ds.attrs["cycles_done"] == 0:
            raise OutputError(f"{p}: no committed cycle to compare yet")
        label = name if names.count(name) == 1 else str(p)
        runs.append(Run(p, cfg, ds, label))
    return runs


def common_cycles(runs: list[Run]) -> int:
    """Cycles committed by every run, after checking that all runs share one truth.

    Raises:
        OutputError: one line naming the run that differs from the first and how.
    """
    ref = runs[0]
    n = min(int(r.ds.attrs["cycles_done"]) for r in runs)
    for r in runs[1:]:
        why = f"{r.path}: not the truth of {ref.path}"
        a, b = ref.ds.isel(cycle=slice(0, n)), r.ds.isel(cycle=slice(0, n))
        if a["y"].shape != b["y"].shape:
            raise OutputError(f"{why}: {b.sizes['obs']} observations per cycle, not "
                              f"{a.sizes['obs']} (another observation network)")
        if not np.array_equal(a["time"].values, b["time"].values):
            raise OutputError(f"{why}: its cycles are at other times (observation.every × "
                              "model.dt differs)")
        differ = ~np.all(a["y"].values == b["y"].values, axis=1)
        if differ.any():
            raise OutputError(f"{why}: the observations differ from cycle {int(np.argmax(differ))} "
                              "on (another seed, model, observation or truth_spinup config)")
        if "truth" in a and "truth" in b:
            ta, tb = a["truth"].values.reshape(n, -1), b["truth"].values.reshape(n, -1)
            differ = ~np.all(ta == tb, axis=1) if ta.shape == tb.shape else np.ones(n, bool)
            if differ.any():
                raise OutputError(f"{why}: the truth differs from cycle {int(np.argmax(differ))} on")
        if not torch.equal(_true_theta(ref.cfg), _true_theta(r.cfg)):
            raise OutputError(f"{why}: the true parameters (model.params) differ")
    return n


def _true_theta(cfg: CampaignConfig) -> torch.Tensor:
    """Every parameter's true value ``(P_all,)`` of the campaign's truth run."""
    return cfg.model.build().truth_theta(1, cfg.model.params, dtype=torch.float64)[0]


def summary(runs: list[Run], n: int) -> tuple[list[dict[str, Any]], int]:
    """One row of metrics per run over cycles ``[burn, n)``, burn = the largest burn-in (at
    most n − 1); θ at cycle n − 1. Returns the rows and the burn-in used."""
    from pipeline.campaign import timing_split

    burn = min(max(r.cfg.burn_in for r in runs), n - 1)
    rows = []
    for r in runs:
        d = r.ds.isel(cycle=slice(burn, n))
        split = timing_split(r.path)
        secs = split["wall"] if split is not None else float(np.nanmean(r.ds["seconds"].values))
        row: dict[str, Any] = {
            "run": r.label, "path": str(r.path), "method": r.method, "members": r.cfg.members,
            "cycles": n, "burn_in": burn,
            **{k: float(d[k].values.mean()) for k in ("rmse_a", "rmse_f", "spread_a", "crps_a")},
            "ms_per_cycle": 1e3 * secs, "ranks": _ranks(r.path), "theta": {}}
        if "theta_mean" in r.ds:
            last = r.ds.isel(cycle=n - 1)
            for k, name in enumerate(r.ds["param"].values):
                lo, hi = float(last["theta_q05"][k]), float(last["theta_q95"][k])
                truth = float(r.ds["theta_truth"][k])
                row["theta"][str(name)] = {"mean": float(last["theta_mean"][k]), "q05": lo,
                                           "q95": hi, "truth": truth, "covered": lo <= truth <= hi}
        rows.append(row)
    return rows, burn


def _ranks(path: Path) -> int | None:
    from pipeline.campaign import read_progress

    r = read_progress(path).get("ranks")
    return int(r) if r is not None else None


def table_lines(rows: list[dict[str, Any]], burn: int) -> list[str]:
    """The side-by-side table in markdown (also what the CLI prints)."""
    params = sorted({p for r in rows for p in r["theta"]})
    head = (["run", "method", "N", "RMSE a", "RMSE f", "spread a", "CRPS a"]
            + [f"θ {p} mean [90%] (truth)" for p in params] + ["ms/cycle (ranks)"])
    out = [f"{rows[0]['cycles']} common cycles, means after a burn-in of {burn}; θ at the last "
           "common cycle", "", "| " + " | ".join(head) + " |",
           "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["run"], r["method"], str(r["members"])]
        cells += [f"{r[k]:.4f}" for k in ("rmse_a", "rmse_f", "spread_a", "crps_a")]
        for p in params:
            t = r["theta"].get(p)
            cells.append("—" if t is None else
                         f"{t['mean']:.4g} [{t['q05']:.4g}, {t['q95']:.4g}] ({t['truth']:.4g}, "
                         f"{'covered' if t['covered'] else 'NOT covered'})")
        cells.append(f"{r['ms_per_cycle']:.1f} ({r['ranks']})")
        out.append("| " + " | ".join(cells) + " |")
    return out


def plot(runs: list[Run], n: int, burn: int, path: Path) -> None:
    """RMSE / spread over cycles and θ with 90 % intervals of every run in one figure."""
    from pipeline.report import _save, plt

    params = sorted({str(p) for r in runs if "param" in r.ds.coords for p in r.ds["param"].values})
    rows = 2 + len(params)
    fig, axes = plt.subplots(rows, 1, figsize=(9, 2.6 * rows), constrained_layout=True,
                             sharex=True, squeeze=False)
    t = runs[0].ds["time"].values[:n]
    for j, r in enumerate(runs):
        d, col = r.ds.isel(cycle=slice(0, n)), f"C{j}"
        axes[0, 0].semilogy(t, d["rmse_a"], color=col, lw=1.1, label=f"{r.label}: RMSE")
        axes[0, 0].semilogy(t, d["spread_a"], color=col, lw=0.9, ls="--", label=f"{r.label}: spread")
        axes[1, 0].semilogy(t, d["rmse_f"], color=col, lw=1.0, label=r.label)
        for k, name in enumerate(params):
            if "param" not in d.coords or name not in d["param"].values:
                continue
            ax, sel = axes[2 + k, 0], {"param": name}
            ax.fill_between(t, d["theta_q05"].sel(sel), d["theta_q95"].sel(sel), color=col,
                            alpha=0.18)
            ax.plot(t, d["theta_mean"].sel(sel), color=col, lw=1.1, label=f"{r.label} (90%)")
    for k, name in enumerate(params):
        truth = next(float(r.ds["theta_truth"].sel(param=name)) for r in runs
                     if "param" in r.ds.coords and name in r.ds["param"].values)
        ax = axes[2 + k, 0]
        ax.axhline(truth, color="k", lw=1, ls=":", label="truth")
        ax.set_ylabel(name)
        ax.legend(loc="upper right", fontsize=7)
    axes[0, 0].set_ylabel("analysis")
    axes[0, 0].set_title(f"{runs[0].cfg.model.name}: {len(runs)} runs on one truth")
    axes[1, 0].set_ylabel("forecast RMSE")
    for ax in axes[:2, 0]:
        if burn:
            ax.axvline(t[burn], color="k", lw=0.6, ls=":")
        ax.legend(loc="upper right", fontsize=7, ncol=2)
    axes[-1, 0].set_xlabel("time")
    _save(fig, path)


def compare(run_dirs: list[str | Path], out: str | Path,
            overwrite: bool = False) -> tuple[list[Path], list[str]]:
    """Check that the runs share one truth, then write the figure and the table into ``out``.

    Returns the written paths and the table's lines.
    """
    out = Path(out)
    runs = load_runs(run_dirs)
    n = common_cycles(runs)
    if out.exists() and not out.is_dir():
        raise OutputError(f"{out}: exists and is not a directory")
    there = [name for name in OUTPUTS if (out / name).exists()]
    if there and not overwrite:
        raise OutputError(f"{out / there[0]}: exists; pass --overwrite to replace it")
    rows, burn = summary(runs, n)
    lines = table_lines(rows, burn)
    out.mkdir(parents=True, exist_ok=True)
    png, md, js = (out / name for name in OUTPUTS)
    plot(runs, n, burn, png)
    write_text_atomic(md, "\n".join([f"# Campaign comparison: {', '.join(r.label for r in runs)}",
                                     "", *lines, "", f"![metrics]({png.name})", ""]))
    write_text_atomic(js, json.dumps({"cycles": n, "burn_in": burn, "runs": rows}, indent=1) + "\n")
    return [png, md, js], lines
