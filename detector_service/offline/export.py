"""``fama sessions export``: every recorded session in Redis as one trajectory record per JSONL line
(:mod:`detector_service.offline.sessions`), streamed: Redis is read a batch at a time
(:func:`detector_service.bus.values.recorded_sessions`) and each record written as soon as it is built, so memory
stays flat however many sessions there are.
"""

from __future__ import annotations

import asyncio
import re
import sys
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import BinaryIO

from redis.asyncio import Redis
from redis.exceptions import RedisError

from detector_service.bus.client import DETECTOR, redis_client
from detector_service.bus.values import RecordedSession, recorded_sessions
from detector_service.contract.redaction import RedactSecrets, url_secrets
from detector_service.offline.sessions import ExportFilter, jsonl_line, kept, session_record

_DURATION = re.compile(r"(\d+)\s*([smhdw])")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}


@dataclass
class Exported:
    sessions: int = 0
    with_outcome: int = 0
    skipped: int = 0  # read but left out by the filter (or holding no turn)
    unreadable: list[str] = field(default_factory=list)  # sessions whose record could not be read (kept: the first few)
    unreadable_count: int = 0


def since_ms(since: str | None, last: str | None, now: datetime | None = None) -> int | None:
    """The start of the window, in epoch milliseconds: ``since`` (ISO 8601; UTC unless it names a zone) or ``last``
    (``7d``, ``12h``, ``30m``, ``2w``) before ``now``. ValueError naming the flag when unreadable."""
    if since is not None and last is not None:
        raise ValueError("give --since or --last, not both")
    if since is not None:
        try:
            start = datetime.fromisoformat(since)
        except ValueError:
            raise ValueError(f"--since: {since!r} is not an ISO 8601 time (e.g. 2026-12-01T00:00:00Z)") from None
        start = start if start.tzinfo is not None else start.replace(tzinfo=UTC)
        return int(start.timestamp() * 1000)
    if last is not None:
        match = _DURATION.fullmatch(last.strip())
        if match is None:
            raise ValueError(f"--last: {last!r} is not a duration such as 7d, 12h, 30m or 2w")
        window = timedelta(**{_UNITS[match.group(2)]: int(match.group(1))})
        return int(((now or datetime.now(UTC)) - window).timestamp() * 1000)
    return None


async def jsonl_records(
    sessions: AsyncIterator[RecordedSession], keep: ExportFilter, done: Exported | None = None
) -> AsyncIterator[bytes]:
    """Each session of ``sessions`` that ``keep`` keeps, as one JSONL line, counted in ``done``."""
    done = done if done is not None else Exported()
    async for s in sessions:
        claimed = s.outcome.decode() if s.outcome is not None else None
        try:
            record = kept(session_record(s.tenant, s.session_id, s.entries, claimed), keep)
        except (ValueError, TypeError, AttributeError):  # a corrupt or foreign entry: the other sessions still go out
            done.unreadable_count += 1
            if len(done.unreadable) < 5:
                done.unreadable.append(f"{s.tenant}/{s.session_id}")
            continue
        if record is None:
            done.skipped += 1
            continue
        done.sessions += 1
        done.with_outcome += record["outcome"] is not None
        yield jsonl_line(record)


async def export(redis: Redis, out: BinaryIO, *, tenant: str | None = None, keep: ExportFilter) -> Exported:
    done = Exported()
    async for line in jsonl_records(recorded_sessions(redis, tenant), keep, done):
        out.write(line)
    return done


async def _export_to(redis_url: str, path: Path, tenant: str | None, keep: ExportFilter) -> Exported:
    redis = redis_client(redis_url, DETECTOR, block_ms=0)
    try:
        with path.open("wb") as out:
            return await export(redis, out, tenant=tenant, keep=keep)
    finally:
        await redis.aclose()


def export_command(
    redis_url: str,
    out: Path,
    *,
    tenant: str | None = None,
    since: str | None = None,
    last: str | None = None,
    with_outcome_only: bool = False,
    redact: bool = False,
    secrets: Iterable[str] = (),
) -> int:
    """``secrets``: what the logs redact by name besides the shapes every log redacts (keys, passwords in URLs)."""
    try:
        start = since_ms(since, last)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    redactor = RedactSecrets([*secrets, *url_secrets(redis_url)]) if redact else None
    keep = ExportFilter(since_ms=start, with_outcome_only=with_outcome_only, redactor=redactor)
    try:
        done = asyncio.run(_export_to(redis_url, out, tenant, keep))
    except (RedisError, OSError) as exc:
        print(
            f"error: could not export the sessions: {RedactSecrets(url_secrets(redis_url)).redact(str(exc))}",
            file=sys.stderr,
        )
        return 1
    print(
        f"exported {done.sessions} sessions ({done.with_outcome} with an outcome) to {out}; "
        f"{done.skipped} left out by the filters",
        file=sys.stderr,
    )
    if done.unreadable_count:
        print(
            f"warning: {done.unreadable_count} sessions had unreadable records and were left out "
            f"(e.g. {', '.join(done.unreadable)})",
            file=sys.stderr,
        )
    return 0
