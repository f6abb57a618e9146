"""Small turn events for transport tests (detector behaviour is tested on real trajectories elsewhere)."""

from __future__ import annotations

from typing import Any

from detector_service.contract.wire import TurnEvent

TOOLS: list[dict[str, Any]] = [
    {
        "type": "function",
        "function": {
            "name": "get_order_details",
            "description": "Read one order.",
            "parameters": {"type": "object", "properties": {"order_id": {"type": "string"}}},
        },
    }
]


def turn(n: int, *, tool: str = "get_order_details", reply_to: str | None = None, session: str = "s1") -> TurnEvent:
    """A turn whose candidate calls ``tool``; an unknown tool draws an MTC finding."""
    return TurnEvent(
        session_id=session,
        tenant="t1",
        reply_to=reply_to,
        messages=[
            {"role": "system", "content": "You are a retail support agent."},
            {"role": "user", "content": f"Where is my order #W{n:07d}?"},
        ],
        tools=TOOLS,
        candidate={
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": f"call_{n}",
                    "type": "function",
                    "function": {"name": tool, "arguments": f'{{"order_id": "#W{n:07d}"}}'},
                }
            ],
        },
    )


def unconfirmed_cancel(turn_id: str = "turn-1") -> TurnEvent:
    """A cancellation called right after the user asked for it, under a policy that wants a yes first."""
    return TurnEvent(
        turn_id=turn_id,
        session_id="s1",
        messages=[
            {"role": "system", "content": "Obtain explicit user confirmation (yes) before cancelling."},
            {"role": "user", "content": "Can you cancel reservation ABC123?"},
        ],
        candidate={
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "c1",
                    "type": "function",
                    "function": {"name": "cancel_reservation", "arguments": '{"reservation_id": "ABC123"}'},
                }
            ],
        },
    )
