"""The detector engine: runs the enabled detectors over one turn and folds findings into a verdict.

The same engine serves the Redis worker, the proxy's embedded mode and ``fama replay``.
Contract: ``Engine(profile).evaluate(turn) -> Verdict`` is pure (no I/O) and thread-safe.
"""

from __future__ import annotations

import time

from detector_service.profile import Profile
from detector_service.wire import ACTION_STRENGTH, Action, Category, Finding, Severity, TurnEvent, Verdict

DETECTOR_VERSION = "0.1.0"


class Engine:
    def __init__(self, profile: Profile | None = None) -> None:
        self.profile = profile or Profile()

    def findings(self, turn: TurnEvent) -> list[Finding]:
        known = {t.get("function", {}).get("name") for t in turn.tools if isinstance(t, dict)}
        out: list[Finding] = []
        for call in turn.candidate.get("tool_calls") or []:
            name = (call.get("function") or {}).get("name")
            if known and name not in known:
                out.append(
                    Finding(
                        category=Category.MTC,
                        detector="unknown_tool",
                        severity=Severity.ERROR,
                        message=f"Tool {name!r} does not exist; available tools: {', '.join(sorted(map(str, known)))}.",
                        tool_call_id=call.get("id"),
                        tool_name=name,
                    )
                )
        return out

    def evaluate(self, turn: TurnEvent) -> Verdict:
        start = time.perf_counter()
        found = self.findings(turn)
        action = Action.PASS
        for f in found:
            candidate = self.profile.action_for(f.category)
            if ACTION_STRENGTH[candidate] > ACTION_STRENGTH[action]:
                action = candidate
        return Verdict(
            turn_id=turn.turn_id,
            session_id=turn.session_id,
            tenant=turn.tenant,
            action=action,
            findings=found,
            detector_version=DETECTOR_VERSION,
            elapsed_ms=(time.perf_counter() - start) * 1000,
        )
