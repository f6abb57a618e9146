"""Typed settings for ``fama serve``. Built once at the edge (the CLI) and passed down."""

from __future__ import annotations

import socket
from typing import Annotated, Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from detector_service.contract.profile import Mode
from detector_service.contract.redaction import url_secrets

_PLACEHOLDERS = {"changeme", "change-me", "changethis", "secret", "xxx", "placeholder"}


def _default_instance() -> str:
    return socket.gethostname()


class ProxySettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="FAMA_", extra="ignore")

    upstream_url: str = "http://127.0.0.1:8000/v1"
    upstream_api_key: SecretStr | None = None  # None: pass the client's key through
    host: str = "127.0.0.1"
    port: int = Field(default=8080, ge=0, le=65535)
    # ``/metrics`` on its own port (then no longer on ``port``); unset: on ``port`` with the API.
    metrics_port: int | None = Field(default=None, ge=1, le=65535)
    metrics_host: str = ""  # empty: the same address as ``host``
    workers: int = Field(default=1, ge=1)
    redis_url: str = ""  # empty: embedded detectors
    mode: Mode = Mode.OBSERVE
    profile: str = ""
    api_keys: Annotated[list[SecretStr], NoDecode] = Field(default_factory=list)
    admin_key: SecretStr | None = None
    judge_api_key: SecretStr | None = None  # the LLM judge's key in embedded mode; else profile judge.api_key_env
    instance_id: str = Field(default_factory=_default_instance)
    # /v1/responses: forwarded to an upstream that serves it (native), translated to chat completions (bridge),
    # or whichever the upstream turns out to support (auto: probed once).
    upstream_responses: Literal["auto", "native", "bridge"] = "auto"

    connect_timeout_s: float = Field(default=5.0, gt=0)
    read_timeout_s: float = Field(default=600.0, gt=0)  # between bytes from upstream
    max_request_bytes: int = Field(default=16 * 1024 * 1024, gt=0)
    # Slow and greedy clients (proxy.edge.limits): a request's headers and body must arrive within this long of
    # its first byte (408 after); an idle connection is closed after keep_alive_timeout_s.
    request_read_timeout_s: float = Field(default=30.0, gt=0)
    keep_alive_timeout_s: int = Field(default=5, ge=1)
    max_header_bytes: int = Field(default=64 * 1024, ge=1024)
    # Per client address (0: no cap). Behind a load balancer all clients share its address: raise it or set 0.
    max_connections_per_client: int = Field(default=256, ge=0)
    # All connections and requests of one process (uvicorn's limit_concurrency; beyond it 503); 0: no cap.
    max_connections: int = Field(default=0, ge=0)
    max_upstream_connections: int = Field(default=512, ge=1)
    session_ttl_s: int = Field(default=7 * 24 * 3600, ge=60)
    sse_ping_s: float = Field(default=15.0, gt=0)
    graceful_shutdown_s: float = Field(default=25.0, gt=0)
    # Open SSE streams may run this long into a shutdown before they are cut; kept below graceful_shutdown_s
    # so uvicorn still closes the connections (and the app its resources) itself.
    sse_shutdown_grace_s: float = Field(default=20.0, ge=0)
    log_level: str = "info"
    access_log: bool = False

    local_model: bool = False
    local_model_port: int = Field(default=8090, ge=0, le=65535)

    def secrets(self) -> list[str]:
        """The keys these settings hold and the Redis password (the judge's key comes with the profile)."""
        keys = [self.admin_key, self.upstream_api_key, *self.api_keys]
        return [*(k.get_secret_value() for k in keys if k is not None), *url_secrets(self.redis_url)]

    @field_validator("api_keys", mode="before")
    @classmethod
    def _split_keys(cls, v: object) -> object:
        if isinstance(v, str):
            return [k.strip() for k in v.split(",") if k.strip()]
        return v

    @field_validator("api_keys")
    @classmethod
    def _no_placeholder_keys(cls, v: list[SecretStr]) -> list[SecretStr]:
        for key in v:
            if key.get_secret_value().lower() in _PLACEHOLDERS:
                raise ValueError("FAMA_API_KEYS contains a placeholder value; set real keys")
        return v

    @field_validator("admin_key", "upstream_api_key")
    @classmethod
    def _no_placeholder_secret(cls, v: SecretStr | None) -> SecretStr | None:
        if v is not None and v.get_secret_value().lower() in _PLACEHOLDERS:
            raise ValueError("a placeholder value was given for a secret; set a real one")
        if v is not None and v.get_secret_value() == "":
            return None
        return v

    @field_validator("upstream_url")
    @classmethod
    def _strip_slash(cls, v: str) -> str:
        v = v.strip()
        if not v.startswith(("http://", "https://")):
            raise ValueError("upstream_url must be an http(s) URL such as http://vllm:8000/v1")
        return v.rstrip("/")

    @field_validator("metrics_port", mode="before")
    @classmethod
    def _empty_is_unset(cls, v: object) -> object:
        return None if v == "" else v

    @model_validator(mode="after")
    def _metrics_apart(self) -> ProxySettings:
        if self.metrics_port is not None and self.metrics_port == self.port:
            raise ValueError(
                f"metrics_port ({self.metrics_port}) must differ from port: leave it unset to serve /metrics there"
            )
        return self

    @model_validator(mode="after")
    def _grace_within_shutdown(self) -> ProxySettings:
        if self.sse_shutdown_grace_s >= self.graceful_shutdown_s:
            raise ValueError(
                f"sse_shutdown_grace_s ({self.sse_shutdown_grace_s}) must be below graceful_shutdown_s "
                f"({self.graceful_shutdown_s}): set FAMA_SSE_SHUTDOWN_GRACE_S lower or FAMA_GRACEFUL_SHUTDOWN_S higher"
            )
        return self
