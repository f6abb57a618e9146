"""``fama eval tau2`` on real tau2 airline episodes with scripted agent and user models over HTTP: tau2's own
evaluator scores them, and the report must count what enforce mode rescued and what it broke."""

from __future__ import annotations

import importlib.util
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import httpx2
import orjson
import pytest

from proxy.bench.processes import fama, free_port, service_env, wait_for_port
from proxy.eval_tau2.runner import EvalOptions, eval_tau2_command
from proxy.eval_tau2.tau2_env import INSTALL_HINT
from tests.servers import serve_in_thread, start_fama_serve, stop_process
from tests.supervised_upstream import ScriptedModel
from tests.tau2_scripted import agent_reply, user_reply

pytestmark = [
    pytest.mark.skipif(importlib.util.find_spec("tau2") is None, reason=INSTALL_HINT),
    # Two episodes starting at once against one endpoint each make a LiteLLM client; LiteLLM caches one and drops
    # the other unclosed, so the garbage collector closes its connection later, with a warning.
    pytest.mark.filterwarnings("ignore:unclosed <socket.socket:ResourceWarning"),
    pytest.mark.filterwarnings("ignore:Exception ignored in. <socket.socket:pytest.PytestUnraisableExceptionWarning"),
]

# Task 9: cancel IFOYYZ (basic economy, no insurance: not cancellable) and NQNU5R (business); tau2's ground truth
# cancels NQNU5R only. Task 5: a complaint about a delay; the ground truth writes nothing.
CANCEL_TASK = "9"
COMPLAINT_TASK = "5"


def _report(out: Path) -> dict[str, Any]:
    report: dict[str, Any] = orjson.loads((out / "report.json").read_bytes())
    return report


def test_enforce_rescues_the_careless_cancellation_and_breaks_nothing(tmp_path: Path) -> None:
    agent, user = ScriptedModel(agent_reply), ScriptedModel(user_reply)
    out = tmp_path / "run"
    with serve_in_thread(agent.app) as agent_url, serve_in_thread(user.app) as user_url:
        options = EvalOptions(
            upstream_url=f"{agent_url}/v1",
            model="scripted-agent",
            user_url=f"{user_url}/v1",
            user_model="scripted-user",
            domain="airline",
            out=out,
            task_ids=(CANCEL_TASK, COMPLAINT_TASK),
            concurrency=2,
        )
        assert eval_tau2_command(options) == 0
    report = _report(out)
    # tau2's evaluator: the careless agent cancels both reservations (direct, and observe, where the correction
    # only arrives after the write); under enforce the write is held, the agent looks up and asks, and cancels only
    # NQNU5R. The complaint passes everywhere.
    assert report["per_task"] == {
        CANCEL_TASK: {"direct": "F", "observe": "F", "enforce": "P"},
        COMPLAINT_TASK: {"direct": "P", "observe": "P", "enforce": "P"},
    }
    enforce = report["comparisons"]["enforce"]
    assert (enforce["pairs"], enforce["rescued"], enforce["broken"]) == (2, 1, 0)
    assert {t["task_id"]: (t["rescued"], t["broken"]) for t in enforce["per_task"]} == {
        CANCEL_TASK: (1, 0),
        COMPLAINT_TASK: (0, 0),
    }
    assert (enforce["p"], enforce["r"], enforce["d"]) == (0.5, 1.0, 0.0)
    assert enforce["rule_p_gt_threshold"] is True
    # Two tasks cannot tell: a resample drawing the complaint twice gains nothing.
    assert enforce["net_gain"] == 0.5
    assert enforce["net_gain_interval_95"] == [0.0, 1.0]
    assert enforce["verdict"].startswith("inconclusive: p > d/(r+d)")
    observe = report["comparisons"]["observe"]
    assert (observe["rescued"], observe["broken"]) == (0, 0)
    # What the proxy did, read from its session records, and the outcomes it was told.
    summary = report["arms_summary"]
    assert summary["enforce"]["interventions"].get("retry:DCV", 0) >= 1
    assert summary["observe"]["interventions"] == {} or all(
        not k.startswith("retry") for k in summary["observe"]["interventions"]
    )
    assert summary["enforce"]["outcomes_reported"] == 2
    assert summary["enforce"]["outcome_errors"] == []
    assert summary["enforce"]["sessions_intervened"] == 1
    assert summary["direct"]["pass_hat_k"] == {"1": 0.5}
    assert summary["enforce"]["pass_hat_k"] == {"1": 1.0}
    assert summary["direct"]["avg_turns"] > 0
    assert summary["direct"]["prompt_tokens"] > 0
    # The user simulator talked to its own model server only, never through the proxies (whose upstream is the
    # agent's model server).
    assert user.bodies()
    assert {b["model"] for b in agent.bodies()} == {"scripted-agent"}
    assert "| enforce | 2 | 100% |" in (out / "report.md").read_text()
    assert (out / "report.png").read_bytes().startswith(b"\x89PNG")
    # The trajectories are tau2 results files that `fama replay` reads, one record per episode.
    trajectories = out / "trajectories"
    enforce_results = orjson.loads((trajectories / "enforce.json").read_bytes())
    assert {s["task_id"]: s["reward_info"]["reward"] for s in enforce_results["simulations"]} == {
        CANCEL_TASK: 1.0,
        COMPLAINT_TASK: 1.0,
    }
    replayed = tmp_path / "replayed.json"
    done = subprocess.run(
        fama(
            "replay",
            str(trajectories / "direct.json"),
            "--tools",
            str(trajectories / "tools.json"),
            "--json",
            str(replayed),
        ),
        env=service_env(),
        capture_output=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr.decode()[-2000:]
    records = orjson.loads(replayed.read_bytes())["records"]
    assert {r["reward"] for r in records} == {0.0, 1.0}
    # The careless cancellation the direct arm let through is flagged on replay.
    flagged = {str(r["id"]): r["flags"] for r in records}
    assert any(f["category"] == "DCV" for flags in flagged.values() for f in flags)


def test_a_running_proxy_counts_the_outcomes_and_a_rerun_resumes(tmp_path: Path) -> None:
    agent, user = ScriptedModel(agent_reply), ScriptedModel(user_reply)
    out = tmp_path / "run"
    with serve_in_thread(agent.app) as agent_url, serve_in_thread(user.app) as user_url:
        port = free_port()
        proxy = start_fama_serve(f"{agent_url}/v1", port, MODE="enforce", ADMIN_KEY="admin-secret-key-1234")
        try:
            wait_for_port(port)
            options = EvalOptions(
                upstream_url=f"{agent_url}/v1",
                model="scripted-agent",
                user_url=f"{user_url}/v1",
                user_model="scripted-user",
                domain="airline",
                out=out,
                task_ids=(CANCEL_TASK,),
                arms=("direct", "enforce"),
                proxy_url=f"http://127.0.0.1:{port}/v1",
                admin_key="admin-secret-key-1234",
            )
            assert eval_tau2_command(options) == 0
            metrics = httpx2.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
            requests_before = len(agent.bodies())
            # The same --out again: nothing left to run, the same report.
            assert eval_tau2_command(options) == 0
            assert len(agent.bodies()) == requests_before
        finally:
            stop_process(proxy)
            if proxy.stderr:
                proxy.stderr.close()
    assert 'fama_session_outcomes_total{intervened="yes",outcome="success"} 1.0' in metrics
    report = _report(out)
    assert report["comparisons"]["enforce"]["rescued"] == 1
    assert report["arms_summary"]["enforce"]["interventions"].get("retry:DCV", 0) >= 1
    lines = (out / "episodes.jsonl").read_bytes().splitlines()
    assert len(lines) == 2


def test_ctrl_c_writes_what_finished_and_the_same_out_resumes(tmp_path: Path) -> None:
    agent, user = ScriptedModel(agent_reply), ScriptedModel(user_reply)
    out = tmp_path / "run"
    with serve_in_thread(agent.app) as agent_url, serve_in_thread(user.app) as user_url:
        args = [
            *("eval", "tau2", "--upstream-url", f"{agent_url}/v1", "--model", "scripted-agent"),
            *("--user-url", f"{user_url}/v1", "--user-model", "scripted-user", "--out", str(out)),
            *("--task-ids", CANCEL_TASK, "--task-ids", COMPLAINT_TASK, "--arms", "direct,enforce"),
        ]
        first = subprocess.Popen(fama(*args), env=service_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        episodes = out / "episodes.jsonl"
        deadline = time.monotonic() + 240
        while not (episodes.exists() and episodes.read_bytes().count(b"\n") >= 1):
            assert first.poll() is None, first.communicate()[1].decode()[-2000:]
            assert time.monotonic() < deadline
            time.sleep(0.05)
        first.send_signal(signal.SIGINT)
        _, err = first.communicate(timeout=120)
        assert first.returncode == 130, err.decode()[-2000:]
        finished = episodes.read_bytes().count(b"\n")
        assert 1 <= finished < 4
        assert (
            _report(out)["arms_summary"]["direct"]["episodes"] + _report(out)["arms_summary"]["enforce"]["episodes"]
            == finished
        )
        second = subprocess.run(fama(*args), env=service_env(), capture_output=True, timeout=600, check=False)
        assert second.returncode == 0, second.stderr.decode()[-2000:]
    assert f"resuming {out}: {4 - finished} episodes left" in second.stderr.decode()
    assert episodes.read_bytes().count(b"\n") == 4
    assert _report(out)["comparisons"]["enforce"]["rescued"] == 1
