"""Typed configuration from YAML: safe parsing, dataclass sections whose fields carry a reason and bounds,
registry components `{name: ..., <option>: ...}`, `key.sub=value` overrides, and the checks that reject a bad value
with one line naming its key.

`ib.recipe` declares the recipe's sections with these; this module knows nothing of what they hold.
"""
from __future__ import annotations

import copy
import dataclasses
import math
import re
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Literal, Mapping, Optional, Sequence, Tuple, Union

import yaml

from ib.errors import ConfigError
from ib.registry import Registry

Registries = Callable[[], Mapping[str, Registry]]  # {kind: registry}, called once a component is met

# ---------------------------------------------------------------------------------------------------------------------
# YAML: safe loading (no object construction) that also reads `1e-3` as a float (YAML 1.1 wants `1.0e-3`).


class _Loader(yaml.SafeLoader):
    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> Dict[Any, Any]:
        """A mapping, refusing a key given twice (plain YAML keeps the last one silently)."""
        first: Dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            if not isinstance(key, typing.Hashable):
                continue  # the base class reports unhashable keys
            if key in first:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {show(key)} (first given at line {first[key] + 1})",
                    key_node.start_mark)
            first[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep=deep)


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
        |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
        |\.[0-9_]+(?:[eE][-+][0-9]+)?
        |[-+]?\.(?:inf|Inf|INF)
        |\.(?:nan|NaN|NAN))$""",
        re.X,
    ),
    list("-+0123456789."),
)


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


_MAX_DEPTH = 32


def _nested_deeper_than(value: Any, limit: int) -> bool:
    """Whether lists/mappings nest deeper than `limit`; iterative, visiting an aliased node once per depth."""
    stack, seen = [(value, 1)], {}
    while stack:
        v, depth = stack.pop()
        if not isinstance(v, (dict, list)):
            continue
        if depth > limit:
            return True
        if seen.get(id(v), 0) >= depth:
            continue
        seen[id(v)] = depth
        stack.extend((child, depth + 1) for child in (v.values() if isinstance(v, dict) else v))
    return False


def parse_yaml(text: str, source: str) -> Any:
    """Parse YAML safely; a syntax error or a Python tag becomes a one-line ConfigError naming the line."""
    try:
        value = yaml.load(text, Loader=_Loader)  # noqa: S506 - _Loader is a SafeLoader
        if _nested_deeper_than(value, _MAX_DEPTH):  # checking and copying recurse; a recipe needs ~4 levels
            raise ConfigError(f"{source}: invalid YAML: nested deeper than {_MAX_DEPTH} levels")
        return value
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = e.problem or e.context or "invalid YAML"
        raise ConfigError(f"{source}: invalid YAML{where}: {_one_line(problem)}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{source}: invalid YAML: {_one_line(e)}") from None
    except RecursionError:
        raise ConfigError(f"{source}: invalid YAML: nested deeper than {_MAX_DEPTH} levels") from None


# ---------------------------------------------------------------------------------------------------------------------
# Schema


@dataclass
class Component:
    """A registry entry and its options, e.g. `{name: mlp, hidden: [1024, 1024]}`."""

    name: str
    options: Dict[str, Any] = field(default_factory=dict)


class FieldError(ConfigError):
    """A section's `__post_init__` rejects one of its fields; `build_dataclass` names the field by its whole path
    (`mi.optimizer.betas`), which the section itself does not know."""

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field} {problem}")
        self.field, self.problem = field, problem


def setting(default: Any, help: str, registry: Optional[str] = None, **bounds: float) -> Any:
    """A dataclass field with its reason, numeric bounds (ge, gt, le, lt) and, for a name that a registry holds
    (e.g. a data set), that registry's kind, kept as metadata."""
    kw = {"default_factory": lambda: default} if isinstance(default, (Component, list, dict)) else {"default": default}
    meta = {"help": help, **bounds, **({"registry": registry} if registry else {})}
    return field(metadata=meta, **kw)


def component(default: str | Dict[str, Any], registry: str, help: str) -> Any:
    if isinstance(default, str):
        comp = Component(default)
    else:
        comp = Component(default["name"], {k: v for k, v in default.items() if k != "name"})
    return field(
        default_factory=lambda: Component(comp.name, dict(comp.options)), metadata={"help": help, "registry": registry}
    )


# ---------------------------------------------------------------------------------------------------------------------
# Checking values against annotations


def show(value: Any) -> str:
    text = repr(value) if isinstance(value, str) else _one_line(yaml.safe_dump(value, default_flow_style=True))
    text = text.removesuffix("...").strip()
    return text if len(text) <= 60 else text[:57] + "..."


def _type_name(tp: Any) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Literal:
        return "one of " + ", ".join(str(a) for a in args)
    if origin in (Union, types.UnionType):
        inner = [a for a in args if a is not type(None)]
        return " or ".join(_type_name(a) for a in inner) + (" or null" if type(None) in args else "")
    if origin in (tuple, list, Sequence, typing.Sequence) or tp in (tuple, list):
        plural = {int: "integers", float: "numbers", bool: "booleans", str: "strings"}
        return "a list of " + (plural.get(args[0], f"values ({_type_name(args[0])})") if args else "values")
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(tp, str(tp))


def check_value(value: Any, tp: Any, key: str) -> Any:
    """Return `value` converted to annotation `tp`, or raise ConfigError naming `key`."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    bad = ConfigError(f"{key}: expected {_type_name(tp)}, got {show(value)}")
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        for a in inner:
            try:
                return check_value(value, a, key)
            except ConfigError:
                if len(inner) == 1:
                    raise
        raise bad
    if origin is Literal:
        if value not in args or isinstance(value, bool) != any(isinstance(a, bool) for a in args):
            raise ConfigError(f"{key}: {show(value)} is not allowed; valid: {', '.join(str(a) for a in args)}")
        return value
    if origin in (tuple, list, Sequence, typing.Sequence) or tp in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise bad
        item = args[0] if args else Any
        items = [check_value(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
        return list(items) if origin is list else tuple(items)
    if tp is bool:
        if not isinstance(value, bool):
            raise bad
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad
        if not math.isfinite(value):
            raise ConfigError(f"{key}: must be a finite number, got {value}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise bad
        return value
    raise ConfigError(f"{key}: unsupported annotation {tp!r} (a bug in the schema)")


def _check_bounds(value: Any, meta: typing.Mapping[str, Any], key: str) -> None:
    if value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
        return
    tests = {
        "ge": (lambda v, b: v >= b, ">="),
        "gt": (lambda v, b: v > b, ">"),
        "le": (lambda v, b: v <= b, "<="),
        "lt": (lambda v, b: v < b, "<"),
    }
    for name, (ok, sign) in tests.items():
        if name in meta and not ok(value, meta[name]):
            allowed = " and ".join(f"{s} {meta[n]}" for n, (_, s) in tests.items() if n in meta)
            raise ConfigError(f"{key}: {show(value)} is out of range; allowed: {allowed}")


def _build_component(raw: Any, registry: Registry, key: str, default: Component) -> Component:
    if isinstance(raw, str):
        raw = {"name": raw}
    if not isinstance(raw, dict):
        raise ConfigError(f"{key}: expected the {registry.kind}'s name or a mapping with 'name', got {show(raw)}")
    name = raw.get("name", default.name)  # `encoder: {hidden: [64]}` keeps the default entry
    if not isinstance(name, str) or name not in registry:
        raise ConfigError(f"{key}.name: unknown {registry.kind} {show(name)}; valid: {', '.join(registry.names())}")
    params = registry.options(name)
    hints = registry.option_hints(name)  # of the function, or of the class's __init__
    options: Dict[str, Any] = {}
    for opt, value in raw.items():
        if opt == "name":
            continue
        if opt not in params:
            valid = ", ".join(["name", *sorted(params)])
            raise ConfigError(f"{key}: unknown key '{opt}' for {registry.kind} '{name}'; valid: {valid}")
        options[opt] = _as_yaml(check_value(value, hints.get(opt, Any), f"{key}.{opt}"))
    for opt, p in params.items():  # the resolved recipe shows every setting
        if opt not in options and p.default is not p.empty:
            options[opt] = _as_yaml(p.default)
    missing = [opt for opt, p in params.items() if opt not in options]
    if missing:
        raise ConfigError(f"{key}: {registry.kind} '{name}' needs {', '.join(missing)}")
    return Component(name, options)


def _as_yaml(value: Any) -> Any:
    """Tuples as lists, so that options read the same in memory as in the saved recipe."""
    return [_as_yaml(v) for v in value] if isinstance(value, (list, tuple)) else value


def _section(cls: type, raw: Any, key: str) -> Tuple[Dict[str, Any], Dict[str, dataclasses.Field], Dict[str, Any]]:
    """(the section's settings, its fields, their annotations), once its keys are checked against its fields."""
    where = key or "recipe"
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a mapping of settings, got {show(raw)}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for k in raw:
        if k not in fields:
            raise ConfigError(f"{where}: unknown key '{k}'; valid: {', '.join(sorted(fields))}")
    return raw, fields, typing.get_type_hints(cls)


def check_settings(cls: type, raw: Any, key: str = "") -> None:
    """The checks of `build_dataclass` that need no registry: the keys of every section, and the type and bounds of
    every setting that is not a registry entry or name. Run first, they report such a mistake before a registry
    (and the library behind it, torch) is loaded."""
    raw, fields, hints = _section(cls, raw, key)
    for name, value in raw.items():
        sub, tp = f"{key}.{name}" if key else name, hints[name]
        if tp is Component:
            continue
        if dataclasses.is_dataclass(tp):
            check_settings(tp, value, sub)
        else:
            _check_bounds(check_value(value, tp, sub), fields[name].metadata, sub)


def build_dataclass(cls: type, raw: Any, registries: Registries, key: str = "") -> Any:
    """Build dataclass `cls` from a nested mapping, checking every key, type and bound; `registries` gives the
    registries that components and registry names are checked against."""
    raw, fields, hints = _section(cls, raw, key)
    kwargs: Dict[str, Any] = {}
    regs: Dict[str, Registry] | None = None
    for name, f in fields.items():
        sub = f"{key}.{name}" if key else name
        tp = hints[name]
        if tp is Component:  # given or not, a component's options are filled in from its registry entry and checked
            regs = regs or dict(registries())
            default = f.default_factory()
            value = raw.get(name, {"name": default.name, **default.options})
            kwargs[name] = _build_component(value, regs[f.metadata["registry"]], sub, default)
        elif dataclasses.is_dataclass(tp):
            kwargs[name] = (build_dataclass(tp, raw[name], registries, sub) if name in raw
                            else _defaults(tp, f, registries, sub))
        elif name in raw:
            kwargs[name] = check_value(raw[name], tp, sub)
            _check_bounds(kwargs[name], f.metadata, sub)
            if "registry" in f.metadata:  # a registry's name, e.g. data.name
                regs = regs or dict(registries())
                found = regs[f.metadata["registry"]]
                if kwargs[name] not in found:
                    raise ConfigError(f"{sub}: unknown {found.kind} {show(kwargs[name])}; valid: "
                                      f"{', '.join(found.names())}")
    try:
        return cls(**kwargs)
    except FieldError as e:
        if not key:
            raise
        raise ConfigError(f"{key}.{e.field} {e.problem}") from None


def _defaults(tp: type, f: dataclasses.Field, registries: Registries, key: str) -> Any:
    """A nested section left out of the recipe: its defaults, components resolved like given ones."""
    default = f.default_factory()
    return build_dataclass(tp, {k: v for k, v in to_plain(default).items()}, registries, key)


# ---------------------------------------------------------------------------------------------------------------------
# Overrides and plain data


def parse_override(text: str) -> Tuple[List[str], Any]:
    """`model.encoder.hidden=[512, 512]` -> (["model", "encoder", "hidden"], [512, 512])."""
    key, sep, value = text.partition("=")
    if not sep or not key or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*", key):
        raise ConfigError(f"override '{text}': expected key=value or key.sub=value, e.g. beta=1e-3 or data.batch_size=64")
    return key.split("."), parse_yaml(value, f"override '{text}'") if value.strip() else ""


def apply_overrides(raw: Dict[str, Any], overrides: Sequence[str]) -> Dict[str, Any]:
    """Return a copy of `raw` with each `key.sub=value` set (components given as a bare name become mappings)."""
    out = copy.deepcopy(raw)
    for text in overrides:
        path, value = parse_override(text)
        node = out
        for i, part in enumerate(path[:-1]):
            child = node.get(part)
            if isinstance(child, str):  # a component given by name only: open it up for its options
                child = node[part] = {"name": child}
            elif child is None:
                child = node[part] = {}
            elif not isinstance(child, dict):
                raise ConfigError(f"override '{text}': '{'.'.join(path[: i + 1])}' is a value, not a section")
            node = child
        node[path[-1]] = value
    return out


def to_plain(value: Any) -> Any:
    """Sections and components as plain YAML-able data (mappings, lists, scalars)."""
    if isinstance(value, Component):
        return {"name": value.name, **{k: to_plain(v) for k, v in value.options.items()}}
    if dataclasses.is_dataclass(value):
        return {f.name: to_plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, (list, tuple)):
        return [to_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: to_plain(v) for k, v in value.items()}
    return value

