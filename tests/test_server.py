"""``fama serve`` process plumbing that needs no model: settings handed to worker processes."""

from __future__ import annotations

import pytest
from pydantic import SecretStr

from detector_service.contract.profile import Mode
from proxy.server import SETTINGS_ENV, settings_from_env, settings_to_env
from proxy.settings import ProxySettings


def _plain(settings: ProxySettings) -> dict[str, object]:
    def unwrap(value: object) -> object:
        if isinstance(value, SecretStr):
            return ("secret", value.get_secret_value())
        if isinstance(value, list):
            return [unwrap(v) for v in value]
        return value

    return {name: unwrap(getattr(settings, name)) for name in type(settings).model_fields}


def test_worker_settings_keep_every_value_including_secrets(monkeypatch: pytest.MonkeyPatch) -> None:
    sent = ProxySettings(
        upstream_url="http://model:8000/v1",
        upstream_api_key=SecretStr("sk-upstream-1234"),
        api_keys=[SecretStr("client-key-1"), SecretStr("client-key-2")],
        admin_key=SecretStr("admin-key-5678"),
        mode=Mode.ENFORCE,
        workers=3,
        port=9001,
        read_timeout_s=42.5,
        local_model=True,
    )
    # A worker's environment still holds whatever FAMA_* the parent was started with; the parent's
    # resolved settings (flags over environment) must win.
    monkeypatch.setenv("FAMA_PORT", "1234")
    monkeypatch.setenv("FAMA_MODE", "observe")
    received = settings_from_env({SETTINGS_ENV: settings_to_env(sent)})
    assert _plain(received) == _plain(sent)
    assert received.mode is Mode.ENFORCE
