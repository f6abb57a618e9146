"""What to do with one candidate answer, given its verdict (or the lack of one). Pure: no I/O.

``decide`` maps (mode, profile, outcome, attempt, whether tool-call bytes already reached the client)
to a :class:`Decision`, consequences included (the guidance and the agents its findings switch on for the
session's next turns, the ``x-fama-intervention`` labels):

- ``observe`` never changes the answer. Findings become guidance for the next turn.
- ``enforce`` follows the verdict's action:
  ``pass`` sends the answer; ``guide`` sends it and carries the findings into the next turn;
  ``rewrite`` sends ``Verdict.rewritten`` (a retry when there is none); ``retry`` re-asks the model with
  the findings as feedback while ``attempt < profile.max_retries`` and blocks once they are spent;
  ``block`` answers with a safe assistant message that names the held action in plain words and asks the user
  (:mod:`proxy.supervision.replies`; the findings themselves go to the headers, the metadata and the record).
  Once any tool-call byte has reached the client the answer can no longer be replaced, so a verdict
  that wants a change becomes guidance.
- Without a verdict (``deadline`` or ``outage``) the categories at stake for the candidate decide:
  a write call puts DCV at stake, any call MTC/WRCO/LOOP, a text answer IFU/CM. If
  ``profile.on_timeout`` says ``closed`` for any of them the answer is blocked, otherwise it passes
  (fail-open); either way it is marked degraded.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, cast

from detector_service.contract.profile import AgentName, Dialect, Mode, Profile, ToolKind
from detector_service.contract.textactions import react_respond
from detector_service.contract.toolkinds import ToolKinds
from detector_service.contract.wire import Action, Category, Finding, Verdict
from proxy.supervision.replies import held_reply

if TYPE_CHECKING:  # the OpenAI message shapes, checked statically and never at runtime
    from openai.types.chat import ChatCompletionAssistantMessageParam as AssistantMessage
    from openai.types.chat import ChatCompletionSystemMessageParam as SystemMessage
    from openai.types.chat import ChatCompletionUserMessageParam as UserMessage

    Feedback = SystemMessage | UserMessage

DegradedReason = Literal["deadline", "outage"]
FEEDBACK_ROLE: Literal["system"] = "system"  # the retry feedback is an instruction to the model, not the user's words
# A ReAct harness feeds everything that is not the model's own words back as user messages (tool results too).
REACT_FEEDBACK_ROLE: Literal["user"] = "user"
FEEDBACK_PREFIX = "[FAMA feedback]"
REACT_FORMAT = (
    "Answer again in the same format: Thought: ..., then Action: and exactly one JSON object "
    '{"name": ..., "arguments": {...}}; to ask or tell the user something, use the action "respond".'
)
TEXT_FORMAT = (
    "Answer again in the same format as before: a tool call written exactly the way you wrote your earlier calls, "
    "or plain text to ask or tell the user something."
)


TRIGGERS: dict[Category, tuple[AgentName, ...]] = {
    Category.WRCO: (AgentName.TOR,),
    Category.DCV: (AgentName.VERIFIER, AgentName.DCE),
    Category.IFU: (AgentName.PLANNER, AgentName.TSA),
    Category.MTC: (AgentName.TSA,),
    Category.LOOP: (AgentName.MEMORY,),
    Category.CM: (AgentName.PLANNER,),
}
# Order in which agents run and render; also their survival order under the budget.
AGENT_ORDER: tuple[AgentName, ...] = (
    AgentName.VERIFIER,
    AgentName.DCE,
    AgentName.TOR,
    AgentName.MEMORY,
    AgentName.PLANNER,
    AgentName.TSA,
)


def triggered_agents(categories: Iterable[Category]) -> tuple[AgentName, ...]:
    """The agents that findings of ``categories`` switch on, in :data:`AGENT_ORDER`."""
    wanted = {agent for c in categories for agent in TRIGGERS.get(c, ())}
    return tuple(a for a in AGENT_ORDER if a in wanted)


@dataclass(frozen=True)
class Degraded:
    reason: DegradedReason


Outcome = Verdict | Degraded


@dataclass(frozen=True)
class Decision:
    action: Action  # what is done with this attempt (always ``pass`` or ``guide`` in observe mode)
    intended: Action  # what enforce mode wants, recorded even when observe mode does not act on it
    categories: tuple[Category, ...] = ()
    feedback: Feedback | None = None  # appended to the conversation for the retry only
    replacement: AssistantMessage | None = None  # the assistant message sent instead (rewrite, block)
    guidance: tuple[str, ...] = ()  # carried into the next turn's injected context
    activate: tuple[AgentName, ...] = ()  # agents switched on for the session's next turns (``TRIGGERS``)
    degraded: DegradedReason | None = None
    exhausted: bool = False  # a retry was wanted but no attempt was left
    findings: tuple[Finding, ...] = field(default=())

    @property
    def changes_answer(self) -> bool:
        return self.action in (Action.RETRY, Action.REWRITE, Action.BLOCK)

    @property
    def labels(self) -> list[str]:
        """``x-fama-intervention`` parts, e.g. ``retry:DCV``; empty when the answer is not changed."""
        if not self.changes_answer:
            return []
        if not self.categories:
            return [self.action.value]
        return [f"{self.action.value}:{c.value}" for c in self.categories]


def tool_calls(candidate: dict[str, Any]) -> list[dict[str, Any]]:
    calls = candidate.get("tool_calls")
    return [c for c in calls if isinstance(c, dict)] if isinstance(calls, list) else []


def _name(call: dict[str, Any]) -> str:
    return str((call.get("function") or {}).get("name") or "")


def describe_call(call: dict[str, Any], limit: int = 160) -> str:
    """``name`` (k: v, ...) for the user or the model; raw text when the arguments are not a JSON object."""
    raw = (call.get("function") or {}).get("arguments")
    try:
        args = json.loads(raw) if isinstance(raw, str) else raw
    except ValueError:
        args = None
    if isinstance(args, dict):
        inner = ", ".join(f"{k}: {v if isinstance(v, str | int | float) else json.dumps(v)}" for k, v in args.items())
    else:
        inner = str(raw or "")
    if len(inner) > limit:
        inner = inner[: limit - 1] + "…"
    return f"`{_name(call)}` ({inner})" if inner else f"`{_name(call)}`"


def at_stake(candidate: dict[str, Any], tools: Sequence[dict[str, Any]], profile: Profile) -> list[Category]:
    calls = tool_calls(candidate)
    if not calls:
        return [Category.IFU, Category.CM]
    kinds = ToolKinds(profile, tools)
    cats = [Category.MTC, Category.WRCO, Category.LOOP]
    if any(kinds.kind(_name(c)) is ToolKind.WRITE for c in calls):
        cats.insert(0, Category.DCV)
    return cats


def _driving(verdict: Verdict, profile: Profile) -> tuple[Category, ...]:
    """Categories of the findings that ask for the verdict's action (all found categories if none match)."""
    matching = [
        f.category
        for f in verdict.findings
        if (f.action if f.action is not None else profile.action_for(f.category)) == verdict.action
    ]
    return tuple(dict.fromkeys(matching or [f.category for f in verdict.findings]))


def feedback_message(
    candidate: dict[str, Any], findings: Sequence[Finding], dialect: Dialect = Dialect.NATIVE
) -> Feedback:
    """The retry's feedback; ``candidate`` as the detectors read it (a text action as a native call)."""
    calls = tool_calls(candidate)
    proposal = (
        "; ".join(describe_call(c) for c in calls)
        if calls
        else json.dumps(str(candidate.get("content") or "")[:300], ensure_ascii=False)
    )
    lines = [
        f"{FEEDBACK_PREFIX} Your previous answer was not sent to the user. You proposed: {proposal}.",
        "It was rejected because:",
        *(f"- [{f.category.value}] {f.message}" for f in findings),
    ]
    if any(f.category is Category.DCV for f in findings):
        lines.append(
            "If the user has not explicitly confirmed this action, list its details and ask them to confirm "
            "instead of calling the tool."
        )
    if dialect.text_actions:  # the harness feeds everything back as user messages
        lines.append(REACT_FORMAT if dialect is Dialect.REACT else TEXT_FORMAT)
        return {"role": REACT_FEEDBACK_ROLE, "content": "\n".join(lines)}
    lines.append("Answer again, fixing this.")
    return {"role": FEEDBACK_ROLE, "content": "\n".join(lines)}


def with_shown_text(feedback: Feedback, shown: str) -> Feedback:
    """Feedback for a streamed retry whose rejected attempt's text already reached the user."""
    if not shown:
        return feedback
    note = (
        f"The user has already seen this text from you: {json.dumps(shown[-500:], ensure_ascii=False)}. "
        "Continue from it; do not repeat it. If it announced the action, say plainly that it has not been done yet."
    )
    content = f"{feedback['content']}\n{note}"
    if feedback["role"] == REACT_FEEDBACK_ROLE:
        return {"role": REACT_FEEDBACK_ROLE, "content": content}
    return {"role": FEEDBACK_ROLE, "content": content}


def block_message(
    candidate: dict[str, Any],
    categories: Sequence[Category],
    degraded: DegradedReason | None = None,
    text_shown: bool = False,
    dialect: Dialect = Dialect.NATIVE,
) -> AssistantMessage:
    """The safe answer that replaces a held candidate, in the agent's voice (:mod:`proxy.supervision.replies`); for a
    ReAct harness, a ``respond`` action carrying it (a harness writing calls as text otherwise takes plain text)."""
    text = held_reply(tool_calls(candidate), categories, degraded is not None, text_shown)
    if dialect is Dialect.REACT:
        text = react_respond(text, "The action was held back; I need the user's answer before going further.")
    return {"role": "assistant", "content": text}


def decide(
    mode: Mode,
    profile: Profile,
    outcome: Outcome,
    candidate: dict[str, Any],
    tools: Sequence[dict[str, Any]] = (),
    attempt: int = 0,
    tool_bytes_sent: bool = False,
    dialect: Dialect = Dialect.NATIVE,
    text_shown: bool = False,
) -> Decision:
    """``candidate`` as the detectors read it (:func:`detector_service.contract.textactions.native_turn`);
    ``dialect`` is how the client's harness writes actions, and what the feedback and a block's answer fit;
    ``text_shown``: text of this turn already reached the client (a stream), so a block says first that the action
    was not done."""
    if isinstance(outcome, Degraded):
        return _degraded(mode, profile, outcome, candidate, tools, tool_bytes_sent, dialect, text_shown)
    verdict = outcome
    findings = tuple(verdict.findings)
    guidance = tuple(f"[{f.category.value}] {f.message}" for f in findings)
    cats = _driving(verdict, profile)
    wanted = verdict.action
    if wanted is Action.REWRITE and (verdict.rewritten is None or dialect.text_actions):
        wanted = Action.RETRY
    activate = triggered_agents(f.category for f in findings)
    if wanted is Action.PASS or not findings:
        return Decision(Action.PASS, Action.PASS, activate=activate, findings=findings)
    if mode is Mode.OBSERVE or wanted is Action.GUIDE or tool_bytes_sent:
        return Decision(Action.GUIDE, wanted, cats, guidance=guidance, activate=activate, findings=findings)
    if wanted is Action.REWRITE:
        return Decision(
            Action.REWRITE,
            wanted,
            cats,
            # The detector service's rewrite is an assistant message (the wire carries it as a plain object).
            replacement=cast("AssistantMessage", verdict.rewritten),
            activate=activate,
            findings=findings,
        )
    if wanted is Action.RETRY and attempt < profile.max_retries:
        feedback = feedback_message(candidate, findings, dialect)
        return Decision(Action.RETRY, wanted, cats, feedback=feedback, activate=activate, findings=findings)
    exhausted = wanted is Action.RETRY
    return Decision(
        Action.BLOCK,
        wanted,
        cats,
        replacement=block_message(candidate, [f.category for f in findings], text_shown=text_shown, dialect=dialect),
        guidance=guidance,
        activate=activate,
        exhausted=exhausted,
        findings=findings,
    )


def _degraded(
    mode: Mode,
    profile: Profile,
    outcome: Degraded,
    candidate: dict[str, Any],
    tools: Sequence[dict[str, Any]],
    tool_bytes_sent: bool,
    dialect: Dialect,
    text_shown: bool,
) -> Decision:
    closed = tuple(c for c in at_stake(candidate, tools, profile) if profile.fail_closed(c))
    if mode is Mode.OBSERVE or not closed or tool_bytes_sent:
        return Decision(Action.PASS, Action.PASS, degraded=outcome.reason)
    return Decision(
        Action.BLOCK,
        Action.BLOCK,
        closed,
        replacement=block_message(candidate, closed, outcome.reason, text_shown, dialect),
        degraded=outcome.reason,
    )
