"""The ``fama`` command line (DESIGN §6). The only place that reads the environment."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any

import typer
from pydantic_settings import BaseSettings
from typer.core import TyperCommand

from detector_service.contract.profile import Mode
from detector_service.settings import DetectorSettings
from proxy.eval_tau2.command import eval_app
from proxy.settings import ProxySettings

# Plain click help: rich markup would read "[...]" in help texts as tags, and its tables cut long names at narrow widths.
app = typer.Typer(
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode=None,
    help="FAMA supervisory proxy for tool-using agents.",
)


def _overrides(**flags: Any) -> dict[str, Any]:
    """Flags override environment variables; a flag left unset does not."""
    return {k: v for k, v in flags.items() if v is not None}


def env_names(settings: type[BaseSettings]) -> dict[str, str]:
    """Each field of a service's settings and the variable it is read from: the settings class names them."""
    prefix = str(settings.model_config.get("env_prefix", ""))
    return {name: f"{prefix}{name}".upper() for name in settings.model_fields}


def _env(settings: type[BaseSettings], field: str) -> str:
    return env_names(settings)[field]


def _settings_command(settings: type[BaseSettings]) -> type[TyperCommand]:
    """A command whose help ends with the variables of ``settings`` that no flag of it shows."""

    class SettingsCommand(TyperCommand):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            shown = {
                name for p in self.params for name in ([p.envvar] if isinstance(p.envvar, str) else p.envvar or [])
            }
            rest = [name for name in env_names(settings).values() if name not in shown]
            self.epilog = "Also read from the environment (no flag): " + ", ".join(rest) + "."

    return SettingsCommand


def _option(settings: type[BaseSettings], field: str, help: str, *flags: str) -> Any:
    """An option for a settings field; its help shows the variable the settings read."""
    return typer.Option(*flags, envvar=_env(settings, field), show_envvar=True, help=help)


@app.command(cls=_settings_command(ProxySettings))
def serve(
    upstream_url: Annotated[str | None, _option(ProxySettings, "upstream_url", "Model server base URL.")] = None,
    upstream_api_key: Annotated[
        str | None, _option(ProxySettings, "upstream_api_key", "Key sent upstream (default: the client's).")
    ] = None,
    host: Annotated[str | None, _option(ProxySettings, "host", "Listen address.")] = None,
    port: Annotated[int | None, _option(ProxySettings, "port", "Listen port.")] = None,
    metrics_port: Annotated[
        int | None, _option(ProxySettings, "metrics_port", "Serve /metrics on this port instead of --port.")
    ] = None,
    workers: Annotated[int | None, _option(ProxySettings, "workers", "Worker processes.")] = None,
    redis_url: Annotated[str | None, _option(ProxySettings, "redis_url", "Redis URL; empty = embedded.")] = None,
    mode: Annotated[Mode | None, _option(ProxySettings, "mode", "observe or enforce.")] = None,
    profile: Annotated[str | None, _option(ProxySettings, "profile", "Profile YAML.")] = None,
    local_model: Annotated[
        bool | None,
        _option(ProxySettings, "local_model", "Start the bundled llama.cpp model.", "--local-model/--no-local-model"),
    ] = None,
    upstream_responses: Annotated[
        str | None,
        _option(
            ProxySettings,
            "upstream_responses",
            "/v1/responses: auto (probe the upstream once), native (forward) or bridge (to chat completions).",
        ),
    ] = None,
    log_level: Annotated[str | None, _option(ProxySettings, "log_level", "Log level.")] = None,
) -> None:
    """Run the proxy."""
    from proxy.local_model.model import LocalModelError
    from proxy.server import run

    settings = ProxySettings(
        **_overrides(
            upstream_url=upstream_url,
            upstream_api_key=upstream_api_key,
            host=host,
            port=port,
            metrics_port=metrics_port,
            workers=workers,
            redis_url=redis_url,
            mode=mode,
            profile=profile,
            local_model=local_model,
            upstream_responses=upstream_responses,
            log_level=log_level,
        )
    )
    try:
        run(settings)
    except LocalModelError as e:
        typer.echo(f"fama serve: {e}", err=True)
        raise typer.Exit(1) from e


@app.command(cls=_settings_command(DetectorSettings))
def detector(
    redis_url: Annotated[str | None, _option(DetectorSettings, "redis_url", "Redis URL.")] = None,
    profile: Annotated[str | None, _option(DetectorSettings, "profile", "Profile YAML.")] = None,
    metrics_port: Annotated[int | None, _option(DetectorSettings, "metrics_port", "Metrics/health port.")] = None,
    until_idle: Annotated[bool, typer.Option(help="Exit once the stream has no work left.")] = False,
    log_level: Annotated[str | None, _option(DetectorSettings, "log_level", "Log level.")] = None,
) -> None:
    """Run a detector worker (a member of the Redis consumer group)."""
    from detector_service.service import run

    settings = DetectorSettings(
        **_overrides(redis_url=redis_url, profile=profile, metrics_port=metrics_port, log_level=log_level)
    )
    run(settings, until_idle=until_idle)


@app.command(
    epilog=f"The LLM judge's key: {_env(DetectorSettings, 'judge_api_key')}, else the variable the profile's judge.api_key_env names."
)
def replay(
    files: Annotated[list[Path], typer.Argument(help="Trajectory files (tau-bench v1, tau2-bench, JSONL).")],
    tools: Annotated[Path | None, typer.Option(help="OpenAI tools array for records that carry none.")] = None,
    profile: Annotated[Path | None, typer.Option(help="Profile YAML.")] = None,
    json_out: Annotated[Path | None, typer.Option("--json", help="Write per-trajectory flags here.")] = None,
    judge_concurrency: Annotated[
        int, typer.Option(min=1, help="Judge calls at once, when the profile enables the LLM judge.")
    ] = 4,
) -> None:
    """Replay recorded trajectories through the detectors, turn by turn (and the LLM judge, if the profile enables it)."""
    import os

    from detector_service.offline.replay import replay_command

    raise typer.Exit(
        replay_command(
            files,
            tools=tools,
            profile=profile,
            json_out=json_out,
            judge_concurrency=judge_concurrency,
            judge_api_key=os.environ.get(_env(DetectorSettings, "judge_api_key")) or None,
        )
    )


@app.command()
def analyze(
    files: Annotated[list[Path], typer.Argument(help="Trajectory files with outcomes.")],
    out: Annotated[Path, typer.Option(help="Where to write the profile YAML.")],
    tools: Annotated[Path | None, typer.Option(help="OpenAI tools array for records that carry none.")] = None,
    profile: Annotated[
        Path | None, typer.Option(help="Profile to calibrate (default: one built from the runs' policy).")
    ] = None,
    leave_out: Annotated[
        list[str] | None, typer.Option(help="Leave this agent model's runs out of the calibration (repeatable).")
    ] = None,
) -> None:
    """Stage 1: failure analysis over trajectories; writes a profile whose findings are calibrated on outcomes."""
    from detector_service.offline.analyze import analyze_command

    raise typer.Exit(analyze_command(files, tools=tools, out=out, profile=profile, leave_out=leave_out or []))


@app.command()
def evaluate(
    data: Annotated[Path, typer.Argument(help="Folder with trajectories/*.jsonl and domains/<name>/tools*.json.")],
    profiles: Annotated[Path, typer.Option(help="Folder of <domain>.yaml profiles.")] = Path("profiles"),
    json_out: Annotated[Path | None, typer.Option("--json", help="Write all tables here.")] = None,
    calibrate: Annotated[
        bool, typer.Option(help="First recalibrate the findings of each <domain>.yaml on all runs of its domain.")
    ] = False,
) -> None:
    """Detection quality per file, model and domain (acting and all flags), zero-config, with the profiles,
    and with profiles calibrated leaving each model out."""
    from detector_service.offline.evaluate import evaluate_command

    raise typer.Exit(evaluate_command(data, profiles=profiles, json_out=json_out, recalibrate=calibrate))


@app.command()
def report(
    files: Annotated[list[Path], typer.Argument(help="Sessions with outcomes (fama sessions export) or other runs.")],
    profile: Annotated[Path | None, typer.Option(help="The profile in force (default: zero-config).")] = None,
    candidate: Annotated[Path | None, typer.Option(help="A candidate profile to compare (fama analyze --out).")] = None,
    tools: Annotated[Path | None, typer.Option(help="OpenAI tools array for records that carry none.")] = None,
    json_out: Annotated[Path | None, typer.Option("--json", help="Write the report here.")] = None,
) -> None:
    """Shadow report: the share of failed and of successful sessions enforce mode would act on, per finding and per
    tool, as recorded by observe mode and replayed with the current and a candidate profile."""
    from detector_service.offline.report import report_command

    raise typer.Exit(report_command(files, profile=profile, candidate=candidate, tools=tools, json_out=json_out))


@app.command()
def bench(
    requests: Annotated[int, typer.Option(help="Requests per measured series.")] = 2000,
    concurrency: Annotated[int, typer.Option(help="Concurrent clients for the throughput series.")] = 16,
    json_out: Annotated[Path | None, typer.Option("--json", help="Write the results here.")] = None,
) -> None:
    """Overhead benchmark: direct vs through the proxy, in the same run."""
    from proxy.bench.overhead import bench_command

    raise typer.Exit(bench_command(requests=requests, concurrency=concurrency, json_out=json_out))


@app.command()
def soak(
    minutes: Annotated[float, typer.Option(min=0.1, help="How long the load runs.")] = 10.0,
    concurrency: Annotated[int, typer.Option(min=1, help="Concurrent SDK clients.")] = 4,
    interval_s: Annotated[float, typer.Option(min=1.0, help="Seconds per reported interval.")] = 60.0,
    redis_down_s: Annotated[float, typer.Option(min=0.0, help="How long Redis stays down half-way through.")] = 5.0,
    seed: Annotated[int, typer.Option(help="Seed of the request mix.")] = 12,
    json_out: Annotated[Path | None, typer.Option("--json", help="Write the report here.")] = None,
    logs: Annotated[Path | None, typer.Option(help="Keep the services' logs in this folder.")] = None,
) -> None:
    """Bounded soak on 127.0.0.1: enforce mode, Redis, a detector, faults; RSS, errors and p99 per interval."""
    from proxy.bench.soak import soak_command

    raise typer.Exit(
        soak_command(
            minutes=minutes,
            concurrency=concurrency,
            interval_s=interval_s,
            redis_down_s=redis_down_s,
            seed=seed,
            json_out=json_out,
            logs=logs,
        )
    )


profile_app = typer.Typer(no_args_is_help=True, help="The profile in force on running proxies and detectors.")
app.add_typer(profile_app, name="profile")


@profile_app.command("push")
def profile_push(
    file: Annotated[Path, typer.Argument(help="The profile YAML to put in force.")],
    url: Annotated[str, typer.Option(envvar="FAMA_PROXY_URL", show_envvar=True, help="A proxy replica.")] = (
        "http://127.0.0.1:8080"
    ),
    admin_key: Annotated[str | None, _option(ProxySettings, "admin_key", "The proxy's admin key.")] = None,
    redis_url: Annotated[
        str | None, typer.Option(help="Store it in this Redis directly instead of posting it to --url.")
    ] = None,
) -> None:
    """Put a profile in force without a restart: POST /admin/profile on one replica (with Redis, every proxy replica
    and detector takes it within a second), or straight into Redis with --redis-url."""
    import orjson

    try:
        body = file.read_bytes()
    except OSError as exc:
        typer.echo(f"fama profile push: cannot read {file}: {exc}", err=True)
        raise typer.Exit(2) from exc
    answer = _push_to_redis(file, body, redis_url) if redis_url else _post_profile(url, body, admin_key)
    typer.echo(orjson.dumps({k: answer[k] for k in ("version", "sha256", "source") if k in answer}).decode())


def _post_profile(url: str, body: bytes, admin_key: str | None) -> dict[str, Any]:
    import httpx2
    import orjson

    headers = {"content-type": "application/yaml"}
    if admin_key:
        headers["authorization"] = f"Bearer {admin_key}"
    try:
        response = httpx2.post(url.rstrip("/") + "/admin/profile", content=body, headers=headers, timeout=30)
    except httpx2.HTTPError as exc:
        typer.echo(f"fama profile push: {url} cannot be reached: {exc}", err=True)
        raise typer.Exit(1) from exc
    try:
        answer: dict[str, Any] = orjson.loads(response.content)
    except orjson.JSONDecodeError:
        answer = {"error": {"message": response.text[:500]}}
    if response.status_code != 200:
        error = answer.get("error") or {}
        field = f" (field {error['param']})" if error.get("param") else ""
        typer.echo(f"fama profile push: {response.status_code}: {error.get('message')}{field}", err=True)
        raise typer.Exit(1)
    return answer


def _push_to_redis(file: Path, body: bytes, redis_url: str) -> dict[str, Any]:
    import asyncio

    from redis.exceptions import RedisError

    from detector_service.bus.client import DETECTOR, redis_client
    from detector_service.bus.profiles import push_profile
    from detector_service.contract.profile import ProfileError, parse_profile_text

    try:
        profile = parse_profile_text(body, f"profile {file}")
    except ProfileError as exc:
        typer.echo(f"fama profile push: {exc}", err=True)
        raise typer.Exit(1) from exc

    async def push() -> dict[str, Any]:
        redis = redis_client(redis_url, DETECTOR, block_ms=0)
        try:
            return (await push_profile(redis, profile)).describe()
        finally:
            await redis.aclose()

    try:
        return asyncio.run(push())
    except (RedisError, OSError) as exc:
        typer.echo(f"fama profile push: Redis: {exc}", err=True)
        raise typer.Exit(1) from exc


sessions_app = typer.Typer(no_args_is_help=True, help="Recorded sessions.")
app.add_typer(sessions_app, name="sessions")


def _env_secrets() -> list[str]:
    """The keys the services' logs redact by name, as this shell's environment holds them."""
    names = ("FAMA_ADMIN_KEY", "FAMA_UPSTREAM_API_KEY", "FAMA_JUDGE_API_KEY")
    found = [os.environ.get(name, "") for name in names]
    found += os.environ.get("FAMA_API_KEYS", "").split(",")
    return [s.strip() for s in found if s.strip()]


@sessions_app.command("export")
def sessions_export(
    out: Annotated[Path, typer.Option(help="Where to write the JSONL records.")],
    redis_url: Annotated[str | None, _option(ProxySettings, "redis_url", "The proxy's Redis URL.")] = None,
    tenant: Annotated[str | None, typer.Option(help="Only this tenant's sessions (default: every tenant).")] = None,
    since: Annotated[str | None, typer.Option(help="Only sessions active since this ISO 8601 time (UTC).")] = None,
    last: Annotated[
        str | None, typer.Option(help="Only sessions active in this last period: 7d, 12h, 30m, 2w.")
    ] = None,
    with_outcome_only: Annotated[bool, typer.Option(help="Only sessions whose outcome was reported.")] = False,
    redact: Annotated[bool, typer.Option(help="Redact secrets in message text as the logs do.")] = False,
) -> None:
    """Every recorded session as one JSONL record (messages, tools, reward from the outcome, verdicts and
    interventions), the format replay, analyze and report read."""
    from detector_service.offline.export import export_command

    url = redis_url or ""
    if not url:
        typer.echo("fama sessions export: give --redis-url (or FAMA_REDIS_URL)", err=True)
        raise typer.Exit(2)
    raise typer.Exit(
        export_command(
            url,
            out,
            tenant=tenant,
            since=since,
            last=last,
            with_outcome_only=with_outcome_only,
            redact=redact,
            secrets=_env_secrets() if redact else (),
        )
    )


app.add_typer(eval_app, name="eval")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
