"""Turn plain TOML data into attrs objects, with errors that name the key path.

Used for the recipe skeleton and for every component's ``Params`` class, so a
plugin's parameters are checked exactly like the host's own keys. (cattrs could
structure these too, but its error groups name neither the recipe file nor a
fix; this module is small and tailored to that.)
"""

from __future__ import annotations

import types
import typing
from typing import Any, Literal, Union, get_args, get_origin

import attrs

from .errors import RecipeError, UserError, combined_error, did_you_mean


class FieldValueError(ValueError):
    """Raised by validators below; the structurer adds file and key path."""

    def __init__(self, message: str, fix: str | None = None):
        super().__init__(message)
        self.message = message
        self.fix = fix


def _describe(value: Any) -> str:
    return f"{value!r} ({type(value).__name__})" if not isinstance(value, bool) else repr(value).lower()


def _described(description: str):
    """Give a validator the text the parameter reference shows (``describe``)."""

    def mark(validator):
        validator.describe = description
        return validator

    return mark


@_described("> 0")
def positive(instance, attribute, value):
    if value is not None and not value > 0:
        raise FieldValueError(f"must be > 0, got {value!r}", f"set {attribute.name} to a positive value")


@_described(">= 0")
def non_negative(instance, attribute, value):
    if value is not None and value < 0:
        raise FieldValueError(f"must be >= 0, got {value!r}", f"set {attribute.name} to 0 or more")


def between(low: float, high: float):
    @_described(f"in [{low}, {high}]")
    def check(instance, attribute, value):
        if value is not None and not low <= value <= high:
            raise FieldValueError(f"must be in [{low}, {high}], got {value!r}", f"set {attribute.name} between {low} and {high}")

    return check


@_described("epochs >= 1, increasing")
def increasing_epochs(instance, attribute, value):
    if value and (any(epoch < 1 for epoch in value) or any(a >= b for a, b in zip(value, value[1:]))):
        raise FieldValueError(f"must be epochs >= 1 in increasing order, got {value!r}",
                              f"set {attribute.name} to e.g. [150, 180, 210]")


@_described("in (0, 1)")
def open_unit(instance, attribute, value):
    if value is not None and not 0 < value < 1:
        raise FieldValueError(f"must be strictly between 0 and 1, got {value!r}", f"set {attribute.name} to e.g. 0.1")


def describe_validator(validator: Any) -> str | None:
    """What a field's validator accepts, for the parameter reference: its
    ``describe`` attribute (set it on your own validators), the parts of an
    ``attrs`` ``and_``, an ``in_``'s options, else the docstring's first line."""
    if validator is None:
        return None
    if isinstance(getattr(validator, "describe", None), str):
        return validator.describe
    parts = getattr(validator, "_validators", None)
    if parts is not None:
        texts = [text for text in (describe_validator(v) for v in parts) if text]
        return ", ".join(texts) or None
    if hasattr(validator, "options"):
        return "one of " + ", ".join(repr(option) for option in validator.options)
    doc = (getattr(validator, "__doc__", None) or "").strip()
    return doc.splitlines()[0] if doc and not isinstance(validator, type) else None


_PLURALS = {int: "integers", float: "numbers", str: "strings", bool: "true/false values"}


def describe_type(tp: Any, plural: bool = False) -> str:
    """``list[int]`` -> "a list of integers"; ``plural`` names several of the type."""
    origin = get_origin(tp)
    if tp is type(None):
        return "nothing"
    if origin is Literal:
        return ("values among " if plural else "one of ") + ", ".join(repr(a) for a in get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(describe_type(a, plural) for a in get_args(tp) if a is not type(None))
    if origin in (list, tuple):
        args = get_args(tp)
        noun = "lists" if plural else "a list"
        return f"{noun} of {describe_type(args[0], plural=True)}" if args else noun
    if origin is dict or attrs.has(tp) or tp is dict:
        return "tables" if plural else "a table"
    if tp is list:
        return "lists" if plural else "a list"
    if plural:
        return _PLURALS.get(tp, f"{getattr(tp, '__name__', str(tp))} values")
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false"}.get(tp, getattr(tp, "__name__", str(tp)))


_FAILED = object()  # a value that did not convert (its error is kept)


class ErrorList:
    """The errors of independent checks, gathered to be raised together."""

    def __init__(self):
        self.errors: list[UserError] = []

    def check(self, make, default: Any = None) -> Any:
        """``make()``, or ``default`` with its error kept."""
        try:
            return make()
        except UserError as error:
            self.errors.append(error)
            return default

    def raise_all(self) -> None:
        """One error raised as itself, several as one :class:`RecipeErrors`."""
        if self.errors:
            raise combined_error(self.errors)


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
        """An instance of the attrs class ``cls`` from the table ``data``; every
        independent error of the table is raised at once (see :class:`ErrorList`)."""
        errors = ErrorList()
        fields = self._check_keys(cls, data, path, errors)
        hints = typing.get_type_hints(cls)
        kwargs = {}
        for name, field in fields.items():
            key_path = _join(path, name)
            if name in data:
                kwargs[name] = errors.check(lambda: self.convert(data[name], hints[name], key_path), _FAILED)
            elif field.default is attrs.NOTHING:
                help_text = field.metadata.get("help", "")
                errors.errors.append(self.error(key_path, f"required key is missing ({describe_type(hints[name])})",
                                                f"add {name} = ...{' (' + help_text + ')' if help_text else ''}"))
        self._raise_with_validators(errors, cls, kwargs, path)
        return self._build(cls, kwargs, path, lambda: cls(**kwargs))

    def evolve(self, instance: Any, data: Any, path: str) -> Any:
        """``instance`` (a structured attrs object) with the keys in ``data`` replaced,
        each checked as :meth:`structure` checks it; a nested table updates the
        nested section key by key (``optimizer = { lr = 0.01 }`` keeps the name)."""
        cls = type(instance)
        errors = ErrorList()
        fields = self._check_keys(cls, data, path, errors)
        hints = typing.get_type_hints(cls)
        changes = {}
        for name in (name for name in data if name in fields):
            current, value, key_path = getattr(instance, name), data[name], _join(path, name)
            if attrs.has(type(current)) and isinstance(value, dict):
                changes[name] = errors.check(lambda: self.evolve(current, value, key_path), _FAILED)
            else:
                changes[name] = errors.check(lambda: self.convert(value, hints[name], key_path), _FAILED)
        self._raise_with_validators(errors, cls, changes, path)
        return self._build(cls, changes, path, lambda: attrs.evolve(instance, **changes))

    def _raise_with_validators(self, errors: ErrorList, cls: type, values: dict, path: str) -> None:
        """Raise ``errors`` (if any) with the validator errors of the values that did convert."""
        if errors.errors:
            converted = {k: v for k, v in values.items() if v is not _FAILED and not attrs.has(type(v))}
            errors.errors += self._validator_errors(cls, converted, path)
            errors.raise_all()

    def _check_keys(self, cls: type, data: Any, path: str, errors: ErrorList) -> dict:
        """``cls``'s fields; an error for each key of ``data`` that is not one."""
        if not isinstance(data, dict):
            raise self.error(path, f"expected a table, got {_describe(data)}", f"write {path} as a [table] of keys")
        fields = {f.name: f for f in attrs.fields(cls) if f.init}
        known = ", ".join(fields) or "(none)"
        for key in (k for k in data if k not in fields):
            errors.errors.append(self.error(_join(path, key), f"unknown key {key!r}; valid keys here: {known}",
                                            f"{did_you_mean(key, fields)}remove or rename it"))
        return fields

    def _build(self, cls: type, kwargs: dict, path: str, build) -> Any:
        """Run the attrs validators (inside ``build``); name every key that fails."""
        try:
            return build()
        except FieldValueError as error:
            raise combined_error(self._validator_errors(cls, kwargs, path) or [self.error(path, error.message, error.fix)]) from None
        except (ValueError, TypeError) as error:
            raise self.error(path, str(error), "check the values in this section") from None

    def _validator_errors(self, cls: type, kwargs: dict, path: str) -> list[RecipeError]:
        """An error for each field whose validator rejects its value in ``kwargs``."""
        fields = {f.name: f for f in attrs.fields(cls)}
        found = []
        for field_name, failure in _failing_fields(cls, kwargs):
            help_text = fields[field_name].metadata.get("help")
            fix = (failure.fix or "change the value") + (f" ({help_text})" if help_text else "")
            found.append(self.error(_join(path, field_name), failure.message, fix))
        return found

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
        raise self.error(path, f"expected {describe_type(tp)}, got {_describe(value)}", "change the value's type")

    def _literal(self, value: Any, tp: Any, path: str) -> Any:
        choices = get_args(tp)
        if value not in choices:
            hint = did_you_mean(value, [str(c) for c in choices])
            raise self.error(path, f"expected one of {', '.join(repr(c) for c in choices)}, got {value!r}", f"{hint}use one of the listed values")
        return value

    def _sequence(self, value: Any, tp: Any, path: str) -> Any:
        if not isinstance(value, list):
            raise self.error(path, f"expected {describe_type(tp)}, got {_describe(value)}", "write a list, e.g. [1, 2]")
        args = get_args(tp)
        item_type = args[0] if args else Any
        errors = ErrorList()
        items = [errors.check(lambda: self.convert(item, item_type, f"{path}[{i}]")) for i, item in enumerate(value)]
        errors.raise_all()
        return tuple(items) if get_origin(tp) is tuple else items

    def _table(self, value: Any, tp: Any, path: str) -> Any:
        if not isinstance(value, dict):
            raise self.error(path, f"expected a table, got {_describe(value)}", "write a table, e.g. {key = 1.0}")
        args = get_args(tp)
        value_type = args[1] if len(args) == 2 else Any
        errors = ErrorList()
        table = {k: errors.check(lambda: self.convert(v, value_type, _join(path, k))) for k, v in value.items()}
        errors.raise_all()
        return table


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

def _failing_fields(cls: type, kwargs: dict) -> list[tuple[str, FieldValueError]]:
    """Every field whose validator rejects ``kwargs`` (attrs stops at the first and names none)."""
    failures = []
    for field in attrs.fields(cls):
        if field.validator is None or field.name not in kwargs:
            continue
        try:
            field.validator(None, field, kwargs[field.name])
        except FieldValueError as error:
            failures.append((field.name, error))
    return failures


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key
