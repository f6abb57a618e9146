"""The decision table: which findings act (retry / rewrite / block) and which only guide the next turn.

A finding acts only where harm is likely. Two things decide it, here and nowhere else:

- **stakes**, what the pending action can do: a state-changing write (``WRITE``), a hand-off or the end of
  the request (``END``: a transfer to a human, a reply that puts the request off, claims it done or says
  nothing), a look-up (``READ``: reads, generic tools, a parallel batch of reads), plain text (``TEXT``).
  A finding about one call takes that call's stakes; a finding about the whole turn takes the turn's
  strongest call, or ``END`` when the detector is about how the request ends;
- **evidence**, how much stands behind the finding: ``STRONG`` when it is checked against the
  conversation itself (no yes in the user's message, a value no tool returned, a policy condition a
  returned record fails, a call that cannot run, an empty reply), ``WEAK`` when it is a reading of
  wording or of a pattern (a deferral phrase, a write on an entity never read, a failing tool retried, the
  judge's opinion), ``STYLE`` when it is about how the agent works, not what it does (several calls in one
  turn, a repeated look-up or transfer).

======== ========== ============ ==========
stakes   STRONG     WEAK         STYLE
======== ========== ============ ==========
WRITE    block      retry        guide
END      retry      retry        guide
READ     guide      guide        guide
TEXT     guide      guide        guide
======== ========== ============ ==========

The cell is a ceiling: the profile's action for the category and a calibrated entry for the finding
(``findings:`` in the profile, written by ``fama analyze`` from outcomes) can only lower it. A repair of a
malformed call (``arguments_repaired``) is no verdict on the agent and is always a rewrite.

A learned monitor (``detector_service.monitor``) can raise a turn, never beyond a retry and only where harm is
likely: at a WRITE or END turn whose risk is at or over the monitor's threshold, on the first attempt, the turn's
guide-level findings about that action act (a retry with their feedback); with none, one ``monitor_risk``
finding asks for a pre-write verification (check the call against the policy, the tool outputs and the user's
words; the same call sent again then passes, since a retry is never checked by the monitor). Reads and plain
text are never acted on; a monitor that abstains or is off changes nothing.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from enum import IntEnum

from detector_service.contract.profile import Profile, ToolKind
from detector_service.contract.toolkinds import ToolKinds, is_handoff
from detector_service.contract.wire import ACTION_STRENGTH, Action, Category, Finding
from detector_service.monitor.score import Risk


class Stakes(IntEnum):
    TEXT = 0
    READ = 1
    END = 2
    WRITE = 3


class Evidence(IntEnum):
    STYLE = 0
    WEAK = 1
    STRONG = 2


CEILING: dict[Stakes, dict[Evidence, Action]] = {
    Stakes.WRITE: {Evidence.STRONG: Action.BLOCK, Evidence.WEAK: Action.RETRY, Evidence.STYLE: Action.GUIDE},
    Stakes.END: {Evidence.STRONG: Action.RETRY, Evidence.WEAK: Action.RETRY, Evidence.STYLE: Action.GUIDE},
    Stakes.READ: {Evidence.STRONG: Action.GUIDE, Evidence.WEAK: Action.GUIDE, Evidence.STYLE: Action.GUIDE},
    Stakes.TEXT: {Evidence.STRONG: Action.GUIDE, Evidence.WEAK: Action.GUIDE, Evidence.STYLE: Action.GUIDE},
}

MONITOR_DETECTOR = "monitor_risk"

# detector -> (evidence, whether the finding is about how the request ends rather than about a call)
DETECTORS: dict[str, tuple[Evidence, bool]] = {
    # MTC: the call cannot run as written. A tool that does not exist or arguments that are not JSON leave the
    # client's harness nothing to execute: the turn ends there, whatever the tool's name suggests.
    "unknown_tool": (Evidence.STRONG, True),
    "arguments_not_json": (Evidence.STRONG, True),
    "schema_violation": (Evidence.STRONG, False),
    "arguments_repaired": (Evidence.STRONG, False),
    # lists the tool's description pairs by position, of different lengths: a reading of the description's words
    "unpaired_arguments": (Evidence.WEAK, False),
    # A text action that does not parse: nothing ran and the user got the text. It takes the stakes of the call
    # it names (a read the user must ask for again, a write that did not happen).
    "unparsed_action": (Evidence.STRONG, False),
    # DCV
    "write_without_confirmation": (Evidence.STRONG, False),
    "requires_confirmation": (Evidence.STRONG, False),
    "details_not_listed": (Evidence.WEAK, False),
    "one_tool_call_per_turn": (Evidence.STYLE, False),
    "write_in_batch": (Evidence.WEAK, False),  # the same rule when the batch holds a write: data changes unseen
    "entity_condition": (Evidence.STRONG, False),
    "argument_constraint": (Evidence.STRONG, False),
    "forbidden": (Evidence.STRONG, False),
    "requires_prior_read": (Evidence.WEAK, False),
    # WRCO
    "ungrounded_value": (Evidence.STRONG, False),
    "contradicts_tool_output": (Evidence.STRONG, False),
    "entity_named_otherwise": (Evidence.WEAK, False),  # the user may hold several and mean this one after all
    "write_on_unread_entity": (Evidence.WEAK, False),
    # IFU
    "handoff_before_attempt": (Evidence.WEAK, True),
    "deferred_request": (Evidence.WEAK, True),
    "empty_reply": (Evidence.STRONG, True),
    "claimed_without_action": (Evidence.STRONG, True),
    # LOOP
    "repeated_call": (Evidence.STYLE, False),
    "repeated_errors": (Evidence.WEAK, False),
    # the LLM judge: an opinion, never proof
    "llm_judge": (Evidence.WEAK, False),
    # the learned monitor: a risk, never proof
    MONITOR_DETECTOR: (Evidence.WEAK, False),
}

# Findings of the rules a profile (or the policy text) declares; those of rules about one tool are counted per tool.
PER_TOOL_RULES = frozenset(
    {"requires_confirmation", "requires_prior_read", "argument_constraint", "entity_condition", "forbidden"}
)
RULE_DETECTORS = PER_TOOL_RULES | {"one_tool_call_per_turn", "write_in_batch"}


def evidence_of(finding: Finding) -> Evidence:
    return DETECTORS.get(finding.detector, (Evidence.WEAK, False))[0]


def _call_stakes(name: str, kinds: ToolKinds) -> Stakes:
    if is_handoff(name):
        return Stakes.END
    return Stakes.WRITE if kinds.kind(name) is ToolKind.WRITE else Stakes.READ


def stakes_of(finding: Finding, calls: Sequence[Mapping[str, str | None]], kinds: ToolKinds) -> Stakes:
    """What the pending action the finding is about can do. ``calls``: the turn's calls as {id, name}."""
    if DETECTORS.get(finding.detector, (Evidence.WEAK, False))[1]:
        return Stakes.END
    if finding.tool_call_id is not None or finding.tool_name is not None:
        for call in calls:
            if (finding.tool_call_id is not None and call.get("id") == finding.tool_call_id) or (
                finding.tool_call_id is None and call.get("name") == finding.tool_name
            ):
                return _call_stakes(str(call.get("name") or ""), kinds)
        if finding.tool_name is not None:
            return _call_stakes(finding.tool_name, kinds)
    if not calls:
        return Stakes.TEXT
    return max(_call_stakes(str(c.get("name") or ""), kinds) for c in calls)


def entry_key(finding: Finding) -> str:
    """The profile's ``findings:`` key of a finding: ``CATEGORY/detector``, per tool for rule findings."""
    base = f"{finding.category.value}/{finding.detector}"
    if finding.detector in PER_TOOL_RULES and finding.tool_name:
        return f"{base}/{finding.tool_name}"
    return base


def _weaker(a: Action, b: Action) -> Action:
    return a if ACTION_STRENGTH[a] <= ACTION_STRENGTH[b] else b


def action_for(profile: Profile, finding: Finding, stakes: Stakes) -> Action:
    """The action this finding alone asks for: the table's ceiling, lowered by the profile."""
    if "repaired_arguments" in finding.evidence:
        return Action.REWRITE
    action = _weaker(CEILING[stakes][evidence_of(finding)], profile.action_for(finding.category))
    entry = profile.findings.get(entry_key(finding)) or profile.findings.get(
        f"{finding.category.value}/{finding.detector}"
    )
    if entry is not None:
        action = _weaker(action, entry.action)
    if action is Action.REWRITE:
        return Action.RETRY  # only a repair can be rewritten; anything else the model must redo itself
    return action


def turn_stakes(found: Sequence[Finding], calls: Sequence[Mapping[str, str | None]], kinds: ToolKinds) -> Stakes:
    """What the whole turn can do: its strongest call, or END when a finding is about how the request ends."""
    out = max((_call_stakes(str(c.get("name") or ""), kinds) for c in calls), default=Stakes.TEXT)
    if out < Stakes.END and any(DETECTORS.get(f.detector, (Evidence.WEAK, False))[1] for f in found):
        return Stakes.END
    return out


def _verification(risk: Risk, write: bool) -> Finding:
    raised = ", ".join(risk.top) or "the run so far"
    return Finding(
        category=Category.DCV if write else Category.IFU,
        detector=MONITOR_DETECTOR,
        message=(
            f"Runs like this one often go wrong at this step (risk {risk.value:.2f}; raised by {raised}). Before "
            "making this call, check it against the policy, the tool outputs and the user's own words: every "
            "argument must come from a tool output or from the user, and the user must have explicitly confirmed "
            "exactly this action. If it holds, make the same call again unchanged; otherwise correct it or ask "
            "the user."
        ),
        evidence={"risk": risk.value, "threshold": risk.threshold, "features": list(risk.top)},
    )


def apply_risk(
    found: list[Finding],
    calls: Sequence[Mapping[str, str | None]],
    kinds: ToolKinds,
    risk: Risk | None,
    attempt: int = 0,
    retries: int = 1,
) -> None:
    """Raise a risky WRITE/END turn (see the module's docstring): the guide-level findings about that action become
    retries, or a ``monitor_risk`` verification finding is added. ``found``'s actions must already be decided.
    ``retries``: the profile's ``max_retries``; with none, a retry would become a block, which the monitor never
    asks for."""
    if risk is None or not risk.acting or attempt > 0 or retries < 1:
        return
    stakes = turn_stakes(found, calls, kinds)
    if stakes < Stakes.END:
        return
    guiding = [f for f in found if f.action is Action.GUIDE and stakes_of(f, calls, kinds) >= Stakes.END]
    for f in guiding:
        f.action = Action.RETRY
        f.evidence = {**f.evidence, "risk": risk.value, "risk_features": list(risk.top)}
    if not guiding and not any(
        f.action is not None and ACTION_STRENGTH[f.action] >= ACTION_STRENGTH[Action.RETRY] for f in found
    ):
        finding = _verification(risk, stakes is Stakes.WRITE)
        finding.action = Action.RETRY
        found.append(finding)


__all__ = [
    "CEILING",
    "DETECTORS",
    "MONITOR_DETECTOR",
    "Evidence",
    "Stakes",
    "action_for",
    "apply_risk",
    "entry_key",
    "evidence_of",
    "stakes_of",
    "turn_stakes",
]
