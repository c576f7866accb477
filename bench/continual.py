"""Long-horizon online learning on the real model: N sequential updates of one new fact each.

Each update is its own run warm-started from the previous version, exactly as the train job does
it: the new fact (+ its framed question variants), a replay sample of earlier facts drawn like
`FeedbackRepository.replay_sample` (min(LORALOOP_REPLAY_MAX_ITEMS, ceil(LORALOOP_REPLAY_RATIO x 1))
random earlier items), the KL anchor to the base's own answers and stop-once-learnt, all from the
Settings defaults. After every version it asks every fact taught so far, the general questions the
base answers right (bench/data/learning_dev.json) and measures drift from the base; the last
version is also asked every rephrasing. The baseline, in the same run, is the same sequence
without replay (`no-replay`) or with the KL anchor pulling towards each update's parent instead
of the base model (`parent-anchor`, the recipe before round 2's long-horizon work). Prints the
curve as a table, then one JSON line: value = facts recalled by the last version / N, baseline =
the same for the baseline sequence; `general_ratio` compares the general answers kept.

    .venv/bin/python bench/continual.py [--updates 20] [--baseline no-replay|parent-anchor|none]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from service.component_configs import train_config
from service.config import Settings
from training.generate import answer_has_keys
from training.learning_eval import Fact, GeneralQuestion, LearningHarness, load_fact_set
from training.pretrained import model_dir

DEV_SET = Path(__file__).parent / "data" / "learning_dev.json"
BASELINE_NAMES = {
    "no-replay": "same_updates_without_replay",
    "parent-anchor": "same_updates_anchored_to_parent",
    "none": "none",
}


def replay_for(taught: list[Fact], *, ratio: float, max_items: int, seed: int) -> list[Fact]:
    """The earlier facts replayed beside one new fact (the train job's policy for one new item)."""
    n = min(max_items, math.ceil(ratio * 1), len(taught))
    return random.Random(seed).sample(taught, n) if n else []


def run_sequence(
    harness: LearningHarness,
    facts: list[Fact],
    general: list[GeneralQuestion],
    settings: Settings,
    *,
    replay: bool,
    scratch: Path,
    label: str,
) -> list[dict]:
    recipe = dataclasses.replace(train_config(settings), device="cpu")
    if label == "parent-anchor":
        recipe = dataclasses.replace(recipe, anchor_reference="parent")
    parent: Path | None = None
    curve = []
    for index, fact in enumerate(facts):
        taught = facts[:index]
        replayed = (
            replay_for(
                taught,
                ratio=settings.replay_ratio,
                max_items=settings.replay_max_items,
                seed=settings.train_seed + index,
            )
            if replay
            else []
        )
        out = scratch / f"{label}-v{index + 1}"
        last = index == len(facts) - 1
        started = time.perf_counter()
        score = harness.update(
            recipe,
            [fact],
            out_dir=out,
            parent_adapter=parent,
            replay=replayed,
            judge=facts[: index + 1],
            general=general,
            ask_rephrasings=last,
        )
        parent = out
        row = {
            "recipe": label,
            "version": index + 1,
            "facts_recalled": score.exact,
            "facts_taught": index + 1,
            "first_fact": answer_has_keys(score.answers[facts[0].question], facts[0].keys),
            "general_kept": score.general,
            "general_total": score.general_total,
            "drift_kl": round(score.drift_kl, 4),
            "replayed": len(replayed),
            "steps": score.steps,
            "train_s": round(score.train_seconds, 1),
            "seconds": round(time.perf_counter() - started, 1),
        }
        if last:
            row["rephrased"] = f"{score.rephrased}/{score.rephrased_total}"
        curve.append(row)
        print(json.dumps(row), flush=True)
    return curve


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--updates", type=int, default=20, help="sequential one-fact updates (at most 20)")
    parser.add_argument("--baseline", choices=("no-replay", "parent-anchor", "none"), default="no-replay")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    facts, general = load_fact_set(DEV_SET)
    if not 1 <= args.updates <= len(facts):
        parser.error(f"--updates must be 1..{len(facts)} (facts in {DEV_SET.name})")
    facts = facts[: args.updates]
    settings = Settings(auth_disabled=True, device="cpu")
    harness = LearningHarness(model_dir(), device="cpu")
    general = harness.base_right(general)
    with tempfile.TemporaryDirectory() as scratch:
        curves = {
            "loraloop": run_sequence(
                harness, facts, general, settings, replay=True, scratch=Path(scratch), label="loraloop"
            )
        }
        if args.baseline != "none":
            curves[args.baseline] = run_sequence(
                harness,
                facts,
                general,
                settings,
                replay=args.baseline != "no-replay",
                scratch=Path(scratch),
                label=args.baseline,
            )
    print(
        "| recipe | version | facts recalled | first fact | general kept | drift_kl | replayed | steps | train s |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for curve in curves.values():
        for row in curve:
            print(
                f"| {row['recipe']} | v{row['version']} | {row['facts_recalled']}/{row['facts_taught']} | "
                f"{'yes' if row['first_fact'] else 'no'} | {row['general_kept']}/{row['general_total']} | "
                f"{row['drift_kl']} | {row['replayed']} | {row['steps']} | {row['train_s']} |"
            )
    last = curves["loraloop"][-1]
    baseline = curves[args.baseline][-1] if args.baseline != "none" else None
    value = last["facts_recalled"] / len(facts)
    baseline_value = None if baseline is None else baseline["facts_recalled"] / len(facts)
    print(
        json.dumps(
            {
                "metric": "continual_facts_recalled_share",
                "value": round(value, 4),
                "baseline": BASELINE_NAMES[args.baseline],
                "baseline_value": None if baseline_value is None else round(baseline_value, 4),
                "ratio": round(value / baseline_value, 4) if baseline_value else None,
                "updates": len(facts),
                "general_kept": f"{last['general_kept']}/{last['general_total']}",
                "drift_kl": last["drift_kl"],
                "gate_max_drift_kl": settings.gate_max_drift_kl,
                "rephrased": last.get("rephrased"),
                "general_ratio": round(last["general_kept"] / baseline["general_kept"], 4)
                if baseline and baseline["general_kept"]
                else None,
                "baseline_general_kept": f"{baseline['general_kept']}/{baseline['general_total']}"
                if baseline
                else None,
                "baseline_drift_kl": baseline["drift_kl"] if baseline else None,
            }
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
