"""A 20-second ``fama soak``: the same processes, mix and faults as the 10-minute run, and the report it writes."""

from __future__ import annotations

import shutil
from pathlib import Path

import orjson
import pytest

from proxy.bench.soak import soak_command

pytestmark = [
    pytest.mark.redis,
    pytest.mark.skipif(shutil.which("redis-server") is None, reason="redis-server is not installed"),
]


def test_a_short_soak_reports_rss_errors_and_p99_per_interval(tmp_path: Path) -> None:
    out = tmp_path / "soak.json"
    code = soak_command(minutes=1 / 3, concurrency=3, interval_s=5, redis_down_s=2, seed=1, json_out=out)
    report = orjson.loads(out.read_bytes())
    assert code == 0, report
    assert report["alive_at_end"] == {"proxy": True, "detector": True}
    # Every fault asked for failed the way the SDK reports it, and nothing else failed.
    assert report["unexpected"] == {}
    assert set(report["errors"]) == {"InternalServerError 500 (error-500)", "APIError (drop)"}
    # The Redis restart half-way: answers served degraded meanwhile, supervised again after.
    assert [e.split(": ", 1)[1] for e in report["events"]] == ["redis-server stopped", "redis-server started again"]
    assert report["degraded"]["while_redis_down"]
    assert sum(i["interventions"] for i in report["intervals"]) > 0
    intervals = report["intervals"]
    assert len(intervals) == 4
    assert all(i["requests"] > 0 and i["p99_ms"] > 0 for i in intervals)
    assert all(set(i["rss_mb"]) == {"proxy", "detector"} for i in intervals)
    assert set(report["rss"]) == {"proxy", "detector"}
