"""``fama eval tau2``: its flags (a typer sub-app that ``proxy.cli`` mounts as ``fama eval``)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Annotated

import typer

eval_app = typer.Typer(no_args_is_help=True, add_completion=False, help="Live evaluation of supervision on benchmarks.")


@eval_app.command("tau2")
def eval_tau2(
    out: Annotated[Path, typer.Option(help="Output folder; a re-run with the same folder resumes.")],
    upstream_url: Annotated[
        str | None, typer.Option(envvar="FAMA_UPSTREAM_URL", help="The agent's model server, with /v1.")
    ] = None,
    model: Annotated[str | None, typer.Option(help="The agent's model name.")] = None,
    local_model: Annotated[
        bool,
        typer.Option(
            "--local-model",
            help="Start the bundled small model and use it as the agent's (and by default the user's) model server.",
        ),
    ] = False,
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

    if local_model == (upstream_url is not None or model is not None):
        raise typer.BadParameter("give either --local-model, or both --upstream-url and --model")
    if not local_model and (upstream_url is None or model is None):
        raise typer.BadParameter("--upstream-url and --model go together")
    options = EvalOptions(
        upstream_url=upstream_url or "",
        model=model or "",
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
    if not local_model:
        raise typer.Exit(eval_tau2_command(options))
    from proxy.bench.processes import free_port
    from proxy.local_model.model import LocalModel, LocalModelError, LocalModelOptions, bundled_model_path

    try:
        with LocalModel(LocalModelOptions(model_path=bundled_model_path(), port=free_port())) as served:
            code = eval_tau2_command(replace(options, upstream_url=served.base_url, model=served.options.alias))
    except LocalModelError as exc:
        typer.echo(f"fama eval tau2: {exc}", err=True)
        raise typer.Exit(2) from exc
    raise typer.Exit(code)
