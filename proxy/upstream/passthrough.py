"""Relaying a request the proxy has no route of its own for: bytes both ways, streamed, headers filtered.

The request body goes to the upstream as the client sends it and the response body comes back as the upstream
sends it, chunk by chunk, so memory stays bounded for uploads, downloads and streams alike. Headers pass except the
hop-by-hop ones (RFC 9110 §7.6.1 and those the ``Connection`` header names); ``authorization`` follows the
upstream key rules of :meth:`~proxy.upstream.client.Upstream.headers`.

An error status becomes :class:`~proxy.errors.UpstreamError` (status kept, body in OpenAI's shape), like on every
other route; transport failures are 502/504.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterable, AsyncIterator, Iterable
from dataclasses import dataclass

from yarl import URL

from proxy.errors import UpstreamStreamError, UpstreamTimeout, UpstreamUnreachable
from proxy.tracing import Trace
from proxy.upstream.client import Response, TransportError, Upstream, close

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
    _response: Response
    _upstream: Upstream
    _trace: Trace
    _started: float

    async def body(self) -> AsyncIterator[bytes]:
        """The body as it arrives; a failure mid-way is :class:`UpstreamStreamError`."""
        try:
            async for part in self._response.content.iter_any():
                yield part
        except TimeoutError as exc:
            self._upstream.count_error("timeout")
            raise UpstreamStreamError("the upstream model server stopped answering mid-response") from exc
        except TransportError as exc:
            self._upstream.count_error("stream")
            raise UpstreamStreamError(f"the upstream connection failed mid-response ({type(exc).__name__})") from exc

    @property
    def request_id(self) -> str:
        return self._trace.request_id

    def close(self) -> None:
        if not self._response.closed:
            close(self._response)
            self._trace.upstream_s += time.perf_counter() - self._started


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
    raw_path: str,
    client_headers: Iterable[tuple[str, str]],
    trace: Trace,
    body: AsyncIterable[bytes] | None,
) -> Relayed:
    """Send ``method raw_path`` (relative to the upstream's base URL, already percent-encoded, with its query) and
    return the answer once its headers are in."""
    url = URL(upstream.base_url + raw_path, encoded=True)
    started = time.perf_counter()
    try:
        response = await upstream.session.request(
            method,
            url,
            headers=_upstream_headers(upstream, client_headers, trace),
            data=body,
            # A relay relays: a redirect goes back to the client, and nothing here decodes the body.
            allow_redirects=False,
            auto_decompress=False,
        )
    except TimeoutError as exc:
        trace.upstream_s += time.perf_counter() - started
        upstream.count_error("timeout")
        raise UpstreamTimeout(f"the upstream model server did not answer in time ({type(exc).__name__})") from exc
    except TransportError as exc:
        trace.upstream_s += time.perf_counter() - started
        upstream.count_error("connect")
        raise UpstreamUnreachable(f"cannot reach the upstream model server ({type(exc).__name__})") from exc
    if response.status >= 400:
        try:
            await upstream.raise_status(response)
        finally:
            trace.upstream_s += time.perf_counter() - started
    headers = end_to_end(((name, value) for name, value in response.headers.items()), _OWN_RESPONSE)
    return Relayed(response.status, headers, response, upstream, trace, started)
