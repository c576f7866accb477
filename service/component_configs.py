"""Settings translated into each component's own config, in one place.

The training, distillation, rendering, gate and embedded-vLLM code take small frozen configs of
their own and never read `Settings`; every translation from the `LORALOOP_*` knobs to them is here,
so a knob reaches its component through exactly one function. Knows Settings and the config
classes; nothing about HTTP, the database or jobs.
"""

from __future__ import annotations

from pathlib import Path

from deploy.embedded import EmbeddedVllmConfig, embedded_config_from_args
from service.config import Settings
from training.bake import BakeConfig
from training.distill import DistillConfig
from training.distill_data import DEFAULT_PROBE_TEMPLATES
from training.evaluate import GateConfig
from training.render import RenderConfig
from training.trainer import TrainConfig


def render_config(settings: Settings) -> RenderConfig:
    return RenderConfig(
        max_seq_len=settings.max_seq_len, max_continuation_tokens=settings.max_continuation_tokens
    )


def train_config(settings: Settings) -> TrainConfig:
    """The LoRA training knobs of Settings as training.trainer's config (also the v0 adapter's shape)."""
    return TrainConfig(
        rank=settings.lora_rank,
        alpha=settings.lora_alpha,
        dropout=settings.lora_dropout,
        target_modules=tuple(settings.lora_target_modules),
        lr=settings.learning_rate,
        epochs=settings.train_epochs,
        max_steps=settings.max_steps,
        batch_tokens=settings.batch_tokens,
        grad_accum_steps=settings.grad_accum_steps,
        gradient_checkpointing=settings.gradient_checkpointing,
        seed=settings.train_seed,
        time_budget_s=settings.train_time_budget_s,
        device=settings.device,
        stop_when_learnt=settings.stop_when_learnt,
        learnt_extra_steps=settings.learnt_extra_steps,
        anchor_weight=settings.anchor_weight,
        anchor_topk=settings.anchor_topk,
        anchor_reference=settings.anchor_reference,
        anchors_per_step=settings.anchors_per_step,
    )


def gate_config(settings: Settings) -> GateConfig:
    """The one gate of online updates and distillations: NLL drop or gap closure and answer agreement,
    drift and general answers lost."""
    return GateConfig(
        min_nll_drop=settings.gate_min_nll_drop,
        max_drift_kl=settings.gate_max_drift_kl,
        max_general_lost=settings.gate_max_general_lost,
        min_gap_closure=settings.gate_min_gap_closure,
        min_answer_agreement=settings.gate_min_answer_agreement,
    )


def distill_config(settings: Settings) -> DistillConfig:
    """Settings' `distill_*` knobs as training.distill's config. The probe template of the settings
    comes first, followed by the built-in phrasings (several questions per memory)."""
    templates = (settings.distill_probe_template,) + tuple(
        t for t in DEFAULT_PROBE_TEMPLATES if t != settings.distill_probe_template
    )
    return DistillConfig(
        epochs=settings.distill_epochs,
        learning_rate=settings.distill_learning_rate,
        topk=settings.distill_topk,
        student_retained_turns=settings.student_retained_turns,
        feedback_mix=settings.distill_feedback_mix,
        seed=settings.train_seed,
        time_budget_s=settings.train_time_budget_s,
        device=settings.device,
        probe_templates=templates,
        max_new_tokens=settings.distill_max_new_tokens,
        no_repeat_ngram_size=settings.distill_no_repeat_ngram_size,
        render=render_config(settings),
    )


def bake_config(settings: Settings) -> BakeConfig:
    """Settings' knobs of a bake (`distill_method = bake`)."""
    return BakeConfig(max_new_tokens=settings.distill_answer_tokens, render=render_config(settings))


def inference_device(settings: Settings) -> str:
    if settings.device != "auto":
        return settings.device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def embedded_vllm_config(settings: Settings) -> EmbeddedVllmConfig:
    """The co-located server's flags: LoRA on, rank/slots from Settings, float32 and a small KV
    cache on CPU, a bounded memory share (and sleep mode when asked) on a GPU."""
    device = inference_device(settings)
    return embedded_config_from_args(
        model=Path(settings.base_model),
        data_dir=Path(settings.data_dir),
        port=settings.vllm_port,
        python=settings.vllm_python,
        device="cuda" if device == "cuda" else "cpu",
        max_lora_rank=settings.vllm_max_lora_rank,
        max_loras=settings.vllm_max_loras,
        kv_cache_bytes=settings.vllm_kv_cache_bytes,
        gpu_memory_utilization=settings.vllm_gpu_memory_utilization,
        enable_sleep_mode=settings.vllm_sleep_for_training and device == "cuda",
        extra_args=settings.vllm_extra_args,
        max_model_len=settings.max_seq_len,
    )
