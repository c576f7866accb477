"""`loraloop serve` wiring without starting anything: which background services run for which
Settings, in which order, and the embedded vLLM's flags and URL."""

from __future__ import annotations

from pathlib import Path

import pytest

from service.adapters.registry import vllm_base_urls
from service.app import create_app
from service.component_configs import embedded_vllm_config
from service.config import Settings
from service.wiring import BaseModelUnavailable, background_services, prepare_serving


def settings_for(tmp_path: Path, **overrides: object) -> Settings:
    model = tmp_path / "model"  # looks like a model folder: prepare_serving fetches nothing
    model.mkdir(exist_ok=True)
    (model / "config.json").write_text("{}")
    (model / "tokenizer.json").write_text("{}")
    base = {
        "database_url": f"sqlite:///{tmp_path / 'd.db'}",
        "data_dir": tmp_path,
        "base_model": model,
        "auth_disabled": True,
        "device": "cpu",
    }
    return Settings(**{**base, **overrides})  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("overrides", "names"),
    [
        ({"vllm_urls": []}, ["worker", "scheduler", "retention"]),
        (
            {"vllm_urls": ["http://a:8000", "http://b:8000"]},
            ["reconciler", "worker", "scheduler", "retention"],
        ),
        ({"vllm_urls": ["embedded"]}, ["vllm", "reconciler", "worker", "scheduler", "retention"]),
        (
            {
                "vllm_urls": ["embedded"],
                "worker_enabled": False,
                "distill_enabled": False,
                "retention_enabled": False,
            },
            ["vllm", "reconciler"],
        ),
    ],
)
def test_background_services_follow_settings(
    tmp_path: Path, overrides: dict[str, object], names: list[str]
) -> None:
    settings = prepare_serving(settings_for(tmp_path, **overrides))
    app = create_app(settings, background=background_services(settings))
    services = background_services(settings)(app.state.resources)
    assert [service.name for service in services] == names


def test_embedded_vllm_gets_a_fixed_port_and_cpu_flags(tmp_path: Path) -> None:
    settings = prepare_serving(settings_for(tmp_path, vllm_urls=["embedded"], vllm_port=0))
    assert settings.vllm_port != 0
    assert vllm_base_urls(settings) == [f"http://127.0.0.1:{settings.vllm_port}"]
    config = embedded_vllm_config(settings)
    assert config.port == settings.vllm_port
    assert (config.device, config.max_loras, config.max_lora_rank) == ("cpu", settings.vllm_max_loras, 16)
    assert config.enable_sleep_mode is False  # no sleep mode in the CPU build


def test_sleep_mode_only_on_gpu(tmp_path: Path) -> None:
    gpu = embedded_vllm_config(
        settings_for(tmp_path, vllm_urls=["embedded"], device="cuda", vllm_sleep_for_training=True)
    )
    cpu = embedded_vllm_config(
        settings_for(tmp_path, vllm_urls=["embedded"], device="cpu", vllm_sleep_for_training=True)
    )
    assert (gpu.enable_sleep_mode, cpu.enable_sleep_mode) == (True, False)


def test_start_up_fails_fast_naming_a_missing_base_model(tmp_path: Path) -> None:
    settings = settings_for(tmp_path, base_model=tmp_path / "nowhere")
    with pytest.raises(BaseModelUnavailable, match="LORALOOP_BASE_MODEL=.*nowhere.*no config.json"):
        prepare_serving(settings)


def test_start_up_fails_fast_without_tokenizer_files(tmp_path: Path) -> None:
    settings = settings_for(tmp_path)
    (Path(settings.base_model) / "tokenizer.json").unlink()
    with pytest.raises(BaseModelUnavailable, match="no tokenizer files"):
        prepare_serving(settings)


def test_an_ingest_only_process_starts_without_a_tokenizer(tmp_path: Path) -> None:
    settings = settings_for(tmp_path).model_copy(update={"worker_enabled": False})
    (Path(settings.base_model) / "tokenizer.json").unlink()
    assert prepare_serving(settings).base_model == settings.base_model


def test_the_default_base_model_is_the_real_one_in_the_offline_cache(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("LORALOOP_CACHE_DIR", str(tmp_path / "cache"))
    settings = Settings(auth_disabled=True)
    assert settings.base_model == tmp_path / "cache" / "models" / "smollm2-135m-instruct"


def test_the_routes_the_reconciler_and_the_jobs_share_one_registry(tmp_path: Path) -> None:
    # one view of what each vLLM replica has loaded: a version the gateway loads for a question
    # (preview) is known to the reconciler and the train job's swaps, and the other way round
    settings = prepare_serving(settings_for(tmp_path, vllm_urls=["http://a:8000"]))
    app = create_app(settings, background=background_services(settings))
    services = {service.name: service for service in background_services(settings)(app.state.resources)}
    registry = app.state.resources.adapter_registry()
    assert registry is app.state.resources.adapter_registry() and registry.swapper is not None
    assert services["reconciler"].swapper is registry.swapper  # type: ignore[attr-defined]
    train = services["worker"].handlers["train"]  # type: ignore[attr-defined]
    assert train.registry is registry


@pytest.mark.parametrize("sleep_for_training", [False, True])
def test_serve_and_loraloop_worker_build_their_worker_one_way(
    tmp_path: Path, sleep_for_training: bool
) -> None:
    from service.adapters.registry import AdapterRegistry, build_hot_swapper
    from service.jobs.train import TrainJobHandler
    from service.wiring import build_worker

    settings = prepare_serving(
        settings_for(tmp_path, vllm_urls=["http://a:8000"], vllm_sleep_for_training=sleep_for_training)
    )
    app = create_app(settings)
    factory = app.state.resources.session_factory
    registry = AdapterRegistry.from_settings(settings, factory, build_hot_swapper(settings))
    worker = build_worker(settings, factory, registry, worker_id="w-1")
    assert worker.worker_id == "w-1" and set(worker.handlers) == {"train", "distill"}
    # with sleep-for-training every handler runs inside the sleep window of the registry's replicas
    assert isinstance(worker.handlers["train"], TrainJobHandler) is not sleep_for_training
