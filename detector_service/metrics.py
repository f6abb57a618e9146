"""Every Prometheus metric the detector service exports."""

from __future__ import annotations

import contextlib

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from detector_service.contract.active_profile import ActiveProfile
from detector_service.contract.wire import Action

DETECT_BUCKETS = (0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 1, 5)

# The enum label values of counters, created at zero on startup: rate()/increase() only see an increase
# from a sample that already exists, so without them a counter's first event would never show.
TURN_OUTCOMES = ("ok", "error", "dead")
DEAD_LETTER_REASONS = ("malformed", "failed", "max_deliveries")
JUDGE_OUTCOMES = ("ok", "timeout", "error", "skipped")
EXTRACTION_OUTCOMES = ("ok", "error", "locked")


def profile_info(registry: CollectorRegistry) -> Gauge:
    return Gauge(
        "fama_profile_info",
        "1 for the profile in force: its hash (12 hex digits of its sha256) and version (0: its file's, n: the n-th push).",
        ["hash", "version"],
        registry=registry,
    )


def show_profile(gauge: Gauge, old: ActiveProfile, new: ActiveProfile) -> None:
    """Move ``fama_profile_info`` to ``new``: the old label set goes, so a dashboard sees one series per process."""
    with contextlib.suppress(KeyError):
        gauge.remove(old.short_hash, str(old.version))
    gauge.labels(hash=new.short_hash, version=str(new.version)).set(1)


class DetectorMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.turns = Counter(
            "fama_detector_turns_total", "Turns processed, by outcome (ok, error, dead).", ["outcome"], registry=r
        )
        self.processing = Histogram(
            "fama_detector_processing_seconds",
            "Time to evaluate one turn (all detectors).",
            buckets=DETECT_BUCKETS,
            registry=r,
        )
        self.findings = Counter(
            "fama_detector_findings_total", "Findings by category and detector.", ["category", "detector"], registry=r
        )
        self.verdicts = Counter("fama_detector_verdicts_total", "Verdicts published by action.", ["action"], registry=r)
        self.stream_lag = Gauge(
            "fama_detector_stream_lag", "Entries in the turn stream not yet delivered to the group.", registry=r
        )
        self.pending = Gauge(
            "fama_detector_pending_entries", "Entries delivered to the group but not yet acknowledged.", registry=r
        )
        self.reclaimed = Counter(
            "fama_detector_reclaimed_total", "Entries reclaimed from idle consumers (XAUTOCLAIM).", registry=r
        )
        self.dead_letters = Counter(
            "fama_detector_dead_letters_total", "Entries moved to the dead-letter stream.", ["reason"], registry=r
        )
        self.redis_errors = Counter(
            "fama_detector_redis_errors_total", "Redis operations that failed.", ["op"], registry=r
        )
        self.up = Gauge("fama_detector_up", "1 while the worker loop is running.", registry=r)
        self.judge_calls = Counter(
            "fama_detector_judge_calls_total",
            "LLM judge calls by outcome (ok, timeout, error; skipped when no time was left before the deadline).",
            ["outcome"],
            registry=r,
        )
        self.extractions = Counter(
            "fama_detector_extractions_total",
            "LLM policy extractions for DCE by outcome (ok, error; locked when another replica was extracting).",
            ["outcome"],
            registry=r,
        )
        self.profile = profile_info(r)
        self._create_known_series()

    def profile_switched(self, old: ActiveProfile, new: ActiveProfile) -> None:
        show_profile(self.profile, old, new)

    def _create_known_series(self) -> None:
        for outcome in TURN_OUTCOMES:
            self.turns.labels(outcome=outcome)
        for action in Action:
            self.verdicts.labels(action=action.value)
        for reason in DEAD_LETTER_REASONS:
            self.dead_letters.labels(reason=reason)
        for outcome in JUDGE_OUTCOMES:
            self.judge_calls.labels(outcome=outcome)
        for outcome in EXTRACTION_OUTCOMES:
            self.extractions.labels(outcome=outcome)
