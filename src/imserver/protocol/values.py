"""The data model of free-form values (``send.meta``): what both codecs can carry.

A value a client sends is stored once and then encoded for every reader, in JSON or
MessagePack, live and from history, for as long as the message exists. A value that
one codec cannot encode would break every recipient on that codec, every time, so it
is refused when it arrives, whichever codec it arrived in:

* maps with string keys, arrays, strings, booleans and nil;
* integers in the signed 64-bit range, ``-2**63 .. 2**63 - 1``: MessagePack stops
  at ``2**64 - 1`` and ``-2**63``, and most client languages at the signed range;
* finite floats: JSON has no NaN or infinity (MessagePack does);
* at most :data:`MAX_DEPTH` levels of maps and arrays: encoders recurse, and a value
  nested deeply enough to pass the decoder can still overflow an encoder called from
  further down the stack.

The byte size of a value is a configurable limit, checked by the service that
stores it (``limits.max_meta``).
"""

from __future__ import annotations

import math
from typing import Any

INT_MIN = -(2**63)
INT_MAX = 2**63 - 1
MAX_DEPTH = 32
"""Most levels of maps and arrays in one value; a map holding a scalar is depth 1."""


def value_problem(value: Any, path: str) -> str | None:
    """Why ``value`` (found at ``path``, e.g. ``meta``) is outside the model, or None.

    Iterative, so that a value nested far past :data:`MAX_DEPTH` is reported rather
    than overflowing the stack here.
    """
    stack: list[tuple[Any, str, int]] = [(value, path, 0)]
    while stack:
        item, where, depth = stack.pop()
        if isinstance(item, dict | list):
            depth += 1
            if depth > MAX_DEPTH:
                return f"nested deeper than {MAX_DEPTH} levels at {where}"
            if isinstance(item, dict):
                for key, sub in item.items():
                    if not isinstance(key, str):
                        return f"map keys must be strings, not {type(key).__name__}, at {where}"
                    stack.append((sub, f"{where}.{key}", depth))
            else:
                stack.extend((sub, f"{where}[{i}]", depth) for i, sub in enumerate(item))
        elif isinstance(item, bool) or item is None or isinstance(item, str):
            continue
        elif isinstance(item, int):
            if not INT_MIN <= item <= INT_MAX:
                return f"integer at {where} is outside the signed 64-bit range"
        elif isinstance(item, float):
            if not math.isfinite(item):
                return f"{item} at {where} is not a finite number"
        else:
            return f"{type(item).__name__} value at {where} has no JSON equivalent"
    return None
