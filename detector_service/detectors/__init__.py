"""Failure detectors, one module per category (DESIGN §3). Each is a pure function over a ``TurnView``."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

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


def function_of(tool: Mapping[str, Any]) -> Mapping[str, Any]:
    """The ``function`` object of an OpenAI tool entry (name, description, parameters); a bare one as is."""
    fn = tool.get("function")
    return fn if isinstance(fn, Mapping) else tool


def schema_of(tool: Mapping[str, Any]) -> Mapping[str, Any] | None:
    """The JSON Schema of a tool's parameters, when it declares one."""
    params = function_of(tool).get("parameters")
    return params if isinstance(params, Mapping) else None
