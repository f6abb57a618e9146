"""The model server behind the proxy: one pooled ``aiohttp.ClientSession``, opened and closed by the lifespan.

aiohttp rather than httpx2 because the upstream call is most of the proxy's own CPU per request: its
C-accelerated parser and connection pool cost a fraction of httpx2's per call (measured with ``fama bench``).

Every call has bounded waits (connect/read timeouts from settings). Transport failures become
:class:`~proxy.errors.UpstreamUnreachable` (502) or :class:`~proxy.errors.UpstreamTimeout` (504); an
error status becomes :class:`~proxy.errors.UpstreamError` with the upstream's status and a normalized body.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from typing import Any

import aiohttp
import orjson

from proxy.errors import UpstreamError, UpstreamTimeout, UpstreamUnreachable
from proxy.metrics import ProxyMetrics
from proxy.settings import ProxySettings
from proxy.tracing import Trace
from proxy.upstream import normalize

logger = logging.getLogger("fama.proxy.upstream")

Response = aiohttp.ClientResponse

# Headers of an upstream error that a client needs to back off properly.
_PASSED_HEADERS = ("retry-after", "retry-after-ms")
_MAX_ERROR_BYTES = 64 * 1024
MAX_BODY_BYTES = 64 * 1024 * 1024  # a non-streamed answer held in memory at once

# aiohttp raises these for a failed connection or body; its timeouts are ``TimeoutError`` subclasses.
TransportError = aiohttp.ClientError


class Upstream:
    def __init__(self, settings: ProxySettings, metrics: ProxyMetrics) -> None:
        """Build inside the running event loop (the app's lifespan): the session belongs to it."""
        self.base_url = settings.upstream_url
        self._key = settings.upstream_api_key.get_secret_value() if settings.upstream_api_key else None
        self._auth = f"Bearer {self._key}" if self._key is not None else None
        self._metrics = metrics
        self._errors = {kind: metrics.upstream_errors.labels(kind) for kind in _ERROR_KINDS}
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
        self._urls: dict[str, str] = {}

    async def aclose(self) -> None:
        await self.session.close()

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
    ) -> Response:
        """Send a request and return the response with its body not yet read; the caller closes it
        (and accounts the upstream time from here to the close).

        An error status is read (bounded), closed and raised as :class:`UpstreamError`; the time spent
        until then is added to ``trace.upstream_s``.
        """
        started = time.perf_counter()
        try:
            return await self._open(method, path, headers, content)
        except BaseException:
            trace.upstream_s += time.perf_counter() - started
            raise

    async def _open(self, method: str, path: str, headers: Mapping[str, str], content: bytes | None) -> Response:
        try:
            response = await self.session.request(method, self._url(path), headers=headers, data=content)
        except TimeoutError as exc:
            self._errors["timeout"].inc()
            raise UpstreamTimeout(f"the upstream model server did not answer in time ({type(exc).__name__})") from exc
        except TransportError as exc:
            self._errors["connect"].inc()
            raise UpstreamUnreachable(f"cannot reach the upstream model server ({type(exc).__name__})") from exc
        if response.status >= 400:
            await self._raise_status(response)
        return response

    async def _raise_status(self, response: Response) -> None:
        status = response.status
        self._errors["status_5xx" if status >= 500 else "status_4xx"].inc()
        try:
            raw = await read_bounded(response, _MAX_ERROR_BYTES)
        except (TransportError, TimeoutError):
            raw = b""
        finally:
            close(response)
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
    ) -> tuple[object, Response]:
        """A whole JSON request/response exchange; a body that is not JSON is a 502."""
        started = time.perf_counter()
        response = await self.open(method, path, headers, trace, content)
        try:
            raw = await self.read(response)
        finally:
            close(response)
            trace.upstream_s += time.perf_counter() - started
        try:
            return orjson.loads(raw), response
        except orjson.JSONDecodeError as exc:
            self._errors["stream"].inc()
            raise UpstreamUnreachable("the upstream model server answered with a body that is not JSON") from exc

    async def read(self, response: Response) -> bytes:
        """The whole body of a successful response, up to ``MAX_BODY_BYTES`` (more is a 502)."""
        try:
            raw = await read_bounded(response, MAX_BODY_BYTES + 1)
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


_ERROR_KINDS = ("timeout", "connect", "status_4xx", "status_5xx", "stream")


async def read_bounded(response: Response, limit: int) -> bytes:
    parts: list[bytes] = []
    size = 0
    async for part in response.content.iter_any():
        parts.append(part)
        size += len(part)
        if size >= limit:
            break
    return b"".join(parts)[:limit]


def close(response: Response) -> None:
    """Give the connection back to the pool when the body was read to its end; otherwise close it, which
    is what cancels the request on the upstream (client disconnect, or an answer cut short)."""
    if response.content.is_eof():
        response.release()
    else:
        response.close()
