"""One batched writer for the writes nobody waits on: queued by many callers, sent by one task on its own connection,
a batch per round trip.

Three verbs: :meth:`BatchWriter.set_soon` (a value with a TTL; the caller gets a future of the write),
:meth:`BatchWriter.write_soon` with :class:`Append` (to a capped list whose TTL is refreshed) and :class:`Add`
(to a capped stream). Appends to one list within a batch go out as one ``RPUSH``, so a batch costs three commands
per list, not per entry. Enqueueing never blocks: a full queue refuses the write and the caller counts it.
Failures of queued writes go to ``on_failure`` (with the labels of the writes that carried them); a ``set_soon``
future carries its own.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from redis.asyncio import Redis
from redis.exceptions import RedisError

from detector_service.bus.streams import DATA_FIELD, Command, Lane

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Append:
    key: str
    value: str
    max_entries: int
    ttl_s: int


@dataclass(frozen=True, slots=True)
class Add:
    stream: str
    payload: str
    maxlen: int


@dataclass(frozen=True, slots=True)
class _Set:
    key: str
    raw: str
    ttl_s: int
    done: asyncio.Future[None]


@dataclass(frozen=True, slots=True)
class _Writes:
    ops: Sequence[Append | Add]
    label: str  # names the writes in a failure report (e.g. the session they belong to)


@dataclass(frozen=True, slots=True)
class WriteFailure:
    """Some of a batch's queued writes failed."""

    writes: int  # queued writes (each of one label) in the batch
    failed_commands: int | None  # None when the whole batch failed (Redis unreachable)
    commands: int
    error: BaseException  # the first
    first: str  # the label of the batch's first write


FailureHandler = Callable[[WriteFailure], None]


class BatchWriter:
    def __init__(
        self,
        redis: Redis,
        *,
        queue_size: int = 10_000,
        batch_size: int = 256,
        drain_timeout_s: float = 2.0,
        on_failure: FailureHandler | None = None,
    ) -> None:
        self.batch_size = batch_size
        self.drain_timeout_s = drain_timeout_s
        self.on_failure = on_failure
        self._queue: asyncio.Queue[_Set | _Writes] = asyncio.Queue(maxsize=queue_size)
        self._lane = Lane(redis)  # the writer task's own connection
        self._task: asyncio.Task[None] | None = None

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    @property
    def queue_size(self) -> int:
        return self._queue.maxsize

    async def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._loop(), name="batch-writer")

    async def stop(self) -> None:
        """Write what is queued (within ``drain_timeout_s``), then stop."""
        if self._task is None:
            return
        try:
            async with asyncio.timeout(self.drain_timeout_s):
                await self._queue.join()
        except TimeoutError:
            log.warning("batch writer stopped with %d writes unsent", self._queue.qsize())
        task, self._task = self._task, None
        task.cancel()
        # Bounded: a cancelled Redis call must not hold up the app's shutdown.
        done, _ = await asyncio.wait({task}, timeout=1.0)
        if done:
            await self._lane.aclose()

    async def flush(self) -> None:
        """Wait until everything queued so far has been written (or failed)."""
        await self._queue.join()

    def write_soon(self, ops: Sequence[Append | Add], label: str) -> bool:
        """Queue ``ops`` for the next batch; False when the queue is full."""
        try:
            self._queue.put_nowait(_Writes(ops, label))
        except asyncio.QueueFull:
            return False
        return True

    def set_soon(self, key: str, raw: str, ttl_s: int) -> asyncio.Future[None] | None:
        """Queue a SET with a TTL; ``None`` when it cannot be queued (writer not running, queue full)."""
        if not self.running or self._queue.full():
            return None
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._queue.put_nowait(_Set(key, raw, ttl_s, done))
        return done

    async def _loop(self) -> None:
        while True:
            batch = [await self._queue.get()]
            while len(batch) < self.batch_size and not self._queue.empty():
                batch.append(self._queue.get_nowait())
            try:
                await self._write(batch)
            finally:
                for item in batch:
                    if isinstance(item, _Set) and not item.done.done():  # cancelled mid-write
                        item.done.set_exception(RedisError("the writer stopped before the write was answered"))
                    self._queue.task_done()

    async def _write(self, batch: list[_Set | _Writes]) -> None:
        appends: dict[str, tuple[Append, list[str]]] = {}
        commands: list[Command] = []
        sets: list[tuple[int, _Set]] = []  # (position in the batch's replies, write)
        for item in batch:
            if isinstance(item, _Set):
                sets.append((len(commands), item))
                commands.append(("SET", item.key, item.raw, "EX", item.ttl_s))
                continue
            for op in item.ops:
                if isinstance(op, Add):
                    commands.append(("XADD", op.stream, "MAXLEN", "~", op.maxlen, "*", DATA_FIELD, op.payload))
                else:
                    appends.setdefault(op.key, (op, []))[1].append(op.value)
        for key, (op, values) in appends.items():
            commands.append(("RPUSH", key, *values))
            commands.append(("LTRIM", key, -op.max_entries, -1))
            commands.append(("EXPIRE", key, op.ttl_s))
        labels = [item.label for item in batch if isinstance(item, _Writes)]
        try:
            results = await self._lane.send(*commands)
        except (RedisError, OSError) as exc:
            for _, write in sets:
                write.done.set_exception(exc)
            if labels:  # a set's owner counts and logs its own failures
                self._failed(WriteFailure(len(labels), None, len(commands), exc, labels[0]))
            return
        for at, write in sets:
            answer = results[at]
            if isinstance(answer, Exception):
                write.done.set_exception(answer)
            else:
                write.done.set_result(None)
        if sets:
            written = {at for at, _ in sets}
            results = [r for i, r in enumerate(results) if i not in written]
        failed = [r for r in results if isinstance(r, Exception)]
        if failed:
            self._failed(WriteFailure(len(labels), len(failed), len(results), failed[0], labels[0] if labels else ""))

    def _failed(self, failure: WriteFailure) -> None:
        if self.on_failure is not None:
            self.on_failure(failure)
        else:
            log.warning("%d writes failed (first: %s): %s", failure.writes, failure.first, failure.error)
