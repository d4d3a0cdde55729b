"""The usage event of a stream whose client did not ask for it, kept from that client.

policyd asks every streamed chat and text completion for its usage (`stream_options.include_usage`), so
that each is charged exactly as the provider counted it. A provider asked so ends the stream with one more
event, its `choices` empty and the usage in it. A client that did not ask for it may not expect it: the
OpenAI quickstart's `chunk.choices[0].delta.content` fails on it (IndexError), as do clients that read the
first choice of every chunk. So where the client did not ask (no `include_usage: true` of its own), that
event is read by policyd as it passes and taken out of what the client receives; every other byte passes as
the provider sent it, in the order sent. A usage that rides on a chunk with choices (some providers put it
on the last one) is left where it is: clients read such a chunk.

The Envoy gateway does the same in its Lua filter (`policyd/gateway_lua/unasked_usage.lua`, inlined in the
config); the ASGI middleware uses `UnaskedUsage` here.
"""

from __future__ import annotations

import json
import re

_BOUNDARY = re.compile(rb"\r\n\r\n|\n\n|\r\r")  # an event ends at a blank line (SSE: CRLF, LF or CR)
_USAGE = re.compile(rb'"usage"\s*:\s*\{')
_NO_CHOICES = re.compile(rb'"choices"\s*:\s*\[\s*\]')


def applies(content_type: str, content_encoding: str) -> bool:
    """Whether a reply's events can be seen to take one out: a stream (text/event-stream) as it is, not
    compressed anyway (policyd asks for it uncompressed; one compressed passes as sent). Where it applies, the
    reply's content-length, if it gives one, goes: the body shrinks."""
    return content_type.startswith("text/event-stream") and content_encoding in ("", "identity")


def usage_only(event: bytes) -> bool:
    """Whether an SSE event is the usage alone: `choices` empty, `usage` an object."""
    if not (_USAGE.search(event) and _NO_CHOICES.search(event)):
        return False
    data = b"".join(line[5:].lstrip(b" ") for line in event.splitlines() if line.startswith(b"data:"))
    try:
        chunk = json.loads(data)
    except ValueError:
        return False
    return isinstance(chunk, dict) and chunk.get("choices") == [] and isinstance(chunk.get("usage"), dict)


class UnaskedUsage:
    """A stream's bytes as its client gets them: `feed` each piece as it arrives, send what it returns,
    then send what `finish` returns. An event is held only until its end arrives."""

    def __init__(self) -> None:
        self._pending = b""

    def feed(self, piece: bytes) -> bytes:
        data = self._pending + piece
        out: list[bytes] = []
        start = 0
        for boundary in _BOUNDARY.finditer(data):
            event = data[start:boundary.end()]
            if not usage_only(event):
                out.append(event)
            start = boundary.end()
        self._pending = data[start:]
        return b"".join(out)

    def finish(self) -> bytes:
        """What is left when the stream ends: an event without its blank line passes as it came."""
        rest, self._pending = self._pending, b""
        return b"" if usage_only(rest) else rest
