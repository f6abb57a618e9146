"""Read / write / generic tool kinds (DESIGN §3).

In order: the operator's profile, MCP-style annotations on the tool definition (``readOnlyHint``,
``destructiveHint``), then a heuristic on the tool name's leading verb. Hand-off tools (transfer to a
human) are generic: they change nothing in the domain's data.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from functools import lru_cache
from typing import Any

from detector_service.contract.profile import Profile, ToolKind

_HANDOFF = re.compile(r"transfer|escalat|hand_?off|human|operator|live_agent", re.IGNORECASE)
_GENERIC = re.compile(r"^(calculate|calc|compute|think|reason|math|evaluate|echo)($|_)", re.IGNORECASE)
_READ = re.compile(
    r"^(get|list|search|find|lookup|look_up|fetch|read|query|show|describe|check|count|view|retrieve|browse|"
    r"verify|validate|estimate|preview|quote|inspect)($|_)",
    re.IGNORECASE,
)
_WRITE = re.compile(
    r"^(book|cancel|update|modify|create|delete|remove|add|set|send|exchange|return|suspend|resume|enable|"
    r"disable|refuel|pay|charge|refund|issue|change|edit|post|put|patch|insert|write|submit|place|order|"
    r"transfer_funds|apply|assign|reset|toggle|grant|revoke|upgrade|downgrade|reserve|purchase|buy|sell|"
    r"schedule|reschedule|register|approve|reject|close|open|activate|deactivate|move|rename|upload|save)($|_)",
    re.IGNORECASE,
)


def annotations_of(tool: Mapping[str, Any]) -> Mapping[str, Any]:
    """MCP annotations, wherever a client put them on an OpenAI tool definition."""
    fn = tool.get("function") if isinstance(tool.get("function"), Mapping) else {}
    for holder in (tool, fn):
        ann = holder.get("annotations") if isinstance(holder, Mapping) else None
        if isinstance(ann, Mapping):
            return ann
    return {}


@lru_cache(maxsize=4096)
def kind_from_name(name: str) -> ToolKind:
    if is_handoff(name) or _GENERIC.match(name):
        return ToolKind.GENERIC
    if _READ.match(name):
        return ToolKind.READ
    if _WRITE.match(name):
        return ToolKind.WRITE
    return ToolKind.GENERIC


def is_handoff(name: str) -> bool:
    return bool(_HANDOFF.search(name)) and not _READ.match(name)


class ToolKinds:
    """Resolves tool kinds once per tool set; lookups afterwards are dict reads."""

    def __init__(self, profile: Profile, tools: Iterable[Mapping[str, Any]] = ()) -> None:
        self._profile = profile.tools
        self._cache: dict[str, ToolKind] = {}
        for tool in tools:
            fn = tool.get("function") if isinstance(tool.get("function"), Mapping) else tool
            name = fn.get("name") if isinstance(fn, Mapping) else None
            if isinstance(name, str):
                self._cache[name] = self._resolve(name, annotations_of(tool))
        self.declared = tuple(sorted(self._cache))  # the tools array's names: which deployment this is

    def _resolve(self, name: str, annotations: Mapping[str, Any]) -> ToolKind:
        if name in self._profile:
            return self._profile[name]
        if annotations.get("readOnlyHint") is True:
            return ToolKind.READ
        if annotations.get("destructiveHint") is True or annotations.get("readOnlyHint") is False:
            return ToolKind.WRITE
        return kind_from_name(name)

    def kind(self, name: str) -> ToolKind:
        found = self._cache.get(name)
        if found is None:
            found = self._resolve(name, {})
            self._cache[name] = found
        return found
