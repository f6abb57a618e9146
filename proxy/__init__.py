"""The FAMA proxy: an OpenAI-compatible edge that supervises tool-using agents.

Rooms: ``edge`` (HTTP routes, request checks, auth, admin, outcomes, health, the SSE relay), ``upstream`` (the
model server: client, response normalization, stream chunks, tool calls written as text), ``supervision`` (the
supervisor, decisions, verdict sources, held streams, injection, sessions, recording), ``local_model`` (the
bundled llama.cpp server) and ``bench`` (``fama bench``). At the root: the composition root (``app``), the seam
between edge and supervision (``hooks``), and what every room uses (settings, errors, metrics, tracing, server,
cli).
"""
