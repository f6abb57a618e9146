"""LOOP: the same call repeated, or calling a tool again after it kept failing.

- repeated call: the exact call (name and arguments) made again when its result is already at hand;
- repeated errors: the tool that failed the last N times in a row, called again without the user having
  said anything new, or a call whose exact arguments already failed (retrying it cannot help).
"""

from __future__ import annotations

from detector_service.contract.toolkinds import is_handoff
from detector_service.contract.wire import Category, Finding, Severity
from detector_service.turn import TurnView


def detect(view: TurnView) -> list[Finding]:
    index = view.index
    settings = view.profile.detector_settings("loop")
    max_repeats = int(settings.get("max_repeats", 2))
    max_errors = int(settings.get("max_errors", 2))
    out: list[Finding] = []
    last = index.calls[-1] if index.calls else None
    handoffs = sum(1 for c in index.calls if is_handoff(c.name))
    for call in view.calls:
        # Repeats the user asked for (a new user message in between) are not loops.
        seen = index.recent_calls.get(call.key, 0)
        back_to_back = last is not None and last.key == call.key and seen > 0 and not last.error
        if is_handoff(call.name):
            # Handing off again is one finding at most: the second hand-off of the conversation, whatever it says.
            seen = handoffs
            back_to_back = False
            if handoffs != 1:
                continue
        if seen >= max_repeats or back_to_back or (is_handoff(call.name) and seen == 1):
            out.append(
                Finding(
                    category=Category.LOOP,
                    detector="repeated_call",
                    severity=Severity.WARNING,
                    message=f"Rule: do not repeat a call whose result you already have. '{call.name}' with these "
                    f"exact arguments was already called {seen} time(s); use the earlier result or change approach.",
                    evidence={"times": seen},
                    tool_call_id=call.call_id,
                    tool_name=call.name,
                )
            )
        elif (index.consecutive_errors >= max_errors and call.name == index.last_error_tool) or (
            call.key in index.failed_keys
        ):
            errors = max(index.consecutive_errors, 1)
            out.append(
                Finding(
                    category=Category.LOOP,
                    detector="repeated_errors",
                    severity=Severity.WARNING,
                    message=f"Rule: stop retrying a failing tool blindly. '{call.name}' failed "
                    + (
                        "before with exactly these arguments"
                        if call.key in index.failed_keys
                        else f"in the last {errors} calls in a row"
                    )
                    + "; read the error, fix the arguments from tool outputs or ask the user.",
                    evidence={"errors": index.consecutive_errors, "same_arguments": call.key in index.failed_keys},
                    tool_call_id=call.call_id,
                    tool_name=call.name,
                )
            )
    return out
