"""From observe to enforce, end to end on real processes: redis-server, two ``fama serve`` replicas in observe mode
with Redis, one ``fama detector``, a scripted model that answers what recorded runs of the corpus answered, the
official SDK as the agent app. The runs are played as observe-mode sessions with their outcomes reported; then, from
the command line, ``fama sessions export`` -> ``fama report`` (the shadow report) -> ``fama analyze`` -> ``fama
profile push``, after which the same turns are judged per the new profile on both replicas."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx2
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from detector_service.contract.profile import Profile, load_profile, profile_sha256
from detector_service.contract.wire import Category, Finding
from detector_service.offline.evaluation import ACTING
from detector_service.offline.trajectories import Trajectory, load, load_tools
from detector_service.stakes import entry_key
from proxy.edge.auth import DEFAULT_TENANT
from tests.recorded_sessions import message_shape
from tests.servers import ROOT, detector_worker, free_port, run_fama, serve_in_thread, start_fama_serve, stop_process
from tests.servers import wait_for_port as wait_for_port
from tests.supervised_upstream import ScriptedModel
from tests.tau_turns import DOMAIN, QWEN
from tests.test_profile_reload import ADMIN, ADMIN_KEY, SWITCH_S, profile_info, profile_of, until

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


def _demoted_turn(records: dict[str, dict[str, Any]], calibrated: Profile) -> tuple[int, int]:
    """A session and turn where observe mode recorded an acting verdict whose every acting finding is of a kind the
    calibrated profile demoted (repairs of malformed calls always act, so none of those)."""
    for n in range(len(records)):
        for verdict in records[f"run-{n}"]["verdicts"]:
            acting = [Finding.model_validate(f) for f in verdict["findings"] if f.get("action") in ACTING]
            if verdict["action"] not in ACTING or any(f.category is Category.MTC for f in acting):
                continue
            entries = [calibrated.findings.get(entry_key(f)) for f in acting]
            if acting and all(e is not None and e.action not in ACTING for e in entries):
                return n, int(verdict["turn"])
    raise AssertionError("the calibration demoted no kind of finding that acted")


def _judged(base: str, session: str) -> str | None:
    """The action of the verdict observe mode recorded for the session's turn (it records in the background)."""
    answer = httpx2.get(f"{base}/admin/sessions/{DEFAULT_TENANT}/{session}", headers=ADMIN, timeout=10)
    verdicts = [e for e in answer.json()["entries"] if e["kind"] == "verdict"] if answer.status_code == 200 else []
    return str(verdicts[-1]["data"]["action"]) if verdicts else None


def test_observe_export_report_analyze_push(tau_dir: Path, redis_url: str, tmp_path: Path) -> None:
    runs = list(load(tau_dir / "trajectories" / QWEN))
    tools = load_tools(tau_dir / "domains" / DOMAIN[QWEN] / "tools_openai.json")
    recorded = RecordedModel(runs)
    ports, detector_port = [free_port(), free_port()], free_port()
    settings = {"REDIS_URL": redis_url, "MODE": "observe", "PROFILE": str(PROFILE), "ADMIN_KEY": ADMIN_KEY}
    bases = [f"http://127.0.0.1:{port}" for port in ports]
    with (
        detector_worker(redis_url, PROFILE=str(PROFILE), METRICS_PORT=str(detector_port), METRICS_HOST="127.0.0.1"),
        serve_in_thread(recorded.model.app) as upstream,
    ):
        proxies = [start_fama_serve(upstream + "/v1", port, **settings) for port in ports]
        clients = [openai.OpenAI(base_url=b + "/v1", api_key="none", max_retries=0, timeout=30) for b in bases]
        try:
            for port in ports:
                wait_for_port(port)
            # The sessions spread over both replicas, as a load balancer would.
            seen = [_play(clients[n % 2], bases[n % 2], n, run, tools) for n, run in enumerate(runs)]
            shadow = _shadow_metric(bases[0])
            for key, value in _shadow_metric(bases[1]).items():
                shadow[key] = shadow.get(key, 0.0) + value
            _export_report_analyze_push(tmp_path, redis_url, runs, tools, seen, shadow, bases, clients, detector_port)
        finally:
            for client in clients:
                client.close()
            for proxy in proxies:
                stop_process(proxy)
                if proxy.stderr is not None:
                    proxy.stderr.close()


def _export_report_analyze_push(
    tmp_path: Path,
    redis_url: str,
    runs: list[Trajectory],
    tools: list[dict[str, Any]],
    seen: list[list[dict[str, Any]]],
    shadow: dict[tuple[str, str], float],
    bases: list[str],
    clients: list[openai.OpenAI],
    detector_port: int,
) -> None:
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

    # 4. Push: the calibrated profile into force on both replicas and the detector, without a restart.
    n, at = _demoted_turn(records, calibrated)
    pushed = run_fama("profile", "push", str(new), "--url", bases[0], ADMIN_KEY=ADMIN_KEY)
    assert pushed.returncode == 0, pushed.stderr
    digest = profile_sha256(calibrated)

    def everywhere() -> bool:
        metrics = httpx2.get(f"http://127.0.0.1:{detector_port}/metrics", timeout=10).text
        detector = {h for (h, _), v in profile_info(metrics).items() if v == 1.0}
        return {profile_of(b)["sha256"] for b in bases} == {digest} and detector == {digest[:12]}

    print(f"the pushed profile in force everywhere after {until(everywhere, SWITCH_S):.3f}s")
    # The same turn, which acted under the old profile, asked again on each replica: now it only guides.
    messages = [_message(m) for m in runs[n].messages[:at]]
    for i, (client, base) in enumerate(zip(clients, bases, strict=True)):
        client.chat.completions.create(
            model="agent",
            messages=messages,  # type: ignore[arg-type]
            tools=tools,  # type: ignore[arg-type]
            user=f"{n}|{at}",
            extra_headers={"x-fama-session": f"again-{i}"},
        )
        until(lambda base=base, i=i: _judged(base, f"again-{i}") is not None, 10)  # type: ignore[misc]
        assert _judged(base, f"again-{i}") not in ACTING
