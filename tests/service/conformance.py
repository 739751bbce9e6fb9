"""Whether a class implements the methods of a ``typing.Protocol`` with their signatures.

mypy sees a service against its protocol only where the composition root
(``core/embedded.py``) wires one into the other, and it does not read ``tests/``. This
check runs in the test suite: every public method the protocol declares (its protocol
bases included) must exist on the class with the same parameters (names, kinds, types,
defaults where the protocol has one; extra parameters only with defaults), be ``async``
where the protocol's is, and return the declared type — or, where the protocol
declares ``Awaitable[X]``, an awaitable of ``X`` (a coroutine or e.g. a ``Future[X]``).
Types are compared resolved and exactly, which is stricter than mypy's variance rules
and what our services do.
"""

from __future__ import annotations

import collections.abc
import inspect
import typing
from collections.abc import Callable
from typing import Any

from imserver.services.loopback import protocol_methods

__all__ = ["protocol_methods", "signature_mismatches"]

_EMPTY = inspect.Parameter.empty


def _awaited(fn: Callable[..., Any], hints: dict[str, Any]) -> Any:
    """What awaiting ``fn``'s result gives, or ``_EMPTY`` if it returns no awaitable."""
    ret = hints.get("return", _EMPTY)
    if inspect.iscoroutinefunction(fn):
        return ret
    origin = typing.get_origin(ret)
    if isinstance(origin, type) and issubclass(origin, collections.abc.Awaitable):
        args = typing.get_args(ret)
        if not args:
            return Any
        return type(None) if args[0] is None else args[0]
    return _EMPTY


def _return_mismatch(want: Callable[..., Any], got: Callable[..., Any], wh: Any, gh: Any) -> bool:
    if inspect.iscoroutinefunction(want) and not inspect.iscoroutinefunction(got):
        return True
    want_awaited = _awaited(want, wh)
    if want_awaited is _EMPTY:
        return bool(wh.get("return", _EMPTY) != gh.get("return", _EMPTY))
    return bool(want_awaited != _awaited(got, gh))


def signature_mismatches(proto: type, impl: type) -> list[str]:
    """How ``impl`` departs from ``proto``'s methods (empty: it implements them all)."""
    problems: list[str] = []
    for name, want in protocol_methods(proto).items():
        got = getattr(impl, name, None)
        if not inspect.isfunction(got):
            problems.append(f"{name}: missing" if got is None else f"{name}: not a method")
            continue
        wh, gh = typing.get_type_hints(want), typing.get_type_hints(got)
        wp = list(inspect.signature(want).parameters.values())
        gp = list(inspect.signature(got).parameters.values())
        for w, g in zip(wp, gp, strict=False):
            if (w.name, w.kind) != (g.name, g.kind):
                problems.append(f"{name}: parameter {g.name!r} ({g.kind}), expected {w.name!r}")
            elif wh.get(w.name, _EMPTY) != gh.get(g.name, _EMPTY):
                problems.append(
                    f"{name}: parameter {w.name!r} is {gh.get(g.name)}, not {wh.get(w.name)}"
                )
            elif w.default is not _EMPTY and g.default is _EMPTY:
                problems.append(f"{name}: parameter {w.name!r} lacks its default")
        for w in wp[len(gp) :]:
            problems.append(f"{name}: parameter {w.name!r} missing")
        for g in gp[len(wp) :]:
            if g.default is _EMPTY and g.kind not in (g.VAR_POSITIONAL, g.VAR_KEYWORD):
                problems.append(f"{name}: extra parameter {g.name!r} without a default")
        if _return_mismatch(want, got, wh, gh):
            kind = "async " if inspect.iscoroutinefunction(got) else ""
            problems.append(
                f"{name}: returns {kind}{gh.get('return')}, expected "
                f"{'async ' if inspect.iscoroutinefunction(want) else ''}{wh.get('return')}"
            )
    return problems
