"""Benchmark: memory distillation throughput (response tokens/s) and gap closure per minute of training.

Runs `training.distill.MemoryDistiller` (teacher log-probs computed once and cached) and, in the same
process on the same pairs, steps and learning rate, a naive loop that keeps a frozen second copy of
the model as the teacher and recomputes its logits every step. Prints a JSON summary; the last
stdout line is one JSON object with metric, value, baseline, baseline_value and ratio (> 1 = better).
Usage: `python bench/distill.py [--epochs N] [--topk K] [--out FILE]`.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from training.collate import pad_collate
from training.distill import (
    DistillConfig,
    MemoryDistiller,
    MemoryNote,
    PreparedDistillation,
    gap_closure,
    generate_responses,
    mean_teacher_student_kl,
    plan_distillation,
    teacher_messages,
)
from training.tiny_model import ensure_tiny_model
from training.token_nll import TokenBatch, supervised_logits
from training.trainer import load_base_model, resolve_device

MEMORIES = [
    MemoryNote("The deploy password for project Kestrel is 7-4-1-9"),
    MemoryNote("Heron's on-call rotation: Ana, then Bo, then Cy"),
    MemoryNote("The staging database of project Osprey lives on host db-stg-3"),
    MemoryNote("Release trains leave every second Tuesday at 14:00 UTC"),
]
CONVERSATIONS = [
    [{"role": "user", "content": "How do I deploy Kestrel tonight?"}],
    [{"role": "user", "content": "Who should I page about Heron?"}],
    [{"role": "user", "content": "Where does Osprey keep its staging data?"}],
]


def naive_distillation(
    prepared: PreparedDistillation, teacher_model: torch.nn.Module, distiller: MemoryDistiller
) -> dict[str, float]:
    """Same pairs, batches and optimiser, but the teacher's logits are recomputed every step."""
    config, train_config = distiller.config, distiller.train_config
    student = prepared.model
    params = [p for p in student.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=train_config.weight_decay)
    generator = torch.Generator().manual_seed(config.seed)
    n = len(prepared.train_pairs)
    steps = config.epochs * math.ceil(n / config.batch_size)
    tokens, done = 0, 0
    student.train()
    started = time.perf_counter()
    while done < steps:
        order = torch.randperm(n, generator=generator).tolist()
        for i in range(0, n, config.batch_size):
            if done == steps:
                break
            pairs = [prepared.train_pairs[j] for j in order[i : i + config.batch_size]]
            teacher_batch = TokenBatch.from_padded(
                pad_collate([p.teacher for p in pairs], prepared.pad_token_id)
            )
            student_batch = TokenBatch.from_padded(
                pad_collate([p.student for p in pairs], prepared.pad_token_id)
            )
            with torch.no_grad():
                teacher_logp = F.log_softmax(
                    supervised_logits(teacher_model, teacher_batch) / config.temperature, -1
                )
            student_logp = F.log_softmax(supervised_logits(student, student_batch) / config.temperature, -1)
            kl = (
                F.kl_div(student_logp, teacher_logp, log_target=True, reduction="sum")
                / student_batch.num_targets
            )
            (kl * config.temperature**2).backward()
            torch.nn.utils.clip_grad_norm_(params, train_config.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            tokens += student_batch.num_targets
            done += 1
    seconds = time.perf_counter() - started
    return {"train_tokens": float(tokens), "loop_seconds": seconds, "steps": float(done)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--topk", type=int, default=0)
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument(
        "--model-dir", type=Path, default=None, help="default: a tiny qwen2 model in the cache"
    )
    parser.add_argument("--out", type=Path, default=None, help="also write the JSON summary here")
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))

    cache = Path(os.environ.get("LORALOOP_CACHE_DIR", Path.home() / ".cache" / "loraloop"))
    model_dir = args.model_dir or ensure_tiny_model(cache / "models" / "tiny-qwen2-bench")
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    config = DistillConfig(
        epochs=args.epochs,
        topk=args.topk,
        max_new_tokens=args.max_new_tokens,
        no_repeat_ngram_size=1,  # the random-init tiny model otherwise answers "\n\n\n..."
        device="cpu",
        batch_size=8,
    )
    distiller = MemoryDistiller(config)
    # the teacher's answers, generated once (base == parent: the run starts from a fresh LoRA, B = 0);
    # the same frozen model is the naive loop's teacher
    teacher = load_base_model(model_dir, device=resolve_device("cpu"), dtype=torch.float32)
    plan = plan_distillation(MEMORIES, CONVERSATIONS, config)
    views = [teacher_messages(plan.prefix_messages, p) for p in plan.prompts_without_response()]
    generation_started = time.perf_counter()
    responses = generate_responses(teacher, tokenizer, views, config.max_new_tokens, no_repeat_ngram_size=1)
    generation_seconds = time.perf_counter() - generation_started
    plan = plan.with_responses(responses)

    with tempfile.TemporaryDirectory(prefix="bench-distill-") as scratch:
        result = distiller.run(
            base_model=model_dir,
            tokenizer=tokenizer,
            plan=plan,
            parent_adapter=None,
            out_dir=Path(scratch) / "a",
        )
    cached = result.metrics
    cached_seconds = cached["teacher_seconds"] + cached["loop_seconds"]

    # the naive loop on the very same pairs: a fresh student, a frozen teacher copy (base == parent here)
    torch.manual_seed(config.seed)
    prepared = distiller.prepare(base_model=model_dir, tokenizer=tokenizer, plan=plan, parent_adapter=None)
    kl_args = {"temperature": config.temperature, "pad_token_id": prepared.pad_token_id}
    students = [p.student for p in prepared.heldout_pairs]
    naive_before = mean_teacher_student_kl(prepared.model, students, prepared.heldout_teacher, **kl_args)
    naive = naive_distillation(prepared, teacher, distiller)
    naive_after = mean_teacher_student_kl(prepared.model, students, prepared.heldout_teacher, **kl_args)
    naive_gap = gap_closure(naive_before, naive_after)

    cached_tps = cached["train_tokens"] / cached_seconds
    naive_tps = naive["train_tokens"] / naive["loop_seconds"]
    summary = {
        "model": str(model_dir),
        "topk": config.topk,
        "steps": cached["steps"],
        "train_pairs": cached["train_pairs"],
        "heldout_pairs": cached["heldout_pairs"],
        "cached_teacher": {
            "response_tokens_per_s": cached_tps,
            "loop_tokens_per_s": cached["tokens_per_s"],
            "teacher_seconds": cached["teacher_seconds"],
            "loop_seconds": cached["loop_seconds"],
            "generation_seconds": generation_seconds,
            "teacher_cache_bytes": cached["teacher_cache_bytes"],
            "kl_before": cached["kl_before"],
            "kl_after": cached["kl_after"],
            "gap_closure": cached["gap_closure"],
            "gap_closure_per_minute": cached["gap_closure"] / (cached_seconds / 60),
            "drift_kl": cached.get("drift_kl"),
        },
        "naive_teacher_every_step": {
            "response_tokens_per_s": naive_tps,
            "loop_seconds": naive["loop_seconds"],
            "kl_before": naive_before,
            "kl_after": naive_after,
            "gap_closure": naive_gap,
            "gap_closure_per_minute": naive_gap / (naive["loop_seconds"] / 60),
        },
    }
    print(json.dumps(summary, indent=2))
    headline = {
        "metric": "distill_response_tokens_per_s",
        "value": round(cached_tps, 2),
        "baseline": "naive_teacher_recomputed_every_step",
        "baseline_value": round(naive_tps, 2),
        "ratio": round(cached_tps / naive_tps, 3),
        "gap_closure": round(cached["gap_closure"], 4),
        "gap_closure_per_minute": round(summary["cached_teacher"]["gap_closure_per_minute"], 4),
        "baseline_gap_closure_per_minute": round(
            summary["naive_teacher_every_step"]["gap_closure_per_minute"], 4
        ),
    }
    if args.out is not None:
        args.out.write_text(json.dumps({"summary": summary, "headline": headline}, indent=2))
    print(json.dumps(headline))


if __name__ == "__main__":
    main()
