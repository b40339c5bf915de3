"""Name -> factory registries for encoders, bottlenecks, critics, estimators and data sets.

A factory's positional-only parameters are supplied by the library (shapes, sub-modules); its keyword-only
parameters are what a recipe may set, and their annotations and defaults are the recipe's schema for that entry.
"""
from __future__ import annotations

import inspect
from typing import Any, Callable, Dict, List, TypeVar

from ib.errors import ConfigError

F = TypeVar("F", bound=Callable[..., Any])


class Registry:
    """A dict of named factories whose lookup error lists the valid names.

    Args:
        kind: What the entries are, for messages ("encoder", "critic", ...).
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: Dict[str, Callable[..., Any]] = {}

    def register(self, name: str | None = None) -> Callable[[F], F]:
        """Decorator adding a factory under `name` (default: the function's name)."""

        def add(fn: F) -> F:
            key = name or fn.__name__
            if key in self._entries:
                raise ValueError(f"{self.kind} '{key}' is registered twice")
            self._entries[key] = fn
            return fn

        return add

    def names(self) -> List[str]:
        return sorted(self._entries)

    def get(self, name: str) -> Callable[..., Any]:
        if name not in self._entries:
            raise ConfigError(f"unknown {self.kind} '{name}'; valid: {', '.join(self.names())}")
        return self._entries[name]

    def create(self, name: str, *args: Any, **kwargs: Any) -> Any:
        return self.get(name)(*args, **kwargs)

    def options(self, name: str) -> Dict[str, inspect.Parameter]:
        """The keyword-only parameters of `name`'s factory: the settings a recipe may give it."""
        sig = inspect.signature(self.get(name))
        return {p.name: p for p in sig.parameters.values() if p.kind is inspect.Parameter.KEYWORD_ONLY}

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, {self.names()})"
