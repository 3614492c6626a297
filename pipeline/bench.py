"""``scoreda bench``: benchmarks reported as ratios to floors measured in the same run.

This machine (and any shared node) is noisy, so an absolute time means little. Each entry is
divided by a floor measured moments before on the same process: memory bandwidth from a large
copy, SGEMM rate from a large matmul, FFT time from a batched ``rfft2``. A ratio of 1 means
"as fast as the hardware primitive allows"; targets are stated as ratios.
"""

from __future__ import annotations

import json
import os
import platform
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch


@dataclass
class Entry:
    """One benchmark result."""

    suite: str
    name: str
    seconds: float
    floor: str
    floor_seconds: float
    target: float | None = None
    note: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def ratio(self) -> float:
        return self.seconds / self.floor_seconds

    @property
    def met(self) -> bool | None:
        return None if self.target is None else self.ratio <= self.target

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.update(ratio=self.ratio, met=self.met)
        return d


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timeit(fn: Callable[[], object], repeats: int = 5, warmup: int = 1,
           device: torch.device | str = "cpu") -> float:
    """Minimum wall time of ``fn()`` over ``repeats`` runs after ``warmup`` runs (seconds)."""
    device = torch.device(device)
    for _ in range(warmup):
        fn()
    _sync(device)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        best = min(best, time.perf_counter() - t0)
    return best


class Floors:
    """Hardware floors measured lazily, once per run, on one device."""

    def __init__(self, device: torch.device, repeats: int = 5, quick: bool = False) -> None:
        self.device = device
        self.repeats = repeats
        self.quick = quick
        self._cache: dict[tuple, float] = {}

    def memory_bandwidth(self) -> float:
        """Bytes per second of a large copy, counting one read and one write."""
        key = ("membw",)
        if key not in self._cache:
            n = (16 if self.quick else 64) * 2**20  # float32 elements: 64 or 256 MiB per array
            a = torch.randn(n, device=self.device)
            b = torch.empty_like(a)
            b.copy_(a)  # touch the pages before timing
            t = timeit(lambda: b.copy_(a), self.repeats, 1, self.device)
            self._cache[key] = 2 * a.numel() * a.element_size() / t
        return self._cache[key]

    def sgemm_rate(self) -> float:
        """FLOP/s of a square float32 matmul."""
        key = ("sgemm",)
        if key not in self._cache:
            n = 1024 if self.quick else 2048
            a = torch.randn(n, n, device=self.device)
            b = torch.randn(n, n, device=self.device)
            c = torch.empty(n, n, device=self.device)
            t = timeit(lambda: torch.mm(a, b, out=c), self.repeats, 1, self.device)
            self._cache[key] = 2 * n**3 / t
        return self._cache[key]

    def rfft2_time(self, batch: int, n: int, dtype: torch.dtype = torch.float32) -> float:
        """Seconds for one batched ``rfft2`` of ``(batch, n, n)`` (one transform per field)."""
        key = ("rfft2", batch, n, dtype)
        if key not in self._cache:
            x = torch.randn(batch, n, n, device=self.device, dtype=dtype)
            out = torch.fft.rfft2(x)
            t = timeit(lambda: torch.fft.rfft2(x, out=out), self.repeats, 1, self.device)
            self._cache[key] = t
        return self._cache[key]

    def rfft_time(self, batch: int, n: int, dtype: torch.dtype = torch.float32) -> float:
        """Seconds for one batched 1-D ``rfft`` of ``(batch, n)``."""
        key = ("rfft", batch, n, dtype)
        if key not in self._cache:
            x = torch.randn(batch, n, device=self.device, dtype=dtype)
            out = torch.fft.rfft(x)
            self._cache[key] = timeit(lambda: torch.fft.rfft(x, out=out), self.repeats, 1,
                                      self.device)
        return self._cache[key]

    def summary(self) -> dict[str, float]:
        return {
            "memory_bandwidth_GBps": self.memory_bandwidth() / 1e9,
            "sgemm_GFLOPs": self.sgemm_rate() / 1e9,
        }


Suite = Callable[[Floors, int], list[Entry]]
SUITES: dict[str, Suite] = {}


def suite(name: str) -> Callable[[Suite], Suite]:
    def deco(fn: Suite) -> Suite:
        SUITES[name] = fn
        return fn
    return deco


def _step_time(model, batch: int, repeats: int, device: torch.device,
               dtype: torch.dtype = torch.float32) -> float:
    g = torch.Generator().manual_seed(0)
    x = model.initial_state(batch, g, dtype=dtype, device=device)
    theta = model.truth_theta(batch, dtype=dtype, device=device)
    with torch.no_grad():
        return timeit(lambda: model.step(x, theta), repeats, 2, device)


@suite("models")
def models_suite(floors: Floors, repeats: int) -> list[Entry]:
    """One step of each model at realistic sizes against its FFT or memory floor."""
    from kernels.dynamics import get_model

    dev, q = floors.device, floors.quick
    out: list[Entry] = []
    for batch, n in ([(4, 64)] if q else [(64, 256), (8, 512)]):
        m = get_model("kolmogorov", n)
        t = _step_time(m, batch, repeats, dev)
        fl = m.ffts_per_step * floors.rfft2_time(batch, n)
        out.append(Entry("models", f"kolmogorov {batch}x{n}^2 step", t,
                         f"{m.ffts_per_step} x rfft2({batch},{n},{n})", fl, target=2.0,
                         extra={"ffts_per_step": m.ffts_per_step}))
    batch, d = (4, 2**16) if q else (20, 10**6)
    bytes_rw = 2 * batch * d * 4
    floor_mem = bytes_rw / floors.memory_bandwidth()
    for compiled in (False, True):
        if compiled and q:
            continue  # compile time is too long for a quick run
        m = get_model("lorenz96", d, compile=compiled)
        t = _step_time(m, batch, repeats, dev)
        out.append(Entry("models", f"lorenz96 {batch}x{d} step" + (" (compiled)" if compiled else ""),
                         t, "1 read + 1 write of the state", floor_mem, target=4.0))
    batch, n = (8, 256) if q else (256, 4096)
    m = get_model("fhn", n)
    t = _step_time(m, batch, repeats, dev)
    out.append(Entry("models", f"fhn {batch}x(2,{n}) step", t, "1 read + 1 write of the state",
                     2 * batch * 2 * n * 4 / floors.memory_bandwidth()))
    batch, n = (8, 128) if q else (256, 256)
    m = get_model("kdv", n)
    t = _step_time(m, batch, repeats, dev)
    out.append(Entry("models", f"kdv {batch}x{n} step", t,
                     f"{m.ffts_per_step} x rfft({batch},{n})",
                     m.ffts_per_step * floors.rfft_time(batch, n),
                     extra={"ffts_per_step": m.ffts_per_step}))
    return out


def machine_info(device: torch.device) -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {"cpu": cpu, "threads": torch.get_num_threads(), "cores": os.cpu_count(),
            "torch": torch.__version__, "device": str(device)}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def format_table(entries: list[Entry]) -> str:
    rows = [("suite", "entry", "time [ms]", "floor", "floor [ms]", "ratio", "target")]
    for e in entries:
        tgt = "" if e.target is None else f"<= {e.target:g} " + ("met" if e.met else "NOT met")
        rows.append((e.suite, e.name, f"{e.seconds * 1e3:.2f}", e.floor,
                     f"{e.floor_seconds * 1e3:.2f}", f"{e.ratio:.2f}", tgt))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows)


#: modules that register further suites with ``@suite`` when imported
SUITE_MODULES: list[str] = ["pipeline.bench_generate", "pipeline.bench_filters",
                             "pipeline.bench_campaign", "pipeline.bench_train", "pipeline.bench_sda"]


def _load_suites() -> None:
    from importlib import import_module

    for module in SUITE_MODULES:
        import_module(module)


def run_bench(names: list[str] | None = None, json_path: str | None = None, quick: bool = False,
              repeats: int = 5, device: str = "cpu") -> dict[str, Any]:
    """Run the named suites (all when empty), print a table and optionally write JSON."""
    _load_suites()
    names = list(names or SUITES)
    unknown = [n for n in names if n not in SUITES]
    if unknown:
        from pipeline.config import ConfigError

        raise ConfigError(f"bench: unknown suite {unknown[0]!r}; known: {', '.join(SUITES)}")
    dev = torch.device(device)
    floors = Floors(dev, repeats=repeats, quick=quick)
    entries: list[Entry] = []
    for name in names:
        entries.extend(SUITES[name](floors, repeats))
    result = {"machine": machine_info(dev), "floors": floors.summary(),
              "entries": [e.as_dict() for e in entries]}
    print(format_table(entries))
    print("floors: " + ", ".join(f"{k}={v:.1f}" for k, v in result["floors"].items()))
    if json_path:
        from pipeline.storage import write_text_atomic

        path = Path(json_path)
        write_text_atomic(path, json.dumps(result, indent=2) + "\n")
    return result
