"""The local model's server process: llama.cpp's own OpenAI-compatible server, from the ``xllamacpp`` wheel.

``python -m proxy.local_model.child --model PATH [--alias NAME] [--host H] [--port P] ...`` serves the model
until SIGTERM or SIGINT; ``python -m proxy.local_model.child llama-cpp-python <its arguments>`` runs
llama-cpp-python's server instead. ``fama serve --local-model`` starts it as a child, and the ``local`` image
runs it as its entrypoint. The server runs in its own session (so a terminal's Ctrl-C reaches only the
proxy), which also means nothing stops it if the proxy dies without cleaning up (SIGKILL, the OOM killer). A
watcher thread notices the parent is gone and stops the server, the same on Linux and macOS.

Nothing here imports ``proxy``'s other modules: the process holds only the server.
"""

from __future__ import annotations

import argparse
import os
import runpy
import signal
import sys
import threading
import time

PARENT_ENV = "FAMA_LOCAL_MODEL_PARENT_PID"
_POLL_S = 1.0
_GRACE_S = 10.0
_STOP_SIGNALS = {signal.SIGTERM, signal.SIGINT}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m proxy.local_model.child", description="Serve a GGUF model with llama.cpp's server."
    )
    parser.add_argument("--model", required=True, help="GGUF file")
    parser.add_argument("--alias", default=None, help="model id served at /v1/models (default: the file's name)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--n-ctx", type=int, default=4096, help="context window, in tokens")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="threads generating tokens")
    parser.add_argument("--threads-batch", type=int, default=0, help="threads reading the prompt (0: --threads)")
    parser.add_argument("--chat-template-file", default="", help="Jinja chat template (default: the model's own)")
    return parser.parse_args(argv)


def _watch_parent() -> None:
    parent = int(os.environ.pop(PARENT_ENV, os.getppid()))
    threading.Thread(target=_stop_when_orphaned, args=(parent,), name="parent-watch", daemon=True).start()


def _stop_when_orphaned(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(_POLL_S)
    os.kill(os.getpid(), signal.SIGTERM)  # the graceful stop in main()
    time.sleep(_GRACE_S)
    os._exit(1)  # it did not finish in time


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["llama-cpp-python"]:
        _watch_parent()  # uvicorn stops gracefully on the SIGTERM it sends
        sys.argv = ["llama_cpp.server", *argv[1:]]
        runpy.run_module("llama_cpp.server", run_name="__main__", alter_sys=True)
        return
    args = parse_args(argv)
    # Blocked before any thread starts (the server's included), so only sigwait below receives them.
    signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)
    _watch_parent()

    import xllamacpp  # the native library loads only in this process

    params = xllamacpp.CommonParams()
    params.model.path = args.model
    if args.alias:
        params.model_alias = {args.alias}
    params.hostnames = [args.host]
    params.port = args.port
    params.n_ctx = args.n_ctx
    params.cpuparams.n_threads = args.threads
    params.cpuparams_batch.n_threads = args.threads_batch or args.threads
    if args.chat_template_file:
        with open(args.chat_template_file, encoding="utf-8") as f:
            params.chat_template = f.read()
    params.ui = False  # the server's web chat page: not part of an upstream
    # Starts the HTTP server on its own threads; a model that cannot load raises here.
    server = xllamacpp.Server(params)
    signal.sigwait(_STOP_SIGNALS)
    del server  # stops the HTTP server and frees the model


if __name__ == "__main__":
    main()
