"""``fama evaluate``: detection quality on a folder of recorded runs, the way enforce mode is judged.

For every ``trajectories/*.jsonl`` file (each record names its ``domain`` and ``source_format``; tools come
from ``domains/<tau1|tau2>-<domain>/tools_openai.json``, write tools from that folder's ``tools.json``
``kind``) these settings are replayed:

- ``zero-config``: no profile;
- ``profiles``: ``<profiles>/<domain>.yaml`` as shipped (its ``findings:`` entries calibrated on all runs);
- ``lomo`` (leave one model out): the same profile with its ``findings:`` recalibrated on the runs of the
  *other* models of that domain only, so no entry is tuned to the model it is scored on;
- ``lto`` (leave the task out) and ``deployment`` (each file learned on half its tasks): see
  ``offline.protocols``; each of ``lto``, ``lomo`` and ``deployment`` also as ``<name>+monitor``, with the risk
  monitor trained on the same runs as the table.

Each is reported per file, per model, per domain and pooled, on acting flags and on all flags: failed runs
flagged, passed runs flagged, prevention (``evaluation.outcomes``). Output: markdown tables on stdout,
everything as JSON with ``--json``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import orjson

from detector_service.contract.profile import Profile, ProfileError, ToolKind, load_profile
from detector_service.contract.toolkinds import ToolKinds
from detector_service.engine import Engine
from detector_service.offline import protocols
from detector_service.offline.calibrate import calibrate, with_calibration
from detector_service.offline.evaluation import outcome_tables
from detector_service.offline.replay import replay
from detector_service.offline.trajectories import Replayed, TrajectoryError, load, load_tools


class _File:
    def __init__(self, path: Path, data: Path) -> None:
        self.name = path.name
        self.trajectories = list(load(path))
        first = self.trajectories[0].extra if self.trajectories else {}
        self.domain = str(first.get("domain", "?"))
        self.model = str(first.get("agent_model", "?"))
        version = "tau1" if str(first.get("source_format", "")).startswith("tau-bench") else "tau2"
        folder = data / "domains" / f"{version}-{self.domain}"
        self.tools = load_tools(folder / "tools_openai.json")
        for t in self.trajectories:
            t.tools = t.tools if t.tools is not None else self.tools
        declared = orjson.loads((folder / "tools.json").read_bytes()) if (folder / "tools.json").exists() else []
        kinds = {str(t["name"]): ToolKind(t["kind"]) for t in declared if isinstance(t, dict) and "kind" in t}
        self.kinds = ToolKinds(Profile(tools=kinds), self.tools)


def _rows(files: Sequence[_File], results: Sequence[Sequence[Replayed]]) -> dict[str, Any]:
    return outcome_tables([(f.name, r, f.kinds) for f, rs in zip(files, results, strict=True) for r in rs])


def _profile(profiles: Path, domain: str) -> Profile:
    path = profiles / f"{domain}.yaml"
    return load_profile(path) if path.exists() else Profile()


def evaluate(data: Path, profiles: Path) -> dict[str, Any]:
    """Every setting's outcome tables (``tables[setting]["pooled" | "per_file" | ...]``), and under ``"monitor"`` the
    prefix-warning AUPRC of each protocol and which trainings switched the monitor on."""
    files = [_File(p, data) for p in sorted((data / "trajectories").glob("*.jsonl"))]
    zero = [replay(Engine(Profile()), f.trajectories, f.tools) for f in files]
    shipped = [replay(Engine(_profile(profiles, f.domain)), f.trajectories, f.tools) for f in files]
    out = {"zero-config": _rows(files, zero), "profiles": _rows(files, shipped)}
    monitor: dict[str, Any] = {}
    for name, protocol in (
        ("lto", protocols.leave_task_out),
        ("lomo", protocols.leave_model_out),
        ("deployment", protocols.deployment),
    ):
        scored = protocol(files, lambda domain: _profile(profiles, domain))
        out[name] = _rows(files, scored.table)
        out[f"{name}+monitor"] = _rows(files, scored.monitor)
        monitor[name] = {"auprc": protocols.auprc(scored.risks), "switched_on": scored.switched_on}
    return {**out, "monitor": monitor}


def _cell(row: dict[str, Any]) -> str:
    def pct(v: float | None) -> str:
        return "-" if v is None else f"{v:.0%}"

    return f"{pct(row['failed_flagged'])} / {pct(row['passed_flagged'])} / {pct(row['prevention'])}"


def markdown(tables: dict[str, Any], view: str = "acting") -> str:
    """One table per grouping: rows = files (models, domains, pooled), columns = the three settings, each cell
    failed flagged / passed flagged / prevention."""
    settings = [name for name, table in tables.items() if "pooled" in table]
    lines = []
    for group in ("per_file", "per_model", "per_domain"):
        lines.append(f"\n{view} flags, {group.replace('_', ' ')}: failed flagged / passed flagged / prevention\n")
        lines.append("| | n failed / passed | " + " | ".join(settings) + " |")
        lines.append("|---|---|" + "---|" * len(settings))
        first = tables[settings[0]][group]
        for name in first:
            n = first[name][view]
            cells = [_cell(tables[s][group][name][view]) for s in settings]
            lines.append(f"| {name} | {n['n_failed']} / {n['n_passed']} | " + " | ".join(cells) + " |")
        pooled = [_cell(tables[s]["pooled"][view]) for s in settings]
        n = tables[settings[0]]["pooled"][view]
        lines.append(f"| **pooled** | {n['n_failed']} / {n['n_passed']} | " + " | ".join(pooled) + " |")
    return "\n".join(lines)


def calibrate_profiles(data: Path, profiles: Path) -> list[Path]:
    """Recalibrate the ``findings:`` of every ``<profiles>/<domain>.yaml`` on all runs of its domain."""
    files = [_File(p, data) for p in sorted((data / "trajectories").glob("*.jsonl"))]
    written = []
    for domain in sorted({f.domain for f in files}):
        path = profiles / f"{domain}.yaml"
        if not path.exists():
            continue
        runs = [t for f in files if f.domain == domain for t in f.trajectories]
        tools = next(f.tools for f in files if f.domain == domain)
        calibrated = calibrate(load_profile(path), runs, tools)
        path.write_text(with_calibration(path.read_text(encoding="utf-8"), calibrated), encoding="utf-8")
        load_profile(path)  # what we write must load
        written.append(path)
    return written


def evaluate_command(data: Path, *, profiles: Path, json_out: Path | None = None, recalibrate: bool = False) -> int:
    try:
        if recalibrate:
            for path in calibrate_profiles(data, profiles):
                print(f"calibrated {path}")
        tables = evaluate(data, profiles)
    except (TrajectoryError, ProfileError, OSError, orjson.JSONDecodeError, ValueError) as exc:
        print(f"error: {exc}")
        return 2
    print(markdown(tables, "acting"))
    print(markdown(tables, "all"))
    print("\nmonitor: prefix-warning AUPRC (turn risks against run outcomes) and trainings that switched it on\n")
    for name, row in tables["monitor"].items():
        print(
            f"- {name}: AUPRC {row['auprc']}; on in {len(row['switched_on'])}: {', '.join(row['switched_on']) or '-'}"
        )
    if json_out is not None:
        json_out.write_bytes(orjson.dumps(tables, option=orjson.OPT_INDENT_2))
    return 0
