"""Integration fixtures shared by every slow test that needs a real vLLM: ONE vLLM CPU server per
test session (started lazily by the first test that asks for `vllm_server`, stopped with its whole
process group at the end), serving the session's tiny model with runtime LoRA updating on."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from deploy.embedded import (
    CPU_ATTENTION_HEAD_SIZES,
    EmbeddedVllm,
    EmbeddedVllmConfig,
    EmbeddedVllmError,
    attention_head_size,
    resolve_vllm_python,
)

VLLM_MAX_LORAS = 4
VLLM_MAX_LORA_RANK = 16
VLLM_MAX_MODEL_LEN = 1024
VLLM_KV_CACHE_BYTES = 32 * 1024 * 1024


@dataclass(frozen=True)
class VllmServer:
    """A running vLLM: `url` (http://127.0.0.1:PORT), the `model_dir` it serves (also its base
    model name in requests), its log file and how long it took to become healthy."""

    url: str
    model_dir: Path
    log_path: Path
    start_s: float
    process: EmbeddedVllm

    @property
    def base_model_name(self) -> str:
        return str(self.model_dir)


def _check_vllm_python(python: str) -> None:
    """Fail (never skip: CI installs vLLM with `make vllm`) when `python` has no vLLM. Only looks the
    package up: importing vLLM costs ~20 s of CPU, the server start does that anyway."""
    probe = subprocess.run(
        [python, "-c", "import importlib.util, sys; sys.exit(importlib.util.find_spec('vllm') is None)"],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )
    if probe.returncode != 0:
        pytest.fail(
            f"vLLM is not installed for {python} (run `make vllm`, or set LORALOOP_VLLM_PYTHON): "
            + probe.stderr[-2000:]
        )


@pytest.fixture(scope="session")
def vllm_model_dir(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model vLLM serves: the session's `tiny_model_dir` when vLLM's CPU attention can run
    it, else the same family rebuilt with head_dim 32 (2 heads of 32 instead of 4 of 16). Tests that
    train adapters for this server must train them on THIS folder."""
    if attention_head_size(tiny_model_dir) in CPU_ATTENTION_HEAD_SIZES:
        return tiny_model_dir
    from training.tiny_model import build_tiny_model

    return build_tiny_model(
        tmp_path_factory.mktemp("models") / "tiny-qwen2-hd32", num_heads=2, num_kv_heads=1
    )


@pytest.fixture(scope="session")
def vllm_server(vllm_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[VllmServer]:
    python = resolve_vllm_python(os.environ.get("LORALOOP_VLLM_PYTHON", ""))
    _check_vllm_python(python)
    log_path = tmp_path_factory.mktemp("vllm") / "vllm.log"
    config = EmbeddedVllmConfig(
        model=vllm_model_dir,
        log_path=log_path,
        python=python,
        port=0,
        device="cpu",
        max_lora_rank=VLLM_MAX_LORA_RANK,
        max_loras=VLLM_MAX_LORAS,
        max_model_len=VLLM_MAX_MODEL_LEN,
        kv_cache_bytes=VLLM_KV_CACHE_BYTES,
        cpu_threads=int(os.environ.get("OMP_NUM_THREADS", "2")),
        startup_timeout_s=420,
    )
    server = EmbeddedVllm(config)
    try:
        server.start()
    except EmbeddedVllmError as exc:
        server.stop()
        pytest.fail(f"the vLLM CPU server did not start: {exc}")
    try:
        yield VllmServer(server.url, vllm_model_dir, log_path, server.last_start_s or 0.0, server)
    finally:
        server.stop()
