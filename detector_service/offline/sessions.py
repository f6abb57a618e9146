"""Recorded sessions as trajectory records: what ``fama sessions export`` (and ``GET /admin/sessions/export``) writes,
one JSON line per session, in the JSONL format ``fama replay``, ``fama analyze`` and ``fama report`` read.

A session's record (``proxy.supervision.recorder``) is a list of entries, oldest first: ``turn`` (the messages added
since the previous assistant message, the candidate answer, the attempt, the tools on the session's first turn),
``verdict``, ``intervention`` and ``outcome``. The conversation is rebuilt from each request's first attempt (its new
messages) and the answer the client received: the last attempt's candidate, or what an intervention sent instead.

A line holds ``id`` (``<tenant>/<session>``, stable), ``messages``, ``tools``, ``reward`` (the reported reward, else
1.0 for ``success`` and 0.0 for ``failure``; null without an outcome) and, kept by the readers in ``extra``:
``tenant``, ``session_id``, ``outcome``, ``note``, ``intervened``, ``profile``, ``started_ms``, ``ended_ms``,
``verdicts`` (per judged attempt: ``turn``, the index in ``messages`` of the assistant message it judged, ``attempt``,
``action`` and the findings with their own actions), ``interventions`` and ``would_act`` (whether any verdict asked
for what enforce mode acts on: retry, rewrite or block; in observe mode, what it would have done).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import orjson

from detector_service.contract.redaction import RedactSecrets
from detector_service.offline.evaluation import ACTING

_FINDING_FIELDS = ("category", "detector", "action", "tool_name", "message")


@dataclass(frozen=True)
class ExportFilter:
    """Which recorded sessions an export keeps."""

    since_ms: int | None = None  # sessions active at or after this time (their last entry)
    with_outcome_only: bool = False
    redactor: RedactSecrets | None = None  # applied to every text of the conversation and the verdicts


def _reward(outcome: dict[str, Any]) -> float | None:
    reward = outcome.get("reward")
    if isinstance(reward, int | float) and not isinstance(reward, bool):
        return float(reward)
    name = outcome.get("outcome")
    return 1.0 if name == "success" else 0.0 if name == "failure" else None


def session_record(
    tenant: str, session_id: str, entries: Iterable[bytes | str | dict[str, Any]], claimed: str | None = None
) -> dict[str, Any] | None:
    """The trajectory record of one recorded session (``claimed``: the outcome its claim key holds, used when the
    outcome entry itself is missing); None when the record holds no turn."""
    messages: list[dict[str, Any]] = []
    tools: list[dict[str, Any]] | None = None
    answer: dict[str, Any] | None = None  # what the client received for the latest request
    latest_turn = ""
    at: dict[str, tuple[int, int]] = {}  # turn id -> (index of its assistant message, attempt)
    verdicts: list[dict[str, Any]] = []
    interventions: list[dict[str, Any]] = []
    outcome: dict[str, Any] = {}
    profile: str | None = None
    started = ended = None
    for raw in entries:
        entry = raw if isinstance(raw, dict) else orjson.loads(raw)
        kind, turn_id, data = entry.get("kind"), str(entry.get("turn_id") or ""), entry.get("data") or {}
        ts = entry.get("ts_ms")
        if isinstance(ts, int):
            started = ts if started is None else min(started, ts)
            ended = ts if ended is None else max(ended, ts)
        if kind == "turn":
            attempt = int(data.get("attempt") or 0)
            new = [m for m in data.get("new_messages") or () if isinstance(m, dict)]
            if attempt == 0 and len(new) == data.get("message_count", -1):
                messages, answer = new, None  # the whole conversation: the first turn seen, or the client started over
            elif attempt == 0:  # a new request: the previous one's answer is part of the conversation now
                if answer is not None:
                    messages.append(answer)
                messages.extend(new)
            if tools is None and isinstance(data.get("tools"), list):
                tools = data["tools"]
            profile = data.get("profile") or profile
            answer, latest_turn = data.get("candidate") or {}, turn_id
            at[turn_id] = (len(messages), attempt)
        elif kind == "verdict":
            turn, attempt = at.get(turn_id, (len(messages), 0))
            findings = [{k: f[k] for k in _FINDING_FIELDS if k in f} for f in data.get("findings") or ()]
            verdicts.append(
                {"turn": turn, "attempt": attempt, "action": data.get("action", "pass"), "findings": findings}
            )
        elif kind == "intervention":
            turn, _ = at.get(turn_id, (len(messages), 0))
            interventions.append({"turn": turn, **data})
            if turn_id == latest_turn and isinstance(data.get("final"), dict):
                answer = data["final"]  # a rewrite or a block: the client got this instead
        elif kind == "outcome":
            outcome = data
    if not at:
        return None
    if answer is not None:
        messages.append(answer)
    if not outcome and claimed:
        outcome = {"outcome": claimed}
    return {
        "id": f"{tenant}/{session_id}",
        "messages": messages,
        "tools": tools,
        "reward": _reward(outcome),
        "tenant": tenant,
        "session_id": session_id,
        "outcome": outcome.get("outcome"),
        "note": outcome.get("note"),
        "intervened": bool(interventions),
        "profile": profile,
        "started_ms": started,
        "ended_ms": ended,
        "verdicts": verdicts,
        "interventions": interventions,
        "would_act": any(v["action"] in ACTING for v in verdicts),
    }


def _redacted(value: Any, redactor: RedactSecrets) -> Any:
    if isinstance(value, str):
        return redactor.redact(value)
    if isinstance(value, list):
        return [_redacted(v, redactor) for v in value]
    if isinstance(value, dict):
        return {k: _redacted(v, redactor) for k, v in value.items()}
    return value


def kept(record: dict[str, Any] | None, keep: ExportFilter) -> dict[str, Any] | None:
    """``record`` as the export writes it (redacted), or None when the filter leaves it out."""
    if record is None:
        return None
    if keep.with_outcome_only and record["outcome"] is None:
        return None
    if keep.since_ms is not None and (record["ended_ms"] or 0) < keep.since_ms:
        return None
    if keep.redactor is not None:
        for field in ("messages", "verdicts", "interventions", "note"):
            record[field] = _redacted(record[field], keep.redactor)
    return record


def jsonl_line(record: dict[str, Any]) -> bytes:
    return orjson.dumps(record) + b"\n"
