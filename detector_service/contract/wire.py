"""The versioned wire contract between the proxy and the detector service.

Every Redis stream entry carries exactly one field, ``data``, holding one of these models as JSON.
``v`` is the schema version; a reader refuses a payload whose major version it does not know.
"""

from __future__ import annotations

import time
import uuid
from enum import StrEnum
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

SCHEMA_VERSION = 1


class Category(StrEnum):
    DCV = "DCV"  # domain constraint violation
    WRCO = "WRCO"  # wrong retrieval from complex tool outputs
    CM = "CM"  # contextual misinterpretation
    IFU = "IFU"  # incomplete fulfilment / early stopping
    MTC = "MTC"  # malformed tool call
    LOOP = "LOOP"  # loop


class Action(StrEnum):
    """What the proxy should do with a turn. Ordered from mildest to strongest."""

    PASS = "pass"
    GUIDE = "guide"
    REWRITE = "rewrite"
    RETRY = "retry"
    BLOCK = "block"


ACTION_STRENGTH: dict[Action, int] = {
    Action.PASS: 0,
    Action.GUIDE: 1,
    Action.REWRITE: 2,
    Action.RETRY: 3,
    Action.BLOCK: 4,
}


class Severity(StrEnum):
    INFO = "info"
    WARNING = "warning"
    ERROR = "error"


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now_ms() -> int:
    return int(time.time() * 1000)


class _Wire(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=False)


class Finding(_Wire):
    category: Category
    detector: str
    severity: Severity = Severity.WARNING
    message: str
    evidence: dict[str, Any] = Field(default_factory=dict)
    tool_call_id: str | None = None
    tool_name: str | None = None
    # What this finding alone asks for, from the engine's decision table (stakes x evidence, capped by the
    # profile); None until the engine decided.
    action: Action | None = None


class TurnEvent(_Wire):
    """One assistant decision to check: the request context plus the candidate message."""

    kind: Literal["turn"] = "turn"
    v: int = SCHEMA_VERSION
    turn_id: str = Field(default_factory=lambda: new_id("turn"))
    session_id: str
    tenant: str = "default"
    reply_to: str | None = None  # the asking proxy's reply stream; None in embedded mode and replay
    deadline_ms: int | None = None  # absolute epoch milliseconds after which the verdict is useless
    created_ms: int = Field(default_factory=now_ms)
    profile: str | None = None  # profile name/version the proxy runs with, for the record
    # The hash of the profile the proxy judges this turn under; the detector evaluates it under the same one while
    # it still holds it (detector_service.engine.Engines).
    profile_sha256: str | None = None
    messages: list[dict[str, Any]]  # conversation so far, OpenAI chat format
    tools: list[dict[str, Any]] = Field(default_factory=list)  # OpenAI ``tools`` array
    candidate: dict[str, Any]  # the assistant message the model proposes
    attempt: int = 0  # 0 for the first answer, n for the n-th retry


class Verdict(_Wire):
    kind: Literal["verdict"] = "verdict"
    v: int = SCHEMA_VERSION
    turn_id: str
    session_id: str
    tenant: str = "default"
    action: Action = Action.PASS
    findings: list[Finding] = Field(default_factory=list)
    rewritten: dict[str, Any] | None = None  # repaired candidate when action is ``rewrite``
    detector_version: str = "0"
    elapsed_ms: float = 0.0
    worker: str | None = None

    @property
    def categories(self) -> list[Category]:
        return sorted({f.category for f in self.findings})


def dumps(model: BaseModel) -> str:
    return model.model_dump_json(exclude_none=True)


class SchemaVersionError(ValueError):
    pass


def check_version(payload: dict[str, Any]) -> None:
    v = payload.get("v")
    if not isinstance(v, int) or v > SCHEMA_VERSION or v < 1:
        raise SchemaVersionError(f"unsupported wire schema version {v!r} (this build speaks {SCHEMA_VERSION})")
