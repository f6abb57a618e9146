"""Entry of the local model's child process: the llama.cpp server, bound to the life of ``fama serve``.

``python -m proxy.local_model.child <llama_cpp.server arguments>``. The server runs in its own session (so
a terminal's Ctrl-C reaches only the proxy), which also means nothing stops it if the proxy dies without
cleaning up (SIGKILL, the OOM killer). A watcher thread notices the parent is gone and stops the server,
the same on Linux and macOS.
"""

from __future__ import annotations

import os
import runpy
import signal
import threading
import time

PARENT_ENV = "FAMA_LOCAL_MODEL_PARENT_PID"
_POLL_S = 1.0
_GRACE_S = 10.0


def _stop_when_orphaned(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(_POLL_S)
    os.kill(os.getpid(), signal.SIGTERM)  # the server's graceful shutdown
    time.sleep(_GRACE_S)
    os._exit(1)  # it did not finish in time


def main() -> None:
    parent = int(os.environ.pop(PARENT_ENV, os.getppid()))
    threading.Thread(target=_stop_when_orphaned, args=(parent,), name="parent-watch", daemon=True).start()
    runpy.run_module("llama_cpp.server", run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
