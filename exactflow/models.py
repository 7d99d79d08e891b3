"""Model builders: each returns an :class:`exactflow.Flow` over a standard normal.

Every builder takes ``(features, *, layers=..., hidden=..., context=0, ...)`` with the same
keyword names, and records its own name and arguments in ``flow.config`` so that
:func:`exactflow.save` can store a model as JSON plus weights and :func:`exactflow.load`
can rebuild it without running code from the file.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any

from .distributions import Flow

__all__ = ["build", "available"]

_BUILDERS: dict[str, Callable[..., Flow]] = {}


def _register(fn: Callable[..., Flow]) -> Callable[..., Flow]:
    """Register a builder and make it record its configuration in ``flow.config``."""
    signature = inspect.signature(fn)

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Flow:
        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()
        flow = fn(*bound.args, **bound.kwargs)
        config = {"model": fn.__name__}
        for key, value in bound.arguments.items():
            config[key] = list(value) if isinstance(value, tuple) else value
        flow.config = config
        return flow

    _BUILDERS[fn.__name__] = wrapper
    return wrapper


def available() -> list[str]:
    """Names of the registered builders."""
    return sorted(_BUILDERS)


def build(config: dict[str, Any]) -> Flow:
    """Rebuild a flow from its ``config`` (``{"model": name, **arguments}``).

    Raises:
        ValueError: the model name is unknown or an argument does not fit the builder.
    """
    if not isinstance(config, dict) or "model" not in config:
        raise ValueError("a model config is a dict with a 'model' key naming the builder")
    name = config["model"]
    if name not in _BUILDERS:
        raise ValueError(f"unknown model {name!r}; available: {', '.join(available())}")
    kwargs = {k: v for k, v in config.items() if k != "model"}
    try:
        inspect.signature(_BUILDERS[name]).bind(**kwargs)
    except TypeError as err:
        raise ValueError(f"config does not fit the {name!r} builder: {err}") from None
    return _BUILDERS[name](**kwargs)
