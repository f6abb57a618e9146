"""What counts as the user's explicit go-ahead for an action: one test for the detectors and the agents.

Two readings, both of what the user's words commit to:

- ``says_yes``: the message gives a go-ahead on its own ("yes", "go ahead", "please proceed"), whatever it
  answers;
- ``accepts``: the message agrees to what the assistant's message asked. Where the assistant offered to do
  something (a yes/no question about an action: "Would you like me to enable roaming?", "Shall I send the
  request?", or "I can enable roaming for you."), an answer that takes it up without a yes is a go-ahead too: "Thanks, that would help", "Sure",
  "I'd like to refuel 2 GB, please". An answer with a doubt, a condition or a question of its own is not, and
  neither is a pick among alternatives ("Which flight would you like?", "... this one or that one?"), which
  chooses a detail and agrees to nothing yet.
"""

from __future__ import annotations

import re

# An explicit go-ahead: a yes, or words that say "do it" about the stated action. Not "sure" or "ok", which
# answer questions as often as they confirm.
_YES = re.compile(
    r"\b(yes|yeah|yep|yup|i confirm|confirmed|confirming|oui|sí|go ahead|please proceed|proceed with|"
    r"let'?s proceed|ready to proceed|please do|do it|i agree|agreed|approved?|"
    # acceptances users of different models phrase without a "yes"
    r"sounds (good|great|fine|perfect|right)|(that|this|it) (works|is fine)|works for me|go for it|"
    r"let'?s (do|go with) (it|that|this)|that'?s (correct|right|fine|perfect)|absolutely|affirmative|"
    r"please (book|cancel|change|update|process|issue|submit|send|exchange|return|modify|make|place|apply)\w*)",
    re.IGNORECASE,
)
# A leading "no" answers the assistant's last question; it takes the go-ahead back only when no later
# sentence gives one ("No, that's okay. ... Please go ahead and issue it." confirms).
_LEADING_NO = re.compile(r"^\s*(no|nope|nah|wait|hold on|stop)\b", re.IGNORECASE)
_SENTENCE = re.compile(r"(?<=[.!?])\s+|\n+")
_POLITE = re.compile(r"\bplease\b", re.IGNORECASE)
_NO = re.compile(
    r"^\s*(not yet|don'?t|do not|cancel that)\b"
    r"|(n't|\bnot|\bnever)\s+(\w+\s+){0,2}(proceed|go ahead|confirm|approve|agree|do (it|that|this|anything))|\bnot yet\b"
    r"|\bbefore (confirming|finaliz\w*|(we|you|i) proceed|proceeding|going ahead)\b",
    re.IGNORECASE,
)
# A question whether to do something: the assistant offers an action and waits for the user's word on it.
_OFFER = re.compile(
    r"\b(would|do) you (like|want) (me )?to\b|\b(shall|should|may|can) i\b|\bwant me to\b|\blike me to\b|\bi (can|could)\b"
    r"|\b(would|will) (that|this|it) (help|work|be (ok|okay|alright|fine|helpful))\b"
    r"|\bis (that|this|it) (ok|okay|alright|fine)\b|\bready (for me )?to proceed\b",
    re.IGNORECASE,
)
# An offer made without a question mark: "Let me know if you'd like me to enable it."
_OPEN_OFFER = re.compile(r"\blet me know if\b|\bif you('d| would) like\b", re.IGNORECASE)
# Or as a statement of what the assistant can do for the user: "I can enable roaming for you."
_FOR_YOU = re.compile(r"\bfor you\b", re.IGNORECASE)
# Before the offer in its sentence, a question word makes it a question about a detail ("Which flight would you
# like to book?", "How much data would you like me to add?") or an open one ("Is there anything else I can
# do?"), not about whether to do a given action.
_DETAIL_QUESTION = re.compile(r"\b(which|what|how|when|where|who|anything|something)\b", re.IGNORECASE)
# An offer among alternatives ("... 1 GB or 2 GB?", "proceed with one of these options?") asks for a pick.
_CHOICE = re.compile(r"\bor\b|\b(one|any|either|some|each) of (these|those|them|the)\b|\boptions\b", re.I)
# Words that take an offer up: a wish for it or what it will do for the user, anywhere in the answer ("I'd like
# to refuel 2 GB, please", "Thanks, that would help"); a bare acknowledgement ("Sure", "Thank you!") only as
# the whole of a short answer, since in a longer one it often acknowledges something else ("OK, I restarted it").
_TAKE_UP = re.compile(
    r"\b((that|it|this) (would|will|should|could|might) (help|work|be (great|helpful|nice|good|perfect))|"
    r"that'?d be|would (help|be (great|helpful|nice|good|perfect))|"
    r"(i'?d|i would) (like|love|appreciate) (that|it|this)|let'?s do (that|it|this))\b",
    re.IGNORECASE,
)
# A wish of the user's own ("I'd like to refuel 2 GB"): a take-up only when it names what was offered, since
# "I want a refund" to "Shall I cancel it?" asks for something else.
_WISH = re.compile(r"\b(i'?d (like|love)|i would (like|love)|i want|i need|let'?s|please)\b", re.IGNORECASE)
_CONTENT_WORD = re.compile(r"[a-z]{4,}")
_PLAIN = frozenset({"would", "like", "want", "need", "please", "that", "this", "with", "your", "have", "into"})
_ACKNOWLEDGE = re.compile(
    r"\b(sure|ok(ay)?|alright|all right|please|thanks?|thank you|great|perfect|fine|good)\b", re.IGNORECASE
)
_SHORT = 8  # words
# Words that hold an answer back: a refusal, a doubt, a condition, a delay, another way, a wish to know more.
_HOLD = re.compile(
    r"\b(no|nope|not|never|rather|instead|hold off|later|wait|first|before|unless|if|but|however|maybe|perhaps|"
    r"think|consider|know|understand|explain|learn|hear|ask|talk|speak|what|how much)\b|n't\b|\?",
    re.IGNORECASE,
)


def _go_ahead(sentence: str) -> bool:
    """A sentence that says "do it": a question only when it asks for it politely ("Could you please go ahead?"),
    not when it asks whether it can be done ("Can we proceed without the IDs?")."""
    if not _YES.search(sentence):
        return False
    return not sentence.rstrip().endswith("?") or bool(_POLITE.search(sentence))


def says_yes(text: str) -> bool:
    """The user's message gives an explicit go-ahead and does not take it back."""
    if _NO.search(text):
        return False
    sentences = _SENTENCE.split(text)
    if _LEADING_NO.match(text):
        return any(_go_ahead(s) for s in sentences[1:])
    return any(_go_ahead(s) for s in sentences)


def offers(asked: str) -> list[str]:
    """The sentences of the assistant's message that offer an action as a yes/no question (not a pick of a
    detail, not a choice between alternatives)."""
    found = []
    for sentence in _SENTENCE.split(asked):
        offer = _OFFER.search(sentence)
        if offer is None:
            continue
        asks = sentence.rstrip().endswith("?") or _OPEN_OFFER.search(sentence)
        if not asks and not (offer.group(0).lower().startswith("i ") and _FOR_YOU.search(sentence)):
            continue
        if not _DETAIL_QUESTION.search(sentence[: offer.start()]) and not _CHOICE.search(sentence):
            found.append(sentence)
    return found


def _stems(text: str) -> set[str]:
    return {w[:5] for w in _CONTENT_WORD.findall(text.lower()) if w not in _PLAIN}


def agrees(text: str, offered: list[str]) -> bool:
    """The answer takes one of the ``offered`` actions up without holding anything back (no refusal, doubt,
    condition or question): it says the offer would help, wishes for what was offered, or is a bare
    acknowledgement."""
    if not offered or _HOLD.search(text):
        return False
    if _TAKE_UP.search(text) or (len(text.split()) <= _SHORT and _ACKNOWLEDGE.search(text)):
        return True
    return bool(_WISH.search(text)) and any(_stems(text) & _stems(sentence) for sentence in offered)


def holds_back(text: str) -> bool:
    """The message refuses, doubts, sets a condition, puts off or asks something: it agrees to nothing as is."""
    return bool(_HOLD.search(text) or _NO.search(text) or _LEADING_NO.match(text))


def accepts(reply: str, asked: str) -> bool:
    """The user's reply is a go-ahead for what the assistant's message ``asked``: an explicit yes, or, to an offer
    of an action, an answer that takes it up ("Thanks, that would help" to "Would you like me to enable it?")."""
    return says_yes(reply) or agrees(reply, offers(asked))
