"""How tool outputs pair with the calls they answer: one rule for the detectors' conversation index
(:class:`detector_service.turn.ConversationIndex`) and the agents' view (:class:`detector_service.agents.view.ConversationView`)."""

from __future__ import annotations


class CallPairing:
    """The one rule pairing tool outputs with the calls they answer, for the detectors' index and the agents' view:
    by ``tool_call_id``; an output naming no waiting call answers the latest call while that one is unanswered.
    Fed a conversation's calls and outputs in order; positions are those of the caller's list of calls."""

    __slots__ = ("_answered", "_waiting")

    def __init__(self) -> None:
        self._waiting: dict[str, int] = {}
        self._answered: list[bool] = []

    def call(self, call_id: str | None) -> None:
        if call_id:
            self._waiting[call_id] = len(self._answered)
        self._answered.append(False)

    def output(self, tool_call_id: object) -> int | None:
        """The position of the call this output answers, if any."""
        at = self._waiting.pop(str(tool_call_id), None)
        if at is None and self._answered and not self._answered[-1]:
            at = len(self._answered) - 1
        if at is not None:
            self._answered[at] = True
        return at
