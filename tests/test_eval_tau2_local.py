"""``fama eval tau2 --local-model`` end to end, one command with the bundled model as the agent: 2 airline tasks x
1 trial x 3 arms. Whatever a 135M model scores (tasks whose ground truth writes
nothing pass when it does nothing), the test is that the harness runs every episode, reports, and writes what it
promises. The user simulator is the scripted one of tests/tau2_scripted.py over HTTP: on two shared CPU cores every
call of the local model re-reads a 2000-token prompt, and the agent's calls alone share one prefix."""

from __future__ import annotations

import importlib.util
import subprocess
from pathlib import Path

import orjson
import pytest

from proxy.bench.processes import fama, service_env
from proxy.eval_tau2.tau2_env import INSTALL_HINT
from tests.servers import serve_in_thread
from tests.supervised_upstream import ScriptedModel
from tests.tau2_scripted import user_reply

pytestmark = [
    pytest.mark.llama,
    pytest.mark.skipif(importlib.util.find_spec("tau2") is None, reason=INSTALL_HINT),
    # See tests/test_eval_tau2.py: LiteLLM drops a client unclosed when two episodes start at once.
    pytest.mark.filterwarnings("ignore:unclosed <socket.socket:ResourceWarning"),
    pytest.mark.filterwarnings("ignore:Exception ignored in. <socket.socket:pytest.PytestUnraisableExceptionWarning"),
]


@pytest.mark.timeout(1800)
def test_two_tasks_one_trial_three_arms_on_the_bundled_model(tmp_path: Path) -> None:
    out = tmp_path / "run"
    user = ScriptedModel(user_reply)
    with serve_in_thread(user.app) as user_url:
        args = ["eval", "tau2", "--local-model", "--user-url", f"{user_url}/v1", "--user-model", "scripted-user"]
        args += ["--domain", "airline", "--tasks", "2", "--max-steps", "8", "--out", str(out)]
        done = subprocess.run(fama(*args), env=service_env(), capture_output=True, text=True, timeout=1700)
        assert done.returncode == 0, done.stderr[-3000:]
    report = orjson.loads((out / "report.json").read_bytes())
    arms = ("direct", "observe", "enforce")
    assert {arm: report["arms_summary"][arm]["episodes"] for arm in arms} == dict.fromkeys(arms, 2)
    assert len(report["per_task"]) == 2
    assert all(len(by_arm) == 3 for by_arm in report["per_task"].values())
    for arm in ("observe", "enforce"):
        comparison = report["comparisons"][arm]
        assert comparison["pairs"] == 2
        assert comparison["rescued"] + comparison["broken"] <= 2
        # Each supervised episode's outcome reached the proxy, or the report says why not.
        summary = report["arms_summary"][arm]
        assert summary["outcomes_reported"] + len(summary["outcome_errors"]) == 2
    for arm in arms:
        results = orjson.loads((out / "trajectories" / f"{arm}.json").read_bytes())
        errors = report["arms_summary"][arm]["errors"]
        assert len(results["simulations"]) + len(errors) == 2
    assert (out / "report.md").read_text().startswith("## fama eval tau2: airline")
    assert (out / "report.png").stat().st_size > 0
