"""Every Redis command that is not a stream's: plain values with a TTL, set-once claims and locks, the session
lists (and reading every recorded session back, :func:`recorded_sessions`), and the connection check. Each takes a
client or a lane (:data:`detector_service.bus.streams.Sender`) and answers Redis's own replies (bytes)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass

from detector_service.bus import keys
from detector_service.bus.streams import Command, Sender, call, send


async def get(on: Sender, key: str) -> bytes | None:
    value: bytes | None = await call(on, "GET", key)
    return value


async def put(on: Sender, key: str, value: str | bytes, *, ttl_s: int) -> None:
    await call(on, "SET", key, value, "EX", ttl_s)


async def claim(on: Sender, key: str, value: str, *, ttl_ms: int) -> bool:
    """Set ``key`` unless it exists (a set-once value, a lock); True when this call set it."""
    return await call(on, "SET", key, value, "NX", "PX", ttl_ms) is not None


async def exists(on: Sender, key: str) -> bool:
    return bool(await call(on, "EXISTS", key))


async def delete(on: Sender, key: str) -> bool:
    """True when the key existed."""
    return bool(await call(on, "DEL", key))


async def read_list(on: Sender, key: str) -> list[bytes]:
    items: list[bytes] = await call(on, "LRANGE", key, 0, -1)
    return items


async def ping(on: Sender) -> None:
    await call(on, "PING")


@dataclass(frozen=True, slots=True)
class RecordedSession:
    tenant: str
    session_id: str
    entries: list[bytes]  # the session record's JSON entries, oldest first
    outcome: bytes | None  # the outcome claimed for the session (``fama:outcome:...``), if any


async def recorded_sessions(
    on: Sender, tenant: str | None = None, *, count: int = 200, max_entries: int = 20_000
) -> AsyncIterator[RecordedSession]:
    """Every recorded session (of ``tenant``, or of all tenants), streamed: ``SCAN`` over the session lists, their
    lengths in one round trip, then their entries and outcome claims in as few round trips as keep at most
    ``max_entries`` entries (or one session) in memory. Memory also holds a hash of each key already read: ``SCAN``
    may return a key twice while Redis resizes its table."""
    seen: set[int] = set()
    cursor: bytes | int = 0
    pattern = keys.session_pattern(tenant)
    while True:
        cursor, found = await call(on, "SCAN", cursor, "MATCH", pattern, "COUNT", count, "TYPE", "list")
        fresh = [name for name in found if hash(name) not in seen]
        seen.update(hash(name) for name in fresh)
        lengths = await send(on, *[("LLEN", name) for name in fresh]) if fresh else []
        batch: list[bytes] = []
        held = 0
        for name, length in zip(fresh, lengths, strict=True):
            if batch and held + (length if isinstance(length, int) else 0) > max_entries:
                async for session in _read_sessions(on, batch):
                    yield session
                batch, held = [], 0
            batch.append(name)
            held += length if isinstance(length, int) else 0
        if batch:
            async for session in _read_sessions(on, batch):
                yield session
        if int(cursor) == 0:
            return


async def _read_sessions(on: Sender, names: list[bytes]) -> AsyncIterator[RecordedSession]:
    refs = [keys.session_of_key(name.decode()) for name in names]
    commands: list[Command] = [("LRANGE", name, 0, -1) for name in names]
    commands += [("GET", keys.session_outcome_key(tenant, session)) for tenant, session in refs]
    replies = await send(on, *commands)
    for i, (tenant, session) in enumerate(refs):
        entries, outcome = replies[i], replies[len(names) + i]
        if isinstance(entries, list) and entries:  # expired between SCAN and LRANGE: nothing left to read
            yield RecordedSession(tenant, session, entries, outcome if isinstance(outcome, bytes) else None)
