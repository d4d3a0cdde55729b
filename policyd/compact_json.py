"""The JSON policyd writes for itself: records, events and reservations, on every decision's path.

Encoded by orjson (compact, UTF-8, about twenty times faster than the standard library on a record)
and decoded by it where policyd reads its own JSON back (the writer). What orjson refuses, the
standard library still writes: integers beyond 64 bits, and strings holding lone surrogates (which
validation keeps out of attribution, but a caller's text may still carry), so nothing policyd could
write before is refused now. Either output is plain JSON: readers never depend on which wrote it.
orjson reads an integer past 64 bits as a float: text with such a long run of digits is read by the
standard library, so every integer read back is exact.

Request and reply bodies from clients and providers are not read here: the standard library's
parser accepts some inputs orjson refuses (lone surrogate escapes), and those must keep being read.
"""

from __future__ import annotations

import json
import re
from typing import Any

import orjson


def dumps(value: Any) -> str:
    """Compact JSON text of a value of dicts, lists, strings, integers, booleans and None."""
    try:
        return orjson.dumps(value).decode()
    except (orjson.JSONEncodeError, TypeError):
        return json.dumps(value, separators=(",", ":"))


# 19 digits in a row: maybe an integer past 64 bits, which orjson would read as a float (never, for money)
_LONG_DIGITS = re.compile(r"\d{19}")


def loads(text: str | bytes) -> Any:
    """The value JSON text holds; integers exact whatever their size."""
    if isinstance(text, bytes):
        text = text.decode()
    if _LONG_DIGITS.search(text):
        return json.loads(text)
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError:  # what the standard library wrote past orjson's limits (lone surrogates)
        return json.loads(text)
