"""The supervision loop on chat turns, plugged into the chat pipeline's seam (:class:`proxy.hooks.ChatHooks`).

Per turn (only requests that declare ``tools``, or whose agent writes its actions as text, ReAct style: the
profile's ``dialect: react``, or a conversation that shows it; plain chat passes through untouched):

1. ``before_upstream``: name the session (:mod:`proxy.supervision.sessions`), load its state, add the one context
   message (:mod:`proxy.supervision.injection`), set ``x-fama-session``.
2. The candidate answer becomes a :class:`~detector_service.contract.wire.TurnEvent` (the client's conversation
   plus the candidate) and goes to the verdict source with the profile's deadline.
   :func:`proxy.supervision.decisions.decide` says what to do with it.
3. ``enforce``, non-streaming: retry (the model is re-asked with the findings as feedback; the client
   never sees the rejected attempt), rewrite, block or pass, then answer. ``enforce``, streaming: a plain
   answer's text is relayed at once, tool-call deltas (with any text after the first, and retried attempts
   whole) are held until the verdict (:mod:`proxy.supervision.held_stream`); a text-only streamed answer has
   already reached the client, so its verdict can only become guidance. Quoted injected context is cut from
   what the client gets (:mod:`proxy.supervision.quotes`). ``observe``: the answer goes out untouched (a quote
   is only counted) and is evaluated in the background; the next turn of the session waits for that
   evaluation (bounded by the deadline) so its guidance is never lost. A new session's state is saved (queued)
   before the answer leaves, so the session is known to an outcome reported right after it.
4. Guidance and agents triggered by findings are saved in the session state for the next turn.

Transparency. Non-streaming responses carry ``x-fama-session``, ``x-fama-intervention`` (e.g.
``retry:DCV``; comma-separated when several) when the answer was changed, and ``x-fama-degraded``
(``deadline`` or ``outage``) when it was served without a verdict. A stream's headers leave before any
verdict exists, so a supervised stream carries only ``x-fama-session`` as a header, and its final
chunk (the one with ``finish_reason``) carries ``"fama": {"session", "intervention", "degraded"}`` in every
mode (the last two only when they apply: never in ``observe``, which neither changes an answer nor waits for a
verdict). Every change is also logged, and every turn is recorded.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Mapping
from typing import Any

from redis.asyncio import Redis

from detector_service.agents.policy import policy_text
from detector_service.contract.active_profile import ProfileHolder
from detector_service.contract.extraction import PolicyExtraction
from detector_service.contract.profile import Mode
from detector_service.contract.textactions import known_names, native_message, native_turn, resolve
from detector_service.contract.wire import SCHEMA_VERSION, Action, TurnEvent, Verdict, new_id, now_ms
from detector_service.turn import tools_by_name
from proxy.hooks import ChatContext, ChatHooks, wants_usage
from proxy.metrics import MAX_TOOL_LABELS, OTHER, ProxyMetrics
from proxy.supervision.decisions import Decision, Degraded, decide, with_shown_text
from proxy.supervision.extractions import ExtractionReader
from proxy.supervision.held_stream import CandidateBuffer, HeldStream, add_usage
from proxy.supervision.injection import GUIDANCE_LABEL, Injector
from proxy.supervision.recorder import Intervention, Recorder
from proxy.supervision.sessions import (
    SESSION_HEADER,
    SessionRef,
    SessionStore,
    identify,
)
from proxy.supervision.turn import Turn, replace_message
from proxy.supervision.verdicts import MissReason, VerdictOutcome, VerdictSource

log = logging.getLogger(__name__)

INTERVENTION_HEADER = "x-fama-intervention"
DEGRADED_HEADER = "x-fama-degraded"
TRAILER_KEY = "fama"
QUOTE_LABEL = "strip:context"  # the answer's text was cut: it quoted the injected context back


class Supervisor(ChatHooks[Turn]):
    def __init__(
        self,
        mode: Mode,
        profiles: ProfileHolder,
        verdicts: VerdictSource,
        store: SessionStore,
        metrics: ProxyMetrics,
        recorder: Recorder | None = None,
        injector: Injector | None = None,
        closing: Redis | None = None,
        extractions: ExtractionReader | None = None,
    ) -> None:
        self.mode = mode
        self.profiles = profiles  # each turn keeps the profile in force when it started (Turn.active)
        self.verdicts = verdicts
        self.store = store
        self.metrics = metrics
        self.recorder = recorder
        self.injector = injector or Injector(profiles.current.profile, metrics)
        self._closing = closing  # a Redis client this supervisor owns and closes on stop
        self.extractions = extractions  # cached LLM-extracted policy rules for DCE (Redis mode)
        # Background evaluations (observe mode, streamed text) by session, so the next turn can wait for them.
        self._pending: dict[tuple[str, str], asyncio.Task[None]] = {}

    async def start(self) -> None:
        await self.verdicts.start()
        if self.recorder is not None:
            await self.recorder.start()

    async def stop(self) -> None:
        pending = list(self._pending.values())
        if pending:
            await asyncio.wait(pending, timeout=self.profiles.current.profile.deadline_ms / 1000 + 1)
        await self.verdicts.stop()
        await self.store.drain()
        if self.recorder is not None:
            await self.recorder.stop()
        if self._closing is not None:
            await self._closing.aclose()

    # -- the seam -------------------------------------------------------------------------------------

    async def before_upstream(self, ctx: ChatContext[Turn], body: dict[str, Any]) -> dict[str, Any]:
        messages: list[dict[str, Any]] = body["messages"]
        tools: list[dict[str, Any]] = [t for t in body.get("tools") or () if isinstance(t, dict)]
        ref = identify(ctx.request_headers.get(SESSION_HEADER), ctx.tenant, messages, tools)
        ctx.response_headers[SESSION_HEADER] = ref.session_id
        active = self.profiles.current  # the turn keeps this profile to its end, whatever is pushed meanwhile
        names = known_names(tools_by_name(tools).keys(), active.profile)
        dialect = resolve(active.profile.dialect, messages, None, names)
        ctx.text_actions = dialect.text_actions  # its harness reads calls written as text: they stay text
        if not (tools or ctx.text_actions) or int(body.get("n") or 1) != 1:
            return body  # nothing to supervise: no tool use, or several answers the client will choose from
        await self.settled(ref)
        extraction: PolicyExtraction | None = None
        if self.extractions is None or not active.profile.llm_agents.dce:
            state = await self.store.load(ref)  # no tasks to spawn for a single read
        else:
            # Both reads are bounded; done together, the cached extraction adds no round trip of its own.
            cached = self.extractions.get(policy_text(messages, active.profile))
            state, extraction = await asyncio.gather(self.store.load(ref), cached)
        # The agents read a ReAct conversation as the detectors do: its text actions as native calls.
        read = native_turn(dialect, messages, None, names)[1] if ctx.text_actions else None
        injection = self.injector.inject(messages, tools, state, extraction, read, profile=active.profile)
        if GUIDANCE_LABEL in injection.labels:
            state.guidance.clear()  # delivered; findings of this turn may add new guidance
        state.turns += 1
        sent = {**body, "messages": injection.messages}
        added = [injection.text] if injection.text else []
        ctx.hook_state = Turn(
            ref, state, list(messages), tools, sent, injection.labels, active, api=ctx.api, added=added
        )
        return sent

    async def after_response(self, ctx: ChatContext[Turn], response: dict[str, Any]) -> dict[str, Any]:
        turn = ctx.hook_state
        if turn is None or len(response.get("choices") or ()) != 1:
            return response
        if self.mode is Mode.OBSERVE:
            self._later(turn, self._unquoted(turn, response["choices"][0]), 0, response["choices"][0])
            return response
        attempt = 0
        usage = response.get("usage")
        while True:
            choice = response["choices"][0]
            candidate = self._unquoted(turn, choice)
            decision, retry = await self._attempt(turn, candidate, attempt)
            if retry is None:
                break
            response = await ctx.complete(retry)
            usage = add_usage(usage, response.get("usage"))
            attempt += 1
            if len(response.get("choices") or ()) != 1:
                break  # an upstream that ignores n=1 cannot be supervised further; serve what it said
        if decision.replacement is not None and len(response.get("choices") or ()) == 1:
            replace_message(response["choices"][0], decision.replacement)
        if usage is not None:
            response["usage"] = usage
        finish = str(response["choices"][0].get("finish_reason")) if response.get("choices") else "none"
        await self._finish(turn, finish)
        if turn.labels:
            ctx.response_headers[INTERVENTION_HEADER] = ",".join(turn.labels)
        if turn.degraded:
            ctx.response_headers[DEGRADED_HEADER] = turn.degraded
        return response

    def stream(self, ctx: ChatContext[Turn], chunks: AsyncIterator[dict[str, Any]]) -> AsyncIterator[dict[str, Any]]:
        turn = ctx.hook_state
        if turn is None:
            return chunks
        if self.mode is Mode.OBSERVE:
            return self._observed_stream(turn, chunks)
        return self._enforced_stream(ctx, turn, chunks)

    # -- streams --------------------------------------------------------------------------------------

    async def _observed_stream(
        self, turn: Turn, chunks: AsyncIterator[dict[str, Any]]
    ) -> AsyncIterator[dict[str, Any]]:
        buffer = CandidateBuffer()
        async for chunk in chunks:
            choices = chunk.get("choices") or ()
            if choices and choices[0].get("index", 0) == 0:
                buffer.add(choices[0])
                if choices[0].get("finish_reason") is not None:
                    chunk[TRAILER_KEY] = self._trailer(turn)  # the same metadata as in enforce mode
            yield chunk
        # Only a stream that ran to its end is a decision worth judging.
        candidate = self._unquoted(turn, {"message": buffer.message()})
        self._later(turn, candidate, 0, {"finish_reason": buffer.finish_reason})

    async def _enforced_stream(
        self, ctx: ChatContext[Turn], turn: Turn, chunks: AsyncIterator[dict[str, Any]]
    ) -> AsyncIterator[dict[str, Any]]:
        held = HeldStream(turn.quoted(), hold_text=ctx.text_actions)
        attempt = 0
        while True:
            async for chunk in chunks:
                shown = held.take(chunk)
                if shown is not None:
                    yield shown
            candidate, quoted = held.candidate()
            self._count_quote(turn, quoted)
            final: Mapping[str, Any] = candidate
            if held.text_sent(candidate):
                self._later(turn, candidate, attempt, {"finish_reason": held.buffer.finish_reason})
                finish = held.buffer.finish_reason or "stop"
                break
            decision, retry = await self._attempt(turn, candidate, attempt, held.shown)
            if retry is not None:
                chunks = await ctx.open_stream(retry)
                held.next_attempt(turn.quoted())
                attempt += 1
                continue
            final = decision.replacement or candidate
            finish = "tool_calls" if final.get("tool_calls") else "stop"
            await self._finish(turn, finish)
            break
        trailer = {TRAILER_KEY: self._trailer(turn)}
        for chunk in held.ending(final, finish, trailer, wants_usage(ctx.body)):
            yield chunk

    # -- judging --------------------------------------------------------------------------------------

    async def _attempt(
        self, turn: Turn, candidate: dict[str, Any], attempt: int, shown: str = ""
    ) -> tuple[Decision, dict[str, Any] | None]:
        """The decision on an attempt the client has not seen (beyond ``shown`` text), and the request body of the
        next attempt when the decision is a retry."""
        decision = await self._judge(turn, candidate, attempt, tool_bytes_sent=False, text_shown=bool(shown))
        if decision.action is not Action.RETRY or decision.feedback is None:
            return decision, None
        return decision, turn.retry_body(with_shown_text(decision.feedback, shown))

    async def _judge(
        self, turn: Turn, candidate: dict[str, Any], attempt: int, tool_bytes_sent: bool, text_shown: bool = False
    ) -> Decision:
        # Every field is already known-good (messages checked by the chat pipeline, the candidate normalized):
        # validating would only copy the whole conversation once more per attempt. Every field is given, because
        # pydantic resolves a missing one's default (inspecting its factory's signature) on each construction.
        event = TurnEvent.model_construct(
            kind="turn",
            v=SCHEMA_VERSION,
            turn_id=new_id("turn"),
            session_id=turn.ref.session_id,
            tenant=turn.ref.tenant,
            reply_to=None,
            deadline_ms=None,
            created_ms=now_ms(),
            profile=turn.active.profile.name,
            profile_sha256=turn.active.sha256,
            messages=turn.messages,
            tools=turn.tools,
            candidate=candidate,
            attempt=attempt,
        )
        profile = turn.active.profile
        outcome = await self.verdicts.evaluate(event, profile.deadline_ms / 1000)
        result: Verdict | Degraded
        if outcome.verdict is not None:
            result = outcome.verdict
        else:
            result = Degraded("deadline" if outcome.reason is MissReason.DEADLINE else "outage")
        # The decision reads the candidate as the detectors do; its feedback and its answer fit the harness.
        names = known_names(turn.tool_names, profile)
        dialect = resolve(profile.dialect, turn.messages, candidate, names)
        native = native_message(candidate, len(turn.messages), names) if dialect.text_actions else candidate
        decision = decide(self.mode, profile, result, native, turn.tools, attempt, tool_bytes_sent, dialect, text_shown)
        self._account(turn, attempt, decision)
        self._record(event, outcome, decision, whole=turn.state.turns == 1 and attempt == 0)
        return decision

    def _record(self, event: TurnEvent, outcome: VerdictOutcome, decision: Decision, whole: bool) -> None:
        if self.recorder is None:
            return
        self.recorder.record_turn(event, whole=whole)
        if outcome.verdict is not None:
            self.recorder.record_verdict(outcome.verdict)
        if decision.changes_answer:
            why = decision.feedback["content"] if decision.feedback else "; ".join(f.message for f in decision.findings)
            self.recorder.record_intervention(
                Intervention(
                    tenant=event.tenant,
                    session_id=event.session_id,
                    turn_id=event.turn_id,
                    action=decision.action,
                    categories=list(decision.categories),
                    mode=self.mode.value,
                    original=event.candidate,
                    final=decision.replacement,  # None for a retry: the rejected attempt is never sent
                    message=why or f"no verdict ({decision.degraded})",
                    attempt=event.attempt,
                    risk=outcome.verdict.risk if outcome.verdict is not None else None,
                    risk_features=outcome.verdict.risk_features if outcome.verdict is not None else [],
                )
            )

    def _account(self, turn: Turn, attempt: int, decision: Decision) -> None:
        """One decision into the turn and the session (:meth:`Turn.apply`), and into the metrics and the log."""
        settled = turn.apply(decision)
        mode = self.mode.value
        declared = {str((t.get("function") or {}).get("name")) for t in turn.tools[:MAX_TOOL_LABELS]}
        for f in decision.findings:
            tool = (
                "none"
                if f.tool_name is None
                else (self.metrics.tool_label(f.tool_name) if f.tool_name in declared else OTHER)
            )
            self.metrics.findings.labels(category=f.category.value, detector=f.detector, tool=tool).inc()
        if settled:
            outcome_label = (
                "fixed" if not decision.changes_answer else ("exhausted" if decision.exhausted else "failed")
            )
            for c in settled:
                self.metrics.retries.labels(category=c.value, outcome=outcome_label).inc()
        if decision.changes_answer:
            for category in [c.value for c in decision.categories] or ["none"]:
                labels = {"action": decision.action.value, "category": category, "mode": mode, "api": turn.api}
                self.metrics.interventions.labels(**labels).inc()
            log.info(
                "session %s/%s attempt %d: %s (%s)",
                turn.ref.tenant,
                turn.ref.session_id,
                attempt,
                ",".join(decision.labels),
                "; ".join(f.message for f in decision.findings)[:500] or decision.degraded,
            )
        if decision.degraded is not None:
            policy = "closed" if decision.action is Action.BLOCK else "open"
            self.metrics.degraded.labels(reason=decision.degraded, policy=policy).inc()

    def _unquoted(self, turn: Turn, choice: dict[str, Any]) -> dict[str, Any]:
        """The choice's message with quoted context cut: in place in enforce mode (the client gets the cut text), on a
        copy in observe mode (the client gets the answer untouched)."""
        message, quoted = turn.cut_quotes(choice.get("message") or {}, in_place=self.mode is Mode.ENFORCE)
        self._count_quote(turn, quoted)
        return message

    def _count_quote(self, turn: Turn, quoted: bool) -> None:
        if not quoted:
            return
        self.metrics.quoted_context.labels(mode=self.mode.value, api=turn.api).inc()
        if self.mode is Mode.ENFORCE and QUOTE_LABEL not in turn.labels:
            turn.labels.append(QUOTE_LABEL)
        log.info("session %s/%s: the reply quoted the injected context", turn.ref.tenant, turn.ref.session_id)

    async def _finish(self, turn: Turn, finish_reason: str) -> None:
        if turn.labels:
            turn.state.interventions += 1
        intervened = "yes" if turn.state.interventions else "no"
        self.metrics.sessions.labels(intervened=intervened, finish_reason=finish_reason, api=turn.api).inc()
        # The answer need not wait for the write; the session's next turn here does (see proxy.supervision.sessions).
        self.store.save_soon(turn.ref, turn.state)

    def _trailer(self, turn: Turn) -> dict[str, str]:
        trailer = {"session": turn.ref.session_id}
        if turn.labels:
            trailer["intervention"] = ",".join(turn.labels)
        if turn.degraded:
            trailer["degraded"] = turn.degraded
        return trailer

    # -- background evaluation ------------------------------------------------------------------------

    def _later(self, turn: Turn, candidate: dict[str, Any], attempt: int, choice: Mapping[str, Any]) -> None:
        key = (turn.ref.tenant, turn.ref.session_id)
        finish = str(choice.get("finish_reason") or "none")
        if turn.state.turns == 1:  # a new session is known before its answer leaves (queued): an outcome may follow
            self.store.save_soon(turn.ref, turn.state)

        async def run() -> None:
            try:
                await self._judge(turn, candidate, attempt, tool_bytes_sent=True)
                await self._finish(turn, finish)
            except Exception:  # a background evaluation must never take the process down; it is logged
                log.exception("background evaluation failed for session %s/%s", *key)
            finally:
                if self._pending.get(key) is task:
                    del self._pending[key]

        task = asyncio.get_running_loop().create_task(run(), name=f"evaluate:{key[1]}")
        self._pending[key] = task

    async def settled(self, ref: SessionRef) -> None:
        """Wait (bounded) for the session's background evaluation here: its guidance, its verdict on record."""
        task = self._pending.get((ref.tenant, ref.session_id))
        if task is not None and not task.done():
            await asyncio.wait({task}, timeout=self.profiles.current.profile.deadline_ms / 1000 + 0.05)
