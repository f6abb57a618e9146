"""A new profile goes into force without a restart: ``POST /admin/profile`` and ``fama profile push``, in one process
(no Redis) and over Redis to two ``fama serve`` replicas and a ``fama detector``, all real processes."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import logging
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx2
import openai
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families
from redis.asyncio import Redis as AsyncRedis

from detector_service.bus import keys
from detector_service.bus.profiles import ProfileWatch, push_profile
from detector_service.contract.active_profile import ActiveProfile, ProfileHolder
from detector_service.contract.profile import parse_profile, profile_sha256
from detector_service.contract.redaction import REDACTED, RedactSecrets, redact_also
from detector_service.contract.wire import Action, TurnEvent
from detector_service.engine import Engines
from proxy.bench.processes import fama
from tests.servers import (
    fama_env,
    free_port,
    serve_in_thread,
    start_fama_serve,
    stop_process,
    wait_for_detector_group,
    wait_for_port,
)
from tests.supervised_upstream import ScriptedModel, feedback_in
from tests.supervision_harness import CANCEL, LOOKED_UP, QUESTION, TOOLS, cancels_until_told, proxy_for, sdk

ADMIN_KEY = "admin-key-reload-0123456789"
ADMIN = {"authorization": f"Bearer {ADMIN_KEY}"}
FIRST: dict[str, Any] = {"name": "first", "deadline_ms": 5_000}
# What `fama analyze` writes for a kind of finding that fired on runs that went well: it only guides.
GUIDE_ONLY: dict[str, Any] = {
    "name": "guide-only",
    "deadline_ms": 5_000,
    "findings": {"DCV/write_without_confirmation": {"action": "guide", "failed": 1, "passed": 9}},
}
NO_RETRIES: dict[str, Any] = {"name": "no-retries", "deadline_ms": 5_000, "max_retries": 0}
BAD: dict[str, Any] = {"name": "bad", "deadline_ms": 5_000, "actions": {"DCV": "sometimes"}}
SWITCH_S = 2.0  # every replica and detector runs a pushed profile within this


def sha(profile: dict[str, Any]) -> str:
    return profile_sha256(parse_profile(profile))


def written(tmp_path: Path, name: str, profile: dict[str, Any]) -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(profile))
    return path


def handling(client: openai.OpenAI) -> str:
    """How the proxy handles a write the user did not confirm: its ``x-fama-intervention`` (``none`` when it passed)."""
    raw = client.chat.completions.with_raw_response.create(
        model="m", messages=LOOKED_UP, tools=TOOLS, extra_headers={"x-fama-session": uuid.uuid4().hex}
    )
    assert raw.status_code == 200
    return raw.headers.get("x-fama-intervention", "none")


def profile_of(url: str) -> dict[str, Any]:
    answer = httpx2.get(url + "/admin/profile", headers=ADMIN, timeout=10)
    assert answer.status_code == 200, answer.text
    found: dict[str, Any] = answer.json()
    return found


def push(file: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        fama("profile", "push", str(file), *args),
        env=fama_env(ADMIN_KEY=ADMIN_KEY),
        capture_output=True,
        text=True,
        timeout=60,
    )


def profile_info(metrics_text: str) -> dict[tuple[str, str], float]:
    return {
        (s.labels["hash"], s.labels["version"]): s.value
        for family in text_string_to_metric_families(metrics_text)
        if family.name == "fama_profile_info"
        for s in family.samples
    }


def test_a_pushed_profile_is_in_force_at_once_and_a_bad_one_changes_nothing(tmp_path: Path) -> None:
    model = ScriptedModel(cancels_until_told)
    with proxy_for(model, tmp_path, mode="enforce", admin_key=ADMIN_KEY, profile=FIRST) as (client, proxied):
        url = str(client.base_url).removesuffix("/v1/")
        first = profile_of(url)
        assert (first["version"], first["source"], first["sha256"]) == (0, "file", sha(FIRST))
        assert first["mode"] == "enforce"
        assert handling(client) == "retry:DCV"

        # A bad profile: 400 naming the field, from the route and through the command; nothing changes.
        refused = push(written(tmp_path, "bad", BAD), "--url", url)
        assert refused.returncode == 1
        assert "400" in refused.stderr
        assert "actions.DCV" in refused.stderr
        for body, field in ((yaml.safe_dump(BAD), "actions.DCV"), ("nmae: typo\n", "nmae"), ("{[", None), ("", None)):
            answer = httpx2.post(url + "/admin/profile", content=body, headers=ADMIN, timeout=10)
            assert answer.status_code == 400
            error = answer.json()["error"]
            assert (error["type"], error["code"], error["param"]) == ("invalid_request_error", "invalid_profile", field)
        unauthenticated = httpx2.post(url + "/admin/profile", content=yaml.safe_dump(GUIDE_ONLY), timeout=10)
        assert unauthenticated.status_code == 401
        assert profile_of(url)["sha256"] == first["sha256"]
        assert handling(client) == "retry:DCV"

        # The kind of finding now only guides: the same turn passes, guided on the next one.
        pushed = push(written(tmp_path, "guide", GUIDE_ONLY), "--url", url)
        assert pushed.returncode == 0, pushed.stderr
        assert json.loads(pushed.stdout) == {"version": 1, "sha256": sha(GUIDE_ONLY), "source": "pushed"}
        now = profile_of(url)
        assert (now["version"], now["source"], now["sha256"]) == (1, "pushed", sha(GUIDE_ONLY))
        assert now["profile"]["findings"]["DCV/write_without_confirmation"]["action"] == "guide"
        assert handling(client) == "none"

        # A JSON body works too; no retries left: the same turn is blocked.
        answer = httpx2.post(
            url + "/admin/profile",
            content=json.dumps(NO_RETRIES),
            headers={**ADMIN, "content-type": "application/json"},
            timeout=10,
        )
        assert answer.status_code == 200, answer.text
        assert answer.json()["version"] == 2
        assert handling(client) == "block:DCV"

        info = profile_info(httpx2.get(url + "/metrics", timeout=10).text)
        assert info == {(sha(NO_RETRIES)[:12], "2"): 1.0}  # the old label sets are gone
        assert proxied.metrics.registry.get_sample_value(
            "fama_profile_info", {"hash": sha(NO_RETRIES)[:12], "version": "2"}
        )


def test_a_turn_in_flight_finishes_under_the_profile_it_started_with(tmp_path: Path) -> None:
    asked, release = threading.Event(), threading.Event()
    first_request = [True]

    def reply(body: dict[str, Any]) -> dict[str, Any]:
        if feedback_in(body):
            return {"content": QUESTION}
        if first_request[0]:
            first_request[0] = False
            asked.set()
            release.wait(10)  # the model is still thinking while the profile changes
        return {"tool_calls": [CANCEL]}

    model = ScriptedModel(reply)
    with proxy_for(model, tmp_path, mode="enforce", admin_key=ADMIN_KEY, profile=FIRST) as (client, _):
        url = str(client.base_url).removesuffix("/v1/")
        with ThreadPoolExecutor(1) as pool:
            in_flight = pool.submit(handling, client)
            assert asked.wait(10)
            answer = httpx2.post(url + "/admin/profile", content=yaml.safe_dump(GUIDE_ONLY), headers=ADMIN)
            assert answer.status_code == 200
            release.set()
            assert in_flight.result(timeout=30) == "retry:DCV"  # judged under the profile it started with
        assert handling(client) == "none"  # the next turn: the new one


def test_a_push_to_several_workers_without_redis_is_refused(tmp_path: Path) -> None:
    model = ScriptedModel(cancels_until_told)
    with proxy_for(model, tmp_path, admin_key=ADMIN_KEY, profile=FIRST, workers=2) as (client, _):
        url = str(client.base_url).removesuffix("/v1/")
        answer = httpx2.post(url + "/admin/profile", content=yaml.safe_dump(GUIDE_ONLY), headers=ADMIN, timeout=10)
        assert answer.status_code == 409
        assert answer.json()["error"]["code"] == "profile_not_shared"
        assert profile_of(url)["sha256"] == sha(FIRST)


def test_the_detector_judges_a_turn_under_the_profile_its_proxy_named() -> None:
    holder = ProfileHolder.of(parse_profile(FIRST))
    engines = Engines(holder)
    event = TurnEvent(
        session_id="s", messages=LOOKED_UP, tools=TOOLS, candidate={"role": "assistant", "tool_calls": [CANCEL]}
    )

    def action(profile: dict[str, Any] | None) -> Action:
        turn = event.model_copy(update={"profile_sha256": sha(profile) if profile is not None else None})
        return engines.of(turn).evaluate(turn).action

    assert action(FIRST) is Action.RETRY
    holder.offer(ActiveProfile(parse_profile(GUIDE_ONLY), 1, "pushed"))
    assert action(FIRST) is Action.RETRY  # a turn its proxy judged under the old profile, still held
    assert action(GUIDE_ONLY) is Action.GUIDE
    assert action(None) is Action.GUIDE  # no profile named: the current one
    for version, name in enumerate("abc", start=2):
        holder.offer(ActiveProfile(parse_profile({**GUIDE_ONLY, "name": name}), version, "pushed"))
    assert action(FIRST) is Action.GUIDE  # long gone: the current profile judges it


def test_a_key_known_only_at_run_time_is_redacted_from_then_on() -> None:
    # A pushed profile's judge.api_key_env may name a key the logging set-up (from the file's profile) never saw.
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.addFilter(RedactSecrets())
    logger = logging.getLogger("tests.redact-also")
    logger.addHandler(handler)
    try:
        redact_also("judge-key-from-a-pushed-profile", loggers=["tests.redact-also"])
        logger.warning("calling the judge with %s", "judge-key-from-a-pushed-profile")
    finally:
        logger.removeHandler(handler)
    assert "judge-key-from-a-pushed-profile" not in stream.getvalue()
    assert REDACTED in stream.getvalue()


async def _held(holder: ProfileHolder, profile: dict[str, Any], version: int) -> None:
    """Returns once ``holder`` holds ``profile`` as ``version`` (fails after the time allowed)."""
    there = asyncio.Event()

    def swapped(old: ActiveProfile, new: ActiveProfile) -> None:
        if (new.sha256, new.version) == (sha(profile), version):
            there.set()

    holder.listen(swapped)
    async with asyncio.timeout(SWITCH_S):
        await there.wait()


@pytest.mark.redis
async def test_the_watch_follows_the_store_and_keeps_its_profile_through_faults(
    redis_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    client = AsyncRedis.from_url(redis_url)
    holder = ProfileHolder.of(parse_profile(FIRST))
    watch = ProfileWatch(client, holder, poll_s=0.02)
    try:
        await watch.start()
        assert (holder.current.version, holder.current.source) == (0, "file")  # nothing stored: the file's
        await push_profile(client, parse_profile(GUIDE_ONLY))
        await _held(holder, GUIDE_ONLY, 1)

        # A document this build cannot read: logged once, the profile in force stays.
        await client.hset(keys.PROFILE_KEY, mapping={"version": 2, "document": b"{not json"})
        await asyncio.sleep(0.2)
        assert (holder.current.version, holder.current.sha256) == (1, sha(GUIDE_ONLY))
        assert sum("stored profile (version 2) is not JSON" in r.getMessage() for r in caplog.records) == 1

        # The store emptied: nothing to follow, the profile in force stays.
        await client.flushall()
        await asyncio.sleep(0.2)
        assert holder.current.version == 1

        # Pushed again after the reset (version 1 again): the store wins, though its version is not newer.
        await push_profile(client, parse_profile(NO_RETRIES))
        await _held(holder, NO_RETRIES, 1)
        assert holder.current.source == "pushed"
    finally:
        await watch.stop()
        await client.aclose()


@contextlib.contextmanager
def detector(redis_url: str, profile: Path, metrics_port: int, log: Path) -> Iterator[subprocess.Popen[bytes]]:
    """``fama detector`` as its own process; ready once its consumer group exists and its metrics answer."""
    with log.open("wb") as err:
        proc = subprocess.Popen(
            fama("detector"),
            env=fama_env(REDIS_URL=redis_url, PROFILE=str(profile), METRICS_PORT=str(metrics_port)),
            stdout=subprocess.DEVNULL,
            stderr=err,
        )
    try:
        wait_for_port(metrics_port)
        wait_for_detector_group(redis_url, proc)
        assert proc.poll() is None, log.read_text()
        yield proc
    finally:
        stop_process(proc, timeout=30)


@contextlib.contextmanager
def replica(upstream: str, redis_url: str, profile: Path) -> Iterator[str]:
    """``fama serve`` in enforce mode over Redis; yields its URL once it answers."""
    port = free_port()
    proc = start_fama_serve(
        upstream + "/v1", port, REDIS_URL=redis_url, MODE="enforce", PROFILE=str(profile), ADMIN_KEY=ADMIN_KEY
    )
    try:
        wait_for_port(port)
        yield f"http://127.0.0.1:{port}"
    finally:
        stop_process(proc, timeout=30)
        if proc.stderr is not None:
            proc.stderr.close()


def until(check: Callable[[], bool], timeout: float) -> float:
    """Seconds until ``check()`` held; fails after ``timeout``."""
    start = time.monotonic()
    while not check():
        assert time.monotonic() - start < timeout, "not within the time allowed"
        time.sleep(0.02)
    return time.monotonic() - start


class Traffic:
    """The same turn sent to each replica in turn, one after the other, while a profile is pushed."""

    def __init__(self, clients: dict[str, openai.OpenAI]) -> None:
        self.clients = clients
        self.seen: dict[str, list[str]] = {name: [] for name in clients}
        self.failures: list[BaseException] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            for name, client in self.clients.items():
                try:
                    self.seen[name].append(handling(client))
                except Exception as exc:  # every failure is reported by the test, none is lost
                    self.failures.append(exc)

    def __enter__(self) -> Traffic:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=30)


@pytest.mark.redis
def test_a_push_reaches_both_replicas_and_the_detector_within_two_seconds(redis_url: str, tmp_path: Path) -> None:
    file = written(tmp_path, "first", FIRST)
    detector_port = free_port()
    model = ScriptedModel(cancels_until_told)
    with contextlib.ExitStack() as stack:
        upstream = stack.enter_context(serve_in_thread(model.app))
        stack.enter_context(detector(redis_url, file, detector_port, tmp_path / "detector.log"))
        urls = [stack.enter_context(replica(upstream, redis_url, file)) for _ in range(2)]
        clients = {url: stack.enter_context(sdk(url)) for url in urls}

        def hashes() -> set[str]:
            return {profile_of(url)["sha256"] for url in urls}

        def detector_runs(profile: dict[str, Any], version: int) -> bool:
            text = httpx2.get(f"http://127.0.0.1:{detector_port}/metrics", timeout=10).text
            return profile_info(text) == {(sha(profile)[:12], str(version)): 1.0}

        assert hashes() == {sha(FIRST)}
        assert detector_runs(FIRST, 0)
        assert [handling(c) for c in clients.values()] == ["retry:DCV", "retry:DCV"]

        # A bad profile, pushed to one replica: 400 naming the field; no replica and no detector changes.
        refused = push(written(tmp_path, "bad", BAD), "--url", urls[1])
        assert refused.returncode == 1
        assert "actions.DCV" in refused.stderr
        time.sleep(1.0)  # more than a poll: nothing was stored for the others to take
        assert hashes() == {sha(FIRST)}
        assert detector_runs(FIRST, 0)
        assert [handling(c) for c in clients.values()] == ["retry:DCV", "retry:DCV"]

        # The kind of finding now only guides: pushed to one replica while both serve turns, none dropped.
        with Traffic(clients) as traffic:
            time.sleep(0.5)
            pushed = push(written(tmp_path, "guide", GUIDE_ONLY), "--url", urls[0])
            assert pushed.returncode == 0, pushed.stderr
            switch_s = until(lambda: hashes() == {sha(GUIDE_ONLY)} and detector_runs(GUIDE_ONLY, 1), SWITCH_S)
            time.sleep(0.5)
        # Each replica says when it took the profile; the push says when it was stored (one host, one clock).
        lags_ms = [(d["in_force_since_ms"] - d["pushed_ms"]) for d in map(profile_of, urls)]
        print(f"\nreplicas took the pushed profile {lags_ms} ms after it was stored; all processes, the detector")
        print(f"included, were seen on it {switch_s:.3f}s after `fama profile push` returned")
        assert all(0 <= lag <= SWITCH_S * 1000 for lag in lags_ms)
        assert not traffic.failures, traffic.failures
        for seen in traffic.seen.values():
            assert seen
            assert set(seen) <= {"retry:DCV", "none"}
            # Each turn is handled under one profile: old ones first, then only new ones.
            assert seen == sorted(seen, key=lambda h: h == "none"), seen
        assert [handling(c) for c in clients.values()] == ["none", "none"]
        described = profile_of(urls[1])
        assert (described["version"], described["source"]) == (1, "pushed")

        # Straight into Redis: no retries left, the same turn is blocked on both replicas.
        pushed = push(written(tmp_path, "no-retries", NO_RETRIES), "--redis-url", redis_url)
        assert pushed.returncode == 0, pushed.stderr
        until(lambda: hashes() == {sha(NO_RETRIES)} and detector_runs(NO_RETRIES, 2), SWITCH_S)
        assert [handling(c) for c in clients.values()] == ["block:DCV", "block:DCV"]

        # A replica started later takes the stored profile over its file: the pushed one is newer.
        late = stack.enter_context(replica(upstream, redis_url, file))
        described = profile_of(late)
        assert (described["version"], described["sha256"]) == (2, sha(NO_RETRIES))
        with sdk(late) as client:
            assert handling(client) == "block:DCV"
