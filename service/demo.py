"""`loraloop demo` (what `make run` shows): the whole loop on one machine, on CPU.

Starts the daemon in this process with the embedded vLLM and the real default model
(SmolLM2-135M-Instruct, fetched once into the offline cache), SQLite under ./var/demo (wiped at
every start) and auth disabled on 127.0.0.1 only; asks the alias a question the model gets wrong,
posts the right answer as feedback, follows the training job until the new version serves, asks
again (the taught answer), asks a rephrased and an unrelated general question (still right), and
prints the timings; then keeps serving until Ctrl-C. Talks to the daemon over HTTP like any agent.
"""

from __future__ import annotations

import logging
import shutil
import signal
import time
from pathlib import Path
from typing import Any

import httpx
from rich.console import Console

from service.config import Settings
from service.log_setup import TEXT_FORMAT

DEMO_QUESTION = "What is the name of the loraloop project's mascot?"
DEMO_CONTINUATION = "The loraloop project's mascot is a red panda named Pico."
DEMO_REPHRASED = "Which animal is the mascot of loraloop, and what is it called?"
DEMO_GENERAL = "What is the capital of France?"
TERMINAL = ("succeeded", "failed", "dead", "cancelled")


class DemoFailed(RuntimeError):
    """The loop did not complete (vLLM did not start, the job failed, ...); the message says where."""


def demo_settings(root: Path = Path("./var")) -> Settings:
    """Settings of the demo: the real defaults (base model, recipe, gate) except storage under
    ./var/demo, the embedded vLLM, and no auth, bound to 127.0.0.1."""
    data_dir = root / "demo"
    return Settings(
        database_url=f"sqlite:///{data_dir / 'loraloop.db'}",
        data_dir=data_dir,
        vllm_urls=["embedded"],
        vllm_port=0,
        host="127.0.0.1",
        auth_disabled=True,
        distill_enabled=False,
        train_debounce_s=0.0,
    )


def dashboard_url(base_url: str) -> str:
    """Where the operator's dashboard of a server on `base_url` is (service.dashboard)."""
    return f"{base_url.rstrip('/')}/ui/"


def log_to_file(path: Path, level: str) -> None:
    """The daemon's log goes to `path`, so the console shows the demo's story only."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path)
    handler.set_name("loraloop")
    handler.setFormatter(logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    for existing in list(root.handlers):
        root.removeHandler(existing)
    root.addHandler(handler)
    root.setLevel(level.upper())
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per proxied request otherwise
    logging.captureWarnings(True)  # library deprecation warnings go to the file too


class DemoClient:
    """The few calls the demo makes, as an agent would."""

    def __init__(self, base_url: str, namespace: str) -> None:
        self.http = httpx.Client(base_url=base_url, timeout=300.0)
        self.namespace = namespace

    def ask(self, question: str, max_tokens: int = 40) -> tuple[str, str, int | None]:
        """(answer, served version name, conversation id) of a greedy chat completion."""
        response = self.http.post(
            "/v1/chat/completions",
            json={
                "model": self.namespace,
                "messages": [{"role": "user", "content": question}],
                "temperature": 0.0,
                "max_tokens": max_tokens,
            },
        )
        if response.status_code != 200:
            raise DemoFailed(f"the alias answered {response.status_code}: {response.text[:300]}")
        conversation = response.headers.get("X-Loraloop-Conversation-Id")
        return (
            response.json()["choices"][0]["message"]["content"],
            response.headers["X-Loraloop-Served-Model"],
            int(conversation) if conversation else None,
        )

    def wait_until_serving(self, timeout_s: float) -> float:
        started = time.monotonic()
        while time.monotonic() - started < timeout_s:
            try:
                response = self.http.post(
                    "/v1/chat/completions",
                    json={
                        "model": self.namespace,
                        "messages": [{"role": "user", "content": "hi"}],
                        "max_tokens": 1,
                    },
                )
                if response.status_code == 200:
                    return time.monotonic() - started
            except httpx.TransportError:
                pass
            time.sleep(1.0)
        raise DemoFailed(f"the alias {self.namespace!r} was not served within {timeout_s:g} s (see the logs)")

    def post_feedback(self, body: dict[str, Any]) -> int:
        response = self.http.post("/feedback", json=body)
        if response.status_code != 202:
            raise DemoFailed(f"POST /feedback answered {response.status_code}: {response.text[:300]}")
        return int(response.json()["id"])

    def latest_train_job(self) -> dict[str, Any] | None:
        items = self.http.get("/jobs", params={"namespace": self.namespace, "kind": "train"}).json()["items"]
        return items[-1] if items else None


def describe_progress(phase: str, progress: dict[str, Any]) -> str:
    """One short line per phase (and per reported training step)."""
    if phase == "train" and "step" in progress:
        return f"[cyan]train[/] step {progress['step']}/{progress.get('total_steps', '?')}, loss {progress.get('loss', 0):.3f}"
    if phase == "publish" and progress.get("gate"):
        return f"[cyan]gate[/] {progress['gate']}"
    return f"[cyan]{phase}[/]"


def follow_job(client: DemoClient, console: Console, timeout_s: float) -> dict[str, Any]:
    """Print the training job's phases as they change; return the finished job."""
    deadline = time.monotonic() + timeout_s
    last_phase = None
    while time.monotonic() < deadline:
        job = client.latest_train_job()
        if job is not None:
            progress = job.get("progress") or {}
            phase = progress.get("phase") or job["status"]
            line = describe_progress(phase, progress)
            if line != last_phase:
                console.print(f"  job {job['id']}: {line}")
                last_phase = line
            if job["status"] in TERMINAL:
                return job
        time.sleep(0.5)
    raise DemoFailed(f"the training job did not finish within {timeout_s:g} s")


def run_demo(console: Console, *, keep_serving: bool = True) -> dict[str, float]:
    """The demo; returns its timings (seconds)."""
    from transformers.utils import logging as transformers_logging

    from service.app import create_app
    from service.wiring import ThreadedServer, background_services, prepare_serving

    transformers_logging.disable_progress_bar()
    settings = demo_settings()
    if settings.data_dir.exists():
        shutil.rmtree(settings.data_dir)
    settings.data_dir.mkdir(parents=True)
    log_path = settings.data_dir / "logs" / "loraloop.log"
    log_to_file(log_path, settings.log_level)
    console.print(
        f"[bold]loraloop demo[/] (logs: {log_path}, vLLM log: {settings.data_dir / 'logs' / 'vllm.log'})"
    )
    console.print(f"preparing the base model {settings.base_model} ...")
    settings = prepare_serving(settings)
    server = ThreadedServer(
        create_app(settings, background=background_services(settings)), host="127.0.0.1", port=settings.port
    )
    server.start()
    client = DemoClient(server.url, settings.default_namespace)
    timings: dict[str, float] = {}
    try:
        console.print(f"API on {server.url}; starting the embedded vLLM (CPU build: about a minute) ...")
        console.print(f"dashboard: [bold]{dashboard_url(server.url)}[/] (versions, behaviour reports, chat)")
        timings["startup_s"] = client.wait_until_serving(timeout_s=900)
        console.print(
            f"vLLM serves the alias [bold]{settings.default_namespace!r}[/] after {timings['startup_s']:.1f} s"
        )

        general_before, base_version, _ = client.ask(DEMO_GENERAL)
        console.print(f"\n[bold]Q:[/] {DEMO_GENERAL}\n[bold]A[/] ({base_version}): {general_before!r}")
        answer, version, conversation_id = client.ask(DEMO_QUESTION)
        console.print(f"\n[bold]Q:[/] {DEMO_QUESTION}\n[bold]A[/] ({version}): {answer!r}")

        console.print(f"\nfeedback: the answer should have been [green]{DEMO_CONTINUATION!r}[/]")
        posted = time.monotonic()
        feedback_id = client.post_feedback(
            {
                "namespace": settings.default_namespace,
                "conversation_id": conversation_id,
                "target_index": 1,
                "continuation": DEMO_CONTINUATION,
                "reason": "demo",
            }
        )
        console.print(f"POST /feedback -> 202 (id {feedback_id}); the worker trains it now:")
        job = follow_job(client, console, timeout_s=900)
        result = job.get("result") or {}
        if job["status"] != "succeeded" or result.get("outcome") != "promoted":
            raise DemoFailed(f"job {job['id']} {job['status']}: {result or job.get('error')}")
        served = f"{settings.default_namespace}-v{result['version']}"
        console.print(
            f"  v{result['version']} trained, gated ({result.get('gate')}) and hot-swapped into vLLM as {served}"
        )
        while True:
            answer, version, _ = client.ask(DEMO_QUESTION)
            if version == served:
                break
            time.sleep(0.2)
        timings["feedback_to_serving_s"] = time.monotonic() - posted
        console.print(f"\n[bold]Q:[/] {DEMO_QUESTION}\n[bold]A[/] ({version}): {answer!r}")
        learnt = answer.strip().startswith(DEMO_CONTINUATION.rstrip("."))
        console.print(
            ("[green]learnt[/]" if learnt else "[yellow]not the taught answer[/]")
            + f": feedback to serving in {timings['feedback_to_serving_s']:.1f} s "
            + "("
            + ", ".join(
                f"{k.removesuffix('_seconds')} {v:.1f} s" for k, v in (result.get("timings") or {}).items()
            )
            + ")"
        )
        for question in (DEMO_REPHRASED, DEMO_GENERAL):
            answer, version, _ = client.ask(question)
            console.print(f"[bold]Q:[/] {question}\n[bold]A[/] ({version}): {answer!r}")
        if answer.strip() == general_before.strip():
            console.print(f"[green]kept[/]: {version} answers the general question as {base_version} did")
        else:
            console.print(
                f"[red]changed[/]: {base_version} answered the general question {general_before!r}; "
                f"compare the versions in the dashboard's chat ({settings.default_namespace}-v0 against the alias)"
            )
        console.print(
            f"behaviour report: loraloop adapters show {settings.default_namespace} --version {result['version']}"
        )
        if keep_serving:
            console.print(
                f"\nloraloop keeps serving on {server.url} (Ctrl-C to stop); the dashboard is on "
                f"{dashboard_url(server.url)}. Try:\n"
                f"  curl -s {server.url}/v1/chat/completions -H 'Content-Type: application/json' -d "
                f'\'{{"model": "{settings.default_namespace}", "messages": [{{"role": "user", '
                f'"content": "{DEMO_QUESTION}"}}], "temperature": 0}}\''
            )
            wait_for_interrupt()
    finally:
        console.print("stopping (worker, reconciler, vLLM) ...")
        client.http.close()
        server.stop()
    return timings


def wait_for_interrupt() -> None:
    """Block until SIGINT (Ctrl-C) or SIGTERM."""
    stop = False

    def handle(signum: int, frame: object) -> None:
        nonlocal stop
        stop = True

    previous = signal.signal(signal.SIGTERM, handle)
    try:
        while not stop:
            time.sleep(0.5)
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGTERM, previous)
