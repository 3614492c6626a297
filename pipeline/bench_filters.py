"""Benchmark suite ``filters``: one analysis of each method against the floor it streams.

* EnSF with the O(N·D) estimators (paired, diagonal Gaussian): the floor is one read and one
  write of the ensemble per pseudo-time step, ``2·N·D·bytes·steps / memory bandwidth``; the
  per-member noise draw is part of the measured time (it is part of the method).
* EnSF with the mixture estimator: the floor is its two GEMMs per pseudo-time step
  (distances and weighted sum, ``2 · 2·N·M·D`` flop) at the measured SGEMM rate.
* LETKF on a ring: the floor is one read and one write of the ensemble.
"""

from __future__ import annotations

import torch

from kernels.ensf import EnSFSettings, ensf_analysis
from kernels.letkf import build_local_obs, letkf_analysis
from kernels.streams import generator
from pipeline.bench import Entry, Floors, suite, timeit


def _ensf_entry(floors: Floors, repeats: int, n: int, d: int, steps: int, estimator: str,
                likelihood: str) -> Entry:
    g = torch.Generator().manual_seed(0)
    x0 = 8.0 + torch.randn(n, d, generator=g)
    y = torch.atan(x0[0]) + 0.05 * torch.randn(d, generator=g)

    def lik(x: torch.Tensor) -> torch.Tensor:  # arctan observations of every variable
        return (y - torch.atan(x)) / (0.05**2 * (1 + x * x))

    s = EnSFSettings(steps=steps, estimator=estimator, likelihood=likelihood, score_clip=50.0,
                     init="prior")
    gens = lambda: [generator(0, 0, i, "bench") for i in range(n)]  # noqa: E731
    t = timeit(lambda: ensf_analysis(x0, lik, s, gens()), repeats, 1, floors.device)
    if estimator == "mixture":
        floor = steps * 2 * (2 * n * n * d) / floors.sgemm_rate()
        fname = f"{steps} x 2 GEMMs (N=M={n}, D={d})"
    else:
        floor = steps * 2 * n * d * 4 / floors.memory_bandwidth()
        fname = f"{steps} x (1 read + 1 write of the ensemble)"
    return Entry("filters", f"ensf {estimator}/{likelihood} N={n} D={d} steps={steps}", t,
                 fname, floor, extra={"seconds_per_pseudo_step": t / steps})


@suite("filters")
def filters_suite(floors: Floors, repeats: int) -> list[Entry]:
    q = floors.quick
    repeats = max(1, min(repeats, 3))
    out = []
    d_big = 2**14 if q else 10**6
    steps = 5 if q else 20
    out.append(_ensf_entry(floors, repeats, 20, d_big, steps, "paired", "damped"))
    out.append(_ensf_entry(floors, repeats, 20, d_big, steps, "gaussian", "denoised"))
    out.append(_ensf_entry(floors, repeats, 20, 2**12 if q else 10**5, steps, "mixture", "damped"))

    n, d, radius = (20, 2**12, 4.0) if q else (20, 10**5, 4.0)
    g = torch.Generator().manual_seed(1)
    xf = torch.randn(n, d, generator=g)
    y = torch.randn(d, generator=g)
    pts = torch.arange(d, dtype=torch.float64)[:, None]
    local = build_local_obs(pts, pts, (float(d),), radius)
    t = timeit(lambda: letkf_analysis(xf, xf, y, 1.0, local_obs=local), repeats, 1, floors.device)
    out.append(Entry("filters", f"letkf N={n} D={d} radius={radius:g} (L={local.width})", t,
                     "1 read + 1 write of the ensemble", 2 * n * d * 4 / floors.memory_bandwidth(),
                     extra={"local_obs": local.width}))
    return out
