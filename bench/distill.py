"""Benchmark: memory distillation throughput (response tokens/s) and gap closure per minute of training.

Trains with `training.distill.MemoryDistiller` (teacher distributions computed once and cached) and,
in lockstep in the same process (same pairs, batch order, steps and learning rate, so both see the same
machine load), a naive loop that keeps a frozen second copy of the model as the teacher and recomputes
its logits every step. Throughput counts the cache build. Prints a JSON summary; the last
stdout line is one JSON object with metric, value, baseline, baseline_value and ratio (> 1 = better).
Usage: `python bench/distill.py [--epochs N] [--topk K] [--out FILE]`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
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
from training.tiny_model import build_tiny_model, ensure_tiny_model
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


class NaiveLoop:
    """The baseline: same pairs, batch order, optimiser and loss, but a frozen teacher copy's logits
    are recomputed every step (what a straightforward implementation does)."""

    def __init__(self, prepared: PreparedDistillation, teacher: torch.nn.Module, distiller: MemoryDistiller):
        self.prepared, self.teacher, self.config = prepared, teacher, distiller.config
        self.params = [p for p in prepared.model.parameters() if p.requires_grad]
        train_config = distiller.train_config
        self.max_grad_norm = train_config.max_grad_norm
        self.optimizer = torch.optim.AdamW(
            self.params, lr=self.config.learning_rate, weight_decay=train_config.weight_decay
        )
        self.generator = torch.Generator().manual_seed(self.config.seed)  # same order as the recipe
        self.batches: list[list[int]] = []
        self.seconds = 0.0
        self.tokens = 0

    def step(self) -> None:
        started = time.perf_counter()
        n, size = len(self.prepared.train_pairs), self.config.batch_size
        if not self.batches:
            order = torch.randperm(n, generator=self.generator).tolist()
            self.batches = [order[i : i + size] for i in range(0, n, size)]
        pairs = [self.prepared.train_pairs[j] for j in self.batches.pop(0)]
        pad = self.prepared.pad_token_id
        teacher_batch = TokenBatch.from_padded(pad_collate([p.teacher for p in pairs], pad))
        student_batch = TokenBatch.from_padded(pad_collate([p.student for p in pairs], pad))
        t = self.config.temperature
        self.prepared.model.train()
        with torch.no_grad():
            teacher_logp = F.log_softmax(supervised_logits(self.teacher, teacher_batch) / t, -1)
        student_logp = F.log_softmax(supervised_logits(self.prepared.model, student_batch) / t, -1)
        kl = (
            F.kl_div(student_logp, teacher_logp, log_target=True, reduction="sum") / student_batch.num_targets
        )
        (kl * t**2).backward()
        torch.nn.utils.clip_grad_norm_(self.params, self.max_grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.tokens += student_batch.num_targets
        self.seconds += time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--topk", type=int, default=0)
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument(
        "--model-dir", type=Path, default=None, help="default: a tiny qwen2 model in the cache"
    )
    parser.add_argument(
        "--hidden-size", type=int, default=64, help="of the built model (64 = the test model)"
    )
    parser.add_argument("--layers", type=int, default=2, help="of the built model")
    parser.add_argument(
        "--background-notes",
        type=int,
        default=0,
        help="extra facts in one more memory: a longer prefix, as real memory sets are",
    )
    parser.add_argument("--out", type=Path, default=None, help="also write the JSON summary here")
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))

    cache = Path(os.environ.get("LORALOOP_CACHE_DIR", Path.home() / ".cache" / "loraloop"))
    if args.model_dir is not None:
        model_dir = args.model_dir
    elif (args.hidden_size, args.layers) == (64, 2):
        model_dir = ensure_tiny_model(cache / "models" / "tiny-qwen2-bench")
    else:  # a bigger random model: the teacher's forward weighs more against the vocabulary softmax
        model_dir = cache / "models" / f"qwen2-h{args.hidden_size}-l{args.layers}-bench"
        if not (model_dir / "config.json").is_file():
            build_tiny_model(
                model_dir,
                hidden_size=args.hidden_size,
                num_layers=args.layers,
                intermediate_size=3 * args.hidden_size,
            )
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
    memories = list(MEMORIES)
    if args.background_notes:
        facts = [
            f"Service s{i} listens on port {8000 + i}, is owned by team t{i % 7} and pages {i % 5} people."
            for i in range(args.background_notes)
        ]
        memories.append(MemoryNote("\n".join(facts), topic="the service inventory"))
    plan = plan_distillation(memories, CONVERSATIONS, config)
    views = [teacher_messages(plan.prefix_messages, p) for p in plan.prompts_without_response()]
    generation_started = time.perf_counter()
    responses = generate_responses(teacher, tokenizer, views, config.max_new_tokens, no_repeat_ngram_size=1)
    generation_seconds = time.perf_counter() - generation_started
    plan = plan.with_responses(responses)

    # two identical students (same seed: same LoRA init, same batch order); the recipe trains one and,
    # after each of its steps, the naive loop takes the same step on the other: both are timed under
    # the same machine load (this machine's 2 cores are shared)
    torch.manual_seed(config.seed)
    cached = distiller.prepare(base_model=model_dir, tokenizer=tokenizer, plan=plan, parent_adapter=None)
    torch.manual_seed(config.seed)
    naive_prepared = distiller.prepare(
        base_model=model_dir, tokenizer=tokenizer, plan=plan, parent_adapter=None
    )
    naive = NaiveLoop(naive_prepared, teacher, distiller)
    heldout = [p.student for p in cached.heldout_pairs]
    kl_args = {"temperature": config.temperature, "pad_token_id": cached.pad_token_id}

    def heldout_kl(prepared: PreparedDistillation) -> float:
        return mean_teacher_student_kl(prepared.model, heldout, cached.heldout_teacher, **kl_args)

    kl_before = heldout_kl(cached)
    loop = distiller.train_student(cached, on_progress=lambda progress: naive.step())
    cached_loop_seconds = loop.metrics["loop_seconds"] - naive.seconds
    cached_seconds = cached.stats["teacher_seconds"] + cached_loop_seconds
    cached_gap = gap_closure(kl_before, heldout_kl(cached))
    naive_gap = gap_closure(kl_before, heldout_kl(naive_prepared))
    cached_tps = loop.metrics["train_tokens"] / cached_seconds
    naive_tps = naive.tokens / naive.seconds
    summary = {
        "model": str(model_dir),
        "hidden_size": args.hidden_size,
        "layers": args.layers,
        "background_notes": args.background_notes,
        "prefix_tokens": len(
            tokenizer(
                tokenizer.apply_chat_template(list(plan.prefix_messages), tokenize=False),
                add_special_tokens=False,
            )["input_ids"]
        ),
        "topk": config.topk,
        "steps": loop.metrics["steps"],
        "train_pairs": len(cached.train_pairs),
        "heldout_pairs": len(cached.heldout_pairs),
        "generation_seconds": generation_seconds,
        "kl_before": kl_before,
        "cached_teacher": {
            "response_tokens_per_s": cached_tps,
            "loop_tokens_per_s": loop.metrics["train_tokens"] / cached_loop_seconds,
            "teacher_cache_seconds": cached.stats["teacher_seconds"],
            "loop_seconds": cached_loop_seconds,
            "teacher_cache_bytes": sum(t.nbytes for t in (*cached.train_teacher, *cached.heldout_teacher)),
            "gap_closure": cached_gap,
            "gap_closure_per_minute": cached_gap / (cached_seconds / 60),
        },
        "naive_teacher_every_step": {
            "response_tokens_per_s": naive_tps,
            "loop_seconds": naive.seconds,
            "gap_closure": naive_gap,
            "gap_closure_per_minute": naive_gap / (naive.seconds / 60),
        },
    }
    print(json.dumps(summary, indent=2))
    headline = {
        "metric": "distill_response_tokens_per_s",
        "value": round(cached_tps, 2),
        "baseline": "naive_teacher_recomputed_every_step",
        "baseline_value": round(naive_tps, 2),
        "ratio": round(cached_tps / naive_tps, 3),
        "gap_closure": round(cached_gap, 4),
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
