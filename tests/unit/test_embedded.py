"""EmbeddedVllm: the command line and environment per device (pure), and the process lifecycle
(start, wait for /health, restart after a crash, stop the whole process group) against a stand-in
`vllm.entrypoints.openai.api_server` module that serves /health and spawns an "engine core" child."""

from __future__ import annotations

import json
import os
import signal
import sys
import textwrap
import threading
import time
from pathlib import Path

import httpx
import pytest

from deploy.embedded import (
    EmbeddedVllm,
    EmbeddedVllmConfig,
    EmbeddedVllmError,
    attention_head_size,
    build_command,
    build_env,
    check_cpu_servable,
    embedded_config_from_args,
    resolve_vllm_python,
)


def test_cpu_command_has_lora_flags_float32_and_small_kv_cache(tmp_path: Path) -> None:
    config = EmbeddedVllmConfig(
        model=tmp_path / "m",
        log_path=tmp_path / "log",
        python="/py",
        max_lora_rank=8,
        max_loras=3,
        max_model_len=512,
        kv_cache_bytes=1 << 26,
        extra_args=("--seed", "1"),
    )
    cmd = build_command(config, port=8123)
    assert cmd[:3] == ["/py", "-m", "vllm.entrypoints.openai.api_server"]
    joined = " ".join(cmd)
    for flag in (
        f"--model {tmp_path / 'm'}",
        "--port 8123",
        "--enable-lora",
        "--max-lora-rank 8",
        "--max-loras 3",
        "--dtype float32",
        "--kv-cache-memory-bytes 67108864",
        "--max-model-len 512",
    ):
        assert flag in joined
    assert cmd[-2:] == ["--seed", "1"]
    assert "--gpu-memory-utilization" not in joined and "--enable-sleep-mode" not in joined


def test_gpu_command_and_env_enable_sleep_mode(tmp_path: Path) -> None:
    config = EmbeddedVllmConfig(
        model=tmp_path,
        log_path=tmp_path / "log",
        python="/py",
        device="cuda",
        gpu_memory_utilization=0.4,
        enable_sleep_mode=True,
    )
    joined = " ".join(build_command(config, port=1))
    assert "--gpu-memory-utilization 0.4" in joined and "--enable-sleep-mode" in joined
    assert "float32" not in joined and "--kv-cache-memory-bytes" not in joined
    env = build_env(config, {})
    assert env["VLLM_SERVER_DEV_MODE"] == "1" and "VLLM_CPU_OMP_THREADS_BIND" not in env


def test_env_enables_runtime_lora_updating_offline(tmp_path: Path) -> None:
    config = EmbeddedVllmConfig(model=tmp_path, log_path=tmp_path / "log", cpu_threads=2)
    env = build_env(config, {"PATH": "/bin", "HF_HUB_OFFLINE": "0"})
    assert env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] == "True"
    assert env["VLLM_CPU_OMP_THREADS_BIND"] == "nobind" and env["OMP_NUM_THREADS"] == "2"
    assert env["HF_HUB_OFFLINE"] == "0" and env["PATH"] == "/bin"  # the caller's choice wins


def test_config_from_settings_values(tmp_path: Path) -> None:
    config = embedded_config_from_args(
        model=tmp_path, data_dir=tmp_path / "var", port=9, extra_args="--seed '3'"
    )
    assert config.log_path == tmp_path / "var" / "logs" / "vllm.log"
    assert config.extra_args == ("--seed", "3")


def test_python_resolution_prefers_explicit_then_sibling_venv() -> None:
    assert resolve_vllm_python("/opt/vllm/bin/python") == "/opt/vllm/bin/python"
    sibling = Path(sys.prefix).parent / ".venv-vllm" / "bin" / "python"
    assert resolve_vllm_python("") == (str(sibling) if sibling.exists() else sys.executable)


def test_models_whose_head_size_the_cpu_build_cannot_run_are_refused(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"hidden_size": 64, "num_attention_heads": 4}))
    assert attention_head_size(tmp_path) == 16
    with pytest.raises(EmbeddedVllmError, match="head_dim=16"):
        check_cpu_servable(tmp_path)
    with pytest.raises(EmbeddedVllmError, match="head_dim=16"):  # before any process is spawned
        EmbeddedVllm(
            EmbeddedVllmConfig(model=tmp_path, log_path=tmp_path / "log", python="/nonexistent")
        ).start()
    (tmp_path / "config.json").write_text(json.dumps({"hidden_size": 64, "num_attention_heads": 2}))
    check_cpu_servable(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"text_config": {"head_dim": 128}}))
    assert attention_head_size(tmp_path) == 128


STAND_IN_SERVER = textwrap.dedent(
    """
    import argparse, json, os, subprocess, sys, time
    from http.server import BaseHTTPRequestHandler, HTTPServer

    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int)
    args, _ = parser.parse_known_args()
    state = os.environ["STAND_IN_STATE"]
    engine = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    with open(state, "a") as fh:
        fh.write(json.dumps({"pid": os.getpid(), "engine": engine.pid, "argv": sys.argv[1:],
                             "lora": os.environ.get("VLLM_ALLOW_RUNTIME_LORA_UPDATING")}) + "\\n")
    if os.environ.get("STAND_IN_FAIL"):
        sys.exit(3)
    fail_once = os.environ.get("STAND_IN_FAIL_ONCE")
    if fail_once and os.path.exists(fail_once):
        os.remove(fail_once)
        sys.exit(4)

    class Health(BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200 if self.path == "/health" else 404)
            self.end_headers()
        def log_message(self, *a):
            pass

    HTTPServer(("127.0.0.1", args.port), Health).serve_forever()
    """
)


@pytest.fixture
def stand_in(tmp_path: Path) -> tuple[Path, Path]:
    pkg = tmp_path / "pkg" / "vllm" / "entrypoints" / "openai"
    pkg.mkdir(parents=True)
    for level in (pkg.parents[1], pkg.parent, pkg):
        (level / "__init__.py").write_text("")
    (pkg / "api_server.py").write_text(STAND_IN_SERVER)
    return tmp_path / "pkg", tmp_path / "state.jsonl"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie child of ours is dead for our purposes
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split()[2] != "Z"
    except OSError:
        return False


def _gone(pid: int, timeout_s: float = 10.0) -> bool:
    """True once `pid` is dead (SIGKILL is delivered asynchronously: give it a moment)."""
    deadline = time.monotonic() + timeout_s
    while _alive(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def _starts(state: Path) -> list[dict]:
    return [json.loads(line) for line in state.read_text().splitlines()] if state.exists() else []


def _config(tmp_path: Path, pkg: Path, state: Path, **env: str) -> EmbeddedVllmConfig:
    return EmbeddedVllmConfig(
        model=tmp_path,
        log_path=tmp_path / "var" / "logs" / "vllm.log",
        python=sys.executable,
        port=0,
        extra_env={"PYTHONPATH": str(pkg), "STAND_IN_STATE": str(state), **env},
        startup_timeout_s=30,
        stop_timeout_s=5,
    )


def test_start_restart_after_crash_and_stop_the_process_group(
    tmp_path: Path, stand_in: tuple[Path, Path]
) -> None:
    pkg, state = stand_in
    restarted = threading.Event()
    server = EmbeddedVllm(_config(tmp_path, pkg, state), on_restart=lambda url: restarted.set())
    server.start()
    try:
        assert httpx.get(f"{server.url}/health").status_code == 200
        first = _starts(state)[0]
        assert first["lora"] == "True" and "--enable-lora" in first["argv"]
        os.kill(first["pid"], signal.SIGKILL)  # the API server dies; its engine child is orphaned
        assert restarted.wait(30), server.log_tail()
        assert server.restarts == 1 and httpx.get(f"{server.url}/health").status_code == 200
        assert _gone(first["engine"])  # the old group was cleaned up before the restart
        second = _starts(state)[1]
    finally:
        server.stop()
    assert _gone(second["pid"]) and _gone(second["engine"])
    assert "=== loraloop: starting" in (tmp_path / "var" / "logs" / "vllm.log").read_text()


def test_a_server_that_exits_while_starting_raises_with_its_log(
    tmp_path: Path, stand_in: tuple[Path, Path]
) -> None:
    pkg, state = stand_in
    server = EmbeddedVllm(_config(tmp_path, pkg, state, STAND_IN_FAIL="1"))
    started = time.monotonic()
    with pytest.raises(EmbeddedVllmError, match="exited with code 3"):
        server.start()
    server.stop()
    assert time.monotonic() - started < 20
    assert _gone(_starts(state)[0]["engine"])


def test_a_failed_restart_is_retried(tmp_path: Path, stand_in: tuple[Path, Path]) -> None:
    pkg, state = stand_in
    fail_once = tmp_path / "fail-next-start"
    restarted = threading.Event()
    server = EmbeddedVllm(
        _config(tmp_path, pkg, state, STAND_IN_FAIL_ONCE=str(fail_once)),
        on_restart=lambda url: restarted.set(),
    )
    server.start()
    try:
        fail_once.touch()
        os.kill(_starts(state)[0]["pid"], signal.SIGKILL)
        assert restarted.wait(40), server.log_tail()
        assert len(_starts(state)) == 3 and not fail_once.exists()  # crashed, failed once, came back
        assert server.restarts == 1 and httpx.get(f"{server.url}/health").status_code == 200
    finally:
        server.stop()
