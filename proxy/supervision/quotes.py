"""Injected context quoted back in a reply: found and cut out, also while the reply streams.

Small models sometimes end an answer by quoting the context the proxy injected (``## Verifier: ... [/FAMA
context]``) or the feedback of a retry. What such a reply quotes (:class:`Quoted` knows it for one turn):

- the markers: ``[FAMA context ...`` or ``[FAMA feedback]`` open a quote that runs to ``[/FAMA context]`` (or the
  end of the reply);
- a section heading the injection writes (``## Verifier: ...``, ``## Correction from the previous turn``), also in
  the middle of a line, opens a quote that runs to ``[/FAMA context]`` or to the first line of prose: the bullet
  and blank lines that follow it are part of it;
- a line of the injected or feedback text, repeated whole (at least :data:`MIN_LINE` characters; its bullet,
  heading marks or check box aside).

:class:`QuoteFilter` cuts quotes from text as it streams, holding back only what may still turn out to be one (a line
while it reads like a quoted one, a ``[`` or ``#`` that may begin a marker); :func:`strip_quotes` is the same cut on
a whole text, so both give the same answer.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

from detector_service.contract.profile import AgentName
from proxy.supervision.decisions import FEEDBACK_PREFIX
from proxy.supervision.injection import CLOSING, GUIDANCE_TITLE, MARKER

MIN_LINE = 16  # shorter lines ("Yes.", "- none") say too little to call a repeat a quote
_TITLES = (GUIDANCE_TITLE, *(f"{a.value}:" for a in AgentName))
OPENERS = (MARKER, FEEDBACK_PREFIX, *(f"## {title}" for title in _TITLES))  # a heading also opens mid-line
MARKERS = (*OPENERS, CLOSING)
_LONGEST = max(len(m) for m in MARKERS)
_MARK_START = re.compile(r"[\[#]")
_BULLETS = "-*•"
_LEAD = re.compile(r"[\s\-*•#>]*(?:\[[ xX]?\]\s*)?")  # indentation, bullet, heading marks, a check box
_BOX_BEGINNING = re.compile(r"\[[ xX]?")
Kind = Literal["marker", "heading"]  # what opened a quote: a marker runs to its closing, a heading to prose


def _bare(line: str) -> str:
    """A line without what leads it (:data:`_LEAD`): how a quoted line compares with the original."""
    lead = _LEAD.match(line)
    return " ".join(line[lead.end() if lead else 0 :].split())


def _bullet_or_blank(line: str) -> bool:
    return line.strip()[:1] in ("", *_BULLETS)


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
        lead = _LEAD.match(partial)
        rest = partial[lead.end() if lead else 0 :].strip()
        if not rest or _BOX_BEGINNING.fullmatch(rest):
            return True  # only what may lead a line so far
        bare = " ".join(rest.split())
        return any(line.startswith(bare) for line in self.lines)


def _marker_at(text: str, start: int = 0) -> tuple[int, str] | None:
    """The first whole marker in ``text`` from ``start``: (position, marker)."""
    found = [(i, m) for m in MARKERS if (i := text.find(m, start)) >= 0]
    return min(found) if found else None


def _marker_start(text: str, start: int) -> int:
    """The first place from ``start`` where the end of ``text`` may be the beginning of a marker (else its length)."""
    for match in _MARK_START.finditer(text, max(start, len(text) - _LONGEST)):
        if any(m.startswith(text[match.start() :]) for m in MARKERS):
            return match.start()
    return len(text)


class QuoteFilter:
    """Cuts quotes from a reply fed piece by piece; :meth:`feed` returns what may be sent now, :meth:`end` the
    rest. ``removed`` tells whether anything was cut. Each piece costs in proportion to its own length."""

    def __init__(self, quoted: Quoted) -> None:
        self.quoted = quoted
        self.open: Kind | None = None  # the quote open at the start of the line being read
        self.removed = False
        self._blank = ""  # whitespace kept back: it goes out with the next text, or not at all if a quote ends it
        self._new_line()

    def _new_line(self) -> None:
        self._line = ""  # the line being read, raw
        self._prose = False  # the line is known not to be a quoted one from its start, so it is scanned
        self._pos = 0  # how much of the line is scanned for markers for good
        self._inside: Kind | None = "marker" if self.open == "marker" else None  # the quote open at ``_pos``
        self._kept = ""  # what the scanned part keeps
        self._sent = 0  # how much of ``_kept`` was returned

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
            kept = self._finish()
            out.append("" if kept is None else (kept + "\n")[self._sent :])
            self._new_line()
        self._line += text
        if self._line and self._decided():
            self._scan(whole=False)
            out.append(self._kept[self._sent :])
            self._sent = len(self._kept)
        return self._out("".join(out))

    def end(self) -> str:
        kept = (self._finish() or "") if self._line else ""
        rest = self._blank + kept[self._sent :]
        self._blank = ""
        self.open = None
        self._new_line()
        return rest.rstrip() if self.removed else rest

    def _decided(self) -> bool:
        """The line read so far is to be scanned: prose (not a heading, a repeated line, or a bullet of a quote a
        heading opened), or a line inside a quote a marker opened."""
        if not self._prose:
            line = self._line
            if self.open != "marker" and (
                self.quoted.may_repeat(line) or (self.open == "heading" and _bullet_or_blank(line))
            ):
                return False
            self._prose = True  # a line of prose ends a quote a heading opened
        return True

    def _finish(self) -> str | None:
        """What the whole line keeps (None: it is dropped, newline included); the quote open after it."""
        line = self._line
        if not self._prose and self.open != "marker":
            heading = self.quoted.heading(line)
            if heading or self.quoted.repeated(line) or (self.open == "heading" and _bullet_or_blank(line)):
                self.open = "heading" if heading else self.open
                self.removed = True
                return None
        self._prose = True
        self._scan(whole=True)
        self.open = self._inside
        if self._kept != line:
            self.removed = True
            if not self._kept.strip():
                return None
        return self._kept

    def _scan(self, whole: bool) -> None:
        """Scan the line from ``_pos`` for markers; a partial line only up to where a marker may be beginning."""
        line, pos, inside, kept = self._line, self._pos, self._inside, [self._kept]
        while True:
            if inside is not None:
                close = line.find(CLOSING, pos)
                if close < 0:  # the rest is quoted, but for where the closing marker may be beginning
                    pos = len(line) if whole else max(pos, len(line) - len(CLOSING) + 1)
                    break
                pos, inside = close + len(CLOSING), None
                continue
            found = _marker_at(line, pos) if _MARK_START.search(line, pos) else None  # most text has no [ or #
            if found is None:
                end = len(line) if whole else _marker_start(line, pos)
                kept.append(line[pos:end])
                pos = end
                break
            at, marker = found
            kept.append(line[pos:at])
            pos = at + len(marker)
            inside = None if marker == CLOSING else ("heading" if marker.startswith("#") else "marker")
        self._pos, self._inside, self._kept = pos, inside, "".join(kept)


def strip_quotes(text: str, quoted: Quoted) -> tuple[str, bool]:
    """``text`` without the context it quotes, and whether it quoted any."""
    cut = QuoteFilter(quoted)
    return cut.feed(text) + cut.end(), cut.removed
