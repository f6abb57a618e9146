"""``fama eval tau2``: the same tau2 tasks, trials and seeds under each arm — ``direct`` (the model server), and
``observe`` / ``enforce`` (through a proxy in that mode) — then the report (``proxy.eval_tau2.report``).

Episodes run on worker threads (tau2 is synchronous); each finished one is appended to ``episodes.jsonl`` at once,
so Ctrl-C keeps everything finished and a re-run with the same ``--out`` runs only what is missing.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from proxy.eval_tau2 import report, tau2_env
from proxy.eval_tau2.accounting import DIRECT
from proxy.eval_tau2.episodes import EpisodeKey, EpisodeStore, summary
from proxy.eval_tau2.supervised import SUPERVISED_ARMS, ProxyClient, StartedProxy, interventions, root_of

log = logging.getLogger(__name__)
ARMS = (DIRECT, *SUPERVISED_ARMS)
SESSION_HEADER = "X-FAMA-Session"


@dataclass(frozen=True, slots=True)
class EvalOptions:
    upstream_url: str
    model: str
    domain: str
    out: Path
    user_url: str | None = None
    user_model: str | None = None
    api_key: str | None = None
    user_api_key: str | None = None
    num_tasks: int | None = None
    task_ids: tuple[str, ...] = ()
    trials: int = 1
    arms: tuple[str, ...] = ARMS
    profile: Path | None = None
    concurrency: int = 1
    proxy_url: str | None = None
    admin_key: str | None = None
    seed: int = 300
    max_steps: int = 100
    max_errors: int = 10


class OptionError(ValueError):
    pass


def check_options(options: EvalOptions) -> None:
    unknown = [a for a in options.arms if a not in ARMS]
    if unknown or not options.arms:
        raise OptionError(f"--arms: {', '.join(unknown) or 'none'} (choose from {', '.join(ARMS)})")
    if options.domain not in tau2_env.DOMAINS:
        raise OptionError(f"--domain must be one of {', '.join(tau2_env.DOMAINS)}")
    supervised = [a for a in options.arms if a != DIRECT]
    if options.proxy_url and len(supervised) > 1:
        raise OptionError(
            "--proxy-url: a running proxy has one mode; give one supervised arm, e.g. --arms direct,enforce"
        )
    if options.trials < 1 or options.concurrency < 1:
        raise OptionError("--trials and --concurrency must be at least 1")


@dataclass(frozen=True, slots=True)
class Job:
    arm: str
    task: Any
    trial: int


class Harness:
    """The arms' endpoints and proxies for one run."""

    def __init__(self, options: EvalOptions, logdir: Path) -> None:
        self.options = options
        self.run_tag = uuid.uuid4().hex[:8]
        self.user = tau2_env.Endpoint(
            options.user_url or options.upstream_url,
            options.user_model or options.model,
            options.user_api_key or options.api_key,
        )
        self.proxies: dict[str, ProxyClient] = {}
        self._started: list[StartedProxy] = []
        try:
            for arm in options.arms:
                if arm == DIRECT:
                    continue
                if options.proxy_url:
                    self.proxies[arm] = ProxyClient(root_of(options.proxy_url), options.api_key, options.admin_key)
                else:
                    started = StartedProxy(arm, options.upstream_url, options.profile, logdir)
                    self._started.append(started)
                    self.proxies[arm] = started.client(options.api_key)
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        for started in self._started:
            started.stop()

    def agent(self, arm: str, session_id: str) -> tau2_env.Endpoint:
        if arm == DIRECT:
            return tau2_env.Endpoint(self.options.upstream_url, self.options.model, self.options.api_key)
        return tau2_env.Endpoint(
            self.proxies[arm].v1, self.options.model, self.options.api_key, {SESSION_HEADER: session_id}
        )

    def episode(self, job: Job) -> dict[str, Any]:
        o = self.options
        session_id = f"tau2-{o.domain}-{job.task.id}-{job.trial}-{job.arm}-{self.run_tag}"
        seed = o.seed + job.trial
        started = time.monotonic()
        record: dict[str, Any] = {"arm": job.arm, "task_id": str(job.task.id), "trial": job.trial, "seed": seed}
        simulation: dict[str, Any] | None = None
        try:
            simulation = tau2_env.run_episode(
                o.domain, job.task, self.agent(job.arm, session_id), self.user, seed, o.max_steps, o.max_errors
            )
        # tau2 and LiteLLM raise whatever the model's answer provokes (a tool call whose arguments are not JSON,
        # an upstream error after LiteLLM's retries): the episode is a failure and says why.
        except Exception as exc:
            log.warning("episode %s/%s#%d ended in an error: %s", job.arm, job.task.id, job.trial, exc)
            record.update(reward=0.0, success=False, termination="error", turns=0, prompt_tokens=0, completion_tokens=0)
            record["error"] = f"{type(exc).__name__}: {exc}"[:500]
        if simulation is not None:
            record.update(summary(simulation))
        record["wall_s"] = round(time.monotonic() - started, 3)
        if job.arm != DIRECT:
            record["session_id"] = session_id
            proxy = self.proxies[job.arm]
            note = f"tau2 {o.domain} task {job.task.id} trial {job.trial}"
            record["outcome_report"] = proxy.report_outcome(session_id, record["success"], record["reward"], note)
            entries = proxy.session_entries(session_id)
            record["supervision"] = interventions(entries) if entries is not None else None
        record["simulation"] = simulation
        return record


def _worker(harness: Harness, jobs: queue.Queue[Job | None], done: queue.Queue[dict[str, Any]]) -> None:
    while (job := jobs.get()) is not None:
        done.put(harness.episode(job))


def run_jobs(harness: Harness, pending: list[Job], store: EpisodeStore, concurrency: int, console: Console) -> bool:
    """Run the pending episodes; False when interrupted (what finished is stored)."""
    jobs: queue.Queue[Job | None] = queue.Queue()
    done: queue.Queue[dict[str, Any]] = queue.Queue()
    for job in pending:
        jobs.put(job)
    workers = max(1, min(concurrency, len(pending)))
    for _ in range(workers):
        jobs.put(None)
        threading.Thread(target=_worker, args=(harness, jobs, done), daemon=True).start()
    arms = harness.options.arms
    total = {arm: sum(1 for j in pending if j.arm == arm) + _finished(store, arm) for arm in arms}
    with Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=console
    ) as progress:
        bars = {arm: progress.add_task(_label(store, arm), total=total[arm]) for arm in arms}
        for arm in arms:
            progress.update(bars[arm], completed=_finished(store, arm))
        try:
            for _ in pending:
                record = done.get()
                store.add(record)
                progress.update(bars[record["arm"]], advance=1, description=_label(store, record["arm"]))
        except KeyboardInterrupt:
            return False
    return True


def _finished(store: EpisodeStore, arm: str) -> int:
    return sum(1 for r in store.all() if r["arm"] == arm)


def _label(store: EpisodeStore, arm: str) -> str:
    records = [r for r in store.all() if r["arm"] == arm]
    rate = f"{sum(r['success'] for r in records) / len(records):.0%}" if records else "-"
    return f"{arm:<8} pass {rate:>4}"


def eval_tau2_command(options: EvalOptions, console: Console | None = None) -> int:
    console = console or Console(stderr=True)
    try:
        check_options(options)
        tau2_env.check_installed()
        tau2_env.quiet_logs()
        tasks = tau2_env.load_tasks(options.domain, options.num_tasks, list(options.task_ids) or None)
    except (OptionError, tau2_env.Tau2Missing, ValueError) as exc:
        console.print(f"fama eval tau2: {exc}", markup=False, highlight=False, soft_wrap=True)
        return 2
    store = EpisodeStore(options.out)
    pending = [
        Job(arm, task, trial)
        for trial in range(options.trials)
        for task in tasks
        for arm in options.arms
        if not store.done(EpisodeKey(arm, str(task.id), trial))
    ]
    if len(pending) < len(tasks) * options.trials * len(options.arms):
        console.print(
            f"resuming {options.out}: {len(pending)} episodes left", markup=False, highlight=False, soft_wrap=True
        )
    complete = True
    if pending:
        logdir = options.out / "logs"
        logdir.mkdir(parents=True, exist_ok=True)
        harness = Harness(options, logdir)
        try:
            complete = run_jobs(harness, pending, store, options.concurrency, console)
        finally:
            harness.stop()
            tau2_env.close_clients()
    written = write_outputs(options, tasks, store)
    console.print(report.markdown(written), markup=False, highlight=False, soft_wrap=True)
    if not complete:
        console.print(
            f"interrupted: the report covers the finished episodes; run again with --out {options.out}",
            markup=False,
            highlight=False,
        )
        return 130
    return 0


def write_outputs(options: EvalOptions, tasks: list[Any], store: EpisodeStore) -> dict[str, Any]:
    """report.json, report.md, report.png, and per arm a tau2 results file under trajectories/ (+ tools.json)."""
    records = store.all()
    task_ids = {str(t.id) for t in tasks}
    records = [r for r in records if r["task_id"] in task_ids and r["arm"] in options.arms]
    meta = {
        "domain": options.domain,
        "model": options.model,
        "user_model": options.user_model or options.model,
        "tasks": [str(t.id) for t in tasks],
        "trials": options.trials,
        "arms": list(options.arms),
        "seed": options.seed,
        "profile": str(options.profile) if options.profile else None,
    }
    built = report.build(records, meta)
    report.write(options.out, built)
    trajectories = options.out / "trajectories"
    trajectories.mkdir(exist_ok=True)
    (trajectories / "tools.json").write_bytes(orjson.dumps(tau2_env.tools(options.domain), option=orjson.OPT_INDENT_2))
    agent = tau2_env.Endpoint(options.upstream_url, options.model)
    user = tau2_env.Endpoint(options.user_url or options.upstream_url, options.user_model or options.model)
    task_records = [tau2_env.task_record(t) for t in tasks]
    for arm in options.arms:
        simulations = [
            {**r["simulation"], "trial": r["trial"]} for r in records if r["arm"] == arm and r.get("simulation")
        ]
        document = tau2_env.results_document(
            options.domain,
            task_records,
            simulations,
            agent,
            user,
            options.trials,
            options.max_steps,
            options.max_errors,
            options.seed,
        )
        (trajectories / f"{arm}.json").write_bytes(orjson.dumps(document))
    return built
