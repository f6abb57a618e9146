"""Failure detectors, one module per category (DESIGN §3). Each is a pure function over a ``TurnView``."""

from __future__ import annotations

from collections.abc import Mapping

from detector_service.contract.wire import Category, Finding, Severity
from detector_service.turn import Call


def call_finding(
    category: Category, call: Call, detector: str, message: str, severity: Severity, evidence: Mapping[str, object]
) -> Finding:
    """A finding about one tool call: the call's id and name travel with it so the proxy can act on that call."""
    return Finding(
        category=category,
        detector=detector,
        severity=severity,
        message=message,
        evidence=dict(evidence),
        tool_call_id=call.call_id,
        tool_name=call.name,
    )
