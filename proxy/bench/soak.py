"""``fama soak``: a bounded soak of the whole system, measured from outside.

Real processes on 127.0.0.1: ``redis-server``, one ``fama detector``, ``fama serve --mode enforce`` over Redis
with client and upstream keys, and a scripted model server (:mod:`proxy.bench.soak_upstream`). Clients of the
official SDK run conversations at a fixed concurrency: plain text and tool turns (look-ups, and cancellations
with and without the user's go-ahead, which the detectors send back for a retry and then block), streamed and
not, plus faults: upstream 500s, streams whose upstream connection drops, and a Redis restart half-way
through (``--redis-down-s`` seconds without Redis).

Reported per interval (a minute by default): requests, p50/p99 latency of the successful ones, answers served
degraded, errors by kind, RSS of the proxy and the detector; and the RSS growth over the run. Every process is
stopped when the run ends, also on Ctrl-C.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import random
import statistics
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import openai
import orjson
from openai.types.chat import ChatCompletionMessageParam, ChatCompletionToolParam
from rich.console import Console
from rich.table import Table

from proxy.bench.processes import Service, fama, free_port, redis_args, service_env, wait_for_port

CLIENT_KEY = "soak-client-key-0001"
UPSTREAM_KEY = "soak-upstream-key-0001"
TOOLS: list[ChatCompletionToolParam] = [
    {
        "type": "function",
        "function": {
            "name": name,
            "description": description,
            "parameters": {
                "type": "object",
                "properties": {"reservation_id": {"type": "string"}},
                "required": ["reservation_id"],
            },
        },
    }
    for name, description in (
        ("get_reservation_details", "Look a reservation up."),
        ("cancel_reservation", "Cancel a reservation."),
    )
]
SYSTEM = "You are an airline agent. Before cancelling, list the action and obtain explicit user confirmation (yes)."

# (scenario, streamed, weight): what each request of the mix asks the scripted upstream for.
MIX: list[tuple[str, bool, int]] = [
    ("text", False, 10),
    ("text", True, 10),
    ("read", False, 15),
    ("read", True, 15),
    ("write-confirmed", False, 10),
    ("write-confirmed", True, 10),
    ("write-unconfirmed", False, 6),
    ("write-unconfirmed", True, 6),
    ("error-500", False, 4),
    ("drop", True, 4),
]
FAULTS = {"error-500", "drop"}


@dataclass
class Interval:
    latencies: list[float] = field(default_factory=list)
    errors: Counter[str] = field(default_factory=Counter)
    requests: int = 0
    degraded: Counter[str] = field(default_factory=Counter)  # by reason: outage, deadline
    interventions: int = 0
    rss: dict[str, int] = field(default_factory=dict)  # at the end of the interval

    def summary(self) -> dict[str, Any]:
        return {
            "requests": self.requests,
            "ok": len(self.latencies),
            "p50_ms": _pct(self.latencies, 50) * 1000,
            "p99_ms": _pct(self.latencies, 99) * 1000,
            "degraded": dict(self.degraded),
            "interventions": self.interventions,
            "errors": dict(sorted(self.errors.items())),
            "rss_mb": {k: round(v / 2**20, 1) for k, v in self.rss.items()},
        }


def _pct(values: list[float], q: int) -> float:
    if not values:
        return math.nan
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1]


def _messages(scenario: str, turn: int) -> list[ChatCompletionMessageParam]:
    ask = f"Please cancel my reservation ABC123 (request {turn})."
    messages: list[ChatCompletionMessageParam] = [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": ask},
    ]
    if scenario == "write-confirmed":
        messages += [
            {"role": "assistant", "content": "I will cancel reservation ABC123. Shall I proceed?"},
            {"role": "user", "content": "Yes, go ahead."},
        ]
    return messages


def _model(scenario: str) -> str:
    return "soak:" + {"write-confirmed": "write", "write-unconfirmed": "write"}.get(scenario, scenario)


class Soak:
    def __init__(self, base_url: str, seconds: float, interval_s: float, concurrency: int, seed: int) -> None:
        self.client = openai.AsyncOpenAI(base_url=base_url + "/v1", api_key=CLIENT_KEY, max_retries=0, timeout=60)
        self.seconds = seconds
        self.interval_s = interval_s
        self.concurrency = concurrency
        self.rng = random.Random(seed)
        self.started = 0.0
        self.intervals: list[Interval] = [Interval() for _ in range(max(1, math.ceil(seconds / interval_s)))]
        self.unexpected: Counter[str] = Counter()  # errors of requests that asked for no fault
        self.events: list[str] = []
        self.degraded_at: list[tuple[float, str]] = []  # when each degraded answer's request began, and why
        self.redis_down: tuple[float, float] | None = None  # seconds in: stopped, started again
        self.rss_at_start: dict[str, int] = {}  # the first sample, as the load begins

    def interval(self) -> Interval:
        index = int((time.monotonic() - self.started) / self.interval_s)
        return self.intervals[min(index, len(self.intervals) - 1)]

    async def one(self, scenario: str, stream: bool, turn: int) -> None:
        begun = time.monotonic()
        session = f"soak-{turn % 50}"
        degraded: str | None = None
        intervened = False
        try:
            kwargs: dict[str, Any] = {
                "model": _model(scenario),
                "messages": _messages(scenario, turn),
                "extra_headers": {"x-fama-session": session},
            }
            if scenario != "text":
                kwargs["tools"] = TOOLS
            if stream:
                async with await self.client.chat.completions.create(stream=True, **kwargs) as chunks:
                    async for chunk in chunks:
                        fama_extra = (chunk.model_extra or {}).get("fama") or {}
                        degraded = degraded or fama_extra.get("degraded")
                        intervened = intervened or bool(fama_extra.get("intervention"))
            else:
                raw = await self.client.chat.completions.with_raw_response.create(**kwargs)
                raw.parse()
                degraded = raw.headers.get("x-fama-degraded")
                intervened = "x-fama-intervention" in raw.headers
        except openai.APIError as exc:
            status = getattr(exc, "status_code", None)
            kind = f"{type(exc).__name__}{f' {status}' if status else ''} ({scenario})"
            self.interval().errors[kind] += 1
            self.interval().requests += 1
            if scenario not in FAULTS:
                self.unexpected[kind] += 1
            return
        current = self.interval()
        current.requests += 1
        current.latencies.append(time.monotonic() - begun)
        if degraded:
            current.degraded[str(degraded)] += 1
            if len(self.degraded_at) < 100_000:
                self.degraded_at.append((round(begun - self.started, 2), str(degraded)))
        current.interventions += intervened
        if scenario in FAULTS:
            self.unexpected[f"no error ({scenario})"] += 1

    async def client_loop(self, index: int, until: float) -> None:
        turn = index
        scenarios = [(s, st) for s, st, _ in MIX]
        weights = [w for _, _, w in MIX]
        while time.monotonic() < until:
            scenario, stream = self.rng.choices(scenarios, weights)[0]
            await self.one(scenario, stream, turn)
            turn += self.concurrency

    async def sample_rss(self, services: dict[str, Service], until: float) -> None:
        while time.monotonic() < until:
            current = self.interval()
            for name, service in services.items():
                rss = service.rss()
                if rss is not None:
                    current.rss[name] = rss
                    self.rss_at_start.setdefault(name, rss)
            await asyncio.sleep(1.0)

    async def restart_redis(self, redis: Service, redis_port: int, at_s: float, down_s: float) -> None:
        await asyncio.sleep(at_s)
        stopped = time.monotonic() - self.started
        self.events.append(f"{stopped:.1f}s: redis-server stopped")
        await asyncio.to_thread(redis.stop)
        await asyncio.sleep(down_s)
        await asyncio.to_thread(redis.restart)
        await asyncio.to_thread(wait_for_port, redis_port)
        self.redis_down = (stopped, time.monotonic() - self.started)
        self.events.append(f"{self.redis_down[1]:.1f}s: redis-server started again")

    async def run(self, services: dict[str, Service], redis: Service, redis_port: int, redis_down_s: float) -> None:
        self.started = time.monotonic()
        until = self.started + self.seconds
        restart = asyncio.create_task(self.restart_redis(redis, redis_port, self.seconds / 2, redis_down_s))
        try:
            await asyncio.gather(
                self.sample_rss(services, until), *(self.client_loop(i, until) for i in range(self.concurrency))
            )
        finally:
            restart.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await restart
            await self.client.close()

    def degraded_summary(self) -> dict[str, Any]:
        """Answers served without a verdict: while Redis was down, and after it was back (how long until the last)."""
        down, back = self.redis_down or (math.inf, math.inf)
        during = Counter(reason for at, reason in self.degraded_at if down <= at < back)
        after = [(at, reason) for at, reason in self.degraded_at if at >= back]
        other = Counter(reason for at, reason in self.degraded_at if at < down)
        return {
            "before_redis_restart": dict(other),
            "while_redis_down": dict(during),
            "after_redis_back": dict(Counter(reason for _, reason in after)),
            "last_after_redis_back_s": round(max(at for at, _ in after) - back, 2) if after else None,
        }

    def report(self, services: dict[str, Service]) -> dict[str, Any]:
        rows = [i.summary() for i in self.intervals]
        samples = [i.rss for i in self.intervals if i.rss]
        growth: dict[str, Any] = {}
        for name in services:
            series = [s[name] for s in samples if name in s]
            if series and name in self.rss_at_start:
                growth[name] = {
                    "start_mb": round(self.rss_at_start[name] / 2**20, 1),
                    "after_first_interval_mb": round(series[0] / 2**20, 1),
                    "end_mb": round(series[-1] / 2**20, 1),
                    "growth_after_first_interval_mb": round((series[-1] - series[0]) / 2**20, 1),
                }
        errors: Counter[str] = Counter()
        for i in self.intervals:
            errors.update(i.errors)
        ok = [lat for i in self.intervals for lat in i.latencies]
        return {
            "seconds": self.seconds,
            "interval_s": self.interval_s,
            "concurrency": self.concurrency,
            "requests": sum(i.requests for i in self.intervals),
            "p99_ms": _pct(ok, 99) * 1000,
            "errors": dict(sorted(errors.items())),
            "unexpected": dict(sorted(self.unexpected.items())),
            "rss": growth,
            "events": self.events,
            "degraded": self.degraded_summary(),
            "intervals": rows,
            "alive_at_end": {name: s.proc.poll() is None for name, s in services.items()},
        }


def render(report: dict[str, Any], console: Console) -> None:
    table = Table(title=f"fama soak: {report['seconds'] / 60:.1f} min, concurrency {report['concurrency']}")
    for column in ("interval", "requests", "p50 ms", "p99 ms", "degraded", "interventions", "errors", "RSS MB"):
        table.add_column(column)
    for n, row in enumerate(report["intervals"], 1):
        errors = ", ".join(f"{k}: {v}" for k, v in row["errors"].items()) or "-"
        rss = " / ".join(f"{k} {v}" for k, v in row["rss_mb"].items())
        table.add_row(
            str(n),
            str(row["requests"]),
            f"{row['p50_ms']:.0f}",
            f"{row['p99_ms']:.0f}",
            ", ".join(f"{k}: {v}" for k, v in row["degraded"].items()) or "0",
            str(row["interventions"]),
            errors,
            rss,
        )
    console.print(table)
    for name, rss in report["rss"].items():
        console.print(
            f"{name} RSS: {rss['start_mb']} MB as the load began, {rss['after_first_interval_mb']} MB after the "
            f"first interval, {rss['end_mb']} MB at the end ({rss['growth_after_first_interval_mb']:+} MB)"
        )
    console.print(f"errors: {report['errors'] or 'none'}")
    console.print(
        f"unexpected (a request that asked for no fault failed, or a fault went unnoticed): {report['unexpected'] or 'none'}"
    )
    for event in report["events"]:
        console.print(event)
    degraded = report["degraded"]
    console.print(
        f"answers served degraded (no verdict): before the Redis restart {degraded['before_redis_restart'] or 0}, "
        f"while Redis was down {degraded['while_redis_down'] or 0}, after it was back "
        f"{degraded['after_redis_back'] or 0}"
        + (
            f" (the last one asked {degraded['last_after_redis_back_s']}s after)"
            if degraded["last_after_redis_back_s"] is not None
            else ""
        )
    )


def soak_command(
    *,
    minutes: float,
    concurrency: int,
    interval_s: float,
    redis_down_s: float,
    seed: int,
    json_out: Path | None,
    logs: Path | None = None,
) -> int:
    console = Console(stderr=True, width=200)
    with tempfile.TemporaryDirectory(prefix="fama-soak-") as tmp:
        workdir = logs or Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        ports = {name: free_port() for name in ("redis", "upstream", "proxy", "detector")}
        redis_url = f"redis://127.0.0.1:{ports['redis']}/0"
        env = service_env(FAMA_LOG_LEVEL="warning")
        started: list[Service] = []
        try:
            redis = Service("redis", redis_args(ports["redis"], workdir), env, workdir)
            started.append(redis)
            upstream_cmd = [sys.executable, "-m", "proxy.bench.soak_upstream", str(ports["upstream"])]
            upstream = Service("upstream", upstream_cmd, env, workdir)
            started.append(upstream)
            wait_for_port(ports["redis"])
            detector_env = {**env, "FAMA_REDIS_URL": redis_url, "FAMA_METRICS_HOST": "127.0.0.1"}
            detector = Service(
                "detector", fama("detector"), {**detector_env, "FAMA_METRICS_PORT": str(ports["detector"])}, workdir
            )
            started.append(detector)
            proxy_env = {
                **env,
                "FAMA_REDIS_URL": redis_url,
                "FAMA_API_KEYS": CLIENT_KEY,
                "FAMA_UPSTREAM_API_KEY": UPSTREAM_KEY,
                "FAMA_UPSTREAM_URL": f"http://127.0.0.1:{ports['upstream']}/v1",
                "FAMA_MODE": "enforce",
                "FAMA_PORT": str(ports["proxy"]),
            }
            proxy = Service("proxy", fama("serve"), proxy_env, workdir)
            started.append(proxy)
            for name in ("upstream", "proxy", "detector"):
                wait_for_port(ports[name])
            services = {"proxy": proxy, "detector": detector}
            soak = Soak(f"http://127.0.0.1:{ports['proxy']}", minutes * 60, interval_s, concurrency, seed)
            console.print(f"soaking for {minutes:g} min (concurrency {concurrency}); service logs in {workdir}")
            asyncio.run(soak.run(services, redis, ports["redis"], redis_down_s))
            report = soak.report(services)
        except (RuntimeError, TimeoutError) as exc:
            for service in started:
                console.print(f"--- {service.name}\n{service.output()}")
            console.print(f"fama soak: {exc}")
            return 1
        finally:
            for service in reversed(started):
                service.stop()
        render(report, console)
        if json_out is not None:
            json_out.write_bytes(orjson.dumps(report, option=orjson.OPT_INDENT_2))
        return 0 if not report["unexpected"] and all(report["alive_at_end"].values()) else 1
