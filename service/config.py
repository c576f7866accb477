"""The one configuration object of loraloop.

`Settings` reads environment variables prefixed `LORALOOP_` (and a `.env` file), checks unsafe
values at start-up, and is passed explicitly to every component that needs it. Code below the
service layer (training/, deploy/) never sees `Settings`: it gets small config dataclasses,
so those layers stay importable on their own.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

SCOPES = ("feedback:write", "feedback:read", "adapters:read", "adapters:write", "inference", "admin")


def _default_base_model() -> Path:
    from training.pretrained import DEFAULT_MODEL, models_root

    return models_root() / DEFAULT_MODEL


def default_base_model() -> Path:
    """Where the default base model (SmolLM2-135M-Instruct) lives once fetched."""
    return _default_base_model()


class Settings(BaseSettings):
    """Every knob of the daemon. Env var = `LORALOOP_` + field name in upper case."""

    model_config = SettingsConfigDict(env_prefix="LORALOOP_", env_file=".env", extra="ignore")

    # --- storage -------------------------------------------------------------------------------
    database_url: str = "sqlite:///./var/loraloop.db"
    data_dir: Path = Path("./var")
    db_pool_size: int = Field(5, ge=1)
    db_connect_timeout_s: float = Field(5.0, gt=0)
    # POST /feedback(:batch): one writer thread commits the items of all requests in flight in one
    # transaction (service.ingest.writer); false: one transaction per request
    feedback_group_commit: bool = True

    # --- HTTP service ------------------------------------------------------------------------------
    host: str = "127.0.0.1"
    port: int = Field(8080, ge=0, le=65535)
    max_body_bytes: int = Field(4 * 1024 * 1024, ge=1024)
    max_batch_items: int = Field(1000, ge=1)
    max_messages: int = Field(512, ge=1)
    cors_origins: Annotated[list[str], NoDecode] = Field(default_factory=list)
    auth_disabled: bool = False
    # comma-separated `TOKEN=scope scope [ns:PATTERN] [label:NAME]` entries; TOKEN may be
    # `sha256:<hex>` (stored hashed). service.api.auth documents the format.
    auth_tokens: str = ""
    # more entries, one per line, digests only; re-read when it changes (rotation without restart)
    auth_tokens_file: Path | None = None
    # the dashboard's (/ui) session cookies are signed with this secret (empty: one generated per
    # process, so a restart logs operators out) and expire after `dashboard_session_ttl_s`
    dashboard_session_secret: str = Field("", repr=False)
    dashboard_session_ttl_s: int = Field(8 * 3600, ge=60, le=30 * 86400)
    # a client (by address) that fails `dashboard_login_max_failures` logins within
    # `dashboard_login_window_s` seconds is refused (429) until its oldest failure leaves the window
    dashboard_login_max_failures: int = Field(10, ge=1)
    dashboard_login_window_s: int = Field(300, ge=1)
    default_namespace: str = "default"

    # --- model / rendering -----------------------------------------------------------------------
    # the real pretrained default (fetched into the offline cache on first use: training.pretrained)
    base_model: Path = Field(default_factory=lambda: _default_base_model())
    tokenizer: Path | None = None  # defaults to base_model
    tiny_tokenizer_family: str = "qwen2"  # tokenizer the demo's tiny model is built with
    max_seq_len: int = Field(1024, ge=16)
    max_continuation_tokens: int = Field(512, ge=1)

    # --- online training ---------------------------------------------------------------------------
    train_trigger_count: int = Field(16, ge=1)  # N new feedback items start a run ...
    train_debounce_s: float = Field(2.0, ge=0)  # ... or T seconds after the last one
    train_max_items: int = Field(256, ge=1)  # new items per run; the rest go to the follow-up run
    replay_ratio: float = Field(0.5, ge=0)  # replayed old items per new item
    replay_max_items: int = Field(64, ge=0)
    lora_rank: int = Field(8, ge=1)
    lora_alpha: int = Field(16, ge=1)
    lora_dropout: float = Field(0.0, ge=0, lt=1)
    lora_target_modules: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )
    # The online recipe, chosen on SmolLM2-135M-Instruct with bench/learning.py (README "Learning"):
    # train until greedy decoding reproduces every new target (+ learnt_extra_steps), at most
    # train_epochs passes (or max_steps), with a KL term to the base model on built-in anchor prompts.
    learning_rate: float = Field(1e-3, gt=0)
    train_epochs: int = Field(40, ge=1)
    max_steps: int = Field(0, ge=0)  # 0 = derived from epochs
    stop_when_learnt: bool = True
    learnt_extra_steps: int = Field(2, ge=0)
    anchor_weight: float = Field(4.0, ge=0)  # 0 = no KL anchor
    anchor_topk: int = Field(64, ge=1)
    anchor_reference: Literal["base", "parent"] = "base"  # whose answers the anchor KL keeps (README)
    anchors_per_step: int = Field(16, ge=1)
    augment_questions: bool = True  # also train each question in a few fixed frames (training/augment.py)
    augment_max_items: int = Field(8, ge=0)  # ... in runs of at most this many new items (step cost)
    report_max_items: int = Field(8, ge=0)  # taught items in a version's behaviour report
    batch_tokens: int = Field(4096, ge=16)
    grad_accum_steps: int = Field(1, ge=1)
    gradient_checkpointing: bool = False
    train_seed: int = 0
    train_time_budget_s: float = Field(600.0, gt=0)
    device: Literal["auto", "cpu", "cuda"] = "auto"

    # --- evaluation gate ---------------------------------------------------------------------------
    gate_min_nll_drop: float = Field(0.05, ge=0)  # relative drop of feedback NLL required
    gate_max_drift_kl: float = Field(0.5, ge=0)  # mean KL(parent || new) on probes
    # general probe answers (of 10) the parent got right that a version may lose: one, because on the
    # 135M default model a borderline answer moves with almost any update (README "Learning")
    gate_max_general_lost: int = Field(1, ge=0)

    # --- job queue / worker ------------------------------------------------------------------------
    worker_enabled: bool = True  # `serve` runs the worker in-process
    worker_poll_s: float = Field(0.5, gt=0)
    # load the base model, its anchor answers and anchor references when the worker starts, so the
    # first update after a start costs what later ones do
    worker_warm_start: bool = True
    job_lease_s: float = Field(60.0, gt=0)
    job_heartbeat_s: float = Field(10.0, gt=0)
    job_max_attempts: int = Field(3, ge=1)

    # --- memory distillation -----------------------------------------------------------------------
    distill_cron: str = "0 3 * * *"
    distill_timezone: str = "UTC"
    distill_cron_overrides: str = ""  # `ns=cron expr;ns2=cron expr`
    distill_enabled: bool = True
    student_retained_turns: int = Field(0, ge=0)
    distill_topk: int = Field(0, ge=0)  # 0 = full vocabulary KL
    distill_feedback_mix: float = Field(0.0, ge=0)
    distill_epochs: int = Field(30, ge=1)
    distill_learning_rate: float = Field(2e-3, gt=0)
    distill_probe_template: str = "What do you know about {topic}?"
    distill_max_new_tokens: int = Field(64, ge=1)  # teacher responses generated for probe prompts
    distill_no_repeat_ngram_size: int = Field(0, ge=0)  # > 0 only for degenerate (random-init) models
    gate_min_gap_closure: float = Field(0.3, ge=0, le=1)
    # bake = the online recipe trained on the teacher's answers, judged by answers (training.bake);
    # kl = the earlier KL(teacher || student) distillation (training.distill)
    distill_method: Literal["bake", "kl"] = "bake"
    distill_answer_tokens: int = Field(40, ge=1)  # teacher / parent / candidate answers of a bake
    distill_replay_memories: int = Field(8, ge=0)  # memories baked earlier, replayed (never retired ones)
    distill_replay_items: int = Field(16, ge=0)  # trained feedback items replayed by a bake
    # held-out bake questions whose student answer carries the teacher's key content
    gate_min_answer_agreement: float = Field(0.6, ge=0, le=1)
    # the oldest active memories first; the rest are baked by the next run
    distill_max_memories: int = Field(256, ge=1)

    # --- retention (loraloop db prune, and the daemon every retention_interval_s) -------------------
    retention_enabled: bool = True
    retention_interval_s: float = Field(3600.0, gt=0)
    # proxied conversation logs: older than N days, or beyond the newest N per namespace, are
    # deleted unless a feedback item points at them (0 = no limit). Feedback is never deleted.
    retention_conversation_max_age_days: float = Field(30.0, ge=0)
    retention_conversation_max_per_namespace: int = Field(100_000, ge=0)
    # adapter version folders: besides the current version, v0, pinned and serving versions, keep
    # the current's N most recent ancestors and the N newest retired versions (rollback targets);
    # other retired/rejected/failed versions lose their weights once retired for the grace period
    # (their rows and metrics stay as tombstones)
    retention_keep_versions: int = Field(5, ge=1)
    retention_version_grace_days: float = Field(7.0, ge=0)

    # --- vLLM / hot-swap ---------------------------------------------------------------------------
    # comma-separated base URLs; empty = none; `embedded` = start one
    vllm_urls: Annotated[list[str], NoDecode] = Field(default_factory=list)
    vllm_max_loras: int = Field(4, ge=1)
    vllm_max_lora_rank: int = Field(16, ge=1)
    vllm_timeout_s: float = Field(30.0, gt=0)
    vllm_retries: int = Field(3, ge=0)
    # interpreter for the embedded vLLM; empty = `.venv-vllm/bin/python` next to this venv when it
    # exists (deploy/install_vllm_cpu.sh), else this one (deploy.embedded.resolve_vllm_python)
    vllm_python: str = ""
    vllm_port: int = Field(8000, ge=0, le=65535)
    vllm_kv_cache_bytes: int = Field(64 * 1024 * 1024, ge=1)
    vllm_extra_args: str = ""
    vllm_gpu_memory_utilization: float = Field(0.5, gt=0, le=1)
    vllm_sleep_for_training: bool = False
    swap_drain_s: float = Field(10.0, ge=0)
    reconcile_interval_s: float = Field(15.0, gt=0)
    # OpenAI-compatible proxy (/v1/*): generation can take long, connecting must not
    inference_timeout_s: float = Field(300.0, gt=0)
    inference_connect_timeout_s: float = Field(2.0, gt=0)
    alias_cache_ttl_s: float = Field(1.0, ge=0)  # keep well below swap_drain_s

    # --- logging -----------------------------------------------------------------------------------
    log_level: str = "INFO"
    log_json: bool = False

    @field_validator("vllm_urls", "lora_target_modules", "cors_origins", mode="before")
    @classmethod
    def _split_commas(cls, value: object) -> object:
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @model_validator(mode="after")
    def _fail_fast_on_unsafe_values(self) -> Settings:
        if not self.auth_disabled and not self.auth_tokens.strip() and self.auth_tokens_file is None:
            raise ValueError(
                "LORALOOP_AUTH_TOKENS is empty: set tokens (`TOKEN=scope scope,...`), "
                "LORALOOP_AUTH_TOKENS_FILE, or LORALOOP_AUTH_DISABLED=true for local use"
            )
        if self.lora_rank > self.vllm_max_lora_rank:
            raise ValueError(
                f"LORALOOP_LORA_RANK={self.lora_rank} exceeds LORALOOP_VLLM_MAX_LORA_RANK="
                f"{self.vllm_max_lora_rank}: vLLM could not load the adapters"
            )
        return self

    # --- derived paths -----------------------------------------------------------------------------
    @property
    def adapters_dir(self) -> Path:
        return self.data_dir / "adapters"

    @property
    def tokenizer_path(self) -> Path:
        return self.tokenizer or self.base_model
