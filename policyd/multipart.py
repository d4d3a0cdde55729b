"""multipart/form-data bodies (RFC 7578), as speech-to-text requests send their audio and fields.

`MultipartForm.parse` reads the parts; `with_field` replaces one field's value (a downgrade's model)
and `encoded` writes the body again with the client's own boundary and part headers, every other
byte as it came.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace

_BOUNDARY = re.compile(r'boundary=(?:"([^"]{1,70})"|([^;\s"]{1,70}))', re.IGNORECASE)
_NAME = re.compile(rb'[; ]name="([^"]*)"', re.IGNORECASE)
_FILENAME = re.compile(rb'filename="([^"]*)"', re.IGNORECASE)
PARTS_MAX = 64


class MultipartError(ValueError):
    """The body is not the multipart/form-data its content type says."""


@dataclass(frozen=True)
class Part:
    headers: bytes  # as sent, without the blank line that ends them
    name: str
    filename: str | None  # None for a plain field
    content: bytes


@dataclass(frozen=True)
class MultipartForm:
    boundary: bytes
    parts: tuple[Part, ...]

    @staticmethod
    def boundary_of(content_type: str) -> str | None:
        """The boundary of a multipart/form-data content type, or None for any other type."""
        if not content_type.lower().lstrip().startswith("multipart/form-data"):
            return None
        found = _BOUNDARY.search(content_type)
        return (found.group(1) or found.group(2)) if found else None

    @classmethod
    def parse(cls, body: bytes, boundary: str) -> "MultipartForm":
        delimiter = b"--" + boundary.encode("latin-1")
        at = body.find(delimiter)
        if at < 0:
            raise MultipartError("the body holds no part of its multipart boundary")
        parts: list[Part] = []
        while True:
            at += len(delimiter)
            if body[at:at + 2] == b"--":
                return cls(delimiter[2:], tuple(parts))
            if body[at:at + 2] != b"\r\n":
                raise MultipartError("a multipart boundary is not followed by a line break")
            head_end = body.find(b"\r\n\r\n", at + 2)
            if head_end < 0:
                raise MultipartError("a multipart part has no end of its headers")
            headers = body[at + 2:head_end]
            end = body.find(b"\r\n" + delimiter, head_end + 4)
            if end < 0:
                raise MultipartError("the multipart body ends before its closing boundary")
            name = _NAME.search(b" " + headers)
            if name is None:
                raise MultipartError("a multipart part has no name")
            filename = _FILENAME.search(headers)
            parts.append(Part(headers, name.group(1).decode("utf-8", "replace"),
                              filename.group(1).decode("utf-8", "replace") if filename else None,
                              body[head_end + 4:end]))
            if len(parts) > PARTS_MAX:
                raise MultipartError(f"the multipart body has more than {PARTS_MAX} parts")
            at = end + 2

    def field(self, name: str) -> str | None:
        """A plain field's value as text (the first of that name), or None."""
        for part in self.parts:
            if part.name == name and part.filename is None:
                return part.content.decode("utf-8", "replace")
        return None

    def file(self, name: str) -> Part | None:
        for part in self.parts:
            if part.name == name and part.filename is not None:
                return part
        return None

    def with_field(self, name: str, value: str) -> "MultipartForm":
        """The form with the value of plain field `name` replaced (every field of that name), or added first
        when it has none (a model the provider would otherwise default)."""
        if self.field(name) is None:
            added = Part(f'Content-Disposition: form-data; name="{name}"'.encode(), name, None, value.encode())
            return replace(self, parts=(added, *self.parts))
        return replace(self, parts=tuple(replace(p, content=value.encode()) if p.name == name and p.filename is None
                                         else p for p in self.parts))

    def encoded(self) -> bytes:
        delimiter = b"--" + self.boundary
        out = [delimiter + b"\r\n" + p.headers + b"\r\n\r\n" + p.content + b"\r\n" for p in self.parts]
        return b"".join(out) + delimiter + b"--\r\n"
