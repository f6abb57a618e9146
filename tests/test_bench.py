"""The pieces of ``fama bench`` that turn measurements into its figures."""

from __future__ import annotations

import math
import os
import time

from proxy.bench.overhead import CpuMeter, Series, Throughput, cpu_seconds


def _burn(seconds: float) -> None:
    end = time.process_time() + seconds
    while time.process_time() < end:
        pass


def test_cpu_meter_counts_the_process_cpu_time_per_request() -> None:
    with CpuMeter(os.getpid()) as meter:
        _burn(0.2)
    assert meter.used_s is not None
    assert 0.15 <= meter.used_s <= 1.0
    assert 15 <= meter.ms_per(10) <= 100


def test_cpu_of_an_unknown_process_is_not_a_number() -> None:
    assert cpu_seconds(2**22 + 12345) is None  # above the kernel's pid limit: never a live process
    with CpuMeter(None) as meter:
        pass
    assert math.isnan(meter.ms_per(10))


def test_series_reports_what_the_proxy_adds_over_the_direct_call() -> None:
    series = Series("latency", direct=[0.001] * 99 + [0.002], proxied=[0.0015] * 99 + [0.005], proxy_cpu_ms=0.8)
    summary = series.summary()
    assert math.isclose(summary["added_p50_ms"], 0.5)
    assert math.isclose(summary["ratio_p50"], 1.5)
    assert summary["added_p99_ms"] > 0.5  # the slow tail of the proxied side shows up at p99
    assert summary["proxy_cpu_ms_per_request"] == 0.8


def test_throughput_per_core_follows_from_cpu_per_request() -> None:
    summary = Throughput(direct_rps=2000, proxy_rps=500, proxy_cpu_ms=1.25).summary()
    assert math.isclose(summary["ratio"], 0.25)
    assert math.isclose(summary["proxy_rps_per_core"], 800)
