"""Process-level runtime: the one place that knows launchers, allocators and progress output."""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from kernels.assimilation import block_range, column_range

_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_tuned = False


def tune_allocator() -> bool:
    """Keep freed large buffers in the heap instead of returning them to the kernel.

    glibc serves allocations above 32 MiB with fresh ``mmap`` pages and unmaps them on free,
    so every large temporary tensor pays page faults on first touch: measured here, an RK4
    step of Lorenz-96 at 20 × 1e6 takes 0.9 s with that default and 0.22 s with this setting.
    Returns whether the setting was applied (glibc only). Set SCOREDA_NO_MALLOC_TUNING=1 to skip.
    """
    global _tuned
    if _tuned or os.environ.get("SCOREDA_NO_MALLOC_TUNING"):
        return _tuned
    name = ctypes.util.find_library("c")
    if not name or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(name)
        ok = libc.mallopt(_M_MMAP_MAX, 0) == 1 and libc.mallopt(_M_TRIM_THRESHOLD, 2**30) == 1
    except (OSError, AttributeError):
        return False
    _tuned = bool(ok)
    return _tuned


def rank() -> int:
    """This process's rank in the launcher's world (0 when not launched in parallel)."""
    for var in ("OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK", "SLURM_PROCID", "RANK"):
        if var in os.environ:
            return int(os.environ[var])
    return 0


def local_rank() -> int:
    """This process's rank among its job's processes on the same node (0 when no launcher says):
    torchrun's ``LOCAL_RANK``, srun's ``SLURM_LOCALID``, MPICH's ``MPI_LOCALRANKID``, Open MPI's
    ``OMPI_COMM_WORLD_LOCAL_RANK``."""
    for var in ("LOCAL_RANK", "SLURM_LOCALID", "MPI_LOCALRANKID", "OMPI_COMM_WORLD_LOCAL_RANK"):
        v = os.environ.get(var, "")
        if v.isdigit():
            return int(v)
    return 0


def compute_device(name: str) -> torch.device:
    """The torch device a config's ``device`` means for this process.

    ``cuda`` without an index spreads a job's ranks over the node's GPUs: GPU
    ``local_rank() % device_count`` (one rank per GPU when the launcher starts one per GPU, as
    NCCL requires; GPU 0 when the launcher gives each task its own ``CUDA_VISIBLE_DEVICES``).
    ``cuda:N`` is taken as it is.

    Raises:
        ConfigError: one line naming ``device``, when this process cannot use it (a GPU config
            run on a CPU node or with a CPU build of torch).
    """
    from pipeline.config import ConfigError

    dev = torch.device(name)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            why = ("this torch is a CPU build" if torch.version.cuda is None
                   else "no CUDA device is visible to this process")
            raise ConfigError(f"device: {name!r} asked for, but {why} (set device: cpu)")
        count = torch.cuda.device_count()
        if dev.index is None:
            return torch.device("cuda", local_rank() % count)
        if dev.index >= count:
            raise ConfigError(f"device: {name!r} asked for, but this process sees {count} CUDA "
                              "device(s)")
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"device: {name!r} asked for, but MPS is not available here")
    return dev


def progress(total: int, desc: str, unit: str = "step", *, any_rank: bool = False,
             **kw: Any) -> tqdm:
    """A rank-0 progress bar on stderr that appears only when the work outlasts two seconds.

    ``any_rank=True`` shows it on whichever rank calls (the dask-mpi driver runs on rank 1).
    """
    disable = (not any_rank and rank() != 0) or os.environ.get("SCOREDA_NO_PROGRESS") == "1"
    # in a log file (batch jobs) a redraw is a new line: redraw rarely there
    interval = 0.1 if sys.stderr.isatty() else 30.0
    return tqdm(total=total, desc=desc, unit=unit, delay=2.0, disable=disable, file=sys.stderr,
                mininterval=interval, dynamic_ncols=True, leave=False, **kw)


# --------------------------------------------------------------------------------------------
# MPI helpers (campaigns): the world, member slices, agreeing on errors and stop signals
def world() -> Any:
    """mpi4py's ``COMM_WORLD``: the launcher's ranks, or a world of one under plain python."""
    from mpi4py import MPI

    return MPI.COMM_WORLD


def member_slice(n: int, size: int, r: int) -> range:
    """The contiguous members ``[i0, i1)`` of rank ``r`` of ``size`` (sizes differ by ≤ 1)."""
    return block_range(n, size, r)


class MPILayout:
    """:class:`kernels.assimilation.Layout` over an MPI communicator.

    Rank r holds the members ``member_slice(n, R, r)`` and, in the column layout, the whole
    column blocks ``column_range(k, chunk, R, r)``. The transposes are one ``alltoall`` each:
    a rank sends and receives about ``N·k/R`` numbers, R times less than an allgather of the
    ensemble. Tensors travel as contiguous CPU numpy arrays and come back on the input's device.
    """

    def __init__(self, comm: Any, n: int, chunk: int) -> None:
        self.comm, self.n, self.chunk = comm, n, chunk
        self.size, self.rank = comm.Get_size(), comm.Get_rank()
        self.members = member_slice(n, self.size, self.rank)
        self._rows = [member_slice(n, self.size, r) for r in range(self.size)]

    def _cols(self, k: int, r: int) -> range:
        return column_range(k, self.chunk, self.size, r)

    def columns(self, k: int) -> range:
        return self._cols(k, self.rank)

    def to_columns(self, x: torch.Tensor) -> torch.Tensor:
        k = x.shape[1]
        a = x.detach().cpu().numpy()
        send = [np.ascontiguousarray(a[:, self._cols(k, r).start:self._cols(k, r).stop])
                for r in range(self.size)]
        got = self.comm.alltoall(send)  # rows of rank r, my columns: concatenated in member order
        return torch.from_numpy(np.concatenate(got, axis=0)).to(x.device)

    def to_members(self, x: torch.Tensor, k: int) -> torch.Tensor:
        a = x.detach().cpu().numpy()
        send = [np.ascontiguousarray(a[rows.start:rows.stop]) for rows in self._rows]
        got = self.comm.alltoall(send)  # my rows, columns of rank r: concatenated in column order
        return torch.from_numpy(np.concatenate(got, axis=1)).to(x.device)

    def gather_columns(self, v: torch.Tensor, k: int) -> torch.Tensor:
        got = self.comm.allgather(np.ascontiguousarray(v.detach().cpu().numpy()))
        return torch.from_numpy(np.concatenate(got, axis=-1)).to(v.device)

    def gather_rows(self, x: torch.Tensor) -> torch.Tensor:
        got = self.comm.allgather(np.ascontiguousarray(x.detach().cpu().numpy()))
        return torch.from_numpy(np.concatenate(got, axis=0)).to(x.device)

    def gather_blocks(self, parts: list[torch.Tensor]) -> list[torch.Tensor]:
        got = self.comm.allgather([np.ascontiguousarray(p.detach().cpu().numpy()) for p in parts])
        dev = parts[0].device if parts else torch.device("cpu")
        return [torch.from_numpy(p).to(dev) for r in got for p in r]


def owner_of(member: int, n: int, size: int) -> int:
    """The rank whose slice holds ``member``."""
    return next(r for r in range(size) if member in member_slice(n, size, r))


def agree(comm: Any, fn: Any, errors: tuple[type[BaseException], ...]) -> Any:
    """Run ``fn()`` on every rank; if it raises one of ``errors`` on any rank, raise the lowest
    rank's error (same type and message) on every rank, so no rank waits in a collective."""
    result, err = None, None
    try:
        result = fn()
    except errors as exc:
        err = exc
    found = comm.allgather(None if err is None else (type(err).__name__, str(err)))
    first = next((f for f in found if f is not None), None)
    if first is not None:
        if err is not None and str(err) == first[1]:
            raise err
        cls = next((e for e in errors if e.__name__ == first[0]), errors[0])
        raise cls(first[1])
    return result


class StopSignals:
    """Catch SIGTERM and SIGUSR1 (SLURM's pre-timeout signal) as a flag, as a context manager.

    ``requested`` becomes True when one arrives; the old handlers come back on exit.
    """

    SIGNALS = ("SIGTERM", "SIGUSR1")

    def __init__(self) -> None:
        self.requested = False
        self.signal: str | None = None
        self._old: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        import signal as _signal

        self.requested = True
        self.signal = _signal.Signals(signum).name

    def __enter__(self) -> StopSignals:
        import signal as _signal
        import threading

        from pipeline import early_signal

        if threading.current_thread() is threading.main_thread():
            for name in self.SIGNALS:
                num = getattr(_signal, name)
                self._old[num] = _signal.signal(num, self._handle)
        if early_signal() is not None:  # arrived before this process watched for it
            self.requested, self.signal = True, early_signal()
        return self

    def __exit__(self, *exc: Any) -> None:
        import signal as _signal

        for num, old in self._old.items():
            _signal.signal(num, old)
        self._old.clear()


def rank_logger(directory: str | os.PathLike[str], r: int, name: str = "scoreda") -> Any:
    """A logger writing to ``directory/rank-RRRR.log`` (one file per rank, appended)."""
    import logging
    from pathlib import Path

    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    log = logging.getLogger(f"{name}.rank{r}")
    log.setLevel(logging.INFO)
    log.propagate = False
    for h in list(log.handlers):
        log.removeHandler(h)
        h.close()
    h = logging.FileHandler(d / f"rank-{r:04d}.log")
    h.setFormatter(logging.Formatter("%(asctime)s rank " + str(r) + " %(message)s"))
    log.addHandler(h)
    return log


# --------------------------------------------------------------------------------------------
# torch.distributed (training)
def init_distributed(device: str) -> tuple[int, int]:
    """Join (or skip) a torch.distributed process group from whatever launched us.

    * ``torchrun``: ``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``/``MASTER_PORT`` are set → ``env://``;
    * ``mpiexec`` / ``srun`` (with MPI): mpi4py's world gives rank and size; rank 0 picks a free
      TCP port on its host and broadcasts the address → ``tcp://``;
    * plain python: a world of one, no process group (nothing to average).

    Backend: NCCL on CUDA, gloo on CPU. Returns ``(rank, world size)``.
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    backend = "nccl" if device.startswith("cuda") else "gloo"
    env = os.environ
    if all(k in env for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")):
        r, size = int(env["RANK"]), int(env["WORLD_SIZE"])
        if size > 1:
            dist.init_process_group(backend, init_method="env://", rank=r, world_size=size)
            _destroy_at_exit()
        return r, size
    comm = world()
    r, size = comm.Get_rank(), comm.Get_size()
    if size == 1:
        return 0, 1
    addr = None
    if r == 0:
        import socket

        host = socket.gethostbyname(socket.gethostname())
        with socket.socket() as s:  # a free port now; the tiny race with other jobs is accepted
            s.bind(("", 0))
            addr = f"tcp://{host}:{s.getsockname()[1]}"
    addr = comm.bcast(addr, root=0)
    dist.init_process_group(backend, init_method=addr, rank=r, world_size=size)
    _destroy_at_exit()
    return r, size


def _destroy_at_exit() -> None:
    """Tear the process group down before the interpreter does: a gloo group left to static
    destruction sometimes aborts the process ("terminate called without an active exception",
    exit 6) after a stage has already returned its exit code."""
    import atexit

    import torch.distributed as dist

    def destroy() -> None:
        if dist.is_initialized():
            dist.destroy_process_group()

    atexit.register(destroy)
