"""The dashboard's pages and actions under `/ui`: login/logout, namespaces, one namespace's
versions, one version (behaviour report, feedback), jobs, the chat box and the admin actions.

Auth is the API's: the login form takes a bearer token, the session cookie (service.dashboard.session)
carries its digest, and every request re-authenticates that digest against the token table and
checks the page's scope and the principal's namespaces (a namespace it may not see answers 404).
Actions are POST forms with a CSRF token and call the same functions as the API routes (rollback:
the adapter registry; train: `enqueue_training`; distill: `enqueue_distill`). Rendering is Jinja2
with autoescaping; tokens and feedback text are never logged. Knows nothing about training itself.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from jinja2 import Environment, FileSystemLoader, select_autoescape
from markupsafe import Markup
from sqlalchemy.orm import Session

from deploy.hotswap import parse_served_name
from memory_store.errors import NotFound, StoreError
from memory_store.models import AdapterVersion
from memory_store.queue import JobQueue
from memory_store.repositories import AdapterRepository, FeedbackRepository, TrainingRunRepository
from service.api.auth import ANONYMOUS_ADMIN, Principal, TokenSource
from service.api.schemas import check_namespace
from service.dashboard.diff import highlight_pair
from service.dashboard.plots import line_chart
from service.dashboard.session import COOKIE_NAME, LoginThrottle, SessionSigner

logger = logging.getLogger(__name__)

router = APIRouter(prefix="/ui", include_in_schema=False)

TEMPLATES = Environment(
    loader=FileSystemLoader(Path(__file__).parent / "templates"),
    autoescape=select_autoescape(["html"]),
    trim_blocks=True,
    lstrip_blocks=True,
)
VERSION_METRICS = ("nll_before", "nll_after", "drift_kl", "gap_closure", "train_seconds")
MAX_FORM_BYTES = 16 * 1024
MAX_JOBS_SHOWN, MAX_JOBS_SCANNED = 100, 500  # newest jobs on the jobs page
MAX_LOSS_CHARTS = 6  # the newest runs' loss curves on a namespace page
MAX_QUEUE_SHOWN = 50  # oldest pending feedback items on the jobs page
MAX_INSPECTED_TOKENS = 2000  # per feedback item on the version page


@dataclass(frozen=True)
class Viewer:
    """Who is looking: the principal and the CSRF token its forms carry."""

    principal: Principal
    csrf: str

    def can(self, scope: str) -> bool:
        return self.principal.allows(scope)


class PageRefused(Exception):
    def __init__(self, response: Response) -> None:
        self.response = response


def signer(request: Request) -> SessionSigner:
    state = request.app.state
    found = getattr(state, "dashboard_signer", None)
    if found is None:
        settings = state.settings
        configured = settings.dashboard_session_secret
        secret = hashlib.sha256(configured.encode("utf-8")).digest() if configured else None
        found = state.dashboard_signer = SessionSigner(secret, ttl_s=settings.dashboard_session_ttl_s)
    return found


def login_throttle(request: Request) -> LoginThrottle:
    state = request.app.state
    found = getattr(state, "dashboard_login_throttle", None)
    if found is None:
        settings = state.settings
        found = state.dashboard_login_throttle = LoginThrottle(
            max_failures=settings.dashboard_login_max_failures, window_s=settings.dashboard_login_window_s
        )
    return found


def render(template: str, status_code: int = 200, **context: Any) -> HTMLResponse:
    html = TEMPLATES.get_template(template).render(**context)
    return HTMLResponse(html, status_code=status_code, headers={"Cache-Control": "no-store"})


def refused(status_code: int, message: str, viewer: Viewer | None = None) -> PageRefused:
    return PageRefused(render("error.html", status_code, message=message, viewer=viewer, status=status_code))


def viewer_of(request: Request, scope: str | None) -> Viewer:
    """The request's viewer holding `scope`; PageRefused (login redirect, 403) otherwise."""
    settings = request.app.state.settings
    cookie = request.cookies.get(COOKIE_NAME, "")
    sessions = signer(request)
    if settings.auth_disabled:
        principal: Principal | None = ANONYMOUS_ADMIN
        cookie = cookie or "anonymous"
    else:
        digest = sessions.verify(cookie)
        table: TokenSource = request.app.state.token_table
        principal = table.authenticate_digest(digest) if digest is not None else None
    if principal is None:
        target = quote(request.url.path, safe="/")
        raise PageRefused(RedirectResponse(f"/ui/login?next={target}", status_code=303))
    viewer = Viewer(principal, sessions.csrf_token(cookie))
    if scope is not None and not principal.allows(scope):
        raise refused(403, f"your token lacks the scope {scope!r}", viewer)
    return viewer


async def form_of(request: Request) -> dict[str, str]:
    body = await request.body()
    if len(body) > MAX_FORM_BYTES:
        raise refused(413, "form too large")
    parsed = parse_qs(body.decode("utf-8", "replace"), keep_blank_values=True)
    return {key: values[0] for key, values in parsed.items()}


async def action_viewer(request: Request, scope: str | None) -> tuple[Viewer, dict[str, str]]:
    viewer = viewer_of(request, scope)
    form = await form_of(request)
    cookie = request.cookies.get(COOKIE_NAME, "") or "anonymous"
    if not signer(request).check_csrf(cookie, form.get("csrf")):
        raise refused(403, "the form's CSRF token is missing or stale: reload the page", viewer)
    return viewer, form


def visible_namespace(viewer: Viewer, name: str) -> str:
    """`name` when the viewer may see it; a 404 page otherwise (as for a namespace that does not exist)."""
    try:
        check_namespace(name)
    except ValueError:
        raise refused(404, "no such namespace", viewer) from None
    if not viewer.principal.allows_namespace(name):
        raise refused(404, "no such namespace", viewer)
    return name


def read_session(request: Request) -> Session:
    return request.app.state.read_session_factory()


def handle(fn):  # type: ignore[no-untyped-def]
    """Turns PageRefused into its response (pages raise it from anywhere)."""
    if inspect.iscoroutinefunction(fn):

        @functools.wraps(fn)
        async def wrapped_async(*args: Any, **kwargs: Any) -> Response:
            try:
                return await fn(*args, **kwargs)
            except PageRefused as refusal:
                return refusal.response

        return wrapped_async

    @functools.wraps(fn)
    def wrapped(*args: Any, **kwargs: Any) -> Response:
        try:
            return fn(*args, **kwargs)
        except PageRefused as refusal:
            return refusal.response

    return wrapped


# --- login ---------------------------------------------------------------------------------------


def safe_next(target: str | None) -> str:
    if target and target.startswith("/ui") and "//" not in target and "\\" not in target:
        return target
    return "/ui/"


@router.get("/login", response_class=HTMLResponse)
def login_form(request: Request, next: str | None = None) -> Response:
    return render("login.html", next=safe_next(next), error=None, viewer=None)


@router.post("/login", response_class=HTMLResponse)
@handle
async def login(request: Request) -> Response:
    form = await form_of(request)
    token = form.get("token", "").strip()
    target = safe_next(form.get("next"))
    throttle, client = login_throttle(request), request.client.host if request.client else "unknown"
    wait_s = throttle.retry_after(client)
    if wait_s > 0:
        logger.warning("dashboard login throttled", extra={"client": client})
        response = render(
            "login.html",
            429,
            next=target,
            viewer=None,
            error=f"too many failed logins from this address; try again in {math.ceil(wait_s)} s",
        )
        response.headers["Retry-After"] = str(math.ceil(wait_s))
        return response
    table: TokenSource = request.app.state.token_table
    principal = table.authenticate(token) if token else None
    if principal is None:
        throttle.failed(client)
        logger.info("dashboard login refused")  # never the token
        return render("login.html", 401, next=target, error="that token is not valid", viewer=None)
    throttle.succeeded(client)
    sessions = signer(request)
    cookie = sessions.issue(hashlib.sha256(token.encode("utf-8")).digest())
    response = RedirectResponse(target, status_code=303)
    response.set_cookie(
        COOKIE_NAME,
        cookie,
        max_age=sessions.ttl_s,
        httponly=True,
        samesite="strict",
        secure=request.url.scheme == "https",
        path="/ui",
    )
    logger.info("dashboard login", extra={"token_label": principal.label})
    return response


@router.post("/logout")
@handle
async def logout(request: Request) -> Response:
    await action_viewer(request, None)  # any valid session with its CSRF token
    response = RedirectResponse("/ui/login", status_code=303)
    response.delete_cookie(COOKIE_NAME, path="/ui")
    return response


# --- pages ---------------------------------------------------------------------------------------


@router.get("", include_in_schema=False)
def root_redirect() -> Response:
    return RedirectResponse("/ui/", status_code=307)


def namespace_rows(session: Session, viewer: Viewer) -> list[dict[str, Any]]:
    patterns = viewer.principal.namespaces
    adapters = {a.name: a for a in AdapterRepository(session).list_with_versions(namespace_patterns=patterns)}
    pending = FeedbackRepository(session).pending_by_namespace(namespace_patterns=patterns)
    runs = TrainingRunRepository(session)
    rows = []
    for name in sorted(set(adapters) | set(pending)):
        if not viewer.principal.allows_namespace(name):
            continue
        adapter = adapters.get(name)
        versions = list(adapter.versions) if adapter is not None else []
        current = next((v for v in versions if adapter and v.version == adapter.current_version), None)
        last_train = runs.latest(namespace=name, kind="train")
        last_distill = runs.latest(namespace=name, kind="distill")
        errors = [run.error for run in (last_train, last_distill) if run is not None and run.error]
        rows.append(
            {
                "name": name,
                "current": adapter.current_version if adapter else None,
                "status": current.status
                if current
                else ("no version yet" if not versions else versions[-1].status),
                "versions": len(versions),
                "pending": pending.get(name, 0),
                "last_train": last_train,
                "last_distill": last_distill,
                "errors": errors,
            }
        )
    return rows


@router.get("/", response_class=HTMLResponse)
@handle
def namespaces_page(request: Request) -> Response:
    viewer = viewer_of(request, "adapters:read")
    with read_session(request) as session:
        rows = namespace_rows(session, viewer)
    return render("namespaces.html", viewer=viewer, rows=rows)


def gap_closure(metrics: dict[str, Any]) -> float | None:
    value = metrics.get("gap_closure")
    if isinstance(value, (int, float)):
        return float(value)
    return None


def version_rows(versions: list[AdapterVersion], runs: dict[int, Any]) -> list[dict[str, Any]]:
    rows = []
    for row in versions:
        metrics = dict(row.metrics or {})
        run = runs.get(row.training_run_id) if row.training_run_id is not None else None
        run_metrics = dict(run.metrics or {}) if run is not None else {}
        train_seconds = metrics.get("train_seconds", run_metrics.get("train_seconds"))
        rows.append(
            {
                "row": row,
                "metrics": metrics,
                "gate": metrics.get("gate") or run_metrics.get("gate"),
                "gap_closure": gap_closure(metrics),
                "train_seconds": train_seconds,
                "run": run,
            }
        )
    return rows


def metric_number(metrics: dict[str, Any], key: str) -> float | None:
    value = metrics.get(key)
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


@router.get("/ns/{name}", response_class=HTMLResponse)
@handle
def namespace_page(request: Request, name: str) -> Response:
    viewer = viewer_of(request, "adapters:read")
    visible_namespace(viewer, name)
    with read_session(request) as session:
        repository = AdapterRepository(session)
        try:
            adapter = repository.get_adapter(name=name)
        except NotFound:
            raise refused(404, "no such namespace", viewer) from None
        versions = list(repository.list_versions(name=name, limit=200, newest_first=True))[::-1]
        run_ids = {row.training_run_id for row in versions if row.training_run_id is not None}
        run_repository = TrainingRunRepository(session)
        recent_runs = run_repository.recent(namespace=name, limit=MAX_LOSS_CHARTS)
        runs = {run.id: run for run in recent_runs}
        runs.update({run.id: run for run in run_repository.by_ids(run_ids - set(runs))})
        rows = version_rows(versions, runs)
        nll_chart = line_chart(
            "held-out NLL and drift by version",
            {
                key: [(r["row"].version, metric_number(r["metrics"], key)) for r in rows]
                for key in ("nll_before", "nll_after", "drift_kl")
            },
            x_label="version",
        )
        gap_chart = line_chart(
            "gap closure by version",
            {"gap_closure": [(r["row"].version, r["gap_closure"]) for r in rows]},
            x_label="version",
        )
        seconds_chart = line_chart(
            "training seconds by version",
            {"train_seconds": [(r["row"].version, r["train_seconds"]) for r in rows]},
            x_label="version",
        )
        loss_charts = []
        for run in recent_runs:
            losses = (run.metrics or {}).get("loss_per_step")
            if isinstance(losses, list) and losses:
                title = f"{run.kind} run #{run.id} (v{run.version}) loss per step"
                loss_charts.append(
                    Markup(line_chart(title, {"loss": list(enumerate(losses, start=1))}, x_label="step"))
                )
        return render(
            "namespace.html",
            viewer=viewer,
            adapter=adapter,
            rows=rows[::-1],
            charts=[Markup(chart) for chart in (nll_chart, gap_chart, seconds_chart)],
            loss_charts=loss_charts,
            pending=FeedbackRepository(session).count_pending(namespace=name),
        )


def report_rows(report: dict[str, Any] | None) -> list[dict[str, Any]]:
    rows = []
    if not isinstance(report, dict):
        return rows
    for row in [*(report.get("taught") or []), *(report.get("general") or [])]:
        if not isinstance(row, dict):
            continue
        parent, candidate = highlight_pair(str(row.get("parent", "")), str(row.get("candidate", "")))
        rows.append(
            {
                "kind": row.get("kind", ""),
                "question": str(row.get("question", "")),
                "expected": row.get("expected") or ", ".join(map(str, row.get("keys") or [])),
                "parent": Markup(parent),
                "candidate": Markup(candidate),
                "parent_right": bool(row.get("parent_right")),
                "candidate_right": bool(row.get("candidate_right")),
            }
        )
    return rows


@router.get("/ns/{name}/v/{version}", response_class=HTMLResponse)
@handle
def version_page(request: Request, name: str, version: int) -> Response:
    from service.api.routes.adapters import version_detail

    viewer = viewer_of(request, "adapters:read")
    visible_namespace(viewer, name)
    settings = request.app.state.settings
    with read_session(request) as session:
        try:
            row = AdapterRepository(session).get_version(name=name, version=version)
        except NotFound:
            raise refused(404, "no such version", viewer) from None
        detail = version_detail(row, settings)
        report = detail.behaviour_report
        feedback = []
        if (
            viewer.can("feedback:read")
            and row.feedback_from_id is not None
            and row.feedback_to_id is not None
        ):
            items = FeedbackRepository(session).list(
                namespace=name, after_id=row.feedback_from_id - 1, limit=50
            )
            feedback = [item for item in items if item.id <= row.feedback_to_id]
        validator = request.app.state.feedback_validator
        tokens = {
            item.id: (
                validator.inspect(
                    {
                        "messages": item.messages,
                        "target_index": item.target_index,
                        "continuation": item.continuation,
                    }
                )
                or []
            )[:MAX_INSPECTED_TOKENS]
            for item in feedback
        }
        return render(
            "version.html",
            viewer=viewer,
            name=name,
            version=detail,
            metrics=json.dumps(detail.metrics, indent=1, sort_keys=True, default=str),
            summary=(report or {}).get("summary") if isinstance(report, dict) else None,
            report=report_rows(report),
            feedback=feedback,
            tokens=tokens,
            is_current=row.status == "current",
        )


@router.get("/jobs", response_class=HTMLResponse)
@handle
def jobs_page(request: Request) -> Response:
    viewer = viewer_of(request, "adapters:read")
    with read_session(request) as session:
        newest = JobQueue(session).recent(limit=MAX_JOBS_SCANNED)
        jobs = [
            job
            for job in newest
            if (job.namespace is None and viewer.principal.all_namespaces)
            or (job.namespace is not None and viewer.principal.allows_namespace(job.namespace))
        ][:MAX_JOBS_SHOWN]
        pending: dict[str, int] = {}
        queue: list[Any] = []
        if viewer.can("feedback:read"):
            feedback = FeedbackRepository(session)
            patterns = viewer.principal.namespaces
            pending = feedback.pending_by_namespace(namespace_patterns=patterns)
            queue = [
                item
                for item in feedback.list(status="pending", limit=200, namespace_patterns=patterns)
                if viewer.principal.allows_namespace(item.namespace)
            ][:MAX_QUEUE_SHOWN]
        return render("jobs.html", viewer=viewer, jobs=jobs, pending=pending, queue=queue, refresh_s=3)


# --- actions (admin) -----------------------------------------------------------------------------


@router.post("/ns/{name}/rollback")
@handle
async def rollback_action(request: Request, name: str) -> Response:
    import anyio

    from service.adapters.registry import PromotionFailed
    from service.api.routes.adapters import adapter_registry

    viewer, form = await action_viewer(request, "admin")
    visible_namespace(viewer, name)
    target = int(form["version"]) if form.get("version", "").isdigit() else None
    try:
        await anyio.to_thread.run_sync(
            lambda: adapter_registry(request).rollback(
                name, target, reason=f"rolled back from the dashboard by {viewer.principal.label}"
            )
        )
    except PromotionFailed as error:
        raise refused(409, f"rollback refused: {error}", viewer) from None
    except NotFound as error:
        raise refused(404, str(error), viewer) from None
    except (StoreError, ValueError) as error:  # e.g. a version whose files were deleted
        raise refused(409, f"rollback refused: {error}", viewer) from None
    return RedirectResponse(f"/ui/ns/{name}", status_code=303)


@router.post("/ns/{name}/train")
@handle
async def train_action(request: Request, name: str) -> Response:
    from service.api.routes.jobs import enqueue_training
    from service.api.schemas import TrainJobCreate

    viewer, _ = await action_viewer(request, "admin")
    visible_namespace(viewer, name)
    with request.app.state.session_factory.begin() as session:
        enqueue_training(
            TrainJobCreate(namespace=name), session, request.app.state.settings, viewer.principal
        )
    return RedirectResponse("/ui/jobs", status_code=303)


@router.post("/ns/{name}/distill")
@handle
async def distill_action(request: Request, name: str) -> Response:
    from service.jobs.distill import enqueue_distill

    viewer, _ = await action_viewer(request, "admin")
    visible_namespace(viewer, name)
    with request.app.state.session_factory.begin() as session:
        enqueue_distill(
            session, request.app.state.settings, name, trigger="dashboard", created_by=viewer.principal.label
        )
    return RedirectResponse("/ui/jobs", status_code=303)


# --- chat (inference) ----------------------------------------------------------------------------


def chat_aliases(request: Request, viewer: Viewer) -> list[str]:
    with read_session(request) as session:
        return [
            adapter.name
            for adapter in AdapterRepository(session).list_adapters(limit=500)
            if viewer.principal.allows_namespace(adapter.name)
        ]


def chat_model(viewer: Viewer, model: str) -> str:
    """`model` when the viewer may ask it: an alias (a namespace) or one version's own name
    (`<namespace>-v<N>`, asked whatever is current); a 404 page otherwise."""
    parsed = parse_served_name(model)
    if parsed is not None and not viewer.principal.allows_namespace(model):
        visible_namespace(viewer, parsed[0])
    else:
        visible_namespace(viewer, model)
    return model


@router.get("/chat", response_class=HTMLResponse)
@handle
def chat_page(request: Request, model: str | None = None) -> Response:
    viewer = viewer_of(request, "inference")
    return render(
        "chat.html",
        viewer=viewer,
        aliases=chat_aliases(request, viewer),
        model=model,
        question="",
        answer=None,
        error=None,
        served=None,
    )


@router.post("/chat", response_class=HTMLResponse)
@handle
async def chat_ask(request: Request) -> Response:
    """Ask the alias through the OpenAI gateway (service.inference.routes.forward), as an agent would."""
    from service.api.errors import ApiError
    from service.inference.proxy import SERVED_MODEL_HEADER
    from service.inference.routes import forward

    viewer, form = await action_viewer(request, "inference")
    model, question = form.get("model", ""), form.get("question", "").strip()
    chat_model(viewer, model)
    aliases = await _aliases_async(request, viewer)
    answer = error = served = None
    if not question:
        error = "type a question"
    else:
        # greedy, as the gate and the behaviour report decode: versions compare answer for answer
        body = {
            "model": model,
            "messages": [{"role": "user", "content": question}],
            "max_tokens": 200,
            "temperature": 0,
        }
        request.state.principal = viewer.principal  # the gateway applies the same namespaces and label
        try:
            response = await forward(request, "/v1/chat/completions", "chat", body)
            payload = json.loads(bytes(response.body))
            if response.status_code >= 400:
                error = str((payload.get("error") or {}).get("message") or payload)
            else:
                answer = payload["choices"][0]["message"]["content"]
                served = response.headers.get(SERVED_MODEL_HEADER)
        except ApiError as failure:  # the gateway's own errors (ProxyError) included
            error = str(failure)
        except (ValueError, KeyError, IndexError, TypeError):
            error = "the gateway's answer could not be read"
    return render(
        "chat.html",
        viewer=viewer,
        aliases=aliases,
        model=model,
        question=question,
        answer=answer,
        error=error,
        served=served,
    )


async def _aliases_async(request: Request, viewer: Viewer) -> list[str]:
    import anyio

    return await anyio.to_thread.run_sync(chat_aliases, request, viewer)
