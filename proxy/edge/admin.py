"""Operator reads, behind ``FAMA_ADMIN_KEY`` (``Authorization: Bearer <admin key>``).

- ``GET /admin/sessions/{tenant}/{session_id}``: the recorded trajectory of one session (turns, verdicts,
  interventions, outcome), oldest first.
- ``GET /admin/sessions/export``: every recorded session as one JSONL trajectory record (what ``fama sessions
  export`` writes; the way to get them out of an embedded proxy), streamed; ``tenant``, ``since`` (ISO 8601) or
  ``last`` (``7d``), ``with_outcome_only`` and ``redact`` as the command's flags.
- ``GET /admin/interventions?limit=N``: the most recent interventions, newest first (``N`` ≤ 1000).
- ``GET /admin/profile``: the active mode and profile: its version (0: the file the process started with; n: the
  n-th push), sha256 and source (``file`` or ``pushed``).
- ``POST /admin/profile``: a new profile (the file's YAML as the body, or JSON): validated (a bad one answers
  400 naming the field and changes nothing), then in force here at once and, with Redis, stored for every
  replica and detector, which take it within a second (:mod:`detector_service.bus.profiles`).

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
from detector_service.contract.active_profile import ActiveProfile
from detector_service.contract.profile import Profile, ProfileError, parse_profile, parse_profile_text
from detector_service.contract.redaction import RedactSecrets
from detector_service.contract.wire import now_ms
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


class ProfileNotShared(ProxyError):
    status = 409
    type = "invalid_request_error"
    code = "profile_not_shared"


class ProfileStoreUnavailable(ProxyError):
    status = 503
    type = "server_error"
    code = "profile_store_unavailable"


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
        judge = judge_key(settings.judge_api_key, supervision.profiles.current.profile.judge)
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


def _profile_answer(supervision: Supervision, active: ActiveProfile) -> Response:
    # The mode in force comes from flags/environment, and may differ from the profile's own ``mode``.
    answer = {"object": "fama.profile", "mode": supervision.mode.value, **active.describe()}
    if supervision.profiles.current is active:
        answer["in_force_since_ms"] = supervision.profiles.since_ms
    return _json(answer)


@router.get("/profile")
async def profile(state: State) -> Response:
    supervision = _supervision(state)
    return _profile_answer(supervision, supervision.profiles.current)


def _posted_profile(body: bytes, content_type: str) -> Profile:
    if not body.strip():  # an empty file is the default profile; an empty request is a mistake, not a reset
        raise InvalidRequest("the request body is empty: send the profile (YAML, or JSON)", code="invalid_profile")
    try:
        if content_type.split(";")[0].strip().lower() == "application/json":
            try:
                return parse_profile(orjson.loads(body), "the profile")
            except orjson.JSONDecodeError as exc:
                raise ProfileError(f"the profile is not valid JSON: {exc}") from exc
        return parse_profile_text(body, "the profile")
    except ProfileError as exc:
        raise InvalidRequest(str(exc), param=exc.field, code="invalid_profile") from exc


@router.post("/profile")
async def push_profile(request: Request, state: State) -> Response:
    supervision = _supervision(state)
    new = _posted_profile(await request.body(), request.headers.get("content-type", ""))
    workers = state["settings"].workers
    if supervision.published is None and workers > 1:
        raise ProfileNotShared(
            f"this proxy runs {workers} workers without Redis: a push would reach only the one answering it. "
            "Set FAMA_REDIS_URL, or restart with the new profile file."
        )
    if supervision.published is None:
        # No Redis: this process is the only one; numbered after the version it holds.
        active = ActiveProfile(new, supervision.profiles.current.version + 1, "pushed", now_ms())
        supervision.profiles.offer(active)
    else:
        try:
            active = await supervision.published.publish(new)
        except (RedisError, OSError) as exc:
            raise ProfileStoreUnavailable("the profile could not be stored; the old one stays in force") from exc
    return _profile_answer(supervision, active)
