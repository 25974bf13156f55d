"""Turn plain TOML data into attrs objects, with errors that name the key path.

Used for the recipe skeleton and for every component's ``Params`` class, so a
plugin's parameters are checked exactly like the host's own keys. (cattrs could
structure these too, but its error groups name neither the recipe file nor a
fix; this module is small and tailored to that.)
"""

from __future__ import annotations

import difflib
import types
import typing
from typing import Any, Literal, Union, get_args, get_origin

import attrs

from .errors import RecipeError


class FieldValueError(ValueError):
    """Raised by validators below; the structurer adds file and key path."""

    def __init__(self, message: str, fix: str | None = None):
        super().__init__(message)
        self.message = message
        self.fix = fix


def _describe(value: Any) -> str:
    return f"{value!r} ({type(value).__name__})" if not isinstance(value, bool) else repr(value).lower()


def positive(instance, attribute, value):
    if value is not None and not value > 0:
        raise FieldValueError(f"must be > 0, got {value!r}", f"set {attribute.name} to a positive value")


def non_negative(instance, attribute, value):
    if value is not None and value < 0:
        raise FieldValueError(f"must be >= 0, got {value!r}", f"set {attribute.name} to 0 or more")


def between(low: float, high: float):
    def check(instance, attribute, value):
        if value is not None and not low <= value <= high:
            raise FieldValueError(f"must be in [{low}, {high}], got {value!r}", f"set {attribute.name} between {low} and {high}")

    return check


def increasing_epochs(instance, attribute, value):
    if value and (any(epoch < 1 for epoch in value) or any(a >= b for a, b in zip(value, value[1:]))):
        raise FieldValueError(f"must be epochs >= 1 in increasing order, got {value!r}",
                              f"set {attribute.name} to e.g. [150, 180, 210]")


def open_unit(instance, attribute, value):
    if value is not None and not 0 < value < 1:
        raise FieldValueError(f"must be strictly between 0 and 1, got {value!r}", f"set {attribute.name} to e.g. 0.1")


def _type_name(tp: Any) -> str:
    origin = get_origin(tp)
    if tp is type(None):
        return "nothing"
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in get_args(tp) if a is not type(None))
    if origin in (list, tuple):
        args = get_args(tp)
        return f"a list of {_type_name(args[0])}" if args else "a list"
    if origin is dict:
        return "a table"
    if attrs.has(tp):
        return "a table"
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false"}.get(tp, getattr(tp, "__name__", str(tp)))


class Structurer:
    """Structures data for one recipe file; errors carry ``file`` and, for keys
    that came from ``--set``, say so."""

    def __init__(self, file: str, overridden: set[str] | None = None):
        self.file = file
        self.overridden = overridden or set()

    def error(self, path: str, message: str, fix: str | None = None) -> RecipeError:
        source = self.file
        if path in self.overridden:
            source = f"{self.file} (value from --set {path})"
        return RecipeError(message, file=source, key=path or "(top level)", fix=fix)

    def structure(self, cls: type, data: Any, path: str) -> Any:
        fields = self._check_keys(cls, data, path)
        hints = typing.get_type_hints(cls)
        kwargs = {}
        for name, field in fields.items():
            key_path = _join(path, name)
            if name not in data:
                if field.default is attrs.NOTHING:
                    help_text = field.metadata.get("help", "")
                    raise self.error(key_path, f"required key is missing ({_type_name(hints[name])})", f"add {name} = ...{' (' + help_text + ')' if help_text else ''}")
                continue
            kwargs[name] = self.convert(data[name], hints[name], key_path)
        return self._build(cls, kwargs, path, lambda: cls(**kwargs))

    def evolve(self, instance: Any, data: Any, path: str) -> Any:
        """``instance`` (a structured attrs object) with the keys in ``data`` replaced,
        each checked as :meth:`structure` checks it; a nested table updates the
        nested section key by key (``optimizer = { lr = 0.01 }`` keeps the name)."""
        cls = type(instance)
        self._check_keys(cls, data, path)
        hints = typing.get_type_hints(cls)
        changes = {}
        for name, value in data.items():
            current = getattr(instance, name)
            if attrs.has(type(current)) and isinstance(value, dict):
                changes[name] = self.evolve(current, value, _join(path, name))
            else:
                changes[name] = self.convert(value, hints[name], _join(path, name))
        return self._build(cls, changes, path, lambda: attrs.evolve(instance, **changes))

    def _check_keys(self, cls: type, data: Any, path: str) -> dict:
        if not isinstance(data, dict):
            raise self.error(path, f"expected a table, got {_describe(data)}", f"write {path} as a [table] of keys")
        fields = {f.name: f for f in attrs.fields(cls) if f.init}
        unknown = [k for k in data if k not in fields]
        if unknown:
            key = unknown[0]
            close = difflib.get_close_matches(key, list(fields), n=1)
            known = ", ".join(fields) or "(none)"
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise self.error(_join(path, key), f"unknown key {key!r}; valid keys here: {known}", f"{hint}remove or rename it")
        return fields

    def _build(self, cls: type, kwargs: dict, path: str, build) -> Any:
        """Run the attrs validators (inside ``build``); name the key that fails."""
        try:
            return build()
        except FieldValueError as error:
            fields = {f.name: f for f in attrs.fields(cls)}
            field_name = _failing_field(cls, kwargs)
            key_path = _join(path, field_name) if field_name else path
            help_text = fields[field_name].metadata.get("help") if field_name in fields else None
            fix = error.fix or "change the value"
            if help_text:
                fix += f" ({help_text})"
            raise self.error(key_path, error.message, fix) from None
        except (ValueError, TypeError) as error:
            raise self.error(path, str(error), "check the values in this section") from None

    def convert(self, value: Any, tp: Any, path: str) -> Any:
        """``value`` checked against the annotation ``tp`` (an int where a float is
        wanted becomes a float); the check is chosen by the annotation's kind."""
        if tp is Any:
            return value
        if attrs.has(tp):
            return self.structure(tp, value, path)
        origin = get_origin(tp)
        if origin is None and tp in _PLAIN_TYPES:
            return self._plain(value, tp, path)
        convert = _BY_ORIGIN.get(origin)
        if convert is None:
            raise TypeError(f"unsupported type in a Params class: {tp!r} at {path}")
        return convert(self, value, tp, path)

    def _plain(self, value: Any, tp: type, path: str) -> Any:
        accepts, expected, fix = _PLAIN_TYPES[tp]
        if not accepts(value):
            raise self.error(path, f"expected {expected}, got {_describe(value)}", fix)
        return float(value) if tp is float else value

    def _union(self, value: Any, tp: Any, path: str) -> Any:
        arms = [a for a in get_args(tp) if a is not type(None)]
        errors = []
        for arm in arms:
            try:
                return self.convert(value, arm, path)
            except RecipeError as error:
                errors.append(error)
        if len(arms) == 1:
            raise errors[0]
        raise self.error(path, f"expected {_type_name(tp)}, got {_describe(value)}", "change the value's type")

    def _literal(self, value: Any, tp: Any, path: str) -> Any:
        choices = get_args(tp)
        if value not in choices:
            close = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise self.error(path, f"expected one of {', '.join(repr(c) for c in choices)}, got {value!r}", f"{hint}use one of the listed values")
        return value

    def _sequence(self, value: Any, tp: Any, path: str) -> Any:
        if not isinstance(value, list):
            raise self.error(path, f"expected {_type_name(tp)}, got {_describe(value)}", "write a list, e.g. [1, 2]")
        args = get_args(tp)
        item_type = args[0] if args else Any
        items = [self.convert(item, item_type, f"{path}[{i}]") for i, item in enumerate(value)]
        return tuple(items) if get_origin(tp) is tuple else items

    def _table(self, value: Any, tp: Any, path: str) -> Any:
        if not isinstance(value, dict):
            raise self.error(path, f"expected a table, got {_describe(value)}", "write a table, e.g. {key = 1.0}")
        args = get_args(tp)
        value_type = args[1] if len(args) == 2 else Any
        return {k: self.convert(v, value_type, _join(path, k)) for k, v in value.items()}


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


# An unparameterised annotation: (accepts the value, what was expected, the fix).
_PLAIN_TYPES: dict[type, tuple[Any, str, str]] = {
    bool: (lambda v: isinstance(v, bool), "true or false", "write true or false (no quotes)"),
    int: (lambda v: isinstance(v, int) and not isinstance(v, bool), "an integer", "write a whole number without quotes, e.g. 10"),
    float: (_is_number, "a number", "write a number without quotes, e.g. 0.1"),
    str: (lambda v: isinstance(v, str), "a string", 'put the value in quotes, e.g. "name"'),
    dict: (lambda v: isinstance(v, dict), "a table", "write a table"),
    list: (lambda v: isinstance(v, list), "a list", "write a list"),
}
# A parameterised one (``int | None``, ``Literal[...]``, ``list[int]``), by its origin.
_BY_ORIGIN = {
    Union: Structurer._union,
    types.UnionType: Structurer._union,
    Literal: Structurer._literal,
    list: Structurer._sequence,
    tuple: Structurer._sequence,
    dict: Structurer._table,
}

def _failing_field(cls: type, kwargs: dict) -> str | None:
    """Find which field's validator rejects ``kwargs`` (attrs reports no name)."""
    for field in attrs.fields(cls):
        if field.validator is None or field.name not in kwargs:
            continue
        try:
            field.validator(None, field, kwargs[field.name])
        except FieldValueError:
            return field.name
    return None


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key
