"""``scoreda calibrate``: θ intervals that keep their level over windows, calibrated on twins.

SDA's θ posterior inherits the errors of the learned window prior: with FitzHugh–Nagumo its
90 % intervals cover the truth in 80 % of held-out windows (docs/benchmarks.md), because the
posterior mean is biased, not because the samples are too few. Given ``scoreda smooth`` outputs
of ``n`` windows whose truth is known — twin runs on held-out trajectories with the same model,
observation set-up and sampler — the score of parameter ``j`` in window ``i`` is

    s_ij = |θ_true − mean| / sd          (the posterior mean and sd of that window's samples)

and the split-conformal bound ``q_j`` (:func:`kernels.metrics.conformal_quantile`) makes
``mean ± q_j·sd`` an interval that covers a new window's truth with probability at least
``level``, whenever the new window is exchangeable with the calibration windows (the same
set-up, trajectories from the same generator). ``pool: all`` shares one bound across the
parameters (needs ``n·P`` cases instead of ``n`` per parameter: 9 at 90 %).

The coverage reported with it is honest: leave-one-window-out over the calibration windows, and,
for ``evaluate`` runs, on windows the bound never saw. ``scoreda smooth`` with ``calibration:``
this output adds the calibrated intervals to its metrics and summary.

Output directory (written under a temporary name and renamed: never half-written):
``calibration.json``, ``summary.md``, ``scores.png``.
"""

from __future__ import annotations

import argparse
import glob
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kernels.metrics import conformal_min_cases, conformal_quantile, param_summary
from pipeline.config import (
    CalibrateConfig,
    ConfigError,
    SmoothConfig,
    load_yaml,
    resolve_config_path,
    validate,
    with_later_defaults,
)
from pipeline.storage import OutputError, atomic_write, write_text_atomic
from pipeline.train import CONFIG as TRAIN_CONFIG

CALIBRATION, SUMMARY, FIGURE = "calibration.json", "summary.md", "scores.png"
_SMOOTH_CONFIG, _SMOOTH_METRICS, _SMOOTH_STORE = "config.yaml", "metrics.json", "smooth.zarr"


def setup_of(cfg: SmoothConfig) -> dict[str, Any]:
    """What a calibration holds fixed: the model, the window length, the observations and the
    sampler (sample count, seed and truth window may differ)."""
    return {"model_run": cfg.model_run, "length": cfg.length,
            "observation": cfg.observation.model_dump(mode="json"),
            "sda": cfg.sda.model_dump(mode="json")}


def window_key(cfg: SmoothConfig) -> list[Any]:
    """The truth window of a smoothing: [store (absolute; null means the model's training
    store), test trajectory, first frame]."""
    store = cfg.store
    if store is None:
        train_cfg = Path(cfg.model_run) / TRAIN_CONFIG
        store = load_yaml(train_cfg).get("store", "") if train_cfg.is_file() else ""
    return [str(Path(store).absolute()) if store else "", cfg.trajectory, cfg.start]


def same_trajectory(a: list[Any], b: list[Any]) -> bool:
    """Whether two :func:`window_key` windows come from one test trajectory of one store. They
    share its θ (and its flow; with common frames also truth and noise), so the posterior's
    error is alike in both: one is no independent case (or test) for the other."""
    return a[:2] == b[:2]


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def setup_difference(a: dict[str, Any], b: dict[str, Any]) -> str | None:
    """The first key (dotted) whose value differs between two :func:`setup_of`, with both
    values; None when they agree."""
    fa, fb = _flat(a), _flat(b)
    for k in sorted(set(fa) | set(fb)):
        if fa.get(k) != fb.get(k):
            return f"{k} = {fa.get(k)!r} against {fb.get(k)!r}"
    return None


@dataclass(frozen=True)
class Window:
    """The θ posterior of one finished smoothing with a known truth."""

    path: Path
    params: tuple[str, ...]
    mean: np.ndarray                 # (P,)
    std: np.ndarray                  # (P,)
    truth: np.ndarray                # (P,)
    covered: np.ndarray              # (P,) by the posterior's own 90 % interval
    samples: int
    setup: dict[str, Any]
    key: list[Any]

    @property
    def scores(self) -> np.ndarray:
        """``(P,)``: |truth − mean| / sd."""
        return np.abs(self.truth - self.mean) / self.std


def read_window(path: Path) -> Window:
    """A ``scoreda smooth`` output as a calibration case, its θ posterior recomputed from the
    stored samples (so outputs of any version agree); one-line errors naming the run."""
    cfg_file, zarr = path / _SMOOTH_CONFIG, path / _SMOOTH_STORE
    if not path.is_dir() or not (path / _SMOOTH_METRICS).is_file() or not cfg_file.is_file():
        raise ConfigError(f"{path}: not a finished `scoreda smooth` output "
                          f"(needs {_SMOOTH_CONFIG} and {_SMOOTH_METRICS})")
    data = load_yaml(cfg_file)
    if data.get("stage") != "smooth":
        raise ConfigError(f"{cfg_file}: stage: a `scoreda smooth` output is needed "
                          f"(got {data.get('stage')!r})")
    cfg = validate(data, SmoothConfig, str(cfg_file))
    assert isinstance(cfg, SmoothConfig)
    if cfg.condition != "observations":
        raise ConfigError(f"{path}: condition {cfg.condition}: calibration needs smoothings "
                          "from observations")
    if cfg.observations is not None:
        raise ConfigError(f"{path}: observations from a file have no truth to calibrate with")
    import xarray as xr

    try:
        ds = xr.open_zarr(zarr, consolidated=False)
        theta = torch.from_numpy(ds["theta"].values.astype(np.float64))     # (S, L, P)
        truth = torch.from_numpy(ds["theta_truth"].values.astype(np.float64)).mean(0)
        names = tuple(str(n) for n in ds["param"].values)
    except (OSError, KeyError, ValueError) as exc:
        raise ConfigError(f"{zarr}: no θ samples and truth ({type(exc).__name__}: {exc})") from None
    if not names:
        raise ConfigError(f"{zarr}: the model has no parameters to calibrate")
    draws = theta.mean(1)               # one draw per sample: θ is static over the window
    summ = param_summary(draws, truth, 0.9)
    std = summ["std"].numpy()
    bad = [n for n, v in zip(names, std, strict=True) if not (math.isfinite(v) and v > 0)]
    if bad or not bool(torch.isfinite(draws).all()):
        raise ConfigError(f"{zarr}: θ {', '.join(bad) or 'samples'}: no finite spread "
                          f"(from {draws.shape[0]} samples; at least 2 are needed)")
    return Window(path, names, summ["mean"].numpy(), std, truth.numpy(),
                  summ["covered"].numpy(), int(draws.shape[0]), setup_of(cfg), window_key(cfg))


def expand_runs(patterns: list[str], field: str) -> list[Path]:
    """Paths from ``patterns`` (glob patterns allowed), sorted within each pattern, each once."""
    out: list[Path] = []
    for pat in patterns:
        if glob.has_magic(pat):
            hits = sorted(Path(p) for p in glob.glob(pat))
            if not hits:
                raise ConfigError(f"{field}: {pat} matches nothing")
        else:
            hits = [Path(pat)]
            if not hits[0].exists():
                raise ConfigError(f"{field}: {pat}: no such smooth output")
        out += [h for h in hits if h not in out]
    return out


def _check_alike(windows: list[Window], field: str, ref: Window) -> None:
    for w in windows:
        if w.params != ref.params:
            raise ConfigError(f"{field}: {w.path}: parameters {list(w.params)} against "
                              f"{list(ref.params)} in {ref.path}")
        diff = setup_difference(w.setup, ref.setup)
        if diff is not None:
            raise ConfigError(f"{field}: {w.path}: another set-up than {ref.path}: {diff}")


def _bounds(scores: np.ndarray, level: float, pool: str) -> np.ndarray:
    """``(P,)`` conformal bounds of ``scores (n, P)``."""
    s = torch.from_numpy(scores)
    if pool == "all":
        return conformal_quantile(s.reshape(-1, 1), level).expand(s.shape[1]).numpy().copy()
    return conformal_quantile(s, level).numpy()


def calibrate(cfg: CalibrateConfig, out: str | Path, overwrite: bool = False,
              source: str = "calibrate") -> dict[str, Any]:
    """Bounds from the calibration windows, their checks, and the output directory ``out``."""
    out = Path(out)
    if out.exists() and not overwrite:
        raise OutputError(f"{out}: exists (use --overwrite)")
    runs, evaluate = f"{source}: runs", f"{source}: evaluate"
    cal = [read_window(p) for p in expand_runs(cfg.runs, runs)]
    ev = [read_window(p) for p in expand_runs(cfg.evaluate, evaluate)]
    ref = cal[0]
    _check_alike(cal, runs, ref)
    _check_alike(ev, evaluate, ref)
    for i, w in enumerate(cal):
        for v in cal[:i]:
            if same_trajectory(w.key, v.key):
                raise ConfigError(f"{runs}: {w.path} and {v.path} are windows of one test "
                                  f"trajectory ({w.key[1]}), sharing its θ: no independent "
                                  "cases (take one window per trajectory)")
    for w in ev:
        for v in cal:
            if same_trajectory(w.key, v.key):
                raise ConfigError(f"{evaluate}: {w.path} is a window of test trajectory "
                                  f"{w.key[1]}, as the calibration window {v.path}: its "
                                  "coverage would not be a test")
    n, params = len(cal), ref.params
    need = conformal_min_cases(cfg.level)
    cases = n * len(params) if cfg.pool == "all" else n
    if cases < need:
        per = "cases" if cfg.pool == "all" else "windows per parameter"
        raise ConfigError(f"{runs}: {cases} {per} are too few for a {cfg.level:.0%} bound "
                          f"(at least {need}; or pool: all)")
    scores = np.stack([w.scores for w in cal])                       # (n, P)
    bound = _bounds(scores, cfg.level, cfg.pool)
    # leave one window out: the coverage a new window gets, from the calibration set itself
    loo = np.full(scores.shape, np.nan)
    for i in range(n):
        b = _bounds(np.delete(scores, i, 0), cfg.level, cfg.pool)
        loo[i] = np.where(np.isfinite(b), scores[i] <= b, np.nan)
    z = float(torch.special.ndtri(torch.tensor((1 + cfg.level) / 2, dtype=torch.float64)))

    def frac(x: np.ndarray) -> dict[str, float | None]:
        return {p: (float(np.nanmean(x[:, j])) if np.isfinite(x[:, j]).any() else None)
                for j, p in enumerate(params)}

    result: dict[str, Any] = {
        "level": cfg.level, "pool": cfg.pool, "windows": n, "params": list(params),
        "bound": dict(zip(params, bound.tolist(), strict=True)),
        "gaussian_bound": z,
        "setup": ref.setup,
        "runs": [{"path": str(w.path), "window": w.key, "samples": w.samples,
                  "scores": dict(zip(params, w.scores.tolist(), strict=True))} for w in cal],
        "coverage": {"posterior": frac(np.stack([w.covered for w in cal]).astype(float)),
                     "leave_one_out": frac(loo)},
    }
    if ev:
        es = np.stack([w.scores for w in ev])
        result["evaluate"] = {
            "runs": [str(w.path) for w in ev],
            "posterior": frac(np.stack([w.covered for w in ev]).astype(float)),
            "calibrated": frac((es <= bound).astype(float)),
            "scores": es.tolist(),
        }

    def write(tmp: Path) -> None:
        tmp.mkdir()
        write_text_atomic(tmp / CALIBRATION, json.dumps(result, indent=1))
        write_text_atomic(tmp / SUMMARY, "\n".join(summary_lines(result)) + "\n")
        _plot(result, scores, tmp / FIGURE)

    atomic_write(out, write)
    return result


def summary_lines(res: dict[str, Any]) -> list[str]:
    lv = res["level"]
    lines = [f"{lv:.0%} θ intervals mean ± bound·sd, calibrated on {res['windows']} windows "
             f"(pool: {res['pool']}); a calibrated Gaussian posterior has bound {res['gaussian_bound']:.2f}",
             "| parameter | bound (sd) | posterior's own interval covers | calibrated, leave one "
             "window out | on the evaluate runs: posterior / calibrated |",
             "|---|---|---|---|---|"]
    cov, ev = res["coverage"], res.get("evaluate")

    def pct(x: float | None) -> str:
        return "—" if x is None else f"{x:.0%}"

    for p in res["params"]:
        tail = f"{pct(ev['posterior'][p])} / {pct(ev['calibrated'][p])}" if ev else "—"
        lines.append(f"| {p} | {res['bound'][p]:.3g} | {pct(cov['posterior'][p])} | "
                     f"{pct(cov['leave_one_out'][p])} | {tail} |")
    if ev:
        m = len(ev["runs"])
        post = np.mean(list(ev["posterior"].values()))
        calib = np.mean(list(ev["calibrated"].values()))
        lines.append(f"evaluate: {m} windows × {len(res['params'])} parameters: posterior "
                     f"intervals cover {post:.0%}, calibrated {calib:.0%}")
    return lines


def _plot(res: dict[str, Any], scores: np.ndarray, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    params = res["params"]
    fig, ax = plt.subplots(figsize=(2.4 + 1.4 * len(params), 4.0))
    x = np.arange(len(params))
    rng = np.random.default_rng(0)  # jitter only: the figure is reproducible
    jit = rng.uniform(-0.15, 0.15, scores.shape)
    ax.scatter((x + jit).ravel(), scores.ravel(), s=12, color="tab:blue", label="calibration")
    if "evaluate" in res:
        es = np.asarray(res["evaluate"]["scores"])
        ax.scatter(np.tile(x + 0.3, len(es)), es.ravel(), s=16, marker="x", color="tab:red",
                   label="evaluate")
    for j, p in enumerate(params):
        ax.hlines(res["bound"][p], j - 0.35, j + 0.35, color="k", lw=2)
    ax.axhline(res["gaussian_bound"], color="0.5", ls="--", lw=1,
               label=f"Gaussian {res['level']:.0%} ({res['gaussian_bound']:.2f})")
    ax.set_xticks(x, params)
    ax.set_ylabel("|truth − mean| / sd")
    ax.set_title(f"conformal bounds (black), {res['windows']} windows", fontsize=9)
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def load_calibration(path: str | Path) -> dict[str, Any]:
    """A ``scoreda calibrate`` output (its directory or ``calibration.json``)."""
    p = Path(path)
    f = p / CALIBRATION if p.is_dir() else p
    if not f.is_file():
        raise ConfigError(f"calibration: {path}: no {CALIBRATION} (a `scoreda calibrate` output)")
    try:
        res = json.loads(f.read_text())
    except json.JSONDecodeError as exc:
        raise ConfigError(f"calibration: {f}: not JSON ({exc.msg}, line {exc.lineno})") from None
    missing = [k for k in ("level", "pool", "windows", "params", "bound", "setup", "runs")
               if not isinstance(res, dict) or k not in res]
    if missing:
        raise ConfigError(f"calibration: {f}: not a `scoreda calibrate` output "
                          f"(no {', '.join(missing)})")
    return res


def check_calibration(res: dict[str, Any], cfg: SmoothConfig, params: list[str]) -> None:
    """Refuse a calibration made for another set-up, parameters, or including this window."""
    # keys added since the calibration was written take their defaults (a calibration made
    # before sda.likelihood_cg, say, still matches a config that leaves it at 0)
    stored = with_later_defaults(res["setup"], setup_of(SmoothConfig(model_run=cfg.model_run)))
    diff = setup_difference(setup_of(cfg), stored)
    if diff is not None:
        raise ConfigError(f"calibration: made for another set-up: {diff} (this config against "
                          "the calibration's)")
    if list(params) != list(res["params"]):
        raise ConfigError(f"calibration: parameters {res['params']}, the model has {list(params)}")
    key = window_key(cfg)
    for r in res["runs"]:
        if same_trajectory(key, r["window"]):
            raise ConfigError(f"calibration: this window (test trajectory {cfg.trajectory}, frames "
                              f"{cfg.start}..{cfg.start + cfg.length}) is of the trajectory of "
                              f"its calibration window {r['path']}, sharing its θ")


def add_cli(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("calibrate", help="conformal θ intervals from smoothings of known truths",
                       description="Calibrate SDA's θ intervals on `scoreda smooth` outputs of "
                                   "windows with a known truth (split conformal): a bound per "
                                   "parameter, its leave-one-out and held-out coverage.")
    p.add_argument("config", help="calibrate config: file or shipped example name")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output")
    p.set_defaults(func=_cmd)


def _cmd(args: argparse.Namespace) -> int:
    path = resolve_config_path(args.config)
    cfg = validate(load_yaml(path), CalibrateConfig, str(path))
    assert isinstance(cfg, CalibrateConfig)
    res = calibrate(cfg, args.out, args.overwrite, source=str(path))
    for line in summary_lines(res):
        print(line)
    print(f"wrote {args.out}")
    return 0
