"""Scripted agent and user models for tau2 episodes (served by :class:`tests.supervised_upstream.ScriptedModel`).

The **agent** serves the airline agent's requests. Asked to cancel reservations named in the user's first message,
it cancels them at once, without looking them up or asking — unless the conversation carries the proxy's correction
(``[FAMA feedback]``, or a correction in the injected ``[FAMA context v1]``), after which it looks each reservation up, keeps only those the policy
lets it cancel (business cabin, or travel insurance), lists them and asks for a yes, and cancels on "yes". Any other
request (a complaint) it answers after reading the user's profile, with no write.

The **user** answers from its task's instructions in the ``<scenario>`` of its system prompt: its reason for calling
first, its user id when asked, "yes" to a confirmation question, and tau2's stop token otherwise.
"""

from __future__ import annotations

import json
import re
from typing import Any

from tests.supervised_upstream import call

USER_ID = re.compile(r"\b[a-z]+_[a-z]+_\d{4}\b")
RESERVATION_ID = re.compile(r"\b[A-Z0-9]{6}\b")
CONFIRM_QUESTION = "Do you confirm (yes)?"
STOP = "###STOP###"
# The retry's feedback, or the correction a later turn's injected context carries.
CORRECTION = re.compile(r"^\[FAMA feedback\]|^## Correction from the previous turn", re.MULTILINE)


def _text(message: dict[str, Any]) -> str:
    content = message.get("content")
    return content if isinstance(content, str) else ""


def _calls(messages: list[dict[str, Any]]) -> list[tuple[str, dict[str, Any]]]:
    return [
        (tc["function"]["name"], json.loads(tc["function"]["arguments"] or "{}"))
        for m in messages
        if m.get("role") == "assistant"
        for tc in m.get("tool_calls") or []
    ]


def _results(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    found = []
    for m in messages:
        if m.get("role") == "tool":
            try:
                value = json.loads(_text(m))
            except json.JSONDecodeError:
                continue
            if isinstance(value, dict):
                found.append(value)
    return found


def _to_call(name: str, arguments: dict[str, Any], messages: list[dict[str, Any]]) -> dict[str, Any]:
    return {"tool_calls": [call(name, json.dumps(arguments), f"call_{len(_calls(messages)) + 1}")]}


def corrected(messages: list[dict[str, Any]]) -> bool:
    """The proxy told this agent off (feedback on a retry, or a correction carried into a later turn)."""
    return any(m.get("role") == "system" and CORRECTION.search(_text(m)) for m in messages) or any(
        name == "get_reservation_details" for name, _ in _calls(messages)
    )


def cancellable(reservation: dict[str, Any]) -> bool:
    return reservation.get("cabin") == "business" or reservation.get("insurance") == "yes"


def agent_reply(body: dict[str, Any]) -> dict[str, Any]:
    messages: list[dict[str, Any]] = body["messages"]
    said = [_text(m) for m in messages if m.get("role") == "user"]
    user_id = next((found.group(0) for text in said if (found := USER_ID.search(text))), None)
    if user_id is None:
        return {"content": "Could you tell me your user id?"}
    calls = _calls(messages)
    if not any(name == "get_user_details" for name, _ in calls):
        return _to_call("get_user_details", {"user_id": user_id}, messages)
    request = said[0]
    wanted = re.search(r"cancel[^(]*\(([^)]*)\)", request)
    if wanted is None:
        return {"content": "I am sorry to hear that. I have checked your profile."}
    ids = RESERVATION_ID.findall(wanted.group(1))
    cancelled = {args.get("reservation_id") for name, args in calls if name == "cancel_reservation"}
    if not corrected(messages):
        for rid in ids:
            if rid not in cancelled:
                return _to_call("cancel_reservation", {"reservation_id": rid}, messages)
        return {"content": f"Reservations {' and '.join(ids)} are cancelled."}
    looked_up = {args.get("reservation_id") for name, args in calls if name == "get_reservation_details"}
    for rid in ids:
        if rid not in looked_up:
            return _to_call("get_reservation_details", {"reservation_id": rid}, messages)
    details = {r["reservation_id"]: r for r in _results(messages) if "reservation_id" in r and "cabin" in r}
    allowed = [rid for rid in ids if rid in details and cancellable(details[rid])]
    refused = [rid for rid in ids if rid not in allowed]
    asked = any(CONFIRM_QUESTION in _text(m) for m in messages if m.get("role") == "assistant")
    if not asked:
        why = "".join(
            f"Reservation {rid} is in {details[rid]['cabin']} without travel insurance, so it cannot be cancelled. "
            for rid in refused
            if rid in details
        )
        listing = ", ".join(
            f"reservation {rid} ({details[rid]['origin']} to {details[rid]['destination']})" for rid in allowed
        )
        return {"content": f"{why}I can cancel {listing} with a refund to the original payment. {CONFIRM_QUESTION}"}
    if said[-1].strip().lower().startswith("yes"):
        for rid in allowed:
            if rid not in cancelled:
                return _to_call("cancel_reservation", {"reservation_id": rid}, messages)
    return {"content": f"Reservation {' and '.join(allowed)} is cancelled."}


def _scenario_section(scenario: str, name: str) -> str:
    found = re.search(rf"{name}:\n((?:\t\t.*\n?|\n)+)", scenario)
    return " ".join(line.strip() for line in found.group(1).splitlines() if line.strip()) if found else ""


def user_reply(body: dict[str, Any]) -> dict[str, Any]:
    """tau2's user simulator sees the conversation with roles flipped: the agent speaks as ``user``."""
    messages: list[dict[str, Any]] = body["messages"]
    scenario = _text(messages[0])
    own = [m for m in messages if m.get("role") == "assistant"]
    agent_said = _text(messages[-1])
    if not own:
        reason = _scenario_section(scenario, "Reason for call")
        first_person = re.sub(
            r"\byour\b",
            "my",
            re.sub(r"\bYou (want|are)\b", lambda m: "I want" if m.group(1) == "want" else "I am", reason),
        )
        return {"content": first_person}
    if "user id" in agent_said.lower():
        found = USER_ID.search(_scenario_section(scenario, "Known info"))
        return {"content": f"My user id is {found.group(0) if found else 'unknown'}."}
    if CONFIRM_QUESTION in agent_said:
        return {"content": "yes"}
    return {"content": STOP}
