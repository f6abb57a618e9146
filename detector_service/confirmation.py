"""What counts as the user's explicit go-ahead for an action: one test for the detectors and the agents."""

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
_NO = re.compile(
    r"^\s*(not yet|don'?t|do not|cancel that)\b"
    r"|(n't|\bnot|\bnever)\s+(\w+\s+){0,2}(proceed|go ahead|confirm|approve|agree|do (it|that|this|anything))|\bnot yet\b"
    r"|\bbefore (confirming|finaliz\w*|(we|you|i) proceed|proceeding|going ahead)\b",
    re.IGNORECASE,
)


def says_yes(text: str) -> bool:
    """The user's message gives an explicit go-ahead and does not take it back."""
    if not _YES.search(text) or _NO.search(text):
        return False
    if _LEADING_NO.match(text):
        later = _SENTENCE.split(text, maxsplit=1)[1:]
        return bool(later) and bool(_YES.search(later[0]))
    return True
