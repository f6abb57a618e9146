"""Operator reads, behind ``FAMA_ADMIN_KEY`` (``Authorization: Bearer <admin key>``).

- ``GET /admin/sessions/{tenant}/{session_id}``: the recorded trajectory of one session (turns, verdicts,
  interventions, outcome), oldest first.
- ``GET /admin/sessions/export``: every recorded session as one JSONL trajectory record (what ``fama sessions
  export`` writes; the way to get them out of an embedded proxy), streamed; ``tenant``, ``since`` (ISO 8601) or
  ``last`` (``7d``), ``with_outcome_only`` and ``redact`` as the command's flags.
- ``GET /admin/interventions?limit=N``: the most recent interventions, newest first (``N`` ≤ 1000).
- ``GET /admin/profile``: the active mode and profile.

Without an admin key configured every admin endpoint answers 403: they are never open by default. The
key is compared in constant time and never logged. Client keys do not open these endpoints, and the
admin key does not open ``/v1``.
"""

from __future__ import annotations

import hmac
from collections.abc import AsyncIterator
from typing import Annotated, Any

import orjson
from fastapi import APIRouter, Depends, Query
from redis.exceptions import RedisError
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from detector_service.bus.values import RecordedSession
from detector_service.contract.redaction import RedactSecrets
from detector_service.llm.judge import judge_key
from detector_service.offline.export import jsonl_records, since_ms
from detector_service.offline.sessions import ExportFilter
from proxy.edge.deps import ProxyState, State, Supervision, state_of
from proxy.errors import AuthenticationFailed, InvalidRequest, ProxyError, RouteNotFound
from proxy.supervision.recorder import Recorder

MAX_INTERVENTIONS = 1000


class AdminDisabled(ProxyError):
    status = 403
    type = "invalid_request_error"
    code = "admin_disabled"


class RecorderUnavailable(ProxyError):
    status = 503
    type = "server_error"
    code = "recorder_unavailable"


async def require_admin(request: Request) -> None:
    settings = state_of(request)["settings"]
    if settings.admin_key is None:
        raise AdminDisabled("Admin endpoints are disabled: set FAMA_ADMIN_KEY to enable them.")
    scheme, _, presented = (request.headers.get("authorization") or "").partition(" ")
    if scheme.lower() != "bearer" or not presented.strip():
        raise AuthenticationFailed("Missing admin key: send 'Authorization: Bearer <admin key>'.")
    if not hmac.compare_digest(presented.strip().encode(), settings.admin_key.get_secret_value().encode()):
        raise AuthenticationFailed("Incorrect admin key provided.")


router = APIRouter(prefix="/admin", dependencies=[Depends(require_admin)])


def _supervision(state: ProxyState) -> Supervision:
    supervision = state["supervision"]
    if supervision is None:
        raise RouteNotFound("this proxy runs no supervision: nothing is recorded", code="not_supervised")
    return supervision


def _recorder(state: ProxyState) -> Recorder:
    recorder = _supervision(state).recorder
    if recorder is None:
        raise RouteNotFound("this proxy records nothing", code="not_recorded")
    return recorder


def _json(payload: object) -> Response:
    return Response(orjson.dumps(payload), media_type="application/json")


@router.get("/sessions/export")
async def export_sessions(
    state: State,
    tenant: str | None = None,
    since: str | None = None,
    last: str | None = None,
    with_outcome_only: bool = False,
    redact: bool = False,
) -> Response:
    supervision = _supervision(state)
    recorder = _recorder(state)
    try:
        start = since_ms(since, last)
    except ValueError as exc:
        raise InvalidRequest(str(exc), param="since" if since is not None else "last") from exc
    redactor = None
    if redact:
        settings = state["settings"]
        judge = judge_key(settings.judge_api_key, supervision.profile.judge)
        redactor = RedactSecrets([*settings.secrets(), *filter(None, [judge])])
    keep = ExportFilter(since_ms=start, with_outcome_only=with_outcome_only, redactor=redactor)
    sessions = recorder.recorded(tenant)
    try:  # the first session is read before the answer starts: an unreachable store is a 503, not a cut stream
        first = await anext(sessions, None)
    except (RedisError, OSError) as exc:
        raise RecorderUnavailable("the session records could not be read; try again later") from exc
    return StreamingResponse(jsonl_records(_chained(first, sessions), keep), media_type="application/x-ndjson")


async def _chained(
    first: RecordedSession | None, rest: AsyncIterator[RecordedSession]
) -> AsyncIterator[RecordedSession]:
    if first is None:
        return
    yield first
    async for session in rest:  # a store failure from here on cuts the body short: the status is already sent
        yield session


@router.get("/sessions/{tenant}/{session_id}")
async def session(tenant: str, session_id: str, state: State) -> Response:
    try:
        entries = await _recorder(state).session(tenant, session_id)
    except (RedisError, OSError) as exc:
        raise RecorderUnavailable("the session record could not be read; try again later") from exc
    if not entries:
        raise RouteNotFound(
            f"No recorded session '{session_id}' for tenant '{tenant}'", param="session_id", code="unknown_session"
        )
    return _json(
        {
            "object": "fama.session",
            "tenant": tenant,
            "session_id": session_id,
            "entries": [entry.model_dump(mode="json") for entry in entries],
        }
    )


@router.get("/interventions")
async def interventions(state: State, limit: Annotated[int, Query(ge=1, le=MAX_INTERVENTIONS)] = 100) -> Response:
    try:
        found = await _recorder(state).interventions(limit)
    except (RedisError, OSError) as exc:
        raise RecorderUnavailable("the intervention log could not be read; try again later") from exc
    data: list[dict[str, Any]] = [i.model_dump(mode="json", exclude_none=True) for i in found]
    return _json({"object": "list", "data": data})


@router.get("/profile")
async def profile(state: State) -> Response:
    supervision = _supervision(state)
    return _json(
        {
            "object": "fama.profile",
            "mode": supervision.mode.value,  # the mode in force (flags/environment), which may differ from the file's
            "profile": supervision.profile.model_dump(mode="json"),
        }
    )
