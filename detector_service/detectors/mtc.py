"""MTC, malformed tool call: unknown tool, arguments that are not JSON or violate the tool's schema, lists the
tool's description pairs by position sent with different lengths (:mod:`detector_service.detectors.paired`); in a
harness that reads actions from text, an action that does not parse (the harness sends it to the user as text).

When exactly one repair is possible (JSON with a trailing comma or single quotes, a number sent as a
string where the schema wants a number, arguments sent as an object), the finding carries the repaired
arguments in ``evidence["repaired_arguments"]`` and the engine proposes a rewrite.
"""

from __future__ import annotations

import ast
import contextlib
import re
import threading
from collections.abc import Mapping
from typing import Any

import orjson
from jsonschema import Draft202012Validator
from jsonschema.exceptions import SchemaError

from detector_service.contract.wire import Category, Finding, Severity
from detector_service.detectors import call_finding, schema_of
from detector_service.detectors.paired import unpaired
from detector_service.turn import Call, TurnView, tool_calls_of

_TRAILING_COMMA = re.compile(r",\s*([}\]])")
# What is left of a text action the harness could not parse: a call object that is not valid JSON.
_UNPARSED_ACTION = re.compile(r'\A\s*(?:```[A-Za-z]*\s*)?\{\s*"name"\s*:\s*"([^"]+)"')
_validators: dict[str, Draft202012Validator | None] = {}
_validators_lock = threading.Lock()


def validator_for(schema: Mapping[str, Any]) -> Draft202012Validator | None:
    """A compiled validator per distinct schema, built once and shared across threads."""
    key = orjson.dumps(schema, option=orjson.OPT_SORT_KEYS).decode()
    found = _validators.get(key, False)
    if found is not False:
        return found
    try:
        Draft202012Validator.check_schema(schema)
        built: Draft202012Validator | None = Draft202012Validator(schema)
    except SchemaError:
        built = None  # a broken schema cannot judge arguments; unknown-tool and JSON checks still run
    with _validators_lock:
        _validators[key] = built
    return built


def _repair_json(text: str) -> dict[str, Any] | None:
    """The one object a near-JSON string can mean, or None when it is not unambiguous."""
    candidates: list[Any] = []
    fixed = _TRAILING_COMMA.sub(r"\1", text)
    if fixed != text:
        with contextlib.suppress(orjson.JSONDecodeError):
            candidates.append(orjson.loads(fixed))
    if not candidates:
        # Python-literal syntax (single quotes, True/None) parses one way only; literal_eval runs no code.
        with contextlib.suppress(ValueError, SyntaxError, MemoryError, RecursionError):
            candidates.append(ast.literal_eval(fixed))
    if len(candidates) == 1 and isinstance(candidates[0], dict):
        try:
            orjson.dumps(candidates[0])
        except TypeError:
            return None
        return candidates[0]
    return None


def _coerce(args: dict[str, Any], schema: Mapping[str, Any]) -> dict[str, Any] | None:
    """Numeric strings where the schema wants numbers; None if nothing changes."""
    props = schema.get("properties")
    if not isinstance(props, Mapping):
        return None
    out = dict(args)
    changed = False
    for k, v in args.items():
        spec = props.get(k)
        if not isinstance(spec, Mapping) or not isinstance(v, str):
            continue
        want = spec.get("type")
        try:
            if want == "integer" and re.fullmatch(r"\s*-?\d+\s*", v):
                out[k], changed = int(v), True
            elif want == "number" and re.fullmatch(r"\s*-?\d+(\.\d+)?\s*", v):
                f = float(v)
                out[k], changed = (int(f) if f.is_integer() else f), True
        except ValueError:
            continue
    return out if changed else None


def _finding(call: Call, detector: str, message: str, **evidence: Any) -> Finding:
    return call_finding(Category.MTC, call, detector, message, Severity.ERROR, evidence)


def _schema_errors(validator: Draft202012Validator, args: Any) -> list[str]:
    errors = sorted(validator.iter_errors(args), key=lambda e: list(e.absolute_path))
    out = []
    for e in errors[:3]:
        where = "/".join(str(p) for p in e.absolute_path) or "arguments"
        out.append(f"{where}: {e.message}")
    return out


def _unparsed_action(view: TurnView) -> Finding | None:
    """A text action that does not parse: nothing ran, and the user got the text (``react`` dialect only)."""
    if not view.index.text_actions or view.calls:
        return None
    written = _UNPARSED_ACTION.match(view.text)
    if written is None:
        return None
    return Finding(
        category=Category.MTC,
        detector="unparsed_action",
        severity=Severity.ERROR,
        message=(
            f"The action calling '{written.group(1)}' is not valid JSON, so it was not run and the user would "
            f"get its text: {view.text.strip()[:200]!r}. Write the action as exactly one valid JSON object "
            '{"name": ..., "arguments": {...}}.'
        ),
        tool_name=written.group(1),
    )


def detect(view: TurnView) -> list[Finding]:
    out: list[Finding] = []
    unparsed = _unparsed_action(view)
    if unparsed is not None:
        out.append(unparsed)
    for raw, call in zip(tool_calls_of(view.candidate), view.calls, strict=True):
        if view.tools and call.name not in view.tools:
            names = ", ".join(sorted(view.tools))
            out.append(_finding(call, "unknown_tool", f"Tool '{call.name}' does not exist. Available tools: {names}."))
            continue
        tool = view.tools.get(call.name)
        schema = schema_of(tool) if tool is not None else None
        validator = validator_for(schema) if schema is not None else None
        fn = raw.get("function")
        sent_object = isinstance(fn, Mapping) and isinstance(fn.get("arguments"), dict)
        args: Any = call.args
        repaired: dict[str, Any] | None = None
        if args is None:
            repaired = _repair_json(call.arguments)
            if repaired is None:
                out.append(
                    _finding(
                        call,
                        "arguments_not_json",
                        f"The arguments of '{call.name}' are not a JSON object: {call.arguments[:200]!r}. "
                        "Send the arguments as one valid JSON object.",
                    )
                )
                continue
            args = repaired
        if validator is not None:
            problems = _schema_errors(validator, args)
            if problems:
                coerced = _coerce(args, schema) if schema is not None else None
                if coerced is not None and not _schema_errors(validator, coerced):
                    repaired = coerced
                else:
                    out.append(
                        _finding(
                            call,
                            "schema_violation",
                            f"The arguments of '{call.name}' violate its JSON Schema: {'; '.join(problems)}.",
                            errors=problems,
                        )
                    )
                    continue
        if schema is not None and isinstance(args, Mapping):
            for first, n_first, second, n_second in unpaired(schema, args):
                out.append(
                    _finding(
                        call,
                        "unpaired_arguments",
                        f"'{call.name}' pairs '{second}' with '{first}' item by item (its description: same "
                        f"position), but this call sends {n_first} in '{first}' and {n_second} in '{second}': an entry "
                        f"cannot be dropped or added this way. Send one entry of '{second}' for each entry of "
                        f"'{first}', in the same order, as agreed with the user; if this tool cannot do what the "
                        "user asked, say so instead of calling it.",
                        first=first,
                        second=second,
                    )
                )
        if repaired is not None or sent_object:
            fixed = orjson.dumps(repaired if repaired is not None else args).decode()
            out.append(
                _finding(
                    call,
                    "arguments_repaired",
                    f"The arguments of '{call.name}' were not valid JSON of the right types; "
                    f"they were repaired unambiguously to {fixed}.",
                    repaired_arguments=fixed,
                )
            )
    return out
