"""AWS's event stream encoding (application/vnd.amazon.eventstream): how Amazon Bedrock streams a reply
(ConverseStream, InvokeModelWithResponseStream), binary messages instead of SSE lines.

One message:
    total length (4 bytes, big-endian, the whole message) | headers length (4) | CRC32 of those 8 bytes (4)
    | headers | payload | CRC32 of everything before it (4)
A header: name length (1) | name (UTF-8) | value type (1) | value (type 7, a string: length (2) | UTF-8).
Bedrock's messages carry `:message-type` (event | exception), `:event-type` (messageStart, contentBlockDelta,
metadata... or chunk) and `:content-type`; each payload is one JSON object.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass

PRELUDE_BYTES = 12
MESSAGE_BYTES_MIN = PRELUDE_BYTES + 4
MESSAGE_BYTES_MAX = 16 * 1024 * 1024  # AWS's own bound on one message
_STRING = 7
# the sizes of the header values a reader skips (only strings are read): bool true/false, byte, short, int,
# long, bytes (2-byte length), string (2-byte length), timestamp, uuid
_FIXED = {0: 0, 1: 0, 2: 1, 3: 2, 4: 4, 5: 8, 8: 8, 9: 16}
_PRELUDE = struct.Struct(">II")


@dataclass(frozen=True)
class Message:
    headers: dict[str, str]  # the string-valued headers
    payload: bytes


class EventStreamError(ValueError):
    pass


def _headers(data: bytes) -> dict[str, str]:
    headers: dict[str, str] = {}
    at = 0
    while at < len(data):
        size = data[at]
        name = data[at + 1:at + 1 + size].decode("utf-8", "replace")
        at += 1 + size
        if at >= len(data):
            raise EventStreamError("a header without its value")
        kind = data[at]
        at += 1
        if kind in (6, _STRING):
            if at + 2 > len(data):
                raise EventStreamError("a header's value cut short")
            (length,) = struct.unpack_from(">H", data, at)
            value = data[at + 2:at + 2 + length]
            if len(value) != length:
                raise EventStreamError("a header's value cut short")
            if kind == _STRING:
                headers[name] = value.decode("utf-8", "replace")
            at += 2 + length
        elif kind in _FIXED:
            at += _FIXED[kind]
        else:
            raise EventStreamError(f"a header of unknown type {kind}")
    if at != len(data):
        raise EventStreamError("a header's value cut short")
    return headers


class Decoder:
    """Reads messages out of a stream's bytes as they arrive, however they are split."""

    def __init__(self) -> None:
        self._buffer = bytearray()

    @property
    def pending(self) -> int:
        """Bytes of a message not yet whole."""
        return len(self._buffer)

    def feed(self, chunk: bytes) -> list[Message]:
        """The messages `chunk` completes; raises EventStreamError on bytes that are not this encoding."""
        self._buffer += chunk
        messages = []
        while len(self._buffer) >= PRELUDE_BYTES:
            total, headers_length = _PRELUDE.unpack_from(self._buffer)
            (prelude_crc,) = struct.unpack_from(">I", self._buffer, 8)
            if zlib.crc32(bytes(self._buffer[:8])) != prelude_crc:
                raise EventStreamError("a message's prelude fails its checksum")
            if not MESSAGE_BYTES_MIN <= total <= MESSAGE_BYTES_MAX or headers_length > total - MESSAGE_BYTES_MIN:
                raise EventStreamError(f"a message of {total} bytes")
            if len(self._buffer) < total:
                break
            whole = bytes(self._buffer[:total])
            del self._buffer[:total]
            (message_crc,) = struct.unpack_from(">I", whole, total - 4)
            if zlib.crc32(whole[:-4]) != message_crc:
                raise EventStreamError("a message fails its checksum")
            headers = _headers(whole[PRELUDE_BYTES:PRELUDE_BYTES + headers_length])
            messages.append(Message(headers, whole[PRELUDE_BYTES + headers_length:-4]))
        return messages


def encode(headers: dict[str, str], payload: bytes) -> bytes:
    """One message with string headers (what Bedrock sends; the mock provider and tests use it)."""
    encoded = b"".join(bytes([len(name.encode())]) + name.encode() + bytes([_STRING])
                       + struct.pack(">H", len(value.encode())) + value.encode() for name, value in headers.items())
    total = PRELUDE_BYTES + len(encoded) + len(payload) + 4
    prelude = _PRELUDE.pack(total, len(encoded))
    prelude += struct.pack(">I", zlib.crc32(prelude))
    body = prelude + encoded + payload
    return body + struct.pack(">I", zlib.crc32(body))
