"""Array arguments a tool's own description pairs by position.

A tool can declare that two list arguments go together item by item: "Each new item id should match the item id
in the same position". Such a call with lists of different lengths cannot mean what the agent told the user (an
item exchanged for nothing, or a replacement without an item); it is a call outside the tool's contract even when
the JSON Schema (which cannot say it) accepts it. The pairing is read from the description of the second list: it
speaks of a position or an index, and names exactly one other array argument (by its name, or that name in words,
singular or plural). Nothing here knows a tool.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from functools import lru_cache
from typing import Any

import orjson

_POSITIONAL = re.compile(
    r"\b(?:same|matching|corresponding)\s+(?:position|index|place|order)s?\b|\bposition[- ]?wise\b|\bpositionally\b"
    r"|\bat the same index\b|\belement[- ]?wise\b",
    re.IGNORECASE,
)


def _phrases(name: str) -> set[str]:
    """How a description can name an argument: ``item_ids`` as itself, ``item ids`` and ``item id``."""
    words = re.sub(r"[_\-]+", " ", re.sub(r"([a-z0-9])([A-Z])", r"\1 \2", name)).lower().strip()
    out = {name.lower(), words}
    if words.endswith("s") and len(words) > 2:
        out.add(words[:-1])
    return {p for p in out if p}


def _mentions(text: str, phrases: set[str]) -> bool:
    return any(re.search(rf"(?<![\w]){re.escape(p)}(?![\w])", text) for p in phrases)


@lru_cache(maxsize=512)
def _pairs(schema_json: str) -> tuple[tuple[str, str], ...]:
    schema = orjson.loads(schema_json)
    props = schema.get("properties") if isinstance(schema, dict) else None
    if not isinstance(props, dict):
        return ()
    arrays = [k for k, v in props.items() if isinstance(v, dict) and v.get("type") == "array"]
    out: list[tuple[str, str]] = []
    for second in arrays:
        description = str(props[second].get("description") or "")
        if not _POSITIONAL.search(description):
            continue
        text = description.lower()
        for own in sorted(_phrases(second), key=len, reverse=True):  # "new item id" before "item id" inside it
            text = re.sub(rf"(?<![\w]){re.escape(own)}(?![\w])", " ", text)
        named = [first for first in arrays if first != second and _mentions(text, _phrases(first))]
        if len(named) == 1:
            out.append((named[0], second))
    return tuple(out)


def paired_arrays(schema: Mapping[str, Any]) -> tuple[tuple[str, str], ...]:
    """The (first, second) array arguments the schema's descriptions pair by position."""
    try:
        key = orjson.dumps(schema, option=orjson.OPT_SORT_KEYS).decode()
    except TypeError:
        return ()
    return _pairs(key)


def unpaired(schema: Mapping[str, Any], args: Mapping[str, Any]) -> list[tuple[str, int, str, int]]:
    """Each declared pair whose lists differ in length in ``args``: (first, its length, second, its length)."""
    out = []
    for first, second in paired_arrays(schema):
        a, b = args.get(first), args.get(second)
        if isinstance(a, list) and isinstance(b, list) and len(a) != len(b):
            out.append((first, len(a), second, len(b)))
    return out
