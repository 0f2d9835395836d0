"""Model registry: build any encoder by name (timm's ``register_model`` / ``create_model``).

A variant is a function ``name(**kwargs) -> nn.Module`` that passes sizes to one class taking every
size as an argument; ``create_model`` records ``model.model_name`` and ``model.model_args`` (the
keyword overrides it was called with) so a checkpoint can rebuild the model with
``create_model(ckpt["model_name"], **ckpt["model_args"])``.
"""

from __future__ import annotations

import difflib
import fnmatch
from collections.abc import Callable
from typing import Any, TypeVar

from torch import nn

__all__ = ["create_model", "is_model", "list_models", "register_model"]

_MODEL_ENTRYPOINTS: dict[str, Callable[..., nn.Module]] = {}

F = TypeVar("F", bound=Callable[..., nn.Module])


def register_model(fn: F) -> F:
    """Decorator registering ``fn`` under its ``__name__``.

    Raises:
        ValueError: when the name is already registered by another function.
    """
    name = fn.__name__
    existing = _MODEL_ENTRYPOINTS.get(name)
    # the same function registering again (a module reload) is fine; another one is a clash
    if existing is not None and (existing.__module__, existing.__qualname__) != (
        fn.__module__,
        fn.__qualname__,
    ):
        raise ValueError(f"model name {name!r} is already registered by {existing.__module__}")
    _MODEL_ENTRYPOINTS[name] = fn
    return fn


def unregister_model(name: str) -> None:
    """Remove ``name`` (for stand-in models that tests or plugins register temporarily)."""
    if name not in _MODEL_ENTRYPOINTS:
        raise ValueError(f"unknown model {name!r}")
    del _MODEL_ENTRYPOINTS[name]


def list_models(pattern: str = "*") -> list[str]:
    """Sorted names of registered models matching a shell-style ``pattern`` (e.g. ``"vit3d_*"``)."""
    return sorted(n for n in _MODEL_ENTRYPOINTS if fnmatch.fnmatchcase(n, pattern))


def is_model(name: str) -> bool:
    """Whether ``name`` is registered."""
    return name in _MODEL_ENTRYPOINTS


def create_model(name: str, **kwargs: Any) -> nn.Module:
    """Builds a registered model; keyword arguments override the variant's defaults.

    Args:
        name: registered name, e.g. ``"vit3d_base_p16"``.
        **kwargs: constructor arguments (``img_size``, ``in_chans``, ``num_classes``, ...). Keep
            them plain data (numbers, strings, tuples) so checkpoints stay ``weights_only``-loadable.

    Raises:
        ValueError: for an unknown name, listing close matches.
    """
    fn = _MODEL_ENTRYPOINTS.get(name)
    if fn is None:
        close = difflib.get_close_matches(name, list(_MODEL_ENTRYPOINTS), n=5, cutoff=0.5)
        hint = f"; did you mean {', '.join(map(repr, close))}?" if close else ""
        raise ValueError(
            f"unknown model {name!r}{hint} (list_models() shows all {len(_MODEL_ENTRYPOINTS)})"
        )
    model = fn(**kwargs)
    model.model_name = name
    model.model_args = dict(kwargs)
    return model
