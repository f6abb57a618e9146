"""Typed settings for ``fama detector``."""

from __future__ import annotations

import os
import socket

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict


def _default_consumer() -> str:
    # Several ``fama detector`` processes may share one host (or pod) name; a shared consumer name
    # would make them claim each other's pending entries as their own.
    return f"{socket.gethostname()}-{os.getpid()}"


class DetectorSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="FAMA_", extra="ignore")

    redis_url: str = "redis://127.0.0.1:6379/0"
    profile: str = ""
    consumer_name: str = Field(default_factory=_default_consumer)
    metrics_host: str = "0.0.0.0"
    metrics_port: int = Field(default=9100, ge=0, le=65535)
    batch_size: int = Field(default=64, ge=1)
    block_ms: int = Field(default=1000, ge=1)
    claim_idle_ms: int = Field(default=30_000, ge=100)
    max_deliveries: int = Field(default=3, ge=1)
    stream_maxlen: int = Field(default=100_000, ge=100)
    drain_timeout_s: float = Field(default=20.0, gt=0)
    reply_maxlen: int = Field(default=10_000, ge=100)  # per proxy reply stream
    reply_ttl_s: int = Field(default=300, ge=1)  # a dead proxy's reply stream vanishes after this
    log_level: str = "info"
    judge_concurrency: int = Field(default=16, ge=1)  # LLM judge calls in flight at once, per process
    judge_api_key: SecretStr | None = None  # else the variable named by the profile's judge.api_key_env
