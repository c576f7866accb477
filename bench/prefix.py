"""One anchored training step's decoder work with the shared prefix run once, against every row in full.

Every chat row the online recipe trains on opens with its template's system prompt; the anchor KL
batches (16 of the built-in anchor prompts with the base model's own answers) are most of a step's
tokens. On the real model (the default, or --model), with a non-zero LoRA on every projection: the
forward and backward of those batches' supervised logits, timed with the prefix run once
(`training.token_nll`, the default) and with `MIN_SHARED_PREFIX` out of reach (every row in full),
the two alternating over the batches so background load hits both alike. Checks first that both
give the same logits (largest difference printed).

Prints one line per mode, then the comparison as the last line:
{"metric", "value", "baseline", "baseline_value", "ratio"} (anchor rows per second; ratio > 1 = faster).

    .venv/bin/python bench/prefix.py [--batches 4] [--repeats 2] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from training import token_nll
from training.learning_eval import LearningHarness
from training.model_loading import attach_lora
from training.pretrained import model_dir
from training.token_nll import batches_from_groups, shared_prefix_length, supervised_logits
from training.trainer import TrainConfig


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=None, help="model folder (default: the real default model)")
    parser.add_argument("--batches", type=int, default=4, help="anchor batches timed per repeat")
    parser.add_argument("--per-batch", type=int, default=16, help="anchors per batch (the default recipe's 16)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    harness = LearningHarness(args.model or model_dir(), device="cpu")
    anchors = harness.anchors()
    size = args.per_batch
    groups = [anchors[i : i + size] for i in range(0, len(anchors), size)][: args.batches]
    batches = batches_from_groups(groups, pad_token_id=0)
    full_threshold = 10**9
    shared_threshold = token_nll.MIN_SHARED_PREFIX
    seconds: dict[str, list[float]] = {"shared": [], "full": []}
    with harness.resident.lend() as holder:
        model = holder.model = attach_lora(holder.model, None, TrainConfig().lora_config())
        generator = torch.Generator().manual_seed(0)
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.data.normal_(0.0, 0.01, generator=generator)

        def step(batch: token_nll.TokenBatch, mode: str) -> tuple[float, torch.Tensor]:
            token_nll.MIN_SHARED_PREFIX = shared_threshold if mode == "shared" else full_threshold
            model.zero_grad()
            started = time.perf_counter()
            logits = supervised_logits(model, batch)
            (logits.logsumexp(-1) - logits[:, 0]).mean().backward()
            return time.perf_counter() - started, logits.detach()

        try:
            largest = float((step(batches[0], "shared")[1] - step(batches[0], "full")[1]).abs().max())
            for repeat in range(args.repeats):
                for batch in batches:
                    order = ("shared", "full") if repeat % 2 == 0 else ("full", "shared")
                    for mode in order:
                        seconds[mode].append(step(batch, mode)[0])
        finally:
            token_nll.MIN_SHARED_PREFIX = shared_threshold
    rows = sum(len(group) for group in groups)
    prefixes = [shared_prefix_length(batch) for batch in batches]
    rates = {}
    for mode, values in seconds.items():
        rates[mode] = rows * args.repeats / sum(values)
        print(json.dumps({"mode": mode, "rows_per_s": round(rates[mode], 2),
                          "median_batch_s": round(statistics.median(values), 3),
                          "shared_prefix_tokens": prefixes if mode == "shared" else [0] * len(prefixes),
                          "max_logit_difference": largest}), flush=True)
    print(json.dumps({"metric": "anchor_rows_per_s_shared_prefix", "value": round(rates["shared"], 2),
                      "baseline": "anchor_rows_per_s_every_row_in_full", "baseline_value": round(rates["full"], 2),
                      "ratio": round(rates["shared"] / rates["full"], 3)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
