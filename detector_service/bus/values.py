"""Every Redis command that is not a stream's: plain values with a TTL, set-once claims and locks, the session
lists, and the connection check. Each takes a client or a lane (:data:`detector_service.bus.streams.Sender`) and
answers Redis's own replies (bytes)."""

from __future__ import annotations

from detector_service.bus.streams import Sender, call


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
