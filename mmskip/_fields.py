"""Type checks for frozen config dataclasses (configs and schedules), with messages that say what to pass.

``bool`` fields take only booleans (not ``"no"``), ``int`` fields only integers (not ``1.5`` or
``True``), ``float`` fields any real number but not a bool; tuples are checked item by item and
lists are accepted and stored as tuples (JSON has no tuples).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any

__all__ = ["check_field_types"]


def check_field_types(obj: Any, label: str | None = None) -> None:
    """Check a frozen dataclass's fields against their annotations; lists become tuples.

    Errors read ``"{label}{field} must be ..."``; ``label`` defaults to ``"ClassName."``."""
    label = f"{type(obj).__name__}." if label is None else label
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        ok, fixed = _conforms(value, hints.get(f.name, Any))
        if not ok:
            raise TypeError(
                f"{label}{f.name} must be {_describe(hints.get(f.name, Any))}, "
                f"got {value!r} ({type(value).__name__})"
            )
        if fixed is not value:
            object.__setattr__(obj, f.name, fixed)


def _conforms(value: Any, tp: Any) -> tuple[bool, Any]:
    origin = typing.get_origin(tp)
    if tp is Any:
        return True, value
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(tp):
            ok, fixed = _conforms(value, arg)
            if ok:
                return True, fixed
        return False, value
    if tp is type(None):
        return value is None, value
    if tp is bool:
        return isinstance(value, bool), value
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if tp is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        return ok, float(value) if ok and isinstance(value, int) else value
    if tp is str:
        return isinstance(value, str), value
    if origin is tuple:
        if not isinstance(value, (tuple, list)):
            return False, value
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            items = [_conforms(v, args[0]) for v in value]
        elif len(args) == len(value):
            items = [_conforms(v, a) for v, a in zip(value, args)]
        else:
            return False, value
        if not all(ok for ok, _ in items):
            return False, value
        return True, tuple(v for _, v in items)
    if isinstance(tp, type):
        return isinstance(value, tp), value
    return True, value


def _describe(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in typing.get_args(tp))
    if tp is type(None):
        return "None"
    if origin is tuple:
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return f"a tuple/list of {getattr(args[0], '__name__', args[0])} values"
        return f"a tuple/list ({', '.join(getattr(a, '__name__', str(a)) for a in args)})"
    if tp is bool:
        return "a bool (True/False)"
    if tp is int:
        return "an int"
    if tp is float:
        return "a number"
    if tp is str:
        return "a str"
    return getattr(tp, "__name__", str(tp))
