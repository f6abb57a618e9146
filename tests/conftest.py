from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from proxy.local_model.model import LLAMA_CPP_PYTHON, XLLAMACPP, LocalModel
from tests.llama import running_llama
from tests.servers import RedisServer, shared_dir


@pytest.fixture(scope="session")
def shared() -> Path:
    return shared_dir()


@pytest.fixture(scope="session")
def tau_dir(shared: Path) -> Path:
    path = shared / "data" / "tau"
    if not (path / "trajectories").is_dir():
        pytest.skip(f"tau-bench data not found at {path} (set FAMA_SHARED_DIR to the shared/ folder)")
    return path


@pytest.fixture(scope="session")
def openai_schemas(shared: Path) -> Path:
    path = shared / "data" / "openai"
    if not path.is_dir():
        pytest.skip(f"OpenAI JSON Schemas not found at {path} (set FAMA_SHARED_DIR to the shared/ folder)")
    return path


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed (apt-get install -y redis-server)")
    server = RedisServer()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    """A clean database for each test on the session's redis-server."""
    import redis

    client = redis.Redis.from_url(redis_server.url)
    client.flushall()
    client.close()
    return redis_server.url


@pytest.fixture(scope="session")
def llama_server() -> Iterator[LocalModel]:
    """llama-cpp-python's server with the PyPI-shipped model, one per session; skips when it is not installed."""
    with running_llama(LLAMA_CPP_PYTHON) as model:
        yield model


@pytest.fixture(scope="session")
def xllamacpp_server() -> Iterator[LocalModel]:
    """xllamacpp's llama.cpp server (the local model's default) with the PyPI-shipped model, one per session."""
    with running_llama(XLLAMACPP) as model:
        yield model
