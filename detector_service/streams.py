"""Every Redis Streams operation the project performs, in one place.

Entries carry one opaque field, ``data`` (a wire payload, see ``wire.py``). The turn stream is read by
one consumer group; an entry is acknowledged only after its verdict is published. Entries that stay
unacknowledged past an idle threshold are reclaimed by a live consumer with ``XAUTOCLAIM``; an entry
delivered more than ``max_deliveries`` times, or one that cannot be parsed, is moved to the
dead-letter stream together with the error, then acknowledged. Nothing is dropped silently.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import ResponseError

from detector_service import keys

DATA_FIELD = "data"
DEAD_LETTER_MAXLEN = 100_000


@dataclass(frozen=True, slots=True)
class Entry:
    """One stream entry as read by a consumer. ``deliveries`` counts this delivery (1 = first)."""

    id: str
    data: str | None  # None when the entry has no ``data`` field
    deliveries: int = 1


@dataclass(frozen=True, slots=True)
class GroupStats:
    lag: int | None  # entries not yet delivered to the group; None when Redis cannot tell
    pending: int  # delivered but not yet acknowledged


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _entry(entry_id: Any, fields: dict[Any, Any] | None, deliveries: int = 1) -> Entry:
    data = None
    if fields:
        for k, v in fields.items():
            if _text(k) == DATA_FIELD:
                data = _text(v)
                break
    return Entry(id=_text(entry_id), data=data, deliveries=deliveries)


def _read_reply(reply: Any) -> list[Entry]:
    # RESP2 answers a list of [stream, entries]; RESP3 a mapping stream -> entries.
    items = reply.items() if isinstance(reply, dict) else (reply or [])
    out: list[Entry] = []
    for _name, entries in items:
        for item in entries or []:
            if item[0] is not None:  # an entry trimmed away while pending comes back empty
                out.append(_entry(item[0], item[1]))
    return out


async def publish(redis: Redis, stream: str, payload: str, *, maxlen: int) -> str:
    """Append one payload, trimming the stream to roughly ``maxlen`` entries."""
    entry_id = await redis.xadd(stream, {DATA_FIELD: payload}, maxlen=maxlen, approximate=True)
    return _text(entry_id)


async def ensure_group(redis: Redis, stream: str, group: str) -> bool:
    """Create the consumer group (and the stream) unless it exists. True if it was created.

    The group starts at the beginning of the stream, so turns published before the first worker
    ever ran are still evaluated.
    """
    try:
        await redis.xgroup_create(stream, group, id="0", mkstream=True)
    except ResponseError as exc:
        if str(exc).startswith("BUSYGROUP"):
            return False
        raise
    return True


async def read_group(redis: Redis, stream: str, group: str, consumer: str, *, count: int, block_ms: int) -> list[Entry]:
    """New entries for this consumer, waiting up to ``block_ms`` for the first one."""
    reply = await redis.xreadgroup(group, consumer, {stream: ">"}, count=count, block=block_ms)
    return _read_reply(reply)


async def ack_and_read_group(
    redis: Redis, stream: str, group: str, consumer: str, ack_ids: list[str], *, count: int, block_ms: int
) -> list[Entry]:
    """Acknowledge ``ack_ids``, then read new entries as :func:`read_group` does, in one round trip.

    XACK runs before the blocking XREADGROUP on the server, so the acknowledgement is not held by the wait.
    """
    if not ack_ids:
        return await read_group(redis, stream, group, consumer, count=count, block_ms=block_ms)
    async with redis.pipeline(transaction=False) as pipe:
        pipe.xack(stream, group, *ack_ids)
        pipe.xreadgroup(group, consumer, {stream: ">"}, count=count, block=block_ms)
        _acked, reply = await pipe.execute()
    return _read_reply(reply)


async def ack(redis: Redis, stream: str, group: str, ids: list[str]) -> int:
    if not ids:
        return 0
    return int(await redis.xack(stream, group, *ids))


async def reclaim(redis: Redis, stream: str, group: str, consumer: str, *, min_idle_ms: int, count: int) -> list[Entry]:
    """Take over entries idle longer than ``min_idle_ms`` from any consumer (crashed or stuck).

    Each returned entry carries its delivery count after this claim, read back with ``XPENDING``
    so the caller can dead-letter entries that keep failing.
    """
    reply = await redis.xautoclaim(stream, group, consumer, min_idle_ms, start_id="0-0", count=count)
    claimed = [_entry(item[0], item[1]) for item in (reply[1] or []) if item[0] is not None]
    if not claimed:
        return []
    pending = await redis.xpending_range(
        stream, group, min=claimed[0].id, max=claimed[-1].id, count=len(claimed) + count, consumername=consumer
    )
    deliveries = {_text(p["message_id"]): int(p["times_delivered"]) for p in pending}
    # A claimed entry was delivered at least twice: once to its first reader, once by this claim.
    return [Entry(id=e.id, data=e.data, deliveries=deliveries.get(e.id, 2)) for e in claimed]


async def dead_letter(
    redis: Redis,
    stream: str,
    group: str,
    entry: Entry,
    *,
    reason: str,
    error: str,
    consumer: str,
    dead_stream: str = keys.TURNS_DEAD_STREAM,
) -> str:
    """Copy the entry, with the error, to the dead-letter stream; acknowledge it only once that worked."""
    fields: dict[str, str | int] = {
        DATA_FIELD: entry.data if entry.data is not None else "",
        "error": error,
        "reason": reason,
        "source_stream": stream,
        "source_id": entry.id,
        "deliveries": entry.deliveries,
        "consumer": consumer,
    }
    dead_id = await redis.xadd(dead_stream, fields, maxlen=DEAD_LETTER_MAXLEN, approximate=True)  # type: ignore[arg-type]
    await redis.xack(stream, group, entry.id)
    return _text(dead_id)


async def group_stats(redis: Redis, stream: str, group: str) -> GroupStats:
    """Lag and pending count of one group (``XINFO GROUPS``; ``pending`` is the ``XPENDING`` total)."""
    for info in await redis.xinfo_groups(stream):
        if _text(info.get("name")) == group:
            lag = info.get("lag")
            return GroupStats(lag=int(lag) if lag is not None else None, pending=int(info.get("pending") or 0))
    return GroupStats(lag=None, pending=0)


async def publish_replies(
    redis: Redis,
    replies: list[tuple[str, str]],
    *,
    maxlen: int,
    ttl_s: int,
    expire: Collection[str] | None = None,
) -> list[bool]:
    """Publish several ``(reply_stream, payload)`` pairs in one round trip; True where the XADD succeeded.

    Reply streams get a short expiry, refreshed on writes, so the streams of proxies that went away
    vanish by themselves: after every write, or, with ``expire``, once per batch for the streams it names.
    """
    if not replies:
        return []
    refresh = {stream for stream, _ in replies} if expire is None else set(expire)
    positions: list[int] = []
    async with redis.pipeline(transaction=False) as pipe:
        for stream, payload in replies:
            positions.append(len(pipe))
            pipe.xadd(stream, {DATA_FIELD: payload}, maxlen=maxlen, approximate=True)
        for stream in refresh:
            pipe.expire(stream, ttl_s)
        results = await pipe.execute(raise_on_error=False)
    return [not isinstance(results[i], Exception) for i in positions]


async def read_replies(redis: Redis, stream: str, last_id: str, *, count: int, block_ms: int) -> list[Entry]:
    """Entries after ``last_id`` on a plain (non-group) stream, waiting up to ``block_ms``."""
    reply = await redis.xread({stream: last_id}, count=count, block=block_ms)
    return _read_reply(reply)
