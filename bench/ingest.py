"""Sustained `POST /feedback` ingestion against a real `loraloop serve` process on loopback.

Two servers per backend, measured in the same run and interleaved (same machine load): `group`,
the shipped write path (one writer thread commits the items of every request in flight in one
transaction: service.ingest.writer), and `per_request`, a plain one-transaction-per-request
handler (LORALOOP_FEEDBACK_GROUP_COMMIT=false, the path before group commit). A separate load process
keeps N requests in flight for a fixed duration and reports items/s, requests/s, request latency
(p50/p99) and the server's CPU time per request (robust to a shared machine; `loadavg_1m` says how
shared it was). No training runs meanwhile (the count trigger is off; bench/load.py measures
ingestion while a job trains). One JSON line per configuration; the last line compares the SQLite
single-item requests/s (the embedded default, 8 in flight) of both handlers:
{"metric", "value", "baseline", "baseline_value", "ratio", ...}.

    python bench/ingest.py [--duration 10] [--rounds 2] [--postgres-url URL | --no-postgres]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlsplit

import httpx

REPO_ROOT = Path(__file__).resolve().parents[1]
TOKEN = "bench-token"
DEFAULT_POSTGRES_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"


def feedback_item(key: str) -> dict[str, object]:
    return {
        "messages": [
            {"role": "system", "content": "You are a concise assistant for a travel agency."},
            {"role": "user", "content": f"Which documents do I need for trip {key}?"},
            {"role": "assistant", "content": "You need nothing."},
        ],
        "continuation": "A valid passport, and a visa if your destination requires one for your nationality.",
        "namespace": "bench",
        "tags": ["bench"],
    }


# --- load generator (runs in its own process) -------------------------------------------------------


class KeepAliveConnection:
    """One HTTP/1.1 keep-alive connection that writes requests by hand and reads each answer by
    its Content-Length (the routes driven here never answer chunked). About a tenth of the CPU
    httpx spends per request: on 2 cores the load generator shares the machine with the server,
    and httpx alone capped the measurement near 150-450 requests/s whatever the server did."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, host: str) -> None:
        self._reader = reader
        self._writer = writer
        self._host = host

    @classmethod
    async def open(cls, url: str) -> KeepAliveConnection:
        parsed = urlsplit(url)
        host, port = parsed.hostname or "127.0.0.1", parsed.port or 80
        reader, writer = await asyncio.open_connection(host, port)
        return cls(reader, writer, f"{host}:{port}")

    async def request(self, method: str, path: str, body: bytes | None, headers: dict[str, str]) -> int:
        """Send one request, read the whole answer; returns the status code."""
        lines = [f"{method} {path} HTTP/1.1", f"Host: {self._host}"]
        lines += [f"{name}: {value}" for name, value in headers.items()]
        if body is not None:
            lines += ["Content-Type: application/json", f"Content-Length: {len(body)}"]
        self._writer.write(("\r\n".join(lines) + "\r\n\r\n").encode() + (body or b""))
        status_line = await self._reader.readline()
        if not status_line:
            raise ConnectionError("the server closed the connection")
        length = 0
        while (line := await self._reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        await self._reader.readexactly(length)
        return int(status_line.split()[1])

    async def close(self) -> None:
        self._writer.close()
        with contextlib.suppress(OSError):
            await self._writer.wait_closed()


async def drive(
    url: str, mode: str, duration_s: float, concurrency: int, batch_size: int
) -> dict[str, object]:
    latencies: list[float] = []
    items = 0
    errors = 0
    run_id = uuid.uuid4().hex[:8]
    deadline = time.perf_counter() + duration_s
    auth = {"Authorization": f"Bearer {TOKEN}"}

    async def worker(worker_id: int) -> None:
        nonlocal items, errors
        connection: KeepAliveConnection | None = None
        sequence = 0
        while time.perf_counter() < deadline:
            key = f"{run_id}-{worker_id}-{sequence}"
            sequence += 1
            if mode == "adapters":  # the read side (GET /adapters) under the same load
                method, path, body, count = "GET", "/adapters", None, 0
            elif mode == "single":
                method, path, body, count = "POST", "/feedback", feedback_item(key), 1
            else:
                method, path = "POST", "/feedback:batch"
                body = {"items": [feedback_item(f"{key}-{i}") for i in range(batch_size)]}
                count = batch_size
            payload = None if body is None else json.dumps(body).encode()
            headers = auth if body is None else {**auth, "Idempotency-Key": key}
            started = time.perf_counter()
            try:
                if connection is None:
                    connection = await KeepAliveConnection.open(url)
                status = await connection.request(method, path, payload, headers)
            except (OSError, ConnectionError, asyncio.IncompleteReadError, ValueError, IndexError):
                errors += 1
                if connection is not None:
                    await connection.close()
                connection = None
                continue
            latencies.append(time.perf_counter() - started)
            if status == (200 if body is None else 202):
                items += count
            else:
                errors += 1
        if connection is not None:
            await connection.close()

    started = time.perf_counter()
    await asyncio.gather(*(worker(i) for i in range(concurrency)))
    elapsed = time.perf_counter() - started
    latencies.sort()

    def percentile(q: float) -> float:
        return (
            latencies[min(len(latencies) - 1, int(q * len(latencies)))] * 1000 if latencies else float("nan")
        )

    return {
        "items": items,
        "requests": len(latencies),
        "errors": errors,
        "seconds": round(elapsed, 2),
        "items_per_s": round(items / elapsed, 1),
        "requests_per_s": round(len(latencies) / elapsed, 1),
        "p50_ms": round(percentile(0.50), 2),
        "p99_ms": round(percentile(0.99), 2),
        "mean_ms": round(statistics.fmean(latencies) * 1000, 2) if latencies else None,
    }


# --- orchestration -----------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def tokenizer_folder() -> str | None:
    """The cached qwen2 tokenizer, so the server runs its real length check (None: not cached)."""
    base = os.environ.get("LORALOOP_CACHE_DIR")
    folder = (Path(base) if base else Path.home() / ".cache" / "loraloop") / "tokenizers" / "qwen2"
    return str(folder) if (folder / "tokenizer.json").exists() else None


class Server:
    def __init__(
        self, db_url: str, data_dir: Path, tokenizer: str | None, extra_env: dict[str, str] | None = None
    ) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = data_dir / f"server-{self.port}.log"
        env = {
            **os.environ,
            "OMP_NUM_THREADS": "1",
            "LORALOOP_DATABASE_URL": db_url,
            "LORALOOP_DATA_DIR": str(data_dir),
            "LORALOOP_AUTH_TOKENS": f"{TOKEN}=feedback:write",
            "LORALOOP_TOKENIZER": tokenizer or str(data_dir / "no-tokenizer"),
            "LORALOOP_LOG_LEVEL": "WARNING",
            "LORALOOP_TRAIN_DEBOUNCE_S": "3600",
            **(extra_env or {}),
        }
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "service.cli", "serve", "--port", str(self.port)],
                cwd=REPO_ROOT,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited:\n{self.log.read_text()[-2000:]}")
            try:
                if httpx.get(f"{self.url}/readyz", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        self.stop()
        raise RuntimeError("server did not become ready")

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()


def run_load(url: str, mode: str, args: argparse.Namespace) -> dict[str, object]:
    concurrency = args.concurrency if mode == "single" else args.batch_concurrency
    completed = subprocess.run(
        [
            sys.executable,
            __file__,
            "--drive",
            url,
            "--mode",
            mode,
            "--duration",
            str(args.duration),
            "--concurrency",
            str(concurrency),
            "--batch-size",
            str(args.batch_size),
        ],
        capture_output=True,
        text=True,
        timeout=args.duration + 120,
        check=False,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    if completed.returncode != 0:
        raise RuntimeError(f"load process failed:\n{completed.stderr[-2000:]}")
    result = json.loads(completed.stdout.strip().splitlines()[-1])
    result["concurrency"] = concurrency
    return result


def postgres_schema(admin_url: str) -> tuple[str, object] | None:
    import sqlalchemy as sa

    from memory_store.db import make_engine

    engine = make_engine(admin_url, connect_timeout_s=3)
    schema = f"bench_{os.getpid()}_{uuid.uuid4().hex[:6]}"
    try:
        with engine.begin() as connection:
            connection.execute(sa.text(f'CREATE SCHEMA "{schema}"'))
    except Exception as error:  # noqa: BLE001 - any failure means "no PostgreSQL here"
        print(
            json.dumps({"backend": "postgres", "skipped": f"{type(error).__name__}: {error}"[:300]}),
            flush=True,
        )
        engine.dispose()
        return None
    url = engine.url.update_query_dict({"options": f"-csearch_path={schema}"}).render_as_string(
        hide_password=False
    )

    def drop() -> None:
        with engine.begin() as connection:
            connection.execute(sa.text(f'DROP SCHEMA "{schema}" CASCADE'))
        engine.dispose()

    return url, drop


HANDLERS = {"per_request": {"LORALOOP_FEEDBACK_GROUP_COMMIT": "false"}, "group": {}}
QUIET = {"LORALOOP_TRAIN_TRIGGER_COUNT": "1000000000"}  # no training during the measurement


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (Linux /proc), 0 where unavailable."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def measure(server: Server, mode: str, args: argparse.Namespace) -> dict[str, object]:
    load_before = os.getloadavg()[0]
    cpu_before = cpu_seconds(server.process.pid)
    result = run_load(server.url, mode, args)
    cpu = cpu_seconds(server.process.pid) - cpu_before
    result["server_cpu_ms_per_request"] = round(cpu * 1000 / max(int(result["requests"]), 1), 2)
    result["loadavg_1m"] = round(max(load_before, os.getloadavg()[0]), 2)
    return result


def mean(values: list[float]) -> float:
    return round(statistics.fmean(values), 1) if values else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--duration", type=float, default=10.0, help="seconds of load per configuration")
    parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds of SQLite single items")
    parser.add_argument("--concurrency", type=int, default=8, help="requests in flight (single items)")
    parser.add_argument("--batch-concurrency", type=int, default=2, help="requests in flight (batches)")
    parser.add_argument("--batch-size", type=int, default=50, help="items per batch request")
    parser.add_argument(
        "--postgres-url", default=os.environ.get("LORALOOP_TEST_POSTGRES_URL", DEFAULT_POSTGRES_URL)
    )
    parser.add_argument("--no-postgres", action="store_true")
    parser.add_argument("--drive", help=argparse.SUPPRESS)
    parser.add_argument("--mode", choices=("single", "batch"), help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.drive:
        result = asyncio.run(drive(args.drive, args.mode, args.duration, args.concurrency, args.batch_size))
        print(json.dumps(result))
        return

    sys.path.insert(0, str(REPO_ROOT))
    tokenizer = tokenizer_folder()
    results: dict[tuple[str, str, str], list[dict[str, object]]] = {}
    with tempfile.TemporaryDirectory(prefix="loraloop-bench-") as scratch:
        backends = ["sqlite"] + (["postgres"] if not args.no_postgres and args.postgres_url else [])
        for backend in backends:
            servers: dict[str, Server] = {}
            cleanups: list[Callable[[], None]] = []
            try:
                for handler, env in HANDLERS.items():
                    data_dir = Path(scratch) / f"{backend}-{handler}"
                    data_dir.mkdir()
                    if backend == "sqlite":
                        url = f"sqlite:///{data_dir}/bench.db"
                    else:
                        created = postgres_schema(args.postgres_url)
                        if created is None:
                            break
                        url, drop = created
                        cleanups.append(drop)
                    servers[handler] = Server(url, data_dir, tokenizer, {**QUIET, **env})
                if len(servers) < len(HANDLERS):
                    continue
                rounds = args.rounds if backend == "sqlite" else 1
                plan = [("single", r) for r in range(rounds)] + [("batch", 0)]
                for mode, round_index in plan:
                    for handler, server in servers.items():  # interleaved: same load on both
                        line = {
                            "backend": backend,
                            "mode": mode,
                            "handler": handler,
                            "round": round_index,
                            "tokenizer_check": tokenizer is not None,
                            **measure(server, mode, args),
                        }
                        if mode == "batch":
                            line["batch_size"] = args.batch_size
                        results.setdefault((backend, mode, handler), []).append(line)
                        print(json.dumps(line), flush=True)
            finally:
                for server in servers.values():
                    server.stop()
                for drop in cleanups:
                    drop()

    def figure(backend: str, mode: str, handler: str, key: str) -> float | None:
        runs = results.get((backend, mode, handler))
        return mean([float(run[key]) for run in runs]) if runs else None

    value = figure("sqlite", "single", "group", "requests_per_s")
    baseline = figure("sqlite", "single", "per_request", "requests_per_s")
    print(
        json.dumps(
            {
                "metric": "sqlite_single_ingest_requests_per_s",
                "value": value,
                "baseline": "sqlite_single_ingest_requests_per_s_per_request_transaction",
                "baseline_value": baseline,
                "ratio": round(value / baseline, 2) if value and baseline else None,
                "concurrency": args.concurrency,
                "p99_ms": figure("sqlite", "single", "group", "p99_ms"),
                "baseline_p99_ms": figure("sqlite", "single", "per_request", "p99_ms"),
                "sqlite_batch_items_per_s": figure("sqlite", "batch", "group", "items_per_s"),
                "postgres_single_requests_per_s": figure("postgres", "single", "group", "requests_per_s"),
                "postgres_single_requests_per_s_per_request_transaction": figure(
                    "postgres", "single", "per_request", "requests_per_s"
                ),
                "loadavg_1m": max(
                    (float(run["loadavg_1m"]) for runs in results.values() for run in runs), default=None
                ),
            }
        )
    )


if __name__ == "__main__":
    main()
