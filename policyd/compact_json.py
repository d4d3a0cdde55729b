"""The JSON policyd writes for itself: records, events and reservations, on every decision's path.

Encoded by orjson (compact, UTF-8, about twenty times faster than the standard library on a record)
and decoded by it where policyd reads its own JSON back (the writer). What orjson refuses, the
standard library still writes: integers beyond 64 bits, and strings holding lone surrogates (which
validation keeps out of attribution, but a caller's text may still carry), so nothing policyd could
write before is refused now. Either output is plain JSON: readers never depend on which wrote it.
orjson reads an integer past 64 bits as a float: what it reads is written again and compared with the
text (both about a microsecond on a record, a fifth of a search of the text for long runs of digits);
text that does not come back the same (such a float, or JSON orjson did not write) is read by the
standard library, so every integer read back is exact.

Request and reply bodies from clients and providers are not read here: the standard library's
parser accepts some inputs orjson refuses (lone surrogate escapes), and those must keep being read.
"""

from __future__ import annotations

import json
from typing import Any

import orjson


def dumps(value: Any) -> str:
    """Compact JSON text of a value of dicts, lists, strings, integers, booleans and None."""
    try:
        return orjson.dumps(value).decode()
    except (orjson.JSONEncodeError, TypeError):
        return json.dumps(value, separators=(",", ":"))


def loads(text: str | bytes) -> Any:
    """The value JSON text holds; integers exact whatever their size."""
    data = text if isinstance(text, bytes) else text.encode("utf-8", "surrogatepass")
    try:
        value = orjson.loads(data)
        if orjson.dumps(value) == data:  # an integer past 64 bits read as a float would come back as 1.8e19
            return value
    except (orjson.JSONDecodeError, orjson.JSONEncodeError):  # past orjson's limits (lone surrogates)
        pass
    return json.loads(text)
