"""Learning quality of loraloop's online recipe against plain completion-only SFT, on the real model.

On bench/data/learning_dev.json (facts SmolLM2-135M-Instruct does not know, rephrasings never
trained on, general questions the base answers right), for each case size: loraloop's default
recipe (Settings defaults: KL anchor to the base model, framed question variants, stop once every
target is reproduced) and the naive baseline (plain completion-only SFT: same LoRA, same learning
rate, the same number of steps, no anchor, no variants). Prints a
table row per case and recipe, then one JSON line: value = loraloop's mean of exact / rephrased /
general accuracy over the cases, baseline = the naive recipe's, ratio = value / baseline.

    .venv/bin/python bench/learning.py [--items 1,3,16]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from service.component_configs import train_config
from service.config import Settings
from training.learning_eval import LearningHarness, load_fact_set
from training.pretrained import model_dir

DEV_SET = Path(__file__).parent / "data" / "learning_dev.json"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--items", default="1,3,16", help="comma-separated case sizes (facts per update)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    facts, general = load_fact_set(DEV_SET)
    harness = LearningHarness(model_dir(), device="cpu")
    general = harness.base_right(general)
    recipe = dataclasses.replace(train_config(Settings(auth_disabled=True, device="cpu")), device="cpu")
    scores: dict[str, list[float]] = {"loraloop": [], "naive": []}
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        for size in [int(part) for part in args.items.split(",")]:
            case = facts[:size]
            ours = harness.update(recipe, case, out_dir=Path(scratch) / f"ours-{size}", general=general)
            naive_config = dataclasses.replace(recipe, anchor_weight=0.0, stop_when_learnt=False,
                                               max_steps=ours.steps)
            naive = harness.update(naive_config, case, out_dir=Path(scratch) / f"naive-{size}", general=general,
                                   augment=False)
            for name, score in (("loraloop", ours), ("naive", naive)):
                row = {"items": size, "recipe": name, **score.row()}
                rows.append(row)
                print(json.dumps(row), flush=True)
                scores[name].append((score.exact / score.exact_total + score.rephrased / score.rephrased_total
                                     + score.general / score.general_total) / 3)
    print("| items | recipe | exact | rephrased | general | drift_kl | train s | steps |")
    print("|---|---|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['items']} | {row['recipe']} | {row['exact']} | {row['rephrased']} | {row['general']} | "
              f"{row['drift_kl']} | {row['train_s']} | {row['steps']} |")
    value = sum(scores["loraloop"]) / len(scores["loraloop"])
    baseline = sum(scores["naive"]) / len(scores["naive"])
    print(json.dumps({"metric": "learning_accuracy_mean", "value": round(value, 4), "baseline": "naive_sft_same_steps",
                      "baseline_value": round(baseline, 4), "ratio": round(value / baseline, 4) if baseline else None,
                      "items": args.items, "general_questions": len(general)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
