"""A trained monitor as numbers: the profile's ``monitor:`` section (``MonitorConfig``), its identity and whether it
can score at all. Safe to load from anyone's file: YAML/JSON numbers and names, never code (no pickle)."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

from detector_service.contract.profile import MonitorConfig
from detector_service.monitor.features import FEATURE_VERSION, FEATURES


def fingerprint(runs: Iterable[tuple[str, float | None]]) -> str:
    """The training data's identity: the feature version and every (run id, reward), in order."""
    h = hashlib.sha256(FEATURE_VERSION.encode())
    for run_id, reward in runs:
        h.update(f"\x1e{run_id}\x1f{reward}".encode())
    return h.hexdigest()


def unusable(monitor: MonitorConfig) -> str | None:
    """Why ``monitor`` cannot score this build's features (None: it can)."""
    if monitor.feature_version != FEATURE_VERSION or tuple(monitor.features) != FEATURES:
        return f"trained on feature version {monitor.feature_version!r}, this build computes {FEATURE_VERSION!r}"
    n = len(FEATURES)
    if not (len(monitor.center) == len(monitor.scale) == len(monitor.coefficients) == n):
        return f"expected {n} centers, scales and coefficients"
    if any(s <= 0 for s in monitor.scale):
        return "a feature scale is not positive"
    return None


__all__ = ["fingerprint", "unusable"]
