"""Recorded trajectories come from many tools and converters: whatever the fields of a message hold, replay
checks every assistant turn and never raises. Hypothesis generates the messages; with and without a profile."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from detector_service.agents import build_notes
from detector_service.agents.policy import PolicyCache
from detector_service.contract.profile import AgentName, Profile, load_profile
from detector_service.engine import Engine
from detector_service.offline.replay import replay_one
from detector_service.offline.trajectories import Trajectory, wire_shaped
from tests import json_values
from tests.json_values import anything
from tests.supervision_harness import TOOLS

AIRLINE = Path(__file__).resolve().parents[1] / "profiles" / "airline.yaml"
ENGINES = (Engine(), Engine(load_profile(AIRLINE)))


def mostly(valid: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """The right type 3 times in 4, any JSON value otherwise."""
    return json_values.mostly(valid, 4)


function = st.fixed_dictionaries(
    {
        "name": mostly(st.sampled_from(["cancel_reservation", "get_reservation_details", "nope"])),
        "arguments": mostly(st.sampled_from(['{"reservation_id": "A1B2C3"}', "{bad", "{}"])),
    }
)
call = st.one_of(
    st.fixed_dictionaries({"id": mostly(st.sampled_from(["c1", "c2"])), "function": mostly(function)}),
    # as other recorders store calls: no wrapper, arguments as an object, no id, a namespaced name
    st.fixed_dictionaries(
        {"name": mostly(st.sampled_from(["functions.cancel_reservation", "think"])), "arguments": anything},
        optional={"id": anything},
    ),
)
message = st.fixed_dictionaries(
    {"role": st.sampled_from(["user", "assistant", "tool", "system", "function"])},
    optional={
        "function_call": mostly(function),
        "content": mostly(st.sampled_from(["yes", "Error: no", "Your reservation has been cancelled.", ""])),
        "tool_calls": mostly(st.lists(mostly(call), max_size=2)),
        "tool_call_id": mostly(st.sampled_from(["c1", "c2"])),
        "requestor": mostly(st.just("user")),
        "error": anything,
    },
)


@settings(max_examples=300, deadline=None, derandomize=True)
@given(messages=st.lists(message, min_size=1, max_size=8))
def test_replay_and_the_agents_take_any_message_fields(messages: list[dict[str, Any]]) -> None:
    turns = sum(1 for m in messages if m["role"] == "assistant")
    # as given, and as the trajectory readers put them in the wire shape first
    for shaped in (messages, wire_shaped(messages)):
        assert len(shaped) == len(messages)
        trajectory = Trajectory(id="t", messages=shaped, reward=1.0)
        for engine in ENGINES:
            assert replay_one(engine, trajectory, TOOLS).turns == turns
    build_notes(list(AgentName), messages, TOOLS, Profile(), PolicyCache())
