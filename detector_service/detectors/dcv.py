"""DCV, domain constraint violation: write calls without explicit confirmation, too many calls per turn.

Confirmation means: the assistant stated the action to the user (its last message before the latest
user message names the action or one of the call's argument values) and the latest user message gives an
explicit go-ahead ("yes", "go ahead", "please proceed") without taking it back ("not yet", "before
confirming"), or takes up the action the assistant offered ("Thanks, that would help" to "Would you like me to
enable it?", :func:`detector_service.confirmation.accepts`). A go-ahead one exchange earlier still stands when
the assistant only asked for a detail in between ("yes" -> "which reason?" -> "change of plans"). The generic check covers every write tool when the request's policy (system
message) asks for explicit confirmation, or when there is no policy at all (``confirm_all_writes:
auto``, the default; ``true``/``false`` force it). A profile can instead name the tools with
``requires_confirmation`` rules and set ``confirm_all_writes: false``.
"""

from __future__ import annotations

import re

from detector_service.confirmation import accepts, holds_back, says_yes
from detector_service.contract.profile import OneToolCallPerTurn, RequiresConfirmation, ToolKind
from detector_service.contract.toolkinds import is_handoff
from detector_service.contract.wire import Category, Finding, Severity
from detector_service.policytext import demands_confirmation, one_call_rule
from detector_service.turn import (
    Call,
    TurnView,
    is_amount_key,
    is_id_key,
    is_id_value,
    leaves,
    norm,
    output_digest,
    text_values,
)

_VERB = re.compile(r"^[a-z]+", re.IGNORECASE)
# Payment instruments are named to users by type ("your gift card"), not by their internal id.
_PAYMENT = re.compile(r"payment|method|card|instrument", re.IGNORECASE)
# The kind of an id: what comes before its number ("gift_card" of "gift_card_7480005").
_ID_KIND = re.compile(r"^([A-Za-z][A-Za-z_\-]*?)[_\-]?\d+$")
_WORDS = re.compile(r"[\s_\-]+")
_ASKS = re.compile(r"\b(confirm|proceed|shall i|should i|would you like|do you want|go ahead)\b", re.IGNORECASE)


def _stated(call: Call, stated: str) -> bool:
    """The assistant's previous message asked for the go-ahead, or named the action or a salient argument."""
    if not stated.strip():
        return False
    if _ASKS.search(stated):
        return True
    words = text_values(stated)
    verb = _VERB.match(call.name)
    if verb and len(verb.group(0)) > 2 and any(w.startswith(verb.group(0).lower()[:5]) for w in words):
        return True
    for key, value in leaves(call.args or {}):
        if (is_id_key(key) or is_id_value(value) or is_amount_key(key)) and norm(value) in words:
            return True
    return False


def _needs_confirmation(view: TurnView, call: Call) -> bool:
    settings = view.profile.detector_settings("dcv")
    named = {r.tool for r in view.profile.rules if isinstance(r, RequiresConfirmation)}
    if call.name in named:
        return False  # the rules detector reports these, with the rule's own wording
    if call.kind is not ToolKind.WRITE:
        return False
    mode = settings.get("confirm_all_writes", "auto")
    if mode == "auto" and view.index.system_text.strip():
        # With a policy in the request, follow it: only policies that ask for a yes before writes get the check.
        return demands_confirmation(view.index.system_text)
    return mode is not False


# The assistant asks the user for a detail ("Which card should I charge?", "Please provide the date."), and
# whether it asks for the go-ahead again (then the user's earlier yes no longer stands).
_ASKS_DETAIL = re.compile(r"\?|\b(please|could you|can you|let me know|tell me|provide|specify)\b", re.IGNORECASE)
_ASKS_AGAIN = re.compile(r"\b(confirm|proceed|go ahead)\b|\bis (that|this|it) (correct|right|ok|okay)\b", re.I)
_QUESTION = re.compile(r"[^.!?\n]*\?")


def _carried(view: TurnView, call: Call) -> bool:
    """The go-ahead came one exchange earlier and the assistant then only asked for a detail of the action:
    "yes" -> "which payment method?" -> "the card on file" -> the write. The earlier message said yes to the
    stated action, no write was made since, the assistant's question in between asked for a detail and not
    for the go-ahead again, and the answer holds nothing back (no refusal, condition or question)."""
    index = view.index
    earlier, earlier_asked, at = index.earlier_user
    if at < 0 or not accepts(earlier, earlier_asked) or not _stated(call, earlier_asked):
        return False
    between = index.stated_before_user
    if not _ASKS_DETAIL.search(between) or any(_ASKS_AGAIN.search(q) for q in _QUESTION.findall(between)):
        return False
    for made in reversed(index.calls):
        if made.index <= at:
            break
        if made.kind is ToolKind.WRITE:
            return False
    return says_yes(index.latest_user_text) or not holds_back(index.latest_user_text)


def _read_after_yes(view: TurnView, call: Call) -> str | None:
    """An id of the write whose record the agent first read after the user's latest message, where that message
    gave its go-ahead unasked (the agent had asked for details, not for a yes): the user said yes before anyone
    had seen what the record holds (the terms of the change), and nothing was told since. A yes to the agent's
    own question ("Shall I change the name to ...?") stands: the agent stated the change it then made."""
    index = view.index
    if any(_ASKS.search(q) for q in _QUESTION.findall(index.stated_before_user)):
        return None
    wanted = {norm(v) for k, v in leaves(call.args or {}) if is_id_key(k) and is_id_value(v)}
    before: set[str] = set()
    after: set[str] = set()
    for made in index.calls:
        if made.kind is not ToolKind.READ or made.error or made.result is None:
            continue
        seen = output_digest(made.result)[0] | {norm(v) for _, v in leaves(made.args or {})}
        (after if made.index > index.latest_user_index else before).update(seen & wanted)
    return next(iter(sorted(after - before)), None)


def unconfirmed(view: TurnView, call: Call, detector: str) -> Finding | None:
    index = view.index
    if index.user_count == 0:
        return None
    # A confirmation covers the writes that follow it until the assistant talks to the user again.
    yes = accepts(index.latest_user_text, index.stated_before_user)
    stated = _stated(call, index.stated_before_user)
    unseen = _read_after_yes(view, call) if yes and stated else None
    if yes and stated and unseen is None:
        return None
    if not yes and _carried(view, call):
        return None
    if not yes:
        reason = f"the latest user message does not confirm it (it says: {index.latest_user_text[:160]!r})"
    elif unseen is not None:
        reason = f"the user said yes before {unseen!r} was even looked up: what it holds was never listed to them"
    else:
        reason = "the action and its details were not listed to the user before they said yes"
    return Finding(
        category=Category.DCV,
        detector=detector,
        severity=Severity.ERROR,
        message=(
            f"Rule: list the details of a database-changing action and get explicit user confirmation (yes) first. "
            f"'{call.name}' changes data, but {reason}. Describe the exact action to the user and ask them to "
            "confirm before calling it."
        ),
        evidence={"latest_user": index.latest_user_text[:300], "stated": bool(stated)},
        tool_call_id=call.call_id,
        tool_name=call.name,
    )


def _existing_values(view: TurnView, call: Call) -> set[str]:
    """Values the entity being changed already holds (unchanged parts need no listing)."""
    out: set[str] = set()
    for key, value in (call.args or {}).items():
        if isinstance(value, str | int) and not isinstance(value, bool) and is_id_key(key):
            for obj in view.index.entities.get((key, norm(value)), ()):
                out.update(norm(v) for _, v in leaves(obj))
    return out


def _id_kind(value: str) -> str | None:
    m = _ID_KIND.match(value)
    return m.group(1).lower() if m else None


def _unidentified_instrument(view: TurnView, value: object, confirmed: set[str]) -> bool:
    """A payment instrument the user holds others of, that nobody named: neither the user nor the agent said
    its kind ("gift card", "credit card", its brand) or anything that tells it from the others (its id, last
    digits, balance). The agent picked which one to charge, a detail of the action the user never saw. Where
    the kind was said ("use a gift card") the user left the choice among that kind to the agent."""
    if not is_id_value(value):
        return False
    chosen = norm(value)
    kind = _id_kind(chosen)
    if kind is None:
        return False
    entities = view.index.entities
    own = [obj for (_, v), objs in entities.items() if v == chosen for obj in objs]
    peers = [obj for (_, v), objs in entities.items() if v != chosen and _id_kind(v) == kind for obj in objs]
    if not own or not peers:
        return False
    shared = {norm(v) for obj in peers for _, v in leaves(obj)}
    marks = {chosen, chosen.rsplit("_", 1)[-1]} | {
        norm(v) for obj in own for _, v in leaves(obj) if not isinstance(v, bool) and norm(v) not in shared
    }
    if marks & confirmed:
        return False
    kinds = {kind} | {norm(v) for obj in own for _, v in leaves(obj) if isinstance(v, str) and not is_id_value(v)}
    return not any(all(w in confirmed or f"{w}s" in confirmed for w in _WORDS.split(k) if w) for k in kinds)


def _figure(result: str | None) -> float | None:
    """The number a computation returned ("-2580.0"), sign aside; None for anything else or nothing (zero)."""
    try:
        value = abs(float((result or "").strip().replace(",", "").lstrip("$")))
    except ValueError:
        return None
    return value if 0 < value < float("inf") else None


def _untold_figures(view: TurnView) -> list[str]:
    """Figures the agent computed since the latest write (a number a generic tool such as a calculator returned:
    a price difference, a fee, a refund) that nobody said in the conversation since: the user's yes did not
    cover what the action costs or returns."""
    index = view.index
    heard = index.told_since_write | index.user_values
    out = []
    for made in reversed(index.calls):
        if made.kind is ToolKind.WRITE and made.result is not None and not made.error:
            break
        value = _figure(made.result) if made.kind is ToolKind.GENERIC and not is_handoff(made.name) else None
        if value is not None and norm(value) not in heard and norm(round(value, 2)) not in heard:
            out.append(f"{made.name} returned {made.result.strip() if made.result else ''}")
    return out


def unlisted(view: TurnView, call: Call) -> Finding | None:
    """Write details the user did not see before saying yes: an id that the assistant did not tell the user
    since the latest write (the listing the confirmation covers) nor in the message the user answered, and
    that the user never said; or an amount never told to the user at all. Values the entity already holds
    need no listing. A payment instrument needs naming where the user holds others of it and nobody said which
    (``_unidentified_instrument``); "the original payment" in the yes or the message it answers names the one
    the changed record holds. A figure the agent computed for the action and never told (``_untold_figures``)
    is a detail the user did not see either."""
    index = view.index
    existing = _existing_values(view, call)
    confirmed = index.told_since_write | text_values(index.stated_before_user) | index.user_values
    named = index.told_values | index.user_values
    answered = text_values(index.latest_user_text) | text_values(index.stated_before_user)
    hidden = [
        f"{key}={value!r}"
        for key, value in leaves(call.args or {})
        if _PAYMENT.search(key)
        and not (norm(value) in existing and "original" in answered)
        and _unidentified_instrument(view, value, named)
    ] + [
        f"{key}={value!r}"
        for key, value in leaves(call.args or {})
        if not _PAYMENT.search(key)
        and norm(value) not in existing
        and (
            (is_id_value(value) and norm(value) not in confirmed)
            or (
                is_amount_key(key)
                and isinstance(value, int | float)
                and norm(value) not in index.told_values
                and norm(value) not in index.user_values
            )
        )
    ]
    figures = _untold_figures(view)
    if not hidden and not figures:
        return None
    problems = [f"uses {', '.join(hidden)}, which the user was not shown before saying yes"] if hidden else []
    if figures:
        problems.append(f"follows a figure computed for it that the user was never told ({'; '.join(figures)})")
    return Finding(
        category=Category.DCV,
        detector="details_not_listed",
        severity=Severity.ERROR,
        message=(
            f"Rule: list the action details to the user before a database-changing action. '{call.name}' "
            f"{' and '.join(problems)}. List these details{' (what it costs or refunds included)' if figures else ''} "
            "and get a yes first."
        ),
        evidence={"values": hidden, "figures": figures},
        tool_call_id=call.call_id,
        tool_name=call.name,
    )


def detect(view: TurnView) -> list[Finding]:
    out: list[Finding] = []
    for call in view.calls:
        if _needs_confirmation(view, call):
            found = unconfirmed(view, call, "write_without_confirmation") or unlisted(view, call)
            if found is not None:
                out.append(found)
    out.extend(_one_call_per_turn(view))
    return out


def _one_call_per_turn(view: TurnView) -> list[Finding]:
    rule = next((r for r in view.profile.rules if isinstance(r, OneToolCallPerTurn)), None)
    if rule is None and view.profile.detector_settings("dcv").get("one_call_per_turn", "auto") == "auto":
        # Without a profile rule, follow the request's policy: "one tool call at a time" there is the rule.
        rule = one_call_rule(view.index.system_text) if view.index.system_text.strip() else None
    if rule is None or not view.calls:
        return []
    if len(view.calls) > 1:
        names = ", ".join(c.name for c in view.calls)
        write = next((c for c in view.calls if c.kind is ToolKind.WRITE), None)
        if write is not None and any(c.kind is not ToolKind.WRITE for c in view.calls):
            # The write goes out before the look-ups (or hand-off) beside it return: it cannot have used their
            # results. A batch of writes only (each stated and confirmed) stays a matter of style.
            return [
                Finding(
                    category=Category.DCV,
                    detector="write_in_batch",
                    severity=Severity.ERROR,
                    message=f"Rule: make one tool call at a time. This turn makes {len(view.calls)} calls ({names}), "
                    f"among them '{write.name}', which changes data before the results of the other calls are seen; "
                    "make the look-ups first, check their results, then make the write on its own.",
                    evidence={"calls": len(view.calls)},
                    tool_call_id=write.call_id,
                    tool_name=write.name,
                )
            ]
        return [
            Finding(
                category=Category.DCV,
                detector="one_tool_call_per_turn",
                severity=Severity.ERROR,
                message=f"Rule: make one tool call at a time. This turn makes {len(view.calls)} calls ({names}); "
                "make the first call, wait for its result, then decide the next.",
                evidence={"calls": len(view.calls)},
            )
        ]
    if rule.no_text_with_tool_call and view.text.strip():
        return [
            Finding(
                category=Category.DCV,
                detector="one_tool_call_per_turn",
                severity=Severity.WARNING,
                message=f"Rule: do not talk to the user and call a tool in the same turn. This turn calls "
                f"'{view.calls[0].name}' and also says {view.text[:120]!r}; either call the tool or answer the user.",
                evidence={"text": view.text[:300]},
            )
        ]
    return []
