"""TOR, tool output reformatter: the latest complex tool output as an explicit, enumerated list.

A JSON tool output with several records (a list, nested lists, or a mapping of id → record) is
flattened to one numbered line per record, with identifier, status, price and date fields first, so
the model reads ids and amounts from a short list instead of a deep JSON document.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

from detector_service.agents import text as t
from detector_service.agents.note import AgentInput, Note
from detector_service.agents.view import parse_json
from detector_service.contract.profile import AgentName

MAX_RECORDS = 15
MAX_FIELDS = 12
MIN_LEAVES = 6  # below this an output is simple enough to read as it is
ID_KEY = re.compile(r"(^|_)(id|number|code|no|ref|sku)$|_id$|^id_", re.IGNORECASE)
_STATUS = re.compile(r"status|state|available", re.IGNORECASE)
_MONEY = re.compile(r"price|amount|total|cost|balance|fee|refund|paid|charge", re.IGNORECASE)
_TIME = re.compile(r"date|time|day", re.IGNORECASE)

Leaf = tuple[str, Any]


def leaves(value: Any, path: str = "") -> Iterator[Leaf]:
    if isinstance(value, dict):
        for k, v in value.items():
            yield from leaves(v, f"{path}.{k}" if path else str(k))
    elif isinstance(value, list):
        if value and all(not isinstance(v, dict | list) for v in value):
            yield path, ", ".join(map(str, value))
        else:
            for i, v in enumerate(value):
                yield from leaves(v, f"{path}[{i}]")
    else:
        yield path, value


def _rank(leaf: Leaf) -> int:
    key = leaf[0].rsplit(".", 1)[-1].split("[")[0]
    for rank, pattern in enumerate((ID_KEY, _STATUS, _MONEY, _TIME)):
        if pattern.search(key):
            return rank
    return 4


def records(value: Any) -> list[tuple[str, Any]]:
    """Split an output into (label, record) pairs: list items, or entries of a mapping of records."""
    if isinstance(value, list) and len(value) > 1:
        return [(str(i + 1), v) for i, v in enumerate(value)]
    if isinstance(value, dict):
        out: list[tuple[str, Any]] = []
        scalars = {k: v for k, v in value.items() if not isinstance(v, dict | list)}
        if scalars:
            out.append(("", scalars))
        for k, v in value.items():
            if isinstance(v, list) and v and any(isinstance(x, dict | list) for x in v):
                out.extend((f"{k}[{i + 1}]", x) for i, x in enumerate(v))
            elif isinstance(v, dict) and v and all(isinstance(x, dict) for x in v.values()):
                out.extend((f"{k}.{rk}", rv) for rk, rv in v.items())
            elif isinstance(v, dict | list):
                out.append((str(k), v))
        return out
    return [("1", value)]


def flatten(value: Any) -> list[str]:
    lines = []
    for label, rec in records(value)[:MAX_RECORDS]:
        fields = sorted(leaves(rec), key=_rank)[:MAX_FIELDS]
        body = "; ".join(f"{k}={v}" if k else str(v) for k, v in fields)
        lines.append(t.clip(f"{label}: {body}" if label else body, 400))
    return lines


def is_complex(value: Any) -> bool:
    return isinstance(value, dict | list) and sum(1 for _ in leaves(value)) >= MIN_LEAVES


def build(inp: AgentInput) -> Note | None:
    for call in reversed(inp.view.calls):
        if call.output is None:
            continue
        value = parse_json(call.output)
        if not is_complex(value):
            return None  # only the latest output matters; an older one was already reformatted on its turn
        lines = flatten(value)
        total = len(records(value))
        title = f"Output of `{call.name}` as a list ({total} record{'s' if total != 1 else ''})"
        if total > MAX_RECORDS:
            lines.append(f"… {total - MAX_RECORDS} more records not shown; refer to the tool output.")
        return Note(AgentName.TOR, title, tuple(lines), priority=40)
    return None
