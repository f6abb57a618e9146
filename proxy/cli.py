"""The ``fama`` command line (DESIGN §6). The only place that reads the environment."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from detector_service.contract.profile import Mode

app = typer.Typer(no_args_is_help=True, add_completion=False, help="FAMA supervisory proxy for tool-using agents.")


def _overrides(**flags: Any) -> dict[str, Any]:
    """Flags override environment variables; a flag left unset does not."""
    return {k: v for k, v in flags.items() if v is not None}


@app.command()
def serve(
    upstream_url: Annotated[str | None, typer.Option(help="Model server base URL [env FAMA_UPSTREAM_URL].")] = None,
    upstream_api_key: Annotated[str | None, typer.Option(help="Key sent upstream [env FAMA_UPSTREAM_API_KEY].")] = None,
    host: Annotated[str | None, typer.Option(help="Listen address [env FAMA_HOST].")] = None,
    port: Annotated[int | None, typer.Option(help="Listen port [env FAMA_PORT].")] = None,
    metrics_port: Annotated[
        int | None, typer.Option(help="Serve /metrics on this port instead of --port [env FAMA_METRICS_PORT].")
    ] = None,
    workers: Annotated[int | None, typer.Option(help="Worker processes [env FAMA_WORKERS].")] = None,
    redis_url: Annotated[str | None, typer.Option(help="Redis URL; empty = embedded [env FAMA_REDIS_URL].")] = None,
    mode: Annotated[Mode | None, typer.Option(help="observe or enforce [env FAMA_MODE].")] = None,
    profile: Annotated[str | None, typer.Option(help="Profile YAML [env FAMA_PROFILE].")] = None,
    local_model: Annotated[
        bool | None, typer.Option("--local-model/--no-local-model", help="Start the bundled llama.cpp model.")
    ] = None,
    upstream_responses: Annotated[
        str | None,
        typer.Option(
            help="/v1/responses: auto (probe the upstream once), native (forward) or bridge (to chat completions) "
            "[env FAMA_UPSTREAM_RESPONSES]."
        ),
    ] = None,
    log_level: Annotated[str | None, typer.Option(help="Log level [env FAMA_LOG_LEVEL].")] = None,
) -> None:
    """Run the proxy."""
    from proxy.local_model.model import LocalModelError
    from proxy.server import run
    from proxy.settings import ProxySettings

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


@app.command()
def detector(
    redis_url: Annotated[str | None, typer.Option(help="Redis URL [env FAMA_REDIS_URL].")] = None,
    profile: Annotated[str | None, typer.Option(help="Profile YAML [env FAMA_PROFILE].")] = None,
    metrics_port: Annotated[int | None, typer.Option(help="Metrics/health port [env FAMA_METRICS_PORT].")] = None,
    until_idle: Annotated[bool, typer.Option(help="Exit once the stream has no work left.")] = False,
    log_level: Annotated[str | None, typer.Option(help="Log level [env FAMA_LOG_LEVEL].")] = None,
) -> None:
    """Run a detector worker (a member of the Redis consumer group)."""
    from detector_service.service import run
    from detector_service.settings import DetectorSettings

    settings = DetectorSettings(
        **_overrides(redis_url=redis_url, profile=profile, metrics_port=metrics_port, log_level=log_level)
    )
    run(settings, until_idle=until_idle)


@app.command()
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
    from detector_service.offline.replay import replay_command

    raise typer.Exit(
        replay_command(files, tools=tools, profile=profile, json_out=json_out, judge_concurrency=judge_concurrency)
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


eval_app = typer.Typer(no_args_is_help=True, add_completion=False, help="Live evaluation of supervision on benchmarks.")
app.add_typer(eval_app, name="eval")


@eval_app.command("tau2")
def eval_tau2(
    upstream_url: Annotated[str, typer.Option(envvar="FAMA_UPSTREAM_URL", help="The agent's model server, with /v1.")],
    model: Annotated[str, typer.Option(help="The agent's model name.")],
    out: Annotated[Path, typer.Option(help="Output folder; a re-run with the same folder resumes.")],
    domain: Annotated[str, typer.Option(help="airline, retail or telecom.")] = "airline",
    user_url: Annotated[
        str | None, typer.Option(help="The user simulator's model server (default: --upstream-url); never proxied.")
    ] = None,
    user_model: Annotated[str | None, typer.Option(help="The user simulator's model (default: --model).")] = None,
    tasks: Annotated[int | None, typer.Option("--tasks", min=1, help="The domain's first N tasks.")] = None,
    task_ids: Annotated[list[str] | None, typer.Option(help="These task ids (repeatable).")] = None,
    trials: Annotated[int, typer.Option(min=1, help="Trials per task and arm (K of pass^k).")] = 1,
    arms: Annotated[str, typer.Option(help="Comma-separated: direct, observe, enforce.")] = "direct,observe,enforce",
    profile: Annotated[Path | None, typer.Option(help="Profile YAML for the proxies started here.")] = None,
    concurrency: Annotated[int, typer.Option(min=1, help="Episodes at once.")] = 1,
    proxy_url: Annotated[
        str | None, typer.Option(help="A running proxy for the one supervised arm, instead of starting one.")
    ] = None,
    admin_key: Annotated[
        str | None, typer.Option(envvar="FAMA_ADMIN_KEY", help="Admin key of --proxy-url, to read its interventions.")
    ] = None,
    api_key: Annotated[str | None, typer.Option(help="Key for the model server and the proxy.")] = None,
    seed: Annotated[int, typer.Option(help="Seed of trial 0; trial t uses seed + t in every arm.")] = 300,
    max_steps: Annotated[int, typer.Option(min=1, help="tau2's step limit per episode.")] = 100,
) -> None:
    """A/B of supervision on tau2-bench: pass^k per arm, rescued vs broken, and the decision rule p > d/(r+d)."""
    from proxy.eval_tau2.runner import EvalOptions, eval_tau2_command

    options = EvalOptions(
        upstream_url=upstream_url,
        model=model,
        domain=domain,
        out=out,
        user_url=user_url,
        user_model=user_model,
        api_key=api_key,
        num_tasks=tasks,
        task_ids=tuple(task_ids or ()),
        trials=trials,
        arms=tuple(a.strip() for a in arms.split(",") if a.strip()),
        profile=profile,
        concurrency=concurrency,
        proxy_url=proxy_url,
        admin_key=admin_key,
        seed=seed,
        max_steps=max_steps,
    )
    raise typer.Exit(eval_tau2_command(options))


def main() -> None:
    app()
