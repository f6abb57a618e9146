"""The services as the soak (and the tests of whole runs) start them: ``fama serve``, ``fama detector`` and
``redis-server`` as real processes on 127.0.0.1, each with its output in a file, its RSS readable from ``/proc``.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

# The checkout this module runs from: children import the same code, also from a worktree not installed.
SOURCE_ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def wait_for_port(port: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return
        time.sleep(0.02)
    raise TimeoutError(f"nothing listening on 127.0.0.1:{port} after {timeout}s")


def fama(*args: str) -> list[str]:
    """The ``fama`` command line, run by this interpreter."""
    return [sys.executable, "-c", "from proxy.cli import main; main()", *args]


def service_env(**fama_settings: str) -> dict[str, str]:
    """This environment without its ``FAMA_*`` variables, plus ``fama_settings``; children import this checkout."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FAMA_")}
    env["PYTHONPATH"] = os.pathsep.join([str(SOURCE_ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])
    env.update(fama_settings)
    return env


def rss_bytes(pid: int) -> int | None:
    """Resident set size of a process (``VmRSS``); None once it is gone or where ``/proc`` is missing."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


class Service:
    """One process with stdout and stderr in ``<logdir>/<name>.log``."""

    def __init__(self, name: str, cmd: list[str], env: dict[str, str], logdir: Path) -> None:
        self.name = name
        self.cmd = cmd
        self.env = env
        self.log = logdir / f"{name}.log"
        self.proc = self._start()

    def _start(self) -> subprocess.Popen[bytes]:
        with self.log.open("ab") as out:
            return subprocess.Popen(self.cmd, env=self.env, stdout=out, stderr=subprocess.STDOUT)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def rss(self) -> int | None:
        return rss_bytes(self.proc.pid) if self.proc.poll() is None else None

    def output(self, tail: int = 4000) -> str:
        return self.log.read_text(errors="replace")[-tail:]

    def check_alive(self) -> None:
        if self.proc.poll() is not None:
            raise RuntimeError(f"{self.name} exited with {self.proc.returncode}:\n{self.output()}")

    def stop(self, timeout: float = 30.0) -> None:
        if self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def restart(self) -> None:
        self.stop()
        self.proc = self._start()


def redis_binary() -> str:
    found = shutil.which("redis-server")
    if found is None:
        raise FileNotFoundError("redis-server is not installed (apt-get install -y redis-server)")
    return found


def redis_args(port: int, workdir: Path, *extra: str) -> list[str]:
    """A throwaway redis-server on loopback: no persistence, its files in ``workdir``."""
    return [
        redis_binary(),
        "--port",
        str(port),
        "--bind",
        "127.0.0.1",
        "--save",
        "",
        "--appendonly",
        "no",
        "--dir",
        str(workdir),
        *extra,
    ]
