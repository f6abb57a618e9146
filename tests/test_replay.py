from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any

import pytest

from detector_service.contract.profile import load_profile
from detector_service.contract.wire import TurnEvent
from detector_service.engine import Engine
from detector_service.offline.replay import replay_command, replay_one
from detector_service.offline.trajectories import Trajectory, load, load_tools
from tests.scripted_llm import ScriptedLLM
from tests.tau_turns import DOMAIN, QWEN, V1, tools

pytestmark = pytest.mark.tau
AIRLINE = Path(__file__).resolve().parents[1] / "profiles" / "airline.yaml"


@pytest.mark.parametrize("file", [V1, QWEN])
def test_json_out_has_one_record_per_trajectory_in_input_order(tau_dir: Path, tmp_path: Path, file: str) -> None:
    source = tau_dir / "trajectories" / file
    out = tmp_path / "out.json"
    code = replay_command(
        [source], tools=tau_dir / "domains" / DOMAIN[file] / "tools_openai.json", profile=None, json_out=out
    )
    assert code == 0
    doc = json.loads(out.read_text())
    lines = [json.loads(line) for line in source.read_text().splitlines() if line.strip()]
    records = doc["records"]
    assert len(records) == len(lines)
    assert [r["reward"] for r in records] == [line["reward"] for line in lines]
    for record, line in zip(records, lines, strict=True):
        assert set(record) == {"id", "reward", "flags"}
        for flag in record["flags"]:
            assert set(flag) == {"turn", "category", "detector", "action", "message"}
            assert line["messages"][flag["turn"]]["role"] == "assistant"
    summary = doc["summary"]
    assert summary["trajectories"] == len(lines)
    assert summary["flagged"] == sum(1 for r in records if r["flags"])
    assert summary["by_outcome"]["failed"]["flagged"] > 0


def test_incremental_replay_matches_the_engine_contract(tau_dir: Path) -> None:
    """Replay's growing index must give exactly what ``evaluate`` gives on each turn from scratch."""
    engine = Engine(load_profile(AIRLINE))
    schema = tools(tau_dir, QWEN)
    for t in list(load(tau_dir / "trajectories" / QWEN))[:8]:
        replayed = replay_one(engine, t, schema)
        incremental = [(f.turn, f.finding.detector, f.finding.message) for f in replayed.flags]
        scratch: list[tuple[int, str, str]] = []
        for i, m in enumerate(t.messages):
            if m["role"] != "assistant":
                continue
            # A session id of its own per turn: the engine's per-session index cache must not be involved.
            turn = TurnEvent(session_id=f"{t.id}@{i}", messages=t.messages[:i], tools=schema, candidate=m)
            verdict = engine.evaluate(turn)
            scratch.extend((i, f.detector, f.message) for f in verdict.findings)
        assert incremental == scratch


def _as_v1(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [
        {"task_id": r["task_id"], "trial": r["trial"], "reward": r["reward"], "traj": r["messages"]} for r in records
    ]


def _as_tau2(records: list[dict[str, Any]], policy: str) -> dict[str, Any]:
    sims = []
    for r in records:
        messages = []
        for m in r["messages"]:
            if m["role"] == "system":
                continue
            if m["role"] == "tool":
                messages.append({"role": "tool", "id": m["tool_call_id"], "content": m["content"]})
                continue
            msg: dict[str, Any] = {"role": m["role"], "content": m.get("content")}
            if m.get("tool_calls"):
                msg["tool_calls"] = [
                    {"id": c["id"], "name": c["function"]["name"], "arguments": json.loads(c["function"]["arguments"])}
                    for c in m["tool_calls"]
                ]
            messages.append(msg)
        sims.append(
            {
                "id": f"sim-{r['task_id']}",
                "task_id": r["task_id"],
                "messages": messages,
                "reward_info": {"reward": r["reward"]},
            }
        )
    return {"info": {"environment_info": {"policy": policy}}, "tasks": [], "simulations": sims}


def test_v1_and_tau2_result_files_replay_like_jsonl(tau_dir: Path, tmp_path: Path) -> None:
    source = tau_dir / "trajectories" / QWEN
    records = [json.loads(line) for line in source.read_text().splitlines()[:5]]
    v1_file = tmp_path / "v1.json"
    v1_file.write_text(json.dumps(_as_v1(records)))
    tau2_file = tmp_path / "tau2.json"
    tau2_file.write_text(json.dumps(_as_tau2(records, records[0]["messages"][0]["content"])))
    schema = tools(tau_dir, QWEN)
    engine = Engine()
    expected = [[(f.turn, f.finding.detector) for f in replay_one(engine, t, schema).flags] for t in load(source)][:5]
    for path in (v1_file, tau2_file):
        loaded = list(load(path))
        assert [t.reward for t in loaded] == [r["reward"] for r in records]
        got = [[(f.turn, f.finding.detector) for f in replay_one(engine, t, schema).flags] for t in loaded]
        assert got == expected, path.name


@pytest.mark.parametrize(
    ("name", "body"),
    [
        ("bad.jsonl", '{"no_messages": true}\n'),
        ("strings.jsonl", '{"messages": ["hello", {"role": "user", "content": "hi"}]}\n'),
        ("v1.json", '[{"task_id": 0, "traj": [{"role": "user", "content": "hi"}, 7]}]'),
        ("tau2.json", '{"simulations": [{"id": "s", "messages": [null]}]}'),
        ("tau2-sim.json", '{"simulations": ["s"]}'),
    ],
)
def test_unreadable_input_fails_cleanly(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], name: str, body: str
) -> None:
    bad = tmp_path / name
    bad.write_text(body)
    out = tmp_path / "out.json"
    assert replay_command([bad], tools=None, profile=None, json_out=out) == 2
    assert str(bad) in capsys.readouterr().err
    assert not out.exists()


def _one_run(tau_dir: Path, tmp_path: Path, run_id: str) -> Path:
    """The qwen file cut down to one trajectory, so a judge call per turn stays cheap."""
    lines = (tau_dir / "trajectories" / QWEN).read_text().splitlines()
    line = next(x for x in lines if x.strip() and f"{json.loads(x)['task_id']}#{json.loads(x)['trial']}" == run_id)
    path = tmp_path / "one.jsonl"
    path.write_text(line + "\n")
    return path


def _judge_profile(tmp_path: Path, base_url: str) -> Path:
    path = tmp_path / "judge.yaml"
    path.write_text(f"version: 1\njudge: {{enabled: true, base_url: '{base_url}', model: judge-model, timeout_s: 5}}\n")
    return path


def _books(body: dict[str, Any]) -> str:
    """The scripted judge's answer: a CM finding exactly when the candidate books a flight."""
    candidate = body["messages"][-1]["content"].rsplit("CANDIDATE:", 1)[1]
    if "book_reservation" in candidate:
        return json.dumps(
            {"findings": [{"category": "CM", "message": "the user asked for a change", "confidence": 0.9}]}
        )
    return json.dumps({"findings": []})


def test_replay_with_the_judge_adds_its_findings_per_turn(tau_dir: Path, tmp_path: Path) -> None:
    llm = ScriptedLLM()
    llm.responder = _books
    source = _one_run(tau_dir, tmp_path, "10#0")
    messages = json.loads(source.read_text())["messages"]
    assistant = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    booking = [
        i
        for i in assistant
        if any(c["function"]["name"] == "book_reservation" for c in messages[i].get("tool_calls") or [])
    ]
    assert len(booking) == 3  # three booking attempts, all rejected by the tool
    # The judge is asked about turns that change data, hand off or talk to the user, not pure look-ups.
    kinds = {t["name"]: t["kind"] for t in json.loads((tau_dir / "domains" / DOMAIN[QWEN] / "tools.json").read_text())}
    asked = [
        i
        for i in assistant
        if (messages[i].get("content") or "").strip()
        or any(kinds[c["function"]["name"]] != "read" for c in messages[i].get("tool_calls") or [])
    ]
    assert set(booking) < set(asked) < set(assistant)
    out = tmp_path / "out.json"
    with llm.serving() as base_url:
        code = replay_command(
            [source],
            tools=tau_dir / "domains" / DOMAIN[QWEN] / "tools_openai.json",
            profile=_judge_profile(tmp_path, base_url),
            json_out=out,
            judge_concurrency=3,
        )
    assert code == 0
    doc = json.loads(out.read_text())
    judged = [f for f in doc["records"][0]["flags"] if f["detector"] == "llm_judge"]
    assert [f["turn"] for f in judged] == booking
    assert {f["category"] for f in judged} == {"CM"}
    assert doc["summary"]["judge"] == {"calls": len(asked), "findings": len(booking), "errors": 0}
    assert len(llm.asked("fama_judge")) == len(asked)
    assert 1 <= llm.max_in_flight <= 3
    turns = [f["turn"] for f in doc["records"][0]["flags"]]
    assert turns == sorted(turns)


def test_replay_keeps_the_deterministic_flags_when_the_judge_fails(tau_dir: Path, tmp_path: Path) -> None:
    llm = ScriptedLLM()
    llm.status = 500
    source = _one_run(tau_dir, tmp_path, "10#0")
    tools_file = tau_dir / "domains" / DOMAIN[QWEN] / "tools_openai.json"
    plain, judged = tmp_path / "plain.json", tmp_path / "judged.json"
    assert replay_command([source], tools=tools_file, profile=None, json_out=plain) == 0
    with llm.serving() as base_url:
        code = replay_command([source], tools=tools_file, profile=_judge_profile(tmp_path, base_url), json_out=judged)
    assert code == 0
    without, with_failing = json.loads(plain.read_text()), json.loads(judged.read_text())
    assert with_failing["records"] == without["records"]
    assert without["records"][0]["flags"], "the run has deterministic flags to keep"
    calls = with_failing["summary"]["judge"]["calls"]
    assert calls > 0
    assert with_failing["summary"]["judge"]["errors"] == calls


def test_a_judge_without_endpoint_is_a_clear_error(tau_dir: Path, tmp_path: Path) -> None:
    profile = tmp_path / "judge.yaml"
    profile.write_text("version: 1\njudge: {enabled: true}\n")
    source = _one_run(tau_dir, tmp_path, "10#0")
    assert replay_command([source], tools=None, profile=profile, json_out=None) == 2


@pytest.mark.tau
def test_json_summary_reports_acting_and_all_flags_per_file_model_and_domain(tau_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "out.json"
    profile = Path(__file__).resolve().parents[1] / "profiles" / "airline.yaml"
    schema = tau_dir / "domains" / DOMAIN[QWEN] / "tools_openai.json"
    assert replay_command([tau_dir / "trajectories" / QWEN], tools=schema, profile=profile, json_out=out) == 0
    doc = json.loads(out.read_text())
    outcomes = doc["summary"]["outcomes"]
    for group in (outcomes["per_file"][QWEN], outcomes["per_model"]["ollama_chat/qwen2.5:7b"]):
        assert group == outcomes["pooled"]
    assert outcomes["per_domain"]["airline"] == outcomes["pooled"]
    acting, every = outcomes["pooled"]["acting"], outcomes["pooled"]["all"]
    assert (acting["n_failed"], acting["n_passed"]) == (24, 6)
    assert acting["failed_flagged"] <= every["failed_flagged"]
    # every flag names the action the decision table gave it; acting ones are what the acting view counts
    flagged = [
        r
        for r in doc["records"]
        if r["reward"] < 1 and any(f["action"] in {"retry", "rewrite", "block"} for f in r["flags"])
    ]
    assert round(len(flagged) / 24, 3) == acting["failed_flagged"]
    assert {f["action"] for r in doc["records"] for f in r["flags"]} <= {"guide", "retry", "rewrite", "block"}


def _stored_otherwise(record: dict[str, Any], how: str) -> dict[str, Any]:
    """The same run as another recorder might have stored it."""
    out: dict[str, Any] = json.loads(json.dumps(record))
    legacy: set[str] = set()  # ids of the calls stored as a legacy function_call
    for m in out["messages"]:
        if how == "legacy function calls":
            if len(m.get("tool_calls") or []) == 1:
                [call] = m.pop("tool_calls")
                m["function_call"] = call["function"]
                legacy.add(call["id"])
            elif m["role"] == "tool" and m.get("tool_call_id") in legacy:
                m["role"] = "function"
                del m["tool_call_id"]
        if how == "arguments as objects":
            for c in m.get("tool_calls") or []:
                c["function"]["arguments"] = json.loads(c["function"]["arguments"])
        elif how == "calls without the function wrapper" and m.get("tool_calls"):
            m["tool_calls"] = [
                {"id": c["id"], "name": c["function"]["name"], "arguments": json.loads(c["function"]["arguments"])}
                for c in m["tool_calls"]
            ]
        elif how == "tool results as JSON values" and m["role"] == "tool":
            with contextlib.suppress(ValueError):
                m["content"] = json.loads(m["content"])
        elif how == "namespaced call names":
            for c in m.get("tool_calls") or []:
                c["function"]["name"] = "functions." + c["function"]["name"]
        elif how == "no call ids":
            m.pop("tool_call_id", None)
            for c in m.get("tool_calls") or []:
                c.pop("id", None)
    return out


@pytest.mark.parametrize(
    "how",
    [
        "arguments as objects",
        "calls without the function wrapper",
        "tool results as JSON values",
        "no call ids",
        "legacy function calls",
        "namespaced call names",
    ],
)
def test_a_run_stored_another_way_gets_the_same_flags(tau_dir: Path, tmp_path: Path, how: str) -> None:
    # claude makes several calls per turn (ids matter) and its runs carry no acting flag: a recorder's way of
    # storing them must not turn into findings (arguments as objects alone flagged 22 of 22 passed runs).
    file = "tau2-bench__airline__claude-sonnet-4-5__dev30__pr80.jsonl"
    source = tau_dir / "trajectories" / file
    stored = tmp_path / "stored.jsonl"
    records = [json.loads(line) for line in source.read_text().splitlines()]
    stored.write_text("".join(json.dumps(_stored_otherwise(r, how)) + "\n" for r in records))
    engine = Engine(load_profile(AIRLINE))
    schema = load_tools_of(tau_dir, "tau2-airline")

    def flags(path: Path) -> list[list[tuple[int, str, str]]]:
        return [
            [(f.turn, f.finding.detector, f.action) for f in replay_one(engine, t, schema).flags] for t in load(path)
        ]

    expected = flags(source)
    assert any(expected)  # guidance flags to compare, not an empty replay
    assert flags(stored) == expected


def load_tools_of(tau_dir: Path, domain: str) -> list[dict[str, Any]]:
    return load_tools(tau_dir / "domains" / domain / "tools_openai.json")


def test_a_tool_the_record_shows_ran_is_no_unknown_tool(tau_dir: Path) -> None:
    # gpt-4o's harness had a `think` tool that the tau2 airline tools lack: given those, its 52 think calls read as
    # unknown tools (passed runs flagged 7.5% -> 22.6%). The record shows each answered without error: it ran.
    engine = Engine(load_profile(AIRLINE))
    runs = list(load(tau_dir / "trajectories" / V1))[:24]

    def flags(schema: list[dict[str, Any]]) -> list[list[tuple[int, str, str]]]:
        return [[(f.turn, f.finding.detector, f.action) for f in replay_one(engine, t, schema).flags] for t in runs]

    assert flags(load_tools_of(tau_dir, "tau2-airline")) == flags(tools(tau_dir, V1))
    assert "think" not in {t["function"]["name"] for t in load_tools_of(tau_dir, "tau2-airline")}
    assert any(c["function"]["name"] == "think" for t in runs for m in t.messages for c in m.get("tool_calls") or [])
    # A call the harness answered with an error is still an unknown tool.
    rejected: list[dict[str, Any]] = [
        {"role": "user", "content": "Hi"},
        {
            "role": "assistant",
            "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "summon", "arguments": "{}"}}],
        },
        {"role": "tool", "tool_call_id": "c1", "content": "Error: unknown tool summon"},
        {
            "role": "assistant",
            "tool_calls": [{"id": "c2", "type": "function", "function": {"name": "summon", "arguments": "{}"}}],
        },
    ]
    replayed = replay_one(engine, Trajectory(id="r", messages=rejected), tools(tau_dir, V1))
    assert [(f.turn, f.finding.detector) for f in replayed.flags if f.finding.detector == "unknown_tool"] == [
        (1, "unknown_tool"),
        (3, "unknown_tool"),
    ]
