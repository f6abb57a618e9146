"""The optional LLM judge (off by default): a rubric over DCV, WRCO, CM and IFU for one turn.

Any OpenAI-compatible endpoint serves (the same self-hosted model server works). The answer is
constrained to a JSON Schema with ``response_format`` (``structured.py``: ``json_schema``, or ``json_object``
with the schema on servers such as llama.cpp's that only take that); each call has a timeout; verdicts are cached per
turn. The judge does I/O, so it lives outside the pure engine: the worker awaits it after the
deterministic detectors when the profile enables it and merges its findings into the verdict.
Failures (timeout, transport, malformed answer) raise ``JudgeError``; the caller decides whether the
turn goes on without the judge.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections import OrderedDict
from collections.abc import Callable, Mapping
from typing import Annotated, Any, Literal

import orjson
from openai import APITimeoutError, AsyncOpenAI
from pydantic import AfterValidator, BaseModel, ConfigDict, SecretStr

from detector_service.contract.profile import JudgeConfig, Profile, ToolKind
from detector_service.contract.toolkinds import ToolKinds
from detector_service.contract.wire import Category, Finding, Severity, TurnEvent, Verdict
from detector_service.engine import Engine, merge
from detector_service.llm.structured import StructuredCaller
from detector_service.turn import text_of, tool_calls_of

log = logging.getLogger("fama.judge")

RUBRIC = """You review one decision of a customer-service agent that uses tools. Judge only the
candidate assistant message at the end, against the policy and the conversation before it. Report a
finding only when you are confident, for these categories:
- DCV: the candidate breaks a rule of the policy (for example it changes data without an explicit yes
  from the user after listing the details, or does something the policy forbids).
- WRCO: an argument or stated fact (id, price, count, date) does not match what the tools returned.
- CM: the action does not serve what the user actually asked for.
- IFU: the agent gives up, hands off, or ends while the user's request could still be completed.
Each message must name the rule or the evidence in plain words, addressed to the agent, so it can
correct itself. Return an empty list when the candidate is fine."""

JUDGE_SCHEMA: dict[str, Any] = {
    "type": "object",
    "additionalProperties": False,
    "required": ["findings"],
    "properties": {
        "findings": {
            "type": "array",
            "items": {
                "type": "object",
                "additionalProperties": False,
                "required": ["category", "message", "confidence"],
                "properties": {
                    "category": {"type": "string", "enum": ["DCV", "WRCO", "CM", "IFU"]},
                    "message": {"type": "string"},
                    "confidence": {"type": "number", "minimum": 0, "maximum": 1},
                },
            },
        }
    },
}


class JudgeError(RuntimeError):
    pass


class _JudgeFinding(BaseModel):
    model_config = ConfigDict(extra="forbid")
    category: Literal["DCV", "WRCO", "CM", "IFU"]
    message: str
    # Grammar-constrained servers keep the shape but not the bounds: a confidence of 2 means "very sure".
    confidence: Annotated[float, AfterValidator(lambda v: min(1.0, max(0.0, v)))]


class _JudgeAnswer(BaseModel):
    model_config = ConfigDict(extra="forbid")
    findings: list[_JudgeFinding]


def worth_judging(turn: TurnEvent, profile: Profile) -> bool:
    """Whether the judge is asked about this turn: one that changes data, hands off or talks to the user.

    With ``judge.skip_reads`` (the default) a turn made only of look-up calls is left to the deterministic
    detectors; so is an empty one (IFU's empty-reply check sees it).
    """
    calls = tool_calls_of(turn.candidate)
    if text_of(turn.candidate.get("content")).strip():
        return True
    if not calls:
        return False
    if not profile.judge.skip_reads:
        return True
    kinds = ToolKinds(profile, turn.tools)
    names = [fn.get("name") if isinstance(fn := c.get("function"), Mapping) else None for c in calls]
    return any(kinds.kind(str(name)) is not ToolKind.READ for name in names)


def judge_key(explicit: SecretStr | None, config: JudgeConfig) -> str | None:
    """The judge endpoint's key: the explicit setting (``FAMA_JUDGE_API_KEY``), else the variable the profile
    names in ``judge.api_key_env``."""
    if explicit is not None:
        return explicit.get_secret_value()
    return os.environ.get(config.api_key_env) if config.api_key_env else None


def make_client(config: JudgeConfig, api_key: str | None) -> AsyncOpenAI:
    """The judge's client; retries are off because the timeout bounds the whole attempt."""
    return AsyncOpenAI(base_url=config.base_url, api_key=api_key or "none", timeout=config.timeout_s, max_retries=0)


def _transcript(turn: TurnEvent, max_chars: int) -> tuple[str, str]:
    policy = "\n".join(text_of(m.get("content")) for m in turn.messages if m.get("role") in ("system", "developer"))
    lines = []
    for m in turn.messages:
        role = m.get("role")
        if role in ("system", "developer"):
            continue
        text = text_of(m.get("content"))
        calls = [c.get("function") for c in tool_calls_of(m)]
        if calls:
            text += " " + " ".join(
                f"[call {fn.get('name')} {fn.get('arguments')}]" if isinstance(fn, Mapping) else "[call ?]"
                for fn in calls
            )
        lines.append(f"{role}: {text.strip()}")
    conversation = "\n".join(lines)[-max_chars:]  # the end of the conversation matters most
    return policy[:max_chars], conversation


class Judge:
    def __init__(
        self, config: JudgeConfig, client: AsyncOpenAI, *, min_confidence: float = 0.5, cache_size: int = 4096
    ) -> None:
        if not config.model:
            raise ValueError("the judge needs a model name (profile judge.model)")
        self.config = config
        self.client = client
        self._caller = StructuredCaller(client, config.model)
        self.min_confidence = min_confidence
        self._cache: OrderedDict[str, list[Finding]] = OrderedDict()
        self._cache_size = cache_size
        self._inflight: dict[str, asyncio.Future[list[Finding]]] = {}

    async def aclose(self) -> None:
        await self.client.close()

    def _key(self, turn: TurnEvent) -> str:
        return f"{turn.tenant}:{turn.turn_id}:{turn.attempt}"

    async def findings(self, turn: TurnEvent) -> list[Finding]:
        key = self._key(turn)
        cached = self._cache.get(key)
        if cached is not None:
            self._cache.move_to_end(key)
            return list(cached)
        pending = self._inflight.get(key)
        if pending is not None:  # the same turn asked twice at once: one call serves both
            return list(await asyncio.shield(pending))
        future: asyncio.Future[list[Finding]] = asyncio.get_running_loop().create_future()
        self._inflight[key] = future
        try:
            result = await self._ask(turn)
        except BaseException as exc:
            future.set_exception(exc)
            future.exception()  # mark retrieved: a lone caller re-raises it below
            raise
        else:
            future.set_result(result)
            self._cache[key] = result
            if len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
            return list(result)
        finally:
            del self._inflight[key]

    async def _ask(self, turn: TurnEvent) -> list[Finding]:
        policy, conversation = _transcript(turn, 12_000)
        candidate = orjson.dumps(
            {"content": turn.candidate.get("content"), "tool_calls": turn.candidate.get("tool_calls")}
        ).decode()
        messages: list[Any] = [
            {"role": "system", "content": RUBRIC},
            {
                "role": "user",
                "content": f"POLICY:\n{policy or '(none)'}\n\nCONVERSATION:\n{conversation}\n\nCANDIDATE:\n{candidate}",
            },
        ]
        answer = await self._caller.answer(
            messages, JUDGE_SCHEMA, "fama_judge", _JudgeAnswer, self.config.timeout_s, JudgeError, "judge"
        )
        return [
            Finding(
                category=Category(f.category),
                detector="llm_judge",
                severity=Severity.WARNING,
                message=f.message,
                evidence={"confidence": f.confidence},
            )
            for f in answer.findings
            if f.confidence >= self.min_confidence
        ]


async def judged(
    judge: Judge,
    engine: Engine,
    turn: TurnEvent,
    verdict: Verdict,
    budget_s: float,
    count: Callable[[str], None],
    slots: asyncio.Semaphore | None = None,
) -> Verdict:
    """``verdict`` with the judge's findings merged in, or unchanged when the judge fails or has no time.

    ``budget_s`` is what is left of the turn's time (the judge's own timeout already applied); waiting for one
    of ``slots`` counts against it. ``count`` gets each call's outcome: ``ok``, ``timeout``, ``error`` or
    ``skipped`` (no time left). A failing or crashing judge never withholds the deterministic verdict.
    """
    where = f"turn {turn.turn_id} (session {turn.tenant}/{turn.session_id})"
    dialect, native = engine.native(turn)  # the judge reads the turn as the detectors do
    if budget_s <= 0:
        count("skipped")
        log.info("no time left for the judge on %s", where)
        return verdict
    try:
        async with asyncio.timeout(budget_s):
            if slots is None:
                extra = await judge.findings(native)
            else:
                async with slots:
                    extra = await judge.findings(native)
    except TimeoutError:
        count("timeout")
        log.warning(
            "judge gave no answer within %.0f ms for %s; the deterministic verdict stands", budget_s * 1000, where
        )
        return verdict
    except JudgeError as exc:
        count("timeout" if isinstance(exc.__cause__, APITimeoutError) else "error")
        log.warning("judge failed for %s; the deterministic verdict stands: %s", where, exc)
        return verdict
    except asyncio.CancelledError:
        task = asyncio.current_task()
        if task is not None and task.cancelling():
            raise  # the caller is being cancelled
        # A duplicate of this turn (a reclaimed entry) shared the judge call and ran out of time first.
        count("timeout")
        log.warning("judge call shared with a duplicate of %s was cut short", where)
        return verdict
    except Exception:  # a judge bug must not withhold the deterministic verdict
        count("error")
        log.exception("judge crashed on %s; the deterministic verdict stands", where)
        return verdict
    count("ok")
    merged = merge(engine, verdict, native.candidate, extra, turn.tools)
    # A harness that reads actions from text gets no native call in place of its answer: retried instead.
    return merged.model_copy(update={"rewritten": None}) if dialect.text_actions else merged
