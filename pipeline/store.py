"""The trajectory store: layout, creation, per-shard progress markers, checksums and export.

A store is one Zarr v3 directory that ``xarray.open_zarr`` reads as a labelled Dataset:

* state variables ``(trajectory, time, *space)``, one per model variable and stored grid (the
  first grid keeps the plain names, e.g. ``vorticity(y, x)``; further grids get a suffix on the
  variable and its space dims, e.g. ``vorticity_64(y_64, x_64)``);
* ``theta(trajectory, time, param)`` in the natural space (constant in time unless the θ mode is
  ``walk``), coords ``trajectory``, ``time``, ``param`` (+ ``param_transform``, ``param_truth``),
  ``split(trajectory)`` (0 train, 1 valid, 2 test; CF flag attributes) and the space coords;
* root attrs: model, the resolved config (YAML) and its hash, software version, CF conventions.

State arrays use the sharding codec: a **shard** holds ``trajectories_per_shard`` whole
trajectories × ``shard_frames`` saved times (the unit of writing: one task writes whole shards
only), a **chunk** holds one trajectory × ``chunk_frames`` times (the unit of reading: a training
window of one trajectory touches one or two chunks). Every finished shard leaves a marker file
``_progress/shard-BBBBBB-CCCC.json`` with the checksum of its data; the ``_progress`` node is a
Zarr group so that Zarr and xarray see a valid hierarchy.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import json
import os
import re
import socket
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from pipeline.config import ConfigError, GenerateConfig, dump, validate
from pipeline.storage import (
    OutputError,
    Replacing,
    atomic_write,
    check_output,
    write_dataset,
    write_text_atomic,
)

PROGRESS = "_progress"
SPLIT_NAMES = ("train", "valid", "test")
_MARKER = re.compile(r"^shard-(\d{6})-(\d{4})\.json$")


# --------------------------------------------------------------------------------------------
# layout
@dataclass(frozen=True)
class ArraySpec:
    """One stored state array: model variable ``channel`` (None: the whole state) on grid ``grid``."""

    name: str
    variable: str
    grid: int
    channel: int | None
    dims: tuple[str, ...]
    shape: tuple[int, ...]
    chunks: tuple[int, ...]
    shards: tuple[int, ...]


@dataclass(frozen=True)
class Layout:
    """Sizes, shards and arrays of a store, derived from a ``GenerateConfig`` alone."""

    trajectories: int
    frames: int
    per_shard: int
    shard_frames: int
    chunk_frames: int
    grids: tuple[int, ...]
    space_dims: tuple[str, ...]
    arrays: tuple[ArraySpec, ...]

    @property
    def blocks(self) -> int:
        """Number of trajectory blocks (one task each)."""
        return self.trajectories // self.per_shard

    @property
    def time_blocks(self) -> int:
        """Shards along time per trajectory block."""
        return self.frames // self.shard_frames

    @property
    def shards(self) -> int:
        return self.blocks * self.time_blocks

    def block_trajectories(self, b: int) -> range:
        return range(b * self.per_shard, (b + 1) * self.per_shard)

    def frame_range(self, c: int) -> range:
        return range(c * self.shard_frames, (c + 1) * self.shard_frames)


def layout(cfg: GenerateConfig, model: Any | None = None) -> Layout:
    """The store layout of ``cfg`` (``model``: its built model, to avoid building it twice)."""
    model = model if model is not None else cfg.model.build()
    dims = tuple(model.state_dims)
    multi = len(model.variables) > 1
    space = dims[1:] if multi else dims
    grids = tuple(cfg.store.grids or [int(cfg.model.size)])
    n_space = len(space)
    state_space = tuple(model.state_shape[-n_space:])
    st = cfg.store
    shard_frames = st.shard_frames or cfg.frames
    arrays: list[ArraySpec] = []
    for gi, g in enumerate(grids):
        suffix = "" if gi == 0 else f"_{g}"
        factor = int(cfg.model.size) // g
        shape_space = tuple(s // factor for s in state_space)
        sdims = tuple(d + suffix for d in space)
        for ci, var in enumerate(model.variables):
            shape = (cfg.trajectories, cfg.frames, *shape_space)
            arrays.append(ArraySpec(
                name=var + suffix, variable=var, grid=g, channel=ci if multi else None,
                dims=("trajectory", "time", *sdims), shape=shape,
                chunks=(1, st.chunk_frames, *shape_space),
                shards=(st.trajectories_per_shard, shard_frames, *shape_space),
            ))
    return Layout(cfg.trajectories, cfg.frames, st.trajectories_per_shard, shard_frames,
                  st.chunk_frames, grids, space, tuple(arrays))


def pooled_coords(model: Any, space: tuple[str, ...], factor: int) -> dict[str, np.ndarray]:
    """Positions of the stored grid points: block means of the simulated ones."""
    out: dict[str, np.ndarray] = {}
    coords = model.state_coords()
    for d in space:
        if d in coords:
            c = coords[d].detach().cpu().numpy().astype(np.float64)
            out[d] = c.reshape(-1, factor).mean(axis=1)
    return out


# --------------------------------------------------------------------------------------------
# config identity
def hashed_config(cfg: GenerateConfig) -> dict[str, Any]:
    """The part of the config that determines the stored numbers (not ``out``, not the cluster)."""
    return _identity(cfg.model_dump(mode="json"))


def _identity(d: dict[str, Any]) -> dict[str, Any]:
    """``d`` (a dumped generate config, changed in place) less what does not set the numbers."""
    d.pop("out", None)
    # every trajectory takes the smallest refinement that integrates it; the cap only decides
    # when to give up, so a finished shard's numbers do not depend on it
    d.pop("max_refinements", None)
    # torch's intra-op thread count changes results in the last bits (measured: Kolmogorov with
    # 1 vs 2 threads), so it is part of the identity; where and on how many workers is not
    d["dask"] = {"threads_per_worker": (d.get("dask") or {}).get("threads_per_worker")}
    # stores made before theta.prior existed drew from the model's prior: the same numbers
    if not (d.get("theta") or {}).get("prior", True):
        d["theta"].pop("prior")
    return d


def config_hash(cfg: GenerateConfig) -> str:
    text = json.dumps(hashed_config(cfg), sort_keys=True, separators=(",", ":"))
    return hashlib.blake2b(text.encode(), digest_size=16).hexdigest()


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(d, dict):
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out or {prefix.rstrip("."): {}}
    return {prefix.rstrip("."): d}


def first_difference(old: dict[str, Any], new: dict[str, Any]) -> str:
    """``key: old -> new`` for the first key whose value differs."""
    a, b = _flatten(old), _flatten(new)
    for key in list(a) + [k for k in b if k not in a]:
        if a.get(key, "<absent>") != b.get(key, "<absent>"):
            return f"{key}: {a.get(key, '<absent>')!r} in the store, {b.get(key, '<absent>')!r} now"
    return "no visible difference (different software version?)"


# --------------------------------------------------------------------------------------------
# checksums and markers
def checksum(a: np.ndarray) -> str:
    """Checksum of an array's bytes in C order (blake2b-128, hex)."""
    return hashlib.blake2b(np.ascontiguousarray(a).view(np.uint8).data, digest_size=16).hexdigest()


def marker_path(store: Path, b: int, c: int) -> Path:
    return store / PROGRESS / f"shard-{b:06d}-{c:04d}.json"


def write_marker(store: Path, b: int, c: int, sums: dict[str, str], extra: dict[str, Any]) -> None:
    """Record shard ``(b, c)`` as finished (atomic: temp file, fsync, rename)."""
    record = {"block": b, "time_block": c, "checksums": sums,
              "finished": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
              "host": socket.gethostname(), "pid": os.getpid(), **extra}
    write_text_atomic(marker_path(store, b, c), json.dumps(record, indent=1) + "\n")


def finished_shards(store: Path) -> dict[tuple[int, int], dict[str, Any]]:
    """Markers of the finished shards, by ``(block, time_block)``."""
    return _read_markers(store)[0]


def unreadable_markers(store: Path) -> list[str]:
    """Names of the shard markers that :func:`finished_shards` skips as unreadable."""
    return _read_markers(store)[1]


def _read_markers(store: Path) -> tuple[dict[tuple[int, int], dict[str, Any]], list[str]]:
    out: dict[tuple[int, int], dict[str, Any]] = {}
    bad: list[str] = []
    d = store / PROGRESS
    if not d.is_dir():
        return out, bad
    for p in sorted(d.iterdir()):
        m = _MARKER.match(p.name)
        if m is None:
            continue
        try:
            out[(int(m.group(1)), int(m.group(2)))] = json.loads(p.read_text())
        except (OSError, ValueError):
            bad.append(p.name)  # unreadable marker: the shard counts as unfinished, redone
    return out, bad


# --------------------------------------------------------------------------------------------
# creating / opening
def read_attrs(store: Path) -> dict[str, Any]:
    """Root attributes of a store (raises ``OutputError`` when it is not a Zarr v3 group)."""
    meta = store / "zarr.json"
    try:
        doc = json.loads(meta.read_text())
    except (OSError, ValueError):
        raise OutputError(f"{store}: not a Zarr v3 store (no readable zarr.json)") from None
    return dict(doc.get("attributes") or {})


def store_config(store: Path) -> GenerateConfig:
    """The resolved config a store was generated with."""
    if not store.exists():
        raise OutputError(f"{store}: no such store")
    attrs = read_attrs(store)
    if "config" not in attrs or "config_hash" not in attrs:
        raise OutputError(f"{store}: not a scoreda trajectory store (no config in its attrs)")
    cfg = validate(yaml.safe_load(attrs["config"]), GenerateConfig, f"{store} attrs")
    assert isinstance(cfg, GenerateConfig)
    return cfg


def check_store_path(path: str | Path) -> Path:
    """Validate a store path before any work: ends in .zarr, parent is a writable directory."""
    path = Path(path)
    if path.suffix != ".zarr":
        raise OutputError(f"{path}: a trajectory store must end in .zarr")
    parent = path.parent if str(path.parent) else Path(".")
    probe = parent
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        raise OutputError(f"{path}: cannot create it, {probe} is not a directory")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise OutputError(f"{path}: cannot create it, {probe} is not writable")
    if path.exists() and not path.is_dir():
        raise OutputError(f"{path}: exists and is not a directory")
    return path


@contextlib.contextmanager
def writer_lock(path: Path) -> Iterator[Path]:
    """Hold an exclusive lock for the one process that may create, resume or overwrite a store.

    Two `scoreda generate` runs on one store would write the same shards at once (lost data) or
    one would replace the store under the other. The lock is ``flock`` on ``.NAME.lock`` next to
    the store, released when the process ends however it ends (the file itself stays; it holds
    nothing). Dask workers write shards under the lock of their coordinating process.
    """
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    lock = path.parent / f".{path.name}.lock"
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise OutputError(f"{path}: another `scoreda generate` is writing this store "
                              f"(lock {lock} is held)") from None
        yield lock
    finally:
        os.close(fd)  # closing the descriptor releases the lock


def prepare(cfg: GenerateConfig, path: Path, overwrite: bool, theta: np.ndarray,
            split: np.ndarray, model: Any) -> tuple[bool, Replacing | None]:
    """Create the store, or check that an existing one belongs to ``cfg`` (resume).

    Args:
        theta: ``(N, T, P)`` natural-space θ of every trajectory and saved time.
        split: ``(N,)`` int8 split index per trajectory.

    Returns:
        ``(resumed, replacing)``: whether an existing store is resumed, and for a (re)created
        one what it replaces: kept aside until the first shard is written, put back if the
        generation fails before (``Replacing``; a new store that replaced nothing stays).
    """
    if path.exists() and not overwrite:
        attrs = read_attrs(path) if (path / "zarr.json").exists() else {}
        if "config_hash" not in attrs:
            raise OutputError(f"{path}: exists and is not a scoreda trajectory store; "
                              "pass --overwrite to replace it")
        if attrs["config_hash"] != config_hash(cfg):
            old = _identity(yaml.safe_load(attrs.get("config", "{}")) or {})
            raise OutputError(f"{path}: was generated with a different config "
                              f"({first_difference(old, hashed_config(cfg))}); "
                              "pass --overwrite to replace it")
        return True, None
    rep = Replacing(path, overwrite, keep_fresh=True)
    try:
        atomic_write(path, lambda tmp: _create(cfg, tmp, theta, split, model))
    except BaseException as exc:
        rep.failed()
        if isinstance(exc, OSError):
            raise OutputError(f"{path}: cannot create the store ({exc.strerror or exc})") from None
        raise
    return False, rep


def _compressor(cfg: GenerateConfig) -> Any:
    from zarr.codecs import BloscCodec, ZstdCodec

    if cfg.store.codec == "zstd":
        return ZstdCodec(level=cfg.store.level)
    # byte shuffle groups the exponent bytes of neighbouring floats: smooth fields compress more
    return BloscCodec(cname="zstd", clevel=min(cfg.store.level, 9), shuffle="shuffle")


def _create(cfg: GenerateConfig, tmp: Path, theta: np.ndarray, split: np.ndarray, model: Any) -> None:
    """Write all metadata, coords and θ of a fresh store into ``tmp`` (no state data yet)."""
    import dask.array as da
    import xarray as xr
    import zarr

    from pipeline.datasets import software_version

    lay = layout(cfg, model)
    np_dtype = np.dtype(cfg.dtype)
    dt = float(cfg.model.dt)
    time = (cfg.spinup + cfg.save_every * np.arange(cfg.frames)) * dt
    coords: dict[str, Any] = {
        "trajectory": ("trajectory", np.arange(cfg.trajectories, dtype=np.int64),
                       {"long_name": "trajectory index (seed stream key)"}),
        "time": ("time", time, {"long_name": "model time", "units": "1", "axis": "T"}),
        "param": ("param", np.array(model.param_names, dtype=object),
                  {"long_name": "model parameter name"}),
        "param_transform": ("param", np.array([p.transform for p in model.params], dtype=object),
                            {"long_name": "transform to the unconstrained space"}),
        "param_truth": ("param", np.array([p.truth for p in model.params], dtype=np.float64),
                        {"long_name": "default (truth) value"}),
        "split": ("trajectory", split.astype(np.int8),
                  {"long_name": "data split", "flag_values": [0, 1, 2],
                   "flag_meanings": " ".join(SPLIT_NAMES)}),
    }
    axis = {"x": "X", "y": "Y"}
    for gi, g in enumerate(lay.grids):
        suffix = "" if gi == 0 else f"_{g}"
        for d, c in pooled_coords(model, lay.space_dims, int(cfg.model.size) // g).items():
            coords[d + suffix] = (d + suffix, c, {"long_name": f"{d} position on the {g} grid",
                                                  "units": "1", "axis": axis.get(d, "")}
                                  if d in axis else {"long_name": f"{d} on the {g} grid"})
    variables: dict[str, Any] = {}
    encoding: dict[str, Any] = {}
    comp = _compressor(cfg)
    for a in lay.arrays:
        # a lazy placeholder: xarray writes the metadata only, tasks write the shards
        data = da.zeros(a.shape, chunks=a.shards, dtype=np_dtype)
        variables[a.name] = (a.dims, data, {
            "long_name": a.variable + ("" if a.grid == int(cfg.model.size)
                                       else f" averaged onto the {a.grid} grid"),
            "units": model.state_units, "grid": a.grid})
        encoding[a.name] = {"chunks": a.chunks, "shards": a.shards, "compressors": (comp,),
                            "_FillValue": np.nan}
    variables["theta"] = (("trajectory", "time", "param"), theta.astype(np.float64), {
        "long_name": "model parameters in the natural space",
        "comment": "theta[j, k] is in effect from time k to k+1"})
    attrs = {
        "Conventions": "CF-1.8",
        "title": f"{model.name} trajectories",
        "model": model.name,
        "simulated_size": int(cfg.model.size),
        "grids": list(lay.grids),
        "state_shape": list(model.state_shape),
        "dt": dt,
        "save_every": cfg.save_every,
        "spinup_steps": cfg.spinup,
        "seed": cfg.seed,
        "theta_mode": cfg.theta.mode,
        "trajectories_per_shard": lay.per_shard,
        "shard_frames": lay.shard_frames,
        "chunk_frames": lay.chunk_frames,
        "software": f"scoreda {software_version()}",
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "config": dump(cfg),
        "config_hash": config_hash(cfg),
    }
    ds = xr.Dataset(variables, coords=coords, attrs=attrs)
    ds.to_zarr(tmp, mode="w", zarr_format=3, consolidated=False, compute=False, encoding=encoding)
    zarr.open_group(tmp, mode="a").create_group(
        PROGRESS, attributes={"description": "one marker file per finished shard"})


def open_store(path: str | Path):  # -> xr.Dataset
    """Open a store lazily as a labelled Dataset."""
    import xarray as xr

    path = Path(path)
    store_config(path)  # clear error when it is not a store
    return xr.open_zarr(path, consolidated=False)


# --------------------------------------------------------------------------------------------
# status and export
@dataclass
class Status:
    """How far a store is: finished shards and the trajectory blocks that are complete."""

    shards_done: int
    shards_total: int
    complete_blocks: list[int]

    @property
    def complete(self) -> bool:
        return self.shards_done == self.shards_total


def status(path: Path, cfg: GenerateConfig | None = None) -> Status:
    cfg = cfg or store_config(path)
    lay = layout(cfg)
    done = finished_shards(path)
    valid = {k for k in done if k[0] < lay.blocks and k[1] < lay.time_blocks}
    blocks = [b for b in range(lay.blocks) if all((b, c) in valid for c in range(lay.time_blocks))]
    return Status(len(valid), lay.shards, blocks)


def finished_store_config(path: Path) -> GenerateConfig:
    """The config of a store every shard of which is written (for readers that need all of it)."""
    cfg = store_config(path)
    st = status(path, cfg)
    if not st.complete:
        raise OutputError(f"{path}: incomplete store ({st.shards_done}/{st.shards_total} "
                          "shards); finish it with `scoreda generate` first")
    return cfg


def parse_select(items: Iterable[str]) -> dict[str, Any]:
    """``dim=START:STOP[:STEP]`` / ``dim=I`` (positional) or ``split=train|valid|test``."""
    out: dict[str, Any] = {}
    for item in items:
        dim, sep, spec = item.partition("=")
        if not sep or not dim or not spec:
            raise ConfigError(f"--select: expected DIM=START:STOP or split=NAME, got {item!r}")
        if dim == "split":
            if spec not in SPLIT_NAMES:
                raise ConfigError(f"--select: split must be one of {', '.join(SPLIT_NAMES)}, "
                                  f"got {spec!r}")
            out[dim] = spec
            continue
        try:
            parts = [int(p) if p else None for p in spec.split(":")]
        except ValueError:
            raise ConfigError(f"--select: {item!r}: expected integers START:STOP[:STEP]") from None
        if len(parts) == 1:
            i = parts[0]
            out[dim] = slice(i, None if i == -1 else i + 1)  # keep the dim
        elif len(parts) <= 3:
            if len(parts) == 3 and parts[2] is not None and parts[2] < 1:
                raise ConfigError(f"--select: {item!r}: STEP must be positive")
            out[dim] = slice(*parts)
        else:
            raise ConfigError(f"--select: {item!r}: expected START:STOP[:STEP]")
    return out


def export_netcdf(path: str | Path, out: str | Path, select: Iterable[str] = (),
                  overwrite: bool = False):  # -> xr.Dataset
    """Write (a selection of) a store to one netCDF4 file with CF attributes."""
    path, out = Path(path), Path(out)
    if out.suffix != ".nc":
        raise OutputError(f"{out}: the export must end in .nc")
    check_output(out, overwrite)  # the file and the config written beside it
    cfg = store_config(path)
    sel = parse_select(select)
    st = status(path, cfg)
    ds = open_store(path)
    split = sel.pop("split", None)
    unknown = [d for d in sel if d not in ds.dims]
    if unknown:
        raise ConfigError(f"--select: unknown dim {unknown[0]!r} (dims: {', '.join(map(str, ds.dims))})")
    full = dict(ds.sizes)
    if split is not None:
        ds = ds.isel(trajectory=np.flatnonzero(ds["split"].values == SPLIT_NAMES.index(split)))
    ds = ds.isel(sel)
    for d in (*sel, *(("trajectory",) if split is not None else ())):
        if ds.sizes[d] == 0:
            raise ConfigError(f"--select: selects no {d} of the store's {full[d]}"
                              + (f" ({split} split)" if d == "trajectory" and split else ""))
    lay = layout(cfg)
    absent = [a.name for a in lay.arrays if a.name not in ds.data_vars]
    if absent:
        raise OutputError(f"{path}: variable {absent[0]!r} is missing from the store")
    done = {j for b in st.complete_blocks for j in lay.block_trajectories(b)}
    missing = [int(j) for j in ds["trajectory"].values if int(j) not in done]
    if missing:
        raise OutputError(f"{path}: trajectory {missing[0]} (and {len(missing) - 1} more of the "
                          "selection) is not finished; run scoreda generate again to finish it")
    try:
        ds = ds.load()
    except (OSError, ValueError, KeyError) as exc:  # a damaged chunk: checksum, truncation
        raise OutputError(f"{path}: cannot read the selection ({exc}); `scoreda verify` "
                          "checks the shards") from None
    for v in ds.variables.values():
        v.encoding = {}  # drop the Zarr codecs; write_dataset sets netCDF4 compression
    ds.attrs["source"] = f"exported from {path.resolve()}"
    try:
        write_dataset(ds, out, ds.attrs.get("config"))
    except OSError as exc:
        raise OutputError(f"{out}: cannot write ({exc.strerror or exc})") from None
    return ds

