"""Real llama.cpp servers with the PyPI-shipped model, for tests (one per test session and server).

``llama_server`` runs llama-cpp-python's server: its grammar turns a ``tool_choice`` naming one function into
that call, which the tests needing a real model's tool call rely on. ``xllamacpp_server`` runs the default
server of ``fama serve --local-model``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import pytest

from proxy.local_model.model import (
    LLAMA_CPP_PYTHON,
    LocalModel,
    LocalModelError,
    LocalModelOptions,
    bundled_model_path,
    installed_server,
)
from tests.servers import free_port


def unavailable_reason(server: str | None = LLAMA_CPP_PYTHON) -> str | None:
    """Why the bundled model cannot run on ``server`` (None: on any server) here, or None when it can."""
    try:
        installed_server(server)
        bundled_model_path()
    except LocalModelError as e:
        return str(e)
    return None


@contextlib.contextmanager
def running_llama(server: str = LLAMA_CPP_PYTHON) -> Iterator[LocalModel]:
    """Start the bundled model on a free loopback port; skip the requesting test when it is not installed."""
    reason = unavailable_reason(server)
    if reason is not None:
        pytest.skip(reason)
    options = LocalModelOptions(model_path=bundled_model_path(), port=free_port(), server=server)
    with LocalModel(options) as model:
        yield model
