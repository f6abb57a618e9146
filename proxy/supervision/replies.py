"""What the end user reads when the proxy answers in the agent's place, and how it joins text already sent.

A held action becomes a plain question or statement in the agent's voice, derived from the held call and the
category of what was found ("Before I cancel reservation ABC123, can you confirm you want me to go ahead?"). It
never carries rule wording, detector reasons or tool identifiers: those go to the ``x-fama-*`` headers, the ``fama``
metadata and the record. :func:`unsaid` keeps a stream from telling the user the same thing twice.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Sequence
from typing import Any

from detector_service.contract.wire import Category

MAX_IDS = 2  # identifiers named per action: enough to say which one, short enough to read
_ID_KEY = re.compile(r"^(?P<noun>.*?)[_ ]?(?:id|number|code)$", re.IGNORECASE)
_CAMEL = re.compile(r"(?<=[a-z0-9])(?=[A-Z])")
_SENTENCE_END = re.compile(r"(?<=[.!?…])\s+")
# Said first when a refusal follows text the user already has (e.g. "Sure, cancelling it now."): that text may
# have announced the action, so the refusal must not read as if it had happened.
CORRECTION = "Sorry, I haven't actually done that yet."
NO_ANSWER = "I can't give a reliable answer to that right now. Could you tell me how you'd like to proceed?"


def _words(name: str) -> str:
    return " ".join(_CAMEL.sub(" ", name).replace("_", " ").replace("-", " ").replace(".", " ").split()).lower()


def _arguments(call: dict[str, Any]) -> dict[str, Any]:
    raw = (call.get("function") or {}).get("arguments")
    try:
        args = json.loads(raw) if isinstance(raw, str) else raw
    except ValueError:
        return {}
    return args if isinstance(args, dict) else {}


def action_phrase(call: dict[str, Any]) -> str:
    """The call as the user would say it: ``cancel_reservation(reservation_id=ABC123)`` -> "cancel reservation
    ABC123"; ``update_address(user_id=u1)`` -> "update address for user u1"."""
    phrase = _words(str((call.get("function") or {}).get("name") or "")) or "do that"
    named: list[str] = []
    count = 0
    for key, value in _arguments(call).items():
        match = _ID_KEY.match(key)
        if match is None or not isinstance(value, str | int) or isinstance(value, bool):
            continue
        text = str(value).strip()
        if not text or len(text) > 40 or "\n" in text:
            continue
        noun = _words(match["noun"])
        if noun and noun in phrase.split():
            phrase = f"{phrase} {text}"
        else:
            named.append(f"{noun} {text}".strip())
        count += 1
        if count >= MAX_IDS:
            break
    return f"{phrase} for {', '.join(named)}" if named else phrase


def _actions(calls: Sequence[dict[str, Any]]) -> str:
    phrases = list(dict.fromkeys(action_phrase(c) for c in calls))
    if len(phrases) <= 2:
        return " and ".join(phrases)
    return f"{', '.join(phrases[:-1])} and {phrases[-1]}"


def held_reply(
    calls: Sequence[dict[str, Any]],
    categories: Iterable[Category],
    degraded: bool = False,
    after_text: bool = False,
) -> str:
    """The answer sent instead of held ``calls``, by the first category found (or a missing verdict);
    ``after_text``: the user already has text of this turn, so the answer first says the action did not happen."""
    found = list(categories)
    if not calls:
        text = NO_ANSWER
    else:
        action = _actions(calls)
        if degraded:
            text = f"I can't {action} right now. Would you like me to try again in a moment?"
        elif Category.DCV in found:
            text = f"Before I {action}, can you confirm you want me to go ahead?"
        elif Category.WRCO in found:
            text = f"Before I {action}, could you confirm the details for me? I want to be sure I have them right."
        elif Category.LOOP in found:
            text = f"I wasn't able to {action} so far. How would you like me to proceed?"
        elif Category.MTC in found:
            text = f"I wasn't able to {action} as it stands. Could you give me the details again?"
        else:
            text = f"Before I {action}, could you confirm that's what you'd like me to do?"
    return f"{CORRECTION} {text}" if after_text and calls else text


def _norm(text: str) -> str:
    return " ".join(text.split())


def unsaid(shown: str, text: str) -> str:
    """What of ``text`` (an answer for the turn) to send after ``shown``, the text the client already has: its
    continuation when it goes on from there, nothing of what repeats it, and new text set apart from it (never
    glued to it)."""
    if not shown or text.startswith(shown):
        return text[len(shown) :]
    said = _norm(shown)
    body = _norm(text)
    if not body or body in said:
        return ""
    start = 0  # drop the leading sentences the client already has
    for match in _SENTENCE_END.finditer(text):
        if _norm(text[start : match.start()]) not in said:
            break
        start = match.end()
    else:
        if _norm(text[start:]) in said:
            return ""
    rest = text[start:]
    if start == 0 and rest[:1].isspace():
        return rest  # the model goes on from the text shown
    return "\n\n" + rest.lstrip()
