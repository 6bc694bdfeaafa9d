"""What a client may send: a request's head within a deadline, its body within a size and a
deadline. A client that sends slowly holds a connection and its memory for as long as it is let.

The head: uvicorn times out an idle kept-alive connection, but not one that is sending its
headers: each byte it receives cancels the keep-alive timer, so a client that sends a header
line every few seconds (slowloris) holds its connection for ever. with_header_timeout's protocol
closes a connection that has not sent a whole request head within `timeout` seconds of opening,
or of its previous response. The body: read_body (413 past MAX_BODY_BYTES, 408 past its time).
"""
import asyncio

from uvicorn.protocols.http.h11_impl import H11Protocol

MAX_BODY_BYTES = 16 << 20  # a full 128k-token context as text is ~0.5 MB; as token ids in JSON ~1 MB


def with_header_timeout(timeout: float):
    """An H11Protocol class (uvicorn.Config(http=...)) closing connections slow to send headers."""

    class HeaderTimeoutProtocol(H11Protocol):
        header_timer = None

        def connection_made(self, transport):
            super().connection_made(transport)
            self._arm()

        def handle_events(self):
            cycle = self.cycle
            super().handle_events()
            if self.cycle is not cycle and self.header_timer is not None:  # a whole request head came
                self.header_timer.cancel()
                self.header_timer = None

        def on_response_complete(self):
            super().on_response_complete()
            if not self.transport.is_closing():
                self._arm()  # the next request on this connection gets its own deadline

        def connection_lost(self, exc):
            if self.header_timer is not None:
                self.header_timer.cancel()
            super().connection_lost(exc)

        def _arm(self):
            if self.header_timer is not None:
                self.header_timer.cancel()
            self.header_timer = self.loop.call_later(timeout, self._expire)

        def _expire(self):
            self.header_timer = None
            if self.cycle is None or self.cycle.response_complete:  # still waiting for a request head
                self.transport.close()

    return HeaderTimeoutProtocol


class BodyTooLarge(Exception):
    """A body past MAX_BODY_BYTES: 413."""


class BodyTimeout(Exception):
    """A body slower than its deadline: 408."""


async def read_body(request, timeout: float) -> bytes:
    """The request body, refused past MAX_BODY_BYTES (by its Content-Length before reading, or as
    it arrives) and cut off when it takes more than `timeout` seconds to arrive (a slow client
    holds a connection and its memory for as long as it is let)."""
    too_large = BodyTooLarge(f"the body is larger than {MAX_BODY_BYTES >> 20} MiB")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        raise too_large

    async def read() -> bytes:
        parts, size = [], 0
        async for part in request.stream():
            size += len(part)
            if size > MAX_BODY_BYTES:
                raise too_large
            parts.append(part)
        return b"".join(parts)
    try:
        return await asyncio.wait_for(read(), timeout)
    except asyncio.TimeoutError:
        raise BodyTimeout(f"the body took more than {timeout:g} s to arrive") from None
