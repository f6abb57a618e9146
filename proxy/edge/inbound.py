"""The client side of a request: a bounded body read, JSON parsing, and watching for a disconnect."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, TypeVar

import orjson
from starlette.requests import ClientDisconnect, Request

from proxy.errors import InvalidRequest, PayloadTooLarge, ProxyError, RequestTimeout

T = TypeVar("T")


class ClientDisconnected(ProxyError):
    """The client went away before the answer was ready; nobody reads this response."""

    status = 499
    type = "invalid_request_error"
    code = "client_closed_request"


DEFAULT_BODY_TIMEOUT_S = 30.0


async def read_body(request: Request, limit: int, timeout_s: float = DEFAULT_BODY_TIMEOUT_S) -> bytes:
    """The request body: at most ``limit`` bytes (413 beyond), all of it within ``timeout_s`` (408 after).

    Under ``fama serve`` the HTTP protocol's read deadline (:mod:`proxy.edge.limits`, the same setting, counted
    from the request's first byte) passes first; this one bounds the body under any other ASGI server."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"request body is larger than {limit} bytes")
    parts: list[bytes] = []
    size = 0
    try:
        async with asyncio.timeout(timeout_s):
            async for part in request.stream():
                size += len(part)
                if size > limit:
                    raise PayloadTooLarge(f"request body is larger than {limit} bytes")
                parts.append(part)
    except TimeoutError as exc:
        raise RequestTimeout(f"the request body was not received within {timeout_s:g}s") from exc
    except ClientDisconnect:
        # Gone mid-body (or cut by the read deadline of proxy.edge.limits): nobody reads an answer.
        raise ClientDisconnected("the client closed the connection before sending the whole body") from None
    return b"".join(parts)


def json_object(raw: bytes) -> dict[str, Any]:
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise InvalidRequest(f"We could not parse the JSON body of your request: {exc}", code="invalid_json") from exc
    if not isinstance(body, dict):
        raise InvalidRequest("the request body must be a JSON object", code="invalid_json")
    return body


def require(
    obj: Mapping[str, Any],
    name: str,
    kinds: tuple[type, ...],
    what: str,
    optional: bool = False,
    param: str | None = None,
) -> Any:
    """``obj[name]``; 400 naming ``param`` (default ``name``) when it is missing (unless optional) or not of one of
    ``kinds`` (a boolean only where ``bool`` is named). A missing optional field is ``None``."""
    value = obj.get(name)
    param = param or name
    if value is None:
        if optional:
            return None
        raise InvalidRequest(
            f"you must provide the '{param}' parameter", param=param, code="missing_required_parameter"
        )
    return expect(value, kinds, what, param)


def expect(value: Any, kinds: tuple[type, ...], what: str, param: str) -> Any:
    """``value`` when it is of one of ``kinds`` (a boolean only where ``bool`` is named); 400 naming ``param``."""
    if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
        raise InvalidRequest(f"'{param}' must be {what}", param=param, code="invalid_type")
    return value


async def cancel_on_disconnect(request: Request, work: Callable[[], Awaitable[T]]) -> T:
    """Run ``work``; if the client disconnects first, cancel it (and with it the upstream request).

    One watcher task and a plain asyncio cancel: this wraps every proxied request, and an anyio task
    group costs about ten times as much CPU for the same thing.
    """
    task = asyncio.current_task()
    assert task is not None
    disconnected = False

    async def watch() -> None:
        nonlocal disconnected
        while (await request.receive())["type"] != "http.disconnect":
            pass
        disconnected = True
        task.cancel()

    watcher = asyncio.get_running_loop().create_task(watch())
    try:
        return await work()
    except asyncio.CancelledError:
        # Our own cancel (and only ours: a server shutdown cancelling the request as well keeps propagating).
        if disconnected and task.uncancel() == 0:
            raise ClientDisconnected("the client closed the connection") from None
        raise
    finally:
        watcher.cancel()
