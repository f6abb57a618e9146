"""The model server behind the proxy: one pooled ``aiohttp.ClientSession``, opened and closed by the lifespan.

No aiohttp object leaves this package: a call answers with a :class:`Reply`, whose ``close`` is the one place
the upstream time of a successful call is added to the request's :class:`~proxy.tracing.Trace`. A test may hand
:class:`Upstream` its own session.

aiohttp rather than httpx2 because the upstream call is most of the proxy's own CPU per request: its
C-accelerated parser and connection pool cost a fraction of httpx2's per call (measured with ``fama bench``).

Every call has bounded waits (connect/read timeouts from settings). Transport failures become
:class:`~proxy.errors.UpstreamUnreachable` (502) or :class:`~proxy.errors.UpstreamTimeout` (504); an
error status becomes :class:`~proxy.errors.UpstreamError` with the upstream's status and a normalized body.

No answer is retried here: each attempt of a client is one upstream attempt. The official SDK already retries
connection errors, 408/409/429 and 5xx (twice by default, after ``retry-after``, which is passed through), so a
retry here would multiply its attempts. The one exception is a connection closed before any byte of an answer came
back (``ServerDisconnectedError``, or the request could not be written): the request is sent once more, on a new
connection, when its body is in memory. A pooled connection goes stale that way when the server ends it just as it
is reused; llama.cpp's server closes the connection after every streamed answer while advertising keep-alive, so
without this, the request that follows a stream within a few milliseconds would fail (``fama_upstream_errors_total
{kind="closed"}`` counts these). The only model calls the proxy makes by itself are supervision's
corrective retries, made before any byte of a tool call reached the client (:mod:`proxy.supervision.supervisor`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterable, AsyncIterator, Mapping
from typing import Any

import aiohttp
import orjson
from yarl import URL

from proxy.errors import UpstreamError, UpstreamTimeout, UpstreamUnreachable
from proxy.metrics import ProxyMetrics
from proxy.settings import ProxySettings
from proxy.tracing import Trace
from proxy.upstream import normalize

logger = logging.getLogger("fama.proxy.upstream")

# Headers of an upstream error that a client needs to back off properly.
_PASSED_HEADERS = ("retry-after", "retry-after-ms")
_MAX_ERROR_BYTES = 64 * 1024
MAX_BODY_BYTES = 64 * 1024 * 1024  # a non-streamed answer held in memory at once

# aiohttp raises these for a failed connection or body; its timeouts are ``TimeoutError`` subclasses.
TransportError = aiohttp.ClientError


class Reply:
    """A successful upstream response whose body is not read yet. :meth:`close` gives the connection back to the
    pool when the body was read to its end, otherwise closes it, which is what cancels the request on the upstream
    (client disconnect, or an answer cut short), and adds the time since the request was sent to the trace."""

    __slots__ = ("_response", "_started", "_trace", "closed")

    def __init__(self, response: aiohttp.ClientResponse, trace: Trace, started: float) -> None:
        self._response = response
        self._trace = trace
        self._started = started
        self.closed = False

    @property
    def content_type(self) -> str:
        return self._response.headers.get("content-type", "application/json")

    @property
    def status(self) -> int:
        return self._response.status

    def header_items(self) -> list[tuple[str, str]]:
        """Every header as sent, repeated ones (``set-cookie``) included."""
        return list(self._response.headers.items())

    def parts(self) -> AsyncIterator[bytes]:
        """The body as it arrives; transport failures raise :data:`TransportError` or ``TimeoutError``."""
        return self._response.content.iter_any()

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        _release(self._response)
        _count(self._trace, self._started)


def _count(trace: Trace, started: float) -> None:
    trace.upstream_s += time.perf_counter() - started


class Upstream:
    def __init__(
        self, settings: ProxySettings, metrics: ProxyMetrics, session: aiohttp.ClientSession | None = None
    ) -> None:
        """Build inside the running event loop (the app's lifespan): the session belongs to it. A given
        ``session`` (tests) is used as it is and left open by :meth:`aclose`."""
        self.base_url = settings.upstream_url
        self._key = settings.upstream_api_key.get_secret_value() if settings.upstream_api_key else None
        self._auth = f"Bearer {self._key}" if self._key is not None else None
        self._metrics = metrics
        self._errors = {kind: metrics.upstream_errors.labels(kind) for kind in _ERROR_KINDS}
        self._owns_session = session is None
        self._fresh: aiohttp.ClientSession | None = None  # no pooling: where a request goes after a stale connection
        if session is not None:
            self.session = session
            self._urls: dict[str, str] = {}
            return
        connector = aiohttp.TCPConnector(
            limit=settings.max_upstream_connections,
            limit_per_host=settings.max_upstream_connections,
            # Below the 5 s idle limit of uvicorn (vLLM) and llama.cpp server: a POST is not retried, so a pooled
            # connection must never be reused just as the server closes it.
            keepalive_timeout=4.0,
        )
        # ``connect`` covers waiting for a pooled connection too (httpx2's pool timeout); ``sock_read`` is the
        # longest silence between bytes, so a long generation that keeps streaming is never cut.
        timeout = aiohttp.ClientTimeout(
            total=None, connect=settings.connect_timeout_s, sock_read=settings.read_timeout_s
        )
        self.session = aiohttp.ClientSession(
            connector=connector, timeout=timeout, trust_env=False, raise_for_status=False
        )
        self._urls = {}

    async def aclose(self) -> None:
        if self._owns_session:
            await self.session.close()
        if self._fresh is not None:
            await self._fresh.close()

    def _fresh_session(self) -> aiohttp.ClientSession:
        if self._fresh is None:
            self._fresh = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(force_close=True),
                timeout=self.session.timeout,
                trust_env=False,
                raise_for_status=False,
            )
        return self._fresh

    def headers(self, client_authorization: str | None, request_id: str) -> dict[str, str]:
        headers = {"content-type": "application/json", "x-request-id": request_id}
        if self._auth is not None:
            headers["authorization"] = self._auth
        elif client_authorization:
            headers["authorization"] = client_authorization
        return headers

    def _url(self, path: str) -> str:
        url = self._urls.get(path)
        if url is None:
            url = self.base_url + path
            if len(self._urls) < 256:  # paths are route constants plus model ids: bounded in practice, capped anyway
                self._urls[path] = url
        return url

    async def open(
        self, method: str, path: str, headers: Mapping[str, str], trace: Trace, content: bytes | None = None
    ) -> Reply:
        """Send a request and return the response with its body not yet read; the caller closes it.

        An error status is read (bounded), closed and raised as :class:`UpstreamError`; the time spent
        until then is added to ``trace.upstream_s``.
        """
        started = time.perf_counter()
        try:
            return Reply(await self._open(method, self._url(path), headers, content), trace, started)
        except BaseException:
            _count(trace, started)
            raise

    async def relay(
        self,
        method: str,
        target: str,
        headers: list[tuple[str, str]],
        trace: Trace,
        body: AsyncIterable[bytes] | None,
    ) -> Reply:
        """:meth:`open` for a request relayed as it came (:mod:`proxy.upstream.passthrough`): ``target`` is the path
        and query below the base URL, percent-encoded as the client sent them; the body is streamed; a redirect
        is the client's to follow; the answer's bytes stay as they are (no decompression)."""
        started = time.perf_counter()
        url = URL(self.base_url + target, encoded=True)
        try:
            response = await self._open(method, url, headers, body, as_is=True)
            return Reply(response, trace, started)
        except BaseException:
            _count(trace, started)
            raise

    async def _open(
        self,
        method: str,
        url: str | URL,
        headers: Mapping[str, str] | list[tuple[str, str]],
        content: bytes | AsyncIterable[bytes] | None,
        as_is: bool = False,
    ) -> aiohttp.ClientResponse:
        options: dict[str, Any] = {"allow_redirects": not as_is, "auto_decompress": False if as_is else None}
        try:
            try:
                response = await self.session.request(method, url, headers=headers, data=content, **options)
            except (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError) as exc:
                if isinstance(exc, aiohttp.ClientConnectorError) or not (content is None or isinstance(content, bytes)):
                    raise  # no connection at all, or a streamed body that cannot be sent again
                self._errors["closed"].inc()
                logger.debug("upstream closed the connection before answering (%s); sending once more", exc)
                fresh = self._fresh_session()
                response = await fresh.request(method, url, headers=headers, data=content, **options)
        except TimeoutError as exc:
            self._errors["timeout"].inc()
            raise UpstreamTimeout(f"the upstream model server did not answer in time ({type(exc).__name__})") from exc
        except TransportError as exc:
            self._errors["connect"].inc()
            raise UpstreamUnreachable(f"cannot reach the upstream model server ({type(exc).__name__})") from exc
        if response.status >= 400:
            await self._raise_status(response)
        return response

    def count_error(self, kind: str) -> None:
        """One more ``fama_upstream_errors_total{kind}`` (``timeout``, ``connect``, ``status_4xx``, ``status_5xx``,
        ``stream``, ``closed``)."""
        self._errors[kind].inc()

    async def _raise_status(self, response: aiohttp.ClientResponse) -> None:
        status = response.status
        self._errors["status_5xx" if status >= 500 else "status_4xx"].inc()
        try:
            raw = await read_bounded(response.content.iter_any(), _MAX_ERROR_BYTES)
        except (TransportError, TimeoutError):
            raw = b""
        finally:
            _release(response)
        payload: Any
        try:
            payload = orjson.loads(raw) if raw else None
        except orjson.JSONDecodeError:
            payload = raw.decode("utf-8", "replace")
        body = normalize.error_from_upstream(status, payload, response.reason or f"upstream error {status}")
        err = body["error"]
        if self._key and self._key in err["message"]:
            # Some servers quote the key they were sent; the operator's upstream key is not the client's to see.
            err["message"] = err["message"].replace(self._key, "[redacted]")
        headers = {k: v for k in _PASSED_HEADERS if (v := response.headers.get(k)) is not None}
        headers.update({k.lower(): v for k, v in response.headers.items() if k.lower().startswith("x-ratelimit-")})
        logger.debug("upstream answered %s: %s", status, err["message"])
        raise UpstreamError(
            err["message"], status=status, type_=err["type"], param=err["param"], code=err["code"], headers=headers
        )

    async def request_json(
        self, method: str, path: str, headers: Mapping[str, str], trace: Trace, content: bytes | None = None
    ) -> object:
        """A whole JSON request/response exchange; a body that is not JSON is a 502."""
        reply = await self.open(method, path, headers, trace, content)
        try:
            raw = await self.read(reply)
        finally:
            reply.close()
        try:
            return orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            self._errors["stream"].inc()
            raise UpstreamUnreachable("the upstream model server answered with a body that is not JSON") from exc

    async def read(self, reply: Reply) -> bytes:
        """The whole body of a successful response, up to ``MAX_BODY_BYTES`` (more is a 502)."""
        try:
            raw = await read_bounded(reply.parts(), MAX_BODY_BYTES + 1)
        except TimeoutError as exc:
            self._errors["timeout"].inc()
            raise UpstreamTimeout("the upstream model server stopped answering mid-response") from exc
        except TransportError as exc:
            self._errors["stream"].inc()
            raise UpstreamUnreachable(f"the upstream connection failed mid-response ({type(exc).__name__})") from exc
        if len(raw) > MAX_BODY_BYTES:
            self._errors["stream"].inc()
            raise UpstreamUnreachable(f"the upstream response is larger than {MAX_BODY_BYTES} bytes")
        return raw

    async def probe(self, path: str, timeout_s: float) -> int:
        """The status of ``GET path`` within ``timeout_s`` (readiness); transport failures raise
        :class:`UpstreamUnreachable`/:class:`UpstreamTimeout` naming the cause."""
        timeout = aiohttp.ClientTimeout(total=timeout_s)
        try:
            async with self.session.get(self._url(path), headers=self.headers(None, "readyz"), timeout=timeout) as r:
                await r.read()
                return r.status
        except TimeoutError as exc:
            raise UpstreamTimeout(f"upstream unreachable ({type(exc).__name__})") from exc
        except TransportError as exc:
            raise UpstreamUnreachable(f"upstream unreachable ({type(exc).__name__})") from exc


_ERROR_KINDS = ("timeout", "connect", "status_4xx", "status_5xx", "stream", "closed")


async def read_bounded(body: AsyncIterator[bytes], limit: int) -> bytes:
    parts: list[bytes] = []
    size = 0
    async for part in body:
        parts.append(part)
        size += len(part)
        if size >= limit:
            break
    return b"".join(parts)[:limit]


def _release(response: aiohttp.ClientResponse) -> None:
    """Give the connection back to the pool when the body was read to its end; otherwise close it, which
    is what cancels the request on the upstream (client disconnect, or an answer cut short)."""
    if response.content.is_eof():
        response.release()
    else:
        response.close()
