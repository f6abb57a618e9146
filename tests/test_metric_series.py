"""Counters with enum labels exist at zero from startup, so that rate()/increase() see their first event."""

from __future__ import annotations

from pathlib import Path

from prometheus_client import CollectorRegistry

from detector_service.contract.profile import AgentName, Mode
from detector_service.contract.wire import Action, Category
from detector_service.metrics import DetectorMetrics
from proxy.metrics import MAX_MODEL_LABELS, BoundedLabel, ProxyMetrics
from tests.supervised_upstream import ScriptedModel
from tests.supervision_harness import proxy_for


def _zero(registry: CollectorRegistry, name: str, labels: dict[str, str]) -> bool:
    return registry.get_sample_value(name, labels) == 0.0


def test_proxy_counters_start_with_every_known_label_set_at_zero() -> None:
    r = ProxyMetrics().registry
    for outcome in ("success", "failure"):
        for intervened in ("yes", "no"):
            assert _zero(r, "fama_session_outcomes_total", {"outcome": outcome, "intervened": intervened})
        for would_act in ("yes", "no"):
            assert _zero(r, "fama_shadow_outcomes_total", {"outcome": outcome, "would_act": would_act})
    for action in ("retry", "rewrite", "block"):
        for category in [*(c.value for c in Category), "none"]:
            for mode in Mode:
                for api in ("chat", "responses"):
                    labels = {"action": action, "category": category, "mode": mode.value, "api": api}
                    assert _zero(r, "fama_interventions_total", labels)
    for reason in ("deadline", "outage"):
        for policy in ("open", "closed"):
            assert _zero(r, "fama_degraded_responses_total", {"reason": reason, "policy": policy})
    for transport in ("embedded", "redis"):
        assert _zero(r, "fama_verdict_deadline_misses_total", {"transport": transport})
    for category in Category:
        for outcome in ("fixed", "failed", "exhausted"):
            assert _zero(r, "fama_retries_total", {"category": category.value, "outcome": outcome})
    for agent in [*(a.value for a in AgentName), "guidance"]:
        assert _zero(r, "fama_injections_total", {"agent": agent})
    # A pass is not an intervention: no series for it.
    assert (
        r.get_sample_value(
            "fama_interventions_total", {"action": "pass", "category": "none", "mode": "enforce", "api": "chat"}
        )
        is None
    )


def test_detector_counters_start_with_every_known_label_set_at_zero() -> None:
    r = DetectorMetrics().registry
    for reason in ("malformed", "failed", "max_deliveries"):
        assert _zero(r, "fama_detector_dead_letters_total", {"reason": reason})
    for outcome in ("ok", "error", "dead"):
        assert _zero(r, "fama_detector_turns_total", {"outcome": outcome})
    for action in Action:
        assert _zero(r, "fama_detector_verdicts_total", {"action": action.value})
    for outcome in ("ok", "timeout", "error", "skipped"):
        assert _zero(r, "fama_detector_judge_calls_total", {"outcome": outcome})
    for outcome in ("ok", "error", "locked"):
        assert _zero(r, "fama_detector_extractions_total", {"outcome": outcome})


def test_model_names_from_clients_cannot_grow_the_series_without_bound(tmp_path: Path) -> None:
    # A server that answers for any model name (llama.cpp's does): each name a client invents would be a series.
    model = ScriptedModel(lambda body: {"content": "ok"})
    with proxy_for(model, tmp_path) as (client, app):
        for i in range(MAX_MODEL_LABELS + 5):
            client.chat.completions.create(model=f"made-up-{i}", messages=[{"role": "user", "content": "hi"}])
        list(
            client.chat.completions.create(model="made-up-0", messages=[{"role": "user", "content": "hi"}], stream=True)
        )
        registry = app.metrics.registry
    requests = {
        s.labels["model"]: s.value
        for family in registry.collect()
        if family.name == "fama_requests"
        for s in family.samples
        if s.name == "fama_requests_total"
    }
    assert len(requests) == MAX_MODEL_LABELS + 1
    assert requests["other"] == 5
    assert requests["made-up-0"] == 2
    assert registry.get_sample_value("fama_time_to_first_token_seconds_count", {"model": "made-up-0"}) == 1


def test_a_bounded_label_keeps_its_first_values() -> None:
    label = BoundedLabel(2)
    assert [label(v) for v in ("a", "b", "c", "a", "d", "b")] == ["a", "b", "other", "a", "other", "b"]
