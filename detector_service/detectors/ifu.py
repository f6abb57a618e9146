"""IFU, incomplete fulfilment: giving up or handing off before trying, or claiming work never done.

- early hand-off: a hand-off tool (transfer to a human) called before any tool was tried for the user's
  request, unless the user asked for a human. A refusal in words is not flagged: on recorded runs it is
  mostly the policy's own "no" (a basic-economy refund, an unsupported change), said correctly;
- deferred request: the assistant sends the user away to come back later with an identifier or other
  information ("once you have your reservation id, reach out") after next to no look-ups and no action:
  the request stays open. Asking the user to do something and report back ("once you have restarted the
  phone, let me know") is ordinary troubleshooting, not a deferral; nor is asking for an id the read tools
  cannot find without it (the airline tools look users up by user id only: that id is the user's to give);
- empty reply: no text and no tool call at all (small models do this, and the conversation stalls);
- unfulfilled claim: the assistant tells the user an action is done while no write call in the
  conversation succeeded, so the request is still open (not where calls leaked into the text of a native
  conversation: a client may have run them out of sight; a ReAct harness's text actions are read as calls
  before the detectors run, :mod:`detector_service.contract.textactions`). Only actions one of the agent's own write tools
  performs count ("cancelled" with a cancel tool); a state the user or a third party changed ("your
  settings have been updated" in a conversation where the user works the device) is no claim of the agent's.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from detector_service.contract.profile import ToolKind
from detector_service.contract.toolkinds import is_handoff
from detector_service.contract.wire import Category, Finding, Severity
from detector_service.detectors import function_of, schema_of
from detector_service.turn import TurnView

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
# Phrases about getting hold of something: what follows them is what the user is sent away for.
_POSSESSION = re.compile(r"^(once you (have|find|locate|get)|when you (have|find)|if you (can )?(find|locate))$", re.I)
# Phrases that only wait ("take your time", "whenever you're ready") defer when the user is to go and look
# for the information, not when the agent simply asks for it ("your phone number, please. Take your time").
_WAITING = re.compile(r"^(take your time|whenever you('re| are) ready|once you are able)$", re.IGNORECASE)
_FIND = re.compile(
    r"\b(find|finding|found|locate|locating|look(ing)? for|retriev\w*|search(ing)? for|dig up|track down|"
    r"when you have|once you have|check(ing)? your (email|inbox|records|account|bill|documents|confirmation)\w*)\b",
    re.IGNORECASE,
)
_PRONOUN = re.compile(r"^\s*(it|them|this|that|those)\b", re.IGNORECASE)
_CLAUSE_END = re.compile(r"[,;:]|\b(and then|then|let me|please)\b", re.IGNORECASE)
# What the user is sent away to find: an identifier or a piece of information the tools could look up.
_INFO = re.compile(
    r"\b(ids?|numbers?|codes?|(reservation|booking|order|account|customer|user) (details|information|info))\b",
    re.IGNORECASE,
)
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+|\n+")
# The kind of record an identifier belongs to: "reservation" of "the reservation IDs", "user" of "your user id".
_KIND_OF_ID = re.compile(
    r"\b([a-z]+)[\s_\-]+(?:ids?|numbers?|codes?)\b|\b(reservation|booking|order|account|customer|user)\s+(?:details|info)",
    re.IGNORECASE,
)
_NOT_A_KIND = frozenset(
    {"the", "your", "my", "a", "an", "this", "that", "these", "those", "its", "their", "our", "any"}
)
_WORD_SPLIT = re.compile(r"[^a-z0-9]+")
_DONE = re.compile(
    r"\b(has|have) been (successfully )?(cancel+ed|booked|updated|modified|changed|processed|refunded|"
    r"issued|added|exchanged|returned|upgraded|rebooked|sent)\b|\bsuccessfully (cancel+ed|booked|updated|"
    r"modified|changed|processed|refunded|issued|added|exchanged|returned|upgraded)\b",
    re.IGNORECASE,
)
# The write-tool verb stems each claimed outcome stands for; outcomes mapped to None fit any write tool.
_CLAIM_STEMS: dict[str, tuple[str, ...] | None] = {
    "cancel": ("cancel",),
    "booked": ("book", "reserve", "create"),
    "rebooked": ("book", "updat", "modif", "chang"),
    "updated": ("updat", "modif", "chang", "edit", "set"),
    "modified": ("updat", "modif", "chang", "edit"),
    "changed": ("updat", "modif", "chang", "edit", "set"),
    "upgraded": ("updat", "modif", "chang", "upgrad"),
    "added": ("add", "updat", "modif", "creat"),
    "exchanged": ("exchang",),
    "returned": ("return",),
    "sent": ("send",),
    "issued": ("issue", "send"),
    "refunded": None,
    "processed": None,
}


def _sent_for_info(sentences: list[str], i: int, phrase: re.Match[str]) -> str | None:
    """What the deferral at ``phrase`` in sentence ``i`` sends the user off to find (the words naming the
    identifier), or None when it sends the user for no identifier.

    After "once you have" / "when you find" what follows is what the user must get: "once you have the
    reservation id" or "once you have it" (the id named just before) is a deferral, "once you have restarted
    the phone, let me know the number of bars" is a request to act and report back. "Reach out again when"
    defers when the sentence or the one before names the information; "take your time" only when one of them
    also sends the user to look for it ("take your time to find the reservation id").
    """
    sentence = sentences[i]
    around = sentences[max(0, i - 1) : i + 1]
    if _WAITING.match(phrase.group(0)):
        return next((s for s in around if _INFO.search(s) and _FIND.search(s)), None)
    if not _POSSESSION.match(phrase.group(0)):
        return next((s for s in around if _INFO.search(s)), None)
    rest = sentence[phrase.end() :]
    if _PRONOUN.match(rest):
        # the nearest words that name it: earlier in the sentence, else the sentence before
        return next((s for s in [sentence[: phrase.start()], *sentences[max(0, i - 1) : i]] if _INFO.search(s)), None)
    clause = " ".join(_CLAUSE_END.split(rest, maxsplit=1)[0].split()[:8])
    return clause if _INFO.search(clause) else None


def _findable(view: TurnView, named: str) -> bool:
    """Whether the read tools could find what ``named`` sends the user for. Not when the tools know that kind of
    identifier (a tool takes or speaks of it) but no read tool finds it without it: a user id that the airline
    tools look users up by, and by nothing else, is the user's to give, and asking the user to come back with it
    puts nothing off that the agent could do. A read tool that speaks of the kind without needing its id finds
    it ("Get the details of a user, including their reservations"; "Find user id by email"). An identifier of
    no kind ("the ID") or of a kind the tools never speak of ("confirmation number") is taken as findable."""
    kinds = {(m.group(1) or m.group(2)).lower() for m in _KIND_OF_ID.finditer(named)} - _NOT_A_KIND
    for kind in kinds:
        stem = kind[:-1] if kind.endswith("s") and len(kind) > 4 else kind
        known = any(_speaks_of(name, spec, stem, parameters=True) for name, spec in view.tools.items())
        if known and not any(_finds(view, name, spec, stem) for name, spec in view.tools.items()):
            return False
    return True


def _speaks_of(name: str, spec: Mapping[str, Any], stem: str, *, parameters: bool) -> bool:
    """The tool's name or description (and with ``parameters``, its parameters' names) speaks of the kind."""
    params = schema_of(spec) or {}
    names = " ".join(str(p) for p in params.get("properties") or {}) if parameters else ""
    text = f"{name} {function_of(spec).get('description') or ''} {names}".lower()
    return any(w.startswith(stem) for w in _WORD_SPLIT.split(text))


def _finds(view: TurnView, name: str, spec: Mapping[str, Any], stem: str) -> bool:
    """A read tool that speaks of the kind and does not need its identifier (or any bare id) to answer."""
    if view.index.kinds.kind(name) is not ToolKind.READ:
        return False
    params = schema_of(spec) or {}
    required = [r.lower() for r in params.get("required") or [] if isinstance(r, str)]
    if any(r in ("id", "ids") or stem in _WORD_SPLIT.split(r) for r in required):
        return False
    return _speaks_of(name, spec, stem, parameters=False)


def _deferral(view: TurnView) -> str | None:
    """The deferring phrase, when it sends the user off to find information the tools could look up."""
    sentences = [s for s in _SENTENCE_END.split(view.text) if s.strip()]
    for i, sentence in enumerate(sentences):
        for found in _DEFER.finditer(sentence):
            named = _sent_for_info(sentences, i, found)
            if named is not None and _findable(view, named):
                return found.group(0)
    return None


def _claim(view: TurnView) -> str | None:
    """A claimed outcome that one of the agent's write tools would have produced, or None."""
    writes = [name.lower() for name in view.tools if view.index.kinds.kind(name) is ToolKind.WRITE]
    for found in _DONE.finditer(view.text):
        word = (found.group(3) or found.group(4) or "").lower()
        stems = _CLAIM_STEMS.get("cancel" if word.startswith("cancel") else word)
        if not view.tools or (stems is None and writes) or (stems and any(w.startswith(stems) for w in writes)):
            return found.group(0)
    return None


# Policies that allow a hand-off for what the agent cannot do ("transfer ... if and only if the request cannot
# be handled within the scope of your actions"), and a hand-off that says why the request is outside that scope.
_POLICY_ALLOWS = re.compile(r"transfer\w*\b[^.\n]{0,80}\b(if|when|cannot|can ?not|unable|outside|beyond)", re.I)
_OUT_OF_SCOPE = re.compile(
    r"\b(not (allowed|permitted|eligible|possible|supported|able)|cannot|can ?not|unable|outside|beyond|"
    r"per (the )?policy|policy (does not|doesn'?t|prohibits|forbids))\b",
    re.IGNORECASE,
)


def _allowed_handoff(view: TurnView, args: dict[str, object]) -> bool:
    """The policy allows a hand-off for requests outside the agent's scope, and this one says why it is."""
    if not _POLICY_ALLOWS.search(view.index.system_text):
        return False
    reason = " ".join(str(v) for v in args.values() if isinstance(v, str))
    return bool(_OUT_OF_SCOPE.search(reason))


def detect(view: TurnView) -> list[Finding]:
    index = view.index
    out: list[Finding] = []
    handoff = next((c for c in view.calls if is_handoff(c.name)), None)
    # Look-ups in the same batch as the hand-off are tries too: the agent read the request, then handed off.
    tried = index.reads + index.writes + sum(1 for c in view.calls if c.kind is not ToolKind.GENERIC)
    asked_for_human = bool(_ASKED_HUMAN.search(index.latest_user_text))
    if (
        handoff is not None
        and tried == 0
        and index.user_count > 0
        and not asked_for_human
        and not _allowed_handoff(view, handoff.args or {})
    ):
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
    phrase = _deferral(view) if not view.calls and index.writes == 0 and index.reads <= max_reads else None
    if phrase is not None:
        out.append(
            Finding(
                category=Category.IFU,
                detector="deferred_request",
                severity=Severity.WARNING,
                message=f"Rule: finish the user's request in this conversation when the tools allow it. This message "
                f"puts it off ({phrase!r}) after {index.reads} look-up(s) and no action; "
                "look the missing details up with the read tools (for example from the user's profile) instead "
                "of asking the user to come back.",
                evidence={"reads": index.reads},
            )
        )
    if not view.calls and not view.text.strip() and index.user_count > 0:
        out.append(
            Finding(
                category=Category.IFU,
                detector="empty_reply",
                severity=Severity.ERROR,
                message="Rule: every turn either answers the user or calls a tool. This reply is empty: nothing "
                "reaches the user and nothing is done. Continue with the user's request: call the next tool, "
                "or tell the user what you found or need.",
                evidence={},
            )
        )
    # The absence of a write is evidence only where the agent's calls are visible: a harness that writes its
    # calls as text (ReAct style) shows none, and its claims cannot be checked.
    claim = _claim(view) if not view.calls and index.writes == 0 and not index.text_calls else None
    if claim is not None:
        out.append(
            Finding(
                category=Category.IFU,
                detector="claimed_without_action",
                severity=Severity.ERROR,
                message=f"Rule: only report actions that a tool actually performed. This message says "
                f"{claim!r}, but no tool call has changed anything in this conversation; "
                "the request is still open. Call the tool (after confirmation) or tell the user it is not done.",
                evidence={"claim": claim},
            )
        )
    return out
