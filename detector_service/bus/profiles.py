"""Publishing and watching the pushed profile (``keys.PROFILE_KEY``), for every proxy replica and detector.

A push raises the hash's ``version`` counter and stores the profile's canonical JSON in one transaction, so a
reader never sees one push's version with another's document. Each process polls the version and hash every
``poll_s`` (one ``HMGET``) and, when they differ from those of the profile it holds, reads the document and
offers it to its :class:`~detector_service.contract.active_profile.ProfileHolder`. Polling, not pub/sub: a
process that was disconnected, or started later, catches up on its next poll, and nothing is lost between a
message and a subscription. A store that was emptied (no key) changes nothing: the process keeps what it holds.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

import orjson
from redis.asyncio import Redis
from redis.exceptions import RedisError, ResponseError

from detector_service.bus import keys
from detector_service.bus.streams import call, send
from detector_service.contract.active_profile import ActiveProfile, ProfileHolder
from detector_service.contract.profile import Profile, ProfileError, parse_profile
from detector_service.contract.wire import now_ms

log = logging.getLogger(__name__)

POLL_S = 0.25  # a push reaches every process within this plus one read (one HMGET per poll: nothing for Redis)


async def push_profile(redis: Redis, profile: Profile) -> ActiveProfile:
    """Store ``profile`` as the next pushed version; the :class:`ActiveProfile` it became."""
    unsaved = ActiveProfile(profile, source="pushed", pushed_ms=now_ms())
    replies = await send(
        redis,
        ("MULTI",),
        ("HINCRBY", keys.PROFILE_KEY, "version", 1),
        (
            "HSET",
            keys.PROFILE_KEY,
            "document",
            unsaved.document(),
            "sha256",
            unsaved.sha256,
            "pushed_ms",
            unsaved.pushed_ms or 0,
        ),
        ("EXEC",),
    )
    for reply in replies:
        if isinstance(reply, ResponseError):
            raise reply
    version, _ = replies[-1]
    return ActiveProfile(profile, int(version), "pushed", unsaved.pushed_ms)


async def stored_version(redis: Redis) -> tuple[int, str] | None:
    """The stored profile's version and sha256, or None when none was pushed."""
    version, digest = await call(redis, "HMGET", keys.PROFILE_KEY, "version", "sha256")
    return None if version is None else (int(version), (digest or b"").decode())


async def stored_profile(redis: Redis) -> ActiveProfile | None:
    """The pushed profile, or None when none was pushed. ``ProfileError`` when this build cannot read it."""
    version, document, pushed_ms = await call(redis, "HMGET", keys.PROFILE_KEY, "version", "document", "pushed_ms")
    if version is None or document is None:
        return None
    origin = f"the stored profile (version {version.decode(errors='replace')})"
    try:
        raw = orjson.loads(document)
    except orjson.JSONDecodeError as exc:
        raise ProfileError(f"{origin} is not JSON: {exc}") from exc
    return ActiveProfile(parse_profile(raw, origin), int(version), "pushed", int(pushed_ms) if pushed_ms else None)


class ProfileWatch:
    """Keeps a holder on the stored profile: once at :meth:`start` (before the process serves), then each ``poll_s``."""

    def __init__(self, redis: Redis, holder: ProfileHolder, *, poll_s: float = POLL_S) -> None:
        self.redis = redis
        self.holder = holder
        self.poll_s = poll_s
        self._task: asyncio.Task[None] | None = None
        self._unreadable: tuple[int, str] | None = None  # a stored profile this build refused, logged once
        self._failing = False

    async def start(self) -> None:
        await self.refresh()
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="profile-watch")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def publish(self, profile: Profile) -> ActiveProfile:
        """Push ``profile`` for every process and take it here at once (the others within ``poll_s``)."""
        active = await push_profile(self.redis, profile)
        self.holder.offer(active)
        return active

    async def refresh(self) -> None:
        """Take the stored profile if it is not the one held. Redis failures and a stored profile this build cannot
        read are logged, never raised: the profile in force stays."""
        version = None
        try:
            version = await stored_version(self.redis)
            held = (self.holder.current.version, self.holder.current.sha256)
            # Version and hash: after a reset of the store, its version 1 is not the version 1 held before.
            if version is None or version in (held, self._unreadable):
                self._recovered()
                return
            stored = await stored_profile(self.redis)
        except (RedisError, OSError) as exc:
            if not self._failing:
                log.warning("cannot read the pushed profile from Redis (%s); keeping version %d", exc, self._version)
            self._failing = True
            return
        except ValueError as exc:  # ProfileError included: not a profile this build reads
            self._unreadable = version
            log.error("%s; keeping version %d", exc, self._version)
            return
        self._recovered()
        if stored is not None:
            self.holder.offer(stored, newer_only=False)  # the store is the authority, even after a reset

    @property
    def _version(self) -> int:
        return self.holder.current.version

    def _recovered(self) -> None:
        if self._failing:
            log.info("the pushed profile is readable again")
        self._failing = False

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.poll_s)
            try:
                await self.refresh()
            except Exception:  # the watch must outlive a bug in one poll; it is logged and the next poll runs
                log.exception("the profile watch failed; polling again in %.2fs", self.poll_s)
