"""EmbeddedVllm: the command line and environment per device (pure), and the process lifecycle
(start, wait for /health, restart after a crash, stop the whole process group) against a stand-in
`vllm.entrypoints.openai.api_server` module that serves /health and spawns an "engine core" child;
ownership with real processes: the server dies with its SIGKILLed owner, a stranger on the port is
refused, a recorded earlier instance whose owner is gone is replaced."""

from __future__ import annotations

import json
import os
import signal
import subprocess
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
    EmbeddedVllmPortInUse,
    attention_head_size,
    build_command,
    build_env,
    check_cpu_servable,
    embedded_config_from_args,
    free_port,
    resolve_vllm_python,
)
from deploy.vllm_ownership import VllmRecord, port_answers, process_start_ticks, read_record, write_record


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


# --- ownership: the server dies with its owner, strangers on the port are never adopted ---------

REPO_ROOT = Path(__file__).resolve().parents[2]

OWNER_SCRIPT = textwrap.dedent(
    """
    import json, sys, threading, time
    from pathlib import Path
    from deploy.embedded import EmbeddedVllm, EmbeddedVllmConfig

    options = json.loads(sys.argv[1])
    for key in ("model", "log_path", "state_path"):
        options[key] = Path(options[key])
    server = EmbeddedVllm(EmbeddedVllmConfig(**options))
    # started from a thread that ends at once: Linux ties a parent-death signal to the forking
    # thread, so a naive PR_SET_PDEATHSIG would kill the server right here
    starter = threading.Thread(target=server.start, kwargs={"supervise": False})
    starter.start()
    starter.join()
    print(json.dumps(server.describe()), flush=True)
    time.sleep(600)
    """
)


def _owned_config(tmp_path: Path, pkg: Path, state: Path, **overrides: object) -> EmbeddedVllmConfig:
    config = _config(tmp_path, pkg, state)
    return EmbeddedVllmConfig(
        **{**config.__dict__, "state_path": tmp_path / "var" / "run" / "vllm.json", **overrides}
    )  # type: ignore[arg-type]


def _stranger(port: int, tmp_path: Path, **env: str) -> subprocess.Popen[bytes]:
    """A real HTTP server on `port` in its own session (not started by any EmbeddedVllm)."""
    process = subprocess.Popen(
        [sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1", "-d", str(tmp_path)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
        env={**os.environ, **env},
    )
    deadline = time.monotonic() + 20
    while not port_answers("127.0.0.1", port):
        assert process.poll() is None and time.monotonic() < deadline, "the stranger did not start"
        time.sleep(0.05)
    return process


def _dead_pid() -> int:
    code = "import os; print(os.getpid())"
    finished = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)
    return int(finished.stdout)


def test_the_server_tree_dies_when_its_owner_is_sigkilled(
    tmp_path: Path, stand_in: tuple[Path, Path]
) -> None:
    pkg, state = stand_in
    config = _owned_config(tmp_path, pkg, state, port=free_port())
    options = {
        key: str(value) if isinstance(value, Path) else value
        for key, value in config.__dict__.items()
        if key in ("model", "log_path", "state_path", "python", "port", "extra_env", "startup_timeout_s")
    }
    owner = subprocess.Popen(
        [sys.executable, "-c", OWNER_SCRIPT, json.dumps(options)],
        stdout=subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
        start_new_session=True,
    )
    try:
        assert owner.stdout is not None
        described = json.loads(owner.stdout.readline())
        started = _starts(state)[0]
        assert described["status"] == "healthy" and described["pid"] == started["pid"]
        time.sleep(1.0)  # the starting thread has ended: the server must still be up
        assert (
            _alive(started["pid"]) and httpx.get(f"http://127.0.0.1:{config.port}/health").status_code == 200
        )
        record = read_record(config.state_path)
        assert record is not None and record.pid == started["pid"] and record.owner_pid == owner.pid
        os.kill(owner.pid, signal.SIGKILL)  # a crash: no shutdown code of the owner runs
        owner.wait()
        for pid in (started["pid"], started["engine"], described["process_group"]):
            assert _gone(pid, timeout_s=10.0), f"pid {pid} outlived its owner"
        assert not port_answers("127.0.0.1", config.port)
    finally:
        if owner.poll() is None:
            owner.kill()
            owner.wait()
        for started in _starts(state):  # on failure, leave nothing running
            for pid in (started["pid"], started["engine"]):
                if _alive(pid):
                    os.kill(pid, signal.SIGKILL)
    assert "parent process gone" in config.log_path.read_text()


def test_a_stranger_on_the_port_is_refused_naming_port_and_pid(
    tmp_path: Path, stand_in: tuple[Path, Path]
) -> None:
    pkg, state = stand_in
    port = free_port()
    stranger = _stranger(port, tmp_path)
    try:
        server = EmbeddedVllm(_owned_config(tmp_path, pkg, state, port=port))
        started = time.monotonic()
        with pytest.raises(
            EmbeddedVllmPortInUse, match=rf"port {port} .* pid {stranger.pid} .*did not start"
        ):
            server.start()
        assert time.monotonic() - started < 5, "the refusal must be fast"
        server.stop()
        assert _starts(state) == []  # no server was spawned
        assert stranger.poll() is None  # and the stranger was left alone
    finally:
        stranger.kill()
        stranger.wait()


def _record_for(
    process: subprocess.Popen[bytes], port: int, *, owner_pid: int, **changes: object
) -> VllmRecord:
    fields = {
        "instance_id": "earlier-run",
        "host": "127.0.0.1",
        "port": port,
        "model": "/old/model",
        "pid": process.pid,
        "pid_start_ticks": process_start_ticks(process.pid),
        "pgid": process.pid,
        "owner_pid": owner_pid,
        "owner_start_ticks": process_start_ticks(owner_pid),
        "started_at": "2026-01-01T00:00:00+00:00",
    }
    return VllmRecord(**{**fields, **changes})  # type: ignore[arg-type]


def test_a_recorded_earlier_instance_whose_owner_is_gone_is_stopped_and_replaced(
    tmp_path: Path, stand_in: tuple[Path, Path]
) -> None:
    pkg, state = stand_in
    port = free_port()
    config = _owned_config(tmp_path, pkg, state, port=port)
    earlier = _stranger(port, tmp_path, LORALOOP_VLLM_INSTANCE_ID="earlier-run")
    write_record(config.state_path, _record_for(earlier, port, owner_pid=_dead_pid()))
    server = EmbeddedVllm(config)
    try:
        server.start(supervise=False)
        assert earlier.wait(timeout=10) is not None  # stopped (SIGTERM to its group)
        started = _starts(state)[0]
        described = server.describe()
        assert described["status"] == "healthy" and described["pid"] == started["pid"]
        assert described["instance_id"] != "earlier-run"
        record = read_record(config.state_path)
        assert (
            record is not None and record.pid == started["pid"] and record.instance_id == server.instance_id
        )
        assert record.owner_pid == os.getpid() and record.port == port
    finally:
        server.stop()
        if earlier.poll() is None:
            earlier.kill()
            earlier.wait()
    assert _gone(started["pid"]) and _gone(started["engine"])
    assert read_record(config.state_path) is None  # a graceful stop removes the record


@pytest.mark.parametrize("case", ["owner_alive", "pid_reused", "other_instance"])
def test_a_record_that_does_not_prove_the_server_is_ours_and_orphaned_is_refused(
    tmp_path: Path, stand_in: tuple[Path, Path], case: str
) -> None:
    pkg, state = stand_in
    port = free_port()
    config = _owned_config(tmp_path, pkg, state, port=port)
    earlier = _stranger(port, tmp_path, LORALOOP_VLLM_INSTANCE_ID="earlier-run")
    owner = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        if case == "owner_alive":  # another loraloop still runs it: not ours to stop
            record, expected = (
                _record_for(earlier, port, owner_pid=owner.pid),
                f"loraloop process {owner.pid}",
            )
        elif case == "pid_reused":  # same pid, another process (start time differs)
            ticks = (process_start_ticks(earlier.pid) or 0) - 1
            record = _record_for(earlier, port, owner_pid=_dead_pid(), pid_start_ticks=ticks)
            expected = f"pid {earlier.pid}"
        else:  # the environment names another instance
            record = _record_for(earlier, port, owner_pid=_dead_pid(), instance_id="someone-else")
            expected = f"pid {earlier.pid}"
        write_record(config.state_path, record)
        with pytest.raises(EmbeddedVllmPortInUse, match=expected):
            EmbeddedVllm(config).start()
        assert earlier.poll() is None and _starts(state) == []
        assert read_record(config.state_path) == record  # someone else's record is left as it was
    finally:
        for process in (earlier, owner):
            process.kill()
            process.wait()


def test_a_stale_record_is_dropped_and_the_port_used(tmp_path: Path, stand_in: tuple[Path, Path]) -> None:
    pkg, state = stand_in
    config = _owned_config(tmp_path, pkg, state, port=free_port())
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    write_record(config.state_path, _record_for(gone, config.port, owner_pid=_dead_pid(), pid_start_ticks=1))
    with EmbeddedVllm(config) as server:
        assert server.describe()["status"] == "healthy"
        record = read_record(config.state_path)
        assert record is not None and record.instance_id == server.instance_id


def test_the_guard_reports_the_servers_exit_code_and_ends_its_orphans(
    tmp_path: Path, stand_in: tuple[Path, Path]
) -> None:
    pkg, state = stand_in
    server = EmbeddedVllm(_owned_config(tmp_path, pkg, state, port=free_port()))
    server.start(supervise=False)
    try:
        started = _starts(state)[0]
        guard = server._proc
        assert guard is not None and server.pid == guard.pid != started["pid"]
        os.kill(started["pid"], signal.SIGKILL)  # the API server crashes, its engine child is orphaned
        assert guard.wait(timeout=10) == 128 + signal.SIGKILL
        assert _gone(started["engine"], timeout_s=10.0)
        assert server.describe()["status"] == "down"
    finally:
        server.stop()
