"""Session outcomes: how a session ended, reported by its client or an evaluation harness.

``POST /v1/fama/sessions/{session_id}/outcome`` with ``{"outcome": "success" | "failure", "reward": <number>,
"note": <string>}`` (the last two optional), authenticated like the chat endpoints; the tenant comes from
the client key. The session is the one named by ``x-fama-session`` on the chat responses. The outcome is
counted in ``fama_session_outcomes_total{outcome, intervened}`` (``intervened``: whether the proxy changed
any answer of the session, ``yes``/``no`` as in ``fama_session_turns_total``), recorded in the session's
record, and claimed once in the session store (its own key, set only if absent, so concurrent reports and
in-flight turns cannot make it count twice): a second report answers 409.

A session is known once the proxy has supervised one of its turns (a request that declared tools); any
other session answers 404.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import orjson
from fastapi import APIRouter
from redis.exceptions import RedisError
from starlette.requests import Request
from starlette.responses import Response

from proxy.edge.auth import Tenant
from proxy.edge.inbound import json_object, read_body
from proxy.errors import InvalidRequest, ProxyError, RouteNotFound
from proxy.metrics import ProxyMetrics
from proxy.supervision.recorder import Outcome
from proxy.supervision.sessions import SessionRef, session_from_header
from proxy.supervision.supervisor import Supervisor

MAX_BODY_BYTES = 16 * 1024
MAX_NOTE_CHARS = 2_000
OutcomeName = Literal["success", "failure"]
FIELDS = {"outcome", "reward", "note"}

router = APIRouter(prefix="/v1/fama")


class OutcomeConflict(ProxyError):
    status = 409
    type = "invalid_request_error"
    code = "outcome_already_reported"


class StoreUnavailable(ProxyError):
    status = 503
    type = "server_error"
    code = "session_store_unavailable"


def parse_outcome(raw: bytes) -> tuple[OutcomeName, float | None, str | None]:
    """``(outcome, reward, note)`` from a request body; 400 naming the field otherwise."""
    body = json_object(raw)
    unknown = sorted(set(body) - FIELDS)
    if unknown:
        raise InvalidRequest(f"Unrecognized request argument supplied: {unknown[0]}", param=unknown[0])
    outcome = body.get("outcome")
    if outcome is None:
        raise InvalidRequest(
            "you must provide the 'outcome' parameter", param="outcome", code="missing_required_parameter"
        )
    if outcome not in ("success", "failure"):
        raise InvalidRequest("'outcome' must be 'success' or 'failure'", param="outcome", code="invalid_value")
    name: OutcomeName = "success" if outcome == "success" else "failure"
    reward = body.get("reward")
    if reward is not None and (
        isinstance(reward, bool) or not isinstance(reward, int | float) or not math.isfinite(reward)
    ):
        raise InvalidRequest("'reward' must be a finite number", param="reward", code="invalid_type")
    note = body.get("note")
    if note is not None and not isinstance(note, str):
        raise InvalidRequest("'note' must be a string", param="note", code="invalid_type")
    if note is not None and len(note) > MAX_NOTE_CHARS:
        raise InvalidRequest(f"'note' must be at most {MAX_NOTE_CHARS} characters", param="note", code="too_long")
    return name, None if reward is None else float(reward), note


def _supervisor(request: Request) -> Supervisor:
    hooks = request.app.state.chat_hooks
    if not isinstance(hooks, Supervisor):
        raise RouteNotFound("session outcomes need supervision, which this proxy does not run", code="not_supervised")
    return hooks


async def _intervened(supervisor: Supervisor, ref: SessionRef, turns: int, interventions: int) -> bool | None:
    """Whether the session had an intervention; ``None`` for a session the proxy never supervised."""
    if turns > 0:
        return interventions > 0
    if supervisor.recorder is None:
        return None
    # The state may have expired or been lost to a Redis failure while the record remains.
    try:
        entries = await supervisor.recorder.session(ref.tenant, ref.session_id)
    except (RedisError, OSError) as exc:
        raise StoreUnavailable("the session store is unavailable; report the outcome again later") from exc
    if not entries:
        return None
    return any(entry.kind == "intervention" for entry in entries)


@router.post("/sessions/{session_id}/outcome")
async def report_outcome(session_id: str, request: Request, tenant: Tenant) -> Response:
    supervisor = _supervisor(request)
    outcome, reward, note = parse_outcome(await read_body(request, MAX_BODY_BYTES))
    ref = SessionRef(tenant, session_from_header(session_id), derived=False)
    state = await supervisor.store.load(ref)
    intervened = await _intervened(supervisor, ref, state.turns, state.interventions)
    if intervened is None:
        raise RouteNotFound(
            f"No session '{session_id}' is known to this proxy", param="session_id", code="unknown_session"
        )
    try:
        first = await supervisor.store.claim_outcome(ref, outcome)
    except (RedisError, OSError, TimeoutError) as exc:
        raise StoreUnavailable("the session store is unavailable; report the outcome again later") from exc
    if first is not None:
        raise OutcomeConflict(f"The outcome of session '{session_id}' was already reported ({first})")
    metrics: ProxyMetrics = request.app.state.metrics
    metrics.session_outcomes.labels(outcome=outcome, intervened="yes" if intervened else "no").inc()
    if supervisor.recorder is not None:
        supervisor.recorder.record_outcome(
            Outcome(
                tenant=tenant,
                session_id=ref.session_id,
                outcome=outcome,
                reward=reward,
                note=note,
                intervened=intervened,
            )
        )
    answer: dict[str, Any] = {
        "object": "fama.session.outcome",
        "session_id": ref.session_id,
        "outcome": outcome,
        "reward": reward,
        "intervened": intervened,
    }
    return Response(orjson.dumps(answer), media_type="application/json")
