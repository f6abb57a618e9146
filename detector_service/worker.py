"""The turn handler of one member of the ``detectors`` consumer group on ``fama:turns`` (the loop around it:
:class:`detector_service.bus.consumer.GroupConsumer`; the process around both: :mod:`detector_service.service`).

Each turn of a batch is evaluated with the engine, its verdict published to the turn's ``reply_to`` stream and
only then the entry acknowledged. An entry that cannot be parsed, or keeps failing, is dead-lettered. On
SIGTERM/SIGINT the loop stops reading, the batch in hand is finished and the process exits within
``drain_timeout_s``.

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
import logging
import time
from dataclasses import dataclass

import orjson
from pydantic import ValidationError
from redis.asyncio import Redis

from detector_service.bus import keys, streams
from detector_service.bus.consumer import GroupConsumer
from detector_service.contract.wire import SchemaVersionError, TurnEvent, Verdict, check_version, dumps, now_ms
from detector_service.engine import Engine, Engines
from detector_service.llm.extraction import ExtractionScheduler
from detector_service.llm.follows import FollowsProfile, Judges
from detector_service.llm.judge import Judge, judged, worth_judging
from detector_service.metrics import DetectorMetrics
from detector_service.settings import DetectorSettings

log = logging.getLogger(__name__)

PUBLISH_MARGIN_MS = 50  # kept free before a turn's deadline to publish its verdict (room for a busy host)
MAX_REPLY_STREAMS = 1024  # reply streams whose expiry refresh is tracked before quiet ones are forgotten


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
        engine: Engine | Engines,
        metrics: DetectorMetrics,
        judge: Judge | Judges | None = None,
        extractions: ExtractionScheduler | FollowsProfile[ExtractionScheduler] | None = None,
    ) -> None:
        self.settings = settings
        self.redis = redis
        # Per turn, the engine of the profile its proxy judged it under (a pushed profile swaps them).
        self.engines = engine if isinstance(engine, Engines) else Engines.fixed(engine)
        self.metrics = metrics
        # The judge of the profile in force (a pushed profile with another judge section gets its own).
        self.judges = Judges.of(judge)
        # The policy-extraction scheduler of the profile in force (its llm_agents and judge sections), if any.
        self.extractions = FollowsProfile.holding(extractions, "policy extraction")
        self.consumer = settings.consumer_name
        self.group = GroupConsumer(
            redis,
            keys.TURNS_STREAM,
            keys.DETECTOR_GROUP,
            self.consumer,
            metrics,
            batch_size=settings.batch_size,
            block_ms=settings.block_ms,
            claim_idle_ms=settings.claim_idle_ms,
        )
        self.processed = 0
        self._judge_slots = asyncio.Semaphore(settings.judge_concurrency)
        # When each reply stream's expiry is next due for a refresh: a quarter of its TTL after the last one,
        # not after every verdict (each refresh is one more command on the verdict's round trip).
        self._refresh_at: dict[str, float] = {}

    async def run(self, stop: asyncio.Event, *, until_idle: bool = False) -> None:
        """Consume until ``stop`` is set (or, with ``until_idle``, until the group has no work left)."""
        await self.group.run(self.handle, stop, until_idle=until_idle)

    async def flush_acks(self) -> None:
        """Acknowledge every published turn now."""
        await self.group.flush_acks()

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
                verdict = self.engines.of(turn).evaluate(turn)
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
        judge = self.judges.current
        if judge is None:
            await self._publish(done)
        else:
            await self._publish_judged(judge, done)
        extractions = self.extractions.current
        if extractions is not None:
            extractions.notice(d.turn for d in done)

    async def _publish_judged(self, judge: Judge, done: list[_Done]) -> None:
        """Judge the batch's turns concurrently; publish verdicts in waves as their judge calls end.

        Waves keep a turn with a far deadline (or none) from holding back a neighbour's verdict.
        """
        asked: list[_Done] = []
        not_asked: list[_Done] = []
        for d in done:
            # Asked about the turn as the detectors read it (a ReAct look-up is a look-up, not text).
            engine = self.engines.of(d.turn)
            (asked if worth_judging(engine.native(d.turn)[1], engine.profile) else not_asked).append(d)
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
        # On the consume loop's own connection: the verdicts ride the lane the turns came in on.
        results = await streams.publish_replies(
            self.group.lane, replies, maxlen=s.reply_maxlen, ttl_s=s.reply_ttl_s, expire=refresh
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
        self.group.ack_soon(to_ack)
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
            judge,
            self.engines.of(turn),
            turn,
            verdict,
            budget_s,
            lambda o: count.labels(outcome=o).inc(),
            self._judge_slots,
        )

    async def _dead(self, entry: streams.Entry, reason: str, error: str) -> None:
        await self.group.dead_letter(entry, reason=reason, error=error, dead_stream=keys.TURNS_DEAD_STREAM)
        self.metrics.turns.labels(outcome="dead").inc()
        self.metrics.dead_letters.labels(reason=reason).inc()
        log.warning("entry %s moved to %s (%s): %s", entry.id, keys.TURNS_DEAD_STREAM, reason, error)
