"""``fama sessions export`` and ``GET /admin/sessions/export``: recorded sessions back out as trajectory records.

Sessions are recorded by the proxy itself (real uvicorn, scripted model, the official SDK) in a real redis-server or,
embedded, in memory; the export is read back with the trajectory reader ``fama replay`` and ``fama analyze`` use.
"""

from __future__ import annotations

import asyncio
import json
import tracemalloc
from pathlib import Path
from typing import Any

import httpx2
import pytest
import redis
from redis.asyncio import Redis

from detector_service.bus import keys
from detector_service.contract.profile import Mode
from detector_service.contract.wire import TurnEvent, Verdict
from detector_service.offline.export import export
from detector_service.offline.sessions import ExportFilter
from detector_service.offline.trajectories import load
from proxy.supervision.recorder import Outcome, RedisRecorder
from tests.recorded_sessions import (
    ADMIN,
    KEY,
    LEAKY,
    OTHER_KEY,
    OTHER_TENANT,
    SECRET,
    TENANT,
    Proxy,
    message_shape,
    running,
)
from tests.servers import free_port, run_fama
from tests.supervision_harness import LOOKED_UP, RESERVATION, TOOLS


def _record_sessions(proxy: Proxy) -> dict[str, list[dict[str, Any]]]:
    """The sessions every test exports; what each client's conversation holds at its end."""
    seen: dict[str, list[dict[str, Any]]] = {}
    # The reservation looked up, then cancelled without the user's confirmation: a failure.
    seen["s-cancel"] = [*LOOKED_UP, proxy.turn("s-cancel", LOOKED_UP)]
    proxy.report("s-cancel", {"outcome": "failure", "note": "cancelled without asking"})
    hello: list[Any] = [LOOKED_UP[0], {"role": "user", "content": "Hello"}]
    seen["s-hello"] = [*hello, proxy.turn("s-hello", hello)]
    proxy.report("s-hello", {"outcome": "success", "reward": 0.5})
    # Two turns (a look-up, then the cancellation) and no outcome reported.
    first: list[Any] = LOOKED_UP[:2]
    looked = proxy.turn("s-two", first)
    output = {"role": "tool", "tool_call_id": looked["tool_calls"][0]["id"], "content": json.dumps(RESERVATION)}
    second = [*first, looked, output]
    seen["s-two"] = [*second, proxy.turn("s-two", second)]
    leaky: list[Any] = [LOOKED_UP[0], {"role": "user", "content": LEAKY}]
    seen["s-secret"] = [*leaky, proxy.turn("s-secret", leaky)]
    proxy.report("s-secret", {"outcome": "success"})
    proxy.turn("s-other", hello, key=OTHER_KEY)
    proxy.report("s-other", {"outcome": "success"}, key=OTHER_KEY)
    return seen


def _lines(text: str) -> dict[str, dict[str, Any]]:
    records = [json.loads(line) for line in text.splitlines() if line.strip()]
    by_session = {r["session_id"]: r for r in records}
    assert len(by_session) == len(records)  # one line per session
    return by_session


@pytest.fixture
def observed(redis_url: str, tmp_path: Path) -> tuple[str, dict[str, list[dict[str, Any]]]]:
    """Sessions recorded by an observe-mode proxy in Redis: the Redis URL and what each client saw."""
    with running(tmp_path, Mode.OBSERVE, redis_url) as proxy:
        seen = _record_sessions(proxy)
    return redis_url, seen


@pytest.mark.redis
def test_export_writes_each_session_as_a_trajectory_record(
    observed: tuple[str, dict[str, list[dict[str, Any]]]], tmp_path: Path
) -> None:
    redis_url, seen = observed
    out = tmp_path / "sessions.jsonl"
    done = run_fama("sessions", "export", "--redis-url", redis_url, "--tenant", TENANT, "--out", str(out))
    assert done.returncode == 0, done.stderr
    assert "exported 4 sessions (3 with an outcome)" in done.stderr
    records = _lines(out.read_text())
    assert set(records) == set(seen)  # the other tenant's session is not there
    for session, conversation in seen.items():
        record = records[session]
        assert record["id"] == f"{TENANT}/{session}"
        assert [message_shape(m) for m in record["messages"]] == [message_shape(m) for m in conversation]
        assert record["tools"] == TOOLS
    assert {s: r["reward"] for s, r in records.items()} == {
        "s-cancel": 0.0,
        "s-hello": 0.5,
        "s-two": None,
        "s-secret": 1.0,
    }
    assert records["s-cancel"]["outcome"] == "failure"
    assert records["s-cancel"]["note"] == "cancelled without asking"
    # Observe mode changed nothing, but recorded what enforce mode would have done with the unconfirmed cancel.
    cancel = records["s-cancel"]
    assert cancel["interventions"] == []
    assert cancel["intervened"] is False
    [verdict] = cancel["verdicts"]
    assert verdict["turn"] == len(LOOKED_UP)  # the index of the judged assistant message
    assert verdict["action"] in ("retry", "block")
    assert {f["category"] for f in verdict["findings"]} >= {"DCV"}
    assert cancel["would_act"] is True
    assert records["s-hello"]["would_act"] is False
    assert [v["turn"] for v in records["s-two"]["verdicts"]] == [2, 4]

    # The trajectory reader of replay and analyze takes it as it is.
    trajectories = {t.id: t for t in load(out)}
    read = trajectories[f"{TENANT}/s-cancel"]
    assert read.reward == 0.0
    assert read.tools == TOOLS
    assert read.extra["verdicts"] == cancel["verdicts"]


@pytest.mark.redis
def test_export_filters_tenants_time_and_outcomes(
    observed: tuple[str, dict[str, list[dict[str, Any]]]], tmp_path: Path
) -> None:
    redis_url, _ = observed
    out = tmp_path / "sessions.jsonl"

    def sessions(*flags: str) -> set[str]:
        done = run_fama("sessions", "export", "--out", str(out), *flags, REDIS_URL=redis_url)
        assert done.returncode == 0, done.stderr
        return set(_lines(out.read_text()))

    assert sessions() == {"s-cancel", "s-hello", "s-two", "s-secret", "s-other"}
    assert sessions("--tenant", OTHER_TENANT) == {"s-other"}
    assert sessions("--tenant", TENANT, "--with-outcome-only") == {"s-cancel", "s-hello", "s-secret"}
    assert sessions("--last", "1h", "--tenant", TENANT) == {"s-cancel", "s-hello", "s-two", "s-secret"}
    assert sessions("--since", "2999-01-01T00:00:00Z") == set()
    assert sessions("--since", "2000-01-01") == {"s-cancel", "s-hello", "s-two", "s-secret", "s-other"}
    bad = run_fama("sessions", "export", "--out", str(out), "--last", "a week", REDIS_URL=redis_url)
    assert bad.returncode == 2
    assert "--last" in bad.stderr
    missing = run_fama("sessions", "export", "--out", str(out))
    assert missing.returncode == 2
    assert "--redis-url" in missing.stderr


@pytest.mark.redis
def test_redact_removes_secrets_from_message_text(
    observed: tuple[str, dict[str, list[dict[str, Any]]]], tmp_path: Path
) -> None:
    redis_url, _ = observed
    plain, redacted = tmp_path / "plain.jsonl", tmp_path / "redacted.jsonl"
    assert run_fama("sessions", "export", "--redis-url", redis_url, "--out", str(plain)).returncode == 0
    assert SECRET in plain.read_text()  # recorded as the user wrote it
    done = run_fama("sessions", "export", "--redis-url", redis_url, "--redact", "--out", str(redacted))
    assert done.returncode == 0, done.stderr
    assert SECRET not in redacted.read_text()
    user = _lines(redacted.read_text())["s-secret"]["messages"][1]
    assert user["content"] == "My old booking tool wants api_key=[redacted], can you cancel ZFA04Y?"


def test_embedded_proxy_exports_through_the_admin_endpoint(tmp_path: Path) -> None:
    with running(tmp_path, Mode.ENFORCE, None) as proxy:
        seen = _record_sessions(proxy)
        url = f"{proxy.url}/admin/sessions/export"
        admin = {"authorization": f"Bearer {ADMIN}"}
        assert httpx2.get(url, timeout=10).status_code == 401
        assert httpx2.get(url, headers={"authorization": f"Bearer {KEY}"}, timeout=10).status_code == 401
        answer = httpx2.get(url, params={"tenant": TENANT}, headers=admin, timeout=10)
        assert answer.status_code == 200, answer.text
        assert answer.headers["content-type"] == "application/x-ndjson"
        records = _lines(answer.text)
        assert set(records) == set(seen)
        # Enforce mode blocked the unconfirmed cancel: the record holds what the client got, and why.
        cancel = records["s-cancel"]
        assert message_shape(cancel["messages"][-1]) == message_shape(seen["s-cancel"][-1])
        assert "confirm" in cancel["messages"][-1]["content"]
        assert cancel["intervened"] is True
        assert [i["action"] for i in cancel["interventions"]][-1] == "block"
        assert cancel["would_act"] is True
        assert records["s-hello"]["reward"] == 0.5

        other = httpx2.get(url, params={"tenant": OTHER_TENANT}, headers=admin, timeout=10)
        assert set(_lines(other.text)) == {"s-other"}
        only = httpx2.get(url, params={"with_outcome_only": "true", "tenant": TENANT}, headers=admin, timeout=10)
        assert set(_lines(only.text)) == {"s-cancel", "s-hello", "s-secret"}
        redacted = httpx2.get(url, params={"redact": "true"}, headers=admin, timeout=10)
        assert SECRET not in redacted.text
        assert "[redacted]" in redacted.text
        bad = httpx2.get(url, params={"since": "yesterday"}, headers=admin, timeout=10)
        assert bad.status_code == 400
        assert bad.json()["error"]["param"] == "since"


class _Counting:
    """A sink that keeps only the number of bytes written to it."""

    def __init__(self) -> None:
        self.written = 0

    def write(self, data: bytes) -> int:
        self.written += len(data)
        return len(data)


SESSIONS, TURNS, TEXT = 1_500, 4, "x" * 4_000


async def _fill(redis_url: str) -> None:
    """``SESSIONS`` recorded sessions of ``TURNS`` turns with a 4 kB user message each, written by the recorder."""
    async with Redis.from_url(redis_url) as redis:
        recorder = RedisRecorder(redis, queue_size=50_000)
        await recorder.start()
        for n in range(SESSIONS):
            messages: list[dict[str, Any]] = [{"role": "system", "content": "policy"}]
            for turn in range(TURNS):
                messages.append({"role": "user", "content": f"{turn} {TEXT}"})
                answer = {"role": "assistant", "content": f"answer {turn}"}
                event = TurnEvent(session_id=f"big-{n}", messages=list(messages), tools=TOOLS, candidate=answer)
                recorder.record_turn(event)
                recorder.record_verdict(Verdict(turn_id=event.turn_id, session_id=event.session_id))
                messages.append(answer)
            recorder.record_outcome(Outcome(tenant="default", session_id=f"big-{n}", outcome="success"))
            if n % 200 == 0:
                await recorder.flush()
        await recorder.stop()
        assert recorder.dropped == 0


async def _export_traced(redis_url: str) -> tuple[int, int]:
    """(bytes exported, peak bytes allocated while exporting)."""
    sink = _Counting()
    async with Redis.from_url(redis_url) as redis:
        tracemalloc.start()
        try:
            done = await export(redis, sink, keep=ExportFilter())  # type: ignore[arg-type]
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
    assert done.sessions == SESSIONS
    assert done.with_outcome == SESSIONS
    return sink.written, peak


@pytest.mark.redis
def test_export_memory_stays_bounded_whatever_the_number_of_sessions(redis_url: str) -> None:
    asyncio.run(_fill(redis_url))
    written, peak = asyncio.run(_export_traced(redis_url))
    assert written > SESSIONS * TURNS * len(TEXT)  # every message went out
    # Memory holds one batch of sessions, not the export: a small fraction of what was written.
    assert peak < written / 5, f"peak {peak / 1e6:.1f} MB for {written / 1e6:.1f} MB exported"


@pytest.mark.redis
def test_an_unreadable_record_is_left_out_and_named(
    observed: tuple[str, dict[str, list[dict[str, Any]]]], tmp_path: Path
) -> None:
    redis_url, seen = observed
    client = redis.Redis.from_url(redis_url)
    client.rpush(keys.session_key(TENANT, "s-corrupt"), b"{not json")
    client.close()
    out = tmp_path / "sessions.jsonl"
    done = run_fama("sessions", "export", "--redis-url", redis_url, "--tenant", TENANT, "--out", str(out))
    assert done.returncode == 0, done.stderr
    assert set(_lines(out.read_text())) == set(seen)
    assert f"1 sessions had unreadable records and were left out (e.g. {TENANT}/s-corrupt)" in done.stderr


def test_an_unreachable_redis_is_a_clear_error(tmp_path: Path) -> None:
    url = f"redis://:hunter2-password@127.0.0.1:{free_port()}/0"
    done = run_fama("sessions", "export", "--redis-url", url, "--out", str(tmp_path / "sessions.jsonl"))
    assert done.returncode == 1
    assert "error: could not export the sessions" in done.stderr
    assert "hunter2-password" not in done.stderr
    assert "Traceback" not in done.stderr
