"""Relaying a request the proxy has no route of its own for: bytes both ways, streamed, headers filtered.

The request body goes to the upstream as the client sends it and the response body comes back as the upstream
sends it, chunk by chunk, so memory stays bounded for uploads, downloads and streams alike. Headers pass except the
hop-by-hop ones (RFC 9110 §7.6.1 and those the ``Connection`` header names); ``authorization`` follows the
upstream key rules of :meth:`~proxy.upstream.client.Upstream.headers`.

An error status becomes :class:`~proxy.errors.UpstreamError` (status kept, body in OpenAI's shape), like on every
other route; transport failures are 502/504.
"""

from __future__ import annotations

from collections.abc import AsyncIterable, AsyncIterator, Iterable
from dataclasses import dataclass

from proxy.errors import UpstreamStreamError
from proxy.tracing import Trace
from proxy.upstream.client import Reply, TransportError, Upstream

# RFC 9110 §7.6.1, plus Proxy-Connection (still sent by some clients) and the end-to-end headers the proxy
# owns on each leg: the host, its own request id, the upstream key, `expect` (the proxy's server answers it).
HOP_BY_HOP = frozenset(
    {"connection", "proxy-connection", "keep-alive", "te", "trailer", "transfer-encoding", "upgrade"}
)
_OWN_REQUEST = frozenset({"host", "authorization", "x-request-id", "expect"})
_OWN_RESPONSE = frozenset({"x-request-id", "server", "date"})


def end_to_end(headers: Iterable[tuple[str, str]], also_drop: frozenset[str] = frozenset()) -> list[tuple[str, str]]:
    """``headers`` without the hop-by-hop ones: the fixed list and every name the ``Connection`` header lists."""
    pairs = [(name.lower(), value) for name, value in headers]
    named = {
        token.strip().lower()
        for name, value in pairs
        if name in ("connection", "proxy-connection")
        for token in value.split(",")
    }
    return [
        (name, value) for name, value in pairs if name not in HOP_BY_HOP and name not in named and name not in also_drop
    ]


@dataclass(slots=True)
class Relayed:
    """An upstream answer with its body still to come: relay ``body()``, then (or on any exit) ``close()``."""

    status: int
    headers: list[tuple[str, str]]
    request_id: str
    _reply: Reply
    _upstream: Upstream

    async def body(self) -> AsyncIterator[bytes]:
        """The body as it arrives; a failure mid-way is :class:`UpstreamStreamError`."""
        try:
            async for part in self._reply.parts():
                yield part
        except TimeoutError as exc:
            self._upstream.count_error("timeout")
            raise UpstreamStreamError("the upstream model server stopped answering mid-response") from exc
        except TransportError as exc:
            self._upstream.count_error("stream")
            raise UpstreamStreamError(f"the upstream connection failed mid-response ({type(exc).__name__})") from exc

    def close(self) -> None:
        self._reply.close()


def _upstream_headers(
    upstream: Upstream, client_headers: Iterable[tuple[str, str]], trace: Trace
) -> list[tuple[str, str]]:
    client = list(client_headers)
    authorization = next((value for name, value in client if name.lower() == "authorization"), None)
    own = upstream.headers(authorization, trace.request_id)
    headers = end_to_end(client, _OWN_REQUEST)
    headers.append(("x-request-id", own["x-request-id"]))
    if "authorization" in own:
        headers.append(("authorization", own["authorization"]))
    if not any(name == "accept-encoding" for name, _ in headers):  # else aiohttp asks for gzip the client may not read
        headers.append(("accept-encoding", "identity"))
    return headers


async def send(
    upstream: Upstream,
    method: str,
    target: str,
    client_headers: Iterable[tuple[str, str]],
    trace: Trace,
    body: AsyncIterable[bytes] | None,
) -> Relayed:
    """Send ``method target`` (the path and query below the upstream's base URL, percent-encoded as the client sent
    them) and return the answer once its headers are in."""
    reply = await upstream.relay(method, target, _upstream_headers(upstream, client_headers, trace), trace, body)
    return Relayed(reply.status, end_to_end(reply.header_items(), _OWN_RESPONSE), trace.request_id, reply, upstream)
