"""Figures from stored datasets (PNG, matplotlib's Agg backend; no display needed)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import xarray as xr  # noqa: E402

from pipeline.storage import write_bytes_atomic  # noqa: E402


def _save(fig: plt.Figure, path: Path) -> None:
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    write_bytes_atomic(Path(path), buf.getvalue())


def plot_vorticity(ds: xr.Dataset, path: str | Path, member: int = 0, frames: int = 4) -> None:
    """Vorticity snapshots of one member at ``frames`` evenly spaced saved times."""
    w = ds["vorticity"].isel(member=member)
    idx = np.linspace(0, w.sizes["time"] - 1, frames).round().astype(int)
    lim = float(np.abs(w.isel(time=idx).values).max())
    fig, axes = plt.subplots(1, frames, figsize=(3.2 * frames, 3.3), constrained_layout=True)
    for ax, i in zip(np.atleast_1d(axes), idx, strict=True):
        im = ax.imshow(w.isel(time=int(i)).values, origin="lower", cmap="RdBu_r", vmin=-lim,
                       vmax=lim, extent=(0, 2 * np.pi, 0, 2 * np.pi))
        ax.set_title(f"t = {float(w.time[int(i)]):.2f}")
        ax.set_xlabel("x")
    np.atleast_1d(axes)[0].set_ylabel("y")
    theta = ", ".join(f"{p}={float(ds['theta'].sel(param=p)[member]):.3g}"
                      for p in ds["param"].values)
    fig.suptitle(f"Kolmogorov flow vorticity, member {member} ({theta})")
    fig.colorbar(im, ax=axes, shrink=0.8, label="vorticity")
    _save(fig, Path(path))


def plot_hovmoller(ds: xr.Dataset, path: str | Path, var: str | None = None,
                   member: int = 0) -> None:
    """Space–time (Hovmöller) diagram of one member and the ensemble spread over time."""
    var = var or next(v for v in ds.data_vars if not str(v).startswith("theta"))
    da = ds[var]
    space = [d for d in da.dims if d not in ("member", "time")][0]
    fig, (a0, a1) = plt.subplots(1, 2, figsize=(11, 4.2), constrained_layout=True,
                                 gridspec_kw={"width_ratios": [3, 1.2]})
    x = da.isel(member=member).transpose("time", space).values
    lim = float(np.abs(x).max())
    im = a0.imshow(x, aspect="auto", origin="lower", cmap="RdBu_r", vmin=-lim, vmax=lim,
                   extent=(-0.5, da.sizes[space] - 0.5, float(da.time[0]), float(da.time[-1])))
    a0.set_xlabel(space)
    a0.set_ylabel("time")
    a0.set_title(f"{ds.attrs.get('model', '')} {var}, member {member}")
    fig.colorbar(im, ax=a0, label=var)
    spread = da.std("member").mean(space)
    a1.plot(spread.values, da.time.values)
    a1.set_xlabel("ensemble spread")
    a1.set_ylim(float(da.time[0]), float(da.time[-1]))
    a1.set_title(f"{da.sizes['member']} members")
    _save(fig, Path(path))


def plot_assimilation(ds: xr.Dataset, path: str | Path) -> None:
    """RMSE and spread per cycle, and each estimated θ with its 90% interval against the truth."""
    names = list(ds["param"].values) if "param" in ds.coords else []
    rows = 1 + len(names)
    fig, axes = plt.subplots(rows, 1, figsize=(8, 2.8 * rows), constrained_layout=True,
                             sharex=True, squeeze=False)
    ax = axes[0, 0]
    t = ds["time"].values
    ax.semilogy(t, ds["rmse_f"], color="0.6", lw=0.8, label="forecast RMSE")
    ax.semilogy(t, ds["rmse_a"], color="C0", lw=1.0, label="analysis RMSE")
    ax.semilogy(t, ds["spread_a"], color="C1", lw=1.0, ls="--", label="analysis spread")
    burn = int(ds.attrs.get("burn_in", 0))
    if burn:
        ax.axvline(t[burn], color="k", lw=0.6, ls=":")
    ax.set_ylabel("error")
    ax.set_title(f"{ds.attrs.get('model', '')} {ds.attrs.get('method', '')}: mean analysis RMSE "
                 f"{ds.attrs.get('rmse_a_mean', float('nan')):.3f} after burn-in")
    ax.legend(loc="upper right", fontsize=8)
    for k, name in enumerate(names):
        ax = axes[k + 1, 0]
        ax.fill_between(t, ds["theta_q05"].isel(param=k), ds["theta_q95"].isel(param=k),
                        color="C2", alpha=0.3, label="90% interval")
        ax.plot(t, ds["theta_mean"].isel(param=k), color="C2", label="posterior mean")
        ax.axhline(float(ds["theta_truth"].isel(param=k)), color="k", lw=1, ls="--", label="truth")
        ax.set_ylabel(str(name))
        ax.legend(loc="upper right", fontsize=8)
    axes[-1, 0].set_xlabel("time")
    _save(fig, Path(path))


def plot_state_snapshot(ds: xr.Dataset, path: str | Path, cycle: int = -1) -> bool:
    """Truth, analysis mean and analysis spread at one cycle (fields stored per cycle).

    2-D states (Kolmogorov vorticity) are shown as images, 1-D states as curves. Returns False
    (and writes nothing) when the run did not store its fields.
    """
    if not all(k in ds for k in ("truth", "mean_a", "spread_field")):
        return False
    sel = {"cycle": cycle}
    truth, mean, spread = (ds[k].isel(sel).values for k in ("truth", "mean_a", "spread_field"))
    c = int(ds["cycle"].values[cycle])
    title = f"{ds.attrs.get('model', '')} {ds.attrs.get('method', '')}, cycle {c}"
    if truth.ndim == 2:
        lim = float(np.abs(truth).max())
        fig, axes = plt.subplots(1, 3, figsize=(12, 3.8), constrained_layout=True)
        for ax, field, name in zip(axes[:2], (truth, mean), ("truth", "analysis mean"),
                                   strict=True):
            im = ax.imshow(field, origin="lower", cmap="RdBu_r", vmin=-lim, vmax=lim)
            ax.set_title(name)
        fig.colorbar(im, ax=axes[:2], shrink=0.8)
        im = axes[2].imshow(spread, origin="lower", cmap="viridis")
        axes[2].set_title("analysis spread")
        fig.colorbar(im, ax=axes[2], shrink=0.8)
    else:
        truth, mean, spread = (a.reshape(-1) for a in (truth, mean, spread))
        fig, ax = plt.subplots(figsize=(10, 3.5), constrained_layout=True)
        x = np.arange(truth.size)
        ax.fill_between(x, mean - 2 * spread, mean + 2 * spread, color="C0", alpha=0.25,
                        label="mean ± 2 spread")
        ax.plot(x, mean, color="C0", lw=1, label="analysis mean")
        ax.plot(x, truth, color="k", lw=0.8, ls="--", label="truth")
        ax.set_xlabel("state component")
        ax.legend(loc="upper right", fontsize=8)
    fig.suptitle(title)
    _save(fig, Path(path))
    return True
