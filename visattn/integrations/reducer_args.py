"""Reducers of :mod:`visattn.mllm_tokens` built from text arguments (harness model args, command lines).

:func:`reducers` lists every :class:`~visattn.mllm_tokens.Reducer` subclass that ``visattn.mllm_tokens``
exports (its ``__all__``): a reducer added there is available here with no other edit.
:func:`build_reducer` reads each argument as the type its constructor annotates (``int | float``,
``Sequence[int] | str``, ``tuple[float, float] | bool``, ``str | Path | None``, ...). Values come as
text or as the scalars lmms-eval already made of it (``"64"`` -> 64, ``"0.5"`` -> 0.5, ``"true"`` ->
True); sequences are written as JSON lists (``layers=[2,6,15]``), ``none`` is None where None is allowed.
"""

from __future__ import annotations

import inspect
import json
import re
import types
import typing
from collections.abc import Sequence
from pathlib import Path

import visattn.mllm_tokens as mllm_tokens
from visattn.mllm_tokens import Reducer

__all__ = ["build_reducer", "describe_parameters", "reducer_class", "reducer_parameters", "reducers"]

_FAIL = object()  # a value that does not read as the annotated type


def reducers() -> dict[str, type[Reducer]]:
    """``{class name: class}`` of every reducer ``visattn.mllm_tokens`` exports."""
    found = {}
    for name in mllm_tokens.__all__:
        obj = getattr(mllm_tokens, name)
        if isinstance(obj, type) and issubclass(obj, Reducer) and obj is not Reducer:
            found[name] = obj
    return dict(sorted(found.items()))


def reducer_class(name: str) -> type[Reducer]:
    """The reducer called ``name`` (case-insensitive); ``ValueError`` listing the valid names otherwise."""
    table = reducers()
    by_lower = {key.lower(): cls for key, cls in table.items()}
    cls = by_lower.get(str(name).lower())
    if cls is None:
        raise ValueError(f"unknown reducer {name!r}; valid reducers: {', '.join(table)}")
    return cls


def reducer_parameters(cls: type[Reducer]) -> dict[str, inspect.Parameter]:
    """The keyword parameters of ``cls``'s constructor, annotations resolved."""
    keyword = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    signature = inspect.signature(cls, eval_str=True)
    return {name: p for name, p in signature.parameters.items() if p.kind in keyword}


def describe_parameters(cls: type[Reducer]) -> str:
    """``name: type = default`` of every parameter, comma-separated (for error messages)."""
    parts = []
    for name, p in reducer_parameters(cls).items():
        text = f"{name}: {_type_name(p.annotation)}"
        parts.append(text if p.default is inspect.Parameter.empty else f"{text} = {p.default!r}")
    return ", ".join(parts)


def build_reducer(name: str, args: dict) -> Reducer:
    """``reducer_class(name)(**args)`` with every value read as its annotated type.

    Raises ``ValueError`` naming the problem and the valid choices for an unknown reducer, an argument
    the reducer does not take, or a value that does not read as its type; the reducer's own checks
    (ranges, combinations) raise theirs.
    """
    cls = reducer_class(name)
    params = reducer_parameters(cls)
    unknown = sorted(set(args) - set(params))
    if unknown:
        raise ValueError(
            f"{cls.__name__} takes no argument {', '.join(unknown)}; "
            f"its arguments: {describe_parameters(cls)}"
        )
    typed = {}
    for key, value in args.items():
        annotation = params[key].annotation
        result = _read(value, annotation)
        if result is _FAIL:
            raise ValueError(f"{cls.__name__}: {key}={value!r} is not of type {_type_name(annotation)}")
        typed[key] = result
    return cls(**typed)


def _type_name(annotation) -> str:
    if annotation is inspect.Parameter.empty:
        return "value"
    return re.sub(r"\b(?:\w+\.)+(\w+)", r"\1", inspect.formatannotation(annotation))


def _read(value, annotation):
    """``value`` as ``annotation``, or ``_FAIL``."""
    if annotation in (inspect.Parameter.empty, typing.Any):
        return value
    origin, members = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        if type(None) in members and _is_none(value):
            return None
        for member in members:
            result = _read(value, member)
            if result is not _FAIL:
                return result
        return _FAIL
    if annotation is type(None):
        return None if _is_none(value) else _FAIL
    if origin is typing.Literal:
        return value if value in members else _FAIL
    if origin in (tuple, list, Sequence):
        return _read_sequence(value, origin, members)
    return _read_scalar(value, annotation)


def _is_none(value) -> bool:
    return value is None or (isinstance(value, str) and value.lower() == "none")


def _read_sequence(value, origin, members):
    if isinstance(value, str):
        if not value.lstrip().startswith("["):
            return _FAIL
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            return _FAIL
    if not isinstance(value, (list, tuple)):
        return _FAIL
    if origin is tuple and members and members[-1] is not Ellipsis:
        if len(value) != len(members):
            return _FAIL
        items = [_read(v, m) for v, m in zip(value, members)]
    else:
        item_type = members[0] if members else inspect.Parameter.empty
        items = [_read(v, item_type) for v in value]
    if any(item is _FAIL for item in items):
        return _FAIL
    return list(items) if origin is list else tuple(items)


def _read_scalar(value, annotation):
    if annotation is bool:
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        return value if isinstance(value, bool) else _FAIL
    if isinstance(value, bool):
        return _FAIL  # True is no int, float or str here
    if annotation is int:
        if isinstance(value, int):
            return value
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                return _FAIL
        return _FAIL
    if annotation is float:
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                return _FAIL
        return _FAIL
    if annotation in (str, Path):
        return annotation(value) if isinstance(value, (str, int, float)) else _FAIL
    return value if isinstance(annotation, type) and isinstance(value, annotation) else _FAIL
