"""Admin reads behind FAMA_ADMIN_KEY, against the proxy on a real uvicorn after real supervised traffic."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx2
import pytest

from proxy.edge.auth import DEFAULT_TENANT
from tests.supervised_upstream import ScriptedModel
from tests.supervision_harness import CANCEL, LOOKED_UP, TOOLS, always_cancels, cancels_until_told, proxy_for

ADMIN_KEY = "admin-key-0123456789"
PROFILE = {"version": 1, "name": "ops", "mode": "enforce", "agents": ["Verifier", "Memory"], "deadline_ms": 400}


@pytest.fixture
def supervised(tmp_path: Path) -> Iterator[str]:
    """A proxy with an admin key that has corrected one session (retry) and blocked another; yields its URL."""

    def reply(body: dict[str, Any]) -> dict[str, Any]:
        if any(m["role"] == "user" and str(m["content"]).endswith("thanks.") for m in body["messages"]):
            return always_cancels(body)
        return cancels_until_told(body)

    model = ScriptedModel(reply)
    with proxy_for(model, tmp_path, mode="enforce", admin_key=ADMIN_KEY, profile=PROFILE) as (client, _app):
        client.chat.completions.create(
            model="m", messages=LOOKED_UP, tools=TOOLS, extra_headers={"x-fama-session": "corrected"}
        )
        blocked: list[Any] = [
            LOOKED_UP[0],
            {"role": "user", "content": "Please cancel my reservation ZFA04Y, thanks."},
            *LOOKED_UP[2:],
        ]
        client.chat.completions.create(
            model="m", messages=blocked, tools=TOOLS, extra_headers={"x-fama-session": "blocked"}
        )
        yield str(client.base_url).removesuffix("/v1/")


def _get(url: str, path: str, key: str | None = ADMIN_KEY) -> httpx2.Response:
    headers = {"authorization": f"Bearer {key}"} if key is not None else {}
    return httpx2.get(url + path, headers=headers, timeout=10)


PATHS = [f"/admin/sessions/{DEFAULT_TENANT}/corrected", "/admin/interventions", "/admin/profile"]


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("key", [None, "wrong-admin-key", "client-key"])
def test_admin_needs_the_admin_key(supervised: str, path: str, key: str | None) -> None:
    answer = _get(supervised, path, key)
    assert answer.status_code == 401
    error = answer.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert error["code"] == "invalid_api_key"


def test_the_admin_key_is_never_logged(supervised: str, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.DEBUG):
        assert _get(supervised, "/admin/profile", "wrong-admin-key").status_code == 401
        assert _get(supervised, "/admin/profile").status_code == 200
    assert ADMIN_KEY not in caplog.text
    assert "wrong-admin-key" not in caplog.text


def test_admin_reads_the_recorded_session(supervised: str) -> None:
    answer = _get(supervised, f"/admin/sessions/{DEFAULT_TENANT}/corrected")
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["session_id"] == "corrected"
    assert body["tenant"] == DEFAULT_TENANT
    kinds = [entry["kind"] for entry in body["entries"]]
    assert kinds[0] == "turn"
    assert "verdict" in kinds
    [intervention] = [e for e in body["entries"] if e["kind"] == "intervention"]
    assert intervention["data"]["action"] == "retry"
    assert intervention["data"]["categories"] == ["DCV"]
    assert intervention["data"]["original"]["tool_calls"][0]["function"]["name"] == CANCEL["function"]["name"]


def test_admin_answers_404_for_a_session_never_recorded(supervised: str) -> None:
    for path in (f"/admin/sessions/{DEFAULT_TENANT}/never-seen", "/admin/sessions/another-tenant/corrected"):
        answer = _get(supervised, path)
        assert answer.status_code == 404
        assert answer.json()["error"]["code"] == "unknown_session"


def test_admin_lists_recent_interventions_newest_first_and_bounded(supervised: str) -> None:
    answer = _get(supervised, "/admin/interventions")
    assert answer.status_code == 200, answer.text
    data = answer.json()["data"]
    sessions = [i["session_id"] for i in data]
    # The blocked session's turn came last: retried (twice, the profile's max_retries), then blocked.
    assert sessions[0] == "blocked"
    assert data[0]["action"] == "block"
    assert sessions[-1] == "corrected"
    assert [i["ts_ms"] for i in data] == sorted((i["ts_ms"] for i in data), reverse=True)

    limited = _get(supervised, "/admin/interventions?limit=1").json()["data"]
    assert limited == data[:1]
    for bad in ("0", "1001", "many"):
        refused = _get(supervised, f"/admin/interventions?limit={bad}")
        assert refused.status_code == 400
        assert refused.json()["error"]["param"] == "limit"


def test_admin_shows_the_active_profile(supervised: str) -> None:
    answer = _get(supervised, "/admin/profile")
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["mode"] == "enforce"
    assert body["profile"]["name"] == "ops"
    assert body["profile"]["deadline_ms"] == 400
    assert body["profile"]["agents"] == ["Verifier", "Memory"]


@pytest.mark.parametrize("path", PATHS)
def test_admin_is_disabled_without_an_admin_key(tmp_path: Path, path: str) -> None:
    with proxy_for(ScriptedModel(cancels_until_told), tmp_path, mode="enforce") as (client, _app):
        url = str(client.base_url).removesuffix("/v1/")
        for key in (None, "anything", ADMIN_KEY):
            answer = _get(url, path, key)
            assert answer.status_code == 403
            assert answer.json()["error"]["code"] == "admin_disabled"
