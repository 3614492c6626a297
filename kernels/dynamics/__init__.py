"""Dynamical models. ``get_model(name, size, **options)`` builds one by its registry name."""

from __future__ import annotations

from importlib import import_module

from kernels.dynamics.base import Dynamics, Param

# name -> (module, class, default size); imported lazily so that a model's import cost is paid
# only by the runs that use it.
_REGISTRY: dict[str, tuple[str, str, int]] = {
    "lorenz96": ("kernels.dynamics.lorenz96", "Lorenz96", 40),
    "fhn": ("kernels.dynamics.fhn", "FitzHughNagumo", 64),
    "kolmogorov": ("kernels.dynamics.kolmogorov", "Kolmogorov", 64),
    "kdv": ("kernels.dynamics.kdv", "KdV", 128),
}

MODEL_NAMES: tuple[str, ...] = tuple(_REGISTRY)


def model_class(name: str) -> type[Dynamics]:
    """The model class registered under ``name``."""
    try:
        module, cls, _ = _REGISTRY[name]
    except KeyError:
        raise KeyError(f"unknown model {name!r}; known: {', '.join(MODEL_NAMES)}") from None
    return getattr(import_module(module), cls)


def default_size(name: str) -> int:
    """The default state size of model ``name``."""
    model_class(name)
    return _REGISTRY[name][2]


def get_model(name: str, size: int | None = None, **options: object) -> Dynamics:
    """Build model ``name`` with ``size`` (its default when None) and model-specific options."""
    cls = model_class(name)
    return cls(default_size(name) if size is None else size, **options)


__all__ = ["Dynamics", "Param", "MODEL_NAMES", "get_model", "model_class", "default_size"]
