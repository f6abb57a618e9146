"""Every Prometheus metric the proxy exports. One instance per app, on its own registry.

Label sets are bounded: routes are templates, categories/actions/agents are enums. Models and tool names
come from clients (llama.cpp's server answers for any model name), so each keeps its first
``MAX_MODEL_LABELS`` / ``MAX_TOOL_LABELS`` distinct values and reports the rest as ``other``
(:class:`BoundedLabel`); a tool must also be declared by the request.
"""

from __future__ import annotations

from itertools import product

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from detector_service.contract.active_profile import ActiveProfile
from detector_service.contract.profile import AgentName, Mode
from detector_service.contract.wire import Action, Category, Verdict
from detector_service.metrics import profile_info, show_profile
from detector_service.monitor.features import FEATURES

LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.003, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
RISK_BUCKETS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
OVERHEAD_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.002, 0.003, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1)
MAX_TOOL_LABELS = 500
MAX_MODEL_LABELS = 64
OTHER = "other"


class BoundedLabel:
    """The values of one client-chosen label: the first ``limit`` distinct ones are kept, later ones read
    ``other``, so a client sending random names cannot grow the series without bound."""

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._seen: set[str] = set()

    def __call__(self, value: str) -> str:
        if value in self._seen:
            return value
        if len(self._seen) >= self._limit:
            return OTHER
        self._seen.add(value)
        return value


# The enum label values of counters, created at zero on startup: rate()/increase() only see an increase
# from a sample that already exists, so without them a counter's first event would never show.
CHANGING_ACTIONS = (Action.RETRY.value, Action.REWRITE.value, Action.BLOCK.value)
INTERVENTION_CATEGORIES = (*(c.value for c in Category), "none")
DEGRADED_REASONS = ("deadline", "outage")
FAIL_POLICIES = ("open", "closed")
TRANSPORTS = ("embedded", "redis")
RETRY_OUTCOMES = ("fixed", "failed", "exhausted")
SESSION_OUTCOMES = ("success", "failure")
INTERVENED = ("yes", "no")
JUDGE_OUTCOMES = ("ok", "timeout", "error", "skipped")
CLIENT_CLOSURE_REASONS = ("read_deadline", "headers_too_large", "per_client_cap")  # proxy.edge.limits
APIS = ("chat", "responses")  # the API a supervised turn came in through


class ProxyMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.model_label = BoundedLabel(MAX_MODEL_LABELS)
        self.tool_label = BoundedLabel(MAX_TOOL_LABELS)
        self.requests = Counter(
            "fama_requests_total", "Requests by route, status and model.", ["route", "status", "model"], registry=r
        )
        self.request_duration = Histogram(
            "fama_request_duration_seconds",
            "Whole request time as the client sees it (to the last byte).",
            ["route"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.ttft = Histogram(
            "fama_time_to_first_token_seconds",
            "Time from request to the first content byte sent to the client (streaming).",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.upstream_duration = Histogram(
            "fama_upstream_duration_seconds",
            "Time spent waiting on the upstream model server.",
            ["route"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.overhead = Histogram(
            "fama_proxy_overhead_seconds",
            "Request time minus upstream time: what the proxy adds.",
            ["route"],
            buckets=OVERHEAD_BUCKETS,
            registry=r,
        )
        self.upstream_errors = Counter(
            "fama_upstream_errors_total",
            "Upstream failures by kind (connect, timeout, status_4xx, status_5xx, stream; closed: a connection that closed "
            "before answering, the request sent once more on a new one).",
            ["kind"],
            registry=r,
        )
        self.injections = Counter(
            "fama_injections_total", "Pre-decision context injections by specialized agent.", ["agent"], registry=r
        )
        self.findings = Counter(
            "fama_findings_total",
            "Detector findings seen by the proxy, by category, detector and tool.",
            ["category", "detector", "tool"],
            registry=r,
        )
        self.interventions = Counter(
            "fama_interventions_total",
            "Interventions applied to responses, by action, category, mode and API (chat, responses).",
            ["action", "category", "mode", "api"],
            registry=r,
        )
        self.verdict_wait = Histogram(
            "fama_verdict_wait_seconds",
            "Time a turn waited for its verdict.",
            ["transport"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.deadline_misses = Counter(
            "fama_verdict_deadline_misses_total", "Verdicts not ready by the deadline.", ["transport"], registry=r
        )
        self.late_verdicts = Counter(
            "fama_late_verdicts_total",
            "Verdicts that arrived after their deadline (recorded, not applied).",
            registry=r,
        )
        self.degraded = Counter(
            "fama_degraded_responses_total",
            "Responses served without a verdict (deadline or detector outage), by reason and policy.",
            ["reason", "policy"],
            registry=r,
        )
        self.retries = Counter(
            "fama_retries_total",
            "Corrective retries by category and outcome (fixed, failed, exhausted).",
            ["category", "outcome"],
            registry=r,
        )
        self.sessions = Counter(
            "fama_session_turns_total",
            "Supervised turns by whether the session has had an intervention so far, the turn's finish reason and "
            "the API (chat, responses).",
            ["intervened", "finish_reason", "api"],
            registry=r,
        )
        self.session_outcomes = Counter(
            "fama_session_outcomes_total",
            "Session outcomes reported by clients (success/failure), split by whether interventions happened.",
            ["outcome", "intervened"],
            registry=r,
        )
        self.shadow_outcomes = Counter(
            "fama_shadow_outcomes_total",
            "Session outcomes reported by clients (success/failure), split by whether a verdict on any turn of the "
            "session asked for what enforce mode acts on (retry, rewrite, block): in observe mode, what it would have "
            "acted on.",
            ["outcome", "would_act"],
            registry=r,
        )
        self.active_streams = Gauge("fama_active_streams", "Streaming responses in flight.", registry=r)
        self.redis_errors = Counter("fama_redis_errors_total", "Redis operations that failed.", ["op"], registry=r)
        self.text_tool_calls = Counter(
            "fama_text_tool_calls_total",
            "Replies whose tool calls the model wrote as text, sent to the client as tool_calls.",
            ["stream"],
            registry=r,
        )
        self.quoted_context = Counter(
            "fama_quoted_context_total",
            "Supervised replies that quoted the injected context or feedback back, by mode (enforce cuts the quote "
            "before the client sees it, observe only counts it) and API.",
            ["mode", "api"],
            registry=r,
        )
        self.judge_calls = Counter(
            "fama_judge_calls_total",
            "LLM judge calls made in-process (embedded mode), by outcome (ok, timeout, error, skipped: no time left).",
            ["outcome"],
            registry=r,
        )
        self.client_closures = Counter(
            "fama_client_closures_total",
            "Client connections closed by the proxy's limits (read_deadline, headers_too_large, per_client_cap).",
            ["reason"],
            registry=r,
        )
        self.risk = Histogram(
            "fama_turn_risk",
            "The learned monitor's risk of the judged turns, by whether it acted (acted: true, false).",
            ["acted"],
            buckets=RISK_BUCKETS,
            registry=r,
        )
        self.risk_features = Counter(
            "fama_risk_features_total",
            "Monitor features that raised the risk of the turns it acted on.",
            ["feature"],
            registry=r,
        )
        self.profile = profile_info(r)
        self._create_known_series()

    def profile_switched(self, old: ActiveProfile, new: ActiveProfile) -> None:
        show_profile(self.profile, old, new)

    def observe_risk(self, verdict: Verdict | None) -> None:
        """The learned monitor's risk of a judged turn, and what raised it where it acted."""
        if verdict is None or verdict.risk is None:
            return
        self.risk.labels(acted=str(verdict.risk_acting).lower()).observe(verdict.risk)
        for feature in verdict.risk_features if verdict.risk_acting else ():
            self.risk_features.labels(feature=feature).inc()

    def _create_known_series(self) -> None:
        modes = [m.value for m in Mode]
        for action, category, mode, api in product(CHANGING_ACTIONS, INTERVENTION_CATEGORIES, modes, APIS):
            self.interventions.labels(action=action, category=category, mode=mode, api=api)
        for reason, policy in product(DEGRADED_REASONS, FAIL_POLICIES):
            self.degraded.labels(reason=reason, policy=policy)
        for transport in TRANSPORTS:
            self.deadline_misses.labels(transport=transport)
        for category, outcome in product((c.value for c in Category), RETRY_OUTCOMES):
            self.retries.labels(category=category, outcome=outcome)
        for outcome, intervened in product(SESSION_OUTCOMES, INTERVENED):
            self.session_outcomes.labels(outcome=outcome, intervened=intervened)
        for outcome, would_act in product(SESSION_OUTCOMES, ("yes", "no")):
            self.shadow_outcomes.labels(outcome=outcome, would_act=would_act)
        for agent in (
            *(a.value for a in AgentName),
            "guidance",
        ):  # "guidance": proxy.supervision.injection.GUIDANCE_LABEL
            self.injections.labels(agent=agent)
        for stream in ("true", "false"):
            self.text_tool_calls.labels(stream=stream)
        for mode, api in product(modes, APIS):
            self.quoted_context.labels(mode=mode, api=api)
        for outcome in JUDGE_OUTCOMES:
            self.judge_calls.labels(outcome=outcome)
        for reason in CLIENT_CLOSURE_REASONS:
            self.client_closures.labels(reason=reason)
        for acted in ("true", "false"):
            self.risk.labels(acted=acted)
        for feature in FEATURES:
            self.risk_features.labels(feature=feature)
