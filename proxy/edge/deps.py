"""What the handlers receive: the app's typed state (built once by the lifespan in :mod:`proxy.app`), the request's
:class:`~proxy.tracing.Trace` and the client's tenant, as typed dependencies."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Annotated, Any, NamedTuple, TypedDict, cast

from fastapi import Depends
from starlette.requests import Request

from detector_service.bus.profiles import ProfileWatch
from detector_service.contract.active_profile import ProfileHolder
from detector_service.contract.profile import Mode
from proxy.edge.auth import Authenticator
from proxy.edge.limits import ClientLimits
from proxy.hooks import ChatHooks
from proxy.metrics import ProxyMetrics
from proxy.responses.service import Responses
from proxy.settings import ProxySettings
from proxy.supervision.recorder import Recorder
from proxy.supervision.sessions import SessionRef, SessionStore
from proxy.tracing import Trace
from proxy.upstream.client import Upstream
from proxy.upstream.readiness import Readiness


class Supervision(NamedTuple):
    """The supervision in force, for the operator endpoints: its mode, the holder of its profile, session store and
    records, a wait (bounded) for a session's turn still being judged in this process, and (Redis mode) where a
    pushed profile is published for every replica."""

    mode: Mode
    profiles: ProfileHolder
    sessions: SessionStore
    recorder: Recorder | None
    settled: Callable[[SessionRef], Awaitable[None]]
    published: ProfileWatch | None = None  # None: no Redis, a push swaps this process's profile only


class ProxyState(TypedDict):
    """Everything the lifespan opened, once per app; every request sees it (Starlette's lifespan state)."""

    settings: ProxySettings
    metrics: ProxyMetrics
    auth: Authenticator
    upstream: Upstream
    readiness: Readiness
    hooks: ChatHooks[Any]
    supervision: Supervision | None  # None when the hooks are not the supervisor
    client_limits: ClientLimits  # read by the HTTP protocol (proxy.edge.limits), not by handlers
    responses: Responses  # the Responses API's store and path choice


def state_of(request: Request) -> ProxyState:
    # The lifespan yielded a ProxyState; the server hands every request a shallow copy of it as ``scope["state"]``.
    return cast(ProxyState, request.scope["state"])


def trace_of(request: Request) -> Trace:
    trace: Trace = request.scope["state"]["trace"]  # put there by the tracing middleware
    return trace


async def require_tenant(request: Request) -> str:
    tenant = state_of(request)["auth"].tenant(request.headers.get("authorization"))
    trace_of(request).tenant = tenant
    return tenant


# Dependencies are ``async``: FastAPI runs plain functions in a worker thread.
async def _state(request: Request) -> ProxyState:
    return state_of(request)


async def _trace(request: Request) -> Trace:
    return trace_of(request)


State = Annotated[ProxyState, Depends(_state)]
TraceDep = Annotated[Trace, Depends(_trace)]
Tenant = Annotated[str, Depends(require_tenant)]
