"""LLM-backed DCE: a policy's rules, extracted once per distinct policy text and cached in Redis.

The detector worker notices the policy text of every turn it evaluates (``ExtractionScheduler.notice``,
after the verdict is published, so it never delays one). When Redis holds no extraction for the text's
SHA-256 yet, one replica (``SET NX`` on a short-lived lock key) asks the judge's endpoint for the rules,
constrained to ``RULES_SCHEMA``, and stores them under ``keys.extraction_key(hash)`` with the profile's
TTL. While the lock is held (and after a failed call, until it expires) no other replica asks again.
The proxy reads the cached value when it builds the DCE context (:mod:`proxy.supervision.extractions`).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import Iterable, Sequence
from typing import Any

from openai import AsyncOpenAI
from pydantic import BaseModel, ConfigDict
from redis.asyncio import Redis
from redis.exceptions import RedisError

from detector_service.agents.view import policy_text
from detector_service.bus import keys, values
from detector_service.contract.extraction import ExtractedRule, PolicyExtraction, policy_hash
from detector_service.contract.profile import JudgeConfig, Profile
from detector_service.contract.wire import TurnEvent
from detector_service.llm.structured import StructuredCaller
from detector_service.metrics import DetectorMetrics

log = logging.getLogger(__name__)

MAX_RULES = 60
MAX_POLICY_CHARS = 60_000
MAX_REMEMBERED = 1024
RECHECK_S = 60.0  # how long a replica trusts that an extraction it saw is still cached

INSTRUCTIONS = """You read the operating policy of an agent that serves users through tools. List every
rule in it that constrains what the agent may do: conditions to check, confirmations to obtain,
limits, things that are forbidden, the order of steps. Write each rule as one short, self-contained
imperative sentence addressed to the agent, in the policy's own terms. In "tools", name the tools
(only from the given list) whose calls the rule constrains; leave it empty when the rule applies to
every action. Do not invent rules the policy does not state."""

RULES_SCHEMA: dict[str, Any] = {
    "type": "object",
    "additionalProperties": False,
    "required": ["rules"],
    "properties": {
        "rules": {
            "type": "array",
            "items": {
                "type": "object",
                "additionalProperties": False,
                "required": ["rule", "tools"],
                "properties": {
                    "rule": {"type": "string"},
                    "tools": {"type": "array", "items": {"type": "string"}},
                },
            },
        }
    },
}


class ExtractionError(RuntimeError):
    pass


class _RulesAnswer(BaseModel):
    model_config = ConfigDict(extra="forbid")
    rules: list[ExtractedRule]


class Extractor:
    """One JSON-schema-constrained call to the judge's endpoint per policy text."""

    def __init__(self, config: JudgeConfig, client: AsyncOpenAI, timeout_s: float) -> None:
        if not config.model:
            raise ValueError("LLM-backed agents need a model name (profile judge.model)")
        self.model = config.model
        self.client = client
        self._caller = StructuredCaller(client, config.model)
        self.timeout_s = timeout_s

    async def aclose(self) -> None:
        await self.client.close()

    async def extract(self, policy: str, tools: Sequence[str]) -> PolicyExtraction:
        declared = ", ".join(tools) or "(none declared)"
        messages: list[Any] = [
            {"role": "system", "content": INSTRUCTIONS},
            {"role": "user", "content": f"TOOLS: {declared}\n\nPOLICY:\n{policy[:MAX_POLICY_CHARS]}"},
        ]
        answer = await self._caller.answer(
            messages, RULES_SCHEMA, "fama_policy_rules", _RulesAnswer, self.timeout_s, ExtractionError, "extraction"
        )
        known = set(tools)
        rules = [
            # Tags outside the declared tools cannot match a pending call; they are dropped, the rule kept.
            ExtractedRule(rule=" ".join(r.rule.split()), tools=[t for t in r.tools if t in known])
            for r in answer.rules[:MAX_RULES]
            if r.rule.strip()
        ]
        return PolicyExtraction(policy_hash=policy_hash(policy), model=self.model, rules=rules)


class ExtractionScheduler:
    """Runs extractions in the background for policy texts Redis has none for, once across replicas."""

    def __init__(
        self,
        redis: Redis,
        extractor: Extractor,
        profile: Profile,
        metrics: DetectorMetrics,
        owner: str,
    ) -> None:
        self.redis = redis
        self.extractor = extractor
        self.profile = profile
        self.metrics = metrics
        self.owner = owner  # written into the lock, for whoever inspects it
        self.ttl_s = profile.llm_agents.ttl_s
        # Held past one call's timeout, so a failing endpoint is asked again only after this back-off.
        self.lock_ms = int(max(2 * extractor.timeout_s, 30.0) * 1000)
        self._cached_until: dict[str, float] = {}
        self._tasks: dict[str, asyncio.Task[None]] = {}

    def notice(self, turns: Iterable[TurnEvent]) -> None:
        """Schedule an extraction for each policy text not known to be cached; returns at once."""
        now = time.monotonic()
        for turn in turns:
            policy = policy_text(turn.messages, self.profile)
            if not policy.strip():
                continue
            digest = policy_hash(policy)
            if digest in self._tasks or self._cached_until.get(digest, 0.0) > now:
                continue
            tools = [str((t.get("function") or {}).get("name")) for t in turn.tools if isinstance(t, dict)]
            task = asyncio.get_running_loop().create_task(self._ensure(digest, policy, tools), name=f"extract:{digest}")
            self._tasks[digest] = task
            task.add_done_callback(functools.partial(self._forget, digest))

    def _forget(self, digest: str, _: asyncio.Task[None]) -> None:
        self._tasks.pop(digest, None)
        if len(self._cached_until) > MAX_REMEMBERED:  # distinct policies are few; this only bounds odd traffic
            self._cached_until.clear()

    async def wait(self) -> None:
        """Wait for the extractions in flight (tests, and a drain before shutdown)."""
        while self._tasks:
            await asyncio.wait(list(self._tasks.values()))

    async def aclose(self, timeout_s: float) -> None:
        if self._tasks:
            _, late = await asyncio.wait(list(self._tasks.values()), timeout=timeout_s)
            for task in late:
                task.cancel()
            if late:
                log.warning("cancelled %d unfinished policy extractions at shutdown", len(late))
                await asyncio.wait(late)
        await self.extractor.aclose()

    async def _ensure(self, digest: str, policy: str, tools: list[str]) -> None:
        key = keys.extraction_key(digest)
        lock = keys.extraction_lock_key(digest)
        try:
            if await values.exists(self.redis, key):
                self._cached_until[digest] = time.monotonic() + RECHECK_S
                return
            if not await values.claim(self.redis, lock, self.owner, ttl_ms=self.lock_ms):
                self.metrics.extractions.labels(outcome="locked").inc()
                return
            try:
                extraction = await self.extractor.extract(policy, tools)
            except asyncio.CancelledError:
                # Stopped mid-call (shutdown): free the lock so another replica need not wait for it to expire.
                with contextlib.suppress(RedisError, OSError, TimeoutError):
                    async with asyncio.timeout(2.0):  # bounded, with room for a busy host
                        await values.delete(self.redis, lock)
                raise
            except ExtractionError as exc:
                # The lock stays until it expires: the back-off before any replica asks again.
                self.metrics.extractions.labels(outcome="error").inc()
                log.warning("policy extraction failed for policy %s (%d chars): %s", digest[:12], len(policy), exc)
                return
            await values.put(self.redis, key, extraction.model_dump_json(), ttl_s=self.ttl_s)
            await values.delete(self.redis, lock)
        except (RedisError, OSError) as exc:
            self.metrics.redis_errors.labels(op="extraction").inc()
            log.warning("redis error while caching the extraction for policy %s: %s", digest[:12], exc)
            return
        self._cached_until[digest] = time.monotonic() + RECHECK_S
        self.metrics.extractions.labels(outcome="ok").inc()
        log.info("extracted %d rules from policy %s", len(extraction.rules), digest[:12])
