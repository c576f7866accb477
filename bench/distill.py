"""Benchmark: memory baking on the real model, judged by answers, against the naive baseline.

On bench/data/bake_dev.json (memories SmolLM2-135M-Instruct cannot know, questions phrased unlike
the memory text, the key content of a right answer) and the general questions of
bench/data/learning_dev.json the base answers right: loraloop's bake with the default settings
(teacher = parent with the memories in context; the online recipe on its answers: CE + KL anchor
to the parent, stop when learnt) and, in the same run, the naive baseline: plain SFT of the student
on the same teacher answers (same LoRA, learning rate and number of steps, no anchor, no stop).
Both are scored WITHOUT the memories in context: answer agreement (dev questions whose answer
carries the key content), held-out KL gap closure to the teacher, general answers kept, drift.
The last stdout line is one JSON object with metric, value, baseline, baseline_value and ratio.

    .venv/bin/python bench/distill.py [--memories 3]
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

from service.component_configs import bake_config, train_config
from service.config import Settings
from training.learning_eval import LearningHarness, load_fact_set, load_memory_set
from training.pretrained import model_dir

DEV_SET = Path(__file__).parent / "data" / "bake_dev.json"
GENERAL = Path(__file__).parent / "data" / "learning_dev.json"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--memories", type=int, default=3, help="memories baked (of the dev set)")
    parser.add_argument("--general", type=int, default=12, help="general questions asked (of the dev set)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cases = load_memory_set(DEV_SET)[: args.memories]
    _facts, general = load_fact_set(GENERAL)
    harness = LearningHarness(model_dir(), device="cpu")
    general = harness.base_right(general[: args.general])
    settings = Settings(auth_disabled=True, device="cpu")
    recipe = dataclasses.replace(train_config(settings), device="cpu")
    rows = {}
    with tempfile.TemporaryDirectory() as scratch:
        ours = harness.bake(recipe, cases, out_dir=Path(scratch) / "ours", bake_config=bake_config(settings),
                            general=general)
        naive_recipe = dataclasses.replace(recipe, anchor_weight=0.0, stop_when_learnt=False,
                                           max_steps=int(ours.metrics["steps"]))
        naive = harness.bake(naive_recipe, cases, out_dir=Path(scratch) / "naive",
                             bake_config=bake_config(settings), general=general, use_anchors=False)
    for name, score in (("loraloop", ours), ("naive_sft", naive)):
        rows[name] = {**score.row(), "answer_accuracy": score.questions_right / score.questions_total}
        print(json.dumps({"recipe": name, **rows[name]}), flush=True)
    value, baseline = rows["loraloop"]["answer_accuracy"], rows["naive_sft"]["answer_accuracy"]
    print(json.dumps({
        "metric": "bake_answer_accuracy", "value": round(value, 4),
        "baseline": "naive_sft_on_teacher_answers", "baseline_value": round(baseline, 4),
        "ratio": round(value / baseline, 4) if baseline else None,
        "gap_closure": rows["loraloop"]["gap_closure"],
        "baseline_gap_closure": rows["naive_sft"]["gap_closure"],
        "general": rows["loraloop"]["general"], "baseline_general": rows["naive_sft"]["general"],
        "memories": args.memories,
    }))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
