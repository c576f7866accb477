"""The operator's dashboard (/ui): auth and the session cookie, scopes, namespace binding,
escaping, the pages' content and the admin actions, first through the ASGI app on SQLite and
PostgreSQL, then in a real headless Chromium (Debian's package, driven by Playwright) against the
app served by uvicorn, with screenshots of every page at desktop and phone widths under
tests/output/ui/. The data is built through the adapter store and the repositories; vLLM is
tests.unit.fake_vllm.FakeVllm.
"""

from __future__ import annotations

import logging
import re
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from memory_store.models import Job
from memory_store.queue import JobQueue
from memory_store.repositories import AdapterRepository, FeedbackRepository, TrainingRunRepository
from service.api.auth import RELOAD_CHECK_S
from service.app import create_app
from service.config import Settings
from service.dashboard.session import COOKIE_NAME
from tests.unit.fake_vllm import FakeVllm

pytestmark = pytest.mark.integration

ADMIN, READER, GEO_ONLY, CHATTER = (
    "admin-secret-token",
    "reader-secret-token",
    "geo-secret-token",
    "chat-secret-token",
)
TOKENS = ",".join(
    [
        f"{ADMIN}=admin label:ops",
        f"{READER}=adapters:read feedback:read label:viewer",
        f"{GEO_ONLY}=adapters:read feedback:read ns:geo label:geo-team",
        f"{CHATTER}=adapters:read inference label:chatter",
    ]
)
HOSTILE = '<script>window.__pwned = 1</script> and "><img src=x onerror="window.__pwned=2">'
SHOTS = Path(__file__).resolve().parents[1] / "output" / "ui"
CHROMIUM = shutil.which("chromium") or ("/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None)


@pytest.fixture
def fake_vllm() -> Iterator[FakeVllm]:
    with FakeVllm() as server:
        yield server


def make_settings(db_url: str, tmp_path: Path, vllm: FakeVllm) -> Settings:
    from training.tokenizer_files import tokenizer_dir

    return Settings(
        _env_file=None,
        database_url=db_url,
        data_dir=tmp_path / "var",
        auth_tokens=TOKENS,
        tokenizer=tokenizer_dir("qwen2"),
        vllm_urls=[vllm.url],
        swap_drain_s=0,
        alias_cache_ttl_s=0,
        train_debounce_s=0,
    )


def seed(settings: Settings, factory: Any, vllm: FakeVllm) -> None:
    """geo: v0 (base) -> v1 -> v2 (current, with a behaviour report and a hostile feedback item);
    other: v0 only. Built through AdapterStore.publish and the repositories, as the train job does."""
    from training.adapter_store import AdapterStore

    store = AdapterStore(settings.adapters_dir)
    with factory.begin() as session:
        feedback = FeedbackRepository(session)
        first, _ = feedback.add(
            namespace="geo",
            messages=[{"role": "user", "content": "What is the capital of France?"}],
            continuation="Paris.",
        )
        hostile, _ = feedback.add(
            namespace="geo",
            messages=[{"role": "user", "content": "Say something " + HOSTILE}],
            continuation=HOSTILE,
        )
        feedback.add(
            namespace="geo", continuation="still pending", messages=[{"role": "user", "content": "q?"}]
        )
        ids = (first.id, hostile.id)
    report = {
        "summary": {
            "taught_total": 2,
            "taught_right": 1,
            "rephrased_total": 0,
            "rephrased_right": 0,
            "general_total": 1,
            "general_parent_right": 1,
            "general_right": 1,
            "general_lost": 0,
        },
        "taught": [
            {
                "kind": "taught",
                "feedback_id": ids[0],
                "question": "What is the capital of France?",
                "expected": "Paris.",
                "parent": "The capital of France is Lyon.",
                "candidate": "The capital of France is Paris.",
                "parent_right": False,
                "candidate_right": True,
            },
            {
                "kind": "taught",
                "feedback_id": ids[1],
                "question": "Say something " + HOSTILE,
                "expected": HOSTILE,
                "parent": "No.",
                "candidate": HOSTILE,
                "parent_right": False,
                "candidate_right": False,
            },
        ],
        "general": [
            {
                "kind": "general",
                "question": "What is 2+2?",
                "keys": ["4"],
                "parent": "4.",
                "candidate": "It is 4.",
                "parent_right": True,
                "candidate_right": True,
            },
        ],
    }
    with factory.begin() as session:
        job = JobQueue(session).enqueue(kind="train", namespace="geo", payload={"namespace": "geo"})
        job.status = "running"
        job.progress = {"phase": "train", "step": 3, "total_steps": 8, "loss": 0.75}
    for name, count in (("geo", 3), ("other", 1)):
        for version in range(count):
            source = settings.data_dir / "src" / f"{name}-{version}"
            source.mkdir(parents=True)
            (source / "adapter_config.json").write_text('{"r": 8}')
            (source / "adapter_model.safetensors").write_bytes(bytes(range(256)) * (version + 3))
            metadata: dict[str, Any] = {"parent_version": version - 1 if version else None}
            metrics: dict[str, Any] = {}
            if version:
                metrics = {
                    "nll_before": 2.0 - 0.3 * version,
                    "nll_after": 1.6 - 0.4 * version,
                    "drift_kl": 0.01 * version,
                    "gap_closure": 0.4 + 0.2 * version,
                    "train_seconds": 3.0 + version,
                    "gate": f"passed: nll drop {0.4 * version:.2f}",
                }
            if version == 2:
                metadata["behaviour_report"] = report
            published = store.publish(name, version, source, metadata)
            with factory.begin() as session:
                repository = AdapterRepository(session)
                repository.ensure_adapter(name=name, base_model="tiny")
                run_id = None
                if version:
                    runs = TrainingRunRepository(session)
                    run = runs.start(namespace=name, kind="train", parent_version=version - 1)
                    losses = [2.5 / (step + version) for step in range(1, 9)]
                    runs.finish(
                        id=run.id,
                        status="succeeded",
                        version=version,
                        metrics={"loss_per_step": losses, "train_seconds": 3.0 + version},
                    )
                    run_id = run.id
                repository.add_version(
                    name=name,
                    version=version,
                    parent_version=version - 1 if version else None,
                    training_run_id=run_id,
                    path=str(published.path),
                    sha256=published.sha256,
                    metrics=metrics,
                    feedback_from_id=ids[0] if version == 2 and name == "geo" else None,
                    feedback_to_id=ids[1] if version == 2 and name == "geo" else None,
                )
                repository.set_current(name=name, version=version)
                if version == 2 and name == "geo":
                    FeedbackRepository(session).mark_trained(ids=ids, version=2)
            vllm.state.adapters[f"{name}-v{version}"] = str(published.path)


@pytest.fixture
def app_settings(db_url: str, tmp_path: Path, fake_vllm: FakeVllm) -> Settings:
    return make_settings(db_url, tmp_path, fake_vllm)


@pytest.fixture
def client(app_settings: Settings, fake_vllm: FakeVllm) -> Iterator[TestClient]:
    with TestClient(create_app(app_settings, start_background=False), follow_redirects=False) as test_client:
        seed(app_settings, test_client.app.state.session_factory, fake_vllm)  # type: ignore[attr-defined]
        yield test_client


def login(client: TestClient, token: str) -> None:
    client.cookies.clear()
    response = client.post("/ui/login", data={"token": token, "next": "/ui/"})
    assert response.status_code == 303, response.text
    assert response.headers["location"] == "/ui/"


def csrf_of(html: str) -> str:
    found = re.search(r'name="csrf" value="([0-9a-f]+)"', html)
    assert found, "no CSRF token in the page"
    return found.group(1)


def current_of(client: TestClient, name: str) -> int:
    factory = client.app.state.session_factory  # type: ignore[attr-defined]
    with factory() as session:
        return AdapterRepository(session).get_adapter(name=name).current_version


# --- through the ASGI app ------------------------------------------------------------------------


def test_login_sets_a_signed_httponly_cookie_without_the_token(client: TestClient) -> None:
    assert client.get("/ui/").status_code == 303  # no session: to the login form
    assert client.get("/ui/").headers["location"].startswith("/ui/login")
    refused = client.post("/ui/login", data={"token": "nope"})
    assert refused.status_code == 401 and "not valid" in refused.text
    response = client.post("/ui/login", data={"token": ADMIN})
    header = response.headers["set-cookie"]
    assert "HttpOnly" in header and "SameSite=strict" in header.replace("Strict", "strict")
    assert "Max-Age=" in header and ADMIN not in header
    assert client.get("/ui/").status_code == 200
    cookie = client.cookies[COOKIE_NAME]
    digest, expires, signature = cookie.split(".")
    for forged in (
        f"{digest}.{int(expires) + 3600}.{signature}",  # a longer life
        f"{'0' * 64}.{expires}.{signature}",  # another token's digest
        f"{digest}.{expires}.{'0' * 64}",
        ADMIN,
    ):
        client.cookies.clear()
        client.cookies.set(COOKIE_NAME, forged)
        assert client.get("/ui/").status_code == 303, forged  # refused: to the login form


def test_pages_show_versions_metrics_and_the_behaviour_report(client: TestClient) -> None:
    login(client, READER)
    home = client.get("/ui/").text
    assert "geo" in home and "other" in home and "v2" in home
    page = client.get("/ui/ns/geo").text
    assert "<svg" in page and "nll_before" in page and "loss per step" in page
    assert "passed: nll drop 0.80" in page and "80%" in page  # gate reason, gap closure
    version = client.get("/ui/ns/geo/v/2").text
    assert "Lyon" in version and '<mark class="ins">Paris</mark>' in version
    assert "taught 1/2 right" in version
    # the `loraloop inspect` view of each trained item: the continuation's tokens are the trained ones
    trained = "".join(re.findall(r'<span class="trained" title="[^"]*">([^<]*)</span>', version))
    masked = "".join(re.findall(r'<span class="masked" title="[^"]*">([^<]*)</span>', version))
    assert "Paris." in trained and "capital of France" in masked and "capital" not in trained
    assert client.get("/ui/ns/geo/v/9").status_code == 404
    assert client.get("/ui/ns/nope").status_code == 404
    assert "refresh" in client.get("/ui/jobs").text


def test_feedback_text_renders_as_text(client: TestClient) -> None:
    login(client, READER)
    html = client.get("/ui/ns/geo/v/2").text
    assert "<script>window.__pwned" not in html and "<img src=x" not in html
    assert "&lt;script&gt;window.__pwned = 1&lt;/script&gt;" in html
    assert "&lt;img src=x onerror=" in html


def test_admin_rolls_back_a_read_only_token_is_refused(client: TestClient) -> None:
    login(client, READER)
    page = client.get("/ui/ns/geo").text
    assert "roll back to" not in page  # no action offered
    forged = client.post("/ui/ns/geo/rollback", data={"version": "1", "csrf": csrf_of(page)})
    assert forged.status_code == 403 and current_of(client, "geo") == 2

    login(client, ADMIN)
    page = client.get("/ui/ns/geo").text
    assert client.post("/ui/ns/geo/rollback", data={"version": "1"}).status_code == 403  # no CSRF
    assert client.post("/ui/ns/geo/rollback", data={"version": "1", "csrf": "0" * 64}).status_code == 403
    assert current_of(client, "geo") == 2
    rolled = client.post("/ui/ns/geo/rollback", data={"version": "1", "csrf": csrf_of(page)})
    assert rolled.status_code == 303, rolled.text
    assert current_of(client, "geo") == 1
    assert 'id="current">v1<' in client.get("/ui/ns/geo").text

    factory = client.app.state.session_factory  # type: ignore[attr-defined]
    with factory.begin() as session:
        AdapterRepository(session).mark_files_deleted(name="geo", version=0)
    gone = client.post("/ui/ns/geo/rollback", data={"version": "0", "csrf": csrf_of(page)})
    assert gone.status_code == 409 and "rollback refused" in gone.text and current_of(client, "geo") == 1
    assert (
        client.post("/ui/ns/geo/rollback", data={"version": "77", "csrf": csrf_of(page)}).status_code == 404
    )

    queued = client.post("/ui/ns/geo/train", data={"csrf": csrf_of(page)})
    assert queued.status_code == 303
    jobs = client.get("/ui/jobs").text
    assert "train" in jobs and ">ops<" in jobs  # audit: the job names the token entry that queued it
    with factory() as session:
        versions = {
            row.version: row for row in AdapterRepository(session).list_versions(name="geo", limit=10)
        }
        assert "by ops" in (versions[2].reason or "")  # the version rolled back from names who did it


def test_a_token_bound_to_one_namespace_sees_only_it(client: TestClient) -> None:
    login(client, GEO_ONLY)
    home = client.get("/ui/").text
    assert "/ui/ns/geo" in home and "/ui/ns/other" not in home
    assert client.get("/ui/ns/other").status_code == 404
    assert client.get("/ui/ns/other/v/0").status_code == 404
    assert client.get("/ui/ns/geo").status_code == 200


def test_scopes_apply_to_every_page(client: TestClient) -> None:
    login(client, READER)
    assert client.get("/ui/chat").status_code == 403  # no inference scope
    login(client, CHATTER)
    chat = client.get("/ui/chat")
    assert chat.status_code == 200
    answer = client.post(
        "/ui/chat", data={"model": "geo", "question": "Capital of France?", "csrf": csrf_of(chat.text)}
    )
    assert answer.status_code == 200 and "answer from geo-v2" in answer.text
    assert client.post("/ui/ns/geo/train", data={"csrf": csrf_of(chat.text)}).status_code == 403


def test_without_auth_the_dashboard_is_open(db_url: str, tmp_path: Path, fake_vllm: FakeVllm) -> None:
    """`auth_disabled` (the `make run` demo): every page and action works without logging in."""
    settings = make_settings(db_url, tmp_path, fake_vllm).model_copy(update={"auth_disabled": True})
    with TestClient(create_app(settings, start_background=False), follow_redirects=False) as client:
        seed(settings, client.app.state.session_factory, fake_vllm)  # type: ignore[attr-defined]
        page = client.get("/ui/ns/geo")
        assert page.status_code == 200 and "roll back to v1" in page.text
        assert client.post("/ui/ns/geo/rollback", data={"version": "1"}).status_code == 403  # CSRF still
        rolled = client.post("/ui/ns/geo/rollback", data={"version": "1", "csrf": csrf_of(page.text)})
        assert rolled.status_code == 303 and current_of(client, "geo") == 1


def test_logs_hold_no_token_and_no_feedback_text(
    client: TestClient, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.DEBUG):
        client.post("/ui/login", data={"token": "wrong-" + ADMIN})
        for token in (READER, CHATTER, ADMIN):
            login(client, token)
            for path in ("/ui/", "/ui/ns/geo", "/ui/ns/geo/v/2", "/ui/jobs", "/ui/chat"):
                client.get(path)
        page = client.get("/ui/ns/geo").text
        client.post("/ui/chat", data={"model": "geo", "question": "Secret question?", "csrf": csrf_of(page)})
        client.post("/ui/ns/geo/rollback", data={"version": "1", "csrf": csrf_of(page)})
    logged = "\n".join(f"{r.getMessage()} {r.args!r} {r.__dict__!r}" for r in caplog.records)
    assert "dashboard login" in logged, "nothing was logged: the capture is not working"
    for secret in (ADMIN, READER, CHATTER, "window.__pwned", "Secret question"):
        assert secret not in logged, secret


def test_every_dashboard_route_needs_a_session(client: TestClient) -> None:
    """Enumerated from the app's routes: without a session cookie every /ui page and action sends
    the browser to the login form (the login form itself excepted), and changes nothing."""
    from fastapi.routing import APIRoute, iter_route_contexts

    open_routes = {("GET", "/ui/login"), ("POST", "/ui/login"), ("GET", "/ui")}
    checked = 0
    for route in iter_route_contexts(client.app.routes):  # type: ignore[attr-defined]
        if not isinstance(route.original_route, APIRoute) or not route.path.startswith("/ui"):
            continue
        path = route.path.replace("{name}", "geo").replace("{version}", "1")
        for method in route.methods:
            if (method, route.path) in open_routes:
                continue
            client.cookies.clear()
            response = client.request(method, path, data={"version": "1"})
            assert response.status_code == 303, (method, path)
            assert response.headers["location"].startswith("/ui/login"), (method, path)
            checked += 1
    assert checked >= 8
    assert current_of(client, "geo") == 2


# --- in a real browser ---------------------------------------------------------------------------

needs_chromium = pytest.mark.skipif(
    CHROMIUM is None, reason="Debian's chromium is not installed (`make browser` installs it)"
)


@pytest.fixture
def live_app(tmp_path: Path, fake_vllm: FakeVllm) -> Any:
    settings = make_settings(f"sqlite:///{tmp_path / 'store' / 'loraloop.db'}", tmp_path, fake_vllm)
    return create_app(settings, start_background=False)


@pytest.fixture
def live_url(live_app: Any, fake_vllm: FakeVllm) -> Iterator[str]:
    import uvicorn

    app = live_app
    settings = app.state.settings
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "uvicorn did not start"
        time.sleep(0.05)
    port = server.servers[0].sockets[0].getsockname()[1]
    seed(settings, app.state.session_factory, fake_vllm)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


@pytest.fixture
def browser() -> Iterator[Any]:
    playwright_api = pytest.importorskip("playwright.sync_api")
    with playwright_api.sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        try:
            yield launched
        finally:
            launched.close()


VIEWPORTS = {"desktop": {"width": 1280, "height": 900}, "phone": {"width": 390, "height": 844}}


def browser_login(browser: Any, url: str, token: str, viewport: str = "desktop") -> Any:
    page = browser.new_context(viewport=VIEWPORTS[viewport]).new_page()
    page.goto(f"{url}/ui/")
    assert "/ui/login" in page.url
    page.fill("#token", token)
    page.click("#login")
    page.wait_for_url(f"{url}/ui/")
    return page


def shoot(page: Any, name: str) -> None:
    SHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SHOTS / f"{name}.png"), full_page=True)


def set_progress(factory: Any, progress: dict[str, Any]) -> None:
    with factory.begin() as session:
        job = session.query(Job).filter(Job.status == "running").one()
        job.progress = progress


@pytest.fixture
def live_factory(live_app: Any) -> Any:
    return live_app.state.session_factory


@needs_chromium
def test_browser_admin_session(browser: Any, live_url: str, live_factory: Any) -> None:
    page = browser_login(browser, live_url, ADMIN)
    assert page.locator("#namespaces").inner_text().count("geo") >= 1
    shoot(page, "namespaces-desktop")
    page.click("text=geo")
    page.wait_for_url(f"{live_url}/ui/ns/geo")
    assert page.locator("#current").inner_text() == "v2"
    assert page.locator("svg.chart").count() == 5  # 3 metric charts + the loss of each run
    assert "0.80" in page.locator("#versions").inner_text()
    shoot(page, "namespace-desktop")

    page.click("a[href='/ui/ns/geo/v/2']")
    page.wait_for_url(f"{live_url}/ui/ns/geo/v/2")
    assert page.locator("#report .card").count() == 3
    assert "Paris" in page.locator("#report mark.ins").first.inner_text()
    # the hostile continuation is text on the page, and nothing ran
    assert page.locator(".continuation").nth(1).inner_text() == HOSTILE
    assert page.evaluate("window.__pwned === undefined")
    assert page.locator("img[src=x]").count() == 0
    trained = "".join(page.locator(".feedback").nth(1).locator(".tokens .trained").all_inner_texts())
    assert HOSTILE in trained  # the hostile continuation is what was trained, shown as text
    shoot(page, "version-desktop")

    page.goto(f"{live_url}/ui/ns/geo")
    page.click("button:has-text('roll back to v1')")
    page.wait_for_url(f"{live_url}/ui/ns/geo")
    assert page.locator("#current").inner_text() == "v1"

    page.goto(f"{live_url}/ui/chat")
    page.select_option("#model", "geo")
    page.fill("#question", "What is the capital of France?")
    page.click("#ask")
    page.wait_for_selector("#answer")
    assert page.locator("#answer").inner_text() == "answer from geo-v1"
    shoot(page, "chat-desktop")

    page.goto(f"{live_url}/ui/jobs")
    assert "3/8" in page.locator("#jobs .step").first.inner_text()
    assert (
        "0.7500" in page.locator("#jobs").inner_text()
        and "still pending" in page.locator("#queue").inner_text()
    )
    shoot(page, "jobs-desktop")
    # live: the worker's next heartbeat shows up without a reload by the operator
    set_progress(live_factory, {"phase": "train", "step": 5, "total_steps": 8, "loss": 0.5})
    page.wait_for_function(
        "document.querySelector('#jobs .step').innerText.startsWith('5/8')", timeout=10_000
    )

    page.goto(f"{live_url}/ui/ns/geo")
    page.click("#train-now")
    page.wait_for_url(f"{live_url}/ui/jobs")
    assert page.locator("#jobs tbody tr").count() == 2  # the queued run beside the running one
    assert page.locator("meta[http-equiv=refresh]").count() == 1


@needs_chromium
def test_browser_read_only_and_bound_tokens(browser: Any, live_url: str) -> None:
    page = browser_login(browser, live_url, READER)
    page.goto(f"{live_url}/ui/ns/geo")
    assert page.locator("button.rollback").count() == 0
    # a forged form post (as if the button were there) is refused
    page.evaluate(
        """(csrf) => { const f = document.createElement('form'); f.method = 'post';
        f.action = '/ui/ns/geo/rollback'; for (const [k, v] of [['version', '1'], ['csrf', csrf]]) {
        const i = document.createElement('input'); i.name = k; i.value = v; f.appendChild(i); }
        document.body.appendChild(f); f.submit(); }""",
        page.locator("input[name=csrf]").first.get_attribute("value"),
    )
    page.wait_for_selector("#error")
    assert "admin" in page.locator("#error").inner_text()
    page.goto(f"{live_url}/ui/ns/geo")
    assert page.locator("#current").inner_text() == "v2"

    bound = browser_login(browser, live_url, GEO_ONLY)
    text = bound.locator("#namespaces").inner_text()
    assert "geo" in text and "other" not in text
    assert bound.goto(f"{live_url}/ui/ns/other").status == 404


@needs_chromium
def test_browser_phone_layout(browser: Any, live_url: str) -> None:
    page = browser_login(browser, live_url, ADMIN, "phone")
    shoot(page, "namespaces-phone")
    for path, name in (
        ("/ui/ns/geo", "namespace"),
        ("/ui/ns/geo/v/2", "version"),
        ("/ui/jobs", "jobs"),
        ("/ui/chat", "chat"),
    ):
        page.goto(f"{live_url}{path}")
        # nothing wider than the screen: the page does not scroll sideways
        assert page.evaluate("document.documentElement.scrollWidth") <= VIEWPORTS["phone"]["width"] + 1, path
        shoot(page, f"{name}-phone")


def test_a_long_run_keeps_at_most_max_recorded_losses(db_session_factory: Any) -> None:
    """service.jobs.train thins the per-step losses it keeps with the run; the last one stays."""
    from types import SimpleNamespace

    from service.jobs.train import MAX_RECORDED_LOSSES, TrainJobHandler

    with db_session_factory.begin() as session:
        run_id = TrainingRunRepository(session).start(namespace="geo", kind="train").id
    handler = SimpleNamespace(session_factory=db_session_factory)
    losses = [1.0 / (step + 1) for step in range(MAX_RECORDED_LOSSES * 3 + 7)]
    TrainJobHandler._record_losses(handler, run_id, losses)  # type: ignore[arg-type]
    with db_session_factory.begin() as session:
        TrainingRunRepository(session).finish(id=run_id, status="succeeded", metrics={"steps": 1507.0})
    with db_session_factory() as session:
        kept = TrainingRunRepository(session).get(id=run_id).metrics
    assert len(kept["loss_per_step"]) == MAX_RECORDED_LOSSES and kept["steps"] == 1507.0
    assert kept["loss_per_step"][0] == losses[0] and kept["loss_per_step"][-1] == losses[-1]


def test_a_removed_token_ends_its_session_and_logout_clears_the_cookie(
    tmp_path: Path, fake_vllm: FakeVllm
) -> None:
    import hashlib

    token = "file-token-0123456789"
    token_file = tmp_path / "tokens"
    token_file.write_text(
        f"sha256:{hashlib.sha256(token.encode()).hexdigest()}=adapters:read label:from-file\n"
    )
    settings = make_settings(f"sqlite:///{tmp_path / 'db.sqlite'}", tmp_path, fake_vllm).model_copy(
        update={"auth_tokens_file": token_file}
    )
    app = create_app(settings, start_background=False)
    with TestClient(app, follow_redirects=False) as client:
        login(client, token)
        page = client.get("/ui/")
        assert page.status_code == 200 and "from-file" in page.text
        logged_out = client.post("/ui/logout", data={"csrf": csrf_of(page.text)})
        assert logged_out.status_code == 303 and 'loraloop_session=""' in logged_out.headers["set-cookie"]
        assert client.get("/ui/").status_code == 303

        login(client, token)
        assert client.get("/ui/").status_code == 200
        token_file.write_text(
            "# rotated: no entries left but a comment\n" + "sha256:" + "0" * 64 + "=adapters:read\n"
        )
        time.sleep(RELOAD_CHECK_S + 0.1)  # TokenSource re-reads a changed file after this long
        assert client.get("/ui/").status_code == 303  # the same cookie, the token gone: logged out


def test_a_configured_secret_is_shared_by_processes_and_the_ttl_applies(
    tmp_path: Path, fake_vllm: FakeVllm
) -> None:
    settings = make_settings(f"sqlite:///{tmp_path / 'db.sqlite'}", tmp_path, fake_vllm).model_copy(
        update={"dashboard_session_secret": "shared-between-replicas", "dashboard_session_ttl_s": 600}
    )
    with TestClient(create_app(settings, start_background=False), follow_redirects=False) as first:
        login(first, READER)
        assert "Max-Age=600" in first.post("/ui/login", data={"token": READER}).headers["set-cookie"]
        cookie = first.cookies[COOKIE_NAME]
    with TestClient(create_app(settings, start_background=False), follow_redirects=False) as second:
        second.cookies.set(COOKIE_NAME, cookie)
        assert second.get("/ui/").status_code == 200  # another process with the same secret
    other = settings.model_copy(update={"dashboard_session_secret": ""})
    with TestClient(create_app(other, start_background=False), follow_redirects=False) as third:
        third.cookies.set(COOKIE_NAME, cookie)
        assert third.get("/ui/").status_code == 303  # its own per-process secret


def test_too_many_failed_logins_are_throttled_even_for_the_right_token(
    tmp_path: Path, fake_vllm: FakeVllm
) -> None:
    settings = make_settings(f"sqlite:///{tmp_path / 'db.sqlite'}", tmp_path, fake_vllm).model_copy(
        update={"dashboard_login_max_failures": 3, "dashboard_login_window_s": 300}
    )
    with TestClient(create_app(settings, start_background=False), follow_redirects=False) as client:
        login(client, ADMIN)  # a success before does not let a guesser go on
        client.cookies.clear()
        for _ in range(3):
            assert client.post("/ui/login", data={"token": "guess"}).status_code == 401
        throttled = client.post("/ui/login", data={"token": ADMIN})
        assert throttled.status_code == 429
        assert "too many failed logins" in throttled.text
        assert 0 < int(throttled.headers["Retry-After"]) <= 300
        assert COOKIE_NAME not in throttled.headers.get("set-cookie", "")
        # the bearer API is not the login form: the same token still works there
        assert client.get("/adapters", headers={"Authorization": f"Bearer {ADMIN}"}).status_code == 200


def test_a_finished_job_shows_its_outcome_not_its_last_phase(client: TestClient) -> None:
    factory = client.app.state.session_factory  # type: ignore[attr-defined]
    with factory.begin() as session:
        session.add(
            Job(
                kind="train",
                namespace="geo",
                status="succeeded",
                progress={"phase": "report", "step": 8, "total_steps": 8, "loss": 0.25},
                result={"namespace": "geo", "outcome": "promoted", "version": 7},
            )
        )
        session.add(
            Job(kind="train", namespace="geo", status="running", progress={"phase": "train", "step": 2})
        )
    login(client, ADMIN)
    rows = re.findall(r'<td data-label="phase">([^<]*)</td>', client.get("/ui/jobs").text)
    assert "promoted v7" in rows and "train" in rows
    assert "report" not in rows
