"""The detector service (the meta-agent): pure detectors and the engine that runs them, the specialized agents
that write injected context, and the worker that serves verdicts over Redis.

Rooms: ``contract`` (what both services share: the wire format, the profile, tool kinds, cached extractions),
``bus`` (Redis keys and every Streams command), ``detectors``, ``agents``, ``llm`` (judge, policy extraction,
structured answers) and ``offline`` (replay, analyze, evaluation, trajectory files). At the root: ``engine``,
``turn`` (the conversation model every detector and agent reads), ``confirmation``, ``policytext``, ``worker``
and ``service`` (``fama detector``), settings, health, metrics.
"""
