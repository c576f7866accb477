"""Months of history: does the cost of a request or a job stay flat as the store grows?

Two SQLite stores behind the real app (in-process ASGI client, real tokenizer): an "empty" one (one
namespace, 2 versions, 64 conversations, 128 trained and 16 pending items: just what makes a job do
its full work) and one generated in bulk (executemany, not ORM objects) with
C conversations, F feedback items (all but 16 trained, a tenth pointing at a conversation) and V
adapter versions of the same namespace. Measured on both, interleaved so machine load hits both:
`POST /feedback` p99, a train job's prepare phase (what TrainJobHandler reads before rendering:
current version, pending items, replay sample, the 32 most recent conversations) and
`GET /adapters`. For reference it also times the pre-issue-17 probe query (every conversation of
the namespace loaded, sliced in Python) on the big store.

Last line: {"metric", "value", "baseline", "baseline_value", "ratio"} for the case with the worst
ratio (empty-store cost / big-store cost, > 0.5 = within 2x), plus every case under "cases".

    python bench/history.py               # 200,000 / 20,000 / 1,000 (about 2 minutes on 2 cores)
    python bench/history.py --full        # 1,000,000 conversations / 100,000 feedback / 1,000 versions
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

NS = "bench"
TOKEN = "bench-token"
PENDING = 16
CHUNK = 20_000
SQLITE_TIME = "%Y-%m-%d %H:%M:%S.%f"  # SQLAlchemy's SQLite DateTime storage format (naive UTC)


def feedback_body(key: str) -> dict[str, Any]:
    return {
        "namespace": NS,
        "messages": [
            {"role": "system", "content": "You are a concise assistant for a travel agency."},
            {"role": "user", "content": f"Which documents do I need for trip {key}?"},
            {"role": "assistant", "content": "You need nothing."},
        ],
        "continuation": "A valid passport, and a visa if your destination requires one.",
    }


def _chunks(rows: Iterator[tuple[Any, ...]], size: int = CHUNK) -> Iterator[list[tuple[Any, ...]]]:
    chunk: list[tuple[Any, ...]] = []
    for row in rows:
        chunk.append(row)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def generate(url: str, *, conversations: int, feedback: int, versions: int) -> float:
    """Fill a migrated store in bulk; returns the seconds it took."""
    import sqlalchemy as sa

    from memory_store.db import make_engine

    started = time.perf_counter()
    now = datetime.now(UTC).replace(tzinfo=None)
    span_s = 30 * 86400  # a month of history, oldest first
    engine = make_engine(url)
    try:
        with engine.begin() as connection:

            def stamp(i: int, n: int) -> str:
                return (now - timedelta(seconds=span_s * (n - i) / max(n, 1))).strftime(SQLITE_TIME)

            def conversation_rows() -> Iterator[tuple[Any, ...]]:
                for i in range(conversations):
                    messages = json.dumps(
                        [
                            {"role": "user", "content": f"Question {i} about trip planning?"},
                            {"role": "assistant", "content": f"Answer {i}: check the visa rules first."},
                        ]
                    )
                    yield (i + 1, NS, messages, "bench-v1", "proxy", stamp(i, conversations))

            for chunk in _chunks(conversation_rows()):
                connection.exec_driver_sql(
                    "INSERT INTO conversations (id, namespace, messages, model, source, created_at) "
                    "VALUES (?, ?, ?, ?, ?, ?)",
                    chunk,
                )
            body = feedback_body("x")
            messages = json.dumps(body["messages"])

            def feedback_rows() -> Iterator[tuple[Any, ...]]:
                trained = feedback - PENDING
                for i in range(feedback):
                    pending = i >= trained
                    conversation = (i * 10) % conversations + 1 if conversations and i % 10 == 0 else None
                    yield (
                        i + 1,
                        NS,
                        messages,
                        2,
                        body["continuation"],
                        conversation,
                        f"gen-{i}",
                        uuid.uuid4().hex,
                        "pending" if pending else "trained",
                        None if pending else 1 + i * max(versions - 1, 1) // feedback,
                        stamp(i, feedback),
                    )

            for chunk in _chunks(feedback_rows()):
                connection.exec_driver_sql(
                    "INSERT INTO feedback_items (id, namespace, messages, target_index, continuation, "
                    "conversation_id, idempotency_key, request_hash, status, trained_in_version, created_at) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    chunk,
                )
            metrics = json.dumps(
                {"nll_before": 2.1, "nll_after": 1.2, "drift_kl": 0.03, "train_tokens": 812.0}
            )
            connection.exec_driver_sql(
                "INSERT INTO adapters (name, current_version, base_model, created_at) VALUES (?, ?, ?, ?)",
                (NS, versions - 1, "bench-model", stamp(0, 1)),
            )
            connection.exec_driver_sql(
                "INSERT INTO adapter_versions (adapter_name, version, status, parent_version, path, sha256, "
                "metrics, created_at, pinned) VALUES (?, ?, ?, ?, ?, ?, ?, ?, 0)",
                [
                    (
                        NS,
                        v,
                        "current" if v == versions - 1 else "retired",
                        v - 1 if v else None,
                        f"/bench/adapters/{NS}/v{v}",
                        "ab" * 32,
                        metrics,
                        stamp(v, versions),
                    )
                    for v in range(versions)
                ],
            )
        with engine.connect() as connection:
            connection.execute(sa.text("ANALYZE"))
    finally:
        engine.dispose()
    return time.perf_counter() - started


class Store:
    """One store with the app, a client and the train job's read path over it."""

    def __init__(self, root: Path, label: str, sizes: dict[str, int]) -> None:
        from fastapi.testclient import TestClient

        from memory_store.db import make_engine, make_session_factory, upgrade_database
        from service.adapters.registry import AdapterRegistry
        from service.app import create_app
        from service.config import Settings
        from training.tokenizer_files import tokenizer_dir

        self.label = label
        url = f"sqlite:///{root / label / 'loraloop.db'}"
        (root / label).mkdir(parents=True)
        upgrade_database(url)
        self.generate_s = generate(url, **sizes)
        self.settings = Settings(
            _env_file=None,
            database_url=url,
            data_dir=root / label / "var",
            auth_tokens=f"{TOKEN}=admin",
            tokenizer=tokenizer_dir("qwen2"),
            train_debounce_s=3600,
            train_trigger_count=10**6,
        )
        self.engine = make_engine(url)
        self.factory = make_session_factory(self.engine)
        self.registry = AdapterRegistry.from_settings(self.settings, self.factory, None)
        self.client = TestClient(create_app(self.settings, start_background=False))
        self.client.__enter__()
        self.headers = {"Authorization": f"Bearer {TOKEN}"}
        self.posts: list[float] = []
        self.prepares: list[float] = []
        self.listings: list[float] = []

    def post(self, key: str) -> None:
        started = time.perf_counter()
        response = self.client.post(
            "/feedback", json=feedback_body(key), headers={**self.headers, "Idempotency-Key": key}
        )
        self.posts.append(time.perf_counter() - started)
        assert response.status_code == 202, response.text

    def prepare(self) -> None:
        from memory_store.repositories import FeedbackRepository
        from service.jobs.train import MAX_PROBE_CONVERSATIONS, recent_conversations

        started = time.perf_counter()
        parent = self.registry.ensure_base_version(NS)
        with self.factory() as session:
            repository = FeedbackRepository(session)
            new = repository.pending_since(namespace=NS)
            replay_n = min(self.settings.replay_max_items, math.ceil(self.settings.replay_ratio * len(new)))
            replay = repository.replay_sample(
                namespace=NS, before_id=new[0].id, n=replay_n, seed=parent.version
            )
            conversations = recent_conversations(session, NS, MAX_PROBE_CONVERSATIONS)
        self.prepares.append(time.perf_counter() - started)
        assert new and parent.version >= 0 and (len(replay) == replay_n or self.label == "empty")
        assert len(conversations) == min(MAX_PROBE_CONVERSATIONS, self.conversation_count())

    def conversation_count(self) -> int:
        if not hasattr(self, "_conversations"):
            import sqlalchemy as sa

            with self.engine.connect() as connection:
                self._conversations = int(
                    connection.execute(sa.text("SELECT count(*) FROM conversations")).scalar()
                )
        return self._conversations

    def list_adapters(self) -> None:
        started = time.perf_counter()
        response = self.client.get("/adapters", headers=self.headers)
        self.listings.append(time.perf_counter() - started)
        assert response.status_code == 200 and response.json()["adapters"][0]["name"] == NS

    def close(self) -> None:
        self.client.__exit__(None, None, None)
        self.engine.dispose()


def legacy_probe_query_s(store: Store) -> float:
    """The probe query before issue 17: every conversation of the namespace, sliced in Python."""
    from memory_store.repositories import ConversationRepository

    started = time.perf_counter()
    with store.factory() as session:
        rows = ConversationRepository(session).list(namespace=NS, limit=None)
        _ = [list(row.messages) for row in rows[-32:]]
    return time.perf_counter() - started


def p99(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, math.ceil(0.99 * len(ordered)) - 1)]


def interleaved(
    stores: list[Store], action: Callable[[Store, int], None], rounds: int, per_round: int
) -> None:
    sequence = 0
    for _ in range(rounds):
        for store in stores:
            for _ in range(per_round):
                action(store, sequence)
                sequence += 1


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--full", action="store_true", help="1,000,000 / 100,000 / 1,000 (the issue's scale)")
    parser.add_argument("--conversations", type=int, default=200_000)
    parser.add_argument("--feedback", type=int, default=20_000)
    parser.add_argument("--versions", type=int, default=1_000)
    parser.add_argument("--posts", type=int, default=400, help="POST /feedback per store")
    parser.add_argument("--reps", type=int, default=30, help="prepare phases and GET /adapters per store")
    parser.add_argument("--check", action="store_true", help="exit 1 unless every case is within 2x")
    args = parser.parse_args()
    if args.full:
        args.conversations, args.feedback, args.versions = 1_000_000, 100_000, 1_000
    big_sizes = {"conversations": args.conversations, "feedback": args.feedback, "versions": args.versions}
    # "empty": just enough history that a job does the same work (a full replay sample, 32 probe
    # conversations); what is left to compare is how that work grows with the history
    empty_sizes = {"conversations": 64, "feedback": PENDING + 128, "versions": 2}

    with tempfile.TemporaryDirectory(prefix="loraloop-history-") as tmp:
        root = Path(tmp)
        empty = Store(root, "empty", empty_sizes)
        big = Store(root, "big", big_sizes)
        print(json.dumps({"generated": big_sizes, "generate_seconds": round(big.generate_s, 1)}), flush=True)
        stores = [empty, big]
        for store in stores:  # warm-up: tokenizer, statement caches, page cache
            store.post(f"warm-{store.label}")
            store.prepare()
            store.list_adapters()
        for store in stores:
            store.posts.clear()
            store.prepares.clear()
            store.listings.clear()
        interleaved(
            stores, lambda s, i: s.post(f"{s.label}-{i}"), rounds=max(args.posts // 50, 1), per_round=50
        )
        interleaved(stores, lambda s, _i: s.prepare(), rounds=args.reps, per_round=1)
        interleaved(stores, lambda s, _i: s.list_adapters(), rounds=args.reps, per_round=1)
        # the old query loads every conversation as an ORM object: once, and only where it fits in memory
        legacy_s = legacy_probe_query_s(big) if args.conversations <= 200_000 else None
        for store in stores:
            store.close()

    cases = {
        "feedback_post_p99_ms": (p99(empty.posts) * 1e3, p99(big.posts) * 1e3),
        "train_prepare_median_ms": (
            statistics.median(empty.prepares) * 1e3,
            statistics.median(big.prepares) * 1e3,
        ),
        "get_adapters_median_ms": (
            statistics.median(empty.listings) * 1e3,
            statistics.median(big.listings) * 1e3,
        ),
    }
    report: dict[str, Any] = {}
    for name, (empty_ms, big_ms) in cases.items():
        report[name] = {
            "empty": round(empty_ms, 2),
            "big": round(big_ms, 2),
            "ratio": round(empty_ms / big_ms, 3),
        }
        print(json.dumps({"case": name, **report[name]}), flush=True)
    print(
        json.dumps(
            {
                "legacy_probe_query_ms_big": None if legacy_s is None else round(legacy_s * 1e3, 1),
                "whole_prepare_now_ms_big": report["train_prepare_median_ms"]["big"],
            }
        ),
        flush=True,
    )
    within = all(r["ratio"] >= 0.5 for r in report.values())
    print(json.dumps({"sizes": big_sizes, "within_2x": within, "cases": report}), flush=True)
    worst = min(report, key=lambda name: report[name]["ratio"])
    print(
        json.dumps(
            {
                "metric": f"{worst}_big_store",
                "value": report[worst]["big"],
                "baseline": f"{worst}_empty_store",
                "baseline_value": report[worst]["empty"],
                "ratio": report[worst]["ratio"],
            }
        )
    )
    if args.check and not within:
        sys.exit(1)


if __name__ == "__main__":
    main()
