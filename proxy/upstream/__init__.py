"""The model server side: the pooled HTTP client, normalization of every server's dialect into spec-valid
responses and chunks, and the repair of tool calls a small model wrote as text."""
