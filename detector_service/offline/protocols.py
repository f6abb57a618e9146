"""How ``fama evaluate`` scores what is learned from outcomes on runs it was not learned from.

Three protocols, each giving, per file, the runs replayed with the table alone (the profile's ``findings:``
recalibrated on the training runs) and with the table and the monitor trained on the same runs:

- ``leave-task-out``: the runs of each domain split in two by task (sha256 of the task id, mod 2, as
  ``../shared/tools/leave_task_out.sh`` does); each half scored with what was learned on the other half;
- ``leave-model-out``: each file scored with what was learned on the other models' runs of its domain;
- ``deployment``: each file on its own, learned on half its tasks and scored on the other half (a deployment
  that recorded its own runs); a file too small to learn from scores the table alone.

``Learned`` also keeps each scored turn's out-of-fold risk for the prefix-warning AUPRC.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from detector_service.contract.profile import Profile
from detector_service.engine import Engine
from detector_service.offline.calibrate import calibrate
from detector_service.offline.replay import replay
from detector_service.offline.training import train_monitor
from detector_service.offline.trajectories import Replayed, Trajectory


class Source(Protocol):
    name: str
    domain: str
    model: str
    trajectories: list[Trajectory]
    tools: list[dict[str, Any]]


@dataclass
class Scored:
    """Per file: the runs scored with the table alone and with table + monitor, and the risks for the AUPRC."""

    table: list[list[Replayed]]
    monitor: list[list[Replayed]]
    risks: list[tuple[float, bool]] = field(default_factory=list)  # (turn risk, run failed) over scored turns
    switched_on: list[str] = field(default_factory=list)  # the trainings whose monitor acts


def half_of(t: Trajectory) -> int:
    return int(hashlib.sha256(str(t.extra.get("task_id")).encode()).hexdigest(), 16) % 2


def _learn(base: Profile, training: Sequence[Trajectory], tools: list[dict[str, Any]]) -> tuple[Profile, Profile]:
    table = calibrate(base, training, tools)
    return table, table.model_copy(update={"monitor": train_monitor(table, training, tools)})


def _score(
    out: Scored,
    at: int,
    profiles: tuple[Profile, Profile],
    runs: Sequence[Trajectory],
    tools: list[dict[str, Any]],
    label: str,
) -> None:
    table, monitored = profiles
    out.table[at].extend(replay(Engine(table), runs, tools))
    scored = replay(Engine(monitored), runs, tools, collect=True)
    out.monitor[at].extend(scored)
    if monitored.monitor is not None and monitored.monitor.enabled and label not in out.switched_on:
        out.switched_on.append(label)
    engine = Engine(monitored)
    if engine.monitor is None:
        return
    from detector_service.monitor.score import probability

    for r in scored:
        failed = (r.trajectory.reward or 0.0) < 1.0
        out.risks.extend((probability(engine.monitor, f.x)[0], failed) for f in r.features)


def _empty(files: Sequence[Source]) -> Scored:
    return Scored([[] for _ in files], [[] for _ in files])


def leave_task_out(files: Sequence[Source], base_of: Callable[[str], Profile]) -> Scored:
    out = _empty(files)
    for domain in sorted({f.domain for f in files}):
        mine = [i for i, f in enumerate(files) if f.domain == domain]
        for h in (0, 1):
            training = [t for i in mine for t in files[i].trajectories if half_of(t) == h]
            if not training:
                continue
            learned = _learn(base_of(domain), training, files[mine[0]].tools)
            for i in mine:
                runs = [t for t in files[i].trajectories if half_of(t) != h]
                _score(out, i, learned, runs, files[i].tools, f"{domain} half {h}")
    return _ordered(out, files)


def leave_model_out(files: Sequence[Source], base_of: Callable[[str], Profile]) -> Scored:
    out = _empty(files)
    for i, f in enumerate(files):
        training = [t for g in files if g.domain == f.domain and g.model != f.model for t in g.trajectories]
        learned = _learn(base_of(f.domain), training, f.tools)
        _score(out, i, learned, f.trajectories, f.tools, f"{f.name} left out")
    return out


def deployment(files: Sequence[Source], base_of: Callable[[str], Profile]) -> Scored:
    out = _empty(files)
    for i, f in enumerate(files):
        for h in (0, 1):
            training = [t for t in f.trajectories if half_of(t) == h]
            runs = [t for t in f.trajectories if half_of(t) != h]
            if training and runs:
                _score(out, i, _learn(base_of(f.domain), training, f.tools), runs, f.tools, f"{f.name} half {h}")
    return _ordered(out, files)


def _ordered(out: Scored, files: Sequence[Source]) -> Scored:
    """Each file's runs back in file order (the halves were scored one after the other)."""
    for i, f in enumerate(files):
        order = {id(t): n for n, t in enumerate(f.trajectories)}
        out.table[i].sort(key=lambda r: order[id(r.trajectory)])
        out.monitor[i].sort(key=lambda r: order[id(r.trajectory)])
    return out


def auprc(risks: Sequence[tuple[float, bool]]) -> float | None:
    """Average precision of turn risks against their runs' outcomes (failed = positive)."""
    labels = [int(failed) for _, failed in risks]
    if len(set(labels)) < 2:
        return None
    from sklearn.metrics import average_precision_score

    return round(float(average_precision_score(labels, [v for v, _ in risks])), 3)


__all__ = ["Scored", "auprc", "deployment", "half_of", "leave_model_out", "leave_task_out"]
