"""Training throughput of loraloop's LoraTrainer against TRL's SFTTrainer (completion-only loss).

Same base model, same rendered examples (chat conversations whose last assistant turn is the target),
same LoRA config, optimizer, learning rate and epochs (so the same target tokens; TRL batches a fixed
number of examples, loraloop a token budget of the same average size), in the same process; each trainer
gets a warm-up run first and the timed runs alternate. Reported: supervised (target) tokens per second
of the training loop and seconds per optimizer step; end-to-end seconds (load + train + save) as context.
Last stdout line: one JSON object with metric, value, baseline, baseline_value, ratio (> 1 = faster).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from training.render import Example, RenderConfig, render_example
from training.trainer import LoraTrainer, TrainConfig, resolve_device, resolve_dtype

WORDS = [
    "the",
    "quick",
    "brown",
    "fox",
    "jumps",
    "over",
    "lazy",
    "dog",
    "while",
    "seven",
    "engineers",
    "review",
    "a",
    "deployment",
    "plan",
    "for",
    "the",
    "database",
    "migration",
    "and",
    "the",
    "adapter",
    "registry",
    "keeps",
    "every",
    "version",
    "immutable",
    "so",
    "rollback",
    "stays",
    "cheap",
    "when",
    "latency",
    "rises",
    "we",
    "measure",
    "tokens",
    "per",
    "second",
    "and",
    "memory",
    "before",
    "shipping",
    "any",
    "change",
    "to",
    "production",
    "customers",
    "asked",
    "about",
    "invoices",
    "refunds",
    "shipping",
    "delays",
    "passwords",
    "and",
    "the",
    "new",
    "pricing",
    "tiers",
]


def synthetic_items(count: int, seed: int) -> list[dict[str, Any]]:
    """Feedback items in the POST /feedback shape with varied context and continuation lengths."""
    rng = random.Random(seed)

    def sentence(low: int, high: int) -> str:
        return " ".join(rng.choice(WORDS) for _ in range(rng.randint(low, high))).capitalize() + "."

    items = []
    for _ in range(count):
        messages = [{"role": "system", "content": sentence(8, 30)}]
        for _ in range(rng.randint(1, 4)):
            messages.append({"role": "user", "content": sentence(5, 60)})
            messages.append({"role": "assistant", "content": sentence(5, 60)})
        messages.append({"role": "user", "content": sentence(5, 40)})
        items.append({"messages": messages, "continuation": sentence(8, 60)})
    return items


def default_model_dir() -> Path:
    from training.tiny_model import ensure_tiny_model

    cache = Path(os.environ.get("LORALOOP_CACHE_DIR", Path.home() / ".cache" / "loraloop"))
    return ensure_tiny_model(cache / "models" / "tiny-qwen2", family="qwen2")


def run_loraloop(model_dir: Path, examples: list[Example], config: TrainConfig) -> dict[str, float]:
    with tempfile.TemporaryDirectory(prefix="bench-loraloop-") as scratch:
        started = time.perf_counter()
        result = LoraTrainer(config).train(
            base_model=model_dir, examples=examples, out_dir=Path(scratch) / "out"
        )
        end_to_end = time.perf_counter() - started
    metrics = result.metrics
    return {
        "steps": metrics["steps"],
        "target_tokens": metrics["train_tokens"],
        "loop_seconds": metrics["loop_seconds"],
        "setup_seconds": metrics["setup_seconds"],
        "save_seconds": metrics["save_seconds"],
        "end_to_end_seconds": end_to_end,
        "final_loss": metrics["final_loss"],
    }


def run_trl(
    model_dir: Path, examples: list[Example], config: TrainConfig, batch_size: int
) -> dict[str, float]:
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    device = resolve_device(config.device)
    dtype = resolve_dtype(config.dtype, device)
    rows = [
        {"input_ids": e.input_ids, "completion_mask": [int(label != -100) for label in e.labels]}
        for e in examples
    ]
    with tempfile.TemporaryDirectory(prefix="bench-trl-") as scratch:
        started = time.perf_counter()
        tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype)
        args = SFTConfig(
            output_dir=scratch,
            completion_only_loss=True,
            max_length=None,
            per_device_train_batch_size=batch_size,
            gradient_accumulation_steps=config.grad_accum_steps,
            num_train_epochs=config.epochs,
            learning_rate=config.lr,
            lr_scheduler_type="constant",
            warmup_steps=0,
            weight_decay=config.weight_decay,
            max_grad_norm=config.max_grad_norm,
            optim="adamw_torch",
            seed=config.seed,
            train_sampling_strategy="group_by_length",
            use_cpu=device.type == "cpu",
            bf16=dtype == torch.bfloat16,
            gradient_checkpointing=config.gradient_checkpointing,
            logging_strategy="no",
            save_strategy="no",
            report_to="none",
            disable_tqdm=True,
            dataloader_num_workers=0,
        )
        trainer = SFTTrainer(
            model=model,
            args=args,
            train_dataset=Dataset.from_list(rows),
            processing_class=tokenizer,
            peft_config=config.lora_config(model_dir),
        )
        loop_started = time.perf_counter()
        output = trainer.train()
        loop_seconds = time.perf_counter() - loop_started
        trainer.save_model(str(Path(scratch) / "adapter"))
        end_to_end = time.perf_counter() - started
        steps = float(trainer.state.global_step)
        del trainer, model
    return {
        "steps": steps,
        # whole epochs over a dataset whose size is a multiple of the batch size: every example once per epoch
        "target_tokens": float(config.epochs * sum(e.num_target_tokens for e in examples)),
        "loop_seconds": loop_seconds,
        "end_to_end_seconds": end_to_end,
        "final_loss": float(output.training_loss),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--model", type=Path, default=None, help="base model folder (default: the tiny qwen2)"
    )
    parser.add_argument("--items", type=int, default=8, help="feedback items rendered as training data")
    parser.add_argument("--epochs", type=int, default=1, help="passes over the examples, both trainers")
    parser.add_argument(
        "--batch-size", type=int, default=4, help="examples per step (TRL); loraloop: as many tokens"
    )
    parser.add_argument("--repeats", type=int, default=1, help="timed runs per trainer (median reported)")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument(
        "--threads", type=int, default=None, help="torch CPU threads (default: as configured)"
    )
    args = parser.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    model_dir = args.model or default_model_dir()
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    rendered = (render_example(tokenizer, item, RenderConfig()) for item in synthetic_items(args.items, 0))
    examples = [example for example in rendered if example is not None]
    examples = examples[: len(examples) - len(examples) % args.batch_size]
    lengths = sorted(len(e.input_ids) for e in examples)
    # loraloop batches by a token budget: give it the padded size of an average TRL batch
    batch_tokens = int(statistics.mean(lengths) * args.batch_size)
    common = {"lr": 2e-4, "batch_tokens": batch_tokens, "device": args.device, "seed": 0}
    config = TrainConfig(epochs=args.epochs, **common)
    warmup = TrainConfig(epochs=1, **common)
    # warm-up (first-call costs: imports, allocator, kernels) on the shortest examples: TRL is slow on CPU
    warmup_examples = sorted(examples, key=lambda e: len(e.input_ids))[: args.batch_size]

    print(
        f"model {model_dir} | device {resolve_device(args.device)} | torch threads {torch.get_num_threads()} | "
        f"{len(examples)} examples x {args.epochs} epochs | tokens/example min {lengths[0]} "
        f"median {lengths[len(lengths) // 2]} max {lengths[-1]} | target tokens/example "
        f"{statistics.mean(e.num_target_tokens for e in examples):.1f}"
    )
    results: dict[str, list[dict[str, float]]] = {"loraloop": [], "trl": []}
    run_loraloop(model_dir, warmup_examples, warmup)
    run_trl(model_dir, warmup_examples, warmup, args.batch_size)
    for _ in range(args.repeats):  # interleaved, so load on a shared machine hits both alike
        results["loraloop"].append(run_loraloop(model_dir, examples, config))
        results["trl"].append(run_trl(model_dir, examples, config, args.batch_size))

    summary = {}
    for name, runs in results.items():
        loop = statistics.median(r["loop_seconds"] for r in runs)
        tokens = runs[0]["target_tokens"]
        summary[name] = {
            "target_tokens_per_s": tokens / loop,
            "step_seconds": loop / runs[0]["steps"],
            "steps": runs[0]["steps"],
            "loop_seconds": loop,
            "end_to_end_seconds": statistics.median(r["end_to_end_seconds"] for r in runs),
            "final_loss": runs[-1]["final_loss"],
        }
        extra = {
            k: statistics.median(r[k] for r in runs)
            for k in ("setup_seconds", "save_seconds")
            if k in runs[0]
        }
        summary[name].update(extra)
        print(f"{name:9s} " + " ".join(f"{k}={v:.4g}" for k, v in summary[name].items()))
    if results["loraloop"][0]["target_tokens"] != results["trl"][0]["target_tokens"]:
        raise AssertionError("the two trainers did not see the same target tokens")
    value = summary["loraloop"]["target_tokens_per_s"]
    baseline_value = summary["trl"]["target_tokens_per_s"]
    print(
        json.dumps(
            {
                "metric": "train_target_tokens_per_s",
                "value": round(value, 2),
                "baseline": "trl_sft_trainer_completion_only",
                "baseline_value": round(baseline_value, 2),
                "ratio": round(value / baseline_value, 3),
                "step_seconds": round(summary["loraloop"]["step_seconds"], 4),
                "baseline_step_seconds": round(summary["trl"]["step_seconds"], 4),
                "end_to_end_ratio": round(
                    summary["trl"]["end_to_end_seconds"] / summary["loraloop"]["end_to_end_seconds"], 3
                ),
                "device": str(resolve_device(args.device)),
            }
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
