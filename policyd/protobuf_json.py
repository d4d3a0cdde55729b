"""Protobuf's JSON forms of a Duration ("3600s") and a Timestamp (RFC 3339, "2026-12-06T10:00:00.5Z"), as
Google's APIs write and read them (an explicit cache's ttl, expireTime, createTime), in whole milliseconds.
"""

from __future__ import annotations

import re
from datetime import datetime
from typing import Any

_DURATION = re.compile(r"^(?P<seconds>\d{1,12})(\.(?P<fraction>\d{1,9}))?s$")  # protobuf's JSON Duration: "3600s"
_TIMESTAMP = re.compile(r"^(?P<at>\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2})(\.(?P<fraction>\d{1,9}))?"
                        r"(?P<zone>Z|[+-]\d{2}:\d{2})$")  # protobuf's JSON Timestamp (RFC 3339)


def duration_ms(value: Any) -> int | None:
    """A protobuf JSON Duration ("3600s", "1.5s") in milliseconds, rounded up; None when it is not one."""
    found = _DURATION.match(value) if isinstance(value, str) else None
    if found is None:
        return None
    fraction = (found["fraction"] or "").ljust(9, "0")
    return int(found["seconds"]) * 1000 + -(-int(fraction) // 1_000_000)


def timestamp_ms(value: Any) -> int | None:
    """A protobuf JSON Timestamp ("2026-12-06T10:00:00.5Z") in unix milliseconds, rounded up; None when it is
    not one."""
    found = _TIMESTAMP.match(value) if isinstance(value, str) else None
    if found is None:
        return None
    zone = "+00:00" if found["zone"] == "Z" else found["zone"]
    try:
        at = datetime.fromisoformat(found["at"] + zone)
    except ValueError:
        return None
    fraction = (found["fraction"] or "").ljust(9, "0")
    return int(at.timestamp()) * 1000 + -(-int(fraction) // 1_000_000)
