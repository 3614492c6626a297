"""Benchmark suite ``sda``: time per posterior sample of the SDA sampler against the network
evaluations it cannot avoid.

For each case a window network of the shipped training configs' architecture (randomly
initialised: the cost does not depend on the weights) is composed over a window of L frames and
sampled with ``sample_posterior`` (guided by observations of every 4th variable / a coarse
8× pool). The floor is one guided ε evaluation of the same batch — all windows of all samples
through the network, forward and backward for the likelihood gradient
(:func:`kernels.score.sda.posterior_eps`) — times the number the sampler makes,
``steps · (1 + corrector)`` (with the Tweedie likelihood, ``sda.likelihood_cg`` = k: one forward
and k + 1 backward passes each, no corrector), measured moments before in the same process
with one thread. The ratio is then the sampler's own overhead (noise, updates, assembly);
``extra`` holds seconds per sample, per window evaluation, and the extrapolation to the shipped
configs' 256 steps.
"""

from __future__ import annotations

import time

import torch

from kernels.observe import make_operator
from kernels.score import Normalizer, VPSchedule, WindowDenoiser, build_network
from kernels.score.sda import (
    SDASettings,
    make_window_observe,
    posterior_eps,
    sample_posterior,
    trajectory_eps,
)
from kernels.streams import generator
from pipeline.bench import Entry, Floors, suite


def _case(name: str, kind: str, options: dict, spatial: tuple[int, ...], channels: int, params: int,
          length: int, samples: int, steps: int, op_kind: str, op_opts: dict, floors: Floors,
          repeats: int, cg: int = 0) -> Entry:
    torch.manual_seed(0)
    window = 5
    net = build_network(kind, window=window, channels=channels, spatial=spatial, n_params=params,
                        **options)
    with torch.no_grad():  # non-zero outputs: the zero-initialised heads would make ε trivial
        for p in net.parameters():
            p.add_(0.01 * torch.randn_like(p))
    den = WindowDenoiser(net, Normalizer(channels, params, len(spatial)), VPSchedule())
    state_shape = spatial if channels == 1 else (channels, *spatial)
    op = make_operator(op_kind, state_shape, **op_opts)
    times = list(range(length))
    observe = make_window_observe(den.normalizer, op, times, state_shape)
    y = torch.zeros(length * op.m)
    eps = trajectory_eps(den.eps, window, static_theta=True)
    # with the Tweedie likelihood (cg ≥ 1) the predictor runs alone, as it can on a Gaussian prior
    settings = SDASettings(steps=steps, corrector=0 if cg else 1, tau=0.25, gamma=0.1, likelihood_cg=cg)
    shape = (length, channels, *spatial)

    def one_eval() -> None:
        xs = torch.randn(samples, *shape)
        xt = torch.randn(samples, 1, params)
        posterior_eps(eps, den.schedule, xs, xt, 0.5, observe, y, 0.5, 0.1, cg_steps=cg)

    one_eval()
    best_eval = float("inf")
    for _ in range(max(1, repeats)):
        t0 = time.perf_counter()
        one_eval()
        best_eval = min(best_eval, time.perf_counter() - t0)
    evals = steps * (1 + settings.corrector)
    t0 = time.perf_counter()
    sample_posterior(eps, den.schedule, shape, params,
                     [generator(0, "bench-sda", i) for i in range(samples)], settings,
                     observe=observe, y=y, sigma_y=0.5, theta_frames=1)
    total = time.perf_counter() - t0
    windows = samples * (length - window + 1)
    extra = {"samples": samples, "length": length, "steps": steps, "evaluations": evals,
             "seconds_per_sample": total / samples,
             "seconds_per_window_evaluation": best_eval / windows,
             "seconds_per_sample_at_256_steps": total / samples * 256 / steps}
    print(f"[sda] {name}: {total / samples:.2f} s per sample at {steps} steps "
          f"(~{extra['seconds_per_sample_at_256_steps']:.1f} s at 256), "
          f"{best_eval / windows * 1e3:.2f} ms per window evaluation", flush=True)
    what = "forward + backward" if not cg else f"forward + {cg + 1} backward, {cg} CG steps"
    return Entry("sda", name, total, f"{evals} guided ε evaluations ({what})",
                 evals * best_eval, note="ratio = sampler wall / network evaluations", extra=extra)


@suite("sda")
def sda_suite(floors: Floors, repeats: int) -> list[Entry]:
    """Seconds per SDA posterior sample: a Lorenz-96 ring and Kolmogorov U-Nets at 128² and
    (full runs only) 512²."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        q = floors.quick
        cases = [
            _case(f"lorenz96 40, ring w64 d4, L=32, {4 if q else 8} samples", "ring",
                  {"width": 64, "depth": 4}, (40,), 1, 1, 32, 4 if q else 8, 4 if q else 32,
                  "every_kth", {"k": 4}, floors, repeats),
            _case(f"lorenz96 40, ring w64 d4, L=32, {4 if q else 8} samples, likelihood_cg 1, "
                  "no corrector", "ring", {"width": 64, "depth": 4}, (40,), 1, 1, 32,
                  4 if q else 8, 4 if q else 32, "every_kth", {"k": 4}, floors, repeats, cg=1),
            _case("kolmogorov 128², U-Net w16 (1,2,2,4), L=8, 2 samples", "unet",
                  {"width": 16, "mults": (1, 2, 2, 4)}, (128, 128), 1, 2, 8, 2, 2 if q else 4,
                  "coarse_pool", {"factor": 8}, floors, repeats),
        ]
        if not q:  # the campaign's largest grid: what one window evaluation costs on this CPU
            cases.append(_case("kolmogorov 512², U-Net w16 (1,2,2,4), L=5 (one window), 1 sample",
                               "unet", {"width": 16, "mults": (1, 2, 2, 4)}, (512, 512), 1, 2, 5,
                               1, 1, "coarse_pool", {"factor": 8}, floors, 1))
        return cases
    finally:
        torch.set_num_threads(threads)
