"""One member of the ``detectors`` consumer group on ``fama:turns`` (the process around it: :mod:`detector_service.service`).

The loop blocks on ``XREADGROUP``, evaluates each turn with the engine, publishes the verdict to the
turn's ``reply_to`` stream and only then acknowledges the entry (the ``XACK`` is pipelined with the next
``XREADGROUP``: one round trip per batch instead of two). Now and then it reclaims entries
left idle by crashed consumers. On SIGTERM/SIGINT it stops reading, finishes the batch in hand and
exits within ``drain_timeout_s``. ``until_idle`` ("burst") exits once nothing is pending and nothing
new arrives, so tests need no sleeps.

With ``profile.judge.enabled`` the LLM judge runs after the deterministic verdict, concurrently for
the turns of a batch that it is asked about (``judge.worth_judging``; the verdicts of pure look-ups go out
at once), at most ``judge_concurrency`` calls at once, each bounded by its turn's
remaining deadline and the judge's own timeout; verdicts are published as their calls end. Its
findings are merged into the verdict; when it fails or runs out of time the deterministic verdict is
published unchanged.

With ``profile.llm_agents`` naming DCE, each batch's policy texts are handed to the extraction
scheduler after the verdicts are published (:mod:`detector_service.llm.extraction`).

The engine runs inline: it is pure CPU and takes microseconds per turn, so a thread would only add
hand-off cost without freeing the GIL.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass

import orjson
from pydantic import ValidationError
from redis.asyncio import Redis
from redis.exceptions import RedisError, ResponseError

from detector_service.bus import keys, streams
from detector_service.contract.wire import SchemaVersionError, TurnEvent, Verdict, check_version, dumps, now_ms
from detector_service.engine import Engine
from detector_service.llm.extraction import ExtractionScheduler
from detector_service.llm.judge import Judge, judged, worth_judging
from detector_service.metrics import DetectorMetrics
from detector_service.settings import DetectorSettings

log = logging.getLogger(__name__)

STATS_INTERVAL_S = 2.0
MAX_BACKOFF_S = 2.0
PUBLISH_MARGIN_MS = 20  # kept free before a turn's deadline to publish its verdict
MAX_REPLY_STREAMS = 1024  # reply streams whose expiry refresh is tracked before quiet ones are forgotten
ACK_FLUSH_TIMEOUT_S = 1.0  # bounds the last acknowledgement of a stopping worker


class MalformedEntry(ValueError):
    """The entry cannot be turned into a ``TurnEvent``; ``reason`` labels the dead letter."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def parse_turn(data: str | None) -> TurnEvent:
    if data is None:
        raise MalformedEntry("malformed", "entry has no 'data' field")
    try:
        payload = orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raise MalformedEntry("malformed", f"data is not JSON: {exc}") from exc
    if not isinstance(payload, dict):
        raise MalformedEntry("malformed", f"data is a JSON {type(payload).__name__}, not an object")
    try:
        check_version(payload)
    except SchemaVersionError as exc:
        raise MalformedEntry("version", str(exc)) from exc
    try:
        turn = TurnEvent.model_validate(payload)
    except ValidationError as exc:
        raise MalformedEntry("malformed", f"not a turn event: {exc}") from exc
    if turn.reply_to is not None and not turn.reply_to.startswith(keys.REPLY_STREAM_PREFIX):
        # Verdicts are written only to reply streams, never to another key a producer names.
        raise MalformedEntry("malformed", f"reply_to {turn.reply_to!r} is not a reply stream")
    return turn


@dataclass(slots=True)
class _Done:
    entry: streams.Entry
    verdict: Verdict
    turn: TurnEvent


class Worker:
    def __init__(
        self,
        settings: DetectorSettings,
        redis: Redis,
        engine: Engine,
        metrics: DetectorMetrics,
        judge: Judge | None = None,
        extractions: ExtractionScheduler | None = None,
    ) -> None:
        self.settings = settings
        self.redis = redis
        self.engine = engine
        self.metrics = metrics
        self.judge = judge
        self.extractions = extractions
        self.consumer = settings.consumer_name
        # The consume loop's own connection: its reads, acknowledgements and replies skip the client's
        # per-command machinery (they are most of what a turn costs this process besides the detectors).
        self._lane = streams.Lane(redis)
        self.processed = 0
        self._judge_slots = asyncio.Semaphore(settings.judge_concurrency)
        # Published but not yet acknowledged: the acknowledgement rides with the next read (one round trip less
        # per batch); ``flush_acks`` sends it on its own before anything that must see it (stats, exit).
        self._unacked: list[str] = []
        # When each reply stream's expiry is next due for a refresh: a quarter of its TTL after the last one,
        # not after every verdict (each refresh is one more command on the verdict's round trip).
        self._refresh_at: dict[str, float] = {}

    async def run(self, stop: asyncio.Event, *, until_idle: bool = False) -> None:
        """Consume until ``stop`` is set (or, with ``until_idle``, until the group has no work left)."""
        s = self.settings
        claim_every = max(s.claim_idle_ms / 2000, 0.05)
        next_claim = 0.0
        next_stats = 0.0
        backoff = 0.1
        await self._ensure_group(stop)
        self.metrics.up.set(1)
        try:
            while not stop.is_set():
                try:
                    now = time.monotonic()
                    if now >= next_claim:
                        next_claim = now + claim_every
                        await self._reclaim()
                    acking = self._unacked
                    entries = await streams.ack_and_read_group(
                        self._lane,
                        keys.TURNS_STREAM,
                        keys.DETECTOR_GROUP,
                        self.consumer,
                        acking,
                        count=s.batch_size,
                        block_ms=s.block_ms,
                    )
                    # Only once the pipeline went through: after a failure XACK is simply sent again (idempotent).
                    self._unacked = self._unacked[len(acking) :]
                    if entries:
                        await self.handle(entries)
                    if time.monotonic() >= next_stats or (until_idle and not entries):
                        await self.flush_acks()
                        next_stats = time.monotonic() + STATS_INTERVAL_S
                        stats = await self._stats()
                        if until_idle and not entries and stats.pending == 0:
                            log.info("no work left; exiting (until-idle)")
                            return
                    backoff = 0.1
                except (RedisError, OSError) as exc:
                    if isinstance(exc, ResponseError) and str(exc).startswith("NOGROUP"):
                        # The stream or group vanished (Redis restarted without persistence, or a flush).
                        self.metrics.redis_errors.labels(op="nogroup").inc()
                        log.warning("consumer group is gone; creating it again: %s", exc)
                        await self._ensure_group(stop)
                        continue
                    self.metrics.redis_errors.labels(op="loop").inc()
                    log.warning("redis error in the consume loop, retrying in %.1fs: %s", backoff, exc)
                    await _wait(stop, backoff)
                    backoff = min(backoff * 2, MAX_BACKOFF_S)
        finally:
            self.metrics.up.set(0)
            await self._final_acks()
            await self._lane.aclose()

    async def flush_acks(self) -> None:
        """Acknowledge every published turn now."""
        acking = self._unacked
        await streams.ack(self._lane, keys.TURNS_STREAM, keys.DETECTOR_GROUP, acking)
        self._unacked = self._unacked[len(acking) :]

    async def _final_acks(self) -> None:
        # On the way out: an entry left unacknowledged is evaluated again by whoever reclaims it.
        if not self._unacked:
            return
        try:
            async with asyncio.timeout(ACK_FLUSH_TIMEOUT_S):
                await self.flush_acks()
        except (RedisError, OSError, TimeoutError) as exc:
            self.metrics.redis_errors.labels(op="ack").inc()
            log.warning("could not acknowledge %d published turns on exit: %s", len(self._unacked), exc)

    async def _ensure_group(self, stop: asyncio.Event) -> None:
        backoff = 0.1
        while not stop.is_set():
            try:
                await streams.ensure_group(self.redis, keys.TURNS_STREAM, keys.DETECTOR_GROUP)
                return
            except (RedisError, OSError) as exc:
                self.metrics.redis_errors.labels(op="group_create").inc()
                log.warning("cannot create consumer group yet, retrying in %.1fs: %s", backoff, exc)
                await _wait(stop, backoff)
                backoff = min(backoff * 2, MAX_BACKOFF_S)

    async def _reclaim(self) -> None:
        s = self.settings
        entries = await streams.reclaim(
            self.redis,
            keys.TURNS_STREAM,
            keys.DETECTOR_GROUP,
            self.consumer,
            min_idle_ms=s.claim_idle_ms,
            count=s.batch_size,
        )
        if entries:
            self.metrics.reclaimed.inc(len(entries))
            log.info("reclaimed %d idle entries", len(entries))
            await self.handle(entries)

    async def _stats(self) -> streams.GroupStats:
        stats = await streams.group_stats(self.redis, keys.TURNS_STREAM, keys.DETECTOR_GROUP)
        if stats.lag is not None:
            self.metrics.stream_lag.set(stats.lag)
        self.metrics.pending.set(stats.pending)
        return stats

    async def handle(self, entries: list[streams.Entry]) -> None:
        """Evaluate a batch and publish its verdicts (one round trip; in waves with the judge).

        Published entries are acknowledged with the next read (or ``flush_acks``), never before their verdict is out.
        """
        s = self.settings
        done: list[_Done] = []
        for entry in entries:
            if entry.deliveries > s.max_deliveries:
                await self._dead(
                    entry,
                    "max_deliveries",
                    f"delivered {entry.deliveries} times without being acknowledged "
                    f"(limit {s.max_deliveries}): its consumers failed or crashed",
                )
                continue
            try:
                turn = parse_turn(entry.data)
            except MalformedEntry as exc:
                await self._dead(entry, exc.reason, str(exc))
                continue
            start = time.perf_counter()
            try:
                verdict = self.engine.evaluate(turn)
            except Exception as exc:  # a detector bug must not stop the worker; the entry is retried or dead-lettered
                self.metrics.turns.labels(outcome="error").inc()
                log.exception(
                    "engine failed on turn %s (entry %s, delivery %d)", turn.turn_id, entry.id, entry.deliveries
                )
                if entry.deliveries >= s.max_deliveries:
                    await self._dead(entry, "failed", f"{type(exc).__name__}: {exc}")
                continue
            self.metrics.processing.observe(time.perf_counter() - start)
            verdict.worker = self.consumer
            done.append(_Done(entry, verdict, turn))
        if not done:
            return
        if self.judge is None:
            await self._publish(done)
        else:
            await self._publish_judged(self.judge, done)
        if self.extractions is not None:
            self.extractions.notice(d.turn for d in done)

    async def _publish_judged(self, judge: Judge, done: list[_Done]) -> None:
        """Judge the batch's turns concurrently; publish verdicts in waves as their judge calls end.

        Waves keep a turn with a far deadline (or none) from holding back a neighbour's verdict.
        """
        asked: list[_Done] = []
        not_asked: list[_Done] = []
        for d in done:
            (asked if worth_judging(d.turn, self.engine.profile) else not_asked).append(d)
        if not_asked:
            await self._publish(not_asked)
        waiting: dict[asyncio.Task[Verdict], _Done] = {
            asyncio.create_task(self._judged(judge, d.turn, d.verdict)): d for d in asked
        }
        try:
            while waiting:
                finished, _ = await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
                wave = []
                for task in finished:
                    d = waiting.pop(task)
                    d.verdict = task.result()
                    wave.append(d)
                await self._publish(wave)
        finally:
            for task in waiting:
                task.cancel()

    async def _publish(self, done: list[_Done]) -> None:
        """Publish verdicts in one round trip; what was published is queued for acknowledgement."""
        s = self.settings
        replies = [(d.turn.reply_to, dumps(d.verdict)) for d in done if d.turn.reply_to]
        now = time.monotonic()
        refresh = {stream for stream, _ in replies if self._refresh_at.get(stream, 0.0) <= now}
        results = await streams.publish_replies(
            self._lane, replies, maxlen=s.reply_maxlen, ttl_s=s.reply_ttl_s, expire=refresh
        )
        self._refreshed(refresh, now)
        published = iter(results)
        to_ack: list[str] = []
        for d in done:
            # A turn without reply_to asks for no answer (nobody waits): evaluate, count and acknowledge.
            if d.turn.reply_to and not next(published):
                self.metrics.redis_errors.labels(op="publish").inc()
                log.warning(
                    "could not publish the verdict for entry %s to %s; left pending", d.entry.id, d.turn.reply_to
                )
                continue
            to_ack.append(d.entry.id)
            self.metrics.turns.labels(outcome="ok").inc()
            self.metrics.verdicts.labels(action=d.verdict.action.value).inc()
            for f in d.verdict.findings:
                self.metrics.findings.labels(category=f.category.value, detector=f.detector).inc()
        self._unacked.extend(to_ack)
        self.processed += len(to_ack)

    def _refreshed(self, streams_: set[str], now: float) -> None:
        due = now + self.settings.reply_ttl_s / 4
        for stream in streams_:
            self._refresh_at[stream] = due
        if len(self._refresh_at) > MAX_REPLY_STREAMS:  # proxies come and go: forget the long-quiet ones
            self._refresh_at = {k: v for k, v in self._refresh_at.items() if v > now}

    async def _judged(self, judge: Judge, turn: TurnEvent, verdict: Verdict) -> Verdict:
        """``verdict`` with the judge's findings merged in, or unchanged when the judge fails or has no time."""
        budget_s = judge.config.timeout_s
        if turn.deadline_ms is not None:
            budget_s = min(budget_s, (turn.deadline_ms - now_ms() - PUBLISH_MARGIN_MS) / 1000)
        count = self.metrics.judge_calls
        return await judged(
            judge, self.engine, turn, verdict, budget_s, lambda o: count.labels(outcome=o).inc(), self._judge_slots
        )

    async def _dead(self, entry: streams.Entry, reason: str, error: str) -> None:
        await streams.dead_letter(
            self.redis,
            keys.TURNS_STREAM,
            keys.DETECTOR_GROUP,
            entry,
            reason=reason,
            error=error,
            consumer=self.consumer,
        )
        self.metrics.turns.labels(outcome="dead").inc()
        self.metrics.dead_letters.labels(reason=reason).inc()
        log.warning("entry %s moved to %s (%s): %s", entry.id, keys.TURNS_DEAD_STREAM, reason, error)


async def _wait(stop: asyncio.Event, seconds: float) -> None:
    # A back-off that a stop request cuts short.
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), timeout=seconds)
