"""IFU, incomplete fulfilment: giving up or handing off before trying, or claiming work never done.

- early hand-off: a hand-off tool (transfer to a human) or a give-up sentence before any tool was tried
  for the user's request;
- deferred request: the assistant sends the user away to come back later ("once you have your
  reservation id, reach out") after next to no look-ups and no action: the request stays open;
- unfulfilled claim: the assistant tells the user an action is done while no write call in the
  conversation succeeded, so the request is still open.
"""

from __future__ import annotations

import re

from detector_service.toolkinds import is_handoff
from detector_service.turn import TurnView
from detector_service.wire import Category, Finding, Severity

_ASKED_HUMAN = re.compile(
    r"\b(human|person|supervisor|manager|representative|someone|real agent|transfer|escalat\w*|higher-up)\b",
    re.IGNORECASE,
)
# The assistant sends the user away to come back later instead of finishing the request now.
_DEFER = re.compile(
    r"\b(once you (have|find|locate|get|are able)|when you have|whenever you('re| are) ready|"
    r"(reach|get|come) (out|back)( to (me|us))? (again |whenever|when|once|later|soon)|"
    r"feel free to reach out (again )?(when|once|whenever)|when you find|if you (can )?(find|locate)|take your time)",
    re.IGNORECASE,
)
_DONE = re.compile(
    r"\b(has|have) been (successfully )?(cancel+ed|booked|updated|modified|changed|processed|refunded|"
    r"issued|added|exchanged|returned|upgraded|rebooked|sent)\b|\bsuccessfully (cancel+ed|booked|updated|"
    r"modified|changed|processed|refunded|issued|added|exchanged|returned|upgraded)\b",
    re.IGNORECASE,
)


def detect(view: TurnView) -> list[Finding]:
    index = view.index
    out: list[Finding] = []
    tried = index.reads + index.writes
    handoff = next((c for c in view.calls if is_handoff(c.name)), None)
    asked_for_human = bool(_ASKED_HUMAN.search(index.latest_user_text))
    if handoff is not None and tried == 0 and index.user_count > 0 and not asked_for_human:
        what = f"calls '{handoff.name}'"
        out.append(
            Finding(
                category=Category.IFU,
                detector="handoff_before_attempt",
                severity=Severity.ERROR,
                message=f"Rule: try the relevant tools before handing off or giving up. This turn {what} but no "
                "tool has been used for the user's request yet. Look up the user's data and try to solve it first.",
                evidence={"tools_tried": tried},
                tool_call_id=handoff.call_id,
                tool_name=handoff.name,
            )
        )
    max_reads = int(view.profile.detector_settings("ifu").get("max_reads_before_defer", 1))
    if not view.calls and index.writes == 0 and index.reads <= max_reads and _DEFER.search(view.text):
        phrase = _DEFER.search(view.text)
        out.append(
            Finding(
                category=Category.IFU,
                detector="deferred_request",
                severity=Severity.WARNING,
                message=f"Rule: finish the user's request in this conversation when the tools allow it. This message "
                f"puts it off ({phrase.group(0) if phrase else ''!r}) after {index.reads} look-up(s) and no action; "
                "look the missing details up with the read tools (for example from the user's profile) instead "
                "of asking the user to come back.",
                evidence={"reads": index.reads},
            )
        )
    if not view.calls and index.writes == 0 and _DONE.search(view.text):
        claim = _DONE.search(view.text)
        out.append(
            Finding(
                category=Category.IFU,
                detector="claimed_without_action",
                severity=Severity.ERROR,
                message=f"Rule: only report actions that a tool actually performed. This message says "
                f"{claim.group(0) if claim else ''!r}, but no tool call has changed anything in this conversation; "
                "the request is still open. Call the tool (after confirmation) or tell the user it is not done.",
                evidence={"claim": claim.group(0) if claim else ""},
            )
        )
    return out
