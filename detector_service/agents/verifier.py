"""Verifier: a pre-write checklist (confirmed by the user? arguments grounded? policy satisfied?).

It names the write tools the next decision is likely about (the proposed call when there is one,
else the suggested tools), states whether the latest user message confirms, lists the identifiers
that are grounded so far, and spells out the profile's rules for those tools.
"""

from __future__ import annotations

from detector_service.agents import memory
from detector_service.agents.note import AgentInput, Note
from detector_service.contract.profile import (
    AgentName,
    ArgumentConstraint,
    Forbidden,
    OneToolCallPerTurn,
    RequiresConfirmation,
    RequiresPriorRead,
    Rule,
    ToolKind,
)


def pending_writes(inp: AgentInput) -> list[str]:
    names: list[str] = []
    if inp.candidate is not None:
        names += [str((c.get("function") or {}).get("name")) for c in inp.candidate.get("tool_calls") or []]
    likely = [n for n in inp.pending_tools if inp.view.kind_of(n) is ToolKind.WRITE]
    names += likely[:1]  # the best-fitting write only: a checklist about every write tool is noise
    return list(dict.fromkeys(n for n in names if inp.view.kind_of(n) is ToolKind.WRITE))


def rule_text(rule: Rule) -> str | None:
    if isinstance(rule, RequiresConfirmation):
        return f"`{rule.tool}` only after the user explicitly confirmed the details in their latest message."
    if isinstance(rule, RequiresPriorRead):
        source = ", ".join(f"`{r}`" for r in rule.read_tools) or "a tool"
        return f"`{rule.tool}`.{rule.argument} must be a value returned earlier by {source}."
    if isinstance(rule, ArgumentConstraint):
        bounds = []
        if rule.enum is not None:
            bounds.append(f"one of {rule.enum}")
        if rule.minimum is not None:
            bounds.append(f">= {rule.minimum}")
        if rule.maximum is not None:
            bounds.append(f"<= {rule.maximum}")
        if rule.pattern is not None:
            bounds.append(f"matching {rule.pattern}")
        return rule.message or f"`{rule.tool}`.{rule.argument} must be {' and '.join(bounds) or 'valid'}."
    if isinstance(rule, Forbidden):
        return rule.message or f"`{rule.tool}` must not be called."
    return None


def _applies(rule: Rule, tools: list[str]) -> bool:
    return isinstance(rule, OneToolCallPerTurn) or getattr(rule, "tool", None) in tools


def build(inp: AgentInput) -> Note | None:
    writes = pending_writes(inp)
    if not writes:
        return None
    confirmed = inp.view.confirmed_by_user(inp.profile)
    names = ", ".join(f"`{w}`" for w in writes)
    lines = [
        f"Before calling {names}: list the action details to the user and get an explicit yes.",
        f"[{'x' if confirmed else ' '}] The latest user message explicitly confirms this action.",
    ]
    known = memory.identifiers(inp.view)
    if known:
        grounded = "; ".join(f"{k}: {', '.join(v[-4:])}" for k, v in known.items())
        lines.append(f"[ ] Every argument is a value the user gave or a tool returned (known: {grounded}).")
    else:
        lines.append("[ ] Every argument is a value the user gave or a tool returned.")
    for rule in inp.profile.rules:
        if _applies(rule, writes):
            text = (
                "Only one tool call per turn, and no text with it."
                if isinstance(rule, OneToolCallPerTurn)
                else rule_text(rule)
            )
            if text:
                lines.append(f"[ ] {text}")
    if not confirmed:
        lines.append("Not confirmed yet: ask the user to confirm instead of calling the tool.")
    return Note(AgentName.VERIFIER, "Pre-write checklist", tuple(lines), priority=60)
