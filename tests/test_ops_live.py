"""Every dashboard panel query, run against a real Prometheus scraping the real services.

``fama serve`` and ``fama detector`` run as processes (the commands the containers run) with a real
redis-server and a scripted upstream; Debian's ``prometheus`` scrapes them on loopback every second.
Traffic covers plain and streamed chat, tool turns with a valid and an unknown tool, an upstream error, a
paused detector (deadline misses, late verdicts, lag), poison and abandoned stream entries (dead letters,
reclaims) and finally a Redis outage (Redis errors on both sides). Then each panel's queries must return data.
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

import openai
import orjson
import pytest
import redis
import yaml
from openai.types.chat import ChatCompletionFunctionToolParam

from detector_service.bus import keys
from tests.ops_artifacts import ALERTS, ROOT, compose_config, dashboard_queries, scripts_binary
from tests.scripted_upstream import ScriptedUpstream
from tests.servers import RedisServer, free_port, serve_in_thread, stop_process, wait_for_port

pytestmark = [
    pytest.mark.ops,
    pytest.mark.redis,
    pytest.mark.skipif(
        shutil.which("prometheus") is None, reason="prometheus is not installed (apt-get install prometheus)"
    ),
    pytest.mark.skipif(shutil.which("redis-server") is None, reason="redis-server is not installed"),
    pytest.mark.skipif(scripts_binary("fama") is None, reason="the fama command is not installed (pip install -e .)"),
]

# Panels whose metric nothing in the running system can emit yet, with the reason. Strict xfail: once the
# feature lands the query returns data and the entry must go.
NOT_YET_EMITTED: dict[str, str] = {}

PROFILE = {"version": 1, "name": "live", "mode": "enforce", "agents": ["Verifier", "Memory"], "deadline_ms": 300}
WEATHER_TOOL: ChatCompletionFunctionToolParam = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather for a city.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
ORDER_TOOL: ChatCompletionFunctionToolParam = {
    "type": "function",
    "function": {
        "name": "lookup_order",
        "description": "Look an order up by id.",
        "parameters": {"type": "object", "properties": {"order_id": {"type": "string"}}, "required": ["order_id"]},
    },
}


class Process:
    """A service process with its output kept in a file (shown when a check fails)."""

    def __init__(self, name: str, cmd: list[str], env: dict[str, str], workdir: Path) -> None:
        self.name = name
        self.log = workdir / f"{name}.log"
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, cwd=workdir)

    def output(self) -> str:
        return self.log.read_text(errors="replace")[-4000:]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)  # in case a test paused it
            stop_process(self.proc, timeout=30)


def _status(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            status: int = response.status
            return status
    except urllib.error.HTTPError as exc:
        return exc.code


def _probe_statuses(proxy_port: int, detector_port: int) -> dict[str, int]:
    return {
        f"{service} {path}": _status(f"http://127.0.0.1:{port}{path}")
        for service, port in (("proxy", proxy_port), ("detector", detector_port))
        for path in ("/healthz", "/readyz")
    }


def _get(url: str, timeout: float = 2.0) -> bytes:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        body: bytes = response.read()
        return body


def _wait(what: str, check: Callable[[], bool], processes: list[Process], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError, ValueError, KeyError):
            if check():
                return
        for p in processes:
            if p.proc.poll() is not None:
                raise AssertionError(f"{p.name} exited with {p.proc.returncode} waiting for {what}:\n{p.output()}")
        time.sleep(0.1)
    logs = "\n".join(f"--- {p.name}\n{p.output()}" for p in processes)
    raise AssertionError(f"timed out waiting for {what}\n{logs}")


class Prometheus:
    def __init__(self, url: str) -> None:
        self.url = url
        # HTTP status of each service's probe endpoints, before and during the Redis outage.
        self.probes: dict[str, dict[str, int]] = {}
        self.ports: dict[str, int] = {}

    def query(self, expr: str) -> list[dict[str, Any]]:
        body = orjson.loads(_get(f"{self.url}/api/v1/query?{urllib.parse.urlencode({'query': expr})}", timeout=10))
        assert body["status"] == "success", body
        result: list[dict[str, Any]] = body["data"]["result"]
        return result

    def scraped_since(self, since: float, jobs: tuple[str, ...] = ("fama-proxy", "fama-detector")) -> bool:
        """Every job in ``jobs`` was scraped successfully after ``since`` (unix time)."""
        selector = f'up{{job=~"{"|".join(jobs)}"}}'
        scraped = self.query(f"min(timestamp({selector}))")
        healthy = self.query(f"count({selector} == 1)")
        return (
            bool(scraped and healthy)
            and float(scraped[0]["value"][1]) > since
            and int(healthy[0]["value"][1]) == len(jobs)
        )


def _prometheus_config(proxy_port: int, detector_port: int) -> dict[str, Any]:
    return {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(ALERTS)],
        "scrape_configs": [
            {"job_name": "fama-proxy", "static_configs": [{"targets": [f"127.0.0.1:{proxy_port}"]}]},
            {"job_name": "fama-detector", "static_configs": [{"targets": [f"127.0.0.1:{detector_port}"]}]},
        ],
    }


def _service_env(**fama: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FAMA_")}
    # The fama script imports this checkout, whichever checkout the installed package points at.
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])
    env.update(fama)
    return env


def _chat_turns(client: openai.OpenAI) -> None:
    """One round of ordinary traffic: plain, streamed, and tool turns (a valid and an unknown tool)."""
    messages: list[Any] = [{"role": "user", "content": "What is the weather in Paris?"}]
    client.chat.completions.create(model="openai:text", messages=messages)
    for chunk in client.chat.completions.create(model="openai:text", messages=messages, stream=True):
        assert chunk.object == "chat.completion.chunk"
    client.chat.completions.create(model="openai:tool", messages=messages, tools=[WEATHER_TOOL])
    for _ in client.chat.completions.create(model="openai:tool", messages=messages, tools=[WEATHER_TOOL], stream=True):
        pass
    # The model calls get_weather, which this request does not declare: a malformed tool call.
    order: list[Any] = [{"role": "user", "content": "Where is my order 12345?"}]
    client.chat.completions.create(model="openai:tool", messages=order, tools=[ORDER_TOOL])
    with pytest.raises(openai.InternalServerError):
        client.chat.completions.create(model="openai:error-500", messages=messages)


def _report_outcomes(client: openai.OpenAI, proxy_port: int) -> None:
    """Two sessions, one the proxy corrects (an undeclared tool) and one it passes, report how they ended."""
    weather: list[Any] = [{"role": "user", "content": "What is the weather in Paris?"}]
    order: list[Any] = [{"role": "user", "content": "Where is my order 12345?"}]
    intervened: dict[str, bool] = {}
    for session, messages, tool in (("live-corrected", order, ORDER_TOOL), ("live-clean", weather, WEATHER_TOOL)):
        raw = client.chat.completions.with_raw_response.create(
            model="openai:tool", messages=messages, tools=[tool], extra_headers={"x-fama-session": session}
        )
        intervened[session] = "x-fama-intervention" in raw.headers
    assert intervened == {"live-corrected": True, "live-clean": False}
    for session, outcome in (("live-corrected", "success"), ("live-clean", "failure")):
        request = urllib.request.Request(
            f"http://127.0.0.1:{proxy_port}/v1/fama/sessions/{session}/outcome",
            data=orjson.dumps({"outcome": outcome}),
            headers={"content-type": "application/json", "authorization": "Bearer client-key"},
            method="POST",
        )
        with urllib.request.urlopen(request, timeout=5) as response:
            assert orjson.loads(response.read())["intervened"] is intervened[session]


def _poison_and_abandon(redis_url: str) -> None:
    """A poison entry (dead letter) and one read by a consumer that died (reclaimed, then dead-lettered)."""
    r = redis.Redis.from_url(redis_url)
    try:
        r.xadd(keys.TURNS_STREAM, {"data": "not json"})
        r.xadd(keys.TURNS_STREAM, {"data": orjson.dumps({"v": 999}).decode()})
        r.xreadgroup(keys.DETECTOR_GROUP, "consumer-that-died", {keys.TURNS_STREAM: ">"}, count=1)
    finally:
        r.close()


@pytest.fixture(scope="module")
def prometheus() -> Iterator[Prometheus]:
    workdir = Path(tempfile.mkdtemp(prefix="fama-live-"))
    fama = scripts_binary("fama")
    binary = shutil.which("prometheus")
    assert fama is not None
    assert binary is not None
    profile = workdir / "profile.yaml"
    profile.write_text(yaml.safe_dump(PROFILE))
    redis_server = RedisServer()
    processes: list[Process] = []
    upstream = ScriptedUpstream()
    try:
        with serve_in_thread(upstream.app) as upstream_url:
            proxy_port, detector_port, prometheus_port = free_port(), free_port(), free_port()
            common = {"FAMA_REDIS_URL": redis_server.url, "FAMA_PROFILE": str(profile), "FAMA_LOG_LEVEL": "warning"}
            proxy = Process(
                "proxy",
                [str(fama), "serve"],
                _service_env(
                    **common,
                    FAMA_HOST="127.0.0.1",
                    FAMA_PORT=str(proxy_port),
                    FAMA_UPSTREAM_URL=f"{upstream_url}/v1",
                    FAMA_MODE="enforce",
                ),
                workdir,
            )
            detector = Process(
                "detector",
                [str(fama), "detector"],
                _service_env(
                    **common,
                    FAMA_METRICS_HOST="127.0.0.1",
                    FAMA_METRICS_PORT=str(detector_port),
                    FAMA_CLAIM_IDLE_MS="100",
                    FAMA_MAX_DELIVERIES="2",
                    FAMA_BLOCK_MS="100",
                ),
                workdir,
            )
            processes += [proxy, detector]
            config = workdir / "prometheus.yml"
            config.write_text(yaml.safe_dump(_prometheus_config(proxy_port, detector_port)))
            processes.append(
                Process(
                    "prometheus",
                    [
                        binary,
                        f"--config.file={config}",
                        f"--storage.tsdb.path={workdir / 'tsdb'}",
                        f"--web.listen-address=127.0.0.1:{prometheus_port}",
                        "--log.level=warn",
                    ],
                    _service_env(),
                    workdir,
                )
            )
            wait_for_port(proxy_port, timeout=30)
            _wait("proxy /healthz", lambda: _get(f"http://127.0.0.1:{proxy_port}/healthz") != b"", processes)
            _wait("detector /readyz", lambda: _get(f"http://127.0.0.1:{detector_port}/readyz") != b"", processes)
            prom = Prometheus(f"http://127.0.0.1:{prometheus_port}")
            _wait("prometheus ready", lambda: _get(f"{prom.url}/-/ready") != b"", processes)
            _wait("first scrapes", lambda: prom.scraped_since(0), processes)
            prom.ports = {"proxy": proxy_port, "detector": detector_port}
            prom.probes["up"] = _probe_statuses(proxy_port, detector_port)

            client = openai.OpenAI(base_url=f"http://127.0.0.1:{proxy_port}/v1", api_key="client-key", max_retries=0)
            # Twice, with a scrape in between, so rate() and histogram_quantile() see an increase.
            for _ in range(2):
                _chat_turns(client)
                mark = time.time()
                _wait("a scrape after traffic", partial(prom.scraped_since, mark), processes)
            _report_outcomes(client, proxy_port)

            # A paused detector: turns wait past the deadline (degraded, fail-open), the stream lags,
            # and the verdicts that arrive after it resumes are late.
            detector.proc.send_signal(signal.SIGSTOP)
            try:
                messages: list[Any] = [{"role": "user", "content": "Weather in Paris?"}]
                # A scrape after each turn: counters born during this phase must also grow after their
                # first sample, or rate() (and the ratio alerts) would see no increase.
                for _ in range(2):
                    client.chat.completions.create(model="openai:tool", messages=messages, tools=[WEATHER_TOOL])
                    mark = time.time()
                    _wait(
                        "a scrape while the detector is paused",
                        partial(prom.scraped_since, mark, ("fama-proxy",)),
                        [proxy],
                    )
            finally:
                detector.proc.send_signal(signal.SIGCONT)
            _poison_and_abandon(redis_server.url)
            mark = time.time()
            time.sleep(1.0)  # reclaim after claim_idle_ms, then the dead letters
            _wait("a scrape after the stream faults", partial(prom.scraped_since, mark), processes)

            # Redis goes away: both sides count Redis errors; the proxy still answers (fail-open).
            redis_server.stop()
            client.chat.completions.create(model="openai:tool", messages=messages, tools=[WEATHER_TOOL])
            prom.probes["redis down"] = _probe_statuses(proxy_port, detector_port)
            time.sleep(1.0)
            mark = time.time()
            _wait("a scrape after the Redis outage", partial(prom.scraped_since, mark), processes)
            yield prom
    finally:
        for p in reversed(processes):
            p.stop()
        with contextlib.suppress(Exception):
            redis_server.stop()
        shutil.rmtree(workdir, ignore_errors=True)


def _params() -> list[Any]:
    params = []
    for title, expr in dashboard_queries():
        marks = [pytest.mark.xfail(strict=True, reason=NOT_YET_EMITTED[title])] if title in NOT_YET_EMITTED else []
        params.append(pytest.param(expr, id=f"{title} | {expr[:60]}", marks=marks))
    return params


@pytest.mark.parametrize("expr", _params())
def test_dashboard_query_returns_data(prometheus: Prometheus, expr: str) -> None:
    result = prometheus.query(expr)
    assert result, f"no data for: {expr}"
    values = [float(series["value"][1]) for series in result]
    assert any(math.isfinite(v) for v in values), f"only NaN/Inf for: {expr} -> {values}"


def test_alert_rules_evaluate_cleanly_on_live_data(prometheus: Prometheus) -> None:
    body = orjson.loads(_get(f"{prometheus.url}/api/v1/rules", timeout=10))
    rules = [rule for group in body["data"]["groups"] for rule in group["rules"]]
    expected = [rule["alert"] for group in yaml.safe_load(ALERTS.read_text())["groups"] for rule in group["rules"]]
    assert sorted(rule["name"] for rule in rules) == sorted(expected)
    assert all(rule["health"] == "ok" for rule in rules), [r for r in rules if r["health"] != "ok"]


def test_alerts_react_to_the_faults(prometheus: Prometheus) -> None:
    body = orjson.loads(_get(f"{prometheus.url}/api/v1/alerts", timeout=10))
    states = {alert["labels"]["alertname"]: alert["state"] for alert in body["data"]["alerts"]}
    # Dead letters alert at once; the ratio alerts wait out their `for` (5m) as pending.
    assert states.get("FamaDeadLetters") == "firing", states
    for name in ("FamaUpstreamErrors", "FamaDegradedRateHigh", "FamaVerdictDeadlineMisses"):
        assert states.get(name) == "pending", states
    assert "FamaProxyDown" not in states


def test_probes_follow_what_each_service_needs(prometheus: Prometheus) -> None:
    assert prometheus.probes["up"] == dict.fromkeys(prometheus.probes["up"], 200)
    # A Redis outage makes the detector unready (no work can reach it) but restarts nothing, and the proxy
    # stays ready: it serves fail-open without Redis.
    assert prometheus.probes["redis down"] == {
        "proxy /healthz": 200,
        "proxy /readyz": 200,
        "detector /healthz": 200,
        "detector /readyz": 503,
    }


def test_compose_healthchecks_pass_against_the_running_services(prometheus: Prometheus) -> None:
    services = compose_config("gpu")["services"]
    for name, container_port in (("proxy", 8080), ("detector", 9100)):
        test = services[name]["healthcheck"]["test"]
        assert test[:2] == ["CMD", "python"]
        address = f"127.0.0.1:{container_port}"
        assert address in " ".join(test), f"{name} healthcheck does not probe {address}"
        probe = [arg.replace(address, f"127.0.0.1:{prometheus.ports[name]}") for arg in test[2:]]
        assert subprocess.run([sys.executable, *probe], timeout=30, check=False).returncode == 0, name
