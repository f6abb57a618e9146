"""The model server behind the proxy: one pooled ``httpx2.AsyncClient``, opened and closed by the lifespan.

Every call has bounded waits (connect/read timeouts from settings). Transport failures become
:class:`~proxy.errors.UpstreamUnreachable` (502) or :class:`~proxy.errors.UpstreamTimeout` (504); an
error status becomes :class:`~proxy.errors.UpstreamError` with the upstream's status and a normalized body.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from typing import Any

import anyio
import httpx2
import orjson

from proxy import normalize
from proxy.errors import UpstreamError, UpstreamTimeout, UpstreamUnreachable
from proxy.metrics import ProxyMetrics
from proxy.settings import ProxySettings
from proxy.tracing import Trace

logger = logging.getLogger("fama.proxy.upstream")

# Headers of an upstream error that a client needs to back off properly.
_PASSED_HEADERS = ("retry-after", "retry-after-ms")
_MAX_ERROR_BYTES = 64 * 1024
MAX_BODY_BYTES = 64 * 1024 * 1024  # a non-streamed answer held in memory at once


class Upstream:
    def __init__(
        self, settings: ProxySettings, metrics: ProxyMetrics, transport: httpx2.AsyncBaseTransport | None = None
    ):
        self.base_url = settings.upstream_url
        self._key = settings.upstream_api_key.get_secret_value() if settings.upstream_api_key else None
        self._metrics = metrics
        limits = httpx2.Limits(
            max_connections=settings.max_upstream_connections,
            max_keepalive_connections=settings.max_upstream_connections,
        )
        timeout = httpx2.Timeout(
            connect=settings.connect_timeout_s,
            read=settings.read_timeout_s,
            write=settings.read_timeout_s,
            pool=settings.connect_timeout_s,
        )
        self.client = httpx2.AsyncClient(limits=limits, timeout=timeout, transport=transport, trust_env=False)

    async def aclose(self) -> None:
        await self.client.aclose()

    def headers(self, client_authorization: str | None, request_id: str) -> dict[str, str]:
        headers = {"content-type": "application/json", "x-request-id": request_id}
        if self._key is not None:
            headers["authorization"] = f"Bearer {self._key}"
        elif client_authorization:
            headers["authorization"] = client_authorization
        return headers

    async def open(
        self, method: str, path: str, headers: Mapping[str, str], trace: Trace, content: bytes | None = None
    ) -> httpx2.Response:
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

    async def _open(self, method: str, path: str, headers: Mapping[str, str], content: bytes | None) -> httpx2.Response:
        request = self.client.build_request(method, self.base_url + path, headers=headers, content=content)
        try:
            response = await self.client.send(request, stream=True)
        except httpx2.TimeoutException as exc:
            self._metrics.upstream_errors.labels("timeout").inc()
            raise UpstreamTimeout(f"the upstream model server did not answer in time ({type(exc).__name__})") from exc
        except httpx2.TransportError as exc:
            self._metrics.upstream_errors.labels("connect").inc()
            raise UpstreamUnreachable(f"cannot reach the upstream model server ({type(exc).__name__})") from exc
        if response.status_code >= 400:
            await self._raise_status(response)
        return response

    async def _raise_status(self, response: httpx2.Response) -> None:
        status = response.status_code
        self._metrics.upstream_errors.labels("status_5xx" if status >= 500 else "status_4xx").inc()
        try:
            raw = await read_bounded(response, _MAX_ERROR_BYTES)
        except httpx2.HTTPError:
            raw = b""
        finally:
            await close(response)
        payload: Any
        try:
            payload = orjson.loads(raw) if raw else None
        except orjson.JSONDecodeError:
            payload = raw.decode("utf-8", "replace")
        body = normalize.error_from_upstream(status, payload, response.reason_phrase or f"upstream error {status}")
        err = body["error"]
        headers = {k: v for k in _PASSED_HEADERS if (v := response.headers.get(k)) is not None}
        headers.update({k: v for k, v in response.headers.items() if k.startswith("x-ratelimit-")})
        logger.debug("upstream answered %s: %s", status, err["message"])
        raise UpstreamError(
            err["message"], status=status, type_=err["type"], param=err["param"], code=err["code"], headers=headers
        )

    async def request_json(
        self, method: str, path: str, headers: Mapping[str, str], trace: Trace, content: bytes | None = None
    ) -> tuple[object, httpx2.Response]:
        """A whole JSON request/response exchange; a body that is not JSON is a 502."""
        started = time.perf_counter()
        response = await self.open(method, path, headers, trace, content)
        try:
            raw = await self.read(response)
        finally:
            await close(response)
            trace.upstream_s += time.perf_counter() - started
        try:
            return orjson.loads(raw), response
        except orjson.JSONDecodeError as exc:
            self._metrics.upstream_errors.labels("stream").inc()
            raise UpstreamUnreachable("the upstream model server answered with a body that is not JSON") from exc

    async def read(self, response: httpx2.Response) -> bytes:
        """The whole body of a successful response, up to ``MAX_BODY_BYTES`` (more is a 502)."""
        try:
            raw = await read_bounded(response, MAX_BODY_BYTES + 1)
        except httpx2.TimeoutException as exc:
            self._metrics.upstream_errors.labels("timeout").inc()
            raise UpstreamTimeout("the upstream model server stopped answering mid-response") from exc
        except httpx2.TransportError as exc:
            self._metrics.upstream_errors.labels("stream").inc()
            raise UpstreamUnreachable(f"the upstream connection failed mid-response ({type(exc).__name__})") from exc
        if len(raw) > MAX_BODY_BYTES:
            self._metrics.upstream_errors.labels("stream").inc()
            raise UpstreamUnreachable(f"the upstream response is larger than {MAX_BODY_BYTES} bytes")
        return raw


async def read_bounded(response: httpx2.Response, limit: int) -> bytes:
    parts: list[bytes] = []
    size = 0
    async for part in response.aiter_bytes():
        parts.append(part)
        size += len(part)
        if size >= limit:
            break
    return b"".join(parts)[:limit]


async def close(response: httpx2.Response) -> None:
    """Close a response even while the surrounding task is being cancelled (client disconnect)."""
    with anyio.CancelScope(shield=True):
        await response.aclose()
