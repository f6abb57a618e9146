"""The proxy as the harness sees it from outside: ``fama serve`` started as a process per supervised arm (or a
running one at ``--proxy-url``), the session outcome each episode reports, and the session's recorded interventions
read back through the admin API."""

from __future__ import annotations

import hashlib
import secrets
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx2

from proxy.bench.processes import Service, fama, free_port, service_env, wait_for_port

SUPERVISED_ARMS = ("observe", "enforce")
TIMEOUT_S = 30.0
START_TIMEOUT_S = 180.0  # a loaded machine takes a while to import the proxy


def root_of(url: str) -> str:
    """``http://host:8080`` from ``http://host:8080`` or ``http://host:8080/v1``."""
    url = url.rstrip("/")
    return url.removesuffix("/v1")


def tenants_for(api_key: str | None) -> list[str]:
    """Where a session of this client key is recorded: ``default`` without ``FAMA_API_KEYS`` on the proxy, else
    ``t-`` + 16 hex digits of the key's SHA-256 (README, "Admin reads")."""
    found = ["default"]
    if api_key:
        found.append("t-" + hashlib.sha256(api_key.encode()).hexdigest()[:16])
    return found


@dataclass(slots=True)
class ProxyClient:
    """Outcome reports and admin reads against one proxy."""

    root: str
    api_key: str | None = None
    admin_key: str | None = None

    @property
    def v1(self) -> str:
        return f"{self.root}/v1"

    def report_outcome(self, session_id: str, success: bool, reward: float, note: str) -> dict[str, Any]:
        """POST the outcome; the proxy's answer (``intervened``) or ``{"error": ...}`` when it refused it."""
        headers = {"authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        body = {"outcome": "success" if success else "failure", "reward": reward, "note": note[:2000]}
        try:
            response = httpx2.post(
                f"{self.v1}/fama/sessions/{session_id}/outcome", json=body, headers=headers, timeout=TIMEOUT_S
            )
        except httpx2.HTTPError as exc:
            return {"error": f"{type(exc).__name__}: {exc}"}
        answer: dict[str, Any] = (
            response.json() if response.headers.get("content-type", "").startswith("application/json") else {}
        )
        if response.status_code != 200:
            return {"error": f"{response.status_code}: {answer.get('error', {}).get('message', response.text[:200])}"}
        return answer

    def session_entries(self, session_id: str) -> list[dict[str, Any]] | None:
        """The recorded session (turns, verdicts, interventions, outcome); None without an admin key or record."""
        if not self.admin_key:
            return None
        headers = {"authorization": f"Bearer {self.admin_key}"}
        for tenant in tenants_for(self.api_key):
            try:
                response = httpx2.get(
                    f"{self.root}/admin/sessions/{tenant}/{session_id}", headers=headers, timeout=TIMEOUT_S
                )
            except httpx2.HTTPError:
                return None
            if response.status_code == 200:
                entries = response.json().get("entries")
                return entries if isinstance(entries, list) else None
        return None


def interventions(entries: list[dict[str, Any]]) -> dict[str, dict[str, int]]:
    """What the proxy changed (``interventions``) and what its verdicts asked for (``verdicts``, not ``pass``), as
    counts of ``action:CATEGORY``."""
    changed: Counter[str] = Counter()
    asked: Counter[str] = Counter()
    for entry in entries:
        data = entry.get("data") or {}
        if entry.get("kind") == "intervention":
            for category in data.get("categories") or ["-"]:
                changed[f"{data.get('action')}:{category}"] += 1
        elif entry.get("kind") == "verdict" and data.get("action") not in (None, "pass"):
            for category in sorted({f.get("category") for f in data.get("findings") or []}) or ["-"]:
                asked[f"{data.get('action')}:{category}"] += 1
    return {"interventions": dict(changed), "verdicts": dict(asked)}


class StartedProxy:
    """``fama serve`` in one mode in front of the model server, on a free loopback port, with an admin key of its
    own so the harness can read each session's record."""

    def __init__(self, mode: str, upstream_url: str, profile: Path | None, logdir: Path) -> None:
        self.port = free_port()
        self.admin_key = secrets.token_urlsafe(24)
        settings = {
            "FAMA_UPSTREAM_URL": upstream_url,
            "FAMA_MODE": mode,
            "FAMA_HOST": "127.0.0.1",
            "FAMA_PORT": str(self.port),
            "FAMA_ADMIN_KEY": self.admin_key,
            "FAMA_LOG_LEVEL": "warning",
        }
        if profile is not None:
            settings["FAMA_PROFILE"] = str(profile)
        self.service = Service(f"proxy-{mode}", fama("serve"), service_env(**settings), logdir)
        try:
            self._wait_ready()
        except (TimeoutError, RuntimeError):
            self.service.stop()
            raise

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            self.service.check_alive()
            try:
                wait_for_port(self.port, timeout=1.0)
                return
            except TimeoutError:
                if time.monotonic() > deadline:
                    raise TimeoutError(
                        f"fama serve ({self.service.name}) not listening after {START_TIMEOUT_S:.0f}s"
                    ) from None

    def client(self, api_key: str | None) -> ProxyClient:
        return ProxyClient(f"http://127.0.0.1:{self.port}", api_key=api_key, admin_key=self.admin_key)

    def stop(self) -> None:
        self.service.stop()
