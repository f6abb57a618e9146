"""``fama bench``: what the proxy adds, measured against the direct call in the same run.

Three processes on loopback: a canned upstream (:mod:`proxy.bench_upstream`), the proxy (``fama serve``
as a subprocess) and this client. Each series runs direct and through the proxy in alternating blocks,
so drift on a shared machine hits both sides alike. Results are ratios and differences, never absolute
claims about the hardware.

Series:
- ``latency``: non-streaming text turns at concurrency 1 (p50/p99 added milliseconds).
- ``ttft``: streaming, time to the first content chunk at concurrency 1.
- ``throughput``: requests/s at the given concurrency, proxy/direct ratio.
- ``enforce_tool_call`` (when ``redis-server`` is installed): a tool-call turn in enforce mode with a
  detector worker over Redis, added p50.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx2
import orjson
from rich.console import Console
from rich.table import Table

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


@dataclass
class Series:
    name: str
    direct: list[float] = field(default_factory=list)
    proxied: list[float] = field(default_factory=list)

    def summary(self) -> dict[str, float]:
        d50, p50 = _pct(self.direct, 50), _pct(self.proxied, 50)
        d99, p99 = _pct(self.direct, 99), _pct(self.proxied, 99)
        return {
            "direct_p50_ms": d50 * 1000,
            "proxy_p50_ms": p50 * 1000,
            "added_p50_ms": (p50 - d50) * 1000,
            "direct_p99_ms": d99 * 1000,
            "proxy_p99_ms": p99 * 1000,
            "added_p99_ms": (p99 - d99) * 1000,
            "ratio_p50": p50 / d50 if d50 else float("nan"),
        }


@dataclass
class Throughput:
    direct_rps: float
    proxy_rps: float

    def summary(self) -> dict[str, float]:
        return {"direct_rps": self.direct_rps, "proxy_rps": self.proxy_rps, "ratio": self.proxy_rps / self.direct_rps}


def _pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
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


async def _one(client: httpx2.AsyncClient, url: str, body: dict[str, Any]) -> float:
    start = time.perf_counter()
    resp = await client.post(url, json=body)
    resp.raise_for_status()
    return time.perf_counter() - start


async def _ttft(client: httpx2.AsyncClient, url: str) -> float:
    start = time.perf_counter()
    first = 0.0
    async with client.stream("POST", url, json={**TEXT_BODY, "stream": True}) as resp:
        resp.raise_for_status()
        async for line in resp.aiter_lines():
            if first == 0.0 and line.startswith("data: ") and '"content":"tok' in line.replace(" ", ""):
                first = time.perf_counter() - start
    return first


async def _latency(
    client: httpx2.AsyncClient, direct: str, proxied: str, n: int, body: dict[str, Any], name: str
) -> Series:
    series = Series(name)
    block = 50
    for _ in range(max(1, n // block)):
        for _ in range(block):
            series.direct.append(await _one(client, direct, body))
        for _ in range(block):
            series.proxied.append(await _one(client, proxied, body))
    return series


async def _ttft_series(client: httpx2.AsyncClient, direct: str, proxied: str, n: int) -> Series:
    series = Series("ttft")
    block = 25
    for _ in range(max(1, n // block)):
        for _ in range(block):
            series.direct.append(await _ttft(client, direct))
        for _ in range(block):
            series.proxied.append(await _ttft(client, proxied))
    return series


async def _rps(client: httpx2.AsyncClient, url: str, n: int, concurrency: int) -> float:
    remaining = n

    async def worker() -> None:
        nonlocal remaining
        while remaining > 0:
            remaining -= 1
            await _one(client, url, TEXT_BODY)

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return n / (time.perf_counter() - start)


def _client(concurrency: int) -> httpx2.AsyncClient:
    limits = httpx2.Limits(max_connections=concurrency * 2, max_keepalive_connections=concurrency * 2)
    return httpx2.AsyncClient(timeout=30.0, limits=limits)


async def _run_pass_through(upstream: str, proxy: str, requests: int, concurrency: int) -> dict[str, Any]:
    direct_url, proxy_url = f"{upstream}/chat/completions", f"{proxy}/v1/chat/completions"
    async with _client(concurrency) as client:
        for _ in range(200):  # warm-up: connections, caches, lazy imports
            await _one(client, direct_url, TEXT_BODY)
            await _one(client, proxy_url, TEXT_BODY)
        latency = await _latency(client, direct_url, proxy_url, requests, TEXT_BODY, "latency")
        ttft = await _ttft_series(client, direct_url, proxy_url, max(100, requests // 4))
        direct_rps = await _rps(client, direct_url, requests, concurrency)
        proxy_rps = await _rps(client, proxy_url, requests, concurrency)
    return {
        "latency": latency.summary(),
        "ttft": ttft.summary(),
        "throughput": Throughput(direct_rps, proxy_rps).summary() | {"concurrency": concurrency},
    }


async def _run_tool_call(upstream: str, proxy: str, requests: int) -> dict[str, float]:
    direct_url, proxy_url = f"{upstream}/chat/completions", f"{proxy}/v1/chat/completions"
    async with _client(1) as client:
        for _ in range(100):
            await _one(client, direct_url, TOOL_BODY)
            await _one(client, proxy_url, TOOL_BODY)
        return (await _latency(client, direct_url, proxy_url, requests, TOOL_BODY, "enforce_tool_call")).summary()


def _render(results: dict[str, Any], console: Console) -> None:
    table = Table(title="fama bench: proxy vs direct (same run)")
    for col in ("series", "direct p50 ms", "proxy p50 ms", "added p50 ms", "added p99 ms", "ratio"):
        table.add_column(col, justify="right" if col != "series" else "left")
    for name in ("latency", "ttft", "enforce_tool_call"):
        s = results.get(name)
        if s:
            table.add_row(
                name,
                f"{s['direct_p50_ms']:.2f}",
                f"{s['proxy_p50_ms']:.2f}",
                f"{s['added_p50_ms']:.2f}",
                f"{s['added_p99_ms']:.2f}",
                f"{s['ratio_p50']:.2f}x",
            )
    console.print(table)
    t = results["throughput"]
    console.print(
        f"throughput at concurrency {t['concurrency']}: direct {t['direct_rps']:.0f} req/s, "
        f"proxy {t['proxy_rps']:.0f} req/s, ratio {t['ratio']:.2f}"
    )


def bench_command(*, requests: int, concurrency: int, json_out: Path | None) -> int:
    console = Console(stderr=True)
    up_port, proxy_port = _free_port(), _free_port()
    upstream = f"http://127.0.0.1:{up_port}/v1"
    quiet = {"FAMA_LOG_LEVEL": "warning", "FAMA_REDIS_URL": "", "FAMA_API_KEYS": ""}
    with _process([sys.executable, "-m", "proxy.bench_upstream", str(up_port)]):
        _wait_http(f"{upstream}/models")
        serve = _fama("serve", "--upstream-url", upstream, "--port", str(proxy_port), "--mode", "observe")
        with _process(serve, quiet):
            proxy = f"http://127.0.0.1:{proxy_port}"
            _wait_http(f"{proxy}/healthz")
            console.print(f"pass-through: {requests} requests per series, concurrency {concurrency} for throughput")
            results: dict[str, Any] = asyncio.run(_run_pass_through(upstream, proxy, requests, concurrency))
        redis_binary = shutil.which("redis-server")
        if redis_binary is not None:
            results["enforce_tool_call"] = _bench_enforce(redis_binary, upstream, max(200, requests // 4), quiet)
    _render(results, Console())
    if json_out is not None:
        json_out.write_bytes(orjson.dumps(results, option=orjson.OPT_INDENT_2))
    return 0


def _bench_enforce(redis_binary: str, upstream: str, requests: int, env: dict[str, str]) -> dict[str, float]:
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
            with _process(serve, {**env, "FAMA_REDIS_URL": redis_url}):
                _wait_http(f"http://127.0.0.1:{proxy_port}/healthz")
                return asyncio.run(_run_tool_call(upstream, f"http://127.0.0.1:{proxy_port}", requests))
