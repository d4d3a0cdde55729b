"""A provider that streams like a real one: a chat completion of EVENTS server-sent events, each its
own HTTP chunk (one write, one flush), GAP_MS apart, then the usage event and [DONE]. Envoy passes
each chunk on as it comes, so a filter that reads the response sees one message per event.

    python -m bench.sse_provider PORT EVENTS GAP_MS
"""

from __future__ import annotations

import asyncio
import json
import sys

try:
    import uvloop
except ImportError:  # pragma: no cover
    uvloop = None


def _chunk(text: str) -> bytes:
    data = text.encode()
    return f"{len(data):x}\r\n".encode() + data + b"\r\n"


def serve(port: int, events: int, gap_ms: float) -> None:
    delta = {"id": "chatcmpl-bench", "object": "chat.completion.chunk", "created": 0, "model": "gpt-4o-mini",
             "choices": [{"index": 0, "delta": {"content": " token"}, "finish_reason": None}]}
    usage = {**delta, "choices": [], "usage": {"prompt_tokens": 12, "completion_tokens": events,
                                               "total_tokens": 12 + events}}
    event = _chunk(f"data: {json.dumps(delta)}\n\n")
    end = _chunk(f"data: {json.dumps(usage)}\n\n") + _chunk("data: [DONE]\n\n") + b"0\r\n\r\n"
    head = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                request = await reader.readuntil(b"\r\n\r\n")
                length = next((int(line.split(b":", 1)[1]) for line in request.split(b"\r\n")
                               if line.lower().startswith(b"content-length:")), 0)
                await reader.readexactly(length)
                writer.write(head)
                for _ in range(events):
                    writer.write(event)
                    await writer.drain()
                    await asyncio.sleep(gap_ms / 1000)
                writer.write(end)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, RuntimeError):
            writer.close()

    async def main() -> None:
        server = await asyncio.start_server(answer, "127.0.0.1", port)
        await server.serve_forever()

    if uvloop is not None:
        uvloop.install()
    asyncio.run(main())


if __name__ == "__main__":
    serve(int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3]))
