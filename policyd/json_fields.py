"""Chosen fields of a JSON object too large to hold in memory, read as it passes chunk by chunk.

A provider's reply of many MiB (a batch of embeddings, images inlined as base64), or one stream event
of that size (a Responses API `response.completed` carrying a generated image), still reports its
usage in a small field. `ObjectFields` keeps the values at the paths it is asked for (each up to
`value_bytes_max`), the items of some arrays that are small enough (of one too large, its `type`
alone, when it has one: a generated image's call is still seen), and the number of object or array
items of every array outside other arrays; the rest passes unread. Strings, the bulk of such
bodies, are skipped by one regular-expression match each; numbers are never looked at.

A path is the tuple of keys from the top: ("usage",), ("response", "usage").
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

_STRUCTURE = re.compile(rb'["{}\[\]:]')  # what moves the reader: a string's start, nesting, a key's colon
_STRING_REST = re.compile(rb'(?:[^"\\]|\\.)*"')  # the rest of a string, through its closing quote
_WHITESPACE = b" \t\r\n"
VALUE_BYTES_MAX = 64 * 1024
Path = tuple[str, ...]


@dataclass
class _Container:
    is_object: bool
    path: Path | None  # None inside an array: no path leads there
    key: str | None = None  # an object's key whose value is being read
    expect_value: bool = False  # an object's colon seen, its value not yet ended
    literal: bool = False  # ... and that value is a literal (number, true, false, null) under way


class ObjectFields:
    """Feed the object's bytes in order (`feed`), then `end()`; `values`, `items` and `counts` hold what was
    kept, `broken` whether the bytes were not one JSON object."""

    def __init__(self, keep: Iterable[Path], keep_items: Iterable[Path] = (),
                 value_bytes_max: int = VALUE_BYTES_MAX, stop_at_end: bool = False) -> None:
        """`stop_at_end`: the object is one of several in the bytes (an item of a JSON-array stream): reading
        stops where it closes, and `rest` holds the bytes of that chunk after it."""
        self.keep, self.keep_items = frozenset(keep), frozenset(keep_items)
        self.stop_at_end = stop_at_end
        self.rest: bytes | None = None
        self.value_bytes_max = value_bytes_max
        self.values: dict[Path, Any] = {}  # kept values that fit
        self.items: dict[Path, list[Any]] = {}  # items that fit, of the arrays of keep_items
        self.counts: dict[Path, int] = {}  # object or array items of each array outside arrays
        self.broken = False
        self._stack: list[_Container] = []
        self._ended = False  # the top object closed
        self._in_string = False
        self._escape_pending = False  # a chunk ended inside a string's escape: the next byte is escaped
        self._string = bytearray()  # a key being read
        self._string_is_key = False
        self._candidate_key: str | None = None  # the last key read: its colon follows
        self._capture: bytearray | None = None  # the raw bytes of a value or an item being kept
        self._capture_depth = 0  # the depth of the container holding it
        self._capture_item = False  # an item of an array (else an object's value)
        self._capture_path: Path = ()

    def feed(self, chunk: bytes) -> None:
        if self.broken or not chunk or self.rest is not None:
            return
        at, size = 0, len(chunk)
        self._captured_from = 0  # the part of this chunk not yet added to the capture
        while at < size and not self.broken:
            if self._in_string:
                at = self._string_rest(chunk, at)
                if not self._in_string:
                    self._string_ended(chunk, at)
                continue
            found = _STRUCTURE.search(chunk, at)
            end = found.start() if found is not None else size
            top = self._stack[-1] if self._stack else None
            if top is None and chunk[at:end].strip(_WHITESPACE):
                self.broken = True  # bytes outside the object
                return
            if top is not None and top.is_object and chunk[at:end].strip(_WHITESPACE):
                if top.expect_value:
                    top.literal = True
                elif chunk[at:end].strip(_WHITESPACE + b","):
                    self.broken = True  # between a value and the next key, or a key and its colon
                    return
            if found is None:
                break
            at = found.end()
            self._token(chunk, found.start(), at, chunk[found.start()])
            if self._ended and self.stop_at_end:
                self.rest = chunk[at:]
                return
        if self._capture is not None:
            self._add_to_capture(chunk, size)

    def end(self) -> None:
        if self._stack or self._in_string or not self._ended:
            self.broken = True

    def as_object(self) -> dict[str, Any]:
        """What was kept as one object: kept values, kept items as their arrays, other arrays as None items."""
        data: dict[str, Any] = {}
        for path, count in self.counts.items():
            _put(data, path, [None] * count)
        for path, items in self.items.items():
            _put(data, path, items)
        for path, value in self.values.items():
            _put(data, path, value)
        return data

    def _token(self, chunk: bytes, start: int, after: int, char: int) -> None:
        top = self._stack[-1] if self._stack else None
        if top is not None and top.literal and char in (0x22, 0x7D):  # the literal value ended before this
            self._value_ended(chunk, start, literal=True)
        if char == 0x22:  # "
            if self._ended:
                self.broken = True
                return
            self._in_string = True
            self._string.clear()
            self._string_is_key = top is not None and top.is_object and not top.expect_value
            if top is not None and not top.is_object:
                self._item_starts(top, start, counted=False)
        elif char in (0x7B, 0x5B):  # { [
            if top is None:
                if char != 0x7B or self._ended:
                    self.broken = True
                    return
                self._stack.append(_Container(True, ()))
                return
            if top.is_object and not top.expect_value:
                self.broken = True
                return
            path = None
            if top.is_object and top.path is not None and top.key is not None:
                path = (*top.path, top.key)
            elif not top.is_object:
                self._item_starts(top, start, counted=True)
            self._stack.append(_Container(char == 0x7B, path))
        elif char in (0x7D, 0x5D):  # } ]
            if top is None or top.is_object != (char == 0x7D) or (top.is_object and top.expect_value):
                self.broken = True
                return
            self._stack.pop()
            if not self._stack:
                self._ended = True
                return
            parent = self._stack[-1]
            if parent.is_object:
                self._value_ended(chunk, after)
            elif self._capture is not None and self._capture_item and len(self._stack) == self._capture_depth:
                self._finish_capture(chunk, after)
        elif top is not None and top.is_object and not top.expect_value:  # the colon after a key
            top.key, self._candidate_key = self._candidate_key, None
            top.expect_value, top.literal = True, False
            if self._capture is None and top.path is not None and top.key is not None \
                    and (*top.path, top.key) in self.keep:
                self._start_capture(after, False, (*top.path, top.key))
        else:
            self.broken = True  # a colon where none can be

    def _item_starts(self, array: _Container, start: int, counted: bool) -> None:
        """An item of `array` starts at `start`: a string, or an object or array (`counted`)."""
        if array.path is None:
            return
        if counted:
            self.counts[array.path] = self.counts.get(array.path, 0) + 1
        if self._capture is None and array.path in self.keep_items:
            self._start_capture(start, True, array.path)

    def _string_rest(self, chunk: bytes, at: int) -> int:
        """Read on inside a string from `at`; where it ends, or the chunk's end (still inside)."""
        start = at
        if self._escape_pending:  # the chunk starts with the byte a backslash at the end of the last escaped
            self._escape_pending = False
            at += 1
        found = _STRING_REST.match(chunk, at)
        end = found.end() if found is not None else len(chunk)
        if self._string_is_key and self._capture is None and len(self._string) < self.value_bytes_max:
            self._string += chunk[start:end - 1 if found is not None else end]
        if found is None:  # the string goes on past this chunk
            tail = chunk[at:]
            self._escape_pending = (len(tail) - len(tail.rstrip(b"\\"))) % 2 == 1
            return end
        self._in_string = False
        return end

    def _string_ended(self, chunk: bytes, after: int) -> None:
        top = self._stack[-1] if self._stack else None
        if top is None:
            return
        if self._string_is_key:
            self._candidate_key = None
            if self._capture is None and len(self._string) < self.value_bytes_max:
                try:
                    self._candidate_key = json.loads(b'"' + bytes(self._string) + b'"')
                except ValueError:
                    pass
        elif top.is_object:
            self._value_ended(chunk, after)
        elif self._capture is not None and self._capture_item and len(self._stack) == self._capture_depth:
            self._finish_capture(chunk, after)

    def _value_ended(self, chunk: bytes, at: int, literal: bool = False) -> None:
        """The value of the top object's current key ended at `at`."""
        top = self._stack[-1]
        top.expect_value, top.literal = False, False
        if self._capture is not None and not self._capture_item and len(self._stack) == self._capture_depth:
            self._finish_capture(chunk, at, literal)

    def _start_capture(self, at: int, item: bool, path: Path) -> None:
        self._capture, self._capture_item, self._capture_path = bytearray(), item, path
        self._capture_depth = len(self._stack)
        self._captured_from = at

    def _add_to_capture(self, chunk: bytes, end: int) -> None:
        if self._capture is not None:
            if len(self._capture) + end - self._captured_from > self.value_bytes_max:
                if self._capture_item:  # an item too large to keep: its type stays (a generated image's call)
                    kind = _top_level_type(bytes(self._capture) + chunk[self._captured_from:end])
                    if kind is not None:
                        self.items.setdefault(self._capture_path, []).append({"type": kind})
                self._capture = None  # read past like anything not kept
            else:
                self._capture += chunk[self._captured_from:end]
        self._captured_from = end

    def _finish_capture(self, chunk: bytes, end: int, literal: bool = False) -> None:
        self._add_to_capture(chunk, end)
        raw, self._capture = self._capture, None
        if raw is None:
            return
        if literal:
            raw = bytearray(raw.strip(_WHITESPACE).rstrip(b",").rstrip(_WHITESPACE))
        try:
            value = json.loads(bytes(raw))
        except (ValueError, RecursionError):
            return
        if self._capture_item:
            self.items.setdefault(self._capture_path, []).append(value)
        else:
            self.values[self._capture_path] = value


_TYPE_VALUE = re.compile(rb'\s*:\s*"((?:[^"\\]|\\.){1,64})"')


def _top_level_type(raw: bytes) -> str | None:
    """The `type` key's string value of the object these bytes begin (a key of the object itself, not of
    one inside it), when it comes in them."""
    depth, at = 0, 0
    while True:
        found = _STRUCTURE.search(raw, at)
        if found is None:
            return None
        char, at = raw[found.start()], found.end()
        if char == 0x22:  # "
            rest = _STRING_REST.match(raw, at)
            if rest is None:
                return None
            text, at = raw[at:rest.end() - 1], rest.end()
            value = _TYPE_VALUE.match(raw, at) if depth == 1 and text == b"type" else None
            if value is not None:
                try:
                    kind = json.loads(b'"' + value.group(1) + b'"')
                except ValueError:
                    return None
                return kind if isinstance(kind, str) else None
        elif char in (0x7B, 0x5B):  # { [
            depth += 1
        elif char in (0x7D, 0x5D):  # } ]
            depth -= 1


def _put(data: dict[str, Any], path: Path, value: Any) -> None:
    for key in path[:-1]:
        inner = data.get(key)
        if not isinstance(inner, dict):
            inner = data[key] = {}
        data = inner
    data[path[-1]] = value
