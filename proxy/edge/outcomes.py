"""Session outcomes: how a session ended, reported by its client or an evaluation harness.

``POST /v1/fama/sessions/{session_id}/outcome`` with ``{"outcome": "success" | "failure", "reward": <number>,
"note": <string>}`` (the last two optional), authenticated like the chat endpoints; the tenant comes from
the client key. The session is the one named by ``x-fama-session`` on the chat responses. The outcome is
counted in ``fama_session_outcomes_total{outcome, intervened}`` (``intervened``: whether the proxy changed
any answer of the session, ``yes``/``no`` as in ``fama_session_turns_total``) and in
``fama_shadow_outcomes_total{outcome, would_act}`` (whether a verdict on any of its turns asked for a retry, rewrite
or block: what enforce mode would have acted on, also in observe mode), recorded in the session's
record, and claimed once in the session store (its own key, set only if absent, so concurrent reports and
in-flight turns cannot make it count twice): a second report answers 409.

A session is known once the proxy has supervised one of its turns (a request that declared tools); any
other session answers 404. It is known from the moment its turn's answer leaves, in every mode: observe mode judges
the turn after answering, but saves the session state before (queued, so the answer does not wait), and an outcome
that arrives while this process is still judging the turn waits (bounded by the verdict deadline) for that verdict.
An unknown session is looked up again for ``UNKNOWN_GRACE_S`` before the answer is 404: the turn may have been
answered by another replica, whose write of the session state may still be on its way.
"""

from __future__ import annotations

import asyncio
import math
from typing import Any, Literal

import orjson
from fastapi import APIRouter
from redis.exceptions import RedisError
from starlette.requests import Request
from starlette.responses import Response

from proxy.edge.deps import ProxyState, State, Supervision, Tenant
from proxy.edge.inbound import json_object, read_body, require
from proxy.errors import InvalidRequest, ProxyError, RouteNotFound
from proxy.supervision.recorder import Outcome, Recorder
from proxy.supervision.sessions import SessionRef, SessionState, SessionStore, session_from_header
from proxy.supervision.turn import ACTING

MAX_BODY_BYTES = 16 * 1024
UNKNOWN_GRACE_S = 0.5  # how long an unknown session is looked up again before the answer is 404
UNKNOWN_RECHECK_S = 0.05
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
    reward = require(body, "reward", (int, float), "a finite number", optional=True)
    if reward is not None and not math.isfinite(reward):
        raise InvalidRequest("'reward' must be a finite number", param="reward", code="invalid_type")
    note = require(body, "note", (str,), "a string", optional=True)
    if note is not None and len(note) > MAX_NOTE_CHARS:
        raise InvalidRequest(f"'note' must be at most {MAX_NOTE_CHARS} characters", param="note", code="too_long")
    return name, None if reward is None else float(reward), note


def _supervision(state: ProxyState) -> Supervision:
    supervision = state["supervision"]
    if supervision is None:
        raise RouteNotFound("session outcomes need supervision, which this proxy does not run", code="not_supervised")
    return supervision


async def _intervened(recorder: Recorder | None, ref: SessionRef, known: SessionState) -> tuple[bool, bool] | None:
    """Whether the session had an intervention, and whether a verdict asked for one (what enforce mode acts on);
    ``None`` for a session the proxy never supervised."""
    if known.turns > 0:
        return known.interventions > 0, known.would_act > 0
    if recorder is None:
        return None
    # The state may have expired or been lost to a Redis failure while the record remains.
    try:
        entries = await recorder.session(ref.tenant, ref.session_id)
    except (RedisError, OSError) as exc:
        raise StoreUnavailable("the session store is unavailable; report the outcome again later") from exc
    if not entries:
        return None
    acting = [e for e in entries if e.kind == "verdict" and e.data.get("action") in ACTING]
    return any(entry.kind == "intervention" for entry in entries), bool(acting)


async def _known(sessions: SessionStore, recorder: Recorder | None, ref: SessionRef) -> tuple[bool, bool] | None:
    """What :func:`_intervened` says, looked up again for a while when the session is unknown: another replica
    answered its turn and queued the session's state before answering, but that write may still be on its way."""
    deadline = asyncio.get_running_loop().time() + UNKNOWN_GRACE_S
    while True:
        found = await _intervened(recorder, ref, await sessions.load(ref))
        if found is not None or asyncio.get_running_loop().time() >= deadline:
            return found
        await asyncio.sleep(UNKNOWN_RECHECK_S)


@router.post("/sessions/{session_id}/outcome")
async def report_outcome(session_id: str, request: Request, tenant: Tenant, state: State) -> Response:
    supervision = _supervision(state)
    sessions, recorder = supervision.sessions, supervision.recorder
    outcome, reward, note = parse_outcome(await read_body(request, MAX_BODY_BYTES))
    ref = SessionRef(tenant, session_from_header(session_id), derived=False)
    # A turn answered by this process may still be being judged (observe mode): its verdict goes on record first.
    await supervision.settled(ref)
    found = await _known(sessions, recorder, ref)
    if found is None:
        raise RouteNotFound(
            f"No session '{session_id}' is known to this proxy", param="session_id", code="unknown_session"
        )
    try:
        first = await sessions.claim_outcome(ref, outcome)
    except (RedisError, OSError, TimeoutError) as exc:
        raise StoreUnavailable("the session store is unavailable; report the outcome again later") from exc
    if first is not None:
        raise OutcomeConflict(f"The outcome of session '{session_id}' was already reported ({first})")
    intervened, would_act = found
    metrics = state["metrics"]
    metrics.session_outcomes.labels(outcome=outcome, intervened="yes" if intervened else "no").inc()
    metrics.shadow_outcomes.labels(outcome=outcome, would_act="yes" if would_act else "no").inc()
    if recorder is not None:
        recorder.record_outcome(
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
