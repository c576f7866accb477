"""Rendering throughput: training.render on 10k mixed feedback items vs the per-message prefix-delta
approach (seed 004: re-render and re-tokenize every message prefix through the chat template and
mask the delta of the target turn), both in the same run on the same items and tokenizer, item by
item in alternation so that background load on a shared machine affects both alike.

Prints one line per approach, then the comparison as the last line:
{"metric", "value", "baseline", "baseline_value", "ratio"} (examples/s; ratio > 1 = faster).

    python bench/render.py [--items 10000] [--family qwen2] [--seed 0]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "2")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from training.render import IGNORE_INDEX, RenderConfig, render_example
from training.tokenizer_files import load_tokenizer

WORDS = ["the", "a", "deploy", "server", "config", "error", "retry", "please", "check", "log", "file", "path", "user", "token", "cache", "model", "adapter", "version", "trip", "Paris", "Tokyo", "東京", "日本語", "café", "naïve", "🙂", "✅", "42", "3.14", '{"k":', "1}", "->", "because", "therefore", "however", "quickly", "install", "update", "restart"]


def sentence(rng: random.Random, low: int, high: int) -> str:
    words = [rng.choice(WORDS) for _ in range(rng.randint(low, high))]
    text = " ".join(words)
    if rng.random() < 0.2:
        text = text.replace(" ", "\n", 2)
    return text[0].upper() + text[1:] + rng.choice([".", "?", "!", ""])


def conversation(rng: random.Random) -> list[dict]:
    messages = []
    if rng.random() < 0.6:
        messages.append({"role": "system", "content": sentence(rng, 5, 30)})
    for _ in range(rng.randint(1, 8)):
        messages.append({"role": "user", "content": sentence(rng, 3, 40)})
        if rng.random() < 0.15:
            call = {"type": "function", "function": {"name": "search", "arguments": {"q": sentence(rng, 2, 6)}}}
            messages.append({"role": "assistant", "content": "", "tool_calls": [call]})
            messages.append({"role": "tool", "content": sentence(rng, 5, 40), "tool_call_id": "c"})
        messages.append({"role": "assistant", "content": sentence(rng, 5, 60)})
    return messages


def mixed_items(count: int, seed: int) -> list[dict]:
    """70 % corrections of the last assistant turn, 10 % multi-turn targets, 10 % raw text, 10 % segments."""
    rng = random.Random(seed)
    items = []
    for _ in range(count):
        kind = rng.random()
        if kind < 0.7:
            items.append({"messages": conversation(rng), "continuation": sentence(rng, 5, 80)})
        elif kind < 0.8:
            items.append({"messages": conversation(rng), "target_roles": ["assistant"]})
        elif kind < 0.9:
            items.append({"context": sentence(rng, 20, 200), "continuation": sentence(rng, 5, 60)})
        else:
            items.append({"segments": [{"text": sentence(rng, 3, 40) + "\n", "label": rng.random() < 0.5}
                                       for _ in range(rng.randint(2, 8))]})
    return items


def prefix_delta_render(tokenizer, item: dict) -> tuple[list[int], list[int]] | None:
    """The baseline: every message prefix re-rendered and re-tokenized; a target turn's tokens are
    the delta between the prefix before it (with the generation prompt) and the prefix through it."""
    if "segments" in item:
        ids: list[int] = []
        labels: list[int] = []
        text = ""
        for segment in item["segments"]:
            text += segment["text"]
            prefix = tokenizer(text, add_special_tokens=False)["input_ids"]
            delta = prefix[len(ids):]
            labels += delta if segment["label"] else [IGNORE_INDEX] * len(delta)
            ids = prefix
        return ids, labels
    if "context" in item:
        context = tokenizer(item["context"])["input_ids"]
        ids = tokenizer(item["context"] + item["continuation"])["input_ids"]
        return ids, [IGNORE_INDEX] * len(context) + ids[len(context):]
    messages = [{**m, "content": m.get("content") or ""} for m in item["messages"]]
    if "continuation" in item:
        end = len(messages) - 1 if messages[-1]["role"] == "assistant" else len(messages)
        messages = [*messages[:end], {"role": "assistant", "content": item["continuation"]}]
        targets = {end}
    else:
        targets = {i for i, m in enumerate(messages) if m["role"] in item["target_roles"] and i > 0}
    ids, labels = [], []
    for index in range(len(messages)):
        if index in targets:
            prompt = tokenizer.apply_chat_template(messages[:index], add_generation_prompt=True)["input_ids"]
            labels += [IGNORE_INDEX] * (len(prompt) - len(labels))
            ids = prompt
        prefix = tokenizer.apply_chat_template(messages[: index + 1])["input_ids"]
        delta = prefix[len(ids):]
        labels += delta if index in targets else [IGNORE_INDEX] * len(delta)
        ids = prefix
    return ids, labels


def _first_label(labels: list[int]) -> int:
    return next(i for i, label in enumerate(labels) if label != IGNORE_INDEX)


def interleaved(tokenizer, items, ours, baseline) -> tuple[float, float, list, list]:
    """Both approaches item by item, alternating, so background load hits both alike."""
    ours_seconds = base_seconds = 0.0
    ours_results, base_results = [], []
    clock = time.perf_counter
    for item in items:
        started = clock()
        ours_results.append(ours(tokenizer, item))
        middle = clock()
        base_results.append(baseline(tokenizer, item))
        ours_seconds += middle - started
        base_seconds += clock() - middle
    return ours_seconds, base_seconds, ours_results, base_results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=10_000)
    parser.add_argument("--family", default="qwen2")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    tokenizer = load_tokenizer(args.family)
    items = mixed_items(args.items, args.seed)
    config = RenderConfig(max_seq_len=8192, max_continuation_tokens=4096)

    def ours(tok, item):
        return render_example(tok, item, config)

    for warm in items[:50]:  # compile templates, build caches
        ours(tokenizer, warm)
        prefix_delta_render(tokenizer, warm)
    ours_seconds, base_seconds, examples, baseline = interleaved(tokenizer, items, ours, prefix_delta_render)

    rendered = [e for e in examples if e is not None]
    tokens = sum(len(e.input_ids) for e in rendered)
    same = sum(1 for example, base in zip(examples, baseline)
               if example is not None and base is not None
               and example.input_ids[: _first_label(example.labels)] == base[0][: _first_label(example.labels)])
    ours_rate = len(items) / ours_seconds
    base_rate = len(items) / base_seconds
    print(json.dumps({"approach": "training.render", "family": args.family, "items": len(items),
                      "seconds": round(ours_seconds, 3), "examples_per_s": round(ours_rate, 1),
                      "tokens_per_s": round(tokens / ours_seconds), "examples": len(rendered)}))
    print(json.dumps({"approach": "prefix_delta", "family": args.family, "items": len(items),
                      "seconds": round(base_seconds, 3), "examples_per_s": round(base_rate, 1),
                      "same_context_as_ours": round(same / max(len(rendered), 1), 4)}))
    print(json.dumps({"metric": "render_examples_per_s", "value": round(ours_rate, 1),
                      "baseline": "prefix_delta_examples_per_s", "baseline_value": round(base_rate, 1),
                      "ratio": round(ours_rate / base_rate, 2)}))


if __name__ == "__main__":
    main()
