"""Injected context quoted back in a reply: found and cut out, also while the reply streams.

Small models sometimes end an answer by quoting the context the proxy injected (``## Verifier: ... [/FAMA
context]``) or the feedback of a retry. What such a reply quotes (:class:`Quoted` knows it for one turn):

- the markers: ``[FAMA context ...`` opens a quote, ``[/FAMA context]`` closes it; ``[FAMA feedback]`` opens one;
- a section heading the injection writes (``## Verifier: ...``, ``## Correction from the previous turn``) opens one;
- a line of the injected or feedback text, repeated whole (at least :data:`MIN_LINE` characters).

An open quote runs to its closing marker or to the first line of prose after it: the bullet and blank lines that
follow an opening are part of it. :class:`QuoteFilter` cuts quotes from text as it streams, holding back only what
may still turn out to be one (a line while it reads like a quoted one, a ``[`` that may begin a marker);
:func:`strip_quotes` is the same cut on a whole text, so both give the same answer.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from detector_service.contract.profile import AgentName
from proxy.supervision.decisions import FEEDBACK_PREFIX
from proxy.supervision.injection import CLOSING, GUIDANCE_TITLE, MARKER

MIN_LINE = 16  # shorter lines ("Yes.", "- none") say too little to call a repeat a quote
OPENERS = (MARKER, FEEDBACK_PREFIX)
MARKERS = (*OPENERS, CLOSING)
_TITLES = (GUIDANCE_TITLE, *(f"{a.value}:" for a in AgentName))
_BULLETS = "-*•"


def _bare(line: str) -> str:
    """A line without its indentation and bullet: how a quoted line compares with the original."""
    return " ".join(line.strip().lstrip(_BULLETS).split())


@dataclass(frozen=True)
class Quoted:
    """What a reply of one turn could quote: the lines of the text the proxy added to its conversation."""

    lines: frozenset[str] = frozenset()

    @classmethod
    def of(cls, texts: Iterable[str | None]) -> Quoted:
        lines = {_bare(line) for text in texts if text for line in text.splitlines()}
        return cls(frozenset(line for line in lines if len(line) >= MIN_LINE))

    def heading(self, line: str) -> bool:
        text = line.strip()
        return text.startswith("#") and text.lstrip("#").strip().startswith(_TITLES)

    def repeated(self, line: str) -> bool:
        return _bare(line) in self.lines

    def may_repeat(self, partial: str) -> bool:
        """``partial`` (the start of a line) could still become a line of :attr:`lines` or a heading."""
        text = partial.strip()
        if not text or text.startswith("#"):
            return True
        bare = _bare(partial)
        return any(line.startswith(bare) for line in self.lines)


def _marker_at(text: str, start: int = 0) -> tuple[int, str] | None:
    """The first whole marker in ``text`` from ``start``: (position, marker)."""
    found = [(i, m) for m in MARKERS if (i := text.find(m, start)) >= 0]
    return min(found) if found else None


def _may_open_marker(tail: str) -> bool:
    return any(m.startswith(tail) for m in MARKERS)


class QuoteFilter:
    """Cuts quotes from a reply fed piece by piece; :meth:`feed` returns what may be sent now, :meth:`end` the
    rest. ``removed`` tells whether anything was cut."""

    def __init__(self, quoted: Quoted) -> None:
        self.quoted = quoted
        self.open = False  # inside a quote
        self.removed = False
        self._line = ""  # the line being read, raw
        self._sent = 0  # characters of its kept text already returned
        self._prose = False  # the line is known not to be a quoted one from its start
        self._blank = ""  # whitespace kept back: it goes out with the next text, or not at all if a quote ends it

    def _out(self, text: str) -> str:
        text = self._blank + text
        kept = text.rstrip()
        self._blank = text[len(kept) :]
        return kept

    def feed(self, text: str) -> str:
        out: list[str] = []
        while (newline := text.find("\n")) >= 0:
            self._line += text[:newline]
            text = text[newline + 1 :]
            kept = self._cut(self._line, whole=True)
            if kept is not None:
                kept += "\n"
            out.append((kept or "")[self._sent :])
            self._line, self._sent, self._prose = "", 0, False
        self._line += text
        if self._line:
            safe = self._cut(self._line, whole=False) or ""
            out.append(safe[self._sent :])
            self._sent = max(self._sent, len(safe))
        return self._out("".join(out))

    def end(self) -> str:
        kept = (self._cut(self._line, whole=True) or "") if self._line else ""
        rest = self._blank + kept[self._sent :]
        self._line, self._sent, self._prose, self._blank = "", 0, False, ""
        return rest.rstrip() if self.removed else rest

    def _cut(self, line: str, whole: bool) -> str | None:
        """What of ``line`` is kept (None: the whole line is dropped, newline included). A partial line
        (``whole=False``) gives only what is kept whatever comes next, and leaves the state as it was."""
        is_open = self.open and not self._prose
        if not self._prose:
            undecided = not whole and (
                self.quoted.may_repeat(line) or (is_open and line.strip()[:1] in ("", *_BULLETS))
            )
            if undecided:
                return ""
            quoted_line = self.quoted.heading(line) or self.quoted.repeated(line)
            bullet_in_quote = is_open and line.strip()[:1] in ("", *_BULLETS)
            if quoted_line or bullet_in_quote:
                if whole:
                    self.open = is_open or self.quoted.heading(line)
                    self.removed = True
                return None
            if not whole:
                self._prose = True
            is_open = False  # a line of prose ends a quote
        out: list[str] = []
        pos = 0
        while True:
            found = _marker_at(line, pos)
            if is_open:
                close = line.find(CLOSING, pos)
                if close < 0:
                    break  # the rest of the line is quoted
                pos, is_open = close + len(CLOSING), False
                continue
            if found is None:
                tail = line[pos:]
                if not whole and (bracket := tail.rfind("[")) >= 0 and _may_open_marker(tail[bracket:]):
                    tail = tail[:bracket]
                out.append(tail)
                break
            at, marker = found
            out.append(line[pos:at])
            pos = at + len(marker)
            is_open = marker != CLOSING
        if whole:
            kept = "".join(out)
            if kept != line:
                self.removed = True
            self.open = is_open
            if not kept.strip() and kept != line:
                return None
            return kept
        return "".join(out)


def strip_quotes(text: str, quoted: Quoted) -> tuple[str, bool]:
    """``text`` without the context it quotes, and whether it quoted any."""
    cut = QuoteFilter(quoted)
    return cut.feed(text) + cut.end(), cut.removed
