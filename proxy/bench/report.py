"""The budgets ``fama bench`` checks (DESIGN §8) and its results table."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.table import Table

BUDGETS: dict[str, tuple[float, float | None]] = {
    "latency": (1.0, 3.0),
    "ttft": (2.0, None),
    "enforce_tool_call": (1.5, None),  # DESIGN §8: enforce mode, deterministic detectors over Redis
}
# enforce_ttft has no budget of its own in DESIGN §8: compare it between runs (supervision never holds plain text).
SERIES = ("latency", "ttft", "enforce_tool_call", "enforce_ttft")
THROUGHPUT_BUDGET_RPS = 570.0  # 3x the ~190 req/s of LiteLLM's proxy with one worker


def _verdict(ok: bool) -> str:
    return "[green]ok[/green]" if ok else "[red]over[/red]"


def _budget(name: str, s: dict[str, float]) -> str:
    if name not in BUDGETS:
        return "-"
    p50, p99 = BUDGETS[name]
    text = f"≤{p50:g}"
    ok = s["added_p50_ms"] <= p50
    if p99 is not None:
        text += f" / ≤{p99:g}"
        ok = ok and s["added_p99_ms"] <= p99
    return f"{text}: {_verdict(ok)}"


def render(results: dict[str, Any], console: Console) -> None:
    table = Table(title="fama bench: proxy vs direct, same run (ms unless noted)")
    columns = (
        "series",
        "n",
        "direct p50",
        "proxy p50",
        "added p50",
        "added p99",
        "ratio p50",
        "proxy CPU/req",
        "budget",
    )
    for col in columns:
        table.add_column(col, justify="left" if col in ("series", "budget") else "right")
    for name in SERIES:
        s = results.get(name)
        if s:
            table.add_row(
                name,
                f"{s['requests']:.0f}",
                f"{s['direct_p50_ms']:.2f}",
                f"{s['proxy_p50_ms']:.2f}",
                f"{s['added_p50_ms']:.2f}",
                f"{s['added_p99_ms']:.2f}",
                f"{s['ratio_p50']:.2f}x",
                f"{s['proxy_cpu_ms_per_request']:.3f}",
                _budget(name, s),
            )
    console.print(table)
    t = results["throughput"]
    console.print(
        f"throughput at concurrency {t['concurrency']}: direct {t['direct_rps']:.0f} req/s, "
        f"proxy {t['proxy_rps']:.0f} req/s (ratio {t['ratio']:.2f}), proxy CPU {t['proxy_cpu_ms_per_request']:.3f} ms/req "
        f"= {t['proxy_rps_per_core']:.0f} req/s per core; budget ≥{THROUGHPUT_BUDGET_RPS:.0f} req/s: "
        f"measured {_verdict(t['proxy_rps'] >= THROUGHPUT_BUDGET_RPS)}, "
        f"per core {_verdict(t['proxy_rps_per_core'] >= THROUGHPUT_BUDGET_RPS)}"
    )
    console.print(
        "The client, the upstream and the proxy share this machine's cores: when the direct rate is itself near "
        "the budget, the measured proxy rate is bounded by the machine, and CPU per request is the figure to trust."
    )
