"""``fama eval tau2`` refuses what it cannot run, before it starts anything, and says how to install tau2."""

from __future__ import annotations

import importlib.util
import subprocess
from pathlib import Path

import pytest

from proxy.bench.processes import fama, service_env


def _eval(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    base = ["eval", "tau2", "--upstream-url", "http://127.0.0.1:9/v1", "--model", "m", "--out", str(tmp_path / "o")]
    return subprocess.run(
        fama(*base, *args), env=service_env(COLUMNS="200"), capture_output=True, text=True, timeout=120, check=False
    )


def test_unknown_arms_and_two_supervised_arms_on_one_running_proxy_are_refused(tmp_path: Path) -> None:
    done = _eval(tmp_path, "--arms", "direct,guarded")
    assert done.returncode == 2
    assert "--arms: guarded" in done.stderr
    done = _eval(tmp_path, "--proxy-url", "http://127.0.0.1:9/v1")
    assert done.returncode == 2
    assert "a running proxy has one mode" in done.stderr
    assert not (tmp_path / "o").exists()


@pytest.mark.skipif(importlib.util.find_spec("tau2") is not None, reason="tau2 is installed here")
def test_without_tau2_it_says_how_to_install_it(tmp_path: Path) -> None:
    done = _eval(tmp_path, "--tasks", "1")
    assert done.returncode == 2
    assert "pip install -e '.[eval]'" in done.stderr


def test_the_model_server_is_named_or_the_bundled_one_is_asked_for(tmp_path: Path) -> None:
    def run(*args: str) -> subprocess.CompletedProcess[str]:
        cmd = fama("eval", "tau2", "--out", str(tmp_path / "o"), *args)
        return subprocess.run(cmd, env=service_env(COLUMNS="200"), capture_output=True, text=True, timeout=120)

    for args in ((), ("--local-model", "--model", "m"), ("--model", "m")):
        done = run(*args)
        assert done.returncode == 2, args
        assert "--upstream-url" in done.stderr, args
    assert not (tmp_path / "o").exists()
