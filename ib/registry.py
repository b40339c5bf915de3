"""Name -> entry registries for encoders, bottlenecks, critics, estimators, schedules and data sets.

An entry is a function or a class (estimators and schedules are classes). Its positional-only parameters are
supplied by the library (shapes, sub-modules); its keyword-only parameters are what a recipe may set, and their
annotations and defaults are the recipe's schema for that entry (`options`, `option_hints`).
"""
from __future__ import annotations

import inspect
import typing
from typing import Any, Callable, Dict, List, TypeVar

from ib.errors import ConfigError

F = TypeVar("F", bound=Callable[..., Any])


class Registry:
    """A dict of named functions or classes whose lookup error lists the valid names.

    Args:
        kind: What the entries are, for messages ("encoder", "critic", ...).
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: Dict[str, Callable[..., Any]] = {}

    def register(self, name: str | None = None) -> Callable[[F], F]:
        """Decorator adding a function or class under `name` (default: its `__name__`)."""

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
        """Call `name`'s entry with `args` (the library's) and `kwargs` (the recipe's options).

        Raises:
            ConfigError: `name` is unknown, or a keyword is not one of the entry's parameters (the message names it
                and lists the valid ones sorted).
        """
        entry = self.get(name)
        params = inspect.signature(entry).parameters.values()
        if not any(p.kind is p.VAR_KEYWORD for p in params):
            valid = sorted(p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY))
            unknown = sorted(set(kwargs) - set(valid))
            if unknown:
                what = "option" if len(unknown) == 1 else "options"
                raise ConfigError(f"unknown {what} {', '.join(map(repr, unknown))} for {self.kind} '{name}'; "
                                  f"valid: {', '.join(valid) or '(none)'}")
        return entry(*args, **kwargs)

    def options(self, name: str) -> Dict[str, inspect.Parameter]:
        """The keyword-only parameters of `name`'s entry: the settings a recipe may give it."""
        sig = inspect.signature(self.get(name))
        return {p.name: p for p in sig.parameters.values() if p.kind is inspect.Parameter.KEYWORD_ONLY}

    def option_hints(self, name: str) -> Dict[str, Any]:
        """The resolved annotations of `name`'s parameters: those of the function, or of the class's `__init__`
        (`typing.get_type_hints` of a class itself gives its class attributes' annotations instead)."""
        entry = self.get(name)
        return typing.get_type_hints(entry.__init__ if inspect.isclass(entry) else entry)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, {self.names()})"
