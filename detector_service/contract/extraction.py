"""Rules extracted from a policy text by the LLM, as cached in Redis and read by both services."""

from __future__ import annotations

import hashlib

from pydantic import BaseModel, ConfigDict, Field

from detector_service.contract.wire import now_ms

EXTRACTION_VERSION = 1


def policy_hash(policy: str) -> str:
    """The key of a policy's cached extraction (``keys.extraction_key``)."""
    return hashlib.sha256(policy.encode("utf-8")).hexdigest()


class ExtractedRule(BaseModel):
    model_config = ConfigDict(extra="forbid")
    rule: str = Field(min_length=1)
    tools: list[str] = Field(default_factory=list)  # empty: applies to every action


class PolicyExtraction(BaseModel):
    """What Redis holds under ``keys.extraction_key(policy_hash)``."""

    model_config = ConfigDict(extra="ignore")
    v: int = EXTRACTION_VERSION
    policy_hash: str
    model: str
    rules: list[ExtractedRule]
    created_ms: int = Field(default_factory=now_ms)
