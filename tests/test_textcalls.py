"""Tool calls written as text: the real qwen2.5-7b leaks from the tau2 airline run, and the other shapes."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from proxy.upstream.textcalls import declared_tools, line_opens_call, repair_message, split_text_calls
from tests.tau_turns import QWEN, tools, trajectory

AIRLINE = {"get_user_details", "get_reservation_details", "cancel_reservation", "book_reservation"}


@pytest.mark.tau
def test_every_leaked_call_of_the_qwen_run_is_recovered(tau_dir: Path) -> None:
    # 24 assistant messages of the run spell calls out as text (bare, pretty-printed, fenced, after prose,
    # several in a row); the run's records hold none of them as tool_calls.
    names = declared_tools({"tools": tools(tau_dir, QWEN)})
    found = {}
    for run in ("4#0", "17#0", "23#0", "46#0"):
        t = trajectory(tau_dir, QWEN, run)
        for i, m in enumerate(t.messages):
            if m["role"] == "assistant" and not m.get("tool_calls") and m.get("content"):
                split = split_text_calls(m["content"], names)
                if split is not None:
                    found[(run, i)] = split
    assert len(found) == 24
    prose, calls = found[("4#0", 3)]
    assert prose is None
    assert calls == [{"name": "get_user_details", "arguments": {"user_id": "USER_PROVIDE_YOUR_USER_ID"}}]
    prose, calls = found[("23#0", 3)]  # a question, then the call in a ```json fence
    assert prose is not None
    assert prose.startswith("Sure, I can help with that.")
    assert "```" not in prose
    assert [c["name"] for c in calls] == ["get_user_details"]
    prose, calls = found[("46#0", 17)]  # prose, then three objects one after another
    assert [c["name"] for c in calls] == [
        "update_reservation_passengers",
        "update_reservation_baggages",
        "cancel_reservation",
    ]
    assert prose is not None
    assert "{" not in prose


@pytest.mark.tau
def test_ordinary_answers_of_the_run_are_left_alone(tau_dir: Path) -> None:
    names = declared_tools({"tools": tools(tau_dir, QWEN)})
    t = trajectory(tau_dir, QWEN, "10#0")
    texts = [m["content"] for m in t.messages if m["role"] == "assistant" and m.get("content")]
    assert texts
    assert all(split_text_calls(text, names) is None for text in texts)


def test_hermes_tags_and_lists_and_function_objects() -> None:
    tagged = '<tool_call>\n{"name": "cancel_reservation", "arguments": {"reservation_id": "ABC123"}}\n</tool_call>'
    assert split_text_calls(tagged, AIRLINE) == (
        None,
        [{"name": "cancel_reservation", "arguments": {"reservation_id": "ABC123"}}],
    )
    listed = json.dumps(
        [
            {"name": "get_user_details", "parameters": {"user_id": "u1"}},
            {
                "type": "function",
                "function": {"name": "get_reservation_details", "arguments": '{"reservation_id": "R1"}'},
            },
        ]
    )
    _, calls = split_text_calls(listed, AIRLINE) or (None, [])
    assert calls == [
        {"name": "get_user_details", "arguments": {"user_id": "u1"}},
        {"name": "get_reservation_details", "arguments": {"reservation_id": "R1"}},
    ]


@pytest.mark.parametrize(
    "text",
    [
        '{"name": "delete_everything", "arguments": {}}',  # not a declared tool
        '{"total": 412, "currency": "USD"}',  # JSON, but no call
        '{"name": "cancel_reservation", "arguments": "not json"}',
        '{"name": "cancel_reservation", "arguments": {"reservation_id": "A"}, "confidence": 0.9}',  # other keys
        '{"name": "cancel_reservation", "arguments": {"reservation_id": "A"}}\n{"name": "nope", "arguments": {}}',
        'I will call {"name": "cancel_reservation", "arguments": {"reservation_id": "A"}} now.',  # inside a sentence
        '```json\n{"total": 3}\n```',
        "Your booking is confirmed.",
    ],
)
def test_anything_ambiguous_stays_text(text: str) -> None:
    assert split_text_calls(text, AIRLINE) is None


def test_no_declared_tools_or_tool_choice_none_means_no_repair() -> None:
    text = '{"name": "cancel_reservation", "arguments": {"reservation_id": "A"}}'
    body = {"tools": [{"type": "function", "function": {"name": "cancel_reservation"}}], "tool_choice": "none"}
    assert declared_tools(body) == frozenset()
    assert split_text_calls(text, declared_tools(body)) is None
    assert declared_tools({"tools": body["tools"]}) == {"cancel_reservation"}
    # A JSON answer was asked for: JSON text is the answer, not a call.
    assert declared_tools({"tools": body["tools"], "response_format": {"type": "json_object"}}) == frozenset()
    assert declared_tools({"tools": body["tools"], "response_format": {"type": "text"}}) == {"cancel_reservation"}


def test_repair_message_moves_the_calls_and_keeps_the_prose() -> None:
    message: dict[str, Any] = {
        "role": "assistant",
        "content": 'Cancelling it now.\n{"name": "cancel_reservation", "arguments": {"reservation_id": "A1"}}',
    }
    assert repair_message(message, AIRLINE)
    assert message["content"] == "Cancelling it now."
    [call] = message["tool_calls"]
    assert call["type"] == "function"
    assert call["id"].startswith("call_")
    assert call["function"] == {"name": "cancel_reservation", "arguments": '{"reservation_id":"A1"}'}
    untouched = {"role": "assistant", "content": "Hello!"}
    assert not repair_message(untouched, AIRLINE)
    assert untouched == {"role": "assistant", "content": "Hello!"}


@pytest.mark.parametrize(
    ("line", "opens"),
    [
        ('  {"name"', True),
        ("```json", True),
        ("<tool_call>", True),
        ("[{", True),
        ("[get_user_details(", True),
        ("[TOOL_CALLS]", True),
        ("<|python_tag|>", True),
        ("<function=get_user_details>", True),
        # Too short to tell yet: the stream waits for the next piece.
        ("  ", None),
        ("[", None),
        ("[get_user", None),
        ("<|py", None),
        ("``", None),
        ("<tool", None),
        # Prose, inline code, markup, a numbered option: the line streams on.
        ("Your flight", False),
        ("Sure, ", False),
        ("`HAT170` departs", False),
        ("<b>Note</b>", False),
        ("[1] HAT170 at 10:00", False),
        ("[see the policy](https://example.com)", False),
    ],
)
def test_a_reply_or_a_line_opens_calls_only_with_json_a_fence_or_a_tag(line: str, opens: bool | None) -> None:
    assert line_opens_call(line) is opens


@pytest.mark.parametrize(
    ("text", "prose", "calls"),
    [
        (
            '[get_user_details(user_id="mia_li_3668"), cancel_reservation(reservation_id="ABC123")]',
            None,
            [("get_user_details", {"user_id": "mia_li_3668"}), ("cancel_reservation", {"reservation_id": "ABC123"})],
        ),
        (
            "Let me look.\nget_user_details(user_id='mia_li_3668')",
            "Let me look.",
            [("get_user_details", {"user_id": "mia_li_3668"})],
        ),
        (
            "```python\nget_reservation_details(reservation_id='ABC123')\n```",
            None,
            [("get_reservation_details", {"reservation_id": "ABC123"})],
        ),
        (
            'book_reservation(user_id="u1", passengers=[{"first_name": "Mia"}], insurance=None, total=12.5)',
            None,
            [
                (
                    "book_reservation",
                    {"user_id": "u1", "passengers": [{"first_name": "Mia"}], "insurance": None, "total": 12.5},
                )
            ],
        ),
        (
            '<|python_tag|>{"name": "get_user_details", "parameters": {"user_id": "u1"}}',
            None,
            [("get_user_details", {"user_id": "u1"})],
        ),
        (
            '[TOOL_CALLS] [{"name": "get_user_details", "arguments": {"user_id": "u1"}}]',
            None,
            [("get_user_details", {"user_id": "u1"})],
        ),
        (
            'Checking.\n<function=get_user_details>{"user_id": "u1"}</function>',
            "Checking.",
            [("get_user_details", {"user_id": "u1"})],
        ),
    ],
)
def test_calls_in_the_formats_open_models_write_are_read(text: str, prose: str | None, calls: list[Any]) -> None:
    found = split_text_calls(text, AIRLINE)
    assert found is not None
    assert found[0] == prose
    assert [(c["name"], c["arguments"]) for c in found[1]] == calls


@pytest.mark.parametrize(
    "text",
    [
        'I already ran get_user_details(user_id="u1") for you.',  # a call mentioned inside a sentence
        'print(get_user_details(user_id="u1"))',  # not a call of a declared tool
        'get_user_details("u1")',  # positional: which parameter is meant is not written
        'get_user_details(user_id=__import__("os").getcwd())',  # not a literal: nothing is evaluated
        "get_user_details(user_id={1, 2})",  # no JSON for a set
        "[send_email(to='x')]",  # not declared
        "Use len(items) to count them (see [1]).",
        '<function=send_email>{"to": "x"}</function>',
    ],
)
def test_python_like_text_that_is_no_declared_call_is_left_alone(text: str) -> None:
    assert split_text_calls(text, AIRLINE) is None
