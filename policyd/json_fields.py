"""The top-level fields of a JSON object too large to hold in memory, read as it passes chunk by chunk.

A provider's reply of many MiB (a batch of embeddings, images inlined as base64) still reports its
usage in a small top-level field. `TopLevelFields` keeps the values of the fields it is asked for
(each up to `value_bytes_max`), the items of some top-level arrays that are small enough, and the
number of items of every top-level array; the rest passes unread. Strings, the bulk of such
replies, are skipped by one regular-expression match each; numbers are never looked at.
"""

from __future__ import annotations

import json
import re
from typing import Any

_STRUCTURE = re.compile(rb'["{}\[\]:]')  # what moves the reader: a string's start, nesting, a key's colon
_STRING_REST = re.compile(rb'(?:[^"\\]|\\.)*"')  # the rest of a string, through its closing quote
_WHITESPACE = b" \t\r\n"
VALUE_BYTES_MAX = 64 * 1024


class TopLevelFields:
    """Feed the object's bytes in order (`feed`), then `end()`; `values`, `items` and `counts` hold what
    was kept, `broken` whether the bytes were not one JSON object."""

    def __init__(self, keep: frozenset[str], keep_items: frozenset[str] = frozenset(),
                 value_bytes_max: int = VALUE_BYTES_MAX) -> None:
        self.keep, self.keep_items, self.value_bytes_max = keep, keep_items, value_bytes_max
        self.values: dict[str, Any] = {}  # kept fields whose value fit
        self.items: dict[str, list[Any]] = {}  # items that fit, of the arrays of keep_items
        self.counts: dict[str, int] = {}  # object or array items of each top-level array
        self.broken = False
        self._depth = 0
        self._in_string = False
        self._escape_pending = False  # a chunk ended inside a string's escape: the next byte is escaped
        self._string = bytearray()  # a top-level string being read: maybe a key
        self._candidate_key: str | None = None  # the last top-level string: a key if a colon follows
        self._key: str | None = None  # the top-level field whose value is being read
        self._capture: bytearray | None = None  # the raw bytes of a value (or an item) being kept
        self._capture_depth = 0  # the depth its value ends at

    def feed(self, chunk: bytes) -> None:
        if self.broken or not chunk:
            return
        at, size = 0, len(chunk)
        captured_from = 0  # the part of this chunk not yet added to the capture
        while at < size:
            if self._in_string:
                at = self._string_rest(chunk, at)
                if self._in_string:
                    break
                if self._depth == 1 and self._capture is None:
                    self._candidate_key = self._decoded_string()
                elif self._capture is not None and self._depth == self._capture_depth:  # a kept string value
                    captured_from = self._captured(chunk, captured_from, at)
                    self._finish_capture()
                continue
            found = _STRUCTURE.search(chunk, at)
            if found is None:
                break
            at = found.end()
            char = chunk[found.start()]
            if self._depth == 1 and char in (0x22, 0x7D) and self._capture is not None and self._capture_depth == 1:
                literal = (bytes(self._capture) + chunk[captured_from:found.start()]).strip(_WHITESPACE)
                if literal:  # the kept field's value was a literal (a number, true, false, null): it ended
                    self._capture = bytearray(literal.rstrip(b",").rstrip(_WHITESPACE))
                    self._finish_capture()
            if char == 0x22:  # "
                self._in_string = True
                self._string.clear()
            elif char in (0x7B, 0x5B):  # { [
                if self._depth == 0 and char != 0x7B:
                    self.broken = True
                    return
                if self._depth == 1 and char == 0x5B and self._key is not None:
                    self.counts[self._key] = 0  # a top-level array: its items are counted
                elif self._depth == 2 and self._key in self.counts:
                    self.counts[self._key] += 1
                    if self._key in self.keep_items and self._capture is None:
                        captured_from = found.start()
                        self._capture, self._capture_depth = bytearray(), 2
                self._depth += 1
            elif char in (0x7D, 0x5D):  # } ]
                self._depth -= 1
                if self._depth < 0:
                    self.broken = True
                    return
                if self._capture is not None and self._depth == self._capture_depth:
                    captured_from = self._captured(chunk, captured_from, at)
                    self._finish_capture()
                if self._depth == 1 and self._capture is None:
                    self._key = None  # the end of a top-level value
            elif char == 0x3A and self._depth == 1:  # the colon after a top-level key
                self._key, self._candidate_key = self._candidate_key, None
                if self._key in self.keep:
                    captured_from = at
                    self._capture, self._capture_depth = bytearray(), 1
        if self._capture is not None:
            self._captured(chunk, captured_from, size)

    def end(self) -> None:
        if self._depth != 0 or self._in_string:
            self.broken = True

    def _string_rest(self, chunk: bytes, at: int) -> int:
        """Read on inside a string from `at`; where it ends, or the chunk's end (still inside)."""
        start = at
        if self._escape_pending:  # the chunk starts with the byte a backslash at the end of the last escaped
            self._escape_pending = False
            at += 1
        found = _STRING_REST.match(chunk, at)
        keep = self._depth == 1 and self._capture is None
        if found is None:  # the string goes on past this chunk
            tail = chunk[at:]
            trailing = len(tail) - len(tail.rstrip(b"\\"))
            self._escape_pending = trailing % 2 == 1
            if keep and len(self._string) < self.value_bytes_max:
                self._string += chunk[start:]
            return len(chunk)
        if keep and len(self._string) < self.value_bytes_max:
            self._string += chunk[start:found.end() - 1]
        self._in_string = False
        return found.end()

    def _decoded_string(self) -> str | None:
        if len(self._string) >= self.value_bytes_max:
            return None
        try:
            return json.loads(b'"' + bytes(self._string) + b'"')
        except ValueError:
            return None

    def _captured(self, chunk: bytes, start: int, end: int) -> int:
        if self._capture is not None:
            if len(self._capture) + end - start > self.value_bytes_max:
                self._capture = None  # too large to keep: read past like a field not kept
            else:
                self._capture += chunk[start:end]
        return end

    def _finish_capture(self) -> None:
        raw, key = self._capture, self._key
        self._capture = None
        if self._capture_depth == 1:
            self._key = None
        if raw is None or key is None:
            return
        try:
            value = json.loads(bytes(raw))
        except (ValueError, RecursionError):
            return
        if self._capture_depth == 1:
            self.values[key] = value
        else:
            self.items.setdefault(key, []).append(value)

    def as_object(self) -> dict[str, Any]:
        """What was kept as one object: kept fields, kept items as their arrays, other arrays as None items."""
        data: dict[str, Any] = {key: [None] * count for key, count in self.counts.items()}
        data.update(self.items)
        data.update(self.values)
        return data
