"""uvicorn's HTTP/1.1 protocol (h11) with a deadline for a request's headers.

uvicorn times out an idle kept-alive connection, but not one that is sending its headers: each
byte it receives cancels the keep-alive timer, so a client that sends a header line every few
seconds (slowloris) holds its connection for ever. Here a connection that has not sent a whole
request head within `timeout` seconds of opening, or of its previous response, is closed. The
body has its own deadline (tools/server/app.py: 408).
"""
from uvicorn.protocols.http.h11_impl import H11Protocol


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
