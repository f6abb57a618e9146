"""Session and intervention recording (DESIGN §2): what happened on every supervised turn.

``fama:session:<tenant>:<session_id>`` is a Redis list of JSON ``SessionEntry`` items (turns, verdicts,
interventions) whose TTL is refreshed on every write; ``fama:interventions`` is a capped stream of every
intervention (original vs final message). ``MemoryRecorder`` keeps the same records, bounded, for the
embedded mode.

Writes never add latency to a turn and never raise: ``record_*`` only enqueue; the batched writer of
:mod:`detector_service.bus.writer` sends them (one round trip per batch). A full queue drops the record; failures are
logged with context and counted in ``fama_redis_errors_total``. Callers hand over the objects they
record and must not mutate them afterwards. The read API (``session``, ``interventions``) serves admin
endpoints and tests, and does raise ``RedisError`` when Redis is unreachable.

A turn record holds only the messages added since the previous assistant message (plus the candidate), so a
session's record grows linearly with the conversation; the session's first turn here holds the whole conversation so
far and the tools. Concatenating the entries rebuilds the trajectory (``detector_service.offline.sessions``).
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict, deque
from collections.abc import AsyncIterator, Callable
from typing import Any, Literal, Protocol

from pydantic import BaseModel, Field, ValidationError
from redis.asyncio import Redis

from detector_service.bus import keys, streams, values
from detector_service.bus.values import RecordedSession
from detector_service.bus.writer import Add, Append, BatchWriter, WriteFailure
from detector_service.contract.wire import Action, Category, TurnEvent, Verdict, now_ms
from proxy.metrics import ProxyMetrics

log = logging.getLogger(__name__)

EntryKind = Literal["turn", "verdict", "intervention", "outcome"]


class Intervention(BaseModel):
    """One change the proxy made to what the model produced."""

    tenant: str
    session_id: str
    turn_id: str
    action: Action
    categories: list[Category] = Field(default_factory=list)
    mode: str = "enforce"
    original: dict[str, Any]  # the assistant message the model produced
    final: dict[str, Any] | None = None  # what the client received; None when nothing was sent
    message: str = ""  # the corrective feedback or reason
    attempt: int = 0
    ts_ms: int = Field(default_factory=now_ms)


class Outcome(BaseModel):
    """How a session ended, as its client (or an evaluation harness) reported it."""

    tenant: str
    session_id: str
    outcome: Literal["success", "failure"]
    reward: float | None = None
    note: str | None = None
    intervened: bool = False  # whether the proxy changed any answer of the session
    ts_ms: int = Field(default_factory=now_ms)


class SessionEntry(BaseModel):
    kind: EntryKind
    turn_id: str
    ts_ms: int
    data: dict[str, Any]


class Recorder(Protocol):
    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    async def flush(self) -> None: ...

    def record_turn(self, turn: TurnEvent, *, whole: bool = False) -> None:
        """``whole``: the session's first turn here, recorded with its whole conversation (see ``turn_entry``)."""
        ...

    def record_verdict(self, verdict: Verdict) -> None: ...

    def record_intervention(self, intervention: Intervention) -> None: ...

    def record_outcome(self, outcome: Outcome) -> None: ...

    async def session(self, tenant: str, session_id: str) -> list[SessionEntry]: ...

    async def interventions(self, limit: int = 100) -> list[Intervention]: ...

    def recorded(self, tenant: str | None) -> AsyncIterator[RecordedSession]:
        """Every recorded session (of ``tenant``, or of all), streamed; raises ``RedisError`` as ``session`` does."""
        ...


def turn_entry(turn: TurnEvent, whole: bool = False) -> SessionEntry:
    """The turn's messages since the previous assistant message; all of them when ``whole`` (the first turn the proxy
    sees of a conversation that may have begun without it), so the record rebuilds the conversation from its start."""
    last_assistant = -1
    if not whole:
        last_assistant = max((i for i, m in enumerate(turn.messages) if m.get("role") == "assistant"), default=-1)
    data: dict[str, Any] = {
        "attempt": turn.attempt,
        "message_count": len(turn.messages),
        "new_messages": turn.messages[last_assistant + 1 :],
        "candidate": turn.candidate,
    }
    if last_assistant < 0:
        data["tools"] = turn.tools
    if turn.profile:
        data["profile"] = turn.profile
    # Built from a validated turn: constructing skips a second deep copy of the messages.
    return SessionEntry.model_construct(kind="turn", turn_id=turn.turn_id, ts_ms=turn.created_ms, data=data)


def verdict_entry(verdict: Verdict) -> SessionEntry:
    data = verdict.model_dump(mode="json", exclude_none=True, exclude={"kind", "turn_id", "session_id", "tenant"})
    return SessionEntry.model_construct(kind="verdict", turn_id=verdict.turn_id, ts_ms=now_ms(), data=data)


def intervention_entry(intervention: Intervention) -> SessionEntry:
    data = intervention.model_dump(mode="json", exclude_none=True, exclude={"tenant", "session_id", "turn_id", "ts_ms"})
    return SessionEntry(kind="intervention", turn_id=intervention.turn_id, ts_ms=intervention.ts_ms, data=data)


def outcome_entry(outcome: Outcome) -> SessionEntry:
    data = outcome.model_dump(mode="json", exclude_none=True, exclude={"tenant", "session_id", "ts_ms"})
    return SessionEntry(kind="outcome", turn_id="", ts_ms=outcome.ts_ms, data=data)


class RedisRecorder:
    """Records through a :class:`~detector_service.bus.writer.BatchWriter`: its own, or one it shares (the session
    store's state writes ride in the same batches). The recorder starts and stops the writer."""

    def __init__(
        self,
        redis: Redis,
        metrics: ProxyMetrics | None = None,
        *,
        writer: BatchWriter | None = None,
        session_ttl_s: int = 7 * 24 * 3600,
        max_session_entries: int = 5_000,
        interventions_maxlen: int = 100_000,
        queue_size: int = 10_000,
        batch_size: int = 256,
        drain_timeout_s: float = 2.0,
    ) -> None:
        self.redis = redis
        self.metrics = metrics or ProxyMetrics()
        self.session_ttl_s = session_ttl_s
        self.max_session_entries = max_session_entries
        self.interventions_maxlen = interventions_maxlen
        if writer is None:
            writer = BatchWriter(redis, queue_size=queue_size, batch_size=batch_size, drain_timeout_s=drain_timeout_s)
        writer.on_failure = self._failed
        self.writer = writer
        self._last_drop_log = 0.0
        self.dropped = 0

    async def start(self) -> None:
        await self.writer.start()

    async def stop(self) -> None:
        """Write what is queued (within the writer's drain timeout), then stop the writer."""
        await self.writer.stop()

    async def flush(self) -> None:
        """Wait until everything recorded so far has been written (or failed)."""
        await self.writer.flush()

    def record_turn(self, turn: TurnEvent, *, whole: bool = False) -> None:
        self._record(turn.tenant, turn.session_id, turn, whole)

    def record_verdict(self, verdict: Verdict) -> None:
        self._record(verdict.tenant, verdict.session_id, verdict)

    def record_intervention(self, intervention: Intervention) -> None:
        self._record(intervention.tenant, intervention.session_id, intervention)

    def record_outcome(self, outcome: Outcome) -> None:
        self._record(outcome.tenant, outcome.session_id, outcome)

    def _record(
        self, tenant: str, session_id: str, obj: TurnEvent | Verdict | Intervention | Outcome, whole: bool = False
    ) -> None:
        # A turn records several entries at once (turn, verdict, maybe an intervention): the writer sends one RPUSH
        # per session key for them all, in order.
        entry = Append(
            keys.session_key(tenant, session_id),
            (turn_entry(obj, whole) if isinstance(obj, TurnEvent) else _entry(obj)).model_dump_json(),
            self.max_session_entries,
            self.session_ttl_s,
        )
        ops: list[Append | Add] = [entry]
        if isinstance(obj, Intervention):
            ops.append(
                Add(keys.INTERVENTIONS_STREAM, obj.model_dump_json(exclude_none=True), self.interventions_maxlen)
            )
        if self.writer.write_soon(ops, f"{tenant}/{session_id}"):
            return
        self.dropped += 1
        self.metrics.redis_errors.labels(op="record_queue_full").inc()
        now = time.monotonic()
        if now - self._last_drop_log > 1.0:  # one line per second at most while Redis lags
            self._last_drop_log = now
            log.warning(
                "recorder queue full (%d): dropped a record of session %s/%s (%d dropped so far)",
                self.writer.queue_size,
                tenant,
                session_id,
                self.dropped,
            )

    def _failed(self, failure: WriteFailure) -> None:
        if failure.failed_commands is None:
            self.metrics.redis_errors.labels(op="record").inc()
            log.warning(
                "could not record %d entries (first: session %s): %s", failure.writes, failure.first, failure.error
            )
            return
        self.metrics.redis_errors.labels(op="record").inc(failure.failed_commands)
        log.warning(
            "%d of %d recording commands failed; first error: %s",
            failure.failed_commands,
            failure.commands,
            failure.error,
        )

    async def session(self, tenant: str, session_id: str) -> list[SessionEntry]:
        raw = await values.read_list(self.redis, keys.session_key(tenant, session_id))
        return [SessionEntry.model_validate_json(item) for item in raw]

    def recorded(self, tenant: str | None) -> AsyncIterator[RecordedSession]:
        return values.recorded_sessions(self.redis, tenant)

    async def interventions(self, limit: int = 100) -> list[Intervention]:
        """The most recent interventions, newest first."""
        out: list[Intervention] = []
        for entry in await streams.latest(self.redis, keys.INTERVENTIONS_STREAM, limit):
            try:
                out.append(Intervention.model_validate_json(entry.data or b""))
            except ValidationError as exc:
                log.warning("unreadable intervention entry %r: %s", entry.id, exc)
        return out


def _entry(obj: Verdict | Intervention | Outcome) -> SessionEntry:
    if isinstance(obj, Verdict):
        return verdict_entry(obj)
    if isinstance(obj, Outcome):
        return outcome_entry(obj)
    return intervention_entry(obj)


class MemoryRecorder:
    """The embedded mode's recorder: bounded in sessions, entries per session, interventions and age."""

    def __init__(
        self,
        *,
        session_ttl_s: int = 7 * 24 * 3600,
        max_sessions: int = 10_000,
        max_session_entries: int = 2_000,
        max_interventions: int = 10_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.clock = clock
        self.session_ttl_s = session_ttl_s
        self.max_sessions = max_sessions
        self.max_session_entries = max_session_entries
        self._sessions: OrderedDict[tuple[str, str], tuple[float, deque[SessionEntry]]] = OrderedDict()
        self._interventions: deque[Intervention] = deque(maxlen=max_interventions)

    async def start(self) -> None:
        return None

    async def stop(self) -> None:
        return None

    async def flush(self) -> None:
        return None

    def record_turn(self, turn: TurnEvent, *, whole: bool = False) -> None:
        self._append(turn.tenant, turn.session_id, turn_entry(turn, whole))

    def record_verdict(self, verdict: Verdict) -> None:
        self._append(verdict.tenant, verdict.session_id, verdict_entry(verdict))

    def record_intervention(self, intervention: Intervention) -> None:
        self._interventions.append(intervention)
        self._append(intervention.tenant, intervention.session_id, intervention_entry(intervention))

    def record_outcome(self, outcome: Outcome) -> None:
        self._append(outcome.tenant, outcome.session_id, outcome_entry(outcome))

    def _append(self, tenant: str, session_id: str, entry: SessionEntry) -> None:
        key = (tenant, session_id)
        now = self.clock()
        _, entries = self._sessions.pop(key, (now, deque(maxlen=self.max_session_entries)))
        entries.append(entry)
        self._sessions[key] = (now, entries)  # most recently written last
        while len(self._sessions) > self.max_sessions:
            self._sessions.popitem(last=False)
        self._expire(now)

    def _expire(self, now: float) -> None:
        while self._sessions:
            written, _ = next(iter(self._sessions.values()))
            if now - written <= self.session_ttl_s:
                return
            self._sessions.popitem(last=False)

    async def session(self, tenant: str, session_id: str) -> list[SessionEntry]:
        self._expire(self.clock())
        _, entries = self._sessions.get((tenant, session_id), (0.0, deque()))
        return list(entries)

    async def interventions(self, limit: int = 100) -> list[Intervention]:
        return list(reversed(self._interventions))[:limit]

    async def recorded(self, tenant: str | None) -> AsyncIterator[RecordedSession]:
        self._expire(self.clock())
        for tenant_id, session_id in list(self._sessions):  # a snapshot: turns go on while the export runs
            if tenant is not None and tenant_id != tenant:
                continue
            _, entries = self._sessions.get((tenant_id, session_id), (0.0, deque()))
            if entries:
                yield RecordedSession(tenant_id, session_id, [e.model_dump_json().encode() for e in entries], None)


def recorder_for(redis: Redis | None, metrics: ProxyMetrics, *, session_ttl_s: int) -> Recorder:
    """Redis-backed when a client is given, in-memory otherwise."""
    if redis is None:
        return MemoryRecorder(session_ttl_s=session_ttl_s)
    return RedisRecorder(redis, metrics, session_ttl_s=session_ttl_s)
