"""What an audio file's own header says of its length, where it says it exactly (WAV)."""

from __future__ import annotations

import struct

CHUNKS_MAX = 64  # chunks looked at before the audio's data chunk


def wav_seconds(data: bytes) -> int:
    """The seconds of a RIFF/WAVE file's audio, rounded up, or 0 when `data` is not one (or its header
    makes no sense): the audio data's bytes (as many as the file holds) over the format's bytes a second."""
    if len(data) < 12 or data[:4] != b"RIFF" or data[8:12] != b"WAVE":
        return 0
    at, byte_rate = 12, 0
    for _ in range(CHUNKS_MAX):
        if at + 8 > len(data):
            return 0
        chunk, size = data[at:at + 4], struct.unpack_from("<I", data, at + 4)[0]
        if chunk == b"fmt " and size >= 16 and at + 24 <= len(data):
            byte_rate = struct.unpack_from("<I", data, at + 16)[0]
        elif chunk == b"data":
            if byte_rate <= 0:
                return 0
            held = min(size, len(data) - at - 8)  # a header written before the length was known says more
            return -(-held // byte_rate)
        at += 8 + size + (size & 1)
    return 0
