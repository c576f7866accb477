"""The `loraloop` command line against a real SQLite store (typer's CliRunner, same process)."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from memory_store.db import make_engine, make_session_factory
from memory_store.queue import JobQueue
from memory_store.repositories import AdapterRepository, FeedbackRepository
from service.cli import app
from training.adapter_store import AdapterStore, PublishedAdapter

pytestmark = pytest.mark.integration


@pytest.fixture
def store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    url = f"sqlite:///{tmp_path / 'cli.db'}"
    monkeypatch.setenv("LORALOOP_DATABASE_URL", url)
    monkeypatch.setenv("LORALOOP_DATA_DIR", str(tmp_path / "var"))
    monkeypatch.delenv("LORALOOP_AUTH_TOKENS", raising=False)  # store commands need no API token
    monkeypatch.setenv("LORALOOP_LOG_LEVEL", "WARNING")
    result = CliRunner().invoke(app, ["db", "upgrade"])
    assert result.exit_code == 0, result.output
    assert "revision" in result.output
    return url


def invoke(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(app, list(args))
    return result.exit_code, result.output


def test_help_lists_every_command() -> None:
    code, output = invoke("--help")
    assert code == 0
    for command in ("serve", "db", "feedback", "adapters", "inspect", "train"):
        assert command in output


def publish_files(tmp_path: Path, name: str, version: int) -> PublishedAdapter:
    """Real version files (placeholder weights) where the settings put adapters."""
    source = tmp_path / "src" / f"{name}-{version}"
    source.mkdir(parents=True)
    (source / "adapter_config.json").write_text('{"r": 8}')
    (source / "adapter_model.safetensors").write_bytes(bytes([version]) * 64)
    return AdapterStore(tmp_path / "var" / "adapters").publish(name, version, source, {})


def test_feedback_and_adapter_commands(store: str, tmp_path: Path) -> None:
    factory = make_session_factory(make_engine(store))
    with factory.begin() as session:
        item, _ = FeedbackRepository(session).add(
            namespace="geo",
            messages=[{"role": "user", "content": "Capital of France?"}],
            continuation="Paris.",
            tags=["geo"],
        )
        feedback_id = item.id
        adapters = AdapterRepository(session)
        adapters.ensure_adapter(name="geo")
        for version in (0, 1):
            published = publish_files(tmp_path, "geo", version)
            adapters.add_version(
                name="geo", version=version, path=str(published.path), sha256=published.sha256
            )
            adapters.set_current(name="geo", version=version)

    code, output = invoke("feedback", "list", "--json")
    assert code == 0 and [row["id"] for row in json.loads(output)] == [feedback_id]
    code, output = invoke("feedback", "show", str(feedback_id), "--json")
    assert code == 0 and json.loads(output)["continuation"] == "Paris."
    code, output = invoke("feedback", "show", str(feedback_id))
    assert code == 0 and "Paris." in output
    code, output = invoke("adapters", "list", "--json")
    assert code == 0 and json.loads(output)[0]["current"] == 1
    code, output = invoke("adapters", "rollback", "geo")
    assert code == 0 and "v0" in output
    code, output = invoke("adapters", "show", "geo", "--json")
    assert code == 0 and json.loads(output)["current"] == 0


def _finish_next_job(url: str, outcome: str) -> None:
    factory = make_session_factory(make_engine(url))
    for _ in range(200):
        with factory.begin() as session:
            queue = JobQueue(session)
            job = queue.claim(worker_id="test-worker", kinds=["train"])
            if job is not None:
                if outcome == "succeeded":
                    queue.complete(job_id=job.id, worker_id="test-worker", result={"version": 3})
                else:
                    queue.fail(job_id=job.id, worker_id="test-worker", error="diverged", retryable=False)
                return
        time.sleep(0.05)


@pytest.mark.parametrize(("outcome", "exit_code"), [("succeeded", 0), ("failed", 1)])
def test_train_wait_exits_zero_only_on_success(store: str, outcome: str, exit_code: int) -> None:
    worker = threading.Thread(target=_finish_next_job, args=(store, outcome))
    worker.start()
    code, output = invoke("train", "--namespace", "geo", "--wait", "--poll", "0.05", "--timeout", "30")
    worker.join()
    assert code == exit_code, output
    assert outcome in output
    if outcome == "succeeded":
        assert "version v3" in output


def test_train_refuses_unsafe_namespace(store: str) -> None:
    code, output = invoke("train", "--namespace", "../etc")
    assert code == 2 and "namespace" in output


def test_inspect_prints_exactly_ids_and_labels(store: str, tmp_path: Path) -> None:
    from training.render import IGNORE_INDEX, RenderConfig, render_example
    from training.tokenizer_files import load_tokenizer, tokenizer_dir

    folder = tokenizer_dir("qwen2")
    item = {
        "messages": [
            {"role": "user", "content": "Capital of France?"},
            {"role": "assistant", "content": "Lyon."},
        ],
        "continuation": "Paris.",
    }
    item_file = tmp_path / "item.json"
    item_file.write_text(json.dumps(item))
    result = CliRunner().invoke(
        app, ["inspect", "--file", str(item_file), "--tokenizer", str(folder), "--json"]
    )
    assert result.exit_code == 0, result.output
    printed = json.loads(result.stdout)
    assert set(printed) == {"input_ids", "labels"}
    expected = render_example(load_tokenizer(folder), {**item, "target_index": 1}, RenderConfig())
    assert expected is not None
    assert printed == {"input_ids": expected.input_ids, "labels": expected.labels}
    assert IGNORE_INDEX in printed["labels"] and any(label != IGNORE_INDEX for label in printed["labels"])

    # a stored item by id, as a table
    factory = make_session_factory(make_engine(store))
    with factory.begin() as session:
        stored, _ = FeedbackRepository(session).add(
            namespace="geo", continuation="Paris.", messages=item["messages"], target_index=1
        )
    table = CliRunner().invoke(app, ["inspect", str(stored.id), "--tokenizer", str(folder)])
    assert table.exit_code == 0, table.output
    assert "Paris" in table.stdout
