"""Where the proxy gets verdicts: one interface, two implementations.

``VerdictSource`` is all the supervision logic needs::

    source = RedisVerdicts(redis, process_instance_id(settings.instance_id), metrics)  # or EmbeddedVerdicts(engine)
    await source.start()                                  # in the app's lifespan
    outcome = await source.evaluate(turn, timeout_s=0.25)
    if outcome.verdict is None: ...                       # outcome.reason is "deadline" or "outage"
    await source.stop()

``evaluate`` never raises for Redis or detector failures and never waits longer than ``timeout_s``.
Each call must use a fresh ``turn_id`` (a retry is a new turn): replies are matched by ``turn_id``.

``RedisVerdicts`` publishes the turn to ``fama:turns`` with ``reply_to`` set to this process's reply
stream and an absolute ``deadline_ms``; one reader task per process blocks on ``XREAD`` of that stream
and resolves the waiting futures. A verdict that arrives after its turn gave up is written to
``fama:verdicts:late`` and counted in ``fama_late_verdicts_total``, never applied. A duplicate (a turn
reclaimed and evaluated twice) is dropped.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass
from enum import StrEnum
from typing import Protocol, TypeVar

import orjson
from pydantic import ValidationError
from redis.asyncio import Redis
from redis.exceptions import RedisError

from detector_service.bus import keys, streams, values
from detector_service.contract.wire import SchemaVersionError, TurnEvent, Verdict, check_version, dumps, now_ms
from detector_service.engine import Engine, Engines
from detector_service.llm.follows import Judges
from detector_service.llm.judge import Judge, judged, worth_judging
from proxy.metrics import ProxyMetrics

REPLY_BLOCK_MS = 1000  # the reply reader's XREAD block
log = logging.getLogger(__name__)

TURNS_MAXLEN = 100_000
LATE_MAXLEN = 10_000
REMEMBERED_TURNS = 10_000  # finished turn ids kept to tell late verdicts from duplicates
MAX_BACKOFF_S = 1.0
JUDGE_MARGIN_S = 0.005  # left for merging the judge's findings and deciding, inside the turn's deadline


class _ReaderLost(Exception):
    """Set on waiting turns when no verdict can reach them any more (Redis lost, or the source stopped)."""


class MissReason(StrEnum):
    DEADLINE = "deadline"  # the detectors did not answer in time
    OUTAGE = "outage"  # Redis or the detector could not be reached or failed


@dataclass(frozen=True, slots=True)
class VerdictOutcome:
    verdict: Verdict | None
    reason: MissReason | None  # set exactly when ``verdict`` is None
    waited_s: float
    transport: str

    @property
    def ok(self) -> bool:
        return self.verdict is not None


class VerdictSource(Protocol):
    transport: str

    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    async def evaluate(self, turn: TurnEvent, timeout_s: float) -> VerdictOutcome: ...


def verdict_source(redis: Redis | None, engine: Engine, instance_id: str, metrics: ProxyMetrics) -> VerdictSource:
    """Redis transport when a client is given, the in-process engine otherwise."""
    if redis is None:
        return EmbeddedVerdicts(engine, metrics)
    return RedisVerdicts(redis, process_instance_id(instance_id), metrics)


def process_instance_id(base: str) -> str:
    """A reply-stream owner name unique to this process: several proxy workers may share one host name."""
    return f"{base}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


class EmbeddedVerdicts:
    """The detectors in-process (no Redis URL). The engine is pure and fast, so it runs inline.

    With a ``judge`` (the profile's ``judge.enabled``), the turns it is asked about
    (:func:`~detector_service.llm.judge.worth_judging`) also wait for the LLM judge, within what is left of the
    turn's ``timeout_s`` and the judge's own timeout; when it fails or runs out of time the deterministic
    verdict stands.
    """

    transport = "embedded"

    def __init__(
        self, engine: Engine | Engines, metrics: ProxyMetrics | None = None, judge: Judge | Judges | None = None
    ) -> None:
        # Per turn, the engine of the profile it is judged under (a pushed profile swaps them).
        self.engines = engine if isinstance(engine, Engines) else Engines.fixed(engine)
        self.metrics = metrics or ProxyMetrics()
        # The judge of the profile in force (a pushed profile with another judge section gets its own).
        self.judges = Judges.of(judge)

    async def start(self) -> None:
        return None

    async def stop(self) -> None:
        await self.judges.aclose()

    async def evaluate(self, turn: TurnEvent, timeout_s: float) -> VerdictOutcome:
        start = time.perf_counter()
        engine = self.engines.of(turn)
        try:
            verdict: Verdict | None = engine.evaluate(turn)
            reason = None
        except Exception:  # a detector bug degrades this turn like an outage; it must not fail the request
            log.exception("embedded detectors failed on turn %s (session %s)", turn.turn_id, turn.session_id)
            verdict, reason = None, MissReason.OUTAGE
        judge = self.judges.current
        # Asked about the turn as the detectors read it (a ReAct look-up is a look-up, not text).
        if verdict is not None and judge is not None and worth_judging(engine.native(turn)[1], engine.profile):
            left_s = timeout_s - (time.perf_counter() - start) - JUDGE_MARGIN_S
            count = self.metrics.judge_calls
            verdict = await judged(
                judge,
                engine,
                turn,
                verdict,
                min(judge.config.timeout_s, left_s),
                lambda o: count.labels(outcome=o).inc(),
            )
        waited = time.perf_counter() - start
        self.metrics.verdict_wait.labels(transport=self.transport).observe(waited)
        self.metrics.observe_risk(verdict)
        return VerdictOutcome(verdict, reason, waited, self.transport)


@dataclass(frozen=True, slots=True)
class _GaveUp:
    deadline_ms: int
    reason: MissReason


class RedisVerdicts:
    """Turns out over ``fama:turns``, verdicts back over this process's reply stream."""

    transport = "redis"

    def __init__(
        self,
        redis: Redis,
        instance_id: str,
        metrics: ProxyMetrics | None = None,
        *,
        block_ms: int = REPLY_BLOCK_MS,
        turns_maxlen: int = TURNS_MAXLEN,
    ) -> None:
        """``redis`` must not have a read timeout shorter than ``block_ms``; ``instance_id`` must be unique
        per process (see ``process_instance_id``)."""
        self.redis = redis
        self.instance_id = instance_id
        self.reply_stream = keys.reply_stream(instance_id)
        self.metrics = metrics or ProxyMetrics()
        self.block_ms = block_ms
        self.turns_maxlen = turns_maxlen
        self._waiting: dict[str, asyncio.Future[Verdict]] = {}
        self._gave_up: OrderedDict[str, _GaveUp] = OrderedDict()
        self._answered: OrderedDict[str, None] = OrderedDict()
        self._reader: asyncio.Task[None] | None = None
        # The reader's own connection, and lanes for the turns' publishing: a turn's commands skip the client's
        # per-command machinery.
        self._lane = streams.Lane(redis)
        self._publishing = streams.Lanes(redis)
        self._reader_ok = True
        self._stopping = False
        self._last_id = "0-0"

    async def start(self) -> None:
        if self._reader is None:
            self._stopping = False
            self._reader = asyncio.create_task(self._read_replies(), name=f"verdict-reader:{self.instance_id}")

    async def stop(self) -> None:
        """Release waiting turns, then let the reader finish its current ``XREAD`` (at most ``block_ms``)."""
        reader, self._reader = self._reader, None
        self._release_waiting("the verdict source stopped")
        await self._publishing.aclose()
        if reader is None:
            return
        # Cancelling a blocked XREAD can leave redis-py awaiting forever (seen with redis-py 8.1 under
        # load), so the reader is asked to stop and cancelled only if it overruns.
        self._stopping = True
        done, _ = await asyncio.wait({reader}, timeout=self.block_ms / 1000 + 1.0)
        if not done:
            reader.cancel()
            done, _ = await asyncio.wait({reader}, timeout=1.0)
        if not done:
            log.warning("verdict reader for %s did not stop; abandoned", self.reply_stream)
            return
        await self._lane.aclose()

    async def evaluate(self, turn: TurnEvent, timeout_s: float) -> VerdictOutcome:
        start = time.perf_counter()
        deadline_ms = now_ms() + int(timeout_s * 1000)
        if turn.turn_id in self._waiting:
            raise ValueError(f"turn {turn.turn_id} is already waiting for a verdict; use a new turn_id per attempt")
        if timeout_s <= 0:
            return self._miss(turn, MissReason.DEADLINE, start, deadline_ms)
        if not self._reader_ok or self._reader is None:
            # The reader cannot receive anything right now: do not make the turn wait for nothing.
            return self._miss(turn, MissReason.OUTAGE, start, deadline_ms)
        payload = _addressed(turn, self.reply_stream, deadline_ms)
        fut: asyncio.Future[Verdict] = asyncio.get_running_loop().create_future()
        self._waiting[turn.turn_id] = fut
        published = False
        try:
            async with asyncio.timeout(timeout_s):
                await streams.publish(self._publishing, keys.TURNS_STREAM, payload, maxlen=self.turns_maxlen)
                published = True
                verdict = await fut
        except TimeoutError:
            return self._miss(turn, MissReason.DEADLINE if published else MissReason.OUTAGE, start, deadline_ms)
        except _ReaderLost as exc:
            log.warning("turn %s (session %s) released without a verdict: %s", turn.turn_id, turn.session_id, exc)
            return self._miss(turn, MissReason.OUTAGE, start, deadline_ms)
        except (RedisError, OSError) as exc:
            self.metrics.redis_errors.labels(op="publish_turn").inc()
            log.warning("cannot publish turn %s (session %s): %s", turn.turn_id, turn.session_id, exc)
            return self._miss(turn, MissReason.OUTAGE, start, deadline_ms)
        finally:
            self._waiting.pop(turn.turn_id, None)
        waited = time.perf_counter() - start
        self.metrics.verdict_wait.labels(transport=self.transport).observe(waited)
        self.metrics.observe_risk(verdict)
        return VerdictOutcome(verdict, None, waited, self.transport)

    def _miss(self, turn: TurnEvent, reason: MissReason, start: float, deadline_ms: int) -> VerdictOutcome:
        waited = time.perf_counter() - start
        self.metrics.verdict_wait.labels(transport=self.transport).observe(waited)
        if reason is MissReason.DEADLINE:
            self.metrics.deadline_misses.labels(transport=self.transport).inc()
        _remember(self._gave_up, turn.turn_id, _GaveUp(deadline_ms, reason))
        return VerdictOutcome(None, reason, waited, self.transport)

    async def _read_replies(self) -> None:
        backoff = 0.05
        while not self._stopping:
            try:
                if not self._reader_ok:
                    await values.ping(self.redis)
                    self._reader_ok = True
                    log.info("verdict reader for %s reconnected", self.reply_stream)
                entries = await streams.read_replies(
                    self._lane, self.reply_stream, self._last_id, count=256, block_ms=self.block_ms
                )
                backoff = 0.05
            except (RedisError, OSError) as exc:
                if self._reader_ok:
                    log.warning("verdict reader for %s lost Redis: %s", self.reply_stream, exc)
                self._reader_ok = False
                self.metrics.redis_errors.labels(op="read_replies").inc()
                self._release_waiting("the verdict reader lost Redis")
                await asyncio.sleep(backoff)  # back-off before reconnecting, not a poll for data
                backoff = min(backoff * 2, MAX_BACKOFF_S)
                continue
            late: list[str] = []
            for entry in entries:
                self._last_id = entry.id
                verdict = _parse_verdict(entry)
                if verdict is not None:
                    record = self._deliver(verdict)
                    if record is not None:
                        late.append(record)
            if late:
                await self._record_late(late)
            elif entries:
                # Let the turns just resolved answer their clients before this task sends its next XREAD: on a
                # busy host that send costs more than the answer does. Nothing is missed, reads go by ``_last_id``.
                await asyncio.sleep(0)

    def _deliver(self, verdict: Verdict) -> str | None:
        """Resolve the waiting turn; for a late verdict return what to record."""
        fut = self._waiting.get(verdict.turn_id)
        if fut is not None and not fut.done():
            fut.set_result(verdict)
            _remember(self._answered, verdict.turn_id, None)
            return None
        gave_up = self._gave_up.pop(verdict.turn_id, None)
        if gave_up is not None:
            self.metrics.late_verdicts.inc()
            _remember(self._answered, verdict.turn_id, None)
            log.info(
                "late verdict for turn %s (session %s): %d ms after its deadline; recorded, not applied",
                verdict.turn_id,
                verdict.session_id,
                now_ms() - gave_up.deadline_ms,
            )
            return dumps(verdict)
        if verdict.turn_id in self._answered:
            log.debug("duplicate verdict for turn %s dropped", verdict.turn_id)
        else:
            log.debug("verdict for unknown turn %s dropped (an earlier process on this stream?)", verdict.turn_id)
        return None

    async def _record_late(self, payloads: list[str]) -> None:
        try:
            await streams.publish_all(
                self.redis, keys.LATE_VERDICTS_STREAM, payloads, maxlen=LATE_MAXLEN, instance=self.instance_id
            )
        except (RedisError, OSError) as exc:
            self.metrics.redis_errors.labels(op="record_late").inc()
            log.warning("could not record %d late verdicts: %s", len(payloads), exc)

    def _release_waiting(self, why: str) -> None:
        # Without a reader no verdict can arrive: release every waiting turn now instead of at its deadline.
        for fut in self._waiting.values():
            if not fut.done():
                fut.set_exception(_ReaderLost(why))


def _addressed(turn: TurnEvent, reply_to: str, deadline_ms: int) -> str:
    """The turn's wire payload with its reply stream and deadline: the bytes ``dumps`` writes for the turn so
    addressed, without copying the model and serializing it through pydantic."""
    fields = {**turn.__dict__, "reply_to": reply_to, "deadline_ms": deadline_ms}
    try:
        return orjson.dumps({k: v for k, v in fields.items() if v is not None}).decode()
    except TypeError:  # something in the conversation that only pydantic knows how to write
        return dumps(turn.model_copy(update={"reply_to": reply_to, "deadline_ms": deadline_ms}))


def _parse_verdict(entry: streams.Entry) -> Verdict | None:
    if entry.data is None:
        log.warning("reply entry %s has no data field; ignored", entry.id)
        return None
    try:
        verdict = Verdict.model_validate_json(entry.data)
        check_version({"v": verdict.v})
    except (ValidationError, SchemaVersionError) as exc:
        log.warning("reply entry %s is not a verdict this build reads: %s", entry.id, exc)
        return None
    return verdict


V = TypeVar("V")


def _remember(store: OrderedDict[str, V], key: str, value: V) -> None:
    store[key] = value
    store.move_to_end(key)
    while len(store) > REMEMBERED_TURNS:
        store.popitem(last=False)
