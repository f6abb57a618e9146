"""What counts as the user's explicit go-ahead for an action: one test for the detectors and the agents."""

from __future__ import annotations

import re

# An explicit go-ahead: a yes, or words that say "do it" about the stated action. Not "sure" or "ok", which
# answer questions as often as they confirm.
_YES = re.compile(
    r"\b(yes|yeah|yep|yup|i confirm|confirmed|confirming|oui|sí|go ahead|please proceed|proceed with|"
    r"let'?s proceed|ready to proceed|please do|do it|i agree|agreed|approved?)\b",
    re.IGNORECASE,
)
_NO = re.compile(
    r"^\s*(no|nope|nah|wait|hold on|stop|not yet|don'?t|do not|cancel that)\b"
    r"|(n't|\bnot|\bnever)\s+(\w+\s+){0,2}(proceed|go ahead|confirm|approve|agree|do (it|that|this|anything))|\bnot yet\b"
    r"|\bbefore (confirming|finaliz\w*|(we|you|i) proceed|proceeding|going ahead)\b",
    re.IGNORECASE,
)


def says_yes(text: str) -> bool:
    """The user's message gives an explicit go-ahead and does not take it back."""
    return bool(_YES.search(text)) and not _NO.search(text)
