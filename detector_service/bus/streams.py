"""Every Redis Streams operation the project performs, in one place.

Entries carry one opaque field, ``data`` (a wire payload, see ``wire.py``). The turn stream is read by
one consumer group; an entry is acknowledged only after its verdict is published. Entries that stay
unacknowledged past an idle threshold are reclaimed by a live consumer with ``XAUTOCLAIM``; an entry
delivered more than ``max_deliveries`` times, or one that cannot be parsed, is moved to the
dead-letter stream together with the error, then acknowledged. Nothing is dropped silently.

The commands on a turn's path (publish, read, acknowledge, reply) take a client, a :class:`Lane` (a
connection one task keeps for its loop: the worker's consume loop, the proxy's reply reader and its
recorder) or :class:`Lanes` (lanes shared by a process's concurrent turns); lanes spare every command the
client's per-command machinery.
"""

from __future__ import annotations

import asyncio
from collections.abc import Collection
from dataclasses import dataclass
from typing import Any

import hiredis
from redis.asyncio import Redis
from redis.asyncio.connection import AbstractConnection
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.typing import EncodableT

from detector_service.bus import keys

DATA_FIELD = "data"
DEAD_LETTER_MAXLEN = 100_000

Command = tuple[EncodableT, ...]


class Lane:
    """One connection taken from a client's pool for the commands of a single task, sent as raw commands.

    A client command checks a connection out of the pool and back in, goes through a retry wrapper,
    observability hooks and a reply callback: on a loaded host that costs more CPU than the command's
    round trip. A lane keeps its connection and sends commands straight on it; replies are Redis's own
    (bytes, integers, lists). Connection failures are handled as the client handles them: the connection
    is dropped and the exchange retried as the client's retry policy says (it reconnects on the next send),
    and whatever still fails is raised as a ``RedisError``. Not for concurrent use: one task drives a lane.

    The client's socket timeout bounds each exchange as a whole (one timer). Left on the connection,
    redis-py would run every write in a task of its own and arm a timer for every reply.
    """

    def __init__(self, redis: Redis) -> None:
        self._pool = redis.connection_pool
        self._conn: AbstractConnection | None = None
        self._timeout: float | None = None

    async def send(self, *commands: Command) -> list[Any]:
        """Send ``commands`` in one write and read every reply; an error reply is returned in its place."""
        conn = self._conn
        if conn is None:
            conn = await self._pool.get_connection()  # type: ignore[no-untyped-call]
            self._timeout, conn.socket_timeout = conn.socket_timeout, None  # given back on ``aclose``
            self._conn = conn

        async def dropped(error: Exception) -> None:
            await conn.disconnect()

        replies: list[Any] = await conn.retry.call_with_retry(lambda: self._exchange(conn, commands), dropped)
        return replies

    async def _exchange(self, conn: AbstractConnection, commands: tuple[Command, ...]) -> list[Any]:
        if self._timeout is None:
            return await _exchange(conn, commands)
        try:
            async with asyncio.timeout(self._timeout):
                return await _exchange(conn, commands)
        except TimeoutError:
            # Cut off mid-exchange, the connection was dropped (redis-py drops it on any interruption).
            raise RedisTimeoutError(f"no answer from Redis within {self._timeout}s") from None

    async def aclose(self) -> None:
        """Give the connection back to the pool (a later ``send`` takes one again)."""
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.socket_timeout = self._timeout
            await self._pool.release(conn)

    async def __aenter__(self) -> Lane:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


def _packed(conn: AbstractConnection, commands: tuple[Command, ...]) -> bytes | list[bytes]:
    if conn.encoder.encoding.lower().replace("-", "") == "utf8":
        # hiredis packs in C, several times faster than redis-py's packer in Python; it writes text as UTF-8.
        return b"".join([hiredis.pack_command(command) for command in commands])  # type: ignore[arg-type]
    return conn.pack_commands(commands)


async def _exchange(conn: AbstractConnection, commands: tuple[Command, ...]) -> list[Any]:
    await conn.send_packed_command(_packed(conn, commands))
    replies: list[Any] = []
    for _ in commands:  # every reply is read, errors too, so the connection stays in step
        try:
            replies.append(await conn.read_response())
        except ResponseError as exc:
            replies.append(exc)
    return replies


class Lanes:
    """Lanes for the commands of many tasks: an exchange takes an idle lane, or opens one, and gives it back.

    It holds as many connections as exchanges ever ran at once, like the client's own pool, without its
    per-command costs. A lane given back after a failure or a cancellation has dropped its connection and
    opens a new one on its next exchange.
    """

    def __init__(self, redis: Redis) -> None:
        self._redis = redis
        self._idle: list[Lane] = []

    async def send(self, *commands: Command) -> list[Any]:
        lane = self._idle.pop() if self._idle else Lane(self._redis)
        try:
            return await lane.send(*commands)
        finally:
            self._idle.append(lane)

    async def aclose(self) -> None:
        """Give the idle lanes' connections back to the client's pool."""
        idle, self._idle = self._idle, []
        for lane in idle:
            await lane.aclose()


Sender = Redis | Lane | Lanes


async def send(on: Sender, *commands: Command) -> list[Any]:
    """``commands`` in one round trip on a lane, or on a connection borrowed from the client for it."""
    if not isinstance(on, Redis):
        return await on.send(*commands)
    async with Lane(on) as lane:
        return await lane.send(*commands)


async def call(on: Sender, *command: EncodableT) -> Any:
    """One command's raw reply; an error reply is raised (``ResponseError``)."""
    (reply,) = await send(on, command)
    if isinstance(reply, ResponseError):
        raise reply
    return reply


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


def _entry(entry_id: Any, fields: Any, deliveries: int = 1) -> Entry:
    # Fields come as a mapping from the client's parsed replies, as a flat [name, value, ...] list from a raw one.
    if isinstance(fields, dict):
        pairs: Any = fields.items()
    else:
        pairs = zip(fields[::2], fields[1::2], strict=False) if fields else ()
    data = None
    for k, v in pairs:
        if _text(k) == DATA_FIELD:
            data = _text(v)
            break
    return Entry(id=_text(entry_id), data=data, deliveries=deliveries)


def _read_reply(reply: Any) -> list[Entry]:
    # RESP2 answers a list of [stream, entries]; RESP3 a mapping stream -> entries; nil when the block timed out.
    items = reply.items() if isinstance(reply, dict) else (reply or [])
    out: list[Entry] = []
    for _name, entries in items:
        for item in entries or []:
            if item[0] is not None:  # an entry trimmed away while pending comes back empty
                out.append(_entry(item[0], item[1]))
    return out


def _xadd(stream: str, payload: str, maxlen: int, *fields: str) -> Command:
    return ("XADD", stream, "MAXLEN", "~", maxlen, "*", DATA_FIELD, payload, *fields)


def _xreadgroup(stream: str, group: str, consumer: str, count: int, block_ms: int) -> Command:
    return ("XREADGROUP", "GROUP", group, consumer, "COUNT", count, "BLOCK", block_ms, "STREAMS", stream, ">")


async def publish(redis: Sender, stream: str, payload: str, *, maxlen: int) -> str:
    """Append one payload, trimming the stream to roughly ``maxlen`` entries."""
    return _text(await call(redis, *_xadd(stream, payload, maxlen)))


async def publish_all(on: Sender, stream: str, payloads: list[str], *, maxlen: int, **fields: str) -> None:
    """Append several payloads (each with ``fields`` beside its ``data``) in one round trip; the first error
    reply is raised."""
    tagged = [part for pair in fields.items() for part in pair]
    for reply in await send(on, *(_xadd(stream, payload, maxlen, *tagged) for payload in payloads)):
        if isinstance(reply, ResponseError):
            raise reply


async def latest(on: Sender, stream: str, count: int) -> list[Entry]:
    """The newest ``count`` entries, newest first."""
    return [_entry(item[0], item[1]) for item in await call(on, "XREVRANGE", stream, "+", "-", "COUNT", count) or []]


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


async def read_group(
    redis: Sender, stream: str, group: str, consumer: str, *, count: int, block_ms: int
) -> list[Entry]:
    """New entries for this consumer, waiting up to ``block_ms`` for the first one."""
    return _read_reply(await call(redis, *_xreadgroup(stream, group, consumer, count, block_ms)))


async def ack_and_read_group(
    redis: Sender, stream: str, group: str, consumer: str, ack_ids: list[str], *, count: int, block_ms: int
) -> list[Entry]:
    """Acknowledge ``ack_ids``, then read new entries as :func:`read_group` does, in one round trip.

    XACK runs before the blocking XREADGROUP on the server, so the acknowledgement is not held by the wait.
    """
    if not ack_ids:
        return await read_group(redis, stream, group, consumer, count=count, block_ms=block_ms)
    acked, reply = await send(
        redis, ("XACK", stream, group, *ack_ids), _xreadgroup(stream, group, consumer, count, block_ms)
    )
    for answer in (acked, reply):
        if isinstance(answer, ResponseError):
            raise answer
    return _read_reply(reply)


async def ack(redis: Sender, stream: str, group: str, ids: list[str]) -> int:
    if not ids:
        return 0
    return int(await call(redis, "XACK", stream, group, *ids))


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
    redis: Sender,
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
    commands = [_xadd(stream, payload, maxlen) for stream, payload in replies]
    commands += [("EXPIRE", stream, ttl_s) for stream in refresh]
    results = await send(redis, *commands)
    return [not isinstance(r, ResponseError) for r in results[: len(replies)]]


async def read_replies(redis: Sender, stream: str, last_id: str, *, count: int, block_ms: int) -> list[Entry]:
    """Entries after ``last_id`` on a plain (non-group) stream, waiting up to ``block_ms``."""
    return _read_reply(await call(redis, "XREAD", "COUNT", count, "BLOCK", block_ms, "STREAMS", stream, last_id))
