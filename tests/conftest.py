"""Shared pytest options: ``--device`` and ``--dtype`` let the same suite run on a GPU node."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import torch


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--device", default="cpu", help="torch device for kernel tests (cpu, cuda)")
    parser.addoption("--dtype", default="float64", choices=["float32", "float64"],
                     help="dtype for tests that do not pin their own")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--device").startswith("cuda") and torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs --device cuda and a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Remove the MPICH segments that killed test jobs leave in /dev/shm.

    The ranks of an mpiexec job that a kill/resume test SIGKILLs cannot unlink their shared
    memory (1–4 MiB each, a dozen per suite run), and a later job whose hashed segment name
    matches would attach to a stale one. ``env/slurm_epilog.sh`` removes those that no live
    process maps or holds open, so jobs of another run going on meanwhile keep theirs.
    """
    if hasattr(session.config, "workerinput"):  # a pytest-xdist worker: the controller does it
        return
    epilog = Path(__file__).resolve().parents[1] / "env" / "slurm_epilog.sh"
    if Path("/dev/shm").is_dir() and epilog.is_file():
        subprocess.run(["bash", str(epilog)], check=False, timeout=60)


@pytest.fixture(scope="session")
def device(request: pytest.FixtureRequest) -> torch.device:
    name = request.config.getoption("--device")
    if name.startswith("cuda") and not torch.cuda.is_available():
        pytest.skip("CUDA requested but not available")
    return torch.device(name)


@pytest.fixture(scope="session")
def dtype(request: pytest.FixtureRequest) -> torch.dtype:
    return getattr(torch, request.config.getoption("--dtype"))


@pytest.fixture
def one_thread():
    """One torch thread for the test: small kernels lose more to thread hand-offs than they gain
    on a shared 2-core machine (a small training run: ~2 s on one thread, ~25 s on two
    contended ones, measured)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _generate_store(path, **keys):
    """A store written by one in-process Dask worker from a generate config's ``keys``."""
    from distributed import Client, LocalCluster

    from pipeline.config import GenerateConfig, validate
    from pipeline.generate import generate

    cfg = validate({"stage": "generate", "seed": 0, "theta": {"mode": "prior"}, "dtype": "float32",
                    "split": {"valid": 0.125, "test": 0.125}, "dask": {"workers": 1}, **keys},
                   GenerateConfig)
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False,
                      dashboard_address=":0") as cluster, Client(cluster) as client:
        generate(cfg, path, client=client, echo=lambda s: None)
    return path


@pytest.fixture(scope="session")
def make_l96_store():
    """``make(path, size, trajectories, frames, test=0.125)``: a small Lorenz-96 store with F
    drawn per trajectory (the parameter a window network must learn), ``test`` of the
    trajectories held out, written by one in-process Dask worker (a few seconds)."""

    def make(path, size: int, trajectories: int, frames: int, test: float = 0.125):
        return _generate_store(
            path, model={"name": "lorenz96", "size": size, "dt": 0.05}, trajectories=trajectories,
            frames=frames, save_every=2, spinup=200, split={"valid": 0.125, "test": test},
            store={"trajectories_per_shard": 8, "shard_frames": frames, "chunk_frames": 16})

    return make


@pytest.fixture(scope="session")
def make_kolmogorov_store():
    """``make(path)``: a 16² Kolmogorov store of 16 trajectories × 8 frames with (ν, drag)
    drawn per trajectory, written by one in-process Dask worker."""

    def make(path):
        return _generate_store(
            path, model={"name": "kolmogorov", "size": 16, "dt": 0.02}, trajectories=16, frames=8,
            save_every=5, spinup=50,
            store={"trajectories_per_shard": 8, "shard_frames": 8, "chunk_frames": 8})

    return make


@pytest.fixture(scope="session")
def train_l96_window_model(make_l96_store):
    """``train(directory, steps) -> run_dir``: a Lorenz-96 store of 16 trajectories (d = 20,
    F per trajectory, frames 0.1 apart) and a window model (W = 3, ring w16 d2) trained
    ``steps`` steps on it in this process, in ``directory/name``; ``over``: more config keys."""
    from pipeline import train as tr
    from pipeline.config import TrainConfig, validate

    def train(d, steps: int, name: str = "run", **over):
        if not (d / "l96.zarr").exists():
            make_l96_store(d / "l96.zarr", 20, 16, 32)
        cfg = validate({"stage": "train", "store": str(d / "l96.zarr"), "window": 3,
                        "network": {"kind": "ring", "options": {"width": 16, "depth": 2}},
                        "batch_size": 32, "steps": steps, "log_every": steps // 3,
                        "validate_every": steps, "checkpoint_every": steps,
                        "optim": {"lr": 3e-3, "warmup": 10}, **over}, TrainConfig)
        threads = torch.get_num_threads()
        try:
            assert tr.start(cfg, d / name) == tr.EXIT_DONE
        finally:
            torch.set_num_threads(threads)
        return d / name

    return train
