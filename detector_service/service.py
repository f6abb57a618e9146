"""``fama detector``: the process around one :class:`~detector_service.worker.Worker`.

It builds the worker's parts from the settings and the profile (Redis client, engine, judge, policy extraction),
keeps the profile on the one pushed to Redis (:mod:`detector_service.bus.profiles`; a pushed profile wins over the
file), serves health and metrics, and on SIGTERM/SIGINT drains within ``drain_timeout_s``.
"""

from __future__ import annotations

import asyncio
import logging
import logging.config
import signal
import sys

from redis.asyncio import Redis

from detector_service.bus.client import DETECTOR, redis_client
from detector_service.bus.profiles import ProfileWatch
from detector_service.contract.active_profile import ProfileHolder
from detector_service.contract.profile import Profile, load_profile
from detector_service.contract.redaction import logging_config, redact_also, url_secrets
from detector_service.engine import Engines
from detector_service.health import create_health_app, health_server
from detector_service.llm.extraction import ExtractionScheduler, Extractor
from detector_service.llm.follows import FollowsProfile, Judges, judge_builder
from detector_service.llm.judge import judge_key, make_client
from detector_service.metrics import DetectorMetrics
from detector_service.settings import DetectorSettings
from detector_service.worker import Worker

log = logging.getLogger("detector_service.worker")

EXTRACTION_STOP_S = 1.0  # how long a stopping worker lets LLM extractions in flight finish


def extraction_schedulers(
    profiles: ProfileHolder, redis: Redis, metrics: DetectorMetrics, settings: DetectorSettings
) -> FollowsProfile[ExtractionScheduler]:
    """The LLM-backed DCE's extraction scheduler of the profile in force: one when ``llm_agents`` names DCE, built
    anew when that section or the judge endpoint it calls changes."""

    def build(profile: Profile) -> ExtractionScheduler | None:
        if not profile.llm_agents.dce:
            return None
        key = judge_key(settings.judge_api_key, profile.judge)
        redact_also(key)
        extractor = Extractor(profile.judge, make_client(profile.judge, key), profile.llm_agents.timeout_s)
        return ExtractionScheduler(redis, extractor, profile, metrics, settings.consumer_name)

    return FollowsProfile(profiles, lambda p: (p.llm_agents, p.judge), build, "policy extraction")


async def serve(settings: DetectorSettings, *, until_idle: bool = False, stop: asyncio.Event | None = None) -> int:
    """Run one worker with its health/metrics server until stopped; returns the process exit code."""
    stop = stop or asyncio.Event()
    metrics = DetectorMetrics()
    redis = redis_client(settings.redis_url, DETECTOR, block_ms=settings.block_ms)
    # The profile pushed to Redis, when there is one, is newer than the file (detector_service.bus.profiles).
    profiles = ProfileHolder.of(load_profile(settings.profile))
    profiles.listen(metrics.profile_switched)
    watch = ProfileWatch(redis, profiles)
    await watch.start()
    # Both follow the profile in force; the logs learn each judge key they use (a pushed profile may name another).
    judges = Judges(profiles, judge_builder(settings.judge_api_key))
    extractions = extraction_schedulers(profiles, redis, metrics, settings)
    worker = Worker(settings, redis, Engines(profiles), metrics, judges, extractions)
    server = None
    server_task = None
    if settings.metrics_port:
        server = health_server(create_health_app(redis, metrics), settings.metrics_host, settings.metrics_port)
        server_task = asyncio.create_task(server.serve())
    consume = asyncio.create_task(worker.run(stop, until_idle=until_idle))
    stopping = asyncio.create_task(stop.wait())
    code = 0
    try:
        await asyncio.wait({consume, stopping}, return_when=asyncio.FIRST_COMPLETED)
        if not consume.done():
            log.info("stopping: draining in-flight work (at most %.1fs)", settings.drain_timeout_s)
            done, _ = await asyncio.wait({consume}, timeout=settings.drain_timeout_s)
            if not done:
                log.error(
                    "drain did not finish within %.1fs; unacknowledged entries will be reclaimed",
                    settings.drain_timeout_s,
                )
                consume.cancel()
                code = 1
        if consume.done() and not consume.cancelled():
            consume.result()  # re-raises what stopped the loop, if anything did
    finally:
        stopping.cancel()
        await watch.stop()
        if server is not None and server_task is not None:
            server.should_exit = True
            await server_task
        await judges.aclose()
        # Burst mode finishes its extractions; a stopping worker cuts them short (another replica redoes them).
        for scheduler in extractions.drain():
            await scheduler.aclose(settings.drain_timeout_s if until_idle else EXTRACTION_STOP_S)
        await redis.aclose()
    log.info("worker %s stopped after %d turns", worker.consumer, worker.processed)
    return code


def secrets_of(settings: DetectorSettings) -> list[str]:
    """Every secret the worker holds: the Redis password and the judge's key (from settings or the profile's
    ``judge.api_key_env``)."""
    judge = judge_key(settings.judge_api_key, load_profile(settings.profile).judge)
    return [*url_secrets(settings.redis_url), *filter(None, [judge])]


def run(settings: DetectorSettings, *, until_idle: bool = False) -> None:
    logging.config.dictConfig(logging_config(settings.log_level, secrets_of(settings), quiet=["httpx", "httpx2"]))

    async def main() -> int:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        return await serve(settings, until_idle=until_idle, stop=stop)

    if sys.platform == "win32":  # uvloop has no Windows build
        raise SystemExit(asyncio.run(main()))
    import uvloop  # here, not at the top: it has no Windows build

    # uvloop: a fraction of asyncio's per-callback CPU, and a turn runs several Redis round trips through it.
    raise SystemExit(uvloop.run(main()))
