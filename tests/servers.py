"""Real servers on loopback for tests: uvicorn in a thread, and redis-server as a subprocess."""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import uvicorn

from proxy.bench.processes import free_port as free_port
from proxy.bench.processes import wait_for_port as wait_for_port


@contextlib.contextmanager
def refused_url() -> Iterator[str]:
    """A ``/v1`` base URL on 127.0.0.1 that refuses connections: its port is bound but not listening, and stays bound
    (ours) until the block ends, so no server started meanwhile (the proxy's own) can be given it."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield f"http://127.0.0.1:{sock.getsockname()[1]}/v1"


class _ThreadServer(uvicorn.Server):
    def install_signal_handlers(self) -> None:  # the test runner owns signals
        pass


@contextlib.contextmanager
def serve_in_thread(app: Any, port: int | None = None, **config: Any) -> Iterator[str]:
    """Run an ASGI app with uvicorn on 127.0.0.1 in a background thread; yield its base URL."""
    port = port or free_port()
    cfg = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on", **config)
    server = _ThreadServer(cfg)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("uvicorn test server failed to start")
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def stop_process(proc: subprocess.Popen[bytes], timeout: float = 30) -> None:
    """SIGTERM, then SIGKILL if the process has not exited within ``timeout`` seconds."""
    proc.terminate()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


class RedisServer:
    """A real redis-server on a free loopback port, with its own temp dir."""

    def __init__(self) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise FileNotFoundError("redis-server is not installed (apt-get install -y redis-server)")
        self.port = free_port()
        self._dir = tempfile.TemporaryDirectory(prefix="fama-redis-")
        self._proc = subprocess.Popen(
            [
                binary,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                self._dir.name,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_for_port(self.port)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def stop(self) -> None:
        stop_process(self._proc, timeout=5)
        self._dir.cleanup()


def shared_dir() -> Path:
    import os

    env = os.environ.get("FAMA_SHARED_DIR")
    if env:
        return Path(env)
    return Path(__file__).resolve().parent.parent.parent / "shared"


ROOT = Path(__file__).resolve().parent.parent


def wait_for_detector_group(redis_url: str, proc: subprocess.Popen[bytes], timeout_s: float = 20) -> None:
    """Until ``fama detector`` (``proc``) has created its consumer group on the turn stream, or exited."""
    import redis

    from detector_service.bus import keys

    client = redis.Redis.from_url(redis_url)
    try:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and proc.poll() is None:
            with contextlib.suppress(redis.ResponseError):
                if any(g["name"] == keys.DETECTOR_GROUP.encode() for g in client.xinfo_groups(keys.TURNS_STREAM)):
                    return
            time.sleep(0.05)
    finally:
        client.close()


@contextlib.contextmanager
def detector_worker(redis_url: str, **settings: str) -> Iterator[None]:
    """``fama detector`` as its own process, stopped with SIGTERM like an orchestrator would; ready once its consumer
    group exists on the turn stream. ``settings`` are ``FAMA_*`` variables without the prefix."""
    import os
    import sys

    env = {
        "FAMA_METRICS_PORT": "0",
        "PATH": "/usr/bin:/bin",
        "PYTHONPATH": os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]),
        **{f"FAMA_{name}": value for name, value in settings.items()},
    }
    proc = subprocess.Popen(
        [sys.executable, "-c", "from proxy.cli import main; main()", "detector", "--redis-url", redis_url],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        wait_for_detector_group(redis_url, proc)
        assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
        yield
    finally:
        stop_process(proc, timeout=30)
        if proc.stderr is not None:
            proc.stderr.close()


def fama_env(**settings: str) -> dict[str, str]:
    """The environment of a ``fama`` child process: this one's without its ``FAMA_*`` variables, this checkout first
    on ``PYTHONPATH``, plus ``settings`` (``FAMA_*`` variables without the prefix)."""
    import os

    env = {k: v for k, v in os.environ.items() if not k.startswith("FAMA_")}
    env.update(
        PYTHONPATH=os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]),
        FAMA_LOG_LEVEL="warning",
        **{f"FAMA_{name}": value for name, value in settings.items()},
    )
    return env


def start_fama_serve(upstream_url: str, port: int, **settings: str) -> subprocess.Popen[bytes]:
    """``fama serve`` as its own process on 127.0.0.1:``port`` in front of ``upstream_url`` (with ``/v1``);
    ``settings`` are ``FAMA_*`` variables without the prefix (``REQUEST_READ_TIMEOUT_S="3"``). Stop it with
    :func:`stop_process`; its stderr is a pipe (read or close it)."""
    import sys

    env = fama_env(UPSTREAM_URL=upstream_url, HOST="127.0.0.1", PORT=str(port), **settings)
    return subprocess.Popen(
        [sys.executable, "-c", "from proxy.cli import main; main()", "serve"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


def run_fama(*args: str, timeout: float = 120, **settings: str) -> subprocess.CompletedProcess[str]:
    """``fama ARGS...`` run to its end as its own process (this checkout first on its path); ``settings`` are
    ``FAMA_*`` variables without the prefix. Its exit code, stdout and stderr are in the result."""
    import os
    import sys

    env = {k: v for k, v in os.environ.items() if not k.startswith("FAMA_")}
    env.update(
        PYTHONPATH=os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]),
        **{f"FAMA_{name}": value for name, value in settings.items()},
    )
    entry = "import sys; from proxy.cli import main; sys.argv[0] = 'fama'; main()"
    return subprocess.run(
        [sys.executable, "-c", entry, *args], env=env, capture_output=True, text=True, timeout=timeout, check=False
    )
