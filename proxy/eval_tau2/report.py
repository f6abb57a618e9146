"""The report of ``fama eval tau2``: ``report.json`` (everything), ``report.md`` (the tables) and ``report.png``
(pass^k per arm; rescued vs broken per supervised arm)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import orjson

from proxy.eval_tau2.accounting import DIRECT, compare, outcomes_of, pass_hat_k


def _arm(records: list[dict[str, Any]]) -> dict[str, Any]:
    n = len(records)
    changed: Counter[str] = Counter()
    asked: Counter[str] = Counter()
    supervised = [r for r in records if "session_id" in r]
    for r in supervised:
        supervision = r.get("supervision") or {}
        changed.update(supervision.get("interventions") or {})
        asked.update(supervision.get("verdicts") or {})
    reports = [r.get("outcome_report") or {} for r in supervised]
    return {
        "episodes": n,
        "passed": sum(bool(r["success"]) for r in records),
        "pass_hat_k": {str(k): v for k, v in pass_hat_k(outcomes_of(records)).items()},
        "avg_reward": sum(float(r["reward"]) for r in records) / n if n else None,
        "avg_turns": sum(int(r["turns"]) for r in records) / n if n else None,
        "prompt_tokens": sum(int(r["prompt_tokens"]) for r in records),
        "completion_tokens": sum(int(r["completion_tokens"]) for r in records),
        "wall_s": round(sum(float(r["wall_s"]) for r in records), 3),
        "avg_wall_s": sum(float(r["wall_s"]) for r in records) / n if n else None,
        "errors": [f"{r['task_id']}#{r['trial']}: {r['error']}" for r in records if r.get("error")],
        "interventions": dict(sorted(changed.items())),
        "verdicts": dict(sorted(asked.items())),
        "records_read": sum(r.get("supervision") is not None for r in supervised) if supervised else None,
        "outcomes_reported": sum("error" not in rep for rep in reports) if supervised else None,
        "outcome_errors": [rep["error"] for rep in reports if "error" in rep],
        "sessions_intervened": sum(bool(rep.get("intervened")) for rep in reports) if supervised else None,
    }


def build(records: list[dict[str, Any]], meta: dict[str, Any]) -> dict[str, Any]:
    arms: list[str] = meta["arms"]
    outcomes = outcomes_of(records)
    per_arm = {arm: _arm([r for r in records if r["arm"] == arm]) for arm in arms}
    comparisons = {arm: compare(outcomes, arm).record() for arm in arms if arm != DIRECT} if DIRECT in arms else {}
    per_task: dict[str, dict[str, str]] = {}
    for r in records:
        per_task.setdefault(r["task_id"], {}).setdefault(r["arm"], "")
        per_task[r["task_id"]][r["arm"]] += "P" if r["success"] else "F"
    return {**meta, "arms_summary": per_arm, "comparisons": comparisons, "per_task": per_task}


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.0%}"


def _num(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def markdown(report: dict[str, Any]) -> str:
    arms: list[str] = report["arms"]
    summary = report["arms_summary"]
    ks = sorted({int(k) for arm in arms for k in summary[arm]["pass_hat_k"]})
    lines = [
        f"## fama eval tau2: {report['domain']}, model {report['model']} "
        f"({len(report['tasks'])} tasks x {report['trials']} trials)",
        "",
        "| arm | episodes | " + " | ".join(f"pass^{k}" for k in ks) + " | avg reward | avg turns | tokens "
        "(prompt+completion) | wall s | errors | interventions | verdicts (not pass) |",
        "|---|---|" + "---|" * len(ks) + "---|---|---|---|---|---|---|",
    ]
    for arm in arms:
        s = summary[arm]
        lines.append(
            f"| {arm} | {s['episodes']} | "
            + " | ".join(_pct(s["pass_hat_k"].get(str(k))) for k in ks)
            + f" | {_num(s['avg_reward'])} | {_num(s['avg_turns'], 1)} | "
            f"{s['prompt_tokens']}+{s['completion_tokens']} | {s['wall_s']:.0f} | {len(s['errors'])} | "
            f"{_counts(s['interventions'])} | {_counts(s['verdicts'])} |"
        )
    if report["comparisons"]:
        lines += [
            "",
            "| arm vs direct | trial pairs | rescued | broken | p (direct fails) | r (rescued) | d (broken) | "
            "d/(r+d) | net gain [95% interval] | verdict |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for arm, c in report["comparisons"].items():
            interval = c["net_gain_interval_95"]
            span = f" [{interval[0]:+.0%}, {interval[1]:+.0%}]" if interval else ""
            net = "-" if c["net_gain"] is None else f"{c['net_gain']:+.0%}"
            lines.append(
                f"| {arm} | {c['pairs']} | {c['rescued']} | {c['broken']} | {_pct(c['p'])} | {_pct(c['r'])} | "
                f"{_pct(c['d'])} | {_pct(c['threshold_d_over_r_plus_d'])} | {net}{span} | {c['verdict']} |"
            )
    lines += ["", "| task | " + " | ".join(arms) + " |", "|---|" + "---|" * len(arms)]
    for task_id, by_arm in report["per_task"].items():
        lines.append(f"| {task_id} | " + " | ".join(by_arm.get(arm, "") for arm in arms) + " |")
    return "\n".join(lines) + "\n"


def _counts(counts: dict[str, int]) -> str:
    return ", ".join(f"{k} x{v}" for k, v in counts.items()) or "-"


def chart(report: dict[str, Any], path: Path) -> bool:
    """pass^k per arm, and rescued vs broken per supervised arm; False when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    arms: list[str] = report["arms"]
    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for arm in arms:
        points = sorted((int(k), v) for k, v in report["arms_summary"][arm]["pass_hat_k"].items())
        if points:
            left.plot([k for k, _ in points], [v for _, v in points], marker="o", label=arm)
    ks = sorted({int(k) for arm in arms for k in report["arms_summary"][arm]["pass_hat_k"]})
    left.set_xticks(ks or [1])
    left.set(title="pass^k per arm", xlabel="k", ylabel="pass^k", ylim=(0, 1.05))
    left.legend()
    compared = list(report["comparisons"])
    xs = range(len(compared))
    right.bar([x - 0.2 for x in xs], [report["comparisons"][a]["rescued"] for a in compared], 0.4, label="rescued")
    right.bar([x + 0.2 for x in xs], [report["comparisons"][a]["broken"] for a in compared], 0.4, label="broken")
    right.set_xticks(list(xs), compared)
    right.yaxis.get_major_locator().set_params(integer=True)
    right.set(title="vs direct, per trial pair", ylabel="trial pairs")
    right.legend()
    figure.suptitle(f"tau2 {report['domain']}: {report['model']}")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return True


def write(out: Path, report: dict[str, Any]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_bytes(orjson.dumps(report, option=orjson.OPT_INDENT_2))
    (out / "report.md").write_text(markdown(report))
    chart(report, out / "report.png")
