"""Writing labelled datasets safely: never overwrite by accident, never leave half a file.

Every output is first written under a temporary name in the same directory and then renamed
into place, so a crash leaves either the old output or the new one. The resolved config is
written beside it (``<stem>.config.yaml``).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import xarray as xr

SUFFIXES = (".nc", ".zarr")


class OutputError(ValueError):
    """An output path that cannot be written (one-line message naming the path)."""


def check_output(path: str | Path, overwrite: bool, beside: tuple[str, ...] = ()) -> Path:
    """Validate an output path before any work is done.

    ``beside``: suffixes of the files written next to it (``_metrics.png`` → ``STEM_metrics.png``);
    its config (``STEM.config.yaml``) always is. They share the stem with any other output of
    that stem (``a.nc`` and ``a.zarr``), so one that exists is refused without ``overwrite``.
    """
    path = Path(path)
    if path.suffix not in SUFFIXES:
        raise OutputError(f"{path}: output must end in .nc (netCDF4) or .zarr (Zarr v3)")
    if path.exists() and not overwrite:
        raise OutputError(f"{path}: exists; pass --overwrite to replace it")
    for f in (config_path_for(path), *(path.with_name(path.stem + b) for b in beside)):
        if f.exists() and not overwrite:
            raise OutputError(f"{f}: exists (beside another output of that name); pass "
                              "--overwrite to replace it, or choose another name")
    parent = path.parent if str(path.parent) else Path(".")
    if parent.exists() and not parent.is_dir():
        raise OutputError(f"{parent}: not a directory")
    return path


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Call ``write(tmp)`` for a temporary sibling of ``path``, then move it into place.

    For an existing ``path`` (overwrite) the old output is moved aside first and removed only
    after the new one is in place.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmpdir = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    tmp = tmpdir / path.name
    try:
        write(tmp)
        if tmp.is_file():
            with open(tmp, "rb") as fh:
                os.fsync(fh.fileno())
        old = None
        if path.exists():
            old = tmpdir / (path.name + ".old")
            os.replace(path, old)
        os.replace(tmp, path)
        if old is not None:
            _remove(old)
        _fsync_dir(path.parent)
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)


class Replacing:
    """A run directory that a new run is about to be created in, keeping what it replaces.

    An existing ``path`` (``--overwrite``) is moved to the hidden sibling ``.NAME.replaced``.
    :meth:`committed` (the new run's first commit, or its normal end) removes it;
    :meth:`failed` (an error before that) removes the new run and puts the old one back, so a
    replacement that fails on bad input leaves things as they were. After a replacement that was
    killed before its first commit the aside is still there: the next one replaces it, and the
    uncommitted run in ``path`` goes. With ``keep_fresh`` a new run that replaced nothing stays
    when it fails (a campaign stopped at cycle 0 can be resumed with another ``blowup``). Rank 0
    alone calls it; as a context manager, an exception is :meth:`failed`, the end
    :meth:`committed`.
    """

    def __init__(self, path: Path, overwrite: bool, keep_fresh: bool = False) -> None:
        self.path, self.keep_fresh = path, keep_fresh
        self.aside: Path | None = None
        self.kept = False  # the new run committed: it stays, whatever happens after
        aside = path.parent / f".{path.name}.replaced"
        if not overwrite:  # nothing is replaced (the caller refused an existing path)
            return
        if aside.exists():
            # an earlier replacement was killed before its first commit: ``path`` holds nothing
            # committed (the aside goes at the first commit), the aside is what it replaced
            _remove(path)
            self.aside = aside
        elif path.exists() or path.is_symlink():
            os.replace(path, aside)
            self.aside = aside

    def __enter__(self) -> Replacing:
        return self

    def __exit__(self, kind: Any, exc: Any, tb: Any) -> None:
        """The new run's end: :meth:`failed` when it raised, else :meth:`committed`."""
        if kind is not None:
            self.failed()
        else:
            self.committed()

    def committed(self) -> None:
        self.kept = True
        if self.aside is not None:
            _remove(self.aside)
            self.aside = None

    def failed(self) -> None:
        if self.kept or (self.keep_fresh and self.aside is None):
            return
        _remove(self.path)
        if self.aside is not None:
            os.replace(self.aside, self.path)
            self.aside = None


def _remove(p: Path) -> None:
    if p.is_dir():
        shutil.rmtree(p)
    elif p.exists():
        p.unlink()


def _fsync_dir(d: Path) -> None:
    fd = os.open(d, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_file_atomic(path: Path, data: bytes,
                      before_rename: Callable[[], None] | None = None) -> None:
    """Replace one file atomically: temp sibling, fsync, rename, fsync of the directory.

    ``before_rename`` runs between the fsync and the rename (a test hook can die there).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        if before_rename is not None:
            before_rename()
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    _fsync_dir(path.parent)


def write_text_atomic(path: Path, text: str) -> None:
    """Write a small text file atomically."""
    write_file_atomic(path, text.encode())


def config_path_for(out: Path) -> Path:
    """Where the resolved config of output ``out`` is stored."""
    return out.with_name(out.stem + ".config.yaml")


def write_dataset(ds: xr.Dataset, out: Path, config_yaml: str | None = None) -> None:
    """Write ``ds`` to ``out`` (.nc via netCDF4 or .zarr as Zarr v3), atomically.

    Float variables are compressed (zlib for netCDF4; Zarr v3's default Zstd codec).
    """
    def _write(tmp: Path) -> None:
        if out.suffix == ".nc":
            enc = {k: {"zlib": True, "complevel": 4} for k, v in ds.data_vars.items()
                   if v.dtype.kind == "f"}
            ds.to_netcdf(tmp, engine="netcdf4", format="NETCDF4", encoding=enc)
        else:
            ds.to_zarr(tmp, mode="w", zarr_format=3, consolidated=False)

    atomic_write(out, _write)
    if config_yaml is not None:
        write_text_atomic(config_path_for(out), config_yaml)


def open_dataset(path: str | Path) -> xr.Dataset:
    """Open a stored dataset (.nc or .zarr) lazily."""
    path = Path(path)
    if not path.exists():
        raise OutputError(f"{path}: no such dataset")
    if path.suffix == ".zarr":
        return xr.open_zarr(path, consolidated=False)
    return xr.open_dataset(path, engine="netcdf4")


def write_bytes_atomic(path: Path, data: bytes) -> None:
    """Write a small binary file (e.g. a PNG) atomically."""
    write_file_atomic(path, data)
