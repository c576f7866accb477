"""The embedded inference server: starts vLLM's OpenAI server as a child process (its own process
group, behind deploy/vllm_guard.py so it dies with loraloop however loraloop dies) with runtime LoRA
updating on, waits for /health, restarts it when it dies, stops it cleanly. Records the server it
owns in the data folder and never adopts a server it did not start (deploy/vllm_ownership.py).

Knows the vLLM command line and environment for the CPU build and for GPUs; knows nothing of
adapters' contents, the registry or the database (after a restart the service reconciles).
"""

from __future__ import annotations

import json
import logging
import os
import select
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any, Literal, Self

import httpx

from deploy.vllm_ownership import (
    INSTANCE_ENV,
    VllmRecord,
    describe_processes,
    inspect_port,
    listening_pids,
    process_group,
    process_start_ticks,
    read_record,
    remove_record,
    stop_recorded,
    wait_port_free,
    write_record,
)

log = logging.getLogger(__name__)

VLLM_VENV_NAME = ".venv-vllm"
GUARD_SCRIPT = Path(__file__).with_name("vllm_guard.py")
GUARD_REPORT_TIMEOUT_S = 30.0


class EmbeddedVllmError(RuntimeError):
    """The embedded vLLM did not come up (exited, or not healthy in time); carries its log tail."""


class EmbeddedVllmPortInUse(EmbeddedVllmError):
    """The embedded port is served by a process this loraloop did not start (named in the message)."""


@dataclass(frozen=True)
class EmbeddedVllmConfig:
    """How to run the co-located vLLM. `device="cpu"` uses vLLM's CPU build (float32: bf16 with
    LoRA dies with SIGILL there) and a KV cache of `kv_cache_bytes`; on "cuda" the server takes
    `gpu_memory_utilization` of the GPU and, with `enable_sleep_mode`, serves /sleep and /wake_up
    so training can borrow the memory."""

    model: Path
    log_path: Path
    state_path: Path | None = None  # the ownership record (deploy.vllm_ownership); None: none kept
    python: str = ""  # empty: resolve_vllm_python()
    host: str = "127.0.0.1"
    port: int = 8000  # 0: pick a free port
    device: Literal["cpu", "cuda"] = "cpu"
    max_lora_rank: int = 16
    max_loras: int = 4
    max_cpu_loras: int | None = None
    max_model_len: int | None = None
    kv_cache_bytes: int = 64 * 1024 * 1024
    gpu_memory_utilization: float = 0.5
    enable_sleep_mode: bool = False
    served_model_name: str | None = None
    cpu_threads: int | None = None  # OMP threads of the CPU build; None: inherit OMP_NUM_THREADS
    cpu_threads_bind: str = "nobind"  # vLLM's VLLM_CPU_OMP_THREADS_BIND ("auto" pins to cores)
    extra_args: tuple[str, ...] = ()
    extra_env: Mapping[str, str] = field(default_factory=dict)
    startup_timeout_s: float = 300.0
    stop_timeout_s: float = 20.0


# Head sizes the CPU build's attention kernel supports (vllm-cpu 0.32.0, CPU_ATTN backend). Any other
# size starts fine and kills the engine on the first request ("Unsupported CPU attention configuration").
CPU_ATTENTION_HEAD_SIZES = frozenset({32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512})


def attention_head_size(model_dir: Path) -> int | None:
    """head_dim of a Hugging Face model folder (config.json), None when it cannot be told."""
    try:
        config = json.loads((Path(model_dir) / "config.json").read_text())
    except (OSError, ValueError):
        return None
    config = config.get("text_config", config)
    if config.get("head_dim"):
        return int(config["head_dim"])
    if config.get("hidden_size") and config.get("num_attention_heads"):
        return int(config["hidden_size"]) // int(config["num_attention_heads"])
    return None


def check_cpu_servable(model_dir: Path) -> None:
    """Fail fast on a model the CPU build cannot run (instead of an engine crash on first request)."""
    head_size = attention_head_size(model_dir)
    if head_size is not None and head_size not in CPU_ATTENTION_HEAD_SIZES:
        raise EmbeddedVllmError(
            f"{model_dir}: head_dim={head_size} is not supported by vLLM's CPU attention "
            f"(supported: {sorted(CPU_ATTENTION_HEAD_SIZES)}); e.g. build the tiny model with fewer heads"
        )


def resolve_vllm_python(explicit: str = "") -> str:
    """The interpreter that runs vLLM: `explicit` (LORALOOP_VLLM_PYTHON) when set, else the
    `.venv-vllm` that deploy/install_vllm_cpu.sh creates next to this venv, else this interpreter."""
    if explicit:
        return explicit
    sibling = Path(sys.prefix).parent / VLLM_VENV_NAME / "bin" / "python"
    if sibling.exists():
        return str(sibling)
    return sys.executable


def build_command(config: EmbeddedVllmConfig, port: int) -> list[str]:
    """The vLLM server command line. The `vllm` console script is not used: it crashes in the
    CPU build (the distribution is named vllm-cpu)."""
    cmd = [
        resolve_vllm_python(config.python),
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        str(config.model),
        "--host",
        config.host,
        "--port",
        str(port),
        "--enable-lora",
        "--max-lora-rank",
        str(config.max_lora_rank),
        "--max-loras",
        str(config.max_loras),
    ]
    if config.served_model_name:
        cmd += ["--served-model-name", config.served_model_name]
    if config.max_cpu_loras is not None:
        cmd += ["--max-cpu-loras", str(config.max_cpu_loras)]
    if config.max_model_len is not None:
        cmd += ["--max-model-len", str(config.max_model_len)]
    if config.device == "cpu":
        # float32: bf16 + LoRA dies with SIGILL in the CPU build's AMX kernel. The `uni` executor runs
        # the model in the engine-core process instead of one more worker process: measured here,
        # start-up 62 s instead of 119 s on a busy 2-core machine.
        cmd += ["--dtype", "float32", "--kv-cache-memory-bytes", str(config.kv_cache_bytes)]
        cmd += ["--distributed-executor-backend", "uni"]
    else:
        cmd += ["--gpu-memory-utilization", str(config.gpu_memory_utilization)]
        if config.enable_sleep_mode:
            cmd.append("--enable-sleep-mode")
    return cmd + list(config.extra_args)


def build_guarded_command(
    config: EmbeddedVllmConfig, port: int, *, lifeline_fd: int, report_fd: int
) -> list[str]:
    """The command loraloop spawns: the parent-death guard (this interpreter, isolated, no site)
    running the vLLM command line as its child."""
    guard = [sys.executable, "-I", "-S", str(GUARD_SCRIPT), "--lifeline", str(lifeline_fd)]
    guard += ["--report", str(report_fd), "--grace", f"{config.stop_timeout_s:g}", "--"]
    return guard + build_command(config, port)


def build_env(config: EmbeddedVllmConfig, base_env: Mapping[str, str]) -> dict[str, str]:
    env = dict(base_env)
    env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] = "True"
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TRANSFORMERS_OFFLINE", "1")
    env.setdefault("VLLM_NO_USAGE_STATS", "1")
    env.setdefault("DO_NOT_TRACK", "1")
    env.setdefault("PYTHONUNBUFFERED", "1")
    if config.device == "cpu":
        env["VLLM_CPU_OMP_THREADS_BIND"] = config.cpu_threads_bind
        if config.cpu_threads is not None:
            env["OMP_NUM_THREADS"] = str(config.cpu_threads)
    elif config.enable_sleep_mode:
        env["VLLM_SERVER_DEV_MODE"] = "1"  # /sleep, /wake_up, /is_sleeping are dev routes
    env.update(config.extra_env)
    return env


def split_extra_args(value: str) -> tuple[str, ...]:
    """LORALOOP_VLLM_EXTRA_ARGS (a shell-quoted string) -> argv items."""
    return tuple(shlex.split(value))


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def _kill_group(pgid: int, sig: signal.Signals) -> None:
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        pass


class EmbeddedVllm:
    """One supervised vLLM server process.

    `start()` spawns it and waits until /health answers; `supervise()` (started by start() unless
    told otherwise) restarts it after a crash, with backoff, and calls `on_restart(url)` once the
    new process is healthy (the service reconciles adapters then); `stop()` ends the whole process
    group (the API server and its engine-core child). The server runs under deploy/vllm_guard.py,
    which ends that group when this process dies; before each start the port is claimed
    (`claim_port`), and with `config.state_path` the running server is recorded there."""

    def __init__(
        self,
        config: EmbeddedVllmConfig,
        *,
        on_restart: Callable[[str], None] | None = None,
        base_env: Mapping[str, str] | None = None,
    ) -> None:
        self.config = config
        self.on_restart = on_restart
        self._base_env = dict(os.environ if base_env is None else base_env)
        self.port = config.port or free_port(config.host)
        self._proc: subprocess.Popen[bytes] | None = None
        self._log_file: IO[bytes] | None = None
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self._supervisor: threading.Thread | None = None
        self._lifeline: int | None = None  # write end of the guard's lifeline pipe
        self.restarts = 0
        self.last_start_s: float | None = None  # seconds from spawn to healthy, last start
        self.server_pid: int | None = None  # vLLM's API server (a child of the guard)
        self.instance_id: str | None = None  # new for every spawn; in the server's environment
        self.started_at: datetime | None = None  # when the current server process was spawned
        self.healthy = False  # the current server answered /health

    @property
    def url(self) -> str:
        return f"http://{self.config.host}:{self.port}"

    @property
    def pid(self) -> int | None:
        """The process loraloop spawned (the guard): the leader of the server's process group."""
        return self._proc.pid if self._proc else None

    def describe(self) -> dict[str, Any]:
        """What /readyz reports: the server's pid, group, instance id, start time, model, state."""
        running = self.is_running()
        return {
            "url": self.url,
            "status": "healthy" if running and self.healthy else "starting" if running else "down",
            "pid": self.server_pid if running else None,
            "process_group": self.pid if running else None,
            "instance_id": self.instance_id if running else None,
            "started_at": self.started_at.isoformat() if running and self.started_at else None,
            "model": self.config.served_model_name or str(self.config.model),
            "restarts": self.restarts,
        }

    def is_running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # --- lifecycle ----------------------------------------------------------------------------------
    def start(self, *, supervise: bool = True) -> None:
        if self.config.device == "cpu":
            check_cpu_servable(self.config.model)
        self._stopping.clear()
        with self._lock:
            self._spawn()
        try:
            self.wait_ready()
        except EmbeddedVllmError:
            with self._lock:
                self._terminate()
            raise
        if supervise and self._supervisor is None:
            self._supervisor = threading.Thread(target=self._supervise, name="vllm-supervisor", daemon=True)
            self._supervisor.start()

    def claim_port(self) -> None:
        """Make sure the port is ours to bind: free, or served by the server recorded in
        `config.state_path` by an earlier loraloop run that is gone (that server is stopped). Raise
        EmbeddedVllmPortInUse, naming the port and the pid, for anything else: a server this
        loraloop did not start is never adopted."""
        host, port = self.config.host, self.port
        state_path = self.config.state_path
        record = read_record(state_path) if state_path is not None else None
        verdict = inspect_port(host, port, record)
        if verdict.kind == "free":
            if record is not None and state_path is not None and not record.server_alive():
                remove_record(state_path, instance_id=record.instance_id)  # stale: its server is gone
            return
        if verdict.kind != "recorded" or record is None or state_path is None:
            raise EmbeddedVllmPortInUse(verdict.explain(host, port))
        log.warning(
            "port %s is served by vLLM pid %s (instance %s, started %s) recorded by an earlier loraloop "
            "run (pid %s, gone): stopping it and starting our own",
            port,
            record.pid,
            record.instance_id,
            record.started_at,
            record.owner_pid,
        )
        if not stop_recorded(record, timeout_s=self.config.stop_timeout_s):
            raise EmbeddedVllmPortInUse(f"could not stop the earlier vLLM pid {record.pid} on port {port}")
        if not wait_port_free(host, port, timeout_s=10.0):
            raise EmbeddedVllmPortInUse(
                f"port {port} on {host} still served after stopping the earlier vLLM pid {record.pid}: "
                + describe_processes(listening_pids(host, port))
            )
        remove_record(state_path, instance_id=record.instance_id)

    def _spawn(self) -> None:
        self.claim_port()
        self.config.log_path.parent.mkdir(parents=True, exist_ok=True)
        if self._log_file is None:
            self._log_file = open(self.config.log_path, "ab")  # noqa: SIM115 - kept open for the child
        lifeline_read, lifeline_write = os.pipe()  # not inheritable: only the guard gets an end
        report_read, report_write = os.pipe()
        cmd = build_guarded_command(self.config, self.port, lifeline_fd=lifeline_read, report_fd=report_write)
        self._log_file.write(f"\n=== loraloop: starting {shlex.join(cmd)}\n".encode())
        self._log_file.flush()
        log.info("starting embedded vLLM on %s (log: %s)", self.url, self.config.log_path)
        self.instance_id = uuid.uuid4().hex
        self.healthy = False
        self.server_pid = None
        self._started_at = time.monotonic()
        self.started_at = datetime.now(UTC)
        env = build_env(self.config, self._base_env)
        env[INSTANCE_ENV] = self.instance_id
        try:
            self._proc = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=self._log_file,
                stderr=subprocess.STDOUT,
                env=env,
                pass_fds=(lifeline_read, report_write),
                start_new_session=True,  # own process group: stop() reaches the engine-core child too
            )
        except BaseException:
            for fd in (lifeline_read, lifeline_write, report_read, report_write):
                os.close(fd)
            raise
        os.close(lifeline_read)
        os.close(report_write)
        self._lifeline = lifeline_write
        try:
            self.server_pid = self._read_server_pid(report_read)
        except EmbeddedVllmError:
            self._terminate()
            raise
        finally:
            os.close(report_read)
        self._record()

    def _read_server_pid(self, report_fd: int) -> int:
        """The guard writes the server's pid as soon as it has spawned it."""
        deadline = time.monotonic() + GUARD_REPORT_TIMEOUT_S
        data = b""
        while not data.endswith(b"\n") and time.monotonic() < deadline:
            readable, _, _ = select.select([report_fd], [], [], 0.5)
            if readable:
                chunk = os.read(report_fd, 64)
                if not chunk:
                    break
                data += chunk
        if not data.strip().isdigit():
            raise EmbeddedVllmError(f"the vLLM guard did not start the server:\n{self.log_tail()}")
        return int(data)

    def _record(self) -> None:
        if self.config.state_path is None or self.server_pid is None or self._proc is None:
            return
        record = VllmRecord(
            instance_id=self.instance_id or "",
            host=self.config.host,
            port=self.port,
            model=self.config.served_model_name or str(self.config.model),
            pid=self.server_pid,
            pid_start_ticks=process_start_ticks(self.server_pid),
            pgid=self._proc.pid,
            owner_pid=os.getpid(),
            owner_start_ticks=process_start_ticks(os.getpid()),
            started_at=(self.started_at or datetime.now(UTC)).isoformat(),
        )
        write_record(self.config.state_path, record)
        log.info(
            "embedded vLLM pid %s (instance %s) recorded in %s",
            self.server_pid,
            self.instance_id,
            self.config.state_path,
        )

    def wait_ready(self, timeout_s: float | None = None) -> None:
        deadline = time.monotonic() + (timeout_s or self.config.startup_timeout_s)
        with httpx.Client(timeout=2.0) as http:
            while time.monotonic() < deadline:
                if self._stopping.is_set():
                    raise EmbeddedVllmError("stopped while starting")
                proc = self._proc
                if proc is None or proc.poll() is not None:
                    code = None if proc is None else proc.returncode
                    raise EmbeddedVllmError(
                        f"vLLM exited with code {code} while starting:\n{self.log_tail()}"
                    )
                try:
                    if http.get(f"{self.url}/health").status_code == 200:
                        self._check_listeners_are_ours(proc.pid)
                        self.healthy = True
                        self.last_start_s = time.monotonic() - self._started_at
                        log.info("embedded vLLM healthy after %.1f s", self.last_start_s)
                        return
                except httpx.TransportError:
                    pass
                time.sleep(0.5)
        raise EmbeddedVllmError(
            f"vLLM not healthy after {timeout_s or self.config.startup_timeout_s} s:\n{self.log_tail()}"
        )

    def _check_listeners_are_ours(self, pgid: int) -> None:
        """/health answered: make sure it was our server (a stranger may share the port through
        SO_REUSEPORT, or have bound it after claim_port)."""
        foreign = {pid for pid in listening_pids(self.config.host, self.port) if process_group(pid) != pgid}
        if foreign:
            raise EmbeddedVllmPortInUse(
                f"port {self.port} on {self.config.host} is also served by {describe_processes(foreign)}, "
                "which this loraloop did not start"
            )

    def stop(self) -> None:
        self._stopping.set()
        supervisor, self._supervisor = self._supervisor, None
        if supervisor is not None and supervisor is not threading.current_thread():
            supervisor.join(timeout=self.config.stop_timeout_s + 5)
        with self._lock:
            self._terminate()
            if self._log_file is not None:
                self._log_file.close()
                self._log_file = None

    def _terminate(self) -> None:
        proc = self._proc
        if proc is None:
            return
        pgid = proc.pid  # start_new_session: the group id is the leader's pid
        _kill_group(pgid, signal.SIGTERM)
        try:
            proc.wait(timeout=self.config.stop_timeout_s)
        except subprocess.TimeoutExpired:
            log.warning("vLLM did not stop in %.0f s: SIGKILL", self.config.stop_timeout_s)
        _kill_group(pgid, signal.SIGKILL)  # stragglers (engine core) even when the leader is gone
        proc.wait()
        self._proc = None
        self.healthy = False
        if self._lifeline is not None:
            os.close(self._lifeline)
            self._lifeline = None
        if self.config.state_path is not None and self.instance_id is not None:
            remove_record(self.config.state_path, instance_id=self.instance_id)

    # --- supervision --------------------------------------------------------------------------------
    def _supervise(self) -> None:
        backoff = 1.0
        while not self._stopping.wait(1.0):
            proc = self._proc
            if proc is not None and proc.poll() is None:
                if time.monotonic() - self._started_at > 60:
                    backoff = 1.0  # stayed up a while: next crash restarts quickly
                continue
            code = None if proc is None else proc.returncode
            log.error("embedded vLLM is down (exit code %s); restarting in %.0f s", code, backoff)
            if self._stopping.wait(backoff):
                return
            backoff = min(backoff * 2, 30.0)
            try:
                with self._lock:
                    if self._stopping.is_set():
                        return
                    self._terminate()
                    self._spawn()
                self.wait_ready()
            except EmbeddedVllmError as exc:
                log.error("embedded vLLM restart failed: %s", exc)
                with self._lock:
                    self._terminate()  # a hung start is ended too; the next round starts afresh
                continue
            self.restarts += 1
            if self.on_restart is not None:
                try:
                    self.on_restart(self.url)
                except Exception:  # a failing callback must not kill the supervisor
                    log.exception("on_restart callback failed")

    def log_tail(self, max_bytes: int = 4000) -> str:
        try:
            with open(self.config.log_path, "rb") as handle:
                handle.seek(0, os.SEEK_END)
                handle.seek(max(0, handle.tell() - max_bytes))
                return handle.read().decode("utf-8", "replace")
        except OSError:
            return ""


def embedded_config_from_args(
    *,
    model: Path,
    data_dir: Path,
    port: int,
    python: str = "",
    device: Literal["cpu", "cuda"] = "cpu",
    max_lora_rank: int = 16,
    max_loras: int = 4,
    kv_cache_bytes: int = 64 * 1024 * 1024,
    gpu_memory_utilization: float = 0.5,
    enable_sleep_mode: bool = False,
    extra_args: str = "",
    max_model_len: int | None = None,
) -> EmbeddedVllmConfig:
    """Convenience for the service: the log goes to `<data_dir>/logs/vllm.log`, the ownership
    record to `<data_dir>/run/vllm.json`."""
    return EmbeddedVllmConfig(
        model=model,
        log_path=data_dir / "logs" / "vllm.log",
        state_path=data_dir / "run" / "vllm.json",
        python=python,
        port=port,
        device=device,
        max_lora_rank=max_lora_rank,
        max_loras=max_loras,
        kv_cache_bytes=kv_cache_bytes,
        gpu_memory_utilization=gpu_memory_utilization,
        enable_sleep_mode=enable_sleep_mode,
        extra_args=split_extra_args(extra_args),
        max_model_len=max_model_len,
    )


__all__: Sequence[str] = (
    "CPU_ATTENTION_HEAD_SIZES",
    "EmbeddedVllm",
    "EmbeddedVllmConfig",
    "EmbeddedVllmError",
    "EmbeddedVllmPortInUse",
    "attention_head_size",
    "build_command",
    "build_env",
    "build_guarded_command",
    "check_cpu_servable",
    "embedded_config_from_args",
    "free_port",
    "resolve_vllm_python",
    "split_extra_args",
)
