"""Supervision of chat turns with tools: the supervisor (the hooks), pure decisions on verdicts, the verdict
sources (embedded or over Redis), held streams, context injection, session state and the recorder."""
