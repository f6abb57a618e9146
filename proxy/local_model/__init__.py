"""``fama serve --local-model``: the bundled llama.cpp server and small model, run as the upstream."""
