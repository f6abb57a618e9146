"""The profile file (DESIGN §7): which agents run, which detectors, what to do per category.

A profile is YAML with a ``version``. ``fama analyze`` writes one; ``fama serve --profile`` and
``fama replay --profile`` read one. Unknown top-level keys are refused so that typos surface.
"""

from __future__ import annotations

import hashlib
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any, Literal

import orjson
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from detector_service.contract.wire import Action, Category

PROFILE_VERSION = 1


class Mode(StrEnum):
    OBSERVE = "observe"
    ENFORCE = "enforce"


class Dialect(StrEnum):
    """How the agent's harness writes actions (:mod:`detector_service.contract.textactions`)."""

    AUTO = "auto"  # read from the conversation: text actions and no native tool calls mean ``react`` or ``text``
    NATIVE = "native"  # OpenAI ``tool_calls`` and ``tool`` messages
    REACT = "react"  # ``Thought:`` / ``Action:`` JSON text, ``respond`` to talk, tool results as user messages
    # Calls written as text in another form (JSON objects, tags, Python-style calls, in fences or not), plain
    # text to talk, tool results as user messages (``Observation: ...``): a code-action or JSON-text harness.
    TEXT = "text"

    @property
    def text_actions(self) -> bool:
        """Whether the harness writes its actions as text (and reads them from the text)."""
        return self in (Dialect.REACT, Dialect.TEXT)


class ToolKind(StrEnum):
    READ = "read"
    WRITE = "write"
    GENERIC = "generic"


class AgentName(StrEnum):
    DCE = "DCE"
    TSA = "TSA"
    TOR = "TOR"
    PLANNER = "Planner"
    VERIFIER = "Verifier"
    MEMORY = "Memory"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class RequiresConfirmation(_Strict):
    """The tool may only be called after the user explicitly confirmed in their latest message."""

    type: Literal["requires_confirmation"] = "requires_confirmation"
    tool: str


class RequiresPriorRead(_Strict):
    """The tool's ``argument`` value must have appeared in an earlier output of one of ``read_tools``."""

    type: Literal["requires_prior_read"] = "requires_prior_read"
    tool: str
    argument: str
    read_tools: list[str] = Field(default_factory=list)  # empty = any tool output


class ArgumentConstraint(_Strict):
    type: Literal["argument_constraint"] = "argument_constraint"
    tool: str
    argument: str
    enum: list[Any] | None = None
    minimum: float | None = None
    maximum: float | None = None
    pattern: str | None = None
    message: str | None = None


class OneToolCallPerTurn(_Strict):
    type: Literal["one_tool_call_per_turn"] = "one_tool_call_per_turn"
    no_text_with_tool_call: bool = False


class Forbidden(_Strict):
    """The tool must never be called (e.g. disabled for this deployment)."""

    type: Literal["forbidden"] = "forbidden"
    tool: str
    message: str | None = None


class FieldCondition(_Strict):
    """One test on a field of an entity a tool returned (``field`` is a dotted path)."""

    field: str
    equals: Any | None = None
    one_of: list[Any] | None = None
    within_hours: float | None = None  # a timestamp field no older than this, counted back from the rule's ``now``
    any_item_equals: Any | None = None  # a list field (or list of objects' ``field`` leaf) holding this value


class EntityCondition(_Strict):
    """The tool may only act on the entity named by ``argument`` when one of ``any_of`` holds for it.

    The entity is the object an earlier tool output returned with the same ``argument`` value.
    """

    type: Literal["entity_condition"] = "entity_condition"
    tool: str
    argument: str
    any_of: list[FieldCondition]
    now: str | None = None  # ISO timestamp the policy states as the current time
    message: str | None = None


Rule = Annotated[
    RequiresConfirmation | RequiresPriorRead | ArgumentConstraint | OneToolCallPerTurn | Forbidden | EntityCondition,
    Field(discriminator="type"),
]


class DetectorConfig(_Strict):
    enabled: bool = True
    settings: dict[str, Any] = Field(default_factory=dict)


class JudgeConfig(_Strict):
    enabled: bool = False
    base_url: str | None = None
    model: str | None = None
    api_key_env: str | None = None  # name of the environment variable holding the judge's key
    timeout_s: float = 10.0
    # A turn that only looks things up (read calls, no words to the user) changes nothing and tells the user
    # nothing: the judge is not asked about it (fewer calls, fewer chances of a false alarm).
    skip_reads: bool = True


class LLMAgentsConfig(_Strict):
    """LLM-backed specialized agents (off by default). They run in the detector service, never in a turn.

    They use the judge's endpoint settings (``judge.base_url``, ``judge.model``, ``judge.api_key_env``)
    whether or not the judge itself is enabled. Only DCE has an LLM-backed version: the detector worker
    asks the model once per distinct policy text for its rules, each tagged with the tools it constrains
    (JSON-schema-constrained answer), and caches them in Redis under ``fama:extract:<sha256 of the
    policy text>`` for ``ttl_s``. The proxy (Redis mode) injects the cached rules relevant to the pending
    action when they exist and the deterministic DCE sentences until then; it never waits for the model.

    Example::

        llm_agents: {agents: [DCE]}
        judge: {base_url: http://127.0.0.1:8080/v1, model: local-model}
    """

    agents: list[Literal[AgentName.DCE]] = Field(default_factory=list)
    timeout_s: float = Field(default=60.0, gt=0)  # one extraction call (a whole policy: slower than a judge call)
    ttl_s: int = Field(default=24 * 3600, ge=60)  # lifetime of a cached extraction in Redis

    @property
    def dce(self) -> bool:
        return AgentName.DCE in self.agents


DEFAULT_ACTIONS: dict[Category, Action] = {
    Category.MTC: Action.RETRY,
    Category.DCV: Action.RETRY,
    Category.WRCO: Action.RETRY,
    Category.LOOP: Action.RETRY,
    Category.IFU: Action.RETRY,
    Category.CM: Action.GUIDE,
}


class FindingEntry(_Strict):
    """A calibrated decision for one kind of finding (``CATEGORY/detector``, per tool for rule findings).

    ``action`` caps what the decision table allows (it never raises it): ``guide`` or ``pass`` demotes a
    finding that fires on runs that went well. ``failed`` / ``passed`` are the runs it fired on, as
    counted by ``fama analyze`` (out of the profile's ``calibration`` totals).
    """

    action: Action
    failed: int = Field(default=0, ge=0)
    passed: int = Field(default=0, ge=0)
    why: str | None = None


class Calibration(_Strict):
    """Where a profile's ``findings:`` entries come from: the runs ``fama analyze`` counted."""

    failed: int = Field(default=0, ge=0)
    passed: int = Field(default=0, ge=0)
    models: list[str] = Field(default_factory=list)
    rule: str | None = None


class MonitorFigures(_Strict):
    """What grouped cross-validation measured on the training runs, table alone and table + monitor."""

    folds: int = Field(default=0, ge=0)
    groups: int = Field(default=0, ge=0)
    failed: int = Field(default=0, ge=0)
    passed: int = Field(default=0, ge=0)
    table_failed_flagged: float = 0.0
    table_passed_flagged: float = 0.0
    monitor_failed_flagged: float = 0.0
    monitor_passed_flagged: float = 0.0
    auprc: float | None = None  # prefix warning: each turn's risk against its run's outcome


class MonitorConfig(_Strict):
    """A risk monitor learned from outcomes by ``fama analyze`` (``detector_service.monitor``): a logistic
    regression over the versioned features, stored as numbers (no pickle). ``enabled`` only when grouped
    cross-validation showed it catches more failed runs within ``budget`` (the share of passed runs the table
    and the monitor together may act on); otherwise ``why`` says what it showed. ``min_turns``: a pending tool
    seen on fewer training turns, a request most of whose declared tools were (another domain), or a harness
    writing its actions another way (``dialects``: ``native`` or ``react``), makes it abstain; so does a harness
    with fewer than ``min_passed`` passed training runs (``passed``): its share of passed runs flagged was not
    measurable there.
    """

    enabled: bool = False
    why: str | None = None
    budget: float = Field(default=0.08, ge=0.0, le=1.0)
    feature_version: str = ""
    features: list[str] = Field(default_factory=list)
    center: list[float] = Field(default_factory=list)
    scale: list[float] = Field(default_factory=list)
    coefficients: list[float] = Field(default_factory=list)
    intercept: float = 0.0
    threshold: float = Field(default=1.0, ge=0.0, le=1.0)
    min_turns: int = Field(default=20, ge=0)
    tools: dict[str, int] = Field(default_factory=dict)  # pending tool -> training turns
    declared: dict[str, int] = Field(default_factory=dict)  # tool declared in training requests -> training turns
    dialects: dict[str, int] = Field(default_factory=dict)  # how the harness wrote its actions -> training turns
    passed: dict[str, int] = Field(default_factory=dict)  # how the harness wrote its actions -> passed training runs
    min_passed: int = Field(default=0, ge=0)  # passed training runs a harness needs before the monitor judges it
    fingerprint: str = ""  # sha256 of the training runs (ids, rewards) and the feature version
    cv: MonitorFigures | None = None


FailPolicy = Literal["open", "closed"]


def _default_on_timeout() -> dict[str, FailPolicy]:
    return {"default": "open"}


class Profile(_Strict):
    version: int = PROFILE_VERSION
    name: str = "default"
    mode: Mode = Mode.OBSERVE
    dialect: Dialect = Dialect.AUTO
    agents: list[AgentName] = Field(default_factory=lambda: [AgentName.VERIFIER, AgentName.MEMORY])
    detectors: dict[str, DetectorConfig] = Field(default_factory=dict)
    judge: JudgeConfig = Field(default_factory=JudgeConfig)
    llm_agents: LLMAgentsConfig = Field(default_factory=LLMAgentsConfig)
    actions: dict[Category, Action] = Field(default_factory=lambda: dict(DEFAULT_ACTIONS))
    findings: dict[str, FindingEntry] = Field(default_factory=dict)  # calibrated caps, per kind of finding
    calibration: Calibration | None = None
    monitor: MonitorConfig | None = None  # learned by ``fama analyze``; absent (zero-config) = no monitor
    max_retries: int = Field(default=2, ge=0, le=5)
    deadline_ms: int = Field(default=250, ge=1, le=120_000)
    on_timeout: dict[str, FailPolicy] = Field(default_factory=_default_on_timeout)
    tools: dict[str, ToolKind] = Field(default_factory=dict)
    rules: list[Rule] = Field(default_factory=list)
    policy: str | None = None  # optional policy text for DCE when the request carries none
    injection_token_budget: int = Field(default=600, ge=0)

    def detector_enabled(self, name: str) -> bool:
        cfg = self.detectors.get(name)
        return cfg.enabled if cfg is not None else True

    def detector_settings(self, name: str) -> dict[str, Any]:
        cfg = self.detectors.get(name)
        return dict(cfg.settings) if cfg is not None else {}

    def action_for(self, category: Category) -> Action:
        return self.actions.get(category, DEFAULT_ACTIONS.get(category, Action.GUIDE))

    def fail_closed(self, category: Category | None) -> bool:
        key = category.value if category is not None else "default"
        return self.on_timeout.get(key, self.on_timeout.get("default", "open")) == "closed"


class ProfileError(ValueError):
    """A profile that cannot be used; ``field`` names the offending field (dotted, as pydantic locates it)."""

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


def parse_profile(raw: object, origin: str = "profile") -> Profile:
    """A profile from its parsed YAML/JSON mapping (``None`` is the empty profile); ``origin`` names it in errors."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ProfileError(f"{origin} must be a mapping at top level")
    version = raw.get("version", PROFILE_VERSION)
    if version != PROFILE_VERSION:
        raise ProfileError(f"{origin} has version {version!r}; this build reads version {PROFILE_VERSION}", "version")
    try:
        return Profile.model_validate(raw)
    except ValidationError as exc:
        errors = [(".".join(str(part) for part in e.get("loc", ())), str(e.get("msg", ""))) for e in exc.errors()]
        listed = "; ".join(f"{loc or 'profile'}: {msg}" for loc, msg in errors[:5])
        more = f" (and {len(errors) - 5} more)" if len(errors) > 5 else ""
        raise ProfileError(f"{origin} is invalid: {listed}{more}", errors[0][0] or None if errors else None) from exc


def parse_profile_text(text: str | bytes, origin: str = "profile") -> Profile:
    """A profile from its file's text (YAML, of which JSON is a subset)."""
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ProfileError(f"{origin} is not valid YAML: {exc}") from exc
    return parse_profile(raw, origin)


def load_profile(path: str | Path | None) -> Profile:
    if path is None or str(path) == "":
        return Profile()
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise ProfileError(f"cannot read profile {p}: {exc}") from exc
    return parse_profile_text(text, f"profile {p}")


def dump_profile(profile: Profile) -> str:
    data = profile.model_dump(mode="json", exclude_none=True)
    return yaml.safe_dump(data, sort_keys=False, allow_unicode=True)


def profile_document(profile: Profile) -> bytes:
    """The profile as canonical JSON (sorted keys, every field): equal profiles give equal bytes, whatever file
    they came from. What is stored when a profile is pushed, and what its hash is taken over."""
    return orjson.dumps(profile.model_dump(mode="json"), option=orjson.OPT_SORT_KEYS)


def profile_sha256(profile: Profile) -> str:
    return hashlib.sha256(profile_document(profile)).hexdigest()
