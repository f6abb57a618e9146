"""``fama bench``: what the proxy adds, measured against the direct call in the same run.

Three processes on loopback: a canned upstream (:mod:`proxy.bench.canned_upstream`), the proxy (``fama serve``
as a subprocess) and this client. Each series runs direct and through the proxy in alternating blocks,
so drift on a shared machine hits both sides alike. Results are ratios and differences, never absolute
claims about the hardware.

Series:
- ``latency``: non-streaming text turns at concurrency 1 (p50/p99 added milliseconds).
- ``ttft``: streaming, time to the first content chunk at concurrency 1.
- ``throughput``: requests/s at the given concurrency, proxy/direct ratio.
- ``enforce_tool_call`` (when ``redis-server`` is installed): a tool-call turn in enforce mode with a
  detector worker over Redis, added p50.
- ``enforce_ttft`` (same proxy): a streamed turn that declares tools and is answered with text, time to the first
  content chunk: what supervision costs a plain-text answer's first token (its text is never held).

Every series also reports the proxy process's CPU milliseconds per proxied request (from
``/proc/<pid>/stat``): on a shared, loaded machine wall-clock numbers drift, CPU time per request much
less, and ``1000 / cpu_ms`` is what one worker can serve on one core. The load is generated with
aiohttp, whose client costs little CPU, so that the client competes less with the processes measured.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import httpx2
import orjson
from rich.console import Console

from proxy.bench.report import render

TEXT_BODY = {"model": "bench", "messages": [{"role": "user", "content": "Say something short."}], "max_tokens": 16}
TOOL_BODY: dict[str, Any] = {
    "model": "bench",
    "messages": [
        {"role": "system", "content": "You are a helpful airline agent."},
        {"role": "user", "content": "Please look up my reservation ABC123."},
    ],
    "tools": [
        {
            "type": "function",
            "function": {
                "name": "get_reservation_details",
                "description": "Get the details of a reservation.",
                "parameters": {
                    "type": "object",
                    "properties": {"reservation_id": {"type": "string"}},
                    "required": ["reservation_id"],
                },
            },
        }
    ],
    "tool_choice": "required",
}


# DESIGN §8, as (added p50 ms, added p99 ms) per series; throughput: requests/s with one worker.
def cpu_seconds(pid: int) -> float | None:
    """User plus system CPU time of a process so far; None where ``/proc`` is not available."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class CpuMeter:
    """CPU time a process spends while a series runs, per request sent to it."""

    def __init__(self, pid: int | None) -> None:
        self.pid = pid
        self._start: float | None = None
        self.used_s: float | None = None

    def __enter__(self) -> CpuMeter:
        self._start = cpu_seconds(self.pid) if self.pid is not None else None
        return self

    def __exit__(self, *exc: object) -> None:
        end = cpu_seconds(self.pid) if self.pid is not None else None
        self.used_s = end - self._start if end is not None and self._start is not None else None

    def ms_per(self, requests: int) -> float:
        return self.used_s * 1000 / requests if self.used_s is not None and requests else math.nan


@dataclass
class Series:
    name: str
    direct: list[float] = field(default_factory=list)
    proxied: list[float] = field(default_factory=list)
    proxy_cpu_ms: float = math.nan  # per proxied request

    def summary(self) -> dict[str, float]:
        d50, p50 = _pct(self.direct, 50), _pct(self.proxied, 50)
        d99, p99 = _pct(self.direct, 99), _pct(self.proxied, 99)
        return {
            "requests": len(self.proxied),
            "direct_p50_ms": d50 * 1000,
            "proxy_p50_ms": p50 * 1000,
            "added_p50_ms": (p50 - d50) * 1000,
            "direct_p99_ms": d99 * 1000,
            "proxy_p99_ms": p99 * 1000,
            "added_p99_ms": (p99 - d99) * 1000,
            "ratio_p50": p50 / d50 if d50 else math.nan,
            "proxy_cpu_ms_per_request": self.proxy_cpu_ms,
        }


@dataclass
class Throughput:
    direct_rps: float
    proxy_rps: float
    proxy_cpu_ms: float

    def summary(self) -> dict[str, float]:
        return {
            "direct_rps": self.direct_rps,
            "proxy_rps": self.proxy_rps,
            "ratio": self.proxy_rps / self.direct_rps,
            "proxy_cpu_ms_per_request": self.proxy_cpu_ms,
            # What one worker could serve with a whole core, whatever else the machine is running.
            "proxy_rps_per_core": 1000 / self.proxy_cpu_ms if self.proxy_cpu_ms > 0 else math.nan,
        }


def _pct(values: list[float], q: float) -> float:
    if not values:
        return math.nan
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1] if q < 100 else max(values)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _wait_http(url: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx2.get(url, timeout=1.0).status_code < 500:
                return
        except httpx2.HTTPError:
            pass
        time.sleep(0.05)
    raise TimeoutError(f"{url} did not come up within {timeout}s")


@contextlib.contextmanager
def _process(args: list[str], env: dict[str, str] | None = None) -> Iterator[subprocess.Popen[bytes]]:
    proc = subprocess.Popen(args, env={**os.environ, **(env or {})}, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _fama(*args: str) -> list[str]:
    return [sys.executable, "-c", "from proxy.cli import main; main()", *args]


_JSON = {"content-type": "application/json"}


async def _one(client: aiohttp.ClientSession, url: str, body: bytes) -> float:
    start = time.perf_counter()
    async with client.post(url, data=body, headers=_JSON) as resp:
        await resp.read()
        resp.raise_for_status()
    return time.perf_counter() - start


async def _ttft(client: aiohttp.ClientSession, url: str, body: bytes) -> float:
    start = time.perf_counter()
    first = 0.0
    async with client.post(url, data=body, headers=_JSON) as resp:
        resp.raise_for_status()
        async for line in resp.content:
            if first == 0.0 and line.startswith(b"data: ") and b'"content":"tok' in line.replace(b" ", b""):
                first = time.perf_counter() - start
    return first


Call = Callable[[aiohttp.ClientSession, str, bytes], Awaitable[float]]


async def _alternating(
    client: aiohttp.ClientSession,
    call: Call,
    direct: str,
    proxied: str,
    body: bytes,
    series: Series,
    n: int,
    block: int,
) -> Series:
    for _ in range(max(1, n // block)):
        for _ in range(block):
            series.direct.append(await call(client, direct, body))
        for _ in range(block):
            series.proxied.append(await call(client, proxied, body))
    return series


async def _rps(client: aiohttp.ClientSession, url: str, body: bytes, n: int, concurrency: int) -> float:
    remaining = n

    async def worker() -> None:
        nonlocal remaining
        while remaining > 0:
            remaining -= 1
            await _one(client, url, body)

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return n / (time.perf_counter() - start)


def _client(concurrency: int) -> aiohttp.ClientSession:
    connector = aiohttp.TCPConnector(limit=concurrency * 2, keepalive_timeout=60)
    return aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=30))


async def _run_pass_through(
    upstream: str, proxy: str, proxy_pid: int | None, requests: int, concurrency: int
) -> dict[str, Any]:
    direct_url, proxy_url = f"{upstream}/chat/completions", f"{proxy}/v1/chat/completions"
    text, stream = orjson.dumps(TEXT_BODY), orjson.dumps({**TEXT_BODY, "stream": True})
    async with _client(concurrency) as client:
        for _ in range(200):  # warm-up: connections, caches, lazy imports
            await _one(client, direct_url, text)
            await _one(client, proxy_url, text)
            await _ttft(client, direct_url, stream)
            await _ttft(client, proxy_url, stream)
        latency = Series("latency")
        with CpuMeter(proxy_pid) as cpu:
            await _alternating(client, _one, direct_url, proxy_url, text, latency, requests, 50)
        latency.proxy_cpu_ms = cpu.ms_per(len(latency.proxied))
        ttft = Series("ttft")
        with CpuMeter(proxy_pid) as cpu:
            await _alternating(client, _ttft, direct_url, proxy_url, stream, ttft, max(100, requests // 4), 25)
        ttft.proxy_cpu_ms = cpu.ms_per(len(ttft.proxied))
        # Alternating rounds here too, so that load from elsewhere on the machine hits both sides alike.
        rounds, direct_s, proxy_s, proxied = 4, 0.0, 0.0, 0
        per_round = max(concurrency, requests // rounds)
        with CpuMeter(proxy_pid) as cpu:
            for _ in range(rounds):
                direct_s += per_round / await _rps(client, direct_url, text, per_round, concurrency)
                proxy_s += per_round / await _rps(client, proxy_url, text, per_round, concurrency)
                proxied += per_round
        throughput = Throughput(proxied / direct_s, proxied / proxy_s, cpu.ms_per(proxied))
    return {
        "latency": latency.summary(),
        "ttft": ttft.summary(),
        "throughput": throughput.summary() | {"concurrency": concurrency},
    }


async def _run_tool_call(
    upstream: str, proxy: str, proxy_pid: int | None, requests: int
) -> dict[str, dict[str, float]]:
    direct_url, proxy_url = f"{upstream}/chat/completions", f"{proxy}/v1/chat/completions"
    tool = orjson.dumps(TOOL_BODY)
    async with _client(1) as client:
        for _ in range(100):
            await _one(client, direct_url, tool)
            await _one(client, proxy_url, tool)
        series = Series("enforce_tool_call")
        with CpuMeter(proxy_pid) as cpu:
            await _alternating(client, _one, direct_url, proxy_url, tool, series, requests, 50)
        series.proxy_cpu_ms = cpu.ms_per(len(series.proxied))
        # The same supervised request answered with streamed text (tool_choice left to the model).
        text = orjson.dumps({k: v for k, v in TOOL_BODY.items() if k != "tool_choice"} | {"stream": True})
        ttft = Series("enforce_ttft")
        with CpuMeter(proxy_pid) as cpu:
            await _alternating(client, _ttft, direct_url, proxy_url, text, ttft, max(100, requests // 2), 25)
        ttft.proxy_cpu_ms = cpu.ms_per(len(ttft.proxied))
        return {"enforce_tool_call": series.summary(), "enforce_ttft": ttft.summary()}


def bench_command(*, requests: int, concurrency: int, json_out: Path | None) -> int:
    console = Console(stderr=True)
    up_port, proxy_port = _free_port(), _free_port()
    upstream = f"http://127.0.0.1:{up_port}/v1"
    quiet = {"FAMA_LOG_LEVEL": "warning", "FAMA_REDIS_URL": "", "FAMA_API_KEYS": ""}
    with _process([sys.executable, "-m", "proxy.bench.canned_upstream", str(up_port)]):
        _wait_http(f"{upstream}/models")
        serve = _fama("serve", "--upstream-url", upstream, "--port", str(proxy_port), "--mode", "observe")
        with _process(serve, quiet) as proxy_process:
            proxy = f"http://127.0.0.1:{proxy_port}"
            _wait_http(f"{proxy}/healthz")
            console.print(f"pass-through: {requests} requests per series, concurrency {concurrency} for throughput")
            results: dict[str, Any] = asyncio.run(
                _run_pass_through(upstream, proxy, proxy_process.pid, requests, concurrency)
            )
        redis_binary = shutil.which("redis-server")
        if redis_binary is not None:
            console.print("enforce mode on tool-call turns, detector over Redis")
            results |= _bench_enforce(redis_binary, upstream, max(200, requests // 4), quiet)
    # Piped into a file or an issue note, the table keeps its columns instead of wrapping at 80.
    render(results, Console(width=None if sys.stdout.isatty() else 160))
    if json_out is not None:
        json_out.write_bytes(orjson.dumps(results, option=orjson.OPT_INDENT_2))
    return 0


def _bench_enforce(redis_binary: str, upstream: str, requests: int, env: dict[str, str]) -> dict[str, dict[str, float]]:
    redis_port, proxy_port = _free_port(), _free_port()
    redis_url = f"redis://127.0.0.1:{redis_port}/0"
    with tempfile.TemporaryDirectory() as tmp:
        redis_args = [redis_binary, "--port", str(redis_port), "--bind", "127.0.0.1", "--save", "", "--dir", tmp]
        worker_env = {**env, "FAMA_REDIS_URL": redis_url, "FAMA_METRICS_PORT": str(_free_port())}
        with _process(redis_args), _process(_fama("detector"), worker_env):
            serve = _fama(
                "serve", "--upstream-url", upstream, "--port", str(proxy_port), "--mode", "enforce",
                "--redis-url", redis_url,
            )  # fmt: skip
            with _process(serve, {**env, "FAMA_REDIS_URL": redis_url}) as proxy_process:
                _wait_http(f"http://127.0.0.1:{proxy_port}/healthz")
                return asyncio.run(
                    _run_tool_call(upstream, f"http://127.0.0.1:{proxy_port}", proxy_process.pid, requests)
                )
