"""From observe to enforce, end to end on real processes: redis-server, ``fama serve`` in observe mode with Redis, one
``fama detector``, a scripted model that answers what recorded runs of the corpus answered, the official SDK as the
agent app. The runs are played as observe-mode sessions with their outcomes reported; then, from the command line,
``fama sessions export`` -> ``fama report`` (the shadow report) -> ``fama analyze``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx2
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from detector_service.contract.profile import load_profile
from detector_service.offline.trajectories import Trajectory, load, load_tools
from tests.recorded_sessions import message_shape
from tests.servers import ROOT, detector_worker, free_port, run_fama, serve_in_thread, start_fama_serve, stop_process
from tests.servers import wait_for_port as wait_for_port
from tests.supervised_upstream import ScriptedModel
from tests.tau_turns import DOMAIN, QWEN

pytestmark = [pytest.mark.redis, pytest.mark.tau]

PROFILE = ROOT / "profiles" / "airline.yaml"
MESSAGE_FIELDS = ("role", "content", "tool_calls", "tool_call_id")


def _message(m: dict[str, Any]) -> dict[str, Any]:
    return {k: m[k] for k in MESSAGE_FIELDS if m.get(k) is not None}


class RecordedModel:
    """Answers each request with the assistant message a recorded run gave at that point (named in ``user``)."""

    def __init__(self, runs: list[Trajectory]) -> None:
        self.runs = runs
        self.model = ScriptedModel(self.reply)

    def reply(self, body: dict[str, Any]) -> dict[str, Any]:
        run, at = (int(part) for part in str(body["user"]).split("|"))
        recorded = self.runs[run].messages[at]
        return {k: v for k, v in _message(recorded).items() if k != "role"}


def _play(
    client: openai.OpenAI, base: str, n: int, run: Trajectory, tools: list[dict[str, Any]]
) -> list[dict[str, Any]]:
    """The run as one session: each assistant turn asked for, then its outcome reported. The conversation as the
    agent saw it: the proxy hands tool calls a model wrote as text over as ``tool_calls``, otherwise changes nothing."""
    session = f"run-{n}"
    messages = [_message(m) for m in run.messages]
    seen: list[dict[str, Any]] = []
    for at, message in enumerate(messages):
        if message["role"] != "assistant":
            seen.append(message)
            continue
        answer = client.chat.completions.create(
            model="agent",
            messages=messages[:at],  # type: ignore[arg-type]
            tools=tools,  # type: ignore[arg-type]
            user=f"{n}|{at}",
            extra_headers={"x-fama-session": session},
        )
        seen.append(answer.choices[0].message.model_dump(exclude_none=True))
    assert run.reward is not None
    outcome = {"outcome": "success" if run.reward >= 1.0 else "failure", "reward": run.reward}
    reported = httpx2.post(f"{base}/v1/fama/sessions/{session}/outcome", json=outcome, timeout=10)
    assert reported.status_code == 200, reported.text
    last = max(i for i, m in enumerate(seen) if m["role"] == "assistant")
    return seen[: last + 1]


def _shadow_metric(base: str) -> dict[tuple[str, str], float]:
    text = httpx2.get(f"{base}/metrics", timeout=10).text
    return {
        (s.labels["outcome"], s.labels["would_act"]): s.value
        for family in text_string_to_metric_families(text)
        if family.name == "fama_shadow_outcomes"
        for s in family.samples
        if s.name == "fama_shadow_outcomes_total"
    }


def test_observe_export_report_analyze(tau_dir: Path, redis_url: str, tmp_path: Path) -> None:
    runs = list(load(tau_dir / "trajectories" / QWEN))
    tools = load_tools(tau_dir / "domains" / DOMAIN[QWEN] / "tools_openai.json")
    recorded = RecordedModel(runs)
    port = free_port()
    settings = {"REDIS_URL": redis_url, "MODE": "observe", "PROFILE": str(PROFILE)}
    with detector_worker(redis_url, PROFILE=str(PROFILE)), serve_in_thread(recorded.model.app) as upstream:
        proxy = start_fama_serve(upstream + "/v1", port, **settings)
        try:
            wait_for_port(port)
            base = f"http://127.0.0.1:{port}"
            with openai.OpenAI(base_url=base + "/v1", api_key="none", max_retries=0, timeout=30) as client:
                seen = [_play(client, base, n, run, tools) for n, run in enumerate(runs)]
            shadow = _shadow_metric(base)
        finally:
            stop_process(proxy)
            if proxy.stderr is not None:
                proxy.stderr.close()
    failed = sum(1 for r in runs if r.reward is not None and r.reward < 1.0)
    passed = len(runs) - failed
    assert sum(v for (o, _), v in shadow.items() if o == "failure") == failed
    assert sum(v for (o, _), v in shadow.items() if o == "success") == passed

    # 1. Export: every session, its conversation as the agent saw it, its outcome, what the detector said.
    export = tmp_path / "sessions.jsonl"
    done = run_fama("sessions", "export", "--redis-url", redis_url, "--last", "1d", "--out", str(export))
    assert done.returncode == 0, done.stderr
    records = {r["session_id"]: r for r in map(json.loads, export.read_text().splitlines())}
    assert len(records) == len(runs)
    for n, run in enumerate(runs):
        record = records[f"run-{n}"]
        assert [message_shape(m) for m in record["messages"]] == [message_shape(m) for m in seen[n]]
        assert record["reward"] == run.reward
        assert record["tools"] == tools
        assert len(record["verdicts"]) == sum(1 for m in run.messages if m["role"] == "assistant")

    # 2. The shadow report: what enforce mode would act on, as observe mode recorded it and as a replay finds it.
    report_json = tmp_path / "report.json"
    done = run_fama("report", str(export), "--profile", str(PROFILE), "--json", str(report_json))
    assert done.returncode == 0, done.stderr
    print(f"\n{done.stdout}")
    report = json.loads(report_json.read_text())
    assert report["sessions"]["failed"] == failed
    assert report["sessions"]["succeeded"] == passed
    assert report["sessions"]["recorded_profiles"] == ["airline"]
    live, replayed = report["sources"]["recorded"], report["sources"]["current"]
    assert (live["failed_acted"], live["succeeded_acted"]) == (replayed["failed_acted"], replayed["succeeded_acted"])
    assert live["failed_acted"] > 0
    # The live panel counts the same sessions as the report's recorded column.
    assert shadow[("failure", "yes")] == live["failed_acted"]
    assert shadow[("success", "yes")] == live["succeeded_acted"]

    # 3. Analyze: a profile calibrated on this traffic, then compared with the one in force.
    new = tmp_path / "new.yaml"
    done = run_fama("analyze", str(export), "--profile", str(PROFILE), "--out", str(new))
    assert done.returncode == 0, done.stderr
    calibrated = load_profile(new)
    assert calibrated.calibration is not None
    assert (calibrated.calibration.failed, calibrated.calibration.passed) == (failed, passed)
    compared = tmp_path / "compared.json"
    done = run_fama("report", str(export), "--profile", str(PROFILE), "--candidate", str(new), "--json", str(compared))
    assert done.returncode == 0, done.stderr
    print(done.stdout)
    candidate = json.loads(compared.read_text())["sources"]["candidate"]
    assert candidate["succeeded_acted"] <= replayed["succeeded_acted"]

    # 4. Reload: pushing the new profile to the running replicas (POST /admin/profile, fama profile push) and
    #    checking that the same kinds of turns are then handled per it belongs here once reload exists.
