"""Feedback-to-serving latency of the whole loop on CPU (embedded vLLM CPU build + tiny model).

Runs the daemon in this process (API, reconciler, worker, embedded vLLM) with the real Settings
defaults, asks the alias once, POSTs one feedback item and polls the alias (greedy chat) until the
first answer from the new version: that interval is the metric. The job row gives the breakdown
(queue wait, render, train, gate, publish, swap+flip) and the answers before/after show what changed.
Baseline, measured in the same run: a cold restart of vLLM (the route without hot-swap) until the
alias answers from the same new version again. Last stdout line: one JSON object with metric,
value, baseline, baseline_value, ratio (baseline / value: > 1 = the hot-swap loop is faster).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from service.app import create_app
from service.config import Settings
from service.demo import DEMO_CONTINUATION, DEMO_QUESTION, log_to_file
from service.wiring import ThreadedServer, background_services, prepare_serving

POLL_S = 0.1


def ask(http: httpx.Client, namespace: str) -> tuple[int, str | None, str | None]:
    try:
        response = http.post(
            "/v1/chat/completions",
            json={
                "model": namespace,
                "messages": [{"role": "user", "content": DEMO_QUESTION}],
                "temperature": 0.0,
                "max_tokens": 24,
            },
        )
    except httpx.TransportError:
        return 0, None, None
    if response.status_code != 200:
        return response.status_code, None, None
    return (
        200,
        response.headers["X-Loraloop-Served-Model"],
        response.json()["choices"][0]["message"]["content"],
    )


def wait_for_version(
    http: httpx.Client, namespace: str, served: str | None, timeout_s: float
) -> tuple[float, str, str]:
    """Poll until the alias answers (from `served` when given): (seconds, served name, text)."""
    started = time.monotonic()
    while time.monotonic() - started < timeout_s:
        status, name, text = ask(http, namespace)
        if status == 200 and name is not None and (served is None or name == served):
            return time.monotonic() - started, name, text or ""
        time.sleep(POLL_S)
    raise TimeoutError(f"{namespace} not answered from {served or 'any version'} within {timeout_s:g} s")


def seconds_between(start: str | None, end: str | None) -> float | None:
    if not start or not end:
        return None
    return (datetime.fromisoformat(end) - datetime.fromisoformat(start)).total_seconds()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--model", type=Path, default=Path("./var/models/tiny-qwen2"), help="base model folder"
    )
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds allowed for each wait")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="loraloop-bench-loop-") as scratch:
        root = Path(scratch)
        settings = prepare_serving(
            Settings(
                database_url=f"sqlite:///{root / 'loraloop.db'}",
                data_dir=root,
                base_model=args.model,
                vllm_urls=["embedded"],
                vllm_port=0,
                auth_disabled=True,
                distill_enabled=False,
            )
        )
        log_to_file(root / "logs" / "loraloop.log", "INFO")
        app = create_app(settings, background=background_services(settings))
        server = ThreadedServer(app)
        server.start()
        http = httpx.Client(base_url=server.url, timeout=300.0)
        namespace = settings.default_namespace
        try:
            startup_s, served_before, text_before = wait_for_version(http, namespace, None, args.timeout)
            print(
                f"vLLM up and {served_before} served after {startup_s:.1f} s; answer {text_before!r}",
                file=sys.stderr,
            )

            posted = time.monotonic()
            response = http.post(
                "/feedback",
                json={
                    "namespace": namespace,
                    "continuation": DEMO_CONTINUATION,
                    "messages": [{"role": "user", "content": DEMO_QUESTION}],
                },
            )
            response.raise_for_status()
            while True:
                jobs = http.get("/jobs", params={"namespace": namespace, "kind": "train"}).json()["items"]
                job = jobs[-1] if jobs else None
                if job is not None and job["status"] in ("succeeded", "failed", "dead"):
                    break
                if time.monotonic() - posted > args.timeout:
                    raise TimeoutError("the training job did not finish")
                time.sleep(POLL_S)
            result = job["result"] or {}
            if result.get("outcome") != "promoted":
                raise RuntimeError(f"job {job['id']} {job['status']}: {result or job.get('error')}")
            served_after = f"{namespace}-v{result['version']}"
            _, _, text_after = wait_for_version(http, namespace, served_after, args.timeout)
            feedback_to_serving_s = time.monotonic() - posted

            timings = result.get("timings") or {}
            breakdown: dict[str, float | None] = {
                "queue_wait_s": seconds_between(job.get("created_at"), job.get("started_at")),
                "render_s": timings.get("render_seconds"),
                "train_s": timings.get("train_seconds"),
                "gate_s": timings.get("eval_seconds"),
                "save_s": timings.get("publish_seconds"),
                "load_s": timings.get("promote_seconds"),
                "job_total_s": timings.get("total_seconds"),
            }
            breakdown = {key: None if value is None else round(value, 3) for key, value in breakdown.items()}
            # without hot-swap: restart vLLM and load the new version at start-up
            vllm = next(s for s in app.state.background_services if s.name == "vllm").vllm
            restarted = time.monotonic()
            os.killpg(vllm.pid, signal.SIGKILL)
            _, _, text_restarted = wait_for_version(http, namespace, served_after, args.timeout)
            report = {
                "feedback_to_serving_s": round(feedback_to_serving_s, 2),
                "swap_s": breakdown["load_s"],
                "breakdown": breakdown,
                "vllm_startup_s": round(startup_s, 2),
                "vllm_cold_restart_to_new_version_s": round(time.monotonic() - restarted, 2),
                "answer_before": text_before,
                "answer_after": text_after,
                "answer_after_restart": text_restarted,
                "learnt": (text_after or "").strip() == DEMO_CONTINUATION,
                "served_before": served_before,
                "served_after": served_after,
                "gate": result.get("gate"),
            }
            print(json.dumps(report))
        finally:
            http.close()
            server.stop()
    print(
        json.dumps(
            {
                "metric": "feedback_to_serving_s",
                "value": report["feedback_to_serving_s"],
                "baseline": "vllm_cold_restart_with_new_adapter_s",
                "baseline_value": report["vllm_cold_restart_to_new_version_s"],
                "ratio": round(
                    report["vllm_cold_restart_to_new_version_s"] / report["feedback_to_serving_s"], 3
                ),
                "swap_s": report["swap_s"],
                "learnt": report["learnt"],
            }
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
