"""Slow and greedy clients, bounded at the HTTP protocol, below the app.

uvicorn (httptools) bounds none of these by itself:

- a connection that sends nothing is held forever (its keep-alive timer starts only after a response);
- request headers may trickle in forever, and grow without limit;
- once the app has answered (a 408 for a stalled body, a 401 before the body was read), every byte the client
  still trickles cancels the keep-alive timer, so the rest of a body sent one byte at a time holds the
  connection forever.

:class:`GuardedHttpToolsProtocol` is uvicorn's httptools protocol plus :class:`ClientLimits`:

- **idle**: a new connection gets uvicorn's keep-alive timeout (``keep_alive_timeout_s``) to start a request;
- **read deadline**: a request's headers *and* body must arrive within ``request_read_timeout_s`` of its first
  byte. Past it, a request nobody answered yet gets a 408 in OpenAI's error shape and the connection is closed;
  one already answered is closed (after its response, if that is still being sent);
- **header size**: more than ``max_header_bytes`` before the end of the headers is answered 431 and closed;
- **per address**: a client address holding ``max_connections_per_client`` connections has further ones
  closed at once, before anything is read (0: no cap). Behind a load balancer every client shares its address:
  raise the cap or set 0 there.

Each closure is counted in ``fama_client_closures_total{reason}``. The limits reach the protocol through the
app's lifespan state (:data:`STATE_KEY`), so one :class:`~proxy.settings.ProxySettings` configures both; a
server whose app provides no limits behaves as plain uvicorn. The body size cap (413) stays in the app
(:func:`proxy.edge.inbound.read_body`), where the route decides what a body may be.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any, Final

import orjson
from prometheus_client import Counter as PromCounter
from uvicorn.config import Config
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from uvicorn.server import ServerState

from proxy.errors import error_body
from proxy.metrics import ProxyMetrics
from proxy.settings import ProxySettings

logger = logging.getLogger("fama.proxy.limits")

STATE_KEY: Final = "client_limits"  # the key in the lifespan state (proxy.edge.deps.ProxyState)
PROTOCOL = "proxy.edge.limits:GuardedHttpToolsProtocol"  # uvicorn's ``http`` option (importable by workers)


def _answer(status: HTTPStatus, message: str, code: str) -> bytes:
    body = orjson.dumps(error_body(message, "invalid_request_error", None, code))
    head = (
        f"HTTP/1.1 {status.value} {status.phrase}\r\ncontent-type: application/json\r\n"
        f"content-length: {len(body)}\r\nconnection: close\r\n\r\n"
    )
    return head.encode() + body


@dataclass
class ClientLimits:
    """What one client connection may hold, and the count of connections per client address (one process)."""

    request_read_timeout_s: float
    max_header_bytes: int
    max_connections_per_client: int
    closures: PromCounter
    _open: Counter[str] = field(default_factory=Counter)

    def admit(self, address: str) -> bool:
        if self.max_connections_per_client and self._open[address] >= self.max_connections_per_client:
            self.closures.labels("per_client_cap").inc()
            return False
        self._open[address] += 1
        return True

    def release(self, address: str) -> None:
        self._open[address] -= 1
        if self._open[address] <= 0:
            del self._open[address]


def client_limits(settings: ProxySettings, metrics: ProxyMetrics) -> ClientLimits:
    return ClientLimits(
        request_read_timeout_s=settings.request_read_timeout_s,
        max_header_bytes=settings.max_header_bytes,
        max_connections_per_client=settings.max_connections_per_client,
        closures=metrics.client_closures,
    )


class GuardedHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with the limits of :class:`ClientLimits` (see the module docstring)."""

    def __init__(
        self,
        config: Config,
        server_state: ServerState,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        super().__init__(config, server_state, app_state, _loop)
        limits = app_state.get(STATE_KEY)
        self._limits: ClientLimits | None = limits if isinstance(limits, ClientLimits) else None
        self._address: str | None = None  # counted against the per-address cap
        self._deadline: asyncio.TimerHandle | None = None
        self._reading_headers = False
        self._header_bytes = 0

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if self._limits is None:
            return
        if self.client is not None:
            if not self._limits.admit(self.client[0]):
                logger.debug("closed a connection from %s: per-client connection cap", self.client[0])
                transport.close()
                return
            self._address = self.client[0]
        # The idle limit uvicorn applies between requests, applied before the first one as well.
        self.timeout_keep_alive_task = self.loop.call_later(self.timeout_keep_alive, self.timeout_keep_alive_handler)

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        if self._address is not None and self._limits is not None:
            self._limits.release(self._address)
            self._address = None
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self._limits is None or not self._reading_headers or self.transport.is_closing():
            return
        self._header_bytes += len(data)
        if self._header_bytes > self._limits.max_header_bytes:
            self._limits.closures.labels("headers_too_large").inc()
            too_large = HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE
            self._refuse(too_large, "the request headers are too large", "headers_too_large")

    def on_message_begin(self) -> None:
        super().on_message_begin()
        if self._limits is None:
            return
        self._reading_headers = True
        self._header_bytes = 0
        self._disarm()
        self._deadline = self.loop.call_later(self._limits.request_read_timeout_s, self._read_deadline_passed)

    def on_headers_complete(self) -> None:
        self._reading_headers = False
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self._disarm()

    def _unsupported_upgrade_warning(self) -> None:
        # uvicorn warns (twice, suggesting a WebSocket library) on every upgrade request when WebSockets are off;
        # the proxy serves none, so such a request is plain HTTP (a 404) and any client could flood the log.
        logger.debug("upgrade request answered as plain HTTP (no WebSocket routes)")

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _read_deadline_passed(self) -> None:
        self._deadline = None
        if self._limits is None or self.transport.is_closing():
            return
        self._limits.closures.labels("read_deadline").inc()
        cycle = self.cycle
        if self._reading_headers and cycle is not None and not cycle.response_complete:
            cycle.keep_alive = False  # an earlier (pipelined) request's answer is still going out: close after it
            return
        if cycle is None or self._reading_headers or not cycle.response_started:
            timeout = self._limits.request_read_timeout_s
            self._refuse(
                HTTPStatus.REQUEST_TIMEOUT, f"the request was not received within {timeout:g}s", "request_timeout"
            )
        elif not cycle.response_complete:
            cycle.keep_alive = False  # answered while the body still trickles: close once the answer is out
        else:
            self.transport.close()

    def _refuse(self, status: HTTPStatus, message: str, code: str) -> None:
        """Answer in place of the app and close; the app, if it runs, sees a disconnect from now on."""
        cycle = self.cycle
        if cycle is not None and not cycle.response_complete:
            cycle.disconnected = True
            cycle.message_event.set()
            if cycle.response_started:  # an answer is half sent: nothing more can be said on this connection
                self.transport.close()
                return
        self.transport.write(_answer(status, message, code))
        self.transport.close()
