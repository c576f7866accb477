"""Crash safety of real `loraloop worker` processes: SIGKILL one mid-training, or while it writes the
adapter version, and check that no partial version is visible (every version row has its verified
folder, every version folder has its row) and that the job completes once a new worker starts."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from memory_store.queue import JobQueue
from service.app import create_app
from service.config import Settings
from training.adapter_store import AdapterStore

pytestmark = [pytest.mark.slow, pytest.mark.integration]

REPO = Path(__file__).resolve().parents[2]
FEEDBACK = {
    "messages": [
        {"role": "user", "content": "What is the deploy code of project Kestrel?"},
        {"role": "assistant", "content": "I do not know."},
    ],
    "continuation": "The deploy code of project Kestrel is 7-4-1-9.",
}

# A worker whose adapter store dies (SIGKILL, no cleanup) at a chosen point of publishing v1+.
CRASHING_WORKER = """
import os, shutil, signal, sys
from training import adapter_store

point = sys.argv[1]
original_publish = adapter_store.AdapterStore.publish
original_copy = shutil.copyfile

def die():
    os.kill(os.getpid(), signal.SIGKILL)

def publish(self, namespace, version, src_dir, metadata):
    published = original_publish(self, namespace, version, src_dir, metadata)
    if version >= 1 and point == "after_rename":
        die()  # the folder is in place, the registry row not committed
    return published

def copyfile(src, dst, *args, **kwargs):
    result = original_copy(src, dst, *args, **kwargs)
    if point == "mid_copy" and os.path.basename(os.path.dirname(str(dst))).startswith(".tmp-v1-"):
        die()  # half a version in its temp folder
    return result

adapter_store.AdapterStore.publish = publish
shutil.copyfile = copyfile
from service.cli import main
sys.argv = ["loraloop", "worker"]
main()
"""


def worker_env(settings: Settings, **overrides: str) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith("LORALOOP_")}
    env.update(
        {
            "LORALOOP_DATABASE_URL": settings.database_url,
            "LORALOOP_DATA_DIR": str(settings.data_dir),
            "LORALOOP_BASE_MODEL": str(settings.base_model),
            "LORALOOP_AUTH_DISABLED": "true",
            "LORALOOP_JOB_LEASE_S": "3",
            "LORALOOP_JOB_HEARTBEAT_S": "0.25",
            "LORALOOP_WORKER_POLL_S": "0.1",
            "LORALOOP_DEVICE": "cpu",
            "LORALOOP_LEARNING_RATE": "0.03",
            "LORALOOP_MAX_STEPS": "2",
            "LORALOOP_GATE_MIN_NLL_DROP": "0",
            "OMP_NUM_THREADS": env.get("OMP_NUM_THREADS", "2"),
            "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p),
        }
    )
    env.update(overrides)
    return env


@pytest.fixture
def service(tmp_path: Path, tiny_model_dir: Path) -> Iterator[tuple[TestClient, Settings]]:
    settings = Settings(
        database_url=f"sqlite:///{tmp_path / 'loraloop.db'}",
        data_dir=tmp_path / "var",
        base_model=tiny_model_dir,
        auth_disabled=True,
        train_debounce_s=0.0,
    )
    with TestClient(create_app(settings, start_background=False)) as client:
        yield client, settings


@pytest.fixture
def spawn(tmp_path: Path) -> Iterator[Any]:
    processes: list[subprocess.Popen[bytes]] = []

    def start(args: list[str], env: dict[str, str], name: str) -> subprocess.Popen[bytes]:
        log = (tmp_path / f"{name}.log").open("wb")
        process = subprocess.Popen(args, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path)
        processes.append(process)
        return process

    yield start
    for process in processes:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def wait_for(
    predicate: Any, timeout: float, what: str, process: subprocess.Popen[bytes] | None = None
) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        if process is not None and process.poll() is not None:
            raise AssertionError(f"worker exited with {process.returncode} while waiting for {what}")
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def train_job(client: TestClient) -> dict[str, Any]:
    (job,) = [j for j in client.get("/jobs").json()["items"] if j["kind"] == "train"]
    return job


def assert_no_partial_version(client: TestClient, settings: Settings) -> dict[str, Any]:
    """Rows and folders agree: each listed version's folder verifies against its sha256, and no
    version folder exists without a listed version."""
    (adapter,) = client.get("/adapters").json()["adapters"]
    store = AdapterStore(settings.adapters_dir, clean_stale_temp=False)
    listed = {v["version"]: v for v in adapter["versions"]}
    for version, row in listed.items():
        store.verify("default", version, row["sha256"])
    assert set(store.versions("default")) <= set(listed), (store.versions("default"), sorted(listed))
    return adapter


def worker_args() -> list[str]:
    return [sys.executable, "-m", "service.cli", "worker"]


def test_sigkill_mid_training_then_restart(service, spawn) -> None:
    client, settings = service
    assert client.post("/feedback", json=FEEDBACK).status_code == 202
    first = spawn(worker_args(), worker_env(settings, LORALOOP_MAX_STEPS="100000"), "first")
    wait_for(lambda: (train_job(client)["progress"] or {}).get("step", 0) >= 1, 240, "training steps", first)
    first.send_signal(signal.SIGKILL)
    first.wait(30)

    job = train_job(client)
    assert job["status"] == "running" and job["attempts"] == 1  # its lease is still held by the dead worker
    adapter = assert_no_partial_version(client, settings)
    assert adapter["current"] == 0 and [v["version"] for v in adapter["versions"]] == [0]

    second = spawn(worker_args(), worker_env(settings), "second")
    job = wait_for(
        lambda: (j := train_job(client))["status"] in ("succeeded", "failed", "dead") and j,
        300,
        "the re-leased job",
        second,
    )
    assert job["status"] == "succeeded" and job["attempts"] == 2, job
    adapter = assert_no_partial_version(client, settings)
    assert adapter["current"] == 1


def test_sigkill_while_writing_the_version_then_restart(service, spawn) -> None:
    """Worker 1 dies halfway through copying v1 into its temp folder, worker 2 right after renaming
    it into place (before the registry row commits), worker 3 completes the job."""
    client, settings = service
    assert client.post("/feedback", json=FEEDBACK).status_code == 202
    folder = settings.adapters_dir / "default"

    def crash_at(point: str) -> list[str]:
        crashing = spawn(
            [sys.executable, "-c", CRASHING_WORKER, point], worker_env(settings), f"crash-{point}"
        )
        crashing.wait(300)
        assert crashing.returncode == -signal.SIGKILL, f"worker did not die at {point}"
        (adapter,) = client.get("/adapters").json()["adapters"]
        assert adapter["current"] == 0 and [v["version"] for v in adapter["versions"]] == [0]
        assert client.get("/adapters/default/versions/1").status_code == 404
        assert train_job(client)["status"] == "running"
        return sorted(p.name for p in folder.iterdir())

    leftovers = crash_at("mid_copy")
    assert "v1" not in leftovers and [n for n in leftovers if n.startswith(".tmp-v1-")]  # half a version
    leftovers = crash_at("after_rename")
    assert "v1" in leftovers  # on disk, but without its row: invisible through the API
    assert not [n for n in leftovers if n.startswith(".tmp-")]  # the dead publisher's temp folder is gone

    restarted = spawn(worker_args(), worker_env(settings), "restarted")
    job = wait_for(
        lambda: (j := train_job(client))["status"] in ("succeeded", "failed", "dead") and j,
        300,
        "the re-leased job",
        restarted,
    )
    assert job["status"] == "succeeded" and job["result"]["version"] == 1 and job["attempts"] == 3, job
    adapter = assert_no_partial_version(client, settings)
    assert adapter["current"] == 1
    store = AdapterStore(settings.adapters_dir, clean_stale_temp=False)
    assert store.read_metadata("default", 1)["training_run_id"] == job["result"]["training_run_id"]
    assert not [p for p in folder.iterdir() if p.name.startswith(".")]
    with client.app.state.session_factory() as session:
        assert JobQueue(session).depth() == {"queued": 0, "running": 0}
