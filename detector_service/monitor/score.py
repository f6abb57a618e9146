"""Scoring a turn's features with a trained monitor: a dot product and a sigmoid in plain Python, so the proxy and
the detector service need no numerical library at run time."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from detector_service.contract.profile import MonitorConfig
from detector_service.monitor.model import unusable

TOP = 3  # features named as what raised a risk


@dataclass(frozen=True, slots=True)
class Risk:
    """A turn's risk of ending in a failed run. ``acting``: the monitor is on, did not abstain and the risk is at or
    over its threshold; ``top``: the features that raised it most; ``abstained``: why it would not judge."""

    value: float
    threshold: float
    acting: bool
    top: tuple[str, ...] = ()
    abstained: str | None = None


def probability(monitor: MonitorConfig, x: Sequence[float]) -> tuple[float, list[float]]:
    """The logistic model's probability and each feature's contribution to its log-odds."""
    parts = [w * (v - c) / s for w, v, c, s in zip(monitor.coefficients, x, monitor.center, monitor.scale, strict=True)]
    logit = monitor.intercept + sum(parts)
    if logit >= 0:
        return 1.0 / (1.0 + math.exp(-logit)), parts
    e = math.exp(logit)
    return e / (1.0 + e), parts


def abstains(
    monitor: MonitorConfig, pending: Sequence[str], declared: Sequence[str], dialect: str = "native"
) -> str | None:
    """Why the monitor stays out of this turn: a request whose declared tools are mostly unknown to its training
    (another domain), a harness that writes its actions in a way training saw too little of (``native`` calls
    or ``react`` text: too few turns, or too few passed runs to measure its false alarms), or a pending tool too
    rarely seen there."""
    if monitor.dialects.get(dialect, 0) < monitor.min_turns:
        return f"{dialect} actions had {monitor.dialects.get(dialect, 0)} training turns"
    if monitor.passed.get(dialect, 0) < monitor.min_passed:
        return f"{dialect} actions had {monitor.passed.get(dialect, 0)} passed training runs"
    known = sum(monitor.declared.get(name, 0) >= monitor.min_turns for name in declared)
    if 2 * known <= len(declared):
        return f"{known} of the request's {len(declared)} tools were declared in {monitor.min_turns}+ training turns"
    for name in pending:
        if monitor.tools.get(name, 0) < monitor.min_turns:
            return f"tool {name} had {monitor.tools.get(name, 0)} training turns"
    return None


def score(
    monitor: MonitorConfig,
    x: Sequence[float],
    pending: Sequence[str],
    declared: Sequence[str],
    dialect: str = "native",
) -> Risk:
    """The risk of a turn with features ``x`` calling ``pending`` in a request declaring the tools ``declared``,
    from a harness writing its actions in ``dialect``."""
    why = unusable(monitor)
    if why is not None:
        return Risk(0.0, monitor.threshold, False, (), why)
    value, parts = probability(monitor, x)
    ranked = sorted(range(len(parts)), key=lambda i: -parts[i])
    top = tuple(monitor.features[i] for i in ranked[:TOP] if parts[i] > 0)
    why = abstains(monitor, pending, declared, dialect)
    acting = monitor.enabled and why is None and value >= monitor.threshold
    return Risk(round(value, 4), monitor.threshold, acting, top, why)


__all__ = ["TOP", "Risk", "abstains", "probability", "score"]
