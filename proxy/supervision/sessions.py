"""Session identity and the small per-session state supervision carries from one turn to the next.

Identity (DESIGN §2): the ``X-FAMA-Session`` header when the client sends one, else a hash of the
conversation's stable prefix (system messages, first user message, tool names). Every later turn of
the same conversation repeats that prefix, so unmodified OpenAI-SDK apps get per-conversation state.
Sessions are namespaced by tenant (the API key's identity; ``default`` without client auth).

State: guidance waiting for the next turn, agents switched on by earlier findings, counts. Embedded
mode keeps it in a bounded in-memory LRU with a TTL; with Redis it is one JSON value per session
under ``fama:state:<tenant>:<session>`` with a TTL. A store failure never fails a turn: the turn runs
with empty state, the failure is logged and counted in ``fama_redis_errors_total``.

A supervised turn saves with ``save_soon``: the answer does not wait for the write. Within the process
the next ``load`` or ``save`` of the same session waits for it (bounded), so a session never reads its own
state stale here; another replica sees it once the write lands (it is sent before the answer reaches the
client). Given the :class:`~detector_service.bus.writer.BatchWriter` the recorder writes with, the write rides in
the batch that records the same turn instead of costing a round trip of its own.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import re
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import orjson
from pydantic import BaseModel, Field, ValidationError
from redis.asyncio import Redis
from redis.exceptions import RedisError

from detector_service.bus import streams, values
from detector_service.bus.keys import session_outcome_key, session_state_key
from detector_service.bus.writer import BatchWriter
from detector_service.contract.profile import AgentName
from proxy.metrics import ProxyMetrics

log = logging.getLogger(__name__)

SESSION_HEADER = "x-fama-session"
DEFAULT_TENANT = "default"
MAX_GUIDANCE = 6
_SAFE_ID = re.compile(r"[A-Za-z0-9._:@-]{1,128}")


@dataclass(frozen=True)
class SessionRef:
    tenant: str
    session_id: str
    derived: bool  # True when named by the conversation hash rather than the header


def _text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(str(p.get("text", "")) for p in content if isinstance(p, dict))
    return ""


def derive_session_id(messages: Sequence[Mapping[str, Any]], tools: Sequence[Mapping[str, Any]]) -> str:
    """A stable name for a conversation: its system messages, first user message and tool names."""
    system = [_text(m.get("content")) for m in messages if m.get("role") in ("system", "developer")]
    first_user = next((_text(m.get("content")) for m in messages if m.get("role") == "user"), "")
    names = sorted(str((t.get("function") or {}).get("name", "")) for t in tools if isinstance(t, Mapping))
    # orjson writes the same bytes as json.dumps(ensure_ascii=False, separators=(",", ":")), in a fraction of the time.
    return "c-" + hashlib.sha256(orjson.dumps([system, first_user, names])).hexdigest()[:32]


def session_from_header(value: str) -> str:
    """The header's value when it is a safe key part; otherwise a hash of it (it ends up in Redis keys and logs)."""
    value = value.strip()
    if _SAFE_ID.fullmatch(value):
        return value
    return "h-" + hashlib.sha256(value.encode("utf-8")).hexdigest()[:32]


def identify(
    header: str | None,
    tenant: str | None,
    messages: Sequence[Mapping[str, Any]],
    tools: Sequence[Mapping[str, Any]],
) -> SessionRef:
    tenant = tenant or DEFAULT_TENANT
    if header is not None and header.strip():
        return SessionRef(tenant, session_from_header(header), derived=False)
    return SessionRef(tenant, derive_session_id(messages, tools), derived=True)


class SessionState(BaseModel):
    guidance: list[str] = Field(default_factory=list)  # corrective notes for the next turn's injection
    agents: list[AgentName] = Field(default_factory=list)  # switched on by earlier findings
    interventions: int = 0
    turns: int = 0
    would_act: int = 0  # turns whose verdict asked for a retry, rewrite or block (acted on in enforce mode only)

    def add_guidance(self, notes: Sequence[str]) -> None:
        for note in notes:
            if note not in self.guidance:
                self.guidance.append(note)
        del self.guidance[:-MAX_GUIDANCE]

    def activate(self, agents: Sequence[AgentName]) -> None:
        for agent in agents:
            if agent not in self.agents:
                self.agents.append(agent)


class SessionStore(Protocol):
    async def load(self, ref: SessionRef) -> SessionState: ...

    async def save(self, ref: SessionRef, state: SessionState) -> None: ...

    def save_soon(self, ref: SessionRef, state: SessionState) -> None:
        """Save without waiting; this process's next ``load``/``save`` of the session still sees it."""
        ...

    async def drain(self) -> None:
        """Wait (bounded) for the writes ``save_soon`` started."""
        ...

    async def claim_outcome(self, ref: SessionRef, outcome: str) -> str | None:
        """Record the session's outcome unless one is recorded already: None when this call recorded it, else
        the outcome reported first. Atomic, apart from the session state the turns rewrite."""
        ...


class MemorySessionStore:
    """Bounded LRU with a TTL, for one embedded proxy process."""

    def __init__(
        self, max_sessions: int = 10_000, ttl_s: float = 24 * 3600, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._max = max_sessions
        self._ttl = ttl_s
        self._clock = clock
        self._entries: OrderedDict[tuple[str, str], tuple[float, str]] = OrderedDict()
        self._outcomes: dict[tuple[str, str], str] = {}

    async def load(self, ref: SessionRef) -> SessionState:
        key = (ref.tenant, ref.session_id)
        found = self._entries.get(key)
        if found is None:
            return SessionState()
        expires, raw = found
        if expires <= self._clock():
            del self._entries[key]
            return SessionState()
        self._entries.move_to_end(key)
        # Stored as JSON so a caller mutating its copy cannot change what the next turn reads.
        return SessionState.model_validate_json(raw)

    async def save(self, ref: SessionRef, state: SessionState) -> None:
        self.save_soon(ref, state)

    def save_soon(self, ref: SessionRef, state: SessionState) -> None:
        key = (ref.tenant, ref.session_id)
        self._entries[key] = (self._clock() + self._ttl, state.model_dump_json())
        self._entries.move_to_end(key)
        while len(self._entries) > self._max:
            self._entries.popitem(last=False)

    async def drain(self) -> None:
        return None

    async def claim_outcome(self, ref: SessionRef, outcome: str) -> str | None:
        key = (ref.tenant, ref.session_id)
        first = self._outcomes.get(key)
        if first is not None:
            return first
        while len(self._outcomes) >= self._max:  # bounded like the sessions
            self._outcomes.pop(next(iter(self._outcomes)))
        self._outcomes[key] = outcome
        return None

    def __len__(self) -> int:
        return len(self._entries)


class RedisSessionStore:
    """One JSON value per session with a TTL. Failures degrade to empty state, never to a failed turn."""

    def __init__(
        self,
        redis: Redis,
        ttl_s: int,
        metrics: ProxyMetrics | None = None,
        timeout_s: float = 0.05,
        writer: BatchWriter | None = None,
    ) -> None:
        self._redis = redis
        self._ttl = ttl_s
        self._metrics = metrics
        self._timeout = timeout_s
        self._writer = writer  # shared with the recorder: a turn's records and its state in one round trip
        self._lanes = streams.Lanes(redis)  # a state read is on every supervised turn's path
        # Writes started by ``save_soon`` and not finished yet, by session: a later read or write of the same
        # session waits for its write first, so this process never reads its own state stale. A task is a
        # write of our own; a plain future is one queued in ``writer``.
        self._writing: dict[tuple[str, str], asyncio.Future[None]] = {}

    def _failed(self, op: str, ref: SessionRef, exc: BaseException) -> None:
        log.warning("session state %s failed for %s/%s: %r", op, ref.tenant, ref.session_id, exc)
        if self._metrics is not None:
            self._metrics.redis_errors.labels(op=f"session_state_{op}").inc()

    async def _written(self, ref: SessionRef) -> None:
        task = self._writing.get((ref.tenant, ref.session_id))
        if task is not None and not task.done():
            # Bounded (a batched write has no timeout of its own); ``wait`` (not ``await task``) leaves the
            # write running if this reader is cancelled.
            await asyncio.wait({task}, timeout=self._timeout * 2)

    async def load(self, ref: SessionRef) -> SessionState:
        await self._written(ref)
        try:
            async with asyncio.timeout(self._timeout):
                raw = await values.get(self._lanes, session_state_key(ref.tenant, ref.session_id))
        except (RedisError, OSError, TimeoutError) as exc:
            self._failed("load", ref, exc)
            return SessionState()
        if raw is None:
            return SessionState()
        try:
            return SessionState.model_validate_json(raw)
        except ValidationError as exc:
            self._failed("decode", ref, exc)
            return SessionState()

    async def save(self, ref: SessionRef, state: SessionState) -> None:
        await self._written(ref)
        await self._write(ref, state.model_dump_json())

    def save_soon(self, ref: SessionRef, state: SessionState) -> None:
        key = (ref.tenant, ref.session_id)
        # Serialized now: the caller may go on changing ``state``. Chained after an unfinished earlier write
        # of the session so the two land in order.
        earlier = self._writing.get(key)
        raw = state.model_dump_json()
        written: asyncio.Future[None] | None = None
        # Batched writes land in the order they were queued; one queued after a write of our own still
        # running could overtake it, so that one is chained instead.
        if self._writer is not None and (earlier is None or earlier.done() or not isinstance(earlier, asyncio.Task)):
            written = self._writer.set_soon(session_state_key(ref.tenant, ref.session_id), raw, self._ttl)
            if written is not None:
                written.add_done_callback(lambda f: self._batched(ref, f))
        if written is None:
            written = asyncio.get_running_loop().create_task(self._write_after(earlier, ref, raw))
        self._writing[key] = written
        written.add_done_callback(lambda t: self._writing.pop(key, None) if self._writing.get(key) is t else None)

    def _batched(self, ref: SessionRef, written: asyncio.Future[None]) -> None:
        exc = None if written.cancelled() else written.exception()
        if exc is not None:
            self._failed("save", ref, exc)

    async def drain(self) -> None:
        pending = [t for t in self._writing.values() if not t.done()]
        if pending:
            await asyncio.wait(pending, timeout=self._timeout * 2 + 1)

    async def claim_outcome(self, ref: SessionRef, outcome: str) -> str | None:
        """SET NX on its own key, so neither a second report nor a turn rewriting the state can undo it.
        Redis errors and timeouts reach the caller: an outcome is not to be dropped silently."""
        key = session_outcome_key(ref.tenant, ref.session_id)
        async with asyncio.timeout(self._timeout * 4):
            if await values.claim(self._lanes, key, outcome, ttl_ms=self._ttl * 1000):
                return None
            first = await values.get(self._lanes, key)
        return first.decode() if isinstance(first, bytes) else str(first or outcome)

    async def _write_after(self, earlier: asyncio.Future[None] | None, ref: SessionRef, raw: str) -> None:
        if earlier is not None and not earlier.done():
            await asyncio.wait({earlier}, timeout=self._timeout * 2)
        await self._write(ref, raw)

    async def _write(self, ref: SessionRef, raw: str) -> None:
        try:
            async with asyncio.timeout(self._timeout):
                await values.put(self._lanes, session_state_key(ref.tenant, ref.session_id), raw, ttl_s=self._ttl)
        except (RedisError, OSError, TimeoutError) as exc:
            self._failed("save", ref, exc)
